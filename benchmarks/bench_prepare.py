"""Preparation speed and memory: read → dedupe → 5-core → leave-one-out split → encode.

Synthetic power-law logs of 1M and 10M interactions are written to Parquet and CSV, then each
size is prepared in a fresh subprocess so that peak memory (ru_maxrss) is that of the job alone.
As a same-run baseline, the time Polars takes just to read the file and sort it by
(user, timestamp) is measured too: the ratio shows what cleaning, k-core, splitting and encoding
cost on top of one sort.

    .venv/bin/python benchmarks/bench_prepare.py [--sizes 1000000,10000000] [--format parquet]

Targets (issue "RecForge core"): 10M interactions in under 60 s and under 4 GB.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def child(path: str, baseline: bool) -> None:
    import polars as pl

    t0 = time.perf_counter()
    if baseline:
        df = pl.read_parquet(path) if path.endswith(".parquet") else pl.read_csv(path)
        df = df.sort(["user_id", "timestamp"])
        rows = df.height
        stages = {}
    else:
        from recforge.data.prepare import PrepareOptions, clean, encode
        from recforge.data.readers import load_raw
        from recforge.data.split import leave_one_out

        stages = {}
        raw = load_raw(path)
        stages["read"] = time.perf_counter() - t0
        t = time.perf_counter()
        cleaned = clean(raw, PrepareOptions(min_user=5, min_item=5))
        stages["dedupe+kcore"] = time.perf_counter() - t
        t = time.perf_counter()
        ds = encode(cleaned, raw)
        stages["encode"] = time.perf_counter() - t
        t = time.perf_counter()
        sp = leave_one_out(ds)
        stages["split"] = time.perf_counter() - t
        rows = ds.interactions.height
        stages = {k: round(v, 2) for k, v in stages.items()}
        stages["kept_rows"] = rows
        stages["train_rows"] = sp.train.height
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB on Linux
    print(json.dumps({"seconds": round(wall, 2), "peak_mb": round(peak), "rows": rows, "stages": stages}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--format", default="parquet", choices=["parquet", "csv"])
    ap.add_argument("--child", default=None)
    ap.add_argument("--baseline", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.baseline)

    from recforge.data.synthetic import make_random_log

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in args.sizes.split(",")]:
            log = make_random_log(n, n_users=max(1000, n // 20), n_items=max(500, n // 50), seed=0)
            path = Path(tmp) / f"log_{n}.{args.format}"
            log.write_parquet(path) if args.format == "parquet" else log.write_csv(path)
            del log
            res = {}
            for label, extra in (("baseline_read_sort", ["--baseline"]), ("recforge_prepare", [])):
                cmd = [sys.executable, __file__, "--child", str(path), *extra]
                res[label] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            row = {"interactions": n, "format": args.format, **res,
                   "ratio_to_read_sort": round(res["recforge_prepare"]["seconds"] / res["baseline_read_sort"]["seconds"], 2)}
            out.append(row)
            p = res["recforge_prepare"]
            print(f"{n:>11,} rows ({args.format}): prepare {p['seconds']:6.2f} s, peak {p['peak_mb']:5d} MB "
                  f"| read+sort baseline {res['baseline_read_sort']['seconds']:5.2f} s "
                  f"(x{row['ratio_to_read_sort']}) | stages {p['stages']}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
            "command": "python benchmarks/bench_prepare.py " + " ".join(sys.argv[1:])}
    (RESULTS / f"prepare_{args.format}.json").write_text(json.dumps({"meta": meta, "rows": out}, indent=2))


if __name__ == "__main__":
    main()
