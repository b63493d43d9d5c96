"""Feature specs and encoders for labelled feature rows (the CTR task).

A :class:`Schema` names the label column(s) and the features of a table; each
:class:`FeatureSpec` has a kind:

* ``categorical``: one value per row, mapped to an id of its vocabulary;
* ``numeric``: a float, normalised (``standard``, ``minmax``, ``log`` or ``none``) after clipping to
  the training range, or cut into ``buckets`` quantile buckets learnt on the training part (it then
  becomes an id like a categorical value);
* ``multi``: an unordered set of values (a string split by ``splitter``, or a list column), padded
  to ``max_len`` ids (the first ``max_len`` values are kept);
* ``sequence``: an ordered behaviour sequence, oldest first, padded to ``max_len`` ids (the most
  recent ``max_len`` values are kept).

Ids: 0 is padding, 1 is out-of-vocabulary (a value unseen in the training part, rarer than
``min_count`` there, or, for a bucketed numeric field, missing), known values start at 2 in
decreasing training frequency. A missing categorical value is the value ``""`` and is counted like
any other. A field may ``share`` the vocabulary (and the model's embedding table) of another field,
e.g. a clicked-items sequence and the candidate item: its vocabulary is built on the values of all
the fields sharing it, and its ``dim``/``min_count`` are those of the field it shares with.

:class:`FeatureEncoder` is fitted on the training part only and then applied unchanged to
validation, test and serving rows; it is saved with the run (``encoders.json`` and
``vocab.parquet``). :meth:`FeatureEncoder.transform` raises one :class:`DataError` for a missing
column and maps unseen values to the out-of-vocabulary id, counting them per field
(``EncodedTable.unseen``), or raises with ``unseen="error"``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recforge.errors import ConfigError, DataError

KINDS = ("categorical", "numeric", "multi", "sequence")
NORMS = ("standard", "minmax", "log", "none")
PAD, OOV = 0, 1
DEFAULT_MAX_LEN = 50  # cap of the length of multi/sequence fields when max_len is not given
ENCODER_VERSION = 1


@dataclass
class FeatureSpec:
    """One input field. ``dim``: its embedding size (None: the model's ``embedding_dim``)."""

    name: str
    kind: str = "categorical"
    dim: int | None = None
    min_count: int = 1
    max_len: int | None = None
    splitter: str = "^"
    share: str | None = None
    norm: str = "standard"
    buckets: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"feature {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.norm not in NORMS:
            raise ConfigError(f"feature {self.name!r}: norm {self.norm!r} is not one of {', '.join(NORMS)}")
        if self.share and self.kind == "numeric":
            raise ConfigError(f"feature {self.name!r}: a numeric field cannot share an embedding table")
        if self.buckets is not None and (self.kind != "numeric" or int(self.buckets) < 2):
            raise ConfigError(f"feature {self.name!r}: buckets needs a numeric field and at least 2 buckets")
        if int(self.min_count) < 1:
            raise ConfigError(f"feature {self.name!r}: min_count must be at least 1")

    @property
    def embedded(self) -> bool:
        """Whether the field is looked up in an embedding table (every kind but plain numeric)."""
        return self.kind != "numeric" or self.buckets is not None

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"feature {d.get('name')!r}: unknown key(s) {', '.join(unknown)}; "
                              f"valid: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class Schema:
    """Features, label column(s) and the roles of two columns: ``user`` groups rows for group
    AUC and per-user tests; ``time`` orders rows for the temporal split. Neither needs to be a
    feature. ``text``: columns whose raw values ride with the encoded rows
    (``EncodedTable.text``) for models that read a row as text; they may be features too."""

    features: list[FeatureSpec]
    labels: list[str]
    user: str | None = None
    time: str | None = None
    text: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.labels:
            raise ConfigError("no label column: name one (data.label=NAME, or label_col in the feature spec)")
        if not self.features:
            raise ConfigError("no feature: declare at least one (data.categorical=..., data.numeric=..., "
                              "or feature_cols in the feature spec)")
        names = [f.name for f in self.features]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"feature(s) declared twice: {', '.join(dup)}")
        clash = sorted(set(names) & set(self.labels))
        if clash:
            raise ConfigError(f"column(s) {', '.join(clash)} declared both as a label and as a feature")
        by = {f.name: f for f in self.features}
        for f in self.features:
            if f.share is not None:
                if f.share not in by:
                    raise ConfigError(f"feature {f.name!r} shares the embedding of {f.share!r}, which is not a feature")
                if by[f.share].share is not None:
                    raise ConfigError(f"feature {f.name!r} shares with {f.share!r}, which itself shares with "
                                      f"{by[f.share].share!r}: name the field that owns the table")
                if not by[f.share].embedded:
                    raise ConfigError(f"feature {f.name!r} shares with {f.share!r}, a numeric field")

    def table_of(self, spec: FeatureSpec) -> str:
        """The embedding table (the name of the field that owns it) a field uses."""
        return spec.share or spec.name

    def columns(self) -> list[str]:
        return [f.name for f in self.features]

    def as_dict(self) -> dict:
        return {"features": [{k: v for k, v in asdict(f).items() if v is not None} for f in self.features],
                "labels": list(self.labels), "user": self.user, "time": self.time, "text": list(self.text)}

    @classmethod
    def from_dict(cls, d: dict) -> "Schema":
        return cls([FeatureSpec.from_dict(f) for f in d["features"]], list(d["labels"]), d.get("user"), d.get("time"),
                   list(d.get("text") or []))


@dataclass
class EncodedTable:
    """Encoded rows: ``x`` maps each field to an array (int64 ids ``(n,)`` or ``(n, max_len)``,
    float32 values for numeric fields), ``y`` the labels ``(n, n_labels)`` (None at serving),
    ``groups`` the raw user key of each row (strings) when the schema has a user column, and
    ``unseen`` per field the number of values mapped to the out-of-vocabulary id although they
    were present (with up to five examples), ``text`` the raw values (strings, ``""`` when missing)
    of the schema's text columns that the rows held."""

    x: dict[str, np.ndarray]
    y: np.ndarray | None
    groups: np.ndarray | None = None
    unseen: dict = field(default_factory=dict)
    text: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.x.values())))

    def batch(self, idx) -> dict[str, torch.Tensor]:
        """The rows ``idx`` as a dict of tensors (``label`` holds the labels, when known)."""
        out = {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in self.x.items()}
        if self.y is not None:
            out["label"] = torch.from_numpy(np.ascontiguousarray(self.y[idx]))
        return out

    def subset(self, idx) -> "EncodedTable":
        return EncodedTable({k: v[idx] for k, v in self.x.items()}, None if self.y is None else self.y[idx],
                            None if self.groups is None else self.groups[idx], dict(self.unseen),
                            {k: v[idx] for k, v in self.text.items()})


# ---- labels --------------------------------------------------------------------------------------
def label_array(df: pl.DataFrame, labels: list[str], source: str = "the data") -> np.ndarray:
    """The label columns as float32 ``(n, n_labels)`` of 0/1; a missing, incomplete or non-binary
    label column is a DataError naming it."""
    out = np.empty((df.height, len(labels)), dtype=np.float32)
    for j, name in enumerate(labels):
        if name not in df.columns:
            raise DataError(f"label column {name!r} is not in {source} (columns: {', '.join(df.columns[:30])}); "
                            "name the label with data.label=COLUMN or label_col in the feature spec")
        s = df[name]
        if s.dtype == pl.Boolean:
            s = s.cast(pl.Int8)
        if s.dtype == pl.Utf8:
            s = s.str.strip_chars().cast(pl.Float64, strict=False)  # text that is not a number: null
        if not s.dtype.is_numeric():
            raise DataError(f"label column {name!r} of {source} is of type {s.dtype}, not 0/1")
        v = s.cast(pl.Float64).fill_null(float("nan")).to_numpy()
        bad = ~np.isin(v, (0.0, 1.0))
        if bad.any():
            vals = sorted({str(x) for x in v[bad][:1000]})[:5]
            raise DataError(f"label column {name!r} of {source} is not binary: {int(bad.sum())} row(s) hold values "
                            f"other than 0 and 1 (e.g. {', '.join(vals)}); binarise it first (missing labels "
                            "count as non-binary)")
        out[:, j] = v
    return out


# ---- encoder -------------------------------------------------------------------------------------
def _as_text(s: pl.Series) -> pl.Series:
    """Categorical values as strings; integral floats lose their ``.0`` (3.0 and 3 are one value)."""
    if s.dtype.is_float():
        v = s.to_numpy()
        fin = np.isfinite(v)
        if fin.all() and np.all(v == np.round(v)):
            s = s.cast(pl.Int64)
    return s.cast(pl.Utf8).fill_null("")


def _tokens(s: pl.Series, splitter: str) -> pl.Series:
    """A list[str] series of the values of a multi-valued column (empty tokens dropped)."""
    if isinstance(s.dtype, pl.List):
        lists = s.cast(pl.List(pl.Utf8))
    else:
        lists = s.cast(pl.Utf8).str.split(splitter)
    return lists.fill_null([]).list.eval(pl.element().filter(pl.element().is_not_null() & (pl.element() != "")))


class FeatureEncoder:
    """Fitted on the training part only; see the module docstring."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.vocab: dict[str, dict[str, int]] = {}  # table -> value -> id
        self.counts: dict[str, dict[str, int]] = {}
        self.numeric: dict[str, dict] = {}  # field -> stats (mean, std, min, max) or bucket edges
        self.max_len: dict[str, int] = {}
        self.fitted = False

    # ---- fit -------------------------------------------------------------------------------------
    def fit(self, df: pl.DataFrame, source: str = "the training part") -> "FeatureEncoder":
        self.check_columns(df, source, labels=True)
        label_array(df, self.schema.labels, source)  # a non-binary label is reported before any work
        by_table: dict[str, list[FeatureSpec]] = {}
        for f in self.schema.features:
            if f.kind == "numeric":
                self.numeric[f.name] = self._fit_numeric(df[f.name], f)
                continue
            by_table.setdefault(self.schema.table_of(f), []).append(f)
            if f.kind in ("multi", "sequence"):
                lens = _tokens(df[f.name], f.splitter).list.len()
                longest = int(lens.max() or 0) if len(lens) else 0
                self.max_len[f.name] = int(f.max_len) if f.max_len else max(1, min(longest, DEFAULT_MAX_LEN))
        for table, members in by_table.items():
            owner = next(f for f in self.schema.features if f.name == table)
            parts = []
            for f in members:
                if f.kind == "categorical":
                    parts.append(_as_text(df[f.name]))
                else:
                    parts.append(_tokens(df[f.name], f.splitter).explode().drop_nulls())
            values = pl.concat([p.rename("value") for p in parts]) if parts else pl.Series("value", [], pl.Utf8)
            vc = (values.value_counts(name="count").filter(pl.col("count") >= int(owner.min_count))
                  .sort(["count", "value"], descending=[True, False]))
            self.vocab[table] = dict(zip(vc["value"].to_list(), range(2, vc.height + 2)))
            self.counts[table] = dict(zip(vc["value"].to_list(), vc["count"].to_list()))
        self.fitted = True
        return self

    @staticmethod
    def _fit_numeric(s: pl.Series, f: FeatureSpec) -> dict:
        v = s.cast(pl.Float64, strict=False).to_numpy().astype(np.float64)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            return {"mean": 0.0, "std": 1.0, "min": 0.0, "max": 0.0, "edges": []}
        stats = {"mean": float(v.mean()), "std": float(v.std()) or 1.0, "min": float(v.min()), "max": float(v.max())}
        if f.norm == "log":
            lv = np.sign(v) * np.log1p(np.abs(v))
            stats.update(log_mean=float(lv.mean()), log_std=float(lv.std()) or 1.0)
        if f.buckets is not None:
            qs = np.quantile(v, np.linspace(0, 1, int(f.buckets) + 1)[1:-1])
            stats["edges"] = [float(e) for e in np.unique(qs)]
        return stats

    # ---- transform -------------------------------------------------------------------------------
    def check_columns(self, df: pl.DataFrame, source: str, labels: bool) -> None:
        """One DataError naming every declared column that ``df`` lacks."""
        need = self.schema.columns() + (list(self.schema.labels) if labels else [])
        missing = [c for c in need if c not in df.columns]
        if missing:
            what = "label column" if set(missing) <= set(self.schema.labels) else "column"
            raise DataError(f"{what}(s) {', '.join(repr(c) for c in missing)} named in the feature spec "
                            f"{'are' if len(missing) > 1 else 'is'} not in {source} "
                            f"(columns: {', '.join(df.columns[:30])}{' ...' if df.width > 30 else ''}); "
                            "fix the spec or the file")

    def transform(self, df: pl.DataFrame, source: str = "the data", labels: bool = True,
                  unseen: str = "oov") -> EncodedTable:
        """Encode ``df`` (labels too unless ``labels=False``). ``unseen``: ``oov`` maps values
        unseen in training to id 1 and counts them in ``EncodedTable.unseen``; ``error`` raises a
        DataError naming the field and examples."""
        if not self.fitted:
            raise DataError("the feature encoder is not fitted: fit it on the training part first")
        if unseen not in ("oov", "error"):
            raise ConfigError(f"unseen={unseen!r}: choose oov or error")
        self.check_columns(df, source, labels=labels)
        x, report = {}, {}
        for f in self.schema.features:
            if f.kind == "numeric":
                x[f.name] = self._numeric(df[f.name], f)
                continue
            vocab = self.vocab[self.schema.table_of(f)]
            if f.kind == "categorical":
                text = _as_text(df[f.name])
                ids = text.replace_strict(vocab, default=OOV, return_dtype=pl.Int64).to_numpy()
                miss = (ids == OOV) & (text != "").to_numpy()
                x[f.name] = ids.astype(np.int64)
                examples = text.filter(pl.Series(miss)) if miss.any() else None
            else:
                x[f.name], miss, examples = self._padded(df[f.name], f, vocab)
            n_unseen = int(miss.sum())
            if n_unseen:
                ex = examples.unique(maintain_order=True).head(5).to_list()
                report[f.name] = {"count": n_unseen, "examples": ex}
        if report and unseen == "error":
            parts = [f"{k}: {v['count']} value(s), e.g. {', '.join(map(repr, v['examples']))}" for k, v in report.items()]
            raise DataError(f"values never seen in training in {source} ({'; '.join(parts)}); they would be scored "
                            "as out-of-vocabulary (id 1): pass unseen='oov' to accept that")
        y = label_array(df, self.schema.labels, source) if labels else None
        groups = None
        if self.schema.user is not None and self.schema.user in df.columns:
            groups = _as_text(df[self.schema.user]).to_numpy().astype(object)
        text = {}
        for c in (c for c in self.schema.text if c in df.columns):
            s = df[c].cast(pl.List(pl.Utf8)).list.join(", ") if isinstance(df[c].dtype, pl.List) else df[c]
            text[c] = _as_text(s).to_numpy().astype(object)
        return EncodedTable(x, y, groups, report, text)

    def _numeric(self, s: pl.Series, f: FeatureSpec) -> np.ndarray:
        st = self.numeric[f.name]
        v = s.cast(pl.Float64, strict=False).to_numpy().astype(np.float64)
        bad = ~np.isfinite(v)
        if f.buckets is not None:
            ids = np.searchsorted(np.asarray(st["edges"], dtype=np.float64), v, side="right") + 2
            ids[bad] = OOV
            return ids.astype(np.int64)
        v = np.where(bad, st["mean"], np.clip(v, st["min"], st["max"]))
        if f.norm == "standard":
            v = (v - st["mean"]) / st["std"]
        elif f.norm == "minmax":
            span = st["max"] - st["min"]
            v = (v - st["min"]) / span if span > 0 else np.zeros_like(v)
        elif f.norm == "log":
            v = (np.sign(v) * np.log1p(np.abs(v)) - st["log_mean"]) / st["log_std"]
        return v.astype(np.float32)

    def _padded(self, s: pl.Series, f: FeatureSpec, vocab: dict) -> tuple[np.ndarray, np.ndarray, pl.Series]:
        L = self.max_len[f.name]
        lists = _tokens(s, f.splitter)
        lens = lists.list.len().to_numpy().astype(np.int64)
        flat = lists.explode().drop_nulls()
        ids = flat.replace_strict(vocab, default=OOV, return_dtype=pl.Int64).to_numpy()
        miss = ids == OOV
        n = len(lens)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        row = np.repeat(np.arange(n), lens)
        pos = np.arange(len(ids)) - np.repeat(starts, lens)
        rlen = np.repeat(lens, lens)
        keep = pos >= rlen - L if f.kind == "sequence" else pos < L  # sequences keep the most recent values
        kept = np.minimum(lens, L)
        first = pos - np.maximum(rlen - L, 0) if f.kind == "sequence" else pos
        col = L - np.repeat(kept, lens) + first  # left-padded, oldest kept value first
        out = np.zeros((n, L), dtype=np.int64)
        out[row[keep], col[keep]] = ids[keep]
        return out, miss, flat.filter(pl.Series(miss))

    # ---- what models need ------------------------------------------------------------------------
    def layout(self) -> list[dict]:
        """Per field: ``name``, ``kind`` (``categorical``/``multi``/``sequence`` looked up in
        ``table`` of ``vocab`` rows, or ``numeric``), ``dim`` (None: the model's default),
        ``max_len``."""
        out = []
        for f in self.schema.features:
            if f.kind == "numeric" and f.buckets is None:
                out.append({"name": f.name, "kind": "numeric", "dim": f.dim, "table": None, "vocab": 0, "max_len": 0})
                continue
            table = self.schema.table_of(f)
            owner = next(g for g in self.schema.features if g.name == table)
            if f.kind == "numeric":  # bucketed
                vocab = len(self.numeric[f.name]["edges"]) + 3
                kind = "categorical"
            else:
                vocab = len(self.vocab[table]) + 2
                kind = f.kind
            out.append({"name": f.name, "kind": kind, "dim": owner.dim, "table": table, "vocab": vocab,
                        "max_len": self.max_len.get(f.name, 0)})
        return out

    def describe(self) -> dict:
        return {"features": {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in self.layout()},
                "labels": list(self.schema.labels), "user": self.schema.user}

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """``encoders.json`` (schema, numeric statistics, lengths) and ``vocab.parquet``
        (``table``, ``value``, ``id``, ``count``) in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"version": ENCODER_VERSION, "schema": self.schema.as_dict(), "numeric": self.numeric,
                "max_len": self.max_len}
        (folder / "encoders.json").write_text(json.dumps(meta, indent=2))
        rows = [(t, v, i, self.counts[t][v]) for t, voc in self.vocab.items() for v, i in voc.items()]
        pl.DataFrame(rows, schema={"table": pl.Utf8, "value": pl.Utf8, "id": pl.Int64, "count": pl.Int64},
                     orient="row").write_parquet(folder / "vocab.parquet")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "FeatureEncoder":
        folder = Path(folder)
        path = folder / "encoders.json"
        if not path.exists():
            raise DataError(f"{folder}: no encoders.json; give the encoders folder of a CTR run")
        meta = json.loads(path.read_text())
        if meta.get("version") != ENCODER_VERSION:
            raise DataError(f"{path}: encoders of another version ({meta.get('version')})")
        enc = cls(Schema.from_dict(meta["schema"]))
        enc.numeric, enc.max_len = meta["numeric"], {k: int(v) for k, v in meta["max_len"].items()}
        vocab = pl.read_parquet(folder / "vocab.parquet")
        tables = {enc.schema.table_of(f) for f in enc.schema.features if f.embedded and f.kind != "numeric"}
        for t in tables:
            part = vocab.filter(pl.col("table") == t).sort("id")
            enc.vocab[t] = dict(zip(part["value"].to_list(), part["id"].to_list()))
            enc.counts[t] = dict(zip(part["value"].to_list(), part["count"].to_list()))
        enc.fitted = True
        return enc
