//! KTAP suites of the DMA API on the running kernel: coherent allocations, streaming mappings
//! checked byte for byte through QEMU's `edu` DMA engine (a real bus master), scatter-gather
//! lists, swiotlb (forced, and by reach), mask errors, bounce-pool exhaustion and the coherent
//! allocations of a device with a restricted DMA pool. The virtio-blk and virtio-rng checks (and
//! the restricted pool of the DT) are in `drivers::virtio`.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use spin::Once;

use super::api::{Bidirectional, DmaAttrs, DmaError, FromDevice, SgEntry, ToDevice};
use super::bounce::{platform_pool, BouncePool};
use super::busmap::{BusMap, DmaAddr, Window};
use super::maint::Direction;
use super::swiotlb::{SwiotlbError, IO_TLB_SIZE, MAX_MAPPING_SIZE};
use super::{Device, GfpFlags, DEFAULT_MASK};
use crate::drivers::edu::{configured_mask, Edu, EduDir, EduError, BUF_LEN};
use crate::ktest::{NotPassed, TestResult};
use crate::mm::addr::PhysAddr;
use crate::{kassert, kassert_eq, kskip, ktry};

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed ^ (i >> 8) as u8)).collect()
}

fn pool_used() -> u32 {
    platform_pool().map_or(0, |p| p.stats().used)
}

// --- coherent -------------------------------------------------------------------------------

fn coherent_alloc_sizes() -> TestResult {
    let dev = Device::with_bus("ktest-coherent", BusMap::IDENTITY, true);
    for size in [1u64, 100, 4096, 4097, 65536, 1 << 20, 3 << 20] {
        let mut a = ktry!(dev.alloc_coherent(size, GfpFlags::KERNEL, DmaAttrs::NONE));
        kassert_eq!(a.dma_addr().as_u64(), a.phys().0, "identity bus map");
        kassert!(a.dma_addr().as_u64() + size - 1 <= DEFAULT_MASK, "buffer {} beyond the 32-bit coherent mask", a.dma_addr());
        kassert_eq!(a.size(), size);
        let s = ktry!(a.as_mut_slice().ok_or("no CPU mapping"));
        kassert!(s.iter().all(|&b| b == 0), "coherent buffer of {size} bytes not zeroed");
        s.fill(0xa5);
        ktry!(a.free());
    }
    // The same size again: whatever pages come back, they must be zeroed again.
    let mut a = ktry!(dev.alloc_coherent(65536, GfpFlags::KERNEL, DmaAttrs::NONE));
    kassert!(ktry!(a.as_mut_slice().ok_or("no CPU mapping")).iter().all(|&b| b == 0));
    Ok(())
}

fn coherent_attrs() -> TestResult {
    let dev = Device::with_bus("ktest-attrs", BusMap::IDENTITY, true);
    let a = ktry!(dev.alloc_coherent(8192, GfpFlags::KERNEL, DmaAttrs::NO_KERNEL_MAPPING));
    kassert!(a.cpu_ptr().is_none(), "NO_KERNEL_MAPPING still gave a CPU pointer");
    let all = DmaAttrs::WRITE_COMBINE | DmaAttrs::FORCE_CONTIGUOUS | DmaAttrs::ALLOC_SINGLE_PAGES | DmaAttrs::SKIP_CPU_SYNC;
    let b = ktry!(dev.alloc_coherent(8192, GfpFlags::KERNEL, all));
    kassert!(b.cpu_ptr().is_some());
    kassert!(a.phys() != b.phys());
    kassert_eq!(dev.alloc_coherent(0, GfpFlags::KERNEL, DmaAttrs::NONE).err(), Some(DmaError::ZeroSize));
    Ok(())
}

fn coherent_mask_respected() -> TestResult {
    // A coherent mask ending inside RAM: the buffer must lie below it.
    let lowest = crate::kernel::boot_info().memmap.lock().ram()[0].base().0;
    let mut dev = Device::with_bus("ktest-cmask", BusMap::IDENTITY, true);
    let mask = lowest + (512 << 20) - 1;
    ktry!(dev.set_coherent_mask(mask));
    let a = ktry!(dev.alloc_coherent(1 << 20, GfpFlags::KERNEL, DmaAttrs::NONE));
    kassert!(a.dma_addr().as_u64() + (1 << 20) - 1 <= mask, "{} beyond coherent mask {mask:#x}", a.dma_addr());
    Ok(())
}

// --- masks ----------------------------------------------------------------------------------

fn mask_errors() -> TestResult {
    let lowest = crate::kernel::boot_info().memmap.lock().ram()[0].base().0;
    if lowest < 1 << 28 {
        kskip!("RAM starts at {lowest:#x}: a 28-bit mask reaches it");
    }
    let mut dev = Device::with_bus("ktest-mask", BusMap::IDENTITY, true);
    let e = dev.set_mask((1 << 28) - 1);
    kassert!(matches!(e, Err(DmaError::MaskUnsupported { .. })), "28-bit mask accepted: {e:?}");
    kassert_eq!(dev.mask(), DEFAULT_MASK, "a refused mask changed the device");
    kassert!(dev.set_coherent_mask((1 << 28) - 1).is_err());
    ktry!(dev.set_mask(u64::MAX));
    kassert_eq!(dev.mask(), u64::MAX);
    ktry!(dev.set_mask_and_coherent(DEFAULT_MASK));
    Ok(())
}

// --- swiotlb --------------------------------------------------------------------------------

/// A device that reaches only the platform bounce pool: every other buffer must bounce.
fn pool_only_device() -> Result<Device, NotPassed> {
    let Some(pool) = platform_pool() else { kskip!("no swiotlb pool") };
    let w = ktry!(Window::new(pool.base(), DmaAddr(pool.base().0), pool.size()).ok_or("pool window"));
    Ok(Device::with_bus("ktest-bounce", ktry!(BusMap::from_windows(&[w])), !crate::dma::bounce::force_noncoherent()))
}

fn bounce_by_reach() -> TestResult {
    let dev = pool_only_device()?;
    let before = pool_used();
    // To device: the slot holds the data after map.
    let mut src = pattern(3, 3000);
    let expect = src.clone();
    let s = ktry!(dev.map_single::<ToDevice>(&mut src));
    let slot = ktry!(dev.bus_map().bus_to_phys(s.dma_addr(), 3000).ok_or("slot"));
    kassert!(slot.0 != expect.as_ptr() as u64 && platform_pool().is_some_and(|p| p.contains(slot)), "not bounced");
    // SAFETY: the slot is 3000 bytes of the reserved pool, identity-mapped, live until the unmap.
    let seen = unsafe { core::slice::from_raw_parts(slot.0 as usize as *const u8, 3000) };
    kassert!(seen == &expect[..], "bounce slot does not hold the buffer");
    kassert!(pool_used() > before);
    ktry!(s.unmap());
    kassert_eq!(pool_used(), before);
    // From device: a "device" write into the slot reaches the buffer at sync / unmap only.
    let mut dst = vec![0u8; 5000];
    let mut s = ktry!(dev.map_single::<FromDevice>(&mut dst));
    let slot = ktry!(dev.bus_map().bus_to_phys(s.dma_addr(), 5000).ok_or("slot"));
    let data = pattern(9, 5000);
    // SAFETY: as above; this plays the device writing its buffer.
    unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), slot.0 as usize as *mut u8, 5000) };
    // Under the ownership guard the buffer's whole pages are not the CPU's before the sync.
    if !super::debug::guarding() {
        kassert!(s.cpu_buffer().iter().all(|&b| b == 0), "device data visible before sync");
    }
    ktry!(s.sync_for_cpu(1000, 100));
    kassert!(s.cpu_buffer()[1000..1100] == data[1000..1100] && s.cpu_buffer()[..1000].iter().all(|&b| b == 0), "partial sync");
    ktry!(s.unmap());
    kassert!(dst == data, "unmap did not copy the device's data back");
    kassert_eq!(pool_used(), before);
    Ok(())
}

fn bounce_exhaustion() -> TestResult {
    let dev = pool_only_device()?;
    let Some(pool) = platform_pool() else { kskip!("no swiotlb pool") };
    let before = pool.stats();
    // The source buffer comes from ordinary memory (the pool-only device reaches none).
    let plain = Device::with_bus("ktest-src", BusMap::IDENTITY, true);
    let src = ktry!(plain.alloc_coherent(MAX_MAPPING_SIZE, GfpFlags::KERNEL, DmaAttrs::NONE));
    let mut live = Vec::new();
    let err = loop {
        match dev.map_phys(src.phys(), MAX_MAPPING_SIZE, Direction::ToDevice, DmaAttrs::NONE) {
            Ok(d) => live.push(d),
            Err(e) => break e,
        }
        kassert!(live.len() <= (pool.size() / MAX_MAPPING_SIZE) as usize, "more mappings than the pool holds");
    };
    kassert!(matches!(err, DmaError::Bounce(SwiotlbError::Full { .. })), "expected a full pool, got {err}");
    kassert_eq!(pool.stats().failed, before.failed + 1);
    // Oversized: refused, not split.
    let e = dev.map_phys(src.phys(), MAX_MAPPING_SIZE + 1, Direction::ToDevice, DmaAttrs::NONE);
    kassert!(matches!(e, Err(DmaError::Bounce(SwiotlbError::TooLarge { .. }))), "{e:?}");
    for d in live.drain(..) {
        ktry!(dev.unmap_phys(d, MAX_MAPPING_SIZE, Direction::ToDevice, DmaAttrs::NONE));
    }
    kassert_eq!(pool.stats().used, before.used);
    // A second unmap of the same address is refused.
    let d = ktry!(dev.map_phys(src.phys(), 4096, Direction::ToDevice, DmaAttrs::NONE));
    ktry!(dev.unmap_phys(d, 4096, Direction::ToDevice, DmaAttrs::NONE));
    kassert!(dev.unmap_phys(d, 4096, Direction::ToDevice, DmaAttrs::NONE).is_err(), "double unmap accepted");
    if super::debug::enabled() {
        let kinds: Vec<_> = super::debug::take_reports().iter().map(|r| r.kind).collect();
        kassert_eq!(kinds, vec![super::debug_track::ReportKind::DoubleUnmap], "dma-debug's report");
    }
    Ok(())
}

fn forced_bounce() -> TestResult {
    let Some(pool) = platform_pool().filter(|p| p.is_forced()) else { kskip!("swiotlb not forced") };
    let dev = Device::with_bus("ktest-forced", BusMap::IDENTITY, true);
    let mut buf = pattern(5, 4096);
    let before = pool.stats().used;
    let s = ktry!(dev.map_single::<Bidirectional>(&mut buf));
    kassert!(pool.contains(PhysAddr(s.dma_addr().as_u64())), "swiotlb=force did not bounce");
    kassert!(pool.stats().used > before);
    ktry!(s.unmap());
    kassert_eq!(pool.stats().used, before);
    Ok(())
}

// --- restricted pools -----------------------------------------------------------------------

/// Size of the test's own restricted pool: two segments.
const RMEM_SIZE: u64 = 2 * MAX_MAPPING_SIZE;

/// A restricted pool of [`RMEM_SIZE`] bytes on memory taken from the page allocator once and
/// kept, with the pool, for the rest of the run (devices hold `&'static` pools). `ATOMIC` keeps
/// the request out of CMA, whose areas `dma_contiguous` checks for leaks.
fn test_restricted_pool() -> Result<&'static BouncePool, NotPassed> {
    static POOL: Once<Result<&'static BouncePool, DmaError>> = Once::new();
    let pool = POOL.call_once(|| {
        let plain = Device::with_bus("ktest-rmem", BusMap::IDENTITY, true);
        let mem = plain.alloc_coherent(RMEM_SIZE, GfpFlags::ATOMIC, DmaAttrs::NONE)?;
        let pool = BouncePool::restricted(mem.phys(), (RMEM_SIZE / IO_TLB_SIZE) as u32).map_err(DmaError::Bounce)?;
        // The pages now belong to the pool, which is never dropped.
        core::mem::forget(mem);
        Ok(&*Box::leak(Box::new(pool)))
    });
    Ok(*ktry!(pool.as_ref()))
}

/// Whether all of `phys .. phys + size` lies in `pool`.
fn inside(pool: &BouncePool, phys: PhysAddr, size: u64) -> bool {
    pool.contains(phys) && phys.0.checked_add(size - 1).is_some_and(|last| pool.contains(PhysAddr(last)))
}

/// A device with a restricted pool takes its coherent memory from the pool, zeroed, aligned to
/// its size rounded up to a power-of-two number of pages, at the bus address its map gives, and
/// gives it back on free and drop; its streaming mappings bounce there too.
fn restricted_pool_coherent() -> TestResult {
    let pool = test_restricted_pool()?;
    kassert!(pool.serves_alloc() && pool.is_forced());
    let coherent = !crate::dma::bounce::force_noncoherent();
    let dev = Device::with_bus("ktest-restricted", BusMap::IDENTITY, coherent).with_bounce_pool(pool);
    let base = pool.stats();
    kassert_eq!((base.used, base.allocated), (0, 0), "the test pool is not empty");
    for size in [1u64, 100, 4096, 5000, 65536, MAX_MAPPING_SIZE] {
        let mut a = ktry!(dev.alloc_coherent(size, GfpFlags::KERNEL, DmaAttrs::NONE));
        let phys = a.phys();
        kassert!(inside(pool, phys, size), "{size}-byte buffer at {phys} outside the pool at {}", pool.base());
        kassert_eq!(a.dma_addr().as_u64(), phys.0, "identity bus map");
        let align = size.next_multiple_of(4096).next_power_of_two();
        kassert_eq!(phys.0 % align, 0, "{size}-byte buffer at {phys} not aligned to {align:#x}");
        kassert_eq!(pool.stats().allocated as u64, size.next_multiple_of(4096) / IO_TLB_SIZE);
        let s = ktry!(a.as_mut_slice().ok_or("no CPU mapping"));
        kassert!(s.iter().all(|&b| b == 0), "pool buffer of {size} bytes not zeroed");
        s.fill(0x5a);
        if size % 2 == 0 {
            ktry!(a.free());
        } else {
            drop(a);
        }
        kassert_eq!(pool.stats().used, 0, "a freed {size}-byte buffer kept its slots");
    }
    // The same place again: dirty from the last round, zeroed anew.
    let mut a = ktry!(dev.alloc_coherent(MAX_MAPPING_SIZE, GfpFlags::ATOMIC, DmaAttrs::NONE));
    kassert!(ktry!(a.as_mut_slice().ok_or("no CPU mapping")).iter().all(|&b| b == 0));
    // A streaming mapping of the same device lands in the pool beside it.
    let mut buf = pattern(4, 3000);
    let s = ktry!(dev.map_single::<ToDevice>(&mut buf));
    kassert!(inside(pool, PhysAddr(s.dma_addr().as_u64()), 3000), "stream at {} not in the pool", s.dma_addr());
    kassert!(pool.stats().used > pool.stats().allocated);
    ktry!(s.unmap());
    ktry!(a.free());
    // Through a bus offset: the device address is the pool's bus address.
    const BUS: u64 = 0x2000_0000;
    let w = ktry!(Window::new(pool.base(), DmaAddr(BUS), pool.size()).ok_or("pool window"));
    let off = Device::with_bus("ktest-restricted-offset", ktry!(BusMap::from_windows(&[w])), coherent).with_bounce_pool(pool);
    let b = ktry!(off.alloc_coherent(8192, GfpFlags::KERNEL, DmaAttrs::NONE));
    kassert!(inside(pool, b.phys(), 8192));
    kassert_eq!(b.dma_addr().as_u64(), BUS + (b.phys().0 - pool.base().0), "bus address of {}", b.phys());
    ktry!(b.free());
    kassert_eq!(pool.stats().used, base.used);
    Ok(())
}

/// Coherent allocations exhaust a restricted pool cleanly: an error, no fallback to other
/// memory, nothing half-done; everything freed returns the pool to its baseline.
fn restricted_pool_exhaustion() -> TestResult {
    let pool = test_restricted_pool()?;
    let dev = Device::with_bus("ktest-restricted-full", BusMap::IDENTITY, true).with_bounce_pool(pool);
    let base = pool.stats();
    const SIZE: u64 = 64 << 10;
    let mut live = Vec::new();
    let err = loop {
        match dev.alloc_coherent(SIZE, GfpFlags::KERNEL | GfpFlags::NOWARN, DmaAttrs::NONE) {
            Ok(a) => live.push(a),
            Err(e) => break e,
        }
        kassert!(live.len() as u64 <= pool.size() / SIZE, "more buffers than the pool holds");
    };
    kassert_eq!(live.len() as u64, pool.size() / SIZE, "the pool was not filled");
    kassert!(matches!(err, DmaError::Bounce(SwiotlbError::Full { .. })), "expected a full pool, got {err}");
    crate::println!("# restricted pool full: {err}");
    kassert!(live.iter().all(|a| inside(pool, a.phys(), SIZE)), "a buffer outside the pool");
    let mut starts: Vec<u64> = live.iter().map(|a| a.phys().0).collect();
    crate::sort::sort_small(&mut starts);
    starts.dedup();
    kassert_eq!(starts.len(), live.len(), "two buffers at one address");
    kassert_eq!(pool.stats().used, pool.stats().total);
    kassert_eq!(pool.stats().allocated, pool.stats().total);
    // Whatever the request, nothing comes from elsewhere while the pool is full.
    let e = dev.alloc_coherent(1, GfpFlags::ATOMIC, DmaAttrs::NONE).err();
    kassert!(matches!(e, Some(DmaError::Bounce(SwiotlbError::Full { .. }))), "{e:?}");
    // Too large for one run of slots: refused even in an empty pool.
    let e = dev.alloc_coherent(MAX_MAPPING_SIZE + 1, GfpFlags::KERNEL, DmaAttrs::NONE).err();
    kassert!(matches!(e, Some(DmaError::Bounce(SwiotlbError::TooLarge { .. }))), "{e:?}");
    // Streaming mappings find no room either.
    let mut buf = pattern(6, 512);
    kassert!(dev.map_single::<ToDevice>(&mut buf).is_err(), "a mapping in a full pool");
    kassert_eq!(pool.stats().failed, base.failed + 3);
    let half = live.split_off(live.len() / 2);
    for a in half {
        ktry!(a.free());
    }
    drop(live);
    let after = pool.stats();
    kassert_eq!((after.used, after.allocated), (base.used, base.allocated), "slots kept after freeing everything");
    // The whole pool is free again: one largest buffer per segment.
    let big: Vec<_> = ktry!((0..pool.size() / MAX_MAPPING_SIZE)
        .map(|_| dev.alloc_coherent(MAX_MAPPING_SIZE, GfpFlags::KERNEL, DmaAttrs::NONE))
        .collect::<Result<Vec<_>, _>>());
    drop(big);
    kassert_eq!(pool.stats().used, base.used);
    Ok(())
}

// --- edu: data through a real bus master ----------------------------------------------------

fn edu() -> Result<Edu, NotPassed> {
    match Edu::probe() {
        Ok(e) => Ok(e),
        Err(EduError::NotFound) => kskip!("no edu device (-device edu)"),
        Err(EduError::Pci(crate::drivers::pci::ecam::EcamError::NoBridge)) => kskip!("no PCI host bridge in the device tree"),
        // armv7 virt with highmem puts the ECAM above 4 GiB, beyond the identity map's 32-bit
        // reach until the kernel can map MMIO away from its physical address.
        Err(EduError::Pci(e @ crate::drivers::pci::ecam::EcamError::Map(_))) => kskip!("PCI configuration space unreachable: {e}"),
        // A host bridge node the kernel refuses leaves PCI out of the boot (a degraded boot):
        // nothing to test here; the message says why.
        Err(EduError::Pci(e @ crate::drivers::pci::ecam::EcamError::Pci(_))) => kskip!("{e}"),
        Err(e @ EduError::Dt(_)) => kskip!("{e}"),
        Err(e) => Err(crate::ktest::fail(file!(), line!(), format_args!("edu: {e}"))),
    }
}

/// The edu device with the mask given by `edu.dma_mask`; skipped when that mask is refused (the
/// case `edu_default_mask_refused` checks that path).
fn edu_usable() -> Result<Edu, NotPassed> {
    let mut e = edu()?;
    let mask = configured_mask();
    if e.dev.set_mask_and_coherent(mask).is_err() {
        kskip!("edu's DMA mask {mask:#x} reaches no memory");
    }
    Ok(e)
}

fn edu_round_trip_streaming() -> TestResult {
    let e = edu_usable()?;
    for (len, off, seed) in [(1usize, 0u64, 1u8), (100, 17, 2), (4095, 0, 3), (1234, 2000, 4)] {
        let mut out = pattern(seed, len);
        let sent = out.clone();
        let s = ktry!(e.dev.map_single::<ToDevice>(&mut out));
        ktry!(e.transfer(EduDir::RamToEdu, s.dma_addr(), off, len as u64));
        ktry!(s.unmap());
        let mut back = vec![0u8; len];
        let mut s = ktry!(e.dev.map_single::<FromDevice>(&mut back));
        ktry!(e.transfer(EduDir::EduToRam, s.dma_addr(), off, len as u64));
        ktry!(s.sync_for_cpu(0, len));
        kassert!(s.cpu_buffer() == &sent[..], "edu round trip of {len} bytes at {off:#x} differs");
        ktry!(s.unmap());
        kassert!(back == sent);
    }
    Ok(())
}

fn edu_round_trip_bidirectional_and_coherent() -> TestResult {
    let e = edu_usable()?;
    let mut c = ktry!(e.dev.alloc_coherent(4096, GfpFlags::KERNEL, DmaAttrs::NONE));
    let data = pattern(7, 4000);
    ktry!(c.as_mut_slice().ok_or("no CPU mapping"))[..4000].copy_from_slice(&data);
    ktry!(e.transfer(EduDir::RamToEdu, c.dma_addr(), 0, 4000));
    // Back into a bidirectional stream whose buffer starts dirty: the device overwrites it.
    let mut buf = vec![0xeeu8; 4000];
    let mut s = ktry!(e.dev.map_single::<Bidirectional>(&mut buf));
    ktry!(e.transfer(EduDir::EduToRam, s.dma_addr(), 0, 4000));
    ktry!(s.sync_for_cpu(0, 4000));
    kassert!(s.cpu_buffer() == &data[..], "coherent -> edu -> bidirectional stream differs");
    // The CPU changes it, gives it back to the device, which copies it into the coherent buffer.
    s.cpu_buffer().iter_mut().for_each(|b| *b = !*b);
    ktry!(s.sync_for_device(0, 4000));
    ktry!(e.transfer(EduDir::RamToEdu, s.dma_addr(), 0, 4000));
    ktry!(e.transfer(EduDir::EduToRam, c.dma_addr(), 0, 4000));
    ktry!(s.unmap());
    let got = &ktry!(c.as_mut_slice().ok_or("no CPU mapping"))[..4000];
    kassert!(got.iter().zip(&data).all(|(g, d)| *g == !*d), "stream -> edu -> coherent differs");
    Ok(())
}

fn edu_scatter_gather() -> TestResult {
    let e = edu_usable()?;
    // 16 segments of different sizes from one buffer, gathered into the device buffer.
    let lens: Vec<u64> = (0..16).map(|i| 37 + i * 11).collect();
    let total: u64 = lens.iter().sum();
    kassert!(total <= BUF_LEN);
    let src = pattern(11, 8192);
    let base = src.as_ptr() as u64;
    let mut sg: Vec<SgEntry> = Vec::new();
    let (mut at, mut expect) = (0u64, Vec::new());
    for l in &lens {
        sg.push(SgEntry::new(PhysAddr(base + at), *l));
        expect.extend_from_slice(&src[at as usize..(at + l) as usize]);
        at += l + 123;
    }
    kassert_eq!(ktry!(e.dev.map_sg(&mut sg, Direction::ToDevice, DmaAttrs::NONE)), 16);
    let mut off = 0;
    for seg in &sg {
        ktry!(e.transfer(EduDir::RamToEdu, ktry!(seg.dma.ok_or("unmapped segment")), off, seg.len));
        off += seg.len;
    }
    ktry!(e.dev.unmap_sg(&mut sg, Direction::ToDevice, DmaAttrs::NONE));
    kassert!(sg.iter().all(|s| s.dma.is_none()));
    let mut back = vec![0u8; total as usize];
    let s = ktry!(e.dev.map_single::<FromDevice>(&mut back));
    ktry!(e.transfer(EduDir::EduToRam, s.dma_addr(), 0, total));
    ktry!(s.unmap());
    kassert!(back == expect, "gathered data differs");
    Ok(())
}

fn edu_default_mask_refused() -> TestResult {
    let mut e = edu()?;
    let mask = configured_mask();
    match e.dev.set_mask(mask) {
        Ok(()) => kskip!("edu's DMA mask {mask:#x} is usable here"),
        Err(err) => {
            kassert!(matches!(err, DmaError::MaskUnsupported { .. }), "{err}");
            crate::println!("# edu: set_mask({mask:#x}) refused: {err}");
        }
    }
    // A device limited to that mask regardless: a map fails cleanly, nothing is started.
    let limited = Device::new("edu-limited", mask + 1);
    let mut buf = pattern(1, 64);
    let at = buf.as_ptr() as usize;
    match limited.map_single::<ToDevice>(&mut buf) {
        Ok(_) => kassert!(false, "a buffer at {at:#x} mapped under mask {mask:#x}"),
        Err(err) => crate::println!("# edu: map under mask {mask:#x} refused: {err}"),
    }
    Ok(())
}

/// The cost of a dma-direct map + unmap of 4 KiB (Linux's dma_map_benchmark), printed; the
/// mappings must be the buffer's own address (or a bounce slot under `swiotlb=force`) and leave
/// no slot behind. Under `--icount` the figure is in instructions.
fn map_unmap_4k_cost() -> TestResult {
    let plain = Device::with_bus("ktest-bench", BusMap::IDENTITY, !crate::dma::bounce::force_noncoherent());
    let buf = ktry!(plain.alloc_coherent(4096, GfpFlags::KERNEL, DmaAttrs::NONE));
    let before = pool_used();
    const N: u64 = 4096;
    let (t0, freq) = (crate::arch::counter::read(), crate::arch::counter::frequency().max(1));
    for _ in 0..N {
        let d = ktry!(plain.map_phys(buf.phys(), 4096, Direction::Bidirectional, DmaAttrs::NONE));
        ktry!(plain.unmap_phys(d, 4096, Direction::Bidirectional, DmaAttrs::NONE));
    }
    let ticks = crate::arch::counter::read().wrapping_sub(t0);
    let d = ktry!(plain.map_phys(buf.phys(), 4096, Direction::Bidirectional, DmaAttrs::NONE));
    let forced = platform_pool().is_some_and(|p| p.is_forced());
    kassert!(forced || d.as_u64() == buf.phys().0, "an unforced map of reachable memory bounced");
    ktry!(plain.unmap_phys(d, 4096, Direction::Bidirectional, DmaAttrs::NONE));
    kassert_eq!(pool_used(), before);
    let ns = ticks as u128 * 1_000_000_000 / freq as u128 / N as u128;
    crate::println!(
        "# dma map+unmap 4 KiB, {} device{}: {ns} ns per pair (instructions under --icount)",
        if plain.is_coherent() { "coherent" } else { "non-coherent" },
        if forced { ", swiotlb=force" } else { "" }
    );
    Ok(())
}

crate::ktest_suite!(
    "dma_api",
    [
        map_unmap_4k_cost,
        coherent_alloc_sizes,
        coherent_attrs,
        coherent_mask_respected,
        mask_errors,
        bounce_by_reach,
        bounce_exhaustion,
        forced_bounce,
        restricted_pool_coherent,
        restricted_pool_exhaustion,
        edu_round_trip_streaming,
        edu_round_trip_bidirectional_and_coherent,
        edu_scatter_gather,
        edu_default_mask_refused,
    ]
);
