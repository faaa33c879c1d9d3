//! The public DMA API (Linux's include/linux/dma-mapping.h), on a [`Device`], with Linux's
//! semantics and Rust's types:
//!
//! - Coherent memory: [`Device::alloc_coherent`] returns a [`DmaCoherent`] holding the CPU
//!   pointer and the device address, freed on drop or by [`DmaCoherent::free`]. A device with a
//!   restricted DMA pool gets it from that pool and nowhere else.
//! - Streaming mappings of memory the caller owns: raw ([`Device::map_phys`],
//!   [`Device::map_page`], [`Device::unmap_phys`], [`Device::sync_for_cpu`],
//!   [`Device::sync_for_device`]), typed by direction ([`Device::map_single`] returning a
//!   [`DmaStream<D>`] that borrows the buffer and unmaps on drop), and scatter-gather lists
//!   ([`Device::map_sg`]).
//! - Masks: [`Device::set_mask`] / [`Device::set_coherent_mask`] refuse a mask under which the
//!   device could reach no usable memory.
//!
//! A device address is a [`DmaAddr`], never a `PhysAddr`; failures are [`DmaError`] values, never
//! a magic address (Linux's `DMA_MAPPING_ERROR`). The back end is chosen by the device's
//! [`Backend`](super::Backend).

use core::fmt;
use core::marker::PhantomData;
use core::ops::BitOr;

use super::bounce::BouncePool;
use super::busmap::DmaAddr;
use super::contiguous::ContiguousError;
use super::maint::{Direction, MaintError};
use super::swiotlb::SwiotlbError;
use super::Device;
use crate::mm::addr::PhysAddr;

/// Attributes of an allocation or mapping (Linux's `DMA_ATTR_*`). dma-direct gives them the
/// meaning it can without remapping; dma-remap and dma-iommu give them their full one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DmaAttrs(u32);

impl DmaAttrs {
    pub const NONE: DmaAttrs = DmaAttrs(0);
    /// Write-combined CPU mapping of a coherent buffer (dma-remap; dma-direct's mapping stays the
    /// linear map).
    pub const WRITE_COMBINE: DmaAttrs = DmaAttrs(1 << 0);
    /// The caller needs no CPU pointer: [`DmaCoherent::cpu_ptr`] is `None`.
    pub const NO_KERNEL_MAPPING: DmaAttrs = DmaAttrs(1 << 1);
    /// Physically contiguous memory (always the case with dma-direct).
    pub const FORCE_CONTIGUOUS: DmaAttrs = DmaAttrs(1 << 2);
    /// Single pages are enough (dma-iommu; dma-direct allocates contiguously anyway).
    pub const ALLOC_SINGLE_PAGES: DmaAttrs = DmaAttrs(1 << 3);
    /// No cache maintenance at map/unmap: the caller syncs explicitly.
    pub const SKIP_CPU_SYNC: DmaAttrs = DmaAttrs(1 << 4);

    pub const fn contains(self, other: DmaAttrs) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for DmaAttrs {
    type Output = DmaAttrs;

    fn bitor(self, rhs: DmaAttrs) -> DmaAttrs {
        DmaAttrs(self.0 | rhs.0)
    }
}

/// Why a DMA API call failed. Nothing was mapped or allocated by a failed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaError {
    /// A request for zero bytes.
    ZeroSize,
    /// No memory for a coherent buffer the device can reach.
    NoMemory(ContiguousError),
    /// The buffer is beyond the device's reach (mask or bus windows) and no bounce pool it can
    /// reach exists.
    Unreachable { phys: PhysAddr, size: u64, mask: u64 },
    /// The bounce pool refused the mapping (full, too large) or the unmap (not mapped).
    Bounce(SwiotlbError),
    /// The bounce pool lies beyond the device's reach too.
    PoolUnreachable { pool: PhysAddr, mask: u64 },
    /// A mask under which the device reaches neither RAM nor a bounce pool.
    MaskUnsupported { mask: u64, lowest: PhysAddr },
    /// A device address that does not belong to a live mapping of this device.
    NotMapped { dma: DmaAddr, size: u64 },
    /// Memory the CPU cannot address through its identity map (above 4 GiB on armv7).
    NotCpuAddressable { phys: PhysAddr, size: u64 },
    /// Cache maintenance refused the range.
    Maint(MaintError),
    /// A size or offset that overflows, or a sub-range outside its mapping.
    BadRange { offset: u64, size: u64, len: u64 },
    /// Pages freed to the wrong allocator, or a double free.
    Free,
    /// The atomic pool refused the allocation (exhausted, or too large) or the free.
    Pool(super::pool::PoolError),
    /// The vmap window refused to map or unmap the buffer.
    Remap(crate::mm::vmap::VmapError),
    /// dma-debug refused a misuse of the API (and reported it).
    Debug(super::debug_track::ReportKind),
    /// The device's IOVA space has no room below its mask, or refused a free.
    Iova(crate::iommu::iova::IovaError),
    /// The IOMMU's page tables or command queue refused the change (reported when it happened).
    IoTables,
}

impl fmt::Display for DmaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DmaError::ZeroSize => f.write_str("DMA request of 0 bytes"),
            DmaError::NoMemory(e) => write!(f, "no memory for a coherent buffer: {e}"),
            DmaError::Unreachable { phys, size, mask } => {
                write!(f, "buffer {phys} + {size:#x} is beyond the device's DMA mask {mask:#x} and no bounce pool is available")
            }
            DmaError::Bounce(e) => write!(f, "bounce buffer: {e}"),
            DmaError::PoolUnreachable { pool, mask } => {
                write!(f, "the bounce pool at {pool} is beyond the device's DMA mask {mask:#x}")
            }
            DmaError::MaskUnsupported { mask, lowest } => {
                write!(f, "DMA mask {mask:#x} reaches neither RAM (lowest usable address {lowest}) nor a bounce pool")
            }
            DmaError::NotMapped { dma, size } => write!(f, "{dma} + {size:#x} is not a live mapping of this device"),
            DmaError::NotCpuAddressable { phys, size } => write!(f, "{phys} + {size:#x} is not addressable by the CPU"),
            DmaError::Maint(e) => write!(f, "cache maintenance: {e}"),
            DmaError::BadRange { offset, size, len } => {
                write!(f, "range {offset:#x} + {size:#x} does not fit in a mapping of {len:#x} bytes")
            }
            DmaError::Free => f.write_str("the buffer's pages were refused by their allocator"),
            DmaError::Pool(e) => write!(f, "atomic pool: {e}"),
            DmaError::Remap(e) => write!(f, "remapping: {e}"),
            DmaError::Debug(kind) => write!(f, "refused by dma-debug: {kind:?}"),
            DmaError::Iova(e) => write!(f, "IOVA: {e}"),
            DmaError::IoTables => f.write_str("the IOMMU refused the mapping change (see the report above)"),
        }
    }
}

/// Checks that `offset .. offset + size` lies inside `0 .. len`.
pub fn check_subrange(offset: u64, size: u64, len: u64) -> Result<(), DmaError> {
    match offset.checked_add(size) {
        Some(end) if end <= len => Ok(()),
        _ => Err(DmaError::BadRange { offset, size, len }),
    }
}

/// A direction known at compile time, for [`DmaStream`].
pub trait DmaDir {
    const DIR: Direction;
}

/// The device reads the buffer.
pub struct ToDevice;
/// The device writes the buffer.
pub struct FromDevice;
/// The device reads and writes the buffer.
pub struct Bidirectional;

impl DmaDir for ToDevice {
    const DIR: Direction = Direction::ToDevice;
}
impl DmaDir for FromDevice {
    const DIR: Direction = Direction::FromDevice;
}
impl DmaDir for Bidirectional {
    const DIR: Direction = Direction::Bidirectional;
}

/// One segment of a scatter-gather list: the caller fills `phys` and `len`; [`Device::map_sg`]
/// fills `dma` (dma-direct maps segment by segment, without merging).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgEntry {
    pub phys: PhysAddr,
    pub len: u64,
    pub dma: Option<DmaAddr>,
}

impl SgEntry {
    pub const fn new(phys: PhysAddr, len: u64) -> SgEntry {
        SgEntry { phys, len, dma: None }
    }
}

/// A coherent buffer: memory both the CPU and the device see without cache maintenance, at
/// [`DmaCoherent::cpu_ptr`] for the CPU and [`DmaCoherent::dma_addr`] for the device. Zeroed when
/// allocated. Freed on drop (a refusal is printed) or by [`DmaCoherent::free`].
///
/// For a device with a restricted DMA pool the buffer lies in that pool (see [`super::bounce`]).
///
/// For a non-coherent device the CPU pointer is an uncached mapping made by dma-remap
/// ([`super::remap`]): a window alias, the linear map changed in place, or the atomic pool.
pub struct DmaCoherent<'d> {
    pub(super) dev: &'d Device,
    pub(super) raw: Option<CoherentRaw>,
}

/// What a back end hands out for a coherent buffer, and takes back.
#[derive(Debug, PartialEq, Eq)]
pub struct CoherentRaw {
    pub mem: CoherentMem,
    pub dma: DmaAddr,
    pub size: u64,
    pub attrs: DmaAttrs,
    pub cpu: super::remap::CpuView,
}

/// The memory behind a coherent buffer and the allocator it goes back to.
#[derive(Debug)]
pub enum CoherentMem {
    /// Pages of CMA or the page allocator (`dma_alloc_contiguous`).
    Pages(super::contiguous::ContiguousPages),
    /// `bytes` bytes at `phys` of the device's restricted pool ([`BouncePool::alloc`]).
    Pool { pool: &'static BouncePool, phys: PhysAddr, bytes: u64 },
    /// Pages of the atomic pool ([`super::pool`]).
    AtomicPool(super::pool::PoolBuffer),
    /// Single pages from the page allocator, in the order the device sees them (dma-iommu maps
    /// them contiguously in IOVA space).
    Scattered(alloc::vec::Vec<PhysAddr>),
}

impl CoherentRaw {
    /// The CPU's pointer to the buffer, as [`DmaCoherent::cpu_ptr`] gives it.
    pub fn cpu_ptr(&self) -> Option<core::ptr::NonNull<u8>> {
        use super::remap::CpuView;
        let va = match &self.cpu {
            CpuView::Linear | CpuView::InPlace => usize::try_from(self.mem.phys().0).ok()?,
            CpuView::Window(area) => area.addr(),
            CpuView::Pool(va) => *va,
            CpuView::Hidden => return None,
        };
        core::ptr::NonNull::new(va as *mut u8)
    }
}

impl CoherentMem {
    /// Physical address of the first byte.
    pub fn phys(&self) -> PhysAddr {
        match self {
            CoherentMem::Pages(p) => p.phys,
            CoherentMem::Pool { phys, .. } => *phys,
            CoherentMem::AtomicPool(b) => b.phys,
            CoherentMem::Scattered(l) => l.first().copied().unwrap_or(PhysAddr(0)),
        }
    }
}

impl PartialEq for CoherentMem {
    fn eq(&self, other: &CoherentMem) -> bool {
        match (self, other) {
            (CoherentMem::Pages(a), CoherentMem::Pages(b)) => a == b,
            (CoherentMem::Pool { pool: p, phys: a, bytes: m }, CoherentMem::Pool { pool: q, phys: b, bytes: n }) => {
                core::ptr::eq(*p, *q) && a == b && m == n
            }
            (CoherentMem::AtomicPool(a), CoherentMem::AtomicPool(b)) => a == b,
            (CoherentMem::Scattered(a), CoherentMem::Scattered(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for CoherentMem {}

impl DmaCoherent<'_> {
    /// The device the buffer belongs to.
    pub fn device(&self) -> &Device {
        self.dev
    }

    /// The device address of the first byte.
    pub fn dma_addr(&self) -> DmaAddr {
        self.raw.as_ref().map_or(DmaAddr(0), |r| r.dma)
    }

    /// Bytes requested.
    pub fn size(&self) -> u64 {
        self.raw.as_ref().map_or(0, |r| r.size)
    }

    /// Physical address of the first byte.
    pub fn phys(&self) -> PhysAddr {
        self.raw.as_ref().map_or(PhysAddr(0), |r| r.mem.phys())
    }

    /// The CPU's pointer to the buffer; `None` with [`DmaAttrs::NO_KERNEL_MAPPING`]. For a
    /// non-coherent device it is an uncached mapping (see [`super::remap`]).
    pub fn cpu_ptr(&self) -> Option<core::ptr::NonNull<u8>> {
        self.raw.as_ref()?.cpu_ptr()
    }


    /// The buffer as a byte slice for the CPU; `None` with [`DmaAttrs::NO_KERNEL_MAPPING`].
    pub fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        let len = usize::try_from(self.size()).ok()?;
        let p = self.cpu_ptr()?;
        // SAFETY: the buffer is `len` bytes of RAM mapped at its physical address, owned by this
        // value until it is freed; `&mut self` makes this the only CPU reference to it.
        Some(unsafe { core::slice::from_raw_parts_mut(p.as_ptr(), len) })
    }
}

/// A streaming mapping of a borrowed buffer in direction `D`: the device may access the buffer
/// at [`DmaStream::dma_addr`] until the mapping is unmapped ([`DmaStream::unmap`], or drop, which
/// prints a refusal). The CPU sees the device's writes only after [`DmaStream::sync_for_cpu`] or
/// the unmap.
pub struct DmaStream<'d, 'b, D: DmaDir> {
    pub(super) dev: &'d Device,
    pub(super) buf: &'b mut [u8],
    pub(super) dma: DmaAddr,
    /// Streams are only created by the kernel build; the host build sees the field unread.
    #[cfg_attr(not(target_os = "none"), allow(dead_code))]
    pub(super) live: bool,
    pub(super) dir: PhantomData<D>,
}

impl<D: DmaDir> DmaStream<'_, '_, D> {
    pub fn dma_addr(&self) -> DmaAddr {
        self.dma
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Whether the mapping goes through a bounce buffer.
    pub fn is_bounced(&self) -> bool {
        self.dev.bus_map().bus_to_phys(self.dma, 1).is_some_and(|p| p.0 != self.buf.as_ptr() as u64)
    }

    /// The buffer as the CPU sees it: current after [`DmaStream::sync_for_cpu`].
    pub fn cpu_buffer(&mut self) -> &mut [u8] {
        self.buf
    }
}

#[cfg(target_os = "none")]
pub use kernel::DMA_MAPPING_ERROR;

#[cfg(target_os = "none")]
mod kernel {
    use super::*;
    use crate::dma::debug;
    use crate::dma::debug_track::{Caller, MapKind};
    use crate::dma::{direct, iommu, remap, Backend, GfpFlags};
    use crate::println;
    use alloc::collections::BTreeMap;
    use core::panic::Location;
    use spin::Mutex;

    /// Linux's `DMA_MAPPING_ERROR`: what [`Device::dma_map_single`] returns on failure.
    pub const DMA_MAPPING_ERROR: DmaAddr = DmaAddr(u64::MAX);

    /// Coherent buffers handed out by [`Device::dma_alloc_coherent`], by (device, device address),
    /// until [`Device::dma_free_coherent`] names them.
    static RAW_COHERENT: Mutex<BTreeMap<(u32, u64), CoherentRaw>> = Mutex::new(BTreeMap::new());

    impl Device {
        /// `size` bytes of zeroed coherent memory the device reaches under its coherent mask.
        /// `gfp` says whether the call may block (CMA is tried only then; a non-coherent device
        /// then gets the atomic pool). For a device with a restricted DMA pool the memory comes
        /// from that pool only: a full pool is an error.
        #[track_caller]
        pub fn alloc_coherent(&self, size: u64, gfp: GfpFlags, attrs: DmaAttrs) -> Result<DmaCoherent<'_>, DmaError> {
            // The atomic pool's buffers are described right here, in the value returned: through
            // the back ends' by-value results the description would be copied three times, more
            // than the pool's allocation costs.
            if let Backend::Direct = self.backend() {
                if let Some(r) = direct::alloc_atomic(self, size, gfp) {
                    let (pooled, dma) = r?;
                    if debug::enabled() {
                        // The buffer's CPU pointer is the pool's mapping.
                        debug_allocated(self, pooled.cpu as u64, dma, size, Location::caller());
                    }
                    return Ok(DmaCoherent { dev: self, raw: Some(remap::pool_raw(pooled, dma, size, attrs)) });
                }
                // A coherent device's pages in the linear map, likewise.
                if let Some(r) = direct::alloc_linear(self, size, gfp) {
                    let (pages, dma) = r?;
                    if debug::enabled() {
                        debug_allocated(self, direct::linear_cpu(pages.phys, attrs), dma, size, Location::caller());
                    }
                    return Ok(DmaCoherent { dev: self, raw: Some(direct::linear_raw(pages, dma, size, attrs)) });
                }
            }
            self.alloc_coherent_moved(size, gfp, attrs, Location::caller())
        }

        /// [`Device::alloc_coherent`] of the buffers it does not describe in place; out of line,
        /// so that the paths there stay small.
        #[inline(never)]
        fn alloc_coherent_moved(&self, size: u64, gfp: GfpFlags, attrs: DmaAttrs, caller: Caller) -> Result<DmaCoherent<'_>, DmaError> {
            let raw = match self.backend() {
                Backend::Direct => direct::alloc(self, size, gfp, attrs)?,
                Backend::Iommu(d) => iommu::alloc(self, d, size, gfp, attrs)?,
            };
            let buf = DmaCoherent { dev: self, raw: Some(raw) };
            if debug::enabled() {
                debug_allocated(self, buf.cpu_ptr().map_or(0, |p| p.as_ptr() as u64), buf.dma_addr(), size, caller);
            }
            Ok(buf)
        }

        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        fn map_as(&self, phys: PhysAddr, size: u64, dir: Direction, attrs: DmaAttrs, kind: MapKind, checked: bool, caller: Caller) -> Result<DmaAddr, DmaError> {
            let dma = match self.backend() {
                Backend::Direct => direct::map(self, phys, size, dir, attrs)?,
                Backend::Iommu(d) => iommu::map(self, d, phys, size, dir, attrs)?,
            };
            if debug::enabled() {
                debug::mapped(self, phys, dma, size, dir, kind, checked, caller);
            }
            Ok(dma)
        }

        #[inline(always)]
        fn unmap_as(&self, dma: DmaAddr, size: u64, dir: Direction, attrs: DmaAttrs, kind: MapKind, caller: Caller) -> Result<(), DmaError> {
            if debug::enabled() {
                debug::unmapping(self, dma, size, dir, kind, caller)?;
            }
            match self.backend() {
                Backend::Direct => direct::unmap(self, dma, size, dir, attrs),
                Backend::Iommu(d) => iommu::unmap(self, d, dma, size, dir, attrs),
            }
        }

        /// Maps `phys .. phys + size`, memory the caller owns until the unmap, for the device in
        /// direction `dir`; returns the device address (possibly of a bounce buffer). End it with
        /// [`Device::unmap_phys`].
        #[inline(always)]
        #[track_caller]
        pub fn map_phys(&self, phys: PhysAddr, size: u64, dir: Direction, attrs: DmaAttrs) -> Result<DmaAddr, DmaError> {
            self.map_as(phys, size, dir, attrs, MapKind::Single, true, Location::caller())
        }

        /// Maps `size` bytes at `offset` into the pages starting at `page` (Linux's
        /// `dma_map_page`). End it with [`Device::unmap_page`].
        #[track_caller]
        pub fn map_page(&self, page: PhysAddr, offset: u64, size: u64, dir: Direction, attrs: DmaAttrs) -> Result<DmaAddr, DmaError> {
            let phys = page.checked_add(offset).ok_or(DmaError::BadRange { offset, size, len: 0 })?;
            self.map_as(phys, size, dir, attrs, MapKind::Page, true, Location::caller())
        }

        /// Ends a mapping made by [`Device::map_phys`] with the same size and direction.
        #[inline(always)]
        #[track_caller]
        pub fn unmap_phys(&self, dma: DmaAddr, size: u64, dir: Direction, attrs: DmaAttrs) -> Result<(), DmaError> {
            self.unmap_as(dma, size, dir, attrs, MapKind::Single, Location::caller())
        }

        /// Ends a mapping made by [`Device::map_page`] with the same size and direction.
        #[track_caller]
        pub fn unmap_page(&self, dma: DmaAddr, size: u64, dir: Direction, attrs: DmaAttrs) -> Result<(), DmaError> {
            self.unmap_as(dma, size, dir, attrs, MapKind::Page, Location::caller())
        }

        /// Linux's `dma_map_single` for code written against the C API: the device address, or
        /// [`DMA_MAPPING_ERROR`] on failure, which the caller must test with
        /// [`Device::dma_mapping_error`] (dma-debug reports an unmap of a mapping never tested).
        /// Prefer [`Device::map_phys`], whose `Result` cannot be ignored.
        #[track_caller]
        pub fn dma_map_single(&self, phys: PhysAddr, size: u64, dir: Direction) -> DmaAddr {
            self.map_as(phys, size, dir, DmaAttrs::NONE, MapKind::Single, false, Location::caller()).unwrap_or(DMA_MAPPING_ERROR)
        }

        /// Whether `dma`, from [`Device::dma_map_single`], is the error value; records that the
        /// caller checked.
        pub fn dma_mapping_error(&self, dma: DmaAddr) -> bool {
            if dma == DMA_MAPPING_ERROR {
                return true;
            }
            if debug::enabled() {
                debug::checked(self, dma);
            }
            false
        }

        /// Linux's `dma_alloc_coherent` for code written against the C API: the CPU pointer and
        /// device address of a zeroed coherent buffer, to be given back with
        /// [`Device::dma_free_coherent`] and the same size and addresses. Prefer
        /// [`Device::alloc_coherent`], whose handle frees itself.
        #[track_caller]
        pub fn dma_alloc_coherent(&self, size: u64, gfp: GfpFlags) -> Result<(core::ptr::NonNull<u8>, DmaAddr), DmaError> {
            let mut buf = self.alloc_coherent(size, gfp, DmaAttrs::NONE)?;
            let cpu = buf.cpu_ptr().ok_or(DmaError::NotCpuAddressable { phys: buf.phys(), size })?;
            let dma = buf.dma_addr();
            let raw = buf.raw.take().ok_or(DmaError::Free)?;
            RAW_COHERENT.lock().insert((self.id(), dma.0), raw);
            Ok((cpu, dma))
        }

        /// Frees a buffer of [`Device::dma_alloc_coherent`]. A size or CPU address other than the
        /// allocation's, or an address that is not a live allocation of this device, is refused
        /// and changes nothing (and dma-debug reports it).
        #[track_caller]
        pub fn dma_free_coherent(&self, size: u64, cpu: core::ptr::NonNull<u8>, dma: DmaAddr) -> Result<(), DmaError> {
            let cpu = cpu.as_ptr() as u64;
            if debug::enabled() {
                debug::freeing(self, Some(cpu), dma, size, Location::caller())?;
            }
            let raw = {
                let mut live = RAW_COHERENT.lock();
                let key = (self.id(), dma.0);
                let raw = live.get(&key).ok_or(DmaError::NotMapped { dma, size })?;
                if raw.size != size || raw.cpu_ptr().is_none_or(|p| p.as_ptr() as u64 != cpu) {
                    return Err(DmaError::BadRange { offset: 0, size, len: raw.size });
                }
                live.remove(&key).ok_or(DmaError::NotMapped { dma, size })?
            };
            self.free_raw(raw)
        }

        /// Gives a coherent buffer back to the back end that made it.
        #[inline(always)]
        fn free_raw(&self, raw: CoherentRaw) -> Result<(), DmaError> {
            match self.backend() {
                Backend::Direct => direct::free(self, raw),
                Backend::Iommu(d) => iommu::free(self, d, raw),
            }
        }

        /// The device goes away: dma-debug reports every mapping and coherent buffer it still
        /// holds (a leak) and forgets them. Returns how many there were (0 without dma-debug).
        #[track_caller]
        pub fn teardown(&self) -> usize {
            if debug::enabled() {
                debug::teardown(self, Location::caller())
            } else {
                0
            }
        }

        /// Gives `dma .. dma + size` (all or part of a live mapping) back to the CPU: the device's
        /// writes become visible.
        #[track_caller]
        pub fn sync_for_cpu(&self, dma: DmaAddr, size: u64, dir: Direction) -> Result<(), DmaError> {
            if debug::enabled() {
                debug::syncing(self, dma, size, dir, true, Location::caller())?;
            }
            match self.backend() {
                Backend::Direct => direct::sync_for_cpu(self, dma, size, dir),
                Backend::Iommu(d) => iommu::sync_for_cpu(self, d, dma, size, dir),
            }
        }

        /// Gives `dma .. dma + size` (all or part of a live mapping) to the device again: the
        /// CPU's writes become visible to it.
        #[track_caller]
        pub fn sync_for_device(&self, dma: DmaAddr, size: u64, dir: Direction) -> Result<(), DmaError> {
            if debug::enabled() {
                debug::syncing(self, dma, size, dir, false, Location::caller())?;
            }
            match self.backend() {
                Backend::Direct => direct::sync_for_device(self, dma, size, dir)?,
                Backend::Iommu(d) => iommu::sync_for_device(self, d, dma, size, dir)?,
            }
            if debug::enabled() {
                debug::synced_for_device(self, dma, Location::caller());
            }
            Ok(())
        }

        /// Maps `buf` in direction `D` for as long as the returned stream lives.
        #[track_caller]
        pub fn map_single<'b, D: DmaDir>(&self, buf: &'b mut [u8]) -> Result<DmaStream<'_, 'b, D>, DmaError> {
            let dma = self.map_phys(PhysAddr(buf.as_ptr() as u64), buf.len() as u64, D::DIR, DmaAttrs::NONE)?;
            Ok(DmaStream { dev: self, buf, dma, live: true, dir: PhantomData })
        }

        /// Maps every segment of `sg` in direction `dir`, filling their `dma`; returns the number
        /// of segments mapped (all of them). On an error the segments already mapped are unmapped
        /// again and every `dma` is `None`.
        #[track_caller]
        pub fn map_sg(&self, sg: &mut [SgEntry], dir: Direction, attrs: DmaAttrs) -> Result<usize, DmaError> {
            let caller = Location::caller();
            if let Backend::Iommu(d) = self.backend() {
                let merged = iommu::map_sg(self, d, sg, dir, attrs)?;
                if debug::enabled() {
                    for e in sg.iter() {
                        if let Some(dma) = e.dma {
                            debug::mapped(self, e.phys, dma, e.len, dir, MapKind::Sg, true, caller);
                        }
                    }
                }
                return Ok(merged);
            }
            for i in 0..sg.len() {
                match self.map_as(sg[i].phys, sg[i].len, dir, attrs, MapKind::Sg, true, caller) {
                    Ok(d) => sg[i].dma = Some(d),
                    Err(e) => {
                        let _ = self.unmap_sg(&mut sg[..i], dir, attrs);
                        return Err(e);
                    }
                }
            }
            Ok(sg.len())
        }

        /// Unmaps the segments of `sg` that are mapped; the first error is returned after all
        /// segments were tried.
        #[track_caller]
        pub fn unmap_sg(&self, sg: &mut [SgEntry], dir: Direction, attrs: DmaAttrs) -> Result<(), DmaError> {
            let caller = Location::caller();
            if let Backend::Iommu(d) = self.backend() {
                if debug::enabled() {
                    for e in sg.iter() {
                        if let Some(dma) = e.dma {
                            debug::unmapping(self, dma, e.len, dir, MapKind::Sg, caller)?;
                        }
                    }
                }
                return iommu::unmap_sg(self, d, sg, dir, attrs);
            }
            let mut first = Ok(());
            for e in sg.iter_mut() {
                if let Some(d) = e.dma.take() {
                    let r = self.unmap_as(d, e.len, dir, attrs, MapKind::Sg, caller);
                    if first.is_ok() {
                        first = r;
                    }
                }
            }
            first
        }

        /// [`Device::sync_for_cpu`] of every mapped segment.
        #[track_caller]
        pub fn sync_sg_for_cpu(&self, sg: &[SgEntry], dir: Direction) -> Result<(), DmaError> {
            sg.iter().filter_map(|e| e.dma.map(|d| (d, e.len))).try_for_each(|(d, l)| self.sync_for_cpu(d, l, dir))
        }

        /// [`Device::sync_for_device`] of every mapped segment.
        #[track_caller]
        pub fn sync_sg_for_device(&self, sg: &[SgEntry], dir: Direction) -> Result<(), DmaError> {
            sg.iter().filter_map(|e| e.dma.map(|d| (d, e.len))).try_for_each(|(d, l)| self.sync_for_device(d, l, dir))
        }

        /// Sets the streaming mask; refused (and unchanged) if the device could reach neither RAM
        /// nor its bounce pool under it.
        pub fn set_mask(&mut self, mask: u64) -> Result<(), DmaError> {
            match self.backend() {
                Backend::Direct => direct::mask_supported(self, mask)?,
                Backend::Iommu(d) => iommu::mask_supported(d, mask)?,
            }
            self.store_mask(mask);
            Ok(())
        }

        /// Sets the coherent mask; refused (and unchanged) like [`Device::set_mask`].
        pub fn set_coherent_mask(&mut self, mask: u64) -> Result<(), DmaError> {
            match self.backend() {
                Backend::Direct => direct::mask_supported(self, mask)?,
                Backend::Iommu(d) => iommu::mask_supported(d, mask)?,
            }
            self.store_coherent_mask(mask);
            Ok(())
        }

        /// Both masks (Linux's `dma_set_mask_and_coherent`).
        pub fn set_mask_and_coherent(&mut self, mask: u64) -> Result<(), DmaError> {
            self.set_mask(mask)?;
            self.set_coherent_mask(mask)
        }
    }

    impl DmaCoherent<'_> {
        /// Frees the buffer; an allocator's refusal is returned.
        #[track_caller]
        pub fn free(self) -> Result<(), DmaError> {
            // A release that succeeded leaves nothing for `Drop` to do: skipping it saves a
            // second release and the drop of the description. After a refusal `Drop` runs as it
            // would have (and dma-debug's refusal is met again there).
            let mut this = core::mem::ManuallyDrop::new(self);
            let r = this.release(Location::caller());
            if r.is_err() {
                drop(core::mem::ManuallyDrop::into_inner(this));
            }
            r
        }

        /// Gives the buffer back to its back end. After `Ok` the description may still be in
        /// `self.raw` (a buffer freed in place, whose description owns nothing to drop), so this
        /// is the value's last use: [`DmaCoherent::free`] skips `Drop` then, and `Drop` is the end.
        fn release(&mut self, caller: Caller) -> Result<(), DmaError> {
            let Some(raw) = self.raw.as_ref() else { return Ok(()) };
            if debug::enabled() {
                debug_freeing(self.dev, raw, caller)?;
            }
            // The atomic pool's buffers and linear pages are freed without moving the description
            // out of `self` (a copy that would cost a third of the atomic pool's free).
            if let Backend::Direct = self.dev.backend() {
                if let Some(r) = direct::free_in_place(self.dev, raw) {
                    if r.is_err() {
                        self.raw = None;
                    }
                    return r;
                }
            }
            self.release_moved()
        }

        /// [`DmaCoherent::release`] of the buffers the back end takes by value; out of line, so
        /// that the atomic pool's path stays small.
        #[inline(never)]
        fn release_moved(&mut self) -> Result<(), DmaError> {
            match self.raw.take() {
                None => Ok(()),
                Some(raw) => self.dev.free_raw(raw),
            }
        }
    }

    /// dma-debug's record of a coherent allocation, out of line like [`debug_freeing`].
    #[cold]
    #[inline(never)]
    fn debug_allocated(dev: &Device, cpu: u64, dma: DmaAddr, size: u64, caller: Caller) {
        debug::allocated(dev, cpu, dma, size, caller);
    }

    /// dma-debug's check of a coherent free, out of line: off, it is one test on the fast path.
    #[cold]
    #[inline(never)]
    fn debug_freeing(dev: &Device, raw: &CoherentRaw, caller: Caller) -> Result<(), DmaError> {
        let cpu = raw.cpu_ptr().map(|p| p.as_ptr() as u64);
        debug::freeing(dev, Some(cpu.unwrap_or(0)), raw.dma, raw.size, caller)
    }

    impl Drop for DmaCoherent<'_> {
        fn drop(&mut self) {
            if let Err(e) = self.release(Location::caller()) {
                println!("dma: {}: freeing a coherent buffer: {e}", self.dev);
            }
        }
    }

    impl<D: DmaDir> DmaStream<'_, '_, D> {
        /// Syncs `offset .. offset + size` of the buffer for the CPU.
        pub fn sync_for_cpu(&mut self, offset: usize, size: usize) -> Result<(), DmaError> {
            check_subrange(offset as u64, size as u64, self.buf.len() as u64)?;
            self.dev.sync_for_cpu(DmaAddr(self.dma.0 + offset as u64), size as u64, D::DIR)
        }

        /// Syncs `offset .. offset + size` of the buffer for the device.
        pub fn sync_for_device(&mut self, offset: usize, size: usize) -> Result<(), DmaError> {
            check_subrange(offset as u64, size as u64, self.buf.len() as u64)?;
            self.dev.sync_for_device(DmaAddr(self.dma.0 + offset as u64), size as u64, D::DIR)
        }

        /// Ends the mapping and hands the buffer back to the CPU.
        #[track_caller]
        pub fn unmap(mut self) -> Result<(), DmaError> {
            self.live = false;
            self.dev.unmap_phys(self.dma, self.buf.len() as u64, D::DIR, DmaAttrs::NONE)
        }
    }

    impl<D: DmaDir> Drop for DmaStream<'_, '_, D> {
        fn drop(&mut self) {
            if self.live {
                if let Err(e) = self.dev.unmap_phys(self.dma, self.buf.len() as u64, D::DIR, DmaAttrs::NONE) {
                    println!("dma: {}: unmapping a stream: {e}", self.dev);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_and_ranges() {
        let a = DmaAttrs::WRITE_COMBINE | DmaAttrs::SKIP_CPU_SYNC;
        assert!(a.contains(DmaAttrs::SKIP_CPU_SYNC) && a.contains(DmaAttrs::WRITE_COMBINE));
        assert!(!a.contains(DmaAttrs::NO_KERNEL_MAPPING));
        assert!(DmaAttrs::NONE.contains(DmaAttrs::NONE));
        assert_eq!(check_subrange(0, 4096, 4096), Ok(()));
        assert_eq!(check_subrange(4095, 1, 4096), Ok(()));
        assert!(check_subrange(4095, 2, 4096).is_err());
        assert!(check_subrange(u64::MAX, 2, u64::MAX).is_err());
        assert_eq!(<FromDevice as DmaDir>::DIR, Direction::FromDevice);
    }

    #[test]
    fn errors_read_well() {
        let e = DmaError::MaskUnsupported { mask: 0x0fff_ffff, lowest: PhysAddr(0x4000_0000) };
        assert_eq!(
            e.to_string(),
            "DMA mask 0xfffffff reaches neither RAM (lowest usable address 0x40000000) nor a bounce pool"
        );
        let e = DmaError::Unreachable { phys: PhysAddr(0x4000_0000), size: 0x1000, mask: 0x0fff_ffff };
        assert!(e.to_string().contains("beyond the device's DMA mask 0xfffffff"));
    }
}
