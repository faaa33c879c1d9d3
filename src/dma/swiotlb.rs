//! The swiotlb slot allocator: which part of the bounce pool a streaming mapping borrows, and where
//! its data came from (after Linux's kernel/dma/swiotlb.c). Pure bookkeeping: the kernel copies
//! the data in and out, and serialises calls (one lock around a [`Swiotlb`]).
//!
//! A device that cannot reach a buffer (above its DMA mask, outside its bus windows, or every
//! buffer when bouncing is forced) gets a copy of it in a pool it can reach, reserved at boot. The
//! pool is cut into 2 KiB slots ([`IO_TLB_SIZE`]); a mapping takes a run of contiguous slots, at
//! most [`IO_TLB_SEGSIZE`] (128 = 256 KiB) and never across a 128-slot segment boundary, as in
//! Linux.
//!
//! Where a mapping goes, following Linux's `swiotlb_search_pool_area` and
//! `swiotlb_tbl_map_single` for streaming mappings (`alloc_align_mask` 0):
//! - With a `min_align_mask` (Linux's `dma_set_min_align_mask`, e.g. NVMe's 4 KiB - 1), the
//!   bounce address keeps the original's bits under that mask: the bits below the slot size
//!   become an offset into the first slot, and the run starts at a slot whose address bits
//!   above the slot size (under the mask) equal the original's.
//! - Without one, a mapping of a page or more starts page-aligned (Linux's historical guarantee,
//!   which drivers may rely on); the original's page offset is not kept. Smaller mappings start
//!   at any slot.
//! - The search is next-fit: it starts where the previous mapping ended (Linux's area index) and
//!   wraps around once, so it finds a place whenever one exists. It looks at a segment's 128
//!   slots at a time as one 128-bit free mask: the runs of `n` free slots come from O(log n)
//!   shift-and steps, the allowed start positions from one precomputed pattern, and the lowest
//!   surviving bit is the answer. A pool has few segments (256 for Linux's default 64 MiB).
//!
//! Not modelled: Linux's per-CPU areas (one lock here), a device's segment boundary mask
//! (devices here have none narrower than the pool), and `alloc_align_mask` (used by dma-iommu's
//! bouncing; that back end comes later). Alignment is judged on physical addresses, where Linux
//! uses the pool's bus address for the device at hand; the two agree whenever the device's
//! `dma-ranges` offset is a multiple of the alignment (a page, or `min_align_mask + 1`), as the
//! MiB-aligned offsets of real boards are.
//!
//! Every mapping records its original physical address and size, so that unmap and sync know
//! where to copy back ([`Swiotlb::orig`], [`Swiotlb::orig_of`]). Unmap checks its arguments
//! against that record: an address that does not start a live mapping or a size that differs is
//! an error and changes nothing. A full pool is an error ([`SwiotlbError::Full`]), never
//! corruption.
//!
//! Allocations ([`Swiotlb::alloc`] / [`Swiotlb::free`], after Linux's `swiotlb_alloc` /
//! `swiotlb_free`): a device with a restricted DMA pool takes its coherent memory from the pool
//! too, so that it never sees memory outside it. An allocation is a run of slots like a mapping,
//! found by the same search, but has no original buffer: nothing is copied, [`Swiotlb::orig`] and
//! [`Swiotlb::orig_of`] do not see it, and it starts at a multiple of the requested alignment.
//! The two kinds are told apart: unmapping an allocation or freeing a mapping is an error that
//! changes nothing. Both count in [`Stats::used`]; [`Stats::allocated`] says how many of those
//! slots allocations hold.

use alloc::vec::Vec;
use core::fmt;

use crate::mm::addr::{PhysAddr, PAGE_SIZE};

/// log2 of the slot size.
pub const IO_TLB_SHIFT: u32 = 11;
/// Slot size: 2 KiB.
pub const IO_TLB_SIZE: u64 = 1 << IO_TLB_SHIFT;
/// Slots per segment, and the most one mapping may take.
pub const IO_TLB_SEGSIZE: u32 = 128;
/// The largest mapping, offset included: 256 KiB.
pub const MAX_MAPPING_SIZE: u64 = IO_TLB_SIZE * IO_TLB_SEGSIZE as u64;

/// Marks a free slot in [`SlotInfo::head`].
const FREE: u32 = u32::MAX;

/// The largest mapping size that fits into an empty segment whatever the original address, for a
/// device with `min_align_mask` (Linux's `swiotlb_max_mapping_size`, which drivers use to size
/// their requests). An alignment period longer than a segment leaves no such guarantee: 0.
pub const fn max_mapping_size(min_align_mask: u64) -> u64 {
    if min_align_mask == 0 {
        return MAX_MAPPING_SIZE;
    }
    // The mask rounded up to whole slots: the worst-case number of bytes lost at the start of a
    // segment to the alignment, plus the offset into the first slot.
    match (min_align_mask >> IO_TLB_SHIFT).checked_add(1) {
        Some(slots) if slots < IO_TLB_SEGSIZE as u64 => MAX_MAPPING_SIZE - slots * IO_TLB_SIZE,
        _ => 0,
    }
}

/// A bounce buffer handed out by [`Swiotlb::map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BounceSlot {
    /// Where the bounced copy lives: the address to give the device (translated to a bus
    /// address) and to copy to and from. Its bits under `min_align_mask` equal the original's.
    pub addr: PhysAddr,
    /// Slots the mapping occupies (its offset into the first slot included).
    pub nslots: u32,
}

/// Counters of a pool, for diagnostics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Slots in the pool.
    pub total: u32,
    /// Slots in use now, by mappings and allocations.
    pub used: u32,
    /// Slots of [`Stats::used`] held by allocations ([`Swiotlb::alloc`]).
    pub allocated: u32,
    /// Most slots ever in use at once.
    pub high_water: u32,
    /// Map and alloc requests refused with [`SwiotlbError::Full`]: the pool had no room for a
    /// valid request. Invalid requests are not counted.
    pub failed: u64,
}

/// Why a pool could not be created, or a map or unmap was refused. A refused call changes
/// nothing (except the `failed` counter for [`SwiotlbError::Full`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwiotlbError {
    /// The pool's base or size is unusable.
    BadPool {
        base: PhysAddr,
        nslabs: u32,
        what: &'static str,
    },
    /// A mapping or allocation of 0 bytes.
    ZeroSize,
    /// `min_align_mask` is not of the form 2^k - 1.
    BadAlignMask { mask: u64 },
    /// An allocation's alignment is not a power of two.
    BadAlign { align: u64 },
    /// The mapping, with its offset into the first slot, needs more than [`IO_TLB_SEGSIZE`]
    /// slots.
    TooLarge { size: u64, offset: u64 },
    /// No run of `nslots` free slots satisfies the alignment rules.
    Full { nslots: u32, used: u32, total: u32 },
    /// An unmap of an address outside the pool.
    OutsidePool { addr: PhysAddr },
    /// An unmap of an address that does not start a live mapping (never mapped, already
    /// unmapped, or inside a mapping).
    NotMapped { addr: PhysAddr },
    /// An unmap of an address that starts an allocation, not a mapping.
    IsAllocation { addr: PhysAddr },
    /// A free of an address that does not start a live allocation (never allocated, already
    /// freed, inside an allocation, or a mapping).
    NotAllocated { addr: PhysAddr },
    /// An unmap or free whose size differs from the mapping's or allocation's.
    WrongSize {
        addr: PhysAddr,
        size: u64,
        mapped: u64,
    },
}

impl fmt::Display for SwiotlbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use SwiotlbError::*;
        match self {
            BadPool { base, nslabs, what } => {
                write!(f, "swiotlb pool at {base} of {nslabs} slots: {what}")
            }
            ZeroSize => f.write_str("swiotlb: cannot bounce a mapping of 0 bytes"),
            BadAlignMask { mask } => write!(
                f,
                "swiotlb: min_align_mask {mask:#x} is not a run of low bits (2^k - 1)"
            ),
            BadAlign { align } => write!(
                f,
                "swiotlb: allocation alignment {align:#x} is not a power of two"
            ),
            TooLarge { size, offset } => write!(
                f,
                "swiotlb: mapping of {size:#x} bytes at slot offset {offset:#x} exceeds the \
                 {MAX_MAPPING_SIZE:#x}-byte limit of one bounce buffer"
            ),
            Full {
                nslots,
                used,
                total,
            } => write!(
                f,
                "swiotlb full: no run of {nslots} free slots ({used} of {total} slots in use)"
            ),
            OutsidePool { addr } => {
                write!(
                    f,
                    "swiotlb: unmap of {addr}, which is outside the bounce pool"
                )
            }
            NotMapped { addr } => write!(
                f,
                "swiotlb: unmap of {addr}, which does not start a live bounce mapping \
                 (double unmap?)"
            ),
            IsAllocation { addr } => write!(
                f,
                "swiotlb: unmap of {addr}, which is a coherent allocation, not a bounce mapping"
            ),
            NotAllocated { addr } => write!(
                f,
                "swiotlb: free of {addr}, which does not start a live allocation (double free?)"
            ),
            WrongSize { addr, size, mapped } => write!(
                f,
                "swiotlb: release of {addr} with size {size:#x}, but {mapped:#x} bytes were taken"
            ),
        }
    }
}

/// Per-slot bookkeeping.
#[derive(Clone, Copy)]
struct SlotInfo {
    /// Index of the first slot of the mapping this slot belongs to, or [`FREE`].
    head: u32,
    /// The rest is meaningful in a run's first slot only: its size, its offset into that slot,
    /// whether it is an allocation (no original, offset 0) and, for a mapping, its original
    /// physical address.
    size: u32,
    offset: u16,
    alloc: bool,
    orig: u64,
}

const FREE_SLOT: SlotInfo = SlotInfo {
    head: FREE,
    size: 0,
    offset: 0,
    alloc: false,
    orig: 0,
};

/// A bounce pool: `nslabs` slots of [`IO_TLB_SIZE`] bytes from a page-aligned physical base.
pub struct Swiotlb {
    base: PhysAddr,
    nslabs: u32,
    /// One 128-bit mask per segment: bit `i` set = slot `segment * 128 + i` free. Bits past the
    /// pool's last slot are clear, so they are never found free.
    free: Vec<u128>,
    slots: Vec<SlotInfo>,
    /// Where the next search starts (next-fit).
    next: u32,
    used: u32,
    allocated: u32,
    high_water: u32,
    failed: u64,
}

/// Bit `p` set iff bits `p .. p + n` of `free` are all set (`1 <= n <= 128`). Runs reaching
/// past bit 127 are not found: mappings never cross a segment boundary.
fn runs_of(free: u128, n: u32) -> u128 {
    let mut r = free;
    let mut have = 1;
    while have < n {
        // `r` marks runs of `have`; and-ing with itself shifted by `step <= have` marks runs of
        // `have + step`.
        let step = have.min(n - have);
        r &= r >> step;
        have += step;
    }
    r
}

/// `n` set bits from bit `p` (`1 <= n`, `p + n <= 128`).
fn bits(p: u32, n: u32) -> u128 {
    let ones = if n >= 128 {
        u128::MAX
    } else {
        (1u128 << n) - 1
    };
    ones << p
}

/// The start slots a mapping may use: those whose index `s` satisfies `s % period == residue`.
#[derive(Clone, Copy)]
struct Starts {
    period: u64,
    residue: u64,
    /// For `period <= 128`: the allowed positions within any segment (the same in every
    /// segment, as 128 is a multiple of the period).
    pattern: u128,
}

impl Starts {
    fn new(period: u64, residue: u64) -> Starts {
        let pattern = match period {
            1 => u128::MAX,
            2..=64 => (u128::MAX / ((1u128 << period) - 1)) << residue,
            128 => 1u128 << residue,
            _ => 0,
        };
        Starts {
            period,
            residue,
            pattern,
        }
    }

    /// The allowed start positions within segment `seg`.
    fn in_segment(&self, seg: u64) -> u128 {
        if self.period <= u64::from(IO_TLB_SEGSIZE) {
            return self.pattern;
        }
        // At most one allowed slot per segment; the period is a power of two.
        let pos = self.residue.wrapping_sub(seg * u64::from(IO_TLB_SEGSIZE)) & (self.period - 1);
        if pos < u64::from(IO_TLB_SEGSIZE) {
            1u128 << pos
        } else {
            0
        }
    }
}

impl Swiotlb {
    /// An empty pool of `nslabs` slots from `base`, which must be page-aligned (so that
    /// page-sized mappings can start at a segment's first slot, as in Linux) and must not run
    /// past 2^64. Allocates 24 bytes of bookkeeping per slot plus a bit, and fails cleanly if
    /// the heap cannot provide it.
    pub fn new(base: PhysAddr, nslabs: u32) -> Result<Swiotlb, SwiotlbError> {
        let bad = |what| SwiotlbError::BadPool { base, nslabs, what };
        if nslabs == 0 {
            return Err(bad("a pool needs at least one slot"));
        }
        if !base.is_page_aligned() {
            return Err(bad("the base is not page-aligned"));
        }
        if base.checked_add(u64::from(nslabs) * IO_TLB_SIZE).is_none() {
            return Err(bad(
                "the pool runs past the end of the physical address space",
            ));
        }
        let segs = nslabs.div_ceil(IO_TLB_SEGSIZE) as usize;
        let mut free = Vec::new();
        let mut slots = Vec::new();
        if free.try_reserve_exact(segs).is_err()
            || slots.try_reserve_exact(nslabs as usize).is_err()
        {
            return Err(bad("no memory for the slot bookkeeping"));
        }
        free.resize(segs, u128::MAX);
        let tail = nslabs % IO_TLB_SEGSIZE;
        if tail != 0 {
            if let Some(last) = free.last_mut() {
                *last = bits(0, tail);
            }
        }
        slots.resize(nslabs as usize, FREE_SLOT);
        Ok(Swiotlb {
            base,
            nslabs,
            free,
            slots,
            next: 0,
            used: 0,
            allocated: 0,
            high_water: 0,
            failed: 0,
        })
    }

    /// First byte of the pool.
    pub fn base(&self) -> PhysAddr {
        self.base
    }

    /// Number of slots.
    pub fn nslabs(&self) -> u32 {
        self.nslabs
    }

    /// Pool size in bytes.
    pub fn size(&self) -> u64 {
        u64::from(self.nslabs) * IO_TLB_SIZE
    }

    /// Whether `phys` lies in the pool (Linux's `is_swiotlb_buffer`): how unmap and sync tell a
    /// bounced mapping from a direct one.
    pub fn contains(&self, phys: PhysAddr) -> bool {
        phys.0
            .checked_sub(self.base.0)
            .is_some_and(|off| off < self.size())
    }

    pub fn stats(&self) -> Stats {
        Stats {
            total: self.nslabs,
            used: self.used,
            allocated: self.allocated,
            high_water: self.high_water,
            failed: self.failed,
        }
    }

    /// Finds room for a bounced copy of `orig .. orig + size` for a device with
    /// `min_align_mask` (0 for none; otherwise 2^k - 1) and records the mapping. The placement
    /// rules are in the module documentation. Errors: [`SwiotlbError::ZeroSize`],
    /// [`SwiotlbError::BadAlignMask`], [`SwiotlbError::TooLarge`] (more than
    /// [`IO_TLB_SEGSIZE`] slots), and [`SwiotlbError::Full`] exactly when no allowed place is
    /// free.
    pub fn map(
        &mut self,
        orig: PhysAddr,
        size: u64,
        min_align_mask: u64,
    ) -> Result<BounceSlot, SwiotlbError> {
        if size == 0 {
            return Err(SwiotlbError::ZeroSize);
        }
        if min_align_mask & min_align_mask.wrapping_add(1) != 0 {
            return Err(SwiotlbError::BadAlignMask {
                mask: min_align_mask,
            });
        }
        let offset = orig.0 & min_align_mask & (IO_TLB_SIZE - 1);
        let too_large = SwiotlbError::TooLarge { size, offset };
        let needed = size.checked_add(offset).ok_or(too_large)?;
        if needed > MAX_MAPPING_SIZE {
            return Err(too_large);
        }
        // 1 ..= 128.
        let nslots = needed.div_ceil(IO_TLB_SIZE) as u32;

        // Alignment of the first slot's address: `align` bits must be 0 (slot alignment,
        // and page alignment for a page or more without a min_align_mask); the other bits
        // under min_align_mask must equal the original's. Both masks are runs of low bits, so
        // the allowed slot indices are `residue` modulo `period`.
        let align = if min_align_mask == 0 && needed >= PAGE_SIZE {
            PAGE_SIZE - 1
        } else {
            IO_TLB_SIZE - 1
        };
        let keep = min_align_mask & !align;
        let mask = align | keep;
        let target = orig.0 & keep;
        let period = (mask >> IO_TLB_SHIFT) + 1;
        let residue = (target.wrapping_sub(self.base.0) & mask) >> IO_TLB_SHIFT;
        let starts = Starts::new(period, residue);

        let slot = self.find_or_count(nslots, &starts)?;
        self.take(
            slot,
            nslots,
            SlotInfo {
                head: slot,
                // size <= MAX_MAPPING_SIZE and offset < IO_TLB_SIZE: both fit.
                size: size as u32,
                offset: offset as u16,
                alloc: false,
                orig: orig.0,
            },
        );
        Ok(BounceSlot {
            addr: PhysAddr(self.slot_addr(slot) + offset),
            nslots,
        })
    }

    /// Reserves `size` bytes of slots for the caller's own use, with no original buffer (Linux's
    /// `swiotlb_alloc`, for the coherent memory of a device with a restricted pool): the run
    /// starts at a physical address that is a multiple of `align` (a power of two; a slot, 2 KiB,
    /// whatever smaller value is given). The memory is handed over as it is (the caller zeroes
    /// it) and stays taken until [`Swiotlb::free`] with the same address and size. Errors:
    /// [`SwiotlbError::ZeroSize`], [`SwiotlbError::BadAlign`], [`SwiotlbError::TooLarge`] (more
    /// than [`MAX_MAPPING_SIZE`]: an allocation stays inside one segment, like a mapping), and
    /// [`SwiotlbError::Full`] exactly when no aligned run of free slots exists.
    pub fn alloc(&mut self, size: u64, align: u64) -> Result<BounceSlot, SwiotlbError> {
        if size == 0 {
            return Err(SwiotlbError::ZeroSize);
        }
        if !align.is_power_of_two() {
            return Err(SwiotlbError::BadAlign { align });
        }
        if size > MAX_MAPPING_SIZE {
            return Err(SwiotlbError::TooLarge { size, offset: 0 });
        }
        // 1 ..= 128.
        let nslots = size.div_ceil(IO_TLB_SIZE) as u32;
        let mask = align.max(IO_TLB_SIZE) - 1;
        // Slot `s` starts at a multiple of `align` iff `s` is `residue` modulo `period`.
        let residue = (self.base.0.wrapping_neg() & mask) >> IO_TLB_SHIFT;
        let starts = Starts::new((mask >> IO_TLB_SHIFT) + 1, residue);
        let slot = self.find_or_count(nslots, &starts)?;
        self.take(
            slot,
            nslots,
            SlotInfo {
                head: slot,
                size: size as u32,
                offset: 0,
                alloc: true,
                orig: 0,
            },
        );
        self.allocated += nslots;
        Ok(BounceSlot {
            addr: PhysAddr(self.slot_addr(slot)),
            nslots,
        })
    }

    /// Releases the allocation that [`Swiotlb::alloc`] returned at `addr` for `size` bytes.
    /// Anything but an exact match with a live allocation (a mapping, a double free, another
    /// size) is an error and changes nothing.
    pub fn free(&mut self, addr: PhysAddr, size: u64) -> Result<(), SwiotlbError> {
        let slot = match self.run_at(addr)? {
            Some((slot, head)) if head.alloc => slot,
            _ => return Err(SwiotlbError::NotAllocated { addr }),
        };
        self.release(addr, slot, size)?;
        Ok(())
    }

    /// Releases the mapping that [`Swiotlb::map`] returned at `addr` for `size` bytes, returning
    /// the original address (for the caller's final copy-back, which it does before calling
    /// this). Anything but an exact match with a live mapping is an error and changes nothing.
    pub fn unmap(&mut self, addr: PhysAddr, size: u64) -> Result<PhysAddr, SwiotlbError> {
        let slot = self.mapping_at(addr)?;
        self.release(addr, slot, size).map(|head| PhysAddr(head.orig))
    }

    /// The original address and size of the live mapping that starts at `addr` (the address
    /// `map` returned), if there is one.
    pub fn orig(&self, addr: PhysAddr) -> Option<(PhysAddr, u64)> {
        let slot = self.mapping_at(addr).ok()?;
        let h = self.slots.get(slot as usize)?;
        Some((PhysAddr(h.orig), u64::from(h.size)))
    }

    /// The free run [`Swiotlb::find`] gives, or [`SwiotlbError::Full`] counted in the stats.
    fn find_or_count(&mut self, nslots: u32, starts: &Starts) -> Result<u32, SwiotlbError> {
        self.find(nslots, starts).ok_or_else(|| {
            self.failed += 1;
            SwiotlbError::Full {
                nslots,
                used: self.used,
                total: self.nslabs,
            }
        })
    }

    /// Marks the free run `slot .. slot + nslots` (inside one segment) taken, with `head` in its
    /// first slot.
    fn take(&mut self, slot: u32, nslots: u32, head: SlotInfo) {
        if let Some(f) = self.free.get_mut((slot / IO_TLB_SEGSIZE) as usize) {
            *f &= !bits(slot % IO_TLB_SEGSIZE, nslots);
        }
        let range = slot as usize..(slot + nslots) as usize;
        for s in self.slots.get_mut(range).unwrap_or_default() {
            s.head = slot;
        }
        if let Some(h) = self.slots.get_mut(slot as usize) {
            *h = head;
        }
        self.used += nslots;
        self.high_water = self.high_water.max(self.used);
        self.next = (slot + nslots) % self.nslabs;
    }

    /// Frees the live run whose first slot is `slot` (found at `addr`) if `size` is its size;
    /// returns its head record.
    fn release(&mut self, addr: PhysAddr, slot: u32, size: u64) -> Result<SlotInfo, SwiotlbError> {
        let head = self.slots.get(slot as usize).copied().unwrap_or(FREE_SLOT);
        if u64::from(head.size) != size {
            return Err(SwiotlbError::WrongSize {
                addr,
                size,
                mapped: u64::from(head.size),
            });
        }
        let nslots = (u64::from(head.offset) + size).div_ceil(IO_TLB_SIZE) as u32;
        let range = slot as usize..(slot + nslots) as usize;
        for s in self.slots.get_mut(range).unwrap_or_default() {
            *s = FREE_SLOT;
        }
        if let Some(f) = self.free.get_mut((slot / IO_TLB_SEGSIZE) as usize) {
            *f |= bits(slot % IO_TLB_SEGSIZE, nslots);
        }
        self.used -= nslots;
        if head.alloc {
            self.allocated -= nslots;
        }
        Ok(head)
    }

    /// For a partial sync: the original address of the bounced bytes `addr .. addr + len`, if they
    /// lie entirely inside one live mapping (for `len == 0`, if `addr` does).
    pub fn orig_of(&self, addr: PhysAddr, len: u64) -> Option<PhysAddr> {
        let idx = addr.0.checked_sub(self.base.0)? >> IO_TLB_SHIFT;
        let head = self.slots.get(usize::try_from(idx).ok()?)?.head;
        let h = self.slots.get(head as usize).filter(|h| !h.alloc)?;
        let start = self.slot_addr(head) + u64::from(h.offset);
        let off = addr.0.checked_sub(start)?;
        let size = u64::from(h.size);
        (off < size && len <= size - off).then_some(PhysAddr(h.orig + off))
    }

    fn slot_addr(&self, slot: u32) -> u64 {
        // In range: `new` checked that the whole pool fits below 2^64.
        self.base.0 + (u64::from(slot) << IO_TLB_SHIFT)
    }

    /// The first slot of the live mapping that `map` returned as `addr`.
    fn mapping_at(&self, addr: PhysAddr) -> Result<u32, SwiotlbError> {
        match self.run_at(addr)? {
            Some((slot, head)) if !head.alloc => Ok(slot),
            Some(_) => Err(SwiotlbError::IsAllocation { addr }),
            None => Err(SwiotlbError::NotMapped { addr }),
        }
    }

    /// The first slot and head record of the live run (mapping or allocation) whose address, as
    /// `map` or `alloc` returned it, is `addr`; `None` if no run starts there.
    fn run_at(&self, addr: PhysAddr) -> Result<Option<(u32, SlotInfo)>, SwiotlbError> {
        if !self.contains(addr) {
            return Err(SwiotlbError::OutsidePool { addr });
        }
        let rel = addr.0 - self.base.0;
        // `contains` bounds rel by nslabs * IO_TLB_SIZE, so the index fits a u32.
        let slot = (rel >> IO_TLB_SHIFT) as u32;
        Ok(self
            .slots
            .get(slot as usize)
            .filter(|s| s.head == slot && u64::from(s.offset) == rel & (IO_TLB_SIZE - 1))
            .map(|s| (slot, *s)))
    }

    /// The first slot of a free run of `nslots` (1 ..= 128) inside one segment starting at an
    /// allowed position, searching from `self.next` and wrapping around once.
    fn find(&self, nslots: u32, starts: &Starts) -> Option<u32> {
        let segs = self.free.len();
        let seg_slots = IO_TLB_SEGSIZE as usize;
        let first_seg = self.next as usize / seg_slots;
        let first_pos = self.next % IO_TLB_SEGSIZE;
        // Segment `first_seg` is visited twice: from `first_pos` up first, below it last.
        for step in 0..=segs {
            let seg = (first_seg + step) % segs;
            let window = if step == 0 {
                u128::MAX << first_pos
            } else if step == segs {
                !(u128::MAX << first_pos)
            } else {
                u128::MAX
            };
            let free = self.free.get(seg).copied().unwrap_or(0);
            let cand = runs_of(free, nslots) & starts.in_segment(seg as u64) & window;
            if cand != 0 {
                return Some((seg * seg_slots) as u32 + cand.trailing_zeros());
            }
        }
        None
    }
}

impl fmt::Debug for Swiotlb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Swiotlb")
            .field("base", &self.base)
            .field("nslabs", &self.nslabs)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BASE: u64 = 0x4000_0000;

    fn pool(nslabs: u32) -> Swiotlb {
        Swiotlb::new(PhysAddr(BASE), nslabs).unwrap()
    }

    fn map(p: &mut Swiotlb, orig: u64, size: u64, mask: u64) -> Result<(u64, u32), SwiotlbError> {
        p.map(PhysAddr(orig), size, mask)
            .map(|b| (b.addr.0, b.nslots))
    }

    #[test]
    fn pool_checks() {
        let e = Swiotlb::new(PhysAddr(BASE), 0).unwrap_err();
        assert_eq!(
            format!("{e}"),
            "swiotlb pool at 0x40000000 of 0 slots: a pool needs at least one slot"
        );
        assert!(matches!(
            Swiotlb::new(PhysAddr(BASE + 0x800), 16),
            Err(SwiotlbError::BadPool {
                what: "the base is not page-aligned",
                ..
            })
        ));
        assert!(matches!(
            Swiotlb::new(PhysAddr(u64::MAX - 0xfff), 2),
            Err(SwiotlbError::BadPool { .. })
        ));
        let p = pool(300);
        assert_eq!(
            (p.base(), p.nslabs(), p.size()),
            (PhysAddr(BASE), 300, 300 * 2048)
        );
        assert!(p.contains(PhysAddr(BASE)) && p.contains(PhysAddr(BASE + 300 * 2048 - 1)));
        assert!(!p.contains(PhysAddr(BASE - 1)) && !p.contains(PhysAddr(BASE + 300 * 2048)));
        assert_eq!(
            p.stats(),
            Stats {
                total: 300,
                used: 0,
                allocated: 0,
                high_water: 0,
                failed: 0
            }
        );
        assert!(format!("{p:?}").starts_with("Swiotlb { base: PA(0x40000000), nslabs: 300"));
        // The bookkeeping cost `new` documents.
        assert_eq!(core::mem::size_of::<SlotInfo>(), 24);
    }

    #[test]
    fn next_fit_and_page_alignment() {
        let mut p = pool(256);
        // Small mappings take the next slot; the original's offset is not kept without a mask.
        assert_eq!(map(&mut p, 0x8000_1234, 100, 0), Ok((BASE, 1)));
        // Exactly a page starts page-aligned: slot 1 is not, slot 2 (0x1000) is.
        assert_eq!(map(&mut p, 0x9000_0010, 4096, 0), Ok((BASE + 0x1000, 2)));
        // Next-fit: slot 1 is free, but the search goes on from slot 4.
        assert_eq!(map(&mut p, 0x8000_1234, 2048, 0), Ok((BASE + 0x2000, 1)));
        // One byte less than a page: any slot.
        assert_eq!(map(&mut p, 0x9000_0010, 4095, 0), Ok((BASE + 0x2800, 2)));
        // Next is slot 7 (0x3800): not page-aligned, so slot 8.
        assert_eq!(map(&mut p, 0x9100_0000, 5000, 0), Ok((BASE + 0x4000, 3)));
        // Slot 7, skipped above, stays free: the search goes on from slot 11.
        assert_eq!(map(&mut p, 0x9200_0000, 2000, 0), Ok((BASE + 0x5800, 1)));
        let s = p.stats();
        assert_eq!((s.used, s.high_water, s.failed), (10, 10, 0));
        // Only segment 1 has 128 free slots; the next search wraps around to the holes at
        // slots 1 and 7.
        assert_eq!(
            map(&mut p, 0x9200_0000, 128 * 2048, 0),
            Ok((BASE + 128 * 2048, 128))
        );
        assert_eq!(map(&mut p, 0x9300_0000, 1, 0), Ok((BASE + 0x800, 1)));
        assert_eq!(map(&mut p, 0x9300_0000, 1, 0), Ok((BASE + 0x3800, 1)));
        assert_eq!(
            p.unmap(PhysAddr(BASE + 0x800), 1),
            Ok(PhysAddr(0x9300_0000))
        );
        assert_eq!(
            p.unmap(PhysAddr(BASE + 0x3800), 1),
            Ok(PhysAddr(0x9300_0000))
        );
        assert_eq!(
            p.unmap(PhysAddr(BASE + 128 * 2048), 128 * 2048),
            Ok(PhysAddr(0x9200_0000))
        );
        assert_eq!(
            p.orig(PhysAddr(BASE + 0x1000)),
            Some((PhysAddr(0x9000_0010), 4096))
        );
        assert_eq!(p.orig(PhysAddr(BASE + 0x1800)), None, "inside a mapping");
        assert_eq!(
            p.orig_of(PhysAddr(BASE + 0x1800), 0x800),
            Some(PhysAddr(0x9000_0810))
        );
        assert_eq!(p.orig_of(PhysAddr(BASE + 0x1800), 0x801), None);
        assert_eq!(p.orig_of(PhysAddr(BASE + 0x800), 1), None, "free slot");
        assert_eq!(
            p.orig_of(PhysAddr(BASE + 10), 90),
            Some(PhysAddr(0x8000_123e))
        );
        assert_eq!(p.orig_of(PhysAddr(BASE + 10), 91), None);
        assert_eq!(p.orig_of(PhysAddr(BASE - 1), 1), None);
    }

    #[test]
    fn min_align_mask_keeps_the_low_bits() {
        let mut p = pool(256);
        // NVMe-style 4 KiB - 1: 0x...a34 has bit 11 set, so the bounce starts in an odd slot
        // at offset 0x234.
        let (addr, n) = map(&mut p, 0x1234_5a34, 0x300, 0xfff).unwrap();
        assert_eq!((addr, n), (BASE + 0xa34, 1));
        // Bit 11 clear: an even slot; slot 2 is next.
        let (addr, n) = map(&mut p, 0x1234_5634, 0x1000, 0xfff).unwrap();
        assert_eq!((addr, n), (BASE + 0x1634, 3));
        // 64 KiB - 1: bits 11..15 of 0x...d_e10 pick slot 27 of a 32-slot period.
        let (addr, _) = map(&mut p, 0x7777_de10, 0x80, 0xffff).unwrap();
        assert_eq!(addr, BASE + 0xde10);
        // A mask within one slot only shifts the start.
        let (addr, _) = map(&mut p, 0x5555_5123, 0x10, 0x3ff).unwrap();
        assert_eq!(addr & 0x7ff, 0x123);
        // With a mask, a page-sized mapping is not forced to a page boundary: the mask decides.
        let (addr, _) = map(&mut p, 0x6000_0800, 0x2000, 0x7ff).unwrap();
        assert_eq!(addr & 0xfff, 0x800);
        // Not a run of low bits.
        assert_eq!(
            map(&mut p, 0, 16, 0x1000),
            Err(SwiotlbError::BadAlignMask { mask: 0x1000 })
        );
        assert_eq!(
            p.stats().failed,
            0,
            "invalid requests are not counted as failures"
        );
    }

    #[test]
    fn segments_are_never_crossed() {
        let mut p = pool(256);
        assert_eq!(map(&mut p, 0, 100 * 2048, 0), Ok((BASE, 100)));
        // 28 slots left in segment 0: 100 more go to segment 1.
        assert_eq!(map(&mut p, 0, 100 * 2048, 0), Ok((BASE + 128 * 2048, 100)));
        assert_eq!(map(&mut p, 0, 28 * 2048, 0), Ok((BASE + 228 * 2048, 28)));
        // 28 + 28 free slots, split across the boundary: 29 do not fit anywhere.
        let e = map(&mut p, 0, 29 * 2048, 0).unwrap_err();
        assert_eq!(
            e,
            SwiotlbError::Full {
                nslots: 29,
                used: 228,
                total: 256
            }
        );
        assert_eq!(
            format!("{e}"),
            "swiotlb full: no run of 29 free slots (228 of 256 slots in use)"
        );
        assert_eq!(p.stats().failed, 1);
        // The search wraps around to segment 0.
        assert_eq!(map(&mut p, 0, 28 * 2048, 0), Ok((BASE + 100 * 2048, 28)));
        assert_eq!(
            map(&mut p, 0, 1, 0).unwrap_err(),
            SwiotlbError::Full {
                nslots: 1,
                used: 256,
                total: 256
            }
        );
        assert_eq!(
            p.stats(),
            Stats {
                total: 256,
                used: 256,
                allocated: 0,
                high_water: 256,
                failed: 2
            }
        );
    }

    #[test]
    fn partial_last_segment() {
        let mut p = pool(130);
        assert_eq!(map(&mut p, 0, 128 * 2048, 0), Ok((BASE, 128)));
        assert!(matches!(
            map(&mut p, 0, 3 * 2048, 0),
            Err(SwiotlbError::Full { .. })
        ));
        assert_eq!(map(&mut p, 0, 2 * 2048, 0), Ok((BASE + 128 * 2048, 2)));
        assert!(matches!(
            map(&mut p, 0, 1, 0),
            Err(SwiotlbError::Full { .. })
        ));
        // A pool smaller than one segment.
        let mut p = pool(3);
        assert_eq!(
            map(&mut p, 0, 4 * 2048, 0),
            Err(SwiotlbError::Full {
                nslots: 4,
                used: 0,
                total: 3
            })
        );
        assert_eq!(map(&mut p, 0, 3 * 2048, 0), Ok((BASE, 3)));
    }

    #[test]
    fn size_limits() {
        let mut p = pool(256);
        assert_eq!(map(&mut p, 0, 0, 0), Err(SwiotlbError::ZeroSize));
        let e = map(&mut p, 0, MAX_MAPPING_SIZE + 1, 0).unwrap_err();
        assert_eq!(
            e,
            SwiotlbError::TooLarge {
                size: MAX_MAPPING_SIZE + 1,
                offset: 0
            }
        );
        assert_eq!(
            format!("{e}"),
            "swiotlb: mapping of 0x40001 bytes at slot offset 0x0 exceeds the 0x40000-byte limit of one bounce buffer"
        );
        // The offset into the first slot counts.
        assert_eq!(
            map(&mut p, 0x7ff, MAX_MAPPING_SIZE, 0x7ff),
            Err(SwiotlbError::TooLarge {
                size: MAX_MAPPING_SIZE,
                offset: 0x7ff
            })
        );
        assert_eq!(
            map(&mut p, 0, u64::MAX, 0x7ff).unwrap_err(),
            SwiotlbError::TooLarge {
                size: u64::MAX,
                offset: 0
            }
        );
        assert_eq!(
            map(&mut p, 0x7ff, u64::MAX, 0x7ff).unwrap_err(),
            SwiotlbError::TooLarge {
                size: u64::MAX,
                offset: 0x7ff
            }
        );
        assert_eq!(map(&mut p, 0, MAX_MAPPING_SIZE, 0), Ok((BASE, 128)));
        assert_eq!(p.stats().failed, 0);
    }

    #[test]
    fn max_mapping_size_always_fits() {
        assert_eq!(max_mapping_size(0), 0x40000);
        assert_eq!(max_mapping_size(0x7ff), 0x40000 - 0x800);
        assert_eq!(max_mapping_size(0xfff), 0x40000 - 0x1000);
        assert_eq!(max_mapping_size(0xffff), 0x40000 - 0x10000);
        assert_eq!(max_mapping_size(0x3ffff), 0);
        assert_eq!(max_mapping_size(u64::MAX), 0);
        // Whatever the original's bits under the mask, the largest size fits an empty pool.
        for mask in [0x7ffu64, 0xfff, 0x1fff, 0xffff, 0x1_ffff] {
            let size = max_mapping_size(mask);
            for orig in (0..=mask).step_by(0x7ff) {
                let mut p = pool(128);
                let got = p.map(PhysAddr(orig), size, mask);
                let b = got.unwrap_or_else(|e| panic!("mask {mask:#x} orig {orig:#x}: {e}"));
                assert_eq!(b.addr.0 & mask, orig & mask);
            }
        }
    }

    #[test]
    fn bad_unmaps_change_nothing() {
        let mut p = pool(256);
        let (a, _) = map(&mut p, 0x8000_0000, 0x1800, 0).unwrap();
        let (b, _) = map(&mut p, 0x8100_0123, 0x100, 0xfff).unwrap();
        let before = p.stats();
        let e = p.unmap(PhysAddr(BASE - 0x800), 0x100).unwrap_err();
        assert_eq!(
            e,
            SwiotlbError::OutsidePool {
                addr: PhysAddr(BASE - 0x800)
            }
        );
        assert_eq!(
            format!("{e}"),
            "swiotlb: unmap of 0x3ffff800, which is outside the bounce pool"
        );
        assert!(matches!(
            p.unmap(PhysAddr(BASE + 256 * 2048), 1),
            Err(SwiotlbError::OutsidePool { .. })
        ));
        // Inside mapping `a`, at a free slot, and at `b`'s slot without its offset.
        assert_eq!(
            p.unmap(PhysAddr(a + 0x800), 0x1000),
            Err(SwiotlbError::NotMapped {
                addr: PhysAddr(a + 0x800)
            })
        );
        assert!(matches!(
            p.unmap(PhysAddr(BASE + 100 * 2048), 1),
            Err(SwiotlbError::NotMapped { .. })
        ));
        assert!(matches!(
            p.unmap(PhysAddr(b & !0x7ff), 0x100),
            Err(SwiotlbError::NotMapped { .. })
        ));
        let e = p.unmap(PhysAddr(a), 0x1000).unwrap_err();
        assert_eq!(
            e,
            SwiotlbError::WrongSize {
                addr: PhysAddr(a),
                size: 0x1000,
                mapped: 0x1800
            }
        );
        assert_eq!(
            format!("{e}"),
            "swiotlb: release of 0x40000000 with size 0x1000, but 0x1800 bytes were taken"
        );
        assert_eq!(p.stats(), before);
        assert_eq!(p.orig(PhysAddr(a)), Some((PhysAddr(0x8000_0000), 0x1800)));
        // The real unmaps still work, once.
        assert_eq!(p.unmap(PhysAddr(a), 0x1800), Ok(PhysAddr(0x8000_0000)));
        let e = p.unmap(PhysAddr(a), 0x1800).unwrap_err();
        assert_eq!(e, SwiotlbError::NotMapped { addr: PhysAddr(a) });
        assert!(format!("{e}").contains("double unmap?"));
        assert_eq!(p.unmap(PhysAddr(b), 0x100), Ok(PhysAddr(0x8100_0123)));
        assert_eq!(
            p.stats(),
            Stats {
                total: 256,
                used: 0,
                allocated: 0,
                high_water: 4,
                failed: 0
            }
        );
        assert_eq!(p.orig(PhysAddr(a)), None);
    }

    #[test]
    fn allocations() {
        let mut p = pool(256);
        // Aligned as asked (at least a slot), taken in slots, found next-fit like mappings.
        let a = p.alloc(4096, 4096).unwrap();
        assert_eq!(a, BounceSlot { addr: PhysAddr(BASE), nslots: 2 });
        let b = p.alloc(100, 0x4000).unwrap();
        assert_eq!(b, BounceSlot { addr: PhysAddr(BASE + 0x4000), nslots: 1 });
        let c = p.alloc(3000, 1).unwrap();
        assert_eq!(c, BounceSlot { addr: PhysAddr(BASE + 9 * 2048), nslots: 2 });
        let (m, _) = map(&mut p, 0x8000_0000, 100, 0).unwrap();
        assert_eq!(m, BASE + 11 * 2048);
        assert_eq!(
            p.stats(),
            Stats {
                total: 256,
                used: 6,
                allocated: 5,
                high_water: 6,
                failed: 0
            }
        );
        // No original: invisible to unmap and sync.
        assert_eq!(p.orig(a.addr), None);
        assert_eq!(p.orig_of(PhysAddr(BASE + 100), 1), None);
        let e = p.unmap(a.addr, 4096).unwrap_err();
        assert_eq!(e, SwiotlbError::IsAllocation { addr: a.addr });
        assert_eq!(
            format!("{e}"),
            "swiotlb: unmap of 0x40000000, which is a coherent allocation, not a bounce mapping"
        );
        // Freeing a mapping, the inside of an allocation, another size: refused.
        let e = p.free(PhysAddr(m), 100).unwrap_err();
        assert_eq!(e, SwiotlbError::NotAllocated { addr: PhysAddr(m) });
        assert_eq!(
            format!("{e}"),
            "swiotlb: free of 0x40005800, which does not start a live allocation (double free?)"
        );
        assert_eq!(
            p.free(PhysAddr(BASE + 2048), 2048),
            Err(SwiotlbError::NotAllocated { addr: PhysAddr(BASE + 2048) })
        );
        assert_eq!(
            p.free(a.addr, 4095),
            Err(SwiotlbError::WrongSize { addr: a.addr, size: 4095, mapped: 4096 })
        );
        assert!(matches!(p.free(PhysAddr(BASE - 4096), 4096), Err(SwiotlbError::OutsidePool { .. })));
        assert_eq!(p.stats().used, 6);
        // The real frees work, once.
        assert_eq!(p.free(a.addr, 4096), Ok(()));
        assert_eq!(p.free(a.addr, 4096), Err(SwiotlbError::NotAllocated { addr: a.addr }));
        assert_eq!(p.free(b.addr, 100), Ok(()));
        assert_eq!(p.free(c.addr, 3000), Ok(()));
        assert_eq!(p.unmap(PhysAddr(m), 100), Ok(PhysAddr(0x8000_0000)));
        assert_eq!((p.stats().used, p.stats().allocated), (0, 0));
        // Bad requests.
        assert_eq!(p.alloc(0, 4096), Err(SwiotlbError::ZeroSize));
        let e = p.alloc(1, 0x3000).unwrap_err();
        assert_eq!(e, SwiotlbError::BadAlign { align: 0x3000 });
        assert_eq!(format!("{e}"), "swiotlb: allocation alignment 0x3000 is not a power of two");
        assert_eq!(p.alloc(1, 0), Err(SwiotlbError::BadAlign { align: 0 }));
        assert_eq!(
            p.alloc(MAX_MAPPING_SIZE + 1, 4096),
            Err(SwiotlbError::TooLarge { size: MAX_MAPPING_SIZE + 1, offset: 0 })
        );
        // An alignment the pool has no address for.
        assert!(matches!(p.alloc(1, 1 << 40), Err(SwiotlbError::Full { .. })));
        assert_eq!(p.stats().failed, 1);
    }

    #[test]
    fn allocation_alignment_is_physical() {
        // A pool starting at an odd page: the first 8 KiB-aligned slot is its third.
        let mut p = Swiotlb::new(PhysAddr(BASE + 0x1000), 128).unwrap();
        assert_eq!(p.alloc(4096, 0x2000).unwrap().addr, PhysAddr(BASE + 0x2000));
        assert_eq!(p.alloc(2048, 0x1000).unwrap().addr, PhysAddr(BASE + 0x3000));
        assert_eq!(p.alloc(1, 0x10000).unwrap().addr, PhysAddr(BASE + 0x10000));
    }

    #[test]
    fn allocations_exhaust_and_come_back() {
        let mut p = pool(128);
        let mut live = Vec::new();
        let err = loop {
            match p.alloc(4096, 4096) {
                Ok(b) => live.push(b.addr),
                Err(e) => break e,
            }
            assert!(live.len() <= 64, "more allocations than the pool holds");
        };
        assert_eq!(live.len(), 64);
        assert_eq!(err, SwiotlbError::Full { nslots: 2, used: 128, total: 128 });
        // Mappings find no room either.
        assert!(matches!(map(&mut p, 0, 1, 0), Err(SwiotlbError::Full { .. })));
        for a in live {
            p.free(a, 4096).unwrap();
        }
        assert_eq!((p.stats().used, p.stats().allocated, p.stats().failed), (0, 0, 2));
        // The whole segment is one free run again.
        assert_eq!(p.alloc(MAX_MAPPING_SIZE, MAX_MAPPING_SIZE).unwrap().addr, PhysAddr(BASE));
    }

    #[test]
    fn start_patterns() {
        // Positions allowed in a segment for each period, against a direct computation.
        for period in [1u64, 2, 4, 8, 16, 32, 64, 128, 256, 1 << 20, 1 << 53] {
            for residue in [0, 1, period / 2, period - 1] {
                let s = Starts::new(period, residue.min(period - 1));
                for seg in [0u64, 1, 2, 7, 1000] {
                    let got = s.in_segment(seg);
                    for pos in 0..128u64 {
                        let slot = seg * 128 + pos;
                        let want = slot % period == residue.min(period - 1);
                        assert_eq!(
                            got >> pos & 1 == 1,
                            want,
                            "period {period} residue {residue} seg {seg} pos {pos}"
                        );
                    }
                }
            }
        }
        // Runs: bit p iff p .. p + n all set, never past bit 127.
        let free: u128 = 0b1111_0111 | (0xff << 120);
        assert_eq!(runs_of(free, 1), free);
        assert_eq!(runs_of(free, 3), 0b11_0001 | (0x3f << 120));
        assert_eq!(runs_of(free, 4), 0b1_0000 | (0x1f << 120));
        assert_eq!(runs_of(free, 8), 1 << 120);
        assert_eq!(runs_of(free, 9), 0);
        assert_eq!(runs_of(u128::MAX, 128), 1);
        assert_eq!(bits(0, 128), u128::MAX);
        assert_eq!(bits(126, 2), 3 << 126);
    }

    /// One step of the model test.
    #[derive(Clone, Debug)]
    enum Op {
        Map { orig: u64, size: u64, mask: u64 },
        Alloc { size: u64, align: u64 },
        /// Unmaps or frees a live run, whichever it is.
        Release(prop::sample::Index),
        BadRelease(prop::sample::Index, u8),
        Sync(prop::sample::Index, u64, u64),
    }

    fn size() -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => 1u64..=2048,
            1 => prop::sample::select(vec![2047u64, 2048, 2049, 4095, 4096, 4097]),
            3 => 1u64..=20_000,
            1 => 1u64..=MAX_MAPPING_SIZE + 4096,
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let mask = prop_oneof![
            4 => Just(0u64),
            1 => Just(0x7ff),
            1 => Just(0xfff),
            1 => Just(0x1fff),
            1 => Just(0xffff),
            1 => Just(0x7_ffff),
            1 => Just(0x1000),
        ];
        let align = prop::sample::select(vec![0u64, 1, 3, 0x800, 0x1000, 0x1000, 0x4000, 0x1_0000, 0x10_0000, 1 << 63]);
        prop_oneof![
            6 => (0u64..1 << 40, size(), mask).prop_map(|(orig, size, mask)| Op::Map { orig, size, mask }),
            3 => (size(), align).prop_map(|(size, align)| Op::Alloc { size, align }),
            5 => any::<prop::sample::Index>().prop_map(Op::Release),
            1 => (any::<prop::sample::Index>(), 0u8..4).prop_map(|(i, k)| Op::BadRelease(i, k)),
            1 => (any::<prop::sample::Index>(), 0u64..0x2000, 0u64..0x2000).prop_map(|(i, o, l)| Op::Sync(i, o, l)),
        ]
    }

    /// A live mapping or allocation in the model.
    #[derive(Clone, Copy, Debug)]
    struct Live {
        addr: u64,
        size: u64,
        orig: u64,
        slot: u64,
        nslots: u64,
        alloc: bool,
    }

    /// Whether the run `slot .. slot + n` stays in one segment and inside the pool, all free.
    fn run_free(used: &[bool], slot: u64, n: u64) -> bool {
        slot + n <= used.len() as u64
            && slot / 128 == (slot + n - 1) / 128
            && (slot..slot + n).all(|s| !used[s as usize])
    }

    /// Whether a mapping may start at `slot`, stated as in Linux's search: the slot address
    /// has the alignment bits clear and the other mask bits of the original; the run is free.
    fn fits_at(
        used: &[bool],
        base: u64,
        slot: u64,
        n: u64,
        orig: u64,
        size: u64,
        mask: u64,
    ) -> bool {
        let addr = base + slot * 2048;
        let align = if mask == 0 && size >= 4096 {
            0xfff
        } else {
            0x7ff
        };
        let keep = mask & !align;
        addr & align == 0 && addr & keep == orig & keep && run_free(used, slot, n)
    }

    /// Whether an allocation aligned to `align` may start at `slot`.
    fn alloc_fits_at(used: &[bool], base: u64, slot: u64, n: u64, align: u64) -> bool {
        (base + slot * 2048) % align.max(2048) == 0 && run_free(used, slot, n)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

        /// Random map/unmap/alloc/free sequences against a slot-by-slot model: results obey the
        /// placement rules and never overlap; `Full` comes exactly when the model finds no
        /// place; bad unmaps and frees (including an unmap of an allocation and a free of a
        /// mapping) change nothing; allocations are invisible to `orig` and `orig_of`;
        /// everything returns to the baseline.
        #[test]
        fn matches_the_model(
            base_page in 0u64..1 << 28,
            nslabs in 1u32..400,
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            let base = base_page * 4096;
            let mut p = Swiotlb::new(PhysAddr(base), nslabs).unwrap();
            let mut used = vec![false; nslabs as usize];
            let mut live: Vec<Live> = Vec::new();
            let mut dead: Vec<u64> = Vec::new();
            let (mut high, mut failed) = (0u64, 0u64);
            for op in ops {
                match op {
                    Op::Map { orig, size, mask } => {
                        let offset = orig & mask & 0x7ff;
                        let got = p.map(PhysAddr(orig), size, mask);
                        if mask & (mask + 1) != 0 {
                            prop_assert_eq!(got, Err(SwiotlbError::BadAlignMask { mask }));
                            continue;
                        }
                        if size + offset > MAX_MAPPING_SIZE {
                            prop_assert_eq!(got, Err(SwiotlbError::TooLarge { size, offset }));
                            continue;
                        }
                        let n = (size + offset).div_ceil(2048);
                        match got {
                            Ok(b) => {
                                let rel = b.addr.0 - base;
                                prop_assert_eq!(rel % 2048, offset);
                                let slot = rel / 2048;
                                prop_assert_eq!(u64::from(b.nslots), n);
                                prop_assert!(fits_at(&used, base, slot, n, orig, size, mask), "bad place {:?}", b);
                                prop_assert_eq!(b.addr.0 & mask, orig & mask);
                                if mask == 0 && size >= 4096 {
                                    prop_assert_eq!(b.addr.0 % 4096, 0);
                                }
                                for s in slot..slot + n {
                                    used[s as usize] = true;
                                }
                                live.push(Live { addr: b.addr.0, size, orig, slot, nslots: n, alloc: false });
                                prop_assert_eq!(p.orig(b.addr), Some((PhysAddr(orig), size)));
                            }
                            Err(e) => {
                                prop_assert_eq!(e, SwiotlbError::Full {
                                    nslots: n as u32,
                                    used: used.iter().filter(|&&u| u).count() as u32,
                                    total: nslabs,
                                });
                                let any = (0..nslabs as u64).any(|s| fits_at(&used, base, s, n, orig, size, mask));
                                prop_assert!(!any, "Full although a place exists");
                                failed += 1;
                            }
                        }
                    }
                    Op::Alloc { size, align } => {
                        let got = p.alloc(size, align);
                        if !align.is_power_of_two() {
                            prop_assert_eq!(got, Err(SwiotlbError::BadAlign { align }));
                            continue;
                        }
                        if size > MAX_MAPPING_SIZE {
                            prop_assert_eq!(got, Err(SwiotlbError::TooLarge { size, offset: 0 }));
                            continue;
                        }
                        let n = size.div_ceil(2048);
                        match got {
                            Ok(b) => {
                                let rel = b.addr.0 - base;
                                let slot = rel / 2048;
                                prop_assert_eq!(rel % 2048, 0);
                                prop_assert_eq!(u64::from(b.nslots), n);
                                prop_assert_eq!(b.addr.0 % align, 0);
                                prop_assert!(alloc_fits_at(&used, base, slot, n, align), "bad place {:?}", b);
                                for s in slot..slot + n {
                                    used[s as usize] = true;
                                }
                                live.push(Live { addr: b.addr.0, size, orig: 0, slot, nslots: n, alloc: true });
                                prop_assert_eq!(p.orig(b.addr), None);
                                prop_assert_eq!(p.orig_of(b.addr, 1), None);
                            }
                            Err(e) => {
                                prop_assert_eq!(e, SwiotlbError::Full {
                                    nslots: n as u32,
                                    used: used.iter().filter(|&&u| u).count() as u32,
                                    total: nslabs,
                                });
                                let any = (0..nslabs as u64).any(|s| alloc_fits_at(&used, base, s, n, align));
                                prop_assert!(!any, "Full although a place exists");
                                failed += 1;
                            }
                        }
                    }
                    Op::Release(i) if !live.is_empty() => {
                        let m = live.swap_remove(i.index(live.len()));
                        if m.alloc {
                            prop_assert_eq!(p.free(PhysAddr(m.addr), m.size), Ok(()));
                        } else {
                            prop_assert_eq!(p.unmap(PhysAddr(m.addr), m.size), Ok(PhysAddr(m.orig)));
                        }
                        for s in m.slot..m.slot + m.nslots {
                            used[s as usize] = false;
                        }
                        dead.push(m.addr);
                    }
                    Op::BadRelease(i, kind) => {
                        let before = p.stats();
                        match (kind, live.is_empty(), dead.is_empty()) {
                            (0, false, _) => {
                                let m = live[i.index(live.len())];
                                let r = if m.alloc {
                                    p.free(PhysAddr(m.addr), m.size + 1)
                                } else {
                                    p.unmap(PhysAddr(m.addr), m.size + 1).map(|_| ())
                                };
                                prop_assert!(matches!(r, Err(SwiotlbError::WrongSize { .. })), "{:?}", r);
                            }
                            (1, false, _) => {
                                let m = live[i.index(live.len())];
                                prop_assert!(p.unmap(PhysAddr(m.addr + 1), m.size).is_err());
                                prop_assert!(p.free(PhysAddr(m.addr + 1), m.size).is_err());
                            }
                            (2, false, _) => {
                                // The other kind's release of a live run.
                                let m = live[i.index(live.len())];
                                let a = PhysAddr(m.addr);
                                if m.alloc {
                                    prop_assert_eq!(p.unmap(a, m.size), Err(SwiotlbError::IsAllocation { addr: a }));
                                } else {
                                    prop_assert_eq!(p.free(a, m.size), Err(SwiotlbError::NotAllocated { addr: a }));
                                }
                            }
                            (_, _, false) => {
                                let a = dead[i.index(dead.len())];
                                if !live.iter().any(|m| m.addr == a) {
                                    prop_assert_eq!(p.unmap(PhysAddr(a), 1), Err(SwiotlbError::NotMapped { addr: PhysAddr(a) }));
                                    prop_assert_eq!(p.free(PhysAddr(a), 1), Err(SwiotlbError::NotAllocated { addr: PhysAddr(a) }));
                                }
                            }
                            _ => {}
                        }
                        prop_assert_eq!(p.stats(), before);
                    }
                    Op::Sync(i, off, len) if !live.is_empty() => {
                        // Past its own run, the address may fall into another one; only mappings
                        // have an original.
                        let a = live[i.index(live.len())].addr + off;
                        let want = live
                            .iter()
                            .find(|l| !l.alloc && l.addr <= a && a < l.addr + l.size && a + len <= l.addr + l.size)
                            .map(|l| PhysAddr(l.orig + (a - l.addr)));
                        prop_assert_eq!(p.orig_of(PhysAddr(a), len), want);
                    }
                    _ => {}
                }
                let in_use = used.iter().filter(|&&u| u).count() as u64;
                let allocated: u64 = live.iter().filter(|l| l.alloc).map(|l| l.nslots).sum();
                high = high.max(in_use);
                prop_assert_eq!(p.stats(), Stats {
                    total: nslabs,
                    used: in_use as u32,
                    allocated: allocated as u32,
                    high_water: high as u32,
                    failed,
                });
            }
            for m in live.drain(..) {
                if m.alloc {
                    prop_assert_eq!(p.free(PhysAddr(m.addr), m.size), Ok(()));
                } else {
                    prop_assert_eq!(p.unmap(PhysAddr(m.addr), m.size), Ok(PhysAddr(m.orig)));
                }
            }
            prop_assert_eq!(p.stats().used, 0);
            prop_assert_eq!(p.stats().allocated, 0);
            // Back to baseline: every whole segment takes a full-size mapping again.
            for _ in 0..nslabs / 128 {
                prop_assert!(p.map(PhysAddr(0), MAX_MAPPING_SIZE, 0).is_ok());
            }
            let tail = u64::from(nslabs % 128);
            if tail > 0 {
                prop_assert!(p.map(PhysAddr(0), tail * 2048, 0).is_ok());
            }
            prop_assert!(p.map(PhysAddr(0), 1, 0).is_err());
        }
    }
}
