"""CIGF: compressed interaction graph convolution and a multi-expert network with separate inputs.

Guo, Meng, Yuan, He, Guo, Zhang, Chen, Hu, Tang, Li & Zhang, "Compressed Interaction Graph based
Framework for Multi-behavior Recommendation", WWW 2023 (authors' code: ``MC-CV/CIGF``).

Users and items have ego embeddings ``E⁰`` (``dim``). With behaviours ``k = 1..T`` (views, carts,
purchases...; the target is one of them), ``A_k`` is the user-item graph of behaviour ``k`` over
all nodes (users and items), left-normalised (``D_k⁻¹ A_k``: a node takes the mean of its
``k``-neighbours, as the authors' default ``normalization=left``).

* **Compressed interaction graph convolution (CIGCN).** One tower per behaviour ``b``, all
  starting from the shared ``E⁰``. Its first layer propagates on behaviour ``b``'s graph only,
  ``h¹ = A_b E⁰``; every further layer ``l = 2..L`` propagates on every behaviour's graph at once,
  each node weighting the behaviours with its own **node-wise** weights computed from its ego
  embedding, ``α^{b,l}(v) = LeakyReLU(W_{b,l} e⁰_v + c_{b,l}) ∈ ℝ^T``:
  ``h^l_v = Σ_k α^{b,l}_k(v) (A_k h^{l-1})_v``. Unrolled, ``h^L`` sums over every chain of
  behaviours ``(b, k_2, ..., k_L)`` along the paths of the multiplex graph, each path weighted by
  the product of the weights of the nodes it passes: the instance-level high-order relations of
  the paper, whose ``T^{L-1}`` behaviour chains are *compressed* into one graph per layer (the
  node-wise weighted sum of the behaviour graphs) instead of being enumerated. Residual layers
  ``e^l = e^{l-1} + h^l`` (``e⁰ = E⁰``) are read out by their sum, ``E^b = Σ_{l=0..L} e^l``
  (LightGCN encoder: no transformation, no non-linearity, the authors' default).
* **Multi-expert with separate input (MESI).** Each behaviour is a task. Expert ``k`` sees only
  tower ``k``'s representations, ``f_k(u, i) = e^k_u ⊙ e^k_i``; the gate of task ``t`` sees only
  tower ``t``'s, ``g_t(u, i) = softmax(G_t [e^t_u ‖ e^t_i] + c_t) ∈ ℝ^T``; the tower of task ``t``
  sums the mixed expert, ``ŷ_t(u, i) = Σ_k g_{t,k}(u, i) ⟨e^k_u, e^k_i⟩``. The **target
  behaviour's task gives the ranking score**.

Training: every behaviour is a task with its own BPR loss. An epoch visits every user with a
training row once, ``batch_size`` users a step; for each behaviour ``k``, each of the step's users
with ``k``-rows gets ``min(n_samples, n_k(u))`` positive items drawn with replacement from them
and as many negatives drawn uniformly among the items they have no ``k``-row with (the authors'
sampler, ``sampNum=40``). The loss is ``Σ_k λ_k mean softplus(ŷ_k(u, j) - ŷ_k(u, i))`` plus
``reg`` times the L2 norm of the ego embeddings of the step's pairs (per pair). The weights
``λ_k`` are ``loss_weights`` (a mapping behaviour → weight); by default **every behaviour
weighs 1**, as the authors' code (which sums the behaviours' BPR losses unweighted). The graph is
the whole training graph every step (the authors' default ``multi_graph=True``).

Ranking time: the item side (every tower, every layer) comes from the training graph; the user
side is **rebuilt from the history** the evaluator gives (:attr:`Histories.behaviors`), with the
propagation rules above applied to the user's rows: ``h¹_u = mean_{i ∈ H_b(u)} e⁰_i``,
``h^l_u = Σ_k α^{b,l}_k(u) mean_{i ∈ H_k(u)} h^{l-1}_{b,i}`` (``H_k(u)``: the history's items of
behaviour ``k``; ``h^{l-1}_{b,i}``: item ``i``'s value in tower ``b`` from the training graph),
``E^b_u = Σ_l (e⁰_u + h¹_u + ... + h^l_u)``. A user whose history is their training rows gets
exactly their training-time representation; later views, carts and purchases change it. The user
ego embedding ``e⁰_u`` (transductive, as the paper) stays for known users; a user unknown at
training time (``-1``) has a zero ego embedding and is represented by their history alone. A
history without behaviours counts every row as the most frequent training behaviour, except that
a known user's training rows are used instead.

Deviations from the paper and design choices its text leaves open:

* the node-wise behaviour weights are ``LeakyReLU`` (slope 0.1) of a linear map of the ego
  embedding, not normalised over the behaviours, as the authors' code (``attention_<b>_<l>``);
* the gate of each task has its own weights (the authors' code shares one gate matrix between the
  tasks, each task feeding it its own tower's representations); the tower is the plain sum of the
  mixed expert's coordinates, as the authors' code;
* the authors initialise the embedding tables with Xavier (very small values on large tables)
  and multiply every score by ``mult=300``; we start from N(0, 0.1²) and use no multiplier;
  the L2 term is on the ego embeddings of the step's pairs rather than on every table and
  layer; the authors decay the learning rate by 0.96 every ``trnNum // batch`` = 39 updates of
  256 users (every 10,000 users trained, whatever the data set's size), as the YAML defaults do
  (``lr_schedule=step``, ``lr_step_unit=update``, ``lr_step=39``, ``lr_gamma=0.96``; decaying per
  epoch instead decays too slowly on large sets and too fast on small ones);
* the graph used during training includes the pair being scored (as the authors' code: no edge
  is left out), and each epoch visits every user with a training row once (the authors draw
  ``trnNum=10000`` users an epoch);
* the encoder is LightGCN's (the authors' code also offers GCN, NGCF and LR-GCCF layers) and the
  number of experts is the number of behaviours (the paper's MESI has one expert per behaviour).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.graph.propagation import sparse_mm, to_torch, torch_pair
from recforge.models.multibehavior.base import (BehaviorAware, behavior_graphs, history_graphs, params_version, row_mean,
                                                softmax_parts)
from recforge.models.torch_base import TorchRecommender
from recforge.training.samplers import SeenPairs, sample_negatives

#: negative slope of the authors' LeakyReLU
LEAKY = 0.1
#: scoring works on at most this many (user, item, behaviour) values at a time
SCORE_CHUNK = 1 << 24


# ---- shared with CKML ---------------------------------------------------------------------------
def parse_loss_weights(weights, behaviors: list[str], default: float, model: str) -> list[float]:
    """Per behaviour (in ``behaviors`` order) the weight of its loss: ``weights`` (a mapping
    behaviour → weight, or None) where given, ``default`` elsewhere."""
    if weights is None:
        return [float(default)] * len(behaviors)
    if not isinstance(weights, dict):
        raise ConfigError(f"{model}: loss_weights must map behaviours to weights, e.g. "
                          "loss_weights={view: 1.0, cart: 1.0, buy: 1.0}; got " + repr(weights))
    unknown = sorted(set(map(str, weights)) - set(behaviors))
    if unknown:
        raise ConfigError(f"{model}: loss_weights names {', '.join(unknown)}, not a behaviour of the training part "
                          f"({', '.join(behaviors)})")
    out = [float(weights.get(b, default)) for b in behaviors]
    if any(w < 0 or not math.isfinite(w) for w in out) or not any(w > 0 for w in out):
        raise ConfigError(f"{model}: loss_weights must be finite, >= 0, and one of them > 0; got {weights}")
    return out


def user_pairs(r: sp.csr_matrix, seen: SeenPairs, users: np.ndarray, n: int, n_items: int,
               rng: np.random.Generator, cap: bool = True) -> np.ndarray:
    """``(users, positives, negatives)`` (3, P) for the ``users`` with a row in ``r`` (binary
    users x items CSR): each gets ``min(n, its row count)`` (``cap``) or ``n`` positives drawn with
    replacement from its row, and as many negatives drawn uniformly among the items not in it."""
    deg = np.diff(r.indptr)[users]
    users = users[deg > 0]
    deg = deg[deg > 0]
    if len(users) == 0:
        return np.zeros((3, 0), dtype=np.int64)
    cnt = np.minimum(deg, n) if cap else np.full(len(users), n)
    uu = np.repeat(users, cnt)
    pos = r.indices[np.repeat(r.indptr[users], cnt) + (rng.random(len(uu)) * np.repeat(deg, cnt)).astype(np.int64)]
    neg = sample_negatives(seen, uu, 1, n_items, rng)[:, 0]
    return np.stack([uu, pos.astype(np.int64), neg]).astype(np.int64)


# ---- the model ----------------------------------------------------------------------------------
class CIGF(BehaviorAware, TorchRecommender):
    name = "cigf"

    def __init__(self, dim: int = 32, n_layers: int = 2, n_samples: int = 40, loss_weights: dict | None = None,
                 reg: float = 1e-4, threads: int | None = None, **train):
        super().__init__(**train)
        if dim <= 0 or n_layers < 1 or n_samples < 1 or reg < 0:
            raise ConfigError("cigf: need dim > 0, n_layers >= 1, n_samples >= 1 and reg >= 0")
        if loss_weights is not None and not isinstance(loss_weights, dict):
            raise ConfigError("cigf: loss_weights must map behaviours to weights, e.g. "
                              "loss_weights={view: 1.0, cart: 1.0, buy: 1.0}")
        self.dim, self.n_layers, self.n_samples, self.loss_weights = dim, n_layers, n_samples, loss_weights
        self.reg, self.threads = reg, threads

    # ---- graphs -------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        target, behaviors, default = self.adopt_behaviors(split)
        self.loss_weights_ = parse_loss_weights(self.loss_weights, behaviors, 1.0, self.name)
        #: per behaviour: binary users x items of the training part
        users, _, _, self.user_graphs_ = behavior_graphs(split, behaviors, target, self.name)
        self._active = np.unique(users)
        self._seen = [SeenPairs(r) for r in self.user_graphs_]
        self._graphs = self._cache = None

    def graphs(self) -> list[dict]:
        """Per behaviour: the left-normalised user → item and item → user blocks of ``A_k``, each
        with its transpose (torch sparse CSR on the model's device), built on first use."""
        g = getattr(self, "_graphs", None)
        if g is None:
            dev = self.device_
            g = self._graphs = [{"ui": torch_pair(row_mean(r), dev), "iu": torch_pair(row_mean(sp.csr_matrix(r.T)), dev)}
                                for r in self.user_graphs_]
        return g

    def on_device(self, device: torch.device) -> None:
        super().on_device(device)
        self._graphs = self._cache = None

    def build(self, n_users, n_items):
        d, t, L = self.dim, len(self.behaviors_), self.n_layers
        net = nn.Module()
        net.user = nn.Embedding(n_users, d)
        net.item = nn.Embedding(n_items + 1, d)
        for emb in (net.user, net.item):
            nn.init.normal_(emb.weight, std=0.1)
        with torch.no_grad():
            net.item.weight[0].zero_()
        # node-wise behaviour weights of tower b at layer l = 2..L (index l - 2)
        net.att = nn.ModuleList(nn.ModuleList(nn.Linear(d, t) for _ in range(L - 1)) for _ in range(t))
        net.gate = nn.ModuleList(nn.Linear(2 * d, t) for _ in range(t))  # one gate per task
        for lin in [*(a for tower in net.att for a in tower), *net.gate]:
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        return net

    # ---- CIGCN ----------------------------------------------------------------------------------
    def node_weights(self, b: int, layer: int, ego: torch.Tensor) -> torch.Tensor:
        """``α^{b,l}`` (n, T) of nodes with ego embeddings ``ego`` (``layer`` >= 2)."""
        return F.leaky_relu(self.net_.att[b][layer - 2](ego), LEAKY)

    def towers(self) -> tuple[list, list, list]:
        """Per tower ``b``: users ``E^b`` (n_users, d), items ``E^b`` (n_items + 1, d), and the items'
        ``h⁰..h^{L-1}`` (what a user's layers read at ranking time), over the training graph."""
        g, net = self.graphs(), self.net_
        eu0, ei0 = net.user.weight, net.item.weight
        users, items, item_layers = [], [], []
        for b in range(len(g)):
            hu, hi = sparse_mm(g[b]["ui"], ei0), sparse_mm(g[b]["iu"], eu0)
            hist_i = [ei0]
            acc_u, acc_i = eu0 + hu, ei0 + hi
            out_u, out_i = eu0 + acc_u, ei0 + acc_i
            for layer in range(2, self.n_layers + 1):
                hist_i.append(hi)
                au, ai = self.node_weights(b, layer, eu0), self.node_weights(b, layer, ei0)
                hu, hi = (sum(au[:, k : k + 1] * sparse_mm(gk["ui"], hi) for k, gk in enumerate(g)),
                          sum(ai[:, k : k + 1] * sparse_mm(gk["iu"], hu) for k, gk in enumerate(g)))
                acc_u, acc_i = acc_u + hu, acc_i + hi
                out_u, out_i = out_u + acc_u, out_i + acc_i
            users.append(out_u)
            items.append(out_i)
            item_layers.append(hist_i)
        return users, items, item_layers

    def history_towers(self, ego: torch.Tensor, mats: list[torch.Tensor], item_layers: list) -> list[torch.Tensor]:
        """Per tower, ``E^b_u`` of a batch from the ego embeddings ``ego`` (batch, d) and the
        row-mean history matrices ``mats`` (per behaviour, batch x items, torch sparse)."""
        out = []
        for b in range(len(mats)):
            hu = mats[b] @ item_layers[b][0]
            acc = ego + hu
            total = ego + acc
            for layer in range(2, self.n_layers + 1):
                a = self.node_weights(b, layer, ego)
                hu = sum(a[:, k : k + 1] * (m @ item_layers[b][layer - 1]) for k, m in enumerate(mats))
                acc = acc + hu
                total = total + acc
            out.append(total)
        return out

    # ---- MESI -----------------------------------------------------------------------------------
    def mesi(self, task: int, users: list[torch.Tensor], items: list[torch.Tensor]) -> torch.Tensor:
        """``ŷ_task`` of aligned (P, d) user and item representations per tower: (P,)."""
        experts = torch.stack([(u * i).sum(-1) for u, i in zip(users, items)], -1)
        gate = torch.softmax(self.net_.gate[task](torch.cat([users[task], items[task]], -1)), -1)
        return (gate * experts).sum(-1)

    def mesi_all(self, task: int, users: list[torch.Tensor], items: list[torch.Tensor]) -> torch.Tensor:
        """``ŷ_task`` of every (user, item): users (B, d) and items (N, d) per tower → (B, N), the
        item axis in chunks so that no (B, chunk, T) tensor exceeds :data:`SCORE_CHUNK` values."""
        lin = self.net_.gate[task]
        d = users[task].shape[1]
        gu = (users[task] @ lin.weight[:, :d].T + lin.bias).T.contiguous()  # (T, B)
        gi = (items[task] @ lin.weight[:, d:].T).T.contiguous()  # (T, N)
        n_b, n_i, t = users[0].shape[0], items[0].shape[0], len(users)
        step = max(1, SCORE_CHUNK // max(1, n_b * t))
        out = users[0].new_empty(n_b, n_i)
        for lo in range(0, n_i, step):
            hi = min(n_i, lo + step)
            gate = softmax_parts([gu[k, :, None] + gi[k, None, lo:hi] for k in range(t)])  # T x (B, chunk)
            out[:, lo:hi] = sum(g * (u @ i[lo:hi].T) for g, u, i in zip(gate, users, items))
        return out

    # ---- training -------------------------------------------------------------------------------
    def loss(self, batch):
        self._cache = None
        net = self.net_
        users, items, _ = self.towers()
        total = users[0].new_zeros(())
        l2, n_pairs = users[0].new_zeros(()), 0
        for t, pairs in enumerate(batch["pairs"]):
            if pairs.shape[1] == 0 or self.loss_weights_[t] == 0:
                continue
            u, i, j = pairs
            pos = self.mesi(t, [x[u] for x in users], [x[i] for x in items])
            neg = self.mesi(t, [x[u] for x in users], [x[j] for x in items])
            total = total + self.loss_weights_[t] * F.softplus(neg - pos).mean()
            l2 = l2 + net.user.weight[u].pow(2).sum() + net.item.weight[i].pow(2).sum() + net.item.weight[j].pow(2).sum()
            n_pairs += pairs.shape[1]
        return total + self.reg * l2 / max(n_pairs, 1)

    def n_train_batches(self, split):
        return -(-len(self._active) // self.batch_size)

    def train_batches(self, split, rng):
        for idx, r in self.epoch_batches(rng.permutation(len(self._active)), rng):
            users = self._active[idx]
            yield {"pairs": [torch.from_numpy(user_pairs(g, s, users, self.n_samples, self.n_items_, r))
                             for g, s in zip(self.user_graphs_, self._seen)]}

    # ---- scoring --------------------------------------------------------------------------------
    def item_table(self) -> tuple[list, list]:
        """Per tower the items' ``E^b`` and ``h⁰..h^{L-1}`` of the current weights (cached)."""
        key = params_version(self.net_)
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                _, items, layers = self.towers()
            cache = self._cache = (key, items, layers)
        return cache[1], cache[2]

    def score(self, hist):
        """Scores (batch, n_items + 1) on the model's device: the target task of MESI."""
        dev = self.device_
        items, layers = self.item_table()
        mats = [to_torch(row_mean(m), dev) for m in history_graphs(self, hist)]
        users = torch.from_numpy(np.asarray(hist.users, dtype=np.int64)).to(dev)
        known = (users >= 0) & (users < self.n_users_)
        with torch.no_grad():
            ego = self.net_.user.weight[users.clamp(0, self.n_users_ - 1)] * known.unsqueeze(1)
            u = self.history_towers(ego, mats, layers)
            return self.mesi_all(self.behaviors_.index(self.target_behavior_), u, items)

    def protocol_notes(self) -> dict:
        return {"loss": "bpr per behaviour, summed with weights (MESI tasks)", "target_behavior": self.target_behavior_,
                "behaviors_used": list(self.behaviors_),
                "loss_weights": {b: w for b, w in zip(self.behaviors_, self.loss_weights_)},
                "graph": f"per behaviour, left-normalised; {self.n_layers} layer(s), node-wise behaviour weights",
                "user_side": "rebuilt from the ranking-time history (ego embedding kept for known users)"}
