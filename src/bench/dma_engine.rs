//! Throughput through the BCM2835 DMA engine (Raspberry Pi; QEMU raspi2b/3b/4b), per DMA back
//! end: 1 MiB copied memory to memory in 64 KiB transfers, one control block each, on a full
//! (non-lite) channel with polled completion, after one untimed transfer to warm up.
//!
//! - `dma_engine_direct`: the buffers mapped by dma-direct (bus addresses through /soc
//!   `dma-ranges`; cache clean of the source and invalidate of the destination, the Pi's masters
//!   not being cache-coherent);
//! - `dma_engine_swiotlb`: the same with `swiotlb=force`: both buffers bounce.
//!
//! An entry whose back end is not the boot's says so and reports nothing. Each prints
//! `copy_bytes_per_s` (bytes per second of virtual time, so per 10^9 guest instructions under
//! `--icount`) and `copy_request_mean` (ns per transfer).
//!
//! What is counted: mapping both buffers, writing the control block and starting the channel,
//! polling to the end, unmapping. QEMU's engine model copies the whole chain inside the write
//! that starts the channel, outside the guest's instruction stream, so the copy itself costs no
//! guest instruction here; on a board the engine's own time is added. Times: the PMU cycle
//! counter (the raspi machines' generic timer ticks at 62.5 MHz, too coarse), its reads
//! subtracted.

use alloc::vec;

use super::cycles::Cycles;
use super::dma::{ns, read_overhead};
use super::Recorder;
use crate::dma::api::{FromDevice, ToDevice};
use crate::dma::bounce::platform_pool;
use crate::dma::{Backend, Device};
use crate::drivers::bcm2835_dma::{Bcm2835Dma, Completion, DmaEngineError, Shape, Step};

/// Bytes per transfer.
const CHUNK: usize = 64 << 10;
/// Timed transfers: 1 MiB.
const TRANSFERS: usize = 16;

/// Whether `dev`'s streaming maps bounce (dma-direct with a forced pool, as `dma::direct`
/// decides), or `None` when it is not dma-direct at all.
fn bounces(dev: &Device) -> Option<bool> {
    match dev.backend() {
        Backend::Direct => Some(dev.own_bounce_pool().or_else(platform_pool).is_some_and(|p| p.is_forced())),
        Backend::Iommu(_) => None,
    }
}

fn copy(rec: &Recorder, want_bounce: bool) {
    let engine = match Bcm2835Dma::probe() {
        Ok(e) => e,
        Err(DmaEngineError::NotFound) => return rec.note(format_args!("no brcm,bcm2835-dma controller (a Raspberry Pi machine has one)")),
        Err(e) => return rec.note(format_args!("probe: {e}")),
    };
    match bounces(&engine.dev) {
        Some(b) if b == want_bounce => {}
        Some(b) => return rec.note(format_args!("this boot's dma-direct {} bounce", if b { "does" } else { "does not" })),
        None => return rec.note(format_args!("the engine is behind an IOMMU in this boot")),
    }
    let channel = match engine.claim(true) {
        Ok(c) => c,
        Err(e) => return rec.note(format_args!("no full channel: {e}")),
    };
    let c = Cycles::start();
    let ovh = read_overhead(&c);
    let mut src = vec![0xa5u8; CHUNK];
    let mut dst = vec![0u8; CHUNK];
    let mut total = 0u64;
    for i in 0..=TRANSFERS {
        let (r, t) = c.timed(|| -> Result<(), DmaEngineError> {
            let s = engine.dev.map_single::<ToDevice>(&mut src).map_err(DmaEngineError::Dma)?;
            let d = engine.dev.map_single::<FromDevice>(&mut dst).map_err(DmaEngineError::Dma)?;
            let step = Step { src: s.dma_addr(), dst: d.dma_addr(), shape: Shape::Linear { len: CHUNK as u32 } };
            let run = channel.run(&[step], Completion::Poll);
            d.unmap().map_err(DmaEngineError::Dma)?;
            s.unmap().map_err(DmaEngineError::Dma)?;
            run.map(|_| ())
        });
        if let Err(e) = r {
            return rec.note(format_args!("transfer {i}: {e}"));
        }
        if i > 0 {
            total += t;
        }
    }
    if dst != src {
        return rec.note(format_args!("the copy differs from its source: nothing reported"));
    }
    let total_ns = ns(&c, total.saturating_mul(1000), ovh.saturating_mul(TRANSFERS as u64));
    let bytes = (CHUNK * TRANSFERS) as u128;
    rec.result("copy_bytes_per_s", u64::try_from(bytes * 1_000_000_000 / u128::from(total_ns.max(1))).unwrap_or(u64::MAX), "bytes/s");
    rec.result("copy_request_mean", total_ns / TRANSFERS as u64, "ns");
    rec.note(format_args!(
        "channel {} of {}, {}: {TRANSFERS} copies of {} KiB after one untimed, polled; the engine's own copy time is not in it (QEMU copies inside the start write); {} counter, its reads subtracted",
        channel.index(),
        engine.dev,
        if want_bounce { "swiotlb (swiotlb=force: both buffers bounce)" } else { "dma-direct" },
        CHUNK >> 10,
        if c.is_pmu() { "PMU cycle" } else { "generic timer" },
    ));
}

pub fn direct(rec: &Recorder) {
    copy(rec, false);
}

pub fn swiotlb(rec: &Recorder) {
    copy(rec, true);
}
