//! dma-debug (Linux's CONFIG_DMA_API_DEBUG), bootarg `dma_debug=on|guard`: every streaming mapping
//! and coherent allocation is tracked per device ([`super::debug_track::Tracker`]) and each API
//! call is checked against that record. A misuse is reported as a KTAP diagnostic
//! (`# dma-debug: ...`, naming the device, the addresses and the callers) and, where going on
//! would corrupt memory (an unmap or free that matches no record, or the wrong one; a sync outside
//! a mapping), the call is refused with [`DmaError::Debug`] and changes nothing.
//!
//! `dma_debug=guard` adds an ownership guard, beyond Linux: while a streaming buffer belongs to
//! the device (from map or sync for the device until unmap or sync for the CPU), the CPU loses
//! its access to the pages the buffer covers entirely, so a CPU access faults and is reported
//! with the mapping's device and caller (instead of silently reading stale data, or writing data
//! the device never sees, on real hardware). A from-device or bidirectional buffer's pages are
//! unmapped from the linear map; a to-device buffer's are made read-only, since reading what the
//! device reads is harmless (the same buffer may go to several devices, or through several
//! bounce buffers, at once) while a write is the mistake. A page under several mappings gets the
//! strictest of their restrictions. Bytes in pages the buffer shares with other data cannot be unmapped; for a
//! to-device buffer they are snapshotted when the device takes the buffer and compared when it
//! hands it back, so a CPU write there is reported too. (For from-device and bidirectional
//! buffers the device may change those bytes itself, so a comparison would prove nothing; their
//! whole pages are guarded all the same.) Splitting a linear-map block for the guard is done
//! break-before-make while only this CPU runs the page-table code: the guard is a debugging mode
//! for one CPU.
//!
//! Reports are kept (the last [`LOG_LIMIT`]) for the test suites, which commit misuse on purpose
//! and take the reports they expect with [`take_reports`]; the KTAP runner fails any case that
//! leaves a report behind.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU8, Ordering};

use spin::Mutex;

use super::api::DmaError;
use super::busmap::DmaAddr;
use super::debug_track::{Caller, Entry, MapKind, NewMapping, Op, Report, ReportKind, Tracker};
use super::maint::Direction;
use super::Device;
use crate::mm::addr::{align_down, align_up, PhysAddr, PAGE_SIZE};
use crate::mm::kmap;
use crate::mm::pgtable::{MemAttr, Perms};
use crate::println;

/// How many reports are kept for [`take_reports`].
pub const LOG_LIMIT: usize = 64;

/// What `dma_debug=` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Off = 0,
    On = 1,
    Guard = 2,
}

static MODE: AtomicU8 = AtomicU8::new(Mode::Off as u8);
static TRACKER: Mutex<Option<Tracker>> = Mutex::new(None);
static LOG: Mutex<Vec<Report>> = Mutex::new(Vec::new());
static GUARD: Mutex<GuardState> = Mutex::new(GuardState { pages: BTreeMap::new(), owned: BTreeMap::new() });

/// Reads `dma_debug=` (`on`, `guard`, `off`; absent: off) and sets the tracker up.
pub fn init(value: Option<&str>) {
    let mode = match value {
        None | Some("off") => Mode::Off,
        Some("on") => Mode::On,
        Some("guard") => Mode::Guard,
        Some(other) => {
            println!("dma-debug: unknown dma_debug={other} (expected on, guard or off); using on");
            Mode::On
        }
    };
    if mode != Mode::Off {
        *TRACKER.lock() = Some(Tracker::new(crate::arch::cache::line_size() as u64));
        println!("dma-debug: {}", if mode == Mode::Guard { "on, with the ownership guard" } else { "on" });
    }
    MODE.store(mode as u8, Ordering::Release);
}

/// Whether dma-debug checks the API (the one test on the fast paths).
#[inline(always)]
pub fn enabled() -> bool {
    MODE.load(Ordering::Relaxed) != Mode::Off as u8
}

/// Whether the ownership guard is on (`dma_debug=guard`).
pub fn guarding() -> bool {
    MODE.load(Ordering::Relaxed) == Mode::Guard as u8
}

fn report(r: Report) {
    println!("# dma-debug: {r}");
    keep(&mut LOG.lock(), r);
}

/// Adds `r` to the log, dropping the oldest report when it is full.
fn keep(log: &mut Vec<Report>, r: Report) {
    if log.len() == LOG_LIMIT {
        log.remove(0);
    }
    log.push(r);
}

fn refuse(r: Report) -> DmaError {
    let kind = r.kind;
    report(r);
    DmaError::Debug(kind)
}

/// The reports made since the last call, oldest first (tests that misuse the API on purpose).
pub fn take_reports() -> Vec<Report> {
    core::mem::take(&mut *LOG.lock())
}

/// How many reports wait to be taken (the KTAP runner fails a case that leaves any).
pub fn pending_reports() -> usize {
    LOG.lock().len()
}

fn with_tracker<R>(f: impl FnOnce(&mut Tracker) -> R) -> Option<R> {
    TRACKER.lock().as_mut().map(f)
}

/// A streaming mapping was made. `checked` is false for the Linux-shaped calls whose failure the
/// driver must test with `dma_mapping_error`.
pub fn mapped(dev: &Device, phys: PhysAddr, dma: DmaAddr, size: u64, dir: Direction, kind: MapKind, checked: bool, caller: Caller) {
    let m = NewMapping { phys, dma, size, dir, kind, checked, caller };
    if let Some(Err(r)) = with_tracker(|t| t.add_mapping(dev, m)) {
        report(*r);
    }
    if guarding() {
        take(dev, dma, phys, size, dir, caller);
    }
}

/// The driver checked the mapping at `dma` for an error.
pub fn checked(dev: &Device, dma: DmaAddr) {
    with_tracker(|t| t.mark_checked(dev, dma));
}

/// Before an unmap: `Err` (reported) if it matches no live mapping, or the wrong one. The guard
/// hands the pages back to the CPU first, so the back end's maintenance and copies can reach them.
pub fn unmapping(dev: &Device, dma: DmaAddr, size: u64, dir: Direction, kind: MapKind, caller: Caller) -> Result<(), DmaError> {
    let removed = with_tracker(|t| t.remove_mapping(dev, dma, size, dir, kind, caller));
    match removed {
        None => Ok(()),
        Some(Err(r)) => Err(refuse(*r)),
        Some(Ok(removed)) => {
            if let Some(r) = removed.report {
                report(r);
            }
            if guarding() {
                give(dev, &removed.entry, Op::Unmap, caller);
            }
            Ok(())
        }
    }
}

/// Before a sync: `Err` (reported) if the range is not inside a live mapping of the device, or
/// the direction is wrong. A sync for the CPU hands guarded pages back first.
pub fn syncing(dev: &Device, dma: DmaAddr, size: u64, dir: Direction, for_cpu: bool, caller: Caller) -> Result<(), DmaError> {
    let owner = with_tracker(|t| t.check_sync(dev, dma, size, dir, for_cpu, caller).map(|()| t.find_covering(dev, dma)));
    match owner {
        None => Ok(()),
        Some(Err(r)) => Err(refuse(*r)),
        Some(Ok(entry)) => {
            if let (true, true, Some(e)) = (guarding(), for_cpu, entry) {
                give(dev, &e, Op::SyncForCpu, caller);
            }
            Ok(())
        }
    }
}

/// After a sync for the device: the guard takes the buffer away from the CPU again.
pub fn synced_for_device(dev: &Device, dma: DmaAddr, caller: Caller) {
    if !guarding() {
        return;
    }
    if let Some(Some(e)) = with_tracker(|t| t.find_covering(dev, dma)) {
        take(dev, e.dma, e.phys, e.size, e.dir, caller);
    }
}

/// A coherent allocation was made.
pub fn allocated(dev: &Device, cpu: u64, dma: DmaAddr, size: u64, caller: Caller) {
    with_tracker(|t| t.add_coherent(dev, cpu, dma, size, caller));
}

/// Before a coherent free: `Err` (reported) for the wrong address or size.
pub fn freeing(dev: &Device, cpu: Option<u64>, dma: DmaAddr, size: u64, caller: Caller) -> Result<(), DmaError> {
    match with_tracker(|t| t.remove_coherent(dev, cpu, dma, size, caller)) {
        Some(Err(r)) => Err(refuse(*r)),
        _ => Ok(()),
    }
}

/// The device goes away: every mapping and allocation it still has is reported as a leak and
/// forgotten. Returns how many there were.
pub fn teardown(dev: &Device, caller: Caller) -> usize {
    let leaks = with_tracker(|t| t.teardown(dev, caller)).unwrap_or_default();
    let n = leaks.len();
    for r in leaks {
        if let Some(super::debug_track::Record::Mapping(e)) = r.record {
            if guarding() {
                give(dev, &e, Op::Teardown, caller);
            }
        }
        report(r);
    }
    n
}

/// Live streaming mappings and coherent allocations (of `dev`, or of every device).
pub fn live(dev: Option<&Device>) -> (usize, usize) {
    with_tracker(|t| (t.live_mappings(dev), t.live_coherent(dev))).unwrap_or((0, 0))
}

// --- the ownership guard ---------------------------------------------------------------------

/// A linear-map page the guard restricts: how many device-owned buffers want it read-only
/// (to-device) or unmapped (the others), and the attributes to put back.
struct TakenPage {
    read_only: u32,
    unmapped: u32,
    attr: MemAttr,
    perms: Perms,
}

/// What the CPU may do with a page.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Full,
    ReadOnly,
    None,
}

impl TakenPage {
    fn access(&self) -> Access {
        match (self.unmapped, self.read_only) {
            (0, 0) => Access::Full,
            (0, _) => Access::ReadOnly,
            _ => Access::None,
        }
    }
}

/// Changes the linear-map entry of `page` from access `from` to `to`.
fn apply(page: u64, t: &TakenPage, from: Access, to: Access) {
    let r = match (from, to) {
        (a, b) if a == b => Ok(()),
        (_, Access::None) => kmap::unmap(page, PAGE_SIZE).map(|_| ()),
        (Access::None, Access::ReadOnly) => kmap::map_dynamic(page, PhysAddr(page), PAGE_SIZE, t.attr, Perms { write: false, ..t.perms }),
        (Access::None, _) => kmap::map_dynamic(page, PhysAddr(page), PAGE_SIZE, t.attr, t.perms),
        (_, Access::ReadOnly) => kmap::set_attributes(page, PAGE_SIZE, t.attr, Perms { write: false, ..t.perms }),
        (_, _) => kmap::set_attributes(page, PAGE_SIZE, t.attr, t.perms),
    };
    if let Err(e) = r {
        println!("dma-debug: guard: cannot change the access to {page:#x}: {e}");
    }
}

/// The bytes of a to-device buffer in pages it shares, as they were when the device took it.
struct Edges {
    parts: Vec<(u64, Vec<u8>)>,
}

struct GuardState {
    pages: BTreeMap<u64, TakenPage>,
    /// Buffers the device owns now, by (device id, bus address), with their edge snapshots.
    owned: BTreeMap<(u32, u64), Edges>,
}

/// The pages `[phys, phys + size)` covers entirely, and the partial ranges at its edges.
fn split(phys: u64, size: u64) -> (u64, u64, [(u64, u64); 2]) {
    let end = phys.saturating_add(size);
    let (first, last) = match (align_up(phys, PAGE_SIZE), align_down(end, PAGE_SIZE)) {
        (Some(f), l) if f < l => (f, l),
        _ => return (0, 0, [(phys, end), (end, end)]),
    };
    (first, last, [(phys, first), (last, end)])
}

fn take(dev: &Device, dma: DmaAddr, phys: PhysAddr, size: u64, dir: Direction, _caller: Caller) {
    let mut g = GUARD.lock();
    if g.owned.contains_key(&(dev.id(), dma.0)) {
        return;
    }
    let (first, last, edges) = split(phys.0, size);
    let parts = if dir == Direction::ToDevice {
        edges
            .iter()
            .filter(|(b, e)| e > b)
            // SAFETY: bytes of the caller's buffer, mapped by the linear map (they lie in pages
            // the guard does not unmap).
            .map(|&(b, e)| (b, unsafe { core::slice::from_raw_parts(b as usize as *const u8, (e - b) as usize) }.to_vec()))
            .collect()
    } else {
        Vec::new()
    };
    g.owned.insert((dev.id(), dma.0), Edges { parts });
    let mut page = first;
    while page < last {
        if !g.pages.contains_key(&page) {
            match kmap::translate(page).filter(|t| t.pa.0 == page && !t.attr.is_device()) {
                Some(tr) => {
                    g.pages.insert(page, TakenPage { read_only: 0, unmapped: 0, attr: tr.attr, perms: tr.perms });
                }
                None => {
                    page += PAGE_SIZE;
                    continue;
                }
            }
        }
        if let Some(t) = g.pages.get_mut(&page) {
            let from = t.access();
            if dir == Direction::ToDevice {
                t.read_only += 1;
            } else {
                t.unmapped += 1;
            }
            apply(page, t, from, t.access());
        }
        page += PAGE_SIZE;
    }
}

fn give(dev: &Device, entry: &Entry, op: Op, caller: Caller) {
    let mut g = GUARD.lock();
    let Some(edges) = g.owned.remove(&(dev.id(), entry.dma.0)) else { return };
    let (first, last, _) = split(entry.phys.0, entry.size);
    let mut page = first;
    while page < last {
        if let Some(t) = g.pages.get_mut(&page) {
            let from = t.access();
            if entry.dir == Direction::ToDevice {
                t.read_only = t.read_only.saturating_sub(1);
            } else {
                t.unmapped = t.unmapped.saturating_sub(1);
            }
            apply(page, t, from, t.access());
            if t.access() == Access::Full {
                g.pages.remove(&page);
            }
        }
        page += PAGE_SIZE;
    }
    drop(g);
    for (base, before) in edges.parts {
        // SAFETY: the same edge bytes as in `take`, still mapped.
        let now = unsafe { core::slice::from_raw_parts(base as usize as *const u8, before.len()) };
        if let Some(i) = now.iter().zip(&before).position(|(a, b)| a != b) {
            report(Report::guard(ReportKind::EdgeChangedWhileDeviceOwns, op, entry, PhysAddr(base + i as u64), None, caller));
        }
    }
}

/// Called by the exception handlers on a data abort at `addr` (before deciding whether it was
/// expected): if the guard took the page away, reports the access with the owning mapping.
/// Never blocks: if the guard's or the tracker's state is locked (the fault hit dma-debug itself),
/// it reports nothing.
pub fn guard_fault(addr: u64, pc: u64) {
    if !guarding() {
        return;
    }
    let Some(g) = GUARD.try_lock() else { return };
    if !g.pages.contains_key(&align_down(addr, PAGE_SIZE)) {
        return;
    }
    drop(g);
    let Some(tracker) = TRACKER.try_lock() else { return };
    let Some(entry) = tracker.as_ref().and_then(|t| t.owner_of(addr)).copied() else { return };
    drop(tracker);
    let r = Report::guard(ReportKind::CpuAccessWhileDeviceOwns, Op::CpuAccess, &entry, PhysAddr(addr), Some(pc), entry.caller);
    if let Some(mut log) = LOG.try_lock() {
        crate::console::emergency_print(format_args!("# dma-debug: {r}\n"));
        keep(&mut log, r);
    }
}
