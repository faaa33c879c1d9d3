//! dma-iommu (Linux's drivers/iommu/dma-iommu.c): the DMA API for a device behind an IOMMU. The
//! device is given I/O virtual addresses (IOVAs) of its own domain (`iommu::smmuv3::Domain`, one
//! ASID and one page table per device), allocated by the domain's `iommu::iova::IovaSpace` below
//! the device's DMA mask; the IOMMU translates them to the physical pages. So a device with a
//! 28-bit mask reaches all of RAM, buffers need not be physically contiguous, and the device
//! reaches only what is mapped for it.
//!
//! - Streaming maps: the pages the buffer touches are mapped at a fresh IOVA range with the
//!   permissions of the direction (to-device: read-only for the device); the device address keeps
//!   the buffer's offset in its first page. A non-coherent device still gets the cache
//!   maintenance of [`super::maint`] on the physical buffer.
//! - Scatter-gather lists get one IOVA range for the whole list, the segments laid out one after
//!   another, each at its own offset in its first page; segments that end and start on page
//!   boundaries are contiguous in IOVA space and count as one DMA segment (what [`map_sg`]
//!   returns).
//! - Unmaps: strict (`iommu.strict=1`, the default on Arm, as in Linux) invalidates the IOTLB and
//!   waits for it before the IOVA is reused; lazy (`iommu.strict=0`) puts the freed range in the
//!   domain's flush queue, and a full queue is flushed with one ASID-wide invalidation before its
//!   IOVAs go back. Either way a freed IOVA is never handed out while the IOTLB may still
//!   translate it.
//! - Coherent buffers: pages from the page allocator, as one block when possible and
//!   `ALLOC_SINGLE_PAGES` is not given, else page by page (`FORCE_CONTIGUOUS`: one block from
//!   `dma_alloc_contiguous`, or nothing); mapped contiguously in IOVA space; for the CPU the
//!   linear map when the pages are contiguous and the device coherent, else an alias in the vmap
//!   window (uncached for a non-coherent device).
//! - Every domain reserves IOVA 0, the host bridge's windows (a device's access there would reach
//!   a peer, not the IOMMU) and the MSI doorbell, which it maps so that the device's MSI writes
//!   (which QEMU's SMMU translates too) reach the interrupt controller.
//!
//! `iommu.passthrough=1` gives devices an identity (bypass) stream instead: they use dma-direct.

use alloc::vec::Vec;

/// Freed IOVA ranges waiting for an IOTLB invalidation (lazy mode), Linux's flush queue.
pub struct FlushQueue {
    pending: Vec<(u64, u64)>,
    capacity: usize,
}

impl FlushQueue {
    /// A queue that asks for a flush once `capacity` ranges wait.
    pub fn new(capacity: usize) -> FlushQueue {
        FlushQueue { pending: Vec::with_capacity(capacity), capacity: capacity.max(1) }
    }

    /// Queues `(iova, pages)`; when the queue is full, returns every queued range: the caller
    /// invalidates the whole domain, then frees them.
    pub fn push(&mut self, iova: u64, pages: u64) -> Option<Vec<(u64, u64)>> {
        self.pending.push((iova, pages));
        (self.pending.len() >= self.capacity).then(|| self.take())
    }

    /// Every queued range, for a flush now.
    pub fn take(&mut self) -> Vec<(u64, u64)> {
        core::mem::replace(&mut self.pending, Vec::with_capacity(self.capacity))
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Where each segment of a scatter-gather list goes in one IOVA range: every segment takes the
/// pages it touches, in order, and keeps its offset in its first page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SgLayout {
    /// Pages of the whole range.
    pub pages: u64,
    /// Per segment: its offset in bytes from the start of the range (page offset included).
    pub offsets: Vec<u64>,
    /// Segments after merging those contiguous in IOVA space (each ends on a page boundary where
    /// the next starts on one).
    pub merged: usize,
}

/// The layout of segments `(phys, len)`; `None` for an empty list, an empty segment, or sizes
/// that overflow.
pub fn sg_layout(segments: impl Iterator<Item = (u64, u64)>, page: u64) -> Option<SgLayout> {
    let mut offsets = Vec::new();
    let mut pages = 0u64;
    let mut merged = 0;
    let mut prev_end_aligned = false;
    for (phys, len) in segments {
        if len == 0 {
            return None;
        }
        let off = phys % page;
        let span = off.checked_add(len)?.div_ceil(page);
        offsets.push(pages.checked_mul(page)?.checked_add(off)?);
        if !(prev_end_aligned && off == 0) {
            merged += 1;
        }
        prev_end_aligned = phys.checked_add(len)? % page == 0;
        pages = pages.checked_add(span)?;
    }
    (!offsets.is_empty()).then_some(SgLayout { pages, offsets, merged })
}

#[cfg(target_os = "none")]
pub use kernel::*;

#[cfg(target_os = "none")]
mod kernel {
    use super::*;
    use crate::dma::api::{CoherentMem, CoherentRaw, DmaAttrs, DmaError, SgEntry};
    use crate::dma::busmap::DmaAddr;
    use crate::dma::contiguous::{dma_alloc_contiguous, dma_free_contiguous};
    use crate::dma::direct::va;
    use crate::dma::maint::{self, Direction, PocOps};
    use crate::dma::remap::CpuView;
    use crate::dma::{Device, GfpFlags};
    use crate::iommu::iova::IovaSpace;
    use crate::iommu::smmuv3::{Domain, IoProt, Smmu};
    use crate::mm::addr::{align_down, PhysAddr, PAGE_SIZE};
    use crate::mm::pgtable::MemAttr;
    use crate::mm::vmap;
    use crate::println;
    use alloc::boxed::Box;
    use alloc::sync::Arc;
    use spin::{Mutex, Once};

    /// Ranges the lazy flush queue holds before it flushes (Linux: 256 per CPU).
    const FLUSH_QUEUE: usize = 256;

    /// The IOMMU policy from the bootargs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Policy {
        pub strict: bool,
        pub passthrough: bool,
    }

    static POLICY: Once<Policy> = Once::new();

    /// Reads `iommu.strict=0|1` (default 1) and `iommu.passthrough=0|1` (default 0); a value
    /// that is neither is reported and the default kept.
    pub fn init(bootargs: &crate::bootargs::Bootargs<'_>) {
        let flag = |key: &str, default: bool| match bootargs.get(key) {
            None => default,
            Some("1") => true,
            Some("0") => false,
            Some(v) => {
                println!("iommu: {key}={v}: expected 0 or 1; using {}", default as u8);
                default
            }
        };
        let p = Policy { strict: flag("iommu.strict", true), passthrough: flag("iommu.passthrough", false) };
        POLICY.call_once(|| p);
    }

    pub fn policy() -> Policy {
        POLICY.get().copied().unwrap_or(Policy { strict: true, passthrough: false })
    }

    /// A device's IOMMU domain with its IOVA space and flush queue.
    pub struct IommuDomain {
        domain: Arc<Domain>,
        iova: Box<IovaSpace>,
        strict: bool,
        flush_queue: Mutex<FlushQueue>,
        sid: u32,
    }

    impl core::fmt::Debug for IommuDomain {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            write!(f, "IommuDomain(ASID {}, SID {:#x}, {})", self.domain.asid(), self.sid, if self.strict { "strict" } else { "lazy" })
        }
    }

    impl IommuDomain {
        pub fn domain(&self) -> &Arc<Domain> {
            &self.domain
        }

        pub fn iova(&self) -> &IovaSpace {
            &self.iova
        }

        pub fn is_strict(&self) -> bool {
            self.strict
        }

        pub fn stream_id(&self) -> u32 {
            self.sid
        }

        /// IOVAs waiting in the flush queue.
        pub fn queued(&self) -> usize {
            self.flush_queue.lock().len()
        }

        /// Invalidates the domain's IOTLB entries and gives back every queued IOVA (lazy mode).
        pub fn flush(&self) -> Result<(), DmaError> {
            let batch = self.flush_queue.lock().take();
            self.flush_batch(batch)
        }

        fn flush_batch(&self, batch: Vec<(u64, u64)>) -> Result<(), DmaError> {
            if batch.is_empty() {
                return Ok(());
            }
            if let Err(e) = self.domain.flush_all() {
                // The IOVAs stay out of use: they may still be translated.
                println!("iommu: SID {:#x}: IOTLB flush failed: {e}; {} IOVA ranges withheld", self.sid, batch.len());
                return Err(DmaError::IoTables);
            }
            for (iova, pages) in batch {
                let _ = self.iova.free_fast(crate::smp::cpu_index(), iova, pages);
            }
            Ok(())
        }
    }

    /// The doorbell pages of the MSI controller the host bridge's `msi-map` names (a GICv2m
    /// frame or a GICv3 ITS), to reserve and map identity in every domain.
    fn msi_doorbell() -> Option<(u64, u64)> {
        let bus = crate::drivers::pci::ecam::bus().ok()?;
        let map = bus.bridge.msi_map.as_ref()?;
        let phandle = map.entries.first()?.target;
        let dt = &crate::kernel::boot_info().dt;
        let node = dt.node_by_phandle(phandle).ok()?;
        let reg = dt.reg0(&node).ok()?;
        // GICv3 ITS: the translater register sits in the second 64 KiB page.
        let size = if node.is_compatible("arm,gic-v3-its") { reg.size().min(0x20000) } else { reg.size() };
        Some((reg.base().0, size.max(PAGE_SIZE)))
    }

    /// A new domain for the device with StreamID `sid` behind `smmu`, attached: the device's DMA
    /// is translated from now on. Strict or lazy as the bootargs say.
    pub fn attach(smmu: &'static Smmu, sid: u32) -> Result<&'static IommuDomain, DmaError> {
        attach_with_policy(smmu, sid, policy().strict)
    }

    /// [`attach`] with the invalidation policy given (benchmarks measure both in one boot).
    pub fn attach_with_policy(smmu: &'static Smmu, sid: u32, strict: bool) -> Result<&'static IommuDomain, DmaError> {
        let report = |e: &dyn core::fmt::Display| {
            println!("iommu: SID {sid:#x}: {e}");
            DmaError::IoTables
        };
        let domain = smmu.new_domain().map_err(|e| report(&e))?;
        let ap = domain.aperture();
        let iova = Box::new(IovaSpace::new(ap.start, ap.end - 1).map_err(|e| report(&e))?);
        if let Ok(bus) = crate::drivers::pci::ecam::bus() {
            for w in &bus.bridge.windows {
                if w.pci_addr < ap.end {
                    let _ = iova.reserve(w.pci_addr, w.size.min(ap.end - w.pci_addr));
                }
            }
        }
        if let Some((base, size)) = msi_doorbell().filter(|&(b, s)| b.saturating_add(s) <= ap.end) {
            let base = align_down(base, PAGE_SIZE);
            iova.reserve(base, size).map_err(|e| report(&e))?;
            domain.map(base, PhysAddr(base), size.next_multiple_of(PAGE_SIZE), IoProt::MMIO).map_err(|e| report(&e))?;
        }
        smmu.attach(sid, &domain).map_err(|e| report(&e))?;
        let d = IommuDomain { domain, iova, strict, flush_queue: Mutex::new(FlushQueue::new(FLUSH_QUEUE)), sid };
        Ok(Box::leak(Box::new(d)))
    }

    /// The highest IOVA a device may be given: its mask, within the domain's aperture.
    #[inline(always)]
    fn limit(d: &IommuDomain, mask: u64) -> u64 {
        mask.min(d.domain.aperture().end - 1)
    }

    /// `pages` IOVA pages below the device's mask; a full space flushes the queue once and
    /// retries.
    #[inline(always)]
    fn alloc_iova(d: &IommuDomain, pages: u64, mask: u64) -> Result<u64, DmaError> {
        let cpu = crate::smp::cpu_index();
        match d.iova.alloc_fast(cpu, pages, limit(d, mask)) {
            Ok(i) => Ok(i),
            Err(_) if !d.flush_queue.lock().is_empty() => {
                d.flush()?;
                d.iova.alloc_fast(cpu, pages, limit(d, mask)).map_err(DmaError::Iova)
            }
            Err(e) => Err(DmaError::Iova(e)),
        }
    }

    /// Gives the IOVA range back once the IOTLB cannot translate it: at once after a strict
    /// unmap, through the flush queue after a lazy one.
    #[inline(always)]
    fn release_iova(d: &IommuDomain, iova: u64, pages: u64) -> Result<(), DmaError> {
        if d.strict {
            return d.iova.free_fast(crate::smp::cpu_index(), iova, pages).map_err(DmaError::Iova);
        }
        let full = d.flush_queue.lock().push(iova, pages);
        match full {
            Some(batch) => d.flush_batch(batch),
            None => Ok(()),
        }
    }


    #[inline(always)]
    fn for_device(dev: &Device, phys: PhysAddr, size: u64, dir: Direction, attrs: DmaAttrs) -> Result<(), DmaError> {
        if maint::needs_maintenance(dev.is_coherent()) && !attrs.contains(DmaAttrs::SKIP_CPU_SYNC) {
            maint::for_device(&mut PocOps::new(), va(phys, size)?, size as usize, dir).map_err(DmaError::Maint)?;
        }
        Ok(())
    }

    #[inline(always)]
    fn for_cpu(dev: &Device, phys: PhysAddr, size: u64, dir: Direction, attrs: DmaAttrs) -> Result<(), DmaError> {
        if maint::needs_maintenance(dev.is_coherent()) && !attrs.contains(DmaAttrs::SKIP_CPU_SYNC) {
            maint::for_cpu(&mut PocOps::new(), va(phys, size)?, size as usize, dir).map_err(DmaError::Maint)?;
        }
        Ok(())
    }

    /// Pages spanned by `size` bytes from `addr`.
    #[inline(always)]
    fn span(addr: u64, size: u64) -> Result<u64, DmaError> {
        (addr % PAGE_SIZE).checked_add(size).map(|s| s.div_ceil(PAGE_SIZE)).ok_or(DmaError::BadRange { offset: addr, size, len: 0 })
    }

    /// See the module documentation.
    #[inline(always)]
    pub fn map(dev: &Device, d: &IommuDomain, phys: PhysAddr, size: u64, dir: Direction, attrs: DmaAttrs) -> Result<DmaAddr, DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        let pages = span(phys.0, size)?;
        let iova = alloc_iova(d, pages, dev.mask())?;
        let base = PhysAddr(align_down(phys.0, PAGE_SIZE));
        if let Err(e) = d.domain.map(iova, base, pages * PAGE_SIZE, IoProt::dma(dir, dev.is_coherent())) {
            println!("iommu: {dev}: mapping {phys} + {size:#x}: {e}");
            let _ = d.iova.free_fast(crate::smp::cpu_index(), iova, pages);
            return Err(DmaError::IoTables);
        }
        if let Err(e) = for_device(dev, phys, size, dir, attrs) {
            let _ = d.domain.unmap(iova, pages * PAGE_SIZE, true);
            let _ = d.iova.free_fast(crate::smp::cpu_index(), iova, pages);
            return Err(e);
        }
        Ok(DmaAddr(iova + phys.0 % PAGE_SIZE))
    }

    /// The physical address behind `dma` in the domain.
    #[inline(always)]
    fn phys_of(d: &IommuDomain, dma: DmaAddr, size: u64) -> Result<PhysAddr, DmaError> {
        d.domain.translate(dma.0).map(|t| t.pa).ok_or(DmaError::NotMapped { dma, size })
    }

    /// Cache maintenance over the physical pages behind `dma .. dma + size`, page by page (the
    /// range may cover several segments of a scatter-gather list).
    fn maintain(dev: &Device, d: &IommuDomain, dma: DmaAddr, size: u64, dir: Direction, to_cpu: bool) -> Result<(), DmaError> {
        if !maint::needs_maintenance(dev.is_coherent()) {
            return Ok(());
        }
        let mut at = dma.0;
        let end = dma.0.checked_add(size).ok_or(DmaError::BadRange { offset: dma.0, size, len: 0 })?;
        while at < end {
            let chunk = (align_down(at, PAGE_SIZE) + PAGE_SIZE).min(end) - at;
            let phys = phys_of(d, DmaAddr(at), chunk)?;
            if to_cpu {
                for_cpu(dev, phys, chunk, dir, DmaAttrs::NONE)?;
            } else {
                for_device(dev, phys, chunk, dir, DmaAttrs::NONE)?;
            }
            at += chunk;
        }
        Ok(())
    }

    #[inline(always)]
    pub fn unmap(dev: &Device, d: &IommuDomain, dma: DmaAddr, size: u64, dir: Direction, attrs: DmaAttrs) -> Result<(), DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        let pages = span(dma.0, size)?;
        let iova = align_down(dma.0, PAGE_SIZE);
        // Only cache maintenance needs the physical buffer: a coherent device is spared the walk.
        if dir != Direction::ToDevice && !attrs.contains(DmaAttrs::SKIP_CPU_SYNC) && maint::needs_maintenance(dev.is_coherent()) {
            let phys = phys_of(d, dma, size)?;
            for_cpu(dev, phys, size, dir, attrs)?;
        }
        // A `match`, not `map_err` with a closure: the size-optimised build calls the latter.
        let unmapped = match d.domain.unmap(iova, pages * PAGE_SIZE, d.strict) {
            Ok(u) => u,
            Err(e) => return Err(unmap_failed(dev, dma, size, e)),
        };
        if unmapped == 0 {
            // Nothing was mapped there: the IOVA is not this caller's to give back.
            return Err(DmaError::NotMapped { dma, size });
        }
        release_iova(d, iova, pages)
    }

    /// Reports an unmap the IOMMU refused.
    #[cold]
    #[inline(never)]
    fn unmap_failed(dev: &Device, dma: DmaAddr, size: u64, e: crate::iommu::smmuv3::SmmuError) -> DmaError {
        println!("iommu: {dev}: unmapping {dma} + {size:#x}: {e}");
        DmaError::IoTables
    }

    pub fn sync_for_cpu(dev: &Device, d: &IommuDomain, dma: DmaAddr, size: u64, dir: Direction) -> Result<(), DmaError> {
        if dir == Direction::ToDevice {
            return Ok(());
        }
        maintain(dev, d, dma, size, dir, true)
    }

    pub fn sync_for_device(dev: &Device, d: &IommuDomain, dma: DmaAddr, size: u64, dir: Direction) -> Result<(), DmaError> {
        maintain(dev, d, dma, size, dir, false)
    }

    /// Maps the whole list at one IOVA range (see the module documentation); fills every entry's
    /// `dma` and returns the number of DMA segments after merging.
    pub fn map_sg(dev: &Device, d: &IommuDomain, sg: &mut [SgEntry], dir: Direction, attrs: DmaAttrs) -> Result<usize, DmaError> {
        let layout = sg_layout(sg.iter().map(|e| (e.phys.0, e.len)), PAGE_SIZE).ok_or(DmaError::ZeroSize)?;
        let iova = alloc_iova(d, layout.pages, dev.mask())?;
        let prot = IoProt::dma(dir, dev.is_coherent());
        let undo = || {
            let _ = d.domain.unmap(iova, layout.pages * PAGE_SIZE, true);
            let _ = d.iova.free_fast(crate::smp::cpu_index(), iova, layout.pages);
        };
        for (e, &off) in sg.iter().zip(&layout.offsets) {
            let at = iova + align_down(off, PAGE_SIZE);
            let r = d.domain.map(at, PhysAddr(align_down(e.phys.0, PAGE_SIZE)), span(e.phys.0, e.len)? * PAGE_SIZE, prot);
            if let Err(err) = r {
                println!("iommu: {dev}: mapping a scatter-gather list: {err}");
                undo();
                return Err(DmaError::IoTables);
            }
            if let Err(err) = for_device(dev, e.phys, e.len, dir, attrs) {
                undo();
                return Err(err);
            }
        }
        for (e, &off) in sg.iter_mut().zip(&layout.offsets) {
            e.dma = Some(DmaAddr(iova + off));
        }
        Ok(layout.merged)
    }

    /// Unmaps a list mapped by [`map_sg`] (every entry mapped), the whole range at once.
    pub fn unmap_sg(dev: &Device, d: &IommuDomain, sg: &mut [SgEntry], dir: Direction, attrs: DmaAttrs) -> Result<(), DmaError> {
        let layout = sg_layout(sg.iter().map(|e| (e.phys.0, e.len)), PAGE_SIZE).ok_or(DmaError::ZeroSize)?;
        let first = sg.first().and_then(|e| e.dma).ok_or(DmaError::NotMapped { dma: DmaAddr(0), size: 0 })?;
        let iova = align_down(first.0, PAGE_SIZE);
        if dir != Direction::ToDevice {
            for e in sg.iter() {
                for_cpu(dev, e.phys, e.len, dir, attrs)?;
            }
        }
        d.domain.unmap(iova, layout.pages * PAGE_SIZE, d.strict).map_err(|e| {
            println!("iommu: {dev}: unmapping a scatter-gather list: {e}");
            DmaError::IoTables
        })?;
        for e in sg.iter_mut() {
            e.dma = None;
        }
        release_iova(d, iova, layout.pages)
    }

    /// The pages of a coherent buffer: one block when it can be had (always with
    /// `FORCE_CONTIGUOUS`), else single pages unless that is forbidden.
    fn coherent_pages(dev: &Device, pages: u64, gfp: GfpFlags, attrs: DmaAttrs) -> Result<CoherentMem, DmaError> {
        if attrs.contains(DmaAttrs::FORCE_CONTIGUOUS) || (!attrs.contains(DmaAttrs::ALLOC_SINGLE_PAGES) && pages > 1) {
            // Any RAM will do: the device reaches it through its IOVAs.
            let anywhere = Device::new(dev.name(), crate::dma::DMA_LIMIT_ALL);
            match dma_alloc_contiguous(&anywhere, pages * PAGE_SIZE, gfp | GfpFlags::NOWARN) {
                Ok(p) => return Ok(CoherentMem::Pages(p)),
                Err(e) if attrs.contains(DmaAttrs::FORCE_CONTIGUOUS) => return Err(DmaError::NoMemory(e)),
                Err(_) => {}
            }
        }
        let mut list = Vec::with_capacity(pages as usize);
        for _ in 0..pages {
            match crate::mm::phys::alloc_pages(0) {
                Ok(p) => list.push(p),
                Err(_) => {
                    for p in list {
                        let _ = crate::mm::phys::free_pages(p, 0);
                    }
                    return Err(DmaError::NoMemory(crate::dma::contiguous::ContiguousError::NoMemory { count: pages, limit: 0, blocking: gfp.can_block() }));
                }
            }
        }
        Ok(CoherentMem::Scattered(list))
    }

    fn page_list(mem: &CoherentMem) -> Vec<PhysAddr> {
        match mem {
            CoherentMem::Pages(p) => (0..p.count).map(|i| PhysAddr(p.phys.0 + i * PAGE_SIZE)).collect(),
            CoherentMem::Scattered(l) => l.clone(),
            // dma-direct's; never made here.
            CoherentMem::Pool { .. } | CoherentMem::AtomicPool(_) => Vec::new(),
        }
    }

    fn free_pages(dev: &Device, mem: CoherentMem) -> Result<(), DmaError> {
        match mem {
            CoherentMem::Pages(p) => dma_free_contiguous(dev, p).map_err(|_| DmaError::Free),
            CoherentMem::Scattered(l) => l.into_iter().try_for_each(|p| crate::mm::phys::free_pages(p, 0).map_err(|_| DmaError::Free)),
            // dma-direct's; never made here.
            CoherentMem::Pool { .. } | CoherentMem::AtomicPool(_) => Err(DmaError::Free),
        }
    }

    /// See the module documentation. Out of line: inlined into the API's entry point it would
    /// weigh on dma-direct's fast paths there.
    #[inline(never)]
    pub fn alloc(dev: &Device, d: &IommuDomain, size: u64, gfp: GfpFlags, attrs: DmaAttrs) -> Result<CoherentRaw, DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        let pages = size.div_ceil(PAGE_SIZE);
        let mem = coherent_pages(dev, pages, gfp, attrs)?;
        let list = page_list(&mem);
        for &p in &list {
            let cpu = va(p, PAGE_SIZE)?;
            // SAFETY: a page just allocated for this buffer alone, mapped writable at its physical
            // address by the linear map.
            unsafe { crate::arch::cache::zero_pages(cpu, PAGE_SIZE as usize) };
            if !dev.is_coherent() {
                crate::arch::cache::clean_invalidate(cpu, PAGE_SIZE as usize);
            }
        }
        let undo_pages = |mem| {
            let _ = free_pages(dev, mem);
        };
        let iova = match alloc_iova(d, pages, dev.coherent_mask()) {
            Ok(i) => i,
            Err(e) => {
                undo_pages(mem);
                return Err(e);
            }
        };
        let prot = IoProt::dma(Direction::Bidirectional, dev.is_coherent());
        let contiguous = matches!(mem, CoherentMem::Pages(_));
        let mapped = if contiguous {
            d.domain.map(iova, list[0], pages * PAGE_SIZE, prot)
        } else {
            list.iter().enumerate().try_for_each(|(i, &p)| d.domain.map(iova + i as u64 * PAGE_SIZE, p, PAGE_SIZE, prot))
        };
        if let Err(e) = mapped {
            println!("iommu: {dev}: mapping a coherent buffer: {e}");
            let _ = d.domain.unmap(iova, pages * PAGE_SIZE, true);
            let _ = d.iova.free_fast(crate::smp::cpu_index(), iova, pages);
            undo_pages(mem);
            return Err(DmaError::IoTables);
        }
        let cpu = if attrs.contains(DmaAttrs::NO_KERNEL_MAPPING) {
            Ok(CpuView::Hidden)
        } else if contiguous && dev.is_coherent() {
            Ok(CpuView::Linear)
        } else {
            let attr = match (dev.is_coherent(), attrs.contains(DmaAttrs::WRITE_COMBINE)) {
                (true, _) => MemAttr::Normal,
                (false, true) => MemAttr::WriteCombine,
                (false, false) => MemAttr::NormalNonCacheable,
            };
            vmap::vmap_pages(&list, attr).map(CpuView::Window).map_err(DmaError::Remap)
        };
        match cpu {
            Ok(cpu) => Ok(CoherentRaw { mem, dma: DmaAddr(iova), size, attrs, cpu }),
            Err(e) => {
                let _ = d.domain.unmap(iova, pages * PAGE_SIZE, true);
                let _ = d.iova.free_fast(crate::smp::cpu_index(), iova, pages);
                undo_pages(mem);
                Err(e)
            }
        }
    }

    /// Frees a buffer of [`alloc`]: the CPU alias, then the IOVA mapping, then the pages.
    #[inline(never)]
    pub fn free(dev: &Device, d: &IommuDomain, raw: CoherentRaw) -> Result<(), DmaError> {
        let pages = raw.size.div_ceil(PAGE_SIZE);
        if let CpuView::Window(area) = raw.cpu {
            vmap::vunmap(area).map_err(DmaError::Remap)?;
        }
        d.domain.unmap(raw.dma.0, pages * PAGE_SIZE, d.strict).map_err(|e| {
            println!("iommu: {dev}: unmapping a coherent buffer: {e}");
            DmaError::IoTables
        })?;
        release_iova(d, raw.dma.0, pages)?;
        free_pages(dev, raw.mem)
    }

    /// A mask is usable when the domain has IOVA space below it (Linux's iommu_dma_supported
    /// accepts any): the first IOVA page at least.
    pub fn mask_supported(d: &IommuDomain, mask: u64) -> Result<(), DmaError> {
        if mask >= d.iova.first_iova() + PAGE_SIZE - 1 {
            Ok(())
        } else {
            Err(DmaError::MaskUnsupported { mask, lowest: PhysAddr(d.iova.first_iova()) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    #[test]
    fn flush_queue_batches() {
        let mut q = FlushQueue::new(3);
        assert_eq!(q.push(0x1000, 1), None);
        assert_eq!(q.push(0x5000, 2), None);
        assert_eq!(q.len(), 2);
        assert_eq!(q.push(0x9000, 1), Some(vec![(0x1000, 1), (0x5000, 2), (0x9000, 1)]));
        assert!(q.is_empty());
        assert_eq!(q.push(0x2000, 4), None);
        assert_eq!(q.take(), vec![(0x2000, 4)]);
        assert!(q.take().is_empty());
    }

    #[test]
    fn sg_layout_of_page_aligned_segments_is_one_range() {
        let segs: Vec<(u64, u64)> = (0..64).map(|i| (0x4000_0000 + i * 3 * P, P)).collect();
        let l = sg_layout(segs.into_iter(), P).unwrap();
        assert_eq!(l.pages, 64);
        assert_eq!(l.merged, 1);
        assert_eq!(l.offsets, (0..64).map(|i| i * P).collect::<Vec<_>>());
    }

    #[test]
    fn sg_layout_keeps_offsets_and_counts_breaks() {
        // 0x100 into a page for 0x200 bytes; a whole page; 0x80 bytes from a page start; then a
        // segment that starts mid-page.
        let segs = [(0x1000_0100, 0x200), (0x2000_0000, P), (0x3000_0000, 0x80), (0x4000_0010, 0x1000)];
        let l = sg_layout(segs.into_iter(), P).unwrap();
        assert_eq!(l.offsets, vec![0x100, P, 2 * P, 3 * P + 0x10]);
        assert_eq!(l.pages, 5, "1 + 1 + 1 + 2 pages");
        // The first ends mid-page (break), the second ends on a page boundary and the third
        // starts on one (merge), the third ends mid-page (break).
        assert_eq!(l.merged, 3);
        assert_eq!(sg_layout([(0u64, 0u64)].into_iter(), P), None);
        assert_eq!(sg_layout(core::iter::empty(), P), None);
        assert_eq!(sg_layout([(u64::MAX - 1, 4)].into_iter(), P), None);
    }
}
