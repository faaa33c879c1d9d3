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
    use super::place_window;
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
        space: BuddyAllocator<'static>,
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
        /// Pages taken by live areas, their guard pages included.
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
        let limit = 1u64 << arch::mmu::KERNEL_TABLES.va_bits;
        let taken = occupied(dt, map);
        let (base, size) = WINDOW_SIZES
            .iter()
            .find_map(|&size| place_window(limit, size, WINDOW_ALIGN, &taken).map(|b| (b, size)))
            .ok_or(VmapError::NoWindow)?;
        let pages = size / PAGE_SIZE;
        let words = buddy::metadata_words(PhysAddr(base), pages).map_err(|_| VmapError::NoWindow)?;
        let meta: &'static mut [u64] = alloc::vec![0u64; words].leak();
        let mut space = BuddyAllocator::new(PhysAddr(base), pages, meta).map_err(|_| VmapError::NoWindow)?;
        space.add_free_range(PhysAddr(base), pages).map_err(|_| VmapError::NoWindow)?;
        WINDOW.call_once(|| Mutex::new(Window { base, size, space, areas: 0 }));
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
        let va = w.space.alloc_pages(span).map_err(|e| match e {
            AllocError::OutOfMemory { .. } => VmapError::NoSpace { pages: span },
            _ => VmapError::BadSize { pages },
        })?;
        w.areas += 1;
        Ok(va.0 as usize)
    }

    #[inline(always)]
    fn give_space(va: usize, pages: u64) -> Result<(), VmapError> {
        let mut w = window()?.lock();
        w.space.free_pages(PhysAddr(va as u64), pages + 1).map_err(|e| match e {
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
                kmap::unmap(va as u64, i as u64 * PAGE_SIZE)?;
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
        kmap::unmap(area.va as u64, area.pages * PAGE_SIZE)?;
        give_space(area.va, area.pages)
    }

    /// Where the window is and how much of it is in use; `None` before [`init`].
    pub fn stats() -> Option<VmapStats> {
        let w = WINDOW.get()?.lock();
        let free = w.space.stats().free_pages;
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

#[cfg(test)]
mod tests {
    use super::*;

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
