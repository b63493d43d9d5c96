"""IMCA and its tag reader: normalisation and leak-free filtering of tags, ``auto`` lookup, tag
intents, training on a synthetic task with tags, unknown users, determinism, persistence and
bad parameters."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from graph_contract import assert_beats_pop, assert_deterministic_by_seed, assert_round_trip, evalsets, ndcg
from recforge.data.prepare import prepare
from recforge.data.schema import RawData
from recforge.data.split import leave_one_out
from recforge.data.synthetic import make_synthetic
from recforge.data.tags import build_tags, read_tag_rows
from recforge.errors import ConfigError, DataError
from recforge.evaluation.batch import Histories
from recforge.models.graph.imca import cluster_tags
from recforge.models.registry import create

FAST = {"verbose": False, "dim": 32, "batch_size": 512, "lr": 0.005, "epochs": 40, "eval_every": 2,
        "patience": 4, "valid_metric": "ndcg@10", "threads": 1}


# ---- the tag reader ----------------------------------------------------------------------------------
@pytest.fixture()
def hand(tmp_path):
    """Three users with four items each, leave-one-out: user 1 (raw 'a') has 10, 11 in training,
    12 as validation and 13 as test target."""
    rows = [(u, i, t) for u, items in (("a", [10, 11, 12, 13]), ("b", [11, 12, 13, 14]), ("c", [10, 12, 14, 15]))
            for t, i in enumerate(items)]
    df = pl.DataFrame(rows, schema={"user_id": pl.Utf8, "item_id": pl.Int64, "timestamp": pl.Int64}, orient="row")
    ds = prepare(RawData(df, name="hand"))
    return ds, leave_one_out(ds), tmp_path


def _tags_csv(path, lines):
    path.write_text("userId,movieId,tag,timestamp\n" + "\n".join(lines) + "\n")
    return path


def test_tag_reader_normalises_and_drops_held_out_tags(hand):
    ds, split, tmp = hand
    f = _tags_csv(tmp / "tags.csv", [
        'a,10,"  Sci-Fi ",1',  # training pair: kept, normalised
        "a,11,SCI-FI,2",  # same tag after normalisation
        'a,11,"dark,  Gritty",3',  # quoted comma, inner spaces collapsed
        "a,13,spoiler,4",  # a's test target: would leak it
        "a,12,spoiler,5",  # a's validation target
        "a,15,never,6",  # a never had item 15
        "zz,10,ghost,7",  # unknown user
        "b,99,ghost,8",  # unknown item
        "c,10,   ,9",  # empty after stripping
    ])
    tags = build_tags(str(f), ds, split.train)
    assert tags.vocab["tag"].to_list() == ["dark, gritty", "sci-fi"]
    assert dict(zip(tags.vocab["tag"], tags.vocab["count"])) == {"sci-fi": 2, "dark, gritty": 1}
    r = tags.record
    assert (r["rows_read"], r["rows_kept"], r["dropped_held_out"], r["dropped_not_interacted"],
            r["dropped_unknown"], r["dropped_empty"]) == (9, 3, 2, 1, 2, 1)
    assert r["users_with_tags"] == 1 and r["items_with_tags"] == 2
    a = int(ds.encode_users(["a"])[0])
    i10, i11, i13 = (int(x) for x in ds.encode_items([10, 11, 13]))
    sci = int(tags.vocab.filter(pl.col("tag") == "sci-fi")["idx"][0])
    assert tags.user_tags.shape == (ds.n_users, 2) and tags.item_tags.shape == (ds.n_items + 1, 2)
    assert tags.user_tags[a, sci] == 2 and tags.item_tags[i10, sci] == 1 and tags.item_tags[i11, sci] == 1
    assert tags.item_tags[i13].nnz == 0 and tags.item_tags[0].nnz == 0  # nothing on the held-out item, nor padding
    # every tagged item is one of the tagging user's training items
    train = split.train_matrix
    assert set(tags.item_tags.nonzero()[0]) <= set(train[a].indices) and tags.user_tags.getnnz(1).nonzero()[0] == [a]
    # rare tags: min_count 2 keeps only sci-fi, counted
    rare = build_tags(f"{f}:2", ds, split.train)
    assert rare.vocab["tag"].to_list() == ["sci-fi"] and rare.record["rare_tags_dropped"] == 1


def test_tag_reader_headerless_lines(hand):
    ds, split, tmp = hand
    f = tmp / "tags.txt"
    f.write_text("a 10 Film Noir\nb 11 classic\n")
    rows = read_tag_rows(f)
    assert rows["tag"].to_list() == ["Film Noir", "classic"]
    tags = build_tags(str(f), ds, split.train)
    assert tags.vocab["tag"].to_list() == ["classic", "film noir"]
    f.write_text("a\t10\tfilm  noir\n")
    assert build_tags(str(f), ds, split.train).vocab["tag"].to_list() == ["film noir"]
    f.write_text("a 10\n")
    with pytest.raises(DataError, match="line 1"):
        build_tags(str(f), ds, split.train)


def test_tag_reader_auto_lookup_and_errors(hand):
    ds, split, tmp = hand
    src = tmp / "src"
    src.mkdir()
    with pytest.raises(DataError, match="meta"):  # the dataset does not say where it came from
        build_tags("auto", ds, split.train)
    ds.meta["source"] = str(src)
    with pytest.raises(DataError, match="tags.csv"):
        build_tags("auto", ds, split.train)
    _tags_csv(src / "tags.csv", ["a,10,x,1"])
    assert build_tags("auto", ds, split.train).record["source"] == str(src / "tags.csv")
    ds.meta["source"] = str(src / "ratings.csv")  # a file source: the folder beside it
    assert build_tags("auto", ds, split.train).vocab["tag"].to_list() == ["x"]
    with pytest.raises(DataError, match="no such file"):
        build_tags(str(tmp / "missing.csv"), ds, split.train)
    _tags_csv(src / "tags.csv", ["a,13,spoiler,1"])  # only a held-out tag: nothing left
    with pytest.raises(DataError, match="held out: 1"):
        build_tags("auto", ds, split.train)


# ---- tag intents ------------------------------------------------------------------------------------
def test_tag_intents_follow_the_items():
    import scipy.sparse as sp

    # tags 0-2 are given to items 1-5, tags 3-5 to items 6-10: two intents separate them
    m = np.zeros((11, 6), dtype=np.float32)
    m[1:6, 0:3] = 1
    m[6:11, 3:6] = 1
    m[3, 4] = 1  # a little overlap
    a = cluster_tags(sp.csr_matrix(m), 2, seed=0)
    assert len(set(a[:3])) == 1 and len(set(a[3:])) == 1 and a[0] != a[3]
    assert np.array_equal(a, cluster_tags(sp.csr_matrix(m), 2, seed=0))
    r = cluster_tags(sp.csr_matrix(m), 3, method="random", seed=1)
    assert r.shape == (6,) and r.min() >= 0 and r.max() < 3


# ---- the model -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """Synthetic data (300 users, 150 items) whose users tagged about half their interactions
    with the item's category (in varied spelling), also on held-out interactions (dropped):
    (split, valid, test, Pop's test NDCG@10)."""
    ds = prepare(make_synthetic(n_users=300, n_items=150, seed=0))
    split = leave_one_out(ds)
    rng = np.random.default_rng(0)
    inter = ds.interactions
    cat = dict(zip(ds.items["item_id"].to_list(), ds.items["category"].to_list()))
    users = ds.user_map.sort("idx")["raw"].to_list()
    items = dict(zip(ds.item_map["idx"].to_list(), ds.item_map["raw"].to_list()))
    lines = []
    for u, i in zip(inter["user_id"].to_list(), inter["item_id"].to_list()):
        if rng.random() < 0.5:
            tag = cat[i] if rng.random() < 0.5 else f" {cat[i].upper()} "
            lines.append(f'{users[u]},{items[i]},"{tag}",0')
    path = tmp_path_factory.mktemp("tags") / "tags.csv"
    _tags_csv(path, lines)
    split.tags = build_tags(str(path), ds, split.train)
    return (split, *evalsets(split))


def test_synthetic_tags_leave_out_the_targets(tagged):
    split, *_ = tagged
    rec = split.tags.record
    assert rec["dropped_held_out"] > 0 and rec["rows_kept"] > 0
    # no user carries a tag on their test target
    held = split.test.select("user_id", "item_id").to_numpy()
    ut = split.train_matrix
    assert not any(ut[u, i] for u, i in held)


def test_imca_beats_pop_and_records_its_tags(tagged):
    split, valid, test, pop = tagged
    model = create("imca", **FAST).fit(split, valid)
    assert_beats_pop(model, test, pop, margin=0.01, label="IMCA ")
    notes = model.protocol_notes()
    assert notes["tags"]["used_by_model"] and notes["tags"]["dropped_held_out"] > 0
    assert sum(notes["intents"]["tags_per_intent"]) == split.tags.n_tags
    # the other alignment (against the other intents) trains too
    other = create("imca", **{**FAST, "epochs": 4, "align_negatives": "intents"}).fit(split, None)
    assert ndcg(other, test) > 0.05


def test_imca_needs_tags(tagged):
    split, *_ = tagged
    bare = leave_one_out(prepare(make_synthetic(n_users=40, n_items=30, seed=1)))
    with pytest.raises(ConfigError, match=r"data.tags=PATH\|auto"):
        create("imca", **{**FAST, "epochs": 1}).fit(bare, None)


def test_imca_losses_reach_the_tags(tagged):
    split, *_ = tagged
    model = create("imca", **{**FAST, "epochs": 0}).fit(split, None)
    model.net_.train()
    batch = next(iter(model.train_batches(split, np.random.default_rng(0))))
    model.net_.zero_grad()
    model.loss(batch).backward()
    assert model.net_.tag.weight.grad is not None and model.net_.tag.weight.grad.abs().sum() > 0
    # with both contrastive terms off and ranking on the interaction view, the tags play no part
    plain = create("imca", **{**FAST, "epochs": 0, "ssl_weight": 0.0, "pair_weight": 0.0, "fuse": "cf"})
    plain.fit(split, None)
    plain.net_.zero_grad()
    plain.loss(batch).backward()
    assert plain.net_.tag.weight.grad is None or plain.net_.tag.weight.grad.abs().sum() == 0


def test_imca_deterministic_save_load_and_unknown_user(tagged, tmp_path):
    split, _, test, _ = tagged
    hist = test.histories.slice(0, 50)
    model, before = assert_deterministic_by_seed("imca", {**FAST, "epochs": 2}, split, hist)
    loaded, _ = assert_round_trip(model, hist, tmp_path / "imca", before=before)
    # an unknown user (-1) is folded in from the history items; an empty history scores finitely
    unknown = Histories(np.array([-1, hist.users[1], -1]), np.concatenate([hist.indptr[:3], hist.indptr[2:3]]),
                        hist.items[: hist.indptr[2]], hist.n_items)
    s = loaded.score(unknown)
    assert s.shape == (3, split.n_items + 1) and torch.isfinite(s).all()
    torch.testing.assert_close(s[1], before[1])
    assert not torch.equal(s[0], s[2])


@pytest.mark.parametrize("bad", [{"n_intents": 3}, {"n_intents": 0}, {"ssl_weight": -1.0}, {"pair_weight": -0.1},
                                 {"ssl_temp": 0.0}, {"fuse": "sum"}, {"tag_intents": "louvain"},
                                 {"align_negatives": "all"}])
def test_imca_bad_parameters(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        create("imca", **{**FAST, **bad})


def test_every_run_records_the_tags_and_whether_the_model_read_them(hand):
    from recforge import api
    from recforge import config as C

    ds, split, tmp = hand
    split.tags = build_tags(str(_tags_csv(tmp / "t.csv", ["a,10,x,1", "b,11,y,2"])), ds, split.train)
    cfg = C.base_config("lightgcn", "hand")
    plain = api._protocol_record(cfg, split, create("lightgcn"))
    assert plain["tags"]["used_by_model"] is False and plain["tags"]["rows_kept"] == 2
    assert api._protocol_record(cfg, split, create("imca"))["tags"]["used_by_model"] is True
