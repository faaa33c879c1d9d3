//! Test-only: the device trees in tests/fixtures/dt/ (see the README.md there for their origin),
//! and `with_cell` to mutate them.

macro_rules! fixture {
    ($name:ident, $file:literal) => {
        pub const $name: &[u8] = include_bytes!(concat!("../../tests/fixtures/dt/", $file));
    };
}

// Dumped by QEMU 10.0.2 (`-M virt,...,dumpdtb=`).
fixture!(QEMU_VIRT_A53_128M, "qemu-virt-a53-128m.dtb");
fixture!(QEMU_VIRT_A53_2G, "qemu-virt-a53-2g.dtb");
fixture!(QEMU_VIRT_GICV3_SMMUV3, "qemu-virt-gicv3-smmuv3.dtb");
fixture!(QEMU_VIRT_A15, "qemu-virt-a15-highmem-off.dtb");
fixture!(QEMU_RASPI3B, "qemu-raspi3b-downstream.dtb");
fixture!(QEMU_RASPI4B, "qemu-raspi4b-downstream.dtb");

// Raspberry Pi kernel trees, as the firmware loads them.
fixture!(RPI2B_DOWNSTREAM_2016, "rpi2b-downstream-2016.dtb");
fixture!(RPI3B_DOWNSTREAM, "rpi3b-downstream-6.18.dtb");
fixture!(RPI4B_DOWNSTREAM, "rpi4b-downstream-6.18.dtb");
fixture!(RPI5B_DOWNSTREAM, "rpi5b-downstream-6.18.dtb");

// Our own, compiled from the .dts next to them.
fixture!(RESERVED, "reserved.dtb");
fixture!(BUS_TRANSLATE, "bus-translate.dtb");
fixture!(OVERLAP, "overlap.dtb");
fixture!(OUTSIDE_RAM, "outside-ram.dtb");
fixture!(PARTIAL_RAM, "partial-ram.dtb");
fixture!(NO_MEMORY, "no-memory.dtb");
fixture!(ZERO_MEMORY, "zero-memory.dtb");
fixture!(ABSURD_CELLS, "absurd-cells.dtb");
fixture!(ABSURD_ROOT_CELLS, "absurd-root-cells.dtb");
fixture!(CYCLIC_PHANDLE, "cyclic-phandle.dtb");
fixture!(DUPLICATE_PHANDLE, "duplicate-phandle.dtb");
fixture!(BROKEN_CHOSEN, "broken-chosen.dtb");
fixture!(BROKEN_RESERVED, "broken-reserved.dtb");
fixture!(TRUNCATED, "truncated.dtb");
fixture!(BAD_MAGIC, "bad-magic.dtb");

/// Every well-formed fixture, for tests that sweep them all.
pub const VALID: &[(&str, &[u8])] = &[
    ("qemu-virt-a53-128m", QEMU_VIRT_A53_128M),
    ("qemu-virt-a53-2g", QEMU_VIRT_A53_2G),
    ("qemu-virt-gicv3-smmuv3", QEMU_VIRT_GICV3_SMMUV3),
    ("qemu-virt-a15-highmem-off", QEMU_VIRT_A15),
    ("qemu-raspi3b-downstream", QEMU_RASPI3B),
    ("qemu-raspi4b-downstream", QEMU_RASPI4B),
    ("rpi2b-downstream-2016", RPI2B_DOWNSTREAM_2016),
    ("rpi3b-downstream-6.18", RPI3B_DOWNSTREAM),
    ("rpi4b-downstream-6.18", RPI4B_DOWNSTREAM),
    ("rpi5b-downstream-6.18", RPI5B_DOWNSTREAM),
    ("reserved", RESERVED),
    ("bus-translate", BUS_TRANSLATE),
    ("overlap", OVERLAP),
    ("outside-ram", OUTSIDE_RAM),
    ("partial-ram", PARTIAL_RAM),
    ("no-memory", NO_MEMORY),
    ("zero-memory", ZERO_MEMORY),
    ("absurd-cells", ABSURD_CELLS),
    ("absurd-root-cells", ABSURD_ROOT_CELLS),
    ("cyclic-phandle", CYCLIC_PHANDLE),
    ("duplicate-phandle", DUPLICATE_PHANDLE),
    ("broken-chosen", BROKEN_CHOSEN),
    ("broken-reserved", BROKEN_RESERVED),
];

/// A copy of `blob` with the one-cell property `prop` of the node at `path` set to `value`: the
/// same mutation as editing the source and recompiling, for trees whose source is not kept (QEMU's).
/// Panics if the node or the four-byte property does not exist.
pub fn with_cell(blob: &[u8], path: &str, prop: &str, value: u32) -> Vec<u8> {
    let dt = super::DeviceTree::from_bytes(blob).unwrap();
    let node = dt
        .find_node(path)
        .unwrap_or_else(|| panic!("no node {path}"));
    let p = node
        .property(prop)
        .unwrap_or_else(|| panic!("no {prop} in {path}"));
    assert_eq!(p.value.len(), 4, "{path} {prop}");
    let at = p.value.as_ptr() as usize - blob.as_ptr() as usize;
    let mut out = blob.to_vec();
    out[at..at + 4].copy_from_slice(&value.to_be_bytes());
    out
}
