"""MA-GNN: the window graph, causality, padding, the user path, the gate, the bilinear
co-occurrence term, training on Markov-structured synthetic data, determinism, persistence."""

import numpy as np
import pytest
import torch

from recforge.data.prepare import prepare
from recforge.data.split import leave_one_out
from recforge.data.synthetic import make_synthetic
from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories, build_evalset
from recforge.evaluation.evaluator import evaluate
from recforge.models.base import Recommender
from recforge.models.registry import create
from recforge.models.sequential.magnn import window_adjacency

# small data and short runs. The synthetic task is first-order Markov (the next item follows the
# last one), which a mean over a long window dilutes: a 3-item window learns it in a few epochs.
FAST = dict(verbose=False, batch_size=32, lr=0.005, epochs=5, patience=100, threads=1, max_len=20, window=3)


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    raw = make_synthetic(n_users=200, n_items=60, seed=0, p_follow=0.9, n_successors=(1, 2), mean_length=15)
    split = leave_one_out(prepare(raw))
    valid = build_evalset(split.history("valid"), split.valid, split.n_users, split.n_items, "valid")
    test = build_evalset(split.history("test"), split.test, split.n_users, split.n_items, "test")
    return split, valid, test


@pytest.fixture(scope="module")
def fitted(data):
    split, valid, _ = data
    return create("magnn", **FAST).fit(split, valid)


def ndcg(model, evalset):
    return evaluate(model, evalset, ks=[10], groups=False).metrics["ndcg@10"]


def built(**kw):
    m = create("magnn", **(dict(max_len=8, window=3, hidden=16, n_heads=4, memory_size=5, verbose=False) | kw))
    m.n_users_, m.n_items_ = 5, 20
    torch.manual_seed(0)
    m.net_ = m.build(5, 20)
    m.net_.eval()
    return m


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
    seqs = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        base = m.encode(seqs, USERS)
        changed = seqs.clone()
        changed[:, 5:] = torch.tensor([11, 12, 13])  # perturb the future of position 4
        out = m.encode(changed, USERS)
    assert torch.allclose(base[:, :5], out[:, :5], atol=1e-6)
    assert not torch.allclose(base[:, 5:], out[:, 5:])


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
    m = built()
    seqs = torch.tensor([[0, 0, 0, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        both = m.encode(seqs, USERS)
        alone = m.encode(seqs[:1, 3:], USERS[:1])  # the first row without its padding
    assert torch.allclose(both[0, 3:], alone[0], atol=1e-5)
    assert float(both[0, :3].abs().max()) == 0.0  # padded positions output zeros


def test_score_shapes_empty_history_and_unknown_users():
    m = built()
    hist = Histories.from_lists([-1, -1, 0, 3, 99], [[1, 2, 3], [], list(range(1, 20)), [], [1, 2, 3]], 20)
    s = m.score(hist)
    assert s.shape == (5, 21) and torch.isfinite(s).all()
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
    split, _, test = data
    pop = ndcg(create("pop").fit(split), test)
    assert ndcg(fitted, test) > pop + 0.05


def test_bpr_trains(data):
    split, valid, _ = data
    m = create("magnn", **(FAST | dict(epochs=1)), loss="bpr", n_negatives=2).fit(split, valid)
    assert np.isfinite(m.history_["epochs"][0]["loss"])
    notes = m.protocol_notes()
    assert notes["loss"] == "bpr" and notes["n_negatives"] == 2 and m.get_params()["loss"] == "bpr"


def test_deterministic_by_seed(data):
    split, valid, test = data
    kw = FAST | dict(epochs=2, seed=7)
    a = create("magnn", **kw).fit(split, valid)
    b = create("magnn", **kw).fit(split, valid)
    assert ndcg(a, test) == ndcg(b, test)
    hist = test.histories.slice(0, 20)
    assert torch.equal(a.score(hist), b.score(hist))


def test_save_load_round_trip(data, fitted, tmp_path):
    _, _, test = data
    fitted.save(tmp_path / "magnn")
    back = Recommender.load(tmp_path / "magnn")
    assert type(back) is type(fitted) and back.get_params() == fitted.get_params()
    hist = test.histories.slice(0, 30)
    assert torch.equal(fitted.score(hist), back.score(hist))


def test_protocol_notes(fitted):
    notes = fitted.protocol_notes()
    assert notes["subsequence_split"] == "none" and notes["loss"] == "ce"


@pytest.mark.parametrize("bad", [dict(window=0), dict(window=30, max_len=20), dict(graph_neighbors=0),
                                 dict(gnn_layers=-1), dict(n_heads=0), dict(memory_size=0), dict(hidden=0),
                                 dict(dropout=1.0), dict(loss="hinge"), dict(subseq="sometimes")])
def test_bad_parameters(bad):
    with pytest.raises(ConfigError):
        create("magnn", **bad)
