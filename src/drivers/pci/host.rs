//! The host bridge as its device-tree node describes it (Linux's bindings
//! `pci/host-generic-pci.yaml`, the PCI bus binding to Open Firmware, `pci/pci-iommu.txt`,
//! `pci/pci-msi.txt`; interrupt-map from the DT specification, section 2.4):
//!
//! - `reg`: the ECAM window; `bus-range`: the buses it covers, the first at the window's base.
//! - `ranges`: the windows through which the CPU reaches PCI memory and I/O space. Each child
//!   address is 3 cells, `phys.hi phys.mid phys.lo`: bits 25:24 of phys.hi are the space code
//!   (00 config, 01 I/O, 10 32-bit memory, 11 64-bit memory), bit 30 marks prefetchable memory.
//!   The parent address is translated up to a CPU address through the buses above the bridge.
//! - `interrupt-map` / `interrupt-map-mask`: where each (device, INTx pin) is wired. Entries are
//!   (child unit address: 3 cells, pin: 1 cell, parent phandle, parent unit address:
//!   `#address-cells` of the parent (0 if it has none, as Linux reads it), parent specifier:
//!   `#interrupt-cells` of the parent).
//! - `iommu-map` / `msi-map` (+ `-mask`): requester ID ranges to IOMMU StreamIDs and MSI
//!   controller DeviceIDs, entries of (id-base, phandle, out-base, length). The phandle must name
//!   an IOMMU (`#iommu-cells = 1`) or an MSI controller (`msi-controller`, `#msi-cells` 1 or
//!   absent): the one-cell out-base is their specifier.
//!
//! Everything is parsed and checked once, in [`HostBridge::from_dt`], into owned values, so the
//! lookups afterwards cannot fail on malformed input.

use alloc::vec::Vec;
use core::fmt;

use super::assign::validate_windows;
use super::{Bdf, IntxPin, PciError, Space};
use crate::dt::{
    translate, Cells, DeviceTree, Node, Property, Ranges, RangesProp, MAX_ADDRESS_CELLS,
};
use crate::mm::addr::PhysAddr;
use crate::mm::memmap::HumanSize;

/// The `compatible` string of the generic ECAM host bridge.
pub const COMPATIBLE: &str = "pci-host-ecam-generic";

/// Most cells in an interrupt specifier this driver keeps (the GIC uses 3, or 4 with PPI
/// partitions).
pub const MAX_INTERRUPT_CELLS: usize = 4;

/// ECAM gives each bus 1 MiB: 32 devices x 8 functions x 4 KiB.
const ECAM_BUS_SHIFT: u32 = 20;

/// Interrupt controllers whose specifiers follow the Arm GIC binding (type, number, flags).
const GIC_COMPATIBLES: &[&str] = &[
    "arm,gic-v3",
    "arm,gic-400",
    "arm,cortex-a15-gic",
    "arm,cortex-a9-gic",
    "arm,cortex-a7-gic",
    "arm,pl390",
];

/// The configuration-space window: which buses it covers and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EcamWindow {
    base: PhysAddr,
    size: u64,
    bus_start: u8,
    bus_end: u8,
}

impl EcamWindow {
    /// The window at `base` of `size` bytes serving buses `bus_start..=bus_end`, `bus_start`
    /// at `base`. A window too small for the whole range serves the buses it can hold (Linux
    /// does the same, with a warning): check [`EcamWindow::bus_end`]. Errors: a range that ends
    /// before it starts, a window smaller than one bus (1 MiB), or one that wraps.
    pub fn new(
        base: PhysAddr,
        size: u64,
        bus_start: u8,
        bus_end: u8,
    ) -> Result<EcamWindow, PciError> {
        let bad = |what| Err(PciError::HostBridge { what });
        if bus_end < bus_start {
            return bad("bus-range ends before it starts");
        }
        if base.checked_add(size).is_none() {
            return bad("the ECAM window wraps past the end of the address space");
        }
        let buses = size >> ECAM_BUS_SHIFT;
        if buses == 0 {
            return bad("the ECAM window is smaller than one bus (1 MiB)");
        }
        let last_held = u64::from(bus_start) + (buses - 1);
        let bus_end = last_held.min(u64::from(bus_end)) as u8;
        Ok(EcamWindow {
            base,
            size,
            bus_start,
            bus_end,
        })
    }

    /// CPU physical address of the window (map `size()` bytes here).
    pub fn base(&self) -> PhysAddr {
        self.base
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The root bus: the one [`super::enumerate`] scans.
    pub fn bus_start(&self) -> u8 {
        self.bus_start
    }

    /// The last bus the window serves.
    pub fn bus_end(&self) -> u8 {
        self.bus_end
    }

    /// Byte offset from [`EcamWindow::base`] of config register `reg` of `bdf`:
    /// `(bus - bus_start) << 20 | device << 15 | function << 12 | reg`. `None` if the bus is
    /// outside the window or `reg` is not an aligned dword below 4096.
    pub fn offset(&self, bdf: Bdf, reg: u16) -> Option<u64> {
        if !(self.bus_start..=self.bus_end).contains(&bdf.bus())
            || reg >= super::CONFIG_SPACE_SIZE
            || !reg.is_multiple_of(4)
        {
            return None;
        }
        let bus = u64::from(bdf.bus() - self.bus_start);
        Some(
            bus << ECAM_BUS_SHIFT
                | u64::from(bdf.device()) << 15
                | u64::from(bdf.function()) << 12
                | u64::from(reg),
        )
    }
}

impl fmt::Display for EcamWindow {
    /// `ECAM 0x4010000000 (256 MiB) buses 00-ff`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ECAM {:#x} ({}) buses {:02x}-{:02x}",
            self.base.as_u64(),
            HumanSize(self.size),
            self.bus_start,
            self.bus_end
        )
    }
}

/// A window of the host bridge: bus addresses `pci_addr .. pci_addr + size` of one space,
/// reached by the CPU at `cpu_addr ..`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub kind: Space,
    pub prefetchable: bool,
    pub pci_addr: u64,
    pub cpu_addr: PhysAddr,
    pub size: u64,
}

impl fmt::Display for Window {
    /// `mem64 pref 0x8000000000 (512 GiB) bus 0x8000000000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if self.prefetchable {
            f.write_str(" pref")?;
        }
        write!(
            f,
            " {:#x} ({}) bus {:#x}",
            self.cpu_addr.as_u64(),
            HumanSize(self.size),
            self.pci_addr
        )
    }
}

/// How to read an interrupt specifier's cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Controller {
    /// An Arm GIC: cells are (type: 0 SPI, 1 PPI, 2 extended SPI, 3 extended PPI; number;
    /// trigger flags).
    Gic,
    /// Any other controller: the cells are opaque here.
    Other,
}

/// An interrupt as its controller's binding names it: the controller's phandle and its cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptSpec {
    parent: u32,
    controller: Controller,
    cells: [u32; MAX_INTERRUPT_CELLS],
    len: u8,
}

impl InterruptSpec {
    /// `None` if `cells` has more than [`MAX_INTERRUPT_CELLS`] cells.
    pub fn new(parent: u32, controller: Controller, cells: &[u32]) -> Option<InterruptSpec> {
        let mut own = [0; MAX_INTERRUPT_CELLS];
        own.get_mut(..cells.len())?.copy_from_slice(cells);
        Some(InterruptSpec {
            parent,
            controller,
            cells: own,
            len: cells.len() as u8,
        })
    }

    /// The phandle of the interrupt controller.
    pub fn parent(&self) -> u32 {
        self.parent
    }

    pub fn controller(&self) -> Controller {
        self.controller
    }

    /// The specifier, `#interrupt-cells` of the controller long.
    pub fn cells(&self) -> &[u32] {
        self.cells.get(..usize::from(self.len)).unwrap_or_default()
    }

    /// For a GIC, the interrupt ID the distributor uses: SPI n is 32 + n, PPI n is 16 + n,
    /// extended SPI n is 4096 + n, extended PPI n is 1056 + n. `None` for other controllers or
    /// specifiers.
    pub fn gic_intid(&self) -> Option<u32> {
        if self.controller != Controller::Gic {
            return None;
        }
        let (kind, number) = match self.cells() {
            [kind, number, ..] => (*kind, *number),
            _ => return None,
        };
        let base = match kind {
            0 => 32,
            1 => 16,
            2 => 4096,
            3 => 1056,
            _ => return None,
        };
        number.checked_add(base)
    }
}

impl fmt::Display for InterruptSpec {
    /// `GIC SPI 5` for GIC specifiers, otherwise `irq parent 0x8002 <0x0 0x5 0x4>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.controller == Controller::Gic {
            if let [kind, number, ..] = self.cells() {
                let name = match kind {
                    0 => Some("SPI"),
                    1 => Some("PPI"),
                    2 => Some("ESPI"),
                    3 => Some("EPPI"),
                    _ => None,
                };
                if let Some(name) = name {
                    return write!(f, "GIC {name} {number}");
                }
            }
        }
        write!(f, "irq parent {:#x} <", self.parent)?;
        for (i, c) in self.cells().iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{c:#x}")?;
        }
        f.write_str(">")
    }
}

/// One `interrupt-map` entry: the (masked) child address and pin it matches, and where it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptMapEntry {
    /// phys.hi, phys.mid, phys.lo, pin.
    pub child: [u32; 4],
    pub spec: InterruptSpec,
}

/// The INTx routing of the host bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterruptMap {
    /// `interrupt-map-mask`, all-ones when absent.
    pub mask: [u32; 4],
    pub entries: Vec<InterruptMapEntry>,
}

impl InterruptMap {
    /// A map that routes nothing (a bridge without `interrupt-map`).
    pub const fn empty() -> InterruptMap {
        InterruptMap {
            mask: [u32::MAX; 4],
            entries: Vec::new(),
        }
    }

    /// Where pin `pin` of the root-bus function `bdf` is wired: the first entry equal to
    /// (`bdf.dt_phys_hi()`, 0, 0, pin) under the mask. Devices on the root bus need no swizzle
    /// (that is for pins crossing a PCI-to-PCI bridge).
    pub fn lookup(&self, bdf: Bdf, pin: IntxPin) -> Option<InterruptSpec> {
        let key = [bdf.dt_phys_hi(), 0, 0, pin.number()];
        self.entries
            .iter()
            .find(|e| {
                e.child
                    .iter()
                    .zip(key)
                    .zip(self.mask)
                    .all(|((c, k), m)| (c ^ k) & m == 0)
            })
            .map(|e| e.spec)
    }

    fn from_dt(dt: &DeviceTree<'_>, node: &Node<'_>) -> Result<InterruptMap, PciError> {
        let Some(map) = node.property("interrupt-map") else {
            return Ok(InterruptMap::empty());
        };
        let own_cells = node
            .property("#interrupt-cells")
            .ok_or_else(|| map.error("the node has no #interrupt-cells"))?;
        if own_cells.as_u32()? != 1 {
            return Err(own_cells
                .error("must be 1 (the INTx pin) on a PCI bus")
                .into());
        }
        let mask = match node.property("interrupt-map-mask") {
            None => [u32::MAX; 4],
            Some(p) => four_cells(&p).ok_or_else(|| p.error("expected 4 cells"))?,
        };

        let cells: Vec<u32> = map.as_u32s()?.collect();
        let cut_short = || PciError::from(map.error("an entry is cut short"));
        let mut rest = cells.as_slice();
        let mut entries = Vec::new();
        // Entries almost always share one parent: look its node up once.
        let mut last_parent: Option<(u32, MapParent)> = None;
        while !rest.is_empty() {
            let (child, tail) = rest.split_at_checked(4).ok_or_else(cut_short)?;
            let (&phandle, tail) = tail.split_first().ok_or_else(cut_short)?;
            let parent = match last_parent {
                Some((cached, parent)) if cached == phandle => parent,
                _ => {
                    let parent = MapParent::of(dt, &map, phandle)?;
                    last_parent = Some((phandle, parent));
                    parent
                }
            };
            let (_unit_address, tail) = tail
                .split_at_checked(parent.address_cells)
                .ok_or_else(cut_short)?;
            let (spec, tail) = tail
                .split_at_checked(parent.interrupt_cells)
                .ok_or_else(cut_short)?;
            let child: [u32; 4] = child.try_into().map_err(|_| cut_short())?;
            let spec =
                InterruptSpec::new(phandle, parent.controller, spec).ok_or_else(cut_short)?;
            entries.push(InterruptMapEntry { child, spec });
            rest = tail;
        }
        Ok(InterruptMap { mask, entries })
    }
}

/// The cell counts of an `interrupt-map` entry's parent.
#[derive(Clone, Copy)]
struct MapParent {
    address_cells: usize,
    interrupt_cells: usize,
    controller: Controller,
}

impl MapParent {
    fn of(dt: &DeviceTree<'_>, map: &Property<'_>, phandle: u32) -> Result<MapParent, PciError> {
        let node = dt.phandle_target(map, phandle)?;
        if !node.has_property("interrupt-controller") {
            return Err(map
                .error("an entry's parent is not an interrupt controller (nested maps unsupported)")
                .into());
        }
        let interrupt_cells = node
            .property("#interrupt-cells")
            .ok_or_else(|| map.error("an entry's parent has no #interrupt-cells"))?
            .as_u32()?;
        if interrupt_cells == 0 || interrupt_cells as usize > MAX_INTERRUPT_CELLS {
            return Err(map
                .error("an entry's parent has #interrupt-cells of 0 or more than 4")
                .into());
        }
        let address_cells = match node.property("#address-cells") {
            None => 0,
            Some(p) => p.as_u32()?,
        };
        if address_cells > MAX_ADDRESS_CELLS {
            return Err(map
                .error("an entry's parent has #address-cells above 3")
                .into());
        }
        let controller = if GIC_COMPATIBLES.iter().any(|c| node.is_compatible(c)) {
            Controller::Gic
        } else {
            Controller::Other
        };
        Ok(MapParent {
            address_cells: address_cells as usize,
            interrupt_cells: interrupt_cells as usize,
            controller,
        })
    }
}

fn four_cells(p: &Property<'_>) -> Option<[u32; 4]> {
    if p.value.len() != 16 {
        return None;
    }
    let mut out = [0; 4];
    for (o, c) in out.iter_mut().zip(p.as_u32s().ok()?) {
        *o = c;
    }
    Some(out)
}

/// One entry of an `iommu-map` or `msi-map`: requester IDs `id_base .. id_base + length` map to
/// `out_base ..` at the controller `target`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMapEntry {
    pub id_base: u32,
    /// Phandle of the IOMMU or MSI controller.
    pub target: u32,
    pub out_base: u32,
    pub length: u32,
}

/// An `iommu-map` or `msi-map` with its mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdMap {
    /// `iommu-map-mask` / `msi-map-mask`, all-ones when absent: applied to the requester ID
    /// before the lookup.
    pub mask: u32,
    pub entries: Vec<IdMapEntry>,
}

/// Which map an [`IdMap`] is, which decides what its entries' phandles must name.
#[derive(Clone, Copy)]
enum IdMapKind {
    /// `iommu-map`: an IOMMU (`#iommu-cells`), whose specifier is the one-cell output ID.
    Iommu,
    /// `msi-map`: an MSI controller (`msi-controller`), whose specifier is the one-cell output ID.
    Msi,
}

impl IdMapKind {
    fn names(self) -> (&'static str, &'static str) {
        match self {
            IdMapKind::Iommu => ("iommu-map", "iommu-map-mask"),
            IdMapKind::Msi => ("msi-map", "msi-map-mask"),
        }
    }

    /// Checks that `target` (phandle `phandle` in `map`) is what the map needs. Entries are
    /// (id-base, phandle, specifier, length) with a one-cell specifier (the output ID, offset by
    /// the requester ID), so the target's specifier must be one cell: a target that takes more
    /// (or none) would shift every following cell of the map.
    fn check_target(
        self,
        map: &Property<'_>,
        phandle: u32,
        target: &Node<'_>,
    ) -> Result<(), PciError> {
        match self {
            IdMapKind::Iommu => {
                let cells = target.property("#iommu-cells").ok_or_else(|| {
                    map.phandle_error(phandle, "names a node without #iommu-cells: not an IOMMU")
                })?;
                if cells.as_u32()? != 1 {
                    return Err(map
                        .phandle_error(
                            phandle,
                            "names an IOMMU whose #iommu-cells is not 1 (entries are rid-base, \
                             phandle, one-cell iommu-base, length)",
                        )
                        .into());
                }
            }
            IdMapKind::Msi => {
                if !target.has_property("msi-controller") {
                    return Err(map
                        .phandle_error(phandle, "names a node that is not an msi-controller")
                        .into());
                }
                // Older trees' MSI controllers lack `#msi-cells`: the map's one cell is their
                // specifier all the same.
                if let Some(cells) = target.property("#msi-cells") {
                    if cells.as_u32()? != 1 {
                        return Err(map
                            .phandle_error(
                                phandle,
                                "names an MSI controller whose #msi-cells is not 1 (entries are \
                                 rid-base, phandle, one-cell msi-base, length)",
                            )
                            .into());
                    }
                }
            }
        }
        Ok(())
    }
}

impl IdMap {
    /// The (controller phandle, output ID) for requester ID `id`, from the first entry covering
    /// it after masking; `None` if no entry does.
    pub fn map(&self, id: u32) -> Option<(u32, u32)> {
        let id = id & self.mask;
        self.entries.iter().find_map(|e| {
            let offset = id.checked_sub(e.id_base)?;
            if offset >= e.length {
                return None;
            }
            Some((e.target, e.out_base.checked_add(offset)?))
        })
    }

    /// Reads the map `kind` (and its mask) of `node`; `Ok(None)` if absent. Every entry's phandle
    /// must name a node of the right kind, with a one-cell specifier (see
    /// `IdMapKind::check_target`); errors name the property and the phandle.
    fn from_dt(
        dt: &DeviceTree<'_>,
        node: &Node<'_>,
        kind: IdMapKind,
    ) -> Result<Option<IdMap>, PciError> {
        let (name, mask_name) = kind.names();
        let Some(p) = node.property(name) else {
            return Ok(None);
        };
        let mask = match node.property(mask_name) {
            None => u32::MAX,
            Some(m) => m.as_u32()?,
        };
        let cells: Vec<u32> = p.as_u32s()?.collect();
        let mut entries = Vec::with_capacity(cells.len() / 4);
        // Entries almost always share one target: check it once.
        let mut checked = None;
        let mut rest = cells.as_slice();
        while !rest.is_empty() {
            // The target is checked before the entry's length, so that a target with a wider
            // specifier is reported as such rather than as a map of the wrong length.
            let target = *rest.get(1).ok_or_else(|| cut_short(&p))?;
            if checked != Some(target) {
                let target_node = dt.phandle_target(&p, target)?;
                kind.check_target(&p, target, &target_node)?;
                checked = Some(target);
            }
            let [id_base, _, out_base, length, tail @ ..] = rest else {
                return Err(cut_short(&p));
            };
            entries.push(IdMapEntry {
                id_base: *id_base,
                target,
                out_base: *out_base,
                length: *length,
            });
            rest = tail;
        }
        Ok(Some(IdMap { mask, entries }))
    }
}

/// The error for an `iommu-map` or `msi-map` whose length is not a whole number of entries.
fn cut_short(map: &Property<'_>) -> PciError {
    map.error("not a whole number of (id-base, phandle, out-base, length) entries")
        .into()
}

/// A generic ECAM host bridge, from its DT node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBridge {
    /// `linux,pci-domain`, 0 when absent: the segment number in device names.
    pub domain: u32,
    pub ecam: EcamWindow,
    /// Memory and I/O windows, in `ranges` order (config-space and empty entries left out).
    pub windows: Vec<Window>,
    pub interrupt_map: InterruptMap,
    pub iommu_map: Option<IdMap>,
    pub msi_map: Option<IdMap>,
    /// The bridge has `dma-coherent`: its devices snoop CPU caches.
    pub dma_coherent: bool,
}

impl HostBridge {
    /// Reads the host bridge `node` (normally found by [`COMPATIBLE`]) of `dt`. Errors name the
    /// property at fault; a bridge without `ranges` or whose windows overlap is refused, one
    /// without `interrupt-map`, `iommu-map` or `msi-map` is not.
    pub fn from_dt(dt: &DeviceTree<'_>, node: &Node<'_>) -> Result<HostBridge, PciError> {
        let cells = Cells::of(node)?;
        if cells.address != 3 {
            return Err(PciError::HostBridge {
                what: "#address-cells is not 3: not a PCI bus node",
            });
        }
        let reg = dt.reg0(node)?;
        let (bus_start, bus_end) = bus_range(node)?;
        let ecam = EcamWindow::new(reg.base(), reg.size(), bus_start, bus_end)?;
        let domain = match node.property("linux,pci-domain") {
            None => 0,
            Some(p) => p.as_u32()?,
        };
        Ok(HostBridge {
            domain,
            ecam,
            windows: windows(node, cells)?,
            interrupt_map: InterruptMap::from_dt(dt, node)?,
            iommu_map: IdMap::from_dt(dt, node, IdMapKind::Iommu)?,
            msi_map: IdMap::from_dt(dt, node, IdMapKind::Msi)?,
            dma_coherent: node.has_property("dma-coherent"),
        })
    }

    /// Where pin `pin` of root-bus function `bdf` is wired; see [`InterruptMap::lookup`].
    pub fn intx_route(&self, bdf: Bdf, pin: IntxPin) -> Option<InterruptSpec> {
        self.interrupt_map.lookup(bdf, pin)
    }

    /// The (IOMMU phandle, StreamID) of requester ID `rid`, from `iommu-map`; `None` if the
    /// bridge has no `iommu-map` or it does not cover `rid` (the function's DMA then does not
    /// go through an IOMMU this driver knows of).
    pub fn stream_id(&self, rid: u16) -> Option<(u32, u32)> {
        self.iommu_map.as_ref()?.map(u32::from(rid))
    }

    /// The (MSI controller phandle, DeviceID) of requester ID `rid`, from `msi-map`.
    pub fn msi_device_id(&self, rid: u16) -> Option<(u32, u32)> {
        self.msi_map.as_ref()?.map(u32::from(rid))
    }
}

/// `bus-range = <first last>`, or all 256 buses when absent.
fn bus_range(node: &Node<'_>) -> Result<(u8, u8), PciError> {
    let Some(p) = node.property("bus-range") else {
        return Ok((0, 0xff));
    };
    let bad = || PciError::from(p.error("expected <first last> with first <= last <= 0xff"));
    if p.value.len() != 8 {
        return Err(bad());
    }
    let mut cells = p.as_u32s()?;
    let first = cells
        .next()
        .and_then(|c| u8::try_from(c).ok())
        .ok_or_else(bad)?;
    let last = cells
        .next()
        .and_then(|c| u8::try_from(c).ok())
        .ok_or_else(bad)?;
    if first > last {
        return Err(bad());
    }
    Ok((first, last))
}

/// The memory and I/O windows of `ranges`, CPU addresses translated through the buses above.
/// Config-space entries are skipped (ECAM is found through `reg`), as are empty ones.
fn windows(node: &Node<'_>, cells: Cells) -> Result<Vec<Window>, PciError> {
    let prop = node.property("ranges").ok_or(PciError::HostBridge {
        what: "no `ranges`: the bridge forwards no memory or I/O space",
    })?;
    let parent = node.parent().ok_or(PciError::HostBridge {
        what: "the host bridge is the root node",
    })?;
    let parent_bus = node.ancestry().pop();
    let parent_cells = Cells::of(&parent)?;
    let mut out = Vec::new();
    for e in Ranges::new(&prop, cells, parent_cells.address)? {
        let kind = match (e.child_hi >> 24) & 0x3 {
            0b00 => continue,
            0b01 => Space::Io,
            0b10 => Space::Mem32,
            _ => Space::Mem64,
        };
        if e.size == 0 {
            continue;
        }
        let cpu = translate(&parent_bus, node, e.parent, e.size, RangesProp::Ranges)?;
        out.push(Window {
            kind,
            prefetchable: e.child_hi & (1 << 30) != 0,
            pci_addr: e.child,
            cpu_addr: PhysAddr::new(cpu),
            size: e.size,
        });
    }
    validate_windows(&out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dt::fixtures::*;
    use crate::dt::DtError;
    use alloc::string::String;
    use alloc::vec;

    fn bridge_of(dtb: &[u8]) -> Result<HostBridge, PciError> {
        let dt = DeviceTree::from_bytes(dtb).unwrap();
        let node = dt.find_compatible(COMPATIBLE).next().unwrap();
        HostBridge::from_dt(&dt, &node)
    }

    fn bdf(bus: u8, device: u8, function: u8) -> Bdf {
        Bdf::new(bus, device, function).unwrap()
    }

    const PINS: [IntxPin; 4] = [IntxPin::A, IntxPin::B, IntxPin::C, IntxPin::D];

    /// QEMU virt's interrupt-map (read from `dtc -I dtb -O dts` of the fixtures), by slot
    /// modulo 4 and pin A..D: the GIC SPI number. Every entry is level-high (flags 4) and goes
    /// to the GIC, phandle 0x8002.
    const QEMU_SPI: [[u32; 4]; 4] = [[3, 4, 5, 6], [4, 5, 6, 3], [5, 6, 3, 4], [6, 3, 4, 5]];

    fn check_qemu_interrupt_map(host: &HostBridge) {
        assert_eq!(host.interrupt_map.mask, [0x1800, 0, 0, 7]);
        assert_eq!(host.interrupt_map.entries.len(), 16);
        for slot in 0..32u8 {
            for (p, pin) in PINS.iter().enumerate() {
                let spi = QEMU_SPI[usize::from(slot % 4)][p];
                // The mask keeps only slot bits 1:0 and the pin: bus and function do not matter.
                for b in [bdf(0, slot, 0), bdf(0, slot, 5), bdf(3, slot, 1)] {
                    let spec = host.intx_route(b, *pin).unwrap();
                    assert_eq!(spec.parent(), 0x8002);
                    assert_eq!(spec.controller(), Controller::Gic);
                    assert_eq!(spec.cells(), [0, spi, 4], "{b} {pin}");
                    assert_eq!(spec.gic_intid(), Some(32 + spi));
                }
            }
        }
        let s = host.intx_route(bdf(0, 2, 0), IntxPin::A).unwrap();
        assert_eq!(format!("{s}"), "GIC SPI 5");
    }

    #[test]
    fn qemu_virt_gicv3_smmuv3() {
        let host = bridge_of(QEMU_VIRT_GICV3_SMMUV3).unwrap();
        assert_eq!(host.domain, 0);
        assert!(host.dma_coherent);
        assert_eq!(
            format!("{}", host.ecam),
            "ECAM 0x4010000000 (256 MiB) buses 00-ff"
        );
        assert_eq!(host.ecam.offset(bdf(0xff, 31, 7), 0xffc), Some(0xfff_fffc));
        assert_eq!(host.ecam.offset(bdf(0, 2, 0), 0x10), Some(0x1_0010));
        // ranges = I/O 0 -> 0x3eff0000 (64 KiB), MEM32 0x10000000 (0x2eff0000 bytes), MEM64
        // 0x80_00000000 (512 GiB), all identity in memory.
        let w: Vec<String> = host.windows.iter().map(|w| format!("{w}")).collect();
        assert_eq!(
            w,
            [
                "io 0x3eff0000 (64 KiB) bus 0x0",
                "mem32 0x10000000 (751.9 MiB) bus 0x10000000",
                "mem64 0x8000000000 (512 GiB) bus 0x8000000000",
            ]
        );
        assert_eq!(
            host.windows[1],
            Window {
                kind: Space::Mem32,
                prefetchable: false,
                pci_addr: 0x1000_0000,
                cpu_addr: PhysAddr::new(0x1000_0000),
                size: 0x2eff_0000
            }
        );
        check_qemu_interrupt_map(&host);
        // iommu-map = <0 &smmu 0 0x10000>: StreamID = requester ID; msi-map to the ITS.
        for rid in [0u16, 0x8, 0x10, 0x18, 0x100, 0xffff] {
            assert_eq!(host.stream_id(rid), Some((0x8004, u32::from(rid))));
            assert_eq!(host.msi_device_id(rid), Some((0x8003, u32::from(rid))));
        }
        assert_eq!(
            host.stream_id(bdf(0, 3, 0).requester_id()),
            Some((0x8004, 0x18))
        );
    }

    #[test]
    fn qemu_virt_without_iommu_and_32_bit() {
        let host = bridge_of(QEMU_VIRT_A53_128M).unwrap();
        check_qemu_interrupt_map(&host);
        assert_eq!(host.iommu_map, None);
        assert_eq!(host.stream_id(0x10), None);
        assert_eq!(host.msi_device_id(0x10), Some((0x8003, 0x10)));

        // highmem=off: a 16 MiB ECAM for buses 0..=15, and no 64-bit window.
        let host = bridge_of(QEMU_VIRT_A15).unwrap();
        check_qemu_interrupt_map(&host);
        assert_eq!(
            format!("{}", host.ecam),
            "ECAM 0x3f000000 (16 MiB) buses 00-0f"
        );
        assert_eq!(host.ecam.offset(bdf(0x10, 0, 0), 0), None);
        let kinds: Vec<Space> = host.windows.iter().map(|w| w.kind).collect();
        assert_eq!(kinds, [Space::Io, Space::Mem32]);
    }

    #[test]
    fn ecam_window_edges() {
        let w = EcamWindow::new(PhysAddr::new(0x3000_0000), 2 << 20, 0x10, 0xff).unwrap();
        assert_eq!(
            (w.bus_start(), w.bus_end()),
            (0x10, 0x11),
            "clamped to the 2 buses held"
        );
        assert_eq!(
            w.offset(bdf(0x11, 1, 2), 0x10),
            Some(1 << 20 | 1 << 15 | 2 << 12 | 0x10)
        );
        assert_eq!(w.offset(bdf(0x10, 0, 0), 0), Some(0));
        assert_eq!(w.offset(bdf(0x0f, 0, 0), 0), None);
        assert_eq!(w.offset(bdf(0x12, 0, 0), 0), None);
        assert_eq!(w.offset(bdf(0x10, 0, 0), 4096), None);
        assert_eq!(w.offset(bdf(0x10, 0, 0), 2), None);
        let full = EcamWindow::new(PhysAddr::new(0), u64::MAX >> 1, 0, 0xff).unwrap();
        assert_eq!(full.bus_end(), 0xff);
        let err = |r: Result<EcamWindow, PciError>| format!("{}", r.unwrap_err());
        assert_eq!(
            err(EcamWindow::new(PhysAddr::new(0), 0xf_ffff, 0, 0)),
            "PCI host bridge: the ECAM window is smaller than one bus (1 MiB)"
        );
        assert!(EcamWindow::new(PhysAddr::new(0), 1 << 20, 1, 0).is_err());
        assert!(EcamWindow::new(PhysAddr::new(u64::MAX), 1 << 20, 0, 0).is_err());
    }

    #[test]
    fn interrupt_spec_forms() {
        let gic = |c: &[u32]| InterruptSpec::new(1, Controller::Gic, c).unwrap();
        assert_eq!(gic(&[1, 7, 4]).gic_intid(), Some(23));
        assert_eq!(format!("{}", gic(&[1, 7, 4])), "GIC PPI 7");
        assert_eq!(gic(&[2, 1, 4]).gic_intid(), Some(4097));
        assert_eq!(gic(&[3, 1, 4]).gic_intid(), Some(1057));
        assert_eq!(gic(&[9, 1, 4]).gic_intid(), None);
        assert_eq!(
            format!("{}", gic(&[9, 1, 4])),
            "irq parent 0x1 <0x9 0x1 0x4>"
        );
        assert_eq!(gic(&[0, u32::MAX, 4]).gic_intid(), None);
        assert_eq!(gic(&[0]).gic_intid(), None);
        let other = InterruptSpec::new(4, Controller::Other, &[10, 1]).unwrap();
        assert_eq!(other.gic_intid(), None);
        assert_eq!(format!("{other}"), "irq parent 0x4 <0xa 0x1>");
        assert!(InterruptSpec::new(4, Controller::Other, &[1, 2, 3, 4, 5]).is_none());
    }

    // A small device-tree builder, for bridges QEMU does not produce.

    struct N {
        name: &'static str,
        props: Vec<(&'static str, Vec<u8>)>,
        children: Vec<N>,
    }

    fn cells(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|c| c.to_be_bytes()).collect()
    }

    /// Cells of several entries, one entry per row.
    fn rows(rows: &[&[u32]]) -> Vec<u8> {
        rows.iter().flat_map(|r| cells(r)).collect()
    }

    fn text(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn dtb(root: &N) -> Vec<u8> {
        fn pad(b: &mut Vec<u8>) {
            while !b.len().is_multiple_of(4) {
                b.push(0);
            }
        }
        fn emit(n: &N, s: &mut Vec<u8>, strings: &mut Vec<u8>) {
            s.extend(1u32.to_be_bytes());
            s.extend(n.name.as_bytes());
            s.push(0);
            pad(s);
            for (name, value) in &n.props {
                let off = strings.len() as u32;
                strings.extend(text(name));
                s.extend(3u32.to_be_bytes());
                s.extend((value.len() as u32).to_be_bytes());
                s.extend(off.to_be_bytes());
                s.extend(value);
                pad(s);
            }
            for c in &n.children {
                emit(c, s, strings);
            }
            s.extend(2u32.to_be_bytes());
        }
        let (mut s, mut strings) = (Vec::new(), Vec::new());
        emit(root, &mut s, &mut strings);
        s.extend(9u32.to_be_bytes());
        let off_struct = 40 + 16;
        let off_strings = off_struct + s.len() as u32;
        let total = off_strings + strings.len() as u32;
        let mut b = Vec::new();
        for v in [
            0xd00d_feed,
            total,
            off_struct,
            off_strings,
            40,
            17,
            16,
            0,
            strings.len() as u32,
            s.len() as u32,
        ] {
            b.extend(u32::to_be_bytes(v));
        }
        b.extend([0; 16]);
        b.extend(s);
        b.extend(strings);
        b
    }

    /// A host bridge under /soc (which maps its 0.. to CPU 0x1_0000_0000), beside a GIC (phandle
    /// 1, no #address-cells), a two-cell controller (4), a nexus that is no controller (2), an
    /// IOMMU (3), an IOMMU with two-cell specifiers (5), MSI controllers with #msi-cells = 1
    /// (6), without #msi-cells (7) and with #msi-cells = 2 (8).
    fn valid_bridge() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("compatible", text(COMPATIBLE)),
            ("device_type", text("pci")),
            ("#address-cells", cells(&[3])),
            ("#size-cells", cells(&[2])),
            ("#interrupt-cells", cells(&[1])),
            ("reg", cells(&[0, 0x3000_0000, 0, 0x20_0000])),
            ("bus-range", cells(&[0x10, 0xff])),
            ("linux,pci-domain", cells(&[3])),
            (
                "ranges",
                rows(&[
                    &[0x0000_0000, 0, 0, 0, 0x3100_0000, 0, 0x1000], // config: skipped
                    &[0x0100_0000, 0, 0, 0, 0x2fff_0000, 0, 0x1_0000], // I/O
                    &[0x0200_0000, 0, 0x1000_0000, 0, 0x1000_0000, 0, 0], // empty: skipped
                    &[0x4300_0000, 1, 0, 0, 0x4000_0000, 0, 0x1000_0000], // 64-bit pref
                ]),
            ),
            (
                "interrupt-map",
                rows(&[
                    &[0x800, 0, 0, 1, 4, 10, 1],     // 00:01.0 INTA
                    &[0x1_0800, 0, 0, 2, 4, 11, 8],  // 01:01.0 INTB
                    &[0x1000, 0, 0, 1, 1, 0, 40, 4], // 00:02.0 INTA, to the GIC
                ]),
            ),
            ("iommu-map", cells(&[0, 3, 0x100, 0x100, 0x100, 3, 0, 0x10])),
            ("iommu-map-mask", cells(&[0xfff8])),
        ]
    }

    fn tree(bridge: Vec<(&'static str, Vec<u8>)>) -> Vec<u8> {
        let node = |name, props, children| N {
            name,
            props,
            children,
        };
        dtb(&node(
            "",
            vec![
                ("#address-cells", cells(&[2])),
                ("#size-cells", cells(&[2])),
            ],
            vec![
                node(
                    "intc@8000000",
                    vec![
                        ("compatible", text("arm,gic-400")),
                        ("phandle", cells(&[1])),
                        ("interrupt-controller", vec![]),
                        ("#interrupt-cells", cells(&[3])),
                    ],
                    vec![],
                ),
                node(
                    "nexus",
                    vec![("phandle", cells(&[2])), ("#interrupt-cells", cells(&[1]))],
                    vec![],
                ),
                node(
                    "iommu@9050000",
                    vec![("phandle", cells(&[3])), ("#iommu-cells", cells(&[1]))],
                    vec![],
                ),
                node(
                    "iommu@9060000",
                    vec![("phandle", cells(&[5])), ("#iommu-cells", cells(&[2]))],
                    vec![],
                ),
                node(
                    "its@8080000",
                    vec![
                        ("phandle", cells(&[6])),
                        ("msi-controller", vec![]),
                        ("#msi-cells", cells(&[1])),
                    ],
                    vec![],
                ),
                node(
                    "its@8090000",
                    vec![("phandle", cells(&[7])), ("msi-controller", vec![])],
                    vec![],
                ),
                node(
                    "its@80a0000",
                    vec![
                        ("phandle", cells(&[8])),
                        ("msi-controller", vec![]),
                        ("#msi-cells", cells(&[2])),
                    ],
                    vec![],
                ),
                node(
                    "intc@9000000",
                    vec![
                        ("compatible", text("vendor,intc")),
                        ("phandle", cells(&[4])),
                        ("interrupt-controller", vec![]),
                        ("#interrupt-cells", cells(&[2])),
                    ],
                    vec![],
                ),
                node(
                    "soc",
                    vec![
                        ("#address-cells", cells(&[2])),
                        ("#size-cells", cells(&[2])),
                        ("ranges", cells(&[0, 0, 1, 0, 0, 0x8000_0000])),
                    ],
                    vec![node("pcie@30000000", bridge, vec![])],
                ),
            ],
        ))
    }

    /// The valid bridge with property `name` replaced (or added), or removed if `value` is None.
    fn with(name: &'static str, value: Option<Vec<u8>>) -> Result<HostBridge, PciError> {
        let mut props = valid_bridge();
        props.retain(|(n, _)| *n != name);
        if let Some(v) = value {
            props.push((name, v));
        }
        bridge_of(&tree(props))
    }

    fn error_text(name: &'static str, value: Option<Vec<u8>>) -> String {
        format!("{}", with(name, value).unwrap_err())
    }

    #[test]
    fn a_bridge_behind_a_bus() {
        let host = bridge_of(&tree(valid_bridge())).unwrap();
        assert_eq!(host.domain, 3);
        assert!(!host.dma_coherent);
        // reg and windows go through /soc's ranges to 0x1_xxxx_xxxx.
        assert_eq!(
            format!("{}", host.ecam),
            "ECAM 0x130000000 (2 MiB) buses 10-11"
        );
        assert_eq!(
            host.windows,
            [
                Window {
                    kind: Space::Io,
                    prefetchable: false,
                    pci_addr: 0,
                    cpu_addr: PhysAddr::new(0x1_2fff_0000),
                    size: 0x1_0000
                },
                Window {
                    kind: Space::Mem64,
                    prefetchable: true,
                    pci_addr: 0x1_0000_0000,
                    cpu_addr: PhysAddr::new(0x1_4000_0000),
                    size: 0x1000_0000
                },
            ]
        );
        // No interrupt-map-mask: exact matches only, function bits included.
        let route = |b, pin| host.intx_route(b, pin).map(|s| format!("{s}"));
        assert_eq!(
            route(bdf(0, 1, 0), IntxPin::A).as_deref(),
            Some("irq parent 0x4 <0xa 0x1>")
        );
        assert_eq!(route(bdf(0, 1, 1), IntxPin::A), None);
        assert_eq!(route(bdf(0, 1, 0), IntxPin::B), None);
        assert_eq!(
            route(bdf(1, 1, 0), IntxPin::B).as_deref(),
            Some("irq parent 0x4 <0xb 0x8>")
        );
        // A GIC without #address-cells: no parent unit address in the entry.
        assert_eq!(
            route(bdf(0, 2, 0), IntxPin::A).as_deref(),
            Some("GIC SPI 40")
        );
        // iommu-map-mask 0xfff8 folds the functions of a device onto one StreamID.
        assert_eq!(host.stream_id(0x0a), Some((3, 0x108)));
        assert_eq!(host.stream_id(0x0f), Some((3, 0x108)));
        assert_eq!(host.stream_id(0x100), Some((3, 0)));
        assert_eq!(host.stream_id(0x10f), Some((3, 0x8)));
        assert_eq!(host.stream_id(0x110), None);
        assert_eq!(host.msi_device_id(0), None);
        // No interrupt-map: nothing routed.
        let host = with("interrupt-map", None).unwrap();
        assert_eq!(host.intx_route(bdf(0, 1, 0), IntxPin::A), None);
    }

    #[test]
    fn malformed_bridges_are_errors() {
        assert_eq!(
            error_text("interrupt-map", Some(cells(&[0x800, 0, 0, 1, 2, 5]))),
            "PCI host bridge: property `interrupt-map` of node `pcie@30000000` (24 bytes): an \
             entry's parent is not an interrupt controller (nested maps unsupported)"
        );
        assert_eq!(
            error_text(
                "interrupt-map",
                Some(cells(&[0x800, 0, 0, 1, 4, 10, 1, 0x1000, 0, 0]))
            ),
            "PCI host bridge: property `interrupt-map` of node `pcie@30000000` (40 bytes): an \
             entry is cut short"
        );
        assert_eq!(
            error_text("interrupt-map", Some(cells(&[0x800, 0, 0, 1, 4, 10]))),
            "PCI host bridge: property `interrupt-map` of node `pcie@30000000` (24 bytes): an \
             entry is cut short"
        );
        // Phandle errors name the property they were read from.
        assert_eq!(
            error_text("interrupt-map", Some(cells(&[0x800, 0, 0, 1, 9, 10, 1]))),
            "PCI host bridge: property `interrupt-map` of node `pcie@30000000`: phandle 0x9: no \
             node has this phandle"
        );
        assert!(error_text("#interrupt-cells", Some(cells(&[2])))
            .ends_with("must be 1 (the INTx pin) on a PCI bus"));
        assert!(error_text("#interrupt-cells", None).ends_with("the node has no #interrupt-cells"));
        assert!(
            error_text("interrupt-map-mask", Some(cells(&[0x1800, 0, 7])))
                .ends_with("expected 4 cells")
        );
        assert!(error_text("iommu-map", Some(cells(&[0, 3, 0, 0x100, 5])))
            .ends_with("not a whole number of (id-base, phandle, out-base, length) entries"));
        assert_eq!(
            error_text("msi-map", Some(cells(&[0, 9, 0, 0x100]))),
            "PCI host bridge: property `msi-map` of node `pcie@30000000`: phandle 0x9: no node \
             has this phandle"
        );
        assert_eq!(
            error_text("iommu-map", Some(cells(&[0, 0x9999, 0, 0x100]))),
            "PCI host bridge: property `iommu-map` of node `pcie@30000000`: phandle 0x9999: no \
             node has this phandle"
        );
        for bad in [cells(&[5, 4]), cells(&[0, 0x100]), cells(&[0])] {
            assert!(error_text("bus-range", Some(bad))
                .ends_with("expected <first last> with first <= last <= 0xff"));
        }
        assert_eq!(
            error_text("reg", Some(cells(&[0, 0x3000_0000, 0, 0x8_0000]))),
            "PCI host bridge: the ECAM window is smaller than one bus (1 MiB)"
        );
        assert_eq!(
            error_text("#address-cells", Some(cells(&[2]))),
            "PCI host bridge: #address-cells is not 3: not a PCI bus node"
        );
        assert_eq!(
            error_text("ranges", None),
            "PCI host bridge: no `ranges`: the bridge forwards no memory or I/O space"
        );
        // Two memory windows sharing bus addresses.
        let overlapping = rows(&[
            &[0x0200_0000, 0, 0x1000_0000, 0, 0x1000_0000, 0, 0x1000_0000],
            &[0x4300_0000, 0, 0x1800_0000, 0, 0x4000_0000, 0, 0x1000],
        ]);
        assert_eq!(
            with("ranges", Some(overlapping)),
            Err(PciError::WindowOverlap {
                first: 0,
                second: 1
            })
        );
        // A window outside /soc's ranges cannot be reached by the CPU.
        let unreachable = cells(&[0x0200_0000, 0, 0x1000_0000, 0, 0x9000_0000, 0, 0x1000]);
        assert!(matches!(
            with("ranges", Some(unreachable)),
            Err(PciError::Dt(DtError::Untranslatable { .. }))
        ));
        let ragged = cells(&[0x0200_0000, 0, 0x1000_0000, 0, 0x1000_0000, 0]);
        assert!(matches!(
            with("ranges", Some(ragged)),
            Err(PciError::Dt(DtError::Property { .. }))
        ));
    }

    #[test]
    fn id_map_targets_must_be_of_their_kind() {
        // QEMU's own maps name its SMMUv3 (#iommu-cells = <1>) and GICv3 ITS (msi-controller,
        // #msi-cells = <1>).
        assert!(bridge_of(QEMU_VIRT_GICV3_SMMUV3).is_ok());
        let msg = |name, v: &[u32]| error_text(name, Some(cells(v)));
        // A node that is no IOMMU (the nexus, 2; the bridge itself in the integration test).
        assert_eq!(
            msg("iommu-map", &[0, 2, 0, 0x100]),
            "PCI host bridge: property `iommu-map` of node `pcie@30000000`: phandle 0x2: names a \
             node without #iommu-cells: not an IOMMU"
        );
        // The second entry's target is checked too.
        assert_eq!(
            msg("iommu-map", &[0, 3, 0, 0x100, 0x100, 2, 0, 0x100]),
            msg("iommu-map", &[0, 2, 0, 0x100])
        );
        // An IOMMU with two-cell specifiers, written with its two cells: refused for its cell
        // count, not for the map's length.
        assert_eq!(
            msg("iommu-map", &[0, 5, 0, 0, 0x100]),
            "PCI host bridge: property `iommu-map` of node `pcie@30000000`: phandle 0x5: names an \
             IOMMU whose #iommu-cells is not 1 (entries are rid-base, phandle, one-cell \
             iommu-base, length)"
        );
        // An IOMMU is no MSI controller.
        assert_eq!(
            msg("msi-map", &[0, 3, 0, 0x100]),
            "PCI host bridge: property `msi-map` of node `pcie@30000000`: phandle 0x3: names a \
             node that is not an msi-controller"
        );
        assert_eq!(
            msg("msi-map", &[0, 8, 0, 0x100]),
            "PCI host bridge: property `msi-map` of node `pcie@30000000`: phandle 0x8: names an \
             MSI controller whose #msi-cells is not 1 (entries are rid-base, phandle, one-cell \
             msi-base, length)"
        );
        // MSI controllers with #msi-cells = 1 or without it: DeviceID = requester ID - base +
        // out-base, per entry.
        let host = with(
            "msi-map",
            Some(rows(&[&[0, 6, 0x40, 0x100], &[0x100, 7, 0, 0x10]])),
        )
        .unwrap();
        assert_eq!(host.msi_device_id(0x10), Some((6, 0x50)));
        assert_eq!(host.msi_device_id(0x105), Some((7, 5)));
        assert_eq!(host.msi_device_id(0x110), None);
    }
}
