"""Prints the Rust / Python ratio table from the two JSON-lines files run.sh writes."""
import json
import sys

rust = {r["dataset"]: r for r in map(json.loads, open(sys.argv[1]))}
py = {r["dataset"]: r for r in map(json.loads, open(sys.argv[2]))}

print()
print(f"{'dataset':<18} {'measure':<34} {'rust':>14} {'python':>14} {'ratio':>8} {'target':>8}  met")
for name, r in rust.items():
    p = py[name]
    rows = [
        ("IF fit 100x256 (s)", r["iforest_fit_s"], p["iforest_fit_s"], "time", None),
        ("IF score_batch rows/s (1 core)", r["iforest_score_rows_per_s"], p["iforest_score_rows_per_s"], "rate", 10),
        ("ECOD fit (s)", r["ecod_fit_s"], p["ecod_fit_s"], "time", 5),
        ("ECOD single-row stream rows/s", r["ecod_stream_rows_per_s"], p["ecod_stream_rows_per_s"], "rate", 20),
    ]
    for label, rv, pv, kind, target in rows:
        ratio = pv / rv if kind == "time" else rv / pv
        met = "" if target is None else ("yes" if ratio >= target else "NO")
        tgt = "" if target is None else f">={target}x"
        print(f"{name:<18} {label:<34} {rv:>14.4g} {pv:>14.4g} {ratio:>7.1f}x {tgt:>8}  {met}")
    fit_ms = r["iforest_fit_s"] * 1e3
    print(f"{name:<18} {'IF fit 100x256 in <= 10 ms':<34} {fit_ms:>12.2f}ms {'':>14} {'':>8} {'':>8}  {'yes' if fit_ms <= 10 else 'NO'}")
    print(f"{name:<18} {'IF score rows/s, all ' + str(r['cores']) + ' cores':<34} {r['iforest_score_all_cores_rows_per_s']:>14.4g}")
    print(f"{name:<18} {'IF score_one rows/s (1 core)':<34} {r['iforest_score_one_rows_per_s']:>14.4g}")
    print(f"{name:<18} {'ECOD batch rows/s, all ' + str(r['cores']) + ' cores':<34} {r['ecod_score_all_cores_rows_per_s']:>14.4g}")
