//! ECOD (Li et al., TKDE 2022) and its predecessor COPOD, as PyOD 3.6.7 computes them.
//!
//! Fit keeps every training column sorted plus one skewness sign per column. A new row is scored
//! against the frozen training ECDFs (SPEC.md 2.5): F_left = (#{train ≤ x} + 1)/(n + 1),
//! F_right = (#{train ≥ x} + 1)/(n + 1), two binary searches per feature, O(d log n), and the
//! score never depends on what else is scored in the same batch. For a batch of one this equals
//! PyOD's `decision_function`. Training scores use F = #{…}/n with the row itself included,
//! which equals PyOD's `decision_scores_`.

use crate::anomaly::error::{AnomalyError, AnomalyResult};
use crate::anomaly::explain::{FeatureContribution, Tail, sort_contributions};
use crate::anomaly::matrix::{Matrix, check_row};
use crate::anomaly::sort::{ArgSort, key_value, order_key};
use crate::anomaly::stats::{percentile, skewness_sign};

/// Rows per bucket when adding a column's terms to the scores (32 K rows: 256 KB of scores).
const BUCKET_ROWS: usize = 1 << 15;

/// How per-dimension tail probabilities are combined into one score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EcodAggregation {
    /// PyOD's shipped ECOD: Σ_j max(U^l_j, U^r_j, U^s_j) (sum of per-dimension maxima). Default,
    /// because every published PyOD/ADBench number uses it.
    #[default]
    Pyod,
    /// The paper's Algorithm 1: max(Σ_j U^l_j, Σ_j U^r_j, Σ_j U^s_j) (maximum of sums).
    Paper,
    /// PyOD's COPOD: Σ_j max(U^s_j, (U^l_j + U^r_j)/2).
    Copod,
}

impl EcodAggregation {
    /// Stable code used by the serialized format.
    pub(crate) fn code(self) -> u8 {
        match self {
            Self::Pyod => 0,
            Self::Paper => 1,
            Self::Copod => 2,
        }
    }

    /// Inverse of [`EcodAggregation::code`].
    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Pyod),
            1 => Some(Self::Paper),
            2 => Some(Self::Copod),
            _ => None,
        }
    }
}

/// Hyper-parameters of [`Ecod`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EcodParams {
    /// Aggregation rule; see [`EcodAggregation`].
    pub aggregation: EcodAggregation,
    /// Expected share of anomalies in the training data, in (0, 0.5]; sets the threshold to the
    /// (1 − contamination) percentile of training scores, as PyOD does (default 0.1).
    pub contamination: f64,
}

impl Default for EcodParams {
    fn default() -> Self {
        Self {
            aggregation: EcodAggregation::Pyod,
            contamination: 0.1,
        }
    }
}

/// A fitted ECOD / COPOD model.
#[derive(Debug, Clone, PartialEq)]
pub struct Ecod {
    /// Number of training rows n.
    n_rows: usize,
    /// Number of features d.
    n_features: usize,
    /// Training columns, each sorted ascending, column-major (`n_rows` values per feature):
    /// the whole empirical CDF, queried by binary search.
    sorted: Vec<f64>,
    /// Sign of each training column's skewness (−1, 0, +1); chooses the tail in U^s.
    skew_signs: Vec<i8>,
    /// Aggregation rule used by every score this model produces.
    aggregation: EcodAggregation,
    /// Contamination the threshold was derived from.
    contamination: f64,
    /// Score above which a row is flagged (the (1 − contamination) percentile of training scores).
    threshold: f64,
}

/// Per-dimension tail terms of one value: U^l = −ln F_left, U^r = −ln F_right.
#[derive(Debug, Clone, Copy)]
struct Tails {
    /// −ln of the left-tail probability.
    left: f64,
    /// −ln of the right-tail probability.
    right: f64,
}

impl Tails {
    /// U^s: the left tail for negative skew, the right tail for positive, both for zero.
    #[inline]
    fn skew(self, sign: i8) -> f64 {
        match sign {
            s if s < 0 => self.left,
            s if s > 0 => self.right,
            _ => self.left + self.right,
        }
    }

    /// The per-dimension term O_j for the per-dimension aggregations.
    #[inline]
    fn combined(self, sign: i8, aggregation: EcodAggregation) -> f64 {
        match aggregation {
            EcodAggregation::Pyod | EcodAggregation::Paper => {
                self.left.max(self.right).max(self.skew(sign))
            }
            EcodAggregation::Copod => self.skew(sign).max((self.left + self.right) / 2.0),
        }
    }
}

/// Running sums for the paper's max-of-sums form.
#[derive(Debug, Clone, Copy, Default)]
struct FamilySums {
    /// Σ_j U^l_j.
    left: f64,
    /// Σ_j U^r_j.
    right: f64,
    /// Σ_j U^s_j.
    skew: f64,
}

impl FamilySums {
    fn add(&mut self, t: Tails, sign: i8) {
        self.left += t.left;
        self.right += t.right;
        self.skew += t.skew(sign);
    }

    fn max(self) -> f64 {
        self.left.max(self.right).max(self.skew)
    }
}

fn check_contamination(c: f64) -> AnomalyResult<()> {
    if c > 0.0 && c <= 0.5 {
        Ok(())
    } else {
        Err(AnomalyError::InvalidParameter {
            name: "contamination",
            reason: format!("must be in (0, 0.5], got {c}"),
        })
    }
}

impl Ecod {
    /// Fits on `x` (rows = observations). Training scores are computed to set the threshold and
    /// then dropped; use [`Ecod::fit_with_training_scores`] to keep them.
    pub fn fit(x: &Matrix, params: &EcodParams) -> AnomalyResult<Self> {
        Self::fit_with_training_scores(x, params).map(|(model, _)| model)
    }

    /// Fits on `x` and returns the training scores too; with the default aggregation these
    /// equal PyOD's `ECOD().fit(x).decision_scores_`.
    pub fn fit_with_training_scores(
        x: &Matrix,
        params: &EcodParams,
    ) -> AnomalyResult<(Self, Vec<f64>)> {
        check_contamination(params.contamination)?;
        let (n, d) = (x.n_rows(), x.n_cols());
        if n > u32::MAX as usize {
            return Err(AnomalyError::InvalidParameter {
                name: "x",
                reason: format!("at most {} rows are supported", u32::MAX),
            });
        }
        let values = x.values();
        let mut sorted = Vec::with_capacity(n * d);
        let mut skew_signs = Vec::with_capacity(d);
        let mut scores = vec![0.0; n];
        let mut families = match params.aggregation {
            EcodAggregation::Paper => vec![FamilySums::default(); n],
            _ => Vec::new(),
        };
        // −ln(k/n) for every count k, computed once and shared by all columns (a logarithm per
        // distinct value per column would dominate the fit otherwise).
        let neg_log: Vec<f64> = (0..=n).map(|k| -(k as f64 / n as f64).ln()).collect();
        // One transposing pass, so every later pass over a column is contiguous.
        let mut columns = vec![Vec::with_capacity(n); d];
        for row in values.chunks_exact(d) {
            for (c, &v) in columns.iter_mut().zip(row) {
                c.push(v);
            }
        }
        let mut sorter = ArgSort::default();
        // Per-column terms regrouped by row range (see the end of the column loop).
        let mut next = vec![0usize; n.div_ceil(BUCKET_ROWS)];
        let (mut bucket_rows, mut bucket_terms) = match params.aggregation {
            EcodAggregation::Paper => (Vec::new(), Vec::new()),
            _ => (vec![0u32; n], vec![0.0; n]),
        };
        let (mut unsorted, mut keys, mut order) = (Vec::new(), Vec::new(), Vec::new());
        for column in columns {
            let sign = skewness_sign(column.iter().copied());
            skew_signs.push(sign);
            unsorted.clear();
            unsorted.extend(column.iter().map(|&v| order_key(v)));
            drop(column);
            sorter.sort(&unsorted, &mut keys, &mut order);
            for (b, slot) in next.iter_mut().enumerate() {
                *slot = b * BUCKET_ROWS;
            }
            let mut a = 0;
            while a < n {
                let mut b = a + 1;
                while b < n && keys[b] == keys[a] {
                    b += 1;
                }
                // Run [a, b) of equal values: #{≤ x} = b and #{≥ x} = n − a (ties count fully).
                let tails = Tails {
                    left: neg_log[b],
                    right: neg_log[n - a],
                };
                debug_assert!(tails.left >= 0.0 && tails.right >= 0.0);
                if params.aggregation == EcodAggregation::Paper {
                    for &row in &order[a..b] {
                        families[row as usize].add(tails, sign);
                    }
                } else {
                    let o = tails.combined(sign, params.aggregation);
                    for &row in &order[a..b] {
                        // Every row occurs once per column, so bucket `row / BUCKET_ROWS`
                        // receives exactly the rows of its range.
                        let bucket = row as usize / BUCKET_ROWS;
                        let slot = next[bucket];
                        next[bucket] += 1;
                        bucket_rows[slot] = row;
                        bucket_terms[slot] = o;
                    }
                }
                a = b;
            }
            if params.aggregation != EcodAggregation::Paper {
                // Add the column's terms bucket by bucket: each bucket's slice of `scores` stays
                // in cache, unlike adding in sorted order (a random walk over all n rows). Every
                // row still receives its terms in column order, so sums are unchanged.
                for (&row, &o) in bucket_rows.iter().zip(&bucket_terms) {
                    scores[row as usize] += o;
                }
            }
            sorted.extend(keys.iter().map(|&k| key_value(k)));
        }
        if params.aggregation == EcodAggregation::Paper {
            for (s, f) in scores.iter_mut().zip(&families) {
                *s = f.max();
            }
        }
        let threshold = percentile(&scores, 100.0 * (1.0 - params.contamination));
        let model = Self {
            n_rows: n,
            n_features: d,
            sorted,
            skew_signs,
            aggregation: params.aggregation,
            contamination: params.contamination,
            threshold,
        };
        Ok((model, scores))
    }

    /// Sorted training column `j`.
    fn column(&self, j: usize) -> &[f64] {
        &self.sorted[j * self.n_rows..(j + 1) * self.n_rows]
    }

    /// Tail terms of value `v` in feature `j` against the frozen training ECDF.
    #[inline]
    fn tails(&self, j: usize, v: f64) -> Tails {
        let col = self.column(j);
        let le = col.partition_point(|&t| t <= v);
        let lt = if le > 0 && col[le - 1] == v {
            col[..le].partition_point(|&t| t < v)
        } else {
            le
        };
        let ge = self.n_rows - lt;
        let n1 = (self.n_rows + 1) as f64;
        Tails {
            left: -((le + 1) as f64 / n1).ln(),
            right: -((ge + 1) as f64 / n1).ln(),
        }
    }

    /// Scores one row on its own (the streaming form): higher = more anomalous.
    pub fn score_one(&self, row: &[f64]) -> AnomalyResult<f64> {
        check_row(row, self.n_features)?;
        Ok(self.score_unchecked(row))
    }

    fn score_unchecked(&self, row: &[f64]) -> f64 {
        if self.aggregation == EcodAggregation::Paper {
            let mut f = FamilySums::default();
            for (j, &v) in row.iter().enumerate() {
                f.add(self.tails(j, v), self.skew_signs[j]);
            }
            f.max()
        } else {
            row.iter()
                .enumerate()
                .map(|(j, &v)| {
                    self.tails(j, v)
                        .combined(self.skew_signs[j], self.aggregation)
                })
                .sum()
        }
    }

    /// Scores every row of `x`, each on its own (identical to calling [`Ecod::score_one`] per
    /// row; note this differs from the training scores, which count the row itself).
    pub fn score_batch(&self, x: &Matrix) -> AnomalyResult<Vec<f64>> {
        self.check_width(x.n_cols())?;
        Ok(x.rows().map(|r| self.score_unchecked(r)).collect())
    }

    /// [`Ecod::score_batch`] split over `threads` OS threads (same results).
    pub fn score_batch_parallel(&self, x: &Matrix, threads: usize) -> AnomalyResult<Vec<f64>> {
        self.check_width(x.n_cols())?;
        Ok(crate::anomaly::parallel::map_rows(x, threads, |rows| {
            rows.chunks_exact(self.n_features)
                .map(|r| self.score_unchecked(r))
                .collect()
        }))
    }

    fn check_width(&self, found: usize) -> AnomalyResult<()> {
        if found == self.n_features {
            Ok(())
        } else {
            Err(AnomalyError::DimensionMismatch {
                expected: self.n_features,
                found,
            })
        }
    }

    /// Per-feature contributions to the streaming score of `row`, largest first. With the
    /// default aggregation they are the per-dimension terms O_j and sum to the score; with the
    /// paper's aggregation they are the terms of the winning family.
    pub fn explain(&self, row: &[f64]) -> AnomalyResult<Vec<FeatureContribution>> {
        check_row(row, self.n_features)?;
        let tails: Vec<Tails> = row
            .iter()
            .enumerate()
            .map(|(j, &v)| self.tails(j, v))
            .collect();
        let family = if self.aggregation == EcodAggregation::Paper {
            let mut f = FamilySums::default();
            for (j, t) in tails.iter().enumerate() {
                f.add(*t, self.skew_signs[j]);
            }
            Some(f)
        } else {
            None
        };
        let contributions = tails
            .iter()
            .enumerate()
            .map(|(j, t)| {
                let sign = self.skew_signs[j];
                let contribution = match family {
                    Some(f) if f.max() == f.left => t.left,
                    Some(f) if f.max() == f.right => t.right,
                    Some(_) => t.skew(sign),
                    None => t.combined(sign, self.aggregation),
                };
                let tail = if t.left > t.right {
                    Some(Tail::Low)
                } else if t.right > t.left {
                    Some(Tail::High)
                } else {
                    None
                };
                FeatureContribution {
                    feature: j,
                    contribution,
                    tail,
                }
            })
            .collect();
        Ok(sort_contributions(contributions))
    }

    /// Score above which a row is flagged as anomalous.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Whether `score` is above the contamination threshold (PyOD's `predict` rule).
    pub fn is_anomaly(&self, score: f64) -> bool {
        score > self.threshold
    }

    /// Number of features the model was fitted on.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// Number of training rows.
    pub fn n_training_rows(&self) -> usize {
        self.n_rows
    }

    /// Aggregation rule in use.
    pub fn aggregation(&self) -> EcodAggregation {
        self.aggregation
    }

    /// Contamination the threshold was derived from.
    pub fn contamination(&self) -> f64 {
        self.contamination
    }

    /// Skewness sign per feature (−1, 0, +1), as computed on the training set.
    pub fn skew_signs(&self) -> &[i8] {
        &self.skew_signs
    }

    /// Rebuilds a model from decoded parts, re-checking every invariant.
    pub(crate) fn from_parts(
        n_rows: usize,
        n_features: usize,
        sorted: Vec<f64>,
        skew_signs: Vec<i8>,
        aggregation: EcodAggregation,
        contamination: f64,
        threshold: f64,
    ) -> AnomalyResult<Self> {
        let bad = |m: &str| AnomalyError::Decode(format!("ECOD: {m}"));
        if n_rows == 0 || n_features == 0 {
            return Err(bad("empty model"));
        }
        if sorted.len() != n_rows * n_features || skew_signs.len() != n_features {
            return Err(bad("array lengths do not match the header"));
        }
        if skew_signs.iter().any(|s| !(-1..=1).contains(s)) {
            return Err(bad("skewness sign out of range"));
        }
        if sorted
            .chunks_exact(n_rows)
            .any(|c| c.iter().any(|v| !v.is_finite()) || c.windows(2).any(|w| w[0] > w[1]))
        {
            return Err(bad("training column not finite or not sorted"));
        }
        check_contamination(contamination).map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            n_rows,
            n_features,
            sorted,
            skew_signs,
            aggregation,
            contamination,
            threshold,
        })
    }

    /// Sorted training columns, column-major (for serialization).
    pub(crate) fn sorted_columns(&self) -> &[f64] {
        &self.sorted
    }
}
