//! Coherent allocation + free (Linux's `dma_alloc_coherent` + `dma_free_coherent`), one buffer at a
//! time, for 1, 16 and 256 pages and per back end:
//!
//! - `direct`: a cache-coherent device: pages from `dma_alloc_contiguous()` (a single page from
//!   the page allocator, larger buffers from CMA), zeroed, in the linear map;
//! - `remap`: a non-coherent device under the boot's dma-remap strategy (`dma.remap=`; the note
//!   says which): the same pages cleaned and invalidated, then mapped uncached (window) or
//!   changed in place, and undone with TLB invalidation at the free;
//! - `atomic`: a non-coherent device that cannot block: the pre-mapped atomic pool (its 256 KiB
//!   default holds 64 pages, so the 256-page case is refused and reported).
//!
//! Each entry prints `pair_mean` and `pair_stddev` (allocation + free) and `alloc_mean`,
//! `free_mean`, in ns with the PMU counter's reads subtracted; under `--icount` a nanosecond is
//! an instruction. Targets (aarch64 virt, 1 page): `direct` at most 600, `remap` (window) at most
//! 2,500, `atomic` at most 300; 16 pages `direct` at most 3,000.

use alloc::vec::Vec;

use super::cycles::Cycles;
use super::dma::{ns, stats};
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
}

fn run(rec: &Recorder, kind: Kind, pages: u64) {
    let size = pages * PAGE_SIZE;
    let (dev, gfp) = match kind {
        Kind::Direct => (Device::with_bus("bench-coherent", BusMap::IDENTITY, true), GfpFlags::KERNEL),
        Kind::Remap => (Device::with_bus("bench-remap", BusMap::IDENTITY, false), GfpFlags::KERNEL),
        Kind::Atomic => (Device::with_bus("bench-atomic", BusMap::IDENTITY, false), GfpFlags::ATOMIC),
    };
    let c = Cycles::start();
    let mut ovh = Vec::with_capacity(1024);
    for _ in 0..1024 {
        ovh.push(c.timed(|| ()).1);
    }
    let ovh = stats(&ovh).mean_milli;
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
    let (a, f, p) = (stats(&alloc), stats(&free), stats(&pair));
    rec.result("pair_mean", ns(&c, p.mean_milli, 2 * ovh), "ns");
    rec.result("pair_stddev", ns(&c, p.stddev * 1000, 0), "ns");
    rec.result("alloc_mean", ns(&c, a.mean_milli, ovh), "ns");
    rec.result("free_mean", ns(&c, f.mean_milli, ovh), "ns");
    rec.note(format_args!(
        "{n} allocation+free pairs of {pages} page(s){}; {} counter, its reads ({} counts) subtracted",
        match kind {
            Kind::Remap => alloc::format!(", dma.remap={}", strategy()),
            _ => alloc::string::String::new(),
        },
        if c.is_pmu() { "PMU cycle" } else { "generic timer" },
        ovh / 1000,
    ));
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
