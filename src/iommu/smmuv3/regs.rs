//! The SMMUv3 register file (Arm IHI 0070, chapter 6) and what the ID registers say about an
//! implementation.
//!
//! The layout is a tock-registers `register_structs!`, which checks every offset at compile time.
//! Every register is declared 32 bits wide, the 64-bit ones (`*_BASE`) as a pair of halves written
//! low then high: the architecture never requires a 64-bit single-copy-atomic register access (Arm's
//! own MMU-600 has only a 32-bit programming interface), QEMU's model takes 32-bit accesses on every
//! register but 64-bit ones on only five, and an armv7 `strd` may be one 64-bit or two 32-bit bus
//! accesses depending on the CPU. One access width then serves both architectures and real
//! hardware. The base registers are only written while their queue or table is disabled, so the
//! moment between the two halves is never observed.
//!
//! [`Features::from_idr`] is pure (host-tested with the values QEMU's model reports).

use core::fmt;

use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::registers::{ReadOnly, ReadWrite};
use tock_registers::{register_bitfields, register_structs, LocalRegisterCopy};

register_bitfields! {u32,
    pub IDR0 [
        S2P OFFSET(0) NUMBITS(1) [],
        S1P OFFSET(1) NUMBITS(1) [],
        /// Translation table formats: 0b01 AArch32, 0b10 AArch64, 0b11 both.
        TTF OFFSET(2) NUMBITS(2) [],
        COHACC OFFSET(4) NUMBITS(1) [],
        HYP OFFSET(9) NUMBITS(1) [],
        ASID16 OFFSET(12) NUMBITS(1) [],
        MSI OFFSET(13) NUMBITS(1) [],
        /// 0b00 mixed endian, 0b10 little endian only, 0b11 big endian only.
        TTENDIAN OFFSET(21) NUMBITS(2) [],
        /// Stream table formats: 0b00 linear only, 0b01 linear and 2-level.
        ST_LEVEL OFFSET(27) NUMBITS(2) []
    ],
    pub IDR1 [
        SIDSIZE OFFSET(0) NUMBITS(6) [],
        SSIDSIZE OFFSET(6) NUMBITS(5) [],
        EVENTQS OFFSET(16) NUMBITS(5) [],
        CMDQS OFFSET(21) NUMBITS(5) [],
        /// Base addresses in the `*_BASE` registers are relative (to an implementation-defined
        /// base): only meaningful with the PRESET bits.
        REL OFFSET(28) NUMBITS(1) [],
        QUEUES_PRESET OFFSET(29) NUMBITS(1) [],
        TABLES_PRESET OFFSET(30) NUMBITS(1) []
    ],
    pub IDR3 [
        HAD OFFSET(2) NUMBITS(1) [],
        /// Range invalidation (TLBI by range, SMMUv3.2).
        RIL OFFSET(10) NUMBITS(1) []
    ],
    pub IDR5 [
        /// Output address size: 0 32, 1 36, 2 40, 3 42, 4 44, 5 48, 6 52 bits.
        OAS OFFSET(0) NUMBITS(3) [],
        GRAN4K OFFSET(4) NUMBITS(1) [],
        GRAN16K OFFSET(5) NUMBITS(1) [],
        GRAN64K OFFSET(6) NUMBITS(1) []
    ],
    pub AIDR [
        MINOR OFFSET(0) NUMBITS(4) [],
        MAJOR OFFSET(4) NUMBITS(4) []
    ],
    pub CR0 [
        SMMUEN OFFSET(0) NUMBITS(1) [],
        PRIQEN OFFSET(1) NUMBITS(1) [],
        EVENTQEN OFFSET(2) NUMBITS(1) [],
        CMDQEN OFFSET(3) NUMBITS(1) []
    ],
    pub CR1 [
        /// Cacheability of queue accesses: 0 non-cacheable, 1 write-back, 2 write-through.
        QUEUE_IC OFFSET(0) NUMBITS(2) [],
        QUEUE_OC OFFSET(2) NUMBITS(2) [],
        /// Shareability: 0 non-shareable, 2 outer, 3 inner.
        QUEUE_SH OFFSET(4) NUMBITS(2) [],
        TABLE_IC OFFSET(6) NUMBITS(2) [],
        TABLE_OC OFFSET(8) NUMBITS(2) [],
        TABLE_SH OFFSET(10) NUMBITS(2) []
    ],
    pub CR2 [
        E2H OFFSET(0) NUMBITS(1) [],
        /// Record C_BAD_STREAMID events for out-of-range StreamIDs.
        RECINVSID OFFSET(1) NUMBITS(1) [],
        /// Private TLB maintenance: ignore broadcast TLB invalidations from the CPUs.
        PTM OFFSET(2) NUMBITS(1) []
    ],
    pub IRQ_CTRL [
        GERROR_IRQEN OFFSET(0) NUMBITS(1) [],
        PRIQ_IRQEN OFFSET(1) NUMBITS(1) [],
        EVENTQ_IRQEN OFFSET(2) NUMBITS(1) []
    ],
    pub STRTAB_BASE_CFG [
        LOG2SIZE OFFSET(0) NUMBITS(6) [],
        SPLIT OFFSET(6) NUMBITS(5) [],
        /// 0 linear, 1 2-level.
        FMT OFFSET(16) NUMBITS(2) []
    ]
}

register_structs! {
    /// Pages 0 and 1 of the register file (the event queue's PROD/CONS live in page 1).
    pub Registers {
        (0x00 => pub idr0: ReadOnly<u32, IDR0::Register>),
        (0x04 => pub idr1: ReadOnly<u32, IDR1::Register>),
        (0x08 => pub idr2: ReadOnly<u32>),
        (0x0c => pub idr3: ReadOnly<u32, IDR3::Register>),
        (0x10 => pub idr4: ReadOnly<u32>),
        (0x14 => pub idr5: ReadOnly<u32, IDR5::Register>),
        (0x18 => pub iidr: ReadOnly<u32>),
        (0x1c => pub aidr: ReadOnly<u32, AIDR::Register>),
        (0x20 => pub cr0: ReadWrite<u32, CR0::Register>),
        (0x24 => pub cr0ack: ReadOnly<u32, CR0::Register>),
        (0x28 => pub cr1: ReadWrite<u32, CR1::Register>),
        (0x2c => pub cr2: ReadWrite<u32, CR2::Register>),
        (0x30 => _reserved0),
        (0x50 => pub irq_ctrl: ReadWrite<u32, IRQ_CTRL::Register>),
        (0x54 => pub irq_ctrlack: ReadOnly<u32, IRQ_CTRL::Register>),
        (0x58 => _reserved1),
        /// Active global errors are the bits where GERROR and GERRORN differ; software acknowledges
        /// by making GERRORN equal to GERROR.
        (0x60 => pub gerror: ReadOnly<u32>),
        (0x64 => pub gerrorn: ReadWrite<u32>),
        (0x68 => _reserved2),
        /// STRTAB_BASE: RA bit 62, ADDR [51:6].
        (0x80 => pub strtab_base: [ReadWrite<u32>; 2]),
        (0x88 => pub strtab_base_cfg: ReadWrite<u32, STRTAB_BASE_CFG::Register>),
        (0x8c => _reserved3),
        /// CMDQ_BASE: RA bit 62, ADDR [51:5], LOG2SIZE [4:0].
        (0x90 => pub cmdq_base: [ReadWrite<u32>; 2]),
        /// Queue index with its wrap bit in [19:0].
        (0x98 => pub cmdq_prod: ReadWrite<u32>),
        /// Index with wrap bit in [19:0], ERR [30:24].
        (0x9c => pub cmdq_cons: ReadWrite<u32>),
        /// EVENTQ_BASE: WA bit 62, ADDR [51:5], LOG2SIZE [4:0].
        (0xa0 => pub eventq_base: [ReadWrite<u32>; 2]),
        (0xa8 => _reserved4),
        /// Index with wrap bit; OVFLG bit 31.
        (0x100a8 => pub eventq_prod: ReadWrite<u32>),
        /// Index with wrap bit; OVACKFLG bit 31.
        (0x100ac => pub eventq_cons: ReadWrite<u32>),
        (0x100b0 => @END),
    }
}

/// Bytes of register file the driver touches: pages 0 and 1.
pub const REGISTER_SPAN: u64 = 0x20000;

/// The `*_BASE` registers' read-allocate (STRTAB, CMDQ) or write-allocate (EVENTQ) hint, bit 62.
pub const BASE_ALLOCATE_HINT: u64 = 1 << 62;
/// CMDQ_CONS.ERR.
pub const CONS_ERR_SHIFT: u32 = 24;
pub const CONS_ERR_MASK: u32 = 0x7f;
/// EVENTQ_PROD.OVFLG / EVENTQ_CONS.OVACKFLG.
pub const EVENTQ_OVERFLOW: u32 = 1 << 31;

/// GERROR / GERRORN bits.
pub mod gerror {
    pub const CMDQ_ERR: u32 = 1 << 0;
    pub const EVENTQ_ABT_ERR: u32 = 1 << 2;
    pub const PRIQ_ABT_ERR: u32 = 1 << 3;
    pub const MSI_CMDQ_ABT_ERR: u32 = 1 << 4;
    pub const MSI_EVENTQ_ABT_ERR: u32 = 1 << 5;
    pub const MSI_PRIQ_ABT_ERR: u32 = 1 << 6;
    pub const MSI_GERROR_ABT_ERR: u32 = 1 << 7;
    pub const SFM_ERR: u32 = 1 << 8;
    pub const CMDQP_ERR: u32 = 1 << 9;
    /// Every bit the architecture defines, with its name.
    pub const NAMES: [(u32, &str); 9] = [
        (CMDQ_ERR, "CMDQ_ERR (command queue error)"),
        (EVENTQ_ABT_ERR, "EVENTQ_ABT_ERR (event queue write aborted or queue full: events lost)"),
        (PRIQ_ABT_ERR, "PRIQ_ABT_ERR (PRI queue write aborted)"),
        (MSI_CMDQ_ABT_ERR, "MSI_CMDQ_ABT_ERR (CMD_SYNC MSI write aborted)"),
        (MSI_EVENTQ_ABT_ERR, "MSI_EVENTQ_ABT_ERR (event queue MSI write aborted)"),
        (MSI_PRIQ_ABT_ERR, "MSI_PRIQ_ABT_ERR (PRI queue MSI write aborted)"),
        (MSI_GERROR_ABT_ERR, "MSI_GERROR_ABT_ERR (global error MSI write aborted)"),
        (SFM_ERR, "SFM_ERR (service failure mode: the SMMU stopped translating)"),
        (CMDQP_ERR, "CMDQP_ERR (command queue control page error)"),
    ];
}

/// The active global errors of a GERROR/GERRORN pair, displayed by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalErrors(pub u32);

impl GlobalErrors {
    /// The errors active when GERROR reads `gerror` and GERRORN reads `gerrorn`.
    pub const fn active(gerror: u32, gerrorn: u32) -> GlobalErrors {
        GlobalErrors(gerror ^ gerrorn)
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub const fn contains(self, bit: u32) -> bool {
        self.0 & bit != 0
    }
}

impl fmt::Display for GlobalErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        let mut known = 0;
        let mut first = true;
        for (bit, name) in gerror::NAMES {
            if self.0 & bit != 0 {
                write!(f, "{}{name}", if first { "" } else { ", " })?;
                known |= bit;
                first = false;
            }
        }
        if self.0 & !known != 0 {
            write!(f, "{}unknown bits {:#x}", if first { "" } else { ", " }, self.0 & !known)?;
        }
        Ok(())
    }
}

/// Writes a 64-bit register as two 32-bit halves, low first (see the module documentation).
pub fn write_pair(reg: &[ReadWrite<u32>; 2], value: u64) {
    reg[0].set(value as u32);
    reg[1].set((value >> 32) as u32);
}

/// Reads a 64-bit register as two 32-bit halves.
pub fn read_pair(reg: &[ReadWrite<u32>; 2]) -> u64 {
    u64::from(reg[0].get()) | (u64::from(reg[1].get()) << 32)
}

/// Why an SMMU cannot be used by this driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsupported {
    /// IDR0.S1P = 0: no stage-1 translation (the driver builds stage-1 tables only).
    NoStage1,
    /// IDR0.TTF lacks AArch64 tables (the only format the shared page-table code writes).
    NoAArch64Tables,
    /// IDR5.GRAN4K = 0.
    No4KGranule,
    /// IDR0.TTENDIAN says big-endian tables only.
    BigEndianOnly,
    /// IDR1.TABLES_PRESET or QUEUES_PRESET: fixed table or queue addresses.
    Preset,
    /// IDR1.CMDQS or EVENTQS is 0: a queue of one entry cannot hold a command and its CMD_SYNC.
    QueueTooSmall,
    /// IDR5.OAS is smaller than the 32 bits the page-table code needs.
    OutputTooNarrow,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unsupported::NoStage1 => "no stage-1 translation (IDR0.S1P = 0)",
            Unsupported::NoAArch64Tables => "no AArch64 translation tables (IDR0.TTF)",
            Unsupported::No4KGranule => "no 4 KiB translation granule (IDR5.GRAN4K = 0)",
            Unsupported::BigEndianOnly => "big-endian translation tables only (IDR0.TTENDIAN)",
            Unsupported::Preset => "fixed stream table or queue addresses (IDR1.*_PRESET)",
            Unsupported::QueueTooSmall => "a command or event queue of a single entry (IDR1.CMDQS/EVENTQS)",
            Unsupported::OutputTooNarrow => "an output address size below 32 bits (IDR5.OAS)",
        })
    }
}

/// What the ID registers say, reduced to what the driver uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// Architecture version from AIDR: (3, minor).
    pub version: (u8, u8),
    /// StreamID bits (IDR1.SIDSIZE).
    pub sid_bits: u8,
    /// 2-level stream tables are supported (IDR0.ST_LEVEL = 1).
    pub two_level: bool,
    /// The SMMU's table and queue accesses can be cache-coherent (IDR0.COHACC).
    pub coherent_access: bool,
    /// 16 or 8.
    pub asid_bits: u8,
    /// EL2 translation regimes exist (IDR0.HYP): TLBI_EL2_ALL belongs to the reset sequence.
    pub hyp: bool,
    pub stage2: bool,
    pub msi: bool,
    /// TLBI by range (IDR3.RIL).
    pub range_invalidation: bool,
    /// Output address bits, capped at 48 (the page-table code has no 52-bit format).
    pub oa_bits: u8,
    /// The CD.IPS encoding matching `oa_bits`.
    pub ips: u8,
    /// Largest queues the SMMU accepts, as log2 of the number of entries.
    pub cmdq_max_log2: u8,
    pub eventq_max_log2: u8,
}

/// Output address size encodings of IDR5.OAS and CD.IPS, in bits.
const OAS_BITS: [u8; 7] = [32, 36, 40, 42, 44, 48, 52];
/// Largest encoding the page-table code handles: 48 bits.
const MAX_IPS: u8 = 5;

impl Features {
    /// Decodes IDR0, IDR1, IDR3, IDR5 and AIDR, refusing an SMMU this driver cannot use.
    pub fn from_idr(idr0: u32, idr1: u32, idr3: u32, idr5: u32, aidr: u32) -> Result<Features, Unsupported> {
        let idr0 = LocalRegisterCopy::<u32, IDR0::Register>::new(idr0);
        let idr1 = LocalRegisterCopy::<u32, IDR1::Register>::new(idr1);
        let idr3 = LocalRegisterCopy::<u32, IDR3::Register>::new(idr3);
        let idr5 = LocalRegisterCopy::<u32, IDR5::Register>::new(idr5);
        let aidr = LocalRegisterCopy::<u32, AIDR::Register>::new(aidr);
        if !idr0.is_set(IDR0::S1P) {
            return Err(Unsupported::NoStage1);
        }
        if idr0.read(IDR0::TTF) & 0b10 == 0 {
            return Err(Unsupported::NoAArch64Tables);
        }
        if !idr5.is_set(IDR5::GRAN4K) {
            return Err(Unsupported::No4KGranule);
        }
        if idr0.read(IDR0::TTENDIAN) == 0b11 {
            return Err(Unsupported::BigEndianOnly);
        }
        if idr1.is_set(IDR1::TABLES_PRESET) || idr1.is_set(IDR1::QUEUES_PRESET) {
            return Err(Unsupported::Preset);
        }
        let (cmdq, eventq) = (idr1.read(IDR1::CMDQS) as u8, idr1.read(IDR1::EVENTQS) as u8);
        if cmdq == 0 || eventq == 0 {
            return Err(Unsupported::QueueTooSmall);
        }
        // Reserved OAS encodings (7) read as the largest defined size, as Linux does.
        let ips = (idr5.read(IDR5::OAS) as u8).min(OAS_BITS.len() as u8 - 1).min(MAX_IPS);
        Ok(Features {
            version: (aidr.read(AIDR::MAJOR) as u8 + 3, aidr.read(AIDR::MINOR) as u8),
            sid_bits: idr1.read(IDR1::SIDSIZE) as u8,
            two_level: idr0.read(IDR0::ST_LEVEL) == 1,
            coherent_access: idr0.is_set(IDR0::COHACC),
            asid_bits: if idr0.is_set(IDR0::ASID16) { 16 } else { 8 },
            hyp: idr0.is_set(IDR0::HYP),
            stage2: idr0.is_set(IDR0::S2P),
            msi: idr0.is_set(IDR0::MSI),
            range_invalidation: idr3.is_set(IDR3::RIL),
            oa_bits: OAS_BITS[ips as usize],
            ips,
            cmdq_max_log2: cmdq,
            eventq_max_log2: eventq,
        })
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor) = self.version;
        write!(
            f,
            "SMMUv{major}.{minor}, stage 1{}, {} SID bits ({} stream table), {}-bit ASIDs, {}-bit output, {}",
            if self.stage2 { " and 2" } else { "" },
            self.sid_bits,
            if self.two_level { "linear or 2-level" } else { "linear" },
            self.asid_bits,
            self.oa_bits,
            if self.range_invalidation { "range TLBI" } else { "per-page TLBI" },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values QEMU 7.2's model reports (see /work/shared/reference/smmu-virt.md), decoded by
    /// hand from the field positions of IHI 0070 section 6.3.
    #[test]
    fn qemu_ids() {
        let f = Features::from_idr(0x0d40_101a, 0x0273_0010, 0x1404, 0x74, 1).unwrap();
        assert_eq!(
            f,
            Features {
                version: (3, 1),
                sid_bits: 16,
                two_level: true,
                coherent_access: true,
                asid_bits: 16,
                hyp: false,
                stage2: false,
                msi: false,
                range_invalidation: true,
                oa_bits: 44,
                ips: 4,
                cmdq_max_log2: 19,
                eventq_max_log2: 19,
            }
        );
        assert_eq!(
            f.to_string(),
            "SMMUv3.1, stage 1, 16 SID bits (linear or 2-level stream table), 16-bit ASIDs, 44-bit output, range TLBI"
        );
    }

    #[test]
    fn refusals() {
        let ok0 = 0x0d40_101a;
        // S1P cleared (bit 1).
        assert_eq!(Features::from_idr(ok0 & !2, 0x0273_0010, 0, 0x74, 0), Err(Unsupported::NoStage1));
        // TTF = AArch32 only (0b01 in [3:2]).
        assert_eq!(Features::from_idr((ok0 & !0xc) | 0x4, 0x0273_0010, 0, 0x74, 0), Err(Unsupported::NoAArch64Tables));
        // TTF = both formats is fine.
        assert!(Features::from_idr(ok0 | 0xc, 0x0273_0010, 0, 0x74, 0).is_ok());
        // GRAN4K cleared (bit 4 of IDR5).
        assert_eq!(Features::from_idr(ok0, 0x0273_0010, 0, 0x64, 0), Err(Unsupported::No4KGranule));
        // TTENDIAN = 0b11 (bits 22:21).
        assert_eq!(Features::from_idr(ok0 | (3 << 21), 0x0273_0010, 0, 0x74, 0), Err(Unsupported::BigEndianOnly));
        // TABLES_PRESET (bit 30), QUEUES_PRESET (bit 29).
        assert_eq!(Features::from_idr(ok0, 0x4273_0010, 0, 0x74, 0), Err(Unsupported::Preset));
        assert_eq!(Features::from_idr(ok0, 0x2273_0010, 0, 0x74, 0), Err(Unsupported::Preset));
        // CMDQS = 0 (bits 25:21).
        assert_eq!(Features::from_idr(ok0, 0x0013_0010, 0, 0x74, 0), Err(Unsupported::QueueTooSmall));
    }

    #[test]
    fn small_implementation() {
        // ASID16 off, ST_LEVEL linear, no COHACC; SIDSIZE 6, CMDQS 8, EVENTQS 7; OAS 52 bits
        // (capped to 48), RIL off.
        let idr0 = 0x0d40_101a & !(1 << 12) & !(3 << 27) & !(1 << 4);
        let idr1 = (8 << 21) | (7 << 16) | 6;
        let f = Features::from_idr(idr0, idr1, 0, 0x16, 0x2).unwrap();
        assert_eq!((f.asid_bits, f.two_level, f.coherent_access), (8, false, false));
        assert_eq!((f.sid_bits, f.cmdq_max_log2, f.eventq_max_log2), (6, 8, 7));
        assert_eq!((f.oa_bits, f.ips, f.range_invalidation), (48, 5, false));
        assert_eq!(f.version, (3, 2));
        // OAS 32 bits.
        assert_eq!(Features::from_idr(0x0d40_101a, 0x0273_0010, 0, 0x10, 0).unwrap().oa_bits, 32);
    }

    #[test]
    fn global_errors() {
        assert_eq!(GlobalErrors::active(0x5, 0x1).to_string(), "EVENTQ_ABT_ERR (event queue write aborted or queue full: events lost)");
        let both = GlobalErrors::active(0x101, 0);
        assert!(both.contains(gerror::CMDQ_ERR) && both.contains(gerror::SFM_ERR));
        assert_eq!(
            both.to_string(),
            "CMDQ_ERR (command queue error), SFM_ERR (service failure mode: the SMMU stopped translating)"
        );
        assert_eq!(GlobalErrors::active(0x8000_0000, 0).to_string(), "unknown bits 0x80000000");
        assert!(GlobalErrors::active(7, 7).is_empty());
        assert_eq!(GlobalErrors(0).to_string(), "none");
    }
}
