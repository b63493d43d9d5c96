"""Incremental locally linear embedding (ILLE): placing a node from its neighbours in the graph.

The incremental half of Long, Liu, Li, Xiong, Yan, Wang, Cao & Ding, "Towards Practical
Large-scale Dynamical Heterogeneous Graph Embedding: Cold-start Resilient Recommendation",
arXiv:2512.13120, 2025 (used by :mod:`recforge.models.graph.hetsgformer`).

Locally linear embedding (Roweis & Saul, Science 2000) assumes that a point is a linear
combination of its nearest neighbours, and that the same weights hold in the embedding. For a node
of the user-item graph the "point" is its row of the interaction matrix (a new item: the set of
users who had it; a new user: the items they had), so:

1. candidates are the nodes *of the same type* that share at least one neighbour with it; the
   ``k`` nearest are kept by the cosine of the binary interaction rows (co-interaction count over
   ``sqrt(deg(new) * deg(candidate))``; ties: the lower index);
2. reconstruction weights minimise ``|x - sum_j w_j x_j|^2`` subject to ``sum_j w_j = 1``:
   with the local Gram matrix ``C_jl = (x - x_j) . (x - x_l) = |x| - c_j - c_l + x_j . x_l``
   (``c_j`` the co-interaction count), regularised as in LLE by ``reg * trace(C) / k`` on the
   diagonal (``reg`` alone when the trace is 0), solve ``C w = 1`` and divide by the sum;
3. the node's embedding is ``sum_j w_j y_j`` over the neighbours' embeddings ``y_j``.

Everything is sparse row arithmetic on the CPU: the cost of one placement is the neighbours'
degrees plus a ``k x k`` solve, whatever the size of the graph. A node whose neighbours share no
node of its type has no candidate; the caller decides what to do with it (``None`` here).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def nearest_by_cointeraction(node_rows: sp.csr_matrix, other_rows: sp.csr_matrix, neighbours: np.ndarray,
                             k: int, exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nodes nearest to a node whose neighbours (nodes of the other type) are
    ``neighbours``, and their co-interaction counts.

    ``node_rows``: (n_nodes, n_other) binary, the rows of the type being placed; ``other_rows``: its
    transpose as CSR (n_other, n_nodes). ``exclude``: a node never taken (the node itself when it is
    being refreshed)."""
    neighbours = np.unique(np.asarray(neighbours, dtype=np.int64))
    if len(neighbours) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    ip = other_rows.indptr
    hits = np.concatenate([other_rows.indices[ip[n]:ip[n + 1]] for n in neighbours]) if len(neighbours) else []
    if len(hits) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    cand, co = np.unique(np.asarray(hits, dtype=np.int64), return_counts=True)
    if exclude is not None:
        keep = cand != exclude
        cand, co = cand[keep], co[keep]
    if len(cand) == 0:
        return cand, co.astype(np.float64)
    deg = np.diff(node_rows.indptr)[cand].astype(np.float64)
    cos = co / np.sqrt(np.maximum(deg, 1.0) * len(neighbours))
    order = np.lexsort((cand, -cos))[:k]
    return cand[order], co[order].astype(np.float64)


def reconstruction_weights(node_rows: sp.csr_matrix, cand: np.ndarray, co: np.ndarray, degree: int,
                           reg: float) -> np.ndarray:
    """LLE weights (summing to one) reconstructing a binary row with ``degree`` ones from the rows
    ``cand`` of ``node_rows``, which share ``co`` ones with it."""
    xc = node_rows[cand]
    gram = np.asarray((xc @ xc.T).todense(), dtype=np.float64)
    c = degree - co[:, None] - co[None, :] + gram
    trace = float(np.trace(c))
    c[np.diag_indices_from(c)] += reg * trace / len(cand) if trace > 0 else reg
    try:
        w = np.linalg.solve(c, np.ones(len(cand)))
    except np.linalg.LinAlgError:
        w = np.linalg.lstsq(c, np.ones(len(cand)), rcond=None)[0]
    s = w.sum()
    if not np.isfinite(s) or abs(s) < 1e-12:
        return np.full(len(cand), 1.0 / len(cand))
    return w / s


def ille_place(node_rows: sp.csr_matrix, other_rows: sp.csr_matrix, embeddings: np.ndarray,
               neighbours, k: int, reg: float, exclude: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(embedding, neighbour nodes, weights)`` of a node with ``neighbours`` (nodes of the other
    type), reconstructed from the ``k`` nearest nodes of its own type; None without a candidate."""
    neighbours = np.unique(np.asarray(neighbours, dtype=np.int64))
    cand, co = nearest_by_cointeraction(node_rows, other_rows, neighbours, k, exclude)
    if len(cand) == 0:
        return None
    w = reconstruction_weights(node_rows, cand, co, len(neighbours), reg)
    return w @ embeddings[cand], cand, w
