//! The hardware-in-the-loop runner: reads dmakern's KTAP report from a serial port, judges it and
//! writes JUnit XML for CI dashboards.
//!
//! ```text
//! cargo run --release --example hil -- --port /dev/ttyUSB0 [--baud 115200] [--junit FILE]
//!     [--log FILE] [--quiet] [--timeout SECS] [--idle-timeout SECS]
//!     [--power-cycle "CMD" [--attempts N]] [--chainload IMAGE]
//! ```
//!
//! It opens the port first (raw mode, the given speed), then runs the power-cycle command if any
//! (`sh -c CMD`: a relay, `uhubctl`, a smart plug; under QEMU a monitor `cont`), so nothing the
//! board prints is lost. It echoes the console (stdout unless `--quiet`, and `--log FILE`), ignores
//! boot noise before `KTAP version 1`, and follows the report to the kernel's summary line
//! `dmakern: N passed, N failed, N skipped`. A boot that prints no KTAP header (or, chain-loading,
//! no loader request) is power-cycled again, up to `--attempts` boots in all.
//!
//! `--chainload IMAGE`: the board runs the chain loader (tests/hil/chainload); the runner answers
//! its request with IMAGE (length, CRC32, bytes: tests/hil/chainload/src/protocol.rs), sends it
//! again on a NAK, and reads the kernel's console after the loader's ACK.
//!
//! Exit status: 0 every case passed or skipped; 1 a case failed (the report is complete);
//! 2 the report is incomplete (no header, crash, time-out, lost lines, chain load failed);
//! 3 the runner could not run (bad arguments, the port, the power-cycle command, the image).

mod junit;
mod port;
// The loader half (byte-wise framing, time-outs) is used by tests/hil/chainload.
#[allow(dead_code)]
#[path = "../../tests/hil/chainload/src/protocol.rs"]
mod protocol;
// The loader's device-tree reader, included here so `cargo test` checks it on the host.
#[cfg(test)]
#[path = "../../tests/hil/chainload/src/dt.rs"]
mod loader_dt;

use dmakern::ktest::parse::{parse, Report, Status};
use port::{Input, Port};
use std::fs::File;
use std::io::Write;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: hil --port DEVICE [--baud N] [--junit FILE] [--log FILE] [--quiet] [--timeout SECS]
           [--idle-timeout SECS] [--power-cycle CMD] [--attempts N] [--chainload IMAGE]
  --port DEVICE        serial device (/dev/ttyUSB0, or a pty)
  --baud N             speed (default 115200)
  --junit FILE         write JUnit XML (one testsuite per KTAP suite)
  --log FILE           also write the console to FILE
  --quiet              do not echo the console on stdout
  --timeout SECS       give up on a boot after this long (default 600)
  --idle-timeout SECS  give up when the board is silent this long (default 60)
  --power-cycle CMD    shell command that (re)starts the board, run after the port is open
  --attempts N         boots to try when one prints no KTAP header (default 1; needs --power-cycle)
  --chainload IMAGE    answer the chain loader's request with IMAGE (kernel8.img / dmakern-aarch64.img)
  --corrupt-first-crc  (for the runner's own tests) send a wrong CRC in the first chain-load frame
exit status: 0 passed, 1 a test failed, 2 incomplete report, 3 could not run";

/// Exit statuses.
const PASSED: u8 = 0;
const TEST_FAILED: u8 = 1;
const INCOMPLETE: u8 = 2;
const CANNOT_RUN: u8 = 3;

/// How long the runner keeps reading after the summary line, for the kernel's last words.
const AFTER_SUMMARY: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct Options {
    port: String,
    baud: u32,
    junit: Option<String>,
    log: Option<String>,
    quiet: bool,
    timeout: Duration,
    idle: Duration,
    power_cycle: Option<String>,
    attempts: u32,
    chainload: Option<String>,
    corrupt_first_crc: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut o = Options {
        port: String::new(),
        baud: 115_200,
        junit: None,
        log: None,
        quiet: false,
        timeout: Duration::from_secs(600),
        idle: Duration::from_secs(60),
        power_cycle: None,
        attempts: 1,
        chainload: None,
        corrupt_first_crc: false,
    };
    fn num<T: std::str::FromStr>(opt: &str, v: Option<String>) -> Result<T, String> {
        let v = v.ok_or(format!("{opt} needs a value"))?;
        v.parse().map_err(|_| format!("{opt}: `{v}` is not a valid number"))
    }
    let secs = |opt: &str, v: Option<String>| -> Result<Duration, String> {
        let s: f64 = num(opt, v)?;
        if s.is_finite() && s > 0.0 && s < 1e9 {
            Ok(Duration::from_secs_f64(s))
        } else {
            Err(format!("{opt} needs a positive number of seconds"))
        }
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => o.port = args.next().ok_or("--port needs a device")?,
            "--baud" => o.baud = num("--baud", args.next())?,
            "--junit" => o.junit = Some(args.next().ok_or("--junit needs a file")?),
            "--log" => o.log = Some(args.next().ok_or("--log needs a file")?),
            "--quiet" => o.quiet = true,
            "--timeout" => o.timeout = secs("--timeout", args.next())?,
            "--idle-timeout" => o.idle = secs("--idle-timeout", args.next())?,
            "--power-cycle" => o.power_cycle = Some(args.next().ok_or("--power-cycle needs a command")?),
            "--attempts" => o.attempts = num("--attempts", args.next())?,
            "--chainload" => o.chainload = Some(args.next().ok_or("--chainload needs an image")?),
            "--corrupt-first-crc" => o.corrupt_first_crc = true,
            "--help" | "-h" => return Err(String::new()),
            _ => return Err(format!("unknown option `{a}`")),
        }
    }
    if o.port.is_empty() {
        return Err("--port is required".into());
    }
    if o.attempts == 0 {
        return Err("--attempts must be at least 1".into());
    }
    if o.attempts > 1 && o.power_cycle.is_none() {
        return Err("--attempts above 1 needs --power-cycle (a retry must restart the board)".into());
    }
    if o.corrupt_first_crc && o.chainload.is_none() {
        return Err("--corrupt-first-crc goes with --chainload".into());
    }
    Ok(o)
}

/// Why reading stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The summary line arrived (the report is over).
    Summary,
    /// The port closed (QEMU exited, adapter unplugged).
    Closed,
    Idle,
    Timeout,
}

/// The console of one boot: everything read, echoed as it arrives.
struct Console<'a> {
    port: &'a mut Port,
    buf: Vec<u8>,
    quiet: bool,
    log: Option<&'a mut File>,
    deadline: Instant,
    idle: Duration,
    last_input: Instant,
}

impl Console<'_> {
    /// Read once (at most the port's 0.1 s poll); `Err` with the reason reading must stop.
    fn pump(&mut self) -> Result<(), Stop> {
        let before = self.buf.len();
        match self.port.read_into(&mut self.buf) {
            Ok(Input::Data) => {
                self.last_input = Instant::now();
                let new = &self.buf[before..];
                if !self.quiet {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(new);
                    let _ = out.flush();
                }
                if let Some(f) = self.log.as_mut() {
                    let _ = f.write_all(new);
                }
            }
            Ok(Input::Nothing) => {}
            Ok(Input::Closed) => return Err(Stop::Closed),
            Err(e) => {
                eprintln!("hil: reading the port failed: {e}");
                return Err(Stop::Closed);
            }
        }
        let now = Instant::now();
        if now >= self.deadline {
            Err(Stop::Timeout)
        } else if now.duration_since(self.last_input) >= self.idle {
            Err(Stop::Idle)
        } else {
            Ok(())
        }
    }

    /// Read until `token` appears at or after `from`; its offset, or why reading stopped.
    fn wait_for(&mut self, from: usize, tokens: &[&[u8]]) -> Result<(usize, usize), Stop> {
        loop {
            for (i, t) in tokens.iter().enumerate() {
                if let Some(at) = find(&self.buf[from.min(self.buf.len())..], t) {
                    return Ok((i, from + at));
                }
            }
            self.pump()?;
        }
    }

    /// Read to the kernel's summary line (or its exit line, when it stops without one) and a
    /// moment beyond, or until reading must stop.
    fn read_report(&mut self, from: usize) -> Stop {
        let mut scanned = from;
        let mut summary_at: Option<Instant> = None;
        loop {
            // Look at complete lines only.
            if let Some(end) = self.buf[scanned..].iter().rposition(|&b| b == b'\n') {
                let text = String::from_utf8_lossy(&self.buf[scanned..scanned + end]);
                if summary_at.is_none() && text.lines().any(|l| is_summary(l) || exit_status(l).is_some()) {
                    summary_at = Some(Instant::now());
                }
                scanned += end + 1;
            }
            if summary_at.is_some_and(|t| t.elapsed() >= AFTER_SUMMARY) {
                return Stop::Summary;
            }
            match self.pump() {
                Ok(()) => {}
                Err(_) if summary_at.is_some() => return Stop::Summary,
                Err(why) => return why,
            }
        }
    }

    fn text_from(&self, from: usize) -> String {
        String::from_utf8_lossy(&self.buf[from.min(self.buf.len())..]).into_owned()
    }
}

fn is_summary(line: &str) -> bool {
    let l = line.trim_end_matches('\r');
    l.starts_with("dmakern: ") && l.contains(" passed, ") && l.contains(" failed, ") && l.ends_with(" skipped")
}

/// The status in the line the kernel prints when it exits without a semihosting host (on a
/// board): `dmakern: exit status N`.
fn exit_status(line: &str) -> Option<u32> {
    line.trim_end_matches('\r').strip_prefix("dmakern: exit status ")?.trim().parse().ok()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Send `image` in answer to the loader's requests until it acknowledges. `Ok(offset after the
/// ACK line)`, or the reason it did not work.
fn chainload(c: &mut Console, image: &[u8], corrupt_first_crc: bool) -> Result<usize, (bool, String)> {
    let header = protocol::header_for(image).ok_or((false, format!("the image must be 1 byte to {} MiB", protocol::MAX_PAYLOAD >> 20)))?;
    let mut pos = 0;
    let mut sent = 0u32;
    loop {
        if sent > protocol::MAX_FAILED_TRANSFERS {
            return Err((true, format!("{sent} transfers failed")));
        }
        // Wait for a request (or the loader's final word).
        match c.wait_for(pos, &[protocol::REQUEST, protocol::GAVE_UP]) {
            Ok((0, at)) => pos = at + protocol::REQUEST.len(),
            Ok(_) => return Err((true, "the chain loader gave up after repeated bad transfers".into())),
            Err(why) => return Err((sent == 0, format!("no request from the chain loader ({})", stop_text(why)))),
        }
        let mut h = header;
        if corrupt_first_crc && sent == 0 {
            h[8] ^= 0xff;
            eprintln!("\nhil: sending {} bytes with a deliberately wrong CRC (--corrupt-first-crc)", image.len());
        } else {
            eprintln!("\nhil: sending {} bytes (CRC32 {:#010x})", image.len(), protocol::crc32(image));
        }
        sent += 1;
        c.port.write_all(&h).map_err(|e| (true, format!("writing to the port failed: {e}")))?;
        for chunk in image.chunks(4096) {
            if Instant::now() >= c.deadline {
                return Err((true, "time-out while sending the image".into()));
            }
            c.port.write_all(chunk).map_err(|e| (true, format!("writing to the port failed: {e}")))?;
        }
        // The idle time-out counts the board's silence while we listen, not while we send.
        c.last_input = Instant::now();
        // The loader answers within its byte time-out once the frame is over.
        let wait = Duration::from_millis(protocol::BYTE_TIMEOUT_MS + protocol::QUIET_MS) + Duration::from_secs(5);
        let saved = c.deadline;
        c.deadline = saved.min(Instant::now() + wait);
        let answer = c.wait_for(pos, &[protocol::ACK, protocol::NAK, protocol::GAVE_UP, protocol::REQUEST]);
        c.deadline = saved;
        match answer {
            Ok((0, at)) => {
                let line_end = c.buf[at..].iter().position(|&b| b == b'\n').map_or(c.buf.len(), |e| at + e + 1);
                eprintln!("\nhil: the chain loader accepted the image");
                return Ok(line_end);
            }
            Ok((1, at)) => {
                eprintln!("\nhil: the chain loader refused transfer {sent}; it will ask again");
                pos = at + protocol::NAK.len();
            }
            Ok((2, _)) => return Err((true, "the chain loader gave up after repeated bad transfers".into())),
            Ok((_, at)) => {
                // A new request without ACK or NAK: the loader never saw the frame's magic (it
                // arrived while the loader was draining the line). Answer the new request.
                eprintln!("\nhil: the chain loader asked again without answering transfer {sent}");
                pos = at;
            }
            Err(why) => return Err((true, format!("no ACK or NAK from the chain loader after the transfer ({})", stop_text(why)))),
        }
    }
}

fn stop_text(s: Stop) -> &'static str {
    match s {
        Stop::Summary => "summary seen",
        Stop::Closed => "the port closed",
        Stop::Idle => "idle time-out",
        Stop::Timeout => "time-out",
    }
}

fn power_cycle(cmd: &str) -> Result<(), String> {
    eprintln!("hil: power-cycle: {cmd}");
    let st = Command::new("sh").arg("-c").arg(cmd).status().map_err(|e| format!("cannot run the power-cycle command: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("the power-cycle command failed ({st})"))
    }
}

/// What one boot produced.
struct Boot {
    text: String,
    stop: Stop,
    /// A chain-load failure, if chain-loading.
    load_error: Option<String>,
    /// Worth another boot (nothing recognisable came).
    retry: bool,
}

fn one_boot(o: &Options, port: &mut Port, log: Option<&mut File>, image: Option<&[u8]>) -> Result<Boot, String> {
    port.discard_input();
    if let Some(cmd) = &o.power_cycle {
        power_cycle(cmd)?;
    }
    let now = Instant::now();
    let mut c = Console { port, buf: Vec::new(), quiet: o.quiet, log, deadline: now + o.timeout, idle: o.idle, last_input: now };
    let mut from = 0;
    if let Some(img) = image {
        match chainload(&mut c, img, o.corrupt_first_crc) {
            Ok(after_ack) => from = after_ack,
            Err((retry, why)) => return Ok(Boot { text: c.text_from(0), stop: Stop::Closed, load_error: Some(why), retry }),
        }
    }
    let stop = c.read_report(from);
    let text = c.text_from(from);
    let retry = !text.lines().any(|l| l.trim() == "KTAP version 1");
    Ok(Boot { text, stop, load_error: None, retry })
}

/// Problems that make the report incomplete (as opposed to failed cases).
fn incompleteness(r: &Report, b: &Boot) -> Vec<String> {
    let mut p = Vec::new();
    if let Some(e) = &b.load_error {
        p.push(format!("chain load failed: {e}"));
        return p;
    }
    if !r.has_header {
        p.push("no `KTAP version 1` header".into());
    }
    if r.has_header && r.plan.is_none() {
        p.push("no KTAP plan".into());
    }
    if let Some(b) = &r.bail_out {
        p.push(format!("the kernel bailed out: {b}"));
    }
    if let Some(n) = r.plan {
        if r.bail_out.is_none() && n != r.suites.len() {
            p.push(format!("the plan announced {n} suites, {} reported", r.suites.len()));
        }
    }
    match r.summary {
        None => match b.text.lines().find_map(exit_status) {
            Some(code) => p.push(format!("the kernel stopped with exit status {code} before its summary line")),
            None => p.push(format!("no summary line (reading stopped: {})", stop_text(b.stop))),
        },
        Some((pass, fail, skip)) => {
            let count = |f: fn(&Status) -> bool| r.cases.iter().filter(|c| f(&c.status)).count();
            let seen = (count(|s| *s == Status::Pass), count(|s| *s == Status::Fail), count(|s| matches!(s, Status::Skip(_))));
            if seen != (pass, fail, skip) {
                p.push(format!(
                    "the summary says {pass} passed, {fail} failed, {skip} skipped but the report shows {}, {}, {} (lines lost on the serial line?)",
                    seen.0, seen.1, seen.2
                ));
            }
        }
    }
    p
}

fn run(o: &Options) -> Result<u8, String> {
    let image = match &o.chainload {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("cannot read the chain-load image {p}: {e}"))?),
        None => None,
    };
    let mut log = match &o.log {
        Some(p) => Some(File::create(p).map_err(|e| format!("cannot create the log {p}: {e}"))?),
        None => None,
    };
    let mut port = Port::open(&o.port, o.baud)?;
    let started = Instant::now();
    let mut attempt = 1;
    let boot = loop {
        let b = one_boot(o, &mut port, log.as_mut(), image.as_deref())?;
        if !b.retry || attempt >= o.attempts {
            break b;
        }
        attempt += 1;
        eprintln!(
            "\nhil: nothing recognisable from the board ({}); power-cycling again (boot {attempt} of {})",
            stop_text(b.stop),
            o.attempts
        );
    };
    let report = parse(&boot.text);
    let errors = incompleteness(&report, &boot);
    if let Some(path) = &o.junit {
        std::fs::write(path, junit::document(&report, &errors, started.elapsed().as_secs_f64()))
            .map_err(|e| format!("cannot write {path}: {e}"))?;
    }

    let failed: Vec<_> = report.failed_cases().collect();
    let skipped = report.cases.iter().filter(|c| matches!(c.status, Status::Skip(_))).count();
    eprintln!();
    eprintln!(
        "hil: {} suites, {} cases: {} passed, {} failed, {skipped} skipped ({:.1} s)",
        report.suites.len(),
        report.cases.len(),
        report.cases.len() - failed.len() - skipped,
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    for c in &failed {
        let why = c.diagnostics.last().map(String::as_str).unwrap_or("");
        eprintln!("hil: FAILED {}.{} {why}", c.suite, c.name);
    }
    for e in &errors {
        eprintln!("hil: INCOMPLETE: {e}");
    }
    Ok(if !errors.is_empty() {
        eprintln!("hil: result: incomplete report");
        INCOMPLETE
    } else if !failed.is_empty() || report.summary.is_some_and(|(_, f, _)| f > 0) {
        eprintln!("hil: result: {} test(s) failed", failed.len());
        TEST_FAILED
    } else {
        eprintln!("hil: result: passed");
        PASSED
    })
}

/// The whole program on `args` (without the program name): its exit status. tests/hil.rs calls
/// this in-process.
pub fn run_cli(args: impl Iterator<Item = String>) -> u8 {
    let o = match parse_args(args) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return PASSED;
        }
        Err(e) => {
            eprintln!("hil: {e}\n{USAGE}");
            return CANNOT_RUN;
        }
    };
    match run(&o) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hil: {e}");
            CANNOT_RUN
        }
    }
}

fn main() -> ExitCode {
    ExitCode::from(run_cli(std::env::args().skip(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Options, String> {
        parse_args(s.split_whitespace().map(String::from))
    }

    #[test]
    fn arguments() {
        let o = args("--port /dev/ttyUSB0 --junit j.xml --timeout 30 --idle-timeout 2.5 --power-cycle x --attempts 3").unwrap();
        assert_eq!((o.port.as_str(), o.baud, o.attempts), ("/dev/ttyUSB0", 115_200, 3));
        assert_eq!((o.timeout, o.idle), (Duration::from_secs(30), Duration::from_millis(2500)));
        assert!(args("--junit j.xml").unwrap_err().contains("--port"));
        assert!(args("--port p --attempts 2").unwrap_err().contains("--power-cycle"));
        assert!(args("--port p --timeout -1").unwrap_err().contains("positive"));
        assert!(args("--port p --baud fast").unwrap_err().contains("not a valid number"));
        assert!(args("--port p --corrupt-first-crc").unwrap_err().contains("--chainload"));
        assert!(args("--port p --frobnicate").unwrap_err().contains("unknown option"));
    }

    fn boot(text: &str, stop: Stop) -> Boot {
        Boot { text: text.into(), stop, load_error: None, retry: false }
    }

    #[test]
    fn summary_line_and_completeness() {
        assert!(is_summary("dmakern: 3 passed, 0 failed, 1 skipped\r"));
        assert!(!is_summary("# dmakern: 3 passed, 0 failed, 1 skipped"));
        assert_eq!(exit_status("dmakern: exit status 3\r"), Some(3));
        assert_eq!(exit_status("dmakern: exit status"), None);
        let ok = "KTAP version 1\n1..1\n    KTAP version 1\n    # Subtest: a\n    1..2\n    ok 1 x\n    ok 2 y # SKIP no\nok 1 a\ndmakern: 1 passed, 0 failed, 1 skipped\n";
        assert!(incompleteness(&parse(ok), &boot(ok, Stop::Summary)).is_empty());
        // A lost result line (a dropped byte on the wire) shows as a count mismatch.
        let lost = ok.replace("    ok 1 x\n", "    ok 1 x\n".replace('k', "x").as_str());
        let p = incompleteness(&parse(&lost), &boot(&lost, Stop::Summary));
        assert!(p.len() == 1 && p[0].contains("report shows 0, 0, 1"), "{p:?}");
        let cut = &ok[..ok.find("ok 1 a").unwrap()];
        let p = incompleteness(&parse(cut), &boot(cut, Stop::Idle));
        assert!(p.iter().any(|s| s.contains("plan announced 1 suites, 0")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("idle time-out")), "{p:?}");
        let died = format!("{cut}dmakern: panic: boom\ndmakern: exit status 3\n");
        let p = incompleteness(&parse(&died), &boot(&died, Stop::Summary));
        assert!(p.iter().any(|s| s.contains("exit status 3 before its summary")), "{p:?}");
    }
}
