//! Probing accesses that may fault, for tests that must show a mapping refuses an access (kernel
//! text is not writable, data is not executable, a device-owned buffer is not readable). Each probe
//! is a tiny assembly routine whose faulting instruction the exception handler recognises: it
//! records the syndrome and resumes as if the routine had returned an error.

use core::sync::atomic::{AtomicU64, Ordering};

core::arch::global_asm!(
    ".section .text.probe, \"ax\"",
    ".global probe_read_insn",
    ".global probe_write_insn",
    ".global probe_read_u64",
    ".global probe_write_u64",
    // x0 = address; returns x0 = value, x1 = 0 (or x1 = 1 after a fault).
    "probe_read_u64:",
    "    mov x1, #0",
    "probe_read_insn:",
    "    ldr x0, [x0]",
    "    ret",
    // x0 = address, x1 = value; returns x0 = 0 (or 1 after a fault).
    "probe_write_u64:",
    "    mov x2, x0",
    "    mov x0, #0",
    "probe_write_insn:",
    "    str x1, [x2]",
    "    ret",
);

extern "C" {
    fn probe_read_u64(addr: usize) -> ProbeRead;
    fn probe_write_u64(addr: usize, value: u64) -> u64;
    fn probe_read_insn();
    fn probe_write_insn();
}

#[repr(C)]
struct ProbeRead {
    value: u64,
    faulted: u64,
}

/// The syndrome of the last probe fault (ESR, FAR), for the test to inspect.
static LAST_ESR: AtomicU64 = AtomicU64::new(0);
static LAST_FAR: AtomicU64 = AtomicU64::new(0);

/// A fault taken by a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub esr: u64,
    pub far: u64,
}

impl Fault {
    /// Data/instruction fault status code class: "translation", "permission", "access flag", ...
    pub fn is_permission(&self) -> bool {
        matches!(self.esr & 0x3f, 0x0c..=0x0f)
    }
    pub fn is_translation(&self) -> bool {
        matches!(self.esr & 0x3f, 0x04..=0x07)
    }
}

fn last_fault() -> Fault {
    Fault { esr: LAST_ESR.load(Ordering::Relaxed), far: LAST_FAR.load(Ordering::Relaxed) }
}

/// Read a u64 at `addr`, or report the fault.
pub fn read_u64(addr: usize) -> Result<u64, Fault> {
    // SAFETY: the routine performs one load; a fault on it is caught by `fixup` and turned into an
    // error return, so no Rust state is affected by a faulting address.
    let r = unsafe { probe_read_u64(addr) };
    if r.faulted != 0 { Err(last_fault()) } else { Ok(r.value) }
}

/// Write a u64 at `addr`, or report the fault.
///
/// # Safety
/// If the write succeeds it modifies memory at `addr`: the caller must own that memory.
pub unsafe fn write_u64(addr: usize, value: u64) -> Result<(), Fault> {
    // SAFETY: as for `read_u64`; the caller owns the target (contract above).
    if unsafe { probe_write_u64(addr, value) } != 0 { Err(last_fault()) } else { Ok(()) }
}

/// Called by the exception handler for a synchronous data abort: if it was a probe's access,
/// record the syndrome, set the error return and resume after the instruction.
pub(super) fn fixup(frame: &mut super::exceptions::TrapFrame) -> bool {
    let elr = frame.elr as usize;
    let is_read = elr == probe_read_insn as *const () as usize;
    let is_write = elr == probe_write_insn as *const () as usize;
    if !is_read && !is_write {
        return false;
    }
    LAST_ESR.store(frame.esr, Ordering::Relaxed);
    LAST_FAR.store(frame.far, Ordering::Relaxed);
    if is_read {
        frame.x[1] = 1;
    } else {
        frame.x[0] = 1;
    }
    frame.elr += 4;
    true
}
