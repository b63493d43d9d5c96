"""Training and scoring cost of a multi-behaviour model, this checkout against an earlier revision.

    python benchmarks/mb_step_speed.py --model mbgcn --data tmall --against REV [--rounds 2]
                                       [--users 2048] [--steps N] [--set key=value ...]

Each side (this checkout's ``src`` and ``REV``'s, exported by ``git archive`` into a temporary folder)
trains the model for one epoch on the data set's training part (no validation; with ``--steps N``, the
epoch's first N optimiser steps only, for models whose epoch is long) and scores the first
``--users`` test histories over the whole catalogue, in a fresh process with one PyTorch thread. The
figures are process CPU seconds (not wall time: the machine may be shared), the median over
``--rounds`` rounds that alternate which side runs first; the ratio ``REV / this checkout`` is the
speed-up. Both sides run the same config (model defaults, ``epochs=1``, ``threads=1``, ``--set``
overrides), so a change that keeps the model's arithmetic must show the same loss on both sides
(printed). Each side's peak resident memory (the worker process's, data loading included) is recorded
as well. Results: ``benchmarks/results/mb_step_speed_<model>_<data>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mb_compare import DATASETS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def worker(model: str, data: str, users: int, sets: list[str], steps: int | None = None) -> dict:
    """One epoch of training (its first ``steps`` batches where given) and one scoring pass in this
    process (the ``recforge`` on the path)."""
    import torch

    from recforge import api
    from recforge import config as C
    from recforge.models import registry
    from recforge.pipeline import load_dataset, split_dataset

    overrides = {"data.target_behavior": "buy", "data.cache": False, "epochs": 1, "threads": 1, "device": "cpu",
                 "seed": 0, **dict(map(C.split_kv, sets))}
    cfg = api.resolve(model, str(DATASETS.get(data, data)), overrides)
    ds = load_dataset(cfg["data"])
    cfg = C.with_resolved_exclude(cfg, ds)
    split = split_dataset(ds, cfg)
    _, test = api._eval_sets(cfg, split)
    params = C.model_params(cfg)
    params["verbose"] = False
    torch.manual_seed(0)
    est = registry.create(model, **params)
    if steps:  # the epoch's first ``steps`` batches
        batches, count = est.train_batches, est.n_train_batches
        est.train_batches = lambda split, rng: itertools.islice(batches(split, rng), steps)
        est.n_train_batches = lambda split: min(steps, count(split))
    t0 = time.process_time()
    est.fit(split, None)
    fit_cpu = time.process_time() - t0
    hist = test.histories.slice(0, min(users, len(test.histories)))
    t0 = time.process_time()
    with torch.no_grad():
        for lo in range(0, len(hist), 512):
            est.score(hist.slice(lo, min(lo + 512, len(hist))))
    score_cpu = time.process_time() - t0
    epochs = (getattr(est, "history_", None) or {}).get("epochs") or [{}]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    return {"fit_cpu_s": round(fit_cpu, 2), "score_cpu_s": round(score_cpu, 2), "users_scored": len(hist),
            "epoch_loss": epochs[-1].get("loss"), "peak_mb": round(peak_mb, 1)}


def export(rev: str, into: Path) -> Path:
    """``rev``'s ``src`` folder under ``into`` (``git archive``)."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src"], check=True,
                          capture_output=True).stdout
    tar = into / "src.tar"
    tar.write_bytes(blob)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into / "src"


def run_side(src: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--data", args.data,
           "--users", str(args.users)] + (["--steps", str(args.steps)] if args.steps else [])
    cmd += [f"--set={s}" for s in args.set]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker on {src} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mbgcn")
    ap.add_argument("--data", default="tmall")
    ap.add_argument("--against", help="the earlier revision (a git commit or ref)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--users", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=None, help="train the first N steps of the epoch only")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.model, args.data, args.users, args.set, args.steps)))
        return 0
    if not args.against:
        ap.error("--against REV is required (the revision to compare with)")
    try:  # recorded as the commit it names now (HEAD, a branch... move)
        args.against = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.against], check=True,
                                      capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError:
        ap.error(f"--against {args.against}: not a revision of this repository (git rev-parse failed)")
    path = DATASETS.get(args.data, Path(args.data))
    if not Path(path).exists():
        print(f"{path}: data not found (the shared datasets live in ../shared/data); nothing run", file=sys.stderr)
        return 2
    sides = {"this checkout": ROOT / "src"}
    with tempfile.TemporaryDirectory(prefix="recforge-rev-") as tmp:
        sides[args.against] = export(args.against, Path(tmp))
        rows = {name: [] for name in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for name in order:
                rows[name].append(run_side(sides[name], args))
                print(f"round {r + 1} {name:>14s}: {rows[name][-1]}", flush=True)
    keys = ("fit_cpu_s", "score_cpu_s", "peak_mb")
    med = {name: {k: statistics.median(x[k] for x in v) for k in keys if all(k in x for x in v)}
           for name, v in rows.items()}
    new, old = med["this checkout"], med[args.against]
    res = {"model": args.model, "data": args.data, "against": args.against, "rounds": args.rounds,
           "users_scored": rows["this checkout"][0]["users_scored"], "sets": args.set, "steps": args.steps,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, one PyTorch thread per side",
           "date": time.strftime("%Y-%m-%d"), "runs": rows, "median": med,
           "speedup": {"fit": round(old["fit_cpu_s"] / new["fit_cpu_s"], 2),
                       "score": round(old["score_cpu_s"] / new["score_cpu_s"], 2)}}
    out = ROOT / "benchmarks" / "results" / f"mb_step_speed_{args.model}_{args.data}.json"
    out.write_text(json.dumps(res, indent=1))
    trained = f"{args.steps} training steps" if args.steps else "one training epoch"
    print(f"{trained}: {old['fit_cpu_s']:.1f} -> {new['fit_cpu_s']:.1f} CPU s "
          f"({res['speedup']['fit']:.2f}x); scoring {res['users_scored']} users: {old['score_cpu_s']:.1f} -> "
          f"{new['score_cpu_s']:.1f} CPU s ({res['speedup']['score']:.2f}x); peak resident memory "
          f"{old.get('peak_mb', float('nan')):.0f} -> {new.get('peak_mb', float('nan')):.0f} MB\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
