//! The DMA matrix: aarch64 and armv7 virt, each plain, with `swiotlb=force` and with
//! `dma.noncoherent` under both dma-remap strategies (`dma.remap=window`, `dma.remap=inplace`),
//! with real bus masters attached: QEMU's `edu` (32-bit DMA mask) for the
//! streaming, coherent and scatter-gather suites, a virtio-blk disk image this test writes with
//! a known pattern (the kernel reads it and writes the second MiB, which is checked here after
//! the run) and virtio-rng. A last configuration keeps edu's default 28-bit mask, which cannot
//! reach RAM at 1 GiB: the kernel must refuse the mask and the mapping.

mod common;
use common::{boot, check_disk, disk, dtb, path_str, Boot};
use std::path::PathBuf;

const SUITES: &str = "ktest.filter=dma_api,dma_remap,dma_debug,virtio,virtio_pci";

fn machine(arch: &str) -> &'static [&'static str] {
    match arch {
        "aarch64" => &["-M", "virt"],
        _ => &["-M", "virt,highmem=off"],
    }
}

/// Boots with edu, a virtio-blk-mmio disk, virtio-rng and a modern virtio-blk-pci disk that
/// negotiates VIRTIO_F_ACCESS_PLATFORM (`iommu_platform=on`); returns both disk images.
fn run(arch: &str, name: &str, append: &str, edu_mask: &str) -> (Boot, [PathBuf; 2]) {
    let base = format!("{arch}-{}", name.replace(['=', '.', ' '], "_"));
    let (img, pci_img) = (disk("dma-disks", &base), disk("dma-disks", &format!("{base}-pci")));
    let append = format!("{append} {SUITES} edu.dma_mask={edu_mask}");
    let drive = format!("file={},if=none,format=raw,id=d0", path_str(&img));
    let pci_drive = format!("file={},if=none,format=raw,id=d1", path_str(&pci_img));
    let edu = format!("edu,dma_mask={edu_mask}");
    let mut opts: Vec<&str> = vec!["--append", &append, "--"];
    opts.extend_from_slice(machine(arch));
    opts.extend_from_slice(&["-device", &edu, "-drive", &drive, "-device", "virtio-blk-device,drive=d0", "-device", "virtio-rng-device"]);
    opts.extend_from_slice(&["-drive", &pci_drive, "-device", "virtio-blk-pci,drive=d1,disable-legacy=on,iommu_platform=on"]);
    (boot(&format!("{arch} {name}"), arch, &opts), [img, pci_img])
}

fn full(arch: &str, name: &str, append: &str) {
    let (b, imgs) = run(arch, name, append, "0xffffffff");
    b.assert_passed();
    for case in [
        "coherent_alloc_sizes",
        "coherent_attrs",
        "coherent_mask_respected",
        "mask_errors",
        "bounce_by_reach",
        "bounce_exhaustion",
        "restricted_pool_coherent",
        "restricted_pool_exhaustion",
        "edu_round_trip_streaming",
        "edu_round_trip_bidirectional_and_coherent",
        "edu_scatter_gather",
    ] {
        b.assert_case_passed("dma_api", case);
    }
    for case in ["read_known_image", "write_then_read_1mib", "rng_gives_entropy"] {
        b.assert_case_passed("virtio", case);
    }
    for case in [
        "features_negotiated",
        "read_known_image",
        "write_then_read_second_mib",
        "bad_requests_refused",
        "features_ok_refused_without_access_platform",
        "unresponsive_device_times_out",
    ] {
        b.assert_case_passed("virtio_pci", case);
    }
    b.assert_log_contains("ACCESS_PLATFORM offered and accepted");
    if append.contains("swiotlb=force") {
        b.assert_case_passed("dma_api", "forced_bounce").assert_log_contains(", forced");
    } else {
        b.assert_case_skipped("dma_api", "forced_bounce");
    }
    if append.contains("dma.noncoherent") {
        b.assert_log_contains("dma: every device treated as non-coherent");
        let strategy = if append.contains("dma.remap=inplace") { "inplace" } else { "window" };
        b.assert_log_contains(&format!("dma-remap: {strategy}"));
    }
    for case in [
        "coherent_mappings_have_the_promised_attributes",
        "no_kernel_mapping_maps_nothing",
        "atomic_pool_serves_and_runs_out",
        "in_place_never_falls_back",
        "vmap_scattered_pages_and_guard",
    ] {
        b.assert_case_passed("dma_remap", case);
    }
    // dma-debug is on in every configuration (tests/common adds `dma_debug=on` where the
    // configuration does not choose); its misuse cases must each have been caught.
    for case in [
        "unmap_never_mapped",
        "unmap_wrong_size_and_direction",
        "unmap_wrong_kind",
        "double_unmap",
        "sync_wrong_direction_or_outside",
        "free_coherent_wrong_size_or_address",
        "mapping_error_never_checked",
        "from_device_mappings_share_a_cache_line",
        "teardown_reports_leaks",
    ] {
        b.assert_case_passed("dma_debug", case);
    }
    for case in ["guard_faults_cpu_access_to_device_owned_pages", "guard_catches_writes_to_shared_edge_pages"] {
        if append.contains("dma_debug=guard") {
            b.assert_case_passed("dma_debug", case);
        } else {
            b.assert_case_skipped("dma_debug", case);
        }
    }
    for img in &imgs {
        check_disk(&b, img);
    }
}

fn default_mask(arch: &str) {
    let (b, _) = run(arch, "edu 28-bit", "", "0xfffffff");
    b.assert_passed();
    b.assert_case_passed("dma_api", "edu_default_mask_refused");
    b.assert_case_skipped("dma_api", "edu_round_trip_streaming");
    b.assert_log_contains("# edu: set_mask(0xfffffff) refused: DMA mask 0xfffffff reaches neither RAM");
    b.assert_log_contains("# edu: map under mask 0xfffffff refused: ");
}

#[test]
fn aarch64_plain() {
    full("aarch64", "plain", "");
}

#[test]
fn aarch64_swiotlb_force() {
    full("aarch64", "swiotlb=force", "swiotlb=force");
}

#[test]
fn aarch64_noncoherent_window() {
    full("aarch64", "dma.noncoherent window", "dma.noncoherent dma.remap=window");
}

#[test]
fn aarch64_noncoherent_inplace() {
    full("aarch64", "dma.noncoherent inplace", "dma.noncoherent dma.remap=inplace");
}

/// The ownership guard under real devices: every suite (edu, virtio) runs with device-owned pages
/// taken from the CPU, so a driver touching a buffer it handed to a device would fault.
#[test]
fn aarch64_guard() {
    full("aarch64", "dma_debug=guard", "dma_debug=guard");
}

#[test]
fn armv7_guard() {
    full("armv7", "dma_debug=guard", "dma_debug=guard dma.noncoherent");
}

#[test]
fn aarch64_edu_default_mask() {
    default_mask("aarch64");
}

#[test]
fn armv7_plain() {
    full("armv7", "plain", "");
}

#[test]
fn armv7_swiotlb_force() {
    full("armv7", "swiotlb=force", "swiotlb=force");
}

#[test]
fn armv7_noncoherent_window() {
    full("armv7", "dma.noncoherent window", "dma.noncoherent dma.remap=window");
}

#[test]
fn armv7_noncoherent_inplace() {
    full("armv7", "dma.noncoherent inplace", "dma.noncoherent dma.remap=inplace");
}

#[test]
fn armv7_edu_default_mask() {
    default_mask("armv7");
}

/// tests/dts/virt-restricted.dts (aarch64) and virt-restricted-armv7.dts: a
/// `restricted-dma-pool` named by the virtio-blk slot's `memory-region`. All of virtio's DMA memory
/// must lie in that pool (the buffers it shares and its virtqueues), and the disk checks still
/// pass.
fn restricted_pool(arch: &str, dts: &str) {
    let img = disk("dma-disks", &format!("{arch}-restricted"));
    let d = dtb(dts);
    let drive = format!("file={},if=none,format=raw,id=d0", path_str(&img));
    let append = format!("{SUITES} edu.dma_mask=0xffffffff");
    let dtb_path = path_str(&d);
    let mut opts: Vec<&str> = vec!["--dtb", &dtb_path, "--append", &append, "--"];
    opts.extend_from_slice(machine(arch));
    opts.extend_from_slice(&[
        "-device", "edu,dma_mask=0xffffffff", "-drive", &drive, "-device", "virtio-blk-device,drive=d0", "-device",
        "virtio-rng-device",
    ]);
    let b = boot(&format!("{arch} restricted-dma-pool"), arch, &opts);
    b.assert_passed();
    b.assert_log_contains("swiotlb: restricted pool `restricted@7e000000`: 4 MiB at 0x7e000000");
    for case in ["restricted_pool_coherent", "restricted_pool_exhaustion"] {
        b.assert_case_passed("dma_api", case);
    }
    for case in ["read_known_image", "write_then_read_1mib", "rng_gives_entropy", "restricted_pool_used"] {
        b.assert_case_passed("virtio", case);
    }
    b.assert_log_contains(" coherent allocations (");
    b.assert_log_contains("in the restricted pool at 0x7e000000 (0x400000 bytes)");
    check_disk(&b, &img);
}

#[test]
fn aarch64_restricted_pool() {
    restricted_pool("aarch64", "virt-restricted");
}

#[test]
fn armv7_restricted_pool() {
    restricted_pool("armv7", "virt-restricted-armv7");
}

/// The stress run on 4 CPUs with dma-debug on: every CPU maps, syncs, allocates and frees at once
/// through every back end (dma-direct coherent and not, dma-remap, the atomic pool, swiotlb) and
/// through edu; data is checked byte for byte and every counter must come back.
fn stress(arch: &str, name: &str, append: &str) {
    let append = format!("ktest.filter=smp,stress stress=1500 {append}");
    let mut opts: Vec<&str> = vec!["--smp", "4", "--append", &append, "--"];
    opts.extend_from_slice(machine(arch));
    opts.extend_from_slice(&["-device", "edu,dma_mask=0xffffffff"]);
    let b = boot(&format!("{arch} {name}"), arch, &opts);
    b.assert_passed();
    b.assert_case_passed("smp", "every_cpu_runs_work");
    b.assert_case_passed("stress", "dma_stress");
    b.assert_log_contains("on 4 CPU(s) in ");
}

#[test]
fn aarch64_stress_4_cpus() {
    stress("aarch64", "stress window", "");
}

#[test]
fn aarch64_stress_4_cpus_inplace() {
    stress("aarch64", "stress inplace", "dma.remap=inplace");
}

#[test]
fn armv7_stress_4_cpus() {
    stress("armv7", "stress window", "");
}
