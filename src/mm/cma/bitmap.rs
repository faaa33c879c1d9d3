//! Word-at-a-time operations on the CMA allocation bitmap: bit `i` is bit `i % 64` of word `i / 64`,
//! set = allocated. Ranges are filled and checked with masks, and searched with
//! `trailing_zeros`/`leading_zeros` or with bit-parallel tests on 64-bit chunks, so costs grow
//! with the number of words, not bits. Callers keep ranges inside the bitmap.

/// The words covering bits [start, end) as (first word, last word, mask of the range's bits in the
/// first word, mask in the last word); `None` for an empty range. When first == last the range's
/// bits are `head & tail`. Word indices fit in usize, the bitmap being held in memory.
fn span(start: u64, end: u64) -> Option<(usize, usize, u64, u64)> {
    (start < end).then(|| {
        let head = !0u64 << (start % 64);
        let tail = !0u64 >> (63 - (end - 1) % 64);
        ((start / 64) as usize, ((end - 1) / 64) as usize, head, tail)
    })
}

/// Lowest bit in [start, end) that differs from `skip` (0: find a set bit; !0: find a clear one).
/// A hit in the last word beyond `end` means there is none in range, as hits are taken lowest first.
fn scan_forward(words: &[u64], start: u64, end: u64, skip: u64) -> Option<u64> {
    if start >= end {
        return None;
    }
    let last = ((end - 1) / 64) as usize;
    let mut w = (start / 64) as usize;
    let mut hit = (words[w] ^ skip) & (!0u64 << (start % 64));
    while hit == 0 {
        if w == last {
            return None;
        }
        w += 1;
        hit = words[w] ^ skip;
    }
    let bit = w as u64 * 64 + u64::from(hit.trailing_zeros());
    (bit < end).then_some(bit)
}

/// Lowest set bit in [start, end).
pub(super) fn first_set(words: &[u64], start: u64, end: u64) -> Option<u64> {
    scan_forward(words, start, end, 0)
}

/// Lowest clear bit in [start, end).
pub(super) fn first_zero(words: &[u64], start: u64, end: u64) -> Option<u64> {
    scan_forward(words, start, end, !0)
}

/// Highest set bit in [start, end).
pub(super) fn last_set(words: &[u64], start: u64, end: u64) -> Option<u64> {
    if start >= end {
        return None;
    }
    let first = (start / 64) as usize;
    let mut w = ((end - 1) / 64) as usize;
    let mut hit = words[w] & (!0u64 >> (63 - (end - 1) % 64));
    while hit == 0 {
        if w == first {
            return None;
        }
        w -= 1;
        hit = words[w];
    }
    let bit = w as u64 * 64 + 63 - u64::from(hit.leading_zeros());
    (bit >= start).then_some(bit)
}

/// Sets bits [start, end).
pub(super) fn set_range(words: &mut [u64], start: u64, end: u64) {
    let Some((first, last, head, tail)) = span(start, end) else {
        return;
    };
    if first == last {
        words[first] |= head & tail;
    } else {
        words[first] |= head;
        words[first + 1..last].fill(!0);
        words[last] |= tail;
    }
}

/// Clears bits [start, end).
pub(super) fn clear_range(words: &mut [u64], start: u64, end: u64) {
    let Some((first, last, head, tail)) = span(start, end) else {
        return;
    };
    if first == last {
        words[first] &= !(head & tail);
    } else {
        words[first] &= !head;
        words[first + 1..last].fill(0);
        words[last] &= !tail;
    }
}

/// Whether every bit in [start, end) is set.
pub(super) fn all_set(words: &[u64], start: u64, end: u64) -> bool {
    let Some((first, last, head, tail)) = span(start, end) else {
        return true;
    };
    if first == last {
        let m = head & tail;
        return words[first] & m == m;
    }
    words[first] & head == head
        && words[first + 1..last].iter().all(|&w| w == !0)
        && words[last] & tail == tail
}

/// Number of set bits in [start, end).
pub(super) fn count_set(words: &[u64], start: u64, end: u64) -> u64 {
    let Some((first, last, head, tail)) = span(start, end) else {
        return 0;
    };
    let ones = |w: u64| u64::from(w.count_ones());
    if first == last {
        return ones(words[first] & head & tail);
    }
    ones(words[first] & head)
        + words[first + 1..last].iter().map(|&w| ones(w)).sum::<u64>()
        + ones(words[last] & tail)
}

/// Length of the longest run of clear bits in [0, nbits).
pub(super) fn longest_zero_run(words: &[u64], nbits: u64) -> u64 {
    let mut best = 0;
    let mut pos = 0;
    while let Some(zero) = first_zero(words, pos, nbits) {
        let end = first_set(words, zero, nbits).unwrap_or(nbits);
        best = best.max(end - zero);
        pos = end;
    }
    best
}

/// The smallest `b >= x` with `b % step == offset` (`step` a power of two, `offset < step`).
fn next_candidate(x: u64, step: u64, offset: u64) -> u64 {
    x + (offset.wrapping_sub(x) & (step - 1))
}

/// First fit: the lowest `b` in [from, cand_end) with `b % step == offset` such that the `len`
/// bits [b, b + len) are clear and end at or before `nbits`. `step` is a power of two, `offset <
/// step`, `len > 0`.
pub(super) fn find_zero_run(
    words: &[u64],
    nbits: u64,
    from: u64,
    cand_end: u64,
    len: u64,
    step: u64,
    offset: u64,
) -> Option<u64> {
    if len <= step && step <= 64 {
        find_in_lanes(words, nbits, from, cand_end, len, step, offset)
    } else if step.is_multiple_of(64) && offset.is_multiple_of(64) {
        find_word_aligned(words, nbits, from, cand_end, len, step, offset)
    } else {
        find_by_skipping(words, nbits, from, cand_end, len, step, offset)
    }
}

/// For lane widths 2^k (k = 0 ..= 6): the word with bit 0 of every lane set.
const LANE_STARTS: [u64; 7] = [
    !0,
    0x5555_5555_5555_5555,
    0x1111_1111_1111_1111,
    0x0101_0101_0101_0101,
    0x0001_0001_0001_0001,
    0x0000_0001_0000_0001,
    1,
];

/// `find_zero_run` for `len <= step <= 64`, which is what size-aligned requests up to 64 bits
/// are. As `step` divides 64, every 64-bit chunk starting at `offset + 64 k` holds `64 / step`
/// candidates, one per `step`-bit lane at the lane's first bit, and as `len <= step` each candidate's
/// run lies inside its lane. Masking every lane to its first `len` bits, a carry trick finds the
/// lanes that are all clear: adding 0b011..1 to the bits of a lane below its top bit carries into
/// the top bit exactly when one of them is set; OR-ing in the lane itself adds the top bit. So each
/// chunk costs a few word operations, however fragmented the bitmap is.
fn find_in_lanes(
    words: &[u64],
    nbits: u64,
    from: u64,
    cand_end: u64,
    len: u64,
    step: u64,
    offset: u64,
) -> Option<u64> {
    let low_bits = |n: u64| if n == 64 { !0 } else { (1u64 << n) - 1 };
    // Bit 0 of every lane (u64::MAX / low_bits(step), from a table: a 64-bit division is a
    // library call on 32-bit Arm). The lanes do not overlap, so the products below cannot
    // overflow.
    let lanes = LANE_STARTS[step.trailing_zeros() as usize];
    let window = lanes * low_bits(len);
    let below_top = lanes * low_bits(step - 1);
    let top = lanes << (step - 1);
    let mut chunk = offset + from.saturating_sub(offset) / 64 * 64;
    // In the first chunk, only lanes starting at or after `from`: their top bit is at or above
    // (from - chunk) + step - 1.
    let mut wanted = (!0u64)
        .checked_shl((from.saturating_sub(chunk) + step - 1) as u32)
        .unwrap_or(0);
    while chunk < cand_end && chunk.checked_add(len)? <= nbits {
        let x = chunk_at(words, nbits, chunk) & window;
        let busy = ((x & below_top) + below_top) | x;
        let free = !busy & top & wanted;
        if free != 0 {
            let b = chunk + u64::from(free.trailing_zeros()) - (step - 1);
            return (b < cand_end).then_some(b);
        }
        wanted = !0;
        chunk += 64;
    }
    None
}

/// Bits [q, q + 64) as one word (q < nbits); bits at or beyond `nbits` read as set.
fn chunk_at(words: &[u64], nbits: u64, q: u64) -> u64 {
    let w = (q / 64) as usize;
    let shift = q % 64;
    let mut v = words[w] >> shift;
    if shift != 0 {
        v |= words.get(w + 1).copied().unwrap_or(0) << (64 - shift);
    }
    if nbits - q < 64 {
        v |= !0u64 << (nbits - q);
    }
    v
}

/// `find_zero_run` for candidates on word boundaries (`step` and `offset` multiples of 64, `len`
/// above 64 or above `step`): what large size-aligned requests are. A candidate's run is some whole
/// words plus the low bits of one more, so it is checked a word at a time, last word first; a busy
/// word moves the search to the first candidate after it. In a fragmented bitmap a candidate
/// usually fails on its first word read.
fn find_word_aligned(
    words: &[u64],
    nbits: u64,
    from: u64,
    cand_end: u64,
    len: u64,
    step: u64,
    offset: u64,
) -> Option<u64> {
    // Word counts fit in usize: the bitmap is in memory.
    let full = (len / 64) as usize;
    let tail_mask = (1u64 << (len % 64)) - 1;
    let mut b = next_candidate(from, step, offset);
    while b < cand_end {
        b.checked_add(len).filter(|&e| e <= nbits)?;
        let first = (b / 64) as usize;
        let busy = if words.get(first + full).is_some_and(|&w| w & tail_mask != 0) {
            Some(first + full)
        } else {
            (first..first + full).rev().find(|&w| words[w] != 0)
        };
        match busy {
            None => return Some(b),
            Some(w) => b = next_candidate((w as u64 + 1) * 64, step, offset),
        }
    }
    None
}

/// `find_zero_run` for the other cases (long runs, or runs longer than their alignment). A
/// candidate window that holds a set bit is abandoned in one step: the search resumes at the first
/// clear bit after the window's *last* set bit, as no candidate at or before that bit can succeed.
fn find_by_skipping(
    words: &[u64],
    nbits: u64,
    from: u64,
    cand_end: u64,
    len: u64,
    step: u64,
    offset: u64,
) -> Option<u64> {
    let mut b = next_candidate(from, step, offset);
    while b < cand_end {
        let end = b.checked_add(len).filter(|&e| e <= nbits)?;
        match last_set(words, b, end) {
            None => return Some(b),
            Some(busy) => b = next_candidate(first_zero(words, busy + 1, nbits)?, step, offset),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bits_of(pattern: &str) -> (Vec<u64>, u64) {
        let n = pattern.len() as u64;
        let mut words = vec![0u64; pattern.len().div_ceil(64)];
        for (i, c) in pattern.bytes().enumerate() {
            if c == b'1' {
                words[i / 64] |= 1 << (i % 64);
            }
        }
        (words, n)
    }

    #[test]
    fn range_operations_across_words() {
        let mut w = vec![0u64; 3];
        set_range(&mut w, 60, 130);
        assert_eq!(w, [0xf << 60, !0, 0b11]);
        assert_eq!(count_set(&w, 0, 192), 70);
        assert_eq!(count_set(&w, 62, 129), 67);
        assert!(all_set(&w, 60, 130));
        assert!(!all_set(&w, 59, 130));
        assert_eq!(first_set(&w, 0, 192), Some(60));
        assert_eq!(last_set(&w, 0, 192), Some(129));
        assert_eq!(first_zero(&w, 60, 192), Some(130));
        assert_eq!(first_set(&w, 130, 192), None);
        clear_range(&mut w, 64, 128);
        assert_eq!(w, [0xf << 60, 0, 0b11]);
        assert_eq!(longest_zero_run(&w, 192), 64);
        assert_eq!(longest_zero_run(&w, 60), 60);
        // Empty ranges touch nothing.
        set_range(&mut w, 5, 5);
        assert_eq!(count_set(&w, 0, 192), 6);
        assert!(all_set(&w, 7, 7));
    }

    #[test]
    fn zero_run_search() {
        let (w, n) = bits_of("1100011110000000111");
        assert_eq!(find_zero_run(&w, n, 0, n, 3, 1, 0), Some(2));
        assert_eq!(find_zero_run(&w, n, 0, n, 4, 1, 0), Some(9));
        assert_eq!(find_zero_run(&w, n, 0, n, 4, 4, 0), Some(12));
        assert_eq!(find_zero_run(&w, n, 0, n, 2, 4, 3), Some(3));
        assert_eq!(find_zero_run(&w, n, 0, n, 8, 1, 0), None);
        assert_eq!(find_zero_run(&w, n, 10, n, 3, 1, 0), Some(10));
        assert_eq!(find_zero_run(&w, n, 0, 9, 4, 1, 0), None);
        assert_eq!(find_zero_run(&w, n, 0, 10, 4, 1, 0), Some(9));

        // Exact fits between used bits, across a word boundary, and at the very end.
        let (w, n) = bits_of(&"0001".repeat(40));
        assert_eq!(find_zero_run(&w, n, 1, n, 3, 4, 0), Some(4));
        assert_eq!(find_zero_run(&w, n, 0, n, 4, 4, 0), None);
        let (w, n) = bits_of(&format!(
            "{}{}{}",
            "1".repeat(61),
            "0".repeat(16),
            "1".repeat(3)
        ));
        assert_eq!(find_zero_run(&w, n, 0, n, 16, 16, 13), Some(61));
        assert_eq!(find_zero_run(&w, n, 0, n, 16, 16, 0), None);
        let (w, n) = bits_of(&format!("{}{}", "1".repeat(120), "0".repeat(8)));
        assert_eq!(find_zero_run(&w, n, 0, n, 8, 8, 0), Some(120));
        assert_eq!(find_zero_run(&w, n - 1, 0, n - 1, 8, 8, 0), None);
        assert_eq!(find_zero_run(&w, n, 0, n, 64, 64, 0), None);

        // Word-aligned candidates: a busy bit in a window's last word or its tail moves the search
        // to the next candidate after that word.
        // Bits 150 and 300 set, 640 bits.
        let (w, n) = bits_of(&format!("{}1{}1{}", "0".repeat(150), "0".repeat(149), "0".repeat(339)));
        assert_eq!(find_zero_run(&w, n, 0, n, 200, 128, 0), Some(384));
        assert_eq!(find_zero_run(&w, n, 0, n, 200, 256, 0), None);
        assert_eq!(find_zero_run(&w, n, 0, n, 64, 128, 0), Some(0));
        assert_eq!(find_zero_run(&w, n, 1, n, 64, 128, 0), Some(384));
        assert_eq!(find_zero_run(&w, n, 0, n, 160, 64, 0), Some(320));
        assert_eq!(find_zero_run(&w, n, 0, 320, 160, 64, 0), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]
        #[test]
        fn zero_run_search_matches_naive(
            runs in proptest::collection::vec((1usize..70, any::<bool>()), 1..16),
            from in 0u64..400, len in 1u64..70, step_log in 0u32..8, off in 0u64..128,
        ) {
            let pattern: Vec<bool> = runs.iter().flat_map(|&(n, b)| std::iter::repeat_n(b, n)).collect();
            let n = pattern.len() as u64;
            let mut w = vec![0u64; pattern.len().div_ceil(64)];
            for (i, &b) in pattern.iter().enumerate() {
                if b { w[i / 64] |= 1 << (i % 64); }
            }
            let step = 1u64 << step_log;
            let off = off % step;
            let naive = (from..n)
                .filter(|b| b % step == off)
                .find(|&b| b + len <= n && (b..b + len).all(|i| !pattern[i as usize]));
            prop_assert_eq!(find_zero_run(&w, n, from, n, len, step, off), naive);
            // A bound on the candidates stops the search early.
            let cand_end = from + (n - from.min(n)) / 2;
            let bounded = naive.filter(|&b| b < cand_end);
            prop_assert_eq!(find_zero_run(&w, n, from, cand_end, len, step, off), bounded);
            let ones = pattern.iter().filter(|&&b| b).count() as u64;
            prop_assert_eq!(count_set(&w, 0, n), ones);
            let mut longest = 0u64;
            let mut cur = 0u64;
            for &b in &pattern {
                cur = if b { 0 } else { cur + 1 };
                longest = longest.max(cur);
            }
            prop_assert_eq!(longest_zero_run(&w, n), longest);
        }

        /// Word-aligned candidates (steps of 64 to 1024 bits, offsets on word boundaries, runs of
        /// up to 11 words) against the naive search.
        #[test]
        fn word_aligned_search_matches_naive(
            runs in proptest::collection::vec((1usize..300, any::<bool>()), 1..24),
            from in 0u64..3000, len in 1u64..700, step_log in 6u32..11, off_words in 0u64..16,
        ) {
            let pattern: Vec<bool> = runs.iter().flat_map(|&(n, b)| std::iter::repeat_n(b, n)).collect();
            let n = pattern.len() as u64;
            let mut w = vec![0u64; pattern.len().div_ceil(64)];
            for (i, &b) in pattern.iter().enumerate() {
                if b { w[i / 64] |= 1 << (i % 64); }
            }
            let step = 1u64 << step_log;
            let off = off_words * 64 % step;
            let naive = (from..n)
                .filter(|b| b % step == off)
                .find(|&b| b + len <= n && (b..b + len).all(|i| !pattern[i as usize]));
            prop_assert_eq!(find_zero_run(&w, n, from, n, len, step, off), naive);
            let cand_end = from + (n - from.min(n)) / 2;
            prop_assert_eq!(find_zero_run(&w, n, from, cand_end, len, step, off), naive.filter(|&b| b < cand_end));
        }
    }
}
