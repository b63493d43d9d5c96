"""CmnRec: chunk boundaries (periodic, time-sensitive, time gaps), memory-operation counts,
causality, padding, timestamps at ranking time, training, determinism, persistence."""

import numpy as np
import polars as pl
import pytest
import torch

from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.models.registry import create
from recforge.models.sequential.cmnrec import boundary_distances
from seq_contract import (FAST, PADDED, assert_beats_popularity, assert_causal, assert_deterministic,
                          assert_padding_free, assert_round_trip, assert_scores, markov_data, unfitted)

FAST = FAST | dict(epochs=10)
CHUNKS = ("none", "pec", "tsc", "gap")


@pytest.fixture(scope="module")
def data():
    return markov_data()


@pytest.fixture(scope="module")
def fitted(data):
    split, valid, _ = data
    return {c: create("cmnrec", chunk=c, **FAST).fit(split, valid) for c in ("none", "pec", "tsc", "gap")}


def built(chunk="pec", max_len=8, **kw):
    def threshold(m):
        m.gap_threshold_ = 5.0

    return unfitted("cmnrec", setup=threshold, max_len=max_len, verbose=False, chunk=chunk, hidden=16, word_size=8,
                    **kw)


def positions(mask_row) -> list[int]:
    """1-based positions of a boundary mask row (the paper's numbering)."""
    return (np.flatnonzero(np.asarray(mask_row)) + 1).tolist()


# ---- boundaries -------------------------------------------------------------------------------
def test_paper_figure_6_boundaries():
    # T = 20 items, m = 4 slots: PEC writes at 5, 10, 15, 20; TSC at 8, 14, 18, 20 (the paper's Fig. 6)
    seqs = torch.arange(1, 21).unsqueeze(0)
    pec, tsc = built("pec", max_len=20), built("tsc", max_len=20)
    assert pec.period == 5 and tsc.period == 2
    assert positions(pec.boundaries(seqs)[0][0]) == [5, 10, 15, 20]
    assert positions(tsc.boundaries(seqs)[0][0]) == [8, 14, 18, 20]
    assert positions(built("none", max_len=20).boundaries(seqs)[0][0]) == list(range(1, 21))


def test_pec_every_k_from_the_last_item_and_not_on_padding():
    m = built("pec", max_len=12, chunk_size=3)
    seqs = torch.tensor([[0] * 5 + list(range(1, 8)), list(range(1, 13))])
    after, before = m.boundaries(seqs)
    assert before is None
    assert positions(after[1]) == [3, 6, 9, 12]
    assert positions(after[0]) == [6, 9, 12]  # 3 falls on padding
    assert boundary_distances("pec", 4, 10).tolist() == [0, 4, 8]
    assert boundary_distances("tsc", 1, 10).tolist() == [0, 1, 3, 6]  # chunks of 1, 2, 3, ... going back


def test_gap_boundaries_on_hand_made_times():
    m = built("gap", max_len=8)  # threshold 5
    seqs = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    times = torch.tensor([[0, 0, 100, 101, 110, 111, 130, 131], [0, 1, 2, 3, 10, 11, 12, 40]])
    after, before = m.boundaries(seqs, times)
    assert not after.any()
    # a chunk closes when an item arrives more than 5 after the previous one; never at the first item
    assert positions(before[0]) == [5, 7] and positions(before[1]) == [5, 8]
    assert m.memory_ops(seqs, times) == 2 * 4


def test_gap_threshold_is_a_quantile_of_training_gaps(data, fitted):
    split, _, _ = data
    df = split.train.sort(["user_id", "timestamp"], maintain_order=True)
    gaps = df.select(pl.col("timestamp").diff().over("user_id")).to_series().drop_nulls().to_numpy()
    assert fitted["gap"].gap_threshold_ == pytest.approx(float(np.quantile(gaps, 0.8)))
    fixed = create("cmnrec", chunk="gap", gap_threshold=3600, **(FAST | dict(epochs=1))).fit(split)
    assert fixed.gap_threshold_ == 3600.0


def test_memory_operation_counts(data, fitted):
    ops = {c: m.memory_ops_ for c, m in fitted.items()}
    assert ops["pec"] < ops["none"] and ops["tsc"] < ops["none"] and ops["gap"] < ops["none"]
    m = fitted["none"]
    inp = m._samples[:, :-1]
    assert ops["none"] == 2 * int((inp > 0).sum())  # a write and a read at every item
    seqs = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])
    assert built("none").memory_ops(seqs) == 12 and built("pec", chunk_size=2).memory_ops(seqs) == 6
    assert fitted["pec"].protocol_notes()["memory_ops_per_epoch"] == ops["pec"]


# ---- architecture -----------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", CHUNKS)
def test_causality(chunk):
    times = torch.tensor([[0, 0, 1, 2, 10, 11, 30, 31], [0, 1, 2, 3, 10, 11, 12, 40]])
    assert_causal(built(chunk).encode, times)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_padding_does_not_matter(chunk):
    times = torch.tensor([[0, 0, 0, 3, 10, 11, 12, 40], [0, 1, 2, 3, 10, 11, 12, 40]])
    assert_padding_free(built(chunk).encode, PADDED, times)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_score_shapes_empty_history_unknown_user(chunk):
    assert_scores(built(chunk), [-1, -1, 0], [[1, 2, 3], [], list(range(1, 20))], 20,
                  times=[[5, 6, 70], [], list(range(0, 190, 10))])


def test_chunks_differ_from_the_plain_memory_network():
    seqs = torch.tensor([list(range(1, 9))])
    with torch.no_grad():
        outs = {c: built(c).encode(seqs)[0, -1] for c in ("none", "pec", "tsc")}
    assert not torch.allclose(outs["none"], outs["pec"]) and not torch.allclose(outs["pec"], outs["tsc"])


def test_chunk_attention_is_used_only_by_chunks_longer_than_one_item():
    seqs = torch.tensor([list(range(1, 9))])
    for chunk, used in (("none", False), ("pec", True)):
        m = built(chunk)
        with torch.no_grad():
            before = m.encode(seqs)
            m.net_.att_w.weight.mul_(-3.0)  # another attention over the chunk area
            after = m.encode(seqs)
        assert torch.allclose(before, after) != used


# ---- timestamps at ranking time ------------------------------------------------------------------
def test_times_reach_histories_and_scoring(data, fitted):
    split, _, test = data
    h = test.histories
    assert h.times is not None and len(h.times) == len(h.items)
    hist = split.history("test").sort(["user_id", "timestamp"], maintain_order=True)
    u = int(h.users[3])
    rows = hist.filter(pl.col("user_id") == u)
    assert h.times[h.indptr[3] : h.indptr[4]].tolist() == rows["timestamp"].to_list()
    assert h.slice(3, 5).times.tolist() == h.times[h.indptr[3] : h.indptr[5]].tolist()
    m = fitted["gap"]
    part = h.slice(0, 20)
    moved = Histories(part.users, part.indptr, part.items, part.n_items, part.behaviors,
                      np.arange(len(part.items), dtype=np.int64))  # every gap 1: no chunk closes
    with torch.no_grad():
        assert not torch.equal(m.score(part), m.score(moved))  # the gaps change the chunks
        assert torch.equal(m.score(moved), m.score(moved))


def test_gap_without_times_falls_back_to_periodic(fitted):
    m = fitted["gap"]
    m._warned = False
    no_times = Histories.from_lists([-1], [list(range(1, 15))], m.n_items_)
    with pytest.warns(UserWarning, match="periodic"):
        with torch.no_grad():
            s = m.score(no_times)
    assert torch.isfinite(s).all()
    with pytest.raises(ValueError, match="times"):
        Histories.from_lists([0], [[1, 2]], 20, times=[[1]])


# ---- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", CHUNKS)
def test_beats_popularity(data, fitted, chunk):
    assert_beats_popularity(fitted[chunk], data)


def test_deterministic_by_seed(data):
    assert_deterministic("cmnrec", FAST | dict(epochs=2, seed=7, chunk="tsc"), data)


@pytest.mark.parametrize("chunk", ["tsc", "gap"])
def test_save_load_round_trip(data, fitted, chunk, tmp_path):
    back = assert_round_trip(fitted[chunk], data[2], tmp_path / chunk)
    assert back.memory_ops_ == fitted[chunk].memory_ops_


def test_protocol_notes(fitted):
    notes = fitted["tsc"].protocol_notes()
    assert notes["chunk"] == "tsc" and notes["chunk_size"] == 2 and notes["loss"] == "ce"  # g = 2T // (m (m + 1))
    assert notes["subsequence_split"] == "none"


def test_bad_parameters():
    for kw, word in ((dict(chunk="weekly"), "chunk"), (dict(chunk_size=0), "chunk_size"),
                     (dict(chunk_size=2.5), "chunk_size"), (dict(n_slots=0), "n_slots"),
                     (dict(read_heads=0), "read_heads"), (dict(dropout=1.0), "dropout"),
                     (dict(gap_quantile=1.5), "gap_quantile"), (dict(gap_threshold=-1), "gap_threshold")):
        with pytest.raises(ConfigError, match=word):
            create("cmnrec", **kw)
