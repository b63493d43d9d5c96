"""CIGF and CKML (multi-behaviour seed models): the compressed interaction graph convolution, the
MESI gates, the dynamic routing and the attention across behaviours by hand; both models beat
popularity on the synthetic funnel; the user side is rebuilt from the ranking-time history
(training rows give the training-time representation, a fresh view changes the scores, raw and
unknown-user histories score finitely); persistence; the run folder; and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

import recforge.models.multibehavior.cigf as cigf_module
from mb_contract import assert_beats_popularity, assert_round_trip, ndcg
from recforge.cli import main
from recforge.data.knowledge import build_knowledge
from recforge.data.prepare import prepare
from recforge.data.split import leave_one_out
from recforge.data.synthetic import make_synthetic
from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.models.graph.propagation import EdgeList, edge_dot, edge_mm
from recforge.models.multibehavior.base import softmax_parts
from recforge.models.multibehavior.ckml import BehaviorAttention, route
from recforge.models.multibehavior.mbgcn import row_mean
from recforge.models.registry import create
from recforge.pipeline import eval_sets

FAST = {"cigf": dict(dim=32, lr=0.01, epochs=60, batch_size=64, eval_every=5, patience=4),
        "ckml": dict(dim=32, epochs=20, eval_every=4, patience=3)}
NAMES = list(FAST)


def _funnel(n_users: int, n_items: int, seed: int):
    ds = prepare(make_synthetic(n_users=n_users, n_items=n_items, seed=seed, behaviors=True))
    split = leave_one_out(ds, target_behavior="buy")
    split.knowledge = build_knowledge("co-interaction:1", ds, split.train)
    return split


@pytest.fixture(scope="module")
def mb():
    """The synthetic funnel (400 users, 200 items), leave-one-out on purchases, co-interaction
    knowledge of the training part: (split, valid, test)."""
    split = _funnel(400, 200, 0)
    valid, test = eval_sets(split, None, "buy")
    return split, valid, test


@pytest.fixture(scope="module")
def fitted(mb):
    split, valid, _ = mb
    return {name: create(name, verbose=False, device="cpu", seed=0, threads=1, **kw).fit(split, valid)
            for name, kw in FAST.items()}


@pytest.fixture(scope="module")
def tiny():
    """Small models on a small funnel (a few steps), for the by-hand checks."""
    split = _funnel(60, 40, 1)
    models = {"cigf": create("cigf", verbose=False, device="cpu", seed=0, threads=1, epochs=2, dim=6, n_layers=3,
                             n_samples=5),
              "ckml": create("ckml", verbose=False, device="cpu", seed=0, threads=1, epochs=2, dim=6, n_heads=2,
                             n_layers=2, n_samples=5)}
    return split, {k: m.fit(split) for k, m in models.items()}


_ndcg = ndcg


def _training_histories(split, users):
    tr = split.train.sort(["user_id", "timestamp"], maintain_order=True)
    rows = [tr.filter(tr["user_id"] == u) for u in users]
    return Histories.from_lists(users, [r["item_id"].to_list() for r in rows], split.n_items,
                                [r["behavior"].to_list() for r in rows])


# ---- the distinctive pieces by hand ---------------------------------------------------------------
def test_cigcn_towers_by_hand(tiny):
    """h¹ = A_b E⁰, h^l = Σ_k α_k^{b,l} ⊙ A_k h^{l-1} (node-wise LeakyReLU weights from E⁰), residual
    layers read out by their sum: with 3 layers E^b = 4E⁰ + 3h¹ + 2h² + h³ (dense NumPy)."""
    split, models = tiny
    m = models["cigf"]
    net = m.net_
    eu0, ei0 = net.user.weight.detach().numpy(), net.item.weight.detach().numpy()
    ui = [row_mean(r).toarray() for r in m.user_graphs_]
    iu = [row_mean(r.T.tocsr()).toarray() for r in m.user_graphs_]

    def alpha(b, layer, e):
        lin = net.att[b][layer - 2]
        z = e @ lin.weight.detach().numpy().T + lin.bias.detach().numpy()
        return np.where(z > 0, z, 0.1 * z)

    users, items, _ = m.towers()
    for b in range(len(m.behaviors_)):
        hu, hi = [ui[b] @ ei0], [iu[b] @ eu0]
        for layer in (2, 3):
            au, ai = alpha(b, layer, eu0), alpha(b, layer, ei0)
            hu.append(sum(au[:, [k]] * (ui[k] @ hi[-1]) for k in range(len(ui))))
            hi.append(sum(ai[:, [k]] * (iu[k] @ hu[-2]) for k in range(len(iu))))
        np.testing.assert_allclose(users[b].detach().numpy(), 4 * eu0 + 3 * hu[0] + 2 * hu[1] + hu[2], atol=1e-5)
        np.testing.assert_allclose(items[b].detach().numpy(), 4 * ei0 + 3 * hi[0] + 2 * hi[1] + hi[2], atol=1e-5)


def test_mesi_gates_by_hand(tiny, monkeypatch):
    """ŷ_t(u, i) = Σ_k softmax(G_t [e^t_u ‖ e^t_i] + c_t)_k ⟨e^k_u, e^k_i⟩: one gate value per
    behaviour expert, summing to one; the full-catalogue scoring (in chunks) agrees."""
    split, models = tiny
    m = models["cigf"]
    t_count = len(m.behaviors_)
    users, items, _ = m.towers()
    u = [x[:4].detach() for x in users]
    it = [x.detach() for x in items]
    task = m.behaviors_.index("buy")
    lin = m.net_.gate[task]
    assert lin.weight.shape == (t_count, 2 * m.dim)  # separate input: the task's tower only
    W, c = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    expect = np.zeros((4, it[0].shape[0]))
    for a in range(4):
        for i in range(it[0].shape[0]):
            z = W @ np.concatenate([u[task][a].numpy(), it[task][i].numpy()]) + c
            g = np.exp(z - z.max())
            g /= g.sum()
            assert g.shape == (t_count,) and abs(g.sum() - 1) < 1e-6
            expect[a, i] = sum(g[k] * float(u[k][a] @ it[k][i]) for k in range(t_count))
    monkeypatch.setattr(cigf_module, "SCORE_CHUNK", 4 * t_count * 7)  # chunks of 7 items
    with torch.no_grad():
        got = m.mesi_all(task, u, it).numpy()
        pair = m.mesi(task, [x[[1, 2]] for x in u], [x[[3, 5]] for x in it]).numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pair, [expect[1, 3], expect[2, 5]], rtol=1e-5, atol=1e-6)


def test_softmax_across_parts_is_the_softmax_and_its_gradient():
    """The elementwise softmax across a list of tensors (the scoring of MESI and CKML's attention)
    against torch.softmax over a stacked last axis, in value and gradient, with logits large
    enough that an exponential without the shift would overflow."""
    x = (torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0)) * 50).requires_grad_()
    w = torch.randn(3, 5, 4)
    got = softmax_parts(list(x.unbind(0)))
    ref = torch.softmax(x.permute(1, 2, 0), -1).permute(2, 0, 1)
    torch.testing.assert_close(torch.stack(got, 0), ref)
    g_got, = torch.autograd.grad(sum((g * wk).sum() for g, wk in zip(got, w)), x)
    g_ref, = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(g_got, g_ref)
    assert torch.isfinite(torch.stack(got)).all()


def test_dynamic_routing_by_hand():
    """Two interests, three edges into target 0 (two) and 1 (one), target 2 without edges; the
    sources are nodes 0..3 (node 3 sends nothing), node 1 sending to both targets 0 and 1."""
    z = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [5.0, 5.0]],
                      [[0.0, 1.0], [1.0, 1.0], [-1.0, 2.0], [5.0, -5.0]]])  # (K=2, m=4, d=2)
    src_of, tgt_of = [0, 1, 1], [0, 0, 1]  # edges (source → target)
    m = sp.csr_matrix((np.ones(3, dtype=np.float32), (tgt_of, src_of)), shape=(3, 4))
    args = EdgeList(m, "cpu")
    src = z[:, src_of]  # (K, E=3, d): each edge's source embeddings
    tgt = torch.tensor(tgt_of)
    one = route(z, args, iterations=1, temperature=1.0)
    # one iteration: uniform routing, the plain mean of each target's sources
    torch.testing.assert_close(one[:, 0], src[:, :2].mean(1))
    torch.testing.assert_close(one[:, 1], src[:, 2])
    assert one[:, 2].abs().sum() == 0

    # two iterations, computed edge by edge: logits ⟨ŝ_k, tanh(m̂_k)⟩, softmax over the interests
    # (temperature 0.5), then the routing-weighted mean per interest
    s = src.numpy().astype(np.float64)
    m1 = one.numpy().astype(np.float64)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    logits = np.array([[unit(s[k, e]) @ np.tanh(unit(m1[k, tgt[e]])) for e in range(3)] for k in range(2)])
    p = np.exp(logits / 0.5)
    p /= p.sum(0, keepdims=True)
    expect = np.zeros((2, 3, 2))
    for k in range(2):
        for v in range(2):
            es = [e for e in range(3) if tgt[e] == v]
            expect[k, v] = sum(p[k, e] * s[k, e] for e in es) / sum(p[k, e] for e in es)
    two = route(z, args, iterations=2, temperature=0.5).numpy()
    np.testing.assert_allclose(two, expect, rtol=1e-5, atol=1e-6)
    assert not np.allclose(two[:, 0], m1[:, 0])  # the routing moved the mean of target 0
    # a very high temperature keeps the routing uniform
    torch.testing.assert_close(route(z, args, iterations=3, temperature=1e6), one, atol=1e-5, rtol=1e-5)
    # the gradient reaches the sources that send, and only them
    zg = z.clone().requires_grad_(True)
    route(zg, args, iterations=2, temperature=0.5).sum().backward()
    assert zg.grad[:, :3].abs().sum() > 0 and zg.grad[:, 3].abs().sum() == 0
    # sources whose interests are one shared vector (expanded): the routing stays the plain mean,
    # as the edge-by-edge computation on a materialised copy gives
    same = z[0].unsqueeze(0).expand(2, -1, -1)
    torch.testing.assert_close(route(same, args, iterations=3, temperature=0.5),
                               route(same.contiguous(), args, iterations=3, temperature=0.5))


def _random_edges(seed: int, n: int = 7, m: int = 9, density: float = 0.35):
    rng = np.random.default_rng(seed)
    mat = sp.random(n, m, density=density, format="csr", random_state=rng, dtype=np.float32)
    mat.data[:] = 1.0
    keep = np.ones(n, dtype=np.float32)
    keep[-1] = 0.0  # a target without edges
    mat = sp.csr_matrix(sp.diags(keep) @ mat)
    mat.eliminate_zeros()
    mat.sort_indices()
    coo = mat.tocoo()
    return mat, torch.from_numpy(coo.col.astype(np.int64)), torch.from_numpy(coo.row.astype(np.int64))


def test_edge_products_match_gathers_with_gradients():
    """edge_mm and edge_dot against the same sums written with per-edge gathers, values and
    gradients in every argument."""
    mat, src, tgt = _random_edges(0)
    edges = EdgeList(mat, "cpu")
    assert torch.equal(edges.src, src) and torch.equal(edges.tgt, tgt)  # CSR order, as scipy's COO
    gen = torch.Generator().manual_seed(0)
    n, m = mat.shape
    w = torch.rand(len(edges), generator=gen, requires_grad=True)
    x = torch.randn(m, 3, generator=gen, requires_grad=True)
    a = torch.randn(n, 3, generator=gen, requires_grad=True)
    got = edge_mm(edges, w, x)
    ref = torch.zeros(n, 3).index_add(0, tgt, w.unsqueeze(1) * x[src])
    torch.testing.assert_close(got, ref)
    up = torch.randn(n, 3, generator=gen)
    g_got = torch.autograd.grad((got * up).sum(), (w, x))
    g_ref = torch.autograd.grad((ref * up).sum(), (w, x))
    for g1, g2 in zip(g_got, g_ref):
        torch.testing.assert_close(g1, g2)
    dots = edge_dot(edges, a, x)
    ref = (a[tgt] * x[src]).sum(1)
    torch.testing.assert_close(dots, ref)
    up = torch.randn(len(edges), generator=gen)
    g_got = torch.autograd.grad((dots * up).sum(), (a, x))
    g_ref = torch.autograd.grad((ref * up).sum(), (a, x))
    for g1, g2 in zip(g_got, g_ref):
        torch.testing.assert_close(g1, g2)
    # the row-mean weights: each target's sources averaged; the empty target stays 0
    mean = edge_mm(edges, edges.mean, x.detach())
    torch.testing.assert_close(mean, torch.from_numpy(row_mean(mat) @ x.detach().numpy()))
    assert mean[-1].abs().sum() == 0
    # the same edges with vectors of another dtype afterwards (the edge pattern follows the dtype)
    a64, x64 = a.detach().double(), x.detach().double()
    torch.testing.assert_close(edge_dot(edges, a64, x64), (a64[tgt] * x64[src]).sum(1))


@pytest.mark.parametrize("iterations", [2, 3])
def test_dynamic_routing_matches_per_edge_reference(iterations):
    """route on a random graph against the routing written edge by edge with gathers (the sources'
    (K, E, d) embeddings materialised), in value and in the gradient of the sources."""
    mat, src, tgt = _random_edges(1)
    n = mat.shape[0]
    z = torch.randn(3, mat.shape[1], 4, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def reference(z):
        zs = z[:, src]  # (K, E, d)
        deg = torch.zeros(n).index_add(0, tgt, torch.ones(len(src))).clamp_min(1.0)
        val = torch.zeros(3, n, 4).index_add(1, tgt, zs) / deg[:, None]
        logits = torch.zeros(3, len(src))
        for _ in range(iterations - 1):
            logits = logits + (F.normalize(zs, dim=-1) * torch.tanh(F.normalize(val, dim=-1))[:, tgt]).sum(-1)
            p = torch.softmax(logits / 0.7, 0)
            den = torch.zeros(3, n).index_add(1, tgt, p)
            val = torch.zeros(3, n, 4).index_add(1, tgt, (p / den[:, tgt].clamp_min(1e-12)).unsqueeze(-1) * zs)
        return val

    got, ref = route(z, EdgeList(mat, "cpu"), iterations, 0.7), reference(z)
    torch.testing.assert_close(got, ref)
    up = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(torch.autograd.grad((got * up).sum(), z)[0], torch.autograd.grad((ref * up).sum(), z)[0])


def test_routing_over_no_edges_is_zero():
    """A batch whose histories hold no row of a behaviour: no edge, a zero message, a zero gradient."""
    z = torch.randn(2, 6, 3, requires_grad=True)
    out = route(z, EdgeList(sp.csr_matrix((4, 6), dtype=np.float32), "cpu"), iterations=2, temperature=1.0)
    assert out.shape == (2, 4, 3) and out.abs().sum() == 0
    out.sum().backward()
    assert z.grad.abs().sum() == 0


def test_attention_across_behaviours_by_hand():
    att = BehaviorAttention(2, heads=1)
    with torch.no_grad():
        for lin in (att.q, att.k, att.v):
            lin.weight.copy_(torch.eye(2))
    x = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]], [[1.0, 1.0]]])  # (T=3 behaviours, n=1 node, d=2)
    v = x[:, 0].numpy()
    w = np.exp(v @ v.T / np.sqrt(2))
    w /= w.sum(1, keepdims=True)
    np.testing.assert_allclose(att(x)[:, 0].detach().numpy(), w @ v, rtol=1e-5)


def test_ckml_last_layer_for_some_nodes_equals_the_whole_graph(tiny):
    """A training step's propagation computes the last layer into its own users and items only: their
    representations, and the gradient of anything computed from them, are the whole graph's."""
    _, models = tiny
    m = models["ckml"]
    users, items = np.array([0, 3, 7, 20]), np.array([1, 2, 5, 11, 30])
    some_u, some_i, _, _ = m.propagate(users, items)
    all_u, all_i, _, _ = m.propagate()
    for b in range(len(all_u)):
        torch.testing.assert_close(some_u[b], all_u[b][:, users])
        torch.testing.assert_close(some_i[b], all_i[b][:, items])
    params = list(m.net_.parameters())
    pick = lambda u, i: sum((x * y).sum() for x, y in zip(u, i))  # noqa: E731
    g_some = torch.autograd.grad(pick(some_u, [x[:, :4] for x in some_i]), params, allow_unused=True)
    g_all = torch.autograd.grad(pick([x[:, users] for x in all_u], [x[:, items[:4]] for x in all_i]), params,
                                allow_unused=True)
    for a, b in zip(g_some, g_all):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_ckml_shared_interest_mixes_behaviours(tiny):
    """A specific interest keeps its behaviour's message; a shared one is attention plus the sum
    over behaviours."""
    _, models = tiny
    m = models["ckml"]
    msgs = [torch.randn(m.n_interests, 5, m.dim, generator=torch.Generator().manual_seed(b)) for b in range(3)]
    with torch.no_grad():
        y = m.across_behaviors(0, msgs, "user")
        att = m.net_.att_user[0][0](torch.stack([x[1] for x in msgs]))
    for b in range(3):
        torch.testing.assert_close(y[b][0], msgs[b][0])
        torch.testing.assert_close(y[b][1], att[b] + sum(x[1] for x in msgs))


# ---- the user side comes from the history -----------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_training_rows_give_the_training_representation(tiny, name):
    split, models = tiny
    m = models[name]
    users = list(range(8))
    got = m.score(_training_histories(split, users))
    t = m.behaviors_.index("buy")
    with torch.no_grad():
        if name == "cigf":
            u, i, _ = m.towers()
            ref = m.mesi_all(t, [x[users] for x in u], i)
        else:
            u, i, _, _ = m.propagate()
            ref = torch.einsum("kbd,knd->kbn", u[t][:, users], i[t]).max(0).values
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_a_fresh_view_changes_the_scores(mb, fitted, name):
    _, _, test = mb
    m = fitted[name]
    h = test.histories.slice(0, 3)
    rows = [list(h.items[h.indptr[r] : h.indptr[r + 1]]) for r in range(3)]
    behs = [list(h.behaviors[h.indptr[r] : h.indptr[r + 1]]) for r in range(3)]
    new = next(i for i in range(1, h.n_items + 1) if i not in rows[0])
    fresh = Histories.from_lists(h.users, [rows[0] + [new], rows[1], rows[2]], h.n_items,
                                 [behs[0] + ["view"], behs[1], behs[2]])
    before, after = m.score(h), m.score(fresh)
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1:], after[1:])


# ---- accuracy, persistence --------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_beats_popularity_on_the_funnel(mb, fitted, name):
    split, _, test = mb
    assert_beats_popularity(fitted[name], split, test)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(mb, fitted, name, tmp_path):
    _, _, test = mb
    loaded = assert_round_trip(fitted[name], test, tmp_path / name)
    notes = loaded.protocol_notes()
    assert notes["target_behavior"] == "buy" and notes["loss_weights"] == {"buy": 1.0, "cart": 1.0, "view": 1.0}
    if name == "ckml":
        assert set(notes["knowledge_relations"]) == {"co_buy", "co_cart", "co_view"}


@pytest.mark.parametrize("name", NAMES)
def test_raw_histories_without_behaviours(mb, fitted, name):
    """recommend / serving pass raw histories (no behaviours; an unknown user is -1)."""
    _, _, test = mb
    model = fitted[name]
    h = test.histories.slice(0, 2)
    items = [h.items[h.indptr[0] : h.indptr[1]].tolist(), h.items[h.indptr[1] : h.indptr[2]].tolist()]
    raw = Histories.from_lists([int(h.users[0]), -1, -1], items + [[]], h.n_items)
    s = model.score(raw)
    assert s.shape == (3, h.n_items + 1) and torch.isfinite(s).all()
    top, _ = model.recommend(raw, k=5)
    assert top.shape == (3, 5)


def test_ckml_category_knowledge_through_entities():
    """A relation to entities (categories) becomes a two-hop item → category → item graph."""
    ds = prepare(make_synthetic(n_users=60, n_items=40, seed=1, behaviors=True))
    split = leave_one_out(ds, target_behavior="buy")
    split.knowledge = build_knowledge("category", ds, split.train)
    m = create("ckml", verbose=False, device="cpu", seed=0, threads=1, epochs=1, dim=4, n_layers=1,
               n_samples=3).fit(split)
    assert m.relations_[0][:2] == ("belongs_to", "entity")
    x = m.knowledge_items()[0].detach()
    e0 = m.net_.item.weight.detach()
    g = m.relation_graphs_[0]
    cat = g.indices[g.indptr[1]]  # item 1's category: the mean over the items of that category
    peers = g.T.tocsr()[cat].indices
    m2 = e0[peers].mean(0)
    torch.testing.assert_close(x[1], 0.5 * (e0[1] + 0.5 * (torch.nn.functional.leaky_relu(m2, 0.1) + e0[1])))
    assert torch.isfinite(m.score(_training_histories(split, [0, 1]))).all()


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_refuses_data_without_behaviours_or_target(name):
    plain = leave_one_out(prepare(make_synthetic(n_users=60, n_items=40, seed=1)))
    with pytest.raises(ConfigError, match="no behaviour column"):
        create(name, verbose=False, epochs=1).fit(plain)
    untargeted = leave_one_out(prepare(make_synthetic(n_users=60, n_items=40, seed=1, behaviors=True)))
    with pytest.raises(ConfigError, match="data.target_behavior=NAME"):
        create(name, verbose=False, epochs=1).fit(untargeted)


def test_refusals_of_bad_settings(tiny):
    split, _ = tiny
    with pytest.raises(ConfigError, match="loss_weights names purchase"):
        create("cigf", verbose=False, epochs=1, loss_weights={"purchase": 1.0}).fit(split)
    with pytest.raises(ConfigError, match="one of them > 0"):
        create("ckml", verbose=False, epochs=1, loss_weights={"buy": 0, "view": 0, "cart": 0}).fit(split)
    with pytest.raises(ConfigError, match="multiple of n_heads"):
        create("ckml", dim=10, n_heads=3)
    with pytest.raises(ConfigError, match="encoder"):
        create("ckml", encoder="ngcf")


def test_ckml_refuses_missing_or_empty_knowledge():
    ds = prepare(make_synthetic(n_users=60, n_items=40, seed=1, behaviors=True))
    split = leave_one_out(ds, target_behavior="buy")
    with pytest.raises(ConfigError, match="data.knowledge=co-interaction"):
        create("ckml", verbose=False, epochs=1).fit(split)
    split.knowledge = build_knowledge("co-interaction:1000", ds, split.train)
    assert split.knowledge.triples.height == 0
    with pytest.raises(ConfigError, match="no triple"):
        create("ckml", verbose=False, epochs=1).fit(split)


# ---- the run folder ----------------------------------------------------------------------------------
def test_cli_run_folder_with_knowledge(tmp_path):
    out = tmp_path / "runs"
    assert main(["train", "ckml", "--data", "synthetic-mb", "data.target_behavior=buy", "data.knowledge=co-interaction",
                 "epochs=1", "dim=8", "n_layers=1", "n_samples=5", "threads=1", "--out", str(out), "--quiet"]) == 0
    (run,) = out.iterdir()
    protocol = json.loads((run / "metrics.json").read_text())["protocol"]
    assert protocol["knowledge"]["used_by_model"] is True
    assert set(protocol["knowledge_relations"]) == {"co_buy", "co_cart", "co_view"}
