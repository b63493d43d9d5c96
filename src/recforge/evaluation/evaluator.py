"""Batched full-ranking evaluation (sampled-negative ranking only on request)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from recforge.evaluation.batch import EvalSet, Histories
from recforge.evaluation.metrics import metrics_from_ranks, target_ranks
from recforge.errors import ConfigError

DEFAULT_KS = (5, 10, 20)
DEFAULT_HIST_BINS = (5, 10, 20, 50)


@dataclass
class Protocol:
    """How ranking is done; written next to every number."""

    ranking: str = "full"  # "full" | "sampled"
    n_negatives: int = 0  # sampled only
    sampler: str = "uniform"  # sampled only: "uniform" | "popularity"
    exclude_history: bool = True

    def describe(self) -> dict:
        d = {"ranking": self.ranking, "exclude_history": self.exclude_history}
        if self.ranking == "sampled":
            d.update(n_negatives=self.n_negatives, sampler=self.sampler,
                     label=f"SAMPLED ({self.n_negatives} {self.sampler} negatives)")
        return d

    @classmethod
    def from_option(cls, sampled: str | int | None, exclude_history: bool = True) -> "Protocol":
        """``None``/"full" → full ranking; ``100`` or ``"100"`` or ``"100:popularity"`` → sampled."""
        if sampled in (None, "", "full", 0, "none"):
            return cls(exclude_history=exclude_history)
        text = str(sampled)
        n, _, sampler = text.partition(":")
        try:
            n_neg = int(n)
        except ValueError:
            raise ConfigError(f"eval.sampled={sampled!r}: expected a number of negatives like 100 or 100:popularity") from None
        sampler = sampler or "uniform"
        if sampler not in ("uniform", "popularity") or n_neg <= 0:
            raise ConfigError(f"eval.sampled={sampled!r}: use N or N:uniform or N:popularity with N > 0")
        return cls("sampled", n_neg, sampler, exclude_history)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    per_user: pl.DataFrame  # user (encoded) + one column per metric
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)


#: metrics also kept per user for the item groups (columns ``item:tail ndcg@10`` ...; NaN for a
#: user without a target in the group), so that a paired test can run on a group's users
GROUP_USER_METRICS = ("ndcg@", "hr@")


def head_items(popularity: np.ndarray, share: float = 0.8) -> np.ndarray:
    """Boolean mask (n_items + 1): the most popular items that together hold ``share`` of
    training interactions (the "head"); the others are the "tail"."""
    pop = popularity.astype(np.float64).copy()
    pop[0] = 0
    order = np.argsort(-pop, kind="stable")
    cum = np.cumsum(pop[order])
    total = cum[-1] if len(cum) else 0
    mask = np.zeros(len(pop), dtype=bool)
    if total <= 0:
        return mask
    n_head = int(np.searchsorted(cum, share * total) + 1)
    mask[order[:n_head]] = True
    mask[0] = False
    return mask


def _hist_bin_labels(bins) -> list[str]:
    labels, lo = [], 0
    for j, b in enumerate(bins):
        if j == 0:
            labels.append(f"hist:0-{b}")  # the first group also holds users with an empty history
        else:
            labels.append(f"hist:{lo + 1}-{b}" if lo + 1 < b else f"hist:{b}")
        lo = b
    labels.append(f"hist:>{lo}")
    return labels


def rank_scores(model, hist: Histories, targets: torch.Tensor, protocol: Protocol,
                popularity: np.ndarray | None, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Score one batch, apply exclusions (and negative sampling), return (scores, ranks)."""
    with torch.no_grad():
        # always a private copy: the masking below works in place and must never write into a
        # tensor the model keeps (a view like Pop's, or cached scores returned as they are)
        scores = model.score(hist).to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    b, n = scores.shape
    if protocol.exclude_history and len(hist.items):
        kept = scores.gather(1, targets)  # a repeated target stays rankable
        rows = torch.from_numpy(np.repeat(np.arange(b), hist.lengths))
        scores.index_put_((rows, torch.from_numpy(hist.items)), torch.tensor(-torch.inf))
        scores.scatter_(1, targets, kept)
    scores[:, 0] = -torch.inf
    if protocol.ranking == "sampled":
        allowed = torch.isfinite(scores)
        allowed.scatter_(1, targets, False)
        if protocol.sampler == "popularity" and popularity is not None:
            w = torch.from_numpy(popularity.astype(np.float64) + 1e-9).expand(b, n).clone()
        else:
            w = torch.ones(b, n, dtype=torch.float64)
        w = w.masked_fill(~allowed, 0.0)
        k = min(protocol.n_negatives, int(allowed.sum(1).min()))
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        neg = torch.multinomial(w, k, replacement=False, generator=gen)
        keep = torch.zeros(b, n, dtype=torch.bool)
        keep.scatter_(1, neg, True)
        keep.scatter_(1, targets, True)
        keep[:, 0] = False
        scores = scores.masked_fill(~keep, -torch.inf)
    return scores, target_ranks(scores, targets)


def evaluate(model, evalset: EvalSet, ks=DEFAULT_KS, protocol: Protocol | None = None,
             batch_size: int = 1024, popularity: np.ndarray | None = None,
             hist_bins=DEFAULT_HIST_BINS, groups: bool = True, seed: int = 0) -> EvalResult:
    """Rank every item for every evaluated user, batch by batch, and aggregate metrics.

    ``model`` needs ``score(Histories) -> Tensor (batch, n_items + 1)``. ``popularity`` (training
    counts per item) enables head/tail groups and popularity-sampled negatives.
    """
    protocol = protocol or Protocol()
    ks = sorted({int(k) for k in ks})
    kmax = max(ks)
    rng = np.random.default_rng(seed)
    n = evalset.histories.n_items + 1
    head = head_items(popularity) if (groups and popularity is not None) else None
    per_user: dict[str, list[np.ndarray]] = {}
    group_vals: dict[str, dict[str, list[np.ndarray]]] = {}
    covered = {k: np.zeros(n, dtype=bool) for k in ks}
    all_targets = torch.from_numpy(evalset.targets)

    for start in range(0, len(evalset), batch_size):
        stop = min(start + batch_size, len(evalset))
        hist = evalset.histories.slice(start, stop)
        tg = all_targets[start:stop]
        valid = tg > 0
        scores, ranks = rank_scores(model, hist, tg, protocol, popularity, rng)
        for name, v in metrics_from_ranks(ranks, valid, ks).items():
            per_user.setdefault(name, []).append(v.numpy())
        top = torch.topk(scores, min(kmax, n), dim=1).indices  # k may exceed a tiny catalogue
        finite = torch.isfinite(scores.gather(1, top))
        for k in ks:
            sel = top[:, :k][finite[:, :k]]
            covered[k][sel.numpy()] = True
        if head is not None:
            is_head = torch.from_numpy(head)[tg] & valid
            for label, mask in (("item:head", is_head), ("item:tail", valid & ~is_head)):
                for name, v in metrics_from_ranks(ranks, mask, ks).items():
                    group_vals.setdefault(label, {}).setdefault(name, []).append(v.numpy())
                    if name.startswith(GROUP_USER_METRICS):  # per user too, for paired tests on a group
                        per_user.setdefault(f"{label} {name}", []).append(v.numpy())

    cols = {name: np.concatenate(v) for name, v in per_user.items()}
    table = pl.DataFrame({"user": evalset.users, "history_length": evalset.histories.lengths, **cols})
    metric_names = [m for m in cols if not m.startswith("item:")]
    metrics = {m: float(np.nanmean(cols[m])) for m in metric_names}
    for k in ks:
        metrics[f"coverage@{k}"] = float(covered[k][1:].mean())
    metrics["n_users"] = int(len(evalset))

    out_groups: dict[str, dict[str, float]] = {}
    for label, vals in group_vals.items():
        arrs = {m: np.concatenate(v) for m, v in vals.items()}
        n_in = int(np.sum(~np.isnan(arrs["mrr"])))
        if n_in:
            out_groups[label] = {m: float(np.nanmean(a)) for m, a in arrs.items()} | {"n_users": n_in}
    if groups and hist_bins:
        lengths = evalset.histories.lengths
        edges = [-1, *hist_bins, np.inf]
        for label, lo, hi in zip(_hist_bin_labels(hist_bins), edges[:-1], edges[1:]):
            m = (lengths > lo) & (lengths <= hi)
            if m.any():
                out_groups[label] = ({k: float(np.nanmean(cols[k][m])) for k in metric_names}
                                     | {"n_users": int(m.sum())})
    return EvalResult(metrics, table, out_groups, protocol.describe())
