"""Shared test set-up: an isolated preparation cache, and the location of the real datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# the shared contract checks keep pytest's detailed assertion messages
pytest.register_assert_rewrite("mb_contract", "seq_contract", "graph_contract")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("RECFORGE_CACHE", str(tmp_path_factory.mktemp("recforge-cache")))
    # eager ranking in tests (no compile time per test process); test_ranking_kernel checks the fused path
    mp.setenv("RECFORGE_COMPILE", "0")
    # ranx (the metrics cross-check, imported inside its tests) compiles each metric with numba on first
    # use: 147 s of a fresh environment's run on 2 busy cores; interpreted, the same checks take seconds
    mp.setenv("NUMBA_DISABLE_JIT", "1")
    # tiny tensors: one thread avoids oversubscription when the machine is busy
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


def shared_dataset(*parts: str) -> Path:
    """Path of a real dataset beside the project; skips the test with a clear message if absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real dataset not available at {p} (the shared data folder sits beside the project)")
    return p


@pytest.fixture(scope="session")
def synthetic_loo():
    """Synthetic data (300 users, 150 items, seed 0) split leave-one-out, with its validation
    and test sets: (split, valid, test). Shared by the graph model tests."""
    from recforge.data.prepare import prepare
    from recforge.data.split import leave_one_out
    from recforge.data.synthetic import make_synthetic
    from recforge.evaluation.batch import build_evalset

    split = leave_one_out(prepare(make_synthetic(n_users=300, n_items=150, seed=0)))
    valid = build_evalset(split.history("valid"), split.valid, split.n_users, split.n_items, "valid")
    test = build_evalset(split.history("test"), split.test, split.n_users, split.n_items, "test")
    return split, valid, test


@pytest.fixture(scope="session")
def tiny():
    """Synthetic data with item text (200 users, 100 items, seed 3) split leave-one-out:
    (dataset, split, valid, test). Shared by the text-model and device tests."""
    from recforge.data.prepare import prepare
    from recforge.data.split import make_split
    from recforge.data.synthetic import make_synthetic
    from recforge.pipeline import eval_sets

    ds = prepare(make_synthetic(n_users=200, n_items=100, mean_length=14, seed=3))
    split = make_split(ds, "loo")
    valid, test = eval_sets(split)
    return ds, split, valid, test
