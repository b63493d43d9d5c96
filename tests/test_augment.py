"""Invariants of the sequence augmentation operators."""

from collections import Counter

import numpy as np
import pytest

from recforge.training.augment import (CL4SRecAugmenter, TiCoSeRecAugmenter, augment_batch, crop, interval_variance,
                                       least_uniform, mask, most_similar_items, reorder, ti_crop, ti_insert, ti_mask,
                                       ti_reorder, ti_substitute, window_variances)

MASK = 99


def is_contiguous_sub(sub, seq):
    n = len(sub)
    return any(np.array_equal(seq[i : i + n], sub) for i in range(len(seq) - n + 1))


@pytest.mark.parametrize("n", [1, 2, 5, 10, 23])
def test_crop(n):
    rng = np.random.default_rng(0)
    seq = np.arange(1, n + 1)
    for eta in (0.2, 0.6, 1.0):
        out = crop(seq, eta, rng)
        assert len(out) == max(1, int(eta * n))
        assert is_contiguous_sub(out, seq)
    np.testing.assert_array_equal(seq, np.arange(1, n + 1))  # input untouched


@pytest.mark.parametrize("n", [1, 3, 10, 23])
def test_mask(n):
    rng = np.random.default_rng(1)
    seq = np.arange(1, n + 1)
    out = mask(seq, 0.3, MASK, rng)
    assert len(out) == n
    changed = out != seq
    assert np.all(out[changed] == MASK)
    assert changed.sum() == int(0.3 * n)


@pytest.mark.parametrize("n", [1, 3, 10, 23])
def test_reorder(n):
    rng = np.random.default_rng(2)
    seq = np.arange(1, n + 1)
    for _ in range(5):
        out = reorder(seq, 0.6, rng)
        assert sorted(out) == sorted(seq)
        diff = np.flatnonzero(out != seq)
        if len(diff):  # only inside one window of floor(0.6 n) items
            assert diff[-1] - diff[0] + 1 <= int(0.6 * n)


def test_window_variances():
    times = np.array([0, 1, 2, 3, 10, 30, 31])
    v = window_variances(times, 4)  # intervals inside each window of 4 items: 3 gaps
    expected = [np.var(np.diff(times[i : i + 4])) for i in range(len(times) - 3)]
    np.testing.assert_allclose(v, expected)


def test_ti_crop_takes_the_most_uniform_window():
    rng = np.random.default_rng(0)
    seq = np.arange(1, 11)
    # gaps: irregular at the start, evenly spaced (5 s) from item 5 on
    times = np.array([0, 1, 9, 10, 40, 45, 50, 55, 60, 65])
    out = ti_crop(seq, times, 0.5, rng)  # 5 items
    assert len(out) == 5
    assert is_contiguous_sub(out, seq)
    w = window_variances(times, 5)
    start = int(np.flatnonzero(seq == out[0])[0])
    assert w[start] == w.min()


def test_ti_crop_without_real_time_is_a_random_crop():
    seq = np.arange(1, 21)
    times = np.arange(20)  # positions only: every window is equally uniform
    starts = {int(ti_crop(seq, times, 0.3, np.random.default_rng(s))[0]) for s in range(30)}
    assert len(starts) > 3


def test_ti_reorder_shuffles_only_the_most_uniform_window():
    rng = np.random.default_rng(3)
    seq = np.arange(1, 11)
    times = np.array([0, 1, 9, 10, 40, 45, 50, 55, 60, 100])
    w = window_variances(times, 5)
    best = int(np.argmin(w))
    for _ in range(5):
        out = ti_reorder(seq, times, 0.5, rng)
        assert sorted(out) == sorted(seq)
        diff = np.flatnonzero(out != seq)
        assert np.all((diff >= best) & (diff < best + 5))


def test_ti_mask_modes():
    rng = np.random.default_rng(4)
    seq = np.arange(1, 7)
    times = np.array([0, 100, 101, 102, 500, 501])  # gaps after items: 100, 1, 1, 398, 1, (none)
    out = ti_mask(seq, times, 0.34, MASK, rng, mode="maximum")  # 2 items
    assert np.flatnonzero(out == MASK).tolist() == [0, 3]  # followed by the two largest gaps
    out = ti_mask(seq, times, 0.5, MASK, rng, mode="random")
    assert len(out) == 6 and (out == MASK).sum() == 3
    assert set(out[out != MASK]) <= set(seq)


def test_ti_substitute_replaces_items_followed_by_the_smallest_gaps():
    rng = np.random.default_rng(5)
    seq = np.array([1, 2, 3, 4, 5])
    times = np.array([0, 50, 51, 200, 400])  # gaps after items: 50, 1, 149, 200
    similar = np.array([0, 11, 12, 13, 14, 15])
    out = ti_substitute(seq, times, 0.2, similar, rng)  # max(1, 1) item
    assert out.tolist() == [1, 12, 3, 4, 5]
    out = ti_substitute(seq, times, 0.4, similar, rng)  # 2 items: gaps 1 and 50
    assert out.tolist() == [11, 12, 3, 4, 5]


def test_ti_insert_fills_the_largest_gaps():
    rng = np.random.default_rng(6)
    seq = np.array([1, 2, 3, 4, 5])
    times = np.array([0, 50, 51, 200, 400])  # gaps after items: 50, 1, 149, 200
    similar = np.array([0, 11, 12, 13, 14, 15])
    out = ti_insert(seq, times, 0.4, similar, rng)  # 2 inserts: after items 4 (gap 200) and 3 (gap 149)
    assert out.tolist() == [1, 2, 3, 13, 4, 14, 5]
    # the original sequence is a subsequence in order
    it = iter(out.tolist())
    assert all(x in it for x in seq.tolist())


def test_most_similar_items():
    # users: {1, 2}, {1, 2}, {2, 3}, {4}
    indptr = np.array([0, 2, 4, 6, 7])
    items = np.array([1, 2, 1, 2, 2, 3, 4])
    best = most_similar_items(indptr, items, 4)
    assert best[1] == 2 and best[3] == 2 and best[4] == 0
    assert best[2] == 1  # co-occurs twice with 1, once with 3


def test_interval_variance_and_least_uniform():
    times = np.array([[0, 0, 1, 2, 3], [0, 10, 11, 40, 41], [0, 0, 0, 5, 6]])
    lengths = np.array([3, 5, 2])
    var = interval_variance(times, lengths)
    assert var[0] == pytest.approx(0.0)
    np.testing.assert_allclose(var[1], np.var(np.diff(times[1])))
    assert var[2] == 0.0  # fewer than 3 items
    keep = least_uniform(np.array([5.0, 0.0, 9.0, 1.0]), 0.5, np.random.default_rng(0))
    assert keep.tolist() == [True, False, True, False]


def test_ticoserec_control_strategy():
    aug = TiCoSeRecAugmenter(MASK, np.arange(40), threshold=12)
    rng = np.random.default_rng(7)
    short = Counter(aug.choose(8, rng) for _ in range(300))
    long = Counter(aug.choose(30, rng) for _ in range(500))
    assert set(short) == {"ti_insert", "ti_substitute", "ti_mask"}
    assert set(long) == {"ti_crop", "ti_mask", "ti_reorder", "ti_substitute", "ti_insert"}
    seq = np.arange(1, 9)
    assert aug(seq, np.arange(8), rng, augment=False).tolist() == seq.tolist()  # uniform sequences stay


def test_augment_batch_left_padded():
    rng = np.random.default_rng(8)
    inp = np.array([[0, 0, 0, 1, 2, 3], [4, 5, 6, 7, 8, 9], [0, 0, 0, 0, 0, 0]])
    aug = CL4SRecAugmenter(MASK, crop_rate=0.5, mask_rate=0.5, reorder_rate=0.5)
    for _ in range(10):
        out = augment_batch(aug, inp, None, rng)
        assert out.shape == inp.shape
        for row in out:
            nz = np.flatnonzero(row)
            assert len(nz) == 0 or nz[0] == len(row) - len(nz)  # left-padded, no holes
        assert not out[2].any()
    # insertions longer than the window keep the most recent items
    ti = TiCoSeRecAugmenter(MASK, np.arange(20) + 100, insert_rate=1.0)

    class InsertOnly:
        def __call__(self, seq, times, rng, augment=True):
            return ti.apply("ti_insert", seq, times, rng)

    out = augment_batch(InsertOnly(), np.arange(1, 7)[None, :], np.arange(6)[None, :], rng)
    assert out.shape == (1, 6)
    assert out[0].tolist() == [4, 104, 5, 105, 6, 106]  # an insert after every item, last 6 kept
