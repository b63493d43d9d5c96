"""Accuracy reproductions: models x datasets x seeds through `recforge.bench`, full ranking.

    .venv/bin/python benchmarks/leaderboard.py --models ease --data ../shared/data/amazon-beauty/Beauty.txt --seeds 0
    .venv/bin/python benchmarks/leaderboard.py --models pop,itemknn,ease,bpr --data ../shared/data/movielens-100k --seeds 0,1,2

Prints the leaderboard (mean ± std over seeds, protocol named) and saves it under
benchmarks/results/leaderboard-<data>-<models>.{md,json}. Extra arguments are key=value overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=str(HERE / "results" / "runs"))
    ap.add_argument("--tag", default="", help="suffix of the result files (to keep variants of one model apart)")
    args, overrides = ap.parse_known_args()
    import recforge
    from recforge.reports.leaderboard import format_leaderboard

    for d in args.data.split(","):
        if not Path(d).exists() and "/" in d:
            sys.exit(f"skipped: {d} not found (the shared data folder sits beside the project)")
    t0 = time.time()
    board = recforge.bench(args.models.split(","), args.data.split(","), [int(s) for s in args.seeds.split(",")],
                           overrides, out=args.out, verbose=False,
                           progress=lambda m, d, s, r: print(f"  {m} seed {s}: test ndcg@10 {r.metrics['test']['ndcg@10']:.4f}"
                                                             f" hr@10 {r.metrics['test']['hr@10']:.4f}"
                                                             f" ({r.metrics['timing']['fit_seconds']:.0f} s)", flush=True))
    md = format_leaderboard(board)
    print(md)
    tag = "-".join(Path(d).stem or Path(d).name for d in args.data.split(",")) + "-" + args.models.replace(",", "_")
    tag += f"-{args.tag}" if args.tag else ""
    meta = {"command": "python benchmarks/leaderboard.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "wall_seconds": round(time.time() - t0)}
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    (res / f"leaderboard-{tag}.md").write_text(f"{md}\n\n`{meta['command']}` — {meta['date']}, {meta['machine']}\n")
    (res / f"leaderboard-{tag}.json").write_text(json.dumps({"meta": meta, **board}, indent=2, default=str))


if __name__ == "__main__":
    main()
