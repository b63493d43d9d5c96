"""Reproduce MF-BPR and LightGCN on Gowalla with LightGCN's own split and protocol.

    python benchmarks/graph_gowalla.py lightgcn [key=value ...] [--epochs N] [--budget SECONDS]
                                       [--monitor-every K] [--tune FRAC] [--data PATH] [--out FILE]

Models: ``lightgcn`` (our LightGCN), ``mf`` (the same model with ``n_layers=0``: MF trained with
the same BPR loss, batches and regularisation), ``bpr`` (:class:`recforge.models.general.bpr.BPRMF`),
``simgcl`` and ``sgl`` (``cl_loss=symmetric`` swaps in the SGCL authors' symmetric contrastive loss:
"SimGCL + symmetric loss"), ``sgcl`` (the SGCL authors' model). ``key=value`` overrides the
model's YAML defaults (``seed=1``, ``lr=0.01``, ...).

``--tune FRAC`` is for choosing settings without looking at ``test.txt``: a random ``FRAC`` of
every user's ``train.txt`` items (seeded by ``--tune-seed``, each user keeps at least one) becomes
the evaluation set, the model trains on the rest, and ``test.txt`` is not read at all.

Protocol (LightGCN's): ``train.txt`` / ``test.txt`` as given (``split=presplit``), all items
ranked, the user's training items excluded, Recall@20 over all of the user's test items and
NDCG@20 with binary relevance and the ideal DCG over ``min(|test|, 20)`` positions, averaged over
test users. The split has no validation part and we do not carve one: like the paper we train a
fixed number of epochs (or, with ``--budget``, stop before the first epoch that would start
after that many seconds of training) and report the model as it is at the end. ``--monitor-every K`` evaluates the test set every K epochs to draw the learning
curve; those numbers are never used to select a model (no early stopping, no best-epoch pick), and
their evaluation time is excluded from the training time. ``kill PID`` (SIGTERM) or SIGINT stops
training at once and still evaluates and writes the results.

On a shared machine pass ``threads=1``: with every core busy, PyTorch's intra-op threads wait on
each other at every sparse product and two threads can be much slower than one.

Prints and writes (JSON) Recall@20 / NDCG@20, wall time, epochs, seconds per epoch (training
only) and the peak resident memory of the process (``ru_maxrss``); run one model per process so
the peak belongs to that model.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import polars as pl
import yaml

from recforge.data.prepare import prepare
from recforge.data.readers import load_raw
from recforge.data.dataset import Dataset
from recforge.data.schema import SPLIT
from recforge.data.split import Split, presplit, random_ratio
from recforge.evaluation.batch import build_evalset
from recforge.evaluation.evaluator import evaluate
from recforge.models.registry import create

KS = [20]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def holdout_from_train(ds: Dataset, frac: float, seed: int) -> Split:
    """A split whose test part is a random ``frac`` of every user's ``train`` rows (the user keeps
    at least one); the source's own test rows are dropped."""
    train_only = ds.interactions.filter(pl.col(SPLIT) == "train").drop(SPLIT)
    split = random_ratio(replace(ds, interactions=train_only), (1.0 - frac, 0.0, frac), seed=seed)
    split.protocol = {"split": "holdout-from-train", "frac": frac, "seed": seed}
    return split


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["lightgcn", "mf", "bpr", "simgcl", "sgl", "sgcl"])
    ap.add_argument("overrides", nargs="*", help="key=value")
    ap.add_argument("--data", default="../shared/data/gowalla")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default: the model's YAML value)")
    ap.add_argument("--budget", type=float, default=None, help="stop before an epoch once this many seconds have passed")
    ap.add_argument("--monitor-every", type=int, default=0, help="evaluate the test set every K epochs (curve only)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--tune", type=float, default=0.0,
                    help="evaluate on this fraction of train.txt held out per user instead of test.txt")
    ap.add_argument("--tune-seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stdout)
    logging.getLogger("recforge.train").setLevel(logging.INFO)  # one line per epoch
    # `kill -INT PID` or `kill PID` stops training cleanly (the trainer keeps the current weights)
    # and still evaluates and writes the results, also when started in the background
    def _stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)

    overrides = {}
    for kv in args.overrides:
        k, _, v = kv.partition("=")
        overrides[k] = yaml.safe_load(v)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    name = "lightgcn" if args.model == "mf" else args.model
    if args.model == "mf":
        overrides.setdefault("n_layers", 0)

    t0 = time.perf_counter()
    ds = prepare(load_raw(args.data))
    split = holdout_from_train(ds, args.tune, args.tune_seed) if args.tune else presplit(ds)
    test = build_evalset(split.history("test"), split.test, split.n_users, split.n_items, "test")
    print(f"data: {split.n_users} users, {split.n_items} items, {split.train.height} train, "
          f"{split.test.height} test ({time.perf_counter() - t0:.1f}s), peak {peak_mb():.0f} MB", flush=True)

    model = create(name, verbose=False, **overrides)
    params = model.get_params()
    print("model:", args.model, params, flush=True)

    curve: list[dict] = []
    eval_seconds: dict[int, float] = {}
    state = {"epoch": 0, "t_train0": None}
    inner = model.train_batches

    def monitored(split_, rng):
        # called by the trainer at the start of every epoch: the previous epoch is finished here
        done = state["epoch"]
        if done and args.monitor_every and done % args.monitor_every == 0:
            te = time.perf_counter()
            m = evaluate(model, test, ks=KS, groups=False).metrics
            eval_seconds[done + 1] = time.perf_counter() - te
            curve.append({"epoch": done, "recall@20": m["recall@20"], "ndcg@20": m["ndcg@20"],
                          "elapsed_s": round(time.perf_counter() - state["t_train0"], 1)})
            print(f"  epoch {done}: recall@20 {m['recall@20']:.4f} ndcg@20 {m['ndcg@20']:.4f} "
                  f"(eval {eval_seconds[done + 1]:.0f}s)", flush=True)
        if args.budget and done and time.perf_counter() - state["t_train0"] - sum(eval_seconds.values()) > args.budget:
            raise KeyboardInterrupt  # the trainer stops cleanly and keeps the current weights
        state["epoch"] = done + 1
        yield from inner(split_, rng)

    model.train_batches = monitored
    t1 = time.perf_counter()
    state["t_train0"] = t1
    model.fit(split, None)
    fit_s = time.perf_counter() - t1
    hist = model.history_
    for row in hist["epochs"]:
        row["train_seconds_net"] = round(row["train_seconds"] - eval_seconds.get(row["epoch"], 0.0), 2)
        print(f"  epoch {row['epoch']}: loss {row['loss']:.4f} train {row['train_seconds_net']:.1f}s", flush=True)
    te = time.perf_counter()
    final = evaluate(model, test, ks=KS, groups=False).metrics
    final_eval_s = time.perf_counter() - te
    n_epochs = len(hist["epochs"])
    if not curve or curve[-1]["epoch"] != n_epochs:
        curve.append({"epoch": n_epochs, "recall@20": final["recall@20"], "ndcg@20": final["ndcg@20"],
                      "elapsed_s": round(fit_s - sum(eval_seconds.values()), 1)})
    per_epoch = [r["train_seconds_net"] for r in hist["epochs"]]
    res = {
        "model": args.model, "data": args.data, "params": params,
        "protocol": (f"tuning: {args.tune:g} of each user's train.txt items held out (seed {args.tune_seed}), "
                     "trained on the rest, test.txt unused" if args.tune else
                     "presplit (LightGCN train.txt/test.txt)") + ", full ranking, train items excluded, no validation, "
                    "fixed epochs / time budget, final model reported",
        "epochs": n_epochs, "stopped_by_budget": bool(hist["interrupted"]),
        "recall@20": final["recall@20"], "ndcg@20": final["ndcg@20"],
        "seconds_per_epoch": round(sum(per_epoch) / max(1, len(per_epoch)), 2),
        "train_seconds": round(sum(per_epoch), 1), "fit_wall_seconds": round(fit_s, 1),
        "test_eval_seconds": round(final_eval_s, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(peak_mb(), 1), "curve": curve,
    }
    print(f"RESULT {args.model}: recall@20 {res['recall@20']:.4f} ndcg@20 {res['ndcg@20']:.4f} after {n_epochs} epochs; "
          f"{res['seconds_per_epoch']} s/epoch, wall {res['wall_seconds']} s, peak RSS {res['peak_rss_mb']} MB", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
