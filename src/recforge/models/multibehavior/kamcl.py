"""KAMCL: knowledge-aware multi-intent contrastive learning for multi-behaviour recommendation.

Liang, Zhao, Li & Lei, "Knowledge-Aware Multi-Intent Contrastive Learning for Multi-Behavior
Recommendation", arXiv 2404.11993, 2024. The authors published no code; this implementation is
written from the paper's description of its three modules (relation-aware knowledge-graph
aggregation, intent generation from the relations, intent-based user multi-behaviour interaction),
its two contrastive schemes and its BPR objective. The formulas below are this implementation's; the
choices the description leaves open are listed at the end with what was chosen.

Nodes of the knowledge graph (``split.knowledge``, :mod:`recforge.data.knowledge`): the items
``1..n`` and the entities after them (categories...), embedded in one table ``e_v`` (``dim``);
users have ego embeddings ``e_u``; every relation ``r`` (``co_view``, ``co_cart``, ``co_buy``,
``belongs_to``...) an embedding ``e_r``. With ``A_r`` the row-mean-normalised adjacency of the
relation's triples (both directions) and ``L`` = ``kg_layers``:

* **relation-aware knowledge aggregation.** The graph is split by relation and each relation's
  subgraph propagates on its own, the relation modulating every hop (KGIN's relational message):
  ``x_r^(0) = e``, ``x_r^(l) = normalize(e_r ⊙ A_r x_r^(l-1))``, and the relation's view of item
  ``i`` is ``h_i^r = mean_{l=1..L} x_r^(l)[i]`` (zero for an item without an ``r`` triple). The item
  representation is ``x_i = e_i + mean_r h_i^r``;
* **intent generation.** ``P`` = ``n_intents`` intents, each an attentive mixture of the relations,
  ``α_pr = softmax_r(w_pr)``, with embedding ``e_p = Σ_r α_pr e_r`` and its view of an item
  ``z_i^p = e_i + Σ_r α_pr h_i^r``;
* **intent-based user multi-behaviour interaction.** For behaviour ``b`` (view, cart, buy...) and
  ``N_b(u)`` the user's items under ``b``: per intent ``u^{b,p} = e_p ⊙ mean_{i ∈ N_b(u)} z_i^p``;
  behaviour-specific intent weights ``β_up^b = softmax_p(⟨e_u ⊙ g_b, e_p⟩)`` (``g_b`` a learned
  behaviour gate, so the same user weighs intents differently when viewing and when buying);
  ``u^b = Σ_p β_up^b u^{b,p}``; the user representation ``u = e_u + Σ_b ω_b u^b`` with learned
  behaviour weights ``ω = softmax(v)``;
* **score** of ``(u, i)``: ``⟨u, x_i⟩``.

Training: ``L = L_BPR + λ_b L_beh + λ_i L_int + reg · ½ (‖e_u‖² + ‖e_i‖² + ‖e_j‖²) / batch``:

* ``L_BPR`` on the target-behaviour pairs of the training part (each once an epoch, shuffled), one
  negative drawn uniformly among the items the user has not interacted with under the target
  behaviour; message dropout (``dropout``) on ``u`` and ``x_i``;
* ``L_beh`` (``cl_behavior`` = λ_b), contrast **across behaviour views**: for every auxiliary
  behaviour ``b``, InfoNCE between the user's target-behaviour view ``u^t`` and the view ``u^b``
  (the same user is the positive, the batch's other users the negatives; cosine over
  ``temperature``), over the batch's users who have rows of both behaviours, averaged over ``b``;
* ``L_int`` (``cl_intent`` = λ_i), contrast **across intents**: for the same users and behaviours,
  InfoNCE between ``u^{t,p}`` and ``u^{b,p}`` with the user's other intents ``u^{b,p'}`` (p' ≠ p) as
  the negatives: an intent of a user should agree with itself across behaviours and differ from the
  user's other intents.

At ranking time the user side is aggregated from the history the evaluator gives
(:attr:`Histories.behaviors`), so views made after the training period count; the item side comes
from the knowledge graph and the trained embeddings. A user unknown at training time (``-1``) has a
zero ego embedding (uniform intent weights) and is represented by the history alone; a history
without behaviours counts every row as the most frequent training behaviour, except that a known
user's training rows are used instead (as MBGCN).

Knowledge: ``split.knowledge`` is required (``data.knowledge=co-interaction``: per behaviour, item
pairs shared by more than 3 users of the training part; ``category`` adds ``belongs_to`` entities;
a triple file adds its relations). Every relation with at least one triple is used;
:meth:`protocol_notes` lists them with their triple counts.

Open choices (the description names the modules, not every formula) and deviations:

* the per-relation propagation, the intents as a softmax mixture of relation embeddings and the
  user-intent attention follow KGIN (Wang et al., WWW 2021), on which intent-aware knowledge models
  build; the hop output is L2-normalised as KGIN's code does; relation embeddings start at
  ``1 + N(0, 0.1²)`` (an intent gate ``e_p`` near the identity at first), intent mixtures
  ``w_pr ~ N(0, 1)`` (distinct intents from the start), ego embeddings ``N(0, 0.1²)``;
* the relations are undirected (a triple also links its tail back to its head), so entities
  (categories) are updated from their items at the second hop;
* the behaviour-specific intent weights use a multiplicative behaviour gate ``g_b`` (initial value
  1); the behaviours are fused by a global softmax ``ω`` (not personalised);
* the two contrastive schemes are this implementation's reading of "two contrastive learning
  schemes": across behaviour views of a user, and across the intents of a user; no graph
  augmentation is used for either;
* the target-behaviour pair being scored is left out of the user's target-behaviour neighbourhood
  during training (as :mod:`recforge.models.multibehavior.mbgcn`): a target is never among the
  user's past purchases at ranking time (those are excluded), so the model must not learn to find
  the positive in its own neighbourhood;
* no intent-independence regulariser beyond ``L_int``; L2 on the batch's ego embeddings only.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.graph.propagation import to_torch
from recforge.models.multibehavior.base import (BehaviorAware, PairBatches, behavior_graphs, history_graphs,
                                                params_version, row_mean)
from recforge.models.sequential.modules import Dropout
from recforge.models.torch_base import TorchRecommender
from recforge.training.graph_losses import bpr_loss, info_nce
from recforge.training.samplers import SeenPairs

NO_KNOWLEDGE = ("kamcl builds its intents from item relations and the split has none: set data.knowledge="
                "co-interaction (item pairs shared by more than 3 users within a behaviour), and/or category, or a "
                "'head relation tail' file (e.g. --data synthetic-mb data.target_behavior=buy "
                "data.knowledge=co-interaction)")


def relation_graph(knowledge, relation: str) -> sp.csr_matrix:
    """The relation's triples as an undirected node x node graph (``n_nodes`` square), row-mean
    normalised: row ``v`` averages over the nodes linked to ``v`` by ``relation``."""
    a = knowledge.adjacency(relation)
    a = (a + a.T).tocsr()
    a.data[:] = 1.0
    return row_mean(a)


def intent_contrast(anchor: torch.Tensor, other: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE across intents: ``anchor`` and ``other`` (M, P, d) hold per user the P intent views
    of two behaviours; intent ``p`` of ``anchor`` has intent ``p`` of ``other`` as its positive and
    the user's other intents ``p' ≠ p`` as its negatives (cosine over ``temperature``)."""
    a, o = F.normalize(anchor, dim=-1), F.normalize(other, dim=-1)
    logits = a @ o.transpose(1, 2) / temperature  # (M, P, P)
    return (torch.logsumexp(logits, -1) - logits.diagonal(dim1=1, dim2=2)).mean()


class KAMCL(PairBatches, BehaviorAware, TorchRecommender):
    name = "kamcl"
    uses_knowledge = True

    def __init__(self, dim: int = 64, n_intents: int = 4, kg_layers: int = 2, cl_behavior: float = 0.1,
                 cl_intent: float = 0.1, temperature: float = 0.2, reg: float = 1e-4, dropout: float = 0.1,
                 threads: int | None = None, **train):
        super().__init__(**train)
        if dim <= 0 or n_intents < 1 or kg_layers < 1:
            raise ConfigError("kamcl: need dim > 0, n_intents >= 1 and kg_layers >= 1")
        if cl_behavior < 0 or cl_intent < 0 or temperature <= 0 or reg < 0 or not 0.0 <= dropout < 1.0:
            raise ConfigError("kamcl: need cl_behavior >= 0, cl_intent >= 0, temperature > 0, reg >= 0 and "
                              "0 <= dropout < 1")
        self.dim, self.n_intents, self.kg_layers = dim, n_intents, kg_layers
        self.cl_behavior, self.cl_intent, self.temperature = cl_behavior, cl_intent, temperature
        self.reg, self.dropout, self.threads = reg, dropout, threads

    # ---- graphs -------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        target, behaviors, default = self.adopt_behaviors(split)
        kn = getattr(split, "knowledge", None)
        if kn is None:
            raise ConfigError(NO_KNOWLEDGE)
        if kn.n_items != split.n_items:
            raise ConfigError(f"kamcl: the knowledge covers {kn.n_items} items and the split {split.n_items}; build "
                              "it from the same data (data.knowledge=...)")
        counts = kn.relations()
        #: the relations used (every relation with a triple), in name order, with their triple counts
        self.relations_ = {r: n for r, n in counts.items() if n > 0}
        if not self.relations_:
            raise ConfigError("kamcl: the knowledge has no triple (co-interaction keeps item pairs shared by more than "
                              "N users: lower N with data.knowledge=co-interaction:1, or add category)")
        self.n_nodes_ = kn.n_nodes
        #: per relation: the undirected, row-mean normalised node graph
        self.kg_graphs_ = [relation_graph(kn, r) for r in self.relations_]
        #: per behaviour: binary users x items of the training part
        users, items, codes, self.user_graphs_ = behavior_graphs(split, behaviors, target, self.name)
        n_u = split.n_users
        tgt = self.user_graphs_[behaviors.index(target)]
        rows = np.repeat(np.arange(n_u), np.diff(tgt.indptr))
        self._pairs = np.stack([rows, tgt.indices], 1).astype(np.int64)
        self._seen = SeenPairs(tgt)
        self._graphs = self._cache = None

    def graphs(self) -> list[torch.Tensor]:
        """The relation graphs as torch sparse tensors on the model's device (built on first use)."""
        g = getattr(self, "_graphs", None)
        if g is None:
            g = self._graphs = [to_torch(a, self.device_) for a in self.kg_graphs_]
        return g

    def on_device(self, device: torch.device) -> None:
        super().on_device(device)
        self._graphs = self._cache = None

    def build(self, n_users, n_items):
        d, t, r = self.dim, len(self.behaviors_), len(self.relations_)
        net = nn.Module()
        net.user = nn.Embedding(n_users, d)
        net.node = nn.Embedding(self.n_nodes_, d)
        for emb in (net.user, net.node):
            nn.init.normal_(emb.weight, std=0.1)
        with torch.no_grad():
            net.node.weight[0].zero_()
        net.rel = nn.Parameter(1.0 + 0.1 * torch.randn(r, d))
        net.intent_logits = nn.Parameter(torch.randn(self.n_intents, r))
        net.beh_gate = nn.Parameter(torch.ones(t, d))
        net.beh_logits = nn.Parameter(torch.zeros(t))
        net.drop = Dropout(self.dropout)
        return net

    # ---- the model -----------------------------------------------------------------------------
    def item_side(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_i`` (n_items + 1, d) and the relation views ``h^r`` (R, n_items + 1, d)."""
        net, n = self.net_, self.n_items_ + 1
        x0 = net.node.weight
        views = []
        for adj, e_r in zip(self.graphs(), net.rel):
            x, acc = x0, 0.0
            for _ in range(self.kg_layers):
                x = F.normalize(torch.sparse.mm(adj, x) * e_r, dim=-1)
                acc = acc + x[:n]
            views.append(acc / self.kg_layers)
        h = torch.stack(views)
        return x0[:n] + h.mean(0), h

    def intents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``α`` (P, R) and the intent embeddings ``e_p`` (P, d)."""
        alpha = torch.softmax(self.net_.intent_logits, 1)
        return alpha, alpha @ self.net_.rel

    def user_side(self, ego: torch.Tensor, sums: torch.Tensor, n: torch.Tensor):
        """``u`` (B, d), ``u^b`` (T, B, d) and ``u^{b,p}`` (T, B, P, d) from the ego embeddings, the
        per-behaviour sums over the user's items of ``[e_i, h_i^1, .., h_i^R]`` ``sums`` (T, B, (R+1) d)
        and the counts ``n`` (B, T)."""
        net, d = self.net_, self.dim
        alpha, e_p = self.intents()
        t, b = sums.shape[0], sums.shape[1]
        means = sums * (1.0 / n.clamp(min=1.0)).T.unsqueeze(-1)
        mean_e = means[..., :d]  # (T, B, d)
        mean_h = means[..., d:].reshape(t, b, -1, d)  # (T, B, R, d)
        z = mean_e.unsqueeze(2) + torch.einsum("pr,tbrd->tbpd", alpha, mean_h)  # (T, B, P, d)
        ubp = z * e_p  # (T, B, P, d)
        beta = torch.softmax(torch.einsum("bd,td,pd->tbp", ego, net.beh_gate, e_p), -1)
        ub = (beta.unsqueeze(-1) * ubp).sum(2)  # (T, B, d)
        w = torch.softmax(net.beh_logits, 0)
        return ego + torch.einsum("t,tbd->bd", w, ub), ub, ubp

    def neighbourhood_sums(self, mats: list[sp.csr_matrix], table: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Per behaviour, ``mats[b] @ table`` (torch) and the counts (B, T)."""
        dev = table.device
        sums = [torch.sparse.mm(to_torch(m, dev), table) for m in mats]
        n = torch.from_numpy(np.stack([np.diff(m.indptr) for m in mats], 1).astype(np.float32)).to(dev)
        return sums, n

    def loss(self, batch):
        """BPR on the batch's target pairs plus the two contrastive terms. The pair's own item is
        left out of the user's target-behaviour neighbourhood (see the module docstring)."""
        self._cache = None
        net = self.net_
        items, h = self.item_side()
        u, i, j = batch["u"], batch["i"], batch["j"]
        users = u.cpu().numpy()
        k = self.behaviors_.index(self.target_behavior_)
        e_i = net.node.weight[: self.n_items_ + 1]
        table = torch.cat([e_i, *h], 1)  # (n_items + 1, (R + 1) d)
        sums, n = self.neighbourhood_sums([g[users] for g in self.user_graphs_], table)
        sums[k] = sums[k] - table[i]
        n = n.clone()
        n[:, k] -= 1.0
        ego = net.user.weight[u]
        user, ub, ubp = self.user_side(ego, torch.stack(sums), n)
        eu = net.drop(user)
        pos = (eu * net.drop(items[i])).sum(-1)
        neg = (eu * net.drop(items[j])).sum(-1)
        l2 = ego.pow(2).sum() + e_i[i].pow(2).sum() + e_i[j].pow(2).sum()
        total = bpr_loss(pos, neg) + self.reg * 0.5 * l2 / len(u)
        if (self.cl_behavior or self.cl_intent) and len(self.behaviors_) > 1:
            _, first = np.unique(users, return_index=True)  # each user once (its first pair)
            first = torch.from_numpy(first).to(u.device)
            nb = n[first]
            l_beh, l_int, m = 0.0, 0.0, 0
            for b in range(len(self.behaviors_)):
                if b == k:
                    continue
                rows = first[(nb[:, k] > 0) & (nb[:, b] > 0)]
                if len(rows) < 2:
                    continue
                l_beh = l_beh + info_nce(ub[k][rows], ub[b][rows], self.temperature)
                l_int = l_int + intent_contrast(ubp[k][rows], ubp[b][rows], self.temperature)
                m += 1
            if m:
                total = total + (self.cl_behavior * l_beh + self.cl_intent * l_int) / m
        return total

    # ---- batches -------------------------------------------------------------------------------
    # ---- scoring -------------------------------------------------------------------------------
    def item_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_i`` and ``[e_i, h_i^1, .., h_i^R]`` of the current weights, cached until a parameter
        changes."""
        key = params_version(self.net_)
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                items, h = self.item_side()
                table = torch.cat([self.net_.node.weight[: self.n_items_ + 1], *h], 1)
            cache = self._cache = (key, items, table)
        return cache[1], cache[2]

    def history_matrices(self, hist) -> list[sp.csr_matrix]:
        """Per behaviour, the binary (batch, n_items + 1) matrix of each row's history (a raw
        history of a known user: their training rows), as MBGCN."""
        return history_graphs(self, hist)

    def score(self, hist):
        """Scores (batch, n_items + 1) on the model's device."""
        dev = self.device_
        items, table = self.item_table()
        users = torch.from_numpy(np.asarray(hist.users, dtype=np.int64)).to(dev)
        known = (users >= 0) & (users < self.n_users_)
        with torch.no_grad():
            ego = self.net_.user.weight[users.clamp(0, self.n_users_ - 1)] * known.unsqueeze(1)
            sums, n = self.neighbourhood_sums(self.history_matrices(hist), table)
            u, _, _ = self.user_side(ego, torch.stack(sums), n)
            return u @ items.T

    def protocol_notes(self) -> dict:
        notes = {"loss": "bpr on target-behaviour pairs + behaviour-view and intent contrastive terms",
                 "target_behavior": self.target_behavior_, "behaviors_used": list(self.behaviors_),
                 "relations_used": dict(self.relations_), "n_intents": self.n_intents,
                 "kg_layers": self.kg_layers, "contrastive": {"behavior": self.cl_behavior, "intent": self.cl_intent,
                                                              "temperature": self.temperature},
                 "user_side": "aggregated from the ranking-time history (with behaviours)"}
        if getattr(self, "net_", None) is not None:
            alpha, _ = self.intents()
            rel = list(self.relations_)
            notes["intent_relations"] = [{r: round(float(a), 3) for r, a in zip(rel, row)}
                                         for row in alpha.detach().cpu().numpy()]
            w = torch.softmax(self.net_.beh_logits.detach(), 0).cpu().numpy()
            notes["behavior_weights"] = {b: round(float(v), 4) for b, v in zip(self.behaviors_, w)}
        return notes
