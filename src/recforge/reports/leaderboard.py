"""Leaderboards as Markdown and JSON, and a bar chart when matplotlib is available."""

from __future__ import annotations

import json
from pathlib import Path


def _protocol_text(p: dict) -> str:
    if p.get("task") == "ctr":  # labelled feature rows: the split and what the rows are
        sp = p.get("split", {})
        desc = sp.get("method", "?") + (f" {':'.join(f'{r:g}' for r in sp['ratios'])} seed {sp.get('seed')}"
                                        if "ratios" in sp else "")
        derived = " (rows derived from a log: " + p["data"]["derived"] + ")" if "derived" in p.get("data", {}) else ""
        return f"CTR, split {desc}, labels {', '.join(p.get('labels', []))}{derived}"
    split = p.get("split", {}).get("split", "?") if isinstance(p.get("split"), dict) else p.get("split")
    ranking = p.get("label") or ("full ranking" if p.get("ranking") == "full" else p.get("ranking"))
    sub = p.get("subsequence_split", "none")
    exclude = p.get("exclude") or ("history" if p.get("exclude_history", True) else "none")
    if exclude == "target_behavior":
        exclude = f"target_behavior ({p.get('target_behavior')})"
    ties = p.get("ties", "index")  # figures from before ties were named broke them by item index
    return f"{split}, {ranking}, excluded={exclude}, ties={ties}, sub-sequence split={sub}"


def format_leaderboard(board: dict, groups: str = "item") -> str:
    """Markdown table of a leaderboard. ``groups`` picks the group columns: ``item`` (tail and head
    items, the default), ``hist`` (history-length bins), ``all`` or ``none``."""
    rows = board["rows"]
    if not rows:
        return "(no runs)"
    shown = {"item": ("item:",), "hist": ("hist:",), "all": ("item:", "hist:"), "none": ()}[groups]
    metric_cols = [k for k in rows[0] if isinstance(rows[0][k], dict) and "mean" in rows[0][k]
                   and (not k.startswith(("item:", "hist:")) or k.startswith(shown))]
    header = ["data", "model", *metric_cols, "fit s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["data"]), r["model"]]
        for k in metric_cols:
            v = r.get(k)
            if not v:
                cells.append("")
            elif r.get("n_seeds", 1) > 1:
                cells.append(f"{v['mean']:.4f} ± {v['std']:.4f}")
            else:
                cells.append(f"{v['mean']:.4f}")
        cells.append(f"{r['fit_seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    protos = sorted({_protocol_text(r["protocol"]) for r in rows})
    lines.append("")
    seeds = board.get("seeds") or []
    head = f"Mean ± std over seeds {seeds}" if len(seeds) > 1 else f"One seed ({seeds[0] if seeds else '?'}): no spread"
    lines.append(f"{head}. Protocol: " + "; ".join(protos) + ".")
    return "\n".join(lines)


def write_leaderboard(board: dict, folder: Path, groups: str = "item") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "leaderboard.json").write_text(json.dumps(board, indent=2, default=str))
    (folder / "leaderboard.md").write_text(format_leaderboard(board, groups) + "\n")
    try:
        from recforge.reports.plots import plot_leaderboard

        plot_leaderboard(board, folder / "leaderboard.png")
    except Exception:  # plotting is a convenience: a missing matplotlib never fails a benchmark
        pass
