"""What the multi-behaviour models share: the behaviours of the training part and of a ranking-time
history, as small integer codes.

A multi-behaviour model is trained on ``Split.train`` with its ``behavior`` column (views, carts,
purchases...) and ranks items for the *target* behaviour (``data.target_behavior``, recorded by
every split in ``Split.protocol["target_behavior"]``). Both are required: without them the model
stops with one :class:`~recforge.errors.ConfigError` naming the fix.

Behaviour codes: ``1..B`` for the behaviours of the training part in sorted order, ``0`` for
padding (sequences). Rows without a behaviour (held-out rows of a given split carry none) count as
the target behaviour, as the split treats them. At ranking time the behaviours come from
:attr:`Histories.behaviors`; a history without them (a raw history given to ``recommend`` or to the
server) counts every row as the most frequent training behaviour (``default_behavior_``).
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from recforge.data.dataset import sort_interactions
from recforge.data.schema import BEHAVIOR
from recforge.errors import ConfigError


def require_behaviors(split, model: str) -> tuple[str, list[str], str]:
    """``(target, behaviours, most frequent behaviour)`` of the training part, or a ConfigError."""
    if BEHAVIOR not in split.train.columns:
        raise ConfigError(f"{model} is a multi-behaviour model and the data has no behaviour column; map the "
                          "column of behaviour types with data.behavior_col=NAME and name the target with "
                          "data.target_behavior=NAME (e.g. --data synthetic-mb data.target_behavior=buy)")
    target = (split.protocol or {}).get("target_behavior")
    counts = (split.train.select(pl.col(BEHAVIOR).drop_nulls()).group_by(BEHAVIOR).len()
              .sort(["len", BEHAVIOR], descending=[True, False]))
    present = [str(b) for b in counts[BEHAVIOR].to_list()]
    if not target:
        raise ConfigError(f"{model} ranks for a target behaviour: set data.target_behavior=NAME (behaviours in the "
                          f"training part: {', '.join(present) or 'none'})")
    behaviors = sorted(set(present) | {str(target)})
    return str(target), behaviors, present[0] if present else str(target)


def encode_behaviors(values, behaviors: list[str], fallback: str) -> np.ndarray:
    """Codes ``1..B`` of ``values`` (strings; None and unknown names become ``fallback``)."""
    lookup = {b: k + 1 for k, b in enumerate(behaviors)}
    default = lookup[fallback]
    if values is None:
        return np.zeros(0, dtype=np.int64)
    values = np.asarray(values, dtype=object)
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    uniq, inv = np.unique(values.astype(str), return_inverse=True)
    codes = np.array([lookup.get(u, default) if u != "None" else default for u in uniq], dtype=np.int64)
    return codes[inv.ravel()]


def history_codes(hist, behaviors: list[str], default: str) -> np.ndarray:
    """The behaviour code of every row of a :class:`Histories` (``default`` where it has none)."""
    beh = getattr(hist, "behaviors", None)
    if beh is None:
        return np.full(len(hist.items), behaviors.index(default) + 1, dtype=np.int64)
    return encode_behaviors(beh, behaviors, default)


def training_rows(split, behaviors: list[str], target: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(users, items, behaviour codes)`` of the training part sorted by (user, time); rows without
    a behaviour count as the target behaviour."""
    df = sort_interactions(split.train)
    return (df["user_id"].to_numpy().astype(np.int64), df["item_id"].to_numpy().astype(np.int64),
            encode_behaviors(df[BEHAVIOR].to_numpy(), behaviors, target))


def binary_rows(users: np.ndarray, items: np.ndarray, n_rows: int, n_cols: int) -> sp.csr_matrix:
    """Binary CSR (n_rows, n_cols) with a one at every (user, item)."""
    m = sp.csr_matrix((np.ones(len(users), dtype=np.float32), (users, items)), shape=(n_rows, n_cols))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def row_mean(m: sp.csr_matrix) -> sp.csr_matrix:
    """Rows divided by their number of entries (empty rows stay empty)."""
    deg = np.asarray(m.sum(1)).ravel()
    inv = np.where(deg > 0, 1.0 / np.maximum(deg, 1e-12), 0.0).astype(np.float32)
    return sp.csr_matrix(sp.diags(inv) @ m, dtype=np.float32)


def behavior_graphs(split, behaviors: list[str], target: str, model: str):
    """``(users, items, codes, graphs)``: the training rows (:func:`training_rows`) and, per behaviour,
    the binary users x (items + 1) matrix of the training part; a ConfigError when the target
    behaviour has no training row."""
    users, items, codes = training_rows(split, behaviors, target)
    n_u, n_i = split.n_users, split.n_items + 1
    graphs = [binary_rows(users[codes == k + 1], items[codes == k + 1], n_u, n_i) for k in range(len(behaviors))]
    if graphs[behaviors.index(target)].nnz == 0:
        raise ConfigError(f"{model}: the training part has no {target!r} row to learn from")
    return users, items, codes, graphs


def history_graphs(model, hist) -> list[sp.csr_matrix]:
    """Per behaviour, the binary (batch, n_items + 1) matrix of each row's history (a history
    without behaviours: a known user's training rows; an unknown user's rows as the default
    behaviour). ``model`` has ``behaviors_``, ``default_behavior_``, ``user_graphs_``, ``n_users_``."""
    b, n_i = len(hist), model.n_items_ + 1
    rows = np.repeat(np.arange(b), hist.lengths)
    items = np.asarray(hist.items, dtype=np.int64)
    ok = (items >= 0) & (items <= model.n_items_)
    codes = history_codes(hist, model.behaviors_, model.default_behavior_)
    rows, items, codes = rows[ok], items[ok], codes[ok]
    mats = [binary_rows(rows[codes == k + 1], items[codes == k + 1], b, n_i) for k in range(len(model.behaviors_))]
    users = np.asarray(hist.users, dtype=np.int64)
    known = (users >= 0) & (users < model.n_users_)
    if getattr(hist, "behaviors", None) is None and known.any():
        k_diag = sp.diags(known.astype(np.float32))
        u_diag = sp.diags((~known).astype(np.float32))
        uc = np.clip(users, 0, model.n_users_ - 1)
        mats = [sp.csr_matrix(k_diag @ r[uc] + u_diag @ m) for r, m in zip(model.user_graphs_, mats)]
    return mats


def softmax_parts(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The softmax across a few same-shaped tensors: part ``k`` of the result is
    ``exp(x_k) / Σ_j exp(x_j)``, elementwise. For a softmax over a short axis (a handful of
    behaviours or tokens) whose other axes are large: ``torch.softmax`` along a last axis of three
    elements costs several times these elementwise operations on a CPU."""
    top = parts[0]
    for x in parts[1:]:
        top = torch.maximum(top, x)
    ex = [torch.exp(x - top) for x in parts]
    total = ex[0]
    for e in ex[1:]:
        total = total + e
    return [e / total for e in ex]


def params_version(net) -> tuple:
    """Changes whenever a parameter of ``net`` is updated in place (a key for cached item tables)."""
    return tuple((id(p), p._version) for p in net.parameters())


def history_windows(hist, behaviors: list[str], default: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``max_len`` rows of each history as left-padded item and behaviour-code windows
    ``(batch, max_len)`` (the input of the sequence models at ranking time)."""
    from recforge.models.sequential.base import pad_windows

    codes = history_codes(hist, behaviors, default)
    lengths = np.minimum(hist.lengths, max_len)
    ends = np.asarray(hist.indptr[1:], dtype=np.int64)
    return hist.sequences(max_len), torch.from_numpy(pad_windows(codes, ends - lengths, ends, max_len))


class PairBatches:
    """Batches of target-behaviour pairs ``self._pairs`` (each once an epoch, shuffled), one negative
    each drawn uniformly among the items the user has no target row with (``self._seen``)."""

    def n_train_batches(self, split):
        return -(-len(self._pairs) // self.batch_size)

    def train_batches(self, split, rng):
        from recforge.training.samplers import sample_negatives

        for idx, r in self.epoch_batches(rng.permutation(len(self._pairs)), rng):
            p = self._pairs[idx]
            neg = sample_negatives(self._seen, p[:, 0], 1, self.n_items_, r)[:, 0]
            yield {"u": torch.from_numpy(p[:, 0]), "i": torch.from_numpy(p[:, 1]), "j": torch.from_numpy(neg)}


class WindowBatches:
    """Batches of prepared training windows: items ``self._inp``, behaviour codes ``self._beh`` and
    next targets ``self._tgt`` (each once an epoch, shuffled)."""

    def n_train_batches(self, split) -> int:
        return math.ceil(len(self._inp) / self.batch_size)

    def train_batches(self, split, rng):
        for rows, _ in self.epoch_batches(rng.permutation(len(self._inp)), rng):
            yield {"inp": torch.from_numpy(self._inp[rows]), "beh": torch.from_numpy(self._beh[rows]),
                   "tgt": torch.from_numpy(self._tgt[rows])}


class BehaviorAware:
    """Mixed into the multi-behaviour models: validation during training under the protocol of the
    evaluation set (an evaluation set built with a target behaviour removes only the user's past
    target-behaviour items, so a viewed item stays a candidate while choosing the best epoch, as in
    the final evaluation)."""

    def adopt_behaviors(self, split) -> tuple[str, list[str], str]:
        """Check the split's behaviours (:func:`require_behaviors`) and keep them as fitted state
        (``target_behavior_``, ``behaviors_``, ``default_behavior_``); returns them."""
        target, behaviors, default = require_behaviors(split, self.name)
        self.target_behavior_, self.behaviors_, self.default_behavior_ = target, behaviors, default
        return target, behaviors, default

    def seen_mask(self, hist) -> np.ndarray:
        """``recommend(exclude_seen=True)`` removes the history rows of the target behaviour only
        (rows without a behaviour count as ``default_behavior_``, as in scoring), the rule of
        ``eval.exclude=target_behavior``: a viewed or carted item stays a candidate."""
        codes = history_codes(hist, self.behaviors_, self.default_behavior_)
        return codes == self.behaviors_.index(self.target_behavior_) + 1

    def validate(self, valid) -> dict:
        from recforge.evaluation.evaluator import Protocol, evaluate

        protocol = (Protocol(exclude="target_behavior", target_behavior=self.target_behavior_)
                    if getattr(valid, "excluded", None) is not None else Protocol())
        return evaluate(self, valid, ks=self.valid_ks(), protocol=protocol, groups=False,
                        batch_size=self.eval_batch_size).metrics
