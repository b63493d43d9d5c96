"""MB-SASRec: a behaviour-aware Transformer over the user's multi-behaviour sequence.

In the line of MB-STR (Yuan, Gao, Xia, Huang & Li, "Multi-Behavior Sequential Transformer
Recommender", SIGIR 2022) and PBAT (Su, Chen, Lin, Xie, Liu, Zhang, Chen & Dong, "Personalized
Behavior-Aware Transformer for Multi-Behavior Sequential Recommendation", ACM MM 2023), built on
SASRec (Kang & McAuley, ICDM 2018).

Input: the user's whole time-ordered history of every behaviour (views, carts, purchases...), its
last ``max_len`` rows, each row an (item, behaviour) pair. The token embedding is the sum of the
item embedding (scaled by sqrt(hidden)), a learned position embedding (counted back from the most
recent row) and a learned **behaviour embedding**; then dropout, ``n_layers`` pre-LN blocks of
causal multi-head self-attention and feed-forward networks (:mod:`recforge.models.sequential.modules`),
and a final layer norm. The same item bought and viewed is one item embedding plus two behaviour
embeddings, so what a user viewed informs what they will buy.

Training: at every position of the training sequence the target is the user's **next
target-behaviour item** (the next purchase after that row, however many views lie between), with
full-softmax cross-entropy over the catalogue (``loss=ce``; the output table is the item
embedding). Positions after the user's last training purchase have no target and are not
trained on. ``subseq=none`` (default): one window per user, the ``max_len`` rows before their last
training purchase; ``subseq=window``: non-overlapping windows of ``max_len`` rows tiling the whole
trainable part of the sequence. Scoring: the output at the last history row against every item,
i.e. the next purchase. The history at ranking time comes with its behaviours
(:attr:`Histories.behaviors`); one without them counts every row as the most frequent training
behaviour (:mod:`recforge.models.multibehavior.base`).

Deviations from MB-STR and PBAT, which are richer: no behaviour-specific attention projections
(MB-STR's multi-behaviour multi-head attention, PBAT's behaviour-relation attention and Gaussian
personalised behaviour representations) and no behaviour-specific prediction heads; behaviour
enters through the additive embedding only, as in the simpler baselines those papers compare to
(e.g. BERT4Rec / SASRec with behaviour type embeddings). Training is causal next-purchase
prediction (MB-STR trains a masked-item task and PBAT predicts the next item of every behaviour);
the loss is the full softmax. Weights are initialised from N(0, 0.02).
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

from recforge.errors import ConfigError
from recforge.models.multibehavior.base import BehaviorAware, WindowBatches, history_windows, training_rows
from recforge.models.sequential.base import pad_windows
from recforge.models.sequential.modules import (Block, Dropout, Layout, init_weights, set_transformer_params)
from recforge.models.torch_base import TorchRecommender
from recforge.training.losses import ce_loss

SUBSEQ_MODES = ("none", "window")


class BehaviorTransformer(nn.Module):
    """Item + position + behaviour embeddings and causal pre-LN blocks over left-padded (B, L)
    item and behaviour ids (0 = padding); output (B, L, hidden), zeros at padding."""

    def __init__(self, n_items: int, n_behaviors: int, max_len: int, hidden: int, n_layers: int, n_heads: int,
                 inner: int, dropout: float, attn_dropout: float, activation: str):
        super().__init__()
        self.scale = hidden**0.5
        self.item = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.behavior = nn.Embedding(n_behaviors + 1, hidden, padding_idx=0)
        self.pos = nn.Embedding(max_len, hidden)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, n_heads, inner, dropout, attn_dropout, True, activation)
                                    for _ in range(n_layers))
        self.ln = nn.LayerNorm(hidden, eps=1e-8)

    def forward(self, seqs: torch.Tensor, behs: torch.Tensor) -> torch.Tensor:
        layout = Layout(seqs, right=True)
        r, c = layout.rows, layout.cols
        pos = c + (self.pos.num_embeddings - seqs.shape[1])
        x = self.item(seqs[r, c]) * self.scale + self.pos(pos) + self.behavior(behs[r, c])
        x = self.drop(x)
        for blk in self.blocks:
            x = blk(x, layout, True)
        return layout.to_padded(self.ln(x))


def next_target_items(users: np.ndarray, items: np.ndarray, is_target: np.ndarray) -> np.ndarray:
    """For every row of a (user, time)-sorted array: the item of the user's next target row after
    it (0 when there is none)."""
    n = len(items)
    pos = np.where(is_target, np.arange(n), n)
    nxt = np.minimum.accumulate(pos[::-1])[::-1]  # first target row at or after each row
    after = np.append(nxt[1:], n)  # strictly after
    ok = after < n
    out = np.zeros(n, dtype=np.int64)
    same = ok.copy()
    same[ok] = users[after[ok]] == users[ok]
    out[same] = items[after[same]]
    return out


class MBSASRec(WindowBatches, BehaviorAware, TorchRecommender):
    name = "mbsasrec"

    def __init__(self, max_len: int = 50, hidden: int = 64, n_layers: int = 2, n_heads: int = 1, inner: int = 256,
                 dropout: float = 0.2, attn_dropout: float | None = None, activation: str = "gelu",
                 subseq: str = "none", threads: int | None = None, **train):
        super().__init__(**train)
        if max_len < 1:
            raise ConfigError(f"max_len={max_len}: must be >= 1")
        if subseq not in SUBSEQ_MODES:
            raise ConfigError(f"subseq={subseq!r}: choose one of {', '.join(SUBSEQ_MODES)}")
        set_transformer_params(self, hidden, n_layers, n_heads, inner, dropout, attn_dropout, activation)
        self.max_len, self.subseq, self.threads = max_len, subseq, threads

    # ---- samples ------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        target, behaviors, default = self.adopt_behaviors(split)
        users, items, codes = training_rows(split, behaviors, target)
        nxt = next_target_items(users, items, codes == behaviors.index(target) + 1)
        # each user's trainable rows: from their first row up to their last row with a target
        has = nxt > 0
        first = np.searchsorted(users, np.arange(split.n_users), side="left")
        last_t = np.full(split.n_users, -1, dtype=np.int64)
        np.maximum.at(last_t, users[has], np.flatnonzero(has))
        u = np.flatnonzero(last_t >= 0)
        lo, hi = first[u], last_t[u] + 1
        if len(u) == 0:
            raise ConfigError(f"{self.name}: no training sequence has a row before a {target!r} row")
        if self.subseq == "none":
            starts, ends = np.maximum(lo, hi - self.max_len), hi
        else:
            counts = -(-(hi - lo) // self.max_len)
            j = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            ends = np.repeat(hi, counts) - j * self.max_len
            starts = np.maximum(np.repeat(lo, counts), ends - self.max_len)
        self._inp = pad_windows(items, starts, ends, self.max_len)
        self._beh = pad_windows(codes, starts, ends, self.max_len)
        self._tgt = pad_windows(nxt, starts, ends, self.max_len)

    # ---- the model ----------------------------------------------------------------------------
    def build(self, n_users, n_items):
        net = BehaviorTransformer(n_items, len(self.behaviors_), self.max_len, self.hidden, self.n_layers,
                                  self.n_heads, self.inner, self.dropout,
                                  self.dropout if self.attn_dropout is None else self.attn_dropout, self.activation)
        init_weights(net)
        return net

    def loss(self, batch) -> torch.Tensor:
        hidden = self.net_(batch["inp"], batch["beh"])
        tgt = batch["tgt"]
        sel = tgt > 0
        return ce_loss(hidden[sel], self.net_.item.weight, tgt[sel])  # fused: no (P, n_items) logits kept

    def score(self, hist) -> torch.Tensor:
        """Scores (batch, n_items + 1) on the model's device."""
        dev = self.device_
        seqs, behs = history_windows(hist, self.behaviors_, self.default_behavior_, self.max_len)
        with torch.no_grad():
            h = self.net_(seqs.to(dev), behs.to(dev))[:, -1]
            return h @ self.net_.item.weight.T

    def protocol_notes(self) -> dict:
        return {"loss": "ce (full softmax) on the next target-behaviour item", "max_len": self.max_len,
                "subsequence_split": self.subseq, "target_behavior": self.target_behavior_,
                "behaviors_used": list(self.behaviors_),
                "input": "the whole multi-behaviour history with behaviour embeddings"}
