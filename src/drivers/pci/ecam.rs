//! The kernel side of the generic ECAM host bridge: configuration space as volatile MMIO through
//! `kmap::ioremap`, and the one-time enumeration of the first "pci-host-ecam-generic" bridge of
//! the device tree (the logic is in the rest of this module, host-tested).
//!
//! Only the root bus's 1 MiB of ECAM is mapped: that is all [`enumerate`] scans. An access
//! outside it reads as all-ones (no function) and writes nothing.

use alloc::vec::Vec;
use core::fmt;

use spin::Once;

use super::{enumerate, Bdf, ConfigSpace, EcamWindow, HostBridge, PciDevice, PciError, COMPATIBLE};
use crate::mm::kmap::{self, KmapError};

/// Bytes of ECAM per bus: 32 devices × 8 functions × 4 KiB.
const BUS_BYTES: u64 = 1 << 20;

/// Configuration space of one bus of an ECAM window, mapped at `base`.
pub struct Ecam {
    window: EcamWindow,
    /// Offset of the mapped bus in the window, and its virtual address.
    bus_off: u64,
    base: usize,
}

impl Ecam {
    /// Maps the first bus of `window`.
    pub fn map_root_bus(window: &EcamWindow) -> Result<Ecam, EcamError> {
        let root = Bdf::new(window.bus_start(), 0, 0).ok_or(EcamError::Pci(PciError::HostBridge { what: "bus-range" }))?;
        let bus_off = window.offset(root, 0).ok_or(EcamError::Pci(PciError::HostBridge { what: "bus-range outside reg" }))?;
        let pa = window.base().as_u64().checked_add(bus_off).ok_or(EcamError::Pci(PciError::HostBridge { what: "reg" }))?;
        let base = kmap::ioremap(pa, BUS_BYTES).map_err(EcamError::Map)?;
        Ok(Ecam { window: *window, bus_off, base })
    }

    fn addr(&self, bdf: Bdf, offset: u16) -> Option<usize> {
        let off = self.window.offset(bdf, offset & !3)?.checked_sub(self.bus_off).filter(|&o| o < BUS_BYTES)?;
        self.base.checked_add(off as usize)
    }
}

impl ConfigSpace for Ecam {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        match self.addr(bdf, offset) {
            // SAFETY: an aligned register inside the root bus's ECAM, mapped as device memory by
            // `map_root_bus`; a configuration read has no side effect.
            Some(a) => unsafe { core::ptr::read_volatile(a as *const u32) },
            None => u32::MAX,
        }
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        if let Some(a) = self.addr(bdf, offset) {
            // SAFETY: as in `read32`; the enumeration code owns configuration space at boot.
            unsafe { core::ptr::write_volatile(a as *mut u32, value) };
        }
    }
}

/// Why the PCI bus could not be brought up.
#[derive(Debug)]
pub enum EcamError {
    /// No available "pci-host-ecam-generic" node.
    NoBridge,
    Pci(PciError),
    Map(KmapError),
}

impl fmt::Display for EcamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EcamError::NoBridge => write!(f, "no `{COMPATIBLE}` host bridge in the device tree"),
            EcamError::Pci(e) => write!(f, "{e}"),
            EcamError::Map(e) => write!(f, "mapping ECAM: {e}"),
        }
    }
}

/// The enumerated bus: the bridge and its functions, configured (BARs assigned, decoding and bus
/// mastering on).
pub struct PciBus {
    pub bridge: HostBridge,
    pub devices: Vec<PciDevice>,
}

static BUS: Once<Result<PciBus, EcamError>> = Once::new();

/// The DMA device of function `pdev` of the enumerated bus: named `pci DDDD:BB:DD.F`, with the
/// host bridge's bus map (the function sits below the bridge, so the bridge's own `dma-ranges`
/// translate too) and coherence (`dma.noncoherent` overrides it), and the default masks; the
/// driver sets the mask it knows the device has. Every PCI driver gets its device here, so that
/// the bus decides how its functions do DMA: when the bridge's `iommu-map` puts the function
/// behind an SMMU in use, the device gets an IOMMU domain of its own (dma-iommu), one per
/// StreamID for the kernel's lifetime, unless `iommu.passthrough=1` leaves it a bypass stream
/// (dma-direct).
pub fn dma_device(pdev: &PciDevice) -> Result<crate::dma::Device, crate::dt::DtError> {
    let dt = &crate::kernel::boot_info().dt;
    let node = dt.find_compatible(COMPATIBLE).next().ok_or(crate::dt::DtError::NotFound { what: "PCI host bridge", name: crate::dt::Name::new(COMPATIBLE) })?;
    let coherent = crate::dma::is_coherent_in_dt(&node) && !crate::dma::bounce::force_noncoherent();
    let mut name = alloc::string::String::new();
    let _ = fmt::write(&mut name, format_args!("pci {:04x}:{}", pdev.domain, pdev.bdf));
    let dev = crate::dma::Device::with_bus(&name, crate::dma::busmap::BusMap::for_children_of(&node)?, coherent);
    let Some((smmu, sid)) = crate::iommu::smmuv3::smmu_for_pci(pdev) else { return Ok(dev) };
    if crate::dma::iommu::policy().passthrough {
        if let Err(e) = smmu.attach_bypass(sid) {
            crate::println!("iommu: {name}: bypass stream {sid:#x}: {e}");
        }
        return Ok(dev);
    }
    let mut domains = DOMAINS.lock();
    let domain = match domains.iter().find(|(s, _)| *s == sid) {
        // Attached again: whoever drove the stream meanwhile (the SMMU's own tests do), the
        // function's DMA goes through its domain from here on.
        Some(&(_, d)) => {
            if let Err(e) = smmu.attach(sid, d.domain()) {
                crate::println!("iommu: {name}: attaching stream {sid:#x}: {e}");
            }
            d
        }
        None => match crate::dma::iommu::attach(smmu, sid) {
            Ok(d) => {
                domains.push((sid, d));
                d
            }
            // The function keeps the SMMU's default stream (its DMA may fault): said so, and the
            // driver's first mapping shows it.
            Err(e) => {
                crate::println!("iommu: {name}: no domain: {e}");
                return Ok(dev);
            }
        },
    };
    Ok(dev.with_iommu(domain))
}

/// Every IOMMU domain the DMA layer gave a PCI function.
pub fn iommu_domains() -> Vec<&'static crate::dma::iommu::IommuDomain> {
    DOMAINS.lock().iter().map(|&(_, d)| d).collect()
}

/// The IOMMU domain the DMA layer gave StreamID `sid`, if any.
pub fn iommu_domain_of(sid: u32) -> Option<&'static crate::dma::iommu::IommuDomain> {
    DOMAINS.lock().iter().find(|(s, _)| *s == sid).map(|&(_, d)| d)
}

/// The IOMMU domain of each StreamID that has one.
static DOMAINS: spin::Mutex<Vec<(u32, &'static crate::dma::iommu::IommuDomain)>> = spin::Mutex::new(Vec::new());

/// Enumerates the first ECAM host bridge of the boot device tree, once; later calls return the
/// same result.
pub fn bus() -> Result<&'static PciBus, &'static EcamError> {
    BUS.call_once(|| {
        let dt = &crate::kernel::boot_info().dt;
        let node = dt.find_compatible(COMPATIBLE).next().ok_or(EcamError::NoBridge)?;
        let bridge = HostBridge::from_dt(dt, &node).map_err(EcamError::Pci)?;
        let mut cfg = Ecam::map_root_bus(&bridge.ecam)?;
        let devices = enumerate(&mut cfg, &bridge).map_err(EcamError::Pci)?;
        for d in &devices {
            crate::println!("{d}");
        }
        Ok(PciBus { bridge, devices })
    })
    .as_ref()
}
