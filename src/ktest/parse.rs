//! A KTAP reader for the host side: the QEMU test harness and the hardware-in-the-loop runner read
//! the kernel's console with it. It follows Documentation/dev-tools/ktap.rst as far as dmakern
//! emits it (one level of nested suites) and tolerates boot noise before the version line.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    Skip(String),
}

/// One test case result, with the diagnostics printed for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    pub suite: String,
    pub name: String,
    pub status: Status,
    pub diagnostics: Vec<String>,
}

/// What a console log says.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub has_header: bool,
    /// The top-level plan (number of suites), if printed.
    pub plan: Option<usize>,
    /// Top-level suite results in order: (name, ok).
    pub suites: Vec<(String, bool)>,
    pub cases: Vec<CaseResult>,
    /// `(passed, failed, skipped)` from the kernel's `dmakern: N passed, N failed, N skipped` line.
    pub summary: Option<(usize, usize, usize)>,
    /// The reason after `Bail out!`, if the kernel gave up (a crash in a test).
    pub bail_out: Option<String>,
    /// `# bench <name> <metric>=<value> <unit>` lines.
    pub bench: Vec<String>,
}

impl Report {
    pub fn failed_cases(&self) -> impl Iterator<Item = &CaseResult> {
        self.cases.iter().filter(|c| c.status == Status::Fail)
    }

    /// Problems that make the run a failure, each as a sentence; empty when the run passed.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.has_header {
            p.push("no `KTAP version 1` header".to_string());
        }
        match self.plan {
            None => p.push("no KTAP plan".to_string()),
            Some(n) if n != self.suites.len() && self.bail_out.is_none() => {
                p.push(alloc::format!("plan says {n} suites, {} reported", self.suites.len()))
            }
            _ => {}
        }
        for c in self.failed_cases() {
            let why = c.diagnostics.last().cloned().unwrap_or_default();
            p.push(alloc::format!("not ok: {}.{} {}", c.suite, c.name, why));
        }
        for (s, ok) in &self.suites {
            if !ok && !self.cases.iter().any(|c| &c.suite == s && c.status == Status::Fail) {
                p.push(alloc::format!("suite {s} reported not ok"));
            }
        }
        if let Some(b) = &self.bail_out {
            p.push(alloc::format!("Bail out! {b}"));
        }
        match self.summary {
            None => p.push("no `dmakern: N passed, N failed, N skipped` summary line".to_string()),
            Some((_, f, _)) if f > 0 => p.push(alloc::format!("summary reports {f} failed")),
            _ => {}
        }
        p
    }
}

fn parse_result(line: &str) -> Option<(bool, &str, Option<&str>)> {
    let (ok, rest) = if let Some(r) = line.strip_prefix("ok ") {
        (true, r)
    } else if let Some(r) = line.strip_prefix("not ok ") {
        (false, r)
    } else {
        return None;
    };
    let (_num, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    match rest.split_once(" # ") {
        Some((name, directive)) => Some((ok, name.trim(), Some(directive.trim()))),
        None => Some((ok, rest.trim(), None)),
    }
}

fn parse_summary(line: &str) -> Option<(usize, usize, usize)> {
    let rest = line.strip_prefix("dmakern: ")?;
    let mut nums = rest.split(", ").map(|part| part.split(' ').next().and_then(|n| n.parse::<usize>().ok()));
    Some((nums.next()??, nums.next()??, nums.next()??))
}

/// Parse a whole console log.
pub fn parse(log: &str) -> Report {
    let mut r = Report::default();
    let mut suite = String::new();
    let mut diags: Vec<String> = Vec::new();
    for raw in log.lines() {
        let line = raw.trim_end_matches('\r');
        if !r.has_header {
            if line.trim() == "KTAP version 1" {
                r.has_header = true;
            }
            continue;
        }
        if let Some(s) = parse_summary(line) {
            r.summary = Some(s);
            continue;
        }
        if let Some(reason) = line.trim_start().strip_prefix("Bail out!") {
            r.bail_out = Some(reason.trim().to_string());
            continue;
        }
        let nested = line.starts_with("    ");
        let t = line.trim_start();
        if !nested {
            if let Some(b) = t.strip_prefix("# bench ") {
                r.bench.push(b.to_string());
                continue;
            }
            if r.plan.is_none() {
                if let Some(n) = t.strip_prefix("1..").and_then(|n| n.parse().ok()) {
                    r.plan = Some(n);
                    continue;
                }
            }
            if let Some((ok, name, _)) = parse_result(t) {
                r.suites.push((name.to_string(), ok));
                suite.clear();
            }
            continue;
        }
        if let Some(name) = t.strip_prefix("# Subtest: ") {
            suite = name.trim().to_string();
            diags.clear();
        } else if let Some(d) = t.strip_prefix("# ") {
            diags.push(d.to_string());
        } else if let Some((ok, name, directive)) = parse_result(t) {
            let status = match (ok, directive) {
                (true, Some(d)) if d.starts_with("SKIP") => Status::Skip(d.trim_start_matches("SKIP").trim().to_string()),
                (true, _) => Status::Pass,
                (false, _) => Status::Fail,
            };
            r.cases.push(CaseResult { suite: suite.clone(), name: name.to_string(), status, diagnostics: core::mem::take(&mut diags) });
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "boot noise\r\nKTAP version 1\r\n1..2\r\n    KTAP version 1\r\n    # Subtest: a\r\n    1..2\r\n    ok 1 x\r\n    # y: src/a.rs:3: bad\r\n    not ok 2 y\r\n# a: pass:1 fail:1 skip:0 total:2\r\nnot ok 1 a\r\n    KTAP version 1\r\n    # Subtest: b\r\n    1..1\r\n    ok 1 z # SKIP no device\r\nok 2 b # SKIP every case skipped\r\n# bench map_4k mean=57 ns\r\ndmakern: 1 passed, 1 failed, 1 skipped\r\n";

    #[test]
    fn parses_suites_cases_and_summary() {
        let r = parse(LOG);
        assert!(r.has_header);
        assert_eq!(r.plan, Some(2));
        assert_eq!(r.suites, vec![("a".to_string(), false), ("b".to_string(), true)]);
        assert_eq!(r.cases.len(), 3);
        assert_eq!(r.cases[1].status, Status::Fail);
        assert_eq!(r.cases[1].diagnostics, vec!["y: src/a.rs:3: bad".to_string()]);
        assert_eq!(r.cases[2].status, Status::Skip("no device".into()));
        assert_eq!(r.summary, Some((1, 1, 1)));
        assert_eq!(r.bench, vec!["map_4k mean=57 ns".to_string()]);
        let p = r.problems();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("a.y"));
    }

    #[test]
    fn missing_pieces_are_problems() {
        assert_eq!(parse("").problems().len(), 3);
        let crash = "KTAP version 1\n1..1\n    KTAP version 1\n    # Subtest: a\n    1..1\nunexpected exception\n    not ok 1 x\nBail out! exception\n";
        let p = parse(crash).problems();
        assert!(p.iter().any(|s| s.contains("Bail out")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("summary")), "{p:?}");
    }

    #[test]
    fn passing_run_has_no_problems() {
        let ok = "KTAP version 1\n1..1\n    KTAP version 1\n    # Subtest: a\n    1..1\n    ok 1 x\nok 1 a\ndmakern: 1 passed, 0 failed, 0 skipped\n";
        assert!(parse(ok).problems().is_empty());
    }
}
