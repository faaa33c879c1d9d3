//! CPU interrupt masking (CPSR.I). The kernel runs with IRQs masked; the generic `irq` layer
//! unmasks them only while a driver waits for one.

const CPSR_I: u32 = 1 << 7;

fn cpsr() -> u32 {
    let v: u32;
    // SAFETY: reading CPSR has no side effects.
    unsafe { core::arch::asm!("mrs {}, cpsr", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Masks IRQs on this CPU; returns whether they were unmasked before (for [`restore`]).
#[inline(always)]
pub fn disable() -> bool {
    let before = cpsr();
    // SAFETY: `cpsid i` only changes this CPU's interrupt mask.
    unsafe { core::arch::asm!("cpsid i", options(nomem, nostack, preserves_flags)) };
    before & CPSR_I == 0
}

/// Unmasks IRQs on this CPU. Pending interrupts are taken from the next instruction on.
#[inline(always)]
pub fn enable() {
    // SAFETY: `cpsie i` only changes this CPU's interrupt mask; the vector table and the IRQ mode
    // stack are set up at boot, so an interrupt taken now reaches `irq::dispatch`.
    unsafe { core::arch::asm!("cpsie i", "isb", options(nomem, nostack, preserves_flags)) };
}

/// Puts back the mask state [`disable`] returned.
#[inline(always)]
pub fn restore(were_enabled: bool) {
    if were_enabled {
        enable();
    }
}

/// Whether IRQs are unmasked on this CPU.
#[inline(always)]
pub fn enabled() -> bool {
    cpsr() & CPSR_I == 0
}
