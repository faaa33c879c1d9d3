//! Mutations of REAL device trees for the bad-input matrix (`tests/bad_input_mutations.rs`).
//!
//! The starting point is the blob the installed QEMU generates for the machine under test
//! (`-M virt,dumpdtb=FILE`), dumped once per test binary into `target/mutations/`: the installed
//! QEMU decides what "real" is, so the mutations follow it when QEMU's layout changes. Two ways to
//! break it:
//! - bytes: the header's fields (`set_header`) and truncation, for what no compiler would emit;
//! - source: the blob decompiled with dtc ([`Dts`]), edited node by node, and compiled back, for
//!   trees that are well-formed but lie (cyclic phandles, absurd cells, bad `dma-ranges`).
//!
//! The edits work on dtc's decompiled layout: one node opening per line (`name {`), one property
//! per line, `};` closing, tabs for depth.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Byte offsets of the big-endian header fields (devicetree specification, 5.2).
pub mod header {
    pub const TOTALSIZE: usize = 4;
    pub const OFF_DT_STRUCT: usize = 8;
    pub const OFF_DT_STRINGS: usize = 12;
    pub const OFF_MEM_RSVMAP: usize = 16;
    pub const VERSION: usize = 20;
    pub const SIZE_DT_STRUCT: usize = 36;
}

/// `target/mutations/`, where the dumps, the mutated blobs and the test disk go.
fn dir() -> PathBuf {
    let d = crate::common::root().join("target/mutations");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// QEMU's own DTB for `arch`'s virt machine as the QEMU matrix boots it (aarch64: cortex-a57;
/// armv7: cortex-a15 with `highmem=off`; 1 GiB each), dumped on first use.
pub fn qemu_dtb(arch: &str) -> Vec<u8> {
    static DUMPED: OnceLock<Mutex<Vec<(String, Vec<u8>)>>> = OnceLock::new();
    let dumped = DUMPED.get_or_init(|| Mutex::new(Vec::new()));
    let mut done = dumped.lock().unwrap();
    if let Some((_, b)) = done.iter().find(|(a, _)| a == arch) {
        return b.clone();
    }
    let file = dir().join(format!("qemu-virt-{arch}.dtb"));
    let (qemu, machine, cpu) = match arch {
        "aarch64" => ("qemu-system-aarch64", "virt", "cortex-a57"),
        "armv7" => ("qemu-system-arm", "virt,highmem=off", "cortex-a15"),
        other => panic!("no QEMU machine for arch {other}"),
    };
    let out = Command::new(qemu)
        .args(["-M", &format!("{machine},dumpdtb={}", file.display()), "-cpu", cpu, "-m", "1G", "-nodefaults", "-display", "none"])
        .output()
        .unwrap_or_else(|e| panic!("run {qemu}: {e}"));
    assert!(out.status.success(), "{qemu} dumpdtb: {}", String::from_utf8_lossy(&out.stderr));
    let blob = std::fs::read(&file).unwrap();
    assert_eq!(get(&blob, 0), 0xd00d_feed, "{} is not a DTB", file.display());
    done.push((arch.to_string(), blob.clone()));
    blob
}

/// The big-endian word at byte `off`.
pub fn get(blob: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(blob[off..off + 4].try_into().unwrap())
}

/// `blob` with the header field at `field` (see [`header`]) set to `value`.
pub fn set_header(blob: &[u8], field: usize, value: u32) -> Vec<u8> {
    let mut b = blob.to_vec();
    b[field..field + 4].copy_from_slice(&value.to_be_bytes());
    b
}

/// Writes `bytes` to `target/mutations/NAME` and returns the path.
pub fn write(name: &str, bytes: &[u8]) -> String {
    let p = dir().join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_string_lossy().into_owned()
}

/// A decompiled device tree under edit.
#[derive(Clone)]
pub struct Dts {
    lines: Vec<String>,
}

/// Where a node sits in [`Dts::lines`]: its opening line, its closing `};` line, its depth.
struct Span {
    open: usize,
    close: usize,
    depth: usize,
}

fn dtc(args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("dtc")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("dtc is needed (apt-get install device-tree-compiler)");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "dtc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

impl Dts {
    /// `blob` decompiled by dtc.
    pub fn decompile(blob: &[u8]) -> Dts {
        let text = String::from_utf8(dtc(&["-q", "-I", "dtb", "-O", "dts", "-"], blob)).unwrap();
        Dts { lines: text.lines().map(str::to_string).collect() }
    }

    /// Compiled back to a blob; `-f` so that dtc's own checks (which a mutation sets out to
    /// break) do not stop it.
    pub fn compile(&self) -> Vec<u8> {
        dtc(&["-q", "-f", "-I", "dts", "-O", "dtb", "-"], self.lines.join("\n").as_bytes())
    }

    fn span(&self, path: &str) -> Span {
        let want: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        // (name, opening line) of the nodes open at this line; the root's name is "/".
        let mut stack: Vec<(&str, usize)> = Vec::new();
        for (i, l) in self.lines.iter().enumerate() {
            let t = l.trim();
            if let Some(name) = t.strip_suffix(" {") {
                // A label (`label: name {`) is not part of the name.
                stack.push((name.rsplit(": ").next().unwrap(), i));
            } else if t == "};" {
                let here: Vec<&str> = stack.iter().skip(1).map(|(n, _)| *n).collect();
                let (_, open) = stack.pop().unwrap_or_else(|| panic!("unbalanced DTS at line {i}"));
                if here == want {
                    return Span { open, close: i, depth: stack.len() };
                }
            }
        }
        panic!("no node {path} in the decompiled tree");
    }

    fn indent(depth: usize) -> String {
        "\t".repeat(depth)
    }

    /// Sets property `prop` of node `path` to `value` (DTS syntax: `<0x1 0x2>`, `"text"`), or to
    /// an empty (boolean) property for `None`; replaces an existing one.
    pub fn set(&mut self, path: &str, prop: &str, value: Option<&str>) -> &mut Self {
        let s = self.span(path);
        let ind = Self::indent(s.depth + 1);
        let line = match value {
            Some(v) => format!("{ind}{prop} = {v};"),
            None => format!("{ind}{prop};"),
        };
        match self.own_prop_line(&s, prop) {
            Some(i) => self.lines[i] = line,
            None => self.lines.insert(s.open + 1, line),
        }
        self
    }

    /// The line of `prop` directly in the node (not in a child).
    fn own_prop_line(&self, s: &Span, prop: &str) -> Option<usize> {
        let ind = Self::indent(s.depth + 1);
        (s.open + 1..s.close).find(|&i| {
            let l = &self.lines[i];
            l.strip_prefix(&ind).is_some_and(|r| !r.starts_with('\t') && (r.starts_with(&format!("{prop} = ")) || r == format!("{prop};")))
        })
    }

    /// Adds `body` (DTS text of one or more nodes, indented from column 0) as children of `path`.
    pub fn add(&mut self, path: &str, body: &str) -> &mut Self {
        let s = self.span(path);
        let ind = Self::indent(s.depth + 1);
        let new: Vec<String> = body.lines().filter(|l| !l.trim().is_empty()).map(|l| format!("{ind}{l}")).collect();
        self.lines.splice(s.close..s.close, new);
        self
    }

    /// Removes node `path` and returns its text, indented from column 0.
    pub fn take(&mut self, path: &str) -> String {
        let s = self.span(path);
        let ind = Self::indent(s.depth);
        let text: Vec<String> = self.lines.drain(s.open..=s.close).map(|l| l.strip_prefix(&ind).unwrap_or(&l).to_string()).collect();
        text.join("\n")
    }

    /// Moves node `path` into a new node `bus` (its properties `props`, DTS text, one per line)
    /// put where the node was, so that the order of the nodes stays the same.
    pub fn wrap(&mut self, path: &str, bus: &str, props: &str) -> &mut Self {
        let s = self.span(path);
        let ind = Self::indent(s.depth);
        let inner = Self::indent(s.depth + 1);
        for i in s.open..=s.close {
            self.lines[i].insert(0, '\t');
        }
        self.lines.insert(s.close + 1, format!("{ind}}};"));
        let head = std::iter::once(format!("{ind}{bus} {{")).chain(props.lines().filter(|l| !l.trim().is_empty()).map(|l| format!("{inner}{}", l.trim())));
        self.lines.splice(s.open..s.open, head);
        self
    }

    /// Adds a `/memreserve/` entry.
    pub fn memreserve(&mut self, base: u64, size: u64) -> &mut Self {
        let at = self.lines.iter().position(|l| l.trim() == "/dts-v1/;").expect("no /dts-v1/ line") + 1;
        self.lines.insert(at, format!("/memreserve/ {base:#x} {size:#x};"));
        self
    }
}
