"""Preparation: dedupe, rating threshold, iterative k-core, encoding, the Parquet cache, and the
Dataset round trip, on hand-made frames with exact expected rows."""

from __future__ import annotations

import polars as pl
import pytest

from recforge.data.dataset import Dataset
from recforge.data.prepare import PrepareOptions, cache_key, clean, kcore, prepare, prepare_cached
from recforge.data.schema import RawData
from recforge.errors import DataError


def _raw(**cols) -> RawData:
    return RawData(pl.DataFrame(cols))


def _triples(df: pl.DataFrame) -> list[tuple]:
    return sorted(tuple(r) for r in df.select("user_id", "item_id", "timestamp").rows())


# ---- cleaning ----------------------------------------------------------------------------------

DUP = dict(user_id=[1, 1, 1, 2, 2], item_id=[7, 7, 8, 7, 7], timestamp=[1, 5, 3, 2, 9])


@pytest.mark.parametrize(("mode", "expected"), [
    ("first", [(1, 7, 1), (1, 8, 3), (2, 7, 2)]),
    ("last", [(1, 7, 5), (1, 8, 3), (2, 7, 9)]),
    ("none", [(1, 7, 1), (1, 7, 5), (1, 8, 3), (2, 7, 2), (2, 7, 9)]),
])
def test_dedupe(mode, expected):
    assert _triples(clean(_raw(**DUP), PrepareOptions(dedupe=mode))) == expected


def test_dedupe_keeps_distinct_behaviours():
    raw = _raw(user_id=[1, 1, 1], item_id=[7, 7, 7], timestamp=[1, 2, 3], behavior=["pv", "buy", "pv"])
    out = clean(raw, PrepareOptions())
    assert sorted(out.select("timestamp", "behavior").rows()) == [(1, "pv"), (2, "buy")]
    only_buy = clean(raw, PrepareOptions(behaviors=("buy",)))
    assert only_buy.select("timestamp", "behavior").rows() == [(2, "buy")]


def test_rating_threshold_is_inclusive_and_applied_before_dedupe():
    """(1, 7) is rated 2 then 5: the threshold drops the low rating first, so dedupe keeps the
    positive one (t=4) instead of losing the pair."""
    raw = _raw(user_id=[1, 1, 1, 2], item_id=[7, 7, 8, 7], timestamp=[1, 4, 2, 3], rating=[2.0, 5.0, 4.0, 3.5])
    out = clean(raw, PrepareOptions(rating_threshold=4.0))
    assert _triples(out) == [(1, 7, 4), (1, 8, 2)]
    with pytest.raises(DataError, match="--rating-col"):
        clean(_raw(**DUP), PrepareOptions(rating_threshold=4.0))


KCORE = pl.DataFrame({
    "user_id": ["A", "A", "B", "B", "C", "C", "D", "D"],
    "item_id": ["a1", "a2", "a1", "a2", "a2", "c1", "c1", "d1"],
    "timestamp": list(range(8)),
})


def test_kcore_needs_several_rounds():
    """min 2 per user and per item. Round 1: d1 has 1 row -> gone; then D has 1 row -> gone.
    Round 2: c1 now has 1 row (C) -> gone; then C has 1 row -> gone. Round 3: stable."""
    one_round = kcore(KCORE, 2, 2, max_rounds=1)
    assert sorted(one_round.select("user_id", "item_id").rows()) == [
        ("A", "a1"), ("A", "a2"), ("B", "a1"), ("B", "a2"), ("C", "a2"), ("C", "c1")]
    full = kcore(KCORE, 2, 2)
    assert sorted(full.select("user_id", "item_id").rows()) == [("A", "a1"), ("A", "a2"), ("B", "a1"), ("B", "a2")]
    assert kcore(KCORE, 1, 1).equals(KCORE)  # thresholds <= 1 keep everything
    # users only: D (2 rows) survives, nobody is removed
    assert kcore(KCORE, 2, 0).height == 8
    ds = prepare(RawData(KCORE), PrepareOptions(min_user=2, min_item=2))
    assert ds.n_users == 2 and ds.n_items == 2 and ds.interactions.height == 4


def test_empty_after_filtering_names_the_fix():
    with pytest.raises(DataError, match=r"no interactions left.*min_user=100.*lower the thresholds"):
        prepare(RawData(KCORE), PrepareOptions(min_user=100))


# ---- encoding ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoded():
    raw = RawData(
        pl.DataFrame({
            "user_id": ["zed", "amy", "bob", "amy", "zed"],
            "item_id": [30, 10, 20, 30, 10],
            "timestamp": [5, 2, 1, 1, 3],
        }),
        items=pl.DataFrame({"item_id": [10, 20, 30, 40], "title": ["ten", "twenty", "thirty", "forty"]}),
        users=pl.DataFrame({"user_id": ["amy", "bob", "zed"], "age": [30, 40, 50]}),
        name="tiny",
    )
    return prepare(raw)


def test_encoding_dense_ids(encoded):
    ds = encoded
    assert ds.user_map.rows() == [("amy", 0), ("bob", 1), ("zed", 2)]
    assert ds.item_map.rows() == [(10, 1), (20, 2), (30, 3)]
    assert ds.user_map.schema["idx"] == pl.Int32 and ds.item_map.schema["raw"] == pl.Int64
    assert (ds.n_users, ds.n_items) == (3, 3)
    # interactions encoded and sorted by (user, time)
    assert ds.interactions.select("user_id", "item_id", "timestamp").rows() == [
        (0, 3, 1), (0, 1, 2), (1, 2, 1), (2, 1, 3), (2, 3, 5)]
    # side tables follow the encoding (item 40 never interacted with: not in the catalogue)
    assert ds.items.rows() == [(1, "ten"), (2, "twenty"), (3, "thirty")]
    assert ds.users.rows() == [(0, 30), (1, 40), (2, 50)]
    assert ds.meta["prepare"]["dedupe"] == "first"


def test_encoding_round_trip_and_unknown(encoded):
    ds = encoded
    assert ds.encode_users(["bob", "zed", "nobody"]).tolist() == [1, 2, -1]
    assert ds.decode_users([1, 2, 0]) == ["bob", "zed", "amy"]
    assert ds.encode_items([30, 10, 999]).tolist() == [3, 1, -1]
    assert ds.encode_items(["20"]).tolist() == [2]  # a raw id given as text still matches
    assert ds.encode_items(["abc"]).tolist() == [-1]
    assert ds.decode_items(ds.encode_items([20, 30, 10])) == [20, 30, 10]
    raw_users = ds.user_map["raw"].to_list()
    assert ds.decode_users(ds.encode_users(raw_users)) == raw_users


def test_string_item_ids():
    ds = prepare(_raw(user_id=[5, 3], item_id=["b", "a"], timestamp=[1, 1]))
    assert ds.user_map.rows() == [(3, 0), (5, 1)]
    assert ds.item_map.rows() == [("a", 1), ("b", 2)]
    assert ds.encode_items(["b", "zz"]).tolist() == [2, -1]
    assert ds.encode_users([5, 4]).tolist() == [1, -1]


def test_dataset_save_load_round_trip(encoded, tmp_path):
    encoded.save(tmp_path / "ds")
    back = Dataset.load(tmp_path / "ds")
    for name in ("interactions", "user_map", "item_map", "items", "users"):
        a, b = getattr(encoded, name), getattr(back, name)
        assert a.schema == b.schema and a.equals(b), name
    assert back.name == "tiny"
    assert back.meta == encoded.meta
    with pytest.raises(DataError, match="recforge data prepare"):
        Dataset.load(tmp_path / "nothing")


# ---- cache -------------------------------------------------------------------------------------

def test_prepare_cached(tmp_path):
    source = tmp_path / "log.csv"
    source.write_text("pretend source\n")
    calls = []

    def load_raw():
        calls.append(1)
        return _raw(**DUP)

    cache = tmp_path / "cache"
    opts = PrepareOptions()
    first = prepare_cached(load_raw, str(source), opts, cache=cache)
    second = prepare_cached(load_raw, str(source), opts, cache=cache)
    assert len(calls) == 1  # the second call is served from the cache
    assert second.interactions.equals(first.interactions) and second.item_map.equals(first.item_map)
    assert second.meta["cache"] == str(cache / cache_key(str(source), opts))
    assert [p.name for p in cache.iterdir()] == [cache_key(str(source), opts)]  # no temporary left

    # another option, another reader key, a changed source: each a new key and a miss
    prepare_cached(load_raw, str(source), PrepareOptions(dedupe="none"), cache=cache)
    assert len(calls) == 2
    prepare_cached(load_raw, str(source), opts, reader_key="sep=;", cache=cache)
    assert len(calls) == 3
    source.write_text("pretend source, edited\n")
    prepare_cached(load_raw, str(source), opts, cache=cache)
    assert len(calls) == 4
    assert len({p.name for p in cache.iterdir()}) == 4
    keys = {cache_key(str(source), PrepareOptions(min_user=m)) for m in (0, 2, 3)}
    assert len(keys) == 3


def test_prepare_cached_uses_recforge_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path / "env-cache"))
    source = tmp_path / "log.csv"
    source.write_text("x\n")
    calls = []

    def load_raw():
        calls.append(1)
        return _raw(**DUP)

    prepare_cached(load_raw, str(source), PrepareOptions())
    ds = prepare_cached(load_raw, str(source), PrepareOptions())
    assert len(calls) == 1
    assert ds.meta["cache"].startswith(str(tmp_path / "env-cache" / "prepared"))
