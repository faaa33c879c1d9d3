//! Physical page allocator: a binary buddy allocator over the pages of the memory map that are not
//! reserved.
//!
//! # Design
//!
//! The allocator keeps two *block sets*, each a set of naturally aligned blocks of orders
//! 0 ..= [`MAX_PAGE_ORDER`] kept in canonical form: a block is never in the set together with its
//! buddy, since two buddies merge into their parent.
//! - The *free set*: the free blocks, as in every buddy allocator.
//! - The *managed set*: the pages handed over with [`BuddyAllocator::add_free_range`], whatever
//!   their state. Everything else in the span is a hole (a gap between RAM banks, a reserved
//!   region, the kernel image), so a free of memory the allocator does not own is refused instead
//!   of silently adding it to the pool. Being canonical, the set holds any fully managed aligned
//!   block inside a single one of its blocks, so "is this block managed" is one lookup per order.
//!
//! The blocks of each order of a set live in a *bit tree*: a bitmap with one bit per block of that
//! order (set = in the set) plus summary levels in which a bit says "this 64-bit word of the level
//! below is non-zero". Finding the highest set bit below an index, or the lowest one at or after an
//! index, walks up and down the tree: O(log64 n) word reads.
//!
//! The trees are initialised lazily: set-up writes only the single top word of each tree. A word
//! below the top is *live* when its summary bit one level up is set (in a live word); a word that
//! is not live is logically zero, whatever the memory holds. Lookups therefore start at the top,
//! and setting a bit in a word that is not live overwrites the word instead of OR-ing into it.
//! Neither set-up nor adding a range ever loops over pages, or over the words of a bitmap.
//!
//! All state lives in a metadata slice given by the caller (sized with [`metadata_words`]), never in
//! the managed pages: the allocator works on the host with made-up physical addresses, and in the
//! kernel it never writes to memory it has not handed out. The metadata costs about four bits per
//! page of the span (per set, one for order 0 and one for all higher orders together); only the
//! words in use are ever written. It starts with a small table of where each tree's levels are,
//! which keeps the allocator value itself small and cheap to move.
//!
//! Blocks are aligned to their size in *physical* address space: the index space starts at the span
//! base rounded down to a [`MAX_PAGE_ORDER`] block, so a 2 MiB block is 2 MiB aligned and can be
//! mapped with one block descriptor.
//!
//! # Policy
//!
//! An allocation splits the free block of the smallest order that can serve it (least splitting);
//! among blocks of that order it takes the one at the highest address, and it returns the highest
//! part of it. Allocating from the top keeps low memory free for devices with small DMA masks, the
//! effect Linux gets by trying ZONE_NORMAL before ZONE_DMA32 and ZONE_DMA.
//! [`BuddyAllocator::alloc_below`] applies the same rule to the part of memory below a limit; a free
//! block that straddles the limit is split so that its part below the limit can be used.
//!
//! # Costs
//!
//! With L = log64 of the span in pages (3 for 1 GiB of 4 KiB pages): `alloc` and `free` are
//! O(MAX_PAGE_ORDER · L); the `*_pages` variants and [`BuddyAllocator::add_free_range`] are that
//! per maximal aligned block of the range (at most 2 · MAX_PAGE_ORDER, plus one per 1 GiB).
//! [`BuddyAllocator::new`] is O(MAX_PAGE_ORDER · L), whatever the size of the span.
//!
//! The allocator is not thread-safe by itself (all mutators take `&mut self`); the kernel keeps it in
//! a `spin::Mutex`.

use core::fmt;

use crate::mm::addr::{PhysAddr, PAGE_SHIFT, PAGE_SIZE};

/// Largest block order: 2^18 pages = 1 GiB with 4 KiB pages.
pub const MAX_PAGE_ORDER: u32 = 18;

/// Number of block orders (0 ..= MAX_PAGE_ORDER).
pub const NR_ORDERS: usize = MAX_PAGE_ORDER as usize + 1;

/// Largest index space in pages (2^40 pages = 4 PiB), which bounds the depth of the bit trees.
const MAX_SPAN_PAGES: u64 = 1 << 40;

/// Depth of a bit tree over at most `MAX_SPAN_PAGES` bits: ceil(40 / 6).
const MAX_LEVELS: usize = 7;

/// Each level of a bit tree has one bit per 64-bit word of the level below.
const LEVEL_SHIFT: usize = 6;

/// Pages in a block of `order`.
const fn block_pages(order: u32) -> u64 {
    1 << order
}

/// Error while setting the allocator up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuddyError {
    /// The span is empty, wraps around the address space or is larger than the supported 4 PiB.
    BadSpan { base: PhysAddr, pages: u64 },
    /// The metadata slice is smaller than `metadata_words` requires.
    MetadataTooSmall { needed: usize, given: usize },
    /// A free range reaches outside the span given at construction.
    RangeOutsideSpan { base: PhysAddr, pages: u64 },
    /// A free range overlaps pages already handed to the allocator (a range added twice).
    RangeAlreadyAdded { base: PhysAddr, pages: u64 },
}

impl fmt::Display for BuddyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BuddyError::BadSpan { base, pages } => write!(
                f,
                "page allocator span of {pages} pages at {base} is empty, wraps or exceeds 2^40 pages"
            ),
            BuddyError::MetadataTooSmall { needed, given } => write!(
                f,
                "page allocator metadata too small: {needed} words needed, {given} given"
            ),
            BuddyError::RangeOutsideSpan { base, pages } => write!(
                f,
                "free range of {pages} pages at {base} lies outside the page allocator's span"
            ),
            BuddyError::RangeAlreadyAdded { base, pages } => write!(
                f,
                "free range of {pages} pages at {base} overlaps pages already given to the page allocator"
            ),
        }
    }
}

/// Error from an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocError {
    /// The order is above [`MAX_PAGE_ORDER`].
    InvalidOrder { order: u32 },
    /// A page count of zero, or one above 2^MAX_PAGE_ORDER.
    InvalidCount { count: u64 },
    /// No free block of this order (below `limit`, if one was given).
    OutOfMemory { order: u32, limit: Option<PhysAddr> },
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AllocError::InvalidOrder { order } => {
                write!(
                    f,
                    "page order {order} is above the maximum {MAX_PAGE_ORDER}"
                )
            }
            AllocError::InvalidCount { count } => write!(
                f,
                "cannot allocate {count} contiguous pages (must be 1 ..= 2^{MAX_PAGE_ORDER})"
            ),
            AllocError::OutOfMemory { order, limit: None } => {
                write!(f, "no free block of order {order}")
            }
            AllocError::OutOfMemory {
                order,
                limit: Some(limit),
            } => {
                write!(f, "no free block of order {order} below {limit}")
            }
        }
    }
}

/// Error from a free. In every case the allocator's state is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeError {
    /// The order is above [`MAX_PAGE_ORDER`].
    InvalidOrder { order: u32 },
    /// A page count of zero.
    ZeroPages { addr: PhysAddr },
    /// The address is not aligned to the block (or, for `free_pages`, to a page).
    Misaligned { addr: PhysAddr, pages: u64 },
    /// Part of the range lies outside the allocator's span.
    OutOfSpan { addr: PhysAddr, pages: u64 },
    /// Part of the range was never given to the allocator (a hole or a reserved region).
    NotManaged { addr: PhysAddr, pages: u64 },
    /// Part of the range is already free: a double free.
    DoubleFree { addr: PhysAddr, pages: u64 },
}

impl fmt::Display for FreeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FreeError::InvalidOrder { order } => {
                write!(
                    f,
                    "free of a block of order {order}, above the maximum {MAX_PAGE_ORDER}"
                )
            }
            FreeError::ZeroPages { addr } => write!(f, "free of zero pages at {addr}"),
            FreeError::Misaligned { addr, pages } => {
                write!(
                    f,
                    "free of {pages} pages at {addr}: address not aligned to the block"
                )
            }
            FreeError::OutOfSpan { addr, pages } => {
                write!(
                    f,
                    "free of {pages} pages at {addr}: outside the page allocator's span"
                )
            }
            FreeError::NotManaged { addr, pages } => write!(
                f,
                "free of {pages} pages at {addr}: memory not owned by the page allocator"
            ),
            FreeError::DoubleFree { addr, pages } => {
                write!(
                    f,
                    "free of {pages} pages at {addr}: pages already free (double free)"
                )
            }
        }
    }
}

/// Counters of the allocator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuddyStats {
    /// Pages given with `add_free_range`.
    pub total_pages: u64,
    /// Pages currently free.
    pub free_pages: u64,
    /// Free blocks of each order.
    pub free_blocks_per_order: [u64; NR_ORDERS],
    /// Order of the largest free block, `None` when nothing is free.
    pub largest_free_order: Option<u32>,
    /// Successful allocations (`alloc*` calls).
    pub allocs: u64,
    /// Successful frees (`free*` calls).
    pub frees: u64,
    /// Allocations refused for lack of memory (invalid requests are not counted).
    pub failed_allocs: u64,
}

impl fmt::Display for BuddyStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pages: {} total, {} free; largest free order ",
            self.total_pages, self.free_pages
        )?;
        match self.largest_free_order {
            Some(o) => write!(f, "{o}")?,
            None => f.write_str("-")?,
        }
        write!(
            f,
            "; {} allocs, {} frees, {} failed; free blocks per order:",
            self.allocs, self.frees, self.failed_allocs
        )?;
        for n in self.free_blocks_per_order {
            write!(f, " {n}")?;
        }
        Ok(())
    }
}

/// Words per order in the layout table at the start of the metadata: the number of levels of the
/// order's trees, then the offset of each level (bottom first) in a block set's metadata.
const ROW_WORDS: usize = MAX_LEVELS + 1;

/// Words of the layout table.
const TABLE_WORDS: usize = NR_ORDERS * ROW_WORDS;

/// Lays out a bit tree of `bits` bits (at most `MAX_SPAN_PAGES`) from word `*next` on, and
/// advances `*next` past it; `level(l, offset)` learns where each level starts. Level 0 holds one
/// bit per block, level l + 1 one bit per word of level l, up to a single top word. Returns the
/// number of levels, `None` if a word count does not fit in `usize`.
fn lay_out_tree(bits: u64, next: &mut usize, mut level: impl FnMut(usize, usize)) -> Option<usize> {
    let mut levels = 0;
    let mut n = bits;
    loop {
        let words = n.div_ceil(64).max(1);
        level(levels, *next);
        *next = next.checked_add(usize::try_from(words).ok()?)?;
        levels += 1;
        if words == 1 {
            return Some(levels);
        }
        n = words;
    }
}

/// One bit tree of a block set (see `lay_out_tree`). A bit at level l + 1 is set when the word
/// for it at level l is live and non-zero; the top word is always live. Bits at level 0 at or
/// beyond `bits` are never set.
#[derive(Clone, Copy)]
struct BitTree<'t> {
    bits: u64,
    /// The tree's row of the layout table: the number of levels, then the offset of each level
    /// in the set's metadata (written from `usize` values).
    row: &'t [u64; ROW_WORDS],
}

impl BitTree<'_> {
    #[inline(always)]
    fn levels(&self) -> usize {
        self.row[0] as usize
    }

    #[inline(always)]
    fn offset(&self, level: usize) -> usize {
        self.row[1 + level] as usize
    }

    /// Empties the tree: every word below the top stops being live.
    fn init(&self, m: &mut [u64]) {
        m[self.offset(self.levels() - 1)] = 0;
    }

    /// The metadata word and the mask of the bit that stands for item `i` at `level`.
    #[inline(always)]
    fn locate(&self, level: usize, i: u64) -> (usize, u64) {
        let bit = i >> (LEVEL_SHIFT * level);
        // Every bit index at a level is below 64 times its word count, which fits in usize.
        (self.offset(level) + (bit / 64) as usize, 1 << (bit % 64))
    }

    /// Whether the bit for item `i` at `level` is set, its word being live.
    #[inline(always)]
    fn bit_at(&self, m: &[u64], level: usize, i: u64) -> bool {
        let (w, mask) = self.locate(level, i);
        m[w] & mask != 0
    }

    /// Whether bit `i` is set: the bits for it at every level, from the top down, are set.
    fn get(&self, m: &[u64], i: u64) -> bool {
        if i >= self.bits {
            return false;
        }
        let mut level = self.levels();
        while level > 0 {
            level -= 1;
            if !self.bit_at(m, level, i) {
                return false;
            }
        }
        true
    }

    /// Sets bit `i` (< bits) and the summary bits above it. Below the first level where the bit
    /// was clear the words were not live: they are written whole.
    fn set(&self, m: &mut [u64], i: u64) {
        let mut live = true;
        for level in (0..self.levels()).rev() {
            let (w, mask) = self.locate(level, i);
            if live {
                live = m[w] & mask != 0;
                m[w] |= mask;
            } else {
                m[w] = mask;
            }
        }
    }

    /// Clears bit `i`, which must be set (so every word on its path is live), and the summary bits
    /// of the words that become zero.
    fn clear(&self, m: &mut [u64], i: u64) {
        debug_assert!(self.get(m, i), "clearing bit {i}, which is not set");
        for level in 0..self.levels() {
            let (w, mask) = self.locate(level, i);
            m[w] &= !mask;
            if m[w] != 0 {
                return;
            }
        }
    }

    /// The lowest level whose word on the path of item `i` is live. Above level 0, the bit for `i`
    /// at that level is clear, as the word below it is not live.
    fn lowest_live_level(&self, m: &[u64], i: u64) -> usize {
        let mut level = self.levels() - 1;
        while level > 0 && self.bit_at(m, level, i) {
            level -= 1;
        }
        level
    }

    /// Lowest set bit at or after `start`.
    fn first_at_or_after(&self, m: &[u64], start: u64) -> Option<u64> {
        if start >= self.bits {
            return None;
        }
        // Search the live words on the path of `start`, from the lowest one up, for a set bit
        // after the path; then go down through set bits, which lead to live words only.
        let mut level = self.lowest_live_level(m, start);
        let mut idx = start >> (LEVEL_SHIFT * level);
        let mut mask = !0u64 << (idx % 64);
        loop {
            let w = m[self.offset(level) + (idx / 64) as usize] & mask;
            if w != 0 {
                let mut bit = idx / 64 * 64 + u64::from(w.trailing_zeros());
                while level > 0 {
                    level -= 1;
                    let child = m[self.offset(level) + bit as usize];
                    bit = bit * 64 + u64::from(child.trailing_zeros());
                }
                return Some(bit);
            }
            level += 1;
            if level == self.levels() {
                return None;
            }
            idx /= 64;
            // Bits strictly after the path's bit.
            mask = (!0u64 << (idx % 64)) << 1;
        }
    }

    /// Highest set bit strictly below `end`.
    fn last_before(&self, m: &[u64], end: u64) -> Option<u64> {
        let last = end.min(self.bits).checked_sub(1)?;
        let mut level = self.lowest_live_level(m, last);
        let mut idx = last >> (LEVEL_SHIFT * level);
        let mut mask = !0u64 >> (63 - idx % 64);
        loop {
            let w = m[self.offset(level) + (idx / 64) as usize] & mask;
            if w != 0 {
                let mut bit = idx / 64 * 64 + u64::from(63 - w.leading_zeros());
                while level > 0 {
                    level -= 1;
                    let child = m[self.offset(level) + bit as usize];
                    bit = bit * 64 + u64::from(63 - child.leading_zeros());
                }
                return Some(bit);
            }
            level += 1;
            if level == self.levels() {
                return None;
            }
            idx /= 64;
            // Bits strictly before the path's bit.
            mask = (1u64 << (idx % 64)) - 1;
        }
    }

    /// Whether any bit in [start, end) is set (start < end).
    fn any_in(&self, m: &[u64], start: u64, end: u64) -> bool {
        if end - start == 1 {
            // The common case of a block of at most this order: a lookup is cheaper than a search.
            return self.get(m, start);
        }
        self.first_at_or_after(m, start).is_some_and(|b| b < end)
    }
}

/// The bit trees of a block set, one per order, read from the layout table. The free set and the
/// managed set have the same layout, each in its own metadata slice.
#[derive(Clone, Copy)]
struct BlockTrees<'t> {
    table: &'t [[u64; ROW_WORDS]; NR_ORDERS],
    /// End of the index space in pages.
    end: u64,
}

impl<'t> BlockTrees<'t> {
    #[inline(always)]
    fn order(&self, order: u32) -> BitTree<'t> {
        BitTree {
            bits: self.end >> order,
            row: &self.table[order as usize],
        }
    }

    /// Adds block `idx` of `order` to the block set in `m`, merging it with its buddy while the
    /// buddy is in the set, so that the set stays canonical. `merged(k)` is called for every merge
    /// at order k (a block of order k left the set). Returns the order of the block finally added.
    fn insert_merging(
        &self,
        m: &mut [u64],
        mut idx: u64,
        mut order: u32,
        mut merged: impl FnMut(u32),
    ) -> u32 {
        while order < MAX_PAGE_ORDER {
            let tree = self.order(order);
            let buddy = idx ^ 1;
            if !tree.get(m, buddy) {
                break;
            }
            tree.clear(m, buddy);
            merged(order);
            idx /= 2;
            order += 1;
        }
        self.order(order).set(m, idx);
        order
    }

    /// Whether a block of the set in `m` holds a page of [start, end) (start < end).
    fn any_block_in(&self, m: &[u64], start: u64, end: u64) -> bool {
        (0..=MAX_PAGE_ORDER).any(|k| self.order(k).any_in(m, start >> k, ((end - 1) >> k) + 1))
    }

    /// The order of the block of the set in `m` that holds `page`, if one does.
    fn block_holding(&self, m: &[u64], page: u64) -> Option<u32> {
        (0..=MAX_PAGE_ORDER)
            .rev()
            .find(|&k| self.order(k).get(m, page >> k))
    }
}

/// The maximal naturally aligned blocks, as (first page, order), that tile [start, end) in order:
/// at most 2 · MAX_PAGE_ORDER of them, plus one per MAX_PAGE_ORDER block.
fn aligned_blocks(start: u64, end: u64) -> impl Iterator<Item = (u64, u32)> {
    let mut page = start;
    core::iter::from_fn(move || {
        if page >= end {
            return None;
        }
        let align_order = if page == 0 {
            MAX_PAGE_ORDER
        } else {
            page.trailing_zeros()
        };
        let fit_order = 63 - (end - page).leading_zeros();
        let order = align_order.min(fit_order).min(MAX_PAGE_ORDER);
        let block = (page, order);
        page += block_pages(order);
        Some(block)
    })
}

/// Index-space geometry shared by `metadata_words` and `BuddyAllocator::new`.
struct Geometry {
    /// PFN of index 0: the span base rounded down to a MAX_PAGE_ORDER block.
    origin_pfn: u64,
    /// Span [start, end) in pages relative to `origin_pfn`.
    start: u64,
    end: u64,
    /// Metadata words of one block set.
    set_words: usize,
    /// Metadata words of the allocator: the layout table and both block sets.
    total_words: usize,
}

impl Geometry {
    fn new(span_base: PhysAddr, span_pages: u64) -> Result<Self, BuddyError> {
        let bad = BuddyError::BadSpan {
            base: span_base,
            pages: span_pages,
        };
        let base_pfn = span_base.pfn();
        let end_pfn = span_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|bytes| span_base.as_u64().checked_add(bytes))
            .ok_or(bad)?
            >> PAGE_SHIFT;
        let origin_pfn = base_pfn & !(block_pages(MAX_PAGE_ORDER) - 1);
        let end = end_pfn - origin_pfn;
        if span_pages == 0 || end > MAX_SPAN_PAGES {
            return Err(bad);
        }
        let mut set_words = 0usize;
        for order in 0..NR_ORDERS {
            // Only blocks that end inside the index space can ever be in a set.
            lay_out_tree(end >> order, &mut set_words, |_, _| {}).ok_or(bad)?;
        }
        let total_words = set_words
            .checked_mul(2)
            .and_then(|w| w.checked_add(TABLE_WORDS))
            .ok_or(bad)?;
        Ok(Geometry {
            origin_pfn,
            start: base_pfn - origin_pfn,
            end,
            set_words,
            total_words,
        })
    }
}

/// Number of `u64` metadata words a `BuddyAllocator` over this span needs.
pub fn metadata_words(span_base: PhysAddr, span_pages: u64) -> Result<usize, BuddyError> {
    Geometry::new(span_base, span_pages).map(|g| g.total_words)
}

/// The page allocator. See the module documentation.
pub struct BuddyAllocator<'m> {
    origin_pfn: u64,
    span_start: u64,
    span_end: u64,
    trees: BlockTrees<'m>,
    /// Metadata of the free set.
    free: &'m mut [u64],
    /// Metadata of the managed set.
    managed: &'m mut [u64],
    total_pages: u64,
    free_pages: u64,
    free_blocks: [u64; NR_ORDERS],
    allocs: u64,
    frees: u64,
    failed_allocs: u64,
}

impl<'m> BuddyAllocator<'m> {
    /// An allocator for the physical span [span_base, span_base + span_pages pages), with nothing
    /// free yet. `metadata` must hold at least `metadata_words(span_base, span_pages)` words, in any
    /// state; the allocator owns that prefix (it writes a few words now and the others as it comes
    /// to use them). Every page starts as a hole until `add_free_range`.
    pub fn new(
        span_base: PhysAddr,
        span_pages: u64,
        metadata: &'m mut [u64],
    ) -> Result<Self, BuddyError> {
        let g = Geometry::new(span_base, span_pages)?;
        if metadata.len() < g.total_words {
            return Err(BuddyError::MetadataTooSmall {
                needed: g.total_words,
                given: metadata.len(),
            });
        }
        // `Geometry::new` laid the same trees out, so the errors below cannot happen.
        let bad = BuddyError::BadSpan {
            base: span_base,
            pages: span_pages,
        };
        let (table, sets) = metadata.split_at_mut(TABLE_WORDS);
        let (free, rest) = sets.split_at_mut(g.set_words);
        let managed = &mut rest[..g.set_words];
        let table: &mut [[u64; ROW_WORDS]; NR_ORDERS] =
            table.as_chunks_mut().0.try_into().map_err(|_| bad)?;
        let mut next = 0usize;
        for (order, row) in table.iter_mut().enumerate() {
            let levels = lay_out_tree(g.end >> order, &mut next, |level, offset| {
                row[1 + level] = offset as u64;
            })
            .ok_or(bad)?;
            row[0] = levels as u64;
        }
        let trees = BlockTrees { table, end: g.end };
        for order in 0..=MAX_PAGE_ORDER {
            trees.order(order).init(free);
            trees.order(order).init(managed);
        }
        Ok(BuddyAllocator {
            origin_pfn: g.origin_pfn,
            span_start: g.start,
            span_end: g.end,
            trees,
            free,
            managed,
            total_pages: 0,
            free_pages: 0,
            free_blocks: [0; NR_ORDERS],
            allocs: 0,
            frees: 0,
            failed_allocs: 0,
        })
    }

    /// Hands the pages wholly inside [base, base + pages * PAGE_SIZE) to the allocator (the range is
    /// rounded inward to whole pages) and returns how many were added. The range must lie in the span
    /// and must not overlap pages added before; on error nothing changes.
    pub fn add_free_range(&mut self, base: PhysAddr, pages: u64) -> Result<u64, BuddyError> {
        let outside = BuddyError::RangeOutsideSpan { base, pages };
        let end_addr = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|bytes| base.as_u64().checked_add(bytes))
            .ok_or(outside)?;
        let first_pfn = base.as_u64().div_ceil(PAGE_SIZE);
        let end_pfn = end_addr >> PAGE_SHIFT;
        if first_pfn >= end_pfn {
            return Ok(0);
        }
        let (start, end) = match (self.rel_page(first_pfn), self.rel_page(end_pfn)) {
            (Some(s), Some(e)) if s >= self.span_start && e <= self.span_end => (s, e),
            _ => return Err(outside),
        };
        if self.trees.any_block_in(self.managed, start, end) {
            return Err(BuddyError::RangeAlreadyAdded { base, pages });
        }
        for (page, order) in aligned_blocks(start, end) {
            self.trees
                .insert_merging(self.managed, page >> order, order, |_| {});
        }
        self.insert_range(start, end);
        self.total_pages += end - start;
        Ok(end - start)
    }

    /// Allocates 2^order contiguous pages aligned to their size; returns the physical address.
    pub fn alloc(&mut self, order: u32) -> Result<PhysAddr, AllocError> {
        self.alloc_block(order, None)
    }

    /// Like `alloc`, but the whole block lies below `limit` (exclusive end address), for devices
    /// whose DMA mask cannot reach all of RAM.
    pub fn alloc_below(&mut self, order: u32, limit: PhysAddr) -> Result<PhysAddr, AllocError> {
        self.alloc_block(order, Some(limit))
    }

    /// Frees a block of 2^order pages at `addr` obtained from `alloc`/`alloc_below`, merging it with
    /// its free buddies. Refuses (leaving the state unchanged) a misaligned block, a block outside the
    /// span or not owned by the allocator, and a block that is already wholly or partly free.
    /// Freeing a block that is allocated, but to someone else, cannot be detected.
    pub fn free(&mut self, addr: PhysAddr, order: u32) -> Result<(), FreeError> {
        if order > MAX_PAGE_ORDER {
            return Err(FreeError::InvalidOrder { order });
        }
        let pages = block_pages(order);
        if addr.as_u64() & ((PAGE_SIZE << order) - 1) != 0 {
            return Err(FreeError::Misaligned { addr, pages });
        }
        self.free_range(addr, pages)
    }

    /// Allocates `count` (1 ..= 2^MAX_PAGE_ORDER) contiguous pages aligned to the next power of two;
    /// the pages beyond `count` in that block go straight back to the free pool, as Linux's
    /// alloc_pages_exact does. Free with `free_pages(addr, count)`.
    pub fn alloc_pages(&mut self, count: u64) -> Result<PhysAddr, AllocError> {
        self.alloc_exact(count, None)
    }

    /// `alloc_pages` with the whole power-of-two block it comes from below `limit` (exclusive end
    /// address).
    pub fn alloc_pages_below(
        &mut self,
        count: u64,
        limit: PhysAddr,
    ) -> Result<PhysAddr, AllocError> {
        self.alloc_exact(count, Some(limit))
    }

    /// Frees `count` pages at the page-aligned `addr` (any count and alignment; the range is freed as
    /// maximal aligned blocks). Same checks and guarantees as `free`.
    pub fn free_pages(&mut self, addr: PhysAddr, count: u64) -> Result<(), FreeError> {
        if count == 0 {
            return Err(FreeError::ZeroPages { addr });
        }
        if !addr.is_page_aligned() {
            return Err(FreeError::Misaligned { addr, pages: count });
        }
        self.free_range(addr, count)
    }

    /// Current counters.
    pub fn stats(&self) -> BuddyStats {
        BuddyStats {
            total_pages: self.total_pages,
            free_pages: self.free_pages,
            free_blocks_per_order: self.free_blocks,
            largest_free_order: (0..NR_ORDERS as u32)
                .rev()
                .find(|&o| self.free_blocks[o as usize] != 0),
            allocs: self.allocs,
            frees: self.frees,
            failed_allocs: self.failed_allocs,
        }
    }

    /// Page index relative to the origin, if `pfn` is not below it.
    fn rel_page(&self, pfn: u64) -> Option<u64> {
        pfn.checked_sub(self.origin_pfn)
    }

    fn addr_of(&self, page: u64) -> PhysAddr {
        PhysAddr::from_pfn(self.origin_pfn + page)
    }

    fn alloc_block(&mut self, order: u32, limit: Option<PhysAddr>) -> Result<PhysAddr, AllocError> {
        if order > MAX_PAGE_ORDER {
            return Err(AllocError::InvalidOrder { order });
        }
        match self.take_block(order, limit) {
            Some(page) => {
                self.allocs += 1;
                Ok(self.addr_of(page))
            }
            None => {
                self.failed_allocs += 1;
                Err(AllocError::OutOfMemory { order, limit })
            }
        }
    }

    fn alloc_exact(&mut self, count: u64, limit: Option<PhysAddr>) -> Result<PhysAddr, AllocError> {
        if count == 0 || count > block_pages(MAX_PAGE_ORDER) {
            return Err(AllocError::InvalidCount { count });
        }
        let order = count.next_power_of_two().trailing_zeros();
        let addr = self.alloc_block(order, limit)?;
        let start = addr.pfn() - self.origin_pfn;
        self.insert_range(start + count, start + block_pages(order));
        Ok(addr)
    }

    /// Removes the highest block of `order` that ends at or below `limit` from the free sets,
    /// splitting the smallest free block that contains one, and returns its first page index.
    fn take_block(&mut self, order: u32, limit: Option<PhysAddr>) -> Option<u64> {
        let limit_page = match limit {
            None => u64::MAX,
            Some(l) => self.rel_page(l.pfn())?,
        };
        let fitting = limit_page >> order;
        if fitting == 0 {
            return None;
        }
        // The highest page a block of `order` may start at.
        let top = (fitting - 1) << order;
        for k in order..=MAX_PAGE_ORDER {
            let tree = self.trees.order(k);
            // A free block containing `top` may straddle the limit and still hold the best block;
            // otherwise take the highest free block wholly below the limit.
            let (idx, target) = if tree.get(self.free, top >> k) {
                (top >> k, top)
            } else {
                match tree.last_before(self.free, limit_page >> k) {
                    Some(idx) => (idx, ((idx + 1) << k) - block_pages(order)),
                    None => continue,
                }
            };
            tree.clear(self.free, idx);
            self.free_blocks[k as usize] -= 1;
            // Split down to `order`, freeing at each level the half that does not hold `target`.
            for j in (order..k).rev() {
                self.trees.order(j).set(self.free, (target >> j) ^ 1);
                self.free_blocks[j as usize] += 1;
            }
            self.free_pages -= block_pages(order);
            return Some(target);
        }
        None
    }

    /// Validates and frees [addr, addr + pages pages); `addr` is page aligned and `pages` > 0.
    fn free_range(&mut self, addr: PhysAddr, pages: u64) -> Result<(), FreeError> {
        let out = FreeError::OutOfSpan { addr, pages };
        let start = self.rel_page(addr.pfn()).ok_or(out)?;
        let end = start.checked_add(pages).ok_or(out)?;
        if start < self.span_start || end > self.span_end {
            return Err(out);
        }
        if !self.all_managed(start, end) {
            return Err(FreeError::NotManaged { addr, pages });
        }
        // A free block of any order that intersects the range means part of it is already free.
        if self.trees.any_block_in(self.free, start, end) {
            return Err(FreeError::DoubleFree { addr, pages });
        }
        self.insert_range(start, end);
        self.frees += 1;
        Ok(())
    }

    /// Whether every page of [start, end) (within the span) is managed: one lookup per block of
    /// the managed set that the range meets.
    fn all_managed(&self, start: u64, end: u64) -> bool {
        let mut page = start;
        while page < end {
            match self.trees.block_holding(self.managed, page) {
                Some(order) => page = ((page >> order) + 1) << order,
                None => return false,
            }
        }
        true
    }

    /// Frees the page range [start, end) (known to be managed and allocated) as maximal aligned
    /// blocks, merging each with its free buddies.
    fn insert_range(&mut self, start: u64, end: u64) {
        for (page, order) in aligned_blocks(start, end) {
            self.free_pages += block_pages(order);
            let free_blocks = &mut self.free_blocks;
            let top = self
                .trees
                .insert_merging(self.free, page >> order, order, |k| {
                    free_blocks[k as usize] -= 1;
                });
            free_blocks[top as usize] += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    /// Metadata for the span, full of set bits: the allocator must not rely on any word it has
    /// not written itself.
    fn meta_for(base: u64, pages: u64) -> Vec<u64> {
        vec![!0u64; metadata_words(PhysAddr(base), pages).unwrap()]
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

    fn pa(a: u64) -> PhysAddr {
        PhysAddr(a)
    }

    #[test]
    fn split_and_merge() {
        let mut meta = meta_for(GIB, 1024);
        let mut b = BuddyAllocator::new(pa(GIB), 1024, &mut meta).unwrap();
        assert_eq!(b.add_free_range(pa(GIB), 1024), Ok(1024));
        let s = b.stats();
        assert_eq!(
            (s.total_pages, s.free_pages, s.largest_free_order),
            (1024, 1024, Some(10))
        );
        assert_eq!(s.free_blocks_per_order[10], 1);

        // The highest page; every lower half of the split stays free.
        let p = b.alloc(0).unwrap();
        assert_eq!(p, pa(GIB + 1023 * PAGE_SIZE));
        let s = b.stats();
        assert_eq!(
            &s.free_blocks_per_order[..11],
            &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]
        );
        assert_eq!(s.free_pages, 1023);

        // Order 3 comes from the free order-3 half [1008, 1016) without further splitting.
        let q = b.alloc(3).unwrap();
        assert_eq!(q, pa(GIB + 1008 * PAGE_SIZE));
        assert_eq!(b.stats().free_blocks_per_order[3], 0);

        b.free(p, 0).unwrap();
        b.free(q, 3).unwrap();
        let s = b.stats();
        assert_eq!(s.free_pages, 1024);
        assert_eq!(s.free_blocks_per_order[10], 1);
        assert_eq!(s.free_blocks_per_order.iter().sum::<u64>(), 1);
        assert_eq!((s.allocs, s.frees, s.failed_allocs), (2, 2, 0));
    }

    #[test]
    fn alloc_below_splits_a_block_straddling_the_limit() {
        let mut meta = meta_for(GIB, 4096);
        let mut b = BuddyAllocator::new(pa(GIB), 4096, &mut meta).unwrap();
        b.add_free_range(pa(GIB), 4096).unwrap();
        // The only free block is the 16 MiB one, which straddles the limit.
        let limit = pa(GIB + 4 * MIB + 2 * PAGE_SIZE);
        assert_eq!(b.alloc_below(0, limit), Ok(pa(GIB + 4 * MIB + PAGE_SIZE)));
        assert_eq!(b.alloc_below(10, limit), Ok(pa(GIB)));
        assert_eq!(b.alloc_below(0, limit), Ok(pa(GIB + 4 * MIB)));
        assert_eq!(
            b.alloc_below(0, limit),
            Err(AllocError::OutOfMemory {
                order: 0,
                limit: Some(limit)
            })
        );
        assert!(b.alloc_below(0, pa(GIB)).is_err());
        assert!(b.alloc_below(0, pa(0)).is_err());
        // Without a limit the smallest free block is split: the order-1 block left over at pages
        // [1026, 1028) by the first split, of which the upper page is taken.
        assert_eq!(b.alloc(0), Ok(pa(GIB + 4 * MIB + 3 * PAGE_SIZE)));
        let s = b.stats();
        assert_eq!(
            (s.free_pages, s.failed_allocs, s.allocs),
            (4096 - 1024 - 3, 3, 4)
        );
    }

    #[test]
    fn double_free_is_detected_and_changes_nothing() {
        let mut meta = meta_for(GIB, 64);
        let mut b = BuddyAllocator::new(pa(GIB), 64, &mut meta).unwrap();
        b.add_free_range(pa(GIB), 64).unwrap();
        let a = b.alloc(2).unwrap();
        let c = b.alloc(3).unwrap();
        b.free(a, 2).unwrap();
        let before = b.stats();
        let df = |addr, pages| Err(FreeError::DoubleFree { addr, pages });
        assert_eq!(b.free(a, 2), df(a, 4));
        // A block contained in a free block, and one containing a free block.
        assert_eq!(b.free(a, 0), df(a, 1));
        assert_eq!(
            b.free(pa(a.as_u64() & !(8 * PAGE_SIZE - 1)), 3),
            df(pa(GIB + 56 * PAGE_SIZE), 8)
        );
        assert_eq!(b.free_pages(a, 3), df(a, 3));
        assert_eq!(b.stats(), before);
        // A wrong-order free of part of `c` cannot be told from a valid one; freeing all of `c`
        // afterwards is then a partial double free.
        b.free(c, 0).unwrap();
        assert_eq!(b.free(c, 3), df(c, 8));
    }

    #[test]
    fn bad_frees_are_refused() {
        let mut meta = meta_for(GIB, 256);
        let mut b = BuddyAllocator::new(pa(GIB), 256, &mut meta).unwrap();
        b.add_free_range(pa(GIB), 128).unwrap();
        let a = b.alloc(1).unwrap();
        let before = b.stats();
        let pg = PAGE_SIZE;
        assert_eq!(
            b.free(pa(a.as_u64() + pg), 1),
            Err(FreeError::Misaligned {
                addr: pa(a.as_u64() + pg),
                pages: 2
            })
        );
        assert_eq!(
            b.free(pa(GIB - 2 * pg), 1),
            Err(FreeError::OutOfSpan {
                addr: pa(GIB - 2 * pg),
                pages: 2
            })
        );
        assert_eq!(
            b.free(pa(GIB + 256 * pg), 0),
            Err(FreeError::OutOfSpan {
                addr: pa(GIB + 256 * pg),
                pages: 1
            })
        );
        assert_eq!(
            b.free(pa(GIB + 128 * pg), 0),
            Err(FreeError::NotManaged {
                addr: pa(GIB + 128 * pg),
                pages: 1
            })
        );
        assert_eq!(
            b.free(pa(GIB), 19),
            Err(FreeError::InvalidOrder { order: 19 })
        );
        assert_eq!(b.free_pages(a, 0), Err(FreeError::ZeroPages { addr: a }));
        assert_eq!(
            b.free_pages(pa(a.as_u64() + 8), 1),
            Err(FreeError::Misaligned {
                addr: pa(a.as_u64() + 8),
                pages: 1
            })
        );
        assert_eq!(
            b.free_pages(pa(!(pg - 1)), u64::MAX),
            Err(FreeError::OutOfSpan {
                addr: pa(!(pg - 1)),
                pages: u64::MAX
            })
        );
        assert_eq!(b.alloc(19), Err(AllocError::InvalidOrder { order: 19 }));
        assert_eq!(b.alloc_pages(0), Err(AllocError::InvalidCount { count: 0 }));
        assert_eq!(
            b.alloc_pages((1 << 18) + 1),
            Err(AllocError::InvalidCount {
                count: (1 << 18) + 1
            })
        );
        assert_eq!(b.stats(), before);
    }

    #[test]
    fn holes_are_never_handed_out() {
        let mut meta = meta_for(GIB, 1024);
        let mut b = BuddyAllocator::new(pa(GIB), 1024, &mut meta).unwrap();
        b.add_free_range(pa(GIB), 100).unwrap();
        b.add_free_range(pa(GIB + 200 * PAGE_SIZE), 824).unwrap();
        let mut got = Vec::new();
        while let Ok(p) = b.alloc(0) {
            got.push((p.as_u64() - GIB) / PAGE_SIZE);
        }
        got.sort_unstable();
        let expected: Vec<u64> = (0..100).chain(200..1024).collect();
        assert_eq!(got, expected);
        assert_eq!(b.stats().free_pages, 0);
    }

    #[test]
    fn add_free_range_checks() {
        let mut meta = meta_for(GIB, 1024);
        let mut b = BuddyAllocator::new(pa(GIB), 1024, &mut meta).unwrap();
        // Rounded inward: [GIB + 100, GIB + 100 + 2 pages) holds one whole page.
        assert_eq!(b.add_free_range(pa(GIB + 100), 2), Ok(1));
        assert_eq!(b.add_free_range(pa(GIB + 100), 0), Ok(0));
        assert_eq!(
            b.add_free_range(pa(GIB), 2),
            Err(BuddyError::RangeAlreadyAdded {
                base: pa(GIB),
                pages: 2
            })
        );
        assert_eq!(
            b.add_free_range(pa(GIB + 1000 * PAGE_SIZE), 25),
            Err(BuddyError::RangeOutsideSpan {
                base: pa(GIB + 1000 * PAGE_SIZE),
                pages: 25
            })
        );
        assert_eq!(
            b.add_free_range(pa(GIB - PAGE_SIZE), 2),
            Err(BuddyError::RangeOutsideSpan {
                base: pa(GIB - PAGE_SIZE),
                pages: 2
            })
        );
        assert!(b.add_free_range(pa(u64::MAX - PAGE_SIZE), 4).is_err());
        // Adjacent ranges added separately merge into one block.
        b.add_free_range(pa(GIB), 1).unwrap();
        b.add_free_range(pa(GIB + 2 * PAGE_SIZE), 510).unwrap();
        b.add_free_range(pa(GIB + 512 * PAGE_SIZE), 512).unwrap();
        let s = b.stats();
        assert_eq!((s.total_pages, s.free_pages), (1024, 1024));
        assert_eq!(s.free_blocks_per_order.iter().sum::<u64>(), 1);
        assert_eq!(s.largest_free_order, Some(10));
    }

    #[test]
    fn construction_errors() {
        let mut small = vec![0u64; 3];
        assert!(matches!(
            BuddyAllocator::new(pa(GIB), 1024, &mut small),
            Err(BuddyError::MetadataTooSmall { given: 3, .. })
        ));
        assert_eq!(
            metadata_words(pa(GIB), 0),
            Err(BuddyError::BadSpan {
                base: pa(GIB),
                pages: 0
            })
        );
        assert!(metadata_words(pa(u64::MAX - 4095), 2).is_err());
        assert!(metadata_words(pa(0), 1 << 41).is_err());
    }

    #[test]
    fn blocks_are_aligned_in_physical_space() {
        // A span starting 2 MiB past a 1 GiB boundary: an order-9 block must be 2 MiB aligned.
        let base = GIB + 2 * MIB + 5 * PAGE_SIZE;
        let pages = 2048;
        let mut meta = meta_for(base, pages);
        let mut b = BuddyAllocator::new(pa(base), pages, &mut meta).unwrap();
        b.add_free_range(pa(base), pages).unwrap();
        let a = b.alloc(9).unwrap();
        assert_eq!(a.as_u64() % (2 * MIB), 0);
        assert!(a.as_u64() >= base && a.as_u64() + 2 * MIB <= base + pages * PAGE_SIZE);
    }

    #[test]
    fn alloc_pages_returns_the_tail() {
        let mut meta = meta_for(GIB, 64);
        let mut b = BuddyAllocator::new(pa(GIB), 64, &mut meta).unwrap();
        b.add_free_range(pa(GIB), 64).unwrap();
        let a = b.alloc_pages(5).unwrap();
        assert_eq!(a, pa(GIB + 56 * PAGE_SIZE));
        assert_eq!(b.stats().free_pages, 59);
        // The three tail pages of the order-3 block are free again: page 61 is the smallest free
        // block and is taken first.
        assert_eq!(
            b.alloc_below(0, pa(GIB + 64 * PAGE_SIZE)),
            Ok(pa(GIB + 61 * PAGE_SIZE))
        );
        assert_eq!(
            b.alloc_pages_below(2, pa(GIB + 8 * PAGE_SIZE)),
            Ok(pa(GIB + 6 * PAGE_SIZE))
        );
        b.free_pages(a, 5).unwrap();
        b.free_pages(pa(GIB + 61 * PAGE_SIZE), 1).unwrap();
        b.free_pages(pa(GIB + 6 * PAGE_SIZE), 2).unwrap();
        let s = b.stats();
        assert_eq!((s.free_pages, s.largest_free_order), (64, Some(6)));
    }

    #[test]
    fn large_span_set_up() {
        // 16 GiB span with a 1 GiB hole: no per-page work, and the free blocks are 1 GiB blocks.
        let pages = 16 * GIB / PAGE_SIZE;
        let mut meta = meta_for(GIB, pages);
        // Four bits per page plus the summary levels (1/63 more), the rounding of each level and
        // the layout table.
        let rounding = ((2 * NR_ORDERS * MAX_LEVELS + TABLE_WORDS) * 64) as u64;
        assert!(meta.len() as u64 * 64 <= 4 * pages + 4 * pages / 63 + rounding);
        let before = meta.clone();
        let mut b = BuddyAllocator::new(pa(GIB), pages, &mut meta).unwrap();
        b.add_free_range(pa(GIB), 4 * GIB / PAGE_SIZE).unwrap();
        b.add_free_range(pa(6 * GIB), 11 * GIB / PAGE_SIZE).unwrap();
        let s = b.stats();
        assert_eq!(s.free_blocks_per_order[18], 15);
        assert_eq!(s.largest_free_order, Some(18));
        assert_eq!(b.alloc_below(18, pa(4 * GIB)), Ok(pa(3 * GIB)));
        assert_eq!(b.alloc(18), Ok(pa(16 * GIB)));
        // The layout table, the top word of each tree, and a few words per block of the two
        // ranges and the two allocations; a loop over the order-0 bitmaps alone would write
        // 2 * 65,536 words.
        let written = meta.iter().zip(&before).filter(|(a, b)| a != b).count();
        assert!(
            written <= TABLE_WORDS + 2 * NR_ORDERS + 4 * 4 * 19,
            "{written} words written"
        );
    }

    #[test]
    fn set_up_writes_only_the_top_word_of_each_tree() {
        for (base, pages) in [(GIB, 1), (GIB, GIB / PAGE_SIZE), (5 * PAGE_SIZE, 1 << 22)] {
            let mut meta = garbage(metadata_words(pa(base), pages).unwrap() + 3, 7);
            let before = meta.clone();
            let mut b = BuddyAllocator::new(pa(base), pages, &mut meta).unwrap();
            assert_eq!(b.stats().free_pages, 0);
            assert_eq!(
                b.alloc(0),
                Err(AllocError::OutOfMemory {
                    order: 0,
                    limit: None
                })
            );
            assert_eq!(
                b.free(pa(base), 0),
                Err(FreeError::NotManaged {
                    addr: pa(base),
                    pages: 1
                })
            );
            // Beyond the layout table: the top word of each tree.
            let sets = meta[TABLE_WORDS..].iter().zip(&before[TABLE_WORDS..]);
            let written = sets.filter(|(a, b)| a != b).count();
            assert_eq!(written, 2 * NR_ORDERS, "span of {pages} pages at {base:#x}");
            assert_eq!(meta[meta.len() - 3..], before[before.len() - 3..]);
        }
    }

    #[test]
    fn managed_blocks_merge_across_ranges() {
        // Ranges added in pieces and out of order: [0, 1029) and [1030, 3048).
        let mut meta = meta_for(GIB, 4096);
        let mut b = BuddyAllocator::new(pa(GIB), 4096, &mut meta).unwrap();
        let pg = PAGE_SIZE;
        for (first, n) in [(1024, 3), (1030, 1018), (1027, 2), (0, 1024), (2048, 1000)] {
            assert_eq!(b.add_free_range(pa(GIB + first * pg), n), Ok(n));
        }
        assert_eq!(b.stats().free_pages, 1029 + 2018);
        assert_eq!(b.alloc_below(10, pa(GIB + 1024 * pg)), Ok(pa(GIB)));
        assert_eq!(
            b.alloc_below(9, pa(GIB + 2048 * pg)),
            Ok(pa(GIB + 1536 * pg))
        );
        // Blocks over the hole at page 1029, or over the end at 3048, are not managed.
        let not_managed = |addr, pages| Err(FreeError::NotManaged { addr, pages });
        assert_eq!(
            b.free(pa(GIB + 1024 * pg), 3),
            not_managed(pa(GIB + 1024 * pg), 8)
        );
        assert_eq!(
            b.free(pa(GIB + 2048 * pg), 10),
            not_managed(pa(GIB + 2048 * pg), 1024)
        );
        assert_eq!(b.free_pages(pa(GIB), 2048), not_managed(pa(GIB), 2048));
        b.free(pa(GIB), 10).unwrap();
        b.free(pa(GIB + 1536 * pg), 9).unwrap();
        assert_eq!(
            b.alloc(11),
            Err(AllocError::OutOfMemory {
                order: 11,
                limit: None
            })
        );
        // Filling the hole merges the managed pieces into one order-11 block.
        assert_eq!(b.add_free_range(pa(GIB + 1029 * pg), 1), Ok(1));
        assert_eq!(b.alloc(11), Ok(pa(GIB)));
        b.free(pa(GIB), 11).unwrap();
        assert_eq!(
            b.free(pa(GIB), 11),
            Err(FreeError::DoubleFree {
                addr: pa(GIB),
                pages: 2048
            })
        );
        let s = b.stats();
        assert_eq!((s.free_pages, s.free_blocks_per_order[11]), (3048, 1));
    }

    // ----- bit tree model test -----

    #[derive(Clone, Debug)]
    enum TreeOp {
        Set(u64),
        Clear(u64),
        First(u64),
        Last(u64),
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// A lazily initialised tree over garbage metadata against a set of indices, with trees
        /// of one to four levels and operations clustered so that words fill up and empty again.
        #[test]
        fn bit_tree_model(
            bits in prop_oneof![1u64..200, 4000u64..5000, 250_000u64..300_000],
            seed in any::<u64>(),
            centre in any::<u64>(),
            ops in proptest::collection::vec(
                (0u8..4, 0u64..9000).prop_map(|(k, d)| (k, d)), 1..300),
        ) {
            let mut next = 3;
            let mut row = [0u64; ROW_WORDS];
            row[0] = lay_out_tree(bits, &mut next, |l, o| row[1 + l] = o as u64).unwrap() as u64;
            let tree = BitTree { bits, row: &row };
            let mut m = garbage(next + 3, seed);
            let guard = (m[..3].to_vec(), m[next..].to_vec());
            tree.init(&mut m);
            let mut model = std::collections::BTreeSet::new();
            let centre = centre % bits;
            for (kind, d) in ops {
                // Indices near `centre`, wrapped into the tree, and sometimes past its end.
                let i = (centre + d).checked_sub(4500).unwrap_or(d) % (bits + 2);
                let op = match kind {
                    0 => TreeOp::Set(i),
                    1 => TreeOp::Clear(i),
                    2 => TreeOp::First(i),
                    _ => TreeOp::Last(i),
                };
                match op {
                    TreeOp::Set(i) if i < bits => {
                        tree.set(&mut m, i);
                        model.insert(i);
                    }
                    TreeOp::Clear(i) if model.contains(&i) => {
                        tree.clear(&mut m, i);
                        model.remove(&i);
                    }
                    TreeOp::First(i) => {
                        prop_assert_eq!(tree.first_at_or_after(&m, i), model.range(i..).next().copied());
                    }
                    TreeOp::Last(i) => {
                        prop_assert_eq!(tree.last_before(&m, i), model.range(..i).next_back().copied());
                    }
                    TreeOp::Set(_) | TreeOp::Clear(_) => {}
                }
                prop_assert_eq!(tree.get(&m, i), model.contains(&i));
            }
            prop_assert_eq!(tree.first_at_or_after(&m, 0), model.first().copied());
            prop_assert_eq!(tree.last_before(&m, u64::MAX), model.last().copied());
            prop_assert_eq!((m[..3].to_vec(), m[next..].to_vec()), guard);
        }
    }

    // ----- model test -----

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Page {
        Hole,
        Free,
        Used,
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc(u32),
        AllocBelow(u32, u64),
        AllocPages(u64, Option<u64>),
        Free(usize),
        BadFree(u64, u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u32..8).prop_map(Op::Alloc),
            2 => (0u32..8, 0u64..2200).prop_map(|(o, l)| Op::AllocBelow(o, l)),
            2 => (1u64..40, proptest::option::of(0u64..2200)).prop_map(|(c, l)| Op::AllocPages(c, l)),
            4 => any::<usize>().prop_map(Op::Free),
            1 => (0u64..2200, 0u32..5).prop_map(|(p, o)| Op::BadFree(p, o)),
        ]
    }

    struct Model {
        /// Physical PFN of `pages[0]`.
        base_pfn: u64,
        pages: Vec<Page>,
    }

    impl Model {
        fn state(&self, pfn: u64) -> Page {
            pfn.checked_sub(self.base_pfn)
                .and_then(|i| self.pages.get(i as usize).copied())
                .unwrap_or(Page::Hole)
        }
        fn all_free(&self, pfn: u64, n: u64) -> bool {
            (pfn..pfn + n).all(|p| self.state(p) == Page::Free)
        }
        /// Whether some naturally aligned free block of `order` ends at or below `limit_pfn`.
        fn has_block(&self, order: u32, limit_pfn: u64) -> bool {
            let n = 1u64 << order;
            let first = self.base_pfn.div_ceil(n) * n;
            (first..limit_pfn.min(self.base_pfn + self.pages.len() as u64))
                .step_by(n as usize)
                .any(|p| p + n <= limit_pfn && self.all_free(p, n))
        }
        fn mark(&mut self, pfn: u64, n: u64, from: Page, to: Page) {
            for p in pfn..pfn + n {
                let i = (p - self.base_pfn) as usize;
                assert_eq!(self.pages[i], from, "page {p:#x}");
                self.pages[i] = to;
            }
        }
        fn free_count(&self) -> u64 {
            self.pages.iter().filter(|&&p| p == Page::Free).count() as u64
        }
        /// The free blocks a buddy allocator must hold: maximal naturally aligned free blocks.
        fn canonical_blocks(&self) -> [u64; NR_ORDERS] {
            let mut out = [0; NR_ORDERS];
            let end = self.base_pfn + self.pages.len() as u64;
            for order in 0..NR_ORDERS as u32 {
                let n = 1u64 << order;
                let mut p = self.base_pfn / n * n;
                while p < end {
                    let parent = p & !(2 * n - 1);
                    if self.all_free(p, n)
                        && !(order < MAX_PAGE_ORDER && self.all_free(parent, 2 * n))
                    {
                        out[order as usize] += 1;
                    }
                    p += n;
                }
            }
            out
        }
    }

    fn holes() -> impl Strategy<Value = Vec<(u64, bool)>> {
        proptest::collection::vec((1u64..300, proptest::bool::weighted(0.75)), 1..10)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn model(base_sel in 0usize..5, seed in any::<u64>(), segs in holes(), ops in proptest::collection::vec(op(), 1..120)) {
            // The last two bases put the span across a word boundary of level 1 (4096 pages) and
            // of level 2 (2^18 pages, a tree of four levels) of the order-0 trees.
            let g = GIB / PAGE_SIZE;
            let base_pfn = [g, (GIB + 3 * MIB) / PAGE_SIZE + 7, 5, g + 3 * 4096 - 1000, 2 * g - 1000][base_sel];
            let span: u64 = segs.iter().map(|s| s.0).sum();
            let mut meta = garbage(metadata_words(PhysAddr::from_pfn(base_pfn), span).unwrap(), seed);
            let mut b = BuddyAllocator::new(PhysAddr::from_pfn(base_pfn), span, &mut meta).unwrap();
            let mut m = Model { base_pfn, pages: vec![Page::Hole; span as usize] };
            let mut at = base_pfn;
            for &(len, present) in &segs {
                if present {
                    prop_assert_eq!(b.add_free_range(PhysAddr::from_pfn(at), len), Ok(len));
                    m.mark(at, len, Page::Hole, Page::Free);
                }
                at += len;
            }
            let baseline = b.stats();
            prop_assert_eq!(baseline.free_blocks_per_order, m.canonical_blocks());
            let mut live: Vec<(u64, u64, Option<u32>)> = Vec::new();
            let mut failed = 0;
            for op in ops {
                match op {
                    Op::Alloc(order) | Op::AllocBelow(order, _) => {
                        let limit_pfn = match op { Op::AllocBelow(_, l) => base_pfn + l, _ => u64::MAX };
                        let r = match op {
                            Op::AllocBelow(..) => b.alloc_below(order, PhysAddr::from_pfn(limit_pfn)),
                            _ => b.alloc(order),
                        };
                        let n = 1u64 << order;
                        match r {
                            Ok(a) => {
                                let p = a.pfn();
                                prop_assert_eq!(p % n, 0);
                                prop_assert!(p + n <= limit_pfn);
                                prop_assert!(m.all_free(p, n));
                                m.mark(p, n, Page::Free, Page::Used);
                                live.push((p, n, Some(order)));
                            }
                            Err(_) => {
                                failed += 1;
                                prop_assert!(!m.has_block(order, limit_pfn));
                            }
                        }
                    }
                    Op::AllocPages(count, limit) => {
                        let limit_pfn = limit.map_or(u64::MAX, |l| base_pfn + l);
                        let r = match limit {
                            Some(_) => b.alloc_pages_below(count, PhysAddr::from_pfn(limit_pfn)),
                            None => b.alloc_pages(count),
                        };
                        let order = count.next_power_of_two().trailing_zeros();
                        match r {
                            Ok(a) => {
                                let p = a.pfn();
                                prop_assert_eq!(p % (1 << order), 0);
                                prop_assert!(p + (1 << order) <= limit_pfn);
                                prop_assert!(m.all_free(p, 1 << order));
                                m.mark(p, count, Page::Free, Page::Used);
                                live.push((p, count, None));
                            }
                            Err(_) => {
                                failed += 1;
                                prop_assert!(!m.has_block(order, limit_pfn));
                            }
                        }
                    }
                    Op::Free(i) => {
                        if live.is_empty() { continue; }
                        let (p, n, order) = live.swap_remove(i % live.len());
                        match order {
                            Some(o) => prop_assert_eq!(b.free(PhysAddr::from_pfn(p), o), Ok(())),
                            None => prop_assert_eq!(b.free_pages(PhysAddr::from_pfn(p), n), Ok(())),
                        }
                        m.mark(p, n, Page::Used, Page::Free);
                    }
                    Op::BadFree(off, order) => {
                        let p = base_pfn + off;
                        let n = 1u64 << order;
                        let bad = !p.is_multiple_of(n) || (p..p + n).any(|q| m.state(q) != Page::Used);
                        if bad {
                            let before = b.stats();
                            prop_assert!(b.free(PhysAddr::from_pfn(p), order).is_err());
                            prop_assert_eq!(b.stats(), before);
                        }
                    }
                }
                prop_assert_eq!(b.stats().free_pages, m.free_count());
            }
            prop_assert_eq!(b.stats().free_blocks_per_order, m.canonical_blocks());
            prop_assert_eq!(b.stats().failed_allocs, failed);
            for (p, n, order) in live.drain(..) {
                match order {
                    Some(o) => prop_assert_eq!(b.free(PhysAddr::from_pfn(p), o), Ok(())),
                    None => prop_assert_eq!(b.free_pages(PhysAddr::from_pfn(p), n), Ok(())),
                }
            }
            let end = b.stats();
            prop_assert_eq!(end.free_pages, baseline.free_pages);
            prop_assert_eq!(end.free_blocks_per_order, baseline.free_blocks_per_order);
            prop_assert_eq!(end.largest_free_order, baseline.largest_free_order);
        }
    }
}
