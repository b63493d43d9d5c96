"""FAERec: fusion and alignment of ID and text embeddings for tail items.

Wei et al., "Fusion and Alignment Enhancement with Large Language Models for Tail-item
Sequential Recommendation", arXiv:2604.03688, 2026.

Each item has a trainable ID embedding ``e_id`` and a text embedding ``e_txt`` (its frozen text
vector through a trainable two-layer adapter), both of width ``hidden``.

* **Adaptive gating fusion**: ``g = sigmoid(W [e_id; e_txt] + b)`` per dimension and
  ``e = g * e_id + (1 - g) * e_txt``. The fused embeddings are both the backbone's input and the
  output embeddings the user representation is scored against.
* **Item-level alignment**: a symmetric InfoNCE loss (temperature ``tau``) between the ID and text
  embeddings of the same item, against the other items of the set, on the distinct items of the
  training batch plus ``align_random`` items drawn uniformly from the catalogue (so tail items
  are aligned too).
* **Feature-level alignment**: on the same items, the cross-correlation matrix between the
  standardised dimensions of the two spaces is pushed towards the identity: ``sum_k (1 - C_kk)^2 +
  offdiag_weight * sum_{k != l} C_kl^2``, divided by ``hidden``.
* **Curriculum**: the weights move linearly over the first ``curriculum_epochs`` epochs from
  ``(item_weight, 0)`` to ``(item_weight * item_floor, feature_weight)`` — the easier item-level
  objective leads, the feature-level one is phased in.

Backbones: ``faerec`` (SASRec), ``faerec-gru4rec`` and ``faerec-bert4rec``; every option of the
backbone applies.

Deviations from the paper: text vectors from a local sentence encoder (all-MiniLM-L6-v2 by
default) over the item text template instead of an LLM; the exact form of the curriculum
schedule and the set of items the alignments are computed on are ours (described above); the
loss is the backbone's (full softmax by default); items without training interactions get ID
embeddings imputed from their text vectors after training (``cold_items``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.semantic.base import SemanticMixin, on_backbones


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE between rows of ``a`` and ``b`` (row ``i`` of each is a positive pair)."""
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / tau
    target = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def correlation_alignment(a: torch.Tensor, b: torch.Tensor, offdiag_weight: float) -> torch.Tensor:
    """Cross-correlation of the standardised columns of ``a`` and ``b`` pushed to the identity."""
    za = (a - a.mean(0)) / (a.std(0) + 1e-6)
    zb = (b - b.mean(0)) / (b.std(0) + 1e-6)
    c = za.T @ zb / len(a)
    diag = torch.diagonal(c)
    off = c.pow(2).sum() - diag.pow(2).sum()
    return ((1 - diag).pow(2).sum() + offdiag_weight * off) / c.shape[0]


class FAERecMixin(SemanticMixin):
    """FAERec over a backbone; see the module docstring."""

    def __init__(self, item_weight: float = 0.1, feature_weight: float = 0.05, tau: float = 0.2,
                 offdiag_weight: float = 0.005, curriculum_epochs: int = 10, item_floor: float = 0.5,
                 align_random: int = 256, **semantic):
        super().__init__(**semantic)
        if min(item_weight, feature_weight, offdiag_weight, align_random) < 0 or tau <= 0 or curriculum_epochs < 0:
            raise ConfigError(f"{self.name}: weights and align_random must be >= 0, tau > 0, curriculum_epochs >= 0")
        if not 0.0 <= item_floor <= 1.0:
            raise ConfigError(f"{self.name}: item_floor={item_floor} must be in [0, 1]")
        self.item_weight, self.feature_weight, self.tau = item_weight, feature_weight, tau
        self.offdiag_weight, self.curriculum_epochs, self.item_floor = offdiag_weight, curriculum_epochs, item_floor
        self.align_random = align_random
        self._epoch = 0

    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        self._epoch = 0

    def build(self, n_users, n_items):
        net = super().build(n_users, n_items)
        net.gate = nn.Linear(2 * self.hidden, self.hidden)
        return net

    def curriculum(self) -> tuple[float, float]:
        """``(item-level weight, feature-level weight)`` of the current epoch."""
        p = 1.0 if self.curriculum_epochs == 0 else min(1.0, max(0, self._epoch - 1) / self.curriculum_epochs)
        return self.item_weight * (1 - (1 - self.item_floor) * p), self.feature_weight * p

    def train_batches(self, split, rng):
        self._epoch += 1
        self._rng = rng
        yield from super().train_batches(split, rng)

    def item_tables(self) -> dict:
        net = self.net_
        n = self.n_items_ + 1
        e_id = net.lookup.embedding.weight[:n]
        e_txt = net.adapter(net.sem[:n])
        g = torch.sigmoid(net.gate(torch.cat([e_id, e_txt], dim=1)))
        fused = g * e_id + (1 - g) * e_txt
        fused = torch.cat([fused[:1] * 0, fused[1:]])  # the padding row stays zero
        return {"id": e_id, "txt": e_txt, "out": fused}

    def encode_tables(self, seqs: torch.Tensor, tables: dict) -> torch.Tensor:
        return self.run_backbone(seqs, tables["out"])

    def extra_loss(self, batch: dict, hidden: torch.Tensor) -> torch.Tensor | None:
        base = super().extra_loss(batch, hidden)
        w_item, w_feat = self.curriculum()
        if (w_item <= 0 and w_feat <= 0) or self._step is None:
            return base
        tables = self._step
        n = self.n_items_
        items = torch.unique(torch.cat([batch["inp"].reshape(-1), batch["tgt"].reshape(-1)]))
        if self.align_random:
            rnd = torch.from_numpy(self._rng.integers(1, n + 1, self.align_random))
            items = torch.unique(torch.cat([items, rnd]))
        items = items[(items > 0) & (items <= n)]
        if len(items) < 4:
            return base
        a, b = tables["id"][items], tables["txt"][items]
        total = hidden.new_zeros(())
        if w_item > 0:
            total = total + w_item * info_nce(a, b, self.tau)
        if w_feat > 0:
            total = total + w_feat * correlation_alignment(a, b, self.offdiag_weight)
        return total if base is None else base + total

    def protocol_notes(self) -> dict:
        return super().protocol_notes() | {"curriculum": {
            "epochs": self.curriculum_epochs, "item_weight": self.item_weight, "item_floor": self.item_floor,
            "feature_weight": self.feature_weight}}


FAERec, FAERecGRU4Rec, FAERecBERT4Rec = on_backbones(
    FAERecMixin, "faerec", ("FAERec", "FAERecGRU4Rec", "FAERecBERT4Rec"), "FAERec")
