"""Batch inference: the top-k items of every user of a run (or of a given list) to Parquet.

``recforge predict RUN --out topk.parquet [-k 10] [--users FILE | --user ID ...] [--device D]
[--nproc N]`` scores each user's whole history in the run (training, validation and test
interactions: the history a live service would see), removes the items already seen, and writes
one row per recommendation: ``user_id`` and ``item_id`` (raw ids), ``rank`` (1 = best) and
``score``. With ``--nproc N`` the users are cut into N contiguous shards scored by N processes
(:mod:`recforge.training.distributed`); each writes its part, and rank 0 joins the parts in user
order into the one output file. The file is written to a temporary name and renamed, so a failed
run leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from recforge.data.schema import ITEM, TIME, USER
from recforge.errors import RecForgeError
from recforge.evaluation.batch import Histories
from recforge.runs import Run
from recforge.training import distributed


def _users(run: Run, users: list | None) -> np.ndarray:
    """Encoded ids of the users to score (all users of the run when ``users`` is None)."""
    ds = run.dataset
    if users is None:
        return np.arange(ds.n_users, dtype=np.int64)
    enc = np.asarray(ds.encode_users(list(users)))
    unknown = [u for u, e in zip(users, enc) if e < 0]
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise RecForgeError(f"{len(unknown)} user id(s) not in this run's data ({shown}); give ids of its users, "
                            "or score new users from their histories with recforge recommend --history")
    return enc.astype(np.int64)


def read_user_file(path: str | Path) -> list[str]:
    """User ids, one per line (a text file) or the ``user_id`` column of a CSV / Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise RecForgeError(f"--users {path}: no such file; give a text file with one user id per line, or a "
                            "CSV/Parquet file with a user_id column")
    if path.suffix in (".parquet", ".csv"):
        df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path, infer_schema_length=0)
        if "user_id" not in df.columns:
            raise RecForgeError(f"--users {path}: no user_id column (columns: {', '.join(df.columns)})")
        return [str(u) for u in df["user_id"].to_list()]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def predict(run: str | Path | Run, out: str | Path, k: int = 10, users: list | None = None,
            device: str | None = None, batch_size: int = 1024, verbose: bool = True) -> dict:
    """Write the top-``k`` of every user (or of ``users``, raw ids) to ``out`` (Parquet). In a
    process group (``--nproc`` / ``torchrun``) each process scores its shard of the users."""
    distributed.init_from_env()
    rank, size = distributed.world()
    run = run if isinstance(run, Run) else Run.load(run)
    out = Path(out)
    if k < 1:
        raise RecForgeError(f"-k {k}: give a number of items >= 1")
    ds = run.dataset
    model = run.load_model(device)
    enc = _users(run, users)
    lo, hi = distributed.shard_bounds(len(enc))
    mine = enc[lo:hi]
    t0 = time.perf_counter()
    inter = ds.interactions.select(USER, ITEM, TIME).filter(pl.col(USER).is_in(mine.tolist()))
    inter = inter.sort([USER, TIME], maintain_order=True)
    by_user = dict(zip(*inter.group_by(USER, maintain_order=True).agg(pl.col(ITEM)).to_dict(as_series=False).values()))
    parts = []
    for s in tqdm(range(0, len(mine), batch_size), desc="predict", unit="batch", disable=not (verbose and rank == 0)):
        chunk = mine[s : s + batch_size]
        hist = Histories.from_lists(chunk.tolist(), [by_user.get(int(u), []) for u in chunk], ds.n_items)
        top, scores = model.recommend(hist, k=k, exclude_seen=True)
        kk = top.shape[1]
        flat_items, flat_scores = top.reshape(-1), scores.reshape(-1).astype(np.float32)
        keep = np.isfinite(flat_scores) & (flat_items > 0)
        parts.append(pl.DataFrame({
            "user": np.repeat(chunk, kk)[keep], "rank": np.tile(np.arange(1, kk + 1, dtype=np.int32), len(chunk))[keep],
            "item": flat_items[keep].astype(np.int64), "score": flat_scores[keep]}))
    local = pl.concat(parts) if parts else pl.DataFrame(schema={"user": pl.Int64, "rank": pl.Int32, "item": pl.Int64,
                                                                "score": pl.Float32})
    users_raw = ds.user_map.select(pl.col("idx").cast(pl.Int64).alias("user"), pl.col("raw").alias("user_id"))
    items_raw = ds.item_map.select(pl.col("idx").cast(pl.Int64).alias("item"), pl.col("raw").alias("item_id"))
    local = (local.join(users_raw, on="user", how="left", maintain_order="left")
             .join(items_raw, on="item", how="left", maintain_order="left")
             .select("user_id", "rank", "item_id", "score"))
    out.parent.mkdir(parents=True, exist_ok=True)
    if size == 1:
        _write_atomic(local, out)
    else:
        scratch = Path(distributed.gather(tempfile.mkdtemp(prefix=".predict-", dir=out.parent) if rank == 0 else None)[0])
        local.write_parquet(scratch / f"part-{rank:05d}.parquet")
        distributed.barrier()
        if rank == 0:
            joined = pl.concat([pl.read_parquet(scratch / f"part-{r:05d}.parquet") for r in range(size)])
            _write_atomic(joined, out)
            shutil.rmtree(scratch, ignore_errors=True)
        distributed.barrier()
    return {"out": str(out), "users": int(len(enc)), "k": k, "processes": size,
            "seconds": round(time.perf_counter() - t0, 2)}


def _write_atomic(df: pl.DataFrame, out: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        df.write_parquet(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
