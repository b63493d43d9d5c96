"""recforge tune: search spaces, the validation-only protocol, pruning, the study folder, and the
best config that trains the same model again."""

from __future__ import annotations

import argparse
import json

import polars as pl
import pytest
import yaml

import recforge
from recforge import tuning
from recforge.errors import ConfigError, RecForgeError, TrainingError
from recforge.models import registry

optuna = pytest.importorskip("optuna", reason="recforge tune needs the 'tune' extra (optuna)")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """A small synthetic log (300 users, 150 items) as a CSV file: trials take a fraction of a second."""
    from recforge.data.synthetic import make_synthetic

    path = tmp_path_factory.mktemp("tune-data") / "small.csv"
    make_synthetic(n_users=300, n_items=150, seed=0).interactions.write_csv(path)
    return str(path)


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ---- search spaces ------------------------------------------------------------------------------
def test_every_model_with_hyper_parameters_has_a_valid_space():
    for name in registry.available():
        if name == "pop":
            with pytest.raises(ConfigError, match="no hyper-parameters to tune"):
                tuning.load_space(name)
            continue
        assert tuning.space_path(name).exists(), f"{name} has no search space"
        space = tuning.load_space(name)  # also constructs the model with every bound and choice
        assert space, name
        defaults = registry.defaults(name)
        for p in space.values():
            if p.kind != "categorical" and isinstance(defaults.get(p.name), (int, float)):
                assert p.low <= defaults[p.name] <= p.high, f"{name}.{p.name}: default outside the range"
    # no stray space file for a model that does not exist
    for path in registry.CONFIG_DIR.glob(f"*{tuning.SPACE_SUFFIX}"):
        registry.get_model_class(path.name[: -len(tuning.SPACE_SUFFIX)])


def test_space_format(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("lr: {type: float, low: 1e-4, high: 1e-2, log: true}\n"  # YAML reads 1e-4 as text
                 "dim: [16, 32]\n"
                 "n_layers: {type: int, low: 1, high: 3}\n"
                 "hidden: {type: categorical, choices: [32, 64]}\n"
                 "dropout: {type: float, low: 0.1, high: 0.5, step: 0.1}\n")
    with pytest.raises(ConfigError, match="'dim': model 'sasrec' has no such parameter"):
        tuning.load_space("sasrec", f)
    f.write_text(f.read_text().replace("dim: [16, 32]\n", ""))
    space = tuning.load_space("sasrec", f)
    assert space["lr"] == tuning.Param("lr", "float", 1e-4, 1e-2, log=True)
    assert space["n_layers"] == tuning.Param("n_layers", "int", 1, 3)
    assert space["hidden"].choices == (32, 64)
    assert space["dropout"].step == 0.1
    trial = optuna.trial.FixedTrial({"lr": 1e-3, "n_layers": 2, "hidden": 64, "dropout": 0.3})
    assert {k: p.suggest(trial) for k, p in space.items()} == {"lr": 1e-3, "n_layers": 2, "hidden": 64, "dropout": 0.3}


@pytest.mark.parametrize("model, text, message", [
    ("bpr", "nosuch: {type: float, low: 0.0, high: 1.0}", "model 'bpr' has no such parameter"),
    ("bpr", "lr: {type: float, low: 1.0e-2, high: 1.0e-4}", "is above high.*swap"),
    ("bpr", "lr: {type: float, low: 0.0, high: 1.0, log: true}", "log range needs low > 0"),
    ("bpr", "lr: {type: floaty, low: 0.0, high: 1.0}", "type 'floaty' is not one of"),
    ("bpr", "lr: {type: float, lo: 0.0, high: 1.0}", "unknown key.*lo"),
    ("bpr", "lr: {type: float, high: 1.0}", "needs low and high"),
    ("bpr", "lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true, step: 0.001}", "either log-scaled or stepped"),
    ("bpr", "dim: {type: int, low: 1.5, high: 3}", "must be an integer"),
    ("bpr", "lr: {type: float, low: small, high: 1.0}", "'small' is not a number"),
    ("bpr", "dim: []", "non-empty list"),
    ("bpr", "dim: [32, 32]", "repeat a value"),
    ("bpr", "seed: [0, 1]", "cannot be searched.*seed=N"),
    ("bpr", "valid_metric: [ndcg@10, hr@10]", "cannot be searched.*--metric"),
    ("bpr", "lr: [0.1, 0.2", "not valid YAML"),
    ("bpr", "- lr\n- dim", "mapping of parameter names"),
    ("bpr", "", "the space is empty"),
    ("sasrec", "loss: [ce, nosuch]", "'loss': model 'sasrec' rejects 'nosuch'"),
    ("bert4rec", "mask_prob: {type: float, low: 0.0, high: 0.5}", "'mask_prob': model 'bert4rec' rejects 0.0"),
])
def test_bad_space_is_one_clear_error(tmp_path, model, text, message):
    f = tmp_path / "space.yaml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        tuning.load_space(model, f)
    assert str(f) in str(info.value)  # the message names the file


def test_bad_requests_stop_before_any_training(small_data, tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'nosuch'"):
        tuning.tune("nosuch", small_data, out=tmp_path / "s")
    with pytest.raises(ConfigError, match="no hyper-parameters to tune"):
        tuning.tune("pop", small_data, out=tmp_path / "s")
    with pytest.raises(ConfigError, match="does not exist"):
        tuning.tune("ease", small_data, space=tmp_path / "missing.yaml", out=tmp_path / "s")
    with pytest.raises(ConfigError, match="--metric 'ndcg'"):
        tuning.tune("ease", small_data, metric="ndcg", out=tmp_path / "s")
    with pytest.raises(ConfigError, match="disagree"):
        tuning.tune("bpr", small_data, {"valid_metric": "hr@10"}, metric="ndcg@10", out=tmp_path / "s")
    with pytest.raises(ConfigError, match="not trained in epochs"):
        tuning.tune("ease", small_data, epochs=3, out=tmp_path / "s")
    with pytest.raises(ConfigError, match="nothing is left to tune"):
        tuning.tune("ease", small_data, ["reg_lambda=100"], out=tmp_path / "s")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    with pytest.raises(RecForgeError, match="not an empty folder"):
        tuning.tune("ease", small_data, out=busy)
    assert not (tmp_path / "s").exists()


# ---- studies ------------------------------------------------------------------------------------
def test_ease_study_folder_and_best_config_round_trip(small_data, tmp_path):
    # seed 3: the best trial is not the first one, so the best config must come from the best trial
    res = tuning.tune("ease", small_data, trials=3, seed=3, out=tmp_path / "study", progress=False)
    assert res.path == tmp_path / "study"
    files = {p.name for p in res.path.iterdir()}
    assert {"best.yaml", "trials.csv", "trials.parquet", "study.json", "space.yaml"} <= files
    trials = pl.read_csv(res.path / "trials.csv")
    assert trials.height == 3 and trials["state"].to_list() == ["complete"] * 3
    assert res.best["value"] == pytest.approx(trials["ndcg@10"].max())
    assert len(set(trials["reg_lambda"].to_list())) == 3
    assert pl.read_parquet(res.path / "trials.parquet").equals(res.trials)
    summary = json.loads((res.path / "study.json").read_text())
    assert summary["metric"] == "valid ndcg@10" and summary["pruner"] == "NopPruner"
    assert summary["trials"]["complete"] == 3
    if "trials.png" in files:
        assert (res.path / "trials.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib" in summary["plot"]
    assert not _leftovers(tmp_path)

    best = yaml.safe_load((res.path / "best.yaml").read_text())
    assert set(best) == {"model", "data", "split", "eval", "seed"}
    top = trials.sort("ndcg@10", descending=True).row(0, named=True)
    assert best["model"] == {"name": "ease", "reg_lambda": top["reg_lambda"]} == \
        {"name": "ease", "reg_lambda": res.best["params"]["reg_lambda"]}
    run = recforge.train(config=best, out=tmp_path / "runs", verbose=False)
    assert run.config["model"]["reg_lambda"] == res.best["params"]["reg_lambda"]
    assert run.metrics["valid"]["ndcg@10"] == pytest.approx(res.best["value"], abs=1e-12)

    from recforge.cli import main  # the command line reads the file as it is written

    assert main(["train", "--config", str(res.path / "best.yaml"), "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    (cli_run,) = (tmp_path / "cli").iterdir()
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert metrics["valid"]["ndcg@10"] == pytest.approx(res.best["value"], abs=1e-12)


def _cli(argv):
    """Parse like ``recforge``: the tune subparser, key=value overrides anywhere after the verb."""
    parser = argparse.ArgumentParser(prog="recforge")
    tuning.add_parser(parser.add_subparsers(dest="cmd", required=True))
    args, extra = parser.parse_known_args(argv)
    args.overrides = list(args.overrides) + [x for x in extra if "=" in x and not x.startswith("-")]
    assert not [x for x in extra if x not in args.overrides]
    return tuning.run_from_args(args)


def test_cli_bpr_study_best_config_trains_the_same_model(small_data, tmp_path, capsys):
    out = tmp_path / "bpr-study"
    rc = _cli(["tune", "bpr", "--data", small_data, "--trials", "3", "--seed", "3", "--metric", "hr@10",
               "--out", str(out), "epochs=2", "reg=0.0001"])
    assert rc == 0
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    assert lines[-1] == str(out)
    assert lines[0].split()[:3] == ["trial", "state", "hr@10"] and "reg" not in lines[0].split()
    assert printed.err.count("trial ") >= 3  # one progress line per trial
    best = yaml.safe_load((out / "best.yaml").read_text())
    summary = json.loads((out / "study.json").read_text())
    assert summary["pruner"].startswith("MedianPruner") and summary["fixed"] == ["reg"]
    assert best["model"]["reg"] == 0.0001 and best["model"]["epochs"] == 2  # fixed for every trial
    assert best["model"]["valid_metric"] == "hr@10"  # early stopping followed the tuned metric
    assert {k: best["model"][k] for k in ("dim", "lr")} == summary["best"]["params"]
    top = pl.read_csv(out / "trials.csv").sort("hr@10", descending=True).row(0, named=True)
    assert (top["dim"], top["lr"]) == (best["model"]["dim"], best["model"]["lr"])
    run = recforge.train(config=best, out=tmp_path / "runs", verbose=False)
    assert {k: run.config["model"][k] for k in ("dim", "lr", "reg", "epochs")} == \
        {k: best["model"][k] for k in ("dim", "lr", "reg", "epochs")}
    assert run.metrics["valid"]["hr@10"] == pytest.approx(summary["best"]["value"], abs=1e-12)


class PruneAfterFirstEpoch(optuna.pruners.BasePruner):
    """Lets trial 0 finish and prunes every later trial at its first report; records what it saw."""

    def __init__(self):
        self.seen: dict[int, list[int]] = {}

    def prune(self, study, trial) -> bool:
        self.seen.setdefault(trial.number, []).append(trial.last_step)
        return trial.number > 0 and trial.last_step is not None and trial.last_step >= 1


def test_pruning_stops_torch_trials_after_the_epoch(small_data, tmp_path):
    pruner = PruneAfterFirstEpoch()
    res = tuning.tune("bpr", small_data, {"epochs": 3}, trials=3, pruner=pruner, out=tmp_path / "s", progress=False)
    rows = res.trials.sort("trial")
    assert rows["state"].to_list() == ["complete", "pruned", "pruned"]
    assert rows["epochs"].to_list() == [3, 1, 1]
    assert pruner.seen == {0: [1, 2, 3], 1: [1], 2: [1]}  # pruned trials trained no epoch after the first
    assert rows["last_reported"][1] is not None and rows["ndcg@10"][1] is None
    assert res.best["number"] == 0
    assert "pruned" in tuning.format_trials(res.trials, res.metric, res.best["number"])


def test_default_pruner_is_the_median_pruner():
    pruner = tuning.make_pruner("median", warmup=4)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert isinstance(tuning.make_pruner("none"), optuna.pruners.NopPruner)
    with pytest.raises(ConfigError, match="unknown pruner"):
        tuning.make_pruner("sometimes")


class Unreadable:
    """Stands in for the test part: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the test part was read during tuning (.{name})")

    def __len__(self):
        raise AssertionError("the test part was read during tuning (len)")


@pytest.mark.parametrize("model, overrides", [("ease", {}), ("bpr", {"epochs": 2})])
def test_tuning_never_reads_the_test_part(small_data, tmp_path, monkeypatch, model, overrides):
    from recforge import api

    plain = tuning.tune(model, small_data, overrides, trials=3, out=tmp_path / "plain", progress=False)
    real_split = tuning.split_dataset

    def split_without_test(ds, cfg):
        split = real_split(ds, cfg)
        split.test = Unreadable()
        return split

    # the poisoned split is effective: building the test set the way a training run does fails
    cfg = api.resolve(model, small_data, overrides)
    ds = tuning.load_dataset(cfg["data"])
    with pytest.raises(AssertionError, match="test part was read"):
        api._eval_sets(cfg, split_without_test(ds, cfg))

    monkeypatch.setattr(tuning, "split_dataset", split_without_test)
    blind = tuning.tune(model, small_data, overrides, trials=3, out=tmp_path / "blind", progress=False)
    cols = [c for c in plain.trials.columns if c not in ("seconds",)]
    assert blind.trials.select(cols).equals(plain.trials.select(cols))  # same trials, same scores
    assert blind.best_config == plain.best_config


def test_failed_study_or_failed_write_leaves_nothing(small_data, tmp_path, monkeypatch):
    from recforge.models.general.ease import EASE

    def fail(self, split, valid=None):
        raise TrainingError("the loss diverged")

    with monkeypatch.context() as m:
        m.setattr(EASE, "fit", fail)
        with pytest.raises(RecForgeError, match="no trial completed.*3 failed.*the loss diverged"):
            tuning.tune("ease", small_data, trials=3, out=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists() and not _leftovers(tmp_path)

    def broken_plot(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tuning, "plot_trials", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        tuning.tune("ease", small_data, trials=2, out=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists() and not _leftovers(tmp_path)


def test_storage_resumes_a_study(small_data, tmp_path):
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    first = tuning.tune("ease", small_data, trials=2, storage=url, out=tmp_path / "a", progress=False)
    again = tuning.tune("ease", small_data, trials=1, storage=url, out=tmp_path / "b", progress=False)
    assert first.trials.height == 2 and again.trials.height == 3
    assert again.trials["trial"].to_list() == [0, 1, 2]
    assert again.trials.head(2).select("reg_lambda").equals(first.trials.select("reg_lambda"))
    assert again.summary["trials"]["this_session"] == 1
    assert again.best["value"] >= first.best["value"]
    with pytest.raises(RecForgeError, match="--storage"):
        tuning.tune("ease", small_data, trials=1, storage="nosuchdb://x", out=tmp_path / "c", progress=False)


def test_ctrl_c_keeps_the_complete_trials(small_data, tmp_path, monkeypatch):
    from recforge.models.general.ease import EASE

    real_fit, calls = EASE.fit, []

    def fit_then_interrupt(self, split, valid=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_fit(self, split, valid)

    monkeypatch.setattr(EASE, "fit", fit_then_interrupt)
    res = tuning.tune("ease", small_data, trials=5, out=tmp_path / "s", progress=False)
    assert res.summary["interrupted"] is True
    assert res.trials["state"].to_list() == ["complete", "complete", "fail"]
    assert (tmp_path / "s" / "best.yaml").exists()
    calls.clear()
    calls.extend([1, 1])  # the next fit is interrupted: no trial completes, nothing is written
    with pytest.raises(KeyboardInterrupt):
        tuning.tune("ease", small_data, trials=5, out=tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists() and not _leftovers(tmp_path)


def test_ctrl_c_in_the_trainer_stops_the_study(small_data, tmp_path, monkeypatch):
    """The trainer catches Ctrl-C itself (keeping the best weights); the study must still stop
    rather than score a half-trained model and start the next trial."""
    from recforge.models.general.bpr import BPRMF

    real_loss, calls, limit = BPRMF.loss, [], []

    def loss(self, batch):
        calls.append(1)
        if limit and len(calls) > limit[0]:
            raise KeyboardInterrupt
        return real_loss(self, batch)

    monkeypatch.setattr(BPRMF, "loss", loss)
    tuning.tune("bpr", small_data, {"epochs": 1}, trials=1, out=tmp_path / "count", progress=False)
    limit.append(len(calls) + 1)  # the next study: trial 0 completes, trial 1 is interrupted in its first epoch
    calls.clear()
    res = tuning.tune("bpr", small_data, {"epochs": 1}, trials=4, out=tmp_path / "s", progress=False)
    assert res.summary["interrupted"] is True
    assert res.trials["state"].to_list() == ["complete", "fail"]
    assert res.trials["error"].to_list() == [None, "interrupted"]


def test_ctr_study_scores_validation_auc_and_its_best_config_trains(tmp_path, monkeypatch):
    """A CTR model is tuned on the validation AUC; the test rows are split off but never encoded;
    the best config trains the very model that was scored."""
    from test_ctr_models import _write_libsvm

    from recforge.data.features import FeatureEncoder

    data = _write_libsvm(tmp_path / "toy")
    fixed = ["data.fields=user,item,ctx", "batch_size=256", "hidden=[32]", "threads=1", "epochs=3"]
    encoded = []
    real = FeatureEncoder.transform

    def spy(self, df, source="the data", *a, **k):
        encoded.append(source)
        return real(self, df, source, *a, **k)

    monkeypatch.setattr(FeatureEncoder, "transform", spy)
    res = tuning.tune("deepfm", str(data), overrides=fixed, trials=2, out=tmp_path / "study", progress=False)
    assert res.metric == "auc" and 0.5 < res.best["value"] <= 1
    assert encoded == ["the train part", "the valid part"]
    assert res.summary["evaluation"].startswith("pointwise: AUC") and res.summary["split"]["method"] == "presplit"
    monkeypatch.setattr(FeatureEncoder, "transform", real)
    best = yaml.safe_load((res.path / "best.yaml").read_text())
    run = recforge.train(config=best, out=tmp_path / "runs", verbose=False)
    assert run.metrics["valid"]["auc"] == pytest.approx(res.best["value"], abs=1e-6)
    with pytest.raises(ConfigError, match="CTR models are tuned and stopped early on the validation AUC"):
        tuning.tune("deepfm", str(data), overrides=fixed, trials=1, metric="ndcg@10", out=tmp_path / "s2")
