"""Shared-Bottom multi-task network.

Caruana, "Multitask Learning", Machine Learning 28 (1997), as the baseline of the multi-task
recommendation papers (MMoE, PLE): one bottom MLP over the concatenated field embeddings, shared
by all tasks, and one tower MLP per label ending in its logit. Defaults for the CTR family
(bottom 256-128, towers 64, batch normalisation as in the other CTR models), not the paper's.
"""

from __future__ import annotations

import torch
from torch import nn

from recforge.models.ctr.base import mlp, mlp_out_dim
from recforge.models.ctr.multitask import MultiTaskCTRModel, tower


class SharedBottomNet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embedding = model.embedding()
        d = self.embedding.total_dim
        self.bottom = mlp(d, model.bottom_hidden, model.dropout, model.batch_norm, model.activation)
        h = mlp_out_dim(d, model.bottom_hidden)
        self.towers = nn.ModuleList(tower(h, model.tower_hidden, model) for _ in range(model.n_labels))

    def forward(self, batch):
        h = self.bottom(torch.cat(self.embedding(batch), -1))
        return torch.cat([t(h) for t in self.towers], -1)


class SharedBottom(MultiTaskCTRModel):
    name = "sharedbottom"

    def __init__(self, bottom_hidden: list[int] = (256, 128), tower_hidden: list[int] = (64,), dropout: float = 0.0,
                 batch_norm: bool = True, activation: str = "relu", **base):
        super().__init__(**base)
        self.bottom_hidden, self.tower_hidden = list(bottom_hidden), list(tower_hidden)
        self.dropout, self.batch_norm, self.activation = dropout, batch_norm, activation

    def make_net(self):
        return SharedBottomNet(self)
