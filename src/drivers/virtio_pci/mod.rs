//! A small modern (virtio 1.x) virtio-pci driver whose every DMA goes through the DMA API, so
//! that a PCI function behind an IOMMU works unchanged: virtqueues live in coherent memory from
//! [`Device::alloc_coherent`](crate::dma::Device::alloc_coherent) and request buffers are
//! streaming mappings, and the device is only ever given the device addresses the DMA API
//! returns (IOVAs under dma-iommu), never a physical address.
//!
//! Why our own driver: QEMU's virtio-pci devices with `iommu_platform=on` refuse FEATURES_OK
//! unless the driver accepts VIRTIO_F_ACCESS_PLATFORM, and the `virtio-drivers` crate (0.13.0)
//! never does. This driver accepts it whenever it is offered.
//!
//! The parts, after the virtio 1.2 specification (sections 2, 3.1 and 4.1):
//! - [`caps`]: the virtio structures (common configuration, notifications, ISR, device
//!   configuration) located through the function's vendor-specific PCI capabilities, validated
//!   against its BARs. Pure, host-tested.
//! - [`queue`]: the driver side of a split virtqueue (descriptor table, available and used
//!   rings) over memory it is given, with the barriers the specification asks for. Pure,
//!   host-tested against a model of the device side.
//! - [`negotiate`]: which offered features the driver accepts. VIRTIO_F_VERSION_1 is required
//!   (legacy devices are not supported); VIRTIO_F_ACCESS_PLATFORM is accepted when offered.
//! - `transport` (kernel only): [`VirtioPci`], the initialisation sequence (reset, ACKNOWLEDGE,
//!   DRIVER, features, FEATURES_OK read back, queues, DRIVER_OK), [`Virtqueue`] and [`Mapped`].
//! - [`blk`]: virtio-blk, reads, writes and flushes of 512-byte sectors.
//!
//! Completion is polled: dmakern wires no interrupts yet, so the driver asks the device not to
//! interrupt (VIRTQ_AVAIL_F_NO_INTERRUPT), polls the used ring with a time-out measured on the
//! generic timer (`crate::arch::counter`), and reads the ISR after each completion so that an
//! interrupt raised anyway does not leave the INTx line asserted. A time-out, a device asking
//! for a reset, or a used ring that does not match what was submitted resets the device before
//! the request's buffers are unmapped (the device must not write memory that is given back),
//! and the queue refuses further requests.
//!
//! The DMA device: with ACCESS_PLATFORM the device's DMA goes through the platform's address
//! translation (the IOMMU, if any), so the driver uses the PCI function's DMA device from
//! [`ecam::dma_device`](crate::drivers::pci::ecam::dma_device). Without it the device uses
//! physical addresses and bypasses any IOMMU (as QEMU does), so the driver uses a dma-direct
//! device with the same bus map and coherence instead (Linux's virtio does the same by not using
//! the DMA API then). Either is created once per function and kept for the kernel's lifetime,
//! like Linux's `struct device`.

pub mod blk;
pub mod caps;
pub mod queue;
pub mod test_image;
#[cfg(target_os = "none")]
mod transport;
#[cfg(target_os = "none")]
mod ktests;

#[cfg(target_os = "none")]
pub use transport::{Mapped, VirtioPci, Virtqueue};

use core::fmt;

use crate::dma::api::DmaError;
use crate::drivers::pci::{Bdf, PciError};
use crate::dt::DtError;
use queue::QueueError;

/// PCI vendor ID of every virtio function.
pub const VENDOR: u16 = 0x1af4;
/// Modern (virtio 1.x only) functions have device ID `0x1040 + virtio device type`.
pub const MODERN_DEVICE_BASE: u16 = 0x1040;

/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 64;
pub const STATUS_FAILED: u8 = 128;

/// The device complies with virtio 1.x (not legacy).
pub const F_VERSION_1: u64 = 1 << 32;
/// The device's DMA goes through the platform's address translation (an IOMMU): the driver must
/// give it addresses from the DMA API. Called VIRTIO_F_IOMMU_PLATFORM before virtio 1.1.
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;

/// The features the driver accepts out of those the device `offered`: `driver` (device-specific
/// features the driver implements), VIRTIO_F_VERSION_1 and VIRTIO_F_ACCESS_PLATFORM, each only if
/// offered. A device not offering VERSION_1 is legacy-only, which this driver does not support.
pub fn negotiate(offered: u64, driver: u64) -> Result<u64, VirtioError> {
    if offered & F_VERSION_1 == 0 {
        return Err(VirtioError::LegacyOnly { offered });
    }
    Ok(offered & (driver | F_VERSION_1 | F_ACCESS_PLATFORM))
}

/// The feature bits the device offered and those the driver accepted (and the device took).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    pub offered: u64,
    pub accepted: u64,
}

impl Features {
    /// Whether the device offered VIRTIO_F_ACCESS_PLATFORM.
    pub fn access_platform_offered(&self) -> bool {
        self.offered & F_ACCESS_PLATFORM != 0
    }

    /// Whether VIRTIO_F_ACCESS_PLATFORM was negotiated: the device then uses the addresses the
    /// DMA API gives, through the IOMMU if there is one.
    pub fn access_platform(&self) -> bool {
        self.accepted & F_ACCESS_PLATFORM != 0
    }
}

/// Why a virtio-pci function could not be driven or a request failed. Nothing is left mapped or
/// allocated by a failed call.
#[derive(Debug)]
pub enum VirtioError {
    /// The PCI bus could not be brought up.
    #[cfg(target_os = "none")]
    Bus(&'static crate::drivers::pci::ecam::EcamError),
    /// Mapping a BAR failed.
    #[cfg(target_os = "none")]
    Map(crate::mm::kmap::KmapError),
    /// The host bridge's DT node, needed for the function's DMA device.
    Dt(DtError),
    /// A DMA API call failed.
    Dma(DmaError),
    /// The function is not the kind of virtio device the driver was asked to drive.
    WrongDevice { bdf: Bdf, vendor: u16, device: u16 },
    /// The function's configuration space: a malformed capability list, or an unusable ECAM.
    Pci(PciError),
    /// No vendor capability describes the `structure` (common, notify or ISR) the driver needs.
    MissingCapability { bdf: Bdf, structure: &'static str },
    /// The first capability describing `structure`, at config offset `offset`, is unusable.
    BadCapability { bdf: Bdf, offset: u8, structure: &'static str, what: &'static str },
    /// The device does not offer VIRTIO_F_VERSION_1: a legacy-only device.
    LegacyOnly { offered: u64 },
    /// The device cleared FEATURES_OK after the driver wrote it: it refuses the `accepted` set
    /// (QEMU does so when it needs ACCESS_PLATFORM and the driver did not accept it).
    FeaturesRefused { offered: u64, accepted: u64, status: u8 },
    /// The device did not read back status 0 after a reset within the time-out.
    ResetTimeout { status: u8 },
    /// The device has no virtqueue `queue` (beyond `num_queues`, or size 0).
    NoQueue { queue: u16 },
    /// Virtqueue `queue` holds at most `size` descriptors, fewer than the `needed` ones.
    QueueTooSmall { queue: u16, size: u16, needed: u16 },
    /// Coherent memory for a ring whose device address is not 16-byte aligned.
    RingAlignment { dma: u64 },
    /// The notification address of `queue` lies outside the notify structure.
    NotifyOutside { queue: u16, notify_off: u16, multiplier: u32 },
    /// The device configuration structure is missing or shorter than `needed` bytes.
    ConfigTooShort { needed: u64, len: u64 },
    /// A device configuration field read at an offset that is not a multiple of 4.
    ConfigMisaligned { offset: u32 },
    /// The device configuration kept changing while it was read.
    ConfigUnstable,
    /// The device set DEVICE_NEEDS_RESET; it has been reset.
    NeedsReset,
    /// The device did not complete a request within `ms` milliseconds; it has been reset.
    Timeout { ms: u64 },
    /// The virtqueue refused a chain before submitting it (a driver bug, nothing was sent).
    Chain(QueueError),
    /// The used ring did not match what was submitted; the device has been reset.
    Queue(QueueError),
    /// The device was reset after an earlier error: the queue takes no more requests.
    Broken,
    /// A buffer longer than one descriptor can describe (4 GiB).
    TooLong { len: usize },
    /// virtio-blk: a transfer that is empty or not a whole number of sectors.
    BadLength { len: usize },
    /// virtio-blk: sectors `sector .. sector + count` are not all below `capacity`.
    OutOfRange { sector: u64, count: u64, capacity: u64 },
    /// virtio-blk: a write to a device that offered VIRTIO_BLK_F_RO.
    ReadOnly,
    /// virtio-blk: the device reported VIRTIO_BLK_S_IOERR for the request at `sector`.
    IoError { sector: u64 },
    /// virtio-blk: the device reported VIRTIO_BLK_S_UNSUPP for the request at `sector`.
    Unsupported { sector: u64 },
    /// virtio-blk: a status byte the specification does not define (0xff: not written at all).
    BadStatus { sector: u64, status: u8 },
}

impl From<DmaError> for VirtioError {
    fn from(e: DmaError) -> Self {
        VirtioError::Dma(e)
    }
}

impl fmt::Display for VirtioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use VirtioError::*;
        match self {
            #[cfg(target_os = "none")]
            Bus(e) => write!(f, "PCI: {e}"),
            #[cfg(target_os = "none")]
            Map(e) => write!(f, "mapping a BAR: {e}"),
            Dt(e) => write!(f, "host bridge node: {e}"),
            Dma(e) => write!(f, "DMA: {e}"),
            WrongDevice { bdf, vendor, device } => {
                write!(f, "pci {bdf} ({vendor:04x}:{device:04x}) is not the virtio device asked for")
            }
            Pci(e) => write!(f, "{e}"),
            MissingCapability { bdf, structure } => {
                write!(f, "pci {bdf}: no virtio {structure} capability (a legacy-only device?)")
            }
            BadCapability { bdf, offset, structure, what } => {
                write!(f, "pci {bdf}: virtio {structure} capability at {offset:#04x}: {what}")
            }
            LegacyOnly { offered } => {
                write!(f, "the device does not offer VIRTIO_F_VERSION_1 (features {offered:#x}): legacy devices are not supported")
            }
            FeaturesRefused { offered, accepted, status } => write!(
                f,
                "the device refused features {accepted:#x} (offered {offered:#x}): FEATURES_OK not set on read-back, status {status:#04x}"
            ),
            ResetTimeout { status } => write!(f, "the device did not complete a reset (status {status:#04x})"),
            NoQueue { queue } => write!(f, "the device has no virtqueue {queue}"),
            QueueTooSmall { queue, size, needed } => {
                write!(f, "virtqueue {queue} has {size} descriptors, {needed} needed")
            }
            RingAlignment { dma } => write!(f, "virtqueue memory at device address {dma:#x} is not 16-byte aligned"),
            NotifyOutside { queue, notify_off, multiplier } => write!(
                f,
                "virtqueue {queue}: notification offset {notify_off} x {multiplier} lies outside the notify structure"
            ),
            ConfigTooShort { needed, len } => {
                write!(f, "device configuration of {len} bytes, {needed} needed")
            }
            ConfigMisaligned { offset } => write!(f, "device configuration offset {offset:#x} is not 4-byte aligned"),
            ConfigUnstable => f.write_str("the device configuration kept changing while being read"),
            NeedsReset => f.write_str("the device set DEVICE_NEEDS_RESET (it was reset)"),
            Timeout { ms } => write!(f, "no completion within {ms} ms (the device was reset)"),
            Chain(e) => write!(f, "virtqueue refused the chain: {e}"),
            Queue(e) => write!(f, "used ring: {e} (the device was reset)"),
            Broken => f.write_str("the device was reset after an earlier error and takes no more requests"),
            TooLong { len } => write!(f, "buffer of {len} bytes is too long for one descriptor"),
            BadLength { len } => write!(f, "transfer of {len} bytes is not a non-zero multiple of 512"),
            OutOfRange { sector, count, capacity } => {
                write!(f, "sectors {sector}+{count} are beyond the disk's {capacity} sectors")
            }
            ReadOnly => f.write_str("the disk is read-only"),
            IoError { sector } => write!(f, "I/O error at sector {sector}"),
            Unsupported { sector } => write!(f, "request at sector {sector} not supported by the device"),
            BadStatus { sector, status } => write!(f, "undefined status {status:#04x} for the request at sector {sector}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_accepts_version_1_and_access_platform_when_offered() {
        const F_BLK_RO: u64 = 1 << 5;
        const F_BLK_FLUSH: u64 = 1 << 9;
        const EVENT_IDX: u64 = 1 << 29;
        // QEMU's virtio-blk-pci with iommu_platform=on offers (among others) these.
        let offered = F_VERSION_1 | F_ACCESS_PLATFORM | EVENT_IDX | F_BLK_FLUSH;
        assert_eq!(negotiate(offered, F_BLK_FLUSH | F_BLK_RO).unwrap(), F_VERSION_1 | F_ACCESS_PLATFORM | F_BLK_FLUSH);
        // Without iommu_platform: no ACCESS_PLATFORM to accept.
        assert_eq!(negotiate(F_VERSION_1 | EVENT_IDX, F_BLK_FLUSH).unwrap(), F_VERSION_1);
        // A transitional device in legacy mode offers no VERSION_1.
        let e = negotiate(EVENT_IDX | F_BLK_FLUSH, F_BLK_FLUSH).unwrap_err();
        assert!(matches!(e, VirtioError::LegacyOnly { offered } if offered == EVENT_IDX | F_BLK_FLUSH));
        assert_eq!(
            e.to_string(),
            "the device does not offer VIRTIO_F_VERSION_1 (features 0x20000200): legacy devices are not supported"
        );
    }

    #[test]
    fn features_report_access_platform() {
        let f = Features { offered: F_VERSION_1 | F_ACCESS_PLATFORM, accepted: F_VERSION_1 };
        assert!(f.access_platform_offered() && !f.access_platform());
        let f = Features { offered: F_VERSION_1 | F_ACCESS_PLATFORM, accepted: F_VERSION_1 | F_ACCESS_PLATFORM };
        assert!(f.access_platform());
    }

    #[test]
    fn refusal_reads_well() {
        let e = VirtioError::FeaturesRefused { offered: 0x3_0000_0000, accepted: 0x1_0000_0000, status: 3 };
        assert_eq!(
            e.to_string(),
            "the device refused features 0x100000000 (offered 0x300000000): FEATURES_OK not set on read-back, status 0x03"
        );
    }
}
