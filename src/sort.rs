//! Sorting for the kernel's short lists (a bank's few cuts, a bus's BARs, the test suites).
//!
//! `core`'s sorts are built for large inputs: each element type they are used with costs a few
//! KiB of code (driftsort or ipnsort, with their small-sort networks and fallbacks). These lists hold
//! tens of elements at most, for which an insertion sort is as quick and a few hundred bytes per
//! type, which matters in an image meant to stay small.

/// Sort `v` stably by `key`: elements with equal keys keep their order. Quadratic in the worst
/// case, so only for short slices.
pub fn sort_small_by_key<T, K: Ord>(v: &mut [T], mut key: impl FnMut(&T) -> K) {
    for i in 1..v.len() {
        let mut j = i;
        while j > 0 && key(&v[j - 1]) > key(&v[j]) {
            v.swap(j - 1, j);
            j -= 1;
        }
    }
}

/// Sort `v` stably in ascending order. Quadratic in the worst case, so only for short slices.
pub fn sort_small<T: Ord>(v: &mut [T]) {
    for i in 1..v.len() {
        let mut j = i;
        while j > 0 && v[j - 1] > v[j] {
            v.swap(j - 1, j);
            j -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_std_sort(mut v in proptest::collection::vec(any::<(u8, u16)>(), 0..40)) {
            let mut expected = v.clone();
            expected.sort();
            sort_small(&mut v);
            prop_assert_eq!(v, expected);
        }

        #[test]
        fn by_key_is_stable(mut v in proptest::collection::vec((0u8..4, any::<u16>()), 0..40)) {
            // std's sort_by_key is stable: the same order of equal keys is required.
            let mut expected = v.clone();
            expected.sort_by_key(|e| e.0);
            sort_small_by_key(&mut v, |e| e.0);
            prop_assert_eq!(v, expected);
        }
    }
}
