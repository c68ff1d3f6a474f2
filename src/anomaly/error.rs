//! The error type returned at the boundary of the anomaly module.

use thiserror::Error;

/// Result alias used by every fallible function of [`crate::anomaly`].
pub type AnomalyResult<T> = Result<T, AnomalyError>;

/// What can go wrong when building a matrix, fitting a model, scoring a row or decoding a
/// stored model. Row and column indices in messages are 0-based positions in the matrix the
/// caller passed in (a CLI adds its own line numbers on top).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AnomalyError {
    /// A model cannot be fitted on zero rows or zero columns.
    #[error("empty input: {0}")]
    Empty(&'static str),
    /// A row has a different number of values than the first row (or than `n_cols`).
    #[error("row {row}: expected {expected} values, found {found}")]
    Ragged {
        /// 0-based row index of the offending row.
        row: usize,
        /// Number of columns established by the first row or the caller.
        expected: usize,
        /// Number of values the row actually has.
        found: usize,
    },
    /// NaN or an infinity was found; models only accept finite numbers (impute first).
    #[error("row {row}, column {column}{}: value is {kind}", column_label(.name))]
    NonFinite {
        /// 0-based row index.
        row: usize,
        /// 0-based column index.
        column: usize,
        /// Column name when the caller supplied feature names.
        name: Option<String>,
        /// `NaN`, `+inf` or `-inf`.
        kind: &'static str,
    },
    /// A row given for scoring has a different width than the training data.
    #[error("dimension mismatch: model was fitted on {expected} features, row has {found}")]
    DimensionMismatch {
        /// Number of features the model was fitted on.
        expected: usize,
        /// Number of features the scored row or matrix has.
        found: usize,
    },
    /// A hyper-parameter is out of its valid range.
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParameter {
        /// Parameter name as spelled in the params struct.
        name: &'static str,
        /// Human-readable reason, including the allowed range.
        reason: String,
    },
    /// Stored model bytes could not be decoded.
    #[error("cannot decode stored model: {0}")]
    Decode(String),
}

fn column_label(name: &Option<String>) -> String {
    match name {
        Some(name) => format!(" (`{name}`)"),
        None => String::new(),
    }
}
