//! The flattened-device-tree structure block: its validator and walker, the node index, and the
//! `Node` and `Property` views on it.
//!
//! `validate` walks the whole structure block once, when the tree is opened, and rejects anything
//! malformed. The accessors below still decode defensively (every read is bounds-checked and a
//! failure ends the iteration rather than panicking), so a bug in the validator cannot turn into a
//! panic or an out-of-bounds read, only into a missing node or property.
//!
//! FDT nodes carry no parent or sibling links: without help, finding a node's parent means walking
//! from the root, and stepping to the next sibling means decoding the whole subtree in between. The
//! boot path asks such questions a few hundred times (every `reg` translation, every lookup by
//! path), which made it quadratic in the size of the tree. So the validator can also fill a
//! [`NodeIndex`]: one small entry per node (its offset, its parent, the end of its subtree) in blob
//! order, which turns parent lookups into one step, sibling steps into one step, and a node's
//! position into a binary search. The index needs storage that lives as long as the tree, and the
//! tree is opened before any heap exists, so the storage comes from the caller (see
//! `DeviceTree::from_bytes_indexed` and `DeviceTree::from_ptr`). Trees without an index (or with
//! more nodes than it holds) are served by the plain walker, with the same results.

use super::error::{DtError, Name};

pub const FDT_MAGIC: u32 = 0xd00d_feed;
/// Size of a version-17 header, which is also the smallest blob we accept.
pub const HEADER_SIZE: u32 = 40;
/// Upper bound on `totalsize`. Real trees are tens of KiB (QEMU pads its own to 1 MiB); anything
/// near this limit is a corrupt header, not a device tree.
pub const MAX_TOTALSIZE: u32 = 64 << 20;
/// Deepest node nesting accepted (the root is depth 1). Real trees stay below 10; the bound keeps
/// the fixed-size ancestor stacks used by parent lookups and address translation in range.
pub const MAX_DEPTH: usize = 32;
/// Most nodes a [`NodeIndex`] holds. The largest real trees we know (Raspberry Pi 4 and 5,
/// downstream) have about 330; a tree with more is still accepted, just served without the index.
pub const MAX_INDEXED_NODES: usize = 1024;

const FDT_BEGIN_NODE: u32 = 0x1;
const FDT_END_NODE: u32 = 0x2;
const FDT_PROP: u32 = 0x3;
const FDT_NOP: u32 = 0x4;
const FDT_END: u32 = 0x9;

/// Big-endian u32 at `off`, or `None` if it does not fit in `b`.
pub(crate) fn be32(b: &[u8], off: usize) -> Option<u32> {
    let bytes: [u8; 4] = b.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// Big-endian u32 at `i` in a property header (tag, length, name offset: `i` = 0, 4, 8). Inlined
/// even when optimising for size: it runs three times for every property walked.
#[inline(always)]
fn header_word(header: &[u8; 12], i: usize) -> u32 {
    match header.get(i..i + 4) {
        Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]),
        _ => 0,
    }
}

/// Big-endian u64 at `off`, or `None` if it does not fit in `b`.
pub(crate) fn be64(b: &[u8], off: usize) -> Option<u64> {
    let bytes: [u8; 8] = b.get(off..off.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

fn align4(x: usize) -> Option<usize> {
    Some(x.checked_add(3)? & !3)
}

/// Node and property names: printable ASCII without '/' (stricter than nothing, looser than the
/// spec's character set, which real trees do not always follow: e.g. `__overrides__` keys).
fn valid_name(name: &[u8]) -> bool {
    name.iter()
        .all(|&c| (0x21..=0x7e).contains(&c) && c != b'/')
}

/// `x` with 0x01 in every byte.
const ONES: u64 = 0x0101_0101_0101_0101;
/// The top bit of every byte.
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Non-zero iff a byte of `x` is zero; the lowest set bit is the top bit of the first (lowest)
/// zero byte exactly (a borrow can only mark bytes above a zero byte).
#[inline(always)]
fn zero_bytes(x: u64) -> u64 {
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// Non-zero iff a byte of `x` is not a valid name character (see `valid_name`): 0x80 or above,
/// below 0x21 (the subtraction borrows; as in `zero_bytes`, a borrow only marks bytes above a byte
/// that is itself too small), 0x7f, or '/'.
#[inline(always)]
fn invalid_name_bytes(x: u64) -> u64 {
    (x & HIGHS)
        | (x.wrapping_sub(0x21 * ONES) & !x & HIGHS)
        | zero_bytes(x ^ (0x7f * ONES))
        | zero_bytes(x ^ (b'/' as u64 * ONES))
}

/// Position of the first NUL in `b`, eight bytes at a time (every node a walker steps on needs
/// the end of its name).
fn nul_position(b: &[u8]) -> Option<usize> {
    let (chunks, rest) = b.as_chunks::<8>();
    for (i, chunk) in chunks.iter().enumerate() {
        let zeros = zero_bytes(u64::from_le_bytes(*chunk));
        if zeros != 0 {
            return Some(i * 8 + (zeros.trailing_zeros() / 8) as usize);
        }
    }
    let tail = rest.iter().position(|&c| c == 0)?;
    Some(chunks.len() * 8 + tail)
}

/// Length of the NUL-terminated string at the start of `b` (`None` if `b` holds no NUL) and
/// whether it is a valid name (see `valid_name`). The validator runs this on every node name, so
/// it reads eight bytes at a time and tests them with the word-wide tricks above instead of byte
/// by byte (on the kernel's strict-alignment targets every byte costs a load, a compare and a
/// branch otherwise).
#[inline(always)]
fn scan_name(b: &[u8]) -> Option<(usize, bool)> {
    let mut invalid = 0u64;
    let mut at = 0usize;
    loop {
        let x = match b.get(at..).and_then(|r| r.first_chunk::<8>()) {
            Some(chunk) => u64::from_le_bytes(*chunk),
            None => {
                // Fewer than eight bytes left: pad with a valid character (not with NUL, which
                // would pass for a terminator).
                let rest = b.get(at..).unwrap_or_default();
                let mut buf = [b'a'; 8];
                buf.get_mut(..rest.len())?.copy_from_slice(rest);
                u64::from_le_bytes(buf)
            }
        };
        let zeros = zero_bytes(x);
        if zeros != 0 {
            // A NUL from `b` (the padding has none).
            let n = (zeros.trailing_zeros() / 8) as usize;
            // Only the bytes before the NUL are part of the name: make the rest valid.
            let name_bytes = u64::MAX.checked_shr(64 - 8 * n as u32).unwrap_or(0);
            let x = (x & name_bytes) | (u64::from_le_bytes([b'a'; 8]) & !name_bytes);
            invalid |= invalid_name_bytes(x);
            return Some((at + n, invalid == 0));
        }
        if at + 8 > b.len() {
            return None;
        }
        invalid |= invalid_name_bytes(x);
        at += 8;
    }
}

/// Whether the string at `off` in `b` is NUL-terminated inside `b` and a valid, non-empty name:
/// what `name_at(b, off).is_some()` says, without decoding.
fn valid_name_at(b: &[u8], off: usize) -> bool {
    matches!(scan_name(b.get(off..).unwrap_or_default()), Some((len, true)) if len > 0)
}

/// Why the property name at `off` in the strings block `b` is refused (for a name
/// `valid_name_at` refused).
#[cold]
fn bad_name_reason(b: &[u8], off: usize) -> &'static str {
    match b.get(off..).filter(|rest| !rest.is_empty()).map(scan_name) {
        None => "lies outside the strings block",
        Some(None) => "is not NUL-terminated inside the strings block",
        Some(Some((0, _))) => "is empty (names have 1 to 31 characters)",
        Some(Some(_)) => "contains invalid characters",
    }
}

/// `x` with its zero bytes turned into 'a'. The top bit of exactly the zero bytes is computed
/// without borrows (the sum cannot carry out of a byte), unlike in `zero_bytes`.
#[inline(always)]
fn nuls_to_a(x: u64) -> u64 {
    let zero = !(((x & (0x7f * ONES)) + 0x7f * ONES) | x | (0x7f * ONES));
    x | ((zero >> 7) * b'a' as u64)
}

/// Whether `b` (a strings block) is nothing but valid names and NULs, ending with a NUL. Then every
/// offset inside it starts a valid, terminated, possibly empty name, and the validator need only
/// check that a property's name is not empty (its first byte is not the NUL): the usual case,
/// checked once, eight bytes at a time.
fn only_names(b: &[u8]) -> bool {
    if b.last() != Some(&0) {
        return false;
    }
    let (chunks, rest) = b.as_chunks::<8>();
    let mut tail = [b'a'; 8];
    if let Some(t) = tail.get_mut(..rest.len()) {
        t.copy_from_slice(rest);
    }
    let invalid = chunks
        .iter()
        .chain(core::iter::once(&tail))
        .fold(0, |acc, c| {
            acc | invalid_name_bytes(nuls_to_a(u64::from_le_bytes(*c)))
        });
    invalid == 0
}

/// The NUL-terminated string at `off` in `b`, if it is terminated inside `b` and a valid,
/// non-empty name.
fn name_at(b: &[u8], off: usize) -> Option<&str> {
    let rest = b.get(off..)?;
    let name = rest.get(..rest.iter().position(|&c| c == 0)?)?;
    if name.is_empty() || !valid_name(name) {
        return None;
    }
    core::str::from_utf8(name).ok()
}

/// Whether the NUL-terminated string at `off` in `b` is exactly `name`. Compares bytes in place:
/// cheaper than decoding the string first, and most candidates fail on the length check.
fn name_is(b: &[u8], off: usize, name: &[u8]) -> bool {
    let Some(end) = off.checked_add(name.len()) else {
        return false;
    };
    match b.get(off..=end).and_then(|s| s.split_last()) {
        Some((&nul, body)) => nul == 0 && body == name,
        None => false,
    }
}

/// One token of the structure block.
#[derive(Clone, Copy)]
enum Token<'a> {
    /// The name is the `name_len` bytes after the tag.
    Begin {
        name_len: usize,
    },
    Prop {
        nameoff: u32,
        value: &'a [u8],
    },
    End,
    Nop,
    Finish,
}

/// Decodes the token at `off`; returns it and the offset of the next token. Node names are only
/// searched for their end: their characters were checked by `validate`.
fn token(structs: &[u8], off: usize) -> Result<(Token<'_>, usize), &'static str> {
    let tag = be32(structs, off).ok_or("structure block ends without FDT_END")?;
    let after_tag = off + 4; // be32 succeeded, so off + 4 <= len
    match tag {
        FDT_BEGIN_NODE => {
            let rest = structs.get(after_tag..).ok_or("node name missing")?;
            let len = nul_position(rest).ok_or("node name not NUL-terminated")?;
            let next = align4(after_tag + len + 1).ok_or("node name too long")?;
            Ok((Token::Begin { name_len: len }, next))
        }
        FDT_PROP => {
            let len = be32(structs, after_tag).ok_or("property header truncated")? as usize;
            let nameoff = be32(structs, after_tag + 4).ok_or("property header truncated")?;
            let start = after_tag + 8;
            let end = start.checked_add(len).ok_or("property length overflows")?;
            let value = structs
                .get(start..end)
                .ok_or("property value runs past the end of the structure block")?;
            let next = align4(end).ok_or("property length overflows")?;
            Ok((Token::Prop { nameoff, value }, next))
        }
        FDT_END_NODE => Ok((Token::End, after_tag)),
        FDT_NOP => Ok((Token::Nop, after_tag)),
        FDT_END => Ok((Token::Finish, after_tag)),
        _ => Err("unknown token"),
    }
}

/// Decodes the FDT_PROP token at `off` (its tag already read): name offset, value, next token.
fn prop_header(structs: &[u8], off: usize) -> Result<(u32, &[u8], usize), &'static str> {
    let (Some(len), Some(nameoff)) = (be32(structs, off + 4), be32(structs, off + 8)) else {
        return Err("property header truncated");
    };
    let start = off + 12; // be32 at off + 8 succeeded
    let end = start
        .checked_add(len as usize)
        .ok_or("property length overflows")?;
    let value = structs
        .get(start..end)
        .ok_or("property value runs past the end of the structure block")?;
    // The value ends inside the block, so this cannot overflow.
    Ok((nameoff, value, (end + 3) & !3))
}

/// "No node": the root's parent, an unknown index position.
const NO_NODE: u16 = u16::MAX;

/// One node in a [`NodeIndex`].
#[derive(Clone, Copy)]
struct IndexEntry {
    /// Offset of the node's FDT_BEGIN_NODE token.
    off: u32,
    /// Position of the parent; `NO_NODE` for the root.
    parent: u16,
    /// Position just past the node's subtree: the next sibling's, if it has one.
    end: u16,
}

/// `NodeIndex::name_lens` for a name of this length or longer: look for its end.
const LONG_NAME: u8 = u8::MAX;

/// Storage for a tree's node index: every node in blob (depth-first) order with its parent, the
/// extent of its subtree and the length of its name, for at most [`MAX_INDEXED_NODES`] nodes
/// (9 KiB). Filled by the validator when a tree is opened with `DeviceTree::from_bytes_indexed`,
/// read-only afterwards.
pub struct NodeIndex {
    entries: [IndexEntry; MAX_INDEXED_NODES],
    /// Name lengths, apart from `entries` so as not to pad them; `LONG_NAME` if too long to fit.
    /// With them a node is made without searching its name for the NUL.
    name_lens: [u8; MAX_INDEXED_NODES],
    len: usize,
}

impl NodeIndex {
    /// Empty storage, all zeros (so a `static` of it takes no room in the image).
    pub const fn new() -> NodeIndex {
        NodeIndex {
            entries: [IndexEntry {
                off: 0,
                parent: 0,
                end: 0,
            }; MAX_INDEXED_NODES],
            name_lens: [0; MAX_INDEXED_NODES],
            len: 0,
        }
    }

    fn entry(&self, i: usize) -> Option<IndexEntry> {
        self.entries.get(..self.len)?.get(i).copied()
    }

    /// Position of the node at structure offset `off`.
    fn position(&self, off: u32) -> Option<usize> {
        let entries = self.entries.get(..self.len)?;
        entries.binary_search_by_key(&off, |e| e.off).ok()
    }
}

impl Default for NodeIndex {
    fn default() -> Self {
        Self::new()
    }
}

/// Children of the root that the boot path looks up by path, so the validator notes where they are
/// (see [`Landmarks`]).
static LANDMARKS: [&[u8]; 5] = [b"chosen", b"aliases", b"cpus", b"psci", b"reserved-memory"];
/// Most memory nodes [`Landmarks`] lists; a tree with more is searched node by node.
const MAX_MEMORY_NODES: usize = 8;
/// "No offset" in [`Landmarks`].
const ABSENT: u32 = u32::MAX;

/// Where the nodes the boot path asks for are, noted by the validator on its way through the tree
/// so that those questions need no search: every tree has them, with or without an index.
#[derive(Clone, Copy)]
pub(crate) struct Landmarks {
    /// Offset of the node `/LANDMARKS[i]` names (by the rule of [`Node::child`]), or `ABSENT`.
    known: [u32; LANDMARKS.len()],
    /// Offsets of the nodes with a `device_type = "memory"` property, in blob order: the only
    /// candidates for memory nodes (a node with two such properties is listed once).
    memory: [u32; MAX_MEMORY_NODES],
    /// Number of entries in `memory`; more than `MAX_MEMORY_NODES` if the list overflowed.
    memory_len: usize,
}

impl Landmarks {
    /// For a landmark's `rel` path (`chosen`): `Some` of where it is, if anywhere. `None` for any
    /// other path.
    pub(crate) fn find(&self, rel: &str) -> Option<Option<usize>> {
        let k = LANDMARKS.iter().position(|l| *l == rel.as_bytes())?;
        let off = *self.known.get(k)?;
        Some((off != ABSENT).then_some(off as usize))
    }

    /// Offsets of every node that may be a memory node, in blob order; `None` if there were too
    /// many to list.
    pub(crate) fn memory_candidates(&self) -> Option<&[u32]> {
        self.memory.get(..self.memory_len)
    }

    /// Notes a child of the root: the first with a landmark's exact name wins, else the first with
    /// it as base name (`known_base` collects those until the end of the walk).
    fn note_root_child(&mut self, known_base: &mut [u32; LANDMARKS.len()], name: &[u8], off: u32) {
        // The root has dozens of children (QEMU's virt: 57); most share no first letter with a
        // landmark.
        let candidates: &[usize] = match name.first() {
            Some(b'c') => &[0, 2],
            Some(b'a') => &[1],
            Some(b'p') => &[3],
            Some(b'r') => &[4],
            _ => &[],
        };
        for &k in candidates {
            let (Some(l), Some(exact), Some(base)) = (
                LANDMARKS.get(k),
                self.known.get_mut(k),
                known_base.get_mut(k),
            ) else {
                continue;
            };
            match (name.get(..l.len()), name.get(l.len())) {
                (Some(head), None) if head == *l && *exact == ABSENT => *exact = off,
                (Some(head), Some(b'@')) if head == *l && *base == ABSENT => *base = off,
                _ => {}
            }
        }
    }

    /// Notes a node with a `device_type = "memory"` property.
    fn note_memory(&mut self, off: u32) {
        if self.memory_len > 0 && self.memory.get(self.memory_len - 1) == Some(&off) {
            return;
        }
        if let Some(slot) = self.memory.get_mut(self.memory_len) {
            *slot = off;
        }
        self.memory_len = self.memory_len.saturating_add(1);
    }
}

/// What the validator found, besides "well-formed".
pub(crate) struct Validated {
    /// Offset of the root node.
    pub(crate) root: usize,
    /// Whether the index passed to `validate` now describes the whole tree.
    pub(crate) indexed: bool,
    pub(crate) landmarks: Landmarks,
}

/// The two blocks of a validated blob that nodes and properties point into, and the tree's index
/// if it has one.
#[derive(Clone, Copy)]
pub(crate) struct Blob<'a> {
    pub(crate) structs: &'a [u8],
    pub(crate) strings: &'a [u8],
    /// Only ever set to an index the validator filled from these same `structs`.
    pub(crate) index: Option<&'a NodeIndex>,
}

impl<'a> Blob<'a> {
    /// Walks the whole structure block and checks everything the accessors rely on:
    /// tokens well-formed and inside the block, names terminated and printable, property names
    /// non-empty and inside the strings block, properties before subnodes, balanced nesting no
    /// deeper than `MAX_DEPTH`, exactly one root, and a final FDT_END. Fills `index`, if given,
    /// on the way.
    pub(crate) fn validate(self, mut index: Option<&mut NodeIndex>) -> Result<Validated, DtError> {
        let s = self.structs;
        let mut off = 0usize;
        let mut depth = 0usize;
        let mut root: Option<usize> = None;
        let mut root_closed = false;
        // Property names: in the usual strings block any offset inside it will do (see
        // `only_names`); otherwise each is checked.
        let strings_ok = only_names(self.strings);
        // Index positions of the open nodes, root first; `count` nodes indexed so far. Once the
        // tree proves too big for the index, `index` is dropped and the rest only validated.
        let mut open = [NO_NODE; MAX_DEPTH];
        let mut count = 0usize;
        let mut landmarks = Landmarks {
            known: [ABSENT; LANDMARKS.len()],
            memory: [ABSENT; MAX_MEMORY_NODES],
            memory_len: 0,
        };
        let mut known_base = [ABSENT; LANDMARKS.len()];
        if let Some(ix) = index.as_deref_mut() {
            ix.len = 0;
        }
        // Every token of the tree passes here at every boot, so each is decoded in place with one
        // dispatch on its tag (the walkers' `token` builds a `Token` first, which costs about
        // twice as much), and the properties of a node, two thirds of all tokens, in a loop of
        // their own (`validate_props`). The checks and their order are those `token` and the
        // rules above imply.
        loop {
            let err = |what| DtError::Structure {
                offset: off as u32,
                what,
            };
            let tag = be32(s, off).ok_or_else(|| err("structure block ends without FDT_END"))?;
            match tag {
                FDT_PROP => {
                    // A node's own properties were taken by `validate_props` right after its
                    // name, so this one is misplaced (once it decodes).
                    prop_header(s, off).map_err(err)?;
                    return Err(err(if depth == 0 {
                        "property outside any node"
                    } else {
                        "property after a subnode"
                    }));
                }
                FDT_BEGIN_NODE => {
                    let rest = s.get(off + 4..).unwrap_or_default();
                    let (name_len, valid) =
                        scan_name(rest).ok_or_else(|| err("node name not NUL-terminated"))?;
                    if !valid {
                        return Err(err("node name contains invalid characters"));
                    }
                    if root_closed {
                        return Err(err("second top-level node after the root"));
                    }
                    if depth == 0 {
                        root = Some(off);
                    } else if name_len == 0 {
                        return Err(err("node without a name"));
                    }
                    if depth >= MAX_DEPTH {
                        return Err(err("nodes nested deeper than 32 levels"));
                    }
                    let current = off as u32;
                    if depth == 1 {
                        let name = rest.get(..name_len).unwrap_or_default();
                        landmarks.note_root_child(&mut known_base, name, current);
                    }
                    if let Some(ix) = index.as_deref_mut() {
                        let parent = depth.checked_sub(1).map_or(NO_NODE, |d| open[d]);
                        match (ix.entries.get_mut(count), ix.name_lens.get_mut(count)) {
                            (Some(e), Some(n)) => {
                                *e = IndexEntry {
                                    off: current,
                                    parent,
                                    end: 0,
                                };
                                *n = u8::try_from(name_len).unwrap_or(LONG_NAME);
                                open[depth] = count as u16;
                                count += 1;
                            }
                            _ => index = None,
                        }
                    }
                    depth += 1;
                    // The NUL lies inside the block, so this cannot overflow.
                    off = (off + 4 + name_len + 1 + 3) & !3;
                    off = self.validate_props(off, strings_ok, current, &mut landmarks)?;
                }
                FDT_END_NODE => {
                    if depth == 0 {
                        return Err(err("FDT_END_NODE without a matching FDT_BEGIN_NODE"));
                    }
                    depth -= 1;
                    if let Some(e) = index
                        .as_deref_mut()
                        .and_then(|ix| ix.entries.get_mut(open[depth] as usize))
                    {
                        e.end = count as u16;
                    }
                    if depth == 0 {
                        root_closed = true;
                    }
                    off += 4;
                }
                FDT_NOP => off += 4,
                FDT_END => {
                    if depth != 0 {
                        return Err(err("FDT_END inside an unclosed node"));
                    }
                    let root = root.ok_or_else(|| err("no root node"))?;
                    let indexed = match index {
                        Some(ix) => {
                            ix.len = count;
                            true
                        }
                        None => false,
                    };
                    for (exact, base) in landmarks.known.iter_mut().zip(known_base) {
                        if *exact == ABSENT {
                            *exact = base;
                        }
                    }
                    return Ok(Validated {
                        root,
                        indexed,
                        landmarks,
                    });
                }
                _ => return Err(err("unknown token")),
            }
        }
    }

    /// Validates the properties (and NOPs) of the node `node` from `off`, its first token after
    /// the name, and returns the offset of the first other token. Notes memory nodes.
    fn validate_props(
        self,
        mut off: usize,
        strings_ok: bool,
        node: u32,
        landmarks: &mut Landmarks,
    ) -> Result<usize, DtError> {
        loop {
            // Tag, length and name offset in one bounds check. Anything else, or too little left
            // for a property header, is the main loop's to decode (and report).
            let Some(header) = self.structs.get(off..).and_then(|r| r.first_chunk::<12>()) else {
                return Ok(off);
            };
            match header_word(header, 0) {
                FDT_PROP => {}
                FDT_NOP => {
                    off += 4;
                    continue;
                }
                _ => return Ok(off),
            }
            let err = |what| DtError::Structure {
                offset: off as u32,
                what,
            };
            let start = off + 12;
            let end = start
                .checked_add(header_word(header, 4) as usize)
                .ok_or_else(|| err("property length overflows"))?;
            let value = self
                .structs
                .get(start..end)
                .ok_or_else(|| err("property value runs past the end of the structure block"))?;
            let nameoff = header_word(header, 8);
            let at = nameoff as usize;
            let name_ok = if strings_ok {
                // Inside the block and not at a NUL (an empty name).
                self.strings.get(at).is_some_and(|&c| c != 0)
            } else {
                valid_name_at(self.strings, at)
            };
            if !name_ok {
                return Err(DtError::PropertyName {
                    offset: off as u32,
                    nameoff,
                    what: bad_name_reason(self.strings, at),
                });
            }
            if value == b"memory\0" && name_is(self.strings, at, b"device_type") {
                landmarks.note_memory(node);
            }
            // The value ends inside the block, so this cannot overflow.
            off = (end + 3) & !3;
        }
    }

    /// The node whose FDT_BEGIN_NODE token is at `off`.
    pub(crate) fn node_at(self, off: usize) -> Option<Node<'a>> {
        self.node_with_position(off, NO_NODE)
    }

    /// The node at position `i` of the index.
    #[inline]
    fn indexed_node(self, i: usize) -> Option<Node<'a>> {
        let index = self.index?;
        let e = index.entry(i)?;
        match index.name_lens.get(i) {
            Some(&n) if n != LONG_NAME => Some(Node {
                blob: self,
                off: e.off,
                // Tag, name, NUL, padding to 4 bytes; offsets are below MAX_TOTALSIZE.
                body: (e.off + 4 + n as u32 + 1 + 3) & !3,
                name_len: n as u32,
                position: i as u16,
            }),
            _ => self.node_with_position(e.off as usize, i as u16),
        }
    }

    #[inline]
    fn node_with_position(self, off: usize, position: u16) -> Option<Node<'a>> {
        match token(self.structs, off) {
            Ok((Token::Begin { name_len }, body)) => Some(Node {
                blob: self,
                off: u32::try_from(off).ok()?,
                body: u32::try_from(body).ok()?,
                name_len: u32::try_from(name_len).ok()?,
                position,
            }),
            _ => None,
        }
    }

    /// Offset just past the FDT_END_NODE that closes the node beginning at `off`.
    fn skip_subtree(self, off: usize) -> Option<usize> {
        let mut depth = 0usize;
        let mut pos = off;
        loop {
            let (tok, next) = token(self.structs, pos).ok()?;
            match tok {
                Token::Begin { .. } => depth += 1,
                Token::End => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        return Some(next);
                    }
                }
                Token::Finish => return None,
                Token::Prop { .. } | Token::Nop => {}
            }
            pos = next;
        }
    }

    /// Offsets of the nodes from the root down to (and including) the node at `target`, by a walk
    /// from the root (for trees without an index).
    fn ancestry_by_walk(self, target: usize) -> Option<Ancestry<'a>> {
        let mut anc = Ancestry {
            blob: self,
            offs: [0; MAX_DEPTH],
            len: 0,
        };
        let mut pos = 0usize;
        loop {
            let (tok, next) = token(self.structs, pos).ok()?;
            match tok {
                Token::Begin { .. } => {
                    *anc.offs.get_mut(anc.len)? = pos as u32;
                    anc.len += 1;
                    if pos == target {
                        return Some(anc);
                    }
                }
                Token::End => anc.len = anc.len.checked_sub(1)?,
                Token::Finish => return None,
                Token::Prop { .. } | Token::Nop => {}
            }
            pos = next;
        }
    }

    /// The same chain from the index: the parent links, followed up from position `i`.
    fn ancestry_by_index(self, index: &NodeIndex, i: usize) -> Option<Ancestry<'a>> {
        let mut up = [0u32; MAX_DEPTH];
        let mut len = 0;
        let mut cur = i;
        loop {
            let e = index.entry(cur)?;
            *up.get_mut(len)? = e.off;
            len += 1;
            if e.parent == NO_NODE {
                break;
            }
            cur = e.parent as usize;
        }
        let mut anc = Ancestry {
            blob: self,
            offs: [0; MAX_DEPTH],
            len,
        };
        for (dst, src) in anc.offs.iter_mut().zip(up.get(..len)?.iter().rev()) {
            *dst = *src;
        }
        Some(anc)
    }
}

/// A node of a validated tree. Cheap to copy; knows its own position, so it can find its parent
/// (through the tree's index, or by a walk from the root without one).
#[derive(Clone, Copy)]
pub struct Node<'a> {
    pub(crate) blob: Blob<'a>,
    /// Offset of the node's FDT_BEGIN_NODE token in the structure block: its identity.
    off: u32,
    /// Offset of the first token after the name.
    body: u32,
    /// Length of the name (which starts right after the tag).
    name_len: u32,
    /// Position in the tree's index if known (`NO_NODE`: unknown or no index; looked up when
    /// needed).
    position: u16,
}

impl PartialEq for Node<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.off == other.off && core::ptr::eq(self.blob.structs, other.blob.structs)
    }
}
impl Eq for Node<'_> {}

impl core::fmt::Debug for Node<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Node({})", self.path())
    }
}

impl<'a> Node<'a> {
    /// The name's bytes (validated printable ASCII).
    fn name_bytes(&self) -> &'a [u8] {
        let start = self.off as usize + 4;
        self.blob
            .structs
            .get(start..start + self.name_len as usize)
            .unwrap_or_default()
    }

    /// Full node name, `name@unit-address` (empty for the root).
    pub fn name(&self) -> &'a str {
        core::str::from_utf8(self.name_bytes()).unwrap_or("")
    }

    /// The name without the unit address.
    pub fn base_name(&self) -> &'a str {
        let name = self.name();
        name.split('@').next().unwrap_or(name)
    }

    /// The unit address (text after '@'), if any.
    pub fn unit_address(&self) -> Option<&'a str> {
        self.name().split_once('@').map(|(_, u)| u)
    }

    /// The name in a form fit for error values.
    pub(crate) fn short_name(&self) -> Name {
        let name = self.name();
        Name::new(if name.is_empty() { "/" } else { name })
    }

    /// Offset of the node in the structure block (its identity within one tree).
    pub fn offset(&self) -> usize {
        self.off as usize
    }

    /// The tree's index and this node's position in it, if the tree has one.
    fn indexed(&self) -> Option<(&'a NodeIndex, usize)> {
        let index = self.blob.index?;
        let i = match self.position {
            NO_NODE => index.position(self.off)?,
            p => p as usize,
        };
        Some((index, i))
    }

    pub fn properties(&self) -> Properties<'a> {
        Properties {
            blob: self.blob,
            pos: Some(self.body as usize),
            node: self.name_bytes(),
        }
    }

    /// The property called `name` (the first one, should a broken tree carry duplicates).
    pub fn property(&self, name: &str) -> Option<Property<'a>> {
        // The same walk as `properties()`, but comparing names in place and decoding only the
        // property that matches: this runs for every `reg`, `status`, `compatible`, ... lookup.
        let Blob {
            structs, strings, ..
        } = self.blob;
        let want = name.as_bytes();
        let mut pos = self.body as usize;
        loop {
            // Tag, length and name offset in one bounds check (a property's header is 12 bytes;
            // anything shorter ends the walk, as `token` would).
            let header = structs.get(pos..)?.first_chunk::<12>()?;
            match header_word(header, 0) {
                FDT_PROP => {
                    let start = pos + 12;
                    let end = start.checked_add(header_word(header, 4) as usize)?;
                    let value = structs.get(start..end)?;
                    let at = header_word(header, 8) as usize;
                    if name_is(strings, at, want) {
                        // The validator checked every property name, so only the decoding of the
                        // bytes just compared is left.
                        let name = strings.get(at..at + want.len())?;
                        return Some(Property {
                            name: core::str::from_utf8(name).ok()?,
                            value,
                            node: self.name_bytes(),
                        });
                    }
                    // The value ends inside the block, so this cannot overflow.
                    pos = (end + 3) & !3;
                }
                FDT_NOP => pos += 4,
                _ => return None,
            }
        }
    }

    pub fn has_property(&self, name: &str) -> bool {
        self.property(name).is_some()
    }

    pub fn children(&self) -> Children<'a> {
        let walk = match self.indexed().and_then(|(ix, i)| Some((i, ix.entry(i)?))) {
            Some((i, e)) => ChildWalk::Indexed {
                next: i + 1,
                end: e.end as usize,
            },
            None => ChildWalk::Tokens {
                pos: Some(self.body as usize),
            },
        };
        Children {
            blob: self.blob,
            walk,
        }
    }

    /// The child whose name is `name` exactly, or else (if `name` has no unit address) the first
    /// child whose base name is `name` — the libfdt lookup rule.
    pub fn child(&self, name: &str) -> Option<Node<'a>> {
        // One pass over the children, comparing names in place (the name runs from the tag to
        // its NUL, which the validator found): only the child returned is decoded.
        let want = name.as_bytes();
        let by_base_name = !want.contains(&b'@');
        let mut first_base = None;
        let mut children = self.children();
        while let Some((off, position)) = children.next_offset() {
            let start = off + 4;
            let end = start.checked_add(want.len())?;
            // Most siblings differ in the first letter: no need for a full compare.
            if want
                .first()
                .is_some_and(|w| self.blob.structs.get(start) != Some(w))
                || self.blob.structs.get(start..end) != Some(want)
            {
                continue;
            }
            match self.blob.structs.get(end) {
                Some(0) => return self.blob.node_with_position(off, position),
                Some(b'@') if by_base_name && first_base.is_none() => {
                    first_base = Some((off, position))
                }
                _ => {}
            }
        }
        first_base.and_then(|(off, position)| self.blob.node_with_position(off, position))
    }

    /// The chain of nodes from the root down to this node.
    pub fn ancestry(&self) -> Ancestry<'a> {
        let found = match self.indexed() {
            Some((index, i)) => self.blob.ancestry_by_index(index, i),
            None => self.blob.ancestry_by_walk(self.off as usize),
        };
        // A node obtained from a validated tree is always found; the fallback (the node alone) is
        // only reachable if the validator and this walk disagree.
        found.unwrap_or(Ancestry {
            blob: self.blob,
            offs: {
                let mut o = [0; MAX_DEPTH];
                o[0] = self.off;
                o
            },
            len: 1,
        })
    }

    /// The parent node; `None` for the root.
    pub fn parent(&self) -> Option<Node<'a>> {
        match self.indexed() {
            Some((index, i)) => match index.entry(i)?.parent {
                NO_NODE => None,
                p => self.blob.indexed_node(p as usize),
            },
            None => self.ancestry().parent(),
        }
    }

    /// Depth in the tree (root = 1).
    pub fn depth(&self) -> usize {
        self.ancestry().len()
    }

    /// A `Display` value printing the full path (`/soc/serial@7e215040`).
    pub fn path(&self) -> NodePath<'a> {
        NodePath {
            anc: self.ancestry(),
        }
    }

    /// The node's `compatible` list (empty if absent or malformed).
    pub fn compatible(&self) -> StrList<'a> {
        self.property("compatible")
            .and_then(|p| p.as_str_list().ok())
            .unwrap_or_default()
    }

    pub fn is_compatible(&self, compat: &str) -> bool {
        self.compatible().any(|c| c == compat)
    }

    /// The `status` property, interpreted as the spec says (absent = okay).
    pub fn status(&self) -> Status {
        match self.property("status").map(|p| p.as_str()) {
            None => Status::Okay,
            Some(Ok("okay" | "ok")) => Status::Okay,
            Some(Ok("disabled")) => Status::Disabled,
            Some(Ok("reserved")) => Status::Reserved,
            Some(Ok(s)) if s.starts_with("fail") => Status::Fail,
            Some(_) => Status::Invalid,
        }
    }

    /// Whether the device is usable: `status` absent, "okay" or "ok".
    pub fn is_available(&self) -> bool {
        self.status() == Status::Okay
    }

    /// `device_type`, if present and a valid string.
    pub fn device_type(&self) -> Option<&'a str> {
        self.property("device_type").and_then(|p| p.as_str().ok())
    }
}

/// The `status` property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Absent, "okay" or "ok".
    Okay,
    Disabled,
    Reserved,
    /// "fail" or "fail-sss".
    Fail,
    /// Present but not one of the strings above, or not a string.
    Invalid,
}

/// The chain root → ... → node, as returned by [`Node::ancestry`].
#[derive(Clone, Copy)]
pub struct Ancestry<'a> {
    blob: Blob<'a>,
    offs: [u32; MAX_DEPTH],
    len: usize,
}

impl<'a> Ancestry<'a> {
    /// Number of nodes in the chain (the depth of the last one).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Node `i` of the chain, 0 being the root.
    pub fn get(&self, i: usize) -> Option<Node<'a>> {
        let off = *self.offs.get(..self.len)?.get(i)?;
        self.blob.node_at(off as usize)
    }

    /// The last node (the one the chain was built for).
    pub fn last(&self) -> Option<Node<'a>> {
        self.get(self.len.checked_sub(1)?)
    }

    /// The parent of the last node.
    pub fn parent(&self) -> Option<Node<'a>> {
        self.get(self.len.checked_sub(2)?)
    }

    /// The same chain without its last node (the parent's ancestry).
    pub fn pop(&self) -> Ancestry<'a> {
        Ancestry {
            len: self.len.saturating_sub(1),
            ..*self
        }
    }
}

/// Displays a node's full path.
pub struct NodePath<'a> {
    anc: Ancestry<'a>,
}

impl core::fmt::Display for NodePath<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.anc.len() <= 1 {
            return f.write_str("/");
        }
        for i in 1..self.anc.len() {
            f.write_str("/")?;
            f.write_str(self.anc.get(i).map(|n| n.name()).unwrap_or("?"))?;
        }
        Ok(())
    }
}

/// Iterator over a node's properties.
pub struct Properties<'a> {
    blob: Blob<'a>,
    /// Next token to decode; `None` once the iteration has ended.
    pos: Option<usize>,
    /// The owning node's name.
    node: &'a [u8],
}

impl<'a> Iterator for Properties<'a> {
    type Item = Property<'a>;

    fn next(&mut self) -> Option<Property<'a>> {
        loop {
            let pos = self.pos?;
            match token(self.blob.structs, pos) {
                Ok((Token::Nop, next)) => self.pos = Some(next),
                Ok((Token::Prop { nameoff, value }, next)) => {
                    self.pos = Some(next);
                    match name_at(self.blob.strings, nameoff as usize) {
                        Some(name) => {
                            return Some(Property {
                                name,
                                value,
                                node: self.node,
                            })
                        }
                        None => self.pos = None,
                    }
                }
                _ => self.pos = None,
            }
        }
    }
}

/// How [`Children`] steps from one child to the next.
enum ChildWalk {
    /// Through the index: `next` is the next child's position, `end` the end of the parent's
    /// subtree.
    Indexed { next: usize, end: usize },
    /// Token by token, skipping each child's subtree.
    Tokens { pos: Option<usize> },
}

/// Iterator over a node's direct children.
pub struct Children<'a> {
    blob: Blob<'a>,
    walk: ChildWalk,
}

impl<'a> Children<'a> {
    /// The next child's offset and index position (`NO_NODE` without an index), without decoding
    /// the child.
    fn next_offset(&mut self) -> Option<(usize, u16)> {
        match &mut self.walk {
            ChildWalk::Indexed { next, end } => {
                if *next >= *end {
                    return None;
                }
                let i = *next;
                let e = self.blob.index?.entry(i)?;
                // A child's subtree ends after it; anything else would be an index bug, and must
                // not turn into an endless loop.
                *next = if (e.end as usize) > i {
                    e.end as usize
                } else {
                    *end
                };
                Some((e.off as usize, i as u16))
            }
            ChildWalk::Tokens { pos } => loop {
                let at = (*pos)?;
                match token(self.blob.structs, at) {
                    Ok((Token::Nop | Token::Prop { .. }, next)) => *pos = Some(next),
                    Ok((Token::Begin { .. }, _)) => {
                        *pos = self.blob.skip_subtree(at);
                        return Some((at, NO_NODE));
                    }
                    _ => *pos = None,
                }
            },
        }
    }
}

impl<'a> Iterator for Children<'a> {
    type Item = Node<'a>;

    fn next(&mut self) -> Option<Node<'a>> {
        let (off, position) = self.next_offset()?;
        self.blob.node_with_position(off, position)
    }
}

/// Depth-first iterator over every node of the tree, in blob order.
pub struct AllNodes<'a> {
    blob: Blob<'a>,
    /// Next index position, for a tree with an index; else the next token's offset.
    next: Option<usize>,
}

impl<'a> AllNodes<'a> {
    pub(crate) fn new(blob: Blob<'a>) -> AllNodes<'a> {
        AllNodes {
            blob,
            next: Some(0),
        }
    }
}

impl<'a> Iterator for AllNodes<'a> {
    type Item = Node<'a>;

    fn next(&mut self) -> Option<Node<'a>> {
        let at = self.next?;
        if self.blob.index.is_some() {
            self.next = at.checked_add(1);
            let node = self.blob.indexed_node(at);
            if node.is_none() {
                self.next = None;
            }
            return node;
        }
        let mut pos = at;
        loop {
            match token(self.blob.structs, pos) {
                Ok((Token::Begin { .. }, next)) => {
                    self.next = Some(next);
                    return self.blob.node_at(pos);
                }
                Ok((Token::Prop { .. } | Token::Nop | Token::End, next)) => pos = next,
                _ => {
                    self.next = None;
                    return None;
                }
            }
        }
    }
}

/// A property: its name and raw value, with typed accessors that check the length and encoding.
#[derive(Clone, Copy)]
pub struct Property<'a> {
    pub name: &'a str,
    pub value: &'a [u8],
    /// Name of the owning node, for error values (decoded only when needed).
    node: &'a [u8],
}

impl core::fmt::Debug for Property<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Property")
            .field("name", &self.name)
            .field("value", &self.value)
            .field("node", &self.node_name())
            .finish()
    }
}

impl<'a> Property<'a> {
    /// The owning node's name, "/" for the root.
    fn node_name(&self) -> &'a str {
        match core::str::from_utf8(self.node) {
            Ok("") => "/",
            Ok(name) => name,
            Err(_) => "?",
        }
    }

    /// An error value about this property.
    pub fn error(&self, what: &'static str) -> DtError {
        DtError::Property {
            node: Name::new(self.node_name()),
            prop: Name::new(self.name),
            what,
            len: self.value.len() as u32,
        }
    }

    /// An error value about `phandle`, found in this property.
    pub fn phandle_error(&self, phandle: u32, what: &'static str) -> DtError {
        DtError::PhandleRef {
            node: Name::new(self.node_name()),
            prop: Name::new(self.name),
            phandle,
            what,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }

    /// A single 32-bit cell.
    pub fn as_u32(&self) -> Result<u32, DtError> {
        match self.value.len() {
            4 => be32(self.value, 0).ok_or_else(|| self.error("expected one cell")),
            _ => Err(self.error("expected one cell (4 bytes)")),
        }
    }

    /// A 64-bit value in two cells.
    pub fn as_u64(&self) -> Result<u64, DtError> {
        match self.value.len() {
            8 => be64(self.value, 0).ok_or_else(|| self.error("expected two cells")),
            _ => Err(self.error("expected two cells (8 bytes)")),
        }
    }

    /// One or two cells (properties such as `linux,initrd-start` come in both widths).
    pub fn as_u32_or_u64(&self) -> Result<u64, DtError> {
        match self.value.len() {
            4 => self.as_u32().map(u64::from),
            8 => self.as_u64(),
            _ => Err(self.error("expected one or two cells (4 or 8 bytes)")),
        }
    }

    /// A number of exactly `cells` cells (0, 1 or 2).
    pub fn as_cells(&self, cells: u32) -> Result<u64, DtError> {
        if self.value.len() != cells as usize * 4 {
            return Err(self.error("length does not match the #size-cells/#address-cells in force"));
        }
        read_cells(self.value, cells).ok_or_else(|| self.error("more than two cells"))
    }

    /// A phandle reference: one cell, neither 0 nor 0xffffffff.
    pub fn as_phandle(&self) -> Result<u32, DtError> {
        let ph = self.as_u32()?;
        if ph == 0 || ph == u32::MAX {
            return Err(self.error("invalid phandle value (0 or 0xffffffff)"));
        }
        Ok(ph)
    }

    /// An array of cells.
    pub fn as_u32s(&self) -> Result<U32s<'a>, DtError> {
        if !self.value.len().is_multiple_of(4) {
            return Err(self.error("length is not a multiple of 4"));
        }
        Ok(U32s { data: self.value })
    }

    /// A single NUL-terminated UTF-8 string.
    pub fn as_str(&self) -> Result<&'a str, DtError> {
        let (last, body) = self
            .value
            .split_last()
            .ok_or_else(|| self.error("empty, expected a string"))?;
        if *last != 0 {
            return Err(self.error("string not NUL-terminated"));
        }
        if body.contains(&0) {
            return Err(self.error("expected one string, found a string list"));
        }
        core::str::from_utf8(body).map_err(|_| self.error("string is not UTF-8"))
    }

    /// A list of NUL-terminated UTF-8 strings (possibly empty).
    pub fn as_str_list(&self) -> Result<StrList<'a>, DtError> {
        if let Some(&last) = self.value.last() {
            if last != 0 {
                return Err(self.error("string list not NUL-terminated"));
            }
        }
        if core::str::from_utf8(self.value).is_err() {
            return Err(self.error("string list is not UTF-8"));
        }
        Ok(StrList { data: self.value })
    }
}

/// Reads a 0-, 1- or 2-cell big-endian number from the start of `data`.
pub(crate) fn read_cells(data: &[u8], cells: u32) -> Option<u64> {
    match cells {
        0 => Some(0),
        1 => be32(data, 0).map(u64::from),
        2 => be64(data, 0),
        _ => None,
    }
}

/// Iterator over the cells of a property.
#[derive(Clone, Copy, Default)]
pub struct U32s<'a> {
    data: &'a [u8],
}

impl Iterator for U32s<'_> {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        let v = be32(self.data, 0)?;
        self.data = self.data.get(4..).unwrap_or_default();
        Some(v)
    }
}

/// A validated string list (NUL-terminated UTF-8 entries). Iterating yields the entries.
#[derive(Clone, Copy, Default)]
pub struct StrList<'a> {
    data: &'a [u8],
}

impl<'a> StrList<'a> {
    pub fn first(&self) -> Option<&'a str> {
        let mut c = *self;
        c.next()
    }

    pub fn contains(&self, s: &str) -> bool {
        let mut c = *self;
        c.any(|e| e == s)
    }
}

impl<'a> Iterator for StrList<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        let end = self.data.iter().position(|&c| c == 0)?;
        let s = core::str::from_utf8(self.data.get(..end)?).ok();
        self.data = self.data.get(end + 1..).unwrap_or_default();
        s
    }
}

impl core::fmt::Debug for StrList<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(*self).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `scan_name` byte by byte.
    fn scan_name_model(b: &[u8]) -> Option<(usize, bool)> {
        let len = b.iter().position(|&c| c == 0)?;
        Some((len, valid_name(&b[..len])))
    }

    /// `only_names` byte by byte.
    fn only_names_model(b: &[u8]) -> bool {
        b.last() == Some(&0) && b.iter().all(|&c| c == 0 || valid_name(&[c]))
    }

    /// Bytes around every boundary the word-wide tests care about, plus ordinary letters.
    fn name_byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            3 => Just(b'a'),
            1 => prop::sample::select(vec![0u8, 1, 0x20, 0x21, b'/', b'@', 0x7e, 0x7f, 0x80, 0xa1, 0xff]),
            1 => any::<u8>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn word_wide_name_checks_match_bytewise_ones(
            b in proptest::collection::vec(name_byte(), 0..40),
        ) {
            prop_assert_eq!(scan_name(&b), scan_name_model(&b));
            prop_assert_eq!(nul_position(&b), b.iter().position(|&c| c == 0));
            prop_assert_eq!(only_names(&b), only_names_model(&b));
            for off in 0..=b.len() + 1 {
                prop_assert_eq!(valid_name_at(&b, off), name_at(&b, off).is_some());
            }
        }
    }

    #[test]
    fn landmark_first_letters() {
        // `note_root_child` looks landmarks up by first letter: each must be found under its own.
        for (k, l) in LANDMARKS.iter().enumerate() {
            let mut marks = Landmarks {
                known: [ABSENT; LANDMARKS.len()],
                memory: [ABSENT; MAX_MEMORY_NODES],
                memory_len: 0,
            };
            let mut base = [ABSENT; LANDMARKS.len()];
            marks.note_root_child(&mut base, l, 8);
            marks.note_root_child(&mut base, &[*l, &b"@1"[..]].concat(), 16);
            for (j, (exact, base)) in marks.known.iter().zip(base).enumerate() {
                let (e, b) = if j == k { (8, 16) } else { (ABSENT, ABSENT) };
                assert_eq!((*exact, base), (e, b), "{}", String::from_utf8_lossy(l));
            }
        }
    }
}
