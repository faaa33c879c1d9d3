//! The `cma=` boot argument, as Linux's early_cma() reads it:
//!
//! - `cma=nn[KMG]`: size of the default area, placed dynamically; `cma=0`: no default area;
//! - `cma=nn[KMG]@start[KMG]`: a fixed area at `start`;
//! - `cma=nn[KMG]@start[KMG]-end[KMG]`: a dynamic area inside [start, end).
//!
//! Numbers follow Linux's memparse(): decimal, `0x` hexadecimal or `0` octal, with an optional
//! suffix K, M, G, T, P or E (either case; powers of 1024). Unlike Linux, which ignores what it
//! cannot parse, anything malformed, trailing or overflowing is an error.

use core::fmt;

use super::placement::AreaRequest;
use crate::mm::addr::PhysAddr;

/// A parsed `cma=` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmaCmdline {
    /// Size in bytes; 0 disables the default area.
    pub size: u64,
    /// `@start`: the fixed base, or the start of the placement window if `limit` is given.
    pub base: Option<PhysAddr>,
    /// `-end`: exclusive end of the placement window.
    pub limit: Option<PhysAddr>,
}

/// Why a `cma=` value was rejected. `pos` is a byte offset in the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmaCmdlineError {
    Empty,
    /// No number where one was expected.
    ExpectedNumber {
        pos: usize,
    },
    /// A number (with its suffix) does not fit in 64 bits.
    Overflow {
        pos: usize,
    },
    /// Something other than `@` or `-` after a number, or text after the end.
    Unexpected {
        pos: usize,
        found: char,
    },
    /// The window `start-end` is empty.
    EmptyWindow {
        start: u64,
        end: u64,
    },
}

impl fmt::Display for CmaCmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cma=: ")?;
        match *self {
            CmaCmdlineError::Empty => f.write_str("empty value (expected size[@start[-end]])"),
            CmaCmdlineError::ExpectedNumber { pos } => {
                write!(f, "expected a number at offset {pos}")
            }
            CmaCmdlineError::Overflow { pos } => {
                write!(f, "number at offset {pos} does not fit in 64 bits")
            }
            CmaCmdlineError::Unexpected { pos, found } => {
                write!(f, "unexpected {found:?} at offset {pos}")
            }
            CmaCmdlineError::EmptyWindow { start, end } => {
                write!(f, "window {start:#x}-{end:#x} is empty")
            }
        }
    }
}

impl CmaCmdline {
    /// Whether the value disables the default area (`cma=0`).
    pub fn is_disabled(&self) -> bool {
        self.size == 0
    }

    /// The placement request for the default area, `None` if disabled. As in Linux's
    /// dma_contiguous_reserve(), the window end (or, for a dynamic area, the only limit) is combined
    /// with `dma_limit`, the exclusive end of memory that every device can address.
    pub fn request(&self, dma_limit: Option<PhysAddr>) -> Option<AreaRequest<'static>> {
        if self.is_disabled() {
            return None;
        }
        let limit = match (self.limit, dma_limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Some(match (self.base, self.limit) {
            (Some(base), None) => AreaRequest {
                limit,
                ..AreaRequest::fixed(base, self.size)
            },
            (base, _) => AreaRequest {
                lower: base.unwrap_or_default(),
                limit,
                ..AreaRequest::dynamic(self.size)
            },
        })
    }
}

/// Parses the value of `cma=` (the text after the `=`).
pub fn parse_cma(value: &str) -> Result<CmaCmdline, CmaCmdlineError> {
    if value.is_empty() {
        return Err(CmaCmdlineError::Empty);
    }
    let bytes = value.as_bytes();
    let (size, mut pos) = parse_size(bytes, 0)?;
    let mut out = CmaCmdline {
        size,
        base: None,
        limit: None,
    };
    if bytes.get(pos) == Some(&b'@') {
        let (start, next) = parse_size(bytes, pos + 1)?;
        out.base = Some(PhysAddr(start));
        pos = next;
        if bytes.get(pos) == Some(&b'-') {
            let (end, next) = parse_size(bytes, pos + 1)?;
            if end <= start {
                return Err(CmaCmdlineError::EmptyWindow { start, end });
            }
            out.limit = Some(PhysAddr(end));
            pos = next;
        }
    }
    match value[pos..].chars().next() {
        None => Ok(out),
        Some(found) => Err(CmaCmdlineError::Unexpected { pos, found }),
    }
}

/// memparse(): a number at `pos` with an optional binary suffix; returns it and the position after.
fn parse_size(s: &[u8], pos: usize) -> Result<(u64, usize), CmaCmdlineError> {
    let rest = &s[pos..];
    let (radix, skip) = match rest {
        [b'0', b'x' | b'X', ..] => (16, 2),
        [b'0', ..] => (8, 0),
        _ => (10, 0),
    };
    let digits = &rest[skip..];
    let n = digits
        .iter()
        .take_while(|c| char::from(**c).is_digit(radix))
        .count();
    if n == 0 {
        return Err(CmaCmdlineError::ExpectedNumber { pos: pos + skip });
    }
    let overflow = CmaCmdlineError::Overflow { pos };
    let mut value: u64 = 0;
    for &c in &digits[..n] {
        let d = char::from(c).to_digit(radix).map_or(0, u64::from);
        value = value
            .checked_mul(u64::from(radix))
            .and_then(|v| v.checked_add(d))
            .ok_or(overflow)?;
    }
    let mut end = pos + skip + n;
    let shift = match s.get(end).map(u8::to_ascii_uppercase) {
        Some(b'K') => 10,
        Some(b'M') => 20,
        Some(b'G') => 30,
        Some(b'T') => 40,
        Some(b'P') => 50,
        Some(b'E') => 60,
        _ => 0,
    };
    if shift != 0 {
        end += 1;
        if value.leading_zeros() < shift {
            return Err(overflow);
        }
        value <<= shift;
    }
    Ok((value, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use CmaCmdlineError as E;

    const MIB: u64 = 1 << 20;

    fn c(size: u64, base: Option<u64>, limit: Option<u64>) -> Result<CmaCmdline, CmaCmdlineError> {
        Ok(CmaCmdline {
            size,
            base: base.map(PhysAddr),
            limit: limit.map(PhysAddr),
        })
    }

    #[test]
    fn parse_table() {
        let table: &[(&str, Result<CmaCmdline, CmaCmdlineError>)] = &[
            ("64M", c(64 * MIB, None, None)),
            ("0", c(0, None, None)),
            ("67108864", c(64 * MIB, None, None)),
            ("0x4000000", c(64 * MIB, None, None)),
            ("0X10k", c(16 << 10, None, None)),
            ("010M", c(8 * MIB, None, None)),
            ("1g", c(1 << 30, None, None)),
            ("2T", c(2 << 40, None, None)),
            ("1P", c(1 << 50, None, None)),
            ("15E", c(15 << 60, None, None)),
            ("32M@0x48000000", c(32 * MIB, Some(0x4800_0000), None)),
            ("32M@1G", c(32 * MIB, Some(1 << 30), None)),
            ("32M@0", c(32 * MIB, Some(0), None)),
            ("64M@1G-2G", c(64 * MIB, Some(1 << 30), Some(2 << 30))),
            ("64M@0-0x40000000", c(64 * MIB, Some(0), Some(1 << 30))),
            ("", Err(E::Empty)),
            ("M", Err(E::ExpectedNumber { pos: 0 })),
            ("0x", Err(E::ExpectedNumber { pos: 2 })),
            ("64M@", Err(E::ExpectedNumber { pos: 4 })),
            ("64M@1G-", Err(E::ExpectedNumber { pos: 7 })),
            ("64MB", Err(E::Unexpected { pos: 3, found: 'B' })),
            ("64 M", Err(E::Unexpected { pos: 2, found: ' ' })),
            ("08", Err(E::Unexpected { pos: 1, found: '8' })),
            ("64M,cma=1", Err(E::Unexpected { pos: 3, found: ',' })),
            ("64M-1G", Err(E::Unexpected { pos: 3, found: '-' })),
            ("64M@1G-2G-3G", Err(E::Unexpected { pos: 9, found: '-' })),
            (
                "64M@1Gé",
                Err(E::Unexpected {
                    pos: 6, found: 'é'
                }),
            ),
            ("16E", Err(E::Overflow { pos: 0 })),
            ("18446744073709551615", c(u64::MAX, None, None)),
            ("18446744073709551616", Err(E::Overflow { pos: 0 })),
            ("0xffffffffffffffffff", Err(E::Overflow { pos: 0 })),
            ("1M@0x20000000000000000", Err(E::Overflow { pos: 3 })),
            (
                "64M@2G-1G",
                Err(E::EmptyWindow {
                    start: 2 << 30,
                    end: 1 << 30,
                }),
            ),
            (
                "64M@1G-1G",
                Err(E::EmptyWindow {
                    start: 1 << 30,
                    end: 1 << 30,
                }),
            ),
        ];
        for (input, want) in table {
            assert_eq!(parse_cma(input), *want, "cma={input}");
        }
    }

    #[test]
    fn requests() {
        let gib = PhysAddr(1 << 30);
        let four_gib = PhysAddr(4 << 30);
        let req = |s: &str, dma| parse_cma(s).unwrap().request(dma);
        assert_eq!(req("0", Some(four_gib)), None);
        assert_eq!(
            req("64M", Some(four_gib)),
            Some(AreaRequest {
                limit: Some(four_gib),
                ..AreaRequest::dynamic(64 * MIB)
            })
        );
        assert_eq!(req("64M", None), Some(AreaRequest::dynamic(64 * MIB)));
        assert_eq!(
            req("32M@1G", Some(four_gib)),
            Some(AreaRequest {
                limit: Some(four_gib),
                ..AreaRequest::fixed(gib, 32 * MIB)
            })
        );
        assert_eq!(
            req("64M@1G-8G", Some(four_gib)),
            Some(AreaRequest {
                lower: gib,
                limit: Some(four_gib),
                ..AreaRequest::dynamic(64 * MIB)
            })
        );
        assert_eq!(
            req("64M@0-1G", None),
            Some(AreaRequest {
                limit: Some(gib),
                ..AreaRequest::dynamic(64 * MIB)
            })
        );
    }

    #[test]
    fn error_message() {
        assert_eq!(
            parse_cma("64MB").unwrap_err().to_string(),
            "cma=: unexpected 'B' at offset 3"
        );
    }
}
