"""CmnRec's chunk framework against the same memory network without chunks: memory operations and
training time per epoch, measured side by side on the same batches.

    python benchmarks/cmnrec_chunks.py [--data ml-100k|beauty-time|PATH] [--batches 40] [--rounds 3]

For each ``chunk`` mode (``none``: read and write the memory at every item; ``pec`` and ``tsc``: the
paper's periodic and recency-growing chunks; ``gap``: ours, chunks closed by large time gaps) the
model is built with its defaults (one thread) on the data's leave-one-out training part, and the same
``--batches`` training steps (forward, loss, backward, Adam step; same batches for every mode) are
timed in ``--rounds`` rounds that alternate the modes, so that the machine's load hits every mode
alike. Reported: memory operations of one training epoch (a read and a write per boundary),
process CPU seconds per step (the better figure on a shared machine) and wall seconds, the medians
over rounds, and every mode's ratio to ``none``. Accuracy of the modes comes from
``compare_models.py --family seq`` (rows ``cmnrec``, ``cmnrec-pec``, ``cmnrec-tsc``, ``cmnrec-gap``).
Writes ``benchmarks/results/cmnrec_chunks_<data>.json``.
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATASETS = {"ml-100k": SHARED / "movielens-100k", "beauty-time": SHARED / "amazon-beauty-time"}
MODES = ("none", "pec", "tsc", "gap")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="ml-100k")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    path = DATASETS.get(args.data, Path(args.data))
    if not Path(path).exists():
        print(f"{path}: data not found (the shared datasets live in ../shared/data); nothing run", file=sys.stderr)
        return 2
    from recforge.data.prepare import prepare
    from recforge.data.readers import load_raw
    from recforge.data.split import leave_one_out
    from recforge.models.registry import create
    from recforge.training.trainer import set_seed

    torch.set_num_threads(1)
    split = leave_one_out(prepare(load_raw(str(path))))
    models, batches, opts = {}, {}, {}
    for mode in MODES:
        set_seed(0)
        m = create("cmnrec", chunk=mode, verbose=False, threads=1)
        m.n_users_, m.n_items_ = split.n_users, split.n_items
        m.prepare_fit(split)
        m.net_ = m.build(split.n_users, split.n_items)
        m.net_.train()
        models[mode], opts[mode] = m, torch.optim.Adam(m.net_.parameters(), lr=m.lr)
        it = m.train_batches(split, np.random.default_rng(0))
        batches[mode] = [next(it) for _ in range(min(args.batches, m.n_train_batches(split)))]
    n_epoch = models["none"].n_train_batches(split)
    cpu = {m: [] for m in MODES}
    wall = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            m, opt = models[mode], opts[mode]
            t, c = time.perf_counter(), time.process_time()
            for b in batches[mode]:
                opt.zero_grad(set_to_none=True)
                m.loss(b).backward()
                opt.step()
            cpu[mode].append((time.process_time() - c) / len(batches[mode]))
            wall[mode].append((time.perf_counter() - t) / len(batches[mode]))
    rows = {}
    for mode in MODES:
        m = models[mode]
        rows[mode] = {"chunk_size": getattr(m, "period", None), "memory_ops_per_epoch": int(m.memory_ops_),
                      "cpu_s_per_step": round(statistics.median(cpu[mode]), 4),
                      "wall_s_per_step": round(statistics.median(wall[mode]), 4),
                      "cpu_s_per_epoch": round(statistics.median(cpu[mode]) * n_epoch, 2)}
    base = rows["none"]
    for mode, row in rows.items():
        row["memory_ops_ratio_to_none"] = round(row["memory_ops_per_epoch"] / base["memory_ops_per_epoch"], 4)
        row["cpu_speedup_vs_none"] = round(base["cpu_s_per_step"] / row["cpu_s_per_step"], 3)
        print(f"{mode:5s} memory ops/epoch {row['memory_ops_per_epoch']:>9,d} ({row['memory_ops_ratio_to_none']:.3f} of none)"
              f"  CPU {row['cpu_s_per_step'] * 1e3:7.1f} ms/step (x{row['cpu_speedup_vs_none']:.2f} vs none)"
              f"  wall {row['wall_s_per_step'] * 1e3:7.1f} ms/step", flush=True)
    out = ROOT / "benchmarks" / "results" / f"cmnrec_chunks_{args.data if args.data in DATASETS else Path(args.data).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/cmnrec_chunks.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 PyTorch thread", "data": os.path.relpath(path, ROOT),
        "steps_timed": {m: len(batches[m]) for m in MODES}, "rounds": args.rounds, "batches_per_epoch": n_epoch,
        "modes": rows}, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
