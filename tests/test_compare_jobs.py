"""The comparison benchmarks' shared machinery (benchmarks/compare_jobs.py): calls running at once
on the same data keep each other's rows, and a (model, seed) run folder has one writer at a time."""

from __future__ import annotations

import json
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
