"""MHCN and the social-link reader: motif-induced hypergraphs by hand and by enumeration, the
reader's counts and ``auto`` lookup, training on a task where friends share items, unknown users,
determinism and persistence."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from graph_contract import assert_beats_pop, assert_deterministic_by_seed, assert_round_trip, assert_unknown_user, ndcg
from recforge.data.prepare import prepare
from recforge.data.schema import RawData
from recforge.data.social import AUTO_NAMES, Social, build_social, read_social
from recforge.data.split import leave_one_out
from recforge.errors import ConfigError, DataError
from recforge.evaluation.batch import Histories
from recforge.models.general.pop import Pop
from recforge.models.graph.mhcn import channel_matrices, motif_matrices, normalize_channel
from recforge.models.registry import create
from recforge.pipeline import eval_sets, load_dataset, split_dataset

FAST = {"verbose": False, "dim": 32, "batch_size": 256, "lr": 0.01, "epochs": 30, "eval_every": 3,
        "patience": 3, "valid_metric": "ndcg@10", "threads": 1}


# ---- motif-induced hypergraphs ------------------------------------------------------------------
def _dense(m):
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def test_motif_matrices_by_hand():
    # users 0, 1, 2 all mutually linked (one M4 triangle); 2 -> 3 -> 4 -> 2 a one-way cycle (one M1);
    # items: 0 {1, 3}, 1 {1}, 2 {1, 2}, 3 {1, 2}, 4 {3}, 5 {4} (no links)
    links = [(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0), (2, 3), (3, 4), (4, 2)]
    s = sp.csr_matrix((np.ones(len(links)), tuple(zip(*links))), shape=(6, 6))
    y = sp.csr_matrix(np.array([[0, 1, 0, 1, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0],
                                [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]], dtype=np.float32))
    a = motif_matrices(s, y)
    triangle = np.zeros((6, 6))
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        triangle[i, j] = triangle[j, i] = 1
    np.testing.assert_array_equal(_dense(a["A4"]), triangle)
    cycle = np.zeros((6, 6))
    for i, j in [(2, 3), (3, 4), (2, 4)]:
        cycle[i, j] = cycle[j, i] = 1
    np.testing.assert_array_equal(_dense(a["A1"]), cycle)
    for k in (2, 3, 5, 6, 7):
        assert a[f"A{k}"].nnz == 0, f"A{k}"
    # joint motifs: common items over a mutual link (A8) or a one-way link (A9, both directions)
    a8, a9, a10 = _dense(a["A8"]), _dense(a["A9"]), _dense(a["A10"])
    assert a8[0, 1] == a8[1, 0] == 1 and a8[0, 2] == 1 and a8[1, 2] == 1 and a8.sum() == 6
    assert a9[2, 3] == a9[3, 2] == 2 and a9[3, 4] == 0 and a9[2, 4] == 0 and a9.sum() == 4
    # purchase motif: common items without a link (0-3 share item 1, 0-4 item 3, 1-3 item 1), plus the
    # diagonal (own item counts) as in the authors' code; user 5 shares nothing
    assert a10[0, 3] == a10[3, 0] == 1 and a10[0, 4] == 1 and a10[1, 3] == 1
    assert a10[0, 1] == 0 and a10[2, 3] == 0 and not a10[5, :5].any()
    np.testing.assert_array_equal(np.diag(a10), [2, 1, 2, 2, 1, 1])
    ch = channel_matrices(s, y, purchase_min=1)
    np.testing.assert_array_equal(_dense(ch["social"]), triangle + cycle)
    np.testing.assert_array_equal(_dense(ch["joint"]), a8 + a9)
    np.testing.assert_array_equal(_dense(ch["purchase"]), np.where(a10 > 1, a10, 0))
    row = normalize_channel(ch["social"], "row").toarray()
    np.testing.assert_allclose(row.sum(1), [1, 1, 1, 1, 1, 0], rtol=1e-6)
    sym = normalize_channel(ch["social"], "sym").toarray()
    np.testing.assert_allclose(sym, sym.T, rtol=1e-6)


def _triangle_kind(s: np.ndarray, a: int, b: int, c: int) -> int | None:
    """The social motif (1..7) of the triangle a, b, c, or None when a pair is unlinked."""
    pairs = [(a, b), (b, c), (a, c)]
    if any(not (s[x, y] or s[y, x]) for x, y in pairs):
        return None
    mutual = [(x, y) for x, y in pairs if s[x, y] and s[y, x]]
    if len(mutual) == 3:
        return 4
    if len(mutual) == 2:
        return 3
    if not mutual:
        outs = [sum(bool(s[x, y]) for y in (a, b, c) if y != x) for x in (a, b, c)]
        return 1 if outs == [1, 1, 1] else 5  # the one-way cycle, else the transitive triangle
    x, y = mutual[0]
    z = ({a, b, c} - {x, y}).pop()
    out_x, out_y = bool(s[z, x]), bool(s[z, y])
    if out_x and out_y:
        return 6  # z links to both ends of the mutual link
    if not out_x and not out_y:
        return 7  # both ends link to z
    return 2  # a cycle through the mutual link


def test_social_motifs_match_enumeration():
    rng = np.random.default_rng(1)
    n = 14
    s = (rng.random((n, n)) < 0.3).astype(np.float32)
    np.fill_diagonal(s, 0)
    expected = {k: np.zeros((n, n)) for k in range(1, 8)}
    for a, b, c in itertools.combinations(range(n), 3):
        k = _triangle_kind(s, a, b, c)
        if k:
            for x, y in ((a, b), (b, c), (a, c)):
                expected[k][x, y] += 1
                expected[k][y, x] += 1
    got = motif_matrices(sp.csr_matrix(s), sp.csr_matrix((n, 5), dtype=np.float32))
    for k in range(1, 8):
        assert expected[k].sum() > 0, f"M{k} absent from the random graph"
        np.testing.assert_array_equal(_dense(got[f"A{k}"]), expected[k], err_msg=f"A{k}")


# ---- reader -------------------------------------------------------------------------------------
def _dataset(n_users: int = 5, n_items: int = 4):
    rows = [(100 + u, 1 + (u + k) % n_items, k) for u in range(n_users) for k in range(3)]
    df = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64}, orient="row")
    return prepare(RawData(df, name="hand"))


def test_reader_counts_and_directions(tmp_path):
    ds = _dataset()  # raw users 100..104 -> 0..4
    f = tmp_path / "links.txt"
    f.write_text("user\tfriend\n100\t101\n101\t100\n100\t102\n102\t102\n103\t999\n998\t100\n100\t101\n104\t103\t0.5\n")
    soc = read_social(f, ds)
    r = soc.record
    assert r["links_read"] == 8 and r["dropped_unknown_users"] == 2 and r["dropped_self_links"] == 1
    assert r["dropped"] == 3 and r["kept"] == 4 and r["duplicates"] == 1 and r["reciprocal_in_file"] == 2
    assert not r["directed"]
    m = soc.matrix.toarray()
    assert soc.matrix.shape == (5, 5) and np.array_equal(m, m.T) and soc.n_links == 6
    assert m[0, 2] == m[2, 0] == 1 and m[4, 3] == m[3, 4] == 1 and not np.diag(m).any()
    directed = build_social(f"{f}:directed", ds)
    d = directed.matrix.toarray()
    assert directed.record["directed"] and directed.n_links == 4
    assert d[0, 2] == 1 and d[2, 0] == 0 and d[0, 1] == d[1, 0] == 1
    # space-separated without a header
    g = tmp_path / "spaces.txt"
    g.write_text("100 103\n101  104\n")
    assert read_social(g, ds).record["links_read"] == 2 and read_social(g, ds).n_links == 4
    with pytest.raises(DataError, match="none of its"):
        h = tmp_path / "strangers.txt"
        h.write_text("1 2\n3 4\n")
        read_social(h, ds)
    with pytest.raises(DataError, match="no such file"):
        build_social(tmp_path / "missing.txt", ds)


def test_auto_lookup_and_its_error(tmp_path):
    ds = _dataset()
    ds.meta["source"] = str(tmp_path / "ratings.csv")
    with pytest.raises(DataError) as err:
        build_social("auto", ds)
    assert all(name in str(err.value) for name in AUTO_NAMES) and "data.social=PATH" in str(err.value)
    (tmp_path / "trust.txt").write_text("100 101\n")
    assert build_social("auto", ds).record["source"].endswith("trust.txt")
    (tmp_path / "social.txt").write_text("100 102\n102 103\n")
    soc = build_social("auto", ds)  # social.txt comes before trust.txt
    assert soc.record["source"].endswith("social.txt") and soc.record["found_by"] == "auto" and soc.n_links == 4
    ds.meta.pop("source")
    with pytest.raises(DataError, match="not known"):
        build_social("auto", ds)


def test_auto_finds_the_lastfm_trust_network_through_the_pipeline(tmp_path):
    # LightGCN's Last.fm layout: data1.txt / test1.txt and trustnetwork.txt beside them
    rng = np.random.default_rng(0)
    train = "\n".join(f"{u}\t{i}\t{rng.integers(1, 50)}"
                      for u in range(1, 9) for i in rng.choice(20, 4, replace=False) + 1)
    (tmp_path / "data1.txt").write_text(train + "\n")
    (tmp_path / "test1.txt").write_text("\n".join(f"{u}\t{21 + u}\t3" for u in range(1, 9)) + "\n")
    (tmp_path / "trustnetwork.txt").write_text("1\t2\n2\t1\n3\t4\n5\t77\n")
    cfg = {"data": {"path": str(tmp_path), "social": "auto"}, "split": {"method": "auto"}}
    ds = load_dataset(cfg["data"])
    split = split_dataset(ds, cfg)
    assert isinstance(split.social, Social)
    assert split.social.record["dropped_unknown_users"] == 1 and split.social.n_links == 4


# ---- the model ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def friends(tmp_path_factory):
    """10 groups of 20 users; a user has 5 of their group's 8 items (plus, for half of them, one of 6
    globally popular items); links inside groups (and a few across). (split, valid, test, social)."""
    rng = np.random.default_rng(0)
    groups, size, per_group = 10, 20, 8
    rows, t = [], 0
    for g in range(groups):
        items = np.arange(per_group) + 1 + g * per_group
        for k in range(size):
            u = 1000 + g * size + k
            chosen = list(rng.choice(items, 5, replace=False))
            if rng.random() < 0.5:
                chosen.insert(int(rng.integers(0, 4)), 1 + groups * per_group + int(rng.integers(0, 6)))
            for i in chosen:
                rows.append((u, int(i), t))
                t += 1
    df = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64}, orient="row")
    ds = prepare(RawData(df, name="friends"))
    lines = []
    for g in range(groups):
        members = 1000 + g * size + np.arange(size)
        for a, b in itertools.combinations(members, 2):
            if rng.random() < 0.3:
                lines.append(f"{a}\t{b}")
    for _ in range(30):
        a, b = rng.integers(1000, 1000 + groups * size, 2)
        lines.append(f"{a}\t{b}")
    f = tmp_path_factory.mktemp("friends") / "trustnetwork.txt"
    f.write_text("\n".join(lines) + "\n")
    split = leave_one_out(ds)
    split.social = build_social(f, ds)
    valid, test = eval_sets(split)
    return split, valid, test


@pytest.fixture(scope="module")
def fitted(friends):
    split, valid, _ = friends
    return create("mhcn", **FAST).fit(split, valid)


def test_beats_pop_where_friends_share_items(friends, fitted):
    split, _, test = friends
    assert_beats_pop(fitted, test, ndcg(Pop().fit(split), test), label="MHCN ")
    notes = fitted.protocol_notes()
    assert notes["social"]["source"].endswith("trustnetwork.txt")
    assert set(notes["channels"]) == {"social", "joint", "purchase"}
    assert all(c["nnz"] > 0 for c in notes["channels"].values())


def test_needs_social_links(friends):
    split, _, _ = friends
    from dataclasses import replace

    with pytest.raises(ConfigError, match=r"data\.social=PATH\|auto"):
        create("mhcn", **FAST).fit(replace(split, social=None), None)
    wrong = Social(sp.csr_matrix((3, 3), dtype=np.float32))
    with pytest.raises(DataError, match="same dataset"):
        create("mhcn", **FAST).fit(replace(split, social=wrong), None)


def test_unknown_users_and_save_load(friends, fitted, tmp_path):
    split, _, test = friends
    hist = test.histories.slice(0, 20)
    loaded, before = assert_round_trip(fitted, hist, tmp_path / "mhcn")
    # user -1 (unknown) is folded in from its history items (the mean of their final embeddings); a
    # known user keeps its own row
    assert_unknown_user(loaded, hist, before, known=hist.users[0])
    empty = Histories.from_lists([-1], [[]], split.n_items)
    assert torch.isfinite(loaded.score(empty)).all()


def test_deterministic_by_seed_and_ssl_matters(friends):
    split, _, test = friends
    params = {**FAST, "epochs": 2, "seed": 5}
    hist = test.histories.slice(0, 30)
    _, a = assert_deterministic_by_seed("mhcn", params, split, hist, seeds=(5, 6))
    d = create("mhcn", **{**params, "ssl_weight": 0.0}).fit(split, None).score(hist)
    assert not torch.equal(a, d)


def test_self_supervised_loss_has_gradients(friends):
    split, _, _ = friends
    model = create("mhcn", **{**FAST, "epochs": 0, "norm": "sym", "ssl_normalize": False}).fit(split, None)
    rng = np.random.default_rng(0)
    batch = model.make_batch(np.arange(64), rng)
    assert batch["rows"].shape == (3, 3, split.n_users) and batch["cols"].shape == (3, 2, model.dim)
    users, _ = model.propagate()
    ssl = model.self_supervised_loss(users, batch["rows"], batch["cols"])
    assert torch.isfinite(ssl) and ssl.item() > 0
    ssl.backward()
    assert model.net_.ssl_gate[0].weight.grad.abs().sum() > 0 and model.net_.user.weight.grad.abs().sum() > 0


def test_bad_parameters():
    with pytest.raises(ConfigError, match="norm"):
        create("mhcn", norm="max")
    with pytest.raises(ConfigError, match="n_layers"):
        create("mhcn", n_layers=0)
    with pytest.raises(ConfigError, match="ssl_weight"):
        create("mhcn", ssl_weight=-1)
    with pytest.raises(ConfigError, match="purchase_min"):
        create("mhcn", purchase_min=-1)
