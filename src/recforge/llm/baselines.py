"""The ID baselines of the language-model task: the models every LLM of a comparison is set beside,
fitted on *all* training rows and scored on the same test sample and listwise candidates.

* **A CTR model** (``lr``, ``fm``, ``deepfm``, ...; :func:`fit_ctr_baseline`): one-hot user and item
  ids → like, on every training row.
* **A sequential model** (``sasrec``, ``gru4rec``, ...; :func:`fit_sequence_baseline`): the
  time-ordered sequence of each user's *liked* training items (``data.like_threshold``), the items
  it should put first. A row (user, item, time) is scored by the model's score of the item after
  the user's liked training items strictly before that time (what a prompt may show; never a test
  row). A row whose user has no earlier like is scored after the user's earlier rated items instead
  (named in the run's protocol with their count). Its scores are logits of a softmax over the
  catalogue, not probabilities: Platt scaling ``p = sigmoid(a * s + b)`` (``a > 0``, :func:`platt`)
  is fitted by maximum likelihood on the epoch-search model's scores of the inner-validation rows
  (liked and not) and applied to the final model's scores. AUC and the listwise ranks are the
  model's own; only log-loss and calibration depend on the scaling.

Both choose their number of epochs the same way: each user's last ``split.test_ratio`` share of
training rows (at least one) is held out (:func:`inner_valid`), a model fitted on the rest stops
early on them (the CTR model by AUC, the sequential model by full-ranking NDCG@10 of the held-out
liked items, history excluded), and a fresh model is then fitted on every training row for the best
number of epochs.
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import torch
from scipy.special import expit

from recforge.data.schema import ITEM, TIME, USER
from recforge.errors import ConfigError
from recforge.llm.task import LABEL, model_class

#: distinct (user, time) histories scored at once by a sequential baseline (each scores the whole catalogue)
SCORE_BATCH = 256
#: the smallest Platt slope, per standard deviation of the scores (see :func:`platt`)
PLATT_MIN_SLOPE = 1e-6


def inner_valid(rows: pl.DataFrame, ratio: float) -> pl.Expr:
    """True for each user's last ``ratio`` share (rounded, at least one) of ``rows`` (in time order
    within each user), the rows the epoch search validates on."""
    k = pl.int_range(pl.len()).over(USER)
    n = pl.len().over(USER)
    return k >= n - pl.max_horizontal(pl.lit(1), (n * float(ratio)).round().cast(pl.Int64))


def model_params(cfg: dict, verbose: bool) -> dict:
    """The baseline's constructor parameters: the model section, the run's seed and verbosity."""
    names = model_class(cfg["model"]["name"]).param_names()
    params = {k: v for k, v in cfg["model"].items() if k != "name"}
    if "verbose" in names:
        params["verbose"] = verbose
    if "seed" in names:
        params["seed"] = cfg["seed"]
    return params


def fit_baseline(cfg, split, test, writer, verbose, listwise=None):
    """The ID baseline of ``cfg`` (a CTR or a sequential model): ``(p, protocol, timing, training,
    candidate scores)``."""
    from recforge.models.sequential.base import SequentialRecommender

    if issubclass(model_class(cfg["model"]["name"]), SequentialRecommender):
        return fit_sequence_baseline(cfg, split, test, writer, verbose, listwise)
    return fit_ctr_baseline(cfg, split, test, writer, verbose, listwise)


def fit_ctr_baseline(cfg, split, test, writer, verbose, listwise=None):
    """The ID baseline: a CTR model on one-hot user and item ids, fitted on all training rows (epochs
    chosen on each user's last training rows first)."""
    from recforge.ctr import CTRSplit
    from recforge.data.features import FeatureEncoder, FeatureSpec, Schema
    from recforge.models import registry

    schema = Schema([FeatureSpec("user_id"), FeatureSpec("item_id")], [LABEL], user="user_id")
    rows = split.train.rename({"label": LABEL})
    inner = rows.with_columns(inner_valid(rows, cfg["split"]["test_ratio"]).alias("_v"))
    params = model_params(cfg, verbose)
    select = lambda f: f.select("user_id", "item_id", LABEL).with_columns(pl.col(LABEL).cast(pl.Int64))  # noqa: E731

    def make_split(train_rows, valid_rows):
        enc = FeatureEncoder(schema).fit(select(train_rows), "the training rows")
        tt = enc.transform(select(train_rows), "the training rows")
        vt = enc.transform(select(valid_rows), "the validation rows") if valid_rows is not None else None
        return CTRSplit(tt, vt, None, enc, {"method": "temporal_user"}), enc

    tf = time.perf_counter()
    s1, _ = make_split(inner.filter(~pl.col("_v")), inner.filter(pl.col("_v")))
    probe = registry.create(cfg["model"]["name"], **params)
    probe.fit(s1, s1.valid)
    best = max(1, int(probe.history_.get("best_epoch") or 1))
    s2, enc = make_split(rows, None)
    est = registry.create(cfg["model"]["name"], **{**params, "epochs": best})
    est.fit(s2, None)
    fit_seconds = time.perf_counter() - tf
    tt = time.perf_counter()
    p = est.predict_proba(enc.transform(select(test.rename({"label": LABEL})), "the test sample"))[:, 0]
    score_seconds = time.perf_counter() - tt
    cand_scores = None
    if listwise is not None:
        tl = time.perf_counter()
        cand_scores = est.predict_proba(enc.transform(select(listwise.rename({"label": LABEL})),
                                                      "the listwise candidates"))[:, 0]
        listwise_seconds = time.perf_counter() - tl
    writer.write_json("history.json", {"epoch_search": probe.history_, "refit": est.history_})
    enc.save(writer.tmp / "encoders")
    est.save(writer.tmp / "model")
    protocol = {"baseline": f"{cfg['model']['name']} on one-hot user and item ids, fitted on all "
                            f"{rows.height} training rows for {best} epochs (chosen by early stopping on each user's "
                            "last training rows)", "train_sample": {"rows": rows.height, "note": "all training rows"}}
    timing = {"fit_seconds": round(fit_seconds, 2), "scoring": {"prompts": test.height,
                                                                "seconds": round(score_seconds, 3)}}
    if listwise is not None:
        timing["listwise_scoring"] = {"prompts": listwise.height, "seconds": round(listwise_seconds, 3)}
    return (p, protocol, timing, {"best_epoch_search": best, "search_valid_auc": probe.history_.get("best_metric")},
            cand_scores)


def fit_sequence_baseline(cfg, split, test, writer, verbose, listwise=None):
    """A sequential model on each user's liked training items (module docstring)."""
    from recforge.data.split import Split
    from recforge.evaluation.batch import build_evalset
    from recforge.evaluation.evaluator import Protocol
    from recforge.models import registry

    name = cfg["model"]["name"]
    rows = split.train.with_columns(inner_valid(split.train, cfg["split"]["test_ratio"]).alias("_v"))
    liked = pl.col("label") == 1
    cols = [USER, ITEM, TIME]
    probe_train = rows.filter(liked & ~pl.col("_v")).select(cols)
    probe_valid = rows.filter(liked & pl.col("_v")).select(cols)
    all_liked = rows.filter(liked).select(cols)
    if probe_train.height == 0 or probe_valid.height == 0:
        raise ConfigError(f"{name}: too few liked training rows to choose its epochs (each user's last "
                          f"{cfg['split']['test_ratio']} share holds them out); lower data.like_threshold")
    params = model_params(cfg, verbose)

    def make_split(train, valid):
        return Split(train, valid if valid is not None else train.clear(), train.clear(), split.n_users, split.n_items,
                     {"method": "liked items per user, in time order"})

    tf = time.perf_counter()
    s1 = make_split(probe_train, probe_valid)
    probe = registry.create(name, **params)
    probe.valid_protocol = Protocol()  # full ranking, history excluded, pessimistic ties
    probe.fit(s1, build_evalset(probe_train, probe_valid, split.n_users, split.n_items, "valid"))
    best = max(1, int(probe.history_.get("best_epoch") or 1))
    calib = rows.filter(pl.col("_v"))
    calib_scores, _ = _scores(probe, split, calib, probe_train)
    a, b = platt(calib_scores, calib["label"].to_numpy())
    est = registry.create(name, **{**params, "epochs": best})
    est.fit(make_split(all_liked, None), None)
    fit_seconds = time.perf_counter() - tf
    tt = time.perf_counter()
    s, fallback = _scores(est, split, test, all_liked)
    score_seconds = time.perf_counter() - tt
    p = expit(a * s + b)
    cand_scores = None
    if listwise is not None:
        tl = time.perf_counter()
        cs, cand_fallback = _scores(est, split, listwise, all_liked)
        cand_scores = expit(a * cs + b)  # strictly increasing (a > 0): the model's own ranking
        listwise_seconds = time.perf_counter() - tl
    writer.write_json("history.json", {"epoch_search": probe.history_, "refit": est.history_})
    est.save(writer.tmp / "model")
    protocol = {"baseline": f"{name} on each user's time-ordered liked training items ({all_liked.height} of "
                            f"{split.train.height} training rows), fitted for {best} epochs (chosen by early stopping on "
                            "full-ranking NDCG@10 of each user's last training likes); scores Platt-scaled to "
                            f"probabilities (a={a:.4g}, b={b:.4g}, fitted on {calib.height} held-out training rows)",
                "train_sample": {"rows": all_liked.height, "note": "every liked training row"},
                "history_fallback": {"test_rows": int(fallback), "note": "rows whose user had no earlier like, "
                                     "scored after the user's earlier rated items"}}
    timing = {"fit_seconds": round(fit_seconds, 2), "scoring": {"prompts": test.height,
                                                                "seconds": round(score_seconds, 3)}}
    if listwise is not None:
        timing["listwise_scoring"] = {"prompts": listwise.height, "seconds": round(listwise_seconds, 3)}
        protocol["history_fallback"]["listwise_rows"] = int(cand_fallback)
    training = {"best_epoch_search": best, "search_valid_ndcg@10": probe.history_.get("best_metric"),
                "platt": {"a": a, "b": b, "rows": calib.height}}
    return p, protocol, timing, training, cand_scores


def platt(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` of ``sigmoid(a * s + b)`` by maximum likelihood (SciPy's bounded L-BFGS on the
    log-loss, scores standardised first). ``a`` is bounded below by ``PLATT_MIN_SLOPE`` per standard
    deviation of the scores, so the scaling never ties or reverses the model's ranking: when the
    held-out rows show no positive relation between score and like, the probabilities are then nearly
    constant."""
    from scipy.optimize import minimize

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(s) == 0 or y.min() == y.max():
        raise ConfigError("Platt scaling needs held-out training rows of both classes (liked and not); "
                          "raise split.test_ratio or change data.like_threshold")
    mu, sd = s.mean(), s.std() or 1.0
    z = (s - mu) / sd

    def loss(w):
        m = w[0] * z + w[1]
        q = expit(m)
        return float(np.sum(np.logaddexp(0.0, m) - y * m)), np.array([z @ (q - y), np.sum(q - y)])

    base = np.log(y.mean() / (1 - y.mean()))
    w = minimize(loss, np.array([1.0, base]), jac=True, method="L-BFGS-B",
                 bounds=[(PLATT_MIN_SLOPE, None), (None, None)], options={"gtol": 1e-10, "ftol": 1e-14}).x
    a = float(w[0] / sd)
    return a, float(w[1] - a * mu)


def _scores(est, split, frame: pl.DataFrame, liked: pl.DataFrame) -> tuple[np.ndarray, int]:
    """The model's score of each row's item after the user's liked rows of ``liked`` strictly before
    the row's time (after the user's earlier rated training rows when there is none), and how many
    rows needed that fallback. Rows of one user at one time (a listwise row's candidates) share one
    history and one pass over the catalogue."""
    from recforge.evaluation.batch import Histories

    liked = liked.sort([USER, TIME], maintain_order=True)
    lu, li, lt = (liked[c].to_numpy() for c in (USER, ITEM, TIME))
    start = np.searchsorted(lu, np.arange(split.n_users + 1))
    users, items, times = (frame[c].to_numpy() for c in (USER, ITEM, TIME))
    keys, group = np.unique(np.stack([users, times], 1).astype(np.int64), axis=0, return_inverse=True)
    group = group.reshape(-1)
    train_items = split.train[ITEM].to_numpy()
    hists, fell_back = [], np.zeros(len(keys), dtype=bool)
    for g, (u, t) in enumerate(keys):
        s, e = start[u], start[u + 1]
        n = int(np.searchsorted(lt[s:e], t, side="left"))
        h = li[s:s + n].tolist()
        if not h:
            fell_back[g] = True
            h = train_items[split.history_rows(int(u), int(t))].tolist()
        hists.append(h)
    order = np.argsort(group, kind="stable")  # the rows of each group, groups in order
    bounds = np.searchsorted(group[order], np.arange(len(keys) + 1))
    out = np.empty(len(users), dtype=np.float64)
    est.net_.eval()
    for lo in range(0, len(keys), SCORE_BATCH):
        hi = min(lo + SCORE_BATCH, len(keys))
        hist = Histories.from_lists(keys[lo:hi, 0], hists[lo:hi], split.n_items)
        with torch.no_grad():
            sc = est.score(hist)
        rows = order[bounds[lo]:bounds[hi]]
        r = torch.as_tensor(group[rows] - lo, dtype=torch.long, device=sc.device)
        c = torch.as_tensor(items[rows], dtype=torch.long, device=sc.device)
        out[rows] = sc[r, c].float().cpu().numpy()
    return out, int(fell_back[group].sum())
