"""FLIP and ClickPrompt on MovieLens-100K as CTR data: DeepFM and DCN-V2 alone, aligned by FLIP, and
pre-trained as ClickPrompt's prompt generators, over three seeds.

    python benchmarks/ctr_plm_align.py [--data ../shared/data/movielens-100k] [--models deepfm,dcnv2]
        [--variants plain,flip,clickprompt] [--seeds 0,1,2] [--pretrain-rows 8192] [--pretrain-epochs 1]
        [--set key=value ...] [--out benchmarks/results/ctr_plm_align.json] [--runs runs/ctr_plm_align]
        [--tests-only]

Data (the FLIP / ClickPrompt / ReLLa MovieLens setting): every rating of ML-100K is one row, a click
when the rating is 4 or 5 (``data.label_threshold=4``; no sampled negatives). Features: user id,
item id, the item's genres, release date and year, the user's age, gender and occupation
(``data.user_features=true``), and ``hist_items`` (the user's previous 20 rated items). The row's
text for the language model is the template ``user id is .. age is .. gender is .. occupation is ..
item id is .. title is .. genres is ..`` (``data.text``; the item title joined from ``u.item``).
Split: the CTR task's default for rows derived from a log, temporal by timestamp (the rows before
the 0.7 time quantile train, up to the 0.9 quantile validate, the rest test: 69,997 / 20,003 /
10,000 rows), the split ``benchmarks/ctr_derived.py`` uses (its rows differ: sampled negatives
there, rating labels here).

Variants, each from its packaged defaults (early stopping on validation AUC, one thread):

* ``plain``: the backbone alone;
* ``flip``: FLIP's alignment (masked language modelling given the row, masked tabular modelling
  given the text, row-text InfoNCE) with all-MiniLM-L6-v2 on ``--pretrain-rows`` training rows
  for ``--pretrain-epochs`` epochs, then the aligned backbone fine-tuned alone (``finetune=ctr``);
* ``clickprompt``: ClickPrompt's prompt-augmented MLM (10 key/value prompts per layer) on the
  same budget, then the pre-trained backbone fine-tuned alone (``finetune=ctr``);
* ``flip_joint`` / ``clickprompt_joint`` (not run by default: on a CPU the PLM reads every
  training row in every epoch, hours per run): the papers' joint CTR + PLM fine-tuning, batch 256.

For every run: test AUC, log-loss and group AUC, the alignment's seconds (pre-training) and the
trainer's seconds (fine-tuning, validation included) apart. Each variant is compared with
``plain`` of the same backbone by ``recforge compare``'s paired tests (the seeds' runs averaged on
each side): the paired bootstrap of test AUC and log-loss over users, and the t-test and Wilcoxon
test on per-user AUC / log-loss (``diff`` is variant − plain). Results go to ``--out`` after every
run (paths relative to the working folder); a restarted script with the same settings reuses the
finished runs. ``--tests-only`` recomputes the paired tests of an existing results file. Run it with
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
from ctr_frappe import rel  # noqa: E402  (the CTR benchmarks' path helper)

TEXT = "[user_id,age,gender,occupation,item_id,title,genres]"
DATA_OVERRIDES = ["data.label_threshold=4", "data.user_features=true", f"data.text={TEXT}"]
PROTOCOL = ("MovieLens-100K, one row per rating, click = rating >= 4; temporal split by timestamp (train < 0.7 time "
            "quantile <= valid < 0.9 quantile <= test); every test row scored pointwise; early stopping on validation "
            "AUC; mean ± sample std over seeds")
#: variant -> (registered model, extra overrides); {m}: the backbone, {rows}/{epochs}: the alignment budget
VARIANTS = {
    "plain": ("{m}", []),
    "flip": ("flip", ["backbone={m}", "pretrain_rows={rows}", "pretrain_epochs={epochs}"]),
    "clickprompt": ("clickprompt", ["backbone={m}", "pretrain_rows={rows}", "pretrain_epochs={epochs}"]),
    "flip_joint": ("flip", ["backbone={m}", "pretrain_rows={rows}", "pretrain_epochs={epochs}", "finetune=joint",
                            "batch_size=256"]),
    "clickprompt_joint": ("clickprompt", ["backbone={m}", "pretrain_rows={rows}", "pretrain_epochs={epochs}",
                                          "finetune=joint", "batch_size=256"]),
}


def run_one(backbone: str, variant: str, seed: int, args) -> dict:
    name, extra = VARIANTS[variant]
    overrides = ["threads=1", f"seed={seed}", *DATA_OVERRIDES, *args.set]
    overrides += [o.format(m=backbone, rows=args.pretrain_rows, epochs=args.pretrain_epochs) for o in extra]
    run = recforge.train(name.format(m=backbone), data=args.data, overrides=overrides, out=args.runs, verbose=False)
    met = run.metrics
    align = met["training"].get("align")
    history = json.loads((run.path / "history.json").read_text())
    return {"seed": seed, "run": rel(run.path), "auc": met["test"]["auc"], "logloss": met["test"]["logloss"],
            "gauc": met["test"].get("gauc"), "valid_auc": met["valid"]["auc"],
            "best_epoch": met["training"]["best_epoch"], "epochs_run": len(history["epochs"]),
            "pretrain_seconds": align["seconds"] if align else 0.0,
            "finetune_seconds": round(met["training"]["seconds"], 2), "fit_seconds": met["timing"]["fit_seconds"],
            "pretrain_rows": align["rows"] if align else 0,
            "pretrain_loss": [{k: v for k, v in e.items() if k not in ("epoch", "steps", "seconds")}
                              for e in align["epochs"]] if align else None}


def paired_tests(rows: list[dict]) -> list[dict]:
    """Each variant against ``plain`` of the same backbone (all seeds on each side): the paired
    bootstrap over users of test AUC / log-loss, and the per-user t-test and Wilcoxon test."""
    from recforge.ctr import compare
    from recforge.runs import Run

    plain = {r["model"]: [Run.load(x["run"]) for x in r["runs"]] for r in rows if r["variant"] == "plain"}
    out = []
    for r in rows:
        if r["variant"] == "plain" or r["model"] not in plain:
            continue
        res = compare(plain[r["model"]], [Run.load(x["run"]) for x in r["runs"]])
        per_user = {u["metric"]: u for u in res["rows"]}
        for b in res["bootstrap"]:
            u = per_user.get(b["metric"], {})
            out.append({"model": r["model"], "variant": r["variant"], "vs": "plain", "metric": b["metric"],
                        "diff": b["diff"], "ci_low": b["ci_low"], "ci_high": b["ci_high"],
                        "bootstrap_p": b["bootstrap_p"],
                        "unit": b["unit"], "n_units": b["n_units"], "n_boot": b["n_boot"],
                        "per_user_diff": u.get("diff"), "t_test_p": u.get("t_test_p"),
                        "wilcoxon_p": u.get("wilcoxon_p"), "per_user_n": u.get("n_users")})
    return out


def print_board(board: dict) -> None:
    print(f"protocol: {board['protocol']}")
    print(f"alignment budget: {board['pretrain']['rows']} training rows x {board['pretrain']['epochs']} epoch(s)")
    print("| backbone | variant | test AUC | test log-loss | group AUC | best epoch | pre-training s | fine-tuning s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in board["rows"]:
        g = r["gauc"]
        print(f"| {r['model']} | {r['variant']} | {r['auc']['mean']:.4f} ± {r['auc']['std']:.4f} | "
              f"{r['logloss']['mean']:.4f} ± {r['logloss']['std']:.4f} | "
              f"{g['mean']:.4f} | {r['best_epoch']['mean']:.1f} | "
              f"{r['pretrain_seconds']['mean']:.0f} | {r['finetune_seconds']['mean']:.0f} |")
    tests = board.get("paired") or []
    if tests:
        print("| backbone | variant − plain | metric | diff [95% bootstrap] | bootstrap p | per-user t p | "
              "Wilcoxon p |")
        print("|---|---|---|---|---|---|---|")
        for t in tests:
            fmt = (lambda v: f"{v:.3g}" if v is not None else "-")
            print(f"| {t['model']} | {t['variant']} | {t['metric']} | {t['diff']:+.4f} [{t['ci_low']:+.4f}, "
                  f"{t['ci_high']:+.4f}] | {t['bootstrap_p']:.3g} | {fmt(t['t_test_p'])} | {fmt(t['wilcoxon_p'])} |")


def summarise(model: str, variant: str, per_seed: list[dict]) -> dict:
    keys = ("auc", "logloss", "gauc", "valid_auc", "best_epoch", "pretrain_seconds", "finetune_seconds", "fit_seconds")
    return {"model": model, "variant": variant, "n_seeds": len(per_seed),
            **{k: mean_std([r[k] for r in per_seed if r[k] is not None]) for k in keys}, "runs": per_seed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/movielens-100k")
    ap.add_argument("--models", default="deepfm,dcnv2")
    ap.add_argument("--variants", default="plain,flip,clickprompt")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pretrain-rows", type=int, default=8192)
    ap.add_argument("--pretrain-epochs", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every run (on top of the packaged defaults), e.g. --set epochs=1")
    ap.add_argument("--out", default="benchmarks/results/ctr_plm_align.json")
    ap.add_argument("--runs", default="runs/ctr_plm_align")
    ap.add_argument("--tests-only", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.tests_only:
        board = json.loads(out.read_text())
        board["paired"] = paired_tests(board["rows"])
        out.write_text(json.dumps(board, indent=2))
        print_board(board)
        return 0
    if not Path(args.data).exists():
        raise SystemExit(f"{args.data}: MovieLens-100K is not there (the shared data folder sits beside the project)")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(1)
    models = [m for m in args.models.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = {"data": args.data, "pretrain_rows": args.pretrain_rows, "pretrain_epochs": args.pretrain_epochs,
                "overrides": args.set}
    done = {}
    if out.exists():  # finished runs of the same settings are reused
        old = json.loads(out.read_text())
        if old.get("settings") == settings:
            done = {(r["model"], r["variant"], x["seed"]): x for r in old["rows"] for x in r["runs"]
                    if Path(x["run"]).exists()}
    board = {"protocol": PROTOCOL, "settings": settings, "data": args.data, "seeds": seeds, "threads": 1,
             "data_overrides": DATA_OVERRIDES,
             "pretrain": {"rows": args.pretrain_rows, "epochs": args.pretrain_epochs, "batch_size": "the model's (64)",
                          "plm": "all-MiniLM-L6-v2", "finetune": "ctr (the backbone alone) unless *_joint"},
             "rows": []}
    t0 = time.perf_counter()
    for m in models:
        for v in variants:
            per_seed = []
            for s in seeds:
                r = done.get((m, v, s)) or run_one(m, v, s, args)
                per_seed.append(r)
                print(f"  {m:<7} {v:<12} seed {s}: test AUC {r['auc']:.4f}  logloss {r['logloss']:.4f}  best epoch "
                      f"{r['best_epoch']}  pre-training {r['pretrain_seconds']:.0f} s  fine-tuning "
                      f"{r['finetune_seconds']:.0f} s", file=sys.stderr, flush=True)
                board["rows"] = [x for x in board["rows"] if (x["model"], x["variant"]) != (m, v)]
                board["rows"].append(summarise(m, v, per_seed))
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(board, indent=2))
    first = json.loads((Path(board["rows"][0]["runs"][0]["run"]) / "metrics.json").read_text())["protocol"]
    board.update(split=first["split"], source=first["data"], paired=paired_tests(board["rows"]),
                 minutes=round((time.perf_counter() - t0) / 60, 1))
    out.write_text(json.dumps(board, indent=2))
    print_board(board)
    print(rel(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
