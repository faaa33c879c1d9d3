//! The CMA matrix: both architectures boot with the default area, `cma=32M`, `cma=0`, a
//! `cma=size@start-end` window and a test DTB with several areas, per-device areas and refused
//! pools. The kernel's suites (`cma_alloc`, `cma_setup`, `dma_contiguous`, `phys`) check the areas
//! against the bootargs and the DT; here the boot log's lines are checked against the same
//! configuration, and the cases each configuration must pass or skip.

mod common;
use common::{boot, dtb, path_str, Boot};

const SUITES: &str = "ktest.filter=cma_*,dma_contiguous,phys";

/// QEMU options of the machine each architecture boots on (the test DTBs are dumps of these).
fn machine(arch: &str) -> &'static [&'static str] {
    match arch {
        "aarch64" => &["--cpu", "cortex-a57", "--mem", "1G"],
        _ => &["--cpu", "cortex-a15", "--mem", "1G", "--", "-M", "virt,highmem=off"],
    }
}

/// Boots `arch` with `append` (plus the suite filter) and `extra` qemu-run.sh options.
fn run(name: &str, arch: &str, append: &str, extra: &[&str]) -> Boot {
    let append = format!("{append} {SUITES}");
    let mut opts: Vec<&str> = vec!["--append", &append];
    opts.extend_from_slice(extra);
    opts.extend_from_slice(machine(arch));
    boot(&format!("{arch} {name}"), arch, &opts)
}

/// The base address printed in `cma: Reserved <size> MiB at 0x<base> (<name>...`.
fn reserved_base(b: &Boot, size_mib: u64, name: &str) -> u64 {
    let prefix = format!("cma: Reserved {size_mib} MiB at 0x");
    let line = b
        .log
        .lines()
        .find(|l| l.starts_with(&prefix) && l.contains(&format!("({name}")))
        .unwrap_or_else(|| panic!("[{}] no `{prefix}... ({name}` line\n{}", b.name, common::tail(&b.log, 60)));
    let hex = &line[prefix.len()..prefix.len() + 16];
    u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("[{}] bad base in {line:?}: {e}", b.name))
}

fn default_64m(arch: &str) {
    let b = run("default CMA", arch, "", &[]);
    b.assert_passed();
    let base = reserved_base(&b, 64, "reserved, default");
    assert!(base >= 0x4000_0000 && base + (64 << 20) <= 0x8000_0000, "{base:#x}");
    for case in ["align_1", "align_16", "align_256", "align_4096", "exhaustion_then_release"] {
        b.assert_case_passed("cma_alloc", case);
    }
    b.assert_case_passed("cma_setup", "default_area_as_configured");
    b.assert_case_passed("dma_contiguous", "multi_page_from_default_area");
}

fn cma_32m(arch: &str) {
    let b = run("cma=32M", arch, "cma=32M cma.report", &[]);
    b.assert_passed().assert_log_contains("cma: Reserved 32 MiB at 0x");
    reserved_base(&b, 32, "reserved, default");
    // The boot-time report: the table header and the area's picture (8192 pages).
    b.assert_log_contains("\narea             base").assert_log_contains("cma reserved: 8192 pages at 0x");
    for case in ["align_4096", "exhaustion_then_release", "double_release_detected", "release_outside_area"] {
        b.assert_case_passed("cma_alloc", case);
    }
    b.assert_case_passed("cma_setup", "default_area_as_configured");
    for case in ["multi_page_from_default_area", "falls_back_when_cma_cannot_serve", "legacy_never_falls_back", "nonblocking_never_enters_cma"] {
        b.assert_case_passed("dma_contiguous", case);
    }
}

fn cma_0(arch: &str) {
    let b = run("cma=0", arch, "cma=0", &[]);
    b.assert_passed().assert_log_contains("cma: no default area (cma=0)");
    assert!(!b.log.contains("cma: Reserved"), "[{}] an area exists with cma=0", b.name);
    for case in ["align_1", "align_4096", "exhaustion_then_release", "double_release_detected"] {
        b.assert_case_skipped("cma_alloc", case);
    }
    b.assert_case_skipped("dma_contiguous", "multi_page_from_default_area");
    b.assert_case_skipped("dma_contiguous", "legacy_pair_uses_default_area");
    for case in ["falls_back_when_cma_cannot_serve", "legacy_never_falls_back", "nonblocking_never_enters_cma", "device_area_only", "single_page_skips_default_area"] {
        b.assert_case_passed("dma_contiguous", case);
    }
    b.assert_case_passed("cma_setup", "default_area_as_configured");
    b.assert_log_contains("16 pages from the page allocator (no default area)");
}

fn cma_window(arch: &str) {
    let (start, end) = (0x4400_0000u64, 0x5000_0000u64);
    let b = run("cma=16M@window", arch, "cma=16M@0x44000000-0x50000000", &[]);
    b.assert_passed();
    let base = reserved_base(&b, 16, "reserved, default");
    assert!(base >= start && base + (16 << 20) <= end, "[{}] base {base:#x} outside {start:#x}-{end:#x}", b.name);
    b.assert_case_passed("cma_setup", "default_area_as_configured");
    b.assert_case_passed("cma_alloc", "align_256");
    // 4096 aligned pages need more than the 4096-page area.
    b.assert_case_skipped("cma_alloc", "align_4096");
}

fn test_dtb(arch: &str) {
    let d = dtb(if arch == "aarch64" { "virt-cma" } else { "virt-cma-armv7" });
    let b = run("virt-cma DTB", arch, "", &["--dtb", &path_str(&d)]);
    b.assert_passed()
        .assert_log_contains("cma: Reserved 48 MiB at 0x")
        .assert_log_contains("cma: Reserved 8 MiB at 0x0000000050000000 (device-pool@50000000)")
        .assert_log_contains(
            "cma: area `too-big` refused: CMA area of 2048 MiB is larger than RAM (1024 MiB); booting without it",
        )
        .assert_log_contains("cma: area `misaligned@52100000` refused: reg 0x52100000 + 0x400000 is not aligned")
        .assert_log_contains("cma: /virtio_mmio@a000000 owns area `dma-low`")
        .assert_log_contains("cma: /dma-test-device owns area `device-pool@50000000`");
    reserved_base(&b, 48, "linux,cma, default");
    // dma-low's second alloc-range, 0x44000000-0x48000000 (the first is too small).
    let low = reserved_base(&b, 8, "dma-low");
    assert!((0x4400_0000..=0x4800_0000 - (8 << 20)).contains(&low), "[{}] dma-low at {low:#x}", b.name);
    for case in ["default_area_as_configured", "dt_areas_match_device_tree", "areas_reserved_in_memory_map", "devices_own_their_areas"] {
        b.assert_case_passed("cma_setup", case);
    }
    b.assert_case_passed("dma_contiguous", "dt_devices_use_their_areas");
    b.assert_case_passed("cma_alloc", "align_4096");
}

#[test]
fn aarch64_default_64m() {
    default_64m("aarch64");
}

#[test]
fn aarch64_cma_32m() {
    cma_32m("aarch64");
}

#[test]
fn aarch64_cma_0() {
    cma_0("aarch64");
}

#[test]
fn aarch64_cma_window() {
    cma_window("aarch64");
}

#[test]
fn aarch64_test_dtb() {
    test_dtb("aarch64");
}

#[test]
fn armv7_default_64m() {
    default_64m("armv7");
}

#[test]
fn armv7_cma_32m() {
    cma_32m("armv7");
}

#[test]
fn armv7_cma_0() {
    cma_0("armv7");
}

#[test]
fn armv7_cma_window() {
    cma_window("armv7");
}

#[test]
fn armv7_test_dtb() {
    test_dtb("armv7");
}

/// The benchmarks run when selected and print their results after the KTAP plan (the numbers are
/// not judged here: see the targets and `./qemu-run.sh --icount --append bench=cma*`).
#[test]
fn aarch64_bench_reports() {
    let b = boot("aarch64 bench=cma*", "aarch64", &["--icount", "--append", "bench=cma* ktest.filter=phys"]);
    b.assert_passed();
    for (name, metric) in [
        ("cma_alloc_release_16", "mean"),
        ("cma_alloc_release_256", "mean"),
        ("cma_alloc_release_256_fragmented", "refused_mean"),
    ] {
        let line = b.report.bench.iter().find(|l| l.starts_with(&format!("{name} {metric}=")));
        let line = line.unwrap_or_else(|| panic!("no `# bench {name} {metric}=` line in {:?}", b.report.bench));
        assert!(line.ends_with(" ns"), "{line}");
    }
}
