"""Sequential models: samples, causality, training on Markov-structured synthetic data,
determinism, persistence, scoring raw histories."""

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
from recforge.models.sequential.base import pad_windows, sample_bounds

MODELS = ("sasrec", "gru4rec", "bert4rec", "cl4srec", "duorec")
# small data and short runs; strong first-order structure so that a few epochs suffice
FAST = dict(verbose=False, batch_size=32, lr=0.005, epochs=5, patience=100, threads=1, max_len=20)
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
    torch.set_num_threads(1)
    raw = make_synthetic(n_users=200, n_items=60, seed=0, p_follow=0.9, n_successors=(1, 2), mean_length=15)
    split = leave_one_out(prepare(raw))
    valid = build_evalset(split.history("valid"), split.valid, split.n_users, split.n_items, "valid")
    test = build_evalset(split.history("test"), split.test, split.n_users, split.n_items, "test")
    return split, valid, test


@pytest.fixture(scope="module")
def fitted(data):
    split, valid, _ = data
    return {name: create(name, **TRAIN[name]).fit(split, valid) for name in MODELS}


def ndcg(model, evalset):
    return evaluate(model, evalset, ks=[10], groups=False).metrics["ndcg@10"]


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
    m = create(name, max_len=8, verbose=False, **kw)
    m.n_users_, m.n_items_ = 5, 20
    torch.manual_seed(0)
    m.net_ = m.build(5, 20)
    m.net_.eval()
    return m


@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_causality(name):
    m = built(name)
    seqs = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        base = m.encode(seqs)
        changed = seqs.clone()
        changed[:, 5:] = torch.tensor([11, 12, 13])  # perturb the future of position 4
        out = m.encode(changed)
    assert torch.allclose(base[:, :5], out[:, :5], atol=1e-6)
    assert not torch.allclose(base[:, 5:], out[:, 5:])


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "bert4rec"])
def test_padding_does_not_matter(name):
    m = built(name)
    seqs = torch.tensor([[0, 0, 0, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        both = m.encode(seqs)
        alone = m.encode(seqs[:1, 3:])  # the first row without its padding
    assert torch.allclose(both[0, 3:], alone[0], atol=1e-5)
    assert float(both[0, :3].abs().max()) == 0.0  # padded positions output zeros


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_rows_of_many_lengths(name):
    # rows are split into attention groups by length (widths 8, 16, 32, 40): every row must
    # still get exactly what it gets alone
    m = create(name, max_len=40, hidden=16, n_heads=2, inner=32, verbose=False)
    m.n_users_, m.n_items_ = 5, 99
    torch.manual_seed(0)
    m.net_ = m.build(5, 99)
    m.net_.eval()
    g = torch.Generator().manual_seed(1)
    lengths = [0, 1, 3, 8, 9, 15, 17, 33, 40, 5]
    seqs = torch.zeros(len(lengths), 40, dtype=torch.long)
    for r, n in enumerate(lengths):
        if n:
            seqs[r, 40 - n :] = torch.randint(1, 100, (n,), generator=g)
    with torch.no_grad():
        out = m.encode(seqs)
        for r, n in enumerate(lengths):
            if n:
                assert torch.allclose(m.encode(seqs[r : r + 1, 40 - n :])[0], out[r, 40 - n :], atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_score_shapes_and_empty_history(name):
    m = built(name)
    hist = Histories.from_lists([-1, -1, 0], [[1, 2, 3], [], list(range(1, 20))], 20)
    with torch.no_grad():
        s = m.score(hist)
    assert s.shape == (3, 21)
    assert torch.isfinite(s).all()


def test_bert4rec_appends_mask():
    m = built("bert4rec")
    seqs = m.score_input(Histories.from_lists([0], [list(range(1, 15))], 20))
    assert seqs.shape == (1, 8) and seqs[0, -1] == 21 and seqs[0, -2] == 14


# ---- training -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_beats_popularity(data, fitted, name):
    split, _, test = data
    pop = ndcg(create("pop").fit(split), test)
    assert ndcg(fitted[name], test) > pop + 0.05


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
    split, valid, test = data
    kw = FAST | dict(epochs=2, seed=7)
    a = create(name, **kw).fit(split, valid)
    b = create(name, **kw).fit(split, valid)
    assert ndcg(a, test) == ndcg(b, test)
    hist = test.histories.slice(0, 20)
    with torch.no_grad():
        assert torch.equal(a.score(hist), b.score(hist))


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip(data, fitted, name, tmp_path):
    _, _, test = data
    m = fitted[name]
    m.save(tmp_path / name)
    back = Recommender.load(tmp_path / name)
    assert type(back) is type(m) and back.get_params() == m.get_params()
    hist = test.histories.slice(0, 30)
    with torch.no_grad():
        assert torch.equal(m.score(hist), back.score(hist))


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
