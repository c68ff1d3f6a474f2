//! Splitting a batch of rows across OS threads (scoped threads, no pool, no extra dependency).

use crate::anomaly::matrix::Matrix;

/// Applies `f` to contiguous row blocks of `x` on up to `threads` threads and concatenates the
/// results in row order. `f` receives row-major values of whole rows.
pub(crate) fn map_rows<F>(x: &Matrix, threads: usize, f: F) -> Vec<f64>
where
    F: Fn(&[f64]) -> Vec<f64> + Sync,
{
    let n = x.n_rows();
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 {
        return f(x.values());
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (start, end) = ((t * per).min(n), ((t + 1) * per).min(n));
                let f = &f;
                s.spawn(move || f(x.row_range(start, end)))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("scoring thread panicked"))
            .collect()
    })
}
