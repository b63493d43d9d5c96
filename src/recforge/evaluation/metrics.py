"""Ranking metrics computed from the rank of every target item.

Conventions (documented in ARCHITECTURE.md, checked against hand-worked cases and ranx):

* the ranking is over the whole catalogue, minus the padding index and the items the protocol
  excludes (see :mod:`recforge.evaluation.evaluator`; the excluded set never depends on the
  target);
* a target's rank is one plus the items scored above it; items scored exactly like it count
  according to ``ties`` (:data:`TIES`): ``pessimistic`` (default: every tied item is ahead),
  ``expected`` (the mean rank under a random order of the tied items), ``optimistic`` (no tied
  item is ahead) or ``index`` (ties broken by item index, lower first: depends on how ids were
  assigned, kept only to compare with older figures);
* a target whose score is not finite (NaN, ±inf from the model, or excluded by the protocol) is
  a miss: it gets the worst rank and contributes 0 to every metric; a competitor whose score is
  NaN or ±inf counts as ahead of every finite target (the evaluator maps it to ``+inf``);
* ``hr@k``: 1 if any target has ``r <= k``;
* ``recall@k``: targets with ``r <= k`` / number of targets;
* ``precision@k``: targets with ``r <= k`` / ``k``;
* ``ndcg@k``: sum over hits of ``1 / log2(r + 1)``, divided by the ideal
  ``sum_{i=1..min(T, k)} 1 / log2(i + 1)`` (binary relevance);
* ``mrr``: ``1 / r`` of the best-ranked target, no cut-off; ``mrr@k`` the same, 0 beyond ``k``;
* ``map@k``: sum over hits of (hits at or above ``r``) / ``r``, divided by ``min(T, k)``.

With one target per user (leave-one-out), HR@k = Recall@k and NDCG@k = 1 / log2(r + 1).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("recforge.eval")

METRICS = ("hr", "recall", "precision", "ndcg", "mrr", "map")
#: how items scored exactly like a target are counted; the first is the default
TIES = ("pessimistic", "expected", "optimistic", "index")
#: the rank of a target that is a miss (non-finite score, excluded, or padding)
MISS_RANK = torch.iinfo(torch.int64).max // 4


def _count_ahead_eager(scores: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: items scored strictly above ``s`` and items scored exactly ``s``."""
    return (scores > s).sum(1, dtype=torch.int32), (scores == s).sum(1, dtype=torch.int32)


_compiled = None  # None: not tried yet; False: unavailable


def _count_ahead(scores: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two counting passes fused into one loop by ``torch.compile`` (about 9x faster than two
    eager passes on CPU, which is most of the ranking cost). Falls back to eager PyTorch when
    compilation is unavailable or disabled with ``RECFORGE_COMPILE=0``. Scores on a GPU (or any
    device other than the CPU) are counted by eager PyTorch: the passes are bound by memory
    bandwidth there, and the kernel is compiled and checked for the CPU only."""
    global _compiled
    if scores.device.type != "cpu":
        return _count_ahead_eager(scores, s)
    if _compiled is None:
        _compiled = False
        if os.environ.get("RECFORGE_COMPILE", "1") != "0":
            try:
                fn = torch.compile(_count_ahead_eager, dynamic=True)
                fn(torch.zeros(2, 3), torch.zeros(2, 1))
                _compiled = fn
            except Exception as exc:  # no compiler on this machine: stay correct, just slower
                log.info("fused ranking kernel unavailable (%s); using eager PyTorch", exc)
    if _compiled:
        return _compiled(scores, s)
    return _count_ahead_eager(scores, s)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, ties: str = "pessimistic") -> torch.Tensor:
    """1-based rank of each target (B, T) under ``scores`` (B, N); padded targets (0) and targets
    with a non-finite score get :data:`MISS_RANK`. ``scores`` must already hold ``-inf`` for
    excluded items and ``+inf`` for the model's non-finite scores (as the evaluator prepares
    them). ``ties`` is one of :data:`TIES`; ranks are float64 for ``expected`` (a tie between
    an odd and an even number of items gives a half rank), int64 otherwise.

    A target's rank is one plus the items scored above it, counted in one pass over its row
    (:func:`_count_ahead`), so the cost is (targets) x N, never a sort of the catalogue. With
    many target slots (T > 8, e.g. a random or pre-made split where a few users have hundreds of
    test items and most have a handful) the rows are ordered by their number of targets and the
    valid targets moved to the front, so target slot ``j`` only visits the rows that have one."""
    if ties not in TIES:
        raise ValueError(f"ties={ties!r}: choose one of {', '.join(TIES)}")
    targets = targets.to(scores.device)  # ranks are computed where the scores are
    valid = targets > 0
    b, t = targets.shape
    if t <= 8:
        ranks = _rank_columns(scores, targets, [b] * t, ties)
    else:
        counts = valid.sum(1)
        rows = torch.argsort(counts, descending=True, stable=True)
        cols = torch.argsort((~valid[rows]).to(torch.int8), dim=1, stable=True)  # valid targets first
        sorted_counts = counts[rows]
        depth = [int((sorted_counts > j).sum()) for j in range(int(sorted_counts[0]) if b else 0)]
        packed = _rank_columns(scores[rows], targets[rows].gather(1, cols), depth, ties, fill=MISS_RANK)
        ranks = torch.empty_like(packed)
        ranks[rows] = torch.empty_like(packed).scatter_(1, cols, packed)
    return torch.where(valid, ranks, torch.full_like(ranks, MISS_RANK))


def _rank_columns(scores: torch.Tensor, targets: torch.Tensor, depth: list[int], ties: str,
                  fill: int = 0) -> torch.Tensor:
    """Ranks of target slot ``j`` for the first ``depth[j]`` rows (the others get ``fill``)."""
    dtype = torch.float64 if ties == "expected" else torch.int64
    ranks = torch.full(targets.shape, fill, dtype=dtype, device=scores.device)
    idx = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)
    for j, m in enumerate(depth):
        if m == 0:
            break
        sc, col = scores[:m], targets[:m, j : j + 1]
        s = sc.gather(1, col)
        gt, eq = _count_ahead(sc, s)
        ahead = gt.to(torch.int64)
        others = eq.to(torch.int64) - 1  # items tied with the target, the target itself left out
        if ties == "pessimistic":
            ahead = ahead + others
        elif ties == "expected":
            ahead = ahead.to(torch.float64) + others.to(torch.float64) / 2
        elif ties == "index":
            tied = torch.nonzero(others > 0).ravel()
            if len(tied):  # row by row, only where ties exist
                ahead[tied] += ((sc[tied] == s[tied]) & (idx < col[tied])).sum(1)
        r = ahead + 1
        miss = ~torch.isfinite(s.squeeze(1))  # NaN/inf from the model, or excluded by the protocol
        ranks[:m, j] = torch.where(miss, torch.full_like(r, MISS_RANK), r).to(dtype)
    return ranks


def metrics_from_ranks(ranks: torch.Tensor, valid: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-user metric values (B,) for every metric at every k, plus ``mrr`` (no cut-off).

    Rows with no valid target get NaN."""
    ranks = torch.where(valid, ranks, torch.full_like(ranks, MISS_RANK))
    n_t = valid.sum(1).to(torch.float64)
    empty = n_t == 0
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=ranks.device)
    r = ranks.to(torch.float64)
    sorted_r, _ = torch.sort(r, dim=1)
    out: dict[str, torch.Tensor] = {}
    best = sorted_r[:, 0]
    out["mrr"] = torch.where(empty, nan, torch.where(best >= MISS_RANK, 0.0, 1.0 / best))  # a miss counts 0
    disc = 1.0 / torch.log2(r + 1.0)
    for k in ks:
        hit = (ranks <= k) & valid
        n_hit = hit.sum(1).to(torch.float64)
        ideal_n = torch.clamp(n_t, max=k)
        pos = torch.arange(1, k + 1, dtype=torch.float64, device=ranks.device)
        idcg_table = torch.cumsum(1.0 / torch.log2(pos + 1.0), 0)
        idcg = idcg_table[(ideal_n.clamp(min=1) - 1).long()]
        dcg = torch.where(hit, disc, torch.zeros_like(disc)).sum(1)
        # MAP: j-th hit in rank order contributes j / r_j
        s_hit = sorted_r <= k
        j = torch.cumsum(s_hit.to(torch.float64), 1)
        ap = torch.where(s_hit, j / sorted_r, torch.zeros_like(sorted_r)).sum(1) / ideal_n.clamp(min=1)
        vals = {
            "hr": (n_hit > 0).to(torch.float64),
            "recall": n_hit / n_t.clamp(min=1),
            "precision": n_hit / k,
            "ndcg": dcg / idcg,
            "map": ap,
            "mrr": torch.where(best <= k, 1.0 / best, torch.zeros_like(best)),
        }
        for name, v in vals.items():
            out[f"{name}@{k}"] = torch.where(empty, nan, v)
    return out
