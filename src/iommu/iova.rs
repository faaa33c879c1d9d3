//! The IOVA allocator of the dma-iommu back end: one [`IovaSpace`] per IOMMU domain (an SMMUv3
//! translation context shared by a device group). It decides which I/O virtual addresses a mapping
//! gets; the page tables that back them are someone else's business.
//!
//! Behaviour (after Linux's `drivers/iommu/iova.c` and its per-CPU range caches; our own design):
//!
//! - The granule is the 4 KiB page. Addresses at the API are byte addresses (`u64`, also on armv7);
//!   inside, everything is a page frame number (pfn).
//! - An allocation of `n` pages is *size-aligned*: aligned to `n` rounded up to a power of two, so
//!   an IOMMU can map it with the fewest, largest blocks. It is placed at the highest such address
//!   whose last byte is at or below the caller's limit (the device's DMA mask).
//! - IOVA 0 is never handed out: page 0 is never part of a space, because a DMA address of 0 is too
//!   easily taken for "no mapping".
//! - [`IovaSpace::reserve`] carves out ranges (the MSI doorbell, PCI host-bridge windows) that are
//!   never allocated. Reservations may overlap each other and stick out of the space.
//! - The range cache ("rcache") recycles sizes 1, 2, 4, ..., 32 pages: per CPU and per size, two
//!   magazines (loaded, previous) of up to [`MAGAZINE_SIZE`] IOVAs, behind a shared depot of up to
//!   [`DEPOT_MAGAZINES`] full magazines per size. A typical unmap-then-map therefore costs the
//!   current CPU's cache lock, an array push and an array pop (plus the free check below). A cached
//!   IOVA stays allocated in the tree, so the tree can never hand it out while it sits in a cache.
//! - On exhaustion, every CPU's magazines and the depot go back to the tree once and the search is
//!   repeated; if that fails too the caller gets [`IovaError::Exhausted`]. Nothing loops.
//!
//! Where this differs from Linux, and why:
//!
//! - The tree is exact. Linux starts each search below its previous allocation (`cached_node`) and
//!   returns to the top only when that fails, which is next-fit. Here the free ranges ("gaps") are
//!   kept coalesced and indexed by size class (`floor(log2(length))`): a gap of at least
//!   `n + align - 1` pages wholly below the limit always fits, so in each class that large only the
//!   highest gap (or the next one, when the highest straddles the limit) is examined. Only the one
//!   or two classes whose gaps are long enough but possibly misaligned are walked, and that walk
//!   stops as soon as it cannot beat the best candidate. A bit mask skips empty classes.
//! - Frees are checked, also on the fast path, without the tree lock: see "Fast-path checks".
//!
//! # Lock order
//!
//! `cpu cache (one at a time) -> depot -> tree`. A CPU cache lock may be held while taking the
//! depot lock and then the tree lock; the tree lock is never held while taking another. No path
//! holds two CPU cache locks. The live map (below) is lock-free and may be touched under any of
//! these locks. None of them may be taken from an interrupt handler that can interrupt a holder.
//!
//! # Fast-path checks
//!
//! Every allocation of 1, 2, 4, ..., 32 pages that is with a caller has its flag set in the *live
//! map*: one bit per size-aligned block, 2 bits per page in all, in a radix tree of 4 KiB leaves
//! created on first use under the tree lock and kept until the space is dropped.
//! [`IovaSpace::free_fast`] checks the CPU index and the size, that the address is page-aligned,
//! aligned to its size and inside the space, and then clears the flag with one atomic
//! read-modify-write: only the free that finds it set may put the IOVA into a magazine. Anything
//! else (never allocated, wrong size, a second free, an allocation of an uncached size made with
//! [`IovaSpace::alloc`]) goes to the tree, which either frees it properly or names the error. So a
//! bad free is refused exactly as on the slow path and can never put an IOVA into a cache twice:
//! no IOVA is handed out twice. What no allocator can tell apart: a stale free that arrives after
//! its IOVA has been handed out again looks like the new owner's free.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;
use core::mem;
use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use spin::{Mutex, Once};

use crate::mm::addr::{align_down, align_up, PAGE_SHIFT, PAGE_SIZE};

/// CPU indices accepted by the fast path: `0..MAX_CPUS`.
pub const MAX_CPUS: usize = 8;
/// Cached sizes are `1 << order` pages for `order` in `0..CACHED_ORDERS` (Linux's
/// `IOVA_RANGE_CACHE_MAX_SIZE`).
pub const CACHED_ORDERS: usize = 6;
/// The largest cached size, in pages.
pub const MAX_CACHED_PAGES: u64 = 1 << (CACHED_ORDERS - 1);
/// IOVAs per magazine: 127 pfns and a length make a 1 KiB magazine, as in Linux.
pub const MAGAZINE_SIZE: usize = 127;
/// Full magazines the depot holds per size before further ones go back to the tree.
pub const DEPOT_MAGAZINES: usize = 32;
/// Empty magazines the depot keeps for reuse, so that the steady state allocates nothing.
const SPARE_MAGAZINES: usize = 2 * MAX_CPUS;

/// Why an IOVA operation was refused. A refused operation changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IovaError {
    /// [`IovaSpace::new`]: the range holds no whole page other than page 0.
    EmptySpace { start: u64, end: u64 },
    /// [`IovaSpace::reserve`]: `base + size` wraps around the 64-bit address space.
    RangeOverflow { base: u64, size: u64 },
    /// A request for zero pages or zero bytes.
    ZeroSize,
    /// A CPU index of `MAX_CPUS` or more.
    BadCpu { cpu: usize },
    /// A free of an address that is not page-aligned.
    Misaligned { iova: u64 },
    /// No free, size-aligned range of `pages` pages ends at or below `limit`, even after the caches
    /// were flushed. `pages` is the size searched for (the fast path rounds up to a power of two).
    Exhausted { pages: u64, limit: u64 },
    /// No allocation starts at `iova`: never allocated, already given back to the tree, or an
    /// address inside an allocation.
    NotAllocated { iova: u64, pages: u64 },
    /// `iova` lies in a reserved region.
    Reserved { iova: u64 },
    /// The allocation at `iova` has `allocated` pages, not `pages`.
    WrongSize {
        iova: u64,
        pages: u64,
        allocated: u64,
    },
    /// The allocation at `iova` was already freed and sits in a range cache: a double free.
    AlreadyFree { iova: u64 },
    /// [`IovaSpace::reserve`]: the range overlaps an allocation that is with a caller.
    ReserveOverlapsAllocation { base: u64, size: u64 },
    /// The kernel heap could not supply bookkeeping memory.
    NoMemory,
}

impl fmt::Display for IovaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            IovaError::EmptySpace { start, end } => write!(
                f,
                "IOVA range {start:#x}..={end:#x} holds no usable page (page 0 is never used)"
            ),
            IovaError::RangeOverflow { base, size } => write!(
                f,
                "range of {size:#x} bytes at {base:#x} wraps past the end of the address space"
            ),
            IovaError::ZeroSize => write!(f, "zero-sized IOVA request"),
            IovaError::BadCpu { cpu } => {
                write!(
                    f,
                    "CPU index {cpu} out of range (the IOVA caches serve {MAX_CPUS} CPUs)"
                )
            }
            IovaError::Misaligned { iova } => write!(f, "IOVA {iova:#x} is not page-aligned"),
            IovaError::Exhausted { pages, limit } => write!(
                f,
                "no free size-aligned IOVA range of {pages} pages ends at or below {limit:#x}"
            ),
            IovaError::NotAllocated { iova, pages } => write!(
                f,
                "cannot free {pages} pages at IOVA {iova:#x}: no allocation starts there \
                 (never allocated, or already freed)"
            ),
            IovaError::Reserved { iova } => {
                write!(
                    f,
                    "IOVA {iova:#x} lies in a reserved region and cannot be freed"
                )
            }
            IovaError::WrongSize {
                iova,
                pages,
                allocated,
            } => write!(
                f,
                "cannot free {pages} pages at IOVA {iova:#x}: it was allocated with \
                 {allocated} pages"
            ),
            IovaError::AlreadyFree { iova } => {
                write!(f, "IOVA {iova:#x} was already freed (double free)")
            }
            IovaError::ReserveOverlapsAllocation { base, size } => write!(
                f,
                "cannot reserve {size:#x} bytes at {base:#x}: the range overlaps an allocated IOVA"
            ),
            IovaError::NoMemory => write!(f, "out of kernel memory for IOVA bookkeeping"),
        }
    }
}

/// Counters of one space. Exact when no operation runs concurrently; otherwise each value is read
/// under its own lock and the set may mix moments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IovaStats {
    /// Pages allocated and with callers (cached pages excluded).
    pub allocated_pages: u64,
    /// Pages freed by callers and sitting in the range caches (still allocated in the tree).
    pub cached_pages: u64,
    /// Pages in reserved regions (inside the space).
    pub reserved_pages: u64,
    /// Successful allocations: `fast_hits + slow_allocations`.
    pub allocations: u64,
    /// Allocations served from a range cache.
    pub fast_hits: u64,
    /// Allocations served by the tree.
    pub slow_allocations: u64,
    /// Times the range caches were flushed back to the tree (on exhaustion or on request).
    pub flushes: u64,
    /// Allocations refused for lack of IOVA space.
    pub failures: u64,
}

/// The number of pages, counted from page 0, whose last byte is at or below `limit`: pages
/// `0..n`. Branch-free; at most 2^52, so it never overflows.
#[inline(always)]
fn pages_at_or_below(limit: u64) -> u64 {
    (limit >> PAGE_SHIFT) + u64::from(limit & (PAGE_SIZE - 1) == PAGE_SIZE - 1)
}

/// Last page whose last byte is at or below `limit`; `None` when even page 0 ends above it.
fn last_pfn_at_or_below(limit: u64) -> Option<u64> {
    pages_at_or_below(limit).checked_sub(1)
}

/// The cache serving a request or free of `pages` pages (rounded up to a power of two), if any.
#[inline(always)]
fn cached_order(pages: u64) -> Option<usize> {
    // `pages - 1` wraps for 0, which the range check then refuses; for 1..=32 the bit length of
    // `pages - 1` is the exponent of the next power of two.
    let below = pages.wrapping_sub(1);
    if below < MAX_CACHED_PAGES {
        Some((u64::BITS - below.leading_zeros()) as usize)
    } else {
        None
    }
}

/// The order of an allocation of exactly `pages` pages if it is of a cached size; such
/// allocations carry a live-map flag while they are with a caller.
fn tracked_order(pages: u64) -> Option<usize> {
    if pages.is_power_of_two() && pages <= MAX_CACHED_PAGES {
        Some(pages.trailing_zeros() as usize)
    } else {
        None
    }
}

/// Whether a free of `pages` pages names an allocation of `allocated` pages. Sizes up to the
/// largest cached size may be given unrounded, as they were to [`IovaSpace::alloc_fast`].
fn size_matches(allocated: u64, pages: u64) -> bool {
    allocated == pages || (pages <= MAX_CACHED_PAGES && allocated == pages.next_power_of_two())
}

/// The free ranges of a space, coalesced, indexed by start and by (size class, start).
struct Gaps {
    by_start: BTreeMap<u64, u64>,
    by_class: BTreeMap<(u32, u64), u64>,
    class_len: [u64; 64],
    class_mask: u64,
}

impl Gaps {
    fn new(first: u64, last: u64) -> Self {
        let mut gaps = Gaps {
            by_start: BTreeMap::new(),
            by_class: BTreeMap::new(),
            class_len: [0; 64],
            class_mask: 0,
        };
        gaps.insert(first, last);
        gaps
    }

    /// `floor(log2(length))` of the gap `start..=end`.
    fn class(start: u64, end: u64) -> u32 {
        63 - (end - start + 1).leading_zeros()
    }

    fn insert(&mut self, start: u64, end: u64) {
        let class = Self::class(start, end);
        self.by_start.insert(start, end);
        self.by_class.insert((class, start), end);
        self.class_len[class as usize] += 1;
        self.class_mask |= 1 << class;
    }

    fn remove(&mut self, start: u64, end: u64) {
        let class = Self::class(start, end);
        self.by_start.remove(&start);
        self.by_class.remove(&(class, start));
        self.class_len[class as usize] -= 1;
        if self.class_len[class as usize] == 0 {
            self.class_mask &= !(1 << class);
        }
    }

    /// The highest `pfn`, a multiple of `align`, such that `pfn..pfn + pages` is free and ends at
    /// or below `top`.
    fn find(&self, pages: u64, align: u64, top: u64) -> Option<u64> {
        let mut classes = self.class_mask & (u64::MAX << (63 - pages.leading_zeros()));
        let mut best: Option<u64> = None;
        while classes != 0 {
            let class = 63 - classes.leading_zeros();
            classes &= !(1 << class);
            for (&(_, start), &end) in self.by_class.range((class, 0)..=(class, top)).rev() {
                let high = end.min(top);
                // Nothing in this gap, nor in the lower gaps of this class, can beat `best`.
                if best.is_some_and(|b| high < b + pages) {
                    break;
                }
                if high - start + 1 < pages {
                    continue;
                }
                let pfn = align_down(high + 1 - pages, align);
                if pfn >= start {
                    best = Some(pfn);
                    break;
                }
            }
        }
        best
    }

    /// Takes `start..=end` out of the free set; parts of it may already be occupied.
    fn occupy(&mut self, start: u64, end: u64) {
        while let Some((&gap_start, &gap_end)) = self.by_start.range(..=end).next_back() {
            if gap_end < start {
                break;
            }
            self.remove(gap_start, gap_end);
            if gap_start < start {
                self.insert(gap_start, start - 1);
            }
            if gap_end > end {
                self.insert(end + 1, gap_end);
            }
        }
    }

    /// Returns the occupied range `start..=end` to the free set, merging it with its neighbours.
    fn release(&mut self, mut start: u64, mut end: u64) {
        if let Some((&left_start, &left_end)) = self.by_start.range(..start).next_back() {
            if left_end + 1 == start {
                self.remove(left_start, left_end);
                start = left_start;
            }
        }
        if let Some(&right_end) = self.by_start.get(&(end + 1)) {
            self.remove(end + 1, right_end);
            end = right_end;
        }
        self.insert(start, end);
    }
}

/// The allocation tree: every allocation (cached ones included), the reserved regions and the
/// gaps between them, which together tile the space exactly.
struct Tree {
    /// Base pfn -> pages.
    allocs: BTreeMap<u64, u64>,
    /// Start pfn -> end pfn (inclusive), merged: disjoint and not adjacent.
    reserved: BTreeMap<u64, u64>,
    gaps: Gaps,
    /// Pages in `allocs`.
    allocated_pages: u64,
    slow_allocations: u64,
    failures: u64,
    flushes: u64,
}

impl Tree {
    fn insert_alloc(&mut self, pfn: u64, pages: u64) {
        self.gaps.occupy(pfn, pfn + pages - 1);
        self.allocs.insert(pfn, pages);
        self.allocated_pages += pages;
        self.slow_allocations += 1;
    }

    fn remove_alloc(&mut self, pfn: u64, pages: u64) {
        self.allocs.remove(&pfn);
        self.gaps.release(pfn, pfn + pages - 1);
        self.allocated_pages -= pages;
    }

    /// Frees a cached IOVA; `false` if the tree holds no such allocation.
    fn release_cached(&mut self, pfn: u64, pages: u64) -> bool {
        let present = self.allocs.get(&pfn) == Some(&pages);
        if present {
            self.remove_alloc(pfn, pages);
        }
        present
    }

    fn in_reserved(&self, pfn: u64) -> bool {
        self.reserved
            .range(..=pfn)
            .next_back()
            .is_some_and(|(_, &end)| end >= pfn)
    }

    fn overlaps_alloc(&self, start: u64, end: u64) -> bool {
        self.allocs
            .range(..=end)
            .next_back()
            .is_some_and(|(&base, &pages)| base + pages > start)
    }

    /// Reserves `start..=end` unless it overlaps an allocation.
    fn try_reserve(&mut self, start: u64, end: u64) -> bool {
        if self.overlaps_alloc(start, end) {
            return false;
        }
        let (mut merged_start, mut merged_end) = (start, end);
        while let Some((&r_start, &r_end)) = self.reserved.range(..=merged_end + 1).next_back() {
            if r_end + 1 < merged_start {
                break;
            }
            self.reserved.remove(&r_start);
            merged_start = merged_start.min(r_start);
            merged_end = merged_end.max(r_end);
        }
        self.reserved.insert(merged_start, merged_end);
        self.gaps.occupy(start, end);
        true
    }

    fn reserved_pages(&self) -> u64 {
        self.reserved
            .iter()
            .map(|(&start, &end)| end - start + 1)
            .sum()
    }
}

/// Alignment of the live map's base pfn: a multiple of the largest cached size, so that block
/// alignment relative to the base is block alignment.
const BASE_ALIGN: u64 = 64;
const LEAF_BITS: u32 = 9;
const LEAF_WORDS: usize = 1 << LEAF_BITS;
const DIR_BITS: u32 = 7;
const DIR_SLOTS: usize = 1 << DIR_BITS;

/// A live-map leaf: `LEAF_WORDS` words of flags, then the leaf's number (its first word index
/// divided by `LEAF_WORDS`), which lets the hot-leaf shortcut check that it has the right leaf.
type Leaf = [AtomicU64; LEAF_WORDS + 1];

enum Node {
    Dir(Box<[Once<Node>; DIR_SLOTS]>),
    Leaf(Box<Leaf>),
}

/// A boxed array allocated without aborting on heap exhaustion.
fn boxed_array<T, const N: usize>(make: impl FnMut() -> T) -> Result<Box<[T; N]>, IovaError> {
    let mut items = Vec::new();
    items
        .try_reserve_exact(N)
        .map_err(|_| IovaError::NoMemory)?;
    items.resize_with(N, make);
    items
        .into_boxed_slice()
        .try_into()
        .map_err(|_| IovaError::NoMemory)
}

impl Node {
    /// A node at `level` (0: a leaf, then numbered `leaf_number`).
    fn new(level: u32, leaf_number: u64) -> Result<Node, IovaError> {
        if level > 0 {
            return Ok(Node::Dir(boxed_array(Once::new)?));
        }
        let leaf: Box<Leaf> = boxed_array(|| AtomicU64::new(0))?;
        leaf[LEAF_WORDS].store(leaf_number, Ordering::Relaxed);
        Ok(Node::Leaf(leaf))
    }
}

/// Which allocations of a cached size are with a caller: one flag bit per size-aligned block.
/// The block of 2^order pages at pfn `p` (relative to the space's first 64-page boundary, so
/// alignment is kept) has bit `2p + 2^order - 1`: single pages take the even bits, 2-page blocks
/// the bits that are 1 mod 4, 4-page blocks those that are 3 mod 8, and so on (the in-order
/// numbering of the implicit binary tree over the pages), so no two blocks share a bit and the
/// map costs 2 bits per page. The words sit in a radix tree of 4 KiB leaves, created on first use
/// and kept until the map is dropped; `hot` remembers the last leaf used, so that the usual lookup
/// is one pointer load and a compare instead of a walk.
struct LiveMap {
    /// The space's first pfn rounded down to `BASE_ALIGN`.
    base: u64,
    /// Height of the radix tree: 0 when the root is a leaf.
    root_level: u32,
    root: Once<Node>,
    /// Null, or the last leaf a walk arrived at.
    hot: AtomicPtr<Leaf>,
}

impl LiveMap {
    fn new(first_pfn: u64, last_pfn: u64) -> Self {
        let base = first_pfn & !(BASE_ALIGN - 1);
        // Two bits per page, 64 bits per word.
        let leaves = (last_pfn - base + 1).div_ceil(LEAF_WORDS as u64 * 32);
        let mut root_level = 0;
        while 1u64 << (DIR_BITS * root_level) < leaves {
            root_level += 1;
        }
        LiveMap {
            base,
            root_level,
            root: Once::new(),
            hot: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Word index and bit mask of the flag of a 2^order-page allocation at `pfn`, which must lie
    /// in the space and be aligned to its size (every caller checks or knows both).
    #[inline(always)]
    fn locate(&self, pfn: u64, order: usize) -> (u64, u64) {
        let bit = ((pfn - self.base) << 1) + (1 << order) - 1;
        (bit >> 6, 1 << (bit & 63))
    }

    /// The word `index`, if its leaf exists.
    #[inline(always)]
    fn word(&self, index: u64) -> Option<&AtomicU64> {
        let hot = self.hot.load(Ordering::Acquire);
        // SAFETY: `hot` is null or was stored by `walk` from a reference to a leaf of this map.
        // Leaves are boxed, so they stay put when the map moves, and are freed only when the map
        // is dropped, which the borrow of `self` excludes for the lifetime of the result. The
        // Acquire load pairs with the Release store in `walk`, after the leaf was initialised.
        if let Some(leaf) = unsafe { hot.as_ref() } {
            if leaf[LEAF_WORDS].load(Ordering::Relaxed) == index >> LEAF_BITS {
                return Some(&leaf[(index & (LEAF_WORDS as u64 - 1)) as usize]);
            }
        }
        let leaf = self.walk(index >> LEAF_BITS, false).ok()??;
        Some(&leaf[(index & (LEAF_WORDS as u64 - 1)) as usize])
    }

    /// Finds leaf `number`, creating missing nodes if `create`, and makes it the hot leaf.
    #[cold]
    fn walk(&self, number: u64, create: bool) -> Result<Option<&Leaf>, IovaError> {
        let mut level = self.root_level;
        let mut slot = &self.root;
        loop {
            let node = if create {
                slot.try_call_once(|| Node::new(level, number))?
            } else {
                match slot.get() {
                    Some(node) => node,
                    None => return Ok(None),
                }
            };
            match node {
                Node::Leaf(leaf) => {
                    self.hot
                        .store(ptr::from_ref::<Leaf>(leaf).cast_mut(), Ordering::Release);
                    return Ok(Some(leaf));
                }
                Node::Dir(slots) => {
                    level = level.saturating_sub(1);
                    slot =
                        &slots[((number >> (DIR_BITS * level)) & (DIR_SLOTS as u64 - 1)) as usize];
                }
            }
        }
    }

    /// Flags a new allocation from the tree; its leaf may not exist yet.
    fn set_new(&self, pfn: u64, order: usize) -> Result<(), IovaError> {
        let (index, mask) = self.locate(pfn, order);
        if let Some(leaf) = self.walk(index >> LEAF_BITS, true)? {
            leaf[(index & (LEAF_WORDS as u64 - 1)) as usize].fetch_or(mask, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Flags an IOVA leaving a cache. Its leaf exists: the IOVA was flagged when the tree allocated
    /// it, and leaves live as long as the map.
    #[inline(always)]
    fn set_cached(&self, pfn: u64, order: usize) {
        let (index, mask) = self.locate(pfn, order);
        if let Some(word) = self.word(index) {
            word.fetch_or(mask, Ordering::AcqRel);
        }
    }

    /// Clears the flag; `true` if this call found it set (the caller now owns the IOVA's return).
    #[inline(always)]
    fn clear(&self, pfn: u64, order: usize) -> bool {
        let (index, mask) = self.locate(pfn, order);
        self.word(index)
            .is_some_and(|word| word.fetch_and(!mask, Ordering::AcqRel) & mask != 0)
    }
}

/// A magazine of cached pfns, all of one size: `pfns[..len]`. Unallocated until first needed.
#[derive(Default)]
struct Magazine {
    len: usize,
    pfns: Option<Box<[u64; MAGAZINE_SIZE]>>,
}

impl Magazine {
    fn allocate() -> Option<Magazine> {
        Some(Magazine {
            len: 0,
            pfns: Some(boxed_array(|| 0).ok()?),
        })
    }

    fn is_allocated(&self) -> bool {
        self.pfns.is_some()
    }

    fn is_full(&self) -> bool {
        self.len == MAGAZINE_SIZE
    }

    fn entries(&self) -> &[u64] {
        self.pfns
            .as_deref()
            .and_then(|pfns| pfns.get(..self.len))
            .unwrap_or(&[])
    }

    /// Adds `pfn`; `false` if the magazine is full or unallocated.
    #[inline(always)]
    fn push(&mut self, pfn: u64) -> bool {
        match self
            .pfns
            .as_deref_mut()
            .and_then(|pfns| pfns.get_mut(self.len))
        {
            Some(entry) => {
                *entry = pfn;
                self.len += 1;
                true
            }
            None => false,
        }
    }

    /// Takes the newest entry if it is at or below `max_base`.
    #[inline(always)]
    fn pop_if_at_most(&mut self, max_base: u64) -> Option<u64> {
        let top = self.len.checked_sub(1)?;
        let pfn = *self.pfns.as_deref()?.get(top)?;
        if pfn > max_base {
            return None;
        }
        self.len = top;
        Some(pfn)
    }

    /// Takes the newest entry at or below `max_base`, filling its place with the newest entry.
    fn take_at_most(&mut self, max_base: u64) -> Option<u64> {
        let at = self.entries().iter().rposition(|&pfn| pfn <= max_base)?;
        let top = self.len - 1;
        let pfns = self.pfns.as_deref_mut()?;
        let pfn = pfns[at];
        pfns[at] = pfns[top];
        self.len = top;
        Some(pfn)
    }
}

/// Full magazines shared by all CPUs, and empty ones kept for reuse.
struct Depot {
    full: [Vec<Magazine>; CACHED_ORDERS],
    spare: Vec<Magazine>,
}

impl Depot {
    fn new() -> Result<Self, IovaError> {
        let mut depot = Depot {
            full: Default::default(),
            spare: Vec::new(),
        };
        for mags in &mut depot.full {
            mags.try_reserve_exact(DEPOT_MAGAZINES)
                .map_err(|_| IovaError::NoMemory)?;
        }
        depot
            .spare
            .try_reserve_exact(SPARE_MAGAZINES)
            .map_err(|_| IovaError::NoMemory)?;
        Ok(depot)
    }

    /// Keeps an emptied magazine for reuse, or lets it go when enough are kept.
    fn keep_spare(&mut self, mut mag: Magazine) {
        if mag.is_allocated() && self.spare.len() < SPARE_MAGAZINES {
            mag.len = 0;
            self.spare.push(mag);
        }
    }
}

#[derive(Default)]
struct CpuCache {
    loaded: [Magazine; CACHED_ORDERS],
    prev: [Magazine; CACHED_ORDERS],
    hits: u64,
}

impl CpuCache {
    /// A cached IOVA of `2^order` pages whose base is at or below `max_base`.
    #[inline(always)]
    fn pop(&mut self, order: usize, max_base: u64, depot: &Mutex<Depot>) -> Option<u64> {
        let pfn = match self.loaded.get_mut(order)?.pop_if_at_most(max_base) {
            Some(pfn) => pfn,
            None => self.pop_refill(order, max_base, depot)?,
        };
        self.hits += 1;
        Some(pfn)
    }

    /// `pop` when the top of the loaded magazine does not do: refill the loaded magazine from the
    /// previous one or the depot, then take the newest entry that fits under the limit (Linux
    /// looks no further than the loaded magazine either).
    #[cold]
    fn pop_refill(&mut self, order: usize, max_base: u64, depot: &Mutex<Depot>) -> Option<u64> {
        if self.loaded[order].len == 0 {
            if self.prev[order].len != 0 {
                mem::swap(&mut self.loaded[order], &mut self.prev[order]);
            } else {
                let mut depot = depot.lock();
                let full = depot.full[order].pop()?;
                let empty = mem::replace(&mut self.loaded[order], full);
                depot.keep_spare(empty);
            }
        }
        self.loaded[order].take_at_most(max_base)
    }

    #[inline(always)]
    fn push(&mut self, order: usize, pfn: u64, space: &IovaSpace) {
        if !self.loaded[order].push(pfn) {
            self.push_refill(order, pfn, space);
        }
    }

    /// `push` when the loaded magazine is full or not allocated yet.
    #[cold]
    fn push_refill(&mut self, order: usize, pfn: u64, space: &IovaSpace) {
        if self.prev[order].is_allocated() && !self.prev[order].is_full() {
            mem::swap(&mut self.loaded[order], &mut self.prev[order]);
            self.loaded[order].push(pfn);
            return;
        }
        if self.loaded[order].is_full() && !self.prev[order].is_allocated() {
            self.prev[order] = mem::take(&mut self.loaded[order]);
        }
        if self.loaded[order].is_full() {
            // Both are full: the loaded one goes to the depot, or to the tree when the depot is
            // full (or no empty magazine can be had to replace it).
            let mut depot = space.depot.lock();
            let replacement = if depot.full[order].len() < DEPOT_MAGAZINES {
                depot.spare.pop().or_else(Magazine::allocate)
            } else {
                None
            };
            match replacement {
                Some(empty) => {
                    let full = mem::replace(&mut self.loaded[order], empty);
                    depot.full[order].push(full);
                }
                None => {
                    drop(depot);
                    space.empty_into_tree(order, &mut self.loaded[order]);
                }
            }
        }
        if !self.loaded[order].is_allocated() {
            let spare = space.depot.lock().spare.pop();
            match spare.or_else(Magazine::allocate) {
                Some(empty) => self.loaded[order] = empty,
                None => {
                    // No memory for a magazine: the IOVA goes straight back to the tree.
                    space.release_to_tree(order, &[pfn]);
                    return;
                }
            }
        }
        self.loaded[order].push(pfn);
    }

    fn cached_pages(&self) -> u64 {
        (0..CACHED_ORDERS)
            .map(|order| ((self.loaded[order].len + self.prev[order].len) as u64) << order)
            .sum()
    }
}

/// One CPU's cache on its own cache line, so CPUs do not contend for the line.
#[repr(align(64))]
struct CpuSlot(Mutex<CpuCache>);

/// The IOVA space of one domain. Shareable between CPUs (`Sync`); every method takes `&self`.
pub struct IovaSpace {
    first_pfn: u64,
    last_pfn: u64,
    cpus: [CpuSlot; MAX_CPUS],
    depot: Mutex<Depot>,
    tree: Mutex<Tree>,
    live: LiveMap,
}

impl IovaSpace {
    /// A space of the whole pages within `start..=end` (both byte addresses; `end` inclusive, as a
    /// DMA mask or an aperture end). Page 0 is never part of it, whatever `start` says.
    pub fn new(start: u64, end: u64) -> Result<Self, IovaError> {
        let first = align_up(start.max(PAGE_SIZE), PAGE_SIZE).map(|a| a >> PAGE_SHIFT);
        let (first_pfn, last_pfn) = match (first, last_pfn_at_or_below(end)) {
            (Some(first), Some(last)) if first <= last => (first, last),
            _ => return Err(IovaError::EmptySpace { start, end }),
        };
        Ok(IovaSpace {
            first_pfn,
            last_pfn,
            cpus: core::array::from_fn(|_| CpuSlot(Mutex::new(CpuCache::default()))),
            depot: Mutex::new(Depot::new()?),
            tree: Mutex::new(Tree {
                allocs: BTreeMap::new(),
                reserved: BTreeMap::new(),
                gaps: Gaps::new(first_pfn, last_pfn),
                allocated_pages: 0,
                slow_allocations: 0,
                failures: 0,
                flushes: 0,
            }),
            live: LiveMap::new(first_pfn, last_pfn),
        })
    }

    /// The lowest IOVA of the space.
    pub fn first_iova(&self) -> u64 {
        self.first_pfn << PAGE_SHIFT
    }

    /// The last byte of the space.
    pub fn last_iova(&self) -> u64 {
        (self.last_pfn << PAGE_SHIFT) | (PAGE_SIZE - 1)
    }

    /// Keeps `base..base + size` (bytes; every page it touches) from ever being allocated. The
    /// part outside the space is ignored; overlapping earlier reservations is fine. Refused if the
    /// range overlaps an allocation that is with a caller (cached IOVAs are flushed first).
    pub fn reserve(&self, base: u64, size: u64) -> Result<(), IovaError> {
        if size == 0 {
            return Err(IovaError::ZeroSize);
        }
        let last_byte = base
            .checked_add(size - 1)
            .ok_or(IovaError::RangeOverflow { base, size })?;
        let start = (base >> PAGE_SHIFT).max(self.first_pfn);
        let end = (last_byte >> PAGE_SHIFT).min(self.last_pfn);
        if start > end || self.tree.lock().try_reserve(start, end) {
            return Ok(());
        }
        self.flush_caches();
        if self.tree.lock().try_reserve(start, end) {
            Ok(())
        } else {
            Err(IovaError::ReserveOverlapsAllocation { base, size })
        }
    }

    /// Allocates exactly `pages` pages from the tree, bypassing the range caches: size-aligned, at
    /// the highest address whose last byte is at or below `limit`. Returns the IOVA of the first
    /// byte. Free it with [`IovaSpace::free`] (or [`IovaSpace::free_fast`]) with the same `pages`.
    pub fn alloc(&self, pages: u64, limit: u64) -> Result<u64, IovaError> {
        if pages == 0 {
            return Err(IovaError::ZeroSize);
        }
        self.alloc_tree(pages, limit)
    }

    /// Frees the allocation of `pages` pages at `iova` to the tree. Refused, changing nothing, if
    /// no allocation starts at `iova`, if its size differs (sizes up to [`MAX_CACHED_PAGES`] may be
    /// given unrounded), or if it was already freed.
    pub fn free(&self, iova: u64, pages: u64) -> Result<(), IovaError> {
        if pages == 0 {
            return Err(IovaError::ZeroSize);
        }
        if iova & (PAGE_SIZE - 1) != 0 {
            return Err(IovaError::Misaligned { iova });
        }
        let pfn = iova >> PAGE_SHIFT;
        let mut tree = self.tree.lock();
        let Some(&allocated) = tree.allocs.get(&pfn) else {
            return Err(if tree.in_reserved(pfn) {
                IovaError::Reserved { iova }
            } else {
                IovaError::NotAllocated { iova, pages }
            });
        };
        if !size_matches(allocated, pages) {
            return Err(IovaError::WrongSize {
                iova,
                pages,
                allocated,
            });
        }
        if let Some(order) = tracked_order(allocated) {
            if !self.live.clear(pfn, order) {
                // Allocated in the tree but not with a caller: it sits in a range cache.
                return Err(IovaError::AlreadyFree { iova });
            }
        }
        tree.remove_alloc(pfn, allocated);
        Ok(())
    }

    /// Allocates `pages` pages for CPU `cpu` (the caller's CPU index; any index is correct, the
    /// current CPU's is fast). Requests of up to [`MAX_CACHED_PAGES`] pages are rounded up to a
    /// power of two and served from the range cache when it holds an IOVA under `limit`;
    /// otherwise, and for larger requests, the tree serves them as [`IovaSpace::alloc`] does.
    #[inline(always)]
    pub fn alloc_fast(&self, cpu: usize, pages: u64, limit: u64) -> Result<u64, IovaError> {
        let slot = self.cpus.get(cpu).ok_or(IovaError::BadCpu { cpu })?;
        let Some(order) = cached_order(pages) else {
            return self.alloc(pages, limit);
        };
        let size = 1u64 << order;
        if let Some(max_base) = pages_at_or_below(limit).checked_sub(size) {
            let hit = slot.0.lock().pop(order, max_base, &self.depot);
            if let Some(pfn) = hit {
                self.live.set_cached(pfn, order);
                return Ok(pfn << PAGE_SHIFT);
            }
        }
        self.alloc_tree(size, limit)
    }

    /// Frees `pages` pages at `iova` into CPU `cpu`'s range cache if it is a live allocation of a
    /// cached size (see the module's "Fast-path checks"); anything else is handled, or refused
    /// with the same errors, as by [`IovaSpace::free`].
    #[inline(always)]
    pub fn free_fast(&self, cpu: usize, iova: u64, pages: u64) -> Result<(), IovaError> {
        let slot = self.cpus.get(cpu).ok_or(IovaError::BadCpu { cpu })?;
        let Some(order) = cached_order(pages) else {
            return self.free(iova, pages);
        };
        let pfn = iova >> PAGE_SHIFT;
        // Page-aligned and aligned to its size; inside the space.
        let plausible = iova & ((PAGE_SIZE << order) - 1) == 0
            && pfn.wrapping_sub(self.first_pfn) <= self.last_pfn - self.first_pfn;
        if !plausible || !self.live.clear(pfn, order) {
            return self.free(iova, pages);
        }
        slot.0.lock().push(order, pfn, self);
        Ok(())
    }

    /// Returns every cached IOVA, of every CPU and of the depot, to the tree.
    pub fn flush_caches(&self) {
        for slot in &self.cpus {
            let mut cache = slot.0.lock();
            let CpuCache { loaded, prev, .. } = &mut *cache;
            for order in 0..CACHED_ORDERS {
                self.empty_into_tree(order, &mut loaded[order]);
                self.empty_into_tree(order, &mut prev[order]);
            }
        }
        let mut depot = self.depot.lock();
        for order in 0..CACHED_ORDERS {
            while let Some(mut mag) = depot.full[order].pop() {
                self.empty_into_tree(order, &mut mag);
                depot.keep_spare(mag);
            }
        }
        drop(depot);
        self.tree.lock().flushes += 1;
    }

    /// The space's counters (see [`IovaStats`]).
    pub fn stats(&self) -> IovaStats {
        let (mut cached_pages, mut fast_hits) = (0, 0);
        for slot in &self.cpus {
            let cache = slot.0.lock();
            cached_pages += cache.cached_pages();
            fast_hits += cache.hits;
        }
        {
            let depot = self.depot.lock();
            for (order, mags) in depot.full.iter().enumerate() {
                cached_pages += mags
                    .iter()
                    .map(|mag| (mag.len as u64) << order)
                    .sum::<u64>();
            }
        }
        let tree = self.tree.lock();
        IovaStats {
            allocated_pages: tree.allocated_pages.saturating_sub(cached_pages),
            cached_pages,
            reserved_pages: tree.reserved_pages(),
            allocations: fast_hits + tree.slow_allocations,
            fast_hits,
            slow_allocations: tree.slow_allocations,
            flushes: tree.flushes,
            failures: tree.failures,
        }
    }

    /// `true` when nothing is allocated or cached: the tree holds only reservations. Cached IOVAs
    /// count as allocated, so flush first to ask "did every caller give everything back?".
    pub fn is_quiescent(&self) -> bool {
        self.tree.lock().allocs.is_empty()
    }

    /// The tree search, flushing the range caches and searching again before giving up.
    fn alloc_tree(&self, pages: u64, limit: u64) -> Result<u64, IovaError> {
        let exhausted = IovaError::Exhausted { pages, limit };
        let top = last_pfn_at_or_below(limit).map_or(0, |top| top.min(self.last_pfn));
        // A request that would not fit even into an empty space fails without flushing anything.
        if top < self.first_pfn || top - self.first_pfn < pages - 1 {
            self.tree.lock().failures += 1;
            return Err(exhausted);
        }
        let first_try = self.alloc_locked(&mut self.tree.lock(), pages, top)?;
        if let Some(pfn) = first_try {
            return Ok(pfn << PAGE_SHIFT);
        }
        self.flush_caches();
        let mut tree = self.tree.lock();
        match self.alloc_locked(&mut tree, pages, top)? {
            Some(pfn) => Ok(pfn << PAGE_SHIFT),
            None => {
                tree.failures += 1;
                Err(exhausted)
            }
        }
    }

    /// One tree search for `pages` pages (at most the span of the space) ending at or below pfn
    /// `top`; `None` if nothing fits.
    fn alloc_locked(
        &self,
        tree: &mut Tree,
        pages: u64,
        top: u64,
    ) -> Result<Option<u64>, IovaError> {
        let Some(pfn) = tree.gaps.find(pages, pages.next_power_of_two(), top) else {
            return Ok(None);
        };
        if let Some(order) = tracked_order(pages) {
            self.live.set_new(pfn, order)?;
        }
        tree.insert_alloc(pfn, pages);
        Ok(Some(pfn))
    }

    /// Frees cached IOVAs of `2^order` pages to the tree.
    fn release_to_tree(&self, order: usize, pfns: &[u64]) {
        if pfns.is_empty() {
            return;
        }
        let pages = 1u64 << order;
        let mut tree = self.tree.lock();
        for &pfn in pfns {
            let released = tree.release_cached(pfn, pages);
            debug_assert!(
                released,
                "cached IOVA pfn {pfn:#x} is not a {pages}-page allocation"
            );
        }
    }

    /// Frees every IOVA of a magazine of `2^order`-page IOVAs to the tree, leaving it empty.
    fn empty_into_tree(&self, order: usize, mag: &mut Magazine) {
        self.release_to_tree(order, mag.entries());
        mag.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicU8;
    use std::sync::Arc;

    const P: u64 = PAGE_SIZE;
    const MAX: u64 = u64::MAX;
    /// A 4 GiB space: pages 1..=0xFFFFF.
    const FOUR_GIB: u64 = 0xFFFF_FFFF;

    impl IovaSpace {
        /// Checks the structure against itself: the tree tiles the space exactly, the gap index
        /// agrees with the gaps, every cached IOVA is a tree allocation of its size with its live
        /// flag clear, and every other allocation of a cached size has its flag set. Call it only
        /// when no operation runs concurrently.
        fn check_invariants(&self) {
            let mut cached = BTreeMap::new();
            for slot in &self.cpus {
                let cache = slot.0.lock();
                for order in 0..CACHED_ORDERS {
                    for mag in [&cache.loaded[order], &cache.prev[order]] {
                        assert!(mag.len <= MAGAZINE_SIZE);
                        assert_eq!(mag.entries().len(), mag.len);
                        for &pfn in mag.entries() {
                            assert!(
                                cached.insert(pfn, order).is_none(),
                                "pfn {pfn:#x} cached twice"
                            );
                        }
                    }
                }
            }
            {
                let depot = self.depot.lock();
                assert!(depot.spare.len() <= SPARE_MAGAZINES);
                for order in 0..CACHED_ORDERS {
                    assert!(depot.full[order].len() <= DEPOT_MAGAZINES);
                    for mag in &depot.full[order] {
                        assert!(mag.is_full());
                        for &pfn in mag.entries() {
                            assert!(
                                cached.insert(pfn, order).is_none(),
                                "pfn {pfn:#x} cached twice"
                            );
                        }
                    }
                }
            }
            let tree = self.tree.lock();
            // Tiling: allocations, reservations and gaps cover first..=last without overlap.
            let mut pieces: Vec<(u64, u64, char)> = Vec::new();
            pieces.extend(tree.allocs.iter().map(|(&b, &n)| (b, b + n - 1, 'a')));
            pieces.extend(tree.reserved.iter().map(|(&s, &e)| (s, e, 'r')));
            pieces.extend(tree.gaps.by_start.iter().map(|(&s, &e)| (s, e, 'g')));
            pieces.sort();
            let mut next = self.first_pfn;
            let mut prev_kind = ' ';
            for &(s, e, kind) in &pieces {
                assert_eq!(s, next, "tiling broken at pfn {next:#x}: {pieces:x?}");
                assert!(e >= s);
                assert!(
                    !(kind == 'g' && prev_kind == 'g'),
                    "adjacent gaps at {s:#x}"
                );
                next = e + 1;
                prev_kind = kind;
            }
            assert_eq!(next, self.last_pfn + 1, "tiling stops early");
            for ((&s, &e), &r_next) in tree.reserved.iter().zip(tree.reserved.keys().skip(1)) {
                assert!(
                    e + 1 < r_next,
                    "reservations {s:#x} and {r_next:#x} not merged"
                );
            }
            // Gap index.
            let mut class_len = [0u64; 64];
            assert_eq!(tree.gaps.by_class.len(), tree.gaps.by_start.len());
            for (&s, &e) in &tree.gaps.by_start {
                let class = Gaps::class(s, e);
                assert_eq!(tree.gaps.by_class.get(&(class, s)), Some(&e));
                class_len[class as usize] += 1;
            }
            assert_eq!(class_len, tree.gaps.class_len);
            let mask = (0..64)
                .filter(|&c| class_len[c] > 0)
                .fold(0u64, |m, c| m | 1 << c);
            assert_eq!(mask, tree.gaps.class_mask);
            assert_eq!(tree.allocated_pages, tree.allocs.values().sum::<u64>());
            // Cached IOVAs and live flags.
            for (&pfn, &order) in &cached {
                assert_eq!(
                    tree.allocs.get(&pfn),
                    Some(&(1 << order)),
                    "cached {pfn:#x} not in tree"
                );
            }
            for (&pfn, &pages) in &tree.allocs {
                if let Some(order) = tracked_order(pages) {
                    let (index, mask) = self.live.locate(pfn, order);
                    let word = self.live.word(index).expect("leaf of a tracked allocation");
                    let live = word.load(Ordering::Relaxed) & mask != 0;
                    assert_eq!(live, !cached.contains_key(&pfn), "live flag of {pfn:#x}");
                }
            }
        }
    }

    fn space(end: u64) -> IovaSpace {
        IovaSpace::new(0, end).unwrap()
    }

    #[test]
    fn new_rejects_spaces_without_a_usable_page() {
        assert_eq!(
            IovaSpace::new(0, 0xFFF).err(),
            Some(IovaError::EmptySpace {
                start: 0,
                end: 0xFFF
            })
        );
        assert!(matches!(
            IovaSpace::new(0x5000, 0x4FFF),
            Err(IovaError::EmptySpace { .. })
        ));
        // Neither end covers a whole page.
        assert!(matches!(
            IovaSpace::new(0x1800, 0x2FFE),
            Err(IovaError::EmptySpace { .. })
        ));
        assert!(matches!(
            IovaSpace::new(MAX, MAX),
            Err(IovaError::EmptySpace { .. })
        ));
        // One whole page: 0x2000..=0x2FFF.
        let s = IovaSpace::new(0x1800, 0x2FFF).unwrap();
        assert_eq!((s.first_iova(), s.last_iova()), (0x2000, 0x2FFF));
        assert_eq!(s.alloc(1, MAX), Ok(0x2000));
        assert_eq!(
            s.alloc(1, MAX),
            Err(IovaError::Exhausted {
                pages: 1,
                limit: MAX
            })
        );
        s.check_invariants();
    }

    #[test]
    fn allocates_top_down_size_aligned_and_fills_holes() {
        let s = space(FOUR_GIB);
        assert_eq!(s.alloc(1, MAX), Ok(0xFFFF_F000));
        assert_eq!(s.alloc(1, MAX), Ok(0xFFFF_E000));
        // 2 pages, 2-page aligned: pfns 0xFFFFC..=0xFFFFD.
        assert_eq!(s.alloc(2, MAX), Ok(0xFFFF_C000));
        // 3 pages, 4-page aligned: the highest start <= 0xFFFFB - 2 that is a multiple of 4 is
        // 0xFFFF8, leaving a hole at 0xFFFFB ...
        assert_eq!(s.alloc(3, MAX), Ok(0xFFFF_8000));
        // ... which is the highest free page.
        assert_eq!(s.alloc(1, MAX), Ok(0xFFFF_B000));
        // 16 pages, 16-aligned: below 0xFFFF8 the highest is 0xFFFE0, leaving 0xFFFF0..=0xFFFF7.
        assert_eq!(s.alloc(16, MAX), Ok(0xFFFE_0000));
        // 8 pages fit that hole exactly.
        assert_eq!(s.alloc(8, MAX), Ok(0xFFFF_0000));
        // 5 pages, 8-aligned, below 0xFFFE0: 0xFFFDF - 4 = 0xFFFDB, rounded down to 0xFFFD8.
        assert_eq!(s.alloc(5, MAX), Ok(0xFFFD_8000));
        // 33 pages, 64-aligned: 0xFFFD7 - 32 = 0xFFFB7, rounded down to 0xFFF80.
        assert_eq!(s.alloc(33, MAX), Ok(0xFFF8_0000));
        // 4 pages: the hole 0xFFFDD..=0xFFFDF is 3 pages; 0xFFFD4 is the next aligned fit.
        assert_eq!(s.alloc(4, MAX), Ok(0xFFFD_4000));
        let st = s.stats();
        assert_eq!(st.allocated_pages, 1 + 1 + 2 + 3 + 1 + 16 + 8 + 5 + 33 + 4);
        assert_eq!(
            (st.allocations, st.slow_allocations, st.fast_hits),
            (10, 10, 0)
        );
        s.check_invariants();
    }

    #[test]
    fn respects_the_limit_inclusively() {
        let s = space(FOUR_GIB);
        // The last byte must be <= limit: page 0x10000 ends at 0x1000_0FFF > 0x1000_0FFE.
        assert_eq!(s.alloc(1, 0x1000_0FFE), Ok(0x0FFF_F000));
        assert_eq!(s.alloc(1, 0x1000_0FFF), Ok(0x1000_0000));
        // 4 pages under 0x1000_0FFF: 0xFFFC..=0xFFFF would hit 0xFFFF, so 0xFFF8.
        assert_eq!(s.alloc(4, 0x1000_0FFF), Ok(0x0FFF_8000));
        // A limit above the space is the space's end.
        assert_eq!(s.alloc(1, 0x7_FFFF_FFFF), Ok(0xFFFF_F000));
        // Page 1 is the only page under 0x1FFF; page 0 never counts.
        assert_eq!(
            s.alloc(1, 0xFFF),
            Err(IovaError::Exhausted {
                pages: 1,
                limit: 0xFFF
            })
        );
        assert_eq!(s.alloc(1, 0x1FFF), Ok(0x1000));
        assert_eq!(
            s.alloc(1, 0x1FFF),
            Err(IovaError::Exhausted {
                pages: 1,
                limit: 0x1FFF
            })
        );
        assert_eq!(s.alloc(2, 0x3FFF), Ok(0x2000));
        // The fast path keeps the limit too: a cached IOVA above it is not handed out.
        s.free_fast(0, 0x1000_0000, 1).unwrap();
        assert_eq!(s.alloc_fast(0, 1, 0x0FFF_FFFF), Ok(0x0FFF_E000));
        assert_eq!(s.stats().cached_pages, 1);
        assert_eq!(s.alloc_fast(0, 1, 0x1000_0FFF), Ok(0x1000_0000));
        assert_eq!(s.stats().fast_hits, 1);
        s.check_invariants();
    }

    #[test]
    fn never_hands_out_iova_zero() {
        let s = space(0x3FFF); // pages 1..=3
        assert_eq!(s.first_iova(), 0x1000);
        // 2 pages, 2-aligned: 2..=3; the only other aligned pair would be 0..=1.
        assert_eq!(s.alloc(2, MAX), Ok(0x2000));
        assert_eq!(
            s.alloc(2, MAX),
            Err(IovaError::Exhausted {
                pages: 2,
                limit: MAX
            })
        );
        assert_eq!(s.alloc_fast(0, 1, MAX), Ok(0x1000));
        assert_eq!(
            s.alloc_fast(0, 1, MAX),
            Err(IovaError::Exhausted {
                pages: 1,
                limit: MAX
            })
        );
        assert_eq!(
            s.free(0, 1),
            Err(IovaError::NotAllocated { iova: 0, pages: 1 })
        );
        assert_eq!(
            s.free_fast(0, 0, 1),
            Err(IovaError::NotAllocated { iova: 0, pages: 1 })
        );
        s.check_invariants();
    }

    #[test]
    fn reservations_are_avoided_merged_and_clipped() {
        let s = space(FOUR_GIB);
        s.reserve(0xFFFF_0000, 0x1_0000).unwrap(); // pfns 0xFFFF0..=0xFFFFF
        s.reserve(0xFFFE_E800, 0x100).unwrap(); // inside one page: 0xFFFEE
        s.reserve(0xFFFF_8000, 0x10_0000).unwrap(); // overlaps the first, sticks out of the space
        s.reserve(0x0800_0000, 0x10_0000).unwrap(); // an MSI window: pfns 0x8000..=0x80FF
        s.reserve(0x1_0000_0000, 0x1000).unwrap(); // entirely outside: nothing to do
        assert_eq!(s.stats().reserved_pages, 16 + 1 + 0x100);
        assert_eq!(s.alloc(1, MAX), Ok(0xFFFE_F000));
        // 0xFFFEE is reserved.
        assert_eq!(s.alloc(2, MAX), Ok(0xFFFE_C000));
        // 32 pages below 0xFFFEC: 0xFFFEB - 31 = 0xFFFCC, rounded down to 0xFFFC0.
        assert_eq!(s.alloc(32, MAX), Ok(0xFFFC_0000));
        // Under a limit inside the MSI window the highest page is just below it.
        assert_eq!(s.alloc(1, 0x080F_FFFF), Ok(0x07FF_F000));
        assert_eq!(s.alloc_fast(0, 4, 0x0800_3FFF), Ok(0x07FF_8000));
        assert_eq!(
            s.free(0xFFFF_4000, 1),
            Err(IovaError::Reserved { iova: 0xFFFF_4000 })
        );
        assert_eq!(
            s.free_fast(0, 0x0800_0000, 1),
            Err(IovaError::Reserved { iova: 0x0800_0000 })
        );
        assert_eq!(
            s.reserve(0xFFFE_F000, 0x1000),
            Err(IovaError::ReserveOverlapsAllocation {
                base: 0xFFFE_F000,
                size: 0x1000
            })
        );
        assert_eq!(s.reserve(0x1000, 0), Err(IovaError::ZeroSize));
        assert_eq!(
            s.reserve(MAX, 2),
            Err(IovaError::RangeOverflow { base: MAX, size: 2 })
        );
        // A cached IOVA does not block a reservation: the caches are flushed first.
        s.free_fast(0, 0xFFFE_F000, 1).unwrap();
        assert_eq!(s.stats().cached_pages, 1);
        s.reserve(0xFFFE_F000, 0x1000).unwrap();
        assert_eq!(s.stats().cached_pages, 0);
        assert_eq!(s.stats().reserved_pages, 16 + 2 + 0x100);
        s.check_invariants();
    }

    #[test]
    fn refused_frees_change_nothing() {
        let s = space(FOUR_GIB);
        let a = s.alloc(4, MAX).unwrap();
        let b = s.alloc_fast(0, 1, MAX).unwrap();
        assert_eq!((a, b), (0xFFFF_C000, 0xFFFF_B000));
        let before = s.stats();
        assert_eq!(
            s.free(a, 2),
            Err(IovaError::WrongSize {
                iova: a,
                pages: 2,
                allocated: 4
            })
        );
        assert_eq!(
            s.free(a, 8),
            Err(IovaError::WrongSize {
                iova: a,
                pages: 8,
                allocated: 4
            })
        );
        assert_eq!(
            s.free_fast(0, a, 2),
            Err(IovaError::WrongSize {
                iova: a,
                pages: 2,
                allocated: 4
            })
        );
        assert_eq!(
            s.free_fast(0, a, 64),
            Err(IovaError::WrongSize {
                iova: a,
                pages: 64,
                allocated: 4
            })
        );
        assert_eq!(
            s.free(a + P, 1),
            Err(IovaError::NotAllocated {
                iova: a + P,
                pages: 1
            })
        );
        assert_eq!(
            s.free_fast(0, a + P, 1),
            Err(IovaError::NotAllocated {
                iova: a + P,
                pages: 1
            })
        );
        // A 2-page free one page into the 4-page allocation is misaligned for its size; its
        // flag position would be that of the 4-page block, so the screening must refuse it.
        assert_eq!(
            s.free_fast(0, a + P, 2),
            Err(IovaError::NotAllocated {
                iova: a + P,
                pages: 2
            })
        );
        assert_eq!(s.free(a + 1, 4), Err(IovaError::Misaligned { iova: a + 1 }));
        assert_eq!(
            s.free_fast(0, a + 1, 4),
            Err(IovaError::Misaligned { iova: a + 1 })
        );
        assert_eq!(
            s.free(0x1234_5000, 1),
            Err(IovaError::NotAllocated {
                iova: 0x1234_5000,
                pages: 1
            })
        );
        assert_eq!(s.free(a, 0), Err(IovaError::ZeroSize));
        assert_eq!(
            s.free_fast(MAX_CPUS, b, 1),
            Err(IovaError::BadCpu { cpu: MAX_CPUS })
        );
        assert_eq!(
            s.alloc_fast(MAX_CPUS, 1, MAX),
            Err(IovaError::BadCpu { cpu: MAX_CPUS })
        );
        assert_eq!(s.stats(), before);
        s.check_invariants();

        // Double frees, through either path, while the IOVA sits in a cache ...
        s.free_fast(0, b, 1).unwrap();
        let cached = s.stats();
        assert_eq!(
            s.free_fast(0, b, 1),
            Err(IovaError::AlreadyFree { iova: b })
        );
        assert_eq!(
            s.free_fast(1, b, 1),
            Err(IovaError::AlreadyFree { iova: b })
        );
        assert_eq!(s.free(b, 1), Err(IovaError::AlreadyFree { iova: b }));
        assert_eq!(s.stats(), cached);
        // ... so it comes out of the cache exactly once.
        assert_eq!(s.alloc_fast(0, 1, MAX), Ok(b));
        assert_eq!(s.alloc_fast(0, 1, MAX), Ok(0xFFFF_A000));
        // ... and after it went back to the tree.
        s.free(a, 4).unwrap();
        assert_eq!(
            s.free(a, 4),
            Err(IovaError::NotAllocated { iova: a, pages: 4 })
        );
        assert_eq!(
            s.free_fast(0, a, 4),
            Err(IovaError::NotAllocated { iova: a, pages: 4 })
        );
        // An uncached size (3 pages from the tree) freed through the fast path goes to the tree.
        let c = s.alloc(3, MAX).unwrap();
        assert_eq!(c, 0xFFFF_C000);
        assert_eq!(
            s.free_fast(0, c, 4),
            Err(IovaError::WrongSize {
                iova: c,
                pages: 4,
                allocated: 3
            })
        );
        s.free_fast(0, c, 3).unwrap();
        assert_eq!(s.stats().cached_pages, 0);
        // A rounded fast-path allocation may be freed with its unrounded size, by either path.
        let d = s.alloc_fast(0, 3, MAX).unwrap();
        assert_eq!(d, 0xFFFF_C000);
        s.free(d, 3).unwrap();
        s.check_invariants();
    }

    #[test]
    fn fast_path_reuses_lifo_per_cpu_and_rounds_sizes() {
        let s = space(FOUR_GIB);
        let a = s.alloc_fast(0, 1, MAX).unwrap();
        assert_eq!(a, 0xFFFF_F000);
        s.free_fast(0, a, 1).unwrap();
        let st = s.stats();
        assert_eq!((st.cached_pages, st.allocated_pages), (1, 0));
        assert_eq!(s.alloc_fast(0, 1, MAX), Ok(a));
        // 3 pages are served as 4: 4-aligned below 0xFFFFF.
        let x = s.alloc_fast(0, 3, MAX).unwrap();
        assert_eq!(x, 0xFFFF_8000);
        assert_eq!(s.stats().allocated_pages, 1 + 4);
        s.free_fast(0, x, 3).unwrap();
        assert_eq!(s.alloc_fast(0, 4, MAX), Ok(x));
        // Another CPU's cache is its own.
        let y = s.alloc_fast(0, 2, MAX).unwrap();
        assert_eq!(y, 0xFFFF_C000);
        s.free_fast(1, y, 2).unwrap();
        assert_eq!(s.alloc_fast(0, 2, MAX), Ok(0xFFFF_6000));
        assert_eq!(s.alloc_fast(1, 2, MAX), Ok(y));
        // Above the cached sizes the fast path is the tree.
        let z = s.alloc_fast(0, 33, MAX).unwrap();
        assert_eq!(z, 0xFFFC_0000);
        s.free_fast(0, z, 33).unwrap();
        assert_eq!(s.stats().cached_pages, 0);
        // An entry under the limit below the top of the magazine is found and taken.
        let lo = s.alloc_fast(2, 1, 0x7FFF_FFFF).unwrap();
        let hi = s.alloc_fast(2, 1, MAX).unwrap();
        assert_eq!((lo, hi), (0x7FFF_F000, 0xFFFF_E000));
        s.free_fast(2, lo, 1).unwrap();
        s.free_fast(2, hi, 1).unwrap();
        assert_eq!(s.alloc_fast(2, 1, 0x7FFF_FFFF), Ok(lo));
        assert_eq!(s.alloc_fast(2, 1, MAX), Ok(hi));
        let st = s.stats();
        assert_eq!((st.fast_hits, st.cached_pages), (5, 0));
        s.check_invariants();
    }

    #[test]
    fn magazines_overflow_into_the_depot_and_then_into_the_tree() {
        let s = space(FOUR_GIB);
        let mag = MAGAZINE_SIZE as u64;
        // Two magazines on the CPU, a full depot, one more full magazine and one extra free.
        let n = 2 * mag + DEPOT_MAGAZINES as u64 * mag + 1;
        let top = 0xFFFFF;
        for i in 0..n {
            assert_eq!(s.alloc(1, MAX), Ok((top - i) << PAGE_SHIFT));
        }
        for i in 0..n {
            s.free_fast(0, (top - i) << PAGE_SHIFT, 1).unwrap();
        }
        // Frees 0..127 fill "prev", the depot holds frees 127..4191, frees 4191..4318 were the
        // loaded magazine when the depot was full and went to the tree; free 4318 is "loaded".
        let in_tree = mag;
        let st = s.stats();
        assert_eq!(st.cached_pages, n - in_tree);
        assert_eq!(st.allocated_pages, 0);
        s.check_invariants();
        let pfn_of_free = |i: u64| (top - i) << PAGE_SHIFT;
        assert_eq!(s.alloc_fast(0, 1, MAX), Ok(pfn_of_free(n - 1)));
        assert_eq!(s.alloc_fast(0, 1, MAX), Ok(pfn_of_free(mag - 1)));
        for i in (0..mag - 1).rev() {
            assert_eq!(s.alloc_fast(0, 1, MAX), Ok(pfn_of_free(i)));
        }
        // Then the depot, newest magazine first.
        let depot_last = 2 * mag + (DEPOT_MAGAZINES as u64 - 1) * mag - 1;
        assert_eq!(s.alloc_fast(0, 1, MAX), Ok(pfn_of_free(depot_last)));
        for _ in 0..(n - in_tree - mag - 2) {
            s.alloc_fast(0, 1, MAX).unwrap();
        }
        let st = s.stats();
        assert_eq!((st.cached_pages, st.fast_hits), (0, n - in_tree));
        // The tree's highest free page is the highest of those it got back.
        assert_eq!(s.alloc_fast(0, 1, MAX), Ok(pfn_of_free(n - 1 - in_tree)));
        s.check_invariants();
    }

    #[test]
    fn exhaustion_flushes_once_retries_then_fails_cleanly() {
        let s = space(0x8FFF); // pages 1..=8
        for pfn in (1..=8).rev() {
            assert_eq!(s.alloc_fast(0, 1, MAX), Ok(pfn << PAGE_SHIFT));
        }
        for pfn in 1..=8 {
            s.free_fast(0, pfn << PAGE_SHIFT, 1).unwrap();
        }
        assert_eq!(s.stats().cached_pages, 8);
        // The tree is full of cached pages: CPU 1 gets 2 pages only after the flush. Pfn 7 is
        // odd, so the highest 2-aligned pair is 6..=7.
        assert_eq!(s.alloc_fast(1, 2, MAX), Ok(0x6000));
        let st = s.stats();
        assert_eq!((st.flushes, st.failures, st.cached_pages), (1, 0, 0));
        for pfn in [8, 5, 4, 3, 2, 1] {
            assert_eq!(s.alloc(1, MAX), Ok(pfn << PAGE_SHIFT));
        }
        assert_eq!(
            s.alloc(1, MAX),
            Err(IovaError::Exhausted {
                pages: 1,
                limit: MAX
            })
        );
        assert_eq!(
            s.alloc_fast(1, 3, MAX),
            Err(IovaError::Exhausted {
                pages: 4,
                limit: MAX
            })
        );
        let st = s.stats();
        assert_eq!((st.flushes, st.failures), (3, 2));
        // A request larger than the whole space fails without flushing.
        assert_eq!(
            s.alloc(9, MAX),
            Err(IovaError::Exhausted {
                pages: 9,
                limit: MAX
            })
        );
        assert_eq!(
            s.alloc(MAX, MAX),
            Err(IovaError::Exhausted {
                pages: MAX,
                limit: MAX
            })
        );
        let st = s.stats();
        assert_eq!((st.flushes, st.failures), (3, 4));
        // A free makes room again.
        s.free_fast(0, 0x3000, 1).unwrap();
        assert_eq!(s.alloc_fast(1, 1, MAX), Ok(0x3000));
        assert_eq!(s.stats().flushes, 4);
        s.check_invariants();
    }

    #[test]
    fn the_whole_64_bit_space_works() {
        let s = space(MAX);
        assert_eq!(s.last_iova(), MAX);
        let a = s.alloc_fast(0, 32, MAX).unwrap();
        assert_eq!(a, 0xFFFF_FFFF_FFFE_0000);
        s.free_fast(0, a, 32).unwrap();
        assert_eq!(
            s.free_fast(0, a, 32),
            Err(IovaError::AlreadyFree { iova: a })
        );
        assert_eq!(s.alloc_fast(0, 32, MAX), Ok(a));
        assert_eq!(s.alloc(1, 0x1FFF), Ok(0x1000));
        assert_eq!(
            s.free_fast(0, MAX & !(P - 1), 1),
            Err(IovaError::NotAllocated {
                iova: MAX & !(P - 1),
                pages: 1
            })
        );
        s.check_invariants();
        s.free_fast(0, a, 32).unwrap();
        s.free_fast(0, 0x1000, 1).unwrap();
        s.flush_caches();
        assert!(s.is_quiescent());
    }

    #[test]
    fn is_shareable_and_errors_read_well() {
        fn shareable<T: Send + Sync>() {}
        shareable::<IovaSpace>();
        let e = IovaError::WrongSize {
            iova: 0x5000,
            pages: 2,
            allocated: 4,
        };
        assert_eq!(
            e.to_string(),
            "cannot free 2 pages at IOVA 0x5000: it was allocated with 4 pages"
        );
        assert_eq!(
            IovaError::Exhausted {
                pages: 4,
                limit: 0xFFFF_FFFF
            }
            .to_string(),
            "no free size-aligned IOVA range of 4 pages ends at or below 0xffffffff"
        );
        assert_eq!(
            IovaError::AlreadyFree { iova: 0x1000 }.to_string(),
            "IOVA 0x1000 was already freed (double free)"
        );
    }

    // ---- Model-based test -------------------------------------------------------------------

    /// The space of the model test: pages 1..=255.
    const MODEL_END: u64 = 256 * P - 1;
    const MODEL_LAST: u64 = 255;

    #[derive(Clone, Debug)]
    struct Alloc {
        iova: u64,
        /// What the caller asked for and frees with.
        asked: u64,
        /// What the allocator allocated (the fast path rounds small sizes up).
        size: u64,
    }

    /// A reference allocator: the live allocations and reserved pages, and a brute-force search.
    #[derive(Default)]
    struct Model {
        live: Vec<Alloc>,
        reserved: Vec<(u64, u64)>,
        /// Recently freed (iova, pages), for double frees.
        freed: Vec<(u64, u64)>,
    }

    impl Model {
        fn busy(&self, start: u64, end: u64) -> bool {
            self.live.iter().any(|a| {
                let s = a.iova >> PAGE_SHIFT;
                s <= end && start < s + a.size
            }) || self.reserved.iter().any(|&(s, e)| s <= end && start <= e)
        }

        /// The highest size-aligned pfn of `size` pages ending at or below page `top`.
        fn highest_fit(&self, size: u64, top: u64) -> Option<u64> {
            let align = size.next_power_of_two();
            let top = top.min(MODEL_LAST);
            let mut pfn = align_down((top + 1).checked_sub(size)?, align);
            while pfn >= 1 {
                if !self.busy(pfn, pfn + size - 1) {
                    return Some(pfn);
                }
                pfn = pfn.checked_sub(align)?;
            }
            None
        }

        fn live_pages(&self) -> u64 {
            self.live.iter().map(|a| a.size).sum()
        }

        fn reserved_pages(&self) -> u64 {
            (1..=MODEL_LAST)
                .filter(|&p| self.reserved.iter().any(|&(s, e)| s <= p && p <= e))
                .count() as u64
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc {
            fast: bool,
            cpu: usize,
            pages: u64,
            limit: u64,
        },
        Free {
            fast: bool,
            cpu: usize,
            pick: usize,
        },
        WrongSizeFree {
            fast: bool,
            pick: usize,
            larger: bool,
        },
        DoubleFree {
            fast: bool,
            pick: usize,
        },
        InteriorFree {
            fast: bool,
            pick: usize,
        },
        Reserve {
            base: u64,
            size: u64,
        },
        Flush,
    }

    fn op() -> impl Strategy<Value = Op> {
        let pages = prop_oneof![4 => 1..=4u64, 2 => 1..=32u64, 1 => 33..=70u64];
        let limit = prop_oneof![
            2 => Just(MAX),
            2 => (0..=260u64).prop_map(|p| p * P + P - 1),
            1 => 0..=260 * P,
        ];
        prop_oneof![
            8 => (any::<bool>(), 0..4usize, pages, limit)
                .prop_map(|(fast, cpu, pages, limit)| Op::Alloc { fast, cpu, pages, limit }),
            6 => (any::<bool>(), 0..4usize, any::<usize>())
                .prop_map(|(fast, cpu, pick)| Op::Free { fast, cpu, pick }),
            1 => (any::<bool>(), any::<usize>(), any::<bool>())
                .prop_map(|(fast, pick, larger)| Op::WrongSizeFree { fast, pick, larger }),
            1 => (any::<bool>(), any::<usize>())
                .prop_map(|(fast, pick)| Op::DoubleFree { fast, pick }),
            1 => (any::<bool>(), any::<usize>())
                .prop_map(|(fast, pick)| Op::InteriorFree { fast, pick }),
            1 => (0..300 * P, 1..8 * P).prop_map(|(base, size)| Op::Reserve { base, size }),
            1 => Just(Op::Flush),
        ]
    }

    fn free_either(
        s: &IovaSpace,
        fast: bool,
        cpu: usize,
        iova: u64,
        pages: u64,
    ) -> Result<(), IovaError> {
        if fast {
            s.free_fast(cpu, iova, pages)
        } else {
            s.free(iova, pages)
        }
    }

    fn run_model(ops: &[Op]) -> Result<(), TestCaseError> {
        let s = space(MODEL_END);
        let mut m = Model::default();
        for op in ops {
            let before = s.stats();
            match *op {
                Op::Alloc {
                    fast,
                    cpu,
                    pages,
                    limit,
                } => {
                    let size = if fast && pages <= MAX_CACHED_PAGES {
                        pages.next_power_of_two()
                    } else {
                        pages
                    };
                    let top = last_pfn_at_or_below(limit);
                    let expected = top.and_then(|top| m.highest_fit(size, top));
                    let got = if fast {
                        s.alloc_fast(cpu, pages, limit)
                    } else {
                        s.alloc(pages, limit)
                    };
                    let flushed = s.stats().flushes > before.flushes;
                    match got {
                        Ok(iova) => {
                            let pfn = iova >> PAGE_SHIFT;
                            prop_assert_eq!(iova % P, 0);
                            prop_assert!(pfn >= 1 && pfn + size - 1 <= MODEL_LAST);
                            prop_assert_eq!(pfn % size.next_power_of_two(), 0, "not size-aligned");
                            prop_assert!(iova + size * P - 1 <= limit, "over the limit");
                            prop_assert!(
                                !m.busy(pfn, pfn + size - 1),
                                "overlaps a live or reserved range"
                            );
                            // Without cached IOVAs in the way the tree's answer is exact.
                            if before.cached_pages == 0 || flushed {
                                prop_assert_eq!(Some(pfn), expected, "not the highest fit");
                            }
                            m.live.push(Alloc {
                                iova,
                                asked: pages,
                                size,
                            });
                        }
                        Err(e) => {
                            prop_assert_eq!(e, IovaError::Exhausted { pages: size, limit });
                            prop_assert_eq!(expected, None, "failed although a range fits");
                        }
                    }
                }
                Op::Free { fast, cpu, pick } => {
                    if m.live.is_empty() {
                        continue;
                    }
                    let a = m.live.swap_remove(pick % m.live.len());
                    prop_assert_eq!(free_either(&s, fast, cpu, a.iova, a.asked), Ok(()));
                    m.freed.push((a.iova, a.asked));
                    if m.freed.len() > 16 {
                        m.freed.remove(0);
                    }
                }
                Op::WrongSizeFree { fast, pick, larger } => {
                    if m.live.is_empty() {
                        continue;
                    }
                    let a = m.live[pick % m.live.len()].clone();
                    let wrong = if larger || a.size == 1 {
                        a.size * 2
                    } else {
                        a.size / 2
                    };
                    let got = free_either(&s, fast, 0, a.iova, wrong);
                    prop_assert_eq!(
                        got,
                        Err(IovaError::WrongSize {
                            iova: a.iova,
                            pages: wrong,
                            allocated: a.size
                        })
                    );
                    prop_assert_eq!(s.stats(), before);
                }
                Op::DoubleFree { fast, pick } => {
                    let candidates: Vec<(u64, u64)> = m
                        .freed
                        .iter()
                        .copied()
                        .filter(|&(iova, pages)| {
                            let pfn = iova >> PAGE_SHIFT;
                            !m.busy(pfn, pfn + pages.next_power_of_two() - 1)
                        })
                        .collect();
                    if candidates.is_empty() {
                        continue;
                    }
                    let (iova, pages) = candidates[pick % candidates.len()];
                    let got = free_either(&s, fast, 1, iova, pages);
                    // Whatever sits at that base now (nothing, the IOVA in a cache, or a cached
                    // allocation of another size), the stale free is refused.
                    prop_assert!(
                        matches!(
                            got,
                            Err(IovaError::AlreadyFree { .. })
                                | Err(IovaError::NotAllocated { .. })
                                | Err(IovaError::WrongSize { .. })
                        ),
                        "double free of {:#x} gave {:?}",
                        iova,
                        got
                    );
                    prop_assert_eq!(s.stats(), before);
                }
                Op::InteriorFree { fast, pick } => {
                    let multi: Vec<&Alloc> = m.live.iter().filter(|a| a.size >= 2).collect();
                    if multi.is_empty() {
                        continue;
                    }
                    let a = multi[pick % multi.len()].clone();
                    let inside = a.iova + P;
                    prop_assert_eq!(
                        free_either(&s, fast, 2, inside, 1),
                        Err(IovaError::NotAllocated {
                            iova: inside,
                            pages: 1
                        })
                    );
                    // Misaligned for its size, inside a larger block.
                    if a.size >= 4 {
                        prop_assert_eq!(
                            free_either(&s, fast, 2, inside, 2),
                            Err(IovaError::NotAllocated {
                                iova: inside,
                                pages: 2
                            })
                        );
                    }
                    prop_assert_eq!(
                        free_either(&s, fast, 2, a.iova + 8, a.asked),
                        Err(IovaError::Misaligned { iova: a.iova + 8 })
                    );
                    prop_assert_eq!(s.stats(), before);
                }
                Op::Reserve { base, size } => {
                    let start = (base >> PAGE_SHIFT).max(1);
                    let end = ((base + size - 1) >> PAGE_SHIFT).min(MODEL_LAST);
                    let got = s.reserve(base, size);
                    let hits_live = start <= end
                        && m.live.iter().any(|a| {
                            let s = a.iova >> PAGE_SHIFT;
                            s <= end && start < s + a.size
                        });
                    if hits_live {
                        prop_assert_eq!(
                            got,
                            Err(IovaError::ReserveOverlapsAllocation { base, size })
                        );
                    } else {
                        prop_assert_eq!(got, Ok(()));
                        if start <= end {
                            m.reserved.push((start, end));
                        }
                    }
                }
                Op::Flush => {
                    s.flush_caches();
                    prop_assert_eq!(s.stats().cached_pages, 0);
                }
            }
            s.check_invariants();
            let st = s.stats();
            prop_assert_eq!(st.allocated_pages, m.live_pages());
            prop_assert_eq!(st.reserved_pages, m.reserved_pages());
        }
        for (i, a) in m.live.iter().enumerate() {
            prop_assert_eq!(
                free_either(&s, i % 2 == 0, i % MAX_CPUS, a.iova, a.asked),
                Ok(())
            );
        }
        s.flush_caches();
        s.check_invariants();
        prop_assert!(s.is_quiescent());
        let st = s.stats();
        prop_assert_eq!((st.allocated_pages, st.cached_pages), (0, 0));
        // Everything came back: the free space is exactly what the reservations leave.
        prop_assert_eq!(st.reserved_pages, m.reserved_pages());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]
        #[test]
        fn behaves_like_the_reference_model(ops in proptest::collection::vec(op(), 1..90)) {
            run_model(&ops)?;
        }
    }

    // ---- Concurrency ------------------------------------------------------------------------

    /// A small deterministic generator for the threads.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn concurrent_cpus_never_share_an_iova_and_everything_returns() {
        const THREADS: usize = 4;
        const LAST_PFN: u64 = 2047;
        const ROUNDS: usize = 6000;
        let s = Arc::new(space((LAST_PFN + 1) * P - 1));
        // Pfns 0x200..=0x203.
        s.reserve(0x20_0000, 0x4000).unwrap();
        // owner[pfn]: 0 when free, else the holding thread + 1. Claimed after an allocation,
        // released before the free, so two holders of one page at once would trip the swap.
        let owner: Arc<Vec<AtomicU8>> =
            Arc::new((0..=LAST_PFN).map(|_| AtomicU8::new(0)).collect());
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (s, owner) = (Arc::clone(&s), Arc::clone(&owner));
                std::thread::spawn(move || {
                    let mut rng =
                        XorShift(0x9E37_79B9_7F4A_7C15 ^ ((t as u64 + 1) * 0x1234_5678_9ABC));
                    let mut held: Vec<(u64, u64, u64)> = Vec::new(); // (iova, asked, size)
                    let mut exhausted = 0u64;
                    for _ in 0..ROUNDS {
                        let r = rng.next();
                        if held.len() < 48 && (r % 8 < 5 || held.is_empty()) {
                            let pages = [1, 1, 1, 2, 3, 4, 8, 16, 32, 40][(r >> 8) as usize % 10];
                            let limit = if r & 0x10000 == 0 { MAX } else { 0x3F_FFFF };
                            let size = if pages <= 32 {
                                u64::next_power_of_two(pages)
                            } else {
                                pages
                            };
                            match s.alloc_fast(t, pages, limit) {
                                Ok(iova) => {
                                    let pfn = iova >> PAGE_SHIFT;
                                    assert_eq!(pfn % size.next_power_of_two(), 0);
                                    assert!(pfn >= 1 && pfn + size - 1 <= LAST_PFN);
                                    assert!(iova + size * P - 1 <= limit);
                                    for p in pfn..pfn + size {
                                        assert!(
                                            !(0x200..=0x203).contains(&p),
                                            "reserved page {p:#x} handed out"
                                        );
                                        let prev =
                                            owner[p as usize].swap(t as u8 + 1, Ordering::AcqRel);
                                        assert_eq!(prev, 0, "page {p:#x} handed out twice");
                                    }
                                    held.push((iova, pages, size));
                                }
                                Err(IovaError::Exhausted { .. }) => exhausted += 1,
                                Err(e) => panic!("unexpected {e}"),
                            }
                        } else {
                            let (iova, pages, size) =
                                held.swap_remove((r >> 8) as usize % held.len());
                            let pfn = iova >> PAGE_SHIFT;
                            for p in pfn..pfn + size {
                                assert_eq!(
                                    owner[p as usize].swap(0, Ordering::AcqRel),
                                    t as u8 + 1
                                );
                            }
                            // Now and then through another CPU's cache, to contend for it.
                            let cpu = if r & 0x20000 == 0 {
                                t
                            } else {
                                (t + 1) % THREADS
                            };
                            s.free_fast(cpu, iova, pages).unwrap();
                        }
                    }
                    for (iova, pages, size) in held {
                        let pfn = iova >> PAGE_SHIFT;
                        for p in pfn..pfn + size {
                            owner[p as usize].store(0, Ordering::Release);
                        }
                        s.free_fast(t, iova, pages).unwrap();
                    }
                    exhausted
                })
            })
            .collect();
        let exhausted: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        let st = s.stats();
        assert_eq!(st.allocated_pages, 0);
        assert!(st.fast_hits > 0 && st.slow_allocations > 0, "{st:?}");
        assert_eq!(st.failures, exhausted);
        assert!(
            st.flushes > 0,
            "the run should have reached exhaustion: {st:?}"
        );
        s.check_invariants();
        s.flush_caches();
        s.check_invariants();
        assert!(s.is_quiescent());
        assert_eq!(s.stats().reserved_pages, 4);
        // The whole space is free again: pfns 0x400..=0x7FF in one piece, 0x300..=0x3FF, and
        // the 4 pages just above the reservation.
        assert_eq!(s.alloc(1024, MAX), Ok(0x400 * P));
        assert_eq!(s.alloc(0x100, MAX), Ok(0x300 * P));
        assert_eq!(s.alloc(4, 0x208 * P - 1), Ok(0x204 * P));
    }
}
