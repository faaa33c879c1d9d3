//! The boot memory map: which physical memory is RAM, which parts of it are taken and by whom, and
//! a memblock-style allocator for boot-time allocations made before any other allocator exists.
//!
//! It is built from the device tree ([`MemoryMap::from_dt`]) before the heap exists, so it lives in
//! fixed-size arrays (`MAX_RAM_BANKS` banks, `MAX_RESERVATIONS` reservations; about 7 KiB in all)
//! and reports overflow as an error. Later stages (page allocator, CMA, swiotlb) take their memory
//! from it with [`MemoryMap::alloc_early`] or record what they placed with [`MemoryMap::reserve`],
//! and finally hand [`MemoryMap::free_ranges`] to the page allocator.
//!
//! Consistency rules. A wrong memory map silently corrupts memory later, so every doubt is an
//! error rather than a guess:
//! - RAM is the union of all `reg` entries of available memory nodes; overlapping or touching
//!   banks are merged (they describe the same RAM twice, which is harmless). No RAM at all is an
//!   error.
//! - Every reservation must lie entirely inside one (merged) RAM bank. Entirely outside RAM, or
//!   straddling a bank's edge or a hole between banks, is an error: it means /memory or the
//!   reservation is wrong, and we cannot tell which (clipping would trust /memory, and a too-small
//!   /memory is a common firmware bug).
//! - Reservations must not overlap one another. In particular the kernel image must not overlap
//!   any reservation (the loader has put us over memory someone else owns), nor the DTB or initrd.
//!   One exception: a DTB or initrd lying entirely inside a `/memreserve/` entry is accepted and
//!   not recorded again, because U-Boot adds such entries for the blobs it hands over.
//! - `/reserved-memory` children that are not available (status "disabled") or zero-sized are
//!   ignored, as Linux does; dynamically placed children (`size` without `reg`) are not placed
//!   here, the CMA code does that and calls [`MemoryMap::reserve`].
//! - Free ranges are RAM minus reservations, shrunk inward to page boundaries.

use core::fmt;
use core::ops::Range;

use crate::dt::{DeviceTree, DtError, ShortStr};
use crate::mm::addr::{align_down, align_up, PhysAddr, PAGE_SIZE};

/// Capacity for RAM banks (after merging).
pub const MAX_RAM_BANKS: usize = 64;
/// Capacity for reservations.
pub const MAX_RESERVATIONS: usize = 128;

/// A reservation's name (a DT node name, "kernel", ...), truncated to fit.
pub type ResName = ShortStr<24>;

/// A range of physical addresses `base .. base + size`. The end never wraps: constructors refuse a
/// region whose end would exceed `u64::MAX`.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Region {
    base: PhysAddr,
    size: u64,
}

impl Region {
    pub const EMPTY: Region = Region {
        base: PhysAddr(0),
        size: 0,
    };

    /// `None` if `base + size` does not fit in 64 bits.
    pub const fn new(base: PhysAddr, size: u64) -> Option<Region> {
        match base.0.checked_add(size) {
            Some(_) => Some(Region { base, size }),
            None => None,
        }
    }

    /// The region `range.start .. range.end`; `None` if the end precedes the start.
    pub fn from_range(range: Range<PhysAddr>) -> Option<Region> {
        let size = range.end.0.checked_sub(range.start.0)?;
        Some(Region {
            base: range.start,
            size,
        })
    }

    pub const fn base(&self) -> PhysAddr {
        self.base
    }

    pub const fn size(&self) -> u64 {
        self.size
    }

    /// Exclusive end.
    pub const fn end(&self) -> u64 {
        // Cannot overflow: checked at construction.
        self.base.0 + self.size
    }

    pub const fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Whether `other` lies entirely inside `self` (an empty `other` counts if its base does).
    pub fn contains(&self, other: &Region) -> bool {
        other.base.0 >= self.base.0 && other.end() <= self.end()
    }

    /// Whether the two regions share at least one byte.
    pub fn overlaps(&self, other: &Region) -> bool {
        !self.is_empty()
            && !other.is_empty()
            && self.base.0 < other.end()
            && other.base.0 < self.end()
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Region({:#x}+{:#x})", self.base.0, self.size)
    }
}

/// `0x0000000040000000-0x000000007fffffff` (inclusive end, as in Linux's boot log).
impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.end().saturating_sub(1).max(self.base.0);
        write!(f, "{:#018x}-{:#018x}", self.base.0, last)
    }
}

/// Who owns a reservation.
///
/// `repr(u8)` fixes the layout (a tag byte, `MemReserve` = 0) so that an unused slot of the
/// reservation table (`Reservation::EMPTY`) is all zeros and `MemoryMap::new` clears the 6 KiB
/// table with one `memset` instead of copying a pattern into each of its 128 slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReservationKind {
    /// An entry of the DTB header's `/memreserve/` map.
    MemReserve,
    /// A `/reserved-memory` child with `reg`; `no_map` = must not be mapped.
    ReservedMemory { no_map: bool },
    /// The kernel image (text, data, bss).
    Kernel,
    /// The device tree blob.
    Dtb,
    /// The initrd named by `/chosen`.
    Initrd,
    /// A generic boot-time allocation.
    Early,
    /// A CMA area.
    Cma,
    /// The swiotlb bounce buffer.
    Swiotlb,
    /// The atomic DMA pool.
    AtomicPool,
    /// Page tables.
    PageTables,
    /// The kernel heap.
    Heap,
}

impl ReservationKind {
    /// What the reservation is, for the boot log.
    pub fn describe(&self) -> &'static str {
        match self {
            ReservationKind::MemReserve => "/memreserve/ entry",
            ReservationKind::ReservedMemory { no_map: true } => "/reserved-memory, no-map",
            ReservationKind::ReservedMemory { no_map: false } => "/reserved-memory",
            ReservationKind::Kernel => "kernel image",
            ReservationKind::Dtb => "device tree blob",
            ReservationKind::Initrd => "initrd",
            ReservationKind::Early => "early allocation",
            ReservationKind::Cma => "CMA area",
            ReservationKind::Swiotlb => "swiotlb bounce buffer",
            ReservationKind::AtomicPool => "atomic DMA pool",
            ReservationKind::PageTables => "page tables",
            ReservationKind::Heap => "kernel heap",
        }
    }
}

/// A reserved region, its owner and a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub region: Region,
    pub kind: ReservationKind,
    pub name: ResName,
}

impl Reservation {
    /// An unused slot: never read, and all zeros (see [`ReservationKind`]).
    const EMPTY: Reservation = Reservation {
        region: Region::EMPTY,
        kind: ReservationKind::MemReserve,
        name: ResName::EMPTY,
    };
}

impl fmt::Display for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}", self.region, self.kind.describe())?;
        if !self.name.is_empty() {
            write!(f, " `{}`", self.name)?;
        }
        f.write_str(")")
    }
}

/// Why the memory map could not be built or changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemMapError {
    /// The device tree is malformed where the memory map reads it.
    Dt(DtError),
    /// No memory node with a non-zero `reg`.
    NoRam,
    /// More than `MAX_RAM_BANKS` disjoint banks.
    TooManyRamBanks,
    /// More than `MAX_RESERVATIONS` reservations; `new` is the one that did not fit.
    TooManyReservations { new: Reservation },
    /// A region's end does not fit in 64 bits, or its end precedes its start.
    BadRange { name: ResName, base: u64, size: u64 },
    /// A zero-sized reservation or kernel image.
    Empty { name: ResName },
    /// A reservation entirely outside RAM.
    OutsideRam { res: Reservation },
    /// A reservation partly outside RAM (across a bank edge or a hole).
    PartlyOutsideRam { res: Reservation },
    /// A reservation overlapping an existing one.
    Overlap {
        new: Reservation,
        existing: Reservation,
    },
    /// `alloc_early` alignment not a power of two.
    BadAlignment { align: u64 },
    /// `alloc_early` of zero bytes, or of a size that overflows when rounded to pages.
    BadSize { size: u64 },
    /// No free range can hold the allocation.
    NoSpace {
        size: u64,
        align: u64,
        below: Option<u64>,
    },
    /// The map was sealed: the page allocator owns the free ranges now.
    Sealed,
}

impl From<DtError> for MemMapError {
    fn from(e: DtError) -> Self {
        MemMapError::Dt(e)
    }
}

impl fmt::Display for MemMapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use MemMapError::*;
        match self {
            Dt(e) => write!(f, "device tree: {e}"),
            NoRam => f.write_str(
                "no usable RAM: no available memory node with a non-zero reg in the device tree",
            ),
            TooManyRamBanks => write!(f, "more than {MAX_RAM_BANKS} disjoint RAM banks"),
            TooManyReservations { new } => {
                write!(
                    f,
                    "more than {MAX_RESERVATIONS} reservations; could not add {new}"
                )
            }
            BadRange { name, base, size } => write!(
                f,
                "region `{name}` {base:#x} + {size:#x} is not a valid address range"
            ),
            Empty { name } => write!(f, "region `{name}` is empty"),
            OutsideRam { res } => write!(f, "reservation {res} lies entirely outside RAM"),
            PartlyOutsideRam { res } => write!(
                f,
                "reservation {res} is only partly inside RAM (crosses a bank edge or a hole); \
                 /memory or the reservation is wrong"
            ),
            Overlap { new, existing } => write!(f, "{new} overlaps {existing}"),
            BadAlignment { align } => write!(f, "alignment {align:#x} is not a power of two"),
            BadSize { size } => write!(f, "cannot allocate {size:#x} bytes"),
            Sealed => write!(
                f,
                "the memory map is sealed: the page allocator owns the free memory now"
            ),
            NoSpace { size, align, below } => {
                write!(
                    f,
                    "no free memory for {size:#x} bytes aligned to {align:#x}"
                )?;
                if let Some(b) = below {
                    write!(f, " below {b:#x}")?;
                }
                Ok(())
            }
        }
    }
}

/// Displays a byte count as `4 KiB`, `1.5 MiB`, `2 GiB` (one decimal, rounded down, when inexact).
pub struct HumanSize(pub u64);

impl fmt::Display for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 5] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
            (1, "B"),
        ];
        let n = self.0;
        let (unit, name) = UNITS
            .iter()
            .copied()
            .find(|&(u, _)| n >= u)
            .unwrap_or((1, "B"));
        let whole = n / unit;
        let tenths = (n % unit) as u128 * 10 / unit as u128;
        // Format into a small buffer so that width/alignment flags apply to the whole text.
        let mut w = StrBuf {
            buf: [0; 32],
            len: 0,
        };
        if tenths == 0 {
            fmt::write(&mut w, format_args!("{whole} {name}"))?;
        } else {
            fmt::write(&mut w, format_args!("{whole}.{tenths} {name}"))?;
        }
        f.pad(w.as_str())
    }
}

/// A tiny fixed buffer implementing `fmt::Write` (for `HumanSize`).
struct StrBuf {
    buf: [u8; 32],
    len: usize,
}

impl StrBuf {
    fn as_str(&self) -> &str {
        core::str::from_utf8(self.buf.get(..self.len).unwrap_or_default()).unwrap_or("")
    }
}

impl fmt::Write for StrBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// The boot memory map. See the module documentation for its rules.
#[derive(Clone)]
pub struct MemoryMap {
    /// Sorted by base, disjoint and non-touching.
    ram: [Region; MAX_RAM_BANKS],
    nram: usize,
    /// Sorted by base, disjoint, each inside one RAM bank.
    res: [Reservation; MAX_RESERVATIONS],
    nres: usize,
    /// Set once the page allocator has taken the free ranges: nothing may be added after that.
    sealed: bool,
}

impl Default for MemoryMap {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryMap {
    /// An empty map (no RAM), e.g. for a `static`.
    pub const fn new() -> MemoryMap {
        MemoryMap {
            ram: [Region::EMPTY; MAX_RAM_BANKS],
            nram: 0,
            res: [Reservation::EMPTY; MAX_RESERVATIONS],
            nres: 0,
            sealed: false,
        }
    }

    /// Refuse every later change: called when the page allocator takes the free ranges, so that
    /// no boot allocation can hand out a page the allocator also owns.
    pub fn seal(&mut self) {
        self.sealed = true;
    }

    pub fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// Builds the map from the device tree's RAM and reservations plus the kernel image
    /// (`kernel`: physical start .. end of everything the image occupies, bss included), the DTB
    /// itself (at [`DeviceTree::phys_region`]) and the initrd. See the module documentation for
    /// what is an error.
    pub fn from_dt(dt: &DeviceTree<'_>, kernel: Range<PhysAddr>) -> Result<MemoryMap, MemMapError> {
        Self::from_dt_or_firmware(dt, kernel, None)
    }

    /// As [`MemoryMap::from_dt`], with `firmware_ram` as the RAM when the device tree describes
    /// none (no memory node, or only zero-sized `reg`s: the Raspberry Pi's downstream trees leave
    /// `/memory reg = <0 0>` for the firmware to fill, and the firmware's mailbox tells the same).
    /// A malformed memory node is still an error, and RAM from the tree always wins. Without
    /// either, [`MemMapError::NoRam`].
    pub fn from_dt_or_firmware(
        dt: &DeviceTree<'_>,
        kernel: Range<PhysAddr>,
        firmware_ram: Option<Region>,
    ) -> Result<MemoryMap, MemMapError> {
        let mut map = MemoryMap::new();
        for bank in dt.memory() {
            map.add_ram(bank?)?;
        }
        if map.nram == 0 {
            if let Some(ram) = firmware_ram {
                map.add_ram(ram)?;
            }
        }
        if map.nram == 0 {
            return Err(MemMapError::NoRam);
        }
        for (i, r) in dt.mem_reserve().enumerate() {
            // "#3": the entry's index in the header map. A u64 index always fits the buffer.
            let mut name = StrBuf {
                buf: [0; 32],
                len: 0,
            };
            let _ = fmt::write(&mut name, format_args!("#{i}"));
            map.insert(Reservation {
                region: r?,
                kind: ReservationKind::MemReserve,
                name: ResName::new(name.as_str()),
            })?;
        }
        for rm in dt.reserved_memory()? {
            let rm = rm?;
            if !rm.is_available() {
                continue;
            }
            for r in rm.regs() {
                let region = r?;
                if region.is_empty() {
                    continue;
                }
                map.insert(Reservation {
                    region,
                    kind: ReservationKind::ReservedMemory { no_map: rm.no_map },
                    name: ResName::new(rm.name()),
                })?;
            }
        }
        let kname = ResName::new("kernel");
        let kregion = Region::from_range(kernel.clone()).ok_or(MemMapError::BadRange {
            name: kname,
            base: kernel.start.0,
            size: kernel.end.0.wrapping_sub(kernel.start.0),
        })?;
        map.insert(Reservation {
            region: kregion,
            kind: ReservationKind::Kernel,
            name: kname,
        })?;
        let dtb = dt.phys_region().ok_or_else(|| MemMapError::BadRange {
            name: ResName::new("dtb"),
            base: dt.as_bytes().as_ptr() as usize as u64,
            size: dt.totalsize() as u64,
        })?;
        map.insert_blob(dtb, ReservationKind::Dtb, "dtb")?;
        if let Some(initrd) = dt.initrd()? {
            map.insert_blob(initrd, ReservationKind::Initrd, "initrd")?;
        }
        Ok(map)
    }

    /// Adds RAM, merging it with any bank it overlaps or touches. Empty regions are ignored.
    pub fn add_ram(&mut self, region: Region) -> Result<(), MemMapError> {
        if self.sealed {
            return Err(MemMapError::Sealed);
        }
        if region.is_empty() {
            return Ok(());
        }
        let (mut lo, mut hi) = (region.base.0, region.end());
        let mut i = 0;
        while i < self.nram {
            let b = self.ram[i];
            if b.base.0 <= hi && lo <= b.end() {
                lo = lo.min(b.base.0);
                hi = hi.max(b.end());
                self.ram.copy_within(i + 1..self.nram, i);
                self.nram -= 1;
            } else {
                i += 1;
            }
        }
        if self.nram == MAX_RAM_BANKS {
            return Err(MemMapError::TooManyRamBanks);
        }
        let at = self.ram[..self.nram].partition_point(|b| b.base.0 < lo);
        self.ram.copy_within(at..self.nram, at + 1);
        self.ram[at] = Region {
            base: PhysAddr(lo),
            size: hi - lo,
        };
        self.nram += 1;
        Ok(())
    }

    /// Records a reservation made after boot (e.g. a CMA area the CMA code placed). It must be
    /// non-empty, inside one RAM bank and overlap no existing reservation.
    pub fn reserve(
        &mut self,
        base: PhysAddr,
        size: u64,
        kind: ReservationKind,
        name: &str,
    ) -> Result<(), MemMapError> {
        let name = ResName::new(name);
        let region = Region::new(base, size).ok_or(MemMapError::BadRange {
            name,
            base: base.0,
            size,
        })?;
        self.insert(Reservation { region, kind, name })
    }

    /// Boot-time allocation, memblock style: takes `size` bytes (rounded up to whole pages)
    /// aligned to `align` (a power of two; at least a page) from the highest free address that
    /// fits, entirely below `below` if given, and records it as a reservation of `kind`.
    ///
    /// Top-down so that low memory, which DMA masters with narrow masks need (the Pi 4's 30-bit
    /// DMA, CMA's alloc-ranges), stays free as long as possible.
    pub fn alloc_early(
        &mut self,
        size: u64,
        align: u64,
        below: Option<u64>,
        kind: ReservationKind,
        name: &str,
    ) -> Result<PhysAddr, MemMapError> {
        if !align.is_power_of_two() {
            return Err(MemMapError::BadAlignment { align });
        }
        let align = align.max(PAGE_SIZE);
        let pages = match align_up(size, PAGE_SIZE) {
            Some(s) if s > 0 => s,
            _ => return Err(MemMapError::BadSize { size }),
        };
        let mut best: Option<u64> = None;
        for free in self.free_ranges() {
            let top = below.map_or(free.end(), |b| b.min(free.end()));
            let Some(highest) = top.checked_sub(pages) else {
                continue;
            };
            let candidate = align_down(highest, align);
            if candidate >= free.base.0 && best.is_none_or(|b| candidate > b) {
                best = Some(candidate);
            }
        }
        let base = best.ok_or(MemMapError::NoSpace { size, align, below })?;
        self.reserve(PhysAddr(base), pages, kind, name)?;
        Ok(PhysAddr(base))
    }

    /// The RAM banks, sorted and merged.
    pub fn ram(&self) -> &[Region] {
        &self.ram[..self.nram]
    }

    /// Every reservation, sorted by base.
    pub fn reservations(&self) -> &[Reservation] {
        &self.res[..self.nres]
    }

    /// RAM minus reservations, each range shrunk inward to page boundaries, sorted.
    pub fn free_ranges(&self) -> FreeRanges<'_> {
        FreeRanges {
            map: self,
            bank: 0,
            cursor: self.ram().first().map_or(0, |b| b.base.0),
            res: 0,
        }
    }

    pub fn total_ram(&self) -> u64 {
        self.ram().iter().map(|b| b.size).sum()
    }

    pub fn total_free(&self) -> u64 {
        self.free_ranges().map(|r| r.size).sum()
    }

    /// Whether `region` lies entirely inside one RAM bank.
    pub fn is_ram(&self, region: &Region) -> bool {
        self.ram().iter().any(|b| b.contains(region))
    }

    /// The first reservation `region` overlaps, if any.
    pub fn overlaps_reservation(&self, region: &Region) -> Option<&Reservation> {
        self.reservations()
            .iter()
            .find(|r| r.region.overlaps(region))
    }

    /// Writes the map for the boot log: RAM banks, reservations (with what and whose), free
    /// ranges, totals. One line per region, each prefixed with two spaces.
    pub fn write_to<W: fmt::Write + ?Sized>(&self, w: &mut W) -> fmt::Result {
        for b in self.ram() {
            writeln!(w, "  {b} {:>9}  ram", HumanSize(b.size))?;
        }
        for r in self.reservations() {
            write!(
                w,
                "  {} {:>9}  reserved: {}",
                r.region,
                HumanSize(r.region.size),
                r.kind.describe()
            )?;
            if !r.name.is_empty() {
                write!(w, " `{}`", r.name)?;
            }
            writeln!(w)?;
        }
        for f in self.free_ranges() {
            writeln!(w, "  {f} {:>9}  free", HumanSize(f.size))?;
        }
        writeln!(
            w,
            "  total {} RAM, {} free",
            HumanSize(self.total_ram()),
            HumanSize(self.total_free())
        )
    }

    /// Records a DTB or initrd, accepting it inside an existing `/memreserve/` entry (U-Boot
    /// reserves the blobs it hands over that way).
    fn insert_blob(
        &mut self,
        region: Region,
        kind: ReservationKind,
        name: &str,
    ) -> Result<(), MemMapError> {
        let covered = self
            .reservations()
            .iter()
            .any(|r| r.kind == ReservationKind::MemReserve && r.region.contains(&region));
        if covered && !region.is_empty() {
            return Ok(());
        }
        self.insert(Reservation {
            region,
            kind,
            name: ResName::new(name),
        })
    }

    /// Adds a reservation after checking it against RAM and the existing reservations.
    fn insert(&mut self, new: Reservation) -> Result<(), MemMapError> {
        if self.sealed {
            return Err(MemMapError::Sealed);
        }
        let r = new.region;
        if r.is_empty() {
            return Err(MemMapError::Empty { name: new.name });
        }
        if !self.is_ram(&r) {
            let touches_ram = self.ram().iter().any(|b| b.overlaps(&r));
            return Err(if touches_ram {
                MemMapError::PartlyOutsideRam { res: new }
            } else {
                MemMapError::OutsideRam { res: new }
            });
        }
        if let Some(existing) = self.overlaps_reservation(&r) {
            return Err(MemMapError::Overlap {
                new,
                existing: *existing,
            });
        }
        if self.nres == MAX_RESERVATIONS {
            return Err(MemMapError::TooManyReservations { new });
        }
        let at = self.res[..self.nres].partition_point(|x| x.region.base < r.base);
        self.res.copy_within(at..self.nres, at + 1);
        self.res[at] = new;
        self.nres += 1;
        Ok(())
    }
}

impl fmt::Debug for MemoryMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryMap")
            .field("ram", &self.ram())
            .field("reservations", &self.reservations())
            .finish()
    }
}

impl fmt::Display for MemoryMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

/// Iterator returned by [`MemoryMap::free_ranges`].
pub struct FreeRanges<'m> {
    map: &'m MemoryMap,
    /// Current bank.
    bank: usize,
    /// Start of the not yet reported part of the current bank.
    cursor: u64,
    /// Next reservation to consider.
    res: usize,
}

impl Iterator for FreeRanges<'_> {
    type Item = Region;

    fn next(&mut self) -> Option<Region> {
        loop {
            let bank = *self.map.ram().get(self.bank)?;
            // Reservations are sorted and each lies inside one bank, so those in this bank come
            // next in order.
            let gap_end = match self.map.reservations().get(self.res) {
                Some(r) if r.region.base.0 < bank.end() => {
                    self.res += 1;
                    let end = r.region.base.0;
                    let start = self.cursor;
                    self.cursor = self.cursor.max(r.region.end());
                    (start, end)
                }
                _ => {
                    let start = self.cursor;
                    self.bank += 1;
                    self.cursor = self.map.ram().get(self.bank).map_or(0, |b| b.base.0);
                    (start, bank.end())
                }
            };
            let (start, end) = gap_end;
            let Some(start) = align_up(start, PAGE_SIZE) else {
                continue;
            };
            let end = align_down(end, PAGE_SIZE);
            if start < end {
                return Some(Region {
                    base: PhysAddr(start),
                    size: end - start,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dt::fixtures::*;
    use proptest::prelude::*;

    fn pa(a: u64) -> PhysAddr {
        PhysAddr::new(a)
    }

    fn dt_at(bytes: &[u8], phys: u64) -> DeviceTree<'_> {
        DeviceTree::from_bytes(bytes)
            .unwrap()
            .with_phys_base(pa(phys))
    }

    fn spans(it: impl Iterator<Item = Region>) -> Vec<(u64, u64)> {
        it.map(|r| (r.base().as_u64(), r.end())).collect()
    }

    fn res_spans(m: &MemoryMap) -> Vec<(u64, u64, ReservationKind, &str)> {
        m.reservations()
            .iter()
            .map(|r| {
                (
                    r.region.base().as_u64(),
                    r.region.end(),
                    r.kind,
                    r.name.as_str(),
                )
            })
            .collect()
    }

    #[test]
    fn qemu_virt_2g() {
        // RAM 0x40000000 + 2 GiB; kernel 0x40080000..0x40280000; the DTB (8032 bytes, re-encoded
        // without QEMU's padding) at 0x48000000.
        let dt = dt_at(QEMU_VIRT_A53_2G, 0x4800_0000);
        let m = MemoryMap::from_dt(&dt, pa(0x4008_0000)..pa(0x4028_0000)).unwrap();
        assert_eq!(spans(m.ram().iter().copied()), [(0x4000_0000, 0xc000_0000)]);
        assert_eq!(
            res_spans(&m),
            [
                (0x4008_0000, 0x4028_0000, ReservationKind::Kernel, "kernel"),
                (0x4800_0000, 0x4800_1f60, ReservationKind::Dtb, "dtb"),
            ]
        );
        assert_eq!(
            spans(m.free_ranges()),
            [
                (0x4000_0000, 0x4008_0000),
                (0x4028_0000, 0x4800_0000),
                (0x4800_2000, 0xc000_0000)
            ]
        );
        assert_eq!(m.total_ram(), 0x8000_0000);
        assert_eq!(m.total_free(), 0x8000_0000 - 0x20_0000 - 0x2000);
        assert!(m.is_ram(&Region::new(pa(0x4000_0000), 0x8000_0000).unwrap()));
        assert!(!m.is_ram(&Region::new(pa(0x3fff_f000), 0x2000).unwrap()));
        let probe = Region::new(pa(0x4800_1000), 0x2000).unwrap();
        assert_eq!(
            m.overlaps_reservation(&probe).map(|r| r.kind),
            Some(ReservationKind::Dtb)
        );
        assert_eq!(
            m.overlaps_reservation(&Region::new(pa(0x4800_2000), 0x1000).unwrap()),
            None
        );
    }

    #[test]
    fn qemu_raspi3b_with_downstream_tree() {
        // QEMU rewrote memory@0 to <0 0x3c000000>; /memreserve/ 0 0x1000; linux,cma is dynamic
        // and not placed here. The blob is 0x15d76 bytes, loaded at 0x08000000.
        let dt = dt_at(QEMU_RASPI3B, 0x0800_0000);
        let m = MemoryMap::from_dt(&dt, pa(0x8_0000)..pa(0x10_0000)).unwrap();
        assert_eq!(spans(m.ram().iter().copied()), [(0, 0x3c00_0000)]);
        assert_eq!(
            res_spans(&m),
            [
                (0, 0x1000, ReservationKind::MemReserve, "#0"),
                (0x8_0000, 0x10_0000, ReservationKind::Kernel, "kernel"),
                (0x800_0000, 0x801_5d76, ReservationKind::Dtb, "dtb"),
            ]
        );
        assert_eq!(
            spans(m.free_ranges()),
            [
                (0x1000, 0x8_0000),
                (0x10_0000, 0x800_0000),
                (0x801_6000, 0x3c00_0000)
            ]
        );
    }

    #[test]
    fn firmware_ram_fills_an_empty_memory_node() {
        // Downstream Pi 3 tree as the firmware hands it over unfilled: memory@0 reg = <0 0>. The
        // mailbox's ARM memory (QEMU: 0 + 0x3c000000) becomes the RAM; the tree's reservations
        // still apply.
        let fw = Region::new(pa(0), 0x3c00_0000);
        let dt = dt_at(RPI3B_DOWNSTREAM, 0x0800_0000);
        let m = MemoryMap::from_dt_or_firmware(&dt, pa(0x8_0000)..pa(0x10_0000), fw).unwrap();
        assert_eq!(spans(m.ram().iter().copied()), [(0, 0x3c00_0000)]);
        let kinds: Vec<_> = res_spans(&m).iter().map(|r| (r.0, r.2)).collect();
        assert_eq!(
            kinds,
            [
                (0, ReservationKind::MemReserve),
                (0x8_0000, ReservationKind::Kernel),
                (0x800_0000, ReservationKind::Dtb)
            ]
        );
        // Pi 4 (2/1 cells, reg = <0 0 0>): the same.
        let dt = dt_at(RPI4B_DOWNSTREAM, 0x0800_0000);
        let m = MemoryMap::from_dt_or_firmware(&dt, pa(0x20_0000)..pa(0x30_0000), fw).unwrap();
        assert_eq!(spans(m.ram().iter().copied()), [(0, 0x3c00_0000)]);
        // Without the firmware's answer the refusal stays.
        for bytes in [RPI3B_DOWNSTREAM, NO_MEMORY, ZERO_MEMORY] {
            let e = MemoryMap::from_dt_or_firmware(&dt_at(bytes, 0x0800_0000), pa(0x8_0000)..pa(0x10_0000), None);
            assert_eq!(e.unwrap_err(), MemMapError::NoRam);
        }
        // A tree that describes RAM keeps its own (QEMU's raspi3b rewrite), whatever the firmware says.
        let dt = dt_at(QEMU_RASPI3B, 0x0800_0000);
        let other = Region::new(pa(0), 0x1000_0000);
        let m = MemoryMap::from_dt_or_firmware(&dt, pa(0x8_0000)..pa(0x10_0000), other).unwrap();
        assert_eq!(spans(m.ram().iter().copied()), [(0, 0x3c00_0000)]);
        // The kernel must still lie inside the firmware's RAM.
        let small = Region::new(pa(0), 0x4_0000);
        let e = MemoryMap::from_dt_or_firmware(&dt_at(RPI3B_DOWNSTREAM, 0x2_0000), pa(0x8_0000)..pa(0x10_0000), small);
        assert!(matches!(e, Err(MemMapError::OutsideRam { .. })), "{e:?}");
    }

    #[test]
    fn pi5_firmware_region_is_a_no_map_reservation() {
        // bcm2712 downstream: atf@0 (BL31, 512 KiB) no-map; kernel at 0x200000.
        let dt = dt_at(RPI5B_DOWNSTREAM, 0x0800_0000);
        let m = MemoryMap::from_dt(&dt, pa(0x20_0000)..pa(0x30_0000)).unwrap();
        assert_eq!(spans(m.ram().iter().copied()), [(0, 0x2800_0000)]);
        let atf = m.reservations().iter().find(|r| r.name.as_str() == "atf@0").unwrap();
        assert_eq!(atf.kind, ReservationKind::ReservedMemory { no_map: true });
        assert_eq!((atf.region.base().0, atf.region.size()), (0, 0x8_0000));
        assert!(m.free_ranges().all(|f| f.base().0 >= 0x8_0000), "{:?}", spans(m.free_ranges()));
    }

    #[test]
    fn qemu_raspi4b_skips_disabled_nvram() {
        // Root 2/1; memory@0 <0 0 0x3c000000>; nvram@0/@1 are disabled with zero-sized reg.
        let dt = dt_at(QEMU_RASPI4B, 0x0800_0000);
        let m = MemoryMap::from_dt(&dt, pa(0x8_0000)..pa(0x10_0000)).unwrap();
        assert_eq!(spans(m.ram().iter().copied()), [(0, 0x3c00_0000)]);
        let kinds: Vec<_> = m.reservations().iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                ReservationKind::MemReserve,
                ReservationKind::Kernel,
                ReservationKind::Dtb
            ]
        );
    }

    #[test]
    fn reserved_memory_fixture() {
        // See reserved.dts for every number below.
        let dt = dt_at(RESERVED, 0x4800_0000);
        let m = MemoryMap::from_dt(&dt, pa(0x4020_0000)..pa(0x4040_0000)).unwrap();
        assert_eq!(
            spans(m.ram().iter().copied()),
            [(0x4000_0000, 0x9000_0000), (0x1_0000_0000, 0x1_4000_0000)]
        );
        use ReservationKind::*;
        assert_eq!(
            res_spans(&m),
            [
                (0x4000_0000, 0x4000_1000, MemReserve, "#0"),
                (
                    0x4010_0000,
                    0x4020_0000,
                    ReservedMemory { no_map: true },
                    "secmon@40100000"
                ),
                (0x4020_0000, 0x4040_0000, Kernel, "kernel"),
                (0x4400_0000, 0x4410_0000, Initrd, "initrd"),
                (0x4800_0000, 0x4800_055e, Dtb, "dtb"),
                (
                    0x5000_0000,
                    0x5000_1000,
                    ReservedMemory { no_map: false },
                    "multi@50000000"
                ),
                (
                    0x5000_2000,
                    0x5000_4000,
                    ReservedMemory { no_map: false },
                    "multi@50000000"
                ),
                (
                    0x7f00_0000,
                    0x7f80_0000,
                    ReservedMemory { no_map: false },
                    "framebuffer@7f000000"
                ),
                (0x1_2000_0000, 0x1_2010_0000, MemReserve, "#1"),
            ]
        );
        assert_eq!(
            spans(m.free_ranges()),
            [
                (0x4000_1000, 0x4010_0000),
                (0x4040_0000, 0x4400_0000),
                (0x4410_0000, 0x4800_0000),
                (0x4800_1000, 0x5000_0000),
                (0x5000_1000, 0x5000_2000),
                (0x5000_4000, 0x7f00_0000),
                (0x7f80_0000, 0x9000_0000),
                (0x1_0000_0000, 0x1_2000_0000),
                (0x1_2010_0000, 0x1_4000_0000),
            ]
        );
    }

    #[test]
    fn dtb_inside_a_memreserve_entry_is_accepted_once() {
        // U-Boot style: the blob (0x55e bytes) sits inside /memreserve/ #0 = 0x40000000+0x1000.
        let dt = dt_at(RESERVED, 0x4000_0000);
        let m = MemoryMap::from_dt(&dt, pa(0x4020_0000)..pa(0x4040_0000)).unwrap();
        assert!(m
            .reservations()
            .iter()
            .all(|r| r.kind != ReservationKind::Dtb));
        assert_eq!(m.reservations().len(), 8);
        // Straddling the entry's end is not "inside": an overlap.
        let dt = dt_at(RESERVED, 0x4000_0f00);
        let e = MemoryMap::from_dt(&dt, pa(0x4020_0000)..pa(0x4040_0000)).unwrap_err();
        assert!(
            matches!(
                e,
                MemMapError::Overlap {
                    new: Reservation {
                        kind: ReservationKind::Dtb,
                        ..
                    },
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn inconsistent_trees_are_refused() {
        let k = || pa(0x4080_0000)..pa(0x4090_0000);
        let e = MemoryMap::from_dt(&dt_at(OVERLAP, 0x4800_0000), k()).unwrap_err();
        assert_eq!(
            format!("{e}"),
            "0x0000000040100000-0x00000000402fffff (/reserved-memory, no-map `second@40100000`) \
             overlaps 0x0000000040000000-0x00000000401fffff (/reserved-memory `first@40000000`)"
        );
        let e = MemoryMap::from_dt(&dt_at(OUTSIDE_RAM, 0x4800_0000), k()).unwrap_err();
        assert_eq!(
            format!("{e}"),
            "reservation 0x0000000010000000-0x0000000010000fff (/memreserve/ entry `#0`) lies \
             entirely outside RAM"
        );
        let e = MemoryMap::from_dt(&dt_at(PARTIAL_RAM, 0x4800_0000), k()).unwrap_err();
        match e {
            MemMapError::PartlyOutsideRam { res } => {
                assert_eq!(res.name.as_str(), "straddle@4ff00000");
                assert_eq!(
                    (res.region.base().as_u64(), res.region.size()),
                    (0x4ff0_0000, 0x20_0000)
                );
            }
            other => panic!("{other}"),
        }
        for bytes in [NO_MEMORY, ZERO_MEMORY, RPI3B_DOWNSTREAM, RPI4B_DOWNSTREAM] {
            let e = MemoryMap::from_dt(&dt_at(bytes, 0x4800_0000), k()).unwrap_err();
            assert_eq!(e, MemMapError::NoRam);
            assert_eq!(
                format!("{e}"),
                "no usable RAM: no available memory node with a non-zero reg in the device tree"
            );
        }
        let e = MemoryMap::from_dt(&dt_at(ABSURD_ROOT_CELLS, 0x4800_0000), k()).unwrap_err();
        assert!(
            matches!(e, MemMapError::Dt(DtError::Cells { value: 4, .. })),
            "{e}"
        );
        let e = MemoryMap::from_dt(&dt_at(BROKEN_RESERVED, 0x4800_0000), k()).unwrap_err();
        assert!(
            format!("{e}").starts_with("device tree: property `size` of node `badsize`"),
            "{e}"
        );
    }

    #[test]
    fn kernel_dtb_and_initrd_must_not_collide() {
        let dt = dt_at(RESERVED, 0x4800_0000);
        // Over /memreserve/ #0.
        let e = MemoryMap::from_dt(&dt, pa(0x4000_0800)..pa(0x4001_0000)).unwrap_err();
        match e {
            MemMapError::Overlap { new, existing } => {
                assert_eq!(new.kind, ReservationKind::Kernel);
                assert_eq!(existing.name.as_str(), "#0");
            }
            other => panic!("{other}"),
        }
        // Outside RAM, inverted, empty.
        let e = MemoryMap::from_dt(&dt, pa(0x1000_0000)..pa(0x1010_0000)).unwrap_err();
        assert!(matches!(
            e,
            MemMapError::OutsideRam {
                res: Reservation {
                    kind: ReservationKind::Kernel,
                    ..
                }
            }
        ));
        let e = MemoryMap::from_dt(&dt, pa(0x4030_0000)..pa(0x4020_0000)).unwrap_err();
        assert!(matches!(e, MemMapError::BadRange { .. }), "{e}");
        let e = MemoryMap::from_dt(&dt, pa(0x4030_0000)..pa(0x4030_0000)).unwrap_err();
        assert!(matches!(e, MemMapError::Empty { .. }), "{e}");
        // DTB loaded over the kernel.
        let dt = dt_at(RESERVED, 0x4030_0000);
        let e = MemoryMap::from_dt(&dt, pa(0x4020_0000)..pa(0x4040_0000)).unwrap_err();
        match e {
            MemMapError::Overlap { new, existing } => {
                assert_eq!(
                    (new.kind, existing.kind),
                    (ReservationKind::Dtb, ReservationKind::Kernel)
                );
            }
            other => panic!("{other}"),
        }
        // bus-translate.dts: initrd 0x48000000..0x48200000; the DTB placed inside it.
        let dt = dt_at(BUS_TRANSLATE, 0x4810_0000);
        let e = MemoryMap::from_dt(&dt, pa(0x4008_0000)..pa(0x4020_0000)).unwrap_err();
        match e {
            MemMapError::Overlap { new, existing } => {
                assert_eq!(
                    (new.kind, existing.kind),
                    (ReservationKind::Initrd, ReservationKind::Dtb)
                );
            }
            other => panic!("{other}"),
        }
        // bus-translate's own /reserved-memory blob (0x41000000, 64 KiB) is reserved.
        let dt = dt_at(BUS_TRANSLATE, 0x4700_0000);
        let m = MemoryMap::from_dt(&dt, pa(0x4008_0000)..pa(0x4020_0000)).unwrap();
        assert!(res_spans(&m).contains(&(
            0x4100_0000,
            0x4101_0000,
            ReservationKind::ReservedMemory { no_map: false },
            "blob@1000000"
        )));
    }

    /// 128 MiB at 0x40000000, kernel 0x40080000..0x40180000, DTB 0x44000000..+1 MiB.
    fn virt_128m() -> MemoryMap {
        let dt = dt_at(QEMU_VIRT_A53_128M, 0x4400_0000);
        MemoryMap::from_dt(&dt, pa(0x4008_0000)..pa(0x4018_0000)).unwrap()
    }

    #[test]
    fn alloc_early_is_top_down_aligned_and_bounded() {
        use ReservationKind::*;
        let mut m = virt_128m();
        assert_eq!(
            m.alloc_early(0x1_0000, 0x1000, None, PageTables, "pt"),
            Ok(pa(0x47ff_0000))
        );
        assert_eq!(
            m.alloc_early(0x1000, 0x20_0000, None, Early, "2m"),
            Ok(pa(0x47e0_0000))
        );
        assert_eq!(
            m.alloc_early(0x10_0000, 0x1000, Some(0x4400_0000), Swiotlb, "swiotlb"),
            Ok(pa(0x43f0_0000))
        );
        // Sizes round up to pages; alignment below a page is a page.
        // The highest free page is just below the page tables, above the 2 MiB-aligned page.
        assert_eq!(m.alloc_early(1, 1, None, Heap, "heap"), Ok(pa(0x47fe_f000)));
        assert_eq!(
            m.reservations()
                .iter()
                .find(|r| r.kind == Heap)
                .unwrap()
                .region
                .size(),
            0x1000
        );
        assert_eq!(
            m.alloc_early(0x1000, 3, None, Early, "x"),
            Err(MemMapError::BadAlignment { align: 3 })
        );
        assert_eq!(
            m.alloc_early(0x1000, 0, None, Early, "x"),
            Err(MemMapError::BadAlignment { align: 0 })
        );
        assert_eq!(
            m.alloc_early(0, 0x1000, None, Early, "x"),
            Err(MemMapError::BadSize { size: 0 })
        );
        assert_eq!(
            m.alloc_early(u64::MAX, 0x1000, None, Early, "x"),
            Err(MemMapError::BadSize { size: u64::MAX })
        );
        let e = m
            .alloc_early(0x800_0000, 0x1000, None, Early, "x")
            .unwrap_err();
        assert_eq!(
            e,
            MemMapError::NoSpace {
                size: 0x800_0000,
                align: 0x1000,
                below: None
            }
        );
        assert_eq!(
            format!(
                "{}",
                m.alloc_early(0x1000, 0x1000, Some(0x4000_0000), Early, "x")
                    .unwrap_err()
            ),
            "no free memory for 0x1000 bytes aligned to 0x1000 below 0x40000000"
        );
        // The largest free run below the kernel is 512 KiB.
        assert_eq!(
            m.alloc_early(0x8_0000, 0x1000, Some(0x4008_0000), Cma, "cma"),
            Ok(pa(0x4000_0000))
        );
        assert_eq!(
            m.alloc_early(0x1000, 0x1000, Some(0x4008_0000), Early, "x"),
            Err(MemMapError::NoSpace {
                size: 0x1000,
                align: 0x1000,
                below: Some(0x4008_0000)
            })
        );
        // Fill the memory: every remaining page can be taken one at a time, then nothing.
        let free_pages = m.total_free() / 0x1000;
        for _ in 0..free_pages.min(100) {
            m.alloc_early(0x1000, 0x1000, None, Early, "fill").unwrap();
        }
        assert!(m
            .reservations()
            .windows(2)
            .all(|w| w[0].region.end() <= w[1].region.base().as_u64()));
    }

    #[test]
    fn reserve_validates() {
        use ReservationKind::*;
        let mut m = virt_128m();
        assert_eq!(
            m.reserve(pa(0x4100_0000), 0x40_0000, Cma, "linux,cma"),
            Ok(())
        );
        let e = m
            .reserve(pa(0x413f_f000), 0x2000, AtomicPool, "pool")
            .unwrap_err();
        assert!(matches!(
            e,
            MemMapError::Overlap {
                existing: Reservation { kind: Cma, .. },
                ..
            }
        ));
        let e = m
            .reserve(pa(0x47ff_f000), 0x2000, Early, "edge")
            .unwrap_err();
        assert!(matches!(e, MemMapError::PartlyOutsideRam { .. }), "{e}");
        let e = m.reserve(pa(0x1000), 0x1000, Early, "low").unwrap_err();
        assert!(matches!(e, MemMapError::OutsideRam { .. }), "{e}");
        let e = m.reserve(pa(0x4200_0000), 0, Early, "zero").unwrap_err();
        assert_eq!(
            e,
            MemMapError::Empty {
                name: ResName::new("zero")
            }
        );
        let e = m.reserve(pa(u64::MAX), 2, Early, "wrap").unwrap_err();
        assert!(matches!(e, MemMapError::BadRange { .. }), "{e}");
        // Long names are truncated, visibly.
        m.reserve(
            pa(0x4200_0000),
            0x1000,
            Early,
            "a-very-long-reservation-name-indeed",
        )
        .unwrap();
        assert!(m
            .reservations()
            .iter()
            .any(|r| r.name.as_str() == "a-very-long-reservation~"));
    }

    #[test]
    fn capacities_are_errors() {
        let mut m = MemoryMap::new();
        m.add_ram(Region::new(pa(0), 0x1000_0000).unwrap()).unwrap();
        for i in 0..MAX_RESERVATIONS as u64 {
            m.reserve(pa(i * 0x2000), 0x1000, ReservationKind::Early, "r")
                .unwrap();
        }
        let e = m
            .reserve(
                pa(0x100_0000),
                0x1000,
                ReservationKind::Early,
                "one-too-many",
            )
            .unwrap_err();
        assert!(matches!(e, MemMapError::TooManyReservations { .. }), "{e}");
        assert!(m
            .alloc_early(0x1000, 0x1000, None, ReservationKind::Early, "x")
            .is_err());

        let mut m = MemoryMap::new();
        for i in 0..MAX_RAM_BANKS as u64 {
            m.add_ram(Region::new(pa(i * 0x2000), 0x1000).unwrap())
                .unwrap();
        }
        assert_eq!(
            m.add_ram(Region::new(pa(0x100_0000), 0x1000).unwrap()),
            Err(MemMapError::TooManyRamBanks)
        );
        // Filling the holes merges everything into one bank.
        for i in 0..MAX_RAM_BANKS as u64 {
            m.add_ram(Region::new(pa(i * 0x2000 + 0x1000), 0x1000).unwrap())
                .unwrap();
        }
        assert_eq!(
            spans(m.ram().iter().copied()),
            [(0, MAX_RAM_BANKS as u64 * 0x2000)]
        );
    }

    #[test]
    fn ram_banks_merge_when_overlapping_or_touching() {
        let mut m = MemoryMap::new();
        let add = |m: &mut MemoryMap, b: u64, e: u64| {
            m.add_ram(Region::new(pa(b), e - b).unwrap()).unwrap()
        };
        add(&mut m, 0x5000, 0x6000);
        add(&mut m, 0x1000, 0x2000);
        add(&mut m, 0x3000, 0x4000);
        add(&mut m, 0x1800, 0x3000);
        add(&mut m, 0x9000, 0x9000);
        assert_eq!(
            spans(m.ram().iter().copied()),
            [(0x1000, 0x4000), (0x5000, 0x6000)]
        );
        add(&mut m, 0x0, 0x8000);
        assert_eq!(spans(m.ram().iter().copied()), [(0, 0x8000)]);
    }

    #[test]
    fn boot_log_format() {
        let m = virt_128m();
        let text = format!("{m}");
        let expected = [
            "  0x0000000040000000-0x0000000047ffffff   128 MiB  ram",
            "  0x0000000040080000-0x000000004017ffff     1 MiB  reserved: kernel image `kernel`",
            "  0x0000000044000000-0x0000000044001d8d   7.3 KiB  reserved: device tree blob `dtb`",
            "  0x0000000040000000-0x000000004007ffff   512 KiB  free",
            "  0x0000000040180000-0x0000000043ffffff  62.5 MiB  free",
            "  0x0000000044002000-0x0000000047ffffff  63.9 MiB  free",
            "  total 128 MiB RAM, 126.9 MiB free",
            "",
        ]
        .join("\n");
        assert_eq!(text, expected);
        let mut s = String::new();
        m.write_to(&mut s).unwrap();
        assert_eq!(s, expected);
    }

    #[test]
    fn human_sizes() {
        let h = |n| format!("{}", HumanSize(n));
        assert_eq!(h(0), "0 B");
        assert_eq!(h(1023), "1023 B");
        assert_eq!(h(1024), "1 KiB");
        assert_eq!(h(0x1800), "6 KiB");
        assert_eq!(h(0x18_0000), "1.5 MiB");
        assert_eq!(h(0x1f_ffff), "1.9 MiB");
        assert_eq!(h(3 << 30), "3 GiB");
        assert_eq!(h(1 << 40), "1 TiB");
        assert_eq!(h(u64::MAX), "16777215.9 TiB");
        assert_eq!(format!("[{:>8}]", HumanSize(4096)), "[   4 KiB]");
    }

    #[test]
    fn region_basics() {
        assert_eq!(Region::new(pa(u64::MAX), 1), None);
        assert_eq!(
            Region::new(pa(u64::MAX - 1), 1).map(|r| r.end()),
            Some(u64::MAX)
        );
        assert_eq!(Region::from_range(pa(5)..pa(4)), None);
        let r = Region::from_range(pa(0x1000)..pa(0x3000)).unwrap();
        assert_eq!((r.base().as_u64(), r.size()), (0x1000, 0x2000));
        assert!(r.overlaps(&Region::new(pa(0x2fff), 1).unwrap()));
        assert!(!r.overlaps(&Region::new(pa(0x3000), 1).unwrap()));
        assert!(!r.overlaps(&Region::new(pa(0x2000), 0).unwrap()));
        assert!(r.contains(&Region::new(pa(0x1000), 0x2000).unwrap()));
        assert!(!r.contains(&Region::new(pa(0x1000), 0x2001).unwrap()));
        assert_eq!(format!("{r}"), "0x0000000000001000-0x0000000000002fff");
    }

    // Model-based test: RAM and reservations on a 256-byte grid over 32 pages, checked against a
    // per-chunk model of what is RAM and what is reserved.
    const CHUNK: u64 = 0x100;
    const CHUNKS: usize = 512;
    const BASE: u64 = 0x4000_0000;

    #[derive(Clone, Debug)]
    enum Op {
        Reserve {
            start: usize,
            len: usize,
        },
        Alloc {
            pages: u64,
            align_log: u32,
            below_page: Option<u64>,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..CHUNKS, 0..40usize).prop_map(|(start, len)| Op::Reserve { start, len }),
            (1..5u64, 0..3u32, proptest::option::of(0..34u64)).prop_map(
                |(pages, align_log, below_page)| Op::Alloc {
                    pages,
                    align_log,
                    below_page
                }
            ),
        ]
    }

    struct Model {
        ram: [bool; CHUNKS],
        used: [bool; CHUNKS],
    }

    impl Model {
        const PER_PAGE: usize = (PAGE_SIZE / CHUNK) as usize;

        fn page_free(&self, p: usize) -> bool {
            (p * Self::PER_PAGE..(p + 1) * Self::PER_PAGE).all(|c| self.ram[c] && !self.used[c])
        }

        /// Highest page-aligned placement of `pages` free pages aligned to `align` pages and ending
        /// at or below page `limit`.
        fn alloc(&self, pages: usize, align: usize, limit: usize) -> Option<usize> {
            let npages = CHUNKS / Self::PER_PAGE;
            (0..npages)
                .rev()
                .filter(|p| p % align == 0 && p + pages <= limit.min(npages))
                .find(|&p| (p..p + pages).all(|q| self.page_free(q)))
        }

        fn free_runs(&self) -> Vec<(u64, u64)> {
            let mut out = Vec::new();
            let npages = CHUNKS / Self::PER_PAGE;
            let mut p = 0;
            while p < npages {
                if self.page_free(p) {
                    let s = p;
                    while p < npages && self.page_free(p) {
                        p += 1;
                    }
                    out.push((BASE + s as u64 * PAGE_SIZE, BASE + p as u64 * PAGE_SIZE));
                } else {
                    p += 1;
                }
            }
            out
        }
    }

    proptest! {
        #[test]
        fn memory_map_agrees_with_model(
            banks in proptest::collection::vec((0..CHUNKS, 1..300usize), 1..4),
            ops in proptest::collection::vec(op(), 0..40),
        ) {
            let mut m = MemoryMap::new();
            let mut model = Model { ram: [false; CHUNKS], used: [false; CHUNKS] };
            for (start, len) in banks {
                let end = (start + len).min(CHUNKS);
                m.add_ram(Region::new(pa(BASE + start as u64 * CHUNK), (end - start) as u64 * CHUNK).unwrap()).unwrap();
                model.ram[start..end].iter_mut().for_each(|c| *c = true);
            }
            for op in ops {
                match op {
                    Op::Reserve { start, len } => {
                        let end = (start + len).min(CHUNKS);
                        let got = m.reserve(pa(BASE + start as u64 * CHUNK), (end - start) as u64 * CHUNK, ReservationKind::Early, "r");
                        let cells = start..end;
                        let all_ram = cells.clone().all(|c| model.ram[c]);
                        let any_ram = cells.clone().any(|c| model.ram[c]);
                        let clash = cells.clone().any(|c| model.used[c]);
                        match got {
                            Ok(()) => {
                                prop_assert!(end > start && all_ram && !clash);
                                model.used[cells].iter_mut().for_each(|c| *c = true);
                            }
                            Err(MemMapError::Empty { .. }) => prop_assert_eq!(end, start),
                            Err(MemMapError::OutsideRam { .. }) => prop_assert!(!any_ram),
                            Err(MemMapError::PartlyOutsideRam { .. }) => prop_assert!(any_ram && !all_ram),
                            Err(MemMapError::Overlap { .. }) => prop_assert!(all_ram && clash),
                            Err(e) => prop_assert!(false, "unexpected {}", e),
                        }
                    }
                    Op::Alloc { pages, align_log, below_page } => {
                        let align = 1usize << align_log;
                        let below = below_page.map(|p| BASE + p * PAGE_SIZE);
                        let got = m.alloc_early(pages * PAGE_SIZE, align as u64 * PAGE_SIZE, below, ReservationKind::Early, "a");
                        let expect = model.alloc(pages as usize, align, below_page.map_or(usize::MAX, |p| p as usize));
                        prop_assert_eq!(got.ok().map(|a| a.as_u64()), expect.map(|p| BASE + p as u64 * PAGE_SIZE));
                        if let Some(p) = expect {
                            let c0 = p * Model::PER_PAGE;
                            model.used[c0..c0 + pages as usize * Model::PER_PAGE].iter_mut().for_each(|c| *c = true);
                        }
                    }
                }
                prop_assert_eq!(spans(m.free_ranges()), model.free_runs());
            }
            let ram_chunks = model.ram.iter().filter(|&&c| c).count() as u64;
            prop_assert_eq!(m.total_ram(), ram_chunks * CHUNK);
        }
    }

    #[test]
    fn a_sealed_map_refuses_changes() {
        let mut m = virt_128m();
        let before = m.reservations().len();
        m.seal();
        assert_eq!(m.alloc_early(0x1000, 0x1000, None, ReservationKind::Early, "x"), Err(MemMapError::Sealed));
        assert_eq!(m.reserve(pa(0x4500_0000), 0x1000, ReservationKind::Early, "y"), Err(MemMapError::Sealed));
        assert_eq!(m.add_ram(Region::new(pa(0x1_0000_0000), 0x1000).unwrap()), Err(MemMapError::Sealed));
        assert_eq!(m.reservations().len(), before);
    }
}
