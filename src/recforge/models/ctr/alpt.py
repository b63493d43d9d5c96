"""ALPT: embedding tables trained and stored in low precision, with learned step sizes.

Li, Guo, Hou, Zhang, Tang, Tang, Zhang and Li, "Adaptive Low-Precision Training for Embeddings in
Click-Through Rate Prediction", AAAI 2023. Low-precision training (LPT) keeps an embedding table
as integers ``w_int`` and a step size ``Δ`` from the first training step on: the network reads
the de-quantised rows ``ŵ = Δ · w_int``, the rows are updated in full precision
(``w = ŵ − η ∇ŵ``) and re-quantised at once with *stochastic* rounding (the paper shows it
converges faster and to a smaller error than rounding to the nearest value); ALPT learns ``Δ``
by gradient descent. Any CTR model takes it through ``embedding_bits`` (8, 4 or 2; null: fp32
tables): :class:`~recforge.models.ctr.base.FieldEmbedding` then holds a
:class:`QuantEmbedding` per vocabulary, and the model's :meth:`after_step` runs the steps below
after every optimiser step of the shared trainer (and of MAP pre-training).

What is done at each training step (weights, then step sizes, updated alternately as the paper
does):

1. The forward pass reads ``ŵ = Δ · w_int`` of the batch's distinct rows (a full-precision leaf
   that exists only for the step); the trainer's backward pass leaves ``∇ŵ`` on it while its
   optimiser updates the other parameters.
2. The rows take a full-precision Adam step (``lr`` and ``weight_decay`` of the model, the
   trainer's learning-rate schedule): ``w = ŵ − lr · m̂ / (√v̂ + ε)``.
3. The step sizes get their gradient from a second forward pass over the same batch in which
   the updated rows are quantised with the LSQ quantiser ``Q(w, Δ) = Δ · round(clip(w / Δ,
   −Q, Q))`` (Esser et al., "Learned Step Size Quantization", ICLR 2020: straight-through
   rounding, so ``∂Q/∂Δ = round(w/Δ) − w/Δ`` inside the range and ``±Q`` where clipped), and
   take an Adam step with ``alpt_step_lr``.
4. The rows are re-quantised with the new step sizes: ``w_int = ⌊clip(w / Δ, −Q, Q) + u⌋``,
   ``u ~ U[0, 1)`` (unbiased: ``E[w_int] = w / Δ`` inside the range).

Storage: ``w_int`` is an ``int8`` buffer (the saved model keeps it as such), ``Δ`` a float32
parameter per row (``alpt_step=row``: the paper's step size per feature) or one per table
(``alpt_step=table``). ``Q = 2^(bits−1) − 1``: a symmetric range of codes (our choice; 127, 7 or
1 levels each side, so 2 bits are ternary).
:meth:`QuantEmbedding.nbytes` and the model's ``embedding_bytes()`` give the bytes of the
tables against float32 tables of the same shape. Id 0 (padding) stays the zero row, never
updated. The first-order weights (``FieldLinear``) and the numeric fields' vectors stay float32:
ALPT compresses the embedding tables (LR, which has none, refuses ``embedding_bits``).

Initialisation: the rows are drawn as the float32 tables are (normal, std 0.01) and quantised
stochastically with ``Δ₀ = 2 · mean|w| / √Q`` (LSQ's rule) for every row.

Deviations and limits: rows and step sizes both take *lazy* Adam steps (a row's moments move only
when the row is in a batch, as sparse Adam does; the float32 baseline's Adam moves every row's
moments); LSQ's gradient scale ``1/√(N·Q)`` is left out, Adam being invariant to it. The second
pass runs in training mode like the first (dropout drawn again, batch-norm statistics updated
twice per step) and sees the other parameters already updated. The Adam moments of the rows are
float32 tables held during training only (in checkpoints, not in the saved model): they do not
shrink the memory of training, the int8 codes shrink that of the stored model. 4- and 2-bit codes
are held one per byte (``nbytes`` reports the bit-packed size beside the real one); nothing here
packs them or runs integer kernels. Each step costs a second forward/backward pass. Not supported
with ``precision=fp16`` (the gradient scaler scales the rows' gradients), data-parallel training,
or the multi-task ``optimizer=adatask`` (its per-task gradients never reach the rows).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from recforge.errors import ConfigError

BITS = (8, 4, 2)
STEPS = ("row", "table")


def levels(bits: int) -> int:
    """``Q``: the largest code; codes lie in ``[-Q, Q]``."""
    return 2 ** (int(bits) - 1) - 1


def check_bits(bits, step: str = "row") -> None:
    if bits is not None and (isinstance(bits, bool) or bits not in BITS):
        raise ConfigError(f"embedding_bits={bits!r}: choose null (float32 tables) or one of {', '.join(map(str, BITS))}")
    if step not in STEPS:
        raise ConfigError(f"alpt_step={step!r}: choose row (one step size per table row) or table (one per table)")


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``⌊x + u⌋`` with ``u ~ U[0, 1)``: rounds up with probability ``x − ⌊x⌋``, so ``E = x``."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.floor(x + u)


def quantize(w: torch.Tensor, step: torch.Tensor, bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer codes (int8) of ``w`` with step size ``step``: clipped, stochastically rounded."""
    q = levels(bits)
    return stochastic_round((w / step).clamp(-q, q), generator).clamp(-q, q).to(torch.int8)


def lsq(w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """LSQ's fake quantiser ``Δ · round(clip(w / Δ))`` with straight-through rounding: differentiable
    in ``step`` (``w`` is taken as fixed)."""
    q = levels(bits)
    x = (w.detach() / step).clamp(-q, q)
    return (x + (torch.round(x) - x).detach()) * step


class QuantEmbedding(nn.Module):
    """An embedding table stored as int8 codes with learned step sizes (see the module docstring).

    ``forward(ids)`` returns the de-quantised rows. In training with gradients on, the batch's
    distinct rows are a float32 leaf whose gradient :class:`ALPTUpdater` reads after the step;
    while the updater probes the step sizes, the looked-up rows are the updated ones through
    :func:`lsq`. ``weight`` is the whole de-quantised table (for networks that read it whole)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, step: str = "row",
                 init_std: float = 1e-2):
        super().__init__()
        check_bits(bits, step)
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.bits, self.step_kind = int(bits), step
        w = torch.randn(self.num_embeddings, self.embedding_dim) * init_std
        w[0] = 0.0
        s0 = max(2.0 * float(w[1:].abs().mean()) / math.sqrt(levels(bits)), 1e-6) if len(w) > 1 else 1e-3
        self.register_buffer("codes", quantize(w, torch.tensor(s0), bits))
        self.step = nn.Parameter(torch.full((self.num_embeddings if step == "row" else 1, 1), s0))
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (distinct ids, float32 leaf rows)
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None  # (sorted ids, updated float32 rows)

    def step_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The step size of each id, shaped ``ids.shape + (1,)``."""
        if self.step_kind == "row":
            return F.embedding(ids, self.step)
        return self.step.reshape(*([1] * ids.dim()), 1).expand(*ids.shape, 1)

    def dequantize(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.codes).float() * self.step_of(ids)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.probe is not None:
            u, w = self.probe  # u sorted, not empty; ids outside it (padding) keep their stored rows
            pos = torch.searchsorted(u, ids.contiguous()).clamp(max=len(u) - 1)
            rows = torch.where((u[pos] == ids).unsqueeze(-1), w[pos], self.dequantize(ids).detach())
            return lsq(rows, self.step_of(ids), self.bits)
        if self.training and torch.is_grad_enabled():
            u, inv = torch.unique(ids, return_inverse=True)
            rows = self.dequantize(u).detach().requires_grad_(True)
            self.pending.append((u, rows))
            return rows[inv]
        return self.dequantize(ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._lookup(ids)

    @property
    def weight(self) -> torch.Tensor:
        """The de-quantised table ``(num_embeddings, dim)``."""
        return self._lookup(torch.arange(self.num_embeddings, device=self.codes.device))

    def nbytes(self) -> dict:
        """Bytes of this table: ``fp32`` (a float32 table of the same shape), ``codes`` (the int8
        buffer), ``step_sizes``, ``stored`` (codes + step sizes, as held) and ``packed`` (the codes
        at ``bits`` bits each, plus the step sizes)."""
        n = self.codes.numel()
        steps = self.step.numel() * self.step.element_size()
        codes = n * self.codes.element_size()
        return {"fp32": n * 4, "codes": codes, "step_sizes": steps, "stored": codes + steps,
                "packed": math.ceil(n * self.bits / 8) + steps}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, step={self.step_kind}"


class ALPTUpdater:
    """Steps 2-4 of the module docstring for every :class:`QuantEmbedding` of a network, with the
    lazy Adam moments of rows and step sizes (:meth:`state_dict` for checkpoints)."""

    def __init__(self, net: nn.Module, step_lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.tables = {name: m for name, m in net.named_modules() if isinstance(m, QuantEmbedding)}
        self.step_lr, self.betas, self.eps = float(step_lr), betas, eps
        self.state: dict[str, dict] = {}

    def _state(self, name: str, m: QuantEmbedding) -> dict:
        if name not in self.state:
            dev = m.codes.device
            self.state[name] = {"t": 0, "m": torch.zeros(m.codes.shape, device=dev), "v": torch.zeros(m.codes.shape, device=dev),
                                "ts": 0, "sm": torch.zeros_like(m.step.detach()), "sv": torch.zeros_like(m.step.detach())}
        return self.state[name]

    def _adam(self, m1, m2, idx, g, t, lr):
        """One lazy Adam step on rows ``idx`` of the moments; returns the update to subtract."""
        b1, b2 = self.betas
        m1[idx] = b1 * m1[idx] + (1 - b1) * g
        m2[idx] = b2 * m2[idx] + (1 - b2) * g * g
        return lr * (m1[idx] / (1 - b1 ** t)) / ((m2[idx] / (1 - b2 ** t)).sqrt() + self.eps)

    def clear(self) -> None:
        for m in self.tables.values():
            m.pending.clear()
            m.probe = None

    @torch.no_grad()
    def _row_updates(self, lr: float, weight_decay: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for name, m in self.tables.items():
            pend, m.pending = m.pending, []
            pend = [(u, r) for u, r in pend if r.grad is not None]
            if not pend:
                continue
            ids, inv = torch.unique(torch.cat([u for u, _ in pend]), return_inverse=True)
            g = torch.zeros(len(ids), m.embedding_dim, device=ids.device)
            g.index_add_(0, inv, torch.cat([r.grad.float() for _, r in pend]))
            keep = ids > 0  # padding stays the zero row
            ids, g = ids[keep], g[keep]
            if not len(ids):
                continue
            w = m.dequantize(ids)
            if weight_decay:
                g = g + weight_decay * w
            st = self._state(name, m)
            st["t"] += 1
            out[name] = (ids, w - self._adam(st["m"], st["v"], ids, g, st["t"], lr))
        return out

    def step(self, loss_fn, lr: float, weight_decay: float = 0.0, generator: torch.Generator | None = None) -> None:
        """After the optimiser step of a batch whose forward/backward pass left row gradients:
        ``loss_fn()`` recomputes that batch's loss (the second pass for the step sizes)."""
        try:
            updates = self._row_updates(lr, weight_decay)
            if not updates:
                return
            for name, (ids, w) in updates.items():
                self.tables[name].probe = (ids, w)
            params = [self.tables[name].step for name in updates]
            grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
        finally:
            self.clear()
        with torch.no_grad():
            for (name, (ids, w)), g in zip(updates.items(), grads):
                m, st = self.tables[name], self.state[name]
                if g is not None:
                    st["ts"] += 1
                    idx = ids if m.step_kind == "row" else torch.zeros(1, dtype=torch.long, device=ids.device)
                    m.step[idx] = (m.step[idx] - self._adam(st["sm"], st["sv"], idx, g[idx].float(), st["ts"],
                                                           self.step_lr)).clamp(min=1e-8)
                m.codes[ids] = quantize(w, m.step_of(ids).detach(), m.bits, generator)

    def state_dict(self) -> dict:
        return {"state": {k: dict(v) for k, v in self.state.items()}}

    def load_state_dict(self, blob: dict) -> None:
        dev = {name: m.codes.device for name, m in self.tables.items()}
        self.state = {k: {kk: (vv.to(dev[k]) if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
                      for k, v in (blob or {}).get("state", {}).items() if k in dev}
