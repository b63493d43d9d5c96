"""CoRA: collaborative LoRA — a collaborative model's user and item embeddings turned into
per-example low-rank weights of the language model.

Liu et al., "CoRA: Collaborative Information Perception by Large Language Model's Weights for
Recommendation", AAAI 2025 (arXiv 2408.10645). Methods that put collaborative (ID) embeddings into
the prompt as extra tokens change the text the model reads, and fine-tuning the language model on
recommendation data wears away its general knowledge. CoRA leaves both alone: a *collaborative
query generator* maps the user's and the item's embeddings from a pre-trained collaborative
filtering model to incremental low-rank weights (LoRA-shaped) of the language model's linear layers,
so each (user, item) pair is scored by its own slightly changed model, on the unchanged prompt.
Only the generator is trained; the backbone's weights and the collaborative embeddings are frozen.

How it runs here:

* **Collaborative model** (:func:`fit_collaborative`, inside :meth:`CoRA.fit`): logistic matrix
  factorisation ``sigmoid(b + b_u + b_i + <p_u, q_i>)`` trained with binary cross-entropy on *every*
  training row of the split (user, item, like), ``cf_dim`` factors, ``cf_epochs`` epochs of Adam
  (``cf_lr``, L2 ``cf_weight_decay`` on the rows of each batch), seeded. A user's vector is
  ``[p_u, b_u]``, an item's ``[q_i, b_i]``; users and items without a training row get zeros.
  Then frozen.
* **Query generator** (:class:`QueryGenerator`, BLIP-2's Q-Former shape as in the paper): one
  learnable query per (target layer, target projection) slot; ``gen_layers`` blocks, each
  self-attention among the queries, cross-attention from the queries to the two memory tokens (the
  user's and the item's vector, each projected to ``gen_hidden`` with a type embedding), and a
  feed-forward layer (pre-norm, residual). Each slot's output query is mapped by a fully connected
  layer (one per projection kind) to ``r x d_in`` numbers: that slot's generated low-rank factor
  ``A(u, i)`` (divided by sqrt(d_in)). The other factor ``B`` (``d_out x r`` per slot) is a learned
  parameter that starts at zero, so before training every delta is zero and CoRA scores exactly as
  the backbone does.
* **Applying the weights**: forward hooks on the target projections (``lora_targets``: by default
  the attention query and value projections) add ``(alpha / r) * B A(u, i) x`` to each projection's
  output, with the batch's own ``A`` per example (two batched matrix products; the backbone's
  weights are never written, nothing is merged). Scoring and training hand each batch's (user,
  item) indices to the hooks (:meth:`recforge.llm.base.LLMRecommender.conditioning`); a forward
  pass without them is the plain backbone.
* **Training**: the shared trainer on the sampled training prompts (the task's
  ``data.train_prompts``), the answer token's cross-entropy (``objective``), AdamW on the generator
  only; dropout ``lora_dropout`` on the projection inputs of the delta path.

Deviations and open choices:

* Backbone SmolLM2-135M-Instruct instead of Vicuna-7B; MovieLens-100K per-user temporal split
  (:mod:`recforge.llm.prompts`) instead of ML-1M / Amazon-Book; a few dozen training prompts
  instead of the full training set, so the generator sees very few examples.
* Collaborative model: a plain logistic MF trained here, not the paper's pre-trained MF / LightGCN
  / SASRec choices; its vectors include the biases. Its default epochs (10) and L2 (0.03) were
  chosen by the MF's own AUC on each user's last 10% of training rows of MovieLens-100K (0.80;
  20 epochs at 1e-4 overfit: 0.72), never on a test part.
* Generator: the paper's exact query count, depth and output mapping are not followed: here one
  query per (layer, projection) slot, the generated factor is ``A`` (input side) and ``B`` is a
  learned per-slot matrix started at zero (LoRA's usual initialisation, so training starts from the
  backbone's scores); ``gen_hidden`` 64, one block, by default.
* Prompt: the project's template with the ``k`` most recent rated items (``retrieval``), wrapped in
  the backbone's chat template, scored by the Yes/No softmax; the paper's prompt holds the user's
  and item's text without history-length tuning.
* Unseen items of the test part get a zero item vector (the generator still sees the user).
* No merge into the backbone and no ``peft`` adapter folder: the deltas are per example
  (:meth:`CoRA.save` keeps the generator; :meth:`CoRA.export_merged` / :meth:`CoRA.save_adapter`
  refuse).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.nn import functional as F

from recforge.data.schema import ITEM, USER
from recforge.errors import ConfigError, RecForgeError
from recforge.llm.base import AdapterNet, linear_shape, target_linears
from recforge.llm.rella import PromptData, ReLLa


# ---- the collaborative model ---------------------------------------------------------------------
def fit_collaborative(split, dim: int = 32, epochs: int = 10, lr: float = 0.01, weight_decay: float = 0.03,
                      batch_size: int = 4096, seed: int = 0) -> dict:
    """Logistic MF on every training row of ``split`` (user, item, like). Returns ``user``
    (``n_users x (dim + 1)``: factors and bias), ``item`` (``(n_items + 1) x (dim + 1)``, row 0
    padding), both zero for ids without a training row, and a record (rows, final loss, seconds)."""
    import time

    if int(dim) < 1 or int(epochs) < 1:
        raise ConfigError(f"cf_dim={dim}, cf_epochs={epochs}: the collaborative model needs at least one factor "
                          "and one epoch")
    t0 = time.perf_counter()
    users = split.train[USER].to_numpy().astype(np.int64)
    items = split.train[ITEM].to_numpy().astype(np.int64)
    labels = split.train["label"].to_numpy().astype(np.float32)
    if len(users) == 0:
        raise RecForgeError("no training row: the collaborative model needs rated training interactions")
    n_users, n_items = split.n_users, split.n_items
    g = torch.Generator().manual_seed(int(seed))
    p = nn.Parameter(torch.randn(n_users, dim, generator=g) * 0.05)
    q = nn.Parameter(torch.randn(n_items + 1, dim, generator=g) * 0.05)
    bu = nn.Parameter(torch.zeros(n_users))
    bi = nn.Parameter(torch.zeros(n_items + 1))
    b0 = nn.Parameter(torch.tensor(float(np.log((labels.mean() + 1e-6) / (1 - labels.mean() + 1e-6)))))
    opt = torch.optim.Adam([p, q, bu, bi, b0], lr=lr)
    u_t, i_t, y_t = torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(labels)
    rng = np.random.default_rng(int(seed))
    loss_value = float("nan")
    for _ in range(int(epochs)):
        order = torch.from_numpy(rng.permutation(len(users)))
        total = 0.0
        for s in range(0, len(order), int(batch_size)):
            idx = order[s : s + int(batch_size)]
            u, i, y = u_t[idx], i_t[idx], y_t[idx]
            pu, qi = p[u], q[i]
            logit = b0 + bu[u] + bi[i] + (pu * qi).sum(1)
            loss = F.binary_cross_entropy_with_logits(logit, y)
            reg = weight_decay * ((pu * pu).sum(1) + (qi * qi).sum(1)).mean()
            opt.zero_grad(set_to_none=True)
            (loss + reg).backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        loss_value = total / len(users)
    with torch.no_grad():
        user = torch.cat([p, bu[:, None]], 1).numpy().astype(np.float32)
        item = torch.cat([q, bi[:, None]], 1).numpy().astype(np.float32)
    seen_u = np.zeros(n_users, dtype=bool)
    seen_u[users] = True
    seen_i = np.zeros(n_items + 1, dtype=bool)
    seen_i[items] = True
    user[~seen_u] = 0.0
    item[~seen_i] = 0.0
    record = {"model": "logistic MF", "dim": int(dim), "epochs": int(epochs), "rows": int(len(users)),
              "train_logloss": round(loss_value, 5), "users": int(seen_u.sum()), "items": int(seen_i[1:].sum()),
              "seconds": round(time.perf_counter() - t0, 2)}
    return {"user": user, "item": item, "record": record}


# ---- the collaborative query generator ----------------------------------------------------------------
class _Block(nn.Module):
    """Self-attention among the queries, cross-attention to the memory, feed-forward (pre-norm)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.n1, self.n2, self.n3, self.nm = (nn.LayerNorm(hidden) for _ in range(4))
        self.self_attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        h = self.n1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        m = self.nm(mem)
        x = x + self.cross_attn(self.n2(x), m, m, need_weights=False)[0]
        return x + self.ff(self.n3(x))


class QueryGenerator(nn.Module):
    """User and item vectors → a low-rank factor ``A`` (``r x d_in``) per (target, layer) slot, and the
    learned factors ``B`` (``d_out x r``, zero at the start). ``shapes``: target → (layers, d_in, d_out)."""

    def __init__(self, in_dim: int, shapes: dict[str, tuple[int, int, int]], r: int, hidden: int = 64,
                 heads: int = 4, layers: int = 1):
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"gen_hidden={hidden} is not a multiple of gen_heads={heads}")
        self.shapes, self.r = dict(shapes), int(r)
        self.n_slots = sum(n for n, _, _ in shapes.values())
        self.inp = nn.Linear(in_dim, hidden)
        self.kind = nn.Parameter(torch.randn(2, hidden) * 0.02)  # user / item memory token type
        self.queries = nn.Parameter(torch.randn(self.n_slots, hidden) * 0.02)
        self.blocks = nn.ModuleList(_Block(hidden, heads) for _ in range(int(layers)))
        self.norm = nn.LayerNorm(hidden)
        self.to_a = nn.ModuleDict({t: nn.Linear(hidden, self.r * d_in) for t, (_, d_in, _) in shapes.items()})
        self.b = nn.ParameterDict({t: nn.Parameter(torch.zeros(n, d_out, self.r))
                                   for t, (n, _, d_out) in shapes.items()})

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{target: A}`` with ``A`` of shape ``(batch, layers, r, d_in)``."""
        mem = torch.stack([self.inp(user), self.inp(item)], 1) + self.kind
        x = self.queries.expand(user.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, mem)
        x = self.norm(x)
        out, s = {}, 0
        for t, (n, d_in, _) in self.shapes.items():
            a = self.to_a[t](x[:, s : s + n])  # (batch, layers, r * d_in)
            out[t] = a.view(x.shape[0], n, self.r, d_in) / math.sqrt(d_in)
            s += n
        return out


class CoRANet(AdapterNet):
    """The frozen language model, the generator, and forward hooks that add each example's
    generated delta to the target projections while :meth:`conditioned` is active."""

    def __init__(self, lm: nn.Module, gen: QueryGenerator, user: np.ndarray, item: np.ndarray, targets,
                 scale: float, dropout: float):
        super().__init__(lm)
        self.gen, self.scale, self.dropout = gen, float(scale), float(dropout)
        self.register_buffer("cf_user", torch.as_tensor(user, dtype=torch.float32), persistent=False)
        self.register_buffer("cf_item", torch.as_tensor(item, dtype=torch.float32), persistent=False)
        self._a: dict[str, torch.Tensor] | None = None
        self._handles = [module.register_forward_hook(self._hook(t, layer))
                         for t, layer, module in target_linears(lm, targets)]

    def _hook(self, target: str, layer: int):
        def hook(module, args, out):
            if self._a is None:
                return None
            a = self._a[target][:, layer]  # (batch, r, d_in)
            x = args[0]
            if x.shape[0] != a.shape[0]:
                raise RecForgeError(f"a batch of {x.shape[0]} rows with deltas for {a.shape[0]} examples")
            x = F.dropout(x, self.dropout, self.training) if self.dropout else x
            z = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype), a.transpose(1, 2))
            delta = z @ self.gen.b[target][layer].T
            return out + (self.scale * delta).view(out.shape).to(out.dtype)
        return hook

    def embeddings(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen user and item vectors of ``keys`` (columns user, item); a negative or
        out-of-range index (an unknown user or item) gets zeros."""
        keys = keys.long()
        u, i = keys[:, 0], keys[:, 1]
        ok_u = (u >= 0) & (u < self.cf_user.shape[0])
        ok_i = (i >= 0) & (i < self.cf_item.shape[0])
        eu = self.cf_user[u.clamp(0, self.cf_user.shape[0] - 1)] * ok_u[:, None]
        ei = self.cf_item[i.clamp(0, self.cf_item.shape[0] - 1)] * ok_i[:, None]
        return eu, ei

    @contextlib.contextmanager
    def conditioned(self, keys: torch.Tensor):
        eu, ei = self.embeddings(keys.to(self.cf_user.device))
        self._a = self.gen(eu, ei)
        try:
            yield
        finally:
            self._a = None

    def deltas(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """The full weight deltas ``(alpha / r) B A`` of each example: ``{target: (batch, layers, d_out,
        d_in)}`` (for inspection; scoring never forms them)."""
        eu, ei = self.embeddings(keys)
        a = self.gen(eu, ei)
        return {t: self.scale * torch.einsum("lor,blrd->blod", self.gen.b[t], a[t]) for t in a}


class CoRA(ReLLa):
    """CoRA (see the module docstring). ``cf_*``: the collaborative model; ``gen_*``: the query
    generator; ``lora_r`` / ``lora_alpha`` / ``lora_dropout`` / ``lora_targets``: rank, scale, dropout and
    target projections of the generated deltas. Prompt parameters are :class:`~recforge.llm.rella.ReLLa`'s
    (``retrieval``, ``k``, ``mix``), the rest :class:`~recforge.llm.base.LLMRecommender`'s."""

    name = "cora"

    def __init__(self, retrieval: str = "recent", k: int = 10, mix: bool = False, cf_dim: int = 32,
                 cf_epochs: int = 10, cf_lr: float = 0.01, cf_weight_decay: float = 0.03, cf_batch_size: int = 4096,
                 gen_hidden: int = 64, gen_heads: int = 4, gen_layers: int = 1, **params):
        super().__init__(retrieval=retrieval, k=k, mix=mix, **params)
        self.cf_dim, self.cf_epochs, self.cf_lr = int(cf_dim), int(cf_epochs), float(cf_lr)
        self.cf_weight_decay, self.cf_batch_size = float(cf_weight_decay), int(cf_batch_size)
        self.gen_hidden, self.gen_heads, self.gen_layers = int(gen_hidden), int(gen_heads), int(gen_layers)
        if self.gen_hidden < 1 or self.gen_heads < 1 or self.gen_layers < 0:
            raise ConfigError(f"gen_hidden={gen_hidden}, gen_heads={gen_heads}, gen_layers={gen_layers}: give "
                              "positive sizes (gen_layers may be 0)")
        if self.gen_hidden % self.gen_heads:
            raise ConfigError(f"gen_hidden={gen_hidden} is not a multiple of gen_heads={gen_heads}")

    # ---- fitting ----------------------------------------------------------------------------------
    def fit(self, data: PromptData, valid=None):
        """Train the collaborative model on every training row of ``data.split``, then the generator
        on the sampled training prompts (none: the generator stays at zero, the backbone's scores)."""
        cf = fit_collaborative(data.split, self.cf_dim, self.cf_epochs, self.cf_lr, self.cf_weight_decay,
                               self.cf_batch_size, self.seed)
        self.cf_user_, self.cf_item_, self.cf_ = cf["user"], cf["item"], cf["record"]
        return super().fit(data, valid)

    def train_keys(self, data) -> np.ndarray | None:
        return data.train_frame.select(USER, ITEM).to_numpy()

    def build(self, n_users: int = 0, n_items: int = 0) -> nn.Module:
        model, _ = self._backbone()
        for p in model.parameters():
            p.requires_grad_(False)
        shapes: dict[str, list] = {}
        for t, _, module in target_linears(model, self.lora_targets):
            d_in, d_out = linear_shape(module)
            n = shapes.get(t, [0, d_in, d_out])
            shapes[t] = [n[0] + 1, d_in, d_out]
        torch.manual_seed(self.seed)
        gen = QueryGenerator(self.cf_user_.shape[1], {t: tuple(v) for t, v in shapes.items()}, self.lora_r,
                             self.gen_hidden, self.gen_heads, self.gen_layers)
        return CoRANet(model, gen, self.cf_user_, self.cf_item_, self.lora_targets, self.lora_alpha / self.lora_r,
                       self.lora_dropout)

    # ---- scoring ------------------------------------------------------------------------------------
    def predict(self, data: PromptData, targets: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
        """The prompts of ``targets`` and P(like) of each, with each row's generated weights."""
        frame = self.prompts(data, targets)
        return frame, self.predict_proba(frame["prompt"].to_list(), keys=frame.select(USER, ITEM).to_numpy())

    def protocol_notes(self) -> dict:
        return {"retrieval": self.retrieval, "k": self.k,
                "tuning": ("zero-shot: the generator's deltas are zero, the backbone's scores"
                           if not getattr(self, "adapted_", False) else
                           "CoRA: collaborative query generator trained on the sampled prompts; backbone frozen"),
                "collaborative_model": getattr(self, "cf_", None),
                "generator": {"queries": int(sum(1 for _ in target_linears(self.net_.lm, self.lora_targets))),
                              "hidden": self.gen_hidden, "layers": self.gen_layers, "rank": self.lora_r,
                              "targets": list(self.lora_targets),
                              "parameters": int(sum(p.numel() for p in self.net_.gen.parameters()))}}

    # ---- what per-example weights cannot do ------------------------------------------------------------
    def save_adapter(self, folder):
        raise RecForgeError("CoRA generates its weights per user and item: there is no single adapter to write; "
                            "save() keeps the generator and the collaborative vectors")

    def load_adapter(self, folder):
        raise RecForgeError("CoRA generates its weights per user and item: load a saved CoRA with CoRA.load(path)")

    def export_merged(self, folder):
        raise RecForgeError("CoRA's weights differ for every user and item: they cannot be merged into one backbone")
