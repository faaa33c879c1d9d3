//! KTAP suite `dma_remap`: coherent buffers of non-coherent devices under the strategy the boot
//! chose (`dma.remap=window|inplace`), checked in the live page tables (the attributes promised,
//! the linear alias, the mapping gone after the free), the atomic pool (placement, attributes,
//! exhaustion, counters), `NO_KERNEL_MAPPING`, in-place remapping's refusal to fall back, and the
//! vmap window itself (scattered pages, the guard page).

use alloc::vec::Vec;

use super::api::{DmaAttrs, DmaError};
use super::busmap::BusMap;
use super::pool::{self, PoolError};
use super::remap::{strategy, Strategy};
use super::{Device, GfpFlags};
use crate::arch;
use crate::ktest::TestResult;
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::mm::kmap::translate;
use crate::mm::pgtable::MemAttr;
use crate::mm::vmap;
use crate::{kassert, kassert_eq, kskip, ktry};

fn noncoherent(name: &str) -> Device {
    Device::with_bus(name, BusMap::IDENTITY, false)
}

/// The CPU mapping of a buffer at `cpu` backed by `phys`: every page translates to the right
/// page with `attr`, read-write, never executable.
fn check_mapping(cpu: usize, phys: PhysAddr, bytes: u64, attr: MemAttr) -> TestResult {
    let mut off = 0;
    while off < bytes {
        let va = cpu as u64 + off;
        let t = ktry!(translate(va).ok_or("CPU pointer not mapped"));
        kassert_eq!(t.pa.0, phys.0 + off, "page {va:#x}");
        kassert_eq!(t.attr, attr, "attributes of {va:#x}");
        kassert!(t.perms.read && t.perms.write && !t.perms.exec, "permissions of {va:#x}: {:?}", t.perms);
        off += PAGE_SIZE;
    }
    Ok(())
}

/// Allocations of 1, 3 and 64 pages, plain and write-combined: the CPU pointer is where the
/// strategy puts it, with the attributes it promises; the data written through it is the data in
/// memory (read back through the linear map, which under the window strategy stays cacheable);
/// after the free the alias is gone (window) or the linear map is cacheable again (in place).
fn coherent_mappings_have_the_promised_attributes() -> TestResult {
    let dev = noncoherent("ktest-remap");
    for (pages, attrs, attr) in [
        (1u64, DmaAttrs::NONE, MemAttr::NormalNonCacheable),
        (3, DmaAttrs::WRITE_COMBINE, MemAttr::WriteCombine),
        (64, DmaAttrs::NONE, MemAttr::NormalNonCacheable),
    ] {
        let bytes = pages * PAGE_SIZE;
        let mut a = ktry!(dev.alloc_coherent(bytes, GfpFlags::KERNEL, attrs));
        let cpu = ktry!(a.cpu_ptr().ok_or("no CPU pointer")).as_ptr() as usize;
        let phys = a.phys();
        match strategy() {
            Strategy::Window => {
                kassert!(vmap::contains(cpu as u64), "{cpu:#x} is not in the vmap window");
                kassert_eq!(ktry!(translate(phys.0).ok_or("linear alias unmapped")).attr, MemAttr::Normal, "linear alias");
            }
            Strategy::InPlace => {
                kassert_eq!(cpu as u64, phys.0, "in-place buffers keep their linear address");
                kassert_eq!(ktry!(translate(phys.0).ok_or("unmapped")).level, 3, "CMA is page-mapped");
            }
        }
        check_mapping(cpu, phys, bytes, attr)?;
        let s = ktry!(a.as_mut_slice().ok_or("no slice"));
        kassert!(s.iter().all(|&b| b == 0), "not zeroed");
        for (i, b) in s.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(7) ^ pages as u8;
        }
        // SAFETY: the buffer's own pages, read through the linear map, which stays mapped under
        // both strategies; QEMU has no caches, so the two views must agree byte for byte.
        let linear = unsafe { core::slice::from_raw_parts(phys.0 as usize as *const u8, bytes as usize) };
        kassert!(linear.iter().enumerate().all(|(i, &b)| b == (i as u8).wrapping_mul(7) ^ pages as u8), "memory differs from what the CPU wrote");
        ktry!(a.free());
        match strategy() {
            Strategy::Window => {
                kassert!(translate(cpu as u64).is_none(), "window alias {cpu:#x} still mapped after the free");
                match arch::probe::read_u64(cpu) {
                    Err(f) => kassert!(f.is_translation(), "{f:?}"),
                    Ok(v) => kassert!(false, "read through the freed alias returned {v:#x}"),
                }
            }
            Strategy::InPlace => check_mapping(phys.0 as usize, phys, bytes, MemAttr::Normal)?,
        }
    }
    Ok(())
}

/// `NO_KERNEL_MAPPING`: no CPU pointer and no window space; the pages still go back on free.
fn no_kernel_mapping_maps_nothing() -> TestResult {
    let dev = noncoherent("ktest-nokmap");
    let before = vmap::stats().map(|s| s.areas);
    let a = ktry!(dev.alloc_coherent(8 * PAGE_SIZE, GfpFlags::KERNEL, DmaAttrs::NO_KERNEL_MAPPING));
    kassert!(a.cpu_ptr().is_none());
    kassert_eq!(vmap::stats().map(|s| s.areas), before, "a window area was used");
    let phys = a.phys();
    kassert_eq!(ktry!(translate(phys.0).ok_or("unmapped")).attr, MemAttr::Normal, "linear map changed");
    ktry!(a.free());
    Ok(())
}

/// A caller that cannot block gets the atomic pool: uncached, inside the pool, zeroed; the pool
/// runs out with a clean error and its counters come back.
fn atomic_pool_serves_and_runs_out() -> TestResult {
    let dev = noncoherent("ktest-atomic");
    let Some((pool_phys, pool_cpu)) = pool::placement() else {
        // coherent_pool=0, or a size that could not be had (reported at boot): a caller that
        // cannot block gets a clean error, never memory from elsewhere.
        kassert_eq!(dev.alloc_coherent(PAGE_SIZE, GfpFlags::ATOMIC, DmaAttrs::NONE).err(), Some(DmaError::Pool(PoolError::NoPool)));
        return Ok(());
    };
    let start = ktry!(pool::stats().ok_or("no atomic pool"));
    let mut bufs = Vec::new();
    let err = loop {
        match dev.alloc_coherent(PAGE_SIZE, GfpFlags::ATOMIC, DmaAttrs::NONE) {
            Ok(mut b) => {
                let cpu = ktry!(b.cpu_ptr().ok_or("no CPU pointer")).as_ptr() as usize;
                let off = b.phys().0 - pool_phys.0;
                kassert_eq!(cpu, pool_cpu + off as usize, "CPU pointer inside the pool's mapping");
                check_mapping(cpu, b.phys(), PAGE_SIZE, MemAttr::NormalNonCacheable)?;
                let s = ktry!(b.as_mut_slice().ok_or("no slice"));
                kassert!(s.iter().all(|&x| x == 0), "pool page not zeroed");
                s.fill(0xee);
                bufs.push(b);
                kassert!(bufs.len() as u64 <= start.pages, "more buffers than the pool has pages");
            }
            Err(e) => break e,
        }
    };
    kassert_eq!(err, DmaError::Pool(PoolError::Exhausted { pages: 1 }));
    kassert_eq!(bufs.len() as u64, start.pages - start.used_pages, "every free page was handed out");
    let full = ktry!(pool::stats().ok_or("no pool"));
    kassert_eq!(full.used_pages, full.pages);
    kassert_eq!(full.failures, start.failures + 1);
    for b in bufs {
        ktry!(b.free());
    }
    kassert_eq!(ktry!(pool::stats().ok_or("no pool")).used_pages, start.used_pages);
    // Larger than the pool: refused, never served from elsewhere.
    let too_big = (start.pages + 1) * PAGE_SIZE;
    kassert_eq!(dev.alloc_coherent(too_big, GfpFlags::ATOMIC, DmaAttrs::NONE).err(), Some(DmaError::Pool(PoolError::BadSize { pages: start.pages + 1 })));
    Ok(())
}

/// In place, only CMA pages will do: a buffer larger than the CMA area fails, where the window
/// strategy (whose `dma_alloc_contiguous` falls back to the page allocator) serves it.
fn in_place_never_falls_back() -> TestResult {
    let area = ktry!(crate::mm::cma::setup::default_area().ok_or("no default CMA area"));
    let dev = noncoherent("ktest-fallback");
    let bytes = area.size() + PAGE_SIZE;
    let r = dev.alloc_coherent(bytes, GfpFlags::KERNEL | GfpFlags::NOWARN, DmaAttrs::NONE);
    let verdict = match (strategy(), r) {
        (Strategy::InPlace, Err(DmaError::NoMemory(_))) => Ok(()),
        (Strategy::InPlace, Ok(a)) => {
            kassert!(false, "in place served {bytes:#x} bytes at {} from outside CMA", a.phys());
            Ok(())
        }
        (Strategy::InPlace, Err(e)) => {
            kassert!(false, "wrong error: {e}");
            Ok(())
        }
        (Strategy::Window, r) => match r {
            Ok(a) => {
                kassert!(!area.contains(a.phys(), bytes / PAGE_SIZE), "cannot be in the area");
                ktry!(a.free());
                Ok(())
            }
            Err(e) => kskip!("the page allocator had no {bytes:#x} contiguous bytes either: {e}"),
        },
    };
    verdict
}

/// The window maps scattered pages in list order and puts an unmapped guard page after each
/// area; the unmap removes every page.
fn vmap_scattered_pages_and_guard() -> TestResult {
    let mut pages = Vec::new();
    for _ in 0..3 {
        pages.push(ktry!(crate::mm::phys::alloc_pages(0)));
    }
    pages.reverse();
    let area = ktry!(vmap::vmap_pages(&pages, MemAttr::NormalNonCacheable));
    let va = area.addr();
    for (i, &p) in pages.iter().enumerate() {
        check_mapping(va + i * PAGE_SIZE as usize, p, PAGE_SIZE, MemAttr::NormalNonCacheable)?;
        // SAFETY: page `i` of the area, mapped read-write above.
        unsafe { core::ptr::write_volatile((va + i * PAGE_SIZE as usize) as *mut u64, 0x1000 + i as u64) };
        // SAFETY: the same page through the linear map.
        let back = unsafe { core::ptr::read_volatile(p.0 as usize as *const u64) };
        kassert_eq!(back, 0x1000 + i as u64, "page {i} through the linear map");
    }
    let guard = va + 3 * PAGE_SIZE as usize;
    match arch::probe::read_u64(guard) {
        Err(f) => kassert!(f.is_translation(), "{f:?}"),
        Ok(v) => kassert!(false, "guard page {guard:#x} readable: {v:#x}"),
    }
    ktry!(vmap::vunmap(area));
    for i in 0..3 {
        kassert!(translate((va + i * PAGE_SIZE as usize) as u64).is_none(), "page {i} still mapped");
    }
    for p in pages {
        ktry!(crate::mm::phys::free_pages(p, 0));
    }
    Ok(())
}

crate::ktest_suite!("dma_remap", [
    coherent_mappings_have_the_promised_attributes,
    no_kernel_mapping_maps_nothing,
    atomic_pool_serves_and_runs_out,
    in_place_never_falls_back,
    vmap_scattered_pages_and_guard,
]);
