//! The LAVA job definitions (tests/hil/lava/*.yaml), checked without a LAVA lab:
//! - every job validates against lava-common's schema (Debian's lava-common: what lava-server runs
//!   at submission), and broken variants of a job are refused, so the validator is really at work;
//! - the `monitors` test action, replayed by tests/hil/lava/lava-check.py through pexpect the way
//!   lava-dispatcher reads a console (also through a pty and with lines split between reads), turns
//!   exactly the KTAP result lines into test cases: checked against a model written here on a
//!   synthetic report (failures, skips, a bail-out) and on the kernel's real output;
//! - the qemu jobs' QEMU command line, as LAVA's qemu device type builds it, boots the kernel to a
//!   passing run.
//!
//! Running the jobs with lava-run itself would need lava-dispatcher, which pulls in about 160 Debian
//! packages (libguestfs, systemd-sysv, another QEMU): more than CI's time allows.
//!
//! A test skips (passes, saying why) only when lava-check.py reports a missing Python module
//! (status 77: lava-common, python3-yaml or python3-pexpect not installed); CI installs them.

mod common;

use common::{boot, build, root};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lava_dir() -> PathBuf {
    root().join("tests/hil/lava")
}

fn out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn jobs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(lava_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

/// Run lava-check.py; `None` (after printing why) when it cannot run here.
fn lava_check(args: &[&str]) -> Option<Output> {
    let script = lava_dir().join("lava-check.py");
    let out = match Command::new(&script).args(args).output() {
        Ok(out) => out,
        Err(e) => {
            println!("SKIP: cannot run {} ({e}; it needs /usr/bin/python3)", script.display());
            return None;
        }
    };
    if out.status.code() == Some(77) {
        println!("SKIP: {}", text(&out.stderr).trim());
        return None;
    }
    Some(out)
}

/// LAVA's name for a test case: trimmed, lower case, each run of non-word characters as one '_'.
fn lava_case(name: &str) -> String {
    let mut out = String::new();
    let mut in_run = false;
    for c in name.trim().to_lowercase().chars() {
        if c.is_alphanumeric() || c == '_' {
            out.push(c);
            in_run = false;
        } else if !in_run {
            out.push('_');
            in_run = true;
        }
    }
    out
}

/// The model: the (case, result) LAVA must record for a console log. Between the first
/// `KTAP version 1` line and the summary (or a bail-out), every line that is, after its
/// indentation, `ok N name` or `not ok N name` (KTAP's optional "- " before the name), with a
/// `# SKIP` directive making it a skip.
fn expected_results(log: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut started = false;
    for line in log.lines() {
        let l = line.trim_end_matches('\r').trim_start_matches([' ', '\t']);
        if !started {
            started = l == "KTAP version 1";
            continue;
        }
        if l.starts_with("dmakern: ") && l.ends_with(" skipped") || l.starts_with("Bail out!") {
            break;
        }
        let (result, rest) = match (l.strip_prefix("not ok "), l.strip_prefix("ok ")) {
            (Some(rest), _) => ("fail", rest),
            (None, Some(rest)) => ("pass", rest),
            _ => continue,
        };
        let Some((number, rest)) = rest.split_once(' ') else { continue };
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let rest = rest.strip_prefix("- ").unwrap_or(rest);
        let (name, directive) = match rest.split_once('#') {
            Some((name, directive)) => (name, directive.trim()),
            None => (rest, ""),
        };
        let result = if directive.starts_with("SKIP") { "skip" } else { result };
        out.push((lava_case(name), result.to_string()));
    }
    out
}

/// What lava-check.py's monitor replay recorded: (case, result) in order.
fn replay(job: &Path, log: &Path, how: &[&str]) -> Option<Result<Vec<(String, String)>, String>> {
    let mut args = vec!["monitor", job.to_str().unwrap(), log.to_str().unwrap()];
    args.extend_from_slice(how);
    let out = lava_check(&args)?;
    if !out.status.success() {
        return Some(Err(text(&out.stderr)));
    }
    let results = text(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 3, "lava-check.py output line: {l}");
            assert_eq!(f[0], "dmakern-ktap", "monitor name");
            (f[1].to_string(), f[2].to_string())
        })
        .collect();
    Some(Ok(results))
}

/// Both ways a dispatcher may see the console: through a pty (QEMU under LAVA: "\r\r\n") with
/// pexpect's default read size, and as raw bytes in 13-byte reads (lines split between reads).
const FEEDS: [&[&str]; 2] = [&["--pty", "--maxread", "97"], &["--maxread", "13"]];

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(c, r)| (c.to_string(), r.to_string())).collect()
}

fn write_log(name: &str, log: &str) -> PathBuf {
    let path = out_dir().join(name);
    std::fs::write(&path, log).unwrap();
    path
}

#[test]
fn jobs_cover_the_device_types_and_validate() {
    let jobs = jobs();
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for job in &jobs {
        let yaml = std::fs::read_to_string(job).unwrap();
        let t = yaml
            .lines()
            .find_map(|l| l.strip_prefix("device_type: "))
            .unwrap_or_else(|| panic!("{}: no device_type", job.display()));
        *types.entry(t.to_string()).or_default() += 1;
        if t.starts_with("bcm") {
            // The Pi jobs boot the image as an arm64 Image with the board's upstream DTB.
            assert!(yaml.contains("      type: image\n"), "{}: kernel type image", job.display());
            assert!(yaml.contains(&format!("/{t}.dtb\n")), "{}: the DTB must be Debian's {t}.dtb", job.display());
            assert!(yaml.contains("    - booti {KERNEL_ADDR} - {DTB_ADDR}\n"), "{}: booti", job.display());
        }
    }
    let want: BTreeMap<String, usize> =
        [("qemu", 2), ("bcm2837-rpi-3-b", 1), ("bcm2711-rpi-4-b", 1)].map(|(t, n)| (t.to_string(), n)).into();
    assert_eq!(types, want, "device types of tests/hil/lava/*.yaml");

    let paths: Vec<&str> = jobs.iter().map(|p| p.to_str().unwrap()).collect();
    let mut args = vec!["validate"];
    args.extend(&paths);
    let Some(out) = lava_check(&args) else { return };
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "lava-common refused a job:\n{stdout}{}", text(&out.stderr));
    for p in &paths {
        assert!(stdout.lines().any(|l| l.starts_with(&format!("{p}: valid ("))), "{p} not reported valid:\n{stdout}");
    }
}

#[test]
fn broken_jobs_are_refused() {
    let good = std::fs::read_to_string(lava_dir().join("qemu-aarch64.yaml")).unwrap();
    let pattern_line = good.lines().find(|l| l.trim_start().starts_with("pattern: ")).unwrap().to_string() + "\n";
    let breakages: [(&str, String); 5] = [
        ("no pattern", good.replace(&pattern_line, "")),
        ("unknown monitor key", good.replace("    - name: dmakern-ktap\n", "    - name: dmakern-ktap\n      colour: blue\n")),
        ("bad fixupdict value", good.replace("        ok: pass\n", "        ok: passed\n")),
        ("no test_case_id group", good.replace("(?P<test_case_id>", "(")),
        ("no job timeout", good.replace("  job:\n    minutes: 10\n", "")),
    ];
    for (what, yaml) in breakages {
        assert_ne!(yaml, good, "{what}: the edit did not apply");
        let path = write_log(&format!("broken-{}.yaml", what.replace(' ', "-")), &yaml);
        let Some(out) = lava_check(&["validate", path.to_str().unwrap()]) else { return };
        assert_eq!(out.status.code(), Some(1), "{what}: accepted:\n{}", text(&out.stdout));
        assert!(text(&out.stdout).contains(": invalid: "), "{what}: {}", text(&out.stdout));
    }
}

#[test]
fn every_job_has_the_same_monitor() {
    let monitor = |p: &Path| {
        let yaml = std::fs::read_to_string(p).unwrap();
        yaml[yaml.find("- test:\n").unwrap_or_else(|| panic!("{}: no test action", p.display()))..].to_string()
    };
    let jobs = jobs();
    let first = monitor(&jobs[0]);
    for job in &jobs[1..] {
        assert_eq!(monitor(job), first, "{} and {} differ in their test action", job.display(), jobs[0].display());
    }
}

/// A report with every kind of line: nested and top-level failures and skips, KTAP's "- " before a
/// name, diagnostics and boot noise that mention `ok`, a result line after the summary.
const SYNTHETIC: &str = "\
boot: ok 99 before_the_header\r
KTAP version 1\r
1..3\r
# ok 1 in_a_diagnostic\r
    KTAP version 1\r
    # Subtest: alpha\r
    1..4\r
    ok 1 first\r
    not ok 2 second\r
    # second: expected 4, got 5 (ok 7 nothing)\r
    ok 3 third # SKIP no device\r
    ok 4 - Fourth Case\r
# alpha: pass:2 fail:1 skip:1 total:4\r
not ok 1 alpha\r
    KTAP version 1\r
    # Subtest: beta\r
    1..1\r
    ok 1 only # SKIP every case skipped\r
ok 2 beta # SKIP every case skipped\r
ok 3 gamma\r
dmakern: 3 passed, 2 failed, 2 skipped\r
ok 4 after_the_summary\r
";

const SYNTHETIC_RESULTS: [(&str, &str); 8] = [
    ("first", "pass"),
    ("second", "fail"),
    ("third", "skip"),
    ("fourth_case", "pass"),
    ("alpha", "fail"),
    ("only", "skip"),
    ("beta", "skip"),
    ("gamma", "pass"),
];

#[test]
fn monitor_records_every_result_line_of_a_synthetic_report() {
    assert_eq!(expected_results(SYNTHETIC), pairs(&SYNTHETIC_RESULTS), "the model itself");
    let job = lava_dir().join("qemu-aarch64.yaml");
    let log = write_log("synthetic-ktap.log", SYNTHETIC);
    for how in FEEDS {
        let Some(got) = replay(&job, &log, how) else { return };
        assert_eq!(got.unwrap(), pairs(&SYNTHETIC_RESULTS), "replayed with {how:?}");
    }

    // A crash: the kernel reports the case as failed and bails out; monitoring stops there.
    let crashed = "KTAP version 1\r\n1..2\r\n    KTAP version 1\r\n    # Subtest: alpha\r\n    1..2\r\n\
                   \x20   ok 1 first\r\n    not ok 2 second\r\n# panicked in alpha.second\r\nBail out! panic\r\n";
    let log = write_log("bailed-out-ktap.log", crashed);
    for how in FEEDS {
        let got = replay(&job, &log, how).unwrap();
        assert_eq!(got.unwrap(), pairs(&[("first", "pass"), ("second", "fail")]), "bail-out replayed with {how:?}");
    }

    // A log that stops before the summary (a hang): LAVA's monitor fails at the end of input.
    let log = write_log("truncated-ktap.log", &SYNTHETIC[..SYNTHETIC.find("dmakern: ").unwrap()]);
    let err = replay(&job, &log, FEEDS[1]).unwrap().unwrap_err();
    assert!(err.contains("reached the end of the log"), "{err}");

    // The replay can tell patterns apart: a naive one records the skips as passes.
    let naive_pattern = "      pattern: '(?P<result>ok|not ok) [0-9]+ (?P<test_case_id>\\S+)'";
    let naive = std::fs::read_to_string(&job)
        .unwrap()
        .lines()
        .map(|l| if l.trim_start().starts_with("pattern: ") { naive_pattern } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    let naive_job = write_log("naive-pattern.yaml", &naive);
    let got = replay(&naive_job, &write_log("synthetic-ktap-2.log", SYNTHETIC), FEEDS[0]).unwrap().unwrap();
    assert_ne!(got, pairs(&SYNTHETIC_RESULTS), "a naive pattern must not pass this check");
}

/// The kernel's real report, as the project's KTAP parser also reads it.
fn check_real_report(name: &str, arch: &str, job: &str) {
    let b = boot(name, arch, &[]);
    assert!(b.report.has_header, "{name}: no KTAP report:\n{}", common::tail(&b.log, 20));
    let expected = expected_results(&b.log);
    // The model agrees with the project's parser on how many results and failures there are.
    assert_eq!(expected.len(), b.report.cases.len() + b.report.suites.len(), "{name}: result lines");
    let failed = b.report.failed_cases().count() + b.report.suites.iter().filter(|(_, ok)| !ok).count();
    assert_eq!(expected.iter().filter(|(_, r)| r == "fail").count(), failed, "{name}: failures");
    let log = write_log(&format!("{name}.log"), &b.log);
    for how in FEEDS {
        let Some(got) = replay(&lava_dir().join(job), &log, how) else { return };
        assert_eq!(got.unwrap(), expected, "{name}: replayed with {how:?}");
    }
}

#[test]
fn monitor_records_the_kernels_real_report() {
    check_real_report("lava-monitor-aarch64", "aarch64", "qemu-aarch64.yaml");
    check_real_report("lava-monitor-armv7", "armv7", "qemu-armv7.yaml");
}

#[test]
fn qemu_jobs_boot_the_kernel_as_lava_would() {
    for (job, arch) in [("qemu-aarch64.yaml", "aarch64"), ("qemu-armv7.yaml", "armv7")] {
        build(arch, &[]);
        let image = root().join(format!("target/kernel/dmakern-{arch}.img"));
        let job = lava_dir().join(job);
        let Some(out) = lava_check(&["qemu-command", job.to_str().unwrap(), image.to_str().unwrap()]) else { return };
        assert!(out.status.success(), "{}: {}", job.display(), text(&out.stderr));
        let argv: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
        let run = Command::new("timeout").arg("120").args(&argv).stdin(std::process::Stdio::null()).output().expect("run QEMU");
        let console = text(&run.stdout);
        let why = format!("{}{}", common::tail(&console, 20), text(&run.stderr));
        assert_eq!(run.status.code(), Some(0), "{argv:?}: the kernel's exit status through semihosting:\n{why}");
        let log = write_log(&format!("lava-command-{arch}.log"), &console);
        let got = replay(&job, &log, FEEDS[0]).unwrap().unwrap();
        assert_eq!(got, expected_results(&console), "{}", job.display());
        assert!(got.len() > 20 && got.iter().all(|(_, r)| r != "fail"), "{}: {got:?}", job.display());
    }
}
