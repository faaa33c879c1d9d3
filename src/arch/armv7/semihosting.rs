//! Arm semihosting, only for leaving QEMU with a status. In A32 state the trap is `svc 0x123456`;
//! when no semihosting host is attached it is an ordinary supervisor call, and the exception handler
//! recognises its return address and resumes after it with r0 = -1 (see `exceptions`), so calling
//! this on real hardware is safe: it simply returns.

/// SYS_EXIT_EXTENDED: on AArch32 plain SYS_EXIT cannot carry a status code.
const SYS_EXIT_EXTENDED: u32 = 0x20;
const ADP_STOPPED_APPLICATION_EXIT: u32 = 0x20026;

// The SVC exception overwrites lr when it is taken from SVC mode (the kernel's mode), so the trap
// function keeps its return address on the stack; r4 keeps the stack 8-byte aligned.
core::arch::global_asm!(
    ".section .text.semihosting, \"ax\"",
    ".arm",
    ".global semihosting_trap",
    ".type semihosting_trap, %function",
    "semihosting_trap:",
    "    push {{r4, lr}}",
    "    svc #0x123456",
    "    pop {{r4, pc}}",
);

extern "C" {
    fn semihosting_trap(op: u32, param: *const u32) -> u32;
}

/// Address of the trap instruction (the `svc`), for the exception handler.
pub fn trap_address() -> usize {
    // The `push` before the `svc` is one A32 instruction.
    semihosting_trap as *const () as usize + 4
}

/// Exit QEMU with `code`. Returns only if no semihosting host handled the call.
pub fn exit(code: u32) {
    let block = [ADP_STOPPED_APPLICATION_EXIT, code];
    // SAFETY: SYS_EXIT_EXTENDED reads the two-word parameter block, which lives on this stack frame
    // for the duration of the call; without a host the handler skips the trap and the call returns.
    unsafe { semihosting_trap(SYS_EXIT_EXTENDED, block.as_ptr()) };
}
