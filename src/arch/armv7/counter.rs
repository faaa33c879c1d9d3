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
