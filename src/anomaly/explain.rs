//! Per-feature explanations of a score.

/// Which side of a feature's distribution made it unusual (ECOD only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// The value is unusually low for this feature (left tail).
    Low,
    /// The value is unusually high for this feature (right tail).
    High,
}

/// How much one feature contributed to a row's anomaly score.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureContribution {
    /// 0-based feature (column) index.
    pub feature: usize,
    /// Non-negative contribution in the model's own units (ECOD: the per-dimension tail term,
    /// which sums to the score in the default aggregation; Isolation Forest: bits of isolation,
    /// see [`crate::anomaly::IsolationForest::explain`]).
    pub contribution: f64,
    /// For ECOD, the tail the value sits in, so an analyst reads "V4 unusually high"; `None` for
    /// Isolation Forest or when both tails are equally (un)remarkable.
    pub tail: Option<Tail>,
}

/// Sorts contributions by decreasing size (ties by feature index) so callers can take the top k.
pub(crate) fn sort_contributions(mut c: Vec<FeatureContribution>) -> Vec<FeatureContribution> {
    c.sort_by(|a, b| {
        b.contribution
            .total_cmp(&a.contribution)
            .then(a.feature.cmp(&b.feature))
    });
    c
}
