"""ReLLa on MovieLens (100K by default; ``--data`` for another): zero-shot recent-K vs retrieved-K,
few-shot LoRA tuning, and an ID baseline, all on one test sample.

    python benchmarks/llm_rella.py [--test-prompts 200] [--train-prompts 32] [--seeds 0,1,2] [--k 5]
                                   [--epochs 2] [--threads 2] [key=value ...]

Protocol (``recforge.llm.task``): each user's ratings in time order, the last 10% (at least one)
held out; a like is a rating of 4 or 5. ``--test-prompts`` held-out rows are drawn once (seed 0)
from those with at least one earlier training row, and every model scores exactly these rows.
A prompt shows the user's profile, ``k`` of the user's training ratings strictly before the
target (the most recent ones, or the ones closest to the target by all-MiniLM-L6-v2 title+genre
vectors: ReLLa's semantic retrieval), and the target's title and genres; the score is
P("Yes") / (P("Yes") + P("No")) of SmolLM2-135M-Instruct's next token. With ``eval.listwise=N``
every model also ranks the labelled SAMPLED LISTWISE candidate sets (``recforge.llm.task``), and the
comparisons add a paired t-test of per-target NDCG@10. Rows:

* ``lr (ids)``: logistic regression on one-hot user and item ids (a RecForge CTR model), fitted on
  all training rows (epochs chosen on each user's last training rows first);
* ``SASRec (liked items)``: SASRec on each user's liked training items,
  its scores Platt-scaled (``recforge.llm.baselines``), one run per seed;
* ``zero-shot recent-k`` and ``zero-shot retrieved-k``: the backbone alone;
* ``few-shot ReLLa``: LoRA (r 8, q/v projections) tuned for ``--epochs`` on ``--train-prompts``
  training targets (each as a recent-k and a retrieved-k prompt: ReLLa's mixed instruction set),
  one sample and initialisation per seed, scored with retrieved-k prompts.

AUC and log-loss are reported with the scoring and training throughput (prompt tokens per second)
and the process's peak memory; the paired bootstrap over users compares few-shot (seeds averaged)
with zero-shot retrieved-k and with the ID baseline. Results go to
``benchmarks/results/llm_rella.json`` (updated after every run; finished runs are reused when the
script is started again with the same settings) and ``.md``; run folders under
``benchmarks/results/runs/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from recforge.config import split_kv
from recforge.evaluation.pointwise import bootstrap_line

HERE = Path(__file__).resolve().parent


def _rel(path) -> str:
    """A run folder as a path relative to the working folder (results files never hold absolute paths)."""
    import os

    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)
RESULTS = HERE / "results"


def _row(label: str, runs: list) -> dict:
    test = [r.metrics["test"] for r in runs]
    timing = [r.metrics["timing"] for r in runs]
    out = {"model": label, "runs": [_rel(r.path) for r in runs], "n_runs": len(runs),
           "auc": float(np.mean([t["auc"] for t in test])), "auc_std": float(np.std([t["auc"] for t in test])),
           "logloss": float(np.mean([t["logloss"] for t in test])), "gauc": float(np.mean([t["gauc"] for t in test])),
           "fit_seconds": float(np.mean([t["fit_seconds"] for t in timing])),
           "peak_memory_mb": max(t["peak_memory_mb"] for t in timing)}
    sc = [t["scoring"].get("tokens_per_second") for t in timing if t["scoring"].get("tokens_per_second")]
    tr = [t["training"]["tokens_per_second"] for t in timing if t.get("training")]
    out["scoring_tokens_per_second"] = float(np.mean(sc)) if sc else None
    out["scoring_prompts_per_second"] = (float(np.mean([t["scoring"]["prompts_per_second"] for t in timing]))
                                         if sc else None)
    out["training_tokens_per_second"] = float(np.mean(tr)) if tr else None
    p = runs[0].metrics["protocol"]
    out["prompt_tokens_mean"] = p.get("prompt_tokens", {}).get("mean")
    out["train_prompts"] = p.get("train_sample", {}).get("prompts", p.get("train_sample", {}).get("rows"))
    lw = [r.metrics.get("test_listwise") for r in runs]
    if all(lw):
        out["listwise"] = {k: float(np.mean([m[k] for m in lw])) for k in lw[0]}
        out["listwise_ndcg@10_std"] = float(np.std([m["ndcg@10"] for m in lw]))
        out["listwise_protocol"] = p.get("listwise")
    return out


def _fmt(v, spec=".4f"):
    return "–" if v is None else format(v, spec)


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"{Path(s['data']).name}, {s['test_prompts']} test prompts (one sample, every model), k={s['k']}, "
             f"budget {s['max_tokens']} tokens, SmolLM2-135M-Instruct (float32 from Q4_1), {s['threads']} threads",
             "", "| model | runs | AUC | log-loss | GAUC | train prompts | prompt tokens | scoring tok/s | "
                 "training tok/s | fit s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        auc = _fmt(r["auc"]) + (f" ± {r['auc_std']:.4f}" if r["n_runs"] > 1 else "")
        lines.append(f"| {r['model']} | {r['n_runs']} | {auc} | {_fmt(r['logloss'])} | {_fmt(r['gauc'])} | "
                     f"{r['train_prompts'] if r['train_prompts'] is not None else '–'} | "
                     f"{_fmt(r['prompt_tokens_mean'], '.0f')} | {_fmt(r['scoring_tokens_per_second'], '.0f')} | "
                     f"{_fmt(r['training_tokens_per_second'], '.0f')} | {r['fit_seconds']:.0f} | "
                     f"{r['peak_memory_mb']:.0f} |")
    lw = [r for r in res["rows"] if r.get("listwise")]
    if lw:
        proto = lw[0]["listwise_protocol"] or {}
        lines += ["", f"{proto.get('label', 'SAMPLED LISTWISE')}: {proto.get('targets')} liked test rows, each with "
                      f"{proto.get('negatives')} as negatives; pessimistic ties", "",
                  "| model | runs | HR@1 | HR@5 | HR@10 | NDCG@10 | MRR |", "|---|---|---|---|---|---|---|"]
        for r in lw:
            m = r["listwise"]
            nd = _fmt(m["ndcg@10"]) + (f" ± {r['listwise_ndcg@10_std']:.4f}" if r["n_runs"] > 1 else "")
            lines.append(f"| {r['model']} | {r['n_runs']} | {_fmt(m['hr@1'])} | {_fmt(m['hr@5'])} | "
                         f"{_fmt(m['hr@10'])} | {nd} | {_fmt(m['mrr'])} |")
    for c in res.get("compare", []):
        for b in c["bootstrap"]:
            lines.append("\n" + bootstrap_line(b, c["label"]))
        t = c.get("listwise")
        if t:
            lines.append(f"\n{c['label']}: {t['metric']} {t['a']:.4f} → {t['b']:.4f} ({t['diff']:+.4f}, paired t "
                         f"over {t['targets']} targets p {'–' if t['t_p'] is None else format(t['t_p'], '.3f')})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/movielens-100k")
    ap.add_argument("--test-prompts", type=int, default=200)
    ap.add_argument("--train-prompts", type=int, default=32, help="training targets per few-shot seed")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="lr,sasrec,recent,retrieved,fewshot")
    ap.add_argument("--out", default=str(RESULTS / "llm_rella.json"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    import torch

    from recforge.llm import task

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    only = set(args.only.split(","))
    out = Path(args.out)
    runs_dir = RESULTS / "runs"
    settings = {"test_prompts": args.test_prompts, "train_prompts": args.train_prompts, "seeds": seeds, "k": args.k,
                "epochs": args.epochs, "lr": args.lr, "max_tokens": args.max_tokens, "threads": args.threads,
                "overrides": args.overrides, "data": args.data}
    res = json.loads(out.read_text()) if out.exists() else {}
    if res.get("settings") != settings:
        res = {"settings": settings, "done": {}}
    res["machine"] = f"{platform.machine()}, PyTorch {torch.__version__}, {args.threads} threads"
    res["date"] = time.strftime("%Y-%m-%d")
    from recforge.runs import Run

    common = {"data.test_prompts": args.test_prompts, "model.threads": args.threads, **dict(map(split_kv, args.overrides))}
    llm_common = {**common, "model.k": args.k, "llm.max_tokens": args.max_tokens}
    plan = []
    if "lr" in only:
        plan.append(("lr (ids)", "lr", {k: v for k, v in common.items() if k != "model.threads"}, [0]))
    if "sasrec" in only:
        plan.append(("SASRec (liked items)", "sasrec", common, seeds))
    if "recent" in only:
        plan.append((f"zero-shot recent-{args.k}", "rella", {**llm_common, "model.retrieval": "recent"}, [0]))
    if "retrieved" in only:
        plan.append((f"zero-shot retrieved-{args.k}", "rella", {**llm_common, "model.retrieval": "semantic"}, [0]))
    if "fewshot" in only:
        plan.append((f"few-shot ReLLa ({args.train_prompts} targets x 2 prompts)", "rella",
                     {**llm_common, "model.retrieval": "semantic", "data.train_prompts": args.train_prompts,
                      "model.epochs": args.epochs, "model.lr": args.lr}, seeds))
    groups = {}
    for label, model, ov, run_seeds in plan:
        runs = []
        for s in run_seeds:
            key = f"{label}|{s}"
            if key in res["done"] and Path(res["done"][key]).exists():
                runs.append(Run.load(res["done"][key]))
                continue
            t0 = time.perf_counter()
            run = task.train(model, args.data, {**ov, "seed": s}, out=runs_dir, verbose=False)
            m = run.metrics
            print(f"{label} seed {s}: AUC {m['test']['auc']:.4f} log-loss {m['test']['logloss']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s) scoring {m['timing']['scoring']}", flush=True)
            res["done"][key] = _rel(run.path)
            runs.append(run)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2))
        groups[label] = runs
    res["rows"] = [_row(label, runs) for label, runs in groups.items()]
    res["compare"] = []
    few = [k for k in groups if k.startswith("few-shot")]
    zr = [k for k in groups if k.startswith("zero-shot recent")]
    zs = [k for k in groups if k.startswith("zero-shot retrieved")]
    pairs = [(other, few[0]) for other in [k for k in groups if k.startswith(("zero-shot retrieved", "lr", "SASRec"))]
             if few]
    pairs += [(zr[0], zs[0])] if zr and zs else []
    for a, b in pairs:
        c = {"label": f"{b} vs {a}", "bootstrap": task.compare(groups[a], groups[b], n_boot=1000)["bootstrap"]}
        if all(r.metrics.get("test_listwise") for r in groups[a] + groups[b]):
            c["listwise"] = task.compare_listwise(groups[a], groups[b])
        res["compare"].append(c)
    out.write_text(json.dumps(res, indent=2))
    md = markdown(res)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
