//! The PMU cycle counter, for benchmarks that need 1 ns resolution per sample: the generic timer
//! QEMU virt programs ticks at 62.5 MHz (16 ns), too coarse to time one DMA map. QEMU clocks the
//! PMU's cycle counter from virtual time at 1 GHz, so under `--icount` one cycle is one
//! instruction; [`Cycles::start`] measures the ratio against the generic timer rather than
//! assuming it, so the figures stay in nanoseconds on other hosts. Without a PMU the generic
//! timer stands in.

use crate::arch::counter;

/// A started cycle counter and its calibration.
#[derive(Clone, Copy)]
pub struct Cycles {
    /// Picoseconds per count, measured.
    ps_per_count: u64,
    pmu: bool,
    /// The bits the counter has: a difference of two reads is taken modulo this width.
    mask: u64,
}

impl Cycles {
    /// Enables the PMU cycle counter if the CPU has one and calibrates it against the generic
    /// timer over about a million cycles.
    pub fn start() -> Cycles {
        let pmu = arch::enable();
        let mask = if pmu { arch::MASK } else { u64::MAX };
        let mut c = Cycles { ps_per_count: 0, pmu, mask };
        let (t0, c0) = (counter::read(), c.read());
        let mut spin = 0u64;
        while c.delta(c0, c.read()) < 1_000_000 && spin < 100_000_000 {
            spin += 1;
        }
        let (t1, c1) = (counter::read(), c.read());
        let ps = u128::from(t1.wrapping_sub(t0)) * 1_000_000_000_000 / u128::from(counter::frequency().max(1));
        c.ps_per_count = u64::try_from(ps / u128::from(c.delta(c0, c1).max(1))).unwrap_or(u64::MAX);
        c
    }

    /// The same counter on the calling CPU (each CPU has its own PMU): enables it there and keeps
    /// this calibration (QEMU clocks every CPU's cycle counter from the same virtual time). Falls
    /// back to the generic timer, recalibrated, if this CPU has no PMU.
    pub fn on_this_cpu(&self) -> Cycles {
        if self.pmu && arch::enable() {
            *self
        } else {
            Cycles::start()
        }
    }

    /// Whether the PMU counts (else the generic timer does).
    pub fn is_pmu(&self) -> bool {
        self.pmu
    }

    /// The current count.
    #[inline(always)]
    pub fn read(&self) -> u64 {
        if self.pmu {
            arch::read()
        } else {
            counter::read()
        }
    }

    /// Counts from `c0` to `c1` (two [`Cycles::read`]s), modulo the counter's width.
    #[inline(always)]
    pub fn elapsed(&self, c0: u64, c1: u64) -> u64 {
        self.delta(c0, c1)
    }

    /// Counts from `c0` to `c1`, modulo the counter's width.
    #[inline(always)]
    fn delta(&self, c0: u64, c1: u64) -> u64 {
        c1.wrapping_sub(c0) & self.mask
    }

    /// Picoseconds per count.
    pub fn ps_per_count(&self) -> u64 {
        self.ps_per_count
    }

    /// Runs `op` between two reads; returns its result and the counts between them.
    #[inline(always)]
    pub fn timed<T>(&self, op: impl FnOnce() -> T) -> (T, u64) {
        let c0 = self.read();
        let r = op();
        let c1 = self.read();
        (r, self.delta(c0, c1))
    }
}

#[cfg(target_arch = "aarch64")]
mod arch {
    /// PMCCNTR_EL0 has 64 bits.
    pub const MASK: u64 = u64::MAX;

    /// Turns the cycle counter on (PMCR_EL0.E, PMCNTENSET_EL0.C, counting at EL1); false when
    /// ID_AA64DFR0_EL1.PMUVer says there is no PMU.
    pub fn enable() -> bool {
        let dfr0: u64;
        // SAFETY: reading an ID register has no side effects.
        unsafe { core::arch::asm!("mrs {}, id_aa64dfr0_el1", out(reg) dfr0, options(nomem, nostack)) };
        let ver = (dfr0 >> 8) & 0xf;
        if ver == 0 || ver == 0xf {
            return false;
        }
        // SAFETY: the PMU belongs to the benchmarks (nothing else in the kernel uses it); E enables
        // the counters, C resets the cycle counter, the filter counts at EL1 and EL0.
        unsafe {
            core::arch::asm!(
                "msr pmccfiltr_el0, xzr",
                "msr pmcntenset_el0, {c}",
                "mrs {t}, pmcr_el0",
                "orr {t}, {t}, #1",
                "orr {t}, {t}, #4",
                "bic {t}, {t}, #8",
                "msr pmcr_el0, {t}",
                "isb",
                c = in(reg) 1u64 << 31,
                t = out(reg) _,
                options(nostack)
            )
        };
        true
    }

    #[inline(always)]
    pub fn read() -> u64 {
        let v: u64;
        // SAFETY: reading the cycle counter has no side effects; the ISB keeps it in order.
        unsafe { core::arch::asm!("isb", "mrs {}, pmccntr_el0", out(reg) v, options(nostack)) };
        v
    }
}

#[cfg(target_arch = "arm")]
mod arch {
    /// PMCCNTR has 32 bits: a difference of up to about 4 s at 1 GHz comes out right.
    pub const MASK: u64 = 0xffff_ffff;

    /// Turns the cycle counter on (PMCR.E, PMCNTENSET.C; PMCR.D off so it counts every cycle);
    /// false when ID_DFR0.PerfMon says there is no PMUv1/v2.
    pub fn enable() -> bool {
        let dfr0: u32;
        // SAFETY: reading an ID register has no side effects.
        unsafe { core::arch::asm!("mrc p15, 0, {}, c0, c1, 2", out(reg) dfr0, options(nomem, nostack)) };
        let ver = (dfr0 >> 24) & 0xf;
        if ver == 0 || ver == 0xf {
            return false;
        }
        // SAFETY: as on aarch64: the PMU belongs to the benchmarks.
        unsafe {
            core::arch::asm!(
                "mcr p15, 0, {c}, c9, c12, 1",
                "mrc p15, 0, {t}, c9, c12, 0",
                "orr {t}, {t}, #5",
                "bic {t}, {t}, #8",
                "mcr p15, 0, {t}, c9, c12, 0",
                "isb",
                c = in(reg) 1u32 << 31,
                t = out(reg) _,
                options(nostack)
            )
        };
        true
    }

    /// The 32-bit cycle count.
    #[inline(always)]
    pub fn read() -> u64 {
        let v: u32;
        // SAFETY: reading the cycle counter has no side effects; the ISB keeps it in order.
        unsafe { core::arch::asm!("isb", "mrc p15, 0, {}, c9, c13, 0", out(reg) v, options(nostack)) };
        u64::from(v)
    }
}
