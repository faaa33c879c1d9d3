//! `memcpy` for the kernel, replacing compiler-builtins' generic one.
//!
//! The size-optimised build moves every value larger than a few words with a call to `memcpy`
//! (results of the DMA API, buffer descriptions handed between back ends), so its cost is on the
//! measured fast paths: compiler-builtins' version spends some 30 instructions on set-up and 4 per
//! 8 bytes, about 80 for a 72-byte value. This one copies 32 bytes per 4 instructions once both
//! addresses are 8-byte aligned (moves of Rust values are, or are equally misaligned: the payload
//! behind an enum's tag byte, brought to alignment a byte at a time), with at most three tail
//! steps.
//!
//! Addresses misaligned against each other go a byte at a time: this memcpy may run before the
//! MMU is on, when all of memory is Device memory and unaligned accesses fault, and the kernel
//! copies no large buffers misaligned so on a fast path.

/// Copies `n` bytes from `src` to `dest` (which must not overlap); returns `dest`.
///
/// # Safety
/// The C contract: `src .. src + n` readable, `dest .. dest + n` writable, not overlapping.
#[unsafe(no_mangle)]
#[unsafe(naked)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // x0 stays `dest` for the return value; x3 walks the destination.
    core::arch::naked_asm!(
        "mov x3, x0",
        "orr x4, x0, x1",
        "tst x4, #7",
        "b.ne 10f",
        "9:",
        // 32 bytes per iteration.
        "lsr x4, x2, #5",
        "cbz x4, 2f",
        "1:",
        "ldp x5, x6, [x1]",
        "ldp x7, x8, [x1, #16]",
        "add x1, x1, #32",
        "stp x5, x6, [x3]",
        "stp x7, x8, [x3, #16]",
        "add x3, x3, #32",
        "subs x4, x4, #1",
        "b.ne 1b",
        // The tail: 16, 8, then single bytes.
        "2:",
        "tbz x2, #4, 3f",
        "ldp x5, x6, [x1], #16",
        "stp x5, x6, [x3], #16",
        "3:",
        "tbz x2, #3, 4f",
        "ldr x5, [x1], #8",
        "str x5, [x3], #8",
        "4:",
        "and x2, x2, #7",
        "5:",
        "cbz x2, 7f",
        "6:",
        "ldrb w5, [x1], #1",
        "strb w5, [x3], #1",
        "subs x2, x2, #1",
        "b.ne 6b",
        "7:",
        "ret",
        // Misaligned. Equally so (a value behind an enum's tag byte): single bytes up to the
        // alignment, then the loops above; else all of it a byte at a time.
        "10:",
        "eor x4, x0, x1",
        "tst x4, #7",
        "b.ne 5b",
        "neg x4, x0",
        "and x4, x4, #7",
        "cmp x4, x2",
        "csel x4, x4, x2, lo",
        "sub x2, x2, x4",
        "cbz x4, 9b",
        "11:",
        "ldrb w5, [x1], #1",
        "strb w5, [x3], #1",
        "subs x4, x4, #1",
        "b.ne 11b",
        "b 9b",
    )
}
