//! Anomaly scoring: Isolation Forest, ECOD and COPOD. Pure math: no IO, no printing, no
//! environment access; callers hand in a validated [`Matrix`] and get scores back.
//!
//! Behaviour follows `tests/fixtures/anomaly/SPEC.md` (what scikit-learn 1.9.1 and PyOD 3.6.7
//! compute); `tests/anomaly.rs` checks it against their reference outputs.
//!
//! * [`IsolationForest`]: score s ∈ (0, 1] of Liu et al., higher = more anomalous.
//! * [`Ecod`]: PyOD's ECOD (default), the paper's form, or COPOD; higher = more anomalous.
//! * [`AnomalyModel`]: either model behind one type, with a versioned byte encoding for storage.

mod codec;
mod ecod;
mod error;
mod explain;
mod iforest;
mod matrix;
mod model;
mod parallel;
mod rng;
mod sort;
mod stats;

pub use crate::anomaly::codec::FORMAT_VERSION;
pub use crate::anomaly::ecod::{Ecod, EcodAggregation, EcodParams};
pub use crate::anomaly::error::{AnomalyError, AnomalyResult};
pub use crate::anomaly::explain::{FeatureContribution, Tail};
pub use crate::anomaly::iforest::{IForestParams, IsolationForest};
pub use crate::anomaly::matrix::Matrix;
pub use crate::anomaly::model::AnomalyModel;
pub use crate::anomaly::stats::{average_path_length, percentile, roc_auc};
