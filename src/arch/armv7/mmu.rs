//! The ARMv7-A MMU with the Large Physical Address Extension: long-descriptor tables (TTBCR.EAE = 1),
//! 4 KiB granule, translation through TTBR0 only. With TTBCR.T0SZ = 0 TTBR0 covers the whole 4 GiB
//! virtual space and walks start at a level-1 table of four 1 GiB entries. The descriptor format is
//! that of AArch64 stage 1, so the tables themselves are built by `crate::mm::kmap` with the shared
//! long-descriptor code; this file programs the registers and does the TLB maintenance.
//!
//! Register access: aarch32-cpu provides MAIR0/MAIR1, SCTLR and the TLB/I-cache/branch-predictor
//! invalidations used here, but has no TTBCR and only the 32-bit (short-descriptor) TTBR0, and its
//! writers are `nomem` (no ordering against the table stores); those operations are raw
//! `mcr`/`mcrr` below.

use crate::arch::cache;
use crate::mm::addr::PhysAddr;
use crate::mm::pgtable::{PageTableConfig, TlbInvalidation, TlbOps, MAIR0_VALUE, MAIR1_VALUE};
use aarch32_cpu::register::{BpIAll, Iciallu, Mair, Mair0, Mair1, Sctlr, TlbIAll};

/// Shape of the kernel's tables.
pub const KERNEL_TABLES: PageTableConfig = PageTableConfig::LPAE_32;

/// TTBCR: EAE (long descriptors), EPD1 (no TTBR1 walks), SH0 inner shareable, ORGN0 and IRGN0
/// write-back write-allocate (walks are coherent with the data cache), T0SZ = 0.
const TTBCR_VALUE: u32 = (1 << 31) | (1 << 23) | (3 << 12) | (1 << 10) | (1 << 8);
const TTBR_ASID_SHIFT: u64 = 48;

/// The 64-bit TTBR0 value for `root` tagged with `asid` (8 bits on ARMv7).
fn ttbr0(root: PhysAddr, asid: u16) -> u64 {
    root.as_u64() | (u64::from(asid & 0xff) << TTBR_ASID_SHIFT)
}

/// Program MAIR0/1, TTBCR and TTBR0 (root, asid) and turn on the MMU and both caches.
///
/// # Safety
/// The MMU must be off. `root` must identity-map the code, stack, and data in use, and the range
/// `image` (the kernel image) is invalidated from the data cache first, so it must hold no dirty
/// data that matters (true with the caches off: every store so far went to memory).
pub unsafe fn enable(root: PhysAddr, asid: u16, written_uncached: &[(usize, usize)]) {
    // Lines the loader may have left in the caches for our image would shadow what we wrote with
    // the caches off, once they are on.
    for &(start, end) in written_uncached {
        cache::invalidate(start, end.saturating_sub(start));
    }
    let ttbr = ttbr0(root, asid);
    // SAFETY: the MMU is off, so the new regime takes effect only with SCTLR.M below; MAIR0 holds
    // attribute indices 0-3 and MAIR1 4-7 of the shared MAIR value.
    unsafe {
        Mair0::write(Mair::new_with_raw_value(MAIR0_VALUE));
        Mair1::write(Mair::new_with_raw_value(MAIR1_VALUE));
        core::arch::asm!(
            "mcr p15, 0, {ttbcr}, c2, c0, 2",
            "mcrr p15, 0, {lo}, {hi}, c2",
            "isb",
            ttbcr = in(reg) TTBCR_VALUE,
            lo = in(reg) ttbr as u32,
            hi = in(reg) (ttbr >> 32) as u32,
            options(nostack),
        );
    }
    // Only this CPU runs: local invalidation of whatever the loader left in the TLB, the
    // instruction cache and the branch predictor.
    TlbIAll::write();
    Iciallu::write();
    BpIAll::write();
    cache::dsb();
    cache::isb();
    // Sctlr::modify ends with DSB + ISB on ARMv7-A, so the MMU is on when it returns.
    Sctlr::modify(|s| {
        s.set_m(true);
        s.set_c(true);
        s.set_i(true);
        s.set_a(false);
    });
}

/// Physical address bits of the CPU: 40 with LPAE (the kernel's identity map reaches only the
/// 32 bits of its virtual space, where RAM and devices share addresses with the vmap window).
pub fn pa_bits() -> u8 {
    40
}

/// The registers a secondary CPU loads to join this CPU's translation regime, as they are now
/// (the boot parameters of `crate::smp`): MAIR0 | MAIR1 << 32, TTBCR, TTBR0 (root and ASID) and
/// SCTLR.
pub fn secondary_regs() -> [u64; 4] {
    let (mair0, mair1, ttbcr, lo, hi, sctlr): (u32, u32, u32, u32, u32, u32);
    // SAFETY: reads of the current CP15 translation registers; no side effects.
    unsafe {
        core::arch::asm!(
            "mrc p15, 0, {m0}, c10, c2, 0",
            "mrc p15, 0, {m1}, c10, c2, 1",
            "mrc p15, 0, {tc}, c2, c0, 2",
            "mrrc p15, 0, {lo}, {hi}, c2",
            "mrc p15, 0, {sc}, c1, c0, 0",
            m0 = out(reg) mair0,
            m1 = out(reg) mair1,
            tc = out(reg) ttbcr,
            lo = out(reg) lo,
            hi = out(reg) hi,
            sc = out(reg) sctlr,
            options(nomem, nostack, preserves_flags),
        )
    };
    [u64::from(mair0) | u64::from(mair1) << 32, u64::from(ttbcr), u64::from(lo) | u64::from(hi) << 32, u64::from(sctlr)]
}

/// Switch TTBR0 to `root` tagged `asid`, then drop every TLB entry of `old_asid`.
///
/// # Safety
/// The MMU is on and `root` maps everything in use with attributes compatible with the current
/// tables; `asid` differs from `old_asid` (or the old entries are global and identical), so the
/// two sets of entries cannot conflict in the TLB.
pub unsafe fn switch(root: PhysAddr, asid: u16, old_asid: u16) {
    let ttbr = ttbr0(root, asid);
    // SAFETY: the caller guarantees the new tables map what runs; barriers order the table writes
    // before the walk and the TLB invalidation after the switch. TTBR0 carries root and ASID in one
    // 64-bit write, so they change together. TLBIASIDIS drops the old ASID's entries, BPIALLIS the
    // predictions made under the old tables, on every CPU of the inner-shareable domain.
    unsafe {
        core::arch::asm!(
            "dsb ishst",
            "mcrr p15, 0, {lo}, {hi}, c2",
            "isb",
            "mcr p15, 0, {old}, c8, c3, 2",
            "mcr p15, 0, {old}, c7, c1, 6",
            "dsb ish",
            "isb",
            lo = in(reg) ttbr as u32,
            hi = in(reg) (ttbr >> 32) as u32,
            old = in(reg) u32::from(old_asid & 0xff),
            options(nostack),
        )
    };
}

/// Whether the MMU is on (SCTLR.M).
pub fn enabled() -> bool {
    Sctlr::read().m()
}

/// TLB maintenance for the kernel's tables, broadcast to every CPU in the inner-shareable domain.
pub struct CpuTlb;

/// Beyond this many pages one TLBIALLIS is cheaper than per-page invalidation.
const FULL_FLUSH_PAGES: u64 = 64;

impl TlbOps for CpuTlb {
    /// ARMv7 has no last-level-only invalidation: TLBIMVAAIS drops the walk-cache entries for the
    /// address too, so `leaf_only` needs no special case.
    fn invalidate(&mut self, inv: TlbInvalidation) {
        // SAFETY: TLB invalidation has no memory effects beyond dropping cached translations.
        unsafe { core::arch::asm!("dsb ishst", options(nostack)) };
        let granule = inv.granule.max(1);
        if inv.size / granule > FULL_FLUSH_PAGES {
            // SAFETY: as above (TLBIALLIS; the register value is ignored).
            unsafe {
                core::arch::asm!("mcr p15, 0, {}, c8, c3, 0", in(reg) 0u32, options(nostack))
            };
            return;
        }
        let end = inv.va.saturating_add(inv.size);
        let mut va = inv.va;
        while va < end {
            // TLBIMVAAIS takes VA[31:12], all ASIDs; the kernel's VAs are below 4 GiB.
            let arg = (va as u32) & !0xfff;
            // SAFETY: as above.
            unsafe { core::arch::asm!("mcr p15, 0, {}, c8, c3, 3", in(reg) arg, options(nostack)) };
            va = va.saturating_add(granule);
        }
    }

    fn sync(&mut self) {
        // SAFETY: barriers only.
        unsafe { core::arch::asm!("dsb ish", "isb", options(nostack)) };
    }
}
