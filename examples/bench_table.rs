//! The benchmark table: `./qemu-run.sh --bench [--arch aarch64|armv7|all] [--update-baseline]`
//! runs this (`cargo run --example bench_table -- ...` with the same options). It boots every
//! benchmark configuration of the chosen architectures under `--icount` (`tests/common/bench.rs`),
//! prints one table of the counts with the targets and Linux's figures, and then compares the
//! counts with the committed baseline as `cargo test` does.
//!
//! `--update-baseline` (all architectures only) is the deliberate step that accepts the counts:
//! it rewrites `tests/bench-baseline.txt` and the README's table from this run, and lists what
//! changed against the old baseline.
//!
//! Exit status: 0; 1 when a configuration failed to boot or to report, or (without
//! `--update-baseline`) when a count regressed more than 10% or went missing; 2 for bad arguments.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use common::bench::{
    baseline_path, command, compare, format_baseline, parse_baseline, parse_targets, replace_readme_table, run_config, table,
    targets_path, Config, Env, CONFIGS, TOLERANCE_PERCENT, UPDATE_COMMAND,
};
use common::root;

struct Args {
    /// `aarch64`, `armv7` or `all`.
    arch: String,
    update: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args { arch: "all".to_string(), update: false };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--arch" => parsed.arch = args.next().ok_or("--arch needs a value")?,
            "--update-baseline" => parsed.update = true,
            _ => return Err(format!("unknown option `{a}` (options: --arch aarch64|armv7|all, --update-baseline)")),
        }
    }
    if !matches!(parsed.arch.as_str(), "aarch64" | "armv7" | "all") {
        return Err(format!("--arch must be aarch64, armv7 or all, not `{}`", parsed.arch));
    }
    if parsed.update && parsed.arch != "all" {
        return Err("--update-baseline rewrites the baseline of every configuration: give no --arch (or --arch all)".into());
    }
    Ok(parsed)
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs, prints, compares; `Ok(false)` when the baseline check failed.
fn run(args: &Args) -> Result<bool, String> {
    let configs: Vec<&Config> = CONFIGS.iter().filter(|c| args.arch == "all" || c.arch == args.arch).collect();
    let targets = parse_targets(&read(&targets_path())?)?;
    // Without a baseline the table is still printed; the check then fails, and
    // --update-baseline makes the first one.
    let baseline = match read(&baseline_path()) {
        Ok(text) => Some(parse_baseline(&text)?),
        Err(e) => {
            eprintln!("bench: no baseline ({e})");
            None
        }
    };
    let mut fresh = Vec::new();
    for c in &configs {
        eprintln!("bench: {}: {}", c.name, command(c));
        fresh.extend(run_config(c)?);
    }
    let env = Env::probe(&configs);
    let table = table(&fresh, &configs, &targets, &env);
    println!("{table}");
    let cmp = compare(baseline.as_ref().unwrap_or(&BTreeMap::new()), &fresh, |name| configs.iter().any(|c| c.name == name));

    if args.update {
        write(&baseline_path(), &format_baseline(&fresh, &env))?;
        let readme_path = root().join("README.md");
        write(&readme_path, &replace_readme_table(&read(&readme_path)?, &table)?)?;
        print!("{cmp}");
        println!("Wrote {} and the table in {}.", baseline_path().display(), readme_path.display());
        return Ok(true);
    }
    let Some(_) = baseline else {
        println!("Baseline check FAILED: no {}; make it with {UPDATE_COMMAND}.", baseline_path().display());
        return Ok(false);
    };
    print!("{cmp}");
    if cmp.failed() {
        println!(
            "Baseline check FAILED against {}: see above. If the change is deliberate, accept it with {UPDATE_COMMAND}.",
            baseline_path().display()
        );
        return Ok(false);
    }
    println!("Baseline check passed: no count more than {TOLERANCE_PERCENT}% above {}.", baseline_path().display());
    Ok(true)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_table: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench_table: {e}");
            ExitCode::from(1)
        }
    }
}
