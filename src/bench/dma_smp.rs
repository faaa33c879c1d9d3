//! Linux's dma_map_benchmark with one thread per CPU: every online CPU maps and unmaps a buffer
//! of its own through the same device at once ([`crate::smp::on_each_cpu`]), for the back ends
//! of [`super::dma`] (dma-direct coherent and non-coherent, swiotlb, dma-iommu strict and lazy)
//! and buffers of 1, 16, 256 and 1024 pages.
//!
//! Each entry `dma_map_smp_<back end>_<size>` pools the samples of all CPUs and prints, for
//! bidirectional mappings, `map_mean`, `map_stddev`, `unmap_mean`, `unmap_stddev` and `pair_mean`
//! in nanoseconds (PMU cycle counter, 1 ns resolution, its reads subtracted from the means), and
//! notes the same for to-device and from-device, each CPU's own mean pair, and how many samples
//! were left out. It needs more than one CPU (`--smp N`); on one CPU it says so and reports
//! nothing ([`super::dma`] measures that case).
//!
//! What "at once" means under `--icount`: QEMU then runs the CPUs one after another in turns of
//! millions of instructions (its round-robin scheduler), so the CPUs share every lock, cache and
//! allocator of the back end but rarely contend at the same instant. A sample during which QEMU
//! switched to other CPUs would count their instructions too (the cycle counter follows virtual
//! time, which every CPU advances): every CPU counts the samples it starts and finishes in a
//! shared counter, and a sample during which that counter moved is left out (a CPU waiting for a
//! lock the switched-out CPU holds has started a sample too). When most samples would be left out
//! the CPUs ran truly in parallel (no `--icount`), and every sample is kept.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;

use super::cycles::Cycles;
use super::dma::{bench_device, ns, read_overhead, stats, Kind};
use super::Recorder;
use crate::dma::api::{DmaAttrs, DmaError};
use crate::dma::maint::Direction;
use crate::dma::Device;
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::mm::phys::{alloc_pages_exact, free_pages_exact};
use crate::smp::{on_each_cpu, online, MAX_CPUS};

/// What every CPU runs: set by the boot CPU before [`on_each_cpu`], read by each CPU.
#[derive(Clone, Copy)]
struct Job {
    dev: Device,
    size: u64,
    dir: Direction,
    /// Map+unmap pairs per CPU.
    pairs: usize,
    cycles: Cycles,
    /// Each CPU's buffer.
    bufs: [PhysAddr; MAX_CPUS],
}

/// One CPU's samples, in counts.
#[derive(Default)]
struct CpuRun {
    map: Vec<u64>,
    unmap: Vec<u64>,
    /// Whether another CPU started or finished a sample during this one (see the module
    /// documentation).
    interleaved: Vec<bool>,
    error: Option<DmaError>,
}

static JOB: Mutex<Option<Job>> = Mutex::new(None);
static RUNS: [Mutex<Option<CpuRun>>; MAX_CPUS] = [const { Mutex::new(None) }; MAX_CPUS];
/// Samples started plus samples finished, by all CPUs.
static PROGRESS: AtomicU64 = AtomicU64::new(0);

fn worker(cpu: usize) {
    let Some(job) = *JOB.lock() else { return };
    let c = job.cycles.on_this_cpu();
    let (dev, phys, size, dir) = (job.dev, job.bufs[cpu], job.size, job.dir);
    let mut run = CpuRun {
        map: Vec::with_capacity(job.pairs),
        unmap: Vec::with_capacity(job.pairs),
        interleaved: Vec::with_capacity(job.pairs),
        error: None,
    };
    for _ in 0..job.pairs {
        // Announced at the start too, so that a CPU that starts a sample and then waits (for a
        // lock this one holds while QEMU runs the others) shows as well.
        PROGRESS.fetch_add(1, Ordering::AcqRel);
        let before = PROGRESS.load(Ordering::Acquire);
        let (r, tm) = c.timed(|| dev.map_phys(phys, size, dir, DmaAttrs::NONE));
        let dma = match r {
            Ok(d) => d,
            Err(e) => {
                run.error = Some(e);
                break;
            }
        };
        let (r, tu) = c.timed(|| dev.unmap_phys(dma, size, dir, DmaAttrs::NONE));
        if let Err(e) = r {
            run.error = Some(e);
            break;
        }
        let after = PROGRESS.load(Ordering::Acquire);
        run.map.push(tm);
        run.unmap.push(tu);
        run.interleaved.push(after != before);
        PROGRESS.fetch_add(1, Ordering::AcqRel);
    }
    *RUNS[cpu].lock() = Some(run);
}

/// Samples of all CPUs for one direction.
struct Pooled {
    map: Vec<u64>,
    unmap: Vec<u64>,
    left_out: usize,
    parallel: bool,
    /// Each CPU's mean pair, in counts.
    cpu_pair_means: Vec<u64>,
}

/// Runs one direction on every CPU; the pooled samples, or the first CPU's error.
fn run_direction(job: Job, cpus: usize) -> Result<Pooled, DmaError> {
    for slot in RUNS.iter() {
        *slot.lock() = None;
    }
    *JOB.lock() = Some(job);
    on_each_cpu(worker);
    *JOB.lock() = None;
    let runs: Vec<CpuRun> = RUNS.iter().take(cpus).filter_map(|s| s.lock().take()).collect();
    if let Some(e) = runs.iter().find_map(|r| r.error) {
        return Err(e);
    }
    let total: usize = runs.iter().map(|r| r.map.len()).sum();
    let interleaved: usize = runs.iter().map(|r| r.interleaved.iter().filter(|&&i| i).count()).sum();
    // Most samples interleaved: the CPUs ran side by side, not in turns.
    let parallel = interleaved * 2 > total;
    let mut p = Pooled { map: Vec::new(), unmap: Vec::new(), left_out: 0, parallel, cpu_pair_means: Vec::new() };
    for r in &runs {
        let mut pairs = Vec::with_capacity(r.map.len());
        for i in 0..r.map.len() {
            if r.interleaved[i] && !parallel {
                p.left_out += 1;
                continue;
            }
            p.map.push(r.map[i]);
            p.unmap.push(r.unmap[i]);
            pairs.push(r.map[i] + r.unmap[i]);
        }
        p.cpu_pair_means.push(stats(&pairs).mean_milli / 1000);
    }
    Ok(p)
}

fn run(rec: &Recorder, kind: Kind, pages: u64) {
    let cpus = online();
    if cpus < 2 {
        return rec.note(format_args!("one CPU online: nothing to run at once (boot with --smp 4; dma_map_* measures one CPU)"));
    }
    let size = pages * PAGE_SIZE;
    // Buffers from the page allocator, as Linux's benchmark takes them (alloc_pages_exact): aligned
    // to their size, so a 4 MiB buffer can be mapped with 2 MiB blocks behind the SMMU whatever
    // else the boot allocated.
    let mut bufs = Vec::with_capacity(cpus);
    for _ in 0..cpus {
        match alloc_pages_exact(pages, None) {
            Ok(p) => bufs.push(p),
            Err(e) => {
                free_all(rec, &bufs, pages);
                return rec.note(format_args!("no {pages}-page buffer for each of {cpus} CPUs: {e}"));
            }
        }
    }
    let dev = match bench_device(kind) {
        Ok(d) => d,
        Err(why) => {
            free_all(rec, &bufs, pages);
            return rec.note(format_args!("{why}"));
        }
    };
    let c = Cycles::start();
    let ovh = read_overhead(&c);
    let mut phys = [PhysAddr(0); MAX_CPUS];
    phys[..cpus].copy_from_slice(&bufs);
    // Per CPU: 256 pairs of one page, 16 of the larger buffers (whose cost is a per-line or
    // per-byte loop, the same every time).
    let pairs = (256 / pages).clamp(16, 256) as usize;
    let mut detail = String::new();
    for dir in [Direction::Bidirectional, Direction::ToDevice, Direction::FromDevice] {
        let job = Job { dev, size, dir, pairs, cycles: c, bufs: phys };
        let p = match run_direction(job, cpus) {
            Ok(p) => p,
            Err(e) => {
                free_all(rec, &bufs, pages);
                return rec.note(format_args!("{dir} map of {size:#x} bytes refused: {e}"));
            }
        };
        let (m, u) = (stats(&p.map), stats(&p.unmap));
        let (map_ns, unmap_ns) = (ns(&c, m.mean_milli, ovh), ns(&c, u.mean_milli, ovh));
        let (map_sd, unmap_sd) = (ns(&c, m.stddev * 1000, 0), ns(&c, u.stddev * 1000, 0));
        let per_cpu: Vec<u64> = p.cpu_pair_means.iter().map(|&pm| ns(&c, pm * 1000, 2 * ovh)).collect();
        if dir == Direction::Bidirectional {
            rec.result("map_mean", map_ns, "ns");
            rec.result("map_stddev", map_sd, "ns");
            rec.result("unmap_mean", unmap_ns, "ns");
            rec.result("unmap_stddev", unmap_sd, "ns");
            rec.result("pair_mean", map_ns + unmap_ns, "ns");
            let _ = write!(detail, "; bidirectional pair per CPU {per_cpu:?}");
        } else {
            let _ = write!(detail, "; {dir}: map {map_ns}±{map_sd}, unmap {unmap_ns}±{unmap_sd}, pair per CPU {per_cpu:?}");
        }
        if p.parallel {
            let _ = write!(detail, " (CPUs ran side by side: all samples kept)");
        } else if p.left_out > 0 {
            let _ = write!(detail, " ({} of {} samples left out: QEMU switched CPUs during them)", p.left_out, pairs * cpus);
        }
    }
    rec.note(format_args!(
        "{cpus} CPUs at once, each {pairs} map+unmap per direction of its own {pages}-page buffer \
         (from the page allocator, aligned to its size), ns over all CPUs (mean±stddev){detail}; {} counter, its reads ({} counts) subtracted",
        if c.is_pmu() { "PMU cycle" } else { "generic timer" },
        ovh / 1000,
    ));
    free_all(rec, &bufs, pages);
}

fn free_all(rec: &Recorder, bufs: &[PhysAddr], pages: u64) {
    for &b in bufs {
        if let Err(e) = free_pages_exact(b, pages) {
            rec.note(format_args!("freeing the buffer at {b}: {e}"));
        }
    }
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
entry!(iommu_strict_4k, IommuStrict, 1);
entry!(iommu_strict_64k, IommuStrict, 16);
entry!(iommu_strict_1m, IommuStrict, 256);
entry!(iommu_strict_4m, IommuStrict, 1024);
entry!(iommu_lazy_4k, IommuLazy, 1);
entry!(iommu_lazy_64k, IommuLazy, 16);
entry!(iommu_lazy_1m, IommuLazy, 256);
entry!(iommu_lazy_4m, IommuLazy, 1024);
