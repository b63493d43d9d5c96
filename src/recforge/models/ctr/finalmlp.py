"""FinalMLP.

Mao et al., "FinalMLP: An Enhanced Two-Stream MLP Model for CTR Prediction", AAAI 2023. Two MLPs
read the same flat field embeddings ``x``, each through its own feature gate
``x ⊙ 2 σ(MLP_k(c_k))`` whose input ``c_k`` is the concatenated embeddings of the fields listed in
``fs1_context``/``fs2_context`` (empty: a learned vector, as the authors' code does by default).
Their outputs ``o1``, ``o2`` are fused by multi-head bilinear fusion: both are cut into ``heads``
chunks and ``y = b + Σ_h (w1_hᵀ o1_h + w2_hᵀ o2_h + o1_hᵀ W3_h o2_h)``, one such sum per label.
Defaults: a deep 400-400-400 stream and a wide one-layer 800 stream with batch normalisation and
dropout 0.2, gates with one hidden layer of 800, 10 heads (both widths must divide by
``heads``); our choice for the family, not the paper's per-dataset grid.
"""

from __future__ import annotations

import torch
from torch import nn

from recforge.errors import ConfigError
from recforge.models.ctr.base import CTRModel, mlp, mlp_out_dim


class FeatureGate(nn.Module):
    def __init__(self, context: list[str], embedding, hidden: list[int], out_dim: int, default_dim: int):
        super().__init__()
        self.context = list(context)
        names = [f["name"] for f in embedding.layout]
        unknown = [c for c in self.context if c not in names]
        if unknown:
            raise ConfigError(f"finalmlp: gate context field(s) {', '.join(unknown)} not among the fields {', '.join(names)}")
        self.index = [names.index(c) for c in self.context]
        in_dim = sum(embedding.dims[i] for i in self.index) if self.context else default_dim
        self.bias = None if self.context else nn.Parameter(torch.zeros(1, default_dim))
        self.net = mlp(in_dim, hidden, 0.0, False, "relu", out_dim=out_dim)

    def forward(self, embs, x):
        if not self.context:  # one gate for every row: computed once
            return x * 2 * torch.sigmoid(self.net(self.bias))
        return x * 2 * torch.sigmoid(self.net(torch.cat([embs[i] for i in self.index], -1)))


class BilinearFusion(nn.Module):
    def __init__(self, d1: int, d2: int, heads: int, n_out: int):
        super().__init__()
        if d1 % heads or d2 % heads:
            raise ConfigError(f"finalmlp: heads={heads} must divide both stream widths ({d1} and {d2})")
        self.h, a, b = heads, d1 // heads, d2 // heads
        self.w1 = nn.Parameter(torch.randn(heads, a, n_out) * a ** -0.5)
        self.w2 = nn.Parameter(torch.randn(heads, b, n_out) * b ** -0.5)
        self.w3 = nn.Parameter(torch.randn(heads, a, b, n_out) * (a * b) ** -0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, o1, o2):
        B = o1.shape[0]
        x1, x2 = o1.reshape(B, self.h, -1), o2.reshape(B, self.h, -1)
        y = (torch.einsum("bha,hao->bo", x1, self.w1) + torch.einsum("bhc,hco->bo", x2, self.w2)
             + torch.einsum("bha,haco,bhc->bo", x1, self.w3, x2))
        return y + self.bias


class FinalMLPNet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embedding = model.embedding()
        d = self.embedding.total_dim
        self.gate1 = FeatureGate(model.fs1_context, self.embedding, model.fs_hidden, d, model.embedding_dim)
        self.gate2 = FeatureGate(model.fs2_context, self.embedding, model.fs_hidden, d, model.embedding_dim)
        self.mlp1 = mlp(d, model.mlp1_hidden, model.mlp1_dropout, model.batch_norm, model.activation)
        self.mlp2 = mlp(d, model.mlp2_hidden, model.mlp2_dropout, model.batch_norm, model.activation)
        self.fusion = BilinearFusion(mlp_out_dim(d, model.mlp1_hidden), mlp_out_dim(d, model.mlp2_hidden),
                                     int(model.heads), model.n_labels)

    def streams(self, batch, embs=None):
        embs = self.embedding(batch) if embs is None else embs
        x = torch.cat(embs, -1)
        return self.mlp1(self.gate1(embs, x)), self.mlp2(self.gate2(embs, x))

    def forward(self, batch):
        return self.fusion(*self.streams(batch))

    def represent(self, batch, embs=None):
        """The two streams' outputs, concatenated, before the bilinear fusion."""
        return torch.cat(self.streams(batch, embs), -1)


class FinalMLP(CTRModel):
    name = "finalmlp"

    def __init__(self, mlp1_hidden: list[int] = (400, 400, 400), mlp2_hidden: list[int] = (800,),
                 mlp1_dropout: float = 0.2, mlp2_dropout: float = 0.2, batch_norm: bool = True,
                 activation: str = "relu", fs_hidden: list[int] = (800,), fs1_context: list[str] = (),
                 fs2_context: list[str] = (), heads: int = 10, **base):
        super().__init__(**base)
        self.mlp1_hidden, self.mlp2_hidden = list(mlp1_hidden), list(mlp2_hidden)
        self.mlp1_dropout, self.mlp2_dropout, self.batch_norm, self.activation = mlp1_dropout, mlp2_dropout, batch_norm, activation
        self.fs_hidden, self.fs1_context, self.fs2_context = list(fs_hidden), list(fs1_context or []), list(fs2_context or [])
        self.heads = heads

    def make_net(self):
        return FinalMLPNet(self)
