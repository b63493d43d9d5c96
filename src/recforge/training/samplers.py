"""Negative samplers shared by all models."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class SeenPairs:
    """Fast vectorised membership test for (user, item) pairs of a CSR matrix."""

    def __init__(self, m: sp.csr_matrix):
        m = m.tocsr()
        m.sort_indices()
        self.width = np.int64(m.shape[1] + 1)
        rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
        self.keys = rows * self.width + m.indices.astype(np.int64)  # sorted: rows then sorted indices

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        k = users.astype(np.int64) * self.width + items.astype(np.int64)
        if len(self.keys) == 0:
            return np.zeros(len(k), dtype=bool)
        pos = np.minimum(np.searchsorted(self.keys, k), len(self.keys) - 1)
        return self.keys[pos] == k


def sample_negatives(seen: SeenPairs, users: np.ndarray, n: int, n_items: int,
                     rng: np.random.Generator, popularity: np.ndarray | None = None,
                     max_rounds: int = 20) -> np.ndarray:
    """``n`` items per user in ``users`` (shape (len(users), n)) that the user has not seen,
    drawn uniformly from 1..n_items (or proportionally to ``popularity``). Vectorised rejection
    sampling; draws still colliding after ``max_rounds`` (users who have seen most of the
    catalogue) are redrawn exactly from the user's unseen items. Only a user who has seen every
    item keeps seen items."""
    if popularity is not None:
        p = popularity[1:].astype(np.float64) + 1e-12
        cdf = np.cumsum(p / p.sum())
        draw = lambda k: np.minimum(np.searchsorted(cdf, rng.random(k)), n_items - 1) + 1  # noqa: E731
    else:
        draw = lambda k: rng.integers(1, n_items + 1, size=k)  # noqa: E731
    rows = np.repeat(np.asarray(users, dtype=np.int64), n)
    flat = draw(len(rows))
    for _ in range(max_rounds):
        bad = np.flatnonzero(seen.contains(rows, flat))
        if len(bad) == 0:
            break
        flat[bad] = draw(len(bad))
    else:
        bad = np.flatnonzero(seen.contains(rows, flat))
        if len(bad):
            flat[bad] = _draw_unseen(seen, rows[bad], n_items, rng, popularity)
    return flat.reshape(len(users), n)


def _draw_unseen(seen: SeenPairs, rows: np.ndarray, n_items: int, rng: np.random.Generator,
                 popularity: np.ndarray | None) -> np.ndarray:
    """Exact fallback of :func:`sample_negatives` for the few draws rejection sampling missed."""
    out = np.empty(len(rows), dtype=np.int64)
    for u in np.unique(rows):
        at = np.flatnonzero(rows == u)
        lo, hi = np.searchsorted(seen.keys, [u * seen.width, (u + 1) * seen.width])
        unseen = np.setdiff1d(np.arange(1, n_items + 1), seen.keys[lo:hi] - u * seen.width)
        if len(unseen) == 0:  # nothing left to draw: keep a seen item
            out[at] = rng.integers(1, n_items + 1, size=len(at))
            continue
        p = None
        if popularity is not None:
            p = popularity[unseen].astype(np.float64) + 1e-12
            p /= p.sum()
        out[at] = rng.choice(unseen, size=len(at), p=p)
    return out


def popularity_weights(counts: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Sampling weights ``count ** alpha`` over items 0..n (``alpha=0``: uniform over items with
    any interaction, ``alpha=1``: proportional to popularity; word2vec used 0.75). Index 0, the
    padding item, gets weight 0."""
    c = np.asarray(counts, dtype=np.float64).clip(min=0)
    w = np.where(c > 0, c, 1.0) ** float(alpha) * (c > 0)
    w[0] = 0.0
    return w


def sample_popularity_negatives(seen: SeenPairs, users: np.ndarray, n: int, n_items: int,
                                rng: np.random.Generator, counts: np.ndarray,
                                alpha: float = 1.0) -> np.ndarray:
    """``n`` unseen items per user drawn with probability proportional to ``count ** alpha``
    (shape (len(users), n)); see :func:`sample_negatives`."""
    return sample_negatives(seen, users, n, n_items, rng, popularity=popularity_weights(counts, alpha))


def select_hardest(candidates, scores, n: int = 1):
    """The ``n`` highest-scored candidates of each row: ``candidates`` and ``scores`` are
    (batch, pool) NumPy arrays or torch tensors (the result has the same kind), ties broken by
    position in the pool."""
    import torch

    if isinstance(scores, torch.Tensor):
        cand = torch.as_tensor(candidates)
        top = torch.topk(scores.detach(), n, dim=1).indices
        return cand.gather(1, top)
    order = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :n]
    return np.take_along_axis(np.asarray(candidates), order, axis=1)


def sample_hard_negatives(seen: SeenPairs, users: np.ndarray, n_items: int, rng: np.random.Generator,
                          score_fn, pool: int = 10, n: int = 1,
                          popularity: np.ndarray | None = None) -> np.ndarray:
    """Hard negatives from the current model (dynamic negative sampling): draw ``pool``
    unseen candidates per user (uniformly, or by ``popularity``), score them with
    ``score_fn(users, candidates) -> (len(users), pool)`` and keep the ``n`` highest-scored.
    Models that already hold their scores at loss time draw the pool with
    :func:`sample_negatives` and call :func:`select_hardest` themselves."""
    cands = sample_negatives(seen, users, pool, n_items, rng, popularity)
    scores = score_fn(np.asarray(users), cands)
    return np.asarray(select_hardest(cands, np.asarray(scores), n))
