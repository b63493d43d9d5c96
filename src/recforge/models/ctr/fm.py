"""Factorization machine.

Rendle, "Factorization Machines", ICDM 2010: ``y = w0 + Σ w_i x_i + Σ_{i<j} <v_i, v_j> x_i x_j``
over fields, the pairwise term computed in linear time as ``0.5 Σ_d ((Σ_i v_id)^2 - Σ_i v_id^2)``.
Here each field contributes one embedding (the pooled mean for a multi-valued field, the value
times a learned vector for a numeric field), so the pairs are pairs of fields, as in the
field-wise FM of the CTR libraries. Every field needs the same embedding size.
Deviations: trained with Adam and binary cross-entropy (the paper uses SGD/ALS/MCMC and squared or
logistic loss); with several labels the pairwise vector is mapped to the labels by a learned
``(d, n_labels)`` matrix initialised to ones (with one label the sum over ``d`` is exact FM).
"""

from __future__ import annotations

import torch
from torch import nn

from recforge.models.ctr.base import CTRModel, FieldLinear, fm_interaction


class FMHead(nn.Module):
    """The pairwise term per label: ``(B, n_labels)``."""

    def __init__(self, dim: int, n_labels: int):
        super().__init__()
        self.proj = None if n_labels == 1 else nn.Parameter(torch.ones(dim, n_labels))

    def forward(self, embs):
        v = fm_interaction(embs)
        return v.sum(-1, keepdim=True) if self.proj is None else v @ self.proj


class FMNet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embedding = model.embedding()
        self.linear = FieldLinear(model.fields_, model.n_labels)
        self.fm = FMHead(self.embedding.same_dim(model.name), model.n_labels)

    def forward(self, batch):
        return self.linear(batch) + self.fm(self.embedding(batch))

    def represent(self, batch, embs=None):
        """The concatenated field embeddings and the pairwise-interaction vector."""
        embs = self.embedding(batch) if embs is None else embs
        return torch.cat([*embs, fm_interaction(embs)], -1)


class FM(CTRModel):
    name = "fm"

    def make_net(self):
        return FMNet(self)
