//! The QEMU test harness: builds each kernel image once, boots configurations through
//! `qemu-run.sh`, and judges the KTAP report (`dmakern::ktest::parse`). A failure names the
//! configuration and the case. `bench` runs the benchmark configurations and holds their baseline,
//! targets and table (`tests/bench.rs`, `./qemu-run.sh --bench`).
#![allow(dead_code)]

pub mod bench;

use dmakern::ktest::parse::{parse, Report, Status};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Build the image for `arch` (qemu-run.sh options `variant`, e.g. `--early-uart ADDR`) once per
/// test binary (cargo's own lock serialises concurrent builds).
pub fn build(arch: &str, variant: &[&str]) {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut done = built.lock().unwrap();
    let key = format!("{arch} {}", variant.join(" "));
    if done.contains(&key) {
        return;
    }
    let out = Command::new(root().join("qemu-run.sh"))
        .args(["--arch", arch, "--build-only"])
        .args(variant)
        .current_dir(root())
        .output()
        .expect("run qemu-run.sh");
    assert!(out.status.success(), "building the {arch} kernel failed:\n{}", String::from_utf8_lossy(&out.stderr));
    done.push(key);
}

/// Compile `tests/dts/NAME.dts` with dtc into target/dtb/NAME.dtb.
pub fn dtb(name: &str) -> PathBuf {
    let src = root().join("tests/dts").join(format!("{name}.dts"));
    let dir = root().join("target/dtb");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{name}.dtb"));
    let r = Command::new("dtc")
        .args(["-q", "-I", "dts", "-O", "dtb", "-o"])
        .arg(&out)
        .arg(&src)
        .output()
        .expect("dtc is needed to compile the test device trees (apt-get install device-tree-compiler)");
    assert!(r.status.success(), "dtc {}: {}", src.display(), String::from_utf8_lossy(&r.stderr));
    out
}

/// A real upstream DTB from Debian's kernel packages (tests/hil/fetch-debian.sh fetches them once
/// into a cache outside the repository). `None`, with the reason printed, when they cannot be had
/// (no apt, no network): the caller skips.
pub fn debian_dtb(name: &str) -> Option<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let out = Command::new(root().join("tests/hil/fetch-debian.sh")).current_dir(root()).output().expect("run tests/hil/fetch-debian.sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("dtb_dir="))
                .map(PathBuf::from)
                .ok_or_else(|| "fetch-debian.sh printed no dtb_dir".to_string()),
            Some(77) => Err(stderr.lines().last().unwrap_or("unavailable").to_string()),
            other => panic!("tests/hil/fetch-debian.sh failed ({other:?}):\n{stderr}"),
        }
    });
    match dir {
        Ok(d) => {
            let p = d.join(name);
            assert!(p.is_file(), "{} missing from the Debian DTB cache", p.display());
            Some(p)
        }
        Err(why) => {
            eprintln!("SKIP {name}: {why}");
            None
        }
    }
}

/// A finished boot.
pub struct Boot {
    pub name: String,
    pub status: Option<i32>,
    pub log: String,
    pub report: Report,
}

impl Boot {
    /// Assert that the run passed: exit 0, KTAP complete, no `not ok`, summary with 0 failed.
    pub fn assert_passed(&self) -> &Self {
        let problems = self.report.problems();
        if self.status != Some(0) || !problems.is_empty() {
            panic!(
                "[{}] failed (qemu-run.sh status {:?}):\n  {}\n--- console ---\n{}",
                self.name,
                self.status,
                problems.join("\n  "),
                tail(&self.log, 80)
            );
        }
        self
    }

    /// Assert that the console shows `needle`.
    pub fn assert_log_contains(&self, needle: &str) -> &Self {
        assert!(self.log.contains(needle), "[{}] console lacks {needle:?}\n--- console ---\n{}", self.name, tail(&self.log, 60));
        self
    }

    /// Assert that a case ran and passed (not skipped).
    pub fn assert_case_passed(&self, suite: &str, case: &str) -> &Self {
        let c = self.report.cases.iter().find(|c| c.suite == suite && c.name == case);
        match c {
            Some(c) if c.status == Status::Pass => self,
            Some(c) => panic!("[{}] {suite}.{case}: {:?} {:?}", self.name, c.status, c.diagnostics),
            None => panic!("[{}] {suite}.{case} did not run\n{}", self.name, tail(&self.log, 60)),
        }
    }

    /// Assert that every case of `suite` ran and passed: none skipped, at least one case.
    pub fn assert_suite_ran(&self, suite: &str) -> &Self {
        let cases: Vec<_> = self.report.cases.iter().filter(|c| c.suite == suite).collect();
        assert!(!cases.is_empty(), "[{}] suite {suite} did not run\n{}", self.name, tail(&self.log, 60));
        for c in cases {
            assert!(c.status == Status::Pass, "[{}] {suite}.{}: {:?} {:?}", self.name, c.name, c.status, c.diagnostics);
        }
        self
    }

    /// Whether qemu-run.sh skipped the configuration (status 77: the installed QEMU lacks the
    /// machine); prints why, for the test log.
    pub fn skipped(&self) -> bool {
        if self.status == Some(77) {
            eprintln!("[{}] SKIP: {}", self.name, self.log.lines().find(|l| l.contains("SKIP")).unwrap_or("skipped"));
            return true;
        }
        false
    }

    /// Assert that a case was skipped.
    pub fn assert_case_skipped(&self, suite: &str, case: &str) -> &Self {
        let c = self.report.cases.iter().find(|c| c.suite == suite && c.name == case);
        match c {
            Some(c) if matches!(c.status, Status::Skip(_)) => self,
            other => panic!("[{}] {suite}.{case} expected SKIP, got {other:?}", self.name),
        }
    }
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Boot `arch` with qemu-run.sh options `opts` (after `--no-build`); `name` identifies the
/// configuration in failures.
pub fn boot(name: &str, arch: &str, opts: &[&str]) -> Boot {
    let opts = with_dma_debug(opts);
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let opts = opts.as_slice();
    let variant: Vec<&str> = match opts.iter().position(|o| *o == "--early-uart") {
        Some(i) => opts[i..(i + 2).min(opts.len())].to_vec(),
        None => Vec::new(),
    };
    build(arch, &variant);
    let log_path = std::env::temp_dir().join(format!("dmakern-{}-{}.log", std::process::id(), sanitize(name)));
    let out = Command::new(root().join("qemu-run.sh"))
        .args(["--no-build", "--arch", arch, "--timeout", "90", "--log"])
        .arg(&log_path)
        .args(opts)
        .current_dir(root())
        .output()
        .expect("run qemu-run.sh");
    let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
    if let Ok(l) = std::fs::read_to_string(&log_path) {
        log = l;
    }
    let _ = std::fs::remove_file(&log_path);
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    let report = parse(&log);
    Boot { name: name.to_string(), status: out.status.code(), log, report }
}

/// The whole QEMU matrix runs with dma-debug on (`dma_debug=on`), except where a test chooses
/// another `dma_debug=` itself, measures (`bench=`: benchmarks run without debugging, as Linux's
/// figures do), or takes its bootargs from a DTB of its own (an `--append` would replace them).
fn with_dma_debug(opts: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
    let own_dtb = opts.iter().any(|o| matches!(*o, "--dtb" | "--dtb-raw" | "--dtb-ptr"));
    match v.iter().position(|o| o == "--append") {
        Some(i) if i + 1 < v.len() => {
            let a = &v[i + 1];
            if !a.contains("dma_debug=") && !a.contains("bench=") {
                v[i + 1] = format!("{a} dma_debug=on");
            }
        }
        _ if !own_dtb => {
            let at = v.iter().position(|o| o == "--").unwrap_or(v.len());
            v.insert(at, "dma_debug=on".into());
            v.insert(at, "--append".into());
        }
        _ => {}
    }
    v
}

/// What a test disk holds at `pos` before a run (src/drivers/virtio_pci/test_image.rs
/// `image_byte`).
pub fn image_byte(pos: u64) -> u8 {
    let sector = pos / 512;
    ((sector.wrapping_mul(31) ^ (pos % 512).wrapping_mul(7)) as u8) ^ 0x5a
}

/// What the kernel's virtio suites write at `pos` of the second MiB
/// (src/drivers/virtio_pci/test_image.rs `written_byte`).
pub fn written_byte(pos: u64) -> u8 {
    ((pos.wrapping_mul(13) >> 3) as u8) ^ 0xa5
}

const DISK_MIB: usize = 1 << 20;

/// A 2 MiB disk image `target/<dir>/<name>.img` holding `image_byte`.
pub fn disk(dir: &str, name: &str) -> PathBuf {
    let dir = root().join("target").join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.img"));
    std::fs::write(&path, (0..2 * DISK_MIB as u64).map(image_byte).collect::<Vec<u8>>()).unwrap();
    path
}

/// After a run: the first MiB unchanged, the second holding what the kernel wrote.
pub fn check_disk(b: &Boot, img: &Path) {
    let data = std::fs::read(img).unwrap();
    for (i, v) in data[..DISK_MIB].iter().enumerate() {
        assert_eq!(*v, image_byte(i as u64), "[{}] first MiB changed at {i:#x}", b.name);
    }
    for (i, v) in data[DISK_MIB..2 * DISK_MIB].iter().enumerate() {
        assert_eq!(*v, written_byte(i as u64), "[{}] the kernel's write is wrong at {:#x}", b.name, DISK_MIB + i);
    }
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
