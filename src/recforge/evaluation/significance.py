"""Paired significance tests on per-user metric values of two runs."""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy import stats

from recforge.errors import RecForgeError


def seed_mean(tables: list[pl.DataFrame]) -> pl.DataFrame:
    """Per-user metric tables of several runs (seeds) of one model, averaged per user over the
    users evaluated in every run. Users are keyed by their raw id (``user_raw``) where the tables
    have it, so runs whose data was encoded differently (``data.behaviors=buy`` against every
    behaviour) still pair the same people."""
    keyed = [t.with_columns(pl.col("user_raw").alias("user")).drop("user_raw") if "user_raw" in t.columns else t
             for t in tables]
    if len(keyed) == 1:
        return keyed[0]
    metrics = [c for c in keyed[0].columns if c not in ("user", "history_length") and keyed[0].schema[c].is_numeric()]
    stacked = pl.concat([t.select(["user", *metrics]) for t in keyed])
    return (stacked.group_by("user").agg([pl.len().alias("_n"), *[pl.col(m).mean() for m in metrics]])
            .filter(pl.col("_n") == len(keyed)).drop("_n").sort("user"))


def paired_tests(a: pl.DataFrame, b: pl.DataFrame, metrics: list[str] | None = None) -> list[dict]:
    """Join two per-user tables on ``user`` and test each metric: paired t-test and Wilcoxon
    signed-rank test (two-sided). Users missing from either run are left out (and counted)."""
    common = [c for c in a.columns if c in b.columns and c not in ("user", "history_length")]
    metrics = metrics or common
    unknown = [m for m in metrics if m not in common]
    if unknown:
        raise RecForgeError(f"metric(s) {', '.join(unknown)} not in both runs; available: {', '.join(common)}")
    j = a.select(["user", *metrics]).join(b.select(["user", *metrics]), on="user", suffix="_b")
    if j.height == 0:
        raise RecForgeError("the two runs share no evaluated user; compare runs made on the same data and split")
    rows = []
    for m in metrics:
        x = j[m].to_numpy().astype(np.float64)
        y = j[f"{m}_b"].to_numpy().astype(np.float64)
        ok = ~(np.isnan(x) | np.isnan(y))
        x, y = x[ok], y[ok]
        d = y - x
        if len(d) < 2 or np.allclose(d, 0):
            t_p = w_p = 1.0
        else:
            t_p = float(stats.ttest_rel(y, x).pvalue)
            w_p = float(stats.wilcoxon(y, x, zero_method="wilcox").pvalue) if np.any(d != 0) else 1.0
        rows.append({"metric": m, "a": float(x.mean()), "b": float(y.mean()), "diff": float(d.mean()),
                     "rel": float(d.mean() / x.mean()) if x.mean() else float("nan"),
                     "t_test_p": t_p, "wilcoxon_p": w_p, "n_users": int(len(d))})
    return rows
