"""Run configuration: defaults, YAML model defaults, and ``key=value`` overrides.

A resolved run config has five sections::

    model: {name: ease, reg_lambda: 500.0, ...}   # the model's YAML defaults + overrides
    data:  {path: ..., min_user: 0, ...}           # reader and preparation options
    split: {method: auto, ...}                     # split method (auto: presplit or loo) and its options
    eval:  {ks: [5, 10, 20], sampled: null, ...}   # protocol
    seed: 0

Overrides are ``section.key=value`` (``model.hidden=128``, ``split.method=temporal``) or a bare
``key=value`` looked up in ``model`` first, then the other sections; ``data=PATH`` sets the data
path. Values are parsed as YAML scalars (``1e-3``, ``true``, ``[5, 10]``).
"""

from __future__ import annotations

import copy
import re

import yaml

from recforge.errors import ConfigError
from recforge.models import registry

DATA_DEFAULTS = {
    "path": None, "format": None,
    "user_col": None, "item_col": None, "time_col": None, "rating_col": None, "behavior_col": None,
    "items": None, "item_key": None, "sep": None, "time_format": None,
    "dedupe": "first", "rating_threshold": None, "min_user": 0, "min_item": 0, "behaviors": None,
    "target_behavior": None, "knowledge": None, "social": None, "tags": None, "cache": True,
}
#: ``auto``: ``presplit`` when the source comes with its split (train/test files), ``loo`` otherwise
SPLIT_DEFAULTS = {"method": "auto"}
SPLIT_OPTIONS = {
    "auto": {"min_length"},
    "loo": {"min_length"},
    "temporal": {"test_quantile", "valid_quantile", "test_cutoff", "valid_cutoff"},
    "random": {"ratios", "seed"},
    "presplit": {"valid"},
    "popularity_shift": {"test_share", "valid_share", "seed", "power", "keep_items"},
}
EVAL_DEFAULTS = {"ks": [5, 10, 20], "sampled": None, "batch_size": 1024, "exclude": "auto", "ties": "pessimistic",
                 "head_items": "share:0.8", "hist_bins": [5, 10, 20, 50], "target_min_rating": None}
#: the protocol a run uses when ``eval.exclude=auto``, by data kind (ARCHITECTURE.md explains why)
EXCLUDE_CHOICES = ("auto", "history", "none", "target_behavior")
SECTIONS = ("model", "data", "split", "eval")
#: the CTR task (models whose class has ``task = "ctr"``; recforge/data/ctr_readers.py explains the keys):
#: the ranking data keys (reader options, used when rows are derived from an interaction log) plus these
CTR_DATA_DEFAULTS = {
    "schema": None, "label": None, "categorical": None, "numeric": None, "multi": None, "sequence": None,
    "splitter": "^", "fields": None, "dataset_id": None, "min_count": 1, "max_len": None,
    "negatives": 4, "negatives_seed": 0, "negatives_from": "existing", "history_len": 20,
    "label_threshold": None, "user_features": False, "text": None,
}
CTR_SPLIT_DEFAULTS = {"method": "auto"}
CTR_EVAL_DEFAULTS = {"bins": 10}


def parse_value(text: str):
    """A command-line value read as YAML (``3``, ``1e-3``, ``[64, 64]``, ``true``, ``null``); text that
    YAML reads as nothing without saying null (``|``, ``>``, ``#``: separators, not block scalars or
    comments) stays the text it is; ``1e-3``, which YAML 1.1 reads as text, is a number."""
    if text == "":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None and text.strip() not in ("~", "null", "Null", "NULL"):
        return text
    if value == "" and text.strip() not in ('""', "''"):
        return text
    if isinstance(value, str) and _EXPONENT.fullmatch(text.strip()):
        return float(text)
    return value


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def base_config(model: str, data: str | None = None) -> dict:
    cfg = {
        "model": {"name": model.lower(), **registry.defaults(model)},
        "data": dict(DATA_DEFAULTS),
        "split": dict(SPLIT_DEFAULTS),
        "eval": copy.deepcopy(EVAL_DEFAULTS),
        "seed": 0,
    }
    if getattr(registry.get_model_class(model), "task", "ranking") == "ctr":  # labelled feature rows
        cfg.update(data={**DATA_DEFAULTS, **CTR_DATA_DEFAULTS}, split=dict(CTR_SPLIT_DEFAULTS),
                   eval=copy.deepcopy(CTR_EVAL_DEFAULTS))
    if data is not None:
        cfg["data"]["path"] = str(data)
    return cfg


def apply_overrides(cfg: dict, overrides: list[str] | dict | None, model_keys: set[str] | None = None,
                    sections: tuple[str, ...] = SECTIONS) -> dict:
    """Apply ``key=value`` overrides in order; unknown keys raise a ConfigError naming the valid ones.
    ``model_keys`` (default: the registered model's parameters) and ``sections`` (a bare key is
    looked up in ``model`` then the others in turn) let another task's config use the same rules."""
    cfg = copy.deepcopy(cfg)
    items = overrides.items() if isinstance(overrides, dict) else [split_kv(o) for o in (overrides or [])]
    if model_keys is None:
        model_keys = registry.get_model_class(cfg["model"]["name"]).param_names()
    for key, value in items:
        if isinstance(value, str):
            value = parse_value(value)
        if key in ("seed",):
            cfg["seed"] = int(value)
            continue
        if key == "data":
            cfg["data"]["path"] = str(value)
            continue
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in sections:
                raise ConfigError(f"unknown config section {section!r} in {key!r}; use one of {', '.join(sections)}")
        else:
            section, sub = _find_section(cfg, key, model_keys, sections), key
        _check_key(cfg, section, sub, model_keys)
        cfg[section][sub] = value
    return cfg


def split_kv(text: str) -> tuple[str, str]:
    """``"key=value"`` as ``(key, value)``, both stripped; anything else is a ConfigError naming the form."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value; write e.g. model.hidden=128 or epochs=20")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def _find_section(cfg: dict, key: str, model_keys: set[str], sections: tuple[str, ...] = SECTIONS) -> str:
    if key in model_keys:
        return "model"
    for s in sections[1:]:
        if key in cfg[s] or (s == "split" and _ranking_split(cfg) and key in set().union(*SPLIT_OPTIONS.values())):
            return s
    raise ConfigError(
        f"unknown override key {key!r} for model {cfg['model']['name']!r}; model keys: {', '.join(sorted(model_keys))}; "
        f"other keys: {', '.join(f'{s}.*' for s in sections[1:])}, seed"
    )


def _ranking_split(cfg: dict) -> bool:
    """Whether ``cfg``'s split is one of the ranking/CTR split methods (whose options are ``SPLIT_OPTIONS``);
    the language-model task (a config with an ``llm`` section) checks its own split keys."""
    return "llm" not in cfg and (cfg["split"].get("method") or "auto") in SPLIT_OPTIONS


def _check_key(cfg: dict, section: str, key: str, model_keys: set[str]) -> None:
    if section == "model":
        if key not in model_keys:
            raise ConfigError(f"unknown parameter {key!r} for model {cfg['model']['name']!r}; valid: {', '.join(sorted(model_keys))}")
    elif section == "split" and _ranking_split(cfg):
        allowed = {"method"} | set().union(*SPLIT_OPTIONS.values())
        if key not in allowed:
            raise ConfigError(f"unknown split option {key!r}; valid: {', '.join(sorted(allowed))}")
    elif section == "eval" and key == "exclude_history":
        raise ConfigError("eval.exclude_history is replaced by eval.exclude: use eval.exclude=history (every history "
                          "item removed), eval.exclude=none (repeat consumption) or eval.exclude=target_behavior")
    elif key not in cfg[section]:
        raise ConfigError(f"unknown {section} option {key!r}; valid: {', '.join(sorted(cfg[section]))}")


def resolve_exclude(cfg: dict, has_behaviors: bool = False) -> str:
    """The items removed from rankings: ``eval.exclude``, with ``auto`` chosen by data kind:
    ``target_behavior`` when ``data.target_behavior`` is set; ``none`` when repeated
    interactions are kept (``data.dedupe=none``) or when the data has several behaviours but no
    target behaviour (a purchase of a viewed item must stay possible); ``history`` otherwise. A
    config written before ``eval.exclude`` existed (``exclude_history``) keeps its meaning."""
    e, d = cfg["eval"], cfg["data"]
    value = e.get("exclude")
    if value is None:  # an older run folder's config
        return "history" if e.get("exclude_history", True) else "none"
    if value not in EXCLUDE_CHOICES:
        raise ConfigError(f"eval.exclude={value!r}: choose one of {', '.join(EXCLUDE_CHOICES)}")
    if value != "auto":
        return value
    if d.get("target_behavior"):
        return "target_behavior"
    if d.get("dedupe") == "none" or has_behaviors:
        return "none"
    return "history"


def resolve_split_method(cfg: dict, ds) -> str:
    """``split.method``, with ``auto`` chosen by data kind: ``presplit`` for a source that comes
    with its split (a ``split`` column: LightGCN's train.txt/test.txt, a folder with train.csv
    and test.csv, RecBole's X.train.inter/X.test.inter), ``loo`` otherwise."""
    from recforge.data.schema import SPLIT

    method = cfg["split"].get("method") or "auto"
    if method != "auto":
        return method
    return "presplit" if SPLIT in ds.interactions.columns else "loo"


def with_resolved_exclude(cfg: dict, ds) -> dict:
    """A copy of ``cfg`` whose data-dependent ``auto`` choices, ``eval.exclude`` and
    ``split.method``, are resolved for the dataset ``ds`` (so the run folder's config says what
    was done, not ``auto``)."""
    from recforge.data.schema import BEHAVIOR

    inter = ds.interactions
    has_behaviors = BEHAVIOR in inter.columns and inter[BEHAVIOR].n_unique() > 1
    out = copy.deepcopy(cfg)
    out["eval"]["exclude"] = resolve_exclude(cfg, has_behaviors)
    out["eval"].pop("exclude_history", None)
    if "split" in out and "method" in out["split"]:
        out["split"]["method"] = resolve_split_method(out, ds)
    return out


def split_options(cfg: dict, ds=None) -> tuple[str, dict]:
    """The split method (``auto`` resolved for ``ds``; ``loo`` without a dataset) and its options."""
    given = cfg["split"].get("method") or "auto"
    method = resolve_split_method(cfg, ds) if ds is not None else given
    if method == "auto":
        method = "loo"
    if method not in SPLIT_OPTIONS:
        raise ConfigError(f"unknown split {method!r}; choose one of {', '.join(SPLIT_OPTIONS)}")
    opts = {k: v for k, v in cfg["split"].items() if k != "method"}
    bad = set(opts) - SPLIT_OPTIONS[method]
    if bad:
        chosen = f" (split.method=auto chose {method} for this data)" if given == "auto" else ""
        raise ConfigError(f"split {method!r}{chosen} does not take {', '.join(sorted(bad))}; it takes: "
                          f"{', '.join(sorted(SPLIT_OPTIONS[method])) or 'no options'}")
    if "ratios" in opts:
        opts["ratios"] = tuple(opts["ratios"])
    return method, opts


def model_params(cfg: dict) -> dict:
    params = {k: v for k, v in cfg["model"].items() if k != "name"}
    cls = registry.get_model_class(cfg["model"]["name"])
    if "seed" in cls.param_names():
        params["seed"] = cfg["seed"]
    return params
