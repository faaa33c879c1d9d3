//! swiotlb bounce pools in the kernel: the memory behind a [`Swiotlb`] slot allocator, and the
//! copies between a mapped buffer and its bounce slot (Linux's kernel/dma/swiotlb.c, the parts
//! around `swiotlb_tbl_map_single` / `swiotlb_bounce`).
//!
//! The platform pool is reserved at boot ([`init`], called by the boot path between the CMA
//! reservations and the page allocator) below the smallest DMA limit of the platform: the lowest
//! address a device with the default 32-bit mask stops reaching, over every bus of the device tree
//! with `dma-ranges` (through that bus's map, [`BusMap::for_children_of`]) and the root's own
//! identity view (4 GiB); the choice is logged. `swiotlb=<slots>` sizes it (default
//! [`DEFAULT_SLOTS`], 4 MiB: Linux's 64 MiB would slow every boot for nothing under QEMU) and
//! `swiotlb=force` bounces every streaming mapping. The pool is not zeroed: every mapping copies
//! the original in before the device sees the slot, whatever the direction (as Linux does since
//! 2022), so stale data of an earlier mapping never reaches a device.
//!
//! Copies: map copies the original into the slot; unmap and sync-for-CPU copy the slot back for
//! from-device and bidirectional mappings; sync-for-device copies the original in again for
//! to-device and bidirectional ones. A full pool is a mapping error, never a reuse of a live
//! slot. Cache maintenance of the slot, for non-coherent devices, is the caller's (dma-direct's).
//!
//! Restricted pools (Linux's `restricted-dma-pool`, kernel/dma/swiotlb.c
//! `rmem_swiotlb_device_init`): an available `/reserved-memory` child with that compatible and a
//! `reg` (reserved by the memory map already) or a `size` (placed here, below the platform limit)
//! becomes a forced pool of its own at boot; a device whose `memory-region` names it gets it
//! ([`restricted_pool_for`], used by `Device::from_dt`), and then every streaming mapping of that
//! device bounces through it, never through the platform pool.
//!
//! A restricted pool also serves all coherent allocations of its devices ([`BouncePool::alloc`],
//! Linux's `swiotlb_alloc` as `dma_direct_alloc` calls it when `is_swiotlb_for_alloc`): the
//! device must never see memory outside its pool, so these come from the pool's slots (whole
//! pages, aligned to their size rounded up to a power of two, as `dma_alloc_coherent` promises)
//! and a full pool is an allocation error, never a fallback to CMA or the page allocator. Pool
//! memory handed out this way is zeroed here (unlike a mapping's slot, nothing is copied into it).
//! An allocation is at most one segment, [`super::swiotlb::MAX_MAPPING_SIZE`] (256 KiB), as in
//! Linux. The platform pool serves no allocations.

#[cfg(target_os = "none")]
use super::busmap::BusMap;
use core::fmt;

use spin::Mutex;

#[cfg(target_os = "none")]
use super::maint::Direction;
use super::swiotlb::{Stats, Swiotlb, SwiotlbError};
use crate::mm::addr::PhysAddr;

/// Slots of the platform pool when `swiotlb=` gives none: 2048 × 2 KiB = 4 MiB.
pub const DEFAULT_SLOTS: u32 = 2048;

/// A bounce pool: a physically contiguous range the CPU addresses at its physical address
/// (the kernel's identity map), cut into swiotlb slots.
pub struct BouncePool {
    base: PhysAddr,
    size: u64,
    force: bool,
    /// Whether the pool serves its devices' coherent allocations (a restricted pool).
    for_alloc: bool,
    tlb: Mutex<Swiotlb>,
}

impl fmt::Debug for BouncePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match (self.for_alloc, self.force) {
            (true, _) => ", restricted",
            (false, true) => ", forced",
            (false, false) => "",
        };
        write!(f, "BouncePool({:#x}+{:#x}{kind})", self.base.0, self.size)
    }
}

impl BouncePool {
    /// A pool of `nslabs` slots at `base`; `force` makes every streaming mapping of its devices
    /// bounce. The memory must be reserved for the pool alone and mapped at its physical address
    /// before the first mapping.
    pub fn new(base: PhysAddr, nslabs: u32, force: bool) -> Result<BouncePool, SwiotlbError> {
        let tlb = Swiotlb::new(base, nslabs)?;
        Ok(BouncePool { base, size: tlb.size(), force, for_alloc: false, tlb: Mutex::new(tlb) })
    }

    /// A restricted DMA pool of `nslabs` slots at `base`: every streaming mapping of its devices
    /// bounces through it and their coherent allocations come from it ([`BouncePool::alloc`]).
    /// The memory must be reserved as for [`BouncePool::new`].
    pub fn restricted(base: PhysAddr, nslabs: u32) -> Result<BouncePool, SwiotlbError> {
        Ok(BouncePool { for_alloc: true, ..BouncePool::new(base, nslabs, true)? })
    }

    pub fn base(&self) -> PhysAddr {
        self.base
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether every streaming mapping bounces (`swiotlb=force`, or a restricted pool).
    pub fn is_forced(&self) -> bool {
        self.force
    }

    /// Whether the pool serves its devices' coherent allocations (Linux's
    /// `is_swiotlb_for_alloc`): true for a restricted pool.
    #[inline(always)]
    pub fn serves_alloc(&self) -> bool {
        self.for_alloc
    }

    /// Whether `phys` lies in the pool (read without the lock: the range never changes).
    #[inline(always)]
    pub fn contains(&self, phys: PhysAddr) -> bool {
        phys.0.checked_sub(self.base.0).is_some_and(|off| off < self.size)
    }

    pub fn stats(&self) -> Stats {
        self.tlb.lock().stats()
    }
}

/// Copies between CPU physical ranges through the identity map.
#[cfg(target_os = "none")]
fn copy(from: PhysAddr, to: PhysAddr, len: u64) -> Result<(), super::api::DmaError> {
    let va = |p: PhysAddr| {
        usize::try_from(p.0)
            .ok()
            .filter(|a| a.checked_add(len as usize).is_some())
            .ok_or(super::api::DmaError::NotCpuAddressable { phys: p, size: len })
    };
    let (src, dst) = (va(from)?, va(to)?);
    // SAFETY: both ranges are mapped by the identity map (RAM) and addressable (checked above); the
    // bounce slot belongs to this mapping alone (the slot allocator's guarantee) and the original
    // is the buffer the caller handed to the DMA API for the mapping's lifetime. They never
    // overlap: the pool is reserved memory no caller buffer lies in.
    unsafe { core::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len as usize) };
    Ok(())
}

#[cfg(target_os = "none")]
impl BouncePool {
    /// Takes slots for `orig .. orig + size` and copies the original in; returns the bounce
    /// address. A full pool is [`super::api::DmaError::Bounce`] with [`SwiotlbError::Full`].
    pub fn map(&self, orig: PhysAddr, size: u64) -> Result<PhysAddr, super::api::DmaError> {
        let slot = self.tlb.lock().map(orig, size, 0).map_err(super::api::DmaError::Bounce)?;
        if let Err(e) = copy(orig, slot.addr, size) {
            let _ = self.tlb.lock().unmap(slot.addr, size);
            return Err(e);
        }
        Ok(slot.addr)
    }

    /// Copies the slot back (from-device, bidirectional) and frees it. An address that does not
    /// start a live mapping of `size` bytes is refused and changes nothing.
    pub fn unmap(&self, bounce: PhysAddr, size: u64, dir: Direction) -> Result<(), super::api::DmaError> {
        let mut tlb = self.tlb.lock();
        let (orig, mapped) = tlb.orig(bounce).ok_or(super::api::DmaError::Bounce(SwiotlbError::NotMapped { addr: bounce }))?;
        if mapped != size {
            return Err(super::api::DmaError::Bounce(SwiotlbError::WrongSize { addr: bounce, size, mapped }));
        }
        if dir != Direction::ToDevice {
            copy(bounce, orig, size)?;
        }
        tlb.unmap(bounce, size).map(|_| ()).map_err(super::api::DmaError::Bounce)
    }

    /// Sync for the CPU of `bounce .. bounce + size` (inside one mapping): copies it back unless
    /// the mapping is to-device.
    pub fn sync_for_cpu(&self, bounce: PhysAddr, size: u64, dir: Direction) -> Result<(), super::api::DmaError> {
        let orig = self.orig_of(bounce, size)?;
        if dir != Direction::ToDevice {
            copy(bounce, orig, size)?;
        }
        Ok(())
    }

    /// Sync for the device of `bounce .. bounce + size`: copies the original in again unless the
    /// mapping is from-device.
    pub fn sync_for_device(&self, bounce: PhysAddr, size: u64, dir: Direction) -> Result<(), super::api::DmaError> {
        let orig = self.orig_of(bounce, size)?;
        if dir != Direction::FromDevice {
            copy(orig, bounce, size)?;
        }
        Ok(())
    }

    /// Takes whole pages of the pool for a coherent allocation of `size` bytes (rounded up to
    /// pages), aligned to that size rounded up to a power of two, and zeroes them; returns their
    /// address and size in bytes. A full pool is [`super::api::DmaError::Bounce`] with
    /// [`SwiotlbError::Full`], a request over 256 KiB one with [`SwiotlbError::TooLarge`]. Cache
    /// maintenance for a non-coherent device is the caller's.
    pub fn alloc(&self, size: u64) -> Result<(PhysAddr, u64), super::api::DmaError> {
        use crate::mm::addr::PAGE_SIZE;
        let too_large = super::api::DmaError::Bounce(SwiotlbError::TooLarge { size, offset: 0 });
        let bytes = size.checked_next_multiple_of(PAGE_SIZE).ok_or(too_large)?;
        let align = bytes.checked_next_power_of_two().ok_or(too_large)?;
        let slot = self.tlb.lock().alloc(bytes, align).map_err(super::api::DmaError::Bounce)?;
        let cpu = match usize::try_from(slot.addr.0).ok().filter(|a| a.checked_add(bytes as usize).is_some()) {
            Some(a) => a,
            None => {
                let _ = self.tlb.lock().free(slot.addr, bytes);
                return Err(super::api::DmaError::NotCpuAddressable { phys: slot.addr, size: bytes });
            }
        };
        // SAFETY: `bytes` bytes of the pool's reserved memory, identity-mapped and addressable
        // (checked above), just taken for this allocation alone by the slot allocator.
        unsafe { core::ptr::write_bytes(cpu as *mut u8, 0, bytes as usize) };
        Ok((slot.addr, bytes))
    }

    /// Gives back an allocation of [`BouncePool::alloc`]: `phys` and `bytes` as it returned them.
    /// Anything else (a mapping, a double free, another size) is refused and changes nothing.
    pub fn free(&self, phys: PhysAddr, bytes: u64) -> Result<(), super::api::DmaError> {
        self.tlb.lock().free(phys, bytes).map_err(super::api::DmaError::Bounce)
    }

    fn orig_of(&self, bounce: PhysAddr, size: u64) -> Result<PhysAddr, super::api::DmaError> {
        self.tlb
            .lock()
            .orig_of(bounce, size)
            .ok_or(super::api::DmaError::Bounce(SwiotlbError::NotMapped { addr: bounce }))
    }
}

#[cfg(target_os = "none")]
pub use kernel::*;

#[cfg(target_os = "none")]
mod kernel {
    use super::*;
    use crate::bootargs::Bootargs;
    use crate::dt::{DeviceTree, DtError, Node};
    use crate::mm::memmap::{HumanSize, MemoryMap, ReservationKind};
    use alloc::format;
    use alloc::string::{String, ToString};
    use alloc::vec::Vec;
    use crate::println;
    use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use spin::Once;

    static PLATFORM_POOL: Once<Option<BouncePool>> = Once::new();
    static NONCOHERENT: Once<bool> = Once::new();
    /// The platform pool's `force`, copied out of [`PLATFORM_POOL`] for the mapping fast path
    /// (one load rather than the `Once` and `Option` checks).
    static PLATFORM_FORCED: AtomicBool = AtomicBool::new(false);

    /// The platform pool's base and size (0 without a pool), for the unmap fast path.
    static PLATFORM_BASE: AtomicU64 = AtomicU64::new(0);
    static PLATFORM_SIZE: AtomicU64 = AtomicU64::new(0);

    /// Whether the platform pool exists and bounces every streaming mapping (`swiotlb=force`).
    #[inline(always)]
    pub fn platform_forced() -> bool {
        PLATFORM_FORCED.load(Ordering::Relaxed)
    }

    /// Whether `phys` lies in the platform pool (false without one).
    #[inline(always)]
    pub fn in_platform_pool(phys: PhysAddr) -> bool {
        phys.0.wrapping_sub(PLATFORM_BASE.load(Ordering::Relaxed)) < PLATFORM_SIZE.load(Ordering::Relaxed)
    }

    /// The platform's bounce pool; `None` before [`init`] or if it could not be reserved.
    #[inline(always)]
    pub fn platform_pool() -> Option<&'static BouncePool> {
        PLATFORM_POOL.get().and_then(Option::as_ref)
    }

    /// Whether the bootarg `dma.noncoherent` asks to treat every device as non-coherent.
    pub fn force_noncoherent() -> bool {
        NONCOHERENT.get().copied().unwrap_or(false)
    }

    /// `swiotlb=` as (slots, force): a number of slots, `force`, or both separated by a comma.
    pub(crate) fn parse_swiotlb(arg: Option<&str>) -> Result<(u32, bool), &'static str> {
        let mut slots = DEFAULT_SLOTS;
        let mut force = false;
        for part in arg.unwrap_or("").split(',').filter(|p| !p.is_empty()) {
            match part {
                "force" => force = true,
                "noforce" => force = false,
                n => slots = n.parse::<u32>().ok().filter(|&n| n > 0).ok_or("expected a slot count, `force` or `noforce`")?,
            }
        }
        Ok((slots, force))
    }

    /// A restricted pool and the `/reserved-memory` node (its offset) it was made from.
    struct Restricted {
        node: usize,
        pool: BouncePool,
    }

    static RESTRICTED: Once<Vec<Restricted>> = Once::new();

    /// The restricted pool `node`'s `memory-region` names, if any of its phandles is one. An
    /// error for a malformed or dangling `memory-region`.
    pub fn restricted_pool_for(dt: &DeviceTree<'_>, node: &Node<'_>) -> Result<Option<&'static BouncePool>, DtError> {
        let Some(prop) = node.property("memory-region") else { return Ok(None) };
        let pools = RESTRICTED.get().map_or(&[][..], Vec::as_slice);
        for phandle in prop.as_u32s()? {
            let off = dt.phandle_target(&prop, phandle)?.offset();
            if let Some(r) = pools.iter().find(|r| r.node == off) {
                return Ok(Some(&r.pool));
            }
        }
        Ok(None)
    }

    /// The lowest limit of the platform's DMA for a device with the default 32-bit mask: 4 GiB
    /// (the root's identity view) or lower where a bus's `dma-ranges` bring it down, with the
    /// bus that does. Buses whose `dma-ranges` are malformed, or reach nothing under 32 bits, are
    /// reported and left out.
    pub fn platform_dma_limit(dt: &DeviceTree<'_>) -> (u64, Option<String>) {
        let mut best = (1u64 << 32, None);
        for node in dt.nodes().filter(|n| n.has_property("dma-ranges")) {
            match BusMap::for_children_of(&node) {
                Ok(map) => match map.max_reachable(super::super::DEFAULT_MASK).0 {
                    0 => println!("swiotlb: {}: no 32-bit DMA address reaches RAM, ignored for the pool's placement", node.path()),
                    l if l < best.0 => best = (l, Some(format!("{}", node.path()))),
                    _ => {}
                },
                Err(e) => println!("swiotlb: {}: {e}; ignored for the pool's placement", node.path()),
            }
        }
        best
    }

    /// The restricted pools of `/reserved-memory`, reserved; refusals are reported.
    fn restricted_pools(dt: &DeviceTree<'_>, memmap: &mut MemoryMap, limit: u64) -> Vec<Restricted> {
        let mut out = Vec::new();
        let Ok(nodes) = dt.reserved_memory() else { return out };
        for rm in nodes.flatten() {
            if !rm.is_available() || !rm.compatible().contains("restricted-dma-pool") {
                continue;
            }
            let name = rm.name();
            let region = if rm.has_reg() {
                match rm.regs().next() {
                    Some(Ok(r)) if memmap.reservations().iter().any(|x| x.region.base() == r.base() && x.region.size() == r.size()) => {
                        Ok((r.base(), r.size()))
                    }
                    Some(Ok(r)) => Err(format!("{}+{:#x} is not reserved RAM", r.base(), r.size())),
                    Some(Err(e)) => Err(format!("{e}")),
                    None => Err("empty `reg`".into()),
                }
            } else {
                let size = rm.size.unwrap_or(0);
                let align = rm.alignment.unwrap_or(crate::mm::addr::PAGE_SIZE).max(crate::mm::addr::PAGE_SIZE);
                memmap
                    .alloc_early(size, align, Some(limit), ReservationKind::Swiotlb, name)
                    .map(|b| (b, size))
                    .map_err(|e| format!("no {} below {limit:#x}: {e}", HumanSize(size)))
            };
            let pool = region.and_then(|(base, size)| {
                let slots = u32::try_from(size / super::super::swiotlb::IO_TLB_SIZE).map_err(|_| "too large".to_string())?;
                BouncePool::restricted(base, slots).map_err(|e| format!("{e}"))
            });
            match pool {
                Ok(pool) => {
                    println!("swiotlb: restricted pool `{name}`: {} at {}", HumanSize(pool.size()), pool.base());
                    out.push(Restricted { node: rm.node.offset(), pool });
                }
                Err(e) => println!("swiotlb: restricted pool `{name}` refused: {e}"),
            }
        }
        out
    }

    /// Boot step between the CMA reservations and the page allocator: reserves the platform's
    /// bounce pool below the platform's DMA limit (and below what the CPU addresses) as
    /// `swiotlb=` says, and the restricted pools of `/reserved-memory`; records
    /// `dma.noncoherent`. A pool that cannot be reserved is reported and left out: devices then
    /// get mapping errors instead of bounces.
    pub fn init(dt: &DeviceTree<'_>, bootargs: &Bootargs<'_>, memmap: &mut MemoryMap) {
        NONCOHERENT.call_once(|| bootargs.has("dma.noncoherent"));
        if force_noncoherent() {
            println!("dma: every device treated as non-coherent (dma.noncoherent)");
        }
        PLATFORM_POOL.call_once(|| {
            let (slots, force) = match parse_swiotlb(bootargs.get("swiotlb")) {
                Ok(v) => v,
                Err(e) => {
                    println!("swiotlb: bootarg swiotlb={}: {e}; using the defaults", bootargs.get("swiotlb").unwrap_or(""));
                    (DEFAULT_SLOTS, false)
                }
            };
            let size = u64::from(slots) * super::super::swiotlb::IO_TLB_SIZE;
            let (dma_limit, by) = platform_dma_limit(dt);
            let limit = crate::kernel::cpu_addressable_limit().map_or(dma_limit, |l| l.min(dma_limit));
            match by {
                Some(bus) => println!("swiotlb: placed below {limit:#x}: 32-bit DMA through {bus} ends at {dma_limit:#x}"),
                None => println!("swiotlb: placed below {limit:#x}: no bus limits 32-bit DMA below 4 GiB"),
            }
            let base = match memmap.alloc_early(size, crate::mm::addr::PAGE_SIZE, Some(limit), ReservationKind::Swiotlb, "swiotlb") {
                Ok(b) => b,
                Err(e) => {
                    println!("swiotlb: no {} below {limit:#x}: {e}; no bounce buffering", HumanSize(size));
                    return None;
                }
            };
            match BouncePool::new(base, slots, force) {
                Ok(p) => {
                    PLATFORM_FORCED.store(force, Ordering::Relaxed);
                    PLATFORM_BASE.store(p.base().0, Ordering::Relaxed);
                    PLATFORM_SIZE.store(p.size(), Ordering::Relaxed);
                    println!("swiotlb: {} ({slots} slots) at {base}{}", HumanSize(size), if force { ", forced" } else { "" });
                    Some(p)
                }
                Err(e) => {
                    println!("swiotlb: {e}; no bounce buffering");
                    None
                }
            }
        });
        let limit = crate::kernel::cpu_addressable_limit().map_or(1 << 32, |l| l.min(1 << 32));
        RESTRICTED.call_once(|| restricted_pools(dt, memmap, limit));
    }
}
