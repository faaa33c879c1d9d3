//! Stream table entries, level-1 stream table descriptors and context descriptors (IHI 0070
//! chapter 5), and the choice of stream table layout.
//!
//! Only what this driver uses is encoded: stage-1 translation through one context descriptor (no
//! substreams, no stage 2), bypass and abort. Attributes of the SMMU's own accesses (CD fetches,
//! table walks) follow the SMMU's coherence: write-back inner-shareable when it snoops the CPU's
//! caches, non-cacheable outer-shareable otherwise.

use crate::mm::addr::PhysAddr;

/// Doublewords in a STE and in a CD (64 bytes each).
pub const STE_DWORDS: usize = 8;
pub const CD_DWORDS: usize = 8;
pub const STE_BYTES: u64 = 64;

/// STE.Config values (dw0 [3:1]).
const CONFIG_ABORT: u64 = 0b000;
const CONFIG_BYPASS: u64 = 0b100;
const CONFIG_S1: u64 = 0b101;
const STE_V: u64 = 1;
/// S1ContextPtr [51:6], L2Ptr [51:6].
const ADDR_51_6: u64 = 0x000f_ffff_ffff_ffc0;
/// TTB0 [51:4].
const ADDR_51_4: u64 = 0x000f_ffff_ffff_fff0;

/// Memory attributes of the SMMU's accesses to a structure (CR1, STE.S1C*, CD.IRGN0/ORGN0/SH0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// Write-back cacheable, inner shareable: the SMMU snoops the CPU caches.
    Coherent,
    /// Non-cacheable, outer shareable: the CPU cleans what it writes to the point of coherency.
    NonCoherent,
}

impl Walk {
    /// (cacheability, shareability) in the 2-bit encodings shared by CR1, the STE and the CD:
    /// cacheability 1 = write-back (read/write-allocate in the STE and CD), 0 = non-cacheable;
    /// shareability 3 = inner, 2 = outer.
    pub const fn fields(self) -> (u64, u64) {
        match self {
            Walk::Coherent => (1, 3),
            Walk::NonCoherent => (0, 2),
        }
    }
}

/// What a stream does with its transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamConfig {
    /// V = 0: every transaction aborts and records C_BAD_STE.
    Invalid,
    /// Every transaction aborts silently.
    Abort,
    /// Transactions pass untranslated, with their incoming attributes.
    Bypass,
    /// Stage-1 translation through the context descriptor at `cd` (64-byte aligned).
    Stage1 { cd: PhysAddr },
}

/// The eight doublewords of a STE.
pub fn encode_ste(config: StreamConfig, walk: Walk) -> [u64; STE_DWORDS] {
    let mut ste = [0u64; STE_DWORDS];
    match config {
        StreamConfig::Invalid => {}
        StreamConfig::Abort => ste[0] = STE_V | (CONFIG_ABORT << 1),
        StreamConfig::Bypass => {
            ste[0] = STE_V | (CONFIG_BYPASS << 1);
            // SHCFG [45:44] = 1: use the incoming shareability (0 would force non-shareable).
            ste[1] = 1 << 44;
        }
        StreamConfig::Stage1 { cd } => {
            // S1Fmt [5:4] = 0 (a single CD), S1CDMax [63:59] = 0.
            ste[0] = STE_V | (CONFIG_S1 << 1) | (cd.as_u64() & ADDR_51_6);
            // S1CIR [3:2], S1COR [5:4], S1CSH [7:6]: attributes of the CD fetch. S1DSS, S1STALLD,
            // EATS, STRW (0: the NS-EL1 regime), PRIVCFG and INSTCFG stay 0 (use the incoming
            // attributes).
            let (cache, share) = walk.fields();
            ste[1] = (cache << 2) | (cache << 4) | (share << 6);
        }
    }
    ste
}

/// Decodes the configuration of a STE written by [`encode_ste`] (for reports and tests).
pub fn decode_ste_config(dw0: u64) -> Option<StreamConfig> {
    if dw0 & STE_V == 0 {
        return Some(StreamConfig::Invalid);
    }
    match (dw0 >> 1) & 0b111 {
        CONFIG_ABORT => Some(StreamConfig::Abort),
        CONFIG_BYPASS => Some(StreamConfig::Bypass),
        CONFIG_S1 => Some(StreamConfig::Stage1 { cd: PhysAddr::new(dw0 & ADDR_51_6) }),
        _ => None,
    }
}

/// A level-1 stream table descriptor pointing at a level-2 table of 2^`split` STEs (`l2` aligned
/// to the table's size). Span [4:0] = split + 1 says how many STEs the table holds
/// (2^(Span - 1)); Span = 0 would mark the descriptor invalid.
pub fn encode_l1_descriptor(l2: PhysAddr, split: u8) -> u64 {
    (l2.as_u64() & ADDR_51_6) | u64::from(split + 1)
}

/// A stage-1 context descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextDescriptor {
    pub asid: u16,
    /// Root of the translation tables (4 KiB aligned).
    pub ttb0: PhysAddr,
    /// Input address bits: T0SZ = 64 - `ia_bits`; QEMU accepts T0SZ 16..=39 only.
    pub ia_bits: u8,
    /// CD.IPS encoding (see `Features::ips`).
    pub ips: u8,
    pub walk: Walk,
    /// The MAIR the tables' AttrIndx fields index (`mm::pgtable::MAIR_VALUE`).
    pub mair: u64,
}

impl ContextDescriptor {
    /// The eight doublewords.
    pub fn encode(&self) -> [u64; CD_DWORDS] {
        let (cache, share) = self.walk.fields();
        let t0sz = u64::from(64 - self.ia_bits.min(64)) & 0x3f;
        // dw0: T0SZ [5:0]; TG0 [7:6] = 0 (4 KiB); IRGN0 [9:8]; ORGN0 [11:10]; SH0 [13:12]; EPD0
        // [14] = 0; ENDI [15] = 0 (little endian); T1SZ [21:16] = 0; EPD1 [30] = 1 (no TTB1; QEMU
        // refuses T1SZ = 0 unless TTB1 is disabled); V [31]; IPS [34:32]; AFFD [35] = 0; TBI
        // [38:37] = 0; AA64 [41] = 1; HD/HA [43:42] = 0; S [44] = 0 (no stall); R [45] = 1 (record
        // faults: without it translation faults leave no event); A [46] = 1 (abort faulting
        // transactions); ASET [47] = 1 (ASIDs not shared with the CPUs, so broadcast TLBIs leave
        // them alone); ASID [63:48].
        let dw0 = t0sz
            | (cache << 8)
            | (cache << 10)
            | (share << 12)
            | (1 << 30)
            | (1 << 31)
            | (u64::from(self.ips & 0b111) << 32)
            | (1 << 41)
            | (1 << 45)
            | (1 << 46)
            | (1 << 47)
            | (u64::from(self.asid) << 48);
        [dw0, self.ttb0.as_u64() & ADDR_51_4, 0, self.mair, 0, 0, 0, 0]
    }
}

/// How the stream table is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamTableLayout {
    /// One array of 2^`sid_bits` STEs.
    Linear { sid_bits: u8 },
    /// A level-1 array of 2^(`sid_bits` - `split`) descriptors, each leading to a level-2 array
    /// of 2^`split` STEs allocated when a StreamID in it is first configured.
    TwoLevel { sid_bits: u8, split: u8 },
}

/// Level-2 tables of 256 STEs (16 KiB): one PCI bus per table.
pub const SPLIT: u8 = 8;
/// The largest linear table this driver allocates: 2^16 STEs, 4 MiB.
pub const MAX_LINEAR_SID_BITS: u8 = 16;

impl StreamTableLayout {
    /// The layout for StreamIDs below 2^`sid_bits`: linear when that is one level-2 table's worth
    /// or less, or when the SMMU has no 2-level format (`None` if that linear table would exceed
    /// [`MAX_LINEAR_SID_BITS`]); 2-level otherwise.
    pub fn choose(sid_bits: u8, two_level: bool) -> Option<StreamTableLayout> {
        if sid_bits <= SPLIT {
            Some(StreamTableLayout::Linear { sid_bits })
        } else if two_level {
            Some(StreamTableLayout::TwoLevel { sid_bits, split: SPLIT })
        } else if sid_bits <= MAX_LINEAR_SID_BITS {
            Some(StreamTableLayout::Linear { sid_bits })
        } else {
            None
        }
    }

    pub fn sid_bits(self) -> u8 {
        match self {
            StreamTableLayout::Linear { sid_bits } | StreamTableLayout::TwoLevel { sid_bits, .. } => sid_bits,
        }
    }

    /// Bytes of the table STRTAB_BASE points at: the STE array, or the level-1 descriptors (8 bytes
    /// each, at least 64 bytes).
    pub fn base_table_bytes(self) -> u64 {
        match self {
            StreamTableLayout::Linear { sid_bits } => STE_BYTES << sid_bits,
            StreamTableLayout::TwoLevel { sid_bits, split } => (8u64 << sid_bits.saturating_sub(split)).max(64),
        }
    }

    /// STRTAB_BASE_CFG: LOG2SIZE [5:0] = StreamID bits, SPLIT [10:6], FMT [17:16] (0 linear, 1
    /// 2-level).
    pub fn base_cfg(self) -> u32 {
        match self {
            StreamTableLayout::Linear { sid_bits } => u32::from(sid_bits),
            StreamTableLayout::TwoLevel { sid_bits, split } => u32::from(sid_bits) | (u32::from(split) << 6) | (1 << 16),
        }
    }
}

/// The number of address bits needed to number StreamIDs `0..end` (at least 1).
pub fn sid_bits_for(end: u64) -> u8 {
    (64 - end.saturating_sub(1).leading_zeros()).max(1) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values written out by hand from the field positions of IHI 0070 sections 5.2 and 5.4.
    #[test]
    fn stes_by_hand() {
        assert_eq!(encode_ste(StreamConfig::Invalid, Walk::Coherent), [0; 8]);
        assert_eq!(encode_ste(StreamConfig::Abort, Walk::Coherent), [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode_ste(StreamConfig::Bypass, Walk::Coherent), [0x9, 0x1000_0000_0000, 0, 0, 0, 0, 0, 0]);
        // V, Config 0b101 -> 0xb; CD at 0x4123_5040; S1CIR = S1COR = 1 (0x4 | 0x10), S1CSH = 3 (0xc0).
        let cd = PhysAddr::new(0x4123_5040);
        assert_eq!(
            encode_ste(StreamConfig::Stage1 { cd }, Walk::Coherent),
            [0x4123_504b, 0xd4, 0, 0, 0, 0, 0, 0]
        );
        // Non-coherent: non-cacheable, outer shareable (S1CSH = 2 -> 0x80).
        assert_eq!(encode_ste(StreamConfig::Stage1 { cd }, Walk::NonCoherent)[1], 0x80);
        // A CD above 4 GiB keeps bits [51:32].
        assert_eq!(encode_ste(StreamConfig::Stage1 { cd: PhysAddr::new(0xf_8000_0000) }, Walk::Coherent)[0], 0xf_8000_000b);
        for c in [StreamConfig::Invalid, StreamConfig::Abort, StreamConfig::Bypass, StreamConfig::Stage1 { cd }] {
            assert_eq!(decode_ste_config(encode_ste(c, Walk::Coherent)[0]), Some(c));
        }
        // Config 0b110 (stage 2) is not one of ours.
        assert_eq!(decode_ste_config(0xd), None);
    }

    #[test]
    fn l1_descriptor_by_hand() {
        // 256 STEs: Span 9.
        assert_eq!(encode_l1_descriptor(PhysAddr::new(0x4567_c000), 8), 0x4567_c009);
    }

    #[test]
    fn cd_by_hand() {
        let cd = ContextDescriptor {
            asid: 1,
            ttb0: PhysAddr::new(0x4123_4000),
            ia_bits: 39,
            ips: 4,
            walk: Walk::Coherent,
            mair: 0x0011_2233_4455_6677,
        };
        // dw0 low word: T0SZ 25 (0x19) | IRGN0 1 (0x100) | ORGN0 1 (0x400) | SH0 3 (0x3000) |
        // EPD1 (0x4000_0000) | V (0x8000_0000) = 0xc000_3519. High word: IPS 4 (0x4) | AA64 bit 41
        // (0x200) | R bit 45 (0x2000) | A bit 46 (0x4000) | ASET bit 47 (0x8000) | ASID 1 at bit 48
        // (0x1_0000) = 0x0001_e204.
        assert_eq!(cd.encode(), [0x0001_e204_c000_3519, 0x4123_4000, 0, 0x0011_2233_4455_6677, 0, 0, 0, 0]);
        let nc = ContextDescriptor { walk: Walk::NonCoherent, asid: 0xabcd, ips: 5, ia_bits: 48, ..cd };
        // T0SZ 16 (0x10), IRGN0 = ORGN0 = 0, SH0 2 (0x2000); IPS 5; ASID 0xabcd.
        assert_eq!(nc.encode()[0], 0xabcd_e205_c000_2010);
    }

    #[test]
    fn layouts() {
        assert_eq!(StreamTableLayout::choose(8, true), Some(StreamTableLayout::Linear { sid_bits: 8 }));
        assert_eq!(StreamTableLayout::choose(16, true), Some(StreamTableLayout::TwoLevel { sid_bits: 16, split: 8 }));
        assert_eq!(StreamTableLayout::choose(16, false), Some(StreamTableLayout::Linear { sid_bits: 16 }));
        assert_eq!(StreamTableLayout::choose(17, false), None);
        let lin = StreamTableLayout::Linear { sid_bits: 8 };
        assert_eq!((lin.base_table_bytes(), lin.base_cfg()), (16384, 8));
        let two = StreamTableLayout::TwoLevel { sid_bits: 16, split: 8 };
        // 256 descriptors of 8 bytes; LOG2SIZE 16, SPLIT 8 << 6 = 0x200, FMT 1 << 16.
        assert_eq!((two.base_table_bytes(), two.base_cfg()), (2048, 0x1_0210));
        // 9 SID bits: 2 descriptors, but at least 64 bytes.
        assert_eq!(StreamTableLayout::TwoLevel { sid_bits: 9, split: 8 }.base_table_bytes(), 64);
        assert_eq!((sid_bits_for(0), sid_bits_for(1), sid_bits_for(2), sid_bits_for(256), sid_bits_for(257)), (1, 1, 1, 8, 9));
        assert_eq!(sid_bits_for(0x1_0000), 16);
        assert_eq!(sid_bits_for(1 << 32), 32);
    }
}
