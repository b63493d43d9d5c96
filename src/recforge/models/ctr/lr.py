"""Logistic regression over one-hot (and numeric) fields.

The baseline of every CTR benchmark (e.g. Richardson et al., "Predicting Clicks: Estimating the
Click-Through Rate for New Ads", WWW 2007; the LR rows of the BARS/FuxiCTR tables): the logit is a
bias plus one learned weight per feature value (mean of the weights of a multi-valued field's
values) plus one weight per numeric field times its normalised value. Trained like every CTR model
here (Adam, binary cross-entropy, early stopping on the validation AUC) rather than by L-BFGS or
FTRL; L2 through ``weight_decay``.
"""

from __future__ import annotations

import torch
from torch import nn

from recforge.models.ctr.base import CTRModel, FieldLinear


class LRNet(nn.Module):
    def __init__(self, layout, n_labels):
        super().__init__()
        self.linear = FieldLinear(layout, n_labels)

    def forward(self, batch):
        return self.linear(batch)

    def represent(self, batch, embs=None):
        """The per-field first-order terms, concatenated (LR has no embeddings; ``embs`` is unused)."""
        return torch.cat(self.linear.terms(batch), -1)


class LR(CTRModel):
    name = "lr"

    def make_net(self):
        return LRNet(self.fields_, self.n_labels)
