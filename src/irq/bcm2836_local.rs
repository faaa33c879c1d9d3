//! The BCM2836/7 per-core local interrupt controller ("brcm,bcm2836-l1-intc", at 0x40000000 on
//! the Pi 2/3): Broadcom's "Quad-A7 control" document (QA7_rev3.4), sections 4.6-4.10.
//!
//! Lines as the DT binding numbers them: 0-3 the four generic-timer interrupts (CNTPS, CNTPNS,
//! CNTHP, CNTV), 4-7 the core's mailboxes 0-3, 8 the GPU interrupt (the output of the ARM
//! controller), 9 the PMU. Each core has its own source register and timer/mailbox controls;
//! this driver enables lines for the core that asks, and routes the GPU interrupt to it.

use super::{HwIrq, SpecError, Trigger};

/// The GPU interrupt (the ARM controller's output).
pub const LINE_GPU: u32 = 8;
/// The PMU interrupt, the last line.
pub const LINE_PMU: u32 = 9;

/// The line of a 2-cell specifier `<line flags>`.
pub fn translate(line: u32, flags: u32) -> Result<HwIrq, SpecError> {
    if line > LINE_PMU {
        return Err(SpecError::OutOfRange { what: "local interrupt (0-9)", value: line });
    }
    Ok(HwIrq { hwirq: line, trigger: Trigger::from_flags(flags) })
}

#[cfg(target_os = "none")]
pub use hw::LocalIntc;

#[cfg(target_os = "none")]
mod hw {
    use super::{LINE_GPU, LINE_PMU};
    use core::sync::atomic::{AtomicU32, Ordering};
    use tock_registers::interfaces::{Readable, Writeable};
    use tock_registers::register_structs;
    use tock_registers::registers::{ReadOnly, ReadWrite, WriteOnly};

    register_structs! {
        Registers {
            (0x00 => _control),
            (0x0c => gpu_routing: ReadWrite<u32>),
            (0x10 => pmu_route_set: WriteOnly<u32>),
            (0x14 => pmu_route_clear: WriteOnly<u32>),
            (0x18 => _reserved0),
            (0x40 => timer_control: [ReadWrite<u32>; 4]),
            (0x50 => mailbox_control: [ReadWrite<u32>; 4]),
            (0x60 => irq_source: [ReadOnly<u32>; 4]),
            (0x70 => @END),
        }
    }

    /// The calling core's number (MPIDR Aff0: the BCM2836/7 number their four cores 0-3).
    fn core() -> usize {
        (crate::arch::cpu::mpidr() & 3) as usize
    }

    /// One local controller, by the address of its mapped registers.
    pub struct LocalIntc {
        base: usize,
        /// Lines this driver enabled, per core (a bit per line).
        enabled: [AtomicU32; 4],
    }

    impl LocalIntc {
        /// The controller as the firmware left it: nothing is changed until a line is enabled
        /// (the per-core controls reset to "off").
        ///
        /// # Safety
        /// `base` must be the mapped (device memory) register block of the controller, which
        /// nothing else drives from now on (the SMP start-up only writes the mailbox-set
        /// registers, which this driver does not touch).
        pub unsafe fn new(base: usize) -> LocalIntc {
            LocalIntc { base, enabled: [const { AtomicU32::new(0) }; 4] }
        }

        fn regs(&self) -> &Registers {
            // SAFETY: `new`'s contract: the registers are mapped at `base` while this value lives.
            unsafe { &*(self.base as *const Registers) }
        }

        /// Enables `line` for the calling core; `false` if there is no such line.
        pub fn enable(&self, line: u32) -> bool {
            let (r, c) = (self.regs(), core());
            match line {
                0..=3 => r.timer_control[c].set(r.timer_control[c].get() | 1 << line),
                4..=7 => r.mailbox_control[c].set(r.mailbox_control[c].get() | 1 << (line - 4)),
                // Bits 1:0 route the GPU IRQ (bits 3:2 the FIQ, kept).
                LINE_GPU => r.gpu_routing.set((r.gpu_routing.get() & !3) | c as u32),
                LINE_PMU => r.pmu_route_set.set(1 << c),
                _ => return false,
            }
            self.enabled[c].fetch_or(1 << line, Ordering::Relaxed);
            true
        }

        /// Disables `line` for the calling core. The GPU interrupt cannot be unrouted; it is only
        /// no longer dispatched.
        pub fn disable(&self, line: u32) {
            let (r, c) = (self.regs(), core());
            match line {
                0..=3 => r.timer_control[c].set(r.timer_control[c].get() & !(1 << line)),
                4..=7 => r.mailbox_control[c].set(r.mailbox_control[c].get() & !(1 << (line - 4))),
                LINE_PMU => r.pmu_route_clear.set(1 << c),
                LINE_GPU => {}
                _ => return,
            }
            self.enabled[c].fetch_and(!(1 << line), Ordering::Relaxed);
        }

        /// Calls `f` for each enabled line pending on the calling core.
        pub fn handle(&self, f: &mut dyn FnMut(u32)) {
            let c = core();
            let pending = self.regs().irq_source[c].get() & self.enabled[c].load(Ordering::Relaxed);
            for line in 0..=LINE_PMU {
                if pending & (1 << line) != 0 {
                    f(line);
                }
            }
        }
    }
}
