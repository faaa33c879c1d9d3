//! The foundation matrix: both architectures boot on QEMU virt in the configurations the kernel must
//! handle (GICv2/GICv3, several CPUs models, 1 and 4 CPUs, small and large RAM), run every suite, and
//! exit 0; deliberately broken device trees stop the boot with a clear message and status 2.

mod common;
use common::{boot, dtb, path_str};

#[test]
fn aarch64_virt_default() {
    boot("aarch64 virt cortex-a57 1G", "aarch64", &[])
        .assert_passed()
        .assert_log_contains("dmakern ")
        .assert_log_contains("memory map");
}

#[test]
fn aarch64_virt_a53_gicv2_128m_smp1() {
    boot("aarch64 virt gicv2 cortex-a53 128M smp1", "aarch64", &["--cpu", "cortex-a53", "--mem", "128M", "--", "-M", "virt,gic-version=2"])
        .assert_passed();
}

#[test]
fn aarch64_virt_max_gicv3_2g_smp4() {
    boot("aarch64 virt gicv3 max 2G smp4", "aarch64", &["--cpu", "max", "--mem", "2G", "--smp", "4", "--", "-M", "virt,gic-version=3"])
        .assert_passed();
}

#[test]
fn aarch64_virt_a53_gicv3_2g_smp4() {
    boot("aarch64 virt gicv3 cortex-a53 2G smp4", "aarch64", &["--cpu", "cortex-a53", "--mem", "2G", "--smp", "4", "--", "-M", "virt,gic-version=3"])
        .assert_passed();
}

#[test]
fn aarch64_virt_max_gicv2_128m_smp1() {
    boot("aarch64 virt gicv2 max 128M", "aarch64", &["--cpu", "max", "--mem", "128M", "--", "-M", "virt,gic-version=2"])
        .assert_passed();
}

#[test]
fn aarch64_virt_3g_entered_at_el2() {
    boot("aarch64 virt gicv3 max 3G smp4 EL2", "aarch64", &["--cpu", "max", "--mem", "3G", "--smp", "4", "--", "-M", "virt,gic-version=3,virtualization=on"])
        .assert_passed()
        .assert_log_contains("entered at EL2");
}

/// Exactly what `./qemu-run.sh --arch armv7` does: QEMU's defaults, highmem on (the PCI ECAM then
/// lies above 4 GiB).
#[test]
fn armv7_virt_defaults() {
    boot("armv7 virt defaults", "armv7", &[]).assert_passed();
}

#[test]
fn armv7_virt_a15() {
    boot("armv7 virt cortex-a15 1G", "armv7", &["--cpu", "cortex-a15", "--", "-M", "virt,highmem=off"]).assert_passed();
}

#[test]
fn armv7_virt_a7_highmem_off_smp4() {
    boot("armv7 virt cortex-a7 2G smp4", "armv7", &["--cpu", "cortex-a7", "--mem", "2G", "--smp", "4", "--", "-M", "virt,highmem=off"])
        .assert_passed();
}

#[test]
fn armv7_virt_a15_128m_hyp() {
    boot("armv7 virt cortex-a15 128M HYP", "armv7", &["--cpu", "cortex-a15", "--mem", "128M", "--", "-M", "virt,highmem=off,virtualization=on"])
        .assert_passed()
        .assert_log_contains("entered at HYP");
}

/// Reservations from /memreserve/ and /reserved-memory stay out of the free memory: the kernel's
/// `memmap` suite checks it against the DT, and the printed map names each one.
#[test]
fn aarch64_reserved_memory_dtb() {
    let d = dtb("virt-reserved");
    let b = boot("aarch64 virt reserved-memory DTB", "aarch64", &["--dtb", &path_str(&d)]);
    b.assert_passed()
        .assert_case_passed("memmap", "free_ranges_avoid_reservations")
        .assert_log_contains("0x0000000041000000-0x000000004100ffff")
        .assert_log_contains("memreserve")
        .assert_log_contains("0x0000000042000000-0x00000000421fffff")
        .assert_log_contains("no-map");
}
