//! CPU interrupt masking (PSTATE.I). The kernel runs with IRQs masked; the generic `irq` layer
//! unmasks them only while a driver waits for one.

/// Masks IRQs on this CPU; returns whether they were unmasked before (for [`restore`]).
#[inline(always)]
pub fn disable() -> bool {
    let daif: u64;
    // SAFETY: reading DAIF and setting its I bit only changes this CPU's interrupt mask.
    unsafe { core::arch::asm!("mrs {}, daif", "msr daifset, #2", out(reg) daif, options(nomem, nostack, preserves_flags)) };
    daif & (1 << 7) == 0
}

/// Unmasks IRQs on this CPU. Pending interrupts are taken from the next instruction on.
#[inline(always)]
pub fn enable() {
    // SAFETY: clearing DAIF.I only changes this CPU's interrupt mask; the vector table is
    // installed at boot, so an interrupt taken now reaches `irq::dispatch`.
    unsafe { core::arch::asm!("msr daifclr, #2", "isb", options(nomem, nostack, preserves_flags)) };
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
    let daif: u64;
    // SAFETY: reading DAIF has no side effects.
    unsafe { core::arch::asm!("mrs {}, daif", out(reg) daif, options(nomem, nostack, preserves_flags)) };
    daif & (1 << 7) == 0
}
