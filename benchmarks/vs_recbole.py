"""RecForge beside RecBole 1.2.1, in one run on this machine: SASRec on Amazon Beauty, LightGCN on Gowalla.

    python benchmarks/vs_recbole.py [--threads 2] [--seed 0] [--recbole-budget 2400] [--skip-recforge]
    python benchmarks/vs_recbole.py --model lightgcn [--threads 1] [--epochs 3]

**SASRec** (default).
Both train the same architecture (2 blocks, 1 head, hidden 64, feed-forward 256, GELU, dropout
0.2, max length 50, full-softmax cross-entropy, Adam 1e-3) with early stopping on validation
NDCG@10 (patience 10) and the same leave-one-out, full-ranking protocol (history excluded).
Each keeps its own default batch size (RecForge 128 sequences, RecBole 2048 samples) and its own
way of cutting sequences: RecBole always trains on every prefix of every sequence; RecForge
trains each sequence once with every position as a target (``subseq=none``).

RecBole runs in its own virtual environment, ``benchmarks/.venv-recbole`` (created on first use:
``torch==2.13.0`` CPU, ``recbole==1.2.1``, ``numpy<2``, ``pandas<2.2``, ``scipy<1.12``, ``setuptools<70``), with
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` so that it can reload its checkpoint; it is never a
dependency of RecForge. ``--recbole-budget`` (seconds) bounds RecBole's training: when reached,
the best checkpoint so far is tested and the result is marked ``stopped_by_budget``.

**LightGCN** (``--model lightgcn``): seconds per training epoch and peak resident memory of each
process for a fixed number of epochs (``--epochs``) on Gowalla's LightGCN split (3 layers, 64
dims, BPR with one uniform negative, reg 1e-4, lr 1e-3), RecBole at its default batch of 2048
pairs and RecForge at the same batch and at its default (8192); recall/NDCG@20 of the final
models on the test split are printed as a sanity check, not as converged accuracy. Writes
``benchmarks/results/vs_recbole_lightgcn.json``.

Prints and writes ``benchmarks/results/vs_recbole_sasrec.json``: seconds per epoch, wall time to
the best validation NDCG@10, test HR@10 / NDCG@10 of both, and the speed ratios: per epoch, to
each library's best validation point, and to RecBole's best validation NDCG@10 (the first RecForge
epoch whose validation NDCG@10 is at least as high; same validation users and metric).
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

import polars as pl

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-recbole"
TMP = HERE / "results" / "tmp" / "recbole"
DATA = Path("../shared/data/amazon-beauty/Beauty.txt")

ARCH = {"n_layers": 2, "n_heads": 1, "hidden": 64, "inner": 256, "dropout": 0.2, "max_len": 50, "loss": "ce",
        "lr": 0.001, "patience": 10}


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    if stamp.exists():
        return py
    print(f"creating {VENV} (RecBole 1.2.1 and its pins) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    # torch first (the CPU build), then RecBole with the pins it needs on current Python
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    # scipy<1.12: RecBole's LightGCN builds its adjacency through dok_matrix._update, removed in 1.12
    subprocess.run(pip + ["recbole==1.2.1", "numpy<2", "pandas<2.2", "scipy<1.12"], check=True)
    subprocess.run(pip + ["setuptools<70"], check=True)  # RecBole imports pkg_resources-era APIs
    stamp.touch()
    return py


def write_atomic(split_data, folder: Path) -> None:
    """The prepared interactions as a RecBole ``.inter`` file; the timestamp is the position in
    the user's sequence, so RecBole's time-ordered leave-one-out equals ours."""
    from recforge.data.dataset import sort_interactions
    from recforge.data.schema import ITEM, USER

    df = sort_interactions(split_data.interactions)
    folder.mkdir(parents=True, exist_ok=True)
    (df.select(pl.col(USER).alias("user_id:token"), pl.col(ITEM).alias("item_id:token"),
               pl.int_range(pl.len()).cast(pl.Float64).alias("timestamp:float"))
     .write_csv(folder / "beauty.inter", separator="\t"))


def run_recforge(threads: int, seed: int) -> dict:
    import recforge

    overrides = [f"{k}={v}" for k, v in ARCH.items()] + [f"threads={threads}", f"seed={seed}"]
    t0 = time.perf_counter()
    run = recforge.train("sasrec", str(DATA), overrides, out=str(TMP / "runs"), verbose=False)
    wall = time.perf_counter() - t0
    hist = json.loads((run.path / "history.json").read_text())
    elapsed, at = 0.0, {}
    for e in hist["epochs"]:
        elapsed += e["train_seconds"] + e.get("valid_seconds", 0.0)
        at[e["epoch"]] = elapsed
    train_s = [e["train_seconds"] for e in hist["epochs"]]
    return {"library": f"RecForge {recforge.__version__}", "threads": threads,
            "epochs": hist["epochs"], "best_epoch": hist["best_epoch"], "best_valid": hist["best_metric"],
            "seconds_to_best": round(at[hist["best_epoch"]], 1), "fit_seconds": round(hist["seconds"], 1),
            "run_wall_seconds": round(wall, 1),
            "seconds_per_epoch": round(sum(train_s) / len(train_s), 2),
            "test": {"hit@10": run.metrics["test"]["hr@10"], "ndcg@10": run.metrics["test"]["ndcg@10"]},
            "elapsed_by_epoch": {str(k): round(v, 1) for k, v in at.items()}, "run": str(run.path)}


def run_recbole(threads: int, seed: int, budget: float) -> dict:
    py = ensure_venv()
    ds_dir = TMP / "data"
    job = {
        "model": "SASRec", "dataset": "beauty", "threads": threads, "budget_seconds": budget,
        "config": {
            "data_path": str(ds_dir), "checkpoint_dir": str(TMP / "saved"), "seed": seed, "reproducibility": True,
            "device": "cpu", "use_gpu": False, "show_progress": False, "log_wandb": False, "save_dataset": False,
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "n_layers": ARCH["n_layers"], "n_heads": ARCH["n_heads"], "hidden_size": ARCH["hidden"],
            "inner_size": ARCH["inner"], "hidden_dropout_prob": ARCH["dropout"], "attn_dropout_prob": ARCH["dropout"],
            "hidden_act": "gelu", "MAX_ITEM_LIST_LENGTH": ARCH["max_len"], "loss_type": "CE",
            "train_neg_sample_args": None, "learning_rate": ARCH["lr"], "stopping_step": ARCH["patience"],
            "epochs": 300, "eval_step": 1,
            "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
            "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
        },
    }
    return run_worker(py, job, threads)


def run_worker(py: Path, job: dict, threads: int) -> dict:
    job_path, out_path = TMP / "job.json", TMP / "recbole_result.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run([str(py), str(HERE / "recbole_worker.py"), str(job_path), str(out_path)], check=True, env=env,
                   cwd=str(TMP))
    res = json.loads(out_path.read_text())
    res["run_wall_seconds"] = round(time.perf_counter() - t0, 1)
    train_s = [e["train_seconds"] for e in res["epochs"]]
    res["seconds_per_epoch"] = round(sum(train_s) / len(train_s), 2)
    return res


GOWALLA = Path("../shared/data/gowalla")


def lightgcn(threads: int, seed: int, epochs: int) -> dict:
    """Seconds per epoch and peak memory of both LightGCNs on Gowalla, ``epochs`` epochs each."""
    from recforge.data.prepare import prepare
    from recforge.data.readers import load_raw
    from recforge.data.schema import ITEM, SPLIT, USER

    py = ensure_venv()
    ds = prepare(load_raw(str(GOWALLA)))
    folder = TMP / "gowalla-data" / "gowalla"
    folder.mkdir(parents=True, exist_ok=True)
    df = ds.interactions
    for part, rows in (("train", df.filter(df[SPLIT] == "train")), ("test", df.filter(df[SPLIT] == "test"))):
        rows.select(USER, ITEM).rename({USER: "user_id:token", ITEM: "item_id:token"}).write_csv(
            folder / f"gowalla.{part}.inter", separator="\t")
    # RecBole reads a pre-split dataset as train / valid / test files: the test file doubles as the
    # (unused until the last epoch) validation file, since LightGCN's split has none
    (folder / "gowalla.valid.inter").write_text((folder / "gowalla.test.inter").read_text())
    job = {
        "model": "LightGCN", "dataset": "gowalla", "threads": threads, "budget_seconds": 1e9,
        "config": {
            "data_path": str(folder.parent), "checkpoint_dir": str(TMP / "saved"), "seed": seed,
            "reproducibility": True, "device": "cpu", "use_gpu": False, "show_progress": False, "log_wandb": False,
            "save_dataset": False, "load_col": {"inter": ["user_id", "item_id"]},
            "benchmark_filename": ["train", "valid", "test"],
            "embedding_size": 64, "n_layers": 3, "reg_weight": 1e-4, "learning_rate": 1e-3,
            "train_batch_size": 2048, "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1},
            "epochs": epochs, "eval_step": epochs, "stopping_step": 10,
            "eval_args": {"group_by": "user", "order": "RO", "mode": "full"},
            "metrics": ["Recall", "NDCG"], "topk": [20], "valid_metric": "Recall@20", "eval_batch_size": 4096,
        },
    }
    theirs = run_worker(py, job, threads)
    ours = {}
    for batch in (2048, 8192):
        out = TMP / f"recforge_lightgcn_{batch}.json"
        subprocess.run([sys.executable, str(HERE / "graph_gowalla.py"), "lightgcn", f"threads={threads}",
                        f"batch_size={batch}", "lr=0.001", f"seed={seed}", "--epochs", str(epochs), "--out", str(out)],
                       check=True)
        ours[str(batch)] = json.loads(out.read_text())
    res = {"recbole": {k: theirs[k] for k in ("library", "threads", "seconds_per_epoch", "peak_rss_mb", "test",
                                              "prep_seconds", "epochs")},
           "recforge": {b: {k: r[k] for k in ("seconds_per_epoch", "peak_rss_mb", "recall@20", "ndcg@20", "epochs")}
                        for b, r in ours.items()}}
    res["epoch_speedup_same_batch"] = round(theirs["seconds_per_epoch"] / ours["2048"]["seconds_per_epoch"], 1)
    res["epoch_speedup_default_batch"] = round(theirs["seconds_per_epoch"] / ours["8192"]["seconds_per_epoch"], 1)
    print(f"RecBole LightGCN: {theirs['seconds_per_epoch']} s/epoch, peak {theirs['peak_rss_mb']:.0f} MB; "
          f"RecForge batch 2048: {ours['2048']['seconds_per_epoch']} s/epoch, peak {ours['2048']['peak_rss_mb']:.0f} MB "
          f"({res['epoch_speedup_same_batch']}x); batch 8192: {ours['8192']['seconds_per_epoch']} s/epoch "
          f"({res['epoch_speedup_default_batch']}x)", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["sasrec", "lightgcn"], default="sasrec")
    ap.add_argument("--epochs", type=int, default=3, help="lightgcn: epochs of each library")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recbole-budget", type=float, default=2400.0, help="seconds of RecBole training at most")
    ap.add_argument("--skip-recforge", action="store_true", help="reuse the RecForge result of the last run")
    args = ap.parse_args()
    meta = {"command": "python benchmarks/vs_recbole.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    if args.model == "lightgcn":
        if not GOWALLA.exists():
            print(f"skipped: {GOWALLA} not found (the shared data folder sits beside the project)")
            return 0
        res = meta | lightgcn(args.threads, args.seed, args.epochs) | {"load_average_at_end": os.getloadavg()}
        (HERE / "results" / "vs_recbole_lightgcn.json").write_text(json.dumps(res, indent=1))
        return 0
    if not DATA.exists():
        print(f"skipped: {DATA} not found (the shared data folder sits beside the project)")
        return 0
    out = HERE / "results" / "vs_recbole_sasrec.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    from recforge.data.prepare import prepare
    from recforge.data.readers import load_raw

    write_atomic(prepare(load_raw(str(DATA))), TMP / "data" / "beauty")
    if args.skip_recforge and "recforge" in previous:
        ours = previous["recforge"]
    else:
        ours = run_recforge(args.threads, args.seed)
        print(f"RecForge: {ours['seconds_per_epoch']} s/epoch, best valid at epoch {ours['best_epoch']} after "
              f"{ours['seconds_to_best']} s, test NDCG@10 {ours['test']['ndcg@10']:.4f}", flush=True)
    theirs = run_recbole(args.threads, args.seed, args.recbole_budget)
    print(f"RecBole:  {theirs['seconds_per_epoch']} s/epoch, best valid at epoch {theirs['best_epoch']} after "
          f"{theirs['seconds_to_best']} s, test NDCG@10 {theirs['test']['ndcg@10']:.4f}"
          + (" (stopped by the time budget)" if theirs["stopped_by_budget"] else ""), flush=True)
    res = meta | {
        "load_average_at_end": os.getloadavg(),
        "architecture": ARCH, "recforge": ours, "recbole": theirs,
        "epoch_speedup": round(theirs["seconds_per_epoch"] / ours["seconds_per_epoch"], 1),
        "time_to_best_speedup": round(theirs["seconds_to_best"] / ours["seconds_to_best"], 1),
    }
    # the same validation set and metric on both sides: when did RecForge first reach RecBole's best?
    reached = [e for e in ours["epochs"] if e.get("ndcg@10", -1.0) >= theirs["best_valid"]]
    if reached:
        t_ours = ours["elapsed_by_epoch"][str(reached[0]["epoch"])]
        res["recforge_seconds_to_recbole_best_valid"] = t_ours
        res["speedup_to_same_valid_ndcg"] = round(theirs["seconds_to_best"] / t_ours, 1)
    print(f"per epoch: {res['epoch_speedup']}x faster; to each one's best validation point: "
          f"{res['time_to_best_speedup']}x; to RecBole's best validation NDCG@10: "
          f"{res.get('speedup_to_same_valid_ndcg', 'not reached')}x")
    out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
