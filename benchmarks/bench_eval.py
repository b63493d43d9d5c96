"""Full-ranking evaluation speed on Amazon Beauty (22,363 users x 12,101 items).

A BPR-MF model (64 dimensions) is trained for a few epochs, then the whole test protocol is timed:
scoring every item for every user, masking histories, ranking the targets, all metrics at
5/10/20, coverage and head/tail and history-length groups. Baseline in the same run: the bare
matrix products of the same batches (the floor any evaluator must pay); the ratio is
evaluation time / bare scoring time.

    .venv/bin/python benchmarks/bench_eval.py [--repeats 5]

Target (issue "RecForge core"): under 2 s for scoring and ranking all users.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BEAUTY = HERE.parent.parent / "shared" / "data" / "amazon-beauty" / "Beauty.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    if not BEAUTY.exists():
        sys.exit(f"skipped: {BEAUTY} not found (the shared data folder sits beside the project)")
    from recforge.data.prepare import prepare
    from recforge.data.readers import load_raw
    from recforge.data.split import leave_one_out
    from recforge.evaluation.evaluator import evaluate
    from recforge.models.general.bpr import BPRMF
    from recforge.pipeline import eval_sets

    sp = leave_one_out(prepare(load_raw(BEAUTY)))
    valid, test = eval_sets(sp)
    model = BPRMF(epochs=args.epochs, batch_size=4096, lr=0.005, verbose=False).fit(sp, valid)

    def bare():
        with torch.no_grad():
            for s in range(0, len(test), 1024):
                model.score(test.histories.slice(s, min(s + 1024, len(test))))

    def full():
        return evaluate(model, test, popularity=sp.item_popularity)

    times = {"bare_scoring": [], "evaluate": []}
    for _ in range(args.repeats):
        for name, fn in (("bare_scoring", bare), ("evaluate", full)):
            t = time.perf_counter()
            res = fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"users": len(test), "items": sp.n_items, "threads": torch.get_num_threads(),
           "evaluate_s": round(med["evaluate"], 3), "bare_scoring_s": round(med["bare_scoring"], 3),
           "ratio": round(med["evaluate"] / med["bare_scoring"], 2),
           "ndcg@10": round(res.metrics["ndcg@10"], 4),
           "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "command": "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:])}
    print(f"full-ranking evaluation of {row['users']} users x {row['items']} items: {row['evaluate_s']} s "
          f"(median of {args.repeats}); bare scoring {row['bare_scoring_s']} s; ratio x{row['ratio']}")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "eval_beauty.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
