//! Arm semihosting, only for leaving QEMU with a status. The trap is `hlt #0xf000`; when no
//! semihosting host is attached the instruction is undefined, and the exception handler recognises
//! the trap's address and resumes after it (see `exceptions`), so calling this on real hardware is
//! safe: it simply returns.

const SYS_EXIT: u64 = 0x18;
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x20026;

core::arch::global_asm!(
    ".section .text.semihosting, \"ax\"",
    ".global semihosting_trap",
    "semihosting_trap:",
    "    hlt #0xf000",
    "    ret",
);

extern "C" {
    fn semihosting_trap(op: u64, param: *const u64) -> u64;
}

/// Address of the trap instruction, for the exception handler.
pub fn trap_address() -> usize {
    semihosting_trap as *const () as usize
}

/// Exit QEMU with `code`. Returns only if no semihosting host handled the call.
pub fn exit(code: u32) {
    let block = [ADP_STOPPED_APPLICATION_EXIT, code as u64];
    // SAFETY: SYS_EXIT reads the two-word parameter block, which lives on this stack frame for the
    // duration of the call; without a host the handler skips the trap and the call returns.
    unsafe { semihosting_trap(SYS_EXIT, block.as_ptr()) };
}
