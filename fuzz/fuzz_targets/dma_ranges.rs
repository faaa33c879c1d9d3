//! The `dma-ranges` bus map (`src/dma/busmap.rs`): `BusMap::from_dt` for every node of the fuzzed
//! tree, or, without a valid tree, `BusMap::from_windows` with fuzzed windows; then lookups at the
//! windows' edges and at fuzzed addresses. Every translation returned must come from a window that
//! holds the whole range, and `max_reachable` must keep its promise at the limit it returns.

#![no_main]

use dmakern::dma::busmap::{BusMap, DmaAddr, Window, MAX_WINDOWS};
use dmakern::mm::addr::PhysAddr;
use dmakern_fuzz::{render, split_dtb, Gen};
use libfuzzer_sys::fuzz_target;

/// Fuzzed probe addresses per map.
const PROBES: usize = 8;

fuzz_target!(|data: &[u8]| {
    let (dt, trailer) = split_dtb(data);
    let mut g = Gen::new(trailer);
    match dt {
        Some(dt) => {
            for node in dt.nodes() {
                match BusMap::from_dt(&node) {
                    Ok(map) => check_map(&map, &mut g),
                    Err(e) => drop(render(&e)),
                }
            }
        }
        None => {
            let n = g.choose(MAX_WINDOWS + 2);
            let windows: Vec<Window> = (0..n)
                .filter_map(|_| {
                    Window::new(PhysAddr::new(g.addr()), DmaAddr::new(g.addr()), g.addr())
                })
                .collect();
            match BusMap::from_windows(&windows) {
                Ok(map) => check_map(&map, &mut g),
                Err(e) => drop(render(&e)),
            }
        }
    }
});

fn check_map(map: &BusMap, g: &mut Gen<'_>) {
    render(map);
    render(&format_args!("{map:?}"));
    let _ = map.clipped();
    let windows = map.windows();
    assert_eq!(map.is_identity(), windows.is_empty());
    assert!(windows.len() <= MAX_WINDOWS, "{} windows", windows.len());
    g.anchors.clear();
    for w in windows {
        assert!(w.size() > 0, "empty window in {map:?}");
        let (c, b, s) = (
            u128::from(w.cpu().as_u64()),
            u128::from(w.bus().as_u64()),
            u128::from(w.size()),
        );
        assert!(
            c + s <= 1 << 64 && b + s <= 1 << 64,
            "window {w:?} runs past 2^64"
        );
        let last = w.size() - 1;
        for (off, len) in [(0, 0), (0, 1), (0, w.size()), (last, 1), (last, 0)] {
            probe(map, w.cpu().as_u64() + off, len);
            probe_bus(map, w.bus().as_u64() + off, len);
        }
        g.anchors.extend([w.cpu().as_u64(), w.bus().as_u64()]);
        g.anchors.push(w.cpu().as_u64().wrapping_add(w.size()));
    }
    for _ in 0..PROBES {
        let (addr, len) = (g.addr(), g.addr());
        probe(map, addr, len);
        probe_bus(map, addr, len);
    }
    for mask in [0xffff_ffff, 0x3fff_ffff, u64::MAX, 0, g.addr()] {
        let limit = map.max_reachable(mask).as_u64();
        if map.is_identity() || limit == 0 || limit == u64::MAX {
            continue;
        }
        let top = map.phys_to_bus(PhysAddr::new(limit - 1), 1);
        assert!(
            top.is_some_and(|b| b.as_u64() <= mask),
            "max_reachable({mask:#x}) = {limit:#x} but {:#x} maps to {top:?} in {map:?}",
            limit - 1
        );
        let above = map.phys_to_bus(PhysAddr::new(limit), 1);
        assert!(
            above.is_none_or(|b| b.as_u64() > mask),
            "max_reachable({mask:#x}) = {limit:#x} but {limit:#x} maps to {above:?} in {map:?}"
        );
    }
}

/// `phys_to_bus`: a result must come from one window holding the whole range.
fn probe(map: &BusMap, phys: u64, len: u64) {
    let Some(bus) = map.phys_to_bus(PhysAddr::new(phys), len) else {
        return;
    };
    let bus = bus.as_u64();
    if map.is_identity() {
        assert_eq!(bus, phys, "identity map moved {phys:#x}");
        return;
    }
    let ok = map.windows().iter().any(|w| {
        let off = u128::from(phys).wrapping_sub(u128::from(w.cpu().as_u64()));
        phys >= w.cpu().as_u64()
            && off + u128::from(len) <= u128::from(w.size())
            && u128::from(bus) == u128::from(w.bus().as_u64()) + off
    });
    assert!(
        ok,
        "phys_to_bus({phys:#x}, {len:#x}) = {bus:#x} matches no window of {map:?}"
    );
}

/// `bus_to_phys`, likewise.
fn probe_bus(map: &BusMap, bus: u64, len: u64) {
    let Some(phys) = map.bus_to_phys(DmaAddr::new(bus), len) else {
        return;
    };
    let phys = phys.as_u64();
    if map.is_identity() {
        assert_eq!(bus, phys, "identity map moved {bus:#x}");
        return;
    }
    let ok = map.windows().iter().any(|w| {
        let off = u128::from(bus).wrapping_sub(u128::from(w.bus().as_u64()));
        bus >= w.bus().as_u64()
            && off + u128::from(len) <= u128::from(w.size())
            && u128::from(phys) == u128::from(w.cpu().as_u64()) + off
    });
    assert!(
        ok,
        "bus_to_phys({bus:#x}, {len:#x}) = {phys:#x} matches no window of {map:?}"
    );
}
