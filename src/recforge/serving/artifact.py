"""Serving artifacts: a self-contained, checksummed folder made from a run folder.

``recforge export RUN --out DIR`` writes::

    DIR/
      manifest.json         format version, recforge version, model name, created time, counts,
                            and the sha256 and size of every other file
      config.yaml           the run's resolved config
      metrics.json          the run's metrics (for reference)
      model/...             the model weights, as saved by ``Recommender.save``
      user_map.parquet      raw <-> encoded user ids
      item_map.parquet      raw <-> encoded item ids
      items.parquet         item side table keyed by encoded item id (when the data has one)
      interactions.parquet  encoded history (user_id, item_id, timestamp[, behavior]), sorted by user then time
      popularity.npy        int64 counts per encoded item over the training part (index 0: padding)
      item_vectors.npy      float32 (n_items + 1, d) item vectors, when the model has them

A CTR run (``task: ctr`` in its metrics) becomes a scoring artifact instead: ``manifest.json``
(with ``task: ctr``, the labels and the features), ``config.yaml``, ``metrics.json``, ``model/``
and ``encoders/`` (the encoders fitted on the run's training part, applied unchanged to every row
the server scores). It has no catalogue or history: it scores candidate rows given with their
features (``POST /v1/score``).

The folder is assembled in a hidden temporary folder beside ``DIR`` and renamed into place, so
an interrupted export leaves nothing half-written. :func:`load_artifact` checks every checksum
before it reads anything and needs nothing but the folder (and the model's code).

The checksums detect corruption and partial copies, not a deliberate forgery: whoever can write
the folder can rewrite the manifest. ``model.pt`` is a pickle; serve artifacts you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from recforge.data.schema import TIME, USER
from recforge.errors import RecForgeError
from recforge.runs import history_columns, publish_folder

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(RecForgeError):
    """A serving artifact is missing, incomplete, of an unknown format, or fails its checksums."""


# ---- export -----------------------------------------------------------------------------------
def item_vectors_of(model) -> np.ndarray | None:
    """Item vectors ``(n_items + 1, d)`` of a model (row 0 padding), or None.

    Taken from a model method ``item_vectors()`` when present, else from ``output_table()``
    (sequential models), else from the embedding table ``net_.item.weight``."""
    import torch

    n_items = getattr(model, "n_items_", None)
    vec = None
    with torch.no_grad():
        if callable(getattr(model, "item_vectors", None)):
            vec = model.item_vectors()
        elif callable(getattr(model, "output_table", None)) and getattr(model, "net_", None) is not None:
            vec = model.output_table()
        else:
            item = getattr(getattr(model, "net_", None), "item", None)
            vec = getattr(item, "weight", None)
    if vec is None:
        return None
    arr = vec.detach().cpu().float().numpy() if hasattr(vec, "detach") else np.asarray(vec, dtype=np.float32)
    if arr.ndim != 2:
        return None
    if n_items is not None:
        arr = arr[: int(n_items) + 1]
    return np.ascontiguousarray(arr, dtype=np.float32)


def _training_popularity(ds, cfg: dict) -> tuple[np.ndarray, str]:
    """Counts per item over the run's training part; over all of its interactions if the split
    cannot be rebuilt from the run folder alone (e.g. a pre-split source)."""
    try:
        from recforge.pipeline import split_dataset

        return np.asarray(split_dataset(ds, cfg).item_popularity, dtype=np.int64), "train split"
    except Exception:  # noqa: BLE001 - any failure: fall back to the whole history, recorded in the manifest
        return ds.item_popularity().astype(np.int64), "all interactions"


def export_artifact(run_dir: str | Path, out: str | Path) -> Path:
    """Write a serving artifact for the run folder ``run_dir`` to ``out``; returns ``out``."""
    from recforge import __version__
    from recforge.runs import Run

    run = Run.load(run_dir)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"{out}: exists and is not an empty folder; choose another --out or remove it")
    ctr = run.metrics.get("task") == "ctr"
    needed = ("model", "encoders") if ctr else ("model", "user_map.parquet", "item_map.parquet", "interactions.parquet")
    for name in needed:
        if not (run.path / name).exists():
            raise ArtifactError(f"{run.path}: incomplete run folder (no {name}); train it again")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary folder
    try:
        shutil.copytree(run.path / "model", tmp / "model")
        shutil.copy2(run.path / "config.yaml", tmp / "config.yaml")
        shutil.copy2(run.path / "metrics.json", tmp / "metrics.json")
        manifest = {
            "format_version": FORMAT_VERSION,
            "recforge_version": __version__,
            "task": "ctr" if ctr else "ranking",
            "model": run.config["model"]["name"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source_run": str(run.path.resolve()),
            "data": run.config.get("data", {}).get("path"),
        }
        manifest.update(_export_ctr(run, tmp) if ctr else _export_ranking(run, tmp))
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files[p.relative_to(tmp).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        manifest["files"] = files
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_folder(tmp, out)


def _export_ctr(run, tmp: Path) -> dict:
    """The encoders of a CTR run; the manifest's labels and features."""
    from recforge.data.features import FeatureEncoder

    shutil.copytree(run.path / "encoders", tmp / "encoders")
    enc = FeatureEncoder.load(tmp / "encoders")  # a broken encoder folder fails the export, not the server
    return {"labels": list(enc.schema.labels), "user_column": enc.schema.user,
            "features": [{"name": f.name, "kind": f.kind} for f in enc.schema.features]}


def _export_ranking(run, tmp: Path) -> dict:
    """The catalogue, histories, popularity and item vectors of a ranking run; their manifest entries."""
    model = run.model
    ds = run.dataset
    ds.user_map.write_parquet(tmp / "user_map.parquet")
    ds.item_map.write_parquet(tmp / "item_map.parquet")
    if ds.items is not None:
        ds.items.write_parquet(tmp / "items.parquet")
    inter = ds.interactions.select(history_columns(ds.interactions)).sort([USER, TIME], maintain_order=True)
    inter.write_parquet(tmp / "interactions.parquet")
    pop, pop_source = _training_popularity(ds, run.config)
    np.save(tmp / "popularity.npy", pop)
    vec = item_vectors_of(model)
    if vec is not None:
        np.save(tmp / "item_vectors.npy", vec)
    return {"model": getattr(model, "name", run.config["model"]["name"]), "n_users": ds.n_users,
            "n_items": ds.n_items, "n_interactions": inter.height,
            "item_vectors": None if vec is None else {"dim": int(vec.shape[1])}, "popularity_source": pop_source}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ---- load -------------------------------------------------------------------------------------
def verify_artifact(path: str | Path) -> dict:
    """Read the manifest and check every file's size and sha256; returns the manifest."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path}: not a serving artifact (no {MANIFEST}); "
                            "make one with 'recforge export RUN --out DIR'")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        version = int(manifest["format_version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{mpath}: unreadable manifest ({exc}); export the run again") from None
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format {version}, this recforge reads format {FORMAT_VERSION}; "
                            "export the run again with this version")
    bad = []
    for rel, info in files.items():
        p = path / rel
        if not p.is_file():
            bad.append(f"{rel} (missing)")
        elif p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
            bad.append(f"{rel} (checksum mismatch)")
    if bad:
        raise ArtifactError(f"{path}: artifact is corrupted or was modified: {', '.join(bad)}; "
                            "copy it again or export the run again")
    return manifest


@dataclass
class Artifact:
    """A verified serving artifact. Tables are read on load; the model on first use."""

    path: Path
    manifest: dict
    config: dict
    user_map: pl.DataFrame
    item_map: pl.DataFrame
    items: pl.DataFrame | None
    interactions: pl.DataFrame
    popularity: np.ndarray
    item_vectors: np.ndarray | None

    @property
    def model_name(self) -> str:
        return self.manifest["model"]

    @property
    def n_items(self) -> int:
        return self.item_map.height

    @property
    def n_users(self) -> int:
        return self.user_map.height

    task = "ranking"

    @cached_property
    def model(self):
        return _load_model(self.path)


def _load_model(path: Path):
    from recforge.models.base import Recommender

    # RECFORGE_DEVICE (set by `recforge serve --device`, inherited by every worker) overrides the
    # device the model was trained with: a GPU-trained model serves on a CPU machine with cpu
    model = Recommender.load(path / "model", device=os.environ.get("RECFORGE_DEVICE") or None)
    net = getattr(model, "net_", None)
    if net is not None and hasattr(net, "eval"):
        net.eval()
    return model


@dataclass
class CTRArtifact:
    """A verified CTR scoring artifact: the encoders and (on first use) the model."""

    path: Path
    manifest: dict
    config: dict
    encoder: object  # recforge.data.features.FeatureEncoder
    task = "ctr"

    @property
    def model_name(self) -> str:
        return self.manifest["model"]

    @cached_property
    def model(self):
        return _load_model(self.path)


def load_artifact(path: str | Path, verify: bool = True) -> Artifact | CTRArtifact:
    """Load a serving artifact after checking its checksums (``verify=False`` skips the check)."""
    path = Path(path)
    manifest = verify_artifact(path) if verify else json.loads((path / MANIFEST).read_text())
    if manifest.get("task") == "ctr":
        from recforge.data.features import FeatureEncoder

        return CTRArtifact(path, manifest, yaml.safe_load((path / "config.yaml").read_text()),
                           FeatureEncoder.load(path / "encoders"))
    opt = lambda n: pl.read_parquet(path / n) if (path / n).exists() else None  # noqa: E731
    vec = path / "item_vectors.npy"
    art = Artifact(
        path=path,
        manifest=manifest,
        config=yaml.safe_load((path / "config.yaml").read_text()),
        user_map=pl.read_parquet(path / "user_map.parquet"),
        item_map=pl.read_parquet(path / "item_map.parquet"),
        items=opt("items.parquet"),
        interactions=pl.read_parquet(path / "interactions.parquet"),
        popularity=np.load(path / "popularity.npy"),
        item_vectors=np.load(vec) if vec.exists() else None,
    )
    if len(art.popularity) != art.n_items + 1:
        raise ArtifactError(f"{path}: popularity has {len(art.popularity)} entries for {art.n_items} items; "
                            "export the run again")
    return art
