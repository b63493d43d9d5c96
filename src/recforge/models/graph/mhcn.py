"""MHCN: self-supervised multi-channel hypergraph convolution for social recommendation.

Yu, Yin, Li, Wang, Hung & Zhang, "Self-Supervised Multi-Channel Hypergraph Convolutional
Network for Social Recommendation", WWW 2021. Needs user-user links: ``data.social=PATH|auto``
(:mod:`recforge.data.social`).

**Motif-induced hypergraphs.** From the social matrix ``S`` (``S[a, b] = 1``: ``a`` links to
``b``) and the binary training matrix ``Y`` (users × items), with ``B = S ∘ Sᵀ`` (mutual links)
and ``U = S − B`` (one-way links), the motif-induced adjacency matrices count, for every pair of
users, the motif instances (hyperedges) that hold both (:func:`motif_matrices`; sparse products,
``∘`` elementwise):

* social motifs, the seven connected triangles of a directed graph: ``M1`` the one-way 3-cycle,
  ``M2`` a cycle through one mutual link, ``M3`` two mutual links and one one-way link, ``M4``
  three mutual links, ``M5`` the one-way transitive triangle, ``M6`` a user with one-way links to
  both ends of a mutual link, ``M7`` both ends of a mutual link with one-way links to one user
  (``A1 = C1 + C1ᵀ`` with ``C1 = (UU) ∘ Uᵀ``, ... ``A7`` as in Table 1 of the paper);
* joint motifs: ``M8`` two mutually linked users who interacted with a common item
  (``A8 = (YYᵀ) ∘ B``), ``M9`` the same over a one-way link (``A9 = (YYᵀ) ∘ U`` + its transpose);
* the purchase motif ``M10``: users who share items, whatever their links
  (``A10 = YYᵀ − A8 − A9``), kept where the count exceeds ``purchase_min``.

The three channels are ``A_s = A1 + … + A7`` (social), ``A_j = A8 + A9`` (joint) and
``A_p = A10`` (purchase), each normalised (``norm``, below).

**Convolution.** Self-gating turns the user embeddings ``P⁰`` into one input per channel,
``P_c = P⁰ ⊙ σ(P⁰ W_c + b_c)`` (three channels, plus a fourth gate for the user side of the
user-item graph). Per layer, each channel propagates over its hypergraph, ``P_c ← Â_c P_c``, and the
items over the user-item graph from the *mixed* user embedding
``P_m = Σ_c α_c P_c + ½ P_r`` (channel attention: ``α_c = softmax_c(aᵀ W_a P_c)`` per user),
``Q ← R̂ᵀ P_m``, while the user side of the user-item graph reads the previous item layer,
``P_r ← R̂ Q`` (the simple graph convolution). Layer outputs after the first are L2-normalised
and summed with the input layer, per channel, for ``P_r`` and for the items. The final user
embedding is ``Σ_c α_c P_c + ½ P_r``, the final item embedding the item sum; the score is their
dot product.

**Self-supervision** (hierarchical mutual-information maximisation), per channel ``c``: a
self-supervised gate ``p = f_c(P)`` of the final user embeddings (L2-normalised,
``ssl_normalize``), the user-centred sub-hypergraph readout ``z = Â_c p`` (each user's incident
hyperedges through the row of ``Â_c``) and the graph readout ``h = mean(z)``. Local level
(user ↔ sub-hypergraph), as the authors' code ranks it: ``-log σ(pᵤ·zᵤ − p̃ᵤ·zᵤ) −
log σ(p̃ᵤ·zᵤ − pᵤ·z̃ᵤ)`` with ``p̃`` the rows of ``p`` shuffled and ``z̃`` the rows and columns of
``z`` shuffled; global level (sub-hypergraph ↔ hypergraph): ``-log σ(zᵤ·h − z̃ᵤ·h)``. The
shuffles are drawn per step from the batch generator. The loss is
``BPR + ssl_weight · Σ_c mean_u(local + global) + L2``.

Training is LightGCN's (:mod:`recforge.models.graph.lightgcn`): every training pair once an epoch,
a uniform unseen negative, BPR on the final embeddings, the whole graph propagated every step; L2
``reg · ½ (‖e_u‖² + ‖e_i‖² + ‖e_j‖²) / batch`` on the batch's ego embeddings plus
``reg · ½ Σ ‖W‖² / batch`` on the gating and attention weights.

Choices the paper leaves open, and deviations:

* ``norm=row`` (default) normalises each channel by its row sums, ``D⁻¹A``, as the paper's
  convolution and QRec's ``MHCN.py`` do, and the user-item graph per side (``D_u⁻¹ R`` for users,
  ``D_i⁻¹ Rᵀ`` for items) as the paper writes it; ``norm=sym`` uses ``D^-½ A D^-½`` for the
  channels (SELFRec's ``MHCN.py``) and ``D_u^-½ R D_i^-½`` for the user-item graph (QRec's).
* ``purchase_min=2`` keeps purchase-motif counts above 2, as SELFRec (QRec keeps counts above 1).
  As in both codes, ``A10`` keeps its diagonal (a user's own number of items), so a user with more
  than ``purchase_min`` items keeps part of their own embedding in the purchase channel.
* Layers are summed, not averaged, and propagated layers are L2-normalised, as the authors' code
  (the paper writes the mean of the layers); the final user embedding adds half the user-item
  channel, as the code.
* The self-supervised loss is the authors' code's: the user-hyperedge level of the paper's
  hierarchy is folded into the user ↔ sub-hypergraph level (the hyperedges a user belongs to are
  read out through the motif-induced adjacency, without one embedding per motif instance), with
  the code's three-way ranking (positive > row-shuffled user > corrupted sub-hypergraph) at the
  local level. The code sums the self-supervised terms over all users and BPR over the batch; we
  average both, so ``ssl_weight`` equals the code's ``ss_rate`` times ``n_users / batch_size``
  (0.01 matches the code's 0.01 on LastFM's 1,892 users with batches of 2,048). The code's L2
  normalisation of ``p`` (SELFRec; QRec leaves it out except for Douban) is ``ssl_normalize``.
* ``directed`` links come from the reader: by default links are undirected (``B = S``, ``U = 0``),
  so only ``M4`` (mutual triangles) and ``M8`` (friends sharing an item) are non-empty in the
  social and joint channels; ``data.social=...:directed`` keeps one-way links and all ten motifs.
* L2 as LightGCN (batch ego embeddings) where SELFRec penalises the batch's final embeddings and
  QRec all ego embeddings; Xavier initialisation (``init=xavier``) as both codes.
* Users unknown at training time (a raw history, user ``-1``) have no links; they are folded in as
  the mean of the final embeddings of their history items.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError, DataError
from recforge.models.graph.lightgcn import LightGCN
from recforge.models.graph.propagation import sparse_mm, torch_pair

NORMS = ("row", "sym")
CHANNELS = ("social", "joint", "purchase")


# ---- motif-induced hypergraphs -------------------------------------------------------------------
def _binary(m: sp.spmatrix, shape=None) -> sp.csr_matrix:
    m = sp.csr_matrix(m, shape=shape, dtype=np.float32)
    m.sum_duplicates()
    m.eliminate_zeros()
    m.data[:] = 1.0
    return m


def motif_matrices(social: sp.spmatrix, y: sp.spmatrix) -> dict[str, sp.csr_matrix]:
    """The motif-induced adjacency matrices ``A1 .. A10`` (users × users, float32 CSR) of the
    directed social matrix ``social`` and the user × item matrix ``y``; entry ``(a, b)`` counts the
    instances of the motif that hold both ``a`` and ``b``. Self-links of ``social`` are ignored."""
    s = _binary(social)
    s.setdiag(0)
    s.eliminate_zeros()
    y = _binary(y)
    b = s.multiply(s.T).tocsr()
    u = (s - b).tocsr()
    u.eliminate_zeros()
    ut, bt = u.T.tocsr(), b  # B is symmetric
    c1 = (u @ u).multiply(ut)
    c2 = (b @ u).multiply(ut) + (u @ b).multiply(ut) + (u @ u).multiply(b)
    c3 = (b @ b).multiply(u) + (b @ u).multiply(bt) + (u @ b).multiply(bt)
    c5 = (u @ u).multiply(u) + (u @ ut).multiply(u) + (ut @ u).multiply(u)
    a = {
        "A1": c1 + c1.T,
        "A2": c2 + c2.T,
        "A3": c3 + c3.T,
        "A4": (b @ b).multiply(b),
        "A5": c5 + c5.T,
        "A6": (u @ b).multiply(u) + (b @ ut).multiply(ut) + (ut @ u).multiply(b),
        "A7": (ut @ b).multiply(ut) + (b @ u).multiply(u) + (u @ ut).multiply(b),
    }
    yy = (y @ y.T).tocsr()
    a["A8"] = yy.multiply(b)
    a9 = yy.multiply(u)
    a["A9"] = a9 + a9.T
    a["A10"] = yy - a["A8"] - a["A9"]
    out = {}
    for k, m in a.items():
        m = sp.csr_matrix(m, dtype=np.float32)
        m.eliminate_zeros()
        m.sort_indices()
        out[k] = m
    return out


def channel_matrices(social: sp.spmatrix, y: sp.spmatrix, purchase_min: float = 2) -> dict[str, sp.csr_matrix]:
    """The un-normalised channel adjacencies: ``social`` (A1..A7), ``joint`` (A8 + A9) and
    ``purchase`` (A10 where it exceeds ``purchase_min``)."""
    a = motif_matrices(social, y)
    hs = sum(a[f"A{k}"] for k in range(1, 8))
    hj = a["A8"] + a["A9"]
    hp = a["A10"].multiply(a["A10"] > purchase_min)
    return {name: sp.csr_matrix(m, dtype=np.float32) for name, m in zip(CHANNELS, (hs, hj, hp))}


def _scale_rows(m: sp.csr_matrix, power: float) -> np.ndarray:
    deg = np.asarray(m.sum(1), dtype=np.float64).ravel()
    inv = np.zeros_like(deg)
    nz = deg > 0
    inv[nz] = deg[nz] ** power
    return inv


def normalize_channel(a: sp.spmatrix, norm: str) -> sp.csr_matrix:
    """``D⁻¹A`` (``row``) or ``D^-½ A D^-½`` (``sym``); rows of users without hyperedges stay 0."""
    a = sp.csr_matrix(a, dtype=np.float32)
    if norm == "row":
        out = sp.diags(_scale_rows(a, -1.0)) @ a
    else:
        d = sp.diags(_scale_rows(a, -0.5))
        out = d @ a @ d
    out = sp.csr_matrix(out, dtype=np.float32)
    out.sort_indices()
    return out


def normalize_interactions(r: sp.spmatrix, norm: str) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """The user-item graph for the users' and the items' side: ``(D_u⁻¹ R, D_i⁻¹ Rᵀ)`` (``row``)
    or ``(D_u^-½ R D_i^-½, its transpose)`` (``sym``)."""
    r = _binary(r)
    if norm == "row":
        users = sp.diags(_scale_rows(r, -1.0)) @ r
        rt = r.T.tocsr()
        items = sp.diags(_scale_rows(rt, -1.0)) @ rt
    else:
        users = sp.diags(_scale_rows(r, -0.5)) @ r @ sp.diags(_scale_rows(r.T.tocsr(), -0.5))
        items = users.T
    return sp.csr_matrix(users, dtype=np.float32), sp.csr_matrix(items, dtype=np.float32)


class _Sparse:
    """A sparse matrix and its transpose on a device, for differentiable products."""

    def __init__(self, m: sp.csr_matrix, device):
        self.a, self.at = torch_pair(m, device)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_mm((self.a, self.at), x)

    def to(self, device) -> "_Sparse":
        self.a, self.at = self.a.to(device), self.at.to(device)
        return self


class MHCN(LightGCN):
    name = "mhcn"
    uses_social = True

    def __init__(self, dim: int = 64, n_layers: int = 2, reg: float = 1e-4, ssl_weight: float = 0.01,
                 ssl_normalize: bool = True, norm: str = "row", purchase_min: float = 2, init: str = "xavier",
                 **base):
        super().__init__(dim=dim, n_layers=n_layers, reg=reg, init=init, **base)
        if norm not in NORMS:
            raise ConfigError(f"norm={norm!r}: choose one of {', '.join(NORMS)}")
        if n_layers < 1:
            raise ConfigError(f"n_layers={n_layers}: MHCN convolves over its hypergraphs; use n_layers >= 1")
        if ssl_weight < 0:
            raise ConfigError(f"ssl_weight={ssl_weight}: must be >= 0 (0 turns the self-supervised task off)")
        if purchase_min < 0:
            raise ConfigError(f"purchase_min={purchase_min}: must be >= 0 (shared items a purchase-motif pair "
                              "needs more than)")
        self.ssl_weight, self.ssl_normalize = ssl_weight, ssl_normalize
        self.norm, self.purchase_min = norm, purchase_min

    # ---- graphs ---------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        social = getattr(split, "social", None)
        if social is None:
            raise ConfigError("mhcn needs user-user links: set data.social=PATH|auto (a 'user user' file of raw user "
                              "ids, or auto for trustnetwork.txt, social.txt or trust.txt beside the data)")
        s = social.matrix if hasattr(social, "matrix") else social
        if s.shape != (split.n_users, split.n_users):
            raise DataError(f"data.social: a {s.shape[0]} x {s.shape[1]} link matrix for {split.n_users} users; build "
                            "it from the same dataset as the split (recforge.data.social.build_social)")
        super().prepare_fit(split)
        self.social_ = sp.csr_matrix(s, dtype=np.float32)
        self.social_record_ = dict(getattr(social, "record", {}) or {})
        self.channels_ = channel_matrices(self.social_, self.graph_, self.purchase_min)
        self._mats = None

    def matrices(self) -> dict[str, _Sparse]:
        """The normalised channels and user-item graph on the model's device, built on first use."""
        mats = getattr(self, "_mats", None)
        if mats is None:
            dev = self.device_
            mats = {name: _Sparse(normalize_channel(m, self.norm), dev) for name, m in self.channels_.items()}
            ru, ri = normalize_interactions(self.graph_, self.norm)
            mats["users"], mats["items"] = _Sparse(ru, dev), _Sparse(ri, dev)
            self._mats = mats
        return mats

    def on_device(self, device: torch.device) -> None:
        super().on_device(device)
        if getattr(self, "_mats", None) is not None:
            self._mats = {k: m.to(device) for k, m in self._mats.items()}

    def build(self, n_users, n_items):
        net = super().build(n_users, n_items)
        d = self.dim
        net.gate = nn.ModuleList(nn.Linear(d, d) for _ in range(4))  # social, joint, purchase, user-item
        net.ssl_gate = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        net.att = nn.Linear(d, d, bias=False)
        net.att_vec = nn.Parameter(torch.empty(1, d))
        for lin in [*net.gate, *net.ssl_gate, net.att]:
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:  # Xavier on a (1, d) bias, as the authors' code
                nn.init.xavier_uniform_(lin.bias.data.view(1, d))
        nn.init.xavier_uniform_(net.att_vec)
        return net

    def weights(self) -> list[torch.Tensor]:
        """The gating and attention parameters (the L2 term beside the embeddings)."""
        net = self.net_
        return [p for m in (net.gate, net.ssl_gate, net.att) for p in m.parameters()] + [net.att_vec]

    # ---- forward --------------------------------------------------------------------------------
    @staticmethod
    def _gate(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
        return x * torch.sigmoid(lin(x))

    def attention(self, channels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-user softmax over the channels of ``aᵀ W_a P_c``; the mixed embedding and the weights."""
        logits = torch.stack([(self.net_.att(c) * self.net_.att_vec).sum(1) for c in channels], 1)
        alpha = torch.softmax(logits, 1)
        return sum(alpha[:, k : k + 1] * c for k, c in enumerate(channels)), alpha

    def propagate(self, adj=None, noise_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (users, items) embeddings: the channels' hypergraph convolutions mixed by
        attention plus half the user-item convolution; items from the user-item graph."""
        mats, net = self.matrices(), self.net_
        ego_u, items = net.user.weight, net.item.weight
        chans = [self._gate(ego_u, net.gate[k]) for k in range(3)]
        simple = self._gate(ego_u, net.gate[3])
        sums = list(chans)
        simple_sum, item_sum = simple, items
        for _ in range(self.n_layers):
            mixed = self.attention(chans)[0] + simple / 2
            chans = [mats[name] @ c for name, c in zip(CHANNELS, chans)]
            sums = [s + F.normalize(c, dim=1) for s, c in zip(sums, chans)]
            new_items = mats["items"] @ mixed
            item_sum = item_sum + F.normalize(new_items, dim=1)
            simple = mats["users"] @ items
            simple_sum = simple_sum + F.normalize(simple, dim=1)
            items = new_items
        users = self.attention(sums)[0] + simple_sum / 2
        return users, item_sum

    # ---- batches and loss -----------------------------------------------------------------------
    def make_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict:
        batch = super().make_batch(idx, rng)
        if self.ssl_weight > 0:
            n, d = self.n_users_, self.dim
            # per channel: user row shuffle, two row shuffles and two column shuffles (local, global)
            batch["rows"] = torch.from_numpy(np.stack([np.stack([rng.permutation(n) for _ in range(3)])
                                                       for _ in range(3)]))
            batch["cols"] = torch.from_numpy(np.stack([np.stack([rng.permutation(d) for _ in range(2)])
                                                       for _ in range(3)]))
        return batch

    def self_supervised_loss(self, users: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Σ over channels of the mean local (user ↔ sub-hypergraph) and global (sub-hypergraph ↔
        hypergraph) terms, with the shuffles ``rows`` (3, 3, n_users) and ``cols`` (3, 2, dim)."""
        mats, total = self.matrices(), users.new_zeros(())
        for k, name in enumerate(CHANNELS):
            p = self._gate(users, self.net_.ssl_gate[k])
            if self.ssl_normalize:
                p = F.normalize(p, dim=1)
            z = mats[name] @ p
            r, c = rows[k], cols[k]
            pos = (p * z).sum(1)
            neg_user = (p[r[0]] * z).sum(1)
            neg_sub = (z[:, c[0]][r[1]] * p).sum(1)
            local = F.softplus(neg_user - pos) + F.softplus(neg_sub - neg_user)
            h = z.mean(0)
            glob = F.softplus(z[:, c[1]][r[2]] @ h - z @ h)
            total = total + local.mean() + glob.mean()
        return total

    def loss(self, batch):
        self._cache = None
        users, items = self.propagate()
        loss = self.rank_loss(batch, users, items)
        n = batch["users"].numel() if "cross" in batch else len(batch["u"])
        loss = loss + self.reg * 0.5 * sum(w.pow(2).sum() for w in self.weights()) / max(n, 1)
        if self.ssl_weight > 0 and "rows" in batch:
            loss = loss + self.ssl_weight * self.self_supervised_loss(users, batch["rows"].to(users.device),
                                                                      batch["cols"].to(users.device))
        return loss

    # ---- notes ------------------------------------------------------------------------------------
    def protocol_notes(self) -> dict:
        notes = {**super().protocol_notes(),
                 "graph": "training interactions (user-item graph) and motif-induced user hypergraphs over the "
                          "social links and the training interactions",
                 "social": {**getattr(self, "social_record_", {}), "used_by_model": True}}
        if getattr(self, "channels_", None) is not None:
            notes["channels"] = {name: {"nnz": int(m.nnz), "users": int((np.diff(m.indptr) > 0).sum())}
                                 for name, m in self.channels_.items()}
        return notes
