"""ESMM: Entire Space Multi-task Model.

Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating Post-Click
Conversion Rate", SIGIR 2018. Two towers over the same field embeddings (the paper's shared
embedding lookup): a CTR tower giving ``pCTR = p(click | impression)`` and a CVR tower giving
``pCVR = p(conversion | click, impression)``. CVR is never fitted on clicked rows alone; the
losses are on the whole impression space: CTR against the click label and
``pCTCVR = pCTR × pCVR`` against the click-and-conversion label.

Labels, in the schema's order: exactly two, ``click`` then ``conversion`` over impressions (1 only
where the impression was clicked and converted; a training row that converts without a click is
an error). Outputs, one per label: the CTR logit and the logit of ``pCTR × pCVR``, computed in
log space (``log pCTR + log pCVR`` from ``logsigmoid``), so that the base loss (binary
cross-entropy per label, mean over the two: the paper's sum halved) and ``predict_proba`` give
``[pCTR, pCTCVR]``. :meth:`ESMM.predict_cvr` gives ``pCVR``. Towers: the paper's 360-200-80 MLP;
beyond the paper, the base embedding regularisation and optional batch normalisation (off: the
paper has none).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recforge.errors import DataError
from recforge.models.ctr.multitask import MultiTaskCTRModel, tower


def product_logit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``logit(sigmoid(a) · sigmoid(b))``, stable for large logits of either sign."""
    lp = (F.logsigmoid(a) + F.logsigmoid(b)).clamp(max=-1e-7)
    return lp - torch.log(-torch.expm1(lp))


class ESMMNet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embedding = model.embedding()
        d = self.embedding.total_dim
        self.ctr = tower(d, model.tower_hidden, model)
        self.cvr = tower(d, model.tower_hidden, model)

    def logits(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The CTR and CVR logits, ``(B,)`` each."""
        x = torch.cat(self.embedding(batch), -1)
        return self.ctr(x).squeeze(-1), self.cvr(x).squeeze(-1)

    def forward(self, batch):
        ctr, cvr = self.logits(batch)
        return torch.stack([ctr, product_logit(ctr, cvr)], -1)


class ESMM(MultiTaskCTRModel):
    name = "esmm"
    exact_labels = 2
    label_hint = "click, then conversion over impressions: data.label=click,conversion"

    def __init__(self, tower_hidden: list[int] = (360, 200, 80), dropout: float = 0.0, batch_norm: bool = False,
                 activation: str = "relu", **base):
        super().__init__(**base)
        self.tower_hidden = list(tower_hidden)
        self.dropout, self.batch_norm, self.activation = dropout, batch_norm, activation

    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        y = split.train.y
        bad = int(np.sum((y[:, 1] > 0) & (y[:, 0] <= 0)))
        if bad:
            raise DataError(f"esmm: {bad} training row(s) have {self.labels_[1]}=1 but {self.labels_[0]}=0; the second "
                            "label is conversion over impressions (clicked and converted), so it implies the first")

    def make_net(self):
        return ESMMNet(self)

    def predict_cvr(self, table, batch_size: int | None = None) -> np.ndarray:
        """``pCVR = p(conversion | click)`` of every row ``(n,)`` (float64)."""
        return self.predict_batches(table, lambda net, batch: net.logits(batch)[1], batch_size)
