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
    sampling; after ``max_rounds`` the rare remaining collisions are kept."""
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
    return flat.reshape(len(users), n)
