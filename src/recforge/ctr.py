"""The CTR task: config → labelled rows → split → encoders fitted on train → model → pointwise
evaluation → run folder. ``recforge.api`` hands a run to this module when the model's ``task`` is
``ctr``; the verbs, the config, the trainer, the run folder and the paired tests are the ones of
the ranking task.

A CTR run folder holds ``config.yaml`` (resolved: ``split.method=auto`` is replaced by what was
done), ``metrics.json`` (``task: ctr``; ``valid``/``test``: AUC, log-loss, group AUC when a user
column is known, calibration; ``calibration``: the reliability tables; ``protocol``: the source,
the split, derived negatives, the labels; ``dataset``: rows and positive rates per part),
``per_user_{valid,test}.parquet`` (per-user AUC and log-loss, for ``recforge compare``),
``predictions_{valid,test}.parquet`` (``row``, the user, labels and predictions, for the paired
bootstrap), ``encoders/`` (``encoders.json``, ``vocab.parquet``: applied unchanged at serving),
``model/model.pt``, ``history.json``, ``checkpoints/``, ``train.log``.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from recforge import config as C
from recforge.data.features import EncodedTable, FeatureEncoder
from recforge.errors import RecForgeError
from recforge.evaluation.pointwise import PointwiseResult, bootstrap_test, evaluate_pointwise

log = logging.getLogger("recforge")

HEADLINE = ("auc", "logloss", "gauc", "calibration", "ece")


@dataclass
class CTRSplit:
    """Encoded ``train``/``valid``/``test`` rows, the fitted ``encoder`` and the split's record.
    ``n_users``/``n_items``: vocabulary sizes of the user and item fields when known (0 otherwise)."""

    train: EncodedTable
    valid: EncodedTable | None
    test: EncodedTable | None
    encoder: FeatureEncoder
    protocol: dict = field(default_factory=dict)
    n_users: int = 0
    n_items: int = 0

    @property
    def labels(self) -> list[str]:
        return list(self.encoder.schema.labels)


def is_ctr(model_name: str) -> bool:
    from recforge.models import registry

    return getattr(registry.get_model_class(model_name), "task", "ranking") == "ctr"


def is_ctr_run(run) -> bool:
    return run.metrics.get("task") == "ctr"


def load_parts(cfg: dict):
    """``(source, parts, split record)`` of a CTR config: raw rows split into train/valid/test."""
    from recforge.data.ctr_readers import load_source, split_rows

    from recforge.data.features import label_array

    src = load_source(cfg["data"])
    for name, frame in src.parts.items():  # missing columns and bad labels: one message, before any work
        where = "the data" if name == "all" else f"the {name} file"
        FeatureEncoder(src.schema).check_columns(frame, where, labels=True)
        label_array(frame, src.schema.labels, where)
    parts, rec = split_rows(src, cfg["split"])
    return src, parts, rec


def _vocab_size(enc: FeatureEncoder, names: tuple[str, ...]) -> int:
    for f in enc.layout():
        if f["name"] in names and f["kind"] == "categorical":
            return int(f["vocab"])
    return 0


def prepare(cfg: dict, test: bool = True) -> tuple[CTRSplit, dict, dict]:
    """The encoded split of a CTR config, the config with the split resolved, and data notes.
    ``test=False`` leaves the test part unencoded (``split.test`` is None): hyper-parameter search."""
    t0 = time.perf_counter()
    src, parts, rec = load_parts(cfg)
    enc = FeatureEncoder(src.schema).fit(parts["train"], "the training part")
    tables = {k: enc.transform(v, f"the {k} part") for k, v in parts.items() if v.height and (test or k != "test")}
    split = CTRSplit(tables["train"], tables.get("valid"), tables.get("test"), enc, rec,
                     _vocab_size(enc, ("user", "user_id", "userid", src.schema.user or "")),
                     _vocab_size(enc, ("item", "item_id", "itemid", "adgroup_id")))
    cfg = copy.deepcopy(cfg)
    cfg["split"] = {"method": rec["method"], **{k: rec[k] for k in ("ratios", "seed") if k in rec}}
    if rec["method"] == "temporal":
        cfg["split"].update(valid_cutoff=rec["valid_cutoff"], test_cutoff=rec["test_cutoff"])
    notes = {"source": src.kind, **src.notes, "prepare_seconds": round(time.perf_counter() - t0, 2)}
    return split, cfg, notes


def _evaluate(model, table: EncodedTable, labels: list[str], cfg: dict) -> tuple[PointwiseResult, np.ndarray]:
    p = model.predict_proba(table)
    res = evaluate_pointwise(table.y, p, labels, table.groups, bins=int(cfg["eval"].get("bins") or 10))
    return res, p


def _predictions(table: EncodedTable, p: np.ndarray, labels: list[str]) -> pl.DataFrame:
    cols = {"row": np.arange(len(table), dtype=np.int64)}
    if table.groups is not None:
        cols["user"] = table.groups.astype(str)
    for j, name in enumerate(labels):
        cols[f"label:{name}"] = table.y[:, j].astype(np.int8)
        cols[f"p:{name}"] = p[:, j]
    return pl.DataFrame(cols)


def _part_summary(t: EncodedTable | None) -> dict:
    if t is None:
        return {"rows": 0}
    return {"rows": len(t), "positive_rate": [round(float(v), 6) for v in t.y.mean(0)]}


def protocol_record(cfg: dict, split: CTRSplit, notes: dict, model) -> dict:
    rec = {"task": "ctr", "split": split.protocol, "labels": split.labels,
           "user_col": split.encoder.schema.user, "valid_metric": getattr(model, "valid_metric", "auc"),
           "gauc": ("per user, weighted by the user's rows; users with one class only are skipped"
                    if split.encoder.schema.user else "no user column: not computed"),
           "logloss_clip": 1e-7, "data": notes}
    extra = getattr(model, "protocol_notes", None)
    if callable(extra):
        rec.update(extra())
    return rec


def train(cfg: dict, out: str | Path = "runs", verbose: bool = True, resume_ckpt: Path | None = None,
          resume: Path | None = None):
    """Train and evaluate a CTR model; the same run-folder life cycle as ``api.train``."""
    import tempfile

    from recforge.models import registry
    from recforge.pipeline import dataset_label
    from recforge.runs import RunWriter, finished_run, run_name
    from recforge.training import distributed
    from recforge.training.trainer import set_seed

    t0 = time.perf_counter()
    distributed.init_from_env()
    rank, n_proc = distributed.world()
    split, cfg, notes = prepare(cfg)
    set_seed(cfg["seed"])
    params = C.model_params(cfg)
    if "verbose" in registry.get_model_class(cfg["model"]["name"]).param_names():
        params["verbose"] = verbose
    est = registry.create(cfg["model"]["name"], **params)
    name = run_name(cfg["model"]["name"], dataset_label(cfg["data"]["path"]), cfg["seed"])
    writer = RunWriter(out if rank == 0 else tempfile.mkdtemp(prefix="recforge-rank"), name)
    try:
        writer.write_yaml("config.yaml", cfg)
        est.checkpoint_dir = writer.tmp / "checkpoints"
        est.resume_from = resume_ckpt
        log.info("data %s: %s", cfg["data"]["path"], split.protocol.get("rows"))
        tf = time.perf_counter()
        est.fit(split, split.valid)
        fit_seconds = time.perf_counter() - tf
        labels = split.labels
        res_valid, p_valid = _evaluate(est, split.valid, labels, cfg) if split.valid is not None else (None, None)
        te = time.perf_counter()
        res_test, p_test = _evaluate(est, split.test, labels, cfg)
        eval_seconds = time.perf_counter() - te
        epochs = est.history_.get("epochs", [])
        metrics = {
            "task": "ctr",
            "model": cfg["model"]["name"],
            "data": cfg["data"]["path"],
            "seed": cfg["seed"],
            "valid": res_valid.metrics if res_valid else {},
            "test": res_test.metrics,
            "calibration": {"test": res_test.calibration},
            "protocol": protocol_record(cfg, split, notes, est),
            "dataset": {"train": _part_summary(split.train), "valid": _part_summary(split.valid),
                        "test": _part_summary(split.test), "features": split.encoder.describe()["features"],
                        "unseen_test": split.test.unseen},
            "timing": {"fit_seconds": round(fit_seconds, 2), "test_eval_seconds": round(eval_seconds, 2),
                       "seconds_per_epoch": round(float(np.mean([e["train_seconds"] for e in epochs])), 3)
                       if epochs else None,
                       "total_seconds": round(time.perf_counter() - t0, 2)},
            "training": {k: v for k, v in est.history_.items() if k != "epochs"},
        }
        if n_proc > 1:
            metrics["timing"]["processes"] = n_proc
        if resume is not None:
            metrics["resumed_from"] = str(resume)
        writer.write_json("history.json", est.history_)
        writer.write_yaml("config.yaml", cfg)
        writer.write_json("metrics.json", metrics)
        for part, res, table, p in (("test", res_test, split.test, p_test), ("valid", res_valid, split.valid, p_valid)):
            if res is None:
                continue
            if res.per_user is not None:
                res.per_user.write_parquet(writer.tmp / f"per_user_{part}.parquet")
            _predictions(table, p, labels).write_parquet(writer.tmp / f"predictions_{part}.parquet")
        split.encoder.save(writer.tmp / "encoders")
        est.save(writer.tmp / "model")
        path = writer.finish(keep=rank == 0)
    except BaseException:
        writer.fail(scratch=rank > 0)
        raise
    return finished_run(path, cfg, metrics, resume)


def evaluate(run, device: str | None = None) -> dict:
    """Re-evaluate a CTR run on its test part: the data re-read and re-split as its config says,
    encoded with the run's saved encoders (not refitted)."""
    cfg = run.config
    _, parts, rec = load_parts(cfg)
    enc = FeatureEncoder.load(run.path / "encoders")
    test = enc.transform(parts["test"], "the test part")
    model = run.load_model(device)
    res, _ = _evaluate(model, test, list(enc.schema.labels), cfg)
    protocol = dict(run.metrics.get("protocol", {}))
    protocol["split"] = rec
    return {"task": "ctr", "test": res.metrics, "calibration": {"test": res.calibration}, "protocol": protocol,
            "device": str(getattr(model, "device_", "cpu")), "unseen_test": test.unseen}


def predict(run, out: str | Path, rows: str | Path | None = None, device: str | None = None,
            unseen: str = "oov") -> dict:
    """Click probabilities of feature rows with a run's saved encoders and model, to Parquet
    (``row``, the user, ``p:<label>`` per label, and ``label:<label>`` when the rows have labels).
    ``rows``: a CSV/Parquet/libSVM file (default: the run's test rows). Values unseen in training
    are scored as out-of-vocabulary and counted per field (``unseen="error"`` refuses them)."""
    from recforge.data.ctr_readers import LIBSVM_SUFFIXES, read_frame, read_libsvm
    from recforge.runs import Run

    t0 = time.perf_counter()
    run = run if isinstance(run, Run) else Run.load(run)
    enc = FeatureEncoder.load(run.path / "encoders")
    if rows is None:
        df = load_parts(run.config)[1]["test"]
        where = "the run's test part"
    else:
        path = Path(rows)
        if not path.is_file():
            raise RecForgeError(f"--input {path}: no such file; give feature rows as CSV, Parquet or libSVM")
        if path.suffix.lower() in LIBSVM_SUFFIXES:
            frames, _, _ = read_libsvm([path], [f.name for f in enc.schema.features])
            df = frames[path].rename({"label": enc.schema.labels[0]})
        else:
            df = read_frame(path, run.config["data"].get("sep"))
        where = str(path)
    has_labels = all(c in df.columns for c in enc.schema.labels)
    table = enc.transform(df, where, labels=has_labels, unseen=unseen)
    p = run.load_model(device).predict_proba(table)
    cols = {"row": np.arange(len(table), dtype=np.int64)}
    if table.groups is not None:
        cols["user"] = table.groups.astype(str)
    for j, name in enumerate(enc.schema.labels):
        cols[f"p:{name}"] = p[:, j]
        if has_labels:
            cols[f"label:{name}"] = table.y[:, j].astype(np.int8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(cols).write_parquet(out)
    return {"rows": len(table), "out": str(out), "unseen": table.unseen, "seconds": round(time.perf_counter() - t0, 2)}


def compare(a: list, b: list, metrics: list[str] | None = None, n_boot: int = 1000) -> dict:
    """Paired tests between two CTR models (each one or more runs, e.g. seeds): the t-test and
    Wilcoxon test on per-user AUC/log-loss (each user's values averaged over a side's runs), when
    the runs have a user column, and a paired bootstrap of the test AUC and log-loss (resampling
    users, or rows without a user column)."""
    from recforge.api import _mean_per_user
    from recforge.evaluation.significance import paired_tests

    runs = a + b
    pa = a[0].metrics.get("protocol", {})
    warnings = []
    for other in runs[1:]:
        po = other.metrics.get("protocol", {})
        for key in ("split", "labels"):
            if pa.get(key) != po.get(key):
                warnings.append(f"runs differ in protocol '{key}': {pa.get(key)} vs {po.get(key)} ({other.path.name})")
    preds = [pl.read_parquet(r.path / "predictions_test.parquet") for r in runs]
    label_cols = [c for c in preds[0].columns if c.startswith("label:")]
    for r, p in zip(runs[1:], preds[1:]):
        if p.height != preds[0].height or not p.select(label_cols).equals(preds[0].select(label_cols)):
            raise RecForgeError(f"{r.path}: its test rows differ from {runs[0].path}'s; compare runs made on the same "
                                "data and split")
    label = label_cols[0].split(":", 1)[1]
    y = preds[0][f"label:{label}"].to_numpy()
    groups = preds[0]["user"].to_numpy() if "user" in preds[0].columns else None
    pa_, pb_ = ([p[f"p:{label}"].to_numpy() for p in preds[: len(a)]], [p[f"p:{label}"].to_numpy() for p in preds[len(a):]])
    rows = bootstrap_test(y, pa_, pb_, groups=groups, n_boot=n_boot)
    per_user = []
    if all((r.path / "per_user_test.parquet").exists() for r in runs):
        ua, ub = _mean_per_user(a), _mean_per_user(b)
        keys = [m for m in (metrics or ["auc", "logloss"]) if m in ua.columns]
        per_user = paired_tests(ua, ub, keys)
    return {"task": "ctr", "a": ",".join(str(r.path) for r in a), "b": ",".join(str(r.path) for r in b),
            "n_runs": [len(a), len(b)], "label": label, "bootstrap": rows, "rows": per_user,
            "warnings": warnings, "protocol": pa}


# ---- text output of the command line ----------------------------------------------------------------
def format_metrics(m: dict, protocol: dict) -> str:
    split = protocol.get("split", {})
    desc = split.get("method", "?")
    if "ratios" in split:
        desc += f" {':'.join(f'{r:g}' for r in split['ratios'])}, seed {split.get('seed')}"
    lines = [f"test (CTR, split {desc}):"]
    for k in ("auc", "logloss", "gauc", "pred_mean", "obs_rate", "calibration", "ece", "n_rows"):
        if k in m:
            v = m[k]
            lines.append(f"  {k:<13} {v:.4f}" if isinstance(v, float) else f"  {k:<13} {v}")
    if "gauc_skipped_users" in m:
        lines.append(f"  (gauc over {m['gauc_users']} users; {m['gauc_skipped_users']} with one class skipped)")
    for k in sorted(k for k in m if ":" in k and k.split(":")[0] in ("auc", "logloss", "gauc")):
        lines.append(f"  {k:<13} {m[k]:.4f}")
    return "\n".join(lines)


def format_compare(res: dict) -> str:
    n_a, n_b = res.get("n_runs", [1, 1])
    lines = [f"A: {res['a']}", f"B: {res['b']}" + (f" (means over {n_a} and {n_b} runs)" if max(n_a, n_b) > 1 else ""),
             *[f"warning: {w}" for w in res["warnings"]]]
    boot = res["bootstrap"]
    if boot:
        lines.append(f"paired bootstrap over {boot[0]['unit']}s ({boot[0]['n_units']}, {boot[0]['n_boot']} resamples), "
                     f"label {res['label']!r}:")
        lines.append(f"{'metric':<10} {'A':>8} {'B':>8} {'diff':>9} {'95% interval':>22} {'p':>9}")
        for r in boot:
            lines.append(f"{r['metric']:<10} {r['a']:>8.4f} {r['b']:>8.4f} {r['diff']:>+9.4f} "
                         f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] {r['bootstrap_p']:>9.2e}")
    if res["rows"]:
        lines.append("per-user values (users with both classes for auc):")
        lines.append(f"{'metric':<10} {'A':>8} {'B':>8} {'diff':>9} {'t-test p':>10} {'wilcoxon p':>11}  users")
        for r in res["rows"]:
            lines.append(f"{r['metric']:<10} {r['a']:>8.4f} {r['b']:>8.4f} {r['diff']:>+9.4f} "
                         f"{r['t_test_p']:>10.2e} {r['wilcoxon_p']:>11.2e}  {r['n_users']}")
    return "\n".join(lines)
