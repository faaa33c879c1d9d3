//! Byte-range cache maintenance, the same on every architecture: the lines touching a range, the
//! architecture's `*_lines` operation over them, then a DSB. Included by each `arch/*/cache.rs`,
//! whose `line_size`, `*_lines` and `dsb` it calls.

use super::{clean_invalidate_lines, clean_lines, dsb, invalidate_lines, line_size};

/// The lines touching `[start, start+len)` as (first line, count, line size); none when empty.
#[inline(always)]
fn lines_of(start: usize, len: usize) -> Option<(usize, usize, usize)> {
    let line = line_size();
    let last = start.checked_add(len.checked_sub(1)?).unwrap_or(usize::MAX);
    let first = start & !(line - 1);
    Some((first, (last - first) / line + 1, line))
}

/// Clean [start, start+len) to the point of coherency, then DSB.
#[inline(always)]
pub fn clean(start: usize, len: usize) {
    if let Some((first, count, line)) = lines_of(start, len) {
        clean_lines(first, count, line);
        dsb();
    }
}

/// Invalidate [start, start+len), then DSB: dirty data in those lines is lost.
#[inline(always)]
pub fn invalidate(start: usize, len: usize) {
    if let Some((first, count, line)) = lines_of(start, len) {
        invalidate_lines(first, count, line);
        dsb();
    }
}

/// Clean and invalidate [start, start+len) to the point of coherency, then DSB.
#[inline(always)]
pub fn clean_invalidate(start: usize, len: usize) {
    if let Some((first, count, line)) = lines_of(start, len) {
        clean_invalidate_lines(first, count, line);
        dsb();
    }
}
