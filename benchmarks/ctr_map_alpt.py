"""MAP pre-training and ALPT int8 embeddings on Frappe: DeepFM and DCN-V2, plain against each.

    python benchmarks/ctr_map_alpt.py [--data ../shared/data/frappe] [--models deepfm,dcnv2]
        [--variants plain,mfp,rfd,alpt8] [--seeds 0,1,2] [--pretrain-epochs 20]
        [--out benchmarks/results/ctr_map_alpt.json] [--runs runs/ctr_map_alpt] [--tests-only]

The data and protocol of ``benchmarks/ctr_frappe.py`` (its run overrides: one thread, split seed 0,
the run seed; its path helper): the validation and test files of the standard Frappe split pooled
and re-split 7:2:1, every held-out row scored pointwise, early stopping on the validation AUC. Each
model runs with its packaged defaults, and in four variants:

* ``plain``: as in ``ctr_frappe.py``;
* ``mfp`` / ``rfd``: MAP pre-training (:mod:`recforge.models.ctr.map`) of the embeddings and the
  interaction layers on the training rows for ``--pretrain-epochs`` epochs (mask ratio 0.3, 25
  negatives for MFP, the model's learning rate and batch size), then the usual CTR training;
* ``alpt8``: int8 embedding tables trained by ALPT (:mod:`recforge.models.ctr.alpt`), one step
  size per row.

Prints a Markdown table (test AUC and log-loss, mean ± sample standard deviation over the seeds;
best epoch; seconds per training epoch; pre-training seconds; embedding bytes as float32 and as
stored) and writes every run's figures and folder to a JSON file (paths relative to the working
folder), with the paired bootstrap of each variant against ``plain`` (the seeds' runs on each side,
resampling users: ``recforge compare``; ``diff`` is variant − plain). ``--tests-only`` recomputes
only the paired tests of an existing JSON file from its run folders. Run it with
``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import recforge
from recforge.api import mean_std

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ctr_frappe import rel  # noqa: E402  (the Frappe benchmark's path helper)

VARIANTS = {"plain": [], "mfp": ["pretrain={{method: mfp, epochs: {e}}}"], "rfd": ["pretrain={{method: rfd, epochs: {e}}}"],
            "alpt8": ["embedding_bits=8"]}


def run_one(model: str, variant: str, seed: int, args) -> dict:
    overrides = ["threads=1", "split.seed=0", f"seed={seed}"]  # the run overrides of ctr_frappe.py
    overrides += [o.format(e=args.pretrain_epochs) for o in VARIANTS[variant]]
    run = recforge.train(model, data=args.data, overrides=overrides, out=args.runs, verbose=False)
    met = run.metrics
    prot = met["protocol"]
    history = json.loads((run.path / "history.json").read_text())
    pre = history.get("pretrain")
    size = (prot.get("alpt") or {}).get("embedding_bytes") or recforge_bytes(run)
    return {"seed": seed, "run": rel(run.path), "auc": met["test"]["auc"], "logloss": met["test"]["logloss"],
            "valid_auc": met["valid"]["auc"], "best_epoch": met["training"]["best_epoch"],
            "epochs_run": len(history["epochs"]), "seconds_per_epoch": met["timing"]["seconds_per_epoch"],
            "fit_seconds": met["timing"]["fit_seconds"], "pretrain_seconds": pre["seconds"] if pre else 0.0,
            "pretrain_loss": [round(e["loss"], 5) for e in pre["epochs"]] if pre else None,
            "embedding_bytes_fp32": size["fp32"], "embedding_bytes_stored": size["stored"]}


def recforge_bytes(run) -> dict:
    """Embedding bytes of a float32 run, read from its saved model."""
    from recforge.models.base import Recommender

    return Recommender.load(run.path / "model", device="cpu").embedding_bytes()


def paired_tests(rows: list[dict]) -> list[dict]:
    """Each variant against ``plain`` of the same model: paired bootstrap over users of the test
    predictions (all seeds on each side)."""
    from recforge.ctr import compare
    from recforge.runs import Run

    plain = {r["model"]: [Run.load(x["run"]) for x in r["runs"]] for r in rows if r["variant"] == "plain"}
    out = []
    for r in rows:
        if r["variant"] == "plain" or r["model"] not in plain:
            continue
        res = compare(plain[r["model"]], [Run.load(x["run"]) for x in r["runs"]])
        for b in res["bootstrap"]:
            out.append({"model": r["model"], "variant": r["variant"], "vs": "plain", "metric": b["metric"],
                        "diff": b["diff"], "ci_low": b["ci_low"], "ci_high": b["ci_high"], "p": b["bootstrap_p"],
                        "unit": b["unit"], "n_units": b["n_units"], "n_boot": b["n_boot"]})
    return out


def print_tests(tests: list[dict]) -> None:
    print("| model | variant − plain | AUC diff [95%] | p | log-loss diff [95%] | p |")
    print("|---|---|---|---|---|---|")
    for i in range(0, len(tests), 2):
        a, ll = tests[i], tests[i + 1]
        print(f"| {a['model']} | {a['variant']} | {a['diff']:+.4f} [{a['ci_low']:+.4f}, {a['ci_high']:+.4f}] | {a['p']:.3f} | "
              f"{ll['diff']:+.4f} [{ll['ci_low']:+.4f}, {ll['ci_high']:+.4f}] | {ll['p']:.3f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/frappe")
    ap.add_argument("--models", default="deepfm,dcnv2")
    ap.add_argument("--variants", default="plain,mfp,rfd,alpt8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/ctr_map_alpt.json")
    ap.add_argument("--runs", default="runs/ctr_map_alpt")
    ap.add_argument("--tests-only", action="store_true")
    args = ap.parse_args(argv)
    if args.tests_only:
        board = json.loads(Path(args.out).read_text())
        board["paired"] = paired_tests(board["rows"])
        Path(args.out).write_text(json.dumps(board, indent=2))
        print_tests(board["paired"])
        return 0
    if not Path(args.data).exists():
        raise SystemExit(f"{args.data}: Frappe is not there (the shared data folder sits beside the project)")
    torch.set_num_threads(1)
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, t0 = [], time.perf_counter()
    for m in models:
        for v in variants:
            per_seed = []
            for s in seeds:
                r = run_one(m, v, s, args)
                per_seed.append(r)
                print(f"  {m:<7} {v:<6} seed {s}: test AUC {r['auc']:.4f}  logloss {r['logloss']:.4f}  best epoch "
                      f"{r['best_epoch']}  {r['seconds_per_epoch']:.2f} s/epoch  pretrain {r['pretrain_seconds']:.0f} s",
                      file=sys.stderr, flush=True)
            rows.append({"model": m, "variant": v, "n_seeds": len(seeds),
                         **{k: mean_std([r[k] for r in per_seed]) for k in ("auc", "logloss", "valid_auc", "best_epoch",
                                                                           "seconds_per_epoch", "pretrain_seconds")},
                         "embedding_bytes_fp32": per_seed[0]["embedding_bytes_fp32"],
                         "embedding_bytes_stored": per_seed[0]["embedding_bytes_stored"], "runs": per_seed})
    protocol = json.loads((Path(rows[0]["runs"][0]["run"]) / "metrics.json").read_text())["protocol"]
    board = {"data": args.data, "split": protocol["split"], "source": protocol["data"], "seeds": seeds, "threads": 1,
             "pretrain": {"epochs": args.pretrain_epochs, "mask_ratio": 0.3, "negatives": 25,
                          "lr": "the model's", "batch_size": "the model's"},
             "alpt": {"bits": 8, "step": "row"}, "rows": rows, "paired": paired_tests(rows),
             "minutes": round((time.perf_counter() - t0) / 60, 1),
             "note": ("protocol of benchmarks/ctr_frappe.py: validation + test files of the standard split pooled and "
                      "re-split 7:2:1 (split seed 0), every held-out row scored; mean ± sample std over the seeds")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(board, indent=2))
    print("| model | variant | test AUC | test logloss | best epoch | s/epoch | pretrain s | embedding bytes (fp32 → stored) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['auc']['mean']:.4f} ± {r['auc']['std']:.4f} | "
              f"{r['logloss']['mean']:.4f} ± {r['logloss']['std']:.4f} | {r['best_epoch']['mean']:.1f} | "
              f"{r['seconds_per_epoch']['mean']:.2f} | {r['pretrain_seconds']['mean']:.0f} | "
              f"{r['embedding_bytes_fp32']:,} → {r['embedding_bytes_stored']:,} |")
    print_tests(board["paired"])
    print(rel(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
