//! dma-remap (Linux's kernel/dma/remap.c and arm32's in-place remapping): coherent buffers for
//! devices that do not snoop the CPU caches. The CPU must reach such a buffer only through an
//! uncached mapping, or its caches would hide the device's writes and hold back its own. Two
//! strategies, chosen by the bootarg `dma.remap=window|inplace` (default `window`):
//!
//! - **window** (arm64): pages from `dma_alloc_contiguous()` are cleaned and invalidated through
//!   the cacheable linear map, then mapped a second time, normal non-cacheable (write-combine for
//!   [`DmaAttrs::WRITE_COMBINE`](super::api::DmaAttrs::WRITE_COMBINE)), in the vmap window (`mm::vmap`); that alias is the buffer's CPU
//!   pointer. The linear alias stays mapped but is never used for the buffer (Arm allows the
//!   mismatched alias as long as the cacheable one holds no dirty lines, which the clean makes
//!   sure of). Freed in the safe order: unmap, TLB invalidation on every CPU, then the pages.
//! - **inplace** (arm32): the linear map's own entries for the pages are made non-cacheable,
//!   break-before-make, so no cacheable alias is left at all. This is only possible where the
//!   linear map is made of pages: the CMA areas, which [`init`] splits to pages at boot (a block
//!   shared with live memory cannot be replaced safely once other code may use it). So the pages
//!   must come from `dma_alloc_from_contiguous()`, which never falls back to the page allocator:
//!   a page from anywhere else sits inside a block mapping and cannot be remapped. The free
//!   restores the cacheable attributes (break-before-make again) before the pages go back.
//!
//! Callers that must not block get buffers from the atomic pool ([`super::pool`]), mapped
//! uncached once at boot. [`DmaAttrs::NO_KERNEL_MAPPING`](super::api::DmaAttrs::NO_KERNEL_MAPPING) maps nothing: the buffer is only the
//! device's, and the CPU gets no pointer.

use core::fmt;

/// How coherent buffers of non-coherent devices get their uncached CPU mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// A second, uncached mapping in the vmap window.
    Window,
    /// The linear map's entries changed in place (CMA pages only).
    InPlace,
}

impl Strategy {
    /// The strategy the bootarg `dma.remap` names (absent: [`Strategy::Window`]).
    pub fn from_bootarg(value: Option<&str>) -> Result<Strategy, BadStrategy> {
        match value {
            None | Some("window") => Ok(Strategy::Window),
            Some("inplace") => Ok(Strategy::InPlace),
            Some(_) => Err(BadStrategy),
        }
    }
}

/// A `dma.remap` value that is neither `window` nor `inplace`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadStrategy;

impl fmt::Display for BadStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dma.remap must be `window` or `inplace`")
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Window => "window",
            Strategy::InPlace => "inplace",
        })
    }
}

/// How the CPU reaches a coherent buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum CpuView {
    /// Through the cacheable linear map (coherent devices).
    Linear,
    /// Through an uncached alias in the vmap window.
    Window(crate::mm::vmap::VmapArea),
    /// Through the linear map, whose entries were made uncached in place.
    InPlace,
    /// Through the atomic pool's uncached mapping, at this address.
    Pool(usize),
    /// Not at all (`DmaAttrs::NO_KERNEL_MAPPING`).
    Hidden,
}


#[cfg(target_os = "none")]
pub use kernel::*;

#[cfg(target_os = "none")]
mod kernel {
    use super::*;
    use crate::dma::api::DmaAttrs;
    use crate::bootargs::{parse_size, Bootargs};
    use crate::dma::api::{CoherentMem, CoherentRaw, DmaError};
    use crate::dma::contiguous::{dma_alloc_from_contiguous, dma_free_contiguous, dma_release_from_contiguous, ContiguousError, ContiguousPages, PageSource};
    use crate::dma::busmap::DmaAddr;
    use crate::dma::{direct, pool, within_mask, Device, GfpFlags};
    use crate::mm::addr::{PhysAddr, PAGE_SIZE};
    use crate::mm::kmap;
    use crate::mm::pgtable::{MemAttr, Perms};
    use crate::mm::vmap;
    use crate::println;
    use alloc::vec::Vec;
    use spin::{Mutex, Once};

    static STRATEGY: Once<Strategy> = Once::new();
    /// Physical ranges the linear map holds as pages, where in-place remapping is allowed.
    static PAGE_MAPPED: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

    /// The strategy in force (window before [`init`]).
    #[inline(always)]
    pub fn strategy() -> Strategy {
        STRATEGY.get().copied().unwrap_or(Strategy::Window)
    }

    /// The attributes of a coherent buffer's uncached CPU mapping.
    fn cpu_attr(attrs: DmaAttrs) -> MemAttr {
        if attrs.contains(DmaAttrs::WRITE_COMBINE) {
            MemAttr::WriteCombine
        } else {
            MemAttr::NormalNonCacheable
        }
    }

    /// Boot-time set-up, after the page allocator: the vmap window, the atomic pool
    /// (`coherent_pool=`, below `pool_limit`, the platform's 32-bit DMA limit), and for
    /// `dma.remap=inplace` the CMA areas split to pages in the linear map. What cannot be set up is
    /// reported; non-coherent devices then get errors, not cacheable buffers.
    pub fn init(dt: &crate::dt::DeviceTree<'_>, bootargs: &Bootargs<'_>, memmap: &crate::mm::memmap::MemoryMap, pool_limit: u64) {
        let strategy = Strategy::from_bootarg(bootargs.get("dma.remap")).unwrap_or_else(|e| {
            println!("dma-remap: {e}; using `window`");
            Strategy::Window
        });
        STRATEGY.call_once(|| strategy);
        match vmap::init(dt, memmap) {
            Ok((base, size)) => println!("vmap: window {base:#x}..{:#x}", base + size),
            Err(e) => println!("vmap: {e}"),
        }
        let bytes = match bootargs.get("coherent_pool").map(parse_size) {
            None => pool::DEFAULT_POOL_BYTES,
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                println!("coherent_pool: {e}; using the default {} KiB", pool::DEFAULT_POOL_BYTES >> 10);
                pool::DEFAULT_POOL_BYTES
            }
        };
        match pool::init(bytes, pool_limit) {
            Ok((phys, size)) => println!("dma-remap: atomic pool {} KiB at {phys}", size >> 10),
            Err(e) => println!("dma-remap: no atomic pool of {} (coherent_pool=): {e}", crate::mm::memmap::HumanSize(bytes)),
        }
        if strategy == Strategy::InPlace {
            if let Some(reg) = crate::mm::cma::setup::registry() {
                for area in reg.areas() {
                    if let Err(e) = add_page_mapped(area.base(), area.size()) {
                        println!("dma-remap: CMA area `{}`: {e}", area.name());
                    }
                }
            }
        }
        println!("dma-remap: {strategy}");
    }

    /// Maps `[base, base + size)` of the linear map with pages so that in-place remapping may
    /// change its pages (a CMA area created after boot). The range must hold no memory in use by
    /// anyone but the caller (see `kmap::split_to_pages`).
    pub fn add_page_mapped(base: PhysAddr, size: u64) -> Result<(), DmaError> {
        kmap::split_to_pages(base.0, size).map_err(|e| DmaError::Remap(e.into()))?;
        PAGE_MAPPED.lock().push((base.0, base.0.saturating_add(size)));
        Ok(())
    }

    fn page_mapped(phys: PhysAddr, bytes: u64) -> bool {
        let end = phys.0.saturating_add(bytes);
        PAGE_MAPPED.lock().iter().any(|&(b, e)| b <= phys.0 && end <= e)
    }

    /// A coherent buffer for the non-coherent device `dev` (not one with a restricted pool),
    /// zeroed, mapped for the CPU as the strategy says.
    #[inline(always)]
    pub fn alloc(dev: &Device, size: u64, gfp: GfpFlags, attrs: DmaAttrs) -> Result<CoherentRaw, DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        if !gfp.can_block() {
            let (buf, dma) = pool::alloc(dev, size)?;
            return Ok(pool_raw(buf, dma, size, attrs));
        }
        match strategy() {
            Strategy::Window => alloc_window(dev, size, gfp, attrs),
            Strategy::InPlace => alloc_in_place(dev, size, gfp, attrs),
        }
    }

    /// Out of line, like [`alloc_in_place`]: inlined, the remapping paths' state would crowd the
    /// atomic pool's path in [`alloc`] (stack frame, spills, copies of the result).
    /// The description of a buffer of the atomic pool: [`alloc`]'s answer when the caller cannot
    /// block.
    #[inline(always)]
    pub fn pool_raw(buf: pool::PoolBuffer, dma: DmaAddr, size: u64, attrs: DmaAttrs) -> CoherentRaw {
        CoherentRaw { mem: CoherentMem::AtomicPool(buf), dma, size, attrs, cpu: CpuView::Pool(buf.cpu) }
    }

    #[inline(never)]
    fn alloc_window(dev: &Device, size: u64, gfp: GfpFlags, attrs: DmaAttrs) -> Result<CoherentRaw, DmaError> {
        // Zeroed, cleaned and invalidated through the linear map.
        let (pages, dma) = direct::alloc_pages(dev, size, gfp)?;
        if attrs.contains(DmaAttrs::NO_KERNEL_MAPPING) {
            return Ok(CoherentRaw { mem: CoherentMem::Pages(pages), dma, size, attrs, cpu: CpuView::Hidden });
        }
        match vmap::vmap_contiguous(pages.phys, pages.count, cpu_attr(attrs)) {
            Ok(area) => Ok(CoherentRaw { mem: CoherentMem::Pages(pages), dma, size, attrs, cpu: CpuView::Window(area) }),
            Err(e) => {
                dma_free_contiguous(dev, pages).map_err(|_| DmaError::Free)?;
                Err(DmaError::Remap(e))
            }
        }
    }

    /// CMA pages only (see the module documentation): `dma_alloc_from_contiguous()`, never the
    /// fallback that `dma_alloc_contiguous()` would take.
    #[inline(never)]
    fn alloc_in_place(dev: &Device, size: u64, gfp: GfpFlags, attrs: DmaAttrs) -> Result<CoherentRaw, DmaError> {
        let count = size.div_ceil(PAGE_SIZE);
        let bytes = count * PAGE_SIZE;
        let align = count.next_power_of_two().trailing_zeros();
        let no_memory = DmaError::NoMemory(ContiguousError::NoMemory { count, limit: dev.dma_limit(), blocking: true });
        let phys = dma_alloc_from_contiguous(dev, count, align, gfp.no_warn()).ok_or(no_memory)?;
        let give_back = |e: DmaError| {
            dma_release_from_contiguous(dev, phys, count);
            Err(e)
        };
        let Some(dma) = within_mask(dev.bus_map(), dev.coherent_mask(), phys, bytes) else {
            return give_back(DmaError::Unreachable { phys, size: bytes, mask: dev.coherent_mask() });
        };
        if !page_mapped(phys, bytes) {
            return give_back(DmaError::Remap(vmap::VmapError::NotPageMapped { phys: phys.0, bytes }));
        }
        let cpu = phys.0 as usize;
        // SAFETY: whole pages of CMA just allocated for this buffer alone, mapped writable and
        // cacheable at their physical address by the linear map.
        unsafe { crate::arch::cache::zero_pages(cpu, bytes as usize) };
        crate::arch::cache::clean_invalidate(cpu, bytes as usize);
        // The area `dma_alloc_from_contiguous` took them from, for the free.
        let Some(area) = dev.cma_area().or_else(crate::mm::cma::setup::default_area) else {
            return give_back(DmaError::Free);
        };
        let pages = ContiguousPages { phys, count, source: PageSource::Cma(area) };
        if attrs.contains(DmaAttrs::NO_KERNEL_MAPPING) {
            return Ok(CoherentRaw { mem: CoherentMem::Pages(pages), dma, size, attrs, cpu: CpuView::Hidden });
        }
        if let Err(e) = kmap::set_attributes(phys.0, bytes, cpu_attr(attrs), Perms::RW) {
            return give_back(DmaError::Remap(e.into()));
        }
        Ok(CoherentRaw { mem: CoherentMem::Pages(pages), dma, size, attrs, cpu: CpuView::InPlace })
    }

    /// The atomic pool's buffer that `raw` describes, if it is one. Such a buffer holds nothing
    /// else (no mapping to undo, nothing to drop), so it can be freed from a reference, without
    /// the copy of the description a by-value free costs.
    #[inline(always)]
    pub fn atomic_pool_buffer(raw: &CoherentRaw) -> Option<pool::PoolBuffer> {
        match (&raw.cpu, &raw.mem) {
            (CpuView::Pool(_), CoherentMem::AtomicPool(buf)) => Some(*buf),
            _ => None,
        }
    }

    /// Frees a buffer of [`alloc`]: the CPU mapping goes first (with its TLB entries on every
    /// CPU), then the memory.
    #[inline(always)]
    pub fn free(dev: &Device, raw: CoherentRaw) -> Result<(), DmaError> {
        // The atomic pool's buffers first, read in place: the general match below moves the whole
        // buffer description (a copy that costs as much as the pool's own free).
        if let Some(buf) = atomic_pool_buffer(&raw) {
            return pool::free(buf);
        }
        free_mapped(dev, raw)
    }

    /// [`free`] of everything but the atomic pool's buffers.
    #[inline(never)]
    fn free_mapped(dev: &Device, raw: CoherentRaw) -> Result<(), DmaError> {
        match (raw.cpu, raw.mem) {
            (CpuView::Window(area), CoherentMem::Pages(pages)) => {
                vmap::vunmap(area).map_err(DmaError::Remap)?;
                dma_free_contiguous(dev, pages).map_err(|_| DmaError::Free)
            }
            (CpuView::Window(area), CoherentMem::Pool { pool, phys, bytes }) => {
                vmap::vunmap(area).map_err(DmaError::Remap)?;
                pool.free(phys, bytes)
            }
            (CpuView::InPlace, CoherentMem::Pages(pages)) => {
                let bytes = pages.count * PAGE_SIZE;
                kmap::set_attributes(pages.phys.0, bytes, MemAttr::Normal, Perms::RW).map_err(|e| DmaError::Remap(e.into()))?;
                dma_free_contiguous(dev, pages).map_err(|_| DmaError::Free)
            }
            // Pages the CPU never had uncached (a hidden buffer): CMA pages go back to their area
            // whichever call took them.
            (_, CoherentMem::Pages(pages)) => dma_free_contiguous(dev, pages).map_err(|_| DmaError::Free),
            (_, CoherentMem::Pool { pool, phys, bytes }) => pool.free(phys, bytes),
            (_, CoherentMem::AtomicPool(buf)) => pool::free(buf),
            // dma-iommu's; never made by dma-direct.
            (_, CoherentMem::Scattered(_)) => Err(DmaError::Free),
        }
    }

    /// Gives a coherent buffer of a restricted pool an uncached alias in the window, whatever the
    /// strategy: pool memory is not CMA, so it cannot be remapped in place.
    pub fn map_pool_slot(phys: PhysAddr, bytes: u64, attrs: DmaAttrs) -> Result<CpuView, DmaError> {
        if attrs.contains(DmaAttrs::NO_KERNEL_MAPPING) {
            return Ok(CpuView::Hidden);
        }
        vmap::vmap_contiguous(phys, bytes.div_ceil(PAGE_SIZE), cpu_attr(attrs)).map(CpuView::Window).map_err(DmaError::Remap)
    }
}
