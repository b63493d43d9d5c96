"""Splits: leave-one-out by hand, and the leakage proof for every split method.

Leakage proof: for loo, temporal, random and presplit, no test row (user, item, timestamp) is
in ``train``, the test history is exactly train + valid and holds no test row, and a model fitted
on ``split`` only ever sees ``split.train``. The row-wise leave-one-out, the temporal split and
the (user, time) sort are checked against their plain definitions (per-user windows, filters, a
stable two-column sort) on unsorted data with tied times.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recforge.data.dataset import Dataset, is_sorted_interactions, sort_interactions
from recforge.data.prepare import prepare
from recforge.data.schema import RawData
from recforge.data.split import Split, leave_one_out, make_split, presplit, random_ratio, temporal
from recforge.errors import ConfigError, DataError
from recforge.evaluation.batch import build_evalset
from recforge.models.general.ease import EASE
from recforge.models.general.pop import Pop

KEY = ["user_id", "item_id", "timestamp"]


def _rows(df: pl.DataFrame) -> list[tuple]:
    return [tuple(r) for r in df.select(KEY).rows()]


@pytest.fixture(scope="module")
def small():
    # raw rows deliberately out of time order
    df = pl.DataFrame({
        "user_id": ["a", "a", "a", "a", "b", "b", "b", "c", "c"],
        "item_id": [10, 11, 12, 13, 10, 14, 11, 12, 13],
        "timestamp": [5, 1, 3, 9, 2, 4, 6, 1, 2],
    })
    return prepare(RawData(df))


def test_leave_one_out_by_hand(small):
    """Users a, b, c -> 0, 1, 2; items 10..14 -> 1..5. a: 11, 12, 10, 13 by time -> test 13,
    valid 10; b: 10, 14, 11 -> test 11, valid 14; c has 2 < 3 interactions: train only."""
    s = leave_one_out(small, min_length=3)
    assert sorted(_rows(s.test)) == [(0, 4, 9), (1, 2, 6)]
    assert sorted(_rows(s.valid)) == [(0, 1, 5), (1, 5, 4)]
    assert sorted(_rows(s.train)) == [(0, 2, 1), (0, 3, 3), (1, 1, 2), (2, 3, 1), (2, 4, 2)]
    assert s.protocol == {"split": "leave-one-out", "min_length": 3}
    # with min_length=2, c is evaluated too: test 13 (t=2), valid 12 (t=1), nothing in train
    s2 = leave_one_out(small, min_length=2)
    assert (2, 4, 2) in _rows(s2.test) and (2, 3, 1) in _rows(s2.valid)
    assert 2 not in s2.train["user_id"].to_list()


def test_leave_one_out_last_by_time_on_random_log(log_ds):
    s = leave_one_out(log_ds, min_length=3)
    df = log_ds.interactions
    last = df.group_by("user_id").agg(pl.col("timestamp").max().alias("tmax"), pl.len().alias("n"))
    test = s.test.join(last, on="user_id")
    assert test.height == last.filter(pl.col("n") >= 3).height
    assert (test["timestamp"] == test["tmax"]).all()
    # valid is the second-to-last: not after the test row, not before any train row of the user
    v = s.valid.join(s.test.select("user_id", pl.col("timestamp").alias("t_test")), on="user_id")
    assert v.height == s.valid.height and (v["timestamp"] <= v["t_test"]).all()
    tmax_train = s.train.group_by("user_id").agg(pl.col("timestamp").max().alias("t_train"))
    v = v.join(tmax_train, on="user_id")
    assert (v["t_train"] <= v["timestamp"]).all()
    # one valid and one test row per evaluated user
    assert s.valid["user_id"].is_unique().all() and s.test["user_id"].is_unique().all()


# ---- leakage ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def log_ds():
    """80 users with 6-20 distinct items each, distinct timestamps spread over the whole period
    (the built-in synthetic shop has users active for a few days only, which leaves a global
    temporal split with almost no user in both train and test)."""
    rng = np.random.default_rng(3)
    users, items, times = [], [], []
    for u in range(80):
        n = int(rng.integers(6, 21))
        users += [f"user{u}"] * n
        items += rng.choice(np.arange(100, 160), n, replace=False).tolist()
        times += rng.choice(1_000_000, n, replace=False).tolist()
    return prepare(RawData(pl.DataFrame({"user_id": users, "item_id": items, "timestamp": times})))


@pytest.fixture(scope="module")
def presplit_ds():
    df = pl.DataFrame({
        "user_id": [1, 1, 1, 1, 2, 2, 2, 3, 3, 3],
        "item_id": [7, 8, 9, 6, 7, 9, 6, 8, 6, 7],
        "timestamp": [1, 2, 3, 4, 1, 2, 3, 1, 2, 3],
        "split": ["train", "train", "valid", "test", "train", "train", "test", "train", "valid", "test"],
    })
    return prepare(RawData(df))


def _all_splits(ds, presplit_ds):
    return {
        "loo": leave_one_out(ds),
        "temporal": temporal(ds),
        "random": random_ratio(ds, seed=1),
        "presplit": presplit(presplit_ds),
    }


@pytest.mark.parametrize("method", ["loo", "temporal", "random", "presplit"])
def test_no_leakage(method, log_ds, presplit_ds):
    ds = presplit_ds if method == "presplit" else log_ds
    s = _all_splits(log_ds, presplit_ds)[method]
    train, valid, test = set(_rows(s.train)), set(_rows(s.valid)), set(_rows(s.test))
    assert test and train
    assert not test & train
    assert not valid & train
    assert not test & valid
    # every interaction lands in exactly one part; only temporal drops the targets of users
    # without a training row (nothing to rank from)
    dropped = set(_rows(ds.interactions)) - (train | valid | test)
    assert len(train) + len(valid) + len(test) + len(dropped) == ds.interactions.height
    if method == "temporal":
        assert not {u for u, _, _ in dropped} & {u for u, _, _ in train}
    else:
        assert not dropped
    hist = s.history("test")
    assert sorted(_rows(hist)) == sorted(train | valid)
    assert not set(_rows(hist)) & test
    assert s.history("valid").equals(s.train)
    # the data has no repeats, so even the (user, item) pairs of test are unseen in the history
    pairs = lambda rows: {(u, i) for u, i, _ in rows}  # noqa: E731
    assert not pairs(test) & pairs(_rows(hist))
    # the evaluation set ranks test targets against that history only
    ev = build_evalset(hist, s.test, s.n_users, s.n_items, "test")
    for r, u in enumerate(ev.users):
        h = set(ev.histories.items[ev.histories.indptr[r] : ev.histories.indptr[r + 1]].tolist())
        assert h == {i for uu, i, _ in train | valid if uu == u}
        assert not h & {i for uu, i, _ in test if uu == u}


def test_presplit_follows_the_split_column(presplit_ds):
    """Users 1, 2, 3 -> 0, 1, 2; items 6..9 -> 1..4."""
    s = presplit(presplit_ds)
    assert sorted(_rows(s.test)) == [(0, 1, 4), (1, 1, 3), (2, 2, 3)]
    assert sorted(_rows(s.valid)) == [(0, 4, 3), (2, 1, 2)]
    assert "split" not in s.train.columns
    with pytest.raises(DataError, match="split=loo"):
        presplit(prepare(RawData(presplit_ds.interactions.drop("split"))))


def test_temporal_cutoffs(log_ds):
    s = temporal(log_ds, test_quantile=0.9, valid_quantile=0.8)
    tv, tt = s.protocol["valid_cutoff"], s.protocol["test_cutoff"]
    assert s.train["timestamp"].max() < tv <= s.valid["timestamp"].min()
    assert s.valid["timestamp"].max() < tt <= s.test["timestamp"].min()
    ts = log_ds.interactions["timestamp"]
    assert tt == int(ts.quantile(0.9, "nearest")) and tv == int(ts.quantile(0.8, "nearest"))
    # targets of users without any training row are dropped: every evaluated user has a history
    known = set(s.train["user_id"].to_list())
    assert set(s.test["user_id"].to_list()) <= known and set(s.valid["user_id"].to_list()) <= known
    # explicit cut-offs, and their order is checked
    s2 = temporal(log_ds, valid_cutoff=300_000, test_cutoff=700_000)
    assert s2.protocol == {"split": "temporal", "valid_cutoff": 300_000, "test_cutoff": 700_000}
    assert s2.train["timestamp"].max() < 300_000 <= s2.valid["timestamp"].min()
    assert s2.valid["timestamp"].max() < 700_000 <= s2.test["timestamp"].min()
    with pytest.raises(ConfigError, match="swap"):
        temporal(log_ds, valid_cutoff=700_000, test_cutoff=300_000)
    with pytest.raises(DataError, match="choose other cut-offs"):
        temporal(log_ds, valid_cutoff=0, test_cutoff=10)


def test_random_keeps_one_train_row_per_user_and_is_seeded(log_ds):
    a, b, c = random_ratio(log_ds, seed=1), random_ratio(log_ds, seed=1), random_ratio(log_ds, seed=2)
    assert a.test.equals(b.test) and a.train.equals(b.train)
    assert not a.test.equals(c.test)
    assert a.train["user_id"].n_unique() == log_ds.n_users
    with pytest.raises(ConfigError, match="summing to 1"):
        random_ratio(log_ds, ratios=(0.5, 0.1, 0.1))
    with pytest.raises(ConfigError, match="loo"):
        make_split(log_ds, "by-magic")


@pytest.mark.parametrize("method", ["loo", "temporal", "random"])
def test_models_fitted_on_split_never_see_test(method, log_ds, presplit_ds):
    s = _all_splits(log_ds, presplit_ds)[method]
    x = s.train_matrix.toarray()
    u = s.test["user_id"].to_numpy()
    i = s.test["item_id"].to_numpy()
    assert (x[u, i] == 0).all()  # no repeats in the data: no (user, test item) pair in training
    assert x.sum() == s.train.height
    # Pop counts training rows only
    pop = Pop().fit(s)
    counts = np.bincount(s.train["item_id"].to_numpy(), minlength=s.n_items + 1)
    assert np.array_equal(pop.popularity_.numpy(), counts)
    # EASE fitted with the valid and test parts removed is identical: it cannot have used them
    bare = Split(s.train, s.valid.clear(), s.test.clear(), s.n_users, s.n_items)
    assert np.array_equal(EASE(reg_lambda=10.0).fit(s).weights_np_, EASE(reg_lambda=10.0).fit(bare).weights_np_)
    # ... and fitted with the test rows added to train it changes (the check above is not vacuous)
    leaky = Split(pl.concat([s.train, s.test]), s.valid, s.test, s.n_users, s.n_items)
    assert not np.array_equal(EASE(reg_lambda=10.0).fit(s).weights_np_, EASE(reg_lambda=10.0).fit(leaky).weights_np_)


# ---- row-wise leave-one-out and the (user, time) sort against the plain definitions ----------------

def _reference_loo(df: pl.DataFrame, min_length: int) -> tuple[pl.DataFrame, ...]:
    df = df.sort(["user_id", "timestamp"], maintain_order=True).with_columns(
        (pl.len().over("user_id") - pl.int_range(pl.len()).over("user_id") - 1).alias("_e"),
        pl.len().over("user_id").alias("_n"))
    ev = pl.col("_n") >= min_length
    parts = (~ev | (pl.col("_e") >= 2), ev & (pl.col("_e") == 1), ev & (pl.col("_e") == 0))
    return tuple(df.filter(p).drop("_e", "_n") for p in parts)


@pytest.fixture(scope="module")
def tied_ds():
    """Unsorted rows, many equal times within a user, users with 1 to 12 rows; not deduplicated."""
    rng = np.random.default_rng(5)
    n = 1500
    users = rng.integers(0, 200, n) % (rng.integers(1, 13, n) * 17)
    df = pl.DataFrame({"user_id": users.astype(np.int32) % 200, "item_id": rng.integers(1, 50, n).astype(np.int32),
                       "timestamp": rng.integers(0, 8, n), "row": np.arange(n)})
    user_map = pl.DataFrame({"raw": np.arange(200), "idx": np.arange(200, dtype=np.int32)})
    item_map = pl.DataFrame({"raw": np.arange(1, 50), "idx": np.arange(1, 50, dtype=np.int32)})
    return Dataset(df, user_map, item_map)  # deliberately not sorted: the split sorts it


@pytest.mark.parametrize("min_length", [0, 1, 2, 3, 5])
def test_leave_one_out_matches_per_user_windows(tied_ds, min_length):
    s = leave_one_out(tied_ds, min_length=min_length)
    for got, want in zip((s.train, s.valid, s.test), _reference_loo(tied_ds.interactions, min_length)):
        assert got.equals(want)


def test_temporal_matches_plain_filters(tied_ds):
    s = temporal(tied_ds, test_quantile=0.8, valid_quantile=0.5)
    df = tied_ds.interactions.sort(["user_id", "timestamp"], maintain_order=True)
    tv, tt = int(df["timestamp"].quantile(0.5, "nearest")), int(df["timestamp"].quantile(0.8, "nearest"))
    train = df.filter(pl.col("timestamp") < tv)
    known = train.select("user_id").unique()
    assert s.train.equals(train)
    assert s.valid.equals(df.filter((pl.col("timestamp") >= tv) & (pl.col("timestamp") < tt)).join(
        known, on="user_id", how="semi", maintain_order="left"))
    assert s.test.equals(df.filter(pl.col("timestamp") >= tt).join(
        known, on="user_id", how="semi", maintain_order="left"))


@pytest.mark.parametrize("times", ["small", "huge", "nulls"])
def test_sort_interactions_is_the_stable_two_column_sort(tied_ds, times):
    """Packed one-key sort, the two-column fallback (a time span too wide to pack; missing
    times, which sort first), and an already sorted frame returned as it is."""
    df = tied_ds.interactions
    if times == "huge":
        df = df.with_columns(pl.col("timestamp") * (2**60) - 2**62)
    elif times == "nulls":
        df = df.with_columns(
            pl.when(pl.col("row") % 7 == 0).then(None).otherwise(pl.col("timestamp")).alias("timestamp"))
    want = df.sort(["user_id", "timestamp"], maintain_order=True)
    got = sort_interactions(df)
    assert got.equals(want)
    assert is_sorted_interactions(got) == (times != "nulls")
    if times != "nulls":
        assert sort_interactions(got) is got
