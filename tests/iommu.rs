//! The dma-iommu matrix: QEMU `virt` with its SMMUv3 (`iommu=smmuv3`) in front of the PCIe root
//! complex, on aarch64 in strict, lazy and passthrough modes and on armv7 (`highmem=off`) in
//! strict and lazy modes. Two `edu`s keep their default 28-bit DMA mask (they reach RAM at 1 GiB
//! only through IOVAs), and a modern virtio-blk-pci disk with `iommu_platform=on` does all its DMA
//! through the SMMU; dma-debug is on. The kernel's suites check the data byte for byte, the
//! isolation (decoded faults, memory untouched) and the SMMU driver; here the disk image is
//! checked after the run.

mod common;
use common::{boot, check_disk, disk, path_str, Boot};
use std::path::PathBuf;

const SUITES: &str = "ktest.filter=dma_api,dma_iommu,smmu,virtio_pci";

fn run(arch: &str, name: &str, append: &str, edu: &str) -> (Boot, PathBuf) {
    let img = disk("iommu-disks", &format!("{arch}-{}", name.replace(['=', '.', ' '], "_")));
    let mask = if edu.contains("dma_mask") { "edu.dma_mask=0xffffffff" } else { "" };
    let append = format!("{SUITES} {append} {mask}");
    let drive = format!("file={},if=none,format=raw,id=d1", path_str(&img));
    let machine = if arch == "aarch64" { "virt,iommu=smmuv3" } else { "virt,highmem=off,iommu=smmuv3" };
    let opts = [
        "--append", &append, "--", "-M", machine, "-device", edu, "-device", edu, "-drive", &drive, "-device",
        "virtio-blk-pci,drive=d1,disable-legacy=on,iommu_platform=on",
    ];
    (boot(&format!("{arch} smmuv3 {name}"), arch, &opts), img)
}

const IOMMU_CASES: [&str; 8] = [
    "edu_with_28_bit_mask_through_the_smmu",
    "unmapped_iova_faults",
    "write_to_a_to_device_mapping_faults",
    "domains_isolate_devices",
    "scatter_gather_list_is_one_iova_range",
    "coherent_buffer_of_scattered_pages",
    "flush_queue_in_lazy_mode",
    "msi_doorbell_is_mapped",
];

const VIRTIO_PCI_CASES: [&str; 4] = ["features_negotiated", "read_known_image", "write_then_read_second_mib", "bad_requests_refused"];

fn translated(arch: &str, name: &str, append: &str) {
    let (b, img) = run(arch, name, append, "edu");
    b.assert_passed();
    for case in IOMMU_CASES {
        b.assert_case_passed("dma_iommu", case);
    }
    b.assert_case_skipped("dma_iommu", "passthrough_uses_dma_direct");
    // dma_api's edu cases run through the SMMU too: the 28-bit mask is accepted here.
    for case in ["edu_round_trip_streaming", "edu_round_trip_bidirectional_and_coherent", "edu_scatter_gather"] {
        b.assert_case_passed("dma_api", case);
    }
    b.assert_case_skipped("dma_api", "edu_default_mask_refused");
    for case in ["dma_through_domain", "write_to_read_only_faults", "unmapped_iova_faults", "strict_unmap_invalidates", "domains_are_separate"] {
        b.assert_case_passed("smmu", case);
    }
    for case in VIRTIO_PCI_CASES {
        b.assert_case_passed("virtio_pci", case);
    }
    b.assert_log_contains("ACCESS_PLATFORM offered and accepted");
    b.assert_log_contains("F_PERMISSION").assert_log_contains("F_TRANSLATION");
    check_disk(&b, &img);
}

#[test]
fn aarch64_strict() {
    translated("aarch64", "strict", "iommu.strict=1");
}

#[test]
fn aarch64_lazy() {
    translated("aarch64", "lazy", "iommu.strict=0");
}

#[test]
fn armv7_strict() {
    translated("armv7", "strict", "");
}

#[test]
fn armv7_lazy() {
    translated("armv7", "lazy", "iommu.strict=0");
}

/// `iommu.passthrough=1`: identity streams, dma-direct; the edus need a mask that reaches RAM.
#[test]
fn aarch64_passthrough() {
    let (b, img) = run("aarch64", "passthrough", "iommu.passthrough=1", "edu,dma_mask=0xffffffff");
    b.assert_passed();
    b.assert_case_passed("dma_iommu", "passthrough_uses_dma_direct");
    for case in IOMMU_CASES {
        b.assert_case_skipped("dma_iommu", case);
    }
    b.assert_case_passed("dma_api", "edu_round_trip_streaming");
    for case in VIRTIO_PCI_CASES {
        b.assert_case_passed("virtio_pci", case);
    }
    check_disk(&b, &img);
}

/// The stress run on 4 CPUs with the SMMU: a device behind it joins every back end, and edu's
/// transfers go through its domain; the IOVA space and the IO page tables are accounted for at
/// the end.
fn stress(arch: &str) {
    let machine = if arch == "aarch64" { "virt,iommu=smmuv3" } else { "virt,highmem=off,iommu=smmuv3" };
    let opts = ["--smp", "4", "--append", "ktest.filter=smp,stress stress=800", "--", "-M", machine, "-device", "edu"];
    let b = boot(&format!("{arch} smmuv3 stress"), arch, &opts);
    b.assert_passed();
    b.assert_case_passed("stress", "dma_stress");
    b.assert_log_contains("on 4 CPU(s) in ");
}

#[test]
fn aarch64_stress_4_cpus() {
    stress("aarch64");
}

#[test]
fn armv7_stress_4_cpus() {
    stress("armv7");
}
