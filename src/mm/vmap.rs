//! The window of dynamic kernel mappings (Linux's vmalloc area, as dma-remap and the atomic pool
//! use it): pages, contiguous or not, mapped at contiguous virtual addresses with chosen memory
//! attributes, and unmapped with TLB invalidation on every CPU.
//!
//! The kernel identity-maps RAM and MMIO, so the window must lie where no physical address the
//! kernel may map lives: [`place_window`] picks the highest free range below the top of the
//! kernel's virtual address space, avoiding RAM, every `reg` in the device tree and the PCI host
//! bridges' windows. On aarch64 that is the top of the 48-bit space, far above any device; on
//! armv7 it is a hole in the 4 GiB the CPU shares between RAM and MMIO.
//!
//! Virtual space inside the window is handed out by the buddy allocator (`mm::buddy`) over the
//! window's pages: areas are aligned to their power-of-two size, so a large physically aligned
//! buffer gets block mappings. Every area is followed by one unmapped guard page, so a CPU
//! overrun faults instead of reaching the next area.
//!
//! Small areas (up to 63 pages, see [`SLOT_ORDERS`]) take a whole power-of-two block, guard page
//! included, and a freed block waits in a short per-order list for the next area of its size, as
//! Linux's vmap blocks serve small mappings: the usual DMA buffer then costs a push and a pop
//! instead of a buddy split and merge. The buddy allocator's checks are not needed for these
//! frees: a [`VmapArea`] is made only here and cannot be copied, so the one given back is live and
//! owned by the caller. When the buddy allocator has no room for an area, the lists give their
//! blocks back and the request is tried again, so they never make a request fail.
//!
//! Unmapping keeps the page tables of the window (`kmap::unmap_keep_tables`), as Linux keeps those
//! of the vmalloc area: the next mapping in the same 2 MiB needs no table page, and a 1 GiB window
//! holds at most about 2 MiB of them.

/// Where the window goes: the highest `size`-byte range, aligned to `align` (a power of two), that
/// ends at or below `limit` and overlaps none of the `occupied` `(base, end)` ranges. `None` if
/// there is no such range.
pub fn place_window(limit: u64, size: u64, align: u64, occupied: &[(u64, u64)]) -> Option<u64> {
    if size == 0 || !align.is_power_of_two() {
        return None;
    }
    let mut base = limit.checked_sub(size)? & !(align - 1);
    loop {
        let end = base + size;
        // The lowest start among the ranges in the way: the next candidate ends below it.
        let blocker = occupied.iter().filter(|&&(b, e)| b < end && e > base).map(|&(b, _)| b).min();
        match blocker {
            None => return Some(base),
            Some(b) => base = b.checked_sub(size)? & !(align - 1),
        }
    }
}

use core::fmt;

use crate::mm::addr::PhysAddr;
use crate::mm::buddy::{AllocError, BuddyAllocator, FreeError};

/// Small areas take a block of 2^k pages, k < `SLOT_ORDERS`, guard page included: up to 63 pages
/// of buffer (see the module documentation).
pub const SLOT_ORDERS: usize = 7;

/// Freed blocks kept per order for reuse.
pub const SLOTS_PER_ORDER: usize = 8;

/// The virtual space of the window, in pages: the buddy allocator over it and the per-order lists
/// of freed small blocks in front of it (see the module documentation). Addresses are handed out
/// as `PhysAddr`, the buddy allocator's type, though they are virtual.
pub struct WindowSpace<'m> {
    space: BuddyAllocator<'m>,
    /// Free blocks of order k (2^k pages, aligned) at `slots[k][..slot_count[k]]`, allocated as
    /// far as `space` knows.
    slots: [[PhysAddr; SLOTS_PER_ORDER]; SLOT_ORDERS],
    slot_count: [usize; SLOT_ORDERS],
}

/// The order of the block a small area of `span` pages (guard included) takes; `None` for a large
/// one, which takes exactly its pages.
#[inline(always)]
fn slot_order(span: u64) -> Option<usize> {
    let order = span.checked_next_power_of_two()?.trailing_zeros() as usize;
    (order < SLOT_ORDERS).then_some(order)
}

impl<'m> WindowSpace<'m> {
    /// The space `space` manages (its free ranges added), with empty lists.
    pub fn new(space: BuddyAllocator<'m>) -> Self {
        WindowSpace { space, slots: [[PhysAddr(0); SLOTS_PER_ORDER]; SLOT_ORDERS], slot_count: [0; SLOT_ORDERS] }
    }

    /// Space for an area of `span` pages, guard included: a small one gets a whole block of the
    /// next power of two, from the list of that order if it has one; a large one exactly its
    /// pages (aligned to the next power of two, as `BuddyAllocator::alloc_pages`). When the buddy
    /// allocator runs out, the lists give their blocks back and it is asked again.
    #[inline(always)]
    pub fn take(&mut self, span: u64) -> Result<PhysAddr, AllocError> {
        match self.take_once(span) {
            Err(AllocError::OutOfMemory { .. }) if self.slot_count.iter().any(|&n| n > 0) => {
                self.flush();
                self.take_once(span)
            }
            r => r,
        }
    }

    #[inline(always)]
    fn take_once(&mut self, span: u64) -> Result<PhysAddr, AllocError> {
        match slot_order(span) {
            Some(k) if self.slot_count[k] > 0 => {
                self.slot_count[k] -= 1;
                Ok(self.slots[k][self.slot_count[k]])
            }
            Some(k) => self.space.alloc(k as u32),
            None => self.space.alloc_pages(span),
        }
    }

    /// Gives back the space of a live area of `span` pages at `va`, which `take(span)` returned.
    /// A small block goes on its list unchecked (the caller vouches for it: see the module
    /// documentation), or to the buddy allocator when the list is full; a large one to the buddy
    /// allocator, with its checks.
    #[inline(always)]
    pub fn give(&mut self, va: PhysAddr, span: u64) -> Result<(), FreeError> {
        match slot_order(span) {
            Some(k) if self.slot_count[k] < SLOTS_PER_ORDER => {
                self.slots[k][self.slot_count[k]] = va;
                self.slot_count[k] += 1;
                Ok(())
            }
            Some(k) => self.space.free(va, k as u32),
            None => self.space.free_pages(va, span),
        }
    }

    /// Gives every listed block back to the buddy allocator.
    fn flush(&mut self) {
        for k in 0..SLOT_ORDERS {
            for &block in &self.slots[k][..self.slot_count[k]] {
                // A listed block is allocated as far as the buddy allocator knows.
                let r = self.space.free(block, k as u32);
                debug_assert!(r.is_ok(), "listed block {block} refused: {r:?}");
            }
            self.slot_count[k] = 0;
        }
    }

    /// Free pages: the buddy allocator's and the listed blocks'.
    pub fn free_pages(&self) -> u64 {
        let listed: u64 = self.slot_count.iter().enumerate().map(|(k, &n)| (n as u64) << k).sum();
        self.space.stats().free_pages + listed
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmapError {
    /// `init` found no free range for the window, or has not run.
    NoWindow,
    /// The window has no free range of this many pages (guard page included).
    NoSpace { pages: u64 },
    /// A request for no pages, or one the window could never hold.
    BadSize { pages: u64 },
    /// An area that is not a live area of the window.
    NotAnArea { va: usize, pages: u64 },
    /// The kernel tables refused the change.
    Tables,
    /// In-place remapping of memory the linear map does not hold as pages (not a CMA area).
    NotPageMapped { phys: u64, bytes: u64 },
}

impl fmt::Display for VmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            VmapError::NoWindow => f.write_str("no window for dynamic mappings"),
            VmapError::NoSpace { pages } => write!(f, "no room for {pages} pages in the vmap window"),
            VmapError::BadSize { pages } => write!(f, "cannot map {pages} pages in the vmap window"),
            VmapError::NotAnArea { va, pages } => write!(f, "{va:#x} + {pages} pages is not a vmap area"),
            VmapError::Tables => f.write_str("the kernel page tables refused the change"),
            VmapError::NotPageMapped { phys, bytes } => {
                write!(f, "{phys:#x} + {bytes:#x} is not mapped with pages in the linear map: not a CMA area")
            }
        }
    }
}

/// A live area of the window: `pages` pages mapped at `va`. Not freed on drop: the owner
/// calls `vunmap` (after it stopped using the pointer) and only then frees the pages.
#[derive(Debug, PartialEq, Eq)]
pub struct VmapArea {
    va: usize,
    pages: u64,
}

impl VmapArea {
    pub fn addr(&self) -> usize {
        self.va
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }
}

#[cfg(target_os = "none")]
pub use kernel::*;

#[cfg(target_os = "none")]
mod kernel {
    use super::{place_window, WindowSpace};
    use crate::arch;
    use crate::dt::DeviceTree;
    use crate::mm::addr::{PhysAddr, PAGE_SIZE};
    use crate::mm::buddy::{self, AllocError, BuddyAllocator, FreeError};
    use crate::mm::kmap::{self, KmapError};
    use crate::mm::memmap::MemoryMap;
    use crate::mm::pgtable::{MemAttr, Perms};
    use alloc::vec::Vec;
    use super::{VmapArea, VmapError};
    use spin::{Mutex, Once};

    /// Window sizes to try, largest first: 1 GiB fits anywhere on aarch64; a 32-bit address space
    /// crowded by RAM and MMIO may only have room for a smaller one.
    const WINDOW_SIZES: [u64; 4] = [1 << 30, 256 << 20, 64 << 20, 16 << 20];
    const WINDOW_ALIGN: u64 = 2 << 20;

    struct Window {
        base: u64,
        size: u64,
        space: WindowSpace<'static>,
        areas: u64,
    }

    static WINDOW: Once<Mutex<Window>> = Once::new();

    impl From<KmapError> for VmapError {
        fn from(e: KmapError) -> Self {
            crate::println!("vmap: {e}");
            VmapError::Tables
        }
    }

    /// The window's place and use.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct VmapStats {
        pub base: u64,
        pub size: u64,
        /// Pages taken by live areas: their guard pages included, and for a small area the rest
        /// of its power-of-two block.
        pub used_pages: u64,
        pub areas: u64,
    }

    /// Every physical range the kernel may identity-map: RAM, the `reg` of every node, and the
    /// PCI host bridges' windows (BARs are assigned there). Unreadable properties are skipped:
    /// the drivers that need them report those.
    fn occupied(dt: &DeviceTree<'_>, map: &MemoryMap) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = map.ram().iter().map(|r| (r.base().0, r.end())).collect();
        for node in dt.nodes() {
            if let Ok(Some(regs)) = dt.reg(&node) {
                v.extend(regs.flatten().filter(|r| r.size() > 0).map(|r| (r.base().0, r.end())));
            }
            if node.device_type() == Some("pci") {
                if let Ok(host) = crate::drivers::pci::HostBridge::from_dt(dt, &node) {
                    v.extend(host.windows.iter().map(|w| (w.cpu_addr.0, w.cpu_addr.0.saturating_add(w.size))));
                }
            }
        }
        v
    }

    /// Places the window and sets up its allocator (metadata on the kernel heap). Once, after the
    /// kernel tables are built.
    pub fn init(dt: &DeviceTree<'_>, map: &MemoryMap) -> Result<(u64, u64), VmapError> {
        let va_bits = arch::mmu::KERNEL_TABLES.va_bits;
        let limit = 1u64 << va_bits;
        // Where the CPU's physical addresses end below the virtual space (aarch64), nothing the
        // kernel identity-maps can lie above them: no need to read the device tree.
        let pa_bits = arch::mmu::pa_bits();
        let taken = if pa_bits < va_bits { alloc::vec![(0, 1u64 << pa_bits)] } else { occupied(dt, map) };
        let (base, size) = WINDOW_SIZES
            .iter()
            .find_map(|&size| place_window(limit, size, WINDOW_ALIGN, &taken).map(|b| (b, size)))
            .ok_or(VmapError::NoWindow)?;
        let pages = size / PAGE_SIZE;
        let words = buddy::metadata_words(PhysAddr(base), pages).map_err(|_| VmapError::NoWindow)?;
        // From the page allocator, not zeroed: the buddy allocator initialises its metadata lazily
        // (it writes a handful of words whatever the span), so zeroing the 128 KiB a 1 GiB window
        // needs would only cost boot time.
        let meta_pages = (words as u64 * 8).div_ceil(PAGE_SIZE);
        let meta_pa = crate::mm::phys::alloc_pages_exact(meta_pages, None).map_err(|_| VmapError::NoWindow)?;
        // SAFETY: pages just allocated for this metadata alone and for good, mapped writable at
        // their physical address by the linear map, page aligned (so aligned for u64); any bit
        // pattern is a valid u64 and the buddy allocator reads only words it has written.
        let meta: &'static mut [u64] = unsafe { core::slice::from_raw_parts_mut(meta_pa.0 as usize as *mut u64, words) };
        let mut space = BuddyAllocator::new(PhysAddr(base), pages, meta).map_err(|_| VmapError::NoWindow)?;
        space.add_free_range(PhysAddr(base), pages).map_err(|_| VmapError::NoWindow)?;
        WINDOW.call_once(|| Mutex::new(Window { base, size, space: WindowSpace::new(space), areas: 0 }));
        Ok((base, size))
    }

    fn window() -> Result<&'static Mutex<Window>, VmapError> {
        WINDOW.get().ok_or(VmapError::NoWindow)
    }

    /// Virtual space for `pages` pages plus the guard page.
    #[inline(always)]
    fn take_space(pages: u64) -> Result<usize, VmapError> {
        let span = pages.checked_add(1).ok_or(VmapError::BadSize { pages })?;
        let mut w = window()?.lock();
        let va = w.space.take(span).map_err(|e| match e {
            AllocError::OutOfMemory { .. } => VmapError::NoSpace { pages: span },
            _ => VmapError::BadSize { pages },
        })?;
        w.areas += 1;
        Ok(va.0 as usize)
    }

    /// Gives back the space of a live area (see the module documentation for why a small one
    /// needs no check).
    #[inline(always)]
    fn give_space(va: usize, pages: u64) -> Result<(), VmapError> {
        let mut w = window()?.lock();
        w.space.give(PhysAddr(va as u64), pages + 1).map_err(|e| match e {
            FreeError::DoubleFree { .. } | FreeError::NotManaged { .. } | FreeError::OutOfSpan { .. } | FreeError::Misaligned { .. } => {
                VmapError::NotAnArea { va, pages }
            }
            _ => VmapError::BadSize { pages },
        })?;
        w.areas -= 1;
        Ok(())
    }

    /// Maps `pages` physically contiguous pages from `pa` with `attr` (read-write, never
    /// executable) at fresh contiguous virtual addresses, with blocks where the alignment allows.
    #[inline(always)]
    pub fn vmap_contiguous(pa: PhysAddr, pages: u64, attr: MemAttr) -> Result<VmapArea, VmapError> {
        let bytes = pages.checked_mul(PAGE_SIZE).filter(|&b| b > 0).ok_or(VmapError::BadSize { pages })?;
        let va = take_space(pages)?;
        if let Err(e) = kmap::map_dynamic(va as u64, pa, bytes, attr, Perms::RW) {
            give_space(va, pages)?;
            return Err(e.into());
        }
        Ok(VmapArea { va, pages })
    }

    /// Maps the pages of `list` (each page-aligned, in any order, possibly scattered) at
    /// contiguous virtual addresses, in list order, with `attr`.
    pub fn vmap_pages(list: &[PhysAddr], attr: MemAttr) -> Result<VmapArea, VmapError> {
        let pages = list.len() as u64;
        if pages == 0 || list.iter().any(|p| p.0 % PAGE_SIZE != 0) {
            return Err(VmapError::BadSize { pages });
        }
        let va = take_space(pages)?;
        for (i, &pa) in list.iter().enumerate() {
            let at = va as u64 + i as u64 * PAGE_SIZE;
            if let Err(e) = kmap::map_dynamic(at, pa, PAGE_SIZE, attr, Perms::RW) {
                kmap::unmap_keep_tables(va as u64, i as u64 * PAGE_SIZE)?;
                give_space(va, pages)?;
                return Err(e.into());
            }
        }
        Ok(VmapArea { va, pages })
    }

    /// Unmaps `area` and invalidates it in every CPU's TLB, then returns its virtual space. When
    /// this returns, no CPU reaches the area's pages through the window: they may be freed.
    #[inline(always)]
    pub fn vunmap(area: VmapArea) -> Result<(), VmapError> {
        let w = window()?;
        {
            let w = w.lock();
            let end = area.va as u64 + area.pages * PAGE_SIZE;
            if (area.va as u64) < w.base || end > w.base + w.size {
                return Err(VmapError::NotAnArea { va: area.va, pages: area.pages });
            }
        }
        kmap::unmap_keep_tables(area.va as u64, area.pages * PAGE_SIZE)?;
        give_space(area.va, area.pages)
    }

    /// Where the window is and how much of it is in use; `None` before [`init`].
    pub fn stats() -> Option<VmapStats> {
        let w = WINDOW.get()?.lock();
        let free = w.space.free_pages();
        Some(VmapStats { base: w.base, size: w.size, used_pages: w.size / PAGE_SIZE - free, areas: w.areas })
    }

    /// Whether `va` lies in the window.
    pub fn contains(va: u64) -> bool {
        WINDOW.get().is_some_and(|w| {
            let w = w.lock();
            va >= w.base && va - w.base < w.size
        })
    }
}

#[cfg(target_os = "none")]
mod ktests {
    use super::*;
    use crate::arch::probe::read_u64;
    use crate::ktest::TestResult;
    use crate::mm::addr::{PhysAddr, PAGE_SIZE};
    use crate::mm::pgtable::MemAttr;
    use crate::mm::phys::{alloc_pages, free_pages};
    use crate::{kassert, kassert_eq, ktry};

    /// A small area's space serves the next area of its size at once; what the CPU reads there is
    /// the new page, not a stale translation of the old one; once unmapped, the address faults;
    /// the counters come back.
    fn freed_space_is_reused_without_stale_translations() -> TestResult {
        let before = ktry!(stats().ok_or("no vmap window"));
        let pages = ktry!(alloc_pages(1));
        let (a, b) = (pages, PhysAddr(pages.0 + PAGE_SIZE));
        // SAFETY: two pages just allocated for this test alone, mapped writable at their physical
        // address by the linear map; the window maps them cacheable too, so no maintenance.
        unsafe {
            (a.0 as *mut u64).write_volatile(0xaaaa_0000_aaaa_0000);
            (b.0 as *mut u64).write_volatile(0xbbbb_0000_bbbb_0000);
        }
        let r = (|| -> TestResult {
            let first = ktry!(vmap_contiguous(a, 1, MemAttr::Normal));
            let va = first.addr();
            kassert_eq!(read_u64(va).ok(), Some(0xaaaa_0000_aaaa_0000));
            ktry!(vunmap(first));
            let gone = read_u64(va);
            kassert!(matches!(gone, Err(ref f) if f.is_translation()), "{va:#x} after vunmap: {gone:?}");
            let second = ktry!(vmap_contiguous(b, 1, MemAttr::Normal));
            kassert_eq!(second.addr(), va, "the freed space was not used again");
            let seen = read_u64(va);
            ktry!(vunmap(second));
            kassert_eq!(seen.ok(), Some(0xbbbb_0000_bbbb_0000), "stale translation at {va:#x}");
            Ok(())
        })();
        ktry!(free_pages(pages, 1));
        r?;
        let after = ktry!(stats().ok_or("no vmap window"));
        kassert_eq!((after.areas, after.used_pages), (before.areas, before.used_pages));
        Ok(())
    }

    crate::ktest_suite!("vmap", [freed_space_is_reused_without_stale_translations]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::addr::PAGE_SIZE;

    /// A window space of `pages` pages at 1 GiB, all free.
    fn space(pages: u64) -> WindowSpace<'static> {
        let base = PhysAddr(GIB);
        let meta = vec![!0u64; crate::mm::buddy::metadata_words(base, pages).unwrap()].leak();
        let mut b = BuddyAllocator::new(base, pages, meta).unwrap();
        b.add_free_range(base, pages).unwrap();
        WindowSpace::new(b)
    }

    fn page(n: u64) -> PhysAddr {
        PhysAddr(GIB + n * PAGE_SIZE)
    }

    #[test]
    fn small_areas_take_whole_blocks_and_reuse_them() {
        let mut w = space(256);
        // One page and its guard: the top 2-page block.
        let a = w.take(2).unwrap();
        assert_eq!((a, w.free_pages()), (page(254), 254));
        w.give(a, 2).unwrap();
        assert_eq!(w.free_pages(), 256);
        // Listed, so the next area of its size gets it back at once.
        assert_eq!(w.take(2), Ok(a));
        // Three pages take a 4-page block; 63 pages a 64-page block.
        let b = w.take(3).unwrap();
        assert_eq!((b.as_u64() % (4 * PAGE_SIZE), w.free_pages()), (0, 256 - 2 - 4));
        let c = w.take(63).unwrap();
        assert_eq!((c.as_u64() % (64 * PAGE_SIZE), w.free_pages()), (0, 256 - 2 - 4 - 64));
        // A large area takes exactly its pages, aligned to the next power of two, and its free is
        // checked by the buddy allocator.
        w.give(c, 63).unwrap();
        let d = w.take(65).unwrap();
        assert_eq!((d, w.free_pages()), (page(0), 256 - 2 - 4 - 65));
        w.give(d, 65).unwrap();
        assert_eq!(w.give(d, 65), Err(FreeError::DoubleFree { addr: d, pages: 65 }));
        w.give(b, 3).unwrap();
        w.give(a, 2).unwrap();
        assert_eq!(w.free_pages(), 256);
    }

    #[test]
    fn full_lists_and_exhaustion_go_to_the_buddy_allocator() {
        let mut w = space(64);
        let blocks: Vec<PhysAddr> = (0..32).map(|_| w.take(2).unwrap()).collect();
        assert_eq!(w.take(2), Err(AllocError::OutOfMemory { order: 1, limit: None }));
        // 8 blocks listed, the other 24 back in the buddy allocator (so they merge).
        for &a in &blocks {
            w.give(a, 2).unwrap();
        }
        assert_eq!(w.free_pages(), 64);
        // The whole space in one area: only with the listed blocks given back first.
        assert_eq!(w.take(64), Ok(page(0)));
        assert_eq!(w.free_pages(), 0);
        assert_eq!(w.take(2), Err(AllocError::OutOfMemory { order: 1, limit: None }));
        w.give(page(0), 64).unwrap();
        assert_eq!(w.take(64), Ok(page(0)));
    }

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn top_of_an_empty_space() {
        assert_eq!(place_window(1 << 48, GIB, 2 * MIB, &[]), Some((1 << 48) - GIB));
        assert_eq!(place_window(1 << 32, 16 * MIB, 2 * MIB, &[]), Some(0xff00_0000));
    }

    #[test]
    fn steps_below_what_is_in_the_way() {
        // armv7 virt with 3 GiB: RAM up to 4 GiB, the PCI ECAM and MMIO window below it.
        let taken = [(0x4000_0000, 0x1_0000_0000), (0x3f00_0000, 0x4000_0000), (0x1000_0000, 0x3eff_0000), (0x0900_0000, 0x0900_1000)];
        // Below RAM, then below the ECAM, then below the MMIO window: the gap above the UART.
        assert_eq!(place_window(1 << 32, 16 * MIB, 2 * MIB, &taken), Some(0x0f00_0000));
        assert_eq!(place_window(1 << 32, 64 * MIB, 2 * MIB, &taken), Some(0x0c00_0000));
        // 256 MiB does not fit above the UART page, nor below it (0x0900_0000 < 256 MiB).
        assert_eq!(place_window(1 << 32, 256 * MIB, 2 * MIB, &taken), None);
    }

    #[test]
    fn alignment_and_edge_cases() {
        // A range ending exactly at the candidate's base is not in the way.
        assert_eq!(place_window(0x1000_0000, 0x100_0000, 0x100_0000, &[(0xf00_0000, 0x1000_0000)]), Some(0xe00_0000));
        assert_eq!(place_window(0x1000_0000, 0x100_0000, 0x100_0000, &[(0x100_0000, 0xf00_0000)]), Some(0xf00_0000));
        assert_eq!(place_window(0x1000_0000, 0x100_0000, 0x100_0000, &[(0x80_0000, 0x1000_0000)]), None);
        assert_eq!(place_window(0x1000, 0x2000, 0x1000, &[]), None);
        assert_eq!(place_window(1 << 32, 0, 0x1000, &[]), None);
        assert_eq!(place_window(1 << 32, 0x1000, 3, &[]), None);
        // Misaligned limit: the window ends below it.
        assert_eq!(place_window(0x1234_5678, 0x100_0000, 0x100_0000, &[]), Some(0x1100_0000));
    }
}
