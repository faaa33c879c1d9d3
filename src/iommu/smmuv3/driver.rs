//! The SMMUv3 device: probe and reset, the command and event queues, the stream table, and the
//! registry of probed SMMUs (see the module documentation of `iommu::smmuv3`).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use spin::{Mutex, Once};
use tock_registers::interfaces::{Readable, Writeable};

use super::asid::AsidAllocator;
use super::cmd::{self, Command, CommandErrorKind};
use super::domain::Domain;
use super::event::{self, Event, EVENT_BYTES, EVENT_DWORDS};
use super::queue::QueueGeometry;
use super::regs::{self, gerror, Features, GlobalErrors, Registers, Unsupported, CR0, CR1, CR2};
use super::ste::{self, StreamConfig, StreamTableLayout, Walk, STE_BYTES, STE_DWORDS};
use crate::arch;
use crate::dma::busmap::BusMap;
use crate::dt::{DeviceTree, DtError, Node};
use crate::drivers::pci::{self, HostBridge, PciDevice};
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::mm::kmap::{self, KmapError};
use crate::mm::phys::{self, PhysError};
use crate::println;

/// The DT `compatible` of an SMMUv3.
pub const COMPATIBLE: &str = "arm,smmu-v3";

/// Command queue: 256 entries of 16 bytes (one page), or fewer if the SMMU says so.
const CMDQ_LOG2: u8 = 8;
/// Event queue: 256 entries of 32 bytes (two pages). QEMU writes one record per 4 bytes of a
/// faulting burst, so this holds a faulting 1 KiB transfer.
const EVENTQ_LOG2: u8 = 8;
/// Bytes of a command.
const CMD_BYTES: u64 = 16;
/// How long a register acknowledgement or a CMD_SYNC may take before the SMMU is declared broken
/// (Linux allows one second too).
const TIMEOUT_NS: u64 = 1_000_000_000;
/// Passes over the event queue per drain: a device faulting as fast as the queue is read cannot
/// keep the caller looping.
const DRAIN_PASSES: usize = 4;

/// Why the SMMU driver refused or failed something.
#[derive(Debug)]
pub enum SmmuError {
    /// The ID registers show something this driver cannot use.
    Unsupported(Unsupported),
    /// The DT node: no usable `reg`, a malformed property.
    Dt(DtError),
    /// Something about the SMMU's integration this driver does not support.
    Integration(&'static str),
    /// Mapping the registers.
    Registers(KmapError),
    /// The PCI `iommu-map`s send StreamIDs the SMMU cannot index.
    TooFewSidBits { needed: u8, have: u8 },
    /// No memory for the SMMU's tables or queues.
    NoMemory(PhysError),
    /// A register acknowledgement or a CMD_SYNC did not come in time.
    Timeout(&'static str),
    /// The SMMU stopped on a command (it was reported on the console and skipped).
    Command { kind: CommandErrorKind, opcode: u8 },
    /// An earlier time-out or a service failure: nothing proves the SMMU still obeys commands, so
    /// the driver issues none and frees no memory the SMMU might still read.
    Broken,
    /// A StreamID beyond the stream table.
    BadStreamId { sid: u32, limit: u64 },
    /// A domain of another SMMU.
    ForeignDomain,
    /// Every ASID is taken.
    AsidsExhausted,
    /// The IO page tables refused the operation.
    PageTable(crate::mm::pgtable::PageTableError),
}

impl fmt::Display for SmmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmmuError::Unsupported(u) => write!(f, "unsupported SMMU: {u}"),
            SmmuError::Dt(e) => write!(f, "device tree: {e}"),
            SmmuError::Integration(what) => write!(f, "unsupported integration: {what}"),
            SmmuError::Registers(e) => write!(f, "mapping the registers: {e}"),
            SmmuError::TooFewSidBits { needed, have } => {
                write!(f, "the PCI iommu-map needs {needed} StreamID bits but the SMMU has {have} (IDR1.SIDSIZE)")
            }
            SmmuError::NoMemory(e) => write!(f, "no memory for SMMU structures: {e}"),
            SmmuError::Timeout(what) => write!(f, "time-out waiting for {what}"),
            SmmuError::Command { kind, opcode } => {
                write!(f, "command {} ({opcode:#04x}) failed: {kind}", cmd::opcode_name(*opcode))
            }
            SmmuError::Broken => f.write_str("the SMMU stopped responding earlier; it is no longer driven"),
            SmmuError::BadStreamId { sid, limit } => write!(f, "StreamID {sid:#x} is beyond the stream table (limit {limit:#x})"),
            SmmuError::ForeignDomain => f.write_str("the domain belongs to another SMMU"),
            SmmuError::AsidsExhausted => f.write_str("every ASID is in use"),
            SmmuError::PageTable(e) => write!(f, "IO page table: {e}"),
        }
    }
}

/// Why a command submission failed: the [`SmmuError`]s of the command path, small enough to pass
/// around on every unmap without copying a large error value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum QueueError {
    /// See [`SmmuError::Broken`].
    Broken,
    /// See [`SmmuError::Timeout`].
    Timeout(&'static str),
    /// See [`SmmuError::Command`].
    Command { kind: CommandErrorKind, opcode: u8 },
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SmmuError::from(*self).fmt(f)
    }
}

impl From<QueueError> for SmmuError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Broken => SmmuError::Broken,
            QueueError::Timeout(what) => SmmuError::Timeout(what),
            QueueError::Command { kind, opcode } => SmmuError::Command { kind, opcode },
        }
    }
}

impl From<DtError> for SmmuError {
    fn from(e: DtError) -> Self {
        SmmuError::Dt(e)
    }
}

impl From<crate::mm::pgtable::PageTableError> for SmmuError {
    fn from(e: crate::mm::pgtable::PageTableError) -> Self {
        SmmuError::PageTable(e)
    }
}

/// Waits until `done` holds, for at most [`TIMEOUT_NS`] by the generic timer; false on time-out.
fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    // Most waits are over at the first look (QEMU's SMMU consumes commands as PROD is written):
    // the timer is read only when there is something to wait for.
    if done() {
        return true;
    }
    let freq = u128::from(arch::counter::frequency().max(1));
    let start = arch::counter::read();
    loop {
        if done() {
            return true;
        }
        let elapsed = u128::from(arch::counter::read().wrapping_sub(start));
        if elapsed * 1_000_000_000 / freq > u128::from(TIMEOUT_NS) {
            return done();
        }
        core::hint::spin_loop();
    }
}

/// Zeroed pages the SMMU reads or writes (stream table, queues, CDs), from the page allocator,
/// reached by the CPU at their physical address (the linear map covers every page it hands out).
/// Returned to the allocator on drop unless [`SmmuPages::keep`] was called.
pub(super) struct SmmuPages {
    pa: PhysAddr,
    order: u32,
    keep: bool,
}

impl SmmuPages {
    /// 2^`order` pages below `limit` (an address both the SMMU and the CPU can reach), zeroed, and
    /// cleaned to the point of coherency for a non-coherent SMMU.
    pub(super) fn alloc(order: u32, limit: u64, walk: Walk) -> Result<SmmuPages, SmmuError> {
        let pa = phys::alloc_pages_below(order, PhysAddr(limit)).map_err(SmmuError::NoMemory)?;
        let pages = SmmuPages { pa, order, keep: false };
        // SAFETY: fresh pages from the page allocator, owned by us, identity-mapped normal memory
        // below the CPU-addressable limit (`limit` is at most that).
        unsafe { core::ptr::write_bytes(pages.ptr() as *mut u8, 0, pages.bytes()) };
        publish(walk, pages.ptr() as usize, pages.bytes());
        Ok(pages)
    }

    pub(super) fn pa(&self) -> PhysAddr {
        self.pa
    }

    pub(super) fn ptr(&self) -> *mut u64 {
        self.pa.0 as usize as *mut u64
    }

    fn bytes(&self) -> usize {
        (PAGE_SIZE << self.order) as usize
    }

    /// Never free these pages: the SMMU may still read them.
    pub(super) fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for SmmuPages {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = phys::free_pages(self.pa, self.order) {
                println!("smmu: pages at {} refused by the page allocator: {e}", self.pa);
            }
        }
    }
}

/// Makes CPU stores to `[ptr, ptr + len)` visible to the SMMU before what follows (a register
/// write, a descriptor store): clean to the point of coherency for a non-coherent SMMU (the clean
/// ends with a DSB), a DSB otherwise.
pub(super) fn publish(walk: Walk, ptr: usize, len: usize) {
    match walk {
        Walk::Coherent => arch::cache::dsb(),
        Walk::NonCoherent => arch::cache::clean(ptr, len),
    }
}

/// Stores a doubleword the SMMU may read at any moment (STE dw0, a level-1 descriptor). On
/// 32-bit CPUs it is two stores, high word first: the fields that make these descriptors valid
/// (STE.V and Config, L1STD.Span) are in the low word, so the SMMU sees either the old descriptor,
/// the old one with a new pointer it does not use yet, or the new one.
fn write_live_dword(ptr: *mut u64, value: u64) {
    #[cfg(target_pointer_width = "64")]
    // SAFETY: the caller passes a pointer into a structure of ours (stream table page).
    unsafe {
        ptr.write_volatile(value)
    };
    #[cfg(not(target_pointer_width = "64"))]
    // SAFETY: as above; a doubleword is two aligned words, little endian.
    unsafe {
        let words = ptr as *mut u32;
        words.add(1).write_volatile((value >> 32) as u32);
        words.write_volatile(value as u32);
    }
}

struct CmdQueue {
    mem: SmmuPages,
    geo: QueueGeometry,
    /// Our producer pointer (index and wrap bit).
    prod: u32,
}

impl CmdQueue {
    fn entry(&self, index: u32) -> *mut u64 {
        // SAFETY (of the pointer arithmetic): `index` < entries, the queue's pages hold
        // entries * 16 bytes.
        self.mem.ptr().wrapping_add(index as usize * 2)
    }

    fn write(&self, index: u32, words: [u64; 2]) {
        let p = self.entry(index);
        // SAFETY: an entry of our queue memory (see `entry`); the SMMU reads it only after PROD
        // passes it.
        unsafe {
            p.write_volatile(words[0]);
            p.add(1).write_volatile(words[1]);
        }
    }

    fn read(&self, index: u32) -> [u64; 2] {
        let p = self.entry(index);
        // SAFETY: as in `write`.
        unsafe { [p.read_volatile(), p.add(1).read_volatile()] }
    }
}

struct EventQueue {
    mem: SmmuPages,
    geo: QueueGeometry,
    /// Our consumer pointer, with OVACKFLG in bit 31.
    cons: u32,
}

/// The stream table and what each configured stream points at.
struct StreamTable {
    layout: StreamTableLayout,
    /// The STE array (linear) or the level-1 descriptors (2-level).
    base: SmmuPages,
    /// Level-2 STE arrays by level-1 index.
    l2: BTreeMap<u32, SmmuPages>,
    /// The domain of every attached stream: a domain lives while a STE points at it.
    attached: BTreeMap<u32, Arc<Domain>>,
}

/// Counts of the commands issued since boot, for tests and measurements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandStats {
    pub commands: u32,
    pub syncs: u32,
    /// TLBI_NH_VA without range.
    pub tlbi_va: u32,
    /// TLBI_NH_VA with range.
    pub tlbi_range: u32,
    pub tlbi_asid: u32,
    /// CFGI_* of any kind.
    pub cfgi: u32,
    /// Commands the SMMU refused (CMDQ_ERR).
    pub errors: u32,
}

#[derive(Default)]
struct Counters {
    commands: AtomicU32,
    syncs: AtomicU32,
    tlbi_va: AtomicU32,
    tlbi_range: AtomicU32,
    tlbi_asid: AtomicU32,
    cfgi: AtomicU32,
    errors: AtomicU32,
}

impl Counters {
    #[inline(always)]
    fn count(&self, c: &Command) {
        self.commands.fetch_add(1, Ordering::Relaxed);
        let counter = match c {
            Command::Sync => &self.syncs,
            Command::TlbiNhVa { range: None, .. } => &self.tlbi_va,
            Command::TlbiNhVa { range: Some(_), .. } => &self.tlbi_range,
            Command::TlbiNhAsid { .. } => &self.tlbi_asid,
            Command::CfgiSte { .. } | Command::CfgiAll | Command::CfgiCd { .. } | Command::CfgiCdAll { .. } => &self.cfgi,
            Command::TlbiNhAll | Command::TlbiEl2All | Command::TlbiNsnhAll => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What [`Smmu::drain_events`] found.
#[derive(Debug, Default)]
pub struct EventBatch {
    pub events: Vec<Event>,
    /// Records were lost: the queue overflowed (EVENTQ_PROD.OVFLG, or GERROR.EVENTQ_ABT_ERR on
    /// QEMU, which sets that instead when the queue is full).
    pub lost: bool,
}

/// One probed and enabled SMMUv3.
pub struct Smmu {
    /// The register file, mapped (two 64 KiB pages).
    regs: usize,
    base: u64,
    name: String,
    phandle: Option<u32>,
    features: Features,
    pub(super) walk: Walk,
    /// Exclusive end of the addresses whose pages may hold SMMU structures: below 2^OAS (the SMMU
    /// must reach them) and CPU-addressable (the CPU writes them through the linear map).
    pub(super) table_limit: u64,
    cmdq: Mutex<CmdQueue>,
    evtq: Mutex<EventQueue>,
    streams: Mutex<StreamTable>,
    pub(super) asids: Mutex<AsidAllocator>,
    broken: AtomicBool,
    /// Serialises the read-modify-write acknowledgements of GERRORN (command errors on the
    /// command path, the other errors when events are drained).
    gerror_ack: Mutex<()>,
    counters: Counters,
    /// The lowest and highest StreamIDs of the PCI root buses, put in bypass at reset (for the
    /// probe report).
    bypass_sids: Option<(u32, u32)>,
}

/// The PCI StreamIDs routed to one SMMU.
struct PciStreams {
    /// One past the largest StreamID any `iommu-map` entry produces.
    end: u64,
    /// The StreamIDs of the functions of each root bus.
    root_bus: Vec<u32>,
}

/// Walks the PCI host bridges' `iommu-map`s for entries pointing at `phandle`. A bridge whose
/// node is malformed is skipped here: the PCI driver reports it.
fn pci_streams(dt: &DeviceTree<'_>, phandle: u32) -> PciStreams {
    let mut streams = PciStreams { end: 0, root_bus: Vec::new() };
    for node in dt.find_compatible(pci::COMPATIBLE) {
        let Ok(bridge) = HostBridge::from_dt(dt, &node) else { continue };
        let Some(map) = &bridge.iommu_map else { continue };
        for e in map.entries.iter().filter(|e| e.target == phandle) {
            streams.end = streams.end.max(u64::from(e.out_base) + u64::from(e.length));
        }
        let bus = u16::from(bridge.ecam.bus_start()) << 8;
        for devfn in 0..=0xffu16 {
            if let Some((target, sid)) = bridge.stream_id(bus | devfn) {
                if target == phandle {
                    streams.root_bus.push(sid);
                }
            }
        }
    }
    streams
}

impl Smmu {
    fn regs(&self) -> &Registers {
        // SAFETY: `regs` is the address `ioremap` gave for the SMMU's two register pages, mapped as
        // device memory for good; `Registers` spans exactly those pages and has only register
        // fields, accessed volatile.
        unsafe { &*(self.regs as *const Registers) }
    }

    /// Probes, resets and enables the SMMU of `node`.
    fn probe(dt: &DeviceTree<'_>, node: &Node<'_>) -> Result<Smmu, SmmuError> {
        let reg = dt.reg0(node)?;
        if reg.size() < regs::REGISTER_SPAN {
            return Err(SmmuError::Integration("its reg is smaller than the two 64 KiB register pages"));
        }
        if !BusMap::from_dt(node)?.is_identity() {
            return Err(SmmuError::Integration("dma-ranges offset the addresses it reads its tables from"));
        }
        let base = reg.base().as_u64();
        let va = kmap::ioremap(base, regs::REGISTER_SPAN).map_err(SmmuError::Registers)?;
        // SAFETY: as in `regs`, before the `Smmu` exists.
        let r = unsafe { &*(va as *const Registers) };
        let features = Features::from_idr(r.idr0.get(), r.idr1.get(), r.idr3.get(), r.idr5.get(), r.aidr.get())
            .map_err(SmmuError::Unsupported)?;
        let phandle = node.property("phandle").or_else(|| node.property("linux,phandle")).map(|p| p.as_u32()).transpose()?;
        let pci = phandle.map(|p| pci_streams(dt, p)).unwrap_or(PciStreams { end: 0, root_bus: Vec::new() });
        let sid_bits = if pci.end == 0 { features.sid_bits.min(ste::SPLIT) } else { ste::sid_bits_for(pci.end) };
        if sid_bits > features.sid_bits {
            return Err(SmmuError::TooFewSidBits { needed: sid_bits, have: features.sid_bits });
        }
        let layout = StreamTableLayout::choose(sid_bits, features.two_level)
            .ok_or(SmmuError::Integration("its StreamIDs need a 2-level stream table, which it lacks"))?;
        let coherent = crate::dma::is_coherent_in_dt(node) && !crate::dma::bounce::force_noncoherent();
        let walk = if coherent { Walk::Coherent } else { Walk::NonCoherent };
        let cpu_limit = crate::kernel::cpu_addressable_limit().unwrap_or(u64::MAX);
        let table_limit = (1u64 << features.oa_bits).min(cpu_limit);
        let queue = |log2: u8, max: u8, entry: u64| {
            let geo = QueueGeometry::new(log2.min(max)).ok_or(SmmuError::Unsupported(Unsupported::QueueTooSmall))?;
            let order = order_for(u64::from(geo.entries()) * entry);
            Ok::<_, SmmuError>((geo, SmmuPages::alloc(order, table_limit, walk)?))
        };
        let (cmd_geo, cmd_mem) = queue(CMDQ_LOG2, features.cmdq_max_log2, CMD_BYTES)?;
        let (evt_geo, evt_mem) = queue(EVENTQ_LOG2, features.eventq_max_log2, EVENT_BYTES)?;
        let strtab = SmmuPages::alloc(order_for(layout.base_table_bytes()), table_limit, walk)?;
        let mut name = String::new();
        let _ = fmt::write(&mut name, format_args!("{}", node.path()));
        let bypass_sids = pci.root_bus.iter().copied().min().zip(pci.root_bus.iter().copied().max());
        let smmu = Smmu {
            regs: va,
            base,
            name,
            phandle,
            features,
            walk,
            table_limit,
            cmdq: Mutex::new(CmdQueue { mem: cmd_mem, geo: cmd_geo, prod: 0 }),
            evtq: Mutex::new(EventQueue { mem: evt_mem, geo: evt_geo, cons: 0 }),
            streams: Mutex::new(StreamTable { layout, base: strtab, l2: BTreeMap::new(), attached: BTreeMap::new() }),
            asids: Mutex::new(AsidAllocator::new(features.asid_bits)),
            broken: AtomicBool::new(false),
            gerror_ack: Mutex::new(()),
            counters: Counters::default(),
            bypass_sids,
        };
        smmu.reset(&pci.root_bus)?;
        Ok(smmu)
    }

    /// Writes CR0 and waits for CR0ACK to match.
    fn set_cr0(&self, value: u32) -> Result<(), SmmuError> {
        self.regs().cr0.set(value);
        if wait_until(|| self.regs().cr0ack.get() == value) {
            Ok(())
        } else {
            self.mark_broken("CR0ACK did not follow CR0 in 1 s");
            Err(SmmuError::Timeout("CR0ACK"))
        }
    }

    /// The reset sequence (IHI 0070 section 3.21, Linux's `arm_smmu_device_reset`), ending with
    /// translation enabled; `root_bus` StreamIDs bypass, every other one has an invalid STE.
    fn reset(&self, root_bus: &[u32]) -> Result<(), SmmuError> {
        let r = self.regs();
        // Off first (firmware may have left it on), so that tables and queues can be replaced.
        self.set_cr0(0)?;
        let (cache, share) = self.walk.fields();
        let (cache, share) = (cache as u32, share as u32);
        r.cr1.write(
            CR1::QUEUE_IC.val(cache)
                + CR1::QUEUE_OC.val(cache)
                + CR1::QUEUE_SH.val(share)
                + CR1::TABLE_IC.val(cache)
                + CR1::TABLE_OC.val(cache)
                + CR1::TABLE_SH.val(share),
        );
        r.cr2.write(CR2::RECINVSID::SET + CR2::PTM::SET);
        let allocate_hint = if self.walk == Walk::Coherent { regs::BASE_ALLOCATE_HINT } else { 0 };
        {
            let mut streams = self.streams.lock();
            for &sid in root_bus {
                let slot = self.ste(&mut streams, sid)?;
                self.write_ste(slot, sid, StreamConfig::Bypass, false)?;
            }
            regs::write_pair(&r.strtab_base, streams.base.pa().as_u64() | allocate_hint);
            r.strtab_base_cfg.set(streams.layout.base_cfg());
        }
        {
            let q = self.cmdq.lock();
            regs::write_pair(&r.cmdq_base, q.mem.pa().as_u64() | allocate_hint | u64::from(q.geo.log2()));
            r.cmdq_prod.set(0);
            r.cmdq_cons.set(0);
        }
        // Acknowledge errors left from before the reset.
        r.gerrorn.set(r.gerror.get());
        self.set_cr0(CR0::CMDQEN::SET.value)?;
        let mut invalidate = alloc::vec![Command::CfgiAll];
        if self.features.hyp {
            invalidate.push(Command::TlbiEl2All);
        }
        invalidate.push(Command::TlbiNsnhAll);
        self.submit(&invalidate, true)?;
        {
            let q = self.evtq.lock();
            regs::write_pair(&r.eventq_base, q.mem.pa().as_u64() | allocate_hint | u64::from(q.geo.log2()));
            r.eventq_prod.set(0);
            r.eventq_cons.set(0);
        }
        self.set_cr0((CR0::CMDQEN::SET + CR0::EVENTQEN::SET).value)?;
        // No interrupts: nothing in dmakern routes the SMMU's SPIs yet, the queues are polled.
        r.irq_ctrl.set(0);
        if !wait_until(|| r.irq_ctrlack.get() == 0) {
            return Err(SmmuError::Timeout("IRQ_CTRLACK"));
        }
        self.set_cr0((CR0::CMDQEN::SET + CR0::EVENTQEN::SET + CR0::SMMUEN::SET).value)
    }

    /// The device tree path of the SMMU's node.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Physical address of the register file.
    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn phandle(&self) -> Option<u32> {
        self.phandle
    }

    pub fn features(&self) -> &Features {
        &self.features
    }

    /// Whether the SMMU snoops the CPU caches (DT `dma-coherent`, and no `dma.noncoherent`).
    pub fn is_coherent(&self) -> bool {
        self.walk == Walk::Coherent
    }

    /// The stream table's layout.
    pub fn stream_table(&self) -> StreamTableLayout {
        self.streams.lock().layout
    }

    /// Command counts since boot.
    pub fn stats(&self) -> CommandStats {
        let c = &self.counters;
        let get = |a: &AtomicU32| a.load(Ordering::Relaxed);
        CommandStats {
            commands: get(&c.commands),
            syncs: get(&c.syncs),
            tlbi_va: get(&c.tlbi_va),
            tlbi_range: get(&c.tlbi_range),
            tlbi_asid: get(&c.tlbi_asid),
            cfgi: get(&c.cfgi),
            errors: get(&c.errors),
        }
    }

    pub(super) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Stops driving the SMMU: it failed in a way that leaves its caches in doubt.
    pub(super) fn mark_broken(&self, why: &str) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            println!("smmu {}: {why}; no longer driven, and memory it may read is never freed", self.name);
        }
    }

    /// Makes CPU stores to `[ptr, ptr + len)` visible to the SMMU (see [`publish`]).
    pub(super) fn publish(&self, ptr: usize, len: usize) {
        publish(self.walk, ptr, len);
    }

    /// Queues `cmds`, followed by a CMD_SYNC when `sync` is set, and with `sync` waits until the
    /// SMMU has consumed them all. A command the SMMU refuses is reported, replaced by a CMD_SYNC
    /// so that the queue moves on, and returned as the error once the rest is consumed.
    pub(super) fn submit(&self, cmds: &[Command], sync: bool) -> Result<(), SmmuError> {
        Ok(self.submit_iter(cmds.iter().copied(), sync)?)
    }

    /// [`Smmu::submit`] of commands generated one by one, with the command path's own error.
    pub(super) fn submit_iter(&self, cmds: impl Iterator<Item = Command>, sync: bool) -> Result<(), QueueError> {
        // Encoded straight into the queue: this runs on every strict unmap, so no buffer on the
        // heap.
        let entries = cmds.chain(sync.then_some(Command::Sync)).map(|c| {
            self.counters.count(&c);
            c.encode()
        });
        self.submit_entries(entries, sync)
    }

    /// [`Smmu::submit`] of encoded commands (the last of which is the CMD_SYNC when `wait`).
    pub(super) fn submit_raw(&self, words: &[[u64; 2]], wait: bool) -> Result<(), SmmuError> {
        Ok(self.submit_entries(words.iter().copied(), wait)?)
    }

    /// Writes `entries` to the command queue, publishes them, and with `wait` waits until the SMMU
    /// has consumed them all.
    fn submit_entries(&self, entries: impl Iterator<Item = [u64; 2]>, wait: bool) -> Result<(), QueueError> {
        if self.is_broken() {
            return Err(QueueError::Broken);
        }
        let r = self.regs();
        let mut q = self.cmdq.lock();
        let mut failure = None;
        let mut first_unpublished = q.prod;
        // Entries known to be free: CMDQ_CONS is read again only when they run out.
        let mut free = 0;
        for entry in entries {
            if free == 0 {
                free = q.geo.free(q.prod, q.geo.pointer(r.cmdq_cons.get()));
            }
            if free == 0 {
                self.publish_commands(&q, first_unpublished);
                first_unpublished = q.prod;
                let target = q.geo.pointer(q.prod.wrapping_sub(q.geo.entries() - 1));
                self.wait_consumed(&q, target, &mut failure)?;
                // Everything before `target` is consumed: at least one entry is free.
                free = q.geo.free(q.prod, q.geo.pointer(r.cmdq_cons.get())).max(1);
            }
            q.write(q.geo.index(q.prod), entry);
            q.prod = q.geo.next(q.prod);
            free -= 1;
        }
        self.publish_commands(&q, first_unpublished);
        if wait {
            let prod = q.prod;
            self.wait_consumed(&q, prod, &mut failure)?;
        }
        failure.map_or(Ok(()), Err)
    }

    /// Makes the entries from `from` to the producer pointer visible, then writes CMDQ_PROD.
    fn publish_commands(&self, q: &CmdQueue, from: u32) {
        if self.walk == Walk::NonCoherent {
            let mut p = from;
            while p != q.prod {
                self.publish(q.entry(q.geo.index(p)) as usize, CMD_BYTES as usize);
                p = q.geo.next(p);
            }
        }
        arch::cache::dsb();
        self.regs().cmdq_prod.set(q.prod);
    }

    /// Whether the SMMU has consumed every entry before `target`: the entries between CONS and
    /// PROD no longer include them.
    #[inline(always)]
    fn consumed(&self, q: &CmdQueue, target: u32) -> bool {
        let cons = q.geo.pointer(self.regs().cmdq_cons.get());
        q.geo.used(q.prod, cons) <= q.geo.used(q.prod, target)
    }

    /// Waits until CMDQ_CONS has caught up with `target` (everything before it consumed), handling
    /// command errors on the way (the first is stored in `failure`).
    #[inline(always)]
    fn wait_consumed(&self, q: &CmdQueue, target: u32, failure: &mut Option<QueueError>) -> Result<(), QueueError> {
        // Usually done at the first look (QEMU consumes commands as PROD is written).
        if self.consumed(q, target) {
            return Ok(());
        }
        self.wait_consumed_slow(q, target, failure)
    }

    #[inline(never)]
    fn wait_consumed_slow(&self, q: &CmdQueue, target: u32, failure: &mut Option<QueueError>) -> Result<(), QueueError> {
        let r = self.regs();
        let done = wait_until(|| {
            if self.consumed(q, target) {
                return true;
            }
            // The SMMU stops at a command it refuses, so CONS is short of `target` while an error
            // before it is pending: GERROR need only be read then.
            if GlobalErrors::active(r.gerror.get(), r.gerrorn.get()).contains(gerror::CMDQ_ERR) {
                let e = self.recover_command_error(q);
                failure.get_or_insert(e);
            }
            false
        });
        if done {
            Ok(())
        } else {
            let cons = r.cmdq_cons.get();
            self.mark_broken(&alloc::format!("no progress on the command queue in 1 s (CONS {cons:#x}, PROD {:#x})", q.prod));
            Err(QueueError::Timeout("command queue progress (CMD_SYNC)"))
        }
    }

    /// Reports the command the SMMU stopped on, replaces it with a CMD_SYNC unless the error was an
    /// abort reading it (then it is retried as it is), and acknowledges GERROR.CMDQ_ERR so that
    /// consumption resumes.
    // Out of line: the wait loop that calls it runs on every unmap, the error almost never.
    #[cold]
    #[inline(never)]
    fn recover_command_error(&self, q: &CmdQueue) -> QueueError {
        let r = self.regs();
        let cons = r.cmdq_cons.get();
        let kind = CommandErrorKind::from_code(((cons >> regs::CONS_ERR_SHIFT) & regs::CONS_ERR_MASK) as u8);
        let index = q.geo.index(q.geo.pointer(cons));
        let entry = q.read(index);
        let opcode = entry[0] as u8;
        println!(
            "smmu {}: command queue stopped at entry {index}: {kind}: {} ({:#018x} {:#018x}){}",
            self.name,
            cmd::opcode_name(opcode),
            entry[0],
            entry[1],
            if kind == CommandErrorKind::Abort { "; retrying it" } else { "; replaced by CMD_SYNC" }
        );
        if kind != CommandErrorKind::Abort {
            q.write(index, Command::Sync.encode());
            self.publish(q.entry(index) as usize, CMD_BYTES as usize);
        }
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        let _ack = self.gerror_ack.lock();
        let (ge, gen) = (r.gerror.get(), r.gerrorn.get());
        r.gerrorn.set(gen ^ ((ge ^ gen) & gerror::CMDQ_ERR));
        QueueError::Command { kind, opcode }
    }

    /// Reports and acknowledges active global errors other than CMDQ_ERR (which the command path
    /// handles); returns them. A service failure (SFM_ERR) marks the SMMU broken.
    pub fn check_global_errors(&self) -> GlobalErrors {
        let r = self.regs();
        let ack = self.gerror_ack.lock();
        let (ge, gen) = (r.gerror.get(), r.gerrorn.get());
        let active = GlobalErrors(GlobalErrors::active(ge, gen).0 & !gerror::CMDQ_ERR);
        if !active.is_empty() {
            r.gerrorn.set(gen ^ active.0);
        }
        drop(ack);
        if !active.is_empty() {
            println!("smmu {}: global error: {active}", self.name);
            if active.contains(gerror::SFM_ERR) {
                self.mark_broken("service failure mode");
            }
        }
        active
    }

    /// Reads every pending event record, reports each on the console (bursts that differ only in
    /// address as one line) and returns them. Interrupts are not wired: call this after DMA that
    /// may have faulted.
    pub fn drain_events(&self) -> EventBatch {
        let r = self.regs();
        let mut q = self.evtq.lock();
        let mut batch = EventBatch { events: Vec::new(), lost: self.check_global_errors().contains(gerror::EVENTQ_ABT_ERR) };
        for _ in 0..DRAIN_PASSES {
            let prod_reg = r.eventq_prod.get();
            let overflow = prod_reg & regs::EVENTQ_OVERFLOW;
            batch.lost |= overflow != q.cons & regs::EVENTQ_OVERFLOW;
            let prod = q.geo.pointer(prod_reg);
            let mut cons = q.geo.pointer(q.cons);
            if q.geo.is_empty(prod, cons) && overflow == q.cons & regs::EVENTQ_OVERFLOW {
                break;
            }
            // The records before PROD were written before PROD was: order their reads after it.
            arch::cache::dsb();
            while !q.geo.is_empty(prod, cons) {
                let entry = q.mem.ptr().wrapping_add(q.geo.index(cons) as usize * EVENT_DWORDS);
                if self.walk == Walk::NonCoherent {
                    arch::cache::invalidate(entry as usize, EVENT_BYTES as usize);
                }
                let mut raw = [0u64; EVENT_DWORDS];
                for (i, w) in raw.iter_mut().enumerate() {
                    // SAFETY: a record inside our event queue's pages (index < entries), written
                    // by the SMMU before it advanced PROD past it.
                    *w = unsafe { entry.add(i).read_volatile() };
                }
                batch.events.push(Event::decode(raw));
                cons = q.geo.next(cons);
            }
            // Free the slots and acknowledge an overflow in one write.
            q.cons = cons | overflow;
            r.eventq_cons.set(q.cons);
        }
        drop(q);
        for run in event::coalesce(&batch.events) {
            println!("smmu {}: {run}", self.name);
        }
        if batch.lost {
            println!("smmu {}: event queue overflowed: events were lost", self.name);
        }
        batch
    }

    /// Points StreamID `sid` at `domain`'s context descriptor (stage-1 translation). The domain
    /// stays alive at least until the stream is pointed elsewhere.
    pub fn attach(&self, sid: u32, domain: &Arc<Domain>) -> Result<(), SmmuError> {
        if !core::ptr::eq(domain.smmu(), self) {
            return Err(SmmuError::ForeignDomain);
        }
        self.set_stream(sid, StreamConfig::Stage1 { cd: domain.cd_pa() }, Some(domain.clone()))
    }

    /// Lets StreamID `sid`'s DMA through untranslated.
    pub fn attach_bypass(&self, sid: u32) -> Result<(), SmmuError> {
        self.set_stream(sid, StreamConfig::Bypass, None)
    }

    /// Aborts every transaction of StreamID `sid`, silently.
    pub fn detach(&self, sid: u32) -> Result<(), SmmuError> {
        self.set_stream(sid, StreamConfig::Abort, None)
    }

    fn set_stream(&self, sid: u32, config: StreamConfig, domain: Option<Arc<Domain>>) -> Result<(), SmmuError> {
        if self.is_broken() {
            return Err(SmmuError::Broken);
        }
        let old = {
            let mut streams = self.streams.lock();
            let ste = self.ste(&mut streams, sid)?;
            if let Err(e) = self.write_ste(ste, sid, config, true) {
                // The SMMU may now use the old or the new configuration: neither domain may ever
                // be freed (the old one stays in the table, the new one is leaked).
                core::mem::forget(domain);
                return Err(e);
            }
            match domain {
                Some(d) => streams.attached.insert(sid, d),
                None => streams.attached.remove(&sid),
            }
        };
        // A domain whose last stream this was goes away here, outside the stream table's lock.
        drop(old);
        Ok(())
    }

    /// The current configuration of StreamID `sid`'s STE (for reports and tests).
    pub fn stream_config(&self, sid: u32) -> Option<StreamConfig> {
        let mut streams = self.streams.lock();
        let (ste, _) = self.ste_ptr(&mut streams, sid, false).ok()??;
        // SAFETY: STE dw0 inside our stream table (see `ste_ptr`).
        ste::decode_ste_config(unsafe { ste.read_volatile() })
    }

    /// The STE of `sid`: a pointer to its 8 doublewords, and whether a level-2 table was created
    /// for it (with `create`; without, `None` when there is none).
    fn ste_ptr(&self, streams: &mut StreamTable, sid: u32, create: bool) -> Result<Option<(*mut u64, bool)>, SmmuError> {
        let limit = 1u64 << streams.layout.sid_bits();
        if u64::from(sid) >= limit {
            return Err(SmmuError::BadStreamId { sid, limit });
        }
        match streams.layout {
            StreamTableLayout::Linear { .. } => Ok(Some((streams.base.ptr().wrapping_add(sid as usize * STE_DWORDS), false))),
            StreamTableLayout::TwoLevel { split, .. } => {
                let l1 = sid >> split;
                let within = (sid & ((1 << split) - 1)) as usize;
                let mut created = false;
                if !streams.l2.contains_key(&l1) {
                    if !create {
                        return Ok(None);
                    }
                    // Zeroed: every STE invalid until configured.
                    let table = SmmuPages::alloc(order_for(STE_BYTES << split), self.table_limit, self.walk)?;
                    let desc = streams.base.ptr().wrapping_add(l1 as usize);
                    write_live_dword(desc, ste::encode_l1_descriptor(table.pa(), split));
                    self.publish(desc as usize, 8);
                    streams.l2.insert(l1, table);
                    created = true;
                }
                let table = &streams.l2[&l1];
                Ok(Some((table.ptr().wrapping_add(within * STE_DWORDS), created)))
            }
        }
    }

    /// The STE of `sid`, creating its level-2 table if needed; nothing is written to the STE.
    fn ste(&self, streams: &mut StreamTable, sid: u32) -> Result<SteSlot, SmmuError> {
        match self.ste_ptr(streams, sid, true)? {
            Some((ptr, l1_created)) => Ok(SteSlot { ptr, l1_created }),
            None => Err(SmmuError::BadStreamId { sid, limit: 1u64 << streams.layout.sid_bits() }),
        }
    }

    /// Rewrites the STE of `sid` and, with `invalidate`, drops the SMMU's cached copies (before
    /// the SMMU is enabled there is nothing cached, and the reset invalidates everything).
    ///
    /// A valid STE is never rewritten in place: it first becomes an abort STE (only dw0 matters
    /// then) and is invalidated, then dw1..7 are written, then dw0 with V set, so the SMMU never
    /// sees a mix of two configurations; in between, the stream's DMA aborts.
    fn write_ste(&self, slot: SteSlot, sid: u32, config: StreamConfig, invalidate: bool) -> Result<(), SmmuError> {
        let ste = slot.ptr;
        let words = ste::encode_ste(config, self.walk);
        // SAFETY: STE dw0 inside our stream table (see `ste_ptr`).
        let old = ste::decode_ste_config(unsafe { ste.read_volatile() });
        // Leaf = 0 when the level-1 descriptor is new, so that no stale copy of it survives.
        let mut cfgi = alloc::vec![Command::CfgiSte { sid, leaf: !slot.l1_created }];
        if matches!(old, Some(StreamConfig::Stage1 { .. })) {
            // The old CD may be cached apart from the STE.
            cfgi.push(Command::CfgiCdAll { sid });
        }
        if invalidate && old != Some(StreamConfig::Invalid) && old != Some(StreamConfig::Abort) {
            write_live_dword(ste, ste::encode_ste(StreamConfig::Abort, self.walk)[0]);
            self.publish(ste as usize, STE_BYTES as usize);
            self.submit(&cfgi, true)?;
        }
        for (i, &w) in words.iter().enumerate().skip(1) {
            // SAFETY: doublewords 1..8 of the STE (see `ste_ptr`); the SMMU ignores them while dw0
            // is invalid or abort.
            unsafe { ste.add(i).write_volatile(w) };
        }
        self.publish(ste as usize, STE_BYTES as usize);
        write_live_dword(ste, words[0]);
        self.publish(ste as usize, STE_BYTES as usize);
        if invalidate {
            self.submit(&cfgi, true)?;
        }
        Ok(())
    }
}

/// Where a STE is (see [`Smmu::ste_ptr`]).
#[derive(Clone, Copy)]
struct SteSlot {
    ptr: *mut u64,
    /// Its level-1 descriptor was just created.
    l1_created: bool,
}

impl Drop for Smmu {
    /// Only an SMMU whose probe failed is dropped (probed ones live for good): turn it off before
    /// its queues and tables go back to the page allocator, or keep them if it does not stop.
    fn drop(&mut self) {
        self.regs().cr0.set(0);
        if !wait_until(|| self.regs().cr0ack.get() == 0) {
            self.cmdq.get_mut().mem.keep();
            self.evtq.get_mut().mem.keep();
            let streams = self.streams.get_mut();
            streams.base.keep();
            streams.l2.values_mut().for_each(SmmuPages::keep);
        }
    }
}

impl fmt::Display for Smmu {
    /// The probe report.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = |g: QueueGeometry| g.entries();
        write!(f, "{} at {:#x}: {}; ", self.name, self.base, self.features)?;
        match self.stream_table() {
            StreamTableLayout::Linear { sid_bits } => write!(f, "linear stream table of {sid_bits} SID bits")?,
            StreamTableLayout::TwoLevel { sid_bits, split } => {
                write!(f, "2-level stream table of {sid_bits} SID bits (level 2: {} STEs)", 1u32 << split)?
            }
        }
        write!(
            f,
            ", {}-entry command queue, {}-entry event queue, {}",
            q(self.cmdq.lock().geo),
            q(self.evtq.lock().geo),
            if self.is_coherent() { "coherent" } else { "non-coherent (tables and queues cleaned to the point of coherency)" }
        )?;
        if let Some((first, last)) = self.bypass_sids {
            write!(f, "; PCI root-bus StreamIDs {first:#x}..={last:#x} bypass")?;
        }
        f.write_str("; interrupts not wired, events polled")
    }
}

/// The page order of an allocation of `bytes` (at least one page).
fn order_for(bytes: u64) -> u32 {
    let pages = bytes.div_ceil(PAGE_SIZE).max(1);
    pages.next_power_of_two().trailing_zeros()
}

static SMMUS: Once<Vec<&'static Smmu>> = Once::new();

/// Probes and enables every available "arm,smmu-v3" node of `dt`, reporting each on the console
/// (what it is, or why it is not used). Call once at boot, after the page allocator and the
/// kernel page tables are up; later calls do nothing. A DT without an SMMU leaves no trace.
pub fn init(dt: &DeviceTree<'_>) {
    SMMUS.call_once(|| {
        let mut found = Vec::new();
        for node in dt.find_compatible(COMPATIBLE) {
            match Smmu::probe(dt, &node) {
                Ok(smmu) => {
                    let smmu: &'static Smmu = Box::leak(Box::new(smmu));
                    println!("smmu: {smmu}");
                    found.push(smmu);
                }
                Err(e) => println!("smmu: {}: not used: {e}", node.path()),
            }
        }
        found
    });
}

/// Every SMMU [`init`] enabled (none before it ran).
pub fn smmus() -> &'static [&'static Smmu] {
    SMMUS.get().map_or(&[], Vec::as_slice)
}

/// The enabled SMMU whose node has phandle `phandle`.
pub fn smmu_by_phandle(phandle: u32) -> Option<&'static Smmu> {
    smmus().iter().copied().find(|s| s.phandle == Some(phandle))
}

/// The StreamID of PCI function `pdev` of the enumerated bus, from its host bridge's `iommu-map`;
/// `None` if the map does not cover it (its DMA does not go through an IOMMU).
pub fn sid_of(pdev: &PciDevice) -> Option<u32> {
    let bus = pci::ecam::bus().ok()?;
    bus.bridge.stream_id(pdev.requester_id()).map(|(_, sid)| sid)
}

/// The enabled SMMU that PCI function `pdev`'s DMA goes through, with its StreamID; `None` if
/// the `iommu-map` does not cover the function or points at an SMMU that is not in use.
pub fn smmu_for_pci(pdev: &PciDevice) -> Option<(&'static Smmu, u32)> {
    let bus = pci::ecam::bus().ok()?;
    let (phandle, sid) = bus.bridge.stream_id(pdev.requester_id())?;
    Some((smmu_by_phandle(phandle)?, sid))
}
