"""BERT4Rec: bidirectional Transformer trained by masked item prediction.

Sun et al., "BERT4Rec: Sequential Recommendation with Bidirectional Encoder Representations
from Transformer", CIKM 2019.

Item + learned position embeddings, layer norm and dropout, ``n_layers`` post-LN Transformer
blocks (as in BERT) without a causal mask, then the paper's output layer
``GELU(h W + b)`` followed by layer norm and a dot product with the (shared) item embeddings.
The token ``n_items + 1`` is ``[MASK]``.

Training (Cloze task): each training sequence (its last ``max_len`` items) has every item
replaced by ``[MASK]`` with probability ``mask_prob`` (at least one per sequence) and the
masked items are the targets; with probability ``mask_last_prob`` a sequence instead has only
its last item masked, the paper's extra samples that match the prediction task. Inference
appends ``[MASK]`` after the last ``max_len - 1`` history items and scores the items at that
position.

Deviations from the paper: the loss is selectable (default full-softmax cross-entropy, as in
the paper) and the output layer has no per-item bias; the masked items are drawn afresh in
every epoch instead of a fixed number of pre-generated copies (``dupe_factor``);
``subseq=prefix`` masks only the last item of every prefix.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recforge.errors import ConfigError
from recforge.models.sequential.base import SequentialRecommender
from recforge.models.sequential.modules import ACTIVATIONS, TransformerEncoder, init_weights, set_transformer_params


class BERT4RecNet(nn.Module):
    def __init__(self, encoder: TransformerEncoder, hidden: int, activation: str):
        super().__init__()
        self.encoder = encoder
        self.out = nn.Linear(hidden, hidden)
        self.act = ACTIVATIONS[activation]
        self.out_ln = nn.LayerNorm(hidden, eps=1e-8)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.out_ln(self.act(self.out(self.encoder(seqs))))


class BERT4Rec(SequentialRecommender):
    name = "bert4rec"

    def __init__(self, hidden: int = 64, n_layers: int = 2, n_heads: int = 2, inner: int = 256,
                 dropout: float = 0.1, attn_dropout: float | None = None, activation: str = "gelu",
                 mask_prob: float = 0.2, mask_last_prob: float = 0.1, **base):
        super().__init__(**base)
        if not 0.0 < mask_prob <= 1.0:
            raise ConfigError(f"mask_prob={mask_prob}: must be in (0, 1]")
        if not 0.0 <= mask_last_prob <= 1.0:
            raise ConfigError(f"mask_last_prob={mask_last_prob}: must be in [0, 1]")
        set_transformer_params(self, hidden, n_layers, n_heads, inner, dropout, attn_dropout, activation)
        self.mask_prob, self.mask_last_prob = mask_prob, mask_last_prob

    @property
    def mask_id(self) -> int:
        return self.n_items_ + 1

    def protocol_notes(self) -> dict:
        return super().protocol_notes() | {"mask_prob": self.mask_prob, "mask_last_prob": self.mask_last_prob}

    def build(self, n_users, n_items):
        enc = TransformerEncoder(
            n_items + 2, self.max_len, self.hidden, self.n_layers, self.n_heads, self.inner, self.dropout,
            self.dropout if self.attn_dropout is None else self.attn_dropout,
            causal=False, norm_first=False, activation=self.activation)
        net = BERT4RecNet(enc, self.hidden, self.activation)
        init_weights(net)
        return net

    def make_batch(self, rows: np.ndarray, rng: np.random.Generator) -> dict:
        seq = self._samples[rows][:, 1:].copy()  # the last max_len items of each sample
        valid = seq > 0
        if self.subseq == "prefix":
            masked = np.zeros_like(valid)
            masked[:, -1] = True
        else:
            masked = valid & (rng.random(seq.shape) < self.mask_prob)
            last_only = rng.random(len(seq)) < self.mask_last_prob
            masked[last_only] = False
            none = ~masked.any(1)
            masked[none, -1] = True  # at least one target per sequence (the last column is never padding)
        tgt = np.where(masked, seq, 0)
        seq[masked] = self.mask_id
        batch = {"rows": rows, "inp": torch.from_numpy(seq), "tgt": torch.from_numpy(tgt)}
        batch["neg"] = self.draw_negatives(rows, tgt, rng)
        return batch

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.net_(seqs)

    def output_table(self) -> torch.Tensor:
        return self.net_.encoder.item.weight[: self.n_items_ + 1]

    def score_input(self, hist) -> torch.Tensor:
        seqs = hist.sequences(self.max_len - 1)
        seqs = torch.cat([seqs, torch.full((len(seqs), 1), self.mask_id, dtype=seqs.dtype)], 1)
        return seqs.to(self.device_)
