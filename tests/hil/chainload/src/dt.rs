//! Just enough of a flattened-device-tree reader for the loader: the console UART from
//! `/chosen/stdout-path` (options after `:` dropped, an alias resolved through `/aliases`), its
//! `reg` translated to a CPU physical address through every ancestor's `ranges`, the first
//! `/memory` range and the blob's size. Every read is bounds-checked: a malformed blob gives an
//! error, never a fault or a hang (the walk always moves forward and stops at the block's end).
//!
//! `core` only, so it is unit-tested on the host (`examples/hil` includes it by path).

/// Why the device tree gave no console (or no memory range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtError {
    /// No `0xd00dfeed` magic, or header fields outside the blob.
    BadHeader,
    /// The structure block is cut short or holds an unknown token.
    BadStructure,
    /// No `/chosen/stdout-path` (or `linux,stdout-path`).
    NoStdoutPath,
    /// The stdout path or alias names no node.
    NoSuchNode,
    /// The console node's `compatible` is neither a PL011 nor the BCM2835 mini UART.
    UnsupportedUart,
    /// The console node has no usable `reg`.
    NoReg,
    /// An ancestor has no `ranges`, or none of its ranges covers the address, or cells > 2.
    Untranslatable,
}

/// The console UART kinds the loader drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UartKind {
    /// Arm PrimeCell PL011 (`arm,pl011`).
    Pl011,
    /// The BCM2835 auxiliary mini UART (`brcm,bcm2835-aux-uart`).
    MiniUart,
}

const MAGIC: u32 = 0xd00d_feed;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;
const END: u32 = 9;
/// The largest blob the loader accepts (Pi DTBs are under 100 KiB).
pub const MAX_TOTALSIZE: u32 = 2 << 20;

/// A device tree blob, validated header.
pub struct Fdt<'a> {
    structs: &'a [u8],
    strings: &'a [u8],
    total: u32,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// A `(address, size)` pair read with the given cell counts (each at most 2).
fn read_cells(b: &[u8], at: usize, cells: u32) -> Option<u64> {
    match cells {
        0 => Some(0),
        1 => be32(b, at).map(u64::from),
        2 => Some(u64::from(be32(b, at)?) << 32 | u64::from(be32(b, at + 4)?)),
        _ => None,
    }
}

fn cstr(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

fn name_matches(node: &[u8], component: &[u8]) -> bool {
    node == component || (!component.contains(&b'@') && node.split(|&c| c == b'@').next() == Some(component))
}

impl<'a> Fdt<'a> {
    /// Check the header of `blob` (which may extend past the tree's `totalsize`).
    pub fn new(blob: &'a [u8]) -> Result<Self, DtError> {
        let h = |i: usize| be32(blob, i * 4).ok_or(DtError::BadHeader);
        if h(0)? != MAGIC {
            return Err(DtError::BadHeader);
        }
        let total = h(1)?;
        let (off_struct, off_strings) = (h(2)? as usize, h(3)? as usize);
        let (size_strings, size_struct) = (h(8)? as usize, h(9)? as usize);
        if total > MAX_TOTALSIZE || total as usize > blob.len() {
            return Err(DtError::BadHeader);
        }
        let blob = &blob[..total as usize];
        let structs = off_struct.checked_add(size_struct).and_then(|e| blob.get(off_struct..e)).ok_or(DtError::BadHeader)?;
        let strings = off_strings.checked_add(size_strings).and_then(|e| blob.get(off_strings..e)).ok_or(DtError::BadHeader)?;
        Ok(Fdt { structs, strings, total })
    }

    /// The blob's `totalsize`.
    pub fn total_size(&self) -> u32 {
        self.total
    }

    /// Offset just past the token at `at` and its payload, with the token.
    fn token(&self, at: usize) -> Result<(u32, usize), DtError> {
        let tok = be32(self.structs, at).ok_or(DtError::BadStructure)?;
        let next = at + 4;
        let skip = match tok {
            BEGIN_NODE => cstr(self.structs.get(next..).ok_or(DtError::BadStructure)?).len() + 1,
            PROP => {
                let len = be32(self.structs, next).ok_or(DtError::BadStructure)? as usize;
                len.checked_add(8).ok_or(DtError::BadStructure)?
            }
            END_NODE | NOP | END => 0,
            _ => return Err(DtError::BadStructure),
        };
        let end = next.checked_add(skip).and_then(|e| e.checked_add(3)).ok_or(DtError::BadStructure)? & !3;
        if end > self.structs.len() {
            return Err(DtError::BadStructure);
        }
        Ok((tok, end))
    }

    /// Offset of the first token inside the node at `path` ("" or "/" is the root). A path
    /// component without a unit address matches a node name with one (`/memory` finds
    /// `memory@0`).
    fn find_node(&self, path: &[u8]) -> Result<usize, DtError> {
        let comps = path.split(|&c| c == b'/').filter(|c| !c.is_empty());
        let want = comps.clone().count();
        let (mut depth, mut matched, mut at) = (0usize, 0usize, 0usize);
        loop {
            let (tok, next) = self.token(at)?;
            match tok {
                BEGIN_NODE => {
                    depth += 1;
                    let name = cstr(&self.structs[at + 4..]);
                    if depth == 1 {
                        if want == 0 {
                            return Ok(next);
                        }
                    } else if depth == matched + 2 && comps.clone().nth(matched).is_some_and(|c| name_matches(name, c)) {
                        matched += 1;
                        if matched == want {
                            return Ok(next);
                        }
                    }
                }
                END_NODE => {
                    if depth == 0 {
                        return Err(DtError::BadStructure);
                    }
                    if matched > 0 && depth == matched + 1 {
                        matched -= 1;
                    }
                    depth -= 1;
                }
                END => return Err(DtError::NoSuchNode),
                _ => {}
            }
            at = next;
        }
    }

    /// The value of property `name` of the node whose contents start at `node`.
    fn prop_at(&self, node: usize, name: &[u8]) -> Result<Option<&'a [u8]>, DtError> {
        let mut at = node;
        loop {
            let (tok, next) = self.token(at)?;
            match tok {
                PROP => {
                    let len = be32(self.structs, at + 4).ok_or(DtError::BadStructure)? as usize;
                    let nameoff = be32(self.structs, at + 8).ok_or(DtError::BadStructure)? as usize;
                    let pname = cstr(self.strings.get(nameoff..).ok_or(DtError::BadStructure)?);
                    if pname == name {
                        return Ok(Some(&self.structs[at + 12..at + 12 + len]));
                    }
                }
                NOP => {}
                _ => return Ok(None),
            }
            at = next;
        }
    }

    /// Property `name` of the node at `path`.
    pub fn prop(&self, path: &[u8], name: &[u8]) -> Result<Option<&'a [u8]>, DtError> {
        let node = self.find_node(path)?;
        self.prop_at(node, name)
    }

    /// `#address-cells` and `#size-cells` of the node at `path` (defaults 2 and 1).
    fn cells(&self, path: &[u8]) -> Result<(u32, u32), DtError> {
        let node = self.find_node(path)?;
        let get = |n: &[u8], d| -> Result<u32, DtError> { Ok(self.prop_at(node, n)?.and_then(|v| be32(v, 0)).unwrap_or(d)) };
        Ok((get(b"#address-cells", 2)?, get(b"#size-cells", 1)?))
    }

    /// The console: its kind and CPU physical base address.
    pub fn stdout_uart(&self) -> Result<(UartKind, u64), DtError> {
        let chosen = match self.find_node(b"/chosen") {
            Err(DtError::NoSuchNode) => return Err(DtError::NoStdoutPath),
            other => other?,
        };
        let raw = match self.prop_at(chosen, b"stdout-path")? {
            Some(v) => v,
            None => self.prop_at(chosen, b"linux,stdout-path")?.ok_or(DtError::NoStdoutPath)?,
        };
        let spec = cstr(raw);
        let spec = spec.split(|&c| c == b':').next().unwrap_or(spec);
        let path = if spec.first() == Some(&b'/') {
            spec
        } else {
            cstr(self.prop(b"/aliases", spec).map_err(|_| DtError::NoSuchNode)?.ok_or(DtError::NoSuchNode)?)
        };
        let node = self.find_node(path)?;
        let compat = self.prop_at(node, b"compatible")?.ok_or(DtError::UnsupportedUart)?;
        let has = |c: &[u8]| compat.split(|&b| b == 0).any(|s| s == c);
        let kind = if has(b"arm,pl011") {
            UartKind::Pl011
        } else if has(b"brcm,bcm2835-aux-uart") {
            UartKind::MiniUart
        } else {
            return Err(DtError::UnsupportedUart);
        };
        let parent = parent_of(path);
        let (na, _) = self.cells(parent)?;
        let reg = self.prop_at(node, b"reg")?.ok_or(DtError::NoReg)?;
        let addr = read_cells(reg, 0, na).ok_or(DtError::NoReg)?;
        Ok((kind, self.translate(parent, addr)?))
    }

    /// Translate `addr`, an address in the bus of the node at `bus` (its children's address
    /// space), up to the root's.
    fn translate(&self, mut bus: &[u8], mut addr: u64) -> Result<u64, DtError> {
        while !bus.is_empty() && bus != b"/" {
            let up = parent_of(bus);
            let (child_na, child_ns) = self.cells(bus)?;
            let (parent_na, _) = self.cells(up)?;
            let ranges = self.prop(bus, b"ranges")?.ok_or(DtError::Untranslatable)?;
            if !ranges.is_empty() {
                if child_na > 2 || parent_na > 2 || child_ns > 2 {
                    return Err(DtError::Untranslatable);
                }
                let entry = ((child_na + parent_na + child_ns) * 4) as usize;
                if entry == 0 {
                    return Err(DtError::Untranslatable);
                }
                addr = ranges
                    .chunks_exact(entry)
                    .find_map(|e| {
                        let child = read_cells(e, 0, child_na)?;
                        let parent = read_cells(e, child_na as usize * 4, parent_na)?;
                        let size = read_cells(e, (child_na + parent_na) as usize * 4, child_ns)?;
                        let off = addr.checked_sub(child)?;
                        (off < size).then(|| parent.checked_add(off)).flatten()
                    })
                    .ok_or(DtError::Untranslatable)?;
            }
            bus = up;
        }
        Ok(addr)
    }

    /// The first range of `/memory`, if it has a non-empty one (downstream Pi DTBs carry
    /// `reg = <0 0>` for the firmware to fill).
    pub fn memory(&self) -> Option<(u64, u64)> {
        let (na, ns) = self.cells(b"/").ok()?;
        let reg = self.prop(b"/memory", b"reg").ok()??;
        let base = read_cells(reg, 0, na)?;
        let size = read_cells(reg, na as usize * 4, ns)?;
        (size > 0).then_some((base, size))
    }
}

/// The parent path of `path` ("/soc" for "/soc/serial@7e201000", "" for "/soc").
fn parent_of(path: &[u8]) -> &[u8] {
    let trimmed = path.strip_suffix(b"/").unwrap_or(path);
    match trimmed.iter().rposition(|&c| c == b'/') {
        Some(i) => &trimmed[..i],
        None => b"",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Compile DTS source with dtc (the project's tests need dtc anyway).
    fn dtb(src: &str) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!("chainload-dt-{}-{:x}", std::process::id(), crc_of(src)));
        std::fs::create_dir_all(&dir).unwrap();
        let (dts, out) = (dir.join("t.dts"), dir.join("t.dtb"));
        std::fs::write(&dts, src).unwrap();
        let r = Command::new("dtc").args(["-q", "-I", "dts", "-O", "dtb", "-o"]).arg(&out).arg(&dts).output().expect("dtc");
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let b = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        b
    }

    fn crc_of(s: &str) -> u64 {
        s.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
    }

    /// A BCM2837-like tree: root 1/1, /soc translating 0x7e000000 to 0x3f000000.
    fn pi_like(stdout: &str) -> String {
        format!(
            r#"/dts-v1/;
/ {{
    #address-cells = <1>; #size-cells = <1>;
    aliases {{ serial0 = "/soc/serial@7e215040"; serial1 = "/soc/serial@7e201000"; }};
    chosen {{ stdout-path = "{stdout}"; }};
    memory@0 {{ device_type = "memory"; reg = <0 0x3c000000>; }};
    soc {{
        compatible = "simple-bus"; #address-cells = <1>; #size-cells = <1>;
        ranges = <0x7e000000 0x3f000000 0x1000000>, <0x40000000 0x40000000 0x1000>;
        serial@7e201000 {{ compatible = "arm,pl011", "arm,primecell"; reg = <0x7e201000 0x200>; }};
        serial@7e215040 {{ compatible = "brcm,bcm2835-aux-uart"; reg = <0x7e215040 0x40>; }};
        other@7e300000 {{ compatible = "acme,uart"; reg = <0x7e300000 0x40>; }};
    }};
}};
"#
        )
    }

    #[test]
    fn console_through_alias_options_and_ranges() {
        let b = dtb(&pi_like("serial1:115200n8"));
        let f = Fdt::new(&b).unwrap();
        assert_eq!(f.stdout_uart(), Ok((UartKind::Pl011, 0x3f20_1000)));
        assert_eq!(f.memory(), Some((0, 0x3c00_0000)));
        assert_eq!(f.total_size() as usize, b.len());
        let b = dtb(&pi_like("serial0"));
        assert_eq!(Fdt::new(&b).unwrap().stdout_uart(), Ok((UartKind::MiniUart, 0x3f21_5040)));
        let b = dtb(&pi_like("/soc/serial@7e201000"));
        assert_eq!(Fdt::new(&b).unwrap().stdout_uart(), Ok((UartKind::Pl011, 0x3f20_1000)));
    }

    #[test]
    fn unusable_consoles_are_errors() {
        assert_eq!(Fdt::new(&dtb(&pi_like("serial7"))).unwrap().stdout_uart(), Err(DtError::NoSuchNode));
        assert_eq!(Fdt::new(&dtb(&pi_like("/soc/other@7e300000"))).unwrap().stdout_uart(), Err(DtError::UnsupportedUart));
        let no_chosen = "/dts-v1/;\n/ { #address-cells = <1>; #size-cells = <1>; };\n";
        assert_eq!(Fdt::new(&dtb(no_chosen)).unwrap().stdout_uart(), Err(DtError::NoStdoutPath));
        let outside = pi_like("serial1").replace("<0x7e000000 0x3f000000 0x1000000>", "<0x7e300000 0x3f300000 0x100000>");
        assert_eq!(Fdt::new(&dtb(&outside)).unwrap().stdout_uart(), Err(DtError::Untranslatable));
        let zero_mem = pi_like("serial1").replace("reg = <0 0x3c000000>", "reg = <0 0>");
        assert_eq!(Fdt::new(&dtb(&zero_mem)).unwrap().memory(), None);
    }

    #[test]
    fn garbage_and_truncation_never_panic() {
        let good = dtb(&pi_like("serial1:115200n8"));
        assert_eq!(Fdt::new(&good[..good.len() - 1]).err(), Some(DtError::BadHeader));
        assert_eq!(Fdt::new(&[0u8; 64]).err(), Some(DtError::BadHeader));
        // Every single-byte corruption of the blob: an answer or an error, never a panic.
        for i in 0..good.len() {
            for v in [0x00, 0x01, 0x03, 0x09, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                if let Ok(f) = Fdt::new(&b) {
                    let _ = f.stdout_uart();
                    let _ = f.memory();
                }
            }
        }
    }
}
