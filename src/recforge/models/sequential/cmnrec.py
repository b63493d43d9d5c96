"""CmnRec: a memory-network recommender whose memory is read and written only at chunk boundaries.

Qu, Yuan, Guo, Zhang & Wei, "CmnRec: Sequential Recommendations with Chunk-accelerated Memory
Network", IEEE Transactions on Knowledge and Data Engineering (TKDE), 2022 (arXiv:2004.13401).
Reference code: the authors' TensorFlow implementation (SLQu/CmnRec, ``rnn.py``, ``memory_uw.py``).

**Architecture as implemented.** An LSTM controller reads, at every position ``t``, the item
embedding concatenated with the ``read_heads`` vectors last read from an external memory of
``n_slots`` slots of ``word_size`` numbers. The output at ``t`` is ``A h_t + B r_t`` (controller
output and the flattened read vectors; the authors' ``nn_output_weights`` and
``mem_output_weights``), scored against the item embeddings. The memory is accessed only at the
*chunk boundaries*: the controller outputs since the last boundary wait in a chunk area; at a
boundary an additive attention over them (``w . tanh(W c_j + U r_prev)``, queried by the previous
read vectors, the paper's Eqs. 7-10) gives a vector that replaces the controller's hidden state
(its cell state is kept, as in the authors' code), the memory is written from the controller
output (content-addressed erase and add with a write gate), read back by content with each head,
and the chunk area is emptied. Between boundaries the read vectors are carried unchanged.

``chunk`` selects the boundaries (distances counted back from the most recent item of the
window: ``d = 0`` is the last item, so the memory is always fresh where the next item is
predicted, as in the paper's Eqs. 13 and 16):

* ``none``: every item is a boundary: the plain memory network (the paper's SRMN baseline, the
  reference of the speed-up); with a chunk of one item the attention returns the controller
  state itself, so nothing is replaced;
* ``pec`` (periodic chunk): ``d = 0, G, 2G, ...``, every ``G`` items;
* ``tsc`` (time-sensitive chunk): ``d = 0, g, 3g, 6g, 10g, ...``: chunks of ``g, 2g, 3g, ...``
  items going back in time, so recent items are written in small chunks and old ones in large
  ones. *Time-sensitive* in the paper means recency-sensitive: the rule uses positions only
  (Section 4.4.2: the writing interval shrinks towards the most recent interaction) and needs no
  timestamps;
* ``gap`` (ours, not in the paper): a chunk closes when the next item arrives more than
  ``gap_threshold`` after the previous one (a session break). The gap to an item is known only
  when it arrives, so the write happens at that item, before the controller reads it, from the
  chunk's cached states and the previous output; the output at an item never sees a later
  timestamp. The threshold defaults to the ``gap_quantile`` quantile of the training gaps
  (``gap_threshold_``), so it follows each data set's time unit; gaps above it close chunks.
  Timestamps come from the training data and, at ranking time, from ``Histories.times`` (the
  server fills them from the artifact's history and the events' timestamps). Without
  times at ranking (a raw history given without them), ``gap`` falls back to the periodic
  boundaries of ``pec`` (every ``G`` items back from the last) and warns once.

``chunk_size`` is ``G`` (``pec``, ``gap``'s fall-back) or ``g`` (``tsc``); None gives the paper's
values for a window of ``T = max_len`` items and ``m = n_slots`` chunks: ``G = floor(T / m)``
(Eq. 13) and ``g = floor(2T / (m (m + 1)))`` (Eq. 16), at least 1.

**Memory operations.** A boundary at a position of a row costs one write and one read:
:meth:`CmnRec.memory_ops` counts them for a batch, ``memory_ops_`` holds the count of one training
epoch and ``memory_ops_per_row_`` the mean per training sample, so a benchmark can set ``pec`` and
``tsc`` against ``none``. A position where no row of the batch has a boundary skips the memory
entirely, which is where the wall-time speed-up comes from.

**Deviations and open choices.**

* Memory: the paper uses the DNC memory (Graves et al. 2016: content addressing plus usage-based
  allocation, a temporal link matrix and three read modes, as in the authors' ``memory_uw.py``).
  Here the memory is the NTM-style core that RUM and most memory-network recommenders use:
  content addressing (cosine similarity times a learned strength, softmax over slots) for the
  write and for each read head, erase-and-add writes with a write gate; no allocation, usage or
  temporal links. The slots start from a learned initial memory (the authors: a constant 1e-6,
  whose symmetry DNC's allocation breaks) so that content addressing can tell them apart.
* Boundaries: the paper defines exactly ``m`` chunks over a padded window; here the rule runs
  over the whole window, so when ``T`` is not a multiple of the chunk lengths the oldest leftover
  items form one extra chunk (for ``T = 20, m = 4`` both give the paper's Figure 6: boundaries at
  5, 10, 15, 20 and 8, 14, 18, 20). ``chunk_size`` may also be set directly.
  The paper's third variant, EXC (the last ``m`` items each a chunk), is left out: the paper finds
  it worse than both baselines.
* Training: the selectable next-item loss of the family (default full-softmax cross-entropy over
  every position, as the authors' ``cost_type=all`` with ``cost_fun=cross``; their default is a
  sampled softmax), output scored against the shared item embeddings (the authors: a separate
  output layer), input embeddings scaled by ``sqrt(hidden)`` as in GRU4Rec here.
* Sizes: ``hidden = word_size = 64`` (the paper: 256; the authors' code: embeddings 512, words
  512), ``read_heads = 3`` and ``attn_dim = 32`` as in the authors' code, ``n_slots = 4`` (the
  paper's Figure 6; its experiments use 2-12). Dropout 0.2 on the embeddings and on the output
  (the authors: keep probability 0.5 on the LSTM output and on the memory interface).
* Order at a boundary: the paper's Algorithm 1 feeds the attended vector into the controller at
  the boundary step itself; the authors' code, followed here, first computes the boundary's
  controller output (which writes the memory and, with the new read vectors, gives the output
  there) and hands the attended vector on as the hidden state of the next step.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.sequential.base import SequentialRecommender, pad_windows
from recforge.models.sequential.modules import Dropout, init_weights

CHUNKS = ("none", "pec", "tsc", "gap")


def boundary_distances(chunk: str, size: int, length: int) -> np.ndarray:
    """Distances back from the last position (0 = the last item) of the boundaries of ``pec``
    (``0, G, 2G, ...``) or ``tsc`` (``0, g, 3g, 6g, ...``) within a window of ``length``."""
    if chunk == "pec":
        return np.arange(0, length, size)
    if chunk == "tsc":
        n = int(np.sqrt(2 * length / size)) + 2
        d = size * (np.arange(n) * (np.arange(n) + 1) // 2)
        return d[d < length]
    raise ValueError(chunk)


class CmnRecNet(nn.Module):
    def __init__(self, n_tokens: int, hidden: int, n_slots: int, word_size: int, read_heads: int, attn_dim: int,
                 dropout: float):
        super().__init__()
        self.hidden, self.n_slots, self.word_size, self.read_heads = hidden, n_slots, word_size, read_heads
        rw = read_heads * word_size
        self.item = nn.Embedding(n_tokens, hidden, padding_idx=0)
        self.emb_drop, self.out_drop = Dropout(dropout), Dropout(dropout)
        self.controller = nn.LSTMCell(hidden + rw, hidden)
        # interface: read keys and strengths, write key and strength, erase, write vector, write gate
        self.interface = nn.Linear(hidden, rw + read_heads + 3 * word_size + 2)
        self.memory0 = nn.Parameter(torch.empty(n_slots, word_size))
        self.att_h = nn.Linear(hidden, attn_dim, bias=False)
        self.att_r = nn.Linear(rw, attn_dim, bias=False)
        self.att_w = nn.Linear(attn_dim, 1, bias=False)
        self.out_h = nn.Linear(hidden, hidden)
        self.out_r = nn.Linear(rw, hidden, bias=False)
        self.scale = hidden**0.5

    @staticmethod
    def address(memory: torch.Tensor, keys: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        """Content weights (rows, heads, slots): softmax over slots of strength x cosine."""
        sim = torch.einsum("bhw,bsw->bhs", F.normalize(keys, dim=-1), F.normalize(memory, dim=-1))
        return torch.softmax(sim * strength.unsqueeze(-1), dim=-1)

    def access(self, memory: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the controller output ``out`` (rows, hidden) into ``memory`` (rows, slots, word),
        then read it with every head: (new memory, flat read vectors (rows, heads * word))."""
        w, r = self.word_size, self.read_heads
        v = self.interface(out)
        read_keys, v = v[:, : r * w].view(-1, r, w), v[:, r * w :]
        read_strength, v = 1 + F.softplus(v[:, :r]), v[:, r:]
        write_key, write_strength = v[:, :w], 1 + F.softplus(v[:, w : w + 1])
        erase, add = torch.sigmoid(v[:, w + 1 : 2 * w + 1]), v[:, 2 * w + 1 : 3 * w + 1]
        gate = torch.sigmoid(v[:, 3 * w + 1 :])  # (rows, 1)
        ww = self.address(memory, write_key.unsqueeze(1), write_strength)[:, 0] * gate  # (rows, slots)
        memory = memory * (1 - ww.unsqueeze(-1) * erase.unsqueeze(1)) + ww.unsqueeze(-1) * add.unsqueeze(1)
        wr = self.address(memory, read_keys, read_strength)  # (rows, heads, slots)
        return memory, torch.einsum("bhs,bsw->bhw", wr, memory).reshape(len(out), r * w)

    def forward(self, seqs: torch.Tensor, after: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs (B, L, hidden) of left-padded ``seqs``; ``after[b, t]``: memory access once the
        controller has read item ``t``; ``before[b, t]`` (``gap``): access before it reads item
        ``t``, closing the chunk that ended at ``t - 1``. Padded positions output zeros."""
        b, length = seqs.shape
        valid = seqs > 0
        dev = seqs.device
        x = self.emb_drop(self.item(seqs) * self.scale)
        h = x.new_zeros(b, self.hidden)
        c = x.new_zeros(b, self.hidden)
        read = x.new_zeros(b, self.read_heads * self.word_size)
        memory = self.memory0.unsqueeze(0).expand(b, -1, -1)
        start = torch.where(valid.any(1), valid.float().argmax(1), torch.full((b,), length, device=dev))
        outs: list[torch.Tensor] = []  # controller outputs, the chunk area's contents
        reads: list[torch.Tensor] = []
        pos = torch.arange(length, device=dev)

        def chunk_access(rows, last, state_h, mem, rd):
            """Memory access of ``rows`` at the close of their chunk ending at position ``last``."""
            lo = int(start[rows].min())
            out = outs[last][rows]
            if lo < last:  # attention over the chunk's cached outputs replaces the hidden state
                cache = torch.stack(outs[lo : last + 1], 1)[rows]  # (n, l, hidden)
                z = torch.tanh(self.att_h(cache) + self.att_r(rd[rows]).unsqueeze(1))
                z = self.att_w(z).squeeze(-1)
                z = z.masked_fill(pos[lo : last + 1].unsqueeze(0) < start[rows].unsqueeze(1), float("-inf"))
                state_h = state_h.index_copy(0, rows, torch.einsum("nl,nlh->nh", torch.softmax(z, 1), cache))
            new_mem, new_read = self.access(mem[rows], out)
            start[rows] = last + 1
            return state_h, mem.index_copy(0, rows, new_mem), rd.index_copy(0, rows, new_read)

        for t in range(length):
            if before is not None and t > 0:
                rows = (before[:, t] & valid[:, t] & valid[:, t - 1]).nonzero().squeeze(1)
                if len(rows):
                    h, memory, read = chunk_access(rows, t - 1, h, memory, read)
            v = valid[:, t].unsqueeze(1)
            h_new, c_new = self.controller(torch.cat([x[:, t], read], 1), (h, c))
            h, c = torch.where(v, h_new, h), torch.where(v, c_new, c)
            outs.append(h)
            rows = (after[:, t] & valid[:, t]).nonzero().squeeze(1)
            if len(rows):
                h, memory, read = chunk_access(rows, t, h, memory, read)
            reads.append(read)
        out = self.out_h(torch.stack(outs, 1)) + self.out_r(torch.stack(reads, 1))
        return self.out_drop(torch.where(valid.unsqueeze(-1), out, 0.0))


class CmnRec(SequentialRecommender):
    name = "cmnrec"

    def __init__(self, hidden: int = 64, chunk: str = "pec", chunk_size: int | None = None, n_slots: int = 4,
                 word_size: int = 64, read_heads: int = 3, attn_dim: int = 32, dropout: float = 0.2,
                 gap_quantile: float = 0.8, gap_threshold: float | None = None, **base):
        super().__init__(**base)
        if chunk not in CHUNKS:
            raise ConfigError(f"chunk={chunk!r}: choose one of {', '.join(CHUNKS)}")
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
            raise ConfigError(f"chunk_size={chunk_size}: must be an integer >= 1, or null for the paper's value")
        for name, value in (("hidden", hidden), ("n_slots", n_slots), ("word_size", word_size),
                            ("read_heads", read_heads), ("attn_dim", attn_dim)):
            if int(value) != value or value < 1:
                raise ConfigError(f"{name}={value}: must be an integer >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout}: must be in [0, 1)")
        if not 0.0 < gap_quantile < 1.0:
            raise ConfigError(f"gap_quantile={gap_quantile}: must be in (0, 1), e.g. 0.8")
        if gap_threshold is not None and gap_threshold < 0:
            raise ConfigError(f"gap_threshold={gap_threshold}: must be >= 0 (seconds), or null for gap_quantile")
        self.hidden, self.chunk, self.chunk_size, self.n_slots = hidden, chunk, chunk_size, n_slots
        self.word_size, self.read_heads, self.attn_dim, self.dropout = word_size, read_heads, attn_dim, dropout
        self.gap_quantile, self.gap_threshold = gap_quantile, gap_threshold
        self._warned = False

    @property
    def needs_times(self) -> bool:
        return self.chunk == "gap"

    @property
    def period(self) -> int:
        """``G`` of ``pec`` (and of ``gap``'s fall-back) or ``g`` of ``tsc``."""
        if self.chunk_size is not None:
            return int(self.chunk_size)
        t, m = self.max_len, self.n_slots
        return max(1, 2 * t // (m * (m + 1))) if self.chunk == "tsc" else max(1, t // m)

    def protocol_notes(self) -> dict:
        notes = super().protocol_notes() | {"chunk": self.chunk, "n_slots": self.n_slots}
        if self.chunk in ("pec", "tsc"):
            notes["chunk_size"] = self.period
        if self.chunk == "gap":
            notes["gap_threshold"] = getattr(self, "gap_threshold_", self.gap_threshold)
        if hasattr(self, "memory_ops_"):
            notes["memory_ops_per_epoch"] = self.memory_ops_
        return notes

    # ---- boundaries -----------------------------------------------------------------------------
    def boundaries(self, seqs: torch.Tensor, times: torch.Tensor | None = None):
        """``(after, before)`` boolean masks (B, L) of left-padded ``seqs`` (``before`` only for
        ``gap``; ``times`` aligned with ``seqs``, None: ``gap`` falls back to ``pec``)."""
        b, length = seqs.shape
        after = torch.zeros(b, length, dtype=torch.bool, device=seqs.device)
        if self.chunk == "none":
            return after | (seqs > 0), None
        if self.chunk == "gap":
            if times is not None:
                gaps = torch.zeros(b, length, dtype=torch.float64, device=seqs.device)
                gaps[:, 1:] = (times[:, 1:] - times[:, :-1]).double()
                before = (gaps > self.gap_threshold_) & (seqs > 0)
                before[:, 1:] &= seqs[:, :-1] > 0
                return after, before
            if not self._warned:
                warnings.warn("cmnrec chunk=gap: the histories carry no timestamps; using periodic boundaries "
                              f"every {self.period} items instead (pec)", stacklevel=3)
                self._warned = True
        d = boundary_distances("pec" if self.chunk == "gap" else self.chunk, self.period, length)
        after[:, length - 1 - torch.as_tensor(d, device=seqs.device)] = True
        return after & (seqs > 0), None

    def memory_ops(self, seqs: torch.Tensor, times: torch.Tensor | None = None) -> int:
        """Memory operations (one write and one read per boundary) of encoding ``seqs``."""
        after, before = self.boundaries(seqs, times)
        n = int(after.sum())
        if before is not None:
            n += int(before.sum())
        return 2 * n

    # ---- fit --------------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        if self.chunk == "gap":
            if self.gap_threshold is not None:
                self.gap_threshold_ = float(self.gap_threshold)
            else:
                from recforge.models.sequential.base import train_times

                indptr, _ = split.train_sequences
                t = train_times(split)
                same = np.ones(len(t), dtype=bool)
                same[indptr[:-1][indptr[:-1] < len(t)]] = False
                gaps = np.diff(t)[same[1:]]
                self.gap_threshold_ = float(np.quantile(gaps, self.gap_quantile)) if len(gaps) else 0.0
        inp = torch.from_numpy(self._samples[:, :-1])
        times = torch.from_numpy(self._times[:, :-1]) if self._times is not None else None
        self.memory_ops_ = self.memory_ops(inp, times)
        self.memory_ops_per_row_ = self.memory_ops_ / max(1, len(inp))

    def build(self, n_users, n_items):
        net = CmnRecNet(n_items + 1, self.hidden, self.n_slots, self.word_size, self.read_heads, self.attn_dim,
                        self.dropout)
        init_weights(net)  # the LSTM keeps PyTorch's own initialisation
        nn.init.normal_(net.memory0, std=0.5)
        return net

    def make_batch(self, rows: np.ndarray, rng: np.random.Generator) -> dict:
        batch = super().make_batch(rows, rng)
        if self._times is not None:
            batch["times"] = torch.from_numpy(self._times[rows][:, :-1])
        return batch

    def encode(self, seqs: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        after, before = self.boundaries(seqs, times)
        return self.net_(seqs, after, before)

    def output_table(self) -> torch.Tensor:
        return self.net_.item.weight

    def loss(self, batch: dict) -> torch.Tensor:
        times = batch.get("times")
        hidden = self.encode(batch["inp"], None if times is None else times.to(batch["inp"].device))
        return self.next_item_loss(hidden, batch["tgt"], batch.get("neg"))

    # ---- scoring ----------------------------------------------------------------------------------
    def score_times(self, hist) -> torch.Tensor | None:
        """Left-padded timestamps aligned with ``score_input`` (None without times or not needed)."""
        if not self.needs_times or getattr(hist, "times", None) is None:
            return None
        ends = hist.indptr[1:]
        starts = np.maximum(hist.indptr[:-1], ends - self.max_len)
        t = pad_windows(np.asarray(hist.times, dtype=np.int64), starts, ends, self.max_len)
        return torch.from_numpy(t).to(self.device_)

    def score(self, hist) -> torch.Tensor:
        with torch.no_grad():
            h = self.encode(self.score_input(hist), self.score_times(hist))[:, -1]
            return h @ self.output_table().T
