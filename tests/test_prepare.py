"""Preparation: dedupe, rating threshold, iterative k-core, encoding, the Parquet cache, and the
Dataset round trip, on hand-made frames with exact expected rows; the partitioned, streamed
pipeline against a whole-table reference, and a lazily scanned file against the same file read
eagerly."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recforge.data import prepare as prep
from recforge.data.dataset import Dataset
from recforge.data.prepare import PrepareOptions, cache_key, clean, kcore, prepare, prepare_cached
from recforge.data.readers import load_raw, read_table, reader_key, scan_table
from recforge.data.schema import RawData
from recforge.data.split import make_split
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


# ---- the lazy pipeline against a plain whole-table reference ---------------------------------------

def _reference(df: pl.DataFrame, opts: PrepareOptions) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, int]:
    """Preparation done the obvious way, on the whole table in memory: the semantics that the
    partitioned, streamed pipeline must reproduce row for row. Also returns the k-core rounds."""
    if opts.behaviors and "behavior" in df.columns:
        df = df.filter(pl.col("behavior").is_in(list(opts.behaviors)))
    if opts.rating_threshold is not None:
        df = df.filter(pl.col("rating") >= opts.rating_threshold)
    if opts.dedupe != "none":
        df = df.sort(["user_id", "timestamp"], maintain_order=True)
        keys = ["user_id", "item_id"] + [c for c in ("behavior", "split") if c in df.columns]
        df = df.unique(subset=keys, keep=opts.dedupe, maintain_order=True)
    rounds = 0
    while opts.min_user > 1 or opts.min_item > 1:
        rounds += 1
        n = df.height
        if opts.min_item > 1:
            df = df.filter(pl.len().over("item_id") >= opts.min_item)
        if opts.min_user > 1:
            df = df.filter(pl.len().over("user_id") >= opts.min_user)
        if df.height == n:
            break
    user_map = df.select(pl.col("user_id").unique().sort().alias("raw")).with_row_index("idx")
    item_map = df.select(pl.col("item_id").unique().sort().alias("raw")).with_row_index("idx", offset=1)
    user_map, item_map = (m.select("raw", pl.col("idx").cast(pl.Int32)) for m in (user_map, item_map))
    enc = (df.join(user_map.rename({"raw": "user_id", "idx": "_u"}), on="user_id", how="left", maintain_order="left")
           .join(item_map.rename({"raw": "item_id", "idx": "_i"}), on="item_id", how="left", maintain_order="left")
           .drop("user_id", "item_id").rename({"_u": "user_id", "_i": "item_id"}))
    rest = [c for c in enc.columns if c not in ("user_id", "item_id", "timestamp")]
    enc = enc.select("user_id", "item_id", "timestamp", *rest).sort(["user_id", "timestamp"], maintain_order=True)
    return enc, user_map, item_map, rounds


def _log(seed: int = 0, n: int = 4000, ids: str = "int") -> pl.DataFrame:
    """A long-tailed log with repeated (user, item) pairs, exact duplicates that differ only in
    their other columns (so which one is kept shows), few distinct times (many ties), a
    behaviour and a rating."""
    rng = np.random.default_rng(seed)
    users = (rng.pareto(1.2, n) * 8).astype(np.int64) % 400
    items = (rng.pareto(0.9, n) * 5).astype(np.int64) % 900
    times = rng.integers(0, 60, n)
    dup = rng.random(n) < 0.15  # the same pair again, at the same time
    df = pl.DataFrame({"user_id": np.concatenate([users, users[dup]]), "item_id": np.concatenate([items, items[dup]]),
                       "timestamp": np.concatenate([times, times[dup]])})
    df = df.with_columns(rating=pl.Series(rng.integers(1, 6, df.height).astype(float)),
                         behavior=pl.Series(rng.choice(["pv", "buy"], df.height, p=[0.8, 0.2])),
                         row=pl.int_range(pl.len()))
    df = df.sample(fraction=1.0, shuffle=True, seed=seed)  # duplicates scattered over the file
    if ids == "str":
        df = df.with_columns(pl.format("u{}", "user_id").alias("user_id"), pl.format("i{}", "item_id").alias("item_id"))
    elif ids == "sparse":  # too spread for a lookup array: the hashed path
        df = df.with_columns(pl.col("user_id") * 1_000_000_007, pl.col("item_id") * 998_244_353 - 10**12)
    return df


OPTS = [
    PrepareOptions(min_user=5, min_item=5),
    PrepareOptions(dedupe="last", min_user=3, min_item=4),
    PrepareOptions(dedupe="none", min_user=4),
    PrepareOptions(min_item=6),
    PrepareOptions(rating_threshold=3.0, behaviors=("pv",), min_user=2, min_item=2),
]


@pytest.mark.parametrize("ids", ["int", "str", "sparse"])
@pytest.mark.parametrize("opts", OPTS, ids=lambda o: o.key())
def test_pipeline_matches_whole_table_reference(ids, opts, monkeypatch):
    """Many user ranges (monkeypatched size), duplicates with tied times, several k-core rounds."""
    monkeypatch.setattr(prep, "PARTITION_ROWS", 97)
    df = _log(ids=ids)
    if opts.behaviors is None:
        df = df.drop("behavior")  # (user, item) dedupe keys: the packed-key path
    enc, user_map, item_map, rounds = _reference(df, opts)
    if opts.min_user > 1 and opts.min_item > 1:
        assert rounds >= 3
    ds = prepare(RawData(df), opts)
    assert ds.interactions.equals(enc) and ds.interactions.schema == enc.schema
    assert ds.user_map.equals(user_map) and ds.item_map.equals(item_map)
    # clean() gives the same rows with their raw ids
    raw_rows = clean(RawData(df), opts)
    assert raw_rows.select("row").equals(enc.select("row"))
    assert raw_rows["user_id"].to_list() == user_map["raw"].gather(enc["user_id"]).to_list()


def test_kcore_public_keeps_order_and_raw_ids():
    df = _log(ids="str").drop("behavior")
    ref = df
    for _ in range(100):
        n = ref.height
        ref = ref.filter(pl.len().over("item_id") >= 3).filter(pl.len().over("user_id") >= 4)
        if ref.height == n:
            break
    assert kcore(df, 4, 3).equals(ref)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_lazy_scan_and_eager_read_give_identical_datasets_and_splits(fmt, tmp_path, monkeypatch):
    """The same file read eagerly and scanned lazily: identical encoded tables, id maps and
    leave-one-out / temporal splits, equal to the whole-table reference too."""
    monkeypatch.setattr(prep, "PARTITION_ROWS", 250)
    df = _log(seed=1).with_columns(pl.col("timestamp") * 86_400 + 1_600_000_000)
    path = tmp_path / f"log.{fmt}"
    df.write_parquet(path) if fmt == "parquet" else df.write_csv(path)
    opts = PrepareOptions(min_user=5, min_item=5)
    eager_raw, lazy_raw = load_raw(path, rating_col="rating", behavior_col="behavior"), load_raw(
        path, lazy=True, rating_col="rating", behavior_col="behavior")
    assert isinstance(lazy_raw.interactions, pl.LazyFrame) and isinstance(eager_raw.interactions, pl.DataFrame)
    assert lazy_raw.interactions.collect().equals(eager_raw.interactions)
    assert reader_key(path, lazy=True) == reader_key(path)  # same data, same cache entry
    eager, lazy = prepare(eager_raw, opts), prepare(lazy_raw, opts)
    enc, user_map, item_map, rounds = _reference(eager_raw.interactions, opts)
    assert rounds >= 3
    for ds in (eager, lazy):
        assert ds.interactions.equals(enc) and ds.user_map.equals(user_map) and ds.item_map.equals(item_map)
    for method in ("loo", "temporal"):
        a, b = make_split(eager, method), make_split(lazy, method)
        for part in ("train", "valid", "test"):
            assert getattr(a, part).equals(getattr(b, part)), (method, part)
        assert a.protocol == b.protocol


def test_scan_table_checks_like_read_table(tmp_path):
    """The lazy reader decides id and time types and refuses bad files as the eager one does."""
    f = tmp_path / "a.csv"
    f.write_text("user,item,when,stars\n007,10,2020-01-01 00:00:10,4\n7,11,2020-01-02,3.5\n"
                 " 8 ,x1,2020-01-03T00:00:00,5\n")
    kw = dict(user_col="user", item_col="item", time_col="when", rating_col="stars")
    eager, lazy = read_table(f, **kw), scan_table(f, **kw)
    assert lazy.interactions.collect().equals(eager.interactions) and lazy.meta == eager.meta
    assert lazy.interactions.collect()["user_id"].to_list() == ["007", "7", "8"]  # leading zeros kept: text ids
    for text, kwargs, message in [
        ("user_id,item_id,timestamp\n1,,5\n", {}, "1 row"),
        ("user_id,item_id,timestamp\n1,2,abc\n", {}, "non-numeric times such as 'abc'"),
        ("user_id,item_id,timestamp\n", {}, "no interactions found"),
        ("user_id,item_id,timestamp\n1,2,01/02/2020\n", {"time_format": "%Y-%m-%d"}, "does not match --time-format"),
    ]:
        f.write_text(text)
        for reader in (read_table, scan_table):
            with pytest.raises(DataError, match=message):
                reader(f, **kwargs)
