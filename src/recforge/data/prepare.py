"""Cleaning and encoding: dedupe, rating threshold, iterative k-core, dense ids, Parquet cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

from recforge.data.dataset import Dataset, sort_interactions
from recforge.data.schema import ITEM, RATING, TIME, USER, RawData
from recforge.errors import DataError


@dataclass
class PrepareOptions:
    """Options of :func:`prepare`; every field is part of the cache key."""

    dedupe: str = "first"  # "first" | "last" | "none": keep one row per (user, item[, behavior])
    rating_threshold: float | None = None  # keep rows with rating >= threshold (implicit feedback)
    min_user: int = 0  # iterative k-core: minimum interactions per user
    min_item: int = 0  # ... and per item
    behaviors: tuple[str, ...] | None = None  # keep only these behaviours, when a behavior column exists

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=list)


def kcore(df: pl.DataFrame, min_user: int, min_item: int, max_rounds: int = 100) -> pl.DataFrame:
    """Iteratively drop users with fewer than ``min_user`` and items with fewer than
    ``min_item`` interactions until both conditions hold everywhere."""
    if min_user <= 1 and min_item <= 1:
        return df
    for _ in range(max_rounds):
        n = df.height
        if min_item > 1:
            df = df.filter(pl.len().over(ITEM) >= min_item)
        if min_user > 1:
            df = df.filter(pl.len().over(USER) >= min_user)
        if df.height == n:
            break
    return df


def clean(raw: RawData, opts: PrepareOptions) -> pl.DataFrame:
    df = raw.interactions
    if opts.behaviors and "behavior" in df.columns:
        df = df.filter(pl.col("behavior").is_in(list(opts.behaviors)))
    if opts.rating_threshold is not None:
        if RATING not in df.columns:
            raise DataError(
                f"{raw.source or raw.name}: --rating-threshold needs a rating column; map one with --rating-col "
                "or drop the threshold"
            )
        df = df.filter(pl.col(RATING) >= opts.rating_threshold)
    if opts.dedupe != "none":
        # "first"/"last" mean earliest/latest in time (ties: source order)
        df = df.sort([USER, TIME], maintain_order=True)
        keys = [USER, ITEM] + (["behavior"] if "behavior" in df.columns else []) + (["split"] if "split" in df.columns else [])
        df = df.unique(subset=keys, keep=opts.dedupe, maintain_order=True)
    df = kcore(df, opts.min_user, opts.min_item)
    if df.height == 0:
        raise DataError(
            f"{raw.source or raw.name}: no interactions left after filtering "
            f"(min_user={opts.min_user}, min_item={opts.min_item}, rating_threshold={opts.rating_threshold}); "
            "lower the thresholds"
        )
    return df


def encode(df: pl.DataFrame, raw: RawData) -> Dataset:
    """Dense ids: users 0..U-1 by first appearance order of sorted raw ids, items 1..I."""
    user_map = df.select(pl.col(USER).unique().sort().alias("raw")).with_row_index("idx").with_columns(
        pl.col("idx").cast(pl.Int32)
    ).select("raw", "idx")
    item_map = df.select(pl.col(ITEM).unique().sort().alias("raw")).with_row_index("idx", offset=1).with_columns(
        pl.col("idx").cast(pl.Int32)
    ).select("raw", "idx")
    enc = (
        df.join(user_map.rename({"raw": USER, "idx": "_u"}), on=USER, how="left", maintain_order="left")
        .join(item_map.rename({"raw": ITEM, "idx": "_i"}), on=ITEM, how="left", maintain_order="left")
        .drop(USER, ITEM)
        .rename({"_u": USER, "_i": ITEM})
    )
    cols = [USER, ITEM, TIME] + [c for c in enc.columns if c not in (USER, ITEM, TIME)]
    enc = sort_interactions(enc.select(cols))

    items = users = None
    if raw.items is not None and ITEM in raw.items.columns:
        it = raw.items.with_columns(pl.col(ITEM).cast(item_map.schema["raw"], strict=False))
        items = item_map.rename({"raw": ITEM}).join(it, on=ITEM, how="left").drop(ITEM).rename({"idx": ITEM}).sort(ITEM)
    if raw.users is not None and USER in raw.users.columns:
        us = raw.users.with_columns(pl.col(USER).cast(user_map.schema["raw"], strict=False))
        users = user_map.rename({"raw": USER}).join(us, on=USER, how="left").drop(USER).rename({"idx": USER}).sort(USER)
    return Dataset(enc, user_map, item_map, items, users, name=raw.name, meta=dict(raw.meta))


def prepare(raw: RawData, opts: PrepareOptions | None = None) -> Dataset:
    """Clean and encode ``raw`` (no cache)."""
    opts = opts or PrepareOptions()
    ds = encode(clean(raw, opts), raw)
    ds.meta["prepare"] = asdict(opts)
    return ds


def _source_fingerprint(source: str) -> str:
    """Path, size and modification time of every file of a source (cheap, no hashing of content)."""
    p = Path(source)
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    parts = [str(p.resolve())]
    for f in files:
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return "|".join(parts)


def cache_dir() -> Path:
    return Path(os.environ.get("RECFORGE_CACHE", Path.home() / ".cache" / "recforge"))


def cache_key(source: str, opts: PrepareOptions, reader_key: str = "") -> str:
    h = hashlib.sha256((_source_fingerprint(source) + "||" + opts.key() + "||" + reader_key).encode())
    return h.hexdigest()[:16]


def prepare_cached(load_raw, source: str, opts: PrepareOptions, reader_key: str = "",
                   cache: Path | None = None) -> Dataset:
    """Prepare with a Parquet cache keyed by the source files, the reader options and ``opts``.

    ``load_raw`` is a zero-argument callable that reads the source; it is called only on a miss.
    The cache entry is written to a temporary folder and renamed, so a crash leaves no half entry.
    """
    root = Path(cache) if cache else cache_dir() / "prepared"
    entry = root / cache_key(source, opts, reader_key)
    if (entry / "dataset.json").exists():
        ds = Dataset.load(entry)
        ds.meta["cache"] = str(entry)
        return ds
    ds = prepare(load_raw(), opts)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        ds.save(tmp)
        if entry.exists():
            shutil.rmtree(entry)
        tmp.rename(entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ds
