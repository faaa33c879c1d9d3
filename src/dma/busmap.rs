//! A device's view of memory: the bus (DMA) address it must be given for a CPU physical address,
//! and back, as the `dma-ranges` of the buses above it describe (Linux: `struct bus_dma_region`,
//! built by `of_dma_get_range`).
//!
//! A [`BusMap`] is either the identity (bus address = physical address, the common case and QEMU
//! virt's) or a short list of [`Window`]s, each a CPU physical range and the bus address of its
//! first byte. The Raspberry Pi 3's peripherals, for example, see RAM at physical 0 as bus
//! address 0xc0000000.
//!
//! How the map comes from the device tree ([`BusMap::from_dt`]), following Linux's
//! `of_dma_get_range` and `of_translate_dma_address`:
//! 1. Walk up from the device's parent bus to the first bus with a non-empty `dma-ranges`. An
//!    empty `dma-ranges` is the identity at that level and the walk goes on; a missing one is
//!    tolerated on the device's own bus only: a second level without `dma-ranges` ends the walk
//!    and the device gets the identity (Linux's -ENODEV, after which dma-direct uses no offset).
//!    Reaching the root also gives the identity; the root's own `dma-ranges`, which has no parent
//!    address space to map into, is not read.
//! 2. That bus's entries (its `#address-cells`/`#size-cells`, its parent's `#address-cells`) are
//!    the windows, in the parent's address space; zero-sized entries are skipped.
//! 3. Each bus further up maps them on into its own parent's space: an empty or missing
//!    `dma-ranges` passes them through unchanged, otherwise every window is intersected with every
//!    entry, so a window straddling two entries is split and a part no entry covers is dropped.
//!    Linux translates only each window's first address and keeps its size, and drops a window
//!    whose first address does not translate (logging an error); the exact intersection gives the
//!    same map wherever each window lies inside one upper entry, as on every board we know, and
//!    never claims bus addresses the upper bus does not route. [`BusMap::clipped`] records that
//!    something was dropped, so the caller can warn as Linux does. A map left without windows is
//!    an error.
//!
//! Not followed: Linux's `interconnects`/`dma-mem` redirection of the DMA parent (Tegra).
//! Addresses are not truncated to a narrower parent's `#address-cells` when passing through a
//! level without `dma-ranges` (Linux truncates them to the parent's width).
//! A PCI (3-cell) bus is read with its flags cell ignored, but a bus whose parent has 3-cell
//! addresses cannot be mapped into it (the DT layer refuses such entries).

use core::fmt;

use crate::dt::{Ancestry, Cells, DtError, Node, Property, RangeEntry, Ranges};
use crate::mm::addr::PhysAddr;

/// A device (bus) address: what a DMA master puts on its bus. Distinct from [`PhysAddr`], the
/// CPU's view, so that one cannot be passed where the other is meant.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct DmaAddr(pub u64);

impl DmaAddr {
    pub const fn new(a: u64) -> DmaAddr {
        DmaAddr(a)
    }

    pub const fn as_u64(self) -> u64 {
        self.0
    }

    pub const fn checked_add(self, n: u64) -> Option<DmaAddr> {
        match self.0.checked_add(n) {
            Some(v) => Some(DmaAddr(v)),
            None => None,
        }
    }
}

impl fmt::Debug for DmaAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DA({:#x})", self.0)
    }
}

impl fmt::Display for DmaAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Most windows a [`BusMap`] holds. Real trees have up to five per bus (the Raspberry Pi 5's
/// `/axi`).
pub const MAX_WINDOWS: usize = 16;

/// The offset of `addr .. addr + len` inside `start .. start + size`, if it lies entirely inside
/// (for `len == 0`: if `addr` does).
fn offset_in(start: u64, size: u64, addr: u64, len: u64) -> Option<u64> {
    let off = addr.checked_sub(start)?;
    (off < size && len <= size - off).then_some(off)
}

/// Whether `start + size` stays within 2^64 (a range may end exactly at 2^64).
fn fits(start: u64, size: u64) -> bool {
    start as u128 + size as u128 <= 1u128 << 64
}

/// CPU physical addresses `cpu .. cpu + size` appear to the device as `bus .. bus + size`.
///
/// Invariants (checked by [`Window::new`]): `size > 0`, and neither range runs past 2^64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    cpu: PhysAddr,
    bus: DmaAddr,
    size: u64,
}

impl Window {
    /// `None` if `size` is 0 or either range would run past 2^64.
    pub const fn new(cpu: PhysAddr, bus: DmaAddr, size: u64) -> Option<Window> {
        if size == 0 || (cpu.0 as u128 + size as u128) > (1u128 << 64) {
            return None;
        }
        if (bus.0 as u128 + size as u128) > (1u128 << 64) {
            return None;
        }
        Some(Window { cpu, bus, size })
    }

    /// First CPU physical address of the window.
    pub const fn cpu(&self) -> PhysAddr {
        self.cpu
    }

    /// Bus address of the window's first byte.
    pub const fn bus(&self) -> DmaAddr {
        self.bus
    }

    /// Size in bytes (non-zero).
    pub const fn size(&self) -> u64 {
        self.size
    }

    /// The bus address of `phys .. phys + len` if that lies entirely inside the window.
    pub fn phys_to_bus(&self, phys: PhysAddr, len: u64) -> Option<DmaAddr> {
        let off = offset_in(self.cpu.0, self.size, phys.0, len)?;
        // Cannot overflow: off < size and bus + size <= 2^64.
        Some(DmaAddr(self.bus.0 + off))
    }

    /// The CPU physical address of `bus .. bus + len` if that lies entirely inside the window.
    pub fn bus_to_phys(&self, bus: DmaAddr, len: u64) -> Option<PhysAddr> {
        let off = offset_in(self.bus.0, self.size, bus.0, len)?;
        Some(PhysAddr(self.cpu.0 + off))
    }
}

/// Why [`BusMap::from_windows`] refused a list of windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusMapError {
    /// No windows: a device that reaches nothing (the identity is [`BusMap::IDENTITY`]).
    Empty,
    /// More than [`MAX_WINDOWS`].
    TooMany { count: usize },
}

impl fmt::Display for BusMapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusMapError::Empty => f.write_str("a DMA bus map needs at least one window"),
            BusMapError::TooMany { count } => write!(
                f,
                "{count} DMA windows, more than a bus map holds ({MAX_WINDOWS})"
            ),
        }
    }
}

/// How a device's bus addresses relate to CPU physical addresses.
///
/// Lookups take the first window that contains the address, as Linux does: windows may overlap
/// on either side (the Raspberry Pi 4's `/scb` maps CPU 0xfc000000 both at bus 0x47c000000 and,
/// through its all-of-RAM window, at bus 0xfc000000), and the device tree's order decides.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BusMap {
    windows: [Window; MAX_WINDOWS],
    /// 0 for the identity.
    len: usize,
    clipped: bool,
}

const NO_WINDOW: Window = Window {
    cpu: PhysAddr(0),
    bus: DmaAddr(0),
    size: 0,
};

impl BusMap {
    /// Bus address = physical address, everywhere.
    pub const IDENTITY: BusMap = BusMap {
        windows: [NO_WINDOW; MAX_WINDOWS],
        len: 0,
        clipped: false,
    };

    /// A map of the given windows, looked up in that order.
    pub fn from_windows(windows: &[Window]) -> Result<BusMap, BusMapError> {
        if windows.is_empty() {
            return Err(BusMapError::Empty);
        }
        let mut map = BusMap::IDENTITY;
        map.windows
            .get_mut(..windows.len())
            .ok_or(BusMapError::TooMany {
                count: windows.len(),
            })?
            .copy_from_slice(windows);
        map.len = windows.len();
        Ok(map)
    }

    #[inline(always)]
    pub fn is_identity(&self) -> bool {
        self.len == 0
    }

    /// The windows, in lookup order; empty for the identity.
    pub fn windows(&self) -> &[Window] {
        self.windows.get(..self.len).unwrap_or_default()
    }

    /// Whether [`BusMap::from_dt`] dropped bus addresses of the device's `dma-ranges` that no
    /// bus above routes to the CPU (Linux logs an error for such an entry and drops it too).
    pub fn clipped(&self) -> bool {
        self.clipped
    }

    /// The bus address at which the device reaches `phys .. phys + len`: `None` unless the whole
    /// range lies inside one window (for the identity: unless it runs past 2^64). A range
    /// straddling two windows that happen to be contiguous on both sides is refused too; the
    /// caller maps it in pieces or bounces it.
    #[inline(always)]
    pub fn phys_to_bus(&self, phys: PhysAddr, len: u64) -> Option<DmaAddr> {
        if self.is_identity() {
            return fits(phys.0, len).then_some(DmaAddr(phys.0));
        }
        self.phys_to_bus_windows(phys, len)
    }

    /// [`BusMap::phys_to_bus`] through the windows (out of line: the identity case is the one
    /// worth inlining into every map).
    #[inline(never)]
    fn phys_to_bus_windows(&self, phys: PhysAddr, len: u64) -> Option<DmaAddr> {
        let w = self
            .windows()
            .iter()
            .find(|w| offset_in(w.cpu.0, w.size, phys.0, 0).is_some())?;
        w.phys_to_bus(phys, len)
    }

    /// The CPU physical address of the device's `bus .. bus + len`, under the same rules as
    /// [`BusMap::phys_to_bus`].
    #[inline(always)]
    pub fn bus_to_phys(&self, bus: DmaAddr, len: u64) -> Option<PhysAddr> {
        if self.is_identity() {
            return fits(bus.0, len).then_some(PhysAddr(bus.0));
        }
        self.bus_to_phys_windows(bus, len)
    }

    #[inline(never)]
    fn bus_to_phys_windows(&self, bus: DmaAddr, len: u64) -> Option<PhysAddr> {
        let w = self
            .windows()
            .iter()
            .find(|w| offset_in(w.bus.0, w.size, bus.0, 0).is_some())?;
        w.bus_to_phys(bus, len)
    }

    /// For choosing allocation limits: one past the highest CPU physical address whose bus
    /// address ([`BusMap::phys_to_bus`]) is at most `mask` (a DMA mask such as 0xffff_ffff).
    /// `PhysAddr(0)` if the mask reaches nothing.
    ///
    /// Not every address below the limit need be reachable: windows leave holes (the Raspberry
    /// Pi 3's 31-bit view reaches only its peripheral window 0x3f000000..0x40000000), so an
    /// allocation below the limit must still be checked with `phys_to_bus` (and retried lower
    /// if it fails). The limit is capped at `u64::MAX`, the "reaches everything" value of
    /// `dma::DMA_LIMIT_ALL`.
    pub fn max_reachable(&self, mask: u64) -> PhysAddr {
        if self.is_identity() {
            return PhysAddr(mask.saturating_add(1));
        }
        let windows = self.windows();
        let mut best = 0u64;
        for (i, w) in windows.iter().enumerate() {
            if w.bus.0 > mask {
                continue;
            }
            // The part of `w` whose bus addresses fit the mask: CPU `w.cpu ..= top`.
            let top = w.cpu.0 + (w.size - 1).min(mask - w.bus.0);
            // Earlier windows take precedence over `w` where they overlap it; step below each
            // one covering the candidate. The candidate only decreases, so every earlier window
            // is stepped over at most once.
            let mut cand = Some(top);
            while let Some(c) = cand.filter(|&c| c >= w.cpu.0) {
                match windows[..i]
                    .iter()
                    .find(|e| offset_in(e.cpu.0, e.size, c, 0).is_some())
                {
                    Some(e) => cand = e.cpu.0.checked_sub(1),
                    None => break,
                }
            }
            if let Some(c) = cand.filter(|&c| c >= w.cpu.0) {
                best = best.max(c.saturating_add(1));
            }
        }
        PhysAddr(best)
    }

    /// The map of the device at DT node `node`, from the `dma-ranges` of the buses above it (see
    /// the module documentation for the rules). Errors for a malformed `dma-ranges` or cell
    /// count on the way, a window running past 2^64, more than [`MAX_WINDOWS`] windows (after
    /// splitting), and for a bus whose windows all vanish (zero-sized, or routed nowhere above).
    pub fn from_dt(node: &Node<'_>) -> Result<BusMap, DtError> {
        // chain[0] is the root, chain[len - 1] the device; buses are chain[1 ..= len - 2].
        let chain = node.ancestry();
        let start = chain.len().checked_sub(2);
        BusMap::from_levels(node, &chain, start)
    }

    /// The map of a device that sits directly below DT node `bus` without a node of its own: a
    /// PCI function below its host bridge, whose `dma-ranges` then apply (as Linux's
    /// `of_dma_configure` does with the bridge's node for PCI devices). Same rules and errors as
    /// [`BusMap::from_dt`].
    pub fn for_children_of(bus: &Node<'_>) -> Result<BusMap, DtError> {
        // chain[len - 1] is `bus` itself, the first level to look at.
        let chain = bus.ancestry();
        let start = chain.len().checked_sub(1);
        BusMap::from_levels(bus, &chain, start)
    }

    /// [`BusMap::from_dt`] from bus level `start` of `node`'s ancestry (`None`: no bus above).
    fn from_levels(node: &Node<'_>, chain: &Ancestry<'_>, start: Option<usize>) -> Result<BusMap, DtError> {
        let broken = DtError::NotFound {
            what: "bus in the ancestry of node",
            name: node.short_name(),
        };
        let Some(mut level) = start else {
            return Ok(BusMap::IDENTITY);
        };
        let mut own_bus = true;
        let (bus, prop) = loop {
            if level == 0 {
                return Ok(BusMap::IDENTITY);
            }
            let bus = chain.get(level).ok_or(broken)?;
            match bus.property("dma-ranges") {
                Some(p) if !p.is_empty() => break (bus, p),
                None if !own_bus => return Ok(BusMap::IDENTITY),
                _ => {}
            }
            own_bus = false;
            level -= 1;
        };

        let mut acc = Pieces::default();
        let parent = chain.get(level - 1).ok_or(broken)?;
        for e in checked_entries(&bus, &prop, &parent)? {
            let e = e?;
            acc.push(Piece {
                bus: e.child,
                at: e.parent,
                size: e.size,
            })
            .ok_or_else(|| prop.error("more windows than a DMA bus map holds (16)"))?;
        }
        if acc.len == 0 {
            return Err(prop.error("no window of non-zero size"));
        }

        let mut clipped = false;
        for upper in (1..level).rev() {
            let b = chain.get(upper).ok_or(broken)?;
            let Some(p) = b.property("dma-ranges").filter(|p| !p.is_empty()) else {
                continue;
            };
            let parent = chain.get(upper - 1).ok_or(broken)?;
            let entries = checked_entries(&b, &p, &parent)?;
            // Validate every entry once before intersecting.
            for e in entries {
                e?;
            }
            let mut next = Pieces::default();
            for w in acc.as_slice() {
                clipped |= !covered(w, entries);
                for e in entries.flatten() {
                    let lo = (w.at as u128).max(e.child as u128);
                    let hi = (w.at as u128 + w.size as u128).min(e.child as u128 + e.size as u128);
                    if lo >= hi {
                        continue;
                    }
                    // All three fit in u64: lo >= both starts, and both ranges end by 2^64.
                    let piece = Piece {
                        bus: w.bus + (lo - w.at as u128) as u64,
                        at: e.parent + (lo - e.child as u128) as u64,
                        size: (hi - lo) as u64,
                    };
                    next.push(piece).ok_or_else(|| {
                        p.error("more windows than a DMA bus map holds (16) after splitting")
                    })?;
                }
            }
            if next.len == 0 {
                return Err(DtError::Untranslatable {
                    node: node.short_name(),
                    addr: acc.as_slice().first().map_or(0, |w| w.at),
                    what: "no dma-ranges window of the device's bus reaches the CPU through the buses above",
                });
            }
            acc = next;
        }

        let mut map = BusMap::IDENTITY;
        for (slot, w) in map.windows.iter_mut().zip(acc.as_slice()) {
            // Window's invariants hold: pieces are never empty (zero-sized entries are skipped,
            // intersections are non-empty) and both sides were checked to end by 2^64.
            *slot = Window {
                cpu: PhysAddr(w.at),
                bus: DmaAddr(w.bus),
                size: w.size,
            };
        }
        map.len = acc.len;
        map.clipped = clipped;
        Ok(map)
    }
}

/// A window under construction: bus addresses `bus ..` are `at ..` in the address space of the
/// level reached so far.
#[derive(Clone, Copy, Default)]
struct Piece {
    bus: u64,
    at: u64,
    size: u64,
}

#[derive(Default)]
struct Pieces {
    items: [Piece; MAX_WINDOWS],
    len: usize,
}

impl Pieces {
    fn push(&mut self, p: Piece) -> Option<()> {
        *self.items.get_mut(self.len)? = p;
        self.len += 1;
        Some(())
    }

    fn as_slice(&self) -> &[Piece] {
        self.items.get(..self.len).unwrap_or_default()
    }
}

/// Whether every address of `w` falls in some entry (entries already validated).
fn covered(w: &Piece, entries: CheckedEntries<'_>) -> bool {
    // Walk `w` from its start, jumping to the end of an entry containing the current point.
    let end = w.at as u128 + w.size as u128;
    let mut at = w.at as u128;
    while at < end {
        let next = entries.flatten().find_map(|e| {
            let (s, t) = (e.child as u128, e.child as u128 + e.size as u128);
            (s <= at && at < t).then_some(t)
        });
        match next {
            Some(t) => at = t,
            None => return false,
        }
    }
    true
}

/// The non-empty entries of `bus`'s `dma-ranges` (`prop`), each checked not to run past 2^64 on
/// either side.
fn checked_entries<'a>(
    bus: &Node<'a>,
    prop: &Property<'a>,
    parent: &Node<'a>,
) -> Result<CheckedEntries<'a>, DtError> {
    let cells = Cells::of(bus)?;
    let parent_cells = Cells::of(parent)?;
    Ok(CheckedEntries {
        ranges: Ranges::new(prop, cells, parent_cells.address)?,
        prop: *prop,
    })
}

#[derive(Clone, Copy)]
struct CheckedEntries<'a> {
    ranges: Ranges<'a>,
    prop: Property<'a>,
}

impl Iterator for CheckedEntries<'_> {
    type Item = Result<RangeEntry, DtError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let e = self.ranges.next()?;
            if e.size == 0 {
                continue;
            }
            for base in [e.child, e.parent] {
                if !fits(base, e.size) {
                    return Some(Err(self.prop.error("a window runs past the end of the 64-bit address space")));
                }
            }
            return Some(Ok(e));
        }
    }
}

impl fmt::Debug for BusMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BusMap({self})")
    }
}

impl fmt::Display for BusMap {
    /// `identity`, or the windows as `bus B -> cpu C (S bytes)`, comma-separated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_identity() {
            return f.write_str("identity");
        }
        for (i, w) in self.windows().iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "bus {} -> cpu {} ({:#x} bytes)", w.bus, w.cpu, w.size)?;
        }
        if self.clipped {
            f.write_str(" (clipped)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dt::fixtures::*;
    use crate::dt::{DeviceTree, Name};
    use proptest::prelude::*;

    /// tests/fixtures/dt/dma-ranges.dts, compiled.
    const DMA_RANGES: &[u8] = include_bytes!("../../tests/fixtures/dt/dma-ranges.dtb");

    fn w(cpu: u64, bus: u64, size: u64) -> Window {
        Window::new(PhysAddr(cpu), DmaAddr(bus), size).unwrap()
    }

    fn map_of(dtb: &[u8], path: &str) -> Result<BusMap, DtError> {
        let dt = DeviceTree::from_bytes(dtb).unwrap();
        let node = dt
            .find_node(path)
            .unwrap_or_else(|| panic!("no node {path}"));
        BusMap::from_dt(&node)
    }

    /// (cpu, bus, size) of each window of the map of `path`.
    fn windows_of(dtb: &[u8], path: &str) -> Vec<(u64, u64, u64)> {
        let map = map_of(dtb, path).unwrap_or_else(|e| panic!("{path}: {e}"));
        map.windows()
            .iter()
            .map(|w| (w.cpu().0, w.bus().0, w.size()))
            .collect()
    }

    fn p2b(map: &BusMap, phys: u64, len: u64) -> Option<u64> {
        map.phys_to_bus(PhysAddr(phys), len).map(DmaAddr::as_u64)
    }

    fn b2p(map: &BusMap, bus: u64, len: u64) -> Option<u64> {
        map.bus_to_phys(DmaAddr(bus), len).map(PhysAddr::as_u64)
    }

    #[test]
    fn dma_addr_is_its_own_type() {
        assert_eq!(format!("{}", DmaAddr(0xc000_0000)), "0xc0000000");
        assert_eq!(format!("{:?}", DmaAddr(0x10)), "DA(0x10)");
        assert_eq!(DmaAddr::new(5).checked_add(3), Some(DmaAddr(8)));
        assert_eq!(DmaAddr(u64::MAX).checked_add(1), None);
        assert_eq!(DmaAddr(7).as_u64(), 7);
    }

    #[test]
    fn window_edges() {
        assert_eq!(Window::new(PhysAddr(0), DmaAddr(0), 0), None);
        assert_eq!(Window::new(PhysAddr(u64::MAX), DmaAddr(0), 2), None);
        assert_eq!(Window::new(PhysAddr(0), DmaAddr(u64::MAX - 1), 3), None);
        // Ending exactly at 2^64 is fine on both sides.
        let top = w(u64::MAX - 0xfff, u64::MAX - 0xfff, 0x1000);
        assert_eq!(
            top.phys_to_bus(PhysAddr(u64::MAX), 1),
            Some(DmaAddr(u64::MAX))
        );
        let x = w(0x1000, 0x9000, 0x1000);
        assert_eq!(
            x.phys_to_bus(PhysAddr(0x1000), 0x1000),
            Some(DmaAddr(0x9000))
        );
        assert_eq!(x.phys_to_bus(PhysAddr(0x1fff), 1), Some(DmaAddr(0x9fff)));
        assert_eq!(x.phys_to_bus(PhysAddr(0x1fff), 2), None);
        assert_eq!(x.phys_to_bus(PhysAddr(0x1fff), 0), Some(DmaAddr(0x9fff)));
        assert_eq!(x.phys_to_bus(PhysAddr(0x2000), 0), None);
        assert_eq!(x.phys_to_bus(PhysAddr(0xfff), 1), None);
        assert_eq!(x.phys_to_bus(PhysAddr(0x1800), u64::MAX), None);
        assert_eq!(
            x.bus_to_phys(DmaAddr(0x9800), 0x800),
            Some(PhysAddr(0x1800))
        );
        assert_eq!(x.bus_to_phys(DmaAddr(0x1800), 1), None);
    }

    #[test]
    fn identity() {
        let id = BusMap::IDENTITY;
        assert!(id.is_identity() && id.windows().is_empty() && !id.clipped());
        assert_eq!(p2b(&id, 0x4000_0000, 0x1000), Some(0x4000_0000));
        assert_eq!(b2p(&id, 0x4000_0000, 0x1000), Some(0x4000_0000));
        assert_eq!(p2b(&id, u64::MAX, 1), Some(u64::MAX));
        assert_eq!(p2b(&id, u64::MAX, 2), None);
        assert_eq!(b2p(&id, u64::MAX - 1, 3), None);
        assert_eq!(id.max_reachable(0xffff_ffff), PhysAddr(0x1_0000_0000));
        assert_eq!(id.max_reachable(0xfff_ffff), PhysAddr(0x1000_0000));
        assert_eq!(id.max_reachable(0), PhysAddr(1));
        assert_eq!(id.max_reachable(u64::MAX), PhysAddr(u64::MAX));
        assert_eq!(format!("{id}"), "identity");
    }

    #[test]
    fn from_windows_limits() {
        assert_eq!(BusMap::from_windows(&[]), Err(BusMapError::Empty));
        let many = [w(0, 0, 1); MAX_WINDOWS + 1];
        let e = BusMap::from_windows(&many).unwrap_err();
        assert_eq!(e, BusMapError::TooMany { count: 17 });
        assert_eq!(
            format!("{e}"),
            "17 DMA windows, more than a bus map holds (16)"
        );
        assert_eq!(
            format!("{}", BusMapError::Empty),
            "a DMA bus map needs at least one window"
        );
        let full = BusMap::from_windows(&many[..MAX_WINDOWS]).unwrap();
        assert_eq!(full.windows().len(), MAX_WINDOWS);
        assert!(!full.is_identity());
    }

    #[test]
    fn raspberry_pi_3_soc() {
        // /soc dma-ranges = <0xc0000000 0x0 0x3f000000>, <0x7e000000 0x3f000000 0x1000000>:
        // RAM at bus 0xc0000000, the peripherals at their bus addresses.
        for dtb in [RPI3B_DOWNSTREAM, QEMU_RASPI3B] {
            assert_eq!(
                windows_of(dtb, "/soc/serial@7e201000"),
                [
                    (0, 0xc000_0000, 0x3f00_0000),
                    (0x3f00_0000, 0x7e00_0000, 0x100_0000)
                ]
            );
        }
        let map = map_of(RPI3B_DOWNSTREAM, "/soc/serial@7e201000").unwrap();
        assert_eq!(p2b(&map, 0x1000, 0x1000), Some(0xc000_1000));
        assert_eq!(p2b(&map, 0x3eff_ffff, 1), Some(0xfeff_ffff));
        assert_eq!(p2b(&map, 0x3f20_1000, 0x200), Some(0x7e20_1000));
        // Contiguous in CPU space but not on the bus: refused, not half-translated.
        assert_eq!(p2b(&map, 0x3eff_f000, 0x2000), None);
        assert_eq!(p2b(&map, 0x4000_0000, 1), None);
        assert_eq!(b2p(&map, 0xc010_0000, 0x1000), Some(0x10_0000));
        assert_eq!(b2p(&map, 0xff00_0000, 1), None);
        assert_eq!(b2p(&map, 0x1000, 1), None);
        // 32-bit mask: everything. Below bus 0xc0000000 only the peripheral window remains,
        // whose end is then the limit; below 0x7e000000 nothing.
        assert_eq!(map.max_reachable(0xffff_ffff), PhysAddr(0x4000_0000));
        assert_eq!(map.max_reachable(0x7fff_ffff), PhysAddr(0x4000_0000));
        assert_eq!(map.max_reachable(0x7e00_0fff), PhysAddr(0x3f00_1000));
        assert_eq!(map.max_reachable(0x7dff_ffff), PhysAddr(0));
        assert_eq!(
            format!("{map}"),
            "bus 0xc0000000 -> cpu 0x0 (0x3f000000 bytes), bus 0x7e000000 -> cpu 0x3f000000 (0x1000000 bytes)"
        );
    }

    #[test]
    fn raspberry_pi_4() {
        // /emmc2bus (2/1 cells under the 2/1 root): <0x0 0xc0000000  0x0 0x0  0x40000000>.
        assert_eq!(
            windows_of(RPI4B_DOWNSTREAM, "/emmc2bus/mmc@7e340000"),
            [(0, 0xc000_0000, 0x4000_0000)]
        );
        // /soc (1/1 under 2/1): <0xc0000000  0x0 0x0  0x40000000>,
        // <0x7c000000  0x0 0xfc000000  0x3800000>.
        for dtb in [RPI4B_DOWNSTREAM, QEMU_RASPI4B] {
            assert_eq!(
                windows_of(dtb, "/soc/serial@7e201000"),
                [
                    (0, 0xc000_0000, 0x4000_0000),
                    (0xfc00_0000, 0x7c00_0000, 0x380_0000)
                ]
            );
        }
        // /v3dbus (1/2): <0x0  0x0 0x0  0x4 0x0>: 16 GiB, identity offsets.
        assert_eq!(
            windows_of(RPI4B_DOWNSTREAM, "/v3dbus/v3d@7ec04000"),
            [(0, 0, 0x4_0000_0000)]
        );
        // /scb (2/2): <0x4 0x7c000000  0x0 0xfc000000  0x0 0x3800000>, <0x0 0x0  0x0 0x0  0x4 0x0>.
        // The two overlap in CPU space: the first one listed wins.
        let eth = map_of(RPI4B_DOWNSTREAM, "/scb/ethernet@7d580000").unwrap();
        assert_eq!(
            eth.windows(),
            [
                w(0xfc00_0000, 0x4_7c00_0000, 0x380_0000),
                w(0, 0, 0x4_0000_0000)
            ]
        );
        assert_eq!(p2b(&eth, 0xfc00_1000, 4), Some(0x4_7c00_1000));
        assert_eq!(p2b(&eth, 0x1000, 4), Some(0x1000));
        assert_eq!(b2p(&eth, 0xfc00_1000, 4), Some(0xfc00_1000));
        // A 32-bit mask reaches the low 4 GiB through the second window, but CPU
        // 0xfc000000..0xff800000 only at its first-window (36-bit) bus address.
        assert_eq!(eth.max_reachable(0xffff_ffff), PhysAddr(0x1_0000_0000));
        assert_eq!(eth.max_reachable(0xfcff_ffff), PhysAddr(0xfc00_0000));
        assert_eq!(eth.max_reachable(0x4_7c00_0fff), PhysAddr(0x4_0000_0000));
        // PCIe: the host bridge's <0x2000000 0x0 0x0  0x0 0x0  0x0 0xc0000000> (3-cell child,
        // flags ignored) composed with /scb's windows; the bridge pci@0,0 has no dma-ranges.
        assert_eq!(
            windows_of(RPI4B_DOWNSTREAM, "/scb/pcie@7d500000/pci@0,0/usb@0,0"),
            [(0, 0, 0xc000_0000)]
        );
        assert!(
            !map_of(RPI4B_DOWNSTREAM, "/scb/pcie@7d500000/pci@0,0/usb@0,0")
                .unwrap()
                .clipped()
        );
    }

    #[test]
    fn raspberry_pi_5() {
        // /axi (2/2): five windows at their own addresses.
        assert_eq!(
            windows_of(RPI5B_DOWNSTREAM, "/axi/iommu@5100"),
            [
                (0, 0, 0x10_0000_0000),
                (0x10_0000_0000, 0x10_0000_0000, 0x1_0000_0000),
                (0x14_0000_0000, 0x14_0000_0000, 0x4_0000_0000),
                (0x18_0000_0000, 0x18_0000_0000, 0x4_0000_0000),
                (0x1c_0000_0000, 0x1c_0000_0000, 0x4_0000_0000),
            ]
        );
        // RP1 sits below a PCIe bus: its dma-ranges' parent addresses have 3 cells, which the
        // DT layer does not map (PCI space codes); an error, not a guess.
        let e = map_of(RPI5B_DOWNSTREAM, "/axi/pcie@1000120000/rp1/mailbox@8000").unwrap_err();
        assert!(matches!(e, DtError::Property { .. }), "{e:?}");
    }

    #[test]
    fn qemu_virt_has_no_dma_ranges() {
        for dtb in [QEMU_VIRT_A53_2G, QEMU_VIRT_GICV3_SMMUV3, QEMU_VIRT_A15] {
            let dt = DeviceTree::from_bytes(dtb).unwrap();
            for node in dt.nodes() {
                assert_eq!(BusMap::from_dt(&node), Ok(BusMap::IDENTITY), "{node:?}");
            }
        }
    }

    #[test]
    fn several_windows_and_both_offsets() {
        let multi = [
            (0x4000_0000, 0, 0x2000_0000),
            (0x6000_0000, 0x8000_0000, 0x1000_0000),
            (0x1_0000_0000, 0xc000_0000, 0x1000_0000),
        ];
        assert_eq!(windows_of(DMA_RANGES, "/multi/dev@1000"), multi);
        let map = map_of(DMA_RANGES, "/multi/dev@1000").unwrap();
        assert_eq!(p2b(&map, 0x4000_1000, 0x100), Some(0x1000), "bus below CPU");
        assert_eq!(p2b(&map, 0x5fff_ffff, 1), Some(0x1fff_ffff));
        assert_eq!(
            p2b(&map, 0x6000_0000, 0x1000),
            Some(0x8000_0000),
            "bus above CPU"
        );
        assert_eq!(p2b(&map, 0x1_0000_0000, 8), Some(0xc000_0000));
        assert_eq!(p2b(&map, 0x7000_0000, 1), None, "between windows");
        assert_eq!(p2b(&map, 0x3fff_ffff, 1), None);
        assert_eq!(b2p(&map, 0x8000_0010, 0x10), Some(0x6000_0010));
        assert_eq!(b2p(&map, 0x2000_0000, 1), None);
        assert_eq!(map.max_reachable(0xffff_ffff), PhysAddr(0x1_1000_0000));
        assert_eq!(map.max_reachable(0x8fff_ffff), PhysAddr(0x7000_0000));
        assert_eq!(map.max_reachable(0x8000_0fff), PhysAddr(0x6000_1000));
        assert_eq!(map.max_reachable(0x7fff_ffff), PhysAddr(0x6000_0000));
        assert_eq!(map.max_reachable(0xfff_ffff), PhysAddr(0x5000_0000));
        assert!(!map.clipped());
    }

    /// A child without a node of its own (a PCI function below its bridge) gets the map of a
    /// node-bearing child of the same bus.
    #[test]
    fn children_of_a_bus_node() {
        let dt = DeviceTree::from_bytes(DMA_RANGES).unwrap();
        let of = |path: &str| BusMap::for_children_of(&dt.find_node(path).unwrap());
        for (bus, child) in [
            ("/multi", "/multi/dev@1000"),
            ("/multi/quiet", "/multi/quiet/dev@2000"),
            ("/multi/open", "/multi/open/dev@4000"),
            ("/outer/inner", "/outer/inner/dev@0,100"),
            ("/multi/quiet/deeper", "/multi/quiet/deeper/dev@3000"),
        ] {
            assert_eq!(of(bus), map_of(DMA_RANGES, child), "{bus}");
        }
        assert!(!of("/multi").unwrap().is_identity());
        // The root: nothing above translates.
        assert_eq!(of("/"), Ok(BusMap::IDENTITY));
    }

    #[test]
    fn levels_without_dma_ranges() {
        let multi = windows_of(DMA_RANGES, "/multi/dev@1000");
        // Missing on the device's own bus: the next level up decides.
        assert_eq!(windows_of(DMA_RANGES, "/multi/quiet/dev@2000"), multi);
        // Missing on two levels: Linux gives up (identity), whatever `multi` says.
        assert_eq!(
            map_of(DMA_RANGES, "/multi/quiet/deeper/dev@3000"),
            Ok(BusMap::IDENTITY)
        );
        // Empty: identity at that level, then `multi`'s windows.
        assert_eq!(windows_of(DMA_RANGES, "/multi/open/dev@4000"), multi);
        // Missing on the device's bus, empty above it, then `multi`.
        assert_eq!(windows_of(DMA_RANGES, "/multi/open/quiet/dev@5000"), multi);
        // Directly under the root, and the root itself.
        assert_eq!(map_of(DMA_RANGES, "/plain@9000000"), Ok(BusMap::IDENTITY));
        assert_eq!(map_of(DMA_RANGES, "/"), Ok(BusMap::IDENTITY));
        // The bus itself, as a device: its parent (the root) has no dma-ranges.
        assert_eq!(map_of(DMA_RANGES, "/multi"), Ok(BusMap::IDENTITY));
    }

    #[test]
    fn nested_buses_compose() {
        // inner 0 (128 MiB) -> outer 0x12000000: outer's windows 0x10000000 -> 0x80000000 and
        // 0x14000000 -> 0x90000000 (64 MiB each) split it; outer 0x18000000.. is routed
        // nowhere, so its last 32 MiB are clipped. inner 0x100000000 -> outer 0x10000000 (16 MiB)
        // -> CPU 0x80000000. inner 0x200000000 -> outer 0x30000000: dropped.
        let map = map_of(DMA_RANGES, "/outer/inner/dev@0,100").unwrap();
        assert_eq!(
            map.windows(),
            [
                w(0x8200_0000, 0, 0x200_0000),
                w(0x9000_0000, 0x200_0000, 0x400_0000),
                w(0x8000_0000, 0x1_0000_0000, 0x100_0000),
            ]
        );
        assert!(map.clipped());
        assert!(format!("{map}").ends_with(" (clipped)"));
        assert_eq!(p2b(&map, 0x8200_0000, 0x1000), Some(0));
        assert_eq!(p2b(&map, 0x93ff_ffff, 1), Some(0x5ff_ffff));
        assert_eq!(b2p(&map, 0x5ff_ffff, 1), Some(0x93ff_ffff));
        assert_eq!(b2p(&map, 0x600_0000, 1), None, "clipped");
        assert_eq!(b2p(&map, 0x2_0000_0000, 1), None, "dropped");
        // Contiguous on the bus, not in CPU space.
        assert_eq!(b2p(&map, 0x1ff_f000, 0x2000), None);
        // All of `lost`'s windows vanish: an error naming the device.
        let e = map_of(DMA_RANGES, "/outer/lost/dev@0").unwrap_err();
        assert_eq!(
            e,
            DtError::Untranslatable {
                node: Name::new("dev@0"),
                addr: 0x3000_0000,
                what: "no dma-ranges window of the device's bus reaches the CPU through the buses above",
            }
        );
    }

    #[test]
    fn window_ending_at_the_top_of_the_bus() {
        let map = map_of(DMA_RANGES, "/top/dev@0,1000").unwrap();
        assert_eq!(map.windows(), [w(0x1000, 0xffff_ffff_ffff_f000, 0x1000)]);
        assert_eq!(p2b(&map, 0x1fff, 1), Some(u64::MAX));
        assert_eq!(b2p(&map, u64::MAX, 1), Some(0x1fff));
        assert_eq!(map.max_reachable(u64::MAX), PhysAddr(0x2000));
        assert_eq!(map.max_reachable(0xffff_ffff_ffff_f7ff), PhysAddr(0x1800));
        assert_eq!(map.max_reachable(0xffff_ffff), PhysAddr(0));
    }

    #[test]
    fn malformed_dma_ranges_are_errors() {
        let e = map_of(DMA_RANGES, "/broken/length/dev@0").unwrap_err();
        assert_eq!(
            e,
            DtError::Property {
                node: Name::new("length"),
                prop: Name::new("dma-ranges"),
                what: "length is not a whole number of (child, parent, size) entries",
                len: 20,
            }
        );
        let wraps = |node: &str, len: u32| DtError::Property {
            node: Name::new(node),
            prop: Name::new("dma-ranges"),
            what: "a window runs past the end of the 64-bit address space",
            len,
        };
        let e = map_of(DMA_RANGES, "/broken/bus-wraps/dev@0,0").unwrap_err();
        assert_eq!(e, wraps("bus-wraps", 24));
        assert_eq!(
            format!("{e}"),
            "property `dma-ranges` of node `bus-wraps` (24 bytes): a window runs past the end of the 64-bit address space"
        );
        let e = map_of(DMA_RANGES, "/broken/cpu-wraps/dev@0").unwrap_err();
        assert_eq!(e, wraps("cpu-wraps", 20));
        let e = map_of(DMA_RANGES, "/broken/empty-window/dev@0").unwrap_err();
        assert!(
            matches!(
                e,
                DtError::Property {
                    what: "no window of non-zero size",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = map_of(DMA_RANGES, "/broken/crowded/dev@0").unwrap_err();
        assert!(
            matches!(
                e,
                DtError::Property {
                    what: "more windows than a DMA bus map holds (16)",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = map_of(DMA_RANGES, "/broken/wide/dev@0").unwrap_err();
        assert_eq!(
            e,
            DtError::Cells {
                node: Name::new("wide"),
                prop: "#address-cells",
                value: 4,
                max: 3
            }
        );
        // The device's own bus is fine; the level above is not.
        let e = map_of(DMA_RANGES, "/broken/bad-parent/child/dev@0").unwrap_err();
        assert!(
            matches!(e, DtError::Property { node, len: 12, .. } if node == Name::new("bad-parent")),
            "{e:?}"
        );
    }

    #[test]
    fn every_node_of_every_fixture() {
        // No panic, whatever the tree; the QEMU trees are all identity (checked above).
        for (name, dtb) in VALID.iter().chain([("dma-ranges", DMA_RANGES)].iter()) {
            let dt = DeviceTree::from_bytes(dtb).unwrap();
            for node in dt.nodes() {
                if let Ok(map) = BusMap::from_dt(&node) {
                    assert!(
                        map.windows().iter().all(|w| w.size() > 0),
                        "{name} {node:?}"
                    );
                }
            }
        }
    }

    /// The model: first window containing the address, by brute force over u128 arithmetic.
    fn model_p2b(ws: &[(u64, u64, u64)], phys: u64, len: u64) -> Option<u64> {
        let end = |c: u64, s: u64| c as u128 + s as u128;
        let &(c, bus, s) = ws
            .iter()
            .find(|&&(c, _, s)| c <= phys && (phys as u128) < end(c, s))?;
        (phys as u128 + len as u128 <= end(c, s)).then(|| bus + (phys - c))
    }

    fn model_b2p(ws: &[(u64, u64, u64)], bus: u64, len: u64) -> Option<u64> {
        let flipped: Vec<_> = ws.iter().map(|&(c, b, s)| (b, c, s)).collect();
        model_p2b(&flipped, bus, len)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        /// Lookups and max_reachable against the model, on small address spaces where every
        /// address can be tried.
        #[test]
        fn lookups_match_the_model(
            raw in proptest::collection::vec((0u64..200, 0u64..200, 1u64..60), 1..6),
            mask in 0u64..300,
        ) {
            let ws: Vec<Window> = raw.iter().map(|&(c, b, s)| w(c, b, s)).collect();
            let map = BusMap::from_windows(&ws).unwrap();
            for a in 0..280u64 {
                for len in [0u64, 1, 7, 40] {
                    prop_assert_eq!(p2b(&map, a, len), model_p2b(&raw, a, len), "p2b {} {}", a, len);
                    prop_assert_eq!(b2p(&map, a, len), model_b2p(&raw, a, len), "b2p {} {}", a, len);
                }
            }
            let expect = (0..280u64)
                .filter(|&p| model_p2b(&raw, p, 1).is_some_and(|b| b <= mask))
                .map(|p| p + 1)
                .max()
                .unwrap_or(0);
            prop_assert_eq!(map.max_reachable(mask), PhysAddr(expect));
        }
    }
}
