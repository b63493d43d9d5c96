"""The stealthy text attack (recforge.robustness): edits stay within the word, character and
similarity budgets; the attack raises the target's score and rank on a tiny deterministic scorer
(the HashingEncoder test double and a dot product with users' taste vectors); the purifier undoes
out-of-vocabulary edits and leaves clean titles alone; bad budgets and unknown items are clear
errors; the scorers of LLM-ESR and of the language-model recommender agree with the models."""

from __future__ import annotations

import numpy as np
import pytest

from recforge.errors import ConfigError
from recforge.robustness import StealthyTextAttack, TextPurifier, edit_stats
from recforge.robustness.text_attack import catalogue_vocabulary, levenshtein
from recforge.semantic.encoder import HashingEncoder

WORDS = ["space", "love", "night", "war", "river", "ghost", "king", "city", "dream", "star", "blue", "dark"]
TASTES = ["space war star", "love dream blue", "ghost night dark", "king city river", "star dream night"]
ENC = HashingEncoder(16)


def make_titles(n: int = 40, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pick = lambda: WORDS[int(rng.integers(len(WORDS)))]  # noqa: E731
    return [""] + [f"{pick().title()} of the {pick()} {pick().title()} ({1990 + i % 10})" for i in range(n)]


TITLES = make_titles()
USERS = ENC.encode(TASTES)


def score_fn(table, users, items):
    """Dot product of the users' taste vectors with the hashed titles of the items."""
    items = np.asarray(items)
    vec = ENC.encode([table[i] for i in items.ravel()]).reshape(items.shape + (-1,))
    return np.einsum("ud,umd->um", USERS[np.asarray(users)], vec)


def target_score(title: str, target: int = 7) -> float:
    table = list(TITLES)
    table[target] = title
    return float(score_fn(table, np.arange(len(TASTES)), np.full((len(TASTES), 1), target)).mean())


ALL = np.arange(len(TASTES))


# ---- edit measures ---------------------------------------------------------------------------------
def test_levenshtein_and_edit_stats_by_hand():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert levenshtein(["a", "b", "c"], ["a", "x", "c", "d"]) == 2
    assert levenshtein("abcdef", "uvwxyz", limit=2) == 3  # past the limit: limit + 1
    st = edit_stats("Star Wars (1977)", "Sta'r Wars Blue (1977)")
    assert st == {"word_edits": 2, "char_distance": 6, "words": 3}


# ---- the budget ------------------------------------------------------------------------------------
@pytest.mark.parametrize("edits", ["char", "punct", "insert", "synonym", ("char", "insert")])
@pytest.mark.parametrize("max_words", [1, 2])
def test_edits_stay_within_the_word_budget(edits, max_words):
    syn = {w: [x for x in WORDS if x != w][:4] for w in WORDS}
    attack = StealthyTextAttack(edits=edits, max_words=max_words, k=5, candidates=6, synonyms=syn)
    for target in (3, 7, 11, 19):
        r = attack.attack(target, TITLES, score_fn, ALL)
        st = edit_stats(TITLES[target], r.adversarial)
        assert st["word_edits"] <= max_words and st["word_edits"] == r.word_edits == len(r.edits)
        assert r.queries <= attack.max_queries
        orig, adv = TITLES[target].split(), r.adversarial.split()
        assert adv[-1] == orig[-1]  # the year (no letters) is never edited
        assert "of" in adv and "the" in adv  # nor the stopwords
        for e in r.edits:
            assert adv[e.position] == e.after


def test_character_and_similarity_budgets():
    r = StealthyTextAttack("char", max_words=3, max_char_distance=1, k=5).attack(7, TITLES, score_fn, ALL)
    assert r.changed and r.char_distance <= 1 and edit_stats(TITLES[7], r.adversarial)["char_distance"] <= 1
    # insertions change many characters: a cap of 5 leaves only the short words
    r = StealthyTextAttack("insert", max_words=2, max_char_distance=5, k=5).attack(7, TITLES, score_fn, ALL)
    assert edit_stats(TITLES[7], r.adversarial)["char_distance"] <= 5
    loose = StealthyTextAttack("insert", max_words=2, k=5, encoder=ENC).attack(7, TITLES, score_fn, ALL)
    strict = StealthyTextAttack("insert", max_words=2, k=5, encoder=ENC, min_similarity=0.95)
    r = strict.attack(7, TITLES, score_fn, ALL)
    assert loose.similarity < 0.95  # the unconstrained attack goes below the threshold ...
    sim = float(ENC.encode([TITLES[7]])[0] @ ENC.encode([r.adversarial])[0])
    assert r.similarity == pytest.approx(sim) and sim >= 0.95 - 1e-6  # ... the constrained one does not


def test_query_budget_is_respected_and_counts_the_original():
    r = StealthyTextAttack("char", max_words=2, k=5, max_queries=3).attack(7, TITLES, score_fn, ALL)
    assert r.queries == 3


# ---- the attack works ---------------------------------------------------------------------------------
@pytest.mark.parametrize("edits", ["insert", "char", "punct"])
def test_attack_raises_the_target_score_and_rank(edits):
    target = 7
    r = StealthyTextAttack(edits, max_words=2, k=5, candidates=8).attack(target, TITLES, score_fn, ALL)
    assert r.changed and r.edits
    # checked again from the scorer, independently of the attack's own record
    assert target_score(r.adversarial, target) > target_score(TITLES[target], target)
    assert r.after["mean_score"] > r.before["mean_score"]
    assert r.after["mean_log2_rank"] <= r.before["mean_log2_rank"]
    assert (r.ranks_after <= r.ranks_before).sum() >= 1 and r.ranks_after.sum() <= r.ranks_before.sum()


def test_competitor_ranks_are_pessimistic_and_per_user():
    target = 7
    items = np.tile(np.arange(1, 11), (len(TASTES), 1))  # a candidate set per user; the target among them
    r = StealthyTextAttack("insert", max_words=1, k=3).attack(target, TITLES, score_fn, ALL, candidates=items)
    comp = score_fn(TITLES, ALL, items)
    comp[items == target] = -np.inf
    own = score_fn(TITLES, ALL, np.full((len(TASTES), 1), target))[:, 0]
    assert r.ranks_before.tolist() == (1 + (comp >= own[:, None]).sum(1)).tolist()
    assert r.before["exposure"] == pytest.approx(np.mean(r.ranks_before <= 3))


def test_same_seed_same_edits():
    a = StealthyTextAttack("char", max_words=2, k=5, seed=3).attack(7, TITLES, score_fn, ALL)
    b = StealthyTextAttack("char", max_words=2, k=5, seed=3).attack(7, TITLES, score_fn, ALL)
    assert a.adversarial == b.adversarial and a.queries == b.queries


# ---- the defence --------------------------------------------------------------------------------------
def test_purifier_leaves_clean_titles_alone():
    pur = TextPurifier().fit(TITLES[1:])
    assert pur.transform(TITLES[1:]) == TITLES[1:]
    assert pur.last_transform_["changed"] == 0 and pur.last_transform_["words_corrected"] == 0


@pytest.mark.parametrize("edits", ["punct", "char"])
def test_purifier_undoes_out_of_vocabulary_edits(edits):
    target = 7
    r = StealthyTextAttack(edits, max_words=2, k=5, candidates=8).attack(target, TITLES, score_fn, ALL)
    assert r.changed
    pur = TextPurifier().fit(TITLES[1:])
    fixed = pur.purify(r.adversarial)
    assert fixed.lower() == TITLES[target].lower()
    table = list(TITLES)
    table[target] = r.adversarial
    col = np.full((len(TASTES), 1), target)
    attacked = score_fn(table, ALL, col).mean()
    defended = pur.wrap(score_fn)(table, ALL, col).mean()
    assert defended == pytest.approx(target_score(TITLES[target], target)) and defended < attacked
    mixed = pur.transform([r.adversarial, TITLES[3]])
    assert mixed[1] == TITLES[3] and pur.last_transform_["changed"] == 1


def test_purifier_corrects_swaps_deletions_and_punctuation_by_hand():
    from recforge.robustness.text_attack import osa_distance

    assert osa_distance("stroy", "story") == 1 and levenshtein("stroy", "story") == 2  # a swap is one edit
    assert osa_distance("abcdef", "uvwxyz", limit=2) == 3
    pur = TextPurifier().fit(["Toy Story (1995)", "Pete's Dragon (1977)", "Star Wars (1977)", "Stars Fell"])
    assert pur.purify("Toy Stroy (1995)") == "Toy Story (1995)"
    assert pur.purify("Pet's Dragon (1977)") == "Pete's Dragon (1977)"  # next to the title's own apostrophe
    assert pur.purify("S-tar Wa'rs- (1977)") == "Star Wars (1977)"  # inserted hyphens and apostrophes
    assert pur.purify("Stxr wars") == "Star wars"  # case kept from the edited word
    assert pur.purify("Zebra Wars") == "Zebra Wars"  # nothing within the distance: left as it is


def test_purifier_maps_look_alikes_and_cannot_undo_catalogue_words():
    pur = TextPurifier().fit(TITLES[1:])
    assert pur.purify("Ѕtar Lоve") == "Star Love"  # Cyrillic look-alikes
    r = StealthyTextAttack("insert", max_words=2, k=5).attack(7, TITLES, score_fn, ALL)
    assert r.changed and pur.purify(r.adversarial) == r.adversarial  # inserted words are catalogue words


# ---- clear errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    ({"max_words": 0}, "edit budget"), ({"max_words": 1.5}, "edit budget"), ({"max_words": True}, "edit budget"),
    ({"max_char_distance": 0}, "max_char_distance"), ({"min_similarity": 0.8}, "needs a sentence encoder"),
    ({"min_similarity": 2.0, "encoder": ENC}, "min_similarity"), ({"edits": "emoji"}, "choose one or more"),
    ({"edits": "synonym"}, "neighbours"), ({"candidates": 0}, "candidates"), ({"objective": "ctr"}, "objective"),
    ({"goal_gain": 0}, "goal_gain"), ({"word_order": "random"}, "word_order")])
def test_bad_budgets_are_clear_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        StealthyTextAttack(**kw)


def test_unknown_items_and_bad_inputs_are_clear_errors():
    a = StealthyTextAttack("char", k=5)
    for bad in (0, len(TITLES), -2):
        with pytest.raises(ConfigError, match=f"unknown item {bad}"):
            a.attack(bad, TITLES, score_fn, ALL)
    with pytest.raises(ConfigError, match="an item index"):
        a.attack("7", TITLES, score_fn, ALL)
    empty = list(TITLES)
    empty[5] = " "
    with pytest.raises(ConfigError, match="no title"):
        a.attack(5, empty, score_fn, ALL)
    with pytest.raises(ConfigError, match="users"):
        a.attack(7, TITLES, score_fn, np.array([], dtype=int))
    with pytest.raises(ConfigError, match="one row per user"):
        a.attack(7, TITLES, score_fn, ALL, candidates=np.ones((2, 3), dtype=int))
    with pytest.raises(ConfigError, match="outside"):
        a.attack(7, TITLES, score_fn, ALL, candidates=np.array([1, 99]))
    with pytest.raises(ConfigError, match="shape"):
        a.attack(7, TITLES, lambda t, u, i: np.zeros(3), ALL)
    with pytest.raises(ConfigError, match="not fitted"):
        TextPurifier().purify("x")
    with pytest.raises(ConfigError, match="max_distance"):
        TextPurifier(max_distance=0)


def test_catalogue_vocabulary_most_frequent_first_without_stopwords():
    vocab = catalogue_vocabulary(["Star Wars (1977)", "Star Trek", "The star"])
    assert vocab[0] == "Star" and set(vocab) == {"Star", "Wars", "Trek"}  # no stopword, no year


# ---- the scorers ----------------------------------------------------------------------------------------
def test_semantic_model_scorer_matches_llmesr_and_restores_its_vectors(tiny):
    import torch

    from recforge.models import registry
    from recforge.robustness.scorers import SemanticModelScorer, title_table
    from recforge.semantic.text import item_texts

    ds, split, valid, test = tiny
    model = registry.create("llmesr", hidden=16, inner=32, max_len=10, batch_size=128, n_layers=1, epochs=1,
                            encoder="hashing:32", verbose=False, seed=0)
    model.attach_dataset(ds)
    model.fit(split, None)
    titles = title_table(ds)
    scorer = SemanticModelScorer(model, test, item_texts(ds), titles)
    rows = np.arange(6)
    full = model.score(test.histories.slice(0, 6)).numpy().astype(np.float64)
    got = scorer(titles, rows, np.arange(1, ds.n_items + 1))
    hist = [set(test.histories.items[test.histories.indptr[r]:test.histories.indptr[r + 1]]) for r in rows]
    for j in range(6):
        for i in range(1, ds.n_items + 1):
            assert got[j, i - 1] == (-np.inf if i in hist[j] else pytest.approx(full[j, i], rel=1e-5, abs=1e-6))
    target = next(i for i in range(1, ds.n_items + 1) if all(i not in h for h in hist))
    sem_before = model.net_.sem.clone()
    edited = list(titles)
    edited[target] = titles[target] + " " + titles[target % ds.n_items + 1]
    after = scorer(edited, rows, np.arange(1, ds.n_items + 1))
    assert torch.equal(model.net_.sem, sem_before)  # the frozen vectors are restored after the call
    changed = np.flatnonzero((~np.isclose(after, got, rtol=0, atol=1e-9)).any(0)) + 1
    assert changed.tolist() == [target]  # no history holds the target: only its own column moves
    r = StealthyTextAttack("insert", max_words=1, k=10, candidates=4).attack(target, titles, scorer, rows)
    assert r.after["mean_log2_rank"] <= r.before["mean_log2_rank"] and torch.equal(model.net_.sem, sem_before)
    wrong = SemanticModelScorer(model, test, item_texts(ds), titles, encoder="hashing:16")
    with pytest.raises(ConfigError, match="16-dimensional"):
        wrong(edited, rows, np.arange(1, ds.n_items + 1))
    assert torch.equal(model.net_.sem, sem_before)


@pytest.fixture(scope="module")
def llm_setup(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from test_llm import tiny_backbone, write_ml100k

    from recforge import config as C
    from recforge.llm import prompts as P
    from recforge.llm.rella import PromptData, ReLLa
    from recforge.pipeline import load_dataset

    cfg = C.base_config("pop", str(write_ml100k(tmp_path_factory.mktemp("data") / "ml-tiny")))
    cfg["data"]["cache"] = False
    ds = load_dataset(cfg["data"])
    sp = P.temporal_user_split(ds, test_ratio=0.25, like_threshold=4)
    folder = tiny_backbone(tmp_path_factory.mktemp("tiny") / "llama", (ds, sp))
    model = ReLLa(backbone=str(folder), retrieval="recent", k=3, verbose=False, score_batch_size=4)
    data = PromptData(sp, P.PromptFormat())
    model.fit(data)
    return model, data, P.eligible(sp, "test").head(4)


def test_llm_prompt_scorer_matches_the_model_and_caches_prompts(llm_setup):
    from recforge.robustness.scorers import LLMPromptScorer

    model, data, contexts = llm_setup
    scorer = LLMPromptScorer(model, data, contexts)
    titles = list(data.split.titles)
    sp = data.split
    seen = {int(i) for u, t in zip(contexts["user_id"], contexts["timestamp"])
            for i in sp._items[sp.history_rows(u, t)]}
    free = [i for i in range(1, len(titles)) if i not in seen][:3]  # items in no context's history
    items = np.array([free] * len(contexts))
    got = scorer(titles, np.arange(len(contexts)), items)
    frame = contexts[np.repeat(np.arange(len(contexts)), 3)].with_columns(
        __import__("polars").Series("item_id", items.ravel()).cast(contexts.schema["item_id"]))
    _, p = model.predict(data, frame)
    assert got.ravel() == pytest.approx(p)
    n = scorer.prompts_scored
    scorer(titles, np.arange(len(contexts)), items)
    assert scorer.prompts_scored == n  # every prompt came from the cache
    edited = list(titles)
    edited[free[1]] = "Space " + titles[free[1]]
    again = scorer(edited, np.arange(len(contexts)), items)
    assert scorer.prompts_scored == n + n // 3  # only the edited item's prompts (one of three columns) were new
    assert data.split.titles == titles  # the split's titles are restored
    assert again[:, [0, 2]] == pytest.approx(got[:, [0, 2]])
