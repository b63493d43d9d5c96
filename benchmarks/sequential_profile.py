"""Where the time of a sequential model's training epoch goes, on Amazon Beauty.

    python benchmarks/sequential_profile.py sasrec [key=value ...] [--batches N] [--threads T] [--torch-profile]

Times ``--batches`` training steps (default: a whole epoch) split into batch building, encoder
forward, loss, backward and optimiser step, and extrapolates to seconds per epoch, in wall time
and in CPU time of the process (on a shared machine the CPU time is the better estimate of
what the run takes alone).
``--torch-profile`` prints the top operators from ``torch.profiler`` instead.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import yaml

from recforge.data.prepare import prepare
from recforge.data.readers import load_raw
from recforge.data.split import leave_one_out
from recforge.models.registry import create
from recforge.training.trainer import set_seed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--data", default="../shared/data/amazon-beauty/Beauty.txt")
    ap.add_argument("--batches", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--torch-profile", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: yaml.safe_load(v) for k, _, v in (kv.partition("=") for kv in args.overrides)}
    split = leave_one_out(prepare(load_raw(args.data)))
    m = create(args.model, verbose=False, **overrides)
    set_seed(0)
    m.n_users_, m.n_items_ = split.n_users, split.n_items
    t = time.perf_counter()
    m.prepare_fit(split)
    m.net_ = m.build(split.n_users, split.n_items)
    prep = time.perf_counter() - t
    opt = torch.optim.Adam(m.net_.parameters(), lr=m.lr)
    rng = np.random.default_rng(0)
    n_total = m.n_train_batches(split)
    n = min(args.batches or n_total, n_total)
    print(f"{m.name}: {len(m._samples)} samples, {n_total} batches/epoch, threads {torch.get_num_threads()}, "
          f"prepare_fit {prep:.2f}s")
    parts = dict(batch=0.0, forward=0.0, loss=0.0, backward=0.0, step=0.0)
    it = m.train_batches(split, rng)
    m.net_.train()

    def step(timed: bool):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        hidden = m.encode(batch["inp"])
        t2 = time.perf_counter()
        loss = m.next_item_loss(hidden, batch["tgt"], batch.get("neg"))
        extra = m.extra_loss(batch, hidden)
        if extra is not None:
            loss = loss + extra
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        t5 = time.perf_counter()
        if timed:
            for k, a, b in (("batch", t0, t1), ("forward", t1, t2), ("loss", t2, t3), ("backward", t3, t4),
                            ("step", t4, t5)):
                parts[k] += b - a

    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                step(False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return 0
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        step(True)
    total, cpu = time.perf_counter() - t, time.process_time() - c
    print(f"{n} batches in {total:.2f}s -> {total / n * n_total:.1f} s/epoch wall; "
          f"{cpu / n * n_total:.1f} CPU-s/epoch (process CPU time: the wall time on an idle machine "
          f"with one thread; with T threads, at best divided by T)")
    for k, v in parts.items():
        print(f"  {k:9s} {v / n * 1e3:7.1f} ms/batch  {100 * v / total:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
