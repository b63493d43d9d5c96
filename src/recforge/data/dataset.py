"""An encoded dataset: dense ids, the maps back to raw ids, and the side tables."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from recforge.data.schema import ITEM, TIME, USER
from recforge.errors import DataError


@dataclass
class Dataset:
    """Interactions with dense ids.

    ``interactions`` is sorted by (user, timestamp), ties kept in source order; users are
    ``0..n_users-1`` and items ``1..n_items`` (``0`` is the padding index). ``user_map`` and
    ``item_map`` have columns ``raw`` (the source id, its own dtype) and ``idx`` (Int32).
    """

    interactions: pl.DataFrame
    user_map: pl.DataFrame
    item_map: pl.DataFrame
    items: pl.DataFrame | None = None
    users: pl.DataFrame | None = None
    name: str = "data"
    meta: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return self.user_map.height

    @property
    def n_items(self) -> int:
        return self.item_map.height

    # ---- raw <-> encoded ids -------------------------------------------------------------
    def _lookup(self, mapping: pl.DataFrame, raw: list) -> np.ndarray:
        dtype = mapping.schema["raw"]
        try:
            keys = pl.Series("raw", [str(r) for r in raw]).cast(dtype, strict=False)
        except Exception:  # pragma: no cover - defensive: cast should not raise with strict=False
            keys = pl.Series("raw", [None] * len(raw), dtype=dtype)
        joined = pl.DataFrame({"raw": keys}).with_row_index("_pos").join(mapping, on="raw", how="left")
        joined = joined.sort("_pos")
        return joined["idx"].fill_null(-1).to_numpy().astype(np.int64)

    def encode_users(self, raw: list) -> np.ndarray:
        """Raw user ids to indices; unknown ids map to -1."""
        return self._lookup(self.user_map, raw)

    def encode_items(self, raw: list) -> np.ndarray:
        """Raw item ids to indices; unknown ids map to -1."""
        return self._lookup(self.item_map, raw)

    def decode_items(self, idx) -> list:
        idx = np.asarray(idx).ravel()
        if len(idx) and (idx.min() < 1 or idx.max() > self.n_items):
            raise ValueError(f"item indices must lie in 1..{self.n_items} (0 is padding)")
        raws = self.item_map.sort("idx")["raw"].to_list()  # idx 1..n -> position idx-1
        return [raws[int(i) - 1] for i in idx]

    def decode_users(self, idx) -> list:
        raws = self.user_map.sort("idx")["raw"].to_list()
        return [raws[int(i)] for i in np.asarray(idx).ravel()]

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.interactions.write_parquet(path / "interactions.parquet")
        self.user_map.write_parquet(path / "user_map.parquet")
        self.item_map.write_parquet(path / "item_map.parquet")
        if self.items is not None:
            self.items.write_parquet(path / "items.parquet")
        if self.users is not None:
            self.users.write_parquet(path / "users.parquet")
        (path / "dataset.json").write_text(json.dumps({"name": self.name, "meta": self.meta}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Dataset":
        path = Path(path)
        if not (path / "dataset.json").exists():
            raise DataError(f"{path}: not a prepared dataset (no dataset.json); run 'recforge data prepare' first")
        info = json.loads((path / "dataset.json").read_text())
        opt = lambda n: pl.read_parquet(path / n) if (path / n).exists() else None  # noqa: E731
        return cls(
            interactions=pl.read_parquet(path / "interactions.parquet"),
            user_map=pl.read_parquet(path / "user_map.parquet"),
            item_map=pl.read_parquet(path / "item_map.parquet"),
            items=opt("items.parquet"),
            users=opt("users.parquet"),
            name=info.get("name", path.name),
            meta=info.get("meta", {}),
        )

    def item_popularity(self, interactions: pl.DataFrame | None = None) -> np.ndarray:
        """Interaction counts per item index (length n_items + 1, index 0 = padding = 0)."""
        df = self.interactions if interactions is None else interactions
        counts = np.zeros(self.n_items + 1, dtype=np.int64)
        vc = df.group_by(ITEM).len()
        counts[vc[ITEM].to_numpy()] = vc["len"].to_numpy()
        return counts

    def summary(self) -> dict:
        n = self.interactions.height
        return {
            "users": self.n_users,
            "items": self.n_items,
            "interactions": n,
            "density": n / max(1, self.n_users * self.n_items),
        }


def is_sorted_interactions(df: pl.DataFrame) -> bool:
    """Whether ``df`` is already sorted by (user, time) with no missing user or time (one
    streaming pass; ties in time cannot be told from source order, so they count as sorted)."""
    if df.height < 2:
        return True
    u, t = pl.col(USER), pl.col(TIME)
    prev_u, prev_t = u.shift(1), t.shift(1)
    ok = (u > prev_u) | ((u == prev_u) & (t >= prev_t))
    row = df.lazy().select(
        (u.null_count() + t.null_count()).alias("nulls"), ok.all().alias("ok")
    ).collect(engine="streaming").row(0)
    return row[0] == 0 and bool(row[1])


def sort_key(df: pl.DataFrame) -> pl.Expr | list[str]:
    """A stable sort key for (user, time): one packed Int64 ``(user - min) * span + (time -
    min)`` when both are integers without nulls and the product fits in 63 bits (several times
    faster to sort than two columns), else the two columns."""
    schema = df.schema
    if not (schema[USER].is_integer() and schema[TIME].is_integer()) or df.height == 0:
        return [USER, TIME]
    s = df.lazy().select(
        pl.col(USER).min().alias("u0"), pl.col(USER).max().alias("u1"),
        pl.col(TIME).min().alias("t0"), pl.col(TIME).max().alias("t1"),
        (pl.col(USER).null_count() + pl.col(TIME).null_count()).alias("nulls"),
    ).collect().row(0, named=True)
    if s["nulls"] or max(s["u1"], s["t1"]) > 2**63 - 1:
        return [USER, TIME]
    span = s["t1"] - s["t0"] + 1
    if (s["u1"] - s["u0"] + 1) * span > 2**63 - 1:
        return [USER, TIME]
    return (pl.col(USER).cast(pl.Int64) - s["u0"]) * span + (pl.col(TIME).cast(pl.Int64) - s["t0"])


def sort_interactions(df: pl.DataFrame) -> pl.DataFrame:
    """Sort by user then time, keeping the source order among equal timestamps (a frame that is
    already in that order is returned as it is)."""
    if is_sorted_interactions(df):
        return df
    return df.sort(sort_key(df), maintain_order=True)
