"""APGL4SR: the global graph (training data only), its low-rank views against the dense graphs
they stand for, the graph loss, causality, padding, scoring, training, persistence."""

import numpy as np
import polars as pl
import pytest
import torch

from recforge.data.prepare import prepare
from recforge.data.split import leave_one_out
from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.models.registry import create
from recforge.models.sequential.apgl4sr import normalise, svd_factors, transition_graph
from seq_contract import (FAST, PADDED, assert_beats_popularity, assert_causal, assert_deterministic,
                          assert_padding_free, assert_round_trip, assert_rows_alone, assert_scores, evalsets,
                          markov_data, rows_of_many_lengths, synthetic, unfitted)


@pytest.fixture(scope="module")
def data():
    return markov_data()


@pytest.fixture(scope="module")
def fitted(data):
    split, valid, _ = data
    return create("apgl4sr", **FAST).fit(split, valid)


def built(**kw):
    """An unfitted model with a graph from a few fixed sequences over 20 items."""
    seqs = [[1, 2, 3, 4, 5, 6], [3, 4, 5, 11, 12], [7, 8, 9, 10, 1, 2], [13, 14, 15, 16, 17, 18, 19, 20]]

    def graph(m):
        m.fit_graph(np.cumsum([0] + [len(s) for s in seqs]), np.concatenate(seqs))

    m = unfitted("apgl4sr", setup=graph, max_len=8, verbose=False, **kw)
    with torch.no_grad():  # a clearly non-zero user weight and learned part
        m.net_.user.weight.normal_(0, 1)
        if m.net_.p is not None:
            m.net_.p.normal_(0, 0.3)
            m.net_.q.normal_(0, 0.3)
    return m


# ---- the global graph --------------------------------------------------------------------------
def test_transition_graph_weights_and_normalisation():
    indptr, items = np.array([0, 4, 6]), np.array([1, 2, 3, 1, 2, 3])
    a = transition_graph(indptr, items, 4, window=2).toarray()
    # sequences [1, 2, 3, 1] and [2, 3]; C: 1->2 (1), 2->3 (1 + 1: both sequences), 3->1 (1),
    # at distance 2: 1->3 (1/2), 2->1 (1/2)
    c = np.zeros((5, 5))
    c[1, 2], c[2, 3], c[3, 1], c[1, 3], c[2, 1] = 1, 2, 1, 0.5, 0.5
    expected = c + c.T + np.diag([0, 1, 1, 1, 1])
    np.testing.assert_allclose(a, expected)
    index, adj, prop = normalise(transition_graph(indptr, items, 4, window=2))
    deg = (expected > 0).sum(1)
    inv = np.divide(1.0, deg, out=np.zeros(5), where=deg > 0)
    dense_adj = np.zeros((5, 5))
    dense_adj[index[0], index[1]] = adj
    np.testing.assert_allclose(dense_adj, inv[:, None] * expected + expected * inv[None, :], rtol=1e-6)
    dense_prop = np.zeros((5, 5))
    dense_prop[index[0], index[1]] = prop
    np.testing.assert_allclose(dense_prop, np.sqrt(inv[:, None] * inv[None, :]) * (expected > 0), rtol=1e-6)
    keys = index[0] * 5 + index[1]
    assert np.all(np.diff(keys) > 0)  # row-major sorted: the lookup's keys
    assert not np.any(index == 0)  # the padding item has no edge


def test_graph_is_built_from_training_data_only():
    raw = synthetic()
    inter = raw.interactions
    last = inter.group_by("user_id").agg(pl.col("timestamp").max())
    # a new item, each user's very last interaction: it is only ever a test target
    extra = last.head(30).with_columns(pl.lit(10_000).cast(inter["item_id"].dtype).alias("item_id"),
                                      (pl.col("timestamp") + 1).alias("timestamp"))
    raw.interactions = pl.concat([inter, extra.select(inter.columns)], how="diagonal_relaxed")
    ds = prepare(raw)
    split = leave_one_out(ds)
    new = int(ds.item_map.filter(pl.col("raw").cast(pl.Utf8) == "10000")["idx"][0])
    assert new in set(split.test["item_id"].to_list())
    assert new not in set(split.train["item_id"].to_list()) | set(split.valid["item_id"].to_list())
    m = create("apgl4sr", **FAST | dict(epochs=1)).fit(split, evalsets(split)[0])
    row, col = m.graph_["index"].numpy()
    off = row != col
    assert not np.any(row[off] == new) and not np.any(col[off] == new)  # no edge of a test item
    # the whole graph is the training sequences' graph
    a = transition_graph(*split.train_sequences, split.n_items, 2)
    index, adj, _ = normalise(a)
    assert np.array_equal(index, m.graph_["index"].numpy()) and np.allclose(adj, m.graph_["adj"].numpy())
    # and every edge joins two items at most 2 apart in some training sequence
    indptr, items = split.train_sequences
    seg = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    pairs = set()
    for d in (1, 2):
        same = seg[:-d] == seg[d:]
        pairs |= set(zip(items[:-d][same].tolist(), items[d:][same].tolist()))
        pairs |= set(zip(items[d:][same].tolist(), items[:-d][same].tolist()))
    assert set(zip(row[off].tolist(), col[off].tolist())) == pairs


# ---- the low-rank views against the dense graphs -----------------------------------------------
def dense(m, values):
    return m.net_.sparse(values).to_dense()


def test_learned_view_equals_the_dense_adaptive_graph():
    m = built(graph_rank=6, graph_layers=3)
    with torch.no_grad():
        fast = m.propagate(True)
        net = m.net_
        a, s = dense(m, net.g_adj), dense(m, net.g_prop)
        graph = s + m.graph_noise * (a @ net.p) @ (a @ net.q).T  # the dense N x N graph
        emb = net.item.weight[: net.n_nodes]
        layers = [emb]
        for _ in range(3):
            layers.append(graph @ layers[-1])
        slow = torch.stack(layers).mean(0)
        fixed = torch.stack([emb, s @ emb, s @ s @ emb, s @ s @ s @ emb]).mean(0)
    # tolerance: float32 rounding of a few products of 21 x 21 matrices
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.propagate(False).detach(), fixed, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fast, fixed, atol=1e-4)  # the learned part changes the view


def test_svd_view_approximates_the_dense_graph():
    torch.manual_seed(0)
    m = built(graph_view="svd")
    a = dense(m, m.net_.g_adj)
    n = a.shape[0]
    # full rank: the factors reproduce the dense graph (tolerance: float32 SVD of a 21 x 21 matrix)
    us, v = svd_factors(m.net_.sparse(m.net_.g_adj), n)
    torch.testing.assert_close(us @ v.T, a, rtol=0, atol=1e-4)
    # truncated: the error is the best rank-r error (Eckart-Young: the (r+1)-th singular value),
    # within 5% for the randomised SVD
    sigma = torch.linalg.svdvals(a)
    for r in (4, 8, 12):
        us, v = svd_factors(a, r)
        err = torch.linalg.matrix_norm(a - us @ v.T, ord=2)
        assert err <= 1.05 * sigma[r] + 1e-5
    # the svd view propagates through the truncated SVD
    m.graph_rank = 8
    m.before_training(None)
    us, v = m._svd
    with torch.no_grad():
        emb = m.net_.item.weight[:n]
        expected = torch.stack([emb, us @ (v.T @ emb), us @ (v.T @ (us @ (v.T @ emb)))]).mean(0)
        torch.testing.assert_close(m.propagate(True), expected)


# ---- the losses --------------------------------------------------------------------------------
def test_graph_loss_is_finite_and_weight_zero_is_sasrec(data):
    split, _, _ = data
    m = create("apgl4sr", **FAST, dropout=0.0)
    m.n_users_, m.n_items_ = split.n_users, split.n_items
    m.prepare_fit(split)
    torch.manual_seed(0)
    m.net_ = m.build(split.n_users, split.n_items)
    m.before_training(split)
    batch = m.make_batch(np.arange(32), np.random.default_rng(0))
    hidden = m.encode(batch["inp"], batch["user"])
    extra = m.extra_loss(batch, hidden)
    assert torch.isfinite(extra) and float(extra.detach()) > 0
    extra.backward()
    assert m.net_.p.grad.abs().sum() > 0 and m.net_.item.weight.grad.abs().sum() > 0
    # weight 0: exactly the next-item loss; with att_bias 0 also SASRec's network and loss
    m.gcl_weight = 0.0
    rec = m.next_item_loss(m.encode(batch["inp"], batch["user"]), batch["tgt"], None)
    assert m.extra_loss(batch, hidden) is None and torch.equal(m.loss(batch), rec)
    m.att_bias = 0.0
    s = create("sasrec", **FAST, dropout=0.0)
    s.n_users_, s.n_items_ = split.n_users, split.n_items
    s.prepare_fit(split)
    s.net_ = s.build(split.n_users, split.n_items)
    missing, unexpected = m.net_.load_state_dict(s.net_.state_dict(), strict=False)
    assert not unexpected and all(k.split(".")[0] in ("user", "adapt", "p", "q") for k in missing)
    torch.testing.assert_close(m.loss(batch), s.loss(s.make_batch(np.arange(32), np.random.default_rng(0))))


# ---- architecture ------------------------------------------------------------------------------
@pytest.mark.parametrize("bias_graph", ["fixed", "adaptive"])
def test_causality(bias_graph):
    m = built(bias_graph=bias_graph)
    assert_causal(lambda seqs: m.encode(seqs, torch.tensor([0, -1])))


def test_bias_changes_the_output_and_depends_on_the_user():
    m = built(bias_graph="adaptive")
    seqs = torch.tensor([[1, 2, 3, 4, 5, 6, 1, 2]] * 2)
    with torch.no_grad():
        biased = m.encode(seqs, torch.tensor([0, 1]))
        adaptive = biased[0]
        m.bias_graph = "fixed"
        fixed = m.encode(seqs[:1], torch.tensor([0]))[0]
        m.att_bias = 0.0
        plain = m.encode(seqs[:1])[0]
    assert not torch.allclose(biased[0], biased[1], atol=1e-5)  # per-user weights
    assert not torch.allclose(adaptive, fixed, atol=1e-5) and not torch.allclose(fixed, plain, atol=1e-5)


def test_padding_does_not_matter():
    assert_padding_free(built().encode, PADDED, torch.tensor([2, 3]))


def test_rows_of_many_lengths():
    lengths, seqs, g = rows_of_many_lengths()

    def graph(m):
        m.fit_graph(np.array([0, 600]), torch.randint(1, 100, (600,), generator=g).numpy())

    m = unfitted("apgl4sr", 10, 99, setup=graph, max_len=40, hidden=16, n_heads=2, inner=32, verbose=False)
    with torch.no_grad():
        m.net_.user.weight.normal_(0, 1)
    assert_rows_alone(m.encode, lengths, seqs, torch.arange(10))


def test_score_shapes_empty_history_and_unknown_user():
    m = built()
    s = assert_scores(m, [-1, -1, 0, 3], [[1, 2, 3], [], list(range(1, 20)), [1, 2, 3]], 20)
    # an unknown user gets the weight of the mean user embedding
    with torch.no_grad():
        w = m.user_weight(torch.tensor([-1, 7, 0]))
        mean = m.att_bias * m.net_.adapt(m.net_.user.weight.mean(0, keepdim=True)).squeeze(1)
    torch.testing.assert_close(w[:2], mean.expand(2))
    assert not torch.allclose(s[0], s[3])  # a known user's own weight changes the scores


# ---- training ----------------------------------------------------------------------------------
def test_beats_popularity(data, fitted):
    assert_beats_popularity(fitted, data)


def test_svd_view_trains(data):
    split, valid, _ = data
    m = create("apgl4sr", **FAST | dict(epochs=1), graph_view="svd").fit(split, valid)
    assert np.isfinite(m.history_["epochs"][0]["loss"])


def test_deterministic_by_seed(data):
    assert_deterministic("apgl4sr", FAST | dict(epochs=2, seed=7), data)


def test_save_load_round_trip(data, fitted, tmp_path):
    back = assert_round_trip(fitted, data[2], tmp_path / "apgl4sr")
    hist = Histories.from_lists([-1, 3], [[4, 5, 6], [7, 8]], fitted.n_items_)
    assert torch.equal(fitted.score(hist), back.score(hist))


def test_protocol_notes(fitted):
    notes = fitted.protocol_notes()
    assert notes["subsequence_split"] == "none" and notes["loss"] == "ce"
    assert notes["gcl_weight"] == 0.1 and notes["graph_rank"] == 4 * fitted.hidden


@pytest.mark.parametrize("kw,word", [
    (dict(window=0), "window"), (dict(graph_layers=0), "graph_layers"), (dict(graph_rank=0), "graph_rank"),
    (dict(graph_noise=-0.1), "graph_noise"), (dict(graph_view="dense"), "graph_view"),
    (dict(gcl_weight=-1), "gcl_weight"), (dict(graph_temperature=0), "graph_temperature"),
    (dict(att_bias=-1), "att_bias"), (dict(bias_graph="learned"), "bias_graph"),
    (dict(bias_graph="adaptive", graph_view="svd"), "bias_graph"), (dict(loss="hinge"), "loss"),
])
def test_bad_parameters(kw, word):
    with pytest.raises(ConfigError, match=word):
        create("apgl4sr", **kw)
