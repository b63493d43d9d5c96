"""Run folders: everything a trained model needs to be evaluated, compared and served.

A run folder holds ``config.yaml`` (resolved), ``metrics.json``, ``per_user_valid.parquet`` and
``per_user_test.parquet``, ``model/`` (weights), ``user_map.parquet`` / ``item_map.parquet``
(raw ↔ encoded ids), ``interactions.parquet`` (encoded history used for recommendations),
``items.parquet`` when the data has an item table, ``train.log`` and ``history.json``
(per-epoch curve), and ``checkpoints/`` (``last.pt``, ``best.pt``) for PyTorch models. It is written
to a hidden ``.partial-NAME-*`` folder and renamed at the end, so a failed run leaves nothing
half-written; only a run killed outright (no chance to clean up) leaves its ``.partial-*`` folder,
with its config and last checkpoint, which ``recforge train --resume`` continues.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from recforge.data.dataset import Dataset
from recforge.data.schema import BEHAVIOR, ITEM, TIME, USER
from recforge.errors import RecForgeError
from recforge.evaluation.batch import Histories


@dataclass
class Run:
    path: Path
    config: dict
    metrics: dict
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        path = Path(path)
        if not (path / "metrics.json").exists() or not (path / "config.yaml").exists():
            raise RecForgeError(f"{path}: not a run folder (no metrics.json/config.yaml); give the folder printed by 'recforge train'")
        return cls(path, yaml.safe_load((path / "config.yaml").read_text()), json.loads((path / "metrics.json").read_text()))

    @cached_property
    def model(self):
        """The run's model, on the device it was trained with (``device=auto`` resolves again here)."""
        from recforge.models.base import Recommender

        return Recommender.load(self.path / "model")

    def load_model(self, device: str | None = None):
        """The run's model on ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``), which
        overrides the device it was trained with, so a run trained on a GPU loads on a machine
        without one with ``device="cpu"``; None: :attr:`model`. Each device's model is loaded once.
        Models that are not PyTorch models ignore ``device``."""
        if device is None:
            return self.model
        from recforge.models.base import Recommender

        cache = self.__dict__.setdefault("_models_by_device", {})
        if str(device) not in cache:
            cache[str(device)] = Recommender.load(self.path / "model", device=device)
        return cache[str(device)]

    @cached_property
    def dataset(self) -> Dataset:
        items = self.path / "items.parquet"
        return Dataset(
            interactions=pl.read_parquet(self.path / "interactions.parquet"),
            user_map=pl.read_parquet(self.path / "user_map.parquet"),
            item_map=pl.read_parquet(self.path / "item_map.parquet"),
            items=pl.read_parquet(items) if items.exists() else None,
            name=self.config["data"].get("path") or "data",
        )

    def per_user(self, part: str = "test") -> pl.DataFrame:
        return pl.read_parquet(self.path / f"per_user_{part}.parquet")

    def history_of(self, user_idx: int) -> list[int]:
        return self._history(user_idx)[0]

    def _history(self, user_idx: int) -> tuple[list[int], list | None]:
        """The user's items in time order and their behaviours (None without a behaviour column)."""
        df = self.dataset.interactions.filter(pl.col(USER) == user_idx).sort(TIME, maintain_order=True)
        return df[ITEM].to_list(), df[BEHAVIOR].to_list() if BEHAVIOR in df.columns else None

    def recommend(self, user=None, history: list | None = None, k: int = 10, exclude_seen: bool = True,
                  device: str | None = None) -> list[dict]:
        """Top-k for a known raw user id, or for a raw history of raw item ids (a new user), scored
        on ``device`` (None: the device the model was trained with; see :meth:`load_model`).

        Returns a list of ``{"item_id": raw, "score": float}``."""
        ds = self.dataset
        if user is not None:
            idx = int(ds.encode_users([user])[0])
            if idx < 0:
                raise RecForgeError(f"user {user!r} is not in this run's data; pass a history instead (--history ITEM ...)")
            items, behaviors = self._history(idx)
        else:
            enc = ds.encode_items(list(history or []))
            items, behaviors = [int(i) for i in enc if i > 0], None
            idx = -1
        hist = Histories.from_lists([idx], [items], ds.n_items, None if behaviors is None else [behaviors])
        top, scores = self.load_model(device).recommend(hist, k=k, exclude_seen=exclude_seen)
        finite = np.isfinite(scores[0])  # fewer candidates than k: the excluded ones come last, at -inf
        raw = ds.decode_items(top[0][finite])
        return [{"item_id": r, "score": float(s)} for r, s in zip(raw, scores[0][finite])]


def history_columns(interactions: pl.DataFrame) -> list[str]:
    """The columns of a run's (and an artifact's) ``interactions.parquet``: user, item, time, and the
    behaviour where the data has one (multi-behaviour models score and exclude by it)."""
    return [USER, ITEM, TIME] + ([BEHAVIOR] if BEHAVIOR in interactions.columns else [])


class RunWriter:
    """Collects a run's files in a temporary folder and moves it into place on ``commit``."""

    def __init__(self, out: str | Path, name: str):
        self.root = Path(out)
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.tmp = Path(tempfile.mkdtemp(prefix=f".partial-{name}-", dir=self.root))
        self.handler = logging.FileHandler(self.tmp / "train.log")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.logger = logging.getLogger("recforge")
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)

    def write_json(self, name: str, obj) -> None:
        (self.tmp / name).write_text(json.dumps(obj, indent=2, default=_jsonable))

    def write_yaml(self, name: str, obj) -> None:
        (self.tmp / name).write_text(yaml.safe_dump(obj, sort_keys=False))

    def commit(self) -> Path:
        self._close_log()
        final = self.root / self.name
        n = 1
        while final.exists():
            n += 1
            final = self.root / f"{self.name}-{n}"
        self.tmp.rename(final)
        return final

    def finish(self, keep: bool) -> Path | None:
        """Commit the run folder (``keep``: rank 0 of a data-parallel run, or the only process) or
        discard this process's scratch copy (the other ranks); the final path or None."""
        if keep:
            return self.commit()
        self.fail(scratch=True)
        return None

    def fail(self, scratch: bool = False) -> None:
        """Remove what was written (and the scratch root of a rank other than 0)."""
        self.abort()
        if scratch:
            shutil.rmtree(self.root, ignore_errors=True)

    def abort(self) -> None:
        self._close_log()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _close_log(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()


def run_name(model: str, data: str, seed: int) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-{data}-s{seed}"


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def drop_superseded(resume) -> None:
    """After a resumed run is committed: remove the ``.partial-*`` folder a killed run left."""
    if resume is not None and Path(resume).name.startswith(".partial-"):
        shutil.rmtree(resume, ignore_errors=True)


def finished_run(path: Path | None, cfg: dict, metrics: dict, resume=None) -> "Run":
    """The :class:`Run` of a finished training (``path`` from :meth:`RunWriter.finish`; None in the
    processes of a data-parallel run other than rank 0, which wrote the folder); a killed run this
    one resumed is removed."""
    if path is None:
        return Run(None, cfg, metrics)
    drop_superseded(resume)
    return Run(path, cfg, metrics)


def publish_folder(tmp: Path, out: Path) -> Path:
    """Rename a completed temporary folder into place (replacing an empty ``out``); on any error
    the temporary folder is removed, so nothing half-written is left. Returns ``out``."""
    try:
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
