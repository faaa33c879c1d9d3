//! The BCM2835 "ARM" interrupt controller ("brcm,bcm2835-armctrl-ic", and the BCM2836/7's
//! "brcm,bcm2836-armctrl-ic", whose output is line 8 of the local controller): BCM2835 ARM
//! Peripherals, section 7.5.
//!
//! Three banks, numbered as the DT binding does: bank 0 the 8 ARM-side lines of the basic pending
//! register, banks 1 and 2 the GPU's interrupts 0-31 and 32-63. This driver's line number is
//! `bank * 32 + bit`. Every line is level-triggered and cleared at its source; the controller only
//! enables and reports.

use super::{HwIrq, SpecError, Trigger};

/// Lines per bank in the numbering, and ARM-side lines in bank 0.
const BANK_LINES: u32 = 32;
const BANK0_LINES: u32 = 8;

/// The line of a 2-cell specifier `<bank bit>`.
pub fn translate(bank: u32, bit: u32) -> Result<HwIrq, SpecError> {
    let limit = match bank {
        0 => BANK0_LINES,
        1 | 2 => BANK_LINES,
        _ => return Err(SpecError::OutOfRange { what: "bank (0-2)", value: bank }),
    };
    if bit >= limit {
        return Err(SpecError::OutOfRange { what: "line within its bank", value: bit });
    }
    Ok(HwIrq { hwirq: bank * BANK_LINES + bit, trigger: Trigger::Level })
}

/// The lines `enabled` (per bank) that the three pending registers `pending` (basic, GPU 1,
/// GPU 2) report, in line order. Only enabled lines count: the basic register also carries
/// summary and shortcut bits, which this masking drops.
pub fn pending_lines(pending: [u32; 3], enabled: [u32; 3]) -> impl Iterator<Item = u32> {
    let basic = pending[0] & ((1 << BANK0_LINES) - 1);
    let words = [basic & enabled[0], pending[1] & enabled[1], pending[2] & enabled[2]];
    (0..3u32).flat_map(move |bank| {
        let w = words[bank as usize];
        (0..BANK_LINES).filter(move |b| w & (1 << b) != 0).map(move |b| bank * BANK_LINES + b)
    })
}

#[cfg(target_os = "none")]
pub use hw::Armctrl;

#[cfg(target_os = "none")]
mod hw {
    use super::{pending_lines, BANK_LINES};
    use core::sync::atomic::{AtomicU32, Ordering};
    use tock_registers::interfaces::{Readable, Writeable};
    use tock_registers::register_structs;
    use tock_registers::registers::{ReadOnly, WriteOnly};

    register_structs! {
        Registers {
            (0x00 => pending: [ReadOnly<u32>; 3]),
            (0x0c => _fiq_control),
            (0x10 => enable_gpu: [WriteOnly<u32>; 2]),
            (0x18 => enable_basic: WriteOnly<u32>),
            (0x1c => disable_gpu: [WriteOnly<u32>; 2]),
            (0x24 => disable_basic: WriteOnly<u32>),
            (0x28 => @END),
        }
    }

    /// One ARM interrupt controller, by the address of its mapped registers.
    pub struct Armctrl {
        base: usize,
        /// What this driver enabled, per bank (the enable registers are write-only).
        enabled: [AtomicU32; 3],
    }

    impl Armctrl {
        /// Takes over the controller with every line disabled.
        ///
        /// # Safety
        /// `base` must be the mapped (device memory) register block of the controller, which
        /// nothing else drives from now on.
        pub unsafe fn new(base: usize) -> Armctrl {
            let a = Armctrl { base, enabled: [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)] };
            let r = a.regs();
            r.disable_basic.set(u32::MAX);
            r.disable_gpu[0].set(u32::MAX);
            r.disable_gpu[1].set(u32::MAX);
            a
        }

        fn regs(&self) -> &Registers {
            // SAFETY: `new`'s contract: the registers are mapped at `base` while this value lives.
            unsafe { &*(self.base as *const Registers) }
        }

        fn split(hwirq: u32) -> Option<(usize, u32)> {
            let bank = (hwirq / BANK_LINES) as usize;
            (bank < 3).then_some((bank, 1 << (hwirq % BANK_LINES)))
        }

        /// Enables line `hwirq` (`bank * 32 + bit`); `false` if there is no such line.
        pub fn enable(&self, hwirq: u32) -> bool {
            let Some((bank, bit)) = Self::split(hwirq) else { return false };
            if super::translate(bank as u32, hwirq % BANK_LINES).is_err() {
                return false;
            }
            self.enabled[bank].fetch_or(bit, Ordering::Relaxed);
            match bank {
                0 => self.regs().enable_basic.set(bit),
                b => self.regs().enable_gpu[b - 1].set(bit),
            }
            true
        }

        /// Disables line `hwirq`.
        pub fn disable(&self, hwirq: u32) {
            let Some((bank, bit)) = Self::split(hwirq) else { return };
            self.enabled[bank].fetch_and(!bit, Ordering::Relaxed);
            match bank {
                0 => self.regs().disable_basic.set(bit),
                b => self.regs().disable_gpu[b - 1].set(bit),
            }
        }

        /// Calls `f` for each enabled line that is pending.
        pub fn handle(&self, f: &mut dyn FnMut(u32)) {
            let r = self.regs();
            let pending = [r.pending[0].get(), r.pending[1].get(), r.pending[2].get()];
            let enabled = [0, 1, 2].map(|i| self.enabled[i].load(Ordering::Relaxed));
            for line in pending_lines(pending, enabled) {
                f(line);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_is_masked_by_what_was_enabled() {
        // Basic bit 8 ("GPU pending 1 has bits") and bit 10 (a shortcut) are not lines.
        let pending = [0x0000_0501, 0x0801_0000, 0x8000_0000];
        let all = [u32::MAX; 3];
        assert_eq!(pending_lines(pending, all).collect::<Vec<_>>(), vec![0, 48, 59, 95]);
        let only_dma0 = [0, 1 << 16, 0];
        assert_eq!(pending_lines(pending, only_dma0).collect::<Vec<_>>(), vec![48]);
        assert_eq!(pending_lines([0; 3], all).count(), 0);
    }
}
