//! Placement of a CMA area in physical memory, after Linux's cma_declare_contiguous_nid() and the
//! dynamic-size path of the reserved-memory code.
//!
//! Pure logic over plain lists of `(base, size)` ranges: the RAM banks, the reservations made so far
//! (kernel image, device tree, firmware regions, other areas) and the no-map regions. The caller
//! records the result as a reservation.
//!
//! Rules:
//! - Base and size are aligned to at least [`CMA_MIN_ALIGNMENT`]; the size is rounded up to the
//!   alignment, as Linux does.
//! - A fixed area (`cma=size@base`, a `reg` property) is checked, never moved: misaligned, outside a
//!   RAM bank, overlapping a reservation or a no-map region, or past the limit is an error.
//! - A dynamic area is placed top-down: the highest aligned base such that the whole area lies in
//!   one RAM bank, at or above `lower`, below `limit`, and clear of every reservation and no-map
//!   region. With `alloc_ranges` (device tree `alloc-ranges`), each range is tried in order and the
//!   first that fits wins.

use core::fmt;

use crate::mm::addr::{align_down, align_up, PhysAddr, PAGE_SIZE};

/// Minimum alignment of a CMA area's base and size: 4 MiB (2^10 pages of 4 KiB).
///
/// Linux uses the page-block size, which was max(MAX_ORDER - 1 block, pageblock) = 4 MiB on arm64
/// with 4 KiB pages until about 5.18 (2 MiB since). 4 MiB is kept because it is a multiple of the
/// 2 MiB block-mapping size of both architectures (so the area can be mapped with block
/// descriptors, e.g. for an uncached remap) and of the 1 MiB per-allocation alignment cap.
pub const CMA_MIN_ALIGNMENT: u64 = PAGE_SIZE << 10;

/// Default size of the global area: 64 MiB, Debian arm64's CONFIG_CMA_SIZE_MBYTES.
pub const CMA_DEFAULT_SIZE: u64 = 64 << 20;

/// Size of the default area for a machine with `total_ram` bytes of RAM: [`CMA_DEFAULT_SIZE`], but
/// at most a quarter of RAM rounded down to [`CMA_MIN_ALIGNMENT`], so a small machine keeps most of
/// its memory for the page allocator. 0 (no default area) below 16 MiB of RAM.
pub fn default_cma_size(total_ram: u64) -> u64 {
    CMA_DEFAULT_SIZE.min(align_down(total_ram / 4, CMA_MIN_ALIGNMENT))
}

/// What to place. Addresses are physical; `limit` is an exclusive end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AreaRequest<'a> {
    /// Size in bytes; rounded up to the alignment.
    pub size: u64,
    /// Alignment of base and size in bytes, a power of two; raised to [`CMA_MIN_ALIGNMENT`] (so 0
    /// means the minimum).
    pub align: u64,
    /// A fixed base: the area is checked there and never moved.
    pub fixed_base: Option<PhysAddr>,
    /// Lowest acceptable base of a dynamic area.
    pub lower: PhysAddr,
    /// The whole area must end at or below this address (for example the DMA zone limit).
    pub limit: Option<PhysAddr>,
    /// For a dynamic area: candidate ranges `(base, size)`, tried in order; empty means anywhere.
    pub alloc_ranges: &'a [(PhysAddr, u64)],
}

impl AreaRequest<'static> {
    /// A dynamic area of `size` bytes anywhere in RAM, default alignment.
    pub const fn dynamic(size: u64) -> Self {
        AreaRequest {
            size,
            align: 0,
            fixed_base: None,
            lower: PhysAddr(0),
            limit: None,
            alloc_ranges: &[],
        }
    }

    /// An area of `size` bytes at exactly `base`, default alignment.
    pub const fn fixed(base: PhysAddr, size: u64) -> Self {
        AreaRequest {
            fixed_base: Some(base),
            ..AreaRequest::dynamic(size)
        }
    }
}

/// The memory the area must fit in, as `(base, size)` ranges in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLayout<'a> {
    pub ram: &'a [(PhysAddr, u64)],
    /// Ranges already reserved (the area must not overlap them).
    pub reserved: &'a [(PhysAddr, u64)],
    /// No-map regions (must not be overlapped either; reported separately).
    pub no_map: &'a [(PhysAddr, u64)],
}

/// A placed area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmaRegion {
    pub base: PhysAddr,
    /// Size in bytes, a multiple of the alignment.
    pub size: u64,
}

/// Why an area could not be placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlacementError {
    ZeroSize,
    /// The alignment is not a power of two.
    BadAlignment {
        align: u64,
    },
    /// The size rounded up to the alignment, or base + size, overflows.
    TooLarge {
        size: u64,
    },
    /// The size exceeds all of RAM.
    LargerThanRam {
        size: u64,
        ram: u64,
    },
    FixedMisaligned {
        base: PhysAddr,
        align: u64,
    },
    /// A fixed area is not wholly inside one RAM bank.
    FixedOutsideRam {
        base: PhysAddr,
        size: u64,
    },
    FixedOverlapsNoMap {
        base: PhysAddr,
        size: u64,
        region: (PhysAddr, u64),
    },
    FixedOverlapsReserved {
        base: PhysAddr,
        size: u64,
        region: (PhysAddr, u64),
    },
    /// A fixed area ends above the limit.
    FixedBeyondLimit {
        base: PhysAddr,
        size: u64,
        limit: PhysAddr,
    },
    /// No free aligned range of this size in RAM between `lower` and `limit`.
    NoFit {
        size: u64,
        lower: PhysAddr,
        limit: Option<PhysAddr>,
    },
    /// No free aligned range of this size in any of the alloc-ranges.
    NoFitInAllocRanges {
        size: u64,
    },
}

impl fmt::Display for PlacementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PlacementError::ZeroSize => f.write_str("CMA area of size 0"),
            PlacementError::BadAlignment { align } => {
                write!(f, "CMA alignment {align:#x} is not a power of two")
            }
            PlacementError::TooLarge { size } => {
                write!(f, "CMA area of {size:#x} bytes overflows the address space")
            }
            PlacementError::LargerThanRam { size, ram } => write!(
                f,
                "CMA area of {} MiB is larger than RAM ({} MiB)",
                size >> 20,
                ram >> 20
            ),
            PlacementError::FixedMisaligned { base, align } => {
                write!(f, "CMA area at {base} must be aligned to {align:#x} bytes")
            }
            PlacementError::FixedOutsideRam { base, size } => write!(
                f,
                "CMA area {base}..{:#x} is not inside one RAM bank",
                base.as_u64().saturating_add(size)
            ),
            PlacementError::FixedOverlapsNoMap { base, size, region } => write!(
                f,
                "CMA area {base}..{:#x} overlaps no-map region {}..{:#x}",
                base.as_u64().saturating_add(size),
                region.0,
                region.0.as_u64().saturating_add(region.1)
            ),
            PlacementError::FixedOverlapsReserved { base, size, region } => write!(
                f,
                "CMA area {base}..{:#x} overlaps reserved region {}..{:#x}",
                base.as_u64().saturating_add(size),
                region.0,
                region.0.as_u64().saturating_add(region.1)
            ),
            PlacementError::FixedBeyondLimit { base, size, limit } => write!(
                f,
                "CMA area {base}..{:#x} exceeds the limit {limit}",
                base.as_u64().saturating_add(size)
            ),
            PlacementError::NoFit { size, lower, limit } => {
                write!(
                    f,
                    "no free {} MiB range for a CMA area at or above {lower}",
                    size >> 20
                )?;
                match limit {
                    Some(l) => write!(f, " below {l}"),
                    None => Ok(()),
                }
            }
            PlacementError::NoFitInAllocRanges { size } => {
                write!(
                    f,
                    "no free {} MiB range for a CMA area in its alloc-ranges",
                    size >> 20
                )
            }
        }
    }
}

/// Exclusive end of a range, saturating at the top of the address space.
fn end_of(r: (PhysAddr, u64)) -> u64 {
    r.0.as_u64().saturating_add(r.1)
}

fn overlaps(r: (PhysAddr, u64), start: u64, end: u64) -> bool {
    r.1 != 0 && r.0.as_u64() < end && start < end_of(r)
}

/// Places an area as described in the module documentation.
pub fn place_area(
    req: &AreaRequest<'_>,
    mem: &MemoryLayout<'_>,
) -> Result<CmaRegion, PlacementError> {
    if req.size == 0 {
        return Err(PlacementError::ZeroSize);
    }
    let align = req.align.max(CMA_MIN_ALIGNMENT);
    if !align.is_power_of_two() {
        return Err(PlacementError::BadAlignment { align: req.align });
    }
    let size = align_up(req.size, align).ok_or(PlacementError::TooLarge { size: req.size })?;
    let ram = mem.ram.iter().fold(0u64, |sum, r| sum.saturating_add(r.1));
    if size > ram {
        return Err(PlacementError::LargerThanRam { size, ram });
    }
    // Like Linux, an area must end at or below the limit rounded down to the alignment.
    let limit = req.limit.map(|l| align_down(l.as_u64(), align));
    match req.fixed_base {
        Some(base) => check_fixed(base, size, align, limit, mem),
        None if req.alloc_ranges.is_empty() => {
            let window = (req.lower.as_u64(), limit.unwrap_or(u64::MAX));
            highest_fit(window, size, align, mem).ok_or(PlacementError::NoFit {
                size,
                lower: req.lower,
                limit: req.limit,
            })
        }
        None => req
            .alloc_ranges
            .iter()
            .find_map(|&r| {
                let start = r.0.as_u64().max(req.lower.as_u64());
                let end = end_of(r).min(limit.unwrap_or(u64::MAX));
                highest_fit((start, end), size, align, mem)
            })
            .ok_or(PlacementError::NoFitInAllocRanges { size }),
    }
}

fn check_fixed(
    base: PhysAddr,
    size: u64,
    align: u64,
    limit: Option<u64>,
    mem: &MemoryLayout<'_>,
) -> Result<CmaRegion, PlacementError> {
    let b = base.as_u64();
    if !b.is_multiple_of(align) {
        return Err(PlacementError::FixedMisaligned { base, align });
    }
    let end = b
        .checked_add(size)
        .ok_or(PlacementError::TooLarge { size })?;
    if let Some(l) = limit.filter(|&l| end > l) {
        return Err(PlacementError::FixedBeyondLimit {
            base,
            size,
            limit: PhysAddr(l),
        });
    }
    if !mem
        .ram
        .iter()
        .any(|&r| r.0.as_u64() <= b && end <= end_of(r))
    {
        return Err(PlacementError::FixedOutsideRam { base, size });
    }
    if let Some(&region) = mem.no_map.iter().find(|&&r| overlaps(r, b, end)) {
        return Err(PlacementError::FixedOverlapsNoMap { base, size, region });
    }
    if let Some(&region) = mem.reserved.iter().find(|&&r| overlaps(r, b, end)) {
        return Err(PlacementError::FixedOverlapsReserved { base, size, region });
    }
    Ok(CmaRegion { base, size })
}

/// The highest aligned base of a `size`-byte area inside `window` = [start, end) and one RAM bank,
/// clear of reservations and no-map regions.
fn highest_fit(
    window: (u64, u64),
    size: u64,
    align: u64,
    mem: &MemoryLayout<'_>,
) -> Option<CmaRegion> {
    mem.ram
        .iter()
        .filter_map(|&bank| {
            let start = bank.0.as_u64().max(window.0);
            let end = end_of(bank).min(window.1);
            highest_fit_in(start, end, size, align, mem)
        })
        .max()
        .map(|base| CmaRegion {
            base: PhysAddr(base),
            size,
        })
}

/// Top-down search in [start, end): try the highest aligned base; if it overlaps a blocked region,
/// retry below the lowest such region. The candidate's end strictly decreases, so this terminates
/// after at most one step per blocked region.
fn highest_fit_in(
    start: u64,
    end: u64,
    size: u64,
    align: u64,
    mem: &MemoryLayout<'_>,
) -> Option<u64> {
    let mut top = end;
    loop {
        let base = align_down(top.checked_sub(size)?, align);
        if base < start {
            return None;
        }
        let blocked = mem
            .reserved
            .iter()
            .chain(mem.no_map)
            .filter(|&&r| overlaps(r, base, base + size))
            .map(|r| r.0.as_u64())
            .min();
        match blocked {
            None => return Some(base),
            Some(b) => top = b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn r(base: u64, size: u64) -> (PhysAddr, u64) {
        (PhysAddr(base), size)
    }

    #[test]
    fn default_size_policy() {
        let table = [
            (0, 0),
            (15 * MIB, 0),
            (16 * MIB, 4 * MIB),
            (100 * MIB, 24 * MIB),
            (128 * MIB, 32 * MIB),
            (256 * MIB, 64 * MIB),
            (255 * MIB, 60 * MIB),
            (8 * GIB, 64 * MIB),
            (u64::MAX, 64 * MIB),
        ];
        for (ram, want) in table {
            assert_eq!(default_cma_size(ram), want, "ram {ram:#x}");
        }
    }

    #[test]
    fn placement_table() {
        // QEMU virt-like: 1 GiB at 1 GiB, kernel at the bottom, DTB near the top; a second bank.
        let ram = [r(GIB, GIB), r(4 * GIB, GIB)];
        let reserved = [r(GIB, 16 * MIB), r(2 * GIB - 2 * MIB, 2 * MIB)];
        let no_map = [r(GIB + 768 * MIB, 8 * MIB)];
        let mem = MemoryLayout {
            ram: &ram,
            reserved: &reserved,
            no_map: &no_map,
        };
        let ranges = [r(GIB + 256 * MIB, 64 * MIB), r(GIB + 700 * MIB, 100 * MIB)];
        let tiny_range = [r(GIB + 16 * MIB, 8 * MIB)];
        let ok = |base: u64, size: u64| {
            Ok(CmaRegion {
                base: PhysAddr(base),
                size,
            })
        };
        let dynamic = AreaRequest::dynamic;
        let fixed = |b: u64, s: u64| AreaRequest::fixed(PhysAddr(b), s);
        let below = |s: u64, l: u64| AreaRequest {
            limit: Some(PhysAddr(l)),
            ..dynamic(s)
        };
        let cases: &[(AreaRequest<'_>, Result<CmaRegion, PlacementError>)] = &[
            // Top of the highest bank.
            (dynamic(64 * MIB), ok(5 * GIB - 64 * MIB, 64 * MIB)),
            // Size rounded up to 4 MiB.
            (dynamic(MIB + 1), ok(5 * GIB - 4 * MIB, 4 * MIB)),
            // Below 4 GiB: under the DTB reservation, 4 MiB aligned.
            (below(64 * MIB, 4 * GIB), ok(2 * GIB - 68 * MIB, 64 * MIB)),
            // Limit rounded down to the alignment.
            (
                below(4 * MIB, 2 * GIB - MIB),
                ok(2 * GIB - 8 * MIB, 4 * MIB),
            ),
            // Jumps below the no-map region when the space above it is too small.
            (below(480 * MIB, 2 * GIB), ok(GIB + 288 * MIB, 480 * MIB)),
            (
                below(760 * MIB, 2 * GIB),
                Err(PlacementError::NoFit {
                    size: 760 * MIB,
                    lower: PhysAddr(0),
                    limit: Some(PhysAddr(2 * GIB)),
                }),
            ),
            // A window [lower, limit).
            (
                AreaRequest {
                    lower: PhysAddr(GIB + 600 * MIB),
                    ..below(8 * MIB, GIB + 612 * MIB)
                },
                ok(GIB + 604 * MIB, 8 * MIB),
            ),
            (
                AreaRequest {
                    lower: PhysAddr(GIB + 600 * MIB),
                    ..below(16 * MIB, GIB + 612 * MIB)
                },
                Err(PlacementError::NoFit {
                    size: 16 * MIB,
                    lower: PhysAddr(GIB + 600 * MIB),
                    limit: Some(PhysAddr(GIB + 612 * MIB)),
                }),
            ),
            // Larger alignment.
            (
                AreaRequest {
                    align: 256 * MIB,
                    ..below(64 * MIB, 4 * GIB)
                },
                ok(GIB + 512 * MIB, 256 * MIB),
            ),
            (
                AreaRequest {
                    align: 3 * MIB,
                    ..dynamic(8 * MIB)
                },
                ok(5 * GIB - 8 * MIB, 8 * MIB),
            ),
            (
                AreaRequest {
                    align: 12 * MIB,
                    ..dynamic(8 * MIB)
                },
                Err(PlacementError::BadAlignment { align: 12 * MIB }),
            ),
            // alloc-ranges: first range that fits, top-down inside it.
            (
                AreaRequest {
                    alloc_ranges: &ranges,
                    ..dynamic(32 * MIB)
                },
                ok(GIB + 288 * MIB, 32 * MIB),
            ),
            // The first range is too small; the second holds the no-map region: space below it.
            (
                AreaRequest {
                    alloc_ranges: &ranges,
                    ..dynamic(66 * MIB)
                },
                ok(GIB + 700 * MIB, 68 * MIB),
            ),
            (
                AreaRequest {
                    alloc_ranges: &ranges,
                    ..dynamic(96 * MIB)
                },
                Err(PlacementError::NoFitInAllocRanges { size: 96 * MIB }),
            ),
            (
                AreaRequest {
                    alloc_ranges: &tiny_range,
                    ..dynamic(8 * MIB)
                },
                ok(GIB + 16 * MIB, 8 * MIB),
            ),
            (
                AreaRequest {
                    alloc_ranges: &tiny_range,
                    ..below(8 * MIB, GIB + 20 * MIB)
                },
                Err(PlacementError::NoFitInAllocRanges { size: 8 * MIB }),
            ),
            // Fixed areas.
            (
                fixed(GIB + 64 * MIB, 32 * MIB),
                ok(GIB + 64 * MIB, 32 * MIB),
            ),
            (
                fixed(GIB + 66 * MIB, 32 * MIB),
                Err(PlacementError::FixedMisaligned {
                    base: PhysAddr(GIB + 66 * MIB),
                    align: 4 * MIB,
                }),
            ),
            (
                fixed(GIB + 8 * MIB, 32 * MIB),
                Err(PlacementError::FixedOverlapsReserved {
                    base: PhysAddr(GIB + 8 * MIB),
                    size: 32 * MIB,
                    region: reserved[0],
                }),
            ),
            (
                fixed(GIB + 764 * MIB, 8 * MIB),
                Err(PlacementError::FixedOverlapsNoMap {
                    base: PhysAddr(GIB + 764 * MIB),
                    size: 8 * MIB,
                    region: no_map[0],
                }),
            ),
            (
                fixed(2 * GIB - 4 * MIB, 8 * MIB),
                Err(PlacementError::FixedOutsideRam {
                    base: PhysAddr(2 * GIB - 4 * MIB),
                    size: 8 * MIB,
                }),
            ),
            (
                fixed(3 * GIB, 8 * MIB),
                Err(PlacementError::FixedOutsideRam {
                    base: PhysAddr(3 * GIB),
                    size: 8 * MIB,
                }),
            ),
            (
                AreaRequest {
                    limit: Some(PhysAddr(4 * GIB)),
                    ..fixed(4 * GIB, 8 * MIB)
                },
                Err(PlacementError::FixedBeyondLimit {
                    base: PhysAddr(4 * GIB),
                    size: 8 * MIB,
                    limit: PhysAddr(4 * GIB),
                }),
            ),
            (
                fixed(!(4 * MIB - 1), 8 * MIB),
                Err(PlacementError::TooLarge { size: 8 * MIB }),
            ),
            // Sizes.
            (dynamic(0), Err(PlacementError::ZeroSize)),
            (
                dynamic(3 * GIB),
                Err(PlacementError::LargerThanRam {
                    size: 3 * GIB,
                    ram: 2 * GIB,
                }),
            ),
            (
                dynamic(u64::MAX),
                Err(PlacementError::TooLarge { size: u64::MAX }),
            ),
            (
                dynamic(2 * GIB),
                Err(PlacementError::NoFit {
                    size: 2 * GIB,
                    lower: PhysAddr(0),
                    limit: None,
                }),
            ),
        ];
        for (i, (req, want)) in cases.iter().enumerate() {
            assert_eq!(place_area(req, &mem), *want, "case {i}: {req:?}");
        }
    }

    #[test]
    fn error_messages_are_readable() {
        let e = PlacementError::FixedOverlapsNoMap {
            base: PhysAddr(0x4000_0000),
            size: 0x100_0000,
            region: (PhysAddr(0x4080_0000), 0x10_0000),
        };
        assert_eq!(
            e.to_string(),
            "CMA area 0x40000000..0x41000000 overlaps no-map region 0x40800000..0x40900000"
        );
        let e = PlacementError::NoFit {
            size: 64 * MIB,
            lower: PhysAddr(0),
            limit: Some(PhysAddr(GIB)),
        };
        assert_eq!(
            e.to_string(),
            "no free 64 MiB range for a CMA area at or above 0x0 below 0x40000000"
        );
    }
}
