//! KTAP suite `virtio_pci`: the first virtio-blk PCI function (QEMU `-device
//! virtio-blk-pci,disable-legacy=on[,iommu_platform=on]`) driven through the DMA API. The disk
//! image holds [`image_byte`] (tests/dma.rs writes it): the first MiB is read and checked, the
//! second is written with [`written_byte`] and read back (tests/dma.rs checks the file after the
//! run). Every case skips when there is no such function.
//!
//! After each case the driver is dropped and the function's DMA device torn down: with dma-debug
//! on, a mapping or coherent buffer left behind would be reported (and fail the case).

use alloc::vec;

use super::blk::{VirtioBlk, SECTOR_SIZE};
use super::test_image::{image_byte, written_byte};
use super::{VirtioError, VirtioPci, F_ACCESS_PLATFORM, F_VERSION_1};
use crate::dma::Device;
use crate::drivers::pci::{ecam, ConfigSpace, PciDevice, COMMAND_BUS_MASTER, REG_COMMAND};
use crate::ktest::{NotPassed, TestResult};
use crate::{kassert, kassert_eq, kskip, ktry};

const MIB: usize = 1 << 20;
const CHUNK: usize = 64 << 10;

fn first_blk() -> Result<&'static PciDevice, NotPassed> {
    let bus = match ecam::bus() {
        Ok(b) => b,
        Err(e) => kskip!("no PCI bus: {e}"),
    };
    match bus.devices.iter().find(|d| super::blk::is_virtio_blk(d.vendor, d.device)) {
        Some(d) => Ok(d),
        None => kskip!("no virtio-blk PCI function (attach one with -device virtio-blk-pci,drive=...,disable-legacy=on)"),
    }
}

fn probe() -> Result<VirtioBlk, NotPassed> {
    let blk = ktry!(VirtioBlk::probe(first_blk()?));
    kassert!(blk.capacity() >= (2 * MIB / SECTOR_SIZE) as u64, "disk of {} sectors, expected 2 MiB", blk.capacity());
    Ok(blk)
}

fn bounce_used() -> Option<u32> {
    crate::dma::bounce::platform_pool().map(|p| p.stats().used)
}

/// Drops the driver (resetting the device, freeing its queue) and checks that nothing of its
/// DMA is left: no bounce slot, and nothing dma-debug still tracks for its device.
fn release(blk: VirtioBlk, bounce_before: Option<u32>) -> TestResult {
    let dev: &'static Device = blk.dma_device();
    drop(blk);
    kassert_eq!(dev.teardown(), 0, "mappings or coherent buffers of {dev} left after the driver was dropped");
    kassert_eq!(bounce_used(), bounce_before, "bounce slots leaked");
    Ok(())
}

/// The features the device offered and took: VERSION_1 always, ACCESS_PLATFORM exactly when
/// offered (QEMU offers it with `iommu_platform=on`), and the DMA device chosen to match.
fn features_negotiated() -> TestResult {
    let before = bounce_used();
    let blk = probe()?;
    let f = blk.features();
    crate::println!(
        "# virtio_pci: {}: features offered {:#x}, accepted {:#x}; ACCESS_PLATFORM {}; DMA through {}; {} sectors",
        blk.transport().bdf(),
        f.offered,
        f.accepted,
        match (f.access_platform_offered(), f.access_platform()) {
            (true, true) => "offered and accepted",
            (true, false) => "offered, NOT accepted",
            (false, _) => "not offered",
        },
        blk.dma_device(),
        blk.capacity()
    );
    kassert!(f.accepted & F_VERSION_1 != 0, "VERSION_1 not negotiated");
    kassert_eq!(f.access_platform(), f.access_platform_offered(), "ACCESS_PLATFORM accepted iff offered");
    kassert_eq!(f.accepted & !f.offered, 0, "accepted features the device did not offer");
    let phys_device = blk.dma_device().name().ends_with("(physical)");
    kassert_eq!(phys_device, !f.access_platform(), "DMA device {} for ACCESS_PLATFORM={}", blk.dma_device(), f.access_platform());
    kassert_eq!(blk.transport().status() & 0x0f, 0x0f, "status after probe is not ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK");
    release(blk, before)
}

/// The first MiB: in 64 KiB requests, as one 1 MiB call (split into requests the size of the
/// largest bounce buffer), and single sectors at odd places.
fn read_known_image() -> TestResult {
    let before = bounce_used();
    let mut blk = probe()?;
    let mut buf = vec![0u8; CHUNK];
    for chunk in 0..MIB / CHUNK {
        ktry!(blk.read_sectors((chunk * CHUNK / SECTOR_SIZE) as u64, &mut buf));
        for (i, b) in buf.iter().enumerate() {
            let pos = (chunk * CHUNK + i) as u64;
            kassert_eq!(*b, image_byte(pos), "disk byte {pos:#x}");
        }
    }
    let mut whole = vec![0u8; MIB];
    ktry!(blk.read_sectors(0, &mut whole));
    for (i, b) in whole.iter().enumerate() {
        kassert_eq!(*b, image_byte(i as u64), "disk byte {i:#x} of the 1 MiB read");
    }
    let mut sector = [0u8; SECTOR_SIZE];
    for s in [0u64, 7, 1021, 2047] {
        ktry!(blk.read_sectors(s, &mut sector));
        for (i, b) in sector.iter().enumerate() {
            let pos = s * SECTOR_SIZE as u64 + i as u64;
            kassert_eq!(*b, image_byte(pos), "byte {i} of sector {s}");
        }
    }
    release(blk, before)
}

/// The second MiB written in 64 KiB requests, flushed, then read back byte-exact in one call.
fn write_then_read_second_mib() -> TestResult {
    let before = bounce_used();
    let mut blk = probe()?;
    kassert!(!blk.read_only(), "the disk is read-only");
    let first = (MIB / SECTOR_SIZE) as u64;
    let mut buf = vec![0u8; CHUNK];
    for chunk in 0..MIB / CHUNK {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = written_byte((chunk * CHUNK + i) as u64);
        }
        ktry!(blk.write_sectors(first + (chunk * CHUNK / SECTOR_SIZE) as u64, &buf));
    }
    ktry!(blk.flush());
    let mut whole = vec![0u8; MIB];
    ktry!(blk.read_sectors(first, &mut whole));
    for (i, b) in whole.iter().enumerate() {
        kassert_eq!(*b, written_byte(i as u64), "read-back byte {i:#x} of the second MiB");
    }
    release(blk, before)
}

/// Requests the driver must refuse before the device sees them, and a device that still works
/// afterwards.
fn bad_requests_refused() -> TestResult {
    let before = bounce_used();
    let mut blk = probe()?;
    let cap = blk.capacity();
    let mut two = [0u8; 2 * SECTOR_SIZE];
    let e = blk.read_sectors(cap - 1, &mut two);
    kassert!(matches!(e, Err(VirtioError::OutOfRange { count: 2, .. })), "read across the end: {e:?}");
    let e = blk.read_sectors(u64::MAX, &mut two);
    kassert!(matches!(e, Err(VirtioError::OutOfRange { .. })), "read at sector 2^64-1: {e:?}");
    let e = blk.read_sectors(0, &mut two[..100]);
    kassert!(matches!(e, Err(VirtioError::BadLength { len: 100 })), "partial sector: {e:?}");
    let e = blk.write_sectors(0, &[]);
    kassert!(matches!(e, Err(VirtioError::BadLength { len: 0 })), "empty write: {e:?}");
    ktry!(blk.read_sectors(cap - 2, &mut two));
    ktry!(blk.read_sectors(3, &mut two));
    for (i, b) in two.iter().enumerate() {
        kassert_eq!(*b, image_byte(3 * SECTOR_SIZE as u64 + i as u64), "byte {i} after the refusals");
    }
    release(blk, before)
}

/// With `iommu_platform=on` QEMU insists on ACCESS_PLATFORM: a driver declining it must get a
/// clear refusal (FEATURES_OK not read back), not a hang; and the next probe, accepting it,
/// works.
fn features_ok_refused_without_access_platform() -> TestResult {
    let pdev = first_blk()?;
    let before = bounce_used();
    let probe_features = {
        let blk = probe()?;
        let f = blk.features();
        release(blk, before)?;
        f
    };
    if !probe_features.access_platform_offered() {
        kskip!("the device does not offer ACCESS_PLATFORM (no iommu_platform=on)");
    }
    match VirtioPci::with_declined(pdev, super::blk::DRIVER_FEATURES, F_ACCESS_PLATFORM) {
        Err(e @ VirtioError::FeaturesRefused { accepted, .. }) => {
            kassert_eq!(accepted & F_ACCESS_PLATFORM, 0, "ACCESS_PLATFORM written although declined");
            crate::println!("# virtio_pci: without ACCESS_PLATFORM: {e}");
        }
        Err(e) => kassert!(false, "expected a FEATURES_OK refusal, got: {e}"),
        Ok(_) => kassert!(false, "the device accepted FEATURES_OK without ACCESS_PLATFORM"),
    }
    let mut blk = probe()?;
    let mut sector = [0u8; SECTOR_SIZE];
    ktry!(blk.read_sectors(0, &mut sector));
    kassert_eq!(sector[1], image_byte(1), "read after the refused probe");
    release(blk, before)
}

/// A device that stops answering: clearing Bus Master Enable makes QEMU disable the function
/// (it drops DRIVER_OK and ignores notifications). The request must fail after its time-out
/// rather than hang, with the device reset before the buffers are unmapped (dma-debug and the
/// bounce pool see nothing left behind), and the queue must refuse further requests. A new probe
/// turns bus mastering back on and works.
fn unresponsive_device_times_out() -> TestResult {
    let pdev = first_blk()?;
    let before = bounce_used();
    let mut blk = probe()?;
    blk.set_request_timeout_ms(200);
    let bus = ktry!(ecam::bus());
    let mut cfg = ktry!(ecam::Ecam::map_root_bus(&bus.bridge.ecam));
    let command = cfg.read32(pdev.bdf, REG_COMMAND) & 0xffff;
    cfg.write32(pdev.bdf, REG_COMMAND, command & !u32::from(COMMAND_BUS_MASTER));
    let mut buf = vec![0u8; CHUNK];
    let e = blk.read_sectors(0, &mut buf);
    match e {
        Err(e @ (VirtioError::Timeout { ms: 200 } | VirtioError::NeedsReset)) => {
            crate::println!("# virtio_pci: with bus mastering off: {e}");
        }
        other => kassert!(false, "read with bus mastering off: {other:?}"),
    }
    let e = blk.read_sectors(0, &mut buf);
    kassert!(matches!(e, Err(VirtioError::Broken)), "read after the reset: {e:?}");
    kassert_eq!(blk.transport().status(), 0, "device status after the reset");
    release(blk, before)?;
    let mut blk = probe()?;
    kassert!(cfg.read32(pdev.bdf, REG_COMMAND) & u32::from(COMMAND_BUS_MASTER) != 0, "bus mastering not turned back on");
    ktry!(blk.read_sectors(0, &mut buf));
    for (i, b) in buf.iter().enumerate() {
        kassert_eq!(*b, image_byte(i as u64), "disk byte {i:#x} after the recovery");
    }
    release(blk, before)
}

crate::ktest_suite!(
    "virtio_pci",
    [
        features_negotiated,
        read_known_image,
        write_then_read_second_mib,
        bad_requests_refused,
        features_ok_refused_without_access_platform,
        unresponsive_device_times_out
    ]
);
