"""The stealthy text attack on text-reading recommenders, and a text purifier as its defence.

Zhang, Liu, Liu, Wu, Guo & Wang, "Stealthy Attack on Large Language Model based Recommendation",
ACL 2024 (arXiv 2402.14836). Authors' code: github.com/CRIPAC-DIG/RecTextAttack (built on
TextAttack and PromptBench; its victim is Recformer).

**Threat model.** At test time, after training, the owner of one item rewrites a few words of the
item's own text (here: its title) so that the recommender ranks it higher for many users. Nothing
else changes: no fake users, no training data, no model weights. The attacker only queries the
model's scores (black box): the authors' goal function re-encodes the edited text, re-scores the
target for a fixed set of *anchor users* (40% of the test users, drawn once) and reads the
target's *exposure*, the share of anchor users whose top-K list (K = 50) holds it; an attack
succeeds when the exposure rises by ``target_improve`` (0.05). The attack is called stealthy
because the edits are small and the recommender's overall quality hardly moves.

**Search** (the authors' recipes, TextAttack's ``GreedyWordSwapWIR``): the words are ranked by
importance, the objective after deleting each word (the deletion that helps most first); then,
word by word in that order, every allowed variant of the word is scored and the best is kept if
it raises the objective. A word is changed at most once (``RepeatModification``) and stopwords never
(``StopwordModification``). Word variants (``edits``):

* ``char`` (the authors' ``deepwordbug``): swap two neighbouring characters, substitute, delete
  or insert one character;
* ``punct`` (the authors' ``punc``): insert an apostrophe or a hyphen inside the word (not before
  its first character);
* ``synonym`` (the authors' ``textfooler``, word swaps): replace the word by one of its nearest
  words;
* ``insert`` (not in the authors' recipes; the common "add a word" edit): insert a word of the
  catalogue's vocabulary after the word.

**Budget and stealthiness.** ``max_words``: the most words changed or inserted (checked against
the word-level edit distance of the final title, :func:`edit_stats`); ``max_char_distance``: the
most characters changed (Levenshtein distance; the authors' ``deepwordbug`` allows 30);
``min_similarity``: the least cosine similarity of the edited title to the original under a
sentence ``encoder`` (the authors use the Universal Sentence Encoder with 0.8 or 0.84; here any
project encoder, the packaged all-MiniLM-L6-v2 in the benchmark). Every result records the
word edits, the character distance, the similarity (when an encoder is given), the queries spent
and the anchor users' ranks of the target before and after.

**Scoring interface** (model-agnostic): ``score_fn(titles, users, items) -> (len(users), m)``
scores, for an item-title table ``titles`` (entry ``i`` is item ``i``; entry 0 unused), the items
``items`` (``(len(users), m)``, one row per user, or one row for all) for the users ``users``
(whatever the scorer understands: user indices, evaluation rows, prompt contexts). Scores may be
``-inf`` for items out of a user's ranking (the user's history). The attack scores the
competitors once with the original table; each query then scores only the target under an edited
table. The target's rank counts the competitors scored at least as high (pessimistic ties, as the
project's evaluation). :mod:`recforge.robustness.scorers` has scorers for the language-model
recommenders and the text-enhanced sequential models.

**Defence** (:class:`TextPurifier`, applied to every title before scoring). The authors' released
code implements no defence, and this module follows that code; the purifier is a project choice,
not the paper's, in the manner of robust word recognition (Pruthi, Dhingra & Lipton, "Combating
Adversarial Misspellings with Robust Word Recognition", ACL 2019): fitted on the clean catalogue
at training time, it maps each word of a title that is not a word of the catalogue back to one:
Unicode look-alikes to ASCII, inserted apostrophes and hyphens removed, and otherwise the nearest
catalogue word within ``max_distance`` character edits. A clean title is left as it is, so clean
quality is unchanged by construction. It undoes ``char`` and ``punct`` edits that leave the
vocabulary; it cannot undo edits that produce another catalogue word (``synonym``, ``insert``, or
a character edit that happens to spell a known word), and an attacker who knows it can search
among those only. Any defence the paper itself discusses is not reflected here.

Deviations from the paper and choices it leaves open:

* no TextAttack: the transformations, the greedy search and the constraints are re-implemented
  here; word importance is always measured by deleting the word (the authors' ``deepwordbug`` and
  ``bertattack`` recipes replace it by an unknown token instead); TextAttack's part-of-speech
  constraint and counter-fitted word vectors are not used: the ``synonym`` neighbours are the
  catalogue words closest to the word under the sentence ``encoder`` (or a ``synonyms`` mapping
  given by the caller);
* the similarity constraint compares whole titles under the project's encoder, not windows of
  15 words under the Universal Sentence Encoder;
* the objective breaks exposure ties by the anchor users' mean log2 rank (``objective="exposure"``),
  so that the greedy search has a signal while no anchor user's top-K moves (long-tail items,
  full ranking over a whole catalogue); ``objective="rank"`` uses that mean log rank alone and
  ``"score"`` the target's mean score. ``k`` (the exposure cut-off) defaults to 10, not 50;
* an explicit word budget ``max_words`` (default 2) and a query budget ``max_queries``; the
  authors' recipes have no word cap (``deepwordbug``: Levenshtein distance 30);
* edits touch the title only, never other item text (genres, description), and never a word
  without letters (a release year such as "(1995)"), as the authors' label constraint keeps the
  attribute names;
* victims: the project's zero-shot language-model ranker (SmolLM2-135M, pointwise Yes/No) and
  LLM-ESR, instead of the paper's four LLM-based recommenders (the released code attacks Recformer);
* the defence (see above) is the project's. ``TextPurifier`` ranks corrections by an edit distance
  that counts a swap of neighbouring characters as one edit (DeepWordBug's swaps), then by the same
  first letter, the same length and catalogue frequency, so a rare word one edit away from a more
  frequent one can be "corrected" to the wrong word.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from recforge.errors import ConfigError

EDITS = ("char", "punct", "synonym", "insert")
OBJECTIVES = ("exposure", "rank", "score")
WORD_ORDERS = ("importance", "left")
#: words an attack never changes (TextAttack's stopword constraint, the words that occur in titles)
STOPWORDS = frozenset("a an the of and or in on at to for with from by is are was be as it its his her my "
                      "your our their this that these those i you he she we they not no".split())
PUNCT = "'-"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_HAS_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)
_OUTER = re.compile(r"^(\W*)(.*?)(\W*)$", re.UNICODE | re.DOTALL)
#: Unicode look-alikes of Latin letters (Cyrillic, Greek) that NFKC leaves as they are
HOMOGLYPHS = str.maketrans({"а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i",
                            "ј": "j", "ѕ": "s", "ԁ": "d", "ɡ": "g", "ο": "o", "ν": "v", "ι": "i", "Α": "A",
                            "Β": "B", "Ε": "E", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
                            "Ρ": "P", "Τ": "T", "Χ": "X", "Υ": "Y", "Ζ": "Z", "А": "A", "В": "B", "Е": "E",
                            "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T", "Х": "X"})

ScoreFn = Callable[[Sequence[str], np.ndarray, np.ndarray], np.ndarray]


# ---- edit measures ---------------------------------------------------------------------------------
def levenshtein(a: Sequence, b: Sequence, limit: int | None = None) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings or two token lists;
    with ``limit``, any distance above it is returned as ``limit + 1`` (early stop)."""
    if len(a) < len(b):
        a, b = b, a
    if limit is not None and len(a) - len(b) > limit:
        return limit + 1
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        if limit is not None and min(cur) > limit:
            return limit + 1
        prev = cur
    return prev[-1]


def osa_distance(a: str, b: str, limit: int | None = None) -> int:
    """Edit distance that also counts a swap of two neighbouring characters as one edit (optimal
    string alignment); with ``limit``, any distance above it is returned as ``limit + 1``."""
    if limit is not None and abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if limit is not None and min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


def edit_stats(original: str, edited: str) -> dict:
    """How far ``edited`` is from ``original``: ``word_edits`` (word-level edit distance: words
    changed, inserted or deleted), ``char_distance`` (character-level Levenshtein distance) and
    ``words`` (words of the original)."""
    return {"word_edits": levenshtein(original.split(), edited.split()),
            "char_distance": levenshtein(original, edited), "words": len(original.split())}


def _split_outer(token: str) -> tuple[str, str, str]:
    lead, core, trail = _OUTER.match(token).groups()
    return lead, core, trail


def _core_word(token: str) -> str:
    return _split_outer(token)[1]


def _editable(token: str, protect_stopwords: bool) -> bool:
    core = _core_word(token)
    if not _HAS_LETTER.search(core):
        return False
    return not (protect_stopwords and core.lower() in STOPWORDS)


def catalogue_vocabulary(titles: Sequence[str]) -> list[str]:
    """The distinct words of a title table (letters in them, outer punctuation removed, two
    characters or more, no stopwords), most frequent first (ties alphabetical), each in its
    most frequent spelling."""
    counts: Counter = Counter()
    forms: dict[str, Counter] = {}
    for t in titles:
        for tok in str(t or "").split():
            core = _core_word(tok)
            if len(core) < 2 or not _HAS_LETTER.search(core) or core.lower() in STOPWORDS:
                continue
            counts[core.lower()] += 1
            forms.setdefault(core.lower(), Counter())[core] += 1
    order = sorted(counts, key=lambda w: (-counts[w], w))
    return [forms[w].most_common(1)[0][0] for w in order]


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


# ---- results ----------------------------------------------------------------------------------------
@dataclass
class Edit:
    """One accepted edit: the word ``before`` (None for an insertion) became ``after`` at
    ``position`` (index of the word in the final title), by ``kind``."""

    position: int
    before: str | None
    after: str
    kind: str


@dataclass
class AttackResult:
    """What one attack on one item did (see :meth:`StealthyTextAttack.attack`)."""

    target: int
    original: str
    adversarial: str
    edits: list[Edit]
    word_edits: int
    char_distance: int
    similarity: float | None
    anchor_users: int
    before: dict
    after: dict
    queries: int
    seconds: float
    ranks_before: np.ndarray = field(repr=False)
    ranks_after: np.ndarray = field(repr=False)

    @property
    def changed(self) -> bool:
        return self.adversarial != self.original

    def as_dict(self) -> dict:
        """A JSON-ready record (ranks as lists)."""
        d = asdict(self)
        d["ranks_before"] = [int(r) for r in self.ranks_before]
        d["ranks_after"] = [int(r) for r in self.ranks_after]
        return d


# ---- the attack -------------------------------------------------------------------------------------
class StealthyTextAttack:
    """Greedy black-box edits of a target item's title (see the module docstring).

    Parameters: ``edits`` (one of :data:`EDITS` or a tuple of them), ``max_words`` (words changed
    or inserted, at most), ``max_char_distance`` (None: no character cap), ``min_similarity`` and
    ``encoder`` (None: no similarity constraint; an encoder object or spec as
    :func:`recforge.semantic.encoder.get_encoder` takes; the encoder is also used to record the
    similarity and to find ``synonym`` neighbours), ``candidates`` (variants tried per word and
    edit kind), ``k`` (exposure cut-off), ``objective`` (:data:`OBJECTIVES`), ``word_order``
    (``importance``: the authors' deletion ranking, or ``left``: left to right), ``max_queries``
    (titles scored per attack, the original included), ``goal_gain`` (stop once the anchor users'
    exposure has risen by this much; None: use the whole budget), ``protect_stopwords``,
    ``vocabulary`` (words for ``insert`` and ``synonym``; None: the catalogue's words),
    ``synonyms`` (a mapping word -> neighbours, instead of the encoder's), ``seed``.
    """

    def __init__(self, edits: str | Sequence[str] = "char", max_words: int = 2, max_char_distance: int | None = None,
                 min_similarity: float | None = None, encoder=None, candidates: int = 8, k: int = 10,
                 objective: str = "exposure", word_order: str = "importance", max_queries: int = 200,
                 goal_gain: float | None = None, protect_stopwords: bool = True,
                 vocabulary: Sequence[str] | None = None, synonyms: dict | None = None, seed: int = 0):
        kinds = (edits,) if isinstance(edits, str) else tuple(edits)
        unknown = [e for e in kinds if e not in EDITS]
        if not kinds or unknown:
            raise ConfigError(f"edits={edits!r}: choose one or more of {', '.join(EDITS)}")
        if _not_int(max_words) or max_words < 1:
            raise ConfigError(f"max_words={max_words!r}: the edit budget is a whole number of words >= 1 "
                              "(e.g. 2: at most two words changed or inserted)")
        if max_char_distance is not None and (_not_int(max_char_distance) or max_char_distance < 1):
            raise ConfigError(f"max_char_distance={max_char_distance!r}: give a whole number of characters >= 1, "
                              "or None for no character cap")
        if min_similarity is not None:
            if isinstance(min_similarity, bool) or not isinstance(min_similarity, (int, float)) \
                    or not -1.0 <= float(min_similarity) <= 1.0:
                raise ConfigError(f"min_similarity={min_similarity!r}: give a cosine similarity between -1 and 1 "
                                  "(e.g. 0.8), or None for no similarity constraint")
            if encoder is None:
                raise ConfigError("min_similarity needs a sentence encoder to compare the titles: pass encoder= "
                                  "(e.g. encoder=None -> 'recforge.semantic.encoder.TextEncoder()', or 'hashing')")
        if "synonym" in kinds and encoder is None and synonyms is None:
            raise ConfigError("edits='synonym' needs neighbours of words: pass encoder= (nearest catalogue words "
                              "under the encoder) or synonyms={word: [neighbours]}")
        for name, v in (("candidates", candidates), ("k", k), ("max_queries", max_queries)):
            if _not_int(v) or v < 1:
                raise ConfigError(f"{name}={v!r}: give a whole number >= 1")
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective={objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if word_order not in WORD_ORDERS:
            raise ConfigError(f"word_order={word_order!r}: choose one of {', '.join(WORD_ORDERS)}")
        if goal_gain is not None and (isinstance(goal_gain, bool) or not isinstance(goal_gain, (int, float))
                                      or not 0 < goal_gain <= 1):
            raise ConfigError(f"goal_gain={goal_gain!r}: give a rise of exposure between 0 and 1 (the authors: "
                              "0.05), or None to spend the whole budget")
        self.edits, self.max_words, self.max_char_distance = kinds, int(max_words), max_char_distance
        self.min_similarity = None if min_similarity is None else float(min_similarity)
        self.encoder, self.candidates, self.k, self.objective = encoder, int(candidates), int(k), objective
        self.word_order, self.max_queries, self.goal_gain = word_order, int(max_queries), goal_gain
        self.protect_stopwords, self.vocabulary, self.synonyms = protect_stopwords, vocabulary, synonyms
        self.seed = seed
        self._enc = None
        self._vocab_vectors: tuple | None = None

    def budget(self) -> dict:
        """The edit budget and constraints, for a results file."""
        return {"edits": list(self.edits), "max_words": self.max_words, "max_char_distance": self.max_char_distance,
                "min_similarity": self.min_similarity,
                "encoder": None if self.encoder is None else self._encoder().name,
                "candidates": self.candidates, "k": self.k, "objective": self.objective,
                "word_order": self.word_order, "max_queries": self.max_queries, "goal_gain": self.goal_gain,
                "protect_stopwords": self.protect_stopwords, "seed": self.seed}

    # ---- helpers --------------------------------------------------------------------------------
    def _encoder(self):
        if self._enc is None:
            from recforge.semantic.encoder import get_encoder

            self._enc = get_encoder(self.encoder, progress=False)
        return self._enc

    def _encode(self, texts: list[str]) -> np.ndarray:
        v = np.asarray(self._encoder().encode(list(texts), progress=False), dtype=np.float64)
        n = np.linalg.norm(v, axis=1, keepdims=True)
        return np.divide(v, n, out=np.zeros_like(v), where=n > 0)

    @staticmethod
    def _check_target(target, titles: list) -> int:
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
            raise ConfigError(f"target={target!r}: give an item index (an integer)")
        t = int(target)
        if not 1 <= t < len(titles):
            raise ConfigError(f"unknown item {t}: the title table covers items 1..{len(titles) - 1} "
                              "(entry i is item i; entry 0 is unused)")
        if not isinstance(titles[t], str) or not titles[t].strip():
            raise ConfigError(f"item {t} has no title to edit; attack items with text")
        return t

    @staticmethod
    def _competitors(candidates, n_titles: int, n_users: int) -> np.ndarray:
        if candidates is None:
            return np.broadcast_to(np.arange(1, n_titles, dtype=np.int64), (n_users, n_titles - 1))
        c = np.asarray(candidates)
        if c.dtype.kind not in "iu" or c.ndim not in (1, 2) or c.size == 0:
            raise ConfigError("candidates: give item indices, one row for all users or one row per user")
        c = c.astype(np.int64)
        if c.ndim == 1:
            c = np.broadcast_to(c, (n_users, len(c)))
        if c.shape[0] != n_users:
            raise ConfigError(f"candidates has {c.shape[0]} rows for {n_users} users: one row per user (or one row)")
        if c.min() < 1 or c.max() >= n_titles:
            raise ConfigError(f"candidates name items outside 1..{n_titles - 1} (the title table)")
        return c

    def _stats(self, s: np.ndarray, comp: np.ndarray) -> dict:
        s = np.where(np.isnan(s), -np.inf, s)
        ranks = 1 + (comp >= s[:, None]).sum(1)
        lr = np.log2(ranks)
        return {"ranks": ranks, "exposure": float(np.mean(ranks <= self.k)), "mean_log2_rank": float(lr.mean()),
                "mean_rank": float(ranks.mean()), "median_rank": float(np.median(ranks)),
                "mean_score": float(np.mean(s[np.isfinite(s)])) if np.isfinite(s).any() else float("nan")}

    def _key(self, st: dict) -> tuple:
        if self.objective == "exposure":
            return (st["exposure"], -st["mean_log2_rank"])
        if self.objective == "rank":
            return (-st["mean_log2_rank"], st["exposure"])
        return (st["mean_score"],)

    def _vocab(self, titles: list[str]) -> list[str]:
        return list(self.vocabulary) if self.vocabulary is not None else catalogue_vocabulary(titles[1:])

    def _neighbours(self, word: str, vocab: list[str]) -> list[str]:
        low = word.lower()
        if self.synonyms is not None:
            found = self.synonyms.get(word, self.synonyms.get(low, []))
            return [w for w in found if w.lower() != low][: self.candidates]
        key = tuple(vocab)
        if self._vocab_vectors is None or self._vocab_vectors[0] != key:
            self._vocab_vectors = (key, self._encode(vocab))
        vecs = self._vocab_vectors[1]
        sims = vecs @ self._encode([word])[0]
        out = []
        for j in np.argsort(-sims, kind="stable"):
            if vocab[j].lower() != low:
                out.append(vocab[j])
            if len(out) == self.candidates:
                break
        return out

    def _variants(self, token: str, kind: str, rng: np.random.Generator, vocab: list[str]) -> list[str]:
        lead, core, trail = _split_outer(token)
        n = len(core)
        found: set[str] = set()
        if kind == "char":
            for p in range(n - 1):
                if core[p] != core[p + 1]:
                    found.add(core[:p] + core[p + 1] + core[p] + core[p + 2 :])
            for p in range(n):
                if n > 1:
                    found.add(core[:p] + core[p + 1 :])
                c = _LETTERS[int(rng.integers(26))]
                c = c.upper() if core[p].isupper() else c
                if c != core[p]:
                    found.add(core[:p] + c + core[p + 1 :])
            for p in range(n + 1):
                found.add(core[:p] + _LETTERS[int(rng.integers(26))] + core[p:])
        elif kind == "punct":
            for p in range(1, n + 1):
                for c in PUNCT:
                    found.add(core[:p] + c + core[p:])
        elif kind == "synonym":
            return [lead + _match_case(w, core) + trail for w in self._neighbours(core, vocab)]
        found.discard(core)
        pool = sorted(found)
        if len(pool) > self.candidates:
            pool = [pool[i] for i in np.sort(rng.choice(len(pool), size=self.candidates, replace=False))]
        return [lead + v + trail for v in pool]

    # ---- the attack -----------------------------------------------------------------------------
    def attack(self, target: int, titles: Sequence[str], score_fn: ScoreFn, users, candidates=None) -> AttackResult:
        """Edit the title of item ``target`` within the budget to raise its rank for ``users``.

        ``titles``: the item-title table (entry ``i`` is item ``i``); ``score_fn``: see the module
        docstring; ``users``: the anchor users (a 1-D array the scorer understands); ``candidates``:
        the items the target competes with, ``(len(users), m)`` or one row for all (None: every
        item). Returns an :class:`AttackResult`; the table is not changed."""
        t0 = time.perf_counter()
        titles = list(titles)
        target = self._check_target(target, titles)
        users = np.asarray(users)
        if users.ndim != 1 or len(users) == 0:
            raise ConfigError("users: give a non-empty 1-D array of anchor users")
        items = self._competitors(candidates, len(titles), len(users))
        comp = np.asarray(score_fn(titles, users, items), dtype=np.float64)
        if comp.shape != items.shape:
            raise ConfigError(f"score_fn returned scores of shape {comp.shape} for items of shape {items.shape}; "
                              "it must return one score per (user, item) of its items argument")
        comp = np.where(np.isnan(comp), np.inf, comp)  # a missing competitor score ranks ahead (pessimistic)
        comp = np.where(items == target, -np.inf, comp)
        column = np.full((len(users), 1), target, dtype=np.int64)
        cache: dict[str, np.ndarray] = {}
        spent = [0]

        def query(title: str) -> np.ndarray | None:
            if title in cache:
                return cache[title]
            if spent[0] >= self.max_queries:
                return None
            table = list(titles)
            table[target] = title
            s = np.asarray(score_fn(table, users, column), dtype=np.float64).reshape(len(users))
            spent[0] += 1
            cache[title] = s
            return s

        original = titles[target]
        st0 = self._stats(query(original), comp)
        best_st = st0
        tokens = original.split()
        origin: list[int | None] = list(range(len(tokens)))
        editable = [i for i, tok in enumerate(tokens) if _editable(tok, self.protect_stopwords)]
        vocab = self._vocab(titles) if any(e in ("insert", "synonym") for e in self.edits) else []
        rng = np.random.default_rng([int(self.seed), target])
        ref_vec = self._encode([original])[0] if self.encoder is not None else None

        order = list(editable)
        if self.word_order == "importance" and len(editable) > 1:
            gain = {}
            for i in editable:
                s = query(" ".join(tokens[:i] + tokens[i + 1 :]))
                gain[i] = self._key(self._stats(s, comp)) if s is not None else (-np.inf,)
            order = sorted(editable, key=lambda i: gain[i], reverse=True)

        current, edits, n_words = list(tokens), [], 0
        for i in order:
            if n_words >= self.max_words or spent[0] >= self.max_queries:
                break
            if self.goal_gain is not None and best_st["exposure"] - st0["exposure"] >= self.goal_gain:
                break
            pos = origin.index(i)
            options: list[tuple[list[str], list, Edit]] = []
            for kind in self.edits:
                if kind == "insert":
                    size = min(self.candidates, len(vocab))
                    picks = rng.choice(len(vocab), size=size, replace=False) if vocab else []
                    for j in np.sort(picks):
                        w = vocab[int(j)]
                        options.append((current[: pos + 1] + [w] + current[pos + 1 :],
                                        origin[: pos + 1] + [None] + origin[pos + 1 :], Edit(pos + 1, None, w, kind)))
                else:
                    for v in self._variants(current[pos], kind, rng, vocab):
                        options.append((current[:pos] + [v] + current[pos + 1 :], origin,
                                        Edit(pos, current[pos], v, kind)))
            texts = [" ".join(o[0]) for o in options]
            keep = [j for j, t in enumerate(texts) if self._within_budget(original, t)]
            if self.min_similarity is not None and keep:
                sims = self._encode([texts[j] for j in keep]) @ ref_vec
                keep = [j for j, s in zip(keep, sims) if s >= self.min_similarity]
            best = None
            for j in keep:
                s = query(texts[j])
                if s is None:
                    break
                st = self._stats(s, comp)
                if best is None or self._key(st) > self._key(best[1]):
                    best = (j, st)
            if best is not None and self._key(best[1]) > self._key(best_st):
                current, origin_new, edit = options[best[0]][0], options[best[0]][1], options[best[0]][2]
                if edit.before is not None:
                    origin_new = list(origin_new)
                    origin_new[pos] = None  # a changed word is not changed again
                origin, best_st = list(origin_new), best[1]
                if edit.before is None:  # an insertion shifts the later words of the earlier edits
                    for e in edits:
                        e.position += e.position >= edit.position
                edits.append(edit)
                n_words += 1

        adversarial = " ".join(current) if edits else original
        stats = edit_stats(original, adversarial)
        similarity = None
        if self.encoder is not None:
            similarity = float(self._encode([adversarial])[0] @ ref_vec)

        def public(st):
            return {k: v for k, v in st.items() if k != "ranks"}

        return AttackResult(target, original, adversarial, edits, stats["word_edits"], stats["char_distance"],
                            similarity, len(users), public(st0), public(best_st), spent[0],
                            round(time.perf_counter() - t0, 3), st0["ranks"], best_st["ranks"])

    def _within_budget(self, original: str, text: str) -> bool:
        st = edit_stats(original, text)
        if st["word_edits"] > self.max_words:
            return False
        return self.max_char_distance is None or st["char_distance"] <= self.max_char_distance

    def attack_many(self, targets, titles: Sequence[str], score_fn: ScoreFn, users_of, candidates_of=None,
                    progress: bool = False) -> list[AttackResult]:
        """:meth:`attack` for each of ``targets``, one at a time against the clean table (each owner
        edits only their own item). ``users_of(target)`` gives the anchor users of a target and
        ``candidates_of(target)`` (optional) its competitors."""
        from tqdm.auto import tqdm

        out = []
        for t in tqdm(list(targets), desc="attacking", unit="item", disable=not progress, dynamic_ncols=True):
            out.append(self.attack(int(t), titles, score_fn, users_of(int(t)),
                                   None if candidates_of is None else candidates_of(int(t))))
        return out


def _not_int(v) -> bool:
    return isinstance(v, bool) or not isinstance(v, (int, np.integer))


# ---- the defence --------------------------------------------------------------------------------------
class TextPurifier:
    """Map the words of a title that are not catalogue words back to catalogue words (see the
    module docstring). ``fit(texts)`` learns the catalogue's words from clean texts;
    ``transform(texts)`` purifies. ``max_distance``: the most character edits a correction may
    undo (words shorter than ``min_length`` characters: at most one); ``strip``: characters removed
    from a word that is not a catalogue word before it is looked up again.

    Fitted state: ``forms_`` (the catalogue's tokens, lower-cased), ``words_`` (word counts by
    lower-cased word), ``canonical_`` (each word's most frequent spelling). After a transform,
    ``last_transform_`` holds the texts seen, the texts changed, the words corrected and the seconds.
    """

    def __init__(self, max_distance: int = 2, min_length: int = 4, strip: str = PUNCT + ".`"):
        if _not_int(max_distance) or max_distance < 1:
            raise ConfigError(f"max_distance={max_distance!r}: give a whole number of character edits >= 1")
        if _not_int(min_length) or min_length < 1:
            raise ConfigError(f"min_length={min_length!r}: give a whole number of characters >= 1")
        self.max_distance, self.min_length, self.strip = int(max_distance), int(min_length), strip

    def fit(self, texts: Sequence[str]) -> "TextPurifier":
        forms, counts, spell = set(), Counter(), {}
        for t in texts:
            for tok in str(t or "").split():
                forms.add(tok.lower())
                core = _core_word(tok)
                if _HAS_LETTER.search(core):
                    counts[core.lower()] += 1
                    spell.setdefault(core.lower(), Counter())[core] += 1
        if not counts:
            raise ConfigError("TextPurifier.fit: the texts hold no word; fit it on the clean catalogue's titles")
        self.forms_, self.words_ = forms, counts
        self.canonical_ = {w: c.most_common(1)[0][0] for w, c in spell.items()}
        self._spellings = spell
        self._by_len: dict[int, list[str]] = {}
        for w in sorted(counts, key=lambda w: (-counts[w], w)):
            self._by_len.setdefault(len(w), []).append(w)
        self._memo: dict[str, tuple[str, bool]] = {}
        return self

    def _check_fitted(self):
        if not hasattr(self, "forms_"):
            raise ConfigError("the purifier is not fitted: call fit(clean_titles) first")

    def _nearest(self, word: str) -> tuple[str | None, tuple]:
        """The catalogue word closest to ``word`` and its sort key: fewest edits (a swap of two
        neighbouring characters is one), then the same first letter, the same length, the most
        frequent, alphabetical. ``(None, ())`` when none is within the limit."""
        limit = self.max_distance if len(word) >= self.min_length else 1
        best, best_key = None, ()
        for n in range(max(1, len(word) - limit), len(word) + limit + 1):
            for w in self._by_len.get(n, ()):
                d = osa_distance(word, w, limit)
                if d <= limit:
                    key = (d, w[:1] != word[:1], abs(len(w) - len(word)), -self.words_[w], w)
                    if best is None or key < best_key:
                        best, best_key = w, key
        return best, best_key

    def purify_word(self, token: str) -> tuple[str, bool]:
        """``(purified token, whether it changed)``."""
        if token in self._memo:
            return self._memo[token]
        out = self._purify_word(token)
        self._memo[token] = (out, out != token)
        return self._memo[token]

    def _purify_word(self, token: str) -> str:
        if token.lower() in self.forms_:
            return token
        norm = unicodedata.normalize("NFKC", token).translate(HOMOGLYPHS)
        if norm.lower() in self.forms_ or not _HAS_LETTER.search(norm):
            return norm
        lead, core, trail = _split_outer(norm)
        clean = core.translate(str.maketrans("", "", self.strip)) or core
        lead_c, trail_c = lead.translate(str.maketrans("", "", self.strip)), trail.translate(
            str.maketrans("", "", self.strip))
        for cand in (lead + clean + trail, lead_c + clean + trail_c):
            if cand.lower() in self.forms_:
                return cand
        low = clean.lower()
        if low in self.words_:
            return lead_c + self._spelling(low, clean) + trail_c
        # the nearest word of the core as it is (an edit next to an apostrophe the title had) or
        # without the inserted punctuation, whichever is closer
        found = [(f[1][0], n, f[1], f[0]) for n, f in enumerate((self._nearest(core.lower()), self._nearest(low)))
                 if f[0] is not None]
        if not found:
            return norm
        fix = min(found)[3]  # fewest edits; on a tie the core as it is
        return lead_c + self._spelling(fix, clean) + trail_c

    def _spelling(self, word: str, like: str) -> str:
        """The catalogue's spelling of ``word`` closest in case to ``like`` (a capital letter in it:
        the most frequent spelling with a capital; none: the most frequent one without), else the
        most frequent spelling."""
        capital = any(c.isupper() for c in like)
        forms = self._spellings[word].most_common()
        for form, _ in forms:
            if any(c.isupper() for c in form) == capital:
                return form
        return forms[0][0]

    def _purify(self, text) -> tuple[str, int]:
        if not isinstance(text, str) or not text.strip():
            return text, 0
        toks = [self.purify_word(tok) for tok in text.split()]
        fixed = sum(c for _, c in toks)
        return (text if not fixed else " ".join(w for w, _ in toks)), fixed

    def purify(self, text: str) -> str:
        """One text purified (a text with no word to correct comes back unchanged, spacing included)."""
        self._check_fitted()
        return self._purify(text)[0]

    def transform(self, texts: Sequence[str]) -> list[str]:
        self._check_fitted()
        t0 = time.perf_counter()
        out, changed, words = [], 0, 0
        for t in texts:
            p, fixed = self._purify(t)
            words += fixed
            changed += p != t
            out.append(p)
        self.last_transform_ = {"texts": len(out), "changed": int(changed), "words_corrected": int(words),
                                "seconds": round(time.perf_counter() - t0, 4)}
        return out

    def wrap(self, score_fn: ScoreFn) -> ScoreFn:
        """``score_fn`` with every title purified first (the defended system)."""
        self._check_fitted()

        def defended(titles, users, items):
            return score_fn([self._purify(t)[0] for t in titles], users, items)

        return defended
