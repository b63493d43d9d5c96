"""GRec: gap-filling encoder-decoder over item sequences.

Yuan, He, Jiang, Guo, Xiong, Xu & Xiong, "Future Data Helps Training: Modeling Future Contexts
for Session-based Recommendation", The Web Conference (WWW) 2020.

Architecture (as implemented here):

* **Encoder**: its own item embedding table (plus a learned ``[gap]`` token, id ``n_items + 1``)
  and a stack of NextItNet residual blocks that are *not* causal: each block applies a dilated
  convolution (kernel ``kernel_size``, dilation ``d``), layer norm and ReLU, then a second one
  with dilation ``2d``, layer norm and ReLU, and adds the result to its input. Each convolution
  is centred, so a position sees items on both sides. ``dilations`` lists the ``d`` of the
  blocks (``[1, 4, 1, 4]``: receptive field 61 positions).
* **Projector**: the decoder's own item embedding of every position is added to the encoder's
  output at that position, and the sum goes through an inverted-bottleneck feed-forward
  network with a residual connection, ``x + W2 GELU(W1 x)`` (width ``projector_inner``, by
  default twice ``hidden``): the paper's inverted-bottleneck projector, placed after the sum and
  sized as in the authors' code.
* **Decoder**: the same residual blocks, causal (each convolution is padded on the left only),
  over the projector's output. The output at position ``t`` is the representation used to
  predict the item at ``t + 1``: logits ``ReLU(h_t) W^T + b`` with an output layer of its own
  (weights not tied to either embedding table).

Training (gap filling): a sample is a training sequence's last ``max_len + 1`` items. In every
batch, ``round(mask_prob * n)`` (at least one) of the ``n`` items after the first are drawn
afresh and replaced by ``[gap]`` in the *encoder's* input; the decoder reads the original
sequence. The decoder output at ``t`` is trained to predict the item at ``t + 1`` only where that
item is a gap, so the loss is computed on masked positions only. No leak: the encoder reads the
gap, not the item, wherever it is a target, and the causal decoder at ``t`` reads original items
at positions ``<= t`` only; the items after a target (the "future context") reach the decoder
only through the encoder, which sees everything that is not a gap.

Inference (next-item prediction, no look-ahead): the last ``max_len`` history items, with
nothing masked, go to the encoder and to the decoder; the scores are the output layer applied
to the decoder's last position (the most recent history item), as in the authors' code.
``score_gap=true`` instead has the encoder read the window followed by one gap, the position of
the item to predict, as every target is a gap in training (the decoder still reads the history
and its last history position gives the scores); this option is ours. Either way every item the
encoder or the decoder reads is in the history being scored, so the score after position ``t``
of a history never depends on items after ``t``. (The intermediate positions of this path see
later history items through the bidirectional encoder; they are not used.)
Scoring reads ``Histories.sequences(max_len)`` only, never user ids.

Left padding (id 0) is not a token: padded positions are set to zero before every convolution,
which is exactly the convolution's own zero padding at the start of a sequence, so an output
never depends on how much padding precedes it.

Deviations from the paper and choices it leaves open:

* The loss is selectable (``ce``, ``bce``, ``sampled_softmax``, ``gbce``); the default full
  softmax cross-entropy over the catalogue is what the authors' code uses without negative
  sampling. Regularisation is ``weight_decay`` (default 0) instead of the authors' added L2 term
  (0.001 times the mean of the variables' half squared norms).
* The gap is a dedicated learned token; the authors reuse vocabulary index 0 (``<unk>``) and pad
  with an ordinary token, which can itself be masked and predicted. Here padding is never a
  target and never masked.
* The masked count per sequence follows the authors' code (exactly ``max(1, round(mask_prob *
  n))`` of the items after the first, drawn afresh for every batch, always replaced by the gap);
  their cap on predictions per sequence (50) is not applied (it only matters for windows longer
  than 50). ``mask_prob`` defaults to the authors' 0.5.
* ``dropout`` (on the embeddings and on each residual branch and the projector's output) is an
  addition; the default 0 matches the authors' code, which has none.
* Weights are initialised from N(0, 0.02) (the authors: truncated normal with the same scale);
  biases start at zero.
* Windows: the authors train and test on fixed-length padded sessions. Here a training sample
  is a sequence's last ``max_len + 1`` items (``max_len`` targets at most, the first item being
  context only), and scoring reads the last ``max_len`` history items. ``subseq`` selects other
  ways of cutting sequences into samples (:mod:`recforge.models.sequential.base`); with
  ``subseq=prefix`` only the last item of each prefix is masked.
* The same ``dilations``, ``kernel_size`` and width serve encoder and decoder (as in the
  authors' code); no position embedding (the authors' default).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.sequential.base import SequentialRecommender
from recforge.models.sequential.modules import Dropout, init_weights


class DilatedResidualBlock(nn.Module):
    """NextItNet residual block: ``x + ReLU(LN(conv_2d(ReLU(LN(conv_d(x))))))`` with dilations
    ``d`` then ``2d``; causal (left-padded convolutions) or centred. Works on (B, L, d) with a
    (B, L, 1) float ``keep`` mask of the valid positions; padded positions come out as zeros."""

    def __init__(self, hidden: int, kernel_size: int, dilation: int, causal: bool, dropout: float):
        super().__init__()
        self.kernel_size, self.dilation, self.causal = kernel_size, dilation, causal
        self.conv1 = nn.Conv1d(hidden, hidden, kernel_size, dilation=dilation)
        self.conv2 = nn.Conv1d(hidden, hidden, kernel_size, dilation=2 * dilation)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-8)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-8)
        self.drop = Dropout(dropout)

    def conv(self, conv: nn.Conv1d, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        span = (self.kernel_size - 1) * conv.dilation[0]
        left = span if self.causal else span // 2
        x = F.pad((x * keep).transpose(1, 2), (left, span - left))
        return conv(x).transpose(1, 2)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.ln1(self.conv(self.conv1, x, keep)))
        y = F.relu(self.ln2(self.conv(self.conv2, y, keep)))
        return (x + self.drop(y)) * keep


class GRecNet(nn.Module):
    """Encoder embedding and blocks, projector, decoder embedding and blocks, output layer."""

    def __init__(self, n_items: int, hidden: int, dilations: list[int], kernel_size: int,
                 projector_inner: int, dropout: float):
        super().__init__()
        self.enc_item = nn.Embedding(n_items + 2, hidden, padding_idx=0)  # + the gap token
        self.dec_item = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.drop = Dropout(dropout)
        self.encoder = nn.ModuleList(DilatedResidualBlock(hidden, kernel_size, d, False, dropout) for d in dilations)
        self.proj_up = nn.Linear(hidden, projector_inner)
        self.proj_down = nn.Linear(projector_inner, hidden)
        self.decoder = nn.ModuleList(DilatedResidualBlock(hidden, kernel_size, d, True, dropout) for d in dilations)
        self.out = nn.Linear(hidden, n_items + 1)

    def encode(self, enc_seqs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.enc_item(enc_seqs)) * keep
        for blk in self.encoder:
            x = blk(x, keep)
        return x

    def forward(self, enc_seqs: torch.Tensor, dec_seqs: torch.Tensor) -> torch.Tensor:
        """Decoder outputs (B, L, hidden), zeros at padding. ``enc_seqs``: the encoder's input
        (gaps where items are masked); ``dec_seqs``: the original items (0 where the encoder
        reads a gap that has no original item, the one appended by ``score_gap``)."""
        dtype = self.dec_item.weight.dtype
        keep = (dec_seqs > 0).unsqueeze(-1).to(dtype)
        x = self.encode(enc_seqs, (enc_seqs > 0).unsqueeze(-1).to(dtype)) + self.drop(self.dec_item(dec_seqs))
        x = (x + self.drop(self.proj_down(F.gelu(self.proj_up(x))))) * keep
        for blk in self.decoder:
            x = blk(x, keep)
        return x


class GRec(SequentialRecommender):
    name = "grec"

    def __init__(self, hidden: int = 64, dilations: list[int] = (1, 4, 1, 4), kernel_size: int = 3,
                 projector_inner: int | None = None, dropout: float = 0.0, mask_prob: float = 0.5,
                 score_gap: bool = False, **base):
        super().__init__(**base)
        if self.max_len < 2:
            raise ConfigError(f"max_len={self.max_len}: grec needs max_len >= 2 (one context item and one gap)")
        if hidden < 1:
            raise ConfigError(f"hidden={hidden}: must be >= 1")
        dilations = list(dilations) if isinstance(dilations, (list, tuple)) else dilations
        if not isinstance(dilations, list) or not dilations or not all(
                isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in dilations):
            raise ConfigError(f"dilations={dilations!r}: give a non-empty list of integers >= 1, e.g. [1, 4, 1, 4]")
        if kernel_size < 2:
            raise ConfigError(f"kernel_size={kernel_size}: must be >= 2 (1 would see no neighbouring item)")
        if projector_inner is not None and projector_inner < 1:
            raise ConfigError(f"projector_inner={projector_inner}: must be >= 1, or null for 2 x hidden")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout}: must be in [0, 1)")
        if not 0.0 < mask_prob <= 1.0:
            raise ConfigError(f"mask_prob={mask_prob}: the share of items replaced by gaps must be in (0, 1]")
        if not isinstance(score_gap, bool):
            raise ConfigError(f"score_gap={score_gap!r}: must be true or false")
        self.hidden, self.dilations, self.kernel_size = hidden, [int(d) for d in dilations], kernel_size
        self.projector_inner, self.dropout, self.mask_prob = projector_inner, dropout, mask_prob
        self.score_gap = score_gap

    @property
    def gap_id(self) -> int:
        return self.n_items_ + 1

    def protocol_notes(self) -> dict:
        encoder = "history + one gap" if self.score_gap else "history, nothing masked"
        return super().protocol_notes() | {"mask_prob": self.mask_prob,
                                           "inference": f"encoder: {encoder}; decoder: history, last position"}

    def build(self, n_users, n_items):
        inner = 2 * self.hidden if self.projector_inner is None else self.projector_inner
        net = GRecNet(n_items, self.hidden, self.dilations, self.kernel_size, inner, self.dropout)
        init_weights(net)
        for m in net.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        return net

    # ---- training -------------------------------------------------------------------------
    def gap_mask(self, seq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Which items of the left-padded rows ``seq`` become gaps: exactly
        ``max(1, round(mask_prob * n))`` of the ``n`` items after each row's first
        (the last item only under ``subseq=prefix``)."""
        valid = seq > 0
        lengths = valid.sum(1)
        if self.subseq == "prefix":
            masked = np.zeros_like(valid)
            masked[:, -1] = lengths >= 2
            return masked
        cand = valid.copy()
        cand[np.arange(len(seq)), seq.shape[1] - lengths] = False  # the first item is context only
        n = lengths - 1
        count = np.where(n > 0, np.maximum(1, np.floor(n * self.mask_prob + 0.5)), 0).astype(np.int64)
        keys = np.where(cand, rng.random(seq.shape), 2.0)
        rank = np.empty_like(seq)
        np.put_along_axis(rank, np.argsort(keys, 1, kind="stable"), np.arange(seq.shape[1])[None, :], 1)
        return cand & (rank < count[:, None])

    def make_batch(self, rows: np.ndarray, rng: np.random.Generator) -> dict:
        """``enc``: the samples with gaps; ``dec``: the samples as they are; ``tgt[t]``: the item
        at ``t + 1`` where it is a gap, else 0 (the decoder at ``t`` predicts it)."""
        seq = self._samples[rows]
        masked = self.gap_mask(seq, rng)
        enc = np.where(masked, self.gap_id, seq)
        tgt = np.zeros_like(seq)
        tgt[:, :-1] = np.where(masked[:, 1:], seq[:, 1:], 0)
        batch = {"rows": rows, "enc": torch.from_numpy(enc), "dec": torch.from_numpy(seq), "tgt": torch.from_numpy(tgt)}
        batch["neg"] = self.draw_negatives(rows, tgt, rng)
        return batch

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """``[ReLU(h), 1]``: with :meth:`output_table` ``[W, b]`` a dot product gives the logits."""
        return torch.cat([F.relu(h), h.new_ones(h.shape[:-1] + (1,))], -1)

    def output_table(self) -> torch.Tensor:
        out = self.net_.out
        return torch.cat([out.weight, out.bias.unsqueeze(1)], 1)

    def loss(self, batch: dict) -> torch.Tensor:
        h = self.net_(batch["enc"], batch["dec"])
        return self.next_item_loss(self.features(h), batch["tgt"], batch.get("neg"))

    # ---- inference ------------------------------------------------------------------------
    def encode(self, seqs: torch.Tensor, enc_seqs: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder outputs (B, L, hidden) for the original items ``seqs``; the encoder reads
        ``enc_seqs`` (None: ``seqs`` with nothing masked, the inference path)."""
        return self.net_(seqs if enc_seqs is None else enc_seqs, seqs)

    def score(self, hist) -> torch.Tensor:
        """Scores (batch, n_items + 1) on the model's device: the output layer on the decoder's
        output at the last history item; the encoder reads the same window (``score_gap``: and
        one gap after it)."""
        seqs = self.score_input(hist)
        with torch.no_grad():
            if self.score_gap:
                pad = seqs.new_zeros((len(seqs), 1))
                h = self.net_(torch.cat([seqs, pad + self.gap_id], 1), torch.cat([seqs, pad], 1))[:, -2]
            else:
                h = self.encode(seqs)[:, -1]
            return self.features(h) @ self.output_table().T
