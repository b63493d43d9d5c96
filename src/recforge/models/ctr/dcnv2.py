"""DCN-V2.

Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale Learning
to Rank Systems", WWW 2021. The cross network maps the concatenated field embeddings ``x0``
through layers ``x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l`` with full ``d × d`` matrices (or, with
``low_rank=r``, ``W_l = U_l V_lᵀ``, the paper's cost-saving variant without its mixture of
experts). ``structure=parallel`` (default) concatenates the cross output with an MLP over ``x0``;
``stacked`` feeds the cross output into the MLP; both end in a linear layer, one output per label.
Defaults: 3 cross layers (the paper reports 2-4 as best), MLP 400-400-400 with batch
normalisation and dropout 0.2, a common CTR-library setting rather than the paper's Criteo grid.
"""

from __future__ import annotations

import torch
from torch import nn

from recforge.errors import ConfigError
from recforge.models.ctr.base import CTRModel, mlp, mlp_out_dim


class CrossLayer(nn.Module):
    def __init__(self, dim: int, rank: int | None):
        super().__init__()
        if rank:
            self.v = nn.Linear(dim, int(rank), bias=False)
            self.u = nn.Linear(int(rank), dim)
        else:
            self.w = nn.Linear(dim, dim)
        self.rank = rank

    def forward(self, x0, x):
        h = self.u(self.v(x)) if self.rank else self.w(x)
        return x0 * h + x


class DCNv2Net(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embedding = model.embedding()
        d = self.embedding.total_dim
        self.cross = nn.ModuleList(CrossLayer(d, model.low_rank) for _ in range(int(model.cross_layers)))
        self.structure = model.structure
        self.dnn = mlp(d, model.hidden, model.dropout, model.batch_norm, model.activation)  # on x0, or on the cross output
        out_in = mlp_out_dim(d, model.hidden) + (d if model.structure == "parallel" else 0)
        self.out = nn.Linear(out_in, model.n_labels)

    def forward(self, batch):
        return self.out(self.represent(batch))

    def represent(self, batch, embs=None):
        """The input of the output layer: cross and MLP outputs (parallel) or the MLP output (stacked)."""
        x0 = torch.cat(self.embedding(batch) if embs is None else embs, -1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        if self.structure == "parallel":
            return torch.cat([x, self.dnn(x0)], -1)
        return self.dnn(x)


class DCNv2(CTRModel):
    name = "dcnv2"

    def __init__(self, cross_layers: int = 3, low_rank: int | None = None, structure: str = "parallel",
                 hidden: list[int] = (400, 400, 400), dropout: float = 0.2, batch_norm: bool = True,
                 activation: str = "relu", **base):
        super().__init__(**base)
        if structure not in ("parallel", "stacked"):
            raise ConfigError(f"structure={structure!r}: choose parallel or stacked")
        self.cross_layers, self.low_rank, self.structure = cross_layers, low_rank, structure
        self.hidden, self.dropout, self.batch_norm, self.activation = list(hidden), dropout, batch_norm, activation

    def make_net(self):
        return DCNv2Net(self)
