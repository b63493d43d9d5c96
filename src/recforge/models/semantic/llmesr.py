"""LLM-ESR: text-enhanced sequential recommendation for long-tail users and items.

Liu, Wu, Wang, Zhang, Tian, Zheng & Zhao, "LLM-ESR: Large Language Models Enhancement for
Long-tailed Sequential Recommendation", NeurIPS 2024.

**Dual-view modelling** (long-tail items). Each item has two embeddings of width ``hidden``:

* semantic view: its frozen text vector through a trainable two-layer adapter;
* collaborative view: a trainable ID embedding *initialised from the text vectors reduced by
  PCA* to ``hidden`` dimensions (rescaled to the backbone's initial scale).

Both views' item sequences go through the **same** sequence encoder (the backbone). The two
output sequences then exchange information by cross-attention in each direction
(``cross_attention``; causal for causal backbones: position ``t`` of one view attends to
positions ``<= t`` of the other, so no target leaks). The user representation is the
concatenation of the two views and an item's output embedding the concatenation of its two
embeddings, so a score is the sum of the two views' dot products.

**Retrieval-augmented self-distillation** (long-tail users). Every user has a semantic
representation, and the ``n_similar`` most similar other users (cosine) are retrieved once before
training. The loss adds ``distill_weight`` times the mean squared difference between a training
sequence's final representation and the mean of its similar users' representations (teachers,
without gradient). With ``distill_weight=0`` this part is off and the model is **dual-view only**;
``protocol_notes()`` then says so (``variant``), and so does every metrics.json and leaderboard.

The user representation for retrieval (``user_repr``):

* ``prompt`` (default, the authors' retrieval): the sentence encoder's vector of a prompt listing
  the titles of the user's training items, most recent last, truncated from the front to
  ``user_prompt_chars`` characters (the encoder reads at most 256 word pieces);
* ``mean``: the mean of the user's item text vectors (cheaper; what earlier versions used).

Authors' code (github.com/liuqidong07/LLM-ESR) these parts follow:

* ``data/beauty/get_user_embedding.ipynb``: ``prompt_template = "The user has visited following
  fashions: \n<HISTORY> \nplease conclude the user's perference."``, ``hist_str = hist_str +
  item_str + ", "`` over the titles of ``user_train`` (all but the last two items),
  ``if len(hist_str) > 8000: hist_str = hist_str[-8000:]``, embedded by ``text-embedding-ada-002``;
* ``data/retrieval_users.ipynb``: ``sim_metric = "cos"``, ``score_matrix = cosine_similarity(user_emb,
  user_emb)``, ``rank_matrix = np.argsort(-score_matrix, axis=-1)``, ``final_rank_matrix =
  rank_matrix[:, 1:]`` (oneself left out), ``topk = 100``;
* ``generators/data.py``: ``sim_users = self.sim_users[index][:self.sim_user_num]`` with
  ``main.py`` ``--sim_user_num default=10`` (our ``n_similar=10``);
* ``models/LLMESR.py``: ``elif self.user_sim_func == "kd": self.align = nn.MSELoss()``,
  ``sim_log_feats = sim_log_feats.detach()...; torch.mean(sim_log_feats, dim=1)``,
  ``loss += self.alpha * align_loss``; ``experiments/{beauty,yelp,fashion}.bash`` run
  ``--user_sim_func kd --alpha 0.1`` (our ``user_sim_func=kd``, ``distill_weight`` = alpha).
  The paper describes the same mean-squared self-distillation, so code and paper agree here;
  ``user_sim_func=cl`` (their contrastive alternative, not used in their scripts) is not offered.

Backbones: ``llmesr`` (SASRec), ``llmesr-gru4rec`` and ``llmesr-bert4rec``; every option of the
backbone applies (``loss``, ``subseq``, ``max_len``, ...).

Deviations from the paper:

* text vectors come from a local sentence encoder (all-MiniLM-L6-v2 by default, 384 dims) over
  the item text template, not from an LLM API; the user prompt is encoded by the same local
  encoder (``text-embedding-ada-002`` in the authors' notebooks), which reads at most 256 word
  pieces, hence the shorter ``user_prompt_chars=700`` (theirs: 8000; 1000 characters of
  MovieLens titles made 322 word pieces, and the encoder would cut the most recent ones; with 700,
  2.7% of ML-latest-small prompts still exceed 256 by at most 14) and the word "items" instead
  of the dataset's noun ("fashions");
* teachers' representations come from a memory of every user's final representation, recomputed
  without dropout at the start of every ``refresh_every``-th epoch, instead of encoding the similar
  users' sequences in every step (same signal, one forward pass over users per epoch);
* the views exchange information by one single-head cross-attention layer per direction on the
  encoder *outputs* (with a residual connection), so that the backbone runs unchanged;
* the next-item loss is the backbone's (full softmax by default; ``loss=bce`` is the paper's);
* items without training interactions get ID embeddings imputed from their text vectors after
  training (``cold_items``), a step the paper does not have;
* the self-distillation is **off by default** (``distill_weight=0``: dual-view only; the
  authors' scripts use 0.1). Rule: on by default only if it raises validation NDCG@10 on both
  MovieLens sets. With the authors' retrieval (``user_repr=prompt``, ``user_sim_func=kd``, 0.1) it
  lowered it on both (seed 0, at most 60 epochs, early stopping: ML-100K .1019 vs .1113 without;
  ML-latest-small .0505 vs .0626), as it did with ``user_repr=mean`` (.098 vs .109 and .046 vs
  .063, 50-epoch cap).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.semantic.base import SemanticMixin, on_backbones, pca_init
from recforge.models.sequential.base import pad_windows
from recforge.models.sequential.modules import Dropout

USER_REPRS = ("prompt", "mean")
DUAL_VIEW_ONLY = "dual-view only (no retrieval-augmented self-distillation)"
PROMPT = "The user has visited following items: {history} please conclude the user's preference."


def item_titles(ds, template: str | None = None) -> list[str]:
    """Titles of the dataset's items (index ``i`` = item ``i + 1``); the item text template when
    the items have no ``title`` column."""
    from recforge.semantic.text import item_texts

    columns = ds.items.columns if ds.items is not None else []
    return item_texts(ds, "{title}" if "title" in columns else template)


def user_prompts(titles: list[str], indptr: np.ndarray, items: np.ndarray, max_chars: int) -> list[str]:
    """One prompt per user listing the titles of their training items in time order (each
    followed by ", "), the list cut from the front to its last ``max_chars`` characters as in the
    authors' ``hist_str[-8000:]``; an empty string for a user without training items."""
    out = []
    for a, b in zip(indptr[:-1], indptr[1:]):
        if b <= a:
            out.append("")
            continue
        hist = "".join(titles[i - 1] + ", " for i in items[a:b] if titles[i - 1])
        out.append(PROMPT.format(history=hist[-max_chars:]))
    return out


class CrossView(nn.Module):
    """Single-head attention from one view's sequence to the other's, with a residual; causal
    unless ``bidirectional``."""

    def __init__(self, hidden: int, dropout: float, bidirectional: bool):
        super().__init__()
        self.q, self.kv = nn.Linear(hidden, hidden), nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-8)
        self.drop = Dropout(dropout)
        self.bidirectional = bidirectional
        nn.init.zeros_(self.out.weight)  # starts as the identity: the views are fused gradually
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, other: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        eye = torch.eye(length, dtype=torch.bool, device=x.device)
        mask = valid.unsqueeze(1) | eye  # (B, L, L): valid keys; a row always sees itself
        if not self.bidirectional:
            mask = mask & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        k, v = self.kv(self.ln(other)).chunk(2, dim=-1)
        att = F.scaled_dot_product_attention(self.q(self.ln(x)).unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                             attn_mask=mask.unsqueeze(1))
        return x + self.drop(self.out(att.squeeze(1))) * valid.unsqueeze(-1)


class LLMESRMixin(SemanticMixin):
    """LLM-ESR over a backbone; see the module docstring.

    Own parameters: ``distill_weight`` (weight of the self-distillation loss, the authors'
    ``alpha``; 0 turns it off: dual-view only), ``user_sim_func`` (``kd``: mean squared
    difference to the teachers), ``user_repr`` (``prompt`` or ``mean``, see the module docstring),
    ``user_prompt_chars``, ``n_similar`` (retrieved users per user), ``refresh_every`` (epochs
    between teacher refreshes), ``cross_attention`` (exchange between the views).
    """

    def __init__(self, distill_weight: float = 0.0, user_sim_func: str = "kd", user_repr: str = "prompt",
                 user_prompt_chars: int = 700, n_similar: int = 10, refresh_every: int = 1,
                 cross_attention: bool = True, **semantic):
        super().__init__(**semantic)
        if distill_weight < 0 or n_similar < 1 or refresh_every < 1 or user_prompt_chars < 1:
            raise ConfigError(f"{self.name}: need distill_weight >= 0, n_similar >= 1, refresh_every >= 1 and "
                              "user_prompt_chars >= 1")
        if user_sim_func != "kd":
            raise ConfigError(f"{self.name}: user_sim_func={user_sim_func!r} is not available; 'kd' (mean squared "
                              "difference to the similar users' representations, the authors' scripts) is")
        if user_repr not in USER_REPRS:
            raise ConfigError(f"{self.name}: user_repr={user_repr!r}: choose one of {', '.join(USER_REPRS)}")
        self.distill_weight, self.n_similar, self.refresh_every = distill_weight, n_similar, refresh_every
        self.user_sim_func, self.user_repr, self.user_prompt_chars = user_sim_func, user_repr, user_prompt_chars
        self.cross_attention = cross_attention
        self._epoch = 0

    # ---- fit ------------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        self._epoch, self._bank = 0, None
        if self.distill_weight > 0:
            indptr, items = split.train_sequences
            lengths = np.diff(indptr)
            starts = np.maximum(indptr[:-1], indptr[1:] - self.max_len)
            seqs = torch.from_numpy(pad_windows(items, starts, indptr[1:], self.max_len))
            self._user_seqs = seqs[torch.from_numpy(lengths > 0)]
            self._bank_row = np.cumsum(lengths > 0) - 1  # user -> row of the bank
            self._similar = self.similar_users(indptr, items, lengths)

    def user_vectors(self, indptr: np.ndarray, items: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """``(n_users, dim)`` semantic user representations for retrieval (``user_repr``)."""
        n_users = len(lengths)
        if self.user_repr == "prompt":
            if self._dataset is None:
                raise ConfigError(f"{self.name}: user_repr=prompt needs the dataset's item titles (a runner "
                                  "attaches the dataset; with only semantic_table=FILE pass user_repr=mean)")
            from recforge.semantic.store import VectorCache
            from recforge.semantic.encoder import get_encoder

            prompts = user_prompts(item_titles(self._dataset, self.template), indptr, items, self.user_prompt_chars)
            enc = get_encoder(self.encoder, progress=self.verbose)
            vecs, _ = VectorCache().vectors(prompts, enc, progress=self.verbose)
            return torch.from_numpy(vecs)
        sem = torch.from_numpy(self._sem)
        user_of = torch.from_numpy(np.repeat(np.arange(n_users), lengths))
        return torch.zeros(n_users, sem.shape[1]).index_add_(0, user_of, sem[torch.from_numpy(items)])

    def similar_users(self, indptr: np.ndarray, items: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """``(n_users, k)`` most similar other users with training items, by the cosine of the
        users' semantic representations (:meth:`user_vectors`)."""
        n_users = len(lengths)
        rep = F.normalize(self.user_vectors(indptr, items, lengths).float(), dim=1)
        active = torch.from_numpy(np.flatnonzero(lengths > 0))
        k = min(self.n_similar, max(1, len(active) - 1))
        out = torch.empty(n_users, k, dtype=torch.long)
        for s in range(0, n_users, 2048):
            sim = rep[s : s + 2048] @ rep[active].T
            own = torch.arange(s, min(s + 2048, n_users))
            hit = own.unsqueeze(1) == active.unsqueeze(0)
            sim[hit] = -torch.inf
            out[s : s + 2048] = active[sim.topk(k, dim=1).indices]
        return out.numpy()

    def build(self, n_users, n_items):
        net = super().build(n_users, n_items)
        net.cross_se = CrossView(self.hidden, self.dropout, self.bidirectional) if self.cross_attention else None
        net.cross_co = CrossView(self.hidden, self.dropout, self.bidirectional) if self.cross_attention else None
        if self._sem is not None:  # fitting (not restoring): collaborative view from the PCA of the text vectors
            init = torch.from_numpy(pca_init(self._sem, self.hidden))
            has = (init.abs().sum(1) > 0).nonzero().squeeze(1)
            with torch.no_grad():
                net.lookup.embedding.weight[has] = init[has]
        return net

    def train_state(self) -> dict:
        # the epoch counter and the distillation teacher bank (refreshed every refresh_every epochs)
        return {"epoch": self._epoch, "bank": None if self._bank is None else self._bank.cpu()}

    def load_train_state(self, state: dict) -> None:
        self._epoch = int(state.get("epoch", self._epoch))
        bank = state.get("bank")
        self._bank = None if bank is None else bank.to(self.device_)

    def train_batches(self, split, rng):
        self._epoch += 1
        if self.distill_weight > 0 and (self._bank is None or (self._epoch - 1) % self.refresh_every == 0):
            self._bank = self.user_bank()
        yield from super().train_batches(split, rng)

    def user_bank(self) -> torch.Tensor:
        """Final representation of every user's training sequence (no dropout, no gradient)."""
        net = self.net_
        was = net.training
        net.eval()
        try:
            with torch.no_grad():
                tables = self.item_tables()
                seqs = self.representation_input(self._user_seqs)
                bank = torch.cat([self.encode_tables(seqs[s : s + 1024].to(self.device_), tables)[:, -1]
                                  for s in range(0, len(seqs), 1024)])
        finally:
            net.train(was)
        return bank

    # ---- the two views ------------------------------------------------------------------------
    def item_tables(self) -> dict:
        net = self.net_
        n = self.n_items_ + 1
        se = net.adapter(net.sem[:n])
        co = net.lookup.embedding.weight[:n]
        return {"se": se, "co": co, "out": torch.cat([se, co], dim=1)}

    def encode_tables(self, seqs: torch.Tensor, tables: dict) -> torch.Tensor:
        net = self.net_
        h_se = self.run_backbone(seqs, tables["se"])
        h_co = self.run_backbone(seqs, tables["co"])
        if net.cross_se is not None:
            valid = seqs > 0
            h_se, h_co = net.cross_se(h_se, h_co, valid), net.cross_co(h_co, h_se, valid)
        return torch.cat([h_se, h_co], dim=-1)

    def extra_loss(self, batch: dict, hidden: torch.Tensor) -> torch.Tensor | None:
        base = super().extra_loss(batch, hidden)
        if self.distill_weight <= 0 or self._bank is None:
            return base
        users = self._sample_user[batch["rows"]]
        teacher = self._bank[torch.from_numpy(self._bank_row[self._similar[users]]).to(self._bank.device)].mean(1)
        sd = self.distill_weight * F.mse_loss(hidden[:, -1], teacher)
        return sd if base is None else base + sd

    def protocol_notes(self) -> dict:
        if self.distill_weight > 0:
            sd = {"weight": self.distill_weight, "user_sim_func": self.user_sim_func, "user_repr": self.user_repr,
                  "n_similar": self.n_similar}
            variant = "dual-view + retrieval-augmented self-distillation"
        else:
            sd, variant = "off", DUAL_VIEW_ONLY
        return super().protocol_notes() | {"variant": variant, "self_distillation": sd}


LLMESR, LLMESRGRU4Rec, LLMESRBERT4Rec = on_backbones(
    LLMESRMixin, "llmesr", ("LLMESR", "LLMESRGRU4Rec", "LLMESRBERT4Rec"), "LLM-ESR")
