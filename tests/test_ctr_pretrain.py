"""ALPT (low-precision embedding tables) and MAP (self-supervised pre-training) on the CTR models:
int8 tables that shrink and still learn the interaction effect, unbiased stochastic rounding,
save/load and checkpoint resume; MFP and RFD losses that fall, the masking rule, every baseline's
representation, and one clear error for bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recforge.errors import ConfigError
from recforge.models import registry
from recforge.models.base import Recommender
from recforge.models.ctr.alpt import QuantEmbedding, lsq, quantize, stochastic_round
from recforge.models.ctr.map import Pretrainer, choose_fields, n_masked
from test_ctr_models import SIZES, SMALL, _fit, _test_auc, interaction_split, sequence_split  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def lr_auc(interaction_split):
    return _test_auc(_fit("lr", interaction_split), interaction_split)


@pytest.fixture(scope="module")
def alpt_deepfm(interaction_split):
    return _fit("deepfm", interaction_split, embedding_bits=8)


# ---- ALPT -------------------------------------------------------------------------------------------
def test_alpt_stores_int8_tables_a_quarter_of_fp32_and_beats_lr(alpt_deepfm, interaction_split, lr_auc):
    tables = list(alpt_deepfm.net_.embedding.tables.values())
    assert tables and all(isinstance(t, QuantEmbedding) and t.codes.dtype == torch.int8 for t in tables)
    assert not any(n.endswith("codes") for n, _ in alpt_deepfm.net_.named_parameters())  # a buffer, not trained by Adam
    size = alpt_deepfm.embedding_bytes()
    assert size["bits"] == 8 and size["codes"] * 4 == size["fp32"]
    d = alpt_deepfm.embedding_dim  # one float32 step size per row beside d one-byte codes
    assert size["stored"] == pytest.approx(size["fp32"] * (d + 4) / (4 * d))
    value = _test_auc(alpt_deepfm, interaction_split)
    assert value > lr_auc + 0.15, (value, lr_auc)
    notes = alpt_deepfm.protocol_notes()
    assert notes["embedding_bits"] == 8 and notes["alpt"]["embedding_bytes"] == size
    assert _fit("lr", interaction_split, epochs=1).protocol_notes()["embedding_bits"] == 32


def test_alpt_learns_step_sizes_and_a_table_step_is_a_quarter(interaction_split):
    model = _fit("dcnv2", interaction_split, epochs=2, embedding_bits=8, alpt_step="table")
    t = model.net_.embedding.tables["t0"]
    assert t.step.shape == (1, 1)
    fresh = QuantEmbedding(t.num_embeddings, t.embedding_dim, 8, "table")
    assert float(t.step.detach()) != pytest.approx(float(fresh.step.detach()), rel=1e-6)  # moved by its gradient
    size = model.embedding_bytes()
    assert size["stored"] - size["fp32"] / 4 == 4 * len(model.net_.embedding.tables)


def test_alpt_save_load_keeps_int8_tables_and_predictions(alpt_deepfm, interaction_split, tmp_path):
    alpt_deepfm.save(tmp_path / "m")
    back = Recommender.load(tmp_path / "m", device="cpu")
    for k, t in back.net_.embedding.tables.items():
        assert t.codes.dtype == torch.int8
        assert torch.equal(t.codes, alpt_deepfm.net_.embedding.tables[k].codes)
    np.testing.assert_array_equal(back.predict_proba(interaction_split.test), alpt_deepfm.predict_proba(interaction_split.test))


def test_stochastic_rounding_is_unbiased():
    x = torch.tensor([0.1, 0.5, -1.3, 2.75, -0.01, 3.0, -2.5])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([stochastic_round(x, g) for _ in range(20000)])
    assert torch.all((draws == torch.floor(x)) | (draws == torch.ceil(x)))  # one of the two neighbours
    np.testing.assert_allclose(draws.mean(0).numpy(), x.numpy(), atol=0.015)
    codes = quantize(torch.tensor([[0.5, -9.0, 9.0, 0.013]]), torch.tensor(0.01), bits=4, generator=g)
    assert codes.dtype == torch.int8 and codes[0, 1] == -7 and codes[0, 2] == 7  # clipped to ±(2^(b-1) - 1)
    # the step size's gradient through LSQ's quantiser: round(w/Δ) - w/Δ inside the range, ±Q where clipped
    step = torch.full((3,), 0.1, requires_grad=True)
    lsq(torch.tensor([0.26, 5.0, -5.0]), step, bits=4).sum().backward()
    torch.testing.assert_close(step.grad, torch.tensor([0.4, 7.0, -7.0]))


def test_alpt_low_bits_and_resume_from_a_checkpoint(interaction_split, tmp_path):
    model = _fit("fm", interaction_split, epochs=1, embedding_bits=2)
    codes = torch.cat([t.codes.flatten() for t in model.net_.embedding.tables.values()])
    assert codes.abs().max() <= 1 and model.embedding_bytes()["packed"] < model.embedding_bytes()["stored"]
    # a run stopped after 2 epochs and resumed ends as an uninterrupted one (codes, steps and Adam moments kept)
    common = dict(epochs=3, patience=10, embedding_bits=8)
    whole = _fit("deepfm", interaction_split, **common)
    first = registry.create("deepfm", **{**SMALL, **SIZES["deepfm"], **common})
    first.checkpoint_dir = tmp_path / "ck"

    def stop(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    first.callbacks = [stop]
    first.fit(interaction_split, interaction_split.valid)
    resumed = registry.create("deepfm", **{**SMALL, **SIZES["deepfm"], **common})
    resumed.resume_from = tmp_path / "ck" / "last.pt"
    resumed.fit(interaction_split, interaction_split.valid)
    np.testing.assert_allclose(resumed.predict_proba(interaction_split.test), whole.predict_proba(interaction_split.test),
                               rtol=1e-5)


def test_alpt_refusals():
    with pytest.raises(ConfigError, match="embedding_bits=3: choose null"):
        registry.create("deepfm", embedding_bits=3)
    with pytest.raises(ConfigError, match="alpt_step='col'"):
        registry.create("dcnv2", embedding_bits=8, alpt_step="col")


def test_alpt_on_lr_says_it_has_no_tables(interaction_split):
    with pytest.raises(ConfigError, match="lr has no embedding tables"):
        _fit("lr", interaction_split, epochs=1, embedding_bits=8)


# ---- MAP --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mfp", "rfd"])
def test_map_pretraining_loss_falls_and_the_fine_tuned_model_beats_lr(method, interaction_split, lr_auc):
    model = _fit("deepfm", interaction_split, pretrain={"method": method, "epochs": 6, "lr": 3e-3})
    pre = model.history_["pretrain"]
    losses = [e["loss"] for e in pre["epochs"]]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    value = _test_auc(model, interaction_split)
    assert value > lr_auc + 0.15, (method, value, lr_auc)
    notes = model.protocol_notes()["pretrain"]
    assert notes["method"] == method and notes["epochs_run"] == 6 and notes["mask_ratio"] == 0.3
    assert notes["fields_masked"] == 1 and notes["categorical_fields"] == 3 and notes["seconds"] > 0
    assert (notes["negatives"] == 25) if method == "mfp" else (notes["replace"] == "unigram")
    assert model.history_["best_epoch"] >= 1 and "auc" in model.history_["epochs"][0]  # then CTR training as usual


def test_masking_chooses_exactly_k_categorical_fields_per_row(interaction_split):
    assert [n_masked(n, 0.3) for n in (1, 3, 5, 10, 39)] == [1, 1, 2, 3, 12]
    assert n_masked(4, 1.0) == 4 and n_masked(5, 0.5) == 3
    mask = choose_fields(1000, 7, 3, torch.Generator().manual_seed(0))
    assert (mask.sum(1) == 3).all() and (mask.float().mean(0) - 3 / 7).abs().max() < 0.06
    model = _fit("dcnv2", interaction_split, epochs=1, pretrain={"method": "mfp", "epochs": 1, "mask_ratio": 0.6})
    batch = interaction_split.train.batch(np.arange(500))
    for method in ("mfp", "rfd"):
        model.pretrain = {"method": method, "mask_ratio": 0.6}
        p = Pretrainer(model, interaction_split)
        prep = p.corrupt(batch)
        assert [f["name"] for f in p.cats] == ["a", "b", "c"] and p.k == 2
        assert (prep["chosen"].sum(1) == 2).all()
        changed = torch.stack([prep["batch"][n] != batch[n] for n in ("a", "b", "c")], 1)
        assert not (changed & ~prep["chosen"]).any()  # only chosen fields change
        for n in ("x", "tags"):  # numeric and multi-valued fields are never corrupted
            assert torch.equal(prep["batch"][n], batch[n])
        if method == "mfp":
            assert changed.equal(prep["chosen"]) and (torch.stack([prep["batch"][n] for n in "abc"], 1)[prep["chosen"]] == 0).all()
            assert prep["noise"].shape == (1000, 25)
        else:
            assert prep["labels"].equal(changed.float())


@pytest.mark.parametrize("name", ["lr", "fm", "deepfm", "dcnv2", "finalmlp", "din"])
def test_every_baseline_exposes_a_representation_for_map(name, interaction_split, sequence_split):
    split = sequence_split if name == "din" else interaction_split
    model = _fit(name, split, epochs=1, pretrain={"method": "mfp", "epochs": 1})
    assert len(model.history_["pretrain"]["epochs"]) == 1
    net = model.net_.eval()
    batch = split.test.batch(np.arange(64))
    with torch.no_grad():
        h = net.represent(batch)
        assert h.dim() == 2 and h.shape[0] == 64 and torch.isfinite(h).all()
        if name in ("dcnv2", "din"):  # the prediction layer reads exactly the representation
            head = net.out if name == "dcnv2" else net.dnn[-1]
            torch.testing.assert_close(net(batch), head(h))


def test_a_bad_pretrain_setting_is_one_config_error():
    with pytest.raises(ConfigError, match="pretrain.method='bert': choose mfp .* or rfd") as err:
        registry.create("deepfm", pretrain={"method": "bert"})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown key"):
        registry.create("dcnv2", pretrain={"method": "mfp", "ratio": 0.3})
    with pytest.raises(ConfigError, match="mask_ratio"):
        registry.create("fm", pretrain={"method": "rfd", "mask_ratio": 0})
    from recforge import config as C

    cfg = C.apply_overrides(C.base_config("deepfm"), ["pretrain={method: rfd, epochs: 2}"])
    assert cfg["model"]["pretrain"] == {"method": "rfd", "epochs": 2}


def test_map_on_a_multi_task_model_says_it_has_no_representation():
    import polars as pl

    from recforge.data.features import FeatureSpec, Schema
    from test_ctr_models import _split

    rng = np.random.default_rng(2)
    df = pl.DataFrame({"a": rng.integers(0, 5, 400).astype(str), "b": rng.integers(0, 5, 400).astype(str),
                       "y1": rng.integers(0, 2, 400), "y2": rng.integers(0, 2, 400)})
    split = _split(df, Schema([FeatureSpec("a"), FeatureSpec("b")], ["y1", "y2"]))
    with pytest.raises(ConfigError, match="does not expose the representation"):
        _fit("sharedbottom", split, epochs=1, pretrain="mfp")
