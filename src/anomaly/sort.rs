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
const PASSES: usize = 64usize.div_ceil(RADIX_BITS as usize);

/// Sorts `keys` ascending and returns, alongside, the original position of each sorted key.
/// Stable (equal keys keep row order). Small inputs use a comparison sort.
pub(crate) fn argsort_keys(keys: Vec<u64>) -> (Vec<u64>, Vec<u32>) {
    let n = keys.len();
    debug_assert!(n <= u32::MAX as usize);
    if n < 512 {
        let mut pairs: Vec<(u64, u32)> = keys.into_iter().zip(0u32..).collect();
        pairs.sort_unstable();
        return pairs.into_iter().unzip();
    }
    let mut hist = vec![[0u32; BUCKETS]; PASSES];
    for &k in &keys {
        for (p, h) in hist.iter_mut().enumerate() {
            h[((k >> (p as u32 * RADIX_BITS)) as usize) & (BUCKETS - 1)] += 1;
        }
    }
    let mut keys = keys;
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let mut keys_tmp = vec![0u64; n];
    let mut idx_tmp = vec![0u32; n];
    for (p, h) in hist.iter().enumerate() {
        // A digit shared by every key does not reorder anything: skip the pass.
        if h.iter().any(|&c| c as usize == n) {
            continue;
        }
        let mut offsets = [0u32; BUCKETS];
        let mut acc = 0u32;
        for (o, &c) in offsets.iter_mut().zip(h.iter()) {
            *o = acc;
            acc += c;
        }
        let shift = p as u32 * RADIX_BITS;
        for (&k, &i) in keys.iter().zip(idx.iter()) {
            let b = ((k >> shift) as usize) & (BUCKETS - 1);
            let dst = offsets[b] as usize;
            offsets[b] += 1;
            keys_tmp[dst] = k;
            idx_tmp[dst] = i;
        }
        std::mem::swap(&mut keys, &mut keys_tmp);
        std::mem::swap(&mut idx, &mut idx_tmp);
    }
    debug_assert!(keys.windows(2).all(|w| w[0] <= w[1]));
    (keys, idx)
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
