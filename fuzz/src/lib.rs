//! Shared pieces of the fuzz targets: the input layout (a DTB followed by a trailer of fuzzed
//! parameters), a value generator over that trailer, a bounded heap, and checks of the contracts
//! the memory map and CMA set-up promise.
//!
//! Input layout of the device-tree targets: the bytes start with a DTB; whatever follows its
//! `totalsize` is the trailer, read with [`Gen`]. A plain DTB (every seed) has an empty trailer,
//! and an empty trailer always means the defaults, so the seeds exercise the realistic path. When
//! the bytes are not a valid DTB, targets that can do something useful without a tree treat the
//! whole input as the trailer.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::{self, Write};

use dmakern::dt::DeviceTree;
use dmakern::mm::addr::{PhysAddr, PAGE_SIZE};
use dmakern::mm::memmap::{MemoryMap, Region, ReservationKind};

/// Largest single allocation the fuzzed code may make: the size of the kernel's whole heap
/// (`HEAP_SIZE` in `src/kernel.rs`). Code that sizes an allocation from its input must allocate
/// fallibly (`try_reserve`) and report failure as a value. Above this size the allocator fails,
/// as the kernel's would; an infallible allocation then aborts and libFuzzer reports it, where the
/// host would otherwise just hand out the memory.
pub const MAX_ALLOC: usize = 4 << 20;

/// The system allocator, failing every request larger than [`MAX_ALLOC`].
pub struct BoundedAlloc;

// SAFETY: every request is either refused (null, which callers must handle) or forwarded
// unchanged to the system allocator, which upholds the `GlobalAlloc` contract.
unsafe impl GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout (non-zero size, as GlobalAlloc requires).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout (refused requests return null and
        // are never freed).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` and `layout` are the caller's, valid for `System` as in `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: BoundedAlloc = BoundedAlloc;

/// Splits fuzz input into the device tree at its start (if it parses) and the trailer after it.
/// If it does not parse, the trailer is the whole input.
pub fn split_dtb(data: &[u8]) -> (Option<DeviceTree<'_>>, &[u8]) {
    match DeviceTree::from_bytes(data) {
        Ok(dt) => {
            let rest = data.get(dt.totalsize()..).unwrap_or_default();
            (Some(dt), rest)
        }
        Err(e) => {
            render(&e);
            (None, data)
        }
    }
}

/// Formats `v` (so every `Display` impl on the way runs) and returns the text.
pub fn render(v: &dyn fmt::Display) -> String {
    let mut s = String::new();
    write!(s, "{v}").expect("formatting into a String cannot fail");
    s
}

/// Fuzzed values read from a trailer, in a fixed simple encoding so that seeds can be written by
/// hand: `u8` one byte, `u64` eight bytes little-endian, `bool` one byte (odd = true), `choose(n)`
/// one byte modulo n, `str(max)` a length byte (modulo max + 1) then that many bytes. Reading
/// past the end yields zero bytes, and every `*_or` helper maps zero to its default, so a short or
/// empty trailer means "the usual case".
pub struct Gen<'a> {
    data: &'a [u8],
    /// Addresses worth aiming at (RAM bank edges, reservation edges).
    pub anchors: Vec<u64>,
}

impl<'a> Gen<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Gen {
            data,
            anchors: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next `n` bytes, or fewer at the end.
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    pub fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }

    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }

    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let got = self.take(8);
        b[..got.len()].copy_from_slice(got);
        u64::from_le_bytes(b)
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// `default` with fuzzed bits flipped: zero input gives the default, any value is reachable.
    pub fn u64_or(&mut self, default: u64) -> u64 {
        default ^ self.u64()
    }

    /// One of `n` (at most 256) choices.
    pub fn choose(&mut self, n: usize) -> usize {
        usize::from(self.u8()) % n.max(1)
    }

    /// A string of at most `max` (at most 255) bytes: the valid UTF-8 prefix of the bytes taken.
    pub fn str(&mut self, max: usize) -> &'a str {
        let len = usize::from(self.u8()) % (max + 1);
        utf8_prefix(self.take(len))
    }

    /// An address or size shaped the way bugs like them: raw, page multiples, powers of two,
    /// near an anchor, or at the top of the address space.
    pub fn addr(&mut self) -> u64 {
        match self.choose(6) {
            0 => self.u64(),
            1 => u64::from(self.u16()) * PAGE_SIZE,
            2 => 1u64 << (self.u8() % 64),
            3 => {
                let shift = self.u8() % 64;
                u64::from(self.u32()) << shift
            }
            4 => {
                let anchor = if self.anchors.is_empty() {
                    0
                } else {
                    let i = usize::from(self.u16()) % self.anchors.len();
                    self.anchors[i]
                };
                let delta = i64::from(self.u16() as i16) * PAGE_SIZE as i64;
                anchor.wrapping_add_signed(delta)
            }
            _ => u64::MAX - u64::from(self.u16()),
        }
    }

    /// Records the edges of `map`'s RAM banks and reservations as anchors.
    pub fn anchor_on(&mut self, map: &MemoryMap) {
        self.anchors.clear();
        for r in map
            .ram()
            .iter()
            .chain(map.reservations().iter().map(|r| &r.region))
        {
            self.anchors.push(r.base().as_u64());
            self.anchors.push(r.end());
        }
    }

    pub fn kind(&mut self) -> ReservationKind {
        const KINDS: [ReservationKind; 12] = [
            ReservationKind::Early,
            ReservationKind::Cma,
            ReservationKind::Swiotlb,
            ReservationKind::AtomicPool,
            ReservationKind::PageTables,
            ReservationKind::Heap,
            ReservationKind::MemReserve,
            ReservationKind::ReservedMemory { no_map: false },
            ReservationKind::ReservedMemory { no_map: true },
            ReservationKind::Kernel,
            ReservationKind::Dtb,
            ReservationKind::Initrd,
        ];
        KINDS[self.choose(KINDS.len())]
    }
}

/// The longest valid UTF-8 prefix of `bytes`.
pub fn utf8_prefix(bytes: &[u8]) -> &str {
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).expect("valid prefix"),
    }
}

/// Where the kernel image and the DTB go in `memmap`/`cma_placement`: by default as QEMU's virt
/// machine puts them, the DTB at the start of the first RAM bank and a 2 MiB kernel 512 KiB in;
/// the trailer may move and resize both.
pub struct BootLayout {
    pub kernel: std::ops::Range<PhysAddr>,
    pub dtb: PhysAddr,
}

impl BootLayout {
    pub fn of(dt: &DeviceTree<'_>, g: &mut Gen<'_>) -> BootLayout {
        let ram0 = dt
            .memory()
            .filter_map(Result::ok)
            .find(|r| !r.is_empty())
            .map_or(0x4000_0000, |r| r.base().as_u64());
        let kstart = g.u64_or(ram0.wrapping_add(0x8_0000));
        let ksize = g.u64_or(0x20_0000);
        let dtb = g.u64_or(ram0);
        BootLayout {
            kernel: PhysAddr::new(kstart)..PhysAddr::new(kstart.wrapping_add(ksize)),
            dtb: PhysAddr::new(dtb),
        }
    }
}

/// Asserts what `MemoryMap` promises about itself (module documentation of `mm::memmap`): RAM
/// banks sorted, non-empty, disjoint and non-touching; reservations sorted, non-empty, disjoint,
/// each inside one bank; free ranges page-aligned, sorted, inside RAM and clear of every
/// reservation; and the totals consistent with them. (The boot-log rendering is left to the
/// caller: it costs more than the checks.)
pub fn check_map(map: &MemoryMap) {
    let ram = map.ram();
    for b in ram {
        assert!(!b.is_empty(), "empty RAM bank {b} in {map:?}");
    }
    for w in ram.windows(2) {
        assert!(
            w[0].end() < w[1].base().as_u64(),
            "RAM banks {} and {} unsorted, overlapping or touching",
            w[0],
            w[1]
        );
    }
    let res = map.reservations();
    for r in res {
        assert!(!r.region.is_empty(), "empty reservation {r}");
        assert!(
            ram.iter().any(|b| b.contains(&r.region)),
            "reservation {r} not inside one RAM bank of {map:?}"
        );
    }
    for w in res.windows(2) {
        assert!(
            w[0].region.end() <= w[1].region.base().as_u64(),
            "reservations {} and {} unsorted or overlapping",
            w[0],
            w[1]
        );
    }
    let mut prev_end = 0u64;
    let mut free = 0u128;
    for (i, f) in map.free_ranges().enumerate() {
        assert!(!f.is_empty(), "empty free range");
        assert!(
            f.base().as_u64().is_multiple_of(PAGE_SIZE) && f.size().is_multiple_of(PAGE_SIZE),
            "free range {f} not page-aligned"
        );
        assert!(
            i == 0 || f.base().as_u64() >= prev_end,
            "free ranges unsorted or overlapping at {f}"
        );
        assert!(map.is_ram(&f), "free range {f} not inside one RAM bank");
        // Reservations are sorted and disjoint (checked above), so only the first one ending
        // after the free range starts can overlap it.
        let next = res.partition_point(|r| r.region.end() <= f.base().as_u64());
        assert!(
            res.get(next)
                .is_none_or(|r| r.region.base().as_u64() >= f.end()),
            "free range {f} overlaps reservation {}",
            res[next]
        );
        prev_end = f.end();
        free += u128::from(f.size());
    }
    let total_ram: u128 = ram.iter().map(|b| u128::from(b.size())).sum();
    assert_eq!(u128::from(map.total_ram()), total_ram, "total_ram");
    assert_eq!(u128::from(map.total_free()), free, "total_free");
}

/// A region known to be valid (`base + size` does not wrap).
pub fn region(base: u64, size: u64) -> Option<Region> {
    Region::new(PhysAddr::new(base), size)
}
