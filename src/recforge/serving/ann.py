"""Approximate top-k retrieval over item vectors with FAISS, for large catalogues.

Models whose score is a dot product ``q · v_i`` between a query vector (a user embedding, or the
encoding of a sequence) and item vectors can retrieve candidates from an index instead of scoring
every item. The index is an HNSW graph under the inner-product metric (``faiss.IndexHNSWFlat``
with ``METRIC_INNER_PRODUCT``); candidates are re-scored exactly. (The textbook reduction of
inner-product search to Euclidean search by an extra coordinate ``sqrt(M² - |v|²)`` was tried and
dropped: on embeddings of uneven norms it loses a lot of recall at the same search effort.)

:func:`query_vectors` gets the query of a batch of histories from the model: a method
``query_vectors(histories)`` when the model has one, else ``encode(score_input(h))[:, -1]``
(sequential models), else the user embedding ``net_.user`` (users unknown at training time get
the mean of their history's item vectors). The serving engine checks once, on load, that these
queries reproduce the model's own scores and turns the index off when they do not.
"""

from __future__ import annotations

import numpy as np

from recforge.evaluation.batch import Histories


def query_vectors(model, hist: Histories, item_vectors: np.ndarray) -> np.ndarray | None:
    """``(B, d)`` query vectors whose dot products with ``item_vectors`` are the model's scores,
    or None when the model has no such form."""
    import torch

    with torch.no_grad():
        if callable(getattr(model, "query_vectors", None)):
            q = model.query_vectors(hist)
        elif callable(getattr(model, "encode", None)) and callable(getattr(model, "score_input", None)):
            q = model.encode(model.score_input(hist))[:, -1]
        elif getattr(getattr(model, "net_", None), "user", None) is not None:
            users = np.asarray(hist.users, dtype=np.int64)
            n_users = model.net_.user.weight.shape[0]
            known = (users >= 0) & (users < n_users)
            q = model.net_.user.weight.detach().cpu().numpy()[np.clip(users, 0, n_users - 1)].copy()
            if not known.all():
                m = hist.matrix
                counts = np.maximum(np.asarray(m.sum(1)).ravel(), 1)
                fold = (m @ item_vectors) / counts[:, None]
                q[~known] = fold[~known]
        else:
            return None
    q = q.detach().cpu().numpy() if hasattr(q, "detach") else np.asarray(q)
    return np.ascontiguousarray(q, dtype=np.float32)


class ANNIndex:
    """HNSW index over item vectors for inner-product top-k (rows 1..n; row 0 is padding)."""

    def __init__(self, item_vectors: np.ndarray, m: int = 32, ef_construction: int = 200, ef_search: int = 256,
                 threads: int = 1):
        import faiss

        faiss.omp_set_num_threads(max(1, int(threads)))
        vec = np.ascontiguousarray(item_vectors[1:], dtype=np.float32)
        self.index = faiss.IndexHNSWFlat(vec.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.index.hnsw.efSearch = ef_search
        self.index.add(vec)
        self.item_vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
        self.ef_search = ef_search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` item indices (1-based, -1 where fewer) and exact inner-product scores."""
        import faiss

        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.index.ntotal))
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
        _, ids = self.index.search(q, k, params=params)
        idx = np.where(ids >= 0, ids + 1, -1)
        scores = np.einsum("bd,bkd->bk", q, self.item_vectors[np.maximum(idx, 0)])
        scores[idx < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(idx, order, 1), np.take_along_axis(scores, order, 1)


def exact_top_k(queries: np.ndarray, item_vectors: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-``k`` item indices (1-based) per query."""
    s = queries @ item_vectors[1:].T
    k = min(k, s.shape[1])
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1) + 1


def ann_recall(item_vectors: np.ndarray, queries: np.ndarray, k: int = 10, index: ANNIndex | None = None,
               **index_options) -> dict:
    """Recall@k of the ANN index against exact search: the mean share of each query's exact
    top-k found in its approximate top-k. Returns ``{"recall": ..., "k": ..., ...}`` with timings."""
    import time

    t0 = time.perf_counter()
    index = index or ANNIndex(item_vectors, **index_options)
    build = time.perf_counter() - t0
    t1 = time.perf_counter()
    approx, _ = index.search(queries, k)
    ann_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    exact = exact_top_k(np.asarray(queries, dtype=np.float32), np.asarray(item_vectors, dtype=np.float32), k)
    exact_s = time.perf_counter() - t2
    hits = [len(set(a.tolist()) & set(e.tolist())) / len(e) for a, e in zip(approx, exact)]
    return {"recall": float(np.mean(hits)), "k": k, "n_items": int(len(item_vectors) - 1),
            "n_queries": int(len(queries)), "build_seconds": round(build, 3),
            "ann_ms_per_query": round(1e3 * ann_s / max(1, len(queries)), 4),
            "exact_ms_per_query": round(1e3 * exact_s / max(1, len(queries)), 4)}
