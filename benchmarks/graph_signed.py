"""LSGRec against LightGCN on the same positive links (MovieLens, explicit ratings).

    python benchmarks/graph_signed.py [--data DIR ...] [--seeds 0 1 2] [--out FILE] [key=value ...]

Protocol (leakage-free and identical for both models):

1. Read the ratings with no threshold (every rating kept, one row per user-item pair) and split
   them once per seed, per user at random 80/10/10 (``split=random``, seeded); the split does not look at
   ratings.
2. Targets are the held-out *positive* links: validation and test rows with rating >= 4. Users
   with no positive held-out item are not evaluated. Ranking is over all items; the items a user
   rated in the visible part (training for validation; training + validation for test), whatever
   the rating, are excluded from the ranking, for both models.
3. LightGCN is fitted on the positive training links only (training rows with rating >= 4: the
   graph it would get with ``data.rating_threshold=4``, but without letting the threshold change
   the split); LSGRec on all training rows, from which it builds the same positive graph plus
   negative links (rating <= 2). Neither sees a validation or test rating.
4. Both use the same hyper-parameters (LSGRec's YAML defaults for the shared ones: 64 dims,
   3 layers, lr 1e-3, batch 2048, reg 1e-4), early stopping on validation Recall@20 of the same
   validation set, and the best-validation weights are evaluated on test.

``--variants neg_rank=push ...`` adds LSGRec runs with other settings (``--models`` limits
the two base runs). Reported: test Recall@20 / NDCG@20 / NDCG@10 on positive targets, and ``disliked@20``: the share of a
user's held-out *disliked* items (test rating <= 2) that land in the top 20 (lower is better;
over users with at least one), and the fit time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import polars as pl
import yaml

from recforge.data.prepare import prepare
from recforge.data.readers import load_raw
from recforge.data.split import Split, random_ratio
from recforge.evaluation.batch import build_evalset
from recforge.evaluation.evaluator import evaluate
from recforge.models.registry import create

POS, NEG = 4.0, 2.0


def evalsets(split: Split):
    r = pl.col("rating")
    valid = build_evalset(split.history("valid"), split.valid.filter(r >= POS), split.n_users, split.n_items, "valid")
    test = build_evalset(split.history("test"), split.test.filter(r >= POS), split.n_users, split.n_items, "test")
    disliked = build_evalset(split.history("test"), split.test.filter(r <= NEG), split.n_users, split.n_items, "test")
    return valid, test, disliked


def run(path: str, seed: int, overrides: dict, variants=(), models=("lightgcn", "lsgrec")) -> list[dict]:
    ds = prepare(load_raw(path))
    split = random_ratio(ds, (0.8, 0.1, 0.1), seed=seed)
    valid, test, disliked = evalsets(split)
    positive_only = Split(split.train.filter(pl.col("rating") >= POS), split.valid, split.test,
                          split.n_users, split.n_items, {**split.protocol, "train": "rating >= 4 only"})
    common = {"valid_metric": "recall@20", "seed": seed, "verbose": False, "batch_size": 2048, "lr": 1e-3,
              "patience": 5, "eval_every": 5, **overrides}
    rows = []
    runs = [("lightgcn", positive_only, {}), ("lsgrec", split, {})] + [
        (f"lsgrec[{v}]", split, dict(kv.split("=") for kv in v.split(","))) for v in variants]
    for label, fit_split, extra in [r for r in runs if r[0] in models or "[" in r[0]]:
        name = label.split("[")[0]
        model = create(name, **common, **{k: yaml.safe_load(v) for k, v in extra.items()})
        t = time.perf_counter()
        model.fit(fit_split, valid)
        fit_s = time.perf_counter() - t
        m = evaluate(model, test, ks=[10, 20], groups=False).metrics
        d = evaluate(model, disliked, ks=[20], groups=False).metrics
        row = {"data": Path(path).name, "seed": seed, "model": label, "recall@20": m["recall@20"],
               "ndcg@20": m["ndcg@20"], "ndcg@10": m["ndcg@10"], "disliked@20": d["recall@20"],
               "valid_recall@20": model.history_["best_metric"], "best_epoch": model.history_["best_epoch"],
               "epochs": len(model.history_["epochs"]), "fit_seconds": round(fit_s, 1), "test_users": len(test),
               "train_rows_seen": fit_split.train.height, "positive_links": int(model.graph_.nnz),
               "negative_links": int(model.neg_graph_.nnz) if name == "lsgrec" else 0}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value for both models")
    ap.add_argument("--data", nargs="+", default=["../shared/data/movielens-100k", "../shared/data/movielens-latest-small"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--variants", nargs="*", default=[],
                    help="extra LSGRec settings to compare, e.g. neg_rank=push or neg_rank=push,push_below=positive")
    ap.add_argument("--models", nargs="*", default=["lightgcn", "lsgrec"], help="which of the two base models to run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stdout)
    logging.getLogger("recforge.train").setLevel(logging.INFO)  # one line per epoch
    overrides = {k: yaml.safe_load(v) for k, _, v in (kv.partition("=") for kv in args.overrides)}
    rows = [r for s in args.seeds for path in args.data for r in run(path, s, overrides, args.variants, args.models)]  # seed by seed
    table = pl.DataFrame(rows).group_by("data", "model", maintain_order=True).agg(
        pl.len().alias("seeds"),
        *[pl.col(c).mean().round(4).alias(c) for c in ("recall@20", "ndcg@20", "ndcg@10", "disliked@20")],
        *[pl.col(c).std().round(4).alias(f"{c} sd") for c in ("recall@20", "ndcg@20")],
        pl.col("fit_seconds").mean().round(1))
    with pl.Config(tbl_cols=-1, tbl_width_chars=200):
        print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": table.to_dicts()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
