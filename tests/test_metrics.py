"""Ranking metrics: hand-worked cases, tie-breaking, and a cross-check against ranx.

Definitions under test are those of the ``recforge.evaluation.metrics`` module docstring.
Every expected value below is worked out by hand from the 1-based target ranks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recforge.evaluation.metrics import metrics_from_ranks, target_ranks

INF = float("inf")
LOG2 = math.log2


def _ranks(scores, targets, ties="pessimistic"):
    return target_ranks(torch.tensor(scores, dtype=torch.float64), torch.tensor(targets, dtype=torch.int64), ties)


def _metrics(scores, targets, ks):
    t = torch.tensor(targets, dtype=torch.int64)
    r = target_ranks(torch.tensor(scores, dtype=torch.float64), t)
    return {k: v.numpy() for k, v in metrics_from_ranks(r, t > 0, ks).items()}


# Items 1..7 ordered by score: 5, 2, 7, 1, 4, 3, 6 (ranks 1..7); column 0 is excluded.
ROW = [-INF, 4.0, 6.0, 2.0, 3.0, 7.0, 1.0, 5.0]
KS = [1, 2, 5, 10]


def test_target_ranks_distinct_scores():
    r = _ranks([ROW, ROW], [[5, 7, 3], [4, 6, 0]])
    assert r[0].tolist() == [1, 3, 6]
    assert r[1, :2].tolist() == [5, 7]
    assert r[1, 2] > 10**15  # a padded target gets a huge rank, never a hit


def test_several_targets_hand_worked():
    """Targets 5, 7, 3 -> ranks 1, 3, 6 (T = 3)."""
    m = _metrics([ROW], [[5, 7, 3]], KS)
    idcg3 = 1 + 1 / LOG2(3) + 1 / LOG2(4)
    expected = {
        "hr@1": 1.0, "recall@1": 1 / 3, "precision@1": 1.0, "ndcg@1": 1.0, "map@1": 1.0, "mrr@1": 1.0,
        # k=2: one hit (rank 1); ideal has min(3, 2) = 2 hits
        "hr@2": 1.0, "recall@2": 1 / 3, "precision@2": 1 / 2,
        "ndcg@2": 1 / (1 + 1 / LOG2(3)), "map@2": (1 / 1) / 2, "mrr@2": 1.0,
        # k=5: hits at ranks 1, 3
        "hr@5": 1.0, "recall@5": 2 / 3, "precision@5": 2 / 5,
        "ndcg@5": (1 + 1 / LOG2(4)) / idcg3, "map@5": (1 / 1 + 2 / 3) / 3, "mrr@5": 1.0,
        # k=10: hits at ranks 1, 3, 6
        "hr@10": 1.0, "recall@10": 1.0, "precision@10": 3 / 10,
        "ndcg@10": (1 + 1 / LOG2(4) + 1 / LOG2(7)) / idcg3, "map@10": (1 / 1 + 2 / 3 + 3 / 6) / 3,
        "mrr@10": 1.0,
        "mrr": 1.0,
    }
    assert set(m) == set(expected)
    for name, want in expected.items():
        assert m[name][0] == pytest.approx(want, abs=1e-12), name
    assert m["ndcg@5"][0] == pytest.approx(0.7039180890341347, abs=1e-12)
    assert m["map@10"][0] == pytest.approx(13 / 18, abs=1e-12)


def test_one_target_hand_worked_and_padding_and_empty():
    """Row 0: target 4 alone (rank 5); row 1: the same target padded with zeros; row 2: no target."""
    m = _metrics([ROW, ROW, ROW], [[4, 0, 0], [0, 4, 0], [0, 0, 0]], KS)
    expected = {
        "hr@1": 0.0, "recall@1": 0.0, "precision@1": 0.0, "ndcg@1": 0.0, "map@1": 0.0, "mrr@1": 0.0,
        "hr@2": 0.0, "recall@2": 0.0, "precision@2": 0.0, "ndcg@2": 0.0, "map@2": 0.0, "mrr@2": 0.0,
        "hr@5": 1.0, "recall@5": 1.0, "precision@5": 1 / 5, "ndcg@5": 1 / LOG2(6), "map@5": 1 / 5,
        "mrr@5": 1 / 5,
        "hr@10": 1.0, "recall@10": 1.0, "precision@10": 1 / 10, "ndcg@10": 1 / LOG2(6), "map@10": 1 / 5,
        "mrr@10": 1 / 5,
        "mrr": 1 / 5,
    }
    for name, want in expected.items():
        assert m[name][0] == pytest.approx(want, abs=1e-12), name
        assert m[name][1] == pytest.approx(want, abs=1e-12), name  # padding position does not matter
        assert math.isnan(m[name][2]), name  # a user with no target is NaN, not 0


def test_single_target_identities():
    """With one target, HR@k = Recall@k and NDCG@k = 1/log2(r+1) (or 0 beyond k)."""
    ranks = torch.tensor([[1], [2], [3], [7], [12]])
    m = metrics_from_ranks(ranks, torch.ones_like(ranks, dtype=torch.bool), [5, 10])
    assert m["hr@5"].tolist() == [1, 1, 1, 0, 0]
    assert m["recall@10"].tolist() == [1, 1, 1, 1, 0]
    np.testing.assert_allclose(m["ndcg@10"].numpy(), [1, 1 / LOG2(3), 0.5, 1 / 3, 0], atol=1e-12)
    np.testing.assert_allclose(m["mrr"].numpy(), [1, 1 / 2, 1 / 3, 1 / 7, 1 / 12], atol=1e-12)
    np.testing.assert_allclose(m["mrr@5"].numpy(), [1, 1 / 2, 1 / 3, 0, 0], atol=1e-12)


def test_map_counts_hits_above_each_hit():
    """Ranks 2, 3, 9 with k=10: AP = (1/2 + 2/3 + 3/9) / 3; k=3: (1/2 + 2/3) / min(3, 3)."""
    ranks = torch.tensor([[9, 2, 3]])
    m = metrics_from_ranks(ranks, torch.ones_like(ranks, dtype=torch.bool), [3, 10])
    assert m["map@10"].item() == pytest.approx((1 / 2 + 2 / 3 + 3 / 9) / 3, abs=1e-12)
    assert m["map@3"].item() == pytest.approx((1 / 2 + 2 / 3) / 3, abs=1e-12)
    assert m["precision@3"].item() == pytest.approx(2 / 3, abs=1e-12)
    assert m["ndcg@3"].item() == pytest.approx((1 / LOG2(3) + 1 / LOG2(4)) / (1 + 1 / LOG2(3) + 1 / LOG2(4)))


# ---- ties ------------------------------------------------------------------------------------

# item:  0     1    2    3    4    5    6
TIED = [-INF, 1.0, 2.0, 2.0, 2.0, 0.0, 3.0]
# order with ties broken by lower item index: 6, 2, 3, 4, 1, 5


@pytest.mark.parametrize("width", [3, 9])  # 3: the per-target comparison path, 9: the sort path
def test_ties_by_item_index_option(width):
    targets = [4, 2, 1] + [0] * (width - 3)
    r = _ranks([TIED], [targets], "index")[0, :3].tolist()
    assert r == [4, 2, 5]
    r = _ranks([TIED], [[3, 5, 6] + [0] * (width - 3)], "index")[0, :3].tolist()
    assert r == [3, 6, 1]


@pytest.mark.parametrize("width", [3, 9])
def test_ties_pessimistic_expected_optimistic_hand_worked(width):
    """Items 2, 3, 4 share score 2.0 below item 6 (3.0): one item strictly ahead, two others tied.
    Pessimistic: 1 + 1 + 2 = 4 for each; optimistic: 2; expected: 1 + 1 + 2/2 = 3 (the mean of
    2, 3, 4). Item 1 (1.0) has four items ahead and no tie: 5 under every rule."""
    targets = [[4, 2, 1] + [0] * (width - 3)]
    assert _ranks([TIED], targets)[0, :3].tolist() == [4, 4, 5]  # pessimistic is the default
    assert _ranks([TIED], targets, "optimistic")[0, :3].tolist() == [2, 2, 5]
    r = _ranks([TIED], targets, "expected")
    assert r.dtype == torch.float64 and r[0, :3].tolist() == [3.0, 3.0, 5.0]
    with pytest.raises(ValueError, match="ties="):
        _ranks([TIED], targets, "random")


def test_tie_default_does_not_depend_on_item_ids():
    """Integer scores (a popularity count) with ties: permuting the item ids leaves every
    metric unchanged under the default; under ``ties=index`` the figures move with the ids."""
    rng = np.random.default_rng(0)
    b, n = 200, 50
    counts = rng.integers(0, 4, size=n + 1).astype(np.float64)  # heavy ties, like Pop
    counts[0] = -np.inf
    scores = np.tile(counts, (b, 1))
    targets = rng.integers(1, n + 1, size=(b, 1))
    perm = np.concatenate([[0], rng.permutation(np.arange(1, n + 1))])  # new id of each old id
    scores_p = np.empty_like(scores)
    scores_p[:, perm] = scores
    targets_p = perm[targets]
    ks = [1, 5, 10]

    def metrics(sc, tg, ties):
        t = torch.from_numpy(tg)
        return metrics_from_ranks(target_ranks(torch.from_numpy(sc), t, ties), t > 0, ks)

    for ties in ("pessimistic", "expected", "optimistic"):
        a, c = metrics(scores, targets, ties), metrics(scores_p, targets_p, ties)
        for name in a:
            assert torch.allclose(a[name], c[name]), (ties, name)
    a, c = metrics(scores, targets, "index"), metrics(scores_p, targets_p, "index")
    assert any(not torch.allclose(a[name].mean(), c[name].mean()) for name in a)


def test_non_finite_target_scores_are_misses():
    """Today's evaluator gave an all-NaN row rank 1 (HR@10 = NDCG@10 = 1). A NaN / inf target
    is a miss (metrics 0); the evaluator maps the model's non-finite scores to +inf first, so
    they count as ahead of a finite target."""
    nan = float("nan")
    rows = [[-INF, nan, nan, nan, nan],  # all NaN
            [-INF, 1.0, INF, 2.0, 0.5],  # target 1 behind +inf (a mapped NaN) and 2.0: rank 3
            [-INF, 1.0, 2.0, -INF, 0.5]]  # target 3 excluded (-inf): a miss
    t = torch.tensor([[2], [1], [3]])
    scores = torch.tensor(rows, dtype=torch.float64)
    for ties in ("pessimistic", "expected", "optimistic", "index"):
        r = target_ranks(scores, t, ties)
        m = metrics_from_ranks(r, t > 0, [10])
        assert m["hr@10"].tolist() == [0.0, 1.0, 0.0], ties
        assert m["ndcg@10"][0] == 0 and m["mrr"][0] == 0, ties
        assert r[1, 0] == 3, ties


def _reference_ranks(scores: np.ndarray, targets: np.ndarray, ties: str = "index") -> np.ndarray:
    """Brute force: items strictly better, plus the tied items the rule counts, plus one."""
    out = np.zeros(targets.shape, dtype=np.float64)
    idx = np.arange(scores.shape[1])
    for b in range(targets.shape[0]):
        for j, t in enumerate(targets[b]):
            s = scores[b, t]
            others = np.sum(scores[b] == s) - 1
            tied = {"index": np.sum((scores[b] == s) & (idx < t)), "pessimistic": others,
                    "optimistic": 0, "expected": others / 2}[ties]
            out[b, j] = 1 + np.sum(scores[b] > s) + tied
    return out


@pytest.mark.parametrize("ties", ["pessimistic", "expected", "optimistic", "index"])
def test_both_rank_paths_agree_on_integer_scores_with_ties(ties):
    rng = np.random.default_rng(7)
    b, n, t = 40, 60, 12
    scores = rng.integers(0, 5, size=(b, n)).astype(np.float64)  # heavy ties
    scores[:, 0] = -np.inf
    targets = np.stack([rng.choice(np.arange(1, n), t, replace=False) for _ in range(b)])
    # exclude some non-target items, as the evaluator does
    for row in range(b):
        excl = np.setdiff1d(rng.choice(np.arange(1, n), 10, replace=False), targets[row])
        scores[row, excl] = -np.inf
    ref = _reference_ranks(scores, targets, ties)
    s = torch.from_numpy(scores)
    tg = torch.from_numpy(targets)
    sort_path = target_ranks(s, tg, ties).numpy()  # T = 12 > 8: the packed path
    cmp_path = np.concatenate([target_ranks(s, tg[:, j : j + 4], ties).numpy() for j in range(0, t, 4)], 1)  # T = 4
    assert np.array_equal(sort_path, ref)
    assert np.array_equal(cmp_path, ref)
    if ties == "index":  # every target of a row has a distinct rank
        assert all(len(set(row)) == t for row in ref.tolist())
    else:  # heavy ties do make some targets share a rank
        assert any(len(set(row)) < t for row in ref.tolist())
    # and the metrics built on them agree too
    ms = metrics_from_ranks(torch.from_numpy(sort_path), tg > 0, [5, 10])
    mc = metrics_from_ranks(torch.from_numpy(cmp_path), tg > 0, [5, 10])
    for name in ms:
        assert torch.equal(ms[name], mc[name]), name


def test_many_target_slots_match_brute_force_with_padding_duplicates_and_some_ties():
    # T > 8 (rows reordered by target count, valid targets packed first): float scores, a
    # non-target item tied with a target in some rows, padding in the middle and at the end of
    # rows, a repeated target, rows without any target
    rng = np.random.default_rng(3)
    b, n, t = 600, 300, 20
    scores = rng.standard_normal((b, n)).astype(np.float32)
    scores[:, 0] = -np.inf
    targets = np.stack([rng.choice(np.arange(1, n), t, replace=False) for _ in range(b)])
    targets[::7, 15:] = 0  # padding at the end
    targets[::9, 3:6] = 0  # and in the middle
    targets[::50] = 0  # no target at all
    targets[::11, 1] = targets[::11, 0]  # a repeated target
    for row in range(0, b, 5):  # exclusions as the evaluator does (-inf, not a target)
        excl = np.setdiff1d(rng.choice(np.arange(1, n), 30, replace=False), targets[row])
        scores[row, excl] = -np.inf
    for row in range(0, b, 13):  # a non-target item tied with a target
        other = np.setdiff1d(np.arange(1, n), targets[row])[0]
        scores[row, other] = scores[row, targets[row, 2]]
    ours = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets)).numpy()
    ref = _reference_ranks(scores, targets, "pessimistic")
    valid = targets > 0
    assert np.array_equal(ours[valid], ref[valid])
    assert (ours[~valid] > n).all()


# ---- cross-check with ranx -------------------------------------------------------------------


def _ranx_setup(seed=0, n_users=50, n_items=200):
    rng = np.random.default_rng(seed)
    scores = rng.random((n_users, n_items + 1))
    scores[:, 0] = -np.inf
    n_t = rng.integers(1, 6, n_users)
    targets = np.zeros((n_users, 5), dtype=np.int64)
    for u in range(n_users):
        items = rng.permutation(np.arange(1, n_items + 1))
        targets[u, : n_t[u]] = items[: n_t[u]]
        history = items[n_t[u] : n_t[u] + rng.integers(0, 30)]
        scores[u, history] = -np.inf  # excluded like a user's history
    return scores, targets


def _to_ranx(scores, targets):
    from ranx import Qrels, Run

    qrels = {f"u{u}": {f"i{i}": 1 for i in row if i > 0} for u, row in enumerate(targets)}
    run = {
        f"u{u}": {f"i{i}": float(scores[u, i]) for i in np.flatnonzero(np.isfinite(scores[u]))}
        for u in range(len(scores))
    }
    return Qrels(qrels), Run(run)


@pytest.mark.filterwarnings("ignore")
def test_against_ranx_continuous_scores():
    """ranx names: ``hit_rate@k`` (our ``hr@k``), ``hits@k`` (the number of hits, our
    ``recall@k`` x T), ``recall@k``, ``precision@k``, ``ndcg@k``, ``mrr`` / ``mrr@k`` and ``map@k``.

    Definitional difference: ranx's ``map@k`` divides the sum of precisions at the hits by the
    number of relevant items T, ours by ``min(T, k)``. They coincide when T <= k, so MAP is
    compared only at k >= 5 (targets are 1-5 per user); the other metrics at every k.
    """
    from ranx import evaluate as ranx_evaluate

    scores, targets = _ranx_setup()
    ks = [1, 3, 5, 10, 20]
    ours = metrics_from_ranks(target_ranks(torch.from_numpy(scores), torch.from_numpy(targets)),
                              torch.from_numpy(targets) > 0, ks)
    qrels, run = _to_ranx(scores, targets)
    pairs = {"mrr": "mrr"}
    for k in ks:
        for ours_name, ranx_name in (("hr", "hit_rate"), ("recall", "recall"), ("precision", "precision"),
                                     ("ndcg", "ndcg"), ("mrr", "mrr")):
            pairs[f"{ranx_name}@{k}"] = f"{ours_name}@{k}"
        if k >= 5:
            pairs[f"map@{k}"] = f"map@{k}"
    names = list(pairs) + [f"hits@{k}" for k in ks]
    theirs = ranx_evaluate(qrels, run, names, make_comparable=True)
    assert len(theirs) == len(names)
    for ranx_name, ours_name in pairs.items():
        mine = float(ours[ours_name].mean())
        assert mine == pytest.approx(float(theirs[ranx_name]), abs=1e-9), (ranx_name, ours_name)
    # ranx ``hits@k`` is the number of hits: our recall@k times the number of targets
    n_t = (targets > 0).sum(1)
    for k in ks:
        assert float((ours[f"recall@{k}"].numpy() * n_t).mean()) == pytest.approx(float(theirs[f"hits@{k}"]), abs=1e-9)
    # the data is not degenerate: some hits and some misses at k=10
    assert 0.05 < float(ours["hr@10"].mean()) < 0.95


@pytest.mark.filterwarnings("ignore")
def test_map_differs_from_ranx_only_when_more_targets_than_k():
    """Targets at ranks 1, 3, 6 (T = 3). At k = 2: ours 1/min(3, 2) = 1/2, ranx 1/3.
    At k = 10 both give (1 + 2/3 + 3/6) / 3 = 13/18."""
    from ranx import Qrels, Run
    from ranx import evaluate as ranx_evaluate

    m = _metrics([ROW], [[5, 7, 3]], [2, 10])
    qrels = Qrels({"u": {"i5": 1, "i7": 1, "i3": 1}})
    run = Run({"u": {f"i{i}": ROW[i] for i in range(1, 8)}})
    theirs = ranx_evaluate(qrels, run, ["map@2", "map@10"])
    assert m["map@2"][0] == pytest.approx(1 / 2)
    assert theirs["map@2"] == pytest.approx(1 / 3)
    assert m["map@10"][0] == pytest.approx(13 / 18)
    assert theirs["map@10"] == pytest.approx(13 / 18)
