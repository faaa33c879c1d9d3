//! Data-cache maintenance by virtual address to the point of coherency, and barriers.
//!
//! Two forms: [`clean`] / [`invalidate`] / [`clean_invalidate`] take any byte range, read the line
//! size and end with a DSB (for one-off users such as the MMU code); the `*_lines` forms take whole
//! lines and the line size from the caller and issue no barrier, so that the DMA layer reads CTR_EL0
//! once and issues one DSB per maintenance request however many sub-ranges it has
//! (`dma::maint::PocOps`). Their loops issue four operations per iteration: under QEMU's `--icount`
//! the loop's own instructions would otherwise cost twice the cache operations.

/// Smallest data-cache line size in bytes of any cache the CPU has (CTR_EL0.DminLine, bits 19:16,
/// log2 of the number of 4-byte words). aarch64-cpu has no CTR_EL0 accessor, hence the `mrs`.
#[inline(always)]
pub fn line_size() -> usize {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effects; EL1 may read it.
    unsafe { core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    4 << ((ctr >> 16) & 0xf)
}

macro_rules! lines_op {
    ($name:ident, $op:literal, $doc:literal) => {
        #[doc = $doc]
        ///
        /// `first` is the start of a line, `count` the number of lines from it, `line` the line
        /// size ([`line_size`]); the lines must be mapped. No barrier: the caller issues [`dsb`]
        /// before the result is relied on.
        #[inline(always)]
        pub fn $name(first: usize, count: usize, line: usize) {
            // The whole loop is one asm block: inlined into many callers, a Rust loop around
            // single instructions is what the size-optimising machine outliner likes to turn
            // into calls, which would cost a call per line.
            // SAFETY: cache maintenance by VA does not change memory contents as seen by the
            // program (clean) or discards lines the caller has declared it owns (invalidate);
            // the addresses are mapped (the caller's contract). Not `nomem`: the compiler must not
            // move the caller's accesses to the buffer across the operation. After the top line
            // of the address space the address wraps, and is never used.
            unsafe {
                core::arch::asm!(
                    "cbz {quads}, 3f",
                    "2:",
                    concat!("dc ", $op, ", {a}"),
                    "add {a}, {a}, {line}",
                    concat!("dc ", $op, ", {a}"),
                    "add {a}, {a}, {line}",
                    concat!("dc ", $op, ", {a}"),
                    "add {a}, {a}, {line}",
                    concat!("dc ", $op, ", {a}"),
                    "add {a}, {a}, {line}",
                    "subs {quads}, {quads}, #1",
                    "b.ne 2b",
                    "3:",
                    "cbz {rest}, 5f",
                    "4:",
                    concat!("dc ", $op, ", {a}"),
                    "add {a}, {a}, {line}",
                    "subs {rest}, {rest}, #1",
                    "b.ne 4b",
                    "5:",
                    a = inout(reg) first => _,
                    line = in(reg) line,
                    quads = inout(reg) count / 4 => _,
                    rest = inout(reg) count % 4 => _,
                    options(nostack)
                )
            };
        }
    };
}

lines_op!(clean_lines, "cvac", "Clean `count` lines from `first` to the point of coherency.");
lines_op!(invalidate_lines, "ivac", "Invalidate `count` lines from `first`: dirty data in them is lost.");
lines_op!(clean_invalidate_lines, "civac", "Clean and invalidate `count` lines from `first` to the point of coherency.");

/// Zeroes `[start, start + len)`: whole pages (`start` and `len` multiples of 4 KiB) of Normal
/// memory, cacheable or not, mapped writable (never Device memory: `dc zva` faults there). The
/// zeroes land in the cache or in memory as the mapping's attributes say; the caller does any
/// maintenance a non-coherent observer needs, as after ordinary stores.
///
/// `dc zva` (as Linux's `clear_page`) zeroes one block of DCZID_EL0.BS bytes (at most 2 KiB, so
/// a page is whole blocks) per instruction: about 136 instructions per page with 64-byte blocks,
/// where `memset` takes some 1,500. When DCZID_EL0.DZP prohibits it, 64-byte groups of
/// `stp xzr` do the work.
///
/// # Safety
/// The range must be mapped writable, as Normal memory, and owned by the caller: nothing else may
/// rely on its contents.
#[inline(always)]
pub unsafe fn zero_pages(start: usize, len: usize) {
    let dczid: u64;
    // SAFETY: reading DCZID_EL0 has no side effects; EL1 may read it.
    unsafe { core::arch::asm!("mrs {}, dczid_el0", out(reg) dczid, options(nomem, nostack, preserves_flags)) };
    // log2 of the block size in bytes: BS is log2 of the number of 4-byte words.
    let shift = 2 + (dczid & 0xf) as u32;
    let blocks = len >> shift;
    if blocks == 0 {
        return;
    }
    if dczid & (1 << 4) != 0 {
        // SAFETY: the caller owns the pages, mapped writable (the contract); 64 bytes per
        // iteration, `len / 64` iterations. Not `nomem`: the compiler must not move the caller's
        // accesses to the pages across the stores.
        unsafe {
            core::arch::asm!(
                "2:",
                "stp xzr, xzr, [{p}]",
                "stp xzr, xzr, [{p}, #16]",
                "stp xzr, xzr, [{p}, #32]",
                "stp xzr, xzr, [{p}, #48]",
                "add {p}, {p}, #64",
                "subs {n}, {n}, #1",
                "b.ne 2b",
                p = inout(reg) start => _,
                n = inout(reg) len / 64 => _,
                options(nostack)
            )
        };
    } else if blocks.is_multiple_of(16) {
        // SAFETY: the caller owns the pages, mapped writable as Normal memory (the contract);
        // `dc zva` stores zeroes to exactly the block holding the address, and the loop covers
        // `blocks` whole blocks from `start` (aligned, being page aligned), sixteen at a time.
        // Not `nomem`, as above.
        unsafe {
            core::arch::asm!(
                "2:",
                ".rept 16",
                "dc zva, {p}",
                "add {p}, {p}, {b}",
                ".endr",
                "subs {n}, {n}, #1",
                "b.ne 2b",
                p = inout(reg) start => _,
                n = inout(reg) blocks / 16 => _,
                b = in(reg) 1usize << shift,
                options(nostack)
            )
        };
    } else {
        // SAFETY: as above, one block at a time (blocks of 512 bytes or more).
        unsafe {
            core::arch::asm!(
                "2:",
                "dc zva, {p}",
                "add {p}, {p}, {b}",
                "subs {n}, {n}, #1",
                "b.ne 2b",
                p = inout(reg) start => _,
                n = inout(reg) blocks => _,
                b = in(reg) 1usize << shift,
                options(nostack)
            )
        };
    }
}

#[path = "../cache_ranges.rs"]
mod ranges;
pub use ranges::{clean, clean_invalidate, invalidate};

/// Full-system data synchronisation barrier.
#[inline(always)]
pub fn dsb() {
    // SAFETY: a barrier has no operands.
    unsafe { core::arch::asm!("dsb sy", options(nostack, preserves_flags)) };
}

#[inline(always)]
pub fn isb() {
    // SAFETY: a barrier has no operands.
    unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
}
