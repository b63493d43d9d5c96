"""Data-parallel training on this machine: N processes (torch.distributed, gloo) against one.

    python benchmarks/bench_ddp.py [--data ../shared/data/movielens-100k] [--epochs 5] [--nproc 2]

For SASRec and LightGCN at the same global batch and seed, in the same run: one process with one
thread, one process with N threads, and N processes with one thread each (``recforge train
--nproc N``). Prints seconds per training epoch (mean over the epochs), the test NDCG@10 after
the fixed number of epochs (full ranking, leave-one-out, history excluded, pessimistic ties), and
the speed ratios; writes ``benchmarks/results/ddp_<data>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "sasrec": ["max_len=200", "patience=100", "valid_metric=ndcg@10"],
    "lightgcn": ["eval_every=1", "patience=100", "batch_size=2048"],
}


def train(model: str, data: str, epochs: int, out: Path, nproc: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "recforge.cli", "train", model, "--data", data, "--out", str(out), "--quiet",
           f"epochs={epochs}", *MODELS[model]]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    else:
        cmd += [f"threads={threads}"] if model == "sasrec" else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    run = Path(proc.stdout.strip().splitlines()[-1])
    metrics = json.loads((run / "metrics.json").read_text())
    epochs_ = json.loads((run / "history.json").read_text())["epochs"]
    return {"processes": nproc, "threads_each": threads, "wall_seconds": round(wall, 1),
            "seconds_per_epoch": round(sum(e["train_seconds"] for e in epochs_) / len(epochs_), 2),
            "valid_seconds_per_epoch": round(sum(e.get("valid_seconds", 0.0) for e in epochs_) / len(epochs_), 2),
            "test_ndcg@10": round(metrics["test"]["ndcg@10"], 4), "test_hr@10": round(metrics["test"]["hr@10"], 4),
            "final_loss": round(epochs_[-1]["loss"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "movielens-100k"))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--models", default="sasrec,lightgcn")
    args = ap.parse_args()
    if not Path(args.data).exists():
        raise SystemExit(f"dataset not found at {args.data} (the shared data folder sits beside the project)")
    out = Path("/tmp") / f"recforge-ddp-{os.getpid()}"
    rows = {}
    for model in args.models.split(","):
        single = train(model, args.data, args.epochs, out, 1, 1)
        threads = train(model, args.data, args.epochs, out, 1, args.nproc)
        ddp = train(model, args.data, args.epochs, out, args.nproc, 1)
        rows[model] = {"one_process_one_thread": single, f"one_process_{args.nproc}_threads": threads,
                       f"{args.nproc}_processes": ddp,
                       "speed_ratio_ddp_vs_one_thread": round(single["seconds_per_epoch"] / ddp["seconds_per_epoch"], 2),
                       "speed_ratio_ddp_vs_threads": round(threads["seconds_per_epoch"] / ddp["seconds_per_epoch"], 2)}
        print(f"{model}: s/epoch 1p1t {single['seconds_per_epoch']}  1p{args.nproc}t {threads['seconds_per_epoch']}  "
              f"{args.nproc}p {ddp['seconds_per_epoch']}  (ratio vs 1 thread {rows[model]['speed_ratio_ddp_vs_one_thread']}, "
              f"vs {args.nproc} threads {rows[model]['speed_ratio_ddp_vs_threads']}); NDCG@10 "
              f"{single['test_ndcg@10']} / {threads['test_ndcg@10']} / {ddp['test_ndcg@10']}", flush=True)
    result = {"command": "python benchmarks/bench_ddp.py " + " ".join(sys.argv[1:]),
              "data": Path(args.data).name, "epochs": args.epochs,
              "protocol": "leave-one-out, full ranking, history excluded, pessimistic ties; fixed epochs, no early stop",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "models": rows}
    dest = ROOT / "benchmarks" / "results" / f"ddp_{Path(args.data).name}.json"
    dest.write_text(json.dumps(result, indent=2))
    print(dest.relative_to(ROOT))


if __name__ == "__main__":
    main()
