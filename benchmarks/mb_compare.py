"""Multi-behaviour models against LightGCN on purchases only and on merged behaviours, 3 seeds,
full ranking and the labelled sampled-99 protocol, with paired tests.

    python benchmarks/mb_compare.py [--data retailrocket|tmall|taobao|PATH] [--seeds 0,1,2]
                                    [--models NAME,...] [--budget SECONDS] [--fresh]

Data (``../shared/data``): ``retailrocket`` (``retailrocket-mb``: views, carts, purchases; the given
``train.csv``/``test.csv`` split), ``tmall`` (``tmall-mb``: favourites, carts, purchases, page views
missing; given split), ``taobao`` (``taobao-userbehavior-sample``: pv, cart, fav, buy; no given split,
so leave-one-out on purchases). Target ``buy`` (``data.target_behavior=buy``) everywhere.

Models (``MODELS``): each with its YAML defaults, ``threads=1``, and an upper bound on the epochs
(``CAPS``) so that one run stays within minutes on a shared 2-core machine; early stopping on the
validation part ends runs sooner (given splits: each user's last training purchase, for users with
at least two, ``split.valid=auto``; leave-one-out: the second-to-last purchase). Knowledge-aware models
get ``data.knowledge=co-interaction`` (item pairs co-occurring for more than 3 users within a
behaviour, built from the training part only), and ``category`` as well where the data has item
categories (Taobao).

Protocol: full ranking over every item, excluding only the user's own training purchases
(``eval.exclude=target_behavior``: viewed and carted items stay candidates), pessimistic ties; and
the SAMPLED protocol of MB-GMN / CIGF / CKML / MB-STR, the held-out item against 99 uniform negatives
among the items the user has not purchased (``recforge.evaluate(run, sampled=99)``), not comparable
to full ranking. Paired tests (t-test and Wilcoxon on per-user metrics averaged over seeds) of every
model against ``lightgcn-buy`` and ``lightgcn-all``, under both protocols.

Each (model, seed) runs in its own process (its peak resident memory is its own; ``--jobs 2`` runs two
at once, one thread each, so seconds per epoch are two-process figures) and keeps its run
folder under ``benchmarks/results/runs/mb/<data>/`` (ignored by git), so a later call with other
``--models`` adds to the same table; ``--fresh`` starts over. Seconds per epoch are training only.
A run stopped part-way leaves its checkpoint after the last finished epoch, and the next call for the
same (model, seed) resumes it from there, unless the call is ``--fresh`` (``compare_jobs.resumable``:
the trainer's resumed runs end as uninterrupted ones would); its row says so (``resumed``: the epoch,
and the training seconds before the stop, which its wall time includes; its peak memory is the resumed
process's).

Writes ``benchmarks/results/mb_<data>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_jobs import (SAMPLED99_FILE, collect, fit_figures, merge_rows, paired, recorded_tests,  # noqa: E402
                          resumable, run_lock, sampled99, summarise)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATASETS = {"retailrocket": SHARED / "retailrocket-mb", "tmall": SHARED / "tmall-mb",
            "taobao": SHARED / "taobao-userbehavior-sample"}
KG = {"retailrocket": "co-interaction", "tmall": "co-interaction", "taobao": "co-interaction,category"}

#: name -> (registry model, overrides)
MODELS = {
    "pop": ("pop", {}),
    "lightgcn-buy": ("lightgcn", {"data.behaviors": "buy"}),
    "lightgcn-all": ("lightgcn", {}),
    "mbgcn": ("mbgcn", {}),
    "mbsasrec": ("mbsasrec", {"batch_size": 64}),  # more optimiser steps in the few affordable epochs
    "cigf": ("cigf", {}),
    "ckml": ("ckml", {"knowledge": True}),
    "kamcl": ("kamcl", {"knowledge": True}),
    # a window before every training purchase: a sub-sequence split, named in the run's protocol
    "pdb4rec": ("pdb4rec", {"subseq": "target"}),
    "dpcpl": ("dpcpl", {"pretrain_epochs": 4}),  # stage (a) capped; stage (b) by CAPS
}
#: upper bounds on the epochs (early stopping usually ends a run sooner); None: the model's default
CAPS = {"lightgcn-buy": 300, "lightgcn-all": 150, "mbgcn": 100, "mbsasrec": 10, "cigf": 30, "ckml": 12,
        "kamcl": 30, "pdb4rec": 8, "dpcpl": 8}
BASELINES = ("lightgcn-buy", "lightgcn-all")
KEYS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20")
PARTS = {"full": "per_user_test.parquet", "sampled99": SAMPLED99_FILE}


def run_dir(data: str) -> Path:
    return ROOT / "benchmarks" / "results" / "runs" / "mb" / data


def overrides_of(name: str, data: str, seed: int) -> dict:
    model, extra = MODELS[name]
    o = {"data.target_behavior": "buy", "seed": seed, "data.cache": False}
    if model != "pop":
        o.update(threads=1, device="cpu")
    if CAPS.get(name):
        o["epochs"] = CAPS[name]
    for k, v in extra.items():
        if k == "knowledge":
            o["data.knowledge"] = KG[data]
        else:
            o[k] = v
    return o


def worker(name: str, seed: int, data: str, fresh: bool = False) -> dict:
    """Train and evaluate one (model, seed) in this process; its row, and per-user tables on disk. A run
    a stopped call left part-trained resumes from its last checkpoint (``resumable``), unless ``fresh``."""
    import recforge

    model, _ = MODELS[name]
    overrides = overrides_of(name, data, seed)
    out = run_dir(data) / f"{name}-s{seed}"
    with run_lock(out):
        partial = resumable(out, resume=not fresh)
        t0 = time.perf_counter()
        run = recforge.train(model, data=str(DATASETS.get(data, data)), overrides=overrides, out=out, verbose=False,
                             resume=partial)
        wall = time.perf_counter() - t0
    full = run.metrics["test"]
    protocol = run.metrics.get("protocol", {})
    pick = lambda m: {k: round(float(m[k]), 4) for k in KEYS if k in m}  # noqa: E731
    notes = {k: protocol[k] for k in ("knowledge", "subsequence_split", "params_tuned", "params_total",
                                      "tuned_share", "pretrain_seconds", "tune_train_seconds") if k in protocol}
    return {"name": name, "model": model, "seed": seed, "run": os.path.relpath(run.path, ROOT),
            "overrides": {k: v for k, v in overrides.items() if k != "seed"}, **fit_figures(run, wall),
            "full": pick(full), "n_users": int(full.get("n_users", 0)), "sampled99": sampled99(run, KEYS),
            "protocol": {k: protocol.get(k) for k in ("exclude", "target_behavior", "ties", "behaviors")},
            "split": protocol.get("split", {}).get("valid"), "notes": notes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="retailrocket")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=None, help="no new run after this many seconds")
    ap.add_argument("--fresh", action="store_true",
                    help="forget earlier rows of this data set and start stopped runs over")
    ap.add_argument("--jobs", type=int, default=1, help="(model, seed) runs at once, one thread each")
    ap.add_argument("--merge", metavar="FILE", default=None,
                    help="merge the JSON rows in FILE (one per line, e.g. a log's rows that could not be written) "
                         "into the results file; run nothing")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.data, args.fresh)))
        return 0
    label = args.data if args.data in DATASETS else Path(args.data).name
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"mb_{label}.json")
    if args.merge:
        n = merge_rows(out, Path(args.merge), lambda rows, wall: write(out, args.data, rows, wall))
        print(f"merged {n} row(s) into {out}")
        return 0
    path = DATASETS.get(args.data, Path(args.data))
    if not Path(path).exists():
        print(f"{path}: data folder not found (the shared datasets live in ../shared/data); nothing run",
              file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    # seed by seed: an interrupted budget still has every model at the first seeds
    collect(__file__, out, args.fresh, [(name, seed) for seed in seeds for name in names], ["--data", args.data],
            args.jobs, args.budget, lambda rows, wall: write(out, args.data, rows, wall),
            lambda r: f"{r['name']:13s} seed {r['seed']}  HR@10 {r['full']['hr@10']:.4f}  NDCG@10 {r['full']['ndcg@10']:.4f}  "
                      f"sampled-99 HR@10 {r['sampled99']['hr@10']:.4f}  {r['epochs_run']} epochs "
                      f"{r['s_per_epoch']:.2f} s/epoch  {r['peak_mb']:.0f} MB")
    return 0


def write(out: Path, data: str, rows: list[dict], wall: float) -> None:
    summary = summarise(rows, MODELS, ["full", "sampled99"])
    before = recorded_tests(out)
    for name, s in summary.items():
        if name not in BASELINES and name != "pop":
            s["vs"] = {b: paired(rows, ROOT, name, b, PARTS, recorded=before.get(name, {}).get(b)) for b in BASELINES}
    result = {"data": os.path.relpath(DATASETS.get(data, Path(data)), ROOT), "target_behavior": "buy",
              "split": "given train/test files, validation carved from training (each user's last training "
                       "purchase, users with at least two)" if data != "taobao" else
                       "leave-one-out on purchases (last test, second-to-last validation)",
              "protocol": {"full": "every item ranked, the user's training purchases excluded (viewed/carted items "
                                   "stay candidates), pessimistic ties",
                           "sampled99": "SAMPLED: the held-out item against 99 uniform negatives not purchased"},
              "caps": {n: CAPS.get(n) for n in MODELS}, "early_stopping": "on the validation part (model defaults)",
              "wall_s": round(wall, 1), "runs": rows, "summary": summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
