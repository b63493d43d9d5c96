"""How close HetSGFormer's ILLE placement of new items comes to retraining with them, and what it costs.

    python benchmarks/ille_retrain.py [--data PATH] [--items 50] [--epochs 200] [--seed 0]

On the data's leave-one-out split, ``--items`` items with at least 5 training users (drawn with the
seed, spread over popularity) are made *new*: every training row of theirs is removed, and HetSGFormer
(model defaults, ``epochs`` capped, one thread) is fitted without them (model A). Each new item is then
placed by ILLE from the training users who had it (``place_items``: what serving does when the item
first arrives as events), timed per item. Model B, the full retrain, is fitted on the whole training
part with the same settings. Measures, per new item, against B:

* neighbourhood: overlap of the 10 nearest items (cosine over the item table) of the ILLE placement in
  A and of the item in B (the two models' spaces are not aligned, their neighbourhoods are comparable);
* ranking: for each user who had the item, its rank among all items by the user's score (nothing
  excluded; rank 1 is best), in A with the placed item and in B; the mean of 1/rank over those users.

Baselines placed in A the same way: the mean item vector, and a random direction at the typical item norm
(mean over 20 draws).
B saw those pairs in training, so its figures are the ceiling. Writes ``benchmarks/results/ille_retrain.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def neighbours(vec: np.ndarray, table: np.ndarray, exclude: int, k: int = 10) -> set:
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    s = unit @ (vec / max(np.linalg.norm(vec), 1e-12))
    s[[0, exclude]] = -np.inf
    return set(np.argsort(-s)[:k].tolist())


def mean_inverse_rank(users_vec: np.ndarray, items: np.ndarray, item_vec: np.ndarray) -> float:
    """Mean over users of 1 / rank of ``item_vec`` among the items (row 0 is padding) by dot product."""
    own = users_vec @ item_vec
    others = users_vec @ items[1:].T
    ranks = 1 + (others > own[:, None]).sum(1)
    return float(np.mean(1.0 / ranks))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "movielens-100k"))
    ap.add_argument("--items", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        print(f"{args.data}: data not found (the shared datasets live in ../shared/data); nothing run", file=sys.stderr)
        return 2
    import polars as pl
    import torch

    from recforge.data.prepare import prepare
    from recforge.data.readers import load_raw
    from recforge.data.split import Split, leave_one_out
    from recforge.evaluation.batch import build_evalset
    from recforge.models.registry import create

    torch.set_num_threads(1)
    split = leave_one_out(prepare(load_raw(args.data)))
    valid = build_evalset(split.history("valid"), split.valid, split.n_users, split.n_items, "valid")
    counts = np.asarray(split.train_matrix.sum(0)).ravel()
    rng = np.random.default_rng(args.seed)
    eligible = np.flatnonzero(counts >= 5)
    order = eligible[np.argsort(counts[eligible])]
    # spread over popularity: one item drawn from each of ``items`` equal slices of the sorted list
    new = np.array([rng.choice(part) for part in np.array_split(order, args.items)])
    params = dict(verbose=False, threads=1, epochs=args.epochs, seed=args.seed)

    t0 = time.perf_counter()
    a_train = split.train.filter(~pl.col("item_id").is_in(new.tolist()))
    model_a = create("hetsgformer", **params).fit(
        Split(a_train, split.valid, split.test, split.n_users, split.n_items, split.protocol), valid)
    fit_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    model_b = create("hetsgformer", **params).fit(split, valid)
    fit_b = time.perf_counter() - t0

    users_a, items_a = (t.detach().numpy() for t in model_a.final_embeddings())
    users_b, items_b = (t.detach().numpy() for t in model_b.final_embeddings())
    who = {int(i): split.train.filter(pl.col("item_id") == int(i))["user_id"].to_numpy() for i in new}
    rows, place_ms = [], []
    for i in new:
        t = time.perf_counter()
        placed = model_a.place_items([who[int(i)]])[0]
        place_ms.append((time.perf_counter() - t) * 1e3)
        truth = neighbours(items_b[i], items_b, i)
        mean_vec = items_a[1:].mean(0)
        scale = float(np.linalg.norm(items_a[1:], axis=1).mean())  # random directions at the typical item norm
        randoms = [(v / np.linalg.norm(v) * scale).astype(np.float32) for v in rng.normal(size=(20, items_a.shape[1]))]
        ua, ub = users_a[who[int(i)]], users_b[who[int(i)]]
        rows.append({
            "item": int(i), "users": len(who[int(i)]),
            "overlap_ille": len(neighbours(placed, items_a, i) & truth),
            "overlap_mean": len(neighbours(mean_vec, items_a, i) & truth),
            "overlap_random": float(np.mean([len(neighbours(r, items_a, i) & truth) for r in randoms])),
            "mir_retrain": mean_inverse_rank(ub, items_b, items_b[i]),
            "mir_ille": mean_inverse_rank(ua, items_a, placed),
            "mir_mean": mean_inverse_rank(ua, items_a, mean_vec),
            "mir_random": float(np.mean([mean_inverse_rank(ua, items_a, r) for r in randoms]))})
    keys = [k for k in rows[0] if k.startswith(("overlap_", "mir_"))]
    summary = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys}
    summary.update(place_ms_median=round(float(np.median(place_ms)), 2), place_ms_max=round(float(np.max(place_ms)), 2),
                   fit_seconds_without=round(fit_a, 1), fit_seconds_retrain=round(fit_b, 1))
    for k, v in summary.items():
        print(f"{k:22s} {v}")
    out = ROOT / "benchmarks" / "results" / "ille_retrain.json"
    out.write_text(json.dumps({
        "command": "python benchmarks/ille_retrain.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 PyTorch thread", "data": os.path.relpath(args.data, ROOT),
        "protocol": "leave-one-out; new items: every training row removed before fitting model A; model B retrained on "
                    "every training row; same settings (model defaults, epochs capped), early stopping on validation",
        "new_items": len(new), "summary": summary, "items": rows}, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
