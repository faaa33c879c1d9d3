//! Data-cache maintenance by virtual address to the point of coherency, and barriers.
//! The line size comes from CTR_EL0.DminLine (log2 of words), read once per call site loop.

/// Smallest data-cache line size in bytes of any cache the CPU has (CTR_EL0.DminLine, bits 19:16,
/// log2 of the number of 4-byte words). aarch64-cpu has no CTR_EL0 accessor, hence the `mrs`.
#[inline]
pub fn line_size() -> usize {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effects; EL1 may read it.
    unsafe { core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
    4 << ((ctr >> 16) & 0xf)
}

macro_rules! by_line {
    ($name:ident, $op:literal, $doc:literal) => {
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
                unsafe { core::arch::asm!(concat!("dc ", $op, ", {}"), in(reg) addr, options(nostack)) };
                addr += line;
            }
            dsb();
        }
    };
}

by_line!(clean, "cvac", "Clean [start, start+len) to the point of coherency.");
by_line!(invalidate, "ivac", "Invalidate [start, start+len): dirty data in those lines is lost.");
by_line!(clean_invalidate, "civac", "Clean and invalidate [start, start+len) to the point of coherency.");

/// Full-system data synchronisation barrier.
#[inline(always)]
pub fn dsb() {
    // SAFETY: a barrier has no operands.
    unsafe { core::arch::asm!("dsb sy", options(nostack)) };
}

#[inline(always)]
pub fn isb() {
    // SAFETY: a barrier has no operands.
    unsafe { core::arch::asm!("isb", options(nostack)) };
}

