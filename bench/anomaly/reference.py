"""Reference side of the anomaly benchmark: makes the shared data files and times
scikit-learn 1.9.1 IsolationForest and PyOD 3.6.7 ECOD on them, single-threaded.

  reference.py make-data DIR      write DIR/NAME.f64 (raw little-endian float64, row-major)
                                  and DIR/NAME.json ({"rows": n, "cols": d}) for every dataset
  reference.py time DIR           print one JSON object of timings per dataset
"""
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SHUTTLE = os.path.join(ROOT, "tests/fixtures/anomaly/data/adbench__32_shuttle.csv")
DATASETS = ["synthetic_1m_x10", "shuttle"]


def make_data(out):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(20240601)
    n, d = 1_000_000, 10
    x = rng.standard_normal((n, d))
    outliers = rng.choice(n, n // 100, replace=False)
    x[outliers] = rng.uniform(-6, 6, (len(outliers), d))
    shuttle = np.loadtxt(SHUTTLE, delimiter=",", skiprows=1)[:, :-1]
    for name, arr in [("synthetic_1m_x10", x), ("shuttle", shuttle)]:
        arr = np.ascontiguousarray(arr, dtype="<f8")
        arr.tofile(os.path.join(out, name + ".f64"))
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump({"rows": arr.shape[0], "cols": arr.shape[1]}, f)


def load(dir_, name):
    with open(os.path.join(dir_, name + ".json")) as f:
        shape = json.load(f)
    return np.fromfile(os.path.join(dir_, name + ".f64"), dtype="<f8").reshape(
        shape["rows"], shape["cols"]
    )


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_all(dir_):
    import pyod
    import sklearn
    from pyod.models.ecod import ECOD
    from sklearn.ensemble import IsolationForest

    for name in DATASETS:
        x = load(dir_, name)
        n = x.shape[0]
        res = {"side": "python", "dataset": name, "rows": n, "cols": x.shape[1],
               "sklearn": sklearn.__version__, "pyod": pyod.__version__}
        make = lambda: IsolationForest(n_estimators=100, max_samples=256, random_state=0, n_jobs=1)
        res["iforest_fit_s"] = timed(lambda: make().fit(x), 3)
        forest = make().fit(x)
        forest.score_samples(x[:1000])  # warm-up
        res["iforest_score_rows_per_s"] = n / timed(lambda: forest.score_samples(x), 1 if n > 100_000 else 3)
        res["ecod_fit_s"] = timed(lambda: ECOD().fit(x), 1 if n > 100_000 else 3)
        ecod = ECOD().fit(x)
        batches = [x[i * 1000:(i + 1) * 1000] for i in range(3)]
        per_batch = statistics.median(timed(lambda b=b: ecod.decision_function(b), 1) for b in batches)
        res["ecod_stream_rows_per_s"] = 1000 / per_batch
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("make-data", "time"):
        sys.exit(__doc__)
    (make_data if sys.argv[1] == "make-data" else time_all)(sys.argv[2])
