//! IOMMUs: the Arm SMMUv3 driver ([`smmuv3`]) and the IOVA allocator ([`iova`]) that the dma-iommu
//! back end builds on.

pub mod iova;
pub mod smmuv3;
