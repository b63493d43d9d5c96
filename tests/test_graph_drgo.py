"""DRGO: the entropy-regularised DRO weights on toy cases (more mass on the harder group, bounded by
the entropy term, lowered by the distance to the nominal distribution), Sinkhorn cost, user groups,
the diffusion schedule and denoising chain, the fitted weights favour a noisy group, beats Pop,
unknown users, persistence, determinism, a popularity-shift split end to end and bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import graph_contract
from graph_contract import (assert_beats_pop, assert_deterministic_by_seed, assert_empty_histories,
                            assert_round_trip, assert_unknown_user, evalsets)
from recforge.data.prepare import prepare
from recforge.data.split import Split, popularity_shift
from recforge.data.synthetic import make_synthetic
from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories, build_evalset
from recforge.models.graph.drgo import DRGO, diffusion_schedule, dro_update, sinkhorn_distance, user_groups
from recforge.models.registry import create

FAST = {"verbose": False, "dim": 32, "batch_size": 256, "lr": 0.005, "threads": 1}


def block_task(n_users: int = 200, n_blocks: int = 4, noisy_block: int | None = None) -> Split:
    """Users in ``n_blocks`` taste groups, each consuming 8 items of its own block of 15 (one test
    and one validation target, the rest training). Users of ``noisy_block`` also get 6 random
    training positives from the other blocks (a harder group to fit)."""
    noise = 0 if noisy_block is None else 6
    return graph_contract.block_task(n_users=n_users, n_groups=n_blocks, noise=noise, noisy_groups=(noisy_block,))[0]


@pytest.fixture(scope="module")
def task():
    split = block_task()
    return (split, *evalsets(split))


# ---- the DRO weights on toy cases -----------------------------------------------------------------
def _run(losses, distances=None, steps=3000, step=0.05, entropy=0.1, sinkhorn_weight=1.0):
    k = len(losses)
    w, obj = torch.full((k,), 1.0 / k), torch.zeros(k)
    losses = torch.tensor(losses)
    dist = None if distances is None else torch.tensor(distances)
    present = torch.ones(k, dtype=torch.bool)
    trace = []
    for _ in range(steps):
        w, obj = dro_update(w, obj, losses, present, dist, step, entropy, sinkhorn_weight, 0.3)
        trace.append(float(w[-1]))
    return w, obj, np.array(trace)


def test_worst_case_weights_put_more_mass_on_the_harder_group():
    w, obj, trace = _run([0.2, 0.6])
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-5)
    assert w[1] > w[0] and (np.diff(trace) >= -1e-7).all()  # the harder group's weight only grows
    torch.testing.assert_close(obj, torch.tensor([0.2, 0.6]))  # the objective is the EMA of the losses
    # the fixed point of the entropy-regularised ascent: softmax(objective / entropy)
    torch.testing.assert_close(w, torch.softmax(torch.tensor([0.2, 0.6]) / 0.1, 0), atol=1e-3, rtol=0)


def test_entropy_term_keeps_the_weights_from_extremes():
    mild, _, _ = _run([0.2, 0.6], entropy=1.0)
    sharp, _, _ = _run([0.2, 0.6], entropy=0.1)
    none, _, _ = _run([0.2, 0.6], entropy=0.0, steps=6000)
    assert 0.5 < float(mild[1]) < float(sharp[1]) < float(none[1])
    torch.testing.assert_close(mild, torch.softmax(torch.tensor([0.2, 0.6]), 0), atol=1e-3, rtol=0)
    assert float(none[1]) > 0.999  # Group-DRO's update (no entropy term) drifts to the worst group alone


def test_distance_to_the_nominal_distribution_lowers_a_groups_weight():
    w, _, _ = _run([0.4, 0.4], distances=[0.0, 0.3])
    assert w[0] > w[1]
    w0, _, _ = _run([0.4, 0.4], distances=[0.0, 0.3], sinkhorn_weight=0.0)
    torch.testing.assert_close(w0, torch.tensor([0.5, 0.5]))


def test_absent_groups_keep_their_objective():
    w, obj = torch.tensor([0.5, 0.5]), torch.tensor([0.1, 0.9])
    _, new = dro_update(w, obj, torch.tensor([0.5, 0.0]), torch.tensor([True, False]), None, 0.01, 0.1, 1.0, 0.3)
    assert new[1] == pytest.approx(0.9) and new[0] == pytest.approx(0.7 * 0.1 + 0.3 * 0.5)


def test_sinkhorn_distance_of_shifted_clouds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    shift = torch.tensor([2.0, 0.0, 0.0])
    assert float(sinkhorn_distance(x, x + shift)) == pytest.approx(2.0, abs=0.05)
    assert float(sinkhorn_distance(x, x)) < 0.1
    far = float(sinkhorn_distance(x, x + 2 * shift))
    assert far == pytest.approx(4.0, abs=0.05)


def test_user_groups_recover_taste_blocks():
    split = block_task(n_users=120, n_blocks=3)
    groups = user_groups(split.train_matrix, 3, 8, np.random.default_rng(0))
    blocks = np.arange(120) % 3
    assert {tuple(np.unique(groups[blocks == b])) for b in range(3)} == {(0,), (1,), (2,)}
    # fewer active users than groups, and a user without training rows (group 0)
    r = sp.csr_matrix(np.array([[0, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=np.float32))
    assert user_groups(r, 5, 4, np.random.default_rng(0)).tolist() in ([0, 0, 1], [1, 0, 0])


# ---- diffusion --------------------------------------------------------------------------------------
def test_diffusion_schedule_and_identity_chain_at_start(task):
    sched = diffusion_schedule(10, 0.1, 1e-4, 0.02)
    one_minus_abar = 1.0 - sched["sqrt_abar"] ** 2
    np.testing.assert_allclose(one_minus_abar, np.linspace(1e-5, 2e-3, 10), rtol=1e-6)  # linear-var
    assert sched["coef_x0"][0] == pytest.approx(1.0) and sched["coef_xt"][0] == pytest.approx(0.0)
    linear = diffusion_schedule(10, 0.1, 1e-4, 0.02, "linear")
    assert not np.allclose(1.0 - linear["sqrt_abar"] ** 2, one_minus_abar)
    split, *_ = task
    model = create("drgo", **FAST, epochs=0).fit(split, None)
    z = torch.randn(7, 32)
    torch.testing.assert_close(model.denoise(z), z)  # the zero-initialised residual: identity chain
    with torch.no_grad():
        assert torch.isfinite(model.diffusion_loss(z)) and float(model.diffusion_loss(z)) > 0


def test_ranking_uses_the_denoised_embeddings(task):
    split, *_ = task
    model = create("drgo", **FAST, epochs=2).fit(split, None)
    with torch.no_grad():
        users, items = model.propagate()
        d = model.denoise(torch.cat([users, items]))
    hist = Histories.from_lists([0, 5], [[1], [2]], split.n_items)
    expected = d[[0, 5]] @ d[split.n_users:].T
    expected[:, 0] = 0.0
    torch.testing.assert_close(model.score(hist), expected)
    assert not torch.allclose(d[: split.n_users], users)  # the trained denoiser changed the embeddings


def test_loss_trains_embeddings_and_denoiser_and_moves_the_weights(task):
    split, *_ = task
    model = create("drgo", **FAST, epochs=0).fit(split, None)
    model.prepare_fit(split)
    batch = model.make_batch(np.arange(256), np.random.default_rng(0))
    w0 = model.net_.dro_weights.clone()
    loss = model.loss(batch)
    loss.backward()
    assert model.net_.user.weight.grad is not None and model.net_.denoiser.out.weight.grad is not None
    assert not torch.equal(w0, model.net_.dro_weights) and not model.net_.dro_weights.requires_grad


def test_fitted_weights_favour_the_noisy_group():
    split = block_task(noisy_block=0)
    model = create("drgo", **FAST, epochs=15, n_groups=4).fit(split, None)
    state = model.dro_state()
    noisy_users = np.arange(split.n_users) % 4 == 0
    noisy_group = np.bincount(model.user_group_[noisy_users], minlength=len(state["weights"])).argmax()
    assert state["weights"].argmax() == noisy_group and state["weights"][noisy_group] > 1.0 / 4
    assert float(state["weights"].sum()) == pytest.approx(1.0, abs=1e-5)
    assert state["sizes"].sum() == split.train.height


# ---- recommendation -------------------------------------------------------------------------------------
def test_beats_pop(task):
    split, valid, test, pop = task
    model = create("drgo", **FAST, epochs=30, eval_every=2, patience=4).fit(split, valid)
    assert_beats_pop(model, test, pop)


def test_deterministic_by_seed(task):
    split, _, test, _ = task
    assert_deterministic_by_seed("drgo", {**FAST, "epochs": 2}, split, test.histories.slice(0, 20))


def test_save_load_unknown_user_and_shapes(task, tmp_path):
    split, _, test, _ = task
    model = create("drgo", **FAST, epochs=2).fit(split, None)
    hist = test.histories.slice(0, 30)
    loaded, before = assert_round_trip(model, hist, tmp_path / "drgo", DRGO)
    np.testing.assert_array_equal(loaded.dro_state()["weights"], model.dro_state()["weights"])
    # an unknown user (-1) is folded in from the history items; an empty history scores finitely
    assert_unknown_user(loaded, hist, before)
    assert_empty_histories(loaded, split.n_items)
    notes = loaded.protocol_notes()
    assert notes["side_data"].startswith("none") and "Sinkhorn" in notes["dro"] and len(notes["dro_weights"]) == 5


def test_trains_on_a_popularity_shift_split():
    ds = prepare(make_synthetic(n_users=120, n_items=60, seed=1))
    split = popularity_shift(ds, seed=0)
    valid = build_evalset(split.history("valid"), split.valid, split.n_users, split.n_items, "valid")
    model = create("drgo", **FAST, epochs=2, eval_every=1).fit(split, valid)
    assert len(model.history_["epochs"]) == 2


@pytest.mark.parametrize("sampler", ["hard", "popularity"])
def test_other_negative_samplers(task, sampler):
    split, _, test, _ = task
    model = create("drgo", **FAST, epochs=1, neg_sampler=sampler, hard_pool=5).fit(split, None)
    s = model.score(test.histories.slice(0, 10))
    assert s.shape == (10, split.n_items + 1) and torch.isfinite(s).all()


@pytest.mark.parametrize("params, message", [
    ({"loss": "cpr"}, "loss=bpr"),
    ({"n_groups": 0}, "n_groups"),
    ({"dro_step": -0.1}, "dro_step"),
    ({"dro_step": 2.0, "dro_entropy": 1.0}, "product"),
    ({"dro_momentum": 0.0}, "dro_momentum"),
    ({"sinkhorn_eps": 0.0}, "sinkhorn_eps"),
    ({"central_share": 1.5}, "central_share"),
    ({"diff_steps": 0}, "diff_steps"),
    ({"noise_schedule": "cosine"}, "noise_schedule"),
    ({"noise_min": 0.1, "noise_max": 0.01}, "noise_min"),
    ({"n_layers": -1}, "n_layers"),
])
def test_bad_parameters(params, message):
    with pytest.raises(ConfigError, match=message):
        create("drgo", **params)
