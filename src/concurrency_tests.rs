//! Host tests of the allocators the CPUs share (see `smp`): a CMA area, the page allocator behind
//! its lock, and a swiotlb pool behind a lock as `dma::bounce::BouncePool` holds one. The
//! single-threaded model tests next to each allocator check what it returns; these check that
//! several threads using one allocator at once never break its guarantees.
//!
//! Each test runs four threads, each doing a few thousand random operations from its own seeded
//! generator (the operations are deterministic per thread, the interleaving is not): allocations
//! of random sizes, alignments and limits, frees of the thread's own live allocations. A shared
//! [`Owners`] model, one cell per page or slot, is claimed after every allocation and released
//! before every free, so a page or slot the allocator hands to two owners at once, or one it does
//! not manage, fails the claim. Every allocation is also checked against the allocator's range and
//! the alignment it promises, and once everything is freed the counters must be back to their
//! initial values, with the operation counts equal to what the threads did.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Barrier, Mutex};

use proptest::prelude::RngExt;
use proptest::test_runner::{RngAlgorithm, TestRng};

use crate::dma::swiotlb::{Swiotlb, SwiotlbError, IO_TLB_SEGSIZE, IO_TLB_SHIFT, IO_TLB_SIZE};
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::mm::buddy::{self, AllocError, BuddyAllocator};
use crate::mm::cma::{CmaArea, CmaStats};
use crate::mm::phys::LockedPages;

const THREADS: usize = 4;

/// The generator of thread `thread` in test `test`: the same sequence on every run.
fn rng(test: u8, thread: usize) -> TestRng {
    let mut seed = [0u8; 32];
    seed[0] = test;
    seed[1] = thread as u8;
    TestRng::from_seed(RngAlgorithm::ChaCha, &seed)
}

/// What one cell of the model (a page or a slot) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cell {
    /// Not the allocator's to hand out (a hole in the page allocator's span).
    Foreign,
    Free,
    Owned(usize),
}

/// Who holds each cell, as the threads say: the reference the allocators are checked against.
struct Owners(Mutex<Vec<Cell>>);

impl Owners {
    fn new(cells: Vec<Cell>) -> Owners {
        Owners(Mutex::new(cells))
    }

    /// Records cells `first .. first + n` as `owner`'s: each must exist and be free.
    fn claim(&self, first: u64, n: u64, owner: usize, what: &str) {
        let mut cells = self.0.lock().unwrap();
        for i in first..first + n {
            match cells.get(i as usize) {
                Some(Cell::Free) => cells[i as usize] = Cell::Owned(owner),
                c => panic!("{what}: cell {i} handed to thread {owner} while {c:?}"),
            }
        }
    }

    /// Gives back cells `first .. first + n`, which `owner` must hold.
    fn release(&self, first: u64, n: u64, owner: usize) {
        let mut cells = self.0.lock().unwrap();
        for i in first..first + n {
            assert_eq!(cells[i as usize], Cell::Owned(owner), "cell {i} released by thread {owner}");
            cells[i as usize] = Cell::Free;
        }
    }

    fn owned(&self) -> usize {
        self.0.lock().unwrap().iter().filter(|c| matches!(c, Cell::Owned(_))).count()
    }
}

/// What a thread did, summed at the end to check the allocator's counters.
#[derive(Clone, Copy, Default, Debug)]
struct Counts {
    allocs: u64,
    frees: u64,
    failed: u64,
}

impl Counts {
    fn sum(all: &[Counts]) -> Counts {
        all.iter().fold(Counts::default(), |a, c| Counts {
            allocs: a.allocs + c.allocs,
            frees: a.frees + c.frees,
            failed: a.failed + c.failed,
        })
    }
}

/// Runs `body(thread)` on [`THREADS`] threads at once and returns what each reported. The
/// threads start together: spawned one after another, the first could finish a short run before
/// the last one starts.
fn on_threads<F: Fn(usize) -> Counts + Sync>(body: F) -> Vec<Counts> {
    let start = Barrier::new(THREADS);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (body, start) = (&body, &start);
                s.spawn(move || {
                    start.wait();
                    body(t)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a test thread failed")).collect()
    })
}

/// Whether to free rather than allocate: always with `max` live allocations, never with none.
fn free_next(rng: &mut TestRng, live: usize, max: usize) -> bool {
    live > 0 && (live >= max || rng.random_bool(0.45))
}

// ----- CMA -----

const CMA_OPS: usize = 20_000;

/// An area of `pages` pages at `base` with `order_per_bit`, run by four threads.
fn cma_run(test: u8, base: u64, pages: u64, order_per_bit: u32) {
    let area = CmaArea::new("concurrent", PhysAddr(base), pages, order_per_bit).unwrap();
    let granule = 1u64 << order_per_bit;
    let owners = Owners::new(vec![Cell::Free; pages as usize]);
    let counts = on_threads(|t| {
        let mut rng = rng(test, t);
        let mut live: Vec<(PhysAddr, u64)> = Vec::new();
        let mut n = Counts::default();
        let release = |live: &mut Vec<(PhysAddr, u64)>, i: usize, n: &mut Counts| {
            let (p, count) = live.swap_remove(i);
            owners.release((p.as_u64() - base) / PAGE_SIZE, count.next_multiple_of(granule), t);
            assert_eq!(area.release(p, count), Ok(()), "release of {count} pages at {p}");
            n.frees += 1;
        };
        for _ in 0..CMA_OPS {
            if free_next(&mut rng, live.len(), 16) {
                let i = rng.random_range(0..live.len());
                release(&mut live, i, &mut n);
                continue;
            }
            let count = if rng.random_bool(0.8) { rng.random_range(1..=16) } else { rng.random_range(17..=160) };
            let align_order = rng.random_range(0..=10u32);
            let Some(p) = area.alloc(count, align_order) else {
                n.failed += 1;
                continue;
            };
            n.allocs += 1;
            // The area reserves whole granules: they are the caller's alone.
            let taken = count.next_multiple_of(granule);
            let off = p.as_u64().checked_sub(base).expect("allocation below the area");
            assert!(off + taken * PAGE_SIZE <= pages * PAGE_SIZE, "{count} pages at {p} past the area");
            assert_eq!(off % (granule * PAGE_SIZE), 0, "{p} not on a granule");
            let align = PAGE_SIZE << align_order.min(8);
            assert_eq!(p.as_u64() % align, 0, "{p} not aligned to {align:#x}");
            owners.claim(off / PAGE_SIZE, taken, t, "cma");
            live.push((p, count));
        }
        while !live.is_empty() {
            release(&mut live, 0, &mut n);
        }
        n
    });
    let n = Counts::sum(&counts);
    assert_eq!(owners.owned(), 0);
    assert_eq!(
        area.stats(),
        CmaStats {
            total_pages: pages,
            used_pages: 0,
            free_pages: pages,
            largest_free_pages: pages,
            allocs: n.allocs,
            failed_allocs: n.failed,
            releases: n.frees,
            bad_releases: 0,
        }
    );
    // Some of each: the run exercised both a busy and a full area.
    assert!(n.allocs > 1000 && n.failed > 0, "{n:?}");
}

/// One bit per page, the area 6 pages past a 1 MiB boundary so that physical alignment and
/// alignment in the area differ.
#[test]
fn cma_area_shared_by_four_threads() {
    cma_run(1, 0x4000_0000 + 6 * PAGE_SIZE, 1536, 0);
}

/// One bit per 4 pages: requests are rounded up to whole granules.
#[test]
fn cma_area_with_granules_shared_by_four_threads() {
    cma_run(2, 0x4010_0000 + 12 * PAGE_SIZE, 2048, 2);
}

// ----- page allocator -----

const PAGES_OPS: usize = 20_000;
const SPAN_BASE: u64 = 0x4000_0000;
const SPAN_PAGES: u64 = 4096;
/// The free ranges given to the allocator, in pages from the span's base; the rest are holes.
const FREE_RANGES: [(u64, u64); 3] = [(0, 1000), (1024, 3000), (3077, 4096)];

/// How a live page allocation was made, for its free.
#[derive(Clone, Copy, Debug)]
enum Block {
    Order(u32),
    Exact(u64),
}

#[test]
fn page_allocator_shared_by_four_threads() {
    let base = PhysAddr(SPAN_BASE);
    // Metadata in any state: the allocator must not rely on zeroed words.
    let mut meta = vec![!0u64; buddy::metadata_words(base, SPAN_PAGES).unwrap()];
    let mut b = BuddyAllocator::new(base, SPAN_PAGES, &mut meta).unwrap();
    let mut cells = vec![Cell::Foreign; SPAN_PAGES as usize];
    for (start, end) in FREE_RANGES {
        b.add_free_range(PhysAddr(SPAN_BASE + start * PAGE_SIZE), end - start).unwrap();
        cells[start as usize..end as usize].fill(Cell::Free);
    }
    let free_total: u64 = FREE_RANGES.iter().map(|(s, e)| e - s).sum();
    let pages = LockedPages::new(b);
    let initial = pages.stats();
    assert_eq!((initial.total_pages, initial.free_pages), (free_total, free_total));
    let owners = Owners::new(cells);

    let counts = on_threads(|t| {
        let mut rng = rng(3, t);
        let mut live: Vec<(PhysAddr, Block)> = Vec::new();
        let mut n = Counts::default();
        let release = |live: &mut Vec<(PhysAddr, Block)>, i: usize, n: &mut Counts| {
            let (a, block) = live.swap_remove(i);
            let first = (a.as_u64() - SPAN_BASE) / PAGE_SIZE;
            let r = match block {
                Block::Order(order) => {
                    owners.release(first, 1 << order, t);
                    pages.free(a, order)
                }
                Block::Exact(count) => {
                    owners.release(first, count, t);
                    pages.free_exact(a, count)
                }
            };
            assert_eq!(r, Ok(()), "free of {block:?} at {a}");
            n.frees += 1;
        };
        for _ in 0..PAGES_OPS {
            if free_next(&mut rng, live.len(), 24) {
                let i = rng.random_range(0..live.len());
                release(&mut live, i, &mut n);
                continue;
            }
            // A limit anywhere in the span, or a little past it, now and then.
            let limit = rng.random_bool(0.25).then(|| PhysAddr(SPAN_BASE + rng.random_range(0..=SPAN_PAGES + 64) * PAGE_SIZE));
            let (block, r) = if rng.random_bool(0.5) {
                let order = if rng.random_bool(0.7) { rng.random_range(0..=2) } else { rng.random_range(3..=7) };
                (Block::Order(order), pages.alloc(order, limit))
            } else {
                let count = if rng.random_bool(0.7) { rng.random_range(1..=8) } else { rng.random_range(9..=130) };
                (Block::Exact(count), pages.alloc_exact(count, limit))
            };
            let a = match r {
                Ok(a) => a,
                Err(AllocError::OutOfMemory { .. }) => {
                    n.failed += 1;
                    continue;
                }
                Err(e) => panic!("{block:?} below {limit:?}: {e}"),
            };
            n.allocs += 1;
            // The power-of-two block the pages come from: aligned to its size, inside the span,
            // wholly below the limit.
            let (owned, block_pages) = match block {
                Block::Order(order) => (1 << order, 1 << order),
                Block::Exact(count) => (count, count.next_power_of_two()),
            };
            let bytes = block_pages * PAGE_SIZE;
            assert_eq!(a.as_u64() % bytes, 0, "{block:?} at {a} misaligned");
            let off = a.as_u64().checked_sub(SPAN_BASE).expect("block below the span");
            assert!(off + bytes <= SPAN_PAGES * PAGE_SIZE, "{block:?} at {a} past the span");
            if let Some(l) = limit {
                assert!(a.as_u64() + bytes <= l.as_u64(), "{block:?} at {a} not below {l}");
            }
            owners.claim(off / PAGE_SIZE, owned, t, "page allocator");
            live.push((a, block));
        }
        while !live.is_empty() {
            release(&mut live, 0, &mut n);
        }
        n
    });
    let n = Counts::sum(&counts);
    assert_eq!(owners.owned(), 0);
    // Everything merged back: the same free blocks as at the start.
    let s = pages.stats();
    assert_eq!(s.free_pages, free_total);
    assert_eq!(s, buddy::BuddyStats { allocs: n.allocs, frees: n.frees, failed_allocs: n.failed, ..initial });
    assert!(n.allocs > 1000 && n.failed > 0, "{n:?}");
}

// ----- swiotlb -----

const SWIOTLB_OPS: usize = 3000;
const POOL_BASE: u64 = 0x8000_0000;
/// Not a multiple of the segment size: the last segment is partial.
const POOL_SLOTS: u32 = 160;
/// Where thread `t`'s original buffers live: `ORIG_BASE + t * ORIG_STRIDE`, plus an offset.
const ORIG_BASE: u64 = 0x1_0000_0000;
const ORIG_STRIDE: u64 = 1 << 20;

/// The direction of a streaming mapping, as in `dma::maint::Direction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    ToDevice,
    FromDevice,
    Bidirectional,
}

/// A swiotlb pool as the CPUs share it: the slot allocator under a spin lock, as
/// `BouncePool` holds it, and the pool's memory, which every thread reaches (its bytes
/// atomics, so that two owners of one slot garble each other's data rather than race).
/// The copies follow `BouncePool::{map, unmap, sync_for_cpu, sync_for_device}`, which build only
/// for the kernel: map copies the original in after the lock is dropped, unmap copies back under
/// it, the syncs look the original up under it and copy without it.
struct SharedPool {
    tlb: spin::Mutex<Swiotlb>,
    mem: Vec<AtomicU8>,
}

impl SharedPool {
    fn byte(&self, phys: u64) -> &AtomicU8 {
        &self.mem[(phys - POOL_BASE) as usize]
    }

    fn write(&self, phys: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            self.byte(phys + i as u64).store(b, Ordering::Relaxed);
        }
    }

    fn read(&self, phys: u64, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            *b = self.byte(phys + i as u64).load(Ordering::Relaxed);
        }
    }

    fn holds(&self, phys: u64, data: &[u8]) -> bool {
        data.iter().enumerate().all(|(i, &b)| self.byte(phys + i as u64).load(Ordering::Relaxed) == b)
    }
}

/// A live mapping: the original buffer (the thread's own memory, at a made-up physical address)
/// and what its bounce slot must hold.
struct Mapping {
    bounce: u64,
    orig: u64,
    dir: Dir,
    buf: Vec<u8>,
    slot: Vec<u8>,
}

/// A live allocation from the pool and what it must hold.
struct Alloc {
    addr: u64,
    bytes: u64,
    data: Vec<u8>,
}

/// `n` bytes of a pattern drawn afresh from `rng`: two writes almost never hold the same bytes,
/// and one draw per buffer keeps the unoptimised test build fast.
fn random_bytes(rng: &mut TestRng, n: usize) -> Vec<u8> {
    let tag: u64 = rng.random();
    (0..n as u64)
        .map(|i| (tag.wrapping_add(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect()
}

/// The slots `n` bytes at `addr` cover.
fn slots_of(addr: u64, n: u64) -> (u64, u64) {
    let first = (addr - POOL_BASE) >> IO_TLB_SHIFT;
    let last = (addr + n - 1 - POOL_BASE) >> IO_TLB_SHIFT;
    (first, last - first + 1)
}

#[test]
fn swiotlb_pool_shared_by_four_threads() {
    let pool = SharedPool {
        tlb: spin::Mutex::new(Swiotlb::new(PhysAddr(POOL_BASE), POOL_SLOTS).unwrap()),
        mem: (0..u64::from(POOL_SLOTS) * IO_TLB_SIZE).map(|_| AtomicU8::new(0)).collect(),
    };
    let initial = pool.tlb.lock().stats();
    let owners = Owners::new(vec![Cell::Free; POOL_SLOTS as usize]);
    let pool_end = POOL_BASE + u64::from(POOL_SLOTS) * IO_TLB_SIZE;

    let counts = on_threads(|t| {
        let mut rng = rng(4, t);
        let mut maps: Vec<Mapping> = Vec::new();
        let mut allocs: Vec<Alloc> = Vec::new();
        let mut n = Counts::default();
        let unmap = |m: Mapping, n: &mut Counts| {
            assert!(pool.holds(m.bounce, &m.slot), "bounce slot at {:#x} overwritten", m.bounce);
            let (first, count) = slots_of(m.bounce, m.buf.len() as u64);
            owners.release(first, count, t);
            let mut back = m.buf.clone();
            {
                let mut tlb = pool.tlb.lock();
                assert_eq!(tlb.orig(PhysAddr(m.bounce)), Some((PhysAddr(m.orig), m.buf.len() as u64)));
                if m.dir != Dir::ToDevice {
                    pool.read(m.bounce, &mut back);
                }
                assert_eq!(tlb.unmap(PhysAddr(m.bounce), m.buf.len() as u64), Ok(PhysAddr(m.orig)));
            }
            let want = if m.dir == Dir::ToDevice { &m.buf } else { &m.slot };
            assert!(back == *want, "unmap at {:#x} copied back the wrong data", m.bounce);
            n.frees += 1;
        };
        let free = |a: Alloc, n: &mut Counts| {
            assert!(pool.holds(a.addr, &a.data), "allocation at {:#x} overwritten", a.addr);
            let (first, count) = slots_of(a.addr, a.bytes);
            owners.release(first, count, t);
            assert_eq!(pool.tlb.lock().free(PhysAddr(a.addr), a.bytes), Ok(()));
            n.frees += 1;
        };
        for _ in 0..SWIOTLB_OPS {
            let live = maps.len() + allocs.len();
            if free_next(&mut rng, live, 16) {
                let i = rng.random_range(0..live);
                if i < maps.len() {
                    unmap(maps.swap_remove(i), &mut n);
                } else {
                    free(allocs.swap_remove(i - maps.len()), &mut n);
                }
                continue;
            }
            match rng.random_range(0..10) {
                // Map a buffer: the slot must hold the original, at the right alignment.
                0..=4 => {
                    let size = if rng.random_bool(0.8) { rng.random_range(1..=IO_TLB_SIZE) } else { rng.random_range(1..=12 * IO_TLB_SIZE) };
                    let mask = [0, 0, 0x3ff, 0xfff, 0x3fff][rng.random_range(0..5)];
                    let orig = ORIG_BASE + t as u64 * ORIG_STRIDE + rng.random_range(0..2 * PAGE_SIZE);
                    let dir = [Dir::ToDevice, Dir::FromDevice, Dir::Bidirectional][rng.random_range(0..3)];
                    let buf = random_bytes(&mut rng, size as usize);
                    let r = pool.tlb.lock().map(PhysAddr(orig), size, mask);
                    let slot = match r {
                        Ok(slot) => slot,
                        Err(SwiotlbError::Full { .. }) => {
                            n.failed += 1;
                            continue;
                        }
                        Err(e) => panic!("map of {size} bytes at {orig:#x}, mask {mask:#x}: {e}"),
                    };
                    n.allocs += 1;
                    let bounce = slot.addr.as_u64();
                    assert!(bounce >= POOL_BASE && bounce + size <= pool_end, "{size} bytes at {bounce:#x} outside the pool");
                    assert_eq!(bounce & mask, orig & mask, "mask {mask:#x} not kept");
                    let offset = orig & mask & (IO_TLB_SIZE - 1);
                    let align = if mask == 0 && size >= PAGE_SIZE { PAGE_SIZE } else { IO_TLB_SIZE };
                    assert_eq!((bounce - offset) % align, 0, "{size} bytes at {bounce:#x} misaligned");
                    let (first, count) = slots_of(bounce - offset, size + offset);
                    assert_eq!(u64::from(slot.nslots), count);
                    assert_eq!(first / u64::from(IO_TLB_SEGSIZE), (first + count - 1) / u64::from(IO_TLB_SEGSIZE), "mapping across a segment");
                    owners.claim(first, count, t, "swiotlb map");
                    pool.write(bounce, &buf);
                    maps.push(Mapping { bounce, orig, dir, slot: buf.clone(), buf });
                }
                // A restricted pool's allocation: whole pages, aligned to their power of two.
                5..=6 => {
                    let bytes = rng.random_range(1..=4) * PAGE_SIZE;
                    let align = bytes.next_power_of_two();
                    let r = pool.tlb.lock().alloc(bytes, align);
                    let addr = match r {
                        Ok(slot) => slot.addr.as_u64(),
                        Err(SwiotlbError::Full { .. }) => {
                            n.failed += 1;
                            continue;
                        }
                        Err(e) => panic!("alloc of {bytes} bytes aligned to {align:#x}: {e}"),
                    };
                    n.allocs += 1;
                    assert!(addr >= POOL_BASE && addr + bytes <= pool_end, "{bytes} bytes at {addr:#x} outside the pool");
                    assert_eq!(addr % align, 0, "allocation at {addr:#x} not aligned to {align:#x}");
                    let (first, count) = slots_of(addr, bytes);
                    owners.claim(first, count, t, "swiotlb alloc");
                    let data = random_bytes(&mut rng, bytes as usize);
                    pool.write(addr, &data);
                    allocs.push(Alloc { addr, bytes, data });
                }
                // The device writes part of a mapping, then the CPU syncs it.
                7..=8 if !maps.is_empty() => {
                    let i = rng.random_range(0..maps.len());
                    let m = &mut maps[i];
                    let size = m.buf.len() as u64;
                    let off = rng.random_range(0..size);
                    let len = rng.random_range(1..=size - off);
                    let (from, to) = (off as usize, (off + len) as usize);
                    if m.dir != Dir::ToDevice {
                        let data = random_bytes(&mut rng, len as usize);
                        pool.write(m.bounce + off, &data);
                        m.slot[from..to].copy_from_slice(&data);
                    }
                    let orig = pool.tlb.lock().orig_of(PhysAddr(m.bounce + off), len);
                    assert_eq!(orig, Some(PhysAddr(m.orig + off)), "sync of {len} bytes at {:#x}", m.bounce + off);
                    if m.dir != Dir::ToDevice {
                        pool.read(m.bounce + off, &mut m.buf[from..to]);
                        assert!(m.buf[from..to] == m.slot[from..to], "sync for the CPU at {:#x} read the wrong data", m.bounce);
                    }
                }
                // The CPU writes part of the buffer, then syncs it for the device.
                _ if !maps.is_empty() => {
                    let i = rng.random_range(0..maps.len());
                    let m = &mut maps[i];
                    let size = m.buf.len() as u64;
                    let off = rng.random_range(0..size);
                    let len = rng.random_range(1..=size - off);
                    let (from, to) = (off as usize, (off + len) as usize);
                    let data = random_bytes(&mut rng, len as usize);
                    m.buf[from..to].copy_from_slice(&data);
                    let orig = pool.tlb.lock().orig_of(PhysAddr(m.bounce + off), len);
                    assert_eq!(orig, Some(PhysAddr(m.orig + off)), "sync of {len} bytes at {:#x}", m.bounce + off);
                    if m.dir != Dir::FromDevice {
                        pool.write(m.bounce + off, &data);
                        m.slot[from..to].copy_from_slice(&data);
                    }
                }
                _ => {}
            }
        }
        for m in maps.drain(..) {
            unmap(m, &mut n);
        }
        for a in allocs.drain(..) {
            free(a, &mut n);
        }
        n
    });
    let n = Counts::sum(&counts);
    assert_eq!(owners.owned(), 0);
    let s = pool.tlb.lock().stats();
    assert_eq!((s.total, s.used, s.allocated, s.failed), (initial.total, 0, 0, n.failed));
    assert!(s.high_water <= s.total);
    assert!(n.allocs > 1000 && n.failed > 0, "{n:?}");
    assert_eq!(n.allocs, n.frees);
}
