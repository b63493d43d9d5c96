"""MARC's compressed language-model vectors against raw text vectors, as the item text vectors of
LLM-ESR and FAERec on MovieLens-100K: quality, vector size and the seconds of building each table.

    python benchmarks/marc_compare.py [--seeds 0,1,2] [--models llmesr,faerec] [--epochs 200]
                                      [--marc-epochs 30] [--dim 64] [--data PATH] [--out FILE] [key=value ...]

Item text vectors compared (``VARIANTS``), all over the default item text template (MovieLens-100K:
title and genres):

* ``minilm``: the packaged all-MiniLM-L6-v2 sentence vectors (384-d), what LLM-ESR and FAERec read by
  default: the reference of every paired test;
* ``llm-final``: SmolLM2-135M-Instruct's final layer (30 of 30, after the final norm), mean-pooled over
  the text's tokens, each dimension z-scored over the items, rows L2-normalised (576-d), no training;
* ``llm-mid``: the same for layer 15 of 30 (the paper's Mid-layer Representation Advantage says this
  should serve better than the final layer);
* ``marc``: MARC (``recforge/semantic/marc.py``, defaults: layers 5, 10, ..., 30, ``dim`` 64), trained
  for each seed on that seed's run's split **training part only**, with the same seed.

Protocol: leave-one-out (last item test, second-to-last validation), **full ranking** over all items
with the user's history excluded, pessimistic ties; every model with its YAML defaults (SASRec
backbone: max_len 50, hidden 64, 2 layers, full-softmax cross-entropy, early stopping on validation
NDCG@10, patience 10), at most ``--epochs`` epochs, ``threads=1``; the text vectors given as
``semantic_table=FILE``. Each (model, variant, seed) is a run folder under
``benchmarks/results/runs/marc/``; paired t-test and Wilcoxon test over users
(``recforge.api.compare``) of every variant against ``minilm``, per seed and on the per-user metrics
averaged over the seeds.

Vector sizes are float32 bytes per item. Build seconds are measured with the script's own vector
cache (``benchmarks/results/runs/marc/cache``), so the first call measures the encoders really
running: ``minilm`` the sentence encoder over every item text; the language-model pass (one forward
pass over every item text gives every layer) is counted once, under ``marc``'s feature seconds,
and the ``llm-*`` tables then only read their layer from the cache; ``marc`` adds its training
seconds per seed. A later call reuses the cache and keeps the first measurement.

Results go to ``benchmarks/results/marc_compare.json`` and ``.md`` (``--out``); finished runs are
skipped when the script is started again with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
WORK = RESULTS / "runs" / "marc"
DATA = ROOT.parent / "shared" / "data" / "movielens-100k"
MODELS = ("llmesr", "faerec")
VARIANTS = ("minilm", "llm-final", "llm-mid", "marc")
BASE = "minilm"


def _protocol(args) -> str:
    return ("Leave-one-out, full ranking over all items (history excluded, pessimistic ties); each model's YAML defaults "
            f"(SASRec backbone, CE loss, early stopping on validation NDCG@10), at most {args.epochs} epochs, "
            f"overrides: {' '.join(args.overrides) or 'none'}; item text vectors given as semantic_table=FILE: "
            f"minilm = all-MiniLM-L6-v2 (384-d), llm-final / llm-mid = SmolLM2-135M layer 30 / 15 mean-pooled, "
            f"z-scored, L2 (576-d), marc = MARC {args.dim}-d (layers auto, at most {args.marc_epochs} epochs, early "
            "stopping on each user's last training transition), trained per seed on the split's training part; "
            "paired t-test and Wilcoxon over users against minilm.")


def build_tables(args, seed: int, results: dict, data: str) -> dict:
    """The four tables of one seed (the ``minilm`` and ``llm-*`` tables are the same for every
    seed; ``marc`` is trained per seed); returns ``{variant: path}``. What each build measured is
    kept in ``tables/builds.json`` beside the tables (the first build of a table is the one that ran
    its encoder), and copied into ``results["tables"]``."""
    import recforge.api as api
    from recforge.pipeline import load_dataset, split_dataset
    from recforge.semantic.marc import llm_layer_table, marc_table
    from recforge.semantic.store import VectorCache, semantic_table

    cache = VectorCache(WORK / "cache")
    folder = WORK / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    builds_path = folder / "builds.json"
    builds = json.loads(builds_path.read_text()) if builds_path.exists() else {}
    # marc before the llm-* tables: its one language-model pass caches every layer they read
    paths = {"minilm": folder / "minilm.parquet",
             "marc": folder / f"marc-d{args.dim}-e{args.marc_epochs}-s{seed}.parquet",
             "llm-final": folder / "llm-final.parquet", "llm-mid": folder / "llm-mid.parquet"}
    cfg = api.resolve("llmesr", data, [f"seed={seed}", *args.overrides])
    ds = split = None
    for variant, path in paths.items():
        if path.exists() and path.name in builds:
            continue
        if ds is None:
            ds = load_dataset(cfg["data"])
            split = split_dataset(ds, cfg)  # the split every run of this seed uses
        t0 = time.perf_counter()
        if variant == "minilm":
            table = semantic_table(ds, cache=cache, progress=False)
        elif variant == "marc":
            table = marc_table(ds, split, cache=cache, dim=args.dim, epochs=args.marc_epochs, seed=seed)
        else:
            table = llm_layer_table(ds, "final" if variant == "llm-final" else "mid", cache=cache)
        seconds = time.perf_counter() - t0
        table.save(path)
        entry = {"dim": table.dim, "bytes_per_item": 4 * table.dim, "encoder": table.encoder,
                 "seconds": round(seconds, 2)}
        if variant == "minilm":
            entry["encoded"] = table.stats.get("encoded", 0)
        else:
            entry["layers"] = table.stats["layer_states"]["layers"]
            entry["language_model_texts"] = table.stats["layer_states"]["run"]
        if variant == "marc":
            m = table.stats["marc"]
            entry |= {"feature_seconds": table.stats["feature_seconds"], "train_seconds": table.stats["train_seconds"],
                      "layer_weights": m["layer_weights"], "best_epoch": m["best_epoch"],
                      "epochs_run": m["epochs_run"], "heldout_ndcg@10": m["heldout_ndcg@10"]}
            if entry["language_model_texts"] and "lm_pass" not in builds:  # the pass that ran the language model
                builds["lm_pass"] = {"seconds": entry["feature_seconds"], "texts": entry["language_model_texts"],
                                     "layers": entry["layers"]}
        builds[path.name] = entry
        builds_path.write_text(json.dumps(builds, indent=2))
        print(f"table {variant} (seed {seed}): {table.dim}-d, {seconds:.1f} s -> {path}", flush=True)
    info = results.setdefault("tables", {})
    for variant, path in paths.items():
        if variant == "marc":
            info.setdefault("marc", {})[str(seed)] = builds[path.name]
        else:
            info[variant] = builds[path.name]
    if "lm_pass" in builds:
        info["lm_pass"] = builds["lm_pass"]
    return {v: str(p) for v, p in paths.items()}


def _row(run) -> dict:
    m = run.metrics
    return {"run": os.path.relpath(run.path, ROOT), "test": {k: m["test"][k] for k in ("ndcg@10", "hr@10", "ndcg@20", "mrr") if k in m["test"]},
            "valid_ndcg@10": m["valid"].get("ndcg@10"), "best_epoch": m.get("training", {}).get("best_epoch"),
            "fit_seconds": m["timing"]["fit_seconds"]}


def _summary(results: dict) -> dict:
    out = {}
    for model, per_variant in results["runs"].items():
        out[model] = {}
        for variant, per_seed in per_variant.items():
            rows = list(per_seed.values())
            entry = {"seeds": sorted(int(s) for s in per_seed)}
            for key, get in (("ndcg@10", lambda r: r["test"]["ndcg@10"]), ("hr@10", lambda r: r["test"]["hr@10"]),
                             ("fit_seconds", lambda r: r["fit_seconds"])):
                vals = np.array([get(r) for r in rows], dtype=float)
                if len(vals):
                    entry[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
            out[model][variant] = entry
    return out


def _size(results: dict, variant: str) -> tuple[str, str, str]:
    """(dim, bytes per item, build seconds) cells of a variant."""
    t = results.get("tables", {})
    lm = t.get("lm_pass", {}).get("seconds")
    lm_cell = f"{lm:.0f} (LM pass)" if lm is not None else "LM pass (cached)"
    if variant == "marc":
        per = t.get("marc", {})
        if not per:
            return "-", "-", "-"
        e = next(iter(per.values()))
        train = np.mean([x["train_seconds"] for x in per.values()])
        return str(e["dim"]), str(e["bytes_per_item"]), f"{lm_cell} + {train:.0f} (training)"
    e = t.get(variant)
    if not e:
        return "-", "-", "-"
    return str(e["dim"]), str(e["bytes_per_item"]), f"{e['seconds']:.0f}" if variant == BASE else lm_cell


def _markdown(results: dict) -> str:
    s = results["summary"]
    fmt = lambda e, k: f"{e[k]['mean']:.4f} ± {e[k]['std']:.4f}" if k in e else "-"  # noqa: E731
    lines = ["# MARC: compressed language-model item vectors in LLM-ESR / FAERec (MovieLens-100K)", "",
             results["protocol"], "",
             "| model | text vectors | dim | bytes/item | build s | seeds | NDCG@10 | HR@10 | fit s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, per_variant in s.items():
        for variant in VARIANTS:
            e = per_variant.get(variant)
            if not e:
                continue
            dim, size, secs = _size(results, variant)
            lines.append(f"| {model} | {variant} | {dim} | {size} | {secs} | {','.join(map(str, e['seeds']))} | "
                         f"{fmt(e, 'ndcg@10')} | {fmt(e, 'hr@10')} | {e['fit_seconds']['mean']:.0f} |")
    marc = results.get("tables", {}).get("marc", {})
    if marc:
        lines += ["", "MARC tables per seed: " + "; ".join(
            f"seed {sd}: layers {e['layers']} weights {e['layer_weights']}, best epoch {e['best_epoch']} of "
            f"{e['epochs_run']}, held-out training-transition NDCG@10 {e['heldout_ndcg@10']:.4f}, "
            f"{e['train_seconds']:.0f} s training" for sd, e in sorted(marc.items()))]
    lines += ["", f"## Paired tests against {BASE} (per seed, over users; `recforge compare`)", "",
              f"| model | text vectors | seed | metric | {BASE} | variant | diff | t-test p | Wilcoxon p |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in results["compare"]:
        for r in c["rows"]:
            lines.append(f"| {c['model']} | {c['variant']} | {c['seed']} | {r['metric']} | {r['a']:.4f} | {r['b']:.4f} | "
                         f"{r['diff']:+.4f} | {r['t_test_p']:.3g} | {r['wilcoxon_p']:.3g} |")
    if results.get("pooled"):
        lines += ["", f"## Paired tests against {BASE} over the seeds (each user's metric averaged over the seeds first)",
                  "", f"| model | text vectors | seeds | metric | {BASE} | variant | diff | t-test p | Wilcoxon p |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in results["pooled"]:
            for r in c["rows"]:
                lines.append(f"| {c['model']} | {c['variant']} | {','.join(map(str, c['seeds']))} | {r['metric']} | "
                             f"{r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} | {r['t_test_p']:.3g} | "
                             f"{r['wilcoxon_p']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value for every run (default: threads=1)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--epochs", type=int, default=200, help="most epochs of each sequential model (early stopping)")
    ap.add_argument("--marc-epochs", type=int, default=30, help="most epochs of MARC's training (early stopping)")
    ap.add_argument("--dim", type=int, default=64, help="size of MARC's vectors")
    ap.add_argument("--out", default=str(RESULTS / "marc_compare.json"))
    args = ap.parse_args(argv)
    args.overrides = args.overrides or ["threads=1"]

    import recforge.api as api

    if not Path(args.data).exists():
        print(f"{args.data}: MovieLens-100K not found (the shared data folder sits beside the project)", file=sys.stderr)
        return 2
    out = Path(args.out)
    settings = {"epochs": args.epochs, "marc_epochs": args.marc_epochs, "dim": args.dim, "data": os.path.relpath(args.data, ROOT),
                "overrides": list(args.overrides)}
    results = json.loads(out.read_text()) if out.exists() else {}
    if results.get("settings") != settings:  # finished runs are reused only under the same settings
        if results:
            print(f"{out}: written with other settings ({results.get('settings')}); starting afresh", flush=True)
        results = {"settings": settings, "runs": {}, "compare": []}
    results["protocol"] = _protocol(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    models, variants = args.models.split(","), args.variants.split(",")
    if BASE not in variants:
        variants.insert(0, BASE)

    def save():
        results["summary"] = _summary(results)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        out.with_suffix(".md").write_text(_markdown(results))

    for seed in seeds:
        tables = build_tables(args, seed, results, args.data)
        save()
        for model in models:
            per_variant = results["runs"].setdefault(model, {})
            for variant in variants:
                if str(seed) in per_variant.get(variant, {}):
                    continue
                ov = [f"seed={seed}", f"epochs={args.epochs}", *args.overrides, f"semantic_table={tables[variant]}"]
                t0 = time.perf_counter()
                run = api.train(model, args.data, ov, out=WORK / "runs", verbose=False)
                per_variant.setdefault(variant, {})[str(seed)] = r = _row(run)
                print(f"{model:<8} {variant:<10} seed {seed}: ndcg@10 {r['test']['ndcg@10']:.4f} hr@10 "
                      f"{r['test']['hr@10']:.4f} (best epoch {r['best_epoch']}, {time.perf_counter() - t0:.0f} s)",
                      flush=True)
                save()
            base = per_variant.get(BASE, {}).get(str(seed))
            for variant in variants:
                other = per_variant.get(variant, {}).get(str(seed))
                done = any(c["model"] == model and c["variant"] == variant and c["seed"] == seed
                           for c in results["compare"])
                if variant == BASE or not base or not other or done:
                    continue
                cmp = api.compare(ROOT / base["run"], ROOT / other["run"], ["ndcg@10", "hr@10"])
                results["compare"].append({"model": model, "variant": variant, "seed": seed, "rows": cmp["rows"],
                                           "warnings": cmp["warnings"]})
                save()
    results["pooled"] = []
    for model in models:
        per_variant = results["runs"].get(model, {})
        for variant in variants:
            common = sorted(set(per_variant.get(BASE, {})) & set(per_variant.get(variant, {})), key=int)
            if variant == BASE or len(common) < 2:
                continue
            cmp = api.compare([ROOT / per_variant[BASE][s]["run"] for s in common],
                              [ROOT / per_variant[variant][s]["run"] for s in common], ["ndcg@10", "hr@10"])
            results["pooled"].append({"model": model, "variant": variant, "seeds": [int(s) for s in common],
                                      "rows": cmp["rows"]})
    save()
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
