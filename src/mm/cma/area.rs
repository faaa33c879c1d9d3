//! One CMA area: a physically contiguous range carved out at boot, handed out in page runs tracked
//! by a bitmap (one bit per 2^order_per_bit pages, set = allocated) under a per-area lock.

use alloc::vec::Vec;
use core::fmt;

use spin::Mutex;

use super::bitmap;
use super::CMA_ALIGNMENT_CAP_ORDER;
use crate::mm::addr::{PhysAddr, PAGE_SHIFT, PAGE_SIZE};
use crate::mm::buddy::MAX_PAGE_ORDER;

/// Capacity of an area name in bytes; longer names are truncated (as Linux's snprintf would).
pub const CMA_NAME_LEN: usize = 32;

/// Characters per line of `CmaArea::render_bitmap`.
pub const RENDER_LINE_CHARS: usize = 64;

/// A short name stored inline (no heap), valid UTF-8.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AreaName {
    bytes: [u8; CMA_NAME_LEN],
    len: u8,
}

impl AreaName {
    /// `name`, truncated at a character boundary to at most `CMA_NAME_LEN` bytes.
    pub fn new(name: &str) -> Self {
        let mut len = name.len().min(CMA_NAME_LEN);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        let mut bytes = [0u8; CMA_NAME_LEN];
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        // len <= CMA_NAME_LEN = 32 fits in u8.
        AreaName {
            bytes,
            len: len as u8,
        }
    }

    pub fn as_str(&self) -> &str {
        // The bytes are a prefix of a &str cut at a character boundary, so this never fails.
        core::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Debug for AreaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for AreaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error creating an area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmaAreaError {
    /// An area of zero pages.
    Empty,
    /// `order_per_bit` above `MAX_PAGE_ORDER`.
    BadOrderPerBit { order_per_bit: u32 },
    /// Base or page count not a multiple of the bitmap granule (2^order_per_bit pages).
    Misaligned {
        base: PhysAddr,
        count: u64,
        order_per_bit: u32,
    },
    /// The area wraps around the physical address space.
    Overflow { base: PhysAddr, count: u64 },
    /// The bitmap could not be allocated.
    NoMemory { words: u64 },
}

impl fmt::Display for CmaAreaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CmaAreaError::Empty => f.write_str("CMA area of zero pages"),
            CmaAreaError::BadOrderPerBit { order_per_bit } => write!(
                f,
                "CMA order_per_bit {order_per_bit} is above the maximum {MAX_PAGE_ORDER}"
            ),
            CmaAreaError::Misaligned {
                base,
                count,
                order_per_bit,
            } => write!(
                f,
                "CMA area of {count} pages at {base}: base and size must be multiples of \
                 2^{order_per_bit} pages"
            ),
            CmaAreaError::Overflow { base, count } => {
                write!(
                    f,
                    "CMA area of {count} pages at {base} wraps the address space"
                )
            }
            CmaAreaError::NoMemory { words } => {
                write!(f, "no memory for a CMA bitmap of {words} words")
            }
        }
    }
}

/// Error from `CmaArea::release`. In every case nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmaReleaseError {
    /// The pages are not (wholly) inside this area: they belong to another allocator.
    NotInArea { addr: PhysAddr, count: u64 },
    /// A release of zero pages.
    ZeroPages { addr: PhysAddr },
    /// The address is not on a page of the bitmap's granule (2^order_per_bit pages).
    Misaligned { addr: PhysAddr, count: u64 },
    /// Some of the pages are not allocated: a double release, or pages never allocated.
    NotAllocated { addr: PhysAddr, count: u64 },
}

impl fmt::Display for CmaReleaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CmaReleaseError::NotInArea { addr, count } => {
                write!(
                    f,
                    "release of {count} pages at {addr}: not inside the CMA area"
                )
            }
            CmaReleaseError::ZeroPages { addr } => write!(f, "release of zero pages at {addr}"),
            CmaReleaseError::Misaligned { addr, count } => write!(
                f,
                "release of {count} pages at {addr}: not on a granule of the CMA bitmap"
            ),
            CmaReleaseError::NotAllocated { addr, count } => write!(
                f,
                "release of {count} pages at {addr}: pages not allocated (double release?)"
            ),
        }
    }
}

/// Counters of an area, in pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmaStats {
    pub total_pages: u64,
    pub used_pages: u64,
    pub free_pages: u64,
    /// The longest run of free pages (Linux's debugfs "maxchunk"), ignoring alignment.
    pub largest_free_pages: u64,
    /// Successful allocations.
    pub allocs: u64,
    /// Allocations refused for lack of a fitting free run (count 0 is not counted).
    pub failed_allocs: u64,
    /// Successful releases.
    pub releases: u64,
    /// Releases refused for pages of this area: double, misaligned or zero-length releases.
    pub bad_releases: u64,
}

/// State guarded by the area lock.
struct State {
    bitmap: Vec<u64>,
    /// Bit where the next search starts (next fit).
    next: u64,
    used_bits: u64,
    allocs: u64,
    failed_allocs: u64,
    releases: u64,
    bad_releases: u64,
}

/// A CMA area. Thread-safe: every operation takes the area's own spin lock, held for one bitmap
/// search or update. Like Linux's cma_alloc, which may sleep, it is not meant for interrupt
/// handlers: one that interrupts a holder of the lock on the same CPU would spin forever.
pub struct CmaArea {
    name: AreaName,
    base: PhysAddr,
    count: u64,
    order_per_bit: u32,
    nbits: u64,
    state: Mutex<State>,
}

impl CmaArea {
    /// An area of `count` pages at `base`, all free, with one bitmap bit per 2^order_per_bit pages.
    /// `base` and `count` must be multiples of that granule. The bitmap is allocated on the heap.
    pub fn new(
        name: &str,
        base: PhysAddr,
        count: u64,
        order_per_bit: u32,
    ) -> Result<Self, CmaAreaError> {
        if count == 0 {
            return Err(CmaAreaError::Empty);
        }
        if order_per_bit > MAX_PAGE_ORDER {
            return Err(CmaAreaError::BadOrderPerBit { order_per_bit });
        }
        let granule = 1u64 << order_per_bit;
        if !base.as_u64().is_multiple_of(PAGE_SIZE * granule) || !count.is_multiple_of(granule) {
            return Err(CmaAreaError::Misaligned {
                base,
                count,
                order_per_bit,
            });
        }
        count
            .checked_mul(PAGE_SIZE)
            .and_then(|bytes| base.checked_add(bytes))
            .ok_or(CmaAreaError::Overflow { base, count })?;
        let nbits = count >> order_per_bit;
        let words = nbits.div_ceil(64);
        let mut bitmap = Vec::new();
        let reserved = usize::try_from(words)
            .ok()
            .filter(|&w| bitmap.try_reserve_exact(w).is_ok());
        let Some(words) = reserved else {
            return Err(CmaAreaError::NoMemory { words });
        };
        bitmap.resize(words, 0);
        Ok(CmaArea {
            name: AreaName::new(name),
            base,
            count,
            order_per_bit,
            nbits,
            state: Mutex::new(State {
                bitmap,
                next: 0,
                used_bits: 0,
                allocs: 0,
                failed_allocs: 0,
                releases: 0,
                bad_releases: 0,
            }),
        })
    }

    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    pub fn base(&self) -> PhysAddr {
        self.base
    }

    /// Size in pages.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.count * PAGE_SIZE
    }

    /// Exclusive end address.
    pub fn end(&self) -> PhysAddr {
        PhysAddr(self.base.as_u64() + self.size())
    }

    pub fn order_per_bit(&self) -> u32 {
        self.order_per_bit
    }

    /// Whether the `count` pages starting at `addr` lie wholly inside the area (for `count` 0:
    /// whether `addr` does).
    pub fn contains(&self, addr: PhysAddr, count: u64) -> bool {
        let end = count
            .checked_mul(PAGE_SIZE)
            .and_then(|bytes| addr.checked_add(bytes));
        addr >= self.base && addr < self.end() && end.is_some_and(|e| e <= self.end())
    }

    /// Allocates `count` contiguous pages whose physical address is aligned to 2^align_order pages,
    /// the order capped at `CMA_ALIGNMENT_CAP_ORDER`. Requests are rounded up to whole bitmap bits.
    /// First fit starting at a next-fit hint (where the previous allocation ended, rewound by a
    /// release of the run just before it), wrapping round once. `None` for `count` 0 or when no
    /// free run fits.
    pub fn alloc(&self, count: u64, align_order: u32) -> Option<PhysAddr> {
        if count == 0 {
            return None;
        }
        let len = self.pages_to_bits(count);
        let (step, offset) = self.alignment_in_bits(align_order.min(CMA_ALIGNMENT_CAP_ORDER));
        let mut st = self.state.lock();
        let (words, next, nbits) = (&st.bitmap, st.next, self.nbits);
        let found = bitmap::find_zero_run(words, nbits, next, nbits, len, step, offset)
            .or_else(|| bitmap::find_zero_run(words, nbits, 0, next, len, step, offset));
        let Some(bit) = found else {
            st.failed_allocs += 1;
            return None;
        };
        bitmap::set_range(&mut st.bitmap, bit, bit + len);
        st.used_bits += len;
        st.next = self.hint_after(bit + len);
        st.allocs += 1;
        drop(st);
        Some(self.addr_of_bit(bit))
    }

    /// Releases `count` pages at `addr` (rounded up to whole bitmap bits). Every page must be
    /// allocated; otherwise, or if the range is not in this area, nothing changes and the error says
    /// why.
    pub fn release(&self, addr: PhysAddr, count: u64) -> Result<(), CmaReleaseError> {
        if !self.contains(addr, count) {
            return Err(CmaReleaseError::NotInArea { addr, count });
        }
        let offset = addr.as_u64() - self.base.as_u64();
        let granule_shift = PAGE_SHIFT + self.order_per_bit;
        let mut st = self.state.lock();
        let refused = if count == 0 {
            CmaReleaseError::ZeroPages { addr }
        } else if offset & ((1 << granule_shift) - 1) != 0 {
            CmaReleaseError::Misaligned { addr, count }
        } else {
            let start = offset >> granule_shift;
            // `contains` and the granule-multiple area size keep the end inside the bitmap.
            let end = start + self.pages_to_bits(count);
            if bitmap::all_set(&st.bitmap, start, end) {
                bitmap::clear_range(&mut st.bitmap, start, end);
                st.used_bits -= end - start;
                // Releasing the run that ends at the hint (typically the latest allocation)
                // rewinds the hint, so alloc/release pairs reuse one run instead of walking the
                // whole area.
                if st.next == self.hint_after(end) {
                    st.next = start;
                }
                st.releases += 1;
                return Ok(());
            }
            CmaReleaseError::NotAllocated { addr, count }
        };
        st.bad_releases += 1;
        Err(refused)
    }

    /// Linux's `cma_release` contract: `false` if the pages are not in this area (so the caller
    /// should give them to another allocator), `true` otherwise. A refused release of pages that are
    /// in the area (double release, misaligned) still returns `true`, as the pages must not go to
    /// another allocator; it changes nothing and is counted in `CmaStats::bad_releases`. Use
    /// `release` to see the reason.
    pub fn release_pages(&self, addr: PhysAddr, count: u64) -> bool {
        !matches!(
            self.release(addr, count),
            Err(CmaReleaseError::NotInArea { .. })
        )
    }

    /// Current counters (scans the bitmap for the longest free run).
    pub fn stats(&self) -> CmaStats {
        let st = self.state.lock();
        let used = st.used_bits << self.order_per_bit;
        CmaStats {
            total_pages: self.count,
            used_pages: used,
            free_pages: self.count - used,
            largest_free_pages: bitmap::longest_zero_run(&st.bitmap, self.nbits)
                << self.order_per_bit,
            allocs: st.allocs,
            failed_allocs: st.failed_allocs,
            releases: st.releases,
            bad_releases: st.bad_releases,
        }
    }

    /// Writes a picture of the bitmap: a title line, then lines of up to `RENDER_LINE_CHARS`
    /// characters, each starting with the physical address of its first page. Each character stands
    /// for the same number of pages (a whole number of bitmap bits), chosen so that the picture has
    /// at most `cells` characters (at least one): '.' all free, '#' all used, '+' partly used.
    /// The lock is taken once per line, so lines are each consistent but may differ in time.
    pub fn render_bitmap<W: fmt::Write>(&self, out: &mut W, cells: usize) -> fmt::Result {
        let cells = u64::try_from(cells.max(1)).unwrap_or(u64::MAX);
        let bits_per_cell = self.nbits.div_ceil(cells);
        let total_cells = self.nbits.div_ceil(bits_per_cell);
        writeln!(
            out,
            "cma {}: {} pages at {}, {} pages per character ('.' free, '+' partly used, '#' used)",
            self.name,
            self.count,
            self.base,
            bits_per_cell << self.order_per_bit
        )?;
        let mut cell = 0;
        while cell < total_cells {
            let n = (total_cells - cell).min(RENDER_LINE_CHARS as u64);
            let mut line = [b' '; RENDER_LINE_CHARS];
            {
                let st = self.state.lock();
                for (i, c) in line.iter_mut().take(n as usize).enumerate() {
                    let start = (cell + i as u64) * bits_per_cell;
                    let end = (start + bits_per_cell).min(self.nbits);
                    *c = match bitmap::count_set(&st.bitmap, start, end) {
                        0 => b'.',
                        used if used == end - start => b'#',
                        _ => b'+',
                    };
                }
            }
            write!(
                out,
                "{:#018x} ",
                self.addr_of_bit(cell * bits_per_cell).as_u64()
            )?;
            for &c in &line[..n as usize] {
                out.write_char(char::from(c))?;
            }
            out.write_char('\n')?;
            cell += n;
        }
        Ok(())
    }

    /// Writes the column titles matching `write_stats_row`, as one line.
    pub fn write_stats_header<W: fmt::Write>(out: &mut W) -> fmt::Result {
        writeln!(
            out,
            "{:<16} {:<18} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
            "area",
            "base",
            "size KiB",
            "used KiB",
            "free KiB",
            "maxchunk",
            "allocs",
            "fails",
            "badrel"
        )
    }

    /// Writes one line of statistics (sizes in KiB) under `write_stats_header`.
    pub fn write_stats_row<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        let s = self.stats();
        let kib = |pages: u64| pages * (PAGE_SIZE / 1024);
        writeln!(
            out,
            "{:<16} {:#018x} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
            self.name.as_str(),
            self.base.as_u64(),
            kib(s.total_pages),
            kib(s.used_pages),
            kib(s.free_pages),
            kib(s.largest_free_pages),
            s.allocs,
            s.failed_allocs,
            s.bad_releases
        )
    }

    /// Bitmap step and offset such that bit `b` starts a physically 2^align_order-page aligned run
    /// exactly when `b % step == offset`: the alignment is of the physical address, not of the
    /// offset in the area.
    fn alignment_in_bits(&self, align_order: u32) -> (u64, u64) {
        if align_order <= self.order_per_bit {
            return (1, 0);
        }
        let align_pages = 1u64 << align_order;
        let pages_to_boundary = self.base.pfn().wrapping_neg() & (align_pages - 1);
        (
            align_pages >> self.order_per_bit,
            pages_to_boundary >> self.order_per_bit,
        )
    }

    /// Bitmap bits covering `count` pages (rounded up to whole granules).
    fn pages_to_bits(&self, count: u64) -> u64 {
        let granule_mask = (1 << self.order_per_bit) - 1;
        (count >> self.order_per_bit) + u64::from(count & granule_mask != 0)
    }

    /// The next-fit hint after a run ending at bit `end`: `end`, or 0 at the end of the bitmap.
    fn hint_after(&self, end: u64) -> u64 {
        if end == self.nbits {
            0
        } else {
            end
        }
    }

    fn addr_of_bit(&self, bit: u64) -> PhysAddr {
        PhysAddr(self.base.as_u64() + ((bit << self.order_per_bit) * PAGE_SIZE))
    }
}

impl fmt::Debug for CmaArea {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CmaArea")
            .field("name", &self.name)
            .field("base", &self.base)
            .field("count", &self.count)
            .field("order_per_bit", &self.order_per_bit)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn page(n: u64) -> u64 {
        n * PAGE_SIZE
    }

    #[test]
    fn alignment_is_of_the_physical_address() {
        // Base 3 pages past a 1 GiB boundary.
        let a = CmaArea::new("t", PhysAddr(GIB + page(3)), 1024, 0).unwrap();
        assert_eq!(a.alloc(16, 4), Some(PhysAddr(GIB + page(16))));
        // 300 pages asked with order 9: capped to order 8 (1 MiB).
        assert_eq!(a.alloc(300, 9), Some(PhysAddr(GIB + page(256))));
        assert_eq!(a.alloc(3, 2), Some(PhysAddr(GIB + page(556))));
        assert_eq!(a.alloc(1, 0), Some(PhysAddr(GIB + page(559))));
        assert_eq!(a.alloc(5, 3), Some(PhysAddr(GIB + page(560))));
        // Nothing aligned to 1 MiB is left with room for 256 pages: the 768..1027 pages are free
        // but only 259 of them, and 768 + 256 = 1024 <= 1027.
        assert_eq!(a.alloc(256, 8), Some(PhysAddr(GIB + page(768))));
        assert_eq!(a.alloc(256, 8), None);
        assert_eq!(a.stats().failed_allocs, 1);
    }

    #[test]
    fn next_fit_wraps_and_recovers_after_release() {
        let a = CmaArea::new("t", PhysAddr(GIB), 64, 0).unwrap();
        let at = |n: u64| Some(PhysAddr(GIB + page(n)));
        assert_eq!(a.alloc(16, 0), at(0));
        assert_eq!(a.alloc(16, 0), at(16));
        assert_eq!(a.alloc(16, 0), at(32));
        assert_eq!(a.release(PhysAddr(GIB), 16), Ok(()));
        // Next fit continues after the last allocation, then wraps to the freed run.
        assert_eq!(a.alloc(16, 0), at(48));
        assert_eq!(a.alloc(16, 0), at(0));
        assert_eq!(a.alloc(1, 0), None);
        assert_eq!(a.alloc(0, 0), None);
        assert_eq!(a.alloc(65, 0), None);
        assert!(cma_release_ok(&a, GIB + page(32), 16));
        assert_eq!(a.alloc(16, 0), at(32));
        let s = a.stats();
        assert_eq!(
            (s.used_pages, s.free_pages, s.largest_free_pages),
            (64, 0, 0)
        );
        assert_eq!(
            (s.allocs, s.failed_allocs, s.releases, s.bad_releases),
            (6, 2, 2, 0)
        );
    }

    #[test]
    fn releasing_the_latest_allocation_rewinds_the_hint() {
        let a = CmaArea::new("t", PhysAddr(GIB), 64, 0).unwrap();
        let first = a.alloc(4, 0).unwrap();
        let p = a.alloc(8, 0).unwrap();
        assert_eq!(a.release(p, 8), Ok(()));
        assert_eq!(a.alloc(8, 0), Some(p));
        // Releasing an older run does not move the hint.
        assert_eq!(a.release(first, 4), Ok(()));
        assert_eq!(a.alloc(4, 0), Some(PhysAddr(GIB + page(12))));
    }

    fn cma_release_ok(a: &CmaArea, addr: u64, count: u64) -> bool {
        a.release_pages(PhysAddr(addr), count)
    }

    #[test]
    fn bad_releases_change_nothing() {
        let a = CmaArea::new("t", PhysAddr(GIB), 64, 0).unwrap();
        let p = a.alloc(8, 0).unwrap();
        let before = a.stats();
        let outside = [
            (GIB - page(1), 1),
            (GIB + page(60), 8),
            (GIB + page(64), 1),
            (0, 1),
            (u64::MAX - 4095, 2),
        ];
        for (addr, count) in outside {
            assert_eq!(
                a.release(PhysAddr(addr), count),
                Err(CmaReleaseError::NotInArea {
                    addr: PhysAddr(addr),
                    count
                })
            );
            assert!(!a.release_pages(PhysAddr(addr), count));
        }
        assert_eq!(a.stats(), before);
        assert!(!a.contains(PhysAddr(GIB + page(64)), 0));
        assert!(a.contains(PhysAddr(GIB + page(63)), 1));

        assert_eq!(a.release(p, 0), Err(CmaReleaseError::ZeroPages { addr: p }));
        let odd = PhysAddr(p.as_u64() + 8);
        assert_eq!(
            a.release(odd, 1),
            Err(CmaReleaseError::Misaligned {
                addr: odd,
                count: 1
            })
        );
        // Partly allocated: pages 4..12 with only 4..8 allocated.
        let mid = PhysAddr(GIB + page(4));
        assert_eq!(
            a.release(mid, 8),
            Err(CmaReleaseError::NotAllocated {
                addr: mid,
                count: 8
            })
        );
        assert_eq!(a.release(p, 8), Ok(()));
        assert_eq!(
            a.release(p, 8),
            Err(CmaReleaseError::NotAllocated { addr: p, count: 8 })
        );
        // A refused release of pages inside the area still reports `true` (do not free elsewhere).
        assert!(a.release_pages(p, 8));
        let s = a.stats();
        assert_eq!((s.used_pages, s.releases, s.bad_releases), (0, 1, 5));
    }

    #[test]
    fn order_per_bit_granules() {
        // One bit per 4 pages; base 4 pages past a 32 KiB boundary.
        let a = CmaArea::new("t", PhysAddr(GIB + page(4)), 64, 2).unwrap();
        let at = |n: u64| Some(PhysAddr(GIB + page(4 + n)));
        assert_eq!(a.alloc(1, 0), at(0));
        // Order 3 (8 pages): physically aligned, so area offset 4.
        assert_eq!(a.alloc(8, 3), at(4));
        assert_eq!(a.alloc(5, 0), at(12));
        assert_eq!(a.stats().used_pages, 4 + 8 + 8);
        let odd = PhysAddr(GIB + page(5));
        assert_eq!(
            a.release(odd, 1),
            Err(CmaReleaseError::Misaligned {
                addr: odd,
                count: 1
            })
        );
        // One page releases its whole granule.
        assert_eq!(a.release(PhysAddr(GIB + page(4)), 1), Ok(()));
        assert_eq!(a.release(PhysAddr(GIB + page(16)), 8), Ok(()));
        assert_eq!(a.stats().used_pages, 8);
        assert_eq!(a.stats().largest_free_pages, 64 - 12);
    }

    #[test]
    fn construction_errors() {
        assert_eq!(
            CmaArea::new("t", PhysAddr(GIB), 0, 0).unwrap_err(),
            CmaAreaError::Empty
        );
        assert_eq!(
            CmaArea::new("t", PhysAddr(GIB), 64, 19).unwrap_err(),
            CmaAreaError::BadOrderPerBit { order_per_bit: 19 }
        );
        let mis = |b: u64, c: u64| CmaAreaError::Misaligned {
            base: PhysAddr(b),
            count: c,
            order_per_bit: 2,
        };
        assert_eq!(
            CmaArea::new("t", PhysAddr(GIB + page(2)), 64, 2).unwrap_err(),
            mis(GIB + page(2), 64)
        );
        assert_eq!(
            CmaArea::new("t", PhysAddr(GIB), 66, 2).unwrap_err(),
            mis(GIB, 66)
        );
        assert_eq!(
            CmaArea::new("t", PhysAddr(GIB + 1), 64, 0).unwrap_err(),
            CmaAreaError::Misaligned {
                base: PhysAddr(GIB + 1),
                count: 64,
                order_per_bit: 0
            }
        );
        let top = PhysAddr(u64::MAX - page(3) + 1);
        assert_eq!(
            CmaArea::new("t", top, 4, 0).unwrap_err(),
            CmaAreaError::Overflow {
                base: top,
                count: 4
            }
        );
    }

    #[test]
    fn names_are_truncated_at_a_char_boundary() {
        let long = "é".repeat(20);
        let a = CmaArea::new(&long, PhysAddr(GIB), 4, 0).unwrap();
        assert_eq!(a.name(), "é".repeat(16));
        assert_eq!(AreaName::new("reserved").as_str(), "reserved");
    }

    #[test]
    fn render_known_pattern() {
        let a = CmaArea::new("test", PhysAddr(GIB), 64, 0).unwrap();
        a.alloc(8, 0).unwrap();
        a.alloc(2, 0).unwrap();
        a.alloc(4, 0).unwrap();
        a.release(PhysAddr(GIB + page(10)), 4).unwrap();
        let mut s = String::new();
        a.render_bitmap(&mut s, 16).unwrap();
        assert_eq!(
            s,
            "cma test: 64 pages at 0x40000000, 4 pages per character \
             ('.' free, '+' partly used, '#' used)\n\
             0x0000000040000000 ##+.............\n"
        );

        // 256 pages in 128 cells: two pages per character, two lines.
        let b = CmaArea::new("big", PhysAddr(GIB), 256, 0).unwrap();
        b.alloc(131, 0).unwrap();
        let mut s = String::new();
        b.render_bitmap(&mut s, 128).unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], format!("0x0000000040000000 {}", "#".repeat(64)));
        assert_eq!(lines[2], format!("0x0000000040080000 #+{}", ".".repeat(62)));

        // More cells than bits: one bit per character.
        let mut s = String::new();
        a.render_bitmap(&mut s, 1000).unwrap();
        assert_eq!(
            s.lines().nth(1),
            Some(format!("0x0000000040000000 {}{}", "#".repeat(10), ".".repeat(54)).as_str())
        );
    }

    #[test]
    fn stats_row() {
        let a = CmaArea::new("reserved", PhysAddr(0x7800_0000), 16384, 0).unwrap();
        a.alloc(256, 8).unwrap();
        a.alloc(16384, 0);
        let mut s = String::new();
        CmaArea::write_stats_header(&mut s).unwrap();
        a.write_stats_row(&mut s).unwrap();
        assert_eq!(
            s,
            "area             base                 size KiB   used KiB   free KiB   maxchunk   allocs    fails   badrel\n\
             reserved         0x0000000078000000      65536       1024      64512      64512        1        1        0\n"
        );
    }

    #[test]
    fn concurrent_use_never_overlaps() {
        use std::sync::{Arc, Mutex as StdMutex};
        let a = Arc::new(CmaArea::new("t", PhysAddr(GIB), 1024, 0).unwrap());
        let owner = Arc::new(StdMutex::new(vec![false; 1024]));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (a, owner) = (a.clone(), owner.clone());
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        let n = 1 + (i * 7 + t) % 24;
                        if let Some(p) = a.alloc(n, (i % 5) as u32) {
                            let first = ((p.as_u64() - GIB) / PAGE_SIZE) as usize;
                            {
                                let mut o = owner.lock().unwrap();
                                for q in first..first + n as usize {
                                    assert!(!o[q], "page {q} handed out twice");
                                    o[q] = true;
                                }
                            }
                            let mut o = owner.lock().unwrap();
                            o[first..first + n as usize]
                                .iter_mut()
                                .for_each(|q| *q = false);
                            drop(o);
                            assert_eq!(a.release(p, n), Ok(()));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(a.stats().used_pages, 0);
    }

    // ----- model test: an independent, bit-by-bit next-fit allocator -----

    struct Model {
        base_pfn: u64,
        opb: u32,
        bits: Vec<bool>,
        next: usize,
    }

    impl Model {
        fn alloc(&mut self, count: u64, align_order: u32) -> Option<u64> {
            let g = 1u64 << self.opb;
            let len = count.div_ceil(g) as usize;
            let align = 1u64 << align_order.min(8);
            let n = self.bits.len();
            let fits = |b: usize, bits: &Vec<bool>| {
                (self.base_pfn + b as u64 * g).is_multiple_of(align)
                    && b + len <= n
                    && bits[b..b + len].iter().all(|x| !x)
            };
            let found = (self.next..n)
                .chain(0..self.next)
                .find(|&b| fits(b, &self.bits))?;
            self.bits[found..found + len]
                .iter_mut()
                .for_each(|x| *x = true);
            self.next = (found + len) % n;
            Some((self.base_pfn + found as u64 * g) * PAGE_SIZE)
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc(u64, u32),
        Release(usize),
        BadRelease(i64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u64..48, 0u32..11).prop_map(|(c, a)| Op::Alloc(c, a)),
            3 => any::<usize>().prop_map(Op::Release),
            1 => (-8i64..400, 0u64..20).prop_map(|(o, c)| Op::BadRelease(o, c)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
        #[test]
        fn model(opb in 0u32..3, base_k in 0u64..70, nbits in 1u64..300, ops in proptest::collection::vec(op(), 1..150)) {
            let g = 1u64 << opb;
            let base_pfn = (GIB >> 12) + base_k * g;
            let a = CmaArea::new("m", PhysAddr::from_pfn(base_pfn), nbits * g, opb).unwrap();
            let mut m = Model { base_pfn, opb, bits: vec![false; nbits as usize], next: 0 };
            let mut live: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(count, align) => {
                        let got = a.alloc(count, align).map(|p| p.as_u64());
                        prop_assert_eq!(got, m.alloc(count, align));
                        if let Some(p) = got {
                            live.push((p, count));
                        }
                    }
                    Op::Release(i) => {
                        if live.is_empty() { continue; }
                        let (p, count) = live.swap_remove(i % live.len());
                        prop_assert_eq!(a.release(PhysAddr(p), count), Ok(()));
                        let b = ((p / PAGE_SIZE - base_pfn) / g) as usize;
                        let len = count.div_ceil(g) as usize;
                        m.bits[b..b + len].iter_mut().for_each(|x| *x = false);
                        if m.next == (b + len) % m.bits.len() {
                            m.next = b;
                        }
                    }
                    Op::BadRelease(off, count) => {
                        let pfn = base_pfn as i64 + off;
                        let addr = PhysAddr::from_pfn(pfn as u64);
                        let inside = off >= 0 && (off as u64) < nbits * g && off as u64 + count <= nbits * g;
                        let want = if !inside {
                            CmaReleaseError::NotInArea { addr, count }
                        } else if count == 0 {
                            CmaReleaseError::ZeroPages { addr }
                        } else if !(off as u64).is_multiple_of(g) {
                            CmaReleaseError::Misaligned { addr, count }
                        } else {
                            let b = off as usize / g as usize;
                            if m.bits[b..b + count.div_ceil(g) as usize].iter().all(|&x| x) {
                                // A valid release of someone else's pages: not a bad release.
                                continue;
                            }
                            CmaReleaseError::NotAllocated { addr, count }
                        };
                        let before = a.stats();
                        prop_assert_eq!(a.release(addr, count), Err(want));
                        prop_assert_eq!(a.release_pages(addr, count), inside);
                        let after = a.stats();
                        let counted = if inside { 2 } else { 0 };
                        prop_assert_eq!(after, CmaStats { bad_releases: before.bad_releases + counted, ..before });
                    }
                }
                let used = m.bits.iter().filter(|&&x| x).count() as u64 * g;
                prop_assert_eq!(a.stats().used_pages, used);
            }
            for (p, count) in live {
                prop_assert_eq!(a.release(PhysAddr(p), count), Ok(()));
            }
            let s = a.stats();
            prop_assert_eq!((s.used_pages, s.largest_free_pages), (0, nbits * g));
        }
    }
}
