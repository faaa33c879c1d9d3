//! Arm SMMUv3 driver ("arm,smmu-v3"): stage-1 translation of PCI DMA through per-domain IO page
//! tables, for the dma-iommu back end.
//!
//! What it does, following the SMMUv3 architecture (Arm IHI 0070):
//! - [`init`] probes every "arm,smmu-v3" node: reads the ID registers and refuses, with the
//!   reason on the console, an SMMU it cannot drive (no stage 1, no AArch64 tables, no 4 KiB
//!   granule, fewer StreamID bits than the PCI `iommu-map`s need, ...); then resets it: SMMU
//!   off, queue and table attributes (CR1) and private TLB maintenance (CR2), a stream table
//!   (linear when 256 StreamIDs suffice, 2-level with 256-STE level-2 tables otherwise), the
//!   command queue, CFGI_ALL + TLBI_NSNH_ALL + CMD_SYNC, the event queue, and SMMU on.
//! - Streams: the functions of each PCI root bus behind the SMMU (the only bus the kernel
//!   enumerates) start in bypass, so that devices the DMA layer has not put in a domain keep
//!   working exactly as before the SMMU was enabled; every other StreamID's DMA aborts and is
//!   reported (C_BAD_STE, or C_BAD_STREAMID where no level-2 table exists yet). [`Smmu::attach`]
//!   points a stream at a [`Domain`], [`Smmu::attach_bypass`] and [`Smmu::detach`] (abort) take
//!   it back.
//! - A [`Domain`] is one ASID, one context descriptor and one IO page table (the long-descriptor
//!   code of `mm::pgtable`, `PageTableConfig::SMMU_39`: a 39-bit IOVA space, 4 KiB granule).
//!   It has its own ASID because the SMMU tags TLB entries by ASID, not by device.
//! - The command queue is driven under one lock; CMD_SYNC completion is polled with a time-out
//!   (an error, never a hang); a command error (GERROR.CMDQ_ERR) is reported with the failing
//!   command, which is replaced by a CMD_SYNC so the queue can resume.
//! - Events are drained by polling ([`Smmu::drain_events`]): interrupts are not wired in dmakern
//!   yet (the SMMU's IRQ_CTRL stays 0), so the DMA layer and the tests call it, typically after a
//!   transfer. Every event is decoded and reported on the console; so are global errors.
//!
//! Coherence: QEMU's SMMU is `dma-coherent`, and then the SMMU snoops the CPU's caches for its
//! tables and queues. For an SMMU the DT does not mark coherent (or with `dma.noncoherent`), the
//! driver gives the SMMU non-cacheable attributes and cleans what it writes to the point of
//! coherency before publishing it: stream table entries, context descriptors, commands and every
//! page-table page an operation touched; event records are invalidated before they are read.
//!
//! Lock order: a domain's tables (then its list of pages to clean), then the stream table, then
//! the command queue, then the lock of GERRORN acknowledgements (also taken under the event
//! queue's). The ASID allocator's lock is taken alone. Commands wait for the SMMU under the
//! command queue's lock.
//!
//! The pure parts (register fields, commands, STE/CD encodings, event decoding, queue
//! arithmetic, ASIDs) are host-tested; the driver itself, the domains and the KTAP suite `smmu`
//! exist in the kernel build only.

pub mod asid;
pub mod cmd;
pub mod event;
pub mod queue;
pub mod regs;
pub mod ste;

#[cfg(target_os = "none")]
mod domain;
#[cfg(target_os = "none")]
mod driver;
#[cfg(target_os = "none")]
mod ktests;

#[cfg(target_os = "none")]
pub use domain::{Domain, IoProt, IoTables, IOVA_BITS};
#[cfg(target_os = "none")]
pub use driver::{init, sid_of, smmu_by_phandle, smmu_for_pci, smmus, CommandStats, EventBatch, Smmu, SmmuError, COMPATIBLE};
