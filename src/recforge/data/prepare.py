"""Cleaning and encoding: dedupe, rating threshold, iterative k-core, dense ids, Parquet cache.

One code path for every size, written as Polars lazy queries collected with the streaming
engine, so that a table read lazily (``load_raw(path, lazy=True)``: a Parquet or CSV scan) is
never held in memory with its raw ids:

1. rating / behaviour filters on the scan;
2. the sorted distinct raw user and item ids (small tables), then one streaming pass that swaps
   the raw ids for Int32 codes in that order: a gather from a dense lookup array when the ids
   are integers in a compact range, an enum cast for text ids, else ``replace_strict`` (all
   keep the row order);
3. the compact table is cut into user-code ranges of about :data:`PARTITION_ROWS` rows; each
   range is sorted by (user, time) with ties in source order (one packed Int64 key when the
   user range times the time span fits in 63 bits) and deduplicated (``is_first_distinct`` on a
   packed (user, item) key), so neither the sort nor the dedupe hash set spans the whole table,
   and the ranges concatenate in (user, time) order;
4. iterative k-core: each round one lazy group-by per side over the rows whose user and item
   are still alive (a semi-join expressed as a gather from boolean masks over the codes), until
   a round removes nothing; the table itself is filtered once, at the end;
5. dense re-encoding of the survivors in that same pass (codes keep the raw-id order, so the
   rows stay sorted and no map needs sorting).

The result is identical to sorting, deduplicating, k-coring and encoding the whole table in
memory (``tests/test_prepare.py`` checks it against such a reference implementation).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recforge.data.dataset import Dataset
from recforge.data.schema import BEHAVIOR, ITEM, RATING, SPLIT, TIME, USER, RawData
from recforge.errors import DataError

PARTITION_ROWS = 2_000_000  # rows per user range in the sort + dedupe step (bounds its memory)
_INT64_MAX = 2**63 - 1


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


def _collect(lf: pl.LazyFrame) -> pl.DataFrame:
    return lf.collect(engine="streaming")


# ---- dense codes ----------------------------------------------------------------------------------
def _codes(n: int, offset: int = 0) -> pl.Series:
    return pl.int_range(offset, n + offset, dtype=pl.Int32, eager=True)


def _code_expr(col: str, values: pl.Series) -> pl.Expr:
    """Int32 position of each id of ``col`` among the sorted distinct ``values``."""
    n = values.len()
    if n and values.dtype.is_integer() and not values.null_count():
        lo, hi = int(values[0]), int(values[-1])
        if hi - lo + 1 <= max(4 * n, 1 << 20):  # dense enough: a lookup array, no hashing
            lookup = np.full(hi - lo + 1, -1, dtype=np.int32)
            lookup[(values.cast(pl.Int64) - lo).to_numpy()] = np.arange(n, dtype=np.int32)
            return pl.lit(pl.Series(lookup)).gather(pl.col(col).cast(pl.Int64) - lo).alias(col)
    if values.dtype == pl.Utf8 and not values.null_count():
        # an enum over the sorted ids: its physical codes are the positions (half the memory
        # of a replace_strict at the same speed)
        return pl.col(col).cast(pl.Enum(values)).to_physical().cast(pl.Int32)
    return pl.col(col).replace_strict(values, _codes(n), return_dtype=pl.Int32)


def _compact(lf: pl.LazyFrame, source: str) -> tuple[pl.DataFrame, pl.Series, pl.Series]:
    """The rows with Int32 codes for users and items (positions in the sorted distinct raw
    ids), in their order, and the sorted distinct raw user and item ids."""
    try:
        users, items = pl.collect_all([lf.select(pl.col(USER).unique().sort()),
                                       lf.select(pl.col(ITEM).unique().sort())], engine="streaming")
        users, items = users.to_series(), items.to_series()
        table = _collect(lf.with_columns(_code_expr(USER, users), _code_expr(ITEM, items)))
    except pl.exceptions.PolarsError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise DataError(f"{source}: cannot read the interactions ({lines[0] if lines else type(exc).__name__}); "
                        "check the file, or pass the right format with --format") from exc
    return table, users, items


def _mask(n: int, codes: pl.Series) -> pl.Series:
    mask = pl.zeros(n, dtype=pl.Boolean, eager=True)
    if codes.len():
        mask.scatter(codes, True)
    return mask


# ---- iterative k-core ---------------------------------------------------------------------------
def _alive(lf: pl.LazyFrame, users: pl.Series | None, items: pl.Series | None) -> pl.LazyFrame:
    """Rows whose user and item codes are alive in the boolean masks (``None``: all alive)."""
    for col, mask in ((USER, users), (ITEM, items)):
        if mask is not None:
            lf = lf.filter(pl.lit(mask).gather(pl.col(col)))
    return lf


def _kcore_masks(table: pl.DataFrame, n_users: int, n_items: int, min_user: int, min_item: int,
                 max_rounds: int = 100) -> tuple[pl.Series | None, pl.Series | None]:
    """Boolean masks over the user and item codes of the rows left after the iterative k-core,
    or ``(None, None)`` when nothing is removed.

    Each round drops the items with fewer than ``min_item`` rows, then the users with fewer than
    ``min_user`` rows among those left, counting over the rows of the survivors only (one lazy
    group-by each); it stops after a round that removes nothing. The table itself is never
    filtered in between.
    """
    if min_user <= 1 and min_item <= 1:
        return None, None
    size = {USER: n_users, ITEM: n_items}
    alive: dict[str, pl.Series | None] = {USER: None, ITEM: None}
    fresh: dict[str, pl.Series] = {}  # counted since the last removal: exactly the codes with rows
    for _ in range(max_rounds):
        removed = False
        for col, k in ((ITEM, min_item), (USER, min_user)):
            if k <= 1:
                continue
            counts = _collect(_alive(table.lazy(), alive[USER], alive[ITEM]).group_by(col).len())
            keep = counts.filter(pl.col("len") >= k)[col]
            mask = _mask(size[col], keep)
            if keep.len() < counts.height:
                removed = True
                alive[col] = mask
                fresh = {col: mask}
            else:
                fresh[col] = mask
        if not removed:
            break
    if alive[USER] is None and alive[ITEM] is None:
        return None, None
    rows = _alive(table.lazy(), alive[USER], alive[ITEM])
    missing = [c for c in (USER, ITEM) if c not in fresh]
    found = pl.collect_all([rows.select(pl.col(c).unique()) for c in missing], engine="streaming")
    fresh.update({c: _mask(size[c], f.to_series()) for c, f in zip(missing, found)})
    return fresh[USER], fresh[ITEM]


def kcore(df: pl.DataFrame, min_user: int, min_item: int, max_rounds: int = 100) -> pl.DataFrame:
    """Iteratively drop users with fewer than ``min_user`` and items with fewer than
    ``min_item`` interactions until both conditions hold everywhere (at most ``max_rounds``
    rounds). Rows keep their order and their raw ids."""
    if min_user <= 1 and min_item <= 1:
        return df
    table, users, items = _compact(df.lazy(), "kcore")
    alive_users, alive_items = _kcore_masks(table, users.len(), items.len(), min_user, min_item, max_rounds)
    return _collect(_alive(table.lazy(), alive_users, alive_items).with_columns(
        pl.lit(users).gather(pl.col(USER)).alias(USER), pl.lit(items).gather(pl.col(ITEM)).alias(ITEM)))


# ---- sort and dedupe by user ranges ---------------------------------------------------------------
def _user_ranges(table: pl.DataFrame, n_users: int, rows: int) -> list[tuple[int, int]]:
    """Consecutive user-code ranges [lo, hi) of about ``rows`` rows each (a user is never split)."""
    n = table.height
    if n <= rows:
        return [(0, n_users)]
    parts = math.ceil(n / rows)
    counts = _collect(table.lazy().group_by(USER).len()).sort(USER)
    ends = counts.select(
        pl.col(USER), (pl.col("len").cast(pl.Int64).cum_sum() * parts // (n + 1)).alias("_p")
    ).group_by("_p").agg(pl.col(USER).max()).sort("_p")[USER].to_list()
    bounds = [0] + [u + 1 for u in ends[:-1]] + [n_users]
    return list(zip(bounds[:-1], bounds[1:]))


def _sort_dedupe(table: pl.DataFrame, n_users: int, n_items: int, dedupe: str,
                 rows: int | None = None) -> pl.DataFrame:
    """Rows sorted by (user, time), ties in source order, keeping the first / last row of every
    (user, item[, behavior][, split]) in that order (``dedupe="none"``: sort only); one user
    range of about ``rows`` rows at a time."""
    if table.height == 0:
        return table
    keys = [USER, ITEM] + [c for c in (BEHAVIOR, SPLIT) if c in table.columns]
    t = table.select(pl.col(TIME).min().alias("lo"), pl.col(TIME).max().alias("hi"),
                     pl.col(TIME).null_count().alias("nulls")).row(0, named=True)
    span = None  # pack (user, time) into one Int64 sort key when it fits
    if table.schema[TIME].is_integer() and not t["nulls"] and t["hi"] <= _INT64_MAX:
        span = t["hi"] - t["lo"] + 1
    ranges = _user_ranges(table, n_users, rows or PARTITION_ROWS)
    out = []
    for lo, hi in ranges:
        lf = table.lazy() if len(ranges) == 1 else table.lazy().filter(pl.col(USER).is_between(lo, hi - 1))
        u = pl.col(USER).cast(pl.Int64) - lo
        if span is not None and (hi - lo) * span <= _INT64_MAX:
            lf = lf.sort(u * span + (pl.col(TIME).cast(pl.Int64) - t["lo"]), maintain_order=True)
        else:
            lf = lf.sort([USER, TIME], maintain_order=True)
        if dedupe != "none":
            key = u * n_items + pl.col(ITEM) if len(keys) == 2 else pl.struct(keys)
            lf = lf.filter(key.is_first_distinct() if dedupe == "first" else key.is_last_distinct())
        out.append(_collect(lf))
    return pl.concat(out, rechunk=False) if len(out) > 1 else out[0]


# ---- the pipeline --------------------------------------------------------------------------------
def behavior_counts(raw: RawData) -> dict[str, int] | None:
    """Rows per behaviour of the source, before any filter (``None``: no behaviour column). A
    held-out row of a given split without a behaviour counts under ``""`` (see
    :func:`recforge.data.readers.read_split_tables`)."""
    lf = raw.interactions.lazy()
    if BEHAVIOR not in lf.collect_schema().names():
        return None
    counts = _collect(lf.group_by(BEHAVIOR).len()).sort(["len", BEHAVIOR], descending=[True, False])
    return {("" if b is None else str(b)): int(n) for b, n in counts.iter_rows()}


def _check_behaviors(raw: RawData, opts: PrepareOptions, counts: dict[str, int] | None) -> None:
    """``behaviors`` must name behaviours the source has: one DataError naming those present."""
    if not opts.behaviors:
        return
    source = raw.source or raw.name
    wanted = ",".join(opts.behaviors)
    if counts is None:
        raise DataError(f"{source}: data.behaviors={wanted} but the data has no behaviour column; map the column "
                        "that holds behaviour types with data.behavior_col=NAME (--behavior-col), or drop "
                        "data.behaviors")
    present = [b for b in counts if b]
    missing = [b for b in opts.behaviors if b not in counts]
    if missing:
        raise DataError(f"{source}: data.behaviors names {', '.join(missing)}, which the data does not have "
                        f"(behaviours present: {', '.join(present)}); name behaviours that exist, e.g. "
                        f"data.behaviors={','.join(present)}")


def _filtered(raw: RawData, opts: PrepareOptions) -> pl.LazyFrame:
    lf = raw.interactions.lazy()
    cols = lf.collect_schema().names()
    if opts.behaviors and BEHAVIOR in cols:
        keep = pl.col(BEHAVIOR).is_in(list(opts.behaviors))
        if SPLIT in cols:  # held-out rows of a given split without a behaviour are the target behaviour
            keep = keep | (pl.col(BEHAVIOR).is_null() & (pl.col(SPLIT) != "train"))
        lf = lf.filter(keep)
    if opts.rating_threshold is not None:
        if RATING not in cols:
            raise DataError(
                f"{raw.source or raw.name}: --rating-threshold needs a rating column; map one with --rating-col "
                "or drop the threshold"
            )
        lf = lf.filter(pl.col(RATING) >= opts.rating_threshold)
    return lf


def _renumber(mask: pl.Series | None, n: int, offset: int) -> tuple[pl.Series, pl.Expr | None]:
    """New dense ids (from ``offset``) of the codes alive in ``mask``: their codes, and the
    expression mapping a code to its new id (null when dead); ``None`` when it is code + offset."""
    if mask is None:
        return _codes(n), None
    new = pl.select(pl.when(pl.lit(mask)).then(pl.lit(mask).cast(pl.Int32).cum_sum() - 1 + offset)).to_series()
    return _codes(n).filter(mask), pl.lit(new)


def _encode_survivors(table: pl.DataFrame, users: pl.Series, items: pl.Series,
                      alive_users: pl.Series | None, alive_items: pl.Series | None
                      ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Keep the rows of surviving users and items and give both dense ids in one pass: users
    ``0..U-1`` and items ``1..I`` in sorted raw-id order (the codes already are in that order)."""
    user_codes, user_new = _renumber(alive_users, users.len(), 0)
    item_codes, item_new = _renumber(alive_items, items.len(), 1)
    user_map = pl.DataFrame({"raw": users.gather(user_codes), "idx": _codes(user_codes.len())})
    item_map = pl.DataFrame({"raw": items.gather(item_codes), "idx": _codes(item_codes.len(), 1)})
    lf = table.lazy().with_columns(
        (pl.col(USER) if user_new is None else user_new.gather(pl.col(USER))).alias(USER),
        (pl.col(ITEM) + 1 if item_new is None else item_new.gather(pl.col(ITEM))).alias(ITEM),
    )
    if user_new is not None or item_new is not None:
        lf = lf.filter(pl.col(USER).is_not_null() & pl.col(ITEM).is_not_null())
    rest = [c for c in table.columns if c not in (USER, ITEM, TIME)]
    return _collect(lf.select(USER, ITEM, TIME, *rest)), user_map, item_map


def _run(lf: pl.LazyFrame, opts: PrepareOptions, source: str, timings: dict | None = None
         ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Encoded interactions sorted by (user, time), user map, item map."""
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        if timings is not None:
            timings[name] = round(now - clock[0], 3)
        clock[0] = now

    table, users, items = _compact(lf, source)
    lap("read+codes")
    table = _sort_dedupe(table, users.len(), items.len(), opts.dedupe)
    lap("sort+dedupe")
    alive_users, alive_items = _kcore_masks(table, users.len(), items.len(), opts.min_user, opts.min_item)
    lap("kcore")
    enc, user_map, item_map = _encode_survivors(table, users, items, alive_users, alive_items)
    del table
    lap("encode")
    if enc.height == 0:
        raise DataError(
            f"{source}: no interactions left after filtering "
            f"(min_user={opts.min_user}, min_item={opts.min_item}, rating_threshold={opts.rating_threshold}); "
            "lower the thresholds"
        )
    return enc, user_map, item_map


def _dataset(enc: pl.DataFrame, user_map: pl.DataFrame, item_map: pl.DataFrame, raw: RawData) -> Dataset:
    items = users = None
    if raw.items is not None and ITEM in raw.items.columns:
        it = raw.items.with_columns(pl.col(ITEM).cast(item_map.schema["raw"], strict=False))
        items = item_map.rename({"raw": ITEM}).join(it, on=ITEM, how="left").drop(ITEM).rename({"idx": ITEM}).sort(ITEM)
    if raw.users is not None and USER in raw.users.columns:
        us = raw.users.with_columns(pl.col(USER).cast(user_map.schema["raw"], strict=False))
        users = user_map.rename({"raw": USER}).join(us, on=USER, how="left").drop(USER).rename({"idx": USER}).sort(USER)
    return Dataset(enc, user_map, item_map, items, users, name=raw.name, meta=dict(raw.meta))


def clean(raw: RawData, opts: PrepareOptions) -> pl.DataFrame:
    """Filtered, deduplicated and k-cored interactions with their raw ids, sorted by
    (user, time) with ties in source order."""
    enc, user_map, item_map = _run(_filtered(raw, opts), opts, raw.source or raw.name)
    return enc.with_columns(pl.lit(user_map["raw"]).gather(pl.col(USER)).alias(USER),
                            pl.lit(item_map["raw"]).gather(pl.col(ITEM) - 1).alias(ITEM))


def encode(df: pl.DataFrame | pl.LazyFrame, raw: RawData) -> Dataset:
    """Dense ids for already cleaned interactions: users ``0..U-1`` and items ``1..I`` in sorted
    raw-id order; rows sorted by (user, time), ties in source order."""
    enc, user_map, item_map = _run(df.lazy(), PrepareOptions(dedupe="none"), raw.source or raw.name)
    return _dataset(enc, user_map, item_map, raw)


def prepare(raw: RawData, opts: PrepareOptions | None = None, timings: dict | None = None) -> Dataset:
    """Clean and encode ``raw`` (no cache). ``raw.interactions`` may be a DataFrame or a
    LazyFrame (a scan, see ``load_raw(path, lazy=True)``); ``timings``, when given, receives
    the seconds of each stage."""
    opts = opts or PrepareOptions()
    counts = behavior_counts(raw)
    _check_behaviors(raw, opts, counts)
    ds = _dataset(*_run(_filtered(raw, opts), opts, raw.source or raw.name, timings), raw)
    ds.meta["prepare"] = asdict(opts)
    if counts is not None:
        ds.meta["source_behaviors"] = counts
    return ds


def _source_fingerprint(source: str) -> str:
    """Path, size and modification time of every file of a source (cheap, no hashing of content)."""
    p = Path(source)
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    parts = [str(p.resolve())]
    for f in files:
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
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
