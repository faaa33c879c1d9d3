//! ARMv7-A support (Cortex-A7/A15: the Virtualization and Large Physical Address Extensions are
//! assumed), running in SVC mode in A32 state.

pub mod cache;
pub mod counter;
pub mod cpu;
pub mod exceptions;
pub mod irq;
pub mod mmu;
pub mod probe;
pub mod semihosting;

// `raw`: the file is plain assembly, whose register lists use braces.
core::arch::global_asm!(include_str!("../../../boot/armv7.s"), options(raw));

pub const NAME: &str = "armv7";
