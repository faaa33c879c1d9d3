//! A test payload for the chain loader's own tests (tests/hil.rs), not for boards: it checks the
//! hand-over the loader promises (aarch64: x0 = a device tree, x1..x3 = 0; armv7: r0 = 0,
//! r1 = 0xc42, the machine type QEMU raspi2b and the Pi firmware pass, r2 = a device tree; both: a
//! 2 MiB-aligned load address) and exits through semihosting with 42 if all hold, 43 for bad
//! registers or DTB, 44 for a misaligned load address. Raw, without a kernel header, so it also
//! covers headerless payloads. It waits half a second before exiting: QEMU closes the console pty
//! when it exits, and Linux drops what the runner had not read yet (the loader's ACK line).
#![no_std]
#![no_main]

#[cfg(target_arch = "aarch64")]
core::arch::global_asm!(
    r#"
.section .text.head, "ax"
.global _start
_start:
    mov     x9, #43
    orr     x4, x1, x2
    orr     x4, x4, x3
    cbnz    x4, 1f
    ldr     w5, [x0]                    // FDT magic 0xd00dfeed, stored big-endian
    movz    w6, #0x0dd0
    movk    w6, #0xedfe, lsl #16
    cmp     w5, w6
    b.ne    1f
    mov     x9, #44
    adr     x7, _start
    tst     x7, #0x1fffff
    b.ne    1f
    mov     x9, #42
1:  mrs     x10, cntfrq_el0
    lsr     x10, x10, #1
    mrs     x11, cntpct_el0
    add     x11, x11, x10
3:  mrs     x12, cntpct_el0
    cmp     x12, x11
    b.lo    3b
    adr     x1, exit_block
    str     x9, [x1, #8]
    mov     x0, #0x18                   // SYS_EXIT, x1 = address of (ADP_Stopped_ApplicationExit, code)
    hlt     #0xf000
2:  wfe
    b       2b
.balign 8
exit_block:
    .quad   0x20026
    .quad   0
"#
);

#[cfg(target_arch = "arm")]
core::arch::global_asm!(
    r#"
.syntax unified
.arm
.section .text.head, "ax"
.global _start
_start:
    mov     r9, #43
    cmp     r0, #0
    bne     1f
    movw    r3, #0xc42
    cmp     r1, r3
    bne     1f
    ldr     r4, [r2]                    // FDT magic 0xd00dfeed, stored big-endian
    movw    r5, #0x0dd0
    movt    r5, #0xedfe
    cmp     r4, r5
    bne     1f
    mov     r9, #44
    adr     r6, _start
    movw    r7, #0xffff
    movt    r7, #0x1f
    tst     r6, r7
    bne     1f
    mov     r9, #42
1:  mrc     p15, 0, r10, c14, c0, 0     // CNTFRQ
    lsr     r10, r10, #1
    mrrc    p15, 0, r11, r12, c14       // CNTPCT (low word enough: wrap-safe difference)
3:  mrrc    p15, 0, r4, r12, c14
    sub     r4, r4, r11
    cmp     r4, r10
    blo     3b
    adr     r1, exit_block
    str     r9, [r1, #4]
    mov     r0, #0x20                   // SYS_EXIT_EXTENDED, r1 = address of (ApplicationExit, code)
    svc     #0x123456
2:  wfe
    b       2b
.balign 4
exit_block:
    .word   0x20026
    .word   0
"#
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
