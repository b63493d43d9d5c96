"""Checks the graph models share, used by their test files: a block-structured synthetic task
(``block_task``, which each file wraps in its own module-scoped fixture) with its evaluation sets
and Pop's NDCG@10, beating Pop, determinism by seed, a save/load round trip, and scoring an unknown
user (folded in from the history items) and empty histories."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from recforge.data.split import Split
from recforge.evaluation.batch import Histories, build_evalset
from recforge.evaluation.evaluator import evaluate
from recforge.models.base import Recommender
from recforge.models.general.pop import Pop
from recforge.models.registry import create


# ---- the task -----------------------------------------------------------------------------------
def frame(rows, t0: int) -> pl.DataFrame:
    """(user, item) ``rows`` as an interaction frame, timestamps ``t0``, ``t0 + 1``, ... in row order."""
    a = np.asarray(rows, dtype=np.int64)
    return pl.DataFrame({"user_id": a[:, 0].astype(np.int32), "item_id": a[:, 1].astype(np.int32),
                         "timestamp": t0 + np.arange(len(a), dtype=np.int64)})


def block_task(seed: int = 0, n_users: int = 200, n_groups: int = 4, block: int = 15, n_own: int = 8,
               skew: float | None = None, shuffle: bool = False, noise: int = 0, noisy_groups=None,
               noise_last: bool = False):
    """Users in ``n_groups`` taste groups, user ``u`` in group ``u % n_groups``, each consuming
    ``n_own`` items of its group's block of ``block`` items: one test and one validation target,
    the rest training. ``skew``: items drawn with probability ∝ rank^-skew inside the block (so that
    Pop is not trivial; None: uniformly), ``shuffle``: the drawn items shuffled before the targets
    are taken. ``noise``: corrupted training positives each user of ``noisy_groups`` (None: every
    group) also gets, drawn from the other blocks; they follow their user's own training pairs
    (``noise_last``: after every user's). Returns (split, clean training pairs, corrupted pairs)."""
    rng = np.random.default_rng(seed)
    p = None
    if skew is not None:
        p = 1.0 / np.arange(1, block + 1) ** skew
        p /= p.sum()
    every = np.arange(1, n_groups * block + 1)
    rows, clean, noisy, valid, test = [], [], [], [], []
    for u in range(n_users):
        g = u % n_groups
        own = np.arange(g * block + 1, (g + 1) * block + 1)
        items = rng.choice(own, n_own, replace=False, p=p)
        if shuffle:
            rng.shuffle(items)
        test.append((u, items[0]))
        valid.append((u, items[1]))
        pairs = [(u, i) for i in items[2:]]
        clean += pairs
        rows += pairs
        if noise and (noisy_groups is None or g in noisy_groups):
            pairs = [(u, i) for i in rng.choice(np.setdiff1d(every, own), noise, replace=False)]
            noisy += pairs
            if not noise_last:
                rows += pairs
    if noise_last:
        rows += noisy
    split = Split(train=frame(rows, 0).sort("user_id", "timestamp"), valid=frame(valid, 10**6),
                  test=frame(test, 2 * 10**6), n_users=n_users, n_items=n_groups * block)
    return split, np.array(clean), np.array(noisy)


def ndcg(model, evalset) -> float:
    return evaluate(model, evalset, ks=[10], groups=False).metrics["ndcg@10"]


def evalsets(split):
    """(valid, test, Pop's test NDCG@10) of ``split``."""
    valid = build_evalset(split.history("valid"), split.valid, split.n_users, split.n_items, "valid")
    test = build_evalset(split.history("test"), split.test, split.n_users, split.n_items, "test")
    return valid, test, ndcg(Pop().fit(split), test)


# ---- checks -------------------------------------------------------------------------------------
def assert_beats_pop(model, test, pop: float, margin: float = 0.05, label: str = "") -> None:
    got = ndcg(model, test)
    assert got > pop + margin, f"{label}NDCG@10 {got:.4f} vs Pop {pop:.4f}"


def assert_deterministic_by_seed(name, params, split, hist, seeds=(7, 8)):
    """Two fits of ``name`` (``params``, no validation) under ``seeds[0]`` score ``hist`` identically,
    one under ``seeds[1]`` differently; returns the first model and its scores."""
    model = create(name, **{**params, "seed": seeds[0]}).fit(split, None)
    a = model.score(hist)
    b = create(name, **{**params, "seed": seeds[0]}).fit(split, None).score(hist)
    c = create(name, **{**params, "seed": seeds[1]}).fit(split, None).score(hist)
    assert torch.equal(a, b) and not torch.equal(a, c)
    return model, a


def assert_round_trip(model, hist, path, cls=None, before=None):
    """Saved to ``path`` and loaded, the model is a ``cls`` (default: the model's class) with the same
    parameters that scores ``hist`` as ``before`` (default: the model's scores); returns (loaded,
    before)."""
    if before is None:
        before = model.score(hist)
    loaded = Recommender.load(model.save(path))
    assert type(loaded) is (cls or type(model)) and loaded.get_params() == model.get_params()
    assert torch.equal(loaded.score(hist), before)
    return loaded, before


def assert_unknown_user(model, hist, before, known=0, fold_in=True) -> torch.Tensor:
    """The first history of ``hist`` under user -1 and the second under user ``known`` (the first
    history's user, whose scores are ``before[0]``): finite scores of the right shape, the known user
    scored by its own row whatever the history. ``fold_in``: the unknown user is the mean of the
    final embeddings of its history items. Returns the two rows of scores."""
    unknown = Histories(np.array([-1, known]), hist.indptr[:3], hist.items[: hist.indptr[2]], hist.n_items)
    s = model.score(unknown)
    assert s.shape == (2, hist.n_items + 1) and torch.isfinite(s).all()
    torch.testing.assert_close(s[1], before[0])
    if fold_in:
        items = model.final_embeddings()[1]
        first = torch.from_numpy(np.asarray(hist.items[hist.indptr[0] : hist.indptr[1]], dtype=np.int64))
        torch.testing.assert_close(s[0], items[first].mean(0) @ items.T)
    return s


def assert_empty_histories(model, n_items: int, users=(-1, 3)) -> None:
    """Empty histories of ``users`` (-1: unknown) score finitely, one row of ``n_items + 1`` each."""
    empty = model.score(Histories.from_lists(list(users), [[] for _ in users], n_items))
    assert empty.shape == (len(users), n_items + 1) and torch.isfinite(empty).all()
