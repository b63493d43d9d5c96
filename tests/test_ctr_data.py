"""CTR data: feature encoders on hand-worked tables, readers (libSVM, tables with a schema,
FuxiCTR-style specs, rows derived from interaction logs), splits and the clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest

from conftest import shared_dataset
from recforge.data.ctr_readers import (CTRSource, load_source, read_libsvm, rows_from_interactions, split_rows)
from recforge.data.features import OOV, PAD, FeatureEncoder, FeatureSpec, Schema
from recforge.errors import ConfigError, DataError


def _encoder(specs, train, labels=("y",), **kw):
    return FeatureEncoder(Schema(list(specs), list(labels), **kw)).fit(train)


# ---- categorical ---------------------------------------------------------------------------------
def test_categorical_vocabulary_min_count_unknown_and_missing():
    train = pl.DataFrame({"c": ["a", "a", "b", "c", "c", "c", None, None], "y": [1, 0, 1, 0, 1, 0, 1, 0]})
    enc = _encoder([FeatureSpec("c", min_count=2)], train)
    # by decreasing count, ties by value: c (3), "" (missing, 2), a (2); b (1) is below min_count
    assert enc.vocab["c"] == {"c": 2, "": 3, "a": 4}
    test = pl.DataFrame({"c": ["a", "b", "z", None, "c"], "y": [0, 1, 0, 1, 1]})
    t = enc.transform(test)
    assert t.x["c"].tolist() == [4, OOV, OOV, 3, 2]
    # "b" (rare in training) and "z" (never seen) are out-of-vocabulary, and reported
    assert t.unseen["c"] == {"count": 2, "examples": ["b", "z"]}
    assert t.y[:, 0].tolist() == [0, 1, 0, 1, 1]


def test_integral_floats_and_ints_are_one_value():
    train = pl.DataFrame({"c": [3.0, 3.0, 4.0], "y": [1, 0, 1]})
    enc = _encoder([FeatureSpec("c")], train)
    t = enc.transform(pl.DataFrame({"c": [3, 4, 5], "y": [0, 0, 1]}))
    assert t.x["c"].tolist() == [2, 3, OOV]


def test_unseen_category_at_serving_one_clear_message():
    enc = _encoder([FeatureSpec("item")], pl.DataFrame({"item": ["a", "b"], "y": [1, 0]}))
    with pytest.raises(DataError, match=r"never seen in training .*item: 1 value\(s\), e\.g\. 'zz'.*out-of-vocabulary"):
        enc.transform(pl.DataFrame({"item": ["a", "zz"]}), labels=False, unseen="error")
    t = enc.transform(pl.DataFrame({"item": ["a", "zz"]}), labels=False)
    assert t.y is None and t.x["item"].tolist() == [2, OOV] and t.unseen["item"]["count"] == 1


# ---- numeric -------------------------------------------------------------------------------------
def test_numeric_standardisation_clips_outliers_and_fills_missing():
    train = pl.DataFrame({"x": [1.0, 2.0, 3.0, None], "y": [1, 0, 1, 0]})
    enc = _encoder([FeatureSpec("x", "numeric")], train)
    st = enc.numeric["x"]
    assert st["mean"] == pytest.approx(2.0) and st["std"] == pytest.approx(np.sqrt(2 / 3))
    t = enc.transform(pl.DataFrame({"x": [3.0, 1e9, -1e9, None, float("nan"), float("inf")], "y": [0] * 6}))
    s = np.sqrt(2 / 3)
    # an outlier is clipped to the training range; missing, NaN and infinite values become the training mean
    assert t.x["x"] == pytest.approx([1 / s, 1 / s, -1 / s, 0, 0, 0])
    assert t.x["x"].dtype == np.float32


def test_numeric_minmax_log_and_buckets():
    train = pl.DataFrame({"x": [0.0, 10.0, 20.0, 30.0, 40.0], "y": [1, 0, 1, 0, 1]})
    enc = _encoder([FeatureSpec("m", "numeric", norm="minmax"), FeatureSpec("l", "numeric", norm="log"),
                    FeatureSpec("b", "numeric", buckets=4)],
                   train.with_columns(m=pl.col("x"), l=pl.col("x"), b=pl.col("x")))
    test = pl.DataFrame({"m": [20.0, 100.0], "l": [0.0, 40.0], "b": [5.0, None], "y": [0, 1]})
    t = enc.transform(test)
    assert t.x["m"] == pytest.approx([0.5, 1.0])
    lv = np.log1p(np.array([0, 10, 20, 30, 40.0]))
    assert t.x["l"] == pytest.approx((np.log1p([0.0, 40.0]) - lv.mean()) / lv.std(), rel=1e-5)
    # quantile edges 10, 20, 30: 5 falls in the first bucket (id 2), missing is OOV
    assert enc.numeric["b"]["edges"] == [10.0, 20.0, 30.0]
    assert t.x["b"].tolist() == [2, OOV]
    lay = {f["name"]: f for f in enc.layout()}
    assert lay["b"]["kind"] == "categorical" and lay["b"]["vocab"] == 6 and lay["m"]["kind"] == "numeric"


# ---- multi-valued and sequences ------------------------------------------------------------------
def test_multi_and_sequence_padding_truncation_and_shared_vocabulary():
    train = pl.DataFrame({"item": ["a", "b", "c"], "hist": ["a^b^c^d", "b", None], "tags": ["x|y|z", "", "y"],
                          "y": [1, 0, 1]})
    enc = _encoder([FeatureSpec("item"), FeatureSpec("hist", "sequence", max_len=3, share="item"),
                    FeatureSpec("tags", "multi", max_len=2, splitter="|")], train)
    # one vocabulary for item and hist: b (3 times), a (2), c (2), d (1)
    assert enc.vocab["item"] == {"b": 2, "a": 3, "c": 4, "d": 5}
    t = enc.transform(pl.DataFrame({"item": ["d", "q"], "hist": ["a^b^c^d", "q^a"], "tags": ["x|y|z", None],
                                    "y": [1, 0]}))
    assert t.x["item"].tolist() == [5, OOV]
    # a sequence keeps its most recent max_len values, left-padded
    assert t.x["hist"].tolist() == [[2, 4, 5], [PAD, OOV, 3]]
    # a multi-valued field keeps its first max_len values
    assert enc.vocab["tags"] == {"y": 2, "x": 3, "z": 4}
    assert t.x["tags"].tolist() == [[3, 2], [PAD, PAD]]
    assert t.unseen == {"item": {"count": 1, "examples": ["q"]}, "hist": {"count": 1, "examples": ["q"]}}


def test_list_columns_and_default_max_len():
    train = pl.DataFrame({"h": [["1", "2"], ["3"], []], "y": [1, 0, 1]})
    enc = _encoder([FeatureSpec("h", "sequence")], train)
    assert enc.max_len["h"] == 2  # the longest training list (capped at 50)
    assert enc.transform(train).x["h"].tolist() == [[2, 3], [0, 4], [0, 0]]


def test_encoder_save_load_round_trip(tmp_path):
    train = pl.DataFrame({"u": ["1", "2", "2"], "x": [0.5, 1.5, None], "h": ["a^b", "b", "c^a^b"], "y": [1, 0, 1]})
    specs = [FeatureSpec("u", dim=8), FeatureSpec("x", "numeric"), FeatureSpec("h", "sequence", min_count=2)]
    enc = _encoder(specs, train, user="u")
    enc.save(tmp_path / "enc")
    back = FeatureEncoder.load(tmp_path / "enc")
    test = pl.DataFrame({"u": ["2", "9"], "x": [7.0, None], "h": ["a^zz", None], "y": [0, 1]})
    a, b = enc.transform(test), back.transform(test)
    for k in a.x:
        np.testing.assert_array_equal(a.x[k], b.x[k])
    assert back.layout() == enc.layout() and list(b.groups) == ["2", "9"]


# ---- errors --------------------------------------------------------------------------------------
def test_label_missing_or_not_binary_and_absent_feature_column():
    train = pl.DataFrame({"c": ["a", "b"], "y": [1, 0]})
    with pytest.raises(DataError, match=r"label column\(s\) 'clk' named in the feature spec is not in"):
        FeatureEncoder(Schema([FeatureSpec("c")], ["clk"])).fit(train)
    with pytest.raises(DataError, match=r"column\(s\) 'price' named in the feature spec is not in .*columns: c, y"):
        FeatureEncoder(Schema([FeatureSpec("c"), FeatureSpec("price", "numeric")], ["y"])).fit(train)
    enc = _encoder([FeatureSpec("c")], train)
    with pytest.raises(DataError, match=r"label column 'y' of the test part is not binary: 2 row\(s\).*e\.g\. 2\.0"):
        enc.transform(pl.DataFrame({"c": ["a", "b", "a"], "y": [2, 1, None]}), "the test part")
    with pytest.raises(ConfigError, match="kind 'dense'"):
        FeatureSpec("x", "dense")
    with pytest.raises(ConfigError, match="shares the embedding of 'nope'"):
        Schema([FeatureSpec("h", "sequence", share="nope")], ["y"])


# ---- libSVM --------------------------------------------------------------------------------------
def test_libsvm_fields_from_index_ranges(tmp_path):
    (tmp_path / "toy.libfm").write_text("1 0:1 5:1 9:0.5\n-1 2:1 6:1 9:2.5\n-1 1:1 5:1 9:1\n")
    frames, specs, _ = read_libsvm([tmp_path / "toy.libfm"])
    df = frames[tmp_path / "toy.libfm"]
    assert [(s.name, s.kind) for s in specs] == [("f0", "categorical"), ("f1", "categorical"), ("f2", "numeric")]
    assert df["label"].to_list() == [1, 0, 0]
    assert df["f0"].to_list() == ["0", "2", "1"] and df["f2"].to_list() == [0.5, 2.5, 1.0]
    (tmp_path / "bad.libsvm").write_text("2 0:1 5:1\n")
    with pytest.raises(DataError, match="labels must be 1/-1 or 1/0"):
        read_libsvm([tmp_path / "bad.libsvm"])
    (tmp_path / "ragged.libsvm").write_text("1 0:1 5:1\n0 3:1\n")
    with pytest.raises(DataError, match="fields cannot be recovered"):
        read_libsvm([tmp_path / "ragged.libsvm"])


def test_frappe_pooled_and_resplit_7_2_1():
    path = shared_dataset("frappe")
    src = load_source({"path": str(path)})
    assert src.kind == "libsvm" and set(src.parts) == {"all"}
    df = src.parts["all"]
    assert df.height == 86_582 and df.columns[1:] == ["user", "item", "daytime", "weekday", "isweekend", "homework",
                                                      "cost", "weather", "country", "city"]
    assert set(df["label"].unique().to_list()) == {0, 1} and src.schema.user == "user"
    parts, rec = split_rows(src, {"method": "auto"})
    assert rec["method"] == "random" and rec["ratios"] == [0.7, 0.2, 0.1] and rec["seed"] == 0
    assert [parts[k].height for k in ("train", "valid", "test")] == [60_607, 17_317, 8_658]
    again, _ = split_rows(src, {"method": "random", "seed": 0})
    assert again["test"].equals(parts["test"])


# ---- tables and FuxiCTR-style specs ----------------------------------------------------------------
FUXI_YAML = """\
tiny_seq:
    data_root: ../data/
    data_format: csv
    train_data: ../data/tiny_csv/train_sample.csv
    valid_data: ../data/tiny_csv/valid_sample.csv
    test_data: ../data/tiny_csv/test_sample.csv
    min_categr_count: 1
    feature_cols:
        - {name: ["userid","adgroup_id","pid","cate_id","campaign_id","customer","brand","cms_segid",
                  "cms_group_id","final_gender_code","age_level","pvalue_level","shopping_level","occupation"],
           active: True, dtype: str, type: categorical}
        - {name: price, active: True, dtype: float, type: numeric, normalizer: StandardScaler}
        - {name: time_stamp, active: False, dtype: str, type: categorical}
        - {name: click_sequence, active: True, dtype: str, type: sequence, splitter: ^, max_len: 5,
           padding: pre, share_embedding: adgroup_id}
    label_col: {name: clk, dtype: float}
"""


def _fuxi_tree(tmp_path):
    src = shared_dataset("ctr-samples", "fuxictr")
    data = tmp_path / "data" / "tiny_csv"
    data.mkdir(parents=True)
    for name in ("train_sample.csv", "valid_sample.csv", "test_sample.csv"):
        shutil.copy(src / name, data / name)
    (tmp_path / "config").mkdir()
    spec = tmp_path / "config" / "dataset_config.yaml"
    spec.write_text(FUXI_YAML)
    return spec


def test_fuxictr_spec_read_as_it_is(tmp_path):
    spec = _fuxi_tree(tmp_path)
    src = load_source({"path": str(spec)})
    assert src.kind == "fuxictr" and set(src.parts) == {"train", "valid", "test"}
    kinds = {f.name: (f.kind, f.share, f.max_len) for f in src.schema.features}
    assert kinds["click_sequence"] == ("sequence", "adgroup_id", 5) and kinds["price"][0] == "numeric"
    assert "time_stamp" not in kinds and src.schema.labels == ["clk"] and src.schema.user == "userid"
    parts, rec = split_rows(src, {"method": "auto"})
    assert rec["method"] == "presplit" and rec["rows"] == {"train": 100, "valid": 100, "test": 100}
    enc = FeatureEncoder(src.schema).fit(parts["train"])
    t = enc.transform(parts["test"])
    assert t.x["click_sequence"].shape == (100, 5) and t.y.mean() == pytest.approx(0.04)
    # the sequence shares the adgroup_id vocabulary
    assert {f["name"]: f["table"] for f in enc.layout()}["click_sequence"] == "adgroup_id"


def test_fuxictr_spec_several_labels(tmp_path):
    src = shared_dataset("ctr-samples", "fuxictr")
    shutil.copy(src / "tiny_mtl_train.csv", tmp_path / "train.csv")
    shutil.copy(src / "tiny_mtl_test.csv", tmp_path / "test.csv")
    cats = ", ".join(f"categorical_{i}" for i in range(1, 17))
    (tmp_path / "mtl.yaml").write_text(
        "data_format: csv\ntrain_data: train.csv\nvalid_data: test.csv\ntest_data: test.csv\n"
        f"feature_cols:\n  - {{name: [{cats}], active: True, dtype: str, type: categorical}}\n"
        "  - {name: [numerical_1, numerical_2], active: True, dtype: float, type: numeric, normalizer: MinMaxScaler}\n"
        "label_col: [{name: click, dtype: float}, {name: conversion, dtype: float}]\n")
    s = load_source({"path": str(tmp_path / "mtl.yaml")})
    parts, _ = split_rows(s, {"method": "auto"})
    t = FeatureEncoder(s.schema).fit(parts["train"]).transform(parts["test"])
    assert s.schema.labels == ["click", "conversion"] and t.y.shape == (100, 2)


def test_table_with_schema_errors(tmp_path):
    (tmp_path / "rows.csv").write_text("clk,u,i\n1,a,x\n0,b,y\n2,a,y\n")
    with pytest.raises(DataError, match="not binary"):
        src = load_source({"path": str(tmp_path / "rows.csv"), "label": "clk", "categorical": "u,i"})
        FeatureEncoder(src.schema).fit(src.parts["all"])
    src = load_source({"path": str(tmp_path / "rows.csv"), "label": "click", "categorical": ["u", "i"]})
    with pytest.raises(DataError, match="label column.*'click'"):
        FeatureEncoder(src.schema).fit(src.parts["all"])
    (tmp_path / "spec.yaml").write_text("feature_cols: [{name: [u, nope], type: categorical}]\nlabel_col: {name: clk}\n")
    src = load_source({"path": str(tmp_path / "rows.csv"), "schema": str(tmp_path / "spec.yaml")})
    with pytest.raises(DataError, match="'nope' named in the feature spec is not in"):
        FeatureEncoder(src.schema).fit(src.parts["all"])


# ---- rows from interaction logs --------------------------------------------------------------------
def test_rows_from_interactions_negatives_and_history():
    from recforge.data.prepare import prepare
    from recforge.data.synthetic import make_synthetic

    ds = prepare(make_synthetic(n_users=40, n_items=60, seed=1))
    src = rows_from_interactions(ds, negatives=3, seed=5, history_len=4)
    df = src.parts["all"]
    n_pos = ds.interactions.height
    assert df.height == 4 * n_pos and df["label"].sum() == n_pos
    seen = {(u, i) for u, i in df.filter(pl.col("label") == 1).select("user_id", "item_id").iter_rows()}
    neg = df.filter(pl.col("label") == 0)
    assert not any((u, i) in seen for u, i in neg.select("user_id", "item_id").iter_rows())
    # the history of a row holds only that user's earlier items, at most history_len of them
    pos = df.filter(pl.col("label") == 1)
    for user, rows in pos.group_by("user_id", maintain_order=True):
        items = rows["item_id"].to_list()
        hists = rows["hist_items"].to_list()
        for k, h in enumerate(hists):
            assert (h or []) == items[max(0, k - 4):k]
        break
    assert {f.name: f.share for f in src.schema.features}["hist_items"] == "item_id"
    again = rows_from_interactions(ds, negatives=3, seed=5, history_len=4).parts["all"]
    assert again.equals(df)


def test_splits_random_temporal_and_errors():
    df = pl.DataFrame({"t": np.arange(100), "c": [str(i % 7) for i in range(100)], "y": [i % 2 for i in range(100)]})
    src = CTRSource({"all": df}, Schema([FeatureSpec("c")], ["y"], time="t"), "table")
    parts, rec = split_rows(src, {"method": "random", "ratios": [8, 1, 1], "seed": 3})
    rows = [set(parts[k]["t"].to_list()) for k in ("train", "valid", "test")]
    assert [len(r) for r in rows] == [80, 10, 10] and not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    parts, rec = split_rows(src, {"method": "temporal", "valid_quantile": 0.6, "test_quantile": 0.8})
    assert parts["train"]["t"].max() < parts["valid"]["t"].min() <= parts["valid"]["t"].max() < parts["test"]["t"].min()
    with pytest.raises(ConfigError, match="split 'random' does not take valid_quantile"):
        split_rows(src, {"method": "random", "valid_quantile": 0.5})
    with pytest.raises(ConfigError, match="split.method='loo' for CTR data"):
        split_rows(src, {"method": "loo"})
    no_time = CTRSource({"all": df}, Schema([FeatureSpec("c")], ["y"]), "table")
    with pytest.raises(ConfigError, match="needs a time column"):
        split_rows(no_time, {"method": "temporal"})


def test_derived_negatives_come_from_items_that_existed_then():
    """Items 1-5 first appear at times 10..50; a row at time t draws only items first seen at or
    before t that its user never had; a row with no such item falls back to the whole catalogue."""
    import scipy.sparse as sp

    from recforge.data.ctr_readers import existing_negatives
    from recforge.training.samplers import SeenPairs

    # the log: user 0 had items 1 (t 10) and 3 (t 30); user 1 had 2 (t 20), 4 (t 40), 5 (t 50)
    users = np.array([0, 1, 0, 1, 1])
    items = np.array([1, 2, 3, 4, 5])
    times = np.array([10, 20, 30, 40, 50])
    seen = SeenPairs(sp.csr_matrix((np.ones(5), (users, items)), shape=(2, 6)))
    rng = np.random.default_rng(0)
    neg, fallback = existing_negatives(seen, users, times, items, 200, 5, rng)
    assert set(neg[1]) == {1}  # t 20: items 1, 2 existed; user 1 had 2
    assert set(neg[2]) == {2}  # t 30: items 1-3; user 0 had 1 and 3
    assert set(neg[3]) == {1, 3}  # t 40: items 1-4; user 1 had 2 and 4
    assert set(neg[4]) == {1, 3}  # t 50: items 1-5; user 1 had 2, 4, 5
    # t 10: only item 1 existed, and user 0 had it: the whole catalogue, still never a seen item
    assert fallback == 200 and set(neg[0]) <= {2, 4, 5}
    assert abs((neg[3] == 1).mean() - 0.5) < 0.1  # uniform over what is left
