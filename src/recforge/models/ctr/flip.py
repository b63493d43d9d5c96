"""FLIP: fine-grained alignment between an ID-based CTR model and a pre-trained language model.

Wang, Lin, Li, Chen, Zhu, Tang, Zhang and Yu, "FLIP: Fine-grained Alignment between ID-based Models
and Pretrained Language Models for CTR Prediction", RecSys 2024 (arXiv 2310.19453; authors' code:
github.com/justarter/FLIP). A row has two modalities: its ID features (the tabular row, read by a
CTR model) and its textual form (read by a PLM). FLIP pre-trains the two to agree feature by
feature, then fine-tunes for clicks. The row text, the PLM (all-MiniLM-L6-v2 by default, with an
added MLM head tied to its word embeddings), the backbone, the budgets and the two fine-tuning
modes are those of :mod:`recforge.models.ctr.plm` (read it first). Alignment pre-training sums
three losses (``objectives``; the authors' code switches each off for its ablations):

* ``mlm`` (masked language modelling conditioned on the tabular row): in every row,
  ``k = max(1, ⌊text_mask_ratio · n + ½⌋)`` of its ``n`` text columns are chosen and *every* token
  of their values is replaced by ``[MASK]`` (field-level masking, as in the authors' code); the
  masked text goes through the PLM, and each masked token is predicted from its hidden state
  concatenated with the CTR model's representation of the complete tabular row.
* ``mtm`` (masked tabular modelling conditioned on the text): independently of the text masks
  (the authors' default, ``mask_same_column=False``), ``k`` of the row's categorical fields are
  masked: the id becomes the padding id (its first-order weight drops out) and its embedding a
  learned mask vector of that field, exactly as MAP's MFP (:mod:`recforge.models.ctr.map`). The
  CTR model's representation of the masked row queries the complete text's token states
  (``q = LayerNorm(W r)``, softmax over the real tokens of ``q · h_t``); the representation and
  the attended text vector predict each masked id by noise-contrastive estimation against
  ``negatives`` ids drawn from the field's frequency (MAP's MFP head, the estimator of the
  authors' code).
* ``contrastive`` (instance-level): the complete row's representation and the complete text's
  ``[CLS]`` state are projected to ``align_dim`` (linear, GELU, linear, dropout 0.2, residual,
  LayerNorm, the authors' projection head) and matched by the symmetric InfoNCE loss over the
  batch at ``temperature`` (0.7, the authors' default; the projections are not L2-normalised, as
  in their code).

The representation of a row is the backbone's ``represent`` (the vector its prediction layer
reads; DeepFM: the MLP's last hidden layer and the FM logit; DCN-V2: the cross and MLP outputs),
the one MAP pre-trains. The complete text goes through the PLM once per step and serves both the
contrastive and the MTM loss.

Fine-tuning (``finetune``):

* ``ctr`` (default; the paper's FLIP_ID): the aligned CTR model alone, the PLM dropped. The default
  because it is what a CPU can afford to train and to serve: the saved model is the backbone's
  network, scored at its cost, while the joint model runs the PLM on every row it trains on and
  scores (one CPU thread trains MiniLM on about 20 rows a second with text this long: FLIP's
  alignment, two PLM passes per row, on about 10).
* ``joint`` (the paper's final FLIP): ``y = α · ctr_logit + (1 − α) · plm_logit``, the PLM logit a
  linear layer on the ``[CLS]`` state, α learned from 0 (the authors' initialisation), trained
  with the sum of the binary cross-entropies of ``y``, of the CTR logit and of the PLM logit (the
  authors' loss).

Deviations from the paper and the authors' code, and choices they leave open: all-MiniLM-L6-v2
(a sentence encoder without an MLM head: the head is added and tied to the word embeddings, its
transform trained from scratch) instead of TinyBERT / RoBERTa; the MLM head is tied, not a fresh
full-vocabulary layer; the MTM attention ignores padding tokens (the authors' attends over them);
masked text tokens are always ``[MASK]``; the pre-training budget is a seeded sample of
``pretrain_rows`` training rows for ``pretrain_epochs`` epochs (the authors' script: all rows, 25
epochs on GPUs) with two learning rates (``pretrain_lr`` for the CTR model and heads, ``plm_lr`` = 5e-5, the
authors' single rate, for the PLM: at 5e-5 a randomly initialised CTR model barely moves in one
epoch), the cosine schedule per step instead of per epoch; the FLIP_PLM fine-tuning mode (the PLM
alone) is not offered; α starts at 0 as in the authors' code; numeric and
multi-valued fields are never masked in MTM (FLIP's data is all categorical).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recforge.errors import ConfigError
from recforge.models.ctr.map import MFPHead, choose_fields, n_masked
from recforge.models.ctr.plm import (MLMHead, PLMAlignedCTR, apply_mask, mask_fields, mlm_loss, plm_states,
                                     represent_dim)

OBJECTIVES = ("mlm", "mtm", "contrastive")


class ProjectionHead(nn.Module):
    """Linear, GELU, linear, dropout, residual, LayerNorm (the authors' projection head)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.2):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.fc = nn.Sequential(nn.GELU(), nn.Linear(out_dim, out_dim), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x):
        p = self.proj(x)
        return self.norm(p + self.fc(p))


class FLIPAligner(nn.Module):
    """The three alignment losses over a CTR network and a PLM (module docstring)."""

    def __init__(self, model: "FLIP", ctr, plm, tokenizer, rows):
        super().__init__()
        self.ctr, self.plm, self.objectives = ctr, plm, list(model.objectives)
        self.mask_id = tokenizer.mask_token_id
        self.temperature = float(model.temperature)
        self.skip = tuple(getattr(ctr, "skip", ()))
        self.emb = getattr(ctr, "embedding", None)  # None: a backbone without embeddings (LR)
        H = plm.get_input_embeddings().embedding_dim
        read = [f["name"] for f in model.fields_ if f["name"] not in self.skip]
        self.cats = [f for f in model.fields_ if f["kind"] == "categorical" and f["name"] in read]
        self.pos = [read.index(f["name"]) for f in self.cats]
        self.n_text = len(model.text_columns_)
        self.k_text = n_masked(self.n_text, model.text_mask_ratio)
        self.k_tab = n_masked(len(self.cats), model.field_mask_ratio) if self.cats else 0
        self.negatives = int(model.negatives)
        self.gen = torch.Generator(device=model.device_)
        self.gen.manual_seed(int(model.seed) + 1)
        R = represent_dim(ctr, model.fields_)
        if "mlm" in self.objectives:
            self.mlm_head = MLMHead(plm.get_input_embeddings(), H + R)
        if "contrastive" in self.objectives:
            self.rep_proj, self.text_proj = ProjectionHead(R, model.align_dim), ProjectionHead(H, model.align_dim)
        if "mtm" in self.objectives:
            if not self.cats or self.emb is None:
                raise ConfigError("flip: masked tabular modelling (objectives: mtm) masks the embeddings of "
                                  "categorical fields, and this backbone or data has none; drop mtm from objectives")
            names = [f["name"] for f in model.fields_]
            dims = [self.emb.dims[names.index(f["name"])] for f in self.cats]
            counts = [np.bincount(np.asarray(rows.x[f["name"]]).ravel(), minlength=f["vocab"])[: f["vocab"]]
                      .astype(np.float64) for f in self.cats]
            counts = [c + (c.sum() == 0) for c in counts]
            self.query = nn.Sequential(nn.Linear(R, H), nn.LayerNorm(H))
            self.mtm = MFPHead(R + H, dims, counts, int(model.proj))

    def plm_parameters(self):
        return list(self.plm.parameters())

    # ---- corruption (public for the tests: nothing masked reaches the model) --------------------
    def mask_text(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masked ids, labels)``: every token of ``k_text`` chosen text columns per row masked."""
        ids, fld = batch["_text_ids"], batch["_text_field"]
        chosen = choose_fields(ids.shape[0], self.n_text, self.k_text, self.gen, ids.device)
        return apply_mask(ids, mask_fields(fld, chosen), self.mask_id)

    def mask_table(self, batch) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """``(masked batch, original ids (B, n_cat), chosen (B, n_cat))``: ``k_tab`` categorical
        fields per row set to the padding id (their embeddings become mask vectors in ``embed``)."""
        ids = torch.stack([batch[f["name"]] for f in self.cats], 1)
        chosen = choose_fields(ids.shape[0], len(self.cats), self.k_tab, self.gen, ids.device)
        new = ids.masked_fill(chosen, 0)
        out = dict(batch)
        for j, f in enumerate(self.cats):
            out[f["name"]] = new[:, j]
        return out, ids, chosen

    def embed(self, batch, chosen=None) -> list[torch.Tensor] | None:
        if self.emb is None:
            return None
        embs = self.emb(batch, skip=self.skip)
        if chosen is not None:
            for j, p in enumerate(self.pos):
                embs[p] = torch.where(chosen[:, j : j + 1], self.mtm.mask[j].to(embs[p].dtype), embs[p])
        return embs

    # ---- the losses --------------------------------------------------------------------------------
    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        ids, att = batch["_text_ids"], batch["_text_mask"]
        rep = self.ctr.represent(batch, self.embed(batch)).float()
        parts, total = {}, 0.0
        if "contrastive" in self.objectives or "mtm" in self.objectives:
            states = plm_states(self.plm, ids, att)
        if "contrastive" in self.objectives:
            logits = self.rep_proj(rep) @ self.text_proj(states[:, 0].float()).T / self.temperature
            target = torch.arange(len(logits), device=logits.device)
            parts["contrastive"] = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        if "mtm" in self.objectives:
            masked, orig, chosen = self.mask_table(batch)
            rep_m = self.ctr.represent(masked, self.embed(masked, chosen)).float()
            scores = (states.float() @ self.query(rep_m).unsqueeze(-1)).squeeze(-1).masked_fill(att == 0, -1e4)
            attended = (scores.softmax(-1).unsqueeze(-1) * states.float()).sum(1)
            noise = self.mtm.sampler(chosen.nonzero(as_tuple=True)[1], self.negatives, self.gen)
            parts["mtm"] = self.mtm.loss(torch.cat([rep_m, attended], -1), orig, chosen, noise)
        if "mlm" in self.objectives:
            masked_ids, labels = self.mask_text(batch)
            parts["mlm"] = mlm_loss(self.mlm_head, plm_states(self.plm, masked_ids, att).float(), labels, rep)
        for v in parts.values():
            total = total + v
        return total, {k: float(v.detach()) for k, v in parts.items()}


class FLIPJoint(nn.Module):
    """``y = α · ctr_logit + (1 − α) · plm_logit`` (the PLM logit a linear layer on ``[CLS]``)."""

    def __init__(self, ctr, plm, n_labels: int):
        super().__init__()
        self.ctr, self.plm = ctr, plm
        self.head = nn.Linear(plm.get_input_embeddings().embedding_dim, n_labels)
        self.alpha = nn.Parameter(torch.zeros(1))

    def parts(self, batch):
        c = self.ctr(batch)
        t = self.head(plm_states(self.plm, batch["_text_ids"], batch["_text_mask"])[:, 0])
        return self.alpha * c + (1 - self.alpha) * t, c, t

    def forward(self, batch):
        return self.parts(batch)[0]


class FLIP(PLMAlignedCTR):
    name = "flip"

    def __init__(self, objectives: list[str] = OBJECTIVES, text_mask_ratio: float = 0.15,
                 field_mask_ratio: float = 0.15, temperature: float = 0.7, negatives: int = 25, proj: int = 32,
                 align_dim: int = 128, **base):
        self.objectives = [str(o).lower() for o in (objectives or [])]
        self.text_mask_ratio, self.field_mask_ratio, self.temperature = text_mask_ratio, field_mask_ratio, temperature
        self.negatives, self.proj, self.align_dim = negatives, proj, align_dim
        super().__init__(**base)
        unknown = sorted(set(self.objectives) - set(OBJECTIVES))
        if unknown or not self.objectives:
            raise ConfigError(f"flip: objectives={objectives!r}: choose one or more of {', '.join(OBJECTIVES)}")
        for key in ("text_mask_ratio", "field_mask_ratio"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                self._bad(key, "give a share of the fields in (0, 1]")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            self._bad("temperature", "give a positive number (the authors' 0.7)")
        for key in ("negatives", "proj", "align_dim"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                self._bad(key, "give a whole number >= 1")

    def align_task(self) -> str:
        return "flip: " + " + ".join({"mlm": "masked language modelling given the tabular row",
                                      "mtm": "masked tabular modelling given the text",
                                      "contrastive": "row-text InfoNCE"}[o] for o in self.objectives)

    def make_aligner(self, ctr_net, plm, tokenizer, rows) -> nn.Module:
        return FLIPAligner(self, ctr_net, plm, tokenizer, rows)

    def make_joint(self, ctr_net, plm) -> nn.Module:
        return FLIPJoint(ctr_net, plm, self.n_labels)

    def joint_loss(self, batch) -> torch.Tensor:
        y, c, t = self.net_.parts(batch)
        label = batch["label"].float()
        return self.with_embedding_reg(sum(F.binary_cross_entropy_with_logits(z.float(), label) for z in (y, c, t)))

    def protocol_notes(self) -> dict:
        notes = super().protocol_notes()
        notes["flip"] = {"objectives": self.objectives, "text_mask_ratio": self.text_mask_ratio,
                         "field_mask_ratio": self.field_mask_ratio, "temperature": self.temperature,
                         "negatives": self.negatives, "align_dim": self.align_dim}
        return notes
