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
