//! The kernel side of virtio-pci: the structures mapped from the function's BARs, the
//! initialisation sequence (virtio 1.2, 3.1.1), virtqueues in coherent DMA memory, and streaming
//! mappings of request buffers.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::marker::PhantomData;

use spin::Mutex;

use super::caps::{self, Region};
use super::queue::{RingLayout, Segment, SplitQueue};
use super::{negotiate, Features, VirtioError, F_ACCESS_PLATFORM, VENDOR};
use super::{STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET};
use crate::arch::counter;
use crate::dma::api::{DmaAttrs, DmaCoherent, DmaError};
use crate::dma::busmap::DmaAddr;
use crate::dma::maint::Direction;
use crate::dma::{Device, GfpFlags};
use crate::drivers::pci::ecam::{self, EcamError};
use crate::drivers::pci::{Bdf, ConfigSpace, PciDevice, PciError, COMMAND_BUS_MASTER, COMMAND_MEMORY, REG_COMMAND};
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::mm::kmap::{self, KmapError};

// Common configuration (virtio 1.2, 4.1.4.3): offsets of the fields the driver uses.
const DEVICE_FEATURE_SELECT: usize = 0x00;
const DEVICE_FEATURE: usize = 0x04;
const DRIVER_FEATURE_SELECT: usize = 0x08;
const DRIVER_FEATURE: usize = 0x0c;
const NUM_QUEUES: usize = 0x12;
const DEVICE_STATUS: usize = 0x14;
const CONFIG_GENERATION: usize = 0x15;
const QUEUE_SELECT: usize = 0x16;
const QUEUE_SIZE: usize = 0x18;
const QUEUE_ENABLE: usize = 0x1c;
const QUEUE_NOTIFY_OFF: usize = 0x1e;
const QUEUE_DESC: usize = 0x20;
const QUEUE_DRIVER: usize = 0x28;
const QUEUE_DEVICE: usize = 0x30;

/// How long a reset may take to read back 0.
const RESET_TIMEOUT_MS: u64 = 1000;
/// Attempts at a consistent read of the device configuration.
const CONFIG_ATTEMPTS: usize = 8;

/// A structure in a BAR, mapped as device memory: `len` bytes at virtual address `base`.
///
/// Accesses are naturally aligned and of the field's width, as the specification requires. An
/// access beyond `len` (the callers' offsets are constants below the lengths `caps::find`
/// checked, or checked against `len` first) reads all-ones and writes nothing, like a PCI
/// master abort, rather than touching memory outside the structure.
#[derive(Clone, Copy)]
struct Mmio {
    base: usize,
    len: u64,
}

macro_rules! mmio_accessors {
    ($($read:ident, $write:ident, $t:ty;)*) => {$(
        fn $read(&self, off: usize) -> $t {
            match self.at::<$t>(off) {
                // SAFETY: inside the structure, aligned for the width (checked by `at`), mapped
                // as device memory by `map_region`; a register read.
                Some(p) => <$t>::from_le(unsafe { core::ptr::read_volatile(p) }),
                None => <$t>::MAX,
            }
        }

        fn $write(&self, off: usize, v: $t) {
            if let Some(p) = self.at::<$t>(off) {
                // SAFETY: as in the read; the driver owns the function's registers.
                unsafe { core::ptr::write_volatile(p, v.to_le()) }
            }
        }
    )*};
}

impl Mmio {
    /// The address of a `T` at `off`, if it lies inside the structure and is aligned.
    fn at<T>(&self, off: usize) -> Option<*mut T> {
        let size = core::mem::size_of::<T>();
        let end = off.checked_add(size)?;
        if end as u64 > self.len || !off.is_multiple_of(size) {
            return None;
        }
        Some(self.base.checked_add(off)? as *mut T)
    }

    mmio_accessors! {
        read8, write8, u8;
        read16, write16, u16;
        read32, write32, u32;
    }
}

/// A point in time `ms` milliseconds from its creation, on the generic timer.
struct Deadline {
    start: u64,
    ticks: u64,
}

impl Deadline {
    fn after_ms(ms: u64) -> Deadline {
        let ticks = u128::from(counter::frequency()) * u128::from(ms) / 1000;
        Deadline { start: counter::read(), ticks: u64::try_from(ticks).unwrap_or(u64::MAX) }
    }

    fn passed(&self) -> bool {
        counter::read().wrapping_sub(self.start) > self.ticks
    }
}

/// The common configuration structure.
#[derive(Clone, Copy)]
struct Common(Mmio);

impl Common {
    fn status(&self) -> u8 {
        self.0.read8(DEVICE_STATUS)
    }

    /// Sets `bits` in the device status, keeping those already set.
    fn add_status(&self, bits: u8) {
        self.0.write8(DEVICE_STATUS, self.status() | bits);
    }

    /// Tells the device the driver has given up on it.
    fn fail(&self) {
        self.add_status(STATUS_FAILED);
    }

    /// Resets the device and waits until it reads back status 0: it then no longer accesses
    /// its virtqueues or any buffer it was given.
    fn reset(&self) -> Result<(), VirtioError> {
        self.0.write8(DEVICE_STATUS, 0);
        let deadline = Deadline::after_ms(RESET_TIMEOUT_MS);
        loop {
            let status = self.status();
            if status == 0 {
                return Ok(());
            }
            if deadline.passed() {
                return Err(VirtioError::ResetTimeout { status });
            }
            core::hint::spin_loop();
        }
    }

    fn device_features(&self) -> u64 {
        self.0.write32(DEVICE_FEATURE_SELECT, 0);
        let low = self.0.read32(DEVICE_FEATURE);
        self.0.write32(DEVICE_FEATURE_SELECT, 1);
        let high = self.0.read32(DEVICE_FEATURE);
        u64::from(high) << 32 | u64::from(low)
    }

    fn set_driver_features(&self, features: u64) {
        self.0.write32(DRIVER_FEATURE_SELECT, 0);
        self.0.write32(DRIVER_FEATURE, features as u32);
        self.0.write32(DRIVER_FEATURE_SELECT, 1);
        self.0.write32(DRIVER_FEATURE, (features >> 32) as u32);
    }

    /// A 64-bit field, as two 32-bit writes (the specification allows it).
    fn write64(&self, off: usize, v: u64) {
        self.0.write32(off, v as u32);
        self.0.write32(off + 4, (v >> 32) as u32);
    }
}

/// One DMA device per (function, whether it negotiated ACCESS_PLATFORM), made on first use and
/// kept for the kernel's lifetime, as a `struct device` lives as long as its bus: the
/// virtqueues and mappings of every probe of the function borrow it.
static FUNCTION_DEVICES: Mutex<Vec<(Bdf, bool, &'static Device)>> = Mutex::new(Vec::new());

/// The DMA device of `pdev` for a device that negotiated ACCESS_PLATFORM (`access_platform`:
/// the PCI function's own, which translates through the IOMMU if there is one) or not (a
/// dma-direct device with the function's bus map and coherence: the device then uses physical
/// addresses, bypassing any IOMMU). Both take 64-bit addresses.
fn function_device(pdev: &PciDevice, access_platform: bool) -> Result<&'static Device, VirtioError> {
    let mut known = FUNCTION_DEVICES.lock();
    if let Some(&(_, _, d)) = known.iter().find(|&&(b, a, _)| b == pdev.bdf && a == access_platform) {
        return Ok(d);
    }
    let bus_dev = ecam::dma_device(pdev).map_err(VirtioError::Dt)?;
    let mut dev = if access_platform {
        bus_dev
    } else {
        let mut name = alloc::string::String::new();
        let _ = core::fmt::write(&mut name, format_args!("{bus_dev} (physical)"));
        Device::with_bus(&name, *bus_dev.bus_map(), bus_dev.is_coherent())
    };
    dev.set_mask_and_coherent(u64::MAX)?;
    let dev: &'static Device = Box::leak(Box::new(dev));
    known.push((pdev.bdf, access_platform, dev));
    Ok(dev)
}

fn ecam_error(e: EcamError) -> VirtioError {
    match e {
        EcamError::Map(m) => VirtioError::Map(m),
        EcamError::Pci(p) => VirtioError::Pci(p),
        EcamError::NoBridge => VirtioError::Pci(PciError::HostBridge { what: "no ECAM host bridge" }),
    }
}

/// Maps the BAR holding `r` (checked by `caps::find` to be an assigned memory BAR containing
/// it) and returns the structure.
fn map_region(pdev: &PciDevice, r: Region) -> Result<Mmio, VirtioError> {
    let bar = pdev.bar(usize::from(r.bar)).ok_or(VirtioError::Pci(PciError::BadBar { bdf: pdev.bdf, index: r.bar, what: "not assigned" }))?;
    let va = kmap::ioremap(bar.cpu_addr.as_u64(), bar.size).map_err(VirtioError::Map)?;
    let base = usize::try_from(r.offset).ok().and_then(|o| va.checked_add(o));
    let base = base.ok_or(VirtioError::Map(KmapError::NotMmio { base: bar.cpu_addr.as_u64(), size: bar.size }))?;
    Ok(Mmio { base, len: u64::from(r.len) })
}

/// A modern virtio-pci function after feature negotiation (FEATURES_OK accepted by the device):
/// the driver of the device type sets up its virtqueues with [`VirtioPci::setup_queue`], then
/// calls [`VirtioPci::driver_ok`]. Dropping it resets the device, so it must be dropped before
/// the virtqueues' memory is freed (declare it before them in the driver's struct).
pub struct VirtioPci {
    bdf: Bdf,
    common: Common,
    notify: Mmio,
    notify_multiplier: u32,
    isr: Mmio,
    device_cfg: Option<Mmio>,
    features: Features,
    dev: &'static Device,
}

impl VirtioPci {
    /// Finds the structures of `pdev` (a function of [`ecam::bus`]), turns on its memory
    /// decoding and bus mastering, resets it and negotiates features: VERSION_1 (required),
    /// ACCESS_PLATFORM when offered, and those of `driver_features` the device offers. A device
    /// that clears FEATURES_OK on read-back is an error ([`VirtioError::FeaturesRefused`]), as is
    /// any failure on the way; the device is then marked FAILED.
    pub fn new(pdev: &PciDevice, driver_features: u64) -> Result<VirtioPci, VirtioError> {
        VirtioPci::with_declined(pdev, driver_features, 0)
    }

    /// [`VirtioPci::new`], declining the features in `declined` even when offered (for the test
    /// of a device that refuses FEATURES_OK).
    pub(super) fn with_declined(pdev: &PciDevice, driver_features: u64, declined: u64) -> Result<VirtioPci, VirtioError> {
        if pdev.vendor != VENDOR {
            return Err(VirtioError::WrongDevice { bdf: pdev.bdf, vendor: pdev.vendor, device: pdev.device });
        }
        let bus = ecam::bus().map_err(VirtioError::Bus)?;
        let mut cfg = ecam::Ecam::map_root_bus(&bus.bridge.ecam).map_err(ecam_error)?;
        let found = caps::find(&cfg, pdev)?;
        let command = cfg.read32(pdev.bdf, REG_COMMAND);
        let wanted = u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER);
        if command & wanted != wanted {
            // The status half is write-one-to-clear: writing zeros there changes nothing.
            cfg.write32(pdev.bdf, REG_COMMAND, (command & 0xffff) | wanted);
        }
        let common = Common(map_region(pdev, found.common)?);
        let notify = map_region(pdev, found.notify)?;
        let isr = map_region(pdev, found.isr)?;
        let device_cfg = found.device.map(|r| map_region(pdev, r)).transpose()?;

        common.reset()?;
        common.add_status(STATUS_ACKNOWLEDGE);
        common.add_status(STATUS_DRIVER);
        let offered = common.device_features();
        let accepted = match negotiate(offered, driver_features) {
            Ok(a) => a & !declined,
            Err(e) => {
                common.fail();
                return Err(e);
            }
        };
        common.set_driver_features(accepted);
        common.add_status(STATUS_FEATURES_OK);
        let status = common.status();
        if status & STATUS_FEATURES_OK == 0 {
            common.fail();
            return Err(VirtioError::FeaturesRefused { offered, accepted, status });
        }
        let dev = match function_device(pdev, accepted & F_ACCESS_PLATFORM != 0) {
            Ok(d) => d,
            Err(e) => {
                common.fail();
                return Err(e);
            }
        };
        Ok(VirtioPci {
            bdf: pdev.bdf,
            common,
            notify,
            notify_multiplier: found.notify_multiplier,
            isr,
            device_cfg,
            features: Features { offered, accepted },
            dev,
        })
    }

    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    pub fn features(&self) -> Features {
        self.features
    }

    /// The DMA device every address given to this device comes from.
    pub fn dma_device(&self) -> &'static Device {
        self.dev
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.common.status()
    }

    pub fn num_queues(&self) -> u16 {
        self.common.0.read16(NUM_QUEUES)
    }

    /// Sets up virtqueue `index` with at most `want` descriptors (the largest power of two the
    /// device allows up to that), and at least `needed`: its rings in zeroed coherent memory,
    /// programmed with their device addresses, then enabled. Before [`VirtioPci::driver_ok`].
    pub fn setup_queue(&self, index: u16, want: u16, needed: u16) -> Result<Virtqueue, VirtioError> {
        let c = &self.common.0;
        if index >= self.num_queues() {
            return Err(VirtioError::NoQueue { queue: index });
        }
        c.write16(QUEUE_SELECT, index);
        let max = c.read16(QUEUE_SIZE);
        if max == 0 {
            return Err(VirtioError::NoQueue { queue: index });
        }
        let limit = max.min(want).min(super::queue::MAX_SIZE);
        let size = if limit == 0 { 0 } else { 1 << (15 - limit.leading_zeros()) };
        let layout = match RingLayout::new(size) {
            Some(l) if size >= needed => l,
            _ => return Err(VirtioError::QueueTooSmall { queue: index, size: limit, needed }),
        };
        let notify_off = c.read16(QUEUE_NOTIFY_OFF);
        let at = u64::from(notify_off) * u64::from(self.notify_multiplier);
        let base = usize::try_from(at).ok().filter(|_| at + 2 <= self.notify.len).and_then(|off| self.notify.base.checked_add(off));
        let notify = match base {
            Some(base) => Mmio { base, len: 2 },
            None => return Err(VirtioError::NotifyOutside { queue: index, notify_off, multiplier: self.notify_multiplier }),
        };
        let bytes = (layout.bytes as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mem = self.dev.alloc_coherent(bytes, GfpFlags::KERNEL, DmaAttrs::NONE)?;
        let dma = mem.dma_addr().as_u64();
        let cpu = mem.cpu_ptr().ok_or(DmaError::NotCpuAddressable { phys: mem.phys(), size: bytes })?;
        if !dma.is_multiple_of(16) || !(cpu.as_ptr() as usize).is_multiple_of(16) {
            return Err(VirtioError::RingAlignment { dma });
        }
        // SAFETY: `cpu` maps the `bytes >= layout.bytes` zeroed bytes of `mem`, 16-aligned
        // (checked); `mem` lives in the returned queue as long as the ring, and only the device
        // shares it.
        let ring = unsafe { SplitQueue::new(cpu, layout) };
        c.write16(QUEUE_SIZE, size);
        self.common.write64(QUEUE_DESC, dma);
        self.common.write64(QUEUE_DRIVER, dma + layout.avail as u64);
        self.common.write64(QUEUE_DEVICE, dma + layout.used as u64);
        // The ring's initial flags reach memory before the device may look at the queue.
        crate::arch::cache::dsb();
        c.write16(QUEUE_ENABLE, 1);
        Ok(Virtqueue { index, ring, notify, common: self.common, isr: self.isr, broken: false, wait_observer: None, _mem: mem })
    }

    /// Sets DRIVER_OK: the device is live. An error if the device asks for a reset; the caller
    /// then resets it ([`VirtioPci::reset`]) before freeing its virtqueues.
    pub fn driver_ok(&self) -> Result<(), VirtioError> {
        self.common.add_status(STATUS_DRIVER_OK);
        if self.common.status() & STATUS_NEEDS_RESET != 0 {
            return Err(VirtioError::NeedsReset);
        }
        Ok(())
    }

    /// Resets the device: once this returns `Ok`, it accesses none of its virtqueues or buffers.
    pub fn reset(&self) -> Result<(), VirtioError> {
        self.common.reset()
    }

    /// The little-endian 64-bit field at `offset` (a multiple of 4) of the device configuration,
    /// read consistently: again if the configuration generation changed meanwhile.
    pub fn read_config_u64(&self, offset: u32) -> Result<u64, VirtioError> {
        let cfg = self.device_cfg.unwrap_or(Mmio { base: 0, len: 0 });
        let needed = u64::from(offset) + 8;
        if needed > cfg.len {
            return Err(VirtioError::ConfigTooShort { needed, len: cfg.len });
        }
        if !offset.is_multiple_of(4) {
            return Err(VirtioError::ConfigMisaligned { offset });
        }
        let off = offset as usize;
        for _ in 0..CONFIG_ATTEMPTS {
            let generation = self.common.0.read8(CONFIG_GENERATION);
            let low = cfg.read32(off);
            let high = cfg.read32(off + 4);
            if self.common.0.read8(CONFIG_GENERATION) == generation {
                return Ok(u64::from(high) << 32 | u64::from(low));
            }
        }
        Err(VirtioError::ConfigUnstable)
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        if let Err(e) = self.common.reset() {
            crate::println!("virtio-pci {}: reset on release: {e}", self.bdf);
        }
    }
}

/// A virtqueue of a [`VirtioPci`] function: its rings in coherent memory (freed on drop, after
/// the device was reset: see [`VirtioPci`]) and its notification register.
pub struct Virtqueue {
    index: u16,
    ring: SplitQueue,
    notify: Mmio,
    common: Common,
    isr: Mmio,
    /// Set when the device was reset after an error: the queue is gone on the device's side.
    broken: bool,
    /// Called as the wait for the device begins (`true`) and ends (`false`): see
    /// [`Virtqueue::set_wait_observer`].
    wait_observer: Option<fn(bool)>,
    /// The rings' memory, which `ring` points into: owned here so that it lives as long as the
    /// queue, and freed on drop.
    _mem: DmaCoherent<'static>,
}

impl Virtqueue {
    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn size(&self) -> u16 {
        self.ring.layout().size
    }

    /// Has `observer(true)` called after each notification and `observer(false)` once the poll
    /// for the completion is over, whatever its outcome: the throughput benchmark (`bench::virtio`)
    /// leaves the device's time out of the driver's cost this way. `None` (the default) for none.
    pub fn set_wait_observer(&mut self, observer: Option<fn(bool)>) {
        self.wait_observer = observer;
    }

    /// Runs the chain `segs` to completion: publishes it, notifies the device, and polls the
    /// used ring for up to `timeout_ms`. Returns the number of bytes the device wrote.
    ///
    /// When this returns, `Ok` or not, the device is done with the chain's buffers and they may
    /// be unmapped: on a time-out, a device asking for a reset, or a used ring that does not
    /// match the chain, the device is reset first (the whole function: virtio 1.x without
    /// VIRTIO_F_RING_RESET has no per-queue reset) and the queue refuses further chains
    /// ([`VirtioError::Broken`]). A chain the queue refuses is never submitted.
    pub fn run(&mut self, segs: &[Segment], timeout_ms: u64) -> Result<u32, VirtioError> {
        if self.broken {
            return Err(VirtioError::Broken);
        }
        if self.ring.push(segs).map_err(VirtioError::Chain)? {
            // `push` ended with a barrier: the index is visible before this write.
            self.notify.write16(0, self.index);
        }
        if let Some(observe) = self.wait_observer {
            observe(true);
        }
        let used = self.wait_used(timeout_ms);
        if let Some(observe) = self.wait_observer {
            observe(false);
        }
        let error = match used {
            Ok(len) => {
                // Clears an interrupt raised despite VIRTQ_AVAIL_F_NO_INTERRUPT (only a hint),
                // so that INTx does not stay asserted.
                self.isr.read8(0);
                return Ok(len);
            }
            Err(e) => e,
        };
        self.broken = true;
        if let Err(e) = self.common.reset() {
            crate::println!("virtio-pci: queue {}: reset after \"{error}\": {e}", self.index);
        }
        Err(error)
    }

    /// Polls the used ring for the submitted chain for up to `timeout_ms`.
    fn wait_used(&mut self, timeout_ms: u64) -> Result<u32, VirtioError> {
        let deadline = Deadline::after_ms(timeout_ms);
        loop {
            match self.ring.poll() {
                Some(Ok(len)) => return Ok(len),
                Some(Err(e)) => return Err(VirtioError::Queue(e)),
                None => {}
            }
            if self.common.status() & STATUS_NEEDS_RESET != 0 {
                return Err(VirtioError::NeedsReset);
            }
            if deadline.passed() {
                return Err(VirtioError::Timeout { ms: timeout_ms });
            }
            core::hint::spin_loop();
        }
    }
}

/// A streaming DMA mapping of a borrowed buffer for one request, in the direction its
/// constructor names; ended by [`Mapped::unmap`] (or on drop, which prints a failure). The
/// buffer must lie in the kernel's linear map (heap, statics, stacks: virtual = physical), as
/// for [`Device::map_single`]; it stays borrowed, so the CPU cannot touch it, until the unmap.
pub struct Mapped<'a> {
    dev: &'static Device,
    dma: DmaAddr,
    len: u32,
    dir: Direction,
    live: bool,
    buf: PhantomData<&'a [u8]>,
}

impl<'a> Mapped<'a> {
    /// Maps `buf` for the device to read.
    #[track_caller]
    pub fn to_device(dev: &'static Device, buf: &'a [u8]) -> Result<Mapped<'a>, VirtioError> {
        Mapped::map(dev, buf.as_ptr(), buf.len(), Direction::ToDevice)
    }

    /// Maps `buf` for the device to write.
    #[track_caller]
    pub fn from_device(dev: &'static Device, buf: &'a mut [u8]) -> Result<Mapped<'a>, VirtioError> {
        Mapped::map(dev, buf.as_ptr(), buf.len(), Direction::FromDevice)
    }

    #[track_caller]
    fn map(dev: &'static Device, ptr: *const u8, len: usize, dir: Direction) -> Result<Mapped<'a>, VirtioError> {
        let len32 = u32::try_from(len).map_err(|_| VirtioError::TooLong { len })?;
        let dma = dev.map_phys(PhysAddr(ptr as usize as u64), u64::from(len32), dir, DmaAttrs::NONE)?;
        Ok(Mapped { dev, dma, len: len32, dir, live: true, buf: PhantomData })
    }

    /// The buffer as a descriptor of a chain.
    pub fn segment(&self) -> Segment {
        Segment { addr: self.dma.as_u64(), len: self.len, device_writes: self.dir != Direction::ToDevice }
    }

    /// Ends the mapping: the device's writes are now visible to the CPU.
    #[track_caller]
    pub fn unmap(mut self) -> Result<(), VirtioError> {
        self.live = false;
        Ok(self.dev.unmap_phys(self.dma, u64::from(self.len), self.dir, DmaAttrs::NONE)?)
    }
}

impl Drop for Mapped<'_> {
    fn drop(&mut self) {
        if self.live {
            if let Err(e) = self.dev.unmap_phys(self.dma, u64::from(self.len), self.dir, DmaAttrs::NONE) {
                crate::println!("virtio-pci: {}: unmapping {} bytes at {}: {e}", self.dev, self.len, self.dma);
            }
        }
    }
}
