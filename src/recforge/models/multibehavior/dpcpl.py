"""DPCPL: denoising pre-training and customised prompt learning for multi-behaviour sequences.

Wang, Han, Wang, Cheng, Wang, Guo, Liu, Lian & Chen, "Denoising Pre-Training and Customized Prompt
Learning for Efficient Multi-Behavior Sequential Recommendation", arXiv 2408.11372, 2024. No code
was published; this implementation is written from the paper's description: in a **pre-training**
stage an *Efficient Behavior Miner* (EBM) filters the noise of the multi-behaviour sequence at
several time scales in the frequency domain (FFT, frequency-domain fusion of the scales, a
*chunked diagonal* weight that keeps the parameter count small); in a **prompt-tuning** stage the
pre-trained model is frozen and a *Customized Prompt Learning* (CPL) module generates
personalised, progressive (layer by layer, through a *prompt factor gate*) and diverse prompts,
the only parameters tuned for the downstream (target-behaviour) task. The choices the description
leaves open are listed at the end.

Input: the user's last ``max_len`` rows of every behaviour, each an (item, behaviour) pair in time
order, as :mod:`recforge.models.multibehavior.mbsasrec`, behind ``n_prompts`` prompt slots:
a sequence of ``T = n_prompts + max_len`` columns, the prompts first, the rows left-padded. The
row token is ``LN(e_item + e_behaviour + e_pos)`` (padding stays zero), then dropout.

**Efficient Behavior Miner** (one per layer, in place of self-attention). For every time scale
``s`` of ``scales`` (``1``: row by row; ``s``: the mean of ``s`` consecutive rows, a coarser
time step), ``Z_s = rfft(pool_s(X))`` along time (``norm="ortho"``), then

* a **chunked diagonal** complex channel mixing: the ``d`` channels cut into ``n_blocks`` chunks,
  each mixed by a complex ``d/n_blocks x d/n_blocks`` matrix (a block-diagonal ``d x d``
  weight, shared by the frequencies of the scale) plus a complex bias;
* a learnable complex filter per frequency and channel (FMLP-Rec's global filter);
* **denoising**: soft shrinkage of the real and imaginary parts by ``shrink`` (AFNO's sparsity
  step): weak frequency components, the noise of accidental clicks, are set to zero;

each scale transformed back (``irfft``) and repeated to the row resolution; the scales are fused
with softmax weights. The layer is FMLP-Rec's block around it: ``X ← LN(X + Drop(EBM(X)))``,
``X ← LN(X + Drop(FFN(X)))``, padding rows reset to zero after each sub-layer. The filters mix
the whole window, so the representation is read at the **last row** only (a window never
contains its target; no position sees the future).

**Customized Prompt Learning.** ``n_factors`` prompt factors per layer (each ``n_prompts x d``);
**personalised**: the user's coefficients over them, ``softmax(W_l u)``, where ``u`` is the mean
of the history's row embeddings (so a fresh history or an unknown user gets prompts of its own);
**progressive**: the prompt of layer ``l > 1`` is ``g ⊙ H_{l-1} + (1 - g) ⊙ Q_l`` with ``Q_l``
the layer's personalised mixture, ``H_{l-1}`` what the previous layer made of its prompt, and
the **prompt factor gate** ``g = σ(G_l [H_{l-1}, Q_l])``; the prompts are written into the prompt
slots at the input of every layer (deep prompts); **diverse**: the regulariser
``prompt_reg · mean_{k≠k'} cos²(F_k, F_k')`` over each layer's factors.

Training, two stages inside one ``fit``, both on the shared trainer:

* **(a) pre-training** (``pretrain_epochs``, learning rate ``pretrain_lr``, default ``lr``; no
  validation): every training row that has an earlier row of the same user is a target, its
  window the ``max_len`` rows before it, of every behaviour. **Denoising objective**: a share
  ``pretrain_noise`` of the window's rows have their item replaced by a uniformly drawn one, and
  the model predicts the clean next item (full-softmax cross-entropy over the catalogue, the item
  table as output layer). The prompt slots are empty (zero) in this stage;
* **(b) tuning** for the target behaviour (``epochs``, ``lr``, early stopping on validation as
  every model): one window per target-behaviour row of the training part (the ``max_len`` rows
  just before it), the target its item, full-softmax cross-entropy plus the prompt regulariser.
  ``finetune=prompt`` (default, the paper): the pre-trained encoder (embeddings, EBM layers, item
  table) is frozen (``requires_grad`` off, so the optimiser holds only the prompt parameters) and
  stays bit-identical; only the CPL module is trained. ``finetune=full``: every parameter is
  trained in stage (b), the comparison the paper makes for efficiency.

The two stages are two runs of :class:`~recforge.training.trainer.Trainer`: stage (a) runs in
:meth:`before_training` (the hook for pre-training on the built network) with the model's stage
flag set to pre-training and ``epochs``/``lr`` swapped for ``pretrain_epochs``/``pretrain_lr``
for its duration, without validation, checkpoints or callbacks; stage (b) is the ordinary run that
``fit`` makes afterwards (validation, early stopping, checkpoints; ``resume_from`` resumes stage
(b) and does not repeat stage (a), whose weights the checkpoint holds). :meth:`protocol_notes`
reports the parameters tuned in stage (b), the total, their share, and the epochs and seconds of
each stage.

Scoring: the history's last ``max_len`` rows with their behaviours (:attr:`Histories.behaviors`;
a history without them counts every row as the most frequent training behaviour), the prompts
generated from it, the last row's representation against every item.

Open choices and deviations (the description available to us names the components, not every
formula):

* time scales are resolutions of the row order (mean-pooling ``s`` consecutive rows), not
  calendar periods; timestamps only order the rows;
* the scales are fused by a softmax-weighted sum after the inverse transforms (a weighted sum of
  spectra on one grid is the same thing, the transform being linear; the pooled scales have
  grids of their own);
* the chunked diagonal weight is read as block-diagonal complex channel mixing shared by the
  frequencies, followed by a per-frequency filter and soft shrinkage (AFNO's order);
* the denoising objective (random item replacement, clean next item as target) is this
  implementation's; the pre-training target is the next row of any behaviour;
* the personal signal is the mean row embedding of the history (the paper personalises prompts
  per user; a user-id table would not serve unknown users or fresh events and would dwarf the
  prompt parameters); the diversity regulariser (squared cosine between factors) stands for the
  paper's compactness regularisation, whose exact form we did not have;
* stage (b) tunes the prompt module only: no output head is tuned (the item table is frozen);
* the encoder is FMLP-Rec's post-LN block with the EBM as its filter; weights of the linear and
  embedding layers from ``N(0, 0.02²)``; the EBM starts as an all-pass filter (identity mixing,
  unit filters) with N(0, 0.02²) noise.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.multibehavior.base import BehaviorAware, history_windows, training_rows
from recforge.models.sequential.base import pad_windows
from recforge.models.sequential.modules import ACTIVATIONS, Dropout, init_weights
from recforge.models.torch_base import TorchRecommender
from recforge.training.losses import ce_loss
from recforge.training.trainer import Trainer

FINETUNE_MODES = ("prompt", "full")


def sample_windows(users: np.ndarray, max_len: int, is_target: np.ndarray | None = None):
    """``(starts, ends)`` of the training windows of (user, time)-sorted rows: every row that has
    an earlier row of the same user (and ``is_target`` where given) is a target; its window is the
    user's (at most ``max_len``) rows just before it, ``rows[start:end]`` with ``end`` the target
    row. The target row is therefore ``ends``."""
    n = len(users)
    first = np.ones(n, dtype=bool)
    first[1:] = users[1:] != users[:-1]
    ok = ~first if is_target is None else ~first & is_target
    ends = np.flatnonzero(ok)
    user_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    return np.maximum(user_start[ends], ends - max_len), ends


def _complex(p: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(p)


class BehaviorMiner(nn.Module):
    """The Efficient Behavior Miner: multi-scale frequency-domain denoising of (B, T, d)."""

    def __init__(self, length: int, hidden: int, scales, n_blocks: int, shrink: float):
        super().__init__()
        self.length, self.scales, self.shrink = length, tuple(int(s) for s in scales), float(shrink)
        self.n_blocks, b = n_blocks, hidden // n_blocks
        self.filters, self.mix, self.bias = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        for s in self.scales:
            bins = -(-length // s) // 2 + 1
            filt = torch.zeros(bins, hidden, 2)
            filt[..., 0] = 1.0
            mix = torch.zeros(n_blocks, b, b, 2)
            mix[..., 0] = torch.eye(b)
            self.filters.append(nn.Parameter(filt + 0.02 * torch.randn_like(filt)))
            self.mix.append(nn.Parameter(mix + 0.02 * torch.randn_like(mix)))
            self.bias.append(nn.Parameter(torch.zeros(n_blocks, b, 2)))
        self.fuse = nn.Parameter(torch.zeros(len(self.scales)))

    def scale(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Scale ``k``'s filtered signal at the row resolution."""
        s = self.scales[k]
        bsz, length, d = x.shape
        steps = -(-length // s)
        pad = steps * s - length
        if s > 1:
            x = F.pad(x, (0, 0, pad, 0)).view(bsz, steps, s, d).mean(2)  # zeros before the first rows
        z = torch.fft.rfft(x.float(), dim=1, norm="ortho")  # (B, bins, d)
        z = z.reshape(bsz, -1, self.n_blocks, d // self.n_blocks)
        z = torch.einsum("bfki,kio->bfko", z, _complex(self.mix[k])) + _complex(self.bias[k])
        z = z.reshape(bsz, -1, d) * _complex(self.filters[k])
        if self.shrink > 0:
            z = torch.complex(F.softshrink(z.real, self.shrink), F.softshrink(z.imag, self.shrink))
        y = torch.fft.irfft(z, n=steps, dim=1, norm="ortho")
        if s > 1:
            y = y.repeat_interleave(s, dim=1)[:, pad:]
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.fuse, 0)
        out = sum(w[k] * self.scale(x, k) for k in range(len(self.scales)))
        return out.to(x.dtype)


class MinerLayer(nn.Module):
    """FMLP-Rec's block with the behaviour miner as its filter (post-LN)."""

    def __init__(self, length, hidden, inner, dropout, scales, n_blocks, shrink, activation):
        super().__init__()
        self.miner = BehaviorMiner(length, hidden, scales, n_blocks, shrink)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-8)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-8)
        self.ff1 = nn.Linear(hidden, inner)
        self.ff2 = nn.Linear(inner, hidden)
        self.drop = Dropout(dropout)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.drop(self.miner(x))) * keep
        return self.ln2(x + self.drop(self.ff2(self.drop(self.act(self.ff1(x)))))) * keep


class PromptLearner(nn.Module):
    """Customised prompts: personalised mixtures of prompt factors, gated layer to layer."""

    def __init__(self, n_layers: int, n_prompts: int, n_factors: int, hidden: int):
        super().__init__()
        self.factors = nn.Parameter(torch.randn(n_layers, n_factors, n_prompts, hidden) * 0.02)
        self.select = nn.ModuleList(nn.Linear(hidden, n_factors) for _ in range(n_layers))
        self.gate = nn.ModuleList(nn.Linear(2 * hidden, hidden) for _ in range(n_layers - 1))

    def forward(self, layer: int, user: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """The prompts (B, n_prompts, d) of ``layer`` for user signals ``user`` (B, d); ``prev``: the
        previous layer's output at the prompt slots (None for the first layer)."""
        coef = torch.softmax(self.select[layer](user), -1)
        q = torch.einsum("bk,kpd->bpd", coef, self.factors[layer])
        if prev is None:
            return q
        g = torch.sigmoid(self.gate[layer - 1](torch.cat([prev, q], -1)))
        return g * prev + (1 - g) * q

    def diversity(self) -> torch.Tensor:
        """Mean squared cosine similarity between distinct factors of a layer, over the layers."""
        f = F.normalize(self.factors.flatten(2), dim=-1)  # (layers, factors, n_prompts * d)
        k = f.shape[1]
        if k < 2:
            return f.new_zeros(())
        sim = f @ f.transpose(1, 2)
        off = ~torch.eye(k, dtype=torch.bool, device=f.device)
        return sim[:, off].pow(2).mean()


class DPCPLNet(nn.Module):
    """Row embeddings, prompt slots, the behaviour-miner layers (the encoder) and the prompts."""

    def __init__(self, n_items, n_behaviors, max_len, n_prompts, hidden, n_layers, inner, dropout, scales,
                 n_blocks, shrink, activation, n_factors):
        super().__init__()
        length = max_len + n_prompts
        self.n_prompts = n_prompts
        self.item = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.behavior = nn.Embedding(n_behaviors + 1, hidden, padding_idx=0)
        self.pos = nn.Embedding(max_len, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-8)
        self.drop = Dropout(dropout)
        self.layers = nn.ModuleList(MinerLayer(length, hidden, inner, dropout, scales, n_blocks, shrink, activation)
                                    for _ in range(n_layers))
        self.prompts = PromptLearner(n_layers, n_prompts, n_factors, hidden)

    def encoder_parameters(self):
        """Every parameter but the prompt module's (what prompt tuning freezes)."""
        return [p for name, p in self.named_parameters() if not name.startswith("prompts.")]

    def forward(self, seqs: torch.Tensor, behs: torch.Tensor, prompted: bool) -> torch.Tensor:
        """The last row's representation (B, d) of left-padded (B, max_len) items and behaviours;
        ``prompted=False``: empty prompt slots (pre-training)."""
        bsz, width = seqs.shape
        valid = (seqs > 0).unsqueeze(-1).to(self.item.weight.dtype)
        pos = torch.arange(self.pos.num_embeddings - width, self.pos.num_embeddings, device=seqs.device)
        emb = self.ln(self.item(seqs) + self.behavior(behs) + self.pos(pos)) * valid
        p = self.n_prompts
        keep = torch.cat([valid.new_ones(bsz, p, 1), valid], 1)
        user = emb.sum(1) / valid.sum(1).clamp(min=1.0) if prompted else None
        x = torch.cat([emb.new_zeros(bsz, p, emb.shape[-1]), self.drop(emb)], 1)
        prev = None
        for i, layer in enumerate(self.layers):
            slot = self.prompts(i, user, prev) if prompted else x.new_zeros(bsz, p, x.shape[-1])
            x = layer(torch.cat([slot.to(x.dtype), x[:, p:]], 1), keep)
            prev = x[:, :p]
        return x[:, -1]


class DPCPL(BehaviorAware, TorchRecommender):
    name = "dpcpl"

    def __init__(self, max_len: int = 50, hidden: int = 64, n_layers: int = 2, inner: int = 256,
                 dropout: float = 0.2, activation: str = "gelu", scales=(1, 4, 16), n_blocks: int = 4,
                 shrink: float = 0.01, pretrain_epochs: int = 20, pretrain_lr: float | None = None,
                 pretrain_noise: float = 0.2, n_prompts: int = 4, n_factors: int = 4, prompt_reg: float = 0.01,
                 finetune: str = "prompt", threads: int | None = None, **train):
        super().__init__(**train)
        if max_len < 1 or hidden <= 0 or n_layers < 1 or inner <= 0:
            raise ConfigError("dpcpl: need max_len >= 1, hidden > 0, n_layers >= 1 and inner > 0")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation={activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if not 0.0 <= dropout < 1.0 or not 0.0 <= pretrain_noise < 1.0:
            raise ConfigError("dpcpl: dropout and pretrain_noise must be in [0, 1)")
        if isinstance(scales, (int, float)):
            scales = [scales]
        if not scales or any(int(s) != s or s < 1 or s > max_len for s in scales) or len(set(scales)) != len(scales):
            raise ConfigError(f"scales={scales!r}: distinct whole numbers of rows per time step, each in "
                              f"1..max_len (e.g. [1, 4, 16])")
        if n_blocks < 1 or hidden % n_blocks:
            raise ConfigError(f"n_blocks={n_blocks}: the chunks of the diagonal weight must divide hidden={hidden}")
        if shrink < 0 or prompt_reg < 0:
            raise ConfigError("dpcpl: shrink and prompt_reg must be >= 0")
        if pretrain_epochs < 0 or (pretrain_lr is not None and pretrain_lr <= 0):
            raise ConfigError("dpcpl: need pretrain_epochs >= 0 and pretrain_lr > 0 (or null: lr)")
        if n_prompts < 1 or n_factors < 1:
            raise ConfigError("dpcpl: need n_prompts >= 1 and n_factors >= 1")
        if finetune not in FINETUNE_MODES:
            raise ConfigError(f"finetune={finetune!r}: choose prompt (tune the prompts, encoder frozen: the paper) "
                              "or full (tune every parameter)")
        self.max_len, self.hidden, self.n_layers, self.inner = max_len, hidden, n_layers, inner
        self.dropout, self.activation, self.scales, self.n_blocks, self.shrink = dropout, activation, scales, n_blocks, shrink
        self.pretrain_epochs, self.pretrain_lr, self.pretrain_noise = pretrain_epochs, pretrain_lr, pretrain_noise
        self.n_prompts, self.n_factors, self.prompt_reg, self.finetune = n_prompts, n_factors, prompt_reg, finetune
        self.threads = threads
        self._stage = "tune"

    # ---- samples ------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        target, behaviors, default = self.adopt_behaviors(split)
        users, self._items, self._codes = training_rows(split, behaviors, target)
        is_t = self._codes == behaviors.index(target) + 1
        self._windows = {"pretrain": sample_windows(users, self.max_len),
                         "tune": sample_windows(users, self.max_len, is_t)}
        if len(self._windows["tune"][1]) == 0:
            raise ConfigError(f"{self.name}: no training sequence has a row before a {target!r} row")

    def n_train_batches(self, split) -> int:
        return math.ceil(len(self._windows[self._stage][1]) / self.batch_size)

    def train_batches(self, split, rng):
        starts, ends = self._windows[self._stage]
        for rows, gen in self.epoch_batches(rng.permutation(len(ends)), rng):
            inp = pad_windows(self._items, starts[rows], ends[rows], self.max_len)
            if self._stage == "pretrain" and self.pretrain_noise > 0:
                noisy = (gen.random(inp.shape) < self.pretrain_noise) & (inp > 0)
                inp[noisy] = gen.integers(1, self.n_items_ + 1, int(noisy.sum()))
            yield {"inp": torch.from_numpy(inp),
                   "beh": torch.from_numpy(pad_windows(self._codes, starts[rows], ends[rows], self.max_len)),
                   "tgt": torch.from_numpy(self._items[ends[rows]])}

    # ---- the model ----------------------------------------------------------------------------
    def build(self, n_users, n_items):
        net = DPCPLNet(n_items, len(self.behaviors_), self.max_len, self.n_prompts, self.hidden, self.n_layers,
                       self.inner, self.dropout, self.scales, self.n_blocks, self.shrink, self.activation,
                       self.n_factors)
        init_weights(net)
        return net

    def make_optimizer(self):
        """Adam over the parameters the current stage trains (the trainer's optimiser otherwise)."""
        params = [p for p in self.net_.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    def _set_trainable(self, stage: str) -> None:
        self.net_.requires_grad_(True)
        if stage == "pretrain":
            self.net_.prompts.requires_grad_(False)
        elif self.finetune == "prompt":
            for p in self.net_.encoder_parameters():
                p.requires_grad_(False)

    def before_training(self, split, valid=None) -> None:
        """Stage (a), pre-training, on the shared trainer; then set up stage (b)."""
        self._pretrain = {"epochs": 0, "seconds": 0.0, "samples": int(len(self._windows["pretrain"][1]))}
        if self.resume_from is None and self.pretrain_epochs > 0:
            saved = self.epochs, self.lr, self.callbacks
            self._stage = "pretrain"
            self._set_trainable("pretrain")
            self.epochs, self.lr, self.callbacks = self.pretrain_epochs, self.pretrain_lr or self.lr, []
            t0 = time.perf_counter()
            try:
                hist = Trainer(self, split, None, verbose=self.verbose).run()
            finally:
                self.epochs, self.lr, self.callbacks = saved
                self._stage = "tune"
            self._pretrain.update(epochs=len(hist.epochs), seconds=round(time.perf_counter() - t0, 2),
                                  loss=round(hist.epochs[-1]["loss"], 4) if hist.epochs else None)
        self._stage = "tune"
        self._set_trainable("tune")
        self.n_params_ = {"total": sum(p.numel() for p in self.net_.parameters()),
                          "tuned": sum(p.numel() for p in self.net_.parameters() if p.requires_grad)}

    def train_state(self) -> dict:
        return {"pretrain": dict(getattr(self, "_pretrain", {}))}

    def load_train_state(self, state: dict) -> None:
        if state.get("pretrain"):
            self._pretrain = dict(state["pretrain"])

    def fit(self, split, valid=None):
        super().fit(split, valid)
        rows = self.history_["epochs"]
        self.stages_ = {
            "pretrain": dict(self._pretrain),
            "tune": {"epochs": len(rows), "best_epoch": self.history_["best_epoch"],
                     "seconds": self.history_["seconds"],
                     "train_seconds": round(sum(r.get("train_seconds", 0.0) for r in rows), 2),
                     "samples": int(len(self._windows["tune"][1]))},
        }
        return self

    def loss(self, batch) -> torch.Tensor:
        prompted = self._stage == "tune"
        h = self.net_(batch["inp"], batch["beh"], prompted)
        loss = ce_loss(h, self.net_.item.weight, batch["tgt"])
        if prompted and self.prompt_reg:
            loss = loss + self.prompt_reg * self.net_.prompts.diversity()
        return loss

    def score(self, hist) -> torch.Tensor:
        """Scores (batch, n_items + 1) on the model's device."""
        dev = self.device_
        seqs, behs = history_windows(hist, self.behaviors_, self.default_behavior_, self.max_len)
        with torch.no_grad():
            h = self.net_(seqs.to(dev), behs.to(dev), True)
            return h @ self.net_.item.weight.T

    def protocol_notes(self) -> dict:
        n, st = self.n_params_, self.stages_
        return {"loss": "pre-training: ce (full softmax) on the next row's clean item from a corrupted window; "
                        "tuning: ce (full softmax) on the next target-behaviour item + prompt diversity",
                "max_len": self.max_len, "scales": [int(s) for s in self.scales],
                "subsequence_split": "a window before every row (pre-training) and every target row (tuning)",
                "finetune": self.finetune, "params_total": int(n["total"]), "params_tuned": int(n["tuned"]),
                "tuned_share": n["tuned"] / n["total"],
                "pretrain_epochs": st["pretrain"]["epochs"], "pretrain_seconds": st["pretrain"]["seconds"],
                "tune_epochs": st["tune"]["epochs"], "tune_seconds": st["tune"]["seconds"],
                "tune_train_seconds": st["tune"]["train_seconds"], "target_behavior": self.target_behavior_,
                "behaviors_used": list(self.behaviors_),
                "input": "the whole multi-behaviour history with behaviour embeddings, behind personalised prompts"}
