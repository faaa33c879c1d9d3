//! Power-off through the BCM2835 power manager's watchdog ("brcm,bcm2835-pm-wdt",
//! "brcm,bcm2835-pm", "brcm,bcm2711-pm"): the Raspberry Pi's only way to stop when there is neither
//! a semihosting host nor PSCI (Pi 1-4 firmware has no PSCI).
//!
//! The sequence is the one Linux's bcm2835_wdt uses for power-off: mark the reset status register's
//! boot partition as 63 ("halt", which the firmware honours by not booting again), arm the watchdog
//! for a few ticks, and ask for a full reset. On a real Pi the board resets into the firmware,
//! which halts; QEMU's raspi machines end the process with status 0. Every write carries the
//! power manager's password in its top byte.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicUsize, Ordering};

/// Compatibles of the power manager's node, any of which has the watchdog registers at `reg` 0.
pub const COMPATIBLES: [&str; 3] = ["brcm,bcm2835-pm-wdt", "brcm,bcm2835-pm", "brcm,bcm2711-pm"];
/// Bytes of the register block this driver touches.
pub const REGS_SIZE: u64 = 0x28;

const RSTC: usize = 0x1c;
const RSTS: usize = 0x20;
const WDOG: usize = 0x24;
const PASSWORD: u32 = 0x5a00_0000;
/// Register bits below the password byte (what a read-modify-write keeps).
const VALUE_MASK: u32 = 0x00ff_ffff;
/// RSTC: the reset configuration field, and its "full reset" value.
const RSTC_WRCFG_CLR: u32 = 0xffff_ffcf;
const RSTC_WRCFG_FULL_RESET: u32 = 0x20;
/// RSTS: the boot partition bits (partition 63 spread over bits 0, 2, 4, 6, 8, 10 = 0x555).
const RSTS_PARTITION_CLR: u32 = 0xffff_faaa;
const RSTS_PARTITION_HALT: u32 = 0x555;
/// Watchdog ticks (of about 15 us) before the reset.
const WDOG_TICKS: u32 = 10;

/// The mapped register block, 0 until [`set_base`].
static BASE: AtomicUsize = AtomicUsize::new(0);

/// Records the (mapped, identity) address of the power manager's registers, found in the DT by
/// the boot path. From then on [`power_off`] uses it.
pub fn set_base(base: usize) {
    BASE.store(base, Ordering::Release);
}

/// Whether a power manager was found.
pub fn present() -> bool {
    BASE.load(Ordering::Acquire) != 0
}

/// Halts the board through the watchdog. Returns only if no power manager was recorded; the
/// reset takes a few microseconds, so the caller parks the CPU afterwards.
pub fn power_off() {
    let base = BASE.load(Ordering::Acquire);
    if base == 0 {
        return;
    }
    let reg = |off: usize| (base + off) as *mut u32;
    // SAFETY: `set_base` was given the mapped register block of the power manager, which nothing
    // else in the kernel touches; these are single 32-bit MMIO accesses.
    unsafe {
        let rsts = read_volatile(reg(RSTS));
        write_volatile(reg(RSTS), PASSWORD | (rsts & VALUE_MASK & RSTS_PARTITION_CLR) | RSTS_PARTITION_HALT);
        write_volatile(reg(WDOG), PASSWORD | WDOG_TICKS);
        let rstc = read_volatile(reg(RSTC));
        write_volatile(reg(RSTC), PASSWORD | (rstc & VALUE_MASK & RSTC_WRCFG_CLR) | RSTC_WRCFG_FULL_RESET);
    }
}
