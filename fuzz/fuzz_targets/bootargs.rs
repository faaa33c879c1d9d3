//! The command line and its value parsers: `Bootargs::parse` and its queries, `parse_size`,
//! `parse_u64`, `parse_bool`, `parse_cma` on every value, and `glob_match`. The number parsers and
//! the glob matcher are also compared with simple reference models.
//!
//! Input: `line [NUL pattern [NUL text]]`, each the valid UTF-8 prefix of its part.

#![no_main]

use dmakern::bootargs::{glob_match, glob_match_any, parse_bool, parse_size, parse_u64, Bootargs};
use dmakern::mm::cma::parse_cma;
use dmakern_fuzz::{render, utf8_prefix};
use libfuzzer_sys::fuzz_target;

/// Longest pattern and text given to the quadratic reference glob matcher.
const MODEL_GLOB_MAX: usize = 128;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let line = utf8_prefix(parts.next().unwrap_or_default());
    let pattern = utf8_prefix(parts.next().unwrap_or_default());
    let text = utf8_prefix(parts.next().unwrap_or_default());

    match Bootargs::parse(line) {
        Ok(args) => {
            render(&format_args!("{args:?}"));
            let _ = (args.len(), args.is_empty());
            for a in args.iter() {
                assert!(
                    !a.key.is_empty() && !a.key.contains('"'),
                    "bad key in {a:?}"
                );
                assert!(args.has(a.key), "has({:?}) false for a parsed key", a.key);
                let got = args.get(a.key).expect("get of a parsed key");
                let _ = args.get_bool(a.key).map_err(|e| render(&e));
                values(got);
            }
            let known = [
                "console", "cma", "ktest.*", "8250.*", "swiotlb", "*_pool", pattern,
            ];
            let _ = args.unknown(&known).count();
            for key in [
                "cma",
                "console",
                "quiet",
                "stress",
                "coherent-pool",
                pattern,
            ] {
                let _ = (
                    args.get(key),
                    args.has(key),
                    args.get_bool(key).map_err(|e| render(&e)),
                );
            }
        }
        Err(e) => drop(render(&e)),
    }
    values(line);
    values(pattern);

    let matched = glob_match(pattern, text);
    if pattern.len() <= MODEL_GLOB_MAX && text.len() <= MODEL_GLOB_MAX {
        assert_eq!(
            matched,
            model_glob(pattern, text),
            "glob_match({pattern:?}, {text:?})"
        );
    }
    let _ = glob_match_any(pattern, text);
    let _ = glob_match(text, pattern);
});

/// Every value parser on `s`, the number parsers checked against the model.
fn values(s: &str) {
    let size = parse_size(s).map_err(|e| render(&e));
    assert_eq!(size.ok(), model_number(s, true), "parse_size({s:?})");
    let n = parse_u64(s).map_err(|e| render(&e));
    assert_eq!(n.ok(), model_number(s, false), "parse_u64({s:?})");
    let _ = parse_bool(s).map_err(|e| render(&e));
    match parse_cma(s) {
        Ok(c) => {
            if let (Some(b), Some(l)) = (c.base, c.limit) {
                assert!(b < l, "parse_cma({s:?}) gave an empty window");
            }
        }
        Err(e) => drop(render(&e)),
    }
}

/// Reference for `parse_u64` (no suffix) and `parse_size` (optional K/M/G/T/P/E suffix, powers
/// of 1024): decimal without leading zeros, or `0x`/`0X` hex; the value must fit in 64 bits.
fn model_number(s: &str, suffix: bool) -> Option<u64> {
    let (body, radix) = match s.get(..2) {
        Some("0x" | "0X") => (&s[2..], 16),
        _ => (s, 10),
    };
    let ndigits = body.chars().take_while(|c| c.is_digit(radix)).count();
    let (digits, rest) = body.split_at(ndigits);
    if digits.is_empty() || (radix == 10 && digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    let shift = match (suffix, rest) {
        (_, "") => 0,
        (true, "k" | "K") => 10,
        (true, "m" | "M") => 20,
        (true, "g" | "G") => 30,
        (true, "t" | "T") => 40,
        (true, "p" | "P") => 50,
        (true, "e" | "E") => 60,
        _ => return None,
    };
    let significant = digits.trim_start_matches('0');
    if significant.len() > 20 {
        return None;
    }
    let v = u128::from_str_radix(
        if significant.is_empty() {
            "0"
        } else {
            significant
        },
        radix,
    )
    .ok()?;
    let v = u64::try_from(v).ok()?;
    u64::try_from(u128::from(v) << shift).ok()
}

/// Reference glob: `*` any sequence, `?` one character, by dynamic programming over characters.
fn model_glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // m[i][j]: p[i..] matches t[j..].
    let mut m = vec![vec![false; t.len() + 1]; p.len() + 1];
    m[p.len()][t.len()] = true;
    for i in (0..p.len()).rev() {
        for j in (0..=t.len()).rev() {
            m[i][j] = match p[i] {
                '*' => m[i + 1][j] || (j < t.len() && m[i][j + 1]),
                '?' => j < t.len() && m[i + 1][j + 1],
                c => j < t.len() && t[j] == c && m[i + 1][j + 1],
            };
        }
    }
    m[0][0]
}
