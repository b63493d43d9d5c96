"""Train a sequential model on Amazon Beauty (leave-one-out, full ranking, history excluded)
and print seconds per epoch and validation / test HR@10 and NDCG@10.

    python benchmarks/sequential_beauty.py sasrec [key=value ...] [--data PATH] [--out FILE]

``key=value`` overrides the model's YAML defaults (values parsed as YAML). The data path
defaults to ``../shared/data/amazon-beauty/Beauty.txt``; use ``../shared/data/amazon-beauty-time``
for real timestamps (TiCoSeRec augmentation).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import yaml

from recforge.data.prepare import prepare
from recforge.data.readers import load_raw
from recforge.data.split import leave_one_out
from recforge.evaluation.batch import build_evalset
from recforge.evaluation.evaluator import evaluate
from recforge.models.registry import create


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("overrides", nargs="*", help="key=value")
    ap.add_argument("--data", default="../shared/data/amazon-beauty/Beauty.txt")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    overrides = {}
    for kv in args.overrides:
        k, _, v = kv.partition("=")
        overrides[k] = yaml.safe_load(v)
    t0 = time.perf_counter()
    split = leave_one_out(prepare(load_raw(args.data)))
    valid = build_evalset(split.history("valid"), split.valid, split.n_users, split.n_items, "valid")
    test = build_evalset(split.history("test"), split.test, split.n_users, split.n_items, "test")
    print(f"data: {split.n_users} users, {split.n_items} items, {split.train.height} train rows "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)

    model = create(args.model, verbose=False, **overrides)
    print("params:", model.get_params(), flush=True)
    t1 = time.perf_counter()
    model.fit(split, valid)
    fit_s = time.perf_counter() - t1
    hist = model.history_
    train_s = [e["train_seconds"] for e in hist["epochs"]]
    vm = evaluate(model, valid, ks=[10], groups=False).metrics
    tm = evaluate(model, test, ks=[10], groups=False).metrics
    res = {
        "model": args.model, "data": args.data, "params": model.get_params(),
        "protocol_notes": model.protocol_notes(),
        "epochs_run": len(hist["epochs"]), "best_epoch": hist["best_epoch"],
        "seconds_per_epoch_train": round(sum(train_s) / max(len(train_s), 1), 2),
        "seconds_fit_total": round(fit_s, 1),
        "valid": {k: round(vm[k], 4) for k in ("hr@10", "ndcg@10")},
        "test": {k: round(tm[k], 4) for k in ("hr@10", "ndcg@10")},
    }
    print(json.dumps(res, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res | {"history": hist}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
