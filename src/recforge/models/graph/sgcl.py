"""SGCL: symmetric graph contrastive learning against noisy views, as its authors published it.

Zhao, Yang, Liang, Zhao, Guo & Wang, "Symmetric Graph Contrastive Learning against Noisy Views
for Recommendation", arXiv 2408.02691 (2024), ACM TOIS 2025; code ``user683/SGCL`` (built on
SELFRec). Everything below follows that code; the quotes are from ``model/graph/SGCL.py`` unless
another file is named, and the defaults from ``conf/SGCL.conf``::

    batch_size=8000
    learnRate=0.001
    reg.lambda=0.0001
    num.negative=40
    SGCL=-n_layer 2 -beta 0.01 -droprate 0.1 -augtype 1 -temp 0.2

The model is LightGCN (mean of layers ``0..K``, Xavier-uniform initialisation) trained with three
pieces:

1. **Views by edge dropout**, two per epoch (``dropped_adj1 = model.graph_reconstruction()``
   and ``dropped_adj2`` before the epoch's batches), each keeping a share ``1 - drop_ratio`` of the
   training edges (``GraphAugmentor.edge_dropout(self.data.interaction_mat, self.drop_rate)``),
   re-normalised, one dropped graph for all layers. (``graph_reconstruction`` tests
   ``if self.aug_type == 0 or 1:``, always true, so every ``augtype`` takes that one-graph branch;
   ``augtype 1`` is edge dropout.)

2. **One joint contrast over the batch's users and items**: the distinct users and the distinct
   positive items of the batch, propagated on each view, are stacked into one matrix per view,
   so users and items are negatives of each other::

       view1 = torch.cat((user_view_1[u_idx], item_view_1[i_idx]), 0)
       view2 = torch.cat((user_view_2[u_idx], item_view_2[i_idx]), 0)
       return scl_loss(view1, view2, 0.1, 0.01, self.temp)

   ``scl_loss`` (``util/loss_torch.py``) is the symmetric contrastive loss with ``λ = 0.1``,
   ``q = 0.01`` and the positive counted twice in the normaliser
   (:func:`recforge.training.graph_losses.symmetric_contrastive_loss` with
   ``double_positive=True``), weighted by ``beta`` (``ssl_weight``, 0.01):
   ``self.cl_rate * model.cal_scl_loss(...)``.

3. **Negative mixup over candidates** for BPR (``negative_mixup``): each training pair gets
   ``n_candidates`` (40) uniformly drawn items the user has not interacted with. The pair's
   embeddings come from a propagation of the *training* graph with dropout after every layer
   (``forward_mix``: ``ego_embeddings = self.dropout(ego_embeddings)`` with ``nn.Dropout(0.1)``,
   ``mix_dropout``). At every layer ``k = 0..K`` each candidate is mixed with the positive item,
   with a uniform weight per dimension, and the mix the user scores highest is kept::

       alpha = torch.rand_like(neg_emb).cuda()
       neg_emb = alpha * pos_emb.unsqueeze(dim=1) + (1 - alpha) * neg_emb
       scores = (u_emb.unsqueeze(dim=1) * neg_emb).sum(dim=-1)
       indices = torch.max(scores, dim=1)[1].detach()

   The negative is the mean over layers of the kept mixes, the positive the mean over layers of
   the positive item, the user the mean over layers of the user (all from the dropout
   propagation); BPR on them (``bpr_loss(user_emb, pos_item_emb, neg_item_emb)``).

Total: ``BPR + reg * (‖U‖ + ‖P‖ + ‖N‖) / B + ssl_weight * L_scl``, where the L2 term is the
authors' ``l2_reg_loss`` (``emb_loss += torch.norm(emb, p=2) / emb.shape[0]``): the Frobenius
norms (not squared) of the batch's final user, positive and mixed-negative embeddings, each
divided by the batch size. Ranking uses the plain propagation of the training graph
(``forward()`` without views or dropout). Training pairs are every training interaction once
per epoch, shuffled (``next_batch_pairwise``).

Deviations: edge dropout removes each edge independently with probability ``drop_ratio`` (the
authors keep exactly ``int(edge_count * (1 - drop_rate))`` edges drawn without replacement); BPR is
``softplus(neg - pos)`` without the authors' ``10e-6`` inside the log; the negative mixes are
scored without gradient and only the kept one is rebuilt with gradient (the gradient is the
same, the kept index being detached in theirs too). Their evaluation (test metrics every epoch
from epoch 6, best epoch kept) is not a protocol of this library: we early-stop on validation or
train a fixed number of epochs. The defaults are those of the released code.

"SimGCL + symmetric loss" (``simgcl cl_loss=symmetric``) is a different model: SimGCL's noise
views and separate user / item InfoNCE terms with the symmetric loss swapped in.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from recforge.errors import ConfigError
from recforge.models.graph.lightgcn import LightGCN
from recforge.models.graph.propagation import drop_edges, normalized_adjacency, spmm, to_torch
from recforge.training.graph_losses import bpr_loss, symmetric_contrastive_loss
from recforge.training.samplers import sample_negatives


class SGCL(LightGCN):
    name = "sgcl"
    include_ego = True

    def __init__(self, drop_ratio: float = 0.1, ssl_weight: float = 0.01, ssl_temp: float = 0.2,
                 sym_q: float = 0.01, sym_lambda: float = 0.1, n_candidates: int = 40, mix_dropout: float = 0.1,
                 **base):
        base.setdefault("n_layers", 2)
        base.setdefault("init", "xavier")
        super().__init__(**base)
        if self.loss_type != "bpr":
            raise ConfigError(f"loss={self.loss_type!r}: SGCL trains BPR on mixed negatives; use loss=bpr")
        if self.neg_sampler != "uniform":
            raise ConfigError(f"neg_sampler={self.neg_sampler!r}: SGCL draws uniform candidates and mixes them; "
                              "use neg_sampler=uniform (n_candidates sets how many)")
        if not 0.0 <= drop_ratio < 1.0:
            raise ConfigError(f"drop_ratio={drop_ratio}: need 0 <= drop_ratio < 1")
        if not 0.0 <= mix_dropout < 1.0:
            raise ConfigError(f"mix_dropout={mix_dropout}: need 0 <= mix_dropout < 1")
        if ssl_temp <= 0 or not 0.0 < sym_q <= 1.0 or sym_lambda <= 0:
            raise ConfigError("need ssl_temp > 0, 0 < sym_q <= 1 and sym_lambda > 0")
        if n_candidates < 1:
            raise ConfigError(f"n_candidates={n_candidates}: need at least one candidate negative")
        self.drop_ratio, self.ssl_weight, self.ssl_temp = drop_ratio, ssl_weight, ssl_temp
        self.sym_q, self.sym_lambda = sym_q, sym_lambda
        self.n_candidates, self.mix_dropout = n_candidates, mix_dropout

    # ---- views ----------------------------------------------------------------------------------
    def make_views(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two edge-dropped, re-normalised training graphs."""
        return tuple(to_torch(normalized_adjacency(drop_edges(self.graph_, self.drop_ratio, rng)), self.device_)
                     for _ in range(2))

    def train_batches(self, split, rng):
        self._views = self.make_views(rng) if self.ssl_weight > 0 else None
        for idx, r in self.epoch_batches(self.epoch_order(rng), rng):
            yield self.make_batch(idx, r)

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict:
        p = self._pairs[idx]
        cand = sample_negatives(self._seen, p[:, 0], self.n_candidates, self.n_items_, rng)
        return {"u": torch.from_numpy(p[:, 0]), "i": torch.from_numpy(p[:, 1]), "j": torch.from_numpy(cand)}

    # ---- pieces of the loss ---------------------------------------------------------------------
    def dropout_layers(self) -> list[torch.Tensor]:
        """Layers ``E_0..E_K`` of the training graph with dropout after every propagation (the
        dropped layer feeds the next one)."""
        e = self.ego()
        layers = [e]
        for _ in range(self.n_layers):
            e = F.dropout(spmm(self.adjacency(), e), p=self.mix_dropout, training=True)
            layers.append(e)
        return layers

    @staticmethod
    def mix_negatives(user: torch.Tensor, pos_layers: list[torch.Tensor], item_layers: list[torch.Tensor],
                      cand: torch.Tensor, alphas: list[torch.Tensor] | None = None,
                      chunk: int | None = None) -> torch.Tensor:
        """The mixed negative of each row: per layer ``k``, ``α ⊙ p_k + (1 - α) ⊙ n_k`` for every
        candidate (``α`` uniform per dimension, or ``alphas[k]`` (B, M, d) when given), the mix the
        user (B, d) scores highest kept; the mean of the kept mixes over layers. ``pos_layers[k]``
        is (B, d), ``item_layers[k]`` the (n_items + 1, d) item rows of layer ``k``, ``cand`` (B, M)
        candidate items. The mixes are scored without gradient, ``chunk`` candidates at a time;
        only the kept one is rebuilt with it (its index carries no gradient, as ``.detach()`` in
        the authors' code)."""
        rows = torch.arange(user.shape[0], device=user.device)
        m = cand.shape[1]
        # candidates in chunks of about 16 MB of temporaries: on CPU faster than one (B, M, d) block
        if chunk is None:
            chunk = max(1, min(m, (4 << 20) // max(1, user.shape[0] * user.shape[1])))
        kept = []
        for k, (p, table) in enumerate(zip(pos_layers, item_layers)):
            with torch.no_grad():
                best = torch.full((len(rows),), -float("inf"), device=user.device)
                best_idx = torch.zeros(len(rows), dtype=torch.long, device=user.device)
                best_a = torch.empty_like(p)
                for c0 in range(0, m, chunk):
                    n = table[cand[:, c0 : c0 + chunk]]            # (B, c, d)
                    a = torch.rand(n.shape, device=n.device) if alphas is None else alphas[k][:, c0 : c0 + chunk]
                    mixed = p.unsqueeze(1) - n                     # α p + (1 - α) n = n + α (p - n)
                    mixed.mul_(a).add_(n)
                    score, ix = torch.einsum("bd,bmd->bm", user, mixed).max(1)
                    better = score > best
                    best = torch.where(better, score, best)
                    best_idx[better] = c0 + ix[better]
                    best_a[better] = a[rows[better], ix[better]]
            kept.append(best_a * p + (1 - best_a) * table[cand[rows, best_idx]])
        return torch.stack(kept, 0).mean(0)

    def joint_contrast(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The symmetric contrast of the batch's distinct users and items, stacked in one matrix."""
        u1, i1 = self.propagate(self._views[0])
        u2, i2 = self.propagate(self._views[1])
        users, items = torch.unique(users), torch.unique(items)
        v1 = torch.cat([u1[users], i1[items]], 0)
        v2 = torch.cat([u2[users], i2[items]], 0)
        return symmetric_contrastive_loss(v1, v2, self.ssl_temp, self.sym_q, self.sym_lambda, double_positive=True)

    def loss(self, batch):
        self._cache = None
        u, i, j = batch["u"], batch["i"], batch["j"]
        layers = self.dropout_layers()
        n_users = self.n_users_
        user = torch.stack([e[u] for e in layers], 0).mean(0)
        item_layers = [e[n_users:] for e in layers]
        pos_layers = [e[i] for e in item_layers]
        pos = torch.stack(pos_layers, 0).mean(0)
        neg = self.mix_negatives(user, pos_layers, item_layers, j)
        rec = bpr_loss((user * pos).sum(-1), (user * neg).sum(-1))
        l2 = (user.norm() + pos.norm() + neg.norm()) / len(u)
        total = rec + self.reg * l2
        if self.ssl_weight > 0 and getattr(self, "_views", None) is not None:
            total = total + self.ssl_weight * self.joint_contrast(u, i)
        return total

    def protocol_notes(self) -> dict:
        return {**super().protocol_notes(),
                "sgcl": (f"edge-dropout views ({self.drop_ratio}), joint user+item symmetric contrast "
                         f"(q {self.sym_q}, λ {self.sym_lambda}, τ {self.ssl_temp}, weight {self.ssl_weight}), "
                         f"negative mixup over {self.n_candidates} candidates")}
