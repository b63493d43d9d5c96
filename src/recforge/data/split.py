"""Train / validation / test splits without leakage.

Every split returns a :class:`Split` whose ``train`` frame is the only thing a model is fitted
on. Validation targets are ranked against the training history; test targets against the
training plus validation history. A test interaction is never in ``train``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import polars as pl
import scipy.sparse as sp

from recforge.data.dataset import Dataset, sort_interactions
from recforge.data.schema import ITEM, SPLIT, TIME, USER
from recforge.errors import ConfigError, DataError

SPLITS = ("loo", "temporal", "random", "presplit")


@dataclass
class Split:
    """A split of an encoded dataset. Frames hold encoded ``user_id``/``item_id``/``timestamp``."""

    train: pl.DataFrame
    valid: pl.DataFrame
    test: pl.DataFrame
    n_users: int
    n_items: int
    protocol: dict = field(default_factory=dict)

    def history(self, which: str) -> pl.DataFrame:
        """Interactions visible to the model when ranking ``which`` targets (valid or test)."""
        if which == "valid":
            return self.train
        if which == "test":
            if self.valid.height == 0:
                return self.train
            return sort_interactions(pl.concat([self.train, self.valid], how="diagonal_relaxed"))
        raise ValueError(f"unknown split part {which!r}")

    def targets(self, which: str) -> pl.DataFrame:
        return {"valid": self.valid, "test": self.test}[which]

    # ---- views of the training part used by models ----------------------------------------
    @cached_property
    def train_matrix(self) -> sp.csr_matrix:
        """Binary user x item CSR matrix of training interactions, shape (n_users, n_items + 1)."""
        return interactions_to_csr(self.train, self.n_users, self.n_items)

    @cached_property
    def train_sequences(self) -> tuple[np.ndarray, np.ndarray]:
        """Ragged time-ordered training sequences: (indptr of length n_users + 1, items)."""
        return ragged_sequences(self.train, self.n_users)

    @cached_property
    def item_popularity(self) -> np.ndarray:
        counts = np.zeros(self.n_items + 1, dtype=np.int64)
        vc = self.train.group_by(ITEM).len()
        counts[vc[ITEM].to_numpy()] = vc["len"].to_numpy()
        return counts


def interactions_to_csr(df: pl.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    u = df[USER].to_numpy().astype(np.int64)
    i = df[ITEM].to_numpy().astype(np.int64)
    m = sp.csr_matrix((np.ones(len(u), dtype=np.float32), (u, i)), shape=(n_users, n_items + 1))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def ragged_sequences(df: pl.DataFrame, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Time-ordered items per user from a frame sorted by (user, time)."""
    df = sort_interactions(df)
    users = df[USER].to_numpy().astype(np.int64)
    counts = np.bincount(users, minlength=n_users)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, df[ITEM].to_numpy().astype(np.int64)


def _empty_like(df: pl.DataFrame) -> pl.DataFrame:
    return df.clear()


def _same_user(offset: int) -> pl.Expr:
    """Whether the row ``offset`` rows before (negative: after) belongs to the same user, on a
    frame sorted by user; False past either end."""
    return (pl.col(USER).shift(offset) == pl.col(USER)).fill_null(False)


def leave_one_out(ds: Dataset, min_length: int = 3) -> Split:
    """Last interaction of each user is the test target, the one before it the validation
    target, the rest is training. Users with fewer than ``min_length`` interactions stay wholly
    in training and are not evaluated.

    On the frame sorted by (user, time) every part is a row-wise test over neighbouring rows (no
    per-user window, no join): a row is its user's last when the next row has another user, and
    the user has at least ``min_length`` rows when the row ``min_length - 1`` above is theirs.
    """
    df = sort_interactions(ds.interactions)

    def enough(after: int) -> pl.Expr:
        """For a row with ``after`` rows of its user after it: the user has >= min_length rows."""
        before = min_length - 1 - after
        return _same_user(before) if before > 0 else pl.lit(True)

    last = ~_same_user(-1)
    second_last = _same_user(-1) & ~_same_user(-2)
    part = (pl.when(last & enough(0)).then(2).when(second_last & enough(1)).then(1).otherwise(0)
            .cast(pl.UInt8).alias("_part"))
    marked = df.lazy().with_columns(part)
    train, valid, test = pl.collect_all(
        [marked.filter(pl.col("_part") == k).drop("_part") for k in (0, 1, 2)], engine="streaming")
    return Split(train, valid, test, ds.n_users, ds.n_items, {"split": "leave-one-out", "min_length": min_length})


def temporal(ds: Dataset, test_quantile: float = 0.9, valid_quantile: float = 0.8,
             test_cutoff: int | None = None, valid_cutoff: int | None = None) -> Split:
    """Global temporal split: interactions before the validation cut-off train, those between
    the cut-offs validate, the rest test. Cut-offs are timestamps or quantiles of all times.
    Targets of users with no training history are dropped (nothing to rank from)."""
    df = sort_interactions(ds.interactions)
    if test_cutoff is None or valid_cutoff is None:
        q = df.lazy().select(pl.col(TIME).quantile(test_quantile, "nearest").alias("test"),
                             pl.col(TIME).quantile(valid_quantile, "nearest").alias("valid"))
        q = q.collect(engine="streaming").row(0, named=True)
    t_test = int(test_cutoff) if test_cutoff is not None else int(q["test"])
    t_valid = int(valid_cutoff) if valid_cutoff is not None else int(q["valid"])
    if t_valid > t_test:
        raise ConfigError(f"temporal split: validation cut-off {t_valid} is after test cut-off {t_test}; swap them")
    lf = df.lazy()
    train_lf = lf.filter(pl.col(TIME) < t_valid)
    known = train_lf.select(pl.col(USER).unique())
    held = lambda cond: lf.filter(cond).join(known, on=USER, how="semi", maintain_order="left")  # noqa: E731
    train, valid, test = pl.collect_all([
        train_lf,
        held((pl.col(TIME) >= t_valid) & (pl.col(TIME) < t_test)),
        held(pl.col(TIME) >= t_test),
    ], engine="streaming")
    if train.height == 0 or test.height == 0:
        raise DataError(f"temporal split at {t_valid}/{t_test} leaves an empty train or test part; choose other cut-offs")
    return Split(train, valid, test, ds.n_users, ds.n_items,
                 {"split": "temporal", "valid_cutoff": t_valid, "test_cutoff": t_test})


def random_ratio(ds: Dataset, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
    """Per-user random split by ratio (train, valid, test); every user keeps at least one
    training interaction."""
    if len(ratios) != 3 or abs(sum(ratios) - 1.0) > 1e-6 or min(ratios) < 0:
        raise ConfigError(f"random split: ratios {ratios} must be three non-negative numbers summing to 1")
    df = sort_interactions(ds.interactions)
    rng = np.random.default_rng(seed)
    df = df.with_columns(pl.Series("_r", rng.random(df.height)))
    df = df.with_columns(
        (pl.col("_r").rank("ordinal").over(USER) - 1).alias("_k"), pl.len().over(USER).alias("_n")
    )
    frac = pl.col("_k") / pl.col("_n")
    tr, va = ratios[0], ratios[0] + ratios[1]
    is_train = (frac < tr) | (pl.col("_k") == 0)
    train = df.filter(is_train)
    valid = df.filter(~is_train & (frac < va))
    test = df.filter(~is_train & (frac >= va))
    drop = ["_r", "_k", "_n"]
    return Split(train.drop(drop), valid.drop(drop), test.drop(drop), ds.n_users, ds.n_items,
                 {"split": "random", "ratios": list(ratios), "seed": seed})


def presplit(ds: Dataset) -> Split:
    """Use the ``split`` column the source came with (train / valid / test)."""
    df = sort_interactions(ds.interactions)
    if SPLIT not in df.columns:
        raise DataError(f"{ds.name}: split=presplit needs a pre-split source (train/test files); use split=loo")
    part = lambda name: df.filter(pl.col(SPLIT) == name).drop(SPLIT)  # noqa: E731
    train, valid, test = part("train"), part("valid"), part("test")
    if train.height == 0 or test.height == 0:
        raise DataError(f"{ds.name}: pre-split source has no train or no test rows")
    return Split(train, valid, test, ds.n_users, ds.n_items,
                 {"split": "presplit", "has_valid": valid.height > 0})


def make_split(ds: Dataset, method: str = "loo", **options) -> Split:
    if method in ("loo", "leave-one-out"):
        return leave_one_out(ds, **options)
    if method == "temporal":
        return temporal(ds, **options)
    if method == "random":
        return random_ratio(ds, **options)
    if method == "presplit":
        return presplit(ds)
    raise ConfigError(f"unknown split {method!r}; choose one of {', '.join(SPLITS)}")
