"""Shared machinery of the model-comparison benchmarks (``mb_compare.py``, ``seq_compare.py``).

Each (model, seed) trains in its own process, so that its peak resident memory is its own and a
crash loses one row only; ``jobs`` of them run at once (one thread each). The worker prints one JSON
row as the last line of its standard output; :func:`run_jobs` hands every row to a callback, which
merges it into the results file at once (an interrupted comparison keeps what finished). The queue
goes seed by seed, so that a budget that runs out still leaves every model at the first seeds.

Several calls on the same data may run at once (for example one per seed): each merges its rows
into the rows the file holds when it writes (under a lock on the file), and a worker locks its
(model, seed) run folder, so a second call asking for the same run fails that row with a message
instead of emptying a folder the first is training into.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_jobs(script: str, pairs: list[tuple[str, int]], extra_args: list[str], jobs: int, budget: float | None,
             on_row) -> None:
    """Run ``python script --worker NAME SEED *extra_args`` for every (name, seed) of ``pairs``,
    ``jobs`` at once, with ``OMP_NUM_THREADS=1``; ``on_row(row)`` for each that succeeds. No new
    run starts after ``budget`` seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    queue = list(pairs)
    running: list[tuple] = []
    while queue or running:
        while queue and len(running) < max(1, jobs):
            name, seed = queue.pop(0)
            if budget is not None and time.perf_counter() - t0 > budget:
                print(f"budget reached: {name} seed {seed} not run", file=sys.stderr)
                continue
            cmd = [sys.executable, script, "--worker", name, str(seed), *extra_args]
            logs = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # no pipe to fill up
            running.append((name, seed, subprocess.Popen(cmd, stdout=logs[0], stderr=logs[1], text=True, env=env),
                            logs))
        done = next((r for r in running if r[2].poll() is not None), None)
        if done is None:
            time.sleep(1.0)
            continue
        running.remove(done)
        name, seed, proc, logs = done
        stdout, stderr = (f.seek(0) or f.read() for f in logs)
        if proc.returncode:
            print(f"{name} seed {seed} failed:\n{stderr[-3000:]}", file=sys.stderr)
            continue
        on_row(json.loads(stdout.strip().splitlines()[-1]))


@contextlib.contextmanager
def locked(path: Path, wait: bool = True, what: str | None = None):
    """Hold an exclusive lock on the file ``path`` (created) for the block. ``wait=False``: another
    process holding it is a :class:`SystemExit` naming ``what`` instead of a wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise SystemExit(f"{what or path} is in use by another call right now; run each (model, seed) from "
                             "one call, or give the other call its own --out") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_lock(out: Path):
    """The lock a worker holds on its (model, seed) run folder ``out`` while it trains (a file beside
    the folder, which a resumed run's clean-up never touches)."""
    return locked(out.parent / f".{out.name}.lock", wait=False, what=f"run folder {out}")


def resumable(out: Path, resume: bool = True) -> Path | None:
    """The newest run folder a stopped (model, seed) run left in ``out`` (``.partial-*`` with its config
    and last checkpoint), which the next call resumes instead of starting again (the trainer's resumed
    runs end as uninterrupted ones would); everything else in ``out`` is removed, all of it when there
    is none to resume, or with ``resume=False`` (a ``--fresh`` call starts its runs over), and then None."""
    stopped = sorted((p for p in out.glob(".partial-*")
                      if (p / "config.yaml").is_file() and (p / "checkpoints" / "last.pt").is_file()),
                     key=lambda p: (p / "checkpoints" / "last.pt").stat().st_mtime) if out.is_dir() and resume else []
    keep = stopped[-1] if stopped else None
    for p in out.iterdir() if out.is_dir() else ():
        if p != keep:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    return keep


def row_key(row: dict) -> tuple:
    return row["name"], row["seed"]


def merge_rows(out: Path, source: Path, write) -> int:
    """Merge the JSON rows of the file ``source`` (one per line; other lines, such as a queue's log,
    are skipped) into the results file ``out``: a (name, seed) already there is replaced. The rows a
    failed write printed ("the row, to merge by hand") go back in this way. The number of rows merged."""
    new = {}
    for line in source.read_text().splitlines():
        line = line.strip()
        if line.startswith("{") and '"name"' in line and '"seed"' in line:
            row = json.loads(line)
            new[row_key(row)] = row
    with locked(out.with_name(f".{out.name}.lock")):
        old = json.loads(out.read_text()) if out.exists() else {}
        rows = [r for r in old.get("runs", []) if row_key(r) not in new]
        there = {r.get("run") for r in old.get("runs", [])}  # a row merged twice counts its time once
        added = sum(r.get("wall_s", 0.0) for r in new.values() if r.get("run") not in there)
        write(rows + list(new.values()), old.get("wall_s", 0.0) + added)
    return len(new)


def collect(script: str, out: Path, fresh: bool, pairs: list[tuple[str, int]], extra_args: list[str], jobs: int,
            budget: float | None, write, line) -> None:
    """:func:`run_jobs` whose rows are merged into the results file ``out`` as they finish: the rows
    already there are kept (``fresh``: those there at the start are dropped, and the workers get
    ``--fresh``, so a stopped run starts over instead of resuming), a (name, seed) run
    again replaces its row, and rows another call adds meanwhile are kept (each write re-reads the
    file under its lock). ``write(rows, wall_seconds)`` writes the file, ``line(row)`` is the
    progress line printed per row."""
    lock = out.with_name(f".{out.name}.lock")

    def on_disk() -> dict:
        return json.loads(out.read_text()) if out.exists() else {}

    with locked(lock):
        start = on_disk()
    stale = {row_key(r) for r in start.get("runs", [])} if fresh else set()
    wall0 = 0.0 if fresh else start.get("wall_s", 0.0)
    mine: dict[tuple, dict] = {}
    t0 = time.perf_counter()

    def save() -> None:
        with locked(lock):
            rows = [r for r in on_disk().get("runs", []) if row_key(r) not in stale and row_key(r) not in mine]
            write(rows + list(mine.values()), time.perf_counter() - t0 + wall0)

    def on_row(row: dict) -> None:
        mine[row_key(row)] = row
        print(line(row), flush=True)
        try:
            save()
        except Exception as exc:  # noqa: BLE001 - a failed summary must not lose the finished row or stop the queue
            print(f"could not write {out} ({type(exc).__name__}: {exc}); the row, to merge by hand:\n"
                  f"{json.dumps(row)}", file=sys.stderr, flush=True)

    run_jobs(script, pairs, [*extra_args, "--fresh"] if fresh else extra_args, jobs, budget, on_row)
    save()
    print(f"wrote {out}")


SAMPLED99_FILE = "per_user_test_sampled99.parquet"


def sampled99(run, keys) -> dict:
    """The labelled sampled protocol (the held-out item against 99 items drawn uniformly outside
    the user's history, pessimistic ties) of a finished run (a :class:`recforge.Run` or its folder):
    its ``keys`` metrics; the per-user table is written beside the run's own."""
    import recforge

    res = recforge.evaluate(run, sampled=99, per_user=True)
    res["per_user"].write_parquet(Path(getattr(run, "path", run)) / SAMPLED99_FILE)
    return {k: round(float(res["test"][k]), 4) for k in keys if k in res["test"]}


def fit_figures(run, wall: float) -> dict:
    """Epochs, best epoch, training seconds per epoch (training only), wall seconds and this
    process's peak resident memory (MB) of a finished :class:`recforge.Run`. A run resumed after a
    stop (its history's ``resumed``: the epoch, and the trainer's seconds before the stop) adds those
    seconds to its wall time and keeps ``resumed`` in its row; its peak memory is the resumed process's."""
    hist_path = Path(run.path) / "history.json"
    hist = json.loads(hist_path.read_text()) if hist_path.exists() else {}
    epochs, resumed = hist.get("epochs", []), hist.get("resumed")
    train_s = sum(e.get("train_seconds", 0.0) for e in epochs)
    return {"epochs_run": len(epochs), "best_epoch": run.metrics.get("training", {}).get("best_epoch"),
            "s_per_epoch": round(train_s / max(len(epochs), 1), 3),
            "wall_s": round(wall + (resumed or {}).get("seconds_before", 0.0), 1),
            "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            **({"resumed": resumed} if resumed else {})}


def mean_sd(vals: list[float]) -> list[float]:
    """[mean, sample standard deviation] rounded to 4 places (sd 0 for one value)."""
    mean = sum(vals) / len(vals)
    sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return [round(mean, 4), round(sd, 4)]


#: per-user columns kept in the tracked copies (the paired tests' metrics and the user keys)
PER_USER_COLUMNS = ("user", "user_raw", "hr@10", "ndcg@10", "hr@20", "ndcg@20")


#: per-user tables read so far, by (root, run, file): a baseline's tables serve every model it is paired with
_TABLES: dict[tuple[str, str, str], object] = {}


def per_user_table(root: Path, row: dict, file: str):
    """The per-user table ``file`` of a row's run, from its tracked copy (``benchmarks/results/per_user/``,
    the :data:`PER_USER_COLUMNS` only: run folders are not kept in the repository) or else from the run
    folder, which is then copied there; None when neither exists (a run folder lost before the copies
    were kept)."""
    import polars as pl

    key = (str(root), row["run"], file)
    if key in _TABLES:
        return _TABLES[key]
    run = Path(row["run"])
    parts = run.parent.parts
    sub = parts[len(parts) - parts[::-1].index("runs"):] if "runs" in parts else parts  # below runs/
    store = root / "benchmarks" / "results" / "per_user" / Path(*sub)
    kept = store / f"{run.name}.{file}"
    src = root / run / file
    if kept.is_file():
        t = pl.read_parquet(kept)
    elif src.is_file():
        t = pl.read_parquet(src)
        t = t.select([c for c in PER_USER_COLUMNS if c in t.columns])
        store.mkdir(parents=True, exist_ok=True)
        for old in store.glob(f"*.{file}"):  # an earlier run of the same (model, seed)
            old.unlink()
        t.write_parquet(kept, compression="zstd")
    else:
        return None  # not remembered: the table may appear later (a run still writing it)
    _TABLES[key] = t
    return t


def paired(rows: list[dict], root: Path, name: str, base: str, parts: dict[str, str],
           metrics=("hr@10", "ndcg@10"), recorded: dict | None = None) -> dict:
    """Paired tests (t-test and Wilcoxon on per-user metrics averaged over the seeds) of ``name``
    against ``base``; ``parts`` maps a protocol label to the per-user file of a run folder. The seeds
    are those both have a per-user table of (:func:`per_user_table`), listed in ``seeds``. Where the
    ``recorded`` result (the results file's earlier one) pairs more seeds, it stays the result and the
    new one is kept under ``other`` (and the other way round), so a lost table never loses a result."""
    from recforge.evaluation.significance import paired_tests, seed_mean

    both = sorted({r["seed"] for r in rows if r["name"] == name} & {r["seed"] for r in rows if r["name"] == base})
    if not both:
        return {}
    out: dict = {}
    for part, file in parts.items():
        tables = {n: {r["seed"]: per_user_table(root, r, file) for r in rows if r["name"] == n and r["seed"] in both}
                  for n in (name, base)}
        seeds = [s for s in both if tables[name].get(s) is not None and tables[base].get(s) is not None]
        if not seeds:
            continue
        out.setdefault("seeds", seeds)
        if seeds != out["seeds"]:
            out[f"{part} seeds"] = seeds
        a, b = (seed_mean([tables[n][s] for s in seeds]) for n in (name, base))
        # paired_tests' diff is b - a: stored as model minus baseline
        out[part] = {t["metric"]: {"model_minus_baseline": round(-t["diff"], 4), "t_test_p": float(f"{t['t_test_p']:.3g}"),
                                   "wilcoxon_p": float(f"{t['wilcoxon_p']:.3g}")}
                     for t in paired_tests(a, b, list(metrics))}
    recorded = {k: v for k, v in (recorded or {}).items() if k != "other"}
    if len(recorded.get("seeds", [])) > len(out.get("seeds", [])):  # an earlier result over more seeds
        return {**recorded, "other": out} if out else recorded
    return {**out, "other": recorded} if recorded and recorded.get("seeds") != out.get("seeds") else out


def recorded_tests(out: Path) -> dict:
    """``{model: {baseline: paired result}}`` of the results file ``out`` as it stands (empty when absent):
    what :func:`paired` keeps where the per-user tables behind a result are gone."""
    if not out.is_file():
        return {}
    return {n: s.get("vs", {}) for n, s in json.loads(out.read_text()).get("summary", {}).items()}


def summarise(rows: list[dict], names, parts: list[str]) -> dict:
    """Per model: seeds, epochs, mean seconds per epoch, largest peak memory, and mean ± sd of
    every metric of each protocol part (``row[part]`` dicts)."""
    summary = {}
    for name in names:
        got = sorted((r for r in rows if r["name"] == name), key=lambda r: r["seed"])
        if not got:
            continue
        s = summary[name] = {"seeds": [r["seed"] for r in got], "epochs_run": [r["epochs_run"] for r in got],
                             "s_per_epoch": round(sum(r["s_per_epoch"] for r in got) / len(got), 3),
                             "peak_mb": max(r["peak_mb"] for r in got)}
        for part in parts:
            for k in got[0][part]:
                s[f"{part} {k}"] = mean_sd([r[part][k] for r in got])
    return summary
