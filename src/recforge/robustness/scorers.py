"""Scoring functions for the text attack: a fitted model scores (users, items) under an item-title table.

Each scorer is a callable ``scorer(titles, users, items) -> (len(users), m)`` as
:class:`~recforge.robustness.text_attack.StealthyTextAttack` queries it: ``titles`` is the full
title table (entry ``i`` is item ``i``), ``items`` holds ``m`` items per user row (or one row for
all). Titles that differ from the scorer's clean table are the edited ones; everything else is
scored as the model was fitted.

* :class:`SemanticModelScorer` — a trained text-enhanced sequential model (LLM-ESR, FAERec: a
  model with frozen text vectors in ``net_.sem``). ``users`` are rows of an evaluation set (full
  ranking: the row's history, items of the history scored ``-inf`` as the evaluation excludes
  them). The text vector of an edited item is recomputed from its edited text (the item text with
  the title replaced) by the model's own encoder and written into the frozen vectors for the call;
  the model is then scored as usual and the vectors restored.
* :class:`LLMPromptScorer` — a language-model recommender of :mod:`recforge.llm`. ``users`` are
  rows of a frame of *contexts* (``user_id``, ``timestamp``: the sampled listwise protocol's
  target rows, for instance); each (context, item) is one Yes/No prompt with the context's history
  and the item as target, scored P(Yes). An edited title changes every prompt it appears in (as the
  target or in a history). Prompt scores are cached by prompt text for the models that score
  prompts alone (ReLLa and its zero-shot use); models with per-example conditioning are scored
  through their own ``predict``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Sequence

import numpy as np
import polars as pl
import torch

from recforge.errors import ConfigError


def title_table(ds) -> list[str]:
    """The dataset's item titles as a table: entry ``i`` is item ``i`` (entry 0 and items without a
    title: ``""``)."""
    items = getattr(ds, "items", None)
    if items is None or "title" not in items.columns:
        raise ConfigError(f"{getattr(ds, 'name', 'the data')}: no item titles to attack (an item table with a "
                          "title column, e.g. MovieLens u.item)")
    out = [""] * (ds.n_items + 1)
    for i, t in zip(items["item_id"].to_list(), items["title"].to_list()):
        if 0 < int(i) <= ds.n_items and t is not None:
            out[int(i)] = str(t)
    return out


class SemanticModelScorer:
    """Scores of a fitted text-enhanced sequential model under edited titles (see the module
    docstring). ``model``: fitted, with ``net_.sem``; ``evalset``: the rows ``users`` index
    (histories); ``texts``: the item texts the model's vectors were made from (entry ``i - 1`` is
    item ``i``, as :func:`recforge.semantic.text.item_texts` returns them); ``titles``: the clean
    title table (entry ``i`` is item ``i``), each title found in its item's text; ``encoder``:
    None for the model's own (its ``encoder`` parameter); ``exclude_history``: score history items
    ``-inf`` (the evaluation's default protocol)."""

    def __init__(self, model, evalset, texts: Sequence[str], titles: Sequence[str], encoder=None,
                 batch_size: int = 512, exclude_history: bool = True):
        from recforge.semantic.encoder import get_encoder

        net = getattr(model, "net_", None)
        if net is None or not hasattr(net, "sem"):
            raise ConfigError(f"{type(model).__name__}: not a fitted text-enhanced model (no frozen text vectors "
                              "net_.sem); fit an LLM-ESR or FAERec model first")
        n = int(model.n_items_)
        if len(titles) != n + 1 or len(texts) != n:
            raise ConfigError(f"the model has {n} items but the title table has {len(titles) - 1} and the text table "
                              f"{len(texts)}; give the titles (entry 0 unused) and texts of the data it was fitted on")
        self.model, self.evalset, self.batch_size = model, evalset, int(batch_size)
        self.exclude_history = exclude_history
        if encoder is None and getattr(model, "semantic_table", None):
            raise ConfigError(f"{type(model).__name__}: its text vectors were read from {model.semantic_table}, so "
                              "edited titles cannot be re-encoded the same way by default; pass encoder= (the "
                              "encoder that wrote that table)")
        self.titles, self.texts = list(titles), list(texts)
        self.encoder = get_encoder(model.encoder if encoder is None else encoder, progress=False)
        h = evalset.histories
        self._rows = [h.items[h.indptr[r] : h.indptr[r + 1]] for r in range(len(h))]
        self._vectors: dict[str, np.ndarray] = {}
        self.encode_seconds = 0.0

    def text_of(self, item: int, title: str) -> str:
        """The item's text with its title replaced by ``title``."""
        old, text = self.titles[item], self.texts[item - 1]
        if old == title:
            return text
        if old and old in text:
            return text.replace(old, title, 1)
        raise ConfigError(f"item {item}: its title {old!r} is not in its text {text[:60]!r}; give the texts made "
                          "from the same titles (a template with {title})")

    def _vector(self, text: str) -> np.ndarray:
        if text not in self._vectors:
            t0 = time.perf_counter()
            vec = np.asarray(self.encoder.encode([text], progress=False)[0], dtype=np.float32)
            self.encode_seconds += time.perf_counter() - t0
            width = int(self.model.net_.sem.shape[1])
            if vec.shape[0] != width:
                raise ConfigError(f"the encoder {self.encoder.name} makes {vec.shape[0]}-dimensional vectors but the "
                                  f"model's text vectors have {width}; pass the encoder the model was fitted with")
            self._vectors[text] = vec
        return self._vectors[text]

    def changed(self, titles: Sequence[str]) -> list[int]:
        """Items whose title differs from the clean table."""
        if len(titles) != len(self.titles):
            raise ConfigError(f"a title table of {len(titles)} entries for {len(self.titles)} (entry 0 unused)")
        return [i for i in range(1, len(titles)) if titles[i] != self.titles[i]]

    @contextlib.contextmanager
    def applied(self, titles: Sequence[str]):
        """Within the block the model's text vectors are those of ``titles``."""
        items = self.changed(titles)
        sem = self.model.net_.sem
        saved = sem[items].clone() if items else None
        try:
            if items:
                vecs = np.stack([self._vector(self.text_of(i, titles[i])) for i in items])
                with torch.no_grad():
                    sem[torch.as_tensor(items, device=sem.device)] = torch.from_numpy(vecs).to(sem.device, sem.dtype)
            yield items
        finally:
            if items:
                with torch.no_grad():
                    sem[torch.as_tensor(items, device=sem.device)] = saved

    def __call__(self, titles: Sequence[str], users, items) -> np.ndarray:
        from recforge.evaluation.batch import Histories

        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if items.ndim == 1:
            items = np.broadcast_to(items, (len(users), len(items)))
        out = np.empty(items.shape, dtype=np.float64)
        n = self.model.n_items_
        with self.applied(titles):
            for s in range(0, len(users), self.batch_size):
                rows = users[s : s + self.batch_size]
                hist = Histories.from_lists(self.evalset.users[rows], [self._rows[r] for r in rows], n)
                scores = self.model.score(hist).detach().float().cpu().numpy().astype(np.float64)
                if self.exclude_history:
                    for j, r in enumerate(rows):
                        scores[j, self._rows[r]] = -np.inf
                scores[:, 0] = -np.inf
                out[s : s + len(rows)] = np.take_along_axis(scores, items[s : s + len(rows)], axis=1)
        return out


class LLMPromptScorer:
    """P(Yes) of a fitted language-model recommender for (context, item) prompts under edited
    titles (see the module docstring). ``model``: fitted (zero-shot or tuned); ``data``: its
    :class:`~recforge.llm.rella.PromptData` (the split whose ``titles`` are the clean table);
    ``contexts``: a frame with ``user_id`` and ``timestamp`` (and ``row``, ``n_history``, carried
    along), one row per context ``users`` indexes."""

    def __init__(self, model, data, contexts: pl.DataFrame):
        missing = [c for c in ("user_id", "timestamp") if c not in contexts.columns]
        if missing:
            raise ConfigError(f"contexts lack {', '.join(missing)}: give rows of the prompt split (e.g. the listwise "
                              "target rows) with user_id and timestamp")
        if getattr(model, "net_", None) is None:
            raise ConfigError("the language model is not fitted: call fit (zero-shot: with no training prompts) first")
        from recforge.llm.rella import ReLLa

        self.model, self.data, self.contexts = model, data, contexts
        self.titles = list(data.split.titles)
        # prompts alone decide the score unless the model conditions on the example (CoRA, RecLoRA)
        self.cacheable = type(model).predict is ReLLa.predict
        self._cache: dict[str, float] = {}
        self.prompts_scored = 0
        self.seconds = 0.0

    def __call__(self, titles: Sequence[str], users, items) -> np.ndarray:
        if len(titles) != len(self.titles):
            raise ConfigError(f"a title table of {len(titles)} entries for {len(self.titles)} (entry 0 unused)")
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if items.ndim == 1:
            items = np.broadcast_to(items, (len(users), len(items)))
        m = items.shape[1]
        frame = self.contexts[np.repeat(users, m)].with_columns(
            pl.Series("item_id", items.ravel()).cast(self.contexts.schema.get("item_id", pl.Int64)))
        split = self.data.split
        saved = split.titles
        split.titles = list(titles)
        t0 = time.perf_counter()
        try:
            if not self.cacheable:
                _, p = self.model.predict(self.data, frame)
                self.prompts_scored += len(p)
                return np.asarray(p, dtype=np.float64).reshape(items.shape)
            prompts = self.model.prompts(self.data, frame)["prompt"].to_list()
        finally:
            split.titles = saved
            self.seconds += time.perf_counter() - t0
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if todo:
            t0 = time.perf_counter()
            for p, s in zip(todo, self.model.predict_proba(todo)):
                self._cache[p] = float(s)
            self.prompts_scored += len(todo)
            self.seconds += time.perf_counter() - t0
        return np.array([self._cache[p] for p in prompts], dtype=np.float64).reshape(items.shape)
