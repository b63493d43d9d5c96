"""Mean and spread over seeds of ``benchmarks/text_attack.py`` results, with paired tests over the
attacked targets: each seed's file draws its own long-tail targets (and, for LLM-ESR, trains its
own model), so the seeds are independent repeats of the whole measurement.

    python benchmarks/text_attack_seeds.py --llmesr text_attack.json,text_attack_llmesr_s1.json,...
        --llm text_attack.json,text_attack_llm_s1.json,... [--out benchmarks/results/text_attack_seeds.json]

(file names relative to ``benchmarks/results``). Per victim: the summary figures of each seed
(mean rank of the targets over the evaluated users before the attack, after it and after the
defence; exposure@k; targets moved up; edit sizes; overall quality with clean, attacked and
defended titles) as mean ± sample standard deviation over the seeds, and the Wilcoxon
signed-rank test of the per-target mean rank, after against before and defended against before,
over every target of every seed. Writes the JSON and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

RESULTS = Path(__file__).resolve().parent / "results"
#: victim -> (the exposure cut-off key of its summary, its quality block, the quality metrics shown)
VICTIMS = {"llmesr": ("exposure@10", "quality", ["ndcg@10", "tail ndcg@10"]),
           "llm": ("exposure@3", "quality_enlarged_sets", ["ndcg@10", "auc"])}


def mean_sd(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def victim_summary(victim: str, files: list[str]) -> dict:
    exp, qkey, qmetrics = VICTIMS[victim]
    per_seed, before, after, defended, adaptive = [], [], [], [], []
    for f in files:
        res = json.loads((RESULTS / f).read_text())
        part = res[victim]
        s, q = part["summary"], part[qkey]
        per_seed.append({"file": f, "seed": res["settings"]["seed"], "targets": s["targets"], "edited": s["edited"],
                         "moved_up": s["targets_moved_up"], "rank_before": s["mean_rank_before"],
                         "rank_after": s["mean_rank_after"], "rank_defended": s["mean_rank_defended"],
                         "exposure_before": s[f"{exp}_before"], "exposure_after": s[f"{exp}_after"],
                         "exposure_defended": s[f"{exp}_defended"], "word_edits": s["mean_word_edits"],
                         "char_distance": s["mean_char_distance"], "similarity": s["mean_similarity"],
                         "queries": s["mean_queries"], "attack_seconds": s["mean_attack_seconds"],
                         **{f"{m} {t}": q[t][m] for m in qmetrics for t in ("clean", "attacked", "defended")}})
        for t in part["targets"]:
            r = t["eval"]["mean_rank"]
            before.append(r["before"])
            after.append(r["after"])
            defended.append(r["defended"])
            if "adaptive" in t:
                adaptive.append(t["adaptive"]["mean_rank"])
    keys = [k for k in per_seed[0] if k not in ("file", "seed")]
    b, a, d = map(np.asarray, (before, after, defended))
    tests = {"targets": int(len(b)),
             "after_vs_before": {"median_change": float(np.median(a - b)),
                                 "wilcoxon_p": float(wilcoxon(a, b).pvalue) if np.any(a != b) else 1.0},
             "defended_vs_before": {"median_change": float(np.median(d - b)),
                                    "wilcoxon_p": float(wilcoxon(d, b).pvalue) if np.any(d != b) else 1.0}}
    out = {"files": files, "exposure": exp, "seeds": per_seed, "summary": {k: mean_sd([r[k] for r in per_seed])
                                                                           for k in keys}, "tests": tests}
    if adaptive:
        out["adaptive_mean_rank"] = mean_sd(adaptive)
    return out


def markdown(board: dict) -> str:
    lines = []
    for victim, v in board.items():
        s = v["summary"]
        f = (lambda k, p=4: f"{s[k]['mean']:.{p}f} ± {s[k]['std']:.{p}f}")  # noqa: E731
        lines += [f"**{victim}** ({len(v['seeds'])} seeds, {v['tests']['targets']} targets in all)", "",
                  "| titles | target mean rank | " + v["exposure"] + " |", "|---|---|---|"]
        for t in ("before", "after", "defended"):
            lines.append(f"| {t} | {f('rank_' + t, 1)} | {f('exposure_' + t)} |")
        t = v["tests"]
        lines += ["", f"targets moved up {f('moved_up', 1)} of {s['targets']['mean']:.0f} per seed; word edits {f('word_edits', 2)}, character distance "
                      f"{f('char_distance', 2)}, similarity {f('similarity', 3)}; per-target mean rank after − before: "
                      f"median {t['after_vs_before']['median_change']:+.2f} (Wilcoxon p "
                      f"{t['after_vs_before']['wilcoxon_p']:.3g}); defended − before: median "
                      f"{t['defended_vs_before']['median_change']:+.2f} (p {t['defended_vs_before']['wilcoxon_p']:.3g})"]
        if "adaptive_mean_rank" in v:
            lines[-1] += f"; adaptive attack through the defence: mean rank {v['adaptive_mean_rank']['mean']:.1f}"
        quality = [k.rsplit(" ", 1)[0] for k in s if k.endswith(" clean")]
        lines += ["", "| quality | clean | attacked | defended |", "|---|---|---|---|"]
        lines += [f"| {m} | {f(m + ' clean')} | {f(m + ' attacked')} | {f(m + ' defended')} |" for m in quality]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for v in VICTIMS:
        ap.add_argument(f"--{v}", default=None, help="comma-separated result files (under benchmarks/results)")
    ap.add_argument("--out", default=str(RESULTS / "text_attack_seeds.json"))
    args = ap.parse_args(argv)
    board = {v: victim_summary(v, getattr(args, v).split(",")) for v in VICTIMS if getattr(args, v)}
    if not board:
        raise SystemExit("give --llmesr and/or --llm result files")
    out = Path(args.out)
    out.write_text(json.dumps(board, indent=2))
    md = markdown(board)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
