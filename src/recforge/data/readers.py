"""Readers: turn the files of common recommendation datasets into canonical :class:`RawData`.

Every reader returns interactions with the canonical columns of :mod:`recforge.data.schema`:
``user_id`` and ``item_id`` hold the raw ids (``Int64`` when every id parses as an integer,
``Utf8`` otherwise), ``timestamp`` is ``Int64`` seconds or, when the source has no time, the
0-based position of the row within its user's sequence. Rows keep the order of the source, so the
stable (user, timestamp) sort done later keeps file order among equal timestamps. Item and user
side tables are keyed by ``item_id`` / ``user_id`` with the same id dtype as the interactions.

Formats (the keys of :data:`READERS`):

* ``table``: any CSV / TSV / Parquet file with a header (:func:`read_table`);
* ``ml-100k``, ``ml-1m`` (also 10M), ``ml-latest`` (also 20M / 25M / latest-small): MovieLens;
* ``sequence``: one ``user item item ...`` line per user, optionally with an aligned
  ``user ts ts ...`` timestamp file (SASRec / ICLRec / TiCoSeRec files);
* ``recbole``: RecBole atomic files ``<name>.inter`` (+ ``.item``, ``.user``);
* ``userbehavior``: Alibaba's headerless ``user,item,category,behavior,ts`` log;
* ``lightgcn`` and ``lightgcn-lastfm``: LightGCN's pre-split ``train.txt``/``test.txt`` and
  ``data1.txt``/``test1.txt``;
* ``split-tables``: a folder holding a given split as tables, ``train.csv`` and ``test.csv``
  (optionally ``valid.csv``; or ``.tsv`` / ``.parquet``), e.g. the multi-behaviour sets
  (:func:`read_split_tables`).

:func:`load_raw` detects the format of a path; :func:`reader_key` gives the string that the
Parquet cache uses to tell reader settings apart. Every failure is a one-line :class:`DataError`.
For tables larger than memory, ``load_raw(path, lazy=True)`` (:func:`scan_table`) gives the same
interactions as a Polars LazyFrame over a Parquet / CSV scan, which
:func:`recforge.data.prepare.prepare` streams.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import polars as pl

from recforge.data.schema import BEHAVIOR, ITEM, RATING, SPLIT, TIME, USER, RawData
from recforge.errors import DataError

READER_VERSION = 2  # bump when a reader's output changes, so cached datasets are rebuilt

BEHAVIOR_VALUES = frozenset({"pv", "cart", "fav", "buy"})

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
_IGNORED_NAMES = re.compile(r"^(readme|license|licence|copying|notice)", re.IGNORECASE)
_ISO_DATETIME = r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?\s*(Z|[+-]\d{2}:?\d{2})?$"
_YEAR_IN_TITLE = r"\((\d{4})\)\s*$"
_INT_LINE = re.compile(r"^\d+( \d+)*$")
_NOT_FOUND = "no such file or directory; give the path of a data file or dataset folder"


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def _existing(path: str | Path) -> Path:
    """``path`` as a Path, or a DataError when it does not exist."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{path}: {_NOT_FOUND}")
    return p


def _require(p: Path, what: str) -> Path:
    if not p.exists():
        raise DataError(f"{p}: {_NOT_FOUND} ({what})")
    return p


def _short(exc: BaseException) -> str:
    """The first meaningful line of an exception message, trimmed."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _decode(path: Path) -> str:
    """File text as UTF-8, falling back to latin-1 (old MovieLens files); BOM removed."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.lstrip("\ufeff")


def _first_lines(path: Path, n: int = 200, nbytes: int = 1 << 16) -> list[str]:
    """Up to ``n`` complete non-empty lines from the start of a file (cheap, for detection)."""
    with open(path, "rb") as fh:
        chunk = fh.read(nbytes)
    more = len(chunk) == nbytes
    text = chunk.decode("utf-8", errors="replace").lstrip("\ufeff")
    lines = text.splitlines()
    if more and lines:
        lines = lines[:-1]  # the last one may be cut
    return [ln for ln in lines if ln.strip()][:n]


def _normalize_id(df: pl.DataFrame, col: str) -> pl.DataFrame:
    """Cast an id column to Int64 when every value is an integer, else to stripped Utf8.

    Text counts as an integer only when it round-trips exactly, so ids with leading zeros
    (``"007"``, Amazon ASINs like ``"0553092626"``) stay text and never merge with others.
    """
    dtype = df.schema[col]
    if dtype.is_integer():
        return df.with_columns(pl.col(col).cast(pl.Int64))
    s = df[col]
    if dtype.is_float():
        if (s.drop_nulls() == s.drop_nulls().floor()).all():
            return df.with_columns(pl.col(col).cast(pl.Int64))
        return df.with_columns(pl.col(col).cast(pl.Utf8))
    s = s.cast(pl.Utf8).str.strip_chars()
    as_int = s.cast(pl.Int64, strict=False)
    if as_int.null_count() == s.null_count() and (as_int.cast(pl.Utf8) == s).all():
        return df.with_columns(as_int.alias(col))
    return df.with_columns(s.alias(col))


def _key_like(table: pl.DataFrame, col: str, dtype: pl.DataType) -> pl.DataFrame:
    """Cast a side table's key to the id dtype of the interactions, one row per key."""
    table = _normalize_id(table, col)
    if table.schema[col] != dtype:
        table = table.with_columns(pl.col(col).cast(pl.Utf8).cast(dtype, strict=False))
    return table.filter(pl.col(col).is_not_null()).unique(subset=[col], keep="first", maintain_order=True)


def _ids(df: pl.DataFrame, source: str) -> pl.DataFrame:
    """Normalise both id columns and refuse rows without an id."""
    for col in (USER, ITEM):
        df = _normalize_id(df, col)
        n = df[col].null_count()
        if n:
            raise DataError(f"{source}: {n} row(s) have an empty {col}; remove them or fix the file")
    return df


def _positions() -> pl.Expr:
    """0-based position of each row within its user's rows, in source order."""
    return pl.int_range(pl.len(), dtype=pl.Int64).over(USER).alias(TIME)


def _to_seconds(df: pl.DataFrame, col: str, source: str, time_format: str | None = None,
                label: str | None = None) -> pl.DataFrame:
    """Convert column ``col`` to Int64 epoch seconds (naive datetimes are read as UTC).

    ``label`` is the column's name in the source file, used in error messages.
    """
    s = df[col]
    name = label or col
    dtype = s.dtype
    fix = "give --time-format (e.g. '%Y-%m-%d %H:%M:%S') or point --time-col at a numeric column"
    typed = _typed_seconds(pl.col(col), dtype)
    if typed is not None:
        out = df.select(typed).to_series()
    else:
        text = s.cast(pl.Utf8).str.strip_chars()
        if time_format is not None:
            try:
                out = text.str.to_datetime(time_format, strict=True).dt.epoch("s")
            except pl.exceptions.PolarsError as exc:
                raise DataError(f"{source}: column '{name}' does not match --time-format "
                                f"'{time_format}' ({_short(exc)}); fix the format") from exc
        else:
            out = _parse_text_time(text)
            if out is None:
                bad = text.filter(text.cast(pl.Float64, strict=False).is_null() & text.is_not_null())
                example = bad[0] if len(bad) else "?"
                raise DataError(f"{source}: column '{name}' holds non-numeric times such as "
                                f"'{example}' that are not ISO dates; {fix}")
    if out.null_count():
        raise DataError(f"{source}: column '{name}' has {out.null_count()} empty or unreadable time(s); "
                        "fill or drop those rows")
    return df.with_columns(out.alias(col))


def _typed_seconds(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr | None:
    """Int64 epoch seconds of a time column whose type decides it (integers, floats floored,
    dates and datetimes); None for text, which needs parsing."""
    if dtype.is_integer():
        return expr.cast(pl.Int64)
    if dtype.is_float():
        return expr.floor().cast(pl.Int64)
    if dtype.is_temporal():
        return expr.dt.epoch("s")
    return None


def _parse_text_time(text: pl.Series) -> pl.Series | None:
    """Numbers in text, or ISO-8601 datetimes, as epoch seconds; None when neither fits."""
    present = text.drop_nulls()
    as_int = text.cast(pl.Int64, strict=False)
    if as_int.null_count() == text.null_count():
        return as_int
    as_float = text.cast(pl.Float64, strict=False)
    if as_float.null_count() == text.null_count():
        return as_float.floor().cast(pl.Int64)
    if len(present) and present.str.contains(_ISO_DATETIME).all():
        try:
            return text.str.to_datetime(strict=True).dt.epoch("s")
        except pl.exceptions.PolarsError:
            return None
    return None


def _typed_canonical(df: pl.DataFrame, source: str) -> pl.DataFrame:
    """Give the optional canonical columns their types: rating Float64, behavior/split Utf8."""
    if RATING in df.columns and df.schema[RATING] != pl.Float64:
        try:
            df = df.with_columns(pl.col(RATING).cast(pl.Utf8).str.strip_chars().cast(pl.Float64))
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"{source}: the rating column is not numeric ({_short(exc)}); "
                            "point --rating-col at a numeric column") from exc
    for col in (BEHAVIOR, SPLIT):
        if col in df.columns and df.schema[col] != pl.Utf8:
            df = df.with_columns(pl.col(col).cast(pl.Utf8))
    return df


def _canonical_order(df: pl.DataFrame) -> pl.DataFrame:
    first = [c for c in (USER, ITEM, TIME, BEHAVIOR, RATING, SPLIT) if c in df.columns]
    return df.select(first + [c for c in df.columns if c not in first])


def _finish(df: pl.DataFrame, source: str) -> pl.DataFrame:
    """Types, id checks and column order common to every reader."""
    if df.height == 0:
        raise DataError(f"{source}: no interactions found; check that this is the right file")
    df = _ids(df, source)
    df = _typed_canonical(df, source)
    return _canonical_order(df)


def _title_year() -> pl.Expr:
    """The ``(1995)`` year at the end of a MovieLens title, as Int64."""
    return pl.col("title").str.extract(_YEAR_IN_TITLE, 1).cast(pl.Int64, strict=False).alias("year")


def _as_dir(p: Path) -> Path:
    """The dataset folder: ``p`` itself, or its parent when ``p`` is the member file."""
    return p.parent if p.is_file() else p


def _with_errors(fmt: str) -> Callable:
    """Decorate a reader so that any parse failure becomes a one-line DataError."""

    def deco(func: Callable[..., RawData]) -> Callable[..., RawData]:
        @functools.wraps(func)
        def wrapper(path, *args, **kwargs) -> RawData:
            try:
                return func(path, *args, **kwargs)
            except DataError:
                raise
            except FileNotFoundError as exc:
                raise DataError(f"{exc.filename or path}: {_NOT_FOUND}") from exc
            except (pl.exceptions.PolarsError, UnicodeDecodeError, ValueError, OSError,
                    IndexError, KeyError) as exc:
                raise DataError(f"{path}: cannot read it as {fmt} data ({_short(exc)}); "
                                "check the file, or pass the right format with --format") from exc

        return wrapper

    return deco


# ---------------------------------------------------------------------------------------------
# Generic tables
# ---------------------------------------------------------------------------------------------
def _sniff_sep(path: Path) -> str:
    """Separator of a delimited text file without a telling extension."""
    lines = _first_lines(path, n=5)
    head = lines[0] if lines else ""
    for sep in ("\t", ",", ";", "|"):
        if sep in head:
            return sep
    return " "


def _table_sep(path: Path, sep: str | None) -> str:
    """The one-character separator of a delimited file: given, by extension, or sniffed."""
    if sep is None:
        sep = {".csv": ",", ".tsv": "\t"}.get(path.suffix.lower()) or _sniff_sep(path)
    if sep == "\\t":
        sep = "\t"
    if len(sep) != 1:
        raise DataError(f"{path}: separator {sep!r} must be one character; pass --sep with one "
                        "character (MovieLens '::' files are read by the ml-1m format)")
    return sep


def _read_any_table(path: Path, sep: str | None = None, has_header: bool = True,
                    text_cols: tuple = ()) -> pl.DataFrame:
    """Read a CSV/TSV (by extension, or ``sep``) or Parquet file into a DataFrame.

    ``text_cols`` (id columns) are read as text from CSV files, so that ids such as ``007`` keep
    their leading zeros until :func:`_normalize_id` decides their type.
    """
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq") and sep is None:
        return pl.read_parquet(path)
    sep = _table_sep(path, sep)
    overrides = {c: pl.Utf8 for c in text_cols if isinstance(c, str)} if has_header else None
    kw = dict(separator=sep, has_header=has_header, infer_schema_length=10000, encoding="utf8-lossy",
              schema_overrides=overrides or None)
    try:
        return pl.read_csv(path, **kw)
    except pl.exceptions.ComputeError:
        # a later row did not fit the inferred type: infer over the whole file instead
        return pl.read_csv(path, **{**kw, "infer_schema_length": None})


def _column(columns: list[str], spec: Any, flag: str, source: str, has_header: bool = True) -> str:
    """Resolve a user-given column name (or 0-based index for headerless files) among ``columns``."""
    if isinstance(spec, str) and spec in columns:
        return spec
    if not has_header and (isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit())):
        idx = int(spec)
        if 0 <= idx < len(columns):
            return columns[idx]
    close = difflib.get_close_matches(str(spec), columns, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise DataError(f"{source}: no column '{spec}'{hint}; found: {', '.join(columns)}; "
                    f"name the right one with {flag}")


def _table_mapping(columns: list[str], source: str, has_header: bool, user_col, item_col, time_col,
                   rating_col, behavior_col) -> tuple[dict[str, str], dict[str, str]]:
    """Source column -> canonical name, and the renames that keep a non-mapped column that
    already bears a canonical name out of the way."""
    mapping: dict[str, str] = {}
    specs = [(user_col, USER, "--user-col"), (item_col, ITEM, "--item-col"),
             (time_col, TIME, "--time-col"), (rating_col, RATING, "--rating-col"),
             (behavior_col, BEHAVIOR, "--behavior-col")]
    for spec, canon, flag in specs:
        if spec is None:
            continue
        if canon == TIME:
            flag += " (or time_col=None when the file has no time)"
        mapping[_column(columns, spec, flag, source, has_header)] = canon
    targets = set(mapping.values()) | ({TIME} if time_col is None else set())
    clash = {c: f"{c}_orig" for c in columns if c in targets and c not in mapping}
    return mapping, clash


@_with_errors("table")
def read_table(path, user_col="user_id", item_col="item_id", time_col="timestamp", rating_col=None,
               behavior_col=None, sep=None, has_header=True, items=None, item_key=None,
               time_format=None) -> RawData:
    """Read a generic interaction table (CSV, TSV or Parquet).

    ``user_col``/``item_col``/``time_col``/``rating_col``/``behavior_col`` name the source columns
    (for ``has_header=False`` files they may be 0-based column numbers); they are renamed to the
    canonical names and every other column is kept. ``time_col=None`` means the file has no time:
    the timestamp becomes the row's position among its user's rows. Text times are parsed with
    ``time_format`` (strptime syntax) when given, else accepted when they are ISO-8601.
    Datetimes without a time zone are taken as UTC. ``items`` is an optional item table
    (CSV/TSV/Parquet) whose ``item_key`` column (default: the same name as ``item_col``) holds
    the item ids; its other columns become ``RawData.items``.
    """
    p = _existing(path)
    if p.is_dir():
        raise DataError(f"{path}: is a folder; give the table file itself")
    source = str(path)
    df = _read_any_table(p, sep, has_header, text_cols=(user_col, item_col))
    mapping, clash = _table_mapping(df.columns, source, has_header, user_col, item_col, time_col,
                                    rating_col, behavior_col)
    df = df.rename(clash).rename(mapping)
    if time_col is None:
        df = df.with_columns(_positions())
        time_kind = "position"
    else:
        df = _to_seconds(df, TIME, source, time_format, label=_source_name(mapping, TIME))
        time_kind = "seconds"
    df = _finish(df, source)
    item_table = None
    if items is not None:
        key = item_key if item_key is not None else (item_col if isinstance(item_col, str) else ITEM)
        item_table = _read_item_table(_existing(items), key, df.schema[ITEM])
    return RawData(df, items=item_table, name=p.stem, source=source,
                   meta={"format": "table", "time": time_kind})


# ---------------------------------------------------------------------------------------------
# Generic tables, lazily (data larger than memory)
# ---------------------------------------------------------------------------------------------
def _scan_any_table(path: Path, sep: str | None, has_header: bool, text_cols: tuple,
                    full_inference: bool = False) -> pl.LazyFrame:
    """:func:`_read_any_table` as a scan (Parquet, or CSV/TSV with the same options)."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq") and sep is None:
        return pl.scan_parquet(path)
    sep = _table_sep(path, sep)
    overrides = {c: pl.Utf8 for c in text_cols if isinstance(c, str)} if has_header else None
    return pl.scan_csv(path, separator=sep, has_header=has_header, encoding="utf8-lossy",
                       infer_schema_length=None if full_inference else 10000, schema_overrides=overrides or None)


def _lazy_id(col: str, dtype: pl.DataType) -> tuple[dict[str, pl.Expr], Callable[[dict], pl.Expr]]:
    """Statistics to gather for an id column, and the normalising expression they decide
    (the rules of :func:`_normalize_id`)."""
    c = pl.col(col)
    if dtype.is_integer():
        return {}, lambda st: c.cast(pl.Int64)
    if dtype.is_float():
        return ({f"{col}:int": (c == c.floor()).all()},
                lambda st: c.cast(pl.Int64) if st[f"{col}:int"] else c.cast(pl.Utf8))
    text = c.cast(pl.Utf8).str.strip_chars()
    as_int = text.cast(pl.Int64, strict=False)
    stats = {f"{col}:int_nulls": as_int.null_count(), f"{col}:round_trip": (as_int.cast(pl.Utf8) == text).all()}
    return stats, lambda st: (as_int if st[f"{col}:int_nulls"] == st[f"{col}:nulls"] and st[f"{col}:round_trip"]
                              else text)


def _time_stats(dtype: pl.DataType, time_format: str | None) -> tuple[dict[str, pl.Expr], pl.Expr | None]:
    """Statistics to gather for the time column, and its conversion when the type decides it."""
    c = pl.col(TIME)
    out = _typed_seconds(c, dtype)
    if out is not None:
        return {"t:out_nulls": out.null_count()}, out
    if time_format is not None:
        return {}, None
    text = c.cast(pl.Utf8).str.strip_chars()
    return {"t:nulls": text.null_count(), "t:int_nulls": text.cast(pl.Int64, strict=False).null_count(),
            "t:float_nulls": text.cast(pl.Float64, strict=False).null_count(),
            "t:present": text.is_not_null().sum(), "t:iso": text.str.contains(_ISO_DATETIME).all()}, None


def _lazy_time(lf: pl.LazyFrame, source: str, name: str, time_format: str | None, st: dict
               ) -> tuple[pl.Expr, int]:
    """Epoch seconds for a text time column (the rules of :func:`_to_seconds`), decided from the
    statistics ``st``; a parse is checked in one streaming pass. Returns the expression and its
    number of missing values."""
    text = pl.col(TIME).cast(pl.Utf8).str.strip_chars()
    fix = "give --time-format (e.g. '%Y-%m-%d %H:%M:%S') or point --time-col at a numeric column"
    count = lambda e: lf.select(e.null_count()).collect(engine="streaming").item()  # noqa: E731
    if time_format is not None:
        out = text.str.to_datetime(time_format, strict=True).dt.epoch("s")
        try:
            return out, count(out)
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"{source}: column '{name}' does not match --time-format "
                            f"'{time_format}' ({_short(exc)}); fix the format") from exc
    if st["t:int_nulls"] == st["t:nulls"]:
        return text.cast(pl.Int64, strict=False), st["t:nulls"]
    if st["t:float_nulls"] == st["t:nulls"]:
        return text.cast(pl.Float64, strict=False).floor().cast(pl.Int64), st["t:nulls"]
    if st["t:present"] and st["t:iso"]:
        out = text.str.to_datetime(strict=True).dt.epoch("s")
        try:
            return out, count(out)
        except pl.exceptions.PolarsError:
            pass
    example = lf.select(text.filter(text.cast(pl.Float64, strict=False).is_null() & text.is_not_null()).first()
                        ).collect(engine="streaming").item()
    raise DataError(f"{source}: column '{name}' holds non-numeric times such as "
                    f"'{example if example is not None else '?'}' that are not ISO dates; {fix}")


@_with_errors("table")
def scan_table(path, user_col="user_id", item_col="item_id", time_col="timestamp", rating_col=None,
               behavior_col=None, sep=None, has_header=True, items=None, item_key=None,
               time_format=None) -> RawData:
    """:func:`read_table` for tables larger than memory: the interactions are a Polars
    LazyFrame over a Parquet or CSV scan, with the same columns, types and checks.

    The id and time types and the checks (missing ids, unreadable times, an empty file, a
    non-numeric rating) are decided in one or two streaming passes over the needed columns;
    the rows themselves are read only when the frame is collected (by :func:`~recforge.data.
    prepare.prepare`, which never holds the raw-id table in memory).
    """
    p = _existing(path)
    if p.is_dir():
        raise DataError(f"{path}: is a folder; give the table file itself")
    source = str(path)
    is_csv = not (p.suffix.lower() in (".parquet", ".pq") and sep is None)
    for full_inference in (False, True):
        scan = _scan_any_table(p, sep, has_header, (user_col, item_col), full_inference)
        try:
            lf, time_kind = _scan_canonical(scan, source, is_csv, user_col, item_col, time_col, rating_col,
                                            behavior_col, has_header, time_format)
            break
        except pl.exceptions.ComputeError:
            # a later CSV row did not fit the inferred types: infer over the whole file instead
            if full_inference or not is_csv:
                raise
    item_table = None
    if items is not None:
        key = item_key if item_key is not None else (item_col if isinstance(item_col, str) else ITEM)
        item_table = _read_item_table(_existing(items), key, lf.collect_schema()[ITEM])
    with warnings.catch_warnings():  # RawData checks the schema: resolved already, cheap
        warnings.simplefilter("ignore", pl.exceptions.PerformanceWarning)
        return RawData(lf, items=item_table, name=p.stem, source=source,
                       meta={"format": "table", "time": time_kind})


def _scan_canonical(lf: pl.LazyFrame, source: str, is_csv: bool, user_col, item_col, time_col,
                    rating_col, behavior_col, has_header: bool, time_format: str | None
                    ) -> tuple[pl.LazyFrame, str]:
    """Canonical columns and types over a scan, and the kind of time ("seconds"/"position")."""
    mapping, clash = _table_mapping(lf.collect_schema().names(), source, has_header, user_col, item_col,
                                    time_col, rating_col, behavior_col)
    lf = lf.rename(clash).rename(mapping)
    schema = lf.collect_schema()
    stats: dict[str, pl.Expr] = {"len": pl.len()}
    if is_csv:  # parse every column once, so that a badly typed later row shows up here
        stats.update({f"{c}:all": pl.col(c).null_count() for c in schema.names()})
    decide = {}
    for col in (USER, ITEM):
        extra, decide[col] = _lazy_id(col, schema[col])
        stats.update(extra)
        stats[f"{col}:nulls"] = pl.col(col).null_count()
    time_out = None
    if time_col is not None:
        extra, time_out = _time_stats(schema[TIME], time_format)
        stats.update(extra)
    if RATING in schema and schema[RATING] != pl.Float64:
        r = pl.col(RATING)
        as_float = r.cast(pl.Utf8).str.strip_chars().cast(pl.Float64, strict=False)
        stats["rating:bad"] = as_float.null_count() - r.null_count()
    st = lf.select(**stats).collect(engine="streaming").row(0, named=True)

    if time_col is None:
        lf = lf.with_columns(_positions())
        time_kind = "position"
    else:
        name = _source_name(mapping, TIME)
        if time_out is not None:
            out, nulls = time_out, st["t:out_nulls"]
        else:
            out, nulls = _lazy_time(lf, source, name, time_format, st)
        if nulls:
            raise DataError(f"{source}: column '{name}' has {nulls} empty or unreadable time(s); "
                            "fill or drop those rows")
        lf = lf.with_columns(out.alias(TIME))
        time_kind = "seconds"
    if st["len"] == 0:
        raise DataError(f"{source}: no interactions found; check that this is the right file")
    for col in (USER, ITEM):
        if st[f"{col}:nulls"]:
            raise DataError(f"{source}: {st[f'{col}:nulls']} row(s) have an empty {col}; remove them or fix the file")
    lf = lf.with_columns(decide[USER](st).alias(USER), decide[ITEM](st).alias(ITEM))
    if "rating:bad" in st:
        if st["rating:bad"]:
            raise DataError(f"{source}: the rating column is not numeric (a value is not a number); "
                            "point --rating-col at a numeric column")
        lf = lf.with_columns(pl.col(RATING).cast(pl.Utf8).str.strip_chars().cast(pl.Float64))
    for col in (BEHAVIOR, SPLIT):
        if col in schema and schema[col] != pl.Utf8:
            lf = lf.with_columns(pl.col(col).cast(pl.Utf8))
    names = lf.collect_schema().names()
    first = [c for c in (USER, ITEM, TIME, BEHAVIOR, RATING, SPLIT) if c in names]
    return lf.select(first + [c for c in names if c not in first]), time_kind


def _source_name(mapping: dict[str, str], canon: str) -> str:
    return next((src for src, c in mapping.items() if c == canon), canon)


def _read_item_table(path: Path, key: str, dtype: pl.DataType) -> pl.DataFrame:
    """An item side table keyed by ``key``, renamed to ``item_id`` with the interactions' dtype."""
    table = _read_any_table(path, text_cols=(key,))
    if key not in table.columns:
        raise DataError(f"{path}: no item id column '{key}'; found: {', '.join(table.columns)}; "
                        "name it with --item-key")
    if key != ITEM and ITEM in table.columns:
        table = table.rename({ITEM: f"{ITEM}_orig"})
    table = table.rename({key: ITEM})
    table = _key_like(table, ITEM, dtype)
    return table.select([ITEM] + [c for c in table.columns if c != ITEM])


# ---------------------------------------------------------------------------------------------
# MovieLens
# ---------------------------------------------------------------------------------------------
def _read_text_table(text: str, sep: str, names: list[str] | None = None) -> pl.DataFrame:
    """All-string table from decoded text with a one-byte separator and no quoting."""
    df = pl.read_csv(io.BytesIO(text.encode("utf-8")), separator=sep, has_header=False,
                     quote_char=None, infer_schema=False, truncate_ragged_lines=False)
    if names is not None:
        if df.width < len(names):
            raise DataError(f"expected {len(names)} fields ({', '.join(names)}) but found {df.width}")
        df = df.select(df.columns[: len(names)]).rename(dict(zip(df.columns, names)))
    return df


def _read_dat(path: Path, names: list[str]) -> pl.DataFrame:
    """A MovieLens ``a::b::c`` file (UTF-8 or latin-1) as an all-string table."""
    text = _decode(path).replace("::", "\x1f")
    try:
        return _read_text_table(text, "\x1f", names)
    except DataError as exc:
        raise DataError(f"{path}: {exc}; is this a MovieLens '::' file?") from exc


@_with_errors("ml-100k")
def read_movielens_100k(path) -> RawData:
    """MovieLens 100K: ``u.data`` ratings, ``u.item`` titles/genres/year, ``u.user`` demographics.

    ``path`` is the folder or its ``u.data`` file.
    """
    d = _as_dir(_existing(path))
    data = _require(d / "u.data", "MovieLens 100K needs u.data")
    inter = pl.read_csv(data, separator="\t", has_header=False,
                        schema={USER: pl.Int64, ITEM: pl.Int64, RATING: pl.Float64, TIME: pl.Int64})
    items = _ml100k_items(d) if (d / "u.item").exists() else None
    users = None
    if (d / "u.user").exists():
        users = _read_text_table(_decode(d / "u.user"), "|", [USER, "age", "gender", "occupation", "zip"])
        users = users.with_columns(pl.col(USER).cast(pl.Int64), pl.col("age").cast(pl.Int64, strict=False))
    return RawData(_finish(inter, str(path)), items=items, users=users, name=d.name, source=str(path),
                   meta={"format": "ml-100k", "time": "seconds"})


def _ml100k_items(d: Path) -> pl.DataFrame:
    """``u.item`` (latin-1, ``|``) with pipe-joined genre names from ``u.genre``."""
    genres = list(ML100K_GENRES)
    if (d / "u.genre").exists():
        g = [ln.split("|")[0] for ln in _decode(d / "u.genre").splitlines() if ln.strip()]
        genres = g or genres
    raw = _read_text_table(_decode(d / "u.item"), "|")
    flags = raw.columns[5:]
    if len(flags) != len(genres):
        raise DataError(f"{d / 'u.item'}: {len(flags)} genre flags but {len(genres)} genres in u.genre; "
                        "the files do not belong together")
    named = pl.concat_str([pl.when(pl.col(f) == "1").then(pl.lit(name)) for f, name in zip(flags, genres)],
                          separator="|", ignore_nulls=True)
    release = pl.col(raw.columns[2])
    return raw.select(
        pl.col(raw.columns[0]).cast(pl.Int64).alias(ITEM),
        pl.col(raw.columns[1]).alias("title"),
        release.alias("release_date"),
        named.alias("genres"),
        pl.coalesce(release.str.slice(-4).cast(pl.Int64, strict=False),
                    pl.col(raw.columns[1]).str.extract(_YEAR_IN_TITLE, 1).cast(pl.Int64, strict=False)).alias("year"),
    )


@_with_errors("ml-1m")
def read_movielens_dat(path) -> RawData:
    """MovieLens 1M / 10M ``::`` files: ``ratings.dat`` plus optional ``movies.dat``,
    ``users.dat`` (1M) and ``tags.dat`` (10M, aggregated per movie into ``tags``).

    ``path`` is the folder or its ``ratings.dat`` file.
    """
    d = _as_dir(_existing(path))
    ratings = _require(d / "ratings.dat", "MovieLens 1M/10M needs ratings.dat")
    # numbers only, so reading with ':' as separator leaves empty columns between the fields
    raw = pl.read_csv(ratings, separator=":", has_header=False, quote_char=None, infer_schema=False)
    if raw.width != 7:
        raise DataError(f"{ratings}: expected 'user::item::rating::timestamp' lines, found {raw.width} "
                        "':'-separated fields; is this a MovieLens ratings.dat?")
    u, i, r, t = (raw.columns[k] for k in (0, 2, 4, 6))
    inter = raw.select(
        pl.col(u).alias(USER), pl.col(i).alias(ITEM),
        pl.col(r).cast(pl.Float64).alias(RATING), pl.col(t).cast(pl.Int64).alias(TIME),
    )
    inter = _finish(inter, str(path))
    items = None
    if (d / "movies.dat").exists():
        items = _read_dat(d / "movies.dat", [ITEM, "title", "genres"]).with_columns(_title_year())
        items = _key_like(items, ITEM, inter.schema[ITEM])
    tags = _aggregate_tags(_read_dat(d / "tags.dat", [USER, ITEM, "tag", TIME])) if (d / "tags.dat").exists() else None
    items = _attach_tags(items, tags, inter.schema[ITEM])
    users = None
    if (d / "users.dat").exists():
        users = _read_dat(d / "users.dat", [USER, "gender", "age", "occupation", "zip"])
        users = _key_like(users, USER, inter.schema[USER]).with_columns(
            pl.col("age").cast(pl.Int64, strict=False), pl.col("occupation").cast(pl.Int64, strict=False))
    meta = {"format": "ml-1m", "time": "seconds"}
    if tags is not None:  # rebuilt without the held-out pairs' tags once the data is split (data/tags.py)
        meta.update(item_tags_file=str(d / "tags.dat"), item_tags_format="dat")
    return RawData(inter, items=items, users=users, name=d.name, source=str(path), meta=meta)


def _aggregate_tags(tags: pl.DataFrame) -> pl.DataFrame:
    """One row per movie: its unique tags (first-seen order, stripped) joined by ', '. Every
    user's tags, held-out pairs' included: the split replaces the column by the leak-free one
    (:func:`recforge.data.tags.drop_held_out_item_tags`) before any model reads it."""
    return (
        tags.with_columns(pl.col("tag").cast(pl.Utf8).str.strip_chars())
        .filter(pl.col("tag").is_not_null() & (pl.col("tag") != ""))
        .group_by(ITEM, maintain_order=True)
        .agg(pl.col("tag").unique(maintain_order=True).str.join(", ").alias("tags"))
    )


def _attach_tags(items: pl.DataFrame | None, tags: pl.DataFrame | None, dtype: pl.DataType) -> pl.DataFrame | None:
    if tags is None:
        return items
    tags = _key_like(tags, ITEM, dtype)
    if items is None:
        return tags
    return items.join(tags, on=ITEM, how="left", maintain_order="left")


@_with_errors("ml-latest")
def read_movielens_csv(path) -> RawData:
    """MovieLens CSV releases (ml-latest, latest-small, 20M, 25M, 32M): ``ratings.csv``
    (userId,movieId,rating,timestamp), optional ``movies.csv`` (title, genres; a ``year`` is taken
    from the title) and ``tags.csv`` (unique tags per movie joined by ", " into ``tags``).

    ``path`` is the folder or its ``ratings.csv`` file.
    """
    d = _as_dir(_existing(path))
    ratings = _require(d / "ratings.csv", "MovieLens CSV releases need ratings.csv")
    raw = pl.read_csv(ratings, schema_overrides={"rating": pl.Float64, "timestamp": pl.Int64})
    need = ["userId", "movieId", "rating", "timestamp"]
    missing = [c for c in need if c not in raw.columns]
    if missing:
        raise DataError(f"{ratings}: missing column(s) {', '.join(missing)} (found: {', '.join(raw.columns)}); "
                        "a MovieLens ratings.csv has userId,movieId,rating,timestamp (use --format table otherwise)")
    inter = _finish(raw.rename({"userId": USER, "movieId": ITEM, "timestamp": TIME}), str(path))
    items = None
    if (d / "movies.csv").exists():
        movies = pl.read_csv(d / "movies.csv", infer_schema=False)
        items = movies.rename({"movieId": ITEM}).with_columns(_title_year())
        items = _key_like(items, ITEM, inter.schema[ITEM])
    tags = None
    if (d / "tags.csv").exists():
        tags = _aggregate_tags(pl.read_csv(d / "tags.csv", infer_schema=False).rename({"movieId": ITEM}))
    items = _attach_tags(items, tags, inter.schema[ITEM])
    meta = {"format": "ml-latest", "time": "seconds"}
    if tags is not None:  # rebuilt without the held-out pairs' tags once the data is split (data/tags.py)
        meta.update(item_tags_file=str(d / "tags.csv"), item_tags_format="csv")
    return RawData(inter, items=items, name=d.name, source=str(path), meta=meta)


# ---------------------------------------------------------------------------------------------
# Sequence files
# ---------------------------------------------------------------------------------------------
def _token_lines(path: Path) -> pl.DataFrame:
    """Non-empty lines of a whitespace-separated file: ``_line`` (1-based) and ``_tok`` (list)."""
    lines = _decode(path).splitlines()
    return (
        pl.DataFrame({"_text": lines}, schema={"_text": pl.Utf8})
        .with_row_index("_line", offset=1)
        .with_columns(pl.col("_text").str.replace_all(r"\s+", " ").str.strip_chars())
        .filter(pl.col("_text") != "")
        .select("_line", pl.col("_text").str.split(" ").alias("_tok"))
    )


def _explode_lines(lines: pl.DataFrame, value: str) -> pl.DataFrame:
    """One row per token after the first: ``user_id`` (the first token), ``value``, ``_line``."""
    return (
        lines.select(
            "_line",
            pl.col("_tok").list.first().alias(USER),
            pl.col("_tok").list.slice(1).alias(value),
        )
        .explode(value)
        .filter(pl.col(value).is_not_null())
    )


def _sequence_rows(path: Path) -> pl.DataFrame:
    """``user item item ...`` lines as (user_id, item_id) rows in file order."""
    return _explode_lines(_token_lines(path), ITEM).drop("_line")


def _aligned_times(item_lines: pl.DataFrame, time_lines: pl.DataFrame, item_path: Path, time_path: Path) -> pl.Series:
    """Timestamps from a ``user ts ts ...`` file aligned token by token with the item file."""
    if item_lines.height != time_lines.height:
        raise DataError(f"{time_path}: {time_lines.height} non-empty lines but {item_path.name} has "
                        f"{item_lines.height}; the two files must be aligned line by line")
    both = pl.DataFrame({
        "li": item_lines["_line"], "lt": time_lines["_line"],
        "ui": item_lines["_tok"].list.first(), "ut": time_lines["_tok"].list.first(),
        "ni": item_lines["_tok"].list.len(), "nt": time_lines["_tok"].list.len(),
    })
    bad = both.filter((pl.col("ui") != pl.col("ut")) | (pl.col("ni") != pl.col("nt")))
    if bad.height:
        r = bad.row(0, named=True)
        raise DataError(f"{time_path.name} line {r['lt']} (user {r['ut']}, {r['nt'] - 1} timestamps) does not "
                        f"match {item_path.name} line {r['li']} (user {r['ui']}, {r['ni'] - 1} items); "
                        "the two files must match token for token")
    times = _explode_lines(time_lines, TIME)
    as_int = times[TIME].cast(pl.Int64, strict=False)
    if as_int.null_count():
        r = times.filter(as_int.is_null()).row(0, named=True)
        raise DataError(f"{time_path.name} line {r['_line']}: '{r[TIME]}' is not an integer timestamp; "
                        "the time file must hold integer seconds")
    return as_int


@_with_errors("sequence")
def read_sequences(path, time_path=None) -> RawData:
    """One ``user item item ...`` line per user (SASRec / ICLRec ``Beauty.txt`` format).

    Order is time: the timestamp is the item's position in the user's sequence, unless
    ``time_path`` names an aligned ``user ts ts ...`` file (TiCoSeRec ``*_time.txt``). ``path`` may
    also be a folder holding one ``X_item.txt`` / ``X_time.txt`` pair.
    """
    p = _existing(path)
    name = p.stem
    if p.is_dir():
        p, found_time = _sequence_pair(p)
        time_path = time_path or found_time
        name = Path(path).name
    elif time_path is None and p.stem.endswith("_item") and p.with_name(p.stem[:-5] + "_time" + p.suffix).exists():
        time_path = p.with_name(p.stem[:-5] + "_time" + p.suffix)
    if name.endswith("_item"):
        name = name[:-5]
    item_lines = _token_lines(p)
    df = _explode_lines(item_lines, ITEM).drop("_line")
    if time_path is not None:
        tp = _existing(time_path)
        df = df.with_columns(_aligned_times(item_lines, _token_lines(tp), p, tp).alias(TIME))
        kind = "seconds"
    else:
        df = df.with_columns(_positions())
        kind = "position"
    return RawData(_finish(df, str(path)), name=name, source=str(path),
                   meta={"format": "sequence", "time": kind})


def _sequence_pair(d: Path) -> tuple[Path, Path | None]:
    """The ``X_item.txt``/``X_time.txt`` pair of a folder, or its single sequence file."""
    pairs = sorted(f for f in d.glob("*_item.txt") if (d / (f.name[:-9] + "_time.txt")).exists())
    if len(pairs) == 1:
        return pairs[0], d / (pairs[0].name[:-9] + "_time.txt")
    if len(pairs) > 1:
        raise DataError(f"{d}: several item/time file pairs ({', '.join(f.name for f in pairs)}); "
                        "give the *_item.txt file to read")
    files = _data_files(d)
    if len(files) == 1:
        return files[0], None
    raise DataError(f"{d}: cannot tell which file holds the sequences (found: "
                    f"{', '.join(f.name for f in files) or 'nothing'}); give the file path")


# ---------------------------------------------------------------------------------------------
# LightGCN pre-split folders
# ---------------------------------------------------------------------------------------------
@_with_errors("lightgcn")
def read_lightgcn(path) -> RawData:
    """LightGCN's pre-split folders (gowalla, yelp2018, amazon-book): ``train.txt`` and
    ``test.txt`` with ``user item item ...`` lines (a line may hold a user alone).

    One table with a ``split`` column; the timestamp is the position within the user's rows,
    train rows first, then test rows continuing the count. ``user_list.txt`` / ``item_list.txt``
    (``org_id remap_id``), when present, become side tables holding the original ids.
    """
    d = _existing(path)
    if d.is_file():
        d = d.parent
    parts = []
    for split in ("train", "test"):
        f = _require(d / f"{split}.txt", "a LightGCN folder needs train.txt and test.txt")
        parts.append(_sequence_rows(f).with_columns(pl.lit(split).alias(SPLIT)))
    df = pl.concat(parts, how="vertical").with_columns(_positions())
    df = _finish(df, str(path))
    meta: dict = {"format": "lightgcn", "time": "position"}
    users = _remap_table(d / "user_list.txt", USER, df.schema[USER], meta)
    items = _remap_table(d / "item_list.txt", ITEM, df.schema[ITEM], meta)
    return RawData(df, items=items, users=users, name=d.name, source=str(path), meta=meta)


def _remap_table(path: Path, key: str, dtype: pl.DataType, meta: dict) -> pl.DataFrame | None:
    """LightGCN ``org_id remap_id ...`` list as a side table keyed by ``remap_id``; optional."""
    if not path.exists():
        return None
    try:
        t = pl.read_csv(path, separator=" ", infer_schema=False, quote_char=None)
        if "remap_id" not in t.columns:
            raise ValueError("no remap_id column")
        t = t.rename({"remap_id": key})
        t = _key_like(t, key, dtype)
        for col in t.columns:
            if col != key:
                t = _normalize_id(t, col)
        return t.select([key] + [c for c in t.columns if c != key])
    except (pl.exceptions.PolarsError, ValueError) as exc:
        meta.setdefault("warnings", []).append(f"{path.name} ignored: {_short(exc)}")
        return None


@_with_errors("lightgcn-lastfm")
def read_lightgcn_lastfm(path) -> RawData:
    """LightGCN's Last.fm split: ``data1.txt`` (train) and ``test1.txt`` with ``user<TAB>item<TAB>weight``
    lines; the weight becomes ``rating``. Timestamps are positions as in :func:`read_lightgcn`."""
    d = _existing(path)
    if d.is_file():
        d = d.parent
    parts = []
    for fname, split in (("data1.txt", "train"), ("test1.txt", "test")):
        f = _require(d / fname, "the LightGCN Last.fm folder needs data1.txt and test1.txt")
        t = _read_text_table(_decode(f), "\t", [USER, ITEM, RATING])
        parts.append(t.with_columns(pl.lit(split).alias(SPLIT)))
    df = pl.concat(parts, how="vertical").with_columns(_positions())
    meta: dict = {"format": "lightgcn-lastfm", "time": "position"}
    if (d / "trustnetwork.txt").exists():
        meta["trust_network"] = str(d / "trustnetwork.txt")
    return RawData(_finish(df, str(path)), name=d.name, source=str(path), meta=meta)


# ---------------------------------------------------------------------------------------------
# A given split as tables: train.csv / valid.csv / test.csv
# ---------------------------------------------------------------------------------------------
SPLIT_PARTS = ("train", "valid", "test")


def _split_files(d: Path) -> dict[str, Path] | None:
    """``{"train": ..., ["valid": ...,] "test": ...}`` when the folder holds ``train.X`` and
    ``test.X`` tables with one suffix X (csv, tsv, parquet, pq); None otherwise."""
    for suffix in TABLE_SUFFIXES:
        files = {part: d / f"{part}{suffix}" for part in SPLIT_PARTS}
        if files["train"].is_file() and files["test"].is_file():
            return {part: f for part, f in files.items() if f.is_file()}
    return None


@_with_errors("split-tables")
def read_split_tables(path, user_col="user_id", item_col="item_id", time_col="timestamp", rating_col=None,
                      behavior_col=None, sep=None, items=None, item_key=None, time_format=None) -> RawData:
    """A folder holding a given split: ``train.csv`` and ``test.csv``, optionally ``valid.csv``
    (or the same names ending ``.tsv`` / ``.parquet``). One table with a ``split`` column.

    Every part needs the user and item columns (``user_col``/``item_col``); the other columns
    are optional in the held-out parts. The multi-behaviour sets (``retailrocket-mb``,
    ``tmall-mb``) have ``user_id,item_id,behavior,timestamp`` in ``train.csv`` and only
    ``user_id,item_id`` in ``test.csv``:

    * a held-out row without a behaviour keeps an empty (null) ``behavior``: it is a row of the
      target behaviour, whatever its name (``data.target_behavior`` names it; the behaviour
      filter ``data.behaviors`` always keeps such rows);
    * a held-out part without a time column gets, per user, the times right after the user's
      last row of the earlier parts (last time + 1, + 2, ... in file order; a user without
      earlier rows starts after the last time of all earlier rows), so held-out rows come
      after the history they are ranked against. ``meta["held_out_time"]`` records it.

    A column named ``behavior`` (or the one ``behavior_col`` names) is the behaviour; without
    a time column in ``train`` the times are positions, as for LightGCN's folders.
    """
    d = _as_dir(_existing(path))
    files = _split_files(d)
    if files is None:
        raise DataError(f"{path}: a given split needs train.csv and test.csv (or .tsv / .parquet) in one folder")
    parts: list[pl.DataFrame] = []
    meta: dict = {"format": "split-tables", "parts": {}}
    time_kind = None
    for part, f in files.items():
        df = _read_any_table(f, sep, True, text_cols=(user_col, item_col))
        cols = df.columns
        if part == "train":
            has_time = time_col is not None and time_col in cols
            if time_col is not None and time_col != "timestamp" and not has_time:
                _column(cols, time_col, "--time-col", str(f))  # a named column that is missing: say so
            time_kind = "seconds" if has_time else "position"
        else:
            has_time = time_kind == "seconds" and time_col in cols
        beh = behavior_col if part == "train" or (behavior_col is not None and behavior_col in cols) else None
        rating = rating_col if part == "train" or (rating_col is not None and rating_col in cols) else None
        mapping, clash = _table_mapping(cols, str(f), True, user_col, item_col, time_col if has_time else None,
                                        rating, beh)
        df = df.rename(clash).rename(mapping)
        for col in (USER, ITEM):
            df = df.with_columns(pl.col(col).cast(pl.Utf8).str.strip_chars())
        if has_time:
            df = _to_seconds(df, TIME, str(f), time_format, label=_source_name(mapping, TIME))
        elif part == "train":
            df = df.with_columns(_positions())
        else:
            df = _after_earlier(df, pl.concat(parts, how="diagonal_relaxed"))
            meta.setdefault("held_out_time", {})[part] = "after the user's last earlier row (the file has no time)"
        if BEHAVIOR in df.columns and df.schema[BEHAVIOR] != pl.Utf8:
            df = df.with_columns(pl.col(BEHAVIOR).cast(pl.Utf8))
        meta["parts"][part] = df.height
        parts.append(df.with_columns(pl.lit(part).alias(SPLIT)))
    has_behavior = [BEHAVIOR in p.columns for p in parts]
    if has_behavior[0] and not all(has_behavior):
        meta["unlabelled_behavior"] = [p for p, b in zip(files, has_behavior) if not b]
    meta["time"] = time_kind
    df = _finish(pl.concat(parts, how="diagonal_relaxed"), str(path))
    item_table = None
    if items is not None:
        key = item_key if item_key is not None else (item_col if isinstance(item_col, str) else ITEM)
        item_table = _read_item_table(_existing(items), key, df.schema[ITEM])
    return RawData(df, items=item_table, name=d.name, source=str(path), meta=meta)


def _after_earlier(df: pl.DataFrame, earlier: pl.DataFrame) -> pl.DataFrame:
    """Times for held-out rows that have none: per user, right after the user's last earlier
    time (+1, +2, ... in file order), or after the last earlier time of anyone for a new user."""
    last = earlier.group_by(USER).agg(pl.col(TIME).max().alias("_last"))
    overall = int(earlier[TIME].max()) if earlier.height else -1
    start = pl.col("_last").fill_null(overall) + 1
    return (df.join(last, on=USER, how="left", maintain_order="left")
            .with_columns((start + pl.int_range(pl.len(), dtype=pl.Int64).over(USER)).alias(TIME))
            .drop("_last"))


# ---------------------------------------------------------------------------------------------
# RecBole atomic files
# ---------------------------------------------------------------------------------------------
_ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")


def _read_atomic(path: Path) -> pl.DataFrame:
    """A RecBole atomic file with the ``:type`` suffixes stripped; floats as Float64, the rest Utf8."""
    df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False, encoding="utf8-lossy")
    renames, floats = {}, []
    for col in df.columns:
        name, _, kind = col.rpartition(":")
        if not name or kind not in _ATOMIC_TYPES:
            raise DataError(f"{path}: header field '{col}' is not 'name:type' with type in "
                            f"{', '.join(_ATOMIC_TYPES)}; is this a RecBole atomic file?")
        renames[col] = name
        if kind == "float":
            floats.append(name)
    df = df.rename(renames)
    for col in floats:
        try:
            df = df.with_columns(pl.col(col).str.strip_chars().cast(pl.Float64))
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"{path}: float field '{col}' holds non-numbers ({_short(exc)}); fix the file") from exc
    return df


def _inter_files(p: Path) -> tuple[list[tuple[Path, str | None]], str, Path]:
    """The ``.inter`` file(s) to read with their split (for ``X.train.inter`` benchmark files)."""
    if p.is_file():
        return [(p, None)], p.name.split(".")[0], p.parent
    inters = sorted(p.glob("*.inter"))
    splits = {f.name.split(".")[-2]: f for f in inters if f.name.count(".") >= 2}
    if {"train", "test"} <= set(splits):
        order = [s for s in ("train", "valid", "test") if s in splits]
        return [(splits[s], s) for s in order], splits["train"].name.split(".")[0], p
    plain = [f for f in inters if f.name.count(".") == 1]
    own = p / f"{p.name}.inter"
    if own.exists():
        plain = [own]
    if len(plain) != 1:
        raise DataError(f"{p}: expected one .inter file, found {len(plain)} "
                        f"({', '.join(f.name for f in inters) or 'none'}); give the .inter file path")
    return [(plain[0], None)], plain[0].stem, p


@_with_errors("recbole")
def read_recbole(path, user_col="user_id", item_col="item_id", time_col="timestamp", rating_col="rating") -> RawData:
    """RecBole atomic files: ``<name>.inter`` plus optional ``<name>.item`` and ``<name>.user``.

    The ``:type`` suffixes are dropped; ``token`` and ``token_seq`` fields stay strings, ``float``
    fields become Float64. The fields named by ``user_col``/``item_col``/``time_col``/``rating_col``
    become the canonical columns; without a time field the timestamp is the row's position within
    its user. A folder with ``X.train.inter``/``X.test.inter`` (and ``X.valid.inter``) is read as
    one pre-split table with a ``split`` column.
    """
    p = _existing(path)
    files, stem, d = _inter_files(p)
    parts = []
    for f, split in files:
        t = _read_atomic(f)
        parts.append(t if split is None else t.with_columns(pl.lit(split).alias(SPLIT)))
    df = pl.concat(parts, how="diagonal") if len(parts) > 1 else parts[0]
    source = str(path)
    mapping = {}
    for spec, canon, flag in ((user_col, USER, "--user-col"), (item_col, ITEM, "--item-col")):
        mapping[_column(df.columns, spec, flag, source)] = canon
    has_time = time_col is not None and time_col in df.columns
    if has_time:
        mapping[time_col] = TIME
    if rating_col is not None and rating_col in df.columns:
        mapping[rating_col] = RATING
    clash = {c: f"{c}_orig" for c in df.columns if c in mapping.values() and c not in mapping}
    df = df.rename(clash).rename(mapping)
    df = _to_seconds(df, TIME, source) if has_time else df.with_columns(_positions())
    df = _finish(df, source)
    items = _atomic_side(d / f"{stem}.item", item_col, ITEM, df.schema[ITEM])
    users = _atomic_side(d / f"{stem}.user", user_col, USER, df.schema[USER])
    return RawData(df, items=items, users=users, name=stem, source=source,
                   meta={"format": "recbole", "time": "seconds" if has_time else "position"})


def _atomic_side(path: Path, key: str, canon: str, dtype: pl.DataType) -> pl.DataFrame | None:
    if not path.exists():
        return None
    t = _read_atomic(path)
    if key not in t.columns:
        raise DataError(f"{path}: no '{key}' field to join on (found: {', '.join(t.columns)}); "
                        "fix the header or the id field name")
    if key != canon and canon in t.columns:
        t = t.rename({canon: f"{canon}_orig"})
    t = _key_like(t.rename({key: canon}), canon, dtype)
    return t.select([canon] + [c for c in t.columns if c != canon])


# ---------------------------------------------------------------------------------------------
# Alibaba UserBehavior
# ---------------------------------------------------------------------------------------------
@_with_errors("userbehavior")
def read_userbehavior(path) -> RawData:
    """Alibaba Taobao ``UserBehavior.csv``: no header, ``user,item,category,behavior,timestamp``.

    ``category`` stays on the interactions and also forms the items table (first category seen).
    ``path`` is the CSV or a folder holding one ``UserBehavior*.csv``.
    """
    p = _existing(path)
    name = p.name if p.is_dir() else p.stem
    if p.is_dir():
        found = sorted(p.glob("UserBehavior*.csv"))
        if len(found) != 1:
            raise DataError(f"{path}: expected one UserBehavior*.csv, found {len(found)}; give the CSV path")
        p = found[0]
    names = [USER, ITEM, "category", BEHAVIOR, TIME]
    try:
        df = pl.read_csv(p, has_header=False, schema=dict(zip(names, [pl.Int64] * 3 + [pl.Utf8, pl.Int64])))
    except pl.exceptions.ComputeError:
        # non-integer ids somewhere: read as text and let the id normalisation decide
        df = pl.read_csv(p, has_header=False, schema={n: pl.Utf8 for n in names})
        df = _to_seconds(df, TIME, str(path))
    df = _finish(df, str(path))
    items = _key_like(df.select(ITEM, "category"), ITEM, df.schema[ITEM])
    return RawData(df, items=items, name=name, source=str(path),
                   meta={"format": "userbehavior", "time": "seconds"})


# ---------------------------------------------------------------------------------------------
# Registry, detection, load_raw
# ---------------------------------------------------------------------------------------------
READERS: dict[str, Callable[..., RawData]] = {
    "table": read_table,
    "ml-100k": read_movielens_100k,
    "ml-1m": read_movielens_dat,
    "ml-latest": read_movielens_csv,
    "sequence": read_sequences,
    "recbole": read_recbole,
    "userbehavior": read_userbehavior,
    "lightgcn": read_lightgcn,
    "lightgcn-lastfm": read_lightgcn_lastfm,
    "split-tables": read_split_tables,
}
ALIASES = {"csv": "table", "tsv": "table", "parquet": "table", "ml-10m": "ml-1m", "ml-20m": "ml-latest",
           "ml-25m": "ml-latest", "movielens-100k": "ml-100k", "atomic": "recbole", "taobao": "userbehavior",
           "lastfm": "lightgcn-lastfm", "sasrec": "sequence", "split": "split-tables", "given-split": "split-tables"}


def _data_files(d: Path) -> list[Path]:
    """Files of a folder that may hold data (not hidden, not README/LICENSE)."""
    return sorted(f for f in d.iterdir()
                  if f.is_file() and not f.name.startswith(".") and not _IGNORED_NAMES.match(f.name))


def _is_sequence_file(p: Path) -> bool:
    lines = _first_lines(p)
    return bool(lines) and all(_INT_LINE.match(ln.strip()) for ln in lines)


def _is_userbehavior_csv(p: Path) -> bool:
    lines = _first_lines(p, n=20)
    if not lines:
        return False
    rows = [ln.strip().split(",") for ln in lines]
    return all(len(r) == 5 and r[3] in BEHAVIOR_VALUES for r in rows)


def _detect_dir(d: Path) -> str:
    has = lambda name: (d / name).is_file()  # noqa: E731
    if has("u.data"):
        return "ml-100k"
    if has("ratings.dat"):
        return "ml-1m"
    if has("ratings.csv") and _csv_header(d / "ratings.csv")[:2] == ["userId", "movieId"]:
        return "ml-latest"
    if has("train.txt") and has("test.txt"):
        return "lightgcn"
    if has("data1.txt") and has("test1.txt"):
        return "lightgcn-lastfm"
    if _split_files(d) is not None:
        return "split-tables"
    if any(d.glob("*.inter")):
        return "recbole"
    if any((d / (f.name[:-9] + "_time.txt")).exists() for f in d.glob("*_item.txt")):
        return "sequence"
    files = _data_files(d)
    behavior = [f for f in files if f.name.startswith("UserBehavior") and f.suffix == ".csv"]
    if len(behavior) == 1:
        return "userbehavior"
    if len(files) == 1:
        return _detect_file(files[0])
    raise DataError(f"{d}: cannot tell which dataset this folder holds (files: "
                    f"{', '.join(f.name for f in files) or 'none'}); give a data file, or the format "
                    f"with --format ({', '.join(READERS)})")


def _csv_header(p: Path) -> list[str]:
    lines = _first_lines(p, n=1)
    return [c.strip().strip('"') for c in lines[0].split(",")] if lines else []


def _detect_file(p: Path) -> str:
    name, suffix = p.name, p.suffix.lower()
    if name == "u.data":
        return "ml-100k"
    if name == "ratings.dat":
        return "ml-1m"
    if name == "ratings.csv" and _csv_header(p)[:2] == ["userId", "movieId"]:
        return "ml-latest"
    if suffix == ".inter":
        return "recbole"
    if suffix == ".csv" and (name.startswith("UserBehavior") or _is_userbehavior_csv(p)):
        return "userbehavior"
    if suffix in TABLE_SUFFIXES:
        return "table"
    if suffix == ".txt" and _is_sequence_file(p):
        return "sequence"
    return "table"


def detect_format(path) -> str:
    """The reader key (see :data:`READERS`) that fits a file or dataset folder."""
    p = _existing(path)
    try:
        return _detect_dir(p) if p.is_dir() else _detect_file(p)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({_short(exc)}); check the permissions") from exc


def _resolve(path, options: dict) -> tuple[str, Callable[..., RawData], dict]:
    """Pick the reader and the options it accepts (unset options of other formats are dropped)."""
    options = dict(options)
    fmt = options.pop("fmt", None)
    fmt = options.pop("format", None) if fmt is None else fmt
    if fmt is None:
        fmt = detect_format(path)
    else:
        _existing(path)
        fmt = ALIASES.get(fmt, fmt)
        if fmt not in READERS:
            raise DataError(f"unknown data format '{fmt}'; choose one of {', '.join(READERS)}")
    reader = READERS[fmt]
    accepted = set(inspect.signature(reader).parameters) - {"path"}
    kept = {k: v for k, v in options.items() if k in accepted}
    extra = sorted(k for k, v in options.items() if k not in accepted and v is not None)
    if extra:
        raise DataError(f"{path}: option(s) {', '.join(extra)} do not apply to the {fmt} format "
                        f"(it accepts: {', '.join(sorted(accepted)) or 'no options'}); drop them or pass --format")
    return fmt, reader, kept


def load_raw(path, lazy: bool = False, **options) -> RawData:
    """Read any supported file or dataset folder into canonical :class:`RawData`.

    The format is detected from the path (see :func:`detect_format`) unless ``fmt=`` names one of
    :data:`READERS`. Other options go to the reader (e.g. ``user_col=`` for tables); options set
    to ``None`` that the chosen reader does not take are ignored. ``lazy=True`` scans a generic
    table (CSV/TSV/Parquet) instead of reading it (:func:`scan_table`: the interactions are a
    LazyFrame, for data larger than memory); other formats are read as usual.
    """
    fmt, reader, kept = _resolve(path, options)
    if lazy and fmt == "table":
        reader = scan_table
    raw = reader(path, **kept)
    raw.meta.setdefault("format", fmt)
    return raw


def _stat(p: Path) -> str:
    try:
        st = p.stat()
        return f"{p.name}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return f"{p.name}:missing"


def reader_key(path, **options) -> str:
    """A stable string naming the chosen reader, its version and its options.

    Files that the reader uses beside ``path`` (side files of a dataset given by one member file,
    an ``items=`` table, a ``time_path``) are fingerprinted by size and modification time, so a
    change to them invalidates the cache too.
    """
    options = {k: v for k, v in options.items() if k != "lazy"}  # same data either way
    fmt, _reader, kept = _resolve(path, options)
    p = Path(path)
    extra: list[str] = []
    if p.is_file() and fmt not in ("table", "sequence", "userbehavior"):
        extra = [_stat(f) for f in sorted(p.parent.iterdir()) if f.is_file() and f != p]
    if p.is_file() and fmt == "sequence" and p.stem.endswith("_item"):
        extra.append(_stat(p.with_name(p.stem[:-5] + "_time" + p.suffix)))
    for key in ("items", "time_path"):
        if kept.get(key) is not None:
            extra.append(_stat(Path(kept[key])))
    payload = {"format": fmt, "version": READER_VERSION,
               "options": {k: kept[k] for k in sorted(kept)}, "files": extra}
    return json.dumps(payload, sort_keys=True, default=str)
