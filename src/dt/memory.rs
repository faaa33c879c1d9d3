//! Memory as the device tree describes it: RAM (`device_type = "memory"` nodes), the header's
//! `/memreserve/` map, and the `/reserved-memory` children. This module only reports what the tree
//! says; `mm::memmap` checks it for consistency and builds the boot memory map.

use super::blob::{be64, AllNodes, Blob, Children, Landmarks, Node, Status, StrList};
use super::error::{DtError, Name};
use super::translate::{Cells, RangesProp, TranslatedRegs};
use super::DeviceTree;
use crate::mm::addr::PhysAddr;
use crate::mm::memmap::Region;

/// Bytes of one reservation map entry (address, size), and of its terminator.
pub(super) const RSV_ENTRY: usize = 16;

/// The entries of the memory reservation map starting at `start` in `bytes`, without the (0, 0)
/// terminator, which must lie inside `bytes`.
pub(super) fn rsvmap_entries(bytes: &[u8], start: usize) -> Result<&[u8], DtError> {
    let map = bytes.get(start..).ok_or(DtError::MemReserveUnterminated)?;
    let mut off = 0usize;
    loop {
        let (addr, size) = match (be64(map, off), be64(map, off + 8)) {
            (Some(a), Some(s)) => (a, s),
            _ => return Err(DtError::MemReserveUnterminated),
        };
        if addr == 0 && size == 0 {
            return map.get(..off).ok_or(DtError::MemReserveUnterminated);
        }
        off += RSV_ENTRY;
    }
}

/// Iterator over the `/memreserve/` entries (header reservation map), up to the (0, 0)
/// terminator. Zero-sized entries are skipped (libfdt and Linux stop at the first one instead; going
/// on can only reserve more); an entry that wraps the address space is an error.
#[derive(Clone, Copy)]
pub struct MemReserves<'a> {
    data: &'a [u8],
}

impl Iterator for MemReserves<'_> {
    type Item = Result<Region, DtError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let addr = be64(self.data, 0)?;
            let size = be64(self.data, 8)?;
            self.data = self.data.get(RSV_ENTRY..).unwrap_or_default();
            if size == 0 {
                continue;
            }
            return Some(
                Region::new(PhysAddr::new(addr), size).ok_or_else(|| DtError::Overflow {
                    node: Name::new("/memreserve/"),
                    base: addr,
                    size,
                }),
            );
        }
    }
}

/// Iterator over the RAM the tree describes: every `reg` entry of every available node with
/// `device_type = "memory"` (any node name), translated to CPU physical addresses. As in Linux,
/// `linux,usable-memory` replaces `reg` where present, nodes without either are skipped, and
/// zero-sized entries are skipped (downstream Pi trees carry `reg = <0 0>` for the firmware to
/// fill in). A memory node whose parent has `#address-cells = 0` or `#size-cells = 0` is an error
/// (see [`TranslatedRegs::memory`]), not a source of empty regions.
pub struct MemoryRegions<'a> {
    nodes: MemoryNodes<'a>,
    current: Option<TranslatedRegs<'a>>,
}

/// The nodes [`MemoryRegions`] looks at: the validator's list of candidates when it has one,
/// otherwise every node.
enum MemoryNodes<'a> {
    /// The `next`th candidate of `landmarks` is the next node to look at.
    Listed {
        blob: Blob<'a>,
        landmarks: Landmarks,
        next: usize,
    },
    All(AllNodes<'a>),
}

impl<'a> Iterator for MemoryNodes<'a> {
    type Item = Node<'a>;

    fn next(&mut self) -> Option<Node<'a>> {
        match self {
            MemoryNodes::Listed {
                blob,
                landmarks,
                next,
            } => {
                let off = *landmarks.memory_candidates()?.get(*next)?;
                *next += 1;
                blob.node_at(off as usize)
            }
            MemoryNodes::All(all) => all.next(),
        }
    }
}

impl Iterator for MemoryRegions<'_> {
    type Item = Result<Region, DtError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(regs) = &mut self.current {
                match regs.next() {
                    Some(Ok(r)) if r.size() == 0 => continue,
                    Some(item) => return Some(item),
                    None => self.current = None,
                }
            }
            let node = self
                .nodes
                .by_ref()
                .find(|n| n.device_type() == Some("memory") && n.is_available())?;
            let prop = node
                .property("linux,usable-memory")
                .filter(|p| !p.is_empty())
                .or_else(|| node.property("reg"));
            if let Some(prop) = prop {
                match TranslatedRegs::memory(node, prop, RangesProp::Ranges) {
                    Ok(regs) => self.current = Some(regs),
                    Err(e) => return Some(Err(e)),
                }
            }
        }
    }
}

/// One child of `/reserved-memory`, with its properties decoded and length-checked.
#[derive(Clone)]
pub struct ReservedMemory<'a> {
    pub node: Node<'a>,
    /// `size` of a dynamically placed region (one with no `reg`).
    pub size: Option<u64>,
    /// `alignment` of a dynamically placed region.
    pub alignment: Option<u64>,
    /// `no-map`: must not be in the kernel's linear map.
    pub no_map: bool,
    /// `reusable`: the kernel may use it until its owner claims it (CMA).
    pub reusable: bool,
    /// `linux,cma-default`: the default CMA area.
    pub cma_default: bool,
    /// `linux,dma-default`: the default coherent DMA pool.
    pub dma_default: bool,
    /// `phandle` (or `linux,phandle`), through which devices refer to it (`memory-region`).
    pub phandle: Option<u32>,
    pub status: Status,
    regs: Option<TranslatedRegs<'a>>,
    alloc_ranges: Option<TranslatedRegs<'a>>,
}

impl core::fmt::Debug for ReservedMemory<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ReservedMemory")
            .field("name", &self.name())
            .field("has_reg", &self.has_reg())
            .field("size", &self.size)
            .field("alignment", &self.alignment)
            .field("no_map", &self.no_map)
            .field("reusable", &self.reusable)
            .field("cma_default", &self.cma_default)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl<'a> ReservedMemory<'a> {
    pub fn name(&self) -> &'a str {
        self.node.name()
    }

    pub fn compatible(&self) -> StrList<'a> {
        self.node.compatible()
    }

    /// Linux honours only available entries (status okay or absent).
    pub fn is_available(&self) -> bool {
        self.status == Status::Okay
    }

    /// Whether the node has a `reg` property (a statically placed region).
    pub fn has_reg(&self) -> bool {
        self.regs.is_some()
    }

    /// A region the OS must place itself: no `reg`, but a `size`.
    pub fn is_dynamic(&self) -> bool {
        self.regs.is_none() && self.size.is_some()
    }

    /// The `reg` regions as CPU physical addresses (empty if there is no `reg`). Zero-sized
    /// entries are included: Linux ignores them, and so does `mm::memmap`.
    pub fn regs(&self) -> impl Iterator<Item = Result<Region, DtError>> + 'a {
        self.regs.into_iter().flatten()
    }

    /// The `alloc-ranges` a dynamic region must be placed in (empty = anywhere).
    pub fn alloc_ranges(&self) -> impl Iterator<Item = Result<Region, DtError>> + 'a {
        self.alloc_ranges.into_iter().flatten()
    }
}

/// Iterator over the children of `/reserved-memory`, every status included (see
/// [`ReservedMemory::is_available`]).
pub struct ReservedMemories<'a> {
    children: Option<Children<'a>>,
}

impl<'a> Iterator for ReservedMemories<'a> {
    type Item = Result<ReservedMemory<'a>, DtError>;

    fn next(&mut self) -> Option<Self::Item> {
        let node = self.children.as_mut()?.next()?;
        Some(reserved_memory(node))
    }
}

fn reserved_memory(node: Node<'_>) -> Result<ReservedMemory<'_>, DtError> {
    // `size` and `alignment` should have #size-cells cells, but the downstream Pi 5 tree has a
    // one-cell `size` under #size-cells = 2. A one- or two-cell big-endian number cannot be
    // misread, so both are accepted whatever #size-cells says.
    let sized = |name| node.property(name).map(|p| p.as_u32_or_u64()).transpose();
    let regs = |name| {
        node.property(name)
            .map(|p| TranslatedRegs::memory(node, p, RangesProp::Ranges))
            .transpose()
    };
    let phandle = node
        .property("phandle")
        .or_else(|| node.property("linux,phandle"));
    Ok(ReservedMemory {
        size: sized("size")?,
        alignment: sized("alignment")?,
        no_map: node.has_property("no-map"),
        reusable: node.has_property("reusable"),
        cma_default: node.has_property("linux,cma-default"),
        dma_default: node.has_property("linux,dma-default"),
        phandle: phandle.map(|p| p.as_phandle()).transpose()?,
        status: node.status(),
        regs: regs("reg")?,
        alloc_ranges: regs("alloc-ranges")?,
        node,
    })
}

impl<'a> DeviceTree<'a> {
    /// The `/memreserve/` entries of the header.
    pub fn mem_reserve(&self) -> MemReserves<'a> {
        MemReserves { data: self.rsvmap }
    }

    /// The RAM regions (see [`MemoryRegions`]).
    pub fn memory(&self) -> MemoryRegions<'a> {
        let nodes = match self.landmarks.memory_candidates() {
            Some(_) => MemoryNodes::Listed {
                blob: self.blob,
                landmarks: self.landmarks,
                next: 0,
            },
            None => MemoryNodes::All(self.nodes()),
        };
        MemoryRegions {
            nodes,
            current: None,
        }
    }

    /// The children of `/reserved-memory` (none if the node is absent).
    ///
    /// Their `reg` and `alloc-ranges` are read with `/reserved-memory`'s own cells and translated
    /// through its `ranges`, so cell counts that differ from the root's work (Linux instead
    /// ignores such a node). Errors if the node's cells are unsupported or 0 (its children are
    /// regions with addresses and sizes: with `#size-cells = 0` every one would read as empty and
    /// be skipped, a `no-map` firmware region handed to the page allocator) or it has no `ranges`
    /// (required by the binding: without it its children's addresses mean nothing).
    pub fn reserved_memory(&self) -> Result<ReservedMemories<'a>, DtError> {
        let Some(rm) = self.find_node("/reserved-memory") else {
            return Ok(ReservedMemories { children: None });
        };
        let cells = Cells::of(&rm)?;
        cells.require_addresses(
            &rm,
            "its children's `reg` and `alloc-ranges` hold addresses",
        )?;
        cells.require_sizes(&rm)?;
        if !rm.has_property("ranges") {
            return Err(DtError::NotFound {
                what: "`ranges` property of node",
                name: Name::new("/reserved-memory"),
            });
        }
        Ok(ReservedMemories {
            children: Some(rm.children()),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::dt::fixtures::*;
    use crate::dt::{DeviceTree, DtError, Status};
    use crate::mm::memmap::Region;

    fn regions(dt: &DeviceTree<'_>) -> Vec<(u64, u64)> {
        dt.memory()
            .map(|r| r.map(|r| (r.base().as_u64(), r.size())).unwrap())
            .collect()
    }

    fn pairs(it: impl Iterator<Item = Result<Region, DtError>>) -> Vec<(u64, u64)> {
        it.map(|r| r.map(|r| (r.base().as_u64(), r.size())).unwrap())
            .collect()
    }

    #[test]
    fn qemu_memory_nodes() {
        // memory@40000000 reg = <0 0x40000000 0 SIZE> with SIZE = -m.
        let dt = DeviceTree::from_bytes(QEMU_VIRT_A53_128M).unwrap();
        assert_eq!(regions(&dt), [(0x4000_0000, 0x800_0000)]);
        let dt = DeviceTree::from_bytes(QEMU_VIRT_A53_2G).unwrap();
        assert_eq!(regions(&dt), [(0x4000_0000, 0x8000_0000)]);
        let dt = DeviceTree::from_bytes(QEMU_VIRT_GICV3_SMMUV3).unwrap();
        assert_eq!(regions(&dt), [(0x4000_0000, 0x4000_0000)]);
        let dt = DeviceTree::from_bytes(QEMU_VIRT_A15).unwrap();
        assert_eq!(regions(&dt), [(0x4000_0000, 0x2000_0000)]);
        for dt in [QEMU_VIRT_A53_128M, QEMU_VIRT_A15] {
            let dt = DeviceTree::from_bytes(dt).unwrap();
            assert_eq!(dt.mem_reserve().count(), 0);
            assert_eq!(dt.reserved_memory().unwrap().count(), 0);
        }
    }

    #[test]
    fn pi2_2016_memory_without_unit_address() {
        // bcm2709-rpi-2-b.dtb (2016): `memory { device_type = "memory"; reg = <0 0>; }`, no
        // /memreserve/, no /reserved-memory.
        let dt = DeviceTree::from_bytes(RPI2B_DOWNSTREAM_2016).unwrap();
        assert_eq!(dt.find_node("/memory").unwrap().name(), "memory");
        assert_eq!(regions(&dt), []);
        assert_eq!(dt.mem_reserve().count(), 0);
        assert_eq!(dt.reserved_memory().unwrap().count(), 0);
    }

    #[test]
    fn pi3_downstream_zero_memory_is_skipped_cma_is_dynamic() {
        // bcm2710-rpi-3-b.dts: /memreserve/ 0x0 0x1000; memory@0 reg = <0 0>;
        // reserved-memory (1/1, ranges) { linux,cma { compatible = "shared-dma-pool";
        // size = <0x4000000>; reusable; linux,cma-default; phandle = <...>; } }
        let dt = DeviceTree::from_bytes(RPI3B_DOWNSTREAM).unwrap();
        assert_eq!(regions(&dt), []);
        assert_eq!(pairs(dt.mem_reserve()), [(0, 0x1000)]);
        let rm: Vec<_> = dt.reserved_memory().unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(rm.len(), 1);
        let cma = &rm[0];
        assert_eq!(cma.name(), "linux,cma");
        assert!(cma.is_dynamic() && cma.reusable && cma.cma_default && !cma.no_map);
        assert_eq!(cma.size, Some(0x400_0000));
        assert_eq!(cma.alignment, None);
        assert_eq!(cma.compatible().first(), Some("shared-dma-pool"));
        assert_eq!(cma.alloc_ranges().count(), 0);
        assert!(cma.phandle.is_some());
    }

    #[test]
    fn pi4_downstream_two_one_cells_alloc_ranges_and_disabled_nvram() {
        // bcm2711-rpi-4-b.dts: root 2/1; memory@0 reg = <0 0 0>; reserved-memory 2/1 with
        // linux,cma { alloc-ranges = <0 0 0x30000000>; size = <0x4000000>; phandle = <0x5d>; }
        // and nvram@0/@1 { no-map; reg = <0 0 0>; status = "disabled"; phandle = <0x5e>/<0x5f>; }
        let dt = DeviceTree::from_bytes(RPI4B_DOWNSTREAM).unwrap();
        assert_eq!(regions(&dt), []);
        assert_eq!(pairs(dt.mem_reserve()), [(0, 0x1000)]);
        let rm: Vec<_> = dt.reserved_memory().unwrap().map(|r| r.unwrap()).collect();
        let names: Vec<_> = rm.iter().map(|r| r.name()).collect();
        assert_eq!(names, ["linux,cma", "nvram@0", "nvram@1"]);
        assert_eq!(pairs(rm[0].alloc_ranges()), [(0, 0x3000_0000)]);
        assert_eq!(rm[0].size, Some(0x400_0000));
        assert_eq!(rm[0].phandle, Some(0x5d));
        assert!(rm[0].is_available());
        for (nv, ph) in rm[1..].iter().zip([0x5e, 0x5f]) {
            assert!(nv.no_map && nv.has_reg() && !nv.is_dynamic());
            assert_eq!(nv.status, Status::Disabled);
            assert_eq!(pairs(nv.regs()), [(0, 0)]);
            assert_eq!(nv.phandle, Some(ph));
            assert_eq!(
                nv.compatible().collect::<Vec<_>>(),
                [
                    if ph == 0x5e {
                        "raspberrypi,bootloader-config"
                    } else {
                        "raspberrypi,bootloader-public-key"
                    },
                    "nvmem-rmem"
                ]
            );
        }
    }

    #[test]
    fn pi5_atf_no_map_with_two_two_cells() {
        // bcm2712-rpi-5-b.dts: reserved-memory 2/2 { atf@0 { no-map; reg = <0 0 0 0x80000>; } ...
        // linux,cma alloc-ranges = <0 0 0 0x40000000> }; memory@0 reg = <0 0 0 0x28000000>.
        let dt = DeviceTree::from_bytes(RPI5B_DOWNSTREAM).unwrap();
        assert_eq!(regions(&dt), [(0, 0x2800_0000)]);
        assert_eq!(dt.mem_reserve().count(), 0);
        let rm: Vec<_> = dt.reserved_memory().unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(rm[0].name(), "atf@0");
        assert!(rm[0].no_map && !rm[0].reusable);
        assert_eq!(pairs(rm[0].regs()), [(0, 0x8_0000)]);
        assert_eq!(rm[1].name(), "linux,cma");
        assert_eq!(pairs(rm[1].alloc_ranges()), [(0, 0x4000_0000)]);
    }

    #[test]
    fn custom_reserved_memory_fixture() {
        // tests/fixtures/dt/reserved.dts (see the values there).
        let dt = DeviceTree::from_bytes(RESERVED).unwrap();
        assert_eq!(
            pairs(dt.mem_reserve()),
            [(0x4000_0000, 0x1000), (0x1_2000_0000, 0x10_0000)]
        );
        assert_eq!(
            regions(&dt),
            [
                (0x4000_0000, 0x4000_0000),
                (0x1_0000_0000, 0x4000_0000),
                (0x8000_0000, 0x1000_0000)
            ]
        );
        let rm: Vec<_> = dt.reserved_memory().unwrap().map(|r| r.unwrap()).collect();
        let names: Vec<_> = rm.iter().map(|r| r.name()).collect();
        assert_eq!(
            names,
            [
                "secmon@40100000",
                "framebuffer@7f000000",
                "multi@50000000",
                "linux,cma",
                "dma-pool",
                "off@60000000"
            ]
        );
        // secmon: no-map, reg <0x0 0x40100000 0x0 0x100000> in 2/2 cells.
        assert!(rm[0].no_map && !rm[0].reusable);
        assert_eq!(pairs(rm[0].regs()), [(0x4010_0000, 0x10_0000)]);
        // framebuffer: plain reg, compatible list.
        assert!(!rm[1].no_map);
        assert_eq!(pairs(rm[1].regs()), [(0x7f00_0000, 0x80_0000)]);
        assert_eq!(
            rm[1].compatible().collect::<Vec<_>>(),
            ["acme,fb-mem", "simple-fb-mem"]
        );
        // multi: two reg entries, phandle.
        assert_eq!(
            pairs(rm[2].regs()),
            [(0x5000_0000, 0x1000), (0x5000_2000, 0x2000)]
        );
        assert_eq!(rm[2].phandle, Some(0x30));
        // linux,cma: dynamic shared-dma-pool with size, alignment and two alloc-ranges.
        let cma = &rm[3];
        assert!(cma.is_dynamic() && cma.reusable && cma.cma_default);
        assert_eq!(cma.size, Some(0x200_0000));
        assert_eq!(cma.alignment, Some(0x40_0000));
        assert_eq!(
            pairs(cma.alloc_ranges()),
            [(0x4000_0000, 0x2000_0000), (0x1_0000_0000, 0x4000_0000)]
        );
        // dma-pool: dynamic, no-map, linux,dma-default, 64-bit size.
        assert!(rm[4].is_dynamic() && rm[4].no_map && rm[4].dma_default);
        assert_eq!(rm[4].size, Some(0x1_0000_0000));
        // off: disabled.
        assert_eq!(rm[5].status, Status::Disabled);
        assert!(!rm[5].is_available());
    }

    #[test]
    fn reserved_memory_with_its_own_cells_and_offset_ranges() {
        // tests/fixtures/dt/bus-translate.dts: root 2/2; /reserved-memory 1/1 with
        // ranges = <0x0 0x0 0x40000000 0x40000000> (child 0 -> CPU 0x40000000, 1 GiB);
        // blob@1000000 reg = <0x1000000 0x10000>.
        let dt = DeviceTree::from_bytes(BUS_TRANSLATE).unwrap();
        let rm: Vec<_> = dt.reserved_memory().unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(rm.len(), 1);
        assert_eq!(pairs(rm[0].regs()), [(0x4100_0000, 0x1_0000)]);
    }

    #[test]
    fn malformed_reserved_memory_properties_are_errors() {
        let dt = DeviceTree::from_bytes(BROKEN_RESERVED).unwrap();
        let errs: Vec<String> = dt
            .reserved_memory()
            .unwrap()
            .filter_map(|r| r.err())
            .map(|e| format!("{e}"))
            .collect();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].contains("`size`"), "{}", errs[0]);
        assert!(errs[1].contains("`reg`"), "{}", errs[1]);
        assert!(errs[2].contains("`phandle`"), "{}", errs[2]);
    }

    #[test]
    fn reserved_memory_needs_addresses_and_sizes() {
        // reserved.dts: /reserved-memory 2/2 with secmon@40100000 (no-map, reg <0 0x40100000 0
        // 0x100000>). Under #size-cells = 0 that reg would read as two empty regions, skipped,
        // and the no-map firmware region would go to the page allocator: the node is refused.
        let blob = with_cell(RESERVED, "/reserved-memory", "#size-cells", 0);
        let dt = DeviceTree::from_bytes(&blob).unwrap();
        let e = dt.reserved_memory().err().unwrap();
        assert_eq!(
            format!("{e}"),
            "`#size-cells = 0` in node `reserved-memory` is not allowed: its children's `reg` are \
             memory regions, which need a size"
        );
        let blob = with_cell(RESERVED, "/reserved-memory", "#address-cells", 0);
        let dt = DeviceTree::from_bytes(&blob).unwrap();
        let e = dt.reserved_memory().err().unwrap();
        assert_eq!(
            e,
            DtError::ZeroCells {
                node: crate::dt::Name::new("reserved-memory"),
                prop: "#address-cells",
                what: "its children's `reg` and `alloc-ranges` hold addresses",
            }
        );
    }
}
