"""Multi-behaviour data and protocol: the target-behaviour split (hand-made log, no leakage), given
splits read from train.csv/test.csv folders, the shared Retailrocket set's counts, knowledge
triples (file reader, category and co-interaction builders), the synthetic funnel, the sampled
protocol's label, and the bad-input messages."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from recforge.cli import main
from recforge.config import DATA_DEFAULTS
from recforge.data.knowledge import build_knowledge, category_relations, co_interaction, read_triples
from recforge.data.prepare import PrepareOptions, prepare
from recforge.data.readers import detect_format, load_raw
from recforge.data.schema import RawData
from recforge.data.split import leave_one_out, make_split, temporal
from recforge.data.synthetic import make_synthetic
from recforge.errors import ConfigError, DataError
from recforge.evaluation.evaluator import Protocol, evaluate
from recforge.pipeline import eval_sets, load_dataset, split_dataset

from conftest import shared_dataset

KEY = ["user_id", "item_id", "timestamp"]


def _raw_rows(ds, df: pl.DataFrame) -> set[tuple]:
    """(raw user, raw item, time, behaviour) of encoded rows."""
    users, items = ds.user_map.sort("idx")["raw"], ds.item_map.sort("idx")["raw"]
    return {(users[u], items[i - 1], t, b) for u, i, t, b in df.select(*KEY, "behavior").rows()}


# ---- the behaviour-aware split on a hand-made log --------------------------------------------
@pytest.fixture(scope="module")
def hand_log():
    """a: view/cart/buy x1, views x2 x3, buy x3, then a view after the last purchase;
    b: views only; c: buy y1, view y2, buy y2; d: view z, buy z (too short for min_length=3)."""
    rows = [
        ("a", "x1", 1, "view"), ("a", "x1", 2, "cart"), ("a", "x1", 3, "buy"), ("a", "x2", 4, "view"),
        ("a", "x3", 5, "view"), ("a", "x3", 6, "buy"), ("a", "x4", 7, "view"),
        ("b", "x1", 1, "view"), ("b", "x2", 2, "view"),
        ("c", "y1", 1, "buy"), ("c", "y2", 2, "view"), ("c", "y2", 3, "buy"),
        ("d", "z", 1, "view"), ("d", "z", 2, "buy"),
    ]
    df = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "behavior"], orient="row")
    return prepare(RawData(df.sample(fraction=1.0, shuffle=True, seed=1)))  # source order does not matter


def test_target_leave_one_out_by_hand(hand_log):
    s = leave_one_out(hand_log, target_behavior="buy")
    rows = lambda df: _raw_rows(hand_log, df)  # noqa: E731
    assert rows(s.test) == {("a", "x3", 6, "buy"), ("c", "y2", 3, "buy")}
    assert rows(s.valid) == {("a", "x1", 3, "buy"), ("c", "y1", 1, "buy")}
    # training: every behaviour up to the validation purchase; b and d (too short) wholly
    assert rows(s.train) == {("a", "x1", 1, "view"), ("a", "x1", 2, "cart"), ("b", "x1", 1, "view"),
                             ("b", "x2", 2, "view"), ("d", "z", 1, "view"), ("d", "z", 2, "buy")}
    # between the two purchases: visible when ranking the test purchase, never trained on
    assert rows(s.context) == {("a", "x2", 4, "view"), ("a", "x3", 5, "view"), ("c", "y2", 2, "view")}
    hist = rows(s.history("test"))
    assert hist == rows(s.train) | rows(s.valid) | rows(s.context)
    assert ("a", "x4", 7, "view") not in hist | rows(s.train)  # after the test purchase: dropped
    p = s.protocol
    assert (p["target_behavior"], p["users_evaluated"], p["users_without_target"], p["users_too_short"],
            p["rows_dropped"], p["context_rows"]) == ("buy", 2, 1, 1, 1, 3)


def test_target_split_never_leaks(hand_log):
    """Only target rows are held out; no held-out row and nothing after a user's test time is
    trained on; a viewed item stays rankable under exclude=target_behavior."""
    for s in (leave_one_out(hand_log, target_behavior="buy"),
              temporal(hand_log, valid_cutoff=3, test_cutoff=6, target_behavior="buy"),
              make_split(hand_log, "random", target_behavior="buy", seed=0, ratios=(0.5, 0.25, 0.25))):
        assert set(s.test["behavior"]) <= {"buy"} and set(s.valid["behavior"]) <= {"buy"}
        train = set(s.train.select(KEY).rows())
        assert not train & set(s.test.select(KEY).rows()) and not train & set(s.valid.select(KEY).rows())
        if s.protocol["split"] != "random":  # a random split has no time order
            t_test = dict(s.test.group_by("user_id").agg(pl.col("timestamp").min()).rows())
            seen = pl.concat([s.train, s.context]) if s.context is not None else s.train
            assert all(t <= t_test.get(u, np.inf) for u, t in seen.select("user_id", "timestamp").rows())
    s = leave_one_out(hand_log, target_behavior="buy")
    _, test = eval_sets(s, target_behavior="buy")
    a = int(hand_log.encode_users(["a"])[0])
    row = list(test.users).index(a)
    x1, x3 = (int(i) for i in hand_log.encode_items(["x1", "x3"]))
    excluded = test.excluded.items[test.excluded.indptr[row]: test.excluded.indptr[row + 1]]
    assert set(excluded.tolist()) == {x1}  # only the purchase; the viewed x3 (the target) stays
    score = torch.zeros(1, hand_log.n_items + 1)
    score[0, x3] = 1.0  # a model that ranks the viewed item first

    class Viewed:
        def score(self, hist):
            return score.expand(len(hist), -1)

    hit = evaluate(Viewed(), test, ks=[1], protocol=Protocol(exclude="target_behavior", target_behavior="buy"),
                   groups=False).per_user
    miss = evaluate(Viewed(), test, ks=[1], protocol=Protocol(exclude="history"), groups=False).per_user
    assert hit.filter(pl.col("user") == a)["hr@1"].item() == 1.0
    assert miss.filter(pl.col("user") == a)["hr@1"].item() == 0.0


def test_target_temporal_by_hand(hand_log):
    s = temporal(hand_log, valid_cutoff=3, test_cutoff=6, target_behavior="buy")
    rows = lambda df: _raw_rows(hand_log, df)  # noqa: E731
    assert rows(s.test) == {("a", "x3", 6, "buy")}
    assert rows(s.valid) == {("a", "x1", 3, "buy"), ("c", "y2", 3, "buy")}
    assert rows(s.context) == {("a", "x2", 4, "view"), ("a", "x3", 5, "view")}
    assert ("a", "x4", 7, "view") not in rows(s.train) | rows(s.context)  # after the test cut-off


def test_target_loo_equals_loo_when_every_row_is_the_target():
    rng = np.random.default_rng(0)
    n = 400
    df = pl.DataFrame({"user_id": rng.integers(0, 40, n), "item_id": rng.integers(0, 200, n),
                       "timestamp": rng.permutation(n), "behavior": ["buy"] * n})
    ds = prepare(RawData(df))
    a, b = leave_one_out(ds), leave_one_out(ds, target_behavior="buy")
    for part in ("train", "valid", "test"):
        assert getattr(a, part).equals(getattr(b, part))
    assert b.context.height == 0 and b.protocol["rows_dropped"] == 0


# ---- a given split: train.csv / test.csv ------------------------------------------------------
@pytest.fixture()
def mb_folder(tmp_path):
    d = tmp_path / "shop-mb"
    d.mkdir()
    (d / "train.csv").write_text(
        "user_id,item_id,behavior,timestamp\n"
        "1,10,view,100\n1,11,view,110\n1,11,cart,120\n1,11,buy,130\n1,12,view,140\n"
        "2,10,view,200\n2,10,buy,210\n2,13,view,220\n"
        "3,12,view,300\n3,12,buy,310\n3,10,view,320\n")
    (d / "test.csv").write_text("user_id,item_id\n1,12\n2,11\n3,99\n")  # 99: never seen in training
    return d


def test_split_folder_reader(mb_folder):
    assert detect_format(mb_folder) == "split-tables"
    raw = load_raw(mb_folder)
    test = raw.interactions.filter(pl.col("split") == "test").sort("user_id")
    assert test.select("user_id", "item_id", "timestamp").rows() == [(1, 12, 141), (2, 11, 221), (3, 99, 321)]
    assert test["behavior"].null_count() == 3  # no behaviour in test.csv: the target behaviour
    assert raw.meta["parts"] == {"train": 11, "test": 3} and raw.meta["unlabelled_behavior"] == ["test"]
    (mb_folder / "valid.csv").write_text("user_id,item_id\n1,13\n")
    raw = load_raw(mb_folder)
    rows = raw.interactions.filter(pl.col("user_id") == 1).filter(pl.col("split") != "train")
    assert rows.select("item_id", "timestamp", "split").rows() == [(13, 141, "valid"), (12, 142, "test")]


def test_split_folder_end_to_end(mb_folder, tmp_path, capsys):
    data = dict(DATA_DEFAULTS, path=str(mb_folder), target_behavior="buy")
    cfg = {"data": data, "split": {"method": "auto"}}
    ds = load_dataset(data)
    s = split_dataset(ds, cfg)
    assert s.protocol["split"] == "presplit" and s.protocol["test_items_not_in_training"] == 1
    assert set(s.test["behavior"]) == {"buy"} and s.test.height == 3
    assert s.train.height == 11  # train.csv is the history as given
    # the purchases-only baseline: data.behaviors=buy keeps the held-out rows (they have no behaviour)
    only = load_dataset(dict(data, behaviors="buy"))
    assert only.interactions.height == 3 + 3
    out = tmp_path / "runs"
    assert main(["train", "pop", "--data", str(mb_folder), "data.target_behavior=buy", "eval.sampled=2",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "test (SAMPLED (2 uniform negatives); target behaviour buy)" in printed
    (run,) = out.iterdir()
    m = json.loads((run / "metrics.json").read_text())
    p = m["protocol"]
    assert p["label"] == "SAMPLED (2 uniform negatives)" and p["exclude"] == "target_behavior"
    assert p["target_behavior"] == "buy" and p["behaviors"] == {"view": 7, "buy": 3, "cart": 1}
    assert p["split"]["split"] == "presplit" and m["test"]["n_users"] == 3


def test_given_split_without_validation_carves_the_last_training_target(tmp_path):
    d = tmp_path / "two-buys"
    d.mkdir()
    (d / "train.csv").write_text(
        "user_id,item_id,behavior,timestamp\n"
        "1,10,view,100\n1,11,buy,130\n1,12,cart,140\n1,12,buy,150\n1,13,view,150\n1,14,view,160\n"
        "2,10,view,200\n2,10,buy,210\n2,13,view,220\n")
    (d / "test.csv").write_text("user_id,item_id\n1,15\n2,11\n")
    data = dict(DATA_DEFAULTS, path=str(d), target_behavior="buy")  # test.csv is rewritten below: the cache must see it
    ds = load_dataset(data)
    s = split_dataset(ds, {"data": data, "split": {"method": "auto"}})
    raw = lambda f: sorted(zip(map(str, ds.decode_users(f["user_id"])), map(str, ds.decode_items(f["item_id"])), f["behavior"]))  # noqa: E731,E501
    # user 1 has two training purchases: the last one validates; the view after it (160) is context,
    # the view at the same time (150) still trains; user 2 has one purchase: nothing carved. No given
    # test pair occurs in training, so the validation pair's cart (140) is hidden as well
    assert raw(s.valid) == [("1", "12", "buy")]
    assert raw(s.context) == [("1", "12", "cart"), ("1", "14", "view")]
    assert ("1", "12", "buy") not in raw(s.train) and ("1", "13", "view") in raw(s.train)
    assert s.train.height == 9 - 3 and s.test.height == 2
    assert s.protocol["has_valid"] and s.protocol["valid_users"] == 1
    assert s.protocol["test_pairs_in_training"] == 0 and s.protocol["valid_pair_rows"].startswith("context")
    # the test targets are the given ones, with the whole training part visible when ranking them
    assert raw(s.test) == [("1", "15", "buy"), ("2", "11", "buy")]
    assert s.history("test").height == 9
    # where the given test pairs do occur in training, the validation pair's other rows train
    (d / "test.csv").write_text("user_id,item_id\n1,10\n2,13\n")
    shown = split_dataset(load_dataset(data), {"data": data, "split": {"method": "auto"}})
    assert shown.protocol["test_pairs_in_training"] == 1 and shown.protocol["valid_pair_rows"] == "training"
    assert shown.train.height == 9 - 2
    (d / "test.csv").write_text("user_id,item_id\n1,15\n2,11\n")
    # split.valid=none keeps the given training part whole
    kept = split_dataset(ds, {"data": data, "split": {"method": "auto", "valid": "none"}})
    assert kept.train.height == 9 and kept.valid.height == 0 and not kept.protocol["has_valid"]
    with pytest.raises(ConfigError, match="split.valid='sometimes'"):
        split_dataset(ds, {"data": data, "split": {"method": "presplit", "valid": "sometimes"}})


def test_retailrocket_counts():
    path = shared_dataset("retailrocket-mb")
    raw = load_raw(path)
    df = raw.interactions
    train = df.filter(pl.col("split") == "train")
    assert train.height == 97_381 and df.filter(pl.col("split") == "test").height == 2_174
    counts = dict(train.group_by("behavior").len().rows())
    assert counts == {"view": 75_374, "cart": 12_456, "buy": 9_551}
    assert train["user_id"].n_unique() == 2_174
    test = df.filter(pl.col("split") == "test")
    assert test["user_id"].is_unique().all() and test["item_id"].n_unique() == 1_907
    assert (~test["item_id"].is_in(train["item_id"].unique().implode())).sum() == 211


# ---- knowledge ---------------------------------------------------------------------------------
def test_knowledge_file_reader(tmp_path, hand_log):
    kg = tmp_path / "kg.tsv"
    kg.write_text("head\trelation\ttail\n"
                  "x1\tbrand\tacme\nx2\tbrand\tacme\nx3\tbrand\tzeta\n"
                  "x1\tsimilar\tx2\nx2\tsimilar\tx3\n"
                  "gone\tbrand\tacme\nx9\tsimilar\tx1\n")  # two unknown heads
    k = read_triples(kg, hand_log)
    enc = lambda *raw: [int(i) for i in hand_log.encode_items(list(raw))]  # noqa: E731
    x1, x2, x3 = enc("x1", "x2", "x3")
    assert k.sources[0]["dropped_unknown_heads"] == 2 and k.sources[0]["item_relations"] == ["similar"]
    assert k.relations() == {"brand": 3, "similar": 2}
    assert k.entities["raw"].to_list() == ["acme", "zeta"]
    acme, zeta = hand_log.n_items + 1, hand_log.n_items + 2
    assert sorted(k.triples.rows()) == sorted([(x1, "brand", acme), (x2, "brand", acme), (x3, "brand", zeta),
                                               (x1, "similar", x2), (x2, "similar", x3)])
    assert k.adjacency("similar").shape == (k.n_nodes, k.n_nodes) and k.adjacency("similar").nnz == 2
    spaced = tmp_path / "kg.txt"
    spaced.write_text("x1  brand acme\nx3 brand   zeta\n")  # no header, runs of spaces
    assert read_triples(spaced, hand_log).relations() == {"brand": 2}
    bad = tmp_path / "bad.txt"
    bad.write_text("x1 brand\n")
    with pytest.raises(DataError, match="line 1.*head relation tail"):
        read_triples(bad, hand_log)


def test_co_interaction_pairs_from_training_only():
    """Items 1 and 2 are viewed by users 0-3 (4 > 3: a pair), 1 and 3 by users 0-2 only (3: not);
    bought together by users 0-3 too, but users 2 and 3 buy item 2 in the test part only."""
    rows = [(u, i, "view") for u in range(4) for i in (1, 2)] + [(u, 3, "view") for u in range(3)]
    rows += [(u, i, "buy") for u in range(4) for i in (1, 2)]
    train = pl.DataFrame(rows, schema=["user_id", "item_id", "behavior"], orient="row")
    in_train = ~((pl.col("behavior") == "buy") & (pl.col("item_id") == 2) & (pl.col("user_id") >= 2))
    k = co_interaction(train.filter(in_train), n_items=3)
    assert sorted(k.triples.rows()) == [(1, "co_view", 2), (2, "co_view", 1)]
    assert co_interaction(train, n_items=3).relations() == {"co_buy": 2, "co_view": 2}
    assert co_interaction(train.filter(in_train), n_items=3, min_users=2).relations() == {"co_view": 6}


def test_knowledge_config_and_category(hand_log):
    raw = RawData(pl.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [5, 6, 5, 7], "timestamp": [1, 2, 1, 2]}),
                  items=pl.DataFrame({"item_id": [5, 6, 7], "category": ["c1", "c1", None]}))
    ds = prepare(raw)
    k = category_relations(ds)
    assert k.relations() == {"belongs_to": 2} and k.sources[0]["items_without_value"] == 1
    assert k.entities.rows() == [(ds.n_items + 1, "category", "c1")]
    s = leave_one_out(hand_log, target_behavior="buy")
    both = build_knowledge("co-interaction:0,co-interaction:1", hand_log, s.train)
    assert [src["min_users_exclusive"] for src in both.sources] == [0, 1]
    with pytest.raises(DataError, match="neither a file nor a builder"):
        build_knowledge("brands.txt", hand_log, s.train)
    with pytest.raises(DataError, match="no 'category' column"):
        build_knowledge("category", hand_log, s.train)


# ---- the synthetic funnel ------------------------------------------------------------------------
def test_synthetic_views_predict_purchases():
    raw = make_synthetic(n_users=300, n_items=200, seed=4, behaviors=True)
    df = raw.interactions
    assert set(df["behavior"]) == {"view", "cart", "buy"} and raw.name == "synthetic-mb"
    first_view = (df.filter(pl.col("behavior") == "view").group_by("user_id", "item_id")
                  .agg(pl.col("timestamp").min().alias("t_view")))
    buys = df.filter(pl.col("behavior") == "buy").join(first_view, on=["user_id", "item_id"], how="left")
    viewed_before = (buys["t_view"] < buys["timestamp"]).fill_null(False)
    assert viewed_before.mean() > 0.8  # most purchases follow a view of the item
    bought = buys.select("user_id", "item_id").unique()
    viewed = first_view.select("user_id", "item_id")
    p_viewed = bought.join(viewed, on=["user_id", "item_id"], how="semi").height / viewed.height
    p_unviewed = bought.join(viewed, on=["user_id", "item_id"], how="anti").height / (300 * 200 - viewed.height)
    assert p_viewed > 30 * p_unviewed
    # the views are the plain generator's rows, unchanged
    plain = make_synthetic(n_users=300, n_items=200, seed=4).interactions
    assert plain.equals(df.filter(pl.col("behavior") == "view").drop("behavior"))
    ds = load_dataset(dict(DATA_DEFAULTS, path="synthetic-mb:4", target_behavior="buy"))
    assert ds.name == "synthetic-mb" and set(ds.interactions["behavior"]) == {"view", "cart", "buy"}


# ---- bad input ------------------------------------------------------------------------------------
def test_absent_behaviour_is_one_clear_error(mb_folder, tmp_path, capsys):
    out = tmp_path / "runs"
    for args, expected in (
        (["data.target_behavior=purchase"], "data.target_behavior=purchase is not a behaviour of the data "
                                            "(behaviours present: view, buy, cart); set data.target_behavior"),
        (["data.target_behavior=buy", "data.behaviors=view,purchase"],
         "data.behaviors names purchase, which the data does not have (behaviours present: view, buy, cart)"),
    ):
        assert main(["train", "pop", "--data", str(mb_folder), *args, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_target_without_rows_after_filtering(tmp_path, capsys):
    """Every purchase is of an item bought once: a 2-core on items removes them all."""
    rows = [(u, i, t, "view") for u in range(6) for t, i in enumerate((1, 2, 3))]
    rows += [(u, 10 + u, 9, "buy") for u in range(6)]
    path = tmp_path / "log.csv"
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "behavior"], orient="row").write_csv(path)
    out = tmp_path / "runs"
    assert main(["train", "pop", "--data", str(path), "data.target_behavior=buy", "data.min_item=2",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no row of the target behaviour buy is left after filtering (6 before; min_item=2)" in err
    assert len(err.splitlines()) == 1 and (not out.exists() or not any(out.iterdir()))
    with pytest.raises(DataError, match="removes every row of the target behaviour buy; add it: "
                                        "data.behaviors=view,buy"):
        load_dataset(dict(DATA_DEFAULTS, path=str(path), target_behavior="buy", behaviors="view"))
    with pytest.raises(DataError, match="no behaviour column"):
        prepare(RawData(pl.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3]})),
                PrepareOptions(behaviors=("buy",)))


def test_trainer_validates_under_the_runs_exclusion(tmp_path, monkeypatch):
    """Early stopping ranks the validation purchase as the test does: with a target behaviour only
    past purchases are excluded (a viewed item stays a candidate), not the whole history."""
    import recforge

    seen = []
    real = evaluate

    def spy(model, evalset, *a, protocol=None, **k):
        seen.append((protocol, evalset.excluded is not None))
        return real(model, evalset, *a, protocol=protocol, **k)

    monkeypatch.setattr("recforge.evaluation.evaluator.evaluate", spy)
    recforge.train("bpr", "synthetic-mb", {"data.target_behavior": "buy", "epochs": 2},
                   out=tmp_path, verbose=False)
    # the two validations of training (then the final valid/test evaluations of the run)
    assert len(seen) >= 2 and all(p is not None and p.exclude == "target_behavior" and has for p, has in seen[:2])


def test_compare_pairs_users_by_raw_id_across_encodings(mb_folder, tmp_path):
    """Purchases only (data.behaviors=buy) re-encodes users and items; the paired test must still
    pair each person with themselves."""
    import recforge
    from recforge.evaluation.significance import seed_mean

    out = tmp_path / "runs"
    common = {"data.target_behavior": "buy", "data.cache": False}
    everything = recforge.train("pop", str(mb_folder), common, out=out, verbose=False)
    only = recforge.train("pop", str(mb_folder), {**common, "data.behaviors": "buy"}, out=out, verbose=False)
    a, b = seed_mean([everything.per_user()]), seed_mean([only.per_user()])
    assert sorted(a["user"]) == sorted(b["user"]) == ["1", "2", "3"]
    res = recforge.compare(everything, only, ["hr@10"])
    assert res["rows"][0]["n_users"] == 3
    # two seeds of one run: the mean per person, keyed by raw id
    twice = seed_mean([everything.per_user(), everything.per_user()])
    assert twice.sort("user")["hr@10"].to_list() == a.sort("user")["hr@10"].to_list()
