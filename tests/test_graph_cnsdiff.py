"""CNSDiff (causal negative sampling by diffusion): the diffusion schedule, the generator's shapes and
determinism, generated negatives that are harder than sampled ones without being the positive, the
mixing curriculum, the denoiser's loss reaching only the denoiser, beats Pop, unknown users,
persistence, determinism by seed and bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graph_contract import (assert_beats_pop, assert_deterministic_by_seed, assert_empty_histories,
                            assert_round_trip, assert_unknown_user, block_task, evalsets)
from recforge.errors import ConfigError
from recforge.models.graph.cnsdiff import CNSDiff, diffusion_schedule, timestep_embedding
from recforge.models.registry import create

FAST = {"verbose": False, "dim": 32, "batch_size": 256, "lr": 0.005, "threads": 1}


@pytest.fixture(scope="module")
def task():
    """Four taste groups of 50 users, 8 items each from their group's block of 15, drawn with a
    popularity skew inside the block so that Pop is not trivial."""
    split, _, _ = block_task(skew=0.7, shuffle=True)
    return (split, *evalsets(split))


@pytest.fixture(scope="module")
def trained(task):
    """A model after a few epochs: embeddings with structure, a denoiser that has learned."""
    split, *_ = task
    return create("cnsdiff", **FAST, epochs=10, seed=0).fit(split, None)


# ---- the diffusion ----------------------------------------------------------------------------------
def test_schedule_by_hand():
    s = diffusion_schedule(20, "linear-var", 0.1, 1e-4, 0.02)
    # linear-var: 1 - ᾱ_t is linear from 1e-5 to 2e-3
    np.testing.assert_allclose(1 - s["abar"], np.linspace(1e-5, 2e-3, 20), rtol=1e-9, atol=1e-12)
    assert (np.diff(s["abar"]) < 0).all() and (np.diff(s["snr"]) < 0).all()
    # the last reverse step returns the denoiser's prediction of x_0
    assert s["coef_x0"][0] == pytest.approx(1.0) and s["coef_xt"][0] == pytest.approx(0.0)
    # posterior mean coefficients: q(x_{t-1} | x_t, x_0) is exact for x_t = √ᾱ_t x_0 (no noise) iff
    # coef_x0 + coef_xt √ᾱ_t = √ᾱ_{t-1}
    abar_prev = np.concatenate([[1.0], s["abar"][:-1]])
    np.testing.assert_allclose(s["coef_x0"] + s["coef_xt"] * np.sqrt(s["abar"]), np.sqrt(abar_prev), rtol=1e-9)
    lin = diffusion_schedule(5, "linear", 1.0, 0.1, 0.5)
    np.testing.assert_allclose(lin["abar"], np.cumprod(1 - np.linspace(0.1, 0.5, 5)))
    e = timestep_embedding(torch.tensor([0, 3]), 8)
    assert e.shape == (2, 8) and torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_generator_shapes_and_determinism(task):
    split, *_ = task
    model = create("cnsdiff", **FAST, epochs=0).fit(split, None)
    model.net_.train()  # as during training: the denoiser's input dropout is active
    g = torch.Generator().manual_seed(0)
    users, pos = torch.randn(7, 32, generator=g), torch.randn(7, 32, generator=g)
    assert model.levels() == [10, 14, 18]
    torch.manual_seed(1)
    cands = model.generate_candidates(users, pos)
    torch.manual_seed(1)
    a = model.generate(users, pos)
    torch.manual_seed(1)
    b = model.generate(users, pos)
    torch.manual_seed(2)
    c = model.generate(users, pos)
    assert cands.shape == (3, 7, 32) and a.shape == (7, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the generated negative is the candidate its user scores highest
    scores = torch.einsum("bd,lbd->lb", users, cands)
    torch.testing.assert_close(a, cands[scores.argmax(0), torch.arange(7)])
    # without dropout, with posterior means only and from noise level 0, generation is deterministic
    z = create("cnsdiff", **FAST, epochs=0, sample_start=0, sample_stride=100).fit(split, None)
    z.net_.eval()
    torch.testing.assert_close(z.generate(users, pos), z.generate(users, pos))


def test_denoiser_loss_reaches_only_the_denoiser(task):
    split, *_ = task
    model = create("cnsdiff", **FAST, epochs=0).fit(split, None)
    model.net_.train()
    users, items = model.propagate()
    loss = model.diffusion_loss(items[1:9].detach(), users[:8].detach())
    loss.backward()
    assert model.net_.user.weight.grad is None and model.net_.item.weight.grad is None
    assert model.net_.denoiser.in_x.weight.grad.abs().sum() > 0
    assert model.net_.denoiser.in_c.weight.grad.abs().sum() > 0  # condition=user feeds the user
    # the causal (KL) term is part of the loss
    torch.manual_seed(0)
    with_kl = model.diffusion_loss(items[1:9].detach(), users[:8].detach())
    model.causal_weight = 0.0
    torch.manual_seed(0)
    without = model.diffusion_loss(items[1:9].detach(), users[:8].detach())
    assert with_kl.item() > without.item() > 0


def test_generated_negatives_are_hard_and_the_mixed_ones_lie_between(trained):
    model = trained
    model.net_.train()
    users, items = model.final_embeddings()
    rng = np.random.default_rng(0)
    batch = model.make_batch(rng.choice(len(model._pairs), 1000), rng)  # pairs and their sampled negatives
    eu, ei, ej = users[batch["u"]], items[batch["i"]], items[batch["j"][:, 0]]
    torch.manual_seed(0)
    gen = model.generate(eu, ei)
    s_pos, s_rand, s_gen = ((eu * x).sum(1).mean().item() for x in (ei, ej, gen))
    # generated from the positive: far harder than a sampled item, near the positive's score
    assert s_gen - s_rand > 0.5 * (s_pos - s_rand), (s_rand, s_gen, s_pos)
    # ... but generated, not copied: each differs from its positive
    rel = (gen - ei).norm(dim=1) / ei.norm(dim=1)
    assert rel.min() > 1e-3 and rel.mean() > 0.05
    # the curriculum: the mixed negative moves from the sampled item towards the generated one
    early, late = (model.mix_params(e) for e in (0, model.mix_epochs))
    assert early == (1.0, 9.0) and late == (9.0, 1.0) and model.mix_params(10 * model.mix_epochs) == late
    r0 = torch.from_numpy(rng.beta(*early, size=(1000, 1))).float()
    r1 = torch.from_numpy(rng.beta(*late, size=(1000, 1))).float()
    s_early = (eu * (r0 * gen + (1 - r0) * ej)).sum(1).mean().item()
    s_late = (eu * (r1 * gen + (1 - r1) * ej)).sum(1).mean().item()
    assert s_rand < s_early < s_late < s_pos


def test_mixing_ratios_follow_the_epoch(task):
    split, *_ = task
    model = create("cnsdiff", **FAST, epochs=3, mix_epochs=2, min_mix=0.2).fit(split, None)
    assert model._epochs_done == 3 and model.mix_params() == (9.0, 1.0)
    model._epochs_done = 0
    batch = model.make_batch(np.arange(500), np.random.default_rng(0))
    assert batch["mix"].shape == (500,) and bool((batch["mix"] >= 0.2).all() and (batch["mix"] <= 1).all())
    assert batch["mix"].mean() < 0.4  # Beta(1, 9) raised to at least 0.2: mean 0.28
    assert model.train_state() == {"epochs_done": 0}
    model.load_train_state({"epochs_done": 2})
    assert model.mix_params() == (9.0, 1.0)
    notes = model.protocol_notes()
    assert notes["side_data"].startswith("none") and "diffusion" in notes["negatives"]


# ---- recommendation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [{}, {"condition": "none", "cl_weight": 0.3}])
def test_beats_pop(task, params):
    split, valid, test, pop = task
    model = create("cnsdiff", **FAST, epochs=30, eval_every=2, patience=4, **params).fit(split, valid)
    assert_beats_pop(model, test, pop, label=f"{params}: ")


def test_deterministic_by_seed(task):
    split, _, test, _ = task
    assert_deterministic_by_seed("cnsdiff", {**FAST, "epochs": 2}, split, test.histories.slice(0, 20))


def test_save_load_unknown_user_and_shapes(task, tmp_path):
    split, _, test, _ = task
    model = create("cnsdiff", **FAST, epochs=2).fit(split, None)
    hist = test.histories.slice(0, 30)
    loaded, before = assert_round_trip(model, hist, tmp_path / "cnsdiff", CNSDiff)
    for key, value in model.net_.state_dict().items():  # the denoiser travels with the weights
        assert torch.equal(loaded.net_.state_dict()[key], value), key
    loaded.net_.eval()
    model.net_.eval()
    u, p = torch.randn(4, 32), torch.randn(4, 32)
    torch.manual_seed(0)
    g1 = model.generate(u, p)
    torch.manual_seed(0)
    torch.testing.assert_close(loaded.generate(u, p), g1)
    # an unknown user (-1) is folded in from the history items; an empty history scores finitely
    assert_unknown_user(loaded, hist, before)
    assert_empty_histories(loaded, split.n_items)


# ---- bad parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("params,match", [
    ({"loss": "cpr"}, "loss=bpr"),
    ({"neg_sampler": "hard"}, "neg_sampler"),
    ({"noise_schedule": "cosine"}, "noise_schedule"),
    ({"condition": "item"}, "condition"),
    ({"steps": 0}, "steps"),
    ({"noise_min": 0.05, "noise_max": 0.02}, "noise_min"),
    ({"noise_scale": 0.0}, "noise_scale"),
    ({"sample_start": 30}, "sample_start"),
    ({"sample_stride": 0}, "sample_stride"),
    ({"hidden": 0}, "hidden"),
    ({"denoiser_dropout": 1.0}, "denoiser_dropout"),
    ({"mix_alpha1": 0.0}, "mix_alpha1"),
    ({"min_mix": 1.5}, "min_mix"),
    ({"mix_epochs": 0}, "mix_epochs"),
    ({"causal_weight": -0.1}, "causal_weight"),
    ({"cl_temp": 0.0}, "cl_temp"),
    ({"n_layers": -1}, "n_layers"),
])
def test_bad_parameters(params, match):
    with pytest.raises(ConfigError, match=match):
        create("cnsdiff", **params)
