"""The shared trainer: learning-rate schedules, callbacks, checkpoints and resuming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import recforge
from recforge.cli import main
from recforge.errors import ConfigError, RecForgeError
from recforge.models import registry
from recforge.training.trainer import lr_factor, load_checkpoint


class _Sched:
    def __init__(self, **kw):
        self.epochs, self.warmup_epochs, self.lr_schedule, self.lr_step, self.lr_gamma = 10, 0.0, "constant", 3, 0.5
        vars(self).update(kw)


def test_lr_factor_by_hand():
    assert lr_factor(_Sched(), 7.3) == 1.0
    cos = _Sched(lr_schedule="cosine")
    assert lr_factor(cos, 0.0) == pytest.approx(1.0)
    assert lr_factor(cos, 5.0) == pytest.approx(0.5)
    assert lr_factor(cos, 10.0) == pytest.approx(0.0, abs=1e-12)
    warm = _Sched(lr_schedule="cosine", warmup_epochs=2.0)
    assert lr_factor(warm, 1.0) == pytest.approx(0.5)  # half-way through the warm-up
    assert lr_factor(warm, 2.0) == pytest.approx(1.0)  # cosine starts after the warm-up
    assert lr_factor(warm, 6.0) == pytest.approx(0.5)  # half of the 8 remaining epochs
    step = _Sched(lr_schedule="step")
    assert [lr_factor(step, t) for t in (0.0, 2.9, 3.0, 6.5)] == pytest.approx([1.0, 1.0, 0.5, 0.25])
    # every 3 optimiser updates, 4 updates an epoch: after 2, 3, 5, 6 and 12 updates
    per_update = _Sched(lr_schedule="step", lr_step_unit="update")
    assert [lr_factor(per_update, u / 4, 4) for u in (2, 3, 5, 6, 12)] == pytest.approx([1.0, 0.5, 0.5, 0.25, 0.0625])
    # the epoch unit ignores the number of updates an epoch
    assert lr_factor(step, 1.5, 4) == lr_factor(step, 1.5) == 1.0


def _model(name="sasrec", **kw):
    params = {"epochs": 4, "verbose": False, "seed": 1, "patience": 10}
    if name == "sasrec":
        params.update(max_len=10, hidden=16, inner=32, batch_size=64)
    else:
        params.update(dim=16, batch_size=256, eval_every=1)
    return registry.create(name, **(params | kw))


def test_schedule_changes_the_learning_rate_in_training(synthetic_loo):
    split, valid, _ = synthetic_loo
    m = _model(lr_schedule="cosine", warmup_epochs=1.0, epochs=3).fit(split, valid)
    lrs = [row["lr"] for row in m.history_["epochs"]]
    assert 0.5 * m.lr < lrs[0] <= m.lr  # the last batch of the warm-up epoch
    assert lrs[0] > lrs[1] > lrs[2]
    with pytest.raises(ConfigError, match="lr_schedule"):
        _model(lr_schedule="linear").fit(split, valid)


def test_step_schedule_counts_optimiser_updates(synthetic_loo):
    split, valid, _ = synthetic_loo
    m = _model(lr_schedule="step", lr_step_unit="update", lr_step=3, lr_gamma=0.5, epochs=3).fit(split, valid)
    n = m.n_train_batches(split)
    # an epoch's row carries the rate of its last update, taken after (e - 1) * n + n - 1 updates
    want = [m.lr * 0.5 ** (((e - 1) * n + n - 1) // 3) for e in (1, 2, 3)]
    assert n > 3 and [row["lr"] for row in m.history_["epochs"]] == pytest.approx(want)
    with pytest.raises(ConfigError, match="lr_step_unit"):
        _model(lr_schedule="step", lr_step_unit="steps").fit(split, valid)


def test_callbacks_see_every_epoch_and_can_stop_training(synthetic_loo):
    split, valid, _ = synthetic_loo
    seen = []
    m = _model(epochs=3)
    m.callbacks = [lambda epoch, row: seen.append((epoch, row["ndcg@10"]))]
    m.fit(split, valid)
    assert [e for e, _ in seen] == [1, 2, 3]
    assert all(0 <= v <= 1 for _, v in seen)

    class Stop(Exception):
        pass

    def stop(epoch, row):
        if epoch == 2:
            raise Stop

    m = _model(epochs=3)
    m.callbacks = [stop]
    with pytest.raises(Stop):
        m.fit(split, valid)


class _Crash(Exception):
    pass


def _crash_after(epoch):
    def cb(e, row):
        if e == epoch:
            raise _Crash
    return cb


@pytest.mark.parametrize("name", ["sasrec", "lightgcn"])
def test_resume_gives_the_same_final_model_as_an_uninterrupted_run(synthetic_loo, tmp_path, name):
    split, valid, test = synthetic_loo
    ref = _model(name).fit(split, valid)

    crashed = _model(name)
    crashed.checkpoint_dir = tmp_path / "ckpt"
    crashed.callbacks = [_crash_after(2)]
    with pytest.raises(_Crash):
        crashed.fit(split, valid)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["best.pt", "last.pt"]  # nothing temporary left beside them
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 2

    resumed = _model(name)
    resumed.resume_from = tmp_path / "ckpt" / "last.pt"
    resumed.fit(split, valid)
    assert [r["epoch"] for r in resumed.history_["epochs"]] == [1, 2, 3, 4]
    assert [r["ndcg@10"] for r in resumed.history_["epochs"]] == [r["ndcg@10"] for r in ref.history_["epochs"]]
    for (k, a), b in zip(ref.net_.state_dict().items(), resumed.net_.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_of_another_model_is_refused(synthetic_loo, tmp_path):
    split, valid, _ = synthetic_loo
    m = _model("sasrec", epochs=1)
    m.checkpoint_dir = tmp_path
    m.fit(split, valid)
    other = _model("lightgcn")
    other.resume_from = tmp_path / "last.pt"
    with pytest.raises(RecForgeError, match="checkpoint of sasrec"):
        other.fit(split, valid)


SMALL_SASREC = ["max_len=10", "hidden=16", "inner=32", "patience=10", "seed=2"]


def test_cli_resume_extends_a_finished_run(tmp_path, capsys):
    out = str(tmp_path / "runs")
    assert main(["train", "sasrec", "--data", "synthetic", "--out", out, "--quiet", "epochs=4", *SMALL_SASREC]) == 0
    full = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["train", "sasrec", "--data", "synthetic", "--out", out, "--quiet", "epochs=2", *SMALL_SASREC]) == 0
    short = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (short / "checkpoints" / "last.pt").exists() and (short / "checkpoints" / "best.pt").exists()
    assert main(["train", "--resume", str(short), "--out", out, "--quiet", "epochs=4"]) == 0
    resumed = Path(capsys.readouterr().out.strip().splitlines()[-1])
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (full, resumed))
    assert b["resumed_from"] == str(short)
    assert a["test"]["ndcg@10"] == b["test"]["ndcg@10"] and a["valid"] == b["valid"]
    # the history names the checkpoint's epoch and the seconds counted before it (a fresh run has neither)
    short_hist = json.loads((short / "history.json").read_text())
    mark = json.loads((resumed / "history.json").read_text())["resumed"]
    assert mark["after_epoch"] == 2 and 0 < mark["seconds_before"] <= short_hist["seconds"]  # as of its last checkpoint
    assert "resumed" not in short_hist


KILL_AT_EPOCH_2 = """
import os, sys
import recforge
import recforge.training.trainer as T
save = T.atomic_save
def save_then_die(obj, path):
    save(obj, path)
    if path.name == "last.pt" and obj["epoch"] == 2:
        os._exit(3)
T.atomic_save = save_then_die
recforge.train("sasrec", "synthetic", sys.argv[2:], out=sys.argv[1], verbose=False)
"""


def test_a_killed_run_resumes_from_its_partial_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    overrides = ["epochs=3", *SMALL_SASREC]
    proc = subprocess.run([sys.executable, "-c", KILL_AT_EPOCH_2, str(out), *overrides], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    partial = [p for p in out.iterdir() if p.name.startswith(".partial-")]
    assert len(partial) == 1 and (partial[0] / "config.yaml").exists()
    assert main(["train", "--resume", str(partial[0]), "--out", str(out), "--quiet"]) == 0
    resumed = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert not partial[0].exists()  # the finished run supersedes it
    full = recforge.train("sasrec", "synthetic", overrides, out=tmp_path / "ref", verbose=False)
    m = json.loads((resumed / "metrics.json").read_text())
    assert m["test"]["ndcg@10"] == full.metrics["test"]["ndcg@10"]
    assert [r["epoch"] for r in json.loads((resumed / "history.json").read_text())["epochs"]] == [1, 2, 3]


def test_cli_config_file_and_bad_resume(tmp_path, capsys):
    out = str(tmp_path / "runs")
    assert main(["train", "bpr", "--data", "synthetic", "--out", out, "--quiet", "epochs=1", "dim=8"]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["train", "--config", str(run / "config.yaml"), "--out", out, "--quiet", "seed=5"]) == 0
    again = Path(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = (again / "config.yaml").read_text()
    assert "dim: 8" in cfg and "seed: 5" in cfg
    assert main(["train", "--resume", str(tmp_path), "--quiet"]) == 2
    assert "--resume takes a run folder" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["train", "--data", "synthetic"]) == 2
    assert "needs a model name" in capsys.readouterr().err


def test_plateau_schedule_divides_the_rate_after_each_validation_without_progress(tmp_path):
    import json

    import recforge
    from recforge.training.trainer import plateau_drops

    rows = [{"epoch": 1, "ndcg@10": 0.1}, {"epoch": 2, "ndcg@10": 0.1}, {"epoch": 3}, {"epoch": 4, "ndcg@10": 0.2},
            {"epoch": 5, "ndcg@10": 0.15}]
    assert [plateau_drops(rows[:k], "ndcg@10") for k in range(6)] == [0, 0, 1, 1, 1, 2]
    run = recforge.train("bpr", "synthetic", {"epochs": 8, "patience": 8, "lr_schedule": "plateau", "lr_gamma": 0.1,
                                              "lr": 0.05}, out=tmp_path, verbose=False)
    epochs = json.loads((run.path / "history.json").read_text())["epochs"]
    for k, row in enumerate(epochs):
        assert row["lr"] == pytest.approx(0.05 * 0.1 ** plateau_drops(epochs[:k], "ndcg@10"))
    assert epochs[-1]["lr"] < 0.05  # some validation did not improve, and the rate went down
