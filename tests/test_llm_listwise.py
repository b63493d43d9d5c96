"""The language-model task's sampled listwise protocol (``eval.listwise``): the candidate sets (the
target once, negatives the user never rated, drawn with the test seed only), the ranking metrics with
pessimistic ties worked by hand, and run folders of an LLM and the ID baseline ranking the same
candidates under the SAMPLED label, on a tiny random Llama."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from recforge.errors import ConfigError

from test_llm import needs_llm
from test_llm import ml, split, tiny  # noqa: F401 - pytest fixtures shared with test_llm


@pytest.fixture(scope="module")
def prepared(ml):
    from recforge.llm import task

    cfg = task.resolve("lr", str(ml), {"data.cache": False, "split.test_ratio": 0.25, "data.test_prompts": 30,
                                       "eval.listwise": 8, "eval.listwise_targets": 6})
    ds, split, test, _ = task.prepare(cfg)
    return cfg, ds, split, test


# ---- the ranking metrics by hand --------------------------------------------------------------------
def test_target_ranks_and_metrics_by_hand_with_pessimistic_ties():
    from recforge.llm import task

    scores = np.array([[0.9, 0.1, 0.5, 0.2],    # target best: rank 1
                       [0.3, 0.3, 0.8, 0.1],    # one negative above, one tied: rank 3 (the tie counts ahead)
                       [0.2, 0.2, 0.2, 0.2],    # all tied: last, rank 4
                       [0.1, 0.7, np.nan, 0.6]])  # target in the middle column; a NaN score ranks lowest
    is_target = np.zeros_like(scores, dtype=bool)
    is_target[[0, 1, 2, 3], [0, 0, 3, 2]] = True
    # row 3's target is the NaN: every negative ranks ahead of it
    ranks = task.target_ranks(scores, is_target)
    assert ranks.tolist() == [1, 3, 4, 4]
    m = task.listwise_metrics(ranks)
    assert m["hr@1"] == pytest.approx(0.25) and m["hr@5"] == 1.0 and m["hr@10"] == 1.0
    assert m["ndcg@5"] == pytest.approx((1 + 1 / np.log2(4) + 2 / np.log2(5)) / 4)
    assert m["ndcg@10"] == pytest.approx(m["ndcg@5"])
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 4 + 1 / 4) / 4)
    # a target past 5 (rank 7 of 12) counts for @10 only
    m2 = task.listwise_metrics(np.array([7]))
    assert m2["hr@5"] == 0 and m2["ndcg@5"] == 0 and m2["hr@10"] == 1 and m2["ndcg@10"] == pytest.approx(1 / 3)
    with pytest.raises(Exception, match="exactly one target"):
        task.target_ranks(scores, np.zeros_like(scores, dtype=bool))


# ---- the candidate sets -------------------------------------------------------------------------------
def test_candidates_hold_the_target_once_and_only_unrated_negatives(prepared):
    from recforge.llm import task

    cfg, _, split, test = prepared
    c = task.listwise_candidates(cfg, split, test)
    n = cfg["eval"]["listwise"]
    rated = set(zip(split.train["user_id"].to_list(), split.train["item_id"].to_list()))
    rated |= set(zip(split.test["user_id"].to_list(), split.test["item_id"].to_list()))
    liked = test.filter(pl.col("label") == 1)
    assert c.height == n * min(6, liked.height) and c["target"].n_unique() == min(6, liked.height)
    liked_rows = dict(zip(liked["row"].to_list(), liked.select("user_id", "item_id", "timestamp").rows()))
    for _, g in c.group_by("target"):
        assert g.height == n and g["item_id"].n_unique() == n and (g["label"] == 1).sum() == 1
        assert g["user_id"].n_unique() == 1 and g["timestamp"].n_unique() == 1 and g["row"].n_unique() == 1
        t = g.filter(pl.col("label") == 1).row(0, named=True)
        assert liked_rows[t["row"]] == (t["user_id"], t["item_id"], t["timestamp"])  # a liked test-sample row
        negs = g.filter(pl.col("label") == 0)
        assert t["item_id"] not in negs["item_id"].to_list()
        assert not any((u, i) in rated for u, i in zip(negs["user_id"], negs["item_id"]))
        assert all(1 <= i <= split.n_items for i in negs["item_id"])
    # the test seed draws them, the run seed does not
    again = task.listwise_candidates({**cfg, "seed": 7}, split, test)
    assert again.equals(c)
    other = task.listwise_candidates({**cfg, "data": {**cfg["data"], "test_seed": 1}}, split, test)
    assert not other.select("row", "item_id").equals(c.select("row", "item_id"))
    off = {**cfg, "eval": {**cfg["eval"], "listwise": 0}}
    assert task.listwise_candidates(off, split, test) is None


def test_bad_listwise_settings_are_clear_errors(prepared):
    from recforge.llm import task

    cfg, _, split, test = prepared
    for bad in (1, -3, "twenty", True):
        with pytest.raises(ConfigError, match="eval.listwise="):
            task.listwise_size({"eval": {"listwise": bad, "listwise_targets": 10}})
    with pytest.raises(ConfigError, match="eval.listwise_targets"):
        task.listwise_size({"eval": {"listwise": 5, "listwise_targets": 0}})
    with pytest.raises(ConfigError, match="items without a rating"):  # 30 items, 16 rated per user
        task.listwise_candidates({**cfg, "eval": {**cfg["eval"], "listwise": 20}}, split, test)


# ---- run folders: an LLM and the ID baseline rank the same candidates --------------------------------
@needs_llm
def test_llm_and_baseline_rank_the_same_sampled_candidates(tiny, ml, tmp_path):
    from recforge.llm import task

    n = 10
    common = {"data.test_prompts": 24, "data.cache": False, "split.test_ratio": 0.25, "eval.listwise": n,
              "eval.listwise_targets": 5}
    llm = task.train("rella", str(ml), {**common, "llm.path": str(tiny), "llm.encoder": "hashing:32", "model.k": 4,
                                        "model.retrieval": "recent", "model.verbose": False}, out=tmp_path / "a",
                     verbose=False)
    base = task.train("lr", str(ml), {**common, "model.epochs": 2, "seed": 3}, out=tmp_path / "b", verbose=False)
    off = task.train("lr", str(ml), {**common, "eval.listwise": 0, "model.epochs": 2, "seed": 3},
                     out=tmp_path / "c", verbose=False)
    frames = {}
    for name, run in (("rella", llm), ("lr", base)):
        m = json.loads((run.path / "metrics.json").read_text())
        lw, proto = m["test_listwise"], m["protocol"]["listwise"]
        assert set(lw) == {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"}
        assert all(0 <= v <= 1 for v in lw.values()) and lw["hr@10"] == 1.0  # N <= 10: every target in the top 10
        assert lw["hr@1"] <= lw["hr@5"] <= lw["hr@10"] and lw["ndcg@5"] <= lw["ndcg@10"]
        assert proto["candidates"] == n and proto["targets"] == 5 and "never rated" in proto["negatives"]
        assert proto["label"] == f"SAMPLED LISTWISE ({n} candidates)"
        assert "SAMPLED LISTWISE (10 candidates)" in task.format_metrics(m)
        f = pl.read_parquet(run.path / "listwise_test.parquet")
        assert f.height == 5 * n and f["score"].is_finite().all()
        # the recorded ranks and metrics follow from the recorded scores
        s, t = f["score"].to_numpy().reshape(-1, n), f["is_target"].to_numpy().reshape(-1, n)
        ranks = task.target_ranks(s, t)
        assert f["rank"].to_numpy()[::n].tolist() == ranks.tolist()
        assert task.listwise_metrics(ranks) == pytest.approx(lw)
        # a target candidate is the test-sample row itself: the same score as in the pointwise predictions
        pred = pl.read_parquet(run.path / "predictions_test.parquet")
        p = dict(zip(zip(pred["user"].to_list(), pred["item"].to_list()), pred["p:like"].to_list()))
        tg = f.filter(pl.col("is_target"))
        assert np.allclose([p[(str(u), i)] for u, i in zip(tg["user_id"], tg["item_id"])], tg["score"], atol=1e-5)
        frames[name] = f
    keys = ["target", "row", "user_id", "item_id", "is_target"]
    assert frames["rella"].select(keys).equals(frames["lr"].select(keys))  # two models, one seed apart: same candidates
    # per-target NDCG@10 from the recorded ranks, and the paired comparison built on it
    per = {name: task.listwise_per_target(run) for name, run in (("rella", llm), ("lr", base))}
    for name, run in (("rella", llm), ("lr", base)):
        r = frames[name].filter(pl.col("is_target")).sort("target")["rank"].to_numpy()
        assert per[name] == pytest.approx(1 / np.log2(r + 1)) and per[name].mean() == pytest.approx(
            run.metrics["test_listwise"]["ndcg@10"])
    assert task.listwise_per_target([llm, llm]) == pytest.approx(per["rella"])  # seeds of one model: the mean
    c = task.compare_listwise(base, llm)
    assert c["targets"] == 5 and c["diff"] == pytest.approx(per["rella"].mean() - per["lr"].mean())
    assert task.compare_listwise(llm, llm)["t_p"] is None  # identical rankings: no test to run
    with pytest.raises(Exception, match="eval.listwise=N"):
        task.listwise_per_target(off)
    # off: no listwise entry nor file, and the pointwise results are unchanged by the listwise pass
    assert "test_listwise" not in off.metrics and "listwise" not in off.metrics["protocol"]
    assert "test_listwise" not in json.loads((off.path / "metrics.json").read_text())
    assert not (off.path / "listwise_test.parquet").exists()
    assert off.metrics["test"]["auc"] == pytest.approx(base.metrics["test"]["auc"], abs=1e-9)
    assert "SAMPLED" not in task.format_metrics(off.metrics)
