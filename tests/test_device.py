"""Where PyTorch models run: device names and their errors, batches moved to a device, the CPU
path unchanged by ``device=cpu``, bf16 mixed precision on the CPU, and loading a model saved for
another device. The CUDA tests run only where PyTorch sees a CUDA GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import recforge
from recforge.cli import main
from recforge.errors import ConfigError
from recforge.evaluation.evaluator import evaluate
from recforge.models import registry
from recforge.models.base import Recommender
from recforge.models.torch_base import TorchRecommender
from recforge.training import device as D

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")

# tiny and fast: a couple of epochs train in about a second on one CPU thread
SASREC = dict(verbose=False, epochs=2, batch_size=32, lr=0.005, max_len=20, hidden=32, inner=64, n_layers=1,
              threads=1)
LIGHTGCN = dict(verbose=False, epochs=2, batch_size=512, lr=0.005, dim=32)
#: settings of every PyTorch model of the registry, each taking the ones it has
SMALL = dict(verbose=False, epochs=1, batch_size=64, hidden=32, inner=64, n_layers=1, dim=16, max_len=20,
             encoder="hashing:32")


@pytest.fixture
def no_gpu(monkeypatch):
    """This PyTorch as a CPU build: no CUDA, no Apple GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(D, "_mps_available", lambda: False)


def _ndcg(model, evalset) -> float:
    return evaluate(model, evalset, ks=[10], groups=False).metrics["ndcg@10"]


# ---- device names ---------------------------------------------------------------------------------
def test_resolve_device_names_and_errors(no_gpu, monkeypatch):
    assert D.resolve_device("auto") == torch.device("cpu")
    assert D.resolve_device(None) == torch.device("cpu")
    assert D.resolve_device(" CPU ") == torch.device("cpu")
    assert D.resolve_device(torch.device("cpu")) == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=f"device={spec}: .*no CUDA GPU.*use device=cpu or device=auto"):
            D.resolve_device(spec)
    with pytest.raises(ConfigError, match="no Apple GPU; use device=cpu"):
        D.resolve_device("mps")
    for bad in ("gpu", "cuda0", "tpu"):
        with pytest.raises(ConfigError, match="choose auto, cpu, cuda, cuda:N or mps"):
            D.resolve_device(bad)
    # a GPU build with one device: auto picks it, an index past the last one is named
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert D.resolve_device("auto") == torch.device("cuda")
    assert D.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"only 1 CUDA device\(s\) here \(cuda:0 \.\. cuda:0\)"):
        D.resolve_device("cuda:3")


def test_precision_checks():
    cpu = torch.device("cpu")
    assert D.check_precision("BF16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16 is not supported on the CPU; use precision=bf16 or fp32"):
        D.check_precision("fp16", cpu)
    with pytest.raises(ConfigError, match="choose one of fp32, bf16, fp16"):
        D.check_precision("int8", cpu)
    assert D.grad_scaler(cpu, "bf16") is None


def test_a_model_asking_for_a_missing_gpu_stops_before_training(no_gpu, synthetic_loo):
    split, valid, _ = synthetic_loo
    model = registry.create("lightgcn", **LIGHTGCN, device="cuda")
    with pytest.raises(ConfigError, match="device=cuda: .*use device=cpu"):
        model.fit(split, valid)
    assert getattr(model, "net_", None) is None
    with pytest.raises(ConfigError, match="precision=fp16 is not supported on the CPU"):
        registry.create("sasrec", **SASREC, device="cpu", precision="fp16").fit(split, valid)


def test_to_device_moves_nested_batches_and_leaves_the_rest():
    rows = np.arange(4)
    batch = {"inp": torch.ones(2, 3, dtype=torch.long), "views": (torch.zeros(2), torch.zeros(3)),
             "more": [torch.ones(1), {"deep": torch.arange(5)}], "rows": rows, "n": 3, "none": None}
    same = D.to_device(batch, torch.device("cpu"))
    assert same["inp"] is batch["inp"] and same["views"][1] is batch["views"][1]  # already there: no copy
    moved = D.to_device(batch, torch.device("meta"))  # a real move, without a GPU
    assert moved["inp"].device.type == "meta" and moved["inp"].dtype == torch.long and moved["inp"].shape == (2, 3)
    assert isinstance(moved["views"], tuple) and all(t.device.type == "meta" for t in moved["views"])
    assert isinstance(moved["more"], list) and moved["more"][0].device.type == "meta"
    assert moved["more"][1]["deep"].device.type == "meta"
    assert moved["rows"] is rows and moved["n"] == 3 and moved["none"] is None
    assert batch["inp"].device.type == "cpu"  # the input is left as it was
    bpr_batch = (torch.arange(3), torch.arange(3), torch.arange(3))  # BPR's batches are tuples
    assert all(t.device.type == "meta" for t in D.to_device(bpr_batch, torch.device("meta")))


# ---- the CPU path ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params", [("sasrec", SASREC), ("lightgcn", LIGHTGCN)])
def test_device_cpu_is_exactly_the_default(synthetic_loo, name, params):
    if D.resolve_device("auto").type != "cpu":
        pytest.skip("device=auto resolves to a GPU here; the CUDA tests compare the devices")
    split, valid, test = synthetic_loo
    default = registry.create(name, **params).fit(split, valid)
    cpu = registry.create(name, **params, device="cpu").fit(split, valid)
    assert cpu.device_ == default.device_ == torch.device("cpu")
    assert torch.equal(cpu.score(test.histories), default.score(test.histories))
    assert evaluate(cpu, test).metrics == evaluate(default, test).metrics
    assert [e["loss"] for e in cpu.history_["epochs"]] == [e["loss"] for e in default.history_["epochs"]]


@pytest.mark.parametrize("name,params", [("sasrec", SASREC), ("lightgcn", LIGHTGCN)])
def test_bf16_training_on_the_cpu(synthetic_loo, name, params):
    split, valid, test = synthetic_loo
    fp32 = registry.create(name, **params, device="cpu").fit(split, valid)
    bf16 = registry.create(name, **params, device="cpu", precision="bf16").fit(split, valid)
    losses = [e["loss"] for e in bf16.history_["epochs"]]
    assert len(losses) == params["epochs"] and all(np.isfinite(losses))
    assert all(p.dtype == torch.float32 for p in bf16.net_.parameters())  # weights stay fp32
    metrics = evaluate(bf16, test).metrics
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["ndcg@10"] > 0.5 * _ndcg(fp32, test)
    if name == "sasrec":  # the projections run in bf16, so the losses move a little
        assert losses != [e["loss"] for e in fp32.history_["epochs"]]
        assert losses == pytest.approx([e["loss"] for e in fp32.history_["epochs"]], rel=0.05)


# ---- loading on another device ----------------------------------------------------------------------
def _as_saved_on(path, device: str) -> None:
    """Rewrite a saved model as if it had been trained with ``device``."""
    blob = torch.load(path / "model.pt", map_location="cpu", weights_only=False)
    blob["params"]["device"] = device
    torch.save(blob, path / "model.pt")


def test_load_overrides_the_saved_device(no_gpu, synthetic_loo, tmp_path):
    split, _, test = synthetic_loo
    hist = test.histories.slice(0, 40)
    model = registry.create("lightgcn", **LIGHTGCN, device="cpu").fit(split, None)
    before = model.score(hist)
    path = model.save(tmp_path / "m")
    _as_saved_on(path, "cuda")
    with pytest.raises(ConfigError, match=r"saved with device=cuda: load it with device='cpu'.*--device cpu"):
        Recommender.load(path)
    loaded = Recommender.load(path, device="cpu")
    assert loaded.get_params()["device"] == "cpu" and loaded.device_ == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in loaded.net_.parameters())
    assert torch.equal(loaded.score(hist), before)
    auto = Recommender.load(path, device="auto")  # resolved again on this machine
    assert auto.get_params()["device"] == "auto" and auto.device_ == torch.device("cpu")
    assert torch.equal(auto.score(hist), before)
    # a model without a device parameter ignores it
    pop = registry.create("pop").fit(split)
    loaded_pop = Recommender.load(pop.save(tmp_path / "pop"), device="cpu")
    assert "device" not in loaded_pop.get_params()
    assert torch.equal(loaded_pop.score(hist), pop.score(hist))


def test_cli_evaluates_and_recommends_a_gpu_run_on_the_cpu(no_gpu, tmp_path, capsys):
    run = recforge.train("bpr", "synthetic", {"epochs": 1, "device": "cpu"}, out=tmp_path, verbose=False)
    _as_saved_on(run.path / "model", "cuda")
    cfg = yaml.safe_load((run.path / "config.yaml").read_text())
    cfg["model"]["device"] = "cuda"
    (run.path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["evaluate", str(run.path), "--json"]) == 2
    err = capsys.readouterr().err
    assert "device=cuda" in err and "--device cpu" in err and "Traceback" not in err
    assert main(["evaluate", str(run.path), "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["test"]["ndcg@10"] == pytest.approx(run.metrics["test"]["ndcg@10"])
    user = str(run.dataset.user_map["raw"][0])
    assert main(["recommend", str(run.path), "--user", user, "-k", "3", "--device", "cpu", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert len(recforge.recommend(run.path, user=user, k=4, device="cpu")) == 4
    assert res["device"] == "cpu"
    assert recforge.evaluate(run.path, device="cpu")["test"] == res["test"]


def test_an_artifact_of_a_gpu_run_serves_on_the_cpu(no_gpu, tmp_path, monkeypatch):
    from recforge.serving.artifact import export_artifact, load_artifact

    run = recforge.train("bpr", "synthetic", {"epochs": 1, "device": "cpu"}, out=tmp_path, verbose=False)
    art = export_artifact(run.path, tmp_path / "art")
    _as_saved_on(art / "model", "cuda")
    monkeypatch.delenv("RECFORGE_DEVICE", raising=False)
    with pytest.raises(ConfigError, match="device=cuda"):
        load_artifact(art, verify=False).model
    monkeypatch.setenv("RECFORGE_DEVICE", "cpu")  # what `recforge serve --device cpu` sets for its workers
    model = load_artifact(art, verify=False).model
    assert model.device_ == torch.device("cpu")
    assert main(["serve", str(art), "--device", "cuda"]) == 2  # an absent device stops before serving


# ---- CUDA ------------------------------------------------------------------------------------------
def _torch_models(multibehavior: bool = False) -> list[str]:
    """PyTorch ranking models: the single-behaviour ones, or the multi-behaviour ones (which need
    behaviours and a target)."""
    out = []
    for n in registry.available():
        cls = registry.get_model_class(n)
        if issubclass(cls, TorchRecommender) and cls.__module__.startswith(MB_PACKAGE) == multibehavior:
            out.append(n)
    return out


MB_PACKAGE = "recforge.models.multibehavior."


@needs_cuda
@pytest.mark.parametrize("name,params", [("sasrec", {**SASREC, "dropout": 0.0}), ("lightgcn", LIGHTGCN)])
def test_cuda_training_matches_the_cpu(synthetic_loo, name, params):
    # without dropout the only randomness is NumPy's (order, negatives) and the initialisation,
    # which is done on the CPU: both devices train the same model up to float rounding
    split, valid, test = synthetic_loo
    cpu = registry.create(name, **params, device="cpu").fit(split, valid)
    gpu = registry.create(name, **params, device="cuda").fit(split, valid)
    assert gpu.device_.type == "cuda" and all(p.device.type == "cuda" for p in gpu.net_.parameters())
    s = gpu.score(test.histories)
    assert s.device.type == "cuda"
    torch.testing.assert_close(s.cpu(), cpu.score(test.histories), rtol=1e-2, atol=1e-2)
    m_cpu, m_gpu = evaluate(cpu, test).metrics, evaluate(gpu, test).metrics
    for key in ("ndcg@10", "hr@10", "ndcg@20", "mrr"):
        assert m_gpu[key] == pytest.approx(m_cpu[key], abs=0.02), key


@needs_cuda
@pytest.mark.parametrize("name", _torch_models())
def test_every_torch_model_fits_and_scores_on_cuda(tiny, name, tmp_path):
    ds, split, valid, test = tiny
    cls = registry.get_model_class(name)
    model = registry.create(name, **{k: v for k, v in SMALL.items() if k in cls.param_names()}, device="cuda")
    if getattr(model, "needs_items", False):
        model.attach_dataset(ds)
    model.fit(split, valid)
    assert all(p.device.type == "cuda" for p in model.net_.parameters())
    scores = model.score(test.histories.slice(0, 50))
    assert scores.device.type == "cuda" and scores.shape == (50, split.n_items + 1)
    assert torch.isfinite(scores[:, 1:]).all()
    on_gpu = evaluate(model, test, popularity=split.item_popularity).metrics
    assert np.isfinite(on_gpu["ndcg@10"])
    top, vals = model.recommend(test.histories.slice(0, 5), k=5)
    assert isinstance(top, np.ndarray) and top.shape == (5, 5)
    loaded = Recommender.load(model.save(tmp_path / name), device="cpu")
    assert loaded.device_.type == "cpu"
    on_cpu = evaluate(loaded, test, popularity=split.item_popularity).metrics
    assert on_cpu["ndcg@10"] == pytest.approx(on_gpu["ndcg@10"], abs=0.02)


#: options whose tensors (negatives, proposals, views, banks, index maps) only some settings create
VARIANTS = [("sasrec", {"loss": "bce"}), ("sasrec", {"loss": "sampled_softmax"}), ("sasrec", {"loss": "gbce"}),
            ("sasrec", {"subseq": "prefix"}), ("bert4rec", {"loss": "sampled_softmax"}),
            ("cl4srec", {"augment": "ticoserec"}), ("duorec", {"negatives": "other_targets", "augment": "cl4srec"}),
            ("lightgcn", {"loss": "cpr"}), ("lightgcn", {"neg_sampler": "hard"}),
            ("lightgcn", {"neg_sampler": "popularity", "pair_sampling": "user"}),
            ("sgl", {"aug": "nd", "ssl_negatives": "batch", "cl_loss": "symmetric"}),
            ("simgcl", {"cl_loss": "symmetric"}), ("lsgrec", {"neg_rank": "push", "push_below": "positive"}),
            ("llmesr", {"distill_weight": 0.1, "user_repr": "mean"}), ("faerec", {"output": "sum"}),
            ("faerec-bert4rec", {"loss": "bce"})]


@needs_cuda
@pytest.mark.parametrize("name,params", VARIANTS, ids=[f"{n}-{'-'.join(map(str, p.values()))}" for n, p in VARIANTS])
def test_model_options_train_on_cuda(tiny, name, params):
    ds, split, valid, test = tiny
    cls = registry.get_model_class(name)
    small = {k: v for k, v in SMALL.items() if k in cls.param_names()}
    model = registry.create(name, **{**small, **params, "epochs": 2}, device="cuda")
    if getattr(model, "needs_items", False):
        model.attach_dataset(ds)
    model.fit(split, valid)
    assert all(np.isfinite(e["loss"]) for e in model.history_["epochs"])
    assert model.score(test.histories.slice(0, 8)).device.type == "cuda"


class FixedScores:
    """A scorer with given scores per user (integers, so that many items tie), on ``device``."""

    def __init__(self, table: torch.Tensor, device: str):
        self.table = table.to(device)

    def score(self, hist):
        return self.table[torch.from_numpy(hist.users).to(self.table.device)]


@needs_cuda
@pytest.mark.parametrize("ties", ["pessimistic", "expected", "optimistic", "index"])
def test_ranking_on_cuda_equals_the_cpu(tiny, ties):
    from recforge.evaluation.batch import EvalSet
    from recforge.evaluation.evaluator import Protocol

    _, split, _, test = tiny
    gen = torch.Generator().manual_seed(0)
    table = torch.randint(0, 20, (split.n_users, split.n_items + 1), generator=gen).float()
    table[table == 19] = float("nan")  # non-finite scores count as ahead of every target
    rng = np.random.default_rng(0)
    # a dozen target slots per user, some empty: the packed path for many targets (more than 8 slots)
    many = rng.integers(1, split.n_items + 1, size=(len(test), 12))
    many[rng.random(many.shape) < 0.3] = 0
    for evalset in (test, EvalSet(test.histories, many, "test")):
        for protocol in (Protocol(ties=ties), Protocol(exclude="none", ties=ties)):
            kw = dict(ks=[1, 5, 10, 20], protocol=protocol, batch_size=64, popularity=split.item_popularity)
            on_cpu = evaluate(FixedScores(table, "cpu"), evalset, **kw)
            on_gpu = evaluate(FixedScores(table, "cuda"), evalset, **kw)
            assert on_gpu.metrics == pytest.approx(on_cpu.metrics, rel=1e-12, abs=1e-12)
            assert on_gpu.per_user.columns == on_cpu.per_user.columns
            for col in on_cpu.per_user.columns:
                np.testing.assert_allclose(on_gpu.per_user[col].to_numpy(), on_cpu.per_user[col].to_numpy(),
                                           rtol=1e-12, equal_nan=True, err_msg=col)
            assert on_gpu.groups.keys() == on_cpu.groups.keys()
            for group, values in on_cpu.groups.items():
                assert on_gpu.groups[group] == pytest.approx(values, rel=1e-12, abs=1e-12, nan_ok=True), group
    # sampled negatives are drawn by the scores' device: labelled, finite, and the same per device and seed
    sampled = Protocol.from_option("50", ties=ties)
    a = evaluate(FixedScores(table, "cuda"), test, ks=[10], protocol=sampled, seed=3).metrics
    b = evaluate(FixedScores(table, "cuda"), test, ks=[10], protocol=sampled, seed=3).metrics
    assert a == b and np.isfinite(a["ndcg@10"])


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda(synthetic_loo, precision):
    split, valid, test = synthetic_loo
    for name, params in (("sasrec", SASREC), ("lightgcn", LIGHTGCN)):
        model = registry.create(name, **params, device="cuda", precision=precision).fit(split, valid)
        assert all(np.isfinite(e["loss"]) for e in model.history_["epochs"])
        assert np.isfinite(_ndcg(model, test))


@needs_cuda
@pytest.mark.parametrize("name", _torch_models(multibehavior=True))
def test_every_multibehaviour_model_fits_and_scores_on_cuda(name):
    from recforge.data.knowledge import build_knowledge
    from recforge.data.prepare import prepare
    from recforge.data.split import leave_one_out
    from recforge.data.synthetic import make_synthetic
    from recforge.pipeline import eval_sets

    ds = prepare(make_synthetic(n_users=120, n_items=60, seed=0, behaviors=True))
    split = leave_one_out(ds, target_behavior="buy")
    split.knowledge = build_knowledge("co-interaction:1", ds, split.train)
    valid, test = eval_sets(split, None, "buy")
    cls = registry.get_model_class(name)
    model = registry.create(name, **{k: v for k, v in SMALL.items() if k in cls.param_names()}, device="cuda")
    model.fit(split, valid)
    assert all(p.device.type == "cuda" for p in model.net_.parameters())
    scores = model.score(test.histories.slice(0, 30))
    assert scores.device.type == "cuda" and torch.isfinite(scores[:, 1:]).all()
