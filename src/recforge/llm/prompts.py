"""From rated interactions to Yes/No prompts: split, target samples, behaviour retrieval, templates,
token budget.

**Split** (:func:`temporal_user_split`, ``split.method=temporal_user``): each user's interactions in
time order (ties in source order); the last ``test_ratio`` share of them (at least one, rounded) are
the user's test rows, the rest the training rows. :func:`temporal_split` (``split.method=temporal``)
cuts the whole log at one time instead: the rows at or after the timestamp below which a
``1 - test_ratio`` share of all rows lies are the test rows, so the test period (its users, items and
tastes) differs from the training period, the out-of-distribution setting of the robust models; a
test user without an earlier training row has no history and is not a target. A row is a *like* when
its rating is at least ``like_threshold`` (MovieLens: 4 of 5 stars).

**Targets and history.** A prompt asks whether the user likes a target item. The history it shows
is read from the *training rows only*, and only rows strictly earlier than the target (a row with
the same timestamp as the target is not history): a training target sees the user's earlier
training rows, a test target the user's training rows before it (never another test row). Targets
without any such history row are not used (``min_history``). Budgets are explicit: ``n`` targets
are drawn uniformly without replacement from the eligible rows of a part with a seed of their own
(:func:`sample_targets`), so every model compared scores the same test sample.

**Behaviour retrieval** (:func:`select_history`): ``recent`` keeps the ``k`` most recent history
rows; ``semantic`` (ReLLa's semantic user-behaviour retrieval) keeps the ``k`` history rows whose
item text vectors are closest (cosine) to the target item's, ties going to the more recent row.
Either way the kept rows are shown in time order with their ratings.

**Templates** (:class:`PromptFormat`): the user message is ``template`` with ``{profile}`` (one
sentence from the user table: age, gender, occupation; empty without one), ``{scale}`` (the
training ratings' range, "1 to 5" on MovieLens-100K, "0.5 to 5" on ML-latest-small), ``{history}`` (one
``item_line`` per kept row: ``{title}``, ``{genres}``, ``{rating}``, ``{stars}``) and ``{target}``
(``target_line``: ``{title}``, ``{genres}``). The model wraps it (chat template, answer prefix).

**Token budget** (:func:`fit_budget`): a prompt longer than ``max_tokens`` (the whole input the
model reads) drops its least wanted history row (the oldest for ``recent``, the least similar for
``semantic``) until it fits; a prompt that does not fit with no history row left is an error
naming the budget and the fix. The number of prompts cut so is recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl

from recforge.data.schema import ITEM, RATING, TIME, USER
from recforge.errors import ConfigError, DataError

RETRIEVALS = ("recent", "semantic")

DEFAULT_TEMPLATE = ("{profile}The user rated these movies from {scale} stars:\n{history}\n"
                    "Will the user like the movie {target}? Answer Yes or No.")
DEFAULT_ITEM_LINE = "- {title}: {stars}"
DEFAULT_TARGET_LINE = "{title} ({genres})"


@dataclass
class PromptFormat:
    template: str = DEFAULT_TEMPLATE
    item_line: str = DEFAULT_ITEM_LINE
    target_line: str = DEFAULT_TARGET_LINE

    def __post_init__(self):
        for name, text, need in (("template", self.template, ("{history}", "{target}")),):
            missing = [n for n in need if n not in text]
            if missing:
                raise ConfigError(f"llm.{name} lacks {', '.join(missing)}; a prompt template must show the history "
                                  "and the target, e.g. the default: " + repr(DEFAULT_TEMPLATE))
        for name, text in (("template", self.template), ("item_line", self.item_line),
                           ("target_line", self.target_line)):
            try:
                text.format(profile="", history="", target="", title="", genres="", rating=0, stars="", scale="")
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"llm.{name}={text!r}: unknown or malformed field {exc}; fields: "
                                  "{profile} {history} {target} {scale} (template), {title} {genres} {rating} {stars} "
                                  "(item_line), {title} {genres} (target_line)") from None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PromptSplit:
    """Rated rows split per user in time: ``train`` and ``test`` frames (``user_id``, ``item_id``,
    ``timestamp``, ``rating``, ``label``), item ``titles``/``genres`` by item index (index 0 empty),
    user ``profiles`` by user index, and the split's record."""

    train: pl.DataFrame
    test: pl.DataFrame
    titles: list[str]
    genres: list[str]
    profiles: list[str]
    protocol: dict = field(default_factory=dict)
    #: the rating scale of the training rows, as the template's ``{scale}`` shows it ("1 to 5")
    scale: str = "1 to 5"

    @property
    def n_users(self) -> int:
        return len(self.profiles)

    @property
    def n_items(self) -> int:
        return len(self.titles) - 1

    def __post_init__(self):
        # the training rows by user, in time order: offsets of each user's slice
        t = self.train
        self._users = t[USER].to_numpy()
        self._items = t[ITEM].to_numpy()
        self._times = t[TIME].to_numpy()
        self._ratings = t[RATING].to_numpy()
        counts = np.bincount(self._users, minlength=self.n_users)
        self._start = np.r_[0, np.cumsum(counts)]

    def history_rows(self, user: int, timestamp: int) -> np.ndarray:
        """Indices into ``train`` of the user's training rows strictly before ``timestamp``, in time order."""
        s, e = self._start[user], self._start[user + 1]
        n = int(np.searchsorted(self._times[s:e], timestamp, side="left"))
        return np.arange(s, s + n)

    def n_history(self, frame: pl.DataFrame) -> np.ndarray:
        """For each row of ``frame``: the number of training rows of its user strictly before it."""
        users, times = frame[USER].to_numpy(), frame[TIME].to_numpy()
        out = np.empty(len(users), dtype=np.int64)
        for u in np.unique(users):
            m = users == u
            s, e = self._start[u], self._start[u + 1]
            out[m] = np.searchsorted(self._times[s:e], times[m], side="left")
        return out


def _profile(row: dict) -> str:
    parts = []
    age, gender, job = row.get("age"), str(row.get("gender") or "").upper(), row.get("occupation")
    sex = {"M": "male", "F": "female"}.get(gender, "")
    if age:
        parts.append(f"{int(age)}-year-old")
    if sex:
        parts.append(sex)
    if job and str(job).lower() not in ("none", "other"):
        parts.append(str(job))
    return f"The user is a {' '.join(parts)}.\n" if parts else ""


def temporal_user_split(ds, test_ratio: float = 0.1, like_threshold: float = 4.0) -> PromptSplit:
    """Split a rated dataset per user in time (see the module docstring)."""
    df = _rated_rows(ds, test_ratio).sort([USER, TIME, "_pos"])
    n = df.group_by(USER).len().rename({"len": "_n"})
    df = (df.join(n, on=USER).with_columns(pl.int_range(pl.len()).over(USER).alias("_k"))
          .with_columns(pl.max_horizontal(pl.lit(1), (pl.col("_n") * float(test_ratio)).round().cast(pl.Int64))
                        .alias("_n_test"))
          .with_columns((pl.col("_k") >= pl.col("_n") - pl.col("_n_test")).alias("_test")))
    return _prompt_split(ds, df, like_threshold, {"method": "temporal_user", "test_ratio": float(test_ratio)})


def temporal_split(ds, test_ratio: float = 0.1, like_threshold: float = 4.0) -> PromptSplit:
    """Split a rated dataset at one global time (see the module docstring): the test period is the
    last ``test_ratio`` share of the log's rows by time."""
    df = _rated_rows(ds, test_ratio).sort([USER, TIME, "_pos"])
    times = np.sort(df[TIME].to_numpy())
    cut = int(times[min(len(times) - 1, int(np.floor(len(times) * (1 - float(test_ratio)))))])
    df = df.with_columns((pl.col(TIME) >= cut).alias("_test"))
    if not df["_test"].any() or df["_test"].all():
        raise DataError(f"{ds.name}: split.method=temporal with test_ratio={test_ratio} leaves an empty part; "
                        "the log's timestamps are too few (give another test_ratio or split.method=temporal_user)")
    return _prompt_split(ds, df, like_threshold, {"method": "temporal", "test_ratio": float(test_ratio),
                                                  "cutoff": cut})


def _rated_rows(ds, test_ratio: float) -> pl.DataFrame:
    inter = ds.interactions
    if RATING not in inter.columns:
        raise DataError(f"{ds.name}: no rating column; Yes/No prompts need rated interactions (a like is a rating "
                        ">= data.like_threshold)")
    if not 0 < float(test_ratio) < 1:
        raise ConfigError(f"split.test_ratio={test_ratio}: give a share between 0 and 1, e.g. 0.1")
    if ds.items is None or "title" not in ds.items.columns:
        raise DataError(f"{ds.name}: no item titles; prompts name items by title (an item table with a title column)")
    return inter.select(USER, ITEM, TIME, RATING).with_row_index("_pos")


def _prompt_split(ds, df: pl.DataFrame, like_threshold: float, protocol: dict) -> PromptSplit:
    """The :class:`PromptSplit` of rows sorted by user and time with a boolean ``_test`` column."""
    df = df.with_columns((pl.col(RATING) >= float(like_threshold)).cast(pl.Int8).alias("label"))
    keep = [USER, ITEM, TIME, RATING, "label"]
    train = df.filter(~pl.col("_test")).select(keep)
    test = df.filter(pl.col("_test")).select(keep)
    items = ds.items.sort(ITEM)
    titles = [""] * (ds.n_items + 1)
    genres = [""] * (ds.n_items + 1)
    for r in items.iter_rows(named=True):
        i = int(r[ITEM])
        if 0 < i <= ds.n_items:
            titles[i] = str(r.get("title") or f"item {i}")
            genres[i] = ", ".join(g for g in str(r.get("genres") or "").split("|") if g and g != "unknown")
    profiles = [""] * ds.n_users
    if ds.users is not None:
        for r in ds.users.iter_rows(named=True):
            u = int(r[USER])
            if 0 <= u < ds.n_users:
                profiles[u] = _profile(r)
    protocol = {**protocol, "like_threshold": float(like_threshold),
                "rows": {"train": train.height, "test": test.height},
                "like_rate": {"train": round(float(train["label"].mean()), 4), "test": round(float(test["label"].mean()), 4)},
                "history": "training rows of the target's user strictly before the target's timestamp"}
    lo, hi = float(train[RATING].min()), float(train[RATING].max())
    protocol["rating_scale"] = [lo, hi]
    return PromptSplit(train, test, titles, genres, profiles, protocol, scale=f"{lo:g} to {hi:g}")


def eligible(split: PromptSplit, part: str, min_history: int = 1) -> pl.DataFrame:
    """The rows of ``part`` (``train``/``test``) with at least ``min_history`` history rows, with
    ``row`` (the row's index in the part) and ``n_history``."""
    frame = getattr(split, part).with_row_index("row")
    n_hist = split.n_history(frame)
    return frame.with_columns(pl.Series("n_history", n_hist)).filter(pl.col("n_history") >= int(min_history))


def sample_targets(frame: pl.DataFrame, n: int | None, seed: int) -> pl.DataFrame:
    """``n`` rows drawn uniformly without replacement (None or more than there are: all), in their
    original order."""
    if n is None or n >= frame.height:
        return frame
    if n <= 0:
        raise ConfigError(f"a sample budget of {n} prompts: give a positive number (or null for every row)")
    idx = np.sort(np.random.default_rng(seed).choice(frame.height, size=int(n), replace=False))
    return frame[idx]


def select_history(split: PromptSplit, user: int, item: int, timestamp: int, k: int, retrieval: str,
                   vectors: np.ndarray | None = None) -> np.ndarray:
    """The training-row indices shown for one target, in *priority* order (first = kept longest
    under the token budget): the ``k`` most recent (``recent``) or most similar (``semantic``)
    earlier training rows."""
    rows = split.history_rows(user, timestamp)
    if retrieval == "recent":
        return rows[::-1][:k]
    if retrieval != "semantic":
        raise ConfigError(f"retrieval={retrieval!r}: choose one of {', '.join(RETRIEVALS)}")
    if vectors is None:
        raise ConfigError("semantic retrieval needs item text vectors (the text extra's sentence encoder)")
    sims = vectors[split._items[rows]] @ vectors[item]
    order = np.lexsort((-np.arange(len(rows)), -sims))  # most similar first, then the most recent
    return rows[order[:k]]


def render(split: PromptSplit, fmt: PromptFormat, user: int, item: int, rows: np.ndarray) -> str:
    """The user message for a target and the history rows ``rows`` (shown in time order)."""
    lines = []
    for r in np.sort(rows):
        i, rating = int(split._items[r]), float(split._ratings[r])
        stars = f"{rating:g} star" + ("" if rating == 1 else "s")
        lines.append(fmt.item_line.format(title=split.titles[i], genres=split.genres[i], rating=f"{rating:g}",
                                          stars=stars))
    target = fmt.target_line.format(title=split.titles[item], genres=split.genres[item] or "unknown genre")
    return fmt.template.format(profile=split.profiles[user], history="\n".join(lines), target=target,
                               scale=split.scale)


def fit_budget(build, chosen: list[np.ndarray], count, max_tokens: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Prompts within ``max_tokens``: ``build(i, rows) -> text`` renders target ``i`` with history rows
    ``rows``; ``count(texts) -> token counts`` of the full model input. Rows are dropped from the
    end of each priority list until the prompt fits. Returns the texts, their token counts and the
    number of rows each kept."""
    texts = [build(i, rows) for i, rows in enumerate(chosen)]
    n_tok = np.asarray(count(texts), dtype=np.int64)
    kept = np.array([len(r) for r in chosen], dtype=np.int64)
    over = np.flatnonzero(n_tok > max_tokens)
    while len(over):
        stuck = over[kept[over] == 0]
        if len(stuck):
            i = int(stuck[0])
            raise ConfigError(f"a prompt of {int(n_tok[i])} tokens with no history left is over the token budget "
                              f"llm.max_tokens={max_tokens}; raise the budget or shorten llm.template / llm.target_line")
        for i in over:
            kept[i] -= 1
            texts[i] = build(int(i), chosen[i][: kept[i]])
        n_tok[over] = count([texts[i] for i in over])
        over = over[n_tok[over] > max_tokens]
    return texts, n_tok, kept


def build_prompts(split: PromptSplit, targets: pl.DataFrame, fmt: PromptFormat, k: int, retrieval: str,
                  count, max_tokens: int, vectors: np.ndarray | None = None) -> pl.DataFrame:
    """One prompt per target row: the target columns plus ``prompt``, ``n_tokens``, ``shown`` (history
    rows in the prompt), ``hist_items`` (their items, in time order) and ``retrieval``."""
    if int(k) < 1:
        raise ConfigError(f"k={k}: show at least one history item")
    users, items, times = (targets[c].to_numpy() for c in (USER, ITEM, TIME))
    chosen = [select_history(split, int(u), int(i), int(t), int(k), retrieval, vectors)
              for u, i, t in zip(users, items, times)]
    texts, n_tok, kept = fit_budget(lambda j, rows: render(split, fmt, int(users[j]), int(items[j]), rows),
                                    chosen, count, int(max_tokens))
    hist = [split._items[np.sort(c[:n])].tolist() for c, n in zip(chosen, kept)]
    return targets.with_columns(pl.Series("prompt", texts), pl.Series("n_tokens", n_tok),
                                pl.Series("shown", kept), pl.Series("hist_items", hist, dtype=pl.List(pl.Int32)),
                                pl.lit(retrieval).alias("retrieval"))
