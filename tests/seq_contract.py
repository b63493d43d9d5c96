"""Checks every sequential model passes, shared by their test files: the Markov-structured synthetic
task (``markov_data``, which each file wraps in its own module-scoped fixture), NDCG@10 on it, an
unfitted model with its network built on a small catalogue, causality (changing future items never
changes earlier outputs), padding that does not matter, finite scores of the right shape, beating
popularity, determinism by seed and a save/load round trip."""

from __future__ import annotations

import torch

from recforge.data.prepare import prepare
from recforge.data.split import leave_one_out
from recforge.data.synthetic import make_synthetic
from recforge.evaluation.batch import Histories, build_evalset
from recforge.evaluation.evaluator import evaluate
from recforge.models.base import Recommender
from recforge.models.registry import create

# small data and short runs; strong first-order structure so that a few epochs suffice
FAST = dict(verbose=False, batch_size=32, lr=0.005, epochs=5, patience=100, threads=1, max_len=20)

#: two rows of 8 positions, the first left-padded (``assert_padding_free``'s usual input)
PADDED = torch.tensor([[0, 0, 0, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])


# ---- the task -------------------------------------------------------------------------------
def synthetic():
    """Raw synthetic data whose next item follows the last one with probability 0.9."""
    return make_synthetic(n_users=200, n_items=60, seed=0, p_follow=0.9, n_successors=(1, 2), mean_length=15)


def evalsets(split):
    """The validation and test sets of ``split``."""
    valid = build_evalset(split.history("valid"), split.valid, split.n_users, split.n_items, "valid")
    test = build_evalset(split.history("test"), split.test, split.n_users, split.n_items, "test")
    return valid, test


def markov_data():
    """(split, valid, test): the synthetic data split leave-one-out, torch on one thread."""
    torch.set_num_threads(1)
    split = leave_one_out(prepare(synthetic()))
    return (split, *evalsets(split))


def ndcg(model, evalset) -> float:
    return evaluate(model, evalset, ks=[10], groups=False).metrics["ndcg@10"]


# ---- an unfitted model ----------------------------------------------------------------------
def unfitted(name, n_users=5, n_items=20, setup=None, **params):
    """A ``name`` model created with ``params``, its network built for ``n_users`` users and
    ``n_items`` items under torch seed 0, in eval mode; ``setup(model)`` runs just before the
    build (for state the network reads)."""
    m = create(name, **params)
    m.n_users_, m.n_items_ = n_users, n_items
    if setup is not None:
        setup(m)
    torch.manual_seed(0)
    m.net_ = m.build(n_users, n_items)
    m.net_.eval()
    return m


# ---- architecture ---------------------------------------------------------------------------
def assert_causal(encode, times=None):
    """``encode(seqs)`` (``encode(seqs, times)`` given ``times``) on two rows of 8 positions, the
    first left-padded: replacing the items after position 4 (and moving their timestamps later)
    leaves the outputs up to position 4 as they were and changes the later ones."""
    seqs = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    changed = seqs.clone()
    changed[:, 5:] = torch.tensor([11, 12, 13])  # perturb the future of position 4
    with torch.no_grad():
        if times is None:
            base, out = encode(seqs), encode(changed)
        else:
            later = times.clone()
            later[:, 5:] += torch.tensor([0, 50, 100])  # and its timestamps
            base, out = encode(seqs, times), encode(changed, later)
    assert torch.allclose(base[:, :5], out[:, :5], atol=1e-6)
    assert not torch.allclose(base[:, 5:], out[:, 5:])


def assert_padding_free(encode, seqs, *aligned):
    """``encode(seqs, *aligned)`` on two rows, the first left-padded: that row's outputs equal
    those of the row alone without its padding, and padded positions output zeros. ``aligned``:
    per-row inputs (one value a row, or one a position) cut along with the rows."""
    pad = int((seqs[0] == 0).sum())
    alone = [a[:1] if a.dim() == 1 else a[:1, pad:] for a in aligned]
    with torch.no_grad():
        both = encode(seqs, *aligned)
        first = encode(seqs[:1, pad:], *alone)  # the first row without its padding
    assert torch.allclose(both[0, pad:], first[0], atol=1e-5)
    assert float(both[0, :pad].abs().max()) == 0.0  # padded positions output zeros


def rows_of_many_lengths():
    """Ten left-padded rows of 40 positions holding 0 to 40 random items of 1..99: (lengths, rows,
    the generator that drew them, for further draws)."""
    g = torch.Generator().manual_seed(1)
    lengths = [0, 1, 3, 8, 9, 15, 17, 33, 40, 5]
    seqs = torch.zeros(len(lengths), 40, dtype=torch.long)
    for r, n in enumerate(lengths):
        if n:
            seqs[r, 40 - n :] = torch.randint(1, 100, (n,), generator=g)
    return lengths, seqs, g


def assert_rows_alone(encode, lengths, seqs, *aligned):
    """Each row of ``encode(seqs, *aligned)`` (rows of the given ``lengths``, left-padded;
    ``aligned``: one value a row) equals what the row gets alone without its padding."""
    width = seqs.shape[1]
    with torch.no_grad():
        out = encode(seqs, *aligned)
        for r, n in enumerate(lengths):
            if n:
                alone = encode(seqs[r : r + 1, width - n :], *(a[r : r + 1] for a in aligned))[0]
                assert torch.allclose(alone, out[r, width - n :], atol=1e-5)


def assert_scores(model, users, lists, n_items, **kw) -> torch.Tensor:
    """The scores of the histories ``lists`` of ``users`` (-1: unknown; ``kw``: further per-item
    fields, e.g. ``times``): one finite row of ``n_items + 1`` per history; returned."""
    hist = Histories.from_lists(users, lists, n_items, **kw)
    with torch.no_grad():
        s = model.score(hist)
    assert s.shape == (len(lists), n_items + 1) and torch.isfinite(s).all()
    return s


# ---- training -------------------------------------------------------------------------------
def assert_beats_popularity(model, data, margin: float = 0.05) -> None:
    split, _, test = data
    pop = ndcg(create("pop").fit(split), test)
    got = ndcg(model, test)
    assert got > pop + margin, f"NDCG@10 {got:.4f} vs Pop {pop:.4f}"


def assert_deterministic(name, params, data) -> None:
    """Two fits of ``name`` with the same ``params`` (a seed among them) evaluate and score alike."""
    split, valid, test = data
    a = create(name, **params).fit(split, valid)
    b = create(name, **params).fit(split, valid)
    assert ndcg(a, test) == ndcg(b, test)
    hist = test.histories.slice(0, 20)
    with torch.no_grad():
        assert torch.equal(a.score(hist), b.score(hist))


def assert_round_trip(model, test, path) -> Recommender:
    """Saved to ``path`` and loaded, the model has the same parameters and scores 30 test
    histories identically; returns the loaded model."""
    model.save(path)
    back = Recommender.load(path)
    assert type(back) is type(model) and back.get_params() == model.get_params()
    hist = test.histories.slice(0, 30)
    with torch.no_grad():
        assert torch.equal(model.score(hist), back.score(hist))
    return back
