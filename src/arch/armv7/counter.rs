//! The generic timer's physical counter. Under QEMU with `-icount shift=0` the counter advances one
//! nanosecond of virtual time per guest instruction, which is what the benchmarks count.
//! PL1 may read it: the boot assembly sets CNTHCTL.PL1PCTEN when it enters in HYP mode.

use aarch32_cpu::register::{CntPct, Cntfrq};

/// Current count. The ISB keeps the read from being hoisted above earlier instructions.
#[inline(always)]
pub fn read() -> u64 {
    aarch32_cpu::asm::isb();
    CntPct::read().0
}

/// Counter frequency in Hz, as the firmware or QEMU programmed CNTFRQ.
pub fn frequency() -> u64 {
    u64::from(Cntfrq::read().0)
}

/// Arms the virtual timer to assert its interrupt (the DT timer node's third line) `ticks`
/// counter ticks from now; [`virtual_timer_stop`] turns it off. Used by the interrupt tests.
pub fn virtual_timer_start(ticks: u32) {
    // SAFETY: the virtual timer is PL1's own (no other user in the kernel); CNTV_TVAL then
    // CNTV_CTL.ENABLE with IMASK clear.
    unsafe {
        core::arch::asm!(
            "mcr p15, 0, {t}, c14, c3, 0",
            "mcr p15, 0, {c}, c14, c3, 1",
            "isb",
            t = in(reg) ticks, c = in(reg) 1u32,
            options(nomem, nostack, preserves_flags)
        )
    };
}

/// Turns the virtual timer off, which deasserts its interrupt.
pub fn virtual_timer_stop() {
    // SAFETY: as in `virtual_timer_start`; ENABLE clear.
    unsafe { core::arch::asm!("mcr p15, 0, {}, c14, c3, 1", "isb", in(reg) 0u32, options(nomem, nostack, preserves_flags)) };
}
