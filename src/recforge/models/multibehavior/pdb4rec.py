"""PDB4Rec: purity and diversity of a multi-behaviour sequence, seen from the frequency domain.

Han, Cheng, Wang & Chen, "Rethinking Purity and Diversity in Multi-Behavior Sequential
Recommendation from the Frequency Perspective", arXiv 2508.20427, 2025 (the preprint was withdrawn
by its authors in October 2025; no code was published). Its argument: in the frequency spectrum of a
multi-behaviour sequence, the low frequencies carry the stable core of the user's interest
(**purity**) and the high frequencies are not only noise but the breadth of the interest
(**diversity**); the model extracts both bands and lets a **bootstrapping balancer** weigh them.
This implementation is written from that description, on the frequency-filter line of FMLP-Rec
(Zhou et al., WWW 2022) and BSARec (Shin et al., AAAI 2024); the choices the description leaves
open are listed at the end.

Input: the user's last ``max_len`` rows of every behaviour, each an (item, behaviour) pair, as
:mod:`recforge.models.multibehavior.mbsasrec`. The token at column ``t`` is
``E_t = LN(e_item + e_pos(t) + e_behaviour)``, then dropout (padding stays zero). With
``X ∈ R^{L×d}`` (``L`` = ``max_len``), ``F = rfft_t(X)`` its ``L/2 + 1`` frequency bins per channel,
``c = max(1, round(cutoff · (L/2 + 1)))`` bins in the low band and ``W`` learnable complex filters:

* **band split.** ``low(X) = irfft([W_low ⊙ F_{0..c-1}, 0])`` and
  ``high(X) = irfft([0, W_high ⊙ F_{c..}])``; with identity filters ``low(X) + high(X) = X``;
* **purity and diversity encoders.** Two stacks of ``n_layers`` blocks, one filtering the low band
  and one the high band, each block FMLP-Rec's: ``X ← LN(X + Drop(band(X)))``,
  ``X ← LN(X + Drop(FFN(X)))`` (a filter of its own per block); their outputs at the last row are
  ``h_P`` (purity) and ``h_D`` (diversity);
* **bootstrapping balancer.** A gate ``a = σ(w · [h_P, h_D, h_P ⊙ h_D] + b)`` per sequence (the
  product term reads the relation between the bands) fuses them, ``h = a h_P + (1 - a) h_D``; the
  score of item ``i`` is ``h · e_i`` (the item embedding is the output table). The gate is trained
  by the main loss and towards a target the model bootstraps from its own predictions: with
  ``p_P(y)`` and ``p_D(y)`` the softmax probabilities each band alone gives the true next item,
  ``a* = p_P(y) / (p_P(y) + p_D(y))`` (no gradient), and
  ``L_bal = BCE(a, a*)``: the balancer leans, per sequence, towards the band that explains the
  next target better.

Training: ``L = CE(h E^T, y) + λ L_bal`` (``balance_weight`` = λ), full softmax over the catalogue,
``y`` the next **target-behaviour** item after the window's last row
(:func:`~recforge.models.multibehavior.mbsasrec.next_target_items`, as MB-SASRec). The filters
are global along time (every output row mixes every input row), so unlike a causal Transformer the
model cannot be trained at every position of one window; each training sample is a window and its
last row's next target. ``subseq`` says which windows (``target`` and ``prefix`` are sub-sequence
splits of the training sequences: off by default, as every sub-sequence split in RecForge, and
named in the run's protocol as ``subsequence_split``):

* ``target``: one window per target-behaviour row of the training part (the ``max_len``
  rows just before each purchase): every purchase is a target once, the supervision a causal model
  gets from one window per user;
* ``none`` (default): one window per user, before their last training purchase;
* ``prefix``: one window per training row that has a later purchase of the same user (each row's
  next purchase, the targets MB-SASRec trains every position on), many more samples an epoch.

Scoring: the history's last ``max_len`` rows with their behaviours (:attr:`Histories.behaviors`; a
history without them counts every row as the most frequent training behaviour), the fused ``h``
against every item.

Open choices and deviations (the description names the bands, their filters and the balancer,
not every formula):

* two bands split at ``cutoff`` (a fraction of the frequency bins), each with its own encoder stack
  (the description's "various frequency bands" may be more than two); the relation between the
  bands enters through the balancer's product term only;
* filters are FMLP-Rec's: a complex weight per bin and channel, initialised ``N(0, 0.02²)``, the
  FFT taken over the left-padded window of ``max_len`` rows with ``norm="ortho"``; padding rows are
  reset to zero after every sub-layer;
* the balancer's bootstrapped target (each band's own probability of the true next item) and its
  binary cross-entropy are this implementation's reading of "bootstrapping balancer";
* behaviour enters by an additive behaviour embedding, as MB-SASRec; full-softmax cross-entropy;
  weights of the linear and embedding layers from ``N(0, 0.02²)``.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.multibehavior.base import BehaviorAware, WindowBatches, history_windows, training_rows
from recforge.models.multibehavior.mbsasrec import next_target_items
from recforge.models.sequential.base import pad_windows
from recforge.models.sequential.modules import ACTIVATIONS, Dropout, init_weights
from recforge.models.torch_base import TorchRecommender
from recforge.training.losses import ce_loss

SUBSEQ_MODES = ("target", "none", "prefix")


def low_bins(max_len: int, cutoff: float) -> int:
    """Frequency bins of the low band: ``round(cutoff · (max_len // 2 + 1))``, at least one and
    leaving at least one to the high band."""
    n = max_len // 2 + 1
    return int(min(max(1, round(cutoff * n)), n - 1))


def band_split(x: torch.Tensor, c: int, w_low: torch.Tensor | None = None,
               w_high: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` parts of ``x`` (B, L, d) along time: the real FFT's bins ``[0, c)`` times
    ``w_low`` and bins ``[c, L // 2 + 1)`` times ``w_high`` (complex, (bins, d); None: identity),
    each transformed back to (B, L, d). With identity filters ``low + high == x``."""
    length = x.shape[1]
    spec = torch.fft.rfft(x.float(), dim=1, norm="ortho")
    lo, hi = spec[:, :c], spec[:, c:]
    if w_low is not None:
        lo = lo * w_low
    if w_high is not None:
        hi = hi * w_high
    low = torch.fft.irfft(torch.cat([lo, torch.zeros_like(hi)], 1), n=length, dim=1, norm="ortho")
    high = torch.fft.irfft(torch.cat([torch.zeros_like(lo), hi], 1), n=length, dim=1, norm="ortho")
    return low.to(x.dtype), high.to(x.dtype)


class BandBlock(nn.Module):
    """One block of a band's encoder: the band's learnable filter, then a feed-forward network,
    each with dropout, a residual connection and a layer norm (FMLP-Rec's block)."""

    def __init__(self, band: str, c: int, n_bins: int, hidden: int, inner: int, dropout: float, activation: str):
        super().__init__()
        self.band, self.c = band, c
        width = c if band == "low" else n_bins - c
        self.filter = nn.Parameter(torch.randn(width, hidden, 2) * 0.02)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-12)
        self.ff1 = nn.Linear(hidden, inner)
        self.ff2 = nn.Linear(inner, hidden)
        self.drop = Dropout(dropout)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        w = torch.view_as_complex(self.filter)
        low, high = band_split(x, self.c, w if self.band == "low" else None, w if self.band == "high" else None)
        y = low if self.band == "low" else high
        x = self.ln1(x + self.drop(y)) * valid
        return self.ln2(x + self.drop(self.ff2(self.drop(self.act(self.ff1(x)))))) * valid


class PurityDiversityNet(nn.Module):
    """Embeddings, the purity (low band) and diversity (high band) encoders and the balancer."""

    def __init__(self, n_items: int, n_behaviors: int, max_len: int, hidden: int, n_layers: int, inner: int,
                 dropout: float, activation: str, cutoff: float):
        super().__init__()
        n_bins, c = max_len // 2 + 1, low_bins(max_len, cutoff)
        self.item = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.behavior = nn.Embedding(n_behaviors + 1, hidden, padding_idx=0)
        self.pos = nn.Embedding(max_len, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = Dropout(dropout)
        self.purity = nn.ModuleList(BandBlock("low", c, n_bins, hidden, inner, dropout, activation)
                                    for _ in range(n_layers))
        self.diversity = nn.ModuleList(BandBlock("high", c, n_bins, hidden, inner, dropout, activation)
                                       for _ in range(n_layers))
        self.balancer = nn.Linear(3 * hidden, 1)

    def forward(self, seqs: torch.Tensor, behs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h_P, h_D, gate logit)`` at the last row of left-padded (B, L) items and behaviours."""
        length = seqs.shape[1]
        valid = (seqs > 0).unsqueeze(-1).to(self.item.weight.dtype)
        pos = torch.arange(self.pos.num_embeddings - length, self.pos.num_embeddings, device=seqs.device)
        x = self.drop(self.ln(self.item(seqs) + self.pos(pos) + self.behavior(behs))) * valid
        xp, xd = x, x
        for blk in self.purity:
            xp = blk(xp, valid)
        for blk in self.diversity:
            xd = blk(xd, valid)
        hp, hd = xp[:, -1], xd[:, -1]
        return hp, hd, self.balancer(torch.cat([hp, hd, hp * hd], -1)).squeeze(-1)


class PDB4Rec(WindowBatches, BehaviorAware, TorchRecommender):
    name = "pdb4rec"

    def __init__(self, max_len: int = 50, hidden: int = 64, n_layers: int = 2, inner: int = 256,
                 dropout: float = 0.2, activation: str = "gelu", cutoff: float = 0.25, balance_weight: float = 0.1,
                 subseq: str = "none", threads: int | None = None, **train):
        super().__init__(**train)
        if max_len < 2:
            raise ConfigError(f"max_len={max_len}: must be >= 2 (two frequency bands need two bins)")
        if hidden <= 0 or n_layers < 1 or inner <= 0:
            raise ConfigError("pdb4rec: need hidden > 0, n_layers >= 1 and inner > 0")
        if not 0.0 < cutoff < 1.0:
            raise ConfigError(f"cutoff={cutoff}: the share of frequency bins in the low band, in (0, 1)")
        if balance_weight < 0 or not 0.0 <= dropout < 1.0:
            raise ConfigError("pdb4rec: need balance_weight >= 0 and 0 <= dropout < 1")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation={activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if subseq not in SUBSEQ_MODES:
            raise ConfigError(f"subseq={subseq!r}: choose one of {', '.join(SUBSEQ_MODES)}")
        self.max_len, self.hidden, self.n_layers, self.inner = max_len, hidden, n_layers, inner
        self.dropout, self.activation, self.cutoff, self.balance_weight = dropout, activation, cutoff, balance_weight
        self.subseq, self.threads = subseq, threads

    # ---- samples ------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        target, behaviors, default = self.adopt_behaviors(split)
        users, items, codes = training_rows(split, behaviors, target)
        nxt = next_target_items(users, items, codes == behaviors.index(target) + 1)
        n = len(users)
        is_t = codes == behaviors.index(target) + 1
        before_t = np.zeros(n, dtype=bool)  # the row just before a target row of the same user
        before_t[:-1] = is_t[1:] & (users[1:] == users[:-1])
        if self.subseq == "prefix":
            rows = np.flatnonzero(nxt > 0)
        else:
            rows = np.flatnonzero(before_t)
            if self.subseq == "none" and len(rows):
                last = np.r_[users[rows][1:] != users[rows][:-1], True]
                rows = rows[last]
        if len(rows) == 0:
            raise ConfigError(f"{self.name}: no training sequence has a row before a {target!r} row")
        first = np.searchsorted(users, users[rows], side="left")
        ends = rows + 1
        starts = np.maximum(first, ends - self.max_len)
        self._inp = pad_windows(items, starts, ends, self.max_len)
        self._beh = pad_windows(codes, starts, ends, self.max_len)
        self._tgt = nxt[rows]

    # ---- the model ----------------------------------------------------------------------------
    def build(self, n_users, n_items):
        net = PurityDiversityNet(n_items, len(self.behaviors_), self.max_len, self.hidden, self.n_layers, self.inner,
                                 self.dropout, self.activation, self.cutoff)
        init_weights(net)
        return net

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = h @ self.net_.item.weight.T
        out[:, 0] = -torch.inf
        return out

    def loss(self, batch) -> torch.Tensor:
        hp, hd, g = self.net_(batch["inp"], batch["beh"])
        tgt = batch["tgt"]
        a = torch.sigmoid(g).unsqueeze(-1)
        loss = ce_loss(a * hp + (1 - a) * hd, self.net_.item.weight, tgt)
        if self.balance_weight:
            with torch.no_grad():
                lp = torch.log_softmax(self.logits(hp).float(), -1).gather(1, tgt.view(-1, 1)).squeeze(1)
                ld = torch.log_softmax(self.logits(hd).float(), -1).gather(1, tgt.view(-1, 1)).squeeze(1)
                target = torch.sigmoid(lp - ld)  # p_P / (p_P + p_D)
            loss = loss + self.balance_weight * F.binary_cross_entropy_with_logits(g.float(), target)
        return loss

    def encode_history(self, hist) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h_P, h_D, gate logit)`` of a :class:`Histories` batch (no gradient)."""
        dev = self.device_
        seqs, behs = history_windows(hist, self.behaviors_, self.default_behavior_, self.max_len)
        with torch.no_grad():
            return self.net_(seqs.to(dev), behs.to(dev))

    def score(self, hist) -> torch.Tensor:
        """Scores (batch, n_items + 1) on the model's device."""
        hp, hd, g = self.encode_history(hist)
        a = torch.sigmoid(g).unsqueeze(-1)
        with torch.no_grad():
            return (a * hp + (1 - a) * hd) @ self.net_.item.weight.T

    def protocol_notes(self) -> dict:
        return {"loss": "ce (full softmax) on the next target-behaviour item + bootstrapped balancer",
                "max_len": self.max_len, "subsequence_split": self.subseq,
                "low_band_bins": f"{low_bins(self.max_len, self.cutoff)} of {self.max_len // 2 + 1}",
                "balance_weight": self.balance_weight, "target_behavior": self.target_behavior_,
                "behaviors_used": list(self.behaviors_),
                "input": "the whole multi-behaviour history with behaviour embeddings"}
