//! The atomic pool (Linux's kernel/dma/pool.c): memory mapped uncached once, at boot, so that a
//! coherent allocation for a non-coherent device can be served without blocking: without CMA
//! (which may migrate pages) and without changing page tables (which may need table pages and TLB
//! maintenance on every CPU). Its size is the bootarg `coherent_pool=` (Linux's name; default
//! 256 KiB); exhaustion is an error value, never a wait.
//!
//! [`PoolPages`] is the allocator: first fit over a bitmap of the pool's pages, with a hint where
//! the last search ended, so the usual one-page allocation reads one or two words; searches,
//! checks and updates go a 64-page word at a time. Callers that ask for several pages get a
//! naturally aligned run when one is free (what `gen_pool` gives Linux's pool), else any run.

use core::fmt;

/// The pool's default size (Linux's `coherent_pool` default).
pub const DEFAULT_POOL_BYTES: u64 = 256 << 10;

/// Why a pool allocation or free failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolError {
    /// No run of `pages` free pages (the pool is exhausted or fragmented).
    Exhausted { pages: u64 },
    /// Zero pages, or more than the pool holds.
    BadSize { pages: u64 },
    /// A free of pages that are not an allocated run of the pool.
    NotAllocated { first: u64, pages: u64 },
    /// No pool (it was not set up, or could not be).
    NoPool,
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PoolError::Exhausted { pages } => write!(f, "the atomic pool has no {pages} free contiguous pages"),
            PoolError::BadSize { pages } => write!(f, "the atomic pool cannot serve {pages} pages"),
            PoolError::NotAllocated { first, pages } => {
                write!(f, "pages {first}..{} of the atomic pool are not allocated", first + pages)
            }
            PoolError::NoPool => f.write_str("there is no atomic pool"),
        }
    }
}

/// Counters of a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub pages: u64,
    pub used_pages: u64,
    pub peak_used_pages: u64,
    pub allocations: u64,
    pub frees: u64,
    pub failures: u64,
}

/// A buffer of the pool: its CPU address (in the uncached window), physical address and bytes
/// (whole pages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolBuffer {
    pub cpu: usize,
    pub phys: crate::mm::addr::PhysAddr,
    pub bytes: u64,
}

/// First-fit page allocator over `pages` pages, numbered from 0. A free must name exactly a run
/// that was allocated (the start and length are recorded), so a wrong free is refused.
pub struct PoolPages {
    /// Bit set: page in use. Boxed slices rather than `Vec`s: the size-optimised build calls
    /// `Vec`'s indexing out of line, a slice's is inline.
    used: alloc::boxed::Box<[u64]>,
    /// Bit set: first page of an allocated run; the run goes on to the next start or free page.
    starts: alloc::boxed::Box<[u64]>,
    pages: u64,
    hint: u64,
    stats: PoolStats,
}

impl PoolPages {
    pub fn new(pages: u64) -> PoolPages {
        let words = pages.div_ceil(64) as usize;
        PoolPages { used: alloc::vec![0; words].into_boxed_slice(), starts: alloc::vec![0; words].into_boxed_slice(), pages, hint: 0, stats: PoolStats { pages, ..PoolStats::default() } }
    }

    #[inline(always)]
    fn bit(v: &[u64], i: u64) -> bool {
        v[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// The first bit of `v` in [from, end) that is set (`want`) or clear, if any; a word at a
    /// time.
    #[inline(always)]
    fn first_bit(v: &[u64], from: u64, end: u64, want: bool) -> Option<u64> {
        let mut i = from;
        while i < end {
            let word = if want { v[(i / 64) as usize] } else { !v[(i / 64) as usize] };
            let hits = word & (!0u64 << (i % 64));
            let next = (i | 63) + 1;
            if hits != 0 {
                let found = (i & !63) + u64::from(hits.trailing_zeros());
                return (found < end).then_some(found);
            }
            i = next;
        }
        None
    }

    /// Sets (`on`) or clears the bits [first, first + n) of `v`, a word at a time.
    #[inline(always)]
    fn fill(v: &mut [u64], first: u64, n: u64, on: bool) {
        let (mut i, end) = (first, first + n);
        while i < end {
            let lo = i % 64;
            let hi = (lo + (end - i)).min(64);
            let mask = (!0u64 >> (64 - (hi - lo))) << lo;
            let w = &mut v[(i / 64) as usize];
            if on {
                *w |= mask;
            } else {
                *w &= !mask;
            }
            i += hi - lo;
        }
    }

    /// The first free page at or after `from`, if any.
    #[inline(always)]
    fn next_free(&self, from: u64) -> Option<u64> {
        Self::first_bit(&self.used, from, self.pages, false)
    }

    /// Whether `[first, first + n)` is inside the pool and free.
    fn run_free(&self, first: u64, n: u64) -> bool {
        first.checked_add(n).is_some_and(|end| end <= self.pages) && Self::first_bit(&self.used, first, first + n, true).is_none()
    }

    /// First fit of `n` pages from `from`, aligned to `align` pages.
    #[inline(always)]
    fn search(&self, from: u64, n: u64, align: u64) -> Option<u64> {
        let mut at = self.next_free(from)?;
        loop {
            at = at.next_multiple_of(align);
            if at.checked_add(n)? > self.pages {
                return None;
            }
            match Self::first_bit(&self.used, at, at + n, true) {
                None => return Some(at),
                Some(busy) => at = self.next_free(busy)?,
            }
        }
    }

    /// `n` contiguous pages; returns the first page's number.
    #[inline(always)]
    pub fn alloc(&mut self, n: u64) -> Result<u64, PoolError> {
        if n == 0 || n > self.pages {
            self.stats.failures += 1;
            return Err(PoolError::BadSize { pages: n });
        }
        let found = if n == 1 {
            return self.alloc_one();
        } else {
            let align = if n.is_power_of_two() { n } else { 1 };
            [align, 1].iter().find_map(|&a| self.search(0, n, a))
        };
        let Some(first) = found else {
            self.stats.failures += 1;
            return Err(PoolError::Exhausted { pages: n });
        };
        Self::fill(&mut self.used, first, n, true);
        Self::fill(&mut self.starts, first, 1, true);
        self.hint = first + n;
        self.stats.used_pages += n;
        self.stats.peak_used_pages = self.stats.peak_used_pages.max(self.stats.used_pages);
        self.stats.allocations += 1;
        Ok(first)
    }

    /// [`PoolPages::alloc`] of one page (the usual request): one bit in each map, set in place
    /// rather than through the run-filling loops.
    #[inline(always)]
    fn alloc_one(&mut self) -> Result<u64, PoolError> {
        // A `match`, not `Option::or_else`: the size-optimised build calls the latter.
        let found = match self.next_free(self.hint) {
            Some(f) => Some(f),
            None => self.next_free(0),
        };
        let Some(first) = found else {
            self.stats.failures += 1;
            return Err(PoolError::Exhausted { pages: 1 });
        };
        let (w, bit) = ((first / 64) as usize, 1u64 << (first % 64));
        self.used[w] |= bit;
        self.starts[w] |= bit;
        self.hint = first + 1;
        self.stats.used_pages += 1;
        self.stats.peak_used_pages = self.stats.peak_used_pages.max(self.stats.used_pages);
        self.stats.allocations += 1;
        Ok(first)
    }

    /// Frees the run of `n` pages allocated at `first`.
    #[inline(always)]
    pub fn free(&mut self, first: u64, n: u64) -> Result<(), PoolError> {
        if n == 1 {
            return self.free_one(first);
        }
        let bad = PoolError::NotAllocated { first, pages: n };
        let end = first.checked_add(n).filter(|&e| n > 0 && e <= self.pages).ok_or(bad)?;
        // The run must start at `first`, be in use throughout, and end where the next run starts
        // or at a free page.
        let whole = Self::bit(&self.starts, first)
            && Self::first_bit(&self.used, first, end, false).is_none()
            && Self::first_bit(&self.starts, first + 1, end, true).is_none()
            && (end == self.pages || !Self::bit(&self.used, end) || Self::bit(&self.starts, end));
        if !whole {
            return Err(bad);
        }
        Self::fill(&mut self.used, first, n, false);
        Self::fill(&mut self.starts, first, 1, false);
        self.stats.used_pages -= n;
        self.stats.frees += 1;
        if first < self.hint {
            self.hint = first;
        }
        Ok(())
    }

    /// [`PoolPages::free`] of a one-page run, with the same checks: `first` starts a run, is in
    /// use, and the next page is free or starts another run.
    #[inline(always)]
    fn free_one(&mut self, first: u64) -> Result<(), PoolError> {
        if first >= self.pages {
            return Err(PoolError::NotAllocated { first, pages: 1 });
        }
        let (w, bit) = ((first / 64) as usize, 1u64 << (first % 64));
        let end = first + 1;
        let whole = self.starts[w] & self.used[w] & bit != 0
            && (end == self.pages || !Self::bit(&self.used, end) || Self::bit(&self.starts, end));
        if !whole {
            return Err(PoolError::NotAllocated { first, pages: 1 });
        }
        self.used[w] &= !bit;
        self.starts[w] &= !bit;
        self.stats.used_pages -= 1;
        self.stats.frees += 1;
        if first < self.hint {
            self.hint = first;
        }
        Ok(())
    }

    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// Whether `[first, first + n)` is entirely free (for tests and the stress run's checks).
    pub fn is_free(&self, first: u64, n: u64) -> bool {
        self.run_free(first, n)
    }
}

#[cfg(target_os = "none")]
pub use kernel::*;

#[cfg(target_os = "none")]
mod kernel {
    use super::*;
    use crate::dma::api::DmaError;
    use crate::dma::busmap::DmaAddr;
    use crate::dma::{within_mask, Device};
    use crate::mm::addr::{PhysAddr, PAGE_SIZE};
    use crate::mm::pgtable::MemAttr;
    use crate::mm::vmap::{self, VmapArea};
    use spin::{Mutex, Once};

    pub struct AtomicPool {
        phys: PhysAddr,
        area: VmapArea,
        pages: Mutex<PoolPages>,
    }

    static POOL: Once<AtomicPool> = Once::new();

    /// Sets the pool up: `bytes` (rounded up to pages) of pages below `limit`, cleaned and
    /// invalidated from the caches, mapped non-cacheable in the vmap window. Once, after the page
    /// allocator and the window.
    pub fn init(bytes: u64, limit: u64) -> Result<(PhysAddr, u64), &'static str> {
        let pages = bytes.div_ceil(PAGE_SIZE);
        if pages == 0 {
            return Err("coherent_pool=0: no atomic pool");
        }
        let phys = crate::mm::phys::alloc_pages_exact(pages, Some(PhysAddr(limit))).map_err(|_| "no pages for the atomic pool below the platform's DMA limit")?;
        let cpu = usize::try_from(phys.0).map_err(|_| "the atomic pool is not addressable")?;
        // The cacheable linear alias must not hold lines that a later eviction would write over
        // what a device put in the pool.
        crate::arch::cache::clean_invalidate(cpu, (pages * PAGE_SIZE) as usize);
        let area = vmap::vmap_contiguous(phys, pages, MemAttr::NormalNonCacheable).map_err(|_| "cannot map the atomic pool")?;
        POOL.call_once(|| AtomicPool { phys, area, pages: Mutex::new(PoolPages::new(pages)) });
        Ok((phys, pages * PAGE_SIZE))
    }

    /// Zeroed coherent memory from the pool, which `dev` must reach under its coherent mask.
    #[inline(always)]
    pub fn alloc(dev: &Device, size: u64) -> Result<(PoolBuffer, DmaAddr), DmaError> {
        let pool = POOL.get().ok_or(DmaError::Pool(PoolError::NoPool))?;
        let n = size.div_ceil(PAGE_SIZE);
        let first = pool.pages.lock().alloc(n).map_err(DmaError::Pool)?;
        let buf = PoolBuffer {
            cpu: pool.area.addr() + (first * PAGE_SIZE) as usize,
            phys: PhysAddr(pool.phys.0 + first * PAGE_SIZE),
            bytes: n * PAGE_SIZE,
        };
        let Some(dma) = within_mask(dev.bus_map(), dev.coherent_mask(), buf.phys, buf.bytes) else {
            let _ = pool.pages.lock().free(first, n);
            return Err(DmaError::PoolUnreachable { pool: pool.phys, mask: dev.coherent_mask() });
        };
        // SAFETY: whole pages of the pool from `first` on, just allocated for this buffer alone,
        // mapped read-write as Normal non-cacheable memory at `buf.cpu` for the kernel's lifetime.
        unsafe { crate::arch::cache::zero_pages(buf.cpu, buf.bytes as usize) };
        Ok((buf, dma))
    }

    /// Gives a buffer of [`alloc`] back.
    #[inline(always)]
    pub fn free(buf: PoolBuffer) -> Result<(), DmaError> {
        let pool = POOL.get().ok_or(DmaError::Pool(PoolError::NoPool))?;
        let first = buf.phys.0.checked_sub(pool.phys.0).ok_or(DmaError::Free)? / PAGE_SIZE;
        pool.pages.lock().free(first, buf.bytes / PAGE_SIZE).map_err(DmaError::Pool)
    }

    /// The pool's counters; `None` without a pool.
    pub fn stats() -> Option<PoolStats> {
        POOL.get().map(|p| p.pages.lock().stats())
    }

    /// The pool's physical base and CPU (window) address.
    pub fn placement() -> Option<(PhysAddr, usize)> {
        POOL.get().map(|p| (p.phys, p.area.addr()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_fit_with_alignment_and_exact_frees() {
        let mut p = PoolPages::new(64);
        assert_eq!(p.alloc(1), Ok(0));
        assert_eq!(p.alloc(4), Ok(4), "a power-of-two run is aligned when it can be");
        assert_eq!(p.alloc(3), Ok(1), "other runs take the first fit");
        assert_eq!(p.alloc(1), Ok(8), "single pages continue from the hint");
        assert_eq!(p.free(4, 2), Err(PoolError::NotAllocated { first: 4, pages: 2 }), "part of a run");
        assert_eq!(p.free(5, 3), Err(PoolError::NotAllocated { first: 5, pages: 3 }), "not a run's start");
        assert_eq!(p.free(1, 4), Err(PoolError::NotAllocated { first: 1, pages: 4 }), "two runs");
        assert_eq!(p.free(4, 4), Ok(()));
        assert_eq!(p.free(4, 4), Err(PoolError::NotAllocated { first: 4, pages: 4 }), "double free");
        assert_eq!(p.alloc(2), Ok(4), "the first aligned free pair");
        let s = p.stats();
        assert_eq!((s.pages, s.used_pages, s.peak_used_pages, s.allocations, s.frees, s.failures), (64, 7, 9, 5, 1, 0));
        assert_eq!(p.alloc(0), Err(PoolError::BadSize { pages: 0 }));
        assert_eq!(p.alloc(65), Err(PoolError::BadSize { pages: 65 }));
        assert_eq!(p.free(63, 2), Err(PoolError::NotAllocated { first: 63, pages: 2 }));
        assert_eq!(p.free(u64::MAX, 2), Err(PoolError::NotAllocated { first: u64::MAX, pages: 2 }));
    }

    #[test]
    fn exhaustion_is_an_error_and_recovers() {
        let mut p = PoolPages::new(64);
        for i in 0..64 {
            assert_eq!(p.alloc(1), Ok(i));
        }
        assert_eq!(p.alloc(1), Err(PoolError::Exhausted { pages: 1 }));
        assert_eq!(p.stats().failures, 1);
        p.free(17, 1).unwrap();
        assert_eq!(p.alloc(2), Err(PoolError::Exhausted { pages: 2 }));
        assert_eq!(p.alloc(1), Ok(17));
    }

    proptest! {
        /// Against a model (a Vec of page owners): runs never overlap, stay inside the pool,
        /// allocation fails only when no run of that length is free, and frees are exact.
        #[test]
        fn matches_a_page_owner_model(ops in proptest::collection::vec((0u8..3, 1u64..9, 0usize..16), 1..200)) {
            let n = 70;
            let mut p = PoolPages::new(n);
            let mut owner: Vec<Option<usize>> = vec![None; n as usize];
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (i, (op, len, pick)) in ops.into_iter().enumerate() {
                if op < 2 {
                    let fits = (0..n).any(|s| s + len <= n && (s..s + len).all(|j| owner[j as usize].is_none()));
                    match p.alloc(len) {
                        Ok(first) => {
                            prop_assert!(first + len <= n);
                            for j in first..first + len {
                                prop_assert!(owner[j as usize].is_none(), "page {} given twice", j);
                                owner[j as usize] = Some(i);
                            }
                            live.push((first, len));
                        }
                        Err(e) => {
                            prop_assert_eq!(e, PoolError::Exhausted { pages: len });
                            prop_assert!(!fits, "a free run of {} existed", len);
                        }
                    }
                } else if !live.is_empty() {
                    let (first, len) = live.remove(pick % live.len());
                    prop_assert_eq!(p.free(first, len), Ok(()));
                    for j in first..first + len {
                        owner[j as usize] = None;
                    }
                    prop_assert!(p.is_free(first, len));
                }
                let used = owner.iter().filter(|o| o.is_some()).count() as u64;
                prop_assert_eq!(p.stats().used_pages, used);
            }
        }
    }
}
