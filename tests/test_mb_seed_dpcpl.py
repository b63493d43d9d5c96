"""DPCPL (denoising pre-training, customised prompt learning): the training windows and the behaviour
miner by hand, accuracy against popularity on the synthetic funnel, prompt tuning that leaves the
pre-trained encoder bit-identical (and full fine-tuning that does not), the tuned-parameter share,
persistence, raw histories, the run folder and the refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mb_contract import assert_raw_histories_score, ndcg
from recforge.cli import main
from recforge.data.prepare import prepare
from recforge.data.split import leave_one_out
from recforge.data.synthetic import make_synthetic
from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.models.base import Recommender
from recforge.models.general.pop import Pop
from recforge.models.multibehavior.dpcpl import BehaviorMiner, sample_windows
from recforge.models.registry import create
from recforge.pipeline import eval_sets

FAST = dict(hidden=32, inner=64, n_layers=2, scales=[1, 4], max_len=20, pretrain_epochs=2, pretrain_lr=0.003,
            epochs=6, lr=0.01, batch_size=128, eval_every=2, patience=3, threads=1)


@pytest.fixture(scope="module")
def mb():
    split = leave_one_out(prepare(make_synthetic(n_users=400, n_items=200, seed=0, behaviors=True)),
                          target_behavior="buy")
    valid, test = eval_sets(split, None, "buy")
    return split, valid, test


def _fit_with_snapshot(split, valid, finetune):
    """The model fitted with ``finetune``, and a copy of its weights taken between the stages."""
    model = create("dpcpl", verbose=False, device="cpu", seed=0, finetune=finetune, **FAST)
    after_pretraining = {}
    stage_a = model.before_training

    def snapshot(split, valid=None):
        stage_a(split, valid)
        after_pretraining.update({k: v.detach().clone() for k, v in model.net_.state_dict().items()})

    model.before_training = snapshot
    model.fit(split, valid)
    del model.before_training
    return model, after_pretraining


@pytest.fixture(scope="module")
def fitted(mb):
    split, valid, _ = mb
    return {mode: _fit_with_snapshot(split, valid, mode) for mode in ("prompt", "full")}


_ndcg = ndcg


# ---- pieces by hand ---------------------------------------------------------------------------------
def test_training_windows_by_hand():
    users = np.array([0, 0, 0, 1, 1, 2])
    starts, ends = sample_windows(users, max_len=5)
    # every row with an earlier row of its user is a target; its window holds the rows before it
    assert ends.tolist() == [1, 2, 4] and starts.tolist() == [0, 0, 3]
    buy = np.array([False, True, False, False, True, True])
    starts, ends = sample_windows(users, 5, buy)
    assert ends.tolist() == [1, 4] and starts.tolist() == [0, 3]  # user 2's only row has nothing before it
    starts, ends = sample_windows(np.zeros(5, dtype=int), 2)
    assert starts.tolist() == [0, 0, 1, 2] and ends.tolist() == [1, 2, 3, 4]  # at most max_len rows
    assert (ends > starts).all()  # a window never reaches its target row


def _all_pass(miner: BehaviorMiner) -> None:
    """Identity channel mixing and unit filters, no bias, equal scale weights."""
    with torch.no_grad():
        for k in range(len(miner.scales)):
            miner.filters[k].zero_()
            miner.filters[k][..., 0] = 1.0
            miner.mix[k].zero_()
            miner.mix[k][..., 0] = torch.eye(miner.mix[k].shape[1])
            miner.bias[k].zero_()
        miner.fuse.zero_()


def test_behavior_miner_by_hand():
    # a steady signal c = 1 with an alternating disturbance of ±0.1 over four rows, two channels
    x = (1.0 + 0.1 * torch.tensor([1.0, -1.0, 1.0, -1.0])).view(1, 4, 1).repeat(1, 1, 2)
    # without shrinkage the all-pass miner returns its input (FFT round trip)
    exact = BehaviorMiner(4, 2, [1], 1, shrink=0.0)
    _all_pass(exact)
    torch.testing.assert_close(exact(x), x)
    # orthonormal rfft of 4 rows: DC = 4c/2 = 2, Nyquist = 4 * 0.1 / 2 = 0.2, the middle bin 0;
    # shrinking by 0.5 drops the disturbance and takes 0.5 off DC: every row c - 0.5/2 = 0.75
    denoise = BehaviorMiner(4, 2, [1], 1, shrink=0.5)
    _all_pass(denoise)
    torch.testing.assert_close(denoise(x), torch.full_like(x, 0.75))
    # time scale 2 averages pairs of rows (the disturbance cancels); fused half and half with scale 1
    two = BehaviorMiner(4, 2, [1, 2], 2, shrink=0.0)
    _all_pass(two)
    torch.testing.assert_close(two(x), 0.5 * x + 0.5)
    # the chunked diagonal weight mixes channels only inside a chunk: swap the two channels of one chunk
    swap = BehaviorMiner(4, 2, [1], 1, shrink=0.0)
    _all_pass(swap)
    with torch.no_grad():
        swap.mix[0][0, :, :, 0] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    y = torch.stack([x[..., 0], 2 * x[..., 1]], -1)
    torch.testing.assert_close(swap(y), y.flip(-1))


# ---- accuracy, the two stages -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["prompt", "full"])
def test_beats_popularity_on_the_funnel(mb, fitted, mode):
    split, _, test = mb
    pop = _ndcg(Pop().fit(split), test)
    assert _ndcg(fitted[mode][0], test) > pop * 1.1


def test_prompt_tuning_freezes_the_encoder(fitted):
    model, before = fitted["prompt"]
    after = model.net_.state_dict()
    encoder = [k for k in after if not k.startswith("prompts.")]
    prompts = [k for k in after if k.startswith("prompts.")]
    assert len(encoder) > 10 and prompts
    for k in encoder:  # bit-identical
        assert torch.equal(after[k], before[k]), k
    assert any(not torch.equal(after[k], before[k]) for k in prompts)
    assert not torch.equal(after["prompts.factors"], before["prompts.factors"])


def test_full_finetuning_changes_the_encoder(fitted):
    model, before = fitted["full"]
    after = model.net_.state_dict()
    assert not torch.equal(after["item.weight"], before["item.weight"])
    assert not torch.equal(after["layers.0.miner.mix.0"], before["layers.0.miner.mix.0"])


@pytest.mark.parametrize("mode", ["prompt", "full"])
def test_tuned_share_is_what_the_counts_say(fitted, mode):
    model = fitted[mode][0]
    notes = model.protocol_notes()
    total = sum(p.numel() for p in model.net_.parameters())
    prompt = sum(p.numel() for p in model.net_.prompts.parameters())
    tuned = prompt if mode == "prompt" else total
    assert notes["finetune"] == mode
    assert notes["params_total"] == total and notes["params_tuned"] == tuned
    assert math.isclose(notes["tuned_share"], tuned / total)
    if mode == "prompt":
        assert notes["tuned_share"] < 0.2
    # both stages ran and are reported: epochs and seconds of each
    assert notes["pretrain_epochs"] == FAST["pretrain_epochs"] and notes["pretrain_seconds"] > 0
    assert notes["tune_epochs"] == len(model.history_["epochs"]) >= 1 and notes["tune_seconds"] > 0
    json.dumps(notes)


# ---- persistence, ranking-time histories ---------------------------------------------------------------
def test_save_load_round_trip(mb, fitted, tmp_path):
    _, _, test = mb
    model = fitted["prompt"][0]
    hist = test.histories.slice(0, 50)
    before = model.score(hist)
    loaded = Recommender.load(model.save(tmp_path / "dpcpl"))
    assert type(loaded) is type(model) and loaded.behaviors_ == ["buy", "cart", "view"]
    torch.testing.assert_close(loaded.score(hist), before, rtol=0, atol=0)
    assert loaded.protocol_notes() == model.protocol_notes()


def test_raw_histories_and_fresh_events(mb, fitted):
    """recommend / serving pass raw histories (no behaviours; an unknown user is -1); a fresh
    event changes the result, and so do the behaviours of the rows."""
    _, _, test = mb
    model = fitted["prompt"][0]
    h, items, raw = assert_raw_histories_score(model, test)
    s = model.score(raw)
    fresh = Histories.from_lists([int(h.users[0]), -1], [items[0] + [7], items[1]], h.n_items)
    moved = model.score(fresh)
    assert not torch.allclose(moved[0], s[0]) and torch.allclose(moved[1], s[1])
    part = test.histories.slice(0, 20)
    plain = Histories(part.users, part.indptr, part.items, part.n_items)  # every row taken as a view
    assert not torch.allclose(model.score(part), model.score(plain))


# ---- bad input -------------------------------------------------------------------------------------------
def test_refuses_data_without_behaviours_or_target():
    plain = leave_one_out(prepare(make_synthetic(n_users=60, n_items=40, seed=1)))
    with pytest.raises(ConfigError, match="no behaviour column"):
        create("dpcpl", verbose=False, epochs=1).fit(plain)
    untargeted = leave_one_out(prepare(make_synthetic(n_users=60, n_items=40, seed=1, behaviors=True)))
    with pytest.raises(ConfigError, match="data.target_behavior=NAME"):
        create("dpcpl", verbose=False, epochs=1).fit(untargeted)


@pytest.mark.parametrize("kw, message", [
    (dict(finetune="lora"), "finetune='lora': choose prompt"),
    (dict(scales=[1, 0]), "scales="),
    (dict(scales=[4, 4]), "scales="),
    (dict(n_blocks=3), "must divide hidden=64"),
    (dict(pretrain_noise=1.0), "pretrain_noise"),
    (dict(n_prompts=0), "n_prompts >= 1"),
    (dict(pretrain_epochs=-1), "pretrain_epochs >= 0"),
])
def test_refuses_bad_settings(kw, message):
    with pytest.raises(ConfigError, match=message):
        create("dpcpl", **kw)


# ---- the run folder ------------------------------------------------------------------------------------
def test_train_run_folder(tmp_path):
    out = tmp_path / "runs"
    assert main(["train", "dpcpl", "--data", "synthetic-mb", "data.target_behavior=buy", "epochs=2",
                 "pretrain_epochs=1", "hidden=16", "inner=32", "n_layers=1", "max_len=10", "scales=[1,2]",
                 "threads=1", "--out", str(out), "--quiet"]) == 0
    (run,) = out.iterdir()
    text = " ".join(p.read_text() for p in run.glob("*.json"))
    assert '"params_tuned"' in text and '"pretrain_epochs": 1' in text
