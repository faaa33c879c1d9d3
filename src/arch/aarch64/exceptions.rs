//! Exception handling. The vector table (boot/aarch64.s) saves a `TrapFrame` and calls
//! `dmakern_exception`. IRQs (taken only while the `irq` layer has unmasked them) go to
//! `crate::irq::dispatch`; otherwise nothing is expected except the semihosting probe and the
//! faults of `probe`'s accesses; everything else is reported with its decoded syndrome and ends
//! the run with a non-zero status.

use core::fmt;

/// Register state saved by the vector stubs; the layout is fixed by `exception_common`.
#[repr(C)]
pub struct TrapFrame {
    pub x: [u64; 31],
    pub elr: u64,
    pub spsr: u64,
    pub esr: u64,
    pub far: u64,
    pub sp: u64,
}

/// Vector kinds of an IRQ taken at the current exception level (SP_EL0 and SP_ELx).
const KIND_IRQ_SP0: u64 = 1;
const KIND_IRQ: u64 = 5;

const KIND_NAMES: [&str; 16] = [
    "sync (EL1t)", "irq (EL1t)", "fiq (EL1t)", "serror (EL1t)",
    "sync", "irq", "fiq", "serror",
    "sync (lower EL, AArch64)", "irq (lower EL, AArch64)", "fiq (lower EL, AArch64)", "serror (lower EL, AArch64)",
    "sync (lower EL, AArch32)", "irq (lower EL, AArch32)", "fiq (lower EL, AArch32)", "serror (lower EL, AArch32)",
];

/// Exception class names from the Arm ARM (ESR_ELx.EC).
fn exception_class(ec: u64) -> &'static str {
    match ec {
        0x00 => "unknown reason (undefined instruction)",
        0x01 => "WFI/WFE trapped",
        0x07 => "SVE/SIMD/FP access trapped",
        0x0e => "illegal execution state",
        0x15 => "SVC in AArch64",
        0x16 => "HVC in AArch64",
        0x17 => "SMC in AArch64",
        0x18 => "MSR/MRS/system instruction trapped",
        0x20 => "instruction abort from a lower EL",
        0x21 => "instruction abort, same EL",
        0x22 => "PC alignment fault",
        0x24 => "data abort from a lower EL",
        0x25 => "data abort, same EL",
        0x26 => "SP alignment fault",
        0x2f => "SError",
        0x30 | 0x31 => "breakpoint",
        0x32 | 0x33 => "software step",
        0x34 | 0x35 => "watchpoint",
        0x3c => "BRK instruction",
        _ => "reserved or unhandled class",
    }
}

/// Data/instruction fault status code (ISS.DFSC/IFSC) names.
fn fault_status(fsc: u64) -> &'static str {
    match fsc {
        0x00..=0x03 => "address size fault",
        0x04..=0x07 => "translation fault",
        0x09..=0x0b => "access flag fault",
        0x0d..=0x0f => "permission fault",
        0x10 => "synchronous external abort",
        0x21 => "alignment fault",
        0x30 => "TLB conflict abort",
        _ => "other fault status",
    }
}

/// Decoded view of a frame for the crash report.
pub struct Report<'a> {
    pub frame: &'a TrapFrame,
    pub kind: u64,
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fr = self.frame;
        let ec = (fr.esr >> 26) & 0x3f;
        let iss = fr.esr & 0x1ff_ffff;
        let kind = KIND_NAMES.get(self.kind as usize).copied().unwrap_or("?");
        writeln!(f, "unexpected exception: {kind}")?;
        writeln!(f, "  ESR_EL1 {:#018x}: EC {:#04x} {}, ISS {:#x}", fr.esr, ec, exception_class(ec), iss)?;
        if matches!(ec, 0x20 | 0x21 | 0x24 | 0x25) {
            let fsc = iss & 0x3f;
            let level = fsc & 3;
            write!(f, "  {} (level {level})", fault_status(fsc))?;
            if matches!(ec, 0x24 | 0x25) {
                write!(f, ", {}", if iss & (1 << 6) != 0 { "write" } else { "read" })?;
            }
            writeln!(f)?;
        }
        writeln!(f, "  FAR_EL1 {:#018x}  ELR_EL1 {:#018x}  SPSR_EL1 {:#018x}  SP {:#018x}", fr.far, fr.elr, fr.spsr, fr.sp)?;
        for (i, pair) in fr.x.chunks(4).enumerate() {
            write!(f, " ")?;
            for (j, v) in pair.iter().enumerate() {
                write!(f, " x{:<2} {:#018x}", i * 4 + j, v)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[no_mangle]
extern "C" fn dmakern_exception(frame: &mut TrapFrame, kind: u64) {
    if kind == KIND_IRQ || kind == KIND_IRQ_SP0 {
        crate::irq::dispatch();
        return;
    }
    let ec = (frame.esr >> 26) & 0x3f;
    // The semihosting probe: `hlt` without a host is undefined (EC 0); skip it and report failure.
    if kind == 4 && ec == 0 && frame.elr as usize == super::semihosting::trap_address() {
        frame.x[0] = u64::MAX;
        frame.elr += 4;
        return;
    }
    if kind == 4 && matches!(ec, 0x24 | 0x25) {
        crate::dma::debug::guard_fault(frame.far, frame.elr);
    }
    if kind == 4 && matches!(ec, 0x24 | 0x25) && super::probe::fixup(frame) {
        return;
    }
    crate::kernel::unexpected_exception(&Report { frame, kind });
}
