"""Fidelity of the contrastive sequential models (CL4SRec, DuoRec) to the authors' code:
the InfoNCE masking and similarity worked by hand on tiny batches, DuoRec's negatives option,
and the family defaults of the contrastive term."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recforge.data.prepare import prepare
from recforge.data.split import leave_one_out
from recforge.data.synthetic import make_synthetic
from recforge.errors import ConfigError
from recforge.models.registry import create, defaults
from recforge.models.sequential import duorec as duorec_module
from recforge.models.sequential.cl4srec import CL4SRec
from recforge.models.sequential.contrastive import ContrastiveSASRec
from recforge.models.sequential.duorec import DuoRec
from recforge.training.losses import info_nce

E = math.e

# 2x2: views a=(1,0), b=(0,1) | c=(1,0), d=(0,0); pairs a-c, b-d.
Z1_2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
Z2_2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])

# 3x3: views v0=(1,0), v1=(0,1), v2=(1,0) | v3=(1,0), v4=(0,1), v5=(0,0); pairs 0-3, 1-4, 2-5.
Z1_3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
Z2_3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])


def test_info_nce_authors_masking_2x2_by_hand():
    # Dot products: a.c = 1, every other pair 0. Each view is classified among the 3 others,
    # its paired view being the class:
    #   a: logits {b: 0, c: 1, d: 0}, class c -> log(2 + e) - 1;  c: the same by symmetry
    #   b: logits {a: 0, c: 0, d: 0}, class d -> log 3;           d: the same
    expected = (2 * (math.log(2 + E) - 1) + 2 * math.log(3)) / 4
    assert info_nce(Z1_2, Z2_2, 1.0, similarity="dot").item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.8250285, abs=1e-6)  # (log(2 + e) - 1 + log 3) / 2


def test_info_nce_authors_masking_3x3_by_hand():
    # Dot products equal to 1: v0.v2, v0.v3, v2.v3, v1.v4; all others 0.
    #   v0: {v1 0, v2 1, v3 1, v4 0, v5 0}, class v3 (1) -> log(3 + 2e) - 1
    #   v1: {v0 0, v2 0, v3 0, v4 1, v5 0}, class v4 (1) -> log(4 + e) - 1
    #   v2: {v0 1, v1 0, v3 1, v4 0, v5 0}, class v5 (0) -> log(3 + 2e)
    #   v3: {v0 1, v1 0, v2 1, v4 0, v5 0}, class v0 (1) -> log(3 + 2e) - 1
    #   v4: {v0 0, v1 1, v2 0, v3 0, v5 0}, class v1 (1) -> log(4 + e) - 1
    #   v5: all 0,                           class v2 (0) -> log 5
    # The same-target view v2 of v0 (and v3's) stays a negative: the authors mask only the
    # diagonal and the paired view.
    expected = (3 * math.log(3 + 2 * E) + 2 * math.log(4 + E) + math.log(5) - 4) / 6
    assert info_nce(Z1_3, Z2_3, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_same_target_masking_option_3x3_by_hand():
    # Rows 0 and 1 share the label (next item) 5, row 2 has 6: views 0, 1, 3, 4 carry 5; 2, 5 carry 6.
    # A view's negatives lose the other views with its label, except its paired view (the class):
    #   v0: v1, v4 removed -> {v2 1, v3 1, v5 0}, class v3 -> log(2e + 1) - 1;  v3: the same
    #   v1: v0, v3 removed -> {v2 0, v4 1, v5 0}, class v4 -> log(e + 2) - 1;   v4: the same
    #   v2: only its pair v5 carries 6 -> nothing removed -> log(3 + 2e)
    #   v5: nothing removed -> log 5
    expected = (2 * math.log(2 * E + 1) + 2 * math.log(E + 2) + math.log(3 + 2 * E) + math.log(5) - 4) / 6
    got = info_nce(Z1_3, Z2_3, 1.0, labels=torch.tensor([5, 5, 6])).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # all labels distinct: nothing beyond the authors' masking is removed
    assert info_nce(Z1_3, Z2_3, 1.0, labels=torch.tensor([1, 2, 3])).item() == pytest.approx(
        info_nce(Z1_3, Z2_3, 1.0).item(), rel=1e-7)


def test_info_nce_cosine_and_temperature_by_hand():
    # cosine ignores the norms (the all-zero view has cosine 0 with everything, as in the
    # authors' cosine_similarity); temperature 0.5 doubles every similarity:
    #   a, c: log(2 + e^2) - 2;  b, d: log 3
    expected = (math.log(2 + E ** 2) - 2 + math.log(3)) / 2
    got = info_nce(3.0 * Z1_2, 7.0 * Z2_2, 0.5, similarity="cos").item()
    assert got == pytest.approx(expected, rel=1e-6)
    # the dot product does not ignore the norms: scaling the views by 2 is the same as
    # multiplying the similarities by 4
    scaled = (math.log(2 + E ** 4) - 4 + math.log(3)) / 2
    assert info_nce(2.0 * Z1_2, 2.0 * Z2_2, 1.0, similarity="dot").item() == pytest.approx(scaled, rel=1e-6)
    with pytest.raises(ValueError, match="similarity"):
        info_nce(Z1_2, Z2_2, 1.0, similarity="euclid")


def test_info_nce_matches_the_positive_first_layout():
    """The authors lay the logits out as [positive, 2N - 2 negatives] with class 0; on random
    views both layouts give the same loss, for both similarities and any temperature."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    n = 5
    for similarity, tau in (("dot", 1.0), ("cos", 0.2)):
        z = torch.cat([z1, z2])
        if similarity == "cos":
            z = F.normalize(z, dim=-1)
        sim = z @ z.T / tau
        positives = torch.cat([torch.diagonal(sim, n), torch.diagonal(sim, -n)]).unsqueeze(1)
        keep = ~torch.eye(2 * n, dtype=torch.bool)
        for i in range(n):
            keep[i, n + i] = keep[n + i, i] = False
        logits = torch.cat([positives, sim[keep].reshape(2 * n, -1)], 1)
        reference = F.cross_entropy(logits, torch.zeros(2 * n, dtype=torch.long))
        assert logits.shape == (2 * n, 2 * n - 1)
        assert info_nce(z1, z2, tau, similarity=similarity).item() == pytest.approx(reference.item(), rel=1e-6)


# ---- the models ---------------------------------------------------------------------------

FAST = dict(verbose=False, batch_size=16, epochs=1, patience=100, threads=1, max_len=10, hidden=16, inner=32)


@pytest.fixture(scope="module")
def split():
    torch.set_num_threads(1)
    raw = make_synthetic(n_users=60, n_items=8, seed=0, p_follow=0.9, n_successors=(1, 2), mean_length=8)
    return leave_one_out(prepare(raw))


def test_family_defaults_are_shared_and_recorded():
    import inspect
    sig = inspect.signature(ContrastiveSASRec.__init__).parameters
    for name in ("cl4srec", "duorec"):
        cfg = defaults(name)
        # one setting for the whole family: the YAML files agree with each other and with the code
        assert cfg["similarity"] == sig["similarity"].default
        assert cfg["temperature"] == sig["temperature"].default
        assert cfg["cl_weight"] == 0.1  # the authors' lmd / lmd_sem
        notes = create(name).protocol_notes()
        assert notes["similarity"] == cfg["similarity"] and notes["temperature"] == cfg["temperature"]
    assert defaults("duorec")["negatives"] == "batch"
    assert create("duorec").protocol_notes()["negatives"] == "batch"


def test_bad_contrastive_options():
    with pytest.raises(ConfigError, match="negatives='same'.*batch.*other_targets"):
        create("duorec", negatives="same")
    with pytest.raises(ConfigError, match="similarity"):
        create("cl4srec", similarity="euclid")
    with pytest.raises(ConfigError, match="temperature"):
        create("duorec", temperature=0.0)


def _record_info_nce(monkeypatch, module):
    calls = []

    def spy(z1, z2, temperature=1.0, labels=None, similarity="dot"):
        calls.append(dict(labels=labels, temperature=temperature, similarity=similarity))
        return info_nce(z1, z2, temperature, labels=labels, similarity=similarity)

    monkeypatch.setattr(module, "info_nce", spy)
    return calls


@pytest.mark.parametrize("negatives", ["batch", "other_targets"])
def test_duorec_negatives_option_reaches_the_loss(split, monkeypatch, negatives):
    calls = _record_info_nce(monkeypatch, duorec_module)
    m = DuoRec(negatives=negatives, similarity="cos", temperature=0.5, **FAST).fit(split)
    assert calls, "the contrastive loss was never computed"
    assert all(c["similarity"] == "cos" and c["temperature"] == 0.5 for c in calls)
    rows = np.arange(min(len(m._samples), 16))
    batch = m.make_batch(rows, np.random.default_rng(0))
    if negatives == "batch":
        # the authors' masking: no labels, only the diagonal and the paired view leave
        assert "label" not in batch
        assert all(c["labels"] is None for c in calls)
    else:
        assert np.array_equal(batch["label"].numpy(), m._samples[rows, -1])
        assert all(c["labels"] is not None for c in calls)


def test_duorec_loss_value_with_fixed_representations(split, monkeypatch):
    """With the encoder's outputs pinned to the 3x3 views above, DuoRec's contrastive term is
    ``cl_weight`` times the hand-worked InfoNCE: authors' masking by default, the same-target
    masking with ``negatives=other_targets``."""
    for negatives, expected in (
        ("batch", (3 * math.log(3 + 2 * E) + 2 * math.log(4 + E) + math.log(5) - 4) / 6),
        ("other_targets",
         (2 * math.log(2 * E + 1) + 2 * math.log(E + 2) + math.log(3 + 2 * E) + math.log(5) - 4) / 6),
    ):
        m = DuoRec(negatives=negatives, similarity="dot", temperature=1.0, cl_weight=0.1, **FAST).fit(split)
        views = {"view": Z1_3, "positive": Z2_3}
        monkeypatch.setattr(m, "last_state", lambda seqs, _v=views: _v[seqs])
        batch = {"view": "view", "positive": "positive"}
        if negatives == "other_targets":
            batch["label"] = torch.tensor([5, 5, 6])
        assert m.extra_loss(batch, None).item() == pytest.approx(0.1 * expected, rel=1e-6)


def test_cl4srec_loss_value_with_fixed_representations(split, monkeypatch):
    m = CL4SRec(similarity="dot", temperature=1.0, cl_weight=0.1, **FAST).fit(split)
    views = {"v1": Z1_2, "v2": Z2_2}
    monkeypatch.setattr(m, "last_state", lambda seqs: views[seqs])
    expected = (2 * (math.log(2 + E) - 1) + 2 * math.log(3)) / 4
    assert m.extra_loss({"views": ("v1", "v2")}, None).item() == pytest.approx(0.1 * expected, rel=1e-6)
