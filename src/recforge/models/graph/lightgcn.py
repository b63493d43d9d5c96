"""LightGCN: simplified graph convolution for collaborative filtering.

He, Deng, Wang, Li, Zhang & Wang, "LightGCN: Simplifying and Powering Graph Convolution
Network for Recommendation", SIGIR 2020.

Ego embeddings ``E_0`` of users and items are propagated ``n_layers`` times over the
symmetric-normalised user-item adjacency ``D^-1/2 A D^-1/2`` of the training interactions, with
no weight matrices and no non-linearity, and the layers are combined by their mean
(``α_k = 1 / (K + 1)``). The score of (u, i) is the dot product of the propagated embeddings.
The adjacency is built once from the training matrix (SciPy → torch sparse CSR) and is part of
the saved model, so a loaded model scores without the data. ``n_layers=0`` is plain matrix
factorisation with the same losses (``mf``).

Training: for every training pair (each once per epoch, shuffled) a negative item the user has
not interacted with, BPR loss on the propagated embeddings, and L2 on the *ego* embeddings of the
batch as in the paper, ``reg * ½ (‖e_u‖² + ‖e_i‖² + ‖e_j‖²) / batch``. Options:

* ``loss=cpr``: cross pairwise ranking (Wan et al. 2022, see
  :mod:`recforge.training.graph_losses`) on groups of ``cpr_k`` training pairs instead of BPR;
  ``cpr_reduce=mean`` (default) averages the ``k`` matched and the ``k`` crossed scores as the
  authors' code does (``tf.reduce_mean([inner_product(u, i) for u, i in zip(u_list, i_list)],
  axis=0)`` in ``Qcactus/CPR``, ``recq/recommenders/cpr.py``), ``sum`` adds them (a ``k`` times
  larger logit; this library's behaviour before);
* ``neg_sampler``: ``uniform`` (default), ``popularity`` (probability ∝ count^``pop_alpha``) or
  ``hard`` (dynamic negative sampling: ``hard_pool`` uniform candidates, the one the current
  model scores highest is the negative; scored from the embeddings of the same step, no extra
  propagation).

``threads`` sets PyTorch's intra-op threads during fit (None: PyTorch's default).

Initialisation: N(0, 0.1²) (``init=normal``, as the authors' PyTorch code) or Xavier uniform
(``init=xavier``, as their TensorFlow code).

``pair_sampling``: ``pairs`` (default) visits every training pair once per epoch, shuffled;
``user`` follows the authors' code: each of the epoch's ``n_pairs`` samples draws a user uniformly
among the users with training items, then one of that user's items uniformly, so every user
weighs the same in the loss whatever their activity (the metrics average over users too).

Deviations: with the default ``pair_sampling=pairs`` an active user weighs in the loss in
proportion to their number of training items, where the paper's code weighs users equally.
Users unknown at training time (a raw history, user ``-1``) are folded in as the mean of the
*propagated* embeddings of their history items. The propagated embeddings are cached for scoring
and recomputed whenever a parameter has changed (an optimiser step, restoring weights, loading).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from recforge.errors import ConfigError
from recforge.models.graph.propagation import normalized_adjacency, propagate, split_nodes, to_torch
from recforge.models.torch_base import TorchRecommender
from recforge.training.graph_losses import CPR_REDUCTIONS, bpr_loss, cpr_loss, cross_items, sample_cpr_groups
from recforge.training.samplers import (SeenPairs, popularity_weights, sample_negatives,
                                        select_hardest)

LOSSES = ("bpr", "cpr")
SAMPLERS = ("uniform", "popularity", "hard")
PAIR_SAMPLING = ("pairs", "user")
INITS = ("normal", "xavier")


class LightGCN(TorchRecommender):
    name = "lightgcn"
    #: mean over E_0..E_K (LightGCN) or over E_1..E_K only
    include_ego = True

    def __init__(self, dim: int = 64, n_layers: int = 3, reg: float = 1e-4, loss: str = "bpr",
                 cpr_k: int = 2, cpr_reduce: str = "mean", neg_sampler: str = "uniform", pop_alpha: float = 0.75,
                 hard_pool: int = 10,
                 init: str = "normal", pair_sampling: str = "pairs", threads: int | None = None, **train):
        super().__init__(**train)
        if loss not in LOSSES:
            raise ConfigError(f"loss={loss!r}: choose one of {', '.join(LOSSES)}")
        if cpr_reduce not in CPR_REDUCTIONS:
            raise ConfigError(f"cpr_reduce={cpr_reduce!r}: choose one of {', '.join(CPR_REDUCTIONS)}")
        if neg_sampler not in SAMPLERS:
            raise ConfigError(f"neg_sampler={neg_sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if loss == "cpr" and neg_sampler != "uniform":
            raise ConfigError("loss=cpr draws its own cross pairs; leave neg_sampler=uniform")
        if init not in INITS:
            raise ConfigError(f"init={init!r}: choose one of {', '.join(INITS)}")
        if pair_sampling not in PAIR_SAMPLING:
            raise ConfigError(f"pair_sampling={pair_sampling!r}: choose one of {', '.join(PAIR_SAMPLING)}")
        if n_layers < 0 or dim <= 0 or cpr_k < 2 or hard_pool < 1:
            raise ConfigError("need n_layers >= 0, dim > 0, cpr_k >= 2 and hard_pool >= 1")
        self.dim, self.n_layers, self.reg, self.loss_type = dim, n_layers, reg, loss
        self.cpr_k, self.cpr_reduce, self.neg_sampler = cpr_k, cpr_reduce, neg_sampler
        self.pop_alpha, self.hard_pool = pop_alpha, hard_pool
        self.init, self.pair_sampling, self.threads = init, pair_sampling, threads

    # ``loss`` is also the name of the training-step method, so the value lives in loss_type
    def get_params(self) -> dict:
        params = super().get_params()
        params["loss"] = self.loss_type
        return params

    # ---- graph ------------------------------------------------------------------------------
    def graph_matrix(self, split) -> sp.csr_matrix:
        """The training graph: the binary user x item matrix of the training part."""
        return split.train_matrix

    def prepare_fit(self, split) -> None:
        self.graph_ = self.graph_matrix(split).tocsr()
        self._adj = None
        self._cache = None
        ip = self.graph_.indptr  # pairs in CSR order (epoch_order relies on it)
        rows = np.repeat(np.arange(self.graph_.shape[0]), np.diff(ip))
        self._pairs = np.stack([rows, self.graph_.indices], 1).astype(np.int64)
        self._seen = SeenPairs(self.graph_)
        if self.neg_sampler == "popularity":
            counts = np.asarray(self.graph_.sum(0)).ravel()
            self._pop = popularity_weights(counts, self.pop_alpha)
        else:
            self._pop = None

    def adjacency(self) -> torch.Tensor:
        """The normalised training adjacency, built on first use on the model's device."""
        adj = getattr(self, "_adj", None)
        if adj is None:
            adj = self._adj = to_torch(normalized_adjacency(self.graph_), self.device_)
        return adj

    def on_device(self, device: torch.device) -> None:
        """Move the adjacency (and the cached propagated embeddings) to ``device``."""
        super().on_device(device)
        if getattr(self, "_adj", None) is not None:
            self._adj = self._adj.to(device)
        self._cache = None

    def build(self, n_users, n_items):
        net = nn.Module()
        net.user = nn.Embedding(n_users, self.dim)
        net.item = nn.Embedding(n_items + 1, self.dim)
        for emb in (net.user, net.item):
            if self.init == "xavier":
                nn.init.xavier_uniform_(emb.weight)
            else:
                nn.init.normal_(emb.weight, std=0.1)
        with torch.no_grad():
            net.item.weight[0].zero_()
        return net

    def ego(self) -> torch.Tensor:
        return torch.cat([self.net_.user.weight, self.net_.item.weight], 0)

    def propagate(self, adj: torch.Tensor | None = None, noise_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Propagated (users, items) embeddings over ``adj`` (default: the training graph)."""
        e = propagate(self.adjacency() if adj is None else adj, self.ego(), self.n_layers,
                      include_ego=self.include_ego, noise_eps=noise_eps)
        return split_nodes(e, self.n_users_)

    # ---- batches ------------------------------------------------------------------------------
    def n_train_batches(self, split):
        return -(-len(self._pairs) // self.batch_size)

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        """Indices into the training pairs for one epoch (``pair_sampling``)."""
        n = len(self._pairs)
        if self.pair_sampling == "pairs" or n == 0:
            return rng.permutation(n)
        ip = self.graph_.indptr  # the pairs are in CSR order: user u's are ip[u]..ip[u+1]-1
        deg = np.diff(ip)
        active = np.flatnonzero(deg > 0)
        users = active[rng.integers(0, len(active), n)]
        return ip[users] + np.floor(rng.random(n) * deg[users]).astype(np.int64)

    def train_batches(self, split, rng):
        for idx, r in self.epoch_batches(self.epoch_order(rng), rng):
            yield self.make_batch(idx, r)

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict:
        if self.loss_type == "cpr":
            users, items = sample_cpr_groups(self._pairs, idx, self.cpr_k, self._seen, rng)
            return {"users": torch.from_numpy(users), "items": torch.from_numpy(items),
                    "cross": torch.from_numpy(cross_items(items))}
        p = self._pairs[idx]
        n = self.hard_pool if self.neg_sampler == "hard" else 1
        neg = sample_negatives(self._seen, p[:, 0], n, self.n_items_, rng, popularity=self._pop)
        return {"u": torch.from_numpy(p[:, 0]), "i": torch.from_numpy(p[:, 1]), "j": torch.from_numpy(neg)}

    # ---- loss -----------------------------------------------------------------------------------
    def loss(self, batch):
        self._cache = None
        users, items = self.propagate()
        return self.rank_loss(batch, users, items) + self.extra_loss(batch)

    def rank_loss(self, batch: dict, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """BPR or CPR on the propagated embeddings, plus L2 on the batch's ego embeddings."""
        w_u, w_i = self.net_.user.weight, self.net_.item.weight
        if "cross" in batch:
            u, i, c = batch["users"], batch["items"], batch["cross"]
            if u.numel() == 0:
                return (w_u.sum() + w_i.sum()) * 0.0
            eu = users[u]
            main = cpr_loss((eu * items[i]).sum(-1), (eu * items[c]).sum(-1), self.cpr_reduce)
            l2 = w_u[u].pow(2).sum() + w_i[i].pow(2).sum()
            return main + self.reg * 0.5 * l2 / u.numel()
        u, i, j = batch["u"], batch["i"], batch["j"]
        eu = users[u]
        if j.shape[1] > 1:  # hard negatives: the best-scored candidate of the pool
            with torch.no_grad():
                pool_scores = torch.einsum("bd,bkd->bk", eu, items[j])
            j = select_hardest(j, pool_scores, 1)
        j = j[:, 0]
        main = bpr_loss((eu * items[i]).sum(-1), (eu * items[j]).sum(-1))
        l2 = w_u[u].pow(2).sum() + w_i[i].pow(2).sum() + w_i[j].pow(2).sum()
        return main + self.reg * 0.5 * l2 / len(u)

    def extra_loss(self, batch: dict) -> torch.Tensor | float:
        """Hook for auxiliary losses of subclasses (contrastive views, negative links)."""
        return 0.0

    # ---- scoring --------------------------------------------------------------------------------
    def _version(self) -> tuple:
        return tuple((id(p), p._version) for p in self.net_.parameters())

    def scoring_tables(self) -> tuple[torch.Tensor, ...]:
        """``(users, items, *extra)`` that scoring reads, from the current weights (called without
        gradient, cached by :meth:`cached_tables`): the propagated embeddings. A model whose
        scoring tables are made otherwise (denoised, sampled) overrides this alone."""
        users, items = self.propagate()
        return users.detach(), items.detach()

    def cached_tables(self) -> tuple[torch.Tensor, ...]:
        """:meth:`scoring_tables`, computed once per version of the weights."""
        key = self._version()
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = self._cache = (key, *self.scoring_tables())
        return cache[1:]

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Propagated (users, items) embeddings of the current weights, cached until a parameter
        changes."""
        users, items = self.cached_tables()[:2]
        return users, items

    def score(self, hist):
        """Scores (batch, n_items + 1) on the model's device."""
        users_e, items_e = self.final_embeddings()
        users = torch.from_numpy(np.asarray(hist.users, dtype=np.int64)).to(items_e.device)
        known = (users >= 0) & (users < self.n_users_)
        u = users_e[users.clamp(min=0, max=self.n_users_ - 1)]
        if not bool(known.all()):
            m = hist.matrix
            counts = np.maximum(np.asarray(m.sum(1)).ravel(), 1).astype(np.float32)
            fold = torch.from_numpy((m @ items_e.cpu().numpy()) / counts[:, None]).float().to(items_e.device)
            u = torch.where(known.unsqueeze(1), u, fold)
        return u @ items_e.T

    def protocol_notes(self) -> dict:
        notes = {"loss": self.loss_type, "neg_sampler": self.neg_sampler,
                 "graph": "training interactions only (user-item bipartite, symmetric normalisation)"}
        if self.loss_type == "cpr":
            notes["cpr"] = f"k={self.cpr_k}, {self.cpr_reduce} of the matched and of the crossed scores"
        return notes
