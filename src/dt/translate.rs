//! Addresses in the device tree: `#address-cells`/`#size-cells`, `reg`, and translation of a bus
//! address to a CPU physical address through the `ranges` of every bus above it.
//!
//! This is our own code rather than the `fdt` crate's `reg()`: that one casts addresses to `usize`
//! (truncating 64-bit addresses on armv7 with LPAE), panics on malformed cell properties, and does
//! not translate through `ranges` at all.
//!
//! The translation rules follow Linux's `of_translate_address`: walking up from the bus a node sits
//! on, each bus maps its child address space into its parent's through `ranges`; an empty `ranges`
//! is the identity; a missing `ranges` makes the address untranslatable (for `dma-ranges`, missing
//! means identity, as in Linux). The walk ends at the root, whose address space is the CPU's
//! physical address space. The same machinery serves `dma-ranges` (see [`RangesProp`]).

use super::blob::{read_cells, Ancestry, Node, Property};
use super::error::DtError;
use crate::mm::addr::PhysAddr;
use crate::mm::memmap::Region;

/// Largest `#address-cells` accepted on a bus: 3 is PCI (a flags cell plus a 64-bit address).
pub const MAX_ADDRESS_CELLS: u32 = 3;
/// Largest `#size-cells` accepted.
pub const MAX_SIZE_CELLS: u32 = 2;
/// Largest `#address-cells` through which `reg` values are read and translated. 3-cell (PCI)
/// addresses need the PCI bus rules (space codes) and are refused rather than misread.
pub const MAX_TRANSLATED_ADDRESS_CELLS: u32 = 2;

/// The cell counts a node declares for the addresses and sizes of its children.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cells {
    pub address: u32,
    pub size: u32,
}

impl Cells {
    /// The spec's defaults when a node does not declare them.
    pub const DEFAULT: Cells = Cells {
        address: 2,
        size: 1,
    };

    /// `#address-cells`/`#size-cells` of `node` (defaults 2/1 when absent, per the spec; they are
    /// not inherited from further up). Values above [`MAX_ADDRESS_CELLS`]/[`MAX_SIZE_CELLS`] or of
    /// the wrong length are errors.
    ///
    /// 0 is accepted here: whether it makes sense depends on what the children describe
    /// (`#size-cells = 0` is right for `/cpus` or an I2C bus, whose children have addresses but
    /// no sizes; `#address-cells = 0` for an interrupt controller without addressed children).
    /// The readers that need addresses or sizes refuse it: [`TranslatedRegs`] (addresses),
    /// [`TranslatedRegs::memory`] (sizes too), [`translate`] (addresses at every level it maps
    /// through), [`Cells::of_root`] (both, at the root).
    pub fn of(node: &Node<'_>) -> Result<Cells, DtError> {
        let read = |prop: &'static str, default: u32, max: u32| -> Result<u32, DtError> {
            match node.property(prop) {
                None => Ok(default),
                Some(p) => {
                    let value = p.as_u32()?;
                    if value > max {
                        return Err(DtError::Cells {
                            node: node.short_name(),
                            prop,
                            value,
                            max,
                        });
                    }
                    Ok(value)
                }
            }
        };
        Ok(Cells {
            address: read("#address-cells", Self::DEFAULT.address, MAX_ADDRESS_CELLS)?,
            size: read("#size-cells", Self::DEFAULT.size, MAX_SIZE_CELLS)?,
        })
    }

    /// The root's cells, which give the width of CPU physical addresses and sizes: each must be
    /// 1 or 2 (absent means the spec's defaults, 2 and 1). Errors name `/` and the property.
    pub fn of_root(root: &Node<'_>) -> Result<Cells, DtError> {
        let read = |prop: &'static str, default: u32, max: u32| -> Result<u32, DtError> {
            let value = match root.property(prop) {
                None => default,
                Some(p) => p.as_u32()?,
            };
            if value == 0 {
                return Err(DtError::ZeroCells {
                    node: root.short_name(),
                    prop,
                    what: "the root's children describe CPU physical addresses and sizes",
                });
            }
            if value > max {
                return Err(DtError::Cells {
                    node: root.short_name(),
                    prop,
                    value,
                    max,
                });
            }
            Ok(value)
        };
        Ok(Cells {
            address: read(
                "#address-cells",
                Self::DEFAULT.address,
                MAX_TRANSLATED_ADDRESS_CELLS,
            )?,
            size: read("#size-cells", Self::DEFAULT.size, MAX_SIZE_CELLS)?,
        })
    }

    /// Refuses `#address-cells = 0` on `bus`, whose children's addresses are being read or
    /// translated (`what` says which).
    pub(super) fn require_addresses(
        &self,
        bus: &Node<'_>,
        what: &'static str,
    ) -> Result<(), DtError> {
        if self.address == 0 {
            return Err(DtError::ZeroCells {
                node: bus.short_name(),
                prop: "#address-cells",
                what,
            });
        }
        Ok(())
    }

    /// Refuses `#size-cells = 0` on `bus`, whose children's `reg` are read as memory regions:
    /// without sizes every region would be empty, and an empty reservation is silently no
    /// reservation at all.
    pub(super) fn require_sizes(&self, bus: &Node<'_>) -> Result<(), DtError> {
        if self.size == 0 {
            return Err(DtError::ZeroCells {
                node: bus.short_name(),
                prop: "#size-cells",
                what: "its children's `reg` are memory regions, which need a size",
            });
        }
        Ok(())
    }

    /// Bytes of one (address, size) pair.
    pub fn pair_bytes(&self) -> usize {
        (self.address as usize + self.size as usize) * 4
    }

    /// Refuses cell counts whose values cannot be read as a plain 64-bit address.
    fn check_translatable(&self, bus: &Node<'_>) -> Result<(), DtError> {
        if self.address > MAX_TRANSLATED_ADDRESS_CELLS {
            return Err(DtError::Cells {
                node: bus.short_name(),
                prop: "#address-cells",
                value: self.address,
                max: MAX_TRANSLATED_ADDRESS_CELLS,
            });
        }
        Ok(())
    }
}

/// Iterator over (address, size) pairs of a `reg`-like property, in the bus's own address space.
#[derive(Clone, Copy)]
pub struct Pairs<'a> {
    data: &'a [u8],
    cells: Cells,
}

impl<'a> Pairs<'a> {
    /// Splits `prop` into pairs of `cells` (at most 2 address cells); the length must be a whole
    /// number of pairs.
    pub fn new(prop: &Property<'a>, cells: Cells) -> Result<Pairs<'a>, DtError> {
        if cells.address > MAX_TRANSLATED_ADDRESS_CELLS || cells.size > MAX_SIZE_CELLS {
            return Err(prop.error("address or size wider than two cells"));
        }
        let pair = cells.pair_bytes();
        if pair == 0 {
            if prop.value.is_empty() {
                return Ok(Pairs { data: &[], cells });
            }
            return Err(prop.error("non-empty but #address-cells and #size-cells are both 0"));
        }
        if !prop.value.len().is_multiple_of(pair) {
            return Err(prop.error("length is not a whole number of (address, size) pairs"));
        }
        Ok(Pairs {
            data: prop.value,
            cells,
        })
    }
}

impl Iterator for Pairs<'_> {
    /// (address, size)
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let pair = self.cells.pair_bytes();
        if pair == 0 || self.data.len() < pair {
            return None;
        }
        let a_bytes = self.cells.address as usize * 4;
        let addr = read_cells(self.data, self.cells.address)?;
        let size = read_cells(self.data.get(a_bytes..)?, self.cells.size)?;
        self.data = self.data.get(pair..).unwrap_or_default();
        Some((addr, size))
    }
}

/// One entry of a `ranges` or `dma-ranges` property: child-bus addresses
/// `child .. child + size` appear at `parent ..` in the parent bus's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeEntry {
    /// The leading cell of a 3-cell child address (the PCI `phys.hi` flags cell); 0 otherwise.
    pub child_hi: u32,
    pub child: u64,
    pub parent: u64,
    pub size: u64,
}

impl RangeEntry {
    /// Translates the child-bus region `addr .. addr + size` if it lies entirely inside this entry
    /// (for `size == 0`, if `addr` does). `None` otherwise or if the result would overflow.
    pub fn translate(&self, addr: u64, size: u64) -> Option<u64> {
        let (start, end) = (self.child as u128, self.child as u128 + self.size as u128);
        let (a, a_end) = (addr as u128, addr as u128 + size as u128);
        if a < start || a >= end || a_end > end {
            return None;
        }
        self.parent.checked_add(addr - self.child)
    }
}

/// Iterator over the entries of a `ranges`/`dma-ranges` property.
#[derive(Clone, Copy)]
pub struct Ranges<'a> {
    data: &'a [u8],
    child: u32,
    parent: u32,
    size: u32,
}

impl<'a> Ranges<'a> {
    /// Parses `prop` with `child` = the bus's own cells (address up to 3, the first of three being
    /// kept as `child_hi`) and `parent_address_cells` = its parent's `#address-cells` (up to 2).
    /// An empty property yields no entries: callers treat that as the identity mapping.
    pub fn new(
        prop: &Property<'a>,
        child: Cells,
        parent_address_cells: u32,
    ) -> Result<Ranges<'a>, DtError> {
        if child.address > MAX_ADDRESS_CELLS
            || child.size > MAX_SIZE_CELLS
            || parent_address_cells > MAX_TRANSLATED_ADDRESS_CELLS
        {
            return Err(prop.error("cell counts too large for a ranges entry"));
        }
        if !prop.value.is_empty() && (child.address == 0 || parent_address_cells == 0) {
            return Err(prop.error(
                "entries need a child and a parent address, but #address-cells is 0 on this node \
                 or its parent",
            ));
        }
        let entry = (child.address + parent_address_cells + child.size) as usize * 4;
        if !prop.value.is_empty() && (entry == 0 || !prop.value.len().is_multiple_of(entry)) {
            return Err(prop.error("length is not a whole number of (child, parent, size) entries"));
        }
        Ok(Ranges {
            data: prop.value,
            child: child.address,
            parent: parent_address_cells,
            size: child.size,
        })
    }
}

impl Iterator for Ranges<'_> {
    type Item = RangeEntry;

    fn next(&mut self) -> Option<RangeEntry> {
        let entry = (self.child + self.parent + self.size) as usize * 4;
        if entry == 0 || self.data.len() < entry {
            return None;
        }
        let (child_hi, low_cells, mut at) = if self.child == 3 {
            (super::blob::be32(self.data, 0)?, 2, 4)
        } else {
            (0, self.child, 0)
        };
        let child = read_cells(self.data.get(at..)?, low_cells)?;
        at += low_cells as usize * 4;
        let parent = read_cells(self.data.get(at..)?, self.parent)?;
        at += self.parent as usize * 4;
        let size = read_cells(self.data.get(at..)?, self.size)?;
        self.data = self.data.get(entry..).unwrap_or_default();
        Some(RangeEntry {
            child_hi,
            child,
            parent,
            size,
        })
    }
}

/// Which property describes a bus's mapping into its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangesProp {
    /// `ranges`: CPU accesses to devices. Missing at some level = untranslatable.
    Ranges,
    /// `dma-ranges`: device (bus-master) addresses. Missing at some level = identity there.
    DmaRanges,
}

impl RangesProp {
    pub fn name(self) -> &'static str {
        match self {
            RangesProp::Ranges => "ranges",
            RangesProp::DmaRanges => "dma-ranges",
        }
    }
}

/// Why `translate` refuses a bus with `#address-cells = 0` on its way.
const TRANSLATED: &str = "addresses are translated through it";

/// Translates the region `addr .. addr + size`, given in the child address space of the last node
/// of `bus` (an ancestry chain root → ... → bus), up to the root's address space.
///
/// `node` only names the device in error values. The whole region must fall inside one entry at
/// every level (a region straddling two entries would need splitting and is refused).
pub fn translate(
    bus: &Ancestry<'_>,
    node: &Node<'_>,
    addr: u64,
    size: u64,
    which: RangesProp,
) -> Result<u64, DtError> {
    let untranslatable = |addr, what| DtError::Untranslatable {
        node: node.short_name(),
        addr,
        what,
    };
    let mut addr = addr;
    let mut level = bus.len();
    // Each iteration moves one bus up; the ancestry is at most MAX_DEPTH long.
    while level >= 2 {
        let (Some(b), Some(parent)) = (bus.get(level - 1), bus.get(level - 2)) else {
            return Err(untranslatable(addr, "broken ancestry"));
        };
        let child_cells = Cells::of(&b)?;
        child_cells.check_translatable(&b)?;
        let parent_cells = Cells::of(&parent)?;
        parent_cells.check_translatable(&parent)?;
        match b.property(which.name()) {
            None if which == RangesProp::Ranges => {
                return Err(untranslatable(
                    addr,
                    "a parent bus has no `ranges` property",
                ));
            }
            None => {}
            Some(p) => {
                // An address space of 0 cells has no addresses to map to or from, even through
                // an empty (identity) property.
                child_cells.require_addresses(&b, TRANSLATED)?;
                parent_cells.require_addresses(&parent, TRANSLATED)?;
                if !p.is_empty() {
                    let mut entries = Ranges::new(&p, child_cells, parent_cells.address)?;
                    addr = entries
                        .find_map(|e| e.translate(addr, size))
                        .ok_or_else(|| {
                            untranslatable(
                                addr,
                                "not (entirely) inside any entry of a parent bus's ranges",
                            )
                        })?;
                }
            }
        }
        level -= 1;
    }
    Ok(addr)
}

/// Iterator over the CPU physical regions of a `reg`-like property of a node: each pair is read
/// with the parent's cells and translated through every `ranges` above. Yields an error for a pair
/// that cannot be translated or would wrap the address space.
#[derive(Clone, Copy)]
pub struct TranslatedRegs<'a> {
    node: Node<'a>,
    bus: Ancestry<'a>,
    pairs: Pairs<'a>,
    which: RangesProp,
}

impl<'a> TranslatedRegs<'a> {
    /// The regions of property `prop` of `node` (`reg`, `alloc-ranges`, ...). Errors if the node
    /// is the root (no parent bus), its parent has `#address-cells = 0` (no addresses to read) or
    /// the property does not split into pairs.
    pub fn new(node: Node<'a>, prop: Property<'a>, which: RangesProp) -> Result<Self, DtError> {
        Self::read(node, prop, which, false)
    }

    /// As [`TranslatedRegs::new`], for a property that describes memory (RAM, reservations,
    /// `alloc-ranges`): also refuses a parent with `#size-cells = 0`, under which every region
    /// would read as empty and be skipped as such.
    pub fn memory(node: Node<'a>, prop: Property<'a>, which: RangesProp) -> Result<Self, DtError> {
        Self::read(node, prop, which, true)
    }

    fn read(
        node: Node<'a>,
        prop: Property<'a>,
        which: RangesProp,
        need_sizes: bool,
    ) -> Result<Self, DtError> {
        let bus = node.ancestry().pop();
        let parent = bus.last().ok_or_else(|| DtError::NotFound {
            what: "parent bus of node",
            name: node.short_name(),
        })?;
        let cells = Cells::of(&parent)?;
        cells.check_translatable(&parent)?;
        cells.require_addresses(&parent, "its children's `reg` hold addresses")?;
        if need_sizes {
            cells.require_sizes(&parent)?;
        }
        let pairs = Pairs::new(&prop, cells)?;
        Ok(TranslatedRegs {
            node,
            bus,
            pairs,
            which,
        })
    }
}

impl Iterator for TranslatedRegs<'_> {
    type Item = Result<Region, DtError>;

    fn next(&mut self) -> Option<Result<Region, DtError>> {
        let (addr, size) = self.pairs.next()?;
        Some(
            translate(&self.bus, &self.node, addr, size, self.which).and_then(|base| {
                Region::new(PhysAddr::new(base), size).ok_or_else(|| DtError::Overflow {
                    node: self.node.short_name(),
                    base,
                    size,
                })
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dt::fixtures::*;
    use crate::dt::{DeviceTree, Name};

    fn reg_of(dt: &DeviceTree<'_>, path: &str) -> Result<Vec<(u64, u64)>, DtError> {
        let node = dt.find_node(path).unwrap();
        dt.reg(&node)?
            .unwrap()
            .map(|r| r.map(|r| (r.base().as_u64(), r.size())))
            .collect()
    }

    #[test]
    fn nested_buses() {
        // bus-translate.dts: /soc maps 0x7e000000.. to 0x3f000000 (16 MiB); bridge@7e010000 maps
        // its 0.. to /soc's 0x7e010000 (64 KiB).
        let dt = DeviceTree::from_bytes(BUS_TRANSLATE).unwrap();
        assert_eq!(
            reg_of(&dt, "/soc/bridge@7e010000/uart@200"),
            Ok(vec![(0x3f01_0200, 0x100)])
        );
        assert_eq!(
            reg_of(&dt, "/soc/bridge@7e010000"),
            Ok(vec![(0x3f01_0000, 0x1_0000)])
        );
        assert_eq!(
            reg_of(&dt, "/soc/uart@7e215040"),
            Ok(vec![(0x3f21_5040, 0x40)])
        );
        // Empty `ranges` = identity at that level.
        assert_eq!(
            reg_of(&dt, "/soc/ident@7e200000/dev@7e200100"),
            Ok(vec![(0x3f20_0100, 0x100), (0x3f20_0400, 0x10)])
        );
        assert_eq!(
            reg_of(&dt, "/memory@40000000"),
            Ok(vec![(0x4000_0000, 0x4000_0000)])
        );
        assert_eq!(
            reg_of(&dt, "/pcie@10000000"),
            Ok(vec![(0x1000_0000, 0x100_0000)])
        );
    }

    #[test]
    fn untranslatable_addresses_are_errors() {
        let dt = DeviceTree::from_bytes(BUS_TRANSLATE).unwrap();
        let e = reg_of(&dt, "/soc/opaque@7e100000/dev@10").unwrap_err();
        assert_eq!(
            format!("{e}"),
            "cannot translate address 0x10 of node `dev@10` to a CPU physical address: \
             a parent bus has no `ranges` property"
        );
        // 0xf000 + 0x2000 crosses the end of the bridge's 64 KiB range.
        let e = reg_of(&dt, "/soc/bridge@7e010000/timer@f000").unwrap_err();
        assert!(
            matches!(e, DtError::Untranslatable { addr: 0xf000, .. }),
            "{e:?}"
        );
        let e = reg_of(&dt, "/soc/outside@1000").unwrap_err();
        assert!(
            matches!(e, DtError::Untranslatable { addr: 0x1000, .. }),
            "{e:?}"
        );
        // A device on the PCI bus: 3-cell addresses are refused, not misread.
        let e = reg_of(&dt, "/pcie@10000000/dev@0,0").unwrap_err();
        assert_eq!(
            e,
            DtError::Cells {
                node: Name::new("pcie@10000000"),
                prop: "#address-cells",
                value: 3,
                max: 2
            }
        );
        assert!(dt.reg(&dt.root()).unwrap().is_none());
        let e = dt.reg0(&dt.find_node("/soc").unwrap()).unwrap_err();
        assert!(matches!(e, DtError::NotFound { .. }), "{e:?}");
    }

    #[test]
    fn pci_ranges_parse_with_the_flags_cell() {
        // ranges = <0x02000000 0x0 0x20000000  0x0 0x20000000  0x0 0x10000000>,
        //          <0x43000000 0x80 0x0  0x80 0x0  0x1 0x0>;
        let dt = DeviceTree::from_bytes(BUS_TRANSLATE).unwrap();
        let pcie = dt.find_node("/pcie@10000000").unwrap();
        let cells = Cells::of(&pcie).unwrap();
        assert_eq!(
            cells,
            Cells {
                address: 3,
                size: 2
            }
        );
        let prop = pcie.property("ranges").unwrap();
        let entries: Vec<_> = Ranges::new(&prop, cells, 2).unwrap().collect();
        assert_eq!(
            entries,
            [
                RangeEntry {
                    child_hi: 0x0200_0000,
                    child: 0x2000_0000,
                    parent: 0x2000_0000,
                    size: 0x1000_0000
                },
                RangeEntry {
                    child_hi: 0x4300_0000,
                    child: 0x80_0000_0000,
                    parent: 0x80_0000_0000,
                    size: 0x1_0000_0000
                },
            ]
        );
    }

    #[test]
    fn dma_ranges_reuse_the_same_walk() {
        // /soc dma-ranges = <0xc0000000 0x0 0x0 0x3f000000>: bus 0xc0000000 is CPU 0.
        let dt = DeviceTree::from_bytes(BUS_TRANSLATE).unwrap();
        let uart = dt.find_node("/soc/uart@7e215040").unwrap();
        let soc_chain = uart.ancestry().pop();
        assert_eq!(
            translate(
                &soc_chain,
                &uart,
                0xc000_1000,
                0x1000,
                RangesProp::DmaRanges
            ),
            Ok(0x1000)
        );
        // The bridge has no dma-ranges: identity at its level, then /soc's.
        let dev = dt.find_node("/soc/bridge@7e010000/uart@200").unwrap();
        let bridge_chain = dev.ancestry().pop();
        assert_eq!(
            translate(
                &bridge_chain,
                &dev,
                0xc000_2000,
                0x100,
                RangesProp::DmaRanges
            ),
            Ok(0x2000)
        );
        // Outside /soc's dma-ranges window.
        assert!(translate(&soc_chain, &uart, 0x1000, 0x10, RangesProp::DmaRanges).is_err());
        // The same walk with `ranges` is the MMIO view.
        assert_eq!(
            translate(&soc_chain, &uart, 0x7e20_1000, 0x200, RangesProp::Ranges),
            Ok(0x3f20_1000)
        );
    }

    #[test]
    fn raspberry_pi_soc_windows() {
        // Pi 3: soc ranges <0x7e000000 0x3f000000 0x1000000>, <0x40000000 0x40000000 0x1000>;
        // serial@7e201000 reg <0x7e201000 0x200>; interrupt-controller@40000000 reg <... 0x100>.
        let dt = DeviceTree::from_bytes(RPI3B_DOWNSTREAM).unwrap();
        assert_eq!(
            reg_of(&dt, "/soc/serial@7e201000"),
            Ok(vec![(0x3f20_1000, 0x200)])
        );
        assert_eq!(
            reg_of(&dt, "/soc/interrupt-controller@40000000"),
            Ok(vec![(0x4000_0000, 0x100)])
        );
        // Pi 3 dma-ranges: bus 0xc0000000 -> 0 (0x3f000000 bytes), 0x7e000000 -> 0x3f000000.
        let uart = dt.find_node("/soc/serial@7e201000").unwrap();
        let soc = uart.ancestry().pop();
        assert_eq!(
            translate(&soc, &uart, 0xc010_0000, 0x1000, RangesProp::DmaRanges),
            Ok(0x10_0000)
        );
        assert_eq!(
            translate(&soc, &uart, 0x7e20_1000, 4, RangesProp::DmaRanges),
            Ok(0x3f20_1000)
        );
        // Pi 4 (root 2/1, soc 1/1): 0x7e000000 -> 0xfe000000, 0x40000000 -> 0xff800000; the
        // GIC-400 reg <0x40041000 0x1000 0x40042000 0x2000 0x40044000 0x2000 0x40046000 0x2000>.
        let dt = DeviceTree::from_bytes(RPI4B_DOWNSTREAM).unwrap();
        assert_eq!(
            reg_of(&dt, "/soc/serial@7e201000"),
            Ok(vec![(0xfe20_1000, 0x200)])
        );
        assert_eq!(
            reg_of(&dt, "/soc/interrupt-controller@40041000"),
            Ok(vec![
                (0xff84_1000, 0x1000),
                (0xff84_2000, 0x2000),
                (0xff84_4000, 0x2000),
                (0xff84_6000, 0x2000)
            ])
        );
    }

    #[test]
    fn qemu_virt_flat_layout() {
        // smmuv3@9050000 reg <0 0x09050000 0 0x20000>; pcie reg <0x40 0x10000000 0 0x10000000>.
        let dt = DeviceTree::from_bytes(QEMU_VIRT_GICV3_SMMUV3).unwrap();
        let smmu = dt.find_compatible("arm,smmu-v3").next().unwrap();
        assert_eq!(
            dt.reg0(&smmu).map(|r| (r.base().as_u64(), r.size())),
            Ok((0x905_0000, 0x2_0000))
        );
        assert!(smmu.has_property("dma-coherent"));
        let pcie = dt.find_compatible("pci-host-ecam-generic").next().unwrap();
        assert_eq!(
            dt.reg0(&pcie).map(|r| (r.base().as_u64(), r.size())),
            Ok((0x40_1000_0000, 0x1000_0000))
        );
        // armv7 highmem=off: ECAM <0 0x3f000000 0 0x1000000>; 32 virtio-mmio slots from 0xa000000.
        let dt = DeviceTree::from_bytes(QEMU_VIRT_A15).unwrap();
        let pcie = dt.find_compatible("pci-host-ecam-generic").next().unwrap();
        assert_eq!(
            dt.reg0(&pcie).map(|r| (r.base().as_u64(), r.size())),
            Ok((0x3f00_0000, 0x100_0000))
        );
        let mut virtio: Vec<u64> = dt
            .find_compatible("virtio,mmio")
            .map(|n| dt.reg0(&n).unwrap().base().as_u64())
            .collect();
        virtio.sort();
        assert_eq!(virtio.len(), 32);
        assert_eq!((virtio[0], virtio[31]), (0xa00_0000, 0xa00_3e00));
    }

    #[test]
    fn absurd_cells_are_errors() {
        // absurd-cells.dts: /soc #address-cells = 0xffffffff; /reserved-memory #size-cells = 3.
        let dt = DeviceTree::from_bytes(ABSURD_CELLS).unwrap();
        let e = reg_of(&dt, "/soc/dev@0").unwrap_err();
        assert_eq!(
            e,
            DtError::Cells {
                node: Name::new("soc"),
                prop: "#address-cells",
                value: u32::MAX,
                max: 3
            }
        );
        assert_eq!(
            format!("{e}"),
            "`#address-cells = 4294967295` in node `soc` is not supported (at most 3)"
        );
        let e = dt.reserved_memory().err().unwrap();
        assert_eq!(
            e,
            DtError::Cells {
                node: Name::new("reserved-memory"),
                prop: "#size-cells",
                value: 3,
                max: 2
            }
        );
        let dt = DeviceTree::from_bytes(ABSURD_ROOT_CELLS).unwrap();
        let e = dt.memory().next().unwrap().unwrap_err();
        assert_eq!(
            e,
            DtError::Cells {
                node: Name::new("/"),
                prop: "#address-cells",
                value: 4,
                max: 3
            }
        );
    }

    /// The `ZeroCells` error about `prop` of `node`.
    fn zero(node: &str, prop: &'static str, what: &'static str) -> DtError {
        DtError::ZeroCells {
            node: Name::new(node),
            prop,
            what,
        }
    }

    const ROOT_WHAT: &str = "the root's children describe CPU physical addresses and sizes";
    const ADDRESSES_WHAT: &str = "its children's `reg` hold addresses";
    const SIZES_WHAT: &str = "its children's `reg` are memory regions, which need a size";

    #[test]
    fn root_cells_are_one_or_two() {
        // QEMU virt: root #address-cells = <2>, #size-cells = <2>; Pi 3: 1 and 1.
        let dt = DeviceTree::from_bytes(QEMU_VIRT_A53_128M).unwrap();
        assert_eq!(
            dt.root_cells(),
            Ok(Cells {
                address: 2,
                size: 2
            })
        );
        let dt = DeviceTree::from_bytes(RPI3B_DOWNSTREAM).unwrap();
        assert_eq!(
            dt.root_cells(),
            Ok(Cells {
                address: 1,
                size: 1
            })
        );
        for (prop, value, expect) in [
            (
                "#address-cells",
                0,
                "`#address-cells = 0` in node `/` is not allowed: the root's children describe \
                 CPU physical addresses and sizes",
            ),
            (
                "#size-cells",
                0,
                "`#size-cells = 0` in node `/` is not allowed: the root's children describe CPU \
                 physical addresses and sizes",
            ),
            (
                "#address-cells",
                3,
                "`#address-cells = 3` in node `/` is not supported (at most 2)",
            ),
            (
                "#address-cells",
                5,
                "`#address-cells = 5` in node `/` is not supported (at most 2)",
            ),
            (
                "#size-cells",
                u32::MAX,
                "`#size-cells = 4294967295` in node `/` is not supported (at most 2)",
            ),
        ] {
            let blob = with_cell(QEMU_VIRT_A53_128M, "/", prop, value);
            let dt = DeviceTree::from_bytes(&blob).unwrap();
            let e = dt.root_cells().unwrap_err();
            assert_eq!(format!("{e}"), expect);
        }
        let blob = with_cell(QEMU_VIRT_A53_128M, "/", "#size-cells", 0);
        let dt = DeviceTree::from_bytes(&blob).unwrap();
        assert_eq!(dt.root_cells(), Err(zero("/", "#size-cells", ROOT_WHAT)));
    }

    #[test]
    fn zero_address_cells_refused_where_addresses_are_read() {
        // Root #address-cells = 0 under QEMU's tree: pl011@9000000 (reg <0 0x9000000 0 0x1000>)
        // and memory@40000000 are children of the root, so reading either names `/`.
        let blob = with_cell(QEMU_VIRT_A53_128M, "/", "#address-cells", 0);
        let dt = DeviceTree::from_bytes(&blob).unwrap();
        let e = reg_of(&dt, "/pl011@9000000").unwrap_err();
        assert_eq!(e, zero("/", "#address-cells", ADDRESSES_WHAT));
        assert_eq!(
            format!("{e}"),
            "`#address-cells = 0` in node `/` is not allowed: its children's `reg` hold addresses"
        );
        assert_eq!(
            dt.memory().next(),
            Some(Err(zero("/", "#address-cells", ADDRESSES_WHAT)))
        );
        // bus-translate: /soc (1/1, ranges to the root) holds uart@7e215040. With /soc at 0
        // address cells its children's reg cannot be read; with the root at 0 the address read
        // under /soc cannot be translated into it.
        let blob = with_cell(BUS_TRANSLATE, "/soc", "#address-cells", 0);
        let dt = DeviceTree::from_bytes(&blob).unwrap();
        assert_eq!(
            reg_of(&dt, "/soc/uart@7e215040"),
            Err(zero("soc", "#address-cells", ADDRESSES_WHAT))
        );
        let blob = with_cell(BUS_TRANSLATE, "/", "#address-cells", 0);
        let dt = DeviceTree::from_bytes(&blob).unwrap();
        let e = reg_of(&dt, "/soc/uart@7e215040").unwrap_err();
        assert_eq!(
            format!("{e}"),
            "`#address-cells = 0` in node `/` is not allowed: addresses are translated through it"
        );
        // A non-empty `ranges` needs addresses on both sides, whoever parses it.
        let soc = dt.find_node("/soc").unwrap();
        let ranges = soc.property("ranges").unwrap();
        let e = Ranges::new(&ranges, Cells::of(&soc).unwrap(), 0)
            .err()
            .unwrap();
        assert!(
            format!("{e}").starts_with("property `ranges` of node `soc` ("),
            "{e}"
        );
        assert!(
            format!("{e}").ends_with(
                "entries need a child and a parent address, but #address-cells is 0 on this node \
                 or its parent"
            ),
            "{e}"
        );
    }

    #[test]
    fn zero_size_cells_refused_for_memory_only() {
        // Root #size-cells = 0: memory@40000000's reg <0 0x40000000 0 0x8000000> would read as
        // two empty regions, i.e. no RAM: refused naming the root instead.
        let blob = with_cell(QEMU_VIRT_A53_128M, "/", "#size-cells", 0);
        let dt = DeviceTree::from_bytes(&blob).unwrap();
        let e = dt.memory().next().unwrap().unwrap_err();
        assert_eq!(e, zero("/", "#size-cells", SIZES_WHAT));
        assert_eq!(
            format!("{e}"),
            "`#size-cells = 0` in node `/` is not allowed: its children's `reg` are memory \
             regions, which need a size"
        );
        // A device's reg is still read (size-less buses such as I2C are legal): pairs of two
        // address cells and no size.
        assert_eq!(
            reg_of(&dt, "/pl011@9000000"),
            Ok(vec![(0x900_0000, 0), (0x1000, 0)])
        );
        // /cpus has #size-cells = <0> in every tree: the CPUs are still found.
        let dt = DeviceTree::from_bytes(QEMU_VIRT_A53_2G).unwrap();
        assert_eq!(dt.cpu_count(), Ok(4));
    }

    #[test]
    fn range_entry_edges() {
        let e = RangeEntry {
            child_hi: 0,
            child: 0x1000,
            parent: 0x9000,
            size: 0x1000,
        };
        assert_eq!(e.translate(0x1000, 0x1000), Some(0x9000));
        assert_eq!(e.translate(0x1fff, 1), Some(0x9fff));
        assert_eq!(e.translate(0x1fff, 2), None);
        assert_eq!(e.translate(0x2000, 0), None);
        assert_eq!(e.translate(0xfff, 1), None);
        let top = RangeEntry {
            child_hi: 0,
            child: 0,
            parent: u64::MAX - 0xf,
            size: u64::MAX,
        };
        assert_eq!(top.translate(0xf, 1), Some(u64::MAX));
        assert_eq!(top.translate(0x10, 1), None, "parent address would wrap");
        let huge = RangeEntry {
            child_hi: 0,
            child: u64::MAX - 1,
            parent: 0,
            size: u64::MAX,
        };
        assert_eq!(huge.translate(u64::MAX, 1), Some(1));
        let empty = RangeEntry {
            child_hi: 0,
            child: 0,
            parent: 0,
            size: 0,
        };
        assert_eq!(empty.translate(0, 0), None);
    }
}
