"""End-to-end checks of the command line and the Python API on the built-in synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

import recforge
import recforge.data.dataset
from recforge.cli import main

SMALL = ["data=synthetic"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    a = recforge.train("ease", "synthetic", {"reg_lambda": 100.0}, out=out, verbose=False)
    b = recforge.train("pop", "synthetic", {}, out=out, verbose=False)
    return out, a, b


def test_train_writes_complete_run_folder(runs):
    out, a, _ = runs
    files = {p.name for p in a.path.iterdir()}
    assert {"config.yaml", "metrics.json", "per_user_test.parquet", "per_user_valid.parquet", "model",
            "user_map.parquet", "item_map.parquet", "interactions.parquet", "train.log"} <= files
    m = json.loads((a.path / "metrics.json").read_text())
    for key in ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr"):
        assert 0.0 <= m["test"][key] <= 1.0
    assert "ndcg@10" in m["valid"]
    assert m["protocol"]["ranking"] == "full"
    assert m["protocol"]["split"]["split"] == "leave-one-out"
    assert m["protocol"]["subsequence_split"] == "none"
    per_user = pl.read_parquet(a.path / "per_user_test.parquet")
    assert per_user.height == m["test"]["n_users"]
    assert per_user["ndcg@10"].mean() == pytest.approx(m["test"]["ndcg@10"])
    assert not any(p.name.startswith((".tmp", ".partial")) for p in out.iterdir())


def test_same_seed_same_metrics(tmp_path):
    r1 = recforge.train("bpr", "synthetic", {"epochs": 2, "seed": 3}, out=tmp_path, verbose=False)
    r2 = recforge.train("bpr", "synthetic", {"epochs": 2, "seed": 3}, out=tmp_path, verbose=False)
    assert r1.metrics["test"]["ndcg@10"] == r2.metrics["test"]["ndcg@10"]
    assert r1.path != r2.path


def test_evaluate_matches_training_and_labels_sampled(runs):
    _, a, _ = runs
    full = recforge.evaluate(a.path)
    assert full["test"]["ndcg@10"] == pytest.approx(a.metrics["test"]["ndcg@10"])
    sampled = recforge.evaluate(a.path, sampled="50")
    assert sampled["protocol"]["ranking"] == "sampled"
    assert "SAMPLED" in sampled["protocol"]["label"]
    assert sampled["test"]["hr@10"] > full["test"]["hr@10"]  # 50 negatives are easier than 1000 items


def test_recommend_raw_ids_in_and_out(runs, capsys):
    _, a, _ = runs
    ds = a.dataset
    user = ds.user_map["raw"][0]
    recs = recforge.recommend(a.path, user=user, k=5)
    assert len(recs) == 5
    history = set(ds.decode_items(a.history_of(0)))
    assert not history & {r["item_id"] for r in recs}
    assert set(r["item_id"] for r in recs) <= set(ds.item_map["raw"].to_list())
    # a brand-new user given a raw history
    raw_hist = ds.decode_items([1, 2, 3])
    recs_new = recforge.recommend(a.path, history=raw_hist, k=3)
    assert len(recs_new) == 3 and not set(raw_hist) & {r["item_id"] for r in recs_new}
    assert main(["recommend", str(a.path), "--user", str(user), "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_compare_reports_p_values(runs, capsys):
    _, a, b = runs
    res = recforge.compare(b.path, a.path)
    row = {r["metric"]: r for r in res["rows"]}["ndcg@10"]
    assert row["b"] > row["a"]  # EASE beats Pop on the synthetic data
    assert row["t_test_p"] < 0.05 and row["wilcoxon_p"] < 0.05
    assert main(["compare", str(b.path), str(a.path)]) == 0
    assert "wilcoxon" in capsys.readouterr().out


def test_compare_averages_seeds_per_user(runs, tmp_path, capsys):
    out, a, b = runs
    a2 = recforge.train("ease", "synthetic", {"reg_lambda": 10.0}, out=tmp_path, verbose=False)
    res = recforge.compare([a, a2], b)
    row = {r["metric"]: r for r in res["rows"]}["ndcg@10"]
    both = (a.metrics["test"]["ndcg@10"] + a2.metrics["test"]["ndcg@10"]) / 2
    assert row["a"] == pytest.approx(both) and row["b"] == pytest.approx(b.metrics["test"]["ndcg@10"])
    assert res["n_runs"] == [2, 1] and row["n_users"] == a.metrics["test"]["n_users"]
    assert main(["compare", f"{a.path},{a2.path}", str(b.path)]) == 0
    assert "per-user means over 2 and 1 runs" in capsys.readouterr().out


def test_bench_leaderboard(tmp_path):
    board = recforge.bench(["pop", "itemknn"], ["synthetic"], seeds=[0, 1], out=tmp_path)
    folder = Path(board["folder"])
    md = (folder / "leaderboard.md").read_text()
    assert "itemknn" in md and "±" in md and "full ranking" in md
    data = json.loads((folder / "leaderboard.json").read_text())
    assert {r["model"] for r in data["rows"]} == {"pop", "itemknn"}
    assert all(r["n_seeds"] == 2 for r in data["rows"])
    # every row holds the tail/head item groups and the history-length groups
    row = data["rows"][0]
    assert {"item:tail ndcg@10", "item:head ndcg@10", "hist:0-5 ndcg@10", "hist:>50 ndcg@10"} <= set(row)
    assert "item:tail" in md and "hist:" not in md
    from recforge.reports.leaderboard import format_leaderboard

    assert "hist:6-10 ndcg@10" in format_leaderboard(board, "hist") and "item:" not in format_leaderboard(board, "hist")
    assert "item:" not in format_leaderboard(board, "none")


@pytest.mark.parametrize("argv, fragment", [
    (["train", "nosuch", "--data", "synthetic"], "unknown model"),
    (["train", "ease", "--data", "/does/not/exist.csv"], "unknown dataset"),
    (["train", "ease", "--data", "synthetic", "foo=1"], "unknown override key 'foo'"),
    (["train", "ease", "--data", "synthetic", "model.nope=1"], "unknown parameter 'nope'"),
    (["train", "ease", "--data", "synthetic", "data.min_user=100000"], "no interactions left"),
    (["train", "ease", "--data", "synthetic", "split.method=magic"], "unknown split"),
    (["train", "ease", "--data", "synthetic", "eval.sampled=abc"], "eval.sampled"),
    (["train", "ease", "--data", "synthetic", "eval.exclude=seen"], "eval.exclude"),
    (["train", "ease", "--data", "synthetic", "eval.exclude_history=false"], "eval.exclude=none"),
    (["train", "ease", "--data", "synthetic", "eval.ties=random"], "eval.ties"),
    (["train", "ease", "--data", "synthetic", "eval.head_items=pareto"], "eval.head_items"),
    (["train", "ease", "--data", "synthetic", "eval.exclude=target_behavior"], "data.target_behavior"),
    (["recommend", "/no/run"], "not a run folder"),
])
def test_bad_input_one_line_exit_2(argv, fragment, tmp_path, capsys):
    code = main(argv + (["--out", str(tmp_path)] if argv[0] == "train" else []))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert fragment in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_bad_table_columns(tmp_path, capsys):
    f = tmp_path / "log.csv"
    f.write_text("uid,iid,ts\n1,2,3\n1,3,4\n2,2,5\n")
    out = tmp_path / "runs"
    code = main(["train", "pop", "--data", str(f), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--user-col" in err
    assert not out.exists() or not any(out.iterdir())
    code = main(["train", "pop", "--data", str(f), "--user-col", "uid", "--item-col", "iid", "--time-col", "ts",
                 "--out", str(out), "--quiet", "data.cache=false"])
    assert code == 0
    f2 = tmp_path / "bad_time.csv"
    f2.write_text("user_id,item_id,timestamp\n1,2,yesterday\n")
    assert main(["train", "pop", "--data", str(f2), "--out", str(out), "data.cache=false"]) == 2
    assert "timestamp" in capsys.readouterr().err


def test_data_prepare_and_describe(tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "synthetic", "--out", str(out), "--min-user", "5"]) == 0
    ds = recforge.data.dataset.Dataset.load(out)
    assert ds.interactions.group_by("user_id").len()["len"].min() >= 5
    assert main(["data", "describe", "synthetic"]) == 0
    text = capsys.readouterr().out
    assert "users" in text and "item columns" in text
    # the item text the text-enhanced models would read, with the template in use
    assert "template: {title}. Category: {category}." in text and "1: " in text
    assert main(["data", "describe", "synthetic", "--template", "{category}"]) == 0
    assert "template: {category}" in capsys.readouterr().out
    assert main(["data", "describe", "synthetic", "--template", "{brand}"]) == 2
    assert "template" in capsys.readouterr().err
    assert main(["data", "prepare", "synthetic", "--out", str(out)]) == 2  # refuses to overwrite


def test_plot_run_png(runs, tmp_path):
    pytest.importorskip("matplotlib")
    _, a, _ = runs
    out = tmp_path / "p.png"
    assert main(["plot", str(a.path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def _rated_csv(path: Path) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    n_users, per_user = 60, 12
    users = np.repeat(np.arange(n_users), per_user)
    items = np.concatenate([rng.choice(50, per_user, replace=False) for _ in range(n_users)])
    pl.DataFrame({"user_id": users, "item_id": items, "rating": rng.integers(1, 6, len(users)),
                  "timestamp": np.arange(len(users))}).write_csv(path)
    return path


def test_target_min_rating_keeps_only_liked_targets(tmp_path):
    data = str(_rated_csv(tmp_path / "rated.csv"))
    raw = pl.read_csv(data).sort("timestamp")
    last = raw.group_by("user_id", maintain_order=True).last()  # leave-one-out test rows
    liked = int((last["rating"] >= 4).sum())
    assert 0 < liked < last.height
    base = recforge.train("pop", data, ["data.cache=false"], out=tmp_path / "runs", verbose=False)
    run = recforge.train("pop", data, ["data.cache=false", "eval.target_min_rating=4"], out=tmp_path / "runs",
                         verbose=False)
    assert base.metrics["test"]["n_users"] == last.height
    assert run.metrics["test"]["n_users"] == liked
    assert "rated >= 4" in run.metrics["protocol"]["targets"]
    # a signed-rating model ranks liked items: its positive threshold is the default
    signed = recforge.train("lsgrec", data, ["data.cache=false", "epochs=1"], out=tmp_path / "runs", verbose=False)
    assert signed.metrics["test"]["n_users"] == liked
    with pytest.raises(recforge.errors.ConfigError, match="rating"):
        recforge.train("pop", "synthetic", ["eval.target_min_rating=4"], out=tmp_path / "runs", verbose=False)


def test_protocol_named_in_metrics_and_leaderboard(runs, tmp_path):
    """The exclusion set, the tie rule and the head/tail rule are written next to every number."""
    _, a, _ = runs
    p = a.metrics["protocol"]
    assert (p["exclude"], p["ties"], p["head_items"]) == ("history", "pessimistic", "share:0.8")
    assert a.config["eval"]["exclude"] == "history"  # auto, resolved for this data and saved
    other = recforge.evaluate(a.path, exclude="none", ties="index", head_items="top:0.2")
    assert (other["protocol"]["exclude"], other["protocol"]["ties"]) == ("none", "index")
    assert other["protocol"]["head_items"] == "top:0.2"
    from recforge.reports.leaderboard import _protocol_text

    assert "excluded=history, ties=pessimistic" in _protocol_text(p)
    # a leaderboard row from before the protocol was named: index ties, history excluded
    assert "excluded=history, ties=index" in _protocol_text({"ranking": "full", "exclude_history": True})


def test_exclude_auto_by_data_kind():
    from recforge.config import resolve_exclude

    cfg = recforge.api.resolve("pop", "synthetic")
    assert resolve_exclude(cfg) == "history"
    assert resolve_exclude(recforge.api.resolve("pop", "synthetic", {"data.dedupe": "none"})) == "none"
    assert resolve_exclude(recforge.api.resolve("pop", "synthetic", {"data.target_behavior": "buy"})) == "target_behavior"
    assert resolve_exclude(recforge.api.resolve("pop", "synthetic", {"data.dedupe": "none",
                                                                     "eval.exclude": "history"})) == "history"
    assert resolve_exclude(cfg, has_behaviors=True) == "none"  # view then buy must stay possible
    old = {"data": {}, "eval": {"exclude_history": False}}  # a config written before eval.exclude
    assert resolve_exclude(old) == "none"


def test_non_finite_loss_stops_training_with_a_clear_error(tmp_path, monkeypatch):
    """The loss turns NaN in the first batch: training stops, naming the epoch and the loss and
    what to try; no run folder is left behind."""
    import torch

    from recforge.errors import TrainingError
    from recforge.models.general.bpr import BPRMF

    real = BPRMF.loss
    monkeypatch.setattr(BPRMF, "loss", lambda self, batch: real(self, batch) * torch.tensor(float("nan")))
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 1, batch 1.*lower learning rate"):
        recforge.train("bpr", "synthetic", {"epochs": 2}, out=tmp_path, verbose=False)
    assert not any(tmp_path.iterdir())


def test_target_behavior_protocol_end_to_end(tmp_path):
    """A log with views and purchases where every user's last event is the purchase of the item
    viewed just before. ``data.target_behavior=buy`` resolves ``auto`` to ``target_behavior``
    (only items already bought leave the ranking); without it the data kind gives ``none``;
    ``history`` removes the viewed target too, so every test purchase is a miss."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows, t = [], 0
    for u in range(60):
        for _ in range(12):
            i, t = int(rng.integers(1, 40)), t + 1
            rows.append((u, i, t, "view"))
            if rng.random() < 0.3:
                t += 1
                rows.append((u, i, t, "buy"))
        i = 40 + u % 5  # an item this user has not met before
        rows += [(u, i, t + 1, "view"), (u, i, t + 2, "buy")]
        t += 2
    f = tmp_path / "log.csv"
    pl.DataFrame(rows, schema=["uid", "iid", "ts", "act"], orient="row").write_csv(f)
    cols = {"data.user_col": "uid", "data.item_col": "iid", "data.time_col": "ts", "data.behavior_col": "act"}
    a = recforge.train("pop", str(f), {**cols, "data.target_behavior": "buy"}, out=tmp_path / "runs", verbose=False)
    assert (a.metrics["protocol"]["exclude"], a.metrics["protocol"]["target_behavior"]) == ("target_behavior", "buy")
    assert a.metrics["test"]["mrr"] > 0
    b = recforge.train("pop", str(f), cols, out=tmp_path / "runs", verbose=False)
    assert b.metrics["protocol"]["exclude"] == "none" and b.metrics["test"]["mrr"] > 0
    strict = recforge.evaluate(b.path, exclude="history")
    assert strict["protocol"]["exclude"] == "history"
    assert strict["test"]["mrr"] == 0.0 and strict["test"]["hr@20"] == 0.0


def test_separator_overrides_stay_text():
    """``data.sep=|`` and ``data.splitter=|`` name a separator: YAML would read ``|``/``>`` as an empty
    block scalar and ``#`` as a comment, silently giving the default separator; YAML 1.1 reads
    ``1e-3`` as text, a learning rate as a string."""
    from recforge.config import parse_value

    assert [parse_value(v) for v in ("|", ">", "#", ";", "a|b")] == ["|", ">", "#", ";", "a|b"]
    assert [parse_value(v) for v in ("null", "~", "", "3", "1e-3", "[64, 64]", "true")] == [
        None, None, None, 3, 1e-3, [64, 64], True]


def test_python_dash_m_runs_the_command():
    """``python -m recforge`` is the ``recforge`` command: same listing, same exit status on bad input."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "recforge", "models"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "sasrec" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "recforge", "train", "no-such-model", "--data", "synthetic"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no-such-model" in bad.stderr
