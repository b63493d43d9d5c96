"""The steps of ``benchmarks/gpu_check.sh``: a short check of the PyTorch models on a CUDA GPU.

    python benchmarks/gpu_check.py info
    python benchmarks/gpu_check.py sasrec --seed 0 --budget 120 --out FILE
    python benchmarks/gpu_check.py lightgcn --budget 210 --out FILE
    python benchmarks/gpu_check.py summary --out FILE PART.json ...

* ``info``: the GPU and the PyTorch build; exit status 3 with a one-line reason when there is no
  CUDA GPU (a CPU build of PyTorch, no driver, or no device).
* ``sasrec``: SASRec with its YAML defaults on Amazon Beauty (leave-one-out, full ranking,
  history excluded, early stopping on validation NDCG@10, as ``sequential_beauty.py``) with
  ``device=cuda``; training stops early (best weights kept) once ``--budget`` seconds of training
  have passed, and the result says so.
* ``lightgcn``: LightGCN on Gowalla (LightGCN's ``train.txt`` / ``test.txt``, as
  ``graph_gowalla.py``) with ``device=cuda``, ``lr=0.01``, ``batch_size=8192`` and a cosine
  learning-rate schedule over as many epochs as fit in ``--budget`` seconds of training: the
  number of epochs is fixed after the second epoch from its time, so the cosine reaches 0 at the end.
* ``summary``: the parts side by side with the CPU figures of BENCHMARKS.md, as one JSON file.

Every step prints one line per result and writes JSON; ``gpu_check.sh`` runs them in order with
time limits.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"

#: the CPU figures these runs are compared with (BENCHMARKS.md, 2026-11-22)
CPU_FIGURES = {
    "sasrec_beauty": {
        "test_ndcg@10": {"mean": 0.0562, "std": 0.0013}, "test_hr@10": {"mean": 0.0913, "std": 0.0024},
        "seconds_per_epoch_train": 18.1,
        "source": "BENCHMARKS.md, SASRec defaults on Beauty, seeds 0-2, one CPU thread (two jobs on 2 cores)",
    },
    "lightgcn_gowalla": {
        "recall@20": {"mean": 0.1622, "std": 0.0002}, "ndcg@20": {"mean": 0.1397, "std": 0.0001}, "epochs": 40,
        "seconds_per_epoch": {"min": 30, "max": 55},
        "published": {"recall@20": 0.1830, "ndcg@20": 0.1554},
        "source": "BENCHMARKS.md, LightGCN 3 layers, lr 1e-2, batch 8192, constant lr, 40 epochs, seeds 0-2, "
                  "one CPU thread",
    },
}


class Budget:
    """An epoch callback that stops training (the trainer keeps its weights) once ``seconds`` of
    training have passed, and optionally fixes the number of epochs of a schedule after epoch 2."""

    def __init__(self, model, seconds: float, plan_epochs: bool = False):
        self.model, self.seconds, self.plan_epochs = model, seconds, plan_epochs
        self.t0 = time.perf_counter()
        self.stopped = False
        self.planned: int | None = None

    def __call__(self, epoch: int, row: dict) -> None:
        elapsed = time.perf_counter() - self.t0
        if self.plan_epochs and epoch == 2:
            per_epoch = max(row["train_seconds"], 1e-3)
            self.planned = min(int(self.model.epochs), max(2, 2 + int((self.seconds - elapsed) / per_epoch)))
            self.model.epochs = self.planned  # the cosine schedule reads it at every batch
        if self.planned is not None and epoch >= self.planned:
            raise KeyboardInterrupt  # the planned last epoch: the trainer stops here, keeping the weights
        # with planned epochs the budget is a guard only (the estimate from epoch 2 may be a little short)
        if elapsed > self.seconds * (1.25 if self.planned is not None else 1.0):
            self.stopped = True
            raise KeyboardInterrupt


def _require_cuda(device: str):
    """torch, after checking that a CUDA device asked for is there (other devices: a dry run)."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU build of PyTorch" if torch.version.cuda is None else "no CUDA device or driver visible"
        sys.exit(f"gpu_check: no CUDA GPU ({build}, torch {torch.__version__}); nothing to check. "
                 "Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch.")
    return torch


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(torch, device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _data(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        sys.exit(f"gpu_check: data not found at {p}; pass its location (see benchmarks/gpu_check.sh --help)")
    return p


def cmd_info(args) -> int:
    import torch

    if not torch.cuda.is_available():
        build = ("this PyTorch is a CPU build (torch.version.cuda is None): install a CUDA build of PyTorch"
                 if torch.version.cuda is None else "PyTorch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES?)")
        print(f"gpu_check: no CUDA GPU on this machine: {build}; torch {torch.__version__}. Nothing to check.")
        return 3
    from recforge.training.device import describe, resolve_device

    dev = resolve_device("cuda")
    props = torch.cuda.get_device_properties(dev)
    info = {"gpu": describe(dev), "memory_gb": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported(),
            "python": platform.python_version(), "host": platform.node()}
    print("GPU:", json.dumps(info))
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=2))
    return 0


def cmd_sasrec(args) -> int:
    torch = _require_cuda(args.device)
    from recforge.data.prepare import prepare
    from recforge.data.readers import load_raw
    from recforge.data.split import leave_one_out
    from recforge.evaluation.batch import build_evalset
    from recforge.evaluation.evaluator import evaluate
    from recforge.models.registry import create

    t0 = time.perf_counter()
    split = leave_one_out(prepare(load_raw(_data(args.data))))
    valid = build_evalset(split.history("valid"), split.valid, split.n_users, split.n_items, "valid")
    test = build_evalset(split.history("test"), split.test, split.n_users, split.n_items, "test")
    data_s = time.perf_counter() - t0
    model = create("sasrec", verbose=False, seed=args.seed, device=args.device, precision=args.precision)
    budget = Budget(model, args.budget)
    model.callbacks = [budget]
    t1 = time.perf_counter()
    model.fit(split, valid)
    _sync(torch, model.device_)
    fit_s = time.perf_counter() - t1
    hist = model.history_
    train_s = [e["train_seconds"] for e in hist["epochs"]]
    valid_s = [e.get("valid_seconds", 0.0) for e in hist["epochs"]]
    tm = evaluate(model, test, ks=[10], groups=False).metrics
    res = {"model": "sasrec", "data": str(args.data), "seed": args.seed, "device": str(model.device_),
           "precision": model.precision, "params": model.get_params(),
           "epochs_run": len(hist["epochs"]), "best_epoch": hist["best_epoch"],
           "stopped_by_budget": budget.stopped, "budget_seconds": args.budget,
           "seconds_per_epoch_train": round(statistics.mean(train_s), 2) if train_s else None,
           "seconds_per_epoch_train_after_first": round(statistics.mean(train_s[1:]), 2) if len(train_s) > 1 else None,
           "seconds_per_validation": round(statistics.mean(valid_s), 2) if valid_s else None,
           "fit_seconds": round(fit_s, 1), "data_seconds": round(data_s, 1),
           "valid_ndcg@10": round(hist["best_metric"], 4),
           "test_ndcg@10": round(tm["ndcg@10"], 4), "test_hr@10": round(tm["hr@10"], 4),
           "peak_gpu_memory_mb": _peak_mb(torch, model.device_)}
    print(f"SASRec seed {args.seed} on {res['device']}: test NDCG@10 {res['test_ndcg@10']:.4f} HR@10 "
          f"{res['test_hr@10']:.4f}; {res['epochs_run']} epochs (best {res['best_epoch']}), "
          f"{res['seconds_per_epoch_train']} s/epoch training"
          + (" - STOPPED BY THE TIME BUDGET" if budget.stopped else ""), flush=True)
    Path(args.out).write_text(json.dumps(res | {"history": hist}, indent=2))
    return 0


def cmd_lightgcn(args) -> int:
    torch = _require_cuda(args.device)
    from recforge.data.prepare import prepare
    from recforge.data.readers import load_raw
    from recforge.data.split import presplit
    from recforge.evaluation.batch import build_evalset
    from recforge.evaluation.evaluator import evaluate
    from recforge.models.registry import create

    t0 = time.perf_counter()
    split = presplit(prepare(load_raw(_data(args.data))))
    test = build_evalset(split.history("test"), split.test, split.n_users, split.n_items, "test")
    data_s = time.perf_counter() - t0
    # epochs=1000 until the budget fixes the real number after epoch 2 (the cosine is ~1 until then)
    model = create("lightgcn", verbose=False, seed=args.seed, device=args.device, precision=args.precision,
                   lr=0.01, batch_size=8192, lr_schedule="cosine", epochs=1000)
    budget = Budget(model, args.budget, plan_epochs=True)
    model.callbacks = [budget]
    t1 = time.perf_counter()
    model.fit(split, None)
    _sync(torch, model.device_)
    fit_s = time.perf_counter() - t1
    hist = model.history_
    te = time.perf_counter()
    m = evaluate(model, test, ks=[20], groups=False).metrics
    eval_s = time.perf_counter() - te
    per_epoch = [e["train_seconds"] for e in hist["epochs"]]
    res = {"model": "lightgcn", "data": str(args.data), "seed": args.seed, "device": str(model.device_),
           "precision": model.precision, "params": model.get_params(),
           "epochs": len(per_epoch), "planned_epochs": budget.planned, "stopped_by_budget": budget.stopped,
           "budget_seconds": args.budget,
           "recall@20": round(m["recall@20"], 4), "ndcg@20": round(m["ndcg@20"], 4),
           "seconds_per_epoch": round(statistics.mean(per_epoch), 3) if per_epoch else None,
           "train_seconds": round(sum(per_epoch), 1), "fit_seconds": round(fit_s, 1),
           "test_eval_seconds": round(eval_s, 2), "data_seconds": round(data_s, 1),
           "peak_gpu_memory_mb": _peak_mb(torch, model.device_),
           "final_lr": hist["epochs"][-1].get("lr") if hist["epochs"] else None}
    print(f"LightGCN on {res['device']}: Recall@20 {res['recall@20']:.4f} NDCG@20 {res['ndcg@20']:.4f} after "
          f"{res['epochs']} epochs (cosine over {budget.planned}), {res['seconds_per_epoch']} s/epoch, test "
          f"evaluation {res['test_eval_seconds']} s" + (" - STOPPED BY THE TIME BUDGET" if budget.stopped else ""),
          flush=True)
    Path(args.out).write_text(json.dumps(res | {"history": hist}, indent=2))
    return 0


def _mean_std(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": round(statistics.mean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, "n": len(values)}


def cmd_summary(args) -> int:
    parts = {}
    for p in args.parts:
        path = Path(p)
        if path.exists():
            parts[path.stem] = json.loads(path.read_text())
        else:
            parts[path.stem] = {"missing": f"{path} was not written (the step failed or ran out of time)"}
    info = next((v for v in parts.values() if "gpu" in v), {})
    sas = [v for v in parts.values() if v.get("model") == "sasrec"]
    lgcn = next((v for v in parts.values() if v.get("model") == "lightgcn"), None)
    ev = next((v for v in parts.values() if "evaluate_s" in v), None)
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "gpu": info, "cpu_figures": CPU_FIGURES,
           "missing": [k for k, v in parts.items() if "missing" in v]}
    lines = [f"GPU check on {info.get('gpu', '?')} ({time.strftime('%Y-%m-%d')})"]
    if sas:
        rows = [{k: s.get(k) for k in ("seed", "test_ndcg@10", "test_hr@10", "epochs_run", "best_epoch",
                                        "seconds_per_epoch_train", "stopped_by_budget")} for s in sas]
        ndcg = _mean_std([s["test_ndcg@10"] for s in sas])
        hr = _mean_std([s["test_hr@10"] for s in sas])
        timed = [s["seconds_per_epoch_train"] for s in sas if s.get("seconds_per_epoch_train")]
        spe = statistics.mean(timed) if timed else float("nan")
        cpu = CPU_FIGURES["sasrec_beauty"]
        out["sasrec_beauty"] = {"seeds": rows, "test_ndcg@10": ndcg, "test_hr@10": hr,
                                "seconds_per_epoch_train": round(spe, 2) if timed else None,
                                "speedup_per_epoch_vs_cpu": (round(cpu["seconds_per_epoch_train"] / spe, 1)
                                                             if timed else None),
                                "ndcg@10_minus_cpu": round(ndcg["mean"] - cpu["test_ndcg@10"]["mean"], 4),
                                "seeds_ran_concurrently": bool(args.concurrent_seeds)}
        lines.append(f"  SASRec / Beauty, {len(sas)} seeds: test NDCG@10 {ndcg['mean']:.4f} ± {ndcg['std']:.4f} "
                     f"(CPU {cpu['test_ndcg@10']['mean']:.4f} ± {cpu['test_ndcg@10']['std']:.4f}), HR@10 "
                     f"{hr['mean']:.4f} (CPU {cpu['test_hr@10']['mean']:.4f}); {spe:.2f} s/epoch "
                     f"(CPU {cpu['seconds_per_epoch_train']}: x{cpu['seconds_per_epoch_train'] / spe:.1f})"
                     + (" [seeds ran concurrently on the one GPU]" if args.concurrent_seeds else "")
                     + (" [a seed STOPPED BY THE TIME BUDGET]" if any(s["stopped_by_budget"] for s in sas) else ""))
    if lgcn:
        cpu = CPU_FIGURES["lightgcn_gowalla"]
        out["lightgcn_gowalla"] = {k: lgcn.get(k) for k in ("recall@20", "ndcg@20", "epochs", "planned_epochs",
                                                            "seconds_per_epoch", "train_seconds",
                                                            "test_eval_seconds", "stopped_by_budget", "final_lr")}
        lines.append(f"  LightGCN / Gowalla, cosine, {lgcn['epochs']} epochs: Recall@20 {lgcn['recall@20']:.4f} "
                     f"NDCG@20 {lgcn['ndcg@20']:.4f} (CPU, 40 epochs constant lr: {cpu['recall@20']['mean']:.4f} / "
                     f"{cpu['ndcg@20']['mean']:.4f}; published {cpu['published']['recall@20']} / "
                     f"{cpu['published']['ndcg@20']}); {lgcn['seconds_per_epoch']} s/epoch "
                     f"(CPU {cpu['seconds_per_epoch']['min']}-{cpu['seconds_per_epoch']['max']})")
    if ev:
        out["eval_beauty"] = ev
        lines.append(f"  evaluation, Beauty ({ev['users']} users x {ev['items']} items) on {ev.get('device')}: "
                     f"{ev['evaluate_s']} s (bare scoring {ev['bare_scoring_s']} s; CPU figure 3.45 s)")
    for k in out["missing"]:
        lines.append(f"  {k}: MISSING ({parts[k]['missing']})")
    out["summary"] = lines
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"written: {args.out}")
    return 0 if not out["missing"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info")
    i.add_argument("--out", default=None)
    for name, data in (("sasrec", SHARED / "amazon-beauty" / "Beauty.txt"), ("lightgcn", SHARED / "gowalla")):
        p = sub.add_parser(name)
        p.add_argument("--data", default=str(data))
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--budget", type=float, required=True, help="seconds of training at most")
        p.add_argument("--device", default="cuda")
        p.add_argument("--precision", default="fp32")
        p.add_argument("--out", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--out", required=True)
    s.add_argument("--concurrent-seeds", action="store_true")
    s.add_argument("parts", nargs="+")
    args = ap.parse_args(argv)

    def _stop(signum, frame):  # the shell's time limit: stop training cleanly, keep the weights, still report
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # also where a background shell started us with SIGINT ignored
    return {"info": cmd_info, "sasrec": cmd_sasrec, "lightgcn": cmd_lightgcn, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
