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

/// This CPU's index in the kernel's numbering (0 = the boot CPU), kept in TPIDR_EL1: the boot CPU
/// sets it with [`set_index`], secondaries in their entry code.
#[inline(always)]
pub fn index() -> usize {
    let v: u64;
    // SAFETY: reading TPIDR_EL1 has no side effects.
    unsafe { core::arch::asm!("mrs {}, tpidr_el1", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v as usize
}

/// Records this CPU's index (the boot CPU, once, before anything reads [`index`]).
pub fn set_index(i: usize) {
    // SAFETY: TPIDR_EL1 is the kernel's own per-CPU register; nothing else uses it.
    unsafe { core::arch::asm!("msr tpidr_el1, {}", in(reg) i as u64, options(nomem, nostack, preserves_flags)) };
}

/// Wakes every CPU waiting in `wfe` (after the stores they wait for).
pub fn send_event() {
    // SAFETY: a barrier and an event; no memory effects beyond ordering.
    unsafe { core::arch::asm!("dsb ish", "sev", options(nostack, preserves_flags)) };
}

/// Waits for an event (or an interrupt); returns at once if one is pending.
pub fn wait_for_event() {
    // SAFETY: waiting has no memory effects.
    unsafe { core::arch::asm!("wfe", options(nomem, nostack, preserves_flags)) };
}

/// The physical address a secondary CPU starts at (`secondary_entry` in the boot assembly;
/// identity-mapped, so its address is its physical address).
pub fn secondary_entry() -> u64 {
    extern "C" {
        fn secondary_entry();
    }
    secondary_entry as *const () as usize as u64
}

/// The physical address of the `BootParams` of the next CPU released through the trampoline.
/// The boot CPU stores it, cleans it to the point of coherency (the released CPU reads it with the
/// MMU and caches off) and releases one CPU at a time.
pub static TRAMPOLINE_PARAMS: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

// Spin-table CPUs start with no argument (x0 = 0), unlike PSCI's context id: load the parameters'
// address the boot CPU left in TRAMPOLINE_PARAMS, then go on as a PSCI-started CPU. PC-relative,
// so it works at the physical address with the MMU off.
core::arch::global_asm!(
    ".section .text.secondary_trampoline, \"ax\"",
    ".global secondary_trampoline",
    "secondary_trampoline:",
    "    adrp x0, {params}",
    "    ldr x0, [x0, :lo12:{params}]",
    "    b secondary_entry",
    params = sym TRAMPOLINE_PARAMS,
);

/// The physical address a CPU released without an argument (spin-table) starts at: the
/// trampoline that loads [`TRAMPOLINE_PARAMS`] and continues at `secondary_entry`.
pub fn secondary_trampoline() -> u64 {
    extern "C" {
        fn secondary_trampoline();
    }
    secondary_trampoline as *const () as usize as u64
}
