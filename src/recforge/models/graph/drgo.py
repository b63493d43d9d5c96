"""DRGO: distributionally robust graph recommendation with diffusion denoising.

Zhao, Yang, Liang, Zhao, Guo & Wang, "Distributionally Robust Graph Out-of-Distribution
Recommendation via Diffusion Model", The Web Conference (WWW) 2025 (arXiv 2501.15555; authors'
code: github.com/user683/DRGO). It builds on DR-GNN (Wang, Chen, Li, Zhou, Shi, Gao, Feng, Chen &
Wang, "Distributionally Robust Graph-based Recommendation System", WWW 2024), which brought
distributionally robust optimisation (DRO) to LightGCN-style recommenders; DRGO adds a latent
diffusion model that denoises the node embeddings and an entropy-regularised DRO objective so
that noisy groups of samples cannot take extreme weights in the worst-case distribution.

Architecture as implemented (a LightGCN subclass):

* **Graph encoder.** Ego embeddings ``E_0`` of users and items propagated ``n_layers`` times over
  the normalised training graph, layers averaged (LightGCN): ``Z``.
* **Latent diffusion.** A Gaussian diffusion over the embeddings with ``diff_steps`` steps and the
  authors' "linear-var" schedule (``1 - ᾱ_t`` linear from ``noise_scale * noise_min`` to
  ``noise_scale * noise_max``; ``noise_schedule=linear`` makes ``β_t`` linear instead). The
  denoiser is the authors' MLP: the L2-normalised input concatenated with a linear map of a
  sinusoidal step embedding (``time_dim``), one tanh hidden layer of ``dim`` units, a linear output;
  it predicts ``z_0`` from ``z_t``. Its loss is the simplified ELBO ``‖f(z_t, t) - z_0‖²`` for a
  uniform step ``t`` and ``z_t = √ᾱ_t z_0 + √(1-ᾱ_t) ε``, on the batch's nodes, times
  ``diff_weight``. Denoising runs the reverse chain as the authors' inference does (start from the
  clean ``z``, the steps ``T-1 .. 0``, posterior means, no sampling noise); the last step returns the
  denoiser's ``z_0``. The denoised embeddings ``Z̃`` are what is ranked (``score(u, i) = z̃_u · z̃_i``)
  and what the ranking loss is computed on (the batch's nodes go through the chain with gradients).
* **Uncertainty set and DRO.** Users are clustered into ``n_groups`` groups (k-means on a rank
  ``svd_dim`` truncated SVD of the training matrix, as the authors' code); a training pair belongs
  to its user's group, and the training distributions considered are the reweightings of these
  groups. The nominal ("ideal") distribution is the embedding cloud of the most central nodes (the
  top ``central_share`` of nodes); a group's distance to it is the entropic optimal-transport
  (Sinkhorn) cost between the batch's users of the group and those nodes (their propagated
  embeddings, before denoising, so the chain runs on the batch's nodes only; Euclidean cost,
  ``sinkhorn_eps``, ``sinkhorn_iters`` log-domain iterations). The adversary's objective for group
  ``g`` is ``a_g = EMA(L_g - sinkhorn_weight * S_g)`` (``L_g``: the batch's mean BPR loss of the
  group; momentum ``dro_momentum`` as the authors' code), and its weights follow an entropy-
  regularised exponentiated-gradient ascent, ``w ← softmax((1 - η λ) log w + η a)`` with
  ``η = dro_step`` and ``λ = dro_entropy``: the ascent on ``Σ_g w_g a_g + λ H(w)``, whose fixed
  point is ``w = softmax(a / λ)`` (with ``λ = 0`` it is Group-DRO's update, which drifts to the
  single worst group). The ranking loss is ``Σ_g w_g L_g`` over the groups of the batch (weights
  renormalised over them; the weights are constants for the model's step), plus L2 on the batch's
  ego embeddings as LightGCN, plus the diffusion loss.

:meth:`dro_state` returns the groups' weights and objectives; :func:`dro_update` is the weight
update on its own.

Deviations and choices the paper leaves open:

* The graph encoder is the model's own LightGCN rather than a VGAE over node features: the data
  here has no node features, and the VGAE's dense ``N x N`` decoder does not scale to a catalogue.
  The diffusion therefore denoises the propagated embeddings (denoise after propagation) rather
  than VGAE latents that LightGCN then propagates: the chain runs on the batch's nodes only, not
  the whole graph at every step. The diffusion loss trains the denoiser only (its input and target
  are detached from the encoder, which learns from the ranking loss through the chain); jointly
  training the encoder on it would let it shrink the embeddings towards the noise-free zero.
* The denoiser's output is ``z_t + MLP(...)`` with the last layer initialised to zero, so the chain
  starts as the identity (the authors' MLP predicts ``z_0`` from scratch; on the ranking path a
  random map would first scramble the embeddings). The input dropout (0.5) of the authors' MLP is
  left out, as it would perturb the ranked embeddings. The ELBO's SNR reweighting of the authors'
  code is left out (with these small noise levels the weights reach 10^4 and would swamp the
  ranking loss in joint training).
* ``diff_steps=10`` where the authors use 100: with the linear-var schedule the noise at the last
  step is the same whatever the number of steps, and every training step runs the chain.
* Centrality is the node degree, not betweenness (the authors read a precomputed betweenness
  centrality; computing it costs O(nodes x edges)); the nominal cloud is capped at the
  ``max_points`` most central nodes and a group's points at ``max_points`` users.
* The Sinkhorn term only shapes the adversary's weights (it is computed on detached embeddings);
  the authors' code leaves it in the training loss with a gradient that pushes embeddings away from
  the central nodes. The entropy term is an entropy of the group weights (the paper's stated aim:
  no extreme weights); the authors' code applies ``x log x`` to embedding values instead.
* Training visits every pair once per epoch with fresh negatives (LightGCN's sampler) and L2 on
  the batch's ego embeddings; the authors draw one fixed negative per pair and use L2 on the final
  embeddings. ``dro_step=0.01`` (authors: 0.001 over about a thousand steps, which moves the
  weights by a few percent) lets the weights reach the entropy-regularised worst case within a run.
* The authors' evaluation propagates over the test interactions; here ranking uses the training
  graph only. Unknown users (``-1``) are folded in as the mean of the denoised embeddings of their
  history items. Only ``loss=bpr`` is supported (CPR's cross groups have no per-pair loss).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.graph.lightgcn import LightGCN
from recforge.models.graph.propagation import split_nodes
from recforge.training.samplers import select_hardest

NOISE_SCHEDULES = ("linear-var", "linear")


# ---- diffusion ----------------------------------------------------------------------------------
def diffusion_schedule(steps: int, scale: float, low: float, high: float, kind: str = "linear-var") -> dict:
    """Constants of the Gaussian diffusion (float64 NumPy arrays of length ``steps``)."""
    var = np.linspace(scale * low, scale * high, steps, dtype=np.float64)
    if kind == "linear":
        betas = var
    else:  # linear-var: 1 - ᾱ_t is linear
        betas = np.empty(steps)
        betas[0] = var[0]
        betas[1:] = np.minimum(1.0 - (1.0 - var[1:]) / (1.0 - var[:-1]), 0.999)
    abar = np.cumprod(1.0 - betas)
    prev = np.r_[1.0, abar[:-1]]
    return {"sqrt_abar": np.sqrt(abar), "sqrt_1m_abar": np.sqrt(1.0 - abar),
            "coef_x0": betas * np.sqrt(prev) / (1.0 - abar),
            "coef_xt": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - abar)}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embeddings (cos, sin) of the steps ``t``, shape (len(t), dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, dim % 2))


class Denoiser(nn.Module):
    """Predicts ``z_0`` from ``z_t`` and the step ``t``: ``z_t + out(tanh(in([norm(z_t), time(t)])))``."""

    def __init__(self, dim: int, hidden: int, time_dim: int):
        super().__init__()
        self.time_dim = time_dim
        self.time = nn.Linear(time_dim, time_dim)
        self.inp = nn.Linear(dim + time_dim, hidden)
        self.out = nn.Linear(hidden, dim)
        for layer in (self.time, self.inp):  # the authors' init: N(0, 2 / (fan_in + fan_out)), bias N(0, 1e-3)
            nn.init.normal_(layer.weight, std=math.sqrt(2.0 / sum(layer.weight.shape)))
            nn.init.normal_(layer.bias, std=1e-3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(timestep_embedding(t, self.time_dim))
        h = torch.tanh(self.inp(torch.cat([F.normalize(z, dim=-1), temb], -1)))
        return z + self.out(h)


# ---- DRO ------------------------------------------------------------------------------------------
def dro_update(weights: torch.Tensor, objective: torch.Tensor, losses: torch.Tensor, present: torch.Tensor,
               distances: torch.Tensor | None, step: float, entropy: float, sinkhorn_weight: float,
               momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One ascent step of the adversary: the groups' objectives ``EMA(L_g - sinkhorn_weight * S_g)``
    (groups absent from the batch keep theirs), then ``w ← softmax((1 - step * entropy) log w +
    step * objective)``. Returns ``(weights, objective)``; the fixed point is
    ``softmax(objective / entropy)``."""
    target = losses if distances is None else losses - sinkhorn_weight * distances
    objective = torch.where(present, (1.0 - momentum) * objective + momentum * target, objective)
    logits = (1.0 - step * entropy) * torch.log(weights.clamp_min(1e-30)) + step * objective
    return torch.softmax(logits, 0), objective


def sinkhorn_distance(x: torch.Tensor, y: torch.Tensor, eps: float = 0.05, iters: int = 50) -> torch.Tensor:
    """Entropic optimal-transport cost ``<P, C>`` between the uniform point clouds ``x`` and ``y``
    (Euclidean cost), by ``iters`` log-domain Sinkhorn iterations."""
    c = torch.cdist(x, y)
    log_a, log_b = -math.log(len(x)), -math.log(len(y))
    f, g = torch.zeros(len(x), device=x.device), torch.zeros(len(y), device=x.device)
    for _ in range(iters):
        f = -eps * torch.logsumexp((g[None, :] - c) / eps + log_b, 1)
        g = -eps * torch.logsumexp((f[:, None] - c) / eps + log_a, 0)
    plan = torch.exp((f[:, None] + g[None, :] - c) / eps + log_a + log_b)
    return (plan * c).sum()


def user_groups(r: sp.csr_matrix, n_groups: int, rank: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    """k-means (k-means++ seeding, Lloyd iterations) of the users on a rank-``rank`` truncated SVD
    of the user x item matrix ``r``; users without training items join group 0."""
    n_users = r.shape[0]
    active = np.flatnonzero(np.diff(r.indptr) > 0)
    groups = np.zeros(n_users, dtype=np.int64)
    k = min(n_groups, len(active))
    if k <= 1:
        return groups
    sub = sp.csr_matrix(r[active], dtype=np.float64)
    rank = min(rank, min(sub.shape) - 1)
    if rank >= 1:
        u, s, _ = spla.svds(sub, k=rank, v0=rng.standard_normal(min(sub.shape)))
        x = u * s
    else:
        x = sub.toarray()
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), 1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1.0 / len(x))
        centres.append(x[rng.choice(len(x), p=p)])
    centres = np.asarray(centres)
    assign = np.zeros(len(x), dtype=np.int64)
    for it in range(iters):
        new = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        if it > 0 and np.array_equal(new, assign):
            break
        assign = new
        for c in range(k):
            if (assign == c).any():
                centres[c] = x[assign == c].mean(0)
    groups[active] = assign
    return groups


class DRGO(LightGCN):
    name = "drgo"

    def __init__(self, n_layers: int = 2, n_groups: int = 5, svd_dim: int = 64, dro_step: float = 0.01,
                 dro_entropy: float = 0.1, dro_momentum: float = 0.3, sinkhorn_weight: float = 1.0,
                 sinkhorn_eps: float = 0.05, sinkhorn_iters: int = 50, central_share: float = 0.05,
                 max_points: int = 512, diff_steps: int = 10, noise_schedule: str = "linear-var",
                 noise_scale: float = 0.1, noise_min: float = 1e-4, noise_max: float = 0.02, time_dim: int = 16,
                 diff_weight: float = 1.0, **base):
        super().__init__(n_layers=n_layers, **base)
        if self.loss_type != "bpr":
            raise ConfigError(f"loss={self.loss_type!r}: DRGO weighs per-pair BPR losses by group; use loss=bpr")
        if n_groups < 1 or svd_dim < 1:
            raise ConfigError(f"n_groups={n_groups}, svd_dim={svd_dim}: both must be >= 1 (the paper uses 5 groups)")
        if dro_step < 0 or dro_entropy < 0 or dro_step * dro_entropy > 1:
            raise ConfigError(f"dro_step={dro_step}, dro_entropy={dro_entropy}: need both >= 0 and their product "
                              "<= 1 (e.g. dro_step=0.01, dro_entropy=0.1)")
        if not 0.0 < dro_momentum <= 1.0:
            raise ConfigError(f"dro_momentum={dro_momentum}: must be in (0, 1], e.g. 0.3")
        if sinkhorn_weight < 0 or sinkhorn_eps <= 0 or sinkhorn_iters < 1:
            raise ConfigError("need sinkhorn_weight >= 0, sinkhorn_eps > 0 and sinkhorn_iters >= 1 "
                              "(e.g. 1.0, 0.05, 50)")
        if not 0.0 < central_share <= 1.0 or max_points < 1:
            raise ConfigError(f"central_share={central_share}, max_points={max_points}: need 0 < central_share <= 1 "
                              "and max_points >= 1")
        if diff_steps < 1 or time_dim < 2 or diff_weight < 0:
            raise ConfigError(f"diff_steps={diff_steps}, time_dim={time_dim}, diff_weight={diff_weight}: need "
                              "diff_steps >= 1, time_dim >= 2 and diff_weight >= 0")
        if noise_schedule not in NOISE_SCHEDULES:
            raise ConfigError(f"noise_schedule={noise_schedule!r}: choose one of {', '.join(NOISE_SCHEDULES)}")
        if not 0.0 < noise_min < noise_max or not 0.0 < noise_scale * noise_max < 1.0:
            raise ConfigError(f"noise_min={noise_min}, noise_max={noise_max}, noise_scale={noise_scale}: need "
                              "0 < noise_min < noise_max and 0 < noise_scale * noise_max < 1")
        self.n_groups, self.svd_dim = n_groups, svd_dim
        self.dro_step, self.dro_entropy, self.dro_momentum = dro_step, dro_entropy, dro_momentum
        self.sinkhorn_weight, self.sinkhorn_eps, self.sinkhorn_iters = sinkhorn_weight, sinkhorn_eps, sinkhorn_iters
        self.central_share, self.max_points = central_share, max_points
        self.diff_steps, self.noise_schedule = diff_steps, noise_schedule
        self.noise_scale, self.noise_min, self.noise_max = noise_scale, noise_min, noise_max
        self.time_dim, self.diff_weight = time_dim, diff_weight

    # ---- data -------------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        rng = np.random.default_rng(self.seed)
        self.user_group_ = user_groups(self.graph_, self.n_groups, self.svd_dim, rng)
        self.group_pairs_ = np.bincount(self.user_group_[self._pairs[:, 0]], minlength=self.user_group_.max() + 1)
        deg = np.r_[np.diff(self.graph_.indptr), np.asarray(self.graph_.sum(0)).ravel()]  # users, then items
        n_central = min(max(1, int(round(self.central_share * np.count_nonzero(deg)))), self.max_points)
        self.central_ = np.argsort(-deg, kind="stable")[:n_central].astype(np.int64)

    def build(self, n_users, n_items):
        net = super().build(n_users, n_items)
        net.denoiser = Denoiser(self.dim, self.dim, self.time_dim)
        k = int(self.user_group_.max()) + 1 if getattr(self, "user_group_", None) is not None else self.n_groups
        net.register_buffer("dro_weights", torch.full((k,), 1.0 / k))
        net.register_buffer("dro_objective", torch.zeros(k))
        return net

    def make_batch(self, idx, rng):
        batch = super().make_batch(idx, rng)
        batch["g"] = torch.from_numpy(self.user_group_[batch["u"].numpy()])
        return batch

    # ---- diffusion ----------------------------------------------------------------------------------
    def _schedule(self, device) -> dict:
        sched = getattr(self, "_sched", None)
        if sched is None or sched["sqrt_abar"].device != device:
            consts = diffusion_schedule(self.diff_steps, self.noise_scale, self.noise_min, self.noise_max,
                                        self.noise_schedule)
            sched = self._sched = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in consts.items()}
        return sched

    def denoise(self, z: torch.Tensor) -> torch.Tensor:
        """The reverse chain from the clean ``z`` (steps ``T-1 .. 0``, posterior means)."""
        sched, f = self._schedule(z.device), self.net_.denoiser
        x = z
        for t in range(self.diff_steps - 1, -1, -1):
            steps = torch.full((len(z),), t, dtype=torch.long, device=z.device)
            x = sched["coef_x0"][t] * f(x, steps) + sched["coef_xt"][t] * x
        return x

    def diffusion_loss(self, z0: torch.Tensor) -> torch.Tensor:
        """``‖f(z_t, t) - z_0‖²`` (mean over nodes of the mean over dimensions), uniform ``t``."""
        sched = self._schedule(z0.device)
        t = torch.randint(0, self.diff_steps, (len(z0),), device=z0.device)
        zt = sched["sqrt_abar"][t, None] * z0 + sched["sqrt_1m_abar"][t, None] * torch.randn_like(z0)
        return (self.net_.denoiser(zt, t) - z0).pow(2).mean()

    # ---- loss ----------------------------------------------------------------------------------------
    def loss(self, batch):
        self._cache = None
        users, items = self.propagate()
        z = torch.cat([users, items], 0)
        u, i, j = batch["u"], batch["i"], batch["j"]
        b, n_neg = len(u), j.shape[1]
        nodes = torch.cat([u, self.n_users_ + i, self.n_users_ + j.reshape(-1)])
        uniq, inv = torch.unique(nodes, return_inverse=True)
        den = self.denoise(z[uniq])
        eu, ei, ej = den[inv[:b]], den[inv[b:2 * b]], den[inv[2 * b:]].view(b, n_neg, -1)
        if n_neg > 1:  # hard negatives: the best-scored candidate of the pool
            with torch.no_grad():
                pick = select_hardest(torch.arange(n_neg, device=u.device).expand(b, n_neg),
                                      torch.einsum("bd,bkd->bk", eu, ej), 1)
            j, ej = j.gather(1, pick), ej[torch.arange(b, device=u.device), pick[:, 0]].unsqueeze(1)
        per_pair = F.softplus((eu.unsqueeze(1) * ej).sum(-1)[:, 0] - (eu * ei).sum(-1))
        rank = self.robust_loss(per_pair, batch["g"], u, z)
        w_u, w_i = self.net_.user.weight, self.net_.item.weight
        l2 = w_u[u].pow(2).sum() + w_i[i].pow(2).sum() + w_i[j[:, 0]].pow(2).sum()
        out = rank + self.reg * 0.5 * l2 / b
        if self.diff_weight > 0:
            out = out + self.diff_weight * self.diffusion_loss(z[uniq].detach())
        return out

    def robust_loss(self, per_pair: torch.Tensor, g: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``Σ_g w_g L_g`` over the batch's groups after the adversary's step (weights detached)."""
        net = self.net_
        k = len(net.dro_weights)
        g = g.to(per_pair.device)
        counts = torch.bincount(g, minlength=k)
        present = counts > 0
        sums = torch.zeros(k, device=per_pair.device, dtype=per_pair.dtype).index_add(0, g, per_pair)
        means = sums / counts.clamp_min(1)
        with torch.no_grad():
            dist = self.group_distances(g, u, z, present) if self.sinkhorn_weight > 0 else None
            w, obj = dro_update(net.dro_weights, net.dro_objective, means.detach().float(), present, dist,
                                self.dro_step, self.dro_entropy, self.sinkhorn_weight, self.dro_momentum)
            net.dro_weights.copy_(w)
            net.dro_objective.copy_(obj)
            wp = torch.where(present, w, torch.zeros_like(w))
            wp = wp / wp.sum()
        return (wp.to(means.dtype) * means).sum()

    def group_distances(self, g: torch.Tensor, u: torch.Tensor, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Sinkhorn cost between each present group's batch users and the central nodes (0 for absent
        groups), on the detached propagated embeddings ``z`` (users, then items)."""
        z = z.detach().float()
        ideal = z[torch.from_numpy(self.central_).to(z.device)]
        out = torch.zeros(len(present), device=z.device)
        for c in torch.nonzero(present).flatten().tolist():
            members = torch.unique(u[g == c])[: self.max_points]
            out[c] = sinkhorn_distance(z[members], ideal, self.sinkhorn_eps, self.sinkhorn_iters)
        return out

    # ---- scoring ---------------------------------------------------------------------------------------
    def scoring_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoised propagated (users, items) embeddings (cached by LightGCN's ``cached_tables``)."""
        users, items = self.propagate()
        users, items = split_nodes(self.denoise(torch.cat([users, items], 0)), self.n_users_)
        items[0] = 0.0  # the padding item
        return users, items

    def dro_state(self) -> dict:
        """The groups' current DRO weights and objectives, and their sizes (training pairs)."""
        return {"weights": self.net_.dro_weights.cpu().numpy().copy(),
                "objective": self.net_.dro_objective.cpu().numpy().copy(), "sizes": self.group_pairs_.copy()}

    def protocol_notes(self) -> dict:
        notes = super().protocol_notes()
        w = self.net_.dro_weights.cpu().numpy() if getattr(self, "net_", None) is not None else None
        notes.update(
            side_data="none (training interactions only)",
            dro=f"{len(w) if w is not None else self.n_groups} user groups (k-means on a rank-{self.svd_dim} SVD of "
                f"the training matrix); entropy-regularised group DRO (step {self.dro_step}, entropy "
                f"{self.dro_entropy}), Sinkhorn distance to the top {self.central_share:.0%} nodes by degree "
                f"(weight {self.sinkhorn_weight})",
            denoising=f"latent diffusion over the propagated embeddings, {self.diff_steps} steps "
                      f"({self.noise_schedule}, scale {self.noise_scale}); ranking on the denoised embeddings")
        if w is not None:
            notes["dro_weights"] = [round(float(x), 4) for x in w]
        return notes
