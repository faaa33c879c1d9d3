//! AArch64 (ARMv8-A, EL1) support.

pub mod cache;
pub mod counter;
pub mod cpu;
pub mod exceptions;
pub mod irq;
pub mod mem;
pub mod mmu;
pub mod probe;
pub mod semihosting;

core::arch::global_asm!(include_str!("../../../boot/aarch64.s"));

pub const NAME: &str = "aarch64";
