"""Sequence augmentations for contrastive sequential models.

Every operator works on one time-ordered sequence (a 1-D integer array of item ids, no padding)
and returns a new array; the input is never modified. :func:`augment_batch` applies an augmenter
to the rows of a left-padded batch.

CL4SRec operators (Xie et al., "Contrastive Learning for Sequential Recommendation", ICDE 2022):

* :func:`crop`: a random contiguous sub-sequence of ``max(1, ⌊η n⌋)`` items;
* :func:`mask`: ``⌊γ n⌋`` random positions replaced by the mask token (length kept);
* :func:`reorder`: a random contiguous window of ``⌊β n⌋`` items shuffled in place.

Time-interval-aware operators (Dang et al., "Uniform Sequence Better: Time Interval Aware Data
Augmentation for Sequential Recommendation", AAAI 2023). The paper's premise is that sequences
whose time intervals are uniform (low variance) are easier to learn from, so each operator uses
the intervals ``t[i+1] - t[i]`` to decide *where* it acts. Our reading of the paper (defaults as
in its experiments):

* :func:`ti_crop`: the window of ``max(1, ⌊η n⌋)`` items whose inner intervals have the smallest
  variance (the most uniform part of the sequence);
* :func:`ti_reorder`: the window of ``⌊β n⌋`` items with the smallest interval variance is
  shuffled (items close to evenly spaced carry the least order information);
* :func:`ti_mask`: ``⌊γ n⌋`` items masked, at random positions by default (``mode="random"``,
  the paper's default) or at the items followed by the largest (``"maximum"``) or smallest
  (``"minimum"``) intervals;
* :func:`ti_substitute`: ``max(1, ⌊ρ n⌋)`` items followed by the *smallest* intervals are replaced
  by their most similar item;
* :func:`ti_insert`: after each of the ``max(1, ⌊ρ n⌋)`` items followed by the *largest*
  intervals, its most similar item is inserted, which fills the largest gaps and makes the
  sequence more uniform.

An item's interval is the gap to the next item (the last item has none). Ties (for instance a
source without real time, where every interval is 1) are broken at random, so on such data the
Ti-operators fall back to their random CL4SRec counterparts.

The choice of operator (:class:`TiCoSeRecAugmenter`), our reading of the paper's control
strategy: (1) the sequences with the most uniform intervals are left as they are: the training
sequences are ranked by the variance of their intervals and the lowest ``keep_uniform`` share
(15%) is not augmented; (2) a sequence of at most ``threshold`` items (12) gets one of Ti-Insert,
Ti-Substitute, Ti-Mask (operators that do not shorten it); a longer one any of the five, chosen
uniformly. The ranking by variance is done once per fit by the model (:func:`least_uniform`),
not per batch.

Item similarity for Ti-Substitute / Ti-Insert: item-based collaborative filtering with inverse
user frequency (:func:`most_similar_items`), computed from the training sequences. The paper
also mixes in a similarity from the model's own embeddings after a warm-up; we do not.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

OPERATORS = ("crop", "mask", "reorder", "ti_crop", "ti_mask", "ti_reorder", "ti_substitute", "ti_insert")


# ---- CL4SRec --------------------------------------------------------------------------------
def crop(seq: np.ndarray, eta: float, rng: np.random.Generator) -> np.ndarray:
    n = len(seq)
    c = min(n, max(1, int(eta * n)))
    start = int(rng.integers(0, n - c + 1))
    return seq[start : start + c].copy()


def mask(seq: np.ndarray, gamma: float, mask_id: int, rng: np.random.Generator) -> np.ndarray:
    out = seq.copy()
    k = int(gamma * len(seq))
    if k:
        out[rng.choice(len(seq), k, replace=False)] = mask_id
    return out


def reorder(seq: np.ndarray, beta: float, rng: np.random.Generator) -> np.ndarray:
    out = seq.copy()
    r = int(beta * len(seq))
    if r < 2:
        return out
    start = int(rng.integers(0, len(seq) - r + 1))
    out[start : start + r] = rng.permutation(out[start : start + r])
    return out


# ---- time-interval aware ---------------------------------------------------------------------
def _pick(values: np.ndarray, rng: np.random.Generator) -> int:
    """Index of the minimum of ``values``, ties broken at random."""
    best = np.flatnonzero(values <= values.min())
    return int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])


def window_variances(times: np.ndarray, width: int) -> np.ndarray:
    """Variance of the ``width - 1`` intervals inside every window of ``width`` items."""
    gaps = np.diff(np.asarray(times, dtype=np.float64))
    if width <= 2:
        return np.zeros(len(times) - width + 1)
    return np.lib.stride_tricks.sliding_window_view(gaps, width - 1).var(axis=1)


def _uniform_window(times: np.ndarray, width: int, rng: np.random.Generator) -> int:
    return _pick(window_variances(times, width), rng)


def _by_gap(times: np.ndarray, k: int, largest: bool, rng: np.random.Generator) -> np.ndarray:
    """Positions of the ``k`` items followed by the largest (or smallest) intervals (ties at
    random); the last item, which has no following interval, comes last in either order."""
    n = len(times)
    gaps = np.diff(np.asarray(times, dtype=np.float64))
    key = -gaps if largest else gaps
    key = np.append(key, np.inf)
    order = np.lexsort((rng.random(n), key))
    return np.sort(order[:k])


def ti_crop(seq: np.ndarray, times: np.ndarray, eta: float, rng: np.random.Generator) -> np.ndarray:
    n = len(seq)
    c = min(n, max(1, int(eta * n)))
    start = _uniform_window(times, c, rng)
    return seq[start : start + c].copy()


def ti_reorder(seq: np.ndarray, times: np.ndarray, beta: float, rng: np.random.Generator) -> np.ndarray:
    out = seq.copy()
    r = int(beta * len(seq))
    if r < 2:
        return out
    start = _uniform_window(times, r, rng)
    out[start : start + r] = rng.permutation(out[start : start + r])
    return out


def ti_mask(seq: np.ndarray, times: np.ndarray, gamma: float, mask_id: int, rng: np.random.Generator,
            mode: str = "random") -> np.ndarray:
    out = seq.copy()
    k = int(gamma * len(seq))
    if k == 0:
        return out
    if mode == "random":
        pos = rng.choice(len(seq), k, replace=False)
    elif mode in ("maximum", "minimum"):
        pos = _by_gap(times, k, mode == "maximum", rng)
    else:
        raise ValueError(f"ti_mask: mode must be random, maximum or minimum, got {mode!r}")
    out[pos] = mask_id
    return out


def ti_substitute(seq: np.ndarray, times: np.ndarray, rate: float, similar: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    out = seq.copy()
    k = min(len(seq), max(1, int(rate * len(seq))))
    pos = _by_gap(times, k, False, rng)
    repl = similar[out[pos]]
    out[pos] = np.where(repl > 0, repl, out[pos])
    return out


def ti_insert(seq: np.ndarray, times: np.ndarray, rate: float, similar: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    n = len(seq)
    k = min(n, max(1, int(rate * n)))
    after = _by_gap(times, k, True, rng)
    new = similar[seq[after]]
    keep = new > 0
    after, new = after[keep], new[keep]
    return np.insert(seq, after + 1, new)


# ---- item similarity ------------------------------------------------------------------------
def most_similar_items(indptr: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """For every item 0..n_items, its most similar other item (0 if it has none) by item-based
    CF with inverse user frequency: ``sim(i, j) = Σ_u 1/log(1 + |I_u|) / sqrt(|U_i| |U_j|)``."""
    n_users = len(indptr) - 1
    lengths = np.diff(indptr)
    rows = np.repeat(np.arange(n_users), lengths)
    x = sp.csr_matrix((np.ones(len(items)), (rows, items)), shape=(n_users, n_items + 1))
    x.sum_duplicates()
    x.data[:] = 1.0
    iuf = 1.0 / np.log1p(np.maximum(np.asarray(x.sum(1)).ravel(), 1.0))
    co = (x.T @ sp.diags(iuf) @ x).tocsr()
    co.setdiag(0.0)
    co.eliminate_zeros()
    deg = np.sqrt(np.maximum(np.asarray(x.sum(0)).ravel(), 1.0))
    co = sp.diags(1.0 / deg) @ co @ sp.diags(1.0 / deg)
    co = co.tocsr()
    best = np.zeros(n_items + 1, dtype=np.int64)
    has = np.diff(co.indptr) > 0
    if has.any():
        # argmax per row of a CSR matrix: sort entries by (row, value) and take the last per row
        r = np.repeat(np.arange(co.shape[0]), np.diff(co.indptr))
        order = np.lexsort((-co.indices, co.data, r))  # ties: the lower item id wins
        last = np.cumsum(np.diff(co.indptr))[has] - 1
        best[has] = co.indices[order[last]]
    return best


def interval_variance(times: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Variance of the time intervals of each row of a left-padded (B, L) time matrix whose
    rows hold ``lengths`` valid values at the end (0 for rows with fewer than 3 items)."""
    b, width = times.shape
    t = times.astype(np.float64)
    gaps = np.diff(t, axis=1)
    valid = np.arange(width - 1)[None, :] >= (width - lengths)[:, None]
    m = np.maximum(lengths - 1, 1)
    g = np.where(valid, gaps, 0.0)
    mean = g.sum(1) / m
    var = (np.where(valid, (gaps - mean[:, None]) ** 2, 0.0)).sum(1) / m
    return np.where(lengths >= 3, var, 0.0)


def least_uniform(variances: np.ndarray, keep_uniform: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the sequences to augment: all but the ``keep_uniform`` share with the
    lowest interval variance (ties at random)."""
    n = len(variances)
    order = np.lexsort((rng.random(n), variances))
    out = np.ones(n, dtype=bool)
    out[order[: int(keep_uniform * n)]] = False
    return out


# ---- augmenters -----------------------------------------------------------------------------
class CL4SRecAugmenter:
    """One of crop / mask / reorder, chosen uniformly per call."""

    name = "cl4srec"
    needs_times = False

    def __init__(self, mask_id: int, crop_rate: float = 0.6, mask_rate: float = 0.3, reorder_rate: float = 0.6):
        self.mask_id, self.crop_rate, self.mask_rate, self.reorder_rate = mask_id, crop_rate, mask_rate, reorder_rate

    def __call__(self, seq, times, rng, augment: bool = True) -> np.ndarray:
        op = int(rng.integers(3))
        if op == 0:
            return crop(seq, self.crop_rate, rng)
        if op == 1:
            return mask(seq, self.mask_rate, self.mask_id, rng)
        return reorder(seq, self.reorder_rate, rng)


class TiCoSeRecAugmenter:
    """The time-interval-aware operators with the control strategy described above."""

    name = "ticoserec"
    needs_times = True

    def __init__(self, mask_id: int, similar: np.ndarray, crop_rate: float = 0.4, mask_rate: float = 0.7,
                 reorder_rate: float = 0.5, substitute_rate: float = 0.2, insert_rate: float = 0.5,
                 threshold: int = 12):
        self.mask_id, self.similar = mask_id, similar
        self.crop_rate, self.mask_rate, self.reorder_rate = crop_rate, mask_rate, reorder_rate
        self.substitute_rate, self.insert_rate, self.threshold = substitute_rate, insert_rate, threshold

    def apply(self, op: str, seq, times, rng) -> np.ndarray:
        if op == "ti_crop":
            return ti_crop(seq, times, self.crop_rate, rng)
        if op == "ti_reorder":
            return ti_reorder(seq, times, self.reorder_rate, rng)
        if op == "ti_mask":
            return ti_mask(seq, times, self.mask_rate, self.mask_id, rng)
        if op == "ti_substitute":
            return ti_substitute(seq, times, self.substitute_rate, self.similar, rng)
        if op == "ti_insert":
            return ti_insert(seq, times, self.insert_rate, self.similar, rng)
        raise ValueError(f"unknown operator {op!r}")

    SHORT = ("ti_insert", "ti_substitute", "ti_mask")
    LONG = ("ti_crop", "ti_mask", "ti_reorder", "ti_substitute", "ti_insert")

    def choose(self, n: int, rng) -> str:
        ops = self.SHORT if n <= self.threshold else self.LONG
        return ops[int(rng.integers(len(ops)))]

    def __call__(self, seq, times, rng, augment: bool = True) -> np.ndarray:
        if not augment:
            return seq.copy()
        return self.apply(self.choose(len(seq), rng), seq, times, rng)


def augment_batch(augmenter, inp: np.ndarray, times: np.ndarray | None, rng: np.random.Generator,
                  augment: np.ndarray | None = None, out_len: int | None = None) -> np.ndarray:
    """Apply ``augmenter`` to every row of a left-padded batch ``inp`` (B, L); returns a new
    left-padded (B, out_len) batch (the last ``out_len`` items of longer results are kept).
    ``augment`` (B,) bool: rows to leave unchanged are False (TiCoSeRec's uniform sequences)."""
    b, width = inp.shape
    out_len = out_len or width
    out = np.zeros((b, out_len), dtype=inp.dtype)
    lengths = (inp > 0).sum(1)
    for r in range(b):
        n = int(lengths[r])
        if n == 0:
            continue
        seq = inp[r, width - n :]
        t = times[r, width - n :] if times is not None else None
        v = augmenter(seq, t, rng, True if augment is None else bool(augment[r]))[-out_len:]
        out[r, out_len - len(v) :] = v
    return out
