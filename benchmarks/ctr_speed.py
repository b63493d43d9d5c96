"""CTR speed and memory: DeepFM in RecForge and in FuxiCTR, on Frappe and on a synthetic 10M-row table.

    python benchmarks/ctr_speed.py [--rows 10000000] [--train-batches 100] [--frappe-epochs 3] [--threads 2]
                                   [--datasets frappe,synthetic] [--skip-fuxictr]
                                   [--out benchmarks/results/ctr_speed.json]

For each library and data set, one fresh process (RecForge in this environment, FuxiCTR in
``benchmarks/.venv-fuxictr``, see ``benchmarks/vs_fuxictr.py``) reads the files, encodes them,
trains DeepFM and scores the test part, timing each phase:

* **encode**: read the files, fit the vocabularies on the training part, map every part to ids.
  RecForge: ``recforge.ctr.prepare`` (in memory). FuxiCTR: ``FeatureProcessor`` + ``build_dataset``
  (which writes the encoded parts as Parquet) and, reported apart as **load**, ``RankDataLoader``
  reading them back into memory.
* **train**: DeepFM (embedding 16, MLP 400-400-400 with batch norm and dropout 0.2, batch 4096,
  Adam 1e-3, no regulariser): Frappe ``--frappe-epochs`` full epochs; the synthetic table
  ``--train-batches`` batches (the first ``batches x 4096`` training rows, one epoch over them).
  RecForge: ``fit`` with no validation part (seconds of its epoch loop; the batch-norm statistics
  pass after it is counted in ``fit_seconds`` only). FuxiCTR: its own ``train_step`` (forward,
  loss, backward, gradient clipping, Adam) over its own data loader, no validation.
* **score**: click probabilities of every test row (RecForge ``predict_proba``, batches of 16,384;
  FuxiCTR ``predict``, batches of 4,096: each library's default).

Rows per second of training and of scoring; peak resident memory: ``ru_maxrss`` of the worker
process as the parent's ``wait4`` reports it (the largest process of the worker's tree, so
FuxiCTR's vocabulary-counting helper processes are covered), plus the worker's own peak after
each phase. ``--threads`` PyTorch threads (and ``OMP_NUM_THREADS``) for both; FuxiCTR's data
loader in the training process (``num_workers=0``).

Data. Frappe: the re-split rows of ``benchmarks/vs_fuxictr.py`` (60,607 / 17,317 / 8,658), the
same CSV files for both. Synthetic: ``--rows`` rows (default 10M) of 20 categorical fields whose
vocabulary sizes are spread log-uniformly from 10 to 100,000, ids drawn from a Zipf law (exponent
1.1) with a fixed seed; the label is Bernoulli with ``logit = -1 + sum_f w_f[id_f] + <u[f19], v[f10]>
+ <u'[f15], v'[f5]>`` (per-id weights N(0, 0.3²), 4-dim interaction vectors N(0, 0.5²)), so the
oracle AUC of the test part (from the true probabilities) is printed beside the models'. Written
once as ``train``/``valid``/``test`` Parquet files (85 / 5 / 10%) under
``benchmarks/results/tmp/ctr_speed/``. The test AUC after so little training is a sanity check,
not a result.

Writes ``benchmarks/results/ctr_speed.json`` (relative paths) and prints a Markdown table with the
RecForge/FuxiCTR ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TMP = HERE / "results" / "tmp" / "ctr_speed"
N_FIELDS = 20
BATCH = 4096
MODEL = {"embedding_dim": 16, "hidden": [400, 400, 400], "dropout": 0.2, "batch_norm": True}


def rel(p) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---- data ----------------------------------------------------------------------------------------
def synthetic(rows: int, folder: Path, seed: int = 0) -> dict:
    """The synthetic table as train/valid/test Parquet files (written once per size)."""
    import polars as pl

    info_path = folder / "info.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    vocab = np.unique(np.round(np.logspace(1, 5, N_FIELDS)).astype(np.int64))
    assert len(vocab) == N_FIELDS
    cols, logit = {}, np.full(rows, -1.0)
    for f, v in enumerate(vocab):
        p = 1.0 / np.arange(1, v + 1) ** 1.1
        cdf = np.cumsum(p / p.sum())
        ids = np.minimum(np.searchsorted(cdf, rng.random(rows)), v - 1)
        ids = rng.permutation(v)[ids]  # frequency unrelated to the id's value
        cols[f"f{f:02d}"] = ids.astype(np.int32)
        logit += rng.normal(0.0, 0.3, v)[ids]
    for a, b in ((19, 10), (15, 5)):
        u = rng.normal(0.0, 0.5, (vocab[a], 4))
        w = rng.normal(0.0, 0.5, (vocab[b], 4))
        logit += np.einsum("nd,nd->n", u[cols[f"f{a:02d}"]], w[cols[f"f{b:02d}"]])
    prob = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(rows) < prob).astype(np.int8)
    df = pl.DataFrame({"label": label, **cols})
    a, b = int(rows * 0.85), int(rows * 0.90)
    folder.mkdir(parents=True, exist_ok=True)
    for name, lo, hi in (("train", 0, a), ("valid", a, b), ("test", b, rows)):
        df.slice(lo, hi - lo).write_parquet(folder / f"{name}.parquet")
    from recforge.evaluation.pointwise import auc

    info = {"rows": rows, "fields": N_FIELDS, "vocab": vocab.tolist(), "zipf_exponent": 1.1, "seed": seed,
            "positive_rate": round(float(label.mean()), 4), "parts": {"train": a, "valid": b - a, "test": rows - b},
            "oracle_test_auc": round(float(auc(label[b:], prob[b:])), 4),
            "generate_seconds": round(time.perf_counter() - t0, 1), "folder": rel(folder)}
    info_path.write_text(json.dumps(info, indent=1))
    return info


# ---- the RecForge worker (a fresh process per measurement) ----------------------------------------
def recforge_worker(job: dict) -> dict:
    import torch

    torch.set_num_threads(int(job["threads"]))
    from recforge import ctr
    from recforge.api import resolve
    from recforge.evaluation.pointwise import auc
    from recforge.models import registry

    t0 = time.perf_counter()
    res = {"library": "RecForge", "threads": int(job["threads"]), "torch": torch.__version__}
    fields = job["fields"]
    cfg = resolve("deepfm", job["data"], ["data.label=label", f"data.categorical=[{','.join(fields)}]"])
    te = time.perf_counter()
    split, cfg, _ = ctr.prepare(cfg)
    res["encode_seconds"] = round(time.perf_counter() - te, 2)
    res["load_seconds"] = 0.0
    res["peak_rss_mb_after_data"] = round(peak_mb(), 1)
    if job.get("train_rows") and job["train_rows"] < len(split.train):
        split.train = split.train.subset(np.arange(int(job["train_rows"])))
    params = {**MODEL, "epochs": int(job["epochs"]), "batch_size": BATCH, "lr": 1e-3, "patience": 2,
              "embedding_reg": 0.0, "threads": int(job["threads"]), "seed": 0, "verbose": False}
    est = registry.create("deepfm", **params)
    tf = time.perf_counter()
    est.fit(split, None)
    res["fit_seconds"] = round(time.perf_counter() - tf, 2)
    res["train_seconds"] = round(sum(e["train_seconds"] for e in est.history_["epochs"]), 2)
    res["train_rows"] = len(split.train) * int(job["epochs"])
    res["parameters"] = int(sum(p.numel() for p in est.net_.parameters()))
    res["peak_rss_mb_after_train"] = round(peak_mb(), 1)
    ts = time.perf_counter()
    p = est.predict_proba(split.test)[:, 0]
    res["score_seconds"] = round(time.perf_counter() - ts, 2)
    res["score_rows"] = len(split.test)
    res["test_auc"] = round(float(auc(split.test.y[:, 0], p)), 4)
    res["peak_rss_mb"] = round(peak_mb(), 1)
    res["total_seconds"] = round(time.perf_counter() - t0, 2)
    return res


def run_process(cmd: list[str], env: dict, log_path: Path, cwd: Path | None = None) -> float:
    """Run a worker; its peak resident memory (MB) from wait4."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(cwd) if cwd else None)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1]} failed (exit {proc.returncode}); see {rel(log_path)}")
    return ru.ru_maxrss / 1024.0


def run_recforge(name: str, data: Path, fields: list[str], epochs: int, train_rows: int | None, threads: int) -> dict:
    job = {"data": str(data), "fields": fields, "epochs": epochs, "train_rows": train_rows, "threads": threads}
    job_path, out_path = TMP / f"recforge_{name}.job.json", TMP / f"recforge_{name}.result.json"
    job_path.write_text(json.dumps(job))
    out_path.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    peak = run_process([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path), str(out_path)], env,
                       TMP / f"recforge_{name}.log")
    res = json.loads(out_path.read_text())
    res["peak_rss_mb_process"] = round(peak, 1)
    return res


def run_fuxictr(name: str, data: Path, fields: list[str], fmt: str, dtype: str, epochs: int, train_rows: int | None,
                threads: int) -> dict:
    import shutil

    sys.path.insert(0, str(HERE))
    import vs_fuxictr as V

    py, driver = V.ensure_venv(), V.write_driver()
    root = TMP / "fuxictr_data"
    shutil.rmtree(root / name, ignore_errors=True)  # FuxiCTR skips encoding when its feature map exists
    job = {"mode": "speed", "model": "deepfm", "seed": 0, "threads": threads, "batch_size": BATCH, "epochs": epochs,
           "train_rows": train_rows or 10**12,
           "params": {"embedding_dim": MODEL["embedding_dim"], "hidden_units": MODEL["hidden"],
                      "net_dropout": MODEL["dropout"], "embedding_regularizer": 0, "reduce_lr_on_plateau": True},
           "dataset_id": name, "data_root": str(root), "model_root": str(TMP / "fuxictr_checkpoints"),
           "data_format": fmt,
           "feature_cols": [{"name": fields, "active": True, "dtype": dtype, "type": "categorical"}],
           "label_col": {"name": "label", "dtype": "float"},
           "train_data": str(data / f"train.{fmt}"), "valid_data": str(data / f"valid.{fmt}"),
           "test_data": str(data / f"test.{fmt}"), "model_id": f"speed_{name}",
           "pred_path": str(TMP / f"fuxictr_{name}.pred.npy")}
    TMP.mkdir(parents=True, exist_ok=True)
    job_path, out_path = TMP / f"fuxictr_{name}.job.json", TMP / f"fuxictr_{name}.result.json"
    job_path.write_text(json.dumps(job))
    out_path.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    peak = run_process([str(py), str(driver), str(job_path), str(out_path)], env, TMP / f"fuxictr_{name}.log", cwd=TMP)
    res = json.loads(out_path.read_text())
    res["peak_rss_mb_process"] = round(peak, 1)
    from recforge.evaluation.pointwise import auc

    yp = np.load(job["pred_path"])
    res["test_auc"] = round(float(auc(yp[:, 0], yp[:, 1])), 4)
    Path(job["pred_path"]).unlink(missing_ok=True)
    shutil.rmtree(root / name, ignore_errors=True)
    return res


def rates(r: dict) -> dict:
    return {"prepare_seconds": round(r["encode_seconds"] + r.get("load_seconds", 0.0), 2),
            "train_rows_per_s": round(r["train_rows"] / r["train_seconds"]),
            "score_rows_per_s": round(r["score_rows"] / r["score_seconds"]),
            "peak_rss_mb": r["peak_rss_mb_process"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows of the synthetic table")
    ap.add_argument("--train-batches", type=int, default=100, help="synthetic: training batches of 4096 rows")
    ap.add_argument("--frappe-epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--datasets", default="frappe,synthetic")
    ap.add_argument("--frappe", default="../shared/data/frappe")
    ap.add_argument("--skip-fuxictr", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/ctr_speed.json")
    ap.add_argument("--worker", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = recforge_worker(json.loads(Path(args.worker[0]).read_text()))
        Path(args.worker[1]).write_text(json.dumps(res, indent=1))
        return 0
    t0 = time.perf_counter()
    TMP.mkdir(parents=True, exist_ok=True)
    datasets = [d for d in args.datasets.split(",") if d]
    results = {}
    for ds in datasets:
        if ds == "frappe":
            if not Path(args.frappe).exists():
                print(f"skipped frappe: {args.frappe} not found (the shared data folder sits beside the project)")
                continue
            sys.path.insert(0, str(HERE))
            import vs_fuxictr as V

            parts, _ = V.frappe_parts(args.frappe)
            folder = TMP / "frappe"
            V.write_csvs(parts, folder)
            fields, fmt, dtype, epochs, train_rows = V.FIELDS, "csv", "str", args.frappe_epochs, None
            info = {"rows": {k: v.height for k, v in parts.items()}, "folder": rel(folder)}
        elif ds == "synthetic":
            folder = TMP / f"synthetic_{args.rows}"
            info = synthetic(args.rows, folder)
            print(f"synthetic: {args.rows:,} rows, positive rate {info['positive_rate']}, oracle test AUC "
                  f"{info['oracle_test_auc']} ({rel(folder)})", flush=True)
            fields, fmt, dtype, epochs = [f"f{f:02d}" for f in range(N_FIELDS)], "parquet", "int", 1
            train_rows = args.train_batches * BATCH
        else:
            raise SystemExit(f"--datasets: unknown {ds!r}; choose frappe and/or synthetic")
        name = f"{ds}_{args.rows}" if ds == "synthetic" else ds
        entry = {"data": info, "epochs": epochs, "train_rows_limit": train_rows}
        ours = run_recforge(name, folder, fields, epochs, train_rows, args.threads)
        entry["recforge"] = {**ours, **rates(ours)}
        print(f"{ds}: RecForge {entry['recforge']}", flush=True)
        if not args.skip_fuxictr:
            theirs = run_fuxictr(name, folder, fields, fmt, dtype, epochs, train_rows, args.threads)
            entry["fuxictr"] = {**theirs, **rates(theirs)}
            print(f"{ds}: FuxiCTR {entry['fuxictr']}", flush=True)
            a, b = entry["recforge"], entry["fuxictr"]
            entry["ratio_recforge_over_fuxictr"] = {
                "prepare_seconds": round(a["prepare_seconds"] / b["prepare_seconds"], 2),
                "train_rows_per_s": round(a["train_rows_per_s"] / b["train_rows_per_s"], 2),
                "score_rows_per_s": round(a["score_rows_per_s"] / b["score_rows_per_s"], 2),
                "peak_rss_mb": round(a["peak_rss_mb"] / b["peak_rss_mb"], 2)}
        results[ds] = entry
    board = {"command": "python benchmarks/ctr_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
             "threads": args.threads, "model": {"name": "deepfm", **MODEL, "batch_size": BATCH}, "results": results,
             "minutes": round((time.perf_counter() - t0) / 60, 1), "load_average_at_end": os.getloadavg()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(board, indent=1))
    print(table(results))
    print(rel(out))
    return 0


def table(results: dict) -> str:
    lines = ["| data | library | read + encode s | train rows/s | score rows/s | peak RSS MB | test AUC |",
             "|---|---|---|---|---|---|---|"]
    for ds, e in results.items():
        for lib in ("recforge", "fuxictr"):
            if lib in e:
                r = e[lib]
                enc = f"{r['prepare_seconds']:.1f}"
                if r.get("load_seconds"):
                    enc += f" ({r['encode_seconds']:.1f} + {r['load_seconds']:.1f} load)"
                lines.append(f"| {ds} | {r['library']} | {enc} | {r['train_rows_per_s']:,} | {r['score_rows_per_s']:,} "
                             f"| {r['peak_rss_mb']:,.0f} | {r['test_auc']:.4f} |")
        if "ratio_recforge_over_fuxictr" in e:
            q = e["ratio_recforge_over_fuxictr"]
            lines.append(f"| {ds} | ratio RecForge / FuxiCTR | {q['prepare_seconds']:.2f} | "
                         f"{q['train_rows_per_s']:.2f} | {q['score_rows_per_s']:.2f} | {q['peak_rss_mb']:.2f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
