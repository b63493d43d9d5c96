"""EASE: Embarrassingly Shallow Autoencoders (Steck, WWW 2019).

Closed form: with G = XᵀX + λI and P = G⁻¹, the item-item weights are B = I - P·diag(1/diag(P)),
so that diag(B) = 0. Scores are X_u B. Memory is O(items²): fine up to a few tens of thousands of
items.
"""

from __future__ import annotations

import numpy as np
import torch

from recforge.models.base import Recommender


class EASE(Recommender):
    name = "ease"

    def __init__(self, reg_lambda: float = 500.0, seed: int = 0):
        self.reg_lambda, self.seed = reg_lambda, seed

    def fit(self, split, valid=None):
        x = split.train_matrix.astype(np.float32)
        g = torch.from_numpy((x.T @ x).toarray())  # float32: ample precision with lambda > 0
        g.diagonal().add_(self.reg_lambda)
        g[0, 0] = 1.0  # padding column: keep G invertible
        p = torch.cholesky_inverse(torch.linalg.cholesky(g))
        b = -p / p.diagonal().unsqueeze(0)
        b.fill_diagonal_(0.0)
        b[0, :] = 0.0
        b[:, 0] = 0.0
        self.weights_np_ = np.ascontiguousarray(b.to(torch.float32).numpy())
        return self

    def score(self, hist):
        return torch.from_numpy(np.asarray(hist.matrix @ self.weights_np_))
