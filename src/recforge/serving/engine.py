"""The serving engine: one loaded artifact with everything a request needs, built once.

An :class:`Engine` is immutable after construction, but for one thing: the catalogue of a model
that can place new items (a model with ``add_items``, e.g. HetSGFormer's ILLE) grows when events
name items it has never seen. The server holds one engine and swaps it for a new one on reload; a
request takes the current engine at its start and uses it to the end, so a swap never disturbs
requests in flight.

Recommendations work for any :class:`~recforge.models.base.Recommender`: the user's history (the
artifact's interactions, then the fresh events in time order) becomes a
:class:`~recforge.evaluation.batch.Histories` row with the user's encoded id (-1 for a user
unknown at training time), and the model's ``score`` does the rest: sequential models read the
sequence, item-based models the history matrix, user-embedding models the user id. Where the data
has behaviours (views, carts, purchases), each history row carries its behaviour (the artifact's
``behavior`` column, an event's ``behavior``), so a multi-behaviour model reads them, and
``exclude_seen`` removes the rows the model's :meth:`~recforge.models.base.Recommender.seen_mask`
names (for a multi-behaviour model its target behaviour only: a viewed item stays a candidate).
For a model that reads the time between events (``needs_times``: CmnRec with ``chunk=gap``) each row
also carries its timestamp (the artifact's ``timestamp`` column, an event's ``timestamp``, a raw
history's ``timestamps``); other models never receive times.

New items (:meth:`Engine.learn_events`): for a model with ``add_items(user_lists)`` (duck-typed),
an event whose item is not in the catalogue records the (known) user who had it; the item is then
placed by the model from the users who had it in the events this engine received so far (ILLE:
the weighted sum of items sharing those users), appended to the catalogue, and ranked by the next
request. Later events of that item move it again (``refresh_items``, when the model has it). The
engine keeps these additions in memory: another worker process, or the engine loaded by a reload,
places the item again when its next event arrives. Items whose event users are all unknown to the
model wait for a known user (events of unknown users are not remembered, and at most
``MAX_PLACEMENT_USERS`` users per item are, so this memory stays bounded). Models without ``add_items`` are unchanged: the item stays unknown.

Similar items are the cosine neighbours of an item's vector when the artifact has item vectors,
else the cosine of binary item co-occurrence in the artifact's interactions (the share of users
who had both, normalised by both items' counts), which every model's data has.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import scipy.sparse as sp

from recforge.data.schema import BEHAVIOR, ITEM, TIME, USER
from recforge.errors import RecForgeError
from recforge.evaluation.batch import Histories
from recforge.serving.ann import ANNIndex, query_vectors
from recforge.serving.artifact import Artifact
from recforge.serving.batching import drain

log = logging.getLogger("recforge.serving")

CATEGORY_COLUMNS = ("category", "categories", "genres", "genre")
MAX_HISTORY = 10_000
#: users remembered per item placed from events (the model places it from them); later users of an
#: item that has this many no longer move it, so the memory of the events stays bounded
MAX_PLACEMENT_USERS = 10_000


class NotFoundError(RecForgeError):
    """A requested user or item does not exist (HTTP 404)."""


class BadRequestError(RecForgeError):
    """A request that is well-formed but cannot be answered as asked (HTTP 400)."""


def id_key(raw) -> str:
    """The text form under which ids are compared and stored (``5`` and ``"5"`` are one id)."""
    return raw if isinstance(raw, str) else str(raw)


@dataclass
class Ranked:
    items: list
    scores: list[float]
    fallback: str | None = None
    unknown_items: list = field(default_factory=list)


class ScoreBatcher:
    """Scores concurrent requests together: one thread takes every request waiting (up to
    ``max_batch``) and calls the model's ``score`` once for all of them.

    Nothing waits on purpose: an idle server scores each request alone at once, a busy one
    scores what queued up during the previous call. One forward pass over 16 histories costs a
    small multiple of one over a single history, so under load this multiplies throughput."""

    def __init__(self, model, n_items: int, max_batch: int = 32):
        self.model, self.n_items, self.max_batch = model, n_items, max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="recforge-scorer", daemon=True)
        self._thread.start()

    def submit(self, user_idx: int, history: list[int], behaviors: list | None = None,
               times: list[int] | None = None) -> cf.Future | None:
        """Queue one user; the future's result is its scores ``(n_items + 1,)`` (a private copy).
        None once the batcher is closed."""
        if self._closed:
            return None
        fut: cf.Future = cf.Future()
        self._queue.put((user_idx, history, behaviors, times, fut))
        return fut

    def score(self, user_idx: int, history: list[int], behaviors: list | None = None,
              times: list[int] | None = None) -> np.ndarray:
        fut = self.submit(user_idx, history, behaviors, times)
        if fut is None:
            return _score_rows(self.model, [user_idx], [history], self.n_items, [behaviors], [times])[0]
        return fut.result()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = drain(self._queue, first, self.max_batch)
            try:
                rows = _score_rows(self.model, [b[0] for b in batch], [b[1] for b in batch], self.n_items,
                                   [b[2] for b in batch], [b[3] for b in batch])
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                for b in batch:
                    b[4].set_exception(exc)
            else:
                for b, row in zip(batch, rows):
                    b[4].set_result(row)
            if stop:
                return

    def close(self) -> None:
        """Stop after the requests already queued; later calls score in the caller's thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)


def _histories(users: list[int], histories: list[list[int]], n_items: int,
               behaviors: list[list | None] | None = None, times: list[list[int] | None] | None = None) -> Histories:
    """Rows for the model; behaviours when any row has them (the others' rows: None, unknown);
    timestamps only when every row has them (a model that reads times falls back without)."""
    if times is not None and any(t is None for t in times):
        times = None
    if behaviors is None or all(b is None for b in behaviors):
        return Histories.from_lists(users, histories, n_items, times=times)
    beh = [b if b is not None else [None] * len(h) for h, b in zip(histories, behaviors)]
    return Histories.from_lists(users, histories, n_items, beh, times)


def _score_rows(model, users: list[int], histories: list[list[int]], n_items: int,
                behaviors: list[list | None] | None = None, times: list[list[int] | None] | None = None) -> np.ndarray:
    import torch

    hist = _histories(users, histories, n_items, behaviors, times)
    with torch.inference_mode():
        s = model.score(hist)
    arr = s.detach().cpu().numpy() if hasattr(s, "detach") else np.asarray(s)
    return np.array(arr, dtype=np.float32, copy=True)  # never a view of model state (Pop returns one)


class Engine:
    """One loaded ranking artifact (see the module docstring)."""

    task = "ranking"

    def __init__(self, artifact: Artifact, ann_threshold: int = 100_000, ann_options: dict | None = None,
                 threads: int = 1, max_batch: int = 32):
        t0 = time.perf_counter()
        self.artifact = artifact
        self.model = artifact.model
        self.n_items = artifact.n_items
        self.n_users = artifact.n_users
        im = artifact.item_map.sort("idx")
        self.item_raw: list = [None] + im["raw"].to_list()
        self.item_index: dict[str, int] = {id_key(r): int(i) for r, i in zip(im["raw"].to_list(), im["idx"].to_list())}
        um = artifact.user_map
        self.user_index: dict[str, int] = {id_key(r): int(i) for r, i in zip(um["raw"].to_list(), um["idx"].to_list())}
        inter = artifact.interactions
        users = inter[USER].to_numpy().astype(np.int64)
        self.hist_items = inter[ITEM].to_numpy().astype(np.int64)
        #: the behaviour of each history row (None: the data has no behaviour column)
        self.hist_behaviors = inter[BEHAVIOR].to_numpy() if BEHAVIOR in inter.columns else None
        self.hist_indptr = np.searchsorted(users, np.arange(self.n_users + 1), side="left").astype(np.int64)
        #: the model reads the time of each history row (CmnRec's chunk=gap): the history's
        #: timestamps are kept, and those of fresh events passed along (None: not read, or unknown)
        self.needs_times = bool(getattr(self.model, "needs_times", False))
        self.hist_times = (inter[TIME].to_numpy().astype(np.int64)
                           if self.needs_times and TIME in inter.columns else None)

        pop = np.asarray(artifact.popularity, dtype=np.float32).copy()
        pop[0] = -np.inf
        self.popularity = pop
        self.category_column, self.categories = _categories(artifact.items, self.n_items)

        self.item_vectors = artifact.item_vectors
        if self.item_vectors is not None and self.item_vectors.shape[0] != self.n_items + 1:
            log.warning("item vectors have %d rows for %d items; not used", self.item_vectors.shape[0], self.n_items)
            self.item_vectors = None
        if self.item_vectors is not None:
            norms = np.linalg.norm(self.item_vectors, axis=1, keepdims=True)
            self._unit = (self.item_vectors / np.maximum(norms, 1e-12)).astype(np.float32)
            self._unit[0] = 0.0
            self.similar_method = "cosine-item-vectors"
        else:
            x = sp.csr_matrix((np.ones(len(users), dtype=np.float32), (users, self.hist_items)),
                              shape=(self.n_users, self.n_items + 1))
            x.sum_duplicates()
            x.data[:] = 1.0
            self._x, self._xc = x, x.tocsc()
            self._counts = np.asarray(x.sum(0)).ravel().astype(np.float32)
            self.similar_method = "cosine-cooccurrence"

        self.ann: ANNIndex | None = None
        self.ann_status = "off: exact search"
        if self.item_vectors is None:
            self.ann_status = "off: the model has no item vectors"
        elif self.n_items <= ann_threshold:
            self.ann_status = f"off: {self.n_items} items <= threshold {ann_threshold} (exact search)"
        elif not self._queries_reproduce_scores():
            self.ann_status = "off: the model's scores are not dot products of query and item vectors"
        else:
            self.ann = ANNIndex(self.item_vectors, threads=threads, **(ann_options or {}))
            self.ann_status = f"on: HNSW over {self.n_items} items"
        self.batcher = ScoreBatcher(self.model, self.n_items, max_batch) if max_batch > 1 else None
        #: the model places new items from their users (ILLE); see learn_events
        self.grows = callable(getattr(self.model, "add_items", None))
        self._grow_lock = threading.Lock()
        self._event_users: dict[str, set[int]] = {}  # new item (id key) -> known users who had it
        self._added: set[str] = set()
        self._ann_rows = self.n_items + 1  # rows of the ANN index; later rows are scored exactly
        # the model's rule for exclude_seen, when it has its own (multi-behaviour models); None: every
        # history item, without building a Histories row per request
        from recforge.models.base import Recommender

        rule = getattr(type(self.model), "seen_mask", None)
        self._seen_mask = self.model.seen_mask if rule not in (None, Recommender.seen_mask) else None
        self._warm_up()
        self.load_seconds = time.perf_counter() - t0
        log.info("engine ready: model %s, %d users, %d items, ann %s (%.1f s)", self.model_name, self.n_users,
                 self.n_items, self.ann_status, self.load_seconds)

    def close(self) -> None:
        """Stop the scoring thread (requests still holding this engine score in their own thread)."""
        if self.batcher is not None:
            self.batcher.close()

    # ---- facts ------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.artifact.model_name

    def describe(self) -> dict:
        m = self.artifact.manifest
        return {"model": self.model_name, "artifact": str(self.artifact.path), "created": m.get("created"),
                "format_version": m.get("format_version"), "task": "ranking", "n_users": self.n_users, "n_items": self.n_items,
                "ann": self.ann_status, "similar_items": self.similar_method,
                "category_column": self.category_column}

    # ---- ids --------------------------------------------------------------------------------
    def user_idx(self, raw) -> int:
        return self.user_index.get(id_key(raw), -1)

    def encode_items(self, raws) -> tuple[list[int], list]:
        """Known item indices (in order) and the raw ids that are not in the catalogue."""
        known, unknown = [], []
        for r in raws:
            i = self.item_index.get(id_key(r))
            if i is None:
                unknown.append(r)
            else:
                known.append(i)
        return known, unknown

    def _rows_of(self, column: np.ndarray | None, user_idx: int) -> list | None:
        """``column``'s entries for the user's latest ``MAX_HISTORY`` history rows (None: no column)."""
        if column is None:
            return None
        if user_idx < 0:
            return []
        a, b = self.hist_indptr[user_idx], self.hist_indptr[user_idx + 1]
        return column[max(a, b - MAX_HISTORY):b].tolist()

    def history_of(self, user_idx: int) -> list[int]:
        return self._rows_of(self.hist_items, user_idx)

    def behaviors_of(self, user_idx: int) -> list | None:
        """The behaviours of :meth:`history_of`'s rows (None when the data has none)."""
        return self._rows_of(self.hist_behaviors, user_idx)

    def times_of(self, user_idx: int) -> list[int] | None:
        """The timestamps of :meth:`history_of`'s rows; None when the model does not read times or
        the artifact has none."""
        return self._rows_of(self.hist_times, user_idx)

    def encode_events(self, events: list[tuple]) -> tuple[list[int], list, list, list]:
        """``(items, behaviours, unknown ids, times)`` of ``(raw item, behaviour[, timestamp])``
        events: the known items in order with their behaviours and timestamps (None where an event
        has none), and the raw ids that are not in the catalogue."""
        items, behaviors, unknown, times = [], [], [], []
        for raw, behavior, *when in events:
            i = self.item_index.get(id_key(raw))
            if i is None:
                unknown.append(raw)
            else:
                items.append(i)
                behaviors.append(behavior)
                times.append(when[0] if when else None)
        return items, behaviors, unknown, times

    def category_mask(self, categories: list[str] | None) -> np.ndarray | None:
        if not categories:
            return None
        if self.categories is None:
            raise BadRequestError("this model's item table has no category or genres column; "
                                  "leave 'categories' out")
        mask = np.zeros(len(self.item_raw), dtype=bool)
        for c in categories:
            idx = self.categories.get(str(c))
            if idx is not None:
                mask[idx] = True
        return mask

    # ---- ranking ----------------------------------------------------------------------------
    def recommend(self, user_idx: int, history: list[int], k: int, exclude: list[int] = (),
                  categories: list[str] | None = None, exclude_seen: bool = True,
                  behaviors: list | None = None, times: list[int] | None = None) -> Ranked:
        """Top-``k`` for an encoded user (-1: unknown) and encoded history (``behaviors``, ``times``:
        one per history row, or None); popularity when the user is unknown and the history is empty."""
        allowed, banned = self._filters(history, exclude, categories, exclude_seen, behaviors)
        if user_idx < 0 and not history:
            return self.popular(k, exclude, allowed)
        if self.ann is not None and allowed is None:
            hist = _histories([user_idx], [history], self.n_items, [behaviors], [times])
            ranked = self._recommend_ann(hist, k, banned)
            if ranked is not None:
                return ranked
        if self.batcher is not None:
            scores = self.batcher.score(user_idx, history, behaviors, times)
        else:
            scores = _score_rows(self.model, [user_idx], [history], self.n_items, [behaviors], [times])[0]
        return self._top(scores, k, banned, allowed)

    async def recommend_async(self, user_idx: int, history: list[int], k: int, exclude: list[int] = (),
                              categories: list[str] | None = None, exclude_seen: bool = True,
                              behaviors: list | None = None, times: list[int] | None = None) -> Ranked:
        """:meth:`recommend` for an event loop: the loop never runs the model; it awaits the
        scoring thread (or a worker thread for the ANN path)."""
        args = (user_idx, history, k, exclude, categories, exclude_seen, behaviors, times)
        allowed, banned = self._filters(history, exclude, categories, exclude_seen, behaviors)
        if user_idx < 0 and not history:
            return self.popular(k, exclude, allowed)
        fut = None
        if self.batcher is not None and not (self.ann is not None and allowed is None):
            fut = self.batcher.submit(user_idx, history, behaviors, times)
        if fut is None:
            return await asyncio.to_thread(self.recommend, *args)
        scores = await asyncio.wrap_future(fut)
        return self._top(scores, k, banned, allowed)

    def _filters(self, history, exclude, categories, exclude_seen, behaviors=None) -> tuple[np.ndarray | None, np.ndarray]:
        allowed = self.category_mask(categories)
        banned = set(exclude)
        if exclude_seen and history:
            mask = self._seen_mask
            seen = None if mask is None else mask(_histories([-1], [history], self.n_items, [behaviors]))
            banned |= set(history) if seen is None else {i for i, s in zip(history, seen) if s}
        return allowed, np.fromiter(banned, dtype=np.int64, count=len(banned))

    def popular(self, k: int, exclude=(), allowed: np.ndarray | None = None) -> Ranked:
        r = self._top(self.popularity.copy(), k, np.asarray(list(exclude), dtype=np.int64), allowed)
        r.fallback = "popularity"
        return r

    def _top(self, scores: np.ndarray, k: int, banned: np.ndarray, allowed: np.ndarray | None) -> Ranked:
        n = len(self.item_raw)  # the catalogue may have grown (learn_events) while this request ran
        if len(scores) != n:
            scores = scores[:n] if len(scores) > n else np.concatenate(
                [scores, np.full(n - len(scores), -np.inf, dtype=np.float32)])
        scores[0] = -np.inf
        if len(banned):
            scores[banned[banned < n]] = -np.inf
        if allowed is not None:
            if len(allowed) < n:  # items added after the mask was built have no category
                allowed = np.concatenate([allowed, np.zeros(n - len(allowed), dtype=bool)])
            scores[~allowed[:n]] = -np.inf
        k = max(0, min(k, n - 1))
        if k == 0:
            return Ranked([], [])
        part = np.argpartition(scores, -k)[-k:]
        if np.isnan(scores[part]).any():  # NaN sorts as largest: clear them all and select again
            scores[np.isnan(scores)] = -np.inf
            part = np.argpartition(scores, -k)[-k:]
        order = part[np.lexsort((part, -scores[part]))]
        order = order[np.isfinite(scores[order])]
        return Ranked([self.item_raw[i] for i in order], [float(scores[i]) for i in order])

    def _recommend_ann(self, hist: Histories, k: int, banned: np.ndarray) -> Ranked | None:
        q = query_vectors(self.model, hist, self.item_vectors)
        if q is None:
            return None
        want = min(self._ann_rows - 1, k + len(banned) + 16)
        idx, sc = self.ann.search(q, want)
        idx, sc = idx[0], sc[0]
        vectors = self.item_vectors
        if len(vectors) > self._ann_rows:  # items added since the index was built: scored exactly
            idx = np.concatenate([idx, np.arange(self._ann_rows, len(vectors))])
            sc = np.concatenate([sc, vectors[self._ann_rows:] @ q[0]])
            order = np.argsort(-sc, kind="stable")
            idx, sc = idx[order], sc[order]
        keep = (idx > 0) & ~np.isin(idx, banned) & np.isfinite(sc)
        idx, sc = idx[keep][:k], sc[keep][:k]
        if len(idx) < min(k, len(vectors) - 1 - len(banned)):
            return None  # too few candidates survived the exclusions: exact search instead
        return Ranked([self.item_raw[i] for i in idx], [float(s) for s in sc])

    # ---- similar items -----------------------------------------------------------------------
    def similar(self, item_idx: int, k: int) -> Ranked:
        if self.item_vectors is not None:
            unit = self._unit
            s = unit @ unit[item_idx]
            if not np.any(unit[item_idx]):
                s[:] = -np.inf
        elif item_idx >= self._x.shape[1]:  # an item added from events: no co-occurrence yet
            s = np.full(len(self.item_raw), -np.inf, dtype=np.float32)
        else:
            users = self._xc.indices[self._xc.indptr[item_idx]:self._xc.indptr[item_idx + 1]]
            co = np.asarray(self._x[users].sum(0)).ravel().astype(np.float32)
            denom = np.sqrt(self._counts[item_idx] * self._counts)
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.where((co > 0) & (denom > 0), co / denom, -np.inf).astype(np.float32)
        return self._top(np.asarray(s, dtype=np.float32), k, np.asarray([item_idx], dtype=np.int64), None)

    # ---- new items ---------------------------------------------------------------------------
    def learn_events(self, events: list[tuple]) -> list:
        """Take ``(raw user, raw item)`` events into the catalogue of a model that places new
        items (:attr:`grows`): every item not in the catalogue that a known user had is placed by
        the model from all the known users who had it in the events so far and becomes
        recommendable; an item placed before moves with its new users (``refresh_items``).
        Returns the raw ids added now. Nothing happens for other models."""
        if not self.grows or not events:
            return []
        with self._grow_lock:
            fresh: dict[str, list] = {}  # new item key -> [raw id, new users]
            for user_raw, item_raw in events:
                key = id_key(item_raw)
                if key in self.item_index and key not in self._added:
                    continue
                u = self.user_idx(user_raw)
                if not 0 <= u < self.n_users:  # an unknown user places nothing: no entry kept for it
                    continue
                users = self._event_users.setdefault(key, set())
                if u not in users and len(users) < MAX_PLACEMENT_USERS:
                    users.add(u)
                    fresh.setdefault(key, [item_raw, []])[1].append(u)
            new = [(k, v[0]) for k, v in fresh.items() if k not in self.item_index]
            moved = [(self.item_index[k], v[1]) for k, v in fresh.items() if k in self.item_index]
            if moved and callable(getattr(self.model, "refresh_items", None)):
                self._call_model(self.model.refresh_items, [m[0] for m in moved], [m[1] for m in moved])
                self._refresh_vectors([m[0] for m in moved])
            if new:
                self._add_items([raw for _, raw in new], [sorted(self._event_users[k]) for k, _ in new])
            return [raw for _, raw in new]

    def _call_model(self, fn, *args):
        import torch

        with torch.inference_mode():
            return fn(*args)

    def _add_items(self, raws: list, user_lists: list[list[int]]) -> None:
        """Append items placed by the model; the order of the updates keeps concurrent requests
        consistent (the model's table first, then the ids a response names, then the lookups)."""
        start = len(self.item_raw)
        idx = np.asarray(self._call_model(self.model.add_items, user_lists), dtype=np.int64)
        if len(idx) != len(raws) or (len(idx) and (idx[0] != start or np.any(np.diff(idx) != 1))):
            raise RecForgeError(f"model {self.model_name} added items at {idx.tolist()}, expected {start}..")
        self.item_raw = self.item_raw + list(raws)
        self._refresh_vectors(idx.tolist())
        counts = np.asarray([len(u) for u in user_lists], dtype=np.float32)
        self.popularity = np.concatenate([self.popularity, counts])
        for raw, i in zip(raws, idx):
            self.item_index[id_key(raw)] = int(i)
            self._added.add(id_key(raw))
        self.n_items = len(self.item_raw) - 1
        if self.batcher is not None:
            self.batcher.n_items = self.n_items
        log.info("placed %d new items from their event users (catalogue: %d items)", len(raws), self.n_items)

    def _refresh_vectors(self, rows: list[int]) -> None:
        """Copy the model's current vectors of ``rows`` into the engine's item vectors."""
        if self.item_vectors is None or not rows:
            return
        from recforge.serving.artifact import item_vectors_of

        table = item_vectors_of(self.model)
        if table is None or len(table) < max(rows) + 1:
            return

        def unit_of(v: np.ndarray) -> np.ndarray:
            return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)

        vec, unit = self.item_vectors, self._unit
        n_old = len(vec)
        old = np.asarray([r for r in rows if 0 < r < n_old], dtype=np.int64)
        if len(old):  # moved items: new arrays, so a request in flight keeps a consistent pair
            vec, unit = vec.copy(), unit.copy()
            vec[old], unit[old] = table[old], unit_of(table[old])
        if len(table) > n_old:  # appended items
            vec = np.concatenate([vec, table[n_old:]]).astype(np.float32)
            unit = np.concatenate([unit, unit_of(table[n_old:])])
        self._unit, self.item_vectors = unit, vec

    # ---- checks ------------------------------------------------------------------------------
    def _sample_histories(self, n: int = 8) -> Histories:
        rng = np.random.default_rng(0)
        users = rng.choice(self.n_users, size=min(n, self.n_users), replace=False) if self.n_users else []
        hists = [self.history_of(int(u)) for u in users]
        extra = [h for h in hists if h][:2]
        return Histories.from_lists(list(map(int, users)) + [-1] * len(extra), hists + extra, self.n_items)

    def _queries_reproduce_scores(self) -> bool:
        import torch

        try:
            hist = self._sample_histories()
            q = query_vectors(self.model, hist, self.item_vectors)
            if q is None:
                return False
            with torch.no_grad():
                s = self.model.score(hist)
            s = s.detach().cpu().numpy() if hasattr(s, "detach") else np.asarray(s)
            approx = q @ self.item_vectors.T
            scale = float(np.abs(s[:, 1:]).max()) or 1.0
            return bool(np.allclose(approx[:, 1:], s[:, 1:], rtol=1e-3, atol=1e-4 * scale))
        except Exception:  # noqa: BLE001 - any failure means: do not trust the index
            log.warning("ANN self-check failed; using exact search", exc_info=True)
            return False

    def _warm_up(self) -> None:
        try:
            u = 0 if self.n_users else -1
            h = self.history_of(u)
            self.recommend(u, h or [1], 10, behaviors=self.behaviors_of(u) if h else None)
            self.recommend(-1, [1], 10)
        except Exception:  # noqa: BLE001 - a model that cannot score must fail loudly on load
            log.exception("scoring a sample user failed")
            self.close()
            raise RecForgeError(f"{self.artifact.path}: the model failed to score a sample user; "
                                "check that the artifact was exported from a complete run") from None


def _categories(items: pl.DataFrame | None, n_items: int) -> tuple[str | None, dict[str, np.ndarray] | None]:
    """Category name -> encoded item indices, from the first category-like column of the item
    table (a string column; lists, and strings separated by ``|`` or ``,``, give several)."""
    if items is None or ITEM not in items.columns:
        return None, None
    col = next((c for c in CATEGORY_COLUMNS if c in items.columns), None)
    if col is None:
        return None, None
    ids = items[ITEM].to_list()
    vals = items[col].to_list()
    cats: dict[str, list[int]] = {}
    for i, v in zip(ids, vals):
        if v is None or i is None or not (0 < int(i) <= n_items):
            continue
        if isinstance(v, (list, tuple)):
            names = [str(x) for x in v if x is not None]
        else:
            text = str(v)
            sep = "|" if "|" in text else ("," if "," in text and col != "category" else None)
            names = [t.strip() for t in text.split(sep)] if sep else [text.strip()]
        for name in names:
            if name:
                cats.setdefault(name, []).append(int(i))
    return col, {c: np.asarray(v, dtype=np.int64) for c, v in cats.items()}
