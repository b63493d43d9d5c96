"""The evaluator on a tiny hand-made split with a fake scorer: exclusions, groups, coverage,
per-user table, the sampled-negative protocol, and batch-size invariance.

The split (encoded ids, 3 users, items 1..6):

====  ===============  ==========  ===============  ===================
user  train (t)        valid (t)   test (t)         test history
====  ===============  ==========  ===============  ===================
0     1 (1), 2 (2)     3 (3)       4 (4)            1, 2, 3
1     5 (1), 2 (2)     6 (3)       2 (4) (repeat)   5, 2, 6
2     1 (1), 2 (2)     -           3 (3), 5 (4)     1, 2
====  ===============  ==========  ===============  ===================

Fake scores (column 0 always has the highest score and must never be ranked):

* user 0: ``[100, 10, 9, 8, 2, 3, 1]`` -> history 1, 2, 3 (best scores) removed; candidates
  5 (3), 4 (2), 6 (1): target 4 has rank 2.
* user 1: ``[50, 4, 5, 6, 1, 9, 8]`` -> history 5, 2, 6 removed (``exclude=history``, the
  default): target 2 is a repeat of a history item, so it is a miss; candidates 3 (6), 1 (4),
  4 (1). With ``exclude=none`` nothing is removed and 2 ranks behind 5, 6, 3.
* user 2: ``[80, 9, 8, 7, 6, 1, 5]`` -> candidates 3 (7), 4 (6), 6 (5), 5 (1): targets 3 and 5
  have ranks 1 and 4.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from recforge.data.split import Split
from recforge.evaluation.batch import EvalSet, Histories, build_evalset
from recforge.evaluation.evaluator import Protocol, evaluate, head_items, parse_head_rule, rank_scores
from recforge.evaluation.metrics import MISS_RANK
from recforge.errors import ConfigError

LOG2 = math.log2
TABLE = torch.tensor(
    [
        [100, 10, 9, 8, 2, 3, 1],
        [50, 4, 5, 6, 1, 9, 8],
        [80, 9, 8, 7, 6, 1, 5],
    ],
    dtype=torch.float32,
)


class FakeScorer:
    """Returns the fixed row of ``TABLE`` for every user of the batch."""

    def __init__(self, table=TABLE):
        self.table = table.clone()
        self.calls = 0

    def score(self, hist):
        self.calls += 1
        return self.table[torch.from_numpy(hist.users)]


class FixedTensorScorer:
    """Returns the very same tensor object on every call (a model serving cached scores)."""

    def __init__(self, table=TABLE):
        self.table = table.clone()

    def score(self, hist):
        assert len(hist) == self.table.shape[0]
        return self.table


def _frame(rows):
    return pl.DataFrame(rows, schema={"user_id": pl.Int32, "item_id": pl.Int32, "timestamp": pl.Int64},
                        orient="row")


@pytest.fixture(scope="module")
def split():
    train = _frame([(0, 1, 1), (0, 2, 2), (1, 5, 1), (1, 2, 2), (2, 1, 1), (2, 2, 2)])
    valid = _frame([(0, 3, 3), (1, 6, 3)])
    test = _frame([(0, 4, 4), (1, 2, 4), (2, 3, 3), (2, 5, 4)])
    return Split(train, valid, test, n_users=3, n_items=6)


@pytest.fixture(scope="module")
def evalset(split):
    return build_evalset(split.history("test"), split.test, split.n_users, split.n_items, "test")


def test_evalset_layout(evalset):
    assert evalset.users.tolist() == [0, 1, 2]
    assert evalset.targets.tolist() == [[4, 0], [2, 0], [3, 5]]
    h = evalset.histories
    assert [h.items[h.indptr[i] : h.indptr[i + 1]].tolist() for i in range(3)] == [[1, 2, 3], [5, 2, 6], [1, 2]]


def test_exclusion_and_padding_column(evalset):
    hist = evalset.histories
    tg = torch.from_numpy(evalset.targets)
    scores, ranks = rank_scores(FakeScorer(), hist, tg, Protocol(), None, np.random.default_rng(0))
    assert torch.isinf(scores[:, 0]).all()
    # every history item is -inf, user 1's item 2 too although it is a target again
    assert torch.isinf(scores[0, [1, 2, 3]]).all()
    assert torch.isinf(scores[1, [2, 5, 6]]).all()
    assert torch.isinf(scores[2, [1, 2]]).all()
    assert ranks[0, 0] == 2 and ranks[1, 0] == MISS_RANK
    assert ranks[2].tolist() == [1, 4]


def test_full_ranking_metrics_hand_worked(evalset):
    res = evaluate(FakeScorer(), evalset, ks=(1, 2, 3))
    m = res.metrics
    assert m["n_users"] == 3
    # user 0: one target at rank 2; user 1: a miss (its target is a history item); user 2:
    # ranks 1 and 4 of two targets
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@2"] == pytest.approx(2 / 3)
    assert m["recall@2"] == pytest.approx((1 + 0 + 1 / 2) / 3)
    assert m["precision@1"] == pytest.approx((0 + 0 + 1) / 3)
    assert m["precision@3"] == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)
    ndcg2_u2 = 1 / (1 + 1 / LOG2(3))
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@2"] == pytest.approx((1 / LOG2(3) + ndcg2_u2) / 3)
    assert m["ndcg@3"] == pytest.approx((1 / LOG2(3) + ndcg2_u2) / 3)
    assert m["mrr"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert m["mrr@1"] == pytest.approx(1 / 3)
    assert m["map@1"] == pytest.approx(1 / 3)
    assert m["map@3"] == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)
    # coverage: top-1 lists {5}, {3}, {3}; top-2 add 4, 1, 4; top-3 add 6, 4, 6 (item 2 is in
    # every history, so it is never recommended)
    assert m["coverage@1"] == pytest.approx(2 / 6)
    assert m["coverage@2"] == pytest.approx(4 / 6)
    assert m["coverage@3"] == pytest.approx(5 / 6)
    assert res.protocol == {"ranking": "full", "exclude": "history", "ties": "pessimistic"}


def test_without_history_exclusion_column_zero_still_never_ranked(evalset):
    """No exclusion: user 0's target 4 comes after 1, 2, 3, 5 (rank 5), user 1's 2 after 5, 6, 3
    (rank 4), user 2's 3 and 5 at ranks 3 and 6. Column 0 (the best score) would add one to each."""
    res = evaluate(FakeScorer(), evalset, ks=(5,), protocol=Protocol(exclude="none"))
    assert res.per_user["mrr"].to_list() == pytest.approx([1 / 5, 1 / 4, 1 / 3])
    assert res.per_user["recall@5"].to_list() == pytest.approx([1.0, 1.0, 1 / 2])
    assert res.protocol["exclude"] == "none"


def test_per_user_table(evalset):
    res = evaluate(FakeScorer(), evalset, ks=(1, 2))
    t = res.per_user
    assert t.columns[:2] == ["user", "history_length"]
    assert set(t.columns[2:]) == {f"{m}@{k}" for m in ("hr", "recall", "precision", "ndcg", "map", "mrr")
                                  for k in (1, 2)} | {"mrr"}
    assert t["user"].to_list() == [0, 1, 2]
    assert t["history_length"].to_list() == [3, 3, 2]
    assert t["mrr"].to_list() == pytest.approx([0.5, 0.0, 1.0])
    assert t["ndcg@2"].to_list() == pytest.approx([1 / LOG2(3), 0.0, 1 / (1 + 1 / LOG2(3))])
    assert t["map@1"].to_list() == pytest.approx([0.0, 0.0, 1.0])


def test_head_items_hand_worked(split):
    pop = split.item_popularity
    assert pop.tolist() == [0, 2, 3, 0, 0, 1, 0]
    # sorted by count: 2 (3), 1 (2), 5 (1); cumulative 3, 5, 6; 80% of 6 = 4.8 -> items 2 and 1
    assert np.flatnonzero(head_items(pop)).tolist() == [1, 2]
    assert np.flatnonzero(head_items(pop, share=0.5)).tolist() == [2]
    assert np.flatnonzero(head_items(pop, share=1.0)).tolist() == [1, 2, 5]
    assert not head_items(np.zeros(5)).any()
    # the papers' definitions: FAERec's top 20% of the catalogue, LLM-ESR's count threshold
    assert np.flatnonzero(head_items(pop, rule="top:0.5")).tolist() == [1, 2, 5]  # 3 of 6 items
    assert np.flatnonzero(head_items(pop, rule="top:0.2")).tolist() == [2]  # round(1.2) = 1 item
    assert np.flatnonzero(head_items(pop, rule="count:2")).tolist() == [1, 2]
    assert np.flatnonzero(head_items(pop, rule="count:3")).tolist() == [2]
    assert np.flatnonzero(head_items(pop, rule="share:0.5")).tolist() == [2]
    assert parse_head_rule(None) == ("share", 0.8) and parse_head_rule("count:20") == ("count", 20.0)
    for bad in ("top:2", "pareto:0.2", "share:x", "count:-1"):
        with pytest.raises(ConfigError, match="eval.head_items"):
            head_items(pop, rule=bad)


def test_head_tail_and_history_groups(split, evalset):
    """Head = {1, 2}: only user 1's target (2) is a head item; users 0 and 2 have tail targets.
    History lengths 3, 3, 2 with bins (2, 3): "hist:0-2" = user 2, "hist:3" = users 0 and 1."""
    res = evaluate(FakeScorer(), evalset, ks=(1, 2), popularity=split.item_popularity, hist_bins=(2, 3))
    g = res.groups
    assert set(g) == {"item:head", "item:tail", "hist:0-2", "hist:3"}
    assert g["item:head"]["n_users"] == 1
    assert g["item:head"]["mrr"] == pytest.approx(0.0)  # user 1's repeated target is a miss
    assert g["item:head"]["hr@1"] == pytest.approx(0.0)
    assert res.protocol["head_items"] == "share:0.8"
    assert g["item:tail"]["n_users"] == 2
    assert g["item:tail"]["mrr"] == pytest.approx((0.5 + 1.0) / 2)
    assert g["item:tail"]["recall@2"] == pytest.approx((1 + 1 / 2) / 2)
    assert g["hist:0-2"]["n_users"] == 1 and g["hist:0-2"]["mrr"] == pytest.approx(1.0)
    assert g["hist:3"]["n_users"] == 2 and g["hist:3"]["mrr"] == pytest.approx(0.25)
    # FAERec's rule, top 20% of 6 items = item 2 alone: the same single head user
    top = evaluate(FakeScorer(), evalset, ks=(1, 2), popularity=split.item_popularity, head_rule="top:0.2")
    assert top.groups["item:head"]["n_users"] == 1 and top.protocol["head_items"] == "top:0.2"
    # the item groups' NDCG/HR are also kept per user (NaN outside the group) for paired tests
    tail = res.per_user["item:tail hr@2"].to_numpy()
    assert np.isnan(tail).sum() == 1 and np.nanmean(tail) == pytest.approx(g["item:tail"]["hr@2"])
    assert "item:tail ndcg@1" in res.per_user.columns and "item:tail mrr" not in res.per_user.columns
    assert "item:tail ndcg@1" not in res.metrics
    # without popularity there are no item groups; groups=False gives none at all
    assert "item:head" not in evaluate(FakeScorer(), evalset, ks=(1,), hist_bins=(2, 3)).groups
    assert evaluate(FakeScorer(), evalset, ks=(1,), popularity=split.item_popularity, groups=False).groups == {}


def test_batch_size_invariance(split, evalset):
    kw = dict(ks=(1, 2, 3), popularity=split.item_popularity, hist_bins=(2, 3))
    fake = FakeScorer()
    one = evaluate(fake, evalset, batch_size=1, **kw)
    assert fake.calls == 3  # really one user per batch
    big = evaluate(FakeScorer(), evalset, batch_size=1024, **kw)
    assert one.metrics == big.metrics
    assert one.groups == big.groups
    assert one.per_user.equals(big.per_user)


def test_k_larger_than_catalogue(evalset):
    """k = 10 > 6 items: every rankable target is a hit (user 1's is excluded); precision divides by k."""
    res = evaluate(FakeScorer(), evalset, ks=(2, 10))
    assert res.metrics["hr@10"] == pytest.approx(2 / 3)
    assert res.metrics["precision@10"] == pytest.approx((0.1 + 0.0 + 0.2) / 3)
    assert res.metrics["coverage@10"] == pytest.approx(5 / 6)  # item 2 is in every history
    res = evaluate(FakeScorer(), evalset, ks=(2, 10), protocol=Protocol(exclude="none"))
    assert res.metrics["hr@10"] == 1.0 and res.metrics["coverage@10"] == 1.0


def test_scorer_output_is_not_modified(evalset):
    """A model may hand out a tensor it keeps (cached scores); evaluation must not write into it,
    or a second evaluation (here without history exclusion) sees the first one's -inf."""
    model = FixedTensorScorer()
    evaluate(model, evalset, ks=(5,))
    assert torch.equal(model.table, TABLE)
    res = evaluate(model, evalset, ks=(5,), protocol=Protocol(exclude="none"))
    assert res.per_user["mrr"].to_list() == pytest.approx([1 / 5, 1 / 4, 1 / 3])


# ---- sampled-negative protocol ----------------------------------------------------------------

N_ITEMS = 40


@pytest.fixture(scope="module")
def sampled_setup():
    rng = np.random.default_rng(3)
    histories, targets = [], np.zeros((6, 2), dtype=np.int64)
    for u in range(6):
        items = rng.permutation(np.arange(1, N_ITEMS + 1))
        histories.append(items[:8].tolist())
        n_t = 1 + u % 2
        targets[u, :n_t] = items[8 : 8 + n_t]
    targets[0, 1] = histories[0][0]  # a repeated target that is also in the history
    ev = EvalSet(Histories.from_lists(np.arange(6), histories, N_ITEMS), targets, "test")
    table = torch.from_numpy(rng.random((6, N_ITEMS + 1)).astype(np.float32))
    return ev, table


def test_protocol_from_option():
    p = Protocol.from_option("5")
    assert (p.ranking, p.n_negatives, p.sampler) == ("sampled", 5, "uniform")
    assert p.describe() == {"ranking": "sampled", "exclude": "history", "ties": "pessimistic", "n_negatives": 5,
                            "sampler": "uniform", "label": "SAMPLED (5 uniform negatives)"}
    assert Protocol.from_option("100:popularity").sampler == "popularity"
    assert Protocol.from_option(None).ranking == "full"
    assert Protocol.from_option("full").ranking == "full"
    for bad in ("abc", "5:zipf", "-3", "0"):
        with pytest.raises(ConfigError, match="N:popularity|number of negatives"):
            Protocol.from_option(bad)


def test_sampled_ranks_among_targets_and_negatives(sampled_setup):
    ev, table = sampled_setup
    hist, tg = ev.histories, torch.from_numpy(ev.targets)
    scores, ranks = rank_scores(FakeScorer(table), hist, tg, Protocol.from_option("5"), None,
                                np.random.default_rng(0))
    for u in range(len(ev)):
        history = set(hist.items[hist.indptr[u] : hist.indptr[u + 1]].tolist())
        t = [int(x) for x in ev.targets[u] if x > 0]
        kept = set(torch.nonzero(torch.isfinite(scores[u])).ravel().tolist())
        negatives = kept - set(t)
        assert {i for i in t if i not in history} <= kept
        assert len(negatives) == 5
        assert not negatives & history  # negatives are never history items
        assert 0 not in kept
        for j, item in enumerate(t):  # rank = 1 + number of kept items scored higher
            if item in history:  # user 0's repeated target: excluded like every history item
                assert ranks[u, j] == MISS_RANK
                continue
            want = 1 + sum(1 for i in kept if table[u, i] > table[u, item])
            assert ranks[u, j] == want <= len(t) + 5


def _negatives(ev, table, seed, option="5", popularity=None):
    scores, _ = rank_scores(FakeScorer(table), ev.histories, torch.from_numpy(ev.targets),
                            Protocol.from_option(option), popularity, np.random.default_rng(seed))
    return [sorted(set(torch.nonzero(torch.isfinite(r)).ravel().tolist()) - set(ev.targets[u].tolist()))
            for u, r in enumerate(scores)]


def test_sampled_deterministic_by_seed(sampled_setup):
    ev, table = sampled_setup
    assert _negatives(ev, table, 0) == _negatives(ev, table, 0)
    assert _negatives(ev, table, 0) != _negatives(ev, table, 1)
    a = evaluate(FakeScorer(table), ev, ks=(1, 3), protocol=Protocol.from_option("5"), seed=0)
    b = evaluate(FakeScorer(table), ev, ks=(1, 3), protocol=Protocol.from_option("5"), seed=0)
    assert a.per_user.equals(b.per_user)
    assert a.protocol["label"] == "SAMPLED (5 uniform negatives)"
    assert a.protocol["ranking"] == "sampled"
    full = evaluate(FakeScorer(table), ev, ks=(1, 3))
    # fewer competitors: a sampled rank is never worse than the full rank
    assert (a.per_user["mrr"].to_numpy() >= full.per_user["mrr"].to_numpy()).all()
    assert a.metrics["mrr"] > full.metrics["mrr"]


def test_popularity_sampler_prefers_popular_items(sampled_setup):
    ev, table = sampled_setup
    pop = np.zeros(N_ITEMS + 1)
    popular = np.arange(31, 41)
    pop[popular] = 100.0  # only items 31..40 were ever interacted with
    for u, negs in enumerate(_negatives(ev, table, 0, "5:popularity", pop)):
        allowed = set(popular.tolist()) - set(ev.histories.items[ev.histories.indptr[u]:ev.histories.indptr[u + 1]].tolist())
        assert len(negs) == 5
        assert set(negs) <= allowed


# ---- defects that gave optimistic figures ---------------------------------------------------

class HistoryLover:
    """Scores the user's history items highest (in history order), everything else low."""

    def score(self, hist):
        out = torch.zeros(len(hist), hist.n_items + 1)
        for r in range(len(hist)):
            items = hist.items[hist.indptr[r] : hist.indptr[r + 1]]
            out[r, torch.from_numpy(items)] = torch.arange(len(items), 0, -1, dtype=torch.float32) + 10
        return out


def test_exclusion_never_depends_on_the_target():
    """A model that scores every history item high, and a repeated target: before, the mask
    removed every history item except the target, which then ranked first (HR@1 = 1). The
    excluded set must be the same whatever the target, so the target is a miss under
    ``exclude=history`` and ranks among the history items under ``exclude=none``."""
    n_items = 8
    hist = Histories.from_lists([0, 1], [[1, 2, 3], [1, 2, 3]], n_items)
    a = EvalSet(hist, np.array([[3], [6]]), "test")  # user 0 repeats item 3
    b = EvalSet(hist, np.array([[6], [6]]), "test")
    rng = np.random.default_rng(0)
    sa, _ = rank_scores(HistoryLover(), a.histories, torch.from_numpy(a.targets), Protocol(), None, rng)
    sb, _ = rank_scores(HistoryLover(), b.histories, torch.from_numpy(b.targets), Protocol(), None, rng)
    assert torch.equal(sa, sb)  # the same masked scores whatever the targets
    res = evaluate(HistoryLover(), a, ks=(1, 5))
    assert res.per_user["hr@1"].to_list() == [0.0, 0.0]
    assert res.per_user["hr@5"][0] == 0.0
    # repeat consumption allowed: item 3 (score 11) ranks behind items 1 (13) and 2 (12)
    res = evaluate(HistoryLover(), a, ks=(1, 5), protocol=Protocol(exclude="none"))
    assert res.per_user["mrr"][0] == pytest.approx(1 / 3)


class NaNScorer:
    def score(self, hist):
        return torch.full((len(hist), hist.n_items + 1), float("nan"))


def test_all_nan_scores_are_misses(evalset):
    """Before: a NaN target had nothing above it and got rank 1 (HR@10 = NDCG@10 = 1.0)."""
    res = evaluate(NaNScorer(), evalset, ks=(1, 10))
    assert res.metrics["hr@10"] == 0.0 and res.metrics["ndcg@10"] == 0.0
    assert res.metrics["mrr"] < 1e-12


class PartlyNaN(FakeScorer):
    def score(self, hist):
        s = super().score(hist).clone()
        s[:, 6] = float("nan")  # item 6 is NaN for everyone: it counts as ahead of every target
        return s


def test_nan_competitors_count_as_ahead(evalset):
    """User 0: candidates 5 (3), 4 (2), 6 (NaN): target 4 moves from rank 2 to rank 3."""
    res = evaluate(PartlyNaN(), evalset, ks=(5,))
    assert res.per_user["mrr"][0] == pytest.approx(1 / 3)


def _behavior_frame(rows):
    return pl.DataFrame(rows, schema={"user_id": pl.Int32, "item_id": pl.Int32, "timestamp": pl.Int64,
                                      "behavior": pl.Utf8}, orient="row")


def test_exclude_target_behavior_masks_only_items_had_in_that_behaviour():
    """User 0 viewed 1, bought 2, viewed 3; the test purchase is item 1 (viewed before). Under
    ``exclude=target_behavior`` (buy) only item 2 leaves the ranking: viewed items stay
    candidates for every target alike, so 1 is ranked (not a miss)."""
    history = _behavior_frame([(0, 1, 1, "view"), (0, 2, 2, "buy"), (0, 3, 3, "view")])
    test = _behavior_frame([(0, 1, 4, "buy")])
    ev = build_evalset(history, test, 1, 5, "test", target_behavior="buy")
    assert ev.excluded.items.tolist() == [2]
    table = torch.tensor([[0, 5, 9, 8, 1, 2]], dtype=torch.float32)  # 2 (9) > 3 (8) > 1 (5)
    proto = Protocol(exclude="target_behavior", target_behavior="buy")
    res = evaluate(FakeScorer(table), ev, ks=(1, 5), protocol=proto)
    assert res.per_user["mrr"][0] == pytest.approx(1 / 2)  # behind 3 only; 2 is excluded
    assert res.protocol["exclude"] == "target_behavior" and res.protocol["target_behavior"] == "buy"
    assert evaluate(FakeScorer(table), ev, ks=(1,)).per_user["mrr"][0] == 0.0  # exclude=history: a miss
    with pytest.raises(ConfigError, match="data.target_behavior"):
        Protocol(exclude="target_behavior")
    with pytest.raises(ConfigError, match="eval.exclude"):
        Protocol(exclude="seen")
    with pytest.raises(ConfigError, match="behaviour column"):
        build_evalset(history.drop("behavior"), test.drop("behavior"), 1, 5, "test", target_behavior="buy")
