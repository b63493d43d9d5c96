"""SASRec: self-attentive sequential recommendation.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018.

Item embeddings (scaled by sqrt(hidden), as in the authors' implementation) plus learned
position embeddings, dropout, ``n_layers`` blocks of causal multi-head self-attention and a
point-wise feed-forward network, and a final layer norm. Like the paper, the blocks are
**pre-LN**: each sub-layer computes ``x + Dropout(f(LayerNorm(x)))``. The score of item ``i``
after position ``t`` is the dot product of the position's output with ``i``'s input embedding
(shared item embedding). Positions are counted back from the most recent item of the
left-padded window of ``max_len`` items.

Training is autoregressive: for each training sequence (its last ``max_len + 1`` items), the
inputs are ``seq[:-1]`` and the targets ``seq[1:]``, and every non-padded position is a target
(``subseq`` selects other ways of cutting sequences into samples; see
:mod:`recforge.models.sequential.base`).

Deviations from the paper: the loss is selectable and defaults to full-softmax cross-entropy
(``loss=ce``) instead of the paper's binary cross-entropy with one negative per position
(``loss=bce, n_negatives=1`` reproduces it); the feed-forward network is ``inner`` wide with a
GELU (the paper: width ``hidden``, ReLU; ``inner=hidden, activation=relu`` reproduces it); keys
at padded positions are excluded from attention exactly (causal attention on right-aligned
rows); weights are initialised from N(0, 0.02).
"""

from __future__ import annotations

import torch

from recforge.models.sequential.base import SequentialRecommender
from recforge.models.sequential.modules import TransformerEncoder, init_weights, set_transformer_params


class SASRec(SequentialRecommender):
    name = "sasrec"

    def __init__(self, hidden: int = 64, n_layers: int = 2, n_heads: int = 1, inner: int = 256,
                 dropout: float = 0.2, attn_dropout: float | None = None, activation: str = "gelu", **base):
        super().__init__(**base)
        set_transformer_params(self, hidden, n_layers, n_heads, inner, dropout, attn_dropout, activation)

    #: extra tokens after the catalogue in the embedding table (a mask token for subclasses)
    extra_tokens = 0

    def build(self, n_users, n_items):
        net = TransformerEncoder(
            n_items + 1 + self.extra_tokens, self.max_len, self.hidden, self.n_layers, self.n_heads, self.inner,
            self.dropout, self.dropout if self.attn_dropout is None else self.attn_dropout,
            causal=True, norm_first=True, activation=self.activation, scale_embeddings=True)
        init_weights(net)
        return net

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.net_(seqs)

    def output_table(self) -> torch.Tensor:
        return self.net_.item.weight[: self.n_items_ + 1]
