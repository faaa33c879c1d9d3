//! The architecture interface. Generic code uses only what is re-exported here; each architecture
//! implements it in its own folder:
//!
//! - `NAME`; `cpu::{cpu_id, midr, cpu_name, exception_level_name, wait_forever}`;
//! - `counter::{read, frequency}`: the generic timer's physical count;
//! - `cache::{line_size, clean, invalidate, clean_invalidate}` over virtual address ranges (to the
//!   point of coherency), `cache::{dsb, isb}`;
//! - `mmu::{early_enable, Mmu}`: identity-mapped kernel, linear map of RAM, ioremap, the page tables;
//! - `exceptions::TrapFrame` and the vector table (installed by the boot assembly);
//! - `semihosting::exit`: returns only when no semihosting host answered the trap.

#[cfg(target_arch = "aarch64")]
#[path = "aarch64/mod.rs"]
mod imp;

#[cfg(target_arch = "arm")]
#[path = "armv7/mod.rs"]
mod imp;

pub use imp::*;
