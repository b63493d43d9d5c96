"""Full-ranking evaluation speed on Amazon Beauty (22,363 users x 12,101 items).

A BPR-MF model (64 dimensions) is trained for a few epochs, then the whole test protocol is timed:
scoring every item for every user, masking histories, ranking the targets, all metrics at
5/10/20, coverage and head/tail and history-length groups. Baseline in the same run: the bare
matrix products of the same batches (the floor any evaluator must pay); the ratio is
evaluation time / bare scoring time.

    .venv/bin/python benchmarks/bench_eval.py [--repeats 5] [--device cpu|cuda|auto] [--out FILE]

``--device``: where the model lives, scores and ranks (default ``cpu``, the figures of
BENCHMARKS.md); with a GPU every timed step ends with a device synchronisation.

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
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    ap.add_argument("--out", default=None, help="JSON file (default: results/eval_beauty.json, or "
                    "results/eval_beauty_<device>.json for another device)")
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
    model = BPRMF(epochs=args.epochs, batch_size=4096, lr=0.005, verbose=False, device=args.device).fit(sp, valid)
    device = model.device_

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def bare():
        with torch.no_grad():
            for s in range(0, len(test), 1024):
                model.score(test.histories.slice(s, min(s + 1024, len(test))))
        sync()

    def full():
        res = evaluate(model, test, popularity=sp.item_popularity)
        sync()
        return res

    times = {"bare_scoring": [], "evaluate": []}
    for _ in range(args.repeats):
        for name, fn in (("bare_scoring", bare), ("evaluate", full)):
            t = time.perf_counter()
            res = fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    from recforge.training.device import describe

    row = {"users": len(test), "items": sp.n_items, "threads": torch.get_num_threads(), "device": describe(device),
           "evaluate_s": round(med["evaluate"], 3), "bare_scoring_s": round(med["bare_scoring"], 3),
           "ratio": round(med["evaluate"] / med["bare_scoring"], 2),
           "ndcg@10": round(res.metrics["ndcg@10"], 4),
           "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "command": "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:])}
    print(f"full-ranking evaluation of {row['users']} users x {row['items']} items on {row['device']}: "
          f"{row['evaluate_s']} s (median of {args.repeats}); bare scoring {row['bare_scoring_s']} s; "
          f"ratio x{row['ratio']}")
    default = "eval_beauty.json" if device.type == "cpu" else f"eval_beauty_{device.type}.json"
    out = Path(args.out) if args.out else HERE / "results" / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
