//! Small statistics shared by the models and by tests: the BST path-length normaliser, numpy's
//! percentile, the skewness sign used by ECOD, and ROC-AUC.

/// Euler–Mascheroni constant as used by scikit-learn.
const EULER_GAMMA: f64 = 0.577_215_664_901_532_9;

/// c(m): average path length of an unsuccessful search in a binary search tree of m keys, with
/// scikit-learn's conventions: 0 for m ≤ 1, exactly 1 for m = 2, and the logarithmic
/// approximation 2(ln(m−1)+γ) − 2(m−1)/m above.
pub fn average_path_length(m: usize) -> f64 {
    match m {
        0 | 1 => 0.0,
        2 => 1.0,
        _ => {
            let m = m as f64;
            2.0 * ((m - 1.0).ln() + EULER_GAMMA) - 2.0 * (m - 1.0) / m
        }
    }
}

/// numpy `percentile(values, q)` with the default linear interpolation, q in [0, 100].
/// Returns NaN for empty input.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let pos = (q / 100.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let frac = pos - lo as f64;
    // numpy's `_lerp`: a + (b - a) * t, evaluated from the nearer end.
    let (a, b) = (sorted[lo], sorted[hi]);
    let diff = b - a;
    if frac >= 0.5 {
        b - diff * (1.0 - frac)
    } else {
        a + diff * frac
    }
}

/// Sign (−1, 0, +1) of SciPy's biased sample skewness of one column, with PyOD's NaN → 0 rule:
/// a (near-)constant column, where m2 ≤ (ε·mean)², has sign 0. Sums are accumulated in row
/// order, as numpy does for an axis-0 reduction, so that an exactly-zero third moment is
/// reproduced.
pub fn skewness_sign(column: impl Iterator<Item = f64> + Clone) -> i8 {
    let mut n = 0usize;
    let mut sum = 0.0;
    for v in column.clone() {
        sum += v;
        n += 1;
    }
    if n == 0 {
        return 0;
    }
    let mean = sum / n as f64;
    let (mut s2, mut s3) = (0.0, 0.0);
    for v in column {
        let dev = v - mean;
        let sq = dev * dev;
        s2 += sq;
        s3 += sq * dev;
    }
    let m2 = s2 / n as f64;
    let m3 = s3 / n as f64;
    if m2 <= (f64::EPSILON * mean) * (f64::EPSILON * mean) {
        return 0;
    }
    let skew = m3 / m2.powf(1.5);
    if skew > 0.0 {
        1
    } else if skew < 0.0 {
        -1
    } else {
        0
    }
}

/// ROC-AUC of `scores` (higher = more anomalous) against binary `labels` (true = anomaly), as the
/// Mann–Whitney statistic with average ranks for ties (scikit-learn's `roc_auc_score`).
/// Returns NaN when one class is absent.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> f64 {
    debug_assert_eq!(scores.len(), labels.len());
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // Ranks are 1-based; the tie group i..=j shares the average rank.
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            if labels[k] {
                rank_sum_pos += avg_rank;
            }
        }
        i = j + 1;
    }
    let n_pos = labels.iter().filter(|&&l| l).count() as f64;
    let n_neg = labels.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 {
        return f64::NAN;
    }
    (rank_sum_pos - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)
}

#[cfg(test)]
mod tests {
    use crate::anomaly::stats::{average_path_length, percentile, roc_auc, skewness_sign};

    #[test]
    fn path_length_conventions() {
        assert_eq!(average_path_length(0), 0.0);
        assert_eq!(average_path_length(1), 0.0);
        assert_eq!(average_path_length(2), 1.0);
        // scikit-learn's value for 256.
        assert!((average_path_length(256) - 10.244_770_920_119_917).abs() < 1e-12);
    }

    #[test]
    fn percentile_matches_numpy_linear() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-12);
    }

    #[test]
    fn auc_with_ties() {
        assert_eq!(roc_auc(&[0.1, 0.9], &[false, true]), 1.0);
        assert_eq!(roc_auc(&[0.5, 0.5], &[false, true]), 0.5);
    }

    #[test]
    fn skew_signs() {
        assert_eq!(skewness_sign([1.0, 1.0, 1.0].into_iter()), 0);
        assert_eq!(skewness_sign([0.0, 0.0, 0.0, 10.0].into_iter()), 1);
        assert_eq!(skewness_sign([0.0, 10.0, 10.0, 10.0].into_iter()), -1);
        assert_eq!(skewness_sign([0.0, 1.0, 0.0, 1.0].into_iter()), 0);
    }
}
