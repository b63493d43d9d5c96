"""DPO and CausalDPO (recforge.llm.causaldpo): the losses on hand-worked numbers, the soft environments,
preference pairs drawn from training rows only, alignment that moves a tiny randomly initialised Llama
towards the preferred answers, persistence, and the task on a split whose test period differs
(``split.method=temporal``)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from recforge.errors import ConfigError
from recforge.llm.causaldpo import (backdoor_loss, dpo_loss, environment_mmd, preference_pairs,
                                    soft_environments)
from test_llm import ml, needs_llm, split, tiny  # noqa: F401 - pytest fixtures shared with test_llm


# ---- the losses ------------------------------------------------------------------------------------------
def test_dpo_loss_on_hand_worked_log_probabilities():
    t = torch.tensor
    # rewards: chosen 0.5 * (-0.5 + 0.7) = 0.1, rejected 0.5 * (-1.0 + 0.9) = -0.05
    one = dpo_loss(t([-0.5]), t([-1.0]), t([-0.7]), t([-0.9]), beta=0.5)
    assert one.item() == pytest.approx(math.log(1 + math.exp(-0.15)), abs=1e-6)
    assert one.item() == pytest.approx(-torch.nn.functional.logsigmoid(t(0.15)).item(), abs=1e-6)
    # a second rejected prompt with reward 0.5 * (-0.2 + 0.9) = 0.35: log(1 + e^-0.15 + e^0.25)
    two = dpo_loss(t([-0.5]), t([[-1.0, -0.2]]), t([-0.7]), t([[-0.9, -0.9]]), beta=0.5)
    assert two.item() == pytest.approx(math.log(1 + math.exp(-0.15) + math.exp(0.25)), abs=1e-6)
    # a policy equal to the reference: log 2 per pair
    same = dpo_loss(t([-0.3, -2.0]), t([-1.0, -0.1]), t([-0.3, -2.0]), t([-1.0, -0.1]), beta=1.0)
    assert torch.allclose(same, torch.full((2,), math.log(2)))


def test_backdoor_loss_weights_environments_equally():
    losses = torch.tensor([1.0, 2.0, 3.0, 6.0])
    hard = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert backdoor_loss(losses, hard).item() == pytest.approx((2.0 + 6.0) / 2)  # the plain mean is 3
    assert backdoor_loss(losses, torch.full((4, 2), 0.5)).item() == pytest.approx(3.0)
    empty = torch.tensor([[1.0, 0.0]] * 4)  # an environment with no mass in the batch is left out
    assert backdoor_loss(losses, empty).item() == pytest.approx(3.0)


def test_environment_mmd_hand_worked():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    hard = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # within-environment kernel 1, across exp(-|a-b|^2 / 2) = e^-1: 1 + 1 - 2 e^-1
    assert environment_mmd(z, hard, 1.0).item() == pytest.approx(2 - 2 * math.exp(-1), abs=1e-6)
    assert environment_mmd(z, torch.full((4, 2), 0.5), 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert environment_mmd(z, torch.ones(4, 1), 1.0).item() == 0.0


def test_soft_environments_recover_two_groups_deterministically():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.05, (20, 8)) + np.eye(8)[0] * 3
    b = rng.normal(0, 0.05, (15, 8)) - np.eye(8)[0] * 3
    x = np.vstack([a, b])
    q, c = soft_environments(x, 2, 0.1, seed=3)
    assert q.shape == (35, 2) and np.allclose(q.sum(1), 1) and c.shape == (2, 8)
    lab = q.argmax(1)
    assert len(set(lab[:20])) == 1 and len(set(lab[20:])) == 1 and lab[0] != lab[-1]
    assert q.max(1).min() > 0.99  # well separated groups: near-hard assignments at temperature 0.1
    q2, _ = soft_environments(x, 2, 0.1, seed=3)
    assert np.array_equal(q, q2)
    q_warm, _ = soft_environments(x, 2, 10.0, seed=3)
    assert q_warm.max(1).max() < 0.6  # a high temperature spreads the mass


# ---- pairs from training rows only ---------------------------------------------------------------------------
def test_preference_pairs_reject_items_without_a_training_rating(split):
    from recforge.llm import prompts as P

    _, sp = split
    targets = P.sample_targets(P.eligible(sp, "train"), 30, 0)
    chosen, rejected = preference_pairs(sp, targets, negatives=2, seed=1)
    assert chosen.height == int((targets["label"] == 1).sum()) > 0 and rejected.height == 2 * chosen.height
    assert (rejected["label"] == 0).all()
    reps = np.repeat(np.arange(chosen.height), 2)
    for col in ("user_id", "timestamp", "row"):
        assert np.array_equal(rejected[col].to_numpy(), chosen[col].to_numpy()[reps])
    rated = set(map(tuple, sp.train.select("user_id", "item_id").rows()))
    assert not any((u, i) in rated for u, i in rejected.select("user_id", "item_id").rows())
    again = preference_pairs(sp, targets, negatives=2, seed=1)[1]
    assert again["item_id"].to_list() == rejected["item_id"].to_list()
    with pytest.raises(ConfigError, match="no liked row"):
        preference_pairs(sp, targets.with_columns(pl.lit(0, pl.Int8).alias("label")), 1, 0)


# ---- the models on a tiny Llama ------------------------------------------------------------------------------
def dpo_model(tiny, cls="dpo", **kw):
    from recforge.llm.causaldpo import DPO, CausalDPO

    params = dict(backbone=str(tiny), k=4, verbose=False, score_batch_size=4, epochs=1, batch_size=4, lr=5e-2,
                  lora_r=4, lora_alpha=8, lora_dropout=0.0, dpo_epochs=6, dpo_lr=5e-2, seed=0)
    params.update(kw)
    return (CausalDPO if cls == "causaldpo" else DPO)(**params)


@needs_llm
@pytest.mark.parametrize("cls", ["dpo", "causaldpo"])
def test_alignment_prefers_the_liked_items_over_its_sft_start(tiny, split, cls, tmp_path):
    from recforge.llm import prompts as P
    from recforge.llm.rella import PromptData, ReLLa

    _, sp = split
    fmt = P.PromptFormat()
    targets = P.sample_targets(P.eligible(sp, "train"), 40, 2)
    m = dpo_model(tiny, cls)
    m.fit(PromptData(sp, fmt, train_targets=targets))
    al = m.history_["alignment"]
    assert al["pairs"] == int((targets["label"] == 1).sum()) and len(al["epochs"]) == 6
    # the policy starts as the reference (margin 0); after the preference epochs the liked prompts'
    # P(Yes) has risen against the rejected ones' relative to the SFT model
    assert al["epochs"][-1]["margin"] > 0.03 and al["epochs"][-1]["accuracy"] > 0.6
    assert al["epochs"][-1]["loss"] < al["epochs"][0]["loss"]
    chosen, rejected = preference_pairs(sp, targets, 1, m.seed)
    sft = ReLLa(backbone=str(tiny), k=4, verbose=False, score_batch_size=4, epochs=1, batch_size=4, lr=5e-2,
                lora_r=4, lora_alpha=8, lora_dropout=0.0, seed=0, retrieval="recent", mix=False)
    sft.fit(PromptData(sp, fmt, train_targets=targets))  # the SFT stage alone, same seed: the start of alignment
    data = PromptData(sp, fmt)

    def gap(model):
        return float(np.mean(model.predict(data, chosen)[1] - model.predict(data, rejected)[1]))

    assert gap(m) > gap(sft) + 0.02
    if cls == "causaldpo":
        assert len(al["environment_mass"]) == 2 and sum(al["environment_mass"]) == pytest.approx(al["pairs"], abs=0.1)
        assert "environments" in m.protocol_notes() and "CausalDPO" in m.protocol_notes()["tuning"]
    m.save(tmp_path / cls)
    back = type(m).load(tmp_path / cls)
    assert np.allclose(back.predict(data, chosen)[1], m.predict(data, chosen)[1], atol=1e-6)
    # starting from the saved SFT model gives the same aligned model as tuning the SFT stage itself
    sft.save(tmp_path / "sft")
    resumed = dpo_model(tiny, cls, sft_from=str(tmp_path / "sft"))
    resumed.fit(PromptData(sp, fmt, train_targets=targets))
    assert resumed.history_["sft"]["from"] == str(tmp_path / "sft")
    assert np.allclose(resumed.predict(data, chosen)[1], m.predict(data, chosen)[1], atol=1e-5)
    with pytest.raises(ConfigError, match="LoRA"):
        dpo_model(tiny, cls, sft_from=str(tmp_path / "sft"), lora_r=2).fit(PromptData(sp, fmt, train_targets=targets))


@needs_llm
def test_parameters_and_missing_training_prompts_are_clear_errors(tiny, split):
    from recforge.llm import prompts as P
    from recforge.llm.rella import PromptData

    with pytest.raises(ConfigError, match="beta"):
        dpo_model(tiny, beta=0)
    with pytest.raises(ConfigError, match="environments"):
        dpo_model(tiny, "causaldpo", environments=1)
    _, sp = split
    with pytest.raises(ConfigError, match="data.train_prompts"):
        dpo_model(tiny).fit(PromptData(sp, P.PromptFormat()))


# ---- the task on a temporal split ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ml_shared_time(ml, tmp_path_factory):
    """The tiny data set with every user's ratings spread over one shared period (the fixture's users
    rate one after another, so a global cut-off would leave no test user with a training row)."""
    import shutil

    out = tmp_path_factory.mktemp("data") / "ml-shared-time"
    shutil.copytree(ml, out)
    rows = [line.split("\t") for line in (ml / "u.data").read_text().split("\n") if line]
    pos: dict[str, int] = {}
    lines = []
    for u, i, r, _ in rows:
        pos[u] = pos.get(u, 0) + 1
        lines.append(f"{u}\t{i}\t{r}\t{880000000 + 100 * pos[u] + int(u)}")
    (out / "u.data").write_text("\n".join(lines) + "\n")
    return out


def test_global_temporal_split_has_a_later_test_period(ml_shared_time):
    from recforge import config as C
    from recforge.llm import prompts as P
    from recforge.pipeline import load_dataset

    cfg = C.base_config("pop", str(ml_shared_time))
    cfg["data"]["cache"] = False
    ds = load_dataset(cfg["data"])
    sp = P.temporal_split(ds, test_ratio=0.25, like_threshold=4)
    assert sp.protocol["method"] == "temporal" and sp.train["timestamp"].max() < sp.test["timestamp"].min()
    assert sp.protocol["cutoff"] == sp.test["timestamp"].min()
    assert sp.train.height + sp.test.height == ds.interactions.height
    assert abs(sp.test.height / ds.interactions.height - 0.25) < 0.05


@needs_llm
def test_task_runs_causaldpo_on_the_temporal_split(tiny, ml_shared_time, tmp_path):
    from recforge.llm import task

    common = {"llm.path": str(tiny), "data.test_prompts": 15, "data.cache": False, "split.method": "temporal",
              "split.test_ratio": 0.25, "model.k": 4, "model.verbose": False, "data.train_prompts": 12,
              "data.max_train_share": 0.2, "model.epochs": 1, "model.dpo_epochs": 1, "model.lr": 0.01}
    run = task.train("causaldpo", str(ml_shared_time), common, out=tmp_path, verbose=False)
    m = run.metrics
    assert m["protocol"]["split"]["method"] == "temporal" and 0 <= m["test"]["auc"] <= 1
    assert m["protocol"]["environments"]["k"] == 2 and "CausalDPO" in m["protocol"]["tuning"]
    assert run.config["model"]["mmd_weight"] == 0.1
    with pytest.raises(ConfigError, match="temporal_user"):
        task.train("dpo", str(ml_shared_time), {**common, "split.method": "random"}, out=tmp_path, verbose=False)
