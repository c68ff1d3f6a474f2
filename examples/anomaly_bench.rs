//! Rust side of the anomaly benchmark (run it through `bench/anomaly/run.sh`, which also times
//! the Python references on the same files and prints the ratios).
//!
//! Usage: `anomaly_bench DATA_DIR` where DATA_DIR holds `NAME.f64` (raw little-endian f64,
//! row-major) and `NAME.json` (`{"rows": n, "cols": d}`) written by `reference.py make-data`.
//! Prints one JSON object per dataset. Everything is single-threaded except the fields named
//! `*_all_cores_*`.

use std::time::Instant;

use picket::anomaly::{Ecod, EcodParams, IForestParams, IsolationForest, Matrix};

const DATASETS: [&str; 2] = ["synthetic_1m_x10", "shuttle"];

fn load(dir: &str, name: &str) -> Matrix {
    let shape: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/{name}.json")).unwrap())
            .unwrap();
    let cols = shape["cols"].as_u64().unwrap() as usize;
    let bytes = std::fs::read(format!("{dir}/{name}.f64")).unwrap();
    let values = bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Matrix::new(values, cols).unwrap()
}

/// Median wall time in seconds of `repeat` runs.
fn timed<T>(repeat: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut times: Vec<f64> = (0..repeat)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: anomaly_bench DATA_DIR");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for name in DATASETS {
        let x = load(&dir, name);
        let n = x.n_rows();
        let params = IForestParams::default();
        let fit_s = timed(21, || IsolationForest::fit(&x, &params).unwrap());
        let forest = IsolationForest::fit(&x, &params).unwrap();
        let score_s = timed(3, || forest.score_batch(&x).unwrap());
        let score_par_s = timed(3, || forest.score_batch_parallel(&x, cores).unwrap());
        let one_rows = n.min(200_000);
        let score_one_s = timed(3, || {
            (0..one_rows)
                .map(|i| forest.score_one(x.row(i)).unwrap())
                .sum::<f64>()
        });
        let ecod_fit_s = timed(3, || Ecod::fit(&x, &EcodParams::default()).unwrap());
        let ecod = Ecod::fit(&x, &EcodParams::default()).unwrap();
        let stream_rows = n.min(200_000);
        let ecod_stream_s = timed(3, || {
            (0..stream_rows)
                .map(|i| ecod.score_one(x.row(i)).unwrap())
                .sum::<f64>()
        });
        let ecod_par_s = timed(3, || ecod.score_batch_parallel(&x, cores).unwrap());
        let out = serde_json::json!({
            "side": "rust",
            "dataset": name,
            "rows": n,
            "cols": x.n_cols(),
            "cores": cores,
            "iforest_fit_s": fit_s,
            "iforest_score_rows_per_s": n as f64 / score_s,
            "iforest_score_one_rows_per_s": one_rows as f64 / score_one_s,
            "iforest_score_all_cores_rows_per_s": n as f64 / score_par_s,
            "ecod_fit_s": ecod_fit_s,
            "ecod_stream_rows_per_s": stream_rows as f64 / ecod_stream_s,
            "ecod_score_all_cores_rows_per_s": n as f64 / ecod_par_s,
        });
        println!("{out}");
    }
}
