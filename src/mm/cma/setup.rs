//! The CMA areas of the running system, set up at boot from the device tree and the `cma=` bootarg,
//! after Linux's rmem_cma_setup() (drivers/of, kernel/dma/contiguous.c) and dma_contiguous_reserve().
//!
//! Sources, in the order they are handled:
//! 1. Every available `/reserved-memory` child with compatible "shared-dma-pool" and `reusable` is
//!    an area named after its node. With `reg` it stays where the DT put it (base and size must be
//!    multiples of [`CMA_MIN_ALIGNMENT`]); with `size` it is placed top-down by `alignment` and
//!    `alloc-ranges` (tried in order). `no-map` is refused: a CMA area must be in the linear map.
//!    `linux,cma-default` makes it the default area (the first such node; later ones stay ordinary
//!    areas), unless a `cma=` bootarg is given, which replaces it (the node is bypassed, as Linux
//!    does).
//! 2. If no default area came from the DT: `cma=size[@start[-end]]` describes it, `cma=0` means
//!    none; without `cma=`, [`default_cma_size`] of RAM (64 MiB, less on small machines) anywhere
//!    below [`DEFAULT_AREA_LIMIT`]. This area is named "reserved", as in Linux.
//! 3. A device node whose `memory-region` (its first phandle, as Linux's of_reserved_mem_device_init
//!    reads it) names the node of an area owns that area: see [`CmaSetup::area_for_device`]. The
//!    owners are listed at set-up only when some area came from a node, so a boot with the
//!    default area alone does not walk the whole tree.
//!
//! Dynamically placed areas are recorded in the memory map as [`ReservationKind::Cma`] at once, so
//! the next placement, and the page allocator set up afterwards, never use their pages. A `reg`
//! area is already reserved by the memory map (as a `/reserved-memory` region) and stays recorded
//! that way. A request that cannot be met (larger than RAM, outside RAM, overlapping a no-map region
//! or another reservation, misaligned, malformed) is refused with a log line saying why, and the
//! boot goes on without that area.
//!
//! [`CmaSetup::new`] is plain code over a device tree and a memory map (the host tests run it); the
//! kernel keeps its result in a global registry (`init`, `registry`, `default_area`).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::area::{AreaName, CmaArea, CmaAreaError};
use super::cmdline::{parse_cma, CmaCmdline};
use super::placement::{default_cma_size, place_area, AreaRequest, CmaRegion, MemoryLayout, PlacementError, CMA_MIN_ALIGNMENT};
use crate::dt::{DeviceTree, DtError, Node, ReservedMemory};
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::mm::memmap::{MemMapError, MemoryMap, Region, ReservationKind};

/// The default area (from `cma=` or the built-in size) ends at or below 4 GiB, so that every 32-bit
/// DMA master can reach it, as Linux on arm64 limits it to ZONE_DMA32.
pub const DEFAULT_AREA_LIMIT: u64 = 1 << 32;

/// Name of the default area when it does not come from a DT node (Linux's name for it).
pub const DEFAULT_AREA_NAME: &str = "reserved";

/// Characters of the bitmap picture per area in [`CmaSetup::write_report`].
pub const REPORT_CELLS: usize = 256;

/// Where an area came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AreaOrigin {
    /// A `/reserved-memory` node with `reg`.
    DtFixed,
    /// A `/reserved-memory` node with `size`, placed here.
    DtDynamic,
    /// The `cma=` bootarg.
    Cmdline,
    /// The built-in default size.
    BuiltIn,
}

/// An area and what is known about it.
#[derive(Debug)]
pub struct RegisteredArea {
    pub area: CmaArea,
    pub origin: AreaOrigin,
    /// Offset of its `/reserved-memory` node in the structure block (the node's identity).
    pub node: Option<usize>,
}

/// Why a requested area does not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// Malformed properties in the node.
    Dt(DtError),
    /// `reusable` together with `no-map`: CMA pages must be in the linear map.
    NoMap,
    /// Neither `reg` nor `size`.
    NoSize,
    /// A `reg` property with no (or a zero-sized) first entry.
    EmptyReg,
    /// A `reg` region whose base or size is not a multiple of [`CMA_MIN_ALIGNMENT`].
    RegMisaligned { base: PhysAddr, size: u64 },
    Placement(PlacementError),
    MemMap(MemMapError),
    Area(CmaAreaError),
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalReason::Dt(e) => write!(f, "malformed node: {e}"),
            RefusalReason::NoMap => f.write_str("reusable and no-map together (a CMA area must be mapped)"),
            RefusalReason::NoSize => f.write_str("neither reg nor size"),
            RefusalReason::EmptyReg => f.write_str("empty reg"),
            RefusalReason::RegMisaligned { base, size } => write!(
                f,
                "reg {base} + {size:#x} is not aligned to the CMA minimum of {} MiB",
                CMA_MIN_ALIGNMENT >> 20
            ),
            RefusalReason::Placement(e) => write!(f, "{e}"),
            RefusalReason::MemMap(e) => write!(f, "{e}"),
            RefusalReason::Area(e) => write!(f, "{e}"),
        }
    }
}

/// A refused area: its name (the node's, or "reserved" for the default) and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub name: AreaName,
    pub node: Option<usize>,
    pub reason: RefusalReason,
}

/// A device node that owns an area through `memory-region`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceBinding {
    /// Offset of the device node.
    pub device: usize,
    /// Index into [`CmaSetup::areas`].
    pub area: usize,
}

/// Every area of the system, which one is the default, what was refused, which devices own an
/// area, and the boot log lines that say so.
#[derive(Debug, Default)]
pub struct CmaSetup {
    pub areas: Vec<RegisteredArea>,
    /// Index of the default area in `areas`.
    pub default: Option<usize>,
    pub refusals: Vec<Refusal>,
    pub devices: Vec<DeviceBinding>,
    /// The `cma=` value as understood (`None` if absent or malformed).
    pub cmdline: Option<CmaCmdline>,
    /// Boot log lines, in order, each starting with `cma: `.
    pub log: Vec<String>,
}

/// The memory map as `place_area` sees it, optionally leaving out one reservation (a `reg` area's
/// own /reserved-memory entry, which must not count as an obstacle to itself).
struct Layout {
    ram: Vec<(PhysAddr, u64)>,
    reserved: Vec<(PhysAddr, u64)>,
    no_map: Vec<(PhysAddr, u64)>,
}

impl Layout {
    fn of(map: &MemoryMap, except: Option<Region>) -> Layout {
        let mut l = Layout {
            ram: map.ram().iter().map(|r| (r.base(), r.size())).collect(),
            reserved: Vec::new(),
            no_map: Vec::new(),
        };
        for r in map.reservations().iter().filter(|r| Some(r.region) != except) {
            let range = (r.region.base(), r.region.size());
            match r.kind {
                ReservationKind::ReservedMemory { no_map: true } => l.no_map.push(range),
                _ => l.reserved.push(range),
            }
        }
        l
    }

    fn view(&self) -> MemoryLayout<'_> {
        MemoryLayout { ram: &self.ram, reserved: &self.reserved, no_map: &self.no_map }
    }
}

impl CmaSetup {
    /// Sets up the areas described by `dt` and `cma_arg` (the value of the `cma` bootarg, if given)
    /// in `map`, as the module documentation describes. Never fails as a whole: what cannot be done
    /// is recorded in `refusals` and `log`.
    pub fn new(dt: &DeviceTree<'_>, cma_arg: Option<&str>, map: &mut MemoryMap) -> CmaSetup {
        let mut s = CmaSetup::default();
        if let Some(v) = cma_arg {
            match parse_cma(v) {
                Ok(c) => s.cmdline = Some(c),
                Err(e) => s.log.push(format!("cma: ignoring the bootarg: {e}")),
            }
        }
        s.dt_areas(dt, map);
        if s.default.is_none() {
            s.place_default_area(map);
        }
        s.bind_devices(dt);
        s
    }

    /// Every area, the default one included.
    pub fn areas(&self) -> impl Iterator<Item = &CmaArea> {
        self.areas.iter().map(|a| &a.area)
    }

    /// The default area.
    pub fn default_area(&self) -> Option<&CmaArea> {
        self.default.and_then(|i| self.areas.get(i)).map(|a| &a.area)
    }

    /// The area named `name`.
    pub fn area_named(&self, name: &str) -> Option<&CmaArea> {
        self.areas.iter().map(|a| &a.area).find(|a| a.name() == name)
    }

    /// The area that holds all of the `count` pages at `addr`.
    pub fn area_containing(&self, addr: PhysAddr, count: u64) -> Option<&CmaArea> {
        self.areas.iter().map(|a| &a.area).find(|a| a.contains(addr, count))
    }

    /// The area `device` owns: the one made from the node its `memory-region` (first phandle)
    /// names. `Ok(None)` if it has no `memory-region`, or it names a node that is not an area (not
    /// a reusable pool, or one that was refused): such a device uses the default area. An error
    /// for a malformed or dangling `memory-region`.
    pub fn area_for_device(&self, dt: &DeviceTree<'_>, device: &Node<'_>) -> Result<Option<&CmaArea>, DtError> {
        Ok(self.device_area_index(dt, device)?.map(|i| &self.areas[i].area))
    }

    /// Index in `areas` of the area `device` owns; see [`CmaSetup::area_for_device`].
    fn device_area_index(&self, dt: &DeviceTree<'_>, device: &Node<'_>) -> Result<Option<usize>, DtError> {
        let Some(prop) = device.property("memory-region") else { return Ok(None) };
        let Some(phandle) = prop.as_u32s()?.next() else {
            return Err(prop.error("empty phandle list"));
        };
        let pool = dt.phandle_target(&prop, phandle)?;
        Ok(self.areas.iter().position(|a| a.node == Some(pool.offset())))
    }

    /// Writes the statistics table of every area, then the picture of each area's bitmap.
    pub fn write_report<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        if self.areas.is_empty() {
            return writeln!(out, "cma: no areas");
        }
        CmaArea::write_stats_header(out)?;
        for a in &self.areas {
            a.area.write_stats_row(out)?;
        }
        for a in &self.areas {
            a.area.render_bitmap(out, REPORT_CELLS)?;
        }
        Ok(())
    }

    fn dt_areas(&mut self, dt: &DeviceTree<'_>, map: &mut MemoryMap) {
        let nodes = match dt.reserved_memory() {
            Ok(n) => n,
            Err(e) => {
                self.log.push(format!("cma: /reserved-memory unreadable, no areas from the device tree: {e}"));
                return;
            }
        };
        for rm in nodes {
            let rm = match rm {
                Ok(rm) => rm,
                Err(e) => {
                    self.log.push(format!("cma: a /reserved-memory node is unreadable, skipped: {e}"));
                    continue;
                }
            };
            if !rm.is_available() || !rm.reusable || !rm.compatible().contains("shared-dma-pool") {
                continue;
            }
            let name = rm.name();
            if rm.cma_default && self.cmdline.is_some() {
                self.log.push(format!("cma: `{name}`: bypassed, the cma= bootarg describes the default area instead"));
                continue;
            }
            let node = Some(rm.node.offset());
            let placed = dt_region(&rm, map).and_then(|(region, origin)| {
                // A `reg` area is normally reserved already, by the memory map's own reading of
                // /reserved-memory; whatever is not must be, or the page allocator would own it.
                // Only this node's own reservation counts: another node's at the same place
                // (two pools with one `reg`) must make this one's reservation fail, not pass.
                let own = crate::mm::memmap::ResName::new(name);
                let recorded = map.reservations().iter().any(|r| {
                    r.region.base() == region.base
                        && r.region.size() == region.size
                        && r.kind == ReservationKind::ReservedMemory { no_map: false }
                        && r.name == own
                });
                self.add(name, region, origin, node, map, !recorded)
            });
            match placed {
                Ok(i) if rm.cma_default => match self.default {
                    None => {
                        self.default = Some(i);
                        self.log_reserved(i);
                    }
                    Some(d) => {
                        self.log_reserved(i);
                        let kept = self.areas[d].area.name();
                        self.log.push(format!("cma: `{name}`: a second linux,cma-default node; `{kept}` stays the default"));
                    }
                },
                Ok(i) => self.log_reserved(i),
                Err(reason) => self.refuse(name, node, reason),
            }
        }
    }

    fn place_default_area(&mut self, map: &mut MemoryMap) {
        let limit = Some(PhysAddr(DEFAULT_AREA_LIMIT));
        let (req, origin) = match self.cmdline {
            Some(c) => match c.request(limit) {
                Some(req) => (req, AreaOrigin::Cmdline),
                None => {
                    self.log.push("cma: no default area (cma=0)".into());
                    return;
                }
            },
            None => match default_cma_size(map.total_ram()) {
                0 => {
                    self.log.push("cma: no default area: too little RAM".into());
                    return;
                }
                size => (AreaRequest { limit, ..AreaRequest::dynamic(size) }, AreaOrigin::BuiltIn),
            },
        };
        let layout = Layout::of(map, None);
        let placed = place_area(&req, &layout.view())
            .map_err(RefusalReason::Placement)
            .and_then(|region| self.add(DEFAULT_AREA_NAME, region, origin, None, map, true));
        match placed {
            Ok(i) => {
                self.default = Some(i);
                self.log_reserved(i);
            }
            Err(reason) => self.refuse(DEFAULT_AREA_NAME, None, reason),
        }
    }

    /// Creates the area (its bitmap), records it in `map` as a CMA reservation if `reserve`, and
    /// registers it.
    fn add(
        &mut self,
        name: &str,
        region: CmaRegion,
        origin: AreaOrigin,
        node: Option<usize>,
        map: &mut MemoryMap,
        reserve: bool,
    ) -> Result<usize, RefusalReason> {
        let area = CmaArea::new(name, region.base, region.size / PAGE_SIZE, 0).map_err(RefusalReason::Area)?;
        if reserve {
            map.reserve(region.base, region.size, ReservationKind::Cma, name).map_err(RefusalReason::MemMap)?;
        }
        self.areas.push(RegisteredArea { area, origin, node });
        Ok(self.areas.len() - 1)
    }

    fn log_reserved(&mut self, i: usize) {
        let a = &self.areas[i].area;
        let default = if self.default == Some(i) { ", default" } else { "" };
        // Linux's wording, so log tooling that matches "cma: Reserved N MiB at" keeps working.
        let line = format!("cma: Reserved {} MiB at {:#018x} ({}{default})", a.size() >> 20, a.base().as_u64(), a.name());
        self.log.push(line);
    }

    fn refuse(&mut self, name: &str, node: Option<usize>, reason: RefusalReason) {
        self.log.push(format!("cma: area `{name}` refused: {reason}; booting without it"));
        self.refusals.push(Refusal { name: AreaName::new(name), node, reason });
    }

    /// Records and logs the devices that own an area. Only an area made from a `/reserved-memory`
    /// node can be owned: without one (the usual case, the default area alone) the whole tree is not
    /// walked, and a malformed `memory-region` is reported only when its device is set up
    /// ([`CmaSetup::area_for_device`]).
    fn bind_devices(&mut self, dt: &DeviceTree<'_>) {
        if self.areas.iter().all(|a| a.node.is_none()) {
            return;
        }
        for node in dt.nodes().filter(|n| n.has_property("memory-region") && n.is_available()) {
            match self.device_area_index(dt, &node) {
                Ok(Some(i)) => {
                    self.log.push(format!("cma: {} owns area `{}`", node.path(), self.areas[i].area.name()));
                    self.devices.push(DeviceBinding { device: node.offset(), area: i });
                }
                Ok(None) => {}
                Err(e) => self.log.push(format!("cma: {}: memory-region ignored: {e}", node.path())),
            }
        }
    }
}

/// Where a DT node's area goes: its `reg` checked, or its `size` placed.
fn dt_region(rm: &ReservedMemory<'_>, map: &MemoryMap) -> Result<(CmaRegion, AreaOrigin), RefusalReason> {
    if rm.no_map {
        return Err(RefusalReason::NoMap);
    }
    if rm.has_reg() {
        let reg = match rm.regs().next() {
            Some(r) => r.map_err(RefusalReason::Dt)?,
            None => return Err(RefusalReason::EmptyReg),
        };
        if reg.is_empty() {
            return Err(RefusalReason::EmptyReg);
        }
        let (base, size) = (reg.base(), reg.size());
        // Placement would round the size up, taking memory the DT did not reserve.
        if !base.as_u64().is_multiple_of(CMA_MIN_ALIGNMENT) || !size.is_multiple_of(CMA_MIN_ALIGNMENT) {
            return Err(RefusalReason::RegMisaligned { base, size });
        }
        let layout = Layout::of(map, Some(reg));
        let region = place_area(&AreaRequest::fixed(base, size), &layout.view()).map_err(RefusalReason::Placement)?;
        return Ok((region, AreaOrigin::DtFixed));
    }
    let Some(size) = rm.size else { return Err(RefusalReason::NoSize) };
    let ranges = rm
        .alloc_ranges()
        .map(|r| r.map(|r| (r.base(), r.size())))
        .collect::<Result<Vec<_>, _>>()
        .map_err(RefusalReason::Dt)?;
    let req = AreaRequest {
        align: rm.alignment.unwrap_or(0),
        alloc_ranges: &ranges,
        ..AreaRequest::dynamic(size)
    };
    let layout = Layout::of(map, None);
    let region = place_area(&req, &layout.view()).map_err(RefusalReason::Placement)?;
    Ok((region, AreaOrigin::DtDynamic))
}

#[cfg(target_os = "none")]
pub use kernel::*;

#[cfg(target_os = "none")]
mod kernel {
    use super::*;
    use crate::bootargs::Bootargs;
    use spin::Once;

    static REGISTRY: Once<CmaSetup> = Once::new();

    /// Sets up the areas (see [`CmaSetup::new`]) from the boot DT and bootargs, prints the log
    /// lines, and keeps the result for the rest of the kernel's life. Call once in the boot path,
    /// after the heap and before the page allocator; later calls change nothing.
    pub fn init(dt: &DeviceTree<'_>, bootargs: &Bootargs<'_>, map: &mut MemoryMap) {
        if REGISTRY.is_completed() {
            return;
        }
        let setup = CmaSetup::new(dt, bootargs.get("cma"), map);
        for line in &setup.log {
            crate::println!("{line}");
        }
        REGISTRY.call_once(|| setup);
    }

    /// The areas set up at boot (`None` before [`init`]).
    pub fn registry() -> Option<&'static CmaSetup> {
        REGISTRY.get()
    }

    /// The default area, if there is one.
    pub fn default_area() -> Option<&'static CmaArea> {
        registry().and_then(CmaSetup::default_area)
    }

    /// Prints the report ([`CmaSetup::write_report`]), every line prefixed with `prefix` (e.g.
    /// `"    # "` inside a KTAP suite).
    pub fn print_report(prefix: &str) {
        let mut text = String::new();
        match registry() {
            Some(r) => {
                let _ = r.write_report(&mut text);
            }
            None => text.push_str("cma: not set up\n"),
        }
        for line in text.lines() {
            crate::println!("{prefix}{line}");
        }
    }
}

#[cfg(target_os = "none")]
mod ktests {
    //! What the areas should be is worked out here from the bootargs and the device tree alone,
    //! then compared with what the setup made.

    use super::*;
    use crate::bootargs::parse_size;
    use crate::ktest::{NotPassed, TestResult};
    use crate::{kassert, kassert_eq, kskip, ktry};

    const MIN: u64 = 4 << 20;

    fn reg() -> Result<&'static CmaSetup, NotPassed> {
        registry().ok_or(NotPassed::Fail("CMA not set up".into()))
    }

    fn round_up(v: u64, a: u64) -> u64 {
        v.div_ceil(a) * a
    }

    /// The `cma=` value split by hand.
    struct CmaArg {
        size: u64,
        start: Option<u64>,
        end: Option<u64>,
    }

    fn cmdline() -> Result<Option<CmaArg>, NotPassed> {
        let Some(v) = crate::kernel::boot_info().bootargs.get("cma") else { return Ok(None) };
        let (size, rest) = v.split_once('@').map_or((v, None), |(s, r)| (s, Some(r)));
        let num = |s: &str| parse_size(s).map_err(|e| NotPassed::Fail(format!("cma={v}: {e}")));
        let size = num(size)?;
        let (start, end) = match rest {
            None => (None, None),
            Some(r) => match r.split_once('-') {
                None => (Some(num(r)?), None),
                Some((a, b)) => (Some(num(a)?), Some(num(b)?)),
            },
        };
        Ok(Some(CmaArg { size, start, end }))
    }

    /// The RAM the kernel runs with: the DT's, or the firmware's when the DT describes none (the
    /// memmap suite checks the two agree).
    fn total_ram() -> u64 {
        crate::kernel::boot_info().memmap.lock().total_ram()
    }

    /// The reusable shared-dma-pool nodes of the DT.
    fn dt_pools() -> Vec<ReservedMemory<'static>> {
        let dt = &crate::kernel::boot_info().dt;
        dt.reserved_memory()
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|rm| rm.is_available() && rm.reusable && rm.compatible().contains("shared-dma-pool"))
            .collect()
    }

    /// The default area is what `cma=`, the DT or the built-in rule asks for.
    fn default_area_as_configured() -> TestResult {
        let r = reg()?;
        let def = r.default_area();
        let dt_default = dt_pools().into_iter().find(|p| p.cma_default);
        match (cmdline()?, dt_default) {
            (Some(CmaArg { size: 0, .. }), _) => kassert!(def.is_none(), "cma=0 but a default area exists: {def:?}"),
            (Some(CmaArg { size, start, end }), _) => {
                let Some(a) = def else {
                    kassert!(r.refusals.iter().any(|f| f.name.as_str() == DEFAULT_AREA_NAME), "no default area and no refusal");
                    kskip!("the cma= area was refused: {}", r.log.join(" / "));
                };
                kassert_eq!(a.name(), DEFAULT_AREA_NAME);
                kassert_eq!(a.size(), round_up(size, MIN), "cma={size:#x}");
                kassert!(a.end().as_u64() <= DEFAULT_AREA_LIMIT, "{} beyond 4 GiB", a.end());
                match (start, end) {
                    (Some(b), None) => kassert_eq!(a.base().as_u64(), b, "fixed base"),
                    (Some(b), Some(e)) => {
                        kassert!(a.base().as_u64() >= b && a.end().as_u64() <= e, "{} + {:#x} outside {b:#x}-{e:#x}", a.base(), a.size())
                    }
                    _ => {}
                }
            }
            (None, Some(node)) => {
                // A refused DT default leaves the built-in one, as Linux's dma_contiguous_reserve.
                let refused = r.refusals.iter().any(|f| f.node == Some(node.node.offset()));
                match def {
                    Some(a) if a.name() == node.name() => {}
                    Some(a) => {
                        kassert!(refused, "default area `{}` while the DT's `{}` was not refused", a.name(), node.name());
                        kassert_eq!(a.name(), DEFAULT_AREA_NAME, "the built-in default after refusing `{}`", node.name());
                    }
                    None => kassert!(refused, "DT default neither made nor refused"),
                }
            }
            (None, None) => {
                let expect = (64u64 << 20).min(total_ram() / 4 / MIN * MIN);
                kassert_eq!(def.map(CmaArea::size), Some(expect).filter(|&s| s > 0), "{} MiB of RAM", total_ram() >> 20);
                if let Some(a) = def {
                    kassert!(a.end().as_u64() <= DEFAULT_AREA_LIMIT, "{} beyond 4 GiB", a.end());
                }
            }
        }
        Ok(())
    }

    /// Every reusable pool of the DT either exists with the DT's size and placement, or was
    /// refused; one larger than RAM is always refused.
    fn dt_areas_match_device_tree() -> TestResult {
        let r = reg()?;
        let pools = dt_pools();
        if pools.is_empty() {
            kskip!("the device tree has no reusable shared-dma-pool");
        }
        let bypassed = cmdline()?.is_some();
        for p in &pools {
            let area = r.areas.iter().find(|a| a.node == Some(p.node.offset())).map(|a| &a.area);
            let refused = r.refusals.iter().any(|f| f.node == Some(p.node.offset()));
            let name = p.name();
            if p.cma_default && bypassed {
                kassert!(area.is_none() && !refused, "`{name}` should be bypassed by cma=");
                continue;
            }
            kassert!(area.is_some() != refused, "`{name}`: area {} refused {refused}", area.is_some());
            if p.size.is_some_and(|s| s > total_ram()) || p.no_map {
                kassert!(refused, "`{name}` is impossible but exists");
            }
            let Some(a) = area else { continue };
            kassert_eq!(a.name(), name);
            let align = p.alignment.unwrap_or(0).max(MIN);
            match p.regs().next() {
                Some(reg) => {
                    let reg = ktry!(reg);
                    kassert_eq!((a.base(), a.size()), (reg.base(), reg.size()), "`{name}` reg");
                }
                None => {
                    let size = p.size.unwrap_or(0);
                    kassert_eq!(a.size(), round_up(size, align), "`{name}` size");
                    kassert_eq!(a.base().as_u64() % align, 0, "`{name}` alignment");
                    let ranges: Vec<Region> = p.alloc_ranges().filter_map(Result::ok).collect();
                    if !ranges.is_empty() {
                        let inside = ranges.iter().any(|g| a.base().as_u64() >= g.base().as_u64() && a.end().as_u64() <= g.end());
                        kassert!(inside, "`{name}` at {} + {:#x} outside its alloc-ranges", a.base(), a.size());
                    }
                }
            }
        }
        Ok(())
    }

    /// Areas are inside RAM, clear of no-map regions and of each other, and recorded in the memory
    /// map, so the page allocator (set up after them) never owns their pages.
    fn areas_reserved_in_memory_map() -> TestResult {
        let r = reg()?;
        if r.areas.is_empty() {
            kskip!("no CMA areas in this configuration");
        }
        let map = crate::kernel::boot_info().memmap.lock();
        for (i, a) in r.areas.iter().enumerate() {
            let region = ktry!(Region::new(a.area.base(), a.area.size()).ok_or("area wraps"));
            kassert!(map.is_ram(&region), "`{}` {region} outside RAM", a.area.name());
            let covering = map.reservations().iter().find(|res| res.region.contains(&region));
            match covering.map(|c| c.kind) {
                Some(ReservationKind::Cma) | Some(ReservationKind::ReservedMemory { no_map: false }) => {}
                other => kassert!(false, "`{}` {region} recorded as {other:?}", a.area.name()),
            }
            for b in &r.areas[i + 1..] {
                let other = ktry!(Region::new(b.area.base(), b.area.size()).ok_or("area wraps"));
                kassert!(!region.overlaps(&other), "`{}` overlaps `{}`", a.area.name(), b.area.name());
            }
            kassert!(map.free_ranges().all(|f| !f.overlaps(&region)), "`{}` {region} overlaps free memory", a.area.name());
        }
        Ok(())
    }

    /// Devices whose memory-region names a pool that became an area own that area.
    fn devices_own_their_areas() -> TestResult {
        let r = reg()?;
        let dt = &crate::kernel::boot_info().dt;
        let mut checked = 0;
        for node in dt.nodes().filter(|n| n.is_available()) {
            let Some(prop) = node.property("memory-region") else { continue };
            let Some(phandle) = ktry!(prop.as_u32s()).next() else { continue };
            let pool = ktry!(dt.node_by_phandle(phandle));
            let Some(expect) = r.areas.iter().find(|a| a.node == Some(pool.offset())) else { continue };
            let dev = ktry!(crate::dma::Device::from_dt(dt, &node));
            let got = dev.cma_area().map(CmaArea::name);
            kassert_eq!(got, Some(expect.area.name()), "{}", node.path());
            kassert!(r.devices.iter().any(|d| d.device == node.offset()), "{} not listed", node.path());
            checked += 1;
        }
        if checked == 0 {
            kskip!("no device node with a memory-region naming a CMA area");
        }
        Ok(())
    }

    crate::ktest_suite!("cma_setup", [
        default_area_as_configured,
        dt_areas_match_device_tree,
        areas_reserved_in_memory_map,
        devices_own_their_areas,
    ]);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dt::fixtures::*;

    /// Found by the cma_placement fuzz target: two pools with one `reg`, on a map that lacks their
    /// reservations (the boot path refuses such a tree earlier, in MemoryMap::from_dt). The second
    /// pool must not pass as reserved on the strength of the first one's reservation.
    #[test]
    fn two_pools_with_one_reg_give_one_area() {
        let blob = include_bytes!("../../../fuzz/regressions/cma_placement/duplicate-reg-areas.dtb");
        let dt = DeviceTree::from_bytes(blob).unwrap();
        let mut map = MemoryMap::new();
        map.add_ram(Region::new(PhysAddr(0x4000_0000), 0x4000_0000).unwrap()).unwrap();
        let setup = CmaSetup::new(&dt, None, &mut map);
        let at_base = setup.areas.iter().filter(|a| a.area.base() == PhysAddr(0x4000_0000)).count();
        assert_eq!(at_base, 1, "{:?}", setup.log);
        assert_eq!(setup.refusals.len(), 1, "{:?}", setup.log);
        assert!(setup.log.iter().any(|l| l.contains("`b@40000000` refused")), "{:?}", setup.log);
    }

    /// A minimal flattened-device-tree writer for trees the fixtures do not cover.
    pub(crate) struct FdtWriter {
        structs: Vec<u8>,
        strings: Vec<u8>,
    }

    impl FdtWriter {
        pub(crate) fn new() -> Self {
            let mut w = FdtWriter { structs: Vec::new(), strings: Vec::new() };
            w.begin("");
            w
        }

        fn pad(&mut self) {
            while !self.structs.len().is_multiple_of(4) {
                self.structs.push(0);
            }
        }

        pub(crate) fn begin(&mut self, name: &str) -> &mut Self {
            self.structs.extend_from_slice(&1u32.to_be_bytes());
            self.structs.extend_from_slice(name.as_bytes());
            self.structs.push(0);
            self.pad();
            self
        }

        pub(crate) fn end(&mut self) -> &mut Self {
            self.structs.extend_from_slice(&2u32.to_be_bytes());
            self
        }

        pub(crate) fn prop(&mut self, name: &str, value: &[u8]) -> &mut Self {
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            self.structs.extend_from_slice(&3u32.to_be_bytes());
            self.structs.extend_from_slice(&(value.len() as u32).to_be_bytes());
            self.structs.extend_from_slice(&off.to_be_bytes());
            self.structs.extend_from_slice(value);
            self.pad();
            self
        }

        pub(crate) fn cells(&mut self, name: &str, cells: &[u32]) -> &mut Self {
            let v: Vec<u8> = cells.iter().flat_map(|c| c.to_be_bytes()).collect();
            self.prop(name, &v)
        }

        pub(crate) fn str(&mut self, name: &str, s: &str) -> &mut Self {
            let mut v = s.as_bytes().to_vec();
            v.push(0);
            self.prop(name, &v)
        }

        pub(crate) fn finish(mut self) -> Vec<u8> {
            self.end();
            self.structs.extend_from_slice(&9u32.to_be_bytes());
            let rsv = 40u32;
            let off_struct = rsv + 16;
            let off_strings = off_struct + self.structs.len() as u32;
            let total = off_strings + self.strings.len() as u32;
            let mut out = Vec::new();
            for v in [0xd00d_feed, total, off_struct, off_strings, rsv, 17, 16, 0, self.strings.len() as u32, self.structs.len() as u32] {
                out.extend_from_slice(&u32::to_be_bytes(v));
            }
            out.extend_from_slice(&[0; 16]);
            out.extend_from_slice(&self.structs);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    fn hi_lo(v: u64) -> [u32; 2] {
        [(v >> 32) as u32, v as u32]
    }

    /// 2/2 cells, 1 GiB of RAM at 0x40000000, then `/reserved-memory` children from `pools`.
    fn virt_1g(pools: impl FnOnce(&mut FdtWriter)) -> Vec<u8> {
        let mut w = FdtWriter::new();
        w.cells("#address-cells", &[2]).cells("#size-cells", &[2]);
        w.begin("memory@40000000").str("device_type", "memory").cells("reg", &[0, 0x4000_0000, 0, 0x4000_0000]).end();
        w.begin("reserved-memory").cells("#address-cells", &[2]).cells("#size-cells", &[2]).prop("ranges", &[]);
        pools(&mut w);
        w.end();
        w.finish()
    }

    /// The memory map of `blob` with the kernel at 0x40200000 (1 MiB) and the blob at 0x48000000.
    fn map_of(dt: &DeviceTree<'_>) -> MemoryMap {
        MemoryMap::from_dt(dt, PhysAddr(0x4020_0000)..PhysAddr(0x4030_0000)).unwrap()
    }

    fn open(blob: &[u8], at: u64) -> DeviceTree<'_> {
        DeviceTree::from_bytes(blob).unwrap().with_phys_base(PhysAddr(at))
    }

    fn spans(s: &CmaSetup) -> Vec<(&str, u64, u64)> {
        s.areas.iter().map(|a| (a.area.name(), a.area.base().as_u64(), a.area.size())).collect()
    }

    fn cma_reservations(m: &MemoryMap) -> Vec<(u64, u64, String)> {
        m.reservations()
            .iter()
            .filter(|r| r.kind == ReservationKind::Cma)
            .map(|r| (r.region.base().as_u64(), r.region.size(), r.name.as_str().to_string()))
            .collect()
    }

    #[test]
    fn built_in_default_is_a_quarter_of_a_small_machine() {
        // QEMU virt 128 MiB: RAM 0x40000000-0x48000000; the blob placed at 0x44000000.
        let dt = open(QEMU_VIRT_A53_128M, 0x4400_0000);
        let mut m = map_of(&dt);
        let s = CmaSetup::new(&dt, None, &mut m);
        assert_eq!(spans(&s), [("reserved", 0x4600_0000, 32 << 20)]);
        assert_eq!(s.default, Some(0));
        assert_eq!(s.areas[0].origin, AreaOrigin::BuiltIn);
        assert_eq!(s.log, ["cma: Reserved 32 MiB at 0x0000000046000000 (reserved, default)"]);
        assert_eq!(cma_reservations(&m), [(0x4600_0000, 32 << 20, "reserved".to_string())]);
    }

    #[test]
    fn cmdline_sizes_windows_and_refusals() {
        let dt = open(QEMU_VIRT_A53_2G, 0x4400_0000);
        let run = |arg: &str| {
            let mut m = map_of(&dt);
            let s = CmaSetup::new(&dt, Some(arg), &mut m);
            (spans(&s).into_iter().map(|(n, b, z)| (n.to_string(), b, z)).collect::<Vec<_>>(), s.log.clone(), s.refusals.clone())
        };
        // 2 GiB at 0x40000000: top-down from 0xc0000000.
        let (a, log, _) = run("32M");
        assert_eq!(a, [("reserved".to_string(), 0xbe00_0000, 32 << 20)]);
        assert_eq!(log, ["cma: Reserved 32 MiB at 0x00000000be000000 (reserved, default)"]);
        // Sizes round up to 4 MiB.
        assert_eq!(run("5M").0, [("reserved".to_string(), 0xbf80_0000, 8 << 20)]);
        assert_eq!(run("16M@0x50000000").0, [("reserved".to_string(), 0x5000_0000, 16 << 20)]);
        assert_eq!(run("16M@0x41000000-0x46000000").0, [("reserved".to_string(), 0x4500_0000, 16 << 20)]);
        let (a, log, _) = run("0");
        assert!(a.is_empty());
        assert_eq!(log, ["cma: no default area (cma=0)"]);
        // Impossible requests: refused with the reason, nothing reserved.
        let (a, log, refusals) = run("4G");
        assert!(a.is_empty());
        assert_eq!(log, ["cma: area `reserved` refused: CMA area of 4096 MiB is larger than RAM (2048 MiB); booting without it"]);
        assert!(matches!(refusals[0].reason, RefusalReason::Placement(PlacementError::LargerThanRam { .. })));
        let (_, _, refusals) = run("8M@0x40000000");
        assert!(matches!(refusals[0].reason, RefusalReason::Placement(PlacementError::FixedOverlapsReserved { .. })), "{refusals:?}");
        let (_, _, refusals) = run("8M@0x40100000");
        assert!(matches!(refusals[0].reason, RefusalReason::Placement(PlacementError::FixedMisaligned { .. })), "{refusals:?}");
        let (_, _, refusals) = run("8M@0x10000000");
        assert!(matches!(refusals[0].reason, RefusalReason::Placement(PlacementError::FixedOutsideRam { .. })), "{refusals:?}");
        // A malformed value is reported and ignored: the built-in default applies.
        let (a, log, _) = run("lots");
        assert_eq!(a, [("reserved".to_string(), 0xbc00_0000, 64 << 20)]);
        assert!(log[0].starts_with("cma: ignoring the bootarg: cma=: expected a number"), "{log:?}");
    }

    #[test]
    fn dt_default_pool_with_alloc_ranges() {
        // reserved.dts: linux,cma 32 MiB, alignment 4 MiB, alloc-ranges 0x40000000+512M then
        // 0x1_00000000+1G; in the first range nothing is reserved in 0x5e000000-0x60000000.
        let dt = open(RESERVED, 0x4800_0000);
        let mut m = MemoryMap::from_dt(&dt, PhysAddr(0x4020_0000)..PhysAddr(0x4030_0000)).unwrap();
        let s = CmaSetup::new(&dt, None, &mut m);
        assert_eq!(spans(&s), [("linux,cma", 0x5e00_0000, 32 << 20)]);
        assert_eq!(s.areas[0].origin, AreaOrigin::DtDynamic);
        assert_eq!(s.default, Some(0));
        assert_eq!(s.log, ["cma: Reserved 32 MiB at 0x000000005e000000 (linux,cma, default)"]);
        // cma= replaces the DT default.
        let mut m = MemoryMap::from_dt(&dt, PhysAddr(0x4020_0000)..PhysAddr(0x4030_0000)).unwrap();
        let s = CmaSetup::new(&dt, Some("16M"), &mut m);
        assert_eq!(s.areas.len(), 1);
        assert_eq!(s.areas[0].area.name(), "reserved");
        assert_eq!(s.log[0], "cma: `linux,cma`: bypassed, the cma= bootarg describes the default area instead");
    }

    #[test]
    fn raspberry_pi_4_keeps_cma_below_its_dma_limit() {
        // The downstream Pi 4 tree: 64 MiB in alloc-ranges 0-0x30000000; QEMU's raspi4b sets RAM to
        // 0-0x3c000000. Top-down in the range, clear of the blob at 0x08000000.
        let dt = open(QEMU_RASPI4B, 0x0800_0000);
        let mut m = MemoryMap::from_dt(&dt, PhysAddr(0x20_0000)..PhysAddr(0x30_0000)).unwrap();
        let s = CmaSetup::new(&dt, None, &mut m);
        let a = s.default_area().unwrap();
        assert_eq!((a.name(), a.size()), ("linux,cma", 64 << 20));
        assert!(a.end().as_u64() <= 0x3000_0000, "{a:?}");
        assert_eq!(a.base(), PhysAddr(0x2c00_0000));
    }

    #[test]
    fn raspberry_pi_4_firmware_ram_keeps_cma_in_alloc_ranges() {
        // The downstream Pi 4 tree as the firmware hands it over unfilled (reg = <0 0 0>), RAM
        // from the mailbox as on a 4 GiB board's first bank (0 + 0x3b400000): the 64 MiB area goes
        // top-down inside alloc-ranges <0 0 0x30000000>, not at the top of RAM.
        let dt = open(RPI4B_DOWNSTREAM, 0x0800_0000);
        let fw = Region::new(PhysAddr(0), 0x3b40_0000);
        let mut m = MemoryMap::from_dt_or_firmware(&dt, PhysAddr(0x20_0000)..PhysAddr(0x30_0000), fw).unwrap();
        let s = CmaSetup::new(&dt, None, &mut m);
        assert_eq!(spans(&s), [("linux,cma", 0x2c00_0000, 64 << 20)]);
        assert_eq!(cma_reservations(&m), [(0x2c00_0000, 64 << 20, "linux,cma".to_string())]);
    }

    #[test]
    fn raspberry_pi_5_cma_avoids_the_no_map_firmware() {
        // bcm2712: atf@0 no-map 0 + 512 KiB; linux,cma 64 MiB in alloc-ranges 0-0x40000000; RAM
        // 0-0x28000000. With a small RAM left below the firmware the area must still miss it:
        // a 4 MiB alloc-ranges hole at 0 holds only the atf region and the kernel.
        let dt = open(RPI5B_DOWNSTREAM, 0x0800_0000);
        let mut m = MemoryMap::from_dt(&dt, PhysAddr(0x20_0000)..PhysAddr(0x30_0000)).unwrap();
        let s = CmaSetup::new(&dt, None, &mut m);
        assert_eq!(spans(&s), [("linux,cma", 0x2400_0000, 64 << 20)]);
        let a = s.default_area().unwrap();
        assert!(a.base().as_u64() >= 0x8_0000);
        // The same layout with RAM cut to 68 MiB and the kernel and blob above 64 MiB: the only
        // 64 MiB hole would start at 0, over the no-map firmware, so the area is refused rather
        // than placed there.
        let blob = {
            let mut w = FdtWriter::new();
            w.cells("#address-cells", &[2]).cells("#size-cells", &[2]);
            w.begin("memory@0").str("device_type", "memory").cells("reg", &[0, 0, 0, 0x440_0000]).end();
            w.begin("reserved-memory").cells("#address-cells", &[2]).cells("#size-cells", &[2]).prop("ranges", &[]);
            w.begin("atf@0").prop("no-map", &[]).cells("reg", &[0, 0, 0, 0x8_0000]).end();
            pool(&mut w, "linux,cma", |w| {
                w.cells("size", &hi_lo(64 << 20)).cells("alloc-ranges", &[0, 0, 0, 0x4000_0000]).prop("linux,cma-default", &[]);
            });
            w.end();
            w.finish()
        };
        let dt = open(&blob, 0x410_0000);
        let mut m = MemoryMap::from_dt(&dt, PhysAddr(0x420_0000)..PhysAddr(0x430_0000)).unwrap();
        let s = CmaSetup::new(&dt, None, &mut m);
        assert!(s.areas.iter().all(|a| a.area.base().as_u64() >= 0x8_0000), "{:?}", s.log);
        assert!(s.refusals.iter().any(|r| r.name.as_str() == "linux,cma"), "{:?}", s.log);
    }

    fn pool(w: &mut FdtWriter, name: &str, props: impl FnOnce(&mut FdtWriter)) {
        w.begin(name).str("compatible", "shared-dma-pool").prop("reusable", &[]);
        props(w);
        w.end();
    }

    #[test]
    fn several_areas_devices_and_refusals() {
        let blob = {
            let mut w = FdtWriter::new();
            w.cells("#address-cells", &[2]).cells("#size-cells", &[2]);
            w.begin("memory@40000000").str("device_type", "memory").cells("reg", &[0, 0x4000_0000, 0, 0x4000_0000]).end();
            w.begin("reserved-memory").cells("#address-cells", &[2]).cells("#size-cells", &[2]).prop("ranges", &[]);
            w.begin("fw@43c00000").cells("reg", &[0, 0x43c0_0000, 0, 0x40_0000]).prop("no-map", &[]).end();
            pool(&mut w, "linux,cma", |w| {
                w.cells("size", &hi_lo(48 << 20)).prop("linux,cma-default", &[]);
            });
            pool(&mut w, "low@0", |w| {
                // First range too small (the kernel is in it); in the second, top-down below the no-map.
                w.cells("size", &hi_lo(8 << 20))
                    .cells("alloc-ranges", &[0, 0x4000_0000, 0, 0x40_0000, 0, 0x4300_0000, 0, 0x100_0000])
                    .cells("phandle", &[7]);
            });
            pool(&mut w, "dev@50000000", |w| {
                w.cells("reg", &[0, 0x5000_0000, 0, 0x80_0000]).cells("phandle", &[8]);
            });
            pool(&mut w, "huge", |w| {
                w.cells("size", &hi_lo(2 << 30));
            });
            pool(&mut w, "skew@52100000", |w| {
                w.cells("reg", &[0, 0x5210_0000, 0, 0x40_0000]);
            });
            pool(&mut w, "nomap", |w| {
                w.cells("size", &hi_lo(4 << 20)).prop("no-map", &[]);
            });
            pool(&mut w, "onfw", |w| {
                w.cells("size", &hi_lo(4 << 20)).cells("alloc-ranges", &[0, 0x43c0_0000, 0, 0x40_0000]);
            });
            pool(&mut w, "second-default", |w| {
                w.cells("size", &hi_lo(4 << 20)).prop("linux,cma-default", &[]);
            });
            w.begin("off").str("compatible", "shared-dma-pool").prop("reusable", &[]).cells("size", &hi_lo(4 << 20)).str("status", "disabled").end();
            w.end();
            w.begin("dev-a").str("compatible", "dmakern,test-dma-device").cells("memory-region", &[8]).end();
            w.begin("dev-b").cells("memory-region", &[7, 8]).end();
            w.begin("dev-c").cells("memory-region", &[99]).end();
            w.finish()
        };
        let dt = open(&blob, 0x4800_0000);
        let mut m = map_of(&dt);
        let s = CmaSetup::new(&dt, None, &mut m);
        // The DTB (under 4 KiB) at 0x48000000; 48 MiB placed top-down from 0x80000000.
        assert_eq!(
            spans(&s),
            [
                ("linux,cma", 0x7d00_0000, 48 << 20),
                ("low@0", 0x4340_0000, 8 << 20),
                ("dev@50000000", 0x5000_0000, 8 << 20),
                ("second-default", 0x7cc0_0000, 4 << 20)
            ]
        );
        assert_eq!(s.default, Some(0));
        let origins: Vec<AreaOrigin> = s.areas.iter().map(|a| a.origin).collect();
        assert_eq!(origins, [AreaOrigin::DtDynamic, AreaOrigin::DtDynamic, AreaOrigin::DtFixed, AreaOrigin::DtDynamic]);
        let refused: Vec<(&str, RefusalReason)> = s.refusals.iter().map(|r| (r.name.as_str(), r.reason)).collect();
        assert_eq!(refused.len(), 4, "{refused:?}");
        assert!(matches!(refused[0], ("huge", RefusalReason::Placement(PlacementError::LargerThanRam { .. }))));
        assert!(matches!(refused[1], ("skew@52100000", RefusalReason::RegMisaligned { .. })));
        assert!(matches!(refused[2], ("nomap", RefusalReason::NoMap)));
        assert!(matches!(refused[3], ("onfw", RefusalReason::Placement(PlacementError::NoFitInAllocRanges { .. }))));
        // Dynamic areas are recorded as CMA; the reg area stays a /reserved-memory reservation.
        assert_eq!(
            cma_reservations(&m),
            [
                (0x4340_0000, 8 << 20, "low@0".to_string()),
                (0x7cc0_0000, 4 << 20, "second-default".to_string()),
                (0x7d00_0000, 48 << 20, "linux,cma".to_string())
            ]
        );
        // Devices: dev-a and dev-b (first phandle) own their pools; dev-c's phandle dangles.
        let node = |p: &str| dt.find_node(p).unwrap();
        assert_eq!(s.area_for_device(&dt, &node("/dev-a")).unwrap().map(CmaArea::name), Some("dev@50000000"));
        assert_eq!(s.area_for_device(&dt, &node("/dev-b")).unwrap().map(CmaArea::name), Some("low@0"));
        assert!(s.area_for_device(&dt, &node("/dev-c")).is_err());
        assert_eq!(s.area_for_device(&dt, &node("/memory@40000000")).unwrap().map(CmaArea::name), None);
        assert_eq!(s.devices, [DeviceBinding { device: node("/dev-a").offset(), area: 2 }, DeviceBinding { device: node("/dev-b").offset(), area: 1 }]);
        let expect_log = [
            "cma: Reserved 48 MiB at 0x000000007d000000 (linux,cma, default)",
            "cma: Reserved 8 MiB at 0x0000000043400000 (low@0)",
            "cma: Reserved 8 MiB at 0x0000000050000000 (dev@50000000)",
            "cma: area `huge` refused: CMA area of 2048 MiB is larger than RAM (1024 MiB); booting without it",
            "cma: area `skew@52100000` refused: reg 0x52100000 + 0x400000 is not aligned to the CMA minimum of 4 MiB; booting without it",
            "cma: area `nomap` refused: reusable and no-map together (a CMA area must be mapped); booting without it",
            "cma: area `onfw` refused: no free 4 MiB range for a CMA area in its alloc-ranges; booting without it",
            "cma: Reserved 4 MiB at 0x000000007cc00000 (second-default)",
            "cma: `second-default`: a second linux,cma-default node; `linux,cma` stays the default",
            "cma: /dev-a owns area `dev@50000000`",
            "cma: /dev-b owns area `low@0`",
        ];
        assert_eq!(s.log[..expect_log.len()], expect_log);
        assert!(s.log[expect_log.len()].starts_with("cma: /dev-c: memory-region ignored: "), "{:?}", s.log);
        assert_eq!(s.area_containing(PhysAddr(0x5000_0000), 2048).map(CmaArea::name), Some("dev@50000000"));
        assert_eq!(s.area_containing(PhysAddr(0x5000_0000), 2049).map(CmaArea::name), None);
        assert_eq!(s.area_named("low@0").map(CmaArea::base), Some(PhysAddr(0x4340_0000)));
    }

    #[test]
    fn devices_are_listed_only_when_an_area_came_from_a_node() {
        let blob = {
            let mut w = FdtWriter::new();
            w.cells("#address-cells", &[2]).cells("#size-cells", &[2]);
            w.begin("memory@40000000").str("device_type", "memory").cells("reg", &[0, 0x4000_0000, 0, 0x4000_0000]).end();
            w.begin("reserved-memory").cells("#address-cells", &[2]).cells("#size-cells", &[2]).prop("ranges", &[]);
            w.begin("fw@43c00000").cells("reg", &[0, 0x43c0_0000, 0, 0x40_0000]).prop("no-map", &[]).cells("phandle", &[5]).end();
            w.end();
            w.begin("dev-a").cells("memory-region", &[5]).end();
            w.begin("dev-c").cells("memory-region", &[99]).end();
            w.finish()
        };
        let dt = open(&blob, 0x4800_0000);
        let mut m = map_of(&dt);
        let s = CmaSetup::new(&dt, None, &mut m);
        assert_eq!(spans(&s), [("reserved", 0x7c00_0000, 64 << 20)]);
        // No area can be owned, so the devices are not looked at: dev-c's dangling phandle is
        // reported only when that device is set up.
        assert!(s.devices.is_empty());
        assert_eq!(s.log, ["cma: Reserved 64 MiB at 0x000000007c000000 (reserved, default)"]);
        let node = |p: &str| dt.find_node(p).unwrap();
        assert!(s.area_for_device(&dt, &node("/dev-c")).is_err());
        assert!(s.area_for_device(&dt, &node("/dev-a")).unwrap().is_none());
    }

    #[test]
    fn refused_dt_default_falls_back_to_the_built_in_one() {
        let blob = virt_1g(|w| {
            pool(w, "linux,cma", |w| {
                w.cells("size", &hi_lo(4 << 30)).prop("linux,cma-default", &[]);
            })
        });
        let dt = open(&blob, 0x4800_0000);
        let mut m = map_of(&dt);
        let s = CmaSetup::new(&dt, None, &mut m);
        assert_eq!(spans(&s), [("reserved", 0x7c00_0000, 64 << 20)]);
        assert_eq!(s.refusals.len(), 1);
        assert_eq!(s.refusals[0].name.as_str(), "linux,cma");
    }

    #[test]
    fn report_lists_every_area() {
        let dt = open(QEMU_VIRT_A53_128M, 0x4400_0000);
        let mut m = map_of(&dt);
        let s = CmaSetup::new(&dt, Some("8M"), &mut m);
        let a = s.default_area().unwrap();
        let p = a.alloc(300, 9).unwrap();
        let mut out = String::new();
        s.write_report(&mut out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("area "), "{out}");
        // 8 MiB = 8192 KiB, 300 pages used = 1200 KiB.
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(row[..5], ["reserved", "0x0000000047800000", "8192", "1200", "6992"]);
        assert!(lines[2].starts_with("cma reserved: 2048 pages at 0x47800000, 8 pages per character"), "{out}");
        // 300 pages from the start: 37 full characters and one partly used, then free.
        assert_eq!(&lines[3][19..], format!("{}+{}", "#".repeat(37), ".".repeat(26)));
        assert!(a.release_pages(p, 300));
        let empty = CmaSetup::default();
        let mut out = String::new();
        empty.write_report(&mut out).unwrap();
        assert_eq!(out, "cma: no areas\n");
    }
}
