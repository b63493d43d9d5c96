"""MMoE: Multi-gate Mixture-of-Experts.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018. ``n_experts`` expert MLPs read the concatenated field embeddings
``x``; each task ``k`` has its own gate, a linear map of ``x`` followed by a softmax over the
experts, and a tower MLP over the gate-weighted sum of the expert outputs, ending in the task's
logit (one per label, in the schema's order). :meth:`MMoENet.gates` gives the gate weights.
Defaults for the CTR family (4 experts of 256-128, towers 64, batch normalisation in the experts
and towers as in the other CTR models); the paper's census-income setting used smaller experts.
"""

from __future__ import annotations

import torch
from torch import nn

from recforge.errors import ConfigError
from recforge.models.ctr.base import mlp, mlp_out_dim
from recforge.models.ctr.multitask import MultiTaskCTRModel, tower


class MMoENet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embedding = model.embedding()
        d = self.embedding.total_dim
        self.experts = nn.ModuleList(mlp(d, model.expert_hidden, model.dropout, model.batch_norm, model.activation)
                                     for _ in range(int(model.n_experts)))
        self.gate_layers = nn.ModuleList(nn.Linear(d, int(model.n_experts)) for _ in range(model.n_labels))
        h = mlp_out_dim(d, model.expert_hidden)
        self.towers = nn.ModuleList(tower(h, model.tower_hidden, model) for _ in range(model.n_labels))

    def _mix(self, batch):
        x = torch.cat(self.embedding(batch), -1)
        experts = torch.stack([e(x) for e in self.experts], 1)  # (B, E, h)
        gates = torch.stack([torch.softmax(g(x), -1) for g in self.gate_layers], 1)  # (B, K, E)
        return gates, torch.einsum("bke,beh->bkh", gates, experts)

    def gates(self, batch) -> torch.Tensor:
        """The gate weights ``(B, n_labels, n_experts)``; each row sums to 1."""
        return self._mix(batch)[0]

    def forward(self, batch):
        _, mixed = self._mix(batch)
        return torch.cat([t(mixed[:, k]) for k, t in enumerate(self.towers)], -1)


class MMoE(MultiTaskCTRModel):
    name = "mmoe"

    def __init__(self, n_experts: int = 4, expert_hidden: list[int] = (256, 128), tower_hidden: list[int] = (64,),
                 dropout: float = 0.0, batch_norm: bool = True, activation: str = "relu", **base):
        super().__init__(**base)
        if int(n_experts) < 1:
            raise ConfigError(f"n_experts={n_experts}: give at least one expert")
        self.n_experts, self.expert_hidden, self.tower_hidden = int(n_experts), list(expert_hidden), list(tower_hidden)
        self.dropout, self.batch_norm, self.activation = dropout, batch_norm, activation

    def make_net(self):
        return MMoENet(self)
