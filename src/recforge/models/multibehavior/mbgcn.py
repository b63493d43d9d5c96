"""MBGCN: behaviour-aware graph convolution for multi-behaviour recommendation.

Jin, Gao, He, Jin & Li, "Multi-behavior Recommendation with Graph Convolutional Networks",
SIGIR 2020.

Users and items have ego embeddings ``e_u``, ``e_i`` (``dim``). With behaviours ``t = 1..T`` (views,
carts, purchases...; the target behaviour is one of them) and ``N_t(u)`` the items user ``u``
interacted with under ``t`` (``n_ut`` of them):

* **user-item propagation.** A learned importance ``w_t > 0`` per behaviour, personalised by the
  user's activity, ``α_ut = w_t n_ut / Σ_m w_m n_um``; the user's message
  ``p_u = W · Σ_t α_ut mean_{i ∈ N_t(u)} e_i`` and the item's message ``q_i = W · mean_{u ∈ N(i)} e_u``
  (``N(i)``: the users of ``i`` under any behaviour); the user and item representations are
  ``[e_u, p_u]`` and ``[e_i, q_i]`` (ego and one propagation layer, concatenated);
* **item-item propagation.** Per behaviour, an item relation graph ``G_t`` links two items
  interacted with by a same user under ``t``; the behaviour-specific item embedding is
  ``s_i^t = [e_i, W_t · mean_{j ∈ G_t(i)} e_j]``, and the user's view of it is
  ``z_u^t = M_t · mean_{j ∈ N_t(u)} s_j^t`` (``M_t``: a 2d x 2d behaviour-specific projection);
* **score** of ``(u, i)`` for the target behaviour:
  ``[e_u, p_u]·[e_i, q_i] + λ / T · Σ_t z_u^t · s_i^t`` (``lamb`` = λ).

Training: BPR on the target-behaviour pairs of the training part (each once an epoch, shuffled),
one negative per pair drawn uniformly among the items the user has not interacted with under the
target behaviour, L2 on the batch's ego embeddings ``reg · ½ (‖e_u‖² + ‖e_i‖² + ‖e_j‖²) / batch``,
and message dropout (``dropout``) on the user and item representations, as the authors' code.

At ranking time the user side (``α_ut``, ``p_u``, ``z_u^t``) is aggregated from the history the
evaluator gives (:attr:`Histories.behaviors`: training rows plus, for the test targets, the
validation rows and the other behaviours' rows of the validation period), so views made after the
training period count; the item side comes from the training graphs. A user unknown at training
time (user ``-1``) has a zero ego embedding and is represented by their history alone. A history
without behaviours counts every row as the most frequent training behaviour, except that a known
user's training rows are used instead.

Deviations from the paper (and its code, ``tsinghua-fib-lab/MBGCN``):

* one propagation layer, as the authors' code (the paper's notation allows several);
* ego embeddings trained from scratch (N(0, 0.1²)), where the authors start from pre-trained MF
  embeddings; hence a higher default learning rate;
* the behaviour importances are ``exp`` of a free parameter (initial value 1 for every behaviour,
  as the authors' ``mgnn_weight``), which keeps them positive;
* the item message is a mean over the item's users of every behaviour (the authors' code sums
  over the target behaviour's users; a mean keeps popular items' messages on the scale of the
  others, and items only viewed still get one);
* ``item_topk`` (default 50) keeps, per item and behaviour, the ``k`` related items sharing the
  most users (ties by item index), then takes the mean: the full co-interaction graph of views
  on Retailrocket has 48M edges (``item_topk=null`` keeps all, as the paper);
* during training the pair being scored is left out of the user's target-behaviour
  neighbourhood (its item is taken out of the sums and the count): otherwise the model learns to
  find a purchase among the user's own purchases, which never happens at ranking time (past
  purchases are excluded and a target is never among them). On the synthetic funnel this took
  NDCG@10 from below popularity to above it;
* no node dropout on the graphs (only message dropout); L2 on the ego embeddings of the batch
  rather than on the concatenated representations.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from recforge.errors import ConfigError
from recforge.models.graph.propagation import sparse_mm, to_torch, torch_pair
from recforge.models.multibehavior.base import (BehaviorAware, PairBatches, behavior_graphs, binary_rows,
                                                history_graphs, params_version, row_mean)
from recforge.models.sequential.modules import Dropout
from recforge.models.torch_base import TorchRecommender
from recforge.training.graph_losses import bpr_loss
from recforge.training.samplers import SeenPairs


def item_relations(r: sp.csr_matrix, topk: int | None, chunk: int = 4096) -> sp.csr_matrix:
    """Item x item graph of items sharing a user in ``r`` (users x items), without self links; with
    ``topk``, each item keeps the ``topk`` items sharing the most users (ties: lower index first).
    Built ``chunk`` items at a time so the unpruned products never exist all at once. Row-mean
    normalised."""
    rt = r.T.tocsr()
    n = rt.shape[0]
    blocks = []
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        b = (rt[lo:hi] @ r).tocoo()
        keep = b.row + lo != b.col
        row, col, val = b.row[keep], b.col[keep], b.data[keep]
        if topk is not None and len(row):
            order = np.lexsort((col, -val, row))
            row, col, val = row[order], col[order], val[order]
            starts = np.searchsorted(row, row, side="left")
            rank = np.arange(len(row)) - starts
            sel = rank < topk
            row, col, val = row[sel], col[sel], val[sel]
        blocks.append(sp.csr_matrix((np.ones(len(row), dtype=np.float32), (row, col)), shape=(hi - lo, n)))
    return row_mean(sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n), dtype=np.float32))


class MBGCN(PairBatches, BehaviorAware, TorchRecommender):
    name = "mbgcn"

    def __init__(self, dim: int = 64, lamb: float = 1.0, reg: float = 1e-4, dropout: float = 0.2,
                 item_topk: int | None = 50, threads: int | None = None, **train):
        super().__init__(**train)
        if dim <= 0 or lamb < 0 or reg < 0 or not 0.0 <= dropout < 1.0:
            raise ConfigError("mbgcn: need dim > 0, lamb >= 0, reg >= 0 and 0 <= dropout < 1")
        if item_topk is not None and item_topk < 1:
            raise ConfigError(f"item_topk={item_topk}: must be >= 1, or null for every co-interacted item")
        self.dim, self.lamb, self.reg, self.dropout, self.item_topk, self.threads = (
            dim, lamb, reg, dropout, item_topk, threads)

    # ---- graphs -------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        target, behaviors, default = self.adopt_behaviors(split)
        #: per behaviour: binary users x items of the training part
        users, items, codes, self.user_graphs_ = behavior_graphs(split, behaviors, target, self.name)
        n_u, n_i = split.n_users, split.n_items + 1
        #: items x users, mean over the item's users of every behaviour
        self.item_users_ = row_mean(binary_rows(users, items, n_u, n_i).T.tocsr())
        #: per behaviour: items x items, mean over the related items
        self.item_graphs_ = [item_relations(r, self.item_topk) for r in self.user_graphs_]
        tgt = self.user_graphs_[behaviors.index(target)]
        rows = np.repeat(np.arange(n_u), np.diff(tgt.indptr))
        self._pairs = np.stack([rows, tgt.indices], 1).astype(np.int64)
        self._seen = SeenPairs(tgt)
        self._graphs = self._cache = None

    def graphs(self) -> dict:
        """The item-side training graphs as (matrix, transpose) pairs of torch sparse tensors on the
        model's device, and the users' per-behaviour counts (built on first use)."""
        g = getattr(self, "_graphs", None)
        if g is None:
            dev = self.device_
            g = self._graphs = {
                "user_n": torch.from_numpy(np.stack([np.diff(r.indptr) for r in self.user_graphs_], 1)
                                           .astype(np.float32)).to(dev),
                "item_users": torch_pair(self.item_users_, dev),
                "item_items": [torch_pair(r, dev) for r in self.item_graphs_],
            }
        return g

    def on_device(self, device: torch.device) -> None:
        super().on_device(device)
        self._graphs = self._cache = None

    def build(self, n_users, n_items):
        d, t = self.dim, len(self.behaviors_)
        net = nn.Module()
        net.user = nn.Embedding(n_users, d)
        net.item = nn.Embedding(n_items + 1, d)
        for emb in (net.user, net.item):
            nn.init.normal_(emb.weight, std=0.1)
        with torch.no_grad():
            net.item.weight[0].zero_()
        net.W = nn.Linear(d, d, bias=False)
        net.W_item = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(t))
        net.M = nn.ModuleList(nn.Linear(2 * d, 2 * d, bias=False) for _ in range(t))
        for lin in [net.W, *net.W_item, *net.M]:
            nn.init.xavier_normal_(lin.weight)
        net.log_w = nn.Parameter(torch.zeros(t))  # behaviour importances exp(0) = 1, as the authors
        net.drop = Dropout(self.dropout)
        return net

    # ---- the model -----------------------------------------------------------------------------
    def item_side(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``[e_i, q_i]`` (n_items + 1, 2d) and, per behaviour, ``s_i^t`` (n_items + 1, 2d)."""
        g, net = self.graphs(), self.net_
        e_i, e_u = net.item.weight, net.user.weight
        items = torch.cat([e_i, net.W(sparse_mm(g["item_users"], e_u))], 1)
        s = [torch.cat([e_i, w(sparse_mm(a, e_i))], 1) for a, w in zip(g["item_items"], net.W_item)]
        return items, s

    def user_side(self, ego: torch.Tensor, sums: list[torch.Tensor], s_sums: list[torch.Tensor],
                  n: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``[e_u, p_u]`` and ``z_u^t`` of a batch from the ego embeddings, per behaviour the sums of
        the user's item embeddings ``sums`` (batch, d) and of their ``s^t`` ``s_sums`` (batch, 2d), and
        the counts ``n`` (batch, T)."""
        net = self.net_
        w = net.log_w.exp()
        alpha = n * w / ((n * w).sum(1, keepdim=True) + 1e-8)
        inv = 1.0 / n.clamp(min=1.0)
        agg = sum(alpha[:, k : k + 1] * inv[:, k : k + 1] * x for k, x in enumerate(sums))
        users = torch.cat([ego, net.W(agg)], 1)
        z = [mt(inv[:, k : k + 1] * x) for k, (x, mt) in enumerate(zip(s_sums, net.M))]
        return users, z

    def loss(self, batch):
        """BPR of the batch's target pairs. The pair's own edge is left out of the user's target-
        behaviour neighbourhood (sum minus the item, count minus one): at ranking time a target is
        never among the user's past target items (those are excluded), so the model must not learn
        to find the positive in its own neighbourhood. The user side is aggregated over the batch's
        users' rows of the graphs only (not over every user's)."""
        self._cache = None
        g, net = self.graphs(), self.net_
        items, s = self.item_side()
        u, i, j = batch["u"], batch["i"], batch["j"]
        e_i = net.item.weight
        k = self.behaviors_.index(self.target_behavior_)
        rows = u.cpu().numpy()
        mine = [torch_pair(r[rows], e_i.device) for r in self.user_graphs_]  # (batch, n_items + 1) each
        sums = [sparse_mm(m, e_i) for m in mine]
        s_sums = [sparse_mm(m, st) for m, st in zip(mine, s)]
        sums[k] = sums[k] - e_i[i]
        s_sums[k] = s_sums[k] - s[k][i]
        n = g["user_n"][u].clone()
        n[:, k] -= 1.0
        users, z = self.user_side(net.user.weight[u], sums, s_sums, n)
        eu = net.drop(users)
        ei, ej = net.drop(items[i]), net.drop(items[j])
        scale = self.lamb / len(s)
        pos = (eu * ei).sum(-1) + scale * sum((zt * st[i]).sum(-1) for zt, st in zip(z, s))
        neg = (eu * ej).sum(-1) + scale * sum((zt * st[j]).sum(-1) for zt, st in zip(z, s))
        w_u = net.user.weight
        l2 = w_u[u].pow(2).sum() + e_i[i].pow(2).sum() + e_i[j].pow(2).sum()
        return bpr_loss(pos, neg) + self.reg * 0.5 * l2 / len(u)

    # ---- scoring -------------------------------------------------------------------------------
    def item_table(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The item side of the current weights, cached until a parameter changes: ``s^t`` per
        behaviour and ``[e_i, q_i, s_i^1 .. s_i^T]`` side by side (n_items + 1, 2d (1 + T)), the
        right-hand factor of the whole score in one product."""
        key = params_version(self.net_)
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                items, s = self.item_side()
            cache = self._cache = (key, s, torch.cat([items, *s], 1))
        return cache[1], cache[2]

    def history_matrices(self, hist) -> list[sp.csr_matrix]:
        """Per behaviour, the binary (batch, n_items + 1) matrix of each row's history."""
        return history_graphs(self, hist)

    def score(self, hist):
        """Scores (batch, n_items + 1) on the model's device."""
        dev = self.device_
        s, table = self.item_table()
        mats = self.history_matrices(hist)
        users = torch.from_numpy(np.asarray(hist.users, dtype=np.int64)).to(dev)
        known = (users >= 0) & (users < self.n_users_)
        with torch.no_grad():
            ego = self.net_.user.weight[users.clamp(0, self.n_users_ - 1)] * known.unsqueeze(1)
            n = torch.from_numpy(np.stack([np.diff(m.indptr) for m in mats], 1).astype(np.float32)).to(dev)
            mt = [to_torch(m, dev) for m in mats]
            e_i = self.net_.item.weight
            u, z = self.user_side(ego, [torch.sparse.mm(m, e_i) for m in mt],
                                  [torch.sparse.mm(m, st) for m, st in zip(mt, s)], n)
            scale = self.lamb / len(s)
            return torch.cat([u, *(scale * zt for zt in z)], 1) @ table.T  # one product, no per-behaviour pass

    def protocol_notes(self) -> dict:
        w = self.net_.log_w.detach().exp().cpu().numpy() if getattr(self, "net_", None) is not None else None
        notes = {"loss": "bpr on target-behaviour pairs", "target_behavior": self.target_behavior_,
                 "behaviors_used": list(self.behaviors_),
                 "item_graph": f"co-interaction per behaviour, top {self.item_topk} per item"
                 if self.item_topk else "co-interaction per behaviour, every related item",
                 "user_side": "aggregated from the ranking-time history (with behaviours)"}
        if w is not None:
            notes["behavior_importance"] = {b: round(float(v), 4) for b, v in zip(self.behaviors_, w)}
        return notes
