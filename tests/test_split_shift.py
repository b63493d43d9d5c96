"""The popularity-shift split: shifted splits never leak (no held-out pair is trained on, every
user and item keeps a training pair, every row is accounted for), the test set's item popularity
is measurably flatter than a random split's, the protocol measures it, determinism by seed, the
config wiring and clear errors for bad options."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recforge.config import SPLIT_OPTIONS, apply_overrides, base_config, split_options
from recforge.data.prepare import prepare
from recforge.data.schema import RawData
from recforge.data.split import SPLITS, make_split, popularity_shape, popularity_shift, random_ratio
from recforge.data.synthetic import make_synthetic
from recforge.errors import ConfigError

PAIR = ["user_id", "item_id"]


@pytest.fixture(scope="module")
def ds():
    return prepare(make_synthetic(n_users=300, n_items=150, seed=0))


@pytest.fixture(scope="module")
def repeats():
    """A long-tailed log with repeated (user, item) rows: 120 users, Zipf-like item choice."""
    rng = np.random.default_rng(4)
    p = 1.0 / np.arange(1, 81)
    p /= p.sum()
    users, items, times = [], [], []
    for u in range(120):
        n = int(rng.integers(4, 25))
        chosen = rng.choice(80, n, p=p)  # with replacement: some pairs repeat
        users += [f"u{u}"] * n
        items += [f"i{i}" for i in chosen]
        times += list(rng.permutation(10_000)[:n])
    return prepare(RawData(pl.DataFrame({"user_id": users, "item_id": items, "timestamp": times})))


def _pairs(df: pl.DataFrame) -> set[tuple[int, int]]:
    return set(df.select(PAIR).iter_rows())


@pytest.mark.parametrize("fixture", ["ds", "repeats"])
@pytest.mark.parametrize("seed", [0, 1])
def test_shifted_splits_never_leak(request, fixture, seed):
    data = request.getfixturevalue(fixture)
    s = popularity_shift(data, test_share=0.15, valid_share=0.1, seed=seed)
    train, valid, test = _pairs(s.train), _pairs(s.valid), _pairs(s.test)
    assert test and valid
    assert not (test & train) and not (valid & train) and not (test & valid)
    # one target row per held-out pair; the other rows of a held-out pair are dropped, never trained on
    assert s.test.height == len(test) and s.valid.height == len(valid)
    inter = data.interactions
    assert s.train.height + s.valid.height + s.test.height + s.protocol["rows_dropped"] == inter.height
    assert train | valid | test == _pairs(inter)
    # every user and every item keeps a training pair, so no test user or test item is cold
    assert set(s.train["user_id"].unique()) == set(inter["user_id"].unique())
    assert set(s.train["item_id"].unique()) == set(inter["item_id"].unique())
    # the test history holds no test row
    assert not (_pairs(s.history("test")) & test)
    n = len(_pairs(inter))
    assert s.protocol["test_pairs"] == round(0.15 * n) and s.protocol["valid_pairs"] == round(0.1 * n)


def test_keep_items_off_can_leave_items_cold(repeats):
    s = popularity_shift(repeats, test_share=0.3, valid_share=0.0, keep_items=False, seed=0)
    # still: each user keeps a training pair and nothing leaks
    assert set(s.train["user_id"].unique()) == set(repeats.interactions["user_id"].unique())
    assert not (_pairs(s.test) & _pairs(s.train)) and s.valid.height == 0
    assert s.protocol["keep_items"] is False


def test_test_popularity_is_flatter_than_a_random_split(ds):
    shifted = popularity_shift(ds, test_share=0.1, valid_share=0.1, seed=0)
    rand = random_ratio(ds, (0.8, 0.1, 0.1), seed=0)
    n = ds.n_items
    shift_test = popularity_shape(shifted.test["item_id"].to_numpy(), n)
    rand_test = popularity_shape(rand.test["item_id"].to_numpy(), n)
    assert shift_test["gini"] < rand_test["gini"] - 0.1, (shift_test, rand_test)
    assert shift_test["kl_from_uniform"] < 0.6 * rand_test["kl_from_uniform"]
    # the protocol measures the shift: flat test, long-tailed training
    shift = shifted.protocol["shift"]
    assert shift["test"] == shift_test
    assert shift["train"]["gini"] > shift["test"]["gini"] + 0.1
    # mean training popularity of the test targets is lower than under a random split
    pop = shifted.item_popularity
    assert pop[shifted.test["item_id"].to_numpy()].mean() < pop[rand.test["item_id"].to_numpy()].mean()
    # power=0 draws pairs uniformly: no flatter than the random split
    flat0 = popularity_shape(popularity_shift(ds, power=0.0, seed=0).test["item_id"].to_numpy(), n)
    assert flat0["gini"] > shift_test["gini"] + 0.1


def test_popularity_shape_by_hand():
    # counts 1, 1, 2 over items 1..3 (item 4 absent): gini = (−2·1 + 0·1 + 2·2) / (3·4) = 1/6
    out = popularity_shape(np.array([1, 2, 3, 3]), 4)
    assert out["items"] == 3 and out["gini"] == pytest.approx(1 / 6, abs=1e-4)
    p = np.array([0.25, 0.25, 0.5])
    assert out["kl_from_uniform"] == pytest.approx(float(np.sum(p * np.log(3 * p))), abs=1e-4)
    assert popularity_shape(np.array([1, 2, 3]), 3)["gini"] == 0.0


def test_deterministic_by_seed(ds):
    a, b = popularity_shift(ds, seed=3), popularity_shift(ds, seed=3)
    c = popularity_shift(ds, seed=4)
    for part in ("train", "valid", "test"):
        assert getattr(a, part).equals(getattr(b, part))
    assert not a.test.equals(c.test)
    assert a.protocol == b.protocol


def test_protocol_states_the_rule(ds):
    p = popularity_shift(ds, test_share=0.2, valid_share=0.05, seed=2, power=0.5).protocol
    assert p["split"] == "popularity_shift" and "popularity^-power" in p["rule"]
    assert (p["test_share"], p["valid_share"], p["seed"], p["power"]) == (0.2, 0.05, 2, 0.5)
    assert set(p["shift"]) == {"train", "test"} and {"gini", "kl_from_uniform", "items"} <= set(p["shift"]["test"])


def test_wired_in_make_split_and_config(ds):
    assert "popularity_shift" in SPLITS and "popularity_shift" in SPLIT_OPTIONS
    s = make_split(ds, "popularity_shift", test_share=0.2, seed=1)
    assert s.protocol["split"] == "popularity_shift" and s.protocol["test_share"] == 0.2
    cfg = apply_overrides(base_config("pop"), ["split.method=popularity_shift", "split.test_share=0.2",
                                               "split.seed=5"])
    assert split_options(cfg) == ("popularity_shift", {"test_share": 0.2, "seed": 5})
    bad = apply_overrides(base_config("pop"), ["split.method=popularity_shift", "split.ratios=[0.8,0.1,0.1]"])
    with pytest.raises(ConfigError, match="does not take ratios"):
        split_options(bad)


@pytest.mark.parametrize("options, message", [
    ({"test_share": 0.0}, "split.test_share"),
    ({"test_share": 1.2}, "split.test_share"),
    ({"valid_share": -0.1}, "split.valid_share"),
    ({"test_share": 0.6, "valid_share": 0.4}, "test_share \\+ valid_share < 1"),
    ({"power": -1.0}, "split.power"),
    ({"target_behavior": "buy"}, "data.target_behavior"),
])
def test_bad_options(ds, options, message):
    with pytest.raises(ConfigError, match=message):
        popularity_shift(ds, **options)


def test_unknown_split_names_the_new_method(ds):
    with pytest.raises(ConfigError, match="popularity_shift"):
        make_split(ds, "popularity-shift")
