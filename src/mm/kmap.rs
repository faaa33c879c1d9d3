//! The kernel's own address space: identity-mapped (virtual = physical) RAM and MMIO, built with the
//! shared long-descriptor code (`pgtable`) on both architectures.
//!
//! Booting takes two steps. [`early_enable`] runs with the MMU off, before anything has parsed the
//! device tree: it maps only the kernel image and the DTB (and an optional early UART), so that
//! Rust code can run with the caches on and unaligned accesses allowed (with the MMU off every data
//! access is Device memory, where they fault). Its entries are non-global, tagged with
//! [`EARLY_ASID`]. [`build`] then maps every RAM bank from the memory map (normal write-back,
//! execute-never; the kernel text read-only and executable, read-only data read-only; `no-map`
//! reservations left out) with global entries under [`KERNEL_ASID`]. The two ASIDs keep the two
//! sets of TLB entries apart, so the switch needs no break-before-make where block sizes differ.
//! MMIO is mapped on demand by [`ioremap`].
//!
//! Virtual addresses outside RAM and MMIO stay free: the window of dynamic mappings
//! (`mm::vmap`) is placed there. Lock order: the kernel tables' lock, then the page allocator's
//! (table pages beyond the static pool come from it); nothing that holds the page allocator's
//! lock changes the kernel tables.

use crate::arch;
use crate::mm::addr::{align_down, align_up, PhysAddr, PAGE_SIZE};
use crate::mm::memmap::{MemoryMap, ReservationKind};
use crate::mm::pgtable::{LeafFlags, MemAttr, PageTable, PageTableError, Perms, TableAlloc, Translation};
use core::fmt;
use spin::Mutex;

pub const EARLY_ASID: u16 = 1;
pub const KERNEL_ASID: u16 = 0;

/// Page-table pages for the kernel's tables, inside the image (bss) so that they are mapped by the
/// early tables while the final ones are built: the linear map of any RAM size takes a handful (2 MiB
/// and 1 GiB blocks); the kernel image's 4 KiB pages and MMIO mappings take the rest.
const TABLE_POOL_PAGES: u64 = 48;
const EARLY_POOL_PAGES: usize = 8;
/// The boot CPU's stack, the first slice of `boot_stacks` (boot/*.s).
const BOOT_STACK_SIZE: usize = 0x10000;

/// Table pages handed out from a physical range, freed pages kept on a list threaded through their
/// first word. Identity mapping: a table's CPU pointer is its physical address. The final kernel
/// tables' pool overflows into the page allocator once it is up (dynamic mappings, and splitting
/// the linear map to pages, can need more tables than the image can hold).
pub struct PagePool {
    base: u64,
    next: u64,
    end: u64,
    free_head: u64,
    overflow: bool,
}

impl PagePool {
    /// # Safety
    /// `[base, base + pages * PAGE_SIZE)` must be page-aligned memory owned by the pool for good,
    /// reachable at its physical address (MMU off, or identity-mapped).
    pub const unsafe fn new(base: u64, pages: u64) -> Self {
        PagePool { base, next: base, end: base + pages * PAGE_SIZE, free_head: 0, overflow: false }
    }

    /// The same pool, taking pages from the page allocator (`mm::phys`) when its own run out.
    /// The linear map covers every page that allocator hands out, so they are reachable at their
    /// physical address too.
    const fn overflowing(self) -> Self {
        PagePool { overflow: true, ..self }
    }

    fn owns(&self, pa: u64) -> bool {
        (self.base..self.end).contains(&pa)
    }
}

// SAFETY: pages come from the range the pool owns (its constructor's contract), are zeroed before
// they are returned, are handed out once until freed, and are reachable at their physical address.
unsafe impl TableAlloc for PagePool {
    fn alloc_table(&mut self) -> Option<PhysAddr> {
        let pa = if self.free_head != 0 {
            let pa = self.free_head;
            // SAFETY: a freed table page of ours; its first word links the free list.
            self.free_head = unsafe { *(pa as *const u64) };
            pa
        } else if self.next < self.end {
            let pa = self.next;
            self.next += PAGE_SIZE;
            pa
        } else if self.overflow {
            crate::mm::phys::alloc_pages(0).ok()?.0
        } else {
            return None;
        };
        // SAFETY: the page belongs to the pool and is not in use (just taken off a list or fresh).
        unsafe { core::ptr::write_bytes(pa as *mut u8, 0, PAGE_SIZE as usize) };
        Some(PhysAddr(pa))
    }

    unsafe fn free_table(&mut self, pa: PhysAddr) {
        if !self.owns(pa.0) {
            // An overflow page: `alloc_table` got it from the page allocator, which takes it back.
            if let Err(e) = crate::mm::phys::free_pages(pa, 0) {
                crate::println!("kmap: table page {pa} refused by the page allocator: {e}");
            }
            return;
        }
        // SAFETY: the caller (pgtable) frees only pages it got from us and no walker can reach.
        unsafe { *(pa.0 as *mut u64) = self.free_head };
        self.free_head = pa.0;
    }

    fn table_ptr(&self, pa: PhysAddr) -> *mut u64 {
        pa.0 as *mut u64
    }
}

/// The kernel image's layout, from the linker script.
#[derive(Clone, Copy, Debug)]
pub struct ImageLayout {
    pub start: u64,
    pub text_end: u64,
    pub rodata_end: u64,
    pub end: u64,
}

#[derive(Debug)]
pub enum KmapError {
    Tables(PageTableError),
    /// An MMIO range that is RAM, or overflows.
    NotMmio { base: u64, size: u64 },
    /// A change to the kernel tables before they were built.
    NotBuilt,
}

impl fmt::Display for KmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KmapError::Tables(e) => write!(f, "page tables: {e}"),
            KmapError::NotMmio { base, size } => write!(f, "{base:#x}+{size:#x} is not an MMIO range"),
            KmapError::NotBuilt => f.write_str("the kernel page tables are not built yet"),
        }
    }
}

impl From<PageTableError> for KmapError {
    fn from(e: PageTableError) -> Self {
        KmapError::Tables(e)
    }
}

#[repr(C, align(4096))]
struct EarlyPool([[u8; PAGE_SIZE as usize]; EARLY_POOL_PAGES]);

#[link_section = ".noinit.early_pool"]
static mut EARLY_POOL: EarlyPool = EarlyPool([[0; PAGE_SIZE as usize]; EARLY_POOL_PAGES]);

#[repr(C, align(4096))]
struct TablePool([[u8; PAGE_SIZE as usize]; TABLE_POOL_PAGES as usize]);

#[link_section = ".noinit.table_pool"]
static mut TABLE_POOL: TablePool = TablePool([[0; PAGE_SIZE as usize]; TABLE_POOL_PAGES as usize]);

/// A range for the early tables.
pub struct EarlyRange {
    pub base: u64,
    pub size: u64,
    pub device: bool,
}

/// Build the early tables for `ranges` (RAM ranges rounded out to 2 MiB) and turn the MMU on.
///
/// # Safety
/// Once, on the boot CPU, with the MMU off; the ranges must contain the running code, its stack
/// (both in the image) and whatever else is accessed before [`build`].
pub unsafe fn early_enable(ranges: &[EarlyRange], image: &ImageLayout) -> Result<(), KmapError> {
    let pool_base = core::ptr::addr_of_mut!(EARLY_POOL) as u64;
    // SAFETY: the static pool is used by nothing else; the MMU is off so its physical address is
    // its address.
    let pool = unsafe { PagePool::new(pool_base, EARLY_POOL_PAGES as u64) };
    let config = arch::mmu::KERNEL_TABLES;
    let flags = LeafFlags { non_global: true, ..config.leaf_flags };
    let mut pt = PageTable::new(crate::mm::pgtable::PageTableConfig { leaf_flags: flags, ..config }, pool)?;
    const BLOCK: u64 = 2 << 20;
    for r in ranges {
        let (granule, attr, perms) = if r.device {
            (PAGE_SIZE, MemAttr::Device, Perms::RW)
        } else {
            (BLOCK, MemAttr::Normal, Perms { read: true, write: true, exec: true })
        };
        let base = align_down(r.base, granule);
        let end = align_up(r.base.saturating_add(r.size), granule).ok_or(KmapError::NotMmio { base: r.base, size: r.size })?;
        let mut va = base;
        while va < end {
            match pt.map(va, PhysAddr(va), granule, attr, perms) {
                Ok(()) | Err(PageTableError::AlreadyMapped { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            va += granule;
        }
    }
    // What was written with the caches off and is read with them on: everything after the text
    // (the relocations patch read-only data too), the boot CPU's stack and the early tables. The
    // text was only read; the other CPUs' stacks and the final table pool are first written with
    // the caches on.
    extern "C" {
        static __bss_end: u8;
        static boot_stacks: u8;
    }
    let stack = core::ptr::addr_of!(boot_stacks) as usize;
    let written = [
        (image.text_end as usize, core::ptr::addr_of!(__bss_end) as usize),
        (stack, stack + BOOT_STACK_SIZE),
        (pool_base as usize, pool_base as usize + EARLY_POOL_PAGES * PAGE_SIZE as usize),
    ];
    // SAFETY: the tables identity-map the image (code, stack, data) and the DTB.
    unsafe { arch::mmu::enable(pt.root_pa(), EARLY_ASID, &written) };
    for r in ranges.iter().filter(|r| r.device) {
        remember_device(r.base, r.size);
    }
    *EARLY_PT.lock() = Some(pt);
    Ok(())
}

/// The early tables, kept so that a device found in the DT (the console) can be added to them.
static EARLY_PT: Mutex<Option<PageTable<PagePool>>> = Mutex::new(None);

/// Device ranges mapped early; [`build`] maps them again in the final tables.
static EARLY_DEVICES: Mutex<([(u64, u64); MAX_EARLY_DEVICES], usize)> = Mutex::new(([(0, 0); MAX_EARLY_DEVICES], 0));
/// The early UART, the console, and on a Raspberry Pi the firmware mailbox and the power manager,
/// with room to spare.
const MAX_EARLY_DEVICES: usize = 8;

fn remember_device(base: u64, size: u64) {
    let mut d = EARLY_DEVICES.lock();
    let n = d.1;
    if n < d.0.len() {
        d.0[n] = (base, size);
        d.1 += 1;
    }
}

/// Map a device into the early tables (before [`build`]), e.g. the console the DT names. At most
/// [`MAX_EARLY_DEVICES`] such ranges are carried over into the final tables.
pub fn early_map_device(pa: u64, size: u64) -> Result<(), KmapError> {
    let mut guard = EARLY_PT.lock();
    let pt = guard.as_mut().ok_or(KmapError::NotMmio { base: pa, size })?;
    let (base, end) = map_device(pt, pa, size)?;
    remember_device(base, end - base);
    Ok(())
}

/// Identity-map the pages of `[pa, pa + size)` as Device-nGnRE, read-write, execute-never;
/// pages already mapped as a device are shared, RAM is refused. Returns the page-aligned range.
fn map_device(pt: &mut PageTable<PagePool>, pa: u64, size: u64) -> Result<(u64, u64), KmapError> {
    let base = align_down(pa, PAGE_SIZE);
    let end = pa.checked_add(size).and_then(|e| align_up(e, PAGE_SIZE)).ok_or(KmapError::NotMmio { base: pa, size })?;
    let mut va = base;
    while va < end {
        match pt.translate(va) {
            Some(t) if t.attr.is_device() => {}
            Some(_) => return Err(KmapError::NotMmio { base: pa, size }),
            None => pt.map(va, PhysAddr(va), PAGE_SIZE, MemAttr::Device, Perms::RW)?,
        }
        va += PAGE_SIZE;
    }
    arch::cache::dsb();
    arch::cache::isb();
    Ok((base, end))
}

struct KernelMap {
    pt: PageTable<PagePool>,
}

static KMAP: Mutex<Option<KernelMap>> = Mutex::new(None);

fn map_range(pt: &mut PageTable<PagePool>, base: u64, end: u64, perms: Perms) -> Result<(), KmapError> {
    if end > base {
        pt.map(base, PhysAddr(base), end - base, MemAttr::Normal, perms)?;
    }
    Ok(())
}

/// Build the final kernel tables from the memory map and switch to them.
///
/// # Safety
/// Once, on the boot CPU, after [`early_enable`]; `image` must describe the running kernel.
pub unsafe fn build(map: &MemoryMap, image: &ImageLayout) -> Result<(), KmapError> {
    let pool_base = core::ptr::addr_of_mut!(TABLE_POOL) as u64;
    // SAFETY: the static pool is used by nothing else and lies in the image, which both the early
    // and the final tables map at its physical address.
    let pool = unsafe { PagePool::new(pool_base, TABLE_POOL_PAGES) }.overflowing();
    let mut pt = PageTable::new(arch::mmu::KERNEL_TABLES, pool)?;
    let nomap = |base: u64, end: u64| {
        map.reservations()
            .iter()
            .filter(|r| matches!(r.kind, ReservationKind::ReservedMemory { no_map: true }))
            .filter(move |r| r.region.base().0 < end && r.region.end() > base)
            .map(move |r| (r.region.base().0.max(base), r.region.end().min(end)))
    };
    for bank in map.ram() {
        let (bank_base, bank_end) = (bank.base().0, bank.end());
        // Pieces of the bank: holes for no-map reservations; the image's sections with their own
        // permissions.
        let mut cursor = bank_base;
        let mut cuts: heapless_cuts::Cuts = heapless_cuts::Cuts::new();
        for (b, e) in nomap(bank_base, bank_end) {
            cuts.push(b, e, None);
        }
        if image.start < bank_end && image.end > bank_base {
            cuts.push(image.start, image.text_end, Some(Perms::RX));
            cuts.push(image.text_end, image.rodata_end, Some(Perms::RO));
            cuts.push(image.rodata_end, image.end, Some(Perms::RW));
        }
        cuts.sort();
        for (b, e, perms) in cuts.iter() {
            map_range(&mut pt, cursor, b, Perms::RW)?;
            if let Some(p) = perms {
                map_range(&mut pt, b, e, p)?;
            }
            cursor = cursor.max(e);
        }
        map_range(&mut pt, cursor, bank_end, Perms::RW)?;
    }
    let (devices, ndev) = *EARLY_DEVICES.lock();
    for &(base, size) in &devices[..ndev] {
        let mut va = base;
        while va < base + size {
            match pt.map(va, PhysAddr(va), PAGE_SIZE, MemAttr::Device, Perms::RW) {
                Ok(()) | Err(PageTableError::AlreadyMapped { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            va += PAGE_SIZE;
        }
    }
    // SAFETY: the new tables map all RAM (including the image, stack and DTB) and the early devices
    // with the same attributes as the early ones; the early entries carry another ASID.
    unsafe { arch::mmu::switch(pt.root_pa(), KERNEL_ASID, EARLY_ASID) };
    *KMAP.lock() = Some(KernelMap { pt });
    Ok(())
}

/// A few sorted cuts of a RAM bank without a heap (the heap is set up after the final map).
mod heapless_cuts {
    use crate::mm::pgtable::Perms;
    const MAX: usize = 16;
    pub struct Cuts {
        v: [(u64, u64, Option<Perms>); MAX],
        n: usize,
    }
    impl Cuts {
        pub fn new() -> Self {
            Cuts { v: [(0, 0, None); MAX], n: 0 }
        }
        pub fn push(&mut self, b: u64, e: u64, p: Option<Perms>) {
            if e > b && self.n < MAX {
                self.v[self.n] = (b, e, p);
                self.n += 1;
            }
        }
        pub fn sort(&mut self) {
            crate::sort::sort_small_by_key(&mut self.v[..self.n], |c| c.0);
        }
        pub fn iter(&self) -> impl Iterator<Item = (u64, u64, Option<Perms>)> + '_ {
            self.v[..self.n].iter().copied()
        }
    }
}

/// Map `[pa, pa + size)` as Device-nGnRE, read-write, execute-never, at its physical address, and
/// return that address. Mapping a range that is already mapped as a device is fine (several drivers
/// may share a page); RAM is refused.
pub fn ioremap(pa: u64, size: u64) -> Result<usize, KmapError> {
    let mut guard = KMAP.lock();
    let km = guard.as_mut().expect("ioremap before the kernel map is built");
    map_device(&mut km.pt, pa, size)?;
    Ok(pa as usize)
}

/// An address no table maps (for tests that must fault): the first of a few candidates outside
/// RAM and MMIO on the supported machines that the live tables leave unmapped.
pub fn unmapped_address() -> usize {
    const CANDIDATES: [u64; 4] = [0x7000_0000_0000, 0x3000_0000, 0xffff_f000, 0x1000_0000];
    CANDIDATES
        .into_iter()
        .filter(|&a| a <= usize::MAX as u64)
        .find(|&a| translate(a).is_none())
        .unwrap_or(0) as usize
}

fn with_tables<R>(f: impl FnOnce(&mut PageTable<PagePool>) -> Result<R, PageTableError>) -> Result<R, KmapError> {
    let mut guard = KMAP.lock();
    let km = guard.as_mut().ok_or(KmapError::NotBuilt)?;
    Ok(f(&mut km.pt)?)
}

/// Maps `[va, va + size)` to `[pa, pa + size)` with `attr` and `perms`: a dynamic mapping outside
/// the identity-mapped ranges (the vmap window). Refused if any page of it is mapped. Returns once
/// the new entries are visible to the MMU.
pub fn map_dynamic(va: u64, pa: PhysAddr, size: u64, attr: MemAttr, perms: Perms) -> Result<(), KmapError> {
    with_tables(|pt| pt.map(va, pa, size, attr, perms))?;
    arch::cache::dsb();
    arch::cache::isb();
    Ok(())
}

/// Removes whatever is mapped in `[va, va + size)` and invalidates it in every CPU's TLB; when this
/// returns no CPU can reach the old pages through the range. Returns the bytes that were mapped.
pub fn unmap(va: u64, size: u64) -> Result<u64, KmapError> {
    with_tables(|pt| pt.unmap(va, size, &mut arch::mmu::CpuTlb)).map(|r| r.unmapped)
}

/// Like [`unmap`], but keeps the page tables the range leaves empty (see
/// [`PageTable::unmap_keep_tables`]): for the vmap window, whose ranges are mapped again and again.
/// Returns the bytes that were mapped.
pub fn unmap_keep_tables(va: u64, size: u64) -> Result<u64, KmapError> {
    with_tables(|pt| pt.unmap_keep_tables(va, size, &mut arch::mmu::CpuTlb)).map(|r| r.unmapped)
}

/// Gives `[va, va + size)` new attributes, break-before-make, with TLB invalidation on every CPU.
/// Every page of the range must be mapped.
pub fn set_attributes(va: u64, size: u64, attr: MemAttr, perms: Perms) -> Result<(), KmapError> {
    with_tables(|pt| pt.set_attributes(va, size, attr, perms, &mut arch::mmu::CpuTlb))
}

/// Maps `[va, va + size)` with pages only (see [`PageTable::split_to_pages`]); the caller owns the
/// range, and nothing else may be accessed through a block it shares while the block is replaced
/// (true during boot, on one CPU, with only the image's pages in use by the code doing it).
pub fn split_to_pages(va: u64, size: u64) -> Result<(), KmapError> {
    with_tables(|pt| pt.split_to_pages(va, size, &mut arch::mmu::CpuTlb))
}

/// The live translation of `va` in the kernel tables, as the MMU would walk it.
pub fn translate(va: u64) -> Option<Translation> {
    KMAP.lock().as_ref().and_then(|km| km.pt.translate(va))
}

mod ktests {
    use super::*;
    use crate::ktest::TestResult;
    use crate::{kassert, kassert_eq};

    static SAMPLE: [&str; 2] = ["relocated", "pointers"];

    /// The entry code applied the image's relocations: a static table of pointers points into the
    /// image and reads back what was written.
    fn relocations_applied() -> TestResult {
        let img = crate::kernel::boot_info().image;
        for s in SAMPLE.iter() {
            let p = s.as_ptr() as u64;
            kassert!(p >= img.start && p < img.end, "pointer {p:#x} outside the image {:#x}..{:#x}", img.start, img.end);
        }
        kassert_eq!(SAMPLE[0].len() + SAMPLE[1].len(), 17);
        kassert_eq!(SAMPLE[1], "pointers");
        Ok(())
    }

    fn mmu_and_caches_on() -> TestResult {
        kassert!(arch::mmu::enabled(), "MMU is off");
        Ok(())
    }

    /// Every page of every RAM bank translates to itself as normal write-back memory, except
    /// `no-map` reservations, which are not mapped at all.
    fn linear_map_covers_ram() -> TestResult {
        let info = crate::kernel::boot_info();
        let map = info.memmap.lock();
        for bank in map.ram() {
            let mut va = bank.base().0;
            while va < bank.end() {
                let nomap = map.reservations().iter().any(|r| {
                    matches!(r.kind, ReservationKind::ReservedMemory { no_map: true }) && r.region.base().0 <= va && va < r.region.end()
                });
                match (translate(va), nomap) {
                    (None, true) => {}
                    (Some(t), false) => {
                        kassert_eq!(t.pa.0, va, "identity map at {va:#x}");
                        kassert_eq!(t.attr, MemAttr::Normal, "RAM at {va:#x}");
                    }
                    (t, true) => kassert!(false, "no-map page {va:#x} is mapped: {t:?}"),
                    (None, false) => kassert!(false, "RAM page {va:#x} is not mapped"),
                }
                va += PAGE_SIZE;
            }
        }
        Ok(())
    }

    /// Text is read-only and executable, read-only data read-only, data and the rest of RAM never
    /// executable; checked in the live tables.
    fn image_permissions() -> TestResult {
        let img = crate::kernel::boot_info().image;
        let text = translate(img.start).ok_or(crate::ktest::NotPassed::Fail("text unmapped".into()))?;
        kassert!(text.perms.exec && !text.perms.write, "text {:?}", text.perms);
        let ro = translate(img.text_end).ok_or(crate::ktest::NotPassed::Fail("rodata unmapped".into()))?;
        kassert!(!ro.perms.exec && !ro.perms.write, "rodata {:?}", ro.perms);
        let data = translate(img.rodata_end).ok_or(crate::ktest::NotPassed::Fail("data unmapped".into()))?;
        kassert!(!data.perms.exec && data.perms.write, "data {:?}", data.perms);
        let heap = &SAMPLE as *const _ as u64;
        kassert!(!translate(heap).map_or(true, |t| t.perms.exec), "rodata executable");
        Ok(())
    }

    /// A write to kernel text faults with a permission fault and changes nothing.
    fn text_write_faults() -> TestResult {
        let target = linear_map_covers_ram as *const () as usize & !7;
        let before = arch::probe::read_u64(target).map_err(|f| crate::ktest::NotPassed::Fail(alloc::format!("read fault {f:?}")))?;
        // SAFETY: the write is expected to fault; if it did not, it writes back the same value.
        let r = unsafe { arch::probe::write_u64(target, before) };
        match r {
            Err(f) => kassert!(f.is_permission(), "not a permission fault: {f:?}"),
            Ok(()) => kassert!(false, "writing kernel text at {target:#x} did not fault"),
        }
        kassert_eq!(arch::probe::read_u64(target).ok(), Some(before));
        Ok(())
    }

    /// An address that is neither RAM nor a mapped device faults with a translation fault.
    fn unmapped_address_faults() -> TestResult {
        let hole = unmapped_address();
        match arch::probe::read_u64(hole) {
            Err(f) => kassert!(f.is_translation(), "not a translation fault: {f:?}"),
            Ok(v) => kassert!(false, "read of unmapped {hole:#x} returned {v:#x}"),
        }
        Ok(())
    }

    crate::ktest_suite!("kmap", [
        relocations_applied,
        mmu_and_caches_on,
        linear_map_covers_ram,
        image_permissions,
        text_write_faults,
        unmapped_address_faults,
    ]);
}
