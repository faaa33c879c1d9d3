//! The dma-contiguous API (Linux's kernel/dma/contiguous.c): physically contiguous pages for a
//! device, from CMA when possible.
//!
//! Two pairs exist side by side, as in Linux since 5.3 (the 2019 split, "solution C"):
//!
//! - [`dma_alloc_contiguous`] / [`dma_free_contiguous`]: CMA first (the device's own area, else the
//!   default one), then the page allocator. For callers that only need contiguous pages the device
//!   can reach, wherever they come from (dma-direct, dma-iommu). The result says which allocator
//!   served it.
//! - [`dma_alloc_from_contiguous`] / [`dma_release_from_contiguous`]: CMA only, never a fallback.
//!   For callers that depend on the pages being CMA pages: dma-remap on arm32 remaps buffers in
//!   place, changing the attributes of their linear-map entries, which only works where the linear
//!   map uses page granularity, i.e. inside CMA areas; a page from the page allocator may sit in a
//!   block mapping shared with unrelated memory.
//!
//! Which area serves a device: the one it owns ([`Device::cma_area`], from a `memory-region`), and
//! then never the default area; otherwise the default area. An area the device cannot wholly
//! address is not used for it (callers assume the pages are reachable).
//!
//! The logic is in [`Contiguous`], which names its default area and page allocator explicitly (the
//! host tests build their own); the functions with Linux's names use the kernel's.

use core::fmt;

use super::{Device, GfpFlags, DMA_LIMIT_ALL};
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::mm::buddy::{AllocError, FreeError};
use crate::mm::cma::{cma_alloc, CmaArea, CmaReleaseError, CMA_ALIGNMENT_CAP_ORDER};
use crate::mm::phys::LockedPages;

/// Which allocator pages came from.
#[derive(Clone, Copy, Debug)]
pub enum PageSource {
    Cma(&'static CmaArea),
    PageAllocator,
}

impl PartialEq for PageSource {
    fn eq(&self, other: &PageSource) -> bool {
        match (self, other) {
            (PageSource::Cma(a), PageSource::Cma(b)) => core::ptr::eq(*a, *b),
            (PageSource::PageAllocator, PageSource::PageAllocator) => true,
            _ => false,
        }
    }
}

impl Eq for PageSource {}

impl fmt::Display for PageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageSource::Cma(a) => write!(f, "CMA area `{}`", a.name()),
            PageSource::PageAllocator => f.write_str("page allocator"),
        }
    }
}

/// Pages from [`dma_alloc_contiguous`]: `count` pages at `phys`, and where they came from.
#[derive(Debug, PartialEq, Eq)]
pub struct ContiguousPages {
    pub phys: PhysAddr,
    pub count: u64,
    pub source: PageSource,
}

/// Why [`dma_alloc_contiguous`] found no pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContiguousError {
    /// A request for zero bytes.
    ZeroSize,
    /// CMA could not serve it and it is larger than the page allocator's largest block.
    TooLarge { count: u64 },
    /// Neither CMA nor the page allocator had `count` contiguous pages below `limit`.
    NoMemory { count: u64, limit: u64, blocking: bool },
    /// The page allocator is not set up.
    NoPageAllocator,
}

impl fmt::Display for ContiguousError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ContiguousError::ZeroSize => f.write_str("contiguous allocation of 0 bytes"),
            ContiguousError::TooLarge { count } => {
                write!(f, "no CMA area could serve {count} pages, more than the page allocator's largest block")
            }
            ContiguousError::NoMemory { count, limit, blocking } => {
                write!(f, "no {count} contiguous pages")?;
                if limit != DMA_LIMIT_ALL {
                    write!(f, " below {limit:#x}")?;
                }
                if !blocking {
                    f.write_str(" (non-blocking: CMA not tried)")?;
                }
                Ok(())
            }
            ContiguousError::NoPageAllocator => f.write_str("the page allocator is not set up"),
        }
    }
}

/// Why [`dma_free_contiguous`] refused pages. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContiguousFreeError {
    Cma(CmaReleaseError),
    PageAllocator(FreeError),
    NoPageAllocator,
}

impl fmt::Display for ContiguousFreeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContiguousFreeError::Cma(e) => write!(f, "{e}"),
            ContiguousFreeError::PageAllocator(e) => write!(f, "{e}"),
            ContiguousFreeError::NoPageAllocator => f.write_str("the page allocator is not set up"),
        }
    }
}

/// The allocators the API draws from: the default CMA area and the page allocator.
#[derive(Clone, Copy)]
pub struct Contiguous<'p> {
    pub default_area: Option<&'static CmaArea>,
    pub pages: Option<&'p LockedPages<'static>>,
}

/// Order of the smallest power of two of pages holding `count` pages.
fn order_of(count: u64) -> u32 {
    count.next_power_of_two().trailing_zeros()
}

impl Contiguous<'_> {
    /// The area CMA requests of `dev` go to: its own, else the default one; `None` if that area
    /// is not wholly below the device's limit.
    fn area_for(&self, dev: &Device) -> Option<&'static CmaArea> {
        dev.cma_area().or(self.default_area).filter(|a| dev.can_reach(a.base(), a.size()))
    }

    /// See [`dma_alloc_contiguous`].
    pub fn alloc(&self, dev: &Device, size: u64, flags: GfpFlags) -> Result<ContiguousPages, ContiguousError> {
        let count = size.div_ceil(PAGE_SIZE);
        if count == 0 {
            return Err(ContiguousError::ZeroSize);
        }
        // Single pages are plentiful in the page allocator; CMA is kept for what only it can
        // serve, unless the device's own area is the point.
        let wants_cma = flags.can_block() && (dev.cma_area().is_some() || count > 1);
        if let Some(area) = self.area_for(dev).filter(|_| wants_cma) {
            if let Some(phys) = cma_alloc(area, count, order_of(count)) {
                return Ok(ContiguousPages { phys, count, source: PageSource::Cma(area) });
            }
        }
        let pages = self.pages.ok_or(ContiguousError::NoPageAllocator)?;
        let limit = (dev.dma_limit() != DMA_LIMIT_ALL).then_some(PhysAddr(dev.dma_limit()));
        match pages.alloc_exact(count, limit) {
            Ok(phys) => Ok(ContiguousPages { phys, count, source: PageSource::PageAllocator }),
            Err(AllocError::InvalidCount { .. }) => Err(ContiguousError::TooLarge { count }),
            Err(_) => Err(ContiguousError::NoMemory { count, limit: dev.dma_limit(), blocking: flags.can_block() }),
        }
    }

    /// See [`dma_free_contiguous`].
    pub fn free(&self, dev: &Device, pages: ContiguousPages) -> Result<(), ContiguousFreeError> {
        match dev.cma_area().or(self.default_area).filter(|a| a.contains(pages.phys, pages.count)) {
            Some(area) => area.release(pages.phys, pages.count).map_err(ContiguousFreeError::Cma),
            None => self
                .pages
                .ok_or(ContiguousFreeError::NoPageAllocator)?
                .free_exact(pages.phys, pages.count)
                .map_err(ContiguousFreeError::PageAllocator),
        }
    }

    /// See [`dma_alloc_from_contiguous`].
    pub fn alloc_from_contiguous(&self, dev: &Device, count: u64, align: u32) -> Option<PhysAddr> {
        cma_alloc(self.area_for(dev)?, count, align.min(CMA_ALIGNMENT_CAP_ORDER))
    }

    /// See [`dma_release_from_contiguous`]; also returns the refusal of pages that are in the area
    /// (a double release), for the caller to report.
    pub fn release_from_contiguous(&self, dev: &Device, pages: PhysAddr, count: u64) -> (bool, Option<CmaReleaseError>) {
        let Some(area) = dev.cma_area().or(self.default_area) else { return (false, None) };
        match area.release(pages, count) {
            Ok(()) => (true, None),
            Err(CmaReleaseError::NotInArea { .. }) => (false, None),
            Err(e) => (true, Some(e)),
        }
    }
}

#[cfg(target_os = "none")]
pub use kernel::*;

#[cfg(target_os = "none")]
mod kernel {
    use super::*;
    use crate::println;

    /// The kernel's allocators.
    pub fn system() -> Contiguous<'static> {
        Contiguous { default_area: crate::mm::cma::setup::default_area(), pages: crate::mm::phys::allocator() }
    }

    /// `size` bytes (rounded up to pages) of physically contiguous memory that `dev` can reach.
    ///
    /// From the device's own CMA area if it has one (and then never from the default area), else
    /// from the default area; a single page skips the default area (Linux's rule: the page
    /// allocator serves it as well and CMA is kept for large runs). CMA allocations are aligned to
    /// the size rounded up to a power of two, up to 1 MiB. When CMA cannot serve (no area, the area
    /// full or beyond the device's limit), the page allocator does, below the device's limit.
    /// A request whose `flags` forbid blocking never enters CMA: it gets the page allocator's
    /// immediate answer or an error. [`ContiguousPages::source`] says which allocator served it.
    /// A failure prints a warning unless `flags` has [`GfpFlags::NOWARN`].
    pub fn dma_alloc_contiguous(dev: &Device, size: u64, flags: GfpFlags) -> Result<ContiguousPages, ContiguousError> {
        let r = system().alloc(dev, size, flags);
        if let Err(e) = &r {
            if !flags.no_warn() {
                println!("dma: {dev}: {e}");
            }
        }
        r
    }

    /// Gives back pages from [`dma_alloc_contiguous`]: to the device's CMA area (or the default
    /// area) if they lie in it, else to the page allocator. A refusal (pages not allocated, a
    /// double free) changes nothing, is printed, and returned.
    pub fn dma_free_contiguous(dev: &Device, pages: ContiguousPages) -> Result<(), ContiguousFreeError> {
        let (phys, count) = (pages.phys, pages.count);
        let r = system().free(dev, pages);
        if let Err(e) = &r {
            println!("dma: {dev}: free of {count} pages at {phys}: {e}");
        }
        r
    }

    /// `count` pages from the device's CMA area (or the default area), aligned to 2^`align` pages
    /// (capped at 2^8 = 1 MiB) in physical address space: CMA only, `None` rather than pages from
    /// anywhere else. For callers that must have CMA pages: dma-remap's in-place remap on arm32
    /// changes the attributes of the pages' linear-map entries, which is only possible where the
    /// linear map is made of pages (CMA areas), and the atomic pool's expansion. A failure prints
    /// a warning unless `no_warn`.
    pub fn dma_alloc_from_contiguous(dev: &Device, count: u64, align: u32, no_warn: bool) -> Option<PhysAddr> {
        let ctx = system();
        let r = ctx.alloc_from_contiguous(dev, count, align);
        if r.is_none() && !no_warn {
            match ctx.area_for(dev) {
                Some(a) => println!("cma: {dev}: no {count} free pages aligned to 2^{align} in area `{}`", a.name()),
                None => println!("cma: {dev}: no CMA area for {count} pages"),
            }
        }
        r
    }

    /// Releases `count` pages at `pages` from [`dma_alloc_from_contiguous`]: `false` if they are not
    /// in the device's area (or the default area), so the caller frees them elsewhere; `true`
    /// otherwise. A release of pages of the area that are not allocated (a double release) changes
    /// nothing, is printed, and still returns `true`: the pages must not go to another allocator.
    pub fn dma_release_from_contiguous(dev: &Device, pages: PhysAddr, count: u64) -> bool {
        let (ours, refused) = system().release_from_contiguous(dev, pages, count);
        if let Some(e) = refused {
            println!("cma: {dev}: {e}");
        }
        ours
    }
}

#[cfg(target_os = "none")]
mod ktests {
    //! Each case states the contract it checks and compares the areas' and the page allocator's
    //! counters before and after. A private area (1 MiB taken from the page allocator once, kept
    //! like a device's area) gives every configuration a device with an area of its own, so the
    //! per-device and non-blocking cases run even with `cma=0`.

    use super::*;
    use crate::dma::Device;
    use crate::ktest::{NotPassed, TestResult};
    use crate::mm::cma::CmaStats;
    use crate::{kassert, kassert_eq, kskip, ktry, println};
    use alloc::string::String;
    use alloc::vec::Vec;
    use spin::Once;

    static PRIVATE: Once<Result<CmaArea, String>> = Once::new();

    fn private_area() -> Result<&'static CmaArea, NotPassed> {
        let r = PRIVATE.call_once(|| {
            let base = crate::mm::phys::alloc_pages(8).map_err(|e| alloc::format!("{e}"))?;
            CmaArea::new("ktest-private", base, 256, 0).map_err(|e| alloc::format!("{e}"))
        });
        r.as_ref().map_err(|e| NotPassed::Fail(alloc::format!("private area: {e}")))
    }

    fn plain_device() -> Device {
        Device::new("ktest-plain", crate::dma::DMA_LIMIT_ALL)
    }

    fn owning_device() -> Result<Device, NotPassed> {
        Ok(Device::new("ktest-owner", crate::dma::DMA_LIMIT_ALL).with_cma_area(private_area()?))
    }

    fn default_area() -> Option<&'static CmaArea> {
        crate::mm::cma::setup::default_area()
    }

    fn require_default() -> Result<&'static CmaArea, NotPassed> {
        default_area().ok_or_else(|| NotPassed::Skip("no default CMA area (cma=0 or none configured)".into()))
    }

    fn stats_of(a: Option<&CmaArea>) -> Option<CmaStats> {
        a.map(CmaArea::stats)
    }

    fn page_stats() -> Result<crate::mm::buddy::BuddyStats, NotPassed> {
        crate::mm::phys::stats().ok_or(NotPassed::Fail("no page allocator".into()))
    }

    /// Takes every free page of `area` (largest runs first); returns the runs.
    fn fill(area: &CmaArea) -> Vec<(PhysAddr, u64)> {
        let mut runs = Vec::new();
        loop {
            let n = area.stats().largest_free_pages;
            match (n > 0).then(|| area.alloc(n, 0)).flatten() {
                Some(p) => runs.push((p, n)),
                None => return runs,
            }
        }
    }

    fn drain(area: &CmaArea, runs: Vec<(PhysAddr, u64)>) -> TestResult {
        for (p, n) in runs {
            kassert!(area.release_pages(p, n), "release of {n} pages at {p}");
        }
        Ok(())
    }

    /// A multi-page request of a device without an area comes from the default area, aligned.
    fn multi_page_from_default_area() -> TestResult {
        let def = require_default()?;
        let before = def.stats();
        let p = ktry!(dma_alloc_contiguous(&plain_device(), 16 * PAGE_SIZE, GfpFlags::KERNEL));
        kassert_eq!(p.source, PageSource::Cma(def));
        kassert!(def.contains(p.phys, 16), "{} not in the default area", p.phys);
        kassert_eq!(p.phys.as_u64() % (16 * PAGE_SIZE), 0);
        kassert_eq!(def.stats().used_pages, before.used_pages + 16);
        ktry!(dma_free_contiguous(&plain_device(), p));
        kassert_eq!(def.stats().used_pages, before.used_pages);
        Ok(())
    }

    /// A single page of a device without an area comes from the page allocator, default area
    /// untouched.
    fn single_page_skips_default_area() -> TestResult {
        let before = stats_of(default_area());
        let pages_before = page_stats()?;
        let p = ktry!(dma_alloc_contiguous(&plain_device(), 100, GfpFlags::KERNEL));
        kassert_eq!(p.source, PageSource::PageAllocator);
        kassert_eq!(p.count, 1);
        kassert_eq!(stats_of(default_area()), before);
        ktry!(dma_free_contiguous(&plain_device(), p));
        kassert_eq!(page_stats()?.free_pages, pages_before.free_pages);
        Ok(())
    }

    /// When CMA cannot serve (no default area, or the default area full), the page allocator does
    /// and the result says so.
    fn falls_back_when_cma_cannot_serve() -> TestResult {
        let def = default_area();
        let runs = def.map(fill).unwrap_or_default();
        let r = dma_alloc_contiguous(&plain_device(), 16 * PAGE_SIZE, GfpFlags::KERNEL);
        if let Some(a) = def {
            drain(a, runs)?;
        }
        let p = ktry!(r);
        let why = if def.is_some() { "default area full" } else { "no default area" };
        println!("    # falls_back_when_cma_cannot_serve: {} pages from the {} ({why})", p.count, p.source);
        kassert_eq!(p.source, PageSource::PageAllocator);
        kassert!(crate::mm::cma::setup::registry().and_then(|r| r.area_containing(p.phys, 16)).is_none(), "{} is in a CMA area", p.phys);
        ktry!(dma_free_contiguous(&plain_device(), p));
        Ok(())
    }

    /// The legacy allocation never falls back: with no default area or a full one it fails, and
    /// the page allocator is not asked.
    fn legacy_never_falls_back() -> TestResult {
        let def = default_area();
        let runs = def.map(fill).unwrap_or_default();
        let pages_before = page_stats()?;
        let r = dma_alloc_from_contiguous(&plain_device(), 16, 4, true);
        let pages_after = page_stats()?;
        if let Some(a) = def {
            drain(a, runs)?;
        }
        kassert_eq!(r, None);
        kassert_eq!(pages_after.allocs, pages_before.allocs);
        kassert_eq!(pages_after.free_pages, pages_before.free_pages);
        Ok(())
    }

    /// The legacy pair allocates from the default area, aligned, and releases to it.
    fn legacy_pair_uses_default_area() -> TestResult {
        let def = require_default()?;
        let before = def.stats();
        let p = ktry!(dma_alloc_from_contiguous(&plain_device(), 300, 9, false).ok_or("no pages"));
        kassert!(def.contains(p, 300), "{p} not in the default area");
        // Alignment 2^9 is capped at 2^8 pages.
        kassert_eq!(p.as_u64() % (256 * PAGE_SIZE), 0);
        kassert!(dma_release_from_contiguous(&plain_device(), p, 300));
        kassert_eq!(def.stats().used_pages, before.used_pages);
        Ok(())
    }

    /// A request that must not block never touches CMA: the areas' counters do not move, the
    /// pages come from the page allocator.
    fn nonblocking_never_enters_cma() -> TestResult {
        let owner = owning_device()?;
        let private_before = owner.cma_area().map(CmaArea::stats);
        let default_before = stats_of(default_area());
        let a = ktry!(dma_alloc_contiguous(&owner, 16 * PAGE_SIZE, GfpFlags::ATOMIC));
        let b = ktry!(dma_alloc_contiguous(&plain_device(), 64 * PAGE_SIZE, GfpFlags::ATOMIC));
        kassert_eq!(owner.cma_area().map(CmaArea::stats), private_before);
        kassert_eq!(stats_of(default_area()), default_before);
        kassert_eq!((a.source, b.source), (PageSource::PageAllocator, PageSource::PageAllocator));
        ktry!(dma_free_contiguous(&owner, a));
        ktry!(dma_free_contiguous(&plain_device(), b));
        Ok(())
    }

    /// A device with its own area allocates from it (single pages too), never from the default
    /// area; when its area is full the legacy call fails cleanly and the fallback call goes to the
    /// page allocator, still not to the default area.
    fn device_area_only() -> TestResult {
        let owner = owning_device()?;
        let area = ktry!(owner.cma_area().ok_or("no area"));
        let default_before = stats_of(default_area());
        let one = ktry!(dma_alloc_contiguous(&owner, PAGE_SIZE, GfpFlags::KERNEL));
        kassert_eq!(one.source, PageSource::Cma(area));
        let many = ktry!(dma_alloc_contiguous(&owner, 32 * PAGE_SIZE, GfpFlags::KERNEL));
        kassert_eq!(many.source, PageSource::Cma(area));
        kassert!(area.contains(many.phys, 32), "{}", many.phys);
        let runs = fill(area);
        let failed_before = area.stats().failed_allocs;
        let legacy = dma_alloc_from_contiguous(&owner, 4, 2, true);
        let fallback = dma_alloc_contiguous(&owner, 4 * PAGE_SIZE, GfpFlags::KERNEL);
        let failed_after = area.stats().failed_allocs;
        drain(area, runs)?;
        let fallback = ktry!(fallback);
        let fallback_source = fallback.source;
        ktry!(dma_free_contiguous(&owner, fallback));
        ktry!(dma_free_contiguous(&owner, many));
        ktry!(dma_free_contiguous(&owner, one));
        kassert_eq!(legacy, None);
        kassert_eq!(fallback_source, PageSource::PageAllocator);
        kassert_eq!(failed_after - failed_before, 2);
        kassert_eq!(stats_of(default_area()), default_before);
        kassert_eq!(area.stats().used_pages, 0);
        Ok(())
    }

    /// Devices of the DT that own an area get their pages from it.
    fn dt_devices_use_their_areas() -> TestResult {
        let dt = &crate::kernel::boot_info().dt;
        let Some(reg) = crate::mm::cma::setup::registry() else { kskip!("CMA not set up") };
        if reg.devices.is_empty() {
            kskip!("no device in the DT owns a CMA area");
        }
        let default_before = stats_of(default_area());
        for b in &reg.devices {
            let node = ktry!(dt.nodes().find(|n| n.offset() == b.device).ok_or("device node vanished"));
            let dev = ktry!(Device::from_dt(dt, &node));
            let area = &reg.areas[b.area].area;
            let p = ktry!(dma_alloc_contiguous(&dev, 4 * PAGE_SIZE, GfpFlags::KERNEL));
            kassert_eq!(p.source, PageSource::Cma(area), "{dev}");
            ktry!(dma_free_contiguous(&dev, p));
            let q = ktry!(dma_alloc_from_contiguous(&dev, 8, 3, false).ok_or("legacy allocation failed"));
            kassert!(area.contains(q, 8), "{dev}: {q} outside `{}`", area.name());
            kassert!(dma_release_from_contiguous(&dev, q, 8));
        }
        kassert_eq!(stats_of(default_area()), default_before);
        Ok(())
    }

    /// Releasing pages outside the area returns false and changes nothing; a double release is
    /// detected (the area's bad-release counter) and changes nothing either.
    fn release_outside_and_twice() -> TestResult {
        let owner = owning_device()?;
        let area = ktry!(owner.cma_area().ok_or("no area"));
        let before = area.stats();
        let below = PhysAddr(area.base().as_u64() - PAGE_SIZE);
        kassert!(!dma_release_from_contiguous(&owner, area.end(), 1));
        kassert!(!dma_release_from_contiguous(&owner, below, 2));
        kassert!(!dma_release_from_contiguous(&owner, PhysAddr(area.end().as_u64() - PAGE_SIZE), 2));
        kassert_eq!(area.stats(), before);
        let p = ktry!(dma_alloc_from_contiguous(&owner, 4, 2, false).ok_or("no pages"));
        kassert!(dma_release_from_contiguous(&owner, p, 4));
        kassert!(dma_release_from_contiguous(&owner, p, 4), "a double release must still claim the pages");
        let after = area.stats();
        kassert_eq!(after.bad_releases - before.bad_releases, 1);
        kassert_eq!(after.releases - before.releases, 1);
        kassert_eq!(after.used_pages, before.used_pages);
        Ok(())
    }

    /// A device with a small limit gets pages below it, from the page allocator when the default
    /// area lies beyond the limit.
    fn device_limit_respected() -> TestResult {
        let ram = crate::kernel::boot_info().memmap.lock().ram()[0].base().as_u64();
        let limit = ram + (256 << 20);
        let dev = Device::new("ktest-limited", limit);
        let default_before = stats_of(default_area());
        let p = ktry!(dma_alloc_contiguous(&dev, 64 * PAGE_SIZE, GfpFlags::KERNEL));
        kassert!(p.phys.as_u64() + 64 * PAGE_SIZE <= limit, "{} + 64 pages beyond {limit:#x}", p.phys);
        let expect = match default_area() {
            Some(a) if a.end().as_u64() <= limit => PageSource::Cma(a),
            _ => PageSource::PageAllocator,
        };
        kassert_eq!(p.source, expect);
        ktry!(dma_free_contiguous(&dev, p));
        let used = |s: Option<CmaStats>| s.map(|s| s.used_pages);
        kassert_eq!(used(stats_of(default_area())), used(default_before));
        Ok(())
    }

    /// Prints the CMA report; every area is consistent and nothing the suites took is left
    /// allocated (no CMA user runs at boot yet, so every area must be empty).
    fn report() -> TestResult {
        crate::mm::cma::setup::print_report("    # ");
        let Some(reg) = crate::mm::cma::setup::registry() else { kskip!("CMA not set up") };
        for a in reg.areas.iter().map(|r| &r.area).chain(private_area().ok()) {
            let s = a.stats();
            kassert_eq!(s.used_pages + s.free_pages, s.total_pages, "`{}`", a.name());
            kassert!(s.largest_free_pages <= s.free_pages, "`{}`", a.name());
            kassert_eq!(s.used_pages, 0, "`{}` has pages left allocated", a.name());
        }
        Ok(())
    }

    crate::ktest_suite!("dma_contiguous", [
        multi_page_from_default_area,
        single_page_skips_default_area,
        falls_back_when_cma_cannot_serve,
        legacy_never_falls_back,
        legacy_pair_uses_default_area,
        nonblocking_never_enters_cma,
        device_area_only,
        dt_devices_use_their_areas,
        release_outside_and_twice,
        device_limit_respected,
        report,
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::buddy::BuddyAllocator;
    use crate::mm::cma::CmaStats;

    const RAM: u64 = 0x4000_0000;
    const RAM_PAGES: u64 = 0x4000; // 64 MiB

    /// 64 MiB of pretend RAM at 0x40000000 with a 16 MiB default area at its top carved out of the
    /// page allocator, and an 8-page device area at 0x40800000.
    struct World {
        ctx: Contiguous<'static>,
        device_area: &'static CmaArea,
    }

    fn world() -> World {
        let meta = vec![0u64; crate::mm::buddy::metadata_words(PhysAddr(RAM), RAM_PAGES).unwrap()].leak();
        let mut b = BuddyAllocator::new(PhysAddr(RAM), RAM_PAGES, meta).unwrap();
        b.add_free_range(PhysAddr(RAM), 0x800).unwrap();
        b.add_free_range(PhysAddr(RAM + 0x80_8000), 0x3000 - 0x808).unwrap();
        let default_area: &'static CmaArea = Box::leak(Box::new(CmaArea::new("default", PhysAddr(0x4300_0000), 0x1000, 0).unwrap()));
        let device_area: &'static CmaArea = Box::leak(Box::new(CmaArea::new("dev", PhysAddr(0x4080_0000), 8, 0).unwrap()));
        let pages: &'static LockedPages<'static> = Box::leak(Box::new(LockedPages::new(b)));
        World { ctx: Contiguous { default_area: Some(default_area), pages: Some(pages) }, device_area }
    }

    fn all() -> Device {
        Device::new("all", DMA_LIMIT_ALL)
    }

    fn snapshot(w: &World) -> (CmaStats, CmaStats, u64) {
        (w.ctx.default_area.unwrap().stats(), w.device_area.stats(), w.ctx.pages.unwrap().stats().free_pages)
    }

    #[test]
    fn sources_by_request() {
        let w = world();
        let def = w.ctx.default_area.unwrap();
        let owner = all().with_cma_area(w.device_area);
        let base = snapshot(&w);
        // Blocking, several pages, no own area: default area, aligned to the size.
        let a = w.ctx.alloc(&all(), 5 * PAGE_SIZE, GfpFlags::KERNEL).unwrap();
        assert_eq!((a.source, a.count), (PageSource::Cma(def), 5));
        assert_eq!(a.phys.as_u64() % (8 * PAGE_SIZE), 0);
        // One page: page allocator.
        let b = w.ctx.alloc(&all(), 1, GfpFlags::KERNEL).unwrap();
        assert_eq!(b.source, PageSource::PageAllocator);
        // One page of a device with its own area: that area.
        let c = w.ctx.alloc(&owner, PAGE_SIZE, GfpFlags::KERNEL).unwrap();
        assert_eq!(c.source, PageSource::Cma(w.device_area));
        // Non-blocking: never CMA, either way.
        let d = w.ctx.alloc(&owner, 2 * PAGE_SIZE, GfpFlags::ATOMIC).unwrap();
        let e = w.ctx.alloc(&all(), 32 * PAGE_SIZE, GfpFlags::ATOMIC | GfpFlags::NOWARN).unwrap();
        assert_eq!((d.source, e.source), (PageSource::PageAllocator, PageSource::PageAllocator));
        assert_eq!(def.stats().allocs, 1);
        assert_eq!(w.device_area.stats().allocs, 1);
        for (dev, p) in [(all(), a), (all(), b), (owner, c), (owner, d), (all(), e)] {
            w.ctx.free(&dev, p).unwrap();
        }
        let end = snapshot(&w);
        assert_eq!((end.0.used_pages, end.1.used_pages, end.2), (base.0.used_pages, base.1.used_pages, base.2));
        assert_eq!(w.ctx.alloc(&all(), 0, GfpFlags::KERNEL), Err(ContiguousError::ZeroSize));
    }

    #[test]
    fn own_area_full_falls_back_to_pages_never_to_the_default_area() {
        let w = world();
        let owner = all().with_cma_area(w.device_area);
        let full = w.ctx.alloc(&owner, 8 * PAGE_SIZE, GfpFlags::KERNEL).unwrap();
        assert_eq!(full.source, PageSource::Cma(w.device_area));
        let def_before = w.ctx.default_area.unwrap().stats();
        assert_eq!(w.ctx.alloc_from_contiguous(&owner, 1, 0), None);
        let p = w.ctx.alloc(&owner, 4 * PAGE_SIZE, GfpFlags::KERNEL).unwrap();
        assert_eq!(p.source, PageSource::PageAllocator);
        assert_eq!(w.ctx.default_area.unwrap().stats(), def_before);
        // Freed by address: CMA pages to the area, the others to the page allocator.
        w.ctx.free(&owner, p).unwrap();
        w.ctx.free(&owner, full).unwrap();
        assert_eq!(w.device_area.stats().used_pages, 0);
    }

    #[test]
    fn legacy_pair_never_falls_back() {
        let w = world();
        let def = w.ctx.default_area.unwrap();
        let pages_before = w.ctx.pages.unwrap().stats();
        let p = w.ctx.alloc_from_contiguous(&all(), 1, 0).unwrap();
        assert!(def.contains(p, 1));
        // Alignment capped at 2^8 pages.
        let q = w.ctx.alloc_from_contiguous(&all(), 2, 12).unwrap();
        assert_eq!(q.as_u64() % (256 * PAGE_SIZE), 0);
        let big = w.ctx.alloc_from_contiguous(&all(), 0x1000, 0);
        assert_eq!(big, None);
        assert_eq!(w.ctx.pages.unwrap().stats(), pages_before);
        assert_eq!(w.ctx.release_from_contiguous(&all(), p, 1), (true, None));
        assert!(matches!(w.ctx.release_from_contiguous(&all(), p, 1), (true, Some(CmaReleaseError::NotAllocated { .. }))));
        assert_eq!(w.ctx.release_from_contiguous(&all(), PhysAddr(RAM), 1), (false, None));
        assert_eq!(w.ctx.release_from_contiguous(&all(), q, 2), (true, None));
        let none = Contiguous { default_area: None, pages: w.ctx.pages };
        assert_eq!(none.alloc_from_contiguous(&all(), 4, 2), None);
        assert_eq!(none.release_from_contiguous(&all(), q, 2), (false, None));
        // Without a default area the fallback pair still works.
        let r = none.alloc(&all(), 4 * PAGE_SIZE, GfpFlags::KERNEL).unwrap();
        assert_eq!(r.source, PageSource::PageAllocator);
        none.free(&all(), r).unwrap();
    }

    #[test]
    fn limits_are_respected() {
        let w = world();
        // The default area (0x43000000-0x44000000) is beyond this device: page allocator below.
        let low = Device::new("low", 0x4100_0000);
        let p = w.ctx.alloc(&low, 64 * PAGE_SIZE, GfpFlags::KERNEL).unwrap();
        assert_eq!(p.source, PageSource::PageAllocator);
        assert!(p.phys.as_u64() + 64 * PAGE_SIZE <= 0x4100_0000);
        assert_eq!(w.ctx.alloc_from_contiguous(&low, 4, 0), None);
        w.ctx.free(&low, p).unwrap();
        let none = Device::new("none", RAM);
        let e = w.ctx.alloc(&none, 2 * PAGE_SIZE, GfpFlags::KERNEL).unwrap_err();
        assert_eq!(e, ContiguousError::NoMemory { count: 2, limit: RAM, blocking: true });
        assert_eq!(format!("{e}"), "no 2 contiguous pages below 0x40000000");
        let e = w.ctx.alloc(&all(), 1 << 40, GfpFlags::ATOMIC).unwrap_err();
        assert_eq!(e, ContiguousError::TooLarge { count: 1 << 28 });
        let e = w.ctx.alloc(&all(), 0x2000 * PAGE_SIZE, GfpFlags::ATOMIC).unwrap_err();
        assert_eq!(format!("{e}"), "no 8192 contiguous pages (non-blocking: CMA not tried)");
    }

    #[test]
    fn bad_frees_change_nothing() {
        let w = world();
        let p = w.ctx.alloc(&all(), 3 * PAGE_SIZE, GfpFlags::KERNEL).unwrap();
        let again = ContiguousPages { phys: p.phys, count: 3, source: p.source };
        w.ctx.free(&all(), p).unwrap();
        let before = snapshot(&w);
        assert!(matches!(w.ctx.free(&all(), again), Err(ContiguousFreeError::Cma(CmaReleaseError::NotAllocated { .. }))));
        let stray = ContiguousPages { phys: PhysAddr(RAM + 0x80_0000), count: 1, source: PageSource::PageAllocator };
        assert!(matches!(w.ctx.free(&all(), stray), Err(ContiguousFreeError::PageAllocator(FreeError::NotManaged { .. }))));
        let after = snapshot(&w);
        assert_eq!((after.0.used_pages, after.2), (before.0.used_pages, before.2));
    }
}
