"""GRec: gap-filling training without leaks, mask rate, loss on gaps only, causal scoring,
padding, shapes, learning the synthetic task, determinism, persistence, bad parameters."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.models.registry import create
from seq_contract import (FAST, assert_beats_popularity, assert_deterministic, assert_padding_free, assert_round_trip,
                          assert_scores, markov_data, unfitted)

FAST = FAST | dict(epochs=12, hidden=32, dilations=[1, 2])


@pytest.fixture(scope="module")
def data():
    return markov_data()


@pytest.fixture(scope="module")
def fitted(data):
    split, valid, _ = data
    return create("grec", **FAST).fit(split, valid)


def built(**kw):
    return unfitted("grec", 5, 30, **(dict(max_len=12, hidden=16, dilations=[1, 2], verbose=False) | kw))


def prepared(data, **kw):
    split, _, _ = data
    m = create("grec", **(FAST | kw))
    m.n_users_, m.n_items_ = split.n_users, split.n_items
    m.prepare_fit(split)
    torch.manual_seed(0)
    m.net_ = m.build(split.n_users, split.n_items)
    m.net_.eval()
    return m


# ---- gap filling ----------------------------------------------------------------------------
def test_batch_targets_are_the_gaps(data):
    m = prepared(data)
    rows = np.arange(64)
    b = m.make_batch(rows, np.random.default_rng(0))
    enc, dec, tgt = b["enc"].numpy(), b["dec"].numpy(), b["tgt"].numpy()
    assert np.array_equal(dec, m._samples[rows])  # the decoder reads the original items
    gap = enc == m.gap_id
    assert np.array_equal(enc[~gap], dec[~gap])  # only gaps differ
    # the decoder at t predicts the item at t + 1 exactly where that item is a gap
    assert np.array_equal(tgt[:, :-1] > 0, gap[:, 1:]) and not tgt[:, -1].any()
    assert np.array_equal(tgt[:, :-1][gap[:, 1:]], dec[:, 1:][gap[:, 1:]])
    # the first item of each row is never a gap, padding never is
    first = dec.shape[1] - (dec > 0).sum(1)
    assert not gap[np.arange(len(dec)), first].any() and not gap[dec == 0].any()


def test_mask_rate_is_respected(data):
    m = prepared(data, mask_prob=0.3)
    rows = np.arange(len(m._samples))
    masked = m.gap_mask(m._samples[rows], np.random.default_rng(1))
    n = (m._samples[rows] > 0).sum(1) - 1
    assert np.array_equal(masked.sum(1), np.maximum(1, np.floor(0.3 * n + 0.5)).astype(int))
    assert abs(masked.sum() / n.sum() - 0.3) < 0.03
    # drawn afresh: another generator masks other positions
    assert not np.array_equal(masked, m.gap_mask(m._samples[rows], np.random.default_rng(2)))
    # prefix samples: the last item only
    p = prepared(data, subseq="prefix")
    pm = p.gap_mask(p._samples[:50], np.random.default_rng(0))
    assert pm[:, -1].all() and not pm[:, :-1].any()


def test_decoder_never_sees_the_gap_it_fills(data):
    # changing the true item behind one gap (in the decoder's input; the encoder reads the gap)
    # never changes the output that predicts it, nor any earlier output
    m = prepared(data)
    b = m.make_batch(np.arange(6), np.random.default_rng(0))
    enc, dec = b["enc"], b["dec"]
    with torch.no_grad():
        base = m.net_(enc, dec)
        checked = 0
        for r, j in zip(*torch.nonzero(enc == m.gap_id, as_tuple=True)):
            r, j = int(r), int(j)
            other = dec.clone()
            other[r, j] = dec[r, j] % m.n_items_ + 1  # another real item
            out = m.net_(enc, other)
            assert torch.allclose(out[r, :j], base[r, :j], atol=1e-6)
            assert not torch.allclose(out[r, j], base[r, j])  # the item itself is seen from j on
            checked += 1
    assert checked >= 6


def test_encoder_sees_both_sides_in_training():
    # the future context: an unmasked item after a gap changes the output that fills the gap
    m = built()
    dec = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    enc = dec.clone()
    enc[0, 6] = m.gap_id
    with torch.no_grad():
        base = m.net_(enc, dec)[0, 5]
        enc2, dec2 = enc.clone(), dec.clone()
        enc2[0, 8] = dec2[0, 8] = 20
        assert not torch.allclose(m.net_(enc2, dec2)[0, 5], base)


def test_loss_only_on_gaps(data):
    m = prepared(data)
    b = m.make_batch(np.arange(32), np.random.default_rng(0))
    with torch.no_grad():
        h = m.net_(b["enc"], b["dec"])
        logits = F.relu(h) @ m.net_.out.weight.T + m.net_.out.bias
        logits[..., 0] = -torch.inf
        sel = b["tgt"] > 0
        expected = F.cross_entropy(logits[sel], b["tgt"][sel])
        assert torch.allclose(m.loss(b), expected, atol=1e-5)
    # the gradient reaches only the outputs that fill a gap
    h = m.net_(b["enc"], b["dec"])
    h.retain_grad()
    m.next_item_loss(m.features(h), b["tgt"], None).backward()
    norms = h.grad.norm(dim=-1)
    assert float(norms[~sel].abs().max()) == 0.0 and bool((norms[sel] > 0).all())


# ---- scoring --------------------------------------------------------------------------------
@pytest.mark.parametrize("score_gap", [False, True])
def test_scoring_is_causal(score_gap):
    # the scores after position t of a history (the history up to t, scored in one batch with
    # rows that continue differently) never depend on the items after t
    m = built(score_gap=score_gap)
    a = [3, 7, 1, 9, 4, 4, 12, 5, 8, 2, 6]
    b = a[:5] + [20, 21, 22, 23, 24, 25]
    rows = [a[:t] for t in range(1, len(a) + 1)] + [b[:t] for t in range(1, len(b) + 1)]
    s = m.score(Histories.from_lists([-1] * len(rows), rows, 30))
    n = len(a)
    for t in range(n):
        same = t < 5
        assert torch.allclose(s[t], s[n + t], atol=1e-6) == same
    # each prefix scored alone gives the same scores as inside the batch
    for t in (0, 4, 10):
        alone = m.score(Histories.from_lists([0], [a[: t + 1]], 30))[0]
        assert torch.allclose(alone, s[t], atol=1e-5)


def test_decoder_is_causal_given_the_encoding():
    m = built()
    seqs = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    enc = seqs.clone()
    enc[:, 6:] = m.gap_id  # the encoder sees nothing after position 5
    with torch.no_grad():
        base = m.net_(enc, seqs)
        changed = seqs.clone()
        changed[:, 6:] = torch.tensor([21, 22, 23, 24, 25, 26])
        out = m.net_(enc, changed)
    assert torch.allclose(base[:, :6], out[:, :6], atol=1e-6)
    assert not torch.allclose(base[:, 6:], out[:, 6:])


def test_padding_does_not_matter():
    m = built()
    seqs = torch.tensor([[0, 0, 0, 0, 0, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    enc = seqs.clone()
    enc[0, 7] = enc[1, 3] = m.gap_id
    assert_padding_free(lambda dec, gapped: m.net_(gapped, dec), seqs, enc)


@pytest.mark.parametrize("score_gap", [False, True])
def test_score_shapes_empty_history_and_unknown_user(score_gap):
    m = built(score_gap=score_gap)
    s = assert_scores(m, [-1, -1, 0], [[1, 2, 3], [], list(range(1, 30))], 30)
    same = m.score(Histories.from_lists([4, 12345, 2], [[1, 2, 3], [], list(range(1, 30))], 30))
    assert torch.equal(s, same)  # user ids are never read


def test_score_gap_reads_one_gap_after_the_history():
    m = built()
    hist = Histories.from_lists([0, 1], [[3, 7, 1, 9], list(range(1, 30))], 30)
    plain = m.score(hist)
    m.score_gap = True
    gap = m.score(hist)
    seqs = hist.sequences(12)
    enc = torch.cat([seqs, torch.full((2, 1), m.gap_id)], 1)
    dec = torch.cat([seqs, torch.zeros((2, 1), dtype=seqs.dtype)], 1)
    with torch.no_grad():
        h = m.net_(enc, dec)[:, -2]
    assert torch.allclose(gap, m.features(h) @ m.output_table().T, atol=1e-6)
    assert not torch.allclose(gap, plain)
    assert "one gap" in m.protocol_notes()["inference"]


# ---- training -------------------------------------------------------------------------------
def test_beats_popularity(data, fitted):
    assert_beats_popularity(fitted, data)


def test_deterministic_by_seed(data):
    assert_deterministic("grec", FAST | dict(epochs=2, seed=7), data)


def test_other_losses_train(data):
    split, valid, _ = data
    m = create("grec", **(FAST | dict(epochs=1)), loss="bce", n_negatives=4).fit(split, valid)
    assert np.isfinite(m.history_["epochs"][0]["loss"])


def test_save_load_round_trip(data, fitted, tmp_path):
    assert_round_trip(fitted, data[2], tmp_path / "grec")


def test_protocol_notes(fitted):
    notes = fitted.protocol_notes()
    assert notes["subsequence_split"] == "none" and notes["loss"] == "ce" and notes["mask_prob"] == 0.5


@pytest.mark.parametrize("bad", [dict(mask_prob=0.0), dict(mask_prob=1.5), dict(dilations=[]), dict(dilations=[1, 0]),
                                 dict(dilations=3), dict(kernel_size=1), dict(dropout=1.0), dict(max_len=1),
                                 dict(hidden=0), dict(projector_inner=0), dict(loss="hinge"),
                                 dict(score_gap="yes")])
def test_bad_parameters(bad):
    with pytest.raises(ConfigError) as e:
        create("grec", **bad)
    assert next(iter(bad)) in str(e.value)
