"""Labelled feature rows for the CTR task: readers, rows derived from interaction logs, splits.

Sources (``data.format``, detected when unset):

* ``libsvm``: libFM/libSVM text, ``label idx:val ...`` per line (a file, or a folder of
  ``*.libfm``/``*.libsvm``/``*.svm`` files). Labels ``1``/``-1`` (or ``1``/``0``) become 1/0.
  Fields are recovered from the index ranges: when every row has the same number of entries and
  the indices at each position occupy disjoint, increasing ranges (one one-hot field per
  position, as in Frappe and Criteo/Avazu exports), each position is a field whose value is its
  index (categorical), or its value when the position always holds the same index (numeric).
  Field names come from ``data.fields``, from a known layout (Frappe), or are ``f0``, ``f1`` ...
* ``table``: CSV/TSV/Parquet with a declared schema: ``data.schema=FILE`` (the YAML format below)
  or the lists ``data.label``, ``data.categorical``, ``data.numeric``, ``data.multi``,
  ``data.sequence``. A folder with ``train``/``valid``/``test`` files gives the parts.
* ``fuxictr``: a FuxiCTR-style dataset YAML (``feature_cols``, ``label_col``, ``train_data``,
  ``valid_data``, ``test_data``, ``min_categr_count``; one dataset, or several keyed by id with
  ``data.dataset_id``), read as it is. Our own schema files use the same keys, plus ``type:
  multi`` (unordered multi-valued field), ``buckets``, ``user_col`` and ``time_col``.
* ``interactions``: anything the ranking readers read (MovieLens, the Taobao log, tables of
  user/item/time). Every interaction becomes a positive row and ``data.negatives`` negatives per
  positive are drawn uniformly (seeded) from the items the user never interacted with in the
  whole log and, by default (``data.negatives_from=existing``), that already existed at the
  positive's time (first interacted with, by anyone, at or before it). With ``all`` they come
  from the whole catalogue, future items included: under a temporal split the items that first
  appear in the test period then occur in training only as negatives, and a model learns that
  new items are never clicked (on the Taobao sample every model fell below AUC .5 so). Negatives
  share the positive's user, time and behaviour history (``hist_items``: the user's previous
  ``data.history_len`` items in time order, sharing the item embedding). With explicit ratings,
  ``data.label_threshold=R`` derives no negatives: every rated interaction is one row, labelled 1
  when its rating is at least ``R`` (MovieLens with ``R=4``: the "a rating of 4 or 5 is a click"
  setting of the CTR papers on it), with the same user, time and history. The item table's
  low-cardinality columns are features (genres multi-valued); ``data.user_features=true`` adds the
  user table's (MovieLens-100K: age, gender, occupation; a column with more distinct values than
  half the users, such as the zip code, is left out).

Text: ``data.text`` names columns whose raw values ride with every encoded row
(``EncodedTable.text``) for models that read a row as text (``flip``, ``clickprompt``); features
may be among them. For rows derived from a log a name may also be a column of the item or the user
table, joined to each row (``data.text=user_id,age,gender,occupation,item_id,title,genres``).

Splits (``split.method``): ``presplit`` (the given train/valid/test files), ``random``
(``split.ratios``, default 7:2:1, ``split.seed``, independent of the run's seed), ``temporal``
(by the time column: ``split.valid_quantile``/``split.test_quantile``, default 0.7/0.9, or
``valid_cutoff``/``test_cutoff``). ``auto``: ``presplit`` when a training file is given, else
``temporal`` for rows derived from a log, else ``random``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from recforge.data.features import FeatureSpec, Schema
from recforge.errors import ConfigError, DataError

log = logging.getLogger("recforge.data")

LIBSVM_SUFFIXES = (".libfm", ".libsvm", ".svm")
TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")
#: field names of known libFM exports, matched by the file name's first dot-separated part
KNOWN_FIELDS = {
    "frappe": ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"],
}
USER_NAMES = ("user", "user_id", "userid", "uid")
PARTS = ("train", "valid", "test")
CTR_SPLITS = ("auto", "presplit", "random", "temporal")
CTR_SPLIT_OPTIONS = {"presplit": set(), "random": {"ratios", "seed"},
                     "temporal": {"valid_quantile", "test_quantile", "valid_cutoff", "test_cutoff"}}


@dataclass
class CTRSource:
    """Raw rows: ``parts`` is ``{"all": df}`` or the given ``train``/``valid``/``test`` frames."""

    parts: dict[str, pl.DataFrame]
    schema: Schema
    kind: str
    notes: dict = field(default_factory=dict)


# ---- libFM / libSVM ------------------------------------------------------------------------------
def _libsvm_lines(path: Path) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    text = path.read_text(encoding="utf-8", errors="replace").split("\n")
    labels, idx, val = [], [], []
    for n, line in enumerate(text, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tok = line.split()
        try:
            labels.append(float(tok[0]))
            pairs = [t.split(":", 1) for t in tok[1:]]
            idx.append(np.array([int(p[0]) for p in pairs], dtype=np.int64))
            val.append(np.array([float(p[1]) if len(p) > 1 else 1.0 for p in pairs], dtype=np.float64))
        except (ValueError, IndexError):
            raise DataError(f"{path}:{n}: not a libSVM line (label idx:val ...): {line[:80]!r}") from None
    return np.asarray(labels), idx, val


def _libsvm_label(y: np.ndarray, path: Path) -> np.ndarray:
    vals = set(np.unique(y).tolist())
    if vals <= {-1.0, 1.0} or vals <= {0.0, 1.0}:
        return (y > 0).astype(np.int8)
    raise DataError(f"{path}: labels must be 1/-1 or 1/0 for CTR; found {sorted(vals)[:6]}")


def read_libsvm(paths: list[Path], names: list[str] | None = None) -> tuple[dict[Path, pl.DataFrame], list[FeatureSpec], dict]:
    """The rows of each file (one frame per file, same columns) and their fields."""
    loaded = {p: _libsvm_lines(p) for p in paths}
    widths = {len(i) for _, idx, _ in loaded.values() for i in idx}
    all_idx = [i for _, idx, _ in loaded.values() for i in idx]
    all_val = [v for _, _, val in loaded.values() for v in val]
    if not all_idx:
        raise DataError(f"{', '.join(map(str, paths))}: no rows")
    note = {}
    if len(widths) == 1:
        w = widths.pop()
        I, V = np.stack(all_idx), np.stack(all_val)
        lo, hi = I.min(0), I.max(0)
        fielded = bool(np.all(hi[:-1] < lo[1:])) if w > 1 else True
    else:
        fielded = False
    if not fielded:
        raise DataError(f"{paths[0]}: the fields cannot be recovered from the feature indices (rows of different "
                        "lengths, or index ranges that overlap); convert it to a table with a schema")
    if names is None:
        stem = paths[0].name.split(".")[0].lower()
        names = KNOWN_FIELDS.get(stem) if len(KNOWN_FIELDS.get(stem, [])) == w else None
    if names is None:
        names = [f"f{j}" for j in range(w)]
    if len(names) != w:
        raise ConfigError(f"data.fields names {len(names)} fields but the rows have {w}")
    specs, numeric = [], []
    for j in range(w):
        single = lo[j] == hi[j]
        if single and not np.all(V[:, j] == V[0, j]):
            numeric.append(j)
            specs.append(FeatureSpec(names[j], "numeric"))
        else:
            if not np.all(V[:, j] == 1.0):
                raise DataError(f"{paths[0]}: field {j} holds several indices with values other than 1; "
                                "convert it to a table with a schema")
            specs.append(FeatureSpec(names[j], "categorical"))
    note["fields"] = f"{w} fields recovered from the index ranges of libSVM rows ({', '.join(names)})"
    frames = {}
    for p, (y, idx, val) in loaded.items():
        Ip, Vp = np.stack(idx), np.stack(val)
        cols = {"label": _libsvm_label(y, p)}
        for j, nm in enumerate(names):
            cols[nm] = Vp[:, j] if j in numeric else Ip[:, j].astype(str)
        frames[p] = pl.DataFrame(cols)
    return frames, specs, note


def _part_of(name: str) -> str | None:
    n = name.lower()
    if re.search(r"(^|[^a-z])(train|training)([^a-z]|$)", n):
        return "train"
    if re.search(r"(^|[^a-z])(valid|validation|val|dev)([^a-z]|$)", n):
        return "valid"
    if re.search(r"(^|[^a-z])test([^a-z]|$)", n):
        return "test"
    return None


def _parts_from_files(frames: dict[Path, pl.DataFrame]) -> tuple[dict[str, pl.DataFrame], dict]:
    """``train``/``valid``/``test`` frames when a training file is among them, else ``all``."""
    by_part = {}
    for p in frames:
        part = _part_of(p.name)
        if part is not None and part not in by_part:
            by_part[part] = p
    names = ", ".join(f"{p.name} ({frames[p].height:,} rows)" for p in frames)
    if "train" in by_part and "test" in by_part and len(by_part) == len(frames):
        return {k: frames[v] for k, v in by_part.items()}, {"files": names}
    note = {"files": names}
    if len(frames) > 1:
        note["pooled"] = (f"no training file among {len(frames)} files: their rows are pooled "
                          f"({sum(f.height for f in frames.values()):,}) and split by split.method")
    return {"all": pl.concat(list(frames.values()))}, note


# ---- tables ----------------------------------------------------------------------------------------
def read_frame(path: Path, sep: str | None = None) -> pl.DataFrame:
    """A CSV/TSV (every column read as text; the encoders parse numbers) or Parquet file."""
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pl.read_parquet(path)
        sep = sep or ("\t" if path.suffix.lower() == ".tsv" else ",")
        return pl.read_csv(path, separator=sep, infer_schema=False)
    except (pl.exceptions.PolarsError, OSError, TypeError) as exc:
        raise DataError(f"{path}: cannot read it as a table ({str(exc).splitlines()[0][:200]})") from None


def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()]
    return list(v)


def schema_from_config(d: dict) -> Schema:
    """The schema given by ``data.label`` / ``data.categorical`` / ``data.numeric`` /
    ``data.multi`` / ``data.sequence`` (lists or comma-separated names)."""
    kw = {"min_count": int(d.get("min_count") or 1)}
    specs = [FeatureSpec(n, "categorical", **kw) for n in _as_list(d.get("categorical"))]
    specs += [FeatureSpec(n, "numeric") for n in _as_list(d.get("numeric"))]
    for kind in ("multi", "sequence"):
        specs += [FeatureSpec(n, kind, max_len=d.get("max_len"), splitter=d.get("splitter") or "^", **kw)
                  for n in _as_list(d.get(kind))]
    return Schema(specs, _as_list(d.get("label")), d.get("user_col"), d.get("time_col"), _as_list(d.get("text")))


_FUXI_NORMS = {None: "none", "none": "none", "standardscaler": "standard", "minmaxscaler": "minmax",
               "standard": "standard", "minmax": "minmax", "log": "log"}
_FUXI_IGNORED = {"active", "dtype", "padding", "encoder", "source", "na_value", "feature_encoder", "remap",
                 "fill_na", "emb_output_dim"}


def schema_from_spec(spec: dict, data_cfg: dict, where: str) -> tuple[Schema, dict]:
    """A schema from a FuxiCTR-style dataset spec (``feature_cols``, ``label_col``); notes on the
    keys that have no effect here."""
    if "feature_cols" not in spec or "label_col" not in spec:
        raise DataError(f"{where}: a feature spec needs feature_cols and label_col")
    default_min = int(spec.get("min_categr_count") or data_cfg.get("min_count") or 1)
    specs, ignored, skipped = [], set(), []
    user = data_cfg.get("user_col") or spec.get("user_col") or spec.get("group_id")
    for entry in spec["feature_cols"]:
        if not isinstance(entry, dict) or "name" not in entry:
            raise DataError(f"{where}: every feature_cols entry needs a name ({entry!r})")
        names = entry["name"] if isinstance(entry["name"], list) else [entry["name"]]
        if entry.get("active", True) is False:
            skipped += names
            continue
        kind = str(entry.get("type", "categorical")).lower()
        if kind == "meta":
            skipped += names
            continue
        if kind not in ("categorical", "numeric", "sequence", "multi"):
            raise DataError(f"{where}: feature {names[0]!r} has type {kind!r}; use categorical, numeric, sequence or multi")
        extra = set(entry) - {"name", "type", "min_categr_count", "min_count", "embedding_dim", "max_len", "splitter",
                              "share_embedding", "normalizer", "buckets", "norm"}
        for k in extra:
            if k in ("pretrained_emb", "preprocess", "embedding_callback"):
                raise DataError(f"{where}: feature {names[0]!r} uses {k}={entry[k]!r}, which is not supported; "
                                "remove it (or precompute the column)")
            ignored.add(k)
        norm = entry.get("norm") or _FUXI_NORMS.get(str(entry.get("normalizer")).lower()
                                                    if entry.get("normalizer") else None, None)
        if kind == "numeric" and norm is None:
            raise DataError(f"{where}: feature {names[0]!r}: unknown normalizer {entry.get('normalizer')!r}")
        for n in names:
            kw = {"dim": entry.get("embedding_dim")}
            if kind == "numeric":
                specs.append(FeatureSpec(n, "numeric", norm=norm, buckets=entry.get("buckets"), **kw))
            else:
                specs.append(FeatureSpec(n, kind, min_count=int(entry.get("min_categr_count", entry.get("min_count",
                                         default_min))), max_len=entry.get("max_len"),
                                         splitter=entry.get("splitter") or "^", share=entry.get("share_embedding"),
                                         **kw))
    labels = spec["label_col"] if isinstance(spec["label_col"], list) else [spec["label_col"]]
    label_names = [lab["name"] if isinstance(lab, dict) else str(lab) for lab in labels]
    notes = {}
    if ignored - _FUXI_IGNORED:
        notes["ignored_keys"] = sorted(ignored - _FUXI_IGNORED)
    if skipped:
        notes["inactive_or_meta_columns"] = skipped
    time_col = data_cfg.get("time_col") or spec.get("time_col")
    return Schema(specs, label_names, user, time_col, _as_list(data_cfg.get("text"))), notes


def _find_file(ref: str, base: Path) -> Path:
    """A data file named in a spec: relative to the spec's folder, then to the working folder,
    then by its name in the spec's folder."""
    tried = [base / ref, Path(ref), base / Path(ref).name]
    for p in tried:
        if p.exists():
            return p
    raise DataError(f"data file {ref!r} named in the feature spec is not found (tried: "
                    f"{', '.join(str(t) for t in tried)})")


def read_fuxictr(path: Path, data_cfg: dict) -> CTRSource:
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: not a feature spec (expected a mapping with feature_cols and label_col)")
    if "feature_cols" in doc:
        spec, did = doc, None
    else:
        ids = [k for k, v in doc.items() if isinstance(v, dict) and "feature_cols" in v]
        did = data_cfg.get("dataset_id")
        if did is None and len(ids) == 1:
            did = ids[0]
        if did not in ids:
            raise DataError(f"{path}: choose a dataset with data.dataset_id=ID (one of: {', '.join(ids) or 'none'})")
        spec = doc[did]
    schema, notes = schema_from_spec(spec, data_cfg, str(path))
    fmt = str(spec.get("data_format", "csv")).lower()
    if fmt not in ("csv", "parquet"):
        raise DataError(f"{path}: data_format {fmt!r} is not supported; convert the data to csv or parquet")
    frames = {}
    for part, key in zip(PARTS, ("train_data", "valid_data", "test_data")):
        if spec.get(key):
            frames[part] = read_frame(_find_file(str(spec[key]), path.parent), data_cfg.get("sep"))
    if "train" not in frames:
        raise DataError(f"{path}: the spec names no train_data")
    notes["spec"] = f"{path.name}{f' [{did}]' if did else ''}"
    notes["files"] = ", ".join(f"{k}: {spec[key]} ({frames[k].height:,} rows)"
                               for k, key in zip(PARTS, ("train_data", "valid_data", "test_data")) if k in frames)
    parts = frames if "test" in frames else {"all": pl.concat(list(frames.values()), how="diagonal_relaxed")}
    return CTRSource(parts, schema, "fuxictr", notes)


def read_table_source(path: Path, data_cfg: dict) -> CTRSource:
    if data_cfg.get("schema"):
        spath = Path(str(data_cfg["schema"]))
        if not spath.is_file():
            raise DataError(f"data.schema={spath}: no such file; give a feature spec YAML (feature_cols, label_col)")
        doc = yaml.safe_load(spath.read_text()) or {}
        if isinstance(doc, dict) and "feature_cols" not in doc and data_cfg.get("dataset_id") in doc:
            doc = doc[data_cfg["dataset_id"]]
        schema, notes = schema_from_spec(doc, data_cfg, str(spath))
        notes["spec"] = spath.name
    else:
        schema, notes = schema_from_config(data_cfg), {}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TABLE_SUFFIXES and _part_of(p.name))
        if not files:
            raise DataError(f"{path}: no train/valid/test table files in this folder")
        parts, note = _parts_from_files({p: read_frame(p, data_cfg.get("sep")) for p in files})
    else:
        frame = read_frame(path, data_cfg.get("sep"))
        parts, note = {"all": frame}, {"files": f"{path.name} ({frame.height:,} rows)"}
    notes.update(note)
    return CTRSource(parts, schema, "table", notes)


# ---- rows derived from an interaction log -----------------------------------------------------------
NEGATIVES_FROM = ("existing", "all")


def existing_negatives(seen, users: np.ndarray, times: np.ndarray, items: np.ndarray, n: int, n_items: int,
                       rng: np.random.Generator, max_rounds: int = 50) -> tuple[np.ndarray, int]:
    """``n`` negatives per row ``(users[r], times[r])``, uniform over the items first interacted with
    (by anyone, per ``items``/``times`` of the whole log) at or before ``times[r]`` that the user
    never interacted with. Rows for which that set is empty or exhausted by rejection keep draws
    from the whole catalogue (:func:`sample_negatives`); their number is returned with the draws."""
    from recforge.training.samplers import sample_negatives

    first = np.full(n_items + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, items, times)
    order = np.argsort(first[1:], kind="stable") + 1  # item ids by first appearance
    first_sorted = first[order]
    rows = np.repeat(np.asarray(users, dtype=np.int64), n)
    avail = np.repeat(np.searchsorted(first_sorted, times, side="right"), n)  # items existing at the row's time
    flat = np.zeros(len(rows), dtype=np.int64)
    todo = np.flatnonzero(avail > 0)
    for _ in range(max_rounds):
        if len(todo) == 0:
            break
        flat[todo] = order[(rng.random(len(todo)) * avail[todo]).astype(np.int64)]
        todo = todo[seen.contains(rows[todo], flat[todo])]
    left = np.union1d(np.flatnonzero(avail == 0), todo)
    if len(left):
        flat[left] = sample_negatives(seen, rows[left], 1, n_items, rng).ravel()
    return flat.reshape(len(users), n), int(len(left))


def _side_features(table: pl.DataFrame, key: str, skip, n_keys: int, specs: list) -> list[str]:
    """The columns of a side table (items or users) that become features, their specs appended to
    ``specs``: ``|``-joined strings as multi-valued fields, columns with at most half as many values
    as ``n_keys`` as categorical fields; ids, near-unique columns (titles) and ``skip`` are left out."""
    out = []
    for c in table.columns:
        if c == key or c in skip:
            continue
        s = table[c]
        if s.dtype == pl.Utf8 and s.str.contains("|", literal=True).any():
            specs.append(FeatureSpec(c, "multi", splitter="|"))
        elif s.n_unique() <= max(2, n_keys // 2):
            specs.append(FeatureSpec(c))
        else:
            continue
        out.append(c)
    return out


def rows_from_interactions(ds, negatives: int = 4, seed: int = 0, history_len: int = 20,
                           negatives_from: str = "existing", label_threshold: float | None = None,
                           user_features: bool = False, text=None) -> CTRSource:
    """Positive rows (every interaction of ``ds``) and ``negatives`` sampled negatives per positive
    (``negatives_from``: ``existing`` items at the positive's time, or ``all``), or, with
    ``label_threshold``, one row per rated interaction labelled by its rating; ``user_features``
    joins the user table's columns as features, ``text`` names columns carried as raw text
    (module docstring)."""
    from recforge.data.schema import ITEM, RATING, TIME, USER
    from recforge.data.split import interactions_to_csr
    from recforge.training.samplers import SeenPairs, sample_negatives

    if label_threshold is None and negatives < 1:
        raise ConfigError(f"data.negatives={negatives}: rows derived from a log need at least 1 negative per positive")
    if negatives_from not in NEGATIVES_FROM:
        raise ConfigError(f"data.negatives_from={negatives_from!r}: choose existing (items that existed at the "
                          "positive's time) or all (the whole catalogue)")
    inter = ds.interactions
    users = inter[USER].to_numpy().astype(np.int64)
    items = inter[ITEM].to_numpy().astype(np.int64)
    times = inter[TIME].to_numpy().astype(np.int64)
    n, H = len(users), int(history_len)
    # previous H items of the same user (rows are sorted by user, then time)
    start = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    first = np.repeat(start, np.diff(np.r_[start, n]))
    hist = np.zeros((n, H), dtype=np.int64)
    for lag in range(1, H + 1):
        ok = np.arange(n) - lag >= first
        hist[ok, H - lag] = items[np.flatnonzero(ok) - lag]
    if label_threshold is not None:  # explicit feedback: the rated rows themselves, labelled by their rating
        if RATING not in inter.columns:
            raise DataError(f"{ds.name}: data.label_threshold={label_threshold} labels rows by their rating, and the "
                            "data has no rating column; map it with data.rating_col=NAME, or drop data.label_threshold "
                            "to derive rows with sampled negatives")
        rating = inter[RATING].cast(pl.Float64).to_numpy()
        if np.isnan(rating).any():
            raise DataError(f"{ds.name}: {int(np.isnan(rating).sum())} interaction(s) have no rating, which "
                            f"data.label_threshold={label_threshold} needs; drop them or drop data.label_threshold")
        k, fallback = 1, 0
        rows_u, rows_i = users, items
        label = (rating >= float(label_threshold)).astype(np.int8)
    else:
        seen = SeenPairs(interactions_to_csr(inter, ds.n_users, ds.n_items))
        rng = np.random.default_rng(seed)
        if negatives_from == "existing":
            neg, fallback = existing_negatives(seen, users, times, items, negatives, ds.n_items, rng)  # (n, negatives)
        else:
            neg, fallback = sample_negatives(seen, users, negatives, ds.n_items, rng), 0
        k = negatives + 1
        rows_u = np.repeat(users, k)
        rows_i = np.column_stack([items, neg]).reshape(-1)
        label = np.tile(np.r_[1, np.zeros(negatives, dtype=np.int64)], n).astype(np.int8)
    raw_items = ds.item_map.sort("idx")["raw"].cast(pl.Utf8).to_numpy()
    raw_users = ds.user_map.sort("idx")["raw"].cast(pl.Utf8).to_numpy()
    item_raw = np.r_[np.array([""], dtype=object), raw_items.astype(object)].astype(str)
    # histories as list[str] per positive (null: no history), repeated for its negatives
    filled = hist > 0  # left-padded: each row's items are contiguous, oldest first
    per_pos = (pl.DataFrame({"r": np.repeat(np.arange(n), filled.sum(1)), "hist_items": item_raw[hist[filled]]})
               .group_by("r", maintain_order=True).agg("hist_items"))
    hist_list = (pl.DataFrame({"r": np.arange(n)}).join(per_pos, on="r", how="left", maintain_order="left")
                 ["hist_items"].gather(np.repeat(np.arange(n), k)))
    df = pl.DataFrame({"label": label, "user_id": raw_users[rows_u], "item_id": item_raw[rows_i],
                       "timestamp": np.repeat(times, k)}).with_columns(hist_list)
    specs = [FeatureSpec("user_id"), FeatureSpec("item_id")]
    side = []
    if ds.items is not None:
        it = ds.items.with_columns(pl.col(ITEM).cast(pl.Int64))
        side = _side_features(it, ITEM, (), ds.n_items, specs)
        if side:
            idx = pl.DataFrame({ITEM: rows_i})
            df = df.with_columns(idx.join(it.select(ITEM, *side), on=ITEM, how="left", maintain_order="left")
                                 .select(side))
    user_side = []
    us = ds.users.with_columns(pl.col(USER).cast(pl.Int64)) if ds.users is not None else None
    if user_features:
        if us is None:
            raise DataError(f"{ds.name}: data.user_features=true joins the user table's columns, and this data has "
                            "no user table; drop data.user_features")
        user_side = _side_features(us, USER, df.columns, ds.n_users, specs)
    text = _as_list(text)
    item_cols = [] if ds.items is None else [c for c in ds.items.columns if c != ITEM]
    user_cols = [] if us is None else [c for c in us.columns if c != USER]
    from_items = [c for c in text if c not in df.columns and c not in user_side and c in item_cols]
    from_users = [c for c in text if c not in df.columns and c not in from_items and c not in user_side
                  and c in user_cols]
    unknown = [c for c in text if c not in df.columns and c not in from_items and c not in from_users
               and c not in user_side]
    if unknown:
        raise DataError(f"data.text names {', '.join(map(repr, unknown))}, not a column of the rows, the item table or "
                        f"the user table (rows: {', '.join(df.columns)}; items: {', '.join(item_cols) or 'none'}; "
                        f"users: {', '.join(user_cols) or 'none'}); fix data.text")
    if from_items:
        it = ds.items.with_columns(pl.col(ITEM).cast(pl.Int64))
        df = df.with_columns(pl.DataFrame({ITEM: rows_i}).join(it.select(ITEM, *from_items), on=ITEM, how="left",
                                                                 maintain_order="left").select(from_items))
    if user_side or from_users:
        cols = [*user_side, *from_users]
        df = df.with_columns(pl.DataFrame({USER: rows_u}).join(us.select(USER, *cols), on=USER, how="left",
                                                                maintain_order="left").select(cols))
    specs.append(FeatureSpec("hist_items", "sequence", max_len=H, share="item_id"))
    if label_threshold is not None:
        pos = int(label.sum())
        notes = {"derived": (f"every rated interaction is a row, labelled 1 when its rating is >= {label_threshold:g} "
                             f"(explicit feedback; no negatives are drawn, data.negatives is not used), with the "
                             "row's user, time and history"),
                 "rows": f"{n:,} rated interactions: {pos:,} positives + {n - pos:,} negatives"}
    else:
        pool = ("that already existed at the positive's time (first interacted with at or before it)"
                + (f"; {fallback:,} draws with no such item left came from the whole catalogue" if fallback else "")
                if negatives_from == "existing" else "of the whole catalogue (future items included)")
        notes = {"derived": (f"every interaction is a positive; {negatives} negatives per positive drawn uniformly "
                             f"(seed {seed}) from the items the user never interacted with in the whole log and "
                             f"{pool}, with the positive's user, time and history"),
                 "rows": f"{n:,} positives + {n * negatives:,} negatives"}
    notes["history"] = f"hist_items: the user's previous {H} items in time order (shares item_id's embedding)"
    if side:
        notes["item_features"] = ", ".join(side)
    if user_side:
        notes["user_features"] = ", ".join(user_side)
    if text:
        notes["text"] = f"raw values carried with each row for models that read text: {', '.join(text)}"
    return CTRSource({"all": df}, Schema(specs, ["label"], "user_id", "timestamp", text), "interactions", notes)


# ---- detection -------------------------------------------------------------------------------------
def _libsvm_files(p: Path) -> list[Path]:
    if p.is_file():
        return [p] if p.suffix.lower() in LIBSVM_SUFFIXES else []
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix.lower() in LIBSVM_SUFFIXES)
    return []


def detect_ctr_format(path: Path, data_cfg: dict) -> str:
    fmt = data_cfg.get("format")
    if fmt in ("libsvm", "table", "fuxictr", "interactions"):
        return fmt
    if fmt not in (None, "auto"):
        return "interactions"  # a ranking reader name: rows are derived from the log
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return "fuxictr"
    if _libsvm_files(path):
        return "libsvm"
    if data_cfg.get("schema") or data_cfg.get("label"):
        return "table"
    return "interactions"


def load_source(data_cfg: dict) -> CTRSource:
    """The raw rows a CTR config names (see the module docstring). The user column (group AUC,
    per-user tests) is ``data.user_col``, the spec's, or a feature named user, user_id, userid or uid."""
    src = _load_source(data_cfg)
    if src.schema.user is None:
        src.schema.user = next((f.name for f in src.schema.features if f.name.lower() in USER_NAMES), None)
    return src


def _load_source(data_cfg: dict) -> CTRSource:
    from recforge.data.download import resolve_dataset

    if not data_cfg.get("path"):
        raise ConfigError("no data given; pass --data PATH (a libSVM file or folder, a table with data.schema or "
                          "data.label, a feature spec YAML, or an interaction log)")
    name = str(data_cfg["path"])
    path = Path(name) if name == "synthetic" or name.startswith("synthetic:") else resolve_dataset(name)
    kind = detect_ctr_format(path, data_cfg)
    if kind == "fuxictr":
        return read_fuxictr(path, data_cfg)
    if kind == "table":
        return read_table_source(path, data_cfg)
    if kind == "libsvm":
        files = _libsvm_files(path)
        if not files:
            raise DataError(f"{path}: no libSVM file (*.libfm, *.libsvm, *.svm)")
        names = _as_list(data_cfg.get("fields")) or None
        frames, specs, note = read_libsvm(files, names)
        mc = int(data_cfg.get("min_count") or 1)
        specs = [FeatureSpec(s.name, s.kind, min_count=mc) if s.kind == "categorical" else s for s in specs]
        parts, pnote = _parts_from_files(frames)
        return CTRSource(parts, Schema(specs, ["label"], data_cfg.get("user_col"), data_cfg.get("time_col")),
                         "libsvm", {**note, **pnote})
    from recforge.pipeline import load_dataset

    ds = load_dataset(data_cfg)
    if data_cfg.get("label_threshold") is not None and data_cfg.get("rating_threshold") is not None:
        raise ConfigError(f"data.label_threshold={data_cfg['label_threshold']} labels rows by their rating and "
                          f"data.rating_threshold={data_cfg['rating_threshold']} drops the rows below a rating, which "
                          "would leave no negatives: drop data.rating_threshold")
    threshold = data_cfg.get("label_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise ConfigError(f"data.label_threshold={threshold!r}: give a rating (a row is a click when its rating is at "
                          "least this), e.g. 4")
    return rows_from_interactions(ds, int(data_cfg.get("negatives") or 4), seed=int(data_cfg.get("negatives_seed") or 0),
                                  history_len=int(data_cfg.get("history_len") or 20),
                                  negatives_from=str(data_cfg.get("negatives_from") or "existing"),
                                  label_threshold=threshold, user_features=bool(data_cfg.get("user_features")),
                                  text=data_cfg.get("text"))


# ---- splits -----------------------------------------------------------------------------------------
def _time_values(df: pl.DataFrame, col: str) -> np.ndarray:
    if col not in df.columns:
        raise DataError(f"the temporal split needs the time column {col!r}, which the data lacks "
                        f"(columns: {', '.join(df.columns[:30])}); set data.time_col=NAME")
    s = df[col]
    if s.dtype == pl.Utf8:
        num = s.cast(pl.Float64, strict=False)
        s = num if num.null_count() == s.null_count() else s.str.to_datetime(strict=False)
    if s.dtype.is_temporal():
        s = s.cast(pl.Datetime("us")).cast(pl.Int64) if s.dtype != pl.Date else s.cast(pl.Int64)
    v = s.cast(pl.Float64, strict=False).to_numpy()
    if np.isnan(v).any():
        raise DataError(f"time column {col!r}: {int(np.isnan(v).sum())} value(s) are missing or unreadable")
    return v


def split_rows(src: CTRSource, split_cfg: dict) -> tuple[dict[str, pl.DataFrame], dict]:
    """``{"train", "valid", "test"}`` frames and the split's protocol record."""
    method = split_cfg.get("method") or "auto"
    if method not in CTR_SPLITS:
        raise ConfigError(f"split.method={method!r} for CTR data: choose one of {', '.join(CTR_SPLITS)}")
    if method == "auto":
        method = "presplit" if "train" in src.parts else ("temporal" if src.kind == "interactions" else "random")
    opts = {k: v for k, v in split_cfg.items() if k != "method" and v is not None}
    bad = set(opts) - CTR_SPLIT_OPTIONS[method]
    if bad:
        raise ConfigError(f"split {method!r} does not take {', '.join(sorted(bad))}; it takes: "
                          f"{', '.join(sorted(CTR_SPLIT_OPTIONS[method])) or 'no options'}")
    if method == "presplit":
        if "train" not in src.parts:
            raise ConfigError("split.method=presplit: the data names no train/valid/test files; use random or temporal")
        parts = dict(src.parts)
        if "valid" not in parts:
            raise DataError("the data gives train and test files but no validation file (needed for early stopping)")
        return parts, {"method": "presplit", "note": "the given train/valid/test files",
                       "rows": {k: parts[k].height for k in PARTS}}
    df = pl.concat([src.parts[k] for k in ("all", *PARTS) if k in src.parts], how="diagonal_relaxed")
    n = df.height
    if method == "random":
        ratios = np.asarray(opts.get("ratios", (0.7, 0.2, 0.1)), dtype=np.float64)
        if len(ratios) != 3 or (ratios < 0).any() or ratios.sum() <= 0:
            raise ConfigError(f"split.ratios={list(ratios)}: give three non-negative train/valid/test shares")
        ratios = ratios / ratios.sum()
        seed = int(opts.get("seed", 0))
        order = np.random.default_rng(seed).permutation(n)
        a, b = int(round(ratios[0] * n)), int(round((ratios[0] + ratios[1]) * n))
        idx = {"train": np.sort(order[:a]), "valid": np.sort(order[a:b]), "test": np.sort(order[b:])}
        rec = {"method": "random", "ratios": [round(float(r), 6) for r in ratios], "seed": seed}
    else:
        col = src.schema.time
        if col is None:
            raise ConfigError("split.method=temporal needs a time column: set data.time_col=NAME")
        t = _time_values(df, col)
        vq, tq = float(opts.get("valid_quantile", 0.7)), float(opts.get("test_quantile", 0.9))
        vc = float(opts["valid_cutoff"]) if "valid_cutoff" in opts else float(np.quantile(t, vq))
        tc = float(opts["test_cutoff"]) if "test_cutoff" in opts else float(np.quantile(t, tq))
        idx = {"train": np.flatnonzero(t < vc), "valid": np.flatnonzero((t >= vc) & (t < tc)),
               "test": np.flatnonzero(t >= tc)}
        rec = {"method": "temporal", "time_col": col, "valid_cutoff": vc, "test_cutoff": tc,
               "note": "rows before valid_cutoff train, up to test_cutoff validation, the rest test"}
    parts = {k: df[v] for k, v in idx.items()}
    for k in ("train", "test"):
        if parts[k].height == 0:
            raise DataError(f"the {method} split leaves the {k} part empty ({n} rows); change the split options")
    rec["rows"] = {k: v.height for k, v in parts.items()}
    return parts, rec
