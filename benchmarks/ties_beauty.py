"""Non-neural baselines on Amazon Beauty under each tie rule of the evaluator.

    python benchmarks/ties_beauty.py [--data PATH] [--out benchmarks/results/ties_beauty.json]

Pop (integer counts), ItemKNN (many items score exactly 0 for a short history) and EASE (float
scores) are fitted once each (they are deterministic) on the leave-one-out split and the test
targets ranked over the whole catalogue, the history excluded, under ``ties=index`` (the rule
before: tied items with a lower id ahead), ``pessimistic`` (the default: every tied item ahead),
``expected`` (mean rank) and ``optimistic``; then once more under ``index`` with the item ids
shuffled, which moves the ``index`` figures and none of the others.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from recforge.data.prepare import prepare
from recforge.data.readers import load_raw
from recforge.data.split import leave_one_out
from recforge.evaluation.batch import build_evalset
from recforge.evaluation.evaluator import Protocol, evaluate
from recforge.evaluation.metrics import TIES
from recforge.models.registry import create

MODELS = {"pop": {}, "itemknn": {}, "ease": {"reg_lambda": 500.0}}


class Shuffled:
    """The same model with its item ids permuted: column ``perm[i]`` holds item ``i``'s score."""

    def __init__(self, model, perm):
        self.model, self.perm = model, torch.from_numpy(perm)

    def score(self, hist):
        from recforge.evaluation.batch import Histories

        inv = np.argsort(self.perm.numpy())
        h = Histories(hist.users, hist.indptr, inv[hist.items], hist.n_items)
        s = self.model.score(h)
        out = torch.empty_like(s)
        out[:, self.perm] = s
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-beauty/Beauty.txt")
    ap.add_argument("--out", default="benchmarks/results/ties_beauty.json")
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found (the shared datasets folder is absent)")
        return 0
    torch.set_num_threads(1)
    split = leave_one_out(prepare(load_raw(args.data)))
    test = build_evalset(split.history("test"), split.test, split.n_users, split.n_items, "test")
    rng = np.random.default_rng(0)
    perm = np.concatenate([[0], rng.permutation(np.arange(1, split.n_items + 1))])
    # the shuffled model sees shuffled ids in the history and the targets
    test_p = build_evalset(split.history("test").with_columns(item_id=perm[split.history("test")["item_id"].to_numpy()]),
                           split.test.with_columns(item_id=perm[split.test["item_id"].to_numpy()]),
                           split.n_users, split.n_items, "test")
    results = {"data": args.data, "n_users": len(test), "n_items": split.n_items,
               "protocol": "leave-one-out, full ranking, history excluded, no sub-sequence split", "rows": []}
    for name, params in MODELS.items():
        model = create(name, **params)
        t0 = time.perf_counter()
        model.fit(split, None)
        row = {"model": name, "fit_seconds": round(time.perf_counter() - t0, 1)}
        for ties in TIES:
            m = evaluate(model, test, ks=[10, 20], protocol=Protocol(ties=ties), groups=False).metrics
            row[ties] = {k: m[k] for k in ("hr@10", "ndcg@10", "ndcg@20", "mrr")}
        m = evaluate(Shuffled(model, perm), test_p, ks=[10, 20], protocol=Protocol(ties="index"), groups=False).metrics
        row["index_shuffled_ids"] = {k: m[k] for k in ("hr@10", "ndcg@10", "ndcg@20", "mrr")}
        m = evaluate(Shuffled(model, perm), test_p, ks=[10, 20], protocol=Protocol(), groups=False).metrics
        row["pessimistic_shuffled_ids"] = {k: m[k] for k in ("hr@10", "ndcg@10", "ndcg@20", "mrr")}
        results["rows"].append(row)
        print(name, json.dumps(row), flush=True)
    print("\n| model | ties | HR@10 | NDCG@10 | NDCG@20 | MRR |\n|---|---|---|---|---|---|")
    for row in results["rows"]:
        for key in (*TIES, "index_shuffled_ids", "pessimistic_shuffled_ids"):
            v = row[key]
            print(f"| {row['model']} | {key} | {v['hr@10']:.4f} | {v['ndcg@10']:.4f} | {v['ndcg@20']:.4f} | {v['mrr']:.4f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
