"""Data-parallel training and sharded evaluation on 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch.multiprocessing as mp

import recforge
from recforge.training.distributed import shard_bounds

SASREC = ["epochs=6", "max_len=20", "hidden=32", "inner=64", "batch_size=64", "patience=20", "seed=0"]


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "recforge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_shard_bounds_cover_every_item_once():
    for n in (0, 1, 5, 7, 100):
        for size in (1, 2, 3, 8):
            parts = [shard_bounds(n, r, size) for r in range(size)]
            covered = np.concatenate([np.arange(a, b) for a, b in parts])
            assert covered.tolist() == list(range(n))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_worker(rank, size, port, folder, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(1)
    from recforge.evaluation.evaluator import evaluate
    from recforge.runs import Run
    from recforge.training import distributed

    distributed.init_from_env()
    run = Run.load(folder)
    import recforge.api as api

    cfg = run.config
    from recforge.pipeline import split_dataset, load_dataset

    split = split_dataset(load_dataset(cfg["data"]), cfg)
    _, test = api._eval_sets(cfg, split)
    res = evaluate(run.model, test, ks=[5, 10], popularity=split.item_popularity)
    if rank == 0:
        res.per_user.write_parquet(Path(out) / "per_user.parquet")
        (Path(out) / "metrics.json").write_text(json.dumps({"metrics": res.metrics, "groups": res.groups}))
    distributed.shutdown()


def test_sharded_evaluation_equals_one_process_exactly(tmp_path):
    """Every user counted once: the gathered per-user table and the metrics are those of one process
    (an odd number of users, so that the shards differ in size)."""
    run = recforge.train("ease", "synthetic", {"reg_lambda": 50.0}, out=tmp_path / "runs", verbose=False)
    from recforge.evaluation.evaluator import evaluate
    from recforge.pipeline import load_dataset, split_dataset
    import recforge.api as api

    cfg = run.config
    split = split_dataset(load_dataset(cfg["data"]), cfg)
    _, test = api._eval_sets(cfg, split)
    one = evaluate(run.model, test, ks=[5, 10], popularity=split.item_popularity)
    mp.start_processes(_eval_worker, args=(2, _free_port(), str(run.path), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    two = pl.read_parquet(tmp_path / "per_user.parquet")
    assert two.height == one.per_user.height == len(test)
    assert two["user"].to_list() == one.per_user["user"].to_list()  # each user once, in order
    assert two.equals(one.per_user)
    got = json.loads((tmp_path / "metrics.json").read_text())
    assert got["metrics"] == pytest.approx(one.metrics, abs=1e-12)
    assert set(got["groups"]) == set(one.groups) and one.groups
    for label, values in one.groups.items():
        assert got["groups"][label] == pytest.approx(values, abs=1e-12), label


def test_two_processes_train_like_one_at_the_same_global_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = _cli("train", "sasrec", "--data", "synthetic", "--out", str(tmp_path / "one"), "--quiet", *SASREC, env=env)
    assert one.returncode == 0, one.stderr
    two = _cli("train", "sasrec", "--data", "synthetic", "--out", str(tmp_path / "two"), "--quiet", "--nproc", "2",
               *SASREC, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    runs = [p for p in (tmp_path / "two").iterdir()]
    assert len(runs) == 1 and not runs[0].name.startswith(".")  # only rank 0 wrote, and nothing else is left
    assert str(runs[0]) in two.stdout.splitlines()[-1]
    a = json.loads((Path(one.stdout.strip().splitlines()[-1]) / "metrics.json").read_text())
    b = json.loads((runs[0] / "metrics.json").read_text())
    assert b["timing"]["processes"] == 2 and "processes" not in a["timing"]
    assert b["test"]["n_users"] == a["test"]["n_users"]
    # the same global batch, other random draws (negatives, dropout) in each process: close, not equal
    for key in ("ndcg@10", "hr@10"):
        assert b["test"][key] == pytest.approx(a["test"][key], abs=0.03), key
    hist_a = json.loads((Path(one.stdout.strip().splitlines()[-1]) / "history.json").read_text())["epochs"]
    hist_b = json.loads((runs[0] / "history.json").read_text())["epochs"]
    assert len(hist_a) == len(hist_b)
    assert hist_b[-1]["loss"] == pytest.approx(hist_a[-1]["loss"], rel=0.05)
    assert hist_b[-1]["loss"] < hist_b[0]["loss"]


def test_ctr_model_in_two_processes_trains_like_one(tmp_path):
    """DeepFM (batch norm, dropout) on labelled rows: 2 processes at the same global batch learn
    what one process learns; only rank 0 writes the run folder."""
    from test_ctr_models import _write_libsvm

    data = _write_libsvm(tmp_path / "toy")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--data", str(data), "--quiet", "data.fields=user,item,ctx", "epochs=4", "batch_size=256",
              "embedding_dim=8", "hidden=[32]", "threads=1", "patience=10"]
    one = _cli("train", "deepfm", "--out", str(tmp_path / "one"), *common, env=env)
    two = _cli("train", "deepfm", "--out", str(tmp_path / "two"), "--nproc", "2", *common, env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    runs = list((tmp_path / "two").iterdir())
    assert len(runs) == 1 and not runs[0].name.startswith(".")
    a = json.loads((Path(one.stdout.strip().splitlines()[-1]) / "metrics.json").read_text())
    b = json.loads((runs[0] / "metrics.json").read_text())
    assert b["timing"]["processes"] == 2 and b["task"] == "ctr"
    assert a["test"]["auc"] > 0.75 and b["test"]["auc"] == pytest.approx(a["test"]["auc"], abs=0.03)


def test_predict_in_two_processes_writes_the_same_file(tmp_path):
    run = recforge.train("ease", "synthetic", {"reg_lambda": 50.0}, out=tmp_path / "runs", verbose=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = _cli("predict", str(run.path), "--out", str(tmp_path / "one.parquet"), "-k", "7", "--quiet", env=env)
    two = _cli("predict", str(run.path), "--out", str(tmp_path / "two.parquet"), "-k", "7", "--quiet", "--nproc", "2",
               env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    a, b = pl.read_parquet(tmp_path / "one.parquet"), pl.read_parquet(tmp_path / "two.parquet")
    assert a.equals(b)
    assert a.height == run.dataset.n_users * 7
    assert a.columns == ["user_id", "rank", "item_id", "score"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.parquet", "runs", "two.parquet"]
    # a recommended item is never one the user has already seen
    um = run.dataset.user_map.select(pl.col("raw").alias("user_id"), pl.col("idx").alias("u"))
    im = run.dataset.item_map.select(pl.col("raw").alias("item_id"), pl.col("idx").alias("i"))
    enc = a.join(um, on="user_id").join(im, on="item_id")
    assert enc.height == a.height
    seen = run.dataset.interactions.select(pl.col("user_id").alias("u"), pl.col("item_id").alias("i"))
    assert enc.join(seen, on=["u", "i"]).height == 0


def test_predict_bad_input(tmp_path, capsys):
    from recforge.cli import main

    run = recforge.train("pop", "synthetic", {}, out=tmp_path / "runs", verbose=False)
    assert main(["predict", str(run.path), "--out", str(tmp_path / "x.parquet"), "--users",
                 str(tmp_path / "none.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "u.txt").write_text("1\nnot-a-user\n")
    assert main(["predict", str(run.path), "--out", str(tmp_path / "x.parquet"), "--users", str(tmp_path / "u.txt")]) == 2
    assert "not in this run's data" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()
