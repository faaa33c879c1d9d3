//! Bad input on the kernel side: device trees that are missing, corrupt or inconsistent, malformed
//! bootargs, and deliberate crashes. Each must give a clear message and a non-zero status (2 for a
//! refused boot, 3 for a panic, 4 for an unexpected exception), never a hang or a wrong memory map.
//!
//! Blobs QEMU itself would refuse are handed over with `qemu-run.sh --dtb-raw`, which plays the boot
//! loader. Messages printed before the DT names a console need the early-UART build.

mod common;
use common::{boot, dtb, path_str, root};

const EARLY_UART: &str = "0x09000000";

fn write_blob(name: &str, bytes: &[u8]) -> String {
    let dir = root().join("target/dtb");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    path_str(&p)
}

fn refused(name: &str, arch: &str, opts: &[&str], message: &str) {
    let b = boot(name, arch, opts);
    assert_eq!(b.status, Some(2), "[{name}] expected a refused boot (status 2)\n{}", common::tail(&b.log, 30));
    b.assert_log_contains("dmakern: boot error: ").assert_log_contains(message);
}

#[test]
fn minimal_dtb_boots() {
    let d = dtb("minimal");
    for arch in ["aarch64", "armv7"] {
        boot(&format!("{arch} minimal DTB"), arch, &["--dtb-raw", &path_str(&d)]).assert_passed();
    }
}

#[test]
fn null_dtb_pointer() {
    for arch in ["aarch64", "armv7"] {
        refused(&format!("{arch} null DTB"), arch, &["--early-uart", EARLY_UART, "--dtb-ptr", "0"], "null pointer");
    }
}

#[test]
fn null_dtb_pointer_without_console_still_exits_2() {
    let b = boot("aarch64 null DTB, no early UART", "aarch64", &["--dtb-ptr", "0"]);
    assert_eq!(b.status, Some(2), "{}", b.log);
}

#[test]
fn misaligned_dtb_pointer() {
    let d = path_str(&dtb("minimal"));
    refused("aarch64 misaligned DTB", "aarch64", &["--early-uart", EARLY_UART, "--dtb-raw", &d, "--dtb-ptr", "0x48000004"], "not 8-byte aligned");
}

#[test]
fn pointer_at_no_dtb() {
    // RAM that holds no DTB: the blob is placed at RAM + 128 MiB but the pointer names RAM + 64 MiB.
    let d = path_str(&dtb("minimal"));
    refused("aarch64 pointer at no DTB", "aarch64", &["--early-uart", EARLY_UART, "--dtb-raw", &d, "--dtb-ptr", "0x44000000"], "bad magic");
}

#[test]
fn bad_magic() {
    let mut blob = std::fs::read(dtb("minimal")).unwrap();
    blob[0] ^= 0xff;
    let f = write_blob("bad-magic.dtb", &blob);
    for arch in ["aarch64", "armv7"] {
        refused(&format!("{arch} bad magic"), arch, &["--early-uart", EARLY_UART, "--dtb-raw", &f], "bad magic");
    }
}

#[test]
fn truncated_dtb() {
    // totalsize (big-endian at offset 4) cut below the end of the structure block.
    let mut blob = std::fs::read(dtb("minimal")).unwrap();
    blob[4..8].copy_from_slice(&0x100u32.to_be_bytes());
    let f = write_blob("truncated.dtb", &blob);
    refused("aarch64 truncated DTB", "aarch64", &["--early-uart", EARLY_UART, "--dtb-raw", &f], "truncated");
}

#[test]
fn garbage_structure_block() {
    // A valid header over a structure block whose first token is garbage.
    let mut blob = std::fs::read(dtb("minimal")).unwrap();
    let off = u32::from_be_bytes(blob[8..12].try_into().unwrap()) as usize;
    blob[off..off + 4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    let f = write_blob("garbage-struct.dtb", &blob);
    refused("aarch64 garbage structure block", "aarch64", &["--early-uart", EARLY_UART, "--dtb-raw", &f], "malformed structure block");
}

#[test]
fn overlapping_reservations() {
    let d = path_str(&dtb("bad-overlap"));
    for arch in ["aarch64", "armv7"] {
        refused(&format!("{arch} overlapping reservations"), arch, &["--dtb-raw", &d], "overlaps");
    }
}

#[test]
fn reservation_outside_ram() {
    let d = path_str(&dtb("bad-outside-ram"));
    refused("aarch64 reservation outside RAM", "aarch64", &["--dtb-raw", &d], "lies entirely outside RAM");
}

#[test]
fn reservation_over_the_kernel() {
    let d = path_str(&dtb("bad-kernel-overlap"));
    refused("aarch64 reservation over the kernel", "aarch64", &["--dtb-raw", &d], "kernel image");
}

#[test]
fn no_memory_node() {
    let d = path_str(&dtb("bad-no-memory"));
    refused("aarch64 no /memory", "aarch64", &["--dtb-raw", &d], "no usable RAM");
}

#[test]
fn zero_sized_memory() {
    let d = path_str(&dtb("bad-zero-memory"));
    refused("aarch64 zero-sized /memory", "aarch64", &["--dtb-raw", &d], "no usable RAM");
}

#[test]
fn absurd_address_cells() {
    let d = path_str(&dtb("bad-cells"));
    refused("aarch64 #address-cells = 5", "aarch64", &["--early-uart", EARLY_UART, "--dtb-raw", &d], "#address-cells");
}

#[test]
fn malformed_bootargs_in_dtb() {
    let d = path_str(&dtb("bad-bootargs"));
    refused("aarch64 unterminated quote in /chosen/bootargs", "aarch64", &["--dtb-raw", &d], "unterminated quote");
}

#[test]
fn malformed_bootargs_on_the_command_line() {
    refused("armv7 unterminated quote in -append", "armv7", &["--append", "ktest.filter=\"kmap", "--", "-M", "virt,highmem=off"], "unterminated quote");
}

#[test]
fn unknown_bootargs_are_reported_and_ignored() {
    boot("aarch64 unknown bootarg", "aarch64", &["--append", "no.such.key=1 ktest.filter=kmap"])
        .assert_passed()
        .assert_log_contains("unknown key `no.such.key`");
}

#[test]
fn ktest_filter_selects_cases() {
    let b = boot("aarch64 ktest.filter", "aarch64", &["--append", "ktest.filter=kmap.mmu*"]);
    b.assert_passed();
    assert_eq!(b.report.cases.len(), 1, "{:?}", b.report.cases);
    b.assert_case_passed("kmap", "mmu_and_caches_on");
}

#[test]
fn data_abort_is_reported() {
    for (arch, extra) in [("aarch64", vec![]), ("armv7", vec!["--", "-M", "virt,highmem=off"])] {
        let mut opts = vec!["--append", "crash=abort"];
        opts.extend(extra);
        let b = boot(&format!("{arch} crash=abort"), arch, &opts);
        assert_eq!(b.status, Some(4), "[{arch}] unexpected exception must exit 4\n{}", common::tail(&b.log, 30));
        b.assert_log_contains("unexpected exception").assert_log_contains("translation fault");
    }
}

#[test]
fn undefined_instruction_is_reported() {
    let b = boot("aarch64 crash=undef", "aarch64", &["--append", "crash=undef"]);
    assert_eq!(b.status, Some(4), "{}", common::tail(&b.log, 30));
    b.assert_log_contains("undefined instruction");
}

#[test]
fn panic_is_reported() {
    for (arch, extra) in [("aarch64", vec![]), ("armv7", vec!["--", "-M", "virt,highmem=off"])] {
        let mut opts = vec!["--append", "crash=panic"];
        opts.extend(extra);
        let b = boot(&format!("{arch} crash=panic"), arch, &opts);
        assert_eq!(b.status, Some(3), "[{arch}] a panic must exit 3\n{}", common::tail(&b.log, 30));
        b.assert_log_contains("panic").assert_log_contains("src/kernel.rs");
    }
}
