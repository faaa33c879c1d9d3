//! PSCI (Arm DEN 0022) through the conduit the device tree names in /psci `method`. Calling the
//! wrong conduit hangs QEMU (an HVC with no hypervisor is undefined, an SMC without EL3 firmware
//! traps nowhere useful), so nothing is called unless the DT says which one to use.
//! The calls themselves come from the `smccc` crate. On AArch32 the kernel is Thumb code, where
//! that crate's A32-only trap encodings do not assemble, so the two conduits are provided here (see
//! [`a32`]) and plugged into the crate's PSCI functions through its `Call` trait.

#[cfg(target_arch = "arm")]
use a32::{Hvc, Smc};
#[cfg(not(target_arch = "arm"))]
use smccc::{Hvc, Smc};
use spin::Once;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conduit {
    Hvc,
    Smc,
}

static CONDUIT: Once<Conduit> = Once::new();

/// Record the conduit from the DT (`"hvc"` or `"smc"`); anything else leaves PSCI unusable.
pub fn init(method: &str) -> Option<Conduit> {
    let c = match method {
        "hvc" => Conduit::Hvc,
        "smc" => Conduit::Smc,
        _ => return None,
    };
    Some(*CONDUIT.call_once(|| c))
}

pub fn conduit() -> Option<Conduit> {
    CONDUIT.get().copied()
}

/// PSCI SYSTEM_OFF. Returns only if PSCI is unavailable or the call failed.
pub fn system_off() {
    let _ = match conduit() {
        Some(Conduit::Hvc) => smccc::psci::system_off::<Hvc>(),
        Some(Conduit::Smc) => smccc::psci::system_off::<Smc>(),
        None => return,
    };
}

/// PSCI CPU_ON: starts the CPU with affinity `mpidr` at physical address `entry`, with `context`
/// in its x0 / r0. The error is PSCI's (already on, invalid parameters, denied...), or
/// `NotSupported` without PSCI.
pub fn cpu_on(mpidr: u64, entry: u64, context: u64) -> Result<(), smccc::psci::Error> {
    #[cfg(target_arch = "arm")]
    let on = |c| -> Result<(), smccc::psci::Error> {
        let (m, e, x) = (mpidr as u32, entry as u32, context as u32);
        match c {
            Conduit::Hvc => smccc::psci::cpu_on_32::<Hvc>(m, e, x),
            Conduit::Smc => smccc::psci::cpu_on_32::<Smc>(m, e, x),
        }
    };
    #[cfg(not(target_arch = "arm"))]
    let on = |c| match c {
        Conduit::Hvc => smccc::psci::cpu_on::<Hvc>(mpidr, entry, context),
        Conduit::Smc => smccc::psci::cpu_on::<Smc>(mpidr, entry, context),
    };
    on(conduit().ok_or(smccc::psci::Error::NotSupported)?)
}

/// PSCI version as (major, minor), if PSCI is there.
pub fn version() -> Option<(u16, u16)> {
    let v = match conduit()? {
        Conduit::Hvc => smccc::psci::version::<Hvc>(),
        Conduit::Smc => smccc::psci::version::<Smc>(),
    }
    .ok()?;
    Some((v.major, v.minor))
}

/// HVC and SMC conduits for AArch32 that assemble in both A32 and T32 state.
#[cfg(target_arch = "arm")]
mod a32 {
    /// SMCCC's NOT_SUPPORTED, as a 32-bit register value.
    const NOT_SUPPORTED: i32 = -1;

    pub struct Hvc;
    pub struct Smc;

    /// One SMC32/HVC32 call: function ID in r0, arguments in r1-r7, results in r0-r7 (SMCCC
    /// 1.4). r6 and r7 cannot be asm operands (LLVM reserves them; r7 is the Thumb frame pointer),
    /// so they are swapped in and out around the trap through scratch registers.
    macro_rules! call32 {
        ($insn:literal, $function:expr, $args:expr) => {{
            let args: [u32; 7] = $args;
            let mut ret = [0u32; 8];
            // SAFETY: the trap hands control to the hypervisor or secure firmware, which follows
            // the SMC Calling Convention: it changes only r0-r7, all of which are operands here
            // (r6 and r7 restored by hand), and does not touch this program's memory.
            unsafe {
                core::arch::asm!(
                    "mov {saved6}, r6",
                    "mov {saved7}, r7",
                    "mov r6, {v6}",
                    "mov r7, {v7}",
                    $insn,
                    "mov {v6}, r6",
                    "mov {v7}, r7",
                    "mov r6, {saved6}",
                    "mov r7, {saved7}",
                    saved6 = out(reg) _,
                    saved7 = out(reg) _,
                    v6 = inout(reg) args[5] => ret[6],
                    v7 = inout(reg) args[6] => ret[7],
                    inout("r0") $function => ret[0],
                    inout("r1") args[0] => ret[1],
                    inout("r2") args[1] => ret[2],
                    inout("r3") args[2] => ret[3],
                    inout("r4") args[3] => ret[4],
                    inout("r5") args[4] => ret[5],
                    options(nostack)
                );
            }
            ret
        }};
    }

    /// The 64-bit convention does not exist for an AArch32 caller; answer as firmware answers an
    /// unknown function.
    fn call64_unavailable() -> [u64; 18] {
        let mut ret = [0u64; 18];
        ret[0] = NOT_SUPPORTED as u32 as u64;
        ret
    }

    impl smccc::Call for Hvc {
        fn call32(function: u32, args: [u32; 7]) -> [u32; 8] {
            call32!("hvc #0", function, args)
        }
        fn call64(_function: u32, _args: [u64; 17]) -> [u64; 18] {
            call64_unavailable()
        }
    }

    impl smccc::Call for Smc {
        fn call32(function: u32, args: [u32; 7]) -> [u32; 8] {
            call32!("smc #0", function, args)
        }
        fn call64(_function: u32, _args: [u64; 17]) -> [u64; 18] {
            call64_unavailable()
        }
    }
}
