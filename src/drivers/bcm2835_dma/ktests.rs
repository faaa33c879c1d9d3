//! The BCM2835 DMA engine against the real (QEMU) engine: copies of many sizes and offsets,
//! chains, 2-D gather/scatter, completion by interrupt and by polling, refusals and a time-out,
//! each checked byte for byte, including the bytes around the destination. Buffers are the
//! kernel's own (heap, or pages of the page allocator) mapped with the streaming API, so the same
//! cases exercise dma-direct, `swiotlb=force` and, for the control blocks, dma-remap.

use super::{Bcm2835Dma, Completion, DmaEngineError, Finished, Shape, Step};
use crate::dma::api::{DmaAttrs, FromDevice, SgEntry, ToDevice};
use crate::dma::maint::Direction;
use crate::ktest::{NotPassed, TestResult};
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::{kassert, kassert_eq, kskip, ktry};
use alloc::vec;
use alloc::vec::Vec;

/// Bytes on each side of a destination that must stay as they were.
const GUARD: usize = 64;
const GUARD_BYTE: u8 = 0x5a;

/// A pseudo-random byte pattern (xorshift32), the same for the same seed: the expected data.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The engine, or a skip saying why there is none to test.
fn engine() -> Result<Bcm2835Dma, NotPassed> {
    match Bcm2835Dma::probe() {
        Ok(e) if e.usable() != 0 => Ok(e),
        Ok(e) => {
            let (dt, fw) = e.masks();
            kskip!("no usable DMA channel: brcm,dma-channel-mask {dt:#06x}, firmware grants {fw:?}")
        }
        Err(DmaEngineError::NotFound) => kskip!("no brcm,bcm2835-dma controller in the device tree"),
        Err(e) => Err(crate::ktest::fail_display(file!(), line!(), "Bcm2835Dma::probe()", e)),
    }
}

/// Copies `len` bytes from `src_off` of a source buffer to `dst_off` of a guarded destination
/// with one control block, completion `how`; checks the copy and the guards, and says how the
/// end was noticed.
fn copy_checked(e: &Bcm2835Dma, len: usize, src_off: usize, dst_off: usize, how: Completion) -> Result<Finished, NotPassed> {
    let ch = ktry!(e.claim(false));
    let src_all = pattern(len as u32 ^ (src_off as u32) << 20, src_off + len);
    let mut src = src_all.clone();
    let mut dst = vec![GUARD_BYTE; GUARD + dst_off + len + GUARD];
    let at = GUARD + dst_off;
    let finished = {
        let s = ktry!(e.dev.map_single::<ToDevice>(&mut src[src_off..]));
        let d = ktry!(e.dev.map_single::<FromDevice>(&mut dst[at..at + len]));
        let step = Step { src: s.dma_addr(), dst: d.dma_addr(), shape: Shape::Linear { len: len as u32 } };
        let r = ch.run(&[step], how);
        ktry!(d.unmap());
        ktry!(s.unmap());
        ktry!(r)
    };
    kassert!(src == src_all, "the source changed");
    if let Some(i) = (0..len).find(|&i| dst[at + i] != src_all[src_off + i]) {
        kassert!(false, "{len} bytes {src_off}->{dst_off} on channel {}: first difference at byte {i}", ch.index());
    }
    let untouched = dst[..at].iter().chain(&dst[at + len..]).all(|&b| b == GUARD_BYTE);
    kassert!(untouched, "bytes around the destination changed ({len} bytes at offset {dst_off})");
    Ok(finished)
}

fn copies_of_many_sizes() -> TestResult {
    let e = engine()?;
    for len in [4, 8, 12, 60, 64, 252, 256, 1020, 4096, 4100, 3 * 4096 + 12, 16 * 1024 + 4, 64 * 1024, 200 * 1024] {
        copy_checked(&e, len, 0, 0, Completion::Auto)?;
    }
    Ok(())
}

fn copies_at_offsets() -> TestResult {
    let e = engine()?;
    for (src_off, dst_off) in [(1, 0), (0, 3), (2, 2), (4, 8), (3, 5), (4095, 1), (4092, 4094)] {
        for len in [4, 64, 4096, 8200] {
            copy_checked(&e, len, src_off, dst_off, Completion::Auto)?;
        }
    }
    Ok(())
}

/// Single pages of the page allocator, every other one of a run, so that they are not
/// contiguous; freed by the caller.
fn scattered_pages(n: usize) -> Result<(Vec<PhysAddr>, Vec<PhysAddr>), NotPassed> {
    let mut all = Vec::new();
    for _ in 0..2 * n {
        all.push(ktry!(crate::mm::phys::alloc_pages(0)));
    }
    let (keep, spare): (Vec<_>, Vec<_>) = all.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    Ok((keep.into_iter().map(|(_, p)| *p).collect(), spare.into_iter().map(|(_, p)| *p).collect()))
}

fn chain_over_noncontiguous_pages() -> TestResult {
    let e = engine()?;
    let ch = ktry!(e.claim(false));
    const PAGES: usize = 5;
    let (pages, spare) = scattered_pages(PAGES)?;
    for p in &spare {
        ktry!(crate::mm::phys::free_pages(*p, 0));
    }
    let page = PAGE_SIZE as usize;
    kassert!(pages.windows(2).all(|w| w[0].0.abs_diff(w[1].0) != PAGE_SIZE), "pages came out contiguous: {pages:?}");
    let expect = pattern(77, PAGES * page);
    for (i, p) in pages.iter().enumerate() {
        // SAFETY: a page just allocated for this test, identity-mapped RAM, freed below.
        let bytes = unsafe { core::slice::from_raw_parts_mut(p.0 as usize as *mut u8, page) };
        bytes.copy_from_slice(&expect[i * page..(i + 1) * page]);
    }
    let mut sg: Vec<SgEntry> = pages.iter().map(|p| SgEntry::new(*p, PAGE_SIZE)).collect();
    let mut dst = vec![GUARD_BYTE; GUARD + PAGES * page + GUARD];
    let r = (|| -> TestResult {
        ktry!(e.dev.map_sg(&mut sg, Direction::ToDevice, DmaAttrs::NONE));
        let d = ktry!(e.dev.map_single::<FromDevice>(&mut dst[GUARD..GUARD + PAGES * page]));
        let base = d.dma_addr();
        let steps: Vec<Step> = sg
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.dma.map(|a| Step { src: a, dst: crate::dma::busmap::DmaAddr(base.0 + (i * page) as u64), shape: Shape::Linear { len: page as u32 } }))
            .collect();
        let r = ch.run(&steps, Completion::Auto);
        ktry!(d.unmap());
        ktry!(e.dev.unmap_sg(&mut sg, Direction::ToDevice, DmaAttrs::NONE));
        kassert_eq!(steps.len(), PAGES);
        ktry!(r);
        Ok(())
    })();
    for p in &pages {
        ktry!(crate::mm::phys::free_pages(*p, 0));
    }
    r?;
    kassert!(dst[GUARD..GUARD + PAGES * page] == expect[..], "the gathered pages differ");
    kassert!(dst[..GUARD].iter().chain(&dst[GUARD + PAGES * page..]).all(|&b| b == GUARD_BYTE), "guard bytes changed");
    Ok(())
}

fn chain_of_control_blocks() -> TestResult {
    let e = engine()?;
    let ch = ktry!(e.claim(false));
    // (source offset, destination offset, length): out of order, with gaps left untouched.
    let pieces = [(0usize, 4096usize, 512usize), (512, 0, 4), (1000, 100, 1024), (3000, 2000, 2048), (8000, 5000, 4000)];
    let src_all = pattern(5, 12 * 1024);
    let mut src = src_all.clone();
    let mut dst = vec![GUARD_BYTE; 10 * 1024];
    {
        let s = ktry!(e.dev.map_single::<ToDevice>(&mut src));
        let d = ktry!(e.dev.map_single::<FromDevice>(&mut dst));
        let steps: Vec<Step> = pieces
            .iter()
            .map(|&(so, d_off, len)| Step {
                src: crate::dma::busmap::DmaAddr(s.dma_addr().0 + so as u64),
                dst: crate::dma::busmap::DmaAddr(d.dma_addr().0 + d_off as u64),
                shape: Shape::Linear { len: len as u32 },
            })
            .collect();
        let r = ch.run(&steps, Completion::Auto);
        ktry!(d.unmap());
        ktry!(s.unmap());
        ktry!(r);
    }
    let mut expect = vec![GUARD_BYTE; dst.len()];
    for (so, d_off, len) in pieces {
        expect[d_off..d_off + len].copy_from_slice(&src_all[so..so + len]);
    }
    if let Some(i) = (0..dst.len()).find(|&i| dst[i] != expect[i]) {
        kassert!(false, "destination differs from the model at byte {i}: {:#04x} != {:#04x}", dst[i], expect[i]);
    }
    Ok(())
}

fn two_d_gather_and_scatter() -> TestResult {
    let e = engine()?;
    let ch = match e.claim(true) {
        Ok(c) => c,
        Err(err) => kskip!("no full (non-lite) channel for 2-D mode: {err}"),
    };
    let (row, rows, pitch) = (64usize, 8usize, 256usize);
    // Gather: rows `pitch` apart in the source, packed in the destination.
    let src_all = pattern(9, pitch * rows);
    let mut src = src_all.clone();
    let mut dst = vec![GUARD_BYTE; row * rows + GUARD];
    {
        let s = ktry!(e.dev.map_single::<ToDevice>(&mut src));
        let d = ktry!(e.dev.map_single::<FromDevice>(&mut dst[..row * rows]));
        let shape = Shape::Rect { row_len: row as u16, rows: rows as u16, src_stride: (pitch - row) as i16, dst_stride: 0 };
        let r = ch.run(&[Step { src: s.dma_addr(), dst: d.dma_addr(), shape }], Completion::Auto);
        ktry!(d.unmap());
        ktry!(s.unmap());
        ktry!(r);
    }
    let gathered: Vec<u8> = (0..rows).flat_map(|r| src_all[r * pitch..r * pitch + row].iter().copied()).collect();
    kassert!(dst[..row * rows] == gathered[..], "gathered rows differ");
    kassert!(dst[row * rows..].iter().all(|&b| b == GUARD_BYTE), "bytes after the gathered rows changed");

    // Scatter: packed rows spread `pitch` apart; the gaps between rows stay as they were.
    let packed_all = pattern(10, row * rows);
    let mut packed = packed_all.clone();
    let mut spread = vec![GUARD_BYTE; pitch * rows + GUARD];
    {
        let s = ktry!(e.dev.map_single::<ToDevice>(&mut packed));
        let d = ktry!(e.dev.map_single::<FromDevice>(&mut spread[..pitch * rows]));
        let shape = Shape::Rect { row_len: row as u16, rows: rows as u16, src_stride: 0, dst_stride: (pitch - row) as i16 };
        let r = ch.run(&[Step { src: s.dma_addr(), dst: d.dma_addr(), shape }], Completion::Auto);
        ktry!(d.unmap());
        ktry!(s.unmap());
        ktry!(r);
    }
    for r in 0..rows {
        kassert!(spread[r * pitch..r * pitch + row] == packed_all[r * row..(r + 1) * row], "scattered row {r} differs");
        kassert!(spread[r * pitch + row..(r + 1) * pitch].iter().all(|&b| b == GUARD_BYTE), "gap after row {r} changed");
    }
    kassert!(spread[pitch * rows..].iter().all(|&b| b == GUARD_BYTE), "bytes after the last row changed");
    Ok(())
}

fn completion_by_interrupt() -> TestResult {
    let e = engine()?;
    let ch = ktry!(e.claim(false));
    if let Err(why) = e.interrupt_of(ch.index()) {
        kskip!("channel {} has no interrupt wired: {why}", ch.index());
    }
    let before = Bcm2835Dma::interrupts_handled();
    let n = ch.index();
    drop(ch);
    let finished = copy_checked(&e, 4096, 0, 0, Completion::Interrupt)?;
    kassert!(finished.by_interrupt, "the end was not noticed by interrupt");
    let after = Bcm2835Dma::interrupts_handled();
    kassert_eq!(after.wrapping_sub(before), 1, "interrupt handler runs for one transfer on channel {n}");
    kassert!(!crate::arch::irq::enabled(), "IRQs left unmasked");
    Ok(())
}

fn completion_by_polling() -> TestResult {
    let e = engine()?;
    let before = Bcm2835Dma::interrupts_handled();
    let finished = copy_checked(&e, 4096, 4, 8, Completion::Poll)?;
    kassert!(!finished.by_interrupt, "a polled transfer reports an interrupt");
    kassert_eq!(Bcm2835Dma::interrupts_handled(), before, "a polled transfer raised an interrupt");
    Ok(())
}

fn refused_lengths() -> TestResult {
    let e = engine()?;
    let ch = ktry!(e.claim(false));
    let mut buf = vec![GUARD_BYTE; 256];
    let d = ktry!(e.dev.map_single::<FromDevice>(&mut buf));
    let a = d.dma_addr();
    let mut refused = Vec::new();
    for len in [0u32, 1, 2, 3, 5, 6, 7, 250] {
        refused.push(ch.run(&[Step { src: a, dst: a, shape: Shape::Linear { len } }], Completion::Auto));
    }
    refused.push(ch.run(&[Step { src: a, dst: a, shape: Shape::Rect { row_len: 6, rows: 2, src_stride: 0, dst_stride: 0 } }], Completion::Auto));
    refused.push(ch.run(&[], Completion::Auto));
    ktry!(d.unmap());
    for (i, r) in refused.iter().enumerate() {
        match r {
            Err(DmaEngineError::BadLength { .. }) | Err(DmaEngineError::StepCount(0)) => {}
            other => kassert!(false, "case {i}: expected a refusal, got {other:?}"),
        }
    }
    crate::println!("# {}", refused[1].err().map(|e| alloc::format!("{e}")).unwrap_or_default());
    kassert!(buf.iter().all(|&b| b == GUARD_BYTE), "a refused transfer wrote memory");
    // The channel is still fine.
    drop(ch);
    copy_checked(&e, 64, 0, 0, Completion::Auto).map(drop)
}

fn time_out_resets_the_channel() -> TestResult {
    let e = engine()?;
    let ch = ktry!(e.claim(false));
    let n = ch.index();
    let src_all = pattern(3, 1024);
    let mut src = src_all.clone();
    let mut dst = vec![GUARD_BYTE; 1024];
    // A channel switched off in the global ENABLE register never starts.
    e.set_channel_enabled(n, false);
    let r = {
        let s = ktry!(e.dev.map_single::<ToDevice>(&mut src));
        let d = ktry!(e.dev.map_single::<FromDevice>(&mut dst));
        let step = Step { src: s.dma_addr(), dst: d.dma_addr(), shape: Shape::Linear { len: 1024 } };
        let r = ch.run_with_timeout(&[step], Completion::Poll, 20_000_000);
        e.set_channel_enabled(n, true);
        ktry!(d.unmap());
        ktry!(s.unmap());
        r
    };
    match r {
        Err(DmaEngineError::Timeout { channel, .. }) => {
            kassert_eq!(channel, n);
            crate::println!("# {}", r.err().map(|e| alloc::format!("{e}")).unwrap_or_default());
        }
        other => kassert!(false, "a disabled channel gave {other:?}, not a time-out"),
    }
    kassert!(dst.iter().all(|&b| b == GUARD_BYTE), "the disabled channel wrote memory");
    // Reset and enabled again, the same channel copies.
    drop(ch);
    copy_checked(&e, 1024, 0, 0, Completion::Auto).map(drop)
}

crate::ktest_suite!("bcm2835_dma", [
    copies_of_many_sizes,
    copies_at_offsets,
    chain_over_noncontiguous_pages,
    chain_of_control_blocks,
    two_d_gather_and_scatter,
    completion_by_interrupt,
    completion_by_polling,
    refused_lengths,
    time_out_resets_the_channel,
]);
