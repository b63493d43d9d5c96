"""Multi-behaviour models against single-behaviour LightGCN on Retailrocket (target: purchases).

    python benchmarks/mb_retailrocket.py [--seeds 0,1,2] [--models NAME,...] [--data PATH]
                                         [--out FILE] [--budget SECONDS]

Data: ``../shared/data/retailrocket-mb`` (the multi-behaviour set as shipped with SSLRec: views,
carts and purchases in ``train.csv``, one held-out purchase per user in ``test.csv``), target
``buy`` (``data.target_behavior=buy``, the given split, ``split=presplit``).

Models (each with its YAML defaults except the epochs below):

* ``lightgcn-buy``: LightGCN on purchases only (``data.behaviors=buy``);
* ``lightgcn-all``: LightGCN on every behaviour merged into one graph;
* ``mbgcn``: MBGCN (behaviour-aware user-item and item-item propagation);
* ``mbsasrec``: the behaviour-aware Transformer over the whole multi-behaviour sequence
  (``batch_size=64`` instead of 128: twice the optimiser steps in the few epochs affordable here).

Protocol: the given split has no validation part and we do not carve one out of ``test.csv``, so
there is no early stopping: each model trains a fixed number of epochs (``EPOCHS``, chosen for a
bounded run on a shared 2-core machine, not tuned on the test part) and is evaluated as it is at
the end. Full ranking over every item (the headline: HR@10, NDCG@10), excluding only the user's
own training purchases (``eval.exclude=target_behavior``: viewed and carted items stay
candidates); and the sampled protocol of MB-GMN / CIGF / MB-STR, the held-out item against 99
uniform negatives among the items the user has not purchased (``recforge.evaluate(run,
sampled=99)``), labelled SAMPLED and not comparable to full ranking. Each (model, seed) runs in its
own process, so its peak resident memory (``ru_maxrss``) is its own; seconds per epoch are
training only. ``--budget`` stops starting new (model, seed) runs after that many seconds.

Writes ``benchmarks/results/mb_retailrocket.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "retailrocket-mb"
OUT = ROOT / "benchmarks" / "results" / "mb_retailrocket.json"

#: name -> (registry model, overrides); epochs fixed (no validation part to stop on)
EPOCHS = {"lightgcn-buy": 300, "lightgcn-all": 100, "mbgcn": 100, "mbsasrec": 10}
MODELS = {
    "lightgcn-buy": ("lightgcn", {"data.behaviors": "buy", "threads": 1}),
    "lightgcn-all": ("lightgcn", {"threads": 1}),
    "mbgcn": ("mbgcn", {"threads": 1}),
    "mbsasrec": ("mbsasrec", {"threads": 1, "batch_size": 64}),  # more steps in the few epochs
}


def worker(name: str, seed: int, data: str) -> dict:
    """Train and evaluate one (model, seed); the result as a dict (run in its own process)."""
    import recforge

    model, extra = MODELS[name]
    overrides = {"data.target_behavior": "buy", "seed": seed, "epochs": EPOCHS[name], "device": "cpu", **extra}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = recforge.train(model, data=data, overrides=overrides, out=tmp,
                             verbose=False)
        wall = time.perf_counter() - t0
        hist = json.loads((Path(run.path) / "history.json").read_text())
        epochs = hist.get("epochs", [])
        train_s = sum(e.get("train_seconds", 0.0) for e in epochs)
        full = run.metrics["test"]
        sampled = recforge.evaluate(run, sampled=99)
        sampled = sampled.get("test", sampled)
        protocol = run.metrics.get("protocol", {})
    keys = ("hr@10", "ndcg@10", "hr@20", "ndcg@20")
    pick = lambda m: {k: round(float(m[k]), 4) for k in keys if k in m}  # noqa: E731
    return {"name": name, "model": model, "seed": seed,
            "overrides": {k: v for k, v in overrides.items() if k != "seed"},
            "epochs": len(epochs), "s_per_epoch": round(train_s / max(len(epochs), 1), 3),
            "wall_s": round(wall, 1), "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "full": pick(full), "n_users": int(full.get("n_users", 0)), "sampled99": pick(sampled),
            "protocol": {k: protocol.get(k) for k in ("exclude", "target_behavior", "behaviors")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--budget", type=float, default=None, help="no new run after this many seconds")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.data)))
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.models.split(",")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows, t0 = [], time.perf_counter()
    for seed in seeds:  # seed by seed: an interrupted budget still has every model at the first seeds
        for name in names:
            if args.budget is not None and time.perf_counter() - t0 > args.budget:
                print(f"budget reached: {name} seed {seed} not run", file=sys.stderr)
                continue
            proc = subprocess.run([sys.executable, __file__, "--worker", name, str(seed), "--data", args.data],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{name:13s} seed {seed}  HR@10 {row['full']['hr@10']:.4f}  NDCG@10 {row['full']['ndcg@10']:.4f}  "
                  f"sampled-99 HR@10 {row['sampled99']['hr@10']:.4f}  {row['s_per_epoch']:.2f} s/epoch  "
                  f"{row['peak_mb']:.0f} MB", flush=True)
    summary = {}
    for name in names:
        got = [r for r in rows if r["name"] == name]
        if not got:
            continue
        summary[name] = {"seeds": [r["seed"] for r in got], "epochs": got[0]["epochs"],
                         "s_per_epoch": round(sum(r["s_per_epoch"] for r in got) / len(got), 3),
                         "peak_mb": max(r["peak_mb"] for r in got)}
        for part in ("full", "sampled99"):
            for k in got[0][part]:
                vals = [r[part][k] for r in got]
                mean = sum(vals) / len(vals)
                sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
                summary[name][f"{part} {k}"] = [round(mean, 4), round(sd, 4)]
    result = {"data": os.path.relpath(args.data, ROOT), "target_behavior": "buy", "split": "given (train.csv/test.csv)",
              "protocol": {"full": "every item ranked, the user's training purchases excluded",
                           "sampled99": "SAMPLED: the held-out item against 99 uniform negatives not purchased"},
              "epochs": {n: EPOCHS[n] for n in names}, "early_stopping": "none (the split has no validation part)",
              "wall_s": round(time.perf_counter() - t0, 1), "runs": rows, "summary": summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
