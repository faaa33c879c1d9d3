//! The architecture interface. Generic code uses only what is re-exported here; each architecture
//! implements it in its own folder:
//!
//! - `NAME`;
//! - `cpu::{mpidr, midr, exception_level_name, running_level_name, wait_forever,
//!   undefined_instruction}`; for SMP `cpu::{index, set_index}` (the kernel's CPU number in a
//!   per-CPU register), `cpu::{send_event, wait_for_event}`, `cpu::secondary_entry` (where
//!   PSCI starts a secondary: `secondary_entry` in the boot assembly) and
//!   `cpu::{secondary_trampoline, TRAMPOLINE_PARAMS}` (where a CPU released without an argument,
//!   by a spin table or a BCM2836 mailbox, starts: it loads its parameters from that static);
//! - `counter::{read, frequency}`: the generic timer's physical count;
//!   `counter::{virtual_timer_start, virtual_timer_stop}`: the virtual timer (interrupt tests);
//! - `cache::{line_size, clean, invalidate, clean_invalidate}` over virtual address ranges (to the
//!   point of coherency), `cache::{dsb, isb}`, and `cache::zero_pages` (whole pages of Normal
//!   memory, the fastest way the architecture has);
//! - `mmu::{KERNEL_TABLES, enable, switch, enabled, CpuTlb}`: the translation regime the generic
//!   `mm::kmap` builds its tables for, and the CPU's TLB maintenance (broadcast to every CPU);
//!   `mmu::secondary_regs`: the registers a secondary loads to join that regime; `mmu::pa_bits`:
//!   the CPU's physical address size;
//! - `probe::{read_u64, write_u64, Fault}`: accesses that may fault, for tests;
//! - `exceptions::TrapFrame` and the vector table (installed by the boot assembly), whose IRQ
//!   vector calls `crate::irq::dispatch`;
//! - `irq::{disable, enable, restore, enabled}`: this CPU's IRQ mask (masked except while the
//!   `irq` layer waits for an interrupt);
//! - `semihosting::exit`: returns only when no semihosting host answered the trap.

#[cfg(target_arch = "aarch64")]
#[path = "aarch64/mod.rs"]
mod imp;

#[cfg(target_arch = "arm")]
#[path = "armv7/mod.rs"]
mod imp;

pub use imp::*;
