//! Runs every libFuzzer target of `fuzz/` (the device-tree layer, memory map, CMA placement,
//! bootargs, dma-ranges) for a bounded time, one after the other, and fails on any crash, panic,
//! arithmetic overflow, timeout (an input running over 2 s: a hang) or out-of-memory, naming the
//! target and the input libFuzzer saved.
//!
//! Time per target: `DMAKERN_FUZZ_SECONDS`, else 60 s in CI (`CI=true`) and 10 s elsewhere; 0
//! skips the run (refused in CI). Needs a nightly toolchain and cargo-fuzz (`.ci/run` installs
//! both); without them the test fails in CI and is skipped elsewhere, saying so on stderr either
//! way. New inputs go to a scratch corpus under `target/tmp/fuzz/`, emptied at each run, so the
//! committed seeds in `fuzz/corpus/` stay as they are. See `fuzz/README.md` for long runs.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Each target and its seed directories under `fuzz/corpus/` (those that exist are used).
const TARGETS: [(&str, &[&str]); 5] = [
    ("dt_queries", &["dt_queries", "dtb"]),
    ("memmap", &["memmap", "dtb"]),
    ("cma_placement", &["cma_placement", "dtb"]),
    ("dma_ranges", &["dma_ranges", "dtb"]),
    ("bootargs", &["bootargs"]),
];

/// libFuzzer's per-input limit: an input running longer counts as a hang.
const INPUT_TIMEOUT_SECONDS: u64 = 2;

/// Extra time a target may take beyond its fuzzing time (start-up, loading the seeds) before the
/// test gives up on it.
const GRACE_SECONDS: u64 = 120;

/// Sanitizer flag for every cargo-fuzz invocation, so that build and runs share one build. The
/// code under test is safe Rust (bounds and overflow checks do the detecting): AddressSanitizer
/// would only make it 2-4 times slower.
const SANITIZER: &str = "--sanitizer=none";

/// Says something on the real stderr, past the test harness's output capture, so that notes and
/// progress show in a normal `cargo test` run.
fn note(msg: &str) {
    let _ = writeln!(std::io::stderr(), "fuzz: {msg}");
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// `rustup run nightly cargo <args>` in the repository root, with the environment `cargo test`
/// gives this test (toolchain, target dir, flags of the main crate) removed, so the fuzz
/// workspace is built by nightly with its own settings into `fuzz/target`.
fn nightly_cargo(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .args(args)
        .current_dir(root);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTC",
        "RUSTDOC",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Why the fuzz run cannot happen here, if it cannot.
fn missing_tools(root: &Path) -> Option<String> {
    let works = |args: &[&str]| {
        nightly_cargo(root, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !works(&["--version"]) {
        return Some(
            "no nightly toolchain (or no rustup): install it with \
             `rustup toolchain install nightly --profile minimal`"
                .into(),
        );
    }
    if !works(&["fuzz", "--version"]) {
        return Some(
            "cargo-fuzz missing: install it with `cargo install cargo-fuzz --locked`".into(),
        );
    }
    None
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What a failed libFuzzer run reported: the error and panic lines and the saved input.
fn finding(log: &str) -> String {
    let mut out = Vec::new();
    let lines: Vec<&str> = log.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("panicked at") {
            out.push(line.trim().to_string());
            if let Some(msg) = lines.get(i + 1) {
                out.push(format!("  {}", msg.trim()));
            }
        } else if line.contains("ERROR: libFuzzer:") || line.starts_with("SUMMARY:") {
            out.push(line.trim().to_string());
        } else if let Some((_, path)) = line.split_once("Test unit written to ") {
            out.push(format!("input saved as {}", path.trim()));
        }
    }
    out.join("\n")
}

/// `stat::number_of_executed_units` from libFuzzer's final statistics.
fn executions(log: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs one target; `Err` describes a finding or a failure to run.
fn run_target(
    root: &Path,
    scratch: &Path,
    target: &str,
    seeds: &[&str],
    seconds: u64,
) -> Result<String, String> {
    let corpus = scratch.join(target);
    let _ = fs::remove_dir_all(&corpus);
    fs::create_dir_all(&corpus).map_err(|e| format!("cannot create {}: {e}", corpus.display()))?;
    let log_path = scratch.join(format!("{target}.log"));
    let log = fs::File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let err_log = log.try_clone().map_err(|e| e.to_string())?;

    // libFuzzer writes new inputs into the first directory only: the scratch one.
    let mut dirs = vec![corpus.display().to_string()];
    for s in seeds {
        let d = root.join("fuzz/corpus").join(s);
        if d.is_dir() {
            dirs.push(d.display().to_string());
        }
    }
    let max_time = format!("-max_total_time={seconds}");
    let timeout = format!("-timeout={INPUT_TIMEOUT_SECONDS}");
    let mut args = vec!["fuzz", "run", SANITIZER, target];
    args.extend(dirs.iter().map(String::as_str));
    args.extend(["--", &max_time, &timeout, "-print_final_stats=1"]);

    let start = Instant::now();
    let mut child = nightly_cargo(root, &args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log)
        .spawn()
        .map_err(|e| format!("cannot start cargo fuzz: {e}"))?;
    let limit = Duration::from_secs(seconds + GRACE_SECONDS);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        sleep(Duration::from_millis(200));
    };
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => Ok(format!(
            "{target}: {} s, {} inputs run, no findings",
            start.elapsed().as_secs(),
            executions(&text).map_or("?".into(), |n| n.to_string())
        )),
        Some(s) => {
            let found = finding(&text);
            let detail = if found.is_empty() {
                tail(&text, 30)
            } else {
                found
            };
            Err(format!(
                "{target}: cargo fuzz exited with {s}\n{detail}\nfull log: {}",
                log_path.display()
            ))
        }
        None => Err(format!(
            "{target}: still running after {} s, killed\n{}\nfull log: {}",
            limit.as_secs(),
            tail(&text, 20),
            log_path.display()
        )),
    }
}

#[test]
fn fuzz_targets_run_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ci = in_ci();
    let seconds = match std::env::var("DMAKERN_FUZZ_SECONDS") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("DMAKERN_FUZZ_SECONDS={v:?} is not a number of seconds")),
        Err(_) if ci => 60,
        Err(_) => 10,
    };
    if seconds == 0 {
        assert!(
            !ci,
            "DMAKERN_FUZZ_SECONDS=0 in CI: the fuzz run is part of CI and may not be skipped"
        );
        note("DMAKERN_FUZZ_SECONDS=0: fuzz run skipped");
        return;
    }
    if let Some(why) = missing_tools(root) {
        assert!(!ci, "cannot run the fuzz targets in CI: {why}");
        note(&format!("SKIPPED, {why}"));
        return;
    }

    note("building the fuzz targets (nightly, cargo-fuzz)");
    let build = nightly_cargo(root, &["fuzz", "build", SANITIZER])
        .stdin(Stdio::null())
        .output()
        .expect("cargo fuzz build did not start");
    assert!(
        build.status.success(),
        "cargo fuzz build failed:\n{}",
        tail(&String::from_utf8_lossy(&build.stderr), 40)
    );

    let scratch: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz");
    let mut failures = Vec::new();
    for (target, seeds) in TARGETS {
        note(&format!("running {target} for {seconds} s"));
        match run_target(root, &scratch, target, seeds, seconds) {
            Ok(summary) => note(&summary),
            Err(failure) => {
                note(&failure);
                failures.push(failure);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "fuzz findings:\n\n{}",
        failures.join("\n\n")
    );
}
