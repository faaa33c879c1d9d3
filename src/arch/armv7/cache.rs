//! Data-cache maintenance by virtual address to the point of coherency, and barriers.
//!
//! The operations are written as raw `mcr`s rather than with aarch32-cpu's DCCMVAC/DCIMVAC/DCCIMVAC
//! writers because those are declared `nomem`: the compiler could then move the caller's stores to
//! the buffer past the clean, which would leave them dirty in the cache.
//!
//! Two forms: [`clean`] / [`invalidate`] / [`clean_invalidate`] take any byte range, read the line
//! size and end with a DSB (for one-off users such as the MMU code); the `*_lines` forms take whole
//! lines and the line size from the caller and issue no barrier, so that the DMA layer reads CTR
//! once and issues one DSB per maintenance request however many sub-ranges it has
//! (`dma::maint::PocOps`). Their loops issue four operations per iteration: under QEMU's `--icount`
//! the loop's own instructions would otherwise cost twice the cache operations.

use aarch32_cpu::register::Ctr;

/// Smallest data-cache line size in bytes of any cache the CPU has (CTR.DminLine, bits 19:16, log2
/// of the number of 4-byte words).
#[inline(always)]
pub fn line_size() -> usize {
    4 << ((Ctr::read().0 >> 16) & 0xf)
}

macro_rules! lines_op {
    ($name:ident, $crm:literal, $doc:literal) => {
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
            // the addresses are mapped (the caller's contract). Not `nomem`: see the module
            // documentation. After the top line the address wraps, and is never used.
            unsafe {
                core::arch::asm!(
                    "cmp {quads}, #0",
                    "beq 3f",
                    "2:",
                    concat!("mcr p15, 0, {a}, c7, ", $crm, ", 1"),
                    "add {a}, {a}, {line}",
                    concat!("mcr p15, 0, {a}, c7, ", $crm, ", 1"),
                    "add {a}, {a}, {line}",
                    concat!("mcr p15, 0, {a}, c7, ", $crm, ", 1"),
                    "add {a}, {a}, {line}",
                    concat!("mcr p15, 0, {a}, c7, ", $crm, ", 1"),
                    "add {a}, {a}, {line}",
                    "subs {quads}, {quads}, #1",
                    "bne 2b",
                    "3:",
                    "cmp {rest}, #0",
                    "beq 5f",
                    "4:",
                    concat!("mcr p15, 0, {a}, c7, ", $crm, ", 1"),
                    "add {a}, {a}, {line}",
                    "subs {rest}, {rest}, #1",
                    "bne 4b",
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

lines_op!(clean_lines, "c10", "Clean `count` lines from `first` to the point of coherency (DCCMVAC).");
lines_op!(invalidate_lines, "c6", "Invalidate `count` lines from `first` (DCIMVAC): dirty data in them is lost.");
lines_op!(clean_invalidate_lines, "c14", "Clean and invalidate `count` lines from `first` to the point of coherency (DCCIMVAC).");

/// Zeroes `[start, start + len)`: whole pages (`start` and `len` multiples of 4 KiB) of Normal
/// memory, cacheable or not, mapped writable. The zeroes land in the cache or in memory as the
/// mapping's attributes say; the caller does any maintenance a non-coherent observer needs, as
/// after ordinary stores.
///
/// Armv7 has no zeroing cache operation; four-register `stm`s, 64 bytes per loop iteration, take
/// about 400 instructions per page, a fraction of what `memset` built for size does.
///
/// # Safety
/// The range must be mapped writable, as Normal memory, and owned by the caller: nothing else may
/// rely on its contents.
#[inline(always)]
pub unsafe fn zero_pages(start: usize, len: usize) {
    if len < 64 {
        return;
    }
    // SAFETY: the caller owns the pages, mapped writable (the contract); the loop stores zeroes to exactly
    // `len / 64` groups of 64 bytes from `start`. Not `nomem`: the compiler must not move the
    // caller's accesses to the pages across the stores.
    unsafe {
        core::arch::asm!(
            "2:",
            "stm {p}!, {{r0, r1, r2, r3}}",
            "stm {p}!, {{r0, r1, r2, r3}}",
            "stm {p}!, {{r0, r1, r2, r3}}",
            "stm {p}!, {{r0, r1, r2, r3}}",
            "subs {n}, {n}, #1",
            "bne 2b",
            p = inout(reg) start => _,
            n = inout(reg) len / 64 => _,
            in("r0") 0usize,
            in("r1") 0usize,
            in("r2") 0usize,
            in("r3") 0usize,
            options(nostack)
        )
    };
}

#[path = "../cache_ranges.rs"]
mod ranges;
pub use ranges::{clean, clean_invalidate, invalidate};

/// Full-system data synchronisation barrier.
#[inline(always)]
pub fn dsb() {
    aarch32_cpu::asm::dsb();
}

#[inline(always)]
pub fn isb() {
    aarch32_cpu::asm::isb();
}
