"""LSGRec: light signed graph convolution for sign-aware recommendation.

Liu, Dang, Liang, Liu, Guo, Zhao & Wang, "Towards Unified Modeling for Positive and Negative
Preferences in Sign-Aware Recommendation" (LSGRec), arXiv 2403.08246, 2024.

A signed user-item graph from explicit ratings of the *training* part: a positive link for a
rating ``>= pos_threshold`` (default 4), a negative link for a rating ``<= neg_threshold``
(default 2); ratings in between are neither. Without a ``rating`` column every interaction is
positive and the model is LightGCN. A pair with both a positive and a negative rating (only
possible with ``data.dedupe=none``) counts as positive only, so a negative link is never an edge
of the positive graph.

What we implement:

* **positive preference** ``P``: LightGCN propagation over the symmetric-normalised *positive*
  graph ``Â⁺`` (mean of layers ``0..K``), for users and items (as the authors' code:
  ``LightSignedGCN.forward`` with ``LightSignedConv``, ``alpha = 1/(K+1)``);
* **negative preference** of users: first order from the negative links,
  ``N_1 = Â⁻ E_0`` (``Â⁻`` the normalised negative graph: a user gathers the ego embeddings of the
  items they rated low), then high order propagated along positive edges,
  ``N_{k+1} = Â⁺ N_k`` (walks with exactly one negative link); ``N = mean(N_1..N_K)``;
* **ranking by positive preference**: ``r(u, i) = p_u · p_i`` (the authors' ``trainer.py``
  ranks with ``gen_top_k`` on the positive embeddings only; the variants that subtract or filter
  by the negative scores are commented out);
* **training** (``neg_rank=rated``, default, following ``LightSignedGCN.loss``): BPR over every
  training row, positive *and* negative links, against an item the user never rated (any
  rating). A negative link ``(u, n)`` is a row ``-log σ(neg_scale · r(u, n) - r(u, j))`` with
  ``neg_scale = 2`` (the code's ``-sign(w)/2 + 3/2``): the disliked item is still ranked above
  unrated items, only more weakly than a liked one; its ranking score is never pushed down. The
  ranking loss is the mean over the batch's positive and negative rows (``neg_weight`` weighs the
  negative rows, 1 in the code), with L2 on the rows' ego embeddings. Plus
  ``aux_weight * -log σ(q(u, n) - q(u, j))`` with ``q(u, i) = n_u · p_i``, which trains the
  negative-preference path;
* ``neg_rank=push`` (our first reading of the paper's text, "ranking by positive preference
  optimised with negative ones"): BPR on positive links only (negatives drawn from items not
  positive for the user), plus ``neg_weight * -log σ(r(u, a) - r(u, n))`` pushing a disliked
  item below ``a``: an item the user never rated (``push_below=unseen``) or one they liked
  (``push_below=positive``). It keeps disliked items out of the top 20 but on ML-100K costs
  ~40% of Recall@20 on liked items against LightGCN (``BENCHMARKS.md``).

Every negative link is visited once per epoch, spread evenly over the epoch's batches.

Deviations from the authors' code (``VanillaCreamer/LSGRec``: ``lightSGCN.py``, ``convols.py``,
``trainer.py``, ``util.py``, ``run.sh``):

* thresholds: the code makes a rating ``> 2.5`` positive (so 3 is positive) and ``< 2.5``
  negative; we default to ``>= 4`` / ``<= 2`` with 3 in neither graph (``pos_threshold=3``
  reproduces the code's split on 1-5 scales, half stars included);
* negative path: the code gives it its own learnable layer-0 embeddings (``user_neg_embedding``,
  ``item_neg_embedding``), keeps item-side negative embeddings too, and trains it with a BPR
  on every row that scores rated items *below* unrated ones (``-log σ(n_u·n_j - c·n_u·n_i)``,
  ``c = 2`` for positive and 1 for negative links) and a squared-dot orthogonality loss between
  positive and negative embeddings of the batch's users and items (weight 1); we use the shared
  ``E_0``, users only, and the auxiliary term above;
* the code also adds an MSE rating head (a linear layer on ``[p_u, p_i]``, target
  ``rating - 2.5``; its target and prediction shapes broadcast to a batch x batch matrix) with
  weight 1; not implemented;
* optimisation: the code draws 40 negatives per row from items the user never rated, with
  probability ∝ training degree^0.75 (``util.deg_dist``, ``bipartite_dataset.negs_gen_EP``),
  sums the 40 terms; L2 ``reg * ½‖·‖²`` on the *propagated* embeddings of the batch, summed
  over the batch (reg 1e-5..5e-5 in ``run.sh``); AdamW (default weight decay), lr 3e-3..1e-2
  (``run.sh``; 5e-4 for ML-1M in the README), MultiStepLR ×0.2 at epochs 20 and 200, 2 layers,
  dim 64, batch 2048, 201 epochs, Xavier-normal init; we keep LightGCN's settings here (one
  uniform negative, L2 on ego embeddings averaged over the batch, Adam lr 1e-3, 3 layers,
  early stopping on validation);
* evaluation: the code ranks all items except the user's training items (any rating) and items
  seen in neither train nor test, evaluates on the test set every 20 epochs and reports the
  best test Recall (no validation split); its evaluator (``evaluator.py``) is not in the
  repository, so which test ratings count as targets there is not known.

Unknown users are folded in from their history items as in LightGCN, without signs (a raw
history has no ratings).

Evaluation: on rated data, ``recforge train lsgrec`` counts as targets only the held-out rows
rated ``>= pos_threshold`` (``eval.target_min_rating``, which defaults to it for this model); a
lower-rated held-out item is ranked like any other non-relevant item. The side-by-side protocol
with LightGCN trained on the same positive links is in ``benchmarks/graph_signed.py``.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from recforge.data.schema import RATING
from recforge.data.split import interactions_to_csr
from recforge.errors import ConfigError
from recforge.models.graph.lightgcn import LightGCN
from recforge.models.graph.propagation import normalized_adjacency, spmm, split_nodes, to_torch
from recforge.training.graph_losses import bpr_loss
from recforge.training.samplers import SeenPairs, sample_negatives


def signed_frames(train: pl.DataFrame, pos_threshold: float, neg_threshold: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(positive rows, negative rows) of a training frame; all rows positive without ratings."""
    if RATING not in train.columns or train[RATING].null_count() == train.height:
        return train, train.clear()
    r = pl.col(RATING)
    return train.filter(r >= pos_threshold), train.filter(r <= neg_threshold)


PUSH_BELOW = ("unseen", "positive")
#: how a negative link enters the ranking loss: ``rated`` (the authors' code) or ``push`` (our first reading)
NEG_RANK = ("rated", "push")


class LSGRec(LightGCN):
    name = "lsgrec"

    def __init__(self, pos_threshold: float = 4.0, neg_threshold: float = 2.0, neg_weight: float = 1.0,
                 aux_weight: float = 0.1, push_below: str = "unseen", neg_rank: str = "rated",
                 neg_scale: float = 2.0, **base):
        super().__init__(**base)
        if neg_threshold >= pos_threshold:
            raise ConfigError(f"neg_threshold={neg_threshold} must be below pos_threshold={pos_threshold}")
        if self.loss_type != "bpr":
            raise ConfigError("LSGRec trains with BPR on positive links; loss=cpr is not supported")
        self.pos_threshold, self.neg_threshold = pos_threshold, neg_threshold
        if push_below not in PUSH_BELOW:
            raise ConfigError(f"push_below={push_below!r}: choose one of {', '.join(PUSH_BELOW)}")
        self.neg_weight, self.aux_weight, self.push_below = neg_weight, aux_weight, push_below
        if neg_rank not in NEG_RANK:
            raise ConfigError(f"neg_rank={neg_rank!r}: choose one of {', '.join(NEG_RANK)}")
        if neg_scale <= 0:
            raise ConfigError(f"neg_scale={neg_scale} must be positive")
        if neg_rank == "rated" and push_below != "unseen":
            raise ConfigError(f"push_below={push_below!r} only applies with neg_rank=push; "
                              "set neg_rank=push or drop push_below")
        self.neg_rank, self.neg_scale = neg_rank, neg_scale

    # ---- graphs -------------------------------------------------------------------------------
    def graph_matrix(self, split):
        pos, _ = signed_frames(split.train, self.pos_threshold, self.neg_threshold)
        return interactions_to_csr(pos, split.n_users, split.n_items)

    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        _, neg = signed_frames(split.train, self.pos_threshold, self.neg_threshold)
        n = interactions_to_csr(neg, split.n_users, split.n_items)
        n = n - n.multiply(self.graph_)  # positive wins: a negative link is never a positive edge
        n.eliminate_zeros()
        self.neg_graph_ = n.tocsr()
        self._neg_adj = None
        coo = self.neg_graph_.tocoo()
        self._neg_pairs = np.stack([coo.row, coo.col], 1).astype(np.int64)
        # items the user rated in any way: never drawn as "unseen" for the negative-link terms
        self._rated = SeenPairs(split.train_matrix)
        if self.neg_rank == "rated":
            # the authors' sampler: a ranking negative is an item the user never rated (any rating),
            # so a disliked or neutral item is never the "worse" item of a positive row
            self._seen = self._rated

    def negative_adjacency(self) -> torch.Tensor:
        adj = getattr(self, "_neg_adj", None)
        if adj is None:
            adj = self._neg_adj = to_torch(normalized_adjacency(self.neg_graph_), self.device_)
        return adj

    def on_device(self, device: torch.device) -> None:
        super().on_device(device)
        if getattr(self, "_neg_adj", None) is not None:
            self._neg_adj = self._neg_adj.to(device)

    def negative_preference(self) -> torch.Tensor:
        """Users' negative preference (n_users, d): first order over negative links, higher
        orders along positive edges, mean of orders ``1..max(K, 1)``."""
        e = spmm(self.negative_adjacency(), self.ego())
        layers = [e]
        for _ in range(max(self.n_layers, 1) - 1):
            e = spmm(self.adjacency(), e)
            layers.append(e)
        n = torch.stack(layers, 0).mean(0)
        return split_nodes(n, self.n_users_)[0]

    # ---- batches ------------------------------------------------------------------------------
    def train_batches(self, split, rng):
        n_batches = self.n_train_batches(split)
        neg_order = rng.permutation(len(self._neg_pairs))
        chunks = np.array_split(neg_order, n_batches) if len(neg_order) else [neg_order] * n_batches
        for b, batch in enumerate(super().train_batches(split, rng)):
            links = self._neg_pairs[chunks[b]] if b < len(chunks) else self._neg_pairs[:0]
            if len(links):
                j = sample_negatives(self._rated, links[:, 0], 1, self.n_items_, rng)[:, 0]
                above = self.positive_of(links[:, 0], rng, j) if self.push_below == "positive" else j
                batch.update(nu=torch.from_numpy(links[:, 0]), nn=torch.from_numpy(links[:, 1]),
                             nj=torch.from_numpy(j), np=torch.from_numpy(above))
            yield batch

    def positive_of(self, users: np.ndarray, rng: np.random.Generator, fallback: np.ndarray) -> np.ndarray:
        """A random positive item of each user (``fallback`` for users without one)."""
        ip, idx = self.graph_.indptr, self.graph_.indices
        deg = ip[users + 1] - ip[users]
        pick = ip[users] + np.floor(rng.random(len(users)) * np.maximum(deg, 1)).astype(np.int64)
        return np.where(deg > 0, idx[np.minimum(pick, len(idx) - 1)], fallback).astype(np.int64)

    # ---- loss -----------------------------------------------------------------------------------
    def loss(self, batch):
        self._cache = None
        users, items = self.propagate()
        total = self.rank_loss(batch, users, items)
        if "nu" not in batch or (self.neg_weight <= 0 and self.aux_weight <= 0 and self.neg_rank == "push"):
            return total
        u, n, j, above = batch["nu"], batch["nn"], batch["nj"], batch["np"]
        pu = users[u]
        w_u, w_i = self.net_.user.weight, self.net_.item.weight
        l2 = w_u[u].pow(2).sum() + w_i[n].pow(2).sum() + w_i[j].pow(2).sum()
        if self.neg_rank == "rated":
            # a negative link is one more row of the ranking BPR, its item above an unrated one with
            # its score scaled by neg_scale; the loss (and L2) is the mean over all the batch's rows
            n_pos, n_neg = batch["u"].numel(), len(u)
            rows = bpr_loss(self.neg_scale * (pu * items[n]).sum(-1), (pu * items[j]).sum(-1))
            total = (n_pos * total + n_neg * self.neg_weight * rows + self.reg * 0.5 * l2) / (n_pos + n_neg)
        else:
            if self.neg_weight > 0:
                push = bpr_loss((pu * items[above]).sum(-1), (pu * items[n]).sum(-1))
                total = total + self.neg_weight * push
            total = total + self.reg * 0.5 * l2 / len(u)
        if self.aux_weight > 0:
            nu = self.negative_preference()[u]
            aux = bpr_loss((nu * items[n]).sum(-1), (nu * items[j]).sum(-1))
            total = total + self.aux_weight * aux
        return total

    def protocol_notes(self) -> dict:
        return {**super().protocol_notes(),
                "signed_graph": f"positive: rating >= {self.pos_threshold}, negative: rating <= {self.neg_threshold} "
                                "(training part only)",
                "negative_links_in_ranking": self.neg_rank}
