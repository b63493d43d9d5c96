"""Mean and spread over seeds of the Gowalla runs written by ``graph_gowalla.py``.

    python benchmarks/graph_gowalla_seeds.py [--results DIR] [--out FILE]

Each row of :data:`ROWS` names one configuration, the number of epochs it is reported at and one
result file per seed. A run is read at that epoch: its final figures when it trained exactly that
many epochs, otherwise the point of its test curve at that epoch (the same trajectory: curve
points are measured between epochs and never feed back into training). A missing file or epoch
is an error, so a row is never averaged over fewer seeds than it names.

Prints a Markdown table (mean ± sample standard deviation over the seeds; training minutes and
seconds per epoch of each seed) and writes it with the per-seed figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recforge.api import mean_std

METRICS = ("recall@20", "ndcg@20")

#: (label, epochs reported, {seed: result file})
ROWS = [
    ("MF-BPR, lr 1e-3, batch 8192", 276,
     {0: "graph_gowalla_mf_lr0.001_seed0.json", 1: "graph_gowalla_mf_lr0.001_e276_seed1.json",
      2: "graph_gowalla_mf_lr0.001_e276_seed2.json"}),
    ("LightGCN 3 layers, lr 1e-2, batch 8192", 40,
     {0: "graph_gowalla_lightgcn_lr0.01_seed0.json", 1: "graph_gowalla_lightgcn_lr0.01_e40_seed1.json",
      2: "graph_gowalla_lightgcn_lr0.01_e40_seed2.json"}),
    ("SimGCL 2 layers, lr 1e-3, batch 2048", 12,
     {0: "graph_gowalla_simgcl_b2048_seed0.json", 1: "graph_gowalla_simgcl_b2048_seed1.json",
      2: "graph_gowalla_simgcl_b2048_seed2.json"}),
    ("SimGCL + symmetric loss (q .01 λ .1; not the SGCL authors' model), lr 1e-3, batch 2048", 12,
     {0: "graph_gowalla_sgcl_seed0.json", 1: "graph_gowalla_sgcl_seed1.json", 2: "graph_gowalla_sgcl_seed2.json"}),
]


def at_epoch(res: dict, epochs: int, name: str) -> dict:
    """Recall/NDCG@20 and training seconds of one run after ``epochs`` epochs."""
    if res["epochs"] == epochs:
        return {**{m: res[m] for m in METRICS}, "train_seconds": res["train_seconds"]}
    for point in res.get("curve", []):
        if point["epoch"] == epochs:
            return {**{m: point[m] for m in METRICS}, "train_seconds": point["elapsed_s"]}
    raise SystemExit(f"{name}: trained {res['epochs']} epochs and has no curve point at epoch {epochs}; "
                     f"rerun it with --epochs {epochs} or --monitor-every dividing {epochs}")


def summarise(results: Path) -> list[dict]:
    rows = []
    for label, epochs, files in ROWS:
        runs = {}
        for seed, fname in files.items():
            path = results / fname
            if not path.exists():
                raise SystemExit(f"{path}: missing; run graph_gowalla.py with seed={seed} --out {path}")
            res = json.loads(path.read_text())
            if res["params"]["seed"] != seed:
                raise SystemExit(f"{path}: holds seed {res['params']['seed']}, expected {seed}")
            runs[seed] = {**at_epoch(res, epochs, str(path)), "seconds_per_epoch": res["seconds_per_epoch"],
                          "file": fname}
        row = {"model": label, "epochs": epochs, "seeds": sorted(runs), "runs": runs}
        for m in METRICS:
            row[m] = mean_std([r[m] for r in runs.values()])
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| model | epochs | seeds | Recall@20 | NDCG@20 | training min by seed | s/epoch by seed |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[m]['mean']:.4f} ± {r[m]['std']:.4f}" for m in METRICS]
        minutes = " / ".join(f"{r['runs'][s]['train_seconds'] / 60:.0f}" for s in r["seeds"])
        speed = " / ".join(f"{r['runs'][s]['seconds_per_epoch']:.0f}" for s in r["seeds"])
        out.append(f"| {r['model']} | {r['epochs']} | {len(r['seeds'])} | {cells[0]} | {cells[1]} | {minutes} | {speed} |")
    return "\n".join(out)


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(here / "results"))
    ap.add_argument("--out", default=str(here / "results" / "graph_gowalla_seeds.json"))
    args = ap.parse_args(argv)
    rows = summarise(Path(args.results))
    print(markdown(rows))
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
