//! PSCI (Arm DEN 0022) through the conduit the device tree names in /psci `method`. Calling the
//! wrong conduit hangs QEMU (an HVC with no hypervisor is undefined, an SMC without EL3 firmware
//! traps nowhere useful), so nothing is called unless the DT says which one to use.
//! The calls themselves come from the `smccc` crate, which covers both AArch64 and AArch32.

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

/// PSCI version as (major, minor), if PSCI is there.
pub fn version() -> Option<(u16, u16)> {
    let v = match conduit()? {
        Conduit::Hvc => smccc::psci::version::<Hvc>(),
        Conduit::Smc => smccc::psci::version::<Smc>(),
    }
    .ok()?;
    Some((v.major, v.minor))
}
