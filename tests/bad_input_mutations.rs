//! Bad input on the kernel side, starting from REAL device trees: the blob the installed QEMU
//! generates for the virt machine, dumped at test time, then mutated byte by byte (header offsets
//! and sizes, truncation) or through its decompiled source (cyclic and dangling phandles, absurd
//! `#address-cells`/`#size-cells`, overlapping reservations, `dma-ranges` that do not parse,
//! impossible CMA pools); and absurd bootargs on QEMU's own tree.
//!
//! Every case states its outcome: either a refused boot (status 2, `dmakern: boot error: ` and the
//! reason) or a degraded one (status 0, the summary line, the message naming what was left out, and
//! the cases that show what still works), never a panic (3), an exception (4), a hang or garbage.
//! Blobs are handed over with `qemu-run.sh --dtb-raw`, so their bootargs are their own
//! /chosen/bootargs; the early-UART build shows the messages printed before the DT names a console.
//! `tests/bad_input.rs` holds the hand-written trees; this file the mutations of real ones.

mod common;
#[path = "common/fdt_mutate.rs"]
mod fdt_mutate;

use common::{boot, tail, Boot};
use fdt_mutate::{get, header, qemu_dtb, set_header, write, Dts};
use std::sync::OnceLock;

const EARLY_UART: &str = "0x09000000";
const ARCHES: [&str; 2] = ["aarch64", "armv7"];

/// The suites a DT-only case runs: the memory map checked against the tree it came from.
const MEMMAP: &str = "ktest.filter=memmap";
/// The cases that do DMA through each kind of device: PCI (edu) and virtio-mmio (virtio-blk).
const DEVICES: &str = "ktest.filter=dma_api.edu_round_trip_streaming,virtio.read_known_image edu.dma_mask=0xffffffff dma_debug=on";

/// qemu-run.sh options after `--` that make the machine the tree describes.
fn machine(arch: &str) -> Vec<String> {
    match arch {
        "aarch64" => vec!["--".into()],
        _ => vec!["--".into(), "-M".into(), "virt,highmem=off".into()],
    }
}

/// A read-only disk with the pattern `virtio.read_known_image` checks (src/drivers/virtio_pci/
/// test_image.rs): one file shared by every boot.
fn disk() -> &'static str {
    static DISK: OnceLock<String> = OnceLock::new();
    DISK.get_or_init(|| {
        let img: Vec<u8> = (0..2u64 << 20)
            .map(|pos| (((pos / 512).wrapping_mul(31) ^ (pos % 512).wrapping_mul(7)) as u8) ^ 0x5a)
            .collect();
        write("disk.img", &img)
    })
}

/// The devices `DEVICES` drives: edu on PCI and a virtio-blk disk on virtio-mmio.
fn devices() -> Vec<String> {
    let drive = format!("file={},if=none,format=raw,id=d0,readonly=on", disk());
    ["-device", "edu,dma_mask=0xffffffff", "-drive", &drive, "-device", "virtio-blk-device,drive=d0"].iter().map(|s| s.to_string()).collect()
}

/// Boots `blob` (written as target/mutations/ARCH-FILE) on `arch` as the boot loader would, with
/// the early UART so that a tree refused before it names a console still says why.
fn boot_blob(name: &str, arch: &str, file: &str, blob: &[u8], with_devices: bool) -> Boot {
    let path = write(&format!("{arch}-{file}"), blob);
    let mut opts: Vec<String> = vec!["--early-uart".into(), EARLY_UART.into(), "--dtb-raw".into(), path];
    opts.extend(machine(arch));
    if with_devices {
        opts.extend(devices());
    }
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let b = boot(&format!("{arch} {name}"), arch, &opts);
    sane(&b);
    b
}

/// QEMU's tree for `arch`, decompiled, with `bootargs` in /chosen.
fn real_dts(arch: &str, bootargs: &str) -> Dts {
    let mut d = Dts::decompile(&qemu_dtb(arch));
    d.set("/chosen", "bootargs", Some(&format!("\"{bootargs}\"")));
    d
}

/// Boots the edited tree `dts`.
fn boot_dts(name: &str, arch: &str, file: &str, dts: &Dts, with_devices: bool) -> Boot {
    boot_blob(name, arch, file, &dts.compile(), with_devices)
}

/// Boots QEMU's own tree with `append` as the command line.
fn boot_append(name: &str, arch: &str, append: &str) -> Boot {
    let mut opts: Vec<String> = vec!["--append".into(), append.into()];
    opts.extend(machine(arch));
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let b = boot(&format!("{arch} {name}"), arch, &opts);
    sane(&b);
    b
}

/// What no input may cause: a panic, an unexpected exception, a time-out, or a console that is
/// not text.
fn sane(b: &Boot) {
    let why = match b.status {
        Some(3) => Some("a panic (status 3)"),
        Some(4) => Some("an unexpected exception (status 4)"),
        Some(124) | None => Some("a hang (killed by the time-out)"),
        _ if b.log.contains("dmakern: panic") => Some("a panic"),
        _ if b.log.contains("unexpected exception") => Some("an unexpected exception"),
        _ if b.log.contains('\u{fffd}') => Some("garbage on the console"),
        _ => None,
    };
    if let Some(why) = why {
        panic!("[{}] {why}\n--- console ---\n{}", b.name, tail(&b.log, 40));
    }
}

/// A refused boot: status 2, the boot error line, and each of `messages` in it.
fn refused(b: &Boot, messages: &[&str]) {
    let line = b.log.lines().find(|l| l.starts_with("dmakern: boot error: "));
    match line {
        Some(line) if b.status == Some(2) => {
            for m in messages {
                assert!(line.contains(m), "[{}] the boot error does not say {m:?}: {line}", b.name);
            }
        }
        _ => panic!(
            "[{}] expected a refused boot (status 2 and a boot error), got status {:?} and {}\n{}",
            b.name,
            b.status,
            line.unwrap_or("no boot error on the console"),
            tail(&b.log, 40)
        ),
    }
}

/// A degraded boot: status 0 with the summary line and nothing failed, and each of `messages` on
/// the console.
fn degraded<'a>(b: &'a Boot, messages: &[&str]) -> &'a Boot {
    b.assert_passed();
    for m in messages {
        b.assert_log_contains(m);
    }
    b
}

/// Runs `check` on every variant, then fails with every failure at once, so that one broken variant
/// does not hide the next.
fn all<T>(variants: impl IntoIterator<Item = T>, check: impl Fn(T)) {
    let mut failures = Vec::new();
    for v in variants {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(v))) {
            let text = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            failures.push(text.unwrap_or_else(|| "(panic without a message)".into()));
        }
    }
    assert!(failures.is_empty(), "{} variant(s) failed:\n\n{}", failures.len(), failures.join("\n\n"));
}

/// The case passed or was skipped (not failed, not missing).
fn passed_or_skipped(b: &Boot, suite: &str, case: &str) {
    let c = b.report.cases.iter().find(|c| c.suite == suite && c.name == case);
    match c {
        Some(c) if !matches!(c.status, dmakern::ktest::parse::Status::Fail) => {}
        other => panic!("[{}] {suite}.{case}: {other:?}\n{}", b.name, tail(&b.log, 40)),
    }
}

// --- the header, byte by byte -----------------------------------------------------------------

/// QEMU's blob with header field `field` set to `value(blob)`: refused, the boot error naming the
/// device tree and each of `messages`.
fn header_case(name: &str, arches: &[&str], field: usize, value: impl Fn(&[u8]) -> u32, messages: &[&str]) {
    all(arches, |arch| {
        let real = qemu_dtb(arch);
        let blob = set_header(&real, field, value(&real));
        let b = boot_blob(name, arch, &format!("{}.dtb", name.replace(' ', "-")), &blob, false);
        refused(&b, &["device tree"]);
        refused(&b, messages);
    });
}

#[test]
fn structure_block_offset_beyond_totalsize() {
    header_case("off_dt_struct beyond totalsize", &ARCHES, header::OFF_DT_STRUCT, |b| get(b, header::TOTALSIZE) + 0x1000, &["structure block spans"]);
}

#[test]
fn strings_block_offset_beyond_totalsize() {
    header_case("off_dt_strings beyond totalsize", &["aarch64"], header::OFF_DT_STRINGS, |b| get(b, header::TOTALSIZE) - 8, &["strings block spans"]);
}

#[test]
fn reservation_map_offset_beyond_totalsize() {
    header_case("off_mem_rsvmap beyond totalsize", &["aarch64"], header::OFF_MEM_RSVMAP, |b| get(b, header::TOTALSIZE) + 0x800, &["memory reservation block spans"]);
}

#[test]
fn structure_block_size_beyond_totalsize() {
    header_case("size_dt_struct beyond totalsize", &["aarch64"], header::SIZE_DT_STRUCT, |b| get(b, header::TOTALSIZE), &["structure block spans"]);
}

#[test]
fn strings_block_overlapping_the_structure_block() {
    // The strings block placed over the structure block: property names then point into tokens.
    // The header is at fault, and the message should say so.
    header_case("strings block over the structure block", &["aarch64"], header::OFF_DT_STRINGS, |b| get(b, header::OFF_DT_STRUCT), &["strings block", "overlaps"]);
}

#[test]
fn reservation_map_overlapping_the_structure_block() {
    // The reservation map read from the structure block: its tokens become (address, size) pairs,
    // which must not be taken for reservations.
    header_case("reservation map over the structure block", &ARCHES, header::OFF_MEM_RSVMAP, |b| get(b, header::OFF_DT_STRUCT), &["memory reservation block", "overlaps"]);
}

#[test]
fn header_fields_near_u32_max() {
    // Offsets and sizes whose sums overflow 32 bits must still be caught as out of bounds.
    all(
        [
            ("off_dt_strings 0xfffffff0", header::OFF_DT_STRINGS, 0xffff_fff0, "strings block spans"),
            ("size_dt_struct 0xffffffff", header::SIZE_DT_STRUCT, 0xffff_ffff, "structure block spans"),
            ("off_mem_rsvmap 0xfffffff8", header::OFF_MEM_RSVMAP, 0xffff_fff8, "memory reservation block spans"),
        ],
        |(name, field, value, message)| header_case(name, &["aarch64"], field, |_| value, &[message]),
    );
}

#[test]
fn structure_block_over_the_header() {
    // Not a truncation: the block starts inside the 40-byte header.
    header_case("off_dt_struct inside the header", &["aarch64"], header::OFF_DT_STRUCT, |_| 0x10, &["structure block", "overlaps the header"]);
}

#[test]
fn totalsize_smaller_than_the_blocks() {
    header_case("totalsize cuts the strings block", &ARCHES, header::TOTALSIZE, |b| get(b, header::OFF_DT_STRINGS) + 8, &["truncated", "strings block spans"]);
}

#[test]
fn totalsize_absurd() {
    // Just over the limit, 2 GiB, and just under 4 GiB (more than the early page tables can map).
    all([(&ARCHES[..], 0x0400_0008u32), (&["aarch64"][..], 0x8000_0000), (&ARCHES[..], 0xffff_fff8)], |(arches, size)| {
        header_case(&format!("totalsize {size:#x}"), arches, header::TOTALSIZE, |_| size, &[&format!("implausible totalsize {size} bytes")]);
    });
}

#[test]
fn structure_block_offset_misaligned() {
    header_case("off_dt_struct misaligned", &["aarch64"], header::OFF_DT_STRUCT, |b| get(b, header::OFF_DT_STRUCT) + 2, &["structure block offset", "misaligned"]);
}

#[test]
fn version_too_old() {
    header_case("version 1", &["aarch64"], header::VERSION, |_| 1, &["unsupported version 1"]);
}

// --- truncation: the file cut short, the header unchanged, zeros after the cut ------------------

/// QEMU's blob cut to `cut(blob)` bytes, its header unchanged (the RAM after it reads as zeros):
/// refused, the boot error saying each of `messages`.
fn truncated_case(name: &str, arches: &[&str], cut: impl Fn(&[u8]) -> usize, messages: &[&str]) {
    all(arches, |arch| {
        let real = qemu_dtb(arch);
        let blob = &real[..cut(&real)];
        let b = boot_blob(name, arch, &format!("{}.dtb", name.replace(' ', "-")), blob, false);
        refused(&b, messages);
    });
}

#[test]
fn truncated_inside_the_header() {
    // Cut before `version`: it reads as 0, as does everything after it.
    truncated_case("cut inside the header", &ARCHES, |_| 0x14, &["unsupported version 0"]);
}

#[test]
fn truncated_after_the_reservation_map() {
    truncated_case("cut at the structure block", &["aarch64"], |b| get(b, header::OFF_DT_STRUCT) as usize, &["malformed structure block at offset 0x0"]);
}

#[test]
fn truncated_inside_the_structure_block() {
    truncated_case("cut inside the structure block", &ARCHES, |b| (get(b, header::OFF_DT_STRUCT) + get(b, header::SIZE_DT_STRUCT) / 2) as usize, &["malformed structure block"]);
}

#[test]
fn truncated_inside_the_strings_block() {
    // Property names past the cut read as empty strings, which the specification does not allow
    // (1 to 31 characters): the tree is malformed, not merely without memory.
    truncated_case("cut inside the strings block", &["aarch64"], |b| (get(b, header::OFF_DT_STRINGS) + 0x20) as usize, &["property name"]);
}

// --- phandles: cycles, dangling, duplicates --------------------------------------------------

const PCIE: &str = "/pcie@10000000";
/// The first virtio-mmio slot: its node gives every slot its DMA device (src/drivers/virtio.rs).
const VIRTIO0: &str = "/virtio_mmio@a000000";
/// The slot QEMU's virt puts the first `-device virtio-...-device` in: the highest.
const VIRTIO_DISK: &str = "/virtio_mmio@a003e00";

/// The value (DTS text) of property `prop` of the PCI host bridge.
fn pcie_prop(d: &Dts, prop: &str) -> String {
    let text = d.clone().take(PCIE);
    let line = text.lines().find(|l| l.trim_start().starts_with(&format!("{prop} = "))).unwrap_or_else(|| panic!("no {prop} in {PCIE}"));
    line.trim().trim_start_matches(&format!("{prop} = ")).trim_end_matches(';').to_string()
}

/// A boot in which PCI is left out with `messages` and virtio-mmio still does DMA.
fn without_pci(b: &Boot, messages: &[&str]) {
    degraded(b, messages).assert_case_skipped("dma_api", "edu_round_trip_streaming").assert_case_passed("virtio", "read_known_image");
}

/// A boot in which the virtio-mmio disk is lost (its DMA or its slot) with `messages` and PCI
/// still does DMA.
fn without_virtio_dma(b: &Boot, messages: &[&str]) {
    degraded(b, messages).assert_case_skipped("virtio", "read_known_image").assert_case_passed("dma_api", "edu_round_trip_streaming");
}

#[test]
fn cyclic_interrupt_parent() {
    // The root's interrupt-parent leads to the RTC, whose interrupt-parent is the GPIO controller,
    // whose interrupt-parent is the RTC again: no interrupt controller is ever reached. Nothing the
    // kernel uses follows the chain (PCI INTx comes from interrupt-map, which names the GIC), so
    // the boot must be unchanged: no hang, DMA on both buses.
    all(ARCHES, |arch| {
        let mut d = real_dts(arch, DEVICES);
        d.set("/", "interrupt-parent", Some("<0x9001>"))
            .set("/pl031@9010000", "phandle", Some("<0x9001>"))
            .set("/pl031@9010000", "interrupt-parent", Some("<0x8004>"))
            .set("/pl061@9030000", "interrupt-parent", Some("<0x9001>"));
        let b = boot_dts("cyclic interrupt-parent", arch, "cyclic-interrupt-parent.dtb", &d, true);
        degraded(&b, &["INTA -> GIC SPI"]);
        b.assert_case_passed("dma_api", "edu_round_trip_streaming").assert_case_passed("virtio", "read_known_image");
    });
}

#[test]
fn dangling_interrupt_map_parent() {
    // The host bridge's interrupt-map names a phandle no node has: PCI is left out, saying which
    // property is at fault.
    let mut d = real_dts("aarch64", DEVICES);
    let map = pcie_prop(&d, "interrupt-map").replace("0x8002", "0x9999");
    d.set(PCIE, "interrupt-map", Some(&map));
    let b = boot_dts("dangling interrupt-map parent", "aarch64", "dangling-interrupt-map.dtb", &d, true);
    without_pci(&b, &["interrupt-map", "phandle 0x9999: no node has this phandle"]);
}

#[test]
fn duplicate_phandle() {
    // The RTC claims the GIC's phandle: the interrupt-map's parent is ambiguous.
    let mut d = real_dts("aarch64", DEVICES);
    d.set("/pl031@9010000", "phandle", Some("<0x8002>"));
    let b = boot_dts("duplicate phandle", "aarch64", "duplicate-phandle.dtb", &d, true);
    without_pci(&b, &["phandle 0x8002: defined by more than one node"]);
}

#[test]
fn dangling_memory_region() {
    // The virtio-mmio node that gives the slots their DMA device names a pool that does not exist.
    // Linux warns and goes on without the region; here the device may also lose DMA. Either way
    // the boot goes on and PCI is untouched.
    let mut d = real_dts("aarch64", DEVICES);
    d.set(VIRTIO0, "memory-region", Some("<0x9999>"));
    let b = boot_dts("dangling memory-region", "aarch64", "dangling-memory-region.dtb", &d, true);
    degraded(&b, &["memory-region", "phandle 0x9999: no node has this phandle"]);
    passed_or_skipped(&b, "virtio", "read_known_image");
    b.assert_case_passed("dma_api", "edu_round_trip_streaming");
}

#[test]
fn memory_region_cycle() {
    // A virtio-mmio node whose memory-region is itself: not a reserved-memory pool, so it is not
    // followed (as in Linux) and the device keeps its ordinary DMA.
    let mut d = real_dts("aarch64", DEVICES);
    d.set(VIRTIO0, "phandle", Some("<0x9002>")).set(VIRTIO0, "memory-region", Some("<0x9002>"));
    let b = boot_dts("memory-region cycle", "aarch64", "memory-region-cycle.dtb", &d, true);
    degraded(&b, &[]);
    b.assert_case_passed("virtio", "read_known_image").assert_case_passed("dma_api", "edu_round_trip_streaming");
}

#[test]
fn iommu_map_cycle() {
    // The host bridge as its own IOMMU: the target is no IOMMU (no #iommu-cells). The functions'
    // DMA must not silently skip the translation the tree asks for: the kernel says so.
    let mut d = real_dts("aarch64", DEVICES);
    d.set(PCIE, "phandle", Some("<0x9003>")).set(PCIE, "iommu-map", Some("<0x0 0x9003 0x0 0x10000>"));
    let b = boot_dts("iommu-map cycle", "aarch64", "iommu-map-cycle.dtb", &d, true);
    degraded(&b, &["iommu-map", "pcie@10000000"]);
    b.assert_case_passed("virtio", "read_known_image");
}

#[test]
fn dangling_iommu_map() {
    let mut d = real_dts("aarch64", DEVICES);
    d.set(PCIE, "iommu-map", Some("<0x0 0x9999 0x0 0x10000>"));
    let b = boot_dts("dangling iommu-map", "aarch64", "iommu-map-dangling.dtb", &d, true);
    without_pci(&b, &["iommu-map", "phandle 0x9999: no node has this phandle"]);
}

// --- #address-cells / #size-cells ------------------------------------------------------------

#[test]
fn root_address_cells_absurd() {
    all([("aarch64", "0x0"), ("aarch64", "0x5"), ("armv7", "0xffffffff")], |(arch, v)| {
        let mut d = real_dts(arch, MEMMAP);
        d.set("/", "#address-cells", Some(&format!("<{v}>")));
        let b = boot_dts(&format!("root #address-cells = {v}"), arch, &format!("root-acells-{v}.dtb"), &d, false);
        refused(&b, &["#address-cells"]);
    });
}

#[test]
fn root_size_cells_absurd() {
    all([("aarch64", "0x0"), ("armv7", "0x5"), ("aarch64", "0xffffffff")], |(arch, v)| {
        let mut d = real_dts(arch, MEMMAP);
        d.set("/", "#size-cells", Some(&format!("<{v}>")));
        let b = boot_dts(&format!("root #size-cells = {v}"), arch, &format!("root-scells-{v}.dtb"), &d, false);
        refused(&b, &["#size-cells"]);
    });
}

#[test]
fn pci_bus_cells_absurd() {
    // The host bridge's own cells: PCI is left out with the reason, virtio-mmio still works.
    all([("#address-cells", "0x0"), ("#address-cells", "0xffffffff"), ("#size-cells", "0x5")], |(prop, v)| {
        let mut d = real_dts("aarch64", DEVICES);
        d.set(PCIE, prop, Some(&format!("<{v}>")));
        let b = boot_dts(&format!("PCI {prop} = {v}"), "aarch64", &format!("pcie-{}-{v}.dtb", &prop[1..]), &d, true);
        without_pci(&b, &[prop]);
    });
}

#[test]
fn virtio_bus_cells_absurd() {
    // The slot QEMU gives the first -device (the highest, virtio_mmio@a003e00: the disk) on a bus
    // whose #size-cells cannot be read: its registers are unknown, so the disk cannot be used, and
    // the kernel must say why rather than report no disk at all. PCI is untouched.
    let mut d = real_dts("armv7", DEVICES);
    d.wrap(VIRTIO_DISK, "mmio-bus@a003e00", "compatible = \"simple-bus\";\n#address-cells = <0x2>;\n#size-cells = <0xffffffff>;\nranges;");
    let b = boot_dts("virtio bus #size-cells = 0xffffffff", "armv7", "virtio-bus-scells.dtb", &d, true);
    without_virtio_dma(&b, &["mmio-bus@a003e00", "#size-cells"]);
}

#[test]
fn reserved_memory_cells_absurd() {
    // /reserved-memory is a bus whose children are reservations: unreadable, they cannot be
    // honoured, so the boot stops.
    all([("aarch64", "#address-cells", "0x5"), ("armv7", "#size-cells", "0xffffffff"), ("aarch64", "#size-cells", "0x0")], |(arch, prop, v)| {
        let mut d = real_dts(arch, MEMMAP);
        d.add("/", &reserved_memory("\tfw@50000000 {\n\t\treg = <0x0 0x50000000 0x0 0x100000>;\n\t\tno-map;\n\t};"));
        d.set("/reserved-memory", prop, Some(&format!("<{v}>")));
        let b = boot_dts(&format!("/reserved-memory {prop} = {v}"), arch, &format!("rmem-{}-{v}.dtb", &prop[1..]), &d, false);
        refused(&b, &[prop]);
    });
}

// --- reservations ----------------------------------------------------------------------------

/// A /reserved-memory node with `children` (DTS text) under QEMU's 2-cell root.
fn reserved_memory(children: &str) -> String {
    format!("reserved-memory {{\n\t#address-cells = <0x2>;\n\t#size-cells = <0x2>;\n\tranges;\n{children}\n}};")
}

#[test]
fn overlapping_reserved_memory() {
    all(ARCHES, |arch| {
        let mut d = real_dts(arch, MEMMAP);
        d.add(
            "/",
            &reserved_memory(
                "\tfw-a@50000000 {\n\t\treg = <0x0 0x50000000 0x0 0x200000>;\n\t\tno-map;\n\t};\n\tfw-b@50100000 {\n\t\treg = <0x0 0x50100000 0x0 0x200000>;\n\t};",
            ),
        );
        let b = boot_dts("overlapping /reserved-memory", arch, "overlapping-reserved-memory.dtb", &d, false);
        refused(&b, &["overlaps", "fw-a", "fw-b"]);
    });
}

#[test]
fn reserved_memory_over_a_memreserve_entry() {
    let mut d = real_dts("aarch64", MEMMAP);
    d.memreserve(0x5000_0000, 0x10_0000).add("/", &reserved_memory("\tfw@50080000 {\n\t\treg = <0x0 0x50080000 0x0 0x100000>;\n\t};"));
    let b = boot_dts("/reserved-memory over /memreserve/", "aarch64", "rmem-over-memreserve.dtb", &d, false);
    refused(&b, &["overlaps", "/memreserve/"]);
}

#[test]
fn reserved_memory_wrapping_the_address_space() {
    let mut d = real_dts("aarch64", MEMMAP);
    d.add("/", &reserved_memory("\twrap@fffffffffffff000 {\n\t\treg = <0xffffffff 0xfffff000 0x0 0x2000>;\n\t};"));
    let b = boot_dts("/reserved-memory wrapping 2^64", "aarch64", "rmem-wrap.dtb", &d, false);
    refused(&b, &["wraps past the end of the address space"]);
}

// --- dma-ranges that do not parse --------------------------------------------------------------

/// Malformed `dma-ranges` for a bus with 3-cell (PCI) or 2-cell child addresses, 2-cell parent
/// addresses and 2-cell sizes, on the architecture that boots them: (what, value, arch).
fn bad_dma_ranges(pci: bool) -> [(&'static str, &'static str, &'static str); 3] {
    if pci {
        [
            ("wrong length", "<0x2000000 0x0 0x40000000 0x0 0x40000000 0x0>", "armv7"),
            ("zero size", "<0x2000000 0x0 0x40000000 0x0 0x40000000 0x0 0x0>", "aarch64"),
            ("overflowing", "<0x2000000 0x0 0x0 0xffffffff 0xfffff000 0x0 0x100000>", "aarch64"),
        ]
    } else {
        [
            ("wrong length", "<0x0 0x40000000 0x0 0x40000000 0x0>", "armv7"),
            ("zero size", "<0x0 0x40000000 0x0 0x40000000 0x0 0x0>", "aarch64"),
            ("overflowing", "<0x0 0x0 0xffffffff 0xfffff000 0x0 0x100000>", "aarch64"),
        ]
    }
}

#[test]
fn pci_host_dma_ranges_unparsable() {
    // The PCI functions lose DMA; virtio-mmio keeps it.
    all(bad_dma_ranges(true), |(what, v, arch)| {
        let mut d = real_dts(arch, DEVICES);
        d.set(PCIE, "dma-ranges", Some(v));
        let b = boot_dts(&format!("PCI dma-ranges {what}"), arch, &format!("pcie-dma-ranges-{}.dtb", what.replace(' ', "-")), &d, true);
        without_pci(&b, &["dma-ranges", "pcie@10000000"]);
    });
}

#[test]
fn virtio_bus_dma_ranges_unparsable() {
    // The first virtio-mmio slot moved, in place, under a simple-bus whose dma-ranges do not
    // parse: virtio-mmio loses DMA; PCI keeps it.
    all(bad_dma_ranges(false), |(what, v, arch)| {
        let mut d = real_dts(arch, DEVICES);
        d.wrap(VIRTIO0, "dma-bus@a000000", &format!("compatible = \"simple-bus\";\n#address-cells = <0x2>;\n#size-cells = <0x2>;\nranges;\ndma-ranges = {v};"));
        let b = boot_dts(&format!("virtio bus dma-ranges {what}"), arch, &format!("virtio-dma-ranges-{}.dtb", what.replace(' ', "-")), &d, true);
        without_virtio_dma(&b, &["dma-bus@a000000", "dma-ranges"]);
    });
}

// --- impossible CMA pools --------------------------------------------------------------------

/// A reusable shared-dma-pool named `name` with `props` (DTS text, one per line).
fn pool(name: &str, props: &str) -> String {
    let props: String = props.lines().map(|l| format!("\t\t{}\n", l.trim())).collect();
    format!("\t{name} {{\n\t\tcompatible = \"shared-dma-pool\";\n\t\treusable;\n{props}\t}};\n")
}

#[test]
fn impossible_cma_pools() {
    // The default pool larger than RAM, and pools with a zero size, alloc-ranges outside RAM and
    // an absurd alignment: each refused with its reason, the boot goes on without them, the
    // built-in default area takes the refused default's place (as Linux's dma_contiguous_reserve
    // does), and the CMA suite's own reading of the tree agrees with what was set up.
    let pools = [
        pool("linux,cma", "size = <0x0 0x80000000>;\nlinux,cma-default;"),
        pool("zero", "size = <0x0 0x0>;"),
        pool("outside", "size = <0x0 0x400000>;\nalloc-ranges = <0x0 0x0 0x0 0x10000000>;"),
        pool("huge-align", "size = <0x0 0x400000>;\nalignment = <0x80000000 0x0>;"),
    ]
    .concat();
    all(ARCHES, |arch| {
        let mut d = real_dts(arch, "ktest.filter=cma_setup,memmap,phys");
        d.add("/", &reserved_memory(&pools));
        let b = boot_dts("impossible CMA pools", arch, "impossible-cma.dtb", &d, false);
        degraded(
            &b,
            &[
                "cma: area `linux,cma` refused: CMA area of 2048 MiB is larger than RAM (1024 MiB); booting without it",
                "cma: area `zero` refused: ",
                "cma: area `outside` refused: ",
                "cma: area `huge-align` refused: ",
                "cma: Reserved 64 MiB at ",
                "(reserved, default)",
            ],
        );
        b.assert_case_passed("cma_setup", "default_area_as_configured");
    });
}

#[test]
fn malformed_cma_alloc_ranges() {
    // alloc-ranges cut short (3 cells for 4-cell entries): the /reserved-memory node cannot be
    // read, and the boot stops naming it.
    let mut d = real_dts("aarch64", MEMMAP);
    d.add("/", &reserved_memory(&pool("cut-short", "size = <0x0 0x400000>;\nalloc-ranges = <0x0 0x40000000 0x0>;")));
    let b = boot_dts("alloc-ranges cut short", "aarch64", "cma-alloc-ranges-cut.dtb", &d, false);
    refused(&b, &["alloc-ranges", "cut-short", "not a whole number"]);
}

// --- absurd bootargs ---------------------------------------------------------------------------

#[test]
fn cma_999g() {
    all(ARCHES, |arch| {
        let b = boot_append("cma=999G", arch, "cma=999G ktest.filter=cma_setup,phys");
        degraded(&b, &["cma: area `reserved` refused: CMA area of 1022976 MiB is larger than RAM (1024 MiB); booting without it"]);
        assert!(!b.log.contains("cma: Reserved"), "[{}] an area exists", b.name);
        b.assert_case_skipped("cma_setup", "default_area_as_configured");
    });
}

#[test]
fn cma_0() {
    let b = boot_append("cma=0", "aarch64", "cma=0 ktest.filter=cma_setup,phys");
    degraded(&b, &["cma: no default area (cma=0)"]);
    b.assert_case_passed("cma_setup", "default_area_as_configured");
}

#[test]
fn swiotlb_0_and_too_many_slots() {
    all([("aarch64", "0"), ("armv7", "999999999999")], |(arch, v)| {
        let b = boot_append(&format!("swiotlb={v}"), arch, &format!("swiotlb={v} ktest.filter=dma_api.bounce_by_reach"));
        degraded(&b, &[&format!("swiotlb: bootarg swiotlb={v}: expected a slot count, `force` or `noforce`; using the defaults"), "swiotlb: 4 MiB (2048 slots) at "]);
        b.assert_case_passed("dma_api", "bounce_by_reach");
    });
    // A count that parses but cannot be reserved: no bounce buffering, said so.
    let b = boot_append("swiotlb=4294967295", "aarch64", "swiotlb=4294967295 ktest.filter=dma_api.bounce_by_reach");
    degraded(&b, &["swiotlb: no 7.9 TiB below 0x100000000", "; no bounce buffering"]);
    b.assert_case_skipped("dma_api", "bounce_by_reach");
}

#[test]
fn coherent_pool_999g() {
    // No atomic pool can be placed: said so with the size asked for, and the atomic-pool case
    // checks that a caller that cannot block then gets a clean error (the boot is degraded, not
    // broken).
    all(ARCHES, |arch| {
        let b = boot_append("coherent_pool=999G", arch, "coherent_pool=999G dma.noncoherent ktest.filter=dma_remap");
        degraded(&b, &["atomic pool", "999 GiB"]);
        b.assert_case_passed("dma_remap", "atomic_pool_serves_and_runs_out");
    });
}

#[test]
fn dma_remap_sideways() {
    let b = boot_append("dma.remap=sideways", "aarch64", "dma.remap=sideways dma.noncoherent ktest.filter=dma_remap");
    degraded(&b, &["dma-remap: ", "sideways", "using `window`", "dma-remap: window"]);
}

#[test]
fn dma_debug_maybe() {
    let b = boot_append("dma_debug=maybe", "armv7", "dma_debug=maybe ktest.filter=dma_debug");
    degraded(&b, &["dma-debug: unknown dma_debug=maybe (expected on, guard or off); using on", "dma-debug: on"]);
}

#[test]
fn stress_minus_one() {
    // A stress bound that is not one must be named, and the run must not end as a failed test
    // (status 1): either the boot refuses the argument (status 2) or goes on without the stress
    // run (status 0, the case skipped).
    let b = boot_append("stress=-1", "aarch64", "stress=-1 ktest.filter=stress");
    assert!(b.log.contains("stress=-1"), "[{}] no message names stress=-1\n{}", b.name, tail(&b.log, 30));
    match b.status {
        Some(2) => refused(&b, &["stress=-1"]),
        _ => {
            degraded(&b, &["stress=-1"]);
            b.assert_case_skipped("stress", "dma_stress");
        }
    }
}

#[test]
fn four_kib_command_lines() {
    // One 4 KiB argument: an unknown key, reported and ignored.
    let long = format!("ktest.filter=memmap pad={}", "x".repeat(4096));
    let b = boot_append("4 KiB argument", "aarch64", &long);
    degraded(&b, &["bootargs: unknown key `pad`, ignored"]);
    // 4 KiB of short arguments: more than the kernel keeps, refused rather than silently cut.
    let many: Vec<String> = (0..512).map(|i| format!("k{i:03}=1")).collect();
    let b = boot_append("4 KiB of arguments", "armv7", &format!("ktest.filter=memmap {}", many.join(" ")));
    refused(&b, &["bootargs: more than 64 arguments"]);
}

#[test]
fn unknown_keys() {
    let b = boot_append("unknown keys", "armv7", "ktest.filter=memmap foo=1 bar cma.bogus=3 dma.remap.extra=window \u{444}=1");
    degraded(
        &b,
        &[
            "bootargs: unknown key `foo`, ignored",
            "bootargs: unknown key `bar`, ignored",
            "bootargs: unknown key `cma.bogus`, ignored",
            "bootargs: unknown key `dma.remap.extra`, ignored",
            "bootargs: unknown key `\u{444}`, ignored",
        ],
    );
}

#[test]
fn every_absurd_value_at_once() {
    // The absurd values together on armv7: each still gets its own message and the boot goes on.
    let b = boot_append("absurd bootargs together", "armv7", "cma=999G swiotlb=0 dma.remap=sideways dma_debug=maybe ktest.filter=memmap");
    degraded(&b, &["cma: area `reserved` refused: ", "swiotlb: bootarg swiotlb=0", "sideways", "dma_debug=maybe"]);
}

/// The dumped trees are QEMU's own: they boot as they are, on both architectures (the control for
/// every mutation above).
#[test]
fn unmutated_dump_boots() {
    all(ARCHES, |arch| {
        let d = real_dts(arch, DEVICES);
        let b = boot_dts("unmutated QEMU tree", arch, "unmutated.dtb", &d, true);
        degraded(&b, &[]);
        b.assert_case_passed("dma_api", "edu_round_trip_streaming").assert_case_passed("virtio", "read_known_image");
    });
}
