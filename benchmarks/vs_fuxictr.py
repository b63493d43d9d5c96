"""RecForge beside FuxiCTR on Frappe: DeepFM and DCN-V2 on the same rows, over seeds, one thread each.

    python benchmarks/vs_fuxictr.py [--seeds 0,1,2] [--models deepfm,dcnv2] [--setups matched,constant_lr,step_lr,bars]
                                    [--data ../shared/data/frappe] [--out benchmarks/results/vs_fuxictr.json]
                                    [--skip-recforge] [--skip-fuxictr]

Why: RecForge's DeepFM and DCN-V2 reach test AUC ~.953 on our Frappe re-split, BARS reports .984
on ``Frappe_x1`` (3.3x more training rows). Training FuxiCTR, the library behind BARS, on exactly
the same rows tells whether the gap comes from the data or from our implementation.

Data: the rows RecForge itself trains on. ``recforge.ctr.load_parts`` reads the validation and test
libFM files of the standard Frappe split, pools them and re-splits 7:2:1 with split seed 0 (the
config ``benchmarks/ctr_frappe.py`` uses); the three parts are written, raw values and in the same
order, as ``train.csv``/``valid.csv``/``test.csv`` (10 categorical fields and ``label``) under
``benchmarks/results/tmp/fuxictr/frappe/``. Each library fits its own vocabulary on the training part
(every value seen once or more; unseen values map to an out-of-vocabulary id in both). Test AUC and
log-loss of both are computed here by RecForge's ``recforge.evaluation.pointwise`` from the saved
predictions (FuxiCTR's test rows keep their order; the labels are checked row by row).

Setups (``--setups``):

* ``matched``: the same hyper-parameters on both sides: embedding 16, MLP 400-400-400 (ReLU,
  batch normalisation, dropout 0.2), DCN-V2 with 3 full-rank cross layers in parallel with the MLP,
  batch 4096, Adam lr 1e-3, at most 100 epochs, validation AUC after every epoch, early stopping
  with patience 2 and the best epoch's weights restored, no embedding regulariser, no weight decay.
  Each library keeps its own trainer: FuxiCTR divides the learning rate by 10 after every epoch
  without improvement (``reduce_lr_on_plateau``, on by default) and clips the gradient norm at 10.
* ``constant_lr``: FuxiCTR as in ``matched`` with ``reduce_lr_on_plateau=False``: the training
  recipe of RecForge (constant learning rate, no decay); RecForge's runs are those of ``matched``.
* ``step_lr``: a probe on RecForge's side: ``matched`` with its ``lr_schedule=step``
  (``lr_step=8``, ``lr_gamma=0.1``: the learning rate divided by 10 after epoch 8, about where
  FuxiCTR's first plateau falls on this split's validation part, and again after epoch 16);
  FuxiCTR's runs are those of ``matched``.
* ``bars``: FuxiCTR with BARS's published ``Frappe_x1`` hyper-parameters: DeepFM embedding 10,
  ``embedding_regularizer`` 0.05, MLP 400x3, dropout 0.2, batch norm; DCN-V2 embedding 10,
  ``embedding_regularizer`` 0.05, 4 cross layers, parallel MLP 400x3, dropout 0.4, batch norm
  (batch 4096, lr 1e-3, patience 2, ``reduce_lr_on_plateau``). RecForge with the same
  sizes and dropout but without the regulariser: FuxiCTR's is an L2 penalty on the whole
  embedding tables at every step, RecForge's ``embedding_reg`` one on the batch's embeddings, so
  no value of ours equals theirs.

What is not matched in any setup (each library's own): initialisation (FuxiCTR: embeddings
N(0, 1e-4), linear layers Xavier-normal with zero bias; RecForge: embeddings N(0, 1e-2), PyTorch's
default linear initialisation), batch-norm statistics at validation (RecForge recomputes them over
8 training batches before each validation, "precise BN"; FuxiCTR uses the running averages), the
loss on sigmoid outputs (FuxiCTR) or on logits (RecForge), the random streams (shuffling, dropout).

FuxiCTR runs in its own virtual environment, ``benchmarks/.venv-fuxictr`` (created on first use:
``torch==2.13.0`` CPU first, then ``fuxictr==2.3.9`` with ``numpy<2``, ``pandas<3``, ``polars<2`` and
``pyarrow<21``, under a constraint that keeps that torch);
it is never a dependency of RecForge. FuxiCTR's package holds its layers, data pipeline and
trainer (``BaseModel``) but not the model classes of its ``model_zoo`` folder, so the driver
written to ``benchmarks/results/tmp/fuxictr/driver.py`` assembles DeepFM (``FeatureEmbedding``,
``FactorizationMachine``, ``MLP_Block``) and DCN-V2 (``FeatureEmbedding``, ``CrossNetV2``,
``MLP_Block``, a linear output) from those layers in the same way and trains them with
``BaseModel.fit``. Data loading in one process (``num_workers=0``), ``OMP_NUM_THREADS=1`` and
``torch.set_num_threads(1)`` for both libraries.

Prints a Markdown table (test AUC and log-loss, mean ± sample standard deviation over the seeds;
best epoch; seconds per training epoch, validation excluded; RecForge/FuxiCTR ratio of seconds
per epoch; AUC difference) and writes ``benchmarks/results/vs_fuxictr.json`` (paths relative to
the working folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-fuxictr"
TMP = HERE / "results" / "tmp" / "fuxictr"
FUXICTR_VERSION = "2.3.9"
TORCH_VERSION = "2.13.0"
FUXICTR_PINS = ["numpy<2", "pandas<3", "polars<2", "pyarrow<21"]
FIELDS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]
BARS_AUC = {"deepfm": 0.9842, "dcnv2": 0.9845}

#: per model: (RecForge overrides, FuxiCTR model parameters) of each setup
COMMON_RF = ["hidden=[400,400,400]", "batch_norm=true", "activation=relu", "batch_size=4096", "lr=0.001",
             "patience=2", "epochs=100", "weight_decay=0.0"]
SETUPS = {
    "matched": {
        "deepfm": (["embedding_dim=16", "dropout=0.2", "embedding_reg=0.0"],
                   {"embedding_dim": 16, "hidden_units": [400, 400, 400], "net_dropout": 0.2,
                    "embedding_regularizer": 0, "reduce_lr_on_plateau": True}),
        "dcnv2": (["embedding_dim=16", "dropout=0.2", "embedding_reg=0.0", "cross_layers=3", "structure=parallel"],
                  {"embedding_dim": 16, "parallel_dnn_hidden_units": [400, 400, 400], "net_dropout": 0.2,
                   "num_cross_layers": 3, "embedding_regularizer": 0, "reduce_lr_on_plateau": True}),
    },
    "constant_lr": {
        "deepfm": (None, {"embedding_dim": 16, "hidden_units": [400, 400, 400], "net_dropout": 0.2,
                          "embedding_regularizer": 0, "reduce_lr_on_plateau": False}),
        "dcnv2": (None, {"embedding_dim": 16, "parallel_dnn_hidden_units": [400, 400, 400], "net_dropout": 0.2,
                         "num_cross_layers": 3, "embedding_regularizer": 0, "reduce_lr_on_plateau": False}),
    },
    "step_lr": {  # a probe: RecForge's step schedule standing in for FuxiCTR's decay (FuxiCTR: the matched runs)
        "deepfm": (["embedding_dim=16", "dropout=0.2", "embedding_reg=0.0", "lr_schedule=step", "lr_step=8",
                    "lr_gamma=0.1"], None),
        "dcnv2": (["embedding_dim=16", "dropout=0.2", "embedding_reg=0.0", "cross_layers=3", "structure=parallel",
                   "lr_schedule=step", "lr_step=8", "lr_gamma=0.1"], None),
    },
    "bars": {
        "deepfm": (["embedding_dim=10", "dropout=0.2", "embedding_reg=0.0"],
                   {"embedding_dim": 10, "hidden_units": [400, 400, 400], "net_dropout": 0.2,
                    "embedding_regularizer": 0.05, "reduce_lr_on_plateau": True}),
        "dcnv2": (["embedding_dim=10", "dropout=0.4", "embedding_reg=0.0", "cross_layers=4", "structure=parallel"],
                  {"embedding_dim": 10, "parallel_dnn_hidden_units": [400, 400, 400], "net_dropout": 0.4,
                   "num_cross_layers": 4, "embedding_regularizer": 0.05, "reduce_lr_on_plateau": True}),
    },
}

# The FuxiCTR side: a job JSON in, a result JSON out. Runs in benchmarks/.venv-fuxictr.
DRIVER = r'''
"""FuxiCTR side of benchmarks/vs_fuxictr.py and benchmarks/ctr_speed.py (written by them; run in
benchmarks/.venv-fuxictr): python driver.py JOB.json RESULT.json"""
import json, logging, os, resource, sys, time
import numpy as np
import torch
from torch import nn

job = json.load(open(sys.argv[1]))
torch.set_num_threads(int(job["threads"]))
logging.basicConfig(level=logging.INFO if job.get("log") else logging.WARNING, stream=sys.stderr,
                    format="%(asctime)s %(message)s")
import fuxictr
from fuxictr.features import FeatureMap
from fuxictr.preprocess import FeatureProcessor, build_dataset
from fuxictr.pytorch.dataloaders import RankDataLoader
from fuxictr.pytorch.layers import CrossNetV2, FactorizationMachine, FeatureEmbedding, MLP_Block
from fuxictr.pytorch.models import BaseModel
from fuxictr.pytorch.torch_utils import seed_everything


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class DeepFM(BaseModel):
    """DeepFM from FuxiCTR's layers: the FM part (first-order weights and pairwise products) plus
    an MLP over the concatenated field embeddings."""

    def __init__(self, feature_map, embedding_dim=10, hidden_units=(400, 400, 400), hidden_activations="ReLU",
                 net_dropout=0.0, batch_norm=False, learning_rate=1e-3, **kwargs):
        super().__init__(feature_map, **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        self.fm = FactorizationMachine(feature_map)
        self.mlp = MLP_Block(input_dim=feature_map.sum_emb_out_dim(), output_dim=1, hidden_units=list(hidden_units),
                             hidden_activations=hidden_activations, output_activation=None,
                             dropout_rates=net_dropout, batch_norm=batch_norm)
        self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
        self.reset_parameters()
        self.model_to_device()

    def forward(self, inputs):
        X = self.get_inputs(inputs)
        emb = self.embedding_layer(X)
        y = self.fm(X, emb) + self.mlp(emb.flatten(start_dim=1))
        return {"y_pred": self.output_activation(y)}


class DCNv2(BaseModel):
    """DCN-V2 from FuxiCTR's layers, parallel structure: a full-rank cross network and an MLP over
    the concatenated embeddings, concatenated into one linear output."""

    def __init__(self, feature_map, embedding_dim=10, parallel_dnn_hidden_units=(400, 400, 400),
                 dnn_activations="ReLU", num_cross_layers=3, net_dropout=0.0, batch_norm=False, learning_rate=1e-3,
                 **kwargs):
        super().__init__(feature_map, **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        d = feature_map.sum_emb_out_dim()
        self.crossnet = CrossNetV2(d, num_cross_layers)
        self.parallel_dnn = MLP_Block(input_dim=d, output_dim=None, hidden_units=list(parallel_dnn_hidden_units),
                                      hidden_activations=dnn_activations, output_activation=None,
                                      dropout_rates=net_dropout, batch_norm=batch_norm)
        self.fc = nn.Linear(d + list(parallel_dnn_hidden_units)[-1], 1)
        self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
        self.reset_parameters()
        self.model_to_device()

    def forward(self, inputs):
        X = self.get_inputs(inputs)
        emb = self.embedding_layer(X, flatten_emb=True)
        out = self.fc(torch.cat([self.crossnet(emb), self.parallel_dnn(emb)], dim=-1))
        return {"y_pred": self.output_activation(out)}


class Timed:
    """Seconds of training and of validation per epoch, the validation AUC and the learning rate."""

    def train_epoch(self, data_generator):
        self._valid_s = 0.0
        t = time.perf_counter()
        super().train_epoch(data_generator)
        total = time.perf_counter() - t
        row = {"epoch": self._epoch_index + 1, "train_seconds": round(total - self._valid_s, 3),
               "valid_seconds": round(self._valid_s, 3)}
        row.update(self._last_logs)
        self.epoch_log.append(row)

    def eval_step(self):
        t = time.perf_counter()
        super().eval_step()
        self._valid_s += time.perf_counter() - t

    def checkpoint_and_earlystop(self, logs, min_delta=1e-6):
        self._last_logs = {"valid_auc": float(logs.get("AUC", float("nan"))),
                           "lr": self.optimizer.param_groups[0]["lr"]}
        super().checkpoint_and_earlystop(logs, min_delta)


MODELS = {"deepfm": type("TimedDeepFM", (Timed, DeepFM), {}), "dcnv2": type("TimedDCNv2", (Timed, DCNv2), {})}

t0 = time.perf_counter()
seed_everything(int(job["seed"]))
params = dict(job["params"])
params.update(dataset_id=job["dataset_id"], data_root=job["data_root"], model_root=job["model_root"],
              feature_cols=job["feature_cols"], label_col=job["label_col"], data_format=job["data_format"],
              train_data=job["train_data"], valid_data=job["valid_data"], test_data=job["test_data"],
              min_categr_count=1, batch_size=int(job["batch_size"]), num_workers=0, shuffle=True, verbose=0,
              optimizer="adam", loss="binary_crossentropy", metrics=["AUC", "logloss"], monitor="AUC",
              monitor_mode="max", early_stop_patience=int(job.get("patience", 2)), save_best_only=True,
              gpu=-1, model_id=job["model_id"], net_regularizer=0, batch_norm=True,
              hidden_activations="relu", dnn_activations="relu")
data_dir = os.path.join(job["data_root"], job["dataset_id"])
res = {"library": f"FuxiCTR {fuxictr.__version__}", "torch": torch.__version__, "threads": int(job["threads"])}
te = time.perf_counter()
processor = FeatureProcessor(**params)
params["train_data"], params["valid_data"], params["test_data"] = build_dataset(processor, **params)
res["encode_seconds"] = round(time.perf_counter() - te, 2)
feature_map = FeatureMap(job["dataset_id"], data_dir)
feature_map.load(os.path.join(data_dir, "feature_map.json"), params)
tl = time.perf_counter()
train_gen, valid_gen = RankDataLoader(feature_map, stage="train", **params).make_iterator()
test_gen = RankDataLoader(feature_map, stage="test", **params).make_iterator()
res["load_seconds"] = round(time.perf_counter() - tl, 2)
res["peak_rss_mb_after_data"] = round(peak_mb(), 1)
res["vocab"] = {k: v.get("vocab_size") for k, v in feature_map.features.items()}
model = MODELS[job["model"]](feature_map, **params)
model.epoch_log = []
model._last_logs = {}
os.makedirs(model.model_dir, exist_ok=True)
res["parameters"] = int(sum(p.numel() for p in model.parameters() if p.requires_grad))

if job["mode"] == "fit":  # accuracy: BaseModel.fit with validation and early stopping
    tf = time.perf_counter()
    model.fit(train_gen, epochs=int(job.get("epochs", 100)), validation_data=valid_gen, max_gradient_norm=10.0)
    res["fit_seconds"] = round(time.perf_counter() - tf, 2)
    res["epochs"] = model.epoch_log
    aucs = [e["valid_auc"] for e in model.epoch_log]
    res["best_epoch"] = int(np.argmax(aucs)) + 1
    res["best_valid_auc"] = float(max(aucs))
    res["seconds_per_epoch"] = round(float(np.mean([e["train_seconds"] for e in model.epoch_log])), 3)
else:  # speed: a fixed number of training batches with FuxiCTR's own train_step, no validation
    n = int(job["train_rows"])
    ds = train_gen.dataset
    ds.darray = ds.darray[:n]
    model._max_gradient_norm = 10.0
    model.train()
    tt, rows = time.perf_counter(), 0
    for _ in range(int(job.get("epochs", 1))):
        for batch in train_gen:
            loss = model.train_step(batch)
            loss.item()
            rows += len(batch[feature_map.labels[0]])
    res["train_seconds"] = round(time.perf_counter() - tt, 2)
    res["train_rows"] = rows
    res["peak_rss_mb_after_train"] = round(peak_mb(), 1)
ts = time.perf_counter()
p = model.predict(test_gen)
res["score_seconds"] = round(time.perf_counter() - ts, 2)
res["score_rows"] = int(len(p))
y = test_gen.dataset.darray[:, feature_map.get_column_index(feature_map.labels[0])]
np.save(job["pred_path"], np.stack([y.astype(np.float64), p.astype(np.float64)], 1))
res["peak_rss_mb"] = round(peak_mb(), 1)
res["total_seconds"] = round(time.perf_counter() - t0, 2)
json.dump(res, open(sys.argv[2], "w"), indent=1)
'''


def rel(p) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)


def ensure_venv() -> Path:
    """``benchmarks/.venv-fuxictr`` with FuxiCTR (created on first use)."""
    py = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    if stamp.exists():
        return py
    print(f"creating {rel(VENV)} (torch {TORCH_VERSION} CPU, FuxiCTR {FUXICTR_VERSION}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    # torch first (the local CPU build); the constraint keeps pip from replacing it with another build
    subprocess.run(pip + [f"torch=={TORCH_VERSION}"], check=True)
    TMP.mkdir(parents=True, exist_ok=True)
    pin = TMP / "constraints.txt"
    pin.write_text(f"torch=={TORCH_VERSION}\n")
    # FuxiCTR 2.3.9 uses np.Inf (gone in NumPy 2) and scan_csv(dtypes=...) (gone in Polars 2); pyarrow 21
    # and later need NumPy 2; pandas 3 changes the string dtype its loaders test for
    subprocess.run(pip + ["-c", str(pin), f"fuxictr=={FUXICTR_VERSION}", *FUXICTR_PINS], check=True)
    out = subprocess.run([str(py), "-c", "import torch, fuxictr; print(torch.__version__, fuxictr.__version__)"],
                         check=True, capture_output=True, text=True).stdout.split()
    if not out[0].startswith(TORCH_VERSION):
        raise SystemExit(f"{rel(VENV)}: torch {out[0]} installed instead of {TORCH_VERSION}")
    stamp.touch()
    return py


def write_driver() -> Path:
    TMP.mkdir(parents=True, exist_ok=True)
    path = TMP / "driver.py"
    path.write_text(DRIVER)
    return path


def run_driver(job: dict, threads: int, log_path: Path | None = None) -> dict:
    """Run one FuxiCTR job in its own process (fresh interpreter) and return its result."""
    py, driver = ensure_venv(), write_driver()
    name = job["model_id"]
    job_path, out_path = TMP / f"{name}.job.json", TMP / f"{name}.result.json"
    job_path.write_text(json.dumps(job))
    out_path.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    with open(log_path or os.devnull, "w") as log:
        subprocess.run([str(py), str(driver), str(job_path), str(out_path)], check=True, env=env, stdout=log,
                       stderr=subprocess.STDOUT, cwd=str(TMP))
    return json.loads(out_path.read_text())


def frappe_parts(data: str) -> tuple[dict, dict]:
    """The train/valid/test rows of benchmarks/ctr_frappe.py's config, by RecForge's reader and splitter."""
    from recforge import ctr
    from recforge.api import resolve

    cfg = resolve("deepfm", data, ["split.seed=0"])
    _, parts, rec = ctr.load_parts(cfg)
    return parts, rec


def write_csvs(parts: dict, folder: Path) -> dict:
    import polars as pl

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for k, df in parts.items():
        path = folder / f"{k}.csv"
        df.select([pl.col("label").cast(pl.Int8), *[pl.col(f).cast(pl.Utf8) for f in FIELDS]]).write_csv(path)
        files[k] = str(path)
    return files


def fuxictr_job(model: str, params: dict, seed: int, files: dict, tag: str) -> dict:
    return {"mode": "fit", "model": model, "seed": seed, "threads": 1, "params": params, "batch_size": 4096,
            "patience": 2, "epochs": 100, "dataset_id": "frappe_resplit", "data_root": str(TMP / "data"),
            "model_root": str(TMP / "checkpoints"), "data_format": "csv",
            "feature_cols": [{"name": FIELDS, "active": True, "dtype": "str", "type": "categorical"}],
            "label_col": {"name": "label", "dtype": "float"},
            "train_data": files["train"], "valid_data": files["valid"], "test_data": files["test"],
            "model_id": f"{tag}_{model}_seed{seed}", "pred_path": str(TMP / f"{tag}_{model}_seed{seed}.pred.npy")}


def metrics(y: np.ndarray, p: np.ndarray) -> dict:
    from recforge.evaluation.pointwise import auc, logloss

    return {"auc": float(auc(y, p)), "logloss": float(logloss(y, p))}


def run_recforge(model: str, overrides: list[str], seed: int, data: str, runs: str) -> dict:
    import recforge

    run = recforge.train(model, data=data, overrides=[*COMMON_RF, *overrides, "threads=1", "split.seed=0",
                                                      f"seed={seed}"], out=runs, verbose=False)
    hist = json.loads((run.path / "history.json").read_text())
    eps = hist["epochs"]
    return {"seed": seed, "run": rel(run.path), "auc": run.metrics["test"]["auc"],
            "logloss": run.metrics["test"]["logloss"], "best_valid_auc": run.metrics["valid"]["auc"],
            "best_epoch": hist["best_epoch"], "epochs_run": len(eps),
            "seconds_per_epoch": round(float(np.mean([e["train_seconds"] for e in eps])), 3),
            "fit_seconds": run.metrics["timing"]["fit_seconds"]}


def run_fuxictr(model: str, params: dict, seed: int, files: dict, tag: str, test_labels: np.ndarray) -> dict:
    job = fuxictr_job(model, params, seed, files, tag)
    # a fresh dataset folder per run: FuxiCTR skips rebuilding when its feature_map.json exists
    job["dataset_id"] = f"frappe_{tag}_{model}_{seed}"
    res = run_driver(job, threads=1, log_path=TMP / f"{job['model_id']}.log")
    yp = np.load(job["pred_path"])
    if len(yp) != len(test_labels) or not np.array_equal(yp[:, 0], test_labels):
        raise SystemExit(f"{job['model_id']}: FuxiCTR's test rows are not RecForge's test rows in the same order")
    m = metrics(test_labels, yp[:, 1])
    return {"seed": seed, **m, "fuxictr_valid_auc": res["best_valid_auc"], "best_epoch": res["best_epoch"],
            "epochs_run": len(res["epochs"]), "seconds_per_epoch": res["seconds_per_epoch"],
            "fit_seconds": res["fit_seconds"], "library": res["library"], "torch": res["torch"],
            "epochs": res["epochs"], "log": rel(TMP / f"{job['model_id']}.log")}


def summary(per_seed: list[dict]) -> dict:
    from recforge.api import mean_std

    return {k: mean_std([r[k] for r in per_seed]) for k in ("auc", "logloss", "best_epoch", "seconds_per_epoch")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/frappe")
    ap.add_argument("--models", default="deepfm,dcnv2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--setups", default="matched,constant_lr,step_lr,bars")
    ap.add_argument("--out", default="benchmarks/results/vs_fuxictr.json")
    ap.add_argument("--runs", default="benchmarks/results/tmp/fuxictr/recforge_runs")
    ap.add_argument("--skip-recforge", action="store_true", help="reuse RecForge's figures of the last result file")
    ap.add_argument("--skip-fuxictr", action="store_true", help="reuse FuxiCTR's figures of the last result file")
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found (the shared data folder sits beside the project)")
        return 0
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    models = [m for m in args.models.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    setups = [s for s in args.setups.split(",") if s]
    unknown = set(setups) - set(SETUPS)
    if unknown:
        raise SystemExit(f"--setups: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SETUPS)}")
    t0 = time.perf_counter()
    parts, rec = frappe_parts(args.data)
    files = write_csvs(parts, TMP / "frappe")
    test_labels = parts["test"]["label"].cast(float).to_numpy()
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    prev_rows = {(r["setup"], r["model"]): r for r in previous.get("rows", [])}
    rows = []
    for setup in setups:
        for m in models:
            rf_over, fx_params = SETUPS[setup][m]
            row = {"setup": setup, "model": m, "bars_auc": BARS_AUC[m], "fuxictr_params": fx_params,
                   "recforge_overrides": None if rf_over is None else [*COMMON_RF, *rf_over]}
            old = prev_rows.get((setup, m), {})
            if rf_over is None:  # the same RecForge runs as the matched setup
                row["recforge"] = next((r["recforge"] for r in rows if r["setup"] == "matched" and r["model"] == m),
                                       prev_rows.get(("matched", m), {}).get("recforge"))
                row["recforge_note"] = "RecForge's runs of the matched setup (its trainer keeps the learning rate)"
            elif args.skip_recforge and old.get("recforge"):
                row["recforge"] = old["recforge"]
            else:
                per = []
                for s in seeds:
                    r = run_recforge(m, rf_over, s, args.data, args.runs)
                    per.append(r)
                    print(f"  {setup:<11} {m:<6} RecForge seed {s}: AUC {r['auc']:.4f} logloss {r['logloss']:.4f} "
                          f"best epoch {r['best_epoch']} {r['seconds_per_epoch']:.2f} s/epoch",
                          file=sys.stderr, flush=True)
                row["recforge"] = {**summary(per), "runs": per}
            if fx_params is None:  # the same FuxiCTR runs as the matched setup
                row["fuxictr"] = next((r["fuxictr"] for r in rows if r["setup"] == "matched" and r["model"] == m),
                                      prev_rows.get(("matched", m), {}).get("fuxictr"))
                row["fuxictr_note"] = "FuxiCTR's runs of the matched setup"
            elif args.skip_fuxictr and old.get("fuxictr"):
                row["fuxictr"] = old["fuxictr"]
            else:
                per = []
                for s in seeds:
                    r = run_fuxictr(m, fx_params, s, files, setup, test_labels)
                    per.append(r)
                    print(f"  {setup:<11} {m:<6} FuxiCTR  seed {s}: AUC {r['auc']:.4f} logloss {r['logloss']:.4f} "
                          f"best epoch {r['best_epoch']} {r['seconds_per_epoch']:.2f} s/epoch",
                          file=sys.stderr, flush=True)
                row["fuxictr"] = {**summary(per), "runs": per}
            if row.get("recforge") and row.get("fuxictr"):
                row["auc_diff_recforge_minus_fuxictr"] = round(
                    row["recforge"]["auc"]["mean"] - row["fuxictr"]["auc"]["mean"], 4)
                row["seconds_per_epoch_ratio_recforge_over_fuxictr"] = round(
                    row["recforge"]["seconds_per_epoch"]["mean"] / row["fuxictr"]["seconds_per_epoch"]["mean"], 2)
            rows.append(row)
    done = {(r["setup"], r["model"]) for r in rows}
    order = list(SETUPS)
    rows = sorted(rows + [r for k, r in prev_rows.items() if k not in done],
                  key=lambda r: (order.index(r["setup"]) if r["setup"] in order else len(order),
                                 list(BARS_AUC).index(r["model"]) if r["model"] in BARS_AUC else len(BARS_AUC)))
    command = "python benchmarks/vs_fuxictr.py " + " ".join(argv if argv is not None else sys.argv[1:])
    board = {"command": command,
             "commands": [*previous.get("commands", []), command] if done != set(prev_rows) else [command],
             "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
             "data": args.data, "split": rec, "seeds": seeds, "threads": 1, "rows": rows,
             "fuxictr_data": {k: rel(v) for k, v in files.items()},
             "minutes": round((time.perf_counter() - t0) / 60, 1), "load_average_at_end": os.getloadavg(),
             "note": ("the same re-split rows for both libraries (validation + test files of the standard Frappe split "
                      "pooled and re-split 7:2:1, split seed 0: 60,607 / 17,317 / 8,658 rows); test metrics of both "
                      "computed by recforge.evaluation.pointwise from the saved predictions")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(board, indent=1))
    print(table(rows))
    print(rel(out))
    return 0


def table(rows: list[dict]) -> str:
    def ms(d, k, nd=4):
        return f"{d[k]['mean']:.{nd}f} ± {d[k]['std']:.{nd}f}"

    lines = ["| setup | model | RecForge AUC | FuxiCTR AUC | AUC diff | RecForge log-loss | FuxiCTR log-loss | "
             "best epoch RF / FX | s/epoch RF / FX | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r.get("recforge"), r.get("fuxictr")
        if not a or not b:
            continue
        lines.append(f"| {r['setup']} | {r['model']} | {ms(a, 'auc')} | {ms(b, 'auc')} | "
                     f"{r['auc_diff_recforge_minus_fuxictr']:+.4f} | {ms(a, 'logloss')} | {ms(b, 'logloss')} | "
                     f"{a['best_epoch']['mean']:.1f} / {b['best_epoch']['mean']:.1f} | "
                     f"{a['seconds_per_epoch']['mean']:.2f} / {b['seconds_per_epoch']['mean']:.2f} | "
                     f"{r['seconds_per_epoch_ratio_recforge_over_fuxictr']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
