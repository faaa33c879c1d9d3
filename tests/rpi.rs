//! The Raspberry Pi matrix: QEMU's raspi3b (aarch64), raspi2b (armv7) and raspi4b (aarch64, QEMU
//! 9.0 and later; skipped with a message on an older QEMU) boot the same images as virt, with the
//! project's own device trees (tests/dts/raspi*.dts) and with the real upstream DTBs from Debian's
//! kernel packages, and run every suite. The BCM2835 DMA engine suite must really run (not skip) and
//! pass byte-exact through dma-direct, with every transfer bounced (`swiotlb=force`), and with
//! coherent buffers from both remap strategies (the Pi's DMA masters are not cache-coherent).

mod common;
use common::{boot, debian_dtb, path_str, Boot};

/// (machine, architecture, the model name the project's DTS gives).
const BOARDS: [(&str, &str, &str); 3] = [
    ("raspi3b", "aarch64", "Raspberry Pi 3 Model B (dmakern DTS)"),
    ("raspi2b", "armv7", "Raspberry Pi 2 Model B (dmakern DTS)"),
    ("raspi4b", "aarch64", "Raspberry Pi 4 Model B (dmakern DTS)"),
];

fn board(machine: &str) -> (&'static str, &'static str, &'static str) {
    *BOARDS.iter().find(|b| b.0 == machine).expect("a board of the matrix")
}

fn boot_board(machine: &str, append: &str, extra: &[&str]) -> Option<Boot> {
    let (m, arch, _) = board(machine);
    let mut opts = vec!["--machine", m, "--append", append];
    opts.extend_from_slice(extra);
    let b = boot(&format!("{m} {append} {}", extra.join(" ")), arch, &opts);
    (!b.skipped()).then_some(b)
}

/// Every suite on the project's DTS, all CPUs up, the DMA engine suite run for real.
fn own_dts(machine: &str) {
    let (_, _, model) = board(machine);
    if let Some(b) = boot_board(machine, "", &[]) {
        b.assert_passed()
            .assert_log_contains(model)
            .assert_log_contains("4 CPU(s) online")
            .assert_suite_ran("bcm2835_dma")
            .assert_suite_ran("smp");
    }
}

#[test]
fn raspi3b_own_dts() {
    own_dts("raspi3b");
}

#[test]
fn raspi2b_own_dts() {
    own_dts("raspi2b");
}

#[test]
fn raspi4b_own_dts() {
    own_dts("raspi4b");
}

/// The DMA engine suite through each way the DMA API can serve it.
fn dma_engine_paths(machine: &str) {
    for append in ["swiotlb=force", "dma.remap=window", "dma.remap=inplace"] {
        if let Some(b) = boot_board(machine, &format!("ktest.filter=bcm2835_dma {append}"), &[]) {
            b.assert_passed().assert_suite_ran("bcm2835_dma");
        }
    }
}

#[test]
fn raspi3b_dma_engine_bounced_and_remapped() {
    dma_engine_paths("raspi3b");
}

#[test]
fn raspi2b_dma_engine_bounced_and_remapped() {
    dma_engine_paths("raspi2b");
}

#[test]
fn raspi4b_dma_engine_bounced_and_remapped() {
    dma_engine_paths("raspi4b");
}

/// Every suite on the real upstream DTB Debian ships for the board, as the Pi firmware would pass
/// it (QEMU fills /memory and /chosen/bootargs the same way). Their stdout-path differs from ours
/// (the mini UART on Pi 3 and 4), and the Pi 2 one starts its secondaries through the ARM-local
/// mailboxes named at /cpus.
fn debian_dts(machine: &str, dtb: &str) {
    let Some(path) = debian_dtb(dtb) else { return };
    if let Some(b) = boot_board(machine, "", &["--dtb", &path_str(&path)]) {
        b.assert_passed().assert_log_contains("4 CPU(s) online").assert_suite_ran("bcm2835_dma");
    }
}

#[test]
fn raspi3b_debian_dtb() {
    debian_dts("raspi3b", "bcm2837-rpi-3-b.dtb");
}

#[test]
fn raspi2b_debian_dtb() {
    debian_dts("raspi2b", "bcm2836-rpi-2-b.dtb");
}

#[test]
fn raspi4b_debian_dtb() {
    debian_dts("raspi4b", "bcm2711-rpi-4-b.dtb");
}

/// The Pi firmware's own DTBs leave `/memory reg` zero-sized for the firmware to fill (QEMU
/// rewrites /memory whenever it is given a DTB, so the blob goes in byte for byte): the kernel takes
/// the ARM memory from the firmware's mailbox and says so.
fn firmware_fills_memory(machine: &str, zero_reg: &[&str]) {
    let (m, arch, _) = board(machine);
    let src = common::dtb(machine);
    let blob = std::env::temp_dir().join(format!("dmakern-{}-{m}-fw-memory.dtb", std::process::id()));
    std::fs::copy(&src, &blob).unwrap();
    for (node, prop, kind, values) in [("/memory@0", "reg", "x", zero_reg), ("/chosen", "bootargs", "s", &["dma_debug=on"][..])] {
        let out = std::process::Command::new("fdtput").arg("-t").arg(kind).arg(&blob).args([node, prop]).args(values).output().expect("fdtput (device-tree-compiler)");
        assert!(out.status.success(), "fdtput: {}", String::from_utf8_lossy(&out.stderr));
    }
    let b = boot(&format!("{m} zero-sized /memory"), arch, &["--machine", m, "--dtb-raw", &path_str(&blob)]);
    let _ = std::fs::remove_file(&blob);
    if !b.skipped() {
        b.assert_passed()
            .assert_log_contains("the device tree describes no RAM; the firmware's mailbox gives 0x0000000000000000-0x000000003bffffff (960 MiB)")
            .assert_log_contains("4 CPU(s) online");
    }
}

#[test]
fn raspi3b_memory_from_the_firmware() {
    firmware_fills_memory("raspi3b", &["0", "0"]);
}

#[test]
fn raspi2b_memory_from_the_firmware() {
    firmware_fills_memory("raspi2b", &["0", "0"]);
}

#[test]
fn raspi4b_memory_from_the_firmware() {
    firmware_fills_memory("raspi4b", &["0", "0", "0"]);
}

/// A machine the script does not know is refused with a clear message.
#[test]
fn unknown_machine_is_refused() {
    let out = std::process::Command::new(common::root().join("qemu-run.sh"))
        .args(["--machine", "raspi9", "--no-build"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("raspi2b, raspi3b, raspi4b"), "{err}");
}
