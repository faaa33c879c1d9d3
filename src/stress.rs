//! The stress run, bootarg `stress=N` (N operations per CPU) or `stress=Ns` (N seconds of virtual
//! time): every online CPU at once issues random DMA work against every back end present, with
//! dma-debug on if the boot asked for it:
//!
//! - coherent allocations of random size, blocking or not, for a coherent and a non-coherent
//!   device (dma-direct, dma-remap under the boot's strategy, the atomic pool), each written
//!   through its CPU pointer and read back through the memory the device sees;
//! - streaming maps of random size, offset and direction, single and scatter-gather, for a
//!   coherent device, a non-coherent one and one that reaches only the swiotlb pool (every map
//!   bounces), with partial syncs; the test plays the device on the bus side (reads what the
//!   device would read, writes what it would write) and checks what the CPU sees after the sync
//!   or the unmap, byte for byte;
//! - the same streaming and coherent work for a device behind the SMMU (dma-iommu, a domain on
//!   an unused StreamID), when the machine has one, the device's view read through its domain's
//!   page table as the SMMU would;
//! - transfers through QEMU's `edu` DMA engine (a real bus master, itself behind the SMMU when
//!   there is one), one CPU at a time, when the machine has one.
//!
//! At the end every counter must be back at its value before the run: pages free in the page
//! allocator, CMA pages used, swiotlb slots used, vmap areas, atomic-pool pages, IOVA space in
//! use, and dma-debug's live mappings and coherent buffers. The suite `stress` reports the operation count and the
//! time, and fails on any data mismatch, DMA error or leaked resource.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use spin::Mutex;

use crate::dma::api::{DmaAttrs, SgEntry};
use crate::dma::bounce::platform_pool;
use crate::dma::busmap::{BusMap, DmaAddr, Window};
use crate::dma::maint::Direction;
use crate::dma::{Backend, Device, GfpFlags};
use crate::drivers::edu::{configured_mask, Edu, EduDir, BUF_LEN};
use crate::mm::addr::PhysAddr;
use crate::smp::MAX_CPUS;

/// How long the run goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// Operations per CPU.
    Ops(u64),
    /// Nanoseconds of virtual time.
    Nanos(u64),
}

impl Bound {
    /// `stress=N` or `stress=Ns`; `None` for anything else (reported by the caller).
    pub fn parse(v: &str) -> Option<Bound> {
        match v.strip_suffix('s') {
            Some(secs) => secs.parse::<u64>().ok().filter(|&s| s > 0 && s <= 3600).map(|s| Bound::Nanos(s * 1_000_000_000)),
            None => v.parse::<u64>().ok().filter(|&n| n > 0).map(Bound::Ops),
        }
    }
}

/// A small xorshift generator per CPU: the run is reproducible for a given CPU count.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The devices every CPU uses.
struct Devices {
    coherent: Device,
    noncoherent: Device,
    bounce: Option<Device>,
    /// Behind the SMMU, when the machine has one (a domain on an unused StreamID).
    iommu: Option<Device>,
}

static DEVICES: spin::Once<Devices> = spin::Once::new();
static EDU: Mutex<Option<Edu>> = Mutex::new(None);
static BOUND: spin::Once<Bound> = spin::Once::new();
static OPS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static FAILED: AtomicBool = AtomicBool::new(false);
static FIRST_FAILURE: Mutex<Option<String>> = Mutex::new(None);

fn fail(msg: String) {
    FAILED.store(true, Ordering::Release);
    let mut f = FIRST_FAILURE.lock();
    if f.is_none() {
        *f = Some(msg);
    }
}

/// A heap buffer that owns its cache lines (Linux's ARCH_DMA_MINALIGN for kmalloc): aligned to
/// and sized in whole lines, so no other CPU's data shares a line with it. Buffers that do not are
/// a DMA bug, which dma-debug reports (two from-device mappings in one line).
struct LineBuf {
    ptr: core::ptr::NonNull<u8>,
    layout: core::alloc::Layout,
    len: usize,
}

impl LineBuf {
    fn new(len: usize) -> Result<LineBuf, String> {
        let line = crate::arch::cache::line_size().max(1);
        let layout = core::alloc::Layout::from_size_align(len.div_ceil(line).max(1) * line, line).map_err(|_| "bad buffer layout")?;
        // SAFETY: a non-zero size (at least one line).
        let ptr = core::ptr::NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) }).ok_or("heap exhausted")?;
        Ok(LineBuf { ptr, layout, len })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes of our own allocation, borrowed through `&mut self`.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for LineBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u64).wrapping_mul(0x9e37_79b9).wrapping_add(seed) as u8 ^ (i >> 7) as u8).collect()
}

/// The physical address a device's access to `dma` reaches: through its bus map (dma-direct) or
/// its IOMMU domain's page table (dma-iommu), as the hardware would translate it.
fn device_phys(dev: &Device, dma: u64) -> Option<PhysAddr> {
    match dev.backend() {
        Backend::Direct => dev.bus_map().bus_to_phys(DmaAddr(dma), 1),
        Backend::Iommu(d) => d.domain().translate(dma).map(|t| t.pa),
    }
}

/// Plays the device: `f` on each run of bytes the device reaches at `dma .. dma + len`, page by
/// page (an IOVA range may map scattered pages), with the offset into the range.
///
/// # Safety
/// `dma .. dma + len` is a live mapping of `dev` onto identity-mapped RAM the test may access.
unsafe fn device_access(dev: &Device, dma: DmaAddr, len: usize, mut f: impl FnMut(usize, &mut [u8])) -> Result<(), String> {
    let mut done = 0;
    while done < len {
        let at = dma.0 + done as u64;
        let chunk = ((crate::mm::addr::PAGE_SIZE - at % crate::mm::addr::PAGE_SIZE) as usize).min(len - done);
        let phys = device_phys(dev, at).ok_or_else(|| format!("{dev}: {at:#x} reaches no memory"))?;
        // SAFETY: the caller's contract; `chunk` stays inside one page of the mapping.
        f(done, unsafe { core::slice::from_raw_parts_mut(phys.0 as usize as *mut u8, chunk) });
        done += chunk;
    }
    Ok(())
}

/// What the device reads at `dma .. dma + len`.
fn device_read(dev: &Device, dma: DmaAddr, len: usize) -> Result<Vec<u8>, String> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: called on live mappings only (see the callers).
    unsafe { device_access(dev, dma, len, |_, b| v.extend_from_slice(b)) }?;
    Ok(v)
}

/// The device writes `data` at `dma`.
fn device_write(dev: &Device, dma: DmaAddr, data: &[u8]) -> Result<(), String> {
    // SAFETY: called on live from-device or bidirectional mappings only (see the callers).
    unsafe { device_access(dev, dma, data.len(), |off, b| b.copy_from_slice(&data[off..off + b.len()])) }
}

fn coherent_op(dev: &Device, rng: &mut Rng) -> Result<(), String> {
    let size = 1 + rng.below(64 << 10);
    let gfp = if rng.below(4) == 0 { GfpFlags::ATOMIC | GfpFlags::NOWARN } else { GfpFlags::KERNEL | GfpFlags::NOWARN };
    let mut buf = match dev.alloc_coherent(size, gfp, DmaAttrs::NONE) {
        Ok(b) => b,
        // An exhausted atomic pool is an answer, not a failure: other CPUs hold its pages.
        Err(crate::dma::api::DmaError::Pool(_)) if !gfp.can_block() => return Ok(()),
        Err(e) => return Err(format!("{dev}: coherent allocation of {size} bytes: {e}")),
    };
    let data = pattern(rng.next(), size as usize);
    let dma = buf.dma_addr();
    buf.as_mut_slice().ok_or("no CPU pointer")?.copy_from_slice(&data);
    // QEMU has no caches, so the CPU's uncached view and the device's view of memory agree.
    let seen = device_read(dev, dma, size as usize)?;
    if seen != data {
        return Err(format!("{dev}: coherent buffer at {dma}: the device does not see what the CPU wrote"));
    }
    buf.free().map_err(|e| format!("{dev}: coherent free: {e}"))
}

fn streaming_op(dev: &Device, rng: &mut Rng) -> Result<(), String> {
    let len = 1 + rng.below(16 << 10) as usize;
    let off = rng.below(64) as usize;
    let dir = match rng.below(3) {
        0 => Direction::ToDevice,
        1 => Direction::FromDevice,
        _ => Direction::Bidirectional,
    };
    let mut buf = LineBuf::new(len + off)?;
    let backing = buf.bytes();
    let cpu_data = pattern(rng.next(), len);
    backing[off..].copy_from_slice(&cpu_data);
    let phys = PhysAddr(backing[off..].as_ptr() as u64);
    let dma = dev.map_phys(phys, len as u64, dir, DmaAttrs::NONE).map_err(|e| format!("{dev}: map {dir} of {len} bytes: {e}"))?;
    if dir != Direction::FromDevice && device_read(dev, dma, len)? != cpu_data {
        return Err(format!("{dev}: {dir} map of {len} bytes at {dma}: the device does not see the CPU's data"));
    }
    let dev_data = pattern(rng.next(), len);
    if dir != Direction::ToDevice {
        device_write(dev, dma, &dev_data)?;
        // A partial sync first: the CPU sees that part, then the unmap gives it the rest.
        let part = rng.below(len as u64) as usize;
        if part > 0 {
            dev.sync_for_cpu(dma, part as u64, dir).map_err(|e| format!("{dev}: sync for the CPU: {e}"))?;
            if backing[off..off + part] != dev_data[..part] {
                return Err(format!("{dev}: after a sync of {part} bytes the CPU does not see the device's data"));
            }
            dev.sync_for_device(dma, part as u64, dir).map_err(|e| format!("{dev}: sync for the device: {e}"))?;
        }
    }
    dev.unmap_phys(dma, len as u64, dir, DmaAttrs::NONE).map_err(|e| format!("{dev}: unmap: {e}"))?;
    let expect = if dir == Direction::ToDevice { &cpu_data } else { &dev_data };
    if backing[off..] != expect[..] {
        return Err(format!("{dev}: after the unmap of a {dir} mapping of {len} bytes the buffer is wrong"));
    }
    Ok(())
}

fn sg_op(dev: &Device, rng: &mut Rng) -> Result<(), String> {
    let n = 1 + rng.below(4) as usize;
    let expect: Vec<Vec<u8>> = (0..n).map(|_| pattern(rng.next(), 1 + rng.below(8192) as usize)).collect();
    let mut bufs = expect.iter().map(|e| LineBuf::new(e.len())).collect::<Result<Vec<_>, _>>()?;
    for (b, e) in bufs.iter_mut().zip(&expect) {
        b.bytes().copy_from_slice(e);
    }
    let mut sg: Vec<SgEntry> = bufs.iter_mut().map(|b| SgEntry::new(PhysAddr(b.bytes().as_ptr() as u64), b.len as u64)).collect();
    dev.map_sg(&mut sg, Direction::ToDevice, DmaAttrs::NONE).map_err(|e| format!("{dev}: map_sg of {n}: {e}"))?;
    for (e, want) in sg.iter().zip(&expect) {
        let dma = e.dma.ok_or("segment left unmapped")?;
        if device_read(dev, dma, want.len())? != *want {
            return Err(format!("{dev}: scatter-gather segment at {dma}: the device does not see the CPU's data"));
        }
    }
    dev.unmap_sg(&mut sg, Direction::ToDevice, DmaAttrs::NONE).map_err(|e| format!("{dev}: unmap_sg: {e}"))
}

/// A round trip through edu's engine, if no other CPU is using it.
fn edu_op(rng: &mut Rng) -> Result<(), String> {
    let Some(guard) = EDU.try_lock() else { return Ok(()) };
    let Some(edu) = guard.as_ref() else { return Ok(()) };
    let len = 1 + rng.below(BUF_LEN) as usize;
    let want = pattern(rng.next(), len);
    let (mut src_buf, mut dst_buf) = (LineBuf::new(len)?, LineBuf::new(len)?);
    let src = src_buf.bytes();
    src.copy_from_slice(&want);
    let dst = dst_buf.bytes();
    let s = edu.dev.map_single::<crate::dma::api::ToDevice>(src).map_err(|e| format!("edu: map: {e}"))?;
    edu.transfer(EduDir::RamToEdu, s.dma_addr(), 0, len as u64).map_err(|e| format!("edu: to edu: {e}"))?;
    s.unmap().map_err(|e| format!("edu: unmap: {e}"))?;
    let d = edu.dev.map_single::<crate::dma::api::FromDevice>(dst).map_err(|e| format!("edu: map: {e}"))?;
    edu.transfer(EduDir::EduToRam, d.dma_addr(), 0, len as u64).map_err(|e| format!("edu: to RAM: {e}"))?;
    d.unmap().map_err(|e| format!("edu: unmap: {e}"))?;
    if dst_buf.bytes() != &want[..] {
        return Err(format!("edu: {len} bytes came back different"));
    }
    Ok(())
}

fn one_op(devs: &Devices, rng: &mut Rng, n: u64) -> Result<(), String> {
    // edu takes 100 ms of virtual time per transfer: rarely.
    if n % 512 == 511 {
        return edu_op(rng);
    }
    // Streaming work on any of them; coherent work on those that reach RAM.
    let dev = match rng.below(4) {
        0 => &devs.coherent,
        1 => &devs.noncoherent,
        2 => devs.bounce.as_ref().unwrap_or(&devs.noncoherent),
        _ => devs.iommu.as_ref().unwrap_or(&devs.coherent),
    };
    match rng.below(4) {
        0 | 1 => streaming_op(dev, rng),
        2 => sg_op(dev, rng),
        _ => coherent_op(
            match rng.below(3) {
                0 => &devs.coherent,
                1 => &devs.noncoherent,
                _ => devs.iommu.as_ref().unwrap_or(&devs.coherent),
            },
            rng,
        ),
    }
}

fn worker(cpu: usize) {
    let Some(devs) = DEVICES.get() else { return };
    let bound = BOUND.get().copied().unwrap_or(Bound::Ops(0));
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (cpu as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let freq = crate::arch::counter::frequency().max(1);
    let start = crate::arch::counter::read();
    let mut n = 0u64;
    loop {
        match bound {
            Bound::Ops(max) if n >= max => break,
            Bound::Nanos(ns) if (crate::arch::counter::read() - start) as u128 * 1_000_000_000 / freq as u128 >= ns as u128 => break,
            _ => {}
        }
        if FAILED.load(Ordering::Acquire) {
            break;
        }
        if let Err(e) = one_op(devs, &mut rng, n) {
            fail(format!("CPU {cpu}, operation {n}: {e}"));
            break;
        }
        n += 1;
    }
    OPS[cpu].store(n, Ordering::Release);
}

/// The counters that must come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counters {
    /// Pages free in the page allocator, plus those IOMMU domains hold as page tables: a domain
    /// keeps its emptied tables for the next mapping (they go with the domain), so a run may
    /// leave a domain with more table pages than before, which is not a leak.
    free_pages: u64,
    cma_used: u64,
    swiotlb_used: u32,
    vmap_areas: u64,
    pool_used: u64,
    /// IOVA pages handed out in the stress device's domain (after its flush queue is emptied).
    iova_pages: u64,
    debug_live: (usize, usize),
}

/// Page-table pages of the IOMMU domains the run uses: the PCI functions' and the stress
/// device's.
fn io_table_pages() -> u64 {
    let mut domains = crate::drivers::pci::ecam::iommu_domains();
    if let Some(Backend::Iommu(d)) = DEVICES.get().and_then(|d| d.iommu.as_ref()).map(|d| d.backend()) {
        domains.push(d);
    }
    domains.iter().map(|d| d.domain().table_pages() as u64).sum()
}

fn counters() -> Counters {
    Counters {
        free_pages: crate::mm::phys::stats().map_or(0, |s| s.free_pages) + io_table_pages(),
        cma_used: crate::mm::cma::setup::default_area().map_or(0, |a| a.stats().used_pages),
        swiotlb_used: platform_pool().map_or(0, |p| p.stats().used),
        vmap_areas: crate::mm::vmap::stats().map_or(0, |s| s.areas),
        pool_used: crate::dma::pool::stats().map_or(0, |s| s.used_pages),
        iova_pages: DEVICES.get().and_then(|d| d.iommu.as_ref()).map_or(0, |dev| match dev.backend() {
            Backend::Iommu(d) => {
                let _ = d.flush();
                d.iova().stats().allocated_pages
            }
            Backend::Direct => 0,
        }),
        debug_live: crate::dma::debug::live(None),
    }
}

fn setup() -> Devices {
    let bounce = platform_pool()
        .and_then(|p| Window::new(p.base(), DmaAddr(p.base().0), p.size()))
        .and_then(|w| BusMap::from_windows(&[w]).ok())
        .map(|bus| Device::with_bus("stress-bounce", bus, true));
    if let Ok(mut e) = Edu::probe() {
        if e.dev.set_mask_and_coherent(configured_mask()).is_ok() {
            *EDU.lock() = Some(e);
        }
    }
    let iommu = crate::iommu::smmuv3::smmus().first().and_then(|&smmu| {
        // Devfn 31.5 of the root bus: no function of the test machines uses it.
        let d = crate::dma::iommu::attach(smmu, 0xfd).ok()?;
        Some(Device::with_bus("stress-iommu", BusMap::IDENTITY, true).with_iommu(d))
    });
    Devices {
        coherent: Device::with_bus("stress-coherent", BusMap::IDENTITY, true),
        noncoherent: Device::with_bus("stress-noncoherent", BusMap::IDENTITY, false),
        bounce,
        iommu,
    }
}

mod ktests {
    use super::*;
    use crate::ktest::TestResult;
    use crate::{kassert, kassert_eq, kskip};

    fn dma_stress() -> TestResult {
        let info = crate::kernel::boot_info();
        let Some(arg) = info.bootargs.get("stress") else { kskip!("no stress= bootarg") };
        let Some(bound) = Bound::parse(arg) else {
            kskip!("stress={arg}: expected a count of operations per CPU, or seconds as `Ns` (1..=3600); no stress run");
        };
        BOUND.call_once(|| bound);
        DEVICES.call_once(setup);
        let before = counters();
        let t0 = crate::arch::counter::read();
        crate::smp::on_each_cpu(worker);
        let ticks = crate::arch::counter::read() - t0;
        let ns = (ticks as u128 * 1_000_000_000 / crate::arch::counter::frequency().max(1) as u128) as u64;
        let cpus = crate::smp::online();
        let ops: u64 = OPS.iter().take(cpus).map(|o| o.load(Ordering::Acquire)).sum();
        crate::println!("# stress: {ops} operations on {cpus} CPU(s) in {ns} ns of virtual time ({bound:?})");
        if let Some(e) = FIRST_FAILURE.lock().take() {
            kassert!(false, "{e}");
        }
        kassert_eq!(counters(), before, "counters after the run (before: {before:?})");
        Ok(())
    }

    crate::ktest_suite!("stress", [dma_stress]);
}
