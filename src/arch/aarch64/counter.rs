//! The generic timer's physical counter. Under QEMU with `-icount shift=0` the counter advances one
//! nanosecond of virtual time per guest instruction, which is what the benchmarks count.

use aarch64_cpu::registers::{Readable, CNTFRQ_EL0, CNTPCT_EL0};

/// Current count. The ISB keeps the read from being hoisted above earlier instructions.
#[inline(always)]
pub fn read() -> u64 {
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
    CNTPCT_EL0.get()
}

/// Counter frequency in Hz, as the firmware or QEMU programmed CNTFRQ_EL0.
pub fn frequency() -> u64 {
    CNTFRQ_EL0.get()
}

/// Arms the virtual timer to assert its interrupt (the DT timer node's third line) `ticks`
/// counter ticks from now; [`virtual_timer_stop`] turns it off. Used by the interrupt tests.
pub fn virtual_timer_start(ticks: u32) {
    // SAFETY: the virtual timer is EL1's own (no other user in the kernel); CNTV_TVAL then
    // CNTV_CTL.ENABLE with IMASK clear.
    unsafe { core::arch::asm!("msr cntv_tval_el0, {}", "msr cntv_ctl_el0, {}", "isb", in(reg) u64::from(ticks), in(reg) 1u64, options(nomem, nostack, preserves_flags)) };
}

/// Turns the virtual timer off, which deasserts its interrupt.
pub fn virtual_timer_stop() {
    // SAFETY: as in `virtual_timer_start`; ENABLE clear.
    unsafe { core::arch::asm!("msr cntv_ctl_el0, xzr", "isb", options(nomem, nostack, preserves_flags)) };
}
