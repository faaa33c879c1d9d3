//! The flattened device tree (DTB) the boot loader hands over: opening and validating it, and the
//! queries the kernel needs at boot (memory, reservations, CPUs, PSCI, console, command line) plus
//! generic node/property access and address translation for drivers.
//!
//! The whole blob is validated once, in [`DeviceTree::from_bytes`] / [`DeviceTree::from_ptr`]: the
//! header, every block's bounds (after the header, inside `totalsize`, no two sharing a byte), and
//! every token of the structure block. Queries then return values or `DtError`s and never panic,
//! loop forever or overflow, whatever the input.
//!
//! Why not the `fdt` crate (0.1.5) for the parsing: it panics on malformed input (`expect`,
//! `unwrap`, `assert_eq!`, unchecked slicing in its property and node walkers, and in `chosen()`,
//! `cpus()`, `memory()` when those nodes are absent), truncates 64-bit addresses to `usize` (wrong on
//! armv7 with LPAE), loses nodes after FDT_NOP tokens (QEMU's raspi4b machine deletes nodes by
//! overwriting them with NOPs: fdt 0.1.5 then sees 230 of that tree's 317 nodes), gives nodes no
//! identity or parent, and does not translate addresses. Validating for it would mean writing a
//! complete parser anyway, so the walker here is our own (blob.rs); the host tests use `fdt` as an
//! independent reference on the NOP-free fixtures.
//!
//! Layout: `blob` (encoding, validator, node index, `Node`, `Property`), `translate` (cells, `reg`,
//! `ranges`), `chosen` (command line, initrd, console), `cpus` (CPUs, PSCI), `memory` (/memory,
//! /memreserve/, /reserved-memory), `error`.

mod blob;
mod chosen;
mod cpus;
mod error;
mod memory;
mod translate;

pub use blob::{
    AllNodes, Ancestry, Children, Node, NodeIndex, NodePath, Properties, Property, Status, StrList,
    U32s, HEADER_SIZE, MAX_DEPTH, MAX_INDEXED_NODES, MAX_TOTALSIZE,
};
pub use chosen::StdoutPath;
pub use cpus::{Cpu, Cpus, Psci, PsciMethod};
pub use error::{DtError, Name, ShortStr};
pub use memory::{MemReserves, MemoryRegions, ReservedMemories, ReservedMemory};
pub use translate::{
    translate, Cells, Pairs, RangeEntry, Ranges, RangesProp, TranslatedRegs, MAX_ADDRESS_CELLS,
    MAX_SIZE_CELLS, MAX_TRANSLATED_ADDRESS_CELLS,
};

use crate::mm::addr::PhysAddr;
use crate::mm::memmap::Region;
use blob::{be32, Blob, Landmarks, FDT_MAGIC};

/// The index storage for the boot loader's tree: handed for good to the first tree that
/// [`DeviceTree::from_ptr`] opens successfully. A spin lock that is never unlocked once taken,
/// rather than a `static mut`, so that no `unsafe` is needed and a second `from_ptr` (which cannot
/// take it) simply gets a tree without an index.
static BOOT_INDEX: spin::Mutex<NodeIndex> = spin::Mutex::new(NodeIndex::new());

/// Longest chain of phandle references followed before declaring a cycle.
pub const MAX_PHANDLE_HOPS: u32 = 32;

/// Header fields, in file order.
struct Header {
    totalsize: u32,
    off_dt_struct: u32,
    off_dt_strings: u32,
    off_mem_rsvmap: u32,
    version: u32,
    last_comp_version: u32,
    boot_cpuid_phys: u32,
    size_dt_strings: u32,
    size_dt_struct: u32,
}

impl Header {
    fn parse(b: &[u8]) -> Option<Header> {
        Some(Header {
            totalsize: be32(b, 4)?,
            off_dt_struct: be32(b, 8)?,
            off_dt_strings: be32(b, 12)?,
            off_mem_rsvmap: be32(b, 16)?,
            version: be32(b, 20)?,
            last_comp_version: be32(b, 24)?,
            boot_cpuid_phys: be32(b, 28)?,
            size_dt_strings: be32(b, 32)?,
            size_dt_struct: be32(b, 36)?,
        })
    }
}

/// Checks that `start .. start + size` lies after the header and inside `totalsize`.
fn block_range(
    block: &'static str,
    start: u32,
    size: u32,
    totalsize: u32,
) -> Result<core::ops::Range<usize>, DtError> {
    if start < HEADER_SIZE {
        return Err(DtError::BlockOverHeader { block, start });
    }
    let end = start as u64 + size as u64;
    if end > totalsize as u64 {
        return Err(DtError::BlockOutOfBounds {
            block,
            start: start as u64,
            end,
            totalsize,
        });
    }
    Ok(start as usize..end as usize)
}

/// Refuses blocks that share bytes. A block placed over another (say the reservation map over the
/// structure block) makes the same bytes mean two things, so one of them is garbage: refused here
/// with the header named as the culprit rather than later as whatever the garbage looks like.
/// Empty blocks share no bytes with anything.
fn check_disjoint(blocks: &[(&'static str, core::ops::Range<usize>)]) -> Result<(), DtError> {
    for (i, (first, a)) in blocks.iter().enumerate() {
        for (second, b) in blocks.iter().skip(i + 1) {
            if a.start < b.end && b.start < a.end {
                return Err(DtError::BlocksOverlap {
                    first,
                    first_range: (a.start as u64, a.end as u64),
                    second,
                    second_range: (b.start as u64, b.end as u64),
                });
            }
        }
    }
    Ok(())
}

/// A validated device tree. Cheap to copy (a few slices and a reference to its node index, if it
/// has one).
///
/// Where the index lives: it is about 9 KiB, too big to copy with every `DeviceTree` and `Node`,
/// and must live as long as the tree, which is opened before any heap exists. So it is storage the
/// caller provides ([`DeviceTree::from_bytes_indexed`]); [`DeviceTree::from_ptr`] uses a `static`
/// slot for the one tree the kernel boots from, and [`DeviceTree::from_bytes`] builds no index.
/// Statics would not do for every tree: host tests open many trees at once on several threads. A
/// tree without an index answers every query the same, only more slowly (its walks start from the
/// root).
#[derive(Clone, Copy)]
pub struct DeviceTree<'a> {
    /// The blob, exactly `totalsize` bytes.
    bytes: &'a [u8],
    blob: Blob<'a>,
    root: Node<'a>,
    /// The reservation map's entries, without the terminator.
    rsvmap: &'a [u8],
    boot_cpuid_phys: u32,
    /// Physical address of the blob (see [`DeviceTree::phys_region`]).
    phys: PhysAddr,
    /// Where `/chosen`, `/cpus`, the memory nodes, ... are.
    landmarks: Landmarks,
}

impl core::fmt::Debug for DeviceTree<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceTree")
            .field("phys", &self.phys)
            .field("totalsize", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

impl<'a> DeviceTree<'a> {
    /// Opens a device tree held in `bytes` (which may be longer than the tree). No alignment is
    /// required: every field is read bytewise. The blob's physical address is assumed to be the
    /// slice's address (true while the MMU is off or identity-maps it); override it with
    /// [`DeviceTree::with_phys_base`] otherwise.
    ///
    /// The tree gets no node index (see [`DeviceTree::from_bytes_indexed`]).
    pub fn from_bytes(bytes: &'a [u8]) -> Result<DeviceTree<'a>, DtError> {
        Self::open(bytes, None).map(|(dt, _)| dt)
    }

    /// As [`DeviceTree::from_bytes`], and fills `index` with the tree's node index, which makes
    /// parent, sibling and path lookups cheap (see the type's documentation). A tree with more
    /// than [`MAX_INDEXED_NODES`] nodes is opened all the same, without an index.
    pub fn from_bytes_indexed(
        bytes: &'a [u8],
        index: &'a mut NodeIndex,
    ) -> Result<DeviceTree<'a>, DtError> {
        match Self::open(bytes, Some(&mut *index))? {
            (dt, true) => Ok(dt.with_index(index)),
            (dt, false) => Ok(dt),
        }
    }

    /// Whether the tree has a node index (see [`DeviceTree::from_bytes_indexed`]).
    pub fn is_indexed(&self) -> bool {
        self.blob.index.is_some()
    }

    /// Validates the blob, filling `index` if given, and returns the tree (without the index) and
    /// whether `index` now describes it.
    fn open(
        bytes: &'a [u8],
        index: Option<&mut NodeIndex>,
    ) -> Result<(DeviceTree<'a>, bool), DtError> {
        let addr = bytes.as_ptr() as usize as u64;
        let have = bytes.len() as u64;
        let magic = be32(bytes, 0).ok_or(DtError::Truncated {
            need: HEADER_SIZE as u64,
            have,
        })?;
        if magic != FDT_MAGIC {
            return Err(DtError::BadMagic { magic, addr });
        }
        let h = Header::parse(bytes).ok_or(DtError::Truncated {
            need: HEADER_SIZE as u64,
            have,
        })?;
        if h.totalsize < HEADER_SIZE || h.totalsize > MAX_TOTALSIZE {
            return Err(DtError::TotalSize {
                totalsize: h.totalsize,
            });
        }
        let bytes = bytes
            .get(..h.totalsize as usize)
            .ok_or(DtError::Truncated {
                need: h.totalsize as u64,
                have,
            })?;
        // Version 16 is the oldest with the layout we read; a last_comp_version above 17 means a
        // future format a version-17 reader must not interpret.
        if h.version < 16 || h.last_comp_version > 17 {
            return Err(DtError::Version {
                version: h.version,
                last_comp: h.last_comp_version,
            });
        }

        // Version 16 headers have no size_dt_struct: the block runs up to the next block (or the
        // end of the blob), and the walker stops at its FDT_END.
        let struct_size = if h.version >= 17 {
            h.size_dt_struct
        } else {
            let next = [h.off_dt_strings, h.off_mem_rsvmap]
                .into_iter()
                .filter(|&off| off > h.off_dt_struct)
                .fold(h.totalsize, u32::min);
            next.saturating_sub(h.off_dt_struct)
        };
        if !h.off_dt_struct.is_multiple_of(4) {
            return Err(DtError::BlockMisaligned {
                block: "structure",
                offset: h.off_dt_struct,
            });
        }
        if !h.off_mem_rsvmap.is_multiple_of(8) {
            return Err(DtError::BlockMisaligned {
                block: "memory reservation",
                offset: h.off_mem_rsvmap,
            });
        }
        let structs = block_range("structure", h.off_dt_struct, struct_size, h.totalsize)?;
        let strings = block_range("strings", h.off_dt_strings, h.size_dt_strings, h.totalsize)?;
        let rsv_start = block_range("memory reservation", h.off_mem_rsvmap, 0, h.totalsize)?.start;
        let rsvmap = memory::rsvmap_entries(bytes, rsv_start);
        // The map spans its entries and terminator. Without a terminator it still takes the 16
        // bytes one would: so a map placed on another block is reported as such, while one that
        // merely runs off the end is reported as unterminated.
        let rsv_len = rsvmap.map_or(memory::RSV_ENTRY, |e| e.len() + memory::RSV_ENTRY);
        check_disjoint(&[
            ("memory reservation", rsv_start..rsv_start + rsv_len),
            ("structure", structs.clone()),
            ("strings", strings.clone()),
        ])?;
        let rsvmap = rsvmap?;

        let blob = Blob {
            structs: bytes.get(structs).unwrap_or_default(),
            strings: bytes.get(strings).unwrap_or_default(),
            index: None,
        };
        let found = blob.validate(index)?;
        let root = blob.node_at(found.root).ok_or(DtError::Structure {
            offset: found.root as u32,
            what: "no root node",
        })?;
        let dt = DeviceTree {
            bytes,
            blob,
            root,
            rsvmap,
            boot_cpuid_phys: h.boot_cpuid_phys,
            phys: PhysAddr::new(addr),
            landmarks: found.landmarks,
        };
        Ok((dt, found.indexed))
    }

    /// The same tree, served through `index`, which the validator must have filled from this
    /// very blob (see `open`).
    fn with_index(mut self, index: &'a NodeIndex) -> Self {
        self.blob.index = Some(index);
        self.root.blob.index = Some(index);
        self
    }

    /// Opens the device tree the boot loader left at `ptr` (x0 on arm64, r2 on arm).
    ///
    /// Checks, before building any slice longer than the header: not null, 8-byte aligned (the
    /// spec's requirement), the magic, and a plausible `totalsize`; then validates the whole blob
    /// as [`DeviceTree::from_bytes`] does.
    ///
    /// The first tree this opens successfully gets the node index kept in a `static` (the kernel
    /// calls this once, for the tree it boots from); later ones get none. Taking that slot is an
    /// atomic operation, so call this with the MMU on, as the kernel does (the checks before
    /// validation, which are all the boot path needs with the MMU off, touch no atomic).
    ///
    /// # Safety
    /// If `ptr` is non-null and aligned, it must be readable for 4 bytes; if those hold the FDT
    /// magic, for the 40-byte header; and then for the `totalsize` bytes the header claims (at most
    /// [`MAX_TOTALSIZE`]). That memory must stay unmodified for the rest of the kernel's life
    /// (the boot memory map reserves it, see `mm::memmap`).
    pub unsafe fn from_ptr(ptr: *const u8) -> Result<DeviceTree<'static>, DtError> {
        if ptr.is_null() {
            return Err(DtError::NullPointer);
        }
        let addr = ptr as usize as u64;
        if !addr.is_multiple_of(8) {
            return Err(DtError::Misaligned { addr });
        }
        // SAFETY: the caller guarantees 4 readable bytes at a non-null, aligned `ptr`.
        let magic_bytes = unsafe { core::slice::from_raw_parts(ptr, 4) };
        let magic = be32(magic_bytes, 0).unwrap_or(0);
        if magic != FDT_MAGIC {
            return Err(DtError::BadMagic { magic, addr });
        }
        // SAFETY: the magic matched, so the caller guarantees the 40-byte header is readable.
        let header = unsafe { core::slice::from_raw_parts(ptr, HEADER_SIZE as usize) };
        let totalsize = be32(header, 4).unwrap_or(0);
        if !(HEADER_SIZE..=MAX_TOTALSIZE).contains(&totalsize)
            || addr.checked_add(totalsize as u64).is_none()
        {
            return Err(DtError::TotalSize { totalsize });
        }
        // SAFETY: the caller guarantees `totalsize` (checked to be at most MAX_TOTALSIZE and not
        // to wrap the address space) readable, unmodified bytes at `ptr` for 'static.
        let bytes = unsafe { core::slice::from_raw_parts(ptr, totalsize as usize) };
        let Some(mut slot) = BOOT_INDEX.try_lock() else {
            return DeviceTree::from_bytes(bytes);
        };
        // Validate into the slot while holding the lock; keep it (by leaking the guard, so that
        // the lock is never released) only for a tree that opened with a complete index, so a
        // refused blob leaves the slot to the next caller.
        match DeviceTree::open(bytes, Some(&mut slot))? {
            (dt, true) => Ok(dt.with_index(spin::MutexGuard::leak(slot))),
            (dt, false) => Ok(dt),
        }
    }

    /// The same tree, recorded as living at physical address `base` (for when the blob is read
    /// through an address that is not its physical one).
    pub fn with_phys_base(self, base: PhysAddr) -> Self {
        DeviceTree { phys: base, ..self }
    }

    /// `totalsize` from the header: the number of bytes the blob occupies.
    pub fn totalsize(&self) -> usize {
        self.bytes.len()
    }

    /// The whole blob.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Where the blob lies in physical memory (to be reserved). `None` only if base + totalsize
    /// wraps, which `from_ptr` already rules out.
    pub fn phys_region(&self) -> Option<Region> {
        Region::new(self.phys, self.totalsize() as u64)
    }

    /// `boot_cpuid_phys` from the header.
    pub fn boot_cpuid_phys(&self) -> u32 {
        self.boot_cpuid_phys
    }

    pub fn root(&self) -> Node<'a> {
        self.root
    }

    /// Every node, depth-first in blob order (root first).
    pub fn nodes(&self) -> AllNodes<'a> {
        AllNodes::new(self.blob)
    }

    /// The node at an absolute path such as `/soc/serial@7e201000`. A component without a unit
    /// address also matches a node that has one (`/memory` finds `memory@0`), as in libfdt.
    /// No alias resolution (see [`DeviceTree::alias`]).
    pub fn find_node(&self, path: &str) -> Option<Node<'a>> {
        let rest = path.strip_prefix('/')?;
        match self.landmarks.find(rest) {
            Some(found) => found.and_then(|off| self.blob.node_at(off)),
            None => self.find_relative(self.root, rest),
        }
    }

    fn find_relative(&self, from: Node<'a>, rel: &str) -> Option<Node<'a>> {
        rel.split('/')
            .filter(|c| !c.is_empty())
            .try_fold(from, |node, comp| node.child(comp))
    }

    /// Available nodes (status okay or absent) whose `compatible` list contains `compat`.
    pub fn find_compatible<'c>(&self, compat: &'c str) -> CompatibleNodes<'a, 'c> {
        CompatibleNodes {
            nodes: self.nodes(),
            compat,
        }
    }

    /// The root's `#address-cells` and `#size-cells` (see [`Cells::of_root`]): the width of CPU
    /// physical addresses and sizes, each 1 or 2. The boot path checks them first, so that a tree
    /// whose root cells are unusable is refused naming `/`, not by whichever reader meets them
    /// first (the console's `reg`, the memory nodes, ...).
    pub fn root_cells(&self) -> Result<Cells, DtError> {
        Cells::of_root(&self.root)
    }

    /// Root `model`, if present.
    pub fn model(&self) -> Result<Option<&'a str>, DtError> {
        self.root.property("model").map(|p| p.as_str()).transpose()
    }

    /// Root `compatible` list (the board identity).
    pub fn root_compatible(&self) -> Result<StrList<'a>, DtError> {
        match self.root.property("compatible") {
            Some(p) => p.as_str_list(),
            None => Ok(StrList::default()),
        }
    }

    /// The node whose `phandle` (or legacy `linux,phandle`) is `phandle`. Errors if the value is
    /// reserved (0, 0xffffffff), unknown, or defined by two nodes (ambiguous: refuse to guess).
    pub fn node_by_phandle(&self, phandle: u32) -> Result<Node<'a>, DtError> {
        if phandle == 0 || phandle == u32::MAX {
            return Err(DtError::Phandle {
                phandle,
                what: "reserved value",
            });
        }
        let mut found = None;
        for node in self.nodes() {
            let own = node
                .property("phandle")
                .or_else(|| node.property("linux,phandle"))
                .and_then(|p| p.as_u32().ok());
            if own == Some(phandle) {
                if found.is_some() {
                    return Err(DtError::Phandle {
                        phandle,
                        what: "defined by more than one node",
                    });
                }
                found = Some(node);
            }
        }
        found.ok_or(DtError::Phandle {
            phandle,
            what: "no node has this phandle",
        })
    }

    /// The node `phandle`, read from property `prop`, refers to: as [`DeviceTree::node_by_phandle`],
    /// with errors naming `prop` and its node (a bare "phandle 0x9999: no node has this phandle"
    /// does not say where to look).
    pub fn phandle_target(&self, prop: &Property<'_>, phandle: u32) -> Result<Node<'a>, DtError> {
        self.node_by_phandle(phandle).map_err(|e| match e {
            DtError::Phandle { phandle, what } => prop.phandle_error(phandle, what),
            other => other,
        })
    }

    /// The node referenced by the single-phandle property `prop` of `node`, if present. Errors
    /// name the property (see [`DeviceTree::phandle_target`]).
    pub fn phandle_ref(&self, node: &Node<'a>, prop: &str) -> Result<Option<Node<'a>>, DtError> {
        match node.property(prop) {
            None => Ok(None),
            Some(p) => self.phandle_target(&p, p.as_phandle()?).map(Some),
        }
    }

    /// The interrupt controller `node`'s interrupts go to, found as Linux's `of_irq_find_parent`
    /// does: follow `interrupt-parent` (or, where absent, the tree parent) until a node with
    /// `#interrupt-cells`. A chain that does not end within [`MAX_PHANDLE_HOPS`] is an error (a
    /// cyclic `interrupt-parent` would otherwise loop forever).
    pub fn interrupt_parent(&self, node: &Node<'a>) -> Result<Node<'a>, DtError> {
        let mut cur = *node;
        for _ in 0..MAX_PHANDLE_HOPS {
            let next = match self.phandle_ref(&cur, "interrupt-parent")? {
                Some(n) => n,
                None => cur.parent().ok_or_else(|| DtError::NotFound {
                    what: "interrupt parent (reached the root) of node",
                    name: node.short_name(),
                })?,
            };
            if next.has_property("#interrupt-cells") {
                return Ok(next);
            }
            cur = next;
        }
        Err(DtError::Loop {
            what: "interrupt-parent chain",
            node: node.short_name(),
            hops: MAX_PHANDLE_HOPS,
        })
    }

    /// The node an `/aliases` entry names. `Ok(None)` if there is no such alias; an error if the
    /// alias is malformed or names a node that does not exist.
    pub fn alias(&self, name: &str) -> Result<Option<Node<'a>>, DtError> {
        let Some(prop) = self.find_node("/aliases").and_then(|a| a.property(name)) else {
            return Ok(None);
        };
        let path = prop.as_str()?;
        if !path.starts_with('/') {
            return Err(prop.error("alias is not an absolute path"));
        }
        self.find_node(path)
            .map(Some)
            .ok_or_else(|| DtError::NotFound {
                what: "node named by alias",
                name: Name::new(path),
            })
    }

    /// The CPU physical regions of `node`'s `reg`, translated through every parent bus's `ranges`.
    /// `Ok(None)` if the node has no `reg`.
    pub fn reg(&self, node: &Node<'a>) -> Result<Option<TranslatedRegs<'a>>, DtError> {
        match node.property("reg") {
            None => Ok(None),
            Some(p) => TranslatedRegs::new(*node, p, RangesProp::Ranges).map(Some),
        }
    }

    /// The first `reg` region of `node`, translated (the usual "where are its registers").
    pub fn reg0(&self, node: &Node<'a>) -> Result<Region, DtError> {
        self.reg(node)?
            .and_then(|mut r| r.next())
            .unwrap_or_else(|| {
                Err(DtError::NotFound {
                    what: "reg of node",
                    name: node.short_name(),
                })
            })
    }
}

/// Iterator returned by [`DeviceTree::find_compatible`].
pub struct CompatibleNodes<'a, 'c> {
    nodes: AllNodes<'a>,
    compat: &'c str,
}

impl<'a> Iterator for CompatibleNodes<'a, '_> {
    type Item = Node<'a>;

    fn next(&mut self) -> Option<Node<'a>> {
        let compat = self.compat;
        self.nodes
            .by_ref()
            .find(|n| n.is_available() && n.is_compatible(compat))
    }
}

#[cfg(test)]
pub(crate) mod fixtures;

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use crate::mm::memmap::MemoryMap;
    use proptest::prelude::*;

    fn open(b: &[u8]) -> DeviceTree<'_> {
        DeviceTree::from_bytes(b).unwrap()
    }

    /// Builds a blob by hand: header, empty reservation map, `structs`, then `strings`.
    fn build(structs: &[u8], strings: &[u8]) -> Vec<u8> {
        let off_rsv = 40u32;
        let off_struct = off_rsv + 16;
        let off_strings = off_struct + structs.len() as u32;
        let total = off_strings + strings.len() as u32;
        let mut b = Vec::new();
        for v in [
            FDT_MAGIC,
            total,
            off_struct,
            off_strings,
            off_rsv,
            17,
            16,
            0,
            strings.len() as u32,
            structs.len() as u32,
        ] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(structs);
        b.extend_from_slice(strings);
        b
    }

    /// Structure-block tokens for `build`.
    enum T<'s> {
        Begin(&'s str),
        Prop(u32, &'s [u8]),
        End,
        Nop,
        Finish,
        Raw(u32),
    }

    fn tokens(ts: &[T<'_>]) -> Vec<u8> {
        let mut b = Vec::new();
        let pad = |b: &mut Vec<u8>| {
            while !b.len().is_multiple_of(4) {
                b.push(0)
            }
        };
        for t in ts {
            match t {
                T::Begin(name) => {
                    b.extend_from_slice(&1u32.to_be_bytes());
                    b.extend_from_slice(name.as_bytes());
                    b.push(0);
                    pad(&mut b);
                }
                T::Prop(nameoff, value) => {
                    b.extend_from_slice(&3u32.to_be_bytes());
                    b.extend_from_slice(&(value.len() as u32).to_be_bytes());
                    b.extend_from_slice(&nameoff.to_be_bytes());
                    b.extend_from_slice(value);
                    pad(&mut b);
                }
                T::End => b.extend_from_slice(&2u32.to_be_bytes()),
                T::Nop => b.extend_from_slice(&4u32.to_be_bytes()),
                T::Finish => b.extend_from_slice(&9u32.to_be_bytes()),
                T::Raw(v) => b.extend_from_slice(&v.to_be_bytes()),
            }
        }
        b
    }

    /// Strings block for the hand-built trees: "compatible" at 0, "reg" at 11.
    const STRINGS: &[u8] = b"compatible\0reg\0";

    fn structure_error(ts: &[T<'_>]) -> &'static str {
        let blob = build(&tokens(ts), STRINGS);
        match DeviceTree::from_bytes(&blob) {
            Err(DtError::Structure { what, .. }) => what,
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn every_fixture_opens_and_matches_the_fdt_crate() {
        // The fdt crate is an independent parser; on these well-formed trees it must see exactly
        // the nodes and properties we do.
        for (name, bytes) in VALID {
            let dt = open(bytes);
            if *name == "qemu-raspi4b-downstream" {
                // QEMU deleted nodes from this tree by overwriting them with FDT_NOP, which
                // fdt 0.1.5 mishandles (it loses 87 nodes). `dtc -I dtb -O dts` shows 317 nodes.
                assert_eq!(dt.nodes().count(), 317);
                continue;
            }
            let reference = fdt::Fdt::new(bytes).unwrap();
            let ours: Vec<_> = dt.nodes().collect();
            let theirs: Vec<_> = reference.all_nodes().collect();
            assert_eq!(ours.len(), theirs.len(), "{name}: node count");
            for (a, b) in ours.iter().zip(&theirs) {
                let a_name = if a.name().is_empty() { "/" } else { a.name() };
                assert_eq!(a_name, b.name, "{name}");
                let pa: Vec<_> = a.properties().map(|p| (p.name, p.value)).collect();
                let pb: Vec<_> = b.properties().map(|p| (p.name, p.value)).collect();
                assert_eq!(pa, pb, "{name}: properties of {}", b.name);
            }
            assert_eq!(dt.totalsize(), reference.total_size(), "{name}");
        }
    }

    #[test]
    fn header_errors() {
        assert_eq!(
            DeviceTree::from_bytes(&[]).unwrap_err(),
            DtError::Truncated { need: 40, have: 0 }
        );
        assert_eq!(
            DeviceTree::from_bytes(&RESERVED[..39]).unwrap_err(),
            DtError::Truncated { need: 40, have: 39 }
        );
        let e = DeviceTree::from_bytes(BAD_MAGIC).unwrap_err();
        assert!(
            matches!(
                e,
                DtError::BadMagic {
                    magic: 0xd00d_feef,
                    ..
                }
            ),
            "{e:?}"
        );
        // reserved.dtb is 0x55e = 1374 bytes; the fixture keeps the first 1000.
        assert_eq!(
            DeviceTree::from_bytes(TRUNCATED).unwrap_err(),
            DtError::Truncated {
                need: 1374,
                have: 1000
            }
        );
        let patched = |off: usize, v: u32| {
            let mut b = RESERVED.to_vec();
            b[off..off + 4].copy_from_slice(&v.to_be_bytes());
            DeviceTree::from_bytes(&b).err()
        };
        assert_eq!(patched(4, 39), Some(DtError::TotalSize { totalsize: 39 }));
        assert_eq!(
            patched(4, 65 << 20),
            Some(DtError::TotalSize {
                totalsize: 65 << 20
            })
        );
        assert_eq!(
            patched(20, 15),
            Some(DtError::Version {
                version: 15,
                last_comp: 16
            })
        );
        assert_eq!(
            patched(24, 18),
            Some(DtError::Version {
                version: 17,
                last_comp: 18
            })
        );
        // reserved.dtb: off_dt_struct 0x58; a structure block of 0x1000 bytes runs past 1374.
        let e = patched(36, 0x1000).unwrap();
        assert_eq!(
            e,
            DtError::BlockOutOfBounds {
                block: "structure",
                start: 0x58,
                end: 0x1058,
                totalsize: 1374
            }
        );
        assert_eq!(
            format!("{e}"),
            "truncated: header says 1374 bytes, structure block spans 0x58..0x1058"
        );
        // A block starting inside the header overlaps it; that is not a truncation.
        let e = patched(12, 0x10).unwrap();
        assert_eq!(
            e,
            DtError::BlockOverHeader {
                block: "strings",
                start: 0x10
            }
        );
        assert_eq!(
            format!("{e}"),
            "strings block at 0x10 overlaps the header (0x0..0x28)"
        );
        assert_eq!(
            patched(8, 0x10),
            Some(DtError::BlockOverHeader {
                block: "structure",
                start: 0x10
            })
        );
        assert_eq!(
            patched(16, 0x10),
            Some(DtError::BlockOverHeader {
                block: "memory reservation",
                start: 0x10
            })
        );
        assert!(matches!(
            patched(12, 0xffff_ffff),
            Some(DtError::BlockOutOfBounds { .. })
        ));
        assert_eq!(
            patched(8, 0x5a),
            Some(DtError::BlockMisaligned {
                block: "structure",
                offset: 0x5a
            })
        );
        assert!(matches!(
            patched(16, 0x2c),
            Some(DtError::BlockMisaligned { .. })
        ));
        // reserved.dtb's blocks: reservation map 0x28..0x58 (two entries and the terminator),
        // structure 0x58..0x498, strings 0x498..0x55e. The reservation map moved to the last
        // 8 bytes of the blob lands in the strings block (and has no room for a terminator).
        assert_eq!(
            patched(16, 1368),
            Some(DtError::BlocksOverlap {
                first: "memory reservation",
                first_range: (0x558, 0x568),
                second: "strings",
                second_range: (0x498, 0x55e)
            })
        );
        // The strings block moved onto the structure block.
        let e = patched(12, 0x58).unwrap();
        assert_eq!(
            e,
            DtError::BlocksOverlap {
                first: "structure",
                first_range: (0x58, 0x498),
                second: "strings",
                second_range: (0x58, 0x11e)
            }
        );
        assert_eq!(
            format!("{e}"),
            "structure block 0x58..0x498 overlaps the strings block 0x58..0x11e"
        );
        // The reservation map moved onto the structure block: wherever its walk through the
        // tokens ends, it starts inside that block.
        let e = patched(16, 0x58).unwrap();
        assert!(
            matches!(
                e,
                DtError::BlocksOverlap {
                    first: "memory reservation",
                    first_range: (0x58, _),
                    second: "structure",
                    second_range: (0x58, 0x498)
                }
            ),
            "{e:?}"
        );
        assert!(
            format!("{e}").starts_with("memory reservation block 0x58.."),
            "{e}"
        );
        // Version 16 has no size_dt_struct: the structure block ends where the strings block
        // begins, which is no overlap.
        let v16 = {
            let mut b = RESERVED.to_vec();
            b[20..24].copy_from_slice(&16u32.to_be_bytes());
            b
        };
        assert_eq!(open(&v16).nodes().count(), open(RESERVED).nodes().count());
    }

    #[test]
    fn block_layouts() {
        use T::*;
        let t = tokens(&[Begin(""), End, Finish]);
        // An empty strings block placed at the structure block's offset shares no byte with it.
        let mut b = build(&t, b"");
        b[12..16].copy_from_slice(&56u32.to_be_bytes());
        assert_eq!(open(&b).root().properties().count(), 0);
        // A reservation map after the other blocks without a (0, 0) terminator: the blob is
        // 40 + 16 + 16 = 72 bytes; the map appended at 72 holds one entry and runs off the end.
        let mut b = build(&t, b"");
        assert_eq!(b.len(), 72);
        b.extend_from_slice(&[1; 16]);
        let total = b.len() as u32;
        b[4..8].copy_from_slice(&total.to_be_bytes());
        b[16..20].copy_from_slice(&72u32.to_be_bytes());
        assert_eq!(
            DeviceTree::from_bytes(&b).unwrap_err(),
            DtError::MemReserveUnterminated
        );
        // With a terminator it opens, and the entry is read.
        b.extend_from_slice(&[0; 16]);
        let total = b.len() as u32;
        b[4..8].copy_from_slice(&total.to_be_bytes());
        let dt = open(&b);
        assert_eq!(dt.mem_reserve().count(), 1);
    }

    #[test]
    fn structure_errors() {
        use T::*;
        let ok = tokens(&[
            Begin(""),
            Nop,
            Prop(0, b"a\0"),
            Nop,
            Begin("c"),
            End,
            Nop,
            End,
            Finish,
        ]);
        let dt_bytes = build(&ok, STRINGS);
        let dt = open(&dt_bytes);
        // NOPs between properties and nodes are skipped everywhere.
        assert_eq!(dt.root().compatible().first(), Some("a"));
        assert_eq!(
            dt.root().children().map(|c| c.name()).collect::<Vec<_>>(),
            ["c"]
        );

        assert_eq!(
            structure_error(&[Begin(""), Begin("c"), End, Prop(0, b"a\0"), End, Finish]),
            "property after a subnode"
        );
        assert_eq!(
            structure_error(&[Begin(""), End, End, Finish]),
            "FDT_END_NODE without a matching FDT_BEGIN_NODE"
        );
        assert_eq!(
            structure_error(&[Begin(""), End]),
            "structure block ends without FDT_END"
        );
        assert_eq!(
            structure_error(&[Begin(""), Raw(7), End, Finish]),
            "unknown token"
        );
        assert_eq!(
            structure_error(&[Begin(""), Begin("c"), End, Finish]),
            "FDT_END inside an unclosed node"
        );
        assert_eq!(structure_error(&[Finish]), "no root node");
        assert_eq!(
            structure_error(&[Begin(""), End, Begin(""), End, Finish]),
            "second top-level node after the root"
        );
        assert_eq!(
            structure_error(&[Prop(0, b"a\0"), Begin(""), End, Finish]),
            "property outside any node"
        );
        assert_eq!(
            structure_error(&[Begin(""), Begin(""), End, End, Finish]),
            "node without a name"
        );
        assert_eq!(
            structure_error(&[Begin(""), Begin("a b"), End, End, Finish]),
            "node name contains invalid characters"
        );
        // STRINGS is 15 bytes: "compatible" at 0 and its NUL at 10, "reg" at 11 and its NUL at
        // 14. Every string in it is a valid name, so only the name's first byte is looked at.
        let name_error = |nameoff| {
            let blob = build(
                &tokens(&[Begin(""), Prop(nameoff, b""), End, Finish]),
                STRINGS,
            );
            DeviceTree::from_bytes(&blob).err()
        };
        let e = name_error(100).unwrap();
        assert_eq!(
            e,
            DtError::PropertyName {
                offset: 8,
                nameoff: 100,
                what: "lies outside the strings block"
            }
        );
        assert_eq!(
            format!("{e}"),
            "malformed structure block at offset 0x8: property name at strings-block offset \
             0x64 lies outside the strings block"
        );
        assert_eq!(
            name_error(15),
            Some(DtError::PropertyName {
                offset: 8,
                nameoff: 15,
                what: "lies outside the strings block"
            })
        );
        // The NULs: empty names, which the specification does not allow.
        for nameoff in [10, 14] {
            let e = name_error(nameoff).unwrap();
            assert_eq!(
                format!("{e}"),
                format!(
                    "malformed structure block at offset 0x8: property name at strings-block \
                     offset {nameoff:#x} is empty (names have 1 to 31 characters)"
                )
            );
        }
        // Offset 13 is inside "reg": "g" is a valid (if odd) name.
        assert_eq!(name_error(13), None);
        // A property whose length runs far past the block.
        let mut t = tokens(&[Begin("")]);
        t.extend_from_slice(&3u32.to_be_bytes());
        t.extend_from_slice(&u32::MAX.to_be_bytes());
        t.extend_from_slice(&0u32.to_be_bytes());
        t.extend_from_slice(&tokens(&[End, Finish]));
        assert!(matches!(
            DeviceTree::from_bytes(&build(&t, STRINGS)),
            Err(DtError::Structure {
                what: "property value runs past the end of the structure block",
                ..
            })
        ));
        // A node name without its NUL at the very end of the block.
        let mut t = tokens(&[Begin("")]);
        t.extend_from_slice(&1u32.to_be_bytes());
        t.extend_from_slice(b"abcd");
        assert_eq!(
            DeviceTree::from_bytes(&build(&t, STRINGS)).err(),
            Some(DtError::Structure {
                offset: 8,
                what: "node name not NUL-terminated"
            })
        );
    }

    #[test]
    fn nesting_depth_is_bounded() {
        let nested = |depth: usize| {
            let mut ts = vec![T::Begin("")];
            ts.extend((1..depth).map(|_| T::Begin("n")));
            ts.extend((0..depth).map(|_| T::End));
            ts.push(T::Finish);
            build(&tokens(&ts), STRINGS)
        };
        let deep = nested(MAX_DEPTH);
        let dt = open(&deep);
        let deepest = dt.nodes().last().unwrap();
        assert_eq!(deepest.depth(), MAX_DEPTH);
        assert_eq!(
            format!("{}", deepest.path()).matches("/n").count(),
            MAX_DEPTH - 1
        );
        assert!(matches!(
            DeviceTree::from_bytes(&nested(MAX_DEPTH + 1)),
            Err(DtError::Structure {
                what: "nodes nested deeper than 32 levels",
                ..
            })
        ));
    }

    /// Strings block for the trees of the index and landmark tests, with the offset of each name.
    const NAMES: &[u8] = b"reg\0device_type\0status\0#address-cells\0#size-cells\0";
    const REG: u32 = 0;
    const DEVICE_TYPE: u32 = 4;
    const STATUS: u32 = 16;
    const ADDRESS_CELLS: u32 = 23;
    const SIZE_CELLS: u32 = 38;

    fn cell(v: u32) -> [u8; 4] {
        v.to_be_bytes()
    }

    /// `node.child(name)` as first written (two passes over the children, names decoded): the
    /// model for the one-pass, in-place comparison.
    fn child_model<'a>(node: &Node<'a>, name: &str) -> Option<Node<'a>> {
        node.children().find(|c| c.name() == name).or_else(|| {
            if name.contains('@') {
                None
            } else {
                node.children().find(|c| c.base_name() == name)
            }
        })
    }

    #[test]
    fn child_lookup_follows_the_libfdt_rule() {
        use T::*;
        let t = tokens(&[
            Begin(""),
            Begin("a@1"),
            End,
            Begin("a"),
            End,
            Begin("a@2"),
            End,
            Begin("b@1"),
            End,
            Begin("@x"),
            End,
            Begin("bb"),
            End,
            End,
            Finish,
        ]);
        let blob = build(&t, STRINGS);
        let mut index = NodeIndex::new();
        for dt in [
            open(&blob),
            DeviceTree::from_bytes_indexed(&blob, &mut index).unwrap(),
        ] {
            let root = dt.root();
            let found = |q| root.child(q).map(|n| n.name());
            assert_eq!(
                found("a"),
                Some("a"),
                "an exact name beats an earlier base name"
            );
            assert_eq!(found("a@2"), Some("a@2"));
            assert_eq!(found("b"), Some("b@1"));
            assert_eq!(
                found("b@"),
                None,
                "a unit address turns the base-name rule off"
            );
            assert_eq!(found(""), Some("@x"), "`@x` has an empty base name");
            assert_eq!(found("bbb"), None);
        }
        // And on every fixture, against the model.
        for (name, bytes) in VALID {
            let mut index = NodeIndex::new();
            for dt in [
                open(bytes),
                DeviceTree::from_bytes_indexed(bytes, &mut index).unwrap(),
            ] {
                for node in dt.nodes().take(40) {
                    let names: Vec<&str> = node.children().take(12).map(|c| c.name()).collect();
                    let queries = names.iter().flat_map(|n| {
                        [
                            *n,
                            n.split('@').next().unwrap_or(n),
                            n.get(..3).unwrap_or(n),
                        ]
                    });
                    for q in queries.chain(["", "@", "zz"]) {
                        assert_eq!(node.child(q), child_model(&node, q), "{name}: {q:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn landmarks_follow_the_lookup_rule() {
        use T::*;
        let t = tokens(&[
            Begin(""),
            Begin("chosen@1"),
            End,
            Begin("chosen"),
            End,
            Begin("cpus@0"),
            End,
            Begin("cpus@1"),
            End,
            Begin("psci-x"),
            End,
            Begin("soc"),
            Begin("aliases"),
            End,
            Begin("reserved-memory"),
            End,
            End,
            End,
            Finish,
        ]);
        let blob = build(&t, STRINGS);
        let mut index = NodeIndex::new();
        for dt in [
            open(&blob),
            DeviceTree::from_bytes_indexed(&blob, &mut index).unwrap(),
        ] {
            let found = |p| dt.find_node(p).map(|n| n.name());
            assert_eq!(found("/chosen"), Some("chosen"));
            assert_eq!(found("/cpus"), Some("cpus@0"));
            assert_eq!(found("/psci"), None);
            assert_eq!(found("/aliases"), None, "only children of the root count");
            assert_eq!(found("/reserved-memory"), None);
            assert_eq!(found("/soc/aliases"), Some("aliases"));
        }
        for (name, bytes) in VALID {
            let mut index = NodeIndex::new();
            for dt in [
                open(bytes),
                DeviceTree::from_bytes_indexed(bytes, &mut index).unwrap(),
            ] {
                for l in ["chosen", "aliases", "cpus", "psci", "reserved-memory"] {
                    let walked = child_model(&dt.root(), l);
                    assert_eq!(dt.find_node(&format!("/{l}")), walked, "{name}: {l}");
                }
            }
        }
    }

    /// A root with #address-cells = #size-cells = 1 and the given children: (name, device_type,
    /// status, reg base). `device_type` may be two values, the first one counting.
    fn memory_tree(nodes: &[(&str, &[&str], Option<&str>, u32)]) -> Vec<u8> {
        let mut t = tokens(&[T::Begin("")]);
        let prop = |t: &mut Vec<u8>, name: u32, value: &[u8]| {
            t.extend_from_slice(&tokens(&[T::Prop(name, value)]));
        };
        prop(&mut t, ADDRESS_CELLS, &cell(1));
        prop(&mut t, SIZE_CELLS, &cell(1));
        for (name, types, status, base) in nodes {
            t.extend_from_slice(&tokens(&[T::Begin(name)]));
            for ty in *types {
                prop(&mut t, DEVICE_TYPE, format!("{ty}\0").as_bytes());
            }
            if let Some(st) = status {
                prop(&mut t, STATUS, format!("{st}\0").as_bytes());
            }
            prop(&mut t, REG, &[cell(*base), cell(0x1000)].concat());
            t.extend_from_slice(&tokens(&[T::End]));
        }
        t.extend_from_slice(&tokens(&[T::End, T::Finish]));
        build(&t, NAMES)
    }

    /// RAM as `DeviceTree::memory` should find it: every available node whose (first)
    /// `device_type` is "memory", in blob order, found by looking at every node.
    fn memory_model(dt: &DeviceTree<'_>) -> Vec<(u64, u64)> {
        dt.nodes()
            .filter(|n| n.device_type() == Some("memory") && n.is_available())
            .flat_map(|n| dt.reg(&n).unwrap().unwrap())
            .map(|r| {
                let r = r.unwrap();
                (r.base().as_u64(), r.size())
            })
            .collect()
    }

    #[test]
    fn memory_nodes_are_found_without_a_scan() {
        let names: Vec<String> = (0..12).map(|i| format!("mem@{i:x}")).collect();
        let few: Vec<(&str, &[&str], Option<&str>, u32)> = vec![
            ("cpu@0", &["cpu"], None, 0x100),
            (&names[0], &["memory"], None, 0x4000_0000),
            ("twice", &["memory", "memory"], None, 0x5000_0000),
            ("cpu-first", &["cpu", "memory"], None, 0x6000_0000),
            ("off", &["memory"], Some("disabled"), 0x7000_0000),
            (&names[1], &["memory"], Some("okay"), 0x8000_0000),
        ];
        // More memory nodes than the validator lists: then every node is looked at.
        let mut many = few.clone();
        many.extend(names[2..].iter().enumerate().map(|(i, n)| {
            (
                n.as_str(),
                &["memory"][..],
                None,
                0x9000_0000 + i as u32 * 0x1000,
            )
        }));
        for (nodes, expect) in [(&few, 3), (&many, 13)] {
            let blob = memory_tree(nodes);
            let mut index = NodeIndex::new();
            for dt in [
                open(&blob),
                DeviceTree::from_bytes_indexed(&blob, &mut index).unwrap(),
            ] {
                let found: Vec<_> = dt
                    .memory()
                    .map(|r| {
                        let r = r.unwrap();
                        (r.base().as_u64(), r.size())
                    })
                    .collect();
                assert_eq!(found, memory_model(&dt));
                assert_eq!(found.len(), expect);
            }
        }
    }

    #[test]
    fn index_is_optional_beyond_its_capacity() {
        for n in [MAX_INDEXED_NODES - 1, MAX_INDEXED_NODES] {
            // A root and `n` children: the index holds MAX_INDEXED_NODES nodes.
            let names: Vec<String> = (0..n).map(|i| format!("n@{i:x}")).collect();
            let mut ts = vec![T::Begin("")];
            for name in &names {
                ts.extend([T::Begin(name), T::End]);
            }
            ts.extend([T::End, T::Finish]);
            let blob = build(&tokens(&ts), STRINGS);
            let mut index = NodeIndex::new();
            assert!(same_with_index(&blob, &mut index, 50));
            let dt = DeviceTree::from_bytes_indexed(&blob, &mut index).unwrap();
            assert_eq!(dt.is_indexed(), n < MAX_INDEXED_NODES, "{n} children");
            assert_eq!(dt.nodes().count(), n + 1);
            let last = dt.find_node(&format!("/n@{:x}", n - 1)).unwrap();
            assert_eq!(last.parent(), Some(dt.root()));
            assert_eq!(last.depth(), 2);
            assert_eq!(dt.root().children().count(), n);
        }
    }

    #[test]
    fn property_names_outside_clean_strings_blocks() {
        use T::*;
        // "compatible" at 0, an unreferenced stray byte and "bad" at 11, "reg" at 16, and an
        // unterminated "ab" at 20: names are then checked one by one.
        let strings = b"compatible\0\x01bad\0reg\0ab";
        let opened = |nameoff| {
            let t = tokens(&[Begin(""), Prop(nameoff, b""), End, Finish]);
            let blob = build(&t, strings);
            let mut index = NodeIndex::new();
            same_with_index(&blob, &mut index, usize::MAX);
            DeviceTree::from_bytes(&blob).map(|dt| dt.root().properties().count())
        };
        assert_eq!(opened(0), Ok(1));
        assert_eq!(opened(16), Ok(1));
        assert_eq!(opened(13), Ok(1), "the tail \"d\" of \"bad\" is a name");
        let refused = |nameoff, what| {
            Err(DtError::PropertyName {
                offset: 8,
                nameoff,
                what,
            })
        };
        assert_eq!(opened(11), refused(11, "contains invalid characters"));
        assert_eq!(
            opened(20),
            refused(20, "is not NUL-terminated inside the strings block")
        );
        assert_eq!(opened(22), refused(22, "lies outside the strings block"));
        assert_eq!(
            opened(10),
            refused(10, "is empty (names have 1 to 31 characters)")
        );
    }

    #[test]
    fn blob_cut_inside_its_strings_block() {
        // What the boot loader hands over when the file was cut 0x20 bytes into its strings
        // block but the header kept: `totalsize` bytes of which the tail reads as zeros. The
        // names past the cut are empty strings, so the tree is refused as malformed (before,
        // it opened and had no memory node).
        let h = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let mut b = QEMU_VIRT_A53_128M.to_vec();
        let cut = h(&b, 12) as usize + 0x20;
        b[cut..].fill(0);
        match DeviceTree::from_bytes(&b) {
            Err(DtError::PropertyName { nameoff, what, .. }) => {
                assert!(nameoff >= 0x20, "{nameoff:#x}");
                assert_eq!(what, "is empty (names have 1 to 31 characters)");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn from_ptr_indexes_one_tree_only() {
        let mut aligned = vec![0u64; QEMU_VIRT_A53_128M.len().div_ceil(8)];
        let bytes: &mut [u8] = unsafe {
            // SAFETY (test): the Vec<u64> owns len * 8 initialised bytes, 8-byte aligned.
            core::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast(), aligned.len() * 8)
        };
        bytes[..QEMU_VIRT_A53_128M.len()].copy_from_slice(QEMU_VIRT_A53_128M);
        // SAFETY (test): the buffer holds a complete, valid blob and outlives both trees.
        let (first, second) = unsafe {
            (
                DeviceTree::from_ptr(bytes.as_ptr()).unwrap(),
                DeviceTree::from_ptr(bytes.as_ptr()).unwrap(),
            )
        };
        // Whichever test opened a tree first took the static index: this second one cannot.
        assert!(!second.is_indexed());
        assert_eq!(answers(&first, usize::MAX), answers(&second, usize::MAX));
    }

    #[test]
    fn from_ptr_checks_before_reading() {
        // SAFETY (test): null and misaligned pointers are rejected before any read.
        assert_eq!(
            unsafe { DeviceTree::from_ptr(core::ptr::null()) }.err(),
            Some(DtError::NullPointer)
        );
        let mut aligned = vec![0u64; RESERVED.len().div_ceil(8) + 1];
        let bytes: &mut [u8] = unsafe {
            // SAFETY (test): the Vec<u64> owns len * 8 initialised bytes, 8-byte aligned.
            core::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast(), aligned.len() * 8)
        };
        bytes[..RESERVED.len()].copy_from_slice(RESERVED);
        let base = bytes.as_ptr();
        // SAFETY (test): 1 is misaligned, so nothing is read.
        let e = unsafe { DeviceTree::from_ptr(base.wrapping_add(1)) }
            .err()
            .unwrap();
        assert_eq!(
            e,
            DtError::Misaligned {
                addr: base as u64 + 1
            }
        );
        assert_eq!(
            format!("{e}"),
            format!(
                "device tree at {:#x} is not 8-byte aligned",
                base as u64 + 1
            )
        );
        // SAFETY (test): the buffer holds a complete, valid blob at `base`.
        let dt = unsafe { DeviceTree::from_ptr(base) }.unwrap();
        assert_eq!(dt.totalsize(), 1374);
        assert_eq!(dt.phys_region().unwrap().base().as_u64(), base as u64);
        bytes[3] = 0xee;
        // SAFETY (test): 4 readable bytes; the bad magic stops the read there.
        let e = unsafe { DeviceTree::from_ptr(base) }.err().unwrap();
        assert_eq!(
            e,
            DtError::BadMagic {
                magic: 0xd00d_feee,
                addr: base as u64
            }
        );
        bytes[3] = 0xed;
        bytes[4..8].copy_from_slice(&(100u32 << 20).to_be_bytes());
        // SAFETY (test): header readable; the absurd totalsize is refused before the big slice.
        let e = unsafe { DeviceTree::from_ptr(base) }.err().unwrap();
        assert_eq!(
            e,
            DtError::TotalSize {
                totalsize: 100 << 20
            }
        );
    }

    #[test]
    fn paths_and_lookup() {
        let dt = open(RPI3B_DOWNSTREAM);
        assert_eq!(dt.find_node("/").unwrap(), dt.root());
        assert_eq!(dt.root().parent(), None);
        let uart = dt.find_node("/soc/serial@7e215040").unwrap();
        assert_eq!(uart.base_name(), "serial");
        assert_eq!(uart.unit_address(), Some("7e215040"));
        assert_eq!(uart.parent().unwrap().name(), "soc");
        assert_eq!(dt.find_node("/soc/").unwrap().name(), "soc");
        assert_eq!(dt.find_node("/memory").unwrap().name(), "memory@0");
        assert_eq!(dt.find_node("/soc/serial@7e215041"), None);
        assert_eq!(dt.find_node("soc"), None);
        assert_eq!(dt.find_node("/nonexistent/x"), None);
        assert_eq!(dt.model().unwrap(), Some("Raspberry Pi 3 Model B"));
        let aux: Vec<_> = dt
            .find_compatible("brcm,bcm2835-aux-uart")
            .map(|n| n.name())
            .collect();
        assert_eq!(aux, ["serial@7e215040"]);
        // Root: compatible = "raspberrypi,4-model-b", "brcm,bcm2711"; model "Raspberry Pi 4 Model B".
        let dt = open(RPI4B_DOWNSTREAM);
        assert_eq!(dt.model().unwrap(), Some("Raspberry Pi 4 Model B"));
        assert_eq!(
            dt.root_compatible().unwrap().collect::<Vec<_>>(),
            ["raspberrypi,4-model-b", "brcm,bcm2711"]
        );
        let dt = open(BUS_TRANSLATE);
        let uarts: Vec<_> = dt
            .find_compatible("ns16550a")
            .map(|n| format!("{}", n.path()))
            .collect();
        assert_eq!(
            uarts,
            ["/soc/bridge@7e010000/uart@200", "/soc/uart@7e215040"]
        );
        assert_eq!(
            dt.find_compatible("acme,gpio").count(),
            0,
            "disabled nodes are skipped"
        );
        assert_eq!(
            dt.find_node("/soc/bridge@7e010000/gpio@1000")
                .unwrap()
                .status(),
            Status::Disabled
        );
        assert_eq!(
            dt.root_compatible().unwrap().collect::<Vec<_>>(),
            ["dmakern,bus-test", "dmakern,generic"]
        );
    }

    #[test]
    fn phandles_and_interrupt_parents() {
        let dt = open(RPI3B_DOWNSTREAM);
        // serial@7e215040 has no interrupt-parent, nor has /soc; the root's is <0x01> =
        // interrupt-controller@7e00b200 (#interrupt-cells = 2).
        let uart = dt.find_node("/soc/serial@7e215040").unwrap();
        assert_eq!(
            dt.interrupt_parent(&uart).unwrap().name(),
            "interrupt-controller@7e00b200"
        );
        // arm-pmu: interrupt-parent = <0x19> = interrupt-controller@40000000.
        let pmu = dt.find_node("/arm-pmu").unwrap();
        assert_eq!(
            dt.interrupt_parent(&pmu).unwrap().name(),
            "interrupt-controller@40000000"
        );
        assert_eq!(
            dt.node_by_phandle(0x19).unwrap().name(),
            "interrupt-controller@40000000"
        );
        assert!(matches!(
            dt.node_by_phandle(0xfff0),
            Err(DtError::Phandle { .. })
        ));
        assert!(matches!(
            dt.node_by_phandle(0),
            Err(DtError::Phandle {
                what: "reserved value",
                ..
            })
        ));

        let dt = open(BUS_TRANSLATE);
        let uart = dt.find_node("/soc/bridge@7e010000/uart@200").unwrap();
        assert_eq!(
            dt.interrupt_parent(&uart).unwrap().name(),
            "interrupt-controller@3f00b200"
        );

        let dt = open(CYCLIC_PHANDLE);
        for name in ["/dev", "/a", "/self"] {
            let n = dt.find_node(name).unwrap();
            let e = dt.interrupt_parent(&n).unwrap_err();
            assert!(
                matches!(
                    e,
                    DtError::Loop {
                        hops: MAX_PHANDLE_HOPS,
                        ..
                    }
                ),
                "{name}: {e:?}"
            );
        }
        // The error names the property the phandle was read from.
        let n = dt.find_node("/dangling").unwrap();
        let e = dt.interrupt_parent(&n).unwrap_err();
        assert_eq!(
            e,
            DtError::PhandleRef {
                node: Name::new("dangling"),
                prop: Name::new("interrupt-parent"),
                phandle: 0x7777,
                what: "no node has this phandle"
            }
        );
        assert_eq!(
            format!("{e}"),
            "property `interrupt-parent` of node `dangling`: phandle 0x7777: no node has this \
             phandle"
        );
        let dt = open(DUPLICATE_PHANDLE);
        assert_eq!(
            dt.node_by_phandle(0x40).unwrap_err(),
            DtError::Phandle {
                phandle: 0x40,
                what: "defined by more than one node"
            }
        );
        let user = dt.find_node("/user").unwrap();
        assert_eq!(
            format!("{}", dt.interrupt_parent(&user).unwrap_err()),
            "property `interrupt-parent` of node `user`: phandle 0x40: defined by more than one \
             node"
        );
        let ip = user.property("interrupt-parent").unwrap();
        assert_eq!(
            dt.phandle_target(&ip, 0x41).unwrap_err(),
            DtError::PhandleRef {
                node: Name::new("user"),
                prop: Name::new("interrupt-parent"),
                phandle: 0x41,
                what: "no node has this phandle"
            }
        );
        // A reserved value is named the same way.
        assert_eq!(
            dt.phandle_target(&ip, 0),
            Err(ip.phandle_error(0, "reserved value"))
        );
    }

    #[test]
    fn property_accessors_check_lengths() {
        let dt = open(RPI3B_DOWNSTREAM);
        let root = dt.root();
        let ac = root.property("#address-cells").unwrap();
        assert_eq!(ac.as_u32(), Ok(1));
        assert!(ac.as_u64().is_err());
        assert!(
            ac.as_str().is_err(),
            "4 bytes 00 00 00 01 are not a NUL-terminated string"
        );
        assert_eq!(ac.as_cells(1), Ok(1));
        assert!(ac.as_cells(2).is_err());
        let compat = root.property("compatible").unwrap();
        assert!(compat.as_str().is_err(), "a string list is not one string");
        assert!(compat.as_u32().is_err());
        let e = compat.as_u32().unwrap_err();
        assert!(
            format!("{e}").starts_with("property `compatible` of node `/`"),
            "{e}"
        );
        let reg = dt
            .find_node("/soc/serial@7e215040")
            .unwrap()
            .property("reg")
            .unwrap();
        assert_eq!(
            reg.as_u32s().unwrap().collect::<Vec<_>>(),
            [0x7e21_5040, 0x40]
        );
        assert_eq!(reg.as_u64(), Ok(0x7e21_5040_0000_0040));
    }

    /// The answers to every query on a tree (the per-node ones on its first `max_nodes` nodes),
    /// printed: for comparing a tree served through its index with the same tree walked from the
    /// root, and for the robustness tests, which need the queries to terminate without panicking.
    fn answers(dt: &DeviceTree<'_>, max_nodes: usize) -> Vec<String> {
        let mut out = Vec::new();
        for node in dt.nodes().take(max_nodes) {
            let anc = node.ancestry();
            out.push(format!(
                "{node:?} at {} depth {} parent {:?} chain {:?} {:?} {:?} {:?}",
                node.offset(),
                node.depth(),
                node.parent().map(|p| p.offset()),
                (0..anc.len())
                    .map(|i| anc.get(i).map(|n| n.offset()))
                    .collect::<Vec<_>>(),
                node.compatible(),
                node.status(),
                node.device_type(),
            ));
            for p in node.properties() {
                out.push(format!(
                    "{p:?} {:?} {:?} {:?} {:?} {:?} {:?}",
                    p.as_u32(),
                    p.as_u64(),
                    p.as_str(),
                    p.as_str_list().map(|l| l.count()),
                    p.as_u32s().map(|c| c.count()),
                    node.property(p.name).map(|q| q.value.as_ptr()),
                ));
            }
            let children: Vec<_> = node.children().collect();
            out.push(format!(
                "children {:?}",
                children.iter().map(|c| c.offset()).collect::<Vec<_>>()
            ));
            // (A sample: the root of a big tree has a thousand children.)
            let names = children
                .iter()
                .take(16)
                .flat_map(|c| [c.name(), c.base_name()]);
            for q in names.chain(["", "@", "zz"]) {
                out.push(format!(
                    "child {q:?}: {:?}",
                    node.child(q).map(|c| c.offset())
                ));
            }
            out.push(format!(
                "find {:?}",
                dt.find_node(&node.path().to_string()).map(|n| n.offset())
            ));
            out.push(format!(
                "{:?}",
                dt.reg(&node)
                    .map(|r| r.map(|it| it.take(64).collect::<Vec<_>>()))
            ));
            out.push(format!(
                "{:?}",
                dt.interrupt_parent(&node).map(|n| n.offset())
            ));
            out.push(format!("{:?}", Cells::of(&node)));
            if let Some(p) = node.property("ranges") {
                if let (Ok(c), Some(parent)) = (Cells::of(&node), node.parent()) {
                    let r = Ranges::new(&p, c, Cells::of(&parent).map_or(2, |c| c.address));
                    out.push(format!("{:?}", r.map(|r| r.take(64).collect::<Vec<_>>())));
                }
            }
        }
        out.push(format!(
            "{:?} {:?} {:?} {:?}",
            dt.model(),
            dt.root_compatible().map(|c| c.collect::<Vec<_>>()),
            dt.bootargs(),
            dt.initrd(),
        ));
        out.push(format!(
            "{:?}",
            dt.stdout_path()
                .map(|s| s.map(|s| (s.node.offset(), s.options)))
        ));
        for path in [
            "/chosen",
            "/aliases",
            "/cpus",
            "/psci",
            "/reserved-memory",
            "/memory",
            "/soc",
        ] {
            out.push(format!(
                "{path} {:?}",
                dt.find_node(path).map(|n| n.offset())
            ));
        }
        if let Some(aliases) = dt.find_node("/aliases") {
            for p in aliases.properties() {
                out.push(format!(
                    "{:?}",
                    dt.alias(p.name).map(|a| a.map(|n| n.offset()))
                ));
            }
        }
        out.push(format!("{:?}", dt.memory().take(256).collect::<Vec<_>>()));
        out.push(format!(
            "{:?}",
            dt.mem_reserve().take(256).collect::<Vec<_>>()
        ));
        match dt.reserved_memory() {
            Ok(rm) => {
                for r in rm.take(256) {
                    out.push(format!(
                        "{:?}",
                        r.map(|r| (
                            format!("{r:?}"),
                            r.regs().collect::<Vec<_>>(),
                            r.alloc_ranges().collect::<Vec<_>>()
                        ))
                    ));
                }
            }
            Err(e) => out.push(format!("{e:?}")),
        }
        out.push(format!(
            "{:?}",
            dt.cpus()
                .map(|c| c.take(256).map(|c| c.map(|c| c.mpidr)).collect::<Vec<_>>())
        ));
        out.push(format!(
            "{:?}",
            dt.psci()
                .map(|p| p.map(|p| (p.node.offset(), p.method, p.cpu_on)))
        ));
        out.push(format!(
            "{:?}",
            dt.find_compatible("ns16550a")
                .map(|n| n.offset())
                .collect::<Vec<_>>()
        ));
        let kernel = PhysAddr::new(0x4008_0000)..PhysAddr::new(0x4020_0000);
        match MemoryMap::from_dt(&dt.with_phys_base(PhysAddr::new(0x4800_0000)), kernel) {
            Ok(map) => out.push(format!("{map}")),
            Err(e) => out.push(format!("{e}")),
        }
        out
    }

    /// Opens `b` with and without an index (in `index`) and checks that both open, or both fail
    /// alike; then that every query gets the same answer from both. Returns whether it opened.
    fn same_with_index(b: &[u8], index: &mut NodeIndex, max_nodes: usize) -> bool {
        match (
            DeviceTree::from_bytes(b),
            DeviceTree::from_bytes_indexed(b, index),
        ) {
            (Ok(plain), Ok(indexed)) => {
                assert!(!plain.is_indexed());
                let (a, b) = (answers(&plain, max_nodes), answers(&indexed, max_nodes));
                for (x, y) in a.iter().zip(&b) {
                    assert_eq!(x, y);
                }
                assert_eq!(a.len(), b.len());
                true
            }
            (Err(e), Err(f)) => {
                assert_eq!(e, f);
                false
            }
            (plain, indexed) => panic!("{:?} vs {:?}", plain.err(), indexed.err()),
        }
    }

    #[test]
    fn every_prefix_of_a_blob_is_rejected() {
        for len in 0..RESERVED.len() {
            assert!(
                DeviceTree::from_bytes(&RESERVED[..len]).is_err(),
                "len {len}"
            );
        }
    }

    #[test]
    fn index_changes_no_answer_on_any_fixture() {
        // Without the index the per-node queries are quadratic (parent lookups walk the tree from
        // the root, phandle lookups scan it), so the big Pi trees are sampled.
        let mut index = Box::new(NodeIndex::new());
        for (name, bytes) in VALID {
            assert!(same_with_index(bytes, &mut index, 40), "{name}");
            let dt = DeviceTree::from_bytes_indexed(bytes, &mut index).unwrap();
            assert!(dt.is_indexed(), "{name}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Random corruption of small trees: opening either fails cleanly or yields a tree on
        /// which every query terminates without panicking, with or without the index, and
        /// gets the same answer both ways.
        #[test]
        fn corrupted_blobs_never_panic(
            which in 0usize..3,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        ) {
            let src = [RESERVED, BUS_TRANSLATE, CYCLIC_PHANDLE][which];
            let mut b = src.to_vec();
            for (at, v) in edits {
                let i = at.index(b.len());
                b[i] = v;
            }
            same_with_index(&b, &mut NodeIndex::new(), usize::MAX);
        }

        /// Corruption aimed at the words that matter: header fields, token tags and lengths.
        #[test]
        fn corrupted_words_never_panic(
            word in 0usize..(BUS_TRANSLATE.len() / 4),
            v in prop_oneof![0u32..16, Just(u32::MAX), Just(0x8000_0000), any::<u32>()],
        ) {
            let mut b = BUS_TRANSLATE.to_vec();
            b[word * 4..word * 4 + 4].copy_from_slice(&v.to_be_bytes());
            same_with_index(&b, &mut NodeIndex::new(), usize::MAX);
        }
    }
}
