"""Sequential models: samples, causality, training on Markov-structured synthetic data,
determinism, persistence, scoring raw histories."""

import numpy as np
import pytest

from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.models.registry import create
from recforge.models.sequential.base import pad_windows, sample_bounds
from seq_contract import (FAST, PADDED, assert_beats_popularity, assert_causal, assert_deterministic,
                          assert_padding_free, assert_round_trip, assert_rows_alone, assert_scores, markov_data,
                          rows_of_many_lengths, unfitted)

MODELS = ("sasrec", "gru4rec", "bert4rec", "cl4srec", "duorec")
TRAIN = {
    "sasrec": FAST,
    "gru4rec": FAST,
    # masked-item training learns slowly: more epochs, gentler rate (post-LN), less dropout
    "bert4rec": FAST | dict(lr=0.002, epochs=25, eval_every=5, dropout=0.1, mask_prob=0.4, batch_size=16),
    "cl4srec": FAST,
    "duorec": FAST,
}


@pytest.fixture(scope="module")
def data():
    return markov_data()


@pytest.fixture(scope="module")
def fitted(data):
    split, valid, _ = data
    return {name: create(name, **TRAIN[name]).fit(split, valid) for name in MODELS}



# ---- samples ------------------------------------------------------------------------------
def test_sample_bounds_counts_and_targets():
    lengths = np.array([0, 1, 2, 5, 12])
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    items = np.arange(1, indptr[-1] + 1)
    max_len = 4
    u, s, e = sample_bounds(indptr, max_len, "none")
    assert u.tolist() == [2, 3, 4] and np.all(e - s <= max_len + 1)
    u, s, e = sample_bounds(indptr, max_len, "prefix")
    assert len(u) == 1 + 4 + 11  # one per target
    assert sorted(items[e - 1].tolist()) == sorted(np.concatenate([items[indptr[k] + 1 : indptr[k + 1]] for k in (2, 3, 4)]).tolist())
    u, s, e = sample_bounds(indptr, max_len, "window")
    assert np.bincount(u, minlength=5).tolist() == [0, 0, 1, 1, 3]  # ceil((L - 1) / max_len)
    # windows tile the targets of a user exactly once
    m = pad_windows(items, s, e, max_len + 1)
    inp, tgt = m[:, :-1], m[:, 1:].copy()
    tgt[inp == 0] = 0
    got = sorted(tgt[u == 4][tgt[u == 4] > 0].tolist())
    assert got == items[indptr[4] + 1 : indptr[5]].tolist()


def test_pad_windows():
    values = np.array([5, 6, 7, 8, 9])
    out = pad_windows(values, np.array([0, 3, 4]), np.array([2, 5, 4]), 3)
    assert out.tolist() == [[0, 5, 6], [0, 8, 9], [0, 0, 0]]


@pytest.mark.parametrize("mode", ["none", "prefix", "window"])
def test_subseq_modes_sample_counts(data, mode):
    split, _, _ = data
    indptr, _ = split.train_sequences
    lengths = np.diff(indptr)
    lengths = lengths[lengths >= 2]
    m = create("sasrec", subseq=mode, max_len=5, verbose=False)
    m.n_users_, m.n_items_ = split.n_users, split.n_items
    m.prepare_fit(split)
    expected = {"none": len(lengths), "prefix": int((lengths - 1).sum()), "window": int((-(-(lengths - 1) // 5)).sum())}
    assert len(m._samples) == expected[mode]
    batch = m.make_batch(np.arange(len(m._samples)), np.random.default_rng(0))
    n_targets = int((batch["tgt"] > 0).sum())
    expected_targets = {
        "none": int((np.minimum(lengths, 6) - 1).sum()),  # every position of the last 6 items
        "prefix": int((lengths - 1).sum()),  # the last position of every prefix
        "window": int((lengths - 1).sum()),  # every target exactly once
    }
    assert n_targets == expected_targets[mode]
    assert m.protocol_notes()["subsequence_split"] == mode


# ---- architecture ---------------------------------------------------------------------------
def built(name, **kw):
    return unfitted(name, max_len=8, verbose=False, **kw)


@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_causality(name):
    assert_causal(built(name).encode)


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "bert4rec"])
def test_padding_does_not_matter(name):
    assert_padding_free(built(name).encode, PADDED)


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_rows_of_many_lengths(name):
    # rows are split into attention groups by length (widths 8, 16, 32, 40): every row must
    # still get exactly what it gets alone
    m = unfitted(name, 5, 99, max_len=40, hidden=16, n_heads=2, inner=32, verbose=False)
    lengths, seqs, _ = rows_of_many_lengths()
    assert_rows_alone(m.encode, lengths, seqs)


@pytest.mark.parametrize("name", MODELS)
def test_score_shapes_and_empty_history(name):
    assert_scores(built(name), [-1, -1, 0], [[1, 2, 3], [], list(range(1, 20))], 20)


def test_bert4rec_appends_mask():
    m = built("bert4rec")
    seqs = m.score_input(Histories.from_lists([0], [list(range(1, 15))], 20))
    assert seqs.shape == (1, 8) and seqs[0, -1] == 21 and seqs[0, -2] == 14


# ---- training -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_beats_popularity(data, fitted, name):
    assert_beats_popularity(fitted[name], data)


def test_losses_train(data):
    split, valid, _ = data
    for loss in ("bce", "sampled_softmax", "gbce"):
        m = create("sasrec", **(FAST | dict(epochs=1)), loss=loss, n_negatives=8).fit(split, valid)
        assert np.isfinite(m.history_["epochs"][0]["loss"])
        notes = m.protocol_notes()
        assert notes["loss"] == loss and notes["n_negatives"] == 8


def test_ticoserec_views_train(data):
    split, valid, _ = data
    m = create("cl4srec", **(FAST | dict(epochs=1)), augment="ticoserec").fit(split, valid)
    assert np.isfinite(m.history_["epochs"][0]["loss"])
    assert m.protocol_notes()["augment"] == "ticoserec"
    assert 0 < m._augment_rows.mean() < 1  # the most uniform share is left as it is


@pytest.mark.parametrize("name", ["sasrec", "cl4srec"])
def test_deterministic_by_seed(data, name):
    assert_deterministic(name, FAST | dict(epochs=2, seed=7), data)


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip(data, fitted, name, tmp_path):
    assert_round_trip(fitted[name], data[2], tmp_path / name)


def test_recommend_raw_history(fitted):
    m = fitted["sasrec"]
    hist = Histories.from_lists([-1], [[3, 7, 9]], m.n_items_)
    idx, scores = m.recommend(hist, k=5)
    assert idx.shape == (1, 5) and not set(idx[0]) & {0, 3, 7, 9}
    same = Histories.from_lists([12345], [[3, 7, 9]], m.n_items_)  # user ids are never used
    assert np.array_equal(m.recommend(same, k=5)[0], idx)


def test_duorec_positives_share_the_next_item(fitted):
    m = fitted["duorec"]
    rows = np.arange(len(m._samples))
    pos = m.positives(rows, np.random.default_rng(0))
    last = m._samples[:, -1]
    assert np.array_equal(last[pos], last)
    alone = m._group_size[rows] == 1
    assert np.array_equal(pos[alone], rows[alone]) and np.all(pos[~alone] != rows[~alone])


def test_protocol_notes_and_params(fitted):
    for name, m in fitted.items():
        notes = m.protocol_notes()
        assert notes["subsequence_split"] == "none" and notes["loss"] == "ce"
        assert m.get_params()["loss"] == "ce"
    assert fitted["cl4srec"].protocol_notes()["augment"] == "cl4srec"


def test_bad_parameters():
    with pytest.raises(ConfigError):
        create("sasrec", loss="hinge")
    with pytest.raises(ConfigError):
        create("sasrec", subseq="sometimes")
    with pytest.raises(ConfigError):
        create("cl4srec", augment="shuffle")
    with pytest.raises(ConfigError):
        create("sasrec", hidden=64, n_heads=3)
