//! The physical page allocator of the running kernel: one [`BuddyAllocator`] over the span of all
//! RAM banks, fed with every free range of the boot memory map, behind a spin lock.
//!
//! [`init`] runs once in the boot path, after every boot-time reservation (kernel, DTB, heap, CMA
//! areas) is in the memory map: from then on the memory map is history and the pages it calls free
//! belong to this allocator. The metadata (about four bits per page of the span) comes from the
//! memory map's early allocator and is initialised lazily: set-up writes about two hundred words
//! whatever the size of RAM, plus a few per aligned block of each free range, and never loops over
//! pages or over the metadata.
//!
//! [`LockedPages`] (the allocator with its lock) and the set-up helpers [`Layout::of`] and
//! [`populate`] are plain code that the host tests exercise; the global instance and the
//! Linux-shaped functions around it exist only in the kernel.

use core::fmt;

use spin::Mutex;

use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::mm::buddy::{self, AllocError, BuddyAllocator, BuddyError, BuddyStats, FreeError};
use crate::mm::memmap::{HumanSize, MemMapError, MemoryMap};

/// Why the page allocator could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysInitError {
    /// The memory map has no RAM.
    NoRam,
    /// The buddy allocator refused the span or a free range.
    Buddy(BuddyError),
    /// No room in the memory map for the metadata.
    Metadata(MemMapError),
    /// The metadata does not fit in the CPU's address space (a 32-bit CPU with RAM above 4 GiB).
    MetadataUnaddressable { base: PhysAddr, bytes: u64 },
    /// `init` was called a second time.
    AlreadyInitialised,
}

impl fmt::Display for PhysInitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PhysInitError::NoRam => f.write_str("the memory map has no RAM"),
            PhysInitError::Buddy(e) => write!(f, "{e}"),
            PhysInitError::Metadata(e) => write!(f, "no memory for the page allocator's metadata: {e}"),
            PhysInitError::MetadataUnaddressable { base, bytes } => {
                write!(f, "page allocator metadata at {base} ({bytes} bytes) is not addressable by the CPU")
            }
            PhysInitError::AlreadyInitialised => f.write_str("the page allocator is already set up"),
        }
    }
}

/// Error of an allocation or free through the global allocator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysError {
    /// Called before [`init`] (or after it failed).
    NotInitialised,
    Alloc(AllocError),
    Free(FreeError),
}

impl fmt::Display for PhysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PhysError::NotInitialised => f.write_str("the page allocator is not set up"),
            PhysError::Alloc(e) => write!(f, "{e}"),
            PhysError::Free(e) => write!(f, "{e}"),
        }
    }
}

impl From<AllocError> for PhysError {
    fn from(e: AllocError) -> Self {
        PhysError::Alloc(e)
    }
}

impl From<FreeError> for PhysError {
    fn from(e: FreeError) -> Self {
        PhysError::Free(e)
    }
}

/// The span the allocator covers and the metadata it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// From the lowest RAM bank's base (rounded down to a page) ...
    pub span_base: PhysAddr,
    /// ... to the highest bank's end (rounded up to a page), in pages. Holes between banks are
    /// part of the span; they cost metadata bits but are never handed out.
    pub span_pages: u64,
    /// `u64` words of metadata (see [`buddy::metadata_words`]).
    pub metadata_words: usize,
}

impl Layout {
    /// The layout for the RAM of `map`.
    pub fn of(map: &MemoryMap) -> Result<Layout, PhysInitError> {
        let (first, last) = match (map.ram().first(), map.ram().last()) {
            (Some(f), Some(l)) => (f, l),
            _ => return Err(PhysInitError::NoRam),
        };
        let base = first.base().as_u64() & !(PAGE_SIZE - 1);
        let span_pages = last.end().div_ceil(PAGE_SIZE) - base / PAGE_SIZE;
        let span_base = PhysAddr(base);
        let metadata_words = buddy::metadata_words(span_base, span_pages).map_err(PhysInitError::Buddy)?;
        Ok(Layout { span_base, span_pages, metadata_words })
    }

    /// Metadata size in bytes.
    pub fn metadata_bytes(&self) -> u64 {
        self.metadata_words as u64 * 8
    }
}

/// Hands every free range of `map` to `pages`; returns the number of pages added.
pub fn populate(pages: &mut BuddyAllocator<'_>, map: &MemoryMap) -> Result<u64, PhysInitError> {
    let mut added = 0;
    for range in map.free_ranges() {
        added += pages.add_free_range(range.base(), range.size() / PAGE_SIZE).map_err(PhysInitError::Buddy)?;
    }
    Ok(added)
}

/// A buddy allocator behind a spin lock, held for one O(log n) operation and never while waiting
/// for anything else, so every method may be called from any context. This is the type of the
/// kernel's global allocator; tests make their own.
pub struct LockedPages<'m>(Mutex<BuddyAllocator<'m>>);

impl<'m> LockedPages<'m> {
    pub fn new(pages: BuddyAllocator<'m>) -> Self {
        LockedPages(Mutex::new(pages))
    }

    /// 2^order contiguous pages aligned to their size, below `limit` (an exclusive end address)
    /// if given.
    pub fn alloc(&self, order: u32, limit: Option<PhysAddr>) -> Result<PhysAddr, AllocError> {
        let mut p = self.0.lock();
        match limit {
            Some(l) => p.alloc_below(order, l),
            None => p.alloc(order),
        }
    }

    /// Frees a block from [`LockedPages::alloc`]. See [`BuddyAllocator::free`] for the checks.
    pub fn free(&self, addr: PhysAddr, order: u32) -> Result<(), FreeError> {
        self.0.lock().free(addr, order)
    }

    /// `count` contiguous pages (1 ..= 2^MAX_PAGE_ORDER), aligned to the next power of two, whose
    /// whole power-of-two block lies below `limit` if given; the pages beyond `count` stay free.
    pub fn alloc_exact(&self, count: u64, limit: Option<PhysAddr>) -> Result<PhysAddr, AllocError> {
        let mut p = self.0.lock();
        match limit {
            Some(l) => p.alloc_pages_below(count, l),
            None => p.alloc_pages(count),
        }
    }

    /// Frees `count` pages from [`LockedPages::alloc_exact`].
    pub fn free_exact(&self, addr: PhysAddr, count: u64) -> Result<(), FreeError> {
        self.0.lock().free_pages(addr, count)
    }

    pub fn stats(&self) -> BuddyStats {
        self.0.lock().stats()
    }
}

/// What [`init`] set up, for the boot log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysSummary {
    pub layout: Layout,
    /// Where the metadata lives.
    pub metadata: PhysAddr,
    /// Pages handed to the allocator.
    pub free_pages: u64,
}

impl fmt::Display for PhysSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "page allocator: {} pages ({}) free in a span of {} pages at {}; {} of metadata at {}",
            self.free_pages,
            HumanSize(self.free_pages * PAGE_SIZE),
            self.layout.span_pages,
            self.layout.span_base,
            HumanSize(self.layout.metadata_bytes()),
            self.metadata
        )
    }
}

#[cfg(target_os = "none")]
pub use kernel::*;

#[cfg(target_os = "none")]
mod kernel {
    use super::*;
    use crate::mm::memmap::ReservationKind;
    use spin::Once;

    static PAGES: Once<LockedPages<'static>> = Once::new();

    /// Sets up the global page allocator over `map`: takes its metadata from the map (a
    /// reservation named "page allocator"), then hands it every range the map still calls free.
    /// Call once, after every boot-time reservation; nothing may reserve memory in the map
    /// afterwards, since those pages now belong to the allocator.
    pub fn init(map: &mut MemoryMap) -> Result<PhysSummary, PhysInitError> {
        if PAGES.is_completed() {
            return Err(PhysInitError::AlreadyInitialised);
        }
        let layout = Layout::of(map)?;
        let bytes = layout.metadata_bytes();
        let meta = map
            .alloc_early(bytes, PAGE_SIZE, None, ReservationKind::Early, "page allocator")
            .map_err(PhysInitError::Metadata)?;
        let unaddressable = PhysInitError::MetadataUnaddressable { base: meta, bytes };
        let ptr = usize::try_from(meta.as_u64()).map_err(|_| unaddressable)?;
        meta.as_u64().checked_add(bytes).and_then(|end| usize::try_from(end).ok()).ok_or(unaddressable)?;
        // SAFETY: `alloc_early` just reserved [meta, meta + bytes) for this allocator alone and for
        // good; RAM is identity-mapped, writable normal memory (kmap::build), the address is page
        // aligned (so aligned for u64), and its end fits the address space (checked above).
        let words: &'static mut [u64] = unsafe { core::slice::from_raw_parts_mut(ptr as *mut u64, layout.metadata_words) };
        let mut pages = BuddyAllocator::new(layout.span_base, layout.span_pages, words).map_err(PhysInitError::Buddy)?;
        let free_pages = populate(&mut pages, map)?;
        PAGES.call_once(|| LockedPages::new(pages));
        Ok(PhysSummary { layout, metadata: meta, free_pages })
    }

    /// The global allocator, once [`init`] has run.
    pub fn allocator() -> Option<&'static LockedPages<'static>> {
        PAGES.get()
    }

    fn with<T, E: Into<PhysError>>(f: impl FnOnce(&LockedPages<'static>) -> Result<T, E>) -> Result<T, PhysError> {
        f(allocator().ok_or(PhysError::NotInitialised)?).map_err(Into::into)
    }

    /// 2^order contiguous pages aligned to their size, anywhere in RAM (highest addresses first).
    pub fn alloc_pages(order: u32) -> Result<PhysAddr, PhysError> {
        with(|p| p.alloc(order, None))
    }

    /// 2^order contiguous pages aligned to their size, wholly below `limit` (exclusive end
    /// address), for devices that cannot address all of RAM.
    pub fn alloc_pages_below(order: u32, limit: PhysAddr) -> Result<PhysAddr, PhysError> {
        with(|p| p.alloc(order, Some(limit)))
    }

    /// Frees a block from [`alloc_pages`] or [`alloc_pages_below`].
    pub fn free_pages(addr: PhysAddr, order: u32) -> Result<(), PhysError> {
        with(|p| p.free(addr, order))
    }

    /// `count` contiguous pages (Linux's alloc_pages_exact), below `limit` if given; see
    /// [`LockedPages::alloc_exact`].
    pub fn alloc_pages_exact(count: u64, limit: Option<PhysAddr>) -> Result<PhysAddr, PhysError> {
        with(|p| p.alloc_exact(count, limit))
    }

    /// Frees `count` pages from [`alloc_pages_exact`].
    pub fn free_pages_exact(addr: PhysAddr, count: u64) -> Result<(), PhysError> {
        with(|p| p.free_exact(addr, count))
    }

    /// The allocator's counters, `None` before [`init`].
    pub fn stats() -> Option<BuddyStats> {
        allocator().map(LockedPages::stats)
    }
}

#[cfg(target_os = "none")]
mod ktests {
    use super::*;
    use crate::ktest::TestResult;
    use crate::mm::memmap::Region;
    use crate::{kassert, kassert_eq, ktry};

    fn ram_base() -> u64 {
        crate::kernel::boot_info().memmap.lock().ram()[0].base().as_u64()
    }

    /// The allocator owns exactly the pages the memory map calls free (the map's final state,
    /// metadata reservation included), so reserved pages and CMA areas are never handed out.
    fn totals_match_memory_map() -> TestResult {
        let s = stats().ok_or(crate::ktest::NotPassed::Fail("no page allocator".into()))?;
        let map = crate::kernel::boot_info().memmap.lock();
        let free: u64 = map.free_ranges().map(|r| r.size() / PAGE_SIZE).sum();
        kassert_eq!(s.total_pages, free);
        kassert!(s.free_pages <= s.total_pages);
        Ok(())
    }

    /// Blocks below a limit end at or below it, are aligned to their size, and their free restores
    /// the counters.
    fn alloc_free_below_limit() -> TestResult {
        let before = ktry!(stats().ok_or("no page allocator"));
        let limit = PhysAddr(ram_base() + (64 << 20));
        let mut got = alloc::vec::Vec::new();
        for order in [0u32, 3, 4, 9] {
            let a = ktry!(alloc_pages_below(order, limit));
            let bytes = PAGE_SIZE << order;
            kassert!(a.as_u64() + bytes <= limit.as_u64(), "order {order} block at {a} crosses {limit}");
            kassert_eq!(a.as_u64() % bytes, 0, "order {order} block at {a} misaligned");
            got.push((a, order));
        }
        let exact = ktry!(alloc_pages_exact(5, Some(limit)));
        kassert!(exact.as_u64() + 8 * PAGE_SIZE <= limit.as_u64() && exact.as_u64() % (8 * PAGE_SIZE) == 0, "exact at {exact}");
        ktry!(free_pages_exact(exact, 5));
        for (a, order) in got {
            ktry!(free_pages(a, order));
        }
        let after = ktry!(stats().ok_or("no page allocator"));
        kassert_eq!(after.free_pages, before.free_pages);
        kassert_eq!(after.allocs - before.allocs, 5);
        kassert_eq!(after.frees - before.frees, 5);
        Ok(())
    }

    /// A limit below all RAM fails cleanly and counts the failure; a double free is refused.
    fn impossible_requests_fail_cleanly() -> TestResult {
        let before = ktry!(stats().ok_or("no page allocator"));
        let r = alloc_pages_below(0, PhysAddr(ram_base()));
        kassert!(matches!(r, Err(PhysError::Alloc(AllocError::OutOfMemory { .. }))), "{r:?}");
        let a = ktry!(alloc_pages(2));
        ktry!(free_pages(a, 2));
        let again = free_pages(a, 2);
        kassert!(matches!(again, Err(PhysError::Free(FreeError::DoubleFree { .. }))), "{again:?}");
        let after = ktry!(stats().ok_or("no page allocator"));
        kassert_eq!(after.free_pages, before.free_pages);
        kassert_eq!(after.failed_allocs - before.failed_allocs, 1);
        Ok(())
    }

    /// Many blocks of every size class, none overlapping a reservation of the memory map (kernel,
    /// DTB, heap, CMA areas, firmware regions) or another block.
    fn blocks_avoid_reservations() -> TestResult {
        let mut got: alloc::vec::Vec<(PhysAddr, u32)> = alloc::vec::Vec::new();
        let mut check = || -> TestResult {
            for i in 0..64u32 {
                let order = i % 10;
                let a = ktry!(alloc_pages(order));
                let r = Region::new(a, PAGE_SIZE << order).ok_or(crate::ktest::NotPassed::Fail("wrap".into()))?;
                {
                    let map = crate::kernel::boot_info().memmap.lock();
                    kassert!(map.is_ram(&r), "block {r} outside RAM");
                    if let Some(res) = map.overlaps_reservation(&r) {
                        kassert!(false, "block {r} overlaps {res}");
                    }
                }
                for &(b, o) in &got {
                    let other = Region::new(b, PAGE_SIZE << o).ok_or(crate::ktest::NotPassed::Fail("wrap".into()))?;
                    kassert!(!r.overlaps(&other), "blocks {r} and {other} overlap");
                }
                got.push((a, order));
            }
            Ok(())
        };
        let r = check();
        for (a, order) in got {
            ktry!(free_pages(a, order));
        }
        r
    }

    crate::ktest_suite!("phys", [
        totals_match_memory_map,
        alloc_free_below_limit,
        impossible_requests_fail_cleanly,
        blocks_avoid_reservations,
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::memmap::{Region, ReservationKind};

    fn pa(a: u64) -> PhysAddr {
        PhysAddr(a)
    }

    /// Two banks with a hole, a few reservations.
    fn map() -> MemoryMap {
        let mut m = MemoryMap::new();
        m.add_ram(Region::new(pa(0x4000_0000), 0x1000_0000).unwrap()).unwrap();
        m.add_ram(Region::new(pa(0x8000_0000), 0x0800_0000).unwrap()).unwrap();
        m.reserve(pa(0x4020_0000), 0x10_0000, ReservationKind::Kernel, "kernel").unwrap();
        m.reserve(pa(0x4800_0000), 0x400_0000, ReservationKind::Cma, "linux,cma").unwrap();
        m.reserve(pa(0x8000_0800), 0x800, ReservationKind::MemReserve, "#0").unwrap();
        m
    }

    #[test]
    fn layout_spans_all_banks() {
        let l = Layout::of(&map()).unwrap();
        assert_eq!(l.span_base, pa(0x4000_0000));
        assert_eq!(l.span_pages, (0x8800_0000 - 0x4000_0000) / PAGE_SIZE);
        assert_eq!(l.metadata_words, buddy::metadata_words(pa(0x4000_0000), l.span_pages).unwrap());
        assert_eq!(Layout::of(&MemoryMap::new()), Err(PhysInitError::NoRam));
    }

    #[test]
    fn populate_hands_over_exactly_the_free_pages() {
        let m = map();
        let l = Layout::of(&m).unwrap();
        let mut meta = vec![0u64; l.metadata_words];
        let mut b = BuddyAllocator::new(l.span_base, l.span_pages, &mut meta).unwrap();
        let added = populate(&mut b, &m).unwrap();
        // RAM 256 + 128 MiB, minus 1 MiB kernel, 64 MiB CMA, and the page holding the
        // /memreserve/ entry: counted independently of the memory map's free-range code.
        let expect = (0x1000_0000 + 0x0800_0000 - 0x10_0000 - 0x400_0000) / PAGE_SIZE - 1;
        assert_eq!(added, expect);
        let pages = LockedPages::new(b);
        assert_eq!(pages.stats().free_pages, expect);
        // Nothing comes from the CMA area, the kernel or the hole, even when memory runs out.
        let mut got = Vec::new();
        while let Ok(a) = pages.alloc(8, None) {
            got.push(a);
        }
        for &a in &got {
            let (s, e) = (a.as_u64(), a.as_u64() + (PAGE_SIZE << 8));
            assert!(e <= 0x4020_0000 || s >= 0x4030_0000, "{a} in the kernel");
            assert!(e <= 0x4800_0000 || s >= 0x4c00_0000, "{a} in CMA");
            assert!(e <= 0x5000_0000 || s >= 0x8000_0000, "{a} in the hole");
        }
        for a in got {
            pages.free(a, 8).unwrap();
        }
        assert_eq!(pages.stats().free_pages, expect);
    }

    #[test]
    fn locked_pages_limits_and_exact_counts() {
        let m = map();
        let l = Layout::of(&m).unwrap();
        let mut meta = vec![0u64; l.metadata_words];
        let mut b = BuddyAllocator::new(l.span_base, l.span_pages, &mut meta).unwrap();
        populate(&mut b, &m).unwrap();
        let pages = LockedPages::new(b);
        let free = pages.stats().free_pages;
        let a = pages.alloc(4, Some(pa(0x4100_0000))).unwrap();
        assert!(a.as_u64() + 16 * PAGE_SIZE <= 0x4100_0000 && a.as_u64().is_multiple_of(16 * PAGE_SIZE));
        let e = pages.alloc_exact(3, Some(pa(0x4100_0000))).unwrap();
        assert!(e.as_u64() + 4 * PAGE_SIZE <= 0x4100_0000 && e.as_u64().is_multiple_of(4 * PAGE_SIZE));
        assert_eq!(pages.stats().free_pages, free - 16 - 3);
        assert!(matches!(pages.alloc(0, Some(pa(0x4000_0000))), Err(AllocError::OutOfMemory { .. })));
        pages.free_exact(e, 3).unwrap();
        pages.free(a, 4).unwrap();
        assert!(matches!(pages.free(a, 4), Err(FreeError::DoubleFree { .. })));
        assert_eq!(pages.stats().free_pages, free);
    }

    #[test]
    fn summary_line() {
        let l = Layout { span_base: pa(0x4000_0000), span_pages: 0x40000, metadata_words: 12345 };
        let s = PhysSummary { layout: l, metadata: pa(0x7fbf_c000), free_pages: 0x3f000 };
        assert_eq!(
            format!("{s}"),
            "page allocator: 258048 pages (1008 MiB) free in a span of 262144 pages at 0x40000000; 96.4 KiB of metadata at 0x7fbfc000"
        );
    }
}
