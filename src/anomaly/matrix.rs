//! A validated, row-major matrix of finite `f64` values.

use crate::anomaly::error::{AnomalyError, AnomalyResult};

/// Row-major matrix of finite values: the only input type the models accept, so that NaN,
/// infinities, ragged rows and empty input are rejected once, with a precise message, before any
/// math runs ("parse, don't validate").
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Row-major values, `n_rows * n_cols` long.
    values: Vec<f64>,
    /// Number of rows (observations).
    n_rows: usize,
    /// Number of columns (features); at least 1.
    n_cols: usize,
}

impl Matrix {
    /// Builds a matrix from row-major `values` with `n_cols` columns. Fails on empty input, a
    /// length that is not a multiple of `n_cols`, or any non-finite value.
    pub fn new(values: Vec<f64>, n_cols: usize) -> AnomalyResult<Self> {
        Self::with_names(values, n_cols, None)
    }

    /// Like [`Matrix::new`], with feature names used only to make error messages precise.
    pub fn with_names(
        values: Vec<f64>,
        n_cols: usize,
        names: Option<&[String]>,
    ) -> AnomalyResult<Self> {
        if n_cols == 0 {
            return Err(AnomalyError::Empty("no feature columns"));
        }
        if values.is_empty() {
            return Err(AnomalyError::Empty("no rows"));
        }
        if !values.len().is_multiple_of(n_cols) {
            let n_rows = values.len() / n_cols;
            return Err(AnomalyError::Ragged {
                row: n_rows,
                expected: n_cols,
                found: values.len() % n_cols,
            });
        }
        check_finite(&values, n_cols, 0, names)?;
        let n_rows = values.len() / n_cols;
        Ok(Self {
            values,
            n_rows,
            n_cols,
        })
    }

    /// Builds a matrix from a list of rows, reporting the first ragged row.
    pub fn from_rows<R: AsRef<[f64]>>(rows: &[R]) -> AnomalyResult<Self> {
        let first = rows.first().ok_or(AnomalyError::Empty("no rows"))?;
        let n_cols = first.as_ref().len();
        let mut values = Vec::with_capacity(rows.len() * n_cols);
        for (row, r) in rows.iter().enumerate() {
            let r = r.as_ref();
            if r.len() != n_cols {
                return Err(AnomalyError::Ragged {
                    row,
                    expected: n_cols,
                    found: r.len(),
                });
            }
            values.extend_from_slice(r);
        }
        Self::new(values, n_cols)
    }

    /// Number of rows.
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    /// Number of columns (features).
    pub fn n_cols(&self) -> usize {
        self.n_cols
    }

    /// Row `i` as a slice of `n_cols` values. Panics if `i >= n_rows`.
    pub fn row(&self, i: usize) -> &[f64] {
        &self.values[i * self.n_cols..(i + 1) * self.n_cols]
    }

    /// All values, row-major.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// Iterator over rows.
    pub fn rows(&self) -> impl ExactSizeIterator<Item = &[f64]> {
        self.values.chunks_exact(self.n_cols)
    }

    /// Rows `start..end` as a new matrix (used to split batches across threads).
    pub(crate) fn row_range(&self, start: usize, end: usize) -> &[f64] {
        &self.values[start * self.n_cols..end * self.n_cols]
    }
}

/// Rejects non-finite values; `first_row` offsets the reported row index.
pub(crate) fn check_finite(
    values: &[f64],
    n_cols: usize,
    first_row: usize,
    names: Option<&[String]>,
) -> AnomalyResult<()> {
    if values.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    let pos = values
        .iter()
        .position(|v| !v.is_finite())
        .expect("a non-finite value exists");
    let v = values[pos];
    let column = pos % n_cols;
    Err(AnomalyError::NonFinite {
        row: first_row + pos / n_cols,
        column,
        name: names.and_then(|n| n.get(column).cloned()),
        kind: if v.is_nan() {
            "NaN"
        } else if v > 0.0 {
            "+inf"
        } else {
            "-inf"
        },
    })
}

/// Checks one row given for scoring against the model width.
pub(crate) fn check_row(row: &[f64], n_features: usize) -> AnomalyResult<()> {
    if row.len() != n_features {
        return Err(AnomalyError::DimensionMismatch {
            expected: n_features,
            found: row.len(),
        });
    }
    check_finite(row, n_features.max(1), 0, None)
}
