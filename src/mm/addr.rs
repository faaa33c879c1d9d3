//! Address types. A physical address is what the CPU puts on the bus after translation; a device
//! (bus) address is what a DMA master puts on its bus (see `dma`). They are distinct types so that one
//! cannot be passed where the other is meant.

use core::fmt;

/// Size of a page and of the smallest translation granule, on both architectures and the SMMU.
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// A CPU physical address. 64 bits on both architectures: armv7 with LPAE has 40-bit physical
/// addresses.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct PhysAddr(pub u64);

impl PhysAddr {
    pub const fn new(a: u64) -> Self {
        PhysAddr(a)
    }
    pub const fn as_u64(self) -> u64 {
        self.0
    }
    pub const fn is_page_aligned(self) -> bool {
        self.0 & (PAGE_SIZE - 1) == 0
    }
    /// Page frame number.
    pub const fn pfn(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
    pub const fn from_pfn(pfn: u64) -> Self {
        PhysAddr(pfn << PAGE_SHIFT)
    }
    pub const fn checked_add(self, n: u64) -> Option<Self> {
        match self.0.checked_add(n) {
            Some(v) => Some(PhysAddr(v)),
            None => None,
        }
    }
}

impl fmt::Debug for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PA({:#x})", self.0)
    }
}

impl fmt::Display for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Round `v` up to a multiple of `align` (a power of two); `None` on overflow.
pub const fn align_up(v: u64, align: u64) -> Option<u64> {
    match v.checked_add(align - 1) {
        Some(x) => Some(x & !(align - 1)),
        None => None,
    }
}

/// Round `v` down to a multiple of `align` (a power of two).
pub const fn align_down(v: u64, align: u64) -> u64 {
    v & !(align - 1)
}
