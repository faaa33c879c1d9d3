//! Coherent allocation + free (Linux's `dma_alloc_coherent` + `dma_free_coherent`), one buffer at a
//! time, for 1, 16 and 256 pages and per back end:
//!
//! - `direct`: a cache-coherent device: pages from `dma_alloc_contiguous()` (a single page from
//!   the page allocator, larger buffers from CMA), zeroed, in the linear map;
//! - `remap`: a non-coherent device under the boot's dma-remap strategy (`dma.remap=`; the note
//!   says which): the same pages cleaned and invalidated, then mapped uncached (window) or
//!   changed in place, and undone with TLB invalidation at the free;
//! - `atomic`: a non-coherent device that cannot block: the pre-mapped atomic pool (its 256 KiB
//!   default holds 64 pages, so the 256-page case is refused and reported);
//! - `iommu`: a coherent device behind the SMMU (`-M virt,iommu=smmuv3`), in a strict domain of
//!   its own: pages from the page allocator, zeroed, an IOVA and the IO page-table entries; the
//!   free unmaps and invalidates the IOTLB before the IOVA is reused. Without an SMMU it says so
//!   and reports nothing.
//!
//! Each entry prints `pair_mean` and `pair_stddev` (allocation + free) and `alloc_mean`,
//! `free_mean`, in ns with the PMU counter's reads subtracted; under `--icount` a nanosecond is
//! an instruction. Targets (aarch64 virt, 1 page): `direct` at most 600, `remap` (window) at most
//! 2,500, `atomic` at most 300; 16 pages `direct` at most 3,000.
//!
//! `pages_alloc_free_1` measures the page allocator alone in the same way: the single page a
//! 32-bit device's one-page buffer takes (`mm::phys::alloc_pages_exact(1, Some(4 GiB))`, its page
//! cache's path) and its free.

use alloc::vec::Vec;

use super::cycles::Cycles;
use super::dma::{ns, stats, read_overhead};
use super::Recorder;
use crate::dma::api::DmaAttrs;
use crate::dma::busmap::BusMap;
use crate::dma::remap::strategy;
use crate::dma::{Device, GfpFlags};
use crate::mm::addr::PAGE_SIZE;

#[derive(Clone, Copy)]
enum Kind {
    Direct,
    Remap,
    Atomic,
    Iommu,
}

fn run(rec: &Recorder, kind: Kind, pages: u64) {
    let size = pages * PAGE_SIZE;
    let (dev, gfp) = match kind {
        Kind::Direct => (Device::with_bus("bench-coherent", BusMap::IDENTITY, true), GfpFlags::KERNEL),
        Kind::Remap => (Device::with_bus("bench-remap", BusMap::IDENTITY, false), GfpFlags::KERNEL),
        Kind::Atomic => (Device::with_bus("bench-atomic", BusMap::IDENTITY, false), GfpFlags::ATOMIC),
        Kind::Iommu => match super::dma::iommu_device(true) {
            Some(d) => (d, GfpFlags::KERNEL),
            None => return rec.note(format_args!("no SMMU (-M virt,iommu=smmuv3)")),
        },
    };
    let c = Cycles::start();
    let ovh = read_overhead(&c);
    let n = (4096 / pages).clamp(32, 1024) as usize;
    let (mut alloc, mut free, mut pair) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let (r, ta) = c.timed(|| dev.alloc_coherent(size, gfp, DmaAttrs::NONE));
        let buf = match r {
            Ok(b) => b,
            Err(e) => return rec.note(format_args!("allocation of {pages} page(s) refused: {e}")),
        };
        let (r, tf) = c.timed(|| buf.free());
        if let Err(e) = r {
            return rec.note(format_args!("free of {pages} page(s) refused: {e}"));
        }
        alloc.push(ta);
        free.push(tf);
        pair.push(ta + tf);
    }
    report(rec, &c, ovh, &alloc, &free, &pair);
    rec.note(format_args!(
        "{n} allocation+free pairs of {pages} page(s){}; {} counter, its reads ({} counts) subtracted",
        match kind {
            Kind::Remap => alloc::format!(", dma.remap={}", strategy()),
            Kind::Iommu => alloc::string::String::from(", through a strict SMMU domain"),
            _ => alloc::string::String::new(),
        },
        if c.is_pmu() { "PMU cycle" } else { "generic timer" },
        ovh / 1000,
    ));
}

/// See the module documentation.
pub fn pages_alloc_free_1(rec: &Recorder) {
    use crate::mm::addr::PhysAddr;
    use crate::mm::phys::{alloc_pages_exact, free_pages_exact};
    let limit = Some(PhysAddr(crate::dma::DEFAULT_MASK + 1));
    let c = Cycles::start();
    let ovh = read_overhead(&c);
    let n = 1024;
    let (mut alloc, mut free, mut pair) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let (r, ta) = c.timed(|| alloc_pages_exact(1, limit));
        let page = match r {
            Ok(p) => p,
            Err(e) => return rec.note(format_args!("allocation refused: {e}")),
        };
        let (r, tf) = c.timed(|| free_pages_exact(page, 1));
        if let Err(e) = r {
            return rec.note(format_args!("free refused: {e}"));
        }
        alloc.push(ta);
        free.push(tf);
        pair.push(ta + tf);
    }
    report(rec, &c, ovh, &alloc, &free, &pair);
    rec.note(format_args!(
        "{n} allocation+free pairs of 1 page below 4 GiB; {} counter, its reads ({} counts) subtracted",
        if c.is_pmu() { "PMU cycle" } else { "generic timer" },
        ovh / 1000,
    ));
}

/// Prints the four results of the `alloc`, `free` and `pair` samples (in counts) net of `ovh`.
fn report(rec: &Recorder, c: &Cycles, ovh: u64, alloc: &[u64], free: &[u64], pair: &[u64]) {
    let (a, f, p) = (stats(alloc), stats(free), stats(pair));
    rec.result("pair_mean", ns(c, p.mean_milli, 2 * ovh), "ns");
    rec.result("pair_stddev", ns(c, p.stddev * 1000, 0), "ns");
    rec.result("alloc_mean", ns(c, a.mean_milli, ovh), "ns");
    rec.result("free_mean", ns(c, f.mean_milli, ovh), "ns");
}

macro_rules! entry {
    ($name:ident, $kind:ident, $pages:expr) => {
        pub fn $name(rec: &Recorder) {
            run(rec, Kind::$kind, $pages)
        }
    };
}

entry!(direct_1, Direct, 1);
entry!(direct_16, Direct, 16);
entry!(direct_256, Direct, 256);
entry!(remap_1, Remap, 1);
entry!(remap_16, Remap, 16);
entry!(remap_256, Remap, 256);
entry!(atomic_1, Atomic, 1);
entry!(atomic_16, Atomic, 16);
entry!(atomic_256, Atomic, 256);
entry!(iommu_1, Iommu, 1);
entry!(iommu_16, Iommu, 16);
entry!(iommu_256, Iommu, 256);
