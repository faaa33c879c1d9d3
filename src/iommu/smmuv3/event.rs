//! Event queue records (IHI 0070 section 7.3): decoding and reporting.
//!
//! A record is four doublewords: the type in dw0 [7:0] with the StreamID in dw0 [63:32] and the
//! SubstreamID (if SSV, bit 11) in [31:12]; for faults on an access, dw1 says how it was made (RnW
//! bit 35, PnU bit 33, InD bit 34, S2 bit 39, CLASS [41:40]) and dw2 holds its input address; for
//! fetch faults dw3 [51:3] holds the address of the structure or descriptor being fetched.
//!
//! A faulting DMA burst produces many records that differ only in address (QEMU: one per 4-byte
//! access), so reports coalesce such runs ([`coalesce`]).

use alloc::vec::Vec;
use core::fmt;

/// Bytes of one event record.
pub const EVENT_BYTES: u64 = 32;
pub const EVENT_DWORDS: usize = 4;

/// dw3 [51:3].
const FETCH_ADDR_MASK: u64 = 0x000f_ffff_ffff_fff8;

/// Event types the architecture defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Uut,
    BadStreamId,
    SteFetch,
    BadSte,
    BadAtsTreq,
    StreamDisabled,
    TranslationForbidden,
    BadSubstreamId,
    CdFetch,
    BadCd,
    WalkEabt,
    Translation,
    AddressSize,
    Access,
    Permission,
    TlbConflict,
    ConfigConflict,
    PageRequest,
    VmsFetch,
    Unknown(u8),
}

impl EventKind {
    pub const fn from_type(t: u8) -> EventKind {
        match t {
            0x01 => EventKind::Uut,
            0x02 => EventKind::BadStreamId,
            0x03 => EventKind::SteFetch,
            0x04 => EventKind::BadSte,
            0x05 => EventKind::BadAtsTreq,
            0x06 => EventKind::StreamDisabled,
            0x07 => EventKind::TranslationForbidden,
            0x08 => EventKind::BadSubstreamId,
            0x09 => EventKind::CdFetch,
            0x0a => EventKind::BadCd,
            0x0b => EventKind::WalkEabt,
            0x10 => EventKind::Translation,
            0x11 => EventKind::AddressSize,
            0x12 => EventKind::Access,
            0x13 => EventKind::Permission,
            0x20 => EventKind::TlbConflict,
            0x21 => EventKind::ConfigConflict,
            0x24 => EventKind::PageRequest,
            0x25 => EventKind::VmsFetch,
            t => EventKind::Unknown(t),
        }
    }

    /// The architecture's name and a short explanation.
    pub const fn describe(self) -> (&'static str, &'static str) {
        match self {
            EventKind::Uut => ("F_UUT", "unsupported upstream transaction"),
            EventKind::BadStreamId => ("C_BAD_STREAMID", "StreamID outside the stream table"),
            EventKind::SteFetch => ("F_STE_FETCH", "fetching the STE aborted"),
            EventKind::BadSte => ("C_BAD_STE", "invalid or unusable STE"),
            EventKind::BadAtsTreq => ("F_BAD_ATS_TREQ", "bad ATS translation request"),
            EventKind::StreamDisabled => ("F_STREAM_DISABLED", "stream disabled"),
            EventKind::TranslationForbidden => ("F_TRANSL_FORBIDDEN", "translated transaction not allowed"),
            EventKind::BadSubstreamId => ("C_BAD_SUBSTREAMID", "bad SubstreamID"),
            EventKind::CdFetch => ("F_CD_FETCH", "fetching the CD aborted"),
            EventKind::BadCd => ("C_BAD_CD", "invalid or unusable CD"),
            EventKind::WalkEabt => ("F_WALK_EABT", "external abort during the table walk"),
            EventKind::Translation => ("F_TRANSLATION", "translation fault: address not mapped"),
            EventKind::AddressSize => ("F_ADDR_SIZE", "address size fault"),
            EventKind::Access => ("F_ACCESS", "access flag fault"),
            EventKind::Permission => ("F_PERMISSION", "permission fault"),
            EventKind::TlbConflict => ("F_TLB_CONFLICT", "TLB conflict"),
            EventKind::ConfigConflict => ("F_CFG_CONFLICT", "configuration cache conflict"),
            EventKind::PageRequest => ("E_PAGE_REQUEST", "speculative page request"),
            EventKind::VmsFetch => ("F_VMS_FETCH", "fetching the VMS aborted"),
            EventKind::Unknown(_) => ("unknown event", "type not defined by SMMUv3"),
        }
    }

    /// Records of this type carry the access's input address (dw2) and how it was made (dw1).
    const fn has_access(self) -> bool {
        matches!(
            self,
            EventKind::Uut
                | EventKind::TranslationForbidden
                | EventKind::WalkEabt
                | EventKind::Translation
                | EventKind::AddressSize
                | EventKind::Access
                | EventKind::Permission
                | EventKind::TlbConflict
        )
    }

    /// Records of this type carry a fault class (dw1 [41:40]).
    const fn has_class(self) -> bool {
        matches!(
            self,
            EventKind::WalkEabt | EventKind::Translation | EventKind::AddressSize | EventKind::Access | EventKind::Permission
        )
    }

    /// Records of this type carry the address being fetched (dw3).
    const fn has_fetch_address(self) -> bool {
        matches!(self, EventKind::SteFetch | EventKind::CdFetch | EventKind::WalkEabt | EventKind::VmsFetch)
    }
}

/// What the SMMU was doing when a walk fault happened (CLASS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultClass {
    /// Fetching the CD.
    Cd,
    /// Fetching a translation table descriptor.
    TableDescriptor,
    /// Translating the input address itself.
    Input,
    Reserved,
}

impl FaultClass {
    const fn from_bits(b: u64) -> FaultClass {
        match b & 3 {
            0 => FaultClass::Cd,
            1 => FaultClass::TableDescriptor,
            2 => FaultClass::Input,
            _ => FaultClass::Reserved,
        }
    }
}

impl fmt::Display for FaultClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultClass::Cd => "CD (fetching the context descriptor)",
            FaultClass::TableDescriptor => "TTD (fetching a table descriptor)",
            FaultClass::Input => "IN (the input address)",
            FaultClass::Reserved => "reserved",
        })
    }
}

/// How a faulting access was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessInfo {
    /// Input address (an IOVA when the stream translates).
    pub addr: u64,
    /// RnW: a read (else a write).
    pub read: bool,
    /// PnU: privileged.
    pub privileged: bool,
    /// InD: an instruction fetch.
    pub instruction: bool,
}

/// A decoded event record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub sid: u32,
    /// The SubstreamID, when the record has one (SSV).
    pub ssid: Option<u32>,
    pub access: Option<AccessInfo>,
    pub class: Option<FaultClass>,
    /// The fault came from stage 2 (never, with this driver's stage-1-only streams).
    pub stage2: bool,
    /// Address of the STE, CD or descriptor whose fetch failed.
    pub fetch_addr: Option<u64>,
    /// The record as read.
    pub raw: [u64; EVENT_DWORDS],
}

impl Event {
    pub fn decode(raw: [u64; EVENT_DWORDS]) -> Event {
        let kind = EventKind::from_type(raw[0] as u8);
        let dw1 = raw[1];
        let bit = |n: u32| (dw1 >> n) & 1 == 1;
        Event {
            kind,
            sid: (raw[0] >> 32) as u32,
            ssid: ((raw[0] >> 11) & 1 == 1).then_some(((raw[0] >> 12) & 0xf_ffff) as u32),
            access: kind.has_access().then_some(AccessInfo { addr: raw[2], read: bit(35), privileged: bit(33), instruction: bit(34) }),
            class: kind.has_class().then_some(FaultClass::from_bits(dw1 >> 40)),
            stage2: kind.has_class() && bit(39),
            fetch_addr: kind.has_fetch_address().then_some(raw[3] & FETCH_ADDR_MASK),
            raw,
        }
    }

    /// Same event apart from the input address.
    fn same_but_address(&self, other: &Event) -> bool {
        let strip = |e: &Event| Event { access: e.access.map(|a| AccessInfo { addr: 0, ..a }), raw: [0; EVENT_DWORDS], ..*e };
        strip(self) == strip(other)
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Run { first: *self, count: 1, last_addr: self.access.map(|a| a.addr) }.fmt(f)
    }
}

/// Consecutive events identical but for ascending input addresses (one faulting burst).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub first: Event,
    pub count: u32,
    /// Input address of the last event of the run.
    pub last_addr: Option<u64>,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.first;
        let (name, what) = e.kind.describe();
        match e.kind {
            EventKind::Unknown(t) => write!(f, "event type {t:#04x} ({what})")?,
            _ => write!(f, "{name} ({what})")?,
        }
        if self.count > 1 {
            write!(f, " x{}", self.count)?;
        }
        write!(f, ": StreamID {:#x}", e.sid)?;
        if let Some(ssid) = e.ssid {
            write!(f, " SubstreamID {ssid:#x}")?;
        }
        if let Some(a) = e.access {
            let dir = if a.read { "read" } else { "write" };
            let kind = if a.instruction { " (instruction)" } else { "" };
            let who = if a.privileged { "privileged" } else { "unprivileged" };
            match self.last_addr {
                Some(last) if self.count > 1 => write!(f, ", {who} {dir}{kind} at {:#x}..={last:#x}", a.addr)?,
                _ => write!(f, ", {who} {dir}{kind} at {:#x}", a.addr)?,
            }
        }
        if let Some(c) = e.class {
            write!(f, ", class {c}, stage {}", if e.stage2 { 2 } else { 1 })?;
        }
        if let Some(a) = e.fetch_addr {
            write!(f, ", fetching {a:#x}")?;
        }
        Ok(())
    }
}

/// Groups `events` into runs of the same fault at ascending addresses, in order.
pub fn coalesce(events: &[Event]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for e in events {
        let addr = e.access.map(|a| a.addr);
        if let Some(run) = runs.last_mut() {
            let ascending = matches!((run.last_addr, addr), (Some(last), Some(a)) if a > last);
            if ascending && run.first.same_but_address(e) {
                run.count += 1;
                run.last_addr = addr;
                continue;
            }
        }
        runs.push(Run { first: *e, count: 1, last_addr: addr });
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A permission fault on a 4-byte write at 0x100000 by StreamID 8, as QEMU writes it: type 0x13,
    /// SID in dw0 [63:32]; dw1 CLASS = IN (0b10 << 40), RnW = 0, PnU = 1 (bit 33); dw2 address.
    const PERMISSION_WRITE: [u64; 4] = [0x0000_0008_0000_0013, (2 << 40) | (1 << 33), 0x10_0000, 0];

    #[test]
    fn permission_fault_by_hand() {
        let e = Event::decode(PERMISSION_WRITE);
        assert_eq!(e.kind, EventKind::Permission);
        assert_eq!(e.sid, 8);
        assert_eq!(e.ssid, None);
        assert_eq!(e.access, Some(AccessInfo { addr: 0x10_0000, read: false, privileged: true, instruction: false }));
        assert_eq!(e.class, Some(FaultClass::Input));
        assert!(!e.stage2);
        assert_eq!(e.fetch_addr, None);
        assert_eq!(
            e.to_string(),
            "F_PERMISSION (permission fault): StreamID 0x8, privileged write at 0x100000, class IN (the input address), stage 1"
        );
    }

    #[test]
    fn other_records_by_hand() {
        // F_TRANSLATION, read (bit 35), class TTD (0b01), SubstreamID 5 valid (bit 11, 5 << 12).
        let t = Event::decode([0x0000_0010_0000_5810, (1 << 35) | (1 << 40), 0xfff_f000, 0]);
        assert_eq!((t.kind, t.sid, t.ssid), (EventKind::Translation, 0x10, Some(5)));
        assert_eq!(t.access.map(|a| (a.addr, a.read, a.privileged)), Some((0xfff_f000, true, false)));
        assert_eq!(t.class, Some(FaultClass::TableDescriptor));
        // C_BAD_STE: only the StreamID means something, whatever the other words hold.
        let b = Event::decode([0x0000_0018_0000_0004, u64::MAX, 0x1234, 0x5678]);
        assert_eq!((b.kind, b.sid, b.access, b.class, b.fetch_addr), (EventKind::BadSte, 0x18, None, None, None));
        assert_eq!(b.to_string(), "C_BAD_STE (invalid or unusable STE): StreamID 0x18");
        // F_STE_FETCH: fetch address in dw3 [51:3] (low bits dropped).
        let s = Event::decode([0x0000_0001_0000_0003, 0, 0, 0x4000_1047]);
        assert_eq!(s.fetch_addr, Some(0x4000_1040));
        assert!(s.to_string().ends_with("StreamID 0x1, fetching 0x40001040"));
        // Unknown types are kept, not refused.
        let u = Event::decode([0x7f, 0, 0, 0]);
        assert_eq!(u.kind, EventKind::Unknown(0x7f));
        assert_eq!(u.to_string(), "event type 0x7f (type not defined by SMMUv3): StreamID 0x0");
        // Stage-2 flag (bit 39) on a walk fault.
        assert!(Event::decode([0x10, 1 << 39, 0, 0]).stage2);
        assert_eq!(EventKind::from_type(0x0b), EventKind::WalkEabt);
        assert_eq!(EventKind::from_type(0x12).describe().0, "F_ACCESS");
        assert_eq!(EventKind::from_type(0x11).describe().0, "F_ADDR_SIZE");
        assert_eq!(EventKind::from_type(0x02).describe().0, "C_BAD_STREAMID");
    }

    #[test]
    fn runs() {
        let at = |addr: u64, t: [u64; 4]| Event::decode([t[0], t[1], addr, t[3]]);
        let mut events: Vec<Event> = (0..16).map(|i| at(0x10_0000 + 4 * i, PERMISSION_WRITE)).collect();
        // A different StreamID, then the first burst again (a new run: not a continuation).
        events.push(at(0x20_0000, [0x0000_0010_0000_0013, PERMISSION_WRITE[1], 0, 0]));
        events.push(at(0x10_0000, PERMISSION_WRITE));
        let runs = coalesce(&events);
        assert_eq!(runs.len(), 3);
        assert_eq!((runs[0].count, runs[0].last_addr), (16, Some(0x10_003c)));
        assert_eq!(
            runs[0].to_string(),
            "F_PERMISSION (permission fault) x16: StreamID 0x8, privileged write at 0x100000..=0x10003c, class IN (the input address), stage 1"
        );
        assert_eq!((runs[1].first.sid, runs[1].count), (0x10, 1));
        assert_eq!(runs[2].count, 1);
        // Records without addresses never merge.
        let bad = Event::decode([0x0000_0018_0000_0004, 0, 0, 0]);
        assert_eq!(coalesce(&[bad, bad]).len(), 2);
        assert!(coalesce(&[]).is_empty());
    }
}
