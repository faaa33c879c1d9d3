//! Cache maintenance for streaming DMA with devices that are not cache-coherent: which lines of a
//! buffer to clean, invalidate or clean+invalidate, and when. Pure logic over [`CacheOps`], so the
//! architecture's real cache instructions and a host model of a cache can both sit behind it.
//!
//! A non-coherent device reads and writes memory at the point of coherency (PoC) and never sees
//! the CPU's data caches. The rules, after Linux arm64's `arch_sync_dma_for_device` /
//! `arch_sync_dma_for_cpu` and its `dcache_clean_poc` / `dcache_inval_poc`:
//!
//! **Before the device accesses the buffer** ([`for_device`]: map, sync for device): clean every
//! line the buffer touches to the PoC, in every direction.
//! - To-device and bidirectional: the device must read what the CPU wrote, which may still sit in
//!   dirty lines.
//! - From-device too: a dirty line left in the cache could be evicted in the middle of the
//!   transfer and overwrite what the device has just written. Cleaning, rather than invalidating,
//!   also keeps the CPU's data in bytes the device ends up not writing and never discards data
//!   of a neighbour sharing an edge line. (Linux arm64 invalidated here until 2022 and switched
//!   to cleaning for these reasons; Linux arm32 still invalidates. We clean on both: it is never
//!   wrong, only sometimes slower.)
//!
//! **After the device wrote the buffer** ([`for_cpu`]: unmap, sync for CPU), from-device and
//! bidirectional only: invalidate the buffer's lines, so the CPU does not read stale copies that
//! were in the cache, or were fetched speculatively, while the device was writing. A line only
//! partly covered by the buffer (at either edge) is cleaned and invalidated instead: a plain
//! invalidate would discard whatever the CPU wrote meanwhile to the rest of that line, which
//! belongs to someone else. The price is that such a write-back also rewrites the buffer's bytes
//! in that line with the cache's copy; the buffer's edge bytes are only right if nobody dirtied
//! the shared line during the transfer. That is why DMA buffers should own their cache lines
//! (line-aligned start and size), and why bouncing through swiotlb is the fallback when they do
//! not.
//!
//! To-device transfers need nothing afterwards: the device only read, so the CPU's copies are
//! still current.
//!
//! Each line gets exactly one operation per call: Linux's `dcache_inval_poc` operates twice on a
//! buffer lying inside a single line (once as the end line, once as the start line); here it gets
//! one clean+invalidate.
//!
//! Coherent devices (`dma-coherent` in the device tree) get no maintenance at all: the DMA layer
//! skips these calls for them (see [`needs_maintenance`]).

use core::fmt;

/// The cache operations of one CPU architecture, on the data cache to the point of coherency.
///
/// [`for_device`] and [`for_cpu`] call the operations only with `va` a multiple of
/// [`CacheOps::line_size`] and `len` a non-zero multiple of it, the range not wrapping the
/// address space, and then [`CacheOps::complete`] once: the operations need not have completed
/// when they return, only when `complete` does (on Arm: one DSB for the whole request rather
/// than one per sub-range), so that the device may be started right after.
pub trait CacheOps {
    /// The smallest data-cache line size, in bytes: a power of two (CTR_EL0.DminLine on arm64,
    /// CTR.DminLine on armv7). The smallest, so that stepping by it never skips a line of any
    /// cache level.
    fn line_size(&self) -> usize;
    /// Writes dirty lines of `va .. va + len` back to the PoC; they stay valid in the cache.
    fn clean(&mut self, va: usize, len: usize);
    /// Discards the lines of `va .. va + len` from the cache without writing them back.
    fn invalidate(&mut self, va: usize, len: usize);
    /// Writes dirty lines of `va .. va + len` back to the PoC, then discards them.
    fn clean_invalidate(&mut self, va: usize, len: usize);
    /// Waits until every operation issued so far has completed.
    fn complete(&mut self);
}

/// Which way the data of a streaming mapping moves (Linux's `enum dma_data_direction`, without
/// `DMA_NONE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The device reads the buffer.
    ToDevice,
    /// The device writes the buffer.
    FromDevice,
    /// The device may read and write it.
    Bidirectional,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::ToDevice => "to-device",
            Direction::FromDevice => "from-device",
            Direction::Bidirectional => "bidirectional",
        })
    }
}

/// Why a maintenance request was refused. Nothing was done to the cache in either case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaintError {
    /// [`CacheOps::line_size`] is not a power of two.
    BadLineSize { line: usize },
    /// The buffer, rounded out to whole lines, does not fit in the address space.
    Wraps { va: usize, len: usize },
}

impl fmt::Display for MaintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaintError::BadLineSize { line } => {
                write!(f, "cache line size {line} is not a power of two")
            }
            MaintError::Wraps { va, len } => write!(
                f,
                "buffer {va:#x} + {len:#x}, rounded out to cache lines, wraps the address space"
            ),
        }
    }
}

/// Whether a device needs cache maintenance for its streaming mappings: only when it is not
/// cache-coherent. The DMA layer calls [`for_device`] / [`for_cpu`] only when this is true.
pub const fn needs_maintenance(coherent: bool) -> bool {
    !coherent
}

/// The cache lines a buffer touches.
struct Lines {
    line: usize,
    /// Start of the first line.
    first: usize,
    /// Start of the last line (equal to `first` for a buffer within one line).
    last: usize,
    /// Bytes from `first` to the end of the last line.
    span: usize,
    /// The first line holds bytes before the buffer.
    head_partial: bool,
    /// The last line holds bytes after the buffer.
    tail_partial: bool,
}

impl Lines {
    /// `None` for an empty buffer. Computed from the last byte (`va + len - 1`) so that a buffer
    /// ending at the very top of the address space needs no unrepresentable end address.
    #[inline(always)]
    fn of(line: usize, va: usize, len: usize) -> Result<Option<Lines>, MaintError> {
        if !line.is_power_of_two() {
            return Err(MaintError::BadLineSize { line });
        }
        let Some(last_len) = len.checked_sub(1) else {
            return Ok(None);
        };
        let wraps = MaintError::Wraps { va, len };
        let last_byte = va.checked_add(last_len).ok_or(wraps)?;
        let mask = line - 1;
        let (first, last) = (va & !mask, last_byte & !mask);
        let span = (last - first).checked_add(line).ok_or(wraps)?;
        Ok(Some(Lines {
            line,
            first,
            last,
            span,
            head_partial: va & mask != 0,
            tail_partial: last_byte & mask != mask,
        }))
    }
}

/// Cache maintenance before a non-coherent device accesses `va .. va + len` (map, sync for
/// device), in direction `dir`: one clean to the PoC of every line the buffer touches, whatever
/// the direction (see the module documentation for why from-device is cleaned too). An empty
/// buffer needs nothing.
#[inline(always)]
pub fn for_device<C: CacheOps + ?Sized>(
    ops: &mut C,
    va: usize,
    len: usize,
    dir: Direction,
) -> Result<(), MaintError> {
    let Some(l) = Lines::of(ops.line_size(), va, len)? else {
        return Ok(());
    };
    // Spelled out so that a new direction has to be decided on here.
    match dir {
        Direction::ToDevice | Direction::FromDevice | Direction::Bidirectional => {
            ops.clean(l.first, l.span)
        }
    }
    ops.complete();
    Ok(())
}

/// Cache maintenance after a non-coherent device wrote `va .. va + len` (unmap, sync for CPU), in
/// direction `dir`. To-device: nothing. From-device and bidirectional: a partial line at either
/// edge is cleaned and invalidated, the whole lines between are invalidated, in ascending order
/// and one operation per line (a buffer inside one line gets a single clean+invalidate).
#[inline(always)]
pub fn for_cpu<C: CacheOps + ?Sized>(
    ops: &mut C,
    va: usize,
    len: usize,
    dir: Direction,
) -> Result<(), MaintError> {
    let Some(l) = Lines::of(ops.line_size(), va, len)? else {
        return Ok(());
    };
    if dir == Direction::ToDevice {
        return Ok(());
    }
    // `lo` is the first line not yet done. It only moves past `first` when `first < last`, so
    // `lo <= last` throughout, and no length below exceeds `span`, which did not overflow.
    let mut lo = l.first;
    if l.head_partial {
        ops.clean_invalidate(l.first, l.line);
        if l.first == l.last {
            ops.complete();
            return Ok(());
        }
        lo = l.first + l.line;
    }
    if l.tail_partial {
        if lo < l.last {
            ops.invalidate(lo, l.last - lo);
        }
        ops.clean_invalidate(l.last, l.line);
    } else {
        ops.invalidate(lo, l.last - lo + l.line);
    }
    ops.complete();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum Op {
        Clean,
        Inval,
        CleanInval,
    }
    use Op::*;

    /// Records every call, and whether the request was completed.
    struct Recorder {
        line: usize,
        calls: Vec<(Op, usize, usize)>,
        completed: bool,
    }

    impl Recorder {
        fn new(line: usize) -> Recorder {
            Recorder {
                line,
                calls: Vec::new(),
                completed: false,
            }
        }
    }

    impl CacheOps for Recorder {
        fn line_size(&self) -> usize {
            self.line
        }
        fn clean(&mut self, va: usize, len: usize) {
            assert!(!self.completed, "operation after complete()");
            self.calls.push((Clean, va, len));
        }
        fn invalidate(&mut self, va: usize, len: usize) {
            assert!(!self.completed, "operation after complete()");
            self.calls.push((Inval, va, len));
        }
        fn clean_invalidate(&mut self, va: usize, len: usize) {
            assert!(!self.completed, "operation after complete()");
            self.calls.push((CleanInval, va, len));
        }
        fn complete(&mut self) {
            assert!(!self.completed, "complete() twice");
            self.completed = true;
        }
    }

    /// The calls of a request; every request that issued an operation must end completed.
    fn finished(r: Recorder) -> Vec<(Op, usize, usize)> {
        assert!(r.calls.is_empty() || r.completed, "operations left without complete(): {:?}", r.calls);
        r.calls
    }

    fn dev(line: usize, va: usize, len: usize, dir: Direction) -> Vec<(Op, usize, usize)> {
        let mut r = Recorder::new(line);
        for_device(&mut r, va, len, dir).unwrap();
        finished(r)
    }

    fn cpu(line: usize, va: usize, len: usize, dir: Direction) -> Vec<(Op, usize, usize)> {
        let mut r = Recorder::new(line);
        for_cpu(&mut r, va, len, dir).unwrap();
        finished(r)
    }

    const ALL: [Direction; 3] = [
        Direction::ToDevice,
        Direction::FromDevice,
        Direction::Bidirectional,
    ];
    const READS_BACK: [Direction; 2] = [Direction::FromDevice, Direction::Bidirectional];

    #[test]
    fn aligned_buffer() {
        // 0x1000 .. 0x1100 with 64-byte lines: 4 whole lines.
        for dir in ALL {
            assert_eq!(dev(64, 0x1000, 0x100, dir), [(Clean, 0x1000, 0x100)]);
        }
        for dir in READS_BACK {
            assert_eq!(cpu(64, 0x1000, 0x100, dir), [(Inval, 0x1000, 0x100)]);
        }
        assert_eq!(cpu(64, 0x1000, 0x100, Direction::ToDevice), []);
    }

    #[test]
    fn unaligned_start() {
        // 0x1010 .. 0x1100: the line at 0x1000 is shared with 16 bytes before the buffer.
        for dir in ALL {
            assert_eq!(dev(64, 0x1010, 0xf0, dir), [(Clean, 0x1000, 0x100)]);
        }
        for dir in READS_BACK {
            assert_eq!(
                cpu(64, 0x1010, 0xf0, dir),
                [(CleanInval, 0x1000, 64), (Inval, 0x1040, 0xc0)]
            );
        }
        assert_eq!(cpu(64, 0x1010, 0xf0, Direction::ToDevice), []);
    }

    #[test]
    fn unaligned_end() {
        // 0x1000 .. 0x10f1: the last line (0x10c0) is shared with 15 bytes after the buffer.
        for dir in ALL {
            assert_eq!(dev(64, 0x1000, 0xf1, dir), [(Clean, 0x1000, 0x100)]);
        }
        for dir in READS_BACK {
            assert_eq!(
                cpu(64, 0x1000, 0xf1, dir),
                [(Inval, 0x1000, 0xc0), (CleanInval, 0x10c0, 64)]
            );
        }
    }

    #[test]
    fn unaligned_both_ends() {
        // 0x1020 .. 0x10e0 with 64-byte lines: partial 0x1000, whole 0x1040 and 0x1080,
        // partial 0x10c0.
        assert_eq!(
            cpu(64, 0x1020, 0xc0, Direction::FromDevice),
            [
                (CleanInval, 0x1000, 64),
                (Inval, 0x1040, 0x80),
                (CleanInval, 0x10c0, 64)
            ]
        );
        // Two partial lines and nothing between.
        assert_eq!(
            cpu(64, 0x1020, 0x40, Direction::Bidirectional),
            [(CleanInval, 0x1000, 64), (CleanInval, 0x1040, 64)]
        );
        assert_eq!(
            dev(64, 0x1020, 0x40, Direction::FromDevice),
            [(Clean, 0x1000, 0x80)]
        );
    }

    #[test]
    fn inside_one_line() {
        // 8 bytes in the middle of the line at 0x2000: one operation, not two (Linux's
        // dcache_inval_poc would clean+invalidate that line twice).
        for dir in ALL {
            assert_eq!(dev(64, 0x2010, 8, dir), [(Clean, 0x2000, 64)]);
        }
        for dir in READS_BACK {
            assert_eq!(cpu(64, 0x2010, 8, dir), [(CleanInval, 0x2000, 64)]);
        }
        // Starting on the line but ending inside it: still partial.
        assert_eq!(
            cpu(64, 0x2000, 8, Direction::FromDevice),
            [(CleanInval, 0x2000, 64)]
        );
        // Ending exactly at the line's end but starting inside it.
        assert_eq!(
            cpu(64, 0x2038, 8, Direction::FromDevice),
            [(CleanInval, 0x2000, 64)]
        );
        // Exactly one whole line.
        assert_eq!(
            cpu(64, 0x2000, 64, Direction::FromDevice),
            [(Inval, 0x2000, 64)]
        );
    }

    #[test]
    fn zero_length_does_nothing() {
        for dir in ALL {
            assert_eq!(dev(64, 0x1234, 0, dir), []);
            assert_eq!(cpu(64, 0x1234, 0, dir), []);
        }
        // Even at the very top of the address space.
        assert_eq!(cpu(64, usize::MAX, 0, Direction::FromDevice), []);
    }

    #[test]
    fn top_of_the_address_space() {
        let top_line = usize::MAX - 63;
        assert_eq!(
            cpu(64, top_line - 0x40, 0x80, Direction::FromDevice),
            [(Inval, top_line - 0x40, 0x80)]
        );
        assert_eq!(
            cpu(64, top_line + 8, 56, Direction::FromDevice),
            [(CleanInval, top_line, 64)]
        );
        assert_eq!(
            dev(64, usize::MAX, 1, Direction::ToDevice),
            [(Clean, top_line, 64)]
        );
        let mut r = Recorder::new(64);
        assert_eq!(
            for_device(&mut r, usize::MAX, 2, Direction::ToDevice),
            Err(MaintError::Wraps {
                va: usize::MAX,
                len: 2
            })
        );
        // The whole address space rounded out to lines is one byte too long for a usize.
        assert_eq!(
            for_cpu(&mut r, 0, usize::MAX, Direction::FromDevice),
            Err(MaintError::Wraps {
                va: 0,
                len: usize::MAX
            })
        );
        assert!(r.calls.is_empty());
    }

    #[test]
    fn bad_line_size_is_refused() {
        let mut r = Recorder::new(48);
        let e = for_device(&mut r, 0x1000, 0x100, Direction::ToDevice).unwrap_err();
        assert_eq!(e, MaintError::BadLineSize { line: 48 });
        assert_eq!(format!("{e}"), "cache line size 48 is not a power of two");
        let mut r = Recorder::new(0);
        assert!(for_cpu(&mut r, 0x1000, 0x100, Direction::FromDevice).is_err());
        assert!(r.calls.is_empty());
        let e = MaintError::Wraps {
            va: 0xffff_ffff_ffff_fff0,
            len: 0x20,
        };
        assert_eq!(
            format!("{e}"),
            "buffer 0xfffffffffffffff0 + 0x20, rounded out to cache lines, wraps the address space"
        );
    }

    #[test]
    fn coherent_devices_need_nothing() {
        assert!(needs_maintenance(false));
        assert!(!needs_maintenance(true));
        assert_eq!(format!("{}", Direction::FromDevice), "from-device");
    }

    /// The expected operation on each line, stated line by line (the model): before the device,
    /// clean every touched line; after it, for from-device and bidirectional, invalidate a line
    /// wholly inside the buffer and clean+invalidate one that is not.
    fn model(
        line: usize,
        va: usize,
        len: usize,
        for_dev: bool,
        dir: Direction,
    ) -> BTreeMap<usize, Op> {
        let mut m = BTreeMap::new();
        if len == 0 || (!for_dev && dir == Direction::ToDevice) {
            return m;
        }
        let end = va + len;
        let mut l = va / line * line;
        while l < end {
            let op = if for_dev {
                Clean
            } else if l >= va && l + line <= end {
                Inval
            } else {
                CleanInval
            };
            m.insert(l, op);
            l += line;
        }
        m
    }

    /// Expands recorded calls into per-line operations, failing on a misaligned call or on a
    /// line operated on twice.
    fn per_line(line: usize, calls: &[(Op, usize, usize)]) -> BTreeMap<usize, Op> {
        let mut m = BTreeMap::new();
        for &(op, va, len) in calls {
            assert!(
                va % line == 0 && len % line == 0 && len > 0,
                "misaligned call {op:?} {va:#x} {len:#x}"
            );
            for l in (va..va + len).step_by(line) {
                assert!(
                    m.insert(l, op).is_none(),
                    "line {l:#x} operated on twice: {calls:?}"
                );
            }
        }
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn every_line_gets_exactly_its_operation(
            shift in 4u32..8,
            va in 0usize..0x4000,
            len in 0usize..0x800,
            d in 0usize..3,
        ) {
            let line = 1usize << shift;
            let dir = ALL[d];
            let got_dev = per_line(line, &dev(line, va, len, dir));
            prop_assert_eq!(got_dev, model(line, va, len, true, dir));
            let calls = cpu(line, va, len, dir);
            let got_cpu = per_line(line, &calls);
            prop_assert_eq!(got_cpu, model(line, va, len, false, dir));
            // Ascending and merged: at most three calls.
            prop_assert!(calls.len() <= 3);
            prop_assert!(calls.windows(2).all(|w| w[0].1 + w[0].2 <= w[1].1));
        }
    }
}

/// The CPU's data cache to the point of coherency, through the architecture's by-line operations:
/// the line size is read from CTR once, by [`PocOps::new`], and one DSB ends each request
/// ([`CacheOps::complete`]).
#[cfg(target_os = "none")]
pub struct PocOps {
    line: usize,
}

#[cfg(target_os = "none")]
impl PocOps {
    #[inline(always)]
    pub fn new() -> PocOps {
        PocOps { line: crate::arch::cache::line_size() }
    }
}

#[cfg(target_os = "none")]
impl Default for PocOps {
    fn default() -> PocOps {
        PocOps::new()
    }
}

// `len / self.line`: the contract gives whole lines, and `self.line` is a power of two (checked
// by `Lines::of` before any operation), so the division is a shift.
#[cfg(target_os = "none")]
impl CacheOps for PocOps {
    #[inline(always)]
    fn line_size(&self) -> usize {
        self.line
    }

    #[inline(always)]
    fn clean(&mut self, va: usize, len: usize) {
        crate::arch::cache::clean_lines(va, len >> self.line.trailing_zeros(), self.line)
    }

    #[inline(always)]
    fn invalidate(&mut self, va: usize, len: usize) {
        crate::arch::cache::invalidate_lines(va, len >> self.line.trailing_zeros(), self.line)
    }

    #[inline(always)]
    fn clean_invalidate(&mut self, va: usize, len: usize) {
        crate::arch::cache::clean_invalidate_lines(va, len >> self.line.trailing_zeros(), self.line)
    }

    #[inline(always)]
    fn complete(&mut self) {
        crate::arch::cache::dsb()
    }
}
