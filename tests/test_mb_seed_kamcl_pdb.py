"""KAMCL (knowledge-aware multi-intent contrastive learning) and PDB4Rec (purity and diversity in the
frequency domain): their distinctive pieces by hand (relation graphs, the contrast across intents,
the low/high band split, the training windows), both beat popularity on the synthetic funnel,
persistence, raw and fresh histories, the search spaces, the run folder and the refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from mb_contract import assert_beats_popularity, assert_raw_histories_score, assert_round_trip, ndcg
from recforge.cli import main
from recforge.data.knowledge import Knowledge, build_knowledge
from recforge.data.prepare import prepare
from recforge.data.split import Split, leave_one_out
from recforge.data.synthetic import make_synthetic
from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.models.multibehavior.kamcl import intent_contrast, relation_graph
from recforge.models.multibehavior.pdb4rec import PDB4Rec, band_split, low_bins
from recforge.models.registry import create
from recforge.pipeline import eval_sets
from recforge.tuning import load_space

FAST = {"kamcl": dict(dim=32, lr=0.01, epochs=150, batch_size=1024, eval_every=5, patience=5),
        "pdb4rec": dict(hidden=32, lr=0.003, epochs=8, batch_size=64, eval_every=2, patience=3, max_len=30, subseq="target")}


@pytest.fixture(scope="module")
def mb():
    """The synthetic funnel (400 users, 200 items), leave-one-out on purchases, with co-interaction
    and category relations: (split, valid, test)."""
    ds = prepare(make_synthetic(n_users=400, n_items=200, seed=0, behaviors=True))
    split = leave_one_out(ds, target_behavior="buy")
    split.knowledge = build_knowledge("co-interaction,category", ds, split.train)
    valid, test = eval_sets(split, None, "buy")
    return split, valid, test


_ndcg = ndcg


@pytest.fixture(scope="module")
def fitted(mb):
    split, valid, _ = mb
    return {name: create(name, verbose=False, device="cpu", seed=0, threads=1, **kw).fit(split, valid)
            for name, kw in FAST.items()}


# ---- distinctive pieces by hand ------------------------------------------------------------------
def test_band_split_by_hand():
    # an impulse at t=0 of a 6-row window has every DFT coefficient equal to 1: with 2 low bins the
    # low band is the mean plus the first harmonic, 1/6 + 2/6 cos(2πt/6); the high band the rest
    x = torch.zeros(1, 6, 1)
    x[0, 0, 0] = 1.0
    low, high = band_split(x, 2)
    t = torch.arange(6, dtype=torch.float32)
    expected = 1 / 6 + 2 / 6 * torch.cos(2 * math.pi * t / 6)
    torch.testing.assert_close(low[0, :, 0], expected)
    torch.testing.assert_close(high[0, :, 0], x[0, :, 0] - expected)
    # identity filters: the two bands sum back to the input, for any sequence and split
    y = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(0))
    for c in (1, 2, 3):
        lo, hi = band_split(y, c)
        torch.testing.assert_close(lo + hi, y)
    # one low bin keeps the mean over time; a filter of 2 on it doubles the low band only
    lo, hi = band_split(y, 1, w_low=torch.full((1, 4), 2.0, dtype=torch.complex64))
    torch.testing.assert_close(lo, 2 * y.mean(1, keepdim=True).expand_as(y))
    torch.testing.assert_close(hi, y - y.mean(1, keepdim=True))
    # bins of the low band: a share of max_len // 2 + 1, at least one, never all
    assert (low_bins(6, 0.5), low_bins(50, 0.25), low_bins(2, 0.9), low_bins(50, 0.01)) == (2, 6, 1, 1)


def test_intent_contrast_by_hand():
    # one user, two orthonormal intents seen identically by both behaviours: each intent's positive
    # has cosine 1, its negative (the other intent) cosine 0
    e = torch.eye(2).unsqueeze(0)
    tau = 0.5
    assert float(intent_contrast(e, e, tau)) == pytest.approx(math.log(math.exp(2.0) + 1.0) - 2.0, rel=1e-6)
    # swapping the intents of one view makes every positive the orthogonal one
    assert float(intent_contrast(e, e.flip(1), tau)) == pytest.approx(math.log(math.exp(2.0) + 1.0), rel=1e-6)


def test_relation_graph_by_hand():
    # items 1..3, entity 4 (a category); co_view 1-2, 1-3 (one direction given); 2 belongs to 4
    triples = pl.DataFrame({"head": [1, 1, 2], "relation": ["co_view", "co_view", "belongs_to"], "tail": [2, 3, 4]},
                           schema={"head": pl.Int32, "relation": pl.Utf8, "tail": pl.Int64})
    kn = Knowledge(triples, pl.DataFrame({"node": [4], "kind": ["category"], "raw": ["c"]}), n_items=3)
    co = relation_graph(kn, "co_view").toarray()
    np.testing.assert_allclose(co[1], [0, 0, 0.5, 0.5, 0])  # item 1 averages over 2 and 3
    np.testing.assert_allclose(co[2], [0, 1, 0, 0, 0])  # and each links back to 1
    np.testing.assert_allclose(co[4], 0)
    cat = relation_graph(kn, "belongs_to").toarray()
    np.testing.assert_allclose(cat[2], [0, 0, 0, 0, 1])
    np.testing.assert_allclose(cat[4], [0, 0, 1, 0, 0])  # the category is updated from its item


def _tiny_split() -> Split:
    # user 0: view 5, view 6, buy 6, view 7, buy 7, view 8; user 1: view 2, buy 3
    rows = [(0, 5, "view"), (0, 6, "view"), (0, 6, "buy"), (0, 7, "view"), (0, 7, "buy"), (0, 8, "view"),
            (1, 2, "view"), (1, 3, "buy")]
    train = pl.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                          "timestamp": list(range(len(rows))), "behavior": [r[2] for r in rows]},
                         schema={"user_id": pl.Int32, "item_id": pl.Int32, "timestamp": pl.Int64, "behavior": pl.Utf8})
    empty = train.clear()
    return Split(train, empty, empty, n_users=2, n_items=9, protocol={"target_behavior": "buy"})


def test_pdb4rec_training_windows_by_hand():
    split = _tiny_split()  # behaviour codes: buy 1, view 2
    m = PDB4Rec(max_len=3, subseq="target", verbose=False)
    m.prepare_fit(split)
    # a window before every purchase, its last row's next purchase as the target
    assert m._inp.tolist() == [[0, 5, 6], [6, 6, 7], [0, 0, 2]] and m._tgt.tolist() == [6, 7, 3]
    assert m._beh.tolist() == [[0, 2, 2], [2, 1, 2], [0, 0, 2]]  # view 6, buy 6, view 7
    m = PDB4Rec(max_len=3, subseq="none", verbose=False)
    m.prepare_fit(split)
    assert m._inp.tolist() == [[6, 6, 7], [0, 0, 2]] and m._tgt.tolist() == [7, 3]
    m = PDB4Rec(max_len=3, subseq="prefix", verbose=False)
    m.prepare_fit(split)
    # every row with a later purchase of the same user (view 8 has none, nor the buys that end a user)
    assert m._tgt.tolist() == [6, 6, 7, 7, 3]
    assert m._inp[:, -1].tolist() == [5, 6, 6, 7, 2]


# ---- accuracy, persistence ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kamcl", "pdb4rec"])
def test_beats_popularity_on_the_funnel(mb, fitted, name):
    split, _, test = mb
    assert_beats_popularity(fitted[name], split, test)


@pytest.mark.parametrize("name", ["kamcl", "pdb4rec"])
def test_save_load_round_trip(mb, fitted, name, tmp_path):
    _, _, test = mb
    loaded = assert_round_trip(fitted[name], test, tmp_path / name)
    assert loaded.protocol_notes()["target_behavior"] == "buy"


def test_kamcl_uses_every_relation(fitted):
    notes = fitted["kamcl"].protocol_notes()
    assert {"co_view", "co_cart", "belongs_to"} <= set(notes["relations_used"])
    assert all(n > 0 for n in notes["relations_used"].values())
    # each intent is a distribution over the relations used
    assert len(notes["intent_relations"]) == 4
    assert all(abs(sum(row.values()) - 1.0) < 1e-2 for row in notes["intent_relations"])


@pytest.mark.parametrize("name", ["kamcl", "pdb4rec"])
def test_raw_histories_without_behaviours(mb, fitted, name):
    """recommend / serving pass raw histories (no behaviours; an unknown user is -1)."""
    assert_raw_histories_score(fitted[name], mb[2])


@pytest.mark.parametrize("name", ["kamcl", "pdb4rec"])
def test_fresh_events_change_the_scores(mb, fitted, name):
    """The user side is built from the ranking-time history: a new view changes the scores."""
    _, _, test = mb
    h = test.histories.slice(0, 1)
    items, behs = h.items.tolist(), list(h.behaviors)
    new = next(i for i in range(1, h.n_items + 1) if i not in items)
    before = Histories.from_lists(h.users, [items], h.n_items, [behs])
    after = Histories.from_lists(h.users, [items + [new]], h.n_items, [behs + ["view"]])
    assert not torch.allclose(fitted[name].score(before), fitted[name].score(after))


def test_search_spaces_construct_every_bound():
    for name in ("kamcl", "pdb4rec"):
        assert load_space(name)  # builds the model with every bound and choice


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kamcl", "pdb4rec"])
def test_refuses_data_without_behaviours_or_target(name):
    plain = leave_one_out(prepare(make_synthetic(n_users=60, n_items=40, seed=1)))
    with pytest.raises(ConfigError, match="no behaviour column"):
        create(name, verbose=False, epochs=1).fit(plain)
    untargeted = leave_one_out(prepare(make_synthetic(n_users=60, n_items=40, seed=1, behaviors=True)))
    with pytest.raises(ConfigError, match="data.target_behavior=NAME"):
        create(name, verbose=False, epochs=1).fit(untargeted)


def test_kamcl_refuses_missing_or_empty_knowledge():
    ds = prepare(make_synthetic(n_users=60, n_items=40, seed=1, behaviors=True))
    split = leave_one_out(ds, target_behavior="buy")
    with pytest.raises(ConfigError, match="data.knowledge=co-interaction"):
        create("kamcl", verbose=False, epochs=1).fit(split)
    split.knowledge = build_knowledge("co-interaction:1000", ds, split.train)  # no pair is shared that often
    with pytest.raises(ConfigError, match="no triple"):
        create("kamcl", verbose=False, epochs=1).fit(split)


def test_bad_hyper_parameters_are_refused():
    with pytest.raises(ConfigError, match="cutoff"):
        create("pdb4rec", cutoff=1.0)
    with pytest.raises(ConfigError, match="subseq"):
        create("pdb4rec", subseq="every")
    with pytest.raises(ConfigError, match="max_len"):
        create("pdb4rec", max_len=1)
    with pytest.raises(ConfigError, match="n_intents"):
        create("kamcl", n_intents=0)
    with pytest.raises(ConfigError, match="temperature"):
        create("kamcl", temperature=0.0)


# ---- the run folder ------------------------------------------------------------------------------------
def test_cli_run_folder_records_the_knowledge_used(tmp_path):
    out = tmp_path / "runs"
    assert main(["train", "kamcl", "--data", "synthetic-mb", "data.target_behavior=buy", "data.knowledge=co-interaction",
                 "epochs=2", "dim=16", "threads=1", "--out", str(out), "--quiet"]) == 0
    (run,) = out.iterdir()
    protocol = json.loads((run / "metrics.json").read_text())["protocol"]
    assert protocol["knowledge"]["used_by_model"] is True
    assert set(protocol["relations_used"]) == {"co_buy", "co_cart", "co_view"}
