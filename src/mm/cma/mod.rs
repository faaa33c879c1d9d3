//! Contiguous Memory Allocator (CMA), after Linux's mm/cma.c and kernel/dma/contiguous.c.
//!
//! A CMA area is a physically contiguous range set aside at boot and handed out in runs of pages
//! for devices that need large contiguous buffers. Without a page cache there is nothing to migrate
//! out of an area, so unlike Linux an area here is a plain carve-out that the page allocator never
//! uses ("reusable" does not apply).
//!
//! - [`area`]: [`CmaArea`], the allocator of one area: a bitmap with one bit per 2^order_per_bit
//!   pages, first fit from a next-fit hint, allocations aligned in physical address space up to
//!   [`CMA_ALIGNMENT_CAP_ORDER`], releases checked for pages outside the area and double releases,
//!   statistics and a text picture of the bitmap.
//! - [`placement`]: where a dynamically sized area goes in RAM (top-down below a limit, avoiding
//!   reservations, inside one bank), the minimum alignment and the default size.
//! - [`cmdline`]: the `cma=size[@start[-end]]` boot argument.
//! - [`setup`]: the areas of the running system, from the device tree and `cma=`, and which
//!   devices own one; in the kernel, the registry that keeps them.
//!
//! [`cma_alloc`] and [`cma_release`] are the Linux-shaped entry points.

pub mod area;
mod bitmap;
pub mod cmdline;
pub mod placement;
pub mod setup;

#[cfg(target_os = "none")]
mod ktests;

pub use area::{AreaName, CmaArea, CmaAreaError, CmaReleaseError, CmaStats};
pub use cmdline::{parse_cma, CmaCmdline, CmaCmdlineError};
pub use placement::{
    default_cma_size, place_area, AreaRequest, CmaRegion, MemoryLayout, PlacementError,
    CMA_DEFAULT_SIZE, CMA_MIN_ALIGNMENT,
};

use crate::mm::addr::PhysAddr;

/// Largest alignment order of a single allocation (Linux's CONFIG_CMA_ALIGNMENT default): 2^8
/// pages = 1 MiB with 4 KiB pages. Larger requested alignments are reduced to it.
pub const CMA_ALIGNMENT_CAP_ORDER: u32 = 8;

/// Allocates `count` pages from `area`, physically aligned to 2^min(align_order, 8) pages; `None`
/// if the area has no fitting free run (or `count` is 0).
pub fn cma_alloc(area: &CmaArea, count: u64, align_order: u32) -> Option<PhysAddr> {
    area.alloc(count, align_order)
}

/// Releases `count` pages at `pages` to `area`: `false` if they are not in the area (the caller
/// frees them elsewhere), `true` otherwise. See [`CmaArea::release_pages`].
pub fn cma_release(area: &CmaArea, pages: PhysAddr, count: u64) -> bool {
    area.release_pages(pages, count)
}
