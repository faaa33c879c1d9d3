//! dma-direct (Linux's kernel/dma/direct.c): DMA without an IOMMU. The device is given bus
//! addresses that its [`BusMap`] derives from CPU physical addresses.
//!
//! - A device with a restricted DMA pool gets its coherent buffers from that pool and nowhere
//!   else (Linux's `dma_direct_alloc` checks `is_swiotlb_for_alloc` first and calls
//!   `swiotlb_alloc`): a full pool, or a pool beyond the coherent mask, is an error. The pool's
//!   pages are zeroed and given the same cache maintenance as below. See [`super::bounce`].
//! - Other coherent buffers come from `dma_alloc_contiguous()` below the limit the coherent mask and
//!   the bus map allow. Pages the device turns out not to reach (a hole between bus windows) are
//!   freed and the allocation retried below their address, until it succeeds or nothing is left
//!   below (the lesson of Linux's 2019 ath10k regression, where such pages were handed out).
//!   They are zeroed, and for a non-coherent device cleaned and invalidated from the caches
//!   (Linux's `arch_dma_prep_coherent`). Their CPU mapping stays the cacheable linear map until
//!   dma-remap provides an uncached alias; see `api::DmaCoherent`.
//! - Streaming maps give the buffer's own bus address when all of it translates and its last
//!   byte is under the streaming mask (Linux's `dma_capable`); otherwise, or always with
//!   `swiotlb=force`, they bounce through the device's pool (its own, else the platform's). No
//!   pool, or a pool beyond reach too, is an error.
//! - Non-coherent devices get the cache maintenance of [`super::maint`] on the memory the device
//!   actually accesses (the bounce slot when bouncing), unless `SKIP_CPU_SYNC`: clean before the
//!   device accesses it, invalidate after it wrote it.
//! - A mask is accepted when the device reaches, under it, the lowest RAM page or its bounce pool
//!   (Linux's `dma_direct_supported`, with the pool standing in for ZONE_DMA).

use super::api::DmaError;
use super::busmap::BusMap;
use super::within_mask;
use crate::mm::addr::{PhysAddr, PAGE_SIZE};

/// Whether a device with bus map `bus` reaches anything useful under `mask`: the first page of
/// RAM at `lowest_ram`, or the whole bounce pool `pool` (base, size).
pub fn mask_ok(bus: &BusMap, mask: u64, lowest_ram: PhysAddr, pool: Option<(PhysAddr, u64)>) -> Result<(), DmaError> {
    let ram = within_mask(bus, mask, lowest_ram, PAGE_SIZE).is_some();
    let pool = pool.is_some_and(|(base, size)| within_mask(bus, mask, base, size).is_some());
    if ram || pool {
        Ok(())
    } else {
        Err(DmaError::MaskUnsupported { mask, lowest: lowest_ram })
    }
}

#[cfg(target_os = "none")]
pub use kernel::*;

#[cfg(target_os = "none")]
mod kernel {
    use super::*;
    use crate::dma::maint::PocOps;
    use crate::dma::api::{CoherentMem, CoherentRaw, DmaAttrs};
    use crate::dma::bounce::{in_platform_pool, platform_forced, platform_pool, BouncePool};
    use crate::dma::busmap::DmaAddr;
    use crate::dma::contiguous::{dma_alloc_contiguous, dma_free_contiguous, ContiguousError, ContiguousPages};
    use crate::dma::remap::{self, CpuView};
    use crate::dma::maint::{self, Direction};
    use crate::dma::{Device, GfpFlags};

    /// The pool `dev` bounces through: its own, else the platform's.
    #[inline(always)]
    fn pool_for(dev: &Device) -> Option<&'static BouncePool> {
        dev.own_bounce_pool().or_else(platform_pool)
    }

    /// Whether every streaming mapping of `dev` bounces: its own pool says so (a restricted pool
    /// always does), or it has none and `swiotlb=force` was given.
    #[inline(always)]
    fn force_bounce(dev: &Device) -> bool {
        match dev.own_bounce_pool() {
            Some(p) => p.is_forced(),
            None => platform_forced(),
        }
    }

    /// The CPU's (linear-map) address of `phys .. phys + size`, or an error where the CPU cannot
    /// address it (above 4 GiB on armv7).
    #[inline(always)]
    pub fn va(phys: PhysAddr, size: u64) -> Result<usize, DmaError> {
        usize::try_from(phys.0)
            .ok()
            .filter(|v| usize::try_from(size).is_ok_and(|s| v.checked_add(s).is_some()))
            .ok_or(DmaError::NotCpuAddressable { phys, size })
    }

    #[inline(always)]
    fn for_device(phys: PhysAddr, size: u64, dir: Direction) -> Result<(), DmaError> {
        maint::for_device(&mut PocOps::new(), va(phys, size)?, size as usize, dir).map_err(DmaError::Maint)
    }

    #[inline(always)]
    fn for_cpu(phys: PhysAddr, size: u64, dir: Direction) -> Result<(), DmaError> {
        maint::for_cpu(&mut PocOps::new(), va(phys, size)?, size as usize, dir).map_err(DmaError::Maint)
    }

    #[inline(always)]
    fn needs_sync(dev: &Device, attrs: DmaAttrs) -> bool {
        maint::needs_maintenance(dev.is_coherent()) && !attrs.contains(DmaAttrs::SKIP_CPU_SYNC)
    }

    /// See the module documentation.
    #[inline(always)]
    pub fn map(dev: &Device, phys: PhysAddr, size: u64, dir: Direction, attrs: DmaAttrs) -> Result<DmaAddr, DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        if !force_bounce(dev) {
            if let Some(dma) = dev.bus_addr_within_mask(phys, size) {
                if needs_sync(dev, attrs) {
                    return map_synced(dma, phys, size, dir);
                }
                return Ok(dma);
            }
        }
        map_bounced(dev, pool_for(dev), phys, size, dir, attrs)
    }

    /// The non-coherent tail of [`map`], out of line so that the coherent path stays a leaf
    /// function with no stack frame.
    #[inline(never)]
    fn map_synced(dma: DmaAddr, phys: PhysAddr, size: u64, dir: Direction) -> Result<DmaAddr, DmaError> {
        for_device(phys, size, dir)?;
        Ok(dma)
    }

    #[cold]
    fn map_bounced(
        dev: &Device,
        pool: Option<&BouncePool>,
        phys: PhysAddr,
        size: u64,
        dir: Direction,
        attrs: DmaAttrs,
    ) -> Result<DmaAddr, DmaError> {
        let pool = pool.ok_or(DmaError::Unreachable { phys, size, mask: dev.mask() })?;
        if dev.bus_addr_within_mask(pool.base(), pool.size()).is_none() {
            return Err(DmaError::PoolUnreachable { pool: pool.base(), mask: dev.mask() });
        }
        let bounce = pool.map(phys, size)?;
        let dma = match dev.bus_addr_within_mask(bounce, size) {
            Some(d) => d,
            None => {
                let _ = pool.unmap(bounce, size, Direction::ToDevice);
                return Err(DmaError::PoolUnreachable { pool: pool.base(), mask: dev.mask() });
            }
        };
        if needs_sync(dev, attrs) {
            if let Err(e) = for_device(bounce, size, dir) {
                let _ = pool.unmap(bounce, size, Direction::ToDevice);
                return Err(e);
            }
        }
        Ok(dma)
    }

    /// The physical address behind `dma .. dma + size`, and the pool it lies in if bounced.
    #[inline(always)]
    fn lookup(dev: &Device, dma: DmaAddr, size: u64) -> Result<(PhysAddr, Option<&'static BouncePool>), DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        let phys = dev.bus_map().bus_to_phys(dma, size).ok_or(DmaError::NotMapped { dma, size })?;
        Ok((phys, pool_for(dev).filter(|p| p.contains(phys))))
    }

    /// Whether `phys` lies in the pool `dev` bounces through (without fetching the pool: the
    /// platform pool's range is kept apart for this test).
    #[inline(always)]
    fn in_bounce_pool(dev: &Device, phys: PhysAddr) -> bool {
        match dev.own_bounce_pool() {
            Some(p) => p.contains(phys),
            None => in_platform_pool(phys),
        }
    }

    /// Ends a mapping: for a non-coherent device invalidates what the device wrote, for a bounced
    /// mapping copies it back and frees the slots.
    #[inline(always)]
    pub fn unmap(dev: &Device, dma: DmaAddr, size: u64, dir: Direction, attrs: DmaAttrs) -> Result<(), DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        let Some(phys) = dev.bus_map().bus_to_phys(dma, size) else {
            return Err(DmaError::NotMapped { dma, size });
        };
        if needs_sync(dev, attrs) || in_bounce_pool(dev, phys) {
            return unmap_slow(dev, phys, size, dir, attrs);
        }
        Ok(())
    }

    /// The rest of [`unmap`] for a non-coherent device or a bounced mapping, out of line like
    /// [`map_synced`].
    #[inline(never)]
    fn unmap_slow(dev: &Device, phys: PhysAddr, size: u64, dir: Direction, attrs: DmaAttrs) -> Result<(), DmaError> {
        if needs_sync(dev, attrs) {
            for_cpu(phys, size, dir)?;
        }
        match pool_for(dev).filter(|p| p.contains(phys)) {
            Some(p) => p.unmap(phys, size, dir),
            None => Ok(()),
        }
    }

    pub fn sync_for_cpu(dev: &Device, dma: DmaAddr, size: u64, dir: Direction) -> Result<(), DmaError> {
        let (phys, pool) = lookup(dev, dma, size)?;
        if needs_sync(dev, DmaAttrs::NONE) {
            for_cpu(phys, size, dir)?;
        }
        match pool {
            Some(p) => p.sync_for_cpu(phys, size, dir),
            None => Ok(()),
        }
    }

    pub fn sync_for_device(dev: &Device, dma: DmaAddr, size: u64, dir: Direction) -> Result<(), DmaError> {
        let (phys, pool) = lookup(dev, dma, size)?;
        if let Some(p) = pool {
            p.sync_for_device(phys, size, dir)?;
        }
        if needs_sync(dev, DmaAttrs::NONE) {
            for_device(phys, size, dir)?;
        }
        Ok(())
    }

    /// See the module documentation. For a coherent device the attributes change nothing: the
    /// buffer is always contiguous and mapped (the linear map), even with `NO_KERNEL_MAPPING`,
    /// which only hides the pointer. A non-coherent device's buffer is dma-remap's
    /// ([`super::super::remap`]).
    #[inline(always)]
    pub fn alloc(dev: &Device, size: u64, gfp: GfpFlags, attrs: DmaAttrs) -> Result<CoherentRaw, DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        if let Some(pool) = dev.own_bounce_pool().filter(|p| p.serves_alloc()) {
            return alloc_from_pool(dev, pool, size, attrs);
        }
        if !dev.is_coherent() {
            return remap::alloc(dev, size, gfp, attrs);
        }
        let (pages, dma) = alloc_pages(dev, size, gfp)?;
        Ok(linear_raw(pages, dma, size, attrs))
    }

    /// [`alloc`]'s answer when it comes from the atomic pool (a non-coherent device without a
    /// restricted pool, a caller that cannot block), as the pool gives it; `None`, with nothing
    /// done, for every other request. The caller builds the description
    /// ([`remap::pool_raw`]) where it keeps it, sparing the copies of a by-value result.
    #[inline(always)]
    pub fn alloc_atomic(dev: &Device, size: u64, gfp: GfpFlags) -> Option<Result<(crate::dma::pool::PoolBuffer, DmaAddr), DmaError>> {
        let pooled = size != 0 && !gfp.can_block() && !dev.is_coherent() && !dev.own_bounce_pool().is_some_and(|p| p.serves_alloc());
        pooled.then(|| crate::dma::pool::alloc(dev, size))
    }

    /// [`alloc`]'s answer for a coherent device without a restricted pool (pages of
    /// `dma_alloc_contiguous`, zeroed, in the linear map), as [`alloc_pages`] gives it; `None`,
    /// with nothing done, for every other request. The caller builds the description
    /// ([`linear_raw`]) where it keeps it, like [`alloc_atomic`]'s.
    #[inline(always)]
    pub fn alloc_linear(dev: &Device, size: u64, gfp: GfpFlags) -> Option<Result<(ContiguousPages, DmaAddr), DmaError>> {
        let linear = size != 0 && dev.is_coherent() && !dev.own_bounce_pool().is_some_and(|p| p.serves_alloc());
        linear.then(|| alloc_pages_out_of_line(dev, size, gfp))
    }

    /// [`alloc_pages`], kept out of the API's entry point (which inlines [`alloc_linear`]) so that
    /// the atomic pool's path there stays small.
    #[inline(never)]
    fn alloc_pages_out_of_line(dev: &Device, size: u64, gfp: GfpFlags) -> Result<(ContiguousPages, DmaAddr), DmaError> {
        alloc_pages(dev, size, gfp)
    }

    /// The description of a coherent device's buffer in the linear map: [`alloc`]'s answer there.
    #[inline(always)]
    pub fn linear_raw(pages: ContiguousPages, dma: DmaAddr, size: u64, attrs: DmaAttrs) -> CoherentRaw {
        CoherentRaw { mem: CoherentMem::Pages(pages), dma, size, attrs, cpu: linear_view(attrs) }
    }

    /// The CPU address [`linear_raw`]'s description gives (0 for none), for dma-debug.
    #[inline(always)]
    pub fn linear_cpu(phys: PhysAddr, attrs: DmaAttrs) -> u64 {
        if attrs.contains(DmaAttrs::NO_KERNEL_MAPPING) {
            0
        } else {
            phys.0
        }
    }

    fn linear_view(attrs: DmaAttrs) -> CpuView {
        if attrs.contains(DmaAttrs::NO_KERNEL_MAPPING) {
            CpuView::Hidden
        } else {
            CpuView::Linear
        }
    }

    /// Zeroed pages from `dma_alloc_contiguous()` that `dev` reaches under its coherent mask, and
    /// their device address; cleaned and invalidated from the caches for a non-coherent device.
    #[inline(always)]
    pub fn alloc_pages(dev: &Device, size: u64, gfp: GfpFlags) -> Result<(ContiguousPages, DmaAddr), DmaError> {
        // The device is copied (with a lower limit) only for a retry: a `Device` is large enough
        // for the copy to cost more than the rest of a one-page allocation.
        let mut below: Option<Device> = None;
        loop {
            let pages = dma_alloc_contiguous(below.as_ref().unwrap_or(dev), size, gfp).map_err(DmaError::NoMemory)?;
            let bytes = pages.count * PAGE_SIZE;
            let reach = within_mask(dev.bus_map(), dev.coherent_mask(), pages.phys, bytes);
            match (reach, va(pages.phys, bytes)) {
                (Some(dma), Ok(cpu)) => {
                    // SAFETY: whole pages of RAM just allocated for this buffer alone, mapped
                    // writable Normal memory at their physical address by the linear map
                    // (checked addressable above).
                    unsafe { crate::arch::cache::zero_pages(cpu, bytes as usize) };
                    prep_coherent(dev, cpu, bytes);
                    return Ok((pages, dma));
                }
                (_, cpu) => {
                    let low = pages.phys;
                    dma_free_contiguous(dev, pages).map_err(|_| DmaError::Free)?;
                    cpu?;
                    if low.0 == 0 {
                        let count = size.div_ceil(PAGE_SIZE);
                        return Err(DmaError::NoMemory(ContiguousError::NoMemory { count, limit: 0, blocking: gfp.can_block() }));
                    }
                    below = Some(below.unwrap_or(*dev).below(low.0));
                }
            }
        }
    }

    /// Linux's `arch_dma_prep_coherent`: a non-coherent device must not find the zeroes only in
    /// the CPU's caches, nor the CPU later read stale lines over what the device wrote.
    fn prep_coherent(dev: &Device, cpu: usize, bytes: u64) {
        if maint::needs_maintenance(dev.is_coherent()) {
            crate::arch::cache::clean_invalidate(cpu, bytes as usize);
        }
    }

    /// A coherent buffer from the device's restricted pool (zeroed by the pool), given to the
    /// device through its bus map if it reaches all of it under the coherent mask; otherwise the
    /// slots go back and the answer is an error, never memory from elsewhere. A non-coherent
    /// device's CPU view is an uncached alias in the vmap window.
    #[inline(never)]
    fn alloc_from_pool(dev: &Device, pool: &'static BouncePool, size: u64, attrs: DmaAttrs) -> Result<CoherentRaw, DmaError> {
        let (phys, bytes) = pool.alloc(size)?;
        let Some(dma) = within_mask(dev.bus_map(), dev.coherent_mask(), phys, bytes) else {
            let _ = pool.free(phys, bytes);
            return Err(DmaError::PoolUnreachable { pool: pool.base(), mask: dev.coherent_mask() });
        };
        // `pool.alloc` checked the range addressable.
        prep_coherent(dev, phys.0 as usize, bytes);
        let cpu = if dev.is_coherent() {
            linear_view(attrs)
        } else {
            match remap::map_pool_slot(phys, bytes, attrs) {
                Ok(view) => view,
                Err(e) => {
                    let _ = pool.free(phys, bytes);
                    return Err(e);
                }
            }
        };
        Ok(CoherentRaw { mem: CoherentMem::Pool { pool, phys, bytes }, dma, size, attrs, cpu })
    }

    /// [`free`] of a buffer that can be freed through a reference, so that the caller need not
    /// move the description out first: the atomic pool's, and a coherent device's pages in the
    /// linear map. Their descriptions own nothing to drop. `None`, with nothing done, for the
    /// others. The caller forgets the description after a `Some`.
    #[inline(always)]
    pub fn free_in_place(dev: &Device, raw: &CoherentRaw) -> Option<Result<(), DmaError>> {
        if let Some(buf) = remap::atomic_pool_buffer(raw) {
            return Some(crate::dma::pool::free(buf));
        }
        match &raw.mem {
            CoherentMem::Pages(p) if dev.is_coherent() && matches!(raw.cpu, CpuView::Linear | CpuView::Hidden) => {
                let pages = ContiguousPages { phys: p.phys, count: p.count, source: p.source };
                Some(dma_free_contiguous(dev, pages).map_err(|_| DmaError::Free))
            }
            _ => None,
        }
    }

    /// Frees a buffer of [`alloc`]: dma-remap undoes its CPU mapping first.
    #[inline(always)]
    pub fn free(dev: &Device, raw: CoherentRaw) -> Result<(), DmaError> {
        // Matched in place rather than as a (cpu, mem) pair: building the pair copies the buffer
        // description, which costs more than the atomic pool's whole free.
        let linear = dev.is_coherent() && matches!(raw.cpu, CpuView::Linear | CpuView::Hidden);
        match raw.mem {
            CoherentMem::Pages(pages) if linear => dma_free_contiguous(dev, pages).map_err(|_| DmaError::Free),
            CoherentMem::Pool { pool, phys, bytes } if linear => pool.free(phys, bytes),
            _ => remap::free(dev, raw),
        }
    }

    /// See [`mask_ok`]; the lowest RAM address comes from the boot memory map.
    pub fn mask_supported(dev: &Device, mask: u64) -> Result<(), DmaError> {
        let lowest = crate::kernel::boot_info().memmap.lock().ram().first().map_or(PhysAddr(0), |r| r.base());
        mask_ok(dev.bus_map(), mask, lowest, pool_for(dev).map(|p| (p.base(), p.size())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::busmap::{DmaAddr, Window};

    const RAM: PhysAddr = PhysAddr(0x4000_0000);

    #[test]
    fn masks_on_identity() {
        let id = BusMap::IDENTITY;
        // QEMU virt: RAM at 1 GiB, edu's default 28-bit mask reaches nothing.
        assert_eq!(mask_ok(&id, 0x0fff_ffff, RAM, None), Err(DmaError::MaskUnsupported { mask: 0x0fff_ffff, lowest: RAM }));
        assert_eq!(mask_ok(&id, 0x0fff_ffff, RAM, Some((PhysAddr(0x7c00_0000), 0x40_0000))).is_err(), true);
        assert_eq!(mask_ok(&id, 0xffff_ffff, RAM, None), Ok(()));
        // 30 bits reach no RAM, but a pool below 1 GiB would do.
        assert!(mask_ok(&id, 0x3fff_ffff, RAM, None).is_err());
        assert_eq!(mask_ok(&id, 0x3fff_ffff, PhysAddr(0x8000_0000), Some((PhysAddr(0x3000_0000), 0x10_0000))), Ok(()));
        // The pool must fit entirely.
        assert!(mask_ok(&id, 0x3007_ffff, PhysAddr(0x8000_0000), Some((PhysAddr(0x3000_0000), 0x10_0000))).is_err());
    }

    #[test]
    fn masks_through_an_offset() {
        // RAM at CPU 0 seen at bus 0xc000_0000 (Raspberry Pi 3 style): a 31-bit mask reaches nothing.
        let w = Window::new(PhysAddr(0), DmaAddr(0xc000_0000), 0x4000_0000).unwrap();
        let bus = BusMap::from_windows(&[w]).unwrap();
        assert!(mask_ok(&bus, 0x7fff_ffff, PhysAddr(0), None).is_err());
        assert_eq!(mask_ok(&bus, 0xffff_ffff, PhysAddr(0), None), Ok(()));
        assert_eq!(within_mask(&bus, 0xffff_ffff, PhysAddr(0x1000), 0x1000), Some(DmaAddr(0xc000_1000)));
        assert_eq!(within_mask(&bus, 0xc000_1fff, PhysAddr(0x1000), 0x1001), None);
        assert_eq!(within_mask(&bus, 0xffff_ffff, PhysAddr(0x3fff_f000), 0x2000), None);
        assert_eq!(within_mask(&bus, u64::MAX, PhysAddr(0x1000), 0), None);
    }
}
