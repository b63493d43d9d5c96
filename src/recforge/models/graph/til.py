"""TIL: triplet importance learning for BPR-trained MF and LightGCN.

Wu, Ma, Zhang, Liu, Tang & Coates, "Adapting Triplet Importance of Implicit Feedback for
Personalized Recommendation", CIKM 2022 (arXiv 2208.01709).

BPR treats every training triplet (u, i, j) (user, positive item, sampled negative item) alike.
TIL gives each triplet an importance weight ``w_uij`` produced by a small network, the importance
generator ``g_φ``, and learns ``φ`` by bilevel optimisation:

* inner problem: the recommender's parameters ``θ`` minimise the weighted BPR loss
  ``Σ w_uij · (−log σ(ŷ_ui − ŷ_uj)) / B`` (plus LightGCN's L2 on the batch's ego embeddings);
* outer problem: ``φ`` minimises an unweighted BPR loss on *meta* triplets, measured with the
  parameters ``θ'(φ)`` that the inner problem would reach.

The inner argmin is approximated, as in the authors' code, by a one-step look-ahead:
``θ' = θ − α ∇_θ L_in(θ, φ)`` (``α = meta_step``), kept differentiable in ``φ``; the meta gradient
``∂L_out(θ') / ∂φ`` (a second-order term) updates the generator with its own optimiser. Every
training step is therefore: (1) look-ahead and generator update, (2) weights from the updated
generator, treated as constants, (3) the recommender's step on the weighted loss by the shared
trainer (the order of meta-weight-net, Shu et al. 2019).

The recommender is :class:`~recforge.models.graph.lightgcn.LightGCN` (``n_layers=3`` by default);
``n_layers=0`` is BPR-MF, so ``til n_layers=0`` is TIL on MF. The generator reads the *propagated*
embeddings the score uses (the ego embeddings when ``n_layers=0``); the authors' graph code
computes both and the released part does not show which it feeds the generator.

Importance generators (``generator``), the paper's two strategies:

* ``ui``: the **uni-interest** strategy (TIL-UI). A user's interest is one centre ``c_u``, the mean
  embedding of the user's training items. The generator's input is
  ``[e_u⊙e_i + c_u⊙e_i ; e_u⊙e_j + c_u⊙e_j]`` (element-wise products, 2·dim features);
* ``mi``: the **multi-interest** strategy (TIL-MI). The items are clustered by k-means on their
  embeddings into ``n_clusters`` interests, re-clustered every ``cluster_every`` epochs; an item's
  interest centre ``c_i`` is the mean embedding of its cluster, recomputed from the current
  embeddings at every step. Input: ``[e_u⊙e_i + e_u⊙c_i + e_i⊙c_i ; e_u⊙e_j + e_u⊙c_j + e_j⊙c_j]``.

Both feed an MLP ``Linear(2·dim, hidden) → ReLU → Linear(hidden, 1, no bias) → softplus`` (so every
score is positive), and the scores of a batch are normalised to mean 1 (they sum to the batch
size), so the weights move importance between triplets without changing the loss scale.

Meta data (``meta_data``), never the test part:

* ``valid`` (default): the validation part's targets (what the split holds out for validation;
  leave-one-out: each user's second-to-last item) are the meta positives. The recommender never
  trains on them, only the generator's outer loss reads them; each step's meta batch is
  ``batch_size`` of them drawn uniformly with replacement, each with a fresh uniform negative the
  user has neither in training nor as a validation target. Early stopping reads the same
  validation part, so for a TIL run the validation metric is not an independent estimate (the
  test part stays untouched). A split without a validation part stops with a message;
* ``holdout``: before training, a share ``meta_ratio`` of each user's training pairs (users with
  at least two; at least one pair always stays in the inner problem; the count is rounded at
  random so the expected share is ``meta_ratio``) is held out, drawn with the model's seed. The
  held-out pairs are removed from the inner triplets *and* from the propagation graph (the graph
  the model keeps and scores with) and are never drawn as negatives; meta batches as above;
* ``batch``: the authors' released code: the outer loss is the unweighted BPR of the *same*
  batch's triplets after the look-ahead step.

Choices the paper leaves open and deviations:

* the paper's exact outer data set could not be checked against its text here; the released code
  (``haolun-wu/TIL``, ``main_MF.py``) measures the outer loss on the training batch itself
  (``meta_data=batch``). We default to the validation part: on a task with corrupted training
  positives (``tests/test_graph_til.py``) only a meta set cleaner than the training part lets the
  generator tell corrupted triplets from clean ones. With ``batch`` the generator learns to
  upweight the high-loss (here: corrupted) triplets, like hard-example mining; with ``holdout``
  the meta pairs are as corrupted as the training pairs and the result is mixed;
* generator sizes and features follow the authors' code: hidden 64, ReLU, bias-free output layer,
  softplus; the uni-interest input is their ``state 12`` and the multi-interest input their
  ``state 19`` (``main_MF.py``, ``main_MF_cluster.py``); 20 clusters re-clustered every 10 epochs as
  their defaults. Their multi-interest code also waits 100 epochs of plain BPR before reweighting;
  here reweighting starts at once (the first clustering is of the initial embeddings). Their
  optional centre terms in the score (``scale1``, default 0) are not implemented;
* the generator's features are detached: the generator is trained only through the outer loss
  and the recommender only through the weighted inner loss. In the authors' code the recommender
  also receives gradients through the weights' features and from the outer loss; we read that
  as incidental;
* batch normalisation of the scores keeps the gradient through the sum (their ``norm`` option
  divides by a detached sum; their default ``raw`` does not normalise at all);
* the look-ahead is plain SGD with ``meta_step`` on the mean-reduced inner loss (the authors':
  1e-3 on a loss summed over 5,000 triplets, i.e. 5 on the mean). The generator's optimiser is
  AdamW (``meta_lr`` 1e-3 and ``meta_wd`` 0.1 as their Adam's ``lr2``/``wd2``, but the decay is
  decoupled, because the meta gradient's scale depends on how the losses are reduced and a
  coupled L2 of 0.1 would swamp it here);
* negatives are LightGCN's (``uniform`` or ``popularity``; ``hard`` and ``loss=cpr`` are refused:
  TIL weighs BPR triplets). The authors' code draws negatives from a pool of 500 per user
  refreshed every 10 epochs; ours are fresh each step.

Known behaviour: on the corrupted-positives task of the tests, TIL on MF keeps corrupted
triplets below clean ones throughout training (both generators, several seeds), while on LightGCN
the separation appears first and, for some seeds, reverses late in training (the generator then
upweights the high-loss triplets), although the look-ahead gradient still favours the clean ones;
early stopping on validation usually keeps the earlier weights.

Users unknown at training time are folded in from their history items as in LightGCN (the
generator only acts in training). Cost: three to four LightGCN steps per step (a second
propagation for the look-ahead and a second-order backward through both).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.graph.lightgcn import LightGCN
from recforge.models.graph.propagation import propagate, split_nodes, to_torch
from recforge.training.samplers import SeenPairs, sample_negatives

GENERATORS = ("ui", "mi")
GENERATOR_NAMES = {"ui": "uni-interest (TIL-UI)", "mi": "multi-interest (TIL-MI)"}
META_DATA = ("valid", "holdout", "batch")


def holdout_pairs(r: sp.csr_matrix, ratio: float, rng: np.random.Generator) -> tuple[sp.csr_matrix, np.ndarray]:
    """Split the training matrix ``r`` into the inner matrix and held-out ``(user, item)`` pairs:
    ``floor(ratio · n_u + U)`` pairs of each user with ``n_u >= 2`` pairs (``U`` uniform), at most
    ``n_u − 1``."""
    r = r.tocsr().astype(np.float32)
    r.sort_indices()
    ip = r.indptr
    deg = np.diff(ip)
    rows = np.repeat(np.arange(r.shape[0]), deg)
    k = np.floor(ratio * deg + rng.random(r.shape[0])).astype(np.int64)
    k = np.where(deg >= 2, np.minimum(k, deg - 1), 0)
    order = np.lexsort((rng.random(len(rows)), rows))  # by user, random within the user
    rank = np.arange(len(order)) - ip[rows[order]]
    meta = np.zeros(len(rows), dtype=bool)
    meta[order[rank < k[rows[order]]]] = True
    inner = sp.csr_matrix((r.data[~meta], (rows[~meta], r.indices[~meta])), shape=r.shape)
    pairs = np.stack([rows[meta], r.indices[meta]], 1).astype(np.int64)
    return inner, pairs


def kmeans(x: torch.Tensor, k: int, rng: np.random.Generator, iters: int = 20) -> torch.Tensor:
    """Cluster of each row of ``x`` (Lloyd's algorithm from ``k`` distinct random rows; an empty
    cluster keeps its centre)."""
    k = max(1, min(k, len(x)))
    centres = x[torch.from_numpy(rng.choice(len(x), k, replace=False)).to(x.device)].clone()
    assign = torch.zeros(len(x), dtype=torch.long, device=x.device)
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return assign


class TIL(LightGCN):
    name = "til"

    def __init__(self, generator: str = "ui", meta_data: str = "valid", meta_ratio: float = 0.1,
                 meta_lr: float = 1e-3, meta_wd: float = 0.1, meta_step: float = 5.0, hidden: int = 64,
                 n_clusters: int = 20, cluster_every: int = 10, **base):
        super().__init__(**base)
        if generator not in GENERATORS:
            raise ConfigError(f"generator={generator!r}: choose ui (uni-interest) or mi (multi-interest)")
        if meta_data not in META_DATA:
            raise ConfigError(f"meta_data={meta_data!r}: choose one of {', '.join(META_DATA)}")
        if self.loss_type != "bpr":
            raise ConfigError(f"loss={self.loss_type!r}: TIL weighs BPR triplets; leave loss=bpr")
        if self.neg_sampler == "hard":
            raise ConfigError("neg_sampler=hard: TIL weighs one sampled negative per triplet; "
                              "use neg_sampler=uniform or popularity")
        if not 0.0 < meta_ratio < 1.0:
            raise ConfigError(f"meta_ratio={meta_ratio}: the held-out share of training pairs must be in (0, 1), "
                              "e.g. 0.1")
        if meta_lr <= 0 or meta_step <= 0 or meta_wd < 0:
            raise ConfigError(f"meta_lr={meta_lr}, meta_step={meta_step}, meta_wd={meta_wd}: need meta_lr > 0, "
                              "meta_step > 0 and meta_wd >= 0")
        if hidden < 1 or n_clusters < 2 or cluster_every < 1:
            raise ConfigError(f"hidden={hidden}, n_clusters={n_clusters}, cluster_every={cluster_every}: need "
                              "hidden >= 1, n_clusters >= 2 and cluster_every >= 1")
        self.generator, self.meta_data, self.meta_ratio = generator, meta_data, meta_ratio
        self.meta_lr, self.meta_wd, self.meta_step = meta_lr, meta_wd, meta_step
        self.hidden, self.n_clusters, self.cluster_every = hidden, n_clusters, cluster_every

    # ---- data -------------------------------------------------------------------------------
    def graph_matrix(self, split) -> sp.csr_matrix:
        """The inner problem's graph: the training matrix (less the held-out meta pairs under
        ``meta_data=holdout``); sets the meta pairs."""
        if self.meta_data == "batch":
            self._meta_pairs = np.zeros((0, 2), dtype=np.int64)
            return split.train_matrix
        if self.meta_data == "valid":
            self._meta_pairs = split.valid.select("user_id", "item_id").to_numpy().astype(np.int64).reshape(-1, 2)
            if len(self._meta_pairs) == 0:
                raise ConfigError("meta_data=valid: this split has no validation part; use meta_data=holdout "
                                  "(held-out training pairs) or split.valid=auto")
            return split.train_matrix
        inner, self._meta_pairs = holdout_pairs(split.train_matrix, self.meta_ratio,
                                                np.random.default_rng([self.seed, 7]))
        if len(self._meta_pairs) == 0:
            raise ConfigError(f"meta_data=holdout with meta_ratio={self.meta_ratio} held out no training pair "
                              "(no user has two or more); raise meta_ratio or use meta_data=valid")
        return inner

    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        self._seen = SeenPairs(split.train_matrix)  # held-out pairs are never negatives
        if self.meta_data == "valid":  # nor, for the meta triplets, the validation targets
            mp = self._meta_pairs
            extra = sp.csr_matrix((np.ones(len(mp), np.float32), (mp[:, 0], mp[:, 1])), shape=split.train_matrix.shape)
            self._meta_seen = SeenPairs(((split.train_matrix + extra) > 0).astype(np.float32).tocsr())
        else:
            self._meta_seen = self._seen
        self._centre_adj = None
        self.meta_pairs_ = int(len(self._meta_pairs))

    def on_device(self, device: torch.device) -> None:
        super().on_device(device)
        if getattr(self, "_centre_adj", None) is not None:
            self._centre_adj = self._centre_adj.to(device)
        if getattr(self, "clusters_", None) is not None:
            self.clusters_ = self.clusters_.to(device)

    def build(self, n_users, n_items):
        net = super().build(n_users, n_items)
        net.gen = nn.Sequential(nn.Linear(2 * self.dim, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1, bias=False))
        return net

    def before_training(self, split, valid=None) -> None:
        from recforge.training.distributed import world

        if world()[1] > 1:
            raise ConfigError("til runs its meta step inside the loss and does not support data-parallel "
                              "training; run it in one process")
        self._meta_opt = torch.optim.AdamW(self.net_.gen.parameters(), lr=self.meta_lr, weight_decay=self.meta_wd)
        self._epochs_done = 0
        self.clusters_ = None
        if self.generator == "mi":
            self.recluster(np.random.default_rng([self.seed, 11]))

    def train_state(self) -> dict:
        return {"meta_opt": self._meta_opt.state_dict(), "epochs_done": self._epochs_done,
                "clusters": None if self.clusters_ is None else self.clusters_.cpu()}

    def load_train_state(self, state: dict) -> None:
        if "meta_opt" in state:
            self._meta_opt.load_state_dict(state["meta_opt"])
            self._epochs_done = state["epochs_done"]
            if state["clusters"] is not None:
                self.clusters_ = state["clusters"].to(self.device_)

    def recluster(self, rng: np.random.Generator) -> None:
        """k-means of the current (propagated) item embeddings into ``n_clusters`` interests."""
        _, items = self.final_embeddings()
        assign = kmeans(items[1:], self.n_clusters, rng)
        self.clusters_ = torch.cat([assign.new_zeros(1), assign])  # the padding item: any cluster

    # ---- batches ----------------------------------------------------------------------------
    def train_batches(self, split, rng):
        if self.generator == "mi" and self._epochs_done > 0 and self._epochs_done % self.cluster_every == 0:
            self.recluster(rng)
        self._epochs_done += 1
        yield from super().train_batches(split, rng)

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict:
        batch = super().make_batch(idx, rng)
        if self.meta_data != "batch":
            m = self._meta_pairs[rng.integers(0, len(self._meta_pairs), len(idx))]
            neg = sample_negatives(self._meta_seen, m[:, 0], 1, self.n_items_, rng)[:, 0]
            batch.update(mu=torch.from_numpy(m[:, 0]), mi=torch.from_numpy(m[:, 1]), mj=torch.from_numpy(neg))
        return batch

    # ---- importance generator -----------------------------------------------------------------
    def user_centres(self, items: torch.Tensor) -> torch.Tensor:
        """Each user's mean item embedding over the inner training graph (uni-interest centres)."""
        if getattr(self, "_centre_adj", None) is None:
            r = self.graph_.tocsr().astype(np.float32)
            inv = 1.0 / np.maximum(np.asarray(r.sum(1)).ravel(), 1.0)
            self._centre_adj = to_torch(sp.diags(inv.astype(np.float32)) @ r, self.device_)
        return self._centre_adj @ items

    def features(self, users: torch.Tensor, items: torch.Tensor, u, i, j) -> torch.Tensor:
        """The generator's input for triplets (u, i, j) from embeddings ``users``/``items``."""
        eu, ei, ej = users[u], items[i], items[j]
        if self.generator == "ui":
            cu = self.user_centres(items)[u]
            return torch.cat([eu * ei + cu * ei, eu * ej + cu * ej], 1)
        k = int(self.clusters_.max()) + 1
        sums = torch.zeros(k, items.shape[1], device=items.device, dtype=items.dtype)
        sums = sums.index_add(0, self.clusters_[1:], items[1:])
        counts = torch.bincount(self.clusters_[1:], minlength=k).clamp(min=1).to(items.dtype)
        centres = sums / counts[:, None]
        ci, cj = centres[self.clusters_[i]], centres[self.clusters_[j]]
        return torch.cat([eu * ei + eu * ci + ei * ci, eu * ej + eu * cj + ej * cj], 1)

    def importance(self, x: torch.Tensor) -> torch.Tensor:
        """Positive weights normalised to mean 1 over the rows of ``x``."""
        s = F.softplus(self.net_.gen(x)).squeeze(-1).clamp(min=1e-12)
        return s / s.mean()

    def triplet_weights(self, users, pos, neg) -> np.ndarray:
        """Importance weights of triplets (u, i, j) under the current weights, normalised to mean 1
        over the triplets given."""
        users_e, items_e = self.final_embeddings()
        t = [torch.as_tensor(np.asarray(a), dtype=torch.long, device=items_e.device) for a in (users, pos, neg)]
        with torch.no_grad():
            return self.importance(self.features(users_e, items_e, *t)).cpu().numpy()

    # ---- loss -------------------------------------------------------------------------------
    def weighted_bpr(self, users, items, w_u, w_i, u, i, j, w) -> torch.Tensor:
        eu = users[u]
        main = (w * F.softplus((eu * items[j]).sum(-1) - (eu * items[i]).sum(-1))).mean()
        l2 = w_u[u].pow(2).sum() + w_i[i].pow(2).sum() + w_i[j].pow(2).sum()
        return main + self.reg * 0.5 * l2 / len(u)

    def meta_update(self, batch: dict, users: torch.Tensor, items: torch.Tensor) -> float:
        """One outer step: look-ahead ``θ' = θ − α ∇θ L_in(θ, φ)``, then AdamW on ``∂L_out(θ')/∂φ``.
        Returns the outer loss."""
        u, i, j = batch["u"], batch["i"], batch["j"][:, 0]
        w_u, w_i = self.net_.user.weight, self.net_.item.weight
        w = self.importance(self.features(users.detach(), items.detach(), u, i, j))
        inner = self.weighted_bpr(users, items, w_u, w_i, u, i, j, w)
        g_u, g_i = torch.autograd.grad(inner, [w_u, w_i], create_graph=True)
        ego = torch.cat([w_u - self.meta_step * g_u, w_i - self.meta_step * g_i], 0)
        users2, items2 = split_nodes(propagate(self.adjacency(), ego, self.n_layers, include_ego=self.include_ego),
                                     self.n_users_)
        mu, mi, mj = (batch["mu"], batch["mi"], batch["mj"]) if "mu" in batch else (u, i, j)
        eu = users2[mu]
        outer = F.softplus((eu * items2[mj]).sum(-1) - (eu * items2[mi]).sum(-1)).mean()
        params = list(self.net_.gen.parameters())
        grads = torch.autograd.grad(outer, params, retain_graph=True, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        self._meta_opt.step()
        for p in params:
            p.grad = None
        return float(outer.detach())

    def loss(self, batch):
        self._cache = None
        users, items = self.propagate()
        if torch.is_grad_enabled():
            self.meta_update(batch, users, items)
        u, i, j = batch["u"], batch["i"], batch["j"][:, 0]
        with torch.no_grad():  # the updated generator's weights, constants for the recommender's step
            w = self.importance(self.features(users, items, u, i, j))
        return self.weighted_bpr(users, items, self.net_.user.weight, self.net_.item.weight, u, i, j, w)

    def protocol_notes(self) -> dict:
        notes = {**super().protocol_notes(), "generator": GENERATOR_NAMES[self.generator], "side_data": "none"}
        if self.meta_data == "valid":
            notes["meta_data"] = (f"the validation part's {getattr(self, 'meta_pairs_', 0)} targets (read by the "
                                  "generator's outer loss only; early stopping reads them too); never the test part")
        elif self.meta_data == "holdout":
            notes["meta_data"] = (f"{getattr(self, 'meta_pairs_', 0)} training pairs held out ({self.meta_ratio:g} of "
                                  "each user's, seeded), removed from the inner triplets and the graph; never the "
                                  "validation or test part")
            notes["graph"] = "training interactions less the held-out meta pairs"
        else:
            notes["meta_data"] = "the training batch itself after the look-ahead step (authors' code)"
        return notes
