//! Stable argsort of one column of `f64` by LSD radix sort, the hot step of ECOD's fit.

/// Maps a finite `f64` to a `u64` whose unsigned order is the numeric order; `-0.0` and `0.0`
/// map to the same key because they compare equal (ties must be detected as ties).
#[inline]
pub(crate) fn order_key(x: f64) -> u64 {
    let bits = (x + 0.0).to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

/// Inverse of [`order_key`].
#[inline]
pub(crate) fn key_value(k: u64) -> f64 {
    if k >> 63 == 1 {
        f64::from_bits(k & !(1 << 63))
    } else {
        f64::from_bits(!k)
    }
}

const RADIX_BITS: u32 = 11;
const BUCKETS: usize = 1 << RADIX_BITS;

/// Sorts `keys` ascending and returns, alongside, the original position of each sorted key.
/// Stable (equal keys keep row order). Allocating form of [`ArgSort::sort`] for tests.
#[cfg(test)]
pub(crate) fn argsort_keys(keys: Vec<u64>) -> (Vec<u64>, Vec<u32>) {
    let mut sorted = Vec::new();
    let mut order = Vec::new();
    ArgSort::default().sort(&keys, &mut sorted, &mut order);
    (sorted, order)
}

/// Reusable buffers for [`ArgSort::sort`] (a fit sorts one column after another; reusing the
/// buffers avoids faulting in fresh pages for every column).
#[derive(Debug, Default)]
pub(crate) struct ArgSort {
    /// `(digit bits << 32) | row`, the array being sorted.
    packed: Vec<u64>,
    /// Scatter target of each radix pass.
    tmp: Vec<u64>,
}

impl ArgSort {
    /// Writes `keys` sorted ascending to `sorted` and the original position of each sorted key
    /// to `order`. Stable: equal keys keep their original order.
    ///
    /// Keys are not sorted as 64-bit values. Bits that are the same in every key cannot change
    /// the order, so only the span from the highest to the lowest bit that varies counts. When
    /// that span is at most 32 bits (typical of integer-valued or low-precision columns), it is
    /// packed above the 32-bit row index into one `u64` and the sort is exact in at most three
    /// 11-bit passes. Otherwise the top 32 bits of the span are sorted that way, and each run
    /// that shares them (rare for continuous data) is finished by a comparison sort on the full
    /// keys. Either way each pass moves 8 bytes per value instead of a 12-byte (key, row) pair.
    pub(crate) fn sort(&mut self, keys: &[u64], sorted: &mut Vec<u64>, order: &mut Vec<u32>) {
        let n = keys.len();
        assert!(n <= u32::MAX as usize, "at most 2^32 - 1 keys");
        sorted.clear();
        order.clear();
        if n < 512 {
            let mut pairs: Vec<(u64, u32)> = keys.iter().copied().zip(0u32..).collect();
            pairs.sort_unstable();
            sorted.extend(pairs.iter().map(|p| p.0));
            order.extend(pairs.iter().map(|p| p.1));
            return;
        }
        let first = keys[0];
        let varying = keys.iter().fold(0u64, |acc, &k| acc | (k ^ first));
        if varying == 0 {
            sorted.extend_from_slice(keys);
            order.extend(0..n as u32);
            return;
        }
        let high = 63 - varying.leading_zeros();
        let low = varying.trailing_zeros();
        let exact = high - low < 32;
        // The 32 bits of the key used for the radix passes start at `shift`.
        let shift = if exact { low } else { high - 31 };
        self.packed.clear();
        self.packed.extend(
            keys.iter()
                .zip(0u64..)
                .map(|(&k, i)| ((k >> shift) << 32) | i),
        );
        let bits = if exact { high - low + 1 } else { 32 };
        self.radix_high_bits(bits);
        order.extend(self.packed.iter().map(|&p| p as u32));
        if exact {
            // Bits outside the span are those of every key: rebuild the keys without a gather.
            let span_mask = (u64::MAX >> (64 - bits)) << shift;
            let fixed = first & !span_mask;
            sorted.extend(self.packed.iter().map(|&p| fixed | ((p >> 32) << shift)));
            return;
        }
        sorted.extend(order.iter().map(|&i| keys[i as usize]));
        // Runs sharing the 32 sorted bits: finish by full key, then row (stable).
        let mut a = 0;
        while a < n {
            let top = self.packed[a] >> 32;
            let mut b = a + 1;
            while b < n && self.packed[b] >> 32 == top {
                b += 1;
            }
            if b - a > 1 {
                let mut run: Vec<(u64, u32)> = sorted[a..b]
                    .iter()
                    .copied()
                    .zip(order[a..b].iter().copied())
                    .collect();
                run.sort_unstable();
                for (p, (k, i)) in run.into_iter().enumerate() {
                    sorted[a + p] = k;
                    order[a + p] = i;
                }
            }
            a = b;
        }
    }

    /// Stable LSD radix sort of `packed` by its bits 32..32 + `bits`, 11 bits per pass; a pass
    /// whose digit is the same in every value is skipped.
    fn radix_high_bits(&mut self, bits: u32) {
        let n = self.packed.len();
        let passes = bits.div_ceil(RADIX_BITS) as usize;
        debug_assert!(passes <= 3);
        let mut hist = [[0u32; BUCKETS]; 3];
        for &p in &self.packed {
            let k = p >> 32;
            for (j, h) in hist[..passes].iter_mut().enumerate() {
                h[((k >> (j as u32 * RADIX_BITS)) as usize) & (BUCKETS - 1)] += 1;
            }
        }
        self.tmp.clear();
        self.tmp.resize(n, 0);
        for (j, h) in hist[..passes].iter().enumerate() {
            if h.iter().any(|&c| c as usize == n) {
                continue;
            }
            let mut offsets = [0u32; BUCKETS];
            let mut acc = 0u32;
            for (o, &c) in offsets.iter_mut().zip(h.iter()) {
                *o = acc;
                acc += c;
            }
            let shift = 32 + j as u32 * RADIX_BITS;
            for &p in &self.packed {
                let b = ((p >> shift) as usize) & (BUCKETS - 1);
                self.tmp[offsets[b] as usize] = p;
                offsets[b] += 1;
            }
            std::mem::swap(&mut self.packed, &mut self.tmp);
        }
        debug_assert!(self.packed.windows(2).all(|w| w[0] <= w[1]));
    }
}

#[cfg(test)]
mod tests {
    use crate::anomaly::sort::{argsort_keys, key_value, order_key};

    #[test]
    fn keys_preserve_order_and_round_trip() {
        let v = [-1e300, -2.5, -0.0, 0.0, 1e-300, 3.0, f64::INFINITY];
        assert!(v.windows(2).all(|w| order_key(w[0]) <= order_key(w[1])));
        assert_eq!(order_key(-0.0), order_key(0.0));
        for x in v {
            assert_eq!(key_value(order_key(x)), x + 0.0);
        }
    }

    /// Checks [`argsort_keys`] against a stable std sort of (key, position).
    fn check_against_std(keys: &[u64]) {
        let (sorted, order) = argsort_keys(keys.to_vec());
        let mut want: Vec<(u64, u32)> = keys.iter().copied().zip(0u32..).collect();
        want.sort();
        assert_eq!(sorted, want.iter().map(|p| p.0).collect::<Vec<_>>());
        assert_eq!(order, want.iter().map(|p| p.1).collect::<Vec<_>>());
    }

    #[test]
    fn argsort_exact_and_refined_paths_agree_with_std() {
        let mut rng = crate::anomaly::rng::Rng::new(7);
        let n = 5000;
        // Constant column.
        check_against_std(&vec![order_key(2.5); n]);
        // Integer-valued doubles with ties, both signs: span of varying bits <= 32 (exact path).
        let ints: Vec<u64> = (0..n)
            .map(|_| order_key(rng.below(200) as f64 - 100.0))
            .collect();
        check_against_std(&ints);
        // Continuous values: span of 64 bits, sorted on the top 32 and refined.
        let cont: Vec<u64> = (0..n)
            .map(|_| order_key(rng.next_f64() * 8.0 - 4.0))
            .collect();
        check_against_std(&cont);
        // Values that share their top 32 bits but differ below (every run needs refining),
        // with exact ties among them.
        let base = order_key(1.0);
        let close: Vec<u64> = (0..n).map(|_| base + rng.below(50) as u64).collect();
        check_against_std(&close);
        let mixed: Vec<u64> = (0..n)
            .map(|i| {
                if i % 3 == 0 {
                    base + (rng.below(7) as u64) * (1 << 20)
                } else {
                    order_key(rng.next_f64() - 0.5)
                }
            })
            .collect();
        check_against_std(&mixed);
    }

    #[test]
    fn argsort_small_and_large_agree_with_std() {
        for n in [5usize, 3000] {
            let keys: Vec<u64> = (0..n as u64).map(|i| (i * 7919) % 1000).collect();
            let (sorted, order) = argsort_keys(keys.clone());
            let mut want: Vec<(u64, u32)> = keys.iter().copied().zip(0u32..).collect();
            want.sort();
            assert_eq!(sorted, want.iter().map(|p| p.0).collect::<Vec<_>>());
            assert_eq!(order, want.iter().map(|p| p.1).collect::<Vec<_>>());
        }
    }
}
