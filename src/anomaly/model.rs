//! One type for "a fitted anomaly model", as the detection pipeline stores it per tenant.

use crate::anomaly::codec::{Decoded, decode, encode_ecod, encode_iforest};
use crate::anomaly::ecod::Ecod;
use crate::anomaly::error::AnomalyResult;
use crate::anomaly::explain::FeatureContribution;
use crate::anomaly::iforest::IsolationForest;
use crate::anomaly::matrix::Matrix;

/// A fitted model of any supported kind; scores are always "higher = more anomalous".
#[derive(Debug, Clone, PartialEq)]
pub enum AnomalyModel {
    /// Isolation Forest; scores in (0, 1].
    IsolationForest(IsolationForest),
    /// ECOD or COPOD (see [`crate::anomaly::EcodAggregation`]); scores ≥ 0.
    Ecod(Ecod),
}

impl AnomalyModel {
    /// Scores one row on its own.
    pub fn score_one(&self, row: &[f64]) -> AnomalyResult<f64> {
        match self {
            Self::IsolationForest(m) => m.score_one(row),
            Self::Ecod(m) => m.score_one(row),
        }
    }

    /// Scores each row of `x` on its own, single-threaded.
    pub fn score_batch(&self, x: &Matrix) -> AnomalyResult<Vec<f64>> {
        match self {
            Self::IsolationForest(m) => m.score_batch(x),
            Self::Ecod(m) => m.score_batch(x),
        }
    }

    /// Scores each row of `x` on its own, on up to `threads` threads.
    pub fn score_batch_parallel(&self, x: &Matrix, threads: usize) -> AnomalyResult<Vec<f64>> {
        match self {
            Self::IsolationForest(m) => m.score_batch_parallel(x, threads),
            Self::Ecod(m) => m.score_batch_parallel(x, threads),
        }
    }

    /// Score above which a row is flagged.
    pub fn threshold(&self) -> f64 {
        match self {
            Self::IsolationForest(m) => m.threshold(),
            Self::Ecod(m) => m.threshold(),
        }
    }

    /// Whether `score` is above the threshold.
    pub fn is_anomaly(&self, score: f64) -> bool {
        score > self.threshold()
    }

    /// Per-feature contributions for `row`, largest first.
    pub fn explain(&self, row: &[f64]) -> AnomalyResult<Vec<FeatureContribution>> {
        match self {
            Self::IsolationForest(m) => m.explain(row),
            Self::Ecod(m) => m.explain(row),
        }
    }

    /// Number of features the model expects per row.
    pub fn n_features(&self) -> usize {
        match self {
            Self::IsolationForest(m) => m.n_features(),
            Self::Ecod(m) => m.n_features(),
        }
    }

    /// Encodes the model in the versioned byte format ([`crate::anomaly::FORMAT_VERSION`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::IsolationForest(m) => encode_iforest(m),
            Self::Ecod(m) => encode_ecod(m),
        }
    }

    /// Decodes bytes written by [`AnomalyModel::to_bytes`], validating them fully.
    pub fn from_bytes(bytes: &[u8]) -> AnomalyResult<Self> {
        Ok(match decode(bytes)? {
            Decoded::IForest(m) => Self::IsolationForest(m),
            Decoded::Ecod(m) => Self::Ecod(m),
        })
    }
}

impl From<IsolationForest> for AnomalyModel {
    fn from(m: IsolationForest) -> Self {
        Self::IsolationForest(m)
    }
}

impl From<Ecod> for AnomalyModel {
    fn from(m: Ecod) -> Self {
        Self::Ecod(m)
    }
}
