"""Pointwise metrics against scikit-learn and hand-worked values; the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

sk = pytest.importorskip("sklearn.metrics")

from recforge.evaluation.pointwise import (auc, bootstrap_test, evaluate_pointwise, group_auc, logloss,  # noqa: E402
                                           per_group, reliability)


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    n = 3000
    y = rng.integers(0, 2, n)
    p = np.clip(np.round(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.2, n), 2), 0.01, 0.99)  # many ties
    g = rng.integers(0, 40, n)
    return y, p, g


def test_auc_and_logloss_match_sklearn(rows):
    y, p, _ = rows
    assert auc(y, p) == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
    assert logloss(y, p) == pytest.approx(sk.log_loss(y, p), abs=1e-12)
    w = np.random.default_rng(1).integers(0, 4, len(y)).astype(float)
    assert auc(y, p, w) == pytest.approx(sk.roc_auc_score(y, p, sample_weight=w), abs=1e-12)


def test_auc_hand_worked_ties_and_one_class():
    # pairs (pos, neg): (.8,.2) win, (.8,.5) win, (.5,.2) win, (.5,.5) tie -> 3.5 / 4
    assert auc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]) == pytest.approx(0.875)
    assert auc([1, 0], [0.3, 0.3]) == 0.5
    assert np.isnan(auc([1, 1], [0.2, 0.9]))


def test_logloss_clips_certain_mistakes():
    assert logloss([1, 0], [0.0, 1.0]) == pytest.approx(-np.log(1e-7))


def test_group_auc_weighted_by_rows_skips_one_class_users(rows):
    y, p, g = rows
    g = g.copy()
    g[g == 3] = 99
    y = y.copy()
    y[g == 99] = 1  # user 99 has positives only
    value, used, skipped = group_auc(y, p, g)
    num = den = 0.0
    for u in np.unique(g):
        m = g == u
        if len(np.unique(y[m])) < 2:
            continue
        num += m.sum() * sk.roc_auc_score(y[m], p[m])
        den += m.sum()
    assert value == pytest.approx(num / den, abs=1e-12)
    assert skipped == 1 and used == len(np.unique(g)) - 1
    table = per_group(y, p, g)
    row = table.filter(table["user"] == "99")
    assert np.isnan(row["auc"][0]) and row["positives"][0] == row["n"][0]
    u0 = g == 0
    assert table.filter(table["user"] == "0")["logloss"][0] == pytest.approx(sk.log_loss(y[u0], p[u0]))


def test_calibration_and_reliability_table():
    y = np.array([1, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.1, 0.15, 0.05, 0.9, 0.8])
    res = evaluate_pointwise(y, p, ["click"])
    m = res.metrics
    assert m["pred_mean"] == pytest.approx(p.mean()) and m["obs_rate"] == pytest.approx(0.5)
    assert m["calibration"] == pytest.approx(p.mean() / 0.5)
    table = reliability(y, p, bins=10)
    # bins are [lo, hi): 0.1 falls in the second bin
    assert [(t["lo"], t["n"]) for t in table] == [(0.0, 1), (0.1, 3), (0.8, 1), (0.9, 1)]
    assert table[1]["obs_rate"] == pytest.approx(1 / 3) and table[1]["pred_mean"] == pytest.approx(0.35 / 3)
    ece = (1 * 0.05 + 3 * abs(0.35 / 3 - 1 / 3) + 1 * 0.2 + 1 * 0.1) / 6
    assert m["ece"] == pytest.approx(ece)
    assert res.per_user is None and "gauc" not in m


def test_several_labels_are_suffixed_and_averaged(rows):
    y, p, g = rows
    Y = np.column_stack([y, 1 - y])
    P = np.column_stack([p, 1 - p])
    res = evaluate_pointwise(Y, P, ["click", "like"], groups=g)
    m = res.metrics
    assert m["auc:click"] == pytest.approx(sk.roc_auc_score(y, p))
    assert m["auc:like"] == pytest.approx(sk.roc_auc_score(1 - y, 1 - p))
    assert m["auc"] == pytest.approx((m["auc:click"] + m["auc:like"]) / 2)
    assert {"user", "n", "auc:click", "auc:like", "logloss:like"} <= set(res.per_user.columns)


def test_bootstrap_paired_test(rows):
    y, p, g = rows
    same = bootstrap_test(y, [p], [p], groups=g, n_boot=200)
    assert all(r["diff"] == 0 and r["bootstrap_p"] == 1.0 for r in same)
    better = np.clip(p + 0.3 * (y - 0.5), 0.001, 0.999)
    res = {r["metric"]: r for r in bootstrap_test(y, [p], [better], n_boot=200, seed=1)}
    assert res["auc"]["diff"] > 0 and res["auc"]["bootstrap_p"] <= 0.01 and res["auc"]["ci_low"] > 0
    assert res["logloss"]["diff"] < 0 and res["logloss"]["unit"] == "row"
    # several runs per side: the observed value is the mean over the runs
    two = {r["metric"]: r for r in bootstrap_test(y, [p, better], [better], n_boot=50)}
    assert two["auc"]["a"] == pytest.approx((auc(y, p) + auc(y, better)) / 2)


def test_bootstrap_row_reads_as_one_sentence():
    from recforge.evaluation.pointwise import bootstrap_line, bootstrap_test

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400).astype(float)
    users = np.repeat(np.arange(40), 10)
    good, noise = 0.3 * y + 0.7 * rng.random(400), rng.random(400)
    row = next(r for r in bootstrap_test(y, [noise], [good], users, n_boot=200, seed=0) if r["metric"] == "auc")
    text = bootstrap_line(row, "B vs A")
    assert text.startswith(f"B vs A: auc {row['a']:.4f} → {row['b']:.4f} (+")
    assert f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]" in text and text.endswith("40 users)")
    assert row["diff"] > 0 and row["bootstrap_p"] < 0.05
