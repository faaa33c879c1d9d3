//! Data-cache maintenance by virtual address to the point of coherency, and barriers.
//!
//! The operations are written as raw `mcr`s rather than with aarch32-cpu's DCCMVAC/DCIMVAC/DCCIMVAC
//! writers because those are declared `nomem`: the compiler could then move the caller's stores to
//! the buffer past the clean, which would leave them dirty in the cache.

use aarch32_cpu::register::Ctr;

/// Smallest data-cache line size in bytes of any cache the CPU has (CTR.DminLine, bits 19:16, log2
/// of the number of 4-byte words).
#[inline]
pub fn line_size() -> usize {
    4 << ((Ctr::read().0 >> 16) & 0xf)
}

macro_rules! by_line {
    ($name:ident, $crm:literal, $doc:literal) => {
        #[doc = $doc]
        #[inline]
        pub fn $name(start: usize, len: usize) {
            if len == 0 {
                return;
            }
            let line = line_size();
            let mut addr = start & !(line - 1);
            let end = start.saturating_add(len);
            while addr < end {
                // SAFETY: cache maintenance by VA does not change memory contents as seen by the
                // program (clean) or discards lines the caller has declared it owns (invalidate);
                // the address is mapped (the caller passes a range of its own mapping).
                unsafe { core::arch::asm!(concat!("mcr p15, 0, {}, c7, ", $crm, ", 1"), in(reg) addr, options(nostack)) };
                match addr.checked_add(line) {
                    Some(next) => addr = next,
                    None => break,
                }
            }
            dsb();
        }
    };
}

by_line!(
    clean,
    "c10",
    "Clean [start, start+len) to the point of coherency (DCCMVAC)."
);
by_line!(
    invalidate,
    "c6",
    "Invalidate [start, start+len) (DCIMVAC): dirty data in those lines is lost."
);
by_line!(
    clean_invalidate,
    "c14",
    "Clean and invalidate [start, start+len) to the point of coherency (DCCIMVAC)."
);

/// Full-system data synchronisation barrier.
#[inline(always)]
pub fn dsb() {
    aarch32_cpu::asm::dsb();
}

#[inline(always)]
pub fn isb() {
    aarch32_cpu::asm::isb();
}

