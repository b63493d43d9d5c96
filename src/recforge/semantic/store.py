"""The semantic item table and the vector cache behind it.

**Vector cache** (:class:`VectorCache`): vectors keyed by a hash of (encoder name, text), kept as
Parquet shards under ``$RECFORGE_CACHE/semantic/<encoder>/`` (default ``~/.cache/recforge``).
Asking for the vectors of a list of texts encodes only the texts whose key is not there yet and
writes them as one new shard (temporary file, then rename: a crash leaves no half shard); shards
are merged once there are more than :data:`MAX_SHARDS`. A second run over the same catalogue
therefore encodes nothing, and a catalogue where a few items changed encodes those few.

**Semantic item table** (:class:`SemanticTable`): one row per item of a dataset — the item index
``1..n_items``, the raw item id, the text, its cache key and its vector — as a dense matrix with
row ``i`` for item ``i`` (row 0, the padding index, is zero; items with an empty text get a zero
vector). ``recforge embed DATA --out FILE`` writes it as Parquet; models read it back
(``semantic_table=FILE``) or build it from the run's dataset.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from recforge.data.prepare import cache_dir
from recforge.errors import ConfigError, DataError
from recforge.semantic.encoder import ENCODE_BATCH, get_encoder
from recforge.semantic.text import DEFAULT_TEMPLATE, item_texts

MAX_SHARDS = 16


def cache_root() -> Path:
    """``$RECFORGE_CACHE/semantic`` (default ``~/.cache/recforge/semantic``)."""
    return cache_dir() / "semantic"


def text_key(encoder_name: str, text: str) -> str:
    """The cache key of a text for an encoder."""
    return hashlib.sha256(f"{encoder_name}\x00{text}".encode()).hexdigest()[:32]


class VectorCache:
    """Vectors by (encoder, text) on disk; see the module docstring."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_root()

    def folder(self, encoder_name: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.@+-]", "_", encoder_name)
        return self.root / safe

    def _shards(self, folder: Path) -> list[Path]:
        return sorted(folder.glob("shard-*.parquet")) if folder.exists() else []

    def load(self, encoder_name: str) -> dict[str, np.ndarray]:
        """Every cached vector of an encoder, by key."""
        out: dict[str, np.ndarray] = {}
        for shard in self._shards(self.folder(encoder_name)):
            try:
                df = pl.read_parquet(shard)
            except Exception:  # a damaged shard is skipped (its texts are encoded again)
                continue
            vecs = np.asarray(df["vector"].to_numpy(), dtype=np.float32)
            out.update(zip(df["key"].to_list(), vecs))
        return out

    def _write(self, folder: Path, keys: list[str], vecs: np.ndarray) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = folder / f".tmp-{name}"
        pl.DataFrame({"key": keys, "vector": vecs.astype(np.float32)},
                     schema={"key": pl.Utf8, "vector": pl.Array(pl.Float32, vecs.shape[1])}).write_parquet(tmp)
        tmp.rename(folder / name)

    def _compact(self, folder: Path) -> None:
        shards = self._shards(folder)
        if len(shards) <= MAX_SHARDS:
            return
        frames = []
        for s in shards:
            try:
                frames.append(pl.read_parquet(s))
            except Exception:
                pass
        merged = pl.concat(frames).unique("key", keep="first", maintain_order=True) if frames else None
        if merged is not None and merged.height:
            self._write(folder, merged["key"].to_list(), np.asarray(merged["vector"].to_numpy(), dtype=np.float32))
        for s in shards:
            s.unlink(missing_ok=True)

    def vectors(self, texts: list[str], encoder, progress: bool | None = None) -> tuple[np.ndarray, dict]:
        """``(len(texts), dim)`` vectors of ``texts`` (empty texts: zero vectors), encoding only
        the distinct texts not cached yet. Returns the vectors and counts ``{"texts", "cached",
        "encoded", "empty", "seconds"}``."""
        t0 = time.perf_counter()
        name = encoder.name
        keys = [text_key(name, t) for t in texts]
        have = self.load(name)
        missing: dict[str, str] = {}
        for k, t in zip(keys, texts):
            if t and k not in have and k not in missing:
                missing[k] = t
        if missing:
            new = encoder.encode(list(missing.values()), progress=progress)
            folder = self.folder(name)
            self._write(folder, list(missing), new)
            self._compact(folder)
            have.update(zip(missing, new))
        dim = next(iter(have.values())).shape[0] if have else int(encoder.dim)
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for r, (k, t) in enumerate(zip(keys, texts)):
            if t:
                out[r] = have[k]
        n_empty = sum(1 for t in texts if not t)
        stats = {"texts": len(texts), "encoded": len(missing), "empty": n_empty,
                 "cached": len(texts) - n_empty - sum(1 for k, t in zip(keys, texts) if t and k in missing),
                 "seconds": round(time.perf_counter() - t0, 3)}
        return out, stats


@dataclass
class SemanticTable:
    """Vectors of a dataset's items: ``vectors[i]`` is item index ``i`` (row 0 = padding = 0)."""

    vectors: np.ndarray
    raw_ids: list
    texts: list[str]
    keys: list[str]
    encoder: str
    template: str
    stats: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return self.vectors.shape[0] - 1

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def to_frame(self) -> pl.DataFrame:
        n = self.n_items
        return pl.DataFrame({
            "idx": np.arange(1, n + 1, dtype=np.int32),
            "item_id": [str(r) for r in self.raw_ids],
            "text": self.texts,
            "key": self.keys,
            "vector": self.vectors[1:].astype(np.float32),
        }, schema={"idx": pl.Int32, "item_id": pl.Utf8, "text": pl.Utf8, "key": pl.Utf8,
                   "vector": pl.Array(pl.Float32, self.dim)})

    def save(self, path: str | Path) -> Path:
        """Parquet with columns idx, item_id (raw, as text), text, key, vector; the encoder and
        template go to a ``.json`` sidecar next to it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        self.to_frame().write_parquet(tmp)
        tmp.rename(path)
        meta = {"encoder": self.encoder, "template": self.template, "n_items": self.n_items, "dim": self.dim,
                "stats": self.stats}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SemanticTable":
        path = Path(path).expanduser()
        if not path.exists():
            raise ConfigError(f"{path}: no semantic table; write one with 'recforge embed DATA --out {path}'")
        df = pl.read_parquet(path).sort("idx")
        n = df.height
        if n and (df["idx"].to_numpy() != np.arange(1, n + 1)).any():
            raise DataError(f"{path}: item indices are not 1..{n}; rewrite it with 'recforge embed'")
        vecs = np.asarray(df["vector"].to_numpy(), dtype=np.float32).reshape(n, -1)
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return cls(np.vstack([np.zeros((1, vecs.shape[1]), np.float32), vecs]), df["item_id"].to_list(),
                   df["text"].to_list(), df["key"].to_list(), meta.get("encoder", "unknown"),
                   meta.get("template", ""), meta.get("stats", {}))

    def check_matches(self, ds) -> None:
        """Raise when the table was made for another encoding of the items than ``ds``'s."""
        raws = [str(r) for r in ds.item_map.sort("idx")["raw"].to_list()]
        if len(raws) != self.n_items or raws != [str(r) for r in self.raw_ids]:
            raise DataError(f"the semantic table ({self.n_items} items) does not match dataset {ds.name} "
                            f"({len(raws)} items, or other ids); rewrite it with 'recforge embed' on the same data")

    def check_tags_held_out(self, ds) -> None:
        """Raise when the table's item texts carry user tags that ``ds`` no longer has: ``recforge
        embed`` reads the unsplit data, so a table made with the ``{tags}`` field holds the tags
        users put on their own validation and test items, which a split dataset has dropped
        (:func:`recforge.data.tags.drop_held_out_item_tags`). Only reader-built tags are checked."""
        from recforge.semantic.text import item_texts

        meta = getattr(ds, "meta", None)
        if not isinstance(meta, dict) or not meta.get("item_tags_file") or "{tags}" not in (self.template or ""):
            return
        now = item_texts(ds, self.template)
        differ = sum(a != b for a, b in zip(self.texts, now))
        if differ:
            raise DataError(f"the semantic table's item texts differ from this split's on {differ} items: it was "
                            "written from every user's tags, including the tags users gave to their own held-out "
                            "items, which would leak the test items into the text vectors. Leave semantic_table "
                            "unset (the run encodes its own text from the training tags), or write the table "
                            "without tags: recforge embed DATA --template \"{title}. Genres: {genres}\"")


def semantic_table(ds, encoder=None, template: str | None = None, cache: VectorCache | None = None,
                   progress: bool | None = None, batch_size: int = ENCODE_BATCH, quantize: bool = False,
                   backend: str = "torch") -> SemanticTable:
    """The semantic item table of dataset ``ds`` (vectors from the cache, new texts encoded).

    ``encoder``: an encoder object, None (the packaged MiniLM), ``"hashing[:DIM]"`` or a model folder;
    ``backend``: ``"torch"`` or ``"onnx"`` for a model encoder (see :class:`~recforge.semantic.encoder.TextEncoder`).
    """
    enc = get_encoder(encoder, batch_size=batch_size, quantize=quantize, backend=backend)
    texts = item_texts(ds, template)
    cache = cache or VectorCache()
    vecs, stats = cache.vectors(texts, enc, progress=progress)
    raws = ds.item_map.sort("idx")["raw"].to_list()
    keys = [text_key(enc.name, t) if t else "" for t in texts]
    full = np.vstack([np.zeros((1, vecs.shape[1]), np.float32), vecs])
    return SemanticTable(full, raws, texts, keys, enc.name, DEFAULT_TEMPLATE if template is None else template, stats)


def embed(data_cfg: dict, out: str | Path | None = None, template: str | None = None, encoder=None,
          batch_size: int = ENCODE_BATCH, quantize: bool = False, progress: bool = True, backend: str = "torch") -> dict:
    """``recforge embed``: load the data a config names, build its semantic table, write it.

    Returns a summary (items, encoded now, taken from the cache, seconds, output path)."""
    from recforge.pipeline import dataset_label, load_dataset

    ds = load_dataset(data_cfg)
    t0 = time.perf_counter()
    table = semantic_table(ds, encoder, template, progress=progress, batch_size=batch_size, quantize=quantize,
                           backend=backend)
    seconds = time.perf_counter() - t0
    path = Path(out) if out else Path(f"{dataset_label(data_cfg.get('path'))}.semantic.parquet")
    table.save(path)
    s = table.stats
    return {"items": table.n_items, "dim": table.dim, "encoder": table.encoder, "encoded": s.get("encoded", 0),
            "cached": s.get("cached", 0), "empty": s.get("empty", 0), "seconds": round(seconds, 2),
            "items_per_second": round(s.get("encoded", 0) / seconds, 1) if s.get("encoded") else None,
            "out": str(path)}
