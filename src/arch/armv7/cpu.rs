//! CPU identification and control.

use aarch32_cpu::register::{Cpsr, Midr, Mpidr};

/// CPSR mode field values (the boot assembly passes the entry mode in this encoding).
pub const MODE_SVC: usize = 0x13;
pub const MODE_HYP: usize = 0x1a;

/// MPIDR affinity of the calling CPU (Aff2..Aff0 packed as in the register).
pub fn mpidr() -> u64 {
    u64::from(Mpidr::read().0 & 0x00ff_ffff)
}

/// MIDR, widened so that generic code handles both architectures alike.
pub fn midr() -> u64 {
    u64::from(Midr::read().raw_value())
}

/// Name of a processor mode given as CPSR mode bits: the mode the loader entered us in (the boot
/// assembly then runs the kernel in SVC), or the mode field of a saved CPSR.
pub fn exception_level_name(mode: usize) -> &'static str {
    match mode {
        0x10 => "USR",
        0x11 => "FIQ",
        0x12 => "IRQ",
        MODE_SVC => "SVC",
        0x16 => "MON",
        0x17 => "ABT",
        MODE_HYP => "HYP",
        0x1b => "UND",
        0x1f => "SYS",
        _ => "mode?",
    }
}

/// The mode the kernel runs in (SVC after the boot assembly; another mode inside an exception
/// handler).
pub fn running_level_name() -> &'static str {
    exception_level_name((Cpsr::read().raw_value() & 0x1f) as usize)
}

/// Stop this CPU for good, with interrupts masked.
pub fn wait_forever() -> ! {
    loop {
        // SAFETY: masking interrupts and waiting has no memory effects.
        unsafe { core::arch::asm!("cpsid aif", "wfe", options(nomem, nostack)) };
    }
}

/// Execute a permanently undefined instruction (`udf #0`), for the crash-report tests.
pub fn undefined_instruction() {
    // SAFETY: raises an undefined-instruction exception, which the handler reports; never returns
    // normally.
    unsafe { core::arch::asm!("udf #0", options(nomem, nostack)) };
}

/// This CPU's index in the kernel's numbering (0 = the boot CPU), kept in TPIDRPRW: the boot CPU
/// sets it with [`set_index`], secondaries in their entry code.
#[inline(always)]
pub fn index() -> usize {
    let v: u32;
    // SAFETY: reading TPIDRPRW has no side effects.
    unsafe { core::arch::asm!("mrc p15, 0, {}, c13, c0, 4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v as usize
}

/// Records this CPU's index (the boot CPU, once, before anything reads [`index`]).
pub fn set_index(i: usize) {
    // SAFETY: TPIDRPRW is the kernel's own per-CPU register; nothing else uses it.
    unsafe { core::arch::asm!("mcr p15, 0, {}, c13, c0, 4", in(reg) i as u32, options(nomem, nostack, preserves_flags)) };
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

/// The physical address a secondary CPU starts at, in A32 state (`secondary_entry` in the boot
/// assembly, which is A32 code: bit 0 clear; identity-mapped, so its address is its physical
/// address).
pub fn secondary_entry() -> u64 {
    extern "C" {
        fn secondary_entry();
    }
    (secondary_entry as *const () as usize as u64) & !1
}

/// The physical address of the `BootParams` of the next CPU released through the trampoline.
/// The boot CPU stores it, cleans it to the point of coherency (the released CPU reads it with the
/// MMU and caches off) and releases one CPU at a time.
pub static TRAMPOLINE_PARAMS: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

// CPUs released through the BCM2836 local mailboxes (or a spin table) start with no argument,
// unlike PSCI's context id: load the parameters' address the boot CPU left in TRAMPOLINE_PARAMS,
// then go on as a PSCI-started CPU (in HYP or SVC mode, which secondary_entry handles). A32 code,
// PC-relative (the add reads pc as its own address + 8), so it works with the MMU off.
core::arch::global_asm!(
    ".section .text.secondary_trampoline, \"ax\"",
    ".arm",
    ".global secondary_trampoline",
    ".type secondary_trampoline, %function",
    "secondary_trampoline:",
    "    movw r0, #:lower16:({params} - (.Ltrampoline_pc + 8))",
    "    movt r0, #:upper16:({params} - (.Ltrampoline_pc + 8))",
    ".Ltrampoline_pc:",
    "    add r0, pc, r0",
    "    ldr r0, [r0]",
    "    b secondary_entry",
    params = sym TRAMPOLINE_PARAMS,
);

/// The physical address a CPU released without an argument starts at, in A32 state: the
/// trampoline that loads [`TRAMPOLINE_PARAMS`] and continues at `secondary_entry`.
pub fn secondary_trampoline() -> u64 {
    extern "C" {
        fn secondary_trampoline();
    }
    (secondary_trampoline as *const () as usize as u64) & !1
}
