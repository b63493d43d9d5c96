"""Multi-task CTR models (Shared-Bottom, MMoE, PLE, ESMM) and the AdaTask optimizer: each model
learns two related labels of a synthetic table; save/load; MMoE's gates; ESMM's product; label
checks; AdaTask's update against per-task Adam."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from recforge.ctr import CTRSplit
from recforge.data.ctr_readers import CTRSource, split_rows
from recforge.data.features import FeatureEncoder, FeatureSpec, Schema
from recforge.errors import ConfigError, DataError
from recforge.evaluation.pointwise import auc
from recforge.models import registry
from recforge.models.base import Recommender
from recforge.models.ctr.esmm import product_logit
from recforge.training.adatask import AdaTask

SMALL = {"epochs": 8, "batch_size": 256, "lr": 3e-3, "patience": 3, "embedding_dim": 8, "verbose": False,
         "device": "cpu", "threads": 1}
SIZES = {"sharedbottom": {"bottom_hidden": [32], "tower_hidden": [16]},
         "mmoe": {"n_experts": 3, "expert_hidden": [32], "tower_hidden": [16]},
         "ple": {"expert_hidden": [16], "tower_hidden": [16]},
         "esmm": {"tower_hidden": [32, 16]}}


def _split(df: pl.DataFrame, schema: Schema) -> CTRSplit:
    parts, rec = split_rows(CTRSource({"all": df}, schema, "table"),
                            {"method": "random", "ratios": [0.7, 0.15, 0.15], "seed": 0})
    enc = FeatureEncoder(schema).fit(parts["train"])
    return CTRSplit(*(enc.transform(parts[k]) for k in ("train", "valid", "test")), enc, rec)


def _features(rng, n):
    a, b, c = rng.integers(0, 10, n), rng.integers(0, 10, n), rng.integers(0, 4, n)
    x = rng.normal(size=n)
    wa, wb = rng.normal(size=10) * 1.5, rng.normal(size=10) * 1.5
    cols = {"a": a.astype(str), "b": b.astype(str), "c": c.astype(str), "x": x}
    return cols, wa[a], wb[b], x


def _bern(rng, logit):
    return (rng.random(len(logit)) < 1 / (1 + np.exp(-logit))).astype(int)


SPECS = [FeatureSpec("a"), FeatureSpec("b"), FeatureSpec("c"), FeatureSpec("x", "numeric")]


@pytest.fixture(scope="module")
def two_task_split():
    """Two related labels: both depend on a; the first on x, the second on b; c is noise."""
    rng = np.random.default_rng(0)
    cols, fa, fb, x = _features(rng, 5000)
    df = pl.DataFrame({**cols, "t1": _bern(rng, fa + 1.5 * x), "t2": _bern(rng, fa + fb)})
    return _split(df, Schema(SPECS, ["t1", "t2"]))


@pytest.fixture(scope="module")
def funnel_split():
    """Click depends on a; conversion given a click on b; the second label is click and conversion."""
    rng = np.random.default_rng(1)
    cols, fa, fb, _ = _features(rng, 5000)
    click = _bern(rng, fa)
    conv = click * _bern(rng, fb + 0.5)
    return _split(pl.DataFrame({**cols, "click": click, "conv": conv}), Schema(SPECS, ["click", "conv"]))


def _fit(name, split, **extra):
    model = registry.create(name, **{**SMALL, **SIZES.get(name, {}), **extra})
    return model.fit(split, split.valid)


def _aucs(model, split):
    p = model.predict_proba(split.test)
    return [auc(split.test.y[:, j], p[:, j]) for j in range(p.shape[1])]


@pytest.mark.parametrize("name,extra", [("sharedbottom", {}), ("mmoe", {}), ("ple", {}),
                                        ("mmoe", {"optimizer": "adatask"}), ("ple", {"optimizer": "adatask"})])
def test_learns_both_tasks_and_round_trips(name, extra, two_task_split, tmp_path):
    model = _fit(name, two_task_split, **extra)
    aucs = _aucs(model, two_task_split)
    assert min(aucs) > 0.7, (name, extra, aucs)
    p = model.predict_proba(two_task_split.test)
    assert p.shape == (len(two_task_split.test), 2)
    loaded = Recommender.load(model.save(tmp_path / name))
    np.testing.assert_allclose(loaded.predict_proba(two_task_split.test), p, rtol=1e-5, atol=1e-6)


def test_mmoe_gates_are_distributions(two_task_split):
    model = _fit("mmoe", two_task_split, epochs=1)
    batch = two_task_split.test.batch(np.arange(64))
    with torch.no_grad():
        g = model.net_.gates(batch)
    assert g.shape == (64, 2, 3)
    assert (g >= 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(64, 2))


def test_esmm_ctcvr_is_the_product_and_learns(funnel_split):
    model = _fit("esmm", funnel_split)
    p = model.predict_proba(funnel_split.test)
    cvr = model.predict_cvr(funnel_split.test)
    np.testing.assert_allclose(p[:, 1], p[:, 0] * cvr, rtol=1e-5, atol=1e-7)
    aucs = _aucs(model, funnel_split)
    assert min(aucs) > 0.7, aucs
    # pCVR ranks conversions among the clicked test rows (the CVR tower never saw a CVR label)
    clicked = funnel_split.test.y[:, 0] > 0
    assert auc(funnel_split.test.y[clicked, 1], cvr[clicked]) > 0.65


def test_product_logit_is_stable():
    a = torch.tensor([-50.0, 0.0, 30.0, 40.0, 3.0])
    b = torch.tensor([2.0, 0.0, 30.0, -60.0, -3.0])
    out = torch.sigmoid(product_logit(a, b))
    assert torch.isfinite(product_logit(a, b)).all()
    torch.testing.assert_close(out, torch.sigmoid(a) * torch.sigmoid(b), rtol=1e-5, atol=1e-7)


def test_wrong_number_of_labels_is_one_clear_error(two_task_split, funnel_split):
    rng = np.random.default_rng(2)
    cols, fa, _, _ = _features(rng, 400)
    one = _split(pl.DataFrame({**cols, "y": _bern(rng, fa)}), Schema(SPECS, ["y"]))
    for name in ("sharedbottom", "mmoe", "ple"):
        with pytest.raises(ConfigError, match=f"{name} is a multi-task model.*at least 2 labels.*has 1: y"):
            _fit(name, one)
    three = pl.DataFrame({**cols, "y": _bern(rng, fa), "z": _bern(rng, fa), "w": _bern(rng, fa)})
    with pytest.raises(ConfigError, match="esmm .*exactly 2 labels.*click.*has 3"):
        _fit("esmm", _split(three, Schema(SPECS, ["y", "z", "w"])))
    # conversions without a click contradict ESMM's second label
    with pytest.raises(DataError, match="t2=1 but t1=0"):
        _fit("esmm", two_task_split)
    with pytest.raises(ConfigError, match="optimizer='sgd'"):
        _fit("mmoe", two_task_split, optimizer="sgd")


def test_adatask_is_a_sum_of_per_task_adam_steps():
    """A parameter both tasks reach moves by the sum of two independent Adam steps (one per task's
    gradient); a parameter only task 0 reaches moves exactly as under Adam."""
    torch.manual_seed(0)
    shared, own = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    opt = AdaTask([shared, own], n_tasks=2, lr=0.01)
    ref = {k: torch.nn.Parameter(shared.detach().clone()) for k in range(2)}
    adams = {k: torch.optim.Adam([ref[k]], lr=0.01) for k in range(2)}
    own_ref = torch.nn.Parameter(own.detach().clone())
    own_adam = torch.optim.Adam([own_ref], lr=0.01)
    for _ in range(4):
        g = [torch.randn(5) * 10, torch.randn(5) * 0.01]  # very different gradient scales
        h = torch.randn(3)
        before = shared.detach().clone()
        delta = torch.zeros(5)
        for k in range(2):
            ref[k].data.copy_(before)
            ref[k].grad = g[k].clone()
            adams[k].step()
            delta += ref[k].detach() - before
        own_ref.grad = h.clone()
        own_adam.step()
        opt.step([[g[0], h], [g[1], None]])
        torch.testing.assert_close(shared.detach(), before + delta)
        torch.testing.assert_close(own.detach(), own_ref.detach())


def test_adatask_resumes_exactly(two_task_split, tmp_path):
    """AdaTask's per-task moments and schedule position travel with the checkpoint: a run stopped
    after 2 of 3 epochs and resumed ends where an uninterrupted run does."""
    kw = {**SMALL, **SIZES["mmoe"], "optimizer": "adatask", "lr_schedule": "cosine"}
    full = registry.create("mmoe", **{**kw, "epochs": 3}).fit(two_task_split)
    part = registry.create("mmoe", **{**kw, "epochs": 3})
    part.checkpoint_dir = tmp_path / "ck"

    def stop(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    part.callbacks = [stop]
    part.fit(two_task_split)
    assert len(part.history_["epochs"]) == 2
    resumed = registry.create("mmoe", **{**kw, "epochs": 3})
    resumed.resume_from = tmp_path / "ck" / "last.pt"
    resumed.fit(two_task_split)
    np.testing.assert_allclose(resumed.predict_proba(two_task_split.test), full.predict_proba(two_task_split.test),
                               rtol=1e-5, atol=1e-6)


def test_cli_trains_and_evaluates_a_multi_task_model(tmp_path, capsys):
    import json
    from pathlib import Path

    from recforge.cli import main

    rng = np.random.default_rng(3)
    cols, fa, fb, x = _features(rng, 3000)
    pl.DataFrame({**cols, "t1": _bern(rng, fa + 1.5 * x), "t2": _bern(rng, fa + fb)}).write_csv(tmp_path / "rows.csv")
    assert main(["train", "mmoe", "--data", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "runs"), "--quiet",
                 "data.label=t1,t2", "data.categorical=a,b,c", "data.numeric=x", "epochs=3", "batch_size=256",
                 "embedding_dim=8", "n_experts=2", "expert_hidden=[16]", "tower_hidden=[8]", "threads=1",
                 "optimizer=adatask"]) == 0
    run = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads((Path(run) / "metrics.json").read_text())
    assert metrics["task"] == "ctr"
    assert main(["evaluate", run, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-9)
