"""The parts of FAERec and LLM-ESR that follow the authors' code, on values worked out by hand.

The text vectors come from :class:`~recforge.semantic.encoder.HashingEncoder` (the project's
deterministic stand-in for a sentence encoder) or are written directly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recforge.data.prepare import prepare
from recforge.data.split import make_split
from recforge.data.synthetic import make_synthetic
from recforge.errors import ConfigError
from recforge.models import registry
from recforge.models.semantic.base import pca_init
from recforge.models.semantic.faerec import barlow_twins, cosine_curriculum, info_nce, split_barlow_twins
from recforge.models.semantic.llmesr import DUAL_VIEW_ONLY, user_prompts

TINY = dict(hidden=8, inner=16, max_len=6, batch_size=32, verbose=False, encoder="hashing:16", n_layers=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def small():
    ds = prepare(make_synthetic(n_users=120, n_items=60, mean_length=10, seed=5))
    return ds, make_split(ds, "loo")


# ---- FAERec: feature-level alignment ----------------------------------------------------------
def test_barlow_twins_on_a_hand_worked_pair():
    # columns standardised with the unbiased std over 2 rows: z = +-1/sqrt(2); C = z_a^T z_b / 2
    a = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    b = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    # C = [[0.5, -0.5], [0.5, -0.5]]: diagonal (1 - 0.5)^2 + (1 + 0.5)^2 = 2.5, off-diagonal 0.25 + 0.25
    assert barlow_twins(a, b, 0.005).item() == pytest.approx(2.5 + 0.005 * 0.5, rel=1e-4)
    assert barlow_twins(a, b, 0.0).item() == pytest.approx(2.5, rel=1e-4)


def test_barlow_twins_runs_on_head_and_tail_halves_separately():
    # popularity 9, 7, 5 | 2, 1: the median is 5, so rows 0-2 are the head half, rows 3-4 the tail half
    pop = torch.tensor([9.0, 7.0, 5.0, 2.0, 1.0])
    head = torch.tensor([[1.0, 1.0], [0.0, -2.0], [-1.0, 1.0]])
    # head: b = a; the columns are uncorrelated, so C = diag(2/3, 2/3) (sum z^2 = N - 1 = 2 over N = 3)
    # -> 2 * (1 - 2/3)^2 = 2/9; tail: the pair of the test above -> 2.5 + 0.005 * 0.5
    a = torch.cat([head, torch.tensor([[1.0, 1.0], [-1.0, -1.0]])])
    b = torch.cat([head, torch.tensor([[1.0, -1.0], [-1.0, 1.0]])])
    expected = 2 / 9 + 2.5 + 0.005 * 0.5
    assert split_barlow_twins(a, b, pop, 0.005).item() == pytest.approx(expected, rel=1e-4)
    # one loss over all five rows is a different number
    assert abs(barlow_twins(a, b, 0.005).item() - expected) > 0.1
    # a half with a single row adds nothing: popularity 9, 7, 5, 5 | 1 (median 5: four head rows)
    pop_single_tail = torch.tensor([9.0, 7.0, 5.0, 5.0, 1.0])
    assert split_barlow_twins(a, b, pop_single_tail, 0.005).item() == pytest.approx(
        barlow_twins(a[:4], b[:4], 0.005).item(), rel=1e-5)


def test_item_info_nce_is_one_directional_by_default():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # row 1 normalised: (0.7071, 0.7071)
    s = 1 / math.sqrt(2)
    # logits a_n b_n^T / tau (tau = 1) = [[1, s], [0, s]]; cross-entropy of the diagonal, row by row
    row0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(s)))
    row1 = -math.log(math.exp(s) / (math.exp(0) + math.exp(s)))
    assert info_nce(a, b, 1.0).item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    # columns: [[1, 0], [s, s]] -> the symmetric form averages both directions
    col0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(0)))
    col1 = -math.log(math.exp(s) / (math.exp(s) + math.exp(s)))
    sym = 0.5 * ((row0 + row1) / 2 + (col0 + col1) / 2)
    assert info_nce(a, b, 1.0, symmetric=True).item() == pytest.approx(sym, rel=1e-5)


# ---- FAERec: cyclic cosine curriculum ---------------------------------------------------------
@pytest.mark.parametrize("epoch, w_item", [(0, 1.0), (10, 0.925), (15, 0.9), (20, 0.925), (30, 1.0), (45, 0.9)])
def test_cosine_curriculum_at_hand_worked_epochs(epoch, w_item):
    # w_item = (1 - 0.9) * (1 + cos(2 pi e / 30)) / 2 + 0.9: cos = 1, -1/2, -1, -1/2, 1, -1
    got = cosine_curriculum(epoch, period=30, w_min=0.9, w_max=1.0)
    assert got == pytest.approx((w_item, 1 - w_item), abs=1e-12)


def test_model_curriculum_counts_epochs_from_zero():
    model = registry.create("faerec", **TINY, period=20, w_min=0.7)
    model._epoch = 1  # the first epoch (counted from 1 by the training loop)
    assert model.curriculum() == pytest.approx((1.0, 0.0))
    model._epoch = 11  # epoch 10 of 20: half a period
    assert model.curriculum() == pytest.approx((0.7, 0.3))


# ---- FAERec: PCA initialisation --------------------------------------------------------------
def test_pca_init_shape_and_variance_by_hand():
    # four points (+-2, 0, 0), (0, +-1, 0), mean zero: principal axes x (variance 8/4 = 2) and y (2/4)
    vec = np.array([[0, 0, 0], [2, 0, 0], [-2, 0, 0], [0, 1, 0], [0, -1, 0]], dtype=np.float32)
    z = pca_init(vec, 2, std=None)
    assert z.shape == (5, 2) and not z[0].any()  # the padding row (no text) stays zero
    np.testing.assert_allclose(np.abs(z[1:]), [[2, 0], [2, 0], [0, 1], [0, 1]], atol=1e-6)
    np.testing.assert_allclose(z[1:].var(0), [2.0, 0.5], rtol=1e-6)
    scaled = pca_init(vec, 2, std=0.02)
    assert scaled[1:].std() == pytest.approx(0.02, rel=1e-5)
    np.testing.assert_allclose(scaled[1:], z[1:] * 0.02 / z[1:].std(), rtol=1e-5, atol=1e-8)


def test_faerec_id_embeddings_start_from_the_pca_of_the_text(small):
    ds, split = small
    model = registry.create("faerec", **TINY, epochs=0)
    model.attach_dataset(ds)
    model.prepare_fit(split)
    net = model.build(split.n_users, split.n_items)
    want = pca_init(model._sem, 8, std=None)
    np.testing.assert_allclose(net.lookup.embedding.weight.detach()[1 : split.n_items + 1].numpy(), want[1:], atol=1e-6)
    assert float(np.var(want[1:], axis=0)[0]) > float(np.var(want[1:], axis=0)[-1])  # ordered by variance
    off = registry.create("faerec", **TINY, epochs=0, pca_init=False)
    off.attach_dataset(ds)
    off.prepare_fit(split)
    plain = off.build(split.n_users, split.n_items).lookup.embedding.weight.detach()[1:]
    assert not np.allclose(plain.numpy(), want[1:], atol=1e-3)


# ---- FAERec: the gate per position ------------------------------------------------------------
def test_faerec_gate_is_an_mlp_per_position(small):
    ds, split = small
    model = registry.create("faerec", **TINY, epochs=1)
    model.attach_dataset(ds)
    model.fit(split)
    net = model.net_
    net.eval()
    seqs = torch.tensor([[0, 0, 5, 7, 5, 9]])  # item 5 at two positions
    tables = model.item_tables()
    fn = model.fused_lookup(seqs, tables)
    tokens = seqs[seqs > 0]
    with torch.no_grad():
        got = fn(tokens)
        enc = net.backbone
        pos = enc.pos(torch.tensor([2, 3, 4, 5]))  # the last column has position max_len - 1
        x_id, x_txt = tables["id"][tokens] * enc.scale + pos, tables["txt"][tokens] * enc.scale + pos
        lin1, lin2 = net.gate.net[0], net.gate.net[3]
        g = torch.sigmoid(lin2(torch.nn.functional.gelu(lin1(torch.cat([x_id, x_txt], 1)))))
        want = g * tables["id"][tokens] + (1 - g) * tables["txt"][tokens]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got[0], got[2])  # same item, other position, other gate
    assert isinstance(net.gate.net[2], torch.nn.Module) and net.gate.net[2].p == 0.1


def test_faerec_output_tables(small):
    ds, split = small
    for output in ("sum", "id"):
        model = registry.create("faerec", **TINY, epochs=1, output=output)
        model.attach_dataset(ds)
        model.fit(split)
        t = model.item_tables()
        with torch.no_grad():
            want = model.net_.out_ln(t["id"] + t["txt"]) if output == "sum" else t["id"]
        torch.testing.assert_close(t["out"][1:], want[1:])
        assert not t["out"][0].any()


@pytest.mark.parametrize("bad, match", [({"output": "fused"}, "output"), ({"w_min": 0.95, "w_max": 0.9}, "w_min"),
                                        ({"period": 0}, "period"), ({"tau": 0}, "tau"), ({"pca_std": -1.0}, "pca_std")])
def test_faerec_bad_options_name_the_option(bad, match):
    with pytest.raises(ConfigError, match=match):
        registry.create("faerec", **TINY, **bad)


# ---- LLM-ESR: retrieval by the user prompt and the "dual-view only" label -----------------------
def test_user_prompts_list_titles_in_time_order_cut_from_the_front():
    titles = ["Heat", "Up", "Alien"]
    indptr, items = np.array([0, 2, 2, 3]), np.array([1, 3, 2])
    full = user_prompts(titles, indptr, items, max_chars=1000)
    assert full == ["The user has visited following items: Heat, Alien,  please conclude the user's preference.", "",
                    "The user has visited following items: Up,  please conclude the user's preference."]
    cut = user_prompts(titles, indptr, items, max_chars=7)  # "Heat, Alien, "[-7:] == "Alien, ": the most recent
    assert cut[0] == "The user has visited following items: Alien,  please conclude the user's preference."


def test_llmesr_retrieves_by_the_prompt_vectors(small):
    ds, split = small
    model = registry.create("llmesr", **TINY, epochs=1, distill_weight=0.1, n_similar=3)
    model.attach_dataset(ds)
    model.fit(split)
    indptr, items = split.train_sequences
    from recforge.models.semantic.llmesr import item_titles
    from recforge.semantic.encoder import HashingEncoder

    vec = torch.from_numpy(HashingEncoder(16).encode(user_prompts(item_titles(ds), indptr, items, 700)))
    vec = torch.nn.functional.normalize(vec, dim=1)
    sim = vec @ vec.T
    sim.fill_diagonal_(-torch.inf)
    for u in range(5):
        assert set(model._similar[u]) == set(sim[u].topk(3).indices.tolist())
    mean = registry.create("llmesr", **TINY, epochs=1, distill_weight=0.1, n_similar=3, user_repr="mean")
    mean.attach_dataset(ds)
    mean.fit(split)
    assert not np.array_equal(mean._similar, model._similar)


def test_dual_view_only_label_whenever_distillation_is_off():
    off = registry.create("llmesr", **TINY, distill_weight=0.0).protocol_notes()
    on = registry.create("llmesr", **TINY, distill_weight=0.1).protocol_notes()
    assert "dual-view only" in off["variant"] and off["variant"] == DUAL_VIEW_ONLY and off["self_distillation"] == "off"
    assert "dual-view only" not in on["variant"]
    assert on["self_distillation"] == {"weight": 0.1, "user_sim_func": "kd", "user_repr": "prompt", "n_similar": 10}


@pytest.mark.parametrize("bad, match", [({"user_sim_func": "cl"}, "user_sim_func"), ({"user_repr": "llm"}, "user_repr"),
                                        ({"user_prompt_chars": 0}, "user_prompt_chars")])
def test_llmesr_bad_options_name_the_option(bad, match):
    with pytest.raises(ConfigError, match=match):
        registry.create("llmesr", **TINY, **bad)


def test_prompt_retrieval_without_the_dataset_names_the_fix(small, tmp_path):
    ds, split = small
    from recforge.semantic.store import semantic_table

    path = semantic_table(ds, "hashing:16").save(tmp_path / "t.parquet")
    model = registry.create("llmesr", **TINY, epochs=1, distill_weight=0.1, semantic_table=str(path))
    with pytest.raises(ConfigError, match="user_repr=mean"):
        model.fit(split)
