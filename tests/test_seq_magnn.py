"""MA-GNN: the window graph, causality, padding, the user path, the gate, the bilinear
co-occurrence term, training on Markov-structured synthetic data, determinism, persistence."""

import numpy as np
import pytest
import torch

from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.models.registry import create
from recforge.models.sequential.magnn import window_adjacency
from seq_contract import (FAST, PADDED, assert_beats_popularity, assert_causal, assert_deterministic,
                          assert_padding_free, assert_round_trip, assert_scores, markov_data, unfitted)

# The synthetic task is first-order Markov (the next item follows the last one), which a mean over a
# long window dilutes: a 3-item window learns it in a few epochs.
FAST = FAST | dict(window=3)


@pytest.fixture(scope="module")
def data():
    return markov_data()


@pytest.fixture(scope="module")
def fitted(data):
    split, valid, _ = data
    return create("magnn", **FAST).fit(split, valid)


def built(**kw):
    return unfitted("magnn", **(dict(max_len=8, window=3, hidden=16, n_heads=4, memory_size=5, verbose=False) | kw))


USERS = torch.tensor([0, 3])


# ---- the window graph -----------------------------------------------------------------------
def test_window_adjacency_hand_made():
    # a window of five items, each linked with its next two (both directions), rows normalised
    a = window_adjacency(torch.tensor([[7, 3, 9, 3, 5]]), neighbors=2)[0]
    links = torch.tensor([[0, 1, 1, 0, 0],
                          [1, 0, 1, 1, 0],
                          [1, 1, 0, 1, 1],
                          [0, 1, 1, 0, 1],
                          [0, 0, 1, 1, 0]], dtype=torch.float32)
    assert torch.allclose(a, links / links.sum(1, keepdim=True))
    # the paper's three neighbours on a six-item window
    a3 = window_adjacency(torch.arange(1, 7).unsqueeze(0), neighbors=3)[0]
    assert (a3 > 0).sum(1).tolist() == [3, 4, 5, 5, 4, 3]
    assert torch.equal(a3 > 0, (a3 > 0).T)
    assert torch.allclose(a3.sum(1), torch.ones(6))


def test_window_adjacency_at_the_start_of_a_sequence():
    # the first positions of a sequence have windows padded on the left: no edge to padding
    a = window_adjacency(torch.tensor([[0, 0, 4, 6], [0, 0, 0, 2]]), neighbors=3)
    assert torch.equal(a[0, :2], torch.zeros(2, 4)) and torch.equal(a[0, :, :2], torch.zeros(4, 2))
    assert torch.allclose(a[0, 2:, 2:], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert float(a[1].abs().sum()) == 0.0  # one item: no neighbour


# ---- architecture ---------------------------------------------------------------------------
def test_causality():
    m = built()
    assert_causal(lambda seqs: m.encode(seqs, USERS))


def test_long_term_items_reach_the_output():
    # window 3: the item 5 positions back is outside the window and only reaches the last
    # output through the long-term attention and the memory
    m = built()
    seqs = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        base = m.encode(seqs, USERS[:1])[0, -1]
        changed = seqs.clone()
        changed[0, 2] = 15
        out = m.encode(changed, USERS[:1])[0, -1]
    assert not torch.allclose(base, out)


def test_padding_does_not_matter():
    assert_padding_free(built().encode, PADDED, USERS)


def test_score_shapes_empty_history_and_unknown_users():
    m = built()
    s = assert_scores(m, [-1, -1, 0, 3, 99], [[1, 2, 3], [], list(range(1, 20)), [], [1, 2, 3]], 20)
    assert float(s[1].abs().max()) == 0.0  # unknown user, no history: nothing to score with
    q = m.output_table()
    assert torch.allclose(s[3], m.net_.user.weight[3] @ q.T)  # known user, no history: general interest
    assert torch.equal(s[4], s[0])  # an index outside the trained users is an unknown user


def test_unknown_user_is_a_zero_user_embedding():
    m = built()
    seqs = [[4, 9, 2, 7, 1, 3, 5]]
    known = m.score(Histories.from_lists([2], seqs, 20))
    unknown = m.score(Histories.from_lists([-1], seqs, 20))
    assert not torch.allclose(known, unknown)  # the user embedding is used where the user is known
    with torch.no_grad():
        m.net_.user.weight[2].zero_()
    assert torch.allclose(m.score(Histories.from_lists([2], seqs, 20)), unknown, atol=1e-6)


def test_gate_in_unit_interval(fitted, data):
    _, _, test = data
    hist = test.histories.slice(0, 50)
    seqs = fitted.score_input(hist)
    users = fitted.score_users(hist)
    with torch.no_grad():
        for last_only in (False, True):
            gate = fitted.net_.parts(seqs, users, last_only=last_only)["gate"]
            assert gate.numel() > 0 and float(gate.min()) >= 0.0 and float(gate.max()) <= 1.0
            assert 0.0 < float(gate.mean()) < 1.0


def test_last_position_scoring_matches_the_full_encoder(fitted, data):
    _, _, test = data
    hist = test.histories.slice(0, 40)
    seqs, users = fitted.score_input(hist), fitted.score_users(hist)
    with torch.no_grad():
        full = fitted.encode(seqs, users)[:, -1]
        last = fitted.net_.last(seqs, users)
    assert torch.allclose(full, last, atol=1e-5)


def test_bilinear_term_changes_scores():
    m = built()
    hist = Histories.from_lists([1, -1], [[4, 9, 2, 7, 1, 3, 5], [6, 8]], 20)
    with_co = m.score(hist)
    weight = m.net_.co.weight.detach().clone()
    with torch.no_grad():
        m.net_.co.weight.zero_()
    without = m.score(hist)
    assert not torch.allclose(with_co, without)
    # the difference is the paper's (1/|L|) Σ_{i in window} e_iᵀ Wr q_j, for every item j at once
    e, q = m.net_.item.weight.detach(), m.output_table().detach()
    wr = weight.T
    for row, window in enumerate(([1, 3, 5], [6, 8])):
        expected = torch.stack([e[i] @ wr @ q.T for i in window]).mean(0)
        assert torch.allclose(with_co[row] - without[row], expected, atol=1e-5)
    off = built(co_occurrence=False)
    assert float(off.net_.parts(torch.tensor([[0, 3, 4, 5]]), torch.tensor([0]))["co"].abs().max()) == 0.0


# ---- training -------------------------------------------------------------------------------
def test_beats_popularity(data, fitted):
    assert_beats_popularity(fitted, data)


def test_bpr_trains(data):
    split, valid, _ = data
    m = create("magnn", **(FAST | dict(epochs=1)), loss="bpr", n_negatives=2).fit(split, valid)
    assert np.isfinite(m.history_["epochs"][0]["loss"])
    notes = m.protocol_notes()
    assert notes["loss"] == "bpr" and notes["n_negatives"] == 2 and m.get_params()["loss"] == "bpr"


def test_deterministic_by_seed(data):
    assert_deterministic("magnn", FAST | dict(epochs=2, seed=7), data)


def test_save_load_round_trip(data, fitted, tmp_path):
    assert_round_trip(fitted, data[2], tmp_path / "magnn")


def test_protocol_notes(fitted):
    notes = fitted.protocol_notes()
    assert notes["subsequence_split"] == "none" and notes["loss"] == "ce"


@pytest.mark.parametrize("bad", [dict(window=0), dict(window=30, max_len=20), dict(graph_neighbors=0),
                                 dict(gnn_layers=-1), dict(n_heads=0), dict(memory_size=0), dict(hidden=0),
                                 dict(dropout=1.0), dict(loss="hinge"), dict(subseq="sometimes")])
def test_bad_parameters(bad):
    with pytest.raises(ConfigError):
        create("magnn", **bad)
