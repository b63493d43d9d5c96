"""Train / validation / test splits without leakage.

Every split returns a :class:`Split` whose ``train`` frame is the only thing a model is fitted
on. Validation targets are ranked against the training history; test targets against the
training plus validation history (plus ``context``, below). A test interaction is never in
``train``.

**Target behaviour.** With ``target_behavior=NAME`` (``data.target_behavior``; the data has a
``behavior`` column) only rows of that behaviour are held out; the other behaviours are inputs:

* ``loo``: each user's last target row (by time) is the test target, the second-to-last the
  validation target. Training holds every row of the user, of every behaviour, at or before the
  validation target's time (at or before the test target's time when there is no validation
  target), except the targets; the rows after the validation target and up to the test target's
  time (other behaviours only: no target row lies between the two) are ``context``: visible when
  ranking the test target, never trained on. Rows after the test target's time are dropped
  (nothing from the user's future). A user is held out when they have a target row and at least
  ``min_length`` rows at or before it (counting it); others stay wholly in training. With every
  row of the target behaviour this is exactly :func:`leave_one_out`.
* ``temporal``: cut-offs are quantiles of the target rows' times (unless given); training holds
  every row before the validation cut-off; validation and test targets are the target rows of
  the two periods; other behaviours of the validation period are ``context``; rows of other
  behaviours from the test cut-off on are dropped.
* ``random``: the per-user random split of the target rows; every other row trains (a random
  split has no time order, so nothing is dropped).
* ``presplit``: the given training part as it is; held-out rows without a behaviour (the
  multi-behaviour sets' ``test.csv``) are target rows; held-out rows of another behaviour are
  ``context`` (validation part) or dropped (test part). When the source gives no validation part
  (``split.valid``: ``auto`` does this for a target behaviour, ``last`` always, ``none`` never), each
  user's last training row of the target behaviour (of any row without one) becomes the
  validation target, for users with at least two such rows; that user's training rows of other
  behaviours after it become ``context``, as in ``loo``. When (almost) none of the given test pairs
  occurs in the training part (the multi-behaviour sets removed each test pair from every
  behaviour), the validation pair's other rows (a view or cart of the validation item) become
  ``context`` too, so validation asks what the test asks. The test targets stay the given ones, so
  early stopping never looks at them.

Counts (held-out users, users without a target row, dropped rows) go into ``Split.protocol``.

**Distribution shifts.** Two splits make the test distribution differ from the training one, as
the out-of-distribution recommendation literature evaluates: ``temporal`` (above; a global time
cut-off, so the test period's interests and items differ from the training period's) is the
*temporal shift*; ``popularity_shift`` (:func:`popularity_shift`) is the *popularity shift*: test
and validation pairs are drawn with probability inversely proportional to the item's popularity,
so their item popularity is close to uniform while training keeps the long tail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import polars as pl
import scipy.sparse as sp

from recforge.data.dataset import Dataset, sort_interactions
from recforge.data.schema import BEHAVIOR, ITEM, SPLIT, TIME, USER
from recforge.errors import ConfigError, DataError

SPLITS = ("loo", "temporal", "random", "presplit", "popularity_shift")
#: ``split.valid`` of a given split without a validation part
PRESPLIT_VALID = ("auto", "last", "none")
#: below this share of the given test pairs found in training, a carved validation pair is hidden too
PAIR_SHARE = 0.01


@dataclass
class Split:
    """A split of an encoded dataset. Frames hold encoded ``user_id``/``item_id``/``timestamp``."""

    train: pl.DataFrame
    valid: pl.DataFrame
    test: pl.DataFrame
    n_users: int
    n_items: int
    protocol: dict = field(default_factory=dict)
    #: rows visible when ranking test targets that are neither trained on nor targets (with a
    #: target behaviour: the other behaviours' rows of the validation period); None when none
    context: pl.DataFrame | None = None
    #: item relations asked for with ``data.knowledge`` (recforge.data.knowledge.Knowledge),
    #: built from the training part only; None when not asked for
    knowledge: object | None = None
    #: user-user links asked for with ``data.social`` (recforge.data.social.Social); None when not asked for
    social: object | None = None
    #: item tags asked for with ``data.tags`` (recforge.data.tags.Tags), from the training part only;
    #: None when not asked for
    tags: object | None = None

    def history(self, which: str) -> pl.DataFrame:
        """Interactions visible to the model when ranking ``which`` targets (valid or test)."""
        if which == "valid":
            return self.train
        if which == "test":
            extra = [f for f in (self.valid, self.context) if f is not None and f.height]
            if not extra:
                return self.train
            return sort_interactions(pl.concat([self.train, *extra], how="diagonal_relaxed"))
        raise ValueError(f"unknown split part {which!r}")

    def targets(self, which: str) -> pl.DataFrame:
        return {"valid": self.valid, "test": self.test}[which]

    # ---- views of the training part used by models ----------------------------------------
    @cached_property
    def train_matrix(self) -> sp.csr_matrix:
        """Binary user x item CSR matrix of training interactions, shape (n_users, n_items + 1)."""
        return interactions_to_csr(self.train, self.n_users, self.n_items)

    @cached_property
    def train_sequences(self) -> tuple[np.ndarray, np.ndarray]:
        """Ragged time-ordered training sequences: (indptr of length n_users + 1, items)."""
        return ragged_sequences(self.train, self.n_users)

    @cached_property
    def item_popularity(self) -> np.ndarray:
        counts = np.zeros(self.n_items + 1, dtype=np.int64)
        vc = self.train.group_by(ITEM).len()
        counts[vc[ITEM].to_numpy()] = vc["len"].to_numpy()
        return counts


def interactions_to_csr(df: pl.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    u = df[USER].to_numpy().astype(np.int64)
    i = df[ITEM].to_numpy().astype(np.int64)
    m = sp.csr_matrix((np.ones(len(u), dtype=np.float32), (u, i)), shape=(n_users, n_items + 1))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def ragged_sequences(df: pl.DataFrame, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Time-ordered items per user from a frame sorted by (user, time)."""
    df = sort_interactions(df)
    users = df[USER].to_numpy().astype(np.int64)
    counts = np.bincount(users, minlength=n_users)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, df[ITEM].to_numpy().astype(np.int64)


def _empty_like(df: pl.DataFrame) -> pl.DataFrame:
    return df.clear()


def _same_user(offset: int) -> pl.Expr:
    """Whether the row ``offset`` rows before (negative: after) belongs to the same user, on a
    frame sorted by user; False past either end."""
    return (pl.col(USER).shift(offset) == pl.col(USER)).fill_null(False)


def leave_one_out(ds: Dataset, min_length: int = 3, target_behavior: str | None = None) -> Split:
    """Last interaction of each user is the test target, the one before it the validation
    target, the rest is training. Users with fewer than ``min_length`` interactions stay wholly
    in training and are not evaluated. ``target_behavior``: only rows of that behaviour are
    held out (:func:`_target_leave_one_out`, the module docstring states the rules).

    On the frame sorted by (user, time) every part is a row-wise test over neighbouring rows (no
    per-user window, no join): a row is its user's last when the next row has another user, and
    the user has at least ``min_length`` rows when the row ``min_length - 1`` above is theirs.
    """
    if target_behavior is not None:
        return _target_leave_one_out(ds, min_length, target_behavior)
    df = sort_interactions(ds.interactions)

    def enough(after: int) -> pl.Expr:
        """For a row with ``after`` rows of its user after it: the user has >= min_length rows."""
        before = min_length - 1 - after
        return _same_user(before) if before > 0 else pl.lit(True)

    last = ~_same_user(-1)
    second_last = _same_user(-1) & ~_same_user(-2)
    part = (pl.when(last & enough(0)).then(2).when(second_last & enough(1)).then(1).otherwise(0)
            .cast(pl.UInt8).alias("_part"))
    marked = df.lazy().with_columns(part)
    train, valid, test = pl.collect_all(
        [marked.filter(pl.col("_part") == k).drop("_part") for k in (0, 1, 2)], engine="streaming")
    return Split(train, valid, test, ds.n_users, ds.n_items, {"split": "leave-one-out", "min_length": min_length})


def temporal(ds: Dataset, test_quantile: float = 0.9, valid_quantile: float = 0.8,
             test_cutoff: int | None = None, valid_cutoff: int | None = None,
             target_behavior: str | None = None) -> Split:
    """Global temporal split: interactions before the validation cut-off train, those between
    the cut-offs validate, the rest test. Cut-offs are timestamps or quantiles of all times.
    Targets of users with no training history are dropped (nothing to rank from).
    ``target_behavior``: only rows of that behaviour are targets and the quantiles are taken
    over their times (module docstring). This is the *temporal shift* split of the
    out-of-distribution recommendation literature (training on the past, testing on a later
    period); :func:`popularity_shift` is the popularity shift."""
    df = sort_interactions(ds.interactions)
    is_target = _target_rows(df, target_behavior, ds.name) if target_behavior is not None else None
    if test_cutoff is None or valid_cutoff is None:
        times = df.lazy() if is_target is None else df.lazy().filter(is_target)
        q = times.select(pl.col(TIME).quantile(test_quantile, "nearest").alias("test"),
                         pl.col(TIME).quantile(valid_quantile, "nearest").alias("valid"))
        q = q.collect(engine="streaming").row(0, named=True)
    t_test = int(test_cutoff) if test_cutoff is not None else int(q["test"])
    t_valid = int(valid_cutoff) if valid_cutoff is not None else int(q["valid"])
    if t_valid > t_test:
        raise ConfigError(f"temporal split: validation cut-off {t_valid} is after test cut-off {t_test}; swap them")
    lf = df.lazy()
    train_lf = lf.filter(pl.col(TIME) < t_valid)
    known = train_lf.select(pl.col(USER).unique())
    held = lambda cond: lf.filter(cond).join(known, on=USER, how="semi", maintain_order="left")  # noqa: E731
    in_valid = (pl.col(TIME) >= t_valid) & (pl.col(TIME) < t_test)
    in_test = pl.col(TIME) >= t_test
    if is_target is None:
        train, valid, test = pl.collect_all([train_lf, held(in_valid), held(in_test)], engine="streaming")
        context = None
    else:
        train, valid, test, context = pl.collect_all(
            [train_lf, held(in_valid & is_target), held(in_test & is_target), held(in_valid & ~is_target)],
            engine="streaming")
    if train.height == 0 or test.height == 0:
        raise DataError(f"temporal split at {t_valid}/{t_test} leaves an empty train or test part; choose other cut-offs")
    protocol = {"split": "temporal", "valid_cutoff": t_valid, "test_cutoff": t_test}
    if is_target is not None:
        protocol.update(
            target_behavior=target_behavior,
            history="every row (all behaviours) before the validation cut-off trains; other behaviours of the "
                    "validation period are visible at test time only; other behaviours from the test cut-off on "
                    "are dropped",
            users_evaluated=int(test[USER].n_unique()),
            users_without_target=ds.n_users - int(df.filter(is_target)[USER].n_unique()),
            context_rows=context.height,
            rows_dropped=df.height - train.height - valid.height - test.height - context.height)
    return Split(train, valid, test, ds.n_users, ds.n_items, protocol, context=context)


def random_ratio(ds: Dataset, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0,
                 target_behavior: str | None = None) -> Split:
    """Per-user random split by ratio (train, valid, test); every user keeps at least one
    training interaction. ``target_behavior``: the rows of that behaviour are split so (each
    user keeping one training row of it), every other row trains."""
    if len(ratios) != 3 or abs(sum(ratios) - 1.0) > 1e-6 or min(ratios) < 0:
        raise ConfigError(f"random split: ratios {ratios} must be three non-negative numbers summing to 1")
    df = sort_interactions(ds.interactions)
    protocol = {"split": "random", "ratios": list(ratios), "seed": seed}
    if target_behavior is not None:
        is_target = _target_rows(df, target_behavior, ds.name)
        train, valid, test = _random_parts(df.filter(is_target), ratios, seed)
        train = sort_interactions(pl.concat([train, df.filter(~is_target)]))
        protocol.update(target_behavior=target_behavior,
                        history="every row of the other behaviours trains (a random split has no time order)",
                        users_evaluated=int(test[USER].n_unique()))
        return Split(train, valid, test, ds.n_users, ds.n_items, protocol)
    return Split(*_random_parts(df, ratios, seed), ds.n_users, ds.n_items, protocol)


def _random_parts(df: pl.DataFrame, ratios: tuple[float, float, float], seed: int
                  ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    rng = np.random.default_rng(seed)
    df = df.with_columns(pl.Series("_r", rng.random(df.height)))
    df = df.with_columns(
        (pl.col("_r").rank("ordinal").over(USER) - 1).alias("_k"), pl.len().over(USER).alias("_n")
    )
    frac = pl.col("_k") / pl.col("_n")
    tr, va = ratios[0], ratios[0] + ratios[1]
    is_train = (frac < tr) | (pl.col("_k") == 0)
    train = df.filter(is_train)
    valid = df.filter(~is_train & (frac < va))
    test = df.filter(~is_train & (frac >= va))
    drop = ["_r", "_k", "_n"]
    return train.drop(drop), valid.drop(drop), test.drop(drop)


def popularity_shift(ds: Dataset, test_share: float = 0.1, valid_share: float = 0.1, seed: int = 0,
                     power: float = 1.0, keep_items: bool = True, target_behavior: str | None = None) -> Split:
    """Popularity-shift split: test and validation pairs drawn with probability inversely
    proportional to their item's popularity, the rest is training.

    This is the "intervened" (unbiased) test set of the popularity-debiasing literature as MACR
    (Wei et al., KDD 2021) builds it from an observational log, following CausE (Bonner & Vasile,
    RecSys 2018): a share of the interactions is drawn with equal probability for every *item*
    (each interaction with probability ∝ 1 / popularity of its item), so the test set's item
    distribution is close to uniform while training keeps the long tail. DICE (Zheng et al., WWW
    2021) builds its intervened sets in the same spirit; the popularity-shift benchmark of DR-GNN
    (Wang et al., WWW 2024), which DRGO and CausalDiffRec (Zhao et al., WWW 2025) reuse, ships as
    fixed files. Validation is drawn the same way from what the test draw leaves (MACR's 10% /
    10%), so early stopping sees the shifted distribution, not the test targets.

    The rules, on the distinct (user, item) pairs (all rows of a pair go to the same part, so no
    held-out pair is ever trained on; of a held-out pair with repeated rows the latest row is the
    target and the others are dropped):

    * popularity = number of users of the item in the whole log; pair weight = popularity^-power
      (``power=1``: inverse popularity; ``0``: a uniform random draw of pairs);
    * a weighted draw without replacement (Efraimidis & Spirakis keys ``Exp(1) / weight``, the
      ``seed`` fixes them) takes ``round(test_share * pairs)`` test pairs, then
      ``round(valid_share * pairs)`` validation pairs from the rest;
    * each user keeps a training pair (their pair drawn last is never drawn), and with
      ``keep_items`` (default) each item too, so every test item has been seen in training.

    ``Split.protocol`` states the rule and measures the shift: Gini coefficient of the item
    counts and KL divergence of the item distribution from the uniform one over the items
    present, for the training and the test part.
    """
    if target_behavior is not None:
        raise ConfigError("split.method=popularity_shift holds out pairs of every behaviour; drop "
                          "data.target_behavior or use split.method=loo|temporal|random")
    if not 0.0 < test_share < 1.0:
        raise ConfigError(f"split.test_share={test_share}: must be in (0, 1), e.g. 0.1")
    if not 0.0 <= valid_share < 1.0 or test_share + valid_share >= 1.0:
        raise ConfigError(f"split.valid_share={valid_share}: must be in [0, 1) with test_share + valid_share < 1, "
                          "e.g. 0.1")
    if not power >= 0.0:
        raise ConfigError(f"split.power={power}: must be >= 0 (1: inverse popularity, 0: uniform random pairs)")
    df = sort_interactions(ds.interactions)
    pairs = df.select(USER, ITEM).unique(maintain_order=True)
    u = pairs[USER].to_numpy().astype(np.int64)
    i = pairs[ITEM].to_numpy().astype(np.int64)
    n = len(u)
    pop = np.bincount(i, minlength=ds.n_items + 1).astype(np.float64)
    weight = pop[i] ** -float(power)
    key = np.random.default_rng(seed).exponential(size=n) / weight  # ascending = the draw order
    protected = _last_drawn(u, key)
    if keep_items:
        protected |= _last_drawn(i, key)
    eligible = np.flatnonzero(~protected)
    order = eligible[np.argsort(key[eligible], kind="stable")]
    n_test = min(int(round(test_share * n)), len(order))
    n_valid = min(int(round(valid_share * n)), len(order) - n_test)
    if n_test == 0:
        raise DataError(f"{ds.name}: popularity_shift leaves no test pair ({n} pairs, every user"
                        f"{' and item' if keep_items else ''} keeps one in training); raise split.test_share or "
                        "use more data")
    part = np.zeros(n, dtype=np.uint8)
    part[order[:n_test]] = 2
    part[order[n_test:n_test + n_valid]] = 1
    marked = df.join(pairs.with_columns(pl.Series("_part", part)), on=[USER, ITEM], how="left",
                     maintain_order="left")
    same_next = (pl.col(USER).shift(-1) == pl.col(USER)) & (pl.col(ITEM).shift(-1) == pl.col(ITEM))
    last_of_pair = ~same_next.fill_null(False)
    marked = marked.sort([USER, ITEM, TIME], maintain_order=True).with_columns(last_of_pair.alias("_last"))
    train = marked.filter(pl.col("_part") == 0).drop("_part", "_last")
    valid, test = (sort_interactions(marked.filter((pl.col("_part") == k) & pl.col("_last")).drop("_part", "_last"))
                   for k in (1, 2))
    train = sort_interactions(train)
    protocol = {
        "split": "popularity_shift",
        "rule": "test, then validation (user, item) pairs drawn without replacement with probability proportional "
                "to item popularity^-power (popularity = users of the item in the whole log); each user"
                + (" and each item" if keep_items else "")
                + " keeps a training pair (MACR / CausE intervened test set)",
        "test_share": test_share, "valid_share": valid_share, "seed": seed, "power": power, "keep_items": keep_items,
        "pairs": n, "test_pairs": test.height, "valid_pairs": valid.height,
        "rows_dropped": df.height - train.height - valid.height - test.height,
        "shift": {name: popularity_shape(frame[ITEM].to_numpy(), ds.n_items)
                  for name, frame in (("train", train), ("test", test))},
    }
    return Split(train, valid, test, ds.n_users, ds.n_items, protocol)


def _last_drawn(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Mask of the pair with the largest key (the last a weighted draw would take) in each group."""
    order = np.lexsort((key, group))
    g = group[order]
    last = np.ones(len(g), dtype=bool)
    last[:-1] = g[1:] != g[:-1]
    mask = np.zeros(len(group), dtype=bool)
    mask[order[last]] = True
    return mask


def popularity_shape(items: np.ndarray, n_items: int) -> dict:
    """How concentrated the item distribution of ``items`` (encoded ids) is: the Gini coefficient
    of the counts of the items present (0: uniform) and the KL divergence (nats) of their
    distribution from the uniform one over those items."""
    counts = np.bincount(np.asarray(items, dtype=np.int64), minlength=n_items + 1)[1:]
    c = np.sort(counts[counts > 0]).astype(np.float64)
    if len(c) == 0:
        return {"items": 0, "gini": 0.0, "kl_from_uniform": 0.0}
    m = len(c)
    gini = float((2.0 * np.arange(1, m + 1) - m - 1) @ c / (m * c.sum()))
    p = c / c.sum()
    kl = float(np.sum(p * np.log(p * m)))
    return {"items": m, "gini": round(gini, 4), "kl_from_uniform": round(kl, 4)}


def presplit(ds: Dataset, target_behavior: str | None = None, valid: str = "auto") -> Split:
    """Use the ``split`` column the source came with (train / valid / test). ``target_behavior``:
    held-out rows without a behaviour are rows of that behaviour; held-out rows of another
    behaviour are ``context`` (validation part) or dropped (test part). ``valid``: carve a
    validation part out of the training part when the source has none (module docstring)."""
    if valid not in PRESPLIT_VALID:
        raise ConfigError(f"split.valid={valid!r}: choose one of {', '.join(PRESPLIT_VALID)}")
    df = sort_interactions(ds.interactions)
    if SPLIT not in df.columns:
        raise DataError(f"{ds.name}: split=presplit needs a pre-split source (train/test files); use split=loo")
    part = lambda name: df.filter(pl.col(SPLIT) == name).drop(SPLIT)  # noqa: E731
    train, valid_rows, test = part("train"), part("valid"), part("test")
    if train.height == 0 or test.height == 0:
        raise DataError(f"{ds.name}: pre-split source has no train or no test rows")
    protocol = {"split": "presplit", "has_valid": valid_rows.height > 0}
    carve = valid_rows.height == 0 and (valid == "last" or (valid == "auto" and target_behavior is not None))
    context = None
    if target_behavior is not None:
        _require_behavior_column(df, target_behavior, ds.name)
        label = pl.col(BEHAVIOR).fill_null(pl.lit(target_behavior))
        valid_rows, test = (f.with_columns(label) for f in (valid_rows, test))
        held = lambda f, keep: f.filter((pl.col(BEHAVIOR) == target_behavior) == keep)  # noqa: E731
        context, valid_rows, n_test = held(valid_rows, False), held(valid_rows, True), test.height
        test = held(test, True)
        if test.height == 0:
            raise DataError(f"{ds.name}: no held-out row of the target behaviour {target_behavior!r}; name the "
                            "behaviour of the test rows with data.target_behavior")
    if carve:
        pairs_in_train = test.select(USER, ITEM).join(train.select(USER, ITEM).unique(), on=[USER, ITEM], how="semi")
        pair_share = pairs_in_train.height / max(test.height, 1)
        hide_pair = pair_share < PAIR_SHARE
        train, valid_rows, carved_context = _last_training_target(train, target_behavior, hide_pair)
        context = carved_context if context is None else pl.concat([context, carved_context])
        protocol.update(has_valid=valid_rows.height > 0, valid="carved: each user's last training row"
                        + (f" of {target_behavior!r}" if target_behavior is not None else "")
                        + " (users with at least two)", valid_users=valid_rows.height,
                        test_pairs_in_training=round(pair_share, 4),
                        valid_pair_rows="context (the given test pairs do not occur in training, so the "
                                        "validation pair does not either)" if hide_pair else "training")
    if target_behavior is not None:
        train_users = train[USER].unique()
        protocol.update(
            target_behavior=target_behavior,
            history="the given training part (all behaviours) as it is; held-out rows without a behaviour are "
                    "target rows" + ("; the carved validation targets and the user's later rows of other behaviours "
                                     "are visible at test time only" if carve else ""),
            users_evaluated=int(test[USER].n_unique()), rows_dropped=n_test - test.height,
            context_rows=context.height,
            test_users_without_training_rows=int((~test[USER].unique().is_in(train_users.implode())).sum()),
            test_items_not_in_training=int((~test[ITEM].is_in(train[ITEM].unique().implode())).sum()))
    return Split(train, valid_rows, test, ds.n_users, ds.n_items, protocol, context=context)


def _last_training_target(train: pl.DataFrame, target: str | None,
                          hide_pair: bool = False) -> tuple[pl.DataFrame, ...]:
    """``(train, valid, context)``: each user's last training row of ``target`` (every row when
    None) is the validation target when the user has at least two; the user's rows of other
    behaviours after its time, and with ``hide_pair`` the user's other rows of the validation item,
    are context. ``train`` is sorted by (user, time)."""
    rows = train.with_row_index("_row")
    is_t = (pl.col(BEHAVIOR) == target).fill_null(True) if target is not None else pl.lit(True)
    rows = rows.with_columns(is_t.alias("_t"))
    per_user = (rows.filter("_t").group_by(USER).agg(pl.len().alias("_n"), pl.col("_row").last().alias("_v"),
                                                      pl.col(TIME).last().alias("_tv"),
                                                      pl.col(ITEM).last().alias("_iv"))
                .filter(pl.col("_n") >= 2))
    rows = rows.join(per_user, on=USER, how="left", maintain_order="left")
    is_valid = pl.col("_row") == pl.col("_v")
    later = pl.col("_v").is_not_null() & (pl.col(TIME) > pl.col("_tv")) & ~is_valid
    if hide_pair:
        later = later | (pl.col("_v").is_not_null() & (pl.col(ITEM) == pl.col("_iv")) & ~is_valid)
    keep = train.columns
    return (rows.filter(~is_valid.fill_null(False) & ~later).select(keep),
            rows.filter(is_valid.fill_null(False)).select(keep), rows.filter(later).select(keep))


# ---- target behaviour ------------------------------------------------------------------------
def _require_behavior_column(df: pl.DataFrame, target_behavior: str, name: str) -> None:
    if BEHAVIOR not in df.columns:
        raise DataError(f"{name}: the target behaviour {target_behavior!r} needs a behaviour column; map it with "
                        "data.behavior_col=NAME, or drop data.target_behavior")


def _target_rows(df: pl.DataFrame, target_behavior: str, name: str) -> pl.Expr:
    """The rows of the target behaviour, as an expression; a DataError when there are none."""
    _require_behavior_column(df, target_behavior, name)
    is_target = (pl.col(BEHAVIOR) == target_behavior).fill_null(False)
    if not df.select(is_target.any()).item():
        present = ", ".join(str(b) for b in df[BEHAVIOR].drop_nulls().unique().sort())
        raise DataError(f"{name}: no row of the target behaviour {target_behavior!r} (behaviours present: "
                        f"{present}); set data.target_behavior to one of them")
    return is_target


def _target_leave_one_out(ds: Dataset, min_length: int, target: str) -> Split:
    """Leave-one-out over the target behaviour's rows (module docstring)."""
    df = sort_interactions(ds.interactions)
    is_target = _target_rows(df, target, ds.name)
    rows = df.with_row_index("_row").with_columns(is_target.alias("_t"))
    per_user = rows.filter("_t").group_by(USER, maintain_order=True).agg(
        pl.len().alias("_n_t"), pl.col("_row").last().alias("_test_row"), pl.col(TIME).last().alias("_t_test"),
        pl.col("_row").tail(2).first().alias("_valid_row"), pl.col(TIME).tail(2).first().alias("_t_valid"))
    rows = rows.join(per_user, on=USER, how="left", maintain_order="left")
    t, row = pl.col(TIME), pl.col("_row")
    held = pl.col("_t_test").is_not_null() & ((t <= pl.col("_t_test")).sum().over(USER) >= min_length)
    rows = rows.with_columns(held.alias("_held"), (held & (pl.col("_n_t") >= 2)).alias("_has_valid"))
    part = (pl.when(pl.col("_held") & (row == pl.col("_test_row"))).then(pl.lit("test"))
            .when(pl.col("_has_valid") & (row == pl.col("_valid_row"))).then(pl.lit("valid"))
            .when(pl.col("_held") & (t > pl.col("_t_test"))).then(pl.lit("dropped"))
            .when(pl.col("_has_valid") & (t > pl.col("_t_valid"))).then(pl.lit("context"))
            .otherwise(pl.lit("train")).alias("_part"))
    rows = rows.with_columns(part)
    keep = df.columns
    train, valid, test, context = (rows.filter(pl.col("_part") == p).select(keep)
                                   for p in ("train", "valid", "test", "context"))
    users_with_target = per_user.height
    protocol = {
        "split": "leave-one-out", "min_length": min_length, "target_behavior": target,
        "history": "every row of the user (all behaviours) at or before the held-out target's time, except the "
                   "targets; other behaviours after the validation target are visible at test time only; rows "
                   "after the test target's time are dropped",
        "users_evaluated": test.height,
        "users_without_target": ds.n_users - users_with_target,
        "users_too_short": users_with_target - test.height,
        "rows_dropped": int(rows.select((pl.col("_part") == "dropped").sum()).item()),
        "context_rows": context.height,
    }
    return Split(train, valid, test, ds.n_users, ds.n_items, protocol, context=context)


def make_split(ds: Dataset, method: str = "loo", target_behavior: str | None = None, **options) -> Split:
    """The split ``method`` of ``ds``; ``target_behavior`` holds out that behaviour's rows only."""
    t = {"target_behavior": target_behavior} if target_behavior is not None else {}
    if method in ("loo", "leave-one-out"):
        return leave_one_out(ds, **options, **t)
    if method == "temporal":
        return temporal(ds, **options, **t)
    if method == "random":
        return random_ratio(ds, **options, **t)
    if method == "presplit":
        return presplit(ds, **options, **t)
    if method == "popularity_shift":
        return popularity_shift(ds, **options, **t)
    raise ConfigError(f"unknown split {method!r}; choose one of {', '.join(SPLITS)}")
