"""Tags that users gave to items (social tagging), restricted to the training part of a split.

A :class:`Tags` holds two count matrices over one tag vocabulary: ``user_tags`` (n_users ×
n_tags: how many times each user applied each tag) and ``item_tags`` ((n_items + 1) × n_tags:
how many times each item received each tag; row 0 is the padding item and stays empty), the
vocabulary (``tag``, ``idx``, ``count``) and a ``record`` of what was read and dropped, which
lands in ``metrics.json``'s protocol.

Sources (``data.tags``):

* a file: MovieLens ``tags.csv`` (a header naming the user, item and tag columns, e.g.
  ``userId,movieId,tag,timestamp``; quoted tags may hold commas), or headerless ``user item tag``
  lines (tab-separated when the first line has a tab, else the first two runs of spaces separate
  the ids and the rest of the line is the tag). Ids are raw ids, mapped with the dataset's maps;
* ``auto``: ``tags.csv`` beside the source's interaction files (the folder of
  ``ds.meta["source"]``, or that folder itself); an error names what was looked for.

``PATH:N`` or ``auto:N`` sets ``min_count`` (tags applied fewer than N times in the kept rows
are dropped and counted; the default 1 keeps every tag).

Leak-free: a tag row is kept only when its (user, item) pair is an interaction of the **training
part** of the split. A tag on a held-out (validation or test) interaction would tell the model
which item the user went on to have, so such rows are dropped and counted
(``dropped_held_out``); rows on pairs that are not interactions at all (a user tagging a movie
they never rated) are dropped too (``dropped_not_interacted``), as are rows whose user or item
is not in the dataset (``dropped_unknown``). Tags are normalised: lower-cased, surrounding
white space stripped, inner runs of white space collapsed to one space; empty tags are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from recforge.data.schema import ITEM, USER
from recforge.errors import DataError

#: the file ``data.tags=auto`` looks for beside the interaction files
AUTO_FILE = "tags.csv"
_USER_COLS = ("userid", "user_id", "user", "uid")
_ITEM_COLS = ("movieid", "itemid", "item_id", "item", "iid", "movie_id")
_TAG_COLS = ("tag", "tags", "tag_name")


@dataclass
class Tags:
    """User-tag and item-tag count matrices (CSR, float32) over one vocabulary (``tag`` Utf8,
    ``idx`` Int32 ``0..n_tags-1``, ``count`` Int64: the kept rows that carry the tag)."""

    user_tags: sp.csr_matrix
    item_tags: sp.csr_matrix
    vocab: pl.DataFrame
    record: dict = field(default_factory=dict)

    @property
    def n_tags(self) -> int:
        return self.vocab.height

    def describe(self) -> dict:
        """What the protocol records: the source, rows read, kept and dropped, vocabulary size,
        users and items with at least one tag."""
        return dict(self.record)


def normalize_tag(expr: pl.Expr) -> pl.Expr:
    """Lower-case, strip, collapse inner white space."""
    return expr.cast(pl.Utf8).str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


# ---- reading ------------------------------------------------------------------------------------
def _pick(cols: list[str], names: tuple[str, ...]) -> str | None:
    low = {c.lower().strip(): c for c in cols}
    return next((low[n] for n in names if n in low), None)


def read_tag_rows(path) -> pl.DataFrame:
    """``user`` (raw id as text), ``item`` (raw id as text), ``tag`` (as written) of a tag file."""
    from recforge.data.readers import _decode

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{path}: no such file; data.tags takes a tag file (userId,movieId,tag[,timestamp] or "
                        "'user item tag' lines) or auto")
    text = _decode(p)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: empty; a tag file has userId,movieId,tag rows or 'user item tag' lines")
    first = [c.strip().strip('"') for c in lines[0].split(",")]
    ucol, icol, tcol = _pick(first, _USER_COLS), _pick(first, _ITEM_COLS), _pick(first, _TAG_COLS)
    if ucol and icol and tcol:  # CSV with a header
        import io

        df = pl.read_csv(io.StringIO(text), infer_schema=False, quote_char='"')
        return df.select(pl.col(ucol).alias("user"), pl.col(icol).alias("item"), pl.col(tcol).alias("tag"))
    if "," in lines[0] and not ("\t" in lines[0] or len(lines[0].split()) >= 3):
        raise DataError(f"{path}: a comma-separated first line {lines[0][:80]!r} without user, item and tag "
                        "columns; give a header such as userId,movieId,tag")
    tabbed = "\t" in lines[0]
    rows = []
    for n, ln in enumerate(lines, 1):
        parts = ln.strip().split("\t", 2) if tabbed else re.split(r"\s+", ln.strip(), maxsplit=2)
        if len(parts) < 3:
            raise DataError(f"{path} line {n}: {ln[:80]!r} has {len(parts)} field(s); a headerless tag file has "
                            f"'user item tag' lines ({'tab' if tabbed else 'space'}-separated)")
        rows.append(parts)
    return pl.DataFrame(rows, schema={"user": pl.Utf8, "item": pl.Utf8, "tag": pl.Utf8}, orient="row")


def auto_path(ds) -> Path:
    """``tags.csv`` beside the source's interaction files (``ds.meta["source"]``)."""
    source = ds.meta.get("source") if isinstance(getattr(ds, "meta", None), dict) else None
    if not source:
        raise DataError(f"data.tags=auto looks for {AUTO_FILE} beside the interaction files, but the dataset "
                        f"'{ds.name}' does not record where it was read from (no meta['source']); give the tag "
                        "file's path: data.tags=PATH")
    src = Path(source).expanduser()
    looked = [src / AUTO_FILE] if src.is_dir() else [src.parent / AUTO_FILE]
    for cand in looked:
        if cand.is_file():
            return cand
    raise DataError(f"data.tags=auto: no {AUTO_FILE} beside the interaction files (looked for "
                    f"{', '.join(str(c) for c in looked)}); give the tag file's path: data.tags=PATH")


def parse_spec(spec) -> tuple[str, int | None]:
    """``data.tags`` as (``auto`` or a path, min_count or None): ``auto``, ``auto:N``, ``PATH``,
    ``PATH:N`` (when ``PATH:N`` is not itself a file)."""
    raw = str(spec).strip()
    if not raw:
        raise DataError("data.tags is empty; give a tag file's path or auto")
    head, sep, tail = raw.rpartition(":")
    if sep and tail.isdigit() and head and not Path(raw).expanduser().is_file():
        return head, int(tail)
    return raw, None


# ---- building --------------------------------------------------------------------------------------
def build_tags(spec, ds, train: pl.DataFrame, min_count: int = 1) -> Tags:
    """The tags ``data.tags`` names, kept only on the (user, item) interactions of ``train``
    (the training part of the split, encoded ids), normalised, with tags applied fewer than
    ``min_count`` times dropped; every drop is counted in ``record``."""
    where, n = parse_spec(spec)
    if n is not None:
        min_count = n
    if min_count < 1:
        raise DataError(f"data.tags: min_count={min_count}; tags need at least 1 use (1 keeps every tag)")
    path = auto_path(ds) if where == "auto" else Path(where).expanduser()
    rows = read_tag_rows(path)
    n_read = rows.height
    users = ds.user_map.select(pl.col("raw").cast(pl.Utf8).alias("user"), pl.col("idx").cast(pl.Int32).alias(USER))
    items = ds.item_map.select(pl.col("raw").cast(pl.Utf8).alias("item"), pl.col("idx").cast(pl.Int32).alias(ITEM))
    rows = (rows.with_columns(pl.col("user").str.strip_chars(), pl.col("item").str.strip_chars(),
                              normalize_tag(pl.col("tag")).alias("tag"))
            .join(users, on="user", how="left", maintain_order="left")
            .join(items, on="item", how="left", maintain_order="left"))
    empty = rows.filter(pl.col("tag").is_null() | (pl.col("tag") == ""))
    rows = rows.filter(pl.col("tag").is_not_null() & (pl.col("tag") != ""))
    unknown = rows.filter(pl.col(USER).is_null() | pl.col(ITEM).is_null())
    rows = rows.filter(pl.col(USER).is_not_null() & pl.col(ITEM).is_not_null())
    pairs = train.select(pl.col(USER).cast(pl.Int32), pl.col(ITEM).cast(pl.Int32)).unique()
    everything = ds.interactions.select(pl.col(USER).cast(pl.Int32), pl.col(ITEM).cast(pl.Int32)).unique()
    rows = rows.join(pairs.with_columns(pl.lit(True).alias("_train")), on=[USER, ITEM], how="left",
                     maintain_order="left")
    rows = rows.join(everything.with_columns(pl.lit(True).alias("_seen")), on=[USER, ITEM], how="left",
                     maintain_order="left")
    held_out = rows.filter(pl.col("_train").is_null() & pl.col("_seen").is_not_null())
    not_interacted = rows.filter(pl.col("_seen").is_null())
    rows = rows.filter(pl.col("_train").is_not_null())
    counts = rows.group_by("tag").len("count")
    rare = counts.filter(pl.col("count") < min_count)
    vocab = (counts.filter(pl.col("count") >= min_count).sort("tag")
             .with_columns(pl.int_range(0, pl.len(), dtype=pl.Int32).alias("idx"))
             .select("tag", "idx", pl.col("count").cast(pl.Int64)))
    rows = rows.join(vocab.select("tag", "idx"), on="tag", how="inner", maintain_order="left")
    u = rows[USER].to_numpy().astype(np.int64)
    i = rows[ITEM].to_numpy().astype(np.int64)
    t = rows["idx"].to_numpy().astype(np.int64)
    ones = np.ones(len(t), dtype=np.float32)
    n_tags = vocab.height
    ut = sp.csr_matrix((ones, (u, t)), shape=(ds.n_users, n_tags))
    it = sp.csr_matrix((ones, (i, t)), shape=(ds.n_items + 1, n_tags))
    for m in (ut, it):
        m.sum_duplicates()
        m.sort_indices()
    record = {
        "source": str(path), "part": "train", "rows_read": n_read, "rows_kept": rows.height,
        "dropped_held_out": held_out.height, "dropped_not_interacted": not_interacted.height,
        "dropped_unknown": unknown.height, "dropped_empty": empty.height,
        "min_count": int(min_count), "rare_tags_dropped": rare.height,
        "rare_rows_dropped": int(rare["count"].sum()) if rare.height else 0,
        "tags": n_tags, "users_with_tags": int((np.diff(ut.indptr) > 0).sum()),
        "items_with_tags": int((np.diff(it.indptr) > 0).sum()),
        "normalisation": "lower-case, stripped, inner white space collapsed",
    }
    if n_tags == 0:
        raise DataError(f"{path}: none of its {n_read:,} tag rows is on an interaction of the training part "
                        f"(held out: {held_out.height:,}, not interacted: {not_interacted.height:,}, unknown user or "
                        f"item: {unknown.height:,}, rarer than min_count={min_count}: "
                        f"{record['rare_rows_dropped']:,}); "
                        "check that the tag file's ids are the interaction file's raw ids")
    return Tags(ut.astype(np.float32), it.astype(np.float32), vocab, record)


# ---- the item table's tags column ------------------------------------------------------------------
def item_tag_rows(path, fmt: str = "csv") -> pl.DataFrame:
    """``user``, ``item``, ``tag`` (text) of a reader's tag file: MovieLens ``tags.csv`` (any file
    :func:`read_tag_rows` reads) or ``tags.dat`` (``fmt="dat"``, ``user::item::tag::time``)."""
    if fmt == "dat":
        from recforge.data.readers import _read_dat

        rows = _read_dat(Path(path), [USER, ITEM, "tag", "time"])
        return rows.select(pl.col(USER).cast(pl.Utf8).alias("user"), pl.col(ITEM).cast(pl.Utf8).alias("item"),
                           pl.col("tag").cast(pl.Utf8))
    return read_tag_rows(path)


def drop_held_out_item_tags(ds, split) -> dict | None:
    """Rebuild the item table's ``tags`` column without the tags users put on their own held-out
    (validation or test) items, so that a text model never reads a word its user wrote about the
    target. A MovieLens reader aggregates every user's tags per movie (``meta["item_tags_file"]``);
    this keeps every other tag row, in the reader's format (unique tags in first-seen order,
    joined by ", "). Replaces ``ds.items`` and returns what the protocol records (rows read,
    dropped); None when the item table has no reader-built tags. Rebuilt from the file on every
    call, so splitting the same dataset again gives the column of the new split. ``split`` needs a
    ``test`` frame and may have a ``valid`` one (the language-model task's split has none)."""
    path = ds.meta.get("item_tags_file") if isinstance(getattr(ds, "meta", None), dict) else None
    if not path or ds.items is None or "tags" not in ds.items.columns:
        return None
    if not Path(path).is_file():
        raise DataError(f"{path}: the tag file this dataset's item tags were read from is gone; the tags of "
                        "held-out pairs cannot be removed. Restore it, or load the data again without it")
    rows = item_tag_rows(path, ds.meta.get("item_tags_format", "csv"))
    users = ds.user_map.select(pl.col("raw").cast(pl.Utf8).alias("user"), pl.col("idx").cast(pl.Int64).alias(USER))
    items = ds.item_map.select(pl.col("raw").cast(pl.Utf8).alias("item"), pl.col("idx").cast(pl.Int64).alias(ITEM))
    rows = (rows.with_columns(pl.col("user").str.strip_chars(), pl.col("item").str.strip_chars(),
                              pl.col("tag").str.strip_chars())
            .join(users, on="user", how="left", maintain_order="left")
            .join(items, on="item", how="left", maintain_order="left"))
    held = pl.concat([f.select(pl.col(USER).cast(pl.Int64), pl.col(ITEM).cast(pl.Int64))
                      for f in (getattr(split, "valid", None), split.test) if f is not None]).unique()
    rows = rows.join(held.with_columns(pl.lit(True).alias("_held")), on=[USER, ITEM], how="left",
                     maintain_order="left")
    dropped = int(rows["_held"].is_not_null().sum())
    kept = rows.filter(pl.col("_held").is_null() & pl.col(ITEM).is_not_null() & pl.col("tag").is_not_null()
                       & (pl.col("tag") != ""))
    per_item = kept.group_by(ITEM, maintain_order=True).agg(
        pl.col("tag").unique(maintain_order=True).str.join(", ").alias("tags"))
    key = ds.items.schema[ITEM]
    ds.items = ds.items.drop("tags").join(per_item.with_columns(pl.col(ITEM).cast(key)), on=ITEM, how="left",
                                          maintain_order="left")
    return {"source": str(path), "rows": rows.height, "dropped_held_out_pairs": dropped,
            "rule": "tags a user put on their own validation or test item are removed from the item text"}
