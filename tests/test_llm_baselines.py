"""The language-model task's sequential ID baseline (``recforge.llm.baselines``): Platt scaling that
never reverses a ranking, histories built from earlier likes only, and a SASRec run scored on the same
test sample and listwise candidates as the CTR baseline."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from recforge.errors import ConfigError

from test_llm import ml, split  # noqa: F401 - pytest fixtures shared with test_llm


def test_platt_recovers_a_known_scaling_and_never_reverses_the_ranking():
    from recforge.llm.baselines import PLATT_MIN_SLOPE, platt

    rng = np.random.default_rng(0)
    s = rng.normal(3.0, 2.0, 40_000)
    y = (rng.random(len(s)) < 1 / (1 + np.exp(-(0.7 * s - 2.4)))).astype(float)
    a, b = platt(s, y)
    assert a == pytest.approx(0.7, abs=0.05) and b == pytest.approx(-2.4, abs=0.15)
    # scores that run against the labels: the slope stays positive (floored), the rate is the base rate
    a2, b2 = platt(-s, y)
    assert 0 < a2 <= PLATT_MIN_SLOPE / (-s).std() * 1.0001
    p = 1 / (1 + np.exp(-(a2 * -s + b2)))
    assert p.mean() == pytest.approx(y.mean(), abs=1e-3)
    assert np.all(np.diff(p[np.argsort(-s)]) >= 0)  # increasing in the score: no reversal
    with pytest.raises(ConfigError, match="both classes"):
        platt(s[:10], np.ones(10))


class _Echo(torch.nn.Module):
    """A stand-in model whose score of an item encodes the history it was given and the item."""

    def __init__(self):
        super().__init__()
        self.net_ = torch.nn.Linear(1, 1)
        self.seen = []

    def score(self, hist):
        out = torch.zeros(len(hist), hist.n_items + 1)
        for r in range(len(hist)):
            h = hist.items[hist.indptr[r]:hist.indptr[r + 1]].tolist()
            self.seen.append((int(hist.users[r]), h))
            out[r] = 1000.0 * len(h) + torch.arange(hist.n_items + 1)  # the item, after the history
        return out


def test_sequence_baseline_histories_hold_only_earlier_likes(split):  # noqa: F811
    from recforge.llm.baselines import _scores

    _, sp = split
    liked = sp.train.filter(pl.col("label") == 1).select("user_id", "item_id", "timestamp")
    frame = sp.test
    est = _Echo()
    s, fallback = _scores(est, sp, frame, liked)
    # one pass over the catalogue per (user, time), whatever the number of rows at that time
    assert len(est.seen) == frame.select("user_id", "timestamp").unique().height < frame.height
    seen = {}
    for u, h in est.seen:
        seen.setdefault(u, []).append(h)
    n_fallback = 0
    for row, score in zip(frame.iter_rows(named=True), s):
        u, t = row["user_id"], row["timestamp"]
        earlier = sp.train.filter((pl.col("user_id") == u) & (pl.col("timestamp") < t)).sort("timestamp",
                                                                                               maintain_order=True)
        likes = earlier.filter(pl.col("label") == 1)["item_id"].to_list()
        h = likes or earlier["item_id"].to_list()
        assert h and h in seen[u]  # the earlier likes; with none, the user's earlier rated items
        n_fallback += not likes
        assert row["item_id"] not in h or row["item_id"] in earlier["item_id"].to_list()  # never the test row itself
        assert score == 1000 * len(h) + row["item_id"]
    assert fallback == n_fallback
    # a training row in the middle of a user's history sees only the likes before it
    mid = sp.train.filter(pl.col("user_id") == 0).sort("timestamp").slice(6, 1)
    est2 = _Echo()
    _scores(est2, sp, mid, liked)
    t = mid["timestamp"][0]
    before = liked.filter((pl.col("user_id") == 0) & (pl.col("timestamp") < t)).sort("timestamp", maintain_order=True)
    assert est2.seen[0][1] == (before["item_id"].to_list() or sp.train.filter(
        (pl.col("user_id") == 0) & (pl.col("timestamp") < t))["item_id"].to_list())


def test_sasrec_baseline_scores_the_shared_sample_and_candidates(ml, tmp_path):  # noqa: F811
    from recforge.llm import task

    common = {"data.test_prompts": 24, "data.cache": False, "split.test_ratio": 0.25, "eval.listwise": 10,
              "eval.listwise_targets": 5}
    seq = task.train("sasrec", str(ml), {**common, "model.epochs": 4, "model.hidden": 16}, out=tmp_path / "s",
                     verbose=False)
    lr = task.train("lr", str(ml), {**common, "model.epochs": 2}, out=tmp_path / "l", verbose=False)
    m = json.loads((seq.path / "metrics.json").read_text())
    assert "liked training items" in m["protocol"]["baseline"] and "Platt" in m["protocol"]["baseline"]
    assert m["training"]["platt"]["a"] > 0 and 1 <= m["training"]["best_epoch_search"] <= 4
    assert m["protocol"]["listwise"]["label"] == "SAMPLED LISTWISE (10 candidates)"
    hist = json.loads((seq.path / "history.json").read_text())
    assert set(hist) == {"epoch_search", "refit"}
    # the same test rows and the same candidates as the CTR baseline
    ps, pr = (pl.read_parquet(r.path / "predictions_test.parquet") for r in (seq, lr))
    assert ps.select("row", "user", "item").equals(pr.select("row", "user", "item"))
    ls, lt = (pl.read_parquet(r.path / "listwise_test.parquet") for r in (seq, lr))
    keys = ["target", "row", "user_id", "item_id", "is_target"]
    assert ls.select(keys).equals(lt.select(keys))
    # probabilities, and the AUC is the model's own ranking (pairs counted by hand, ties one half)
    p, y = ps["p:like"].to_numpy(), ps["label:like"].to_numpy()
    assert np.all((p > 0) & (p < 1)) and len(np.unique(p)) > 1
    pos, neg = p[y == 1], p[y == 0]
    by_hand = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert m["test"]["auc"] == pytest.approx(by_hand)
    n = 10
    ranks = task.target_ranks(ls["score"].to_numpy().reshape(-1, n), ls["is_target"].to_numpy().reshape(-1, n))
    assert task.listwise_metrics(ranks) == pytest.approx(m["test_listwise"])
    # a ranking model that is neither sequential nor CTR is refused with the choices named
    with pytest.raises(ConfigError, match="sequential model"):
        task.resolve("ease", str(ml))
