//! virtio over MMIO (QEMU virt's `virtio,mmio` slots, modern interface) through the
//! `virtio-drivers` crate, whose [`Hal`] is implemented here on the DMA API: `dma_alloc` is a
//! coherent allocation, `share` / `unshare` a streaming map / unmap in the buffer's direction.
//!
//! The crate's `Hal` has no device argument, so one DMA [`Device`] serves every virtio-mmio slot:
//! the one of the first `virtio,mmio` node with a `memory-region` (a restricted DMA pool, which
//! then holds all the DMA memory of every slot: the virtqueues, coherent allocations, and the
//! bounce buffers of the shared buffers), else of the first `virtio,mmio` node (QEMU gives all
//! slots the same bus and coherence). Its functions cannot return errors
//! either: a failed allocation or mapping panics with the DMA layer's message (the crate would
//! otherwise hand the device a bogus address), and the kernel's panic handler reports it and
//! ends the run as a failure rather than let the device hang on it.

use alloc::collections::BTreeMap;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use spin::{Mutex, Once};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal};

use crate::dma::api::{DmaAttrs, DmaCoherent};
use crate::dma::busmap::DmaAddr;
use crate::dma::maint::Direction;
use crate::dma::{Device, GfpFlags};
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::mm::kmap;

pub const COMPATIBLE: &str = "virtio,mmio";

static DMA_DEVICE: Once<Option<Device>> = Once::new();
/// Streaming mappings handed out by [`VirtioHal::share`] inside and outside the device's own
/// bounce pool, for the restricted-pool test.
static SHARED_IN_OWN_POOL: AtomicU64 = AtomicU64::new(0);
static SHARED_OUTSIDE_OWN_POOL: AtomicU64 = AtomicU64::new(0);
/// Live coherent allocations of the crate, by device address.
static COHERENT: Mutex<BTreeMap<u64, DmaCoherent<'static>>> = Mutex::new(BTreeMap::new());

/// The DMA device of the virtio-mmio slots; `None` if the DT has none (or a malformed one).
pub fn dma_device() -> Option<&'static Device> {
    DMA_DEVICE
        .call_once(|| {
            let info = crate::kernel::boot_info();
            let node = info
                .dt
                .find_compatible(COMPATIBLE)
                .find(|n| n.has_property("memory-region"))
                .or_else(|| info.dt.find_compatible(COMPATIBLE).next())?;
            match Device::from_dt(&info.dt, &node) {
                Ok(d) => Some(d),
                Err(e) => {
                    crate::println!("virtio: {}: {e}", node.path());
                    None
                }
            }
        })
        .as_ref()
}

fn direction(d: BufferDirection) -> Direction {
    match d {
        BufferDirection::DriverToDevice => Direction::ToDevice,
        BufferDirection::DeviceToDriver => Direction::FromDevice,
        BufferDirection::Both => Direction::Bidirectional,
    }
}

fn device() -> &'static Device {
    // `find` hands out no transport without a DMA device, so the HAL never runs without one.
    dma_device().expect("virtio: DMA through virtio-mmio without a DMA device")
}

/// The `virtio-drivers` HAL on the DMA API.
pub struct VirtioHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned, exclusively owned coherent memory and its
// device address; `share` returns the device address of a live streaming mapping of exactly the
// buffer; MMIO is mapped as device memory at its physical address.
unsafe impl Hal for VirtioHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (u64, NonNull<u8>) {
        let dev = device();
        let buf = dev
            .alloc_coherent(pages as u64 * PAGE_SIZE, GfpFlags::KERNEL, DmaAttrs::NONE)
            .unwrap_or_else(|e| panic!("virtio: coherent allocation of {pages} pages: {e}"));
        let (dma, ptr) = (buf.dma_addr().as_u64(), buf.cpu_ptr().expect("coherent buffers have a CPU mapping"));
        COHERENT.lock().insert(dma, buf);
        (dma, ptr)
    }

    unsafe fn dma_dealloc(paddr: u64, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        match COHERENT.lock().remove(&paddr).map(DmaCoherent::free) {
            Some(Ok(())) => 0,
            _ => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: u64, size: usize) -> NonNull<u8> {
        let va = kmap::ioremap(paddr, size as u64).unwrap_or_else(|e| panic!("virtio: mapping MMIO {paddr:#x}: {e:?}"));
        NonNull::new(va as *mut u8).expect("MMIO at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, dir: BufferDirection) -> u64 {
        let phys = PhysAddr(buffer.as_ptr() as *mut u8 as u64);
        let dev = device();
        let len = buffer.len() as u64;
        let dma = dev
            .map_phys(phys, len, direction(dir), DmaAttrs::NONE)
            .unwrap_or_else(|e| panic!("virtio: mapping {len} bytes at {phys}: {e}"));
        if let Some(pool) = dev.own_bounce_pool() {
            let inside = dev.bus_map().bus_to_phys(dma, len).is_some_and(|p| {
                p.0.checked_sub(pool.base().0).is_some_and(|off| off.checked_add(len).is_some_and(|end| end <= pool.size()))
            });
            let counter = if inside { &SHARED_IN_OWN_POOL } else { &SHARED_OUTSIDE_OWN_POOL };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        dma.as_u64()
    }

    unsafe fn unshare(paddr: u64, buffer: NonNull<[u8]>, dir: BufferDirection) {
        if let Err(e) = device().unmap_phys(DmaAddr(paddr), buffer.len() as u64, direction(dir), DmaAttrs::NONE) {
            panic!("virtio: unmapping {paddr:#x}: {e}");
        }
    }
}

/// The transports of the populated virtio-mmio slots offering `kind`, in DT order.
/// None if the slots have no usable DMA device (a malformed `dma-ranges` or `memory-region`,
/// reported when it was read): their devices then stay unused.
pub fn find(kind: DeviceType) -> alloc::vec::Vec<MmioTransport<'static>> {
    let dt = &crate::kernel::boot_info().dt;
    let mut found = alloc::vec::Vec::new();
    if dma_device().is_none() {
        return found;
    }
    for node in dt.find_compatible(COMPATIBLE) {
        let reg = match dt.reg0(&node) {
            Ok(r) => r,
            Err(e) => {
                crate::println!("virtio: {}: {e}; slot skipped", node.path());
                continue;
            }
        };
        let Ok(va) = kmap::ioremap(reg.base().as_u64(), reg.size()) else { continue };
        let Some(header) = NonNull::new(va as *mut VirtIOHeader) else { continue };
        // SAFETY: the slot's register block from the DT, mapped as device memory for good; each
        // slot is probed by one caller at a time (the tests run one after another).
        let Ok(t) = (unsafe { MmioTransport::new(header, reg.size() as usize) }) else { continue };
        if t.device_type() == kind {
            found.push(t);
        }
    }
    found
}

mod ktests {
    use super::*;
    use crate::ktest::TestResult;
    use crate::{kassert, kassert_eq, kskip, ktry};
    use alloc::vec;
    use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
    use virtio_drivers::device::rng::VirtIORng;
    use crate::drivers::virtio_pci::test_image::{image_byte, written_byte};

    const MIB: usize = 1 << 20;
    /// One request: well below the bounce pool's largest mapping (256 KiB).
    const CHUNK: usize = 64 << 10;

    fn blk() -> Result<VirtIOBlk<VirtioHal, MmioTransport<'static>>, crate::ktest::NotPassed> {
        let Some(t) = find(DeviceType::Block).into_iter().next() else {
            if dma_device().is_none() && crate::kernel::boot_info().dt.find_compatible(COMPATIBLE).next().is_some() {
                kskip!("the virtio-mmio slots have no usable DMA device (see the boot log)");
            }
            kskip!("no virtio-blk device (attach one with -device virtio-blk-device)");
        };
        Ok(ktry!(VirtIOBlk::<VirtioHal, _>::new(t)))
    }

    fn read_known_image() -> TestResult {
        let mut blk = blk()?;
        kassert!(blk.capacity() * SECTOR_SIZE as u64 >= 2 * MIB as u64, "disk of {} sectors, expected 2 MiB", blk.capacity());
        let before = crate::dma::bounce::platform_pool().map(|p| p.stats().used);
        let mut buf = vec![0u8; CHUNK];
        for chunk in 0..MIB / CHUNK {
            ktry!(blk.read_blocks(chunk * CHUNK / SECTOR_SIZE, &mut buf));
            for (i, b) in buf.iter().enumerate() {
                let pos = (chunk * CHUNK + i) as u64;
                kassert_eq!(*b, image_byte(pos), "disk byte {pos:#x}");
            }
        }
        kassert_eq!(crate::dma::bounce::platform_pool().map(|p| p.stats().used), before, "bounce slots leaked");
        Ok(())
    }

    fn write_then_read_1mib() -> TestResult {
        let mut blk = blk()?;
        let mut buf = vec![0u8; CHUNK];
        let first = MIB / SECTOR_SIZE;
        for chunk in 0..MIB / CHUNK {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = written_byte((chunk * CHUNK + i) as u64);
            }
            ktry!(blk.write_blocks(first + chunk * CHUNK / SECTOR_SIZE, &buf));
        }
        for chunk in 0..MIB / CHUNK {
            buf.fill(0);
            ktry!(blk.read_blocks(first + chunk * CHUNK / SECTOR_SIZE, &mut buf));
            for (i, b) in buf.iter().enumerate() {
                let pos = (chunk * CHUNK + i) as u64;
                kassert_eq!(*b, written_byte(pos), "read-back byte {pos:#x} of the second MiB");
            }
        }
        ktry!(blk.flush());
        Ok(())
    }

    fn rng_gives_entropy() -> TestResult {
        let Some(t) = find(DeviceType::EntropySource).into_iter().next() else {
            kskip!("no virtio-rng device (attach one with -device virtio-rng-device)");
        };
        let mut rng = ktry!(VirtIORng::<VirtioHal, _>::new(t));
        let mut buf = [0u8; 256];
        let n = ktry!(rng.request_entropy(&mut buf));
        kassert!(n > 0, "no bytes");
        // 256 random bytes are all zero with probability 2^-2048.
        kassert!(buf[..n].iter().any(|&b| b != 0), "{n} zero bytes from the entropy source");
        Ok(())
    }

    /// With a `restricted-dma-pool` on the virtio device (tests/dts/virt-restricted.dts), all
    /// the device's DMA memory lies inside that pool: every buffer the Hal shared for a read,
    /// and the virtqueues (the Hal's coherent allocations). The read is still right, no bounce
    /// slot outlives its request, and dropping the device gives the virtqueues' slots back.
    fn restricted_pool_used() -> TestResult {
        let Some(pool) = dma_device().and_then(Device::own_bounce_pool) else {
            kskip!("the virtio DMA device has no restricted pool");
        };
        kassert!(pool.serves_alloc(), "the virtio device's pool is not a restricted pool");
        let before = pool.stats();
        let mut blk = blk()?;
        let queues = pool.stats();
        kassert!(queues.allocated > before.allocated, "the virtqueues took no slots of the restricted pool");
        let coherent: alloc::vec::Vec<(PhysAddr, u64)> = COHERENT.lock().values().map(|c| (c.phys(), c.size())).collect();
        kassert!(!coherent.is_empty(), "no live coherent allocation with a virtio-blk device up");
        for (phys, size) in &coherent {
            let end = phys.0.checked_add(*size);
            let inside = pool.contains(*phys) && end.is_some_and(|e| e <= pool.base().0 + pool.size());
            kassert!(inside, "virtqueue memory {phys} + {size:#x} outside the restricted pool at {}", pool.base());
        }
        SHARED_IN_OWN_POOL.store(0, Ordering::Relaxed);
        SHARED_OUTSIDE_OWN_POOL.store(0, Ordering::Relaxed);
        let mut buf = vec![0u8; CHUNK];
        ktry!(blk.read_blocks(0, &mut buf));
        for (i, b) in buf.iter().enumerate() {
            kassert_eq!(*b, image_byte(i as u64), "disk byte {i:#x} through the restricted pool");
        }
        let (inside, outside) = (SHARED_IN_OWN_POOL.load(Ordering::Relaxed), SHARED_OUTSIDE_OWN_POOL.load(Ordering::Relaxed));
        kassert!(inside > 0, "no buffer was shared");
        kassert_eq!(outside, 0, "buffers shared outside the restricted pool at {}", pool.base());
        let after = pool.stats();
        kassert_eq!(after.used - after.allocated, 0, "restricted pool bounce slots leaked");
        kassert_eq!(after.allocated, queues.allocated, "coherent slots changed by a read");
        drop(blk);
        kassert_eq!(pool.stats().used, before.used, "the virtqueues' slots were not given back");
        crate::println!(
            "# virtio: {inside} buffers shared and {} coherent allocations ({} slots) in the restricted pool at {} ({:#x} bytes)",
            coherent.len(),
            queues.allocated - before.allocated,
            pool.base(),
            pool.size()
        );
        Ok(())
    }

    crate::ktest_suite!("virtio", [read_known_image, write_then_read_1mib, rng_gives_entropy, restricted_pool_used]);
}
