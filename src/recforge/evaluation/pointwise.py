"""Pointwise metrics of predicted probabilities against binary labels (the CTR task).

* ``auc``: the area under the ROC curve, exact and tie-aware (tied scores count one half: the
  Mann-Whitney statistic from average ranks); NaN when the rows hold one class only.
* ``logloss``: mean binary cross-entropy, probabilities clipped to ``[1e-7, 1 - 1e-7]``.
* ``gauc``: group AUC (Zhou et al., DIN): the AUC of each user, averaged with weights equal to
  the user's number of rows. Users whose rows hold one class only have no AUC and are skipped;
  ``gauc_users`` and ``gauc_skipped_users`` say how many.
* calibration: ``pred_mean`` (mean predicted probability), ``obs_rate`` (share of positives),
  ``calibration`` = pred_mean / obs_rate (1 is calibrated), ``ece`` (the expected calibration
  error over ``bins`` equal-width probability bins) and the reliability table of those bins.

With several labels every metric is given per label (``auc:click``) and, unsuffixed, as the mean
over the labels; with one label the unsuffixed names are that label's values.

:func:`bootstrap_test` is a paired bootstrap of the difference in AUC and log-loss between two
sets of predictions of the same rows, resampling users (clusters of rows) when a user column is
given, rows otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

EPS = 1e-7


def _as2d(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


def auc(y, p, w=None) -> float:
    """Exact ROC AUC with ties counted one half; ``w``: non-negative row weights (e.g. bootstrap
    counts). NaN when one class is absent."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64).ravel()
    order = np.argsort(p, kind="mergesort")
    return float(_auc_sorted(y[order], p[order], w[order][None, :])[0])


def _auc_sorted(y: np.ndarray, p: np.ndarray, W: np.ndarray) -> np.ndarray:
    """AUC for each row of weights ``W`` (k, n) over rows sorted by score ``p`` (ascending)."""
    pos = W * y[None, :]
    neg = W * (1.0 - y)[None, :]
    # tie groups of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(p)) + 1]
    pos_g = np.add.reduceat(pos, starts, axis=1)
    neg_g = np.add.reduceat(neg, starts, axis=1)
    neg_below = np.cumsum(neg_g, axis=1) - neg_g
    num = (pos_g * (neg_below + 0.5 * neg_g)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def logloss(y, p, w=None) -> float:
    """Mean binary cross-entropy with probabilities clipped to [1e-7, 1 - 1e-7]."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.clip(np.asarray(p, dtype=np.float64).ravel(), EPS, 1 - EPS)
    ll = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(np.average(ll, weights=w))


def group_auc(y, p, groups) -> tuple[float, int, int]:
    """Impression-weighted mean of per-group AUC: ``(gauc, groups used, groups skipped)``;
    groups with one class only are skipped."""
    t = per_group(y, p, groups)
    ok = t.filter(pl.col("auc").is_not_nan())
    if ok.height == 0:
        return float("nan"), 0, t.height
    w = ok["n"].to_numpy().astype(np.float64)
    return float(np.average(ok["auc"].to_numpy(), weights=w)), ok.height, t.height - ok.height


def per_group(y, p, groups) -> pl.DataFrame:
    """Per group: ``user``, ``n`` rows, ``positives``, ``auc`` (NaN with one class), ``logloss``."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    pc = np.clip(p, EPS, 1 - EPS)
    df = pl.DataFrame({"user": np.asarray(groups).astype(str), "y": y, "p": p,
                       "ll": -(y * np.log(pc) + (1 - y) * np.log(1 - pc))})
    df = df.with_columns(pl.col("p").rank("average").over("user").alias("r"))
    t = (df.group_by("user").agg(pl.len().alias("n"), pl.col("y").sum().alias("positives"),
                                 (pl.col("r") * pl.col("y")).sum().alias("rpos"), pl.col("ll").mean().alias("logloss"))
         .with_columns((pl.col("n") - pl.col("positives")).alias("neg")))
    npos, nneg = t["positives"].to_numpy(), t["neg"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        a = (t["rpos"].to_numpy() - npos * (npos + 1) / 2) / (npos * nneg)
    a = np.where((npos > 0) & (nneg > 0), a, np.nan)
    return (t.with_columns(pl.Series("auc", a), pl.col("n").cast(pl.Int64), pl.col("positives").cast(pl.Int64))
            .select("user", "n", "positives", "auc", "logloss").sort("user"))


def reliability(y, p, bins: int = 10) -> list[dict]:
    """Equal-width probability bins: ``lo``, ``hi``, ``n``, ``pred_mean``, ``obs_rate`` (empty bins left out)."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    b = np.minimum((p * bins).astype(np.int64), bins - 1)
    out = []
    for k in range(bins):
        m = b == k
        if m.any():
            out.append({"lo": k / bins, "hi": (k + 1) / bins, "n": int(m.sum()), "pred_mean": float(p[m].mean()),
                        "obs_rate": float(y[m].mean())})
    return out


@dataclass
class PointwiseResult:
    metrics: dict
    per_user: pl.DataFrame | None
    calibration: dict = field(default_factory=dict)  # label -> reliability table


def evaluate_pointwise(y, p, labels: list[str], groups=None, bins: int = 10) -> PointwiseResult:
    """Every metric of the module docstring for predictions ``p`` (n, n_labels) of labels ``y``;
    per-user values (``user``, ``n``, ``positives``, ``auc``, ``logloss``, suffixed per label when
    several) when ``groups`` (the user of each row) is given."""
    Y, P = _as2d(y), _as2d(p)
    per_label, tables, users = {}, {}, None
    for j, name in enumerate(labels):
        yj, pj = Y[:, j], P[:, j]
        m = {"auc": auc(yj, pj), "logloss": logloss(yj, pj)}
        if groups is not None:
            g, used, skipped = group_auc(yj, pj, groups)
            m.update(gauc=g, gauc_users=used, gauc_skipped_users=skipped)
            pu = per_group(yj, pj, groups)
            cols = pu.select("user", "n", "positives", "auc", "logloss") if users is None else pu.select("user", "auc", "logloss")
            if len(labels) > 1:
                cols = cols.rename({c: f"{c}:{name}" for c in cols.columns if c in ("positives", "auc", "logloss")})
            users = cols if users is None else users.join(cols, on="user", how="left")
        pm, orate = float(pj.mean()), float(yj.mean())
        table = reliability(yj, pj, bins)
        ece = sum(t["n"] * abs(t["pred_mean"] - t["obs_rate"]) for t in table) / max(len(yj), 1)
        m.update(pred_mean=pm, obs_rate=orate, calibration=pm / orate if orate > 0 else float("nan"), ece=float(ece),
                 n_rows=int(len(yj)), positives=int(yj.sum()))
        per_label[name] = m
        tables[name] = table
    if len(labels) == 1:
        metrics = dict(per_label[labels[0]])
    else:
        metrics = {}
        for k in ("auc", "logloss", "gauc", "pred_mean", "obs_rate", "calibration", "ece"):
            if k in per_label[labels[0]]:
                metrics[k] = float(np.nanmean([per_label[n][k] for n in labels]))
        metrics["n_rows"] = int(Y.shape[0])
        for n in labels:
            metrics.update({f"{k}:{n}": v for k, v in per_label[n].items()})
    return PointwiseResult(metrics, users, tables)


def bootstrap_test(y, p_a: list[np.ndarray], p_b: list[np.ndarray], groups=None, n_boot: int = 1000,
                   seed: int = 0, chunk: int = 50) -> list[dict]:
    """Paired bootstrap of ``b - a`` in AUC and log-loss over the same rows. ``p_a``/``p_b``: the
    predictions of one or more runs per side (seeds); each resample takes the mean of the metric
    over a side's runs. Resamples users (all rows of a drawn user) when ``groups`` is given, rows
    otherwise. Returns per metric the observed means and difference, the 95% percentile interval
    of the difference, and the two-sided p-value ``2 min(P(d <= 0), P(d >= 0))`` (at least 1/n_boot)."""
    y = np.asarray(y, dtype=np.float64).ravel()
    n = len(y)
    if groups is not None:
        _, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        n_units = int(inv.max()) + 1 if n else 0
    else:
        inv, n_units = np.arange(n), n
    rng = np.random.default_rng(seed)
    sides = [[np.asarray(p, dtype=np.float64).ravel() for p in ps] for ps in (p_a, p_b)]
    prepared = [[(np.argsort(p, kind="mergesort"), p, np.clip(p, EPS, 1 - EPS)) for p in ps] for ps in sides]
    boot = {"auc": [], "logloss": []}
    chunk = max(1, min(chunk, 20_000_000 // max(n, 1)))  # bounds the (chunk, n) weight matrix
    done = 0
    while done < n_boot:
        k = min(chunk, n_boot - done)
        draws = rng.integers(0, n_units, size=(k, n_units))
        counts = np.stack([np.bincount(d, minlength=n_units) for d in draws]).astype(np.float64)
        W = counts[:, inv]  # (k, n) weight of each row
        vals = {"auc": [], "logloss": []}
        for side in prepared:
            a_runs, l_runs = [], []
            for order, p, pc in side:
                a_runs.append(_auc_sorted(y[order], p[order], W[:, order]))
                ll = -(y * np.log(pc) + (1 - y) * np.log(1 - pc))
                l_runs.append((W * ll[None, :]).sum(1) / W.sum(1))
            vals["auc"].append(np.mean(a_runs, 0))
            vals["logloss"].append(np.mean(l_runs, 0))
        for m in boot:
            boot[m].append(vals[m][1] - vals[m][0])
        done += k
    rows = []
    for m, fn in (("auc", auc), ("logloss", logloss)):
        a = float(np.mean([fn(y, p) for p in sides[0]]))
        b = float(np.mean([fn(y, p) for p in sides[1]]))
        d = np.concatenate(boot[m])
        d = d[np.isfinite(d)]
        p_val = 2 * min((d <= 0).mean(), (d >= 0).mean()) if len(d) else 1.0
        rows.append({"metric": m, "a": a, "b": b, "diff": b - a, "ci_low": float(np.quantile(d, 0.025)) if len(d) else None,
                     "ci_high": float(np.quantile(d, 0.975)) if len(d) else None,
                     "bootstrap_p": float(min(1.0, max(p_val, 1.0 / max(len(d), 1)))), "n_boot": int(len(d)),
                     "unit": "user" if groups is not None else "row", "n_units": int(n_units)})
    return rows


def bootstrap_line(row: dict, label: str = "") -> str:
    """One row of :func:`bootstrap_test` as a sentence: ``label: metric a → b (diff, 95% [low, high],
    bootstrap p, units)``."""
    ci = ("" if row.get("ci_low") is None else
          f", 95% [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]")
    return (f"{label + ': ' if label else ''}{row['metric']} {row['a']:.4f} → {row['b']:.4f} ({row['diff']:+.4f}{ci}, "
            f"bootstrap p {row['bootstrap_p']:.3f}, {row['n_units']} {row.get('unit', 'user')}s)")
