//! The equivalent of Linux's dma_map_benchmark (kernel/dma/map_benchmark.c): a streaming map and
//! unmap of one buffer, repeated, timed separately, for buffers of 1, 16, 256 and 1024 pages and
//! for three back ends:
//!
//! - `direct_coherent`: dma-direct for a cache-coherent device (a few checks and the bus
//!   translation);
//! - `direct_noncoherent`: dma-direct for a device that is not cache-coherent (a clean per line at
//!   map, an invalidate per line at unmap for data coming back);
//! - `swiotlb`: a coherent device that reaches only the platform bounce pool, so every map takes
//!   slots and copies (in at map; out at unmap for data coming back). Mappings above the pool's
//!   largest (256 KiB) are refused, as in Linux, and reported as such.
//!
//! Each entry `dma_map_<back end>_<size>` prints, for bidirectional mappings (the benchmark's
//! default in Linux), `map_mean`, `map_stddev`, `unmap_mean`, `unmap_stddev` and `pair_mean`
//! (map + unmap) in nanoseconds, and notes the same for to-device and from-device. Samples are
//! timed with the PMU cycle counter ([`super::cycles`]): 1 ns resolution, the cost of its two
//! reads (measured back to back) subtracted from the means. Under `--icount` a nanosecond is an
//! instruction. The targets for bidirectional pairs: 4 KiB coherent at most 60, 4 KiB
//! non-coherent at most 550, 1 MiB non-coherent at most 100,000.

use alloc::vec::Vec;

use super::cycles::Cycles;
use super::Recorder;
use crate::dma::api::DmaAttrs;
use crate::dma::bounce::platform_pool;
use crate::dma::busmap::{BusMap, DmaAddr, Window};
use crate::dma::maint::Direction;
use crate::dma::{Device, GfpFlags};
use crate::mm::addr::PAGE_SIZE;

#[derive(Clone, Copy)]
pub(super) enum Kind {
    DirectCoherent,
    DirectNoncoherent,
    Swiotlb,
    IommuStrict,
    IommuLazy,
}

/// StreamIDs of the root bus that no QEMU function uses in the benchmark machine (devfn 31.6 and
/// 31.7): a domain attached there measures the mapping paths without a device in the way.
const BENCH_SIDS: [u32; 2] = [0xfe, 0xff];

/// A coherent device behind the first SMMU, in a domain of its own, strict or lazy.
pub(super) fn iommu_device(strict: bool) -> Option<Device> {
    let smmu = *crate::iommu::smmuv3::smmus().first()?;
    let sid = BENCH_SIDS[strict as usize];
    let d = crate::dma::iommu::attach_with_policy(smmu, sid, strict).ok()?;
    Some(Device::with_bus(if strict { "bench-iommu-strict" } else { "bench-iommu-lazy" }, BusMap::IDENTITY, true).with_iommu(d))
}

/// Mean and standard deviation of samples, in counts (the mean keeps 1/1000 of a count).
pub(super) struct Stats {
    pub mean_milli: u64,
    pub stddev: u64,
}

pub(super) fn stats(samples: &[u64]) -> Stats {
    let n = samples.len().max(1) as u128;
    let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
    let sq: u128 = samples.iter().map(|&s| u128::from(s) * u128::from(s)).sum();
    let var = (sq * n).saturating_sub(sum * sum) / (n * n);
    Stats { mean_milli: u64::try_from(sum * 1000 / n).unwrap_or(u64::MAX), stddev: isqrt(var) }
}

fn isqrt(v: u128) -> u64 {
    // Newton's iteration from above; converges for every v.
    if v < 2 {
        return v as u64;
    }
    let mut x = v;
    let mut y = (x + 1) / 2;
    while y < x {
        x = y;
        y = (x + v / x) / 2;
    }
    u64::try_from(x).unwrap_or(u64::MAX)
}

/// The mean cost of the counter's two reads around an operation, in thousandths of a count.
pub(super) fn read_overhead(c: &Cycles) -> u64 {
    let mut ovh = Vec::with_capacity(1024);
    for _ in 0..1024 {
        ovh.push(c.timed(|| ()).1);
    }
    stats(&ovh).mean_milli
}

/// Nanoseconds of `counts_milli / 1000` counts, minus `overhead_milli / 1000` counts.
pub(super) fn ns(c: &Cycles, counts_milli: u64, overhead_milli: u64) -> u64 {
    let net = u128::from(counts_milli.saturating_sub(overhead_milli));
    u64::try_from(net * u128::from(c.ps_per_count()) / 1_000_000).unwrap_or(u64::MAX)
}

/// Map and unmap durations of one direction, in counts.
struct Run {
    map: Vec<u64>,
    unmap: Vec<u64>,
}

fn measure(c: &Cycles, dev: &Device, phys: crate::mm::addr::PhysAddr, size: u64, dir: Direction, n: usize) -> Result<Run, crate::dma::api::DmaError> {
    let mut run = Run { map: Vec::with_capacity(n), unmap: Vec::with_capacity(n) };
    for _ in 0..n {
        let (r, t) = c.timed(|| dev.map_phys(phys, size, dir, DmaAttrs::NONE));
        let dma: DmaAddr = r?;
        run.map.push(t);
        let (r, t) = c.timed(|| dev.unmap_phys(dma, size, dir, DmaAttrs::NONE));
        r?;
        run.unmap.push(t);
    }
    Ok(run)
}

/// The device that `kind` measures, or why there is none on this machine.
#[inline(always)]
pub(super) fn bench_device(kind: Kind) -> Result<Device, &'static str> {
    match kind {
        Kind::DirectCoherent => Ok(Device::with_bus("bench-coherent", BusMap::IDENTITY, true)),
        Kind::DirectNoncoherent => Ok(Device::with_bus("bench-noncoherent", BusMap::IDENTITY, false)),
        Kind::Swiotlb => {
            let pool = platform_pool().ok_or("no platform bounce pool")?;
            // A bus window over the pool alone: every buffer outside it bounces.
            let bus = Window::new(pool.base(), DmaAddr(pool.base().0), pool.size())
                .and_then(|w| BusMap::from_windows(&[w]).ok())
                .ok_or("no bus map over the pool")?;
            Ok(Device::with_bus("bench-swiotlb", bus, true))
        }
        Kind::IommuStrict | Kind::IommuLazy => {
            iommu_device(matches!(kind, Kind::IommuStrict)).ok_or("no SMMU (-M virt,iommu=smmuv3)")
        }
    }
}

fn run(rec: &Recorder, kind: Kind, pages: u64) {
    let size = pages * PAGE_SIZE;
    let source = Device::with_bus("bench-source", BusMap::IDENTITY, true);
    let buf = match source.alloc_coherent(size, GfpFlags::KERNEL, DmaAttrs::NONE) {
        Ok(b) => b,
        Err(e) => return rec.note(format_args!("no {size:#x}-byte buffer: {e}")),
    };
    let dev = match bench_device(kind) {
        Ok(d) => d,
        Err(why) => return rec.note(format_args!("{why}")),
    };
    let forced = platform_pool().is_some_and(|p| p.is_forced());
    let c = Cycles::start();
    let ovh = read_overhead(&c);
    // Fewer samples for larger buffers: about 64 MiB mapped in all per direction, at least 32.
    let n = (16384 / pages).clamp(32, 2048) as usize;
    let mut detail = alloc::string::String::new();
    for dir in [Direction::Bidirectional, Direction::ToDevice, Direction::FromDevice] {
        let r = match measure(&c, &dev, buf.phys(), size, dir, n) {
            Ok(r) => r,
            Err(e) => return rec.note(format_args!("{dir} map of {size:#x} bytes refused: {e}")),
        };
        let (m, u) = (stats(&r.map), stats(&r.unmap));
        let (map_ns, unmap_ns) = (ns(&c, m.mean_milli, ovh), ns(&c, u.mean_milli, ovh));
        let (map_sd, unmap_sd) = (ns(&c, m.stddev * 1000, 0), ns(&c, u.stddev * 1000, 0));
        if dir == Direction::Bidirectional {
            rec.result("map_mean", map_ns, "ns");
            rec.result("map_stddev", map_sd, "ns");
            rec.result("unmap_mean", unmap_ns, "ns");
            rec.result("unmap_stddev", unmap_sd, "ns");
            rec.result("pair_mean", map_ns + unmap_ns, "ns");
        } else {
            let _ = core::fmt::write(
                &mut detail,
                format_args!("; {dir}: map {map_ns}±{map_sd}, unmap {unmap_ns}±{unmap_sd}"),
            );
        }
    }
    rec.note(format_args!(
        "{n} map+unmap of {pages} page(s) per direction, ns (mean±stddev){detail}; {} counter, {} ps/count, its reads ({} counts) subtracted{}",
        if c.is_pmu() { "PMU cycle" } else { "generic timer" },
        c.ps_per_count(),
        ovh / 1000,
        if forced && !matches!(kind, Kind::Swiotlb) { "; swiotlb=force: dma-direct bounced too" } else { "" },
    ));
}

macro_rules! entry {
    ($name:ident, $kind:ident, $pages:expr) => {
        pub fn $name(rec: &Recorder) {
            run(rec, Kind::$kind, $pages)
        }
    };
}

entry!(direct_coherent_4k, DirectCoherent, 1);
entry!(direct_coherent_64k, DirectCoherent, 16);
entry!(direct_coherent_1m, DirectCoherent, 256);
entry!(direct_coherent_4m, DirectCoherent, 1024);
entry!(direct_noncoherent_4k, DirectNoncoherent, 1);
entry!(direct_noncoherent_64k, DirectNoncoherent, 16);
entry!(direct_noncoherent_1m, DirectNoncoherent, 256);
entry!(direct_noncoherent_4m, DirectNoncoherent, 1024);
entry!(swiotlb_4k, Swiotlb, 1);
entry!(swiotlb_64k, Swiotlb, 16);
entry!(swiotlb_256k, Swiotlb, 64);
entry!(swiotlb_1m, Swiotlb, 256);
entry!(swiotlb_4m, Swiotlb, 1024);
entry!(iommu_strict_4k, IommuStrict, 1);
entry!(iommu_strict_64k, IommuStrict, 16);
entry!(iommu_strict_1m, IommuStrict, 256);
entry!(iommu_strict_4m, IommuStrict, 1024);
entry!(iommu_lazy_4k, IommuLazy, 1);
entry!(iommu_lazy_64k, IommuLazy, 16);
entry!(iommu_lazy_1m, IommuLazy, 256);
entry!(iommu_lazy_4m, IommuLazy, 1024);

/// The IOVA allocator's fast path: allocation + free of one page from the current CPU's
/// magazines, in a space of its own (39 bits, like a domain's), warm.
pub fn iova_alloc_free(rec: &Recorder) {
    let Ok(space) = crate::iommu::iova::IovaSpace::new(0, (1 << 39) - 1) else {
        return rec.note(format_args!("no IOVA space"));
    };
    let cpu = crate::smp::cpu_index();
    let c = Cycles::start();
    let ovh = read_overhead(&c);
    let mut samples = Vec::with_capacity(2048);
    for i in 0..2048 + 64 {
        let (r, t) = c.timed(|| space.alloc_fast(cpu, 1, u64::MAX).and_then(|iova| space.free_fast(cpu, iova, 1)));
        if let Err(e) = r {
            return rec.note(format_args!("alloc+free refused: {e}"));
        }
        // The first rounds fill the magazines: the fast path is what follows.
        if i >= 64 {
            samples.push(t);
        }
    }
    let s = stats(&samples);
    rec.result("mean", ns(&c, s.mean_milli, ovh), "ns");
    rec.result("stddev", ns(&c, s.stddev * 1000, 0), "ns");
    let st = space.stats();
    rec.note(format_args!("2048 alloc+free pairs of one page after 64 warm-up pairs; fast-path hits {} of {}", st.fast_hits, st.allocations));
}

/// Allocations of 1 to 64 pages that populate the slow-path benchmarks' space (half are freed
/// again before the timing).
const SLOW_POPULATION: usize = 2048;

/// The IOVA allocator's slow path, its tree of allocations and gaps behind the range caches, in
/// a space made ragged first: [`SLOW_POPULATION`] allocations of 1 to 64 pages (fixed-seed
/// random), half of them freed again at random, so the search meets gaps of every size.
/// `tree_only`: [`IovaSpace::alloc`]/[`IovaSpace::free`], which bypass the caches (the cost of a
/// cache miss); else `alloc_fast`/`free_fast` as dma-iommu calls them, with a size no cache holds.
///
/// [`IovaSpace::alloc`]: crate::iommu::iova::IovaSpace::alloc
/// [`IovaSpace::free`]: crate::iommu::iova::IovaSpace::free
fn iova_slow(rec: &Recorder, pages: u64, tree_only: bool) {
    let Ok(space) = crate::iommu::iova::IovaSpace::new(0, (1 << 39) - 1) else {
        return rec.note(format_args!("no IOVA space"));
    };
    let mut rng = super::cma::Rng::new();
    let mut live = Vec::with_capacity(SLOW_POPULATION);
    for _ in 0..SLOW_POPULATION {
        let n = 1 + rng.below(64);
        match space.alloc(n, u64::MAX) {
            Ok(iova) => live.push((iova, n)),
            Err(e) => return rec.note(format_args!("populating the space: {e}")),
        }
    }
    for _ in 0..SLOW_POPULATION / 2 {
        let (iova, n) = live.swap_remove(rng.below(live.len() as u64) as usize);
        if let Err(e) = space.free(iova, n) {
            return rec.note(format_args!("populating the space: {e}"));
        }
    }
    let cpu = crate::smp::cpu_index();
    let c = Cycles::start();
    let ovh = read_overhead(&c);
    let n = 1024;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let (r, t) = c.timed(|| {
            if tree_only {
                space.alloc(pages, u64::MAX).and_then(|iova| space.free(iova, pages))
            } else {
                space.alloc_fast(cpu, pages, u64::MAX).and_then(|iova| space.free_fast(cpu, iova, pages))
            }
        });
        if let Err(e) = r {
            return rec.note(format_args!("alloc+free refused: {e}"));
        }
        samples.push(t);
    }
    let s = stats(&samples);
    rec.result("mean", ns(&c, s.mean_milli, ovh), "ns");
    rec.result("stddev", ns(&c, s.stddev * 1000, 0), "ns");
    let st = space.stats();
    rec.note(format_args!(
        "{n} alloc+free pairs of {pages} page(s) through {} in a 39-bit space holding {} random \
         allocations of 1-64 pages ({} pages); fast-path hits {} of {}; {} counter, its reads ({} counts) subtracted",
        if tree_only { "alloc/free (the tree, bypassing the range caches)" } else { "alloc_fast/free_fast (a size no range cache holds: the tree)" },
        live.len(),
        st.allocated_pages,
        st.fast_hits,
        st.allocations,
        if c.is_pmu() { "PMU cycle" } else { "generic timer" },
        ovh / 1000,
    ));
}

/// One page through the tree alone: what an allocation costs when the CPU's cache is empty.
pub fn iova_alloc_free_slow_1(rec: &Recorder) {
    iova_slow(rec, 1, true);
}

/// 64 pages, the smallest size above the range caches' largest (32), as dma-iommu allocates it.
pub fn iova_alloc_free_slow_64(rec: &Recorder) {
    iova_slow(rec, 64, false);
}
