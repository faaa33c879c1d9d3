//! `MemoryMap::from_dt` on the fuzzed tree (kernel image and DTB placed as the trailer says, by
//! default as on QEMU virt), then a sequence of `alloc_early` / `reserve` / `add_ram` calls read
//! from the rest of the trailer. After every step the map must still keep its documented
//! invariants; a call that fails must leave the map unchanged; a successful allocation must be
//! aligned, below its limit and recorded.
//!
//! Without a valid tree the sequence runs on an empty map, so the map's own logic is fuzzed even
//! when the mutated bytes are no DTB.

#![no_main]

use dmakern::mm::addr::{align_up, PhysAddr, PAGE_SIZE};
use dmakern::mm::memmap::{MemoryMap, Region};
use dmakern_fuzz::{check_map, region, render, split_dtb, BootLayout, Gen};
use libfuzzer_sys::fuzz_target;

/// Calls after the initial map; bounds the run time of one input.
const MAX_OPS: usize = 256;

fuzz_target!(|data: &[u8]| {
    let (dt, trailer) = split_dtb(data);
    let mut g = Gen::new(trailer);
    let mut map = match dt {
        Some(dt) => {
            let boot = BootLayout::of(&dt, &mut g);
            let dt = dt.with_phys_base(boot.dtb);
            match MemoryMap::from_dt(&dt, boot.kernel.clone()) {
                Ok(map) => {
                    check_from_dt(&map, &boot);
                    map
                }
                Err(e) => {
                    render(&e);
                    MemoryMap::new()
                }
            }
        }
        None => MemoryMap::new(),
    };
    check_map(&map);
    for _ in 0..MAX_OPS {
        if g.is_empty() {
            break;
        }
        g.anchor_on(&map);
        step(&mut map, &mut g);
        check_map(&map);
    }
    render(&map);
});

/// What `from_dt` promises beyond the map's invariants: the kernel image is reserved.
fn check_from_dt(map: &MemoryMap, boot: &BootLayout) {
    let kernel =
        Region::from_range(boot.kernel.clone()).expect("from_dt accepted the kernel range");
    assert!(
        map.reservations()
            .iter()
            .any(|r| r.region.contains(&kernel)),
        "kernel {kernel} not reserved in {map:?}"
    );
}

fn step(map: &mut MemoryMap, g: &mut Gen<'_>) {
    let before = map.clone();
    match g.choose(5) {
        0 => {
            let size = g.addr();
            let align = match g.choose(3) {
                0 => 1u64 << (g.u8() % 64),
                1 => PAGE_SIZE,
                _ => g.u64(),
            };
            let below = g.bool().then(|| g.addr());
            let kind = g.kind();
            let name = g.str(40);
            match map.alloc_early(size, align, below, kind, name) {
                Ok(base) => check_alloc(map, base, size, align, below),
                Err(e) => {
                    render(&e);
                    assert_unchanged(&before, map, "failed alloc_early");
                }
            }
        }
        1 => {
            let (base, size) = (g.addr(), g.addr());
            let kind = g.kind();
            let name = g.str(40);
            match map.reserve(PhysAddr::new(base), size, kind, name) {
                Ok(()) => {
                    let r = region(base, size).expect("reserve accepted a wrapping region");
                    assert!(
                        map.reservations()
                            .iter()
                            .any(|x| x.region == r && x.kind == kind),
                        "reserve({r}) succeeded but is not recorded"
                    );
                }
                Err(e) => {
                    render(&e);
                    assert_unchanged(&before, map, "failed reserve");
                }
            }
        }
        2 => {
            let (base, size) = (g.addr(), g.addr());
            if let Some(r) = region(base, size) {
                match map.add_ram(r) {
                    Ok(()) => assert!(r.is_empty() || map.is_ram(&r), "add_ram({r}) not RAM"),
                    Err(e) => {
                        render(&e);
                        assert_unchanged(&before, map, "failed add_ram");
                    }
                }
            }
        }
        3 => {
            let (base, size) = (g.addr(), g.addr());
            if let Some(r) = region(base, size) {
                let _ = (map.is_ram(&r), map.overlaps_reservation(&r));
            }
        }
        _ => {
            let _ = (map.total_ram(), map.total_free(), map.free_ranges().count());
        }
    }
}

fn check_alloc(map: &MemoryMap, base: PhysAddr, size: u64, align: u64, below: Option<u64>) {
    let align = align.max(PAGE_SIZE);
    let len = align_up(size, PAGE_SIZE).expect("alloc_early accepted a size that overflows");
    let b = base.as_u64();
    assert!(
        b.is_multiple_of(align),
        "alloc_early({size:#x}, {align:#x}) = {base}: misaligned"
    );
    let r = region(b, len).expect("alloc_early returned a wrapping region");
    if let Some(limit) = below {
        assert!(
            r.end() <= limit,
            "alloc_early below {limit:#x} returned {r}"
        );
    }
    assert!(
        map.reservations().iter().any(|x| x.region == r),
        "alloc_early returned {r} but did not record it"
    );
}

fn assert_unchanged(before: &MemoryMap, after: &MemoryMap, what: &str) {
    assert!(
        before.ram() == after.ram() && before.reservations() == after.reservations(),
        "{what} changed the map: {before:?} -> {after:?}"
    );
}
