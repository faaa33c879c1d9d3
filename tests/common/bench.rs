//! The benchmarks as a report and as a regression guard: the configurations that run them, the
//! reading of their `# bench` lines, the committed baseline (`tests/bench-baseline.txt`), the
//! targets (`tests/bench-targets.txt`) and the table. Shared by the regression test
//! (`tests/bench.rs`, part of `cargo test`) and the table printer (`examples/bench_table.rs`, run
//! by `./qemu-run.sh --bench`).
//!
//! Every configuration boots under `--icount`, where a guest instruction is one nanosecond of
//! virtual time: the counts are the same from run to run and host to host, so a change in a count
//! is a change in the code (or in the device tree QEMU generates), never noise, and a tight
//! threshold does not make a flaky test. Nothing here names individual benchmarks: a
//! configuration selects them by glob, and whatever the kernel reports is measured.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::path::PathBuf;
use std::process::Command;

use dmakern::bootargs::glob_match_any;
use dmakern::ktest::parse::parse;

use super::{boot, root, tail};

/// A benchmark configuration: a machine, extra bootargs, and the benchmarks it runs.
pub struct Config {
    /// The table's column and the first field of a baseline line.
    pub name: &'static str,
    pub arch: &'static str,
    /// qemu-run.sh options for the machine (QEMU's own after `--`, so they come last).
    pub machine: &'static [&'static str],
    /// Bootargs besides `bench=` and `ktest.filter=none` (which skips the test suites).
    pub bootargs: &'static str,
    /// The `bench=` globs.
    pub benches: &'static str,
    /// One line for the table's legend.
    pub what: &'static str,
}

const AARCH64_VIRT: &[&str] = &["--cpu", "cortex-a57", "--mem", "1G"];
// PCI needs `highmem=off` on armv7 (README, Supported machines); the test matrix boots the same.
const ARMV7_VIRT: &[&str] = &["--cpu", "cortex-a15", "--mem", "1G", "--", "-M", "virt,highmem=off"];
/// The same machines with QEMU's SMMUv3 in front of PCIe, for the dma-iommu benchmarks.
const AARCH64_SMMU: &[&str] = &["--cpu", "cortex-a57", "--mem", "1G", "--", "-M", "virt,iommu=smmuv3"];
const ARMV7_SMMU: &[&str] = &["--cpu", "cortex-a15", "--mem", "1G", "--", "-M", "virt,highmem=off,iommu=smmuv3"];
/// The SMMU machines with 4 CPUs, for the benchmarks that run on every CPU at once.
const AARCH64_SMMU_SMP4: &[&str] = &["--smp", "4", "--cpu", "cortex-a57", "--mem", "1G", "--", "-M", "virt,iommu=smmuv3"];
const ARMV7_SMMU_SMP4: &[&str] = &["--smp", "4", "--cpu", "cortex-a15", "--mem", "1G", "--", "-M", "virt,highmem=off,iommu=smmuv3"];
/// The SMMU machines with three virtio-blk disks, QEMU null block devices of 4 MiB (no host I/O,
/// reads give zeros): one in a virtio-mmio slot, one virtio-blk-pci using physical addresses and
/// one behind the SMMU (`iommu_platform=on`).
macro_rules! with_disks {
    ($($machine:literal),*) => {
        &[
            $($machine,)*
            "-blockdev", "driver=null-co,node-name=bench-mmio,size=4194304,read-zeroes=on",
            "-device", "virtio-blk-device,drive=bench-mmio",
            "-blockdev", "driver=null-co,node-name=bench-pci,size=4194304,read-zeroes=on",
            "-device", "virtio-blk-pci,drive=bench-pci,disable-legacy=on",
            "-blockdev", "driver=null-co,node-name=bench-pci-iommu,size=4194304,read-zeroes=on",
            "-device", "virtio-blk-pci,drive=bench-pci-iommu,disable-legacy=on,iommu_platform=on",
        ]
    };
}
const AARCH64_DISKS: &[&str] = with_disks!("--cpu", "cortex-a57", "--mem", "1G", "--", "-M", "virt,iommu=smmuv3");
const ARMV7_DISKS: &[&str] = with_disks!("--cpu", "cortex-a15", "--mem", "1G", "--", "-M", "virt,highmem=off,iommu=smmuv3");

/// Every configuration, in table order. The first is the machine the targets are stated for.
pub const CONFIGS: &[Config] = &[
    Config {
        name: "aarch64",
        arch: "aarch64",
        machine: AARCH64_VIRT,
        bootargs: "",
        benches: "*",
        what: "aarch64 virt, cortex-a57, 1 GiB; dma-remap window",
    },
    Config {
        name: "aarch64-inplace",
        arch: "aarch64",
        machine: AARCH64_VIRT,
        bootargs: "dma.remap=inplace",
        benches: "coherent_remap_*",
        what: "the same, dma-remap in place",
    },
    Config {
        name: "aarch64-smmu",
        arch: "aarch64",
        machine: AARCH64_SMMU,
        bootargs: "",
        benches: "dma_map_iommu_*,iova_*,coherent_iommu_*",
        what: "the same, with the SMMUv3 (iommu=smmuv3)",
    },
    Config {
        name: "aarch64-smp4",
        arch: "aarch64",
        machine: AARCH64_SMMU_SMP4,
        bootargs: "",
        benches: "dma_map_smp_*",
        what: "the same with 4 CPUs, every CPU mapping at once",
    },
    Config {
        name: "aarch64-virtio",
        arch: "aarch64",
        machine: AARCH64_DISKS,
        bootargs: "",
        benches: "virtio_*",
        what: "aarch64-smmu with virtio-blk null disks: virtio-mmio, virtio-pci, virtio-pci behind the SMMU (strict)",
    },
    Config {
        name: "aarch64-virtio-forced",
        arch: "aarch64",
        machine: AARCH64_DISKS,
        bootargs: "swiotlb=force iommu.strict=0",
        benches: "virtio_*",
        what: "the same disks with swiotlb=force (dma-direct bounces) and iommu.strict=0 (lazy)",
    },
    Config {
        name: "aarch64-raspi3b",
        arch: "aarch64",
        machine: &["--machine", "raspi3b"],
        bootargs: "",
        benches: "dma_engine_direct",
        what: "QEMU raspi3b (the project's DTS): the BCM2835 DMA engine through dma-direct",
    },
    Config {
        name: "aarch64-raspi3b-swiotlb",
        arch: "aarch64",
        machine: &["--machine", "raspi3b"],
        bootargs: "swiotlb=force",
        benches: "dma_engine_swiotlb",
        what: "the same with swiotlb=force",
    },
    Config {
        name: "armv7",
        arch: "armv7",
        machine: ARMV7_VIRT,
        bootargs: "",
        benches: "*",
        what: "armv7 virt (highmem=off), cortex-a15, 1 GiB; dma-remap window",
    },
    Config {
        name: "armv7-inplace",
        arch: "armv7",
        machine: ARMV7_VIRT,
        bootargs: "dma.remap=inplace",
        benches: "coherent_remap_*",
        what: "the same, dma-remap in place",
    },
    Config {
        name: "armv7-smmu",
        arch: "armv7",
        machine: ARMV7_SMMU,
        bootargs: "",
        benches: "dma_map_iommu_*,iova_*,coherent_iommu_*",
        what: "the same, with the SMMUv3 (iommu=smmuv3)",
    },
    Config {
        name: "armv7-smp4",
        arch: "armv7",
        machine: ARMV7_SMMU_SMP4,
        bootargs: "",
        benches: "dma_map_smp_*",
        what: "the same with 4 CPUs, every CPU mapping at once",
    },
    Config {
        name: "armv7-virtio",
        arch: "armv7",
        machine: ARMV7_DISKS,
        bootargs: "",
        benches: "virtio_*",
        what: "armv7-smmu with virtio-blk null disks: virtio-mmio, virtio-pci, virtio-pci behind the SMMU (strict)",
    },
    Config {
        name: "armv7-virtio-forced",
        arch: "armv7",
        machine: ARMV7_DISKS,
        bootargs: "swiotlb=force iommu.strict=0",
        benches: "virtio_*",
        what: "the same disks with swiotlb=force (dma-direct bounces) and iommu.strict=0 (lazy)",
    },
    Config {
        name: "armv7-raspi2b",
        arch: "armv7",
        machine: &["--machine", "raspi2b"],
        bootargs: "",
        benches: "dma_engine_direct",
        what: "QEMU raspi2b (the project's DTS): the BCM2835 DMA engine through dma-direct",
    },
    Config {
        name: "armv7-raspi2b-swiotlb",
        arch: "armv7",
        machine: &["--machine", "raspi2b"],
        bootargs: "swiotlb=force",
        benches: "dma_engine_swiotlb",
        what: "the same with swiotlb=force",
    },
];

/// The pseudo-benchmark for the kernel's `# boot: N ns ...` line.
pub const BOOT: &str = "boot";
pub const BOOT_METRIC: &str = "reset_to_header";

/// A regression is a guarded count more than this many percent above its baseline.
pub const TOLERANCE_PERCENT: u64 = 10;

/// The command that rewrites the baseline (and the README's table): the deliberate step.
pub const UPDATE_COMMAND: &str = "./qemu-run.sh --bench --update-baseline";

/// The README's table lies between these two lines.
pub const README_BEGIN: &str = "<!-- bench-table: begin (written by ./qemu-run.sh --bench --update-baseline) -->";
pub const README_END: &str = "<!-- bench-table: end -->";

pub fn baseline_path() -> PathBuf {
    root().join("tests/bench-baseline.txt")
}

pub fn targets_path() -> PathBuf {
    root().join("tests/bench-targets.txt")
}

/// Which count: configuration, benchmark, metric.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub config: String,
    pub bench: String,
    pub metric: String,
}

impl Key {
    pub fn new(config: &str, bench: &str, metric: &str) -> Key {
        Key { config: config.to_string(), bench: bench.to_string(), metric: metric.to_string() }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.config, self.bench, self.metric)
    }
}

/// One reported value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    pub key: Key,
    pub value: u64,
    pub unit: String,
}

/// Whether the baseline holds and the guard compares this count: the boot count and every mean
/// (`mean`, `*_mean`). Standard deviations and maxima are reported only.
pub fn guarded(key: &Key) -> bool {
    key.bench == BOOT || key.metric == "mean" || key.metric.ends_with("_mean")
}

/// The bootargs `config` boots with.
pub fn bootargs(config: &Config) -> String {
    format!("bench={} ktest.filter=none {}", config.benches, config.bootargs).trim_end().to_string()
}

/// The command line that runs `config` by hand.
pub fn command(config: &Config) -> String {
    format!("./qemu-run.sh --icount --arch {} --append '{}' {}", config.arch, bootargs(config), config.machine.join(" "))
}

/// Boots `config` under `--icount` and returns its counts, or why the run is unusable (a failed
/// boot, a malformed line), with the end of the console.
pub fn run_config(config: &Config) -> Result<Vec<Measurement>, String> {
    let append = bootargs(config);
    let mut opts = vec!["--icount", "--append", &append];
    opts.extend_from_slice(config.machine);
    let b = boot(&format!("bench {}", config.name), config.arch, &opts);
    let problems = b.report.problems();
    if b.status != Some(0) || !problems.is_empty() {
        return Err(format!(
            "configuration {} (bootargs `{append}`) failed, qemu-run.sh status {:?}:\n  {}\n--- console ---\n{}",
            config.name,
            b.status,
            problems.join("\n  "),
            tail(&b.log, 60)
        ));
    }
    parse_log(config.name, &b.log).map_err(|e| format!("configuration {}: {e}\n--- console ---\n{}", config.name, tail(&b.log, 60)))
}

/// The counts in a console log: the `# boot:` line as [`BOOT`] [`BOOT_METRIC`], then every
/// `# bench <name> <metric>=<value> <unit>` line, in the order printed.
pub fn parse_log(config: &str, log: &str) -> Result<Vec<Measurement>, String> {
    let boot_line = log
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("# boot: "))
        .ok_or("no `# boot: N ns ...` line")?;
    let boot_ns = boot_line
        .split(' ')
        .next()
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| format!("malformed `# boot: {boot_line}` line"))?;
    let mut out = vec![Measurement { key: Key::new(config, BOOT, BOOT_METRIC), value: boot_ns, unit: "ns".into() }];
    for line in parse(log).bench {
        out.push(parse_bench_line(config, &line)?);
    }
    let mut seen = BTreeSet::new();
    for m in &out {
        if !seen.insert(&m.key) {
            return Err(format!("{} reported twice", m.key));
        }
    }
    Ok(out)
}

/// Reads `<name> <metric>=<value> <unit>` (a `# bench ` line without its prefix).
pub fn parse_bench_line(config: &str, line: &str) -> Result<Measurement, String> {
    let bad = || format!("malformed bench line `# bench {line}` (want `# bench <name> <metric>=<value> <unit>`)");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [bench, metric_value, unit] = fields[..] else { return Err(bad()) };
    let (metric, value) = metric_value.split_once('=').ok_or_else(bad)?;
    let value = value.parse::<u64>().map_err(|_| bad())?;
    if metric.is_empty() {
        return Err(bad());
    }
    Ok(Measurement { key: Key::new(config, bench, metric), value, unit: unit.to_string() })
}

/// Reads a baseline: `#` comments, blank lines, and `config bench metric value` lines.
pub fn parse_baseline(text: &str) -> Result<BTreeMap<Key, u64>, String> {
    let mut map = BTreeMap::new();
    for (i, line) in data_lines(text) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [config, bench, metric, value] = fields[..] else {
            return Err(format!("baseline line {i}: want `config bench metric value`, got `{line}`"));
        };
        let value = value.parse::<u64>().map_err(|_| format!("baseline line {i}: `{value}` is not a count"))?;
        if map.insert(Key::new(config, bench, metric), value).is_some() {
            return Err(format!("baseline line {i}: {config} {bench} {metric} appears twice"));
        }
    }
    Ok(map)
}

/// The baseline file for `measurements` (their guarded counts only), with a header saying how it
/// was made.
pub fn format_baseline(measurements: &[Measurement], env: &Env) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmark baseline of the regression guard (tests/bench.rs, run by `cargo test`), which fails");
    let _ = writeln!(s, "# when a count here grows by more than {TOLERANCE_PERCENT}%. Guest instructions under --icount: the boot");
    let _ = writeln!(s, "# count and every mean. Written by the command below; do not edit by hand.");
    let _ = writeln!(s, "# Made {} with {} by: {UPDATE_COMMAND}", env.date, env.qemu);
    let _ = writeln!(s, "# config bench metric value");
    for m in measurements.iter().filter(|m| guarded(&m.key)) {
        let _ = writeln!(s, "{} {}", m.key, m.value);
    }
    s
}

/// Lines that are neither blank nor `#` comments, numbered from 1.
fn data_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// A fresh run against the baseline.
#[derive(Debug, Default)]
pub struct Comparison {
    /// `(key, baseline, fresh)` more than [`TOLERANCE_PERCENT`] above the baseline.
    pub regressions: Vec<(Key, u64, u64)>,
    /// Baseline entries the run should have produced and did not.
    pub missing: Vec<(Key, u64)>,
    /// Guarded counts the baseline does not have.
    pub new: Vec<(Key, u64)>,
    /// `(key, baseline, fresh)` more than [`TOLERANCE_PERCENT`] below the baseline.
    pub improvements: Vec<(Key, u64, u64)>,
}

impl Comparison {
    /// Whether the guard fails: a regression or a missing count.
    pub fn failed(&self) -> bool {
        !self.regressions.is_empty() || !self.missing.is_empty()
    }
}

/// Compares the guarded counts of `fresh` with `baseline`. Baseline entries of configurations
/// for which `ran` is false are not expected in `fresh` (a run of one architecture).
pub fn compare(baseline: &BTreeMap<Key, u64>, fresh: &[Measurement], ran: impl Fn(&str) -> bool) -> Comparison {
    let mut c = Comparison::default();
    let fresh_keys: BTreeSet<&Key> = fresh.iter().map(|m| &m.key).collect();
    for m in fresh.iter().filter(|m| guarded(&m.key)) {
        let Some(&b) = baseline.get(&m.key) else {
            c.new.push((m.key.clone(), m.value));
            continue;
        };
        // In 128 bits: no count overflows when scaled by 100.
        let (base, now, tolerance) = (u128::from(b), u128::from(m.value), u128::from(TOLERANCE_PERCENT));
        if now * 100 > base * (100 + tolerance) {
            c.regressions.push((m.key.clone(), b, m.value));
        } else if now * 100 < base * (100 - tolerance) {
            c.improvements.push((m.key.clone(), b, m.value));
        }
    }
    for (k, &v) in baseline {
        if ran(&k.config) && !fresh_keys.contains(k) {
            c.missing.push((k.clone(), v));
        }
    }
    c
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, b, v) in &self.regressions {
            writeln!(f, "REGRESSION {k}: {} -> {} ({}, limit +{TOLERANCE_PERCENT}%)", thousands(*b), thousands(*v), change(*b, *v))?;
        }
        for (k, b) in &self.missing {
            writeln!(f, "MISSING {k}: {} in the baseline, not reported by this run", thousands(*b))?;
        }
        for (k, v) in &self.new {
            writeln!(f, "new {k}: {} (not in the baseline)", thousands(*v))?;
        }
        for (k, b, v) in &self.improvements {
            writeln!(f, "improved {k}: {} -> {} ({})", thousands(*b), thousands(*v), change(*b, *v))?;
        }
        Ok(())
    }
}

/// `+12.5%` / `-3.0%` from `base` to `now` (`from 0` when there is no base to divide by).
fn change(base: u64, now: u64) -> String {
    if base == 0 {
        return "from 0".to_string();
    }
    let permille = (i128::from(now) - i128::from(base)) * 1000 / i128::from(base);
    let sign = if permille < 0 { "-" } else { "+" };
    format!("{sign}{}.{}%", permille.abs() / 10, permille.abs() % 10)
}

/// A performance target (and Linux's figure) for one count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub config: String,
    pub bench: String,
    pub metric: String,
    /// The most the count may be for the target to be met; `None`: a Linux figure only.
    pub at_most: Option<u64>,
    /// Linux 6.1's count for the same operation on the same machine, if measured.
    pub linux: Option<u64>,
    pub what: String,
}

/// Reads the targets file: `#` comments, blank lines, and
/// `config bench metric target linux description...` lines, where `target` and `linux` are
/// counts (`_` allowed between digits) or `-`.
pub fn parse_targets(text: &str) -> Result<Vec<Target>, String> {
    let mut out: Vec<Target> = Vec::new();
    for (i, line) in data_lines(text) {
        let mut f = line.split_whitespace();
        let (Some(config), Some(bench), Some(metric), Some(at_most), Some(linux)) = (f.next(), f.next(), f.next(), f.next(), f.next()) else {
            return Err(format!("targets line {i}: want `config bench metric target linux description`, got `{line}`"));
        };
        let count = |s: &str| -> Result<Option<u64>, String> {
            if s == "-" {
                return Ok(None);
            }
            let digits: String = s.chars().filter(|&c| c != '_').collect();
            digits.parse::<u64>().map(Some).map_err(|_| format!("targets line {i}: `{s}` is neither a count nor `-`"))
        };
        let t = Target {
            config: config.to_string(),
            bench: bench.to_string(),
            metric: metric.to_string(),
            at_most: count(at_most)?,
            linux: count(linux)?,
            what: f.collect::<Vec<_>>().join(" "),
        };
        if out.iter().any(|o| o.bench == t.bench && o.metric == t.metric) {
            return Err(format!("targets line {i}: a second target for {} {}", t.bench, t.metric));
        }
        out.push(t);
    }
    Ok(out)
}

/// A target's verdict against the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    NotMeasured,
    /// A Linux figure without a target.
    NoTarget,
}

impl Verdict {
    pub fn of(target: &Target, measurements: &[Measurement]) -> Verdict {
        let Some(limit) = target.at_most else { return Verdict::NoTarget };
        let key = Key::new(&target.config, &target.bench, &target.metric);
        match measurements.iter().find(|m| m.key == key) {
            Some(m) if m.value <= limit => Verdict::Met,
            Some(_) => Verdict::Missed,
            None => Verdict::NotMeasured,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::NotMeasured => "not measured",
            Verdict::NoTarget => "-",
        })
    }
}

/// When and with what the counts were made.
pub struct Env {
    /// `YYYY-MM-DD`, UTC.
    pub date: String,
    /// `QEMU <version>` of the emulators used, once when they agree.
    pub qemu: String,
}

impl Env {
    /// Today's date and the version of each emulator `configs` boot on.
    pub fn probe(configs: &[&Config]) -> Env {
        let date = command_line("date", &["-u", "+%Y-%m-%d"]).unwrap_or_else(|| "(date unknown)".into());
        let mut versions: Vec<String> = Vec::new();
        for arch in configs.iter().map(|c| c.arch) {
            let qemu = if arch == "aarch64" { "qemu-system-aarch64" } else { "qemu-system-arm" };
            let v = command_line(qemu, &["--version"])
                .map(|l| l.trim_start_matches("QEMU emulator version ").to_string())
                .unwrap_or_else(|| "(version unknown)".into());
            let v = format!("{qemu} {v}");
            if !versions.contains(&v) {
                versions.push(v);
            }
        }
        // "qemu-system-aarch64 10.0.2 (...), qemu-system-arm 10.0.2 (...)": say the version once.
        let bare: BTreeSet<&str> = versions.iter().filter_map(|v| v.split_once(' ').map(|(_, rest)| rest)).collect();
        let qemu = match bare.iter().next() {
            Some(v) if bare.len() == 1 => format!("QEMU {v}"),
            _ => versions.join(", "),
        };
        Env { date, qemu }
    }
}

/// The first line `program args` prints, if it runs and succeeds.
fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).lines().next().map(|l| l.trim().to_string())
}

/// Which metrics of a benchmark the table shows besides those with a target: the throughputs
/// (`*bytes_per_s`) of a throughput benchmark; else the headline (`pair_mean` or `mean`) when
/// there is one, else every `*_mean`, else every metric (the boot count). The baseline keeps every
/// mean; the console shows everything.
fn shown(metrics: &[&str], metric: &str) -> bool {
    const HEADLINE: [&str; 2] = ["pair_mean", "mean"];
    if metrics.iter().any(|m| m.ends_with("bytes_per_s")) {
        metric.ends_with("bytes_per_s")
    } else if metrics.iter().any(|m| HEADLINE.contains(m)) {
        HEADLINE.contains(&metric)
    } else if metrics.iter().any(|m| m.ends_with("_mean")) {
        metric.ends_with("_mean")
    } else {
        true
    }
}

/// Benchmarks the table leaves out (globs) unless a target names them: granules of the
/// every-CPU dma_map benchmark between the ones shown. The console, the baseline and the guard
/// have them all.
pub const TABLE_OMITS: &str = "dma_map_smp_*_64k,dma_map_smp_*_4m";

/// A configuration's variant: its name less the architecture and a dash (`aarch64-smmu` is
/// `smmu`, `aarch64` is ``); a name of no configuration is its own variant.
fn variant(config: &str) -> &str {
    match CONFIGS.iter().find(|c| c.name == config) {
        Some(c) => c.name.strip_prefix(c.arch).map_or(config, |v| v.trim_start_matches('-')),
        None => config,
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The table (Markdown, so the README shows it as printed): one row per benchmark metric and
/// configuration variant (see [`variant`]; [`shown`] and [`TABLE_OMITS`] choose the rows), a column
/// per architecture of `configs`, then the target, Linux's figure and the verdict; a heading line
/// with the date and QEMU version above it, the configurations and a tally of the verdicts below.
pub fn table(measurements: &[Measurement], configs: &[&Config], targets: &[Target], env: &Env) -> String {
    // A column per architecture; a row per (variant, benchmark, metric), so that a configuration
    // `<arch>-<variant>` shares its rows across the architectures.
    let mut arches: Vec<&str> = Vec::new();
    for c in configs {
        if !arches.contains(&c.arch) {
            arches.push(c.arch);
        }
    }
    let config_of = |arch: &str, variant: &str| if variant.is_empty() { arch.to_string() } else { format!("{arch}-{variant}") };
    // Rows in the order the kernel reported them, configuration by configuration, each
    // benchmark's variants together.
    let mut rows: Vec<(&str, &str, &str)> = Vec::new();
    for m in measurements {
        let row = (variant(&m.key.config), m.key.bench.as_str(), m.key.metric.as_str());
        if !rows.contains(&row) {
            rows.push(row);
        }
    }
    let first_seen = |bench: &str| rows.iter().position(|r| r.1 == bench).unwrap_or(usize::MAX);
    let mut by_bench = rows.clone();
    by_bench.sort_by_key(|r| first_seen(r.1));
    let target_of =
        |v: &str, bench: &str, metric: &str| targets.iter().find(|t| t.bench == bench && t.metric == metric && variant(&t.config) == v);
    let metrics_of = |bench: &str| rows.iter().filter(|r| r.1 == bench).map(|r| r.2).collect::<Vec<_>>();
    let mut shown_rows: Vec<(&str, &str, &str)> = by_bench
        .iter()
        .copied()
        .filter(|&(v, b, m)| target_of(v, b, m).is_some() || (!glob_match_any(TABLE_OMITS, b) && shown(&metrics_of(b), m)))
        .collect();
    // Targets whose benchmark reported nothing still get a row: "not measured" is a verdict too.
    for t in targets {
        let row = (variant(&t.config), t.bench.as_str(), t.metric.as_str());
        if !shown_rows.contains(&row) {
            shown_rows.push(row);
        }
    }

    let reference = CONFIGS[0].name;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Benchmarks, {}, {}: guest instructions per operation under `--icount` (one instruction is one ns of \
         virtual time); throughputs in bytes per second of virtual time. A column per architecture; a row \
         `name (variant)` is the configuration `<architecture>-<variant>` (listed below the table). Targets \
         and Linux 6.1 figures are for {reference} unless the target names another configuration \
         (tests/bench-targets.txt).",
        env.date, env.qemu
    );
    let _ = writeln!(s);
    let _ = write!(s, "| benchmark | metric |");
    for a in &arches {
        let _ = write!(s, " {a} |");
    }
    let _ = writeln!(s, " target | Linux 6.1 | verdict | target for |");
    let _ = write!(s, "|---|---|");
    for _ in &arches {
        let _ = write!(s, "---:|");
    }
    let _ = writeln!(s, "---:|---:|---|---|");
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for (v, bench, metric) in shown_rows {
        if v.is_empty() {
            let _ = write!(s, "| `{bench}` | {metric} |");
        } else {
            let _ = write!(s, "| `{bench}` ({v}) | {metric} |");
        }
        for a in &arches {
            let key = Key::new(&config_of(a, v), bench, metric);
            let cell = match measurements.iter().find(|m| m.key == key) {
                Some(m) if m.unit == "ns" => thousands(m.value),
                Some(m) => format!("{} {}", thousands(m.value), m.unit),
                None => "-".to_string(),
            };
            let _ = write!(s, " {cell} |");
        }
        match target_of(v, bench, metric) {
            Some(t) => {
                let limit = match t.at_most {
                    Some(at_most) if t.config == reference => thousands(at_most),
                    Some(at_most) => format!("{} ({})", thousands(at_most), t.config),
                    None => "-".to_string(),
                };
                let linux = t.linux.map_or("-".to_string(), thousands);
                let verdict = Verdict::of(t, measurements);
                if verdict != Verdict::NoTarget {
                    *tally.entry(verdict.to_string()).or_default() += 1;
                }
                let _ = writeln!(s, " {limit} | {linux} | {verdict} | {} |", t.what);
            }
            None => {
                let _ = writeln!(s, " - | - | - | |");
            }
        }
    }
    let _ = writeln!(s);
    let tally: Vec<String> = tally.iter().map(|(v, n)| format!("{n} {v}")).collect();
    let _ = writeln!(s, "Targets: {}.", if tally.is_empty() { "none".to_string() } else { tally.join(", ") });
    let _ = writeln!(s, "Configurations:");
    for c in configs {
        let _ = writeln!(s, "- {} ({}): `{}`", c.name, c.what, command(c));
    }
    s
}

/// `readme` with the text between [`README_BEGIN`] and [`README_END`] replaced by `block`.
pub fn replace_readme_table(readme: &str, block: &str) -> Result<String, String> {
    let begin = readme.find(README_BEGIN).ok_or_else(|| format!("README.md lacks the line `{README_BEGIN}`"))?;
    let body = begin + README_BEGIN.len();
    let end = readme[body..].find(README_END).map(|e| body + e).ok_or_else(|| format!("README.md lacks `{README_END}` after the begin line"))?;
    Ok(format!("{}\n\n{}\n\n{}", &readme[..body], block.trim_end(), &readme[end..]))
}
