//! Error values of the device-tree layer, and `ShortStr`, the fixed-size string they (and the boot
//! memory map) use to name things without borrowing from the blob or allocating.

use core::fmt;

/// A string of at most `N` bytes (and at most 255) stored inline. Longer input is cut at a character
/// boundary and marked with a trailing `~`, so a truncated name is recognisable as such in a log.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShortStr<const N: usize> {
    buf: [u8; N],
    len: u8,
}

impl<const N: usize> ShortStr<N> {
    /// The empty string.
    pub const EMPTY: Self = ShortStr {
        buf: [0; N],
        len: 0,
    };

    /// Copies `s`, truncating it to fit (see the type's documentation).
    pub fn new(s: &str) -> Self {
        let mut out = Self::EMPTY;
        let cap = N.min(u8::MAX as usize);
        let (keep, truncated) = if s.len() <= cap {
            (s.len(), false)
        } else {
            // Leave one byte for the truncation mark.
            let mut cut = cap.saturating_sub(1);
            while cut > 0 && !s.is_char_boundary(cut) {
                cut -= 1;
            }
            (cut, true)
        };
        out.buf[..keep].copy_from_slice(&s.as_bytes()[..keep]);
        out.len = keep as u8;
        if truncated && keep < cap {
            out.buf[keep] = b'~';
            out.len = keep as u8 + 1;
        }
        out
    }

    pub fn as_str(&self) -> &str {
        // `new` only ever copies whole characters plus an ASCII '~', so this cannot fail; the
        // fallback keeps the function total without an unwrap.
        core::str::from_utf8(self.buf.get(..self.len as usize).unwrap_or_default()).unwrap_or("?")
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<const N: usize> Default for ShortStr<N> {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl<const N: usize> fmt::Display for ShortStr<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl<const N: usize> fmt::Debug for ShortStr<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A node or property name kept in an error.
pub type Name = ShortStr<40>;

/// Everything that can be wrong with a device tree or a query on it. Every variant carries enough
/// context for its `Display` text to stand alone in a boot log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtError {
    /// `from_ptr` was given a null pointer.
    NullPointer,
    /// `from_ptr` was given a pointer that is not 8-byte aligned (the spec requires it).
    Misaligned { addr: u64 },
    /// The first word is not 0xd00dfeed.
    BadMagic { magic: u32, addr: u64 },
    /// `totalsize` is smaller than the header or larger than `MAX_TOTALSIZE`.
    TotalSize { totalsize: u32 },
    /// The buffer is shorter than the header, or than `totalsize`.
    Truncated { need: u64, have: u64 },
    /// Version older than 16 or incompatible (last_comp_version newer than 17).
    Version { version: u32, last_comp: u32 },
    /// A block named by the header lies (partly) outside `totalsize`.
    BlockOutOfBounds {
        block: &'static str,
        start: u64,
        end: u64,
        totalsize: u32,
    },
    /// A block named by the header starts inside the header itself.
    BlockOverHeader { block: &'static str, start: u32 },
    /// Two blocks named by the header share bytes (each range as the header and, for the
    /// reservation map, its terminator place it).
    BlocksOverlap {
        first: &'static str,
        first_range: (u64, u64),
        second: &'static str,
        second_range: (u64, u64),
    },
    /// A block offset is not aligned as the spec requires.
    BlockMisaligned { block: &'static str, offset: u32 },
    /// The memory reservation map has no terminating (0, 0) entry inside the blob.
    MemReserveUnterminated,
    /// The structure block is malformed at `offset` (relative to the block's start).
    Structure { offset: u32, what: &'static str },
    /// The property at structure offset `offset` has a bad name: `nameoff` (its offset in the
    /// strings block) is outside the block, or the string there is empty, unterminated or not a
    /// valid name.
    PropertyName {
        offset: u32,
        nameoff: u32,
        what: &'static str,
    },
    /// A node or alias that a query needs does not exist.
    NotFound { what: &'static str, name: Name },
    /// A property has the wrong length or encoding.
    Property {
        node: Name,
        prop: Name,
        what: &'static str,
        len: u32,
    },
    /// `#address-cells` / `#size-cells` outside what this kernel supports.
    Cells {
        node: Name,
        prop: &'static str,
        value: u32,
        max: u32,
    },
    /// `#address-cells` / `#size-cells` is 0 where what the node's children describe needs
    /// addresses (or sizes): legal on some nodes (`/cpus` has `#size-cells = 0`), not on this one.
    ZeroCells {
        node: Name,
        prop: &'static str,
        what: &'static str,
    },
    /// An address cannot be translated to a CPU physical address.
    Untranslatable {
        node: Name,
        addr: u64,
        what: &'static str,
    },
    /// A phandle is invalid (0 or ~0), unknown, or defined by two nodes.
    Phandle { phandle: u32, what: &'static str },
    /// A phandle found in property `prop` of `node` is unknown or ambiguous, or names a node that
    /// is not what the property needs.
    PhandleRef {
        node: Name,
        prop: Name,
        phandle: u32,
        what: &'static str,
    },
    /// A chain of references (interrupt-parent, ...) does not end within the hop limit.
    Loop {
        what: &'static str,
        node: Name,
        hops: u32,
    },
    /// A region would wrap past the end of the 64-bit address space.
    Overflow { node: Name, base: u64, size: u64 },
}

impl fmt::Display for DtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use DtError::*;
        match self {
            NullPointer => write!(f, "no device tree at 0x0 (null pointer)"),
            Misaligned { addr } => {
                write!(f, "device tree at {addr:#x} is not 8-byte aligned")
            }
            BadMagic { magic, addr } => write!(
                f,
                "bad magic {magic:#010x} at {addr:#x} (expected 0xd00dfeed): not a flattened device tree"
            ),
            TotalSize { totalsize } => write!(
                f,
                "implausible totalsize {totalsize} bytes in the header (must be {}..={})",
                super::HEADER_SIZE,
                super::MAX_TOTALSIZE
            ),
            Truncated { need, have } => {
                write!(f, "truncated: need {need} bytes, only {have} available")
            }
            Version { version, last_comp } => write!(
                f,
                "unsupported version {version} (last compatible {last_comp}); need version >= 16 \
                 readable by a version-17 parser"
            ),
            BlockOutOfBounds { block, start, end, totalsize } => write!(
                f,
                "truncated: header says {totalsize} bytes, {block} block spans {start:#x}..{end:#x}"
            ),
            BlockOverHeader { block, start } => write!(
                f,
                "{block} block at {start:#x} overlaps the header (0x0..{:#x})",
                super::HEADER_SIZE
            ),
            BlocksOverlap {
                first,
                first_range: (a, b),
                second,
                second_range: (c, d),
            } => write!(
                f,
                "{first} block {a:#x}..{b:#x} overlaps the {second} block {c:#x}..{d:#x}"
            ),
            BlockMisaligned { block, offset } => {
                write!(f, "{block} block offset {offset:#x} is misaligned")
            }
            MemReserveUnterminated => {
                write!(f, "memory reservation map runs off the end without a (0, 0) terminator")
            }
            Structure { offset, what } => {
                write!(f, "malformed structure block at offset {offset:#x}: {what}")
            }
            PropertyName {
                offset,
                nameoff,
                what,
            } => write!(
                f,
                "malformed structure block at offset {offset:#x}: property name at strings-block \
                 offset {nameoff:#x} {what}"
            ),
            NotFound { what, name } => write!(f, "{what} `{name}` not found"),
            Property { node, prop, what, len } => {
                write!(f, "property `{prop}` of node `{node}` ({len} bytes): {what}")
            }
            Cells { node, prop, value, max } => write!(
                f,
                "`{prop} = {value}` in node `{node}` is not supported (at most {max})"
            ),
            ZeroCells { node, prop, what } => {
                write!(f, "`{prop} = 0` in node `{node}` is not allowed: {what}")
            }
            Untranslatable { node, addr, what } => write!(
                f,
                "cannot translate address {addr:#x} of node `{node}` to a CPU physical address: {what}"
            ),
            Phandle { phandle, what } => write!(f, "phandle {phandle:#x}: {what}"),
            PhandleRef {
                node,
                prop,
                phandle,
                what,
            } => write!(
                f,
                "property `{prop}` of node `{node}`: phandle {phandle:#x}: {what}"
            ),
            Loop { what, node, hops } => write!(
                f,
                "{what} starting at node `{node}` does not end after {hops} hops (cycle?)"
            ),
            Overflow { node, base, size } => write!(
                f,
                "region {base:#x} + {size:#x} of node `{node}` wraps past the end of the address space"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_str_truncates_on_char_boundary_with_mark() {
        assert_eq!(ShortStr::<8>::new("abc").as_str(), "abc");
        assert_eq!(ShortStr::<8>::new("abcdefgh").as_str(), "abcdefgh");
        assert_eq!(ShortStr::<8>::new("abcdefghi").as_str(), "abcdefg~");
        // 'é' is two bytes (offsets 6 and 7): the 8-byte string fits; with one more byte the cut
        // at 7 would split 'é', so it moves back to 6.
        assert_eq!(ShortStr::<8>::new("aaaaaaé").as_str(), "aaaaaaé");
        assert_eq!(ShortStr::<8>::new("aaaaaaéb").as_str(), "aaaaaa~");
        assert_eq!(ShortStr::<0>::new("x").as_str(), "");
        assert!(ShortStr::<4>::EMPTY.is_empty());
    }

    #[test]
    fn messages_are_specific() {
        let s = format!("{}", DtError::NullPointer);
        assert_eq!(s, "no device tree at 0x0 (null pointer)");
        let s = format!(
            "{}",
            DtError::BadMagic {
                magic: 0x12345678,
                addr: 0x4800_0000
            }
        );
        assert!(s.starts_with("bad magic 0x12345678 at 0x48000000"), "{s}");
        let s = format!(
            "{}",
            DtError::BlockOutOfBounds {
                block: "structure",
                start: 0x40,
                end: 0x2000,
                totalsize: 4096
            }
        );
        assert_eq!(
            s,
            "truncated: header says 4096 bytes, structure block spans 0x40..0x2000"
        );
    }
}
