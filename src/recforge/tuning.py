"""Hyper-parameter search with Optuna: ``recforge tune MODEL --data D --trials N``.

Each trial samples hyper-parameters from the model's search space, trains the model on the
training part exactly as ``recforge train`` would (same config, same seed), and scores it on the
**validation part only**: the study builds no test evaluation set and never reads the test rows
of the split. The best trial's full resolved config is written as ``best.yaml``, which
``recforge train --config best.yaml`` (or ``recforge.train(config=...)``) turns back into the
same model.

    recforge tune sasrec --data beauty --trials 40 --epochs 50
    recforge tune ease --data ml-100k --trials 20 --out tuning/ease-ml100k
    recforge tune bpr --data synthetic --trials 30 epochs=30 split.method=temporal

**Search spaces** live next to each model's defaults, in
``recforge/configs/models/<model>.search.yaml``; ``--space FILE`` replaces it. A space maps
model parameters to what to try::

    lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}   # log-uniform
    dropout: {type: float, low: 0.1, high: 0.5}                # uniform
    n_layers: {type: int, low: 1, high: 3}                     # integers; also log, step
    k: {type: int, low: 10, high: 500, step: 10}
    loss: {type: categorical, choices: [ce, bce]}
    hidden: [32, 64, 128]                                      # short form of a categorical

``float`` and ``int`` take ``low``, ``high`` and either ``log: true`` (``low`` > 0) or ``step``;
``categorical`` takes ``choices`` (numbers, strings, booleans, null). Numbers may be written
``1e-4`` (YAML reads that as text; it is accepted). Every parameter must be one the model takes;
``seed`` (the config's ``seed=``), ``valid_metric`` (``--metric``), ``verbose`` and ``device``
cannot be searched. Each bound and choice is checked against the model's own validation before
the first trial. A parameter fixed among the ``key=value`` overrides (``lr=1e-3``) is left out of
the search.

**CTR models** (``recforge tune deepfm --data frappe-folder ...``) are scored by their validation
AUC (the mean over labels for multi-task models), the metric their early stopping follows; the
encoders are fitted on the training part, the validation part is encoded with them, and the test
part is split off but never encoded or read. ``best.yaml`` trains the same model with
``recforge train --config``.

**Seeds.** ``--seed`` seeds the sampler. The models' training seed is the config's ``seed``
(``seed=N`` among the overrides; 0 by default) and is the same for every trial, so trials differ
only by their hyper-parameters; parallel workers on one ``--storage`` should take different
``--seed`` values.

**Pruning** (PyTorch models): after every epoch with validation the trainer's callback reports
the validation metric to Optuna, and a trial whose curve falls below the median of earlier trials
at the same epoch stops (``--pruner median``, after ``--prune-warmup`` epochs and five complete
trials; ``--pruner none`` turns it off). The trial's score is the validation metric of the best
weights under the run's evaluation protocol (``eval.*``), as ``metrics.json`` of a training run
reports it; the pruning curve is the trainer's own validation (full ranking). ``--metric`` (by
default the model's ``valid_metric``, else ``ndcg@10``) is also the metric early stopping and
pruning follow. ``--epochs N`` caps the epochs of every trial (the best config keeps the cap, so
that it trains the very model that was scored; pass ``epochs=...`` to ``recforge train`` for
longer training).

**Output** (``--out DIR``; default ``runs/tune-<time>-<model>-<data>``), written to a temporary
folder and renamed when complete: ``best.yaml`` (resolved config of the best trial),
``trials.csv`` / ``trials.parquet`` (one row per trial: state, score, parameters, epochs, seconds,
error), ``study.json`` (summary: best trial, counts, space, sampler, pruner, parameter
importances), ``space.yaml`` (the space searched) and ``trials.png`` (score per trial with the
best so far, parameter importances, parallel coordinates; skipped with a note when matplotlib is
missing). ``--storage URL`` (e.g. ``sqlite:///tune.db``) keeps the study in an Optuna database:
rerunning the command (with a new ``--out``) resumes it, several processes may work on it at once,
and each folder holds every trial of the study so far. Ctrl-C stops the study (the running trial
is dropped) and writes the folder from the trials completed so far.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from recforge import config as C
from recforge.errors import ConfigError, RecForgeError, TrainingError
from recforge.models import registry

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger("recforge.tune")

SPACE_SUFFIX = ".search.yaml"
#: model parameters a space may not search, and what to do instead
NOT_SEARCHABLE = {
    "seed": "the training seed is the config's seed (seed=N among the overrides)",
    "valid_metric": "the metric is chosen with --metric",
    "verbose": "it only switches progress bars",
    "device": "it changes where a model runs, not what it learns",
}
KINDS = ("float", "int", "categorical")
_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
         "categorical": {"type", "choices"}}
_METRIC = re.compile(r"^(?:(?:hr|recall|precision|ndcg|map|mrr|coverage)@[1-9][0-9]*|mrr)$")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise RecForgeError("recforge tune needs Optuna: pip install 'recforge[tune]'") from None
    return optuna


# ---- search spaces ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One searched parameter: ``kind`` float | int | categorical."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def values_to_check(self) -> list:
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def describe(self) -> dict | list:
        if self.kind == "categorical":
            return list(self.choices)
        out = {"type": self.kind, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def position(self, value) -> float | None:
        """Where ``value`` lies in the space, 0 (low / first choice) to 1 (high / last choice)."""
        if self.kind == "categorical":
            if value not in self.choices:
                return None
            return self.choices.index(value) / max(len(self.choices) - 1, 1)
        if value is None or self.high == self.low:
            return 0.5
        lo, hi, v = float(self.low), float(self.high), float(value)
        if self.log:
            lo, hi, v = math.log(lo), math.log(hi), math.log(max(v, 1e-300))
        return min(max((v - lo) / (hi - lo), 0.0), 1.0)


def space_path(model: str) -> Path:
    """The packaged search space of ``model``."""
    return registry.CONFIG_DIR / f"{model.lower()}{SPACE_SUFFIX}"


def load_space(model: str, path: str | Path | None = None, base_config: dict | None = None) -> dict[str, Param]:
    """The search space of ``model`` (the packaged one, or ``path``), checked: every parameter is
    one the model takes, every spec is well formed, and every bound and choice is accepted by the
    model (constructed with ``base_config``'s model section, the defaults when None)."""
    registry.get_model_class(model)  # an unknown model: the registry's message
    name = model.lower()
    if path is None:
        path = space_path(name)
        if not path.exists():
            if not (registry.get_model_class(name).param_names() - set(NOT_SEARCHABLE)):
                raise ConfigError(f"model {name!r} has no hyper-parameters to tune; train it directly")
            raise ConfigError(f"no search space for model {name!r} ({path.name}); write one (format in "
                              "recforge/tuning.py, e.g. 'lr: {type: float, low: 1e-4, high: 1e-2, log: true}') "
                              "and pass --space FILE")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"search space {path} does not exist; give an existing YAML file to --space")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"search space {path}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc}); "
                          "fix the file (e.g. 'lr: {type: float, low: 1e-4, high: 1e-2, log: true}')") from None
    space = parse_space(name, raw, str(path))
    check_space_values(name, space, base_config, str(path))
    return space


def parse_space(model: str, raw, source: str = "search space") -> dict[str, Param]:
    """Parameters of a space mapping (see the module docstring); raises ConfigError naming the
    file, the parameter and the fix."""
    if raw is None or (isinstance(raw, dict) and not raw):
        raise ConfigError(f"{source}: the space is empty; list parameters, e.g. "
                          "'lr: {type: float, low: 1e-4, high: 1e-2, log: true}'")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a space is a mapping of parameter names to ranges, not a "
                          f"{type(raw).__name__}; write e.g. 'lr: {{type: float, low: 1e-4, high: 1e-2, log: true}}'")
    allowed = registry.get_model_class(model).param_names()
    space = {}
    for name, spec in raw.items():
        where = f"{source}: parameter {name!r}"
        if not isinstance(name, str) or name not in allowed:
            raise ConfigError(f"{where}: model {model!r} has no such parameter; its parameters: "
                              f"{', '.join(sorted(allowed - set(NOT_SEARCHABLE)))}")
        if name in NOT_SEARCHABLE:
            raise ConfigError(f"{where} cannot be searched: {NOT_SEARCHABLE[name]}; remove it from the space")
        space[name] = _parse_param(name, spec, where)
    return space


def _number(value, where: str, key: str, integer: bool):
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {key}={value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {key}={value!r} must be a finite number")
    if integer:
        if float(value) != int(value):
            raise ConfigError(f"{where}: {key}={value!r} must be an integer for type int")
        return int(value)
    return float(value)


def _parse_param(name: str, spec, where: str) -> Param:
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a range like {{type: float, low: 1e-4, high: 1e-2}} or a list of "
                          f"choices, not {spec!r}")
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind not in KINDS:
        raise ConfigError(f"{where}: type {kind!r} is not one of {', '.join(KINDS)}; "
                          "set type: float, int or categorical")
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} for type {kind}; "
                          f"allowed: {', '.join(sorted(_KEYS[kind]))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list, e.g. choices: [ce, bce]")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError(f"{where}: choice {c!r} is not a number, string, boolean or null")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: choices {choices} repeat a value; list each once")
        return Param(name, kind, choices=tuple(choices))
    for key in ("low", "high"):
        if key not in spec:
            raise ConfigError(f"{where}: type {kind} needs low and high, e.g. {{type: {kind}, low: 1, high: 3}}")
    integer = kind == "int"
    low, high = _number(spec["low"], where, "low", integer), _number(spec["high"], where, "high", integer)
    if low > high:
        raise ConfigError(f"{where}: low={low} is above high={high}; swap them")
    log_ = spec.get("log", False)
    if not isinstance(log_, bool):
        raise ConfigError(f"{where}: log must be true or false, not {log_!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, where, "step", integer)
        if step <= 0:
            raise ConfigError(f"{where}: step={step} must be positive")
        if log_:
            raise ConfigError(f"{where}: a range is either log-scaled or stepped; drop log or step")
    if log_ and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0 (low={low}); raise low or drop log: true")
    return Param(name, kind, low, high, log_, step)


def check_space_values(model: str, space: dict[str, Param], base_config: dict | None = None,
                       source: str = "search space") -> None:
    """Construct the model with each bound and choice of each parameter (the others at the base
    config) so that a value the model rejects stops the study before the first trial."""
    cfg = base_config or C.base_config(model)
    base = {k: v for k, v in C.model_params(cfg).items()}
    for p in space.values():
        for value in p.values_to_check():
            try:
                registry.create(model, **{**base, p.name: value})
            except RecForgeError as exc:
                raise ConfigError(f"{source}: parameter {p.name!r}: model {model!r} rejects {value!r} ({exc}); "
                                  "narrow the range or change the choices") from None
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: parameter {p.name!r}: {value!r} is not a valid value ({exc}); "
                                  "narrow the range or change the choices") from None


# ---- the study ----------------------------------------------------------------------------------
@dataclass
class TuneResult:
    """A finished study: its folder, the best trial and config, and every trial as a table."""

    path: Path
    metric: str
    best: dict
    best_config: dict
    trials: pl.DataFrame
    summary: dict = field(default_factory=dict)


class _InvalidParams(Exception):
    """The sampled combination is rejected by the model (a failed trial, not a failed study)."""


def fixed_model_keys(overrides, model: str) -> set[str]:
    """The model parameters the overrides set (fixed for every trial, so not searched)."""
    keys = registry.get_model_class(model).param_names()
    items = overrides.keys() if isinstance(overrides, dict) else [str(o).split("=", 1)[0].strip()
                                                                   for o in overrides or []]
    out = set()
    for key in items:
        if key.startswith("model."):
            out.add(key.split(".", 1)[1])
        elif "." not in key and key in keys:
            out.add(key)
    return out


# the data of a study (imported on use: `recforge --help` does not load PyTorch and Polars)
def load_dataset(data_cfg: dict):
    from recforge.pipeline import load_dataset as load

    return load(data_cfg)


def split_dataset(ds, cfg: dict):
    from recforge.pipeline import split_dataset as split

    return split(ds, cfg)


def validation_set(cfg: dict, split):
    """The validation EvalSet of ``split`` under ``cfg``'s protocol; the test part is not touched."""
    import polars as pl

    from recforge.data.schema import RATING
    from recforge.evaluation.batch import build_evalset

    rows = split.valid
    if rows.height == 0:
        raise ConfigError("tuning needs a validation part, and this split has none; use split.method=loo, temporal "
                          "or random, or a pre-split source with validation rows (the test part is never used)")
    threshold = cfg["eval"].get("target_min_rating")
    if threshold is None and RATING in split.train.columns:
        threshold = cfg["model"].get("pos_threshold")
    if threshold is not None:
        if RATING not in rows.columns:
            raise ConfigError(f"eval.target_min_rating={threshold}: the data has no rating column; remove the "
                              "option or give the rating column (data.rating_col=NAME)")
        rows = rows.filter(pl.col(RATING) >= float(threshold))
        if rows.height == 0:
            raise ConfigError(f"eval.target_min_rating={threshold}: no validation row is rated that high; lower it")
    target_behavior = cfg["data"].get("target_behavior") if C.resolve_exclude(cfg) == "target_behavior" else None
    return build_evalset(split.history("valid"), rows, split.n_users, split.n_items, "valid", target_behavior)


def make_pruner(pruner="median", warmup: int = 5):
    """An Optuna pruner from a name (``median``, ``none``) or a pruner object passed through."""
    optuna = _optuna()
    if pruner is None or pruner == "none":
        return optuna.pruners.NopPruner()
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(int(warmup), 0))
    if isinstance(pruner, str):
        raise ConfigError(f"unknown pruner {pruner!r}; choose median or none")
    return pruner


def _make_sampler(sampler, seed: int):
    optuna = _optuna()
    if sampler in (None, "tpe"):
        return optuna.samplers.TPESampler(seed=seed)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if isinstance(sampler, str):
        raise ConfigError(f"unknown sampler {sampler!r}; choose tpe or random")
    return sampler


def _redact(url: str | None) -> str | None:
    return None if url is None else re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", str(url))


def tune(model: str, data: str | None = None, overrides=None, *, trials: int | None = 20,
         timeout: float | None = None, seed: int = 0, metric: str | None = None, space: str | Path | None = None,
         out: str | Path | None = None, storage: str | None = None, study_name: str | None = None,
         epochs: int | None = None, pruner="median", prune_warmup: int = 5, sampler="tpe",
         progress: bool = True) -> TuneResult:
    """Search ``model``'s hyper-parameters on the validation part of ``data``; write the study
    folder (see the module docstring) and return a :class:`TuneResult`.

    ``overrides`` are fixed for every trial (``{"epochs": 20}`` or ``["epochs=20"]``); ``pruner``
    is ``median``, ``none`` or an Optuna pruner; ``sampler`` is ``tpe``, ``random`` or an Optuna
    sampler; ``progress`` prints one line per trial to stderr."""
    from recforge.api import resolve
    from recforge.models.torch_base import TorchRecommender
    from recforge.pipeline import dataset_label
    from recforge.training.trainer import set_seed

    if trials is not None and int(trials) < 1:
        raise ConfigError(f"--trials {trials}: run at least one trial")
    if trials is None and timeout is None:
        raise ConfigError("give --trials N or --timeout SECONDS (or both)")
    cfg = resolve(model, data, overrides)
    name = cfg["model"]["name"]
    cls = registry.get_model_class(name)
    ctr = getattr(cls, "task", "ranking") == "ctr"
    keys = cls.param_names()
    metric = _choose_ctr_metric(metric) if ctr else _choose_metric(cfg, keys, metric, overrides, name)
    if "valid_metric" in keys:
        cfg["model"]["valid_metric"] = metric  # early stopping and pruning follow the tuned metric
    if epochs is not None:
        if "epochs" not in keys:
            raise ConfigError(f"--epochs: model {name!r} is not trained in epochs; drop --epochs")
        if int(epochs) < 1:
            raise ConfigError(f"--epochs {epochs}: must be at least 1")
        cfg["model"]["epochs"] = min(int(cfg["model"].get("epochs") or epochs), int(epochs))
    full_space = load_space(name, space, cfg)
    fixed = fixed_model_keys(overrides, name)
    search = {k: p for k, p in full_space.items() if k not in fixed}
    if not search:
        raise ConfigError(f"every parameter of the space ({', '.join(full_space)}) is fixed by an override; "
                          "nothing is left to tune: drop an override or search other parameters (--space FILE)")
    label = dataset_label(cfg["data"]["path"])
    out = Path(out) if out else Path("runs") / f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{name}-{label}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RecForgeError(f"{out}: exists and is not an empty folder; choose another --out or remove it")

    optuna = _optuna()
    if ctr:
        ds = None
        split, cfg = ctr_train_valid(cfg)
        valid_set = split.valid
    else:
        ds = load_dataset(cfg["data"])
        cfg = C.with_resolved_exclude(cfg, ds)
        split = split_dataset(ds, cfg)
        valid_set = validation_set(cfg, split)
    is_torch = issubclass(cls, TorchRecommender)

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.create_study(
            storage=storage, sampler=_make_sampler(sampler, seed),
            pruner=make_pruner(pruner, prune_warmup) if is_torch else optuna.pruners.NopPruner(),
            study_name=study_name or f"recforge-{name}-{label}",
            direction="maximize", load_if_exists=storage is not None)
    except ImportError as exc:
        raise RecForgeError(f"--storage {_redact(storage)}: {exc}; install the database driver") from None
    except Exception as exc:  # a malformed URL or an unreachable database
        if isinstance(exc, RecForgeError):
            raise
        raise RecForgeError(f"--storage {_redact(storage)}: cannot open the study ({exc}); give a URL such as "
                            "sqlite:///tune.db") from None

    def objective(trial):
        params = {k: p.suggest(trial) for k, p in search.items()}
        if epochs is not None and "epochs" in params:
            params["epochs"] = min(int(params["epochs"]), int(epochs))
        tcfg = copy.deepcopy(cfg)
        tcfg["model"].update(params)
        trial.set_user_attr("model", tcfg["model"])
        set_seed(tcfg["seed"])
        mp = C.model_params(tcfg)
        if "verbose" in keys:
            mp["verbose"] = False
        try:
            est = registry.create(name, **mp)
        except RecForgeError as exc:
            trial.set_user_attr("error", str(exc))
            raise _InvalidParams(str(exc)) from None
        if getattr(est, "needs_items", False):
            est.attach_dataset(ds)
        if hasattr(est, "callbacks"):
            est.callbacks = [*est.callbacks, _pruning_callback(optuna, trial, est.valid_metric)]
        try:
            if not ctr:
                from recforge.api import valid_protocol

                est.valid_protocol = valid_protocol(cfg)
            est.fit(split, valid_set)
        except TrainingError as exc:
            trial.set_user_attr("error", str(exc))
            raise
        history = getattr(est, "history_", None)
        if history:
            if history.get("interrupted"):  # the trainer stopped on Ctrl-C: stop the study too
                trial.set_user_attr("error", "interrupted")
                raise KeyboardInterrupt
            trial.set_user_attr("epochs", len(history.get("epochs", [])))
            trial.set_user_attr("best_epoch", history.get("best_epoch"))
        metrics = est.validate(valid_set) if ctr else _validate(est, valid_set, cfg, split, metric)
        trial.set_user_attr("valid", {k: v for k, v in metrics.items() if k != "n_users"})
        if not math.isfinite(metrics[metric]):  # Optuna fails such a trial; say why in the table
            trial.set_user_attr("error", f"valid {metric} is {metrics[metric]}")
        return metrics[metric]

    started = len(study.trials)
    print_line = _progress_printer(metric, started, trials) if progress else None
    if progress:
        prune_note = (f"pruning: {type(study.pruner).__name__}" if is_torch else "no pruning (not trained in epochs)")
        print(f"tuning {name} on {cfg['data']['path']}: {trials or 'unlimited'} trials"
              f"{f', {timeout:g} s' if timeout else ''}, valid {metric} (the test part is not read); "
              f"searching {', '.join(search)}; {prune_note}"
              + (f"; fixed: {', '.join(sorted(fixed & set(full_space)))}" if fixed & set(full_space) else ""),
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    interrupted = False
    try:
        study.optimize(objective, n_trials=trials, timeout=timeout, catch=(TrainingError, _InvalidParams),
                       callbacks=[print_line] if print_line else None)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: writing the trials completed so far", file=sys.stderr, flush=True)
    finally:
        optuna.logging.set_verbosity(verbosity)
    seconds = time.perf_counter() - t0

    states = optuna.trial.TrialState
    complete = [t for t in study.trials if t.state == states.COMPLETE]
    if not complete:
        if interrupted:
            raise KeyboardInterrupt
        errors = [t.user_attrs.get("error") for t in study.trials if t.user_attrs.get("error")]
        counts = _counts(study)
        raise RecForgeError(f"no trial completed ({counts['pruned']} pruned, {counts['failed']} failed)"
                            + (f"; first error: {errors[0]}" if errors else "")
                            + "; narrow the space, run more trials or use --pruner none")
    best = study.best_trial
    best_model = dict(best.user_attrs.get("model") or {**cfg["model"], **best.params})
    best_cfg = copy.deepcopy(cfg)
    best_cfg["model"] = {"name": name, **{k: v for k, v in best_model.items() if k != "name"}}
    data_path = Path(str(best_cfg["data"]["path"]))
    if data_path.exists():  # a local file: the best config should work from any folder
        best_cfg["data"]["path"] = str(data_path.resolve())
    frame = trials_frame(study, metric, list(search))
    importances = _importances(study, list(search))
    summary = {
        "model": name, "data": cfg["data"]["path"], "metric": f"valid {metric}", "direction": "maximize",
        "protocol": "scores on the validation part only: the test part of the split is never read",
        "split": split.protocol,
        "evaluation": ("pointwise: AUC over every validation row (mean over labels)" if ctr
                       else _protocol_describe(cfg)),
        "study_name": study.study_name, "storage": _redact(storage),
        "sampler": f"{type(study.sampler).__name__}(seed={seed})",
        "pruner": type(study.pruner).__name__ + (f"(warm-up {prune_warmup} epochs, 5 startup trials)"
                                                 if type(study.pruner).__name__ == "MedianPruner" else ""),
        "trials": {**_counts(study), "this_session": len(study.trials) - started},
        "best": {"number": best.number, "value": best.value, "params": best.params,
                 "valid": best.user_attrs.get("valid"), "epochs": best.user_attrs.get("epochs"),
                 "best_epoch": best.user_attrs.get("best_epoch")},
        "space": {k: p.describe() for k, p in full_space.items()}, "searched": list(search),
        "fixed": sorted(fixed & set(full_space)), "overrides": _override_list(overrides),
        "epochs_cap": epochs, "seconds": round(seconds, 2), "interrupted": interrupted,
        "importances": importances,
    }
    path = _write_study(out, cfg, best_cfg, frame, summary, search, metric, study, importances)
    return TuneResult(path, metric, summary["best"], best_cfg, frame, summary)


def _choose_metric(cfg: dict, keys: set[str], metric: str | None, overrides, name: str) -> str:
    model_metric = cfg["model"].get("valid_metric") if "valid_metric" in keys else None
    model_metric = str(model_metric).lower() if model_metric else None
    if metric is None:
        metric = model_metric or "ndcg@10"
    metric = str(metric).lower()
    if model_metric and "valid_metric" in fixed_model_keys(overrides, name) and model_metric != metric:
        raise ConfigError(f"--metric {metric} and valid_metric={model_metric} disagree; give only --metric")
    if not _METRIC.match(metric):
        raise ConfigError(f"--metric {metric!r}: use hr@K, ndcg@K, recall@K, precision@K, map@K, mrr@K, coverage@K "
                          "or mrr (e.g. ndcg@10)")
    return metric


def _choose_ctr_metric(metric: str | None) -> str:
    if metric is not None and str(metric).lower() != "auc":
        raise ConfigError(f"--metric {metric}: CTR models are tuned and stopped early on the validation AUC "
                          "(--metric auc)")
    return "auc"


def ctr_train_valid(cfg: dict):
    """The encoded training and validation parts of a CTR config and the config with its split
    resolved; the test part is split off but never encoded."""
    from recforge.ctr import prepare

    split, cfg, _ = prepare(cfg, test=False)
    if split.valid is None:
        raise ConfigError("tuning needs a validation part, and this split has none; use split.method=random or "
                          "temporal, or a pre-split source with validation rows (the test part is never used)")
    return split, cfg


def _validate(est, valid_set, cfg: dict, split, metric: str) -> dict:
    from recforge.api import _protocol
    from recforge.evaluation.evaluator import evaluate

    k = int(metric.split("@")[1]) if "@" in metric else 10
    e = cfg["eval"]
    res = evaluate(est, valid_set, ks=sorted({*map(int, e["ks"]), k}), protocol=_protocol(cfg),
                   batch_size=int(e["batch_size"]), popularity=split.item_popularity, groups=False, seed=cfg["seed"])
    return res.metrics


def _protocol_describe(cfg: dict) -> dict:
    from recforge.api import _protocol

    return _protocol(cfg).describe()


def _pruning_callback(optuna, trial, key: str):
    """``cb(epoch, row)`` for the trainer: report the validation metric, stop a hopeless trial."""

    def report(epoch: int, row: dict) -> None:
        if key not in row or row[key] is None:
            return
        value = float(row[key])
        trial.report(value, epoch)
        if trial.should_prune():
            trial.set_user_attr("epochs", epoch)
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({key} {value:.4f})")

    return report


def _override_list(overrides) -> list[str]:
    if isinstance(overrides, dict):
        return [f"{k}={v}" for k, v in overrides.items()]
    return [str(o) for o in overrides or []]


def _counts(study) -> dict:
    states = [t.state.name.lower() for t in study.trials]
    return {"total": len(states), "complete": states.count("complete"), "pruned": states.count("pruned"),
            "failed": states.count("fail"), "running": states.count("running")}


def _progress_printer(metric: str, started: int, planned: int | None):
    def line(study, t) -> None:
        i = t.number - started + 1
        head = f"trial {t.number:>3}" + (f" ({i}/{planned})" if planned else "")
        secs = f"{t.duration.total_seconds():.1f} s" if t.duration else ""
        params = "  ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        state = t.state.name
        if state == "COMPLETE":
            best = study.best_trial
            what = f"{metric} {t.value:.4f}  (best {best.value:.4f}, trial {best.number})"
        elif state == "PRUNED":
            last = t.intermediate_values.get(t.last_step) if t.last_step is not None else None
            what = f"pruned at epoch {t.last_step}" + (f" ({metric} {last:.4f})" if last is not None else "")
        else:
            what = f"failed: {t.user_attrs.get('error') or t.system_attrs.get('fail_reason', 'error')}"
        print(f"{head}  {what}  {secs}  {params}", file=sys.stderr, flush=True)

    return line


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _importances(study, params: list[str]) -> dict | None:
    """Optuna's parameter importances over the complete trials (None when there is nothing to
    tell: fewer than two complete trials, or fewer than two parameters that varied)."""
    optuna = _optuna()
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    varied = [p for p in params if len({repr(t.params.get(p)) for t in complete}) > 1]
    if len(complete) < 2 or len(varied) < 2:  # one parameter has all the importance by definition
        return None
    try:
        imp = optuna.importance.get_param_importances(study, params=varied)
    except Exception as exc:  # importance is a summary nicety: never fail a study over it
        log.info("parameter importances unavailable: %s", exc)
        return None
    return {k: float(v) for k, v in imp.items()}


def trials_frame(study, metric: str, params: list[str]) -> pl.DataFrame:
    """One row per trial: number, state, score, parameters, epochs run, the epoch of the best
    weights, the last value reported to the pruner, seconds and the error of a failed trial."""
    import polars as pl

    names = list(dict.fromkeys([*params, *(k for t in study.trials for k in t.params)]))
    trials = study.trials
    last = [t.intermediate_values.get(t.last_step) if t.last_step is not None else None for t in trials]
    series = [
        pl.Series("trial", [t.number for t in trials], dtype=pl.Int64),
        pl.Series("state", [t.state.name.lower() for t in trials], dtype=pl.Utf8),
        pl.Series(metric, [t.value if t.state.name == "COMPLETE" else None for t in trials], dtype=pl.Float64),
    ]
    for p in names:
        vals = [t.params.get(p) for t in trials]
        try:
            series.append(pl.Series(p, vals))
        except (TypeError, ValueError, pl.exceptions.PolarsError):  # mixed choices (e.g. 0.1 and "auto")
            series.append(pl.Series(p, [None if v is None else str(v) for v in vals], dtype=pl.Utf8))
    series += [
        pl.Series("epochs", [t.user_attrs.get("epochs") for t in trials], dtype=pl.Int64),
        pl.Series("best_epoch", [t.user_attrs.get("best_epoch") for t in trials], dtype=pl.Int64),
        pl.Series("last_reported", last, dtype=pl.Float64),
        pl.Series("seconds", [round(t.duration.total_seconds(), 3) if t.duration else None for t in trials],
                  dtype=pl.Float64),
        pl.Series("error", [t.user_attrs.get("error") or t.system_attrs.get("fail_reason") for t in trials],
                  dtype=pl.Utf8),
    ]
    return pl.DataFrame(series)


def format_trials(frame: pl.DataFrame, metric: str, best: int | None = None, params: list[str] | None = None) -> str:
    """The trials as a text table, best trial marked with ``*``."""
    params = params if params is not None else [c for c in frame.columns if c not in
                                                ("trial", "state", metric, "last_reported", "epochs", "best_epoch",
                                                 "seconds", "error")]
    head = ["", "trial", "state", metric, *params, "epochs", "seconds"]
    body = []
    for r in frame.iter_rows(named=True):
        val = r[metric]
        last = r["last_reported"]
        score = f"{val:.4f}" if val is not None else (f"({last:.4f})" if last is not None else "-")
        body.append(["*" if r["trial"] == best else "", str(r["trial"]), r["state"], score,
                     *[_fmt(r[p]) if r[p] is not None else "-" for p in params],
                     "-" if r["epochs"] is None else str(r["epochs"]),
                     "-" if r["seconds"] is None else f"{r['seconds']:.1f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    right = {1, 3, len(head) - 2, len(head) - 1}
    fmt = lambda row: " ".join(str(x).rjust(w) if i in right else str(x).ljust(w)  # noqa: E731
                               for i, (x, w) in enumerate(zip(row, widths))).rstrip()
    lines = [fmt(head), *map(fmt, body)]
    if any(r["state"] == "pruned" for r in frame.iter_rows(named=True)):
        lines.append(f"(pruned trials show their last reported {metric} in parentheses)")
    return "\n".join(lines)


def _write_study(out: Path, cfg: dict, best_cfg: dict, frame: pl.DataFrame, summary: dict,
                 space: dict[str, Param], metric: str, study, importances: dict | None) -> Path:
    from recforge.runs import publish_folder

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".partial-{out.name}-", dir=out.parent))
    try:
        best = summary["best"]
        header = (f"# best config of `recforge tune {best_cfg['model']['name']}` on {cfg['data']['path']}: trial "
                  f"{best['number']}, valid {metric} {best['value']:.6f}\n"
                  f"# reproduce: recforge train --config best.yaml   (add epochs=N to train longer than the study)\n")
        (tmp / "best.yaml").write_text(header + yaml.safe_dump(best_cfg, sort_keys=False))
        (tmp / "space.yaml").write_text(yaml.safe_dump({k: p.describe() for k, p in space.items()}, sort_keys=False,
                                                       default_flow_style=None))
        frame.write_csv(tmp / "trials.csv")
        frame.write_parquet(tmp / "trials.parquet")
        note = plot_trials(study, space, metric, importances, tmp / "trials.png")
        summary["plot"] = "trials.png" if note is None else note
        (tmp / "study.json").write_text(json.dumps(summary, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_folder(tmp, out)


# ---- plot ---------------------------------------------------------------------------------------
def plot_trials(study, space: dict[str, Param], metric: str, importances: dict | None, path: Path) -> str | None:
    """PNG of the study: score per trial with the best so far (pruned trials at their last
    reported value), parameter importances when known, and parallel coordinates of the complete
    trials coloured by score. Returns None, or a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "skipped: matplotlib is not installed (pip install 'recforge[plot]')"
    trials = study.trials
    done = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED" and t.last_step is not None]
    panels = 2 + (importances is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    ax = axes[0]
    ax.scatter([t.number for t in done], [t.value for t in done], color="tab:blue", s=22, label="complete", zorder=3)
    if pruned:
        ax.scatter([t.number for t in pruned], [t.intermediate_values[t.last_step] for t in pruned], marker="x",
                   color="tab:gray", s=22, label="pruned (last reported)", zorder=2)
    xs, ys, best = [], [], -math.inf
    for t in sorted(done, key=lambda t: t.number):
        best = max(best, t.value)
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs + [max(t.number for t in trials)], ys + [ys[-1]], where="post", color="tab:orange",
                label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(f"valid {metric}")
    ax.set_title("score per trial")
    ax.legend(fontsize=8, loc="lower right")
    if importances is not None:
        ax = axes[1]
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:green")
        ax.set_xlabel("importance (share)")
        ax.set_title("parameter importance")
    ax = axes[-1]
    names = [n for n in space if any(n in t.params for t in done)]
    if done and len(names) == 1:  # one parameter: score against its value
        p = space[names[0]]
        xs = [t.params.get(p.name) for t in done]
        if p.kind == "categorical":
            xs = [p.choices.index(x) if x in p.choices else None for x in xs]
            ax.set_xticks(range(len(p.choices)), [_fmt(c) for c in p.choices])
        elif p.log:
            ax.set_xscale("log")
        ax.scatter(xs, [t.value for t in done], color="tab:blue", s=22)
        ax.set_xlabel(p.name)
        ax.set_ylabel(f"valid {metric}")
        ax.set_title(f"score against {p.name}")
    elif done and names:
        _parallel_coordinates(fig, ax, plt, done, [space[n] for n in names], metric)
    else:
        ax.text(0.5, 0.5, "no complete trial", ha="center", va="center")
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _parallel_coordinates(fig, ax, plt, done, params: list[Param], metric: str) -> None:
    """One vertical axis per parameter (its range, low at the bottom; choices in order), one line
    per complete trial coloured by score, the best trial drawn thicker."""
    values = [t.value for t in done]
    lo, hi = min(values), max(values)
    cmap = plt.get_cmap("viridis")
    best_n = max(done, key=lambda t: t.value).number
    for t in sorted(done, key=lambda t: t.value):
        pts = [(i, p.position(t.params.get(p.name))) for i, p in enumerate(params)]
        pts = [(i, y) for i, y in pts if y is not None]
        colour = cmap(0.5 if hi == lo else (t.value - lo) / (hi - lo))
        top = t.number == best_n
        ax.plot([i for i, _ in pts], [y for _, y in pts], color=colour, lw=2.4 if top else 1.0,
                alpha=0.95 if top else 0.6, marker="o", ms=3, zorder=3 if top else 2)
    for i, p in enumerate(params):
        ax.axvline(i, color="0.8", lw=0.8, zorder=0)
        low, high = (p.choices[0], p.choices[-1]) if p.kind == "categorical" else (p.low, p.high)
        ax.text(i, -0.06, _fmt(low), ha="center", va="top", fontsize=7)
        ax.text(i, 1.06, _fmt(high), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(params)), [p.name for p in params], rotation=30, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi)), ax=ax, label=f"valid {metric}")
    ax.set_title("parameters of complete trials")


# ---- command line -------------------------------------------------------------------------------
def add_parser(subparsers):
    """Add the ``tune`` subcommand to the ``recforge`` command's subparsers; returns its parser."""
    from recforge.cli import _add_data_flags

    p = subparsers.add_parser(
        "tune", help="search hyper-parameters on the validation part (Optuna; needs the 'tune' extra)",
        description="Search a model's hyper-parameters with Optuna, scoring each trial on the validation part "
                    "only (the test part is never read), and write the best config for recforge train --config.")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="a file, a dataset folder, or a name (synthetic, ml-100k, ...)")
    p.add_argument("overrides", nargs="*",
                   help="key=value fixed for every trial (epochs=30, split.method=temporal, seed=1)")
    p.add_argument("--trials", type=int, default=20, help="number of trials (default: 20)")
    p.add_argument("--timeout", type=float, default=None, help="start no new trial after this many seconds")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampler (default: 0); the training seed is the config's seed=N")
    p.add_argument("--metric", default=None, help="validation metric to maximise (default: the model's valid_metric "
                                                  "or ndcg@10)")
    p.add_argument("--space", default=None, help="search space YAML (default: configs/models/MODEL.search.yaml)")
    p.add_argument("--out", default=None, help="study folder to create (default: runs/tune-<time>-<model>-<data>)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (sqlite:///tune.db) to resume or share a study")
    p.add_argument("--study-name", default=None, help="study name in --storage (default: recforge-<model>-<data>)")
    p.add_argument("--epochs", type=int, default=None, help="cap on the epochs of every trial (PyTorch models)")
    p.add_argument("--pruner", choices=["median", "none"], default="median",
                   help="stop trials below the median of earlier ones at the same epoch (default) or never")
    p.add_argument("--prune-warmup", type=int, default=5,
                   help="epochs a trial runs at least before it may be pruned (default: 5)")
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe", help="Optuna sampler (default: tpe)")
    p.add_argument("--quiet", action="store_true", help="no line per trial")
    _add_data_flags(p)
    return p


def run_from_args(args) -> int:
    """Run ``recforge tune`` from parsed arguments: prints the trials table, the best trial and,
    last, the study folder."""
    from recforge.cli import _data_overrides

    res = tune(args.model, args.data, _data_overrides(args) + list(args.overrides or []), trials=args.trials,
               timeout=args.timeout, seed=args.seed, metric=args.metric, space=args.space, out=args.out,
               storage=args.storage, study_name=args.study_name, epochs=args.epochs, pruner=args.pruner,
               prune_warmup=args.prune_warmup, sampler=args.sampler, progress=not args.quiet)
    print(format_trials(res.trials, res.metric, res.best["number"], res.summary["searched"]))
    params = "  ".join(f"{k}={_fmt(v)}" for k, v in res.best["params"].items())
    print(f"best: trial {res.best['number']}, valid {res.metric} {res.best['value']:.4f}  {params}")
    if res.summary.get("plot") != "trials.png":
        print(f"plot {res.summary.get('plot')}")
    print(f"train it: recforge train --config {res.path / 'best.yaml'}")
    print(res.path)
    return 0
