//! The benchmark regression guard. `counts_within_tolerance_of_baseline` boots every benchmark
//! configuration (`common::bench::CONFIGS`) under `--icount` and fails when the boot count or a
//! mean exceeds its value in `tests/bench-baseline.txt` by more than 10%, or when a count of the
//! baseline is no longer reported; counts the baseline lacks are reported, not failed. Counts under
//! `--icount` are instruction counts, identical from run to run, so this is not a timing test: a
//! failure is a change in the code. Accepting a change is a deliberate step,
//! `./qemu-run.sh --bench --update-baseline` (README, Performance).
//!
//! The other tests check the reading, the comparison and the table on the host against
//! hand-written expectations, and the committed baseline and targets files for form.

mod common;
use common::bench::*;
use std::collections::BTreeMap;
use std::io::Write as _;

#[test]
fn counts_within_tolerance_of_baseline() {
    let path = baseline_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (make it with {UPDATE_COMMAND})", path.display()));
    let baseline = parse_baseline(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut fresh = Vec::new();
    for c in CONFIGS {
        fresh.extend(run_config(c).unwrap_or_else(|e| panic!("{e}")));
    }
    let cmp = compare(&baseline, &fresh, |_| true);
    if !cmp.new.is_empty() || !cmp.improvements.is_empty() {
        // Straight to stderr: the test harness captures print macros of passing tests, and new
        // or much improved counts are worth seeing (and accepting into the baseline).
        let _ = write!(std::io::stderr(), "bench baseline: not failures, but consider {UPDATE_COMMAND}:\n{cmp}");
    }
    assert!(
        !cmp.failed(),
        "benchmark counts against {}:\n{cmp}If the change is deliberate, accept it with {UPDATE_COMMAND} and commit the baseline.",
        path.display()
    );
}

fn m(config: &str, bench: &str, metric: &str, value: u64) -> Measurement {
    Measurement { key: Key::new(config, bench, metric), value, unit: "ns".into() }
}

const LOG: &str = "dmakern 0.1.0 (aarch64)\r\n\
    KTAP version 1\r\n\
    1..0\r\n\
    # boot: 1129104 ns of virtual time from reset to this header (counter 70569 at 62500000 Hz)\r\n\
    # bench cma_alloc_release_16 mean=409 ns\r\n\
    # bench cma_alloc_release_16 max=542 ns\r\n\
    # cma_alloc_release_16: 4000 alloc+release pairs timed\r\n\
    # bench dma_map_x_4k pair_mean=45 ns\r\n\
    \x20   # bench nested_is_not_a_result mean=1 ns\r\n\
    dmakern: 0 passed, 0 failed, 0 skipped\r\n";

#[test]
fn log_yields_boot_and_bench_counts_in_order() {
    let got = parse_log("cfg", LOG).unwrap();
    let want = vec![
        m("cfg", "boot", "reset_to_header", 1_129_104),
        m("cfg", "cma_alloc_release_16", "mean", 409),
        m("cfg", "cma_alloc_release_16", "max", 542),
        m("cfg", "dma_map_x_4k", "pair_mean", 45),
    ];
    assert_eq!(got, want);
}

#[test]
fn malformed_logs_are_refused() {
    let no_boot = LOG.replace("# boot: ", "# booted: ");
    assert!(parse_log("c", &no_boot).unwrap_err().contains("no `# boot"));
    let bad_boot = LOG.replace("# boot: 1129104", "# boot: lots");
    assert!(parse_log("c", &bad_boot).unwrap_err().contains("malformed `# boot"));
    for bad in ["x mean=abc ns", "x mean ns", "x mean=1", "x =1 ns", "x mean=1 ns extra", "x mean=-1 ns"] {
        let log = LOG.replace("dma_map_x_4k pair_mean=45 ns", bad);
        let e = parse_log("c", &log).unwrap_err();
        assert!(e.contains("malformed bench line"), "{bad}: {e}");
    }
    let twice = LOG.replace("max=542", "mean=542");
    assert_eq!(parse_log("c", &twice).unwrap_err(), "c cma_alloc_release_16 mean reported twice");
}

#[test]
fn only_boot_and_means_are_guarded() {
    assert!(guarded(&Key::new("c", "boot", "reset_to_header")));
    assert!(guarded(&Key::new("c", "x", "mean")));
    assert!(guarded(&Key::new("c", "x", "unmap_mean")));
    assert!(!guarded(&Key::new("c", "x", "max")));
    assert!(!guarded(&Key::new("c", "x", "pair_stddev")));
    assert!(!guarded(&Key::new("c", "x", "meanest")));
}

#[test]
fn comparison_fails_above_ten_percent_and_on_missing_counts() {
    let baseline: BTreeMap<Key, u64> = [
        (Key::new("a", "x", "mean"), 100),
        (Key::new("a", "y", "mean"), 100),
        (Key::new("a", "z", "mean"), 100),
        (Key::new("a", "gone", "pair_mean"), 7),
        (Key::new("b", "x", "mean"), 100),
        (Key::new("a", "boot", "reset_to_header"), 1_000_000),
    ]
    .into_iter()
    .collect();
    let fresh = vec![
        m("a", "boot", "reset_to_header", 1_100_001),
        m("a", "x", "mean", 110),
        m("a", "y", "mean", 111),
        m("a", "z", "mean", 90),
        m("a", "w", "mean", 5),
        m("a", "w", "max", 9),
        m("a", "x", "stddev", 1_000),
    ];
    // Configuration b did not run: its baseline entry is not missing.
    let c = compare(&baseline, &fresh, |cfg| cfg == "a");
    assert_eq!(
        c.regressions,
        vec![(Key::new("a", "boot", "reset_to_header"), 1_000_000, 1_100_001), (Key::new("a", "y", "mean"), 100, 111)]
    );
    assert_eq!(c.missing, vec![(Key::new("a", "gone", "pair_mean"), 7)]);
    assert_eq!(c.new, vec![(Key::new("a", "w", "mean"), 5)]);
    assert!(c.improvements.is_empty(), "90 is exactly 10% under 100: {:?}", c.improvements);
    assert!(c.failed());
    let text = c.to_string();
    assert!(text.contains("REGRESSION a y mean: 100 -> 111 (+11.0%, limit +10%)"), "{text}");
    assert!(text.contains("REGRESSION a boot reset_to_header: 1,000,000 -> 1,100,001 (+10.0%, limit +10%)"), "{text}");
    assert!(text.contains("MISSING a gone pair_mean: 7 in the baseline"), "{text}");
    assert!(text.contains("new a w mean: 5 (not in the baseline)"), "{text}");

    // Every configuration ran: b's count is missing too.
    let all = compare(&baseline, &fresh, |_| true);
    assert_eq!(all.missing.len(), 2);

    let quiet = compare(&baseline, &[m("b", "x", "mean", 89), m("b", "x", "max", 10_000)], |cfg| cfg == "b");
    assert!(!quiet.failed());
    assert_eq!(quiet.improvements, vec![(Key::new("b", "x", "mean"), 100, 89)]);
    assert!(quiet.to_string().contains("improved b x mean: 100 -> 89 (-11.0%)"));
}

#[test]
fn comparison_handles_extreme_counts() {
    let baseline: BTreeMap<Key, u64> = [(Key::new("a", "x", "mean"), u64::MAX), (Key::new("a", "z", "mean"), 0)].into_iter().collect();
    let c = compare(&baseline, &[m("a", "x", "mean", u64::MAX), m("a", "z", "mean", 1)], |_| true);
    assert_eq!(c.regressions, vec![(Key::new("a", "z", "mean"), 0, 1)]);
    assert!(c.to_string().contains("(from 0, limit +10%)"));
}

#[test]
fn baseline_reads_what_it_writes_and_refuses_malformed_lines() {
    let text = "# comment\n\naarch64 boot reset_to_header 1129104\n  armv7 x pair_mean 45  \n";
    let want: BTreeMap<Key, u64> =
        [(Key::new("aarch64", "boot", "reset_to_header"), 1_129_104), (Key::new("armv7", "x", "pair_mean"), 45)].into_iter().collect();
    assert_eq!(parse_baseline(text).unwrap(), want);

    let env = Env { date: "2026-11-26".into(), qemu: "QEMU 10.0.2".into() };
    let written = format_baseline(&[m("a", "boot", "reset_to_header", 3), m("a", "x", "pair_stddev", 4), m("a", "x", "pair_mean", 5)], &env);
    assert!(written.lines().take_while(|l| l.starts_with('#')).any(|l| l.contains("2026-11-26") && l.contains("QEMU 10.0.2")), "{written}");
    assert!(written.contains(UPDATE_COMMAND));
    let back = parse_baseline(&written).unwrap();
    let want: BTreeMap<Key, u64> = [(Key::new("a", "boot", "reset_to_header"), 3), (Key::new("a", "x", "pair_mean"), 5)].into_iter().collect();
    assert_eq!(back, want);

    assert!(parse_baseline("a b c\n").unwrap_err().starts_with("baseline line 1:"));
    assert!(parse_baseline("# x\na b c d e\n").unwrap_err().starts_with("baseline line 2:"));
    assert!(parse_baseline("a b c 1.5\n").unwrap_err().contains("`1.5` is not a count"));
    assert!(parse_baseline("a b c 1\na b c 2\n").unwrap_err().contains("appears twice"));
}

const TARGETS: &str = "# c bench metric target linux what\n\
    aarch64 boot reset_to_header 1_000_000 977_000_000 boot to the header\n\
    aarch64 x pair_mean 60 145 map+unmap 4 KiB\n\
    aarch64 y mean 300 - atomic pool\n\
    armv7 z mean - 5_500 Linux only\n\
    aarch64 later mean 100 - not written yet\n";

#[test]
fn targets_read_and_judge() {
    let t = parse_targets(TARGETS).unwrap();
    assert_eq!(t.len(), 5);
    assert_eq!(
        t[0],
        Target {
            config: "aarch64".into(),
            bench: "boot".into(),
            metric: "reset_to_header".into(),
            at_most: Some(1_000_000),
            linux: Some(977_000_000),
            what: "boot to the header".into(),
        }
    );
    assert_eq!((t[2].at_most, t[2].linux), (Some(300), None));
    assert_eq!((t[3].at_most, t[3].linux), (None, Some(5_500)));

    let ms = [m("aarch64", "x", "pair_mean", 60), m("aarch64", "y", "mean", 301), m("armv7", "x", "pair_mean", 999)];
    assert_eq!(Verdict::of(&t[1], &ms), Verdict::Met, "at most 60: 60 meets it");
    assert_eq!(Verdict::of(&t[2], &ms), Verdict::Missed);
    assert_eq!(Verdict::of(&t[3], &ms), Verdict::NoTarget);
    assert_eq!(Verdict::of(&t[4], &ms), Verdict::NotMeasured);
    assert_eq!(Verdict::of(&t[0], &ms), Verdict::NotMeasured);

    assert!(parse_targets("a b c 1\n").unwrap_err().starts_with("targets line 1:"));
    assert!(parse_targets("a b c 1,000 - x\n").unwrap_err().contains("`1,000` is neither a count nor `-`"));
    assert!(parse_targets("a b c 1 - x\narmv7 b c 2 - y\n").unwrap_err().contains("a second target for b c"));
}

#[test]
fn table_shows_headlines_targets_and_verdicts() {
    let targets = parse_targets(TARGETS).unwrap();
    let ms = vec![
        m("aarch64", "boot", "reset_to_header", 1_129_104),
        m("aarch64", "x", "map_mean", 20),
        m("aarch64", "x", "pair_stddev", 0),
        m("aarch64", "x", "pair_mean", 45),
        m("aarch64", "y", "mean", 2_272),
        m("aarch64", "y", "refused_mean", 7),
        m("aarch64", "u", "alloc_mean", 3),
        m("aarch64", "u", "free_mean", 4),
        m("aarch64", "u", "max", 5),
        m("armv7", "x", "pair_mean", 53),
        m("armv7", "z", "mean", 1_234_567),
        Measurement { key: Key::new("armv7", "z", "size"), value: 12, unit: "bytes".into() },
    ];
    let configs: Vec<&Config> = CONFIGS.iter().filter(|c| c.name == "aarch64" || c.name == "armv7").collect();
    let env = Env { date: "2026-11-26".into(), qemu: "QEMU 10.0.2".into() };
    let t = table(&ms, &configs, &targets, &env);
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines[0].starts_with("Benchmarks, 2026-11-26, QEMU 10.0.2: "), "{t}");
    let rows: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("| `")).collect();
    assert_eq!(
        rows,
        vec![
            "| `boot` | reset_to_header | 1,129,104 | - | 1,000,000 | 977,000,000 | MISSED | boot to the header |",
            "| `x` | pair_mean | 45 | 53 | 60 | 145 | met | map+unmap 4 KiB |",
            "| `y` | mean | 2,272 | - | 300 | - | MISSED | atomic pool |",
            "| `u` | alloc_mean | 3 | - | - | - | - | |",
            "| `u` | free_mean | 4 | - | - | - | - | |",
            "| `z` | mean | - | 1,234,567 | - | 5,500 | - | Linux only |",
            "| `later` | mean | - | - | 100 | - | not measured | not written yet |",
        ],
        "{t}"
    );
    assert!(t.contains("| benchmark | metric | aarch64 | armv7 | target | Linux 6.1 | verdict | target for |"), "{t}");
    assert!(t.contains("Targets: 2 MISSED, 1 met, 1 not measured."), "{t}");
    assert!(
        t.contains("- armv7 (armv7 virt (highmem=off), cortex-a15, 1 GiB; dma-remap window): `./qemu-run.sh --icount --arch armv7 --append 'bench=* ktest.filter=none' --cpu cortex-a15 --mem 1G -- -M virt,highmem=off`"),
        "{t}"
    );
}

#[test]
fn thousands_separators() {
    assert_eq!(thousands(0), "0");
    assert_eq!(thousands(999), "999");
    assert_eq!(thousands(1_000), "1,000");
    assert_eq!(thousands(977_000_000), "977,000,000");
    assert_eq!(thousands(u64::MAX), "18,446,744,073,709,551,615");
}

#[test]
fn readme_table_is_replaced_between_its_markers() {
    let readme = format!("# T\n\nbefore\n{README_BEGIN}\n\nold table\nold line\n\n{README_END}\nafter\n");
    let got = replace_readme_table(&readme, "new table\n").unwrap();
    assert_eq!(got, format!("# T\n\nbefore\n{README_BEGIN}\n\nnew table\n\n{README_END}\nafter\n"));
    assert_eq!(replace_readme_table(&got, "new table\n").unwrap(), got, "idempotent");
    assert!(replace_readme_table("no markers", "x").unwrap_err().contains("lacks the line"));
    assert!(replace_readme_table(&format!("{README_END}\n{README_BEGIN}\n"), "x").unwrap_err().contains("after the begin line"));
}

#[test]
fn committed_baseline_and_targets_are_well_formed() {
    let names: Vec<&str> = CONFIGS.iter().map(|c| c.name).collect();
    let targets = parse_targets(&std::fs::read_to_string(targets_path()).unwrap()).unwrap_or_else(|e| panic!("{e}"));
    for t in &targets {
        assert!(names.contains(&t.config.as_str()), "tests/bench-targets.txt: no configuration `{}` (have {names:?})", t.config);
    }
    let baseline = parse_baseline(&std::fs::read_to_string(baseline_path()).unwrap()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!baseline.is_empty(), "tests/bench-baseline.txt is empty: run {UPDATE_COMMAND}");
    for k in baseline.keys() {
        assert!(names.contains(&k.config.as_str()), "tests/bench-baseline.txt: no configuration `{}` (have {names:?})", k.config);
        assert!(guarded(k), "tests/bench-baseline.txt: {k} is not a guarded count");
    }
    for c in CONFIGS {
        assert!(baseline.contains_key(&Key::new(c.name, BOOT, BOOT_METRIC)), "tests/bench-baseline.txt lacks configuration {}", c.name);
    }
}
