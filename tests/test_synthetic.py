"""The built-in synthetic data: determinism, schema, skew, time order, and learnable structure.

The structure tests split the default dataset leave-last-out with plain Polars/NumPy and check
that simple predictors using order (first-order Markov) or item text beat popularity by a wide
margin, which is what makes the dataset useful for demos and model tests.
"""

from __future__ import annotations

import re
import time

import numpy as np
import polars as pl
import pytest

from recforge.data.schema import ITEM, TIME, USER, RawData
from recforge.data.synthetic import make_random_log, make_synthetic
from recforge.errors import ConfigError


@pytest.fixture(scope="module")
def raw() -> RawData:
    return make_synthetic()


def _frames_equal(a: pl.DataFrame | None, b: pl.DataFrame | None) -> bool:
    return a is not None and b is not None and a.schema == b.schema and a.equals(b)


# ---- generation ------------------------------------------------------------------------------

def test_deterministic_by_seed(raw):
    again = make_synthetic(seed=0)
    assert _frames_equal(raw.interactions, again.interactions)
    assert _frames_equal(raw.items, again.items)
    assert _frames_equal(raw.users, again.users)
    other = make_synthetic(seed=1)
    assert not raw.interactions.equals(other.interactions)
    assert not raw.items.equals(other.items)


def test_default_is_fast():
    t = time.perf_counter()
    make_synthetic(seed=3)
    assert time.perf_counter() - t < 2.0


def test_shapes_and_schema(raw):
    df = raw.interactions
    assert raw.name == "synthetic"
    assert df.schema == pl.Schema({USER: pl.Int64, ITEM: pl.Int64, TIME: pl.Int64})
    assert 50_000 <= df.height <= 70_000  # ~60k: small enough for `make demo`
    assert df[USER].min() == 1 and df[USER].max() == 2000 and df[USER].n_unique() == 2000
    assert df[ITEM].min() >= 1 and df[ITEM].max() <= 1000
    assert df.group_by(USER).len()["len"].min() >= 5
    assert raw.items.schema == pl.Schema({ITEM: pl.Int64, "title": pl.Utf8, "category": pl.Utf8, "price": pl.Float64})
    assert raw.items[ITEM].to_list() == list(range(1, 1001))
    assert raw.items["category"].n_unique() == 20
    assert raw.items["price"].min() > 0
    assert raw.items["title"].null_count() == 0
    # the category word is in every title
    assert all(c in t.split() for t, c in zip(raw.items["title"], raw.items["category"]))
    assert raw.users.schema == pl.Schema({USER: pl.Int64, "age_group": pl.Utf8})
    assert raw.users[USER].to_list() == list(range(1, 2001))


def test_sizes_and_knobs_follow_arguments():
    small = make_synthetic(n_users=50, n_items=80, n_categories=5, mean_length=10, seed=2, p_follow=0.3)
    assert small.interactions[USER].n_unique() == 50
    assert small.items.height == 80 and small.items["category"].n_unique() == 5
    assert small.interactions.group_by(USER).len()["len"].min() >= 5
    assert small.meta["params"]["p_follow"] == 0.3
    with pytest.raises(ConfigError, match="unknown option"):
        make_synthetic(n_users=10, bogus=1)


def test_popularity_is_skewed(raw):
    counts = np.sort(raw.interactions.group_by(ITEM).len()["len"].to_numpy())[::-1]
    top = counts[: len(counts) // 10].sum() / counts.sum()
    assert top > 0.30  # measured 0.39 at the default seed; uniform would give 0.10


def test_timestamps_increase_within_users(raw):
    df = raw.interactions
    assert df[TIME].is_sorted()  # the log is written in time order
    per_user = df.group_by(USER, maintain_order=True).agg(pl.col(TIME).diff().drop_nulls().min().alias("d"))
    assert per_user["d"].min() >= 1  # strictly increasing per user
    span_days = (df[TIME].max() - df[TIME].min()) / 86_400
    assert 300 < span_days < 1000
    starts = df.group_by(USER).agg(pl.col(TIME).min())[TIME]
    assert (starts.max() - starts.min()) / 86_400 > 365  # users start at different dates


def test_repeats_are_rare_and_never_immediate(raw):
    df = raw.interactions.sort([USER, TIME])
    same_as_prev = (df[ITEM] == df[ITEM].shift(1)) & (df[USER] == df[USER].shift(1))
    assert not same_as_prev.any()
    dedup = df.unique(subset=[USER, ITEM], keep="first")
    assert 1 - dedup.height / df.height < 0.05


def test_prepare_accepts_it(raw):
    from recforge.data.prepare import prepare

    ds = prepare(raw)
    assert ds.n_users == 2000
    assert ds.items is not None and ds.items.height == ds.n_items
    assert ds.users is not None and ds.users.height == 2000


def test_random_log():
    df = make_random_log(200_000, n_users=5_000, n_items=3_000, seed=1)
    assert df.schema == pl.Schema({USER: pl.Int64, ITEM: pl.Int64, TIME: pl.Int64})
    assert df.height == 200_000 and df[TIME].is_sorted()
    assert df[USER].min() >= 1 and df[USER].max() <= 5_000
    assert df[ITEM].min() >= 1 and df[ITEM].max() <= 3_000
    items = np.sort(df.group_by(ITEM).len()["len"].to_numpy())[::-1]
    users = np.sort(df.group_by(USER).len()["len"].to_numpy())[::-1]
    assert items[:300].sum() / items.sum() > 0.5  # top 10% of items
    assert users[:500].sum() / users.sum() > 0.3  # top 10% of users
    assert df.equals(make_random_log(200_000, n_users=5_000, n_items=3_000, seed=1))
    assert not df.equals(make_random_log(200_000, n_users=5_000, n_items=3_000, seed=2))


# ---- learnable structure -------------------------------------------------------------------

def leave_last_out(raw: RawData):
    """Dedupe (user, item) keeping the first, order by time; the last item of each user is the
    target, the rest is training. Returns (train sequences, targets, n_items)."""
    df = (
        raw.interactions.unique(subset=[USER, ITEM], keep="first", maintain_order=True)
        .sort([USER, TIME], maintain_order=True)
    )
    seqs = [np.asarray(s) for s in df.group_by(USER, maintain_order=True).agg(pl.col(ITEM))[ITEM].to_list()]
    seqs = [s for s in seqs if len(s) >= 2]
    n_items = int(raw.items[ITEM].max())
    return [s[:-1] for s in seqs], np.array([s[-1] for s in seqs]), n_items


def hit_rate(scores: np.ndarray, train: list[np.ndarray], targets: np.ndarray, k: int = 10) -> float:
    """HR@k ranking all items (column = raw item id; column 0 unused), history excluded."""
    scores = scores.astype(np.float64).copy()
    scores[:, 0] = -np.inf
    rows = np.repeat(np.arange(len(train)), [len(s) for s in train])
    scores[rows, np.concatenate(train)] = -np.inf
    target_score = scores[np.arange(len(targets)), targets]
    better = (scores > target_score[:, None]).sum(axis=1)
    ties = (scores == target_score[:, None]).sum(axis=1) - 1
    return float(np.mean(better + ties / 2 < k))  # ties count half: the expected rank under random ties


def predictors(raw: RawData):
    train, targets, n = leave_last_out(raw)
    flat = np.concatenate(train)
    pop = np.bincount(flat, minlength=n + 1).astype(np.float64)
    tie = 1e-6 * pop / pop.max()  # every predictor breaks its ties by popularity
    last = np.array([s[-1] for s in train])
    # Pop: the same list for everyone.
    pop_scores = np.broadcast_to(pop, (len(train), n + 1))
    # Markov: transition counts between consecutive training items.
    prev = np.concatenate([s[:-1] for s in train])
    nxt = np.concatenate([s[1:] for s in train])
    trans = np.zeros((n + 1, n + 1))
    np.add.at(trans, (prev, nxt), 1.0)
    markov_scores = trans[last] + tie
    # Text: title words (the category word included) shared with the last 3 items.
    titles = raw.items.sort(ITEM)
    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, title in zip(titles[ITEM], titles["title"]):
        for w in dict.fromkeys(re.findall(r"\w+", title.lower())):
            rows.append(i)
            cols.append(vocab.setdefault(w, len(vocab)))
    words = np.zeros((n + 1, len(vocab)))
    words[rows, cols] = 1.0
    profile = np.zeros((len(train), len(vocab)))
    for back, weight in ((1, 1.0), (2, 0.5), (3, 0.25)):
        item = np.array([s[-back] if len(s) >= back else 0 for s in train])
        profile += weight * words[item]
    text_scores = profile @ words.T + tie
    return {
        "pop": hit_rate(pop_scores, train, targets),
        "markov": hit_rate(markov_scores, train, targets),
        "text": hit_rate(text_scores, train, targets),
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_order_and_text_beat_popularity(raw, seed):
    hr = predictors(raw if seed == 0 else make_synthetic(seed=seed))
    print(f"seed {seed} HR@10", hr)
    # Measured: seed 0 pop 0.090, markov 0.487, text 0.258; seed 1 pop 0.095, markov 0.500,
    # text 0.289 (seeds 2-3 alike). The bounds leave a wide margin below those ratios (5x, 3x).
    assert hr["pop"] > 0.03  # popularity is a real baseline, not a strawman
    assert hr["markov"] >= 3.0 * hr["pop"]
    assert hr["text"] >= 2.0 * hr["pop"]
    assert hr["markov"] > hr["text"]  # order carries more than text
