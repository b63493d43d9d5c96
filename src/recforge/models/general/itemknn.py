"""Item-based k-nearest neighbours with cosine similarity.

Sarwar et al., "Item-based collaborative filtering recommendation algorithms", WWW 2001.
Similarity between items i and j is cosine over their user vectors, optionally shrunk
(``|Ui ∩ Uj| / (||i|| ||j|| + shrink)``); only the ``k`` most similar neighbours of each item are
kept. A user's score for item j is the sum of similarities between j and the history items.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from recforge.models.base import Recommender


class ItemKNN(Recommender):
    name = "itemknn"

    def __init__(self, k: int = 100, shrink: float = 0.0, block: int = 2048, seed: int = 0):
        self.k, self.shrink, self.block, self.seed = k, shrink, block, seed

    def fit(self, split, valid=None):
        x = split.train_matrix.tocsc().astype(np.float32)  # users x items
        norms = np.sqrt(np.asarray(x.multiply(x).sum(0)).ravel())
        xt = x.T.tocsr()
        n = x.shape[1]
        rows, cols, vals = [], [], []
        for start in range(0, n, self.block):
            stop = min(start + self.block, n)
            co = (xt[start:stop] @ x).toarray()  # block x items: co-occurrence counts
            denom = norms[start:stop, None] * norms[None, :] + self.shrink + 1e-12
            sim = co / denom
            sim[np.arange(stop - start), np.arange(start, stop)] = 0.0  # no self-similarity
            k = min(self.k, n - 1)
            idx = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (stop - start, 1))
            v = np.take_along_axis(sim, idx, 1)
            keep = v > 0
            rows.append(np.repeat(np.arange(start, stop), k)[keep.ravel()])
            cols.append(idx.ravel()[keep.ravel()])
            vals.append(v.ravel()[keep.ravel()])
        # sim_[i, j]: similarity of history item i to candidate j (neighbours of j kept per row j)
        s = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
        self.similarity_ = s.T.tocsr().astype(np.float32)
        return self

    def score(self, hist):
        return torch.from_numpy((hist.matrix @ self.similarity_).toarray())
