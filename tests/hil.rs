//! The hardware-in-the-loop runner (examples/hil) and the chain loader (tests/hil/chainload)
//! against QEMU raspi3b (and raspi2b for the armv7 loader) through a pty, so CI covers them
//! without a board.
//!
//! QEMU starts paused (`-S`) with its serial port and its monitor on ptys; the runner opens the
//! serial pty and "powers the board on" with its `--power-cycle` hook writing `cont` to the
//! monitor, so it sees the console from the first byte, as with a real board behind a relay.
//! The kernel runs as on a board, without semihosting: it prints `dmakern: exit status N` and
//! powers off through the PM watchdog, which `-no-shutdown` turns into a pause, so QEMU keeps the
//! pty open until the runner has read everything (a QEMU that exits closes the pty, and Linux
//! drops what the reader had not yet taken). The runner runs in-process (its `run_cli`,
//! with the same arguments as on the command line); its unit tests (JUnit writer, protocol and
//! CRC32, the loader's device-tree reader) run here too, from the included modules.
//!
//! The runs select a few suites with `ktest.filter`: the runner is under test here, not the board
//! support (the QEMU matrix runs every suite on raspi3b).

mod common;
#[allow(dead_code)]
#[path = "../examples/hil/main.rs"]
mod hil;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Suites that pass on raspi3b, with skipped cases among them.
const FILTER: &str = "ktest.filter=cma_alloc,dma_api,memmap,dma_iommu,virtio";

fn out_dir() -> PathBuf {
    let d = common::root().join("target/hil");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The boards the tests run: QEMU machine, architecture, the chain loader's image suffix.
#[derive(Clone, Copy)]
enum Board {
    /// Raspberry Pi 3 (aarch64): kernel8.img, chainload8.img.
    Pi3,
    /// Raspberry Pi 2 (armv7): kernel7.img, chainload7.img.
    Pi2,
}

impl Board {
    fn arch(self) -> &'static str {
        match self {
            Board::Pi3 => "aarch64",
            Board::Pi2 => "armv7",
        }
    }

    fn machine(self) -> &'static str {
        match self {
            Board::Pi3 => "raspi3b",
            Board::Pi2 => "raspi2b",
        }
    }

    fn qemu(self) -> &'static str {
        match self {
            Board::Pi3 => "qemu-system-aarch64",
            Board::Pi2 => "qemu-system-arm",
        }
    }

    /// The kernel image (built once per architecture by qemu-run.sh).
    fn kernel(self) -> PathBuf {
        common::build(self.arch(), &[]);
        common::root().join(format!("target/kernel/dmakern-{}.img", self.arch()))
    }

    /// The chain loader and the probe payload (built once, both architectures, by build.sh).
    fn loader(self) -> (PathBuf, PathBuf) {
        static BUILT: OnceLock<Mutex<bool>> = OnceLock::new();
        let mut built = BUILT.get_or_init(|| Mutex::new(false)).lock().unwrap();
        let dir = out_dir();
        if !*built {
            let r = Command::new(common::root().join("tests/hil/chainload/build.sh"))
                .arg(&dir)
                .output()
                .expect("run tests/hil/chainload/build.sh");
            assert!(r.status.success(), "building the chain loader failed:\n{}", String::from_utf8_lossy(&r.stderr));
            *built = true;
        }
        let n = match self {
            Board::Pi3 => 8,
            Board::Pi2 => 7,
        };
        (dir.join(format!("chainload{n}.img")), dir.join(format!("probe{n}.img")))
    }

    /// The project's device tree for the board (tests/dts/raspi{3b,2b}.dts), compiled once.
    fn dtb(self) -> PathBuf {
        static DTBS: OnceLock<Mutex<Vec<(&'static str, PathBuf)>>> = OnceLock::new();
        let mut done = DTBS.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap();
        if let Some((_, p)) = done.iter().find(|(m, _)| *m == self.machine()) {
            return p.clone();
        }
        let src = common::root().join(format!("tests/dts/{}.dts", self.machine()));
        let p = dtb(self.machine(), &format!("/include/ \"{}\"\n", src.display()));
        done.push((self.machine(), p.clone()));
        p
    }
}

/// `src` (DTS text) compiled into target/hil/NAME.dtb.
fn dtb(name: &str, src: &str) -> PathBuf {
    let dir = out_dir();
    let (dts, out) = (dir.join(format!("{name}.dts")), dir.join(format!("{name}.dtb")));
    std::fs::write(&dts, src).unwrap();
    let r = Command::new("dtc")
        .args(["-q", "-I", "dts", "-O", "dtb", "-o"])
        .arg(&out)
        .arg(&dts)
        .output()
        .expect("dtc (apt-get install device-tree-compiler)");
    assert!(r.status.success(), "dtc {}: {}", dts.display(), String::from_utf8_lossy(&r.stderr));
    out
}

/// A paused QEMU Raspberry Pi with its console and monitor on ptys.
struct Qemu {
    child: Child,
    serial: String,
    monitor: String,
    /// The monitor pty held open: QEMU drops what arrives on a pty nobody holds.
    _monitor_open: File,
}

impl Qemu {
    /// `semihosting`: let the payload exit QEMU with a status (the probe's verdict).
    fn start(board: Board, image: &Path, dtb: &Path, append: &str, semihosting: bool) -> Qemu {
        let mut child = Command::new(board.qemu())
            .args(["-M", board.machine(), "-nodefaults", "-display", "none", "-S", "-serial", "pty", "-monitor", "pty"])
            // One host thread for the four vCPUs: the three the firmware stub parks spin, and on
            // a small CI machine they would starve the thread that feeds the UART.
            .args(["-accel", "tcg,thread=single", "-no-shutdown"])
            .args(if semihosting { &["-semihosting-config", "enable=on,target=native"][..] } else { &[] })
            .arg("-kernel")
            .arg(image)
            .arg("-dtb")
            .arg(dtb)
            .args(["-append", append])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("QEMU (apt-get install qemu-system-arm)");
        // QEMU names the ptys on stdout or stderr depending on its version: read both.
        let (tx, rx) = mpsc::channel::<String>();
        for stream in [Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>, Box::new(child.stderr.take().unwrap())] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let (mut serial, mut monitor) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while serial.is_none() || monitor.is_none() {
            let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("QEMU did not name its ptys")
            });
            let pts = line.split_whitespace().find(|w| w.starts_with("/dev/pts/")).map(String::from);
            if line.contains("label serial0") {
                serial = pts;
            } else if line.contains("label compat_monitor0") {
                monitor = pts;
            }
        }
        let monitor = monitor.unwrap();
        let hold = File::options().read(true).write(true).open(&monitor).expect("open the monitor pty");
        Qemu { child, serial: serial.unwrap(), monitor, _monitor_open: hold }
    }

    /// The power-cycle hook: resume the paused machine.
    fn power_on(&self) -> String {
        format!("printf 'cont\\n' > {}", self.monitor)
    }

    /// QEMU's exit status (the payload's, through semihosting); killed after `limit`.
    fn wait(mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the runner did.
struct Run {
    status: u8,
    log: String,
    junit: String,
}

/// Run the runner on `q`'s console with `extra` arguments.
fn run(name: &str, q: &Qemu, extra: &[&str]) -> Run {
    let dir = out_dir();
    let (log, junit) = (dir.join(format!("{name}.log")), dir.join(format!("{name}.xml")));
    let _ = std::fs::remove_file(&junit);
    let mut args: Vec<String> = vec!["--port".into(), q.serial.clone(), "--power-cycle".into(), q.power_on(), "--quiet".into()];
    args.extend(["--log".into(), log.display().to_string(), "--junit".into(), junit.display().to_string()]);
    args.extend(["--timeout".into(), "150".into(), "--idle-timeout".into(), "30".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let status = hil::run_cli(args.into_iter());
    Run { status, log: std::fs::read_to_string(&log).unwrap_or_default(), junit: std::fs::read_to_string(&junit).unwrap_or_default() }
}

/// The kernel's exit status from its last line (`dmakern: exit status N`).
fn kernel_exit(log: &str) -> Option<u32> {
    log.lines().find_map(|l| l.trim_end().strip_prefix("dmakern: exit status ")?.parse().ok())
}

/// The value of attribute `attr` of the first `<elem ` in `xml`.
fn attr(xml: &str, elem: &str, attr: &str) -> usize {
    let tag = &xml[xml.find(&format!("<{elem} ")).unwrap_or_else(|| panic!("no <{elem}> in\n{xml}"))..];
    let tag = &tag[..tag.find('>').unwrap()];
    let v = &tag[tag.find(&format!(" {attr}=\"")).unwrap_or_else(|| panic!("no {attr} in {tag}")) + attr.len() + 3..];
    v[..v.find('"').unwrap()].parse().unwrap()
}

/// The kernel's own counts, read from the console text: (plan, passed, failed, skipped).
fn kernel_counts(log: &str) -> (usize, usize, usize, usize) {
    let after = &log[log.find("KTAP version 1\r\n").or_else(|| log.find("KTAP version 1\n")).expect("no KTAP header")..];
    let plan = after.lines().find_map(|l| l.strip_prefix("1..")).expect("no plan").trim().parse().unwrap();
    let s = log.lines().find_map(|l| l.strip_prefix("dmakern: ")).expect("no summary").trim();
    let n: Vec<usize> = s.split(", ").map(|p| p.split(' ').next().unwrap().parse().unwrap()).collect();
    (plan, n[0], n[1], n[2])
}

/// The JUnit document agrees with the kernel's own counts.
fn check_junit(r: &Run) {
    let (plan, passed, failed, skipped) = kernel_counts(&r.log);
    let x = &r.junit;
    assert!(x.starts_with("<?xml"), "no JUnit written:\n{x}");
    assert_eq!(attr(x, "testsuites", "tests"), passed + failed + skipped, "{x}");
    assert_eq!(attr(x, "testsuites", "failures"), failed, "{x}");
    assert_eq!(attr(x, "testsuites", "skipped"), skipped, "{x}");
    assert_eq!(x.matches("<testcase ").count(), passed + failed + skipped, "{x}");
    assert_eq!(x.matches("<failure ").count(), failed, "{x}");
    assert_eq!(x.matches("<skipped ").count(), skipped, "{x}");
    assert_eq!(x.matches("<testsuite ").count(), plan, "{x}");
    assert!(skipped > 0 || failed > 0 || passed > 0, "empty report");
}

/// Whether `log` holds `tokens` one after another.
fn in_order(log: &str, tokens: &[&str]) -> bool {
    let mut from = 0;
    tokens.iter().all(|t| match log[from..].find(t) {
        Some(i) => {
            from += i + t.len();
            true
        }
        None => false,
    })
}

#[test]
fn plain_boot_passes_and_junit_matches_the_report() {
    let b = Board::Pi3;
    let q = Qemu::start(b, &b.kernel(), &b.dtb(), FILTER, false);
    let r = run("plain", &q, &[]);
    drop(q);
    assert_eq!(r.status, 0, "runner status (0 = passed)\n{}", r.log);
    assert_eq!(kernel_exit(&r.log), Some(0), "kernel exit status\n{}", r.log);
    assert!(r.log.contains("dmakern 0.1.0"), "the banner (printed before any KTAP) was lost:\n{}", r.log);
    check_junit(&r);
    assert!(r.junit.contains("<skipped message="), "{}", r.junit);
}

/// The kernel sent by the runner through the chain loader passes, on both architectures.
fn chain_loaded_kernel_passes(b: Board) {
    let (loader, _) = b.loader();
    let q = Qemu::start(b, &loader, &b.dtb(), FILTER, false);
    let k = b.kernel();
    let r = run(&format!("chainload-{}", b.arch()), &q, &["--chainload", k.to_str().unwrap()]);
    drop(q);
    assert_eq!(r.status, 0, "runner status (0 = passed)\n{}", r.log);
    assert_eq!(kernel_exit(&r.log), Some(0), "kernel exit status\n{}", r.log);
    let banner = format!("dmakern-chainload 0.1.0 ({}): console pl011 at 0x3f201000", b.arch());
    assert!(r.log.contains(&banner), "{}", r.log);
    assert_eq!(r.log.matches("dmakern-chainload:ACK").count(), 1, "{}", r.log);
    assert!(!r.log.contains("dmakern-chainload:NAK"), "{}", r.log);
    check_junit(&r);
}

#[test]
fn chain_loaded_kernel_passes_aarch64() {
    chain_loaded_kernel_passes(Board::Pi3);
}

#[test]
fn chain_loaded_kernel_passes_armv7() {
    chain_loaded_kernel_passes(Board::Pi2);
}

/// A bad CRC is refused and the image sent again. The payload is the probe (src/probe.rs): its
/// exit status 42 proves it ran from a 2 MiB-aligned address with the DTB and the other boot
/// registers as the architecture's protocol wants them.
fn corrupted_transfer_is_refused_and_sent_again(b: Board) {
    let (loader, probe) = b.loader();
    let q = Qemu::start(b, &loader, &b.dtb(), "", true);
    let r = run(&format!("corrupt-{}", b.arch()), &q, &["--chainload", probe.to_str().unwrap(), "--corrupt-first-crc"]);
    let exit = q.wait(Duration::from_secs(30));
    let tokens = ["dmakern-chainload:REQ", "dmakern-chainload:NAK CRC mismatch", "dmakern-chainload:REQ", "dmakern-chainload:ACK"];
    assert!(in_order(&r.log, &tokens), "expected REQ, NAK, REQ, ACK in order:\n{}", r.log);
    assert_eq!(exit, Some(42), "the probe's verdict on the hand-over (43: registers or DTB, 44: alignment)\n{}", r.log);
    // The probe prints no KTAP: the runner must call that incomplete (2), not a pass.
    assert_eq!(r.status, 2, "{}", r.log);
    assert!(r.junit.contains("<error message=\"no `KTAP version 1` header\""), "{}", r.junit);
}

#[test]
fn corrupted_transfer_is_refused_and_sent_again_aarch64() {
    corrupted_transfer_is_refused_and_sent_again(Board::Pi3);
}

#[test]
fn corrupted_transfer_is_refused_and_sent_again_armv7() {
    corrupted_transfer_is_refused_and_sent_again(Board::Pi2);
}

/// A case that really fails: the device tree promises a fifth CPU the SoC does not have, and the
/// kernel's smp suite finds fewer CPUs online than the DT lists.
#[test]
fn failing_case_exits_1_with_a_junit_failure() {
    let src = common::root().join("tests/dts/raspi3b.dts");
    let d = dtb(
        "raspi3b-fifth-cpu",
        &format!(
            "/include/ \"{}\"\n/ {{ cpus {{ cpu@4 {{ device_type = \"cpu\"; compatible = \"arm,cortex-a53\"; reg = <4>; enable-method = \"spin-table\"; cpu-release-addr = <0x0 0xf8>; }}; }}; }};\n",
            src.display()
        ),
    );
    let b = Board::Pi3;
    let q = Qemu::start(b, &b.kernel(), &d, "ktest.filter=smp", false);
    let r = run("failing", &q, &[]);
    drop(q);
    assert_eq!(r.status, 1, "runner status (1 = a test failed)\n{}", r.log);
    assert_eq!(kernel_exit(&r.log), Some(1), "kernel exit status (1 = tests failed)\n{}", r.log);
    check_junit(&r);
    assert!(
        r.junit.contains("<testcase classname=\"dmakern.smp\" name=\"every_cpu_runs_work\">\n      <failure message=\""),
        "{}",
        r.junit
    );
    assert!(r.junit.contains("CPUs online"), "the failure keeps the kernel's diagnostic:\n{}", r.junit);
}

/// A crash leaves an incomplete report: exit 2 and a JUnit error, even though no case failed.
#[test]
fn crash_is_an_incomplete_report() {
    let b = Board::Pi3;
    let q = Qemu::start(b, &b.kernel(), &b.dtb(), "crash=panic", false);
    let r = run("crash", &q, &[]);
    drop(q);
    assert_eq!(kernel_exit(&r.log), Some(3), "kernel exit status (3 = panic)\n{}", r.log);
    assert_eq!(r.status, 2, "runner status (2 = incomplete)\n{}", r.log);
    assert!(r.log.contains("deliberate panic"), "{}", r.log);
    assert!(r.junit.contains("errors=\"1\"") && r.junit.contains("<error message=\"no `KTAP version 1` header\""), "{}", r.junit);
    assert!(r.junit.contains("\nthe kernel stopped with exit status 3 before its summary line</error>"), "{}", r.junit);
}

#[test]
fn unusable_port_or_arguments_exit_3() {
    let run = |a: &[&str]| hil::run_cli(a.iter().map(|s| s.to_string()));
    assert_eq!(run(&["--port", "/nonexistent/ttyUSB9"]), 3);
    // A regular file is not a terminal.
    let f = out_dir().join("not-a-tty");
    std::fs::write(&f, b"").unwrap();
    assert_eq!(run(&["--port", f.to_str().unwrap()]), 3);
    assert_eq!(run(&["--port", "/dev/null", "--attempts", "2"]), 3);
    assert_eq!(run(&["--port", "/dev/null", "--chainload", "/nonexistent.img"]), 3);
}
