//! Assigning BAR addresses inside the host bridge's windows.
//!
//! One bump allocator per window, BARs taken largest first. BAR sizes are powers of two and a
//! BAR must be aligned to its size, so in this order every BAR after the first in a window starts
//! exactly where the previous one ended: no alignment gaps, and a window holds a set of BARs
//! whenever their sizes add up to its free space (from an aligned start). That is all the
//! fragmentation control a bus that is configured once needs.
//!
//! Which window a BAR may use (as Linux does for a root bus):
//! - I/O BARs: I/O windows, from bus address 0x1000 (the first 4 KiB are the legacy ISA ports,
//!   which Linux's arm64 `PCIBIOS_MIN_IO` also keeps free; it keeps a BAR from reading as 0).
//! - Memory BARs: memory windows, but never a prefetchable window for a non-prefetchable BAR
//!   (the bridge may merge or prefetch accesses to it). 32-bit BARs only below 4 GiB in bus
//!   space. A 64-bit BAR prefers a 64-bit window, a 32-bit BAR a 32-bit one, and each prefers a
//!   window whose prefetchability matches its own, so that scarce 32-bit space is left to the
//!   BARs that cannot go anywhere else. Ties go to the window listed first in `ranges`.

use alloc::vec::Vec;
use core::cmp::Reverse;

use super::{Bar, BarInfo, Bdf, PciError, Space, Window};
use crate::mm::addr::align_up;

/// The lowest I/O bus address handed out.
const MIN_IO: u64 = 0x1000;
/// 32-bit memory BARs and I/O BARs hold bus addresses below this.
const LIMIT_32: u64 = 1 << 32;

/// Places every BAR of `bars` in one of `windows` (policy in the module documentation) and
/// returns them, with their bus and CPU addresses, in the order of `bars`. No two returned BARs
/// overlap, each is aligned to its size and lies inside a window it may use.
///
/// Errors: a window that wraps, overlaps another of the same space, or (for I/O and 32-bit
/// windows) reaches above 4 GiB; a BAR whose size is not a power of two; and, naming the first
/// BAR (largest first) that found no room, [`PciError::NoSpace`].
pub fn assign(bars: &[(Bdf, BarInfo)], windows: &[Window]) -> Result<Vec<(Bdf, Bar)>, PciError> {
    validate_windows(windows)?;
    let mut cursors: Vec<u64> = windows.iter().map(first_free).collect();
    let mut order: Vec<(usize, Bdf, BarInfo)> = bars
        .iter()
        .enumerate()
        .map(|(i, (bdf, info))| (i, *bdf, *info))
        .collect();
    // Stable: equal sizes keep bus order, so the result does not depend on the sort.
    crate::sort::sort_small_by_key(&mut order, |(_, _, info)| Reverse(info.size));

    let mut placed = Vec::with_capacity(order.len());
    for (i, bdf, info) in order {
        if !info.size.is_power_of_two() {
            return Err(PciError::BadBar {
                bdf,
                index: info.index,
                what: "size is not a power of two",
            });
        }
        let bar = place(&info, windows, &mut cursors).ok_or(PciError::NoSpace {
            bdf,
            index: info.index,
            size: info.size,
            kind: info.kind,
            prefetchable: info.prefetchable,
        })?;
        placed.push((i, bdf, bar));
    }
    crate::sort::sort_small_by_key(&mut placed, |(i, _, _)| *i);
    Ok(placed.into_iter().map(|(_, bdf, bar)| (bdf, bar)).collect())
}

/// Checks what the allocator relies on; see [`assign`]'s errors.
pub(super) fn validate_windows(windows: &[Window]) -> Result<(), PciError> {
    for (index, w) in windows.iter().enumerate() {
        let bad = |what| PciError::BadWindow { index, what };
        let end = w
            .pci_addr
            .checked_add(w.size)
            .ok_or(bad("bus addresses wrap past the end of the 64-bit space"))?;
        if w.cpu_addr.checked_add(w.size).is_none() {
            return Err(bad("CPU addresses wrap past the end of the 64-bit space"));
        }
        if w.kind != Space::Mem64 && end > LIMIT_32 {
            return Err(bad("an I/O or 32-bit memory window reaches above 4 GiB"));
        }
        let io = w.kind == Space::Io;
        for (first, o) in windows.iter().enumerate().take(index) {
            let (start, o_start) = (u128::from(w.pci_addr), u128::from(o.pci_addr));
            let overlap = w.size != 0
                && o.size != 0
                && start < o_start + u128::from(o.size)
                && o_start < start + u128::from(w.size);
            if overlap && io == (o.kind == Space::Io) {
                return Err(PciError::WindowOverlap {
                    first,
                    second: index,
                });
            }
        }
    }
    Ok(())
}

/// Where allocation in `w` starts (for a too-small I/O window, at its end: nothing fits).
fn first_free(w: &Window) -> u64 {
    let end = w.pci_addr.saturating_add(w.size);
    match w.kind {
        Space::Io => w.pci_addr.max(MIN_IO).min(end),
        Space::Mem32 | Space::Mem64 => w.pci_addr,
    }
}

/// How much `bar` would like window `w` (lower is better); `None` if it may not use it.
fn rank(bar: &BarInfo, w: &Window) -> Option<u8> {
    match (bar.kind, w.kind) {
        (Space::Io, Space::Io) => Some(0),
        (Space::Io, _) | (_, Space::Io) => None,
        _ if w.prefetchable && !bar.prefetchable => None,
        (bar_kind, window_kind) => {
            let space = u8::from(bar_kind != window_kind);
            let pref = u8::from(bar.prefetchable != w.prefetchable);
            Some(space * 2 + pref)
        }
    }
}

/// Takes room for `bar` from the best window that has it, advancing that window's cursor.
fn place(bar: &BarInfo, windows: &[Window], cursors: &mut [u64]) -> Option<Bar> {
    let mut candidates: Vec<(u8, usize)> = windows
        .iter()
        .enumerate()
        .filter_map(|(i, w)| Some((rank(bar, w)?, i)))
        .collect();
    crate::sort::sort_small(&mut candidates);
    for (_, i) in candidates {
        let (Some(w), Some(cursor)) = (windows.get(i), cursors.get_mut(i)) else {
            continue;
        };
        let Some(mut end) = w.pci_addr.checked_add(w.size) else {
            continue;
        };
        if bar.kind != Space::Mem64 {
            end = end.min(LIMIT_32);
        }
        let Some(start) = align_up(*cursor, bar.size) else {
            continue;
        };
        match start.checked_add(bar.size) {
            Some(bar_end) if bar_end <= end => {
                let cpu_addr = w.cpu_addr.checked_add(start - w.pci_addr)?;
                *cursor = bar_end;
                return Some(Bar {
                    index: bar.index,
                    cpu_addr,
                    pci_addr: start,
                    size: bar.size,
                    kind: bar.kind,
                    prefetchable: bar.prefetchable,
                });
            }
            _ => continue,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::addr::PhysAddr;
    use proptest::prelude::*;

    fn window(kind: Space, prefetchable: bool, pci: u64, cpu: u64, size: u64) -> Window {
        Window {
            kind,
            prefetchable,
            pci_addr: pci,
            cpu_addr: PhysAddr::new(cpu),
            size,
        }
    }

    fn req(device: u8, index: u8, size: u64, kind: Space, prefetchable: bool) -> (Bdf, BarInfo) {
        (
            Bdf::new(0, device, 0).unwrap(),
            BarInfo {
                index,
                size,
                kind,
                prefetchable,
            },
        )
    }

    /// Checks the contract of `assign` on a successful result, independently of how it chose:
    /// same BARs in the same order, aligned, inside a window the BAR may use with the CPU address
    /// translated through it, and pairwise disjoint within each address space.
    fn check(bars: &[(Bdf, BarInfo)], windows: &[Window], out: &[(Bdf, Bar)]) {
        assert_eq!(out.len(), bars.len());
        for ((bdf, info), (obdf, bar)) in bars.iter().zip(out) {
            assert_eq!(bdf, obdf);
            assert_eq!(
                (bar.index, bar.size, bar.kind, bar.prefetchable),
                (info.index, info.size, info.kind, info.prefetchable)
            );
            assert_eq!(bar.pci_addr % bar.size, 0, "{bar:?} misaligned");
            let end = bar.pci_addr as u128 + bar.size as u128;
            let home = windows.iter().find(|w| {
                let kind_ok = match bar.kind {
                    Space::Io => w.kind == Space::Io,
                    _ => w.kind != Space::Io && (bar.prefetchable || !w.prefetchable),
                };
                kind_ok && w.pci_addr <= bar.pci_addr && end <= w.pci_addr as u128 + w.size as u128
            });
            let w = home.unwrap_or_else(|| panic!("{bar:?} outside every usable window"));
            assert_eq!(
                bar.cpu_addr.as_u64(),
                w.cpu_addr.as_u64() + (bar.pci_addr - w.pci_addr)
            );
            if bar.kind != Space::Mem64 {
                assert!(end <= 1 << 32, "{bar:?} above 4 GiB");
            }
            if bar.kind == Space::Io {
                assert!(bar.pci_addr >= 0x1000);
            }
        }
        for (i, (_, a)) in out.iter().enumerate() {
            for (_, b) in &out[i + 1..] {
                if (a.kind == Space::Io) != (b.kind == Space::Io) {
                    continue;
                }
                let disjoint =
                    a.pci_addr + a.size <= b.pci_addr || b.pci_addr + b.size <= a.pci_addr;
                assert!(disjoint, "{a:?} overlaps {b:?}");
            }
        }
    }

    #[test]
    fn largest_first_from_an_unaligned_window_base() {
        let windows = [window(
            Space::Mem32,
            false,
            0x1000_1000,
            0x4000_1000,
            0x10_0000,
        )];
        let bars = [
            req(1, 0, 0x1000, Space::Mem32, false),
            req(2, 0, 0x1_0000, Space::Mem32, false),
            req(3, 1, 0x4000, Space::Mem32, false),
        ];
        let out = assign(&bars, &windows).unwrap();
        check(&bars, &windows, &out);
        let addrs: Vec<_> = out
            .iter()
            .map(|(_, b)| (b.pci_addr, b.cpu_addr.as_u64()))
            .collect();
        // 64K first at the first 64K boundary, then 16K and 4K right after it.
        assert_eq!(
            addrs,
            [
                (0x1002_4000, 0x4002_4000),
                (0x1001_0000, 0x4001_0000),
                (0x1002_0000, 0x4002_0000)
            ]
        );
    }

    #[test]
    fn window_choice_follows_kind_and_prefetchability() {
        let windows = [
            window(Space::Mem32, false, 0x1000_0000, 0x1000_0000, 0x10_0000),
            window(
                Space::Mem64,
                true,
                0x80_0000_0000,
                0x80_0000_0000,
                0x100_0000,
            ),
            window(
                Space::Mem64,
                false,
                0x90_0000_0000,
                0x90_0000_0000,
                0x100_0000,
            ),
            window(Space::Mem32, true, 0x2000_0000, 0x2000_0000, 0x10_0000),
        ];
        let bars = [
            req(1, 0, 0x1000, Space::Mem64, true),
            req(1, 2, 0x1000, Space::Mem64, false),
            req(1, 4, 0x1000, Space::Mem32, true),
            req(1, 5, 0x1000, Space::Mem32, false),
        ];
        let out = assign(&bars, &windows).unwrap();
        check(&bars, &windows, &out);
        let addrs: Vec<_> = out.iter().map(|(_, b)| b.pci_addr).collect();
        assert_eq!(
            addrs,
            [0x80_0000_0000, 0x90_0000_0000, 0x2000_0000, 0x1000_0000]
        );

        // Only a prefetchable 64-bit window: a non-prefetchable 64-bit BAR falls back to the
        // 32-bit window, a non-prefetchable 32-bit BAR never goes to the prefetchable one.
        let windows = [
            window(
                Space::Mem64,
                true,
                0x80_0000_0000,
                0x80_0000_0000,
                0x100_0000,
            ),
            window(Space::Mem32, false, 0x1000_0000, 0x1000_0000, 0x1000),
        ];
        let bars = [req(1, 0, 0x1000, Space::Mem64, false)];
        let out = assign(&bars, &windows).unwrap();
        assert_eq!(out[0].1.pci_addr, 0x1000_0000);
        let bars = [
            req(1, 0, 0x1000, Space::Mem32, false),
            req(2, 0, 0x1000, Space::Mem32, false),
        ];
        assert!(matches!(
            assign(&bars, &windows),
            Err(PciError::NoSpace { bdf, .. }) if bdf.device() == 2
        ));
    }

    #[test]
    fn thirty_two_bit_bars_stay_below_4g() {
        // A 64-bit window straddling 4 GiB: a 32-bit BAR gets its low part only.
        let windows = [window(
            Space::Mem64,
            false,
            0xffff_e000,
            0xffff_e000,
            0x1_0000,
        )];
        let bars = [
            req(1, 0, 0x1000, Space::Mem32, false),
            req(2, 0, 0x1000, Space::Mem32, false),
            req(3, 0, 0x1000, Space::Mem32, false),
        ];
        let e = assign(&bars, &windows).unwrap_err();
        assert!(
            matches!(e, PciError::NoSpace { bdf, .. } if bdf.device() == 3),
            "{e:?}"
        );
        let bars = [
            req(1, 0, 0x1000, Space::Mem32, false),
            req(2, 0, 0x1000, Space::Mem32, false),
            req(3, 0, 0x1000, Space::Mem64, false),
        ];
        let out = assign(&bars, &windows).unwrap();
        check(&bars, &windows, &out);
        assert_eq!(out[2].1.pci_addr, 0x1_0000_0000);
    }

    #[test]
    fn io_skips_the_first_4k() {
        let windows = [window(Space::Io, false, 0, 0x3eff_0000, 0x1040)];
        let bars = [
            req(1, 0, 0x20, Space::Io, false),
            req(2, 0, 0x20, Space::Io, false),
            req(3, 0, 0x20, Space::Io, false),
        ];
        let e = assign(&bars, &windows).unwrap_err();
        assert!(
            matches!(e, PciError::NoSpace { bdf, .. } if bdf.device() == 3),
            "{e:?}"
        );
        let out = assign(&bars[..2], &windows).unwrap();
        check(&bars[..2], &windows, &out);
        assert_eq!(out[1].1.cpu_addr.as_u64(), 0x3eff_1020);
        // A window entirely below 0x1000 holds nothing.
        let windows = [window(Space::Io, false, 0, 0, 0x1000)];
        assert!(assign(&bars[..1], &windows).is_err());
        // Memory BARs never use I/O windows and vice versa.
        let windows = [window(Space::Io, false, 0, 0, 0x10000)];
        assert!(assign(&[req(1, 0, 0x20, Space::Mem32, false)], &windows).is_err());
        let windows = [window(
            Space::Mem32,
            false,
            0x1000_0000,
            0x1000_0000,
            0x10000,
        )];
        assert!(assign(&[req(1, 0, 0x20, Space::Io, false)], &windows).is_err());
    }

    #[test]
    fn bad_windows_and_bars_are_errors() {
        let mem = window(Space::Mem32, false, 0x1000_0000, 0x1000_0000, 0x100_0000);
        let overlapping = window(Space::Mem64, true, 0x10ff_f000, 0x8000_0000, 0x1000);
        assert_eq!(
            assign(&[], &[mem, overlapping]),
            Err(PciError::WindowOverlap {
                first: 0,
                second: 1
            })
        );
        assert_eq!(
            format!(
                "{}",
                PciError::WindowOverlap {
                    first: 0,
                    second: 1
                }
            ),
            "PCI host bridge windows 0 and 1 overlap in PCI address space"
        );
        // I/O and memory are separate spaces: the same bus addresses do not overlap.
        let io = window(Space::Io, false, 0x1000_0000, 0x3eff_0000, 0x1_0000);
        assert_eq!(assign(&[], &[mem, io]), Ok(vec![]));
        let high32 = window(Space::Mem32, false, 0xffff_0000, 0xffff_0000, 0x2_0000);
        assert!(matches!(
            assign(&[], &[high32]),
            Err(PciError::BadWindow { index: 0, .. })
        ));
        let wraps = window(Space::Mem64, false, u64::MAX - 0xfff, 0, 0x2000);
        assert!(matches!(
            assign(&[], &[mem, wraps]),
            Err(PciError::BadWindow { index: 1, .. })
        ));
        let cpu_wraps = window(Space::Mem64, false, 0, u64::MAX, 2);
        assert!(matches!(
            assign(&[], &[cpu_wraps]),
            Err(PciError::BadWindow { index: 0, .. })
        ));
        let e = assign(&[req(4, 3, 0x3000, Space::Mem32, false)], &[mem]).unwrap_err();
        assert_eq!(
            format!("{e}"),
            "pci 00:04.0 BAR3: size is not a power of two"
        );
        assert!(assign(&[req(4, 3, 0, Space::Mem32, false)], &[mem]).is_err());
        // The largest BAR possible in a window that holds exactly it.
        let all = window(Space::Mem64, false, 0, 0, 1 << 63);
        let out = assign(&[req(1, 0, 1 << 63, Space::Mem64, false)], &[all]).unwrap();
        assert_eq!(out[0].1.pci_addr, 0);
        let e = assign(
            &[
                req(1, 0, 1 << 63, Space::Mem64, false),
                req(1, 2, 16, Space::Mem64, false),
            ],
            &[all],
        );
        assert!(matches!(e, Err(PciError::NoSpace { size: 16, .. })));
    }

    fn bar_strategy() -> impl Strategy<Value = (u8, u32, bool)> {
        // (kind: 0 io, 1 mem32, 2 mem64; log2 size; prefetchable)
        (0u8..3, 4u32..24, any::<bool>())
    }

    fn to_requests(specs: &[(u8, u32, bool)]) -> Vec<(Bdf, BarInfo)> {
        specs
            .iter()
            .enumerate()
            .map(|(i, &(k, log2, pref))| {
                let (kind, log2, pref) = match k {
                    0 => (Space::Io, log2.min(8), false),
                    1 => (Space::Mem32, log2, pref),
                    _ => (Space::Mem64, log2, pref),
                };
                req((i / 6) as u8, (i % 6) as u8, 1 << log2, kind, pref)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// In one size-aligned window, largest-first bump allocation packs perfectly: it
        /// succeeds exactly when the sizes add up to no more than the window.
        #[test]
        fn one_window_fits_iff_the_sizes_add_up(
            logs in proptest::collection::vec(4u32..22, 0..40),
            window_mib in 1u64..16,
        ) {
            let size = window_mib << 20;
            let windows = [window(Space::Mem32, false, 0x4000_0000, 0x4000_0000, size)];
            let bars: Vec<_> = logs
                .iter()
                .enumerate()
                .map(|(i, l)| req((i / 6) as u8, (i % 6) as u8, 1 << l, Space::Mem32, false))
                .collect();
            let total: u64 = bars.iter().map(|(_, b)| b.size).sum();
            match assign(&bars, &windows) {
                Ok(out) => {
                    prop_assert!(total <= size);
                    check(&bars, &windows, &out);
                }
                Err(e) => {
                    prop_assert!(total > size, "{e} with {total:#x} <= {size:#x}");
                    let is_no_space = matches!(e, PciError::NoSpace { .. });
                    prop_assert!(is_no_space);
                }
            }
        }

        /// With QEMU-like windows of random sizes, any mix of BARs is either placed correctly
        /// or refused with NoSpace.
        #[test]
        fn mixed_windows_never_overlap(
            specs in proptest::collection::vec(bar_strategy(), 0..30),
            io_log in 8u32..17,
            mem32_log in 16u32..26,
            mem64_log in 0u32..26,
            mem64_pref in any::<bool>(),
        ) {
            let mut windows = vec![
                window(Space::Io, false, 0, 0x3eff_0000, 1 << io_log),
                window(Space::Mem32, false, 0x1000_0000, 0x1000_0000, 1 << mem32_log),
            ];
            if mem64_log > 0 {
                windows.push(window(
                    Space::Mem64, mem64_pref, 0x80_0000_0000, 0x80_0000_0000, 1 << mem64_log,
                ));
            }
            let bars = to_requests(&specs);
            match assign(&bars, &windows) {
                Ok(out) => check(&bars, &windows, &out),
                Err(e) => {
                    let is_no_space = matches!(e, PciError::NoSpace { .. });
                    prop_assert!(is_no_space, "{e}");
                }
            }
        }
    }
}
