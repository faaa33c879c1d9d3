//! Throughput through virtio-blk, per transport and DMA back end: 1 MiB read and 1 MiB written
//! in 64 KiB requests (one request at a time, after one untimed request to warm up), on the
//! disks the benchmark configuration attaches:
//!
//! - `virtio_mmio_<back end>`: a `virtio-blk-device` in a virtio-mmio slot, driven by the
//!   `virtio-drivers` crate on the kernel's HAL ([`crate::drivers::virtio`]): dma-direct, or
//!   swiotlb when the boot has `swiotlb=force`;
//! - `virtio_pci_<back end>`: a modern `virtio-blk-pci` driven by [`crate::drivers::virtio_pci`]:
//!   without `iommu_platform` dma-direct (or swiotlb under `swiotlb=force`); with
//!   `iommu_platform=on` behind the SMMU, strict or lazy as `iommu.strict=` says.
//!
//! An entry whose back end is not the boot's (or whose disk is missing) says so and reports
//! nothing. Each prints `read_bytes_per_s` and `write_bytes_per_s` (bytes per second of virtual
//! time, so per 10^9 guest instructions under `--icount`) and `read_request_mean`,
//! `write_request_mean` (ns per request).
//!
//! What is counted: the driver's and the DMA layer's work, i.e. building and mapping the request,
//! notifying, and unmapping (with bounce copies, cache maintenance or IOTLB invalidation) once it
//! is done. What is not: the time the device takes, from the notification to the poll that sees
//! the completion. QEMU completes a request outside the guest's instruction stream (its block
//! layer hands the completion to its main loop), so how long the guest polls is the device's
//! business and may depend on the host; the note gives that wait as measured, but no result
//! includes it and nothing guards it. The driver's own [`Virtqueue`] reports the wait
//! through [`VirtioBlk::set_wait_observer`]; for `virtio-drivers` the benchmark submits and
//! completes each request itself with the crate's non-blocking calls and polls in between.
//! The disks are QEMU null block devices (`driver=null-co,read-zeroes=on`): the host does no
//! I/O, reads fill the buffer with zeros. Times: PMU cycle counter, its reads subtracted.
//!
//! [`Virtqueue`]: crate::drivers::virtio_pci::Virtqueue
//! [`VirtioBlk::set_wait_observer`]: crate::drivers::virtio_pci::blk::VirtioBlk::set_wait_observer

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Once;

use super::cycles::Cycles;
use super::dma::{ns, read_overhead};
use super::Recorder;
use crate::arch::counter;
use crate::dma::bounce::platform_pool;
use crate::dma::{Backend, Device};

/// Bytes per request.
const CHUNK: usize = 64 << 10;
/// Timed requests per direction: 1 MiB.
const REQUESTS: usize = 16;
/// The longest wait for one request before the benchmark gives up on the device.
const TIMEOUT_MS: u64 = 10_000;

/// The DMA path a virtio device's requests take.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Swiotlb,
    IommuStrict,
    IommuLazy,
}

impl Path {
    fn of(dev: &Device) -> Path {
        match dev.backend() {
            Backend::Iommu(d) if d.is_strict() => Path::IommuStrict,
            Backend::Iommu(_) => Path::IommuLazy,
            Backend::Direct => {
                // dma-direct bounces everything when the device's pool (else the platform's) is
                // forced, as `dma::direct` decides.
                if dev.own_bounce_pool().or_else(platform_pool).is_some_and(|p| p.is_forced()) {
                    Path::Swiotlb
                } else {
                    Path::Direct
                }
            }
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Path::Direct => "dma-direct",
            Path::Swiotlb => "swiotlb (swiotlb=force: every buffer bounces)",
            Path::IommuStrict => "dma-iommu through the SMMU, strict",
            Path::IommuLazy => "dma-iommu through the SMMU, lazy (flush queue)",
        }
    }
}

/// One direction's totals, in counts.
#[derive(Default)]
struct Totals {
    /// The driver's and the DMA layer's counts, all requests.
    driver: u64,
    /// The device's counts (the wait), all requests.
    device: u64,
}

/// Prints the results of both directions and the note.
fn report(rec: &Recorder, c: &Cycles, path: Path, what: &str, read: &Totals, write: &Totals) {
    let bytes = (CHUNK * REQUESTS) as u128;
    let per_s = |ns_total: u64| u64::try_from(bytes * 1_000_000_000 / u128::from(ns_total.max(1))).unwrap_or(u64::MAX);
    let total_ns = |counts: u64| ns(c, counts.saturating_mul(1000), 0);
    let (rd, wd) = (total_ns(read.driver), total_ns(write.driver));
    let (rw, ww) = (total_ns(read.device), total_ns(write.device));
    rec.result("read_bytes_per_s", per_s(rd), "bytes/s");
    rec.result("read_request_mean", rd / REQUESTS as u64, "ns");
    rec.result("write_bytes_per_s", per_s(wd), "bytes/s");
    rec.result("write_request_mean", wd / REQUESTS as u64, "ns");
    rec.note(format_args!(
        "{what}, {}: {REQUESTS} requests of {} KiB per direction after one untimed; driver + DMA \
         layer per request: read {} ns, write {} ns; device wait, not counted (may depend on the host): \
         read {} ns, write {} ns per request, {} and {} bytes/s with it; {} counter, its reads subtracted",
        path.describe(),
        CHUNK >> 10,
        rd / REQUESTS as u64,
        wd / REQUESTS as u64,
        rw / REQUESTS as u64,
        ww / REQUESTS as u64,
        per_s(rd + rw),
        per_s(wd + ww),
        if c.is_pmu() { "PMU cycle" } else { "generic timer" },
    ));
}

/// The clock of the wait observer and what it measured.
static CLOCK: Once<Cycles> = Once::new();
static WAIT_START: AtomicU64 = AtomicU64::new(0);
static WAITED: AtomicU64 = AtomicU64::new(0);

/// The wait observer given to the virtio-pci driver: sums the counts from each `true` (after
/// the notification) to the next `false` (the completion seen).
fn observe_wait(starts: bool) {
    let Some(c) = CLOCK.get() else { return };
    let now = c.read();
    if starts {
        WAIT_START.store(now, Ordering::Relaxed);
    } else {
        WAITED.fetch_add(c.elapsed(WAIT_START.load(Ordering::Relaxed), now), Ordering::Relaxed);
    }
}

fn pci(rec: &Recorder, want: Path) {
    use crate::drivers::pci::ecam;
    use crate::drivers::virtio_pci::blk::{is_virtio_blk, VirtioBlk, SECTOR_SIZE};
    let Ok(bus) = ecam::bus() else {
        return rec.note(format_args!("no PCI bus"));
    };
    let mut seen: Vec<&'static str> = Vec::new();
    for pdev in bus.devices.iter().filter(|d| is_virtio_blk(d.vendor, d.device)) {
        let mut blk = match VirtioBlk::probe(pdev) {
            Ok(b) => b,
            Err(e) => {
                rec.note(format_args!("virtio-blk at pci {}: {e}", pdev.bdf));
                continue;
            }
        };
        let path = Path::of(blk.dma_device());
        if path != want {
            seen.push(path.describe());
            continue;
        }
        let sectors_needed = (2 * CHUNK * (REQUESTS + 1) / SECTOR_SIZE) as u64;
        if blk.capacity() < sectors_needed {
            return rec.note(format_args!("the disk at pci {} has {} sectors, {sectors_needed} needed", pdev.bdf, blk.capacity()));
        }
        let c = *CLOCK.call_once(Cycles::start);
        let ovh = read_overhead(&c) / 1000;
        // What the observer adds to a request besides the wait it measures: its two calls back
        // to back, less the (almost nothing) they record as waited and the counter's reads.
        WAITED.store(0, Ordering::Relaxed);
        let (_, t) = c.timed(|| {
            observe_wait(true);
            observe_wait(false);
        });
        let observer = t.saturating_sub(WAITED.swap(0, Ordering::Relaxed)).saturating_sub(ovh);
        blk.set_wait_observer(Some(observe_wait));
        let mut buf = vec![0u8; CHUNK];
        let step = (CHUNK / SECTOR_SIZE) as u64;
        let mut totals = [Totals::default(), Totals::default()];
        for (d, tot) in totals.iter_mut().enumerate() {
            let write = d == 1;
            // Reads from sector 0 on, writes after them; the first request of each is untimed.
            let base = if write { step * (REQUESTS as u64 + 1) } else { 0 };
            for i in 0..=REQUESTS {
                let sector = base + step * i as u64;
                WAITED.store(0, Ordering::Relaxed);
                let (r, t) = c.timed(|| if write { blk.write_sectors(sector, &buf) } else { blk.read_sectors(sector, &mut buf) });
                if let Err(e) = r {
                    return rec.note(format_args!("{} at sector {sector}: {e}", if write { "write" } else { "read" }));
                }
                let waited = WAITED.swap(0, Ordering::Relaxed);
                if i > 0 {
                    tot.driver += t.saturating_sub(waited).saturating_sub(ovh + observer);
                    tot.device += waited;
                }
            }
        }
        blk.set_wait_observer(None);
        let what = alloc::format!("virtio-blk-pci at {} ({})", pdev.bdf, blk.dma_device());
        return report(rec, &c, path, &what, &totals[0], &totals[1]);
    }
    if seen.is_empty() {
        rec.note(format_args!("no virtio-blk PCI function (the virtio benchmark configurations attach them)"));
    } else {
        rec.note(format_args!("no virtio-blk PCI function goes through {} in this boot (found: {})", want.describe(), seen.join("; ")));
    }
}

fn mmio(rec: &Recorder, want: Path) {
    use crate::drivers::virtio::{dma_device, find, VirtioHal};
    use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
    use virtio_drivers::transport::DeviceType;
    let Some(t) = find(DeviceType::Block).into_iter().next() else {
        return rec.note(format_args!("no virtio-blk device in a virtio-mmio slot (the virtio benchmark configurations attach one)"));
    };
    let Some(dev) = dma_device() else {
        return rec.note(format_args!("the virtio-mmio slots have no DMA device"));
    };
    let path = Path::of(dev);
    if path != want {
        return rec.note(format_args!("virtio-mmio goes through {} in this boot", path.describe()));
    }
    let mut blk = match VirtIOBlk::<VirtioHal, _>::new(t) {
        Ok(b) => b,
        Err(e) => return rec.note(format_args!("virtio-blk: {e}")),
    };
    let step = CHUNK / SECTOR_SIZE;
    let sectors_needed = (2 * step * (REQUESTS + 1)) as u64;
    if blk.capacity() < sectors_needed {
        return rec.note(format_args!("the disk has {} sectors, {sectors_needed} needed", blk.capacity()));
    }
    let c = *CLOCK.call_once(Cycles::start);
    let ovh = read_overhead(&c) / 1000;
    let timeout = u64::try_from(u128::from(counter::frequency()) * u128::from(TIMEOUT_MS) / 1000).unwrap_or(u64::MAX);
    let mut buf = vec![0u8; CHUNK];
    // On the heap, like the data: should the device never complete a request, all three are
    // left to it rather than to a stack frame that is reused.
    let (mut req, mut resp) = (Box::new(BlkReq::default()), Box::new(BlkResp::default()));
    let mut totals = [Totals::default(), Totals::default()];
    for (d, tot) in totals.iter_mut().enumerate() {
        let write = d == 1;
        let base = if write { step * (REQUESTS + 1) } else { 0 };
        for i in 0..=REQUESTS {
            let block = base + step * i;
            // SAFETY: `req`, `buf` and `resp` are neither touched nor dropped until the request
            // is completed below (or, should the device never complete it, never again).
            let (r, submit) = c.timed(|| unsafe {
                if write {
                    blk.write_blocks_nb(block, &mut req, &buf, &mut resp)
                } else {
                    blk.read_blocks_nb(block, &mut req, &mut buf, &mut resp)
                }
            });
            let token = match r {
                Ok(t) => t,
                Err(e) => return rec.note(format_args!("submitting block {block}: {e}")),
            };
            let (t0, start) = (counter::read(), c.read());
            while blk.peek_used() != Some(token) {
                if counter::read().wrapping_sub(t0) > timeout {
                    // The device may still write them: they are never given back.
                    core::mem::forget(buf);
                    core::mem::forget(req);
                    core::mem::forget(resp);
                    core::mem::forget(blk);
                    return rec.note(format_args!("no completion of block {block} within {TIMEOUT_MS} ms"));
                }
                core::hint::spin_loop();
            }
            let waited = c.elapsed(start, c.read());
            // SAFETY: the same buffers as submitted, and the device is done with them.
            let (r, complete) = c.timed(|| unsafe {
                if write {
                    blk.complete_write_blocks(token, &req, &buf, &mut resp)
                } else {
                    blk.complete_read_blocks(token, &req, &mut buf, &mut resp)
                }
            });
            if let Err(e) = r {
                return rec.note(format_args!("block {block}: {e}"));
            }
            if i > 0 {
                tot.driver += (submit + complete).saturating_sub(2 * ovh);
                tot.device += waited;
            }
        }
    }
    let what = alloc::format!("virtio-blk in a virtio-mmio slot ({dev})");
    report(rec, &c, path, &what, &totals[0], &totals[1]);
}

pub fn mmio_direct(rec: &Recorder) {
    mmio(rec, Path::Direct);
}

pub fn mmio_swiotlb(rec: &Recorder) {
    mmio(rec, Path::Swiotlb);
}

pub fn pci_direct(rec: &Recorder) {
    pci(rec, Path::Direct);
}

pub fn pci_swiotlb(rec: &Recorder) {
    pci(rec, Path::Swiotlb);
}

pub fn pci_iommu_strict(rec: &Recorder) {
    pci(rec, Path::IommuStrict);
}

pub fn pci_iommu_lazy(rec: &Recorder) {
    pci(rec, Path::IommuLazy);
}
