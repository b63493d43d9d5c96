"""Shared machinery of the sequential models: training samples, batches, losses, scoring.

Training samples come from ``Split.train_sequences`` and are built once per fit, vectorised,
as one left-padded matrix of ``max_len + 1`` items per sample; a batch is a slice of its rows
(inputs ``row[:-1]``, targets ``row[1:]``). How sequences become samples is the ``subseq``
parameter, written into :meth:`SequentialRecommender.protocol_notes` because it changes results
a lot:

* ``none`` (default): one sample per user, the last ``max_len + 1`` training items; every
  non-padded position is a target (standard autoregressive training);
* ``prefix``: every prefix of every sequence is its own sample (its last ``max_len + 1`` items),
  with only its last position as target (the "sub-sequence splitting" of many published
  implementations);
* ``window``: non-overlapping windows of ``max_len`` targets tiling each whole sequence from its
  end, every position a target, so histories longer than ``max_len`` are used completely.

Scoring uses ``Histories.sequences(max_len)``, so a raw history of an unknown user is scored
like any other; the few models that also read user ids (a user embedding, a stored per-user
augmentation) say in their docstring what replaces them for an unknown user (``-1``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from recforge.data.dataset import sort_interactions
from recforge.data.schema import TIME
from recforge.errors import ConfigError
from recforge.models.torch_base import TorchRecommender
from recforge.training.losses import DEFAULT_NEGATIVES, LOSSES, log_proposal, next_item_loss
from recforge.training.samplers import SeenPairs, sample_negatives

SUBSEQ_MODES = ("none", "prefix", "window")


def pad_windows(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """Rows ``values[starts[r]:ends[r]]`` left-padded with 0 to ``width`` (ends - starts <= width)."""
    n = len(starts)
    lengths = (ends - starts).astype(np.int64)
    out = np.zeros((n, width), dtype=values.dtype)
    rows = np.repeat(np.arange(n), lengths)
    offs = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, np.repeat(width - lengths, lengths) + offs] = values[np.repeat(starts, lengths) + offs]
    return out


def sample_bounds(indptr: np.ndarray, max_len: int, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(user, start, end)`` of every training sample (``items[start:end]``, at most
    ``max_len + 1`` items, at least 2) for a sub-sequence mode."""
    lengths = np.diff(indptr)
    width = max_len + 1
    users = np.flatnonzero(lengths >= 2)
    lo, n = indptr[users], lengths[users]
    if mode == "none":
        ends = lo + n
        return users, np.maximum(lo, ends - width), ends
    if mode == "prefix":
        counts = n - 1
        user = np.repeat(users, counts)
        t = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts) + 1
        ends = np.repeat(lo, counts) + t + 1
        return user, np.maximum(np.repeat(lo, counts), ends - width), ends
    if mode == "window":
        counts = -(-(n - 1) // max_len)
        user = np.repeat(users, counts)
        j = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        ends = np.repeat(lo + n, counts) - j * max_len
        return user, np.maximum(np.repeat(lo, counts), ends - width), ends
    raise ConfigError(f"subseq={mode!r}: choose one of {', '.join(SUBSEQ_MODES)}")


def train_times(split) -> np.ndarray:
    """Timestamps aligned with ``split.train_sequences`` items."""
    return sort_interactions(split.train)[TIME].to_numpy().astype(np.int64)


class SequentialRecommender(TorchRecommender):
    """Base of the sequential models.

    Subclasses implement ``build``, ``encode(seqs) -> (B, L, d)`` (left-padded input and output)
    and ``output_table() -> (n_items + 1, d)``; they may override ``make_batch`` and
    ``extra_loss`` (a second objective such as a contrastive loss) and ``score_input``.

    ``loss`` is one of ``ce``, ``bce``, ``sampled_softmax``, ``gbce``
    (:mod:`recforge.training.losses`); ``n_negatives`` (None: 1 for bce, 256 for the sampled
    losses) and ``gbce_t`` configure the sampled ones. ``threads`` sets PyTorch's intra-op
    threads during fit (None: leave PyTorch's setting).

    The training-only arrays are private (``_``-prefixed) and not saved: a loaded model needs
    only its weights to score.
    """

    name = "sequential"
    needs_times = False

    def __init__(self, max_len: int = 50, loss: str = "ce", n_negatives: int | None = None,
                 gbce_t: float = 0.75, subseq: str = "none", threads: int | None = None, **train):
        super().__init__(**train)
        if loss not in LOSSES:
            raise ConfigError(f"loss={loss!r}: choose one of {', '.join(LOSSES)}")
        if subseq not in SUBSEQ_MODES:
            raise ConfigError(f"subseq={subseq!r}: choose one of {', '.join(SUBSEQ_MODES)}")
        if not 0.0 <= gbce_t <= 1.0:
            raise ConfigError(f"gbce_t={gbce_t}: must be in [0, 1]")
        if max_len < 1:
            raise ConfigError(f"max_len={max_len}: must be >= 1")
        # ``loss`` is also the name of the training-step method, so the value lives in loss_type
        self.max_len, self.loss_type, self.n_negatives, self.gbce_t = max_len, loss, n_negatives, gbce_t
        self.subseq, self.threads = subseq, threads

    def get_params(self) -> dict:
        params = super().get_params()
        params["loss"] = self.loss_type
        return params

    @property
    def negatives_per_target(self) -> int:
        return DEFAULT_NEGATIVES[self.loss_type] if self.n_negatives is None else int(self.n_negatives)

    def protocol_notes(self) -> dict:
        """How the model was trained, for metrics.json next to the numbers."""
        notes = {"subsequence_split": self.subseq, "loss": self.loss_type, "max_len": self.max_len}
        if self.loss_type != "ce":
            notes["n_negatives"] = self.negatives_per_target
            notes["negatives"] = {"bce": "uniform, per position, not in the user's training history",
                                  "sampled_softmax": "popularity proposal, shared by the batch, log-Q corrected",
                                  "gbce": "uniform, shared by the batch"}[self.loss_type]
        if self.loss_type == "gbce":
            notes["gbce_t"] = self.gbce_t
        return notes

    # ---- fit ------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        indptr, items = split.train_sequences
        user, start, end = sample_bounds(indptr, self.max_len, self.subseq)
        if len(user) == 0:
            raise ConfigError(f"{self.name}: no training sequence has two or more items")
        self._sample_user = user
        self._samples = pad_windows(items, start, end, self.max_len + 1)
        self._times = pad_windows(train_times(split), start, end, self.max_len + 1) if self.needs_times else None
        k = self.negatives_per_target
        if self.loss_type == "bce":
            self._seen = SeenPairs(split.train_matrix)
        if self.loss_type == "sampled_softmax":
            self._cdf, self._log_q = log_proposal(split.item_popularity)
            self._cdf = self._cdf.numpy()
        if self.loss_type in ("sampled_softmax", "gbce") and k < 1:
            raise ConfigError(f"loss={self.loss_type} needs n_negatives >= 1")

    def n_train_batches(self, split) -> int:
        return math.ceil(len(self._samples) / self.batch_size)

    def train_batches(self, split, rng):
        for rows, r in self.epoch_batches(rng.permutation(len(self._samples)), rng):
            yield self.make_batch(rows, r)

    def make_batch(self, rows: np.ndarray, rng: np.random.Generator) -> dict:
        """Inputs and targets of the sample ``rows`` (left-padded, 0 = no target), plus the
        negatives of the sampled losses."""
        seq = self._samples[rows]
        inp, tgt = seq[:, :-1], seq[:, 1:].copy()
        tgt[inp == 0] = 0
        if self.subseq == "prefix":
            tgt[:, :-1] = 0
        batch = {"rows": rows, "inp": torch.from_numpy(inp), "tgt": torch.from_numpy(tgt)}
        batch["neg"] = self.draw_negatives(rows, tgt, rng)
        return batch

    def draw_negatives(self, rows: np.ndarray, tgt: np.ndarray, rng: np.random.Generator) -> torch.Tensor | None:
        k = self.negatives_per_target
        if self.loss_type == "bce":
            users = np.repeat(self._sample_user[rows], (tgt > 0).sum(1))
            return torch.from_numpy(sample_negatives(self._seen, users, k, self.n_items_, rng))
        if self.loss_type == "sampled_softmax":
            neg = np.minimum(np.searchsorted(self._cdf, rng.random(k)), self.n_items_ - 1) + 1
            return torch.from_numpy(neg.astype(np.int64))
        if self.loss_type == "gbce":
            return torch.from_numpy(rng.integers(1, self.n_items_ + 1, size=k))
        return None

    # ---- to implement ---------------------------------------------------------------------
    def encode(self, seqs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def output_table(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def extra_loss(self, batch: dict, hidden: torch.Tensor) -> torch.Tensor | None:
        """A second objective added to the next-item loss (None: none)."""
        return None

    # ---- shared ---------------------------------------------------------------------------
    def next_item_loss(self, hidden: torch.Tensor, tgt: torch.Tensor, neg) -> torch.Tensor:
        sel = tgt > 0
        log_q = getattr(self, "_log_q", None)
        return next_item_loss(self.loss_type, hidden[sel], self.output_table(), tgt[sel], neg, log_q, self.gbce_t)

    def loss(self, batch: dict) -> torch.Tensor:
        hidden = self.encode(batch["inp"])
        total = self.next_item_loss(hidden, batch["tgt"], batch.get("neg"))
        extra = self.extra_loss(batch, hidden)
        return total if extra is None else total + extra

    def on_device(self, device: torch.device) -> None:
        """Move the training-time tensors (the log-proposal of ``sampled_softmax``) to ``device``."""
        super().on_device(device)
        if getattr(self, "_log_q", None) is not None:
            self._log_q = self._log_q.to(device)

    def score_input(self, hist) -> torch.Tensor:
        """The left-padded sequences the encoder reads to score ``hist``, on the model's device."""
        return hist.sequences(self.max_len).to(self.device_)

    def score(self, hist) -> torch.Tensor:
        """Scores (batch, n_items + 1) on the model's device."""
        with torch.no_grad():
            h = self.encode(self.score_input(hist))[:, -1]
            return h @ self.output_table().T
