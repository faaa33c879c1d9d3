//! The DMA layer, after Linux's kernel/dma: the device type the DMA API takes and, for now, the
//! contiguous-memory API ([`contiguous`]). The dma-direct, dma-iommu and dma-remap back ends come
//! with later issues and grow [`Device`] into the full DMA device model (masks, `dma-ranges`,
//! coherence, an ops table).

pub mod busmap;
pub mod contiguous;
pub mod maint;
pub mod swiotlb;

use core::fmt;
use core::ops::BitOr;

use crate::dt::ShortStr;
use crate::mm::addr::PhysAddr;
use crate::mm::cma::CmaArea;

/// A device name: its DT path or a name chosen by the caller, truncated to fit.
pub type DeviceName = ShortStr<64>;

/// The addressing limit of a device that reaches every physical address.
pub const DMA_LIMIT_ALL: u64 = u64::MAX;

/// A device as the DMA layer sees it: a name, how far it can address, and the CMA area it owns.
#[derive(Clone, Copy, Debug)]
pub struct Device {
    name: DeviceName,
    dma_limit: u64,
    cma_area: Option<&'static CmaArea>,
}

impl Device {
    /// A device reaching physical addresses below `dma_limit` (an exclusive end: the highest
    /// address it can reach, plus one; [`DMA_LIMIT_ALL`] for all of them), with no CMA area of its
    /// own.
    pub fn new(name: &str, dma_limit: u64) -> Device {
        Device { name: DeviceName::new(name), dma_limit, cma_area: None }
    }

    /// The same device owning `area`: its contiguous allocations come from that area and never
    /// from the default one.
    pub fn with_cma_area(self, area: &'static CmaArea) -> Device {
        Device { cma_area: Some(area), ..self }
    }

    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// Exclusive end of the physical addresses the device can reach.
    pub fn dma_limit(&self) -> u64 {
        self.dma_limit
    }

    /// Whether the device can reach every byte of `[addr, addr + bytes)`.
    pub fn can_reach(&self, addr: PhysAddr, bytes: u64) -> bool {
        addr.as_u64().checked_add(bytes).is_some_and(|end| end <= self.dma_limit)
    }

    /// The CMA area the device owns, if any.
    pub fn cma_area(&self) -> Option<&'static CmaArea> {
        self.cma_area
    }

    /// The device of DT node `node`: named by its path, reaching all addresses (`dma-ranges` and
    /// masks come with dma-direct), owning the CMA area its `memory-region` names if that pool
    /// became an area (see `mm::cma::setup::CmaSetup::area_for_device`). An error for a malformed
    /// or dangling `memory-region`.
    #[cfg(target_os = "none")]
    pub fn from_dt(dt: &crate::dt::DeviceTree<'_>, node: &crate::dt::Node<'_>) -> Result<Device, crate::dt::DtError> {
        let mut path = alloc::string::String::new();
        let _ = fmt::write(&mut path, format_args!("{}", node.path()));
        let dev = Device::new(&path, DMA_LIMIT_ALL);
        let area = match crate::mm::cma::setup::registry() {
            Some(r) => r.area_for_device(dt, node)?,
            None => None,
        };
        Ok(match area {
            Some(a) => dev.with_cma_area(a),
            None => dev,
        })
    }
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
