//! In-kernel tests of the CMA allocator on the default area (KTAP suite `cma_alloc`). Every case
//! needs that area and reports SKIP without it (`cma=0`); sizes the area cannot hold are skipped
//! with the reason. Each case leaves the area as it found it and checks that it did.

use super::{cma_alloc, cma_release, CmaArea, CmaReleaseError, CMA_ALIGNMENT_CAP_ORDER};
use crate::ktest::{NotPassed, TestResult};
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::{kassert, kassert_eq, kskip, ktry};
use alloc::vec::Vec;

fn area() -> Result<&'static CmaArea, NotPassed> {
    super::setup::default_area().ok_or_else(|| NotPassed::Skip("no default CMA area (cma=0 or none configured)".into()))
}

/// `n` pages with alignment order log2(n): the physical address is aligned to min(n, 2^8) pages.
/// One page is taken first so that the request does not start at the (4 MiB-aligned) area base,
/// where any alignment would hold by accident.
fn aligned(n: u64) -> TestResult {
    let a = area()?;
    let order = n.next_power_of_two().trailing_zeros();
    let align_pages = 1u64 << order.min(CMA_ALIGNMENT_CAP_ORDER);
    if align_pages + n > a.count() {
        kskip!("the default area has {} pages, too few for {n} aligned pages (its size is set by cma= or the DT)", a.count());
    }
    let before = a.stats();
    let pad = ktry!(cma_alloc(a, 1, 0).ok_or("no single page"));
    let got = cma_alloc(a, n, order);
    let align = align_pages * PAGE_SIZE;
    let ok = got.map(|p| (a.contains(p, n), p.as_u64() % align));
    if let Some(p) = got {
        kassert!(cma_release(a, p, n));
    }
    kassert!(cma_release(a, pad, 1));
    kassert_eq!(a.stats().used_pages, before.used_pages);
    kassert_eq!(ok, Some((true, 0)), "{n} pages at {got:?}, alignment {align:#x}");
    Ok(())
}

fn align_1() -> TestResult {
    aligned(1)
}

fn align_16() -> TestResult {
    aligned(16)
}

fn align_256() -> TestResult {
    aligned(256)
}

fn align_4096() -> TestResult {
    aligned(4096)
}

/// Filling the area leaves a clean failure (no pages, one more failed allocation); after a release
/// the same request succeeds inside the released run.
fn exhaustion_then_release() -> TestResult {
    let a = area()?;
    let before = a.stats();
    let mut runs: Vec<(PhysAddr, u64)> = Vec::new();
    while let Some(p) = Some(a.stats().largest_free_pages).filter(|&n| n > 0).and_then(|n| cma_alloc(a, n, 0).map(|p| (p, n))) {
        runs.push(p);
    }
    let full = a.stats();
    let refused = cma_alloc(a, 1, 0);
    let after_refusal = a.stats();
    let (first, n) = ktry!(runs.first().copied().ok_or("nothing allocated"));
    let mut again = None;
    if cma_release(a, first, n) {
        again = cma_alloc(a, n.min(16), 0);
        if let Some(p) = again {
            kassert!(cma_release(a, p, n.min(16)));
        }
    }
    for &(p, n) in &runs[1..] {
        kassert!(cma_release(a, p, n));
    }
    kassert_eq!(full.used_pages, full.total_pages);
    kassert_eq!(refused, None);
    kassert_eq!(after_refusal.failed_allocs, full.failed_allocs + 1);
    kassert_eq!(after_refusal.used_pages, full.used_pages);
    let again = ktry!(again.ok_or("no pages after a release"));
    kassert!(again >= first && again.as_u64() < first.as_u64() + n * PAGE_SIZE, "{again} not in the released run at {first}");
    kassert_eq!(a.stats().used_pages, before.used_pages);
    Ok(())
}

/// Releases of pages outside the area, or straddling its ends, return false and change nothing.
fn release_outside_area() -> TestResult {
    let a = area()?;
    let before = a.stats();
    kassert!(!cma_release(a, a.end(), 1));
    kassert!(!cma_release(a, PhysAddr(a.base().as_u64() - PAGE_SIZE), 2));
    kassert!(!cma_release(a, PhysAddr(a.end().as_u64() - PAGE_SIZE), 2));
    kassert!(!cma_release(a, PhysAddr(0), 1));
    kassert_eq!(a.stats(), before);
    Ok(())
}

/// A second release of the same pages is refused as such and changes nothing but the counter.
fn double_release_detected() -> TestResult {
    let a = area()?;
    let p = ktry!(cma_alloc(a, 8, 3).ok_or("no pages"));
    kassert!(cma_release(a, p, 8));
    let before = a.stats();
    kassert_eq!(a.release(p, 8), Err(CmaReleaseError::NotAllocated { addr: p, count: 8 }));
    kassert!(cma_release(a, p, 8), "pages of the area must not be reported as foreign");
    let after = a.stats();
    kassert_eq!(after.bad_releases, before.bad_releases + 2);
    kassert_eq!((after.used_pages, after.releases), (before.used_pages, before.releases));
    Ok(())
}

/// Prints the statistics table and the bitmap pictures of every area.
fn report() -> TestResult {
    super::setup::print_report("    # ");
    let a = area()?;
    let s = a.stats();
    kassert_eq!(s.used_pages + s.free_pages, s.total_pages);
    kassert_eq!(s.used_pages, 0, "pages left allocated in the default area");
    kassert_eq!(s.largest_free_pages, s.total_pages);
    Ok(())
}

crate::ktest_suite!("cma_alloc", [
    align_1,
    align_16,
    align_256,
    align_4096,
    exhaustion_then_release,
    release_outside_area,
    double_release_detected,
    report,
]);
