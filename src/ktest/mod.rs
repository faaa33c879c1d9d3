//! In-kernel tests, reported in KTAP version 1 (Linux Documentation/dev-tools/ktap.rst).
//!
//! A suite is declared next to the code it tests with [`ktest_suite!`]; the macro places a
//! [`Suite`] in the `.ktest_suites` linker section, which the runner walks. No nightly features.
//!
//! Output, one suite per nested KTAP block, readable by Linux's `kunit.py parse`:
//! ```text
//! KTAP version 1
//! 1..2
//!     KTAP version 1
//!     # Subtest: cma
//!     1..3
//!     ok 1 alloc_aligned
//!     # fallback: CMA disabled by cma=0
//!     ok 2 fallback # SKIP CMA disabled by cma=0
//!     not ok 3 exhaustion
//! not ok 1 cma
//! ```
//! A case returns `Ok(())`, or `Err(Fail(message))`, or `Err(Skip(reason))`; the assertion macros
//! build the message with the file and line.

use alloc::string::String;
use core::fmt::{self, Write};

#[cfg(not(target_os = "none"))]
pub mod parse;
#[cfg(target_os = "none")]
mod runner;
#[cfg(target_os = "none")]
pub use runner::{current_case, run_all};

/// Why a case did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotPassed {
    Fail(String),
    Skip(String),
}

pub type TestResult = Result<(), NotPassed>;

/// One test case: a function that checks one behaviour.
pub struct Case {
    pub name: &'static str,
    pub run: fn() -> TestResult,
}

/// A named group of cases.
pub struct Suite {
    pub name: &'static str,
    pub cases: &'static [Case],
}

/// Declare a suite of cases (functions `fn() -> TestResult` in scope) and register it.
#[macro_export]
macro_rules! ktest_suite {
    ($suite:literal, [$($case:ident),* $(,)?]) => {
        #[cfg(target_os = "none")]
        #[used]
        #[link_section = ".ktest_suites"]
        static KTEST_SUITE: $crate::ktest::Suite = $crate::ktest::Suite {
            name: $suite,
            cases: &[$($crate::ktest::Case { name: stringify!($case), run: $case }),*],
        };
    };
}

/// Fail the case unless `cond` holds.
#[macro_export]
macro_rules! kassert {
    ($cond:expr) => {
        if !$cond {
            return Err($crate::ktest::fail_str(file!(), line!(), concat!("assertion failed: ", stringify!($cond))));
        }
    };
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::ktest::fail(file!(), line!(), format_args!($($arg)+)));
        }
    };
}

/// Fail the case unless the two values are equal; prints both.
#[macro_export]
macro_rules! kassert_eq {
    ($left:expr, $right:expr) => {
        match (&$left, &$right) {
            (l, r) => {
                if l != r {
                    return Err($crate::ktest::fail_eq(file!(), line!(), concat!(stringify!($left), " == ", stringify!($right), " failed"), l, r));
                }
            }
        }
    };
    ($left:expr, $right:expr, $($arg:tt)+) => {
        match (&$left, &$right) {
            (l, r) => {
                if l != r {
                    return Err($crate::ktest::fail_eq_msg(file!(), line!(), l, r, format_args!($($arg)+)));
                }
            }
        }
    };
}

/// Skip the case with a reason.
#[macro_export]
macro_rules! kskip {
    ($($arg:tt)+) => {
        return Err($crate::ktest::skip(format_args!($($arg)+)))
    };
}

/// Unwrap a `Result`, failing the case with the error's Display on `Err`.
#[macro_export]
macro_rules! ktry {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(err) => {
                return Err($crate::ktest::fail_display(file!(), line!(), stringify!($e), &err));
            }
        }
    };
}

// The failure paths of the macros above are out of line, cold and take their values as trait
// objects, so that each of the hundreds of assertion sites costs a call rather than an inlined
// formatting sequence, and there is one copy per helper rather than one per asserted type.
// (`file!()`/`line!()` are passed explicitly: `#[track_caller]` would add a relocated `Location`
// per site, which costs more in this position-independent image than the two arguments.)

/// `file:line: message`.
#[doc(hidden)]
#[cold]
#[inline(never)]
pub fn fail(file: &str, line: u32, args: fmt::Arguments) -> NotPassed {
    let mut s = String::new();
    let _ = write!(s, "{file}:{line}: {args}");
    NotPassed::Fail(s)
}

#[doc(hidden)]
#[cold]
#[inline(never)]
pub fn fail_str(file: &str, line: u32, msg: &str) -> NotPassed {
    fail(file, line, format_args!("{msg}"))
}

#[doc(hidden)]
#[cold]
#[inline(never)]
pub fn fail_eq<L: fmt::Debug, R: fmt::Debug>(file: &str, line: u32, what: &str, left: L, right: R) -> NotPassed {
    fail(file, line, format_args!("{what}: {left:?} != {right:?}"))
}

#[doc(hidden)]
#[cold]
#[inline(never)]
pub fn fail_eq_msg<L: fmt::Debug, R: fmt::Debug>(file: &str, line: u32, left: L, right: R, msg: fmt::Arguments) -> NotPassed {
    fail(file, line, format_args!("{left:?} != {right:?}: {msg}"))
}

#[doc(hidden)]
#[cold]
#[inline(never)]
pub fn fail_display<E: fmt::Display>(file: &str, line: u32, what: &str, err: E) -> NotPassed {
    fail(file, line, format_args!("{what}: {err}"))
}

#[doc(hidden)]
#[cold]
#[inline(never)]
pub fn skip(args: fmt::Arguments) -> NotPassed {
    NotPassed::Skip(alloc::fmt::format(args))
}

/// Which cases `ktest.filter` selects: a comma-separated list of globs, each matched against the
/// suite name (selecting the whole suite) and against `suite.case`.
pub struct Filter<'a> {
    globs: Option<&'a str>,
}

impl<'a> Filter<'a> {
    pub fn new(globs: Option<&'a str>) -> Self {
        Filter { globs }
    }

    pub fn selects(&self, suite: &str, case: &str) -> bool {
        let Some(globs) = self.globs else { return true };
        globs.split(',').filter(|g| !g.is_empty()).any(|g| {
            crate::bootargs::glob_match(g, suite) || {
                let mut full = String::with_capacity(suite.len() + case.len() + 1);
                full.push_str(suite);
                full.push('.');
                full.push_str(case);
                crate::bootargs::glob_match(g, &full)
            }
        })
    }
}

/// Case and suite totals.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Totals {
    pub fn add(&mut self, r: &TestResult) {
        match r {
            Ok(()) => self.passed += 1,
            Err(NotPassed::Fail(_)) => self.failed += 1,
            Err(NotPassed::Skip(_)) => self.skipped += 1,
        }
    }

    /// The result line of a suite: `not ok` if any case failed, `# SKIP` if every case skipped.
    pub fn suite_directive(&self) -> (bool, bool) {
        (self.failed == 0, self.passed == 0 && self.failed == 0 && self.skipped > 0)
    }
}

/// Write a KTAP result line (`ok N name`, `not ok N name`, `ok N name # SKIP reason`) with the
/// given indentation, preceded by the failure message as `#` diagnostic lines.
pub fn write_result(out: &mut impl Write, indent: &str, n: usize, name: &str, r: &TestResult) -> fmt::Result {
    match r {
        Ok(()) => writeln!(out, "{indent}ok {n} {name}"),
        Err(NotPassed::Fail(msg)) => {
            for line in msg.lines() {
                writeln!(out, "{indent}# {name}: {line}")?;
            }
            writeln!(out, "{indent}not ok {n} {name}")
        }
        Err(NotPassed::Skip(reason)) => writeln!(out, "{indent}ok {n} {name} # SKIP {}", reason.replace('\n', " ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines() {
        let mut s = String::new();
        write_result(&mut s, "    ", 1, "a", &Ok(())).unwrap();
        write_result(&mut s, "    ", 2, "b", &Err(NotPassed::Fail("x.rs:3: boom\nmore".into()))).unwrap();
        write_result(&mut s, "", 3, "c", &Err(NotPassed::Skip("no CMA".into()))).unwrap();
        assert_eq!(s, "    ok 1 a\n    # b: x.rs:3: boom\n    # b: more\n    not ok 2 b\nok 3 c # SKIP no CMA\n");
    }

    #[test]
    fn filter_by_suite_and_case() {
        let f = Filter::new(Some("cma,dt.mem*"));
        assert!(f.selects("cma", "anything"));
        assert!(f.selects("dt", "memory_map"));
        assert!(!f.selects("dt", "bootargs"));
        assert!(!f.selects("buddy", "x"));
        assert!(Filter::new(None).selects("any", "case"));
        assert!(Filter::new(Some("*.alloc_?")).selects("cma", "alloc_1"));
    }

    #[test]
    fn suite_directive() {
        let mut t = Totals::default();
        t.add(&Err(NotPassed::Skip("s".into())));
        assert_eq!(t.suite_directive(), (true, true));
        t.add(&Ok(()));
        assert_eq!(t.suite_directive(), (true, false));
        t.add(&Err(NotPassed::Fail("f".into())));
        assert_eq!(t.suite_directive(), (false, false));
    }
}
