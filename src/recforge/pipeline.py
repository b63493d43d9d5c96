"""Data loading for runs: a path or a known name → prepared Dataset → Split → EvalSets."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recforge.config import split_options
from recforge.data.dataset import Dataset
from recforge.data.prepare import PrepareOptions, prepare, prepare_cached
from recforge.data.schema import BEHAVIOR, RATING, SPLIT
from recforge.data.split import Split, make_split
from recforge.errors import ConfigError, DataError
from recforge.evaluation.batch import EvalSet, build_evalset

READER_OPTIONS = ("format", "user_col", "item_col", "time_col", "rating_col", "behavior_col", "items",
                  "item_key", "sep", "time_format")
#: built-in data: ``synthetic[:SEED]`` (a shop log) and ``synthetic-mb[:SEED]`` (the same shop with
#: view / cart / buy behaviours, :func:`recforge.data.synthetic.make_synthetic` ``behaviors=True``)
BUILTIN = ("synthetic", "synthetic-mb")


def prepare_options(data_cfg: dict) -> PrepareOptions:
    beh = data_cfg.get("behaviors")
    if isinstance(beh, str):
        beh = tuple(b.strip() for b in beh.split(",") if b.strip())
    return PrepareOptions(dedupe=data_cfg.get("dedupe", "first"), rating_threshold=data_cfg.get("rating_threshold"),
                          min_user=int(data_cfg.get("min_user") or 0), min_item=int(data_cfg.get("min_item") or 0),
                          behaviors=tuple(beh) if beh else None)


def reader_options(data_cfg: dict) -> dict:
    opts = {k: data_cfg.get(k) for k in READER_OPTIONS if data_cfg.get(k) is not None}
    if str(opts.get("time_col", "")).lower() == "none":
        opts["time_col"] = None  # the file has no time: order of rows per user becomes the timestamp
    if "format" in opts:
        opts["fmt"] = opts.pop("format")
    return opts


def load_dataset(data_cfg: dict) -> Dataset:
    """Read, clean and encode the data a config names (cached by source and options)."""
    from recforge.data.download import resolve_dataset
    from recforge.data.readers import load_raw, reader_key

    path = data_cfg.get("path")
    if not path:
        raise ConfigError("no data given; pass --data PATH_OR_NAME (e.g. --data synthetic or a file or folder)")
    opts = prepare_options(data_cfg)
    name = str(path)
    kind, _, seed = name.partition(":")
    if kind in BUILTIN:
        from recforge.data.synthetic import make_synthetic

        ds = prepare(make_synthetic(seed=int(seed or 0), behaviors=kind == "synthetic-mb"), opts)
    else:
        source = resolve_dataset(name)
        ropts = reader_options(data_cfg)
        loader = lambda: load_raw(source, lazy=True, **ropts)  # noqa: E731  (large tables stream; see prepare.py)
        if not data_cfg.get("cache", True):
            ds = prepare(loader(), opts)
        else:
            ds = prepare_cached(loader, str(source), opts, reader_key(source, **ropts))
        ds.meta["source"] = str(source)  # where side files (data.social=auto, data.tags=auto) are looked for
    check_target_behavior(ds, data_cfg)
    return ds


def check_target_behavior(ds: Dataset, data_cfg: dict) -> None:
    """``data.target_behavior`` must be a behaviour of the data with rows left after filtering;
    one DataError naming the behaviours present (or the filters) and the fix otherwise."""
    target = data_cfg.get("target_behavior")
    if not target:
        return
    inter = ds.interactions
    if BEHAVIOR not in inter.columns:
        raise DataError(f"{ds.name}: data.target_behavior={target} but the data has no behaviour column; map the "
                        "column that holds behaviour types with data.behavior_col=NAME (--behavior-col), or drop "
                        "data.target_behavior")
    source = ds.meta.get("source_behaviors")
    if source is None:  # a dataset prepared before the counts were recorded
        source = {("" if b is None else b): n for b, n in inter.group_by(BEHAVIOR).len().iter_rows()}
    present = [b for b in source if b]
    if target not in source:
        raise DataError(f"{ds.name}: data.target_behavior={target} is not a behaviour of the data (behaviours "
                        f"present: {', '.join(present)}); set data.target_behavior to one of them")
    is_target = pl.col(BEHAVIOR) == target
    if SPLIT in inter.columns:  # held-out rows of a given split without a behaviour are target rows
        is_target = is_target | (pl.col(BEHAVIOR).is_null() & (pl.col(SPLIT) != "train"))
    if not inter.select(is_target.fill_null(False).any()).item():
        kept = prepare_options(data_cfg).behaviors
        if kept and target not in kept:
            raise DataError(f"{ds.name}: data.behaviors={','.join(kept)} removes every row of the target behaviour "
                            f"{target}; add it: data.behaviors={','.join(kept)},{target}")
        p = ds.meta.get("prepare", {})
        filters = ", ".join(f"{k}={p[k]}" for k in ("min_user", "min_item", "rating_threshold") if p.get(k))
        raise DataError(f"{ds.name}: no row of the target behaviour {target} is left after filtering "
                        f"({source[target]:,} before; {filters or 'filters'}); lower the k-core thresholds "
                        "(data.min_user, data.min_item) or the other filters")


def split_dataset(ds: Dataset, cfg: dict) -> Split:
    """The split the config names (``auto``: the source's own split, else leave-one-out), over
    the target behaviour's rows when ``data.target_behavior`` is set, with the item relations of
    ``data.knowledge`` (built from the training part) in ``split.knowledge``, the user-user links of
    ``data.social`` in ``split.social`` and the item tags of ``data.tags`` (training part) in
    ``split.tags``. A reader-built ``tags`` column of ``ds.items`` (MovieLens) is rebuilt here without
    the tags users put on their own held-out items (``protocol.item_tags``), so ``ds`` changes."""
    method, opts = split_options(cfg, ds)
    data = cfg.get("data", {})
    split = make_split(ds, method, target_behavior=data.get("target_behavior") or None, **opts)
    from recforge.data.tags import drop_held_out_item_tags

    item_tags = drop_held_out_item_tags(ds, split)  # the item table's tags: none of the held-out pairs
    if item_tags is not None:
        split.protocol["item_tags"] = item_tags
    if data.get("knowledge"):
        from recforge.data.knowledge import build_knowledge

        split.knowledge = build_knowledge(data["knowledge"], ds, split.train)
    if data.get("social"):
        from recforge.data.social import build_social

        split.social = build_social(data["social"], ds)
    if data.get("tags"):
        from recforge.data.tags import build_tags

        split.tags = build_tags(data["tags"], ds, split.train)
    return split


def eval_sets(split: Split, target_min_rating: float | None = None,
              target_behavior: str | None = None) -> tuple[EvalSet | None, EvalSet]:
    """Validation and test sets. ``target_min_rating``: only held-out rows rated at least this
    are targets (the others stay out of the ranking: the history holds every visible row,
    whatever its rating); users left without a target are not evaluated. ``target_behavior``:
    each set also lists the history items of that behaviour (``eval.exclude=target_behavior``)."""
    valid_rows, test_rows = split.valid, split.test
    if target_min_rating is not None:
        if RATING not in split.test.columns:
            raise ConfigError(f"eval.target_min_rating={target_min_rating}: the data has no rating column; "
                              "remove the option or give the rating column (data.rating_col=NAME)")
        valid_rows = valid_rows.filter(pl.col(RATING) >= target_min_rating)
        test_rows = test_rows.filter(pl.col(RATING) >= target_min_rating)
        if test_rows.height == 0:
            raise ConfigError(f"eval.target_min_rating={target_min_rating}: no test row is rated that high; "
                              "lower the threshold")
    valid = None
    if valid_rows.height:
        valid = build_evalset(split.history("valid"), valid_rows, split.n_users, split.n_items, "valid",
                              target_behavior)
    test = build_evalset(split.history("test"), test_rows, split.n_users, split.n_items, "test", target_behavior)
    return valid, test


def target_min_rating(cfg: dict, split: Split) -> float | None:
    """``eval.target_min_rating``; when unset, for a model that learns from signed ratings (one
    with a ``pos_threshold``) on rated data, its positive threshold: such a model ranks liked
    items, so a low rating is not a hit to reward."""
    value = cfg["eval"].get("target_min_rating")
    if value is None and RATING in split.test.columns:
        value = cfg["model"].get("pos_threshold")
    return None if value is None else float(value)


def dataset_label(path: str | None) -> str:
    if not path:
        return "data"
    p = Path(str(path))
    return p.stem if p.suffix else p.name
