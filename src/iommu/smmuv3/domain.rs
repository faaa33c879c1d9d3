//! SMMU domains: one ASID, one stage-1 context descriptor and one IO page table, shared by every
//! stream attached to it.
//!
//! The tables are `mm::pgtable` trees with `PageTableConfig::SMMU_39` (a 39-bit IOVA space, walks
//! from level 1, ASID-tagged leaves the device may access unprivileged) whose output size is
//! lowered to the SMMU's OAS; their pages come from the page allocator ([`IoTables`]). Mapping
//! uses the largest blocks the alignment allows and needs no TLB maintenance (the SMMU caches no
//! faulting walk). Unmapping goes through [`TlbOps`] on the command queue: TLBI_NH_VA per leaf
//! granule, or by range when the SMMU has range invalidation, or TLBI_NH_ASID when that would take
//! too many commands, and CMD_SYNC. A non-strict unmap leaves the leaf invalidations to the
//! caller's batched [`Domain::flush_all`] (the lazy flush queue of dma-iommu); invalidations that
//! guard the reuse of a table page (a table removed from the tree) or a block split
//! (break-before-make) are still done at once.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::mem::ManuallyDrop;
use core::sync::atomic::{AtomicBool, Ordering};

use spin::Mutex;

use super::cmd::{self, Command, TlbiPlan};
use super::driver::{QueueError, Smmu, SmmuError, SmmuPages};
use super::ste::{ContextDescriptor, Walk, CD_DWORDS};
use crate::dma::maint::Direction;
use crate::mm::addr::{PhysAddr, PAGE_SHIFT, PAGE_SIZE};
use crate::mm::pgtable::{
    MappingStats, MemAttr, PageTable, PageTableConfig, Perms, TableAlloc, TlbInvalidation, TlbOps, Translation, MAIR_VALUE,
    MAX_OA_BITS,
};
use crate::mm::phys;
use crate::println;

/// The smallest block a page table maps (level 2).
const BLOCK_2M: u64 = 1 << (PAGE_SHIFT + 9);
/// IOVA bits of every domain: T0SZ = 25, walks start at level 1 (QEMU 7.2 accepts T0SZ 16..=39).
pub const IOVA_BITS: u8 = 39;
/// One invalidation request taking more by-address commands than this becomes a TLBI_NH_ASID.
const MAX_TLBI_COMMANDS: usize = 16;

/// Access rights and memory type of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoProt {
    pub perms: Perms,
    pub attr: MemAttr,
}

impl IoProt {
    /// Memory for DMA in direction `dir`: a to-device buffer is read-only for the device (AP[2] =
    /// 1), the others read-write (stage 1 has no write-only permission). Cacheable when the device
    /// snoops the CPU caches (`coherent`), non-cacheable otherwise.
    pub const fn dma(dir: Direction, coherent: bool) -> IoProt {
        let perms = match dir {
            Direction::ToDevice => Perms::RO,
            Direction::FromDevice | Direction::Bidirectional => Perms::RW,
        };
        let attr = if coherent { MemAttr::Normal } else { MemAttr::NormalNonCacheable };
        IoProt { perms, attr }
    }

    /// A device register page such as an MSI doorbell: Device-nGnRE, read-write.
    pub const MMIO: IoProt = IoProt { perms: Perms::RW, attr: MemAttr::Device };
}

/// Table pages written since the SMMU last saw them (non-coherent SMMUs only), shared by a
/// domain's allocator, which records every page the page-table code touches, and the domain,
/// which cleans them before anything makes the SMMU walk them.
type DirtyPages = Arc<Mutex<Vec<PhysAddr>>>;

/// IO page-table pages from the page allocator: zeroed, below the SMMU's output size and the
/// CPU-addressable limit, reached by the CPU at their physical address.
pub struct IoTables {
    smmu: &'static Smmu,
    dirty: Option<DirtyPages>,
    pages: usize,
}

impl IoTables {
    /// Table pages currently allocated (the root included).
    pub fn pages(&self) -> usize {
        self.pages
    }
}

// SAFETY: pages come from the page allocator (handed out once until freed), are zeroed (and, for
// a non-coherent SMMU, cleaned to the point of coherency) before they are returned, and the linear
// map makes each readable and writable at its physical address, which is below the CPU-addressable
// limit. The walker is coherent with that mapping, or every page written through `table_ptr` is
// recorded and cleaned before the SMMU is told to walk it (`Domain::publish_tables`).
unsafe impl TableAlloc for IoTables {
    fn alloc_table(&mut self) -> Option<PhysAddr> {
        let mut page = SmmuPages::alloc(0, self.smmu.table_limit, self.smmu.walk).ok()?;
        // Owned by the page table from now on; `free_table` returns it.
        page.keep();
        self.pages += 1;
        Some(page.pa())
    }

    unsafe fn free_table(&mut self, pa: PhysAddr) {
        self.pages = self.pages.saturating_sub(1);
        if self.smmu.is_broken() {
            // The sync that should have made this page unreachable may not have completed.
            return;
        }
        if let Err(e) = phys::free_pages(pa, 0) {
            println!("smmu: table page {pa} refused by the page allocator: {e}");
        }
    }

    // On every descriptor access: opt-level "z" would leave it a call.
    #[inline(always)]
    fn table_ptr(&self, pa: PhysAddr) -> *mut u64 {
        if let Some(dirty) = &self.dirty {
            let mut d = dirty.lock();
            if !d.contains(&pa) {
                d.push(pa);
            }
        }
        pa.0 as usize as *mut u64
    }
}

/// A translation context: streams attached to the same domain share its IOVA space.
pub struct Domain {
    smmu: &'static Smmu,
    asid: u16,
    /// The context descriptor (one page, 64 bytes used).
    cd: SmmuPages,
    tables: Mutex<ManuallyDrop<PageTable<IoTables>>>,
    dirty: Option<DirtyPages>,
    /// A mapping of 2 MiB or more was made, so the tables may hold blocks: only then can an unmap
    /// cut one (see [`Domain::unmap`]), which costs two table walks to find out.
    may_hold_blocks: AtomicBool,
}

impl Smmu {
    /// A new, empty domain with its own ASID. Attach streams with [`Smmu::attach`].
    pub fn new_domain(&'static self) -> Result<Arc<Domain>, SmmuError> {
        let asid = self.asids.lock().alloc().ok_or(SmmuError::AsidsExhausted)?;
        let release = |e: SmmuError| {
            self.asids.lock().free(asid);
            e
        };
        let dirty = (self.walk == Walk::NonCoherent).then(|| Arc::new(Mutex::new(Vec::new())));
        let config = PageTableConfig { oa_bits: self.features().oa_bits.min(MAX_OA_BITS), ..PageTableConfig::SMMU_39 };
        let tables = PageTable::new(config, IoTables { smmu: self, dirty: dirty.clone(), pages: 0 }).map_err(|e| release(e.into()))?;
        let cd = match SmmuPages::alloc(0, self.table_limit, self.walk) {
            Ok(cd) => cd,
            Err(e) => {
                // SAFETY: no context descriptor points at the tables yet.
                unsafe { tables.destroy() };
                return Err(release(e));
            }
        };
        let words = ContextDescriptor {
            asid,
            ttb0: tables.root_pa(),
            ia_bits: IOVA_BITS,
            ips: self.features().ips,
            walk: self.walk,
            mair: MAIR_VALUE,
        }
        .encode();
        for (i, w) in words.iter().enumerate() {
            // SAFETY: the CD page is ours (just allocated) and holds CD_DWORDS doublewords.
            unsafe { cd.ptr().add(i).write_volatile(*w) };
        }
        self.publish(cd.ptr() as usize, CD_DWORDS * 8);
        let domain = Domain { smmu: self, asid, cd, tables: Mutex::new(ManuallyDrop::new(tables)), dirty, may_hold_blocks: AtomicBool::new(false) };
        domain.publish_tables();
        Ok(Arc::new(domain))
    }
}

impl Domain {
    pub fn smmu(&self) -> &'static Smmu {
        self.smmu
    }

    pub fn asid(&self) -> u16 {
        self.asid
    }

    /// Physical address of the context descriptor (what an attached STE points at).
    pub fn cd_pa(&self) -> PhysAddr {
        self.cd.pa()
    }

    /// The IOVA space: `[0, 2^IOVA_BITS)`.
    pub fn aperture(&self) -> core::ops::Range<u64> {
        0..1 << IOVA_BITS
    }

    /// Maps `[iova, iova + size)` to `[pa, pa + size)` (all 4 KiB aligned) with the largest leaves
    /// the alignment allows. Refused, with nothing changed, if any page of the range is mapped.
    /// When this returns, the SMMU can walk the new entries.
    pub fn map(&self, iova: u64, pa: PhysAddr, size: u64, prot: IoProt) -> Result<(), SmmuError> {
        let mut tables = self.tables.lock();
        // The page table uses a block only for a whole aligned 2 MiB (or 1 GiB) inside the range.
        if size >= BLOCK_2M {
            self.may_hold_blocks.store(true, Ordering::Relaxed);
        }
        let r = tables.map(iova, pa, size, prot.attr, prot.perms);
        self.publish_tables();
        Ok(r?)
    }

    /// Unmaps whatever is mapped in `[iova, iova + size)` (holes are skipped) and returns how many
    /// bytes were mapped. Table pages left empty stay for the next mapping of the range (as
    /// Linux's io-pgtable keeps them): a map and unmap of the same IOVAs, the common case of
    /// streaming DMA, then allocates, zeroes and frees no table page and needs only leaf
    /// invalidations; the domain's tables go back when it is dropped.
    ///
    /// `strict`: when this returns, no translation of the range is left in the SMMU's TLB, so the
    /// IOVAs and the memory may be reused. Not strict: the last-level invalidations are left to
    /// the caller, who must call [`Domain::flush_all`] before reusing the IOVAs or the memory; a
    /// range that cuts a block is unmapped strictly all the same (the block's replacement must not
    /// meet a stale copy of it).
    ///
    /// If an invalidation fails, the range is unmapped all the same and the error is returned; the
    /// whole ASID has then been invalidated instead, or, if even that failed, the SMMU is no longer
    /// driven and no table page is freed.
    pub fn unmap(&self, iova: u64, size: u64, strict: bool) -> Result<u64, SmmuError> {
        let mut tables = self.tables.lock();
        // Written under the tables' lock, like the blocks it announces.
        let strict = strict || (self.may_hold_blocks.load(Ordering::Relaxed) && cuts_block(&tables, iova, size));
        let mut tlb = IoTlb::new(self, !strict);
        let r = tables.unmap_keep_tables(iova, size, &mut tlb);
        self.publish_tables();
        let unmapped = r?.unmapped;
        tlb.error.map_or(Ok(unmapped), |e| Err(e.into()))
    }

    /// Invalidates every TLB entry of this domain (TLBI_NH_ASID + CMD_SYNC): after non-strict
    /// unmaps, the IOVAs and memory they released may be reused once this returns Ok.
    pub fn flush_all(&self) -> Result<(), SmmuError> {
        self.smmu.submit(&[Command::TlbiNhAsid { asid: self.asid }], true)
    }

    /// Walks the tables in software, as the SMMU would: the translation of `iova`, if mapped.
    pub fn translate(&self, iova: u64) -> Option<Translation> {
        self.tables.lock().translate(iova)
    }

    /// Tables and leaves of the domain's page table.
    pub fn mapping_stats(&self) -> MappingStats {
        self.tables.lock().stats()
    }

    /// Table pages the domain holds (the root included).
    pub fn table_pages(&self) -> usize {
        self.tables.lock().allocator().pages()
    }

    /// Makes every table store so far visible to the SMMU: cleans the recorded pages for a
    /// non-coherent SMMU, a DSB otherwise.
    #[inline(always)]
    fn publish_tables(&self) {
        match &self.dirty {
            None => crate::arch::cache::dsb(),
            Some(dirty) => {
                let pages = core::mem::take(&mut *dirty.lock());
                for pa in pages {
                    self.smmu.publish(pa.0 as usize, PAGE_SIZE as usize);
                }
                crate::arch::cache::dsb();
            }
        }
    }
}

impl Drop for Domain {
    /// No STE points at a dropped domain (the stream table holds a reference to every attached
    /// one), so only the TLB may still hold its translations: invalidate its ASID, then free the
    /// tables, the CD and the ASID. If the invalidation fails, all three are kept: the SMMU might
    /// still use them.
    fn drop(&mut self) {
        let flushed = self.smmu.submit(&[Command::TlbiNhAsid { asid: self.asid }], true);
        // SAFETY: `tables` is taken once, here, and not used after.
        let tables = unsafe { ManuallyDrop::take(self.tables.get_mut()) };
        match flushed {
            Ok(()) => {
                // SAFETY: no STE leads here (see above) and the ASID's TLB entries are gone.
                unsafe { tables.destroy() };
                self.smmu.asids.lock().free(self.asid);
            }
            Err(e) => {
                println!("smmu {}: domain of ASID {} not freed: {e}", self.smmu.name(), self.asid);
                core::mem::forget(tables);
                self.cd.keep();
            }
        }
    }
}

/// Whether unmapping `[va, va + size)` splits a block: the range starts or ends strictly inside
/// one.
fn cuts_block(tables: &PageTable<IoTables>, va: u64, size: u64) -> bool {
    let inside_block = |a: u64| {
        tables.leaf_level(a).is_some_and(|level| {
            let leaf = 1u64 << (PAGE_SHIFT + 9 * u32::from(3 - level.min(3)));
            level < 3 && !a.is_multiple_of(leaf)
        })
    };
    size != 0 && (inside_block(va) || va.checked_add(size).is_some_and(inside_block))
}

/// TLB maintenance of one unmap through the command queue. The invalidation of the latest request
/// waits here and goes to the queue with the next one, or with the CMD_SYNC that waits for it:
/// the usual unmap takes one queue submission.
struct IoTlb<'d> {
    domain: &'d Domain,
    /// Skip last-level invalidations (non-strict unmap).
    lazy: bool,
    /// Commands not yet on the queue.
    pending: Option<TlbiPlan>,
    /// Invalidations were issued since the last CMD_SYNC.
    unsynced: bool,
    /// The first command failure; the rest of the unmap goes on.
    error: Option<QueueError>,
}

impl<'d> IoTlb<'d> {
    fn new(domain: &'d Domain, lazy: bool) -> IoTlb<'d> {
        IoTlb { domain, lazy, pending: None, unsynced: false, error: None }
    }

    fn record(&mut self, r: Result<(), QueueError>) {
        if let Err(e) = r {
            self.error.get_or_insert(e);
        }
    }

    /// Puts the pending commands on the queue, followed by a CMD_SYNC that is waited for when
    /// `sync`.
    fn submit(&mut self, sync: bool) {
        // The cleared descriptors reach the SMMU before it is asked to forget them.
        self.domain.publish_tables();
        let smmu = self.domain.smmu;
        let r = match self.pending.take() {
            Some(TlbiPlan::ByAddress(cmds)) => smmu.submit_iter(cmds, sync),
            Some(TlbiPlan::WholeAsid) => smmu.submit_iter([Command::TlbiNhAsid { asid: self.domain.asid }].into_iter(), sync),
            None => smmu.submit_iter(core::iter::empty(), sync),
        };
        self.record(r);
    }
}

impl TlbOps for IoTlb<'_> {
    fn invalidate(&mut self, inv: TlbInvalidation) {
        if self.lazy && inv.leaf_only {
            return;
        }
        if self.pending.is_some() {
            self.submit(false);
        }
        let smmu = self.domain.smmu;
        let plan = cmd::plan_tlbi(self.domain.asid, inv.va, inv.size, inv.granule, inv.leaf_only, smmu.features().range_invalidation, MAX_TLBI_COMMANDS);
        self.pending = Some(plan);
        self.unsynced = true;
    }

    fn sync(&mut self) {
        if !self.unsynced {
            self.domain.publish_tables();
            return;
        }
        self.unsynced = false;
        self.submit(true);
        if self.error.is_some() {
            // Some invalidation failed (the error says which): drop the whole ASID instead. If
            // even that fails, stop trusting the SMMU, so that no table page it may still walk is
            // freed (`IoTables::free_table` keeps them then).
            let smmu = self.domain.smmu;
            if let Err(e) = smmu.submit_iter([Command::TlbiNhAsid { asid: self.domain.asid }].into_iter(), true) {
                smmu.mark_broken(&alloc::format!("TLB invalidation of ASID {} failed: {e}", self.domain.asid));
            }
        }
    }
}
