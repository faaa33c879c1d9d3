//! `cma_alloc` + `cma_release` of 1, 16 and 256 pages in a 64 MiB area that random allocations
//! keep empty, about half full or about 90% full (the targets at half full: 1,000 and
//! 5,000 instructions per pair for 16 and 256 pages; Linux 6.1 takes about 49,700 and 397,000 on
//! the same QEMU machine).
//!
//! The area is a private [`CmaArea`] at a nominal base: the CMA allocator only works on its bitmap
//! and never touches the pages, so no memory is set aside. The random load (a fixed-seed
//! generator, so runs under `--icount` repeat exactly) allocates runs of 1 to 4 times the measured
//! size, aligned to their size as `dma_alloc_contiguous` asks, and releases random earlier ones,
//! steering the area's use towards its fill level. One step of that load runs between two timed
//! pairs, so each pair starts from a different state and next-fit position.
//!
//! Names: `cma_alloc_release_<pages>` at half full, `..._fill0` empty, `..._fill90` at 90%.
//! `cma_alloc_release_256_fragmented` puts the 256-page pair under the 16-page benchmark's load
//! (runs of 1 to 64 pages): then the half-used area rarely has a free 1 MiB-aligned run, most
//! requests are refused, and `refused_mean` is the cost of the search that finds nothing; the
//! same happens to many 256-page requests at 90%.

use alloc::vec::Vec;

use super::{net_ns, read_overhead, timed, Recorder, Samples};
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::mm::cma::{cma_alloc, cma_release, CmaArea};

const AREA_PAGES: u64 = (64 << 20) / PAGE_SIZE;
const AREA_BASE: PhysAddr = PhysAddr(0x4000_0000);
const PAIRS: u64 = 4000;
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// xorshift64*: small, fast, and good enough to scatter allocations.
pub(super) struct Rng(u64);

impl Rng {
    /// The generator every benchmark starts from, so runs repeat exactly.
    pub(super) fn new() -> Rng {
        Rng(SEED)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 when `n` is 0).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The random load: live allocations of an area.
struct Load {
    rng: Rng,
    /// Largest allocation of the load, in pages.
    max_pages: u64,
    live: Vec<(PhysAddr, u64)>,
    used: u64,
    /// The use the load steers towards, in pages.
    target: u64,
}

impl Load {
    /// One step: allocate below the target use, else release a random live allocation. Returns
    /// false when an allocation found no free run.
    fn step(&mut self, area: &CmaArea) -> bool {
        if self.used < self.target {
            let n = 1 + self.rng.below(self.max_pages);
            match cma_alloc(area, n, n.next_power_of_two().trailing_zeros()) {
                Some(p) => {
                    self.live.push((p, n));
                    self.used += n;
                }
                None => return false,
            }
        } else if !self.live.is_empty() {
            let i = self.rng.below(self.live.len() as u64) as usize;
            let (p, n) = self.live.swap_remove(i);
            cma_release(area, p, n);
            self.used -= n;
        }
        true
    }
}

/// Allocations of the load in a row that may find no free run before the fill stops short of
/// its level (the area too ragged for the load's sizes; the note gives the use reached).
const MAX_FILL_FAILURES: u32 = 64;

fn alloc_release(rec: &Recorder, count: u64, load_max: u64, fill_percent: u64) {
    let area = match CmaArea::new("bench", AREA_BASE, AREA_PAGES, 0) {
        Ok(a) => a,
        Err(e) => return rec.note(format_args!("no area: {e}")),
    };
    let target = AREA_PAGES * fill_percent / 100;
    let mut load = Load { rng: Rng::new(), max_pages: load_max, live: Vec::new(), used: 0, target };
    let mut failures = 0;
    while load.used < target && failures < MAX_FILL_FAILURES {
        failures = if load.step(&area) { 0 } else { failures + 1 };
    }
    let order = count.next_power_of_two().trailing_zeros();
    let overhead = read_overhead(PAIRS);
    let (mut pairs, mut refused) = (Samples::default(), Samples::default());
    for _ in 0..PAIRS {
        let (ok, ticks) = timed(|| match cma_alloc(&area, count, order) {
            Some(p) => cma_release(&area, p, count),
            None => false,
        });
        if ok {
            pairs.record(ticks);
        } else {
            refused.record(ticks);
        }
        load.step(&area);
    }
    let (mean, max) = net_ns(&pairs, &overhead);
    let (refused_mean, _) = net_ns(&refused, &overhead);
    let (ovh, _) = net_ns(&overhead, &Samples::default());
    let s = area.stats();
    if pairs.count() > 0 {
        rec.result("mean", mean, "ns");
        rec.result("max", max, "ns");
    }
    if refused.count() > 0 {
        rec.result("refused_mean", refused_mean, "ns");
    }
    rec.note(format_args!(
        "{} alloc+release pairs timed (mean, max), {} requests refused for want of an aligned free run \
         (refused_mean); 64 MiB area kept near {fill_percent}% use, {}% used at the end by {} random \
         allocations of 1-{load_max} pages, largest free run {} pages; counter reads ({ovh} ns) subtracted",
        pairs.count(),
        refused.count(),
        s.used_pages * 100 / s.total_pages,
        load.live.len(),
        s.largest_free_pages,
    ));
}

macro_rules! entry {
    ($name:ident, $pages:expr, $load_max:expr, $fill:expr) => {
        pub fn $name(rec: &Recorder) {
            alloc_release(rec, $pages, $load_max, $fill)
        }
    };
}

entry!(alloc_release_1_fill0, 1, 4, 0);
entry!(alloc_release_1, 1, 4, 50);
entry!(alloc_release_1_fill90, 1, 4, 90);
entry!(alloc_release_16_fill0, 16, 64, 0);
entry!(alloc_release_16, 16, 64, 50);
entry!(alloc_release_16_fill90, 16, 64, 90);
entry!(alloc_release_256_fill0, 256, 1024, 0);
entry!(alloc_release_256, 256, 1024, 50);
entry!(alloc_release_256_fill90, 256, 1024, 90);
entry!(alloc_release_256_fragmented, 256, 64, 50);
