//! CPU identification and control.

use aarch64_cpu::registers::{Readable, MIDR_EL1, MPIDR_EL1};

/// MPIDR affinity of the calling CPU (Aff3..Aff0 packed as in the register).
pub fn mpidr() -> u64 {
    MPIDR_EL1.get() & 0xff_00ff_ffff
}

pub fn midr() -> u64 {
    MIDR_EL1.get()
}

/// Human name of the exception level the loader entered us at (the boot assembly drops to EL1).
pub fn exception_level_name(el: usize) -> &'static str {
    match el {
        3 => "EL3",
        2 => "EL2",
        1 => "EL1",
        _ => "EL?",
    }
}

/// The exception level the kernel runs at (always EL1 after the boot assembly).
pub fn running_level_name() -> &'static str {
    let el = (aarch64_cpu::registers::CurrentEL.get() >> 2) & 3;
    exception_level_name(el as usize)
}

/// Stop this CPU for good, with interrupts masked.
pub fn wait_forever() -> ! {
    loop {
        // SAFETY: masking interrupts and waiting has no memory effects.
        unsafe { core::arch::asm!("msr daifset, #0xf", "wfe", options(nomem, nostack)) };
    }
}

/// Execute a permanently undefined instruction (`udf #0`), for the crash-report tests.
pub fn undefined_instruction() {
    // SAFETY: raises an undefined-instruction exception, which the handler reports; never returns
    // normally.
    unsafe { core::arch::asm!("udf #0", options(nomem, nostack)) };
}
