"""CausalDPO against plain DPO and the SFT model on MovieLens-100K split at one global time.

    python benchmarks/llm_causaldpo.py [--seeds 0,1,2] [--test-prompts 200] [--train-prompts 64]
                                       [--listwise 20] [--listwise-targets 30] [--k 5] [--epochs 1]
                                       [--lr 2e-3] [--threads 1] [--with-id] [key=value ...]

Protocol (``recforge.llm.task``, ``split.method=temporal``): the whole log cut at the time below which
90% of the ratings lie; the later 10% are the test period (another period than training: the robust
models' out-of-distribution setting). A like is a rating of 4 or 5. One test sample of
``--test-prompts`` test rows with an earlier training row of their user (``data.test_seed`` 0), scored
pointwise by every model (AUC, log-loss); the SAMPLED LISTWISE protocol on ``--listwise-targets`` liked
test rows, each against ``--listwise`` - 1 items the user never rated (the same candidates for every
model): HR@k, NDCG@k, MRR. Prompts: profile, the ``k`` most recent earlier training ratings, the target;
score P(Yes) / (P(Yes) + P(No)) of SmolLM2-135M-Instruct.

Per seed: the SFT model (``rella``, recent-k prompts, LoRA r 8 on q/v, ``--epochs`` at ``--lr`` on
``--train-prompts`` sampled training targets, drawn with the seed), then ``dpo`` and ``causaldpo``
started from that SFT run (``model.sft_from``) with their defaults. ``--with-id`` adds the ID baseline
(LR on user and item ids, all training rows) once. Paired tests: a bootstrap over users of the AUC
difference (``recforge.llm.task.compare``, every seed's runs on each side) and a paired t-test of the
per-target listwise NDCG@10 over all seeds' targets.

Results: ``benchmarks/results/llm_causaldpo.json`` (updated after every run; finished runs are reused when
started again with the same settings); run folders in ``benchmarks/results/runs/llm_causaldpo``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from recforge.config import split_kv

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = (("SFT (ReLLa LoRA)", "rella"), ("DPO", "dpo"), ("CausalDPO", "causaldpo"))
LW = ("hr@1", "hr@5", "hr@10", "ndcg@10", "mrr")


#: the project whose results file is written: run paths are recorded relative to it (``main`` sets it
#: from ``--out``, so a results file written from another checkout still holds relative paths)
BASE = HERE.parent


def project_of(out: Path) -> Path:
    out = Path(out).resolve()
    return out.parents[2] if out.parent.name == "results" and out.parent.parent.name == "benchmarks" else HERE.parent


def _rel(path) -> str:
    try:
        return str(Path(path).resolve().relative_to(BASE))
    except ValueError:
        return str(path)


def _row(label: str, seed: int, run, seconds: float) -> dict:
    m = run.metrics
    hist = json.loads((run.path / "history.json").read_text()) if (run.path / "history.json").exists() else {}
    al = hist.get("alignment") or {}
    return {"model": label, "seed": seed, "run": _rel(run.path), "auc": m["test"]["auc"], "logloss": m["test"]["logloss"],
            **{k: (m.get("test_listwise") or {}).get(k) for k in LW}, "seconds": round(seconds, 1),
            "alignment_seconds": al.get("seconds"), "alignment_tokens_per_second": al.get("tokens_per_second"),
            "final_margin": (al.get("epochs") or [{}])[-1].get("margin"),
            "peak_mb": m["timing"].get("peak_memory_mb")}


def summary(res: dict) -> dict:
    from scipy import stats

    from recforge.llm import task

    out = {}
    by = {}
    for r in res["rows"]:
        by.setdefault(r["model"], []).append(r)
    for label, rows in by.items():
        out[label] = {"runs": len(rows), **{k: [round(float(np.mean([r[k] for r in rows])), 4),
                                               round(float(np.std([r[k] for r in rows], ddof=1)), 4) if len(rows) > 1 else None]
                                           for k in ("auc", "logloss", *LW) if all(r.get(k) is not None for r in rows)}}
    tests = []
    for a, b in (("CausalDPO", "DPO"), ("CausalDPO", "SFT (ReLLa LoRA)"), ("DPO", "SFT (ReLLa LoRA)")):
        ra, rb = by.get(a, []), by.get(b, [])
        seeds = sorted({r["seed"] for r in ra} & {r["seed"] for r in rb})
        if not seeds:
            continue
        pa = [BASE / next(r["run"] for r in ra if r["seed"] == s) for s in seeds]
        pb = [BASE / next(r["run"] for r in rb if r["seed"] == s) for s in seeds]
        boot = {x["metric"]: x for x in task.compare(pb, pa, n_boot=1000)["bootstrap"]}  # diff: a - b
        na = np.concatenate([task.listwise_per_target(p) for p in pa])
        nb = np.concatenate([task.listwise_per_target(p) for p in pb])
        t = stats.ttest_rel(na, nb) if np.any(na != nb) else None
        tests.append({"a": a, "b": b, "seeds": seeds, "auc_bootstrap": boot.get("auc"),
                      "listwise_ndcg@10_delta": round(float((na - nb).mean()), 4),
                      "listwise_ndcg@10_t_p": None if t is None else float(t.pvalue), "targets": int(len(na))})
    return {"models": out, "tests": tests}


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"{Path(s['data']).name}, split.method=temporal (test_ratio 0.1), seeds {s['seeds']}, {s['test_prompts']} test "
             f"prompts, SAMPLED LISTWISE {s['listwise']} candidates x {s['listwise_targets']} targets, k={s['k']}, "
             f"{s['train_prompts']} training targets, SmolLM2-135M-Instruct", "",
             "| model | runs | AUC | log-loss | HR@1 | NDCG@10 | MRR |", "|---|---|---|---|---|---|---|"]
    for label, m in res.get("summary", {}).get("models", {}).items():
        def f(k):
            v = m.get(k)
            return "–" if not v else (f"{v[0]:.4f}" + (f" ± {v[1]:.4f}" if v[1] is not None else ""))
        lines.append(f"| {label} | {m['runs']} | {f('auc')} | {f('logloss')} | {f('hr@1')} | {f('ndcg@10')} | {f('mrr')} |")
    for t in res.get("summary", {}).get("tests", []):
        b = t["auc_bootstrap"] or {}
        lines.append(f"\n{t['a']} vs {t['b']} (seeds {t['seeds']}): AUC Δ {b.get('diff', float('nan')):+.4f} "
                     f"(bootstrap p {b.get('bootstrap_p', float('nan')):.3g}); listwise NDCG@10 Δ {t['listwise_ndcg@10_delta']:+.4f} "
                     f"(paired t p {t['listwise_ndcg@10_t_p'] if t['listwise_ndcg@10_t_p'] is None else round(t['listwise_ndcg@10_t_p'], 3)}, "
                     f"{t['targets']} targets)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "movielens-100k"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--test-prompts", type=int, default=200)
    ap.add_argument("--train-prompts", type=int, default=64)
    ap.add_argument("--listwise", type=int, default=20)
    ap.add_argument("--listwise-targets", type=int, default=30)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--with-id", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "llm_causaldpo.json"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        print(f"{args.data}: data not found (the shared datasets live in ../shared/data); nothing run")
        return 2

    import torch

    from recforge.llm import task

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    global BASE
    BASE = project_of(out)
    settings = {k: getattr(args, k) for k in ("data", "seeds", "test_prompts", "train_prompts", "listwise",
                                               "listwise_targets", "k", "epochs", "lr", "max_tokens", "overrides")}
    res = json.loads(out.read_text()) if out.exists() else {}
    if res.get("settings") != settings:
        res = {"settings": settings, "rows": []}
    res["machine"] = f"{platform.machine()}, PyTorch {torch.__version__}, {args.threads} thread(s)"
    res["date"] = time.strftime("%Y-%m-%d")
    common = {"split.method": "temporal", "data.test_prompts": args.test_prompts, "model.threads": args.threads,
              "model.k": args.k, "llm.max_tokens": args.max_tokens, "eval.listwise": args.listwise,
              "eval.listwise_targets": args.listwise_targets, "model.verbose": False,
              **dict(map(split_kv, args.overrides))}
    tuned = {"data.train_prompts": args.train_prompts, "model.epochs": args.epochs, "model.lr": args.lr}
    runs_dir = out.parent / "runs" / "llm_causaldpo"

    def done(label, seed):
        return next((r for r in res["rows"] if r["model"] == label and r["seed"] == seed
                     and (BASE / r["run"]).exists()), None)

    def record(label, seed, run, seconds):
        res["rows"] = [r for r in res["rows"] if (r["model"], r["seed"]) != (label, seed)] + [_row(label, seed, run, seconds)]
        out.write_text(json.dumps(res, indent=1))
        r = res["rows"][-1]
        print(f"{label:18s} seed {seed}: AUC {r['auc']:.4f} log-loss {r['logloss']:.4f} listwise NDCG@10 "
              f"{r['ndcg@10']:.4f}  {r['seconds']:.0f} s", flush=True)

    if args.with_id and not done("LR on user + item ids", 0):
        t0 = time.perf_counter()
        run = task.train("lr", args.data, {k: v for k, v in common.items() if not k.startswith("model.")},
                         out=runs_dir, verbose=False)
        record("LR on user + item ids", 0, run, time.perf_counter() - t0)
    for seed in [int(s) for s in args.seeds.split(",")]:
        sft = done("SFT (ReLLa LoRA)", seed)
        if sft is None:
            t0 = time.perf_counter()
            run = task.train("rella", args.data, {**common, **tuned, "model.retrieval": "recent", "model.mix": False,
                                                  "seed": seed}, out=runs_dir, verbose=False)
            record("SFT (ReLLa LoRA)", seed, run, time.perf_counter() - t0)
            sft = done("SFT (ReLLa LoRA)", seed)
        for label, model in MODELS[1:]:
            if done(label, seed):
                continue
            t0 = time.perf_counter()
            run = task.train(model, args.data, {**common, **tuned, "seed": seed,
                                                "model.sft_from": str(BASE / sft["run"])},
                             out=runs_dir, verbose=False)
            record(label, seed, run, time.perf_counter() - t0)
    res["summary"] = summary(res)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
