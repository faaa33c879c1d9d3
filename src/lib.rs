//! dmakern: a small unikernel for aarch64 and armv7 that boots from a flattened device tree, reserves
//! CMA areas and implements Linux's three DMA-mapping back ends (dma-direct, dma-iommu, dma-remap).
//!
//! Layout: generic code per subsystem (`dt`, `mm`, `dma`, `iommu`, `drivers`, `ktest`), architecture
//! code under `arch/<arch>` behind the small interface in `arch/mod.rs`. Everything that is pure logic
//! (allocators, address maps, page-table encoding, device-tree walking) builds for the host, where
//! `cargo test` runs its unit tests; the rest exists only in the kernel build (`target_os = "none"`).

#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod bootargs;
pub mod dma;
pub mod drivers;
pub mod dt;
pub mod iommu;
pub mod irq;
pub mod mm;
pub mod sort;

#[cfg(target_os = "none")]
pub mod arch;
#[cfg(target_os = "none")]
pub mod bench;
#[cfg(target_os = "none")]
pub mod console;
#[cfg(target_os = "none")]
pub mod kernel;
#[cfg(target_os = "none")]
pub mod smp;
#[cfg(target_os = "none")]
pub mod stress;
pub mod ktest;
#[cfg(test)]
mod concurrency_tests;
