"""SimGCL: graph contrastive learning with noise instead of graph augmentation.

Yu, Yin, Xia, Chen, Cui & Nguyen, "Are Graph Augmentations Necessary? Simple Graph Contrastive
Learning for Recommendation", SIGIR 2022.

LightGCN propagation on the unchanged training graph. Two perturbed views add, after every
layer ``k``, a random vector of length ``eps`` in the orthant of the embedding:
``E_k ← E_k + eps · sign(E_k) ⊙ normalize(U)``, ``U ~ Uniform[0, 1)`` drawn per node and per
layer (fresh at every step). No edge or node is dropped. For the distinct users and positive items
of the batch, the two views are contrasted (cosine similarity over ``ssl_temp``); the
recommendation loss (BPR, or CPR with ``loss=cpr``) uses the unperturbed propagation:
``L = BPR + ssl_weight * (L_cl(users) + L_cl(items)) + L2``.

As in the paper, the final representation is the mean of layers ``1..K`` without the ego layer
``E_0`` (``include_ego=False``; ``True`` gives LightGCN's mean over ``0..K``), for the views and
for the ranking.

``cl_loss=infonce`` is SimGCL's InfoNCE. ``cl_loss=symmetric`` is "SimGCL + symmetric loss": SimGCL's
noise views and in-batch contrast with the InfoNCE term replaced by the symmetric contrastive loss
of the SGCL authors' code (Zhao et al. 2024; ``sym_q`` .01 and ``sym_lambda`` .1 as there; our
reading in :mod:`recforge.training.graph_losses`), at SimGCL's weight. It is a combination of
ours, not the SGCL authors' model: theirs (:mod:`recforge.models.graph.sgcl`, ``sgcl``) builds its
views by edge dropout, contrasts the batch's users and items in one matrix, draws its BPR
negatives by mixup over candidates and uses its own weights. Benchmark rows before this
distinction labelled this combination "SGCL".

Deviations: none intended beyond LightGCN's (training pairs visited once per epoch; L2 on the
batch's ego embeddings rather than the paper code's L2 over the batch's final embeddings).
"""

from __future__ import annotations

import torch

from recforge.errors import ConfigError
from recforge.models.graph.lightgcn import LightGCN
from recforge.training.graph_losses import CL_LOSSES, contrastive_loss


class SimGCL(LightGCN):
    name = "simgcl"

    def __init__(self, eps: float = 0.1, ssl_weight: float = 0.2, ssl_temp: float = 0.2, cl_loss: str = "infonce",
                 sym_q: float = 0.01, sym_lambda: float | None = 0.1, include_ego: bool = False, **base):
        super().__init__(**base)
        if cl_loss not in CL_LOSSES:
            raise ConfigError(f"cl_loss={cl_loss!r}: choose one of {', '.join(CL_LOSSES)}")
        if eps < 0 or ssl_temp <= 0 or not 0.0 < sym_q <= 1.0:
            raise ConfigError("need eps >= 0, ssl_temp > 0 and 0 < sym_q <= 1")
        if self.n_layers < 1:
            raise ConfigError("SimGCL perturbs propagated layers: n_layers must be >= 1")
        self.eps, self.ssl_weight, self.ssl_temp = eps, ssl_weight, ssl_temp
        self.cl_loss, self.sym_q, self.sym_lambda = cl_loss, sym_q, sym_lambda
        self.include_ego = include_ego

    def contrast(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(self.cl_loss, a, b, self.ssl_temp, self.sym_q, self.sym_lambda)

    def extra_loss(self, batch):
        if self.ssl_weight <= 0:
            return 0.0
        u1, i1 = self.propagate(noise_eps=self.eps)
        u2, i2 = self.propagate(noise_eps=self.eps)
        users = torch.unique(batch["users"] if "cross" in batch else batch["u"])
        items = torch.unique(batch["items"] if "cross" in batch else batch["i"])
        cl = self.contrast(u1[users], u2[users]) + self.contrast(i1[items], i2[items])
        return self.ssl_weight * cl

    def protocol_notes(self) -> dict:
        return {**super().protocol_notes(), "cl_loss": self.cl_loss}
