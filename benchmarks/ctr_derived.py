"""CTR on rows derived from interaction logs: LR, FM, DeepFM and DIN on MovieLens-100K and the
Taobao UserBehavior sample, over three seeds.

    python benchmarks/ctr_derived.py [--datasets ml-100k,taobao] [--models lr,fm,deepfm,din]
                                     [--seeds 0,1,2] [--negatives 4] [--negatives-from existing|all]
                                     [--out benchmarks/results/ctr_derived.json]

Neither log has impressions, so rows are derived (``data.negatives``): every interaction is a
positive, and 4 negatives per positive are drawn uniformly (negative seed 0, the same for every
model and run seed) from the items the user never interacted with in the whole log and that
already existed at the positive's time (``--negatives-from existing``, the default of
``data.negatives_from``; ``all``: the whole catalogue, future items included); each row
carries the user, the item, the item's side features where the data has them (MovieLens genres),
and ``hist_items``, the user's previous 20 items in time order. The split is temporal over the
rows' time (the default of derived rows, 8:1:1 by time), so models score later rows than they
trained on. DIN attends over ``hist_items`` with the candidate item as the query; the other models
mean-pool it. Packaged defaults, early stopping on validation AUC, one thread; test AUC, log-loss
and group AUC (per user) mean ± std over the seeds. Taobao: every behaviour (pv, cart, fav, buy)
of the 84,475-row sample is a positive.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ctr_frappe import rel, seed_runs  # noqa: E402

DATA = {"ml-100k": "../shared/data/movielens-100k",
        "taobao": "../shared/data/taobao-userbehavior-sample/UserBehavior_head.csv"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="ml-100k,taobao")
    ap.add_argument("--models", default="lr,fm,deepfm,din")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--negatives", type=int, default=4)
    ap.add_argument("--negatives-from", default="existing", choices=["existing", "all"])
    ap.add_argument("--out", default="benchmarks/results/ctr_derived.json")
    ap.add_argument("--runs", default="runs/ctr_derived")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    boards, t0 = [], time.perf_counter()
    for name in args.datasets.split(","):
        data = DATA[name]
        if not Path(data).exists():
            print(f"{data}: not there (the shared data folder sits beside the project); skipped", file=sys.stderr)
            continue
        over = ["threads=1", f"data.negatives={args.negatives}", f"data.negatives_from={args.negatives_from}"]
        if name == "taobao":
            over.append("data.format=userbehavior")
        rows = [{"model": m, **seed_runs(m, data, seeds, over, f"{args.runs}/{name}")}
                for m in args.models.split(",") if m]
        met = json.loads((Path(rows[0]["runs"][0]["run"]) / "metrics.json").read_text())
        boards.append({"dataset": name, "data": data, "split": met["protocol"]["split"],
                       "source": met["protocol"]["data"], "dataset_rows": met["dataset"], "rows": rows})
    out = {"seeds": seeds, "threads": 1, "negatives": args.negatives, "negatives_from": args.negatives_from,
           "boards": boards,
           "minutes": round((time.perf_counter() - t0) / 60, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for b in boards:
        print(f"\n{b['dataset']} ({b['source'].get('rows')}; split {b['split'].get('method')})")
        print("| model | test AUC | test log-loss | group AUC | best epoch | s/epoch |")
        print("|---|---|---|---|---|---|")
        for r in b["rows"]:
            g = r["gauc"]
            print(f"| {r['model']} | {r['auc']['mean']:.4f} ± {r['auc']['std']:.4f} | {r['logloss']['mean']:.4f} ± "
                  f"{r['logloss']['std']:.4f} | {g['mean']:.4f} ± {g['std']:.4f} | {r['best_epoch']['mean']:.1f} | "
                  f"{r['seconds_per_epoch']['mean']:.2f} |" if g else "")
    print(rel(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
