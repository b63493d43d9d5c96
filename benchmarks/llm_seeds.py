"""Seed systems of the language-model task on MovieLens (100K by default; ``--data`` for another):
plain LoRA against CoRA on one test sample, and E2URec unlearning against retraining.

    python benchmarks/llm_seeds.py [--test-prompts 200] [--unlearn-test-prompts 100] [--train-prompts 32]
                                   [--seed 0] [--k 5] [--epochs 1] [--lr 2e-3] [--forget 0.05] [--threads 2]
                                   [--only lora,cora,e2urec] [key=value ...]

Protocol (``recforge.llm.task``, as ``benchmarks/llm_rella.py``): each user's ratings in time order,
the last 10% held out, a like is a rating of 4 or 5; ``--test-prompts`` held-out rows drawn once
(``data.test_seed`` 0) from those with an earlier training row; a prompt shows the user's profile, the
``k`` most recent earlier training ratings and the target; the score is P("Yes") / (P("Yes") + P("No"))
of SmolLM2-135M-Instruct. Rows:

* ``plain LoRA``: ReLLa's tuning without its retrieval (``rella``, recent-k prompts, one prompt per
  target): LoRA (r 8, q/v) for ``--epochs`` on ``--train-prompts`` sampled training targets;
* ``CoRA``: the same prompts and sample; the backbone frozen, a query generator trained to turn a
  logistic MF's user and item vectors (fitted on every training row) into per-example low-rank
  weights of the q/v projections;
* ``RecLoRA`` (only with ``--only ...,reclora``): the same prompts and sample; four LoRA experts mixed
  per user by a gate on a small sequence model's user representation (that model trained on every
  training row, reading the 50 latest ratings);
* ``E2URec``: the plain-LoRA configuration tuned, then ``--forget`` of the tuned users forgotten
  (``data.forget_users``): scored before (original) and after unlearning, and against a model
  retrained without those users; on its own, smaller test sample (``--unlearn-test-prompts``, three
  models score it) with the forgetting measures on the forgotten training prompts.

``--summary FILE FILE FILE --out F`` pools one results file per seed (mean ± std, paired bootstraps
with every seed's runs on each side, unlearning figures averaged). Results go to
``benchmarks/results/llm_seeds.json`` (updated after every run; finished runs are
reused when the script is started again with the same settings) and ``.md``; run folders in ``runs/``
beside the results file (``benchmarks/results/runs/`` by default).
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

from recforge.config import split_kv
from recforge.evaluation.pointwise import bootstrap_line

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _rel(path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _f(v, spec=".4f"):
    return "–" if v is None else format(v, spec)


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"{Path(s['data']).name}, seed {s['seed']}, k={s['k']}, {s['train_prompts']} training targets, "
             f"{s['epochs']} epoch(s), lr {s['lr']:g}, SmolLM2-135M-Instruct, {s['threads']} threads", "",
             "| model | test prompts | AUC | log-loss | fit s | scoring tok/s | trainable parameters |",
             "|---|---|---|---|---|---|---|"]
    for r in res.get("rows", []):
        lines.append(f"| {r['model']} | {r['prompts']} | {_f(r['auc'])} | {_f(r['logloss'])} | "
                     f"{r['fit_seconds']:.0f} | {_f(r['scoring_tokens_per_second'], '.0f')} | "
                     f"{r['trainable'] or '–'} |")
    u = res.get("unlearning")
    if u:
        n_prompts = u["forgotten_prompts"] + u["retained_prompts"]
        lines += ["", f"E2URec: forget {u['forget']} of the {u['tuned_users']} tuned users ({len(u['users'])} "
                      f"users, {u['forgotten_prompts']} of {n_prompts} training prompts); test sample of "
                      f"{u['test_prompts']} prompts, {u['retained_rows']} of them retained users'", "",
                  "| model | AUC, retained users' test rows | log-loss | JSD to retrained, vocab | JSD, Yes/No | "
                  "AUC on forgotten prompts | seconds |", "|---|---|---|---|---|---|---|"]
        seconds = {"original": u["fit_seconds"], "unlearned": u["unlearn_seconds"], "retrained": u["retrain_seconds"]}
        for k in ("original", "unlearned", "retrained"):
            q, f = u["retained_test"][k], u["forgetting"][k]
            jv = u["forgetting"].get(f"jsd_vocab_{k}_vs_retrained")
            ja = u["forgetting"].get(f"jsd_answers_{k}_vs_retrained")
            lines.append(f"| {k} | {_f(q['auc'])} | {_f(q['logloss'])} | {_f(jv, '.3g')} | {_f(ja, '.3g')} | "
                         f"{_f(f['auc'])} | {seconds[k]:.0f} |")
    return "\n".join(lines)


def summary(files: list[str]) -> dict:
    """Several seeds' results files pooled: mean ± std of each row over seeds, paired bootstraps over
    users with every seed's run on each side (predictions averaged per row), and the unlearning
    figures averaged over seeds."""
    from recforge.llm import task

    per = [json.loads(Path(f).read_text()) for f in files]
    seeds = [r["settings"]["seed"] for r in per]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--summary: the files repeat a seed ({seeds}); give one file per seed")
    labels = [x["model"] for x in per[0]["rows"]]
    rows = []
    for label in labels:
        got = [next((x for x in r["rows"] if x["model"] == label), None) for r in per]
        if any(g is None for g in got):
            continue
        rows.append({"model": label, "seeds": len(got), "prompts": got[0]["prompts"],
                     **{k: [float(np.mean([g[k] for g in got])), float(np.std([g[k] for g in got], ddof=1))]
                        for k in ("auc", "logloss", "fit_seconds")},
                     "auc_per_seed": [g["auc"] for g in got], "trainable": got[0]["trainable"]})
    runs = {label: [r["done"][label] for r in per] for label in ("plain LoRA", "CoRA", "RecLoRA")
            if all(label in r["done"] for r in per)}
    compare = []
    for other in ("CoRA", "RecLoRA"):
        if "plain LoRA" in runs and other in runs:
            c = task.compare(runs["plain LoRA"], runs[other], n_boot=1000)
            compare.append({"label": f"{other} vs plain LoRA", "bootstrap": c["bootstrap"]})
    unlearning = {}
    us = [r["unlearning"] for r in per if r.get("unlearning")]
    if len(us) == len(per):
        def ms(vals):
            return [float(np.mean(vals)), float(np.std(vals, ddof=1))]

        for k in ("original", "unlearned", "retrained"):
            unlearning[k] = {"retained_auc": ms([u["retained_test"][k]["auc"] for u in us]),
                             "retained_logloss": ms([u["retained_test"][k]["logloss"] for u in us]),
                             "seconds": ms([u[{"original": "fit_seconds", "unlearned": "unlearn_seconds",
                                                "retrained": "retrain_seconds"}[k]] for u in us])}
            if k != "retrained":
                unlearning[k]["jsd_vocab_vs_retrained"] = ms([u["forgetting"][f"jsd_vocab_{k}_vs_retrained"] for u in us])
                unlearning[k]["jsd_answers_vs_retrained"] = ms([u["forgetting"][f"jsd_answers_{k}_vs_retrained"]
                                                                for u in us])
        unlearning["forgotten"] = [{"seed": sd, "users": len(u["users"]), "prompts": u["forgotten_prompts"]}
                                   for sd, u in zip(seeds, us)]
    return {"files": [_rel(f) for f in files], "seeds": seeds, "settings": per[0]["settings"], "rows": rows,
            "compare": compare, "unlearning": unlearning}


def summary_markdown(res: dict) -> str:
    def f(v, spec=".4f"):
        return f"{v[0]:{spec}} ± {v[1]:{spec}}"

    lines = [f"{Path(res['settings']['data']).name}, seeds {res['seeds']} pooled (mean ± std over seeds)", "",
             "| model | seeds | test prompts | AUC | AUC per seed | log-loss | fit s | trainable parameters |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['seeds']} | {r['prompts']} | {f(r['auc'])} | "
                     f"{' / '.join(f'{a:.4f}' for a in r['auc_per_seed'])} | {f(r['logloss'])} | "
                     f"{f(r['fit_seconds'], '.0f')} | {r['trainable'] or '–'} |")
    for c in res["compare"]:
        for b in c["bootstrap"]:
            lines.append("\n" + bootstrap_line(b, f"{c['label']} (all seeds' runs per side)"))
    u = res.get("unlearning")
    if u:
        lines += ["", "| E2URec | AUC, retained users' rows | log-loss | JSD to retrained, vocab | JSD, Yes/No | seconds |",
                  "|---|---|---|---|---|---|"]
        for k in ("original", "unlearned", "retrained"):
            q = u[k]
            jv = f(q["jsd_vocab_vs_retrained"], ".2g") if "jsd_vocab_vs_retrained" in q else "–"
            ja = f(q["jsd_answers_vs_retrained"], ".2g") if "jsd_answers_vs_retrained" in q else "–"
            lines.append(f"| {k} | {f(q['retained_auc'])} | {f(q['retained_logloss'])} | {jv} | {ja} | "
                         f"{f(q['seconds'], '.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--summary", nargs="+", metavar="FILE",
                    help="pool these per-seed results files (one per seed) into --out; run nothing")
    ap.add_argument("--data", default="../shared/data/movielens-100k")
    ap.add_argument("--test-prompts", type=int, default=200)
    ap.add_argument("--unlearn-test-prompts", type=int, default=100)
    ap.add_argument("--train-prompts", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--forget", type=float, default=0.05)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="lora,cora,e2urec")
    ap.add_argument("--out", default=str(RESULTS / "llm_seeds.json"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.summary:
        res = summary(args.summary)
        out = Path(args.out)
        out.write_text(json.dumps(res, indent=2))
        md = summary_markdown(res)
        out.with_suffix(".md").write_text(md + "\n")
        print(md)
        return 0

    import torch

    from recforge.llm import task
    from recforge.runs import Run

    torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    out = Path(args.out)
    settings = {k: getattr(args, k) for k in ("data", "test_prompts", "unlearn_test_prompts", "train_prompts", "seed",
                                               "k", "epochs", "lr", "forget", "max_tokens", "threads", "overrides")}
    res = json.loads(out.read_text()) if out.exists() else {}
    if res.get("settings") != settings:
        res = {"settings": settings, "done": {}}
    res["machine"] = f"{platform.machine()}, PyTorch {torch.__version__}, {args.threads} threads"
    res["date"] = time.strftime("%Y-%m-%d")
    common = {"data.test_prompts": args.test_prompts, "model.threads": args.threads, "model.k": args.k,
              "llm.max_tokens": args.max_tokens, "model.retrieval": "recent", "model.mix": False,
              "data.train_prompts": args.train_prompts, "model.epochs": args.epochs, "model.lr": args.lr,
              "seed": args.seed, **dict(map(split_kv, args.overrides))}
    plan = []
    if "lora" in only:
        plan.append(("plain LoRA", "rella", common))
    if "cora" in only:
        plan.append(("CoRA", "cora", common))
    if "reclora" in only:
        plan.append(("RecLoRA", "reclora", common))
    if "e2urec" in only:
        plan.append(("E2URec", "e2urec", {**common, "data.test_prompts": args.unlearn_test_prompts,
                                          "data.forget_users": args.forget}))
    runs = {}
    for label, model, ov in plan:
        if label in res["done"] and Path(res["done"][label]).exists():
            runs[label] = Run.load(res["done"][label])
            continue
        t0 = time.perf_counter()
        run = task.train(model, args.data, ov, out=out.parent / "runs", verbose=False)
        m = run.metrics
        print(f"{label}: AUC {m['test']['auc']:.4f} log-loss {m['test']['logloss']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        res["done"][label] = _rel(run.path)
        runs[label] = run
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
    res["rows"] = []
    for label, run in runs.items():
        m = run.metrics
        tr = m.get("training") or {}
        res["rows"].append({"model": label + (" (after unlearning)" if label == "E2URec" else ""),
                            "run": _rel(run.path), "prompts": m["test"]["n_rows"],
                            "auc": m["test"]["auc"], "logloss": m["test"]["logloss"],
                            "fit_seconds": m["timing"]["fit_seconds"],
                            "scoring_tokens_per_second": m["timing"]["scoring"].get("tokens_per_second"),
                            "trainable": (tr.get("training") or {}).get("adapter_parameters")})
    res["compare"] = []
    for other in ("CoRA", "RecLoRA"):
        if "plain LoRA" in runs and other in runs:
            c = task.compare(runs["plain LoRA"], runs[other], n_boot=1000)
            res["compare"].append({"label": f"{other} vs plain LoRA", "bootstrap": c["bootstrap"]})
    if "E2URec" in runs:
        m = runs["E2URec"].metrics
        u, t = m["protocol"]["unlearning"], m["timing"]["unlearning"]
        res["unlearning"] = {"forget": args.forget, "users": u["forgotten_users"], "tuned_users": u["tuned_users"],
                             "forgotten_prompts": u["forgotten_prompts"], "retained_prompts": u["retained_prompts"],
                             "test_prompts": m["test"]["n_rows"], "retained_rows": u["retained_test"]["rows"],
                             "retained_test": u["retained_test"], "forgotten_test": u["forgotten_test"],
                             "forgetting": u["forgetting"], "fit_seconds": m["timing"]["fit_seconds"],
                             "unlearn_seconds": t["unlearn_seconds"], "retrain_seconds": t["retrain_seconds"],
                             "details": u["unlearning"]}
    out.write_text(json.dumps(res, indent=2))
    md = markdown(res)
    for c in res.get("compare", []):
        for b in c["bootstrap"]:
            md += "\n\n" + bootstrap_line(b, c["label"])
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
