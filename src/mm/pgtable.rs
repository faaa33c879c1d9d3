//! Arm long-descriptor translation tables: VMSAv8-64 stage 1 with the 4 KiB granule.
//!
//! One format serves three walkers: the aarch64 MMU (TTBR0_EL1), the armv7 MMU with LPAE
//! (TTBCR.EAE=1, whose long descriptors have the same layout), and SMMUv3 stage 1 (a context
//! descriptor points at these tables). This module is pure logic: it encodes and decodes
//! descriptors and edits a tree of tables that lives in memory reached through [`TableAlloc`]. It
//! issues no barriers and no TLB maintenance itself; the caller supplies those through [`TlbOps`],
//! so the same code drives the CPU (`dsb`/`tlbi`) and the SMMU (command queue), and is tested on
//! the host against a fake memory.
//!
//! Layout facts used throughout (Arm ARM D8.3, "VMSAv8-64 translation table format descriptors"):
//! levels 0..=3 map 512 GiB / 1 GiB / 2 MiB / 4 KiB per entry; level 0 cannot hold a block with the
//! 4 KiB granule, level 3 holds pages (type 0b11; 0b01 there is reserved and faults). Leaf fields:
//! AttrIndx[4:2] (index into MAIR), AP[7:6], SH[9:8], AF[10], nG[11], output address [47:12],
//! PXN[53], UXN/XN[54].
//!
//! Policy choices, all in one place:
//! - Every leaf gets AF=1 (no access-flag faults), SH=inner shareable. The hardware treats Device
//!   and Normal non-cacheable memory as outer shareable whatever SH says, so one value for all is
//!   simplest.
//! - Writable implies readable: stage 1 has no write-only or execute-only encoding, so [`Perms`]
//!   without `read` is rejected. Device memory must be execute-never (speculative instruction fetch
//!   from a device is only prevented by XN), so a Device mapping with `exec` is rejected too.
//! - `map` never overwrites a valid entry; changing a live mapping goes through `unmap` or
//!   `set_attributes`, which follow break-before-make (write invalid, invalidate, sync, write new).
//! - Every operation is all-or-nothing: a first pass validates the request and counts the table
//!   pages it needs, those pages are allocated up front, and only then is the tree edited. A
//!   failure leaves the tables exactly as they were.
//!
//! Memory ordering, the caller's part: after `map`, `unmap` or `set_attributes` returns, the new
//! descriptors must be made visible to the walker before the range is used: on the CPU `dsb ishst`
//! (plus `isb` if this CPU will execute from or use the range at once); for the SMMU the stores
//! must be complete (`dsb`) before the device is told to use the range. Ordering inside `unmap` and
//! `set_attributes` (invalid entry visible before the invalidation, invalidation complete before
//! the new entry) is the contract of [`TlbOps`].

use core::fmt;

use crate::mm::addr::{align_down, PhysAddr, PAGE_SHIFT, PAGE_SIZE};

/// Descriptors per table: a 4 KiB table of 8-byte entries.
pub const ENTRIES_PER_TABLE: usize = 512;
/// Bits of input address resolved per level.
const TABLE_SHIFT: u32 = 9;
const INDEX_MASK: u64 = ENTRIES_PER_TABLE as u64 - 1;
const LAST_LEVEL: u8 = 3;

/// Largest output address size of this format without FEAT_LPA/FEAT_LPA2.
pub const MAX_OA_BITS: u8 = 48;

const DESC_VALID: u64 = 1 << 0;
/// With DESC_VALID: a table descriptor at levels 0-2, a page descriptor at level 3. Clear: a block.
const DESC_TABLE_OR_PAGE: u64 = 1 << 1;
const DESC_TYPE_MASK: u64 = DESC_VALID | DESC_TABLE_OR_PAGE;
const ATTR_INDX_SHIFT: u32 = 2;
const ATTR_INDX_MASK: u64 = 0b111 << ATTR_INDX_SHIFT;
/// AP[1]: unprivileged (EL0, or an SMMU transaction marked unprivileged) access allowed.
const AP_UNPRIVILEGED: u64 = 1 << 6;
/// AP[2]: read-only.
const AP_READ_ONLY: u64 = 1 << 7;
const SH_INNER_SHAREABLE: u64 = 0b11 << 8;
const ACCESS_FLAG: u64 = 1 << 10;
const NOT_GLOBAL: u64 = 1 << 11;
const PXN: u64 = 1 << 53;
const UXN: u64 = 1 << 54;
/// Output address bits [47:12].
const OA_MASK: u64 = 0x0000_ffff_ffff_f000;
/// Everything in a leaf besides type and address: lower attributes [11:2], upper attributes
/// [63:50].
const LEAF_ATTR_MASK: u64 = 0xfffc_0000_0000_0ffc;

/// Shift of the input-address bits a level-`level` entry maps (39, 30, 21, 12). `level` <= 3.
const fn level_shift(level: u8) -> u32 {
    PAGE_SHIFT + TABLE_SHIFT * (LAST_LEVEL - level) as u32
}

/// Bytes mapped by one level-`level` entry. `level` <= 3.
const fn level_size(level: u8) -> u64 {
    1 << level_shift(level)
}

/// Index of `va` in a level-`level` table.
const fn table_index(va: u64, level: u8) -> usize {
    ((va >> level_shift(level)) & INDEX_MASK) as usize
}

/// Type bits of a leaf at `level` (1..=3): block 0b01, page 0b11.
const fn leaf_type(level: u8) -> u64 {
    if level == LAST_LEVEL {
        DESC_VALID | DESC_TABLE_OR_PAGE
    } else {
        DESC_VALID
    }
}

/// Table descriptor for a page already known to be aligned and within the output address size.
const fn table_desc(pa: PhysAddr) -> u64 {
    pa.as_u64() | DESC_VALID | DESC_TABLE_OR_PAGE
}

/// Memory types, each with its own MAIR slot (see [`MAIR_VALUE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemAttr {
    /// Normal, inner and outer write-back, read- and write-allocate (MAIR 0xff).
    Normal,
    /// Normal, inner and outer non-cacheable (MAIR 0x44).
    NormalNonCacheable,
    /// Write-combining. On Arm that is Normal non-cacheable too (MAIR 0x44), as Linux's
    /// `pgprot_writecombine` does; it keeps its own slot so an architecture could choose a
    /// different encoding by changing one table entry, and so live tables still say which was asked
    /// for.
    WriteCombine,
    /// Device-nGnRE: the usual MMIO type (posted writes allowed). On armv7: "Device".
    Device,
    /// Device-nGnRnE: non-posted. On armv7: "Strongly-ordered".
    DeviceStrict,
}

impl MemAttr {
    /// Every attribute, in MAIR index order.
    pub const ALL: [MemAttr; 5] = [
        MemAttr::Normal,
        MemAttr::NormalNonCacheable,
        MemAttr::WriteCombine,
        MemAttr::Device,
        MemAttr::DeviceStrict,
    ];

    /// The AttrIndx value descriptors carry for this attribute.
    pub const fn mair_index(self) -> u8 {
        match self {
            MemAttr::Normal => 0,
            MemAttr::NormalNonCacheable => 1,
            MemAttr::WriteCombine => 2,
            MemAttr::Device => 3,
            MemAttr::DeviceStrict => 4,
        }
    }

    /// The 8-bit MAIR encoding of this attribute (same meaning on armv8 and armv7 LPAE).
    pub const fn mair_encoding(self) -> u8 {
        match self {
            MemAttr::Normal => 0xff,
            MemAttr::NormalNonCacheable | MemAttr::WriteCombine => 0x44,
            MemAttr::Device => 0x04,
            MemAttr::DeviceStrict => 0x00,
        }
    }

    /// The attribute whose MAIR index is `index`, if any.
    pub const fn from_mair_index(index: u8) -> Option<MemAttr> {
        match index {
            0 => Some(MemAttr::Normal),
            1 => Some(MemAttr::NormalNonCacheable),
            2 => Some(MemAttr::WriteCombine),
            3 => Some(MemAttr::Device),
            4 => Some(MemAttr::DeviceStrict),
            _ => None,
        }
    }

    pub const fn is_device(self) -> bool {
        matches!(self, MemAttr::Device | MemAttr::DeviceStrict)
    }
}

/// The MAIR value matching [`MemAttr::mair_index`]: program it into MAIR_EL1 (aarch64), or into
/// MAIR0/MAIR1 as [`MAIR0_VALUE`]/[`MAIR1_VALUE`] (armv7 LPAE); the SMMU CD carries it in its MAIR
/// field. Unused slots 5..=7 hold 0x00 (Device-nGnRnE, the most restrictive type); no descriptor
/// written by this module uses them.
pub const MAIR_VALUE: u64 = {
    let mut value = 0u64;
    let mut i = 0;
    while i < MemAttr::ALL.len() {
        let attr = MemAttr::ALL[i];
        value |= (attr.mair_encoding() as u64) << (8 * attr.mair_index() as u32);
        i += 1;
    }
    value
};
/// Low half of [`MAIR_VALUE`]: armv7 MAIR0 (attributes 0..=3).
pub const MAIR0_VALUE: u32 = MAIR_VALUE as u32;
/// High half of [`MAIR_VALUE`]: armv7 MAIR1 (attributes 4..=7).
pub const MAIR1_VALUE: u32 = (MAIR_VALUE >> 32) as u32;

/// Access permissions of a mapping. `read` must be set: stage 1 cannot express write-only or
/// execute-only access. For the SMMU, `write` is "the device may write" and `exec` is usually
/// false.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

impl Perms {
    pub const RO: Perms = Perms {
        read: true,
        write: false,
        exec: false,
    };
    pub const RW: Perms = Perms {
        read: true,
        write: true,
        exec: false,
    };
    pub const RX: Perms = Perms {
        read: true,
        write: false,
        exec: true,
    };
}

/// Per-leaf bits that depend on who walks the table rather than on the mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LeafFlags {
    /// nG: the TLB entry is tagged with the current ASID (SMMU domains, per-process tables).
    pub non_global: bool,
    /// AP[1]: unprivileged accesses allowed. The kernel's own tables leave it clear (on the CPU an
    /// EL0-writable page is never executable at EL1). SMMU tables should set it: PCIe transactions
    /// without a PASID prefix arrive unprivileged, and real SMMUs enforce AP[1] (QEMU does not).
    /// Execute permission is then granted through UXN instead of PXN.
    pub unprivileged: bool,
    /// The armv7 LPAE reading of bit 54: XN for every privilege level, not just unprivileged (UXN)
    /// as in VMSAv8-64. Privileged-executable leaves then clear it as well as PXN, or the kernel
    /// could not fetch its own text. A property of the table format, not of the descriptor, so
    /// decoding cannot recover it: [`PageTable::translate`] reports the table's own setting.
    pub lpae_xn: bool,
}

/// A block or page descriptor, decoded. Fields this module never varies (SH, AF, NS, Contiguous)
/// are not reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Output address of the first byte the leaf maps.
    pub pa: PhysAddr,
    pub attr: MemAttr,
    pub perms: Perms,
    pub flags: LeafFlags,
}

/// What a descriptor means at a given level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Faults on access: bit 0 clear, or a reserved encoding (a block at level 0 or 0b01 at level
    /// 3).
    Invalid,
    /// Points at the next-level table at this address.
    Table(PhysAddr),
    /// A 1 GiB (level 1) or 2 MiB (level 2) block.
    Block(Leaf),
    /// A 4 KiB page (level 3).
    Page(Leaf),
}

/// Why a descriptor could not be encoded or decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorError {
    /// Levels are 0..=3.
    NoSuchLevel(u8),
    /// Level 0 holds no blocks with the 4 KiB granule.
    NoLeafAtLevel(u8),
    /// The address is not aligned to what the descriptor maps (4 KiB, 2 MiB, 1 GiB).
    Misaligned { pa: PhysAddr, align: u64 },
    /// The address needs more than the format's 48 output bits.
    AddressTooWide(PhysAddr),
    /// `Perms::read` was false.
    NotReadable,
    /// Device memory with `Perms::exec`.
    ExecutableDevice,
    /// The descriptor's AttrIndx is not one of [`MemAttr`]'s slots.
    UnknownAttrIndex(u8),
}

impl fmt::Display for DescriptorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DescriptorError::NoSuchLevel(l) => {
                write!(
                    f,
                    "translation level {l} does not exist (levels are 0 to 3)"
                )
            }
            DescriptorError::NoLeafAtLevel(l) => {
                write!(
                    f,
                    "level {l} cannot hold a block or page with the 4 KiB granule"
                )
            }
            DescriptorError::Misaligned { pa, align } => {
                write!(
                    f,
                    "output address {pa} is not aligned to the {align:#x}-byte leaf size"
                )
            }
            DescriptorError::AddressTooWide(pa) => {
                write!(
                    f,
                    "output address {pa} does not fit the 48-bit descriptor field"
                )
            }
            DescriptorError::NotReadable => {
                write!(
                    f,
                    "stage-1 descriptors cannot express write-only or execute-only access"
                )
            }
            DescriptorError::ExecutableDevice => {
                write!(f, "device memory must be mapped execute-never")
            }
            DescriptorError::UnknownAttrIndex(i) => {
                write!(
                    f,
                    "descriptor uses MAIR index {i}, which no memory type is assigned to"
                )
            }
        }
    }
}

/// Attribute bits of a leaf (everything but type and address), after validating the combination.
/// Inlined: it runs on every map, where a call costs as much as the work.
#[inline(always)]
fn leaf_attr_bits(attr: MemAttr, perms: Perms, flags: LeafFlags) -> Result<u64, DescriptorError> {
    if !perms.read {
        return Err(DescriptorError::NotReadable);
    }
    if perms.exec && attr.is_device() {
        return Err(DescriptorError::ExecutableDevice);
    }
    let mut bits =
        ((attr.mair_index() as u64) << ATTR_INDX_SHIFT) | SH_INNER_SHAREABLE | ACCESS_FLAG;
    if !perms.write {
        bits |= AP_READ_ONLY;
    }
    if flags.non_global {
        bits |= NOT_GLOBAL;
    }
    // Execute permission is granted to exactly one privilege: the one allowed to access the page.
    let executable_by = if flags.unprivileged {
        bits |= AP_UNPRIVILEGED;
        UXN
    } else {
        PXN
    };
    bits |= PXN | UXN;
    if perms.exec {
        bits &= !executable_by;
        if flags.lpae_xn {
            bits &= !UXN;
        }
    }
    Ok(bits)
}

/// Encodes a block (level 1 or 2) or page (level 3) descriptor mapping `pa`.
pub fn encode_leaf(
    pa: PhysAddr,
    level: u8,
    attr: MemAttr,
    perms: Perms,
    flags: LeafFlags,
) -> Result<u64, DescriptorError> {
    if level > LAST_LEVEL {
        return Err(DescriptorError::NoSuchLevel(level));
    }
    if level == 0 {
        return Err(DescriptorError::NoLeafAtLevel(level));
    }
    let align = level_size(level);
    if pa.as_u64() & (align - 1) != 0 {
        return Err(DescriptorError::Misaligned { pa, align });
    }
    if pa.as_u64() & !OA_MASK != 0 {
        return Err(DescriptorError::AddressTooWide(pa));
    }
    Ok(leaf_attr_bits(attr, perms, flags)? | pa.as_u64() | leaf_type(level))
}

/// Encodes a table descriptor pointing at the next-level table at `pa` (no hierarchical
/// attributes).
pub fn encode_table(pa: PhysAddr) -> Result<u64, DescriptorError> {
    if !pa.is_page_aligned() {
        return Err(DescriptorError::Misaligned {
            pa,
            align: PAGE_SIZE,
        });
    }
    if pa.as_u64() & !OA_MASK != 0 {
        return Err(DescriptorError::AddressTooWide(pa));
    }
    Ok(table_desc(pa))
}

/// Decodes a descriptor read from a level-`level` table.
pub fn decode(desc: u64, level: u8) -> Result<Decoded, DescriptorError> {
    if level > LAST_LEVEL {
        return Err(DescriptorError::NoSuchLevel(level));
    }
    Ok(match kind(desc, level) {
        Kind::Invalid => Decoded::Invalid,
        Kind::Table(pa) => Decoded::Table(pa),
        Kind::Leaf if level == LAST_LEVEL => Decoded::Page(decode_leaf(desc, level)?),
        Kind::Leaf => Decoded::Block(decode_leaf(desc, level)?),
    })
}

fn decode_leaf(desc: u64, level: u8) -> Result<Leaf, DescriptorError> {
    let index = ((desc & ATTR_INDX_MASK) >> ATTR_INDX_SHIFT) as u8;
    let attr = MemAttr::from_mair_index(index).ok_or(DescriptorError::UnknownAttrIndex(index))?;
    let unprivileged = desc & AP_UNPRIVILEGED != 0;
    let xn = if unprivileged { UXN } else { PXN };
    Ok(Leaf {
        // Block descriptors have RES0 (or FEAT_BBM's nT) bits below the block size: mask them off.
        pa: PhysAddr::new(desc & OA_MASK & !(level_size(level) - 1)),
        attr,
        perms: Perms {
            read: true,
            write: desc & AP_READ_ONLY == 0,
            exec: desc & xn == 0,
        },
        flags: LeafFlags {
            non_global: desc & NOT_GLOBAL != 0,
            unprivileged,
            lpae_xn: false,
        },
    })
}

/// Provides and reaches the memory translation tables live in.
///
/// # Safety
/// Implementers guarantee:
/// - `alloc_table` returns the address of a 4 KiB-aligned, zero-filled page that nothing else uses
///   until it is handed to `free_table`.
/// - For such a page, `table_ptr` returns a pointer valid for volatile reads and writes of 512
///   `u64`s, through which the CPU sees the memory the table walker reads (the walker is
///   cache-coherent with that mapping, or the mapping is non-cacheable).
///
/// In turn [`PageTable`] calls `table_ptr` and `free_table` only with addresses `alloc_table`
/// returned and that are not yet freed, touches only entries 0..512 through the pointer, frees each
/// page once, and frees a page only when no walker can reach it any more (its parent entry was
/// cleared and the clearing invalidated and synced through [`TlbOps`]).
pub unsafe trait TableAlloc {
    /// A fresh zeroed table page, or `None` when out of memory.
    fn alloc_table(&mut self) -> Option<PhysAddr>;
    /// Returns a page to the allocator.
    ///
    /// # Safety
    /// `pa` came from `alloc_table` of this allocator, has not been freed, and is not used again.
    unsafe fn free_table(&mut self, pa: PhysAddr);
    /// CPU pointer to the table page at `pa` (see the trait contract).
    fn table_ptr(&self, pa: PhysAddr) -> *mut u64;
}

/// One TLB invalidation request: every cached translation for input addresses in
/// `[va, va + size)` must go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbInvalidation {
    /// Start of the range; a multiple of `granule`.
    pub va: u64,
    /// Length of the range; a multiple of `granule`.
    pub size: u64,
    /// Step for by-address invalidation: every entry this request is about (leaves, and with
    /// `leaf_only` false the removed table entries) maps at least `granule` bytes, aligned to it,
    /// so invalidating one address per `granule` step over the range reaches them all (the CPU:
    /// `tlbi vae1is` or `vale1is` per step; the SMMU: TLBI_NH_VA per step, or one range command).
    /// For large ranges an implementation may invalidate the whole ASID instead.
    pub granule: u64,
    /// Only leaf descriptors were removed or changed; the tables above them are still in place, so
    /// a last-level-only invalidation suffices (`tlbi vale1is`, TLBI_NH_VA with Leaf=1). When false
    /// a table descriptor was removed and intermediate walk-cache entries must go as well.
    pub leaf_only: bool,
}

/// TLB maintenance hooks for [`PageTable::unmap`] and [`PageTable::set_attributes`].
///
/// The page-table code calls `invalidate` after writing the descriptors the request covers, and
/// `sync` before it writes a replacement entry into a range it invalidated, before it frees a table
/// page, and before it returns if it invalidated anything. Invalidations of adjacent ranges are
/// merged into one request.
pub trait TlbOps {
    /// Starts invalidating the range. The implementation first makes the descriptor stores that
    /// preceded the call visible to the walker (CPU: `dsb ishst` before the `tlbi`s; SMMU: the
    /// stores complete before the command is published to the queue).
    fn invalidate(&mut self, inv: TlbInvalidation);
    /// Waits until every invalidation issued so far is complete (CPU: `dsb ish`; SMMU: CMD_SYNC and
    /// wait for its completion).
    fn sync(&mut self);
}

/// Shape of a translation regime. The walk's start level follows from `va_bits`, as the hardware
/// derives it from TnSZ: 40..=48 bits start at level 0, 31..=39 at level 1, 25..=30 at level 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageTableConfig {
    /// Input (virtual / IO virtual) address bits: 64 - T0SZ (aarch64, SMMU CD) or 32 - T0SZ (LPAE).
    pub va_bits: u8,
    /// Output (physical) address bits the walker accepts: TCR.IPS / CD.IPS, 40 for LPAE.
    pub oa_bits: u8,
    /// Flags written into every leaf of this table.
    pub leaf_flags: LeafFlags,
}

impl PageTableConfig {
    /// aarch64 kernel tables: 48-bit VA (T0SZ=16), 48-bit PA, walks start at level 0.
    pub const AARCH64_48: PageTableConfig = PageTableConfig {
        va_bits: 48,
        oa_bits: 48,
        leaf_flags: LeafFlags {
            lpae_xn: false,
            non_global: false,
            unprivileged: false,
        },
    };
    /// aarch64 kernel tables: 39-bit VA (T0SZ=25), 48-bit PA, walks start at level 1.
    pub const AARCH64_39: PageTableConfig = PageTableConfig {
        va_bits: 39,
        oa_bits: 48,
        leaf_flags: LeafFlags {
            lpae_xn: false,
            non_global: false,
            unprivileged: false,
        },
    };
    /// armv7 LPAE TTBR0 with TTBCR.T0SZ=0: 32-bit VA, 40-bit PA; a 4-entry level-1 root.
    pub const LPAE_32: PageTableConfig = PageTableConfig {
        va_bits: 32,
        oa_bits: 40,
        leaf_flags: LeafFlags {
            non_global: false,
            unprivileged: false,
            lpae_xn: true,
        },
    };
    /// SMMUv3 stage 1 with a 39-bit IOVA (CD.T0SZ=25), ASID-tagged, unprivileged-accessible leaves.
    /// Lower `oa_bits` to the CD's IPS if the SMMU reports fewer than 48 output bits.
    pub const SMMU_39: PageTableConfig = PageTableConfig {
        va_bits: 39,
        oa_bits: 48,
        leaf_flags: LeafFlags {
            lpae_xn: false,
            non_global: true,
            unprivileged: true,
        },
    };

    /// The level the walk starts at, or `None` if `va_bits` or `oa_bits` is unsupported (VA 25..=48
    /// bits, PA 32..=48 bits).
    pub const fn start_level(&self) -> Option<u8> {
        if self.oa_bits < 32 || self.oa_bits > MAX_OA_BITS {
            return None;
        }
        match self.va_bits {
            40..=48 => Some(0),
            31..=39 => Some(1),
            25..=30 => Some(2),
            _ => None,
        }
    }
}

/// Why a page-table operation failed. Every failing operation leaves the tables unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageTableError {
    /// See [`PageTableConfig::start_level`].
    BadConfig { va_bits: u8, oa_bits: u8 },
    /// The virtual address, physical address or size is not a multiple of 4 KiB.
    Misaligned {
        va: u64,
        pa: Option<PhysAddr>,
        size: u64,
    },
    /// The range does not fit the input address space.
    VaOutOfRange { va: u64, size: u64, va_bits: u8 },
    /// The physical range does not fit the output address size.
    PaOutOfRange {
        pa: PhysAddr,
        size: u64,
        oa_bits: u8,
    },
    /// `map` found this address (the first one in the range) already mapped.
    AlreadyMapped { va: u64 },
    /// `set_attributes` found this address (the first one in the range) unmapped.
    NotMapped { va: u64 },
    /// The allocator ran out of table pages.
    OutOfTableMemory,
    /// The allocator returned a page that is misaligned or beyond the output address size.
    TablePageUnusable(PhysAddr),
    /// The requested attributes cannot be encoded.
    Descriptor(DescriptorError),
}

impl From<DescriptorError> for PageTableError {
    fn from(e: DescriptorError) -> Self {
        PageTableError::Descriptor(e)
    }
}

impl fmt::Display for PageTableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PageTableError::BadConfig { va_bits, oa_bits } => write!(
                f,
                "unsupported translation regime: {va_bits}-bit input, {oa_bits}-bit output \
                 (supported: 25..=48 and 32..=48 bits)"
            ),
            PageTableError::Misaligned {
                va,
                pa: Some(pa),
                size,
            } => {
                write!(
                    f,
                    "va {va:#x}, pa {pa}, size {size:#x}: not all 4 KiB aligned"
                )
            }
            PageTableError::Misaligned { va, pa: None, size } => {
                write!(f, "va {va:#x}, size {size:#x}: not both 4 KiB aligned")
            }
            PageTableError::VaOutOfRange { va, size, va_bits } => {
                write!(
                    f,
                    "va {va:#x} + {size:#x} exceeds the {va_bits}-bit input address space"
                )
            }
            PageTableError::PaOutOfRange { pa, size, oa_bits } => {
                write!(
                    f,
                    "pa {pa} + {size:#x} exceeds the {oa_bits}-bit output address size"
                )
            }
            PageTableError::AlreadyMapped { va } => {
                write!(
                    f,
                    "va {va:#x} is already mapped; unmap it before mapping again"
                )
            }
            PageTableError::NotMapped { va } => write!(f, "va {va:#x} is not mapped"),
            PageTableError::OutOfTableMemory => write!(f, "out of memory for translation tables"),
            PageTableError::TablePageUnusable(pa) => write!(
                f,
                "table allocator returned page {pa}, which is misaligned or beyond the output \
                 address size"
            ),
            PageTableError::Descriptor(e) => write!(f, "{e}"),
        }
    }
}

/// Result of a software walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Physical address of the byte at the translated virtual address.
    pub pa: PhysAddr,
    pub attr: MemAttr,
    pub perms: Perms,
    pub flags: LeafFlags,
    /// Level of the leaf: 1 (1 GiB block), 2 (2 MiB block) or 3 (4 KiB page).
    pub level: u8,
}

/// What `unmap` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnmapResult {
    /// Bytes of the range that were mapped before the call (holes in the range are skipped).
    pub unmapped: u64,
}

/// Contents of a table tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingStats {
    /// Table pages, the root included.
    pub tables: usize,
    /// Leaves per level: `leaves[1]` 1 GiB blocks, `leaves[2]` 2 MiB blocks, `leaves[3]` pages.
    pub leaves: [u64; 4],
}

impl MappingStats {
    /// Total bytes mapped.
    pub fn mapped_bytes(&self) -> u64 {
        (1..=LAST_LEVEL)
            .map(|l| self.leaves[l as usize] * level_size(l))
            .sum()
    }
}

/// Where a descriptor leads the walk; the structure only, without decoding attributes.
enum Kind {
    Invalid,
    Table(PhysAddr),
    Leaf,
}

/// `level` <= 3. Reserved encodings (a block at level 0, 0b01 at level 3) are invalid.
// Every walk calls this per level, and the release profile's opt-level "z" would keep it a call.
#[inline(always)]
fn kind(desc: u64, level: u8) -> Kind {
    match (desc & DESC_TYPE_MASK, level) {
        (0b11, LAST_LEVEL) | (0b01, 1 | 2) => Kind::Leaf,
        (0b11, _) => Kind::Table(PhysAddr::new(desc & OA_MASK)),
        _ => Kind::Invalid,
    }
}

// The leaf loops of the usual streaming map and unmap, over last-level entries several at a time:
// with a 1 MiB buffer they are most of the work. Each is one asm block on aarch64, where the
// size-optimised build would otherwise keep a loop of single loads and stores (and the machine
// outliner may turn its body into calls); elsewhere the callers' own loops do the work. A page
// leaf is an entry with both type bits set (`kind` at the last level). Each entry is read and
// written with one 64-bit access, as `read` and `write` do.

/// How many of the `quads` groups of four entries from `entries` are all zero (no mapping at
/// all), counted from the start up to the first group that is not. The caller checks the rest
/// entry by entry.
///
/// # Safety
/// `entries .. entries + 4 * quads` are entries of a table page the caller may read.
#[inline(always)]
unsafe fn zero_quads(entries: *const u64, quads: usize) -> usize {
    #[cfg(target_arch = "aarch64")]
    {
        let left: usize;
        // SAFETY: reads of the entries the caller vouches for. Not `readonly`/`nomem`: the
        // entries are shared with a walker, so the loads must happen here, in order.
        unsafe {
            core::arch::asm!(
                "cbz {n}, 3f",
                "2:",
                "ldp {a}, {b}, [{p}]",
                "ldp {c}, {d}, [{p}, #16]",
                "orr {a}, {a}, {b}",
                "orr {c}, {c}, {d}",
                "orr {a}, {a}, {c}",
                "cbnz {a}, 3f",
                "add {p}, {p}, #32",
                "subs {n}, {n}, #1",
                "b.ne 2b",
                "3:",
                p = inout(reg) entries => _,
                n = inout(reg) quads => left,
                a = out(reg) _,
                b = out(reg) _,
                c = out(reg) _,
                d = out(reg) _,
                options(nostack)
            )
        };
        quads - left
    }
    // Elsewhere the caller's entry-by-entry check does all of it.
    #[cfg(not(target_arch = "aarch64"))]
    {
        let _ = (entries, quads);
        0
    }
}

/// Writes `count` page descriptors from `entries`: `desc`, then `desc` plus one page for each
/// next entry.
///
/// # Safety
/// `entries .. entries + count` are entries of a table page the caller may write, in a table
/// nothing else edits meanwhile.
#[inline(always)]
unsafe fn write_page_run(entries: *mut u64, count: usize, desc: u64) {
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: 64-bit stores to the entries the caller vouches for, two per `stp` (each
        // register's store is single-copy atomic, so a walker sees an entry old or new, never
        // torn), then the odd last one. Not `nomem`: the compiler must not move other table
        // accesses across them.
        unsafe {
            core::arch::asm!(
                "lsr {n}, {count}, #1",
                "cbz {n}, 3f",
                "add {b}, {a}, #4096",
                "2:",
                "stp {a}, {b}, [{p}], #16",
                "add {a}, {a}, #8192",
                "add {b}, {b}, #8192",
                "subs {n}, {n}, #1",
                "b.ne 2b",
                "3:",
                "tbz {count}, #0, 4f",
                "str {a}, [{p}]",
                "4:",
                p = inout(reg) entries => _,
                count = in(reg) count,
                a = inout(reg) desc => _,
                n = out(reg) _,
                b = out(reg) _,
                options(nostack)
            )
        };
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        let mut desc = desc;
        for i in 0..count {
            // SAFETY: as the caller vouches.
            unsafe { entries.add(i).write_volatile(desc) };
            desc += PAGE_SIZE;
        }
    }
}

/// Clears groups of four page leaves from `entries` (writes them 0), up to `quads` groups,
/// stopping at the first group that is not four page leaves; returns how many groups it cleared.
///
/// # Safety
/// `entries .. entries + 4 * quads` are entries of a table page the caller may write, in a table
/// nothing else edits meanwhile.
#[inline(always)]
unsafe fn clear_page_quads(entries: *mut u64, quads: usize) -> usize {
    #[cfg(target_arch = "aarch64")]
    {
        let left: usize;
        // SAFETY: reads and 64-bit stores of the entries the caller vouches for (each
        // register's store single-copy atomic). Not `nomem`, as above. Both type bits set in
        // all four entries: bit 0 of the AND of the four, ANDed with its own bit 1.
        unsafe {
            core::arch::asm!(
                "cbz {n}, 3f",
                "2:",
                "ldp {a}, {b}, [{p}]",
                "ldp {c}, {d}, [{p}, #16]",
                "and {a}, {a}, {b}",
                "and {c}, {c}, {d}",
                "and {a}, {a}, {c}",
                "and {a}, {a}, {a}, lsr #1",
                "tbz {a}, #0, 3f",
                "stp xzr, xzr, [{p}]",
                "stp xzr, xzr, [{p}, #16]",
                "add {p}, {p}, #32",
                "subs {n}, {n}, #1",
                "b.ne 2b",
                "3:",
                p = inout(reg) entries => _,
                n = inout(reg) quads => left,
                a = out(reg) _,
                b = out(reg) _,
                c = out(reg) _,
                d = out(reg) _,
                options(nostack)
            )
        };
        quads - left
    }
    // Elsewhere the caller's entry-by-entry loop does all of it.
    #[cfg(not(target_arch = "aarch64"))]
    {
        let _ = (entries, quads);
        0
    }
}

/// Table pages allocated before an edit starts, chained through their entry 0 (they are unreachable
/// by any walker until linked into the tree). A link word is the next page's address with bit 0
/// set; 0 ends the chain.
struct Stash {
    head: Option<PhysAddr>,
}

/// Whether a recursive edit only validates and counts the table pages it will need, or performs the
/// edit with pages from the stash. Both passes run the same code, so the count is exact.
struct Pass {
    stash: Option<Stash>,
    needed: usize,
}

impl Pass {
    fn counting() -> Pass {
        Pass {
            stash: None,
            needed: 0,
        }
    }
    fn applying(stash: Stash) -> Pass {
        Pass {
            stash: Some(stash),
            needed: 0,
        }
    }
    fn is_apply(&self) -> bool {
        self.stash.is_some()
    }
}

/// How many detached table trees are held before a sync lets them be freed.
const DEFERRED_FREES: usize = 16;
/// How many break-before-make replacements are batched under one sync.
const BBM_BATCH: usize = 16;

/// TLB bookkeeping of one edit: coalesces adjacent invalidations, remembers whether a sync is owed,
/// and holds detached tables until a sync makes them unreachable for the walker.
struct Maint<'t, T: TlbOps> {
    tlb: &'t mut T,
    pending: Option<TlbInvalidation>,
    unsynced: bool,
    deferred: [(PhysAddr, u8); DEFERRED_FREES],
    deferred_len: usize,
}

impl<'t, T: TlbOps> Maint<'t, T> {
    fn new(tlb: &'t mut T) -> Self {
        Maint {
            tlb,
            pending: None,
            unsynced: false,
            deferred: [(PhysAddr::new(0), 0); DEFERRED_FREES],
            deferred_len: 0,
        }
    }

    fn invalidate(&mut self, inv: TlbInvalidation) {
        self.unsynced = true;
        if let Some(p) = &mut self.pending {
            if p.granule == inv.granule && p.leaf_only == inv.leaf_only && p.va + p.size == inv.va {
                p.size += inv.size;
                return;
            }
        }
        if let Some(p) = self.pending.replace(inv) {
            self.tlb.invalidate(p);
        }
    }
}

/// The progress of `unmap_keep_tables`: the bytes unmapped, the leaf invalidations (adjacent ones
/// of the same granule merged into one request) and whether a sync is owed.
struct LeafUnmap {
    pending: Option<TlbInvalidation>,
    issued: bool,
    unmapped: u64,
}

impl LeafUnmap {
    fn add<T: TlbOps>(&mut self, inv: TlbInvalidation, tlb: &mut T) {
        self.issued = true;
        if let Some(p) = &mut self.pending {
            if p.granule == inv.granule && p.va + p.size == inv.va {
                p.size += inv.size;
                return;
            }
        }
        if let Some(p) = self.pending.replace(inv) {
            tlb.invalidate(p);
        }
    }
}

/// Entries broken (written invalid) whose replacements are written after the next sync.
struct BbmBatch {
    entries: [(usize, u64); BBM_BATCH],
    len: usize,
}

/// A tree of long-descriptor translation tables.
///
/// Dropping a `PageTable` does not free its table pages, since a TTBR or an SMMU context descriptor
/// may still point at them; call [`PageTable::destroy`] once no walker can.
pub struct PageTable<A: TableAlloc> {
    alloc: A,
    root: PhysAddr,
    config: PageTableConfig,
    start_level: u8,
}

impl<A: TableAlloc> PageTable<A> {
    /// An empty table tree (one zeroed root page) for `config`.
    pub fn new(config: PageTableConfig, alloc: A) -> Result<Self, PageTableError> {
        let start_level = config.start_level().ok_or(PageTableError::BadConfig {
            va_bits: config.va_bits,
            oa_bits: config.oa_bits,
        })?;
        let mut pt = PageTable {
            alloc,
            root: PhysAddr::new(0),
            config,
            start_level,
        };
        pt.root = pt.alloc_checked()?;
        Ok(pt)
    }

    /// Physical address of the root table, for TTBR0 or the SMMU CD's TTB0.
    pub fn root_pa(&self) -> PhysAddr {
        self.root
    }

    pub fn config(&self) -> &PageTableConfig {
        &self.config
    }

    /// Level of the root table.
    pub fn start_level(&self) -> u8 {
        self.start_level
    }

    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// Maps `[va, va + size)` to `[pa, pa + size)` with the largest leaves that the alignment of
    /// both addresses and the remaining size allow (1 GiB and 2 MiB blocks, 4 KiB pages).
    ///
    /// Refuses to touch an existing mapping: if any page of the range is mapped, fails with
    /// `AlreadyMapped` and changes nothing. Needs no TLB maintenance (only invalid entries are
    /// replaced), but see the module documentation for the barrier the caller issues afterwards.
    /// A zero `size` does nothing.
    pub fn map(
        &mut self,
        va: u64,
        pa: PhysAddr,
        size: u64,
        attr: MemAttr,
        perms: Perms,
    ) -> Result<(), PageTableError> {
        let template = leaf_attr_bits(attr, perms, self.config.leaf_flags)?;
        let end = self.check_range(va, size, Some(pa))?;
        // The common case of streaming DMA and vmap: pages inside one 2 MiB slot (no block fits)
        // whose last-level table exists. No table page is needed, so no counting pass either.
        let block = level_size(2);
        if size != 0 && size < block && align_down(va, block) == align_down(end - 1, block) {
            if let (LAST_LEVEL, false, table) = self.walk_to(va) {
                return self.map_pages(table, va, end, pa.as_u64(), template);
            }
        }
        let mut pass = Pass::counting();
        self.map_range(
            Some(self.root),
            self.start_level,
            va,
            end,
            pa.as_u64(),
            template,
            &mut pass,
        )?;
        let mut pass = Pass::applying(self.prealloc(pass.needed)?);
        let result = self.map_range(
            Some(self.root),
            self.start_level,
            va,
            end,
            pa.as_u64(),
            template,
            &mut pass,
        );
        self.release(pass.stash);
        result
    }

    /// Unmaps whatever is mapped in `[va, va + size)`; unmapped holes are skipped. A block only
    /// partly inside the range is replaced, break-before-make, by a table mapping the part outside.
    /// Tables left empty are freed once their removal has been invalidated and synced.
    ///
    /// All TLB maintenance goes through `tlb`; when this returns (Ok or Err) every invalidation it
    /// issued has been synced, so the virtual range and the formerly mapped memory may be reused.
    /// Fails only when a block split needs table pages the allocator cannot supply; then nothing
    /// has changed.
    pub fn unmap<T: TlbOps>(
        &mut self,
        va: u64,
        size: u64,
        tlb: &mut T,
    ) -> Result<UnmapResult, PageTableError> {
        let end = self.check_range(va, size, None)?;
        let mut unmapped = 0;
        self.edit(va, end, Change::Unmap, tlb, &mut unmapped)?;
        Ok(UnmapResult { unmapped })
    }

    /// Unmaps whatever is mapped in `[va, va + size)` like [`PageTable::unmap`], but frees no
    /// table: tables left empty stay in the tree for the next mapping of the range, as Linux keeps
    /// the page tables of its vmalloc area. For a range that is mapped and unmapped over and over
    /// (the vmap window) this saves allocating, zeroing and freeing a table page each time, and
    /// scanning the table for emptiness at every unmap.
    ///
    /// Only leaf entries are written, each invalidated leaf-only through `tlb`, adjacent ones
    /// merged; when this returns every invalidation has been synced. A block only partly inside
    /// the range is first split as [`PageTable::split_to_pages`] does (same translations, pages
    /// where the range cuts it), which may need table pages: without them this fails with
    /// `OutOfTableMemory` and no translation has changed.
    pub fn unmap_keep_tables<T: TlbOps>(
        &mut self,
        va: u64,
        size: u64,
        tlb: &mut T,
    ) -> Result<UnmapResult, PageTableError> {
        let end = self.check_range(va, size, None)?;
        if size == 0 {
            return Ok(UnmapResult { unmapped: 0 });
        }
        let last = end - PAGE_SIZE;
        let mut leaves = LeafUnmap { pending: None, issued: false, unmapped: 0 };
        let (level, leaf, table) = self.walk_to(va);
        if level == LAST_LEVEL && align_down(va, level_size(2)) == align_down(last, level_size(2)) {
            // The usual small range: all in the last-level table the walk reached, pages only.
            self.clear_pages(table, va, end, &mut leaves, tlb);
        } else {
            // Only the blocks holding the range's first and last pages can reach outside it.
            let outside = |page: u64, level: u8| {
                let slot = align_down(page, level_size(level));
                slot < va || slot + level_size(level) > end
            };
            if leaf && outside(va, level) {
                self.split_to_pages(va, PAGE_SIZE, tlb)?;
            }
            let (level, leaf, _) = self.walk_to(last);
            if leaf && outside(last, level) {
                self.split_to_pages(last, PAGE_SIZE, tlb)?;
            }
            self.clear_leaves(self.root, self.start_level, va, end, &mut leaves, tlb);
        }
        if let Some(inv) = leaves.pending {
            tlb.invalidate(inv);
        }
        if leaves.issued {
            tlb.sync();
        }
        Ok(UnmapResult { unmapped: leaves.unmapped })
    }

    /// The walk of `translate` for `va` (inside the input address space), without decoding: the
    /// level where it stops, whether it stops at a leaf (else at an invalid entry), and the table
    /// holding that entry.
    #[inline(always)]
    fn walk_to(&self, va: u64) -> (u8, bool, PhysAddr) {
        let mut table = self.root;
        let mut level = self.start_level;
        loop {
            match kind(self.read(table, table_index(va, level)), level) {
                Kind::Table(next) if level < LAST_LEVEL => {
                    table = next;
                    level += 1;
                }
                Kind::Leaf => return (level, true, table),
                _ => return (level, false, table),
            }
        }
    }

    /// Clears every leaf in `[va, end)` below `table` at `level`, all of which lie wholly inside
    /// the range (see `unmap_keep_tables`), and queues their invalidations.
    fn clear_leaves<T: TlbOps>(
        &mut self,
        table: PhysAddr,
        level: u8,
        va: u64,
        end: u64,
        leaves: &mut LeafUnmap,
        tlb: &mut T,
    ) {
        let size = level_size(level);
        let mut cur = va;
        while cur < end {
            let slot = align_down(cur, size);
            let chunk_end = end.min(slot + size);
            let index = table_index(cur, level);
            match kind(self.read(table, index), level) {
                Kind::Invalid => {}
                Kind::Table(child) => self.clear_leaves(child, level + 1, cur, chunk_end, leaves, tlb),
                Kind::Leaf => {
                    self.write(table, index, 0);
                    leaves.unmapped += size;
                    leaves.add(TlbInvalidation { va: slot, size, granule: size, leaf_only: true }, tlb);
                }
            }
            cur = chunk_end;
        }
    }

    /// [`PageTable::clear_leaves`] of `[va, end)` in the last-level table `table`: a tight loop
    /// over its page entries, one invalidation request per run of mapped pages.
    fn clear_pages<T: TlbOps>(&mut self, table: PhysAddr, va: u64, end: u64, leaves: &mut LeafUnmap, tlb: &mut T) {
        let first = table_index(va, LAST_LEVEL);
        let count = ((end - va) >> PAGE_SHIFT) as usize;
        // SAFETY (of the pointer arithmetic): the range lies in one last-level table, so
        // first + count <= 512 entries of the table's page.
        let entries = self.alloc.table_ptr(table).wrapping_add(first);
        let page_va = |i: usize| va + ((i as u64) << PAGE_SHIFT);
        // The usual unmap clears a fully mapped range: its leading groups of four pages go in one
        // tight loop, and the loop below goes on from where they end.
        // SAFETY: as in `read` and `write`: `count` entries of a table page from `entries`.
        let cleared = unsafe { clear_page_quads(entries, count / 4) } * 4;
        // Start of the run of mapped pages being cleared.
        let mut run: Option<usize> = (cleared > 0).then_some(0);
        // Up to `count` inclusive: the step past the last page ends the last run.
        let mut i = cleared;
        while i <= count {
            let mapped = i < count && {
                // SAFETY: as above.
                let desc = unsafe { entries.add(i).read_volatile() };
                matches!(kind(desc, LAST_LEVEL), Kind::Leaf)
            };
            if mapped {
                // SAFETY: as above; one 64-bit store, as in `write`.
                unsafe { entries.add(i).write_volatile(0) };
                run.get_or_insert(i);
            } else if let Some(start) = run.take() {
                let size = page_va(i) - page_va(start);
                leaves.unmapped += size;
                leaves.add(TlbInvalidation { va: page_va(start), size, granule: PAGE_SIZE, leaf_only: true }, tlb);
            }
            i += 1;
        }
    }

    /// Changes the memory type and permissions of every page in `[va, va + size)`, which must be
    /// mapped entirely (else `NotMapped`, nothing changed). Each changed leaf is replaced
    /// break-before-make: written invalid, invalidated through `tlb`, synced, then written with the
    /// new attributes. A block only partly inside the range is split first (in the same
    /// replacement). Leaves that already have the requested attributes are left alone. A zero
    /// `size` does nothing.
    pub fn set_attributes<T: TlbOps>(
        &mut self,
        va: u64,
        size: u64,
        attr: MemAttr,
        perms: Perms,
        tlb: &mut T,
    ) -> Result<(), PageTableError> {
        let template = leaf_attr_bits(attr, perms, self.config.leaf_flags)?;
        let end = self.check_range(va, size, None)?;
        let mut unmapped = 0;
        self.edit(va, end, Change::Set(template), tlb, &mut unmapped)
    }

    /// Remaps every block in `[va, va + size)` with 4 KiB pages of the same output addresses and
    /// attributes, so that later changes to single pages in the range need no block split (Linux's
    /// page-granular linear map for in-place attribute changes). Each block is replaced
    /// break-before-make by a table built off-line; a block only partly inside the range keeps its
    /// size outside it. Unmapped holes are skipped. Fails only when the allocator cannot supply the
    /// table pages; then nothing has changed.
    ///
    /// The caller must make sure nothing accesses the memory a replaced block maps (other than
    /// the range itself, which the caller owns) while its entry is invalid.
    pub fn split_to_pages<T: TlbOps>(&mut self, va: u64, size: u64, tlb: &mut T) -> Result<(), PageTableError> {
        let end = self.check_range(va, size, None)?;
        let mut unmapped = 0;
        self.edit(va, end, Change::Split, tlb, &mut unmapped)
    }

    /// The level of the leaf that maps `va` (1: 1 GiB block, 2: 2 MiB block, 3: page), without
    /// decoding it; `None` if `va` is unmapped or outside the input address space.
    pub fn leaf_level(&self, va: u64) -> Option<u8> {
        if va >> self.config.va_bits != 0 {
            return None;
        }
        let (level, leaf, _) = self.walk_to(va);
        leaf.then_some(level)
    }

    /// Walks the tables in software. `None` if `va` is unmapped or outside the input address space.
    pub fn translate(&self, va: u64) -> Option<Translation> {
        if va >> self.config.va_bits != 0 {
            return None;
        }
        let mut table = self.root;
        for level in self.start_level..=LAST_LEVEL {
            let desc = self.read(table, table_index(va, level));
            let leaf = match decode(desc, level).ok()? {
                Decoded::Invalid => return None,
                Decoded::Table(next) => {
                    table = next;
                    continue;
                }
                Decoded::Block(leaf) | Decoded::Page(leaf) => leaf,
            };
            let offset = va & (level_size(level) - 1);
            return Some(Translation {
                pa: PhysAddr::new(leaf.pa.as_u64() + offset),
                attr: leaf.attr,
                perms: leaf.perms,
                flags: LeafFlags { lpae_xn: self.config.leaf_flags.lpae_xn, ..leaf.flags },
                level,
            });
        }
        None
    }

    /// Counts tables and leaves per level.
    pub fn stats(&self) -> MappingStats {
        let mut stats = MappingStats::default();
        self.count(self.root, self.start_level, &mut stats);
        stats
    }

    /// Frees every table page, the root included, and returns the allocator.
    ///
    /// # Safety
    /// No walker may use these tables any more: no TTBR or SMMU context descriptor points at
    /// [`PageTable::root_pa`], and the TLBs and walk caches hold nothing derived from them.
    pub unsafe fn destroy(mut self) -> A {
        self.free_tree(self.root, self.start_level);
        self.alloc
    }

    #[inline(always)]
    fn read(&self, table: PhysAddr, index: usize) -> u64 {
        // SAFETY: `table` is a page of this allocator that is not freed (the tree, the stash and
        // the root only hold such pages) and `index` < 512, which the TableAlloc contract makes
        // valid.
        unsafe { self.alloc.table_ptr(table).add(index).read_volatile() }
    }

    /// Single 64-bit store, so a concurrent walker sees the old or the new descriptor, never a mix
    /// (aarch64 `str`; on armv7 with LPAE, `strd` of an aligned doubleword is single-copy atomic).
    #[inline(always)]
    fn write(&mut self, table: PhysAddr, index: usize, desc: u64) {
        // SAFETY: as in `read`.
        unsafe { self.alloc.table_ptr(table).add(index).write_volatile(desc) }
    }

    /// Validates a request; returns the end of the virtual range.
    #[inline(always)]
    fn check_range(&self, va: u64, size: u64, pa: Option<PhysAddr>) -> Result<u64, PageTableError> {
        let pa_misaligned = pa.is_some_and(|p| !p.is_page_aligned());
        if !va.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) || pa_misaligned {
            return Err(PageTableError::Misaligned { va, pa, size });
        }
        let va_bits = self.config.va_bits;
        let end = va
            .checked_add(size)
            .filter(|&end| end <= 1 << va_bits)
            .ok_or(PageTableError::VaOutOfRange { va, size, va_bits })?;
        if let Some(pa) = pa {
            let oa_bits = self.config.oa_bits;
            pa.checked_add(size)
                .filter(|end| end.as_u64() <= 1 << oa_bits)
                .ok_or(PageTableError::PaOutOfRange { pa, size, oa_bits })?;
        }
        Ok(end)
    }

    fn alloc_checked(&mut self) -> Result<PhysAddr, PageTableError> {
        let pa = self
            .alloc
            .alloc_table()
            .ok_or(PageTableError::OutOfTableMemory)?;
        if pa.is_page_aligned() && pa.as_u64() >> self.config.oa_bits == 0 {
            return Ok(pa);
        }
        // SAFETY: `pa` was just returned by alloc_table and is not referenced anywhere.
        unsafe { self.alloc.free_table(pa) };
        Err(PageTableError::TablePageUnusable(pa))
    }

    /// Allocates `n` table pages up front, or none at all.
    fn prealloc(&mut self, n: usize) -> Result<Stash, PageTableError> {
        let mut stash = Stash { head: None };
        for _ in 0..n {
            match self.alloc_checked() {
                Ok(pa) => {
                    let link = stash.head.map_or(0, |next| next.as_u64() | 1);
                    self.write(pa, 0, link);
                    stash.head = Some(pa);
                }
                Err(e) => {
                    self.release(Some(stash));
                    return Err(e);
                }
            }
        }
        Ok(stash)
    }

    /// Takes a zeroed page from the stash.
    fn stash_pop(&mut self, stash: &mut Stash) -> Option<PhysAddr> {
        let pa = stash.head?;
        let link = self.read(pa, 0);
        self.write(pa, 0, 0);
        stash.head = (link & 1 != 0).then(|| PhysAddr::new(link & !1));
        Some(pa)
    }

    /// Returns unused stash pages to the allocator.
    fn release(&mut self, stash: Option<Stash>) {
        let Some(mut stash) = stash else { return };
        while let Some(pa) = self.stash_pop(&mut stash) {
            // SAFETY: stash pages were never linked into the tree, so no walker can reach them.
            unsafe { self.alloc.free_table(pa) };
        }
    }

    /// A table page for the edit: counted in the counting pass (`None`), taken from the stash when
    /// applying.
    fn take_table(&mut self, pass: &mut Pass) -> Result<Option<PhysAddr>, PageTableError> {
        match pass.stash.as_mut() {
            None => {
                pass.needed += 1;
                Ok(None)
            }
            Some(stash) => self
                .stash_pop(stash)
                .map(Some)
                .ok_or(PageTableError::OutOfTableMemory),
        }
    }

    /// Maps `[va, end)` (to `pa` onwards) below `table` at `level`. `table` is `None` for a table
    /// the counting pass has not created: all its entries are invalid.
    #[allow(clippy::too_many_arguments)]
    fn map_range(
        &mut self,
        table: Option<PhysAddr>,
        level: u8,
        va: u64,
        end: u64,
        pa: u64,
        template: u64,
        pass: &mut Pass,
    ) -> Result<(), PageTableError> {
        let size = level_size(level);
        let apply = pass.is_apply();
        let mut cur = va;
        while cur < end {
            let slot = align_down(cur, size);
            let chunk_end = end.min(slot + size);
            let covers = cur == slot && chunk_end == slot + size;
            let out = pa + (cur - va);
            let index = table_index(cur, level);
            let desc = table.map_or(0, |t| self.read(t, index));
            match kind(desc, level) {
                Kind::Leaf => return Err(PageTableError::AlreadyMapped { va: cur }),
                Kind::Table(child) => {
                    self.map_range(Some(child), level + 1, cur, chunk_end, out, template, pass)?;
                }
                // Level 3 slots are pages and always fully covered, since the range is page
                // aligned.
                Kind::Invalid
                    if level == LAST_LEVEL || (level > 0 && covers && out.is_multiple_of(size)) =>
                {
                    if let (true, Some(t)) = (apply, table) {
                        self.write(t, index, template | out | leaf_type(level));
                    }
                }
                Kind::Invalid => {
                    let child = self.take_table(pass)?;
                    self.map_range(child, level + 1, cur, chunk_end, out, template, pass)?;
                    if let (true, Some(t), Some(child)) = (apply, table, child) {
                        self.write(t, index, table_desc(child));
                    }
                }
            }
            cur = chunk_end;
        }
        Ok(())
    }

    /// Runs an unmap or attribute change: a counting pass, table preallocation, the applying pass,
    /// and a final sync that also frees detached tables. The applying pass cannot fail: the
    /// counting pass validated the same walk over the same tables, and the stash holds exactly the
    /// pages it counted.
    fn edit<T: TlbOps>(
        &mut self,
        va: u64,
        end: u64,
        change: Change,
        tlb: &mut T,
        unmapped: &mut u64,
    ) -> Result<(), PageTableError> {
        let mut maint = Maint::new(tlb);
        let mut pass = Pass::counting();
        self.change_range(
            self.root,
            self.start_level,
            va,
            end,
            change,
            &mut pass,
            &mut maint,
            unmapped,
        )?;
        let mut pass = Pass::applying(self.prealloc(pass.needed)?);
        let result = self.change_range(
            self.root,
            self.start_level,
            va,
            end,
            change,
            &mut pass,
            &mut maint,
            unmapped,
        );
        self.sync_tlb(&mut maint);
        self.release(pass.stash);
        result
    }

    /// Maps the pages `[va, end)`, whose entries are all in the last-level table `table`, to `pa`
    /// onwards: refuses with `AlreadyMapped`, writing nothing, if any of them is mapped.
    fn map_pages(&mut self, table: PhysAddr, va: u64, end: u64, pa: u64, template: u64) -> Result<(), PageTableError> {
        let first = table_index(va, LAST_LEVEL);
        let count = ((end - va) >> PAGE_SHIFT) as usize;
        // SAFETY (of the pointer arithmetic): the range lies in one last-level table, so
        // first + count <= 512 entries of the table's page.
        let entries = self.alloc.table_ptr(table).wrapping_add(first);
        // SAFETY: as in `read`: `count` entries of a table page from `entries` (see above).
        let clean = unsafe { zero_quads(entries, count / 4) } * 4;
        for i in clean..count {
            // SAFETY: as above.
            let desc = unsafe { entries.add(i).read_volatile() };
            if matches!(kind(desc, LAST_LEVEL), Kind::Leaf) {
                return Err(PageTableError::AlreadyMapped { va: va + ((i as u64) << PAGE_SHIFT) });
            }
        }
        let desc = template | pa | leaf_type(LAST_LEVEL);
        // SAFETY: as above; one 64-bit store per entry, as in `write`.
        unsafe { write_page_run(entries, count, desc) };
        Ok(())
    }

    /// Unmaps or changes `[va, end)` below `table` at `level`.
    #[allow(clippy::too_many_arguments)]
    fn change_range<T: TlbOps>(
        &mut self,
        table: PhysAddr,
        level: u8,
        va: u64,
        end: u64,
        change: Change,
        pass: &mut Pass,
        maint: &mut Maint<'_, T>,
        unmapped: &mut u64,
    ) -> Result<(), PageTableError> {
        let size = level_size(level);
        let apply = pass.is_apply();
        let mut batch = BbmBatch {
            entries: [(0, 0); BBM_BATCH],
            len: 0,
        };
        let mut cur = va;
        while cur < end {
            let slot = align_down(cur, size);
            let chunk_end = end.min(slot + size);
            let covers = cur == slot && chunk_end == slot + size;
            let index = table_index(cur, level);
            let desc = self.read(table, index);
            let leaf_inv = TlbInvalidation {
                va: slot,
                size,
                granule: size,
                leaf_only: true,
            };
            match (kind(desc, level), change) {
                (Kind::Invalid, Change::Unmap | Change::Split) => {}
                (Kind::Invalid, Change::Set(_)) => {
                    return Err(PageTableError::NotMapped { va: cur })
                }
                (Kind::Table(child), Change::Unmap) if covers => {
                    if apply {
                        let (bytes, granule) = self.subtree_summary(child, level + 1, size);
                        self.write(table, index, 0);
                        maint.invalidate(TlbInvalidation {
                            va: slot,
                            size,
                            granule,
                            leaf_only: false,
                        });
                        *unmapped += bytes;
                        self.defer_free(maint, child, level + 1);
                    }
                }
                (Kind::Table(child), _) => {
                    self.change_range(
                        child,
                        level + 1,
                        cur,
                        chunk_end,
                        change,
                        pass,
                        maint,
                        unmapped,
                    )?;
                    if apply && matches!(change, Change::Unmap) && self.table_is_empty(child) {
                        // Its leaves were invalidated one by one; this drops the walk-cache entry.
                        self.write(table, index, 0);
                        maint.invalidate(TlbInvalidation {
                            va: slot,
                            size,
                            granule: size,
                            leaf_only: false,
                        });
                        self.defer_free(maint, child, level + 1);
                    }
                }
                (Kind::Leaf, Change::Unmap) if covers => {
                    if apply {
                        self.write(table, index, 0);
                        maint.invalidate(leaf_inv);
                        *unmapped += size;
                    }
                }
                (Kind::Leaf, Change::Unmap) => {
                    let old = desc & LEAF_ATTR_MASK;
                    let block_pa = desc & OA_MASK & !(size - 1);
                    let split = self.build_split(
                        pass,
                        level + 1,
                        slot,
                        block_pa,
                        old,
                        cur,
                        chunk_end,
                        Fill::Unmap,
                    )?;
                    if let Some(split) = split {
                        self.write(table, index, 0);
                        maint.invalidate(leaf_inv);
                        self.sync_tlb(maint);
                        self.write(table, index, table_desc(split));
                        *unmapped += chunk_end - cur;
                    }
                }
                (Kind::Leaf, Change::Split) if level == LAST_LEVEL => {}
                (Kind::Leaf, Change::Split) => {
                    let old = desc & LEAF_ATTR_MASK;
                    let block_pa = desc & OA_MASK & !(size - 1);
                    let split = self.build_split(pass, level + 1, slot, block_pa, old, cur, chunk_end, Fill::Pages)?;
                    if let Some(split) = split {
                        self.write(table, index, 0);
                        maint.invalidate(leaf_inv);
                        batch.entries[batch.len] = (index, table_desc(split));
                        batch.len += 1;
                        if batch.len == BBM_BATCH {
                            self.complete_batch(table, &mut batch, maint);
                        }
                    }
                }
                (Kind::Leaf, Change::Set(template)) => {
                    let old = desc & LEAF_ATTR_MASK;
                    if old != template {
                        let new = if covers {
                            (desc & !LEAF_ATTR_MASK) | template
                        } else {
                            let block_pa = desc & OA_MASK & !(size - 1);
                            let split = self.build_split(
                                pass,
                                level + 1,
                                slot,
                                block_pa,
                                old,
                                cur,
                                chunk_end,
                                Fill::Attr(template),
                            )?;
                            split.map_or(0, table_desc)
                        };
                        if apply {
                            self.write(table, index, 0);
                            maint.invalidate(leaf_inv);
                            batch.entries[batch.len] = (index, new);
                            batch.len += 1;
                            if batch.len == BBM_BATCH {
                                self.complete_batch(table, &mut batch, maint);
                            }
                        }
                    }
                }
            }
            cur = chunk_end;
        }
        self.complete_batch(table, &mut batch, maint);
        Ok(())
    }

    /// Builds, off-line, a level-`level` table that maps the block at `base_va` → `base_pa` with
    /// attribute bits `old`, except for `[a, b)`, which is filled as `fill` says. Sub-blocks only
    /// partly inside `[a, b)` get their own tables. Returns the table (`None` in the counting
    /// pass).
    #[allow(clippy::too_many_arguments)]
    fn build_split(
        &mut self,
        pass: &mut Pass,
        level: u8,
        base_va: u64,
        base_pa: u64,
        old: u64,
        a: u64,
        b: u64,
        fill: Fill,
    ) -> Result<Option<PhysAddr>, PageTableError> {
        let table = self.take_table(pass)?;
        let size = level_size(level);
        for index in 0..ENTRIES_PER_TABLE {
            let start = base_va + index as u64 * size;
            let end = start + size;
            let pa = base_pa + index as u64 * size;
            // A level-3 entry cannot be partly inside [a, b): both ends are page aligned.
            let desc = if end <= a || start >= b {
                old | pa | leaf_type(level)
            } else if level == LAST_LEVEL || (a <= start && end <= b && !matches!(fill, Fill::Pages)) {
                match fill {
                    Fill::Unmap => 0,
                    Fill::Attr(bits) => bits | pa | leaf_type(level),
                    Fill::Pages => old | pa | leaf_type(level),
                }
            } else {
                self.build_split(pass, level + 1, start, pa, old, a, b, fill)?
                    .map_or(0, table_desc)
            };
            if let Some(t) = table {
                self.write(t, index, desc);
            }
        }
        Ok(table)
    }

    /// Syncs the batch's invalidations, then writes the replacement entries.
    fn complete_batch<T: TlbOps>(
        &mut self,
        table: PhysAddr,
        batch: &mut BbmBatch,
        maint: &mut Maint<'_, T>,
    ) {
        if batch.len == 0 {
            return;
        }
        self.sync_tlb(maint);
        for &(index, desc) in &batch.entries[..batch.len] {
            self.write(table, index, desc);
        }
        batch.len = 0;
    }

    /// Issues the coalesced invalidation, syncs, and frees tables detached before the sync.
    fn sync_tlb<T: TlbOps>(&mut self, maint: &mut Maint<'_, T>) {
        if let Some(p) = maint.pending.take() {
            maint.tlb.invalidate(p);
        }
        if maint.unsynced || maint.deferred_len > 0 {
            maint.tlb.sync();
            maint.unsynced = false;
        }
        for i in 0..maint.deferred_len {
            let (pa, level) = maint.deferred[i];
            self.free_tree(pa, level);
        }
        maint.deferred_len = 0;
    }

    /// Queues a detached table tree for freeing after the next sync.
    fn defer_free<T: TlbOps>(&mut self, maint: &mut Maint<'_, T>, table: PhysAddr, level: u8) {
        if maint.deferred_len == DEFERRED_FREES {
            self.sync_tlb(maint);
        }
        maint.deferred[maint.deferred_len] = (table, level);
        maint.deferred_len += 1;
    }

    /// Frees `table` (at `level`) and every table below it. Callers guarantee no walker can reach
    /// it.
    fn free_tree(&mut self, table: PhysAddr, level: u8) {
        for index in 0..ENTRIES_PER_TABLE {
            if let Kind::Table(child) = kind(self.read(table, index), level) {
                self.free_tree(child, level + 1);
            }
        }
        // SAFETY: the page came from alloc_table, is unreachable (see the callers), and each table
        // appears once in the tree, so it is freed once.
        unsafe { self.alloc.free_table(table) };
    }

    /// Bytes mapped below `table` and the smallest leaf size there (`initial` if there is none).
    fn subtree_summary(&self, table: PhysAddr, level: u8, initial: u64) -> (u64, u64) {
        let (mut bytes, mut granule) = (0, initial);
        for index in 0..ENTRIES_PER_TABLE {
            match kind(self.read(table, index), level) {
                Kind::Invalid => {}
                Kind::Leaf => {
                    bytes += level_size(level);
                    granule = granule.min(level_size(level));
                }
                Kind::Table(child) => {
                    let (b, g) = self.subtree_summary(child, level + 1, granule);
                    bytes += b;
                    granule = g;
                }
            }
        }
        (bytes, granule)
    }

    fn table_is_empty(&self, table: PhysAddr) -> bool {
        (0..ENTRIES_PER_TABLE).all(|index| self.read(table, index) & DESC_VALID == 0)
    }

    fn count(&self, table: PhysAddr, level: u8, stats: &mut MappingStats) {
        stats.tables += 1;
        for index in 0..ENTRIES_PER_TABLE {
            match kind(self.read(table, index), level) {
                Kind::Invalid => {}
                Kind::Leaf => stats.leaves[level as usize] += 1,
                Kind::Table(child) => self.count(child, level + 1, stats),
            }
        }
    }
}

/// The edits that may need break-before-make.
#[derive(Clone, Copy)]
enum Change {
    Unmap,
    /// New leaf attribute bits (see `leaf_attr_bits`).
    Set(u64),
    /// Blocks become tables of pages with the same attributes.
    Split,
}

/// What a block split puts in the part of the block inside the edited range.
#[derive(Clone, Copy)]
enum Fill {
    Unmap,
    /// Leaves with these attribute bits, as large as the range allows.
    Attr(u64),
    /// Pages with the block's own attribute bits.
    Pages,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::{Cell, RefCell};
    use std::collections::BTreeMap;
    use std::rc::Rc;

    const KIB4: u64 = 4 << 10;
    const MIB2: u64 = 2 << 20;
    const GIB: u64 = 1 << 30;
    /// Where the fake allocator's table pages live: away from the addresses the tests map.
    const TABLE_BASE: u64 = 0x10_0000_0000;
    /// Written over freed table pages: a table descriptor to an address no fake page has, so a walk
    /// through a freed table panics instead of reading stale entries.
    const POISON: u64 = 0x0000_dead_0000_0003;

    /// MAIR index of each attribute, written out independently of `MemAttr::mair_index`.
    fn hand_index(attr: MemAttr) -> u64 {
        match attr {
            MemAttr::Normal => 0,
            MemAttr::NormalNonCacheable => 1,
            MemAttr::WriteCombine => 2,
            MemAttr::Device => 3,
            MemAttr::DeviceStrict => 4,
        }
    }

    /// What the fake memory saw, in order: TLB hook calls and table frees.
    #[derive(Clone, Copy, Debug)]
    enum Ev {
        Inval(TlbInvalidation),
        Sync,
        Free(u64),
    }

    /// Table memory for host tests: boxed pages that are never dropped (pointers stay valid),
    /// reached through `Cell`s so the test can read them while the page table writes through raw
    /// pointers. It also records TLB events and checks the TableAlloc contract and free-after-sync.
    struct FakeMem {
        base: u64,
        pages: RefCell<Vec<Box<[Cell<u64>; ENTRIES_PER_TABLE]>>>,
        live: RefCell<Vec<bool>>,
        free_list: RefCell<Vec<usize>>,
        limit: Cell<usize>,
        unsynced: RefCell<Vec<TlbInvalidation>>,
        log: RefCell<Vec<Ev>>,
        errors: RefCell<Vec<String>>,
    }

    impl FakeMem {
        fn new(base: u64) -> Rc<FakeMem> {
            Rc::new(FakeMem {
                base,
                pages: RefCell::new(Vec::new()),
                live: RefCell::new(Vec::new()),
                free_list: RefCell::new(Vec::new()),
                limit: Cell::new(usize::MAX),
                unsynced: RefCell::new(Vec::new()),
                log: RefCell::new(Vec::new()),
                errors: RefCell::new(Vec::new()),
            })
        }

        fn slot(&self, pa: u64) -> usize {
            let i = pa.checked_sub(self.base).map(|off| (off / KIB4) as usize);
            match i {
                Some(i)
                    if pa.is_multiple_of(KIB4)
                        && i < self.live.borrow().len()
                        && self.live.borrow()[i] =>
                {
                    i
                }
                _ => panic!("access to {pa:#x}, which is not a live table page"),
            }
        }

        fn live_count(&self) -> usize {
            self.live.borrow().iter().filter(|&&l| l).count()
        }

        fn alloc(&self) -> Option<PhysAddr> {
            if self.live_count() >= self.limit.get() {
                return None;
            }
            let i = match self.free_list.borrow_mut().pop() {
                Some(i) => i,
                None => {
                    self.pages
                        .borrow_mut()
                        .push(Box::new(core::array::from_fn(|_| Cell::new(0))));
                    self.live.borrow_mut().push(false);
                    self.pages.borrow().len() - 1
                }
            };
            self.pages.borrow()[i].iter().for_each(|c| c.set(0));
            self.live.borrow_mut()[i] = true;
            Some(PhysAddr::new(self.base + i as u64 * KIB4))
        }

        fn free(&self, pa: PhysAddr) {
            let i = self.slot(pa.as_u64());
            if !self.unsynced.borrow().is_empty() {
                self.errors.borrow_mut().push(format!(
                    "table {pa} freed before its invalidation was synced"
                ));
            }
            self.pages.borrow()[i].iter().for_each(|c| c.set(POISON));
            self.live.borrow_mut()[i] = false;
            self.free_list.borrow_mut().push(i);
            self.log.borrow_mut().push(Ev::Free(pa.as_u64()));
        }

        fn ptr(&self, pa: PhysAddr) -> *mut u64 {
            let i = self.slot(pa.as_u64());
            let page: &[Cell<u64>; ENTRIES_PER_TABLE] = &self.pages.borrow()[i];
            (page as *const [Cell<u64>; ENTRIES_PER_TABLE])
                .cast::<u64>()
                .cast_mut()
        }

        fn read(&self, pa: u64, index: usize) -> u64 {
            self.pages.borrow()[self.slot(pa)][index].get()
        }

        fn take_log(&self) -> Vec<Ev> {
            core::mem::take(&mut *self.log.borrow_mut())
        }

        fn assert_no_errors(&self) {
            let errors = self.errors.borrow();
            assert!(errors.is_empty(), "{errors:#?}");
        }
    }

    struct FakeAlloc(Rc<FakeMem>);

    // SAFETY: pages are zeroed on allocation, 4 KiB apart from a 4 KiB-aligned base, never reused
    // while live, and their boxes are never dropped, so `ptr` stays valid for 512 entries; the
    // entries are Cells, which may be written through a pointer derived from a shared reference.
    unsafe impl TableAlloc for FakeAlloc {
        fn alloc_table(&mut self) -> Option<PhysAddr> {
            self.0.alloc()
        }
        unsafe fn free_table(&mut self, pa: PhysAddr) {
            self.0.free(pa)
        }
        fn table_ptr(&self, pa: PhysAddr) -> *mut u64 {
            self.0.ptr(pa)
        }
    }

    fn shift(level: u8) -> u32 {
        12 + 9 * (3 - level as u32)
    }

    /// The leaf a hardware walk would use for `va`, with the tables it passed through.
    #[derive(Clone, Debug, PartialEq)]
    struct RawLeaf {
        desc: u64,
        level: u8,
        path: Vec<u64>,
    }

    /// A walk written from the Arm ARM independently of the code under test.
    fn raw_walk(mem: &FakeMem, root: u64, start: u8, va: u64) -> Option<RawLeaf> {
        let mut table = root;
        let mut path = vec![root];
        for level in start..=3 {
            let desc = mem.read(table, ((va >> shift(level)) & 511) as usize);
            match (desc & 3, level) {
                (3, 3) | (1, 1 | 2) => return Some(RawLeaf { desc, level, path }),
                (3, _) => {
                    table = desc & 0xffff_ffff_f000;
                    path.push(table);
                }
                _ => return None,
            }
        }
        None
    }

    fn raw_pa(leaf: &RawLeaf, va: u64) -> u64 {
        let size = 1u64 << shift(leaf.level);
        (leaf.desc & 0xffff_ffff_f000 & !(size - 1)) | (va & (size - 1))
    }

    /// Whether any address of `[a, b)` translates (walking `table` at `level`).
    fn range_mapped(mem: &FakeMem, table: u64, level: u8, a: u64, b: u64) -> bool {
        let size = 1u64 << shift(level);
        let mut cur = a;
        while cur < b {
            let end = b.min((cur & !(size - 1)) + size);
            let desc = mem.read(table, ((cur >> shift(level)) & 511) as usize);
            let mapped = match (desc & 3, level) {
                (3, 3) | (1, 1 | 2) => true,
                (3, _) => range_mapped(mem, desc & 0xffff_ffff_f000, level + 1, cur, end),
                _ => false,
            };
            if mapped {
                return true;
            }
            cur = end;
        }
        false
    }

    /// Tables reachable from the root, and whether one of them (other than the root) is empty.
    fn reachable_tables(mem: &FakeMem, table: u64, level: u8, is_root: bool) -> (usize, bool) {
        let (mut count, mut empty_found) = (1, false);
        let mut any_valid = false;
        for i in 0..ENTRIES_PER_TABLE {
            let desc = mem.read(table, i);
            any_valid |= desc & 1 != 0;
            if level < 3 && desc & 3 == 3 {
                let (c, e) = reachable_tables(mem, desc & 0xffff_ffff_f000, level + 1, false);
                count += c;
                empty_found |= e;
            }
        }
        (count, empty_found || (!is_root && !any_valid))
    }

    /// TLB hooks that check break-before-make against the live tables at every call.
    struct Recorder {
        mem: Rc<FakeMem>,
        root: u64,
        start: u8,
    }

    impl Recorder {
        fn mapped(&self, inv: &TlbInvalidation) -> bool {
            range_mapped(&self.mem, self.root, self.start, inv.va, inv.va + inv.size)
        }
    }

    impl TlbOps for Recorder {
        fn invalidate(&mut self, inv: TlbInvalidation) {
            let mut errors = Vec::new();
            if inv.size == 0
                || !inv.va.is_multiple_of(inv.granule)
                || !inv.size.is_multiple_of(inv.granule)
            {
                errors.push(format!("malformed {inv:x?}"));
            }
            if self.mapped(&inv) {
                errors.push(format!("{inv:x?} issued while the range is still mapped"));
            }
            self.mem.errors.borrow_mut().extend(errors);
            self.mem.unsynced.borrow_mut().push(inv);
            self.mem.log.borrow_mut().push(Ev::Inval(inv));
        }
        fn sync(&mut self) {
            let unsynced = core::mem::take(&mut *self.mem.unsynced.borrow_mut());
            for inv in unsynced {
                if self.mapped(&inv) {
                    self.mem
                        .errors
                        .borrow_mut()
                        .push(format!("{inv:x?}: range remapped before the sync"));
                }
            }
            self.mem.log.borrow_mut().push(Ev::Sync);
        }
    }

    struct Fixture {
        mem: Rc<FakeMem>,
        pt: PageTable<FakeAlloc>,
        tlb: Recorder,
    }

    fn fixture(config: PageTableConfig) -> Fixture {
        let mem = FakeMem::new(TABLE_BASE);
        let pt = PageTable::new(config, FakeAlloc(mem.clone())).unwrap();
        let tlb = Recorder {
            mem: mem.clone(),
            root: pt.root_pa().as_u64(),
            start: pt.start_level(),
        };
        Fixture { mem, pt, tlb }
    }

    impl Fixture {
        fn raw(&self, va: u64) -> Option<RawLeaf> {
            raw_walk(&self.mem, self.tlb.root, self.tlb.start, va)
        }
        fn snapshot(&self, vas: &[u64]) -> Vec<(u64, Option<RawLeaf>)> {
            vas.iter().map(|&va| (va, self.raw(va))).collect()
        }
        /// Every sampled page whose leaf changed or went away must be covered by an invalidation
        /// with a granule no larger than the old leaf, and, if a table on its path was freed, by
        /// one that is not leaf-only; each followed by a sync.
        fn check_invalidated(
            &self,
            log: &[Ev],
            before: &[(u64, Option<RawLeaf>)],
        ) -> Result<(), String> {
            let freed: Vec<u64> = log
                .iter()
                .filter_map(|e| {
                    if let Ev::Free(pa) = e {
                        Some(*pa)
                    } else {
                        None
                    }
                })
                .collect();
            for (va, old) in before {
                let Some(old) = old else { continue };
                if self
                    .raw(*va)
                    .is_some_and(|new| new.desc == old.desc && new.level == old.level)
                {
                    continue;
                }
                let synced = |ok: &dyn Fn(&TlbInvalidation) -> bool| {
                    log.iter().enumerate().any(|(i, e)| {
                        let Ev::Inval(inv) = e else { return false };
                        let covers = inv.va <= *va && *va < inv.va + inv.size;
                        covers && ok(inv) && log[i + 1..].iter().any(|e| matches!(e, Ev::Sync))
                    })
                };
                let leaf_gone = synced(&|inv| inv.granule <= 1 << shift(old.level));
                let walk_cache = old.path[1..].iter().any(|t| freed.contains(t));
                if !leaf_gone || (walk_cache && !synced(&|inv| !inv.leaf_only)) {
                    return Err(format!(
                        "va {va:#x} changed from {old:x?} without a synced invalidation: {log:x?}"
                    ));
                }
            }
            Ok(())
        }
        fn stats(&self) -> MappingStats {
            self.pt.stats()
        }
    }

    #[test]
    fn mair_matches_hand_encoding() {
        // Attr0 0xff normal WB, Attr1/2 0x44 normal NC, Attr3 0x04 nGnRE, Attr4 0x00 nGnRnE.
        assert_eq!(MAIR_VALUE, 0x0000_0000_0444_44ff);
        assert_eq!(MAIR0_VALUE, 0x0444_44ff);
        assert_eq!(MAIR1_VALUE, 0);
        for attr in MemAttr::ALL {
            assert_eq!(attr.mair_index() as u64, hand_index(attr));
            assert_eq!(MemAttr::from_mair_index(attr.mair_index()), Some(attr));
        }
        assert_eq!(MemAttr::from_mair_index(5), None);
    }

    #[test]
    fn descriptors_match_hand_computed_values() {
        let global = LeafFlags::default();
        // 2 MiB block, normal RW XN, AttrIndx 0: type 0b01, SH 0b11 << 8, AF 1 << 10, PXN, UXN.
        let d = encode_leaf(
            PhysAddr::new(0x4020_0000),
            2,
            MemAttr::Normal,
            Perms::RW,
            global,
        )
        .unwrap();
        assert_eq!(d, 0x0060_0000_4020_0701);
        // Page, Device-nGnRE RO nG: type 0b11, AttrIndx 3 (0xc), AP[2] 0x80, SH, AF, nG 0x800.
        let flags = LeafFlags {
            lpae_xn: false,
            non_global: true,
            unprivileged: false,
        };
        let d = encode_leaf(
            PhysAddr::new(0x9000_0000),
            3,
            MemAttr::Device,
            Perms::RO,
            flags,
        )
        .unwrap();
        assert_eq!(d, 0x0060_0000_9000_0f8f);
        // Page above 4 GiB (LPAE), normal RX: AP[2], only UXN set.
        let d = encode_leaf(
            PhysAddr::new(0x8_0000_1000),
            3,
            MemAttr::Normal,
            Perms::RX,
            global,
        )
        .unwrap();
        assert_eq!(d, 0x0040_0008_0000_1783);
        // SMMU style: unprivileged (AP[1] 0x40) and nG, normal RW.
        let smmu = LeafFlags {
            lpae_xn: false,
            non_global: true,
            unprivileged: true,
        };
        let d = encode_leaf(
            PhysAddr::new(0x4000_0000),
            3,
            MemAttr::Normal,
            Perms::RW,
            smmu,
        )
        .unwrap();
        assert_eq!(d, 0x0060_0000_4000_0f43);
        // Unprivileged executable: UXN clear, PXN set.
        let d = encode_leaf(
            PhysAddr::new(0x4000_0000),
            3,
            MemAttr::Normal,
            Perms::RX,
            smmu,
        )
        .unwrap();
        assert_eq!(d, 0x0020_0000_4000_0fc3);
        // 1 GiB block, write-combine (AttrIndx 2 = 0x8) RW.
        let d = encode_leaf(
            PhysAddr::new(0x4000_0000),
            1,
            MemAttr::WriteCombine,
            Perms::RW,
            global,
        )
        .unwrap();
        assert_eq!(d, 0x0060_0000_4000_0709);
        // Strongly-ordered page: AttrIndx 4 = 0x10.
        let d = encode_leaf(
            PhysAddr::new(0x1000),
            3,
            MemAttr::DeviceStrict,
            Perms::RW,
            global,
        )
        .unwrap();
        assert_eq!(d, 0x0060_0000_0000_1713);
        assert_eq!(
            encode_table(PhysAddr::new(0x12_3456_7000)),
            Ok(0x12_3456_7003)
        );
    }

    #[test]
    fn encode_decode_round_trip() {
        let pa = PhysAddr::new(0x80_4000_0000);
        for attr in MemAttr::ALL {
            for perms in [
                Perms::RO,
                Perms::RW,
                Perms::RX,
                Perms {
                    read: true,
                    write: true,
                    exec: true,
                },
            ] {
                for level in 1..=3u8 {
                    for (non_global, unprivileged) in
                        [(false, false), (true, false), (false, true), (true, true)]
                    {
                        let flags = LeafFlags {
            lpae_xn: false,
                            non_global,
                            unprivileged,
                        };
                        let encoded = encode_leaf(pa, level, attr, perms, flags);
                        if attr.is_device() && perms.exec {
                            assert_eq!(encoded, Err(DescriptorError::ExecutableDevice));
                            continue;
                        }
                        let leaf = Leaf {
                            pa,
                            attr,
                            perms,
                            flags,
                        };
                        let expected = if level == 3 {
                            Decoded::Page(leaf)
                        } else {
                            Decoded::Block(leaf)
                        };
                        assert_eq!(decode(encoded.unwrap(), level), Ok(expected));
                    }
                }
            }
        }
        let table = encode_table(pa).unwrap();
        for level in 0..=2 {
            assert_eq!(decode(table, level), Ok(Decoded::Table(pa)));
        }
    }

    #[test]
    fn encode_rejects_what_the_format_cannot_hold() {
        let f = LeafFlags::default();
        let n = MemAttr::Normal;
        assert_eq!(
            encode_leaf(PhysAddr::new(0), 0, n, Perms::RW, f),
            Err(DescriptorError::NoLeafAtLevel(0))
        );
        assert_eq!(
            encode_leaf(PhysAddr::new(0), 4, n, Perms::RW, f),
            Err(DescriptorError::NoSuchLevel(4))
        );
        assert_eq!(
            encode_leaf(PhysAddr::new(0x4010_0000), 2, n, Perms::RW, f),
            Err(DescriptorError::Misaligned {
                pa: PhysAddr::new(0x4010_0000),
                align: MIB2
            })
        );
        assert_eq!(
            encode_leaf(PhysAddr::new(1 << 48), 3, n, Perms::RW, f),
            Err(DescriptorError::AddressTooWide(PhysAddr::new(1 << 48)))
        );
        let write_only = Perms {
            read: false,
            write: true,
            exec: false,
        };
        assert_eq!(
            encode_leaf(PhysAddr::new(0), 3, n, write_only, f),
            Err(DescriptorError::NotReadable)
        );
        assert!(encode_table(PhysAddr::new(0x1800)).is_err());
        assert!(encode_table(PhysAddr::new(1 << 48)).is_err());
    }

    #[test]
    fn decode_treats_reserved_encodings_as_invalid() {
        assert_eq!(decode(0, 3), Ok(Decoded::Invalid));
        assert_eq!(decode(0x0060_0000_4000_0701, 3), Ok(Decoded::Invalid)); // 0b01 at level 3
        assert_eq!(decode(0x0060_0080_0000_0701, 0), Ok(Decoded::Invalid)); // block at level 0
        assert_eq!(
            decode(0x4000_0003 | 5 << 2, 3),
            Err(DescriptorError::UnknownAttrIndex(5))
        );
        assert_eq!(decode(1, 4), Err(DescriptorError::NoSuchLevel(4)));
        // RES0 / nT bits below a block's size are not part of its address.
        match decode(0x0060_0000_4021_0701, 2) {
            Ok(Decoded::Block(leaf)) => assert_eq!(leaf.pa, PhysAddr::new(0x4020_0000)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn start_level_follows_va_bits() {
        assert_eq!(PageTableConfig::AARCH64_48.start_level(), Some(0));
        assert_eq!(PageTableConfig::AARCH64_39.start_level(), Some(1));
        assert_eq!(PageTableConfig::LPAE_32.start_level(), Some(1));
        assert_eq!(PageTableConfig::SMMU_39.start_level(), Some(1));
        let with = |va_bits, oa_bits| PageTableConfig {
            va_bits,
            oa_bits,
            leaf_flags: LeafFlags::default(),
        };
        assert_eq!(with(30, 40).start_level(), Some(2));
        for (va, oa) in [(24, 40), (49, 48), (39, 31), (39, 49)] {
            assert_eq!(with(va, oa).start_level(), None);
            let r = PageTable::new(with(va, oa), FakeAlloc(FakeMem::new(TABLE_BASE)));
            assert_eq!(
                r.err(),
                Some(PageTableError::BadConfig {
                    va_bits: va,
                    oa_bits: oa
                })
            );
        }
    }

    #[test]
    fn aligned_gib_is_one_level1_block() {
        for (config, tables) in [
            (PageTableConfig::AARCH64_39, 1),
            (PageTableConfig::AARCH64_48, 2),
        ] {
            let mut f = fixture(config);
            f.pt.map(
                0x4000_0000,
                PhysAddr::new(0x4000_0000),
                GIB,
                MemAttr::Normal,
                Perms::RW,
            )
            .unwrap();
            assert_eq!(
                f.stats(),
                MappingStats {
                    tables,
                    leaves: [0, 1, 0, 0]
                }
            );
            let raw = f.raw(0x4000_0000).unwrap();
            assert_eq!((raw.desc, raw.level), (0x0060_0000_4000_0701, 1));
            let t = f.pt.translate(0x7fff_1234).unwrap();
            assert_eq!(
                (t.pa, t.attr, t.perms, t.level),
                (PhysAddr::new(0x7fff_1234), MemAttr::Normal, Perms::RW, 1)
            );
            assert_eq!(f.pt.translate(0x8000_0000), None);
            assert_eq!(f.pt.translate(0x3fff_f000), None);
            assert_eq!(f.mem.live_count(), tables);
        }
    }

    #[test]
    fn map_uses_largest_leaves_alignment_allows() {
        let cases: [(u64, u64, u64, [u64; 4]); 4] = [
            // One page up to a 2 MiB boundary, then a block.
            (0x401f_f000, 0x801f_f000, MIB2 + KIB4, [0, 0, 1, 1]),
            // VA aligned but PA not: pages only.
            (0x4000_0000, 0x8000_1000, MIB2 + KIB4, [0, 0, 0, 513]),
            // Both aligned: a block and a page.
            (0x4000_0000, 0x8000_0000, MIB2 + KIB4, [0, 0, 1, 1]),
            // 2 MiB block up to a 1 GiB boundary, a 1 GiB block, a page.
            (0x3fe0_0000, 0x7fe0_0000, MIB2 + GIB + KIB4, [0, 1, 1, 1]),
        ];
        for (va, pa, size, leaves) in cases {
            let mut f = fixture(PageTableConfig::AARCH64_39);
            f.pt.map(
                va,
                PhysAddr::new(pa),
                size,
                MemAttr::NormalNonCacheable,
                Perms::RO,
            )
            .unwrap();
            assert_eq!(f.stats().leaves, leaves, "va {va:#x} pa {pa:#x}");
            assert_eq!(f.stats().tables, f.mem.live_count());
            for off in [0, KIB4, (size / 2) & !(KIB4 - 1), size - KIB4] {
                let t = f.pt.translate(va + off).unwrap();
                assert_eq!(t.pa, PhysAddr::new(pa + off));
                assert_eq!((t.attr, t.perms), (MemAttr::NormalNonCacheable, Perms::RO));
            }
            assert_eq!(f.pt.translate(va - KIB4), None);
            assert_eq!(f.pt.translate(va + size), None);
        }
        let mut f = fixture(PageTableConfig::AARCH64_39);
        f.pt.map(
            0x401f_f000,
            PhysAddr::new(0x801f_f000),
            MIB2 + KIB4,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        assert_eq!(f.pt.translate(0x401f_f000).unwrap().level, 3);
        assert_eq!(f.pt.translate(0x4020_0000).unwrap().level, 2);
        assert_eq!(f.pt.translate(0x403f_f000).unwrap().level, 2);
    }

    #[test]
    fn lpae_32_bit_regime() {
        let mut f = fixture(PageTableConfig::LPAE_32);
        // Top GiB of the 32-bit space, mapped above 4 GiB: root entry 3 of the 4-entry table.
        f.pt.map(
            0xc000_0000,
            PhysAddr::new(0x1_0000_0000),
            GIB,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        assert_eq!(f.mem.read(f.tlb.root, 3), 0x0060_0001_0000_0701);
        assert_eq!(
            f.pt.translate(0xffff_f000).unwrap().pa,
            PhysAddr::new(0x1_3fff_f000)
        );
        assert_eq!(f.pt.translate(0x1_0000_0000), None);
        let e = f.pt.map(
            0xffff_f000,
            PhysAddr::new(0),
            2 * KIB4,
            MemAttr::Normal,
            Perms::RW,
        );
        assert_eq!(
            e,
            Err(PageTableError::VaOutOfRange {
                va: 0xffff_f000,
                size: 2 * KIB4,
                va_bits: 32
            })
        );
        let pa = PhysAddr::new(0xff_ffff_f000);
        let e = f.pt.map(0x1000, pa, 2 * KIB4, MemAttr::Normal, Perms::RW);
        assert_eq!(
            e,
            Err(PageTableError::PaOutOfRange {
                pa,
                size: 2 * KIB4,
                oa_bits: 40
            })
        );
        f.pt.map(0x1000, pa, KIB4, MemAttr::Device, Perms::RW)
            .unwrap();
        assert_eq!(f.pt.translate(0x1000).unwrap().pa, pa);
        // Table pages must be reachable with 40-bit addresses.
        let high = FakeMem::new(1 << 40);
        let e = PageTable::new(PageTableConfig::LPAE_32, FakeAlloc(high.clone())).err();
        assert_eq!(
            e,
            Some(PageTableError::TablePageUnusable(PhysAddr::new(1 << 40)))
        );
        assert_eq!(high.live_count(), 0);
    }

    #[test]
    fn level0_start() {
        let mut f = fixture(PageTableConfig::AARCH64_48);
        f.pt.map(
            0x80_0000_0000,
            PhysAddr::new(0x4000_0000),
            KIB4,
            MemAttr::Normal,
            Perms::RX,
        )
        .unwrap();
        assert_eq!(
            f.stats(),
            MappingStats {
                tables: 4,
                leaves: [0, 0, 0, 1]
            }
        );
        assert_eq!(f.mem.read(f.tlb.root, 1) & 3, 3);
        assert_eq!(f.raw(0x80_0000_0000).unwrap().desc, 0x0040_0000_4000_0783);
        let t = f.pt.translate(0x80_0000_0fff).unwrap();
        assert_eq!(
            (t.pa, t.perms, t.level),
            (PhysAddr::new(0x4000_0fff), Perms::RX, 3)
        );
        // Huge aligned ranges still stop at 1 GiB blocks.
        f.pt.map(0, PhysAddr::new(0), 512 * GIB, MemAttr::Normal, Perms::RW)
            .unwrap();
        assert_eq!(f.stats().leaves, [0, 512, 0, 1]);
    }

    #[test]
    fn map_argument_errors() {
        let mut f = fixture(PageTableConfig::AARCH64_39);
        let n = MemAttr::Normal;
        let p = PhysAddr::new(0x4000_0000);
        assert_eq!(
            f.pt.map(0x800, p, KIB4, n, Perms::RW),
            Err(PageTableError::Misaligned {
                va: 0x800,
                pa: Some(p),
                size: KIB4
            })
        );
        assert!(matches!(
            f.pt.map(0, PhysAddr::new(0x10), KIB4, n, Perms::RW),
            Err(PageTableError::Misaligned { .. })
        ));
        assert!(matches!(
            f.pt.map(0, p, 10, n, Perms::RW),
            Err(PageTableError::Misaligned { .. })
        ));
        assert!(matches!(
            f.pt.map(u64::MAX - 0xfff, p, KIB4, n, Perms::RW),
            Err(PageTableError::VaOutOfRange { .. })
        ));
        assert!(matches!(
            f.pt.map(1 << 39, p, KIB4, n, Perms::RW),
            Err(PageTableError::VaOutOfRange { .. })
        ));
        assert!(matches!(
            f.pt.map(0, PhysAddr::new(u64::MAX - 0xfff), KIB4, n, Perms::RW),
            Err(PageTableError::PaOutOfRange { .. })
        ));
        assert_eq!(
            f.pt.map(0, p, KIB4, MemAttr::Device, Perms::RX),
            Err(PageTableError::Descriptor(
                DescriptorError::ExecutableDevice
            ))
        );
        assert_eq!(f.pt.map(0, p, 0, n, Perms::RW), Ok(()));
        assert_eq!(
            f.stats(),
            MappingStats {
                tables: 1,
                leaves: [0; 4]
            }
        );
        // The last page of the address space.
        f.pt.map((1 << 39) - KIB4, p, KIB4, n, Perms::RW).unwrap();
        assert_eq!(
            f.pt.translate((1 << 39) - 1).unwrap().pa,
            PhysAddr::new(0x4000_0fff)
        );
        assert_eq!(f.pt.translate(1 << 39), None);
        assert_eq!(f.pt.translate(u64::MAX), None);
        let msg = format!("{}", PageTableError::AlreadyMapped { va: 0x1000 });
        assert!(
            msg.contains("0x1000") && msg.contains("already mapped"),
            "{msg}"
        );
    }

    #[test]
    fn map_refuses_overlap_and_changes_nothing() {
        let mut f = fixture(PageTableConfig::AARCH64_39);
        f.pt.map(
            0x4000_0000,
            PhysAddr::new(0x8000_0000),
            MIB2,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        let (stats, live) = (f.stats(), f.mem.live_count());
        let e = f.pt.map(
            0x401f_f000,
            PhysAddr::new(0),
            2 * KIB4,
            MemAttr::Normal,
            Perms::RW,
        );
        assert_eq!(e, Err(PageTableError::AlreadyMapped { va: 0x401f_f000 }));
        // The first page is free and would need new tables: none may remain allocated.
        let e = f.pt.map(
            0x3fff_f000,
            PhysAddr::new(0),
            2 * KIB4,
            MemAttr::Normal,
            Perms::RW,
        );
        assert_eq!(e, Err(PageTableError::AlreadyMapped { va: 0x4000_0000 }));
        let e =
            f.pt.map(0, PhysAddr::new(0), 4 * GIB, MemAttr::Normal, Perms::RW);
        assert_eq!(e, Err(PageTableError::AlreadyMapped { va: 0x4000_0000 }));
        assert_eq!((f.stats(), f.mem.live_count()), (stats, live));
        assert_eq!(f.pt.translate(0x3fff_f000), None);
    }

    #[test]
    fn map_out_of_table_memory_changes_nothing() {
        let mut f = fixture(PageTableConfig::AARCH64_48);
        f.pt.map(0, PhysAddr::new(0), KIB4, MemAttr::Normal, Perms::RW)
            .unwrap();
        let (stats, live) = (f.stats(), f.mem.live_count());
        // Needs an L1, an L2 and an L3 table; only two pages are available.
        f.mem.limit.set(live + 2);
        let e = f.pt.map(
            0x80_0000_0000,
            PhysAddr::new(0),
            3 * KIB4,
            MemAttr::Normal,
            Perms::RW,
        );
        assert_eq!(e, Err(PageTableError::OutOfTableMemory));
        assert_eq!((f.stats(), f.mem.live_count()), (stats, live));
        assert_eq!(f.pt.translate(0x80_0000_0000), None);
        f.mem.limit.set(live + 3);
        f.pt.map(
            0x80_0000_0000,
            PhysAddr::new(0),
            3 * KIB4,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        assert_eq!(f.mem.live_count(), live + 3);
    }

    #[test]
    fn unmap_page_from_2m_block_splits_then_frees() {
        let mut f = fixture(PageTableConfig::AARCH64_39);
        f.pt.map(
            0x4000_0000,
            PhysAddr::new(0x8000_0000),
            MIB2,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        let vas: Vec<u64> = (0..512).map(|i| 0x4000_0000 + i * KIB4).collect();
        let before = f.snapshot(&vas);
        let r = f.pt.unmap(0x4010_0000, KIB4, &mut f.tlb).unwrap();
        assert_eq!(r.unmapped, KIB4);
        let log = f.mem.take_log();
        let block = TlbInvalidation {
            va: 0x4000_0000,
            size: MIB2,
            granule: MIB2,
            leaf_only: true,
        };
        assert!(
            matches!(log.as_slice(), [Ev::Inval(i), Ev::Sync] if *i == block),
            "{log:x?}"
        );
        f.mem.assert_no_errors();
        f.check_invalidated(&log, &before).unwrap();
        assert_eq!(f.pt.translate(0x4010_0000), None);
        for va in [0x4000_0000, 0x400f_f000, 0x4010_1000, 0x401f_f000] {
            let t = f.pt.translate(va).unwrap();
            assert_eq!(
                (t.pa.as_u64(), t.attr, t.perms, t.level),
                (va + 0x4000_0000, MemAttr::Normal, Perms::RW, 3)
            );
        }
        assert_eq!(
            f.stats(),
            MappingStats {
                tables: 3,
                leaves: [0, 0, 0, 511]
            }
        );

        let before = f.snapshot(&vas);
        let r = f.pt.unmap(0x4000_0000, MIB2, &mut f.tlb).unwrap();
        assert_eq!(r.unmapped, MIB2 - KIB4);
        let log = f.mem.take_log();
        f.mem.assert_no_errors();
        f.check_invalidated(&log, &before).unwrap();
        assert_eq!(
            log.iter().filter(|e| matches!(e, Ev::Free(_))).count(),
            2,
            "{log:x?}"
        );
        assert_eq!(
            f.stats(),
            MappingStats {
                tables: 1,
                leaves: [0; 4]
            }
        );
        assert_eq!(f.mem.live_count(), 1);
    }

    #[test]
    fn unmap_page_from_1g_block() {
        let mut f = fixture(PageTableConfig::AARCH64_39);
        f.pt.map(
            0x4000_0000,
            PhysAddr::new(0x4000_0000),
            GIB,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        f.pt.unmap(0x4020_3000, KIB4, &mut f.tlb).unwrap();
        f.mem.assert_no_errors();
        assert_eq!(
            f.stats(),
            MappingStats {
                tables: 3,
                leaves: [0, 0, 511, 511]
            }
        );
        assert_eq!(f.pt.translate(0x4020_3000), None);
        for va in [
            0x4000_0000,
            0x4020_2fff,
            0x4020_4000,
            0x4040_0000,
            0x7fff_ffff,
        ] {
            assert_eq!(f.pt.translate(va).unwrap().pa.as_u64(), va);
        }
        assert_eq!(
            f.pt.unmap(0, 1 << 39, &mut f.tlb).unwrap().unmapped,
            GIB - KIB4
        );
        f.mem.assert_no_errors();
        assert_eq!(f.mem.live_count(), 1);
    }

    #[test]
    fn unmap_skips_holes() {
        let mut f = fixture(PageTableConfig::AARCH64_39);
        f.pt.map(
            0x1000,
            PhysAddr::new(0x1000),
            3 * KIB4,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        f.pt.map(
            0x40_0000,
            PhysAddr::new(0x40_0000),
            MIB2,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        assert_eq!(f.pt.unmap(0x10_0000, KIB4, &mut f.tlb).unwrap().unmapped, 0);
        assert!(f.mem.take_log().is_empty());
        assert_eq!(
            f.pt.unmap(0, 0x80_0000, &mut f.tlb).unwrap().unmapped,
            3 * KIB4 + MIB2
        );
        f.mem.assert_no_errors();
        assert_eq!(f.mem.live_count(), 1);
        assert_eq!(f.pt.unmap(0, 0, &mut f.tlb).unwrap().unmapped, 0);
        assert!(matches!(
            f.pt.unmap(0x10, KIB4, &mut f.tlb),
            Err(PageTableError::Misaligned { .. })
        ));
    }

    #[test]
    fn unmap_frees_more_tables_than_one_sync_batch() {
        let mut f = fixture(PageTableConfig::AARCH64_39);
        let pages: Vec<u64> = (0..40).map(|i| 0x4000_0000 + i * MIB2 + KIB4).collect();
        for &va in &pages {
            f.pt.map(va, PhysAddr::new(va), KIB4, MemAttr::Normal, Perms::RW)
                .unwrap();
        }
        assert_eq!(f.mem.live_count(), 42);
        let before = f.snapshot(&pages);
        let r =
            f.pt.unmap(0x4000_1000, 40 * MIB2 - KIB4, &mut f.tlb)
                .unwrap();
        assert_eq!(r.unmapped, 40 * KIB4);
        let log = f.mem.take_log();
        f.mem.assert_no_errors();
        f.check_invalidated(&log, &before).unwrap();
        assert_eq!(f.mem.live_count(), 1);
        assert!(
            log.iter().filter(|e| matches!(e, Ev::Sync)).count() >= 3,
            "{log:x?}"
        );
    }

    #[test]
    fn unmap_without_memory_for_a_split_changes_nothing() {
        let mut f = fixture(PageTableConfig::AARCH64_39);
        f.pt.map(
            0x4000_0000,
            PhysAddr::new(0x8000_0000),
            GIB,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        // Splitting needs two tables (2 MiB blocks, then pages); allow one.
        f.mem.limit.set(f.mem.live_count() + 1);
        assert_eq!(
            f.pt.unmap(0x4000_0000, KIB4, &mut f.tlb),
            Err(PageTableError::OutOfTableMemory)
        );
        // The one page that could be allocated went back; no TLB maintenance was needed.
        assert!(matches!(f.mem.take_log().as_slice(), [Ev::Free(_)]));
        assert_eq!(
            f.stats(),
            MappingStats {
                tables: 1,
                leaves: [0, 1, 0, 0]
            }
        );
        assert_eq!(f.mem.live_count(), 1);
        let e =
            f.pt.set_attributes(0x4000_0000, KIB4, MemAttr::Device, Perms::RW, &mut f.tlb);
        assert_eq!(e, Err(PageTableError::OutOfTableMemory));
        assert!(matches!(f.mem.take_log().as_slice(), [Ev::Free(_)]));
        assert_eq!(f.pt.translate(0x4000_0000).unwrap().attr, MemAttr::Normal);
    }

    #[test]
    fn unmap_keep_tables_leaves_the_tables_for_the_next_map() {
        let mut f = fixture(PageTableConfig::AARCH64_39);
        f.pt.map(0x4000_1000, PhysAddr::new(0x8000_1000), 3 * KIB4, MemAttr::NormalNonCacheable, Perms::RW)
            .unwrap();
        f.pt.map(0x4000_8000, PhysAddr::new(0x9000_0000), KIB4, MemAttr::Normal, Perms::RW)
            .unwrap();
        let vas: Vec<u64> = (0..16).map(|i| 0x4000_0000 + i * KIB4).collect();
        let before = f.snapshot(&vas);
        let r = f.pt.unmap_keep_tables(0x4000_0000, 8 * KIB4, &mut f.tlb).unwrap();
        assert_eq!(r.unmapped, 3 * KIB4);
        let log = f.mem.take_log();
        let pages = TlbInvalidation { va: 0x4000_1000, size: 3 * KIB4, granule: KIB4, leaf_only: true };
        assert!(matches!(log.as_slice(), [Ev::Inval(i), Ev::Sync] if *i == pages), "{log:x?}");
        f.check_invalidated(&log, &before).unwrap();
        // The last page empties the level-3 table, which stays: no free, no walk-cache
        // invalidation.
        let r = f.pt.unmap_keep_tables(0x4000_8000, KIB4, &mut f.tlb).unwrap();
        assert_eq!(r.unmapped, KIB4);
        let log = f.mem.take_log();
        let page = TlbInvalidation { va: 0x4000_8000, size: KIB4, granule: KIB4, leaf_only: true };
        assert!(matches!(log.as_slice(), [Ev::Inval(i), Ev::Sync] if *i == page), "{log:x?}");
        assert_eq!(f.stats(), MappingStats { tables: 3, leaves: [0; 4] });
        // Nothing mapped: nothing to invalidate.
        assert_eq!(f.pt.unmap_keep_tables(0x4000_0000, MIB2, &mut f.tlb).unwrap().unmapped, 0);
        assert!(f.mem.take_log().is_empty());
        // Mapping the range again needs no table page.
        f.mem.limit.set(f.mem.live_count());
        f.pt.map(0x4000_1000, PhysAddr::new(0x8000_1000), KIB4, MemAttr::Normal, Perms::RW).unwrap();
        assert_eq!(f.pt.translate(0x4000_1000).map(|t| t.pa.as_u64()), Some(0x8000_1000));
        f.mem.assert_no_errors();
    }

    #[test]
    fn unmap_keep_tables_splits_blocks_the_range_cuts() {
        let mut f = fixture(PageTableConfig::AARCH64_39);
        // Two 2 MiB blocks and the page after them; the range takes the second half of the first
        // block, the second block whole and the page.
        f.pt.map(0x4020_0000, PhysAddr::new(0x8020_0000), 2 * MIB2 + KIB4, MemAttr::Normal, Perms::RW)
            .unwrap();
        assert_eq!(f.stats().leaves, [0, 0, 2, 1]);
        // Without table memory for the split nothing changes.
        f.mem.limit.set(f.mem.live_count());
        let vas: Vec<u64> = (0..1025).map(|i| 0x4020_0000 + i * KIB4).collect();
        let before = f.snapshot(&vas);
        assert_eq!(
            f.pt.unmap_keep_tables(0x4030_0000, MIB2 + MIB2 / 2 + KIB4, &mut f.tlb),
            Err(PageTableError::OutOfTableMemory)
        );
        assert_eq!(f.snapshot(&vas), before);
        f.mem.limit.set(usize::MAX);
        f.mem.take_log();
        let r = f.pt.unmap_keep_tables(0x4030_0000, MIB2 + MIB2 / 2 + KIB4, &mut f.tlb).unwrap();
        assert_eq!(r.unmapped, MIB2 + MIB2 / 2 + KIB4);
        let log = f.mem.take_log();
        f.mem.assert_no_errors();
        f.check_invalidated(&log, &before).unwrap();
        for va in [0x4020_0000, 0x402f_f000] {
            assert_eq!(f.pt.translate(va).map(|t| (t.pa.as_u64(), t.level)), Some((va + 0x4000_0000, 3)));
        }
        for va in [0x4030_0000, 0x4040_0000, 0x405f_f000, 0x4060_0000] {
            assert_eq!(f.pt.translate(va), None, "{va:#x}");
        }
        // The split table (half of it still mapped) and the emptied page table both stay.
        assert_eq!(f.stats(), MappingStats { tables: 4, leaves: [0, 0, 0, 256] });
    }

    #[test]
    fn set_attributes_breaks_before_make() {
        let mut f = fixture(PageTableConfig::AARCH64_39);
        f.pt.map(
            0x4000_0000,
            PhysAddr::new(0x9000_0000),
            4 * KIB4,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        let vas: Vec<u64> = (0..4).map(|i| 0x4000_0000 + i * KIB4).collect();
        let before = f.snapshot(&vas);
        f.pt.set_attributes(
            0x4000_1000,
            2 * KIB4,
            MemAttr::NormalNonCacheable,
            Perms::RO,
            &mut f.tlb,
        )
        .unwrap();
        let log = f.mem.take_log();
        // The recorder checked that both pages were invalid when invalidated and still invalid at
        // the sync; they are valid now, so the new values were written after the sync.
        f.mem.assert_no_errors();
        let inv = TlbInvalidation {
            va: 0x4000_1000,
            size: 2 * KIB4,
            granule: KIB4,
            leaf_only: true,
        };
        assert!(
            matches!(log.as_slice(), [Ev::Inval(i), Ev::Sync] if *i == inv),
            "{log:x?}"
        );
        f.check_invalidated(&log, &before).unwrap();
        for (i, va) in vas.iter().enumerate() {
            let raw = f.raw(*va).unwrap();
            let changed = i == 1 || i == 2;
            assert_eq!(raw_pa(&raw, *va), 0x9000_0000 + i as u64 * KIB4);
            assert_eq!((raw.desc >> 2) & 7, if changed { 1 } else { 0 });
            assert_eq!(raw.desc & AP_READ_ONLY != 0, changed);
        }
        // Asking for what is already there touches nothing.
        f.pt.set_attributes(0x4000_0000, KIB4, MemAttr::Normal, Perms::RW, &mut f.tlb)
            .unwrap();
        assert!(f.mem.take_log().is_empty());
    }

    #[test]
    fn set_attributes_splits_a_block_break_before_make() {
        let mut f = fixture(PageTableConfig::SMMU_39);
        f.pt.map(
            0x4000_0000,
            PhysAddr::new(0x8000_0000),
            MIB2,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        let vas: Vec<u64> = (0..512).map(|i| 0x4000_0000 + i * KIB4).collect();
        let before = f.snapshot(&vas);
        f.pt.set_attributes(0x4000_3000, KIB4, MemAttr::Device, Perms::RO, &mut f.tlb)
            .unwrap();
        let log = f.mem.take_log();
        f.mem.assert_no_errors();
        let block = TlbInvalidation {
            va: 0x4000_0000,
            size: MIB2,
            granule: MIB2,
            leaf_only: true,
        };
        assert!(
            matches!(log.as_slice(), [Ev::Inval(i), Ev::Sync] if *i == block),
            "{log:x?}"
        );
        f.check_invalidated(&log, &before).unwrap();
        let t = f.pt.translate(0x4000_3000).unwrap();
        let smmu = LeafFlags {
            lpae_xn: false,
            non_global: true,
            unprivileged: true,
        };
        assert_eq!(
            t,
            Translation {
                pa: PhysAddr::new(0x8000_3000),
                attr: MemAttr::Device,
                perms: Perms::RO,
                flags: smmu,
                level: 3
            }
        );
        for va in [0x4000_2000, 0x4000_4000, 0x401f_f000] {
            let t = f.pt.translate(va).unwrap();
            assert_eq!(
                (t.pa.as_u64(), t.attr, t.perms, t.level),
                (va + 0x4000_0000, MemAttr::Normal, Perms::RW, 3)
            );
        }
        assert_eq!(f.stats().leaves, [0, 0, 0, 512]);
    }

    #[test]
    fn split_to_pages_keeps_every_translation() {
        let mut f = fixture(PageTableConfig::AARCH64_39);
        // A 1 GiB block and a 2 MiB block; the split range takes the last 2 MiB of the first and
        // half of the second.
        f.pt.map(0x4000_0000, PhysAddr::new(0x4000_0000), GIB, MemAttr::Normal, Perms::RW).unwrap();
        f.pt.map(0x8000_0000, PhysAddr::new(0x8000_0000), MIB2, MemAttr::Device, Perms::RW).unwrap();
        let vas: Vec<u64> = (0..1024).map(|i| 0x7fe0_0000 + i * KIB4).chain([0x4000_0000, 0x6000_0000]).collect();
        let before = f.snapshot(&vas);
        f.pt.split_to_pages(0x7fe0_0000, MIB2 + MIB2 / 2, &mut f.tlb).unwrap();
        let log = f.mem.take_log();
        f.mem.assert_no_errors();
        f.check_invalidated(&log, &before).unwrap();
        for &va in &vas {
            let t = f.pt.translate(va).unwrap();
            assert_eq!(t.pa.as_u64(), va, "{va:#x}");
            // The 2 MiB block only partly in the range has nothing finer than pages either.
            assert_eq!(t.level == 3, va >= 0x7fe0_0000, "{va:#x} at level {}", t.level);
            let attr = if va >= 0x8000_0000 { MemAttr::Device } else { MemAttr::Normal };
            assert_eq!((t.attr, t.perms), (attr, Perms::RW), "{va:#x}");
        }
        // 511 of the 1 GiB block's 2 MiB entries stay blocks; its last one and the 2 MiB block
        // became 512 pages each.
        assert_eq!(f.stats().leaves, [0, 0, 511, 1024]);
        // Splitting again changes nothing and needs no maintenance.
        f.pt.split_to_pages(0x7fe0_0000, MIB2, &mut f.tlb).unwrap();
        assert!(f.mem.take_log().is_empty());
    }

    #[test]
    fn set_attributes_on_a_hole_changes_nothing() {
        let mut f = fixture(PageTableConfig::AARCH64_39);
        f.pt.map(
            0x4000_0000,
            PhysAddr::new(0x8000_0000),
            MIB2,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        f.pt.map(
            0x4020_1000,
            PhysAddr::new(0x8020_1000),
            KIB4,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        let e = f.pt.set_attributes(
            0x401f_f000,
            3 * KIB4,
            MemAttr::Device,
            Perms::RW,
            &mut f.tlb,
        );
        assert_eq!(e, Err(PageTableError::NotMapped { va: 0x4020_0000 }));
        assert!(f.mem.take_log().is_empty());
        assert_eq!(f.stats().leaves, [0, 0, 1, 1]);
        assert_eq!(f.pt.translate(0x401f_f000).unwrap().attr, MemAttr::Normal);
        let e =
            f.pt.set_attributes(0x4000_0000, KIB4, MemAttr::Device, Perms::RX, &mut f.tlb);
        assert_eq!(
            e,
            Err(PageTableError::Descriptor(
                DescriptorError::ExecutableDevice
            ))
        );
    }

    #[test]
    fn destroy_frees_every_table() {
        let mut f = fixture(PageTableConfig::AARCH64_48);
        f.pt.map(
            0x1000,
            PhysAddr::new(0x1000),
            5 * MIB2,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        f.pt.map(
            0x80_0000_0000,
            PhysAddr::new(0),
            GIB,
            MemAttr::Normal,
            Perms::RW,
        )
        .unwrap();
        assert!(f.mem.live_count() > 3);
        // SAFETY: no walker uses these host-memory tables.
        let alloc = unsafe { f.pt.destroy() };
        assert_eq!(alloc.0.live_count(), 0);
    }

    /// Reference model: disjoint mapped segments keyed by start VA.
    #[derive(Clone, Copy, Debug)]
    struct Seg {
        end: u64,
        pa: u64,
        attr: MemAttr,
        perms: Perms,
    }

    #[derive(Default)]
    struct Model {
        segs: BTreeMap<u64, Seg>,
    }

    impl Model {
        fn lookup(&self, va: u64) -> Option<(u64, MemAttr, Perms)> {
            let (&start, seg) = self.segs.range(..=va).next_back()?;
            (va < seg.end).then(|| (seg.pa + (va - start), seg.attr, seg.perms))
        }
        fn split_at(&mut self, x: u64) {
            if let Some((&start, &seg)) = self.segs.range(..x).next_back() {
                if seg.end > x {
                    self.segs.insert(start, Seg { end: x, ..seg });
                    self.segs.insert(
                        x,
                        Seg {
                            pa: seg.pa + (x - start),
                            ..seg
                        },
                    );
                }
            }
        }
        fn first_mapped(&self, a: u64, b: u64) -> Option<u64> {
            if self.lookup(a).is_some() {
                return Some(a);
            }
            self.segs.range(a..b).next().map(|(&start, _)| start)
        }
        fn first_hole(&self, a: u64, b: u64) -> Option<u64> {
            let mut cur = a;
            while cur < b {
                match self.segs.range(..=cur).next_back() {
                    Some((_, seg)) if seg.end > cur => cur = seg.end,
                    _ => return Some(cur),
                }
            }
            None
        }
        fn mapped_bytes(&self, a: u64, b: u64) -> u64 {
            self.segs
                .iter()
                .map(|(&s, seg)| seg.end.min(b).saturating_sub(s.max(a)))
                .sum()
        }
        fn remove(&mut self, a: u64, b: u64) {
            self.split_at(a);
            self.split_at(b);
            let keys: Vec<u64> = self.segs.range(a..b).map(|(&k, _)| k).collect();
            keys.iter().for_each(|k| {
                self.segs.remove(k);
            });
        }
        fn set(&mut self, a: u64, b: u64, attr: MemAttr, perms: Perms) {
            self.split_at(a);
            self.split_at(b);
            for seg in self.segs.range_mut(a..b).map(|(_, s)| s) {
                seg.attr = attr;
                seg.perms = perms;
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Map {
            va: u64,
            size: u64,
            pa: u64,
            attr: MemAttr,
            perms: Perms,
        },
        Unmap(Target),
        UnmapKeepTables(Target),
        Set(Target, MemAttr, Perms),
    }

    /// Where an unmap or attribute change applies.
    #[derive(Clone, Debug)]
    enum Target {
        Range(u64, u64),
        /// Part of a currently mapped segment, chosen when the operation runs: an offset and a
        /// length in pages (rounded to `align` pages), possibly running `overrun` pages past the
        /// end.
        Segment {
            pick: prop::sample::Index,
            offset: u64,
            len: u64,
            align: u64,
            overrun: u64,
        },
    }

    impl Target {
        fn resolve(&self, model: &Model) -> (u64, u64) {
            let (pick, offset, len, align, overrun) = match self {
                Target::Range(va, size) => return (*va, *size),
                Target::Segment {
                    pick,
                    offset,
                    len,
                    align,
                    overrun,
                } => (pick, offset, len, align, overrun),
            };
            let segs: Vec<(u64, u64)> = model.segs.iter().map(|(&s, seg)| (s, seg.end)).collect();
            if segs.is_empty() {
                return (0, KIB4);
            }
            let (start, end) = segs[pick.index(segs.len())];
            let pages = (end - start) / KIB4;
            let offset = offset % pages / align * align;
            let len = (1 + len % (pages - offset) + overrun).min((REGION - start) / KIB4 - offset);
            (start + offset * KIB4, len * KIB4)
        }
    }

    /// The model's address space: the bottom 4 GiB, which every configuration covers.
    const REGION: u64 = 4 * GIB;

    /// Mostly 0 (keep alignment), sometimes 1 or 2 units.
    fn jitter() -> impl Strategy<Value = u64> {
        prop_oneof![3 => Just(0u64), 1 => 1u64..3]
    }

    /// A range built around 4 KiB, 2 MiB or 1 GiB units, placed in a few hot windows so operations
    /// overlap, with optional jitter that breaks alignment. `coarse` keeps the jitter of 1 GiB
    /// ranges at 2 MiB, so that mapping never creates hundreds of thousands of pages.
    fn range(coarse: bool) -> impl Strategy<Value = (u64, u64)> {
        let unit = prop_oneof![4 => Just(KIB4), 3 => Just(MIB2), 2 => Just(GIB)];
        (
            unit,
            0u64..4,
            any::<bool>(),
            0u64..1024,
            1u64..=3,
            jitter(),
            jitter(),
        )
            .prop_map(
                move |(unit, window, from_end, pos, count, jitter_start, jitter_len)| {
                    let jitter = if coarse && unit == GIB { MIB2 } else { KIB4 };
                    let span = match unit {
                        KIB4 => 1024,
                        MIB2 => 8,
                        _ => 1,
                    };
                    let base = if from_end && unit != GIB {
                        (window + 1) * GIB - span * unit
                    } else {
                        window * GIB
                    };
                    let va =
                        (base + (pos % span) * unit + jitter_start * jitter).min(REGION - KIB4);
                    let size = (count * unit + jitter_len * jitter).min(REGION - va);
                    (va, size)
                },
            )
    }

    fn target() -> impl Strategy<Value = Target> {
        let align = prop::sample::select(vec![1u64, 512]);
        let segment = (
            any::<prop::sample::Index>(),
            any::<u64>(),
            any::<u64>(),
            align,
            jitter(),
        )
            .prop_map(|(pick, offset, len, align, overrun)| Target::Segment {
                pick,
                offset,
                len,
                align,
                overrun,
            });
        let range = range(false).prop_map(|(va, size)| Target::Range(va, size));
        prop_oneof![1 => range, 3 => segment]
    }

    fn attr() -> impl Strategy<Value = MemAttr> {
        prop::sample::select(MemAttr::ALL.to_vec())
    }

    fn perms() -> impl Strategy<Value = Perms> {
        prop::sample::select(vec![Perms::RO, Perms::RW, Perms::RX])
    }

    fn op() -> impl Strategy<Value = Op> {
        let map = (range(true), 0u64..32, jitter(), attr(), perms()).prop_map(
            |((va, size), gib, jitter, attr, perms)| {
                // Same offset within a GiB as the VA (so blocks are possible), sometimes shifted.
                let shift = if size >= GIB {
                    jitter * MIB2
                } else {
                    jitter * KIB4
                };
                Op::Map {
                    va,
                    size,
                    pa: gib * GIB + va % GIB + shift,
                    attr,
                    perms,
                }
            },
        );
        let unmap = target().prop_map(Op::Unmap);
        let unmap_keep = target().prop_map(Op::UnmapKeepTables);
        let set = (target(), attr(), perms()).prop_map(|(t, attr, perms)| Op::Set(t, attr, perms));
        prop_oneof![4 => map, 2 => unmap, 1 => unmap_keep, 3 => set]
    }

    fn configs() -> impl Strategy<Value = PageTableConfig> {
        prop::sample::select(vec![
            PageTableConfig::AARCH64_48,
            PageTableConfig::AARCH64_39,
            PageTableConfig::LPAE_32,
            PageTableConfig::SMMU_39,
        ])
    }

    /// Checks a sampled page against the model through `translate` and through the raw descriptor.
    fn check_page(f: &Fixture, model: &Model, va: u64) -> Result<(), String> {
        let expected = model.lookup(va);
        let got = f.pt.translate(va);
        let flags = f.pt.config().leaf_flags;
        match (expected, got) {
            (None, None) => Ok(()),
            (Some((pa, attr, perms)), Some(t)) => {
                if (t.pa.as_u64(), t.attr, t.perms, t.flags) != (pa, attr, perms, flags) {
                    return Err(format!(
                        "va {va:#x}: translate {t:x?}, model {:x?}",
                        (pa, attr, perms)
                    ));
                }
                let raw = f
                    .raw(va)
                    .ok_or(format!("va {va:#x}: raw walk found nothing"))?;
                let d = raw.desc;
                let bit = |n: u32| (d >> n) & 1 == 1;
                let (exec_bit, other_xn) = if flags.unprivileged {
                    (54, 53)
                } else {
                    (53, 54)
                };
                let ok = raw_pa(&raw, va) == pa
                    && (d >> 2) & 7 == hand_index(attr)
                    && bit(7) != perms.write
                    && bit(6) == flags.unprivileged
                    && (d >> 8) & 3 == 3
                    && bit(10)
                    && bit(11) == flags.non_global
                    && bit(exec_bit) != perms.exec
                    // LPAE: bit 54 is XN for every level, so executable leaves clear it too.
                    && bit(other_xn) != (flags.lpae_xn && perms.exec);
                if ok {
                    Ok(())
                } else {
                    Err(format!(
                        "va {va:#x}: descriptor {d:#x} does not encode {:x?}",
                        (pa, attr, perms)
                    ))
                }
            }
            (e, g) => Err(format!("va {va:#x}: model {e:x?}, translate {g:x?}")),
        }
    }

    fn run_ops(
        config: PageTableConfig,
        ops: Vec<Op>,
        samples: Vec<u64>,
    ) -> Result<(), TestCaseError> {
        let mut f = fixture(config);
        let mut model = Model::default();
        // Whether `unmap_keep_tables` ran, which may leave empty tables in the tree.
        let mut kept_tables = false;
        for op in ops {
            let (va, size) = match &op {
                Op::Map { va, size, .. } => (*va, *size),
                Op::Unmap(target) | Op::UnmapKeepTables(target) | Op::Set(target, ..) => target.resolve(&model),
            };
            let mut vas: Vec<u64> = vec![va.saturating_sub(KIB4), va, va + size - KIB4, va + size];
            for (&start, seg) in &model.segs {
                vas.extend([start, seg.end - KIB4, seg.end]);
            }
            vas.extend(samples.iter().map(|s| (s % REGION) & !(KIB4 - 1)));
            vas.retain(|&v| v < REGION);
            let before = f.snapshot(&vas);
            f.mem.take_log();
            match op {
                Op::Map {
                    va,
                    size,
                    pa,
                    attr,
                    perms,
                } => {
                    let expected = if attr.is_device() && perms.exec {
                        Err(PageTableError::Descriptor(
                            DescriptorError::ExecutableDevice,
                        ))
                    } else if let Some(first) = model.first_mapped(va, va + size) {
                        Err(PageTableError::AlreadyMapped { va: first })
                    } else {
                        Ok(())
                    };
                    prop_assert_eq!(f.pt.map(va, PhysAddr::new(pa), size, attr, perms), expected);
                    if expected.is_ok() {
                        model.segs.insert(
                            va,
                            Seg {
                                end: va + size,
                                pa,
                                attr,
                                perms,
                            },
                        );
                        vas.extend([(va + size / 2) & !(KIB4 - 1)]);
                    }
                }
                Op::Unmap(_) => {
                    let expected = model.mapped_bytes(va, va + size);
                    prop_assert_eq!(
                        f.pt.unmap(va, size, &mut f.tlb),
                        Ok(UnmapResult { unmapped: expected })
                    );
                    model.remove(va, va + size);
                }
                Op::UnmapKeepTables(_) => {
                    let expected = model.mapped_bytes(va, va + size);
                    let tables = f.stats().tables;
                    prop_assert_eq!(
                        f.pt.unmap_keep_tables(va, size, &mut f.tlb),
                        Ok(UnmapResult { unmapped: expected })
                    );
                    prop_assert!(f.stats().tables >= tables, "a table left the tree");
                    prop_assert!(!f.mem.log.borrow().iter().any(|e| matches!(e, Ev::Free(_))), "a table page was freed");
                    model.remove(va, va + size);
                    kept_tables = true;
                }
                Op::Set(_, attr, perms) => {
                    let expected = if attr.is_device() && perms.exec {
                        Err(PageTableError::Descriptor(
                            DescriptorError::ExecutableDevice,
                        ))
                    } else if let Some(hole) = model.first_hole(va, va + size) {
                        Err(PageTableError::NotMapped { va: hole })
                    } else {
                        Ok(())
                    };
                    prop_assert_eq!(
                        f.pt.set_attributes(va, size, attr, perms, &mut f.tlb),
                        expected
                    );
                    if expected.is_ok() {
                        model.set(va, va + size, attr, perms);
                    }
                }
            }
            let log = f.mem.take_log();
            prop_assert!(
                f.mem.errors.borrow().is_empty(),
                "{:?}",
                f.mem.errors.borrow()
            );
            prop_assert!(
                f.mem.unsynced.borrow().is_empty(),
                "operation returned with unsynced invalidations"
            );
            f.check_invalidated(&log, &before)
                .map_err(TestCaseError::fail)?;
            for &v in &vas {
                check_page(&f, &model, v).map_err(TestCaseError::fail)?;
            }
            let stats = f.stats();
            let (reachable, empty) = reachable_tables(&f.mem, f.tlb.root, f.tlb.start, true);
            prop_assert_eq!(stats.tables, f.mem.live_count(), "table pages leaked");
            prop_assert_eq!(reachable, stats.tables);
            prop_assert!(!empty || kept_tables, "an empty table was left in the tree");
            prop_assert_eq!(stats.mapped_bytes(), model.mapped_bytes(0, REGION));
        }
        let total = model.mapped_bytes(0, REGION);
        prop_assert_eq!(
            f.pt.unmap(0, REGION, &mut f.tlb),
            Ok(UnmapResult { unmapped: total })
        );
        prop_assert!(
            f.mem.errors.borrow().is_empty(),
            "{:?}",
            f.mem.errors.borrow()
        );
        prop_assert_eq!(
            f.stats(),
            MappingStats {
                tables: 1,
                leaves: [0; 4]
            }
        );
        prop_assert_eq!(f.mem.live_count(), 1);
        // SAFETY: no walker uses these host-memory tables.
        let alloc = unsafe { f.pt.destroy() };
        prop_assert_eq!(alloc.0.live_count(), 0);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

        #[test]
        fn model_map_unmap_set_attributes(
            config in configs(),
            ops in prop::collection::vec(op(), 1..30),
            samples in prop::collection::vec(any::<u64>(), 8),
        ) {
            run_ops(config, ops, samples)?;
        }
    }
}
