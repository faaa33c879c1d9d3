//! The physical page allocator of the running kernel: one [`BuddyAllocator`] over the span of all
//! RAM banks, fed with every free range of the boot memory map, behind a spin lock.
//!
//! [`init`] runs once in the boot path, after every boot-time reservation (kernel, DTB, heap, CMA
//! areas) is in the memory map: from then on the memory map is history and the pages it calls free
//! belong to this allocator. The metadata (about five bits per page of the span: four for the
//! buddy allocator, one for the page cache) comes from the memory map's early allocator and is
//! initialised lazily: set-up writes about two hundred words whatever the size of RAM, plus a few
//! per aligned block of each free range, and never loops over pages or over the metadata.
//!
//! Single pages, the most frequent request (page tables, one-page DMA buffers), are served by a
//! small page cache in front of the buddy allocator, Linux's per-CPU page lists: see
//! [`LockedPages`].
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
    /// `u64` words of the buddy allocator's metadata (see [`buddy::metadata_words`]).
    pub metadata_words: usize,
    /// `u64` words of the page cache's record of lent pages (see [`PageSet::metadata_words`]),
    /// after the buddy allocator's.
    pub cache_words: usize,
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
        let cache_words = PageSet::metadata_words(span_base, span_pages).map_err(PhysInitError::Buddy)?;
        Ok(Layout { span_base, span_pages, metadata_words, cache_words })
    }

    /// Metadata size in bytes, both parts.
    pub fn metadata_bytes(&self) -> u64 {
        (self.metadata_words as u64 + self.cache_words as u64) * 8
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

/// A set of the pages of a span, one bit each, in caller-given metadata that needs no
/// initialisation: set-up writes one word whatever the size of the span, and no operation loops
/// over pages. For the page cache's record of the pages it lent, checked at every single-page free.
///
/// The bits sit in a tree. Level 0 has one bit per page; each level above has one bit per word of
/// the level below, set once that word is *initialised* (written with meaningful contents), up to
/// a single top word that set-up zeroes. A word whose bit above is clear is logically zero,
/// whatever the memory holds. Bits above level 0 are never cleared again (unlike the buddy
/// allocator's summaries, which mean "non-zero"), so a membership test, insertion or removal
/// reads one word per level (3 for 1 GiB of pages) and writes one, with no summary upkeep; a
/// first insertion under an uninitialised word initialises the words below it on its way down.
pub struct PageSet<'m> {
    base_pfn: u64,
    pages: u64,
    levels: usize,
    /// Where each level starts in `words`, bottom first.
    offset: [usize; PAGE_SET_MAX_LEVELS],
    words: &'m mut [u64],
}

/// Depth of a [`PageSet`] over at most 2^40 pages: ceil(40 / 6).
const PAGE_SET_MAX_LEVELS: usize = 7;

impl<'m> PageSet<'m> {
    /// Number of `u64` metadata words a set over this span needs.
    pub fn metadata_words(span_base: PhysAddr, span_pages: u64) -> Result<usize, BuddyError> {
        Self::lay_out(span_base, span_pages).map(|(_, _, words)| words)
    }

    /// Levels, their offsets and the total words, for a page-aligned span of 1 ..= 2^40 pages
    /// whose metadata size fits in `usize`.
    fn lay_out(span_base: PhysAddr, span_pages: u64) -> Result<(usize, [usize; PAGE_SET_MAX_LEVELS], usize), BuddyError> {
        let bad = BuddyError::BadSpan { base: span_base, pages: span_pages };
        if span_pages == 0 || span_pages > 1 << 40 || !span_base.is_page_aligned() {
            return Err(bad);
        }
        let mut offset = [0; PAGE_SET_MAX_LEVELS];
        let (mut levels, mut bits, mut total) = (0, span_pages, 0usize);
        loop {
            let words = bits.div_ceil(64);
            offset[levels] = total;
            total = usize::try_from(words).ok().and_then(|w| total.checked_add(w)).ok_or(bad)?;
            levels += 1;
            if words == 1 {
                return Ok((levels, offset, total));
            }
            bits = words;
        }
    }

    /// An empty set over the pages of [span_base, span_base + span_pages pages); `span_base` must be
    /// page aligned. `metadata` must hold at least `metadata_words` words, in any state; the set
    /// owns that prefix.
    pub fn new(span_base: PhysAddr, span_pages: u64, metadata: &'m mut [u64]) -> Result<Self, BuddyError> {
        let (levels, offset, needed) = Self::lay_out(span_base, span_pages)?;
        if metadata.len() < needed {
            return Err(BuddyError::MetadataTooSmall { needed, given: metadata.len() });
        }
        let mut set = PageSet { base_pfn: span_base.pfn(), pages: span_pages, levels, offset, words: metadata };
        set.clear();
        Ok(set)
    }

    /// Empties the set: the top word says no word below is initialised.
    pub fn clear(&mut self) {
        self.words[self.offset[self.levels - 1]] = 0;
    }

    /// The index of the page at `addr`, if it is page aligned and in the span.
    #[inline(always)]
    fn index(&self, addr: PhysAddr) -> Option<u64> {
        if !addr.is_page_aligned() {
            return None;
        }
        addr.pfn().checked_sub(self.base_pfn).filter(|&i| i < self.pages)
    }

    /// The word at `level` holding the bit of item `i` there, and that bit's mask.
    #[inline(always)]
    fn slot(&self, level: usize, i: u64) -> (usize, u64) {
        let bit = i >> (6 * level);
        (self.offset[level] + (bit / 64) as usize, 1 << (bit % 64))
    }

    /// The level-0 word and mask of the page at `addr` if it is in the span and that word is
    /// initialised.
    #[inline(always)]
    fn live_slot(&self, addr: PhysAddr) -> Option<(usize, u64)> {
        let i = self.index(addr)?;
        for level in (1..self.levels).rev() {
            let (w, mask) = self.slot(level, i);
            if self.words[w] & mask == 0 {
                return None;
            }
        }
        Some(self.slot(0, i))
    }

    /// Whether the page at `addr` is in the set (never for an address outside the span or not
    /// page aligned).
    #[inline(always)]
    pub fn contains(&self, addr: PhysAddr) -> bool {
        match self.live_slot(addr) {
            Some((w, mask)) => self.words[w] & mask != 0,
            None => false,
        }
    }

    /// Adds the page at `addr`; returns false (and changes nothing) if it is not page aligned or
    /// outside the span. Adding a member again changes nothing.
    #[inline(always)]
    pub fn insert(&mut self, addr: PhysAddr) -> bool {
        let Some(i) = self.index(addr) else { return false };
        // Down from the top: below the first uninitialised word, each word is zeroed as its bit
        // one level up is set.
        let mut live = true;
        for level in (1..self.levels).rev() {
            let (w, mask) = self.slot(level, i);
            if !live {
                self.words[w] = 0;
            }
            live = self.words[w] & mask != 0;
            self.words[w] |= mask;
        }
        let (w, mask) = self.slot(0, i);
        if !live {
            self.words[w] = 0;
        }
        self.words[w] |= mask;
        true
    }

    /// Removes the page at `addr`; returns whether it was a member.
    #[inline(always)]
    pub fn remove(&mut self, addr: PhysAddr) -> bool {
        let Some((w, mask)) = self.live_slot(addr) else { return false };
        let was = self.words[w] & mask != 0;
        self.words[w] &= !mask;
        was
    }

    /// Removes every member in [start, end) (rounded out to pages): a visit of the initialised
    /// words the range meets, one level at a time.
    pub fn remove_range(&mut self, start: PhysAddr, end: PhysAddr) {
        let first = start.pfn().saturating_sub(self.base_pfn);
        let last = end.as_u64().div_ceil(PAGE_SIZE).saturating_sub(self.base_pfn).min(self.pages);
        if first < last {
            self.clear_words(self.levels - 1, first, last);
        }
    }

    /// Clears the bits of page indices [first, last) in the initialised words of `level` that
    /// hold them, the word holding `first` being initialised.
    fn clear_words(&mut self, level: usize, first: u64, last: u64) {
        let shift = 6 * level;
        // The bits of this level for the range, word by word.
        let (lo, hi) = (first >> shift, (last - 1) >> shift);
        let mut bit = lo;
        while bit <= hi {
            let (w, _) = self.slot(level, bit << shift);
            let end_in_word = (bit | 63).min(hi);
            let mask = (!0u64 << (bit % 64)) & (!0u64 >> (63 - end_in_word % 64));
            if level == 0 {
                self.words[w] &= !mask;
            } else {
                // Each set bit names an initialised word one level down.
                let mut live = self.words[w] & mask;
                while live != 0 {
                    let child = (bit & !63) + u64::from(live.trailing_zeros());
                    live &= live - 1;
                    let (from, to) = ((child << shift).max(first), ((child + 1) << shift).min(last));
                    self.clear_words(level - 1, from, to);
                }
            }
            bit = end_in_word + 1;
        }
    }
}

/// Pages the page cache holds at most; a free that finds it full first gives the oldest
/// [`CACHE_BATCH`] back to the buddy allocator.
pub const CACHE_HIGH: usize = 64;

/// Order of the block one refill takes from the buddy allocator: 16 pages for one buddy operation.
pub const CACHE_BATCH_ORDER: u32 = 4;

/// Pages of a refill, and of a drain.
pub const CACHE_BATCH: usize = 1 << CACHE_BATCH_ORDER;

/// Single free pages kept out of the buddy allocator (Linux's per-CPU page lists, "pcp"). An
/// order-0 allocation or free in a mostly free memory costs the buddy allocator a split from, or
/// a merge up to, a 1 GiB block with the double-free checks on every level: thousands of
/// instructions. Here it is a push or a pop and one bit of `lent`.
///
/// - Refill: when empty, the cache takes one block of [`CACHE_BATCH_ORDER`] from the buddy
///   allocator and splits it into single pages, highest on top (the allocator's high-first
///   policy).
/// - Drain: a free that finds [`CACHE_HIGH`] pages gives the oldest [`CACHE_BATCH`] back first; an
///   allocation the buddy allocator cannot serve gives all of them back and retries, so caching
///   never makes a request fail that would have succeeded.
/// - Checks: `lent` holds exactly the pages the cache handed out and did not take back, so a free
///   of one of them is valid without asking the buddy allocator. Every other free goes to the buddy
///   allocator with its full checks, after the cached pages it covers went back there: a double
///   free of a cached page is then a double free for the buddy allocator too, reported with the
///   same error, and no page is ever handed out twice. `lent` lives in lazily initialised metadata
///   ([`PageSet`]), so the cache costs nothing to set up whatever the size of RAM.
///
/// One cache, under the allocator's lock, while the kernel runs on one CPU; built as Linux's
/// per-CPU lists so that it can become one per CPU. The stack of pages is then per-CPU state, and
/// `lent` stays one set for all of them, since a page one CPU's cache lent may be freed on
/// another.
struct PageCache<'m> {
    /// The cached pages, a stack: the most recently freed, the warmest in the CPU cache, on top.
    pages: [PhysAddr; CACHE_HIGH],
    len: usize,
    lent: PageSet<'m>,
}

impl PageCache<'_> {
    /// Takes the top page if it ends at or below `limit`.
    #[inline(always)]
    fn pop_below(&mut self, limit: Option<PhysAddr>) -> Option<PhysAddr> {
        let top = *self.pages[..self.len].last()?;
        if limit.is_some_and(|l| top.as_u64() + PAGE_SIZE > l.as_u64()) {
            return None;
        }
        self.len -= 1;
        Some(top)
    }

    /// Takes any page that ends at or below `limit`.
    fn take_any_below(&mut self, limit: Option<PhysAddr>) -> Option<PhysAddr> {
        let fits = |p: &PhysAddr| limit.is_none_or(|l| p.as_u64() + PAGE_SIZE <= l.as_u64());
        let i = self.pages[..self.len].iter().position(fits)?;
        let page = self.pages[i];
        self.pages.copy_within(i + 1..self.len, i);
        self.len -= 1;
        Some(page)
    }

    /// Gives the `n` oldest pages back to `buddy`.
    fn drain(&mut self, n: usize, buddy: &mut BuddyAllocator<'_>) {
        let n = n.min(self.len);
        for &page in &self.pages[..n] {
            // A cached page is allocated as far as the buddy allocator knows, so it takes it back.
            let r = buddy.free(page, 0);
            debug_assert!(r.is_ok(), "cached page {page} refused: {r:?}");
        }
        self.pages.copy_within(n..self.len, 0);
        self.len -= n;
    }

    /// Gives the cached pages that meet [start, end) back to `buddy`.
    fn drain_range(&mut self, start: u64, end: u64, buddy: &mut BuddyAllocator<'_>) {
        let mut kept = 0;
        for i in 0..self.len {
            let page = self.pages[i];
            if page.as_u64() < end && page.as_u64() + PAGE_SIZE > start {
                let r = buddy.free(page, 0);
                debug_assert!(r.is_ok(), "cached page {page} refused: {r:?}");
            } else {
                self.pages[kept] = page;
                kept += 1;
            }
        }
        self.len = kept;
    }
}

/// The page allocator proper: the buddy allocator, the page cache in front of it, and the
/// counters as callers see them (the buddy allocator's own count the cache's refills and drains).
struct Pages<'m> {
    buddy: BuddyAllocator<'m>,
    cache: Option<PageCache<'m>>,
    allocs: u64,
    frees: u64,
    failed_allocs: u64,
}

impl<'m> Pages<'m> {
    /// Counts the outcome of an allocation.
    #[inline(always)]
    fn counted(&mut self, r: Result<PhysAddr, AllocError>) -> Result<PhysAddr, AllocError> {
        match r {
            Ok(_) => self.allocs += 1,
            Err(AllocError::OutOfMemory { .. }) => self.failed_allocs += 1,
            Err(_) => {}
        }
        r
    }

    /// `op` on the buddy allocator; if it runs out of memory while the cache holds pages, again
    /// after the cache gave them all back.
    fn alloc_from_buddy(&mut self, op: impl Fn(&mut BuddyAllocator<'m>) -> Result<PhysAddr, AllocError>) -> Result<PhysAddr, AllocError> {
        match (op(&mut self.buddy), &mut self.cache) {
            (Err(AllocError::OutOfMemory { .. }), Some(cache)) if cache.len > 0 => {
                cache.drain(CACHE_HIGH, &mut self.buddy);
                op(&mut self.buddy)
            }
            (r, _) => r,
        }
    }

    /// One page below `limit`, from the cache when it can serve; with no cache, from the buddy
    /// allocator.
    #[inline(always)]
    fn alloc_single(&mut self, limit: Option<PhysAddr>) -> Result<PhysAddr, AllocError> {
        let Some(cache) = &mut self.cache else {
            return match limit {
                Some(l) => self.buddy.alloc_below(0, l),
                None => self.buddy.alloc(0),
            };
        };
        if cache.len == 0 {
            if let Ok(block) = self.buddy.alloc(CACHE_BATCH_ORDER) {
                for i in 0..CACHE_BATCH {
                    cache.pages[i] = PhysAddr(block.as_u64() + i as u64 * PAGE_SIZE);
                }
                cache.len = CACHE_BATCH;
            }
        }
        if let Some(page) = cache.pop_below(limit) {
            cache.lent.insert(page);
            return Ok(page);
        }
        // The top page lies above the limit, or memory is too fragmented for a refill: the buddy
        // allocator serves (the page is not lent, so its free goes back there), else any cached
        // page that fits.
        let r = match limit {
            Some(l) => self.buddy.alloc_below(0, l),
            None => self.buddy.alloc(0),
        };
        r.or_else(|e| {
            let page = cache.take_any_below(limit).ok_or(e)?;
            cache.lent.insert(page);
            Ok(page)
        })
    }

    /// Frees one page: into the cache if the cache lent it, else through [`Pages::free_checked`].
    #[inline(always)]
    fn free_single(&mut self, addr: PhysAddr, op: impl FnOnce(&mut BuddyAllocator<'m>) -> Result<(), FreeError>) -> Result<(), FreeError> {
        if let Some(cache) = &mut self.cache {
            if cache.lent.remove(addr) {
                if cache.len == CACHE_HIGH {
                    cache.drain(CACHE_BATCH, &mut self.buddy);
                }
                cache.pages[cache.len] = addr;
                cache.len += 1;
                self.frees += 1;
                return Ok(());
            }
        }
        self.free_checked(addr, 1, op)
    }

    /// Frees `pages` pages at `addr` through `op` on the buddy allocator, which checks them. The
    /// cached pages among them go back to the buddy allocator first, so that it sees them free;
    /// the lent pages among them (a block freed whole whose pages were allocated one by one) are
    /// no longer lent once it accepted.
    fn free_checked(&mut self, addr: PhysAddr, pages: u64, op: impl FnOnce(&mut BuddyAllocator<'m>) -> Result<(), FreeError>) -> Result<(), FreeError> {
        let end = addr.as_u64().saturating_add(pages.saturating_mul(PAGE_SIZE));
        if let Some(cache) = &mut self.cache {
            cache.drain_range(addr.as_u64(), end, &mut self.buddy);
        }
        op(&mut self.buddy)?;
        if let Some(cache) = &mut self.cache {
            cache.lent.remove_range(addr, PhysAddr(end));
        }
        self.frees += 1;
        Ok(())
    }

    fn stats(&self) -> BuddyStats {
        let mut s = self.buddy.stats();
        let cached = self.cache.as_ref().map_or(0, |c| c.len as u64);
        s.free_pages += cached;
        s.free_blocks_per_order[0] += cached;
        if cached > 0 {
            s.largest_free_order = s.largest_free_order.max(Some(0));
        }
        s.allocs = self.allocs;
        s.frees = self.frees;
        s.failed_allocs = self.failed_allocs;
        s
    }
}

/// The page allocator behind a spin lock, held for one O(log n) operation (a batch of at most
/// [`CACHE_HIGH`] of them when the page cache drains) and never while waiting for anything else,
/// so every method may be called from any context. This is the type of the kernel's global
/// allocator; tests make their own.
///
/// Single pages go through the page cache when there is one (see [`LockedPages::with_cache`]),
/// larger blocks to the buddy allocator. The guarantees are the buddy allocator's either way: a
/// page is never handed out twice, a double free or a free of memory the allocator does not own
/// is refused with the same [`FreeError`] and changes nothing the caller can see. [`stats`]
/// counts cached pages as free (single pages), and counts allocations and frees as the callers
/// made them.
///
/// [`stats`]: LockedPages::stats
pub struct LockedPages<'m>(Mutex<Pages<'m>>);

impl<'m> LockedPages<'m> {
    /// The allocator without a page cache: every request goes to the buddy allocator.
    pub fn new(pages: BuddyAllocator<'m>) -> Self {
        LockedPages(Mutex::new(Pages { buddy: pages, cache: None, allocs: 0, frees: 0, failed_allocs: 0 }))
    }

    /// The allocator with a page cache that records the pages it lends in `lent`, a set over the
    /// allocator's span (pages outside it bypass the cache), emptied first.
    pub fn with_cache(pages: BuddyAllocator<'m>, mut lent: PageSet<'m>) -> Self {
        lent.clear();
        let cache = PageCache { pages: [PhysAddr(0); CACHE_HIGH], len: 0, lent };
        LockedPages(Mutex::new(Pages { buddy: pages, cache: Some(cache), allocs: 0, frees: 0, failed_allocs: 0 }))
    }

    /// 2^order contiguous pages aligned to their size, below `limit` (an exclusive end address)
    /// if given.
    #[inline(always)]
    pub fn alloc(&self, order: u32, limit: Option<PhysAddr>) -> Result<PhysAddr, AllocError> {
        let mut p = self.0.lock();
        let r = match (order, limit) {
            (0, _) => p.alloc_single(limit),
            (_, Some(l)) => p.alloc_from_buddy(|b| b.alloc_below(order, l)),
            (_, None) => p.alloc_from_buddy(|b| b.alloc(order)),
        };
        p.counted(r)
    }

    /// Frees a block from [`LockedPages::alloc`]. See [`BuddyAllocator::free`] for the checks.
    #[inline(always)]
    pub fn free(&self, addr: PhysAddr, order: u32) -> Result<(), FreeError> {
        let mut p = self.0.lock();
        match order {
            0 => p.free_single(addr, |b| b.free(addr, 0)),
            _ => p.free_checked(addr, 1u64.checked_shl(order).unwrap_or(u64::MAX), |b| b.free(addr, order)),
        }
    }

    /// `count` contiguous pages (1 ..= 2^MAX_PAGE_ORDER), aligned to the next power of two, whose
    /// whole power-of-two block lies below `limit` if given; the pages beyond `count` stay free.
    #[inline(always)]
    pub fn alloc_exact(&self, count: u64, limit: Option<PhysAddr>) -> Result<PhysAddr, AllocError> {
        let mut p = self.0.lock();
        let r = match (count, limit) {
            (1, _) => p.alloc_single(limit),
            (_, Some(l)) => p.alloc_from_buddy(|b| b.alloc_pages_below(count, l)),
            (_, None) => p.alloc_from_buddy(|b| b.alloc_pages(count)),
        };
        p.counted(r)
    }

    /// Frees `count` pages from [`LockedPages::alloc_exact`].
    #[inline(always)]
    pub fn free_exact(&self, addr: PhysAddr, count: u64) -> Result<(), FreeError> {
        let mut p = self.0.lock();
        match count {
            1 => p.free_single(addr, |b| b.free_pages(addr, 1)),
            _ => p.free_checked(addr, count, |b| b.free_pages(addr, count)),
        }
    }

    /// The counters; see the type's documentation for what the page cache changes.
    pub fn stats(&self) -> BuddyStats {
        self.0.lock().stats()
    }

    /// Pages in the page cache (0 without one).
    pub fn cached_pages(&self) -> usize {
        self.0.lock().cache.as_ref().map_or(0, |c| c.len)
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
        let total = layout.metadata_words + layout.cache_words;
        // SAFETY: `alloc_early` just reserved [meta, meta + bytes) (`total` words) for this
        // allocator alone and for good; RAM is identity-mapped, writable normal memory
        // (kmap::build), the address is page aligned (so aligned for u64), and its end fits the
        // address space (checked above).
        let words: &'static mut [u64] = unsafe { core::slice::from_raw_parts_mut(ptr as *mut u64, total) };
        let (buddy_words, cache_words) = words.split_at_mut(layout.metadata_words);
        let mut pages = BuddyAllocator::new(layout.span_base, layout.span_pages, buddy_words).map_err(PhysInitError::Buddy)?;
        let lent = PageSet::new(layout.span_base, layout.span_pages, cache_words).map_err(PhysInitError::Buddy)?;
        let free_pages = populate(&mut pages, map)?;
        PAGES.call_once(|| LockedPages::with_cache(pages, lent));
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

    /// A single page goes through the page cache: freed, it is free again (the counters say so),
    /// and freeing it a second time, alone or within a block, is a double free.
    fn single_pages_cycle_through_the_cache() -> TestResult {
        let before = ktry!(stats().ok_or("no page allocator"));
        let a = ktry!(alloc_pages(0));
        let b = ktry!(alloc_pages_exact(1, None));
        kassert!(a != b, "page {a} handed out twice");
        ktry!(free_pages(a, 0));
        ktry!(free_pages_exact(b, 1));
        for again in [free_pages(a, 0), free_pages_exact(b, 1), free_pages(PhysAddr(a.0 & !(2 * PAGE_SIZE - 1)), 1)] {
            kassert!(matches!(again, Err(PhysError::Free(FreeError::DoubleFree { .. }))), "{again:?}");
        }
        let after = ktry!(stats().ok_or("no page allocator"));
        kassert_eq!(after.free_pages, before.free_pages);
        kassert_eq!((after.allocs - before.allocs, after.frees - before.frees), (2, 2));
        Ok(())
    }

    /// `arch::cache::zero_pages` clears the pages it is given and nothing around them.
    fn zero_pages_clears_exactly_its_pages() -> TestResult {
        let base = ktry!(alloc_pages(2));
        let (cpu, page) = (base.0 as usize, PAGE_SIZE as usize);
        // SAFETY: four pages just allocated for this test alone, mapped writable Normal memory at
        // their physical address by the linear map.
        unsafe {
            core::ptr::write_bytes(cpu as *mut u8, 0x5a, 4 * page);
            crate::arch::cache::zero_pages(cpu + page, 2 * page);
        }
        // SAFETY: as above; read only.
        let bytes = unsafe { core::slice::from_raw_parts(cpu as *const u8, 4 * page) };
        let outside = bytes[..page].iter().chain(&bytes[3 * page..]).all(|&b| b == 0x5a);
        let inside = bytes[page..3 * page].iter().all(|&b| b == 0);
        ktry!(free_pages(base, 2));
        kassert!(inside, "the two middle pages are not all zero");
        kassert!(outside, "a page around them was written");
        Ok(())
    }

    crate::ktest_suite!("phys", [
        totals_match_memory_map,
        alloc_free_below_limit,
        impossible_requests_fail_cleanly,
        blocks_avoid_reservations,
        single_pages_cycle_through_the_cache,
        zero_pages_clears_exactly_its_pages,
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::memmap::{Region, ReservationKind};
    use proptest::prelude::*;

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
        // One bit per page of the span (0x48000 pages: 4608 words) and three summary levels.
        assert_eq!(l.cache_words, 4608 + 72 + 2 + 1);
        assert_eq!(l.metadata_bytes(), (l.metadata_words as u64 + 4683) * 8);
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
        let l = Layout { span_base: pa(0x4000_0000), span_pages: 0x40000, metadata_words: 12000, cache_words: 345 };
        let s = PhysSummary { layout: l, metadata: pa(0x7fbf_c000), free_pages: 0x3f000 };
        assert_eq!(
            format!("{s}"),
            "page allocator: 258048 pages (1008 MiB) free in a span of 262144 pages at 0x40000000; 96.4 KiB of metadata at 0x7fbfc000"
        );
    }

    /// A cached allocator over `pages` pages at 1 GiB, all free, with its metadata leaked.
    fn cached(pages: u64) -> LockedPages<'static> {
        let base = pa(0x4000_0000);
        let meta = vec![!0u64; buddy::metadata_words(base, pages).unwrap()].leak();
        let mut b = BuddyAllocator::new(base, pages, meta).unwrap();
        b.add_free_range(base, pages).unwrap();
        let lent = vec![!0u64; PageSet::metadata_words(base, pages).unwrap()].leak();
        LockedPages::with_cache(b, PageSet::new(base, pages, lent).unwrap())
    }

    #[test]
    fn single_pages_come_from_the_cache() {
        let p = cached(1024);
        // The first single page takes the top 16-page block: its highest page is handed out, the
        // other 15 stay cached (and count as free).
        let a = p.alloc(0, None).unwrap();
        assert_eq!(a, pa(0x4000_0000 + 1023 * PAGE_SIZE));
        assert_eq!(p.cached_pages(), 15);
        let s = p.stats();
        assert_eq!((s.free_pages, s.allocs, s.frees), (1023, 1, 0));
        assert_eq!(s.free_blocks_per_order[0], 15);
        assert_eq!(p.alloc_exact(1, None), Ok(pa(0x4000_0000 + 1022 * PAGE_SIZE)));
        // A limit the top page does not meet bypasses the cache: the buddy allocator's highest
        // page below it.
        assert_eq!(p.alloc(0, Some(pa(0x4000_0000 + 512 * PAGE_SIZE))), Ok(pa(0x4000_0000 + 511 * PAGE_SIZE)));
        assert_eq!(p.cached_pages(), 14);
        p.free(a, 0).unwrap();
        p.free_exact(pa(0x4000_0000 + 1022 * PAGE_SIZE), 1).unwrap();
        p.free(pa(0x4000_0000 + 511 * PAGE_SIZE), 0).unwrap();
        assert_eq!(p.cached_pages(), 16);
        let s = p.stats();
        assert_eq!((s.free_pages, s.allocs, s.frees, s.failed_allocs), (1024, 3, 3, 0));
        // Last freed, first out.
        assert_eq!(p.alloc(0, None), Ok(pa(0x4000_0000 + 1022 * PAGE_SIZE)));
    }

    #[test]
    fn double_frees_and_foreign_frees_are_refused() {
        let p = cached(1024);
        let a = p.alloc(0, None).unwrap();
        p.free(a, 0).unwrap();
        let before = p.stats();
        let df = |addr, pages| Err(FreeError::DoubleFree { addr, pages });
        // `a` is cached now: freed again, alone or within a block, by either call.
        assert_eq!(p.free(a, 0), df(a, 1));
        assert_eq!(p.free_exact(a, 1), df(a, 1));
        let block = pa(a.as_u64() & !(4 * PAGE_SIZE - 1));
        assert_eq!(p.free(block, 2), df(block, 4));
        // Pages never allocated, in the cache or in the buddy allocator; outside the span.
        let cached_neighbour = pa(a.as_u64() - PAGE_SIZE);
        assert_eq!(p.free(cached_neighbour, 0), df(cached_neighbour, 1));
        assert_eq!(p.free(pa(0x4000_0000), 0), df(pa(0x4000_0000), 1));
        assert_eq!(p.free(pa(0x3fff_f000), 0), Err(FreeError::OutOfSpan { addr: pa(0x3fff_f000), pages: 1 }));
        assert_eq!(p.free(pa(a.as_u64() + 8), 0), Err(FreeError::Misaligned { addr: pa(a.as_u64() + 8), pages: 1 }));
        let after = p.stats();
        assert_eq!((after.free_pages, after.allocs, after.frees), (before.free_pages, before.allocs, before.frees));
        // Nothing was handed out twice: every page comes out exactly once.
        let mut got: Vec<u64> = (0..1024).map(|_| p.alloc(0, None).unwrap().as_u64()).collect();
        assert!(p.alloc(0, None).is_err());
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 1024);
    }

    #[test]
    fn the_cache_drains_past_its_high_mark_and_when_memory_runs_out() {
        let p = cached(256);
        let got: Vec<PhysAddr> = (0..CACHE_HIGH + 10).map(|_| p.alloc(0, None).unwrap()).collect();
        assert!(p.cached_pages() < CACHE_BATCH);
        for &a in &got {
            p.free(a, 0).unwrap();
            assert!(p.cached_pages() <= CACHE_HIGH);
        }
        // 6 pages were left of the fifth refill: the 58th free fills the cache, the 59th drains
        // a batch first, and the last 15 fill it again.
        assert_eq!(p.cached_pages(), CACHE_HIGH);
        // The largest block needs the cached pages back in the buddy allocator.
        assert_eq!(p.alloc(8, None), Ok(pa(0x4000_0000)));
        assert_eq!(p.cached_pages(), 0);
        assert_eq!(p.alloc(0, None).map_err(|_| ()), Err(()));
        let s = p.stats();
        assert_eq!((s.free_pages, s.failed_allocs), (0, 1));
        p.free(pa(0x4000_0000), 8).unwrap();
        // Lent pages freed as one block (the wrong call, but not detectable) are no longer lent:
        // freeing one of them again is a double free.
        let (x, y) = (p.alloc(0, None).unwrap(), p.alloc(0, None).unwrap());
        assert_eq!(x.as_u64(), y.as_u64() + PAGE_SIZE);
        p.free_exact(y, 2).unwrap();
        assert_eq!(p.free(x, 0), Err(FreeError::DoubleFree { addr: x, pages: 1 }));
        assert_eq!(p.stats().free_pages, 256);
    }

    /// `n` words of pseudo-random garbage (xorshift64 from `seed`).
    fn garbage(n: usize, seed: u64) -> Vec<u64> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            })
            .collect()
    }

    #[test]
    fn page_set_sizes_and_bad_spans() {
        let bad = |base, pages| Err(BuddyError::BadSpan { base, pages });
        assert_eq!(PageSet::metadata_words(pa(0x4000_0000), 0), bad(pa(0x4000_0000), 0));
        assert_eq!(PageSet::metadata_words(pa(0x4000_0008), 1), bad(pa(0x4000_0008), 1));
        assert_eq!(PageSet::metadata_words(pa(0), (1 << 40) + 1), bad(pa(0), (1 << 40) + 1));
        assert_eq!(PageSet::metadata_words(pa(0x4000_0000), 64), Ok(1));
        assert_eq!(PageSet::metadata_words(pa(0x4000_0000), 65), Ok(3));
        // 1 GiB of pages: 4096 words, 64 above them, then the top word.
        assert_eq!(PageSet::metadata_words(pa(0x4000_0000), 1 << 18), Ok(4096 + 64 + 1));
        // Set-up writes the top word only, over metadata in any state.
        let mut meta = garbage(4161, 5);
        let fresh = meta.clone();
        let set = PageSet::new(pa(0x4000_0000), 1 << 18, &mut meta).unwrap();
        assert!(!set.contains(pa(0x4000_0000)));
        assert_eq!(meta.iter().zip(&fresh).filter(|(a, b)| a != b).count(), 1);
        assert_eq!(meta[4160], 0);
        let mut small = vec![0u64; 4160];
        assert!(matches!(
            PageSet::new(pa(0x4000_0000), 1 << 18, &mut small),
            Err(BuddyError::MetadataTooSmall { needed: 4161, given: 4160 })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// A page set over garbage metadata against a set of addresses, with addresses inside,
        /// around and outside the span, aligned or not; set-up writes one word, and nothing
        /// beyond the set's metadata is ever written.
        #[test]
        fn page_set_model(
            pages in prop_oneof![1u64..200, 4000u64..5000, 250_000u64..300_000],
            seed in any::<u64>(),
            ops in proptest::collection::vec((0u8..5, 0u64..9000, any::<bool>(), 0u64..5000), 1..300),
        ) {
            let base = 0x4000_0000 + 12 * PAGE_SIZE;
            let words = PageSet::metadata_words(pa(base), pages).unwrap();
            let mut meta = garbage(words + 2, seed);
            let fresh = meta.clone();
            let mut set = PageSet::new(pa(base), pages, &mut meta[..words]).unwrap();
            let mut model = std::collections::BTreeSet::new();
            for (kind, d, misalign, len) in ops {
                // Pages near the end of the span when it is large, from 2 below it otherwise.
                let page = (pages.saturating_sub(4500) + d) % (pages + 4);
                let addr = pa(base - 2 * PAGE_SIZE + page * PAGE_SIZE + if misalign { 8 } else { 0 });
                let inside = !misalign && addr.as_u64() >= base && addr.as_u64() < base + pages * PAGE_SIZE;
                match kind {
                    0 | 1 => {
                        prop_assert_eq!(set.insert(addr), inside);
                        if inside {
                            model.insert(addr.as_u64());
                        }
                    }
                    2 => prop_assert_eq!(set.remove(addr), model.remove(&addr.as_u64())),
                    3 => {
                        // Pages wholly or partly in [addr, end).
                        let end = addr.as_u64() + len * PAGE_SIZE;
                        set.remove_range(addr, pa(end));
                        let first = addr.as_u64() / PAGE_SIZE * PAGE_SIZE;
                        model.retain(|&p| p < first || p >= end);
                    }
                    _ => {}
                }
                prop_assert_eq!(set.contains(addr), model.contains(&addr.as_u64()));
            }
            for &p in &model {
                prop_assert!(set.contains(pa(p)));
            }
            let members = (0..pages).filter(|i| set.contains(pa(base + i * PAGE_SIZE))).count();
            prop_assert_eq!(members, model.len());
            set.clear();
            prop_assert!(!set.contains(pa(base)) && !set.contains(pa(base + (pages - 1) * PAGE_SIZE)));
            prop_assert_eq!(&meta[words..], &fresh[words..]);
        }
    }

    // ----- model test -----

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Page {
        Hole,
        Free,
        Used,
    }

    /// How a block is allocated, hence freed: `alloc(order)` and `free(addr, order)`, or
    /// `alloc_exact(count)` and `free_exact(addr, count)`.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Request {
        Order(u32),
        Exact(u64),
    }

    impl Request {
        fn pages(self) -> u64 {
            match self {
                Request::Order(o) => 1 << o,
                Request::Exact(c) => c,
            }
        }
        /// Alignment of the block, in pages.
        fn align(self) -> u64 {
            self.pages().next_power_of_two()
        }
        fn alloc(self, pages: &LockedPages<'_>, limit: Option<PhysAddr>) -> Result<PhysAddr, AllocError> {
            match self {
                Request::Order(o) => pages.alloc(o, limit),
                Request::Exact(c) => pages.alloc_exact(c, limit),
            }
        }
        fn free(self, pages: &LockedPages<'_>, addr: PhysAddr) -> Result<(), FreeError> {
            match self {
                Request::Order(o) => pages.free(addr, o),
                Request::Exact(c) => pages.free_exact(addr, c),
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc(Request, Option<u64>),
        Free(usize),
        /// Two live single pages that are neighbours, freed as one range.
        FreeNeighbours,
        /// A free of something already freed (if no page of it was allocated again since).
        FreeAgain(usize),
        /// A free of any pages: never allocated, cached, free, holes, misaligned, outside.
        FreeAny(u64, Request),
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            4 => Just(Request::Order(0)),
            2 => (1u32..3).prop_map(Request::Order),
            1 => Just(Request::Exact(1)),
            1 => (2u64..6).prop_map(Request::Exact),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (request(), proptest::option::weighted(0.3, 0u64..700)).prop_map(|(r, l)| Op::Alloc(r, l)),
            6 => any::<usize>().prop_map(Op::Free),
            1 => Just(Op::FreeNeighbours),
            2 => any::<usize>().prop_map(Op::FreeAgain),
            2 => (0u64..720 * 8, request()).prop_map(|(e, r)| Op::FreeAny(e, r)),
        ]
    }

    struct Model {
        base: u64,
        pages: Vec<Page>,
    }

    impl Model {
        fn state(&self, pfn: u64) -> Page {
            pfn.checked_sub(self.base).and_then(|i| self.pages.get(i as usize).copied()).unwrap_or(Page::Hole)
        }
        fn set(&mut self, pfn: u64, n: u64, from: Page, to: Page) -> Result<(), TestCaseError> {
            for p in pfn..pfn + n {
                prop_assert_eq!(self.state(p), from, "page {:#x}", p);
                self.pages[(p - self.base) as usize] = to;
            }
            Ok(())
        }
        fn free_count(&self) -> u64 {
            self.pages.iter().filter(|&&p| p == Page::Free).count() as u64
        }
        /// Whether a free aligned block of 2^order pages lies below `limit` (a pfn).
        fn has_block(&self, order: u32, limit: u64) -> bool {
            let n = 1u64 << order;
            let end = limit.min(self.base + self.pages.len() as u64);
            (self.base.div_ceil(n) * n..end).step_by(n as usize).any(|p| p + n <= end && (p..p + n).all(|q| self.state(q) == Page::Free))
        }
        /// The refusal a free of `req`'s pages at `addr` gets, in the buddy allocator's order of
        /// checks; `None` when every page is allocated (a valid free, or one that cannot be told
        /// from one).
        fn refusal(&self, addr: PhysAddr, req: Request) -> Option<FreeError> {
            let n = req.pages();
            let align = match req {
                Request::Order(_) => n * PAGE_SIZE,
                Request::Exact(_) => PAGE_SIZE,
            };
            if !addr.as_u64().is_multiple_of(align) {
                return Some(FreeError::Misaligned { addr, pages: n });
            }
            let pfn = addr.pfn();
            if pfn < self.base || pfn + n > self.base + self.pages.len() as u64 {
                return Some(FreeError::OutOfSpan { addr, pages: n });
            }
            let states: Vec<Page> = (pfn..pfn + n).map(|p| self.state(p)).collect();
            if states.contains(&Page::Hole) {
                return Some(FreeError::NotManaged { addr, pages: n });
            }
            states.contains(&Page::Free).then_some(FreeError::DoubleFree { addr, pages: n })
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]
        /// The cached allocator against a model of page states, over spans with holes and small
        /// enough to run out: every allocation is free memory of the right size, alignment and
        /// limit, fails only when no such memory is free, and is never handed out twice; every
        /// refused free gets the buddy allocator's error and changes nothing; the counters follow
        /// the model. At the end every free page can be allocated exactly once.
        #[test]
        fn cached_allocator_model(
            segs in proptest::collection::vec((1u64..200, proptest::bool::weighted(0.8)), 1..6),
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let base = (0x4000_0000 / PAGE_SIZE) + 5;
            let span: u64 = segs.iter().map(|s| s.0).sum();
            let meta = vec![!0u64; buddy::metadata_words(PhysAddr::from_pfn(base), span).unwrap()];
            let mut b = BuddyAllocator::new(PhysAddr::from_pfn(base), span, meta.leak()).unwrap();
            let mut m = Model { base, pages: vec![Page::Hole; span as usize] };
            let mut at = base;
            for &(len, present) in &segs {
                if present {
                    b.add_free_range(PhysAddr::from_pfn(at), len).unwrap();
                    m.set(at, len, Page::Hole, Page::Free)?;
                }
                at += len;
            }
            let lent = vec![!0u64; PageSet::metadata_words(PhysAddr::from_pfn(base), span).unwrap()];
            let pages = LockedPages::with_cache(b, PageSet::new(PhysAddr::from_pfn(base), span, lent.leak()).unwrap());
            // Blocks as (first pfn, request).
            let mut live: Vec<(u64, Request)> = Vec::new();
            let mut freed: Vec<(u64, Request)> = Vec::new();
            let (mut allocs, mut frees, mut failed) = (0u64, 0u64, 0u64);
            for op in ops {
                match op {
                    Op::Alloc(req, l) => {
                        let limit_pfn = l.map_or(u64::MAX, |l| base + l);
                        let (n, align) = (req.pages(), req.align());
                        match req.alloc(&pages, l.map(|l| PhysAddr::from_pfn(base + l))) {
                            Ok(a) => {
                                let p = a.pfn();
                                prop_assert!(p.is_multiple_of(align) && p + align <= limit_pfn, "{} pages at {:#x}", n, p);
                                m.set(p, n, Page::Free, Page::Used)?;
                                live.push((p, req));
                                allocs += 1;
                            }
                            Err(e) => {
                                prop_assert!(matches!(e, AllocError::OutOfMemory { .. }), "{:?}", e);
                                prop_assert!(!m.has_block(align.trailing_zeros(), limit_pfn), "{} pages below {:#x} were free", n, limit_pfn);
                                failed += 1;
                            }
                        }
                    }
                    Op::Free(i) => {
                        if live.is_empty() { continue; }
                        let (p, req) = live.swap_remove(i % live.len());
                        prop_assert_eq!(req.free(&pages, PhysAddr::from_pfn(p)), Ok(()));
                        m.set(p, req.pages(), Page::Used, Page::Free)?;
                        freed.push((p, req));
                        frees += 1;
                    }
                    Op::FreeNeighbours => {
                        let singles: Vec<u64> = live.iter().filter(|b| b.1.pages() == 1).map(|b| b.0).collect();
                        let Some(&p) = singles.iter().find(|&&p| singles.contains(&(p + 1))) else { continue };
                        prop_assert_eq!(pages.free_exact(PhysAddr::from_pfn(p), 2), Ok(()));
                        m.set(p, 2, Page::Used, Page::Free)?;
                        live.retain(|b| b.0 != p && b.0 != p + 1);
                        freed.push((p, Request::Exact(2)));
                        frees += 1;
                    }
                    Op::FreeAgain(i) => {
                        if freed.is_empty() { continue; }
                        let (p, req) = freed[i % freed.len()];
                        let addr = PhysAddr::from_pfn(p);
                        let Some(expected) = m.refusal(addr, req) else { continue };
                        let before = pages.stats().free_pages;
                        prop_assert_eq!(req.free(&pages, addr), Err(expected));
                        prop_assert_eq!(pages.stats().free_pages, before);
                    }
                    Op::FreeAny(eighths, req) => {
                        // From just below the span to past its end, in eighths of a page.
                        let addr = PhysAddr((base - 4) * PAGE_SIZE + eighths * (PAGE_SIZE / 8));
                        let Some(expected) = m.refusal(addr, req) else { continue };
                        let before = pages.stats().free_pages;
                        prop_assert_eq!(req.free(&pages, addr), Err(expected));
                        prop_assert_eq!(pages.stats().free_pages, before);
                    }
                }
                let s = pages.stats();
                prop_assert_eq!(s.free_pages, m.free_count());
                prop_assert_eq!((s.allocs, s.frees, s.failed_allocs), (allocs, frees, failed));
                prop_assert!(pages.cached_pages() <= CACHE_HIGH);
            }
            // Every free page, and only those, comes out exactly once.
            while let Ok(a) = pages.alloc(0, None) {
                m.set(a.pfn(), 1, Page::Free, Page::Used)?;
            }
            prop_assert_eq!(m.free_count(), 0);
            prop_assert_eq!(pages.stats().free_pages, 0);
        }
    }
}
