"""Built-in synthetic data: a realistic small dataset for demos and tests, and a big plain log.

:func:`make_synthetic` simulates a shop with structure that real recommenders exploit:

* items belong to categories, and inside a category to *series* (a shared title noun); category
  sizes and masses and the popularity of items inside a category follow power laws;
* every user prefers 1-3 categories (drawn with a tilt that depends on the user's age group);
* sequences are Markov-like: each item has 3-5 *successors* (mostly of the same series or
  category, chosen with popularity skew, and ranked by a decreasing weight). With probability
  ``p_follow`` the next item is a successor of the current one; with probability ``p_random``
  a globally popular item; otherwise a fresh item from the user's categories by popularity.
  An item the user has already seen is redrawn up to ``redraws`` times, so repeats are rare
  and immediate repeats never happen (``prepare`` dedupes repeats anyway);
* lengths are lognormal around ``mean_length`` (at least ``min_length``); timestamps are
  increasing Int64 seconds with sessions (short gaps) and breaks (long gaps), some users
  bursty, starting at different dates within ``span_days``;
* titles are ``"<adjective> <category word> <series noun>"``, so items of a category share a
  word and successors of the same series share two.

The simulation is vectorised over users: it runs position by position, each step an array
operation over the users whose sequence is still going, so 10M interactions take seconds.

With ``behaviors=True`` the walk above is the user's *views*, and carts and purchases follow
them (a shop's funnel, for multi-behaviour models): each view is carted with probability
``p_cart`` a few minutes later; a carted item is bought with probability ``p_buy_cart``, a viewed
item that was not carted with ``p_buy_view``, some minutes to hours after the cart or view; and
a share ``unviewed_buy_share`` of all purchases are of popular items the user never viewed
(impulse buys, at a random time of the user's activity). So views predict purchases: most
purchases are of items the user viewed before, and a viewed item is far more likely to be bought
than one never viewed. The rows carry a ``behavior`` column (``view``, ``cart``, ``buy``); the
views are the same rows as without the option (the funnel draws from its own generator).

:func:`make_random_log` is a plain power-law log without structure, for preparation benchmarks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import polars as pl

from recforge.data.schema import BEHAVIOR, ITEM, TIME, USER, RawData
from recforge.errors import ConfigError

DAY = 86_400
EPOCH = 1_640_995_200  # 2022-01-01 00:00:00 UTC, start of the simulated period

CATEGORY_WORDS = (
    "garden", "kitchen", "outdoor", "travel", "office", "fitness", "music", "gaming", "baby",
    "beauty", "pet", "camera", "audio", "bike", "craft", "tea", "coffee", "reading", "home",
    "lighting", "bath", "camping", "fishing", "winter", "summer", "school", "party", "tool",
    "car", "yoga", "running", "hiking", "painting", "sewing", "bakery", "wine", "desk", "sleep",
    "phone", "watch",
)
NOUNS = (
    "lamp", "kettle", "bag", "mug", "chair", "table", "bottle", "jacket", "glove", "blanket",
    "pillow", "brush", "set", "kit", "box", "case", "stand", "rack", "mat", "towel", "knife",
    "pan", "bowl", "basket", "clock", "speaker", "cable", "charger", "light", "shelf", "hat",
    "scarf", "boot", "sock", "belt", "wallet", "pen", "notebook", "folder", "tray", "jar",
    "candle", "frame", "mirror", "rug", "curtain", "hook", "timer", "scale", "pump", "tent",
    "stove", "lantern", "cooler", "helmet", "lock", "bell", "saddle", "rope", "net",
)
ADJECTIVES = (
    "classic", "compact", "deluxe", "eco", "vintage", "modern", "rustic", "smart", "portable",
    "premium", "basic", "bold", "bright", "soft", "sturdy", "slim", "large", "mini", "pro",
    "ultra", "natural", "royal", "urban", "nordic", "golden", "silver", "black", "white", "red",
    "blue", "green", "quiet", "rapid", "cozy", "fresh", "wild", "simple", "elegant", "tough",
    "light",
)
AGE_GROUPS = ("18-24", "25-34", "35-44", "45-54", "55+")
AGE_SHARES = (0.18, 0.30, 0.24, 0.16, 0.12)


@dataclass(frozen=True)
class SyntheticKnobs:
    """Tunable behaviour of :func:`make_synthetic` (pass any of these as keyword arguments)."""

    p_follow: float = 0.55  # next item is a successor of the current item
    p_random: float = 0.05  # next item is a random globally popular item
    n_successors: tuple[int, int] = (3, 5)  # successors per item, inclusive range
    successor_same_series: float = 0.6  # share of successors drawn from the item's series ...
    successor_same_category: float = 0.3  # ... from its category (the rest: anywhere, by popularity)
    item_alpha: float = 1.0  # Zipf exponent of item popularity inside a category
    category_alpha: float = 0.8  # Zipf exponent of category mass
    series_size: int = 6  # mean number of items sharing a title noun inside a category
    length_sigma: float = 0.6  # sigma of the lognormal sequence length
    min_length: int = 5
    max_length_factor: float = 10.0  # lengths capped at max_length_factor * mean_length
    redraws: int = 4  # attempts to replace an item the user has already seen (then it repeats)
    span_days: int = 730  # users start at different dates within this span
    bursty_share: float = 0.3  # share of users whose sessions are long (few breaks)
    session_gap: float = 180.0  # mean gap (s) between events of a session
    break_gap_days: float = 3.0  # median mean gap (days) between sessions


@dataclass(frozen=True)
class BehaviorKnobs:
    """The funnel of :func:`make_synthetic` with ``behaviors=True`` (keyword arguments too)."""

    p_cart: float = 0.2  # a view is followed by a cart of the item
    p_buy_cart: float = 0.5  # a carted item is bought
    p_buy_view: float = 0.03  # a viewed item that was not carted is bought
    unviewed_buy_share: float = 0.1  # share of purchases of items the user never viewed
    cart_delay: float = 300.0  # mean seconds from view to cart
    buy_delay: float = 3600.0  # mean seconds from cart (or view) to purchase


def _knobs(knobs: dict, behaviors: bool = False) -> tuple[SyntheticKnobs, BehaviorKnobs | None]:
    names = {f.name for f in fields(SyntheticKnobs)}
    funnel = {f.name for f in fields(BehaviorKnobs)}
    unknown = sorted(set(knobs) - names - (funnel if behaviors else set()))
    if unknown:
        hint = " (the funnel options need behaviors=True)" if set(unknown) & funnel else ""
        raise ConfigError(
            f"make_synthetic: unknown option(s) {', '.join(unknown)}{hint}; valid: {', '.join(sorted(names))}"
            + (f", {', '.join(sorted(funnel))}" if behaviors else "")
        )
    b = None
    if behaviors:
        b = BehaviorKnobs(**{key: v for key, v in knobs.items() if key in funnel})
        probs = (b.p_cart, b.p_buy_cart, b.p_buy_view)
        if not all(0 <= p <= 1 for p in probs) or not 0 <= b.unviewed_buy_share < 1:
            raise ConfigError("make_synthetic: p_cart, p_buy_cart and p_buy_view must lie in [0, 1] and "
                              "unviewed_buy_share in [0, 1)")
        knobs = {key: v for key, v in knobs.items() if key not in funnel}
    k = SyntheticKnobs(**knobs)
    lo, hi = (int(x) for x in k.n_successors)
    if not 1 <= lo <= hi:
        raise ConfigError(f"make_synthetic: n_successors must be (lo, hi) with 1 <= lo <= hi, got {k.n_successors}")
    if not (0 <= k.p_follow and 0 <= k.p_random and k.p_follow + k.p_random <= 1):
        raise ConfigError("make_synthetic: p_follow and p_random must be >= 0 with a sum <= 1")
    return k, b


def _words(base: tuple[str, ...], n: int) -> list[str]:
    """``n`` distinct words: ``base`` first, then ``base`` with numeric suffixes."""
    return [base[i % len(base)] + ("" if i < len(base) else str(i // len(base) + 1)) for i in range(n)]


class _Sampler:
    """Draw items by weight inside contiguous ranges of an item order (categories, series).

    Items are laid out in ``order`` (grouped by category, then series); ``cum`` is the running
    sum of their weights in that order, so a draw inside a range is one ``searchsorted``.
    """

    def __init__(self, order: np.ndarray, weights: np.ndarray):
        self.order = order
        self.cum = np.cumsum(weights[order])
        self.cum_before = np.concatenate([[0.0], self.cum[:-1]])

    def range(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        base = self.cum_before[lo]
        return base, self.cum[hi - 1] - base

    def draw(self, rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """One item per row, by weight, among positions ``lo[k]..hi[k]-1``."""
        base, mass = self.range(lo, hi)
        x = base + rng.random(len(lo)) * mass
        pos = np.searchsorted(self.cum, x, side="right")
        return self.order[np.clip(pos, lo, hi - 1)]


def _zipf_weights(rng: np.random.Generator, n: int, alpha: float) -> np.ndarray:
    """Weights ``rank**-alpha`` over ``n`` entries in random order."""
    return (rng.permutation(n) + 1.0) ** -alpha


def _build_catalog(rng: np.random.Generator, n_items: int, n_categories: int, k: SyntheticKnobs) -> dict:
    n_categories = max(1, min(n_categories, n_items))
    # Category sizes: skewed, each at least one item.
    size_w = _zipf_weights(rng, n_categories, 0.5 * k.category_alpha)
    sizes = np.ones(n_categories, dtype=np.int64)
    extra = n_items - n_categories
    if extra:
        sizes += rng.multinomial(extra, size_w / size_w.sum())
    cat_of_slot = np.repeat(np.arange(n_categories), sizes)
    item_cat = np.empty(n_items, dtype=np.int64)
    perm = rng.permutation(n_items)  # ids are not ordered by category
    item_cat[perm] = cat_of_slot
    # Series (title noun) inside each category.
    n_series = np.maximum(1, np.rint(sizes / max(1, k.series_size))).astype(np.int64)
    series_base = np.concatenate([[0], np.cumsum(n_series)[:-1]])
    item_series_local = (rng.random(n_items) * n_series[item_cat]).astype(np.int64)
    item_series = series_base[item_cat] + item_series_local  # global series index
    # Popularity: category mass times Zipf inside the category.
    cat_mass = _zipf_weights(rng, n_categories, k.category_alpha)
    cat_mass /= cat_mass.sum()
    within = np.empty(n_items)
    for c in range(n_categories):  # per category, not per item
        members = perm[cat_of_slot == c]
        within[members] = _zipf_weights(rng, len(members), k.item_alpha)
    within /= np.bincount(item_cat, weights=within, minlength=n_categories)[item_cat]
    weight = cat_mass[item_cat] * within
    order = np.lexsort((np.arange(n_items), item_series, item_cat))  # grouped by category, then series
    pos = np.empty(n_items, dtype=np.int64)
    pos[order] = np.arange(n_items)
    total_series = int(n_series.sum())
    series_lo = np.full(total_series, n_items, dtype=np.int64)
    np.minimum.at(series_lo, item_series, pos)
    series_hi = np.zeros(total_series, dtype=np.int64)
    np.maximum.at(series_hi, item_series, pos + 1)
    cat_lo = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    cat_hi = np.cumsum(sizes)
    # Empty series (no item drew them) keep lo=n_items, hi=0; they are never indexed.
    return dict(
        n_categories=n_categories, sizes=sizes, item_cat=item_cat, item_series=item_series,
        n_series=n_series, series_base=series_base, cat_mass=cat_mass, weight=weight,
        sampler=_Sampler(order, weight), cat_lo=cat_lo, cat_hi=cat_hi,
        series_lo=series_lo, series_hi=series_hi,
    )


def _build_successors(rng: np.random.Generator, cat: dict, k: SyntheticKnobs) -> tuple[np.ndarray, np.ndarray]:
    """Successor table ``(n_items, max_k)`` and cumulative choice probabilities per item."""
    n_items = len(cat["item_cat"])
    lo_k, hi_k = (int(x) for x in k.n_successors)
    kmax = hi_k
    smp: _Sampler = cat["sampler"]
    ic, iser = cat["item_cat"], cat["item_series"]
    glo, ghi = np.zeros(n_items, dtype=np.int64), np.full(n_items, n_items, dtype=np.int64)
    clo, chi = cat["cat_lo"][ic], cat["cat_hi"][ic]
    slo, shi = cat["series_lo"][iser], cat["series_hi"][iser]
    items = np.arange(n_items)
    succ = np.empty((n_items, kmax), dtype=np.int64)
    for j in range(kmax):
        r = rng.random(n_items)
        use_series = r < k.successor_same_series
        use_cat = ~use_series & (r < k.successor_same_series + k.successor_same_category)
        lo = np.where(use_series, slo, np.where(use_cat, clo, glo))
        hi = np.where(use_series, shi, np.where(use_cat, chi, ghi))
        s = smp.draw(rng, lo, hi)
        # Redraw self-loops and duplicates, widening to the category and then the whole catalog.
        for attempt in range(6):
            bad = (s == items) | (succ[:, :j] == s[:, None]).any(axis=1)
            if not bad.any():
                break
            b = np.flatnonzero(bad)
            wide = attempt >= 2
            s[b] = smp.draw(rng, glo[b] if wide else clo[b], ghi[b] if wide else chi[b])
        still = s == items
        s[still] = (items[still] + 1 + rng.integers(0, max(1, n_items - 1), still.sum())) % n_items
        succ[:, j] = s
    n_succ = rng.integers(lo_k, hi_k + 1, n_items)
    slot_w = 1.0 / (np.arange(kmax) + 1.5)  # the first successors are the usual next step
    w = np.where(np.arange(kmax)[None, :] < n_succ[:, None], slot_w[None, :], 0.0)
    cumw = np.cumsum(w, axis=1)
    cumw /= cumw[:, -1:]
    return succ, cumw


def make_synthetic(
    n_users: int = 2000,
    n_items: int = 1000,
    n_categories: int = 20,
    mean_length: float = 30,
    seed: int = 0,
    behaviors: bool = False,
    **knobs,
) -> RawData:
    """A synthetic shop log with categories, popularity skew, Markov habits and item text.

    Returns :class:`RawData` named ``"synthetic"`` with interactions (``user_id``, ``item_id``,
    ``timestamp``; Int64, raw ids from 1), items (``item_id``, ``title``, ``category``,
    ``price``) and users (``user_id``, ``age_group``). Byte-identical for a given seed.
    ``knobs`` are the fields of :class:`SyntheticKnobs`. The default (2000 users, 1000 items)
    has about 60k interactions. ``behaviors=True``: the interactions are views followed by carts
    and purchases (module docstring; ``behavior`` column, named ``"synthetic-mb"``); ``knobs``
    may then also hold the fields of :class:`BehaviorKnobs`.
    """
    if n_users < 1 or n_items < 2:
        raise ConfigError(f"make_synthetic: need n_users >= 1 and n_items >= 2, got {n_users} and {n_items}")
    if mean_length <= 0:
        raise ConfigError(f"make_synthetic: mean_length must be > 0, got {mean_length}")
    k, funnel = _knobs(knobs, behaviors)
    rng = np.random.default_rng(seed)
    cat = _build_catalog(rng, n_items, n_categories, k)
    n_cat = cat["n_categories"]
    succ, succ_cum = _build_successors(rng, cat, k)
    smp: _Sampler = cat["sampler"]

    # ---- users: age group, preferred categories (tilted by age group) and their weights ----
    age = rng.choice(len(AGE_GROUPS), n_users, p=np.array(AGE_SHARES))
    tilt = np.exp(rng.normal(0.0, 0.7, (len(AGE_GROUPS), n_cat)))
    p_age = cat["cat_mass"][None, :] ** 0.7 * tilt  # flatter than item traffic: niche categories have fans
    cdf_age = np.cumsum(p_age / p_age.sum(axis=1, keepdims=True), axis=1)
    cdf_age[:, -1] = 1.0
    flat = (cdf_age + np.arange(len(AGE_GROUPS))[:, None]).ravel()  # one searchsorted for all groups
    x = age[:, None] + rng.random((n_users, 3))
    pref = np.searchsorted(flat, x, side="right") - age[:, None] * n_cat
    pref = np.clip(pref, 0, n_cat - 1)
    n_pref = rng.choice(3, n_users, p=[0.35, 0.4, 0.25]) + 1
    pw = rng.gamma(1.5, 1.0, (n_users, 3)) * (np.arange(3)[None, :] < n_pref[:, None])
    pref_cum = np.cumsum(pw, axis=1)
    pref_cum /= pref_cum[:, -1:]

    # ---- lengths and time behaviour --------------------------------------------------------
    sigma = k.length_sigma
    raw_len = rng.lognormal(np.log(mean_length) - sigma**2 / 2, sigma, n_users)
    max_len = max(k.min_length, int(np.ceil(k.max_length_factor * mean_length)))
    lengths = np.clip(np.rint(raw_len), k.min_length, max_len).astype(np.int64)
    bursty = rng.random(n_users) < k.bursty_share
    p_break = np.where(bursty, 0.08, 0.35) * rng.uniform(0.5, 1.5, n_users)
    break_mean = k.break_gap_days * DAY * np.exp(rng.normal(0.0, 0.8, n_users))

    # ---- the walk: position by position over the users still active -------------------------
    by_len = np.argsort(-lengths, kind="stable")  # active users at step t are a prefix of by_len
    len_sorted = lengths[by_len]
    user_off = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    offsets = user_off[by_len]
    total = int(lengths.sum())
    out_item = np.empty(total, dtype=np.int64)
    out_elapsed = np.empty(total, dtype=np.int64)  # seconds since the user's first event
    pref_s, pref_cum_s = pref[by_len], pref_cum[by_len]
    p_break_s, break_mean_s = p_break[by_len], break_mean[by_len]
    # Items already seen by each user, as a hashed bitset (false positives only cause a redraw).
    # Sized on the mean length (memory), so very long histories see more false positives.
    n_bits = 256
    while n_bits < min(1 << 13, 32 * mean_length):
        n_bits *= 2
    n_words = n_bits // 64
    seen_bits = np.zeros(n_users * n_words, dtype=np.uint64)  # row-major (user, word), flat for speed
    cur = np.full(n_users, -1, dtype=np.int64)
    clock = np.zeros(n_users, dtype=np.int64)
    glo0 = np.zeros(1, dtype=np.int64)

    def fresh(rows: np.ndarray) -> np.ndarray:
        slot = (rng.random(len(rows))[:, None] > pref_cum_s[rows]).sum(axis=1)
        c = pref_s[rows, np.minimum(slot, 2)]
        return smp.draw(rng, cat["cat_lo"][c], cat["cat_hi"][c])

    def popular(m: int) -> np.ndarray:
        return smp.draw(rng, np.broadcast_to(glo0, (m,)), np.full(m, n_items, dtype=np.int64))

    def successor(rows: np.ndarray) -> np.ndarray:
        slot = (rng.random(len(rows))[:, None] > succ_cum[cur[rows]]).sum(axis=1)
        return succ[cur[rows], np.minimum(slot, succ.shape[1] - 1)]

    def hashed(items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = (items.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(n_bits)
        return (h >> np.uint64(6)).astype(np.int64), np.uint64(1) << (h & np.uint64(63))

    def was_seen(rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        word, bit = hashed(items)
        return (seen_bits.take(rows * n_words + word) & bit) != 0

    n_act = n_users
    for t in range(int(len_sorted[0])):
        while n_act and len_sorted[n_act - 1] <= t:
            n_act -= 1
        rows = np.arange(n_act)
        if t == 0:
            nxt = fresh(rows)
        else:
            r = rng.random(n_act)
            follow = r < k.p_follow
            rand = ~follow & (r >= 1.0 - k.p_random)
            nxt = np.empty(n_act, dtype=np.int64)
            for mask, draw in ((follow, successor), (rand, lambda b: popular(len(b))),
                               (~follow & ~rand, fresh)):
                b = np.flatnonzero(mask)
                if len(b):
                    nxt[b] = draw(b)
            # Avoid items the user has seen: redraw in the same mode, then fresh, then popular.
            # What survives is a (rare) repeat, but never the current item again.
            for attempt in range(k.redraws):
                bad = np.flatnonzero(was_seen(rows, nxt))
                if not len(bad):
                    break
                if attempt == 0:
                    fb = bad[follow[bad]]
                    nxt[fb] = successor(fb)
                    ob = bad[~follow[bad]]
                    nxt[ob] = fresh(ob)
                elif attempt < k.redraws - 1:
                    nxt[bad] = fresh(bad)
                else:
                    nxt[bad] = popular(len(bad))
            same = np.flatnonzero(nxt == cur[:n_act])
            nxt[same] = succ[cur[same], 0]
            gap = np.where(
                rng.random(n_act) < p_break_s[:n_act],
                rng.exponential(1.0, n_act) * break_mean_s[:n_act],
                rng.exponential(k.session_gap, n_act),
            )
            clock[:n_act] += 1 + gap.astype(np.int64)
        word, bit = hashed(nxt)
        seen_bits[rows * n_words + word] |= bit  # one item per row: no duplicate indices
        cur[:n_act] = nxt
        idx = offsets[:n_act] + t
        out_item[idx] = nxt
        out_elapsed[idx] = clock[:n_act]

    # Place each user's history inside the period: a random start such that it ends in time;
    # histories longer than the period are compressed (keeping one second per step).
    span = k.span_days * DAY
    user_of = np.repeat(np.arange(n_users), lengths)
    step = np.arange(total) - user_off[user_of]
    duration = out_elapsed[user_off + lengths - 1].astype(np.float64)
    scale = np.minimum(1.0, 0.95 * span / np.maximum(duration, 1.0))
    start = EPOCH + (rng.random(n_users) * (span - duration * scale)).astype(np.int64)
    out_time = start[user_of] + step + np.floor((out_elapsed - step) * scale[user_of]).astype(np.int64)
    user_ids = user_of.astype(np.int64) + 1
    interactions = pl.DataFrame(
        {USER: user_ids, ITEM: out_item + 1, TIME: out_time},
        schema={USER: pl.Int64, ITEM: pl.Int64, TIME: pl.Int64},
    ).sort(TIME, maintain_order=True)  # a log in time order (ties: by user), as a shop writes it

    items = _items_table(rng, cat)
    users = pl.DataFrame(
        {USER: np.arange(1, n_users + 1, dtype=np.int64), "age_group": np.array(AGE_GROUPS)[age]},
        schema={USER: pl.Int64, "age_group": pl.Utf8},
    )
    meta = {
        "generator": "make_synthetic",
        "params": {"n_users": n_users, "n_items": n_items, "n_categories": n_cat,
                   "mean_length": mean_length, "seed": seed, **asdict(k)},
    }
    meta["params"]["n_successors"] = list(k.n_successors)
    if funnel is None:
        return RawData(interactions, items=items, users=users, name="synthetic", source="synthetic", meta=meta)
    meta["params"].update(behaviors=True, **asdict(funnel))
    interactions = _funnel(interactions, funnel, np.random.default_rng([seed, 1]), cat["sampler"], n_items)
    return RawData(interactions, items=items, users=users, name="synthetic-mb", source="synthetic-mb", meta=meta)


def _funnel(views: pl.DataFrame, b: BehaviorKnobs, rng: np.random.Generator, smp: _Sampler,
            n_items: int) -> pl.DataFrame:
    """Views, their carts and purchases, and purchases of unviewed items, in time order."""
    user, item, t = (views[c].to_numpy() for c in (USER, ITEM, TIME))
    n = len(user)
    carted = rng.random(n) < b.p_cart
    cart_t = t + 1 + rng.exponential(b.cart_delay, n).astype(np.int64)
    bought = np.where(carted, rng.random(n) < b.p_buy_cart, rng.random(n) < b.p_buy_view)
    buy_t = np.where(carted, cart_t, t) + 1 + rng.exponential(b.buy_delay, n).astype(np.int64)
    # impulse purchases: popular items at a random time of a random (activity-weighted) user's span
    n_extra = int(round(b.unviewed_buy_share / (1 - b.unviewed_buy_share) * bought.sum()))
    rows = rng.integers(0, n, n_extra)  # a random view row: users weighted by their activity
    extra_user = user[rows]
    span = views.group_by(USER).agg(pl.col(TIME).min().alias("lo"), pl.col(TIME).max().alias("hi"))
    lo_hi = pl.DataFrame({USER: extra_user}).join(span, on=USER, how="left", maintain_order="left")
    lo, hi = lo_hi["lo"].to_numpy(), lo_hi["hi"].to_numpy()
    extra_t = lo + (rng.random(n_extra) * (hi - lo + 1)).astype(np.int64)
    extra_item = smp.draw(rng, np.zeros(n_extra, dtype=np.int64), np.full(n_extra, n_items, dtype=np.int64)) + 1
    parts = [
        (user, item, t, "view"),
        (user[carted], item[carted], cart_t[carted], "cart"),
        (np.concatenate([user[bought], extra_user]), np.concatenate([item[bought], extra_item]),
         np.concatenate([buy_t[bought], extra_t]), "buy"),
    ]
    frame = pl.concat([
        pl.DataFrame({USER: u, ITEM: i, TIME: tt, BEHAVIOR: [name] * len(u)},
                     schema={USER: pl.Int64, ITEM: pl.Int64, TIME: pl.Int64, BEHAVIOR: pl.Utf8})
        for u, i, tt, name in parts])
    return frame.sort(TIME, maintain_order=True)


def _items_table(rng: np.random.Generator, cat: dict) -> pl.DataFrame:
    """Titles ``"<adjective> <category word> <series noun>"`` and prices per category."""
    n_cat = cat["n_categories"]
    item_cat, item_series = cat["item_cat"], cat["item_series"]
    n_items = len(item_cat)
    cat_words = np.array(_words(CATEGORY_WORDS, n_cat))
    # Nouns: distinct inside a category (a random offset into the noun list per category).
    n_series = cat["n_series"]
    vocab = np.array(_words(NOUNS, max(len(NOUNS), int(n_series.max()))))
    noun_start = rng.integers(0, len(vocab), n_cat)
    local = item_series - cat["series_base"][item_cat]
    noun = vocab[(noun_start[item_cat] + local) % len(vocab)]
    # Adjectives: distinct inside a series as far as the list allows.
    order = np.lexsort((np.arange(n_items), item_series))
    rank = np.empty(n_items, dtype=np.int64)
    first = np.searchsorted(item_series[order], item_series[order])
    rank[order] = np.arange(n_items) - first
    adj_start = rng.integers(0, len(ADJECTIVES), int(n_series.sum()))
    adj = np.array(ADJECTIVES)[(adj_start[item_series] + rank) % len(ADJECTIVES)]
    title = np.char.add(np.char.add(np.char.add(adj, " "), np.char.add(cat_words[item_cat], " ")), noun)
    cat_price = np.exp(rng.normal(np.log(25.0), 0.8, n_cat))
    price = cat_price[item_cat] * np.exp(rng.normal(0.0, 0.5, n_items))
    price = np.round(np.floor(price) + 0.99, 2)  # shop prices: 4.99, 24.99, ...
    return pl.DataFrame(
        {ITEM: np.arange(1, n_items + 1, dtype=np.int64), "title": title.astype(str),
         "category": cat_words[item_cat].astype(str), "price": price.astype(np.float64)},
        schema={ITEM: pl.Int64, "title": pl.Utf8, "category": pl.Utf8, "price": pl.Float64},
    )


def make_random_log(
    n_interactions: int,
    n_users: int,
    n_items: int,
    seed: int = 0,
    user_alpha: float = 0.8,
    item_alpha: float = 1.0,
    span_days: int = 730,
) -> pl.DataFrame:
    """A plain log (``user_id``, ``item_id``, ``timestamp``; Int64, ids from 1) in time order.

    User activity and item popularity follow power laws (exponents ``user_alpha`` and
    ``item_alpha`` over ranks, ranks shuffled over ids). No sequential structure: it is meant
    for preparation benchmarks (10M rows in a few seconds). Ids are drawn by inverting the
    continuous power-law CDF, so no table of weights is needed.
    """
    if n_interactions < 0 or n_users < 1 or n_items < 1:
        raise ConfigError("make_random_log: need n_interactions >= 0, n_users >= 1 and n_items >= 1")
    rng = np.random.default_rng(seed)

    def power_law_ids(n: int, alpha: float) -> np.ndarray:
        u = rng.random(n_interactions)
        if abs(alpha - 1.0) < 1e-9:  # density 1/x on [1, n+1)
            r = np.exp(u * np.log(n + 1.0))
        else:
            a = 1.0 - alpha
            r = (1.0 + u * ((n + 1.0) ** a - 1.0)) ** (1.0 / a)
        rank = np.minimum(r.astype(np.int64), n) - 1  # 0..n-1
        return rng.permutation(n).astype(np.int64)[rank] + 1

    users = power_law_ids(n_users, user_alpha)
    items = power_law_ids(n_items, item_alpha)
    ts = EPOCH + rng.integers(0, span_days * DAY, n_interactions, dtype=np.int64)
    ts.sort()  # rows in time order; the draws are i.i.d., so sorting only the clock is enough
    return pl.DataFrame(
        {USER: users, ITEM: items, TIME: ts},
        schema={USER: pl.Int64, ITEM: pl.Int64, TIME: pl.Int64},
    )
