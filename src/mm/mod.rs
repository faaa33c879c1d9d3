//! Physical memory: address types, the boot memory map, the page allocator, CMA, and the
//! long-descriptor page tables shared by the CPU MMU (both architectures) and the SMMU.

pub mod addr;
pub mod buddy;
pub mod cma;
pub mod memmap;
pub mod phys;
pub mod pgtable;
pub mod vmap;

#[cfg(target_os = "none")]
pub mod heap;
#[cfg(target_os = "none")]
pub mod kmap;
