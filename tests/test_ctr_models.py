"""CTR models: each beats LR on a synthetic table whose label is a pure interaction effect;
save/load round trips; the run folder, evaluate and compare through the command line."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from recforge.ctr import CTRSplit
from recforge.data.ctr_readers import CTRSource, split_rows
from recforge.data.features import FeatureEncoder, FeatureSpec, Schema
from recforge.evaluation.pointwise import auc
from recforge.models import registry
from recforge.models.base import Recommender

SMALL = {"epochs": 15, "batch_size": 256, "lr": 3e-3, "patience": 3, "embedding_dim": 8, "verbose": False,
         "device": "cpu", "threads": 1}
SIZES = {"deepfm": {"hidden": [64, 64]}, "dcnv2": {"hidden": [64, 64], "cross_layers": 2},
         "finalmlp": {"mlp1_hidden": [64, 64], "mlp2_hidden": [64], "fs_hidden": [32], "heads": 4},
         "din": {"attention_hidden": [32, 16], "hidden": [64, 32]}, "fm": {"lr": 1e-2}, "lr": {"lr": 1e-2}}


def _split(df: pl.DataFrame, schema: Schema, seed: int = 0) -> CTRSplit:
    parts, rec = split_rows(CTRSource({"all": df}, schema, "table"),
                            {"method": "random", "ratios": [0.7, 0.15, 0.15], "seed": seed})
    enc = FeatureEncoder(schema).fit(parts["train"])
    return CTRSplit(*(enc.transform(parts[k]) for k in ("train", "valid", "test")), enc, rec)


@pytest.fixture(scope="module")
def interaction_split():
    """Label = Bernoulli(sigmoid(2.5 * (-1)^(a + b))): no main effect of a or b (LR is at chance),
    a rank-one pairwise effect every interaction model can represent; c, x and tags are noise."""
    rng = np.random.default_rng(0)
    n = 6000
    a, b, c = rng.integers(0, 8, n), rng.integers(0, 8, n), rng.integers(0, 5, n)
    logit = 2.5 * np.where((a + b) % 2 == 0, 1.0, -1.0)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    tags = ["^".join(map(str, rng.choice(6, rng.integers(0, 3), replace=False))) for _ in range(n)]
    df = pl.DataFrame({"a": a.astype(str), "b": b.astype(str), "c": c.astype(str), "x": rng.normal(size=n),
                       "tags": tags, "y": y})
    schema = Schema([FeatureSpec("a"), FeatureSpec("b"), FeatureSpec("c"), FeatureSpec("x", "numeric"),
                     FeatureSpec("tags", "multi")], ["y"])
    return _split(df, schema)


@pytest.fixture(scope="module")
def sequence_split():
    """Label depends on whether the candidate item's group is the group of the user's history
    items: neither the candidate nor the history has a main effect; target attention finds it."""
    rng = np.random.default_rng(1)
    n = 6000
    g = rng.integers(0, 4, n)
    hist = ["^".join(str(4 * gi + k) for k in rng.integers(0, 4, 5)) for gi in g]
    item = rng.integers(0, 16, n)
    logit = np.where(item // 4 == g, 3.0, -3.0)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    df = pl.DataFrame({"item": item.astype(str), "hist": hist, "ctx": rng.integers(0, 3, n).astype(str), "y": y})
    schema = Schema([FeatureSpec("item"), FeatureSpec("hist", "sequence", max_len=5, share="item"),
                     FeatureSpec("ctx")], ["y"])
    return _split(df, schema)


def _fit(name, split, **extra):
    model = registry.create(name, **{**SMALL, **SIZES.get(name, {}), **extra})
    model.fit(split, split.valid)
    return model


def _test_auc(model, split) -> float:
    return auc(split.test.y[:, 0], model.predict_proba(split.test)[:, 0])


@pytest.fixture(scope="module")
def lr_aucs(interaction_split, sequence_split):
    return {"table": _test_auc(_fit("lr", interaction_split), interaction_split),
            "sequence": _test_auc(_fit("lr", sequence_split), sequence_split)}


@pytest.mark.parametrize("name", ["fm", "deepfm", "dcnv2", "finalmlp"])
def test_model_beats_lr_on_an_interaction_effect(name, interaction_split, lr_aucs):
    model = _fit(name, interaction_split)
    value = _test_auc(model, interaction_split)
    assert lr_aucs["table"] < 0.6  # no main effect: LR is near chance
    assert value > lr_aucs["table"] + 0.15, (name, value, lr_aucs["table"])
    hist = model.history_
    assert hist["best_epoch"] >= 1 and "auc" in hist["epochs"][0]  # the trainer validated by AUC


def test_din_beats_lr_with_target_attention(sequence_split, lr_aucs):
    model = _fit("din", sequence_split)
    assert model.pair_ == ("item", "hist")
    value = _test_auc(model, sequence_split)
    assert lr_aucs["sequence"] < 0.6
    assert value > lr_aucs["sequence"] + 0.15, (value, lr_aucs["sequence"])


def test_din_without_a_shared_sequence_says_so(interaction_split):
    with pytest.raises(Exception, match="din needs a behaviour sequence"):
        _fit("din", interaction_split)


@pytest.mark.parametrize("name", ["deepfm", "din"])
def test_save_load_round_trip(name, interaction_split, sequence_split, tmp_path):
    split = sequence_split if name == "din" else interaction_split
    model = _fit(name, split, epochs=2)
    model.save(tmp_path / "m")
    back = Recommender.load(tmp_path / "m", device="cpu")
    np.testing.assert_allclose(back.predict_proba(split.test), model.predict_proba(split.test), rtol=1e-6)
    assert type(back).__name__ == type(model).__name__ and back.fields_ == model.fields_


def test_field_dims_per_field_and_fm_needs_one_size(interaction_split):
    model = _fit("dcnv2", interaction_split, epochs=1, field_dims={"a": 4, "c": 2})
    assert model.net_.embedding.dims[:3] == [4, 8, 2]
    with pytest.raises(Exception, match="same embedding size"):
        _fit("fm", interaction_split, epochs=1, field_dims={"a": 4})


# ---- the command line: run folder, evaluate, compare -------------------------------------------------
def _write_libsvm(folder, seed=0):
    """Fields user (0-29), item (30-49), ctx (50-52); the label is an interaction of user and item."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for part, n in (("train", 3000), ("validation", 600), ("test", 600)):
        u, i, c = rng.integers(0, 30, n), rng.integers(0, 20, n), rng.integers(0, 3, n)
        y = rng.random(n) < np.where((u + i) % 2 == 0, 0.85, 0.15)
        lines = [f"{1 if yy else -1} {uu}:1 {30 + ii}:1 {50 + cc}:1" for yy, uu, ii, cc in zip(y, u, i, c)]
        (folder / f"toy.{part}.libfm").write_text("\n".join(lines) + "\n")
    return folder


def test_cli_train_evaluate_compare(tmp_path, capsys):
    from recforge.cli import main

    data = _write_libsvm(tmp_path / "toy")
    out = tmp_path / "runs"
    common = ["--data", str(data), "--out", str(out), "--quiet", "data.fields=user,item,ctx", "epochs=4",
              "batch_size=256", "embedding_dim=8", "hidden=[32]", "threads=1"]
    runs = []
    for seed in (0, 1):
        assert main(["train", "deepfm", *common, f"seed={seed}"]) == 0
        runs.append(capsys.readouterr().out.strip().splitlines()[-1])
    run = runs[0]
    from pathlib import Path

    files = {p.name for p in Path(run).iterdir()}
    assert {"config.yaml", "metrics.json", "per_user_test.parquet", "predictions_test.parquet", "encoders", "model",
            "history.json"} <= files
    metrics = json.loads((Path(run) / "metrics.json").read_text())
    assert metrics["task"] == "ctr" and metrics["protocol"]["split"]["method"] == "presplit"
    assert {"auc", "logloss", "gauc", "calibration", "ece"} <= set(metrics["test"])
    assert metrics["protocol"]["user_col"] == "user" and metrics["test"]["auc"] > 0.7
    assert main(["evaluate", run, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-9)
    assert main(["compare", run, runs[1], "--json"]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert cmp["task"] == "ctr" and [r["metric"] for r in cmp["bootstrap"]] == ["auc", "logloss"]
    assert cmp["bootstrap"][0]["unit"] == "user" and {r["metric"] for r in cmp["rows"]} == {"auc", "logloss"}
    assert main(["compare", run, runs[1]]) == 0
    assert "paired bootstrap over users" in capsys.readouterr().out
    # scoring rows with the run's saved encoders: the test rows by default, or a file (unseen values reported)
    assert main(["predict", run, "--out", str(tmp_path / "scores.parquet")]) == 0
    capsys.readouterr()
    scores = pl.read_parquet(tmp_path / "scores.parquet")
    saved = pl.read_parquet(Path(run) / "predictions_test.parquet")
    np.testing.assert_allclose(scores["p:label"].to_numpy(), saved["p:label"].to_numpy(), rtol=1e-6)
    assert main(["predict", run, "--input", str(data / "toy.test.libfm"), "--out", str(tmp_path / "s2.parquet")]) == 0
    capsys.readouterr()
    np.testing.assert_allclose(pl.read_parquet(tmp_path / "s2.parquet")["p:label"].to_numpy(),
                               saved["p:label"].to_numpy(), rtol=1e-6)
    (tmp_path / "new.csv").write_text("user,item,ctx\n999,31,50\n0,30,51\n")
    assert main(["predict", run, "--input", str(tmp_path / "new.csv"), "--out", str(tmp_path / "s3.parquet")]) == 0
    assert "unseen in training, scored as out-of-vocabulary: user 1" in capsys.readouterr().out
    assert pl.read_parquet(tmp_path / "s3.parquet").columns == ["row", "user", "p:label"]
    # a label that is not binary: one line, exit status 2
    (tmp_path / "bad.csv").write_text("clk,u\n1,a\n3,b\n")
    assert main(["train", "lr", "--data", str(tmp_path / "bad.csv"), "--out", str(out), "--quiet",
                 "data.label=clk", "data.categorical=u"]) == 2
    assert "label column 'clk' of the data is not binary: 1 row(s)" in capsys.readouterr().err


def test_din_on_a_fuxictr_spec_and_on_rows_derived_from_a_log(tmp_path):
    import recforge
    from test_ctr_data import _fuxi_tree

    small = ["epochs=1", "batch_size=64", "embedding_dim=4", "attention_hidden=[8]", "hidden=[8]", "threads=1"]
    run = recforge.train("din", data=str(_fuxi_tree(tmp_path)), overrides=small, out=tmp_path / "runs", verbose=False)
    assert run.metrics["protocol"]["din_attention"] == "adgroup_id over click_sequence"
    assert run.metrics["protocol"]["split"]["method"] == "presplit" and run.metrics["test"]["n_rows"] == 100
    run = recforge.train("din", data="synthetic", overrides=small + ["data.negatives=2", "data.history_len=5"],
                         out=tmp_path / "runs", verbose=False)
    p = run.metrics["protocol"]
    assert p["split"]["method"] == "temporal" and "2 negatives per positive" in p["data"]["derived"]
    assert run.metrics["dataset"]["train"]["positive_rate"][0] == pytest.approx(1 / 3, abs=0.02)


def test_xavier_initialisation_of_linear_layers(interaction_split):
    import torch

    from recforge.errors import ConfigError

    model = registry.create("deepfm", **{**SMALL, **SIZES["deepfm"], "linear_init": "xavier", "epochs": 1})
    model.prepare_fit(interaction_split)
    net = model.build(0, 0)
    layers = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert layers and all(float(m.bias.abs().max()) == 0.0 for m in layers)
    big = max(layers, key=lambda m: m.weight.numel())
    fan_out, fan_in = big.weight.shape
    assert float(big.weight.std()) == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.1)
    default = registry.create("deepfm", **{**SMALL, **SIZES["deepfm"], "epochs": 1})
    default.prepare_fit(interaction_split)
    assert any(float(m.bias.abs().max()) > 0 for m in default.build(0, 0).modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ConfigError, match="linear_init='he'"):
        registry.create("deepfm", linear_init="he")
