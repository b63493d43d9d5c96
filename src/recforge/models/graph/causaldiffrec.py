"""CausalDiffRec: graph representation learning via causal diffusion for out-of-distribution
recommendation.

Zhao, Yang, Liang, Lan, Liu, Zhao, Guo & Wang, "Graph Representation Learning via Causal
Diffusion for Out-of-Distribution Recommendation", WWW 2025 (arXiv 2408.00490); the authors' code
is ``user683/CausalDiffRec`` (``train.py``, ``modules/diffusion.py``, ``modules/DNN.py``,
``modules/environment_inference.py``, ``modules/generator.py``).

The paper's structural causal model has a latent environment ``e`` (a confounder such as a
season or an event) that shapes both the observed interaction graph ``G`` and the interactions
``Y``. The model learns graph representations whose ranking follows ``P(Y | do(G))``, which the
backdoor adjustment writes as ``Σ_e P(Y | G, e) P(e)``; the environment is not observed, so a
variational posterior ``q(e | G)`` is inferred, and ``log P(Y | do(G)) ≥ E_q[log P(Y | G, e)] -
KL(q(e | G) || P(e))``. A diffusion model over the graph representations is conditioned on the
environment in its reverse (denoising) phase.

Architecture as implemented (one file, on LightGCN's propagation):

* **Graph encoder**: LightGCN (:mod:`recforge.models.graph.lightgcn`): ego embeddings of users and
  items propagated ``n_layers`` times over the normalised user-item graph, mean over the layers
  -> ``z`` (one row per node).
* **Environment graphs** (the paper's environment generator): ``env_graphs`` perturbed copies of
  the training graph, each dropping every edge with probability ``env_drop``, drawn anew at the
  start of every epoch; each is one training environment. ``env_graphs=0`` trains on the
  training graph alone.
* **Environment inference**: ``q(e | z_n) = softmax(W_2 tanh(W_1 z_n))`` over ``n_envs`` latent
  environments for every node ``n``; environment ``e`` has a learned embedding ``c_e``
  (``env_dim``). The prior ``P(e)`` of the ELBO is uniform.
* **Diffusion**: the forward process noises ``z`` as DiffRec (``x_t = sqrt(ᾱ_t) z +
  sqrt(1 - ᾱ_t) ε``, ``steps`` steps, ``noise_schedule`` ``linear-var`` or ``linear`` with
  ``noise_scale``, ``noise_min``, ``noise_max``). The denoiser predicts ``x_0`` from ``[dropout(x_t),
  time embedding, c_e]`` with one tanh hidden layer (``hidden``, None: ``dim``); the time
  embedding is sinusoidal (``time_dim``) followed by a linear layer. With ``skip=True`` (default)
  the prediction is ``x_t + MLP(...)``: the network learns the correction to its input.
* **Training loss** per environment graph, for the distinct users, positives and negatives of the
  batch (``t`` uniform per node): ``BPR(x̄_0) + diff_weight * Σ_e q(e|z) ‖f(x_t, t, c_e) - z‖²
  + kl_weight * KL(q(e|z) || uniform)``, where ``x̄_0 = Σ_e q(e|z) f(x_t, t, c_e)`` is the
  posterior expectation of the denoised representation: the ELBO's reconstruction term is the
  denoising error (a squared norm, summed over the dimensions as the Gaussian log-likelihood),
  the ranking term stands for ``E_q[log P(Y | G, e)]`` (BPR on the posterior-mean representation,
  not the posterior mean of one BPR term per environment: one ranking pass instead of
  ``n_envs``). Across the environment graphs:
  ``mean_k L_k + var_weight * Var_k L_k`` (the invariance objective of the authors' code, whose
  ``compute_beta`` is always 1), plus LightGCN's L2 on the batch's ego embeddings (``reg``).
  ``repropagate=True`` propagates the denoised representations of every node once more over the
  graph before ranking (the LightGCN stage the authors' code runs on the denoised embeddings);
  each step then denoises all nodes instead of the batch's.
* **Scoring** (the backdoor adjustment): ``z`` from the training graph, noised to step
  ``sampling_steps - 1`` with noise drawn from a generator seeded by ``seed`` (so scores are
  reproducible), then denoised step by step with the posterior mean of ``q(x_{t-1} | x_t, x̂_0)``
  and no sampling noise (the authors' ``sampling_noise=False``), where every step's
  ``x̂_0 = Σ_e P(e) f(x_t, t, c_e)`` and ``P(e)`` is the environments' marginal estimated as
  the mean posterior over all users and items of the training graph (``adjust=prior``, default);
  ``adjust=posterior`` weighs each node by its own posterior instead (no adjustment, an
  ablation). ``sampling_steps=0`` skips the noising and applies one denoising step at ``t=0``.
  Scores are dot products of the denoised user and item rows. Users unknown at training time
  (user ``-1``) are folded in as the mean of the denoised rows of their history items, as
  LightGCN. The denoised embeddings are cached until a parameter changes.

Side data: none; the model reads the training interactions only.

Deviations from the paper and the authors' code, and choices they leave open:

* Encoder: the authors' code encodes node features with a variational graph auto-encoder (two
  GCN layers, then an inner-product decoder trained on the dense adjacency) and afterwards trains
  a separate LightGCN, re-initialised every epoch from the denoised embeddings, with BPR. Here
  one LightGCN over ID embeddings is the encoder (our data has no node features; a dense
  adjacency does not scale), BPR acts on the denoised representations, and everything trains
  end to end in one loss; the dense link-reconstruction loss is not used.
* Environment generator: the authors' code follows EERM, a learned dense ``n x n`` edge editor
  per environment trained by REINFORCE to maximise the variance of the losses, after flipping
  80% of the dense adjacency's entries at random; that is quadratic in the number of nodes.
  Here the environments are random edge-dropout graphs (SGL's augmentation, drop ratio 0.1 as
  SGL), not learned; the model still minimises ``mean + var_weight * variance`` over them.
* Environment inference: the paper's posterior over environments; the authors' code uses a
  Gaussian VAE on the node representations (``EVAE``) whose decoded vector conditions the
  denoiser. Here the environments are categorical (``n_envs``, so the backdoor sum over ``e`` is
  exact), with a uniform prior, and the reconstruction term of the ELBO is the environment-
  conditioned denoising error.
* Ranking on the denoised rows: the authors' code copies the denoised embeddings into a fresh
  LightGCN every epoch and trains that one with BPR, so the ranking embeddings are free
  parameters that start from the diffusion output. Trained end to end, the ranking embeddings
  are the denoiser's output; without the skip connection (``skip=False``) and with the squared
  error averaged over the dimensions instead of summed, the MLP's output drifted under BPR and
  fell to Pop's level on the synthetic data of the tests (NDCG@10 .06-.13 against LightGCN's
  .15), so both are ours. Propagating the denoised rows again (``repropagate=True``, the
  authors' structure) smoothed them too much on that data (.13 against .14 without), so it is
  off by default.
* Diffusion: the authors' ``training_losses`` samples ``t`` by importance (loss history) and
  weighs by SNR differences; here ``t`` is uniform and the squared error unweighted. Their
  sampler clamps ``x̂_0`` to ``[-1, 1]`` (made for interaction vectors); embeddings are not
  clamped here. Their sampler denoises over every training step whatever ``sampling_steps``; here
  from ``sampling_steps - 1`` down to 0 (DiffRec's).
* Defaults: ``steps=100``, ``sampling_steps=100``, ``linear-var``, ``noise_scale=0.1``,
  ``noise_min=0.01``, ``noise_max=0.09``, ``time_dim=10``, ``env_graphs=3``, dropout 0.5 on the
  denoiser's input and one tanh hidden layer follow the authors' code; ``var_weight=1`` likewise.
  ``diff_weight=1`` and ``kl_weight=0.1`` keep the ratios of their ``adjust_loss`` (0.1 on the
  diffusion and reconstruction terms, 0.01 on the inference term). ``n_envs=4`` (their
  environment generator's size), ``env_dim=16`` (their environment vector), ``dim=64``,
  ``n_layers=3``, batch 4096 and lr 2e-3 are this library's LightGCN/SGL family defaults (their
  code uses 8 dimensions, Adagrad at lr 0.1 and 25 epochs). Their evaluation propagates over the
  test graph; ours over the training graph only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.graph.lightgcn import LightGCN
from recforge.models.graph.propagation import drop_edges, normalized_adjacency, propagate, split_nodes, to_torch
from recforge.training.graph_losses import bpr_loss

SCHEDULES = ("linear-var", "linear")
ADJUSTMENTS = ("prior", "posterior")


def diffusion_betas(schedule: str, steps: int, scale: float, low: float, high: float) -> np.ndarray:
    """DiffRec's noise schedules: ``linear`` betas from ``scale*low`` to ``scale*high``;
    ``linear-var``: the cumulative noise variance ``1 - ᾱ_t`` is that line instead."""
    line = np.linspace(scale * low, scale * high, steps, dtype=np.float64)
    if schedule == "linear":
        return line
    alpha_bar = 1.0 - line
    betas = np.empty(steps)
    betas[0] = line[0]
    betas[1:] = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    return betas


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (len(t), dim) of integer time steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], -1)
    return emb


class CausalDiffRec(LightGCN):
    name = "causaldiffrec"

    def __init__(self, n_envs: int = 4, env_dim: int = 16, env_graphs: int = 3, env_drop: float = 0.1,
                 var_weight: float = 1.0, diff_weight: float = 1.0, kl_weight: float = 0.1, steps: int = 100,
                 sampling_steps: int = 100, noise_schedule: str = "linear-var", noise_scale: float = 0.1,
                 noise_min: float = 0.01, noise_max: float = 0.09, time_dim: int = 10, hidden: int | None = None,
                 denoise_dropout: float = 0.5, adjust: str = "prior", repropagate: bool = False,
                 skip: bool = True, **base):
        super().__init__(**base)
        if self.loss_type != "bpr" or self.neg_sampler == "hard":
            raise ConfigError(f"{self.name} ranks with BPR on one negative per pair: set loss=bpr and "
                              "neg_sampler=uniform or popularity")
        if not isinstance(n_envs, (int, np.integer)) or n_envs < 1:
            raise ConfigError(f"n_envs={n_envs!r}: the number of latent environments must be a whole number >= 1")
        if not isinstance(env_dim, (int, np.integer)) or env_dim < 1:
            raise ConfigError(f"env_dim={env_dim!r}: the environment embedding size must be >= 1 (e.g. 16)")
        if not isinstance(env_graphs, (int, np.integer)) or env_graphs < 0:
            raise ConfigError(f"env_graphs={env_graphs!r}: the number of environment graphs must be >= 0 "
                              "(0: train on the training graph alone)")
        if not 0.0 <= env_drop < 1.0:
            raise ConfigError(f"env_drop={env_drop}: the edge drop ratio of the environment graphs must be in [0, 1)")
        if min(var_weight, diff_weight, kl_weight) < 0:
            raise ConfigError(f"var_weight={var_weight}, diff_weight={diff_weight}, kl_weight={kl_weight}: "
                              "loss weights must be >= 0 (0 switches a term off)")
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ConfigError(f"steps={steps!r}: the number of diffusion steps must be a whole number >= 1")
        if not isinstance(sampling_steps, (int, np.integer)) or not 0 <= sampling_steps <= steps:
            raise ConfigError(f"sampling_steps={sampling_steps!r}: must be between 0 and steps={steps}")
        if noise_schedule not in SCHEDULES:
            raise ConfigError(f"noise_schedule={noise_schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if not (noise_scale > 0 and 0 < noise_min <= noise_max and noise_scale * noise_max < 1):
            raise ConfigError(f"noise_scale={noise_scale}, noise_min={noise_min}, noise_max={noise_max}: need "
                              "noise_scale > 0, 0 < noise_min <= noise_max and noise_scale * noise_max < 1")
        if not isinstance(time_dim, (int, np.integer)) or time_dim < 2:
            raise ConfigError(f"time_dim={time_dim!r}: the time embedding size must be >= 2 (e.g. 10)")
        if hidden is not None and (not isinstance(hidden, (int, np.integer)) or hidden < 1):
            raise ConfigError(f"hidden={hidden!r}: the denoiser's hidden width must be >= 1, or null for dim")
        if not 0.0 <= denoise_dropout < 1.0:
            raise ConfigError(f"denoise_dropout={denoise_dropout}: must be in [0, 1)")
        if adjust not in ADJUSTMENTS:
            raise ConfigError(f"adjust={adjust!r}: choose one of {', '.join(ADJUSTMENTS)}")
        self.n_envs, self.env_dim, self.env_graphs, self.env_drop = int(n_envs), int(env_dim), int(env_graphs), env_drop
        self.var_weight, self.diff_weight, self.kl_weight = var_weight, diff_weight, kl_weight
        self.steps, self.sampling_steps, self.noise_schedule = int(steps), int(sampling_steps), noise_schedule
        self.noise_scale, self.noise_min, self.noise_max = noise_scale, noise_min, noise_max
        self.time_dim, self.hidden, self.denoise_dropout, self.adjust = int(time_dim), hidden, denoise_dropout, adjust
        self.repropagate, self.skip = bool(repropagate), bool(skip)

    # ---- network --------------------------------------------------------------------------------
    def build(self, n_users, n_items):
        net = super().build(n_users, n_items)
        hidden = self.hidden or self.dim
        net.env = nn.Embedding(self.n_envs, self.env_dim)
        nn.init.normal_(net.env.weight, std=0.1)
        net.infer = nn.Sequential(nn.Linear(self.dim, self.dim), nn.Tanh(), nn.Linear(self.dim, self.n_envs))
        net.time = nn.Linear(self.time_dim, self.time_dim)
        net.denoiser = nn.Sequential(nn.Linear(self.dim + self.time_dim + self.env_dim, hidden), nn.Tanh(),
                                     nn.Linear(hidden, self.dim))
        for layer in [net.time, *net.infer, *net.denoiser]:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)
        betas = diffusion_betas(self.noise_schedule, self.steps, self.noise_scale, self.noise_min, self.noise_max)
        alpha_bar = np.cumprod(1.0 - betas)
        prev = np.r_[1.0, alpha_bar[:-1]]
        schedule = {"sqrt_ab": np.sqrt(alpha_bar), "sqrt_1m_ab": np.sqrt(1.0 - alpha_bar),
                    "coef_x0": betas * np.sqrt(prev) / (1.0 - alpha_bar),
                    "coef_xt": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alpha_bar)}
        for key, value in schedule.items():
            net.register_buffer(key, torch.tensor(value, dtype=torch.float32), persistent=False)
        return net

    def env_posterior(self, z: torch.Tensor) -> torch.Tensor:
        """``q(e | z)``: (n, n_envs), rows on the simplex, from representations ``z`` (n, dim)."""
        return torch.softmax(self.net_.infer(z), -1)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, train: bool = False) -> torch.Tensor:
        """``f(x_t, t, c_e)`` for every environment ``e``: (n, n_envs, dim)."""
        n, k = x_t.shape[0], self.n_envs
        x = F.dropout(x_t, self.denoise_dropout, training=train)
        temb = self.net_.time(timestep_embedding(t, self.time_dim))
        h = torch.cat([x.unsqueeze(1).expand(n, k, -1), temb.unsqueeze(1).expand(n, k, -1),
                       self.net_.env.weight.unsqueeze(0).expand(n, k, -1)], -1)
        out = self.net_.denoiser(h)
        return x_t.unsqueeze(1) + out if self.skip else out

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        net = self.net_
        return net.sqrt_ab[t].unsqueeze(1) * x0 + net.sqrt_1m_ab[t].unsqueeze(1) * noise

    def sample(self, x0: torch.Tensor, weights: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """The reverse process from ``x0`` (n, dim) noised to step ``sampling_steps - 1``, every
        step's ``x̂_0`` the environments' predictions weighted by ``weights`` (n, n_envs) or
        (n_envs,); no sampling noise. Deterministic for a given ``seed`` (None: the model's)."""
        net = self.net_
        w = weights.expand(x0.shape[0], self.n_envs).unsqueeze(-1)
        s = self.sampling_steps
        if s == 0:
            x = x0
        else:
            gen = torch.Generator(device=x0.device).manual_seed(int(self.seed if seed is None else seed))
            noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
            x = self.q_sample(x0, torch.full((x0.shape[0],), s - 1, dtype=torch.long, device=x0.device), noise)
        for i in reversed(range(max(s, 1))):
            t = torch.full((x0.shape[0],), i, dtype=torch.long, device=x0.device)
            pred = (w * self.denoise(x, t)).sum(1)
            x = net.coef_x0[i] * pred + net.coef_xt[i] * x
        return x

    # ---- training -------------------------------------------------------------------------------
    def train_batches(self, split, rng):
        self._envs = [to_torch(normalized_adjacency(drop_edges(self.graph_, self.env_drop, rng)), self.device_)
                      for _ in range(self.env_graphs)]
        yield from super().train_batches(split, rng)

    def environment_loss(self, batch: dict, adj: torch.Tensor) -> torch.Tensor:
        """BPR on the ranking representations + ELBO terms, on one environment graph."""
        users, items = self.propagate(adj)
        u, i, j = batch["u"], batch["i"], batch["j"][:, 0]
        if self.repropagate:  # every node is denoised, then propagated again over the graph
            z = torch.cat([users, items], 0)
            uu, ii = u, torch.cat([i, j])
        else:  # only the batch's distinct nodes
            uu, u_inv = torch.unique(u, return_inverse=True)
            ii, i_inv = torch.unique(torch.cat([i, j]), return_inverse=True)
            z = torch.cat([users[uu], items[ii]], 0)
        t = torch.randint(0, self.steps, (z.shape[0],), device=z.device)
        x_t = self.q_sample(z, t, torch.randn_like(z))
        post = self.env_posterior(z)
        pred = self.denoise(x_t, t, train=self.net_.training)
        x0 = (post.unsqueeze(-1) * pred).sum(1)
        if self.repropagate:
            ru, ri = split_nodes(propagate(adj, x0, self.n_layers, include_ego=self.include_ego), self.n_users_)
            eu, ei = ru[uu], ri[ii]
        else:
            eu, ei = x0[: len(uu)][u_inv], x0[len(uu):][i_inv]
        out = bpr_loss((eu * ei[: len(i)]).sum(-1), (eu * ei[len(i):]).sum(-1))
        if self.diff_weight > 0:
            out = out + self.diff_weight * (post * (pred - z.unsqueeze(1)).pow(2).sum(-1)).sum(1).mean()
        if self.kl_weight > 0:
            kl = (post * (torch.log(post.clamp_min(1e-12)) + math.log(self.n_envs))).sum(1).mean()
            out = out + self.kl_weight * kl
        return out

    def loss(self, batch):
        self._cache = None
        envs = getattr(self, "_envs", None) or [self.adjacency()]
        losses = torch.stack([self.environment_loss(batch, adj) for adj in envs])
        out = losses.mean()
        if len(losses) > 1 and self.var_weight > 0:
            out = out + self.var_weight * losses.var(unbiased=False)
        u, i, j = batch["u"], batch["i"], batch["j"][:, 0]
        w_u, w_i = self.net_.user.weight, self.net_.item.weight
        l2 = w_u[u].pow(2).sum() + w_i[i].pow(2).sum() + w_i[j].pow(2).sum()
        return out + self.reg * 0.5 * l2 / len(u)

    # ---- scoring --------------------------------------------------------------------------------
    def scoring_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Denoised (users, items) rows of the current weights and the environment prior (cached by
        LightGCN's ``cached_tables``)."""
        users, items = self.propagate()
        z = torch.cat([users, items], 0)
        post = self.env_posterior(z)
        real = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        real[self.n_users_] = False  # the padding item
        prior = post[real].mean(0)
        x = self.sample(z, prior if self.adjust == "prior" else post)
        if self.repropagate:
            x = propagate(self.adjacency(), x, self.n_layers, include_ego=self.include_ego)
        users, items = split_nodes(x, self.n_users_)
        return users, items, prior

    def environment_prior(self) -> torch.Tensor:
        """``P(e)`` of the backdoor adjustment: the mean posterior over the training graph's nodes."""
        return self.cached_tables()[2]

    def user_posterior(self, hist) -> torch.Tensor:
        """``q(e | z_u)`` (batch, n_envs) of the users of ``hist``; unknown users (-1) from the mean
        encoder representation of their history items."""
        with torch.no_grad():
            users_z, items_z = self.propagate()
            users = torch.from_numpy(np.asarray(hist.users, dtype=np.int64)).to(items_z.device)
            known = (users >= 0) & (users < self.n_users_)
            z = users_z[users.clamp(min=0, max=self.n_users_ - 1)]
            if not bool(known.all()):
                m = hist.matrix
                counts = np.maximum(np.asarray(m.sum(1)).ravel(), 1).astype(np.float32)
                fold = torch.from_numpy((m @ items_z.cpu().numpy()) / counts[:, None]).float().to(items_z.device)
                z = torch.where(known.unsqueeze(1), z, fold)
            return self.env_posterior(z)

    def protocol_notes(self) -> dict:
        return {**super().protocol_notes(),
                "side_data": "none (training interactions only)",
                "environments": f"{self.n_envs} latent environments (categorical posterior, uniform prior); "
                                f"{self.env_graphs} edge-dropout environment graphs (drop {self.env_drop:g}) an epoch, "
                                f"mean + {self.var_weight:g} x variance of their losses",
                "diffusion": f"{self.noise_schedule} schedule, {self.steps} steps, x0-prediction; scoring denoises "
                             f"from step {self.sampling_steps} without sampling noise",
                "adjustment": "backdoor: environments weighted by their marginal P(e) (mean posterior) at scoring"
                              if self.adjust == "prior" else "none: each node's own posterior at scoring"}
