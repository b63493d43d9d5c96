"""TIL (triplet importance learning): corrupted training triplets get lower learned weights, weights
are positive and normalised, meta data never comes from the test part, beats Pop, unknown users,
persistence, determinism and bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from graph_contract import (assert_beats_pop, assert_deterministic_by_seed, assert_empty_histories,
                            assert_round_trip, assert_unknown_user, block_task, evalsets, frame)
from recforge.data.split import Split
from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.models.graph.til import TIL, holdout_pairs, kmeans
from recforge.models.registry import create

FAST = {"verbose": False, "dim": 32, "batch_size": 256, "lr": 0.005, "threads": 1}


class _Untouchable:
    """Stands in for the test part: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the test part was read ({name})")


@pytest.fixture(scope="module")
def task():
    """Four taste groups of 50 users, 8 items each from their group's block of 15 (the validation
    part is clean); every user's training part also gets 3 corrupted positives drawn from the other
    blocks: (split, clean training pairs, corrupted training pairs, valid, test, Pop's NDCG@10)."""
    split, clean, noisy = block_task(noise=3, noise_last=True)
    return (split, clean, noisy, *evalsets(split))


def _no_test_part(split: Split) -> Split:
    return Split(train=split.train, valid=split.valid, test=_Untouchable(), n_users=split.n_users,
                 n_items=split.n_items)


# ---- the known answer: corrupted triplets weigh less ---------------------------------------------
@pytest.mark.parametrize("generator", ["ui", "mi"])
def test_corrupted_triplets_get_lower_weights(task, generator):
    split, clean, noisy, *_ = task
    # TIL on MF; the meta objective reads the (clean) validation targets, never the test part
    model = create("til", **FAST, epochs=40, n_layers=0, generator=generator).fit(_no_test_part(split), None)
    neg = np.random.default_rng(5).integers(1, split.n_items + 1, len(clean) + len(noisy))
    w = model.triplet_weights(np.r_[clean[:, 0], noisy[:, 0]], np.r_[clean[:, 1], noisy[:, 1]], neg)
    assert (w > 0).all() and w.mean() == pytest.approx(1.0, abs=1e-4)  # positive, normalised to mean 1
    w_clean, w_noisy = w[: len(clean)].mean(), w[len(clean):].mean()
    assert w_clean - w_noisy > 0.2, f"{generator}: clean {w_clean:.3f} vs corrupted {w_noisy:.3f}"


def test_weights_are_positive_and_sum_to_the_batch_size(task):
    split, *_ = task
    model = create("til", **FAST, epochs=0).fit(split, None)
    with torch.no_grad():
        for p in model.net_.gen.parameters():  # extreme scores: softplus of large negative logits
            p.mul_(500.0)
        x = torch.randn(300, 2 * model.dim)
        w = model.importance(x)
    assert w.shape == (300,) and (w > 0).all() and torch.isfinite(w).all()
    assert float(w.sum()) == pytest.approx(300.0, rel=1e-4)


# ---- meta data ----------------------------------------------------------------------------------------
def test_holdout_pairs_come_from_training_only():
    rng = np.random.default_rng(0)
    r = sp.random(100, 41, density=0.2, format="lil", random_state=3)
    r[0, :] = 0
    r[0, 5] = 1  # a user with a single pair keeps it
    r = sp.csr_matrix(r.tocsr() > 0, dtype=np.float32)
    inner, meta = holdout_pairs(r, 0.25, rng)
    assert inner.nnz + len(meta) == r.nnz
    assert r[meta[:, 0], meta[:, 1]].min() == 1 and inner[meta[:, 0], meta[:, 1]].max() == 0
    deg = np.diff(r.indptr)
    assert (np.diff(inner.indptr)[deg > 0] >= 1).all()  # every user keeps a pair in the inner problem
    assert inner[0, 5] == 1 and abs(len(meta) / r.nnz - 0.25) < 0.05


def test_meta_data_modes(task):
    split, *_ = task
    safe = _no_test_part(split)
    valid = create("til", **FAST, epochs=1).fit(safe, None)
    np.testing.assert_array_equal(valid._meta_pairs, split.valid.select("user_id", "item_id").to_numpy())
    assert valid.graph_.nnz == split.train_matrix.nnz  # the graph is the whole training part
    assert "validation part's 200 targets" in valid.protocol_notes()["meta_data"]
    held = create("til", **FAST, epochs=1, meta_data="holdout", meta_ratio=0.2).fit(safe, None)
    mp = held._meta_pairs
    assert 0 < len(mp) and split.train_matrix[mp[:, 0], mp[:, 1]].min() == 1  # training pairs only
    assert held.graph_[mp[:, 0], mp[:, 1]].max() == 0  # removed from the graph and the inner triplets
    assert held.graph_.nnz + len(mp) == split.train_matrix.nnz and len(held._pairs) == held.graph_.nnz
    notes = held.protocol_notes()
    assert "held out" in notes["meta_data"] and notes["side_data"] == "none"
    assert "uni-interest" in notes["generator"]
    batch = create("til", **FAST, epochs=1, meta_data="batch").fit(safe, None)
    assert len(batch._meta_pairs) == 0 and "batch" in batch.protocol_notes()["meta_data"]


def test_meta_step_updates_only_the_generator_and_the_trainer_only_the_recommender(task):
    split, *_ = task
    model = create("til", **FAST, epochs=0, n_layers=1).fit(split, None)
    model.prepare_fit(split)
    model.before_training(split)
    batch = model.make_batch(np.arange(64), np.random.default_rng(0))
    gen0 = [p.detach().clone() for p in model.net_.gen.parameters()]
    emb0 = model.net_.item.weight.detach().clone()
    loss = model.loss(batch)
    assert any(not torch.equal(a, p) for a, p in zip(gen0, model.net_.gen.parameters()))  # the outer step ran
    assert torch.equal(emb0, model.net_.item.weight)  # ... and left the recommender alone
    loss.backward()
    assert model.net_.item.weight.grad is not None
    assert all(p.grad is None for p in model.net_.gen.parameters())  # weights are constants for θ's step


def test_kmeans_recovers_separated_groups():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 4, generator=g) * 0.05 + c for c in (torch.full((4,), -3.0), torch.zeros(4),
                                                                       torch.full((4,), 3.0))])
    a = kmeans(x, 3, np.random.default_rng(1))
    assert {tuple(np.unique(a[s: s + 30].numpy())) for s in (0, 30, 60)} == {(0,), (1,), (2,)}


# ---- recommendation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("generator", ["ui", "mi"])
def test_beats_pop(task, generator):
    split, _, _, valid, test, pop = task
    model = create("til", **FAST, epochs=30, eval_every=2, patience=4, generator=generator).fit(split, valid)
    assert_beats_pop(model, test, pop, label=f"{generator}: ")


def test_zero_layers_is_mf(task):
    split, *_ = task
    model = create("til", **FAST, epochs=2, n_layers=0).fit(split, None)
    hist = Histories.from_lists([0, 1], [[1], []], split.n_items)
    expected = model.net_.user.weight[:2] @ model.net_.item.weight.T
    torch.testing.assert_close(model.score(hist), expected.detach())


def test_deterministic_by_seed(task):
    split, *_, test, _ = task
    assert_deterministic_by_seed("til", {**FAST, "epochs": 3, "generator": "mi"}, split, test.histories.slice(0, 20))


@pytest.mark.parametrize("generator", ["ui", "mi"])
def test_save_load_unknown_user_and_shapes(task, tmp_path, generator):
    split, clean, *_, test, _ = task
    model = create("til", **FAST, epochs=2, generator=generator).fit(split, None)
    hist = test.histories.slice(0, 30)
    before = model.score(hist)
    w_before = model.triplet_weights(clean[:50, 0], clean[:50, 1], np.full(50, 3))
    loaded, _ = assert_round_trip(model, hist, tmp_path / generator, TIL, before)
    np.testing.assert_allclose(loaded.triplet_weights(clean[:50, 0], clean[:50, 1], np.full(50, 3)), w_before)
    # an unknown user (-1) is folded in from the history items; an empty history scores finitely
    assert_unknown_user(loaded, hist, before, fold_in=False)
    assert_empty_histories(loaded, split.n_items)


# ---- bad parameters ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,match", [
    ({"generator": "mlp"}, "generator"),
    ({"meta_data": "test"}, "meta_data"),
    ({"meta_ratio": 0.0}, "meta_ratio"),
    ({"meta_ratio": 1.0}, "meta_ratio"),
    ({"loss": "cpr"}, "loss=bpr"),
    ({"neg_sampler": "hard"}, "neg_sampler"),
    ({"meta_lr": 0.0}, "meta_lr"),
    ({"meta_step": -1.0}, "meta_step"),
    ({"meta_wd": -0.1}, "meta_wd"),
    ({"hidden": 0}, "hidden"),
    ({"n_clusters": 1}, "n_clusters"),
    ({"cluster_every": 0}, "cluster_every"),
    ({"n_layers": -1}, "n_layers"),
])
def test_bad_parameters(params, match):
    with pytest.raises(ConfigError, match=match):
        create("til", **params)


def test_meta_data_that_cannot_exist(task):
    split, *_ = task
    no_valid = Split(train=split.train, valid=split.valid.clear(), test=split.test, n_users=split.n_users,
                     n_items=split.n_items)
    with pytest.raises(ConfigError, match="meta_data=holdout"):
        create("til", **FAST, epochs=1).fit(no_valid, None)
    singles = Split(train=frame([(u, u + 1) for u in range(10)], 0), valid=split.valid.clear(),
                    test=split.test.clear(), n_users=10, n_items=20)
    with pytest.raises(ConfigError, match="meta_ratio"):
        create("til", **FAST, epochs=1, meta_data="holdout").fit(singles, None)
