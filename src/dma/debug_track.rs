//! The bookkeeping of dma-debug: a [`Tracker`] of every live streaming mapping and coherent
//! allocation, per device, and the checks that catch a driver misusing the DMA API (the role of
//! Linux's kernel/dma/debug.c). Each check returns a [`Report`]; this module neither prints nor
//! locks nor holds global state, so that it can be tested on the host. The DMA API keeps one
//! `Tracker` behind a lock, calls it around every operation (an unmap or free that gets a report
//! was not recorded and should not be done), and prints the reports.
//!
//! What is checked:
//! - a new from-device or bidirectional mapping sharing a CPU cache line with another live one
//!   (of any device): the cache maintenance done for one transfer can destroy the other's data;
//! - unmaps of addresses never mapped or already unmapped, and unmaps whose size, direction or
//!   kind (single, page, scatter-gather) differ from the mapping's;
//! - mappings unmapped without the driver ever checking them for a mapping error;
//! - syncs not inside one live mapping of the device, or in a direction the mapping was not
//!   made for;
//! - frees of coherent memory with the wrong address or size;
//! - records still live when their device is torn down (leaks).
//!
//! Records are keyed by (device id, bus address, sequence number): two devices may use the same
//! bus address (each behind its own IOMMU domain), and one device may map the same buffer twice
//! (without an IOMMU both get the same bus address), so the sequence number keeps both records.
//!
//! Range questions (which mappings share this cache line, which mapping of this device contains
//! this bus range, who owns this physical byte) are answered by two coverage maps, one over
//! physical cache lines and one over each device's bus addresses. A coverage map splits its
//! address space into disjoint spans, each listing the records that cover all of it, with
//! neighbouring spans always listing different records; so it holds at most two spans per live
//! record and a lookup costs a logarithmic search plus the spans it returns, never a scan of
//! every record.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::fmt;
use core::ops::Bound;
use core::panic::Location;

use crate::dma::busmap::DmaAddr;
use crate::dma::maint::Direction;
use crate::dma::{Device, DeviceName};
use crate::mm::addr::{align_down, PhysAddr};

/// Where a DMA API call was made: the API functions are `#[track_caller]`.
pub type Caller = &'static Location<'static>;

/// How many successful unmaps a tracker remembers, to tell an unmap of an address unmapped a
/// moment ago (a double unmap) from one of an address never mapped.
pub const UNMAP_HISTORY: usize = 64;

/// Which API made a streaming mapping; it must be unmapped by the matching one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapKind {
    /// `map_single` / `map_phys`: a buffer given by address.
    Single,
    /// `map_page`: a page and an offset into it.
    Page,
    /// One segment of a `map_sg` scatter-gather list.
    Sg,
}

impl fmt::Display for MapKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapKind::Single => "single",
            MapKind::Page => "page",
            MapKind::Sg => "scatter-gather",
        })
    }
}

/// A streaming mapping as [`Tracker::add_mapping`] receives it.
#[derive(Clone, Copy, Debug)]
pub struct NewMapping {
    pub phys: PhysAddr,
    pub dma: DmaAddr,
    pub size: u64,
    pub dir: Direction,
    pub kind: MapKind,
    /// Whether the mapping's error has been checked already: true for APIs whose callers cannot
    /// ignore a failure (a `Result`), false for those that return an address the driver must
    /// test (Linux's `dma_mapping_error`), which [`Tracker::mark_checked`] later records.
    pub checked: bool,
    pub caller: Caller,
}

/// A live streaming mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub device: DeviceName,
    pub dma: DmaAddr,
    pub phys: PhysAddr,
    pub size: u64,
    pub dir: Direction,
    pub kind: MapKind,
    /// Whether the driver checked the mapping for an error (see [`NewMapping::checked`]).
    pub checked: bool,
    /// Where it was mapped.
    pub caller: Caller,
}

impl Entry {
    /// The last bus address of the mapping. Never saturates for a recorded mapping: the tracker
    /// only records ranges that do not wrap.
    fn bus_last(&self) -> u64 {
        self.dma.0.saturating_add(self.size.saturating_sub(1))
    }

    fn phys_last(&self) -> u64 {
        self.phys.0.saturating_add(self.size.saturating_sub(1))
    }
}

/// A live coherent allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub device: DeviceName,
    pub dma: DmaAddr,
    /// The CPU (virtual) address the allocation was returned at.
    pub cpu: u64,
    pub size: u64,
    /// Where it was allocated.
    pub caller: Caller,
}

/// The record a report is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    Mapping(Entry),
    Coherent(Allocation),
}

impl Record {
    /// Where the record was made.
    pub fn caller(&self) -> Caller {
        match self {
            Record::Mapping(e) => e.caller,
            Record::Coherent(a) => a.caller,
        }
    }
}

/// The operation a report is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Map,
    Unmap,
    SyncForCpu,
    SyncForDevice,
    FreeCoherent,
    Teardown,
    /// A CPU load or store the ownership guard caught (`dma_debug=guard`).
    CpuAccess,
}

/// What is wrong. See [`Report`] for which fields each kind fills in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportKind {
    /// A new from-device or bidirectional mapping shares a cache line with another live one
    /// (`record`). The new mapping is recorded all the same.
    CacheLineOverlap,
    /// A mapping of zero bytes, or whose physical or bus range wraps the address space. It is not
    /// recorded.
    BadMapping,
    /// Unmap of a bus address at which the device has no live mapping and did not unmap one
    /// recently. `record`: a live mapping of the device containing that address, if any.
    NeverMapped,
    /// Unmap of a bus address the device unmapped recently (`record`, `unmapped_at`) and has not
    /// mapped again.
    DoubleUnmap,
    /// Unmap with a size other than the mapping's (`record`).
    WrongSize,
    /// Unmap with a direction other than the mapping's (`record`).
    WrongDirection,
    /// Unmap through another API than the one that mapped (`record`): `unmap_page` of a single
    /// mapping, `unmap_sg` of a page mapping...
    WrongKind,
    /// A mapping (`record`) was unmapped, correctly, but the driver never checked it for a
    /// mapping error.
    ErrorNotChecked,
    /// A sync of a range that is empty, wraps, or is not inside one live mapping of the device.
    /// `record`: the device's live mapping starting nearest at or below the range, otherwise
    /// the nearest above it, if the device has any.
    SyncOutsideMapping,
    /// A sync in a direction other than the mapping's (`record`), which is not bidirectional.
    SyncWrongDirection,
    /// A free of coherent memory at a bus address where the device has no live allocation
    /// (`record` is `None`), or with a CPU address other than the allocation's (`record`).
    FreeWrongAddress,
    /// A free of coherent memory with a size other than the allocation's (`record`).
    FreeWrongSize,
    /// A record still live when its device was torn down.
    Leak,
    /// The CPU touched a page of a streaming buffer (`record`) while the device owned it; `phys`
    /// is the address, `cpu` the program counter. Found by the ownership guard.
    CpuAccessWhileDeviceOwns,
    /// Bytes of a to-device buffer (`record`) in a page it shares with other data changed while
    /// the device owned it: the CPU wrote them. `phys` is the first changed byte. Found by the
    /// ownership guard's edge check at unmap or sync for the CPU.
    EdgeChangedWhileDeviceOwns,
}

/// One misuse of the DMA API, found by a [`Tracker`] check. `Display` gives one line for a
/// kernel log, naming the device, the addresses and where the calls were made.
///
/// `dma` and `size` are the operation's, except for [`ReportKind::Leak`] where they are the
/// leaked record's. `dir`, `map_kind` and `phys` are the operation's when it has them (`phys`:
/// a new mapping's physical address; for a leak, the record's); `cpu` is the CPU address a
/// coherent free gave, or a leaked allocation's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub kind: ReportKind,
    pub op: Op,
    /// The device the operation was for.
    pub device: DeviceName,
    pub dma: DmaAddr,
    pub size: u64,
    pub dir: Option<Direction>,
    pub map_kind: Option<MapKind>,
    pub phys: Option<PhysAddr>,
    pub cpu: Option<u64>,
    /// Where the operation was called (for a leak: where the device was torn down).
    pub caller: Caller,
    /// Where `record` was made (mapped or allocated); the same as `record`'s caller.
    pub mapped_at: Option<Caller>,
    /// For [`ReportKind::DoubleUnmap`]: where the mapping was unmapped the first time.
    pub unmapped_at: Option<Caller>,
    /// The record the report is about: the mapping or allocation operated on, or for
    /// [`ReportKind::CacheLineOverlap`] the other mapping (which may belong to another device).
    pub record: Option<Record>,
}

impl Report {
    fn new(kind: ReportKind, op: Op, dev: &Device, dma: DmaAddr, size: u64, caller: Caller) -> Report {
        Report::named(kind, op, DeviceName::new(dev.name()), dma, size, caller)
    }

    fn named(kind: ReportKind, op: Op, device: DeviceName, dma: DmaAddr, size: u64, caller: Caller) -> Report {
        Report {
            kind,
            op,
            device,
            dma,
            size,
            dir: None,
            map_kind: None,
            phys: None,
            cpu: None,
            caller,
            mapped_at: None,
            unmapped_at: None,
            record: None,
        }
    }

    fn streaming(
        kind: ReportKind,
        op: Op,
        dev: &Device,
        dma: DmaAddr,
        size: u64,
        dir: Direction,
        caller: Caller,
    ) -> Report {
        Report { dir: Some(dir), ..Report::new(kind, op, dev, dma, size, caller) }
    }

    fn about(self, record: Record) -> Report {
        Report { mapped_at: Some(record.caller()), record: Some(record), ..self }
    }

    fn boxed(self) -> Box<Report> {
        Box::new(self)
    }

    /// A finding of the ownership guard about the live mapping `entry` (of the device it names): `kind` is
    /// [`ReportKind::CpuAccessWhileDeviceOwns`] (`op` [`Op::CpuAccess`], `pc` the faulting
    /// instruction) or [`ReportKind::EdgeChangedWhileDeviceOwns`] (`op` the unmap or sync that
    /// found it). `phys` is the byte concerned; `caller` the call that found it, or for a fault
    /// the mapping's own caller.
    pub fn guard(kind: ReportKind, op: Op, entry: &Entry, phys: PhysAddr, pc: Option<u64>, caller: Caller) -> Report {
        Report {
            dir: Some(entry.dir),
            map_kind: Some(entry.kind),
            phys: Some(phys),
            cpu: pc,
            ..Report::named(kind, op, entry.device, entry.dma, entry.size, caller)
        }
        .about(Record::Mapping(*entry))
    }
}

/// Writes "D + S".
struct BusRange(DmaAddr, u64);

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} + {:#x}", self.0, self.1)
    }
}

/// Writes " (KIND)" for an unmap, if the kind is known.
struct Via(Option<MapKind>);

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(k) => write!(f, " ({k})"),
            None => Ok(()),
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dev = &self.device;
        let range = BusRange(self.dma, self.size);
        let at = self.caller;
        let via = Via(self.map_kind);
        let sync = if self.op == Op::SyncForCpu { "cpu" } else { "device" };
        let mapping = match self.record {
            Some(Record::Mapping(e)) => Some(e),
            _ => None,
        };
        let alloc = match self.record {
            Some(Record::Coherent(a)) => Some(a),
            _ => None,
        };
        write!(f, "{dev}: ")?;
        match (self.kind, mapping, alloc) {
            (ReportKind::CacheLineOverlap, Some(o), _) => write!(
                f,
                "{} {} mapping of phys {} + {:#x} (bus {}) at {at} shares a CPU cache line with the live \
                 {} {} mapping of phys {} + {:#x} for {} made at {}: cache maintenance for one can \
                 destroy data the other's device wrote",
                OptDisplay(self.dir),
                OptDisplay(self.map_kind),
                OptDisplay(self.phys),
                self.size,
                self.dma,
                o.dir,
                o.kind,
                o.phys,
                o.size,
                o.device,
                o.caller,
            ),
            (ReportKind::BadMapping, _, _) => write!(
                f,
                "{} mapping of phys {} + {:#x} (bus {}) at {at} is empty or wraps the address space; \
                 it is not tracked",
                OptDisplay(self.map_kind),
                OptDisplay(self.phys),
                self.size,
                self.dma,
            ),
            (ReportKind::NeverMapped, inside, _) => {
                write!(f, "unmap{via} of {range} at {at}, but the device has no live mapping at {}", self.dma)?;
                match inside {
                    Some(e) => write!(
                        f,
                        " (the address lies inside its mapping of {} made at {})",
                        BusRange(e.dma, e.size),
                        e.caller
                    ),
                    None => Ok(()),
                }
            }
            (ReportKind::DoubleUnmap, Some(e), _) => write!(
                f,
                "unmap{via} of {range} at {at}, but that mapping (made at {}) was already unmapped at {}",
                e.caller,
                OptDisplay(self.unmapped_at),
            ),
            (ReportKind::WrongSize, Some(e), _) => {
                write!(f, "unmap{via} of {range} with the wrong size (mapped {:#x} at {}) at {at}", e.size, e.caller)
            }
            (ReportKind::WrongDirection, Some(e), _) => write!(
                f,
                "unmap{via} of {range} with the wrong direction {} (mapped {} at {}) at {at}",
                OptDisplay(self.dir),
                e.dir,
                e.caller
            ),
            (ReportKind::WrongKind, Some(e), _) => {
                write!(f, "unmap{via} of {range} through the wrong API (mapped as {} at {}) at {at}", e.kind, e.caller)
            }
            (ReportKind::ErrorNotChecked, Some(e), _) => write!(
                f,
                "unmap{via} of {range} at {at} of a mapping made at {} whose mapping error the \
                 driver never checked (dma_mapping_error)",
                e.caller
            ),
            (ReportKind::SyncOutsideMapping, nearest, _) => {
                write!(
                    f,
                    "sync for {sync} of {range} ({}) at {at} is not inside a live mapping of the device",
                    OptDisplay(self.dir)
                )?;
                match nearest {
                    Some(e) => write!(f, " (nearest: {} made at {})", BusRange(e.dma, e.size), e.caller),
                    None => f.write_str(" (it has none)"),
                }
            }
            (ReportKind::SyncWrongDirection, Some(e), _) => write!(
                f,
                "sync for {sync} of {range} with the wrong direction {} (mapped {} at {}) at {at}",
                OptDisplay(self.dir),
                e.dir,
                e.caller
            ),
            (ReportKind::FreeWrongAddress, _, Some(a)) => write!(
                f,
                "free of coherent memory at {range} with the wrong CPU address {} (allocated at CPU \
                 address {:#x} at {}) at {at}",
                OptHex(self.cpu),
                a.cpu,
                a.caller
            ),
            (ReportKind::FreeWrongAddress, _, None) => write!(
                f,
                "free of coherent memory at {range} at {at}, but the device has no live coherent \
                 allocation at {}",
                self.dma
            ),
            (ReportKind::FreeWrongSize, _, Some(a)) => write!(
                f,
                "free of coherent memory at {range} with the wrong size (allocated {:#x} at {}) at {at}",
                a.size, a.caller
            ),
            (ReportKind::Leak, Some(e), _) => write!(
                f,
                "leaked {} {} mapping of {range} (phys {}) made at {}, still live when the device was \
                 torn down at {at}",
                e.dir, e.kind, e.phys, e.caller
            ),
            (ReportKind::Leak, _, Some(a)) => write!(
                f,
                "leaked coherent allocation {range} (CPU address {:#x}) made at {}, still live when \
                 the device was torn down at {at}",
                a.cpu, a.caller
            ),
            (ReportKind::CpuAccessWhileDeviceOwns, Some(e), _) => write!(
                f,
                "CPU access to phys {} (pc {}) while the device owns it: {} {} mapping of {range} \
                 (phys {}) made at {}",
                OptDisplay(self.phys),
                OptHex(self.cpu),
                e.dir,
                e.kind,
                e.phys,
                e.caller
            ),
            (ReportKind::EdgeChangedWhileDeviceOwns, Some(e), _) => write!(
                f,
                "phys {} of the {} {} mapping of {range} made at {} changed while the device owned \
                 it (found at {at}): the CPU wrote to a buffer the device was reading",
                OptDisplay(self.phys),
                e.dir,
                e.kind,
                e.caller
            ),
            // A kind without the record it needs: only a report built by hand can get here.
            (kind, _, _) => write!(f, "{kind:?} in {:?} of {range} at {at}", self.op),
        }
    }
}

/// Displays an optional value, or "?" when it is not known.
struct OptDisplay<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for OptDisplay<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("?"),
        }
    }
}

/// Displays an optional address in hex, or "?" when it is not known.
struct OptHex(Option<u64>);

impl fmt::Display for OptHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v:#x}"),
            None => f.write_str("?"),
        }
    }
}

/// What an unmap, once checked, removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Removed {
    /// The mapping, as it was.
    pub entry: Entry,
    /// [`ReportKind::ErrorNotChecked`] if the driver never checked the mapping for an error: the
    /// unmap itself is correct and has been recorded.
    pub report: Option<Report>,
}

/// A record key: (device id, bus address, sequence number).
type Key = (u32, u64, u64);

/// The keys of every record of device `id` at bus address `dma`.
fn keys_at(id: u32, dma: u64) -> core::ops::RangeInclusive<Key> {
    (id, dma, 0)..=(id, dma, u64::MAX)
}

/// The last byte of `start .. start + size`; `None` if it is empty or wraps.
fn last_byte(start: u64, size: u64) -> Option<u64> {
    start.checked_add(size.checked_sub(1)?)
}

/// Whether the device may write the buffer: only such mappings get their cache lines
/// invalidated, which is what makes sharing a line dangerous.
fn device_writes(dir: Direction) -> bool {
    dir != Direction::ToDevice
}

/// A set of records covering address ranges, in several address spaces, as disjoint spans (see
/// the module documentation). Invariants: spans of a space do not overlap; each lists at least
/// one record, in key order; two spans that touch (one ends where the next begins) list
/// different records; every span lies inside each of its records' ranges and each record's
/// range is exactly covered by the spans that list it.
#[derive(Default)]
struct Coverage {
    /// (space, first address) -> span.
    spans: BTreeMap<(u32, u64), Span>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Span {
    /// Last address, inclusive, so that a span may end at `u64::MAX`.
    last: u64,
    owners: Vec<Key>,
}

impl Coverage {
    /// The span containing `addr`, with its first address.
    fn at(&self, space: u32, addr: u64) -> Option<(u64, &Span)> {
        let (&(s, first), span) = self.spans.range(..=(space, addr)).next_back()?;
        (s == space && span.last >= addr).then_some((first, span))
    }

    /// The spans meeting `first ..= last`, in address order.
    fn meeting(&self, space: u32, first: u64, last: u64) -> impl Iterator<Item = &Span> {
        let head = self.at(space, first).filter(|&(start, _)| start < first).map(|(_, s)| s);
        head.into_iter().chain(self.spans.range((space, first)..=(space, last)).map(|(_, s)| s))
    }

    /// Makes a span boundary at `addr`: a span containing `addr` and starting below it becomes
    /// two.
    fn split_at(&mut self, space: u32, addr: u64) {
        let Some((start, tail)) = self.at(space, addr).map(|(s, span)| (s, span.clone())) else {
            return;
        };
        if start == addr {
            return;
        }
        if let Some(head) = self.spans.get_mut(&(space, start)) {
            // start < addr, so addr - 1 does not underflow.
            head.last = addr - 1;
        }
        self.spans.insert((space, addr), tail);
    }

    /// Joins the spans either side of `addr` if they touch and list the same records.
    fn merge_at(&mut self, space: u32, addr: u64) {
        let Some(before) = addr.checked_sub(1) else {
            return;
        };
        let Some(next) = self.spans.get(&(space, addr)) else {
            return;
        };
        let Some((prev_start, prev)) = self.at(space, before) else {
            return;
        };
        if prev.owners != next.owners {
            return;
        }
        let last = next.last;
        self.spans.remove(&(space, addr));
        if let Some(prev) = self.spans.get_mut(&(space, prev_start)) {
            prev.last = last;
        }
    }

    /// Records that `key` covers `first ..= last`, which it did not cover before.
    fn insert(&mut self, space: u32, first: u64, last: u64, key: Key) {
        self.split_at(space, first);
        if let Some(after) = last.checked_add(1) {
            self.split_at(space, after);
        }
        // Add the key to the spans inside the range and fill the gaps between them with new
        // spans. Both sides of every boundary inside the range gain the key, and the ones at its
        // edges separate spans with and without it, so no two touching spans become equal.
        let mut pos = first;
        loop {
            let next = self.spans.range_mut((space, pos)..=(space, last)).next().map(|(&(_, start), span)| {
                if let Err(i) = span.owners.binary_search(&key) {
                    span.owners.insert(i, key);
                }
                (start, span.last)
            });
            let Some((start, span_last)) = next else {
                self.spans.insert((space, pos), Span { last, owners: alloc::vec![key] });
                return;
            };
            if start > pos {
                self.spans.insert((space, pos), Span { last: start - 1, owners: alloc::vec![key] });
            }
            if span_last >= last {
                return;
            }
            pos = span_last + 1;
        }
    }

    /// Records that `key` no longer covers `first ..= last`, the range it was inserted with.
    fn remove(&mut self, space: u32, first: u64, last: u64, key: Key) {
        let mut pos = first;
        while let Some((&(_, start), span)) = self.spans.range_mut((space, pos)..=(space, last)).next() {
            if let Ok(i) = span.owners.binary_search(&key) {
                span.owners.remove(i);
            }
            let span_last = span.last;
            if span.owners.is_empty() {
                self.spans.remove(&(space, start));
            }
            if span_last >= last {
                break;
            }
            pos = span_last + 1;
        }
        // Inside the range both sides of each boundary lost the key and still differ; only the
        // edges may now separate equal spans.
        self.merge_at(space, first);
        if let Some(after) = last.checked_add(1) {
            self.merge_at(space, after);
        }
    }
}

/// A successful unmap, kept to recognise a second unmap of the same address.
#[derive(Clone, Copy)]
struct Unmapped {
    dev: u32,
    entry: Entry,
    at: Caller,
}

/// Every live streaming mapping and coherent allocation, per device, and the checks on them.
/// See the module documentation.
pub struct Tracker {
    /// Cache line size in bytes, a power of two.
    line: u64,
    /// Sequence number of the last record made (so that keys never repeat).
    seq: u64,
    mappings: BTreeMap<Key, Entry>,
    /// Physical cache lines, in one space (0), covered by the mappings.
    lines: Coverage,
    /// Bus addresses, in one space per device (its id), covered by the mappings.
    buses: Coverage,
    coherent: BTreeMap<Key, Allocation>,
    /// The last [`UNMAP_HISTORY`] successful unmaps, oldest first.
    unmapped: VecDeque<Unmapped>,
}

/// The space of [`Tracker::lines`].
const PHYS_SPACE: u32 = 0;

impl Tracker {
    /// An empty tracker for CPU cache lines of `cache_line` bytes (the architecture's largest
    /// line size that maintenance can affect). A size that is not a power of two is rounded up
    /// to one (0 to 1).
    pub fn new(cache_line: u64) -> Tracker {
        Tracker {
            line: cache_line.max(1).checked_next_power_of_two().unwrap_or(1 << 63),
            seq: 0,
            mappings: BTreeMap::new(),
            lines: Coverage::default(),
            buses: Coverage::default(),
            coherent: BTreeMap::new(),
            unmapped: VecDeque::with_capacity(UNMAP_HISTORY),
        }
    }

    /// The cache line size the tracker works with.
    pub fn cache_line(&self) -> u64 {
        self.line
    }

    fn next_key(&mut self, dev: u32, dma: u64) -> Key {
        self.seq = self.seq.wrapping_add(1);
        (dev, dma, self.seq)
    }

    /// The first and last byte of the cache lines `phys .. phys + size` touches, for a range
    /// that does not wrap.
    fn line_range(&self, phys: u64, size: u64) -> (u64, u64) {
        let last = phys.saturating_add(size.saturating_sub(1));
        (align_down(phys, self.line), last | (self.line - 1))
    }

    /// Records a new streaming mapping of `dev`. An error is a report about a mapping that was
    /// recorded nonetheless ([`ReportKind::CacheLineOverlap`]: the new mapping lets the device
    /// write, and a cache line it touches is also touched by another live mapping that lets its
    /// device write), except [`ReportKind::BadMapping`] (zero size, or the physical or bus range
    /// wraps): such a mapping is not recorded.
    pub fn add_mapping(&mut self, dev: &Device, m: NewMapping) -> Result<(), Box<Report>> {
        let report = Report {
            map_kind: Some(m.kind),
            phys: Some(m.phys),
            ..Report::streaming(ReportKind::BadMapping, Op::Map, dev, m.dma, m.size, m.dir, m.caller)
        };
        let (Some(_), Some(bus_last)) = (last_byte(m.phys.0, m.size), last_byte(m.dma.0, m.size)) else {
            return Err(report.boxed());
        };
        let (first_line, last_line) = self.line_range(m.phys.0, m.size);
        let overlap = if device_writes(m.dir) { self.writer_meeting(first_line, last_line) } else { None };
        let id = dev.id();
        let key = self.next_key(id, m.dma.0);
        let entry = Entry {
            device: DeviceName::new(dev.name()),
            dma: m.dma,
            phys: m.phys,
            size: m.size,
            dir: m.dir,
            kind: m.kind,
            checked: m.checked,
            caller: m.caller,
        };
        self.mappings.insert(key, entry);
        self.lines.insert(PHYS_SPACE, first_line, last_line, key);
        self.buses.insert(id, m.dma.0, bus_last, key);
        match overlap {
            Some(other) => {
                Err(Report { kind: ReportKind::CacheLineOverlap, ..report }.about(Record::Mapping(other)).boxed())
            }
            None => Ok(()),
        }
    }

    /// The first live mapping, in address order of the lines, that lets its device write and
    /// touches the lines `first ..= last`; among several on the same line, the one with the
    /// lowest key.
    fn writer_meeting(&self, first: u64, last: u64) -> Option<Entry> {
        self.lines
            .meeting(PHYS_SPACE, first, last)
            .find_map(|span| span.owners.iter().filter_map(|k| self.mappings.get(k)).find(|e| device_writes(e.dir)))
            .copied()
    }

    /// Records that the driver checked the mapping of `dev` at `dma` for an error. If several
    /// are live there, the oldest not yet checked is marked; unknown addresses are ignored (the
    /// driver may check a failed mapping, which was never recorded).
    pub fn mark_checked(&mut self, dev: &Device, dma: DmaAddr) {
        if let Some(e) = self.mappings.range_mut(keys_at(dev.id(), dma.0)).map(|(_, e)| e).find(|e| !e.checked) {
            e.checked = true;
        }
    }

    /// Checks and records the unmap of the mapping of `dev` starting at `dma`. If several are
    /// live there (one buffer mapped twice), the oldest one matching `size`, `dir` and `kind`
    /// is removed, or, if none matches, the oldest one is reported on.
    ///
    /// `Ok`: the mapping is gone; [`Removed::report`] is [`ReportKind::ErrorNotChecked`] if the
    /// driver never checked it for an error. `Err`: nothing was removed and the caller should not
    /// unmap; the report is [`ReportKind::NeverMapped`], [`ReportKind::DoubleUnmap`], or, for a
    /// live mapping, [`ReportKind::WrongKind`], [`ReportKind::WrongSize`] or
    /// [`ReportKind::WrongDirection`], the first of these that applies.
    pub fn remove_mapping(
        &mut self,
        dev: &Device,
        dma: DmaAddr,
        size: u64,
        dir: Direction,
        kind: MapKind,
        caller: Caller,
    ) -> Result<Removed, Box<Report>> {
        let id = dev.id();
        let report = Report {
            map_kind: Some(kind),
            ..Report::streaming(ReportKind::NeverMapped, Op::Unmap, dev, dma, size, dir, caller)
        };
        let mut live = self.mappings.range(keys_at(id, dma.0));
        let oldest = live.clone().next().map(|(k, e)| (*k, *e));
        let exact = live.find(|(_, e)| e.size == size && e.dir == dir && e.kind == kind).map(|(k, e)| (*k, *e));
        let Some((key, entry)) = exact.or(oldest) else {
            return Err(self.not_live(report, id).boxed());
        };
        let wrong = if entry.kind != kind {
            Some(ReportKind::WrongKind)
        } else if entry.size != size {
            Some(ReportKind::WrongSize)
        } else if entry.dir != dir {
            Some(ReportKind::WrongDirection)
        } else {
            None
        };
        if let Some(kind) = wrong {
            return Err(Report { kind, ..report }.about(Record::Mapping(entry)).boxed());
        }
        self.forget_mapping(key, &entry);
        if self.unmapped.len() >= UNMAP_HISTORY {
            self.unmapped.pop_front();
        }
        self.unmapped.push_back(Unmapped { dev: id, entry, at: caller });
        let late = (!entry.checked)
            .then(|| Report { kind: ReportKind::ErrorNotChecked, ..report }.about(Record::Mapping(entry)));
        Ok(Removed { entry, report: late })
    }

    /// The report for an unmap of an address where device `id` has no live mapping.
    fn not_live(&self, report: Report, id: u32) -> Report {
        let dma = report.dma.0;
        if let Some(u) = self.unmapped.iter().rev().find(|u| u.dev == id && u.entry.dma.0 == dma) {
            return Report { kind: ReportKind::DoubleUnmap, unmapped_at: Some(u.at), ..report }
                .about(Record::Mapping(u.entry));
        }
        match self.covering(id, dma) {
            Some(inside) => report.about(Record::Mapping(*inside)),
            None => report,
        }
    }

    /// The live mappings of device `id` containing bus address `dma`, in key order.
    fn covering_all(&self, id: u32, dma: u64) -> impl Iterator<Item = &Entry> {
        let owners = self.buses.at(id, dma).map(|(_, span)| span.owners.as_slice()).unwrap_or(&[]);
        owners.iter().filter_map(|k| self.mappings.get(k))
    }

    fn covering(&self, id: u32, dma: u64) -> Option<&Entry> {
        self.covering_all(id, dma).next()
    }

    fn forget_mapping(&mut self, key: Key, entry: &Entry) {
        let (first_line, last_line) = self.line_range(entry.phys.0, entry.size);
        self.lines.remove(PHYS_SPACE, first_line, last_line, key);
        self.buses.remove(key.0, entry.dma.0, entry.bus_last(), key);
        self.mappings.remove(&key);
    }

    /// Checks a sync of `dma .. dma + size` for the CPU (`for_cpu`) or for the device: the range
    /// must lie inside one live streaming mapping of `dev`
    /// ([`ReportKind::SyncOutsideMapping`] otherwise, also for an empty or wrapping range), and
    /// `dir` must be that mapping's direction unless the mapping is bidirectional
    /// ([`ReportKind::SyncWrongDirection`]). When several mappings contain the range, one
    /// whose direction fits is enough.
    pub fn check_sync(
        &self,
        dev: &Device,
        dma: DmaAddr,
        size: u64,
        dir: Direction,
        for_cpu: bool,
        caller: Caller,
    ) -> Result<(), Box<Report>> {
        let id = dev.id();
        let op = if for_cpu { Op::SyncForCpu } else { Op::SyncForDevice };
        let report = Report::streaming(ReportKind::SyncOutsideMapping, op, dev, dma, size, dir, caller);
        let mut misdirected = None;
        if let Some(last) = last_byte(dma.0, size) {
            for e in self.covering_all(id, dma.0).filter(|e| e.bus_last() >= last) {
                if e.dir == dir || e.dir == Direction::Bidirectional {
                    return Ok(());
                }
                misdirected.get_or_insert(*e);
            }
        }
        let report = match misdirected {
            Some(e) => Report { kind: ReportKind::SyncWrongDirection, ..report }.about(Record::Mapping(e)),
            None => match self.nearest(id, dma.0) {
                Some(e) => report.about(Record::Mapping(*e)),
                None => report,
            },
        };
        Err(report.boxed())
    }

    /// The live mapping of device `id` with the highest start at or below `dma` (the latest made
    /// among several there), otherwise the one with the lowest start above it.
    fn nearest(&self, id: u32, dma: u64) -> Option<&Entry> {
        let below = self.mappings.range((id, 0, 0)..=(id, dma, u64::MAX)).next_back();
        let above = || {
            self.mappings
                .range((Bound::Excluded((id, dma, u64::MAX)), Bound::Included((id, u64::MAX, u64::MAX))))
                .next()
        };
        below.or_else(above).map(|(_, e)| e)
    }

    /// Records a coherent allocation of `dev`: `size` bytes at CPU address `cpu` and bus address
    /// `dma`.
    pub fn add_coherent(&mut self, dev: &Device, cpu: u64, dma: DmaAddr, size: u64, caller: Caller) {
        let key = self.next_key(dev.id(), dma.0);
        self.coherent.insert(key, Allocation { device: DeviceName::new(dev.name()), dma, cpu, size, caller });
    }

    /// Checks and records the free of the coherent allocation of `dev` at bus address `dma`, of
    /// `size` bytes at CPU address `cpu` (`None` if the caller does not know it). If several are
    /// live there, the oldest one matching is removed, or the oldest one is reported on.
    /// `Err`: nothing was removed and the caller should not free; the report is
    /// [`ReportKind::FreeWrongAddress`] (no allocation at `dma`, or its CPU address differs) or
    /// [`ReportKind::FreeWrongSize`].
    pub fn remove_coherent(
        &mut self,
        dev: &Device,
        cpu: Option<u64>,
        dma: DmaAddr,
        size: u64,
        caller: Caller,
    ) -> Result<(), Box<Report>> {
        let cpu_fits = |a: &Allocation| cpu.is_none_or(|c| c == a.cpu);
        let mut live = self.coherent.range(keys_at(dev.id(), dma.0));
        let oldest = live.clone().next().map(|(k, a)| (*k, *a));
        let exact = live.find(|(_, a)| cpu_fits(a) && a.size == size).map(|(k, a)| (*k, *a));
        let report =
            Report { cpu, ..Report::new(ReportKind::FreeWrongAddress, Op::FreeCoherent, dev, dma, size, caller) };
        let Some((key, alloc)) = exact.or(oldest) else {
            return Err(report.boxed());
        };
        if !cpu_fits(&alloc) {
            return Err(report.about(Record::Coherent(alloc)).boxed());
        }
        if alloc.size != size {
            return Err(Report { kind: ReportKind::FreeWrongSize, ..report }.about(Record::Coherent(alloc)).boxed());
        }
        self.coherent.remove(&key);
        Ok(())
    }

    /// Removes every live mapping and coherent allocation of `dev` (the device is going away;
    /// `caller` is where) and returns one [`ReportKind::Leak`] per record, in bus address order
    /// (records at the same address in the order they were made).
    pub fn teardown(&mut self, dev: &Device, caller: Caller) -> Vec<Report> {
        let id = dev.id();
        let all = (id, 0, 0)..=(id, u64::MAX, u64::MAX);
        let maps: Vec<(Key, Entry)> = self.mappings.range(all.clone()).map(|(k, e)| (*k, *e)).collect();
        let allocs: Vec<(Key, Allocation)> = self.coherent.range(all).map(|(k, a)| (*k, *a)).collect();
        let mut leaks: Vec<(u64, u64, Report)> = Vec::with_capacity(maps.len() + allocs.len());
        for (key, e) in maps {
            self.forget_mapping(key, &e);
            let r = Report {
                map_kind: Some(e.kind),
                phys: Some(e.phys),
                ..Report::streaming(ReportKind::Leak, Op::Teardown, dev, e.dma, e.size, e.dir, caller)
            };
            leaks.push((key.1, key.2, r.about(Record::Mapping(e))));
        }
        for (key, a) in allocs {
            self.coherent.remove(&key);
            let r =
                Report { cpu: Some(a.cpu), ..Report::new(ReportKind::Leak, Op::Teardown, dev, a.dma, a.size, caller) };
            leaks.push((key.1, key.2, r.about(Record::Coherent(a))));
        }
        leaks.sort_unstable_by_key(|&(dma, seq, _)| (dma, seq));
        leaks.into_iter().map(|(_, _, r)| r).collect()
    }

    /// How many streaming mappings are live, of `dev` or of every device.
    pub fn live_mappings(&self, dev: Option<&Device>) -> usize {
        match dev {
            Some(d) => self.mappings.range((d.id(), 0, 0)..=(d.id(), u64::MAX, u64::MAX)).count(),
            None => self.mappings.len(),
        }
    }

    /// How many coherent allocations are live, of `dev` or of every device.
    pub fn live_coherent(&self, dev: Option<&Device>) -> usize {
        match dev {
            Some(d) => self.coherent.range((d.id(), 0, 0)..=(d.id(), u64::MAX, u64::MAX)).count(),
            None => self.coherent.len(),
        }
    }

    /// The live streaming mapping of `dev` starting at `dma` (the oldest, if several).
    pub fn find(&self, dev: &Device, dma: DmaAddr) -> Option<&Entry> {
        self.mappings.range(keys_at(dev.id(), dma.0)).next().map(|(_, e)| e)
    }

    /// A live mapping of `dev` that contains bus address `dma` (the oldest, if several).
    pub fn find_covering(&self, dev: &Device, dma: DmaAddr) -> Option<Entry> {
        self.covering(dev.id(), dma.0).copied()
    }

    /// The live coherent allocation of `dev` at `dma` (the oldest, if several).
    pub fn find_coherent(&self, dev: &Device, dma: DmaAddr) -> Option<&Allocation> {
        self.coherent.range(keys_at(dev.id(), dma.0)).next().map(|(_, a)| a)
    }

    /// The live streaming mapping, of any device, covering physical byte `phys`: one that lets
    /// its device write if there is one (that device owns the byte), otherwise any; among
    /// several, the one of the lowest device id and bus address (the oldest, at equal ones).
    pub fn owner_of(&self, phys: u64) -> Option<&Entry> {
        let (_, span) = self.lines.at(PHYS_SPACE, phys)?;
        let covering = || {
            span.owners
                .iter()
                .filter_map(|k| self.mappings.get(k))
                .filter(move |e| e.phys.0 <= phys && phys <= e.phys_last())
        };
        covering().find(|e| device_writes(e.dir)).or_else(|| covering().next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use Direction::{Bidirectional as Bidi, FromDevice as FromDev, ToDevice as To};

    #[track_caller]
    fn here() -> Caller {
        Location::caller()
    }

    fn map(phys: u64, size: u64, dir: Direction, kind: MapKind, caller: Caller) -> NewMapping {
        NewMapping { phys: PhysAddr(phys), dma: DmaAddr(phys), size, dir, kind, checked: true, caller }
    }

    fn name(s: &str) -> DeviceName {
        DeviceName::new(s)
    }

    /// Asserts the structural invariants of a coverage map, and that it covers exactly the
    /// ranges `expect` gives (space, first, last, key), by comparing every span boundary.
    fn check_coverage(c: &Coverage, expect: &[(u32, u64, u64, Key)]) {
        let mut prev: Option<(u32, u64, &Span)> = None;
        for (&(space, first), span) in &c.spans {
            assert!(span.last >= first);
            assert!(!span.owners.is_empty());
            assert!(span.owners.windows(2).all(|w| w[0] < w[1]));
            if let Some((ps, pf, p)) = prev {
                if ps == space {
                    assert!(p.last < first, "spans overlap at {pf:#x}");
                    assert!(p.last + 1 != first || p.owners != span.owners, "touching equal spans at {first:#x}");
                }
            }
            // The span's owners are exactly the expected ranges containing it.
            let mut want: Vec<Key> = expect
                .iter()
                .filter(|&&(s, f, l, _)| s == space && f <= first && span.last <= l)
                .map(|&(_, _, _, k)| k)
                .collect();
            want.sort();
            assert_eq!(span.owners, want, "span {first:#x}..={:#x}", span.last);
            // No expected range half-covers the span.
            assert!(expect
                .iter()
                .all(|&(s, f, l, _)| s != space || l < first || f > span.last || (f <= first && span.last <= l)));
            prev = Some((space, first, span));
        }
        // Each range's first and last address is covered.
        for &(s, f, l, k) in expect {
            assert!(c.at(s, f).is_some_and(|(_, sp)| sp.owners.contains(&k)));
            assert!(c.at(s, l).is_some_and(|(_, sp)| sp.owners.contains(&k)));
        }
    }

    impl Tracker {
        fn check_invariants(&self) {
            let lines: Vec<_> = self
                .mappings
                .iter()
                .map(|(k, e)| {
                    let (f, l) = self.line_range(e.phys.0, e.size);
                    (PHYS_SPACE, f, l, *k)
                })
                .collect();
            check_coverage(&self.lines, &lines);
            let buses: Vec<_> = self.mappings.iter().map(|(k, e)| (k.0, e.dma.0, e.bus_last(), *k)).collect();
            check_coverage(&self.buses, &buses);
        }
    }

    #[test]
    fn correct_use_reports_nothing() {
        let mut t = Tracker::new(64);
        let nic = Device::new("nic", u64::MAX);
        let blk = Device::new("blk", u64::MAX);
        let c = here();
        t.add_mapping(&nic, map(0x1000, 0x100, To, MapKind::Single, c)).unwrap();
        t.add_mapping(&nic, map(0x2000, 0x1000, Bidi, MapKind::Page, c)).unwrap();
        // A to-device mapping may share lines with anything; line-aligned neighbours may write.
        t.add_mapping(&blk, map(0x1040, 0x10, To, MapKind::Single, c)).unwrap();
        t.add_mapping(&blk, map(0x3000, 0x40, FromDev, MapKind::Single, c)).unwrap();
        t.add_mapping(&blk, map(0x3040, 0x40, FromDev, MapKind::Single, c)).unwrap();
        // Scatter-gather segments, each on its own lines.
        for seg in [0x4000, 0x4080, 0x4100] {
            t.add_mapping(&nic, map(seg, 0x80, FromDev, MapKind::Sg, c)).unwrap();
        }
        t.check_invariants();
        for (dir, for_cpu) in [(To, false), (FromDev, true), (Bidi, false), (Bidi, true)] {
            t.check_sync(&nic, DmaAddr(0x2010), 0x20, dir, for_cpu, c).unwrap();
        }
        t.check_sync(&nic, DmaAddr(0x1000), 0x100, To, false, c).unwrap();
        t.check_sync(&nic, DmaAddr(0x4080), 0x80, FromDev, true, c).unwrap();
        t.check_sync(&blk, DmaAddr(0x3040), 0x40, FromDev, true, c).unwrap();
        assert_eq!(t.live_mappings(None), 8);
        assert_eq!(t.live_mappings(Some(&nic)), 5);
        assert_eq!(t.live_mappings(Some(&blk)), 3);
        for seg in [0x4000, 0x4080, 0x4100] {
            assert_eq!(t.remove_mapping(&nic, DmaAddr(seg), 0x80, FromDev, MapKind::Sg, c).unwrap().report, None);
        }
        let r = t.remove_mapping(&nic, DmaAddr(0x2000), 0x1000, Bidi, MapKind::Page, c).unwrap();
        assert_eq!((r.entry.phys, r.entry.size, r.report), (PhysAddr(0x2000), 0x1000, None));
        t.remove_mapping(&nic, DmaAddr(0x1000), 0x100, To, MapKind::Single, c).unwrap();
        for a in [0x1040, 0x3000, 0x3040] {
            let size = t.find(&blk, DmaAddr(a)).unwrap().size;
            let dir = t.find(&blk, DmaAddr(a)).unwrap().dir;
            assert_eq!(t.remove_mapping(&blk, DmaAddr(a), size, dir, MapKind::Single, c).unwrap().report, None);
        }
        t.add_coherent(&nic, 0xffff_0000_0000_5000, DmaAddr(0x5000), 0x2000, c);
        t.add_coherent(&blk, 0xffff_0000_0000_5000, DmaAddr(0x5000), 0x1000, c);
        assert_eq!(t.live_coherent(None), 2);
        assert_eq!(t.find_coherent(&blk, DmaAddr(0x5000)).unwrap().size, 0x1000);
        t.remove_coherent(&nic, Some(0xffff_0000_0000_5000), DmaAddr(0x5000), 0x2000, c).unwrap();
        t.remove_coherent(&blk, None, DmaAddr(0x5000), 0x1000, c).unwrap();
        assert_eq!((t.live_mappings(None), t.live_coherent(None)), (0, 0));
        assert!(t.teardown(&nic, c).is_empty());
        assert!(t.lines.spans.is_empty() && t.buses.spans.is_empty());
    }

    #[test]
    fn writers_sharing_a_line_are_reported_and_both_recorded() {
        let mut t = Tracker::new(64);
        let a = Device::new("a", u64::MAX);
        let b = Device::new("b", u64::MAX);
        let (ca, cb) = (here(), here());
        t.add_mapping(&a, map(0x1000, 0x30, FromDev, MapKind::Single, ca)).unwrap();
        // Same line (0x1000..0x1040), other device, bus address elsewhere.
        let m = NewMapping { dma: DmaAddr(0x8_0000), ..map(0x1030, 0x10, Bidi, MapKind::Page, cb) };
        let r = t.add_mapping(&b, m).unwrap_err();
        assert_eq!(r.kind, ReportKind::CacheLineOverlap);
        assert_eq!((r.op, r.device, r.dma, r.size), (Op::Map, name("b"), DmaAddr(0x8_0000), 0x10));
        assert_eq!((r.phys, r.dir, r.map_kind), (Some(PhysAddr(0x1030)), Some(Bidi), Some(MapKind::Page)));
        assert_eq!((r.caller, r.mapped_at), (cb, Some(ca)));
        let Some(Record::Mapping(o)) = r.record else { panic!("no record") };
        assert_eq!((o.device, o.phys, o.size, o.dir, o.caller), (name("a"), PhysAddr(0x1000), 0x30, FromDev, ca));
        assert_eq!(t.live_mappings(None), 2);
        // The second line of a long mapping counts too; the same device counts too.
        t.add_mapping(&a, map(0x2000, 0x80, FromDev, MapKind::Single, ca)).unwrap();
        let r = t.add_mapping(&a, map(0x2070, 0x4, FromDev, MapKind::Single, cb)).unwrap_err();
        assert_eq!(
            (r.kind, r.record.map(|r| r.caller()), r.dma),
            (ReportKind::CacheLineOverlap, Some(ca), DmaAddr(0x2070))
        );
        // A reader never conflicts, nor does a writer with only a reader on its line.
        t.add_mapping(&b, map(0x2010, 0x4, To, MapKind::Single, cb)).unwrap();
        t.add_mapping(&b, map(0x3000, 0x4, To, MapKind::Single, cb)).unwrap();
        t.add_mapping(&a, map(0x3008, 0x4, FromDev, MapKind::Single, ca)).unwrap();
        // Neighbouring lines do not conflict.
        t.add_mapping(&b, map(0x2080, 0x40, Bidi, MapKind::Single, cb)).unwrap();
        t.check_invariants();
        assert_eq!(t.live_mappings(None), 8);
        // Once the first writer is gone, its line is free.
        t.remove_mapping(&a, DmaAddr(0x1000), 0x30, FromDev, MapKind::Single, ca).unwrap();
        t.remove_mapping(&b, DmaAddr(0x8_0000), 0x10, Bidi, MapKind::Page, cb).unwrap();
        t.add_mapping(&b, map(0x1020, 0x10, FromDev, MapKind::Single, cb)).unwrap();
        t.check_invariants();
    }

    #[test]
    fn empty_or_wrapping_mappings_are_refused() {
        let mut t = Tracker::new(64);
        let d = Device::new("d", u64::MAX);
        let c = here();
        for m in [
            map(0x1000, 0, To, MapKind::Single, c),
            map(u64::MAX, 2, To, MapKind::Single, c),
            NewMapping { dma: DmaAddr(u64::MAX - 1), ..map(0x1000, 3, FromDev, MapKind::Sg, c) },
        ] {
            let r = t.add_mapping(&d, m).unwrap_err();
            assert_eq!(
                (r.kind, r.op, r.dma, r.size, r.caller, r.record),
                (ReportKind::BadMapping, Op::Map, m.dma, m.size, c, None)
            );
        }
        assert_eq!(t.live_mappings(None), 0);
        // The last byte of both spaces is fine.
        t.add_mapping(&d, map(u64::MAX, 1, FromDev, MapKind::Single, c)).unwrap();
        t.check_sync(&d, DmaAddr(u64::MAX), 1, FromDev, true, c).unwrap();
        assert_eq!(t.owner_of(u64::MAX).map(|e| e.phys), Some(PhysAddr(u64::MAX)));
        t.check_invariants();
        t.remove_mapping(&d, DmaAddr(u64::MAX), 1, FromDev, MapKind::Single, c).unwrap();
        assert!(t.lines.spans.is_empty());
    }

    #[test]
    fn unmap_of_what_was_never_mapped() {
        let mut t = Tracker::new(64);
        let d = Device::new("d", u64::MAX);
        let other = Device::new("other", u64::MAX);
        let (cm, cu) = (here(), here());
        let r = t.remove_mapping(&d, DmaAddr(0x1000), 0x40, To, MapKind::Single, cu).unwrap_err();
        assert_eq!(
            (r.kind, r.op, r.device, r.dma, r.size),
            (ReportKind::NeverMapped, Op::Unmap, name("d"), DmaAddr(0x1000), 0x40)
        );
        assert_eq!((r.caller, r.mapped_at, r.record), (cu, None, None));
        // Another device's mapping at that address does not count; an unmap inside a mapping
        // of this device names it.
        t.add_mapping(&other, map(0x1000, 0x40, To, MapKind::Single, cm)).unwrap();
        t.add_mapping(&d, map(0x2000, 0x100, To, MapKind::Single, cm)).unwrap();
        let r = t.remove_mapping(&d, DmaAddr(0x1000), 0x40, To, MapKind::Single, cu).unwrap_err();
        assert_eq!((r.kind, r.record), (ReportKind::NeverMapped, None));
        let r = t.remove_mapping(&d, DmaAddr(0x2040), 0x40, To, MapKind::Single, cu).unwrap_err();
        assert_eq!(r.kind, ReportKind::NeverMapped);
        assert_eq!((r.record.map(|r| r.caller()), r.mapped_at), (Some(cm), Some(cm)));
        assert!(matches!(r.record, Some(Record::Mapping(e)) if e.dma == DmaAddr(0x2000)));
        assert_eq!(t.live_mappings(None), 2);
    }

    #[test]
    fn double_unmap_within_the_history() {
        let mut t = Tracker::new(64);
        let d = Device::new("d", u64::MAX);
        let other = Device::new("other", u64::MAX);
        let (cm, cu1, cu2) = (here(), here(), here());
        t.add_mapping(&d, map(0x1000, 0x40, FromDev, MapKind::Single, cm)).unwrap();
        t.remove_mapping(&d, DmaAddr(0x1000), 0x40, FromDev, MapKind::Single, cu1).unwrap();
        let r = t.remove_mapping(&d, DmaAddr(0x1000), 0x40, FromDev, MapKind::Single, cu2).unwrap_err();
        assert_eq!((r.kind, r.device, r.dma, r.size), (ReportKind::DoubleUnmap, name("d"), DmaAddr(0x1000), 0x40));
        assert_eq!((r.caller, r.mapped_at, r.unmapped_at), (cu2, Some(cm), Some(cu1)));
        // Only for the device that unmapped it.
        let r = t.remove_mapping(&other, DmaAddr(0x1000), 0x40, FromDev, MapKind::Single, cu2).unwrap_err();
        assert_eq!(r.kind, ReportKind::NeverMapped);
        // Mapped again, the address is live again: unmaps work.
        t.add_mapping(&d, map(0x1000, 0x40, FromDev, MapKind::Single, cm)).unwrap();
        t.remove_mapping(&d, DmaAddr(0x1000), 0x40, FromDev, MapKind::Single, cu1).unwrap();
        // After UNMAP_HISTORY other unmaps it is forgotten.
        for i in 0..UNMAP_HISTORY as u64 {
            t.add_mapping(&d, map(0x10_0000 + i * 0x40, 0x40, To, MapKind::Single, cm)).unwrap();
            t.remove_mapping(&d, DmaAddr(0x10_0000 + i * 0x40), 0x40, To, MapKind::Single, cm).unwrap();
        }
        let r = t.remove_mapping(&d, DmaAddr(0x1000), 0x40, FromDev, MapKind::Single, cu2).unwrap_err();
        assert_eq!(r.kind, ReportKind::NeverMapped);
        let r = t.remove_mapping(&d, DmaAddr(0x10_0000), 0x40, To, MapKind::Single, cu2).unwrap_err();
        assert_eq!(r.kind, ReportKind::DoubleUnmap);
    }

    #[test]
    fn mismatched_unmaps_leave_the_mapping_live() {
        let mut t = Tracker::new(64);
        let d = Device::new("virtio-blk", u64::MAX);
        let (cm, cu) = (here(), here());
        t.add_mapping(&d, map(0x4008_1000, 0x2000, To, MapKind::Single, cm)).unwrap();
        let cases = [
            (0x1000, To, MapKind::Single, ReportKind::WrongSize),
            (0x2000, FromDev, MapKind::Single, ReportKind::WrongDirection),
            (0x2000, To, MapKind::Page, ReportKind::WrongKind),
            (0x2000, To, MapKind::Sg, ReportKind::WrongKind),
            // Several mismatches: the kind is reported first, then the size.
            (0x1000, Bidi, MapKind::Page, ReportKind::WrongKind),
            (0x1000, Bidi, MapKind::Single, ReportKind::WrongSize),
        ];
        for (size, dir, kind, expect) in cases {
            let r = t.remove_mapping(&d, DmaAddr(0x4008_1000), size, dir, kind, cu).unwrap_err();
            assert_eq!(r.kind, expect, "{size:#x} {dir} {kind}");
            assert_eq!(
                (r.device, r.dma, r.size, r.dir, r.map_kind),
                (name("virtio-blk"), DmaAddr(0x4008_1000), size, Some(dir), Some(kind))
            );
            assert_eq!((r.caller, r.mapped_at), (cu, Some(cm)));
            let Some(Record::Mapping(e)) = r.record else { panic!("no record") };
            assert_eq!((e.size, e.dir, e.kind), (0x2000, To, MapKind::Single));
            assert_eq!(t.live_mappings(Some(&d)), 1);
        }
        t.check_invariants();
        t.remove_mapping(&d, DmaAddr(0x4008_1000), 0x2000, To, MapKind::Single, cu).unwrap();
        assert_eq!(t.live_mappings(None), 0);
    }

    #[test]
    fn unchecked_mapping_error_is_reported_at_unmap() {
        let mut t = Tracker::new(64);
        let d = Device::new("d", u64::MAX);
        let (cm, cu) = (here(), here());
        let unchecked = NewMapping { checked: false, ..map(0x1000, 0x40, To, MapKind::Page, cm) };
        t.add_mapping(&d, unchecked).unwrap();
        let removed = t.remove_mapping(&d, DmaAddr(0x1000), 0x40, To, MapKind::Page, cu).unwrap();
        let r = removed.report.expect("unchecked mapping not reported");
        assert_eq!(
            (r.kind, r.op, r.device, r.dma, r.size),
            (ReportKind::ErrorNotChecked, Op::Unmap, name("d"), DmaAddr(0x1000), 0x40)
        );
        assert_eq!((r.caller, r.mapped_at), (cu, Some(cm)));
        assert_eq!(t.live_mappings(None), 0);
        // Checked: no report. Checking an unknown address changes nothing.
        t.add_mapping(&d, unchecked).unwrap();
        t.mark_checked(&d, DmaAddr(0x2000));
        t.mark_checked(&Device::new("x", u64::MAX), DmaAddr(0x1000));
        assert!(!t.find(&d, DmaAddr(0x1000)).unwrap().checked);
        t.mark_checked(&d, DmaAddr(0x1000));
        assert_eq!(t.remove_mapping(&d, DmaAddr(0x1000), 0x40, To, MapKind::Page, cu).unwrap().report, None);
        // Two mappings at one address: each check marks one.
        t.add_mapping(&d, unchecked).unwrap();
        t.add_mapping(&d, unchecked).unwrap();
        t.mark_checked(&d, DmaAddr(0x1000));
        assert!(t.remove_mapping(&d, DmaAddr(0x1000), 0x40, To, MapKind::Page, cu).unwrap().report.is_none());
        assert!(t.remove_mapping(&d, DmaAddr(0x1000), 0x40, To, MapKind::Page, cu).unwrap().report.is_some());
    }

    #[test]
    fn syncs_outside_a_mapping() {
        let mut t = Tracker::new(64);
        let d = Device::new("d", u64::MAX);
        let other = Device::new("other", u64::MAX);
        let (cm, cs) = (here(), here());
        let r = t.check_sync(&d, DmaAddr(0x1000), 0x10, To, false, cs).unwrap_err();
        assert_eq!((r.kind, r.op, r.record, r.caller), (ReportKind::SyncOutsideMapping, Op::SyncForDevice, None, cs));
        t.add_mapping(&d, map(0x1000, 0x100, Bidi, MapKind::Single, cm)).unwrap();
        t.add_mapping(&d, map(0x1100, 0x100, Bidi, MapKind::Single, cm)).unwrap();
        t.add_mapping(&other, map(0x3000, 0x100, Bidi, MapKind::Single, cm)).unwrap();
        t.add_mapping(&d, map(0x4000, 0x100, Bidi, MapKind::Single, cm)).unwrap();
        let cases = [
            (0x10f0, 0x20, 0x1000),     // across the end into the next mapping
            (0x1000, 0, 0x1000),        // empty
            (0x1000, u64::MAX, 0x1000), // wraps
            (0x0800, 0x10, 0x1000),     // below everything: nearest above
            (0x3000, 0x10, 0x1100),     // another device's mapping
            (0x4100, 1, 0x4000),        // just past the end
        ];
        for (dma, size, nearest) in cases {
            let r = t.check_sync(&d, DmaAddr(dma), size, Bidi, true, cs).unwrap_err();
            assert_eq!(
                (r.kind, r.op, r.device, r.dma, r.size),
                (ReportKind::SyncOutsideMapping, Op::SyncForCpu, name("d"), DmaAddr(dma), size)
            );
            assert!(matches!(r.record, Some(Record::Mapping(e)) if e.dma == DmaAddr(nearest)), "{dma:#x}: {r}");
            assert_eq!((r.caller, r.mapped_at), (cs, Some(cm)));
        }
        t.check_sync(&d, DmaAddr(0x10ff), 1, Bidi, true, cs).unwrap();
        t.check_sync(&d, DmaAddr(0x1100), 0x100, Bidi, true, cs).unwrap();
    }

    #[test]
    fn syncs_in_the_wrong_direction() {
        let mut t = Tracker::new(64);
        let d = Device::new("d", u64::MAX);
        let (cm, cs) = (here(), here());
        t.add_mapping(&d, map(0x1000, 0x100, FromDev, MapKind::Page, cm)).unwrap();
        for (dir, for_cpu) in [(To, true), (Bidi, false)] {
            let r = t.check_sync(&d, DmaAddr(0x1010), 0x10, dir, for_cpu, cs).unwrap_err();
            assert_eq!(
                (r.kind, r.device, r.dma, r.size, r.dir),
                (ReportKind::SyncWrongDirection, name("d"), DmaAddr(0x1010), 0x10, Some(dir))
            );
            assert_eq!((r.caller, r.mapped_at), (cs, Some(cm)));
        }
        t.check_sync(&d, DmaAddr(0x1010), 0x10, FromDev, false, cs).unwrap();
        // With a second, bidirectional mapping containing the range, the sync is fine.
        t.add_mapping(&d, map(0x1000, 0x100, Bidi, MapKind::Page, cm)).unwrap_err();
        t.check_sync(&d, DmaAddr(0x1010), 0x10, To, true, cs).unwrap();
    }

    #[test]
    fn coherent_frees_with_the_wrong_address_or_size() {
        let mut t = Tracker::new(64);
        let d = Device::new("gpu", u64::MAX);
        let (ca, cf) = (here(), here());
        let r = t.remove_coherent(&d, Some(0x9000), DmaAddr(0x5000), 0x1000, cf).unwrap_err();
        assert_eq!(
            (r.kind, r.op, r.device, r.dma, r.size, r.cpu),
            (ReportKind::FreeWrongAddress, Op::FreeCoherent, name("gpu"), DmaAddr(0x5000), 0x1000, Some(0x9000))
        );
        assert_eq!((r.caller, r.mapped_at, r.record), (cf, None, None));
        t.add_coherent(&d, 0x9000, DmaAddr(0x5000), 0x2000, ca);
        let r = t.remove_coherent(&d, Some(0xa000), DmaAddr(0x5000), 0x2000, cf).unwrap_err();
        assert_eq!((r.kind, r.cpu, r.caller, r.mapped_at), (ReportKind::FreeWrongAddress, Some(0xa000), cf, Some(ca)));
        assert!(matches!(r.record, Some(Record::Coherent(a)) if a.cpu == 0x9000));
        let r = t.remove_coherent(&d, None, DmaAddr(0x6000), 0x2000, cf).unwrap_err();
        assert_eq!((r.kind, r.record), (ReportKind::FreeWrongAddress, None));
        let r = t.remove_coherent(&d, Some(0x9000), DmaAddr(0x5000), 0x1000, cf).unwrap_err();
        assert_eq!((r.kind, r.size, r.caller, r.mapped_at), (ReportKind::FreeWrongSize, 0x1000, cf, Some(ca)));
        assert!(matches!(r.record, Some(Record::Coherent(a)) if a.size == 0x2000));
        assert_eq!(t.live_coherent(Some(&d)), 1);
        t.remove_coherent(&d, Some(0x9000), DmaAddr(0x5000), 0x2000, cf).unwrap();
        // A second free is a free of something not allocated.
        let r = t.remove_coherent(&d, Some(0x9000), DmaAddr(0x5000), 0x2000, cf).unwrap_err();
        assert_eq!(r.kind, ReportKind::FreeWrongAddress);
    }

    #[test]
    fn teardown_reports_leaks_in_address_order() {
        let mut t = Tracker::new(64);
        let d = Device::new("d", u64::MAX);
        let keep = Device::new("keep", u64::MAX);
        let (c1, c2, c3, ct) = (here(), here(), here(), here());
        t.add_mapping(&d, map(0x3000, 0x40, FromDev, MapKind::Sg, c1)).unwrap();
        t.add_coherent(&d, 0xffff_2000, DmaAddr(0x2000), 0x1000, c2);
        t.add_mapping(&d, map(0x1000, 0x80, To, MapKind::Single, c3)).unwrap();
        t.add_mapping(&keep, map(0x1800, 0x40, To, MapKind::Single, c3)).unwrap();
        t.add_coherent(&keep, 0xffff_2000, DmaAddr(0x2000), 0x1000, c2);
        let leaks = t.teardown(&d, ct);
        let got: Vec<_> =
            leaks.iter().map(|r| (r.kind, r.op, r.device, r.dma, r.size, r.caller, r.mapped_at)).collect();
        let leak = |dma, size, at| (ReportKind::Leak, Op::Teardown, name("d"), DmaAddr(dma), size, ct, Some(at));
        assert_eq!(got, vec![leak(0x1000, 0x80, c3), leak(0x2000, 0x1000, c2), leak(0x3000, 0x40, c1)]);
        assert_eq!(leaks[1].cpu, Some(0xffff_2000));
        assert_eq!(
            (leaks[2].dir, leaks[2].map_kind, leaks[2].phys),
            (Some(FromDev), Some(MapKind::Sg), Some(PhysAddr(0x3000)))
        );
        assert_eq!((t.live_mappings(Some(&d)), t.live_coherent(Some(&d))), (0, 0));
        assert_eq!((t.live_mappings(None), t.live_coherent(None)), (1, 1));
        t.check_invariants();
        assert!(t.teardown(&d, ct).is_empty());
    }

    #[test]
    fn devices_sharing_bus_addresses_are_kept_apart() {
        let mut t = Tracker::new(64);
        let a = Device::new("same", u64::MAX);
        let b = Device::new("same", u64::MAX);
        let c = here();
        t.add_mapping(&a, NewMapping { dma: DmaAddr(0x1000), ..map(0x1_0000, 0x40, To, MapKind::Single, c) }).unwrap();
        t.add_mapping(&b, NewMapping { dma: DmaAddr(0x1000), ..map(0x2_0000, 0x80, To, MapKind::Single, c) }).unwrap();
        assert_eq!(t.find(&a, DmaAddr(0x1000)).unwrap().phys, PhysAddr(0x1_0000));
        assert_eq!(t.find(&b, DmaAddr(0x1000)).unwrap().phys, PhysAddr(0x2_0000));
        t.check_sync(&b, DmaAddr(0x1040), 0x40, To, false, c).unwrap();
        t.check_sync(&a, DmaAddr(0x1040), 0x40, To, false, c).unwrap_err();
        t.remove_mapping(&a, DmaAddr(0x1000), 0x40, To, MapKind::Single, c).unwrap();
        assert_eq!(t.live_mappings(Some(&b)), 1);
        t.remove_mapping(&b, DmaAddr(0x1000), 0x80, To, MapKind::Single, c).unwrap();
    }

    #[test]
    fn one_buffer_mapped_twice_by_one_device() {
        let mut t = Tracker::new(64);
        let d = Device::new("d", u64::MAX);
        let (c1, c2) = (here(), here());
        t.add_mapping(&d, map(0x1000, 0x100, To, MapKind::Single, c1)).unwrap();
        t.add_mapping(&d, map(0x1000, 0x40, To, MapKind::Page, c2)).unwrap();
        t.check_invariants();
        // The unmap matching the second mapping removes it, not the first.
        let r = t.remove_mapping(&d, DmaAddr(0x1000), 0x40, To, MapKind::Page, c2).unwrap();
        assert_eq!(r.entry.caller, c2);
        assert_eq!(t.find(&d, DmaAddr(0x1000)).unwrap().caller, c1);
        t.check_invariants();
        t.remove_mapping(&d, DmaAddr(0x1000), 0x100, To, MapKind::Single, c1).unwrap();
        assert!(t.buses.spans.is_empty());
    }

    #[test]
    fn owner_of_is_byte_exact_and_prefers_writers() {
        let mut t = Tracker::new(64);
        let a = Device::new("a", u64::MAX);
        let b = Device::new("b", u64::MAX);
        let c = here();
        t.add_mapping(&a, map(0x1010, 0x10, To, MapKind::Single, c)).unwrap();
        t.add_mapping(&b, map(0x1018, 0x10, FromDev, MapKind::Single, c)).unwrap();
        assert_eq!(t.owner_of(0x100f), None);
        assert_eq!(t.owner_of(0x1010).map(|e| e.device), Some(name("a")));
        assert_eq!(t.owner_of(0x101f).map(|e| e.device), Some(name("b")));
        assert_eq!(t.owner_of(0x1027).map(|e| e.device), Some(name("b")));
        assert_eq!(t.owner_of(0x1028), None);
        assert_eq!(t.owner_of(0x2000), None);
    }

    #[test]
    fn cache_line_size_is_a_power_of_two() {
        assert_eq!(Tracker::new(64).cache_line(), 64);
        assert_eq!(Tracker::new(48).cache_line(), 64);
        assert_eq!(Tracker::new(0).cache_line(), 1);
        assert_eq!(Tracker::new(u64::MAX).cache_line(), 1 << 63);
        // With 128-byte lines, 0x1000 and 0x1040 share one.
        let mut t = Tracker::new(128);
        let d = Device::new("d", u64::MAX);
        let c = here();
        t.add_mapping(&d, map(0x1000, 0x40, FromDev, MapKind::Single, c)).unwrap();
        assert_eq!(
            t.add_mapping(&d, map(0x1040, 0x40, FromDev, MapKind::Single, c)).unwrap_err().kind,
            ReportKind::CacheLineOverlap
        );
    }

    /// Each kind's line, for a device, addresses and callers a reader can check by eye.
    #[test]
    fn messages_read_clearly() {
        let mut t = Tracker::new(64);
        let d = Device::new("virtio-blk", u64::MAX);
        let e = Device::new("edu", u64::MAX);
        let (cm, cu) = (here(), here());
        let (m, u) = (cm.to_string(), cu.to_string());
        let text = |r: Box<Report>| r.to_string();
        t.add_mapping(&d, map(0x4008_1000, 0x2000, To, MapKind::Single, cm)).unwrap();
        let s = text(t.remove_mapping(&d, DmaAddr(0x4008_1000), 0x1000, To, MapKind::Single, cu).unwrap_err());
        assert_eq!(
            s,
            format!(
                "virtio-blk: unmap (single) of 0x40081000 + 0x1000 with the wrong size (mapped 0x2000 at {m}) at {u}"
            )
        );
        let s = text(t.remove_mapping(&d, DmaAddr(0x4008_1000), 0x2000, Bidi, MapKind::Single, cu).unwrap_err());
        assert_eq!(s, format!("virtio-blk: unmap (single) of 0x40081000 + 0x2000 with the wrong direction bidirectional (mapped to-device at {m}) at {u}"));
        let s = text(t.remove_mapping(&d, DmaAddr(0x4008_1000), 0x2000, To, MapKind::Sg, cu).unwrap_err());
        assert_eq!(s, format!("virtio-blk: unmap (scatter-gather) of 0x40081000 + 0x2000 through the wrong API (mapped as single at {m}) at {u}"));
        let s = text(t.check_sync(&d, DmaAddr(0x4008_1000), 0x10, FromDev, true, cu).unwrap_err());
        assert_eq!(s, format!("virtio-blk: sync for cpu of 0x40081000 + 0x10 with the wrong direction from-device (mapped to-device at {m}) at {u}"));
        let s = text(t.check_sync(&d, DmaAddr(0x4008_3000), 0x10, To, false, cu).unwrap_err());
        assert_eq!(s, format!("virtio-blk: sync for device of 0x40083000 + 0x10 (to-device) at {u} is not inside a live mapping of the device (nearest: 0x40081000 + 0x2000 made at {m})"));
        let s = text(t.check_sync(&e, DmaAddr(0x4008_3000), 0x10, To, false, cu).unwrap_err());
        assert_eq!(s, format!("edu: sync for device of 0x40083000 + 0x10 (to-device) at {u} is not inside a live mapping of the device (it has none)"));
        let s = text(t.remove_mapping(&d, DmaAddr(0x4008_1800), 0x10, To, MapKind::Single, cu).unwrap_err());
        assert_eq!(s, format!("virtio-blk: unmap (single) of 0x40081800 + 0x10 at {u}, but the device has no live mapping at 0x40081800 (the address lies inside its mapping of 0x40081000 + 0x2000 made at {m})"));
        t.add_mapping(&e, map(0x4008_2ff0, 0x10, FromDev, MapKind::Page, cm)).unwrap();
        let s = text(t.add_mapping(&d, map(0x4008_2fc0, 0x20, Bidi, MapKind::Single, cu)).unwrap_err());
        assert_eq!(s, format!("virtio-blk: bidirectional single mapping of phys 0x40082fc0 + 0x20 (bus 0x40082fc0) at {u} shares a CPU cache line with the live from-device page mapping of phys 0x40082ff0 + 0x10 for edu made at {m}: cache maintenance for one can destroy data the other's device wrote"));
        let s = text(t.add_mapping(&d, map(0x1000, 0, To, MapKind::Sg, cu)).unwrap_err());
        assert_eq!(s, format!("virtio-blk: scatter-gather mapping of phys 0x1000 + 0x0 (bus 0x1000) at {u} is empty or wraps the address space; it is not tracked"));
        let unchecked = NewMapping { checked: false, ..map(0x5000, 0x40, To, MapKind::Page, cm) };
        t.add_mapping(&e, unchecked).unwrap();
        let s = t.remove_mapping(&e, DmaAddr(0x5000), 0x40, To, MapKind::Page, cu).unwrap().report.unwrap().to_string();
        assert_eq!(s, format!("edu: unmap (page) of 0x5000 + 0x40 at {u} of a mapping made at {m} whose mapping error the driver never checked (dma_mapping_error)"));
        let s = text(t.remove_mapping(&e, DmaAddr(0x5000), 0x40, To, MapKind::Page, cu).unwrap_err());
        assert_eq!(
            s,
            format!(
                "edu: unmap (page) of 0x5000 + 0x40 at {u}, but that mapping (made at {m}) was already unmapped at {u}"
            )
        );
        let s = text(t.remove_mapping(&e, DmaAddr(0x6000), 0x40, To, MapKind::Page, cu).unwrap_err());
        assert_eq!(
            s,
            format!("edu: unmap (page) of 0x6000 + 0x40 at {u}, but the device has no live mapping at 0x6000")
        );
        t.add_coherent(&e, 0xffff_8000, DmaAddr(0x8000), 0x1000, cm);
        let s = text(t.remove_coherent(&e, Some(0xffff_9000), DmaAddr(0x8000), 0x1000, cu).unwrap_err());
        assert_eq!(s, format!("edu: free of coherent memory at 0x8000 + 0x1000 with the wrong CPU address 0xffff9000 (allocated at CPU address 0xffff8000 at {m}) at {u}"));
        let s = text(t.remove_coherent(&e, None, DmaAddr(0x9000), 0x1000, cu).unwrap_err());
        assert_eq!(s, format!("edu: free of coherent memory at 0x9000 + 0x1000 at {u}, but the device has no live coherent allocation at 0x9000"));
        let s = text(t.remove_coherent(&e, None, DmaAddr(0x8000), 0x2000, cu).unwrap_err());
        assert_eq!(
            s,
            format!(
                "edu: free of coherent memory at 0x8000 + 0x2000 with the wrong size (allocated 0x1000 at {m}) at {u}"
            )
        );
        let leaks: Vec<String> = t.teardown(&e, cu).iter().map(|r| r.to_string()).collect();
        assert_eq!(leaks, vec![
            format!("edu: leaked coherent allocation 0x8000 + 0x1000 (CPU address 0xffff8000) made at {m}, still live when the device was torn down at {u}"),
            format!("edu: leaked from-device page mapping of 0x40082ff0 + 0x10 (phys 0x40082ff0) made at {m}, still live when the device was torn down at {u}"),
        ]);
    }

    // ---- Model-based test: the tracker against a list of records searched by brute force. ----

    /// The reference: every record in a list, every question answered by scanning it, and the
    /// reports built field by field.
    #[derive(Default)]
    struct Model {
        line: u64,
        seq: u64,
        /// (device id, seq, mapping)
        maps: Vec<(u32, u64, Entry)>,
        coherent: Vec<(u32, u64, Allocation)>,
        /// (device id, mapping, unmapped at), oldest first.
        unmapped: Vec<(u32, Entry, Caller)>,
    }

    fn blank(kind: ReportKind, op: Op, dev: &Device, dma: u64, size: u64, caller: Caller) -> Report {
        Report {
            kind,
            op,
            device: name(dev.name()),
            dma: DmaAddr(dma),
            size,
            dir: None,
            map_kind: None,
            phys: None,
            cpu: None,
            caller,
            mapped_at: None,
            unmapped_at: None,
            record: None,
        }
    }

    fn with_mapping(r: Report, e: Entry) -> Report {
        Report { mapped_at: Some(e.caller), record: Some(Record::Mapping(e)), ..r }
    }

    // The model returns reports by value, which is simplest to compare; their size is no concern
    // in a test.
    #[allow(clippy::result_large_err)]
    impl Model {
        fn lines_of(&self, phys: u64, size: u64) -> (u64, u64) {
            let first = phys / self.line * self.line;
            let last = (phys + size - 1) / self.line * self.line + (self.line - 1);
            (first, last)
        }

        fn map(&mut self, dev: &Device, m: NewMapping) -> Result<(), Report> {
            let mut r = blank(ReportKind::BadMapping, Op::Map, dev, m.dma.0, m.size, m.caller);
            r.dir = Some(m.dir);
            r.map_kind = Some(m.kind);
            r.phys = Some(m.phys);
            if m.size == 0 || m.phys.0.checked_add(m.size - 1).is_none() || m.dma.0.checked_add(m.size - 1).is_none() {
                return Err(r);
            }
            let (nf, nl) = self.lines_of(m.phys.0, m.size);
            let other = if m.dir == To {
                None
            } else {
                self.maps
                    .iter()
                    .filter(|(_, _, o)| o.dir != To)
                    .filter(|(_, _, o)| {
                        let (of, ol) = self.lines_of(o.phys.0, o.size);
                        of <= nl && ol >= nf
                    })
                    .min_by_key(|(id, seq, o)| (self.lines_of(o.phys.0, o.size).0.max(nf), *id, o.dma.0, *seq))
                    .map(|(_, _, o)| *o)
            };
            self.seq += 1;
            let entry = Entry {
                device: name(dev.name()),
                dma: m.dma,
                phys: m.phys,
                size: m.size,
                dir: m.dir,
                kind: m.kind,
                checked: m.checked,
                caller: m.caller,
            };
            self.maps.push((dev.id(), self.seq, entry));
            match other {
                Some(o) => Err(with_mapping(Report { kind: ReportKind::CacheLineOverlap, ..r }, o)),
                None => Ok(()),
            }
        }

        fn mark(&mut self, dev: &Device, dma: u64) {
            let oldest = (0..self.maps.len())
                .filter(|&i| self.maps[i].0 == dev.id() && self.maps[i].2.dma.0 == dma && !self.maps[i].2.checked)
                .min_by_key(|&i| self.maps[i].1);
            if let Some(i) = oldest {
                self.maps[i].2.checked = true;
            }
        }

        fn unmap(
            &mut self,
            dev: &Device,
            dma: u64,
            size: u64,
            dir: Direction,
            kind: MapKind,
            caller: Caller,
        ) -> Result<Option<Report>, Report> {
            let mut r = blank(ReportKind::NeverMapped, Op::Unmap, dev, dma, size, caller);
            r.dir = Some(dir);
            r.map_kind = Some(kind);
            let id = dev.id();
            let mut at: Vec<(usize, u64, Entry)> = (0..self.maps.len())
                .filter(|&i| self.maps[i].0 == id && self.maps[i].2.dma.0 == dma)
                .map(|i| (i, self.maps[i].1, self.maps[i].2))
                .collect();
            at.sort_by_key(|a| a.1);
            let chosen =
                at.iter().find(|(_, _, e)| e.size == size && e.dir == dir && e.kind == kind).or(at.first()).copied();
            let Some((i, _, e)) = chosen else {
                if let Some((_, u, when)) = self.unmapped.iter().rev().find(|(d, u, _)| *d == id && u.dma.0 == dma) {
                    return Err(with_mapping(
                        Report { kind: ReportKind::DoubleUnmap, unmapped_at: Some(*when), ..r },
                        *u,
                    ));
                }
                let inside = self
                    .maps
                    .iter()
                    .filter(|(d, _, e)| *d == id && e.dma.0 <= dma && dma - e.dma.0 < e.size)
                    .min_by_key(|(_, seq, e)| (e.dma.0, *seq));
                return Err(match inside {
                    Some((_, _, e)) => with_mapping(r, *e),
                    None => r,
                });
            };
            if e.kind != kind {
                return Err(with_mapping(Report { kind: ReportKind::WrongKind, ..r }, e));
            }
            if e.size != size {
                return Err(with_mapping(Report { kind: ReportKind::WrongSize, ..r }, e));
            }
            if e.dir != dir {
                return Err(with_mapping(Report { kind: ReportKind::WrongDirection, ..r }, e));
            }
            self.maps.remove(i);
            self.unmapped.push((id, e, caller));
            if self.unmapped.len() > UNMAP_HISTORY {
                self.unmapped.remove(0);
            }
            Ok((!e.checked).then(|| with_mapping(Report { kind: ReportKind::ErrorNotChecked, ..r }, e)))
        }

        fn sync(
            &self,
            dev: &Device,
            dma: u64,
            size: u64,
            dir: Direction,
            for_cpu: bool,
            caller: Caller,
        ) -> Result<(), Report> {
            let op = if for_cpu { Op::SyncForCpu } else { Op::SyncForDevice };
            let r = Report { dir: Some(dir), ..blank(ReportKind::SyncOutsideMapping, op, dev, dma, size, caller) };
            let id = dev.id();
            let mut mine: Vec<(u64, Entry)> =
                self.maps.iter().filter(|(d, _, _)| *d == id).map(|(_, s, e)| (*s, *e)).collect();
            mine.sort_by_key(|(seq, e)| (e.dma.0, *seq));
            let last = size.checked_sub(1).and_then(|s| dma.checked_add(s));
            let containing: Vec<Entry> = match last {
                Some(last) => {
                    mine.iter().map(|(_, e)| *e).filter(|e| e.dma.0 <= dma && last <= e.dma.0 + (e.size - 1)).collect()
                }
                None => Vec::new(),
            };
            if containing.iter().any(|e| e.dir == dir || e.dir == Bidi) {
                return Ok(());
            }
            if let Some(e) = containing.first() {
                return Err(with_mapping(Report { kind: ReportKind::SyncWrongDirection, ..r }, *e));
            }
            let below = mine.iter().rev().find(|(_, e)| e.dma.0 <= dma);
            let above = mine.iter().find(|(_, e)| e.dma.0 > dma);
            Err(match below.or(above) {
                Some((_, e)) => with_mapping(r, *e),
                None => r,
            })
        }

        fn alloc(&mut self, dev: &Device, cpu: u64, dma: u64, size: u64, caller: Caller) {
            self.seq += 1;
            self.coherent.push((
                dev.id(),
                self.seq,
                Allocation { device: name(dev.name()), dma: DmaAddr(dma), cpu, size, caller },
            ));
        }

        fn free(&mut self, dev: &Device, cpu: Option<u64>, dma: u64, size: u64, caller: Caller) -> Result<(), Report> {
            let r = Report { cpu, ..blank(ReportKind::FreeWrongAddress, Op::FreeCoherent, dev, dma, size, caller) };
            let mut at: Vec<(usize, u64, Allocation)> = (0..self.coherent.len())
                .filter(|&i| self.coherent[i].0 == dev.id() && self.coherent[i].2.dma.0 == dma)
                .map(|i| (i, self.coherent[i].1, self.coherent[i].2))
                .collect();
            at.sort_by_key(|a| a.1);
            let fits = |a: &Allocation| cpu.is_none() || cpu == Some(a.cpu);
            let Some((i, _, a)) = at.iter().find(|(_, _, a)| fits(a) && a.size == size).or(at.first()).copied() else {
                return Err(r);
            };
            let about = |r: Report| Report { mapped_at: Some(a.caller), record: Some(Record::Coherent(a)), ..r };
            if !fits(&a) {
                return Err(about(r));
            }
            if a.size != size {
                return Err(about(Report { kind: ReportKind::FreeWrongSize, ..r }));
            }
            self.coherent.remove(i);
            Ok(())
        }

        fn teardown(&mut self, dev: &Device, caller: Caller) -> Vec<Report> {
            let id = dev.id();
            let mut out: Vec<(u64, u64, Report)> = Vec::new();
            for (_, seq, e) in self.maps.iter().filter(|m| m.0 == id) {
                let r = Report {
                    dir: Some(e.dir),
                    map_kind: Some(e.kind),
                    phys: Some(e.phys),
                    ..blank(ReportKind::Leak, Op::Teardown, dev, e.dma.0, e.size, caller)
                };
                out.push((e.dma.0, *seq, with_mapping(r, *e)));
            }
            for (_, seq, a) in self.coherent.iter().filter(|c| c.0 == id) {
                let r = Report {
                    cpu: Some(a.cpu),
                    mapped_at: Some(a.caller),
                    record: Some(Record::Coherent(*a)),
                    ..blank(ReportKind::Leak, Op::Teardown, dev, a.dma.0, a.size, caller)
                };
                out.push((a.dma.0, *seq, r));
            }
            self.maps.retain(|m| m.0 != id);
            self.coherent.retain(|c| c.0 != id);
            out.sort_by_key(|(dma, seq, _)| (*dma, *seq));
            out.into_iter().map(|(_, _, r)| r).collect()
        }

        fn owner(&self, phys: u64) -> Option<Entry> {
            let mut hits: Vec<(u32, u64, u64, Entry)> = self
                .maps
                .iter()
                .filter(|(_, _, e)| e.phys.0 <= phys && phys - e.phys.0 < e.size)
                .map(|(d, s, e)| (*d, e.dma.0, *s, *e))
                .collect();
            hits.sort_by_key(|h| (h.0, h.1, h.2));
            hits.iter().find(|h| h.3.dir != To).or(hits.first()).map(|h| h.3)
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Map { dev: usize, at: u64, size: u64, dir: Direction, kind: MapKind, checked: bool, site: usize },
        Check { dev: usize, pick: usize },
        Unmap { dev: usize, pick: usize, wrong_size: bool, dir: Option<Direction>, kind: Option<MapKind>, site: usize },
        Sync { dev: usize, pick: usize, off: u64, size: u64, dir: Direction, for_cpu: bool, site: usize },
        Alloc { dev: usize, at: u64, size: u64, site: usize },
        Free { dev: usize, pick: usize, cpu: Option<bool>, wrong_size: bool, site: usize },
        Teardown { dev: usize, site: usize },
    }

    fn dir() -> impl Strategy<Value = Direction> {
        prop_oneof![Just(To), Just(FromDev), Just(Bidi)]
    }

    fn kind() -> impl Strategy<Value = MapKind> {
        prop_oneof![Just(MapKind::Single), Just(MapKind::Page), Just(MapKind::Sg)]
    }

    fn step() -> impl Strategy<Value = Step> {
        // Buffers in a small window with sizes around the 64-byte line, so that lines are shared
        // often; `pick` chooses a live record or, past their number, a stray address.
        let at = (0u64..48).prop_map(|i| 0x1000 + i * 0x18);
        let size = prop_oneof![Just(1u64), Just(0x10), Just(0x40), Just(0x58), Just(0x100), Just(0)];
        let dev = 0usize..3;
        let site = 0usize..4;
        prop_oneof![
            4 => (dev.clone(), at.clone(), size.clone(), dir(), kind(), any::<bool>(), site.clone())
                .prop_map(|(dev, at, size, dir, kind, checked, site)| Step::Map { dev, at, size, dir, kind, checked, site }),
            1 => (dev.clone(), 0usize..8).prop_map(|(dev, pick)| Step::Check { dev, pick }),
            4 => (dev.clone(), 0usize..8, prop::bool::weighted(0.15), prop::option::weighted(0.15, dir()), prop::option::weighted(0.15, kind()), site.clone())
                .prop_map(|(dev, pick, wrong_size, dir, kind, site)| Step::Unmap { dev, pick, wrong_size, dir, kind, site }),
            3 => (dev.clone(), 0usize..8, 0u64..0x60, size, dir(), any::<bool>(), site.clone())
                .prop_map(|(dev, pick, off, size, dir, for_cpu, site)| Step::Sync { dev, pick, off, size, dir, for_cpu, site }),
            1 => (dev.clone(), at, prop_oneof![Just(0x1000u64), Just(0x2000)], site.clone())
                .prop_map(|(dev, at, size, site)| Step::Alloc { dev, at, size, site }),
            1 => (dev.clone(), 0usize..4, prop::option::of(any::<bool>()), prop::bool::weighted(0.2), site.clone())
                .prop_map(|(dev, pick, cpu, wrong_size, site)| Step::Free { dev, pick, cpu, wrong_size, site }),
            1 => (dev, site).prop_map(|(dev, site)| Step::Teardown { dev, site }),
        ]
    }

    /// Four distinct call sites.
    fn sites() -> [Caller; 4] {
        [Location::caller(), Location::caller(), Location::caller(), Location::caller()]
    }

    /// Device 1 uses the same bus addresses as device 0; device 2 sees memory at another bus
    /// offset.
    fn bus_of(dev: usize, phys: u64) -> u64 {
        if dev == 2 {
            phys + 0x10_0000
        } else {
            phys
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn tracker_agrees_with_the_model(steps in prop::collection::vec(step(), 1..80)) {
            let sites = sites();
            let devs = [Device::new("dev0", u64::MAX), Device::new("dev1", u64::MAX), Device::new("dev2", u64::MAX)];
            let mut t = Tracker::new(64);
            let mut m = Model { line: 64, ..Model::default() };
            for s in steps {
                match s {
                    Step::Map { dev, at, size, dir, kind, checked, site } => {
                        let nm = NewMapping { phys: PhysAddr(at), dma: DmaAddr(bus_of(dev, at)), size, dir, kind, checked, caller: sites[site] };
                        prop_assert_eq!(t.add_mapping(&devs[dev], nm).map_err(|r| *r), m.map(&devs[dev], nm));
                    }
                    Step::Check { dev, pick } => {
                        let mine: Vec<_> = m.maps.iter().filter(|x| x.0 == devs[dev].id()).map(|x| x.2.dma.0).collect();
                        let dma = mine.get(pick).copied().unwrap_or(bus_of(dev, 0x1000 + pick as u64 * 0x18));
                        t.mark_checked(&devs[dev], DmaAddr(dma));
                        m.mark(&devs[dev], dma);
                    }
                    Step::Unmap { dev, pick, wrong_size, dir, kind, site } => {
                        let d = &devs[dev];
                        let mine: Vec<Entry> = m.maps.iter().filter(|x| x.0 == d.id()).map(|x| x.2).collect();
                        let gone: Vec<Entry> = m.unmapped.iter().filter(|x| x.0 == d.id()).map(|x| x.1).collect();
                        let e = mine.get(pick).or(gone.get(pick - mine.len().min(pick))).copied();
                        let (dma, size, mdir, mkind) = match e {
                            Some(e) => (e.dma.0, e.size, e.dir, e.kind),
                            None => (bus_of(dev, 0x1000 + pick as u64 * 0x18), 0x40, To, MapKind::Single),
                        };
                        let size = if wrong_size { size + 0x10 } else { size };
                        let (dir, kind) = (dir.unwrap_or(mdir), kind.unwrap_or(mkind));
                        let got = t.remove_mapping(d, DmaAddr(dma), size, dir, kind, sites[site]);
                        let want = m.unmap(d, dma, size, dir, kind, sites[site]);
                        prop_assert_eq!(got.map(|r| r.report).map_err(|r| *r), want);
                    }
                    Step::Sync { dev, pick, off, size, dir, for_cpu, site } => {
                        let d = &devs[dev];
                        let mine: Vec<u64> = m.maps.iter().filter(|x| x.0 == d.id()).map(|x| x.2.dma.0).collect();
                        let base = mine.get(pick).copied().unwrap_or(bus_of(dev, 0x1000 + pick as u64 * 0x18));
                        let size = if size == 0 && off == 0x5f { u64::MAX } else { size };
                        let got = t.check_sync(d, DmaAddr(base + off), size, dir, for_cpu, sites[site]).map_err(|r| *r);
                        prop_assert_eq!(got, m.sync(d, base + off, size, dir, for_cpu, sites[site]));
                    }
                    Step::Alloc { dev, at, size, site } => {
                        let dma = bus_of(dev, at * 0x100);
                        t.add_coherent(&devs[dev], 0xffff_0000_0000_0000 + dma, DmaAddr(dma), size, sites[site]);
                        m.alloc(&devs[dev], 0xffff_0000_0000_0000 + dma, dma, size, sites[site]);
                    }
                    Step::Free { dev, pick, cpu, wrong_size, site } => {
                        let d = &devs[dev];
                        let mine: Vec<Allocation> = m.coherent.iter().filter(|x| x.0 == d.id()).map(|x| x.2).collect();
                        let (dma, rcpu, size) = match mine.get(pick) {
                            Some(a) => (a.dma.0, a.cpu, a.size),
                            None => (bus_of(dev, 0x8_0000), 0xffff_0000_0008_0000, 0x1000),
                        };
                        // Some(true): the right CPU address; Some(false): a wrong one.
                        let cpu = cpu.map(|right| if right { rcpu } else { rcpu + 0x1000 });
                        let size = if wrong_size { size * 2 } else { size };
                        let got = t.remove_coherent(d, cpu, DmaAddr(dma), size, sites[site]).map_err(|r| *r);
                        prop_assert_eq!(got, m.free(d, cpu, dma, size, sites[site]));
                    }
                    Step::Teardown { dev, site } => {
                        prop_assert_eq!(t.teardown(&devs[dev], sites[site]), m.teardown(&devs[dev], sites[site]));
                    }
                }
                for d in &devs {
                    prop_assert_eq!(t.live_mappings(Some(d)), m.maps.iter().filter(|x| x.0 == d.id()).count());
                    prop_assert_eq!(t.live_coherent(Some(d)), m.coherent.iter().filter(|x| x.0 == d.id()).count());
                }
                prop_assert_eq!(t.live_mappings(None), m.maps.len());
                prop_assert_eq!(t.live_coherent(None), m.coherent.len());
                for phys in (0x0ff8..0x1500).step_by(0x18) {
                    prop_assert_eq!(t.owner_of(phys).copied(), m.owner(phys), "owner of {:#x}", phys);
                }
                t.check_invariants();
            }
            for d in &devs {
                prop_assert_eq!(t.teardown(d, sites[0]), m.teardown(d, sites[0]));
            }
            prop_assert!(t.lines.spans.is_empty() && t.buses.spans.is_empty());
        }
    }
}
