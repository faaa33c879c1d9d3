//! Exception handling. The vector table (boot/armv7.s) saves a `TrapFrame` on the exception mode's
//! stack and calls `dmakern_exception`. IRQs (taken only while the `irq` layer has unmasked them)
//! go to `crate::irq::dispatch`; otherwise nothing is expected except the semihosting probe and the
//! faults of `probe`'s accesses; everything else is reported with its decoded fault status and ends
//! the run with a non-zero status.
//!
//! Stacks: SVC exceptions use the interrupted SVC stack (the kernel runs in SVC mode, and pushing
//! below its stack pointer preserves it); aborts, undefined instructions, IRQ and FIQ each have a
//! small stack of their own, set up at boot, so that a report still prints when the SVC stack
//! pointer is what went wrong.

use super::cpu;
use aarch32_cpu::register::{Dfar, Dfsr, Ifar, Ifsr};
use core::fmt;

/// Register state saved by the vector stubs; the layout is fixed by `exception_common`.
#[repr(C)]
pub struct TrapFrame {
    /// r0-r12 (for an FIQ, r8-r12 are the FIQ mode's banked registers).
    pub r: [u32; 13],
    /// sp and lr of the interrupted mode. When that mode is the exception's own (an SVC taken in
    /// SVC mode), lr is the exception's return address: the interrupted lr was overwritten. Zero
    /// when the interrupted mode is HYP or Monitor, whose registers PL1 cannot reach.
    pub sp: u32,
    pub lr: u32,
    /// Preferred return address: the faulting instruction for undef and aborts, the next one to
    /// execute for SVC, IRQ and FIQ.
    pub pc: u32,
    /// The interrupted CPSR (the exception mode's SPSR); restored on return.
    pub cpsr: u32,
}

const KIND_SVC: u32 = 2;
const KIND_PABT: u32 = 3;
const KIND_DABT: u32 = 4;
const KIND_IRQ: u32 = 6;

/// Vector names, by offset / 4 in the vector table.
const KIND_NAMES: [&str; 8] = [
    "reset",
    "undefined instruction",
    "supervisor call",
    "prefetch abort",
    "data abort",
    "HYP trap (unused vector)",
    "IRQ",
    "FIQ",
];

const PSR_T: u32 = 1 << 5;
const PSR_MODE_MASK: u32 = 0x1f;
/// DFSR/IFSR.LPAE: the status is in the long-descriptor format (TTBCR.EAE was 1).
const FSR_LPAE: u32 = 1 << 9;
const DFSR_WNR: u32 = 1 << 11;
const DFSR_CM: u32 = 1 << 13;

/// The fault status and address registers, read on entry before anything can overwrite them.
/// The raw values are kept: aarch32-cpu decodes only the short-descriptor status format, while
/// the MMU here uses the long-descriptor one.
#[derive(Clone, Copy)]
pub struct FaultRegs {
    pub dfsr: u32,
    pub dfar: u32,
    pub ifsr: u32,
    pub ifar: u32,
}

impl FaultRegs {
    fn read() -> Self {
        Self {
            dfsr: Dfsr::read().raw_value(),
            dfar: Dfar::read().0,
            ifsr: Ifsr::read().raw_value(),
            ifar: Ifar::read().0,
        }
    }
}

/// Classes of fault status codes (DFSR/IFSR), in either format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    AddressSize,
    Translation,
    AccessFlag,
    Permission,
    Domain,
    Alignment,
    Debug,
    SyncExternal,
    SyncExternalOnWalk,
    AsyncExternal,
    SyncParity,
    SyncParityOnWalk,
    AsyncParity,
    TlbConflict,
    IcacheMaintenance,
    Lockdown,
    CoprocessorAbort,
    Reserved,
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultKind::AddressSize => "address size fault",
            FaultKind::Translation => "translation fault",
            FaultKind::AccessFlag => "access flag fault",
            FaultKind::Permission => "permission fault",
            FaultKind::Domain => "domain fault",
            FaultKind::Alignment => "alignment fault",
            FaultKind::Debug => "debug event",
            FaultKind::SyncExternal => "synchronous external abort",
            FaultKind::SyncExternalOnWalk => {
                "synchronous external abort on a translation table walk"
            }
            FaultKind::AsyncExternal => "asynchronous external abort",
            FaultKind::SyncParity => "synchronous parity/ECC error",
            FaultKind::SyncParityOnWalk => {
                "synchronous parity/ECC error on a translation table walk"
            }
            FaultKind::AsyncParity => "asynchronous parity/ECC error",
            FaultKind::TlbConflict => "TLB conflict abort",
            FaultKind::IcacheMaintenance => "fault on instruction cache maintenance",
            FaultKind::Lockdown => "implementation defined fault (lockdown)",
            FaultKind::CoprocessorAbort => "implementation defined fault (coprocessor abort)",
            FaultKind::Reserved => "reserved fault status",
        })
    }
}

/// A fault status decoded: its class and, for translation-related faults, the level of the table
/// walk it happened at (short-descriptor format: 1 is a section, 2 a page).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultStatus {
    pub kind: FaultKind,
    pub level: Option<u32>,
}

const fn status(kind: FaultKind, level: Option<u32>) -> FaultStatus {
    FaultStatus { kind, level }
}

/// Decode DFSR/IFSR in whichever format its LPAE bit says it was written in (long-descriptor once
/// the MMU is set up with TTBCR.EAE = 1, short-descriptor for faults taken before).
pub fn decode_fsr(fsr: u32) -> FaultStatus {
    if fsr & FSR_LPAE != 0 {
        decode_long(fsr & 0x3f)
    } else {
        // FS[4] is bit 10, FS[3:0] bits 3:0.
        decode_short(((fsr >> 6) & 0x10) | (fsr & 0xf))
    }
}

/// Long-descriptor status codes (Arm ARM v7-A, B3.13.3): the low two bits give the level.
fn decode_long(code: u32) -> FaultStatus {
    use FaultKind::*;
    let level = Some(code & 3);
    match code {
        0x00..=0x03 => status(AddressSize, level),
        0x04..=0x07 => status(Translation, level),
        0x08..=0x0b => status(AccessFlag, level),
        0x0c..=0x0f => status(Permission, level),
        0x10 => status(SyncExternal, None),
        0x11 => status(AsyncExternal, None),
        0x14..=0x17 => status(SyncExternalOnWalk, level),
        0x18 => status(SyncParity, None),
        0x19 => status(AsyncParity, None),
        0x1c..=0x1f => status(SyncParityOnWalk, level),
        0x21 => status(Alignment, None),
        0x22 => status(Debug, None),
        0x30 => status(TlbConflict, None),
        0x34 => status(Lockdown, None),
        0x3a => status(CoprocessorAbort, None),
        0x3c..=0x3f => status(Domain, level),
        _ => status(Reserved, None),
    }
}

/// Short-descriptor status codes (Arm ARM v7-A, B3.13.3).
fn decode_short(fs: u32) -> FaultStatus {
    use FaultKind::*;
    match fs {
        0b00001 => status(Alignment, None),
        0b00010 => status(Debug, None),
        0b00011 => status(AccessFlag, Some(1)),
        0b00100 => status(IcacheMaintenance, None),
        0b00101 => status(Translation, Some(1)),
        0b00110 => status(AccessFlag, Some(2)),
        0b00111 => status(Translation, Some(2)),
        0b01000 => status(SyncExternal, None),
        0b01001 => status(Domain, Some(1)),
        0b01011 => status(Domain, Some(2)),
        0b01100 => status(SyncExternalOnWalk, Some(1)),
        0b01101 => status(Permission, Some(1)),
        0b01110 => status(SyncExternalOnWalk, Some(2)),
        0b01111 => status(Permission, Some(2)),
        0b10000 => status(TlbConflict, None),
        0b10100 => status(Lockdown, None),
        0b10110 => status(AsyncExternal, None),
        0b11000 => status(AsyncParity, None),
        0b11001 => status(SyncParity, None),
        0b11010 => status(CoprocessorAbort, None),
        0b11100 => status(SyncParityOnWalk, Some(1)),
        0b11110 => status(SyncParityOnWalk, Some(2)),
        _ => status(Reserved, None),
    }
}

/// One line: `<reg> <value> (<format>): <status>[, level N]`.
fn write_fsr(f: &mut fmt::Formatter<'_>, name: &str, fsr: u32) -> fmt::Result {
    let s = decode_fsr(fsr);
    let format = if fsr & FSR_LPAE != 0 {
        "long-descriptor"
    } else {
        "short-descriptor"
    };
    write!(f, "  {name} {fsr:#010x} ({format}): {}", s.kind)?;
    if let Some(level) = s.level {
        write!(f, ", level {level}")?;
    }
    Ok(())
}

/// Decoded view of a frame for the crash report.
pub struct Report<'a> {
    pub frame: &'a TrapFrame,
    pub kind: u32,
    pub fault: FaultRegs,
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fr = self.frame;
        let kind = KIND_NAMES.get(self.kind as usize).copied().unwrap_or("?");
        writeln!(f, "unexpected exception: {kind}")?;
        match self.kind {
            KIND_DABT => {
                write_fsr(f, "DFSR", self.fault.dfsr)?;
                write!(
                    f,
                    ", {}",
                    if self.fault.dfsr & DFSR_WNR != 0 {
                        "write"
                    } else {
                        "read"
                    }
                )?;
                if self.fault.dfsr & DFSR_CM != 0 {
                    write!(f, " (cache maintenance)")?;
                }
                writeln!(f, "\n  DFAR {:#010x}", self.fault.dfar)?;
            }
            KIND_PABT => {
                write_fsr(f, "IFSR", self.fault.ifsr)?;
                writeln!(f, "\n  IFAR {:#010x}", self.fault.ifar)?;
            }
            _ => {}
        }
        let state = if fr.cpsr & PSR_T != 0 { "T32" } else { "A32" };
        let mode = cpu::exception_level_name((fr.cpsr & PSR_MODE_MASK) as usize);
        writeln!(
            f,
            "  PC {:#010x}  CPSR {:#010x} ({mode}, {state})  SP {:#010x}  LR {:#010x}",
            fr.pc, fr.cpsr, fr.sp, fr.lr
        )?;
        for (i, regs) in fr.r.chunks(4).enumerate() {
            write!(f, " ")?;
            for (j, v) in regs.iter().enumerate() {
                write!(f, " r{:<2} {:#010x}", i * 4 + j, v)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[no_mangle]
extern "C" fn dmakern_exception(frame: &mut TrapFrame, kind: u32) {
    if kind == KIND_IRQ {
        crate::irq::dispatch();
        return;
    }
    let fault = FaultRegs::read();
    // The semihosting probe: without a host the trap is a plain SVC; resume after it, failed.
    if kind == KIND_SVC && frame.pc as usize == super::semihosting::trap_address() + 4 {
        frame.r[0] = u32::MAX;
        return;
    }
    if kind == KIND_DABT {
        crate::dma::debug::guard_fault(u64::from(fault.dfar), u64::from(frame.pc));
    }
    if kind == KIND_DABT && super::probe::fixup(frame, &fault) {
        return;
    }
    crate::kernel::unexpected_exception(&Report { frame, kind, fault });
}
