"""The comparison benchmarks' shared machinery (benchmarks/compare_jobs.py): calls running at once
on the same data keep each other's rows, a (model, seed) run folder has one writer at a time, paired
tests outlive the run folders (tracked per-user tables), and rows a failed write printed merge back."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_jobs  # noqa: E402


def fake_queue(monkeypatch, rows, between=None):
    """run_jobs replaced by handing ``rows`` to the callback, ``between()`` after the first."""
    def run_jobs(script, pairs, extra_args, jobs, budget, on_row):
        for i, r in enumerate(rows):
            on_row(r)
            if i == 0 and between is not None:
                between()

    monkeypatch.setattr(compare_jobs, "run_jobs", run_jobs)


def write_rows(out: Path):
    return lambda rows, wall: out.write_text(json.dumps({"runs": rows, "wall_s": wall}))


def names(out: Path) -> set:
    return {(r["name"], r["seed"]) for r in json.loads(out.read_text())["runs"]}


def test_rows_of_a_call_running_meanwhile_are_kept(tmp_path, monkeypatch):
    out = tmp_path / "seq_x.json"
    out.write_text(json.dumps({"runs": [{"name": "pop", "seed": 0}], "wall_s": 1.0}))

    def other_call_finishes_a_row():  # another call merges its row between two of ours
        data = json.loads(out.read_text())
        out.write_text(json.dumps({**data, "runs": data["runs"] + [{"name": "ease", "seed": 1}]}))

    fake_queue(monkeypatch, [{"name": "sasrec", "seed": 1}, {"name": "sasrec", "seed": 2}], other_call_finishes_a_row)
    compare_jobs.collect("x.py", out, False, [], [], 1, None, write_rows(out), str)
    assert names(out) == {("pop", 0), ("ease", 1), ("sasrec", 1), ("sasrec", 2)}


def test_fresh_drops_only_the_rows_there_at_the_start(tmp_path, monkeypatch):
    out = tmp_path / "seq_x.json"
    out.write_text(json.dumps({"runs": [{"name": "pop", "seed": 0}, {"name": "sasrec", "seed": 1, "old": True}]}))

    def other_call_finishes_a_row():
        data = json.loads(out.read_text())
        out.write_text(json.dumps({**data, "runs": data["runs"] + [{"name": "ease", "seed": 1}]}))

    fake_queue(monkeypatch, [{"name": "sasrec", "seed": 1}], other_call_finishes_a_row)
    compare_jobs.collect("x.py", out, True, [], [], 1, None, write_rows(out), str)
    rows = json.loads(out.read_text())["runs"]
    assert names(out) == {("sasrec", 1), ("ease", 1)} and not any(r.get("old") for r in rows)


def test_a_run_folder_has_one_writer(tmp_path):
    folder = tmp_path / "runs" / "sasrec-s0"
    with compare_jobs.run_lock(folder):
        with pytest.raises(SystemExit, match="sasrec-s0 is in use by another call"):
            with compare_jobs.run_lock(folder):
                pass
    with compare_jobs.run_lock(folder):  # released: the next call takes it
        pass
    assert not folder.exists()  # the lock lives beside the folder, never inside it


def _per_user_run(root: Path, name: str, seed: int, ndcg: list[float]) -> dict:
    """A row whose run folder holds a per-user test table (users 0..n-1)."""
    import polars as pl

    run = Path("benchmarks/results/runs/seq/x") / f"{name}-s{seed}" / f"2026-{name}-s{seed}"
    (root / run).mkdir(parents=True)
    n = len(ndcg)
    pl.DataFrame({"user": list(range(n)), "history_length": [3] * n, "mrr": ndcg, "hr@10": [float(v > 0) for v in ndcg],
                  "ndcg@10": ndcg, "user_raw": [f"u{i}" for i in range(n)]}).write_parquet(root / run / "per_user_test.parquet")
    return {"name": name, "seed": seed, "run": str(run)}


def test_paired_tests_survive_lost_run_folders(tmp_path):
    """Per-user tables are copied (their paired-test columns) to the tracked per_user/ folder; a lost
    run folder then changes nothing, and seeds with no table on one side are left out, by name."""
    import shutil

    rng = __import__("numpy").random.default_rng(0)
    base = [_per_user_run(tmp_path, "sasrec", s, list(rng.random(40))) for s in (0, 1)]
    model = [_per_user_run(tmp_path, "grec", s, list(rng.random(40) * 0.5)) for s in (0, 1)]
    rows, parts = base + model, {"full": "per_user_test.parquet"}
    first = compare_jobs.paired(rows, tmp_path, "grec", "sasrec", parts)
    assert first["seeds"] == [0, 1] and first["full"]["ndcg@10"]["model_minus_baseline"] < 0
    kept = sorted((tmp_path / "benchmarks/results/per_user/seq/x").rglob("*.parquet"))
    assert len(kept) == 4
    assert __import__("polars").read_parquet(kept[0]).columns == ["user", "user_raw", "hr@10", "ndcg@10"]
    shutil.rmtree(tmp_path / "benchmarks/results/runs")  # a fresh checkout: no run folders
    compare_jobs._TABLES.clear()  # and a fresh process: nothing read yet
    assert compare_jobs.paired(rows, tmp_path, "grec", "sasrec", parts) == first
    # a new seed whose baseline table never existed: paired over the seeds that have both, by name
    rows = rows + [_per_user_run(tmp_path, "grec", 2, list(rng.random(40))), {"name": "sasrec", "seed": 2, "run": "gone/x"}]
    assert compare_jobs.paired(rows, tmp_path, "grec", "sasrec", parts)["seeds"] == [0, 1]
    # no seed with tables on both sides: the recorded result is kept, an empty one otherwise
    lost = [{"name": "ease", "seed": 0, "run": "gone/e"}, *model]
    recorded = {"seeds": [0], "full": {"ndcg@10": {"model_minus_baseline": -0.1, "t_test_p": 0.01, "wilcoxon_p": 0.02}}}
    assert compare_jobs.paired(lost, tmp_path, "grec", "ease", parts, recorded=recorded) == recorded
    assert compare_jobs.paired(lost, tmp_path, "grec", "ease", parts) == {}
    # a recorded result over more seeds than the tables left stays the result; the new one beside it
    wider = {**recorded, "seeds": [0, 1, 2]}
    got = compare_jobs.paired(rows, tmp_path, "grec", "sasrec", parts, recorded=wider)
    assert got["seeds"] == [0, 1, 2] and got["other"] == first
    narrow = {**recorded, "seeds": [5]}
    got = compare_jobs.paired(rows, tmp_path, "grec", "sasrec", parts, recorded=narrow)
    assert got["seeds"] == [0, 1] and got["other"] == narrow


def test_merge_puts_back_printed_rows_and_counts_their_time_once(tmp_path):
    out = tmp_path / "seq_x.json"
    out.write_text(json.dumps({"runs": [{"name": "pop", "seed": 0, "run": "a"}, {"name": "grec", "seed": 1, "run": "b"}],
                               "wall_s": 10.0}))
    log = tmp_path / "queue.log"
    row = {"name": "grec", "seed": 1, "run": "c", "wall_s": 5.0}
    log.write_text("== start grec seed 1\ncould not write seq_x.json; the row, to merge by hand:\n"
                   f"{json.dumps(row)}\nTraceback (most recent call last):\n")
    assert compare_jobs.merge_rows(out, log, write_rows(out)) == 1
    data = json.loads(out.read_text())
    assert {(r["name"], r["run"]) for r in data["runs"]} == {("pop", "a"), ("grec", "c")} and data["wall_s"] == 15.0
    compare_jobs.merge_rows(out, log, write_rows(out))  # the same log again: the same file
    assert json.loads(out.read_text()) == data


def test_resumable_takes_the_newest_stopped_run_and_clears_the_rest(tmp_path):
    out = tmp_path / "ckml-s0"
    assert compare_jobs.resumable(out) is None  # no folder yet
    (out / ".partial-ckml-aaa").mkdir(parents=True)  # stopped before its first epoch ended: nothing to resume
    assert compare_jobs.resumable(out) is None and not (out / ".partial-ckml-aaa").exists()
    for name, mtime in ((".partial-ckml-bbb", 100), (".partial-ckml-ccc", 200)):
        ckpt = out / name / "checkpoints" / "last.pt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"x")
        (out / name / "config.yaml").write_text("model: {name: ckml}\n")
        os.utime(ckpt, (mtime, mtime))
    (out / "2026-finished-run").mkdir()
    assert compare_jobs.resumable(out) == out / ".partial-ckml-ccc"
    assert [p.name for p in out.iterdir()] == [".partial-ckml-ccc"]  # the rest is cleared
    (out / ".partial-ckml-ccc" / "checkpoints" / "last.pt").unlink()  # nothing left to resume: all cleared
    assert compare_jobs.resumable(out) is None and not any(out.iterdir())


def test_fresh_starts_stopped_runs_over(tmp_path, monkeypatch):
    """resumable(resume=False) clears a run folder that holds a checkpoint, and a --fresh call hands
    --fresh to its workers (so their stopped runs start over); a plain call does not."""
    out = tmp_path / "ckml-s0"
    ckpt = out / ".partial-ckml-aaa" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    (out / ".partial-ckml-aaa" / "config.yaml").write_text("model: {name: ckml}\n")
    assert compare_jobs.resumable(out, resume=False) is None and not any(out.iterdir())

    calls = []
    monkeypatch.setattr(compare_jobs, "run_jobs", lambda script, pairs, extra, *rest: calls.append(extra))
    results = tmp_path / "mb_x.json"
    for fresh in (True, False):
        compare_jobs.collect("x.py", results, fresh, [("ckml", 0)], ["--data", "x"], 1, None, write_rows(results), str)
    assert calls == [["--data", "x", "--fresh"], ["--data", "x"]]


def test_a_killed_comparison_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """mb_compare's worker: a run folder killed after epoch 2 (its partial folder, as a kill leaves it)
    continues to epoch 3 and ends with the metrics of a run never interrupted; its row says where it
    resumed and counts the seconds before the stop, and no partial folder is left."""
    import mb_compare
    from recforge.data.synthetic import make_synthetic

    log = tmp_path / "shop.csv"
    make_synthetic(n_users=200, n_items=120, seed=3, behaviors=True).interactions.select(
        "user_id", "item_id", "timestamp", "behavior").write_csv(log)
    data = str(log)
    monkeypatch.setattr(mb_compare, "run_dir", lambda data: tmp_path / "runs")
    monkeypatch.setitem(mb_compare.CAPS, "lightgcn-buy", 2)
    first = mb_compare.worker("lightgcn-buy", 0, data)
    folder = tmp_path / "runs" / "lightgcn-buy-s0"
    done = next(p for p in folder.iterdir() if p.is_dir())
    assert (done / "checkpoints" / "last.pt").is_file() and first["epochs_run"] == 2
    done.rename(folder / ".partial-lightgcn-killed")
    (folder / ".partial-lightgcn-early").mkdir()  # a second kill, before any checkpoint: cleared

    monkeypatch.setitem(mb_compare.CAPS, "lightgcn-buy", 3)
    resumed = mb_compare.worker("lightgcn-buy", 0, data)
    assert resumed["resumed"]["after_epoch"] == 2 and resumed["epochs_run"] == 3
    assert resumed["wall_s"] >= resumed["resumed"]["seconds_before"] > 0
    assert [p.name for p in folder.iterdir()] == [Path(resumed["run"]).name]  # the partials are gone

    (folder / Path(resumed["run"]).name).rename(folder / ".partial-lightgcn-again")  # a checkpoint to resume...
    fresh = mb_compare.worker("lightgcn-buy", 0, data, fresh=True)  # ...which a --fresh call starts over
    assert "resumed" not in fresh and fresh["epochs_run"] == 3
    assert [p.name for p in folder.iterdir()] == [Path(fresh["run"]).name]
    assert fresh["full"] == resumed["full"] and fresh["sampled99"] == resumed["sampled99"]
