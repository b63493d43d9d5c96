"""MA-GNN: memory augmented graph neural networks for sequential recommendation.

Ma, Ma, Zhang, Sun, Liu & Coates, "Memory Augmented Graph Neural Networks for Sequential
Recommendation", AAAI 2020.

The score of item ``j`` after position ``t`` of a user's sequence adds four parts:

* **general interest**: the user embedding ``p_u`` (matrix factorisation, ``p_u · q_j``);
* **short-term interest**: the last ``window`` items up to ``t`` form a small graph: each item
  is linked to the ``graph_neighbors`` items after it inside the window (the paper's three),
  both directions, and every row of the adjacency ``A`` is normalised to sum to one. A GNN of
  ``gnn_layers`` layers sharing one weight matrix computes ``h_i = tanh(W1 [Σ_k A_ik h_k; h_i])``
  from the item embeddings ``e_i``; the short-term vector is the mean of the ``h_i`` of the window;
* **long-term interest**: the items before the window (from the start of the ``max_len``
  window read by the model), with sinusoidal position encodings (positions counted from the
  oldest item read) added to their embeddings, are summarised by a
  multi-head ("multi-dimensional") attention conditioned on the user,
  ``S = softmax_items(Wa3 tanh(Wa1 H + Wa2 p_u))`` with ``n_heads`` heads,
  ``z = mean_heads(tanh(S Hᵀ))``, which queries a memory shared by all users (``memory_size``
  key and value vectors): ``p_H = z + Σ_i softmax(z · k_i) v_i``;
* a **gate** ``g = σ(Wg [mean h; p_H; p_u])`` fuses them: ``p_C = g ⊙ mean h + (1 - g) ⊙ p_H``;
* **item co-occurrence**: the bilinear term ``(1/|L|) Σ_{i in window} e_iᵀ Wr q_j``.

So ``score(t, j) = (p_u + p_C + Wrᵀ ē)ᵀ q_j`` with ``ē`` the mean embedding of the window and
``q_j`` an output item embedding separate from the input one: one vector per position, and
scoring the whole catalogue (the bilinear term included) is one matrix product with the output
table. Everything at position ``t`` is computed from items at or before ``t`` (the window ends
at ``t``, the long-term part ends before the window), so scores are causal. The masked
attention over the long-term prefix of every position is computed with prefix sums over the
sequence (the attention logits of an item do not depend on the query position), so a batch
costs O(length) and not O(length²) attention; scoring computes the last position only.

Unknown users (``Histories.users == -1``) get a zero user embedding: their score is the
sequence part alone (short- and long-term interest, gate, co-occurrence), with the gate and
attention computed as for a user whose embedding is zero. An empty history scores with the
user embedding alone (all zeros for an unknown user).

Reference code: the authors released none; Forrest-Stone/MA-GNN (PyTorch, by Yansen Zhang) is
the reimplementation read. Where the paper leaves a choice open the default follows that code:
``n_heads=20`` (its ``--h``), ``memory_size=20`` (``--m``), a GNN of two steps sharing one weight
matrix (``--step 2``, one ``W1``), no bias in the GNN, attention, gate and bilinear maps, Xavier
initialisation of the weight matrices (the embeddings start from N(0, 0.02) as in the other
sequential models; the reimplementation: N(0, 1/d)). The memory is only read; its keys and
values are learned parameters, as in the paper.

Deviations from the paper and the reimplementation:

* training is next-item prediction at every position of each training sequence (the shared
  sequential samples, ``subseq=none`` by default), with full-softmax cross-entropy
  (``loss=ce``), instead of the paper's samples of a window of ``|L|`` items, its earlier items
  and the ``|T|`` items after it, trained with BPR against sampled negatives. ``loss=bpr``
  (with ``n_negatives`` uniform negatives per position, not in the user's training history,
  one by default) gives the paper's pairwise loss on our samples; the other sequential losses
  (``bce``, ``sampled_softmax``, ``gbce``) are available too;
* the graph: the paper counts the pairs (each item with its next three) over all users'
  sequences into one weighted, row-normalised item graph and aggregates each window item's
  neighbours from it; here, as in the reimplementation's fixed window adjacency, the graph is
  the window's own: binary edges between window positions at most ``graph_neighbors`` apart,
  row-normalised, so a window holding the same item twice has two nodes for it;
* the paper's separate short-term vector ``p_S = tanh(W2 [mean h; p_u])`` (its Eq. 2) is not
  formed: its gate and fusion equations, and the reimplementation, use ``mean h`` and add the
  user through the gate and the general-interest term, which is what is done here;
* the long-term items are the earlier items inside the ``max_len`` window, not the user's whole
  history; the attention's softmax runs over items (the paper's multi-dimensional attention;
  the reimplementation normalises over heads); a position with no item before its window has
  ``z = 0``, so its long-term vector is the memory's mean value vector;
* ``dropout`` on the input item embeddings (0 by default, as the paper) and no item bias
  (the reimplementation adds one); ``co_occurrence=false`` removes the bilinear term (the
  paper's ablation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.sequential.base import SequentialRecommender
from recforge.models.sequential.modules import Dropout, Layout
from recforge.training.losses import LOSSES
from recforge.training.samplers import SeenPairs, sample_negatives


def window_adjacency(windows: torch.Tensor, neighbors: int) -> torch.Tensor:
    """Row-normalised adjacency (N, W, W) of windows of item ids (N, W), 0 = padding: positions
    ``a`` and ``b`` of a window are linked when both hold an item and ``0 < |a - b| <= neighbors``
    (each item with the ``neighbors`` items after it, both directions). Rows without a
    neighbour are zero."""
    w = windows.shape[1]
    pos = torch.arange(w, device=windows.device)
    dist = (pos.unsqueeze(0) - pos.unsqueeze(1)).abs()
    band = (dist > 0) & (dist <= neighbors)
    valid = windows > 0
    adj = (band.unsqueeze(0) & valid.unsqueeze(1) & valid.unsqueeze(2)).float()
    return adj / adj.sum(-1, keepdim=True).clamp(min=1.0)


def sinusoid_table(n: int, d: int) -> torch.Tensor:
    """Sinusoidal position encodings (n, d) of positions 0..n-1 (Vaswani et al. 2017)."""
    pos = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    rate = torch.pow(10000.0, -(torch.arange(d) // 2 * 2).double() / d)
    angle = pos * rate
    table = torch.where(torch.arange(d) % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()


class MAGNNNet(nn.Module):
    def __init__(self, n_users: int, n_items: int, max_len: int, hidden: int, window: int, graph_neighbors: int,
                 gnn_layers: int, n_heads: int, memory_size: int, dropout: float, co_occurrence: bool):
        super().__init__()
        d = hidden
        self.window, self.neighbors, self.gnn_layers = window, graph_neighbors, gnn_layers
        self.co_occurrence = co_occurrence
        self.item = nn.Embedding(n_items + 1, d, padding_idx=0)  # e: input item embeddings
        self.out = nn.Embedding(n_items + 1, d, padding_idx=0)  # q: output item embeddings
        self.user = nn.Embedding(max(n_users, 1), d)  # p_u
        self.drop = Dropout(dropout)
        self.gnn = nn.Linear(2 * d, d, bias=False)  # W1, shared by the GNN steps
        self.att_item = nn.Linear(d, d, bias=False)  # Wa1
        self.att_user = nn.Linear(d, d, bias=False)  # Wa2
        self.att_heads = nn.Linear(d, n_heads, bias=False)  # Wa3
        self.mem_key = nn.Parameter(torch.empty(memory_size, d))
        self.mem_value = nn.Parameter(torch.empty(memory_size, d))
        self.gate = nn.Linear(3 * d, d, bias=False)  # [Wg1 Wg2 Wg3]
        self.co = nn.Linear(d, d, bias=False)  # Wr (applied to the window's mean embedding)
        self.register_buffer("pe", sinusoid_table(max_len, d), persistent=False)
        for emb in (self.item, self.out, self.user):
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.item.weight[0].zero_()
            self.out.weight[0].zero_()
        for w in (self.gnn.weight, self.att_item.weight, self.att_user.weight, self.att_heads.weight, self.mem_key,
                  self.mem_value, self.gate.weight, self.co.weight):
            nn.init.xavier_uniform_(w)

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        """p_u of each row (B, d); zeros for unknown users (-1)."""
        known = users >= 0
        return self.user(users.clamp(min=0)) * known.unsqueeze(1).to(self.user.weight.dtype)

    def parts(self, seqs: torch.Tensor, users: torch.Tensor, last_only: bool = False) -> dict:
        """Every intermediate of the valid positions of left-padded ``seqs`` (B, L), packed in
        token order (row by row, oldest first), or of the last position of each non-empty row
        (``last_only``): ``short`` (mean h), ``long`` (p_H), ``gate``, ``fused`` (p_C), ``user``
        (p_u), ``co`` (Wrᵀ ē, zeros when switched off), ``hidden``; ``layout`` and ``rows``."""
        if seqs.shape[1] > self.pe.shape[0]:
            seqs = seqs[:, -self.pe.shape[0]:]
        layout = Layout(seqs, right=True)
        rows, slot = layout.rows, layout.slot
        if last_only:
            rows = torch.nonzero(layout.lengths > 0).squeeze(1)
            slot = layout.lengths[rows] - 1
        pu = self.user_vectors(users)
        grid = layout.to_grid(seqs[layout.rows, layout.cols])  # (B, lmax) items from the oldest, 0 after the end
        emb = self.drop(self.item(grid))  # (B, lmax, d)

        # short term: the window of `window` items ending at each position, as a graph
        w = self.window
        idx = slot.unsqueeze(1) + torch.arange(w, device=seqs.device)  # columns in the left-padded grid
        win = F.pad(grid, (w - 1, 0))[rows.unsqueeze(1), idx]  # (T, w) item ids, 0 = before the start
        e = F.pad(emb, (0, 0, w - 1, 0))[rows.unsqueeze(1), idx]  # (T, w, d)
        valid = (win > 0).unsqueeze(-1).to(e.dtype)
        adj = window_adjacency(win, self.neighbors).to(e.dtype)
        h = e
        for _ in range(self.gnn_layers):
            h = torch.tanh(self.gnn(torch.cat([adj @ h, h], -1))) * valid
        count = valid.sum(1).clamp(min=1.0)
        short = h.sum(1) / count
        mean_e = (e * valid).sum(1) / count

        # long term: multi-head attention over the items before the window. Item j's logits do
        # not depend on the query position, so each position's softmax over its prefix is a ratio
        # of prefix sums. Logits are shifted by their bound |Wa3 tanh(.)| <= ||Wa3_h||_1 (a
        # constant, so no position's result depends on later items) and summed in float64 when
        # that bound is large enough for float32 to underflow.
        keys = emb + self.pe[: grid.shape[1]]
        logits = self.att_heads(torch.tanh(self.att_item(keys) + self.att_user(pu).unsqueeze(1)))  # (B, lmax, h)
        bound = self.att_heads.weight.detach().abs().sum(1)  # (h,)
        acc = torch.float32
        if 2.0 * float(bound.max()) > 80.0 and seqs.device.type != "mps":
            acc = torch.float64
        weight = torch.exp(logits.to(acc) - bound.to(acc)) * (grid > 0).unsqueeze(-1).to(acc)  # (B, lmax, h)
        end = slot - w  # last long-term slot of each position (< 0: none)
        if last_only:
            upto = (torch.arange(grid.shape[1], device=seqs.device).unsqueeze(0) <= end.unsqueeze(1)).to(acc)
            wl = weight[rows] * upto.unsqueeze(-1)
            num = torch.einsum("tjh,tjd->thd", wl, keys[rows].to(acc))
            den = wl.sum(1)
        else:
            at = end.clamp(min=0)
            num = torch.cumsum(weight.unsqueeze(-1) * keys.to(acc).unsqueeze(2), 1)[rows, at]  # (T, h, d)
            den = torch.cumsum(weight, 1)[rows, at]
        ratio = num / den.clamp(min=torch.finfo(acc).tiny).unsqueeze(-1)
        ratio = torch.where((end >= 0).view(-1, 1, 1), ratio, torch.zeros((), dtype=acc, device=ratio.device))
        z = torch.tanh(ratio.to(emb.dtype)).mean(1)  # (T, d)
        read = torch.softmax(z @ self.mem_key.T, -1) @ self.mem_value
        long = z + read

        user = pu[rows]
        gate = torch.sigmoid(self.gate(torch.cat([short, long, user], -1)))
        fused = gate * short + (1.0 - gate) * long
        co = self.co(mean_e) if self.co_occurrence else torch.zeros_like(mean_e)
        hidden = user + fused + co
        return {"layout": layout, "rows": rows, "short": short, "long": long, "gate": gate, "fused": fused,
                "user": user, "co": co, "hidden": hidden}

    def forward(self, seqs: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """Hidden vectors (B, L, d) of left-padded ``seqs``, zeros at padding."""
        if not bool((seqs > 0).any()):
            return torch.zeros(seqs.shape + (self.item.embedding_dim,), device=seqs.device)
        p = self.parts(seqs, users)
        return p["layout"].to_padded(p["hidden"])

    def last(self, seqs: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """The hidden vector (B, d) after the last item of each row; the user vector alone
        (zeros for an unknown user) for an empty row."""
        out = self.user_vectors(users)
        if bool((seqs > 0).any()):
            p = self.parts(seqs, users, last_only=True)
            out = out.index_copy(0, p["rows"], p["hidden"])
        return out


class MAGNN(SequentialRecommender):
    name = "magnn"

    def __init__(self, hidden: int = 64, window: int = 5, graph_neighbors: int = 3, gnn_layers: int = 2,
                 n_heads: int = 20, memory_size: int = 20, dropout: float = 0.0, co_occurrence: bool = True,
                 loss: str = "ce", **base):
        if loss not in LOSSES + ("bpr",):
            raise ConfigError(f"loss={loss!r}: choose one of {', '.join(LOSSES + ('bpr',))}")
        bpr = loss == "bpr"
        super().__init__(loss="bce" if bpr else loss, **base)
        if bpr:
            self.loss_type = "bpr"
        checks = (("hidden", hidden, 1, 64), ("window", window, 1, 5), ("graph_neighbors", graph_neighbors, 1, 3),
                  ("gnn_layers", gnn_layers, 0, 2), ("n_heads", n_heads, 1, 20), ("memory_size", memory_size, 1, 20))
        for key, value, low, usual in checks:
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"{key}={value!r}: must be an integer >= {low}, e.g. {key}={usual}")
        if window > self.max_len:
            raise ConfigError(f"window={window} is longer than max_len={self.max_len}: "
                              "lower window or raise max_len")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout}: must be in [0, 1); e.g. dropout=0 (none) or 0.2")
        self.hidden, self.window, self.graph_neighbors, self.gnn_layers = hidden, window, graph_neighbors, gnn_layers
        self.n_heads, self.memory_size, self.dropout, self.co_occurrence = n_heads, memory_size, dropout, co_occurrence

    # ---- the pairwise loss of the paper ---------------------------------------------------------
    @property
    def negatives_per_target(self) -> int:
        if self.loss_type == "bpr":
            return 1 if self.n_negatives is None else int(self.n_negatives)
        return super().negatives_per_target

    def protocol_notes(self) -> dict:
        if self.loss_type != "bpr":
            return super().protocol_notes()
        return {"subsequence_split": self.subseq, "loss": "bpr", "max_len": self.max_len,
                "n_negatives": self.negatives_per_target,
                "negatives": "uniform, per position, not in the user's training history"}

    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        if self.loss_type == "bpr":
            if self.negatives_per_target < 1:
                raise ConfigError(f"loss=bpr needs n_negatives >= 1 (got {self.n_negatives}); "
                                  "set n_negatives=1 or leave it null")
            self._seen = SeenPairs(split.train_matrix)

    def draw_negatives(self, rows, tgt, rng):
        if self.loss_type != "bpr":
            return super().draw_negatives(rows, tgt, rng)
        users = np.repeat(self._sample_user[rows], (tgt > 0).sum(1))
        neg = sample_negatives(self._seen, users, self.negatives_per_target, self.n_items_, rng)
        return torch.from_numpy(neg)

    def next_item_loss(self, hidden, tgt, neg):
        if self.loss_type != "bpr":
            return super().next_item_loss(hidden, tgt, neg)
        h = hidden[tgt > 0]
        table = self.output_table()
        pos = (h * table[tgt[tgt > 0]]).sum(-1, keepdim=True)
        negs = torch.einsum("pd,pkd->pk", h, table[neg.view(len(h), -1)])
        return -F.logsigmoid(pos - negs).mean()

    # ---- model ----------------------------------------------------------------------------------
    def build(self, n_users, n_items):
        return MAGNNNet(n_users, n_items, self.max_len, self.hidden, self.window, self.graph_neighbors,
                        self.gnn_layers, self.n_heads, self.memory_size, self.dropout, self.co_occurrence)

    def make_batch(self, rows, rng):
        batch = super().make_batch(rows, rng)
        batch["users"] = torch.from_numpy(self._sample_user[rows].astype(np.int64))
        return batch

    def loss(self, batch: dict) -> torch.Tensor:
        hidden = self.net_(batch["inp"], batch["users"])
        return self.next_item_loss(hidden, batch["tgt"], batch.get("neg"))

    def encode(self, seqs: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden vectors (B, L, d); ``users`` None: every row an unknown user."""
        if users is None:
            users = torch.full((seqs.shape[0],), -1, dtype=torch.long, device=seqs.device)
        return self.net_(seqs, users)

    def output_table(self) -> torch.Tensor:
        return self.net_.out.weight

    def score_users(self, hist) -> torch.Tensor:
        """User indices of ``hist`` on the model's device; indices outside the trained range
        (unknown users) become -1."""
        users = np.asarray(hist.users, dtype=np.int64)
        users = np.where((users >= 0) & (users < self.n_users_), users, -1)
        return torch.from_numpy(users).to(self.device_)

    def score(self, hist) -> torch.Tensor:
        """Scores (batch, n_items + 1) on the model's device: one vector per user times the
        output item table (general interest, fused interests and co-occurrence together)."""
        with torch.no_grad():
            return self.net_.last(self.score_input(hist), self.score_users(hist)) @ self.output_table().T
