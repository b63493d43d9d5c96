"""DeepFM.

Guo et al., "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction", IJCAI
2017: an FM component (first-order weights and pairwise inner products) and a deep component (an
MLP over the concatenated field embeddings) share one embedding layer; the logit is their sum.
Defaults follow the common CTR-library setting (MLP 400-400-400 with ReLU and dropout, the
paper's own constant-width choice) rather than the paper's 200-200-200. Beyond the paper: batch
normalisation in the MLP (on by default: it makes training insensitive to the small initial
embedding scale), ``embedding_reg`` on the batch's embeddings. With several labels
the FM term is mapped to the labels as in :mod:`recforge.models.ctr.fm` and the MLP has one output
per label.
"""

from __future__ import annotations

import torch
from torch import nn

from recforge.models.ctr.base import CTRModel, FieldLinear, mlp
from recforge.models.ctr.fm import FMHead


class DeepFMNet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embedding = model.embedding()
        self.linear = FieldLinear(model.fields_, model.n_labels)
        self.fm = FMHead(self.embedding.same_dim(model.name), model.n_labels)
        self.dnn = mlp(self.embedding.total_dim, model.hidden, model.dropout, model.batch_norm, model.activation,
                       out_dim=model.n_labels)

    def forward(self, batch):
        embs = self.embedding(batch)
        return self.linear(batch) + self.fm(embs) + self.dnn(torch.cat(embs, -1))

    def represent(self, batch, embs=None):
        """The MLP's last hidden layer and the FM logit (first-order plus pairwise terms)."""
        embs = self.embedding(batch) if embs is None else embs
        return torch.cat([self.dnn[:-1](torch.cat(embs, -1)), self.linear(batch) + self.fm(embs)], -1)


class DeepFM(CTRModel):
    name = "deepfm"

    def __init__(self, hidden: list[int] = (400, 400, 400), dropout: float = 0.2, batch_norm: bool = True,
                 activation: str = "relu", **base):
        super().__init__(**base)
        self.hidden, self.dropout, self.batch_norm, self.activation = list(hidden), dropout, batch_norm, activation

    def make_net(self):
        return DeepFMNet(self)
