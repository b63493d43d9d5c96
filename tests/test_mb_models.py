"""Multi-behaviour models (MBGCN, the behaviour-aware SASRec): the behaviours reach the ranking-time
histories, the training targets and item relations by hand, both models beat popularity on the
synthetic funnel, persistence, raw histories without behaviours, the run folder, and the refusals."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from mb_contract import assert_beats_popularity, assert_raw_histories_score, assert_round_trip, ndcg
from recforge.cli import main
from recforge.data.prepare import prepare
from recforge.data.split import leave_one_out
from recforge.data.synthetic import make_synthetic
from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.models.multibehavior.mbgcn import item_relations
from recforge.models.multibehavior.mbsasrec import next_target_items
from recforge.models.registry import create
from recforge.pipeline import eval_sets

FAST = {"mbgcn": dict(dim=32, lr=0.01, epochs=150, batch_size=1024, eval_every=5, patience=5),
        "mbsasrec": dict(hidden=32, lr=0.003, epochs=16, batch_size=64, eval_every=2, patience=4, max_len=30)}


@pytest.fixture(scope="module")
def mb():
    """The synthetic funnel (400 users, 200 items), leave-one-out on purchases: (split, valid, test)."""
    split = leave_one_out(prepare(make_synthetic(n_users=400, n_items=200, seed=0, behaviors=True)),
                          target_behavior="buy")
    valid, test = eval_sets(split, None, "buy")
    return split, valid, test


_ndcg = ndcg


@pytest.fixture(scope="module")
def fitted(mb):
    split, valid, _ = mb
    return {name: create(name, verbose=False, device="cpu", seed=0, **kw).fit(split, valid)
            for name, kw in FAST.items()}


# ---- data given to the models --------------------------------------------------------------------
def test_histories_carry_behaviours(mb):
    split, _, test = mb
    h = test.histories
    assert h.behaviors is not None and len(h.behaviors) == len(h.items)
    assert set(h.behaviors) == {"view", "cart", "buy"}
    part = h.slice(3, 9)
    lo, hi = h.indptr[3], h.indptr[9]
    assert list(part.behaviors) == list(h.behaviors[lo:hi]) and list(part.items) == list(h.items[lo:hi])
    # the behaviour of each history row is the one of its source row
    u = int(h.users[0])
    rows = split.history("test").filter(pl.col("user_id") == u).sort("timestamp", maintain_order=True)
    assert list(h.behaviors[h.indptr[0] : h.indptr[1]]) == rows["behavior"].to_list()
    assert Histories.from_lists([0], [[1, 2]], 5).behaviors is None


def test_next_target_items_by_hand():
    users = np.array([0, 0, 0, 0, 1, 1, 2])
    items = np.array([5, 6, 7, 8, 1, 2, 3])
    buy = np.array([False, True, False, True, False, False, True])
    # user 0: 5 -> next buy 6; 6 -> 8; 7 -> 8; 8 -> none; user 1: no buy; user 2: its buy is last
    assert next_target_items(users, items, buy).tolist() == [6, 8, 8, 0, 0, 0, 0]


def test_item_relations_by_hand():
    # users x items (column 0 padding): u0 {1, 2, 3}, u1 {1, 2}, u2 {3, 4}
    r = sp.csr_matrix(np.array([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=np.float32))
    full = item_relations(r, None, chunk=2).toarray()
    assert full[0].sum() == 0 and np.allclose(np.diag(full), 0)
    np.testing.assert_allclose(full[1], [0, 0, 0.5, 0.5, 0])  # 1 shares users with 2 (twice) and 3
    np.testing.assert_allclose(full[3], [0, 1 / 3, 1 / 3, 0, 1 / 3])
    top1 = item_relations(r, 1, chunk=2).toarray()
    np.testing.assert_allclose(top1[1], [0, 0, 1, 0, 0])  # 2 shares two users with 1, 3 one
    np.testing.assert_allclose(top1[3], [0, 1, 0, 0, 0])  # a tie: the lowest index


# ---- accuracy, persistence -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mbgcn", "mbsasrec"])
def test_beats_popularity_on_the_funnel(mb, fitted, name):
    split, _, test = mb
    assert_beats_popularity(fitted[name], split, test)


@pytest.mark.parametrize("name", ["mbgcn", "mbsasrec"])
def test_save_load_round_trip(mb, fitted, name, tmp_path):
    _, _, test = mb
    loaded = assert_round_trip(fitted[name], test, tmp_path / name)
    assert loaded.protocol_notes()["target_behavior"] == "buy"


@pytest.mark.parametrize("name", ["mbgcn", "mbsasrec"])
def test_raw_histories_without_behaviours(mb, fitted, name):
    """recommend / serving pass raw histories (no behaviours; an unknown user is -1)."""
    assert_raw_histories_score(fitted[name], mb[2])


def test_behaviours_change_the_sequence_scores(mb, fitted):
    _, _, test = mb
    h = test.histories.slice(0, 20)
    plain = Histories(h.users, h.indptr, h.items, h.n_items)  # every row taken as the default (view)
    assert not torch.allclose(fitted["mbsasrec"].score(h), fitted["mbsasrec"].score(plain))


def test_mbgcn_loss_and_scores_follow_the_formulas_written_out(mb, fitted):
    """The batch loss (user side from the batch's own graph rows, the pair's edge left out) and the
    score (every term in one product) against MBGCN's formulas written out on dense matrices."""
    m = fitted["mbgcn"]
    net = m.net_.eval()  # no message dropout
    d = lambda x: torch.from_numpy(np.asarray(x.todense(), dtype=np.float32))  # noqa: E731
    e_u, e_i = net.user.weight.detach(), net.item.weight.detach()
    T, k = len(m.behaviors_), m.behaviors_.index("buy")
    with torch.no_grad():
        items = torch.cat([e_i, net.W(d(m.item_users_) @ e_u)], 1)
        s = [torch.cat([e_i, w(d(a) @ e_i)], 1) for a, w in zip(m.item_graphs_, net.W_item)]
        w = net.log_w.exp()

        def user_side(ego, R):  # R: per behaviour the (batch, items) binary history
            n = torch.stack([r.sum(1) for r in R], 1)
            alpha = n * w / (n * w).sum(1, keepdim=True)
            p = sum(alpha[:, t : t + 1] * (R[t] @ e_i) / n[:, t : t + 1].clamp(min=1) for t in range(T))
            z = [net.M[t]((R[t] @ s[t]) / n[:, t : t + 1].clamp(min=1)) for t in range(T)]
            return torch.cat([ego, net.W(p)], 1), z

        # the loss of a batch: the pair (u, i) is taken out of u's purchases
        rng = np.random.default_rng(0)
        pick = rng.choice(len(m._pairs), 64, replace=False)
        u, i = (torch.from_numpy(m._pairs[pick, c]) for c in (0, 1))
        j = torch.from_numpy(rng.integers(1, m.n_items_ + 1, 64))
        R = [d(r)[u] for r in m.user_graphs_]
        R[k][torch.arange(64), i] = 0.0
        users, z = user_side(e_u[u], R)
        pos = (users * items[i]).sum(1) + m.lamb / T * sum((zt * st[i]).sum(1) for zt, st in zip(z, s))
        neg = (users * items[j]).sum(1) + m.lamb / T * sum((zt * st[j]).sum(1) for zt, st in zip(z, s))
        l2 = e_u[u].pow(2).sum() + e_i[i].pow(2).sum() + e_i[j].pow(2).sum()
        expected = torch.nn.functional.softplus(neg - pos).mean() + m.reg * 0.5 * l2 / 64
        assert float(m.loss({"u": u, "i": i, "j": j})) == pytest.approx(float(expected), rel=1e-4)

        # the scores of ranking-time histories with behaviours
        h = mb[2].histories.slice(0, 30)
        R = [d(x) for x in m.history_matrices(h)]
        users, z = user_side(e_u[torch.from_numpy(np.asarray(h.users, dtype=np.int64))], R)
        expected = users @ items.T + m.lamb / T * sum(zt @ st.T for zt, st in zip(z, s))
        torch.testing.assert_close(m.score(h), expected, rtol=1e-4, atol=1e-4)


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mbgcn", "mbsasrec"])
def test_refuses_data_without_behaviours_or_target(name):
    plain = leave_one_out(prepare(make_synthetic(n_users=60, n_items=40, seed=1)))
    with pytest.raises(ConfigError, match="no behaviour column"):
        create(name, verbose=False, epochs=1).fit(plain)
    untargeted = leave_one_out(prepare(make_synthetic(n_users=60, n_items=40, seed=1, behaviors=True)))
    with pytest.raises(ConfigError, match="data.target_behavior=NAME"):
        create(name, verbose=False, epochs=1).fit(untargeted)


def test_cli_without_target_is_one_clear_error(tmp_path, capsys):
    assert main(["train", "mbgcn", "--data", "synthetic-mb", "epochs=1", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "data.target_behavior=NAME" in err and "Traceback" not in err


# ---- the run folder ----------------------------------------------------------------------------------
def test_train_then_evaluate_run_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "mbsasrec", "--data", "synthetic-mb", "data.target_behavior=buy", "epochs=1",
                 "hidden=16", "max_len=20", "--out", str(out), "--quiet"]) == 0
    (run,) = out.iterdir()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--sampled", "99", "--json"]) == 0
    printed = capsys.readouterr().out
    assert "SAMPLED (99 uniform negatives)" in printed
