//! CMA set-up and placement on fuzzed input.
//!
//! 1. With a valid tree: the memory map is built as in `memmap`, then, if that succeeded (the
//!    kernel stops otherwise), `CmaSetup::new` with a fuzzed `cma=` value (none by default). Its
//!    areas must lie in RAM, be aligned, not overlap one another, and be recorded in the map,
//!    which must keep its invariants.
//! 2. `place_area` with fuzzed requests, against the map's layout or a fuzzed one; a placement it
//!    returns must satisfy the request (alignment, limit, window, alloc-ranges, one RAM bank, clear
//!    of every reservation and no-map region).

#![no_main]

use dmakern::dt::DeviceTree;
use dmakern::mm::addr::{align_down, PhysAddr};
use dmakern::mm::cma::setup::CmaSetup;
use dmakern::mm::cma::{parse_cma, place_area, AreaRequest, MemoryLayout, CMA_MIN_ALIGNMENT};
use dmakern::mm::memmap::{MemoryMap, ReservationKind};
use dmakern_fuzz::{check_map, render, split_dtb, BootLayout, Gen};
use libfuzzer_sys::fuzz_target;

/// `place_area` calls per input.
const MAX_REQUESTS: usize = 32;

type Ranges = Vec<(PhysAddr, u64)>;

fuzz_target!(|data: &[u8]| {
    let (dt, trailer) = split_dtb(data);
    let mut g = Gen::new(trailer);
    let mut map = MemoryMap::new();
    if let Some(dt) = dt {
        let built = memory_map(&dt, &mut g);
        let cma_arg = g.bool().then(|| g.str(48));
        if let Some(arg) = cma_arg {
            match parse_cma(arg) {
                Ok(c) => {
                    let _ = (
                        c.is_disabled(),
                        c.request(None),
                        c.request(Some(PhysAddr::new(1 << 30))),
                    );
                }
                Err(e) => drop(render(&e)),
            }
        }
        if let Some(built) = built {
            map = built;
            check_map(&map);
            let setup = CmaSetup::new(&dt, cma_arg, &mut map);
            check_setup(&dt, &setup, &map);
        }
    }
    g.anchor_on(&map);
    let from_map = layout_of(&map);
    for _ in 0..MAX_REQUESTS {
        if g.is_empty() {
            break;
        }
        let fuzzed;
        let (ram, reserved, no_map) = if g.bool() {
            (&from_map.0, &from_map.1, &from_map.2)
        } else {
            fuzzed = (ranges(&mut g, 8), ranges(&mut g, 8), ranges(&mut g, 4));
            (&fuzzed.0, &fuzzed.1, &fuzzed.2)
        };
        let mem = MemoryLayout {
            ram,
            reserved,
            no_map,
        };
        let alloc_ranges = if g.bool() {
            ranges(&mut g, 4)
        } else {
            Vec::new()
        };
        let req = AreaRequest {
            size: g.addr(),
            align: match g.choose(3) {
                0 => 0,
                1 => 1u64 << (g.u8() % 64),
                _ => g.u64(),
            },
            fixed_base: g.bool().then(|| PhysAddr::new(g.addr())),
            lower: PhysAddr::new(if g.bool() { g.addr() } else { 0 }),
            limit: g.bool().then(|| PhysAddr::new(g.addr())),
            alloc_ranges: &alloc_ranges,
        };
        match place_area(&req, &mem) {
            Ok(placed) => check_placement(&req, &mem, placed.base.as_u64(), placed.size),
            Err(e) => drop(render(&e)),
        }
    }
});

/// The memory map as the kernel builds it. The kernel stops booting when this fails, so CMA set-up
/// never sees a tree the map refused.
fn memory_map(dt: &DeviceTree<'_>, g: &mut Gen<'_>) -> Option<MemoryMap> {
    let boot = BootLayout::of(dt, g);
    let dt = dt.with_phys_base(boot.dtb);
    MemoryMap::from_dt(&dt, boot.kernel)
        .map_err(|e| render(&e))
        .ok()
}

fn check_setup(dt: &DeviceTree<'_>, setup: &CmaSetup, map: &MemoryMap) {
    check_map(map);
    render(map);
    let mut report = String::new();
    setup
        .write_report(&mut report)
        .expect("formatting into a String cannot fail");
    for line in &setup.log {
        assert!(line.starts_with("cma: "), "log line without prefix: {line}");
    }
    for r in &setup.refusals {
        render(&r.reason);
    }
    let areas: Vec<_> = setup
        .areas
        .iter()
        .map(|a| (a.area.base().as_u64(), a.area.size()))
        .collect();
    for (i, &(base, size)) in areas.iter().enumerate() {
        let a = &setup.areas[i].area;
        assert!(size > 0, "empty area {}", a.name());
        assert!(
            base.is_multiple_of(CMA_MIN_ALIGNMENT) && size.is_multiple_of(CMA_MIN_ALIGNMENT),
            "area {} at {base:#x}+{size:#x} not aligned to the CMA minimum",
            a.name()
        );
        let region = dmakern_fuzz::region(base, size).expect("area wraps the address space");
        assert!(
            map.is_ram(&region),
            "area {} {region} not inside one RAM bank",
            a.name()
        );
        assert!(
            map.reservations().iter().any(|r| r.region.contains(&region)
                && !matches!(r.kind, ReservationKind::ReservedMemory { no_map: true })),
            "area {} {region} not reserved in the map",
            a.name()
        );
        for &(b2, s2) in &areas[..i] {
            assert!(
                base >= b2 + s2 || b2 >= base + size,
                "areas overlap at {region}"
            );
        }
        assert!(setup.area_containing(a.base(), 1).is_some());
        assert!(setup.area_named(a.name()).is_some());
    }
    if let Some(d) = setup.default {
        assert!(d < setup.areas.len(), "default index {d} out of range");
    }
    let _ = setup.default_area();
    for node in dt.nodes() {
        match setup.area_for_device(dt, &node) {
            Ok(_) => {}
            Err(e) => drop(render(&e)),
        }
    }
}

fn layout_of(map: &MemoryMap) -> (Ranges, Ranges, Ranges) {
    let ram = map.ram().iter().map(|r| (r.base(), r.size())).collect();
    let (mut reserved, mut no_map) = (Vec::new(), Vec::new());
    for r in map.reservations() {
        let range = (r.region.base(), r.region.size());
        match r.kind {
            ReservationKind::ReservedMemory { no_map: true } => no_map.push(range),
            _ => reserved.push(range),
        }
    }
    (ram, reserved, no_map)
}

fn ranges(g: &mut Gen<'_>, max: usize) -> Ranges {
    let n = g.choose(max + 1);
    (0..n)
        .map(|_| (PhysAddr::new(g.addr()), g.addr()))
        .collect()
}

/// Exclusive end of a `(base, size)` range, exact.
fn end(r: (PhysAddr, u64)) -> u128 {
    u128::from(r.0.as_u64()) + u128::from(r.1)
}

/// The contract of `place_area` for a placement it returned.
fn check_placement(req: &AreaRequest<'_>, mem: &MemoryLayout<'_>, base: u64, size: u64) {
    let align = req.align.max(CMA_MIN_ALIGNMENT);
    let what = format!("place_area({req:?}) = {base:#x}+{size:#x} in {mem:?}");
    assert!(
        base.is_multiple_of(align) && size.is_multiple_of(align),
        "{what}: misaligned"
    );
    assert!(size >= req.size, "{what}: smaller than requested");
    let (b, e) = (u128::from(base), u128::from(base) + u128::from(size));
    assert!(e <= 1u128 << 64, "{what}: wraps");
    if let Some(fixed) = req.fixed_base {
        assert_eq!(base, fixed.as_u64(), "{what}: fixed area moved");
    } else {
        assert!(base >= req.lower.as_u64(), "{what}: below `lower`");
        if !req.alloc_ranges.is_empty() {
            assert!(
                req.alloc_ranges
                    .iter()
                    .any(|&r| u128::from(r.0.as_u64()) <= b && e <= end(r)),
                "{what}: outside every alloc-range"
            );
        }
    }
    if let Some(limit) = req.limit {
        assert!(
            e <= u128::from(align_down(limit.as_u64(), align)),
            "{what}: beyond the limit"
        );
    }
    assert!(
        mem.ram
            .iter()
            .any(|&r| u128::from(r.0.as_u64()) <= b && e <= end(r)),
        "{what}: not inside one RAM bank"
    );
    for &r in mem.reserved.iter().chain(mem.no_map) {
        let overlaps = r.1 != 0 && u128::from(r.0.as_u64()) < e && b < end(r);
        assert!(!overlaps, "{what}: overlaps {r:?}");
    }
}
