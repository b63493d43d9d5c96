"""RecLoRA: lifelong personalised low-rank adaptation — a mixture of LoRA experts per user, a long
history for a conventional model and a short one for the language model, and a conventional model
trained on the whole training space.

Zhu et al., "Lifelong Personalized Low-Rank Adaptation of Large Language Models for
Recommendation", arXiv 2408.03533 (2024). One LoRA shared by every user cannot cater to each user;
long behaviour histories are too costly as text; and a language model tuned on a small sample sees a
sliver of the training data. RecLoRA answers each with one part:

* **Personalised LoRA**: a bank of ``n_experts`` meta-LoRA pairs ``(A_k, B_k)`` on each target
  projection and a soft routing gate; a user's adapter is ``sum_k a_k(u) B_k A_k`` with gate weights
  ``a(u) = softmax(W_g h_u / temperature)`` computed from the user representation ``h_u`` of a
  conventional recommendation model (CRM).
* **Long-short modality retriever**: the CRM reads a long history in ID form (the ``long_k`` latest
  ratings), the language model a short one as text (the ``k`` items of the prompt, recent or
  semantically retrieved as in ReLLa), so history length costs the language model nothing.
* **Few2Many**: the CRM is trained on the whole training space (every training row), the language
  model on a few sampled prompts; the CRM's representation carries what the many rows taught into the
  few-shot tuning through the gate.

How it runs here:

* **CRM** (:class:`SequenceCRM`, trained in :meth:`RecLoRA.fit` on every training row of the split,
  each row's history its user's ``long_k`` latest training rows strictly before it): history tokens
  ``E_item + E_like`` (like or not), their mean through a linear layer and ``tanh`` is ``h``; the click
  logit is an MLP of ``[h, E_target, h * E_target]``; binary cross-entropy, Adam, ``crm_*``
  settings, seeded; then frozen. A prompt's ``h`` is computed from the same long history of its
  target (training rows only, strictly earlier), so a user's adapter follows the user's history.
* **Experts** (:class:`ExpertNet`): on each target projection the ``A_k`` stacked into one
  ``(n_experts r) x d_in`` matrix and the ``B_k`` into one ``d_out x (n_experts r)`` matrix; a forward
  hook adds ``(alpha / r) * B diag(a(u) repeated r times) A x`` for each example (two matrix products
  however many experts). ``A_k`` start as LoRA starts (Kaiming-uniform, each expert its own draw),
  ``B_k`` at zero, so tuning starts from the backbone; the gate ``W_g`` (a linear layer on ``h``) is
  trained with the experts by the shared trainer (AdamW, the answer token's cross-entropy), the
  backbone and the CRM frozen. With one expert the gate is 1 and the model is plain LoRA.

Deviations and open choices:

* Backbone SmolLM2-135M-Instruct instead of Vicuna-7B; MovieLens-100K per-user temporal split; the
  paper's CRMs (SIM, DIN, ...) replaced by the small mean-pooling sequence model above, and its
  long-history retrieval by the ``long_k`` most recent rows.
* Few2Many is the paper's: the CRM trained on every training row feeds the gate; the few-shot sample
  itself is the task's uniform sample (``data.train_prompts``), not chosen by the CRM.
* The gate reads the CRM's user representation only (not the target item), with a temperature and no
  load-balancing term; experts mix as ``sum_k a_k B_k A_k`` (the products, not separately averaged
  factors).
* Scoring without the CRM representation (``predict_proba`` without keys) is the plain backbone.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.nn import functional as F

from recforge.data.schema import ITEM, TIME, USER
from recforge.errors import ConfigError, RecForgeError
from recforge.llm.base import AdapterNet, linear_shape, target_linears
from recforge.llm.rella import PromptData, ReLLa


# ---- the conventional model (CRM) ------------------------------------------------------------------
def long_histories(split, users, times, long_k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each (user, timestamp): the items and likes (1 dislike, 2 like; 0 padding) of the user's
    ``long_k`` latest training rows strictly before it, oldest first, left-padded: two ``(n, long_k)``
    int64 arrays."""
    users, times = np.asarray(users), np.asarray(times)
    n = len(users)
    items = np.zeros((n, long_k), dtype=np.int64)
    likes = np.zeros((n, long_k), dtype=np.int64)
    labels = split.train["label"].to_numpy().astype(np.int64)
    for j in range(n):
        rows = split.history_rows(int(users[j]), int(times[j]))[-long_k:]
        if len(rows):
            items[j, long_k - len(rows):] = split._items[rows]
            likes[j, long_k - len(rows):] = labels[rows] + 1
    return items, likes


class SequenceCRM(nn.Module):
    """A small sequential CTR model: the mean of the history tokens (item + like embedding) through a
    linear layer and tanh is the user representation; an MLP of [h, target, h * target] the logit."""

    def __init__(self, n_items: int, dim: int):
        super().__init__()
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.like = nn.Embedding(3, dim, padding_idx=0)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(3 * dim, dim), nn.ReLU(), nn.Linear(dim, 1))
        nn.init.normal_(self.item.weight, std=0.05)
        nn.init.normal_(self.like.weight, std=0.05)
        with torch.no_grad():
            self.item.weight[0].zero_()
            self.like.weight[0].zero_()

    def represent(self, items: torch.Tensor, likes: torch.Tensor) -> torch.Tensor:
        mask = (items > 0).float()[..., None]
        tok = (self.item(items) + self.like(likes)) * mask
        mean = tok.sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.tanh(self.proj(mean))

    def forward(self, items: torch.Tensor, likes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.represent(items, likes)
        e = self.item(target)
        return self.mlp(torch.cat([h, e, h * e], -1)).squeeze(-1)


def fit_crm(split, dim: int = 32, long_k: int = 50, epochs: int = 5, lr: float = 5e-3, weight_decay: float = 1e-6,
            batch_size: int = 1024, seed: int = 0) -> tuple[SequenceCRM, dict]:
    """Train :class:`SequenceCRM` on every training row of ``split`` (the whole training space)."""
    from recforge.evaluation.pointwise import auc

    if int(dim) < 1 or int(long_k) < 1 or int(epochs) < 1:
        raise ConfigError(f"crm_dim={dim}, long_k={long_k}, crm_epochs={epochs}: give positive sizes")
    t0 = time.perf_counter()
    tr = split.train
    if tr.height == 0:
        raise RecForgeError("no training row: the conventional model needs rated training interactions")
    items, likes = long_histories(split, tr[USER].to_numpy(), tr[TIME].to_numpy(), int(long_k))
    target = tr[ITEM].to_numpy().astype(np.int64)
    y = tr["label"].to_numpy().astype(np.float32)
    torch.manual_seed(int(seed))
    crm = SequenceCRM(split.n_items, int(dim))
    opt = torch.optim.Adam(crm.parameters(), lr=lr, weight_decay=weight_decay)
    it, lt, tt, yt = (torch.from_numpy(a) for a in (items, likes, target, y))
    rng = np.random.default_rng(int(seed))
    loss_value = float("nan")
    crm.train()
    for _ in range(int(epochs)):
        order = torch.from_numpy(rng.permutation(len(y)))
        total = 0.0
        for s in range(0, len(order), int(batch_size)):
            idx = order[s : s + int(batch_size)]
            loss = F.binary_cross_entropy_with_logits(crm(it[idx], lt[idx], tt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        loss_value = total / len(y)
    crm.eval()
    with torch.no_grad():
        p = torch.cat([crm(it[s : s + 8192], lt[s : s + 8192], tt[s : s + 8192]) for s in range(0, len(y), 8192)])
    for q in crm.parameters():
        q.requires_grad_(False)
    record = {"model": "mean-pooling sequence CTR model", "dim": int(dim), "long_k": int(long_k), "epochs": int(epochs),
              "rows": int(len(y)), "train_logloss": round(loss_value, 5), "train_auc": round(auc(y, p.numpy()), 5),
              "seconds": round(time.perf_counter() - t0, 2)}
    return crm, record


# ---- the expert bank --------------------------------------------------------------------------------
class ExpertNet(AdapterNet):
    """The frozen language model with ``n_experts`` LoRA experts per target projection and the gate;
    forward hooks add each example's mixture while :meth:`conditioned` is active."""

    def __init__(self, lm: nn.Module, targets, n_experts: int, r: int, alpha: float, dropout: float, gate_dim: int,
                 temperature: float, seed: int):
        super().__init__(lm)
        slots = target_linears(lm, targets)
        self.n_experts, self.r, self.scale = int(n_experts), int(r), float(alpha) / int(r)
        self.dropout, self.temperature = float(dropout), float(temperature)
        g = torch.Generator().manual_seed(int(seed))
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for _, _, module in slots:
            d_in, d_out = linear_shape(module)
            bound = 1.0 / math.sqrt(d_in)  # LoRA's Kaiming-uniform draw of A, one per expert
            self.a.append(nn.Parameter(torch.rand(self.n_experts * self.r, d_in, generator=g) * 2 * bound - bound))
            self.b.append(nn.Parameter(torch.zeros(d_out, self.n_experts * self.r)))
        self.gate = nn.Linear(int(gate_dim), self.n_experts)
        self._mix: torch.Tensor | None = None
        self._handles = [module.register_forward_hook(self._hook(j)) for j, (_, _, module) in enumerate(slots)]

    def gate_weights(self, h: torch.Tensor) -> torch.Tensor:
        """``(batch, n_experts)`` mixture weights of user representations ``h``."""
        return torch.softmax(self.gate(h.float()) / self.temperature, -1)

    def _hook(self, j: int):
        def hook(module, args, out):
            if self._mix is None:
                return None
            x = args[0]
            if x.shape[0] != self._mix.shape[0]:
                raise RecForgeError(f"a batch of {x.shape[0]} rows with gate weights for {self._mix.shape[0]} examples")
            x = F.dropout(x, self.dropout, self.training) if self.dropout else x
            z = x.to(self.a[j].dtype) @ self.a[j].T  # (batch, T, n_experts * r)
            w = self._mix.repeat_interleave(self.r, dim=1).view(x.shape[0], *([1] * (z.dim() - 2)), -1)
            return out + (self.scale * ((z * w) @ self.b[j].T)).to(out.dtype)
        return hook

    @contextlib.contextmanager
    def conditioned(self, h: torch.Tensor):
        self._mix = self.gate_weights(h.to(self.gate.weight.device))
        try:
            yield
        finally:
            self._mix = None

    def deltas(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Each example's full weight delta per target slot: ``[(batch, d_out, d_in)]`` (for
        inspection; scoring never forms them)."""
        w = self.gate_weights(h).repeat_interleave(self.r, dim=1)  # (batch, n_experts * r)
        return [self.scale * torch.einsum("ok,bk,kd->bod", b, w, a) for a, b in zip(self.a, self.b)]


class RecLoRA(ReLLa):
    """RecLoRA (see the module docstring). ``n_experts``: meta-LoRA experts per target projection
    (each of rank ``lora_r``); ``gate_temperature``: of the softmax gate; ``crm_*`` and ``long_k``: the
    conventional model and its long history. Prompt parameters are :class:`~recforge.llm.rella.ReLLa`'s,
    the rest :class:`~recforge.llm.base.LLMRecommender`'s."""

    name = "reclora"

    def __init__(self, retrieval: str = "recent", k: int = 10, mix: bool = False, n_experts: int = 4,
                 gate_temperature: float = 1.0, long_k: int = 50, crm_dim: int = 32, crm_epochs: int = 5,
                 crm_lr: float = 5e-3, crm_weight_decay: float = 1e-6, crm_batch_size: int = 1024, **params):
        super().__init__(retrieval=retrieval, k=k, mix=mix, **params)
        if int(n_experts) < 1 or float(gate_temperature) <= 0:
            raise ConfigError(f"n_experts={n_experts}, gate_temperature={gate_temperature}: give at least one expert "
                              "and a positive temperature")
        if int(long_k) < int(k):
            raise ConfigError(f"long_k={long_k} is shorter than the prompt's k={k}: the conventional model reads the "
                              "long history, the language model the short one")
        self.n_experts, self.gate_temperature, self.long_k = int(n_experts), float(gate_temperature), int(long_k)
        self.crm_dim, self.crm_epochs, self.crm_lr = int(crm_dim), int(crm_epochs), float(crm_lr)
        self.crm_weight_decay, self.crm_batch_size = float(crm_weight_decay), int(crm_batch_size)

    # ---- the conventional model -----------------------------------------------------------------------
    def _crm(self) -> SequenceCRM:
        crm = getattr(self, "_crm_module", None)
        if crm is None:
            crm = SequenceCRM(self.crm_n_items_, self.crm_dim)
            crm.load_state_dict(self.crm_state_)
            crm.eval()
            self._crm_module = crm
        return crm

    def user_representations(self, split, users, times) -> np.ndarray:
        """The CRM's representation (float32 ``(n, crm_dim)``) of each (user, timestamp) from the
        user's long history of training rows strictly before it: the gate's input."""
        items, likes = long_histories(split, users, times, self.long_k)
        crm = self._crm()
        with torch.no_grad():
            h = [crm.represent(torch.from_numpy(items[s : s + 8192]), torch.from_numpy(likes[s : s + 8192]))
                 for s in range(0, len(items), 8192)]
        return torch.cat(h).numpy().astype(np.float32) if h else np.zeros((0, self.crm_dim), np.float32)

    # ---- fitting ----------------------------------------------------------------------------------------
    def fit(self, data: PromptData, valid=None):
        """Train the CRM on every training row of ``data.split`` (Few2Many), then the experts and the
        gate on the sampled training prompts (none: the experts' ``B`` stay zero, the backbone's scores)."""
        crm, record = fit_crm(data.split, self.crm_dim, self.long_k, self.crm_epochs, self.crm_lr,
                              self.crm_weight_decay, self.crm_batch_size, self.seed)
        self.crm_state_ = {k: v.detach().clone() for k, v in crm.state_dict().items()}
        self.crm_n_items_, self.crm_ = data.split.n_items, record
        self._crm_module = crm
        return super().fit(data, valid)

    def train_keys(self, data) -> np.ndarray | None:
        f = data.train_frame
        return self.user_representations(data.split, f[USER].to_numpy(), f[TIME].to_numpy())

    def build(self, n_users: int = 0, n_items: int = 0) -> nn.Module:
        model, _ = self._backbone()
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(self.seed)
        return ExpertNet(model, self.lora_targets, self.n_experts, self.lora_r, self.lora_alpha, self.lora_dropout,
                         self.crm_dim, self.gate_temperature, self.seed)

    # ---- scoring --------------------------------------------------------------------------------------
    def predict(self, data: PromptData, targets: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
        """The prompts of ``targets`` and P(like) of each, each with its user's expert mixture."""
        frame = self.prompts(data, targets)
        h = self.user_representations(data.split, frame[USER].to_numpy(), frame[TIME].to_numpy())
        return frame, self.predict_proba(frame["prompt"].to_list(), keys=h)

    def protocol_notes(self) -> dict:
        return {"retrieval": self.retrieval, "k": self.k, "long_k": self.long_k,
                "tuning": ("zero-shot: the experts' B are zero, the backbone's scores"
                           if not getattr(self, "adapted_", False) else
                           f"RecLoRA: {self.n_experts} LoRA experts mixed per user by a gate on the CRM's "
                           "representation; backbone and CRM frozen"),
                "crm": getattr(self, "crm_", None),
                "experts": {"n": self.n_experts, "rank": self.lora_r, "targets": list(self.lora_targets),
                            "parameters": int(sum(p.numel() for n, p in self.net_.named_parameters()
                                                  if n.startswith(("a.", "b.", "gate."))))}}

    # ---- what per-user weights cannot do -------------------------------------------------------------
    def save_adapter(self, folder):
        raise RecForgeError("RecLoRA mixes its experts per user: there is no single adapter to write; save() keeps "
                            "the experts, the gate and the conventional model")

    def load_adapter(self, folder):
        raise RecForgeError("RecLoRA mixes its experts per user: load a saved RecLoRA with RecLoRA.load(path)")

    def export_merged(self, folder):
        raise RecForgeError("RecLoRA's adapter differs for every user: it cannot be merged into one backbone")
