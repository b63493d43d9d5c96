"""DiffuASR: diffusion augmentation of short training sequences, then any sequential model.

Liu, Yan, Zhao, Du, Guo, Tang & Tian, "Diffusion Augmentation for Sequential Recommendation",
CIKM 2023. Authors' code: ``liuqidong07/DiffuASR`` (``diffusion/diffusion.py``, ``diffusion/unet.py``,
``trainers/diffusion_trainer.py``, ``generators/diffusion_generator.py``).

**Stage 1: a diffusion model over item embeddings.** Every training sequence with more than
``n_aug + 2`` items is cut into its first ``n_aug`` items (what is generated) and the rest (the
*guide*, its last ``max_len`` items, ``max_len`` being the backbone's). The ``n_aug`` items become an
``n_aug x hidden`` matrix ``x0`` of item embeddings (a table of the diffusion model's own, trained
with it), noised by the DDPM forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``
(``timesteps`` steps, ``beta_schedule`` linear from 1e-4 to 0.02 scaled to 1000 steps, or cosine),
and a denoiser predicts ``eps`` from ``x_t``, ``t`` and the guide vector (the mean embedding of the
guide items); the loss is the mean squared error of the noise.

The denoiser is the paper's **sequential U-Net (SU-Net)**: the ``n_aug`` generated positions are
the *channels* of an image whose pixels are the embedding's ``hidden`` coordinates, laid out as a
``sqrt(hidden) x sqrt(hidden)`` square (8 x 8 for the default 64), so every convolution mixes all
positions of the generated sequence at once. It is a DDPM U-Net: an input convolution to
``unet_channels``, one level per entry of ``unet_mult`` (``unet_blocks`` residual blocks of group
norm, SiLU, 3x3 convolution, time + guide embedding added, dropout; a stride-2 convolution between
levels), a middle of residual block, self-attention over the pixels and residual block, the
mirrored up path with skip connections (nearest upsampling + 3x3 convolution), and an output
convolution back to ``n_aug`` channels. The sinusoidal timestep embedding and the guide vector each
go through a two-layer MLP and are summed into the embedding every residual block reads. The SU-Net
is the default rather than the Transformer denoiser because it is the denoiser the paper proposes
and evaluates as DiffuASR, and the one the authors' scripts run (``noise_model="unet"``); the
Transformer is an option of their code only.

**Guidance: classifier-free** (the paper's DiffuASR-CF). A learned null vector replaces the guide
vector of a ``p_uncond`` share of the training samples, so the one denoiser learns both the
conditional and the unconditional noise; sampling uses
``eps = eps(x_t, guide) + guidance_scale * (eps(x_t, guide) - eps(x_t, null))``. The paper's other
strategy, classifier guidance (DiffuASR-CG), needs a separately pre-trained sequential model as the
classifier (the authors load a trained BERT4Rec) and its gradient at every step; it is not
implemented, so the model stays one self-contained fit.

**Generation.** For every user whose training sequence has fewer than ``aug_threshold`` items
(``null``: every user with a training item), the whole training sequence (its last ``max_len``
items) is the guide; ``x_T ~ N(0, I)`` is drawn from a generator seeded by ``seed`` and denoised by
DDIM with ``eta = 0`` over ``sample_steps`` evenly spaced steps (the authors' 5 of 1000), and each of
the ``n_aug`` rows is rounded to the item of highest cosine similarity in the embedding table (any
item ``1..n_items``, repeats of the history allowed, as the authors'). Same seed, same items.

**Stage 2: the backbone.** ``backbone`` (any registered sequential model; default ``sasrec``) is
built from its YAML defaults with ``backbone_params`` on top and this model's ``seed``, ``verbose``,
``device`` and ``threads``, and trained by the shared trainer on the augmented training sequences:
``prefix + real items`` for the augmented users, the real sequence for the others. The real items
are unchanged after the prefix. Its validation ranks the validation targets with the scoring rule
below, under the run's protocol, with the backbone's early stopping.

**Scoring.** A known user (``Histories.users`` in ``0..n_users-1``) whose training sequence was
augmented gets their stored prefix prepended to whatever history is scored (the backbone then
reads the last ``max_len`` items, so a long history pushes the prefix out); every other row,
unknown users (``-1``) included, is scored on its history alone. The prefix is a constant that
comes before every real item, so the output after a position never depends on later items. The
history exclusion of the evaluation uses the real history only.

Deviations from the paper and the authors' code, and choices they leave open:

* The authors prepend generated items to *every* user and evaluate on the augmented file;
  ``aug_threshold`` (default 20, about the boundary of the paper's length analysis between long
  users, more than 20 items, and the others) limits augmentation to the short sequences the paper
  targets; ``aug_threshold: null`` augments everyone as their code does.
* The authors generate from train + validation items; here only training items are read, so no
  held-out item reaches training.
* Classifier-free guidance is trained by condition dropout (Ho & Salimans 2022); the authors'
  code trains the guided combination of the two predictions directly, with a learned null vector
  and no dropout. ``guidance_scale`` defaults to their ``classifier_scale`` of 1.
* ``x0`` rows are unit-norm embeddings scaled by ``sqrt(hidden)`` (one unit per coordinate, like
  the noise), the guide vector is the mean of those rows (the authors sum raw embeddings, whose
  scale grows with the history), and a rounding term (``round_weight`` times the cross-entropy
  of each target row's cosine similarities to the table at temperature 0.1, after Diffusion-LM's
  rounding term; the authors' code has a ``--rounding`` option, off in their scripts) keeps the
  learned embeddings apart: without it the noise loss alone is minimised by pulling every item
  onto one vector.
* The stride-2 convolutions between U-Net levels pad every side by one (the authors pad only the
  right and bottom); the time steps of a batch are drawn in antithetic pairs ``t, T - 1 - t`` as
  theirs.
* Per-item fields of a scored history (behaviours, timestamps) are carried over: a generated
  item has no behaviour and the timestamp of the row's first real item.
* No exponential moving average of the weights and no early stopping of stage 1 on its training
  loss (the authors: 3000 epochs, EMA, patience 100 on the loss); ``diff_epochs`` fixed epochs of
  Adam. Attention sits only in the middle of the U-Net (the authors' configuration asks for it at
  resolution 16, which an 8 x 8 input never reaches, so the same holds there).
* The backbone trains with its own defaults (full-softmax cross-entropy, every position a
  target, ``subseq=none``); the authors train SASRec with BCE on prefix samples that skip the
  generated part.
* Checkpoints: with a ``checkpoint_dir``, stage 1 writes ``last.pt`` after every epoch (denoiser,
  optimiser, random generators, loss curve) and ``diffusion.pt`` when it ends; the backbone's
  trainer then writes its own ``last.pt`` over the first. A run stopped in stage 1 resumes there; a
  run stopped in stage 2 reloads ``diffusion.pt`` beside its checkpoint (stage 1 is rerun,
  deterministically, only when that file is missing) and resumes the backbone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.models.base import Recommender
from recforge.training.device import resolve_device
from recforge.training.trainer import CHECKPOINT_VERSION, atomic_save, load_checkpoint, set_seed

log = logging.getLogger("recforge.train")

BETA_SCHEDULES = ("linear", "cosine")
#: parameters of this model handed to the backbone; backbone_params may not set them
SHARED = ("seed", "verbose", "device", "threads")
ROUND_TEMPERATURE = 0.1


# ---- the SU-Net denoiser --------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of integer steps ``t`` (B,)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    arg = t.float()[:, None] * freq[None]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], 1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class PixelAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj = group_norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class SUNet(nn.Module):
    """Noise predictor over (B, n_aug, hidden): positions as channels of a square image."""

    def __init__(self, n_aug: int, hidden: int, ch: int, mult: list[int], blocks: int, dropout: float):
        super().__init__()
        self.side, self.ch = math.isqrt(hidden), ch
        emb = 4 * ch
        self.time = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.guide = nn.Sequential(nn.Linear(hidden, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(n_aug, ch, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [ch], ch
        for level, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(ResBlock(c, ch * m, emb, dropout))
                c = ch * m
                skips.append(c)
            if level < len(mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1, self.mid_attn = ResBlock(c, c, emb, dropout), PixelAttention(c)
        self.mid2 = ResBlock(c, c, emb, dropout)
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), ch * m, emb, dropout))
                c = ch * m
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
        self.norm_out, self.conv_out = group_norm(c), nn.Conv2d(c, n_aug, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.ch)) + self.guide(guide)
        h = self.conv_in(x.reshape(x.shape[0], x.shape[1], self.side, self.side))
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h))).reshape(x.shape)


class DiffusionNet(nn.Module):
    """Item table, null guide vector and SU-Net; noise schedule as buffers."""

    def __init__(self, n_items: int, n_aug: int, hidden: int, ch: int, mult, blocks: int, dropout: float,
                 timesteps: int, schedule: str):
        super().__init__()
        self.item = nn.Embedding(n_items + 1, hidden)
        self.null = nn.Parameter(torch.zeros(hidden))
        self.unet = SUNet(n_aug, hidden, ch, list(mult), blocks, dropout)
        self.scale = hidden**0.5
        if schedule == "linear":
            s = 1000.0 / timesteps
            beta = torch.linspace(1e-4 * s, 0.02 * s, timesteps, dtype=torch.float64)
        else:  # cosine (Nichol & Dhariwal 2021)
            x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
            f = torch.cos((x / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
            beta = (1 - f[1:] / f[:-1]).clamp(1e-4, 0.9999)
        # abar[0] = 1 (no noise) and abar[t + 1] for step t, so step -1 is the clean data
        abar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - beta, 0)])
        self.register_buffer("abar", abar.float(), persistent=False)
        self.timesteps = timesteps

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings scaled by sqrt(hidden) (one unit per coordinate)."""
        return F.normalize(self.item(ids), dim=-1) * self.scale

    def guide_vector(self, guide: torch.Tensor) -> torch.Tensor:
        """Mean row of the guide items (B, L; 0 = padding) -> (B, hidden)."""
        mask = (guide > 0).unsqueeze(-1).float()
        return (self.rows(guide) * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def loss(self, target: torch.Tensor, guide: torch.Tensor, p_uncond: float, round_weight: float) -> torch.Tensor:
        b = target.shape[0]
        x0 = self.rows(target)
        half = torch.randint(0, self.timesteps, ((b + 1) // 2,), device=target.device)
        t = torch.cat([half, self.timesteps - 1 - half])[:b]  # antithetic steps, as the authors
        a = self.abar[t + 1].view(b, 1, 1)
        eps = torch.randn_like(x0)
        g = self.guide_vector(guide)
        drop = torch.rand(b, device=g.device) < p_uncond
        g = torch.where(drop.unsqueeze(1), self.null.expand_as(g), g)
        loss = F.mse_loss(self.unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, g), eps)
        if round_weight > 0:
            table = F.normalize(self.item.weight[1:], dim=-1)
            logits = F.normalize(x0, dim=-1) @ table.T / ROUND_TEMPERATURE
            loss = loss + round_weight * F.cross_entropy(logits.reshape(-1, table.shape[0]), target.reshape(-1) - 1)
        return loss

    @torch.no_grad()
    def sample(self, guide: torch.Tensor, noise: torch.Tensor, steps: int, scale: float) -> torch.Tensor:
        """DDIM (eta = 0) from ``noise`` (B, n_aug, hidden); the generated item ids (B, n_aug)."""
        b = guide.shape[0]
        g = self.guide_vector(guide)
        g2 = torch.cat([g, self.null.expand_as(g)])
        grid = list(range(0, self.timesteps, max(self.timesteps // steps, 1)))
        x = noise
        for t, nxt in zip(reversed(grid), reversed([-1] + grid[:-1])):
            tt = torch.full((2 * b,), t, device=x.device, dtype=torch.long)
            cond, uncond = self.unet(torch.cat([x, x]), tt, g2).chunk(2)
            eps = cond + scale * (cond - uncond)
            a, a_next = self.abar[t + 1], self.abar[nxt + 1]
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        table = F.normalize(self.item.weight[1:], dim=-1)
        return (F.normalize(x, dim=-1) @ table.T).argmax(-1) + 1


# ---- sequences ------------------------------------------------------------------------------
def prepend_rows(indptr: np.ndarray, items: np.ndarray,
                 prefix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ragged rows with ``prefix[r]`` placed before row ``r`` where ``prefix[r, 0] > 0``:
    ``(indptr, items, is_prefix)`` of the result (``indptr[0] == 0``)."""
    n, k = prefix.shape
    indptr = np.asarray(indptr, dtype=np.int64)
    lengths = np.diff(indptr)
    add = np.where(prefix[:, 0] > 0, k, 0) if n else np.zeros(0, dtype=np.int64)
    out_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths + add, out=out_ptr[1:])
    out = np.zeros(int(out_ptr[-1]), dtype=np.asarray(items).dtype)
    is_prefix = np.zeros(len(out), dtype=bool)
    offs = np.arange(int(lengths.sum())) - np.repeat(indptr[:-1] - indptr[0], lengths)
    out[np.repeat(out_ptr[:-1] + add, lengths) + offs] = np.asarray(items)[indptr[0] : indptr[-1]]
    rows = np.flatnonzero(add)
    pos = (out_ptr[rows][:, None] + np.arange(k)).ravel()
    out[pos] = prefix[rows].ravel()
    is_prefix[pos] = True
    return out_ptr, out, is_prefix


class AugmentedSplit:
    """A split whose ``train_sequences`` hold the augmented sequences; everything else (the
    interactions, the training matrix and popularity the sampled losses read) is the split's."""

    def __init__(self, split, indptr: np.ndarray, items: np.ndarray):
        self._split = split
        self.train_sequences = (indptr, items)

    def __getattr__(self, name):
        return getattr(self._split, name)


# ---- the model ------------------------------------------------------------------------------
class DiffuASR(Recommender):
    name = "diffuasr"

    def __init__(self, backbone: str = "sasrec", backbone_params: dict | None = None, n_aug: int = 10,
                 aug_threshold: int | None = 20, hidden: int = 64, unet_channels: int = 8,
                 unet_mult: list[int] = (1, 2, 2, 2), unet_blocks: int = 2, unet_dropout: float = 0.1,
                 timesteps: int = 1000, beta_schedule: str = "linear", sample_steps: int = 5,
                 guidance_scale: float = 1.0, p_uncond: float = 0.1, round_weight: float = 1.0,
                 diff_epochs: int = 200, diff_batch_size: int = 256, diff_lr: float = 1e-3, seed: int = 0,
                 verbose: bool = True, device: str = "auto", threads: int | None = None):
        self.backbone, self.backbone_params = backbone, dict(backbone_params or {})
        self.n_aug, self.aug_threshold, self.hidden = n_aug, aug_threshold, hidden
        self.unet_channels, self.unet_mult, self.unet_blocks = unet_channels, list(unet_mult), unet_blocks
        self.unet_dropout, self.timesteps, self.beta_schedule = unet_dropout, timesteps, beta_schedule
        self.sample_steps, self.guidance_scale, self.p_uncond = sample_steps, guidance_scale, p_uncond
        self.round_weight, self.diff_epochs = round_weight, diff_epochs
        self.diff_batch_size, self.diff_lr = diff_batch_size, diff_lr
        self.seed, self.verbose, self.device, self.threads = seed, verbose, device, threads
        self.checkpoint_dir = self.resume_from = None
        self.callbacks: list = []
        self._check()
        self._make_backbone()  # checks the backbone and its parameters now, not after stage 1

    def _check(self) -> None:
        def bad(name, problem):
            raise ConfigError(f"diffuasr: {name}={getattr(self, name)!r}: {problem}")

        if int(self.n_aug) < 1:
            bad("n_aug", "must be >= 1 (the number of generated items per augmented sequence)")
        if self.aug_threshold is not None and int(self.aug_threshold) < 2:
            bad("aug_threshold", "must be >= 2 (sequences shorter than it are augmented) or null for every sequence")
        side = math.isqrt(max(int(self.hidden), 0))
        if side < 2 or side * side != self.hidden:
            bad("hidden", "must be a perfect square (the SU-Net lays an embedding out as a square), e.g. 16, 64 or 256")
        if not self.unet_mult or any(int(m) < 1 for m in self.unet_mult):
            bad("unet_mult", "give one positive channel multiplier per U-Net level, e.g. [1, 2, 2, 2]")
        if side % 2 ** (len(self.unet_mult) - 1):
            bad("unet_mult", f"{len(self.unet_mult)} levels halve the {side}x{side} embedding square "
                             f"{len(self.unet_mult) - 1} times; use at most {int(math.log2(side & -side)) + 1} levels")
        for name in ("unet_channels", "unet_blocks", "timesteps", "sample_steps", "diff_epochs", "diff_batch_size"):
            if int(getattr(self, name)) < 1:
                bad(name, "must be >= 1")
        if self.sample_steps > self.timesteps:
            bad("sample_steps", f"must be at most timesteps={self.timesteps}")
        if self.beta_schedule not in BETA_SCHEDULES:
            bad("beta_schedule", f"choose one of {', '.join(BETA_SCHEDULES)}")
        if not 0.0 <= self.unet_dropout < 1.0:
            bad("unet_dropout", "must be in [0, 1)")
        if not 0.0 <= self.p_uncond < 1.0:
            bad("p_uncond", "must be in [0, 1) (the share of training samples without their guide)")
        if self.guidance_scale < 0:
            bad("guidance_scale", "must be >= 0 (0: the conditional prediction alone)")
        if self.round_weight < 0:
            bad("round_weight", "must be >= 0")
        if not self.diff_lr > 0:
            bad("diff_lr", "must be > 0")

    def _make_backbone(self):
        from recforge.models.registry import create, get_model_class
        from recforge.models.sequential.base import SequentialRecommender

        cls = get_model_class(self.backbone)
        if not issubclass(cls, SequentialRecommender) or getattr(cls, "needs_items", False) or cls is DiffuASR:
            raise ConfigError(f"diffuasr: backbone={self.backbone!r} is not a plain sequential model; "
                              "use one of sasrec, gru4rec, bert4rec, cl4srec, duorec")
        shared = sorted(set(self.backbone_params) & set(SHARED))
        if shared:
            raise ConfigError(f"diffuasr: backbone_params sets {', '.join(shared)}; set "
                              f"{'it' if len(shared) == 1 else 'them'} on diffuasr itself (passed on to the backbone)")
        params = {k: getattr(self, k) for k in SHARED if k in cls.param_names()}
        model = create(self.backbone, **self.backbone_params, **params)
        if getattr(model, "needs_times", False):
            raise ConfigError(f"diffuasr: the backbone {self.backbone} reads timestamps (e.g. augment=ticoserec), "
                              "which generated items do not have; choose another augmentation for the backbone")
        return model

    # ---- properties of the fitted model -----------------------------------------------------
    @property
    def max_len(self) -> int:
        model = self.__dict__.get("backbone_") or self._make_backbone()
        return model.max_len

    @property
    def valid_metric(self) -> str:
        """The backbone's validation metric (early stopping, pruning)."""
        model = self.__dict__.get("backbone_") or self._make_backbone()
        return model.valid_metric

    @property
    def device_(self) -> torch.device:
        return self.backbone_.device_ if "backbone_" in self.__dict__ else resolve_device(self.device)

    def to_device(self, device) -> "DiffuASR":
        self.backbone_.to_device(device)
        self.diffusion_.to(self.backbone_.device_)
        return self

    def protocol_notes(self) -> dict:
        notes = dict(self.backbone_.protocol_notes()) if "backbone_" in self.__dict__ else {}
        notes["backbone"] = self.backbone
        notes["augmentation"] = {
            "method": "diffuasr (SU-Net denoiser, classifier-free guidance, DDIM sampling)",
            "n_aug": self.n_aug, "aug_threshold": self.aug_threshold,
            "guidance_scale": self.guidance_scale, "sample_steps": self.sample_steps,
            "diffusion_epochs": self.diff_epochs,
            **getattr(self, "aug_stats_", {}),
            "scoring": "the stored prefix is prepended for known users whose training sequence was augmented; "
                       "nothing for unknown users",
        }
        return notes

    # ---- fit --------------------------------------------------------------------------------
    def fit(self, split, valid=None):
        if self.threads is None:
            return self._fit(split, valid)
        before = torch.get_num_threads()
        torch.set_num_threads(int(self.threads))
        try:
            return self._fit(split, valid)
        finally:
            torch.set_num_threads(before)

    def _fit(self, split, valid):
        self.n_users_, self.n_items_ = split.n_users, split.n_items
        backbone = self._make_backbone()
        indptr, items = split.train_sequences
        indptr = np.asarray(indptr, dtype=np.int64)
        lengths = np.diff(indptr)
        set_seed(self.seed)
        dev = resolve_device(self.device)
        self.diffusion_ = self._build_diffusion().to(dev)
        resume, stage1 = self._resume_blobs()
        if stage1 is not None and stage1.get("done"):  # stage 2 resumes: the denoiser as stage 1 left it
            self.diffusion_.load_state_dict(stage1["net"])
            torch.set_rng_state(stage1["rng"]["torch"])
            curve, seconds = list(stage1["curve"]), float(stage1["seconds"])
            self._save_stage1(stage1, "diffusion.pt")
        else:
            curve, seconds = self._train_diffusion(indptr, items, backbone.max_len, dev, stage1)

        limit = np.inf if self.aug_threshold is None else int(self.aug_threshold)
        users = np.flatnonzero((lengths >= 1) & (lengths < limit))
        prefix = np.zeros((self.n_users_, self.n_aug), dtype=np.int64)
        if len(users):
            prefix[users] = self.generate(indptr[users], indptr[users + 1], items, max_len=backbone.max_len)
        self.prefix_ = prefix
        self.aug_stats_ = {"augmented_sequences": int(len(users)),
                           "training_sequences": int((lengths >= 1).sum()),
                           "diffusion_training_sequences": int((lengths > self.n_aug + 2).sum())}
        aug_ptr, aug_items, _ = prepend_rows(indptr, items, prefix)

        backbone.checkpoint_dir, backbone.resume_from = self.checkpoint_dir, resume
        backbone.callbacks = list(self.callbacks)
        self.backbone_ = backbone
        backbone.validate = self._validate  # the trainer validates through the prefixes
        try:
            backbone.fit(AugmentedSplit(split, aug_ptr, aug_items.astype(items.dtype, copy=False)), valid)
        finally:
            del backbone.validate
        self.diffusion_.to(backbone.device_)
        self.history_ = dict(backbone.history_)
        self.history_["diffusion"] = {"epochs": len(curve), "first_loss": curve[0], "final_loss": curve[-1],
                                      "seconds": round(seconds, 2)}
        return self

    def _build_diffusion(self) -> DiffusionNet:
        return DiffusionNet(self.n_items_, self.n_aug, self.hidden, self.unet_channels, self.unet_mult,
                            self.unet_blocks, self.unet_dropout, self.timesteps, self.beta_schedule)

    def _resume_blobs(self) -> tuple[str | None, dict | None]:
        """What ``resume_from`` continues: the backbone's checkpoint to resume (None when the run
        stopped in stage 1) and the stage-1 state (the checkpoint itself, or ``diffusion.pt`` beside
        the backbone's; None when there is none to read)."""
        if not self.resume_from:
            return None, None
        blob = load_checkpoint(self.resume_from)
        if blob.get("stage") == "diffusion":
            return None, blob
        beside = Path(self.resume_from)
        beside = (beside if beside.is_dir() else beside.parent) / "diffusion.pt"
        if beside.is_file():
            return self.resume_from, torch.load(beside, map_location="cpu", weights_only=False)
        log.info("diffuasr: no diffusion.pt beside %s; stage 1 is trained again (deterministically)",
                 self.resume_from)
        return self.resume_from, None

    def _save_stage1(self, blob: dict, name: str) -> None:
        if self.checkpoint_dir is not None:
            folder = Path(self.checkpoint_dir)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_save(blob, folder / name)

    def _train_diffusion(self, indptr, items, max_len: int, dev,
                         resume: dict | None = None) -> tuple[list[float], float]:
        """Stage 1: fit the denoiser on every sequence longer than ``n_aug + 2`` (from the stage-1
        checkpoint ``resume`` when given)."""
        from recforge.models.sequential.base import pad_windows

        k = self.n_aug
        lengths = np.diff(indptr)
        users = np.flatnonzero(lengths > k + 2)
        if len(users) == 0:
            raise ConfigError(f"diffuasr: no training sequence has more than n_aug + 2 = {k + 2} items to learn "
                              f"from; lower n_aug (now {k})")
        lo, hi = indptr[users], indptr[users + 1]
        target = torch.from_numpy(items[lo[:, None] + np.arange(k)].astype(np.int64))
        guide = torch.from_numpy(pad_windows(items, np.maximum(lo + k, hi - max_len), hi, max_len).astype(np.int64))
        net = self.diffusion_
        opt = torch.optim.Adam(net.parameters(), lr=self.diff_lr)
        rng = np.random.default_rng(self.seed)
        curve, start, before = [], 0, 0.0
        if resume is not None:
            net.load_state_dict(resume["net"])
            opt.load_state_dict(resume["optimizer"])
            rng.bit_generator.state = resume["rng"]["numpy"]
            torch.set_rng_state(resume["rng"]["torch"])
            curve, start, before = list(resume["curve"]), int(resume["epoch"]), float(resume["seconds"])
        net.train()
        t0 = time.perf_counter() - before
        bar = tqdm(range(start, self.diff_epochs), desc="diffusion", disable=not self.verbose, leave=False,
                   initial=start, total=self.diff_epochs)
        for epoch in bar:
            order, total = rng.permutation(len(users)), 0.0
            for s in range(0, len(order), self.diff_batch_size):
                idx = torch.from_numpy(order[s : s + self.diff_batch_size])
                loss = net.loss(target[idx].to(dev), guide[idx].to(dev), self.p_uncond, self.round_weight)
                if not torch.isfinite(loss):
                    from recforge.errors import TrainingError

                    raise TrainingError(f"diffuasr: the diffusion loss is {float(loss)}; try a lower diff_lr "
                                        f"(now {self.diff_lr:g})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            curve.append(round(total / len(users), 5))
            bar.set_postfix(loss=curve[-1])
            done = epoch + 1 == self.diff_epochs
            if self.checkpoint_dir is not None:
                blob = {"version": CHECKPOINT_VERSION, "model": self.name, "stage": "diffusion", "epoch": epoch + 1,
                        "done": done, "net": net.state_dict(), "optimizer": opt.state_dict(),
                        "rng": {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()},
                        "curve": list(curve), "seconds": time.perf_counter() - t0}
                self._save_stage1(blob, "last.pt")
                if done:
                    self._save_stage1(blob, "diffusion.pt")
        net.eval()
        seconds = time.perf_counter() - t0
        if self.verbose:
            log.info("diffuasr: diffusion trained on %d sequences, %d epochs, loss %.4f -> %.4f (%.1fs)",
                     len(users), self.diff_epochs, curve[0], curve[-1], seconds)
        return curve, seconds

    def generate(self, starts: np.ndarray, ends: np.ndarray, items: np.ndarray, seed: int | None = None,
                 max_len: int | None = None, batch_size: int = 1024) -> np.ndarray:
        """``n_aug`` generated items (rows, n_aug) for the guide sequences ``items[starts[r]:ends[r]]``
        (their last ``max_len`` items; default: the backbone's). The starting noise comes from a
        generator seeded by ``seed`` (default: the model's), drawn on the CPU, so the result
        depends only on the seed and the weights."""
        from recforge.models.sequential.base import pad_windows

        max_len = self.max_len if max_len is None else max_len
        starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        guide = torch.from_numpy(pad_windows(np.asarray(items), np.maximum(starts, ends - max_len), ends, max_len)
                                 .astype(np.int64))
        gen = torch.Generator().manual_seed(int(self.seed if seed is None else seed))
        noise = torch.randn((len(starts), self.n_aug, self.hidden), generator=gen)
        net = self.diffusion_
        dev = next(net.parameters()).device
        was_training = net.training
        net.eval()
        out = []
        for s in range(0, len(starts), batch_size):
            out.append(net.sample(guide[s : s + batch_size].to(dev), noise[s : s + batch_size].to(dev),
                                  self.sample_steps, self.guidance_scale).cpu())
        net.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros((0, self.n_aug), dtype=np.int64)

    def _validate(self, valid) -> dict:
        from recforge.evaluation.evaluator import evaluate

        b = self.backbone_
        return evaluate(self, valid, ks=b.valid_ks(), groups=False, protocol=getattr(self, "valid_protocol", None),
                        batch_size=b.eval_batch_size).metrics

    # ---- scoring ----------------------------------------------------------------------------
    def augment_histories(self, hist: Histories) -> Histories:
        """``hist`` with the stored prefix before the history of each known augmented user."""
        users = np.asarray(hist.users, dtype=np.int64)
        known = (users >= 0) & (users < self.n_users_)
        prefix = np.zeros((len(users), self.n_aug), dtype=np.int64)
        prefix[known] = self.prefix_[users[known]]
        if not prefix[:, 0].any():
            return hist
        indptr, items, is_prefix = prepend_rows(hist.indptr, hist.items, prefix)
        extra = {}  # per-item fields beside the items (behaviours, times): filled in for the prefix
        for f in dataclasses.fields(hist):
            value = getattr(hist, f.name)
            if f.name in ("users", "indptr", "items", "n_items") or value is None:
                continue
            value = np.asarray(value)
            if value.dtype == object:  # behaviours: unknown for generated items
                out = np.full(len(items), None, dtype=object)
            else:  # numbers (timestamps): the first real value of the row, so the order stays
                first = np.zeros(len(hist), dtype=value.dtype)
                nonempty = hist.lengths > 0
                first[nonempty] = value[hist.indptr[:-1][nonempty]]
                out = np.repeat(first, np.diff(indptr)).astype(value.dtype)
            out[~is_prefix] = value
            extra[f.name] = out
        return Histories(hist.users, indptr, items, hist.n_items, **extra)

    def score(self, hist: Histories) -> torch.Tensor:
        """Scores (batch, n_items + 1) of the backbone on the prefixed histories."""
        return self.backbone_.score(self.augment_histories(hist))

    # ---- persistence ------------------------------------------------------------------------
    def _fitted_state(self) -> dict:
        return {"n_users_": self.n_users_, "n_items_": self.n_items_, "prefix_": self.prefix_,
                "aug_stats_": self.aug_stats_, "history_": getattr(self, "history_", None),
                "backbone_state": self.backbone_._fitted_state(),
                "diffusion_state": {k: v.cpu() for k, v in self.diffusion_.state_dict().items()}}

    def _restore_state(self, state: dict) -> None:
        state = dict(state)
        backbone_state, diffusion_state = state.pop("backbone_state"), state.pop("diffusion_state")
        super()._restore_state(state)
        self.backbone_ = self._make_backbone()
        self.backbone_._restore_state(backbone_state)
        self.diffusion_ = self._build_diffusion()
        self.diffusion_.load_state_dict(diffusion_state)
        self.diffusion_.eval()
        self.diffusion_.to(self.backbone_.device_)
