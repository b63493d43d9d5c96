"""Preparation speed and memory at 10M and 100M interactions: scan → dedupe → 5-core → encode →
leave-one-out split (and a temporal split after it).

Each size is a synthetic long-tailed log written to Parquet (or CSV) in chunks of 5M rows, so
that generating 100M rows never holds them in memory: users and items are drawn from power laws
(exponents 0.8 and 1.0 over ranks shuffled over ids: a few items take a large share, most are
rarely seen), a heavy user meets the same popular item again (repeated pairs), 1% of the rows
are logged twice (same user, item and time), and each chunk covers the next slice of a two-year
clock, rows in time order. Files go to the system temporary folder and are deleted at the end.

Every size is prepared in a fresh subprocess (``load_raw(path, lazy=True)`` and ``prepare``:
the Polars streaming pipeline), so that its peak memory (``ru_maxrss``) is that of the job
alone. Up to ``--baseline-up-to`` rows, the same-run baseline of the earlier figures is measured
too: Polars reading the whole file and sorting it by (user, timestamp) in memory.

    POLARS_MAX_THREADS=2 .venv/bin/python benchmarks/bench_prepare.py [--sizes 10000000,100000000]
        [--format parquet|csv] [--baseline-up-to 10000000] [--repeat 3]

Targets: 10M interactions in under 60 s and under 4 GB (issue "RecForge core"); 100M under
8 GB peak (issue "data past memory").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CHUNK = 5_000_000
EPOCH = 1_500_000_000
SPAN = 730 * 86_400


def write_log(path: Path, n: int, seed: int = 0, chunk: int = CHUNK, dup_rate: float = 0.01,
              user_alpha: float = 0.8, item_alpha: float = 1.0) -> dict:
    """Write the synthetic log of ``n`` rows to ``path`` chunk by chunk; returns its statistics."""
    import numpy as np
    import polars as pl

    n_users, n_items = max(1000, n // 20), max(500, n // 50)
    rng = np.random.default_rng(seed)
    user_ids = rng.permutation(n_users).astype(np.int64) + 1  # rank -> id
    item_ids = rng.permutation(n_items).astype(np.int64) + 1

    def power_law(r: np.random.Generator, m: int, size: int, alpha: float) -> np.ndarray:
        """Ranks 0..size-1 with density ~ rank^-alpha (inverted continuous CDF)."""
        u = r.random(m)
        if abs(alpha - 1.0) < 1e-9:
            x = np.exp(u * np.log(size + 1.0))
        else:
            a = 1.0 - alpha
            x = (1.0 + u * ((size + 1.0) ** a - 1.0)) ** (1.0 / a)
        return np.minimum(x.astype(np.int64), size) - 1

    n_chunks = -(-n // chunk)
    item_counts = np.zeros(n_items, dtype=np.int64)
    twice = 0
    parts = Path(tempfile.mkdtemp(dir=path.parent, prefix=".parts-"))
    try:
        for c in range(n_chunks):
            m = min(chunk, n - c * chunk)
            r = np.random.default_rng([seed, c])
            fresh = m - int(m * dup_rate)
            users = user_ids[power_law(r, fresh, n_users, user_alpha)]
            item_rank = power_law(r, fresh, n_items, item_alpha)
            items = item_ids[item_rank]
            lo, hi = EPOCH + SPAN * c // n_chunks, EPOCH + SPAN * (c + 1) // n_chunks
            times = np.sort(r.integers(lo, hi, fresh, dtype=np.int64))
            again = r.choice(fresh, m - fresh, replace=False)  # rows logged a second time
            order = np.sort(np.concatenate([np.arange(fresh), again]), kind="stable")
            item_counts += np.bincount(item_rank[order], minlength=n_items)
            twice += m - fresh
            pl.DataFrame({"user_id": users[order], "item_id": items[order], "timestamp": times[order]}).write_parquet(
                parts / f"part-{c:05d}.parquet")
        scan = pl.scan_parquet(parts / "*.parquet")
        if path.suffix == ".csv":
            scan.sink_csv(path)
        else:
            scan.sink_parquet(path)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    top = item_counts[: max(1, n_items // 100)].sum()  # ranks are sorted by popularity
    return {"rows": n, "user_ids": n_users, "item_ids": n_items, "items_seen": int((item_counts > 0).sum()),
            "top_1pct_items_share": round(float(top / n), 4), "rows_logged_twice": twice,
            "file_mb": round(path.stat().st_size / 2**20)}


def child(path: str, baseline: bool) -> None:
    t0 = time.perf_counter()
    stages: dict = {}
    if baseline:
        import polars as pl

        df = pl.read_parquet(path) if path.endswith(".parquet") else pl.read_csv(path)
        df = df.sort(["user_id", "timestamp"])
        rows = df.height
    else:
        from recforge.data.prepare import PrepareOptions, prepare
        from recforge.data.readers import load_raw
        from recforge.data.split import leave_one_out, temporal

        raw = load_raw(path, lazy=True)
        stages["scan"] = time.perf_counter() - t0
        timings: dict = {}
        ds = prepare(raw, PrepareOptions(min_user=5, min_item=5), timings=timings)
        stages.update(timings)
        t = time.perf_counter()
        sp = leave_one_out(ds)
        stages["split_loo"] = time.perf_counter() - t
        rows, train_rows = ds.interactions.height, sp.train.height
        del sp
        t = time.perf_counter()
        temporal(ds)
        stages["split_temporal"] = time.perf_counter() - t
        stages = {k: round(v, 2) for k, v in stages.items()}
        stages.update(kept_rows=rows, train_rows=train_rows, users=ds.n_users, items=ds.n_items)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB on Linux
    print(json.dumps({"seconds": round(wall, 2), "peak_mb": round(peak), "rows": rows, "stages": stages}))


def run_child(path: Path, baseline: bool, repeat: int = 1) -> dict:
    """Run the job ``repeat`` times, each in a fresh process; the run of median time, with the
    seconds and peaks of every run beside it (the machine may be shared)."""
    cmd = [sys.executable, __file__, "--child", str(path)] + (["--baseline"] if baseline else [])
    runs = [json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for _ in range(repeat)]
    median = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]
    if repeat > 1:
        median = {**median, "all_seconds": [r["seconds"] for r in runs], "all_peak_mb": [r["peak_mb"] for r in runs]}
    return median


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000000,100000000")
    ap.add_argument("--format", default="parquet", choices=["parquet", "csv"])
    ap.add_argument("--baseline-up-to", type=int, default=10_000_000,
                    help="measure the eager read+sort baseline for sizes up to this many rows")
    ap.add_argument("--repeat", type=int, default=1, help="runs per size (the median run is reported)")
    ap.add_argument("--child", default=None)
    ap.add_argument("--baseline", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.baseline)

    sizes = [int(s) for s in args.sizes.split(",")]
    out = []
    with tempfile.TemporaryDirectory(prefix="recforge-bench-") as tmp:
        for n in sizes:
            path = Path(tmp) / f"log_{n}.{args.format}"
            t = time.perf_counter()
            data = write_log(path, n)
            data["generate_seconds"] = round(time.perf_counter() - t, 1)
            row = {"interactions": n, "format": args.format, "data": data}
            if n <= args.baseline_up_to:
                row["baseline_read_sort"] = run_child(path, baseline=True, repeat=args.repeat)
            p = row["recforge_prepare"] = run_child(path, baseline=False, repeat=args.repeat)
            if "baseline_read_sort" in row:
                row["ratio_to_read_sort"] = round(p["seconds"] / row["baseline_read_sort"]["seconds"], 2)
            path.unlink()
            out.append(row)
            base = (f" | read+sort baseline {row['baseline_read_sort']['seconds']:.2f} s, "
                    f"{row['baseline_read_sort']['peak_mb']} MB" if "baseline_read_sort" in row else "")
            runs = f" (runs: {p['all_seconds']} s, {p['all_peak_mb']} MB)" if "all_seconds" in p else ""
            print(f"{n:>11,} rows ({args.format}, {data['file_mb']} MB file): prepare {p['seconds']:7.2f} s, "
                  f"peak {p['peak_mb']:5d} MB{runs}{base} | stages {p['stages']}", flush=True)
    first = out[0]["recforge_prepare"]
    for row in out[1:]:
        p = row["recforge_prepare"]
        row["vs_first_size"] = {"rows": round(row["interactions"] / out[0]["interactions"], 2),
                                "seconds": round(p["seconds"] / first["seconds"], 2),
                                "peak_mb": round(p["peak_mb"] / first["peak_mb"], 2)}
        print(f"{row['interactions']:,} vs {out[0]['interactions']:,}: x{row['vs_first_size']['rows']} rows, "
              f"x{row['vs_first_size']['seconds']} time, x{row['vs_first_size']['peak_mb']} peak memory")
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "polars_max_threads": os.environ.get("POLARS_MAX_THREADS", "default"),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "command": "python benchmarks/bench_prepare.py " + " ".join(sys.argv[1:]),
            "prepare": "load_raw(path, lazy=True) -> prepare(min_user=5, min_item=5) -> leave_one_out; "
                       "then temporal (quantiles .8/.9) with the leave-one-out split released"}
    (RESULTS / f"prepare_{args.format}.json").write_text(json.dumps({"meta": meta, "rows": out}, indent=2))


if __name__ == "__main__":
    main()
