"""Summary statistics of an encoded dataset, as a dict and as an aligned text block."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
import polars as pl

from recforge.data.dataset import Dataset
from recforge.data.schema import BEHAVIOR, ITEM, RATING, SPLIT, TIME, USER

# timestamps between these bounds (1973 .. 2100) are read as unix seconds
_EPOCH_RANGE = (10**8, 4_102_444_800)


def _length_stats(lengths: np.ndarray) -> dict:
    """Distribution of per-user sequence lengths."""
    if lengths.size == 0:
        return {}
    q = np.percentile(lengths, [25, 50, 75, 90])
    return {
        "min": int(lengths.min()), "p25": float(q[0]), "median": float(q[1]), "mean": float(lengths.mean()),
        "p75": float(q[2]), "p90": float(q[3]), "max": int(lengths.max()),
    }


def _popularity_stats(counts: np.ndarray) -> dict:
    """Item popularity: spread, share held by the top 20% items, size of the 80% head."""
    if counts.size == 0 or counts.sum() == 0:
        return {}
    desc = np.sort(counts)[::-1]
    total = desc.sum()
    top = max(1, math.ceil(0.2 * desc.size))
    head80 = int(np.searchsorted(np.cumsum(desc), 0.8 * total) + 1)
    return {
        "min": int(desc.min()), "median": float(np.median(desc)), "mean": float(desc.mean()), "max": int(desc.max()),
        "top20_share": float(desc[:top].sum() / total),
        "head80_items": min(head80, int(desc.size)),
    }


def _time_stats(df: pl.DataFrame, meta: dict) -> dict:
    if df.height == 0:
        return {}
    lo, hi = int(df[TIME].min()), int(df[TIME].max())
    kind = meta.get("time")
    if kind is None:
        kind = "seconds" if _EPOCH_RANGE[0] <= lo and hi <= _EPOCH_RANGE[1] else "unknown"
    out = {"min": lo, "max": hi, "kind": kind}
    if kind == "seconds" and _EPOCH_RANGE[0] <= lo and hi <= _EPOCH_RANGE[1]:
        iso = lambda t: datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d")  # noqa: E731
        out.update(first=iso(lo), last=iso(hi), days=round((hi - lo) / 86400, 1))
    return out


def _counts(df: pl.DataFrame, col: str) -> dict:
    """Rows per value; rows without a value (held-out rows of a given split without a
    behaviour, which are the target behaviour) count under ``unlabelled``."""
    vc = df.group_by(col).len().sort(["len", col], descending=[True, False], nulls_last=True)
    return {("unlabelled" if k is None else str(k)): int(v) for k, v in vc.iter_rows()}


def _held_out(df: pl.DataFrame) -> dict:
    """Per held-out part of a given split: rows, users, and rows whose item never occurs in
    the training part (such a target can only be ranked by what a model knows without it)."""
    train_items = df.filter(pl.col(SPLIT) == "train")[ITEM].unique().implode()
    out = {}
    for part in ("valid", "test"):
        rows = df.filter(pl.col(SPLIT) == part)
        if rows.height:
            out[part] = {"rows": rows.height, "users": int(rows[USER].n_unique()),
                         "items_not_in_train": int((~rows[ITEM].is_in(train_items)).sum())}
    return out


def _side_columns(table: pl.DataFrame | None, key: str) -> list[str]:
    return [] if table is None else [c for c in table.columns if c != key]


def describe(ds: Dataset, template: str | None = None) -> dict:
    """Statistics of an encoded :class:`Dataset`: sizes, density, per-user sequence lengths,
    item popularity (with long-tail measures), behaviours, ratings, splits, time range, the
    side columns available for items and users, and the item text the text-enhanced models
    would read (``template``: None for the default template)."""
    df = ds.interactions
    n = df.height
    lengths = df.group_by(USER).len()["len"].to_numpy()
    pop = ds.item_popularity()[1:]
    pop = pop[pop > 0]
    d: dict = {
        "name": ds.name,
        "users": ds.n_users,
        "items": ds.n_items,
        "interactions": n,
        "density": n / max(1, ds.n_users * ds.n_items),
        "sequence_length": _length_stats(lengths),
        "item_popularity": _popularity_stats(pop),
        "timestamp": _time_stats(df, ds.meta),
    }
    if BEHAVIOR in df.columns:
        d["behaviors"] = _counts(df, BEHAVIOR)
    if SPLIT in df.columns:
        d["splits"] = _counts(df, SPLIT)
        d["held_out"] = _held_out(df)
    if RATING in df.columns and n:
        r = df[RATING].drop_nulls()
        if len(r):
            d["ratings"] = {"min": float(r.min()), "mean": float(r.mean()), "max": float(r.max()),
                            "distinct": int(r.n_unique())}
    d["interaction_columns"] = [c for c in df.columns if c not in (USER, ITEM, TIME)]
    d["item_columns"] = _side_columns(ds.items, ITEM)
    d["user_columns"] = _side_columns(ds.users, USER)
    if ds.items is not None:
        from recforge.errors import DataError
        from recforge.semantic.text import text_preview

        try:
            d["item_text"] = text_preview(ds, template=template)
        except DataError as exc:
            if template is not None:  # a template the user gave must fit the table
                raise
            # an item table without text columns (ids only, e.g. Gowalla's item_list.txt): describe the
            # data anyway and say why there is no text
            d["item_text"] = {"template": None, "items_with_text": 0, "samples": [], "note": str(exc)}
    return d


# ---------------------------------------------------------------------------------------------
def _fmt_num(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return f"{int(v):,}"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _inline(d: dict, labels: dict | None = None) -> str:
    return "  ".join(f"{(labels or {}).get(k, k)} {_fmt_num(v)}" for k, v in d.items())


_POP_LABELS = {"top20_share": "top-20% share", "head80_items": "80%-head items"}


def format_description(d: dict) -> str:
    """A readable, aligned text block of :func:`describe`'s result."""
    rows: list[tuple[str, str]] = [
        ("users", _fmt_num(d["users"])),
        ("items", _fmt_num(d["items"])),
        ("interactions", _fmt_num(d["interactions"])),
        ("density", f"{100 * d['density']:.4g}%"),
    ]
    if d.get("sequence_length"):
        rows.append(("sequence length", _inline(d["sequence_length"])))
    pop = d.get("item_popularity")
    if pop:
        shown = dict(pop)
        shown["top20_share"] = f"{100 * pop['top20_share']:.1f}%"
        rows.append(("item popularity", _inline(shown, _POP_LABELS)))
    ts = d.get("timestamp")
    if ts:
        text = f"{_fmt_num(ts['min'])} .. {_fmt_num(ts['max'])} ({ts['kind']})"
        if "first" in ts:
            text = f"{ts['first']} .. {ts['last']} ({ts['days']:g} days)"
        rows.append(("timestamps", text))
    for key, label in (("behaviors", "behaviors"), ("splits", "splits")):
        if d.get(key):
            rows.append((label, _inline(d[key])))
    for part, h in (d.get("held_out") or {}).items():
        rows.append((f"{part} rows", f"{_fmt_num(h['rows'])} of {_fmt_num(h['users'])} users; "
                                     f"{_fmt_num(h['items_not_in_train'])} with an item not in train"))
    if d.get("ratings"):
        rows.append(("ratings", _inline(d["ratings"])))
    for key, label in (("interaction_columns", "interaction columns"), ("item_columns", "item columns"),
                       ("user_columns", "user columns")):
        rows.append((label, ", ".join(d.get(key) or []) or "-"))
    width = max(len(k) for k, _ in rows)
    lines = [f"Dataset {d.get('name', '')}".rstrip()]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    if d.get("item_text"):
        from recforge.semantic.text import format_preview

        lines.append(format_preview(d["item_text"]))
    return "\n".join(lines)
