//! Device drivers, each found through the device tree by `compatible`. Drivers whose logic is pure
//! (PCI enumeration over a `ConfigSpace`) build and test on the host too; the rest touch hardware
//! and exist only in the kernel build.

pub mod bcm2835_dma;
#[cfg(target_os = "none")]
pub mod bcm2835_aux_uart;
pub mod bcm2835_mbox;
#[cfg(target_os = "none")]
pub mod bcm2835_pm;
#[cfg(target_os = "none")]
pub mod edu;
pub mod pci;
#[cfg(target_os = "none")]
pub mod pl011;
#[cfg(target_os = "none")]
pub mod psci;
#[cfg(target_os = "none")]
pub mod virtio;
pub mod virtio_pci;
