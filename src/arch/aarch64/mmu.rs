//! The AArch64 stage-1 regime of EL1: 4 KiB granule, 48-bit virtual addresses (walks from level 0),
//! translation through TTBR0_EL1 only. The tables themselves are built by `crate::mm::kmap` with the
//! shared long-descriptor code; this file programs the registers and does the TLB maintenance.

use crate::arch::cache;
use crate::mm::addr::PhysAddr;
use crate::mm::pgtable::{PageTableConfig, TlbInvalidation, TlbOps, MAIR_VALUE};
use aarch64_cpu::registers::{Readable, ReadWriteable, Writeable, ID_AA64MMFR0_EL1, MAIR_EL1, SCTLR_EL1, TCR_EL1, TTBR0_EL1};

/// Shape of the kernel's tables.
pub const KERNEL_TABLES: PageTableConfig = PageTableConfig::AARCH64_48;

/// Program MAIR, TCR and TTBR0 (root, asid) and turn on the MMU and both caches.
///
/// # Safety
/// The MMU must be off. `root` must identity-map the code, stack, and data in use. The ranges
/// `written_uncached` (everything stored to with the caches off that is read later: the image's
/// data and bss, the boot stack, the early tables) are invalidated from the data cache first, so
/// that lines the loader left there cannot shadow those stores; they must hold no dirty data that
/// matters (true with the caches off: every store so far went to memory).
pub unsafe fn enable(root: PhysAddr, asid: u16, written_uncached: &[(usize, usize)]) {
    // Lines the loader may have left in the caches for our image would shadow what we wrote with
    // the caches off, once they are on.
    for &(start, end) in written_uncached {
        cache::invalidate(start, end.saturating_sub(start));
    }
    MAIR_EL1.set(MAIR_VALUE);
    let pa_range = ID_AA64MMFR0_EL1.read(ID_AA64MMFR0_EL1::PARange).min(5);
    TCR_EL1.write(
        TCR_EL1::T0SZ.val(64 - KERNEL_TABLES.va_bits as u64)
            + TCR_EL1::TG0::KiB_4
            + TCR_EL1::SH0::Inner
            + TCR_EL1::IRGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
            + TCR_EL1::ORGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
            + TCR_EL1::EPD1::DisableTTBR1Walks
            + TCR_EL1::IPS.val(pa_range),
    );
    TTBR0_EL1.write(TTBR0_EL1::ASID.val(asid as u64) + TTBR0_EL1::BADDR.val(root.as_u64() >> 1));
    cache::isb();
    // SAFETY: invalidating every EL1 TLB entry is always allowed.
    unsafe { core::arch::asm!("tlbi vmalle1", "dsb nsh", "isb", options(nostack)) };
    SCTLR_EL1.modify(SCTLR_EL1::M::Enable + SCTLR_EL1::C::Cacheable + SCTLR_EL1::I::Cacheable + SCTLR_EL1::A::Disable);
    cache::isb();
}

/// Physical address bits of the CPU (ID_AA64MMFR0_EL1.PARange): no RAM or device lies at or
/// above `1 << pa_bits()`.
pub fn pa_bits() -> u8 {
    match ID_AA64MMFR0_EL1.read(ID_AA64MMFR0_EL1::PARange) {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        _ => 52,
    }
}

/// The registers a secondary CPU loads to join this CPU's translation regime: MAIR, TCR, TTBR0
/// (root and ASID) and SCTLR, as they are now (the boot parameters of `crate::smp`).
pub fn secondary_regs() -> [u64; 4] {
    [MAIR_EL1.get(), TCR_EL1.get(), TTBR0_EL1.get(), SCTLR_EL1.get()]
}

/// Switch TTBR0 to `root` tagged `asid`, then drop every TLB entry of `old_asid`.
///
/// # Safety
/// The MMU is on and `root` maps everything in use with attributes compatible with the current
/// tables; `asid` differs from `old_asid` (or the old entries are global and identical), so the
/// two sets of entries cannot conflict in the TLB.
pub unsafe fn switch(root: PhysAddr, asid: u16, old_asid: u16) {
    // SAFETY: the caller guarantees the new tables map what runs; barriers order the table writes
    // before the walk and the TLB invalidation after the switch.
    unsafe {
        core::arch::asm!(
            "dsb ishst",
            "msr ttbr0_el1, {ttbr}",
            "isb",
            "tlbi aside1is, {old}",
            "dsb ish",
            "isb",
            ttbr = in(reg) root.as_u64() | ((asid as u64) << 48),
            old = in(reg) (old_asid as u64) << 48,
            options(nostack),
        )
    };
}

/// Whether the MMU is on (SCTLR_EL1.M).
pub fn enabled() -> bool {
    SCTLR_EL1.is_set(SCTLR_EL1::M)
}

/// TLB maintenance for the kernel's tables, broadcast to every CPU in the inner-shareable domain.
pub struct CpuTlb;

/// Beyond this many pages one `vmalle1is` is cheaper than per-page invalidation.
const FULL_FLUSH_PAGES: u64 = 64;

impl TlbOps for CpuTlb {
    fn invalidate(&mut self, inv: TlbInvalidation) {
        // SAFETY: TLB invalidation has no memory effects beyond dropping cached translations.
        unsafe { core::arch::asm!("dsb ishst", options(nostack)) };
        if inv.size / inv.granule > FULL_FLUSH_PAGES {
            // SAFETY: as above.
            unsafe { core::arch::asm!("tlbi vmalle1is", options(nostack)) };
            return;
        }
        let mut va = inv.va;
        while va < inv.va + inv.size {
            let arg = (va >> 12) & ((1 << 44) - 1);
            // SAFETY: as above.
            unsafe {
                if inv.leaf_only {
                    core::arch::asm!("tlbi vaale1is, {}", in(reg) arg, options(nostack));
                } else {
                    core::arch::asm!("tlbi vaae1is, {}", in(reg) arg, options(nostack));
                }
            }
            va += inv.granule;
        }
    }

    fn sync(&mut self) {
        // SAFETY: barriers only.
        unsafe { core::arch::asm!("dsb ish", "isb", options(nostack)) };
    }
}
