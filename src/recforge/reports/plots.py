"""Plots where a table would be hard to read: training curves and per-group metrics of a run,
and leaderboards with their spread over seeds. Needs matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import json
from pathlib import Path

from recforge.errors import RecForgeError


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RecForgeError("plots need matplotlib: pip install 'recforge[plot]'") from None
    return plt


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Training curve (loss and validation metric per epoch, when the model is trained by
    epochs) and test NDCG@10 / HR@10 per user group, side by side, as a PNG."""
    plt = _plt()
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    hist_file = run_dir / "history.json"
    history = json.loads(hist_file.read_text()) if hist_file.exists() else None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if history and history.get("epochs"):
        ep = [e["epoch"] for e in history["epochs"]]
        ax.plot(ep, [e["loss"] for e in history["epochs"]], color="tab:gray", label="training loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        vm = [k for k in history["epochs"][0] if "@" in k] or [k for e in history["epochs"] for k in e if "@" in k][:1]
        if vm:
            ax2 = ax.twinx()
            pts = [(e["epoch"], e[vm[0]]) for e in history["epochs"] if vm[0] in e]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue", label=f"valid {vm[0]}")
            ax2.axvline(history.get("best_epoch", 0), color="tab:blue", ls=":", lw=1)
            ax2.set_ylabel(f"valid {vm[0]}")
        ax.set_title("training")
    else:
        ax.text(0.5, 0.5, "closed-form / non-iterative model", ha="center", va="center")
        ax.set_axis_off()
    groups = metrics.get("groups", {})
    names = list(groups)
    ax = axes[1]
    if names:
        x = range(len(names))
        w = 0.4
        ax.bar([i - w / 2 for i in x], [groups[g].get("ndcg@10", 0) for g in names], w, label="NDCG@10")
        ax.bar([i + w / 2 for i in x], [groups[g].get("hr@10", 0) for g in names], w, label="HR@10")
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{g}\n(n={groups[g].get('n_users')})" for g in names], fontsize=7)
        ax.legend()
    ax.set_title(f"test by group — {metrics.get('model')} (full ranking)")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "plot.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_leaderboard(board: dict, out: str | Path, metric: str = "ndcg@10") -> Path:
    """Bars of ``metric`` (mean over seeds, error bar = standard deviation) per model and dataset."""
    plt = _plt()
    rows = [r for r in board["rows"] if metric in r]
    datasets = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(max(5, 2.2 * len(rows) / max(1, len(datasets))) * len(datasets), 3.8),
                             squeeze=False)
    for ax, d in zip(axes[0], datasets):
        rs = [r for r in rows if r["data"] == d]
        ax.bar([r["model"] for r in rs], [r[metric]["mean"] for r in rs], yerr=[r[metric]["std"] for r in rs], capsize=4)
        ax.set_title(str(Path(str(d)).name))
        ax.set_ylabel(f"test {metric}")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{metric}, mean ± std over seeds {board.get('seeds')}, full ranking")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
