"""Item knowledge: relations of items to other items and to entities, as triples.

A :class:`Knowledge` holds ``head relation tail`` triples over one node space shared with the
dataset's items: nodes ``1..n_items`` are the encoded items (their dataset indices, so an item
embedding table can be reused), nodes ``n_items + 1 ..`` are the other entities (categories,
brands, ...), listed in ``entities``; 0 is padding, as for items. Heads are always items.

Sources (``data.knowledge``: one or several, comma-separated or a YAML list; the relations built
and what was dropped are written into ``metrics.json``'s ``protocol.knowledge``):

* a file (:func:`read_triples`): ``head relation tail`` lines, tab- or space-separated, raw item
  ids as heads, an optional header line. Heads that are not items of the dataset (unknown, or
  removed by filtering) are dropped and counted. A relation whose tails are all items of the
  dataset is an item-item relation; any other relation's tails are entities named by their raw
  value (``tails="item"`` / ``"entity"`` forces one reading);
* ``category`` or ``category:COLUMN`` (:func:`category_relations`): ``(item, belongs_to,
  category)`` from the item table's ``category`` column (the Taobao UserBehavior reader puts its
  category column there; ``data.items=FILE`` adds one to any table);
* ``co-interaction`` or ``co-interaction:N`` (:func:`co_interaction`): within each behaviour,
  ``(item, co_<behaviour>, other item)`` for every pair of distinct items that more than N users
  (3 by default) had in that behaviour **in the training part** (both directions). Without a
  behaviour column the relation is ``co_interaction``.

The co-interaction relation follows SSLRec's preprocessing of Retailrocket for its knowledge-aware
multi-behaviour models: per behaviour, the item-item matrix ``XᵀX`` of the binary user-item matrix
``X`` counts the users who had both items, and pairs with a count above 3 become triples. Two
differences: SSLRec builds ``X`` from its training matrices, which here is the training part of
the split (the held-out targets never create a relation), and SSLRec's matrix keeps its diagonal
(an item related to itself whenever more than 3 users had it), which we drop. Building it costs
the sum over users of the squared number of items they had in a behaviour (items had by at most
N users are left out first: they cannot be in a pair).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from recforge.data.schema import BEHAVIOR, ITEM, USER
from recforge.errors import DataError

#: the relation of :func:`category_relations`
BELONGS_TO = "belongs_to"
#: co-interaction pairs need more than this many shared users by default (SSLRec's Retailrocket rule)
CO_MIN_USERS = 3
_FRAGMENT = {"head": pl.Int32, "relation": pl.Utf8, "tail_item": pl.Int32, "kind": pl.Utf8, "tail_entity": pl.Utf8}


@dataclass
class Knowledge:
    """Triples over items (nodes ``1..n_items``) and entities (nodes ``n_items + 1 ..``).

    ``triples``: ``head`` (Int32 item index), ``relation`` (Utf8), ``tail`` (Int64 node);
    ``entities``: ``node`` (Int64), ``kind`` (``category``, ``entity``, ...) and ``raw`` (the
    entity's name in its source), in node order; ``sources``: what each source gave and dropped.
    """

    triples: pl.DataFrame
    entities: pl.DataFrame
    n_items: int
    sources: list[dict] = field(default_factory=list)

    @property
    def n_entities(self) -> int:
        return self.entities.height

    @property
    def n_nodes(self) -> int:
        """Nodes including padding: ``n_items + 1 + n_entities``."""
        return self.n_items + 1 + self.n_entities

    def relations(self) -> dict[str, int]:
        """Triples per relation, in name order."""
        counts = self.triples.group_by("relation").len().sort("relation")
        return {r: int(n) for r, n in counts.iter_rows()}

    def adjacency(self, relations: list[str] | str | None = None) -> sp.csr_matrix:
        """Binary head → tail matrix (``n_nodes`` × ``n_nodes``) of the given relations (all by default)."""
        t = self.triples
        if relations is not None:
            t = t.filter(pl.col("relation").is_in([relations] if isinstance(relations, str) else list(relations)))
        h, tl = t["head"].to_numpy().astype(np.int64), t["tail"].to_numpy()
        m = sp.csr_matrix((np.ones(len(h), dtype=np.float32), (h, tl)), shape=(self.n_nodes, self.n_nodes))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    def describe(self) -> dict:
        """What ``metrics.json`` records: sources, triples per relation, number of entities."""
        return {"sources": self.sources, "relations": self.relations(), "entities": self.n_entities}


# ---- fragments: triples with their tails still as items or named entities ----------------------
def _fragment(head, relation, tail_item=None, kind=None, tail_entity=None) -> pl.DataFrame:
    n = len(head)
    cols = {"head": head, "relation": relation, "tail_item": tail_item if tail_item is not None else [None] * n,
            "kind": kind if kind is not None else [None] * n,
            "tail_entity": tail_entity if tail_entity is not None else [None] * n}
    return pl.DataFrame(cols, schema=_FRAGMENT)


def assemble(fragments: list[pl.DataFrame], n_items: int, sources: list[dict]) -> Knowledge:
    """One :class:`Knowledge` from fragments: entities (by kind and name, sorted) get nodes
    after the items; duplicate triples are dropped."""
    frags = [f.select(list(_FRAGMENT)).cast(_FRAGMENT) for f in fragments]
    allf = pl.concat(frags) if frags else pl.DataFrame(schema=_FRAGMENT)
    entities = (allf.filter(pl.col("tail_entity").is_not_null()).select("kind", pl.col("tail_entity").alias("raw"))
                .unique().sort(["kind", "raw"]))
    entities = entities.with_columns(pl.int_range(n_items + 1, n_items + 1 + entities.height, dtype=pl.Int64)
                                     .alias("node")).select("node", "kind", "raw")
    named = allf.join(entities, left_on=["kind", "tail_entity"], right_on=["kind", "raw"], how="left",
                      maintain_order="left")
    triples = (named.select("head", "relation", pl.coalesce(pl.col("tail_item").cast(pl.Int64), "node").alias("tail"))
               .unique(maintain_order=True))
    return Knowledge(triples, entities, n_items, sources)


def _item_lookup(ds) -> pl.DataFrame:
    """Raw item id as text → encoded index, for joining raw ids read from a file."""
    return ds.item_map.select(pl.col("raw").cast(pl.Utf8).alias("_raw"), pl.col("idx").cast(pl.Int32))


# ---- text files of raw ids (triple files here, social-link files in recforge.data.social) -----
def field_lines(path: Path, separators: str) -> tuple[pl.DataFrame, bool]:
    """The non-empty lines of the text file ``path``: ``_line`` (1-based), ``_text`` and ``_f`` (the
    line's fields, stripped), split on tabs when the first line has one, else on runs matching the
    regular expression ``separators``; and whether they were split on tabs."""
    from recforge.data.readers import _decode

    lines = pl.DataFrame({"_text": _decode(path).splitlines()}, schema={"_text": pl.Utf8}).with_row_index(
        "_line", offset=1).filter(pl.col("_text").str.strip_chars() != "")
    tabbed = lines.height > 0 and "\t" in lines["_text"][0]
    text = pl.col("_text").str.strip_chars()
    fields = text.str.split("\t") if tabbed else text.str.replace_all(separators, " ").str.split(" ")
    return lines.with_columns(fields.list.eval(pl.element().str.strip_chars()).alias("_f")), tabbed


def drop_header(rows: pl.DataFrame, columns, known, has_header: bool | None) -> pl.DataFrame:
    """``rows`` without the first when it is a header line. ``has_header`` None detects one: none of
    the first row's ``columns`` holds a known id (``known``: the raw ids as text, imploded into one
    list) while every one of the second row's does (never with fewer than two rows)."""
    if has_header is None and rows.height >= 2:
        found = [pl.col(c).is_in(known) for c in columns]
        k = rows.head(2).select(pl.any_horizontal(found).alias("any"), pl.all_horizontal(found).alias("all"))
        has_header = not k["any"][0] and bool(k["all"][1])
    return rows.slice(1) if has_header else rows


# ---- a triple file ----------------------------------------------------------------------------
def _triple_lines(path: Path) -> pl.DataFrame:
    """``_line`` (1-based), ``h``, ``r``, ``t`` of every non-empty line: split on tabs when the
    first line has one, else on runs of spaces; a line without exactly three fields is an error."""
    lines, tabbed = field_lines(path, r"\s+")
    if lines.height == 0:
        raise DataError(f"{path}: no triples found; a knowledge file has 'head relation tail' lines")
    bad = lines.filter(pl.col("_f").list.len() != 3)
    if bad.height:
        r = bad.row(0, named=True)
        raise DataError(f"{path} line {r['_line']}: {len(r['_f'])} field(s) {r['_text'][:80]!r}; a knowledge "
                        f"file has 'head relation tail' lines ({'tab' if tabbed else 'space'}-separated)")
    return lines.select("_line", *(pl.col("_f").list.get(k).alias(c) for k, c in enumerate("hrt")))


def read_triples(path, ds, has_header: bool | None = None, tails: str = "auto") -> Knowledge:
    """Triples of a ``head relation tail`` file mapped onto the items of the dataset ``ds``.

    ``has_header``: None detects a header line (its head is not an item of ``ds`` while the
    next line's is). ``tails``: ``auto`` (a relation whose tails are all items of ``ds`` is an
    item-item relation, the tails of the others are entities), ``item`` (every tail must be an
    item; rows with an unknown tail are dropped and counted) or ``entity``. Rows whose head is
    not an item of ``ds`` are dropped and counted (``sources[0]["dropped_unknown_heads"]``).
    """
    if tails not in ("auto", "item", "entity"):
        raise DataError(f"read_triples: tails={tails!r}; use auto, item or entity")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{path}: no such file; data.knowledge takes a triple file, category or co-interaction")
    rows = _triple_lines(p)
    lookup = _item_lookup(ds)
    known = lookup["_raw"].implode()
    rows = drop_header(rows, ["h"], known, has_header)
    n_read = rows.height
    rows = rows.join(lookup.rename({"idx": "head"}), left_on="h", right_on="_raw", how="left", maintain_order="left")
    rows = rows.join(lookup.rename({"idx": "tail_item"}), left_on="t", right_on="_raw", how="left",
                     maintain_order="left")
    unknown_head = rows.filter(pl.col("head").is_null())
    rows = rows.filter(pl.col("head").is_not_null())
    if tails == "auto":
        item_rel = rows.group_by("r").agg(pl.col("tail_item").is_not_null().all().alias("_items"))
        rows = rows.join(item_rel, on="r", how="left", maintain_order="left")
    else:
        rows = rows.with_columns(pl.lit(tails == "item").alias("_items"))
    unknown_tail = rows.filter(pl.col("_items") & pl.col("tail_item").is_null())
    rows = rows.filter(~(pl.col("_items") & pl.col("tail_item").is_null()))
    is_item = pl.col("_items")
    frag = rows.select(
        "head", pl.col("r").alias("relation"),
        pl.when(is_item).then(pl.col("tail_item")).alias("tail_item"),
        pl.when(~is_item).then(pl.lit("entity")).alias("kind"),
        pl.when(~is_item).then(pl.col("t")).alias("tail_entity"))
    item_relations = sorted(frag.filter(pl.col("tail_item").is_not_null())["relation"].unique().to_list())
    source = {"source": str(path), "triples_read": n_read, "dropped_unknown_heads": unknown_head.height,
              "item_relations": item_relations}
    if unknown_tail.height:
        source["dropped_unknown_tails"] = unknown_tail.height
    if frag.height == 0:
        raise DataError(f"{path}: none of its {n_read:,} triples has a head that is an item of the data (heads are "
                        "raw item ids, e.g. " + ", ".join(ds.item_map["raw"].head(3).cast(pl.Utf8).to_list()) + ")")
    return assemble([frag], ds.n_items, [source])


# ---- builders from the data -------------------------------------------------------------------
def category_relations(ds, column: str = "category", relation: str = BELONGS_TO) -> Knowledge:
    """``(item, belongs_to, category)`` for every item with a value in the item table's
    ``column`` (for a log that carries the column on its rows and has no item table: the first
    value of each item). Category entities are named by their value (kind ``column``)."""
    items = ds.items if ds.items is not None and column in ds.items.columns else None
    if items is None and column in ds.interactions.columns:
        items = ds.interactions.select(ITEM, column).unique(subset=[ITEM], keep="first", maintain_order=True)
    if items is None:
        cols = [c for c in (ds.items.columns if ds.items is not None else []) if c != ITEM]
        raise DataError(f"data.knowledge=category: the data has no '{column}' column for items (item columns: "
                        f"{', '.join(cols) or 'none'}); give an item table with data.items=FILE, or name the column "
                        "with category:COLUMN")
    t = items.select(pl.col(ITEM).cast(pl.Int32), pl.col(column).cast(pl.Utf8)).filter(pl.col(column).is_not_null())
    frag = _fragment(t[ITEM], [relation] * t.height, kind=[column] * t.height, tail_entity=t[column])
    source = {"source": f"category:{column}", "items_with_value": t.height,
              "items_without_value": ds.n_items - t.height}
    return assemble([frag], ds.n_items, [source])


def co_interaction(train: pl.DataFrame, n_items: int, min_users: int = CO_MIN_USERS) -> Knowledge:
    """``(item, co_<behaviour>, other item)`` for the pairs of distinct items that more than
    ``min_users`` users had in one behaviour of ``train`` (the training part of a split, encoded
    ids), both directions; ``co_interaction`` when there is no behaviour column."""
    if train.height == 0:
        return assemble([], n_items, [{"source": "co-interaction", "min_users_exclusive": min_users}])
    n_users = int(train[USER].max()) + 1
    if BEHAVIOR in train.columns:
        groups = [(f"co_{b}", train.filter(pl.col(BEHAVIOR) == b))
                  for b in sorted(train[BEHAVIOR].drop_nulls().unique().to_list())]
    else:
        groups = [("co_interaction", train)]
    frags = []
    for name, rows in groups:
        # an item had by at most min_users users cannot share more than min_users of them: leave it out
        rows = rows.unique([USER, ITEM]).filter(pl.len().over(ITEM) > min_users)
        u, i = rows[USER].to_numpy().astype(np.int64), rows[ITEM].to_numpy().astype(np.int64)
        x = sp.csr_matrix((np.ones(len(u), dtype=np.int32), (u, i)), shape=(n_users, n_items + 1))
        x.sum_duplicates()
        x.data[:] = 1
        shared = (x.T @ x).tocoo()  # users who had both items
        keep = (shared.data > min_users) & (shared.row != shared.col)
        frags.append(_fragment(shared.row[keep].astype(np.int32), [name] * int(keep.sum()),
                               tail_item=shared.col[keep].astype(np.int32)))
    source = {"source": "co-interaction", "min_users_exclusive": min_users, "part": "train",
              "relations": [name for name, _ in groups]}
    return assemble(frags, n_items, [source])


def merge(parts: list[Knowledge]) -> Knowledge:
    """One :class:`Knowledge` from several over the same items (entities merged by kind and name)."""
    if not parts:
        raise ValueError("merge: nothing to merge")
    frags = []
    for k in parts:
        t = k.triples.join(k.entities, left_on="tail", right_on="node", how="left", maintain_order="left")
        frags.append(t.select("head", "relation",
                              pl.when(pl.col("kind").is_null()).then(pl.col("tail")).alias("tail_item"),
                              "kind", pl.col("raw").alias("tail_entity")))
    return assemble(frags, parts[0].n_items, [s for k in parts for s in k.sources])


# ---- data.knowledge ----------------------------------------------------------------------------
def parse_spec(spec) -> list[tuple[str, str | None]]:
    """``data.knowledge`` as (kind, argument) pairs: ``("category", "category")``,
    ``("co-interaction", "3")``, ``("file", PATH)``."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    out = []
    for raw in (str(s).strip() for s in items):
        if not raw:
            continue
        name, _, arg = raw.partition(":")
        if name == "category":
            out.append(("category", arg or "category"))
        elif name in ("co-interaction", "co_interaction", "cointeraction"):
            if arg and not arg.isdigit():
                raise DataError(f"data.knowledge={raw}: co-interaction:N takes a whole number of users (pairs shared "
                                "by more than N users are kept)")
            out.append(("co-interaction", arg or str(CO_MIN_USERS)))
        elif Path(raw).expanduser().is_file():
            out.append(("file", raw))
        else:
            raise DataError(f"data.knowledge: {raw!r} is neither a file nor a builder; give a 'head relation tail' "
                            "file, category[:COLUMN] or co-interaction[:N] (comma-separated for several)")
    if not out:
        raise DataError("data.knowledge is empty; give a triple file, category[:COLUMN] or co-interaction[:N]")
    return out


def build_knowledge(spec, ds, train: pl.DataFrame) -> Knowledge:
    """The relations ``data.knowledge`` asks for, over the items of ``ds``; co-interaction
    relations come from ``train`` (the training part of the split) only."""
    parts = []
    for kind, arg in parse_spec(spec):
        if kind == "category":
            parts.append(category_relations(ds, arg))
        elif kind == "co-interaction":
            parts.append(co_interaction(train, ds.n_items, int(arg)))
        else:
            parts.append(read_triples(arg, ds))
    return parts[0] if len(parts) == 1 else merge(parts)
