"""Matrix factorisation trained with Bayesian Personalized Ranking.

Rendle et al., "BPR: Bayesian Personalized Ranking from Implicit Feedback", UAI 2009.
Loss ``-log σ(x_ui - x_uj)`` for a training pair (u, i) and an item j the user has not
interacted with, drawn uniformly; L2 on the embeddings of the batch (``reg``).
Deviation: users unknown at training time (a raw history) are folded in as the mean of their
history items' embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recforge.models.torch_base import TorchRecommender
from recforge.training.samplers import SeenPairs, sample_negatives


class BPRMF(TorchRecommender):
    name = "bpr"

    def __init__(self, dim: int = 64, reg: float = 1e-4, **train):
        super().__init__(**train)
        self.dim, self.reg = dim, reg

    def build(self, n_users, n_items):
        net = nn.Module()
        net.user = nn.Embedding(n_users, self.dim)
        net.item = nn.Embedding(n_items + 1, self.dim, padding_idx=0)
        nn.init.normal_(net.user.weight, std=0.1)
        nn.init.normal_(net.item.weight, std=0.1)
        with torch.no_grad():
            net.item.weight[0].zero_()
        return net

    def prepare_fit(self, split):
        m = split.train_matrix.tocoo()
        self._pairs = np.stack([m.row, m.col], 1).astype(np.int64)
        self._seen = SeenPairs(split.train_matrix)

    def n_train_batches(self, split):
        return -(-len(self._pairs) // self.batch_size)

    def train_batches(self, split, rng):
        for idx, r in self.epoch_batches(rng.permutation(len(self._pairs)), rng):
            p = self._pairs[idx]
            neg = sample_negatives(self._seen, p[:, 0], 1, self.n_items_, r)[:, 0]
            yield torch.from_numpy(p[:, 0]), torch.from_numpy(p[:, 1]), torch.from_numpy(neg)

    def loss(self, batch):
        u, i, j = batch
        eu, ei, ej = self.net_.user(u), self.net_.item(i), self.net_.item(j)
        x = (eu * (ei - ej)).sum(-1)
        reg = (eu.pow(2).sum() + ei.pow(2).sum() + ej.pow(2).sum()) / len(u)
        return nn.functional.softplus(-x).mean() + self.reg * reg

    def score(self, hist):
        """Scores (batch, n_items + 1) on the model's device."""
        items = self.net_.item.weight
        users = torch.from_numpy(np.asarray(hist.users, dtype=np.int64)).to(items.device)
        known = (users >= 0) & (users < self.n_users_)
        u = self.net_.user(users.clamp(min=0, max=self.n_users_ - 1))
        if not bool(known.all()):
            m = hist.matrix
            counts = np.maximum(np.asarray(m.sum(1)).ravel(), 1)
            fold = torch.from_numpy((m @ items.detach().cpu().numpy()) / counts[:, None]).float().to(items.device)
            u = torch.where(known.unsqueeze(1), u, fold)
        return u @ items.T
