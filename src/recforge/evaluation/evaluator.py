"""Batched full-ranking evaluation (sampled-negative ranking only on request)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from recforge.evaluation.batch import EvalSet, Histories
from recforge.evaluation.metrics import TIES, metrics_from_ranks, target_ranks
from recforge.errors import ConfigError
from recforge.training import distributed

DEFAULT_KS = (5, 10, 20)
DEFAULT_HIST_BINS = (5, 10, 20, 50)


#: which items are removed from a user's ranking (never dependent on the target):
#: ``history`` every item of the history; ``none`` nothing (repeat consumption);
#: ``target_behavior`` the items the user already had in the target behaviour (data with behaviours)
EXCLUDE = ("history", "none", "target_behavior")


@dataclass
class Protocol:
    """How ranking is done; written next to every number."""

    ranking: str = "full"  # "full" | "sampled"
    n_negatives: int = 0  # sampled only
    sampler: str = "uniform"  # sampled only: "uniform" | "popularity"
    exclude: str = "history"  # one of EXCLUDE
    ties: str = "pessimistic"  # one of metrics.TIES
    target_behavior: str | None = None  # exclude=target_behavior only

    def __post_init__(self):
        if self.exclude not in EXCLUDE:
            raise ConfigError(f"eval.exclude={self.exclude!r}: choose one of {', '.join(EXCLUDE)} (or auto)")
        if self.ties not in TIES:
            raise ConfigError(f"eval.ties={self.ties!r}: choose one of {', '.join(TIES)}")
        if self.exclude == "target_behavior" and not self.target_behavior:
            raise ConfigError("eval.exclude=target_behavior needs the target behaviour: "
                              "set data.target_behavior=NAME (e.g. buy)")

    def describe(self) -> dict:
        d = {"ranking": self.ranking, "exclude": self.exclude, "ties": self.ties}
        if self.exclude == "target_behavior":
            d["target_behavior"] = self.target_behavior
        if self.ranking == "sampled":
            d.update(n_negatives=self.n_negatives, sampler=self.sampler,
                     label=f"SAMPLED ({self.n_negatives} {self.sampler} negatives)")
        return d

    @classmethod
    def from_option(cls, sampled: str | int | None, exclude: str = "history", ties: str = "pessimistic",
                    target_behavior: str | None = None) -> "Protocol":
        """``None``/"full" → full ranking; ``100`` or ``"100"`` or ``"100:popularity"`` → sampled."""
        rest = {"exclude": exclude, "ties": ties, "target_behavior": target_behavior}
        if sampled in (None, "", "full", 0, "none"):
            return cls(**rest)
        text = str(sampled)
        n, _, sampler = text.partition(":")
        try:
            n_neg = int(n)
        except ValueError:
            raise ConfigError(f"eval.sampled={sampled!r}: expected a number of negatives like 100 or 100:popularity") from None
        sampler = sampler or "uniform"
        if sampler not in ("uniform", "popularity") or n_neg <= 0:
            raise ConfigError(f"eval.sampled={sampled!r}: use N or N:uniform or N:popularity with N > 0")
        return cls("sampled", n_neg, sampler, **rest)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    per_user: pl.DataFrame  # user (encoded) + one column per metric
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)


#: metrics also kept per user for the item groups (columns ``item:tail ndcg@10`` ...; NaN for a
#: user without a target in the group), so that a paired test can run on a group's users
GROUP_USER_METRICS = ("ndcg@", "hr@")


#: how items are split into head and tail for the item groups (``eval.head_items``)
HEAD_RULES = {
    "share": "the most popular items that together hold this share of training interactions (0.8: the 80/20 rule)",
    "top": "this fraction of the catalogue, most popular first (FAERec: top:0.2)",
    "count": "items with at least this many training interactions (LLM-ESR: count:20, its --ts_item)",
}


def parse_head_rule(rule: str | float | None) -> tuple[str, float]:
    """``"share:0.8"`` → ("share", 0.8); a bare number is a share. Raises ConfigError on bad input."""
    if rule is None:
        return "share", 0.8
    if isinstance(rule, (int, float)):
        return "share", float(rule)
    kind, _, value = str(rule).partition(":")
    try:
        v = float(value)
    except ValueError:
        v = None
    if kind not in HEAD_RULES or v is None or v < 0 or (kind != "count" and v > 1):
        raise ConfigError(f"eval.head_items={rule!r}: use share:S (0-1, default share:0.8), top:F (0-1, e.g. "
                          "top:0.2 as FAERec) or count:N (e.g. count:20 as LLM-ESR)")
    return kind, v


def head_items(popularity: np.ndarray, share: float | None = None, rule: str | None = None) -> np.ndarray:
    """Boolean mask (n_items + 1) of the "head" items by training popularity; the others are
    the "tail". ``rule`` is one of :data:`HEAD_RULES` as ``kind:value``: ``share:0.8`` (default;
    the most popular items that together hold 80% of training interactions), ``top:0.2`` (the
    most popular 20% of the catalogue) or ``count:20`` (items with at least 20 training
    interactions). ``share`` is the older spelling of ``rule="share:S"``. Ties in popularity are
    ordered by item index for ``share`` and ``top``."""
    kind, value = parse_head_rule(rule if rule is not None else share)
    pop = popularity.astype(np.float64).copy()
    pop[0] = 0
    mask = np.zeros(len(pop), dtype=bool)
    if kind == "count":
        mask = pop >= value
        mask[0] = False
        return mask
    order = np.argsort(-pop[1:], kind="stable") + 1
    if kind == "top":
        mask[order[: int(round(value * (len(pop) - 1)))]] = True
        return mask
    cum = np.cumsum(pop[order])
    total = cum[-1] if len(cum) else 0
    if total <= 0:
        return mask
    n_head = int(np.searchsorted(cum, value * total) + 1)
    mask[order[:n_head]] = True
    return mask


def _gather_shards(cols: dict, groups: dict, covered: dict) -> tuple[dict, dict, dict]:
    """Per-user columns and group values of every process, concatenated in rank order (the order of
    the users), and the union of the covered items."""
    parts = distributed.gather((cols, groups, covered))
    names = list(dict.fromkeys(n for c, _, _ in parts for n in c))
    all_cols = {n: np.concatenate([c[n] for c, _, _ in parts if n in c]) for n in names}
    labels = list(dict.fromkeys(g for _, gs, _ in parts for g in gs))
    all_groups = {}
    for g in labels:
        metrics = list(dict.fromkeys(m for _, gs, _ in parts if g in gs for m in gs[g]))
        all_groups[g] = {m: np.concatenate([gs[g][m] for _, gs, _ in parts if g in gs and m in gs[g]])
                         for m in metrics}
    all_covered = {k: np.logical_or.reduce([cv[k] for _, _, cv in parts]) for k in covered}
    return all_cols, all_groups, all_covered


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
                popularity: np.ndarray | None, rng: np.random.Generator,
                excluded: Histories | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Score one batch, apply exclusions (and negative sampling), return (scores, ranks).

    The model's non-finite scores (NaN, ±inf) become ``+inf``: such an item is ahead of every
    finite target, and such a target is a miss. Excluded items become ``-inf`` (out of the
    ranking; an excluded target is a miss). ``excluded`` lists the items to remove per row; by
    default it follows ``protocol.exclude``: the history (``history``) or nothing (``none``).
    It never depends on the targets.

    Everything runs on the device of the scores the model returns (the model's device); the
    returned scores and ranks stay there. Scores on an Apple GPU (``mps``, which has no float64
    for the metrics) are ranked on the CPU."""
    with torch.no_grad():
        # always a private copy: the masking below works in place and must never write into a
        # tensor the model keeps (a view like Pop's, or cached scores returned as they are)
        scores = model.score(hist)
        if scores.device.type == "mps":
            scores = scores.cpu()
        scores = scores.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    b, n = scores.shape
    dev = scores.device
    targets = targets.to(dev)
    scores.nan_to_num_(nan=torch.inf, posinf=torch.inf, neginf=torch.inf)
    if excluded is None:
        if protocol.exclude == "target_behavior":
            raise ValueError("exclude=target_behavior: pass the excluded items (EvalSet.excluded)")
        excluded = hist if protocol.exclude == "history" else None
    if excluded is not None and len(excluded.items):
        rows = torch.from_numpy(np.repeat(np.arange(b), excluded.lengths)).to(dev)
        cols = torch.from_numpy(np.asarray(excluded.items, dtype=np.int64)).to(dev)
        scores.index_put_((rows, cols), torch.tensor(-torch.inf, device=dev))
    scores[:, 0] = -torch.inf
    if protocol.ranking == "sampled":
        allowed = scores > -torch.inf
        allowed.scatter_(1, targets, False)
        if protocol.sampler == "popularity" and popularity is not None:
            w = torch.from_numpy(popularity.astype(np.float64) + 1e-9).to(dev).expand(b, n).clone()
        else:
            w = torch.ones(b, n, dtype=torch.float64, device=dev)
        w = w.masked_fill(~allowed, 0.0)
        k = min(protocol.n_negatives, int(allowed.sum(1).min()))
        # a generator of the scores' device: the drawn negatives depend on the device (and the seed)
        gen = torch.Generator(device=dev).manual_seed(int(rng.integers(2**31)))
        neg = torch.multinomial(w, k, replacement=False, generator=gen)
        keep = torch.zeros(b, n, dtype=torch.bool, device=dev)
        keep.scatter_(1, neg, True)
        keep.scatter_(1, targets, True)
        keep[:, 0] = False
        scores = scores.masked_fill(~keep, -torch.inf)
    return scores, target_ranks(scores, targets, protocol.ties)


def evaluate(model, evalset: EvalSet, ks=DEFAULT_KS, protocol: Protocol | None = None,
             batch_size: int = 1024, popularity: np.ndarray | None = None,
             hist_bins=DEFAULT_HIST_BINS, groups: bool = True, seed: int = 0,
             head_rule: str | None = None) -> EvalResult:
    """Rank every item for every evaluated user, batch by batch, and aggregate metrics.

    ``model`` needs ``score(Histories) -> Tensor (batch, n_items + 1)``. ``popularity`` (training
    counts per item) enables head/tail groups (split by ``head_rule``, see :func:`head_items`)
    and popularity-sampled negatives.

    Ranking, target ranks and per-user metrics are computed on the device of the model's scores
    (a GPU for a model there); per-user values come back to the CPU once per batch.
    """
    protocol = protocol or Protocol()
    ks = sorted({int(k) for k in ks})
    kmax = max(ks)
    rng = np.random.default_rng(seed)
    n = evalset.histories.n_items + 1
    head = head_items(popularity, rule=head_rule) if (groups and popularity is not None) else None
    per_user: dict[str, list[np.ndarray]] = {}
    group_vals: dict[str, dict[str, list[np.ndarray]]] = {}
    covered = {k: np.zeros(n, dtype=bool) for k in ks}
    all_targets = torch.from_numpy(evalset.targets)
    head_t = None
    # in a process group each process ranks its contiguous shard of the users (all of them alone)
    lo, hi = distributed.shard_bounds(len(evalset))

    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        hist = evalset.histories.slice(start, stop)
        tg = all_targets[start:stop]
        valid = tg > 0
        excluded = None  # history / none: rank_scores derives it from the protocol
        if protocol.exclude == "target_behavior":
            if evalset.excluded is None:
                raise ConfigError("eval.exclude=target_behavior: this evaluation set was built without the "
                                  "target-behaviour items; build it with build_evalset(..., target_behavior=NAME)")
            excluded = evalset.excluded.slice(start, stop)
        scores, ranks = rank_scores(model, hist, tg, protocol, popularity, rng, excluded)
        dev = scores.device
        tg, valid = tg.to(dev), valid.to(dev)
        for name, v in metrics_from_ranks(ranks, valid, ks).items():
            per_user.setdefault(name, []).append(v.cpu().numpy())
        top = torch.topk(scores, min(kmax, n), dim=1).indices  # k may exceed a tiny catalogue
        finite = torch.isfinite(scores.gather(1, top))
        for k in ks:
            sel = top[:, :k][finite[:, :k]]
            covered[k][sel.cpu().numpy()] = True
        if head is not None:
            if head_t is None or head_t.device != dev:
                head_t = torch.from_numpy(head).to(dev)
            is_head = head_t[tg] & valid
            for label, mask in (("item:head", is_head), ("item:tail", valid & ~is_head)):
                for name, v in metrics_from_ranks(ranks, mask, ks).items():
                    v = v.cpu().numpy()
                    group_vals.setdefault(label, {}).setdefault(name, []).append(v)
                    if name.startswith(GROUP_USER_METRICS):  # per user too, for paired tests on a group
                        per_user.setdefault(f"{label} {name}", []).append(v)

    cols = {name: np.concatenate(v) for name, v in per_user.items()}
    if distributed.world()[1] > 1:  # gather the shards in rank order: every user exactly once
        cols, group_arrays, covered = _gather_shards(cols, {g: {m: np.concatenate(v) for m, v in vals.items()}
                                                            for g, vals in group_vals.items()}, covered)
        group_vals = {g: {m: [a] for m, a in vals.items()} for g, vals in group_arrays.items()}
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
    described = protocol.describe()
    if head is not None:
        described["head_items"] = "{}:{:g}".format(*parse_head_rule(head_rule))
    return EvalResult(metrics, table, out_groups, described)
