//! The flattened-device-tree structure block: its validator and walker, and the `Node` and
//! `Property` views on it.
//!
//! `validate` walks the whole structure block once, when the tree is opened, and rejects anything
//! malformed. The accessors below still decode defensively (every read is bounds-checked and a
//! failure ends the iteration rather than panicking), so a bug in the validator cannot turn into a
//! panic or an out-of-bounds read, only into a missing node or property.

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

/// The NUL-terminated string at `off` in `b`, if it is terminated inside `b` and a valid name.
fn name_at(b: &[u8], off: usize) -> Option<&str> {
    let rest = b.get(off..)?;
    let len = rest.iter().position(|&c| c == 0)?;
    let bytes = rest.get(..len)?;
    if !valid_name(bytes) {
        return None;
    }
    core::str::from_utf8(bytes).ok()
}

/// One token of the structure block.
#[derive(Clone, Copy)]
enum Token<'a> {
    Begin { name: &'a str },
    Prop { nameoff: u32, value: &'a [u8] },
    End,
    Nop,
    Finish,
}

/// Decodes the token at `off`; returns it and the offset of the next token.
fn token(structs: &[u8], off: usize) -> Result<(Token<'_>, usize), &'static str> {
    let tag = be32(structs, off).ok_or("structure block ends without FDT_END")?;
    let after_tag = off + 4; // be32 succeeded, so off + 4 <= len
    match tag {
        FDT_BEGIN_NODE => {
            let rest = structs.get(after_tag..).ok_or("node name missing")?;
            let len = rest
                .iter()
                .position(|&c| c == 0)
                .ok_or("node name not NUL-terminated")?;
            let name = rest.get(..len).ok_or("node name missing")?;
            if !valid_name(name) {
                return Err("node name contains invalid characters");
            }
            let name = core::str::from_utf8(name).map_err(|_| "node name is not UTF-8")?;
            let next = align4(after_tag + len + 1).ok_or("node name too long")?;
            Ok((Token::Begin { name }, next))
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

/// The two blocks of a validated blob that nodes and properties point into.
#[derive(Clone, Copy)]
pub(crate) struct Blob<'a> {
    pub(crate) structs: &'a [u8],
    pub(crate) strings: &'a [u8],
}

impl<'a> Blob<'a> {
    /// Walks the whole structure block and checks everything the accessors rely on:
    /// tokens well-formed and inside the block, names terminated and printable, property names
    /// inside the strings block, properties before subnodes, balanced nesting no deeper than
    /// `MAX_DEPTH`, exactly one root, and a final FDT_END. Returns the root node.
    pub(crate) fn validate(self) -> Result<Node<'a>, DtError> {
        let mut off = 0usize;
        let mut depth = 0usize;
        let mut props_allowed = false;
        let mut root: Option<usize> = None;
        let mut root_closed = false;
        loop {
            let err = |what| DtError::Structure {
                offset: off as u32,
                what,
            };
            let (tok, next) = token(self.structs, off).map_err(err)?;
            match tok {
                Token::Nop => {}
                Token::Begin { name } => {
                    if root_closed {
                        return Err(err("second top-level node after the root"));
                    }
                    if depth == 0 {
                        root = Some(off);
                    } else if name.is_empty() {
                        return Err(err("node without a name"));
                    }
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Err(err("nodes nested deeper than 32 levels"));
                    }
                    props_allowed = true;
                }
                Token::Prop { nameoff, .. } => {
                    if depth == 0 {
                        return Err(err("property outside any node"));
                    }
                    if !props_allowed {
                        return Err(err("property after a subnode"));
                    }
                    if name_at(self.strings, nameoff as usize).is_none() {
                        return Err(err(
                            "property name offset outside the strings block, unterminated or invalid",
                        ));
                    }
                }
                Token::End => {
                    if depth == 0 {
                        return Err(err("FDT_END_NODE without a matching FDT_BEGIN_NODE"));
                    }
                    depth -= 1;
                    props_allowed = false;
                    if depth == 0 {
                        root_closed = true;
                    }
                }
                Token::Finish => {
                    if depth != 0 {
                        return Err(err("FDT_END inside an unclosed node"));
                    }
                    let root = root.ok_or_else(|| err("no root node"))?;
                    return self.node_at(root).ok_or_else(|| err("no root node"));
                }
            }
            off = next;
        }
    }

    /// The node whose FDT_BEGIN_NODE token is at `off`.
    pub(crate) fn node_at(self, off: usize) -> Option<Node<'a>> {
        match token(self.structs, off) {
            Ok((Token::Begin { name }, body)) => Some(Node {
                blob: self,
                off,
                body,
                name,
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

    /// Offsets of the nodes from the root down to (and including) the node at `target`.
    pub(crate) fn ancestry(self, target: usize) -> Option<Ancestry<'a>> {
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
}

/// A node of a validated tree. Cheap to copy; knows its own position, so it can find its parent
/// (by a walk from the root: FDT nodes carry no parent links).
#[derive(Clone, Copy)]
pub struct Node<'a> {
    pub(crate) blob: Blob<'a>,
    /// Offset of the node's FDT_BEGIN_NODE token in the structure block: its identity.
    off: usize,
    /// Offset of the first token after the name.
    body: usize,
    name: &'a str,
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
    /// Full node name, `name@unit-address` (empty for the root).
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The name without the unit address.
    pub fn base_name(&self) -> &'a str {
        self.name.split('@').next().unwrap_or(self.name)
    }

    /// The unit address (text after '@'), if any.
    pub fn unit_address(&self) -> Option<&'a str> {
        self.name.split_once('@').map(|(_, u)| u)
    }

    /// The name in a form fit for error values.
    pub(crate) fn short_name(&self) -> Name {
        Name::new(if self.name.is_empty() { "/" } else { self.name })
    }

    /// Offset of the node in the structure block (its identity within one tree).
    pub fn offset(&self) -> usize {
        self.off
    }

    pub fn properties(&self) -> Properties<'a> {
        Properties {
            blob: self.blob,
            pos: Some(self.body),
            node: self.name,
        }
    }

    /// The property called `name` (the first one, should a broken tree carry duplicates).
    pub fn property(&self, name: &str) -> Option<Property<'a>> {
        self.properties().find(|p| p.name == name)
    }

    pub fn has_property(&self, name: &str) -> bool {
        self.property(name).is_some()
    }

    pub fn children(&self) -> Children<'a> {
        Children {
            blob: self.blob,
            pos: Some(self.body),
        }
    }

    /// The child whose name is `name` exactly, or else (if `name` has no unit address) the first
    /// child whose base name is `name` — the libfdt lookup rule.
    pub fn child(&self, name: &str) -> Option<Node<'a>> {
        self.children().find(|c| c.name == name).or_else(|| {
            if name.contains('@') {
                None
            } else {
                self.children().find(|c| c.base_name() == name)
            }
        })
    }

    /// The chain of nodes from the root down to this node.
    pub fn ancestry(&self) -> Ancestry<'a> {
        // A node obtained from a validated tree is always found; the fallback (the node alone) is
        // only reachable if the validator and this walk disagree.
        self.blob.ancestry(self.off).unwrap_or(Ancestry {
            blob: self.blob,
            offs: {
                let mut o = [0; MAX_DEPTH];
                o[0] = self.off as u32;
                o
            },
            len: 1,
        })
    }

    /// The parent node; `None` for the root.
    pub fn parent(&self) -> Option<Node<'a>> {
        self.ancestry().parent()
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
    node: &'a str,
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

/// Iterator over a node's direct children.
pub struct Children<'a> {
    blob: Blob<'a>,
    pos: Option<usize>,
}

impl<'a> Iterator for Children<'a> {
    type Item = Node<'a>;

    fn next(&mut self) -> Option<Node<'a>> {
        loop {
            let pos = self.pos?;
            match token(self.blob.structs, pos) {
                Ok((Token::Nop | Token::Prop { .. }, next)) => self.pos = Some(next),
                Ok((Token::Begin { .. }, _)) => {
                    self.pos = self.blob.skip_subtree(pos);
                    return self.blob.node_at(pos);
                }
                _ => self.pos = None,
            }
        }
    }
}

/// Depth-first iterator over every node of the tree, in blob order.
pub struct AllNodes<'a> {
    pub(crate) blob: Blob<'a>,
    pub(crate) pos: Option<usize>,
}

impl<'a> Iterator for AllNodes<'a> {
    type Item = Node<'a>;

    fn next(&mut self) -> Option<Node<'a>> {
        loop {
            let pos = self.pos?;
            match token(self.blob.structs, pos) {
                Ok((Token::Begin { .. }, next)) => {
                    self.pos = Some(next);
                    return self.blob.node_at(pos);
                }
                Ok((Token::Prop { .. } | Token::Nop | Token::End, next)) => self.pos = Some(next),
                _ => self.pos = None,
            }
        }
    }
}

/// A property: its name and raw value, with typed accessors that check the length and encoding.
#[derive(Clone, Copy, Debug)]
pub struct Property<'a> {
    pub name: &'a str,
    pub value: &'a [u8],
    /// Name of the owning node, for error values.
    node: &'a str,
}

impl<'a> Property<'a> {
    /// An error value about this property.
    pub fn error(&self, what: &'static str) -> DtError {
        DtError::Property {
            node: Name::new(if self.node.is_empty() { "/" } else { self.node }),
            prop: Name::new(self.name),
            what,
            len: self.value.len() as u32,
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
