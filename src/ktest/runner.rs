//! The in-kernel runner: walks the `.ktest_suites` section and prints KTAP.

use super::{write_result, Filter, Suite, Totals};
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

extern "C" {
    static __ktest_suites_start: u8;
    static __ktest_suites_end: u8;
}

/// Name of the case running now (for the panic and crash reports), and its number.
static CURRENT_SUITE: AtomicPtr<Suite> = AtomicPtr::new(core::ptr::null_mut());
static CURRENT_CASE: AtomicUsize = AtomicUsize::new(usize::MAX);

fn all_suites() -> &'static [Suite] {
    // SAFETY: the linker script places every `ktest_suite!` static contiguously between the two
    // symbols; each is a properly aligned, initialised `Suite` (an array of them).
    unsafe {
        let start = core::ptr::addr_of!(__ktest_suites_start) as *const Suite;
        let end = core::ptr::addr_of!(__ktest_suites_end) as usize;
        let n = (end - start as usize) / core::mem::size_of::<Suite>();
        core::slice::from_raw_parts(start, n)
    }
}

/// `(suite, case index, case name)` of the case running now, if any.
pub fn current_case() -> Option<(&'static str, usize, &'static str)> {
    let s = CURRENT_SUITE.load(Ordering::Acquire);
    let c = CURRENT_CASE.load(Ordering::Acquire);
    if s.is_null() {
        return None;
    }
    // SAFETY: only ever set to an element of `all_suites()`, which is 'static.
    let suite: &'static Suite = unsafe { &*s };
    suite.cases.get(c).map(|case| (suite.name, c + 1, case.name))
}

fn emit(s: &str) {
    crate::print!("{s}");
}

/// Run every selected suite and print the KTAP report; `header` runs right after the version
/// line and plan (for the boot-time diagnostic). Returns the case totals.
pub fn run_all(filter: &Filter, header: impl FnOnce()) -> Totals {
    let mut suites: Vec<&'static Suite> = all_suites().iter().collect();
    crate::sort::sort_small_by_key(&mut suites, |s| s.name);
    let selected: Vec<(&'static Suite, Vec<usize>)> = suites
        .into_iter()
        .map(|s| (s, (0..s.cases.len()).filter(|&i| filter.selects(s.name, s.cases[i].name)).collect::<Vec<_>>()))
        .filter(|(_, cases)| !cases.is_empty())
        .collect();

    crate::println!("KTAP version 1");
    crate::println!("1..{}", selected.len());
    header();
    let mut totals = Totals::default();
    for (n, (suite, cases)) in selected.iter().enumerate() {
        crate::println!("    KTAP version 1");
        crate::println!("    # Subtest: {}", suite.name);
        crate::println!("    1..{}", cases.len());
        let mut st = Totals::default();
        for (k, &i) in cases.iter().enumerate() {
            let case = &suite.cases[i];
            CURRENT_SUITE.store(*suite as *const Suite as *mut Suite, Ordering::Release);
            CURRENT_CASE.store(i, Ordering::Release);
            let r = (case.run)();
            CURRENT_SUITE.store(core::ptr::null_mut(), Ordering::Release);
            let r = unexpected_dma_debug_reports(r);
            st.add(&r);
            let mut line = String::new();
            let _ = write_result(&mut line, "    ", k + 1, case.name, &r);
            emit(&line);
        }
        crate::println!("# {}: pass:{} fail:{} skip:{} total:{}", suite.name, st.passed, st.failed, st.skipped, cases.len());
        let (ok, all_skipped) = st.suite_directive();
        match (ok, all_skipped) {
            (true, true) => crate::println!("ok {} {} # SKIP every case skipped", n + 1, suite.name),
            (true, false) => crate::println!("ok {} {}", n + 1, suite.name),
            (false, _) => crate::println!("not ok {} {}", n + 1, suite.name),
        }
        totals.passed += st.passed;
        totals.failed += st.failed;
        totals.skipped += st.skipped;
    }
    totals
}

/// A case that leaves dma-debug reports it did not take (see `dma::debug::take_reports`) made a
/// DMA API mistake: it fails, whatever it checked itself. The reports were printed when made.
fn unexpected_dma_debug_reports(r: super::TestResult) -> super::TestResult {
    let n = crate::dma::debug::take_reports().len();
    match (n, r) {
        (0, r) => r,
        (n, Err(super::NotPassed::Fail(m))) => Err(super::NotPassed::Fail(alloc::format!("{m}; and {n} dma-debug report(s)"))),
        (n, _) => Err(super::NotPassed::Fail(alloc::format!("{n} dma-debug report(s) (see the `# dma-debug:` lines above)"))),
    }
}
