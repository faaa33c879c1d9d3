//! The DMA layer, after Linux's kernel/dma: the device model ([`Device`]: masks, bus-address map
//! from `dma-ranges`, cache coherence, CMA area, back end), the public DMA API ([`api`]), its first
//! back end dma-direct ([`direct`]), the bounce pools ([`bounce`]) and the contiguous-memory API
//! ([`contiguous`]).
//!
//! Which back end serves a device is its [`Backend`], Linux's `dev->dma_ops` as an enum: dma-direct
//! (with dma-remap for the coherent buffers of non-coherent devices, as in Linux) or dma-iommu. A `match` rather than a table of
//! function pointers keeps dma-direct's fast path inlinable, as Linux's `dma_map_direct()` check
//! does.

pub mod api;
pub mod bounce;
pub mod busmap;
#[cfg(test)]
mod cache_model;
pub mod contiguous;
#[cfg(target_os = "none")]
pub mod debug;
pub mod debug_track;
pub mod direct;
pub mod iommu;
pub mod maint;
pub mod pool;
pub mod remap;
pub mod swiotlb;
#[cfg(target_os = "none")]
mod ktests;
#[cfg(target_os = "none")]
mod remap_ktests;
#[cfg(target_os = "none")]
mod debug_ktests;
#[cfg(target_os = "none")]
mod iommu_ktests;

use core::fmt;
use core::ops::BitOr;

use crate::dt::ShortStr;
use crate::mm::addr::PhysAddr;
use crate::mm::cma::CmaArea;
use bounce::BouncePool;
use busmap::BusMap;

/// A device name: its DT path or a name chosen by the caller, truncated to fit.
pub type DeviceName = ShortStr<64>;

static NEXT_DEVICE_ID: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(1);

/// The addressing limit of a device that reaches every physical address.
pub const DMA_LIMIT_ALL: u64 = u64::MAX;

/// The DMA mask a device starts with, as in Linux: 32 bits until its driver says otherwise.
pub const DEFAULT_MASK: u64 = 0xffff_ffff;

/// The mask of `bits` address bits (64 and more: every address).
pub const fn mask_bits(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Which DMA back end serves a device (Linux's `dev->dma_ops`).
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// No IOMMU: the device sees physical memory through its bus map ([`direct`]).
    Direct,
    /// Behind an IOMMU: the device sees the IOVAs of its domain ([`iommu`]).
    #[cfg(target_os = "none")]
    Iommu(&'static iommu::IommuDomain),
}

impl PartialEq for Backend {
    fn eq(&self, other: &Backend) -> bool {
        match (self, other) {
            (Backend::Direct, Backend::Direct) => true,
            #[cfg(target_os = "none")]
            (Backend::Iommu(a), Backend::Iommu(b)) => core::ptr::eq(*a, *b),
            #[cfg(target_os = "none")]
            _ => false,
        }
    }
}

impl Eq for Backend {}

/// A device as the DMA layer sees it: its name, its streaming and coherent DMA masks, the map from
/// CPU physical to bus addresses its buses impose, whether it snoops the CPU caches, the CMA area
/// and bounce pool it owns (if any) and the back end that serves it.
#[derive(Clone, Copy, Debug)]
pub struct Device {
    /// Distinguishes devices that share a name; copies of a `Device` share it.
    id: u32,
    name: DeviceName,
    mask: u64,
    coherent_mask: u64,
    /// Exclusive end of the physical addresses coherent allocations are taken below (derived from
    /// `coherent_mask` and `bus`, or given by [`Device::new`]).
    dma_limit: u64,
    bus: BusMap,
    coherent: bool,
    cma_area: Option<&'static CmaArea>,
    pool: Option<&'static BouncePool>,
    backend: Backend,
}

impl Device {
    /// A device reaching physical addresses below `dma_limit` (an exclusive end: the highest
    /// address it can reach, plus one; [`DMA_LIMIT_ALL`] for all of them) with bus address =
    /// physical address, cache-coherent, with no CMA area or bounce pool of its own, served by
    /// dma-direct. Both masks are `dma_limit - 1`, unchecked: this is how tests model a device of
    /// given reach; drivers start from [`Device::from_dt`] and call [`Device::set_mask`].
    pub fn new(name: &str, dma_limit: u64) -> Device {
        let mask = if dma_limit == DMA_LIMIT_ALL { u64::MAX } else { dma_limit.saturating_sub(1) };
        Device {
            id: NEXT_DEVICE_ID.fetch_add(1, core::sync::atomic::Ordering::Relaxed),
            name: DeviceName::new(name),
            mask,
            coherent_mask: mask,
            dma_limit,
            bus: BusMap::IDENTITY,
            coherent: true,
            cma_area: None,
            pool: None,
            backend: Backend::Direct,
        }
    }

    /// A device with the default 32-bit masks, the given bus map and coherence: what
    /// [`Device::from_dt`] builds, for callers that found those properties another way (a PCI
    /// function inherits them from its host bridge).
    pub fn with_bus(name: &str, bus: BusMap, coherent: bool) -> Device {
        let mut d = Device::new(name, DMA_LIMIT_ALL);
        d.bus = bus;
        d.coherent = coherent;
        d.mask = DEFAULT_MASK;
        d.coherent_mask = DEFAULT_MASK;
        d.dma_limit = d.limit_for(DEFAULT_MASK);
        d
    }

    /// The same device owning `area`: its contiguous allocations come from that area and never
    /// from the default one.
    pub fn with_cma_area(self, area: &'static CmaArea) -> Device {
        Device { cma_area: Some(area), ..self }
    }

    /// The same device bouncing through `pool` rather than the platform's pool (a
    /// `restricted-dma-pool`, or a test's own pool). If the pool serves allocations (a
    /// restricted pool, [`BouncePool::restricted`]) the device's coherent memory comes from it
    /// too, and from nowhere else.
    pub fn with_bounce_pool(self, pool: &'static BouncePool) -> Device {
        Device { pool: Some(pool), ..self }
    }

    /// The same device behind an IOMMU: its DMA goes through `domain` (dma-iommu).
    #[cfg(target_os = "none")]
    pub fn with_iommu(self, domain: &'static iommu::IommuDomain) -> Device {
        Device { backend: Backend::Iommu(domain), ..self }
    }

    /// The same device, treated as not cache-coherent when `coherent` is false.
    pub fn with_coherent(self, coherent: bool) -> Device {
        Device { coherent, ..self }
    }

    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// A number unique to the device (and its copies) for as long as the kernel runs: what
    /// dma-debug keys its records by, since two devices may share a name.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Exclusive end of the physical addresses the device's coherent allocations come from.
    pub fn dma_limit(&self) -> u64 {
        self.dma_limit
    }

    /// Whether the device can reach every byte of `[addr, addr + bytes)` for coherent memory.
    pub fn can_reach(&self, addr: PhysAddr, bytes: u64) -> bool {
        addr.as_u64().checked_add(bytes).is_some_and(|end| end <= self.dma_limit)
    }

    /// The CMA area the device owns, if any.
    pub fn cma_area(&self) -> Option<&'static CmaArea> {
        self.cma_area
    }

    /// The bounce pool the device owns, if any (otherwise the platform's pool serves it).
    #[inline(always)]
    pub fn own_bounce_pool(&self) -> Option<&'static BouncePool> {
        self.pool
    }

    /// The streaming DMA mask: the highest bus address the device can be given.
    pub fn mask(&self) -> u64 {
        self.mask
    }

    /// The mask coherent allocations must satisfy.
    pub fn coherent_mask(&self) -> u64 {
        self.coherent_mask
    }

    /// The device's bus-address map.
    pub fn bus_map(&self) -> &BusMap {
        &self.bus
    }

    /// Whether the device snoops the CPU caches (no cache maintenance needed).
    #[inline(always)]
    pub fn is_coherent(&self) -> bool {
        self.coherent
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether `phys .. phys + len` is reachable under the streaming mask: its bus address, if the
    /// bus map has one, with the last byte at most [`Device::mask`].
    #[inline(always)]
    pub fn bus_addr_within_mask(&self, phys: PhysAddr, len: u64) -> Option<busmap::DmaAddr> {
        within_mask(&self.bus, self.mask, phys, len)
    }

    fn limit_for(&self, mask: u64) -> u64 {
        match self.bus.max_reachable(mask).as_u64() {
            u64::MAX => DMA_LIMIT_ALL,
            l => l,
        }
    }

    /// Record masks already accepted by the back end (see `api`'s `set_mask`).
    #[cfg(target_os = "none")]
    fn store_mask(&mut self, mask: u64) {
        self.mask = mask;
    }

    #[cfg(target_os = "none")]
    fn store_coherent_mask(&mut self, mask: u64) {
        self.coherent_mask = mask;
        self.dma_limit = self.limit_for(mask);
    }

    /// The same device with coherent allocations taken below `limit` (for the retry of
    /// allocations that came back unreachable).
    #[cfg(target_os = "none")]
    fn below(self, limit: u64) -> Device {
        Device { dma_limit: self.dma_limit.min(limit), ..self }
    }

    /// The device of DT node `node`: named by its path, the default 32-bit masks, its bus map from
    /// the `dma-ranges` above it ([`BusMap::from_dt`]), cache-coherent if it or a node above it has
    /// `dma-coherent` (Linux's `of_dma_is_coherent`) unless the bootarg `dma.noncoherent` is given,
    /// owning the CMA area its `memory-region` names if that pool became an area (see
    /// `mm::cma::setup::CmaSetup::area_for_device`) and the restricted bounce pool it names if
    /// any (`bounce::restricted_pool_for`: all its DMA, streaming and coherent, then goes through
    /// that pool). An error
    /// for a malformed `dma-ranges` or a malformed or dangling `memory-region`.
    #[cfg(target_os = "none")]
    pub fn from_dt(dt: &crate::dt::DeviceTree<'_>, node: &crate::dt::Node<'_>) -> Result<Device, crate::dt::DtError> {
        let mut path = alloc::string::String::new();
        let _ = fmt::write(&mut path, format_args!("{}", node.path()));
        let coherent = is_coherent_in_dt(node) && !bounce::force_noncoherent();
        let dev = Device::with_bus(&path, BusMap::from_dt(node)?, coherent);
        let area = match crate::mm::cma::setup::registry() {
            Some(r) => r.area_for_device(dt, node)?,
            None => None,
        };
        let dev = match area {
            Some(a) => dev.with_cma_area(a),
            None => dev,
        };
        Ok(match bounce::restricted_pool_for(dt, node)? {
            Some(p) => dev.with_bounce_pool(p),
            None => dev,
        })
    }
}

/// Whether `node` or a node above it has `dma-coherent` (QEMU virt marks the devices, some boards
/// mark a bus; Linux's `of_dma_is_coherent` walks up the same way).
pub fn is_coherent_in_dt(node: &crate::dt::Node<'_>) -> bool {
    let chain = node.ancestry();
    (0..chain.len()).filter_map(|i| chain.get(i)).any(|n| n.has_property("dma-coherent"))
}

/// The bus address of `phys .. phys + len` through `bus`, if the whole range translates and its
/// last byte is at most `mask` (Linux's `dma_capable`). `None` for an empty range.
#[inline(always)]
pub fn within_mask(bus: &BusMap, mask: u64, phys: PhysAddr, len: u64) -> Option<busmap::DmaAddr> {
    if bus.is_identity() {
        // The last byte's address not overflowing is all the identity asks.
        let last = phys.0.checked_add(len.checked_sub(1)?)?;
        return (last <= mask).then_some(busmap::DmaAddr(phys.0));
    }
    let dma = bus.phys_to_bus(phys, len)?;
    let last = dma.as_u64().checked_add(len.checked_sub(1)?)?;
    (last <= mask).then_some(dma)
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How an allocation may behave, after Linux's gfp_t (only what the DMA layer looks at).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GfpFlags(u32);

impl GfpFlags {
    /// May block: process context (Linux's GFP_KERNEL).
    pub const KERNEL: GfpFlags = GfpFlags(0);
    /// Must not block: interrupt context or under a spin lock (Linux's GFP_ATOMIC). Such a request
    /// never enters CMA.
    pub const ATOMIC: GfpFlags = GfpFlags(1);
    /// Do not print a warning when the allocation fails (Linux's __GFP_NOWARN).
    pub const NOWARN: GfpFlags = GfpFlags(2);

    /// Whether the caller may block.
    pub const fn can_block(self) -> bool {
        self.0 & GfpFlags::ATOMIC.0 == 0
    }

    /// Whether a failure should stay silent.
    pub const fn no_warn(self) -> bool {
        self.0 & GfpFlags::NOWARN.0 != 0
    }
}

impl BitOr for GfpFlags {
    type Output = GfpFlags;

    fn bitor(self, rhs: GfpFlags) -> GfpFlags {
        GfpFlags(self.0 | rhs.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reach_and_flags() {
        let d = Device::new("edu", 1 << 28);
        assert!(d.can_reach(PhysAddr(0), 1 << 28));
        assert!(!d.can_reach(PhysAddr(1), 1 << 28));
        assert!(!d.can_reach(PhysAddr(u64::MAX), 2));
        assert!(Device::new("all", DMA_LIMIT_ALL).can_reach(PhysAddr(0xffff_f000), 0x1000));
        assert_eq!(d.cma_area().map(CmaArea::name), None);
        assert_eq!(format!("{d}"), "edu");
        assert!(GfpFlags::KERNEL.can_block() && !GfpFlags::KERNEL.no_warn());
        assert!(!GfpFlags::ATOMIC.can_block());
        let f = GfpFlags::ATOMIC | GfpFlags::NOWARN;
        assert!(!f.can_block() && f.no_warn());
    }
}
