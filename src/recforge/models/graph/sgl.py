"""SGL: self-supervised graph learning for recommendation.

Wu, Wang, Feng, He, Chen, Lian & Xie, "Self-supervised Graph Learning for Recommendation",
SIGIR 2021.

LightGCN (:mod:`recforge.models.graph.lightgcn`) plus a contrastive task between two augmented
views of the training graph, regenerated at the start of every epoch:

* ``aug=ed`` (edge dropout): each view removes every user-item edge independently with
  probability ``drop_ratio``;
* ``aug=nd`` (node dropout): each view removes every user and every item with probability
  ``drop_ratio``, with all its edges.

Each view is re-normalised (``D^-1/2 A D^-1/2`` of what is left) and propagated with the shared
ego embeddings; the two views' embeddings are contrasted with cosine similarity over ``ssl_temp``.
The loss is ``BPR + ssl_weight * (L_cl(users) + L_cl(items)) + L2``.

Negatives of the contrast (``ssl_negatives``):

* ``all`` (default, the paper's and the authors' code): for every training pair of the batch, its
  user's view-1 embedding is the anchor, the same user's view-2 embedding the positive and *every
  other user's* view-2 embedding a negative (items likewise, against all items). The paper writes
  ``L_ssl^user = Σ_{u∈U} -log [exp(s(z'_u, z''_u)/τ) / Σ_{v∈U} exp(s(z'_u, z''_v)/τ)]``, with the
  sum over all users ``U``; SGL-Torch (``wujcan/SGL-Torch``, ``model/general_recommender/SGL.py``)
  computes it for the batch's users against the whole user table::

      tot_ratings_user = torch.matmul(user_embs1,
                                      torch.transpose(user_embeddings2, 0, 1))        # [batch_size, num_users]
      ...
      ssl_logits_user = tot_ratings_user - pos_ratings_user[:, None]                  # [batch_size, num_users]
      ...
      clogits_user = torch.logsumexp(ssl_logits_user / self.ssl_temp, dim=1)

  where ``user_embs1 = F.embedding(users, user_embeddings1)`` takes the batch's users as they come
  (a user with several pairs in the batch is an anchor several times), as we do. Cost: a
  (batch × n_users) and a (batch × n_items) similarity matrix per step.
* ``batch``: in-batch negatives, the distinct users (and distinct positive items) of the batch
  against each other, as SELFRec-based code does (its ``InfoNCE`` in ``util/loss_torch.py`` takes
  the negatives from ``view1 @ view2.T`` of the batch's nodes); what this library did before.

``cl_loss=infonce`` is SGL's InfoNCE; ``cl_loss=symmetric`` swaps in the SGCL authors' symmetric
contrastive loss (our reading in :mod:`recforge.training.graph_losses`, with ``sym_q`` and
``sym_lambda``, defaults q .01, λ .1 as in their code) and needs ``ssl_negatives=batch``. That
combination is ours; the SGCL authors' own model is :mod:`recforge.models.graph.sgcl`.

Deviations: SGL's random-walk variant (a different dropped graph per layer) is not implemented;
edge dropout removes each edge independently with probability ``drop_ratio`` where the authors'
code keeps exactly ``int(n_edges * (1 - ssl_ratio))`` edges drawn without replacement; everything
else (training pairs, negatives, L2 on the ego embeddings) is LightGCN's.
"""

from __future__ import annotations

import torch

from recforge.errors import ConfigError
from recforge.models.graph.lightgcn import LightGCN
from recforge.models.graph.propagation import drop_edges, drop_nodes, normalized_adjacency, to_torch
from recforge.training.graph_losses import CL_LOSSES, contrastive_loss, info_nce_all

AUGMENTATIONS = ("ed", "nd")
SSL_NEGATIVES = ("all", "batch")


class SGL(LightGCN):
    name = "sgl"

    def __init__(self, aug: str = "ed", drop_ratio: float = 0.1, ssl_weight: float = 0.1, ssl_temp: float = 0.2,
                 ssl_negatives: str = "all", cl_loss: str = "infonce", sym_q: float = 0.01,
                 sym_lambda: float | None = 0.1, **base):
        super().__init__(**base)
        if aug not in AUGMENTATIONS:
            raise ConfigError(f"aug={aug!r}: choose one of {', '.join(AUGMENTATIONS)}")
        if cl_loss not in CL_LOSSES:
            raise ConfigError(f"cl_loss={cl_loss!r}: choose one of {', '.join(CL_LOSSES)}")
        if ssl_negatives not in SSL_NEGATIVES:
            raise ConfigError(f"ssl_negatives={ssl_negatives!r}: choose one of {', '.join(SSL_NEGATIVES)}")
        if cl_loss == "symmetric" and ssl_negatives != "batch":
            raise ConfigError("cl_loss=symmetric contrasts in-batch views: set ssl_negatives=batch")
        if not 0.0 <= drop_ratio < 1.0 or ssl_temp <= 0 or not 0.0 < sym_q <= 1.0:
            raise ConfigError("need 0 <= drop_ratio < 1, ssl_temp > 0 and 0 < sym_q <= 1")
        self.aug, self.drop_ratio, self.ssl_weight, self.ssl_temp = aug, drop_ratio, ssl_weight, ssl_temp
        self.ssl_negatives, self.cl_loss, self.sym_q, self.sym_lambda = ssl_negatives, cl_loss, sym_q, sym_lambda

    def make_views(self, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented, re-normalised training graphs."""
        drop = drop_edges if self.aug == "ed" else drop_nodes
        return tuple(to_torch(normalized_adjacency(drop(self.graph_, self.drop_ratio, rng)), self.device_)
                     for _ in range(2))

    def train_batches(self, split, rng):
        self._views = self.make_views(rng) if self.ssl_weight > 0 else None
        yield from super().train_batches(split, rng)

    def contrast(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(self.cl_loss, a, b, self.ssl_temp, self.sym_q, self.sym_lambda)

    def extra_loss(self, batch):
        if self.ssl_weight <= 0 or getattr(self, "_views", None) is None:
            return 0.0
        u1, i1 = self.propagate(self._views[0])
        u2, i2 = self.propagate(self._views[1])
        users = (batch["users"] if "cross" in batch else batch["u"]).reshape(-1)
        items = (batch["items"] if "cross" in batch else batch["i"]).reshape(-1)
        if self.ssl_negatives == "all":
            # candidates: every user; every real item (row 0 of the item table is the padding item)
            cl = (info_nce_all(u1[users], u2, users, self.ssl_temp)
                  + info_nce_all(i1[items], i2[1:], items - 1, self.ssl_temp))
        else:
            users, items = torch.unique(users), torch.unique(items)
            cl = self.contrast(u1[users], u2[users]) + self.contrast(i1[items], i2[items])
        return self.ssl_weight * cl

    def protocol_notes(self) -> dict:
        return {**super().protocol_notes(), "aug": self.aug, "cl_loss": self.cl_loss,
                "ssl_negatives": self.ssl_negatives}
