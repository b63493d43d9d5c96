"""Seed systems of a model family against their baseline (defaults), with Pop and EASE rows, 3 seeds,
full ranking, paired tests, seconds per epoch and peak memory.

    python benchmarks/compare_models.py --family seq|graph [--data NAME|PATH] [--seeds 0,1,2]
                                        [--models NAME,...] [--jobs 2] [--budget SECONDS] [--fresh]
                                        [--set KEY=VALUE ...] [--sampled] [--table] [--merge FILE]

Families (``FAMILIES``): ``seq``, the sequential seed systems against SASRec (GRec, CmnRec with its
chunk modes (none: the memory network without chunks; pec, tsc: the paper's; gap: ours, by time gaps), MA-GNN, APGL4SR, DiffuASR with two backbones); ``graph``, the graph seed systems against
LightGCN and MF-BPR (MHCN with the social links, IMCA with the tags, TIL on MF and LightGCN).

Data (``../shared/data``): ``ml-100k`` (``movielens-100k``, real timestamps), ``beauty``
(``amazon-beauty/Beauty.txt``, order only), ``beauty-time`` (``amazon-beauty-time``, real timestamps,
needed by CmnRec's time-sensitive chunks), ``ml-latest-small`` (with ``tags.csv``), ``lastfm``
(``lastfm-social``: LightGCN's train/test split and the friendship links), ``ml-100k-popshift`` (MovieLens-100K
with ``split.method=popularity_shift``: the popularity-shift split of the out-of-distribution models),
``ml-100k-temporal`` (MovieLens-100K with ``split.method=temporal``: train early, test late, the temporal shift).

Protocol for every row: the data's default split (leave-one-out: last item test, second-to-last
validation; ``lastfm``: its given train/test files), **full ranking** over every item, the user's
history excluded, pessimistic ties, **no sub-sequence splitting** (``subseq=none``); early stopping on
validation NDCG@10 with each model's default patience, the best-validation weights tested. Every model
runs with its YAML defaults (never tuned on these test splits), ``threads=1``; the family table lists
the few named variants and the side data a model reads (``data.social=auto``, ``data.tags=auto``).
Paired tests (t-test and Wilcoxon on per-user metrics averaged over seeds) of every model against the
family's baselines.

Each (model, seed) runs in its own process (``--jobs 2``: two at once, one thread each, so seconds
per epoch are two-process figures) and keeps its run folder under
``benchmarks/results/runs/<family>/<data>/`` (ignored by git); a later call with other ``--models`` adds
to the same table, ``--fresh`` starts over. Writes ``benchmarks/results/<family>_<data>.json``.
``--set KEY=VALUE`` (repeatable) overrides a setting of every trained model of the call, for a comparison
under a common budget (``--set epochs=120``: every model stops after 120 epochs at the latest); the
results then go to ``<family>_<data>_<key><value>.json`` and the protocol names the setting.
``--sampled`` evaluates the finished runs of a results file once more under the *labelled* sampled
protocol (the held-out item against 99 items drawn uniformly outside the user's history: SASRec's
paper, DiffuASR's code) and stores it beside full ranking, to set our figures beside published ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_jobs import (SAMPLED99_FILE, collect, fit_figures, merge_rows, paired, recorded_tests,  # noqa: E402
                          resumable, run_lock, sampled99, summarise)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATASETS = {"ml-100k": SHARED / "movielens-100k", "beauty": SHARED / "amazon-beauty" / "Beauty.txt",
            "beauty-time": SHARED / "amazon-beauty-time", "ml-latest-small": SHARED / "movielens-latest-small",
            "lastfm": SHARED / "lastfm-social", "ml-100k-popshift": SHARED / "movielens-100k",
            "ml-100k-temporal": SHARED / "movielens-100k"}

#: data -> overrides for every model: LastFM's given split has no validation part, so each user's last
#: training row is carved out for early stopping (``split.valid=last``, recorded in the run's protocol)
DATA_OVERRIDES = {"lastfm": {"split.valid": "last"},
                  # the out-of-distribution models' shifted split: test and validation pairs drawn inversely to
                  # item popularity (split.method=popularity_shift; its protocol records the measured shift)
                  "ml-100k-popshift": {"split.method": "popularity_shift"},
                  # the temporal shift: a global time cut-off, training early and testing late (split.method=temporal)
                  "ml-100k-temporal": {"split.method": "temporal"}}

#: family -> models (name -> (registry model, overrides on top of the model's defaults)) and baselines
FAMILIES = {
    "seq": {"models": {
        "pop": ("pop", {}),
        "ease": ("ease", {}),
        "sasrec": ("sasrec", {}),
        "gru4rec": ("gru4rec", {}),
        "grec": ("grec", {}),
        "cmnrec": ("cmnrec", {"chunk": "none"}),
        "cmnrec-pec": ("cmnrec", {"chunk": "pec"}),
        "cmnrec-tsc": ("cmnrec", {"chunk": "tsc"}),
        "cmnrec-gap": ("cmnrec", {"chunk": "gap"}),  # chunks closed by time gaps: data with real timestamps
        "magnn": ("magnn", {}),
        "apgl4sr": ("apgl4sr", {}),
        "diffuasr": ("diffuasr", {"backbone": "sasrec"}),
        "diffuasr-gru4rec": ("diffuasr", {"backbone": "gru4rec"}),
    }, "baselines": ("sasrec", "ease")},
    "graph": {"models": {
        "pop": ("pop", {}),
        "ease": ("ease", {}),
        "mf": ("lightgcn", {"n_layers": 0}),
        "lightgcn": ("lightgcn", {}),
        "mhcn": ("mhcn", {"data.social": "auto"}),
        "imca": ("imca", {"data.tags": "auto"}),
        "til": ("til", {}),
        "til-mf": ("til", {"n_layers": 0}),
        "hetsgformer": ("hetsgformer", {}),
        # CNSDiff against LightGCN's own negative samplers (training otherwise identical)
        "lightgcn-popneg": ("lightgcn", {"neg_sampler": "popularity"}),
        "lightgcn-hardneg": ("lightgcn", {"neg_sampler": "hard"}),
        "cnsdiff": ("cnsdiff", {}),
        "drgo": ("drgo", {}),
        "causaldiffrec": ("causaldiffrec", {}),
    }, "baselines": ("lightgcn", "mf")},
}
KEYS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "recall@20")
PARTS = {"full": "per_user_test.parquet",
         # the sampled protocol of SASRec and of DiffuASR's code, added to finished runs by --sampled
         "sampled99": SAMPLED99_FILE}
SAMPLED_LABEL = ("SAMPLED: the held-out item against 99 items drawn uniformly outside the user's history "
                 "(the protocol of SASRec's paper and DiffuASR's code), history excluded, pessimistic ties; not comparable "
                 "with full ranking")
#: protocol entries of a run worth keeping in its row (model notes: augmentation, memory operations ...)
SKIP_NOTES = ("split", "exclude", "ties", "data")


def run_dir(family: str, label: str) -> Path:
    return ROOT / "benchmarks" / "results" / "runs" / family / label


def parse_sets(sets: list[str]) -> dict[str, str]:
    """``--set key=value`` pairs: overrides for every trained model of the call (not Pop or EASE)."""
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: write key=value, e.g. --set epochs=120")
        out[key] = value
    return out


def table_label(data: str, sets: dict[str, str]) -> str:
    """The results' name: the data, then every ``--set`` (``ml-100k_epochs120``)."""
    label = data if data in DATASETS else Path(data).name
    return "_".join([label] + [f"{k}{v}" for k, v in sets.items()])


def worker(family: str, name: str, seed: int, data: str, sets: dict[str, str] | None = None,
           fresh: bool = False) -> dict:
    """Train and evaluate one (model, seed) in this process; its row (per-user table in the run folder).
    A run a stopped call left part-trained resumes from its last checkpoint, unless ``fresh``."""
    import recforge

    sets = sets or {}
    model, extra = FAMILIES[family]["models"][name]
    overrides = {"seed": seed, **DATA_OVERRIDES.get(data, {}), **extra}
    if model not in ("pop", "ease"):
        overrides.update(threads=1, device="cpu", **sets)
    out = run_dir(family, table_label(data, sets)) / f"{name}-s{seed}"
    with run_lock(out):
        partial = resumable(out, resume=not fresh)
        t0 = time.perf_counter()
        run = recforge.train(model, data=str(DATASETS.get(data, data)), overrides=overrides, out=out, verbose=False,
                             resume=partial)
        wall = time.perf_counter() - t0
    full = run.metrics["test"]
    protocol = run.metrics.get("protocol", {})
    notes = {k: v for k, v in protocol.items() if k not in SKIP_NOTES and isinstance(v, (int, float, str, bool))}
    return {"name": name, "model": model, "seed": seed, "run": os.path.relpath(run.path, ROOT),
            "overrides": {k: v for k, v in overrides.items() if k != "seed"}, **fit_figures(run, wall),
            "full": {k: round(float(full[k]), 4) for k in KEYS if k in full}, "n_users": int(full.get("n_users", 0)),
            "protocol": {k: protocol.get(k) for k in ("exclude", "ties", "split")}, "notes": notes}


def write(out: Path, family: str, data: str, rows: list[dict], wall: float, sets: dict[str, str]) -> None:
    fam = FAMILIES[family]
    parts = {k: v for k, v in PARTS.items() if all(k in r for r in rows)}
    summary = summarise(rows, fam["models"], list(parts))
    before = recorded_tests(out)
    for name, s in summary.items():
        s["vs"] = {b: paired(rows, ROOT, name, b, parts, recorded=before.get(name, {}).get(b))
                   for b in fam["baselines"] if b != name}
    result = {"family": family, "data": os.path.relpath(DATASETS.get(data, Path(data)), ROOT),
              "protocol": "the data's default split (see each run's protocol.split); full ranking over every item, "
                          "the user's history excluded, pessimistic ties; subseq=none; early stopping on validation "
                          "NDCG@10 (model defaults), best-validation weights tested; model defaults, threads=1"
                          + "".join(f"; {k}={v} for every trained model" for k, v in sets.items()),
              "wall_s": round(wall, 1), "runs": rows, "summary": summary}
    if "sampled99" in parts:
        result["sampled99_protocol"] = SAMPLED_LABEL
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def add_sampled(out: Path, family: str, data: str, sets: dict[str, str], names: list[str] | None) -> None:
    """Evaluate the finished runs of a results file once more under the labelled sampled protocol
    (99 negatives) and store it beside full ranking (``sampled99`` of each row, per-user tables
    in the run folders); the runs are not retrained."""
    result = json.loads(out.read_text())
    rows = result["runs"]
    for r in rows:
        if names and r["name"] not in names:
            continue
        r["sampled99"] = sampled99(ROOT / r["run"], KEYS)
        print(f"{r['name']:17s} seed {r['seed']}  sampled-99 HR@10 {r['sampled99']['hr@10']:.4f}  "
              f"NDCG@10 {r['sampled99']['ndcg@10']:.4f}", flush=True)
    write(out, family, data, rows, result.get("wall_s", 0.0), sets)


def table(result: dict) -> str:
    """The results file as a Markdown table: mean ± sd over seeds, the paired difference to each
    baseline with its t-test p-value (and the seeds it pairs where fewer than the row's), seconds per
    epoch and peak memory."""
    fam = FAMILIES[result["family"]]
    bases = fam["baselines"]
    sampled = "sampled99_protocol" in result
    head = (["model", "seeds", "NDCG@10", "HR@10"] + (["sampled-99 NDCG@10", "sampled-99 HR@10"] if sampled else [])
            + [f"Δ NDCG@10 vs {b} (p)" for b in bases] + ["s/epoch", "peak MB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in result["summary"].items():
        keys = [f"full {k}" for k in ("ndcg@10", "hr@10")] + ([f"sampled99 {k}" for k in ("ndcg@10", "hr@10")]
                                                                if sampled else [])
        cells = [name, str(len(s["seeds"]))] + [f"{s[k][0]:.4f} ± {s[k][1]:.4f}" for k in keys]
        for b in bases:
            vs = s.get("vs", {}).get(b, {})
            t = vs.get("full", {}).get("ndcg@10")
            only = vs.get("seeds")  # the seeds with per-user tables on both sides, where not every seed
            note = f"; seeds {','.join(map(str, only))}" if t and only and len(only) < len(s["seeds"]) else ""
            cells.append(f"{t['model_minus_baseline']:+.4f} ({t['t_test_p']:.2g}{note})" if t else "–")
        cells += [f"{s['s_per_epoch']:.2f}" if s["s_per_epoch"] else "–", f"{s['peak_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), default="seq")
    ap.add_argument("--data", default="ml-100k")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--models", default=None, help="default: every model of the family")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=None, help="no new run after this many seconds")
    ap.add_argument("--fresh", action="store_true",
                    help="forget earlier rows of this data set and start stopped runs over")
    ap.add_argument("--jobs", type=int, default=1, help="(model, seed) runs at once, one thread each")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every trained model of this call (e.g. epochs=120); names the results file")
    ap.add_argument("--sampled", action="store_true",
                    help="evaluate the finished runs of the results file again under the labelled sampled-99 "
                         "protocol (no training) and add it beside full ranking")
    ap.add_argument("--table", action="store_true", help="print the Markdown table of the results file; run nothing")
    ap.add_argument("--merge", metavar="FILE", default=None,
                    help="merge the JSON rows in FILE (one per line, e.g. a log's rows that could not be written) "
                         "into the results file; run nothing")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sets = parse_sets(args.set)
    if args.worker:
        print(json.dumps(worker(args.family, args.worker[0], int(args.worker[1]), args.data, sets, args.fresh)))
        return 0
    label = table_label(args.data, sets)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{args.family}_{label}.json")
    if args.table:
        print(table(json.loads(out.read_text())))
        return 0
    if args.merge:
        n = merge_rows(out, Path(args.merge), lambda rows, wall: write(out, args.family, args.data, rows, wall, sets))
        print(f"merged {n} row(s) into {out}")
        return 0
    if args.sampled:
        add_sampled(out, args.family, args.data, sets, args.models.split(",") if args.models else None)
        print(f"wrote {out}")
        return 0
    path = DATASETS.get(args.data, Path(args.data))
    if not Path(path).exists():
        print(f"{path}: data not found (the shared datasets live in ../shared/data); nothing run", file=sys.stderr)
        return 2
    models = FAMILIES[args.family]["models"]
    names = args.models.split(",") if args.models else list(models)
    unknown = [n for n in names if n not in models]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)} of family {args.family}; choose from {', '.join(models)}",
              file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    collect(__file__, out, args.fresh, [(name, seed) for seed in seeds for name in names],
            ["--family", args.family, "--data", args.data] + [f"--set={x}" for x in args.set], args.jobs, args.budget,
            lambda rows, wall: write(out, args.family, args.data, rows, wall, sets),
            lambda r: f"{r['name']:17s} seed {r['seed']}  HR@10 {r['full']['hr@10']:.4f}  NDCG@10 {r['full']['ndcg@10']:.4f}  "
                      f"{r['epochs_run']} epochs {r['s_per_epoch']:.2f} s/epoch  {r['peak_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
