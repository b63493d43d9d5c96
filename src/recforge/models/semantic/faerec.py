"""FAERec: fusion and alignment of ID and text embeddings for tail items.

Wei et al., "Fusion and Alignment Enhancement with Large Language Models for Tail-item
Sequential Recommendation", SIGIR 2026 (arXiv:2604.03688). Authors' code:
github.com/ZhifuWei/FAERec (``FAERec/src``); the quotes below are from it.

Each item has a trainable ID embedding ``e_id`` and a text embedding ``e_txt`` (its frozen text
vector through a trainable two-layer adapter), both of width ``hidden``.

* **PCA initialisation** (``pca_init``, on by default): the ID embeddings start as the first
  ``hidden`` principal components of the text vectors, unscaled (``pca_std=None``; a number
  rescales them to that standard deviation). Without it validation NDCG@10 on ML-100K fell from
  .1028 to .0925 (seed 0, ``output=sum``). Authors: ``llm.py`` ``pca_item =
  PCA(n_components=n_components, ...)`` with ``n_components = args.hidden_size``,
  ``pca_item.fit_transform(item_emb_np)``; ``models.py`` ``_init_all_items_with_pca``:
  ``self.item_embeddings.weight[valid_items] = pca_emb_to_use``.
* **Adaptive gating fusion, per position**: at every position ``t`` of the input sequence a gate
  ``g_t = MLP([x_id; x_txt])`` (``Linear(2h, 2h)``, GELU, dropout 0.1, ``Linear(2h, h)``, sigmoid;
  last bias zero) is computed from the two views *with the position embedding added*
  (``x = scale * e + p_t``) and the backbone reads ``g_t * e_id + (1 - g_t) * e_txt`` (plus its
  position embedding, so that the sum is ``g_t * x_id + (1 - g_t) * x_txt``). Authors:
  ``models.py`` ``add_position_embedding``: ``id_seqs += position_embeddings``, ``llm_seqs +=
  position_embeddings``, ``sequence_emb = self._dimension_gating(id_seqs, llm_seqs)``;
  ``gate_network = nn.Sequential(nn.Linear(h*2, h*2), nn.GELU(), nn.Dropout(0.1),
  nn.Linear(h*2, h), nn.Sigmoid())``. A backbone without position embeddings (GRU4Rec) gates
  the two views of each position without one.
* **Output embeddings** (``output``): the authors' code trains against one table and ranks with
  another: its training loss scores against the ID embeddings (``trainers.py`` ``cross_entropy``:
  ``pos_emb = self.model.item_embeddings(pos_ids)``), its ranking against ``LayerNorm(e_id +
  e_txt)`` (``predict_full``: ``test_item_emb = test_item_emb + llm_emb``,
  ``test_item_emb=self.model.LayerNorm(test_item_emb)``). We use one table for both: ``id``
  (default, the authors' training table) or ``sum`` (their ranking table). ``id`` was chosen on
  validation NDCG@10 (seed 0, at most 60 epochs, early stopping): ML-100K .1090 vs .1028 with
  ``sum``, ML-latest-small .0632 vs .0565 (``sum`` was still improving at the cap on both).
* **Item-level alignment**: InfoNCE from each item's ID embedding to the text embeddings of the
  set (temperature ``tau``), one direction as the authors' ``ItemContrastiveLoss``
  (``sim_matrix = torch.matmul(id_emb, llm_emb.T) / temperature``, ``CrossEntropyLoss``);
  ``symmetric=true`` adds the text-to-ID direction.
* **Feature-level alignment, split by popularity**: Barlow-Twins loss ``sum_k (1 - C_kk)^2 +
  offdiag_weight * sum_{k != l} C_kl^2`` (``C``: cross-correlation of the dimensions standardised
  over the set, no division by ``hidden``), computed **separately** on the items whose training
  popularity is at least the set's median (head half) and on the others (tail half), and summed.
  Authors: ``trainers.py`` ``fcl_loss``: ``median_pop = torch.median(item_pops)``,
  ``high_pop_mask = item_pops >= median_pop``, ``total_loss += self.bt_loss(high_id_emb,
  high_llm_emb)`` and the same for ``low_pop_mask``, each only ``if ... .sum() > 1``; ``llm.py``
  ``BTLoss``: ``(x - x.mean(0)) / (x.std(0) + 1e-5)``, ``c = torch.mm(id_norm.T, llm_norm) / N``,
  ``loss = on_diag + self.gamma * off_diag`` with ``BTLoss(gamma=0.005)``.
* **Cyclic cosine curriculum**: in epoch ``e`` (from 0), ``w_item = (w_max - w_min) * (1 +
  cos(2 pi e / period)) / 2 + w_min`` and ``w_feat = 1 - w_item``; the loss adds ``align_weight *
  (w_item * item_loss + w_feat * feature_loss)``. Authors: ``trainers.py``
  ``get_curriculum_weights``: ``cos_value = (1 + math.cos(2 * math.pi * relative_epoch / period)) / 2``,
  ``infonce_weight = (weight_max - weight_min) * cos_value + weight_min``, ``fcl_weight = 1.0 -
  infonce_weight``; ``joint_loss += self.args.cl_weight*(item_weight * item_cl + fcl_weight * fcl)``;
  defaults ``--cl_weight 0.2 --w_min 0.9 --w_max 1 --period 30 --item_tou 0.05`` (their Beauty
  run; Food ``--w_min=0.7 --period=20``, Yelp ``--w_min=0.3 --period=25``).

Backbones: ``faerec`` (SASRec), ``faerec-gru4rec`` and ``faerec-bert4rec``; every option of the
backbone applies.

Deviations from the authors' code:

* text vectors from a local sentence encoder (all-MiniLM-L6-v2 by default) over the item text
  template instead of an LLM embedding API; the PCA is fitted on the items with text (theirs: on
  every row, padding rows included);
* the alignments are computed on the distinct items of the batch (inputs and targets) plus
  ``align_random`` items drawn uniformly from the catalogue; theirs on every position of the
  inputs and of the sampled negatives (uniform items), repeated items masked out of the
  negatives. The popularity median is therefore taken over distinct items;
* the next-item loss is the backbone's (full softmax by default; theirs: one sampled negative
  with binary cross-entropy, ``loss=bce``); the backbone applies its dropout once to the fused
  input instead of to each view before the gate (theirs: ``id_seqs = self.dropout(id_seqs)``,
  ``llm_seqs = self.dropout(llm_seqs)``), and its own layer norms;
* one output table for training and ranking (see above); the output layer norm of ``output=sum``
  is its own (theirs reuses the embedding layer norm of their post-LN encoder; our SASRec is
  pre-LN and has none);
* items without training interactions get ID embeddings imputed from their text vectors after
  training (``cold_items``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.semantic.base import SemanticMixin, on_backbones, pca_init
from recforge.models.sequential.modules import Dropout, Layout

OUTPUTS = ("id", "sum")


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float, symmetric: bool = False) -> torch.Tensor:
    """InfoNCE from rows of ``a`` to rows of ``b`` (row ``i`` of each is a positive pair, the other
    rows of ``b`` the negatives); ``symmetric`` averages it with the ``b`` to ``a`` direction."""
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / tau
    target = torch.arange(len(a), device=a.device)
    loss = F.cross_entropy(logits, target)
    return 0.5 * (loss + F.cross_entropy(logits.T, target)) if symmetric else loss


def barlow_twins(a: torch.Tensor, b: torch.Tensor, offdiag_weight: float) -> torch.Tensor:
    """``sum_k (1 - C_kk)^2 + offdiag_weight * sum_{k != l} C_kl^2`` where ``C`` is the
    cross-correlation of the columns of ``a`` and ``b``, each standardised over the rows
    (unbiased standard deviation + 1e-5), divided by the number of rows."""
    za = (a - a.mean(0)) / (a.std(0) + 1e-5)
    zb = (b - b.mean(0)) / (b.std(0) + 1e-5)
    c = za.T @ zb / len(a)
    diff = (c - torch.eye(c.shape[0], dtype=c.dtype, device=c.device)).pow(2)
    on = torch.diagonal(diff).sum()
    return on + offdiag_weight * (diff.sum() - on)


def split_barlow_twins(a: torch.Tensor, b: torch.Tensor, popularity: torch.Tensor,
                       offdiag_weight: float) -> torch.Tensor:
    """:func:`barlow_twins` on the rows whose ``popularity`` is at least the median (head half)
    plus the same on the other rows (tail half); a half with fewer than two rows adds nothing."""
    head = popularity >= torch.median(popularity)
    total = a.new_zeros(())
    for part in (head, ~head):
        if int(part.sum()) > 1:
            total = total + barlow_twins(a[part], b[part], offdiag_weight)
    return total


def cosine_curriculum(epoch: int, period: int, w_min: float, w_max: float) -> tuple[float, float]:
    """``(item-level weight, feature-level weight)`` in ``epoch`` (counted from 0): the item weight
    follows a cosine of period ``period`` epochs between ``w_max`` (epoch 0) and ``w_min``, the
    feature weight is one minus it."""
    w_item = (w_max - w_min) * (1 + math.cos(2 * math.pi * epoch / period)) / 2 + w_min
    return w_item, 1.0 - w_item


class Gate(nn.Module):
    """The per-position gate: ``sigmoid(MLP([x_id; x_txt]))`` of width ``hidden``."""

    def __init__(self, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.GELU(), Dropout(dropout),
                                 nn.Linear(2 * hidden, hidden))
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x_id: torch.Tensor, x_txt: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(torch.cat([x_id, x_txt], dim=-1)))


class FAERecMixin(SemanticMixin):
    """FAERec over a backbone; see the module docstring.

    Own parameters: ``align_weight`` (the authors' ``cl_weight``), ``w_min``, ``w_max``, ``period``
    (cosine curriculum), ``tau`` and ``symmetric`` (item-level InfoNCE), ``offdiag_weight``
    (Barlow-Twins off-diagonal weight), ``align_random`` (uniform items added to the aligned set),
    ``pca_init`` / ``pca_std`` (ID embedding initialisation), ``output`` (``sum`` or ``id``).
    """

    def __init__(self, align_weight: float = 0.2, w_min: float = 0.9, w_max: float = 1.0, period: int = 30,
                 tau: float = 0.05, symmetric: bool = False, offdiag_weight: float = 0.005, align_random: int = 256,
                 pca_init: bool = True, pca_std: float | None = None, output: str = "id", **semantic):
        super().__init__(**semantic)
        if min(align_weight, offdiag_weight, align_random) < 0 or tau <= 0:
            raise ConfigError(f"{self.name}: align_weight, offdiag_weight and align_random must be >= 0 and tau > 0")
        if not 0.0 <= w_min <= w_max <= 1.0:
            raise ConfigError(f"{self.name}: need 0 <= w_min <= w_max <= 1 (got w_min={w_min}, w_max={w_max})")
        if int(period) < 1:
            raise ConfigError(f"{self.name}: period={period} must be a whole number of epochs >= 1")
        if pca_std is not None and pca_std <= 0:
            raise ConfigError(f"{self.name}: pca_std={pca_std} must be > 0, or null for the unscaled components")
        if output not in OUTPUTS:
            raise ConfigError(f"{self.name}: output={output!r}: choose one of {', '.join(OUTPUTS)}")
        self.align_weight, self.w_min, self.w_max, self.period = align_weight, w_min, w_max, int(period)
        self.tau, self.symmetric, self.offdiag_weight, self.align_random = tau, symmetric, offdiag_weight, align_random
        self.pca_init, self.pca_std, self.output = pca_init, pca_std, output
        self._epoch = 0

    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        self._epoch = 0
        self._popularity = torch.as_tensor(np.asarray(split.item_popularity), dtype=torch.float32)

    def build(self, n_users, n_items):
        net = super().build(n_users, n_items)
        net.gate = Gate(self.hidden)
        net.out_ln = nn.LayerNorm(self.hidden, eps=1e-8) if self.output == "sum" else None
        if self._sem is not None and self.pca_init:  # fitting (not restoring)
            init = torch.from_numpy(pca_init(self._sem, self.hidden, std=self.pca_std))
            has = (init.abs().sum(1) > 0).nonzero().squeeze(1)
            with torch.no_grad():
                net.lookup.embedding.weight[has] = init[has]
        return net

    def on_device(self, device: torch.device) -> None:
        """Move the item popularity (which splits the feature alignment into head and tail) to ``device``."""
        super().on_device(device)
        if getattr(self, "_popularity", None) is not None:
            self._popularity = self._popularity.to(device)

    def curriculum(self) -> tuple[float, float]:
        """``(item-level weight, feature-level weight)`` of the current epoch."""
        return cosine_curriculum(max(self._epoch - 1, 0), self.period, self.w_min, self.w_max)

    def train_state(self) -> dict:
        return {"epoch": self._epoch}  # the curriculum's position, for checkpoints

    def load_train_state(self, state: dict) -> None:
        self._epoch = int(state.get("epoch", self._epoch))

    def train_batches(self, split, rng):
        self._epoch += 1
        self._rng = rng
        yield from super().train_batches(split, rng)

    # ---- item tables and the gate per position -------------------------------------------
    def item_tables(self) -> dict:
        net = self.net_
        n = self.n_items_ + 1
        e_id = net.lookup.embedding.weight[:n]
        e_txt = net.adapter(net.sem[:n])
        if self.output == "sum":
            out = net.out_ln(e_id + e_txt)
        else:
            out = e_id
        out = torch.cat([out[:1] * 0, out[1:]])  # the padding row stays zero
        return {"id": e_id, "txt": e_txt, "out": out}

    def _encoder(self):
        """The backbone's transformer encoder (with position embeddings ``pos``), or None."""
        bb = self.net_.backbone
        enc = getattr(bb, "encoder", bb)
        return enc if hasattr(enc, "pos") and hasattr(enc, "causal") else None

    def fused_lookup(self, seqs: torch.Tensor, tables: dict):
        """The function that gives the backbone, for the ids it looks up (the valid tokens of
        ``seqs`` in its order), ``g_t * e_id + (1 - g_t) * e_txt`` with the gate of each position."""
        net = self.net_
        enc = self._encoder()
        e_id, e_txt = self.with_extra_tokens(tables["id"]), tables["txt"]
        scale = getattr(enc if enc is not None else net.backbone, "scale", 1.0)
        pos = None
        if enc is not None:
            s = seqs[:, -enc.pos.num_embeddings :]
            layout = Layout(s, right=enc.causal)
            tokens = s[layout.rows, layout.cols]
            pos = enc.pos(layout.cols + (enc.pos.num_embeddings - s.shape[1]))

        def fn(ids: torch.Tensor) -> torch.Tensor:
            a = e_id[ids]
            # extra tokens (BERT4Rec's [MASK]) have no text: their ID embedding stands for both views
            b = torch.where((ids <= self.n_items_).unsqueeze(-1), e_txt[ids.clamp(max=self.n_items_)], a)
            xa, xb = a * scale, b * scale
            if pos is not None and ids.shape == tokens.shape and torch.equal(ids, tokens):
                xa, xb = xa + pos, xb + pos
            g = net.gate(xa, xb)
            return g * a + (1 - g) * b

        return fn

    def encode_tables(self, seqs: torch.Tensor, tables: dict) -> torch.Tensor:
        return self.run_backbone(seqs, None, fn=self.fused_lookup(seqs, tables))

    # ---- alignment ----------------------------------------------------------------------------
    def alignment_loss(self, items: torch.Tensor, tables: dict, w_item: float, w_feat: float) -> torch.Tensor:
        """``w_item * InfoNCE + w_feat * split Barlow-Twins`` on ``items`` (not yet weighted by
        ``align_weight``)."""
        a, b = tables["id"][items], tables["txt"][items]
        total = a.new_zeros(())
        if w_item > 0:
            total = total + w_item * info_nce(a, b, self.tau, self.symmetric)
        if w_feat > 0:
            total = total + w_feat * split_barlow_twins(a, b, self._popularity[items], self.offdiag_weight)
        return total

    def extra_loss(self, batch: dict, hidden: torch.Tensor) -> torch.Tensor | None:
        base = super().extra_loss(batch, hidden)
        if self.align_weight <= 0 or self._step is None:
            return base
        n = self.n_items_
        items = torch.unique(torch.cat([batch["inp"].reshape(-1), batch["tgt"].reshape(-1)]))
        if self.align_random:
            rnd = torch.from_numpy(self._rng.integers(1, n + 1, self.align_random)).to(items.device)
            items = torch.unique(torch.cat([items, rnd]))
        items = items[(items > 0) & (items <= n)]
        if len(items) < 4:
            return base
        w_item, w_feat = self.curriculum()
        total = self.align_weight * self.alignment_loss(items, self._step, w_item, w_feat)
        return total if base is None else base + total

    def protocol_notes(self) -> dict:
        return super().protocol_notes() | {"faerec": {
            "curriculum": f"cosine, period {self.period}, w_min {self.w_min}, w_max {self.w_max}",
            "align_weight": self.align_weight, "feature_alignment": "Barlow-Twins on head and tail halves",
            "pca_init": self.pca_init, "output": self.output}}


FAERec, FAERecGRU4Rec, FAERecBERT4Rec = on_backbones(
    FAERecMixin, "faerec", ("FAERec", "FAERecGRU4Rec", "FAERecBERT4Rec"), "FAERec")
