"""Fidelity of the graph models to their authors' code, on examples small enough to work by hand:
CPR's averaged matched / crossed scores, SGL's contrast against all users / all items, and the
pieces of SGCL (joint user+item symmetric contrast with the positive counted twice, negative
mixup, L2 on the final embeddings, edge-dropout views) plus a check that SGCL learns."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from recforge.data.split import Split
from recforge.evaluation.evaluator import evaluate
from recforge.models.graph.sgcl import SGCL
from recforge.models.registry import create
from recforge.training.graph_losses import cpr_loss, info_nce, info_nce_all, symmetric_contrastive_loss

E = math.e


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _tiny_split(n_users: int = 3, n_items: int = 3) -> Split:
    # u0: items 1, 2; u1: item 2; u2: item 3
    train = pl.DataFrame({"user_id": [0, 0, 1, 2], "item_id": [1, 2, 2, 3]})
    return Split(train=train, valid=train.clear(), test=train.clear(), n_users=n_users, n_items=n_items)


def _model_with_weights(name: str, users: list, items: list, **params):
    """A model prepared on the tiny split whose ego embeddings are set by hand (items[0] is the
    padding item)."""
    split = _tiny_split(len(users), len(items) - 1)
    model = create(name, verbose=False, dim=len(users[0]), **params)
    model.n_users_, model.n_items_ = split.n_users, split.n_items
    model.prepare_fit(split)
    model.net_ = model.build(split.n_users, split.n_items)
    with torch.no_grad():
        model.net_.user.weight.copy_(torch.tensor(users, dtype=torch.float32))
        model.net_.item.weight.copy_(torch.tensor(items, dtype=torch.float32))
    return model


# ---- CPR ----------------------------------------------------------------------------------------------
def test_cpr_k2_averages_matched_and_crossed_scores_by_hand():
    # users u0 = (1, 0), u1 = (0, 1); items i1 = (2, 1), i2 = (1, 3); one group {(u0, i1), (u1, i2)}
    # matched: s(u0, i1) = 2, s(u1, i2) = 3; crossed: s(u0, i2) = 1, s(u1, i1) = 1
    # authors (mean): -log σ((2 + 3)/2 - (1 + 1)/2) = softplus(-1.5) = 0.201413
    # sum (k = 2 times the logit): softplus(-(5 - 2)) = softplus(-3) = 0.048587
    assert softplus(-1.5) == pytest.approx(0.201413, abs=1e-6)
    pos, cross = torch.tensor([[2.0, 3.0]]), torch.tensor([[1.0, 1.0]])
    assert cpr_loss(pos, cross).item() == pytest.approx(softplus(-1.5))
    assert cpr_loss(pos, cross, "sum").item() == pytest.approx(softplus(-3.0))
    # the same through LightGCN (0 layers: the scores are the ego dot products), no L2
    users = [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]  # user 2 and item 3 only complete the tiny split
    items = [[0.0, 0.0], [2.0, 1.0], [1.0, 3.0], [0.0, 0.0]]
    batch = {"users": torch.tensor([[0, 1]]), "items": torch.tensor([[1, 2]]), "cross": torch.tensor([[2, 1]])}
    for reduce, expected in (("mean", softplus(-1.5)), ("sum", softplus(-3.0))):
        model = _model_with_weights("lightgcn", users, items, n_layers=0, reg=0.0, loss="cpr", cpr_reduce=reduce)
        u, i = model.propagate()
        loss = model.rank_loss(batch, u, i)
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        # gradient of a matched score: -σ(-logit) / k with the mean, -σ(-logit) with the sum
        loss.backward()
        sig = 1 / (1 + math.exp(1.5)) / 2 if reduce == "mean" else 1 / (1 + math.exp(3.0))
        # d loss / d u0 = -sig * i1 + sig * i2 = sig * (i2 - i1) = sig * (-1, 2)
        np.testing.assert_allclose(model.net_.user.weight.grad[0].numpy(), [-sig, 2 * sig], rtol=1e-5)
    assert create("lightgcn").cpr_reduce == "mean"


# ---- SGL: InfoNCE against all users / all items ---------------------------------------------------------
def _sgl_with_tables(u1, u2, i1, i2, **params):
    model = create("sgl", verbose=False, ssl_weight=1.0, ssl_temp=1.0, **params)
    tables = {"view1": (torch.tensor(u1), torch.tensor(i1)), "view2": (torch.tensor(u2), torch.tensor(i2))}
    model._views = ("view1", "view2")
    model.propagate = lambda adj=None, noise_eps=0.0: tables[adj]
    return model


# view 1 / view 2 of 3 users and of 2 items (+ the padding row 0, which must never be a candidate)
U1 = [[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]]
U2 = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]
I1 = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
I2 = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]


def test_sgl_all_node_negatives_by_hand():
    # τ = 1. User anchors of the batch (0, 2):
    #   u0: cos with all of view 2 = (1, 0, -1), positive col 0: -1 + log(e + 1 + 1/e)
    #   u2: (0, 2) -> cos (0, 1, 0), positive col 2 (cos 0): log(1 + e + 1)
    # Item anchor (item 1, twice): (1, 0) against real items only (rows 1, 2 of view 2):
    #   cos (0, 1), positive = item 1 (cos 0): log(1 + e)   [with the padding row: log(1 + 2e)]
    l_u0 = -1 + math.log(E + 1 + 1 / E)
    l_u2 = math.log(E + 2)
    l_i = math.log(1 + E)
    model = _sgl_with_tables(U1, U2, I1, I2)
    assert model.ssl_negatives == "all"
    batch = {"u": torch.tensor([0, 2]), "i": torch.tensor([1, 1]), "j": torch.tensor([[3], [3]])}
    assert model.extra_loss(batch).item() == pytest.approx((l_u0 + l_u2) / 2 + l_i, rel=1e-6)
    # a user with two pairs in the batch is an anchor twice (SGL-Torch embeds the batch's users as given)
    batch2 = {"u": torch.tensor([0, 0, 2]), "i": torch.tensor([1, 1, 1]), "j": torch.tensor([[3], [3], [3]])}
    assert model.extra_loss(batch2).item() == pytest.approx((2 * l_u0 + l_u2) / 3 + l_i, rel=1e-6)
    # in-batch negatives (the distinct users 0 and 2 against each other) give another value:
    #   u0: cos with (u0, u2) of view 2 = (1, -1): -1 + log(e + 1/e); u2: (0, 0): log 2; items: one
    #   distinct item, contrasted with itself only: 0
    inbatch = _sgl_with_tables(U1, U2, I1, I2, ssl_negatives="batch")
    expected_batch = (-1 + math.log(E + 1 / E) + math.log(2)) / 2
    assert inbatch.extra_loss(batch).item() == pytest.approx(expected_batch, rel=1e-6)
    assert expected_batch != pytest.approx((l_u0 + l_u2) / 2 + l_i)


def test_info_nce_all_by_hand_and_against_in_batch():
    # τ = 0.5: anchor (1, 0), candidates (1, 0), (0, 1), (-1, 0); positive 0: -2 + log(e² + 1 + e⁻²)
    a = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert info_nce_all(a, c, torch.tensor([0]), 0.5).item() == pytest.approx(-2 + math.log(E**2 + 1 + E**-2))
    # when the candidates are exactly the anchors' own rows, it is the in-batch InfoNCE
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert info_nce_all(z1, z2, torch.arange(5), 0.3).item() == pytest.approx(info_nce(z1, z2, 0.3).item(), rel=1e-6)


# ---- SGCL -----------------------------------------------------------------------------------------------
def test_symmetric_loss_counts_the_positive_twice_like_the_authors():
    z = torch.eye(2)
    # τ = 1: e = [[e, 1], [1, e]]. q = 1, λ = 1: per row -e + (e + (e + 1)) = e + 1
    assert symmetric_contrastive_loss(z, z, 1.0, q=1.0, lam=1.0, double_positive=True).item() == pytest.approx(E + 1)
    # q = 0.5, λ = 0.1: [-(e^0.5) + (0.1 (2e + 1))^0.5] / 0.5
    expected = (-(E**0.5) + (0.1 * (2 * E + 1)) ** 0.5) / 0.5
    assert symmetric_contrastive_loss(z, z, 1.0, q=0.5, lam=0.1, double_positive=True).item() == pytest.approx(expected)
    # the authors' formula written out on random views (τ .2, λ .1, q .01; float64: at q .01 the two
    # terms are about 100 each and their difference .12)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 5, generator=g).double(), torch.randn(7, 5, generator=g).double()
    na, nb = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    sim = torch.exp(na @ nb.T / 0.2)
    pos = torch.exp((na * nb).sum(-1) / 0.2)
    ref = (-(pos**0.01) / 0.01).mean() + (((0.1 * (pos + sim.sum(1))) ** 0.01) / 0.01).mean()
    ours = symmetric_contrastive_loss(a, b, 0.2, q=0.01, lam=0.1, double_positive=True)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)


def test_sgcl_joint_contrast_puts_users_and_items_in_one_matrix():
    # one user and one item; both views: user (1, 0), item (0, 1). τ = 1, q = 1, λ = 1.
    # Joint (2 x 2 matrix, e = [[e, 1], [1, e]]): per row -e + (2e + 1) = e + 1, mean e + 1.
    # Separately (1 x 1 each): -e + 2e = e per term, e + e = 2e in total.
    model = create("sgcl", verbose=False, ssl_temp=1.0, sym_q=1.0, sym_lambda=1.0)
    u = torch.tensor([[1.0, 0.0], [5.0, 5.0]])
    i = torch.tensor([[9.0, 9.0], [0.0, 1.0]])
    tables = {"view1": (u, i), "view2": (u.clone(), i.clone())}
    model._views = ("view1", "view2")
    model.propagate = lambda adj=None, noise_eps=0.0: tables[adj]
    # the batch holds user 0 twice and item 1 twice: distinct nodes only
    assert model.joint_contrast(torch.tensor([0, 0]), torch.tensor([1, 1])).item() == pytest.approx(E + 1)


def test_negative_mixup_by_hand():
    # one user u = (1, 0), two layers, candidates a = item 1 and b = item 2; α given per dimension
    user = torch.tensor([[1.0, 0.0]])
    p0 = torch.tensor([[1.0, 1.0]], requires_grad=True)
    p1 = torch.tensor([[0.0, 2.0]], requires_grad=True)
    t0 = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]], requires_grad=True)  # item rows of layer 0
    t1 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0]], requires_grad=True)  # of layer 1
    cand = torch.tensor([[1, 2]])
    alphas = [torch.tensor([[[0.5, 0.5], [0.0, 1.0]]]), torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])]
    # layer 0: a -> 0.5 (1, 1) + 0.5 (2, 0) = (1.5, 0.5), score 1.5; b -> (0·1 + 1·0, 1·1 + 0·3) = (0, 1),
    #          score 0: keep a
    # layer 1: a -> (0, 2), score 0; b -> (4, 0), score 4: keep b
    # negative = mean over layers = (2.75, 0.25)
    neg = SGCL.mix_negatives(user, [p0, p1], [t0, t1], cand, alphas)
    np.testing.assert_allclose(neg.detach().numpy(), [[2.75, 0.25]])
    neg.sum().backward()
    # d/dp0 = α_a / 2; d/d item 1 of layer 0 = (1 - α_a) / 2; not-kept candidates get nothing
    np.testing.assert_allclose(p0.grad.numpy(), [[0.25, 0.25]])
    np.testing.assert_allclose(t0.grad.numpy(), [[0.0, 0.0], [0.25, 0.25], [0.0, 0.0]])
    np.testing.assert_allclose(p1.grad.numpy(), [[0.0, 0.0]])
    np.testing.assert_allclose(t1.grad.numpy(), [[0.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    # one candidate at a time (the running maximum over chunks) keeps the same mixes
    again = SGCL.mix_negatives(user, [p0, p1], [t0, t1], cand, alphas, chunk=1)
    np.testing.assert_allclose(again.detach().numpy(), [[2.75, 0.25]])
    g = torch.Generator().manual_seed(3)
    users, tab = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    pos, cands = torch.randn(6, 4, generator=g), torch.randint(1, 9, (6, 7), generator=g)
    al = [torch.rand(6, 7, 4, generator=g)]
    torch.testing.assert_close(SGCL.mix_negatives(users, [pos], [tab], cands, al, chunk=3),
                               SGCL.mix_negatives(users, [pos], [tab], cands, al))
    # with random α the kept mix lies between the positive and a candidate, per dimension
    torch.manual_seed(0)
    neg = SGCL.mix_negatives(user, [p0], [t0], cand)
    assert bool(((neg >= torch.minimum(p0, t0[1:].min(0).values) - 1e-6)
                 & (neg <= torch.maximum(p0, t0[1:].max(0).values) + 1e-6)).all())


def test_sgcl_bpr_and_l2_on_final_embeddings_by_hand():
    # 0 layers, no contrast, no dropout; the only candidate is the positive item itself, so every
    # mix equals the positive whatever α: BPR = log 2. L2 (the authors' l2_reg_loss): reg times the
    # (not squared) norms of the batch's user, positive and negative rows over the batch size:
    # user 0 = (3, 4) -> 5, item 1 = (0, 1) -> 1 twice: 1.0 * (5 + 1 + 1) / 1
    model = _model_with_weights("sgcl", [[3.0, 4.0], [1.0, 1.0], [2.0, 0.0]],
                                [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]],
                                n_layers=0, ssl_weight=0.0, mix_dropout=0.0, reg=1.0, n_candidates=1)
    batch = {"u": torch.tensor([0]), "i": torch.tensor([1]), "j": torch.tensor([[1]])}
    assert model.loss(batch).item() == pytest.approx(math.log(2) + 7.0, rel=1e-6)
    # two rows: users 0 and 1 with item 1 -> norms sqrt(25 + 2) and sqrt(2) twice, over 2
    batch = {"u": torch.tensor([0, 1]), "i": torch.tensor([1, 1]), "j": torch.tensor([[1], [1]])}
    expected = math.log(2) + (math.sqrt(27) + 2 * math.sqrt(2)) / 2
    assert model.loss(batch).item() == pytest.approx(expected, rel=1e-6)


def test_sgcl_views_drop_edges_and_change_every_epoch():
    rng = np.random.default_rng(0)
    r = sp.random(60, 50, density=0.2, format="csr", random_state=3)
    r.data[:] = 1
    train = pl.DataFrame({"user_id": r.tocoo().row.astype(np.int64), "item_id": r.tocoo().col.astype(np.int64) + 1})
    split = Split(train=train, valid=train.clear(), test=train.clear(), n_users=60, n_items=50)
    model = create("sgcl", verbose=False, drop_ratio=0.3)
    model.n_users_, model.n_items_ = split.n_users, split.n_items
    model.prepare_fit(split)
    full = model.adjacency().to_dense()
    v1, v2 = (v.to_dense() for v in model.make_views(rng))
    n_edges = int((full != 0).sum())
    for v in (v1, v2):
        kept = int((v != 0).sum())
        assert 0.6 * n_edges < kept < 0.8 * n_edges  # about 70% of the edges survive
        assert not bool(((v != 0) & (full == 0)).any())  # only training edges
        torch.testing.assert_close(v, v.T)
    assert not torch.equal(v1, v2)


@pytest.fixture(scope="module")
def synth(synthetic_loo):
    return synthetic_loo


def test_sgcl_learns_on_tiny_data(synth):
    split, valid, test = synth
    # lr .02: at the smaller tiny-data rates of the other graph tests (.005) the authors' settings
    # (Xavier init, mixed hard negatives, contrast) leave the BPR loss near log 2 for 40 epochs here
    params = {"verbose": False, "dim": 32, "batch_size": 512, "lr": 0.02, "epochs": 40, "eval_every": 2,
              "patience": 5, "n_candidates": 10}
    untrained = create("sgcl", **{**params, "epochs": 0}).fit(split, None)
    model = create("sgcl", **params).fit(split, valid)
    before = evaluate(untrained, test, ks=[10], groups=False).metrics["ndcg@10"]
    after = evaluate(model, test, ks=[10], groups=False).metrics["ndcg@10"]
    assert after > 2 * before and after > 0.08, f"NDCG@10 {before:.4f} -> {after:.4f}"
    losses = [e["loss"] for e in model.history_["epochs"]]
    assert losses[-1] < losses[0]
