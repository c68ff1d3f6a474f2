#!/usr/bin/env bash
# Anomaly scoring benchmark: Rust (release, single-threaded unless stated) against
# scikit-learn 1.9.1 IsolationForest and PyOD 3.6.7 ECOD on the same data, in one run.
# Usage: bench/anomaly/run.sh   (from anywhere; honours CARGO_TARGET_DIR)
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=bench/anomaly
VENV=$HERE/.venv-bench
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q scikit-learn==1.9.1 pyod==3.6.7
# Single-threaded references: no BLAS/OpenMP/numba thread pools.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
mkdir -p "$HERE/out"
[ -f "$HERE/data/synthetic_1m_x10.f64" ] || "$VENV/bin/python" "$HERE/reference.py" make-data "$HERE/data"
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --example anomaly_bench
echo "== rust" >&2
"$TARGET/release/examples/anomaly_bench" "$HERE/data" | tee "$HERE/out/rust.jsonl"
echo "== python" >&2
"$VENV/bin/python" "$HERE/reference.py" time "$HERE/data" | tee "$HERE/out/python.jsonl"
python3 "$HERE/report.py" "$HERE/out/rust.jsonl" "$HERE/out/python.jsonl"
