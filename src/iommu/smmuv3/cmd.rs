//! Command queue entries (IHI 0070 chapter 4): encoding of the commands the driver issues, the
//! plan of TLB invalidations for a range, and the command errors CMDQ_CONS.ERR reports.
//!
//! Every command is two little-endian doublewords; the opcode is bits [7:0] of the first.

use core::fmt;

use crate::mm::addr::{PAGE_SHIFT, PAGE_SIZE};

pub const OP_PREFETCH_CONFIG: u8 = 0x01;
pub const OP_CFGI_STE: u8 = 0x03;
/// CFGI_STE_RANGE; with Range = 31 it is CFGI_ALL.
pub const OP_CFGI_STE_RANGE: u8 = 0x04;
pub const OP_CFGI_CD: u8 = 0x05;
pub const OP_CFGI_CD_ALL: u8 = 0x06;
pub const OP_TLBI_NH_ALL: u8 = 0x10;
pub const OP_TLBI_NH_ASID: u8 = 0x11;
pub const OP_TLBI_NH_VA: u8 = 0x12;
pub const OP_TLBI_EL2_ALL: u8 = 0x20;
pub const OP_TLBI_NSNH_ALL: u8 = 0x30;
pub const OP_SYNC: u8 = 0x46;

/// Translation granule field (TG) of a range TLBI: 1 = 4 KiB.
const TG_4K: u64 = 1;
/// NUM is 5 bits: a range command covers (NUM + 1) << SCALE pages, NUM + 1 <= 32.
const RANGE_NUM_MAX: u64 = 32;

/// A command this driver issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Drop cached copies of the STE of `sid` (`leaf`: only the STE, not the level-1 descriptor
    /// that leads to it).
    CfgiSte { sid: u32, leaf: bool },
    /// Drop every cached STE and CD.
    CfgiAll,
    /// Drop cached copies of the CD (substream 0, no substreams are used) of `sid`.
    CfgiCd { sid: u32, leaf: bool },
    /// Drop every cached CD of `sid`.
    CfgiCdAll { sid: u32 },
    /// Every non-hypervisor stage-1 TLB entry of VMID 0.
    TlbiNhAll,
    /// Every TLB entry tagged with `asid`.
    TlbiNhAsid { asid: u16 },
    /// The entries of `asid` that translate `va` (one address), or with `range` the pages
    /// `[va, va + ((num + 1) << scale) * 4 KiB)` (SMMUv3.2 range invalidation). `leaf`: only
    /// last-level entries, walk caches kept.
    TlbiNhVa { asid: u16, va: u64, leaf: bool, range: Option<TlbiRange> },
    /// Every EL2 entry (part of the reset sequence when the SMMU has EL2 regimes).
    TlbiEl2All,
    /// Every non-secure, non-hypervisor entry of every VMID and ASID.
    TlbiNsnhAll,
    /// Completes when every earlier command has; no interrupt, no MSI (completion is polled).
    Sync,
}

/// The NUM and SCALE fields of a range TLBI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbiRange {
    /// 0..=31: the range is NUM + 1 chunks.
    pub num: u8,
    /// 0..=31: each chunk is 2^SCALE pages.
    pub scale: u8,
}

impl TlbiRange {
    /// Pages the range covers.
    pub const fn pages(self) -> u64 {
        (self.num as u64 + 1) << self.scale
    }
}

impl Command {
    /// The two doublewords of the queue entry.
    // Once per command on every unmap: opt-level "z" would leave it a call.
    #[inline(always)]
    pub fn encode(self) -> [u64; 2] {
        let op = |o: u8| u64::from(o);
        let sid = |s: u32| u64::from(s) << 32;
        match self {
            Command::CfgiSte { sid: s, leaf } => [op(OP_CFGI_STE) | sid(s), u64::from(leaf)],
            // Range = 31: every StreamID.
            Command::CfgiAll => [op(OP_CFGI_STE_RANGE), 31],
            // SSID [31:12] = 0.
            Command::CfgiCd { sid: s, leaf } => [op(OP_CFGI_CD) | sid(s), u64::from(leaf)],
            Command::CfgiCdAll { sid: s } => [op(OP_CFGI_CD_ALL) | sid(s), 0],
            Command::TlbiNhAll => [op(OP_TLBI_NH_ALL), 0],
            // VMID [47:32] = 0, ASID [63:48].
            Command::TlbiNhAsid { asid } => [op(OP_TLBI_NH_ASID) | (u64::from(asid) << 48), 0],
            Command::TlbiNhVa { asid, va, leaf, range } => {
                // dw0: NUM [16:12], SCALE [24:20], ASID [63:48]. dw1: Leaf [0], TTL [9:8] (0: no
                // level hint), TG [11:10] (0: a single address), Address [63:12].
                let (num_scale, tg) = match range {
                    Some(r) => ((u64::from(r.num & 0x1f) << 12) | (u64::from(r.scale & 0x1f) << 20), TG_4K),
                    None => (0, 0),
                };
                [
                    op(OP_TLBI_NH_VA) | num_scale | (u64::from(asid) << 48),
                    u64::from(leaf) | (tg << 10) | (va & !(PAGE_SIZE - 1)),
                ]
            }
            Command::TlbiEl2All => [op(OP_TLBI_EL2_ALL), 0],
            Command::TlbiNsnhAll => [op(OP_TLBI_NSNH_ALL), 0],
            // CS [13:12] = 0: completion is signalled by CONS only.
            Command::Sync => [op(OP_SYNC), 0],
        }
    }
}

/// The name of an opcode, for reports of a failed command.
pub fn opcode_name(op: u8) -> &'static str {
    match op {
        OP_PREFETCH_CONFIG => "PREFETCH_CONFIG",
        0x02 => "PREFETCH_ADDR",
        OP_CFGI_STE => "CFGI_STE",
        OP_CFGI_STE_RANGE => "CFGI_STE_RANGE",
        OP_CFGI_CD => "CFGI_CD",
        OP_CFGI_CD_ALL => "CFGI_CD_ALL",
        0x07 => "CFGI_VMS_PIDM",
        OP_TLBI_NH_ALL => "TLBI_NH_ALL",
        OP_TLBI_NH_ASID => "TLBI_NH_ASID",
        OP_TLBI_NH_VA => "TLBI_NH_VA",
        0x13 => "TLBI_NH_VAA",
        0x18 => "TLBI_EL3_ALL",
        0x1a => "TLBI_EL3_VA",
        OP_TLBI_EL2_ALL => "TLBI_EL2_ALL",
        0x21 => "TLBI_EL2_ASID",
        0x22 => "TLBI_EL2_VA",
        0x23 => "TLBI_EL2_VAA",
        0x28 => "TLBI_S12_VMALL",
        0x2a => "TLBI_S2_IPA",
        OP_TLBI_NSNH_ALL => "TLBI_NSNH_ALL",
        0x40 => "ATC_INV",
        0x41 => "PRI_RESP",
        0x44 => "RESUME",
        0x45 => "STALL_TERM",
        OP_SYNC => "CMD_SYNC",
        _ => "unknown opcode",
    }
}

/// CMDQ_CONS.ERR: why the SMMU stopped consuming commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandErrorKind {
    /// CERROR_ILL: an unknown opcode or a malformed command.
    Illegal,
    /// CERROR_ABT: reading the command from memory aborted.
    Abort,
    /// CERROR_ATC_INV_SYNC: an ATS invalidation did not complete (never issued by this driver).
    AtcInvSync,
    /// A code this driver does not know.
    Other(u8),
}

impl CommandErrorKind {
    pub const fn from_code(code: u8) -> CommandErrorKind {
        match code {
            1 => CommandErrorKind::Illegal,
            2 => CommandErrorKind::Abort,
            3 => CommandErrorKind::AtcInvSync,
            c => CommandErrorKind::Other(c),
        }
    }
}

impl fmt::Display for CommandErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandErrorKind::Illegal => f.write_str("CERROR_ILL (illegal command)"),
            CommandErrorKind::Abort => f.write_str("CERROR_ABT (abort reading the command)"),
            CommandErrorKind::AtcInvSync => f.write_str("CERROR_ATC_INV_SYNC (ATC invalidation timed out)"),
            CommandErrorKind::Other(c) => write!(f, "error code {c:#x}"),
        }
    }
}

/// The by-address commands of a [`TlbiPlan`], generated one by one: a plan is made on every
/// strict unmap, and an iterator of a few words keeps both the heap and large copies off that
/// path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbiCommands {
    asid: u16,
    leaf: bool,
    /// Address of the next command.
    va: u64,
    /// Pages still to cover (range commands) or commands still to issue (single addresses).
    left: u64,
    /// Bytes per single-address command; 0 for range commands.
    step: u64,
}

impl TlbiCommands {
    /// The range command that covers the lowest set bits of `pages` (nonzero) from the current
    /// address: the lowest set bit gives SCALE, the five bits from there give NUM + 1.
    fn next_range(pages: u64) -> TlbiRange {
        let scale = pages.trailing_zeros();
        let chunks = (pages >> scale) % RANGE_NUM_MAX;
        // Bit `scale` is set, so `chunks` is odd, at least 1.
        TlbiRange { num: (chunks - 1) as u8, scale: scale as u8 }
    }
}

impl Iterator for TlbiCommands {
    type Item = Command;

    fn next(&mut self) -> Option<Command> {
        if self.left == 0 {
            return None;
        }
        let (asid, leaf, va) = (self.asid, self.leaf, self.va);
        if self.step == 0 {
            // Each command clears at least the lowest set bit of the page count.
            let range = TlbiCommands::next_range(self.left);
            self.left -= range.pages();
            self.va = va.wrapping_add(range.pages() << PAGE_SHIFT);
            Some(Command::TlbiNhVa { asid, va, leaf, range: Some(range) })
        } else {
            self.left -= 1;
            self.va = va.wrapping_add(self.step);
            Some(Command::TlbiNhVa { asid, va, leaf, range: None })
        }
    }
}

/// How to invalidate a range of IOVAs of one ASID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlbiPlan {
    /// These by-address commands (at most the limit given to [`plan_tlbi`]).
    ByAddress(TlbiCommands),
    /// One TLBI_NH_ASID: cheaper than the by-address commands the range would take.
    WholeAsid,
}

/// The invalidation of `[va, va + size)` for `asid`, where every entry to drop maps at least
/// `granule` bytes aligned to it (see `mm::pgtable::TlbInvalidation`). With range invalidation
/// the range is split into the fewest range commands (each `(NUM + 1) << SCALE` pages); without
/// it, one single-address command per `granule`. More than `max_commands` commands (or a
/// malformed request: a zero or unaligned granule, a range that wraps) gives
/// [`TlbiPlan::WholeAsid`], which is always correct.
pub fn plan_tlbi(asid: u16, va: u64, size: u64, granule: u64, leaf: bool, range_invalidation: bool, max_commands: usize) -> TlbiPlan {
    let end = va.checked_add(size);
    let granule_ok = granule >= PAGE_SIZE && granule.is_power_of_two();
    if !granule_ok || end.is_none() || !va.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
        return TlbiPlan::WholeAsid;
    }
    let (left, step, count) = if range_invalidation {
        // Count the commands the iterator will produce, peeling the page count the same way.
        let pages = size >> PAGE_SHIFT;
        let (mut rest, mut count) = (pages, 0u64);
        while rest != 0 {
            rest -= TlbiCommands::next_range(rest).pages();
            count += 1;
        }
        (pages, 0, count)
    } else {
        let count = size / granule;
        (count, granule, count)
    };
    if count > max_commands as u64 {
        return TlbiPlan::WholeAsid;
    }
    TlbiPlan::ByAddress(TlbiCommands { asid, leaf, va, left, step })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Encodings written out from the field positions of IHI 0070 chapter 4.
    #[test]
    fn encodings_by_hand() {
        assert_eq!(Command::CfgiSte { sid: 0x10, leaf: true }.encode(), [0x0000_0010_0000_0003, 1]);
        assert_eq!(Command::CfgiSte { sid: 0xffff, leaf: false }.encode(), [0x0000_ffff_0000_0003, 0]);
        assert_eq!(Command::CfgiAll.encode(), [0x04, 0x1f]);
        assert_eq!(Command::CfgiCd { sid: 8, leaf: true }.encode(), [0x0000_0008_0000_0005, 1]);
        assert_eq!(Command::CfgiCdAll { sid: 8 }.encode(), [0x0000_0008_0000_0006, 0]);
        assert_eq!(Command::TlbiNhAll.encode(), [0x10, 0]);
        assert_eq!(Command::TlbiNhAsid { asid: 0x1234 }.encode(), [0x1234_0000_0000_0011, 0]);
        assert_eq!(Command::TlbiEl2All.encode(), [0x20, 0]);
        assert_eq!(Command::TlbiNsnhAll.encode(), [0x30, 0]);
        assert_eq!(Command::Sync.encode(), [0x46, 0]);
        // A single page, leaf: TG = 0, Leaf = 1, address bits kept from bit 12.
        assert_eq!(
            Command::TlbiNhVa { asid: 1, va: 0x12_3456_7000, leaf: true, range: None }.encode(),
            [0x0001_0000_0000_0012, 0x12_3456_7001]
        );
        // A range of (3 + 1) << 2 = 16 pages: NUM = 3 at [16:12], SCALE = 2 at [24:20]; TG = 1 at
        // [11:10]; not leaf.
        assert_eq!(
            Command::TlbiNhVa { asid: 2, va: 0x10_0000, leaf: false, range: Some(TlbiRange { num: 3, scale: 2 }) }.encode(),
            [0x0002_0000_0020_3012, 0x10_0400]
        );
    }

    #[test]
    fn names() {
        assert_eq!(opcode_name(0x12), "TLBI_NH_VA");
        assert_eq!(opcode_name(0x46), "CMD_SYNC");
        assert_eq!(opcode_name(0x7f), "unknown opcode");
        assert_eq!(CommandErrorKind::from_code(1), CommandErrorKind::Illegal);
        assert_eq!(CommandErrorKind::from_code(9).to_string(), "error code 0x9");
    }

    fn range_cmds(plan: &TlbiPlan) -> Vec<(u64, u8, u8)> {
        match *plan {
            TlbiPlan::ByAddress(v) => v
                .map(|c| match c {
                    Command::TlbiNhVa { va, range: Some(r), .. } => (va, r.num, r.scale),
                    other => panic!("not a range TLBI: {other:?}"),
                })
                .collect(),
            TlbiPlan::WholeAsid => panic!("whole ASID"),
        }
    }

    #[test]
    fn range_plans_by_hand() {
        // One page: NUM 0, SCALE 0.
        assert_eq!(range_cmds(&plan_tlbi(1, 0x1000, 0x1000, 0x1000, true, true, 8)), [(0x1000, 0, 0)]);
        // 33 pages = 1 + 32: one page, then one chunk of 32.
        assert_eq!(range_cmds(&plan_tlbi(1, 0, 33 << 12, 0x1000, true, true, 8)), [(0, 0, 0), (0x1000, 0, 5)]);
        // A 2 MiB block (512 pages): one chunk of 2^9 pages.
        assert_eq!(range_cmds(&plan_tlbi(1, 0x20_0000, 0x20_0000, 0x20_0000, true, true, 8)), [(0x20_0000, 0, 9)]);
        // 31 pages fit one command (NUM 30).
        assert_eq!(range_cmds(&plan_tlbi(1, 0, 31 << 12, 0x1000, true, true, 8)), [(0, 30, 0)]);
        // 0b110_0000_0001 = 1537 pages: 1 page, then (0b11000 >> 3 = 3 chunks of 2^9) from page 1.
        assert_eq!(range_cmds(&plan_tlbi(1, 0, 1537 << 12, 0x1000, true, true, 8)), [(0, 0, 0), (0x1000, 2, 9)]);
        // Over the limit: the whole ASID.
        assert_eq!(plan_tlbi(1, 0, 33 << 12, 0x1000, true, true, 1), TlbiPlan::WholeAsid);
        assert_eq!(range_cmds(&plan_tlbi(1, 0, 33 << 12, 0x1000, true, true, 2)), [(0, 0, 0), (0x1000, 0, 5)]);
        // Nothing to do.
        assert!(range_cmds(&plan_tlbi(1, 0, 0, 0x1000, true, true, 1)).is_empty());
    }

    #[test]
    fn per_address_plans() {
        let TlbiPlan::ByAddress(v) = plan_tlbi(7, 0x40_0000, 0x40_0000, 0x20_0000, false, false, 8) else { panic!() };
        assert_eq!(
            v.collect::<Vec<_>>(),
            [
                Command::TlbiNhVa { asid: 7, va: 0x40_0000, leaf: false, range: None },
                Command::TlbiNhVa { asid: 7, va: 0x60_0000, leaf: false, range: None },
            ]
        );
        assert_eq!(plan_tlbi(7, 0, 9 << 12, 0x1000, true, false, 8), TlbiPlan::WholeAsid);
        // Malformed requests fall back to the whole ASID.
        assert_eq!(plan_tlbi(7, 0x800, 0x1000, 0x1000, true, false, 8), TlbiPlan::WholeAsid);
        assert_eq!(plan_tlbi(7, 0, 0x1000, 0, true, false, 8), TlbiPlan::WholeAsid);
        assert_eq!(plan_tlbi(7, !0xfff, 0x2000, 0x1000, true, true, 8), TlbiPlan::WholeAsid);
    }

    proptest! {
        /// Range plans cover exactly the requested pages, contiguously, in order, with valid
        /// fields, and take at most one command per five bits of the page count.
        #[test]
        fn range_plans_cover_exactly(start in 0u64..(1 << 27), pages in 1u64..(1 << 27)) {
            let va = start << 12;
            let plan = plan_tlbi(3, va, pages << 12, 0x1000, true, true, 64);
            let cmds = range_cmds(&plan);
            let mut cur = va;
            for &(at, num, scale) in &cmds {
                prop_assert_eq!(at, cur);
                prop_assert!(num < 32 && scale < 32);
                cur += TlbiRange { num, scale }.pages() << 12;
            }
            prop_assert_eq!(cur, va + (pages << 12));
            let bits = 64 - pages.leading_zeros();
            prop_assert!(cmds.len() as u32 <= bits.div_ceil(5) + 1);
        }
    }
}
