//! Probing accesses that may fault, for tests that must show a mapping refuses an access (kernel
//! text is not writable, data is not executable, a device-owned buffer is not readable). Each probe
//! is a tiny assembly routine whose faulting instruction the exception handler recognises: it
//! records the fault status and resumes at `probe_fault_return`, which returns the error.

use super::exceptions::{decode_fsr, FaultKind, FaultRegs, TrapFrame};
use core::sync::atomic::{AtomicU32, Ordering};

core::arch::global_asm!(
    ".section .text.probe, \"ax\"",
    ".arm",
    ".global probe_read_u64",
    ".global probe_write_u64",
    ".global probe_read_insn",
    ".global probe_write_insn",
    ".global probe_fault_return",
    // Typed as A32 functions so that calls from Thumb code are linked as interworking `blx`.
    ".type probe_read_u64, %function",
    ".type probe_write_u64, %function",
    ".type probe_read_insn, %function",
    ".type probe_write_insn, %function",
    ".type probe_fault_return, %function",
    // r0 = address, r1 = where to store the value; returns r0 = 0 (or 1 after a fault).
    "probe_read_u64:",
    "probe_read_insn:",
    "    ldrd r2, r3, [r0]",
    "    strd r2, r3, [r1]",
    "    mov r0, #0",
    "    bx lr",
    // r0 = address, r2:r3 = value (a u64 argument takes an even register pair); returns r0 = 0
    // (or 1 after a fault).
    "probe_write_u64:",
    "probe_write_insn:",
    "    strd r2, r3, [r0]",
    "    mov r0, #0",
    "    bx lr",
    "probe_fault_return:",
    "    mov r0, #1",
    "    bx lr",
);

extern "C" {
    fn probe_read_u64(addr: usize, value: *mut u64) -> u32;
    fn probe_write_u64(addr: usize, value: u64) -> u32;
    fn probe_read_insn();
    fn probe_write_insn();
    fn probe_fault_return();
}

/// The fault status of the last probe fault (DFSR, DFAR), for the test to inspect.
static LAST_FSR: AtomicU32 = AtomicU32::new(0);
static LAST_FAR: AtomicU32 = AtomicU32::new(0);

/// A fault taken by a probe. The fields carry the aarch64 names so that generic code reads both
/// architectures alike: `esr` is the DFSR here, `far` the DFAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub esr: u64,
    pub far: u64,
}

impl Fault {
    pub fn is_permission(&self) -> bool {
        decode_fsr(self.esr as u32).kind == FaultKind::Permission
    }
    pub fn is_translation(&self) -> bool {
        decode_fsr(self.esr as u32).kind == FaultKind::Translation
    }
}

fn last_fault() -> Fault {
    Fault {
        esr: u64::from(LAST_FSR.load(Ordering::Relaxed)),
        far: u64::from(LAST_FAR.load(Ordering::Relaxed)),
    }
}

/// Read a u64 at `addr` (which must be 4-byte aligned: LDRD), or report the fault.
pub fn read_u64(addr: usize) -> Result<u64, Fault> {
    let mut value = 0u64;
    // SAFETY: the routine performs one load and one store to `value`; a fault on the load is
    // caught by `fixup` and turned into an error return, so no Rust state is affected by a
    // faulting address.
    if unsafe { probe_read_u64(addr, &mut value) } != 0 {
        Err(last_fault())
    } else {
        Ok(value)
    }
}

/// Write a u64 at `addr` (which must be 4-byte aligned: STRD), or report the fault.
///
/// # Safety
/// If the write succeeds it modifies memory at `addr`: the caller must own that memory.
pub unsafe fn write_u64(addr: usize, value: u64) -> Result<(), Fault> {
    // SAFETY: as for `read_u64`; the caller owns the target (contract above).
    if unsafe { probe_write_u64(addr, value) } != 0 {
        Err(last_fault())
    } else {
        Ok(())
    }
}

/// Called by the exception handler for a data abort: if it was a probe's access, record the fault
/// status and resume at the probes' error return.
pub(super) fn fixup(frame: &mut TrapFrame, fault: &FaultRegs) -> bool {
    let pc = frame.pc as usize;
    if pc != probe_read_insn as *const () as usize && pc != probe_write_insn as *const () as usize {
        return false;
    }
    LAST_FSR.store(fault.dfsr, Ordering::Relaxed);
    LAST_FAR.store(fault.dfar, Ordering::Relaxed);
    frame.pc = probe_fault_return as *const () as u32;
    true
}
