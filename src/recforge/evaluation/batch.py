"""What a model sees at ranking time: users, their histories, and (for evaluation) targets."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from recforge.data.schema import ITEM, USER


@dataclass
class Histories:
    """A batch of users with their histories.

    ``users`` holds encoded user indices (-1 for a user unknown at training time),
    ``indptr``/``items`` the time-ordered history of each row (ragged), ``n_items`` the catalogue
    size. Models take what they need: ``matrix`` (CSR rows) for item-based models,
    ``sequences(max_len)`` (left-padded LongTensor) for sequential ones, ``users`` for
    user-embedding models. ``behaviors`` (optional) holds the behaviour of each history row
    (aligned with ``items``; strings, None where unknown), filled when the history comes from data
    with a behaviour column; multi-behaviour models read it, others ignore it. ``times`` (optional)
    holds the timestamp of each history row (aligned with ``items``, int64), filled when the
    history comes from a table with a ``timestamp`` column; None when unknown.
    """

    users: np.ndarray
    indptr: np.ndarray
    items: np.ndarray
    n_items: int
    behaviors: np.ndarray | None = None
    times: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def from_lists(cls, users, histories: list[list[int]], n_items: int,
                   behaviors: list[list] | None = None, times: list[list[int]] | None = None) -> "Histories":
        """Rows from per-user item lists; ``behaviors``: per user the behaviour of each item (None:
        no behaviours; a row's list may hold None where a behaviour is unknown); ``times``: per
        user the timestamp of each item (None: no times)."""
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        indptr = np.zeros(len(histories) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        items = np.fromiter((i for h in histories for i in h), dtype=np.int64, count=int(lengths.sum()))
        beh = None
        if behaviors is not None:
            if [len(b) for b in behaviors] != lengths.tolist():
                raise ValueError("behaviors: one behaviour per history item")
            beh = np.array([b for row in behaviors for b in row], dtype=object)
        tms = None
        if times is not None:
            if [len(t) for t in times] != lengths.tolist():
                raise ValueError("times: one timestamp per history item")
            tms = np.fromiter((t for row in times for t in row), dtype=np.int64, count=int(lengths.sum()))
        return cls(np.asarray(users, dtype=np.int64), indptr, items, n_items, beh, tms)

    def slice(self, start: int, stop: int) -> "Histories":
        ip = self.indptr[start : stop + 1]
        beh = None if self.behaviors is None else self.behaviors[ip[0] : ip[-1]]
        tms = None if self.times is None else self.times[ip[0] : ip[-1]]
        return Histories(self.users[start:stop], ip - ip[0], self.items[ip[0] : ip[-1]], self.n_items, beh, tms)

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    @cached_property
    def matrix(self) -> sp.csr_matrix:
        """Binary CSR (batch, n_items + 1) of history items."""
        data = np.ones(len(self.items), dtype=np.float32)
        m = sp.csr_matrix((data, self.items, self.indptr), shape=(len(self.users), self.n_items + 1))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    def sequences(self, max_len: int) -> torch.Tensor:
        """The last ``max_len`` history items of each row, left-padded with 0: (batch, max_len)."""
        n = len(self.users)
        out = np.zeros((n, max_len), dtype=np.int64)
        lengths = np.minimum(self.lengths, max_len)
        # position of each kept item: row r, column max_len - lengths[r] + j
        rows = np.repeat(np.arange(n), lengths)
        starts = self.indptr[1:] - lengths
        offs = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        src = np.repeat(starts, lengths) + offs
        cols = np.repeat(max_len - lengths, lengths) + offs
        out[rows, cols] = self.items[src]
        return torch.from_numpy(out)


@dataclass
class EvalSet:
    """Users to rank for one split part, with their histories and padded targets (0 = none)."""

    histories: Histories
    targets: np.ndarray  # (n_users_eval, max_targets) int64, 0-padded
    part: str
    #: items removed from each row's ranking under ``exclude=target_behavior`` (the history rows
    #: of that behaviour); ``None`` when the set was built without a target behaviour
    excluded: Histories | None = None

    def __len__(self) -> int:
        return len(self.histories)

    @property
    def users(self) -> np.ndarray:
        return self.histories.users


def build_evalset(history: pl.DataFrame, targets: pl.DataFrame, n_users: int, n_items: int, part: str,
                  target_behavior: str | None = None) -> EvalSet:
    """Evaluate every user that has at least one target; history in time order.

    With ``target_behavior``, ``excluded`` holds each user's history items of that behaviour
    (what ``eval.exclude=target_behavior`` removes from the ranking)."""
    from recforge.data.schema import BEHAVIOR

    t = targets.sort([USER, "timestamp"], maintain_order=True)
    users = t[USER].unique(maintain_order=True).to_numpy().astype(np.int64)
    hist = _rows_of(history, users, n_users, n_items)
    excluded = None
    if target_behavior is not None:
        if BEHAVIOR not in history.columns:
            from recforge.errors import ConfigError

            raise ConfigError(f"data.target_behavior={target_behavior!r}: the data has no behaviour column; "
                              "give it with data.behavior_col=NAME or use eval.exclude=history")
        excluded = _rows_of(history.filter(pl.col(BEHAVIOR) == target_behavior), users, n_users, n_items)

    tu = t[USER].to_numpy().astype(np.int64)
    ti = t[ITEM].to_numpy().astype(np.int64)
    row = np.searchsorted(users, tu) if np.all(np.diff(users) > 0) else _positions(users, tu)
    counts = np.bincount(row, minlength=len(users))
    width = int(counts.max()) if len(counts) else 1
    col = np.arange(len(tu)) - np.repeat(np.cumsum(counts) - counts, counts)
    tgt = np.zeros((len(users), max(width, 1)), dtype=np.int64)
    tgt[row, col] = ti
    return EvalSet(hist, tgt, part, excluded)


def _rows_of(history: pl.DataFrame, users: np.ndarray, n_users: int, n_items: int) -> Histories:
    """The history items of ``users`` (in that order) as ragged rows, with their behaviours and
    timestamps when the frame has a behaviour or a timestamp column."""
    from recforge.data.dataset import sort_interactions
    from recforge.data.schema import BEHAVIOR, TIME
    from recforge.data.split import ragged_sequences

    history = sort_interactions(history)
    indptr_all, items_all = ragged_sequences(history, n_users)
    lengths = indptr_all[users + 1] - indptr_all[users]
    indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    idx = np.repeat(indptr_all[users] - indptr[:-1], lengths) + np.arange(indptr[-1])
    beh = history[BEHAVIOR].to_numpy()[idx] if BEHAVIOR in history.columns else None
    tms = history[TIME].to_numpy().astype(np.int64)[idx] if TIME in history.columns else None
    return Histories(users, indptr, items_all[idx], n_items, beh, tms)


def _positions(users: np.ndarray, tu: np.ndarray) -> np.ndarray:
    order = np.argsort(users, kind="stable")
    return order[np.searchsorted(users[order], tu)]
