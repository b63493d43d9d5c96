"""Item text from a catalogue's side columns, through a template.

A template is a Python format string over item columns, e.g.
``"{title}. Genres: {genres}. Tags: {tags}"``. It is read as *clauses* separated by ``". "``,
``"; "`` or a line break: a clause whose placeholder names a column the catalogue lacks, or whose
value is empty for an item, is dropped for that item (with its separator), so one template serves
catalogues with different columns and items with gaps. Values are cleaned for reading:
``"Action|Comedy"`` becomes ``"Action, Comedy"``, lists are joined by ``", "``, whitespace is
collapsed and long values are cut at a word boundary (``max_chars``).

The default template (:data:`DEFAULT_TEMPLATE`) names the usual text columns (title, brand,
category, genres, tags, description); only those a catalogue has are used.

``item_texts(ds)`` returns one string per item index ``1..n_items`` (position ``i - 1`` holds item
``i``), the order every semantic table and model uses.
"""

from __future__ import annotations

import re
import string

import polars as pl

from recforge.data.schema import ITEM
from recforge.errors import ConfigError, DataError

#: the columns the default template reads, in the order they appear in the text
TEXT_COLUMNS = ("title", "brand", "category", "genres", "tags", "description")
DEFAULT_TEMPLATE = "{title}. Brand: {brand}. Category: {category}. Genres: {genres}. Tags: {tags}. {description}"
DEFAULT_MAX_CHARS = 400

_SEPARATOR = re.compile(r"(\.\s+|;\s+|\n)")
_LIST_BAR = re.compile(r"\s*\|\s*")
_SPACES = re.compile(r"\s+")


def template_fields(template: str) -> list[str]:
    """The column names a template refers to, in order of first use."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"text template {template!r}: {exc}; write columns as {{title}}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or not name.isidentifier() or spec or conversion:
            raise ConfigError(f"text template {template!r}: placeholders are plain column names such as {{title}} "
                              "(no positions, conversions or format specs)")
        if name not in names:
            names.append(name)
    return names


def _clauses(template: str) -> list[tuple[str, list[str], str]]:
    """``(clause, its fields, the separator after it)`` for each clause of the template."""
    parts = _SEPARATOR.split(template)
    out = []
    for i in range(0, len(parts), 2):
        sep = parts[i + 1] if i + 1 < len(parts) else ""
        if parts[i] or sep:
            out.append((parts[i], template_fields(parts[i]), sep))
    return out


def clean_value(value, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """A readable string for one cell: ``None``/NaN/empty -> ``""``; lists and ``a|b`` joined by
    ``", "``; whitespace collapsed; cut at a word boundary after ``max_chars``."""
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN
        return ""
    if isinstance(value, (list, tuple)):
        text = ", ".join(clean_value(v, max_chars) for v in value if clean_value(v, max_chars))
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        text = str(value)
        if "|" in text:
            text = _LIST_BAR.sub(", ", text)
    text = _SPACES.sub(" ", text).strip()
    if text.lower() in ("(no genres listed)", "nan", "none", "null"):
        return ""
    if max_chars and len(text) > max_chars:
        cut = text[:max_chars]
        text = (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ,;") + " ..."
    return text


def _render(clauses, row: dict, max_chars: int) -> str:
    pieces: list[str] = []
    for clause, fields, sep in clauses:
        values = {f: clean_value(row.get(f), max_chars) for f in fields}
        if fields and not all(values.values()):
            continue  # a column missing or empty for this item: drop the clause
        pieces.append(clause.format(**values) + sep)
    text = "".join(pieces).strip()
    text = re.sub(r"\s*([.;])(\s*[.;])+", r"\1", text)  # ". ." left by a value ending in a period
    return text.rstrip(";").strip()


def default_template(columns) -> str:
    """The default template restricted to the text columns present (for display)."""
    present = set(columns)
    kept = [(c, f, s) for c, f, s in _clauses(DEFAULT_TEMPLATE) if not f or all(x in present for x in f)]
    return "".join(c + s for c, _, s in kept).strip().rstrip(".") + ("." if kept else "")


def _item_table(ds) -> pl.DataFrame:
    if ds.items is None:
        raise DataError(f"{ds.name}: the dataset has no item table, so items have no text; give one with "
                        "--items FILE (a table keyed by item id with columns such as title, genres, description)")
    return ds.items


def item_texts(ds, template: str | None = None, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """One text per item index ``1..n_items`` (entry ``i - 1`` is item ``i``).

    ``template`` defaults to :data:`DEFAULT_TEMPLATE`. Items without an item-table row or with
    every field empty get ``""``; a template naming no column of the catalogue is an error.
    """
    items = _item_table(ds)
    tpl = DEFAULT_TEMPLATE if template is None else template
    fields = template_fields(tpl)
    used = [f for f in fields if f in items.columns]
    if not used:
        have = ", ".join(c for c in items.columns if c != ITEM) or "none"
        raise DataError(f"{ds.name}: the text template uses {', '.join(fields) or 'no column'} but the item table "
                        f"has {have}; pass a template naming its columns, e.g. '{{{have.split(', ')[0]}}}'")
    clauses = _clauses(tpl)
    table = (pl.DataFrame({ITEM: pl.int_range(1, ds.n_items + 1, eager=True).cast(items.schema[ITEM])})
             .join(items.select([ITEM, *used]), on=ITEM, how="left", maintain_order="left"))
    return [_render(clauses, row, max_chars) for row in table.select(used).iter_rows(named=True)]


def text_preview(ds, n: int = 3, template: str | None = None) -> dict:
    """What :func:`item_texts` makes of a catalogue, for ``recforge data describe``: the template
    in use, how many items have text, and ``n`` sample texts (the first items, by raw id)."""
    items = ds.items
    if items is None:
        return {"template": None, "items_with_text": 0, "samples": []}
    tpl = DEFAULT_TEMPLATE if template is None else template
    texts = item_texts(ds, template, max_chars=DEFAULT_MAX_CHARS)
    raw = ds.item_map.sort("idx")["raw"].to_list()
    nonempty = [i for i, t in enumerate(texts) if t]
    samples = [{"item_id": raw[i], "text": texts[i]} for i in nonempty[:n]]
    return {"template": default_template(items.columns) if template is None else tpl,
            "items_with_text": len(nonempty), "samples": samples}


def format_preview(preview: dict) -> str:
    """A short text block of :func:`text_preview` (to append to ``format_description``)."""
    if not preview.get("template"):
        return "  item text      - " + (f"(none: {preview['note']})" if preview.get("note") else "(no item table)")
    lines = [f"  item text      {preview['items_with_text']:,} items; template: {preview['template']}"]
    lines += [f"    {s['item_id']}: {s['text']}" for s in preview["samples"]]
    return "\n".join(lines)
