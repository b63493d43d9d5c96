"""CNSDiff: causal negative sampling by a conditional diffusion model in the embedding space.

Zhao, Yang, Dang, Zhao, Guo & Wang, "Causal Negative Sampling via Diffusion Model for
Out-of-Distribution Recommendation", arXiv:2508.07243, 2025 (authors' code: ``user683/CNSDiff``,
a SELFRec-based PyTorch implementation).

The recommender is LightGCN (:mod:`recforge.models.graph.lightgcn`) trained with BPR, but the
negative of each training pair ``(u, i)`` is not an item of the catalogue: it is *synthesised* in
the embedding space. Heuristic samplers pick negatives from a candidate pool (all unseen items,
popular ones, the best-scored of a pool); the paper argues that environmental confounders of that
pool (exposure, popularity) turn some of its hard negatives into false hard negatives, and
generates negatives instead, with a causal regulariser on the generator.

Architecture as implemented:

* **Diffusion over item embeddings** (the Gaussian diffusion of DiffRec, Wang et al. SIGIR 2023,
  which the authors' code follows): ``T = steps`` steps, variance schedule ``noise_schedule``
  (``linear-var``: ``1 - ᾱ_t`` linear from ``noise_scale * noise_min`` to
  ``noise_scale * noise_max``; ``linear``: the betas linear over that range); forward
  ``x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε``. ``x_0`` is the propagated LightGCN embedding of the positive
  item.
* **Denoiser** ``x̂_0 = f(x_t, t, c)``: one tanh hidden layer of ``hidden`` units over the
  concatenation of the (L2-normalised, ``denoiser_dropout``-dropped) noisy embedding, a linear map
  of the sinusoidal embedding of ``t`` (``time_dim``) and, with ``condition=user``, the
  L2-normalised propagated embedding of the user; a linear output layer. It predicts ``x_0``;
  ``p(x_{t-1} | x_t)`` is the posterior ``q(x_{t-1} | x_t, x̂_0)``.
* **Training of the denoiser**, every step, on the batch's positives:
  ``L_diff = w_t ‖x_0 - x̂_0‖² / d + causal_weight * KL(N(x̂_0, σ²_t) ‖ N(x_{t-1}, σ²_{t-1}))``,
  ``t`` uniform, ``w_t = SNR(t-1) - SNR(t)`` (1 at ``t = 0``) with ``reweight``, ``σ²_t`` the
  clipped posterior variances, ``x_{t-1}`` the forward sample one step less noisy with the same
  ``ε`` (variance 1 at ``t = 0``). The KL term is the paper's causal regularisation in the form of
  the authors' code: the prediction of the clean embedding must agree in distribution with the
  next state of the chain, which the paper motivates as removing the environment's influence from
  the generation. The loss enters the total with ``diff_weight``.
* **Generation** (no gradient), for every training pair: the positive's embedding is noised to
  each level ``s`` of ``sample_start, sample_start + sample_stride, ... <= steps`` and denoised by
  the full reverse chain ``t = T-1 .. 0`` (posterior means; ``sampling_noise`` adds the posterior
  noise); of these candidates, the one the user scores highest is the generated negative
  (hardness control: a harder negative is one closer to the user's preference).
* **Mixing curriculum**: the negative in BPR is ``r · generated + (1 - r) · e_j`` with ``e_j`` the
  propagated embedding of an unseen item drawn by ``neg_sampler`` (uniform or popularity) and
  ``r ~ Beta(α, β)`` per pair, ``(α, β)`` moving linearly from ``(mix_alpha0, mix_beta0)`` to
  ``(mix_alpha1, mix_beta1)`` over the first ``mix_epochs`` epochs (then fixed), raised to at least
  ``min_mix``: training starts with mostly sampled negatives and ends with mostly generated ones.
* Optional contrastive term (``cl_weight > 0``, authors' code): the positive item's embedding
  against a slightly noised copy of itself (``cl_noise``) as the positive and every generated and
  sampled negative of the batch as negatives, cosine over ``cl_temp``.

Everything else is LightGCN's, on purpose: the graph, propagation, the training pairs
(``pair_sampling``), the optimiser, batch size, learning rate, L2 on the ego embeddings of user,
positive and the *sampled* item ``j`` (as the authors' code), early stopping, scoring and the
folding-in of unknown users (the mean of their history items' propagated embeddings). The default
configuration (``cnsdiff.yaml``) keeps ``lightgcn.yaml``'s training settings, so a comparison with
``lightgcn``'s ``neg_sampler=uniform|popularity|hard`` differs only in the negatives (the
denoiser's loss is computed on detached embeddings and ``cl_weight`` is 0 by default, so no other
term reaches the recommender's parameters).

Choices and deviations. The equations are taken from the authors' code, read as the reference
for the paper's method; defaults follow that code unless said otherwise:

* The authors' code creates an optimiser for the denoiser but never steps it, so its denoiser
  keeps its random initialisation and the diffusion loss only reaches the LightGCN embeddings, at
  weight 1e-6. Here the denoiser is trained with the recommender's Adam, on detached embeddings
  (the recommender is not pulled by the diffusion loss). The loss being the denoiser's only
  gradient, Adam's step hardly depends on ``diff_weight``: the authors' 1e-6 (default) trained the
  denoiser as well as 1.0 on our toy data, and keeps the logged loss BPR's. ``diff_weight=0``
  reproduces the code's untrained denoiser.
* Conditioning: the paper describes a conditional diffusion; in the authors' code the denoiser
  sees only ``(x_t, t)``, the condition being the start point (the positive) and the user entering
  through the choice of the hardest candidate. ``condition=user`` (our default) also feeds the
  user's embedding to the denoiser, so the generated negative is specific to the (user, positive)
  pair; ``condition=none`` is the code's denoiser.
* The reverse chain always runs all ``T`` steps whatever the starting noise level, as the authors'
  code (and DiffRec's inference) does; the denoiser's input dropout is active while generating
  during training, as there.
* The contrastive term of the authors' code (weight .3, temperature 2) is off by default, so the
  objective stays BPR + L2 as in the LightGCN baselines; ``cl_weight=0.3`` gives the code's
  objective.
* Recommender settings are this library's LightGCN defaults (3 layers, N(0, .1²) init, batch
  8192, lr 2e-3, early stopping) rather than the authors' run (2 layers, Xavier init, batch 2048,
  lr .01, 120 epochs); ``mix_epochs=120`` keeps their curriculum length in epochs.
* What the generated negatives look like: the authors' schedule is small (``1 - ᾱ_T = .002``), so
  the noised positive stays close to the positive and the trained denoiser returns an embedding
  near it (cosine ~.95 to the positive on our toy data, scored about as high as the positive, the
  hardest level sometimes higher). The hardness BPR sees is therefore set mostly by the mixing
  ratio: early in training the mixed negative scores near a sampled item, at the end of the
  curriculum near the positive.
* Cost: every step runs the denoiser ``len(levels) * steps`` times (60 by default) over the batch;
  on a CPU an epoch costs ~20 times LightGCN's (ML-100K, ``threads=1``: ~10 s against ~0.5 s).
* ``loss=cpr`` and ``neg_sampler=hard`` are refused (one sampled negative per pair is mixed).
* No side data: the generator learns from the training interactions only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.graph.lightgcn import LightGCN
from recforge.training.graph_losses import bpr_loss

SCHEDULES = ("linear-var", "linear")
CONDITIONS = ("user", "none")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embeddings (len(t), dim) of integer steps ``t`` (cosines, then sines)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def diffusion_schedule(steps: int, schedule: str, scale: float, low: float, high: float) -> dict[str, np.ndarray]:
    """The coefficients (float64, length ``steps``) of a Gaussian diffusion: betas, ᾱ_t, the
    posterior mean coefficients of ``q(x_{t-1} | x_t, x_0)``, its clipped log-variance and SNR."""
    lo, hi = scale * low, scale * high
    if schedule == "linear":
        betas = np.linspace(lo, hi, steps, dtype=np.float64)
    else:  # linear-var: 1 - ᾱ_t linear in t
        var = np.linspace(lo, hi, steps, dtype=np.float64)
        abar = 1.0 - var
        betas = np.empty(steps)
        betas[0] = var[0]
        betas[1:] = np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    clipped = np.concatenate([[post_var[1] if steps > 1 else betas[0]], post_var[1:]])
    return {"abar": abar, "coef_x0": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "coef_xt": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
            "post_logvar": np.log(clipped), "post_var": post_var, "snr": abar / (1.0 - abar)}


class Denoiser(nn.Module):
    """``x̂_0 = out(tanh(W [x_t ; time(t) ; c] + b))``. The first layer is kept as three blocks of
    one linear map over the concatenation, so that the time and condition parts are computed
    once per step and once per batch rather than for every row and every step."""

    def __init__(self, dim: int, hidden: int, time_dim: int, cond_dim: int, dropout: float, norm: bool):
        super().__init__()
        self.time_dim, self.norm = time_dim, norm
        self.time = nn.Linear(time_dim, time_dim)
        self.in_x = nn.Linear(dim, hidden)
        self.in_t = nn.Linear(time_dim, hidden, bias=False)
        self.in_c = nn.Linear(cond_dim, hidden, bias=False) if cond_dim else None
        self.out = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        fan_in = dim + time_dim + cond_dim  # Xavier-normal over the whole first layer, biases N(0, 1e-3²)
        for layer, (f_in, f_out) in [(self.time, (time_dim, time_dim)), (self.in_x, (fan_in, hidden)),
                                     (self.in_t, (fan_in, hidden)), (self.in_c, (fan_in, hidden)),
                                     (self.out, (hidden, dim))]:
            if layer is None:
                continue
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / (f_in + f_out)))
            if layer.bias is not None:
                nn.init.normal_(layer.bias, 0.0, 0.001)

    def condition(self, cond: torch.Tensor | None) -> torch.Tensor | float:
        """The condition's part of the first layer (0 without a condition)."""
        if self.in_c is None or cond is None:
            return 0.0
        return self.in_c(F.normalize(cond, dim=-1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond_part: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``t``: (batch,) steps, or a single step (shape (1,)) shared by every row."""
        tpart = self.in_t(self.time(timestep_embedding(t, self.time_dim)))
        if self.norm:
            x = F.normalize(x, dim=-1)
        h = torch.tanh(self.in_x(self.drop(x)) + tpart + cond_part)
        return self.out(h)


class CNSDiff(LightGCN):
    name = "cnsdiff"

    def __init__(self, steps: int = 20, noise_schedule: str = "linear-var", noise_scale: float = 0.1,
                 noise_min: float = 1e-4, noise_max: float = 0.02, hidden: int = 64, time_dim: int = 64,
                 denoiser_dropout: float = 0.5, denoiser_norm: bool = True, condition: str = "user",
                 reweight: bool = True, causal_weight: float = 0.1, diff_weight: float = 1e-6,
                 sample_start: int = 10, sample_stride: int = 4, sampling_noise: bool = False,
                 mix_alpha0: float = 1.0, mix_beta0: float = 9.0, mix_alpha1: float = 9.0, mix_beta1: float = 1.0,
                 min_mix: float = 0.0, mix_epochs: int = 120, cl_weight: float = 0.0, cl_temp: float = 2.0,
                 cl_noise: float = 0.01, **base):
        super().__init__(**base)
        if self.loss_type != "bpr":
            raise ConfigError(f"loss={self.loss_type!r}: cnsdiff mixes generated negatives into BPR; set loss=bpr")
        if self.neg_sampler == "hard":
            raise ConfigError("neg_sampler=hard: cnsdiff mixes one sampled negative per pair; "
                              "use uniform or popularity")
        if noise_schedule not in SCHEDULES:
            raise ConfigError(f"noise_schedule={noise_schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if condition not in CONDITIONS:
            raise ConfigError(f"condition={condition!r}: choose one of {', '.join(CONDITIONS)}")
        if steps < 1:
            raise ConfigError(f"steps={steps}: the diffusion needs at least one step; use e.g. steps=20")
        if not (noise_scale > 0 and 0 < noise_min < noise_max and noise_scale * noise_max < 1):
            raise ConfigError(f"noise_scale={noise_scale}, noise_min={noise_min}, noise_max={noise_max}: need "
                              "noise_scale > 0, 0 < noise_min < noise_max and noise_scale * noise_max < 1")
        if not 0 <= sample_start <= steps or sample_stride < 1:
            raise ConfigError(f"sample_start={sample_start}, sample_stride={sample_stride}: need "
                              f"0 <= sample_start <= steps ({steps}) and sample_stride >= 1")
        if hidden < 1 or time_dim < 2:
            raise ConfigError(f"hidden={hidden}, time_dim={time_dim}: need hidden >= 1 and time_dim >= 2")
        if not 0.0 <= denoiser_dropout < 1.0:
            raise ConfigError(f"denoiser_dropout={denoiser_dropout}: must be in [0, 1)")
        for key, value in [("mix_alpha0", mix_alpha0), ("mix_beta0", mix_beta0), ("mix_alpha1", mix_alpha1),
                           ("mix_beta1", mix_beta1), ("cl_temp", cl_temp)]:
            if not value > 0:
                raise ConfigError(f"{key}={value}: must be > 0 (e.g. the default in cnsdiff.yaml)")
        for key, value in [("causal_weight", causal_weight), ("diff_weight", diff_weight), ("cl_weight", cl_weight),
                           ("cl_noise", cl_noise)]:
            if value < 0:
                raise ConfigError(f"{key}={value}: must be >= 0 (0 switches the term off)")
        if not 0.0 <= min_mix <= 1.0:
            raise ConfigError(f"min_mix={min_mix}: the floor of the mixing ratio must be in [0, 1]")
        if mix_epochs < 1:
            raise ConfigError(f"mix_epochs={mix_epochs}: the curriculum needs at least one epoch; use e.g. 120")
        self.steps, self.noise_schedule, self.noise_scale = steps, noise_schedule, noise_scale
        self.noise_min, self.noise_max, self.hidden, self.time_dim = noise_min, noise_max, hidden, time_dim
        self.denoiser_dropout, self.denoiser_norm, self.condition = denoiser_dropout, denoiser_norm, condition
        self.reweight, self.causal_weight, self.diff_weight = reweight, causal_weight, diff_weight
        self.sample_start, self.sample_stride, self.sampling_noise = sample_start, sample_stride, sampling_noise
        self.mix_alpha0, self.mix_beta0 = mix_alpha0, mix_beta0
        self.mix_alpha1, self.mix_beta1 = mix_alpha1, mix_beta1
        self.min_mix, self.mix_epochs = min_mix, mix_epochs
        self.cl_weight, self.cl_temp, self.cl_noise = cl_weight, cl_temp, cl_noise
        self._epochs_done = 0

    # ---- network --------------------------------------------------------------------------------
    def build(self, n_users, n_items):
        net = super().build(n_users, n_items)
        net.denoiser = Denoiser(self.dim, self.hidden, self.time_dim, self.dim if self.condition == "user" else 0,
                                self.denoiser_dropout, self.denoiser_norm)
        sched = diffusion_schedule(self.steps, self.noise_schedule, self.noise_scale, self.noise_min, self.noise_max)
        for key, value in sched.items():  # constants of the hyper-parameters: moved with the net, never saved
            net.register_buffer(f"sched_{key}", torch.from_numpy(value).float(), persistent=False)
        return net

    def sched(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Schedule coefficient ``key`` at steps ``t`` as a (len(t), 1) column."""
        return getattr(self.net_, f"sched_{key}")[t].unsqueeze(1)

    def levels(self) -> list[int]:
        """The noise levels the negatives are generated from (``sample_start .. steps``)."""
        return list(range(self.sample_start, self.steps + 1, self.sample_stride))

    # ---- diffusion ------------------------------------------------------------------------------
    def diffusion_loss(self, x0: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Denoising loss with the causal (KL) regulariser on clean embeddings ``x0`` (batch, d)."""
        n = x0.shape[0]
        t = torch.randint(0, self.steps, (n,), device=x0.device)
        noise = torch.randn_like(x0)
        prev = (t - 1).clamp(min=0)
        x_t = self.sched("abar", t).sqrt() * x0 + (1 - self.sched("abar", t)).sqrt() * noise
        x_prev = self.sched("abar", prev).sqrt() * x0 + (1 - self.sched("abar", prev)).sqrt() * noise
        x0_hat = self.net_.denoiser(x_t, t, self.net_.denoiser.condition(cond))
        mse = (x0 - x0_hat).pow(2).mean(1)
        if self.reweight:
            snr = self.net_.sched_snr
            weight = torch.where(t == 0, torch.ones_like(mse), snr[prev] - snr[t])
        else:
            weight = torch.ones_like(mse)
        logvar = self.sched("post_logvar", t)
        logvar_prev = torch.where((t == 0).unsqueeze(1), torch.zeros_like(logvar), self.sched("post_logvar", prev))
        kl = 0.5 * (-1.0 + logvar_prev - logvar + torch.exp(logvar - logvar_prev)
                    + (x0_hat - x_prev).pow(2) * torch.exp(-logvar_prev))
        return (weight * mse).mean() + self.causal_weight * kl.mean()

    @torch.no_grad()
    def reverse(self, x: torch.Tensor, cond_part: torch.Tensor | float) -> torch.Tensor:
        """The full reverse chain ``t = T-1 .. 0`` from ``x`` (posterior means, plus the posterior
        noise with ``sampling_noise``)."""
        for i in range(self.steps - 1, -1, -1):
            t = torch.full((1,), i, dtype=torch.long, device=x.device)
            x0_hat = self.net_.denoiser(x, t, cond_part)
            x = self.sched("coef_x0", t) * x0_hat + self.sched("coef_xt", t) * x
            if self.sampling_noise and i > 0:
                x = x + torch.exp(0.5 * self.sched("post_logvar", t)) * torch.randn_like(x)
        return x

    @torch.no_grad()
    def generate_candidates(self, users: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """Generated negatives (n_levels, batch, d): each positive embedding noised to every level
        of :meth:`levels` and denoised, conditioned on the users' embeddings (``condition=user``)."""
        cond_part = self.net_.denoiser.condition(users if self.condition == "user" else None)
        out = []
        for s in self.levels():
            if s == 0:
                x = positives
            else:
                t = torch.full((positives.shape[0],), s - 1, dtype=torch.long, device=positives.device)
                abar = self.sched("abar", t)
                x = abar.sqrt() * positives + (1 - abar).sqrt() * torch.randn_like(positives)
            out.append(self.reverse(x, cond_part))
        return torch.stack(out, 0)

    @torch.no_grad()
    def generate(self, users: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """One generated negative per (user, positive) row (batch, d): of the candidates of every
        noise level, the one the user scores highest. Draws from torch's global generator."""
        cands = self.generate_candidates(users, positives)
        best = torch.einsum("bd,lbd->lb", users, cands).argmax(0)
        return cands[best, torch.arange(users.shape[0], device=users.device)]

    # ---- training -------------------------------------------------------------------------------
    def mix_params(self, epoch: int | None = None) -> tuple[float, float]:
        """The Beta parameters of the mixing ratio at ``epoch`` (default: the current epoch)."""
        e = self._epochs_done if epoch is None else epoch
        p = min(max(e, 0) / self.mix_epochs, 1.0)
        return (self.mix_alpha0 + (self.mix_alpha1 - self.mix_alpha0) * p,
                self.mix_beta0 + (self.mix_beta1 - self.mix_beta0) * p)

    def before_training(self, split, valid=None) -> None:
        self._epochs_done = 0

    def train_state(self) -> dict:
        return {"epochs_done": self._epochs_done}

    def load_train_state(self, state: dict) -> None:
        self._epochs_done = int(state.get("epochs_done", 0))

    def train_batches(self, split, rng):
        yield from super().train_batches(split, rng)
        self._epochs_done += 1

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict:
        batch = super().make_batch(idx, rng)
        a, b = self.mix_params()
        r = rng.beta(a, b, size=len(idx))
        batch["mix"] = torch.from_numpy(np.clip((1 - self.min_mix) * r + self.min_mix, 0.0, 1.0).astype(np.float32))
        return batch

    def rank_loss(self, batch: dict, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """BPR against the mixed (generated / sampled) negative, L2 on the batch's ego embeddings,
        plus the denoiser's loss and the optional contrastive term."""
        u, i, j = batch["u"], batch["i"], batch["j"][:, 0]
        eu, ei, ej = users[u], items[i], items[j]
        gen = self.generate(eu.detach(), ei.detach())
        r = batch["mix"].to(ei.dtype).unsqueeze(1)
        neg = r * gen + (1 - r) * ej
        main = bpr_loss((eu * ei).sum(-1), (eu * neg).sum(-1))
        w_u, w_i = self.net_.user.weight, self.net_.item.weight
        l2 = w_u[u].pow(2).sum() + w_i[i].pow(2).sum() + w_i[j].pow(2).sum()
        loss = main + self.reg * 0.5 * l2 / len(u)
        if self.diff_weight > 0:
            cond = eu.detach() if self.condition == "user" else None
            loss = loss + self.diff_weight * self.diffusion_loss(ei.detach(), cond)
        if self.cl_weight > 0:
            loss = loss + self.cl_weight * self.contrast(ei, gen, ej)
        return loss

    def contrast(self, pos: torch.Tensor, gen: torch.Tensor, rand: torch.Tensor) -> torch.Tensor:
        """Authors' contrastive term: each positive against its noised copy, every generated and
        sampled negative of the batch as negatives (cosine / ``cl_temp``)."""
        a = F.normalize(pos, dim=1)
        p = F.normalize(pos + self.cl_noise * torch.randn_like(pos), dim=1)
        n = F.normalize(torch.cat([gen, rand], 0), dim=1)
        return -((a * p).sum(1) / self.cl_temp).mean() + torch.logsumexp(a @ n.T / self.cl_temp, dim=1).mean()

    def protocol_notes(self) -> dict:
        notes = super().protocol_notes()
        a0, b0 = self.mix_params(0)
        notes.update({
            "negatives": (f"generated by a conditional diffusion over propagated item embeddings (T={self.steps}, "
                          f"levels {self.levels()}, condition={self.condition}), hardest level per pair, mixed "
                          f"with a {self.neg_sampler} sampled item by r ~ Beta({a0:g},{b0:g}) -> "
                          f"Beta({self.mix_alpha1:g},{self.mix_beta1:g}) over {self.mix_epochs} epochs"),
            "causal_regularisation": f"KL weight {self.causal_weight:g} in the denoiser's loss",
            "side_data": "none (training interactions only)",
        })
        if self.cl_weight > 0:
            notes["contrastive"] = f"weight {self.cl_weight:g}, temperature {self.cl_temp:g}"
        return notes
