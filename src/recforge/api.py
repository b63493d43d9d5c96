"""The Python API: the same verbs as the command line.

>>> import recforge
>>> run = recforge.train("ease", data="synthetic", overrides={"reg_lambda": 200})
>>> run.metrics["test"]["ndcg@10"]
>>> recforge.recommend(run.path, user=1, k=10)
>>> recforge.compare(run_a.path, run_b.path)
>>> recforge.bench(["pop", "ease"], ["synthetic"], seeds=[0, 1, 2])
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from recforge import config as C
from recforge.errors import ConfigError, RecForgeError
from recforge.evaluation.evaluator import EvalResult, Protocol, evaluate as _evaluate, parse_head_rule
from recforge.models import registry
from recforge.pipeline import dataset_label, eval_sets, load_dataset, split_dataset, target_min_rating
from recforge.runs import Run, RunWriter, finished_run, history_columns, run_name
from recforge.training.trainer import set_seed

log = logging.getLogger("recforge")

HEADLINE = ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr")


def resolve(model: str, data: str | None = None, overrides=None) -> dict:
    """The resolved config of a run: model defaults, then overrides."""
    return C.apply_overrides(C.base_config(model, data), overrides)


def _protocol(cfg: dict) -> Protocol:
    exclude = C.resolve_exclude(cfg)
    return Protocol.from_option(cfg["eval"].get("sampled"), exclude, cfg["eval"].get("ties") or "pessimistic",
                                cfg["data"].get("target_behavior") if exclude == "target_behavior" else None)


def valid_protocol(cfg: dict) -> Protocol:
    """The protocol of the trainer's validation (early stopping, pruning): full ranking under the
    run's exclusion and tie rule. Without it the trainer would exclude the whole history, which for
    data with a target behaviour removes the viewed and carted items that are valid candidates."""
    p = _protocol(cfg)
    return Protocol.from_option(None, p.exclude, p.ties, p.target_behavior)


def _eval_sets(cfg: dict, split):
    target_behavior = cfg["data"].get("target_behavior") if C.resolve_exclude(cfg) == "target_behavior" else None
    return eval_sets(split, target_min_rating(cfg, split), target_behavior)


def _eval(model, evalset, cfg, popularity) -> EvalResult:
    e = cfg["eval"]
    return _evaluate(model, evalset, ks=e["ks"], protocol=_protocol(cfg), batch_size=int(e["batch_size"]),
                     popularity=popularity, hist_bins=e.get("hist_bins"), seed=cfg["seed"],
                     head_rule=e.get("head_items"))


#: side data of a split (``data.<name>``) -> what it holds, for messages; a model reading one sets ``uses_<name>``
SIDE_DATA = {"knowledge": "item relations", "social": "user-user links", "tags": "item tags"}


def _protocol_record(cfg: dict, split, model) -> dict:
    rec = {"split": split.protocol, **_protocol(cfg).describe(),
           "head_items": "{}:{:g}".format(*parse_head_rule(cfg["eval"].get("head_items"))),
           "subsequence_split": "none", "valid_metric": getattr(model, "valid_metric", None)}
    threshold = target_min_rating(cfg, split)
    if threshold is not None:
        rec["targets"] = f"held-out rows rated >= {threshold:g} (lower-rated held-out items count as non-relevant)"
    rec.update(_behavior_record(cfg, split))
    for side in SIDE_DATA:  # side data asked for in data.*: what was built, and whether the model read it
        if getattr(split, side) is not None:
            rec[side] = {**getattr(split, side).describe(), "used_by_model": bool(getattr(model, f"uses_{side}", False))}
    notes = getattr(model, "protocol_notes", None)
    if callable(notes):
        rec.update(notes())
    return rec


def _behavior_record(cfg: dict, split) -> dict:
    """The target behaviour and the behaviours the model was given (training rows of each)."""
    from recforge.data.schema import BEHAVIOR

    out: dict = {}
    if cfg["data"].get("target_behavior"):
        out["target_behavior"] = cfg["data"]["target_behavior"]
    if BEHAVIOR in split.train.columns:
        counts = split.train.group_by(BEHAVIOR).len().sort(["len", BEHAVIOR], descending=[True, False])
        out["behaviors"] = {str(b): int(n) for b, n in counts.iter_rows()}
    return out


def train(model: str | None = None, data: str | None = None, overrides=None, out: str | Path = "runs",
          verbose: bool = True, config: dict | None = None, resume: str | Path | None = None) -> Run:
    """Fit ``model`` on the training part of ``data``, evaluate on validation and test by full
    ranking, and write a run folder. Returns the :class:`Run`.

    ``config``: a resolved config (a run's ``config.yaml``, or the best config of ``recforge tune``)
    used instead of ``model``/``data``; ``overrides`` still apply on top. ``resume``: a run folder
    (or the hidden ``.partial-*`` folder a killed run left) whose ``checkpoints/last.pt`` training
    continues from; its config is used, with ``overrides`` on top (``epochs=400`` extends a run)."""
    resume_ckpt = None
    if resume is not None:
        from recforge.training.trainer import load_checkpoint

        resume = Path(resume)
        if not (resume / "config.yaml").exists():
            raise RecForgeError(f"{resume}: no config.yaml; --resume takes a run folder written by recforge train")
        load_checkpoint(resume)  # checks that there is a usable one, with a clear message
        resume_ckpt = resume / "checkpoints" / "last.pt"
        config = yaml.safe_load((resume / "config.yaml").read_text())
    if config is not None and "llm" in config:
        cfg = config
    elif config is not None:
        cfg = C.apply_overrides(copy.deepcopy(config), overrides)
        if model and model.lower() != cfg["model"]["name"]:
            raise ConfigError(f"the config is for model {cfg['model']['name']!r}, not {model!r}; drop the model name "
                              "or the --config file")
        if data is not None:
            cfg["data"]["path"] = str(data)
    else:
        if not model:
            raise ConfigError("no model given; name one (recforge models lists them) or pass --config FILE")
        from recforge.llm import task as llm_task

        if llm_task.is_llm(model):  # a language model reads histories as text (recforge/llm/task.py)
            return llm_task.train(model, data, overrides, out=out, verbose=verbose)
        cfg = resolve(model, data, overrides)
    if "llm" in cfg:  # a language-model task config (an LLM, or the ID baseline run beside one)
        from recforge.llm import task as llm_task

        if resume is not None:
            raise ConfigError("--resume is for ranking and CTR runs; train a language-model run again instead")
        return llm_task.train(None, data, overrides, out=out, verbose=verbose, config=config)
    from recforge import ctr

    if ctr.is_ctr(cfg["model"]["name"]):  # labelled feature rows: the CTR task (recforge/ctr.py)
        return ctr.train(cfg, out=out, verbose=verbose, resume_ckpt=resume_ckpt, resume=resume)
    t0 = time.perf_counter()
    from recforge.training import distributed

    distributed.init_from_env()  # several processes (torchrun or --nproc): join their group
    rank, n_proc = distributed.world()
    if rank > 0:
        distributed.barrier()  # rank 0 prepares (and caches) the data first
    ds = load_dataset(cfg["data"])
    if rank == 0:
        distributed.barrier()
    cfg = C.with_resolved_exclude(cfg, ds)
    split = split_dataset(ds, cfg)
    valid_set, test_set = _eval_sets(cfg, split)
    set_seed(cfg["seed"])
    params = C.model_params(cfg)
    if "verbose" in registry.get_model_class(cfg["model"]["name"]).param_names():
        params["verbose"] = verbose
    est = registry.create(cfg["model"]["name"], **params)
    if getattr(est, "needs_items", False):  # text-enhanced models read the item side table
        est.attach_dataset(ds)
    for side, what in SIDE_DATA.items():
        if getattr(split, side) is not None and not getattr(est, f"uses_{side}", False):
            log.warning("data.%s: %s does not read %s; they are built and recorded, not used", side,
                        cfg["model"]["name"], what)
    name = run_name(cfg["model"]["name"], dataset_label(cfg["data"]["path"]), cfg["seed"])
    # only rank 0 writes the run folder; the other processes write into a scratch folder they delete
    writer = RunWriter(out if rank == 0 else tempfile.mkdtemp(prefix="recforge-rank"), name)
    try:
        writer.write_yaml("config.yaml", cfg)  # a killed run leaves its config beside its checkpoints
        if hasattr(est, "checkpoint_dir"):
            est.checkpoint_dir = writer.tmp / "checkpoints"
            est.resume_from = resume_ckpt
        log.info("data %s: %s", cfg["data"]["path"], ds.summary())
        if resume_ckpt is not None:
            log.info("resuming %s", resume)
        tf = time.perf_counter()
        est.valid_protocol = valid_protocol(cfg)
        est.fit(split, valid_set)
        fit_seconds = time.perf_counter() - tf
        pop = split.item_popularity
        res_valid = _eval(est, valid_set, cfg, pop) if valid_set is not None else None
        te = time.perf_counter()
        res_test = _eval(est, test_set, cfg, pop)
        eval_seconds = time.perf_counter() - te
        metrics = {
            "model": cfg["model"]["name"],
            "data": cfg["data"]["path"],
            "seed": cfg["seed"],
            "valid": res_valid.metrics if res_valid else {},
            "test": res_test.metrics,
            "groups": res_test.groups,
            "protocol": _protocol_record(cfg, split, est),
            "dataset": ds.summary(),
            "timing": {"fit_seconds": round(fit_seconds, 2), "test_eval_seconds": round(eval_seconds, 2),
                       "total_seconds": round(time.perf_counter() - t0, 2)},
        }
        if resume is not None:
            metrics["resumed_from"] = str(resume)
        if n_proc > 1:
            metrics["timing"]["processes"] = n_proc
        if hasattr(est, "history_"):
            metrics["training"] = {k: v for k, v in est.history_.items() if k != "epochs"}
            writer.write_json("history.json", est.history_)
        writer.write_yaml("config.yaml", cfg)
        writer.write_json("metrics.json", metrics)
        _per_user(res_test, ds).write_parquet(writer.tmp / "per_user_test.parquet")
        if res_valid:
            _per_user(res_valid, ds).write_parquet(writer.tmp / "per_user_valid.parquet")
        est.save(writer.tmp / "model")
        ds.user_map.write_parquet(writer.tmp / "user_map.parquet")
        ds.item_map.write_parquet(writer.tmp / "item_map.parquet")
        ds.interactions.select(history_columns(ds.interactions)).write_parquet(writer.tmp / "interactions.parquet")
        if ds.items is not None:
            ds.items.write_parquet(writer.tmp / "items.parquet")
        path = writer.finish(keep=rank == 0)
    except BaseException:
        writer.fail(scratch=rank > 0)
        raise
    return finished_run(path, cfg, metrics, resume)


def _per_user(res: EvalResult, ds) -> pl.DataFrame:
    raw = ds.user_map.sort("idx")["raw"]
    return res.per_user.with_columns(pl.Series("user_raw", raw.gather(res.per_user["user"].to_numpy()).cast(pl.Utf8)))


def evaluate(run: str | Path | Run, sampled=None, ks=None, exclude=None, ties=None, head_items=None,
             device: str | None = None, per_user: bool = False) -> dict:
    """Re-evaluate a run's model on its test split, optionally under another protocol: other
    ``ks``, ``sampled`` negatives, ``exclude`` (history | none | target_behavior | auto), ``ties``
    (pessimistic | expected | optimistic | index) or ``head_items`` (share:S | top:F | count:N).
    ``device`` (auto | cpu | cuda | cuda:N | mps) is where a PyTorch model scores and ranks; None:
    the device it was trained with (``device="cpu"`` evaluates a GPU-trained run without a GPU).
    ``per_user``: also return the per-user metrics (a Polars table under ``"per_user"``, the format of
    the run's ``per_user_test.parquet``) for paired tests under this protocol."""
    run = run if isinstance(run, Run) else Run.load(run)
    from recforge import ctr

    if ctr.is_ctr_run(run):  # CTR runs are re-evaluated on their test rows with their saved encoders
        return ctr.evaluate(run, device=device)
    if run.metrics.get("task") == "llm":  # language-model runs: their test sample, scored again
        from recforge.llm import task as llm_task

        if any(v is not None for v in (sampled, ks, exclude, ties, head_items)):
            raise ConfigError(f"{run.path} is a language-model run, scored pointwise (AUC, log-loss) on its test "
                              "sample; the ranking options (--sampled, --ks, --exclude, --ties) do not apply")
        return llm_task.evaluate(run, device=device)
    base = run.config
    if "exclude" not in base["eval"]:  # a run folder from before eval.exclude: keep its meaning
        base = {**base, "eval": {**C.EVAL_DEFAULTS, **base["eval"], "exclude": C.resolve_exclude(base)}}
        base["eval"].pop("exclude_history", None)
    given = {"eval.sampled": sampled, "eval.ks": ks, "eval.exclude": exclude, "eval.ties": ties,
             "eval.head_items": head_items}
    cfg = C.apply_overrides(base, {k: v for k, v in given.items() if v is not None})
    ds = load_dataset(cfg["data"])
    cfg = C.with_resolved_exclude(cfg, ds)
    split = split_dataset(ds, cfg)
    _, test_set = _eval_sets(cfg, split)
    model = run.load_model(device)
    res = _eval(model, test_set, cfg, split.item_popularity)
    out = {"test": res.metrics, "groups": res.groups, "protocol": _protocol_record(cfg, split, model),
           "device": str(getattr(model, "device_", "cpu"))}
    if per_user:
        out["per_user"] = _per_user(res, ds)
    return out


def recommend(run: str | Path | Run, user=None, history=None, k: int = 10, device: str | None = None) -> list[dict]:
    """Top-``k`` items (raw ids) for a known ``user`` or a ``history`` of raw item ids, scored on
    ``device`` (None: the device the model was trained with)."""
    run = run if isinstance(run, Run) else Run.load(run)
    if run.metrics.get("task") == "ctr":
        raise RecForgeError(f"{run.path} is a CTR run: it scores feature rows, not a catalogue; use "
                            "recforge predict RUN --input ROWS --out scores.parquet")
    if run.metrics.get("task") == "llm":
        raise RecForgeError(f"{run.path} is a language-model run: it answers Yes/No for (user, item) prompts, "
                            "it does not rank the catalogue; see its predictions_test.parquet")
    if user is None and not history:
        raise RecForgeError("give a user id (--user RAW_ID) or a history of item ids (--history ITEM ...)")
    return run.recommend(user=user, history=history, k=k, device=device)


def _runs(spec) -> list[Run]:
    if isinstance(spec, (Run, str, Path)):
        spec = [spec]
    return [r if isinstance(r, Run) else Run.load(r) for r in spec]


def _mean_per_user(runs: list[Run]) -> pl.DataFrame:
    """Per-user test metrics averaged over runs (seeds) of one model; users evaluated in every run."""
    from recforge.evaluation.significance import seed_mean

    return seed_mean([r.per_user() for r in runs])


def compare(run_a, run_b, metrics: list[str] | None = None) -> dict:
    """Paired t-test and Wilcoxon signed-rank test on the per-user test metrics of two runs.

    ``run_a`` / ``run_b`` may each be a list of runs (the seeds of one model): each user's metric
    is then averaged over the seeds before the test, which removes most of the seed noise from
    the per-user differences."""
    from recforge.evaluation.significance import paired_tests

    a, b = _runs(run_a), _runs(run_b)
    from recforge import ctr

    pointwise = [ctr.is_ctr_run(r) or r.metrics.get("task") == "llm" for r in a + b]
    if any(pointwise):  # CTR and language-model runs: paired bootstrap and per-user tests
        if not all(pointwise):
            raise RecForgeError("compare CTR or language-model runs with each other, and ranking runs with ranking runs")
        return ctr.compare(a, b, metrics)
    pa = a[0].metrics.get("protocol", {})
    warnings = []
    for other in a[1:] + b:
        po = other.metrics.get("protocol", {})
        for key in ("split", "ranking", "subsequence_split"):
            if pa.get(key) != po.get(key):
                warnings.append(f"runs differ in protocol '{key}': {pa.get(key)} vs {po.get(key)} ({other.path.name})")
    pua, pub = _mean_per_user(a), _mean_per_user(b)
    metrics = metrics or [m for m in ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr") if m in pua.columns]
    rows = paired_tests(pua, pub, metrics)
    return {"a": ",".join(str(r.path) for r in a), "b": ",".join(str(r.path) for r in b),
            "n_runs": [len(a), len(b)], "rows": rows, "warnings": warnings, "protocol": pa}


def bench(models: list[str], datasets: list[str], seeds=(0, 1, 2), overrides=None, out: str | Path = "runs",
          verbose: bool = False, model_overrides: dict | None = None, progress=None, groups: str = "item") -> dict:
    """Train every model on every dataset with every seed; return and write a leaderboard
    (mean and standard deviation over seeds) as Markdown and JSON in ``out/bench-<time>/``.
    Every row holds the tail/head item and history-length group NDCG@10; ``groups`` picks the
    ones the Markdown table shows (``item``, ``hist``, ``all``, ``none``)."""
    for m in models:
        registry.get_model_class(m)
    rows = []
    runs_dir = Path(out)
    for d in datasets:
        for m in models:
            per_seed = []
            for s in seeds:
                ov = list(overrides or []) + list((model_overrides or {}).get(m, [])) + [f"seed={s}"]
                r = train(m, d, ov, out=runs_dir, verbose=verbose)
                per_seed.append(r)
                if progress:
                    progress(m, d, s, r)
            rows.append(_leader_row(m, d, per_seed))
    from recforge.reports.leaderboard import write_leaderboard

    folder = runs_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    board = {"rows": rows, "seeds": list(seeds), "models": models, "datasets": datasets}
    write_leaderboard(board, folder, groups)
    board["folder"] = str(folder)
    return board


def mean_std(values) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of ``values``."""
    vals = np.asarray(values, dtype=float)
    return {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}


def _leader_row(model: str, data: str, runs: list[Run]) -> dict:
    keys = [k for k in HEADLINE + ("auc", "logloss", "gauc") if k in runs[0].metrics["test"]]  # ranking or CTR
    extra = [k for k in ("coverage@10",) if k in runs[0].metrics["test"]]
    row = {"model": model, "data": data, "n_seeds": len(runs), "protocol": runs[0].metrics["protocol"],
           "runs": [str(r.path) for r in runs]}
    for k in keys + extra:
        row[k] = mean_std([r.metrics["test"][k] for r in runs])
    groups = [g for g in runs[0].metrics.get("groups", {}) if g.startswith(("item:", "hist:"))]
    for g in sorted(groups, key=lambda g: (not g.startswith("item:"), g != "item:tail")):
        if all(g in r.metrics.get("groups", {}) for r in runs):
            row[f"{g} ndcg@10"] = mean_std([r.metrics["groups"][g]["ndcg@10"] for r in runs])
    row["fit_seconds"] = float(np.mean([r.metrics["timing"]["fit_seconds"] for r in runs]))
    return row
