//! The kernel command line (`/chosen/bootargs`), parsed the way Linux does, without allocating.
//!
//! Grammar: arguments are separated by whitespace (space, tab, CR, LF) outside double quotes. An
//! argument is `key` or `key=value`; the key ends at the first `=` and may contain dots
//! (`ktest.filter`, `dma.remap`). A value in double quotes (`key="a b"`) or a whole argument in
//! double quotes (`"key=a b"`) has those quotes removed; quotes anywhere else are kept but still
//! group whitespace. As in Linux, `-` and `_` are interchangeable in keys and the last occurrence
//! of a key wins. Control characters are refused (only the four whitespace characters are allowed,
//! and only as separators).
//!
//! Also here: the value parsers shared by every option (`parse_size` = Linux `memparse`,
//! `parse_u64`, `parse_bool`) and the glob matcher used by `ktest.filter=` and `bench=`.

use core::fmt;

/// Most arguments accepted; more is an error rather than a silent drop.
pub const MAX_ARGS: usize = 64;

/// One argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arg<'a> {
    pub key: &'a str,
    /// `None` for a bare flag (`quiet`), `Some("")` for `key=`.
    pub value: Option<&'a str>,
}

/// What is wrong with a command line or a value. Positions are byte offsets into the line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootargError {
    UnterminatedQuote {
        at: usize,
    },
    EmptyKey {
        at: usize,
    },
    /// A key containing a double quote (`a"b"=c`).
    QuoteInKey {
        at: usize,
    },
    TooMany {
        max: usize,
    },
    ControlChar {
        at: usize,
        ch: char,
    },
    /// A value that is not a number of the expected form.
    InvalidNumber,
    /// A number with a leading zero (`010`): Linux would read it as octal, we refuse to guess.
    LeadingZero,
    /// A number (after applying its size suffix) that does not fit in 64 bits.
    Overflow,
    /// A value that is not one of the boolean words.
    InvalidBool,
}

impl fmt::Display for BootargError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use BootargError::*;
        match self {
            UnterminatedQuote { at } => write!(f, "unterminated quote in the argument at {at}"),
            EmptyKey { at } => write!(f, "argument at {at} has an empty key"),
            QuoteInKey { at } => write!(f, "argument at {at} has a quote in its key"),
            TooMany { max } => write!(f, "more than {max} arguments"),
            ControlChar { at, ch } => write!(f, "control character {ch:?} at {at}"),
            InvalidNumber => f.write_str("not a number (decimal or 0x hex, optional K/M/G/T/P/E)"),
            LeadingZero => f.write_str("leading zero (ambiguous: Linux reads it as octal)"),
            Overflow => f.write_str("number does not fit in 64 bits"),
            InvalidBool => f.write_str("not a boolean (1/0, y/n, yes/no, on/off, true/false)"),
        }
    }
}

/// A parsed command line, borrowing from the input.
#[derive(Clone)]
pub struct Bootargs<'a> {
    args: [Arg<'a>; MAX_ARGS],
    len: usize,
}

fn is_separator(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// `s` without one pair of enclosing double quotes, if it has exactly that pair and no other.
fn unquote(s: &str) -> &str {
    match s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) if !inner.contains('"') => inner,
        _ => s,
    }
}

/// Key equality with `-` and `_` interchangeable.
fn key_char_eq(a: char, b: char) -> bool {
    a == b || (matches!(a, '-' | '_') && matches!(b, '-' | '_'))
}

fn key_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.chars().zip(b.chars()).all(|(x, y)| key_char_eq(x, y))
}

impl<'a> Bootargs<'a> {
    /// Splits `line` into arguments (see the module documentation for the grammar).
    pub fn parse(line: &'a str) -> Result<Bootargs<'a>, BootargError> {
        let mut out = Bootargs {
            args: [Arg {
                key: "",
                value: None,
            }; MAX_ARGS],
            len: 0,
        };
        let mut chars = line.char_indices().peekable();
        loop {
            // Skip separators; stop at the end.
            let start = loop {
                match chars.peek() {
                    None => return Ok(out),
                    Some(&(_, c)) if is_separator(c) => {
                        chars.next();
                    }
                    Some(&(i, _)) => break i,
                }
            };
            let mut in_quote = false;
            let mut end = line.len();
            while let Some(&(i, c)) = chars.peek() {
                if is_separator(c) && !in_quote {
                    end = i;
                    break;
                }
                if c.is_control() {
                    return Err(BootargError::ControlChar { at: i, ch: c });
                }
                if c == '"' {
                    in_quote = !in_quote;
                }
                chars.next();
            }
            if in_quote {
                return Err(BootargError::UnterminatedQuote { at: start });
            }
            out.push(line.get(start..end).unwrap_or(""), start)?;
        }
    }

    fn push(&mut self, token: &'a str, at: usize) -> Result<(), BootargError> {
        let token = unquote(token);
        let (key, value) = match token.split_once('=') {
            Some((k, v)) => (k, Some(unquote(v))),
            None => (token, None),
        };
        if key.is_empty() {
            return Err(BootargError::EmptyKey { at });
        }
        if key.contains('"') {
            return Err(BootargError::QuoteInKey { at });
        }
        let slot = self
            .args
            .get_mut(self.len)
            .ok_or(BootargError::TooMany { max: MAX_ARGS })?;
        *slot = Arg { key, value };
        self.len += 1;
        Ok(())
    }

    /// All arguments in command-line order.
    pub fn iter(&self) -> core::slice::Iter<'_, Arg<'a>> {
        self.args[..self.len].iter()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value of the last occurrence of `key`: `None` if absent, `Some("")` for a bare flag
    /// or `key=`.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.iter()
            .rev()
            .find(|a| key_eq(a.key, key))
            .map(|a| a.value.unwrap_or(""))
    }

    /// Whether `key` appears at all, with or without a value.
    pub fn has(&self, key: &str) -> bool {
        self.iter().any(|a| key_eq(a.key, key))
    }

    /// A boolean option: `None` if absent, `true` for a bare flag (as Linux's `param_set_bool`),
    /// else the last value parsed with [`parse_bool`].
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, BootargError> {
        match self.iter().rev().find(|a| key_eq(a.key, key)) {
            None => Ok(None),
            Some(Arg { value: None, .. }) => Ok(Some(true)),
            Some(Arg { value: Some(v), .. }) => parse_bool(v).map(Some),
        }
    }

    /// The arguments whose key matches none of `known` (globs, with `-`/`_` interchangeable, so
    /// `"8250.*"` admits a whole family), for "unknown bootarg X, ignored" warnings.
    pub fn unknown<'s>(&'s self, known: &'s [&'s str]) -> impl Iterator<Item = &'s Arg<'a>> + 's {
        self.iter()
            .filter(move |a| !known.iter().any(|k| glob_match_by(k, a.key, key_char_eq)))
    }
}

impl fmt::Debug for Bootargs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Reads a leading decimal or `0x` hexadecimal number; returns it and the rest of `s`.
fn parse_number_prefix(s: &str) -> Result<(u64, &str), BootargError> {
    let (digits_start, radix) = match s.get(..2) {
        Some("0x" | "0X") => (2, 16),
        _ => (0, 10),
    };
    let body = s.get(digits_start..).unwrap_or("");
    let ndigits = body
        .bytes()
        .take_while(|b| (*b as char).is_digit(radix))
        .count();
    if ndigits == 0 {
        return Err(BootargError::InvalidNumber);
    }
    if radix == 10 && ndigits > 1 && body.starts_with('0') {
        return Err(BootargError::LeadingZero);
    }
    let (digits, rest) = body.split_at(ndigits);
    let mut value: u64 = 0;
    for d in digits.chars() {
        let d = d.to_digit(radix).ok_or(BootargError::InvalidNumber)?;
        value = value
            .checked_mul(radix as u64)
            .and_then(|v| v.checked_add(d as u64))
            .ok_or(BootargError::Overflow)?;
    }
    Ok((value, rest))
}

/// A whole unsigned number: decimal, or hexadecimal with `0x`.
pub fn parse_u64(s: &str) -> Result<u64, BootargError> {
    match parse_number_prefix(s)? {
        (v, "") => Ok(v),
        _ => Err(BootargError::InvalidNumber),
    }
}

/// A size, as Linux's `memparse`: a number (decimal or `0x` hex) optionally followed by one of
/// K, M, G, T, P, E (case-insensitive, powers of 1024). Unlike `memparse`, trailing text, octal
/// and overflow are errors instead of being ignored or wrapping.
pub fn parse_size(s: &str) -> Result<u64, BootargError> {
    let (v, rest) = parse_number_prefix(s)?;
    let shift = match rest {
        "" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(BootargError::InvalidNumber),
    };
    if shift > 0 && v.leading_zeros() < shift {
        return Err(BootargError::Overflow);
    }
    Ok(v << shift)
}

/// `1/0, y/n, yes/no, on/off, true/false`, case-insensitive.
pub fn parse_bool(s: &str) -> Result<bool, BootargError> {
    const TRUE: [&str; 5] = ["1", "y", "yes", "on", "true"];
    const FALSE: [&str; 5] = ["0", "n", "no", "off", "false"];
    if TRUE.iter().any(|t| t.eq_ignore_ascii_case(s)) {
        Ok(true)
    } else if FALSE.iter().any(|t| t.eq_ignore_ascii_case(s)) {
        Ok(false)
    } else {
        Err(BootargError::InvalidBool)
    }
}

/// Shell-style glob: `*` matches any sequence of characters (including none), `?` exactly one
/// character; everything else matches itself. No escapes, no classes. Runs in
/// O(len(pattern) · len(text)) without recursion.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    glob_match_by(pattern, text, |a, b| a == b)
}

/// Whether any of the comma-separated globs in `list` matches `text`. Empty entries are ignored,
/// so an empty list matches nothing.
pub fn glob_match_any(list: &str, text: &str) -> bool {
    list.split(',')
        .filter(|p| !p.is_empty())
        .any(|p| glob_match(p, text))
}

/// Greedy matching with backtracking to the last `*` only, which suffices for `*`/`?` globs.
fn glob_match_by(pattern: &str, text: &str, eq: fn(char, char) -> bool) -> bool {
    let char_at = |s: &str, i: usize| s.get(i..).and_then(|r| r.chars().next());
    let (mut p, mut t) = (0usize, 0usize);
    // Pattern position just after the last '*', and the text position that '*' is matched up to.
    let mut star: Option<(usize, usize)> = None;
    while let Some(tc) = char_at(text, t) {
        match char_at(pattern, p) {
            Some('*') => {
                p += 1;
                star = Some((p, t));
            }
            Some(pc) if pc == '?' || eq(pc, tc) => {
                p += pc.len_utf8();
                t += tc.len_utf8();
            }
            _ => match star {
                Some((sp, st)) => {
                    // Let the last '*' swallow one more character and retry from there.
                    let st = st + char_at(text, st).map_or(1, char::len_utf8);
                    star = Some((sp, st));
                    p = sp;
                    t = st;
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.chars().all(|c| c == '*'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn args(line: &str) -> Vec<(&str, Option<&str>)> {
        Bootargs::parse(line)
            .unwrap()
            .iter()
            .map(|a| (a.key, a.value))
            .collect()
    }

    #[test]
    fn splits_keys_values_and_flags() {
        assert_eq!(
            args("  console=ttyAMA0,115200  quiet ktest.filter=dma.* dma.remap=1 empty= \n"),
            [
                ("console", Some("ttyAMA0,115200")),
                ("quiet", None),
                ("ktest.filter", Some("dma.*")),
                ("dma.remap", Some("1")),
                ("empty", Some("")),
            ]
        );
        assert_eq!(args(""), []);
        assert_eq!(args(" \t\r\n "), []);
        // Only the first '=' splits.
        assert_eq!(args("a=b=c"), [("a", Some("b=c"))]);
    }

    #[test]
    fn the_pi_firmware_command_line() {
        let line = "coherent_pool=1M 8250.nr_uarts=1 snd_bcm2835.enable_headphones=0 \
                    cgroup_disable=memory";
        let b = Bootargs::parse(line).unwrap();
        assert_eq!(b.len(), 4);
        assert_eq!(b.get("coherent_pool"), Some("1M"));
        assert_eq!(parse_size(b.get("coherent-pool").unwrap()), Ok(1 << 20));
        assert_eq!(b.get("8250.nr_uarts"), Some("1"));
    }

    #[test]
    fn quoting() {
        assert_eq!(
            args(r#"msg="hello world" x=1"#),
            [("msg", Some("hello world")), ("x", Some("1"))]
        );
        assert_eq!(args(r#""msg=hello world""#), [("msg", Some("hello world"))]);
        assert_eq!(args(r#"k="""#), [("k", Some(""))]);
        // Quotes in the middle group whitespace but are kept.
        assert_eq!(args(r#"k=a"b c"d"#), [("k", Some(r#"a"b c"d"#))]);
        assert_eq!(
            Bootargs::parse(r#"a=1 msg="oops"#).unwrap_err(),
            BootargError::UnterminatedQuote { at: 4 }
        );
        assert_eq!(
            Bootargs::parse(r#"""#).unwrap_err(),
            BootargError::UnterminatedQuote { at: 0 }
        );
        assert_eq!(
            Bootargs::parse(r#"a"b"=c"#).unwrap_err(),
            BootargError::QuoteInKey { at: 0 }
        );
    }

    #[test]
    fn empty_key_and_control_characters_are_errors() {
        assert_eq!(
            Bootargs::parse("a=1 =2").unwrap_err(),
            BootargError::EmptyKey { at: 4 }
        );
        assert_eq!(
            Bootargs::parse(r#""=x""#).unwrap_err(),
            BootargError::EmptyKey { at: 0 }
        );
        assert_eq!(
            Bootargs::parse("a=b\u{1}c").unwrap_err(),
            BootargError::ControlChar { at: 3, ch: '\u{1}' }
        );
        assert_eq!(
            Bootargs::parse("a=\"x\ty\"").unwrap_err(),
            BootargError::ControlChar { at: 4, ch: '\t' }
        );
        assert!(matches!(
            Bootargs::parse("a\u{7f}"),
            Err(BootargError::ControlChar { .. })
        ));
        assert!(matches!(
            Bootargs::parse("a\u{85}"),
            Err(BootargError::ControlChar { .. })
        ));
        // Other non-ASCII text is fine.
        assert_eq!(args("name=Zoë"), [("name", Some("Zoë"))]);
    }

    #[test]
    fn capacity_is_enforced() {
        let line = "x ".repeat(MAX_ARGS);
        assert_eq!(Bootargs::parse(&line).unwrap().len(), MAX_ARGS);
        let line = "x ".repeat(MAX_ARGS + 1);
        assert_eq!(
            Bootargs::parse(&line).unwrap_err(),
            BootargError::TooMany { max: MAX_ARGS }
        );
    }

    #[test]
    fn last_one_wins_and_dash_equals_underscore() {
        let b = Bootargs::parse("a=1 b a=2 c-d=x a").unwrap();
        assert_eq!(b.get("a"), Some(""));
        assert_eq!(b.get("b"), Some(""));
        assert_eq!(b.get("c_d"), Some("x"));
        assert_eq!(b.get("c-d"), Some("x"));
        assert_eq!(b.get("zzz"), None);
        assert!(b.has("a") && b.has("c_d") && !b.has("c"));
        let b = Bootargs::parse("dma.remap=0 dma.remap=on x y=maybe").unwrap();
        assert_eq!(b.get_bool("dma.remap"), Ok(Some(true)));
        assert_eq!(b.get_bool("x"), Ok(Some(true)));
        assert_eq!(b.get_bool("absent"), Ok(None));
        assert_eq!(b.get_bool("y"), Err(BootargError::InvalidBool));
    }

    #[test]
    fn unknown_keys() {
        let b = Bootargs::parse("ktest.filter=a 8250.nr_uarts=1 bench=x coherent_pool=1M mystery")
            .unwrap();
        let unknown: Vec<_> = b
            .unknown(&["ktest.*", "bench", "coherent-pool"])
            .map(|a| a.key)
            .collect();
        assert_eq!(unknown, ["8250.nr_uarts", "mystery"]);
        assert_eq!(b.unknown(&["*"]).count(), 0);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 * 1024));
        assert_eq!(parse_size("64k"), Ok(64 * 1024));
        assert_eq!(parse_size("64M"), Ok(64 * 1024 * 1024));
        assert_eq!(parse_size("2g"), Ok(2 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1p"), Ok(1 << 50));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
        assert_eq!(parse_size("0x1000"), Ok(0x1000));
        assert_eq!(parse_size("0x10M"), Ok(16 << 20));
        // 'E' after hex digits is a digit, not the exa suffix (as memparse).
        assert_eq!(parse_size("0x1E"), Ok(0x1e));
        assert_eq!(parse_size("16E"), Err(BootargError::Overflow));
        assert_eq!(parse_size("99999999999G"), Err(BootargError::Overflow));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            parse_size("18446744073709551616"),
            Err(BootargError::Overflow)
        );
        assert_eq!(
            parse_size("0x10000000000000000"),
            Err(BootargError::Overflow)
        );
        assert_eq!(parse_size(""), Err(BootargError::InvalidNumber));
        assert_eq!(parse_size("M"), Err(BootargError::InvalidNumber));
        assert_eq!(parse_size("64MB"), Err(BootargError::InvalidNumber));
        assert_eq!(parse_size("64 M"), Err(BootargError::InvalidNumber));
        assert_eq!(parse_size("-1"), Err(BootargError::InvalidNumber));
        assert_eq!(parse_size("0x"), Err(BootargError::InvalidNumber));
        assert_eq!(parse_size("010M"), Err(BootargError::LeadingZero));
    }

    #[test]
    fn numbers_and_bools() {
        assert_eq!(parse_u64("0"), Ok(0));
        assert_eq!(parse_u64("1234"), Ok(1234));
        assert_eq!(parse_u64("0xdeadBEEF"), Ok(0xdead_beef));
        assert_eq!(parse_u64("0XFF"), Ok(255));
        assert_eq!(parse_u64("12K"), Err(BootargError::InvalidNumber));
        assert_eq!(parse_u64("0x"), Err(BootargError::InvalidNumber));
        assert_eq!(parse_u64("07"), Err(BootargError::LeadingZero));
        assert_eq!(parse_u64("+1"), Err(BootargError::InvalidNumber));
        for t in ["1", "y", "Y", "yes", "YES", "on", "On", "true", "TRUE"] {
            assert_eq!(parse_bool(t), Ok(true), "{t}");
        }
        for f in ["0", "n", "N", "no", "off", "OFF", "false", "False"] {
            assert_eq!(parse_bool(f), Ok(false), "{f}");
        }
        for bad in ["", "2", "yess", "of", "t", "enable"] {
            assert_eq!(parse_bool(bad), Err(BootargError::InvalidBool), "{bad}");
        }
    }

    #[test]
    fn globs() {
        let yes = [
            ("*", ""),
            ("*", "anything"),
            ("dma.*", "dma.direct.map"),
            ("dma.*", "dma."),
            ("*.map", "dma.direct.map"),
            ("d?a", "dma"),
            ("*a*b*", "xxaxxbxx"),
            ("a*b*c", "abc"),
            ("a*b*c", "aXbYbZc"),
            ("exact", "exact"),
            ("**", "x"),
            ("?é?", "aéb"),
            ("*cma*", "mm::cma::alloc_contiguous"),
        ];
        let no = [
            ("", "x"),
            ("?", ""),
            ("dma.*", "dm.a"),
            ("d?a", "da"),
            ("a*b*c", "aXbYbZ"),
            ("exact", "exactly"),
            ("exact", "exac"),
            ("*.map", "dma.direct.mapx"),
            ("??", "é"),
        ];
        for (p, t) in yes {
            assert!(glob_match(p, t), "{p} should match {t}");
        }
        for (p, t) in no {
            assert!(!glob_match(p, t), "{p} should not match {t}");
        }
        assert!(glob_match("", ""));
        assert!(glob_match_any("iommu.*,dma.*", "dma.sg"));
        assert!(glob_match_any("iommu.*,,dma.*", "iommu.map"));
        assert!(!glob_match_any("iommu.*,dma.*", "cma.alloc"));
        assert!(!glob_match_any("", ""));
        assert!(!glob_match_any(",", "x"));
    }

    /// Reference glob semantics by plain recursion on chars (exponential, fine for short inputs).
    fn glob_model(p: &[char], t: &[char]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some('*'), _) => glob_model(&p[1..], t) || (!t.is_empty() && glob_model(p, &t[1..])),
            (Some('?'), Some(_)) => glob_model(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => glob_model(&p[1..], &t[1..]),
            _ => false,
        }
    }

    proptest! {
        #[test]
        fn glob_agrees_with_model(p in "[ab*?é]{0,8}", t in "[abé]{0,10}") {
            let pc: Vec<char> = p.chars().collect();
            let tc: Vec<char> = t.chars().collect();
            prop_assert_eq!(glob_match(&p, &t), glob_model(&pc, &tc));
        }

        #[test]
        fn size_agrees_with_model(v in any::<u64>(), suffix in 0usize..7, hex in any::<bool>()) {
            let (letter, shift) = [("", 0u32), ("K", 10), ("m", 20), ("G", 30), ("t", 40), ("P", 50), ("e", 60)][suffix];
            let text = if hex { format!("{v:#x}{letter}") } else { format!("{v}{letter}") };
            let expect = (v as u128) << shift;
            let got = parse_size(&text);
            // Hex followed by e/E reads as one more hex digit, as in memparse.
            if hex && letter == "e" {
                prop_assert_eq!(got.ok(), (v as u128 * 16 + 14).try_into().ok());
            } else if expect > u64::MAX as u128 {
                prop_assert_eq!(got, Err(BootargError::Overflow));
            } else {
                prop_assert_eq!(got, Ok(expect as u64));
            }
        }

        #[test]
        fn parse_never_panics(line in "[ a-z=\"\t.\u{1}é-]{0,40}") {
            let _ = Bootargs::parse(&line);
        }

        #[test]
        fn parse_roundtrips_simple_args(
            kv in proptest::collection::vec(("[a-z][a-z._-]{0,6}", proptest::option::of("[a-z0-9 ]{0,6}")), 0..10)
        ) {
            let line: Vec<String> = kv.iter().map(|(k, v)| match v {
                Some(v) => format!("{k}=\"{v}\""),
                None => k.clone(),
            }).collect();
            let line = line.join("  ");
            let b = Bootargs::parse(&line).unwrap();
            let got: Vec<(String, Option<String>)> =
                b.iter().map(|a| (a.key.to_string(), a.value.map(str::to_string))).collect();
            prop_assert_eq!(got, kv);
        }
    }
}
