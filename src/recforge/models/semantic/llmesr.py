"""LLM-ESR: text-enhanced sequential recommendation for long-tail users and items.

Liu, Wu, Wang, Zhang, Tian, Zheng & Zhao, "LLM-ESR: Large Language Models Enhancement for
Long-tailed Sequential Recommendation", NeurIPS 2024.

**Dual-view modelling** (long-tail items). Each item has two embeddings of width ``hidden``:

* semantic view: its frozen text vector through a trainable two-layer adapter;
* collaborative view: a trainable ID embedding *initialised from the text vectors reduced by
  PCA* to ``hidden`` dimensions (rescaled to the backbone's initial scale).

Both views' item sequences go through the **same** sequence encoder (the backbone). The two
output sequences then exchange information by cross-attention in each direction
(``cross_attention``; causal for causal backbones: position ``t`` of one view attends to
positions ``<= t`` of the other, so no target leaks). The user representation is the
concatenation of the two views and an item's output embedding the concatenation of its two
embeddings, so a score is the sum of the two views' dot products.

**Retrieval-augmented self-distillation** (long-tail users). Every user has a semantic
representation, the mean text vector of their training items; the ``n_similar`` most similar
users (cosine) are retrieved once before training. The loss adds ``distill_weight`` times the
mean squared difference between a training sequence's final representation and the mean of its similar
users' representations (teachers, without gradient).

Backbones: ``llmesr`` (SASRec), ``llmesr-gru4rec`` and ``llmesr-bert4rec``; every option of the
backbone applies (``loss``, ``subseq``, ``max_len``, ...).

Deviations from the paper:

* text vectors come from a local sentence encoder (all-MiniLM-L6-v2 by default, 384 dims) over
  the item text template, not from an LLM API; the user semantic representation used for
  retrieval is the mean of the user's item text vectors, not an LLM embedding of a prompt
  listing the user's history;
* teachers' representations come from a memory of every user's final representation, recomputed
  without dropout at the start of every ``refresh_every``-th epoch, instead of encoding the similar
  users' sequences in every step (same signal, one forward pass over users per epoch);
* the views exchange information by one single-head cross-attention layer per direction on the
  encoder *outputs* (with a residual connection), so that the backbone runs unchanged;
* the next-item loss is the backbone's (full softmax by default; ``loss=bce`` is the paper's);
* items without training interactions get ID embeddings imputed from their text vectors after
  training (``cold_items``), a step the paper does not have;
* the self-distillation is **off by default** (``distill_weight=0``; the paper's weight is 0.1):
  with users retrieved by their mean item text vector it lowered validation NDCG@10 on both
  MovieLens sets we measured (see ``configs/models/llmesr.yaml``). Retrieval that separates
  users better (an LLM summary of the history, as in the paper) may change that.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.semantic.base import SemanticMixin, on_backbones, pca_init
from recforge.models.sequential.base import pad_windows
from recforge.models.sequential.modules import Dropout


class CrossView(nn.Module):
    """Single-head attention from one view's sequence to the other's, with a residual; causal
    unless ``bidirectional``."""

    def __init__(self, hidden: int, dropout: float, bidirectional: bool):
        super().__init__()
        self.q, self.kv = nn.Linear(hidden, hidden), nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-8)
        self.drop = Dropout(dropout)
        self.bidirectional = bidirectional
        nn.init.zeros_(self.out.weight)  # starts as the identity: the views are fused gradually
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, other: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        eye = torch.eye(length, dtype=torch.bool, device=x.device)
        mask = valid.unsqueeze(1) | eye  # (B, L, L): valid keys; a row always sees itself
        if not self.bidirectional:
            mask = mask & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        k, v = self.kv(self.ln(other)).chunk(2, dim=-1)
        att = F.scaled_dot_product_attention(self.q(self.ln(x)).unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                             attn_mask=mask.unsqueeze(1))
        return x + self.drop(self.out(att.squeeze(1))) * valid.unsqueeze(-1)


class LLMESRMixin(SemanticMixin):
    """LLM-ESR over a backbone; see the module docstring.

    Own parameters: ``distill_weight`` (weight of the self-distillation loss; 0 turns it off),
    ``n_similar`` (retrieved users per user), ``refresh_every`` (epochs between teacher
    refreshes), ``cross_attention`` (exchange between the views).
    """

    def __init__(self, distill_weight: float = 0.0, n_similar: int = 10, refresh_every: int = 1,
                 cross_attention: bool = True, **semantic):
        super().__init__(**semantic)
        if distill_weight < 0 or n_similar < 1 or refresh_every < 1:
            raise ConfigError(f"{self.name}: need distill_weight >= 0, n_similar >= 1 and refresh_every >= 1")
        self.distill_weight, self.n_similar, self.refresh_every = distill_weight, n_similar, refresh_every
        self.cross_attention = cross_attention
        self._epoch = 0

    # ---- fit ------------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        self._epoch, self._bank = 0, None
        if self.distill_weight > 0:
            indptr, items = split.train_sequences
            lengths = np.diff(indptr)
            starts = np.maximum(indptr[:-1], indptr[1:] - self.max_len)
            seqs = torch.from_numpy(pad_windows(items, starts, indptr[1:], self.max_len))
            self._user_seqs = seqs[torch.from_numpy(lengths > 0)]
            self._bank_row = np.cumsum(lengths > 0) - 1  # user -> row of the bank
            self._similar = self.similar_users(indptr, items, lengths)

    def similar_users(self, indptr: np.ndarray, items: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """``(n_users, k)`` most similar other users with training items, by the cosine of the
        users' mean item text vectors."""
        sem = torch.from_numpy(self._sem)
        n_users = len(lengths)
        user_of = torch.from_numpy(np.repeat(np.arange(n_users), lengths))
        rep = torch.zeros(n_users, sem.shape[1]).index_add_(0, user_of, sem[torch.from_numpy(items)])
        rep = F.normalize(rep, dim=1)
        active = torch.from_numpy(np.flatnonzero(lengths > 0))
        k = min(self.n_similar, max(1, len(active) - 1))
        out = torch.empty(n_users, k, dtype=torch.long)
        for s in range(0, n_users, 2048):
            sim = rep[s : s + 2048] @ rep[active].T
            own = torch.arange(s, min(s + 2048, n_users))
            hit = own.unsqueeze(1) == active.unsqueeze(0)
            sim[hit] = -torch.inf
            out[s : s + 2048] = active[sim.topk(k, dim=1).indices]
        return out.numpy()

    def build(self, n_users, n_items):
        net = super().build(n_users, n_items)
        net.cross_se = CrossView(self.hidden, self.dropout, self.bidirectional) if self.cross_attention else None
        net.cross_co = CrossView(self.hidden, self.dropout, self.bidirectional) if self.cross_attention else None
        if self._sem is not None:  # fitting (not restoring): collaborative view from the PCA of the text vectors
            init = torch.from_numpy(pca_init(self._sem, self.hidden))
            has = (init.abs().sum(1) > 0).nonzero().squeeze(1)
            with torch.no_grad():
                net.lookup.embedding.weight[has] = init[has]
        return net

    def train_batches(self, split, rng):
        self._epoch += 1
        if self.distill_weight > 0 and (self._bank is None or (self._epoch - 1) % self.refresh_every == 0):
            self._bank = self.user_bank()
        yield from super().train_batches(split, rng)

    def user_bank(self) -> torch.Tensor:
        """Final representation of every user's training sequence (no dropout, no gradient)."""
        net = self.net_
        was = net.training
        net.eval()
        try:
            with torch.no_grad():
                tables = self.item_tables()
                seqs = self.representation_input(self._user_seqs)
                bank = torch.cat([self.encode_tables(seqs[s : s + 1024], tables)[:, -1]
                                  for s in range(0, len(seqs), 1024)])
        finally:
            net.train(was)
        return bank

    # ---- the two views ------------------------------------------------------------------------
    def item_tables(self) -> dict:
        net = self.net_
        n = self.n_items_ + 1
        se = net.adapter(net.sem[:n])
        co = net.lookup.embedding.weight[:n]
        return {"se": se, "co": co, "out": torch.cat([se, co], dim=1)}

    def encode_tables(self, seqs: torch.Tensor, tables: dict) -> torch.Tensor:
        net = self.net_
        h_se = self.run_backbone(seqs, tables["se"])
        h_co = self.run_backbone(seqs, tables["co"])
        if net.cross_se is not None:
            valid = seqs > 0
            h_se, h_co = net.cross_se(h_se, h_co, valid), net.cross_co(h_co, h_se, valid)
        return torch.cat([h_se, h_co], dim=-1)

    def extra_loss(self, batch: dict, hidden: torch.Tensor) -> torch.Tensor | None:
        base = super().extra_loss(batch, hidden)
        if self.distill_weight <= 0 or self._bank is None:
            return base
        users = self._sample_user[batch["rows"]]
        teacher = self._bank[torch.from_numpy(self._bank_row[self._similar[users]])].mean(1)
        sd = self.distill_weight * F.mse_loss(hidden[:, -1], teacher)
        return sd if base is None else base + sd

    def protocol_notes(self) -> dict:
        return super().protocol_notes() | {"self_distillation": {"weight": self.distill_weight,
                                                                "n_similar": self.n_similar}}


LLMESR, LLMESRGRU4Rec, LLMESRBERT4Rec = on_backbones(
    LLMESRMixin, "llmesr", ("LLMESR", "LLMESRGRU4Rec", "LLMESRBERT4Rec"), "LLM-ESR")
