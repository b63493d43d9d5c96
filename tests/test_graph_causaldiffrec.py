"""CausalDiffRec: the diffusion schedule and sampler (shapes, determinism by seed), the environment
posterior (a distribution that follows the data), the invariance loss over environment graphs,
beating Pop on the synthetic task, unknown users, persistence, determinism and bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.evaluation.evaluator import evaluate
from recforge.models.base import Recommender
from recforge.models.general.pop import Pop
from recforge.models.graph.causaldiffrec import CausalDiffRec, diffusion_betas
from recforge.models.registry import create

# small and fast: ten diffusion steps, 32 dimensions, one thread
FAST = {"verbose": False, "dim": 32, "batch_size": 512, "lr": 0.005, "epochs": 40, "eval_every": 2,
        "patience": 4, "steps": 10, "sampling_steps": 10, "threads": 1}


@pytest.fixture(scope="module")
def data(synthetic_loo):
    return synthetic_loo


@pytest.fixture(scope="module")
def small(data):
    """A briefly trained model (two epochs)."""
    split, _, _ = data
    return create("causaldiffrec", **{**FAST, "epochs": 2}).fit(split, None)


# ---- diffusion --------------------------------------------------------------------------------------
def test_noise_schedules():
    # linear-var: the cumulative noise variance 1 - ᾱ_t is the line scale*min .. scale*max
    betas = diffusion_betas("linear-var", 10, 0.1, 0.01, 0.09)
    alpha_bar = np.cumprod(1 - betas)
    np.testing.assert_allclose(1 - alpha_bar, np.linspace(0.001, 0.009, 10), rtol=1e-9)
    np.testing.assert_allclose(diffusion_betas("linear", 5, 0.1, 0.01, 0.09), np.linspace(0.001, 0.009, 5))
    assert (betas > 0).all() and (betas < 1).all()


def test_sampler_shapes_and_determinism_by_seed(small):
    torch.manual_seed(0)
    x0 = torch.randn(17, small.dim)
    w = torch.full((small.n_envs,), 1.0 / small.n_envs)
    with torch.no_grad():
        a, b, c = small.sample(x0, w, seed=3), small.sample(x0, w, seed=3), small.sample(x0, w, seed=4)
        per_node = small.sample(x0, torch.softmax(torch.randn(17, small.n_envs), -1), seed=3)
    assert a.shape == (17, small.dim) and per_node.shape == (17, small.dim) and torch.isfinite(a).all()
    assert torch.equal(a, b)  # the same seed, the same draws
    assert not torch.equal(a, c)  # the starting noise comes from the seed
    # without noising (sampling_steps=0) the sampler is one denoising step from x0, independent of the seed
    small.sampling_steps = 0
    try:
        with torch.no_grad():
            d, e = small.sample(x0, w, seed=3), small.sample(x0, w, seed=4)
            t0 = torch.zeros(17, dtype=torch.long)
            expected = (w[None, :, None] * small.denoise(x0, t0)).sum(1)
    finally:
        small.sampling_steps = FAST["sampling_steps"]
    assert torch.equal(d, e)
    torch.testing.assert_close(d, expected)


def test_denoiser_is_conditioned_on_the_environment(small):
    x = torch.randn(5, small.dim)
    with torch.no_grad():
        out = small.denoise(x, torch.full((5,), 3, dtype=torch.long))
    assert out.shape == (5, small.n_envs, small.dim)
    assert not torch.allclose(out[:, 0], out[:, 1])  # each environment's embedding changes the prediction


# ---- environments -----------------------------------------------------------------------------------
def test_environment_posterior_is_a_distribution_that_follows_the_data(data, small):
    split, _, test = data
    hist = test.histories.slice(0, 40)
    post = small.user_posterior(hist)
    assert post.shape == (40, small.n_envs)
    assert (post >= 0).all() and torch.allclose(post.sum(1), torch.ones(40))
    assert post.std(0).max() > 1e-4  # users differ
    # an unknown user's posterior comes from their history: another history, another posterior
    a = Histories.from_lists(np.array([-1]), [[1, 2, 3]], split.n_items)
    b = Histories.from_lists(np.array([-1]), [[40, 41, 42, 43]], split.n_items)
    pa, pb = small.user_posterior(a), small.user_posterior(b)
    assert torch.allclose(pa.sum(1), torch.ones(1)) and not torch.allclose(pa, pb)
    # the backdoor adjustment's P(e) is a distribution too
    prior = small.environment_prior()
    assert prior.shape == (small.n_envs,) and torch.allclose(prior.sum(), torch.tensor(1.0))


def test_environment_graphs_and_invariance_term(data):
    split, _, _ = data
    model = create("causaldiffrec", **{**FAST, "epochs": 0, "env_graphs": 3, "env_drop": 0.3}).fit(split, None)
    rng = np.random.default_rng(0)
    batch = next(iter(model.train_batches(split, rng)))
    assert len(model._envs) == 3
    nnz = [int(a.values().numel()) for a in model._envs]
    full = int(model.adjacency().values().numel())
    assert all(n < full for n in nnz) and len(set(nnz)) > 1  # each environment drops different edges
    torch.manual_seed(0)
    per_env = torch.stack([model.environment_loss(batch, a) for a in model._envs])
    assert per_env.var(unbiased=False) > 0
    # the variance term adds to the mean: with var_weight=0 the loss is lower, all else equal
    torch.manual_seed(1)
    with_var = model.loss(batch).item()
    model.var_weight = 0.0
    torch.manual_seed(1)
    without = model.loss(batch).item()
    assert with_var > without


# ---- training ---------------------------------------------------------------------------------------
def test_beats_pop(data):
    split, valid, test = data
    pop = evaluate(Pop().fit(split), test, ks=[10], groups=False).metrics["ndcg@10"]
    model = create("causaldiffrec", **FAST).fit(split, valid)
    ndcg = evaluate(model, test, ks=[10], groups=False).metrics["ndcg@10"]
    assert ndcg > pop, f"CausalDiffRec NDCG@10 {ndcg:.4f} <= Pop {pop:.4f}"
    notes = model.protocol_notes()
    assert notes["side_data"].startswith("none") and "backdoor" in notes["adjustment"]


def test_deterministic_by_seed(data):
    split, _, test = data
    params = {**FAST, "epochs": 2, "seed": 7}
    hist = test.histories.slice(0, 60)
    a = create("causaldiffrec", **params).fit(split, None).score(hist)
    b = create("causaldiffrec", **params).fit(split, None).score(hist)
    c = create("causaldiffrec", **{**params, "seed": 8}).fit(split, None).score(hist)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_unknown_user_save_load_round_trip(data, small, tmp_path):
    split, _, test = data
    hist = test.histories.slice(0, 50)
    before = small.score(hist)
    assert before.shape == (50, split.n_items + 1) and torch.isfinite(before).all()
    loaded = Recommender.load(small.save(tmp_path / "causaldiffrec"))
    assert type(loaded) is CausalDiffRec and loaded.get_params() == small.get_params()
    assert torch.equal(loaded.score(hist), before)
    # an unknown user (-1) is folded in from the history items; an empty history scores finitely
    unknown = Histories(np.array([-1, 0]), hist.indptr[:3], hist.items[: hist.indptr[2]], hist.n_items)
    s = loaded.score(unknown)
    assert s.shape == (2, split.n_items + 1) and torch.isfinite(s).all()
    torch.testing.assert_close(s[1], before[0])
    empty = loaded.score(Histories.from_lists(np.array([-1]), [[]], split.n_items))
    assert empty.shape == (1, split.n_items + 1) and torch.isfinite(empty).all()


@pytest.mark.parametrize("params", [{"repropagate": True, "env_graphs": 0}, {"adjust": "posterior", "skip": False}])
def test_variants_train_and_score(data, params):
    split, _, test = data
    model = create("causaldiffrec", **{**FAST, "epochs": 1, **params}).fit(split, None)
    s = model.score(test.histories.slice(0, 10))
    assert s.shape == (10, split.n_items + 1) and torch.isfinite(s).all()


def test_config_errors():
    bad = [({"n_envs": 0}, "n_envs"), ({"env_dim": 0}, "env_dim"), ({"env_graphs": -1}, "env_graphs"),
           ({"env_drop": 1.0}, "env_drop"), ({"kl_weight": -1.0}, "kl_weight"), ({"steps": 0}, "steps"),
           ({"steps": 10, "sampling_steps": 11}, "sampling_steps"), ({"noise_schedule": "cosine"}, "noise_schedule"),
           ({"noise_scale": 20.0}, "noise_scale"), ({"noise_min": 0.2, "noise_max": 0.1}, "noise_min"),
           ({"time_dim": 1}, "time_dim"), ({"hidden": 0}, "hidden"), ({"denoise_dropout": 1.0}, "denoise_dropout"),
           ({"adjust": "none"}, "adjust"), ({"loss": "cpr"}, "loss=bpr"), ({"neg_sampler": "hard"}, "neg_sampler")]
    for params, match in bad:
        with pytest.raises(ConfigError, match=match):
            create("causaldiffrec", **params)
