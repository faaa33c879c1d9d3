//! swiotlb bounce pools in the kernel: the memory behind a [`Swiotlb`] slot allocator, and the
//! copies between a mapped buffer and its bounce slot (Linux's kernel/dma/swiotlb.c, the parts
//! around `swiotlb_tbl_map_single` / `swiotlb_bounce`).
//!
//! The platform pool is reserved at boot ([`init`], called by the boot path between the CMA
//! reservations and the page allocator) below 4 GiB, the smallest limit the platform's devices
//! are assumed to have (their default 32-bit mask); `swiotlb=<slots>` sizes it (default
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
//! Not done: a `restricted-dma-pool` named by a device's `memory-region` (the type supports a
//! device's own pool through `Device::with_bounce_pool`, but nothing reserves one from the DT yet).

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
    tlb: Mutex<Swiotlb>,
}

impl fmt::Debug for BouncePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BouncePool({:#x}+{:#x}{})", self.base.0, self.size, if self.force { ", forced" } else { "" })
    }
}

impl BouncePool {
    /// A pool of `nslabs` slots at `base`; `force` makes every streaming mapping of its devices
    /// bounce. The memory must be reserved for the pool alone and mapped at its physical address
    /// before the first mapping.
    pub fn new(base: PhysAddr, nslabs: u32, force: bool) -> Result<BouncePool, SwiotlbError> {
        let tlb = Swiotlb::new(base, nslabs)?;
        Ok(BouncePool { base, size: tlb.size(), force, tlb: Mutex::new(tlb) })
    }

    pub fn base(&self) -> PhysAddr {
        self.base
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether every streaming mapping bounces (`swiotlb=force`).
    pub fn is_forced(&self) -> bool {
        self.force
    }

    /// Whether `phys` lies in the pool (read without the lock: the range never changes).
    #[inline]
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
    use crate::mm::memmap::{HumanSize, MemoryMap, ReservationKind};
    use crate::println;
    use spin::Once;

    static PLATFORM_POOL: Once<Option<BouncePool>> = Once::new();
    static NONCOHERENT: Once<bool> = Once::new();

    /// The platform's bounce pool; `None` before [`init`] or if it could not be reserved.
    #[inline]
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

    /// Boot step between the CMA reservations and the page allocator: reserves the platform's
    /// bounce pool below 4 GiB (and below what the CPU addresses) as `swiotlb=` says, and records
    /// `dma.noncoherent`. A pool that cannot be reserved is reported and left out: devices then
    /// get mapping errors instead of bounces.
    pub fn init(bootargs: &Bootargs<'_>, memmap: &mut MemoryMap) {
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
            let limit = crate::kernel::cpu_addressable_limit().map_or(1 << 32, |l| l.min(1 << 32));
            let base = match memmap.alloc_early(size, crate::mm::addr::PAGE_SIZE, Some(limit), ReservationKind::Swiotlb, "swiotlb") {
                Ok(b) => b,
                Err(e) => {
                    println!("swiotlb: no {} below {limit:#x}: {e}; no bounce buffering", HumanSize(size));
                    return None;
                }
            };
            match BouncePool::new(base, slots, force) {
                Ok(p) => {
                    println!("swiotlb: {} ({slots} slots) at {base}{}", HumanSize(size), if force { ", forced" } else { "" });
                    Some(p)
                }
                Err(e) => {
                    println!("swiotlb: {e}; no bounce buffering");
                    None
                }
            }
        });
    }
}
