"""Multi-task benchmark on census-income: Shared-Bottom, MMoE and PLE (Adam and AdaTask) over seeds.

    python benchmarks/mtl_census.py [--data ../shared/data/census-income/census_income_test.csv.gz]
        [--models sharedbottom,mmoe,ple] [--optimizers adam,adatask] [--seeds 0,1,2] [--epochs 5]
        [--out benchmarks/results/mtl_census.json]

Data: the test file of the UCI census-income (KDD) data set used by the MMoE paper (99,762 rows;
the training file is not in the shared folder), re-split at random 8:1:1 with a fixed split seed
(0, the same for every model and run seed). Tasks as in the MMoE paper's census-income setup:
``income`` (income over 50K) and ``marital`` (marital status "Never married"); the marital-status
column is therefore not a feature, nor is ``instance_weight`` (a sampling weight). Seven columns
are numeric (standardised), the other 32 categorical.

Every model runs with its packaged defaults (``src/recforge/configs/models/<name>.yaml``) except
``epochs`` (a cap, ``--epochs``), early stopping on the mean validation AUC of the two tasks, one
PyTorch thread, on the CPU. Prints a Markdown table (test AUC per task, mean ± sample standard
deviation over the seeds; best epoch; seconds) and writes the figures to a JSON file (paths
relative to the working folder).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recforge.ctr import CTRSplit
from recforge.data.ctr_readers import CTRSource, split_rows
from recforge.data.features import FeatureEncoder, FeatureSpec, Schema
from recforge.evaluation.pointwise import auc
from recforge.models import registry

NUMERIC = ["age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp", "weeks_worked"]
DROPPED = ["instance_weight", "income_50k", "marital_stat"]
LABELS = ["income", "marital"]


def rel(p) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)


def load_census(path: str | Path) -> tuple[pl.DataFrame, Schema]:
    """The table with the two 0/1 labels and its schema (every other column a feature)."""
    df = pl.read_csv(path, infer_schema=False)
    df = df.with_columns(pl.col(c).str.strip_chars() for c in df.columns)
    df = df.with_columns(
        pl.col("income_50k").str.starts_with("50000+").cast(pl.Int64).alias("income"),
        (pl.col("marital_stat") == "Never married").cast(pl.Int64).alias("marital"),
    )
    features = [c for c in df.columns if c not in DROPPED + LABELS]
    specs = [FeatureSpec(c, "numeric") if c in NUMERIC else FeatureSpec(c) for c in features]
    return df.select(features + LABELS), Schema(specs, LABELS)


def census_split(path: str | Path, seed: int = 0) -> CTRSplit:
    df, schema = load_census(path)
    parts, rec = split_rows(CTRSource({"all": df}, schema, "table"),
                            {"method": "random", "ratios": [0.8, 0.1, 0.1], "seed": seed})
    enc = FeatureEncoder(schema).fit(parts["train"])
    return CTRSplit(*(enc.transform(parts[k]) for k in ("train", "valid", "test")), enc, rec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/census-income/census_income_test.csv.gz")
    ap.add_argument("--models", default="sharedbottom,mmoe,ple")
    ap.add_argument("--optimizers", default="adam,adatask")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/mtl_census.json")
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        raise SystemExit(f"{args.data}: census-income is not there (the shared data folder sits beside the project)")
    torch.set_num_threads(1)
    split = census_split(args.data)
    seeds = [int(s) for s in args.seeds.split(",")]
    prevalence = {lab: float(split.test.y[:, j].mean()) for j, lab in enumerate(LABELS)}
    print(f"split {split.protocol['rows']}; positive share in test: {prevalence}", flush=True)
    results, t0 = [], time.perf_counter()
    for name in [m for m in args.models.split(",") if m]:
        for opt in [o for o in args.optimizers.split(",") if o]:
            runs = []
            for s in seeds:
                model = registry.create(name, seed=s, epochs=args.epochs, optimizer=opt, threads=1, verbose=False,
                                        device="cpu")
                tf = time.perf_counter()
                model.fit(split, split.valid)
                p = model.predict_proba(split.test)
                runs.append({"seed": s, "best_epoch": model.history_["best_epoch"],
                             "seconds": round(time.perf_counter() - tf, 1),
                             **{lab: auc(split.test.y[:, j], p[:, j]) for j, lab in enumerate(LABELS)}})
                print(f"{name} {opt} seed {s}: " + ", ".join(f"{k}={v:.4f}" if k in LABELS else f"{k}={v}"
                                                               for k, v in runs[-1].items() if k != "seed"), flush=True)
            summary = {lab: {"mean": float(np.mean([r[lab] for r in runs])),
                             "std": float(np.std([r[lab] for r in runs], ddof=1)) if len(runs) > 1 else 0.0}
                       for lab in LABELS}
            results.append({"model": name, "optimizer": opt, "test_auc": summary, "runs": runs})
    print("\n| model | optimizer | income AUC | marital AUC | best epochs | s/run |\n|---|---|---|---|---|---|")
    for r in results:
        a = r["test_auc"]
        print(f"| {r['model']} | {r['optimizer']} | {a['income']['mean']:.4f} ± {a['income']['std']:.4f} | "
              f"{a['marital']['mean']:.4f} ± {a['marital']['std']:.4f} | "
              f"{','.join(str(x['best_epoch']) for x in r['runs'])} | "
              f"{np.mean([x['seconds'] for x in r['runs']]):.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "data": rel(args.data), "split": {"method": "random", "ratios": [0.8, 0.1, 0.1], "seed": 0,
                                          "rows": split.protocol["rows"]},
        "tasks": {"income": "income_50k is 50000+", "marital": "marital_stat is Never married"},
        "test_positive_share": prevalence, "epochs_cap": args.epochs, "seeds": seeds, "threads": 1,
        "command": "python benchmarks/mtl_census.py " + " ".join(argv or []),
        "results": results, "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    print(f"wrote {rel(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
