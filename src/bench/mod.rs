//! Benchmarks, run at boot when the bootarg `bench=GLOB[,GLOB...]` selects them by name (none run
//! by default).
//!
//! Time is virtual: under `./qemu-run.sh --icount` QEMU advances the generic timer by one
//! nanosecond per guest instruction, so nanoseconds here are instruction counts, the same on every
//! host. (Without `--icount` the numbers are host-dependent wall-clock time.) Each operation is
//! timed on its own between two counter reads; the cost of the reads themselves, measured with
//! back-to-back reads, is subtracted.
//!
//! Registration is a static list ([`BENCHES`]): the linker scripts collect only `.ktest_suites`.
//! The kernel runs the selected benchmarks right after the KTAP plan (the test runner's header
//! hook), and each prints its results there as `# bench <name> <metric>=<value> <unit>`, the form
//! the host-side KTAP reader collects, plus `# <name>: ...` notes on the conditions.

mod cma;
mod coherent;
mod cycles;
mod dma;
mod dma_engine;
mod dma_smp;
mod virtio;

use core::fmt;

use crate::arch::counter;
use crate::bootargs::glob_match_any;
use crate::println;

/// A benchmark: a name for `bench=` and a function that measures and reports.
pub struct Bench {
    pub name: &'static str,
    pub run: fn(&Recorder),
}

/// Every benchmark, in the order they run.
pub static BENCHES: &[Bench] = &[
    Bench { name: "cma_alloc_release_16", run: cma::alloc_release_16 },
    Bench { name: "cma_alloc_release_256", run: cma::alloc_release_256 },
    Bench { name: "cma_alloc_release_256_fragmented", run: cma::alloc_release_256_fragmented },
    Bench { name: "coherent_direct_1", run: coherent::direct_1 },
    Bench { name: "coherent_direct_16", run: coherent::direct_16 },
    Bench { name: "coherent_direct_256", run: coherent::direct_256 },
    Bench { name: "coherent_remap_1", run: coherent::remap_1 },
    Bench { name: "coherent_remap_16", run: coherent::remap_16 },
    Bench { name: "coherent_remap_256", run: coherent::remap_256 },
    Bench { name: "coherent_atomic_1", run: coherent::atomic_1 },
    Bench { name: "coherent_atomic_16", run: coherent::atomic_16 },
    Bench { name: "coherent_atomic_256", run: coherent::atomic_256 },
    Bench { name: "pages_alloc_free_1", run: coherent::pages_alloc_free_1 },
    Bench { name: "dma_map_direct_coherent_4k", run: dma::direct_coherent_4k },
    Bench { name: "dma_map_direct_coherent_64k", run: dma::direct_coherent_64k },
    Bench { name: "dma_map_direct_coherent_1m", run: dma::direct_coherent_1m },
    Bench { name: "dma_map_direct_coherent_4m", run: dma::direct_coherent_4m },
    Bench { name: "dma_map_direct_noncoherent_4k", run: dma::direct_noncoherent_4k },
    Bench { name: "dma_map_direct_noncoherent_64k", run: dma::direct_noncoherent_64k },
    Bench { name: "dma_map_direct_noncoherent_1m", run: dma::direct_noncoherent_1m },
    Bench { name: "dma_map_direct_noncoherent_4m", run: dma::direct_noncoherent_4m },
    Bench { name: "dma_map_swiotlb_4k", run: dma::swiotlb_4k },
    Bench { name: "dma_map_swiotlb_64k", run: dma::swiotlb_64k },
    Bench { name: "dma_map_swiotlb_1m", run: dma::swiotlb_1m },
    Bench { name: "dma_map_swiotlb_4m", run: dma::swiotlb_4m },
    Bench { name: "dma_map_iommu_strict_4k", run: dma::iommu_strict_4k },
    Bench { name: "dma_map_iommu_strict_64k", run: dma::iommu_strict_64k },
    Bench { name: "dma_map_iommu_strict_1m", run: dma::iommu_strict_1m },
    Bench { name: "dma_map_iommu_lazy_4k", run: dma::iommu_lazy_4k },
    Bench { name: "dma_map_iommu_lazy_1m", run: dma::iommu_lazy_1m },
    Bench { name: "iova_alloc_free", run: dma::iova_alloc_free },
    // Later additions run after the first set, so that the first set keeps its starting state
    // (heap, page allocator) and with it the counts of its baseline.
    Bench { name: "dma_map_swiotlb_256k", run: dma::swiotlb_256k },
    Bench { name: "dma_map_iommu_strict_4m", run: dma::iommu_strict_4m },
    Bench { name: "dma_map_iommu_lazy_64k", run: dma::iommu_lazy_64k },
    Bench { name: "dma_map_iommu_lazy_4m", run: dma::iommu_lazy_4m },
    Bench { name: "iova_alloc_free_slow_1", run: dma::iova_alloc_free_slow_1 },
    Bench { name: "iova_alloc_free_slow_64", run: dma::iova_alloc_free_slow_64 },
    Bench { name: "coherent_iommu_1", run: coherent::iommu_1 },
    Bench { name: "coherent_iommu_16", run: coherent::iommu_16 },
    Bench { name: "coherent_iommu_256", run: coherent::iommu_256 },
    Bench { name: "cma_alloc_release_1", run: cma::alloc_release_1 },
    Bench { name: "cma_alloc_release_1_fill0", run: cma::alloc_release_1_fill0 },
    Bench { name: "cma_alloc_release_16_fill0", run: cma::alloc_release_16_fill0 },
    Bench { name: "cma_alloc_release_256_fill0", run: cma::alloc_release_256_fill0 },
    Bench { name: "cma_alloc_release_1_fill90", run: cma::alloc_release_1_fill90 },
    Bench { name: "cma_alloc_release_16_fill90", run: cma::alloc_release_16_fill90 },
    Bench { name: "cma_alloc_release_256_fill90", run: cma::alloc_release_256_fill90 },
    Bench { name: "dma_map_smp_direct_coherent_4k", run: dma_smp::direct_coherent_4k },
    Bench { name: "dma_map_smp_direct_coherent_64k", run: dma_smp::direct_coherent_64k },
    Bench { name: "dma_map_smp_direct_coherent_1m", run: dma_smp::direct_coherent_1m },
    Bench { name: "dma_map_smp_direct_coherent_4m", run: dma_smp::direct_coherent_4m },
    Bench { name: "dma_map_smp_direct_noncoherent_4k", run: dma_smp::direct_noncoherent_4k },
    Bench { name: "dma_map_smp_direct_noncoherent_64k", run: dma_smp::direct_noncoherent_64k },
    Bench { name: "dma_map_smp_direct_noncoherent_1m", run: dma_smp::direct_noncoherent_1m },
    Bench { name: "dma_map_smp_direct_noncoherent_4m", run: dma_smp::direct_noncoherent_4m },
    Bench { name: "dma_map_smp_swiotlb_4k", run: dma_smp::swiotlb_4k },
    Bench { name: "dma_map_smp_swiotlb_64k", run: dma_smp::swiotlb_64k },
    Bench { name: "dma_map_smp_swiotlb_256k", run: dma_smp::swiotlb_256k },
    Bench { name: "dma_map_smp_iommu_strict_4k", run: dma_smp::iommu_strict_4k },
    Bench { name: "dma_map_smp_iommu_strict_64k", run: dma_smp::iommu_strict_64k },
    Bench { name: "dma_map_smp_iommu_strict_1m", run: dma_smp::iommu_strict_1m },
    Bench { name: "dma_map_smp_iommu_strict_4m", run: dma_smp::iommu_strict_4m },
    Bench { name: "dma_map_smp_iommu_lazy_4k", run: dma_smp::iommu_lazy_4k },
    Bench { name: "dma_map_smp_iommu_lazy_64k", run: dma_smp::iommu_lazy_64k },
    Bench { name: "dma_map_smp_iommu_lazy_1m", run: dma_smp::iommu_lazy_1m },
    Bench { name: "dma_map_smp_iommu_lazy_4m", run: dma_smp::iommu_lazy_4m },
    Bench { name: "virtio_mmio_direct", run: virtio::mmio_direct },
    Bench { name: "virtio_mmio_swiotlb", run: virtio::mmio_swiotlb },
    Bench { name: "virtio_pci_direct", run: virtio::pci_direct },
    Bench { name: "virtio_pci_swiotlb", run: virtio::pci_swiotlb },
    Bench { name: "virtio_pci_iommu_strict", run: virtio::pci_iommu_strict },
    Bench { name: "virtio_pci_iommu_lazy", run: virtio::pci_iommu_lazy },
    Bench { name: "dma_engine_direct", run: dma_engine::direct },
    Bench { name: "dma_engine_swiotlb", run: dma_engine::swiotlb },
];

/// Runs the benchmarks whose name matches one of the comma-separated globs in `selection`
/// (the `bench` bootarg's value); nothing when it is `None`.
pub fn run_selected(selection: Option<&str>) {
    let Some(globs) = selection else { return };
    let mut ran = 0;
    for b in BENCHES.iter().filter(|b| glob_match_any(globs, b.name)) {
        (b.run)(&Recorder { name: b.name });
        ran += 1;
    }
    if ran == 0 {
        println!("# bench=`{globs}` selects no benchmark");
    }
}

/// Prints one benchmark's results and notes.
pub struct Recorder {
    name: &'static str,
}

impl Recorder {
    /// `# bench <name> <metric>=<value> <unit>`.
    pub fn result(&self, metric: &str, value: u64, unit: &str) {
        println!("# bench {} {metric}={value} {unit}", self.name);
    }

    /// `# <name>: <text>`: the conditions of the measurement.
    pub fn note(&self, text: fmt::Arguments) {
        println!("# {}: {text}", self.name);
    }
}

/// Runs `op` between two counter reads; returns its result and the ticks between the reads.
#[inline(always)]
pub fn timed<T>(op: impl FnOnce() -> T) -> (T, u64) {
    let t0 = counter::read();
    let r = op();
    let t1 = counter::read();
    (r, t1.wrapping_sub(t0))
}

/// Durations of one kind of operation, in counter ticks (from [`timed`]).
#[derive(Default)]
pub struct Samples {
    count: u64,
    ticks: u64,
    max_ticks: u64,
}

impl Samples {
    pub fn record(&mut self, ticks: u64) {
        self.count += 1;
        self.ticks = self.ticks.saturating_add(ticks);
        self.max_ticks = self.max_ticks.max(ticks);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean duration in picoseconds (0 without samples).
    fn mean_ps(&self) -> u64 {
        if self.count == 0 {
            return 0;
        }
        u64::try_from(ticks_to_ps(self.ticks) / u128::from(self.count)).unwrap_or(u64::MAX)
    }
}

/// Converts counter ticks to picoseconds, in 128 bits so that no input overflows.
fn ticks_to_ps(ticks: u64) -> u128 {
    u128::from(ticks) * 1_000_000_000_000 / u128::from(counter::frequency().max(1))
}

/// The cost of the two counter reads around an operation: the mean of `n` empty measurements.
pub fn read_overhead(n: u64) -> Samples {
    let mut s = Samples::default();
    for _ in 0..n {
        s.record(timed(|| ()).1);
    }
    s
}

/// Mean and maximum of `samples` in nanoseconds, minus the mean of `overhead`.
pub fn net_ns(samples: &Samples, overhead: &Samples) -> (u64, u64) {
    let ovh = overhead.mean_ps();
    let mean = samples.mean_ps().saturating_sub(ovh) / 1000;
    let max = u64::try_from(ticks_to_ps(samples.max_ticks)).unwrap_or(u64::MAX).saturating_sub(ovh) / 1000;
    (mean, max)
}
