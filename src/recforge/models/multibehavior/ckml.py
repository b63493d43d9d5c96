"""CKML: coarse-to-fine knowledge-enhanced multi-interest learning for multi-behaviour recommendation.

Meng, Zhao, Guo, Zhang, Wu, Gao, Li, Li & Tang, "Coarse-to-Fine Knowledge-Enhanced Multi-Interest
Learning Framework for Multi-Behavior Recommendation", ACM TOIS 42(1), 2023 (authors' code:
``MC-CV/CKML``).

Users and items have ego embeddings ``e⁰`` (``dim``); every behaviour ``b = 1..T`` (views, carts,
purchases...; the target is one of them) has ``K`` interests (``n_interests``): the first ``S``
(``n_specific``) are *specific* to the behaviour, the other ``K - S`` are *shared* by all
behaviours. Item knowledge is ``split.knowledge`` (``data.knowledge=co-interaction`` and/or
``category``, or a triple file); every relation ``r`` of it is used, as an item graph ``A_r``:
an item-item relation links its head and tail items; a relation to entities (an item's category)
links the items that share an entity (head → entity → items, each hop a mean).

* **Knowledge-enhanced coarse-grained interest extraction.** Per relation, one knowledge-graph
  layer of the authors' encoder on the item embeddings: ``x^r = ½ (e⁰ + ½ (σ(Â_r e⁰) + e⁰))``
  (``Â_r``: row-mean normalised; ``σ``: LeakyReLU for ``encoder=gccf``, the identity for
  ``lightgcn``), trained with an auxiliary BPR loss on the relation's pairs,
  ``L_KG = Σ_r mean softplus(⟨x^r_h, x^r_j⟩ - ⟨x^r_h, x^r_t⟩)`` (``(h, t)`` related under ``r``,
  ``j`` a random item). The interest networks then assign the items to interests:
  ``z^{b,k}_i = LeakyReLU(W_{b,k} [x^1_i ‖ ... ‖ x^R_i] + c_{b,k})`` with one network per
  behaviour and specific interest and one per shared interest (common to all behaviours). Every
  interest of a user starts from the user's ego embedding, ``z^{b,k}_u = e⁰_u``.
* **Fine-grained interest extraction (dynamic routing).** ``L`` layers; in layer ``l``, on the
  graph of behaviour ``b`` (both directions), every interaction ``(v ← w)`` is routed among the
  ``K`` interests: logits ``a_{k,vw} = 0``, then ``n_iterations`` times
  ``p_{·,vw} = softmax_k(a_{·,vw} / temperature)``,
  ``m^{b,k}_v = Σ_w p_{k,vw} z^{b,k}_w / Σ_w p_{k,vw}`` (a weighted mean of the neighbours'
  interest-``k`` embeddings) and ``a_{k,vw} += ⟨ẑ^{b,k}_w, tanh(m̂^{b,k}_v)⟩`` (``ẑ``, ``m̂``:
  L2-normalised), the last ``m`` being the layer's message ``o^{b,k}_v = σ(m^{b,k}_v)``.
* **Interest-level attention across behaviours.** A specific interest keeps its behaviour's
  message, ``y^{b,k} = o^{b,k}``; a shared interest attends over the behaviours,
  ``y^{b,k} = MHA_{l,k}(o^{1,k}, ..., o^{T,k})_b + Σ_{b'} o^{b',k}`` (multi-head self-attention
  whose tokens are the node's ``T`` behaviour-specific messages, ``n_heads`` heads, no output
  projection; separate weights for users and items, per layer and shared interest). Residual
  layers ``z_l = z_{l-1} + y_l``; the representation is the sum of the layers' outputs,
  ``r^{b,k} = Σ_{l=1..L} y^{b,k}_l``.
* **Prediction.** ``ŷ_b(u, i) = max_k ⟨r^{b,k}_u, r^{b,k}_i⟩``; the **target behaviour's**
  ``ŷ`` ranks.

Training: each step takes ``batch_size`` users (an epoch visits every user with a training row
once); for each behaviour ``b``, every one of them with ``b``-rows gets ``n_samples`` positives drawn
with replacement from their ``b``-items and as many negatives drawn uniformly among the others (the
authors' sampler). Loss: ``Σ_b λ_b Σ_pairs max(0, margin - ŷ_b(u, i) + ŷ_b(u, j)) / users_b`` (the
authors' pairwise hinge loss, summed over a user's pairs and averaged over users) ``+ kg_weight ·
L_KG`` (``batch_size`` head items per relation a step, up to ``n_samples`` pairs each) ``+ reg``
times the L2 norm of the ego embeddings of the step's pairs (per user). ``λ_b`` are
``loss_weights``; by default **every behaviour weighs 1** (the authors' scripts use 1 for page
views and purchases, 0.4 for carts, 0 for favourites on their e-commerce sets; 0 for every
auxiliary behaviour in their defaults).

Ranking time: the item side (every behaviour, interest and layer) comes from the training graph;
the user side is **rebuilt from the history** the evaluator gives (:attr:`Histories.behaviors`):
the routing into a user reads only the user's neighbours, so the user's layer-``l`` messages are
routed over the history's items of each behaviour with the items' layer-``l-1`` embeddings,
attended across behaviours and summed exactly as in training. A user whose history is their
training rows gets exactly their training-time representation; later rows change it. The user's
own ego embedding reaches their representation only through the items (two hops), so a user
unknown at training time (``-1``) is represented as well as a known one. A history without
behaviours counts every row as the most frequent training behaviour, except that a known user's
training rows are used instead.

Deviations from the paper and design choices its text leaves open:

* the authors' code adds a learned embedding of each interaction's time slot (5-day slots) to
  the routed embeddings; left out, because ranking-time histories carry no timestamps;
* the authors train on a sampled subgraph of 15-25k users and items a step and score on another;
  we propagate over the whole training graph every step (the last layer only into the step's users
  and sampled items, the only nodes the loss reads: the same values as over the whole graph);
* knowledge: the authors' item-item graphs are per-behaviour co-interaction graphs and a
  same-category graph, each cut to 100k random pairs; here the relations of ``split.knowledge``
  (``co-interaction``: pairs more than N users had within a behaviour; ``category``: items sharing
  a category, through the category entity) are used whole. Negatives of the knowledge loss are
  drawn uniformly among the items not related to the head for item-item relations and uniformly
  among all items for entity relations;
* every interest is ``dim``-dimensional and starts, for users, from the whole ego embedding (the
  authors' code with its default two interests; for more it splits the user embedding into
  ``K/2`` pieces);
* the authors initialise with Xavier and multiply the knowledge scores by 100; we start from
  N(0, 0.1²) and use no multiplier; the L2 term is on the ego embeddings of the step's pairs
  rather than on every table and weight; the authors decay the learning rate by 0.96 every
  ``trnNum // batch`` = 156 updates of 64 users, i.e. every 10,000 users trained, whatever the data
  set's size; the YAML defaults do the same per 10,000 users (``lr_schedule=step``,
  ``lr_step_unit=update``, ``lr_step=39`` of our 256-user steps, ``lr_gamma=0.96``); decaying per
  epoch instead decays too slowly on large sets and too fast on small ones (Retailrocket's 2,174
  users make 9 steps an epoch);
* the self-attention output has no residual (the authors' setting for their e-commerce sets;
  they add one on Yelp); the routing logits start at 0 (the authors' 1 gives the same softmax).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.graph.propagation import EdgeList, edge_dot, edge_mm, sparse_mm, torch_pair
from recforge.models.multibehavior.base import (BehaviorAware, behavior_graphs, binary_rows, history_graphs,
                                                params_version, row_mean, softmax_parts)
from recforge.models.multibehavior.cigf import LEAKY, SCORE_CHUNK, parse_loss_weights, user_pairs
from recforge.models.torch_base import TorchRecommender
from recforge.training.samplers import SeenPairs

ENCODERS = ("gccf", "lightgcn")
KNOWLEDGE_FIX = ("set data.knowledge=co-interaction (item pairs that several users had within a behaviour, from the "
                 "training part) or data.knowledge=category (items sharing a category), or give a triple file")


def route(z: torch.Tensor, edges: EdgeList, iterations: int, temperature: float) -> torch.Tensor:
    """Dynamic routing of edges among interests. ``z`` (K, m, d): the interest embeddings of the
    source nodes; ``edges``: the (targets x sources) :class:`EdgeList`. Returns (K, n, d): per
    interest, the routing-weighted mean of each target's incoming sources (0 without any).

    The first iteration's routing weights are uniform, so its message is the plain mean of the
    neighbours. The later ones need per-edge terms: the agreement ``⟨ẑ_w, tanh(m̂_v)⟩`` is a sampled
    dense-dense product over the edges (:func:`edge_dot`) and the weighted mean a sparse product
    with per-edge weights (:func:`edge_mm`), so only (K, E) logits are stored, never a (K, E, d)
    gather of the sources. Where every interest of the sources is the same vector (``z`` expanded
    along K, as the users' first layer is), every edge agrees equally with every interest, so the
    routing stays uniform: the mean, computed once."""
    if z.shape[0] > 1 and z.stride(0) == 0:
        return edge_mm(edges, edges.mean, z[0]).unsqueeze(0).expand(z.shape[0], -1, -1)
    k = z.shape[0]
    # per interest by unbind (its gradient is a stack; indexing would zero-fill all K in the backward pass)
    zs = z.unbind(0)
    val = torch.stack([edge_mm(edges, edges.mean, zk) for zk in zs], 0)
    if iterations == 1:
        return val
    unit = F.normalize(z, dim=-1).unbind(0)
    logits = None
    for _ in range(iterations - 1):
        pull = torch.tanh(F.normalize(val, dim=-1)).unbind(0)
        agree = torch.stack([edge_dot(edges, pk, uk) for pk, uk in zip(pull, unit)], 0)  # (K, E)
        logits = agree if logits is None else logits + agree
        p = torch.softmax(logits / temperature, 0)
        den = p.new_zeros(k, edges.shape[0]).index_add(1, edges.tgt, p)
        w = (p / den.index_select(1, edges.tgt).clamp_min(1e-12)).unbind(0)
        val = torch.stack([edge_mm(edges, wk, zk) for wk, zk in zip(w, zs)], 0)
    return val


class BehaviorAttention(nn.Module):
    """Multi-head self-attention whose tokens are a node's ``T`` behaviour-specific vectors:
    (T, n, d) → (T, n, d), no output projection (the authors' ``selfAttention``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        for lin in (self.q, self.k, self.v):
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ``T`` tokens are few (one per behaviour) and the nodes many, so the (T x T) scores and
        the weighted sums are elementwise products over token pairs, each over all nodes at once: a
        batched product of (n x heads) tiny matrices costs several times more on a CPU."""
        t, n, d = x.shape
        h = self.heads
        # per token (n, h, d / h), by unbind: its gradient is a stack, where indexing would zero-fill
        q, k, v = (f(x).view(t, n, h, d // h).unbind(0) for f in (self.q, self.k, self.v))
        scale = (d / h) ** -0.5
        out = []
        for qa in q:
            # token a's scores against every token b (n, h each), their softmax over b, the weighted values
            weights = softmax_parts([(qa * kb).sum(-1) * scale for kb in k])
            out.append(sum(w.unsqueeze(-1) * vb for w, vb in zip(weights, v)))
        return torch.stack(out, 0).reshape(t, n, d)


class CKML(BehaviorAware, TorchRecommender):
    name = "ckml"
    uses_knowledge = True

    def __init__(self, dim: int = 32, n_interests: int = 2, n_specific: int = 1, n_layers: int = 3,
                 n_iterations: int = 2, temperature: float = 1.0, n_heads: int = 2, encoder: str = "gccf",
                 n_samples: int = 40, loss_weights: dict | None = None, margin: float = 1.0, kg_weight: float = 1.0,
                 reg: float = 1e-4, threads: int | None = None, **train):
        super().__init__(**train)
        if dim <= 0 or n_layers < 1 or n_iterations < 1 or n_samples < 1 or reg < 0 or kg_weight < 0 or margin <= 0:
            raise ConfigError("ckml: need dim > 0, n_layers >= 1, n_iterations >= 1, n_samples >= 1, margin > 0, "
                              "reg >= 0 and kg_weight >= 0")
        if n_interests < 1 or not 0 <= n_specific <= n_interests:
            raise ConfigError(f"ckml: n_interests={n_interests}, n_specific={n_specific}: need n_interests >= 1 and "
                              "0 <= n_specific <= n_interests")
        if n_heads < 1 or dim % n_heads:
            raise ConfigError(f"ckml: dim={dim} must be a multiple of n_heads={n_heads}")
        if not temperature > 0:
            raise ConfigError(f"ckml: temperature={temperature} must be > 0")
        if encoder not in ENCODERS:
            raise ConfigError(f"ckml: encoder={encoder!r}; choose one of {', '.join(ENCODERS)}")
        if loss_weights is not None and not isinstance(loss_weights, dict):
            raise ConfigError("ckml: loss_weights must map behaviours to weights, e.g. "
                              "loss_weights={view: 1.0, cart: 0.4, buy: 1.0}")
        self.dim, self.n_interests, self.n_specific, self.n_layers = dim, n_interests, n_specific, n_layers
        self.n_iterations, self.temperature, self.n_heads, self.encoder = n_iterations, temperature, n_heads, encoder
        self.n_samples, self.loss_weights, self.margin, self.kg_weight = n_samples, loss_weights, margin, kg_weight
        self.reg, self.threads = reg, threads

    # ---- data ---------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        target, behaviors, default = self.adopt_behaviors(split)
        self.loss_weights_ = parse_loss_weights(self.loss_weights, behaviors, 1.0, self.name)
        knowledge = getattr(split, "knowledge", None)
        if knowledge is None:
            raise ConfigError(f"{self.name} reads item knowledge (its coarse-grained interests come from item "
                              f"relations) and the split has none: {KNOWLEDGE_FIX}")
        self.relations_, self.relation_graphs_ = self._relations(knowledge, split.n_items)
        users, _, _, self.user_graphs_ = behavior_graphs(split, behaviors, target, self.name)
        self._active = np.unique(users)
        self._seen = [SeenPairs(r) for r in self.user_graphs_]
        self._kg_heads = [np.flatnonzero(np.diff(g.indptr) > 0) for g in self.relation_graphs_]
        self._kg_seen = [SeenPairs(g) if kind == "item" else None
                         for (_, kind, _), g in zip(self.relations_, self.relation_graphs_)]
        self._kg_back = [sp.csr_matrix(g.T) if kind == "entity" else None
                         for (_, kind, _), g in zip(self.relations_, self.relation_graphs_)]
        self._graphs = self._cache = None

    def _relations(self, knowledge, n_items: int) -> tuple[list, list]:
        """``[(name, kind, triples)]`` and per relation its binary head → tail matrix: items x items
        (``kind="item"``) or items x nodes (``"entity"``: some tails are entities)."""
        t = knowledge.triples
        if t.height == 0:
            raise ConfigError(f"{self.name}: data.knowledge gave no triple (relations: none); loosen it (e.g. "
                              "co-interaction:1 keeps pairs shared by more than one user) or "
                              f"{KNOWLEDGE_FIX.split(' (')[0].replace('set ', 'use ')}")
        rels, graphs = [], []
        for name in sorted(t["relation"].unique().to_list()):
            r = t.filter(pl.col("relation") == name)
            h, tl = r["head"].to_numpy().astype(np.int64), r["tail"].to_numpy().astype(np.int64)
            ok = (h >= 1) & (h <= n_items)
            h, tl = h[ok], tl[ok]
            kind = "item" if (tl <= n_items).all() else "entity"
            width = n_items + 1 if kind == "item" else knowledge.n_nodes
            graphs.append(binary_rows(h, tl, n_items + 1, width))
            rels.append((str(name), kind, int(len(h))))
        return rels, graphs

    def graphs(self) -> dict:
        """Torch graphs on the model's device (built on first use): per behaviour the routing
        edges (:class:`EdgeList`) into users and into items (and the scipy matrices they come from,
        for the last layer's subsets), and per relation the row-mean item → tail (and, for entity
        relations, entity → item) matrices."""
        g = getattr(self, "_graphs", None)
        if g is None:
            dev = self.device_
            # per behaviour: into users (sources: items) and into items (sources: users)
            mats = [(sp.csr_matrix(r), sp.csr_matrix(r.T)) for r in self.user_graphs_]
            beh = [(EdgeList(a, dev), EdgeList(b, dev)) for a, b in mats]
            kg = []
            for (_, kind, _), m in zip(self.relations_, self.relation_graphs_):
                hops = [torch_pair(row_mean(m), dev)]
                if kind == "entity":
                    hops.insert(0, torch_pair(row_mean(sp.csr_matrix(m.T)), dev))  # entity ← items first
                kg.append(hops)
            g = self._graphs = {"edges": beh, "mats": mats, "kg": kg}
        return g

    def on_device(self, device: torch.device) -> None:
        super().on_device(device)
        self._graphs = self._cache = None

    def build(self, n_users, n_items):
        d, t, k, s, L = self.dim, len(self.behaviors_), self.n_interests, self.n_specific, self.n_layers
        r = len(self.relations_)
        net = nn.Module()
        net.user = nn.Embedding(n_users, d)
        net.item = nn.Embedding(n_items + 1, d)
        for emb in (net.user, net.item):
            nn.init.normal_(emb.weight, std=0.1)
        with torch.no_grad():
            net.item.weight[0].zero_()
        net.specific = nn.ModuleList(nn.ModuleList(nn.Linear(r * d, d) for _ in range(s)) for _ in range(t))
        net.shared = nn.ModuleList(nn.Linear(r * d, d) for _ in range(k - s))
        for lin in [*(x for b in net.specific for x in b), *net.shared]:
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        net.att_user = nn.ModuleList(nn.ModuleList(BehaviorAttention(d, self.n_heads) for _ in range(k - s))
                                     for _ in range(L))
        net.att_item = nn.ModuleList(nn.ModuleList(BehaviorAttention(d, self.n_heads) for _ in range(k - s))
                                     for _ in range(L))
        return net

    # ---- the model ----------------------------------------------------------------------------
    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, LEAKY) if self.encoder == "gccf" else x

    def knowledge_items(self) -> list[torch.Tensor]:
        """Per relation ``x^r`` (n_items + 1, d): one knowledge-graph layer on the item embeddings."""
        e0 = self.net_.item.weight
        out = []
        for hops in self.graphs()["kg"]:
            m = e0
            for pair in hops:
                m = sparse_mm(pair, m)
            out.append(0.5 * (e0 + 0.5 * (self.act(m) + e0)))
        return out

    def initial_items(self, kg: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per behaviour the items' coarse-grained interest embeddings ``z^{b,·}`` (K, n_items + 1, d)."""
        net = self.net_
        x = torch.cat(kg, -1)
        shared = [F.leaky_relu(f(x), LEAKY) for f in net.shared]
        return [torch.stack([F.leaky_relu(f(x), LEAKY) for f in net.specific[b]] + shared, 0)
                for b in range(len(self.behaviors_))]

    def across_behaviors(self, layer: int, msgs: list[torch.Tensor], side: str) -> list[torch.Tensor]:
        """``y^{b,·}`` per behaviour from the messages ``o^{b,·}`` (K, n, d) of one layer."""
        s = self.n_specific
        if s == self.n_interests:
            return msgs
        att = (self.net_.att_user if side == "user" else self.net_.att_item)[layer]
        # per behaviour its K interests (n, d) by unbind, whose gradient is a stack: slicing a stacked
        # (T, K, n, d) tensor would zero-fill the whole of it in the backward pass once per slice
        parts = [m.unbind(0) for m in msgs]
        out = [list(p[:s]) for p in parts]
        for k in range(s, self.n_interests):
            tokens = torch.stack([p[k] for p in parts], 0)  # (T, n, d)
            y = att[k - s](tokens) + tokens.sum(0, keepdim=True)
            for b, yb in enumerate(y.unbind(0)):
                out[b].append(yb)
        return [torch.stack(o, 0) for o in out]

    def propagate(self, users: np.ndarray | None = None,
                  items: np.ndarray | None = None) -> tuple[list, list, list, list]:
        """Over the training graph: per behaviour the users' and items' ``r^{b,·}`` (K, n, d), the
        items' layer inputs ``z_0..z_{L-1}`` per behaviour, and the knowledge embeddings ``x^r``.

        With ``users`` / ``items`` (node ids), ``r`` is computed for those nodes only, in that order
        (a training step needs its own users and sampled items): every layer but the last still runs
        over every node, since the last one reads them, but the last layer's routing and attention
        only into the given ones. A node's routing reads only its own incoming edges, so its values
        are those of the whole graph's."""
        g, net = self.graphs(), self.net_
        kg = self.knowledge_items()
        zi = self.initial_items(kg)
        zu = [net.user.weight.unsqueeze(0).expand(self.n_interests, -1, -1)] * len(zi)
        item_layers = [[z] for z in zi]
        out_u = out_i = None
        for layer in range(self.n_layers):
            last = layer + 1 == self.n_layers
            edges = g["edges"]
            if last and (users is not None or items is not None):
                edges = [(eu if users is None else EdgeList(mu_[users], self.device_),
                          ei if items is None else EdgeList(mi_[items], self.device_))
                         for (eu, ei), (mu_, mi_) in zip(g["edges"], g["mats"])]
                if out_u is not None and users is not None:
                    out_u = [o[:, torch.as_tensor(users, device=o.device)] for o in out_u]
                if out_i is not None and items is not None:
                    out_i = [o[:, torch.as_tensor(items, device=o.device)] for o in out_i]
            mu, mi = [], []
            for b, (into_users, into_items) in enumerate(edges):
                mu.append(self.act(route(zi[b], into_users, self.n_iterations, self.temperature)))
                mi.append(self.act(route(zu[b], into_items, self.n_iterations, self.temperature)))
            yu, yi = self.across_behaviors(layer, mu, "user"), self.across_behaviors(layer, mi, "item")
            if not last:  # the last layer's z would feed no further layer
                zu = [z + y for z, y in zip(zu, yu)]
                zi = [z + y for z, y in zip(zi, yi)]
                for b, z in enumerate(zi):
                    item_layers[b].append(z)
            out_u = yu if out_u is None else [o + y for o, y in zip(out_u, yu)]
            out_i = yi if out_i is None else [o + y for o, y in zip(out_i, yi)]
        return out_u, out_i, item_layers, kg

    def history_users(self, mats: list[sp.csr_matrix], item_layers: list) -> list[torch.Tensor]:
        """Per behaviour the ``r^{b,·}`` (K, batch, d) of history rows (``mats``: per behaviour the
        binary batch x items matrix)."""
        edges = [EdgeList(m, self.device_) for m in mats]
        out = None
        for layer in range(self.n_layers):
            msgs = [self.act(route(item_layers[b][layer], e, self.n_iterations, self.temperature))
                    for b, e in enumerate(edges)]
            y = self.across_behaviors(layer, msgs, "user")
            out = y if out is None else [o + v for o, v in zip(out, y)]
        return out

    @staticmethod
    def predict(u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """``max_k ⟨u_k, i_k⟩`` of aligned (K, P, d) users and items: (P,)."""
        return (u * i).sum(-1).max(0).values

    # ---- training -----------------------------------------------------------------------------
    def loss(self, batch):
        self._cache = None
        net = self.net_
        # r only for the step's users and items (their positions in these sorted ids index it)
        used = [p for b, p in enumerate(batch["pairs"]) if p.shape[1] and self.loss_weights_[b] != 0]
        u_ids = torch.unique(torch.cat([p[0] for p in used])) if used else torch.zeros(0, dtype=torch.long)
        i_ids = torch.unique(torch.cat([p[1:].reshape(-1) for p in used])) if used else u_ids
        users, items, _, kg = self.propagate(u_ids.cpu().numpy(), i_ids.cpu().numpy())
        total = users[0].new_zeros(())
        l2 = users[0].new_zeros(())
        for b, pairs in enumerate(batch["pairs"]):
            if pairs.shape[1] == 0 or self.loss_weights_[b] == 0:
                continue
            u, i, j = pairs
            ub = users[b][:, torch.searchsorted(u_ids, u)]
            diff = (self.predict(ub, items[b][:, torch.searchsorted(i_ids, i)])
                    - self.predict(ub, items[b][:, torch.searchsorted(i_ids, j)]))
            n_users = torch.unique(u).numel()
            total = total + self.loss_weights_[b] * F.relu(self.margin - diff).sum() / n_users
            l2 = l2 + (net.user.weight[u].pow(2).sum() + net.item.weight[i].pow(2).sum()
                       + net.item.weight[j].pow(2).sum()) / n_users
        if self.kg_weight > 0:
            for x, pairs in zip(kg, batch["kg"]):
                if pairs.shape[1]:
                    h, t, j = pairs
                    total = total + self.kg_weight * F.softplus((x[h] * x[j]).sum(-1) - (x[h] * x[t]).sum(-1)).mean()
        return total + self.reg * l2

    def _kg_pairs(self, r: int, rng: np.random.Generator) -> np.ndarray:
        """``(heads, related, random)`` (3, P) of relation ``r`` for ``batch_size`` random heads."""
        heads = self._kg_heads[r]
        if len(heads) == 0:
            return np.zeros((3, 0), dtype=np.int64)
        heads = rng.choice(heads, size=min(self.batch_size, len(heads)), replace=False)
        g = self.relation_graphs_[r]
        if self._kg_seen[r] is not None:
            return user_pairs(g, self._kg_seen[r], heads, self.n_samples, self.n_items_, rng)
        # an entity relation: head → one of its entities → one of the entity's items
        hh = np.repeat(heads, self.n_samples)
        deg = np.diff(g.indptr)[hh]
        ent = g.indices[g.indptr[hh] + (rng.random(len(hh)) * deg).astype(np.int64)]
        back = self._kg_back[r]
        d2 = np.diff(back.indptr)[ent]
        tail = back.indices[back.indptr[ent] + (rng.random(len(hh)) * d2).astype(np.int64)]
        neg = rng.integers(1, self.n_items_ + 1, size=len(hh))
        return np.stack([hh, tail.astype(np.int64), neg]).astype(np.int64)

    def n_train_batches(self, split):
        return -(-len(self._active) // self.batch_size)

    def train_batches(self, split, rng):
        for idx, r in self.epoch_batches(rng.permutation(len(self._active)), rng):
            users = self._active[idx]
            pairs = [torch.from_numpy(user_pairs(g, s, users, self.n_samples, self.n_items_, r, cap=False))
                     for g, s in zip(self.user_graphs_, self._seen)]
            kg = [torch.from_numpy(self._kg_pairs(k, r)) for k in range(len(self.relations_))] if self.kg_weight > 0 else []
            yield {"pairs": pairs, "kg": kg}

    # ---- scoring ------------------------------------------------------------------------------
    def item_table(self) -> tuple[list, list]:
        """Per behaviour the items' ``r^{b,·}`` and layer inputs of the current weights (cached)."""
        key = params_version(self.net_)
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                _, items, layers, _ = self.propagate()
            cache = self._cache = (key, items, layers)
        return cache[1], cache[2]

    def score(self, hist):
        """Scores (batch, n_items + 1) on the model's device: ``ŷ`` of the target behaviour."""
        items, layers = self.item_table()
        t = self.behaviors_.index(self.target_behavior_)
        with torch.no_grad():
            u = self.history_users(history_graphs(self, hist), layers)[t]  # (K, B, d)
            it = items[t]
            n_b, n_i = u.shape[1], it.shape[1]
            step = max(1, SCORE_CHUNK // max(1, n_b * self.n_interests))
            out = u.new_empty(n_b, n_i)
            for lo in range(0, n_i, step):
                hi = min(n_i, lo + step)
                out[:, lo:hi] = torch.einsum("kbd,knd->kbn", u, it[:, lo:hi]).max(0).values
        return out

    def protocol_notes(self) -> dict:
        return {"loss": "pairwise hinge per behaviour, summed with weights, plus bpr on knowledge pairs",
                "target_behavior": self.target_behavior_, "behaviors_used": list(self.behaviors_),
                "loss_weights": {b: w for b, w in zip(self.behaviors_, self.loss_weights_)},
                "knowledge_relations": {name: {"kind": kind, "triples": n} for name, kind, n in self.relations_},
                "interests": {"total": self.n_interests, "behaviour_specific": self.n_specific},
                "user_side": "rebuilt from the ranking-time history"}
