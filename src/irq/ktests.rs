//! The interrupt layer against a real interrupt source every supported board has: the CPU's
//! virtual timer, found through the DT timer node (its third interrupt), which reaches the CPU
//! through the GIC (QEMU virt, Pi 4) or the BCM2836 local controller (Pi 2/3).

use super::{register, request, unregister, wait_until, Irq};
use crate::arch;
use crate::kernel::boot_info;
use crate::ktest::TestResult;
use crate::{kassert, kassert_eq, kskip, ktry};
use core::sync::atomic::{AtomicU32, Ordering};

static FIRED: AtomicU32 = AtomicU32::new(0);

/// Turns the timer off (deasserting its level interrupt) and counts the call.
fn on_timer(ctx: usize) {
    arch::counter::virtual_timer_stop();
    FIRED.fetch_add(ctx as u32, Ordering::SeqCst);
}

/// The virtual timer's line, or a skip saying why there is none.
fn timer_irq() -> Result<Irq, crate::ktest::NotPassed> {
    if !super::available() {
        kskip!("no supported interrupt controller in the device tree");
    }
    let dt = &boot_info().dt;
    let Some(node) = dt.find_compatible("arm,armv8-timer").chain(dt.find_compatible("arm,armv7-timer")).next() else {
        kskip!("no arm,armv8-timer / arm,armv7-timer node");
    };
    // Index 2: the virtual timer (secure physical, non-secure physical, virtual, hypervisor).
    Ok(ktry!(request(dt, &node, 2)))
}

fn timer_interrupt_is_dispatched() -> TestResult {
    let irq = timer_irq()?;
    FIRED.store(0, Ordering::SeqCst);
    let (unhandled_before, _) = super::unhandled();
    ktry!(register(irq, on_timer, 1));
    let ticks = (arch::counter::frequency() / 1000).clamp(1, u64::from(u32::MAX)) as u32;
    arch::counter::virtual_timer_start(ticks);
    let ok = wait_until(1_000_000_000, || FIRED.load(Ordering::SeqCst) > 0);
    arch::counter::virtual_timer_stop();
    ktry!(unregister(irq, on_timer, 1));
    kassert!(ok, "the virtual timer's interrupt ({irq}) never reached its handler within 1 s");
    kassert_eq!(FIRED.load(Ordering::SeqCst), 1, "handler calls for one expiry");
    kassert!(!arch::irq::enabled(), "IRQs left unmasked after the wait");
    let (unhandled, last) = super::unhandled();
    kassert_eq!(unhandled, unhandled_before, "interrupts without a handler (last: controller, line {last:?})");
    Ok(())
}

fn masked_outside_waits() -> TestResult {
    let irq = timer_irq()?;
    FIRED.store(0, Ordering::SeqCst);
    ktry!(register(irq, on_timer, 1));
    // Expired at once; with IRQs masked the interrupt must stay pending, not be taken.
    arch::counter::virtual_timer_start(0);
    let start = arch::counter::read();
    let spin = arch::counter::frequency() / 100;
    while arch::counter::read().wrapping_sub(start) < spin {
        core::hint::spin_loop();
    }
    let early = FIRED.load(Ordering::SeqCst);
    let ok = wait_until(1_000_000_000, || FIRED.load(Ordering::SeqCst) > 0);
    arch::counter::virtual_timer_stop();
    ktry!(unregister(irq, on_timer, 1));
    kassert_eq!(early, 0, "handler ran while IRQs were masked");
    kassert!(ok, "the pending interrupt was not taken once unmasked");
    Ok(())
}

fn unregister_refuses_unknown() -> TestResult {
    let irq = timer_irq()?;
    kassert_eq!(unregister(irq, on_timer, 7), Err(super::IrqError::NotRegistered));
    Ok(())
}

crate::ktest_suite!("irq", [timer_interrupt_is_dispatched, masked_outside_waits, unregister_refuses_unknown]);
