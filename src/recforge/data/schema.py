"""The canonical interaction schema shared by every reader and every later stage.

Interactions are a Polars DataFrame with these columns:

* ``user_id``, ``item_id``: raw ids as the source gives them (Int64 or Utf8) before encoding,
  dense ``Int32`` indices after it (users ``0..n_users-1``; items ``1..n_items``, ``0`` being the
  padding index of sequence views);
* ``timestamp``: ``Int64`` seconds, or the position in the user's sequence when the source has
  no time;
* optional ``behavior`` (Utf8, e.g. ``pv``/``cart``/``buy``), ``rating`` (Float64) and
  ``split`` (Utf8 ``train``/``valid``/``test``, only for sources that come pre-split);
* any other side columns, kept as they are.

Item and user side tables travel beside it, keyed by ``item_id`` / ``user_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from recforge.errors import DataError

USER = "user_id"
ITEM = "item_id"
TIME = "timestamp"
BEHAVIOR = "behavior"
RATING = "rating"
SPLIT = "split"
REQUIRED = (USER, ITEM, TIME)
PAD = 0  # item index reserved for padding


@dataclass
class RawData:
    """What a reader returns: canonical interactions with raw ids, plus optional side tables."""

    interactions: pl.DataFrame
    items: pl.DataFrame | None = None
    users: pl.DataFrame | None = None
    name: str = "data"
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_interactions(self.interactions, self.source or self.name)


def validate_interactions(df: pl.DataFrame, source: str = "input") -> None:
    """Check the canonical columns exist with usable types; raise one clear DataError if not."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)} (found: {', '.join(df.columns)}); "
            "map your columns with --user-col/--item-col/--time-col"
        )
    ts = df.schema[TIME]
    if not ts.is_integer():
        raise DataError(
            f"{source}: column 'timestamp' has type {ts}, expected integer seconds; "
            "convert it or point --time-col at a numeric column"
        )
