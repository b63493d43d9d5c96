"""User-user links (trust, friendship, follow) for social recommenders.

A :class:`Social` holds the links between the dataset's users as a binary SciPy CSR matrix
``matrix`` (``n_users`` × ``n_users``, encoded user indices; ``matrix[a, b] = 1``: ``a`` links to
``b``) and a ``record`` dict of what was read and dropped, written into ``metrics.json``'s
``protocol`` notes by the models that use it.

Sources (``data.social``):

* a file: ``user user`` lines, tab- or space-separated (further fields, e.g. a weight, are
  ignored), raw user ids as in the interaction data, an optional header line (detected: its two
  fields are not users of the data while the next line's are);
* ``auto``: the first of ``trustnetwork.txt``, ``social.txt`` or ``trust.txt`` found beside the
  interaction files of the dataset's source folder (the readers that know the folder record it in
  ``Dataset.meta``: ``trust_network`` for LightGCN's Last.fm folder, ``source`` otherwise).

A ``:directed`` suffix (``data.social=auto:directed``, ``PATH:directed``) keeps every link in the
direction the file gives it. Without it (the default) the links are undirected: ``a b`` also links
``b`` to ``a``, as friendship data (LastFM's, Yelp's) are meant; a file that lists both directions
(LastFM's ``trustnetwork.txt`` does) gives the same matrix either way, while trust or follow data
(Douban, Epinions) keep their one-way links only with ``:directed``. Links whose users are not in
the dataset (unknown ids, or users removed by filtering) are dropped and counted, self-links are
dropped and counted, and repeated links are counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from recforge.data.knowledge import drop_header, field_lines
from recforge.errors import DataError

#: file names ``data.social=auto`` looks for beside the interaction files, in this order
AUTO_NAMES = ("trustnetwork.txt", "social.txt", "trust.txt")
DIRECTED_SUFFIX = ":directed"


@dataclass
class Social:
    """Binary user → user links (``n_users`` × ``n_users`` CSR) and what reading them recorded."""

    matrix: sp.csr_matrix
    record: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return self.matrix.shape[0]

    @property
    def n_links(self) -> int:
        """Stored links (an undirected link counts twice, once per direction)."""
        return int(self.matrix.nnz)

    def describe(self) -> dict:
        return dict(self.record)


def _user_lookup(ds) -> pl.DataFrame:
    """Raw user id as text → encoded index."""
    return ds.user_map.select(pl.col("raw").cast(pl.Utf8).alias("_raw"), pl.col("idx").cast(pl.Int64))


def _pair_lines(path: Path) -> pl.DataFrame:
    """``_line`` (1-based), ``a``, ``b`` of every non-empty line: split on tabs when the first line
    has one, else on runs of spaces or commas; a line with fewer than two fields is an error."""
    lines, tabbed = field_lines(path, r"[\s,]+")
    if lines.height == 0:
        raise DataError(f"{path}: no links found; a social file has 'user user' lines")
    bad = lines.filter(pl.col("_f").list.len() < 2)
    if bad.height:
        r = bad.row(0, named=True)
        raise DataError(f"{path} line {r['_line']}: {r['_text'][:80]!r} has one field; a social file has "
                        f"'user user' lines ({'tab' if tabbed else 'space'}-separated)")
    return lines.select("_line", pl.col("_f").list.get(0).alias("a"), pl.col("_f").list.get(1).alias("b"))


def read_social(path, ds, directed: bool = False, has_header: bool | None = None) -> Social:
    """The links of a ``user user`` file between users of the dataset ``ds``.

    ``has_header``: None detects a header line (neither of its fields is a user of ``ds`` while
    both of the next line's are). ``directed``: keep each link's direction (False: undirected,
    both directions stored)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{path}: no such file; data.social takes a 'user user' file or auto")
    rows = _pair_lines(p)
    lookup = _user_lookup(ds)
    known = lookup["_raw"].implode()
    rows = drop_header(rows, ["a", "b"], known, has_header)
    n_read = rows.height
    rows = rows.join(lookup.rename({"idx": "u"}), left_on="a", right_on="_raw", how="left", maintain_order="left")
    rows = rows.join(lookup.rename({"idx": "v"}), left_on="b", right_on="_raw", how="left", maintain_order="left")
    unknown = rows.filter(pl.col("u").is_null() | pl.col("v").is_null()).height
    rows = rows.filter(pl.col("u").is_not_null() & pl.col("v").is_not_null())
    self_links = rows.filter(pl.col("u") == pl.col("v")).height
    rows = rows.filter(pl.col("u") != pl.col("v"))
    pairs = rows.select("u", "v").unique()
    u, v = pairs["u"].to_numpy().astype(np.int64), pairs["v"].to_numpy().astype(np.int64)
    n = ds.n_users
    m = sp.csr_matrix((np.ones(len(u), dtype=np.float32), (u, v)), shape=(n, n))
    reciprocal = int(m.multiply(m.T).nnz)  # directed links whose reverse is in the file too
    if not directed:
        m = m.maximum(m.T).tocsr()
    m.sum_duplicates()
    m.data[:] = 1.0
    m.sort_indices()
    if m.nnz == 0:
        raise DataError(f"{path}: none of its {n_read:,} links joins two users of the data (users are raw ids as in "
                        "the interactions, e.g. " + ", ".join(ds.user_map["raw"].head(3).cast(pl.Utf8).to_list())
                        + ")")
    record = {"source": str(path), "links_read": n_read, "kept": len(u), "dropped": unknown + self_links,
              "dropped_unknown_users": unknown, "dropped_self_links": self_links,
              "duplicates": rows.height - len(u), "reciprocal_in_file": reciprocal,
              "directed": bool(directed), "stored_links": int(m.nnz),
              "users_with_links": int((np.diff(m.indptr) > 0).sum())}
    return Social(m.astype(np.float32), record)


def source_folders(ds, source=None) -> list[Path]:
    """Folders that may hold the social file of ``ds``: ``source`` (a file's folder or a folder),
    then what the readers recorded in ``ds.meta`` (``trust_network``, ``source``, ``path``)."""
    out: list[Path] = []
    meta = getattr(ds, "meta", None) or {}
    for cand in (source, meta.get("trust_network"), meta.get("source"), meta.get("path")):
        if not cand:
            continue
        p = Path(str(cand)).expanduser()
        folder = p if p.is_dir() else p.parent
        if folder.is_dir() and folder not in out:
            out.append(folder)
    return out


def find_social_file(ds, source=None) -> Path:
    """The first of :data:`AUTO_NAMES` beside the interaction files of ``ds``; a DataError naming
    the accepted names (and where it looked) when there is none."""
    folders = source_folders(ds, source)
    for folder in folders:
        for name in AUTO_NAMES:
            if (folder / name).is_file():
                return folder / name
    where = ", ".join(str(f) for f in folders) if folders else "the data's source folder is not known"
    raise DataError(f"data.social=auto: no {', '.join(AUTO_NAMES[:-1])} or {AUTO_NAMES[-1]} beside the interaction "
                    f"files ({where}); give the file of user-user links instead: data.social=PATH")


def parse_spec(spec) -> tuple[str, bool]:
    """``data.social`` as (``auto`` or a path, directed)."""
    text = str(spec).strip()
    directed = text.endswith(DIRECTED_SUFFIX)
    if directed:
        text = text[: -len(DIRECTED_SUFFIX)].strip()
    if not text:
        raise DataError("data.social is empty; give a 'user user' file or auto (optionally with :directed)")
    return text, directed


def build_social(spec, ds, directed: bool | None = None, source=None) -> Social:
    """The user-user links ``data.social`` asks for: a file path or ``auto`` (see the module
    docstring), ``:directed`` to keep the file's directions. ``directed`` (when not None)
    overrides the suffix; ``source``: the data's source (file or folder) for ``auto`` when
    ``ds.meta`` does not record it."""
    text, suffix_directed = parse_spec(spec)
    directed = suffix_directed if directed is None else bool(directed)
    path = find_social_file(ds, source) if text.lower() == "auto" else Path(text).expanduser()
    social = read_social(path, ds, directed=directed)
    if text.lower() == "auto":
        social.record["found_by"] = "auto"
    return social
