"""Full-ranking evaluation with many targets per user: Gowalla's test split (29,858 users x
40,981 items, 7.3 test items per user on average, up to several hundred).

Times, on the same score batches (random 64-dimensional user and item vectors, training items
masked as the evaluator does), the two ways of ranking the targets of a row:

* ``sort``: a full stable sort of the catalogue per row (the previous method for more than 8
  target slots), the baseline;
* ``count``: :func:`recforge.evaluation.metrics.target_ranks`, one counting pass over the row
  per valid target, rows packed by their number of targets (the current method);

checks that both give the same ranks, and times the whole ``evaluate`` call (scoring, masking,
ranking, Recall/NDCG@20) with the current method.

    python benchmarks/bench_eval_multi.py [--threads 1] [--users 8192] [--data PATH]

Writes ``benchmarks/results/eval_multi_gowalla.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recforge.data.prepare import prepare
from recforge.data.readers import load_raw
from recforge.data.split import presplit
from recforge.evaluation.batch import build_evalset
from recforge.evaluation.evaluator import Protocol, evaluate, rank_scores
from recforge.evaluation.metrics import target_ranks

HERE = Path(__file__).resolve().parent


def ranks_by_sorting(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The baseline: 1-based ranks from a full stable sort of every row (ties by item index)."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    pos = torch.empty_like(order)
    pos.scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order).contiguous())
    return pos.gather(1, targets) + 1


class RandomVectors:
    """A stand-in scorer with LightGCN's shape: dot products of fixed random vectors."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.users = torch.randn(n_users, dim, generator=g)
        self.items = torch.randn(n_items + 1, dim, generator=g)

    def score(self, hist):
        return self.users[torch.from_numpy(np.asarray(hist.users, dtype=np.int64))] @ self.items.T


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "gowalla"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--users", type=int, default=8192, help="users timed for the two ranking methods")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--out", default=str(HERE / "results" / "eval_multi_gowalla.json"))
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found (Gowalla's train.txt/test.txt)")
        return 0
    torch.set_num_threads(args.threads)
    split = presplit(prepare(load_raw(args.data)))
    test = build_evalset(split.history("test"), split.test, split.n_users, split.n_items, "test")
    model = RandomVectors(split.n_users, split.n_items)
    rng = np.random.default_rng(0)
    times = {"sort": 0.0, "count": 0.0}
    n_rows = 0
    for start in range(0, min(args.users, len(test)), args.batch_size):
        stop = min(start + args.batch_size, len(test))
        hist = test.histories.slice(start, stop)
        tg = torch.from_numpy(test.targets[start:stop])
        scores, _ = rank_scores(model, hist, tg, Protocol(), None, rng)
        t0 = time.perf_counter()
        by_sort = ranks_by_sorting(scores, tg)
        times["sort"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        by_count = target_ranks(scores, tg)
        times["count"] += time.perf_counter() - t0
        valid = tg > 0
        if not torch.equal(by_sort[valid], by_count[valid]):
            print("ERROR: the two ranking methods disagree", file=sys.stderr)
            return 1
        n_rows += stop - start
    t0 = time.perf_counter()
    m = evaluate(model, test, ks=[20], groups=False, batch_size=args.batch_size).metrics
    full = time.perf_counter() - t0
    res = {
        "data": "gowalla (presplit test)", "users_timed": n_rows, "targets_per_row": int(test.targets.shape[1]),
        "n_items": split.n_items, "threads": args.threads, "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "rank_seconds_sort": round(times["sort"], 2), "rank_seconds_count": round(times["count"], 2),
        "speedup": round(times["sort"] / times["count"], 1),
        "evaluate_all_users_seconds": round(full, 1), "evaluate_users": len(test),
        "recall@20_random_vectors": round(m["recall@20"], 5),
    }
    print(f"ranking {n_rows} users' targets (padded to {res['targets_per_row']}): full sort {res['rank_seconds_sort']} s, "
          f"counting {res['rank_seconds_count']} s ({res['speedup']}x); evaluate() on all {len(test)} users "
          f"{res['evaluate_all_users_seconds']} s ({args.threads} thread(s), load {res['load_average'][0]})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
