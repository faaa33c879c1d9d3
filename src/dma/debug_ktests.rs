//! KTAP suite `dma_debug`: every dma-debug check, triggered on purpose on the running kernel, and
//! the report it must produce (kind, device, addresses, the caller's file and line); then the
//! ownership guard's two cases. Needs `dma_debug=on` (the guard cases `dma_debug=guard`), and
//! skips otherwise.

use alloc::vec;
use alloc::vec::Vec;

use super::api::{DmaAttrs, DmaError, SgEntry};
use super::busmap::{BusMap, DmaAddr};
use super::debug::{self, take_reports};
use super::debug_track::{MapKind, Record, Report, ReportKind};
use super::maint::Direction;
use super::{Device, GfpFlags};
use crate::arch;
use crate::ktest::TestResult;
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::{kassert, kassert_eq, kskip, ktry};

fn device(name: &str) -> Device {
    Device::with_bus(name, BusMap::IDENTITY, true)
}

fn need_debug() -> TestResult {
    if !debug::enabled() {
        kskip!("dma_debug is off");
    }
    Ok(())
}

/// The one report the misuse must have made: its kind, device and bus address, and a caller in
/// this file at `line` (the misusing call).
fn expect(kind: ReportKind, dev: &Device, dma: DmaAddr, line: u32) -> Result<Report, crate::ktest::NotPassed> {
    let reports = take_reports();
    kassert_eq!(reports.len(), 1, "reports: {:?}", reports.iter().map(|r| r.kind).collect::<Vec<_>>());
    let r = reports[0];
    kassert_eq!(r.kind, kind, "{r}");
    kassert_eq!(r.device.as_str(), dev.name(), "{r}");
    kassert_eq!(r.dma, dma, "{r}");
    kassert_eq!((r.caller.file(), r.caller.line()), (file!(), line), "caller of {r}");
    Ok(r)
}

/// A buffer of whole pages from the page allocator, freed on drop.
struct Pages(PhysAddr, u32);

impl Pages {
    fn new(order: u32) -> Result<Pages, crate::ktest::NotPassed> {
        Ok(Pages(ktry!(crate::mm::phys::alloc_pages(order)), order))
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        let _ = crate::mm::phys::free_pages(self.0, self.1);
    }
}

fn unmap_never_mapped() -> TestResult {
    need_debug()?;
    let dev = device("dbg-never");
    let buf = Pages::new(0)?;
    let line = line!() + 1;
    let r = dev.unmap_phys(DmaAddr(buf.0 .0), 256, Direction::ToDevice, DmaAttrs::NONE);
    kassert_eq!(r, Err(DmaError::Debug(ReportKind::NeverMapped)));
    expect(ReportKind::NeverMapped, &dev, DmaAddr(buf.0 .0), line)?;
    Ok(())
}

/// Wrong size, then wrong direction: each refused with the mapping left live; the right unmap
/// then works and reports nothing.
fn unmap_wrong_size_and_direction() -> TestResult {
    need_debug()?;
    let dev = device("dbg-wrong");
    let buf = Pages::new(1)?;
    let map_line = line!() + 1;
    let dma = ktry!(dev.map_phys(buf.0, 8192, Direction::FromDevice, DmaAttrs::NONE));
    let line = line!() + 1;
    kassert_eq!(dev.unmap_phys(dma, 4096, Direction::FromDevice, DmaAttrs::NONE), Err(DmaError::Debug(ReportKind::WrongSize)));
    let r = expect(ReportKind::WrongSize, &dev, dma, line)?;
    kassert_eq!(r.mapped_at.map(|l| l.line()), Some(map_line), "the mapping's caller");
    let line = line!() + 1;
    kassert_eq!(dev.unmap_phys(dma, 8192, Direction::ToDevice, DmaAttrs::NONE), Err(DmaError::Debug(ReportKind::WrongDirection)));
    expect(ReportKind::WrongDirection, &dev, dma, line)?;
    ktry!(dev.unmap_phys(dma, 8192, Direction::FromDevice, DmaAttrs::NONE));
    kassert!(take_reports().is_empty());
    Ok(())
}

/// Single versus page versus scatter-gather: each mapping must end through its own call.
fn unmap_wrong_kind() -> TestResult {
    need_debug()?;
    let dev = device("dbg-kind");
    let buf = Pages::new(1)?;
    let dma = ktry!(dev.map_page(buf.0, 128, 512, Direction::ToDevice, DmaAttrs::NONE));
    let line = line!() + 1;
    kassert_eq!(dev.unmap_phys(dma, 512, Direction::ToDevice, DmaAttrs::NONE), Err(DmaError::Debug(ReportKind::WrongKind)));
    let r = expect(ReportKind::WrongKind, &dev, dma, line)?;
    kassert_eq!(r.map_kind, Some(MapKind::Single), "the unmap's kind");
    kassert!(matches!(r.record, Some(Record::Mapping(e)) if e.kind == MapKind::Page), "{r}");
    ktry!(dev.unmap_page(dma, 512, Direction::ToDevice, DmaAttrs::NONE));
    let mut sg = [SgEntry::new(buf.0, 4096), SgEntry::new(PhysAddr(buf.0 .0 + 4096), 4096)];
    ktry!(dev.map_sg(&mut sg, Direction::ToDevice, DmaAttrs::NONE));
    let seg = ktry!(sg[1].dma.ok_or("segment not mapped"));
    let line = line!() + 1;
    kassert_eq!(dev.unmap_page(seg, 4096, Direction::ToDevice, DmaAttrs::NONE), Err(DmaError::Debug(ReportKind::WrongKind)));
    expect(ReportKind::WrongKind, &dev, seg, line)?;
    ktry!(dev.unmap_sg(&mut sg, Direction::ToDevice, DmaAttrs::NONE));
    kassert!(take_reports().is_empty());
    Ok(())
}

fn double_unmap() -> TestResult {
    need_debug()?;
    let dev = device("dbg-double");
    let buf = Pages::new(0)?;
    let dma = ktry!(dev.map_phys(buf.0, 4096, Direction::Bidirectional, DmaAttrs::NONE));
    let first = line!() + 1;
    ktry!(dev.unmap_phys(dma, 4096, Direction::Bidirectional, DmaAttrs::NONE));
    let line = line!() + 1;
    kassert_eq!(dev.unmap_phys(dma, 4096, Direction::Bidirectional, DmaAttrs::NONE), Err(DmaError::Debug(ReportKind::DoubleUnmap)));
    let r = expect(ReportKind::DoubleUnmap, &dev, dma, line)?;
    kassert_eq!(r.unmapped_at.map(|l| l.line()), Some(first), "where it was unmapped first");
    Ok(())
}

/// A sync in the wrong direction, and one reaching past the mapping: refused.
fn sync_wrong_direction_or_outside() -> TestResult {
    need_debug()?;
    let dev = device("dbg-sync");
    let buf = Pages::new(0)?;
    let dma = ktry!(dev.map_phys(buf.0, 2048, Direction::ToDevice, DmaAttrs::NONE));
    let line = line!() + 1;
    kassert_eq!(dev.sync_for_cpu(dma, 2048, Direction::FromDevice), Err(DmaError::Debug(ReportKind::SyncWrongDirection)));
    expect(ReportKind::SyncWrongDirection, &dev, dma, line)?;
    let past = DmaAddr(dma.0 + 1024);
    let line = line!() + 1;
    kassert_eq!(dev.sync_for_device(past, 2048, Direction::ToDevice), Err(DmaError::Debug(ReportKind::SyncOutsideMapping)));
    expect(ReportKind::SyncOutsideMapping, &dev, past, line)?;
    ktry!(dev.sync_for_device(DmaAddr(dma.0 + 1024), 1024, Direction::ToDevice));
    ktry!(dev.unmap_phys(dma, 2048, Direction::ToDevice, DmaAttrs::NONE));
    kassert!(take_reports().is_empty());
    Ok(())
}

/// `dma_free_coherent` with the wrong size, then the wrong address: refused, the buffer stays
/// live; the right free works.
fn free_coherent_wrong_size_or_address() -> TestResult {
    need_debug()?;
    let dev = device("dbg-free");
    let (cpu, dma) = ktry!(dev.dma_alloc_coherent(3 * PAGE_SIZE, GfpFlags::KERNEL));
    let line = line!() + 1;
    kassert_eq!(dev.dma_free_coherent(2 * PAGE_SIZE, cpu, dma), Err(DmaError::Debug(ReportKind::FreeWrongSize)));
    expect(ReportKind::FreeWrongSize, &dev, dma, line)?;
    let other = DmaAddr(dma.0 + PAGE_SIZE);
    let line = line!() + 1;
    kassert_eq!(dev.dma_free_coherent(3 * PAGE_SIZE, cpu, other), Err(DmaError::Debug(ReportKind::FreeWrongAddress)));
    expect(ReportKind::FreeWrongAddress, &dev, other, line)?;
    let wrong_cpu = ktry!(core::ptr::NonNull::new(cpu.as_ptr().wrapping_add(64)).ok_or("null"));
    let line = line!() + 1;
    kassert_eq!(dev.dma_free_coherent(3 * PAGE_SIZE, wrong_cpu, dma), Err(DmaError::Debug(ReportKind::FreeWrongAddress)));
    expect(ReportKind::FreeWrongAddress, &dev, dma, line)?;
    ktry!(dev.dma_free_coherent(3 * PAGE_SIZE, cpu, dma));
    kassert!(take_reports().is_empty());
    Ok(())
}

/// A mapping from the Linux-shaped `dma_map_single` whose error was never tested is reported at
/// its unmap (which still happens); a tested one is not.
fn mapping_error_never_checked() -> TestResult {
    need_debug()?;
    let dev = device("dbg-unchecked");
    let buf = Pages::new(0)?;
    let dma = dev.dma_map_single(buf.0, 4096, Direction::ToDevice);
    let line = line!() + 1;
    ktry!(dev.unmap_phys(dma, 4096, Direction::ToDevice, DmaAttrs::NONE));
    expect(ReportKind::ErrorNotChecked, &dev, dma, line)?;
    let dma = dev.dma_map_single(buf.0, 4096, Direction::ToDevice);
    kassert!(!dev.dma_mapping_error(dma));
    ktry!(dev.unmap_phys(dma, 4096, Direction::ToDevice, DmaAttrs::NONE));
    kassert!(take_reports().is_empty(), "a checked mapping was reported");
    Ok(())
}

/// Two live from-device mappings in one cache line: reported (the second is still made).
fn from_device_mappings_share_a_cache_line() -> TestResult {
    need_debug()?;
    let line_size = arch::cache::line_size() as u64;
    let (a, b) = (device("dbg-line-a"), device("dbg-line-b"));
    let buf = Pages::new(0)?;
    let half = line_size / 2;
    let da = ktry!(a.map_phys(buf.0, half, Direction::FromDevice, DmaAttrs::NONE));
    let line = line!() + 1;
    let db = ktry!(b.map_phys(PhysAddr(buf.0 .0 + half), half, Direction::FromDevice, DmaAttrs::NONE));
    let r = expect(ReportKind::CacheLineOverlap, &b, db, line)?;
    kassert!(matches!(r.record, Some(Record::Mapping(e)) if e.device.as_str() == "dbg-line-a"), "{r}");
    ktry!(b.unmap_phys(db, half, Direction::FromDevice, DmaAttrs::NONE));
    // A to-device neighbour is fine: its maintenance is a clean, which destroys nothing.
    let dt = ktry!(b.map_phys(PhysAddr(buf.0 .0 + half), half, Direction::ToDevice, DmaAttrs::NONE));
    kassert!(take_reports().is_empty());
    ktry!(b.unmap_phys(dt, half, Direction::ToDevice, DmaAttrs::NONE));
    ktry!(a.unmap_phys(da, half, Direction::FromDevice, DmaAttrs::NONE));
    Ok(())
}

/// A device torn down with two mappings and a coherent buffer live: three leaks, each with the
/// caller that made it.
fn teardown_reports_leaks() -> TestResult {
    need_debug()?;
    let dev = device("dbg-leaky");
    let buf = Pages::new(1)?;
    let l1 = line!() + 1;
    ktry!(dev.map_phys(buf.0, 4096, Direction::ToDevice, DmaAttrs::NONE));
    ktry!(dev.map_page(buf.0, 4096, 4096, Direction::FromDevice, DmaAttrs::NONE));
    let l3 = line!() + 1;
    let (_cpu, _dma) = ktry!(dev.dma_alloc_coherent(PAGE_SIZE, GfpFlags::KERNEL));
    let here = line!() + 1;
    kassert_eq!(dev.teardown(), 3);
    let reports = take_reports();
    kassert!(reports.iter().all(|r| r.kind == ReportKind::Leak && r.caller.line() == here), "{reports:?}");
    let mut made: Vec<u32> = reports.iter().filter_map(|r| r.mapped_at.map(|l| l.line())).collect();
    made.sort_unstable();
    kassert_eq!(made, vec![l1, l1 + 1, l3]);
    kassert_eq!(debug::live(Some(&dev)), (0, 0));
    Ok(())
}

fn need_guard() -> TestResult {
    if !debug::guarding() {
        kskip!("dma_debug=guard is not on");
    }
    Ok(())
}

/// While the device owns a buffer the CPU cannot touch its whole pages: a read faults and is
/// reported with the mapping; sync for the CPU gives them back, sync for the device takes them
/// again, and the unmap restores them with the data intact.
fn guard_faults_cpu_access_to_device_owned_pages() -> TestResult {
    need_guard()?;
    let dev = device("dbg-guard");
    let buf = Pages::new(2)?;
    let base = buf.0 .0 as usize;
    // SAFETY: the four pages just allocated for this test.
    unsafe { core::ptr::write_bytes(base as *mut u8, 0x3c, 4 * PAGE_SIZE as usize) };
    let map_line = line!() + 1;
    let dma = ktry!(dev.map_phys(buf.0, 4 * PAGE_SIZE, Direction::FromDevice, DmaAttrs::NONE));
    let target = base + 2 * PAGE_SIZE as usize + 8;
    match arch::probe::read_u64(target) {
        Err(f) => kassert!(f.is_translation(), "not a translation fault: {f:?}"),
        Ok(v) => kassert!(false, "read of a device-owned page returned {v:#x}"),
    }
    let reports = take_reports();
    kassert_eq!(reports.len(), 1, "{reports:?}");
    let r = reports[0];
    kassert_eq!(r.kind, ReportKind::CpuAccessWhileDeviceOwns, "{r}");
    kassert_eq!(r.device.as_str(), "dbg-guard");
    kassert_eq!(r.phys, Some(PhysAddr(target as u64)));
    kassert_eq!(r.mapped_at.map(|l| (l.file(), l.line())), Some((file!(), map_line)));
    ktry!(dev.sync_for_cpu(dma, 4 * PAGE_SIZE, Direction::FromDevice));
    kassert_eq!(arch::probe::read_u64(target).ok(), Some(0x3c3c_3c3c_3c3c_3c3c), "after sync for the CPU");
    ktry!(dev.sync_for_device(dma, 4 * PAGE_SIZE, Direction::FromDevice));
    kassert!(arch::probe::read_u64(target).is_err(), "sync for the device did not take the page again");
    take_reports();
    ktry!(dev.unmap_phys(dma, 4 * PAGE_SIZE, Direction::FromDevice, DmaAttrs::NONE));
    kassert_eq!(arch::probe::read_u64(target).ok(), Some(0x3c3c_3c3c_3c3c_3c3c), "after the unmap");
    kassert!(take_reports().is_empty());
    // A to-device buffer's pages are read-only: reading is harmless, a write faults.
    let dma = ktry!(dev.map_phys(buf.0, 4 * PAGE_SIZE, Direction::ToDevice, DmaAttrs::NONE));
    kassert_eq!(arch::probe::read_u64(target).ok(), Some(0x3c3c_3c3c_3c3c_3c3c), "read of a to-device page");
    // SAFETY: the write is expected to fault; if it did not, it writes back the value just read.
    match unsafe { arch::probe::write_u64(target, 0x3c3c_3c3c_3c3c_3c3c) } {
        Err(f) => kassert!(f.is_permission(), "not a permission fault: {f:?}"),
        Ok(()) => kassert!(false, "write to a to-device page did not fault"),
    }
    let r = take_reports();
    kassert!(r.len() == 1 && r[0].kind == ReportKind::CpuAccessWhileDeviceOwns && r[0].dir == Some(Direction::ToDevice), "{r:?}");
    ktry!(dev.unmap_phys(dma, 4 * PAGE_SIZE, Direction::ToDevice, DmaAttrs::NONE));
    // SAFETY: the page is the test's again.
    kassert!(unsafe { arch::probe::write_u64(target, 1) }.is_ok(), "page not writable after the unmap");
    Ok(())
}

/// The bytes of a to-device buffer in pages it shares cannot be unmapped: a CPU write there is
/// found by the edge check at the unmap.
fn guard_catches_writes_to_shared_edge_pages() -> TestResult {
    need_guard()?;
    let dev = device("dbg-edges");
    let buf = Pages::new(2)?;
    // From 100 bytes into the first page to 100 bytes into the fourth: two whole pages in the
    // middle, partial pages at both ends.
    let start = buf.0 .0 + 100;
    let len = 3 * PAGE_SIZE;
    let dma = ktry!(dev.map_phys(PhysAddr(start), len, Direction::ToDevice, DmaAttrs::NONE));
    let last = (start + len - 1) as usize;
    // SAFETY: the last byte of the buffer, in the fourth page, which stays mapped (shared edge).
    unsafe { core::ptr::write_volatile(last as *mut u8, 0x77) };
    let line = line!() + 1;
    ktry!(dev.unmap_phys(dma, len, Direction::ToDevice, DmaAttrs::NONE));
    let r = expect(ReportKind::EdgeChangedWhileDeviceOwns, &dev, dma, line)?;
    kassert_eq!(r.phys, Some(PhysAddr(last as u64)));
    // Untouched edges stay quiet.
    let dma = ktry!(dev.map_phys(PhysAddr(start), len, Direction::ToDevice, DmaAttrs::NONE));
    ktry!(dev.unmap_phys(dma, len, Direction::ToDevice, DmaAttrs::NONE));
    kassert!(take_reports().is_empty());
    Ok(())
}

crate::ktest_suite!("dma_debug", [
    unmap_never_mapped,
    unmap_wrong_size_and_direction,
    unmap_wrong_kind,
    double_unmap,
    sync_wrong_direction_or_outside,
    free_coherent_wrong_size_or_address,
    mapping_error_never_checked,
    from_device_mappings_share_a_cache_line,
    teardown_reports_leaks,
    guard_faults_cpu_access_to_device_owned_pages,
    guard_catches_writes_to_shared_edge_pages,
]);
