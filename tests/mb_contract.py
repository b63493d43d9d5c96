"""Checks every multi-behaviour model passes, shared by their test files: it beats popularity on the
synthetic funnel, a saved and loaded model scores identically, and raw histories (no behaviours, an
unknown user -1, as ``recommend`` and the server pass them) score finitely."""

from __future__ import annotations

import torch

from recforge.evaluation.batch import Histories
from recforge.evaluation.evaluator import Protocol, evaluate
from recforge.models.base import Recommender
from recforge.models.general.pop import Pop

PROTOCOL = Protocol(exclude="target_behavior", target_behavior="buy")


def ndcg(model, evalset) -> float:
    """NDCG@10 under the target-behaviour exclusion (past purchases removed, views stay candidates)."""
    return evaluate(model, evalset, ks=[10], protocol=PROTOCOL, groups=False).metrics["ndcg@10"]


def assert_beats_popularity(model, split, test, margin: float = 1.1) -> None:
    pop = ndcg(Pop().fit(split), test)
    assert ndcg(model, test) > pop * margin


def assert_round_trip(model, test, path) -> Recommender:
    """Saved and loaded, the model scores 50 test histories identically; returns the loaded model."""
    hist = test.histories.slice(0, 50)
    before = model.score(hist)
    loaded = Recommender.load(model.save(path))
    assert type(loaded) is type(model) and loaded.behaviors_ == ["buy", "cart", "view"]
    torch.testing.assert_close(loaded.score(hist), before)
    assert loaded.protocol_notes()["target_behavior"] == "buy"
    return loaded


def assert_raw_histories_score(model, test):
    """Two test rows scored as raw histories (a known user and an unknown one, -1): finite scores
    and a top-5 for each; returns ``(rows, their item lists, the raw Histories)``."""
    h = test.histories.slice(0, 2)
    items = [h.items[h.indptr[0] : h.indptr[1]].tolist(), h.items[h.indptr[1] : h.indptr[2]].tolist()]
    raw = Histories.from_lists([int(h.users[0]), -1], items, h.n_items)
    s = model.score(raw)
    assert s.shape == (2, h.n_items + 1) and torch.isfinite(s).all()
    top, _ = model.recommend(raw, k=5)
    assert top.shape == (2, 5)
    return h, items, raw
