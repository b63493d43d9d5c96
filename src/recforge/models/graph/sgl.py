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
ego embeddings. For the distinct users and the distinct positive items of the batch, the two views'
embeddings are contrasted: row ``r`` of view 1 against row ``r`` of view 2 (positive) and the other
rows of view 2 (negatives), cosine similarity over ``ssl_temp``. The loss is
``BPR + ssl_weight * (L_cl(users) + L_cl(items)) + L2``.

``cl_loss=infonce`` is SGL's InfoNCE; ``cl_loss=symmetric`` swaps in SGCL's symmetric contrastive
loss (Zhao et al. 2024; our reading in :mod:`recforge.training.graph_losses`, with ``sym_q`` and
``sym_lambda``; defaults q .01, λ .1 as in the SGCL authors' code).

Deviations: SGL's random-walk variant (a different dropped graph per layer) is not implemented;
the contrastive task uses the users and positive items of the batch (distinct), as SGL's code;
everything else (training pairs, negatives, L2 on the ego embeddings) is LightGCN's.
"""

from __future__ import annotations

import torch

from recforge.errors import ConfigError
from recforge.models.graph.lightgcn import LightGCN
from recforge.models.graph.propagation import drop_edges, drop_nodes, normalized_adjacency, to_torch
from recforge.training.graph_losses import CL_LOSSES, contrastive_loss

AUGMENTATIONS = ("ed", "nd")


class SGL(LightGCN):
    name = "sgl"

    def __init__(self, aug: str = "ed", drop_ratio: float = 0.1, ssl_weight: float = 0.1, ssl_temp: float = 0.2,
                 cl_loss: str = "infonce", sym_q: float = 0.01, sym_lambda: float | None = 0.1, **base):
        super().__init__(**base)
        if aug not in AUGMENTATIONS:
            raise ConfigError(f"aug={aug!r}: choose one of {', '.join(AUGMENTATIONS)}")
        if cl_loss not in CL_LOSSES:
            raise ConfigError(f"cl_loss={cl_loss!r}: choose one of {', '.join(CL_LOSSES)}")
        if not 0.0 <= drop_ratio < 1.0 or ssl_temp <= 0 or not 0.0 < sym_q <= 1.0:
            raise ConfigError("need 0 <= drop_ratio < 1, ssl_temp > 0 and 0 < sym_q <= 1")
        self.aug, self.drop_ratio, self.ssl_weight, self.ssl_temp = aug, drop_ratio, ssl_weight, ssl_temp
        self.cl_loss, self.sym_q, self.sym_lambda = cl_loss, sym_q, sym_lambda

    def make_views(self, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented, re-normalised training graphs."""
        drop = drop_edges if self.aug == "ed" else drop_nodes
        return tuple(to_torch(normalized_adjacency(drop(self.graph_, self.drop_ratio, rng))) for _ in range(2))

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
        users = torch.unique(batch["users"] if "cross" in batch else batch["u"])
        items = torch.unique(batch["items"] if "cross" in batch else batch["i"])
        cl = self.contrast(u1[users], u2[users]) + self.contrast(i1[items], i2[items])
        return self.ssl_weight * cl

    def protocol_notes(self) -> dict:
        return {**super().protocol_notes(), "aug": self.aug, "cl_loss": self.cl_loss}
