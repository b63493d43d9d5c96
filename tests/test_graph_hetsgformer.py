"""HetSGFormer + ILLE: linear global attention by hand, training on a block-structured graph task,
unknown users, determinism, persistence, bad parameters, and ILLE: weights by hand, a held-out
item placed by ILLE against its position after retraining with it, added items and users in the
scoring table, refreshes."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from graph_contract import assert_beats_pop, evalsets, ndcg
from recforge.data.prepare import prepare
from recforge.data.schema import RawData
from recforge.data.split import Split, leave_one_out
from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.models.base import Recommender
from recforge.models.graph.ille import ille_place, reconstruction_weights
from recforge.models.registry import create

FAST = {"verbose": False, "dim": 32, "batch_size": 256, "lr": 0.01, "epochs": 40, "eval_every": 4,
        "patience": 3, "valid_metric": "ndcg@10", "threads": 1}


def _block_log(n_users=240, n_items=60, groups=6, per_user=10, inside=0.9, seed=0) -> RawData:
    """Users and items in ``groups`` taste groups; a user's items come from their own group with
    probability ``inside`` (popularity skewed within the group), else from anywhere."""
    rng = np.random.default_rng(seed)
    item_group = np.arange(n_items) % groups
    pop = 1.0 / (1 + np.arange(n_items)) ** 0.5
    rows = []
    for u in range(n_users):
        g = u % groups
        own = np.flatnonzero(item_group == g)
        seen: set[int] = set()
        t = 0
        while len(seen) < per_user:
            pool = own if rng.random() < inside else np.arange(n_items)
            p = pop[pool] / pop[pool].sum()
            i = int(rng.choice(pool, p=p))
            if i not in seen:
                seen.add(i)
                rows.append((u, i + 1, t))
                t += 1
    df = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64}, orient="row")
    return RawData(df, name="blocks")


@pytest.fixture(scope="module")
def task():
    split = leave_one_out(prepare(_block_log()))
    return (split, *evalsets(split))


@pytest.fixture(scope="module")
def fitted(task):
    split, valid, _, _ = task
    return create("hetsgformer", **FAST, seed=0).fit(split, valid)


# ---- the attention ----------------------------------------------------------------------------
def test_global_attention_matches_the_quadratic_form(task):
    split = task[0]
    model = create("hetsgformer", **{**FAST, "epochs": 0, "alpha_res": 1.0}).fit(split, None)
    with torch.no_grad():
        x = model.ego()
        out = model.global_attention(x)
        nu = model.graph_users_
        q, k, v = torch.cat([model.net_.qkv[0](x[:nu]), model.net_.qkv[1](x[nu:])], 0).chunk(3, -1)
        real = torch.ones(len(x), dtype=torch.bool)
        real[nu] = False  # the padding item is no key and no value
        v = v * real.unsqueeze(1)  # the padding item's value is zero
        q, k = q / q.norm(), k[real] / k[real].norm()
        n = float(real.sum())
        a = q @ k.T  # the N x N form: the node's own value weighted N, every other key's by q.k
        expected = (n * v + a @ v[real]) / (n + a.sum(1, keepdim=True))
        np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)
    # per-type projections: a user and an item with the same input get different outputs
    assert not torch.allclose(model.net_.qkv[0].weight, model.net_.qkv[1].weight)


# ---- training and scoring ---------------------------------------------------------------------
def test_beats_pop_by_a_clear_margin(task, fitted):
    _, _, test, pop = task
    assert_beats_pop(fitted, test, pop)


def test_shared_identity_trains_and_beats_pop(task):
    split, valid, test, pop = task
    model = create("hetsgformer", **FAST, identity="shared").fit(split, valid)
    assert model.net_.user is model.net_.item
    assert model.net_.user.weight.shape[0] == max(split.n_users, split.n_items + 1)
    assert ndcg(model, test) > pop


def test_score_shapes_unknown_users_and_empty_history(task, fitted):
    split = task[0]
    hist = Histories.from_lists([0, -1, -1], [[1, 2], [3, 4, 5], []], split.n_items)
    s = fitted.score(hist)
    assert s.shape == (3, split.n_items + 1) and torch.isfinite(s).all()
    users, items = fitted.final_embeddings()
    np.testing.assert_allclose(s[1].numpy(), (items[[3, 4, 5]].mean(0) @ items.T).numpy(), rtol=1e-5)
    assert torch.all(s[2] == 0)  # nothing known: the zero vector, every item tied
    # the query vectors reproduce the scores (serving's ANN index relies on it)
    q = fitted.query_vectors(hist)
    np.testing.assert_allclose(q @ fitted.item_vectors().numpy().T, s.numpy(), rtol=1e-5, atol=1e-6)


def test_deterministic_by_seed_and_save_load(task, tmp_path):
    split = task[0]
    params = {**FAST, "epochs": 2, "seed": 5}
    a = create("hetsgformer", **params).fit(split, None)
    b = create("hetsgformer", **params).fit(split, None)
    hist = Histories.from_lists([0, 1, -1], [[1], [2, 3], [4]], split.n_items)
    assert torch.equal(a.score(hist), b.score(hist))
    a.add_items([[0, 1, 2]])
    a.refresh_users([3], [[7]])
    a.save(tmp_path / "m")
    c = Recommender.load(tmp_path / "m")
    assert c.n_items_ == split.n_items + 1 and c.get_params()["graph_weight"] == 0.8
    torch.testing.assert_close(c.score(hist), a.score(hist))


@pytest.mark.parametrize("bad", [{"graph_weight": 1.5}, {"alpha_res": -0.1}, {"identity": "mixed"},
                                 {"ille_k": 0}, {"ille_reg": 0.0}, {"loss": "mse"}])
def test_bad_parameters(bad):
    with pytest.raises(ConfigError):
        create("hetsgformer", **bad)


def test_ille_needs_a_fitted_model_and_known_neighbours(task, fitted):
    with pytest.raises(ConfigError, match="fit the model first"):
        create("hetsgformer").place_items([[0]])
    with pytest.raises(ConfigError, match="known users"):
        fitted.place_items([[task[0].n_users + 5]])


# ---- ILLE -------------------------------------------------------------------------------------
def test_lle_weights_by_hand():
    # items (rows) over users (columns): the new item has users {0, 1}; item 0 has {0, 1}, item 1 {1, 2}
    rows = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]], dtype=np.float32))
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    vec, cand, w = ille_place(rows, rows.T.tocsr(), emb, [0, 1], k=5, reg=1e-3)
    # item 2 shares nothing; item 0 is an exact copy and gets (almost) all the weight
    assert list(cand) == [0, 1] and abs(w.sum() - 1) < 1e-12 and w[0] > 0.99
    np.testing.assert_allclose(vec, w @ emb[[0, 1]])
    # two equally good neighbours share the weight equally
    w2 = reconstruction_weights(rows, np.array([0, 1]), np.array([1.0, 1.0]), 1, 1e-3)
    np.testing.assert_allclose(w2, [0.5, 0.5])


def _overlap_at_10(vec: np.ndarray, table: np.ndarray, exclude: int) -> set:
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    s = unit @ (vec / np.linalg.norm(vec))
    s[[0, exclude]] = -np.inf
    return set(np.argsort(-s)[:10].tolist())


def test_ille_placement_is_close_to_retraining_with_the_item(task, fitted):
    """Measure: overlap of the 10 nearest items (cosine over the item table) of the held-out item's
    ILLE placement in the model trained without it, and of the item itself in the model trained with
    it (``fitted``); the two models' spaces are not aligned, their neighbourhoods are comparable. The
    baselines are the mean item and random placements (the mean over 20 draws)."""
    split, valid, _, _ = task
    counts = np.asarray(split.train_matrix.sum(0)).ravel()
    overlaps, means, randoms = [], [], []
    rng = np.random.default_rng(0)
    _, with_items = fitted.final_embeddings()
    with_items = with_items.numpy()
    for held in np.argsort(-counts)[[5, 20, 35]]:  # a popular, a middling and a rarer item
        train = split.train.filter(pl.col("item_id") != held)
        without = create("hetsgformer", **FAST, seed=0).fit(
            Split(train, split.valid, split.test, split.n_users, split.n_items, split.protocol), valid)
        users = split.train.filter(pl.col("item_id") == held)["user_id"].to_numpy()
        placed = without.place_items([users])[0]
        _, items = without.final_embeddings()
        items = items.numpy().copy()
        truth = _overlap_at_10(with_items[held], with_items, held)
        overlaps.append(len(_overlap_at_10(placed, items, held) & truth))
        means.append(len(_overlap_at_10(items[1:].mean(0), items, held) & truth))
        randoms.append(np.mean([len(_overlap_at_10(rng.normal(size=items.shape[1]), items, held) & truth)
                                for _ in range(20)]))
    ille, mean, rand = np.mean(overlaps), np.mean(means), np.mean(randoms)
    print(f"nearest-10 overlap with the retrained item: ILLE {ille:.2f}, mean item {mean:.2f}, random {rand:.2f}")
    assert ille >= mean + 2 and ille >= rand + 2, (overlaps, means, randoms)


def test_add_items_and_users_extend_the_scoring_table(task):
    split = task[0]
    model = create("hetsgformer", **{**FAST, "epochs": 3}).fit(split, None)
    n = split.n_items
    base = model.score(Histories.from_lists([0], [[1]], n))
    users = split.train.filter(pl.col("item_id") == 3)["user_id"].to_numpy()
    expected = model.place_items([users])[0]  # before adding: afterwards the item is its own neighbour
    idx = model.add_items([users, []])
    assert list(idx) == [n + 1, n + 2] and model.n_items_ == n + 2
    s = model.score(Histories.from_lists([0], [[1]], n))  # a history of the old width still scores
    assert s.shape == (1, n + 3)
    torch.testing.assert_close(s[:, : n + 1], base)  # the trained items are untouched
    _, items = model.final_embeddings()
    np.testing.assert_allclose(items[n + 1].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(items[n + 2].numpy(), items[1 : n + 1].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    # the added item is a candidate for the next placement
    assert model.links_[:, n + 1].nnz == len(set(users.tolist())) and model.links_[:, n + 2].nnz == 0
    # users: a new user of items 1 and 2 becomes known under the next index
    (u,) = model.add_users([[1, 2]])
    assert u == split.n_users and model.n_users_ == split.n_users + 1
    row = model.score(Histories.from_lists([u], [[]], model.n_items_))
    users_e, items_e = model.final_embeddings()
    torch.testing.assert_close(row[0], users_e[u] @ items_e.T)


def test_refresh_moves_a_node_by_the_share_of_new_edges(task):
    split = task[0]
    model = create("hetsgformer", **{**FAST, "epochs": 2}).fit(split, None)
    users_e, _ = model.final_embeddings()
    old = users_e[0].numpy().copy()
    deg = int(model.links_[0].nnz)
    new_items = [i for i in range(1, 6) if model.links_[0, i] == 0][:2]
    full = sorted(set(model.links_[0].indices.tolist()) | set(new_items))
    placed = model._place("user", [full], exclude=[0])[0]
    model.refresh_users([0], [new_items])
    share = len(new_items) / (deg + len(new_items))
    users_e, _ = model.final_embeddings()
    np.testing.assert_allclose(users_e[0].numpy(), (1 - share) * old + share * placed, rtol=1e-4, atol=1e-6)
    assert model.links_[0].nnz == deg + len(new_items)
