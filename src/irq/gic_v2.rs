//! Arm GICv2 (GIC-400 on the Pi 4, QEMU virt's "arm,cortex-a15-gic"): distributor and CPU
//! interface, from the GIC Architecture Specification v2 (IHI 0048B), chapter 4.
//!
//! Only what completion interrupts need: the distributor's global enable, per-line enable,
//! priority, target CPU and trigger; the CPU interface's acknowledge / end-of-interrupt loop. Lines
//! are the GIC's interrupt IDs: SGIs 0-15, PPIs 16-31, SPIs from 32. Group and security set-up is
//! left as the firmware made it (a Non-secure kernel cannot change it): enable bit 0 of both
//! control registers is "the group this world's interrupts are in" in every view of the registers.
//!
//! Why not the `arm-gic` crate (0.10.0, evaluated): it builds for both our targets, but its GICv2
//! driver cannot set an SPI's target CPU (ITARGETSR is a plain field with no accessor), so on a
//! GIC with more than one CPU interface (the Pi 4's four cores, QEMU virt with `-smp` > 1) an SPI
//! would never be delivered; its `set_interrupt_priority` writes the whole 32-bit IPRIORITYR word
//! and so resets the priorities of the three neighbouring interrupts; it panics (`unwrap`,
//! `assert!`) on out-of-range IDs where this kernel wants error values; and it pulls in seven
//! more crates (thiserror, zerocopy, safe-mmio, ...) for a hundred lines of register accesses.

use super::{HwIrq, SpecError, Trigger};

/// The GIC architecture's highest usable interrupt ID + 1 (1020-1023 are special).
pub const MAX_LINES: u32 = 1020;
/// Number of SPIs a specifier may name (IDs 32..1020).
const MAX_SPI: u32 = MAX_LINES - 32;

/// The line of a 3-cell GIC specifier `<type number flags>`: type 0 is an SPI (ID 32 + number),
/// type 1 a PPI (ID 16 + number); flags bits 3:0 are the IRQ_TYPE_* trigger (bits 15:8 of a PPI
/// are its CPU mask, which a single-target kernel ignores).
pub fn translate(kind: u32, number: u32, flags: u32) -> Result<HwIrq, SpecError> {
    let hwirq = match kind {
        0 if number < MAX_SPI => 32 + number,
        0 => return Err(SpecError::OutOfRange { what: "SPI number", value: number }),
        1 if number < 16 => 16 + number,
        1 => return Err(SpecError::OutOfRange { what: "PPI number", value: number }),
        _ => return Err(SpecError::OutOfRange { what: "interrupt type (0 SPI, 1 PPI)", value: kind }),
    };
    Ok(HwIrq { hwirq, trigger: Trigger::from_flags(flags & 0xf) })
}

#[cfg(target_os = "none")]
pub use hw::GicV2;

#[cfg(target_os = "none")]
mod hw {
    use super::MAX_LINES;
    use crate::irq::Trigger;
    use tock_registers::interfaces::{Readable, Writeable};
    use tock_registers::register_structs;
    use tock_registers::registers::{ReadOnly, ReadWrite, WriteOnly};

    register_structs! {
        Distributor {
            (0x000 => ctlr: ReadWrite<u32>),
            (0x004 => typer: ReadOnly<u32>),
            (0x008 => _reserved0),
            (0x100 => isenabler: [ReadWrite<u32>; 32]),
            (0x180 => icenabler: [ReadWrite<u32>; 32]),
            (0x200 => _reserved1),
            (0x280 => icpendr: [ReadWrite<u32>; 32]),
            (0x300 => _reserved2),
            (0x400 => ipriorityr: [ReadWrite<u8>; 1024]),
            (0x800 => itargetsr: [ReadWrite<u8>; 1024]),
            (0xc00 => icfgr: [ReadWrite<u32>; 64]),
            (0xd00 => @END),
        }
    }

    register_structs! {
        CpuInterface {
            (0x00 => ctlr: ReadWrite<u32>),
            (0x04 => pmr: ReadWrite<u32>),
            (0x08 => bpr: ReadWrite<u32>),
            (0x0c => iar: ReadOnly<u32>),
            (0x10 => eoir: WriteOnly<u32>),
            (0x14 => @END),
        }
    }

    /// Priority given to every line enabled here (mid-range: below any the firmware may use for
    /// its own, above the priority mask's floor).
    const PRIORITY: u8 = 0xa0;
    /// Interrupts acknowledged per dispatch at most, so a line that never stops asserting cannot
    /// keep the CPU in the handler for ever.
    const MAX_PER_DISPATCH: usize = 64;

    /// One GICv2, by the addresses of its mapped distributor and CPU interface.
    pub struct GicV2 {
        dist: usize,
        cpu: usize,
        lines: u32,
    }

    impl GicV2 {
        /// Takes over the GIC: every line disabled and its pending state cleared, the distributor
        /// and this CPU's interface enabled with the lowest priority mask.
        ///
        /// # Safety
        /// `dist` and `cpu` must be the mapped (device memory) distributor and CPU interface
        /// blocks of one GICv2, which nothing else drives from now on.
        pub unsafe fn new(dist: usize, cpu: usize) -> GicV2 {
            let mut gic = GicV2 { dist, cpu, lines: 32 };
            let typer = gic.d().typer.get();
            gic.lines = (((typer & 0x1f) + 1) * 32).min(MAX_LINES);
            let words = gic.lines.div_ceil(32) as usize;
            for i in 0..words {
                gic.d().icenabler[i].set(u32::MAX);
                gic.d().icpendr[i].set(u32::MAX);
            }
            let d = gic.d();
            d.ctlr.set(d.ctlr.get() | 1);
            let c = gic.c();
            c.pmr.set(0xff);
            c.bpr.set(0);
            c.ctlr.set(1);
            gic
        }

        fn d(&self) -> &Distributor {
            // SAFETY: `new`'s contract: the distributor block is mapped at `dist` for as long as
            // this value lives.
            unsafe { &*(self.dist as *const Distributor) }
        }

        fn c(&self) -> &CpuInterface {
            // SAFETY: as in `d`, for the CPU interface.
            unsafe { &*(self.cpu as *const CpuInterface) }
        }

        /// Interrupt IDs the distributor implements (TYPER.ITLinesNumber).
        pub fn lines(&self) -> u32 {
            self.lines
        }

        /// Enables `hwirq` with `trigger` (configurable for SPIs only), targeted at the calling
        /// CPU. `false` if the GIC has no such line.
        pub fn enable(&self, hwirq: u32, trigger: Trigger) -> bool {
            if hwirq >= self.lines {
                return false;
            }
            let n = hwirq as usize;
            let d = self.d();
            d.ipriorityr[n].set(PRIORITY);
            if hwirq >= 32 {
                // Reading any of ITARGETSR0-7 returns the reading CPU's own bit; 0 on a GIC
                // with one CPU interface, whose target fields are then read-only.
                let me = d.itargetsr[0].get();
                if me != 0 {
                    d.itargetsr[n].set(me);
                }
                let bit = 1u32 << ((n % 16) * 2 + 1);
                let cfg = d.icfgr[n / 16].get();
                d.icfgr[n / 16].set(match trigger {
                    Trigger::Edge => cfg | bit,
                    Trigger::Level => cfg & !bit,
                });
            }
            d.isenabler[n / 32].set(1 << (n % 32));
            true
        }

        /// Disables `hwirq` (nothing for a line the GIC does not have).
        pub fn disable(&self, hwirq: u32) {
            if hwirq < self.lines {
                self.d().icenabler[hwirq as usize / 32].set(1 << (hwirq % 32));
            }
        }

        /// Acknowledges each pending interrupt, calls `f` with its ID, then ends it.
        pub fn handle(&self, f: &mut dyn FnMut(u32)) {
            let c = self.c();
            for _ in 0..MAX_PER_DISPATCH {
                let iar = c.iar.get();
                let id = iar & 0x3ff;
                if id >= MAX_LINES {
                    break;
                }
                f(id);
                c.eoir.set(iar);
            }
        }
    }
}
