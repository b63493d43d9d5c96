"""SASRec alone vs SASRec + LLM-ESR vs SASRec + FAERec on MovieLens, with item text.

    python benchmarks/semantic_ml.py [--seeds 0,1,2] [--data PATH,PATH] [--epochs 100] [key=value ...]

Protocol: leave-one-out (last item test, second-to-last validation), full ranking over all
items with the user's history excluded, NDCG@10 / HR@10 overall and for the test targets among
the head items (the most popular items holding 80% of training interactions) and the tail items.
Every model uses the SASRec defaults (``configs/models/sasrec.yaml``: max_len 50, hidden 64,
2 layers, full-softmax cross-entropy, early stopping on validation NDCG@10, patience 10) with
``epochs`` capped; the text models read the packaged all-MiniLM-L6-v2 vectors of the default
item text template (``recforge embed``, cached). Runs are written by ``recforge.api.train``
(run folders under ``benchmarks/results/runs/``) and compared per seed with
``recforge.api.compare`` (paired t-test and Wilcoxon test over users).

A model whose run records a ``variant`` in its protocol (LLM-ESR: "dual-view only" while its
retrieval-augmented self-distillation is off, ``distill_weight=0``) is labelled with it in every
table row and printed line.

Results go to ``benchmarks/results/semantic_ml.json`` and ``.md``; the JSON is updated after
every run and finished runs are skipped when the script is started again with the same
``--epochs`` and overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = ("sasrec", "llmesr", "faerec")
DATA = ("../shared/data/movielens-100k", "../shared/data/movielens-latest-small")


def _label(path: str) -> str:
    return Path(path).name


def _label_model(model: str, variant: str | None) -> str:
    """``model`` with the variant its run recorded, e.g. ``llmesr [dual-view only ...]``."""
    return f"{model} [{variant}]" if variant else model


def _variant(per_seed: dict) -> str | None:
    variants = sorted({r.get("variant") for r in per_seed.values() if r.get("variant")})
    return "; ".join(variants) if variants else None


def _run_variant(protocol: dict) -> str | None:
    """The variant a run recorded; for LLM-ESR runs written before the label existed, "dual-view
    only" from their self-distillation weight 0."""
    if protocol.get("variant"):
        return protocol["variant"]
    sd = protocol.get("self_distillation")
    if isinstance(sd, dict) and not sd.get("weight"):
        return "dual-view only (no retrieval-augmented self-distillation)"
    return None


def _row(run) -> dict:
    m = run.metrics
    groups = {g: {"ndcg@10": v.get("ndcg@10"), "hr@10": v.get("hr@10"), "n_users": v.get("n_users")}
              for g, v in m.get("groups", {}).items()}
    return {"run": str(run.path), "test": {k: m["test"][k] for k in ("ndcg@10", "hr@10", "ndcg@20", "mrr") if k in m["test"]},
            "valid_ndcg@10": m["valid"].get("ndcg@10"), "groups": groups,
            "best_epoch": m.get("training", {}).get("best_epoch"), "fit_seconds": m["timing"]["fit_seconds"],
            "variant": _run_variant(m.get("protocol", {}))}


def _summary(results: dict) -> dict:
    out = {}
    for data, per_model in results["runs"].items():
        out[data] = {}
        for model, per_seed in per_model.items():
            rows = list(per_seed.values())
            if not rows:
                continue
            entry = {"seeds": sorted(int(s) for s in per_seed), "variant": _variant(per_seed)}
            for key, get in (("ndcg@10", lambda r: r["test"]["ndcg@10"]), ("hr@10", lambda r: r["test"]["hr@10"]),
                             ("head ndcg@10", lambda r: r["groups"].get("item:head", {}).get("ndcg@10")),
                             ("tail ndcg@10", lambda r: r["groups"].get("item:tail", {}).get("ndcg@10")),
                             ("fit_seconds", lambda r: r["fit_seconds"])):
                vals = np.array([get(r) for r in rows if get(r) is not None], dtype=float)
                if len(vals):
                    entry[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
            out[data][model] = entry
    return out


def _markdown(results: dict) -> str:
    s = results["summary"]
    lines = ["# Text-enhanced SASRec on MovieLens", "",
             results["protocol"], "",
             "| data | model | seeds | NDCG@10 | HR@10 | head NDCG@10 | tail NDCG@10 | fit s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda e, k: f"{e[k]['mean']:.4f} ± {e[k]['std']:.4f}" if k in e else "-"  # noqa: E731
    for data, per_model in s.items():
        for model, e in per_model.items():
            lines.append(f"| {data} | {_label_model(model, e.get('variant'))} | {','.join(map(str, e['seeds']))} | "
                         f"{fmt(e, 'ndcg@10')} | "
                         f"{fmt(e, 'hr@10')} | {fmt(e, 'head ndcg@10')} | {fmt(e, 'tail ndcg@10')} | "
                         f"{e.get('fit_seconds', {}).get('mean', float('nan')):.0f} |")
    lines += ["", "Users per group (seed 0): " + "; ".join(
        f"{d}: head {r.get('0', {}).get('groups', {}).get('item:head', {}).get('n_users')}, "
        f"tail {r.get('0', {}).get('groups', {}).get('item:tail', {}).get('n_users')}"
        for d, per in results["runs"].items() for r in [per.get("sasrec", {})]), "",
        "## Paired tests against SASRec (per seed, over users; `recforge compare`)", "",
        "| data | model | seed | metric | SASRec | model | diff | t-test p | Wilcoxon p |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in results["compare"]:
        for r in c["rows"]:
            if r["metric"] in ("ndcg@10", "hr@10"):
                lines.append(f"| {c['data']} | {_label_model(c['model'], c.get('variant'))} | {c['seed']} | "
                             f"{r['metric']} | "
                             f"{r['a']:.4f} | {r['b']:.4f} | "
                             f"{r['diff']:+.4f} | {r['t_test_p']:.3g} | {r['wilcoxon_p']:.3g} |")
    if results.get("paper_tails"):
        lines += ["", "## Tail-item NDCG@10 under the papers' head/tail definitions (`eval.head_items`)", "",
                  "| data | rule | tail users | " + " | ".join(MODELS) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in MODELS) + " |"]
        for data, rules in results["paper_tails"].items():
            for rule, e in rules.items():
                cells = [f"{e[m]['mean']:.4f} ± {e[m]['std']:.4f}" if m in e else "-" for m in MODELS]
                lines.append(f"| {data} | `{rule}`: {PAPER_TAILS[rule]} | {e['n_users']} | " + " | ".join(cells) + " |")
    if results.get("pooled"):
        lines += ["", "## Paired tests against SASRec over the seeds (each user's metric averaged over the seeds "
                  "first; `recforge compare A1,A2,A3 B1,B2,B3`)", "",
                  "| data | model | users | metric | SASRec | model | diff | t-test p | Wilcoxon p |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in results["pooled"]:
            for r in c["rows"]:
                lines.append(f"| {c['data']} | {_label_model(c['model'], c.get('variant'))} | {c['users']} | "
                             f"{r['metric']} | "
                             f"{r['a']:.4f} | {r['b']:.4f} | "
                             f"{r['diff']:+.4f} | {r['t_test_p']:.3g} | {r['wilcoxon_p']:.3g} |")
    return "\n".join(lines) + "\n"


#: the papers' own head/tail definitions (``eval.head_items`` rules), besides our default share:0.8
PAPER_TAILS = {"top:0.2": "FAERec (head = top 20% of items)", "count:20": "LLM-ESR (head = >= 20 interactions)"}


def paper_tails(results: dict, data_paths: list[str]) -> dict:
    """Tail-item NDCG@10 of every run under the papers' head/tail rules, from the runs' per-user
    tables (leave-one-out: one test target per user, so a user is in the tail group when their
    target is a tail item under the rule; training counts only)."""
    import polars as pl

    from recforge.config import DATA_DEFAULTS
    from recforge.data.split import leave_one_out
    from recforge.evaluation.evaluator import head_items
    from recforge.pipeline import eval_sets, load_dataset

    out = {}
    for d in data_paths:
        label = _label(d)
        split = leave_one_out(load_dataset(dict(DATA_DEFAULTS, path=d)))
        _, test = eval_sets(split)
        out[label] = {}
        for rule in PAPER_TAILS:
            tail_users = test.users[~head_items(split.item_popularity, rule=rule)[test.targets[:, 0]]]
            entry = {"n_users": int(len(tail_users))}
            for model, per_seed in results["runs"].get(label, {}).items():
                vals = []
                for r in per_seed.values():
                    t = pl.read_parquet(Path(r["run"]) / "per_user_test.parquet")
                    vals.append(float(t.filter(pl.col("user").is_in(tail_users.tolist()))["ndcg@10"].mean()))
                if vals:
                    entry[model] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
            out[label][rule] = entry
    return out


def pooled_tests(results: dict, data_paths: list[str], models) -> list[dict]:
    """Seed-averaged paired tests against SASRec, over all users and over the users whose test
    item is a tail item (the group is a property of the split, the same for every model/seed)."""
    import polars as pl

    import recforge.api as api
    from recforge.config import DATA_DEFAULTS
    from recforge.evaluation.evaluator import head_items
    from recforge.evaluation.significance import paired_tests
    from recforge.pipeline import eval_sets, load_dataset
    from recforge.data.split import leave_one_out

    out = []
    for d in data_paths:
        per_model = results["runs"].get(_label(d), {})
        base = per_model.get("sasrec", {})
        split = leave_one_out(load_dataset(dict(DATA_DEFAULTS, path=d)))
        _, test = eval_sets(split)
        tail_users = test.users[~head_items(split.item_popularity)[test.targets[:, 0]]]
        for model in models:
            other = per_model.get(model, {})
            seeds = sorted(set(base) & set(other))
            if model == "sasrec" or len(seeds) < 2:
                continue
            runs_a, runs_b = [base[s]["run"] for s in seeds], [other[s]["run"] for s in seeds]
            rows = api.compare(runs_a, runs_b, ["ndcg@10", "hr@10"])["rows"]
            # tail users from the split, so that runs written before per-user group columns existed work too
            a = api._mean_per_user(api._runs(runs_a))
            b = api._mean_per_user(api._runs(runs_b))
            keep = pl.col("user").is_in(tail_users.tolist())
            for r in paired_tests(a.filter(keep), b.filter(keep), ["ndcg@10"]):
                rows.append(r | {"metric": "tail ndcg@10"})
            out.append({"data": _label(d), "model": model, "variant": _variant(other), "seeds": seeds,
                        "users": f"{a.height} / tail {len(tail_users)}", "rows": rows})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value for every model (e.g. model.max_len=100)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", default=",".join(DATA))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--out", default=str(RESULTS / "semantic_ml.json"))
    args = ap.parse_args(argv)

    import recforge.api as api
    from recforge.config import DATA_DEFAULTS
    from recforge.semantic.store import embed

    out = Path(args.out)
    settings = {"epochs": args.epochs, "overrides": list(args.overrides)}
    results = json.loads(out.read_text()) if out.exists() else {}
    if results.get("settings") != settings:  # finished runs are reused only under the same settings
        if results:
            print(f"{out}: written with other settings ({results.get('settings')}); starting afresh", flush=True)
        results = {"settings": settings, "runs": {}, "compare": [], "tables": {}}
    results["protocol"] = (
        "Leave-one-out, full ranking over all items (history excluded, pessimistic ties); SASRec defaults (max_len 50, hidden 64, "
        f"2 layers, CE loss, early stopping on validation NDCG@10), at most {args.epochs} epochs"
        + (f", overrides: {' '.join(args.overrides)}" if args.overrides else "") + "; "
        "text: packaged all-MiniLM-L6-v2 over the default item template; head = most popular items holding 80% of "
        "training interactions, tail = the rest (groups of test targets).")
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets = args.data.split(",")
    models = args.models.split(",")
    tables = {}
    for d in datasets:
        path = RESULTS / "tmp" / f"{_label(d)}.semantic.parquet"
        info = embed(dict(DATA_DEFAULTS, path=d), out=path, progress=False)
        tables[d] = str(path)
        results["tables"][_label(d)] = {k: info[k] for k in ("items", "dim", "encoder", "encoded", "cached", "seconds")}
        print(f"{_label(d)}: semantic table {info['items']} items ({info['encoded']} encoded now) -> {path}", flush=True)

    def save():
        results["summary"] = _summary(results)
        out.write_text(json.dumps(results, indent=2))
        out.with_suffix(".md").write_text(_markdown(results))

    for seed in seeds:
        for d in datasets:
            label = _label(d)
            per_model = results["runs"].setdefault(label, {})
            for model in models:
                if str(seed) in per_model.get(model, {}):
                    continue
                ov = [f"seed={seed}", f"epochs={args.epochs}", *args.overrides]
                if model != "sasrec":
                    ov.append(f"semantic_table={tables[d]}")
                t0 = time.perf_counter()
                run = api.train(model, d, ov, out=RESULTS / "runs", verbose=False)
                per_model.setdefault(model, {})[str(seed)] = _row(run)
                r = per_model[model][str(seed)]
                print(f"{label:<24} {_label_model(model, r.get('variant')):<8} seed {seed}: "
                      f"ndcg@10 {r['test']['ndcg@10']:.4f} "
                      f"head {r['groups'].get('item:head', {}).get('ndcg@10', float('nan')):.4f} "
                      f"tail {r['groups'].get('item:tail', {}).get('ndcg@10', float('nan')):.4f} "
                      f"(best epoch {r['best_epoch']}, {time.perf_counter() - t0:.0f} s)", flush=True)
                save()
            base = per_model.get("sasrec", {}).get(str(seed))
            for model in models:
                other = per_model.get(model, {}).get(str(seed))
                done = any(c["data"] == label and c["model"] == model and c["seed"] == seed for c in results["compare"])
                if model == "sasrec" or not base or not other or done:
                    continue
                cmp = api.compare(base["run"], other["run"], ["ndcg@10", "hr@10"])
                results["compare"].append({"data": label, "model": model, "variant": other.get("variant"), "seed": seed,
                                           "rows": cmp["rows"], "warnings": cmp["warnings"]})
                save()
    results["pooled"] = pooled_tests(results, datasets, models)
    results["paper_tails"] = paper_tails(results, datasets)
    save()
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
