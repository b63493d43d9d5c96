"""GEM: the graph of feature values on a hand-worked table (exact neighbours, weights and counts),
the generalized embedding of one GCN layer against its formula, GEM beating LR on the synthetic
interaction table, and a save/load round trip that predicts identically."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_ctr_models import _fit, _test_auc, interaction_split  # noqa: F401 (interaction_split: a fixture)

from recforge.errors import ConfigError
from recforge.models.base import Recommender
from recforge.models.ctr.gem import GraphEmbedding, feature_graph, graph_fields_of

LAYOUT = [{"name": "user", "kind": "categorical", "dim": None, "table": "user", "vocab": 5, "max_len": 0},
          {"name": "item", "kind": "categorical", "dim": None, "table": "item", "vocab": 5, "max_len": 0},
          {"name": "ctx", "kind": "categorical", "dim": None, "table": "ctx", "vocab": 4, "max_len": 0}]
# ids 2-4 are values, 1 is out-of-vocabulary (no node); nodes: user id u -> u, item id i -> 5 + i
ROWS = {"user": np.array([2, 2, 3, 3, 4, 2, 4, 2]), "item": np.array([2, 3, 2, 4, 3, 2, 4, 1]),
        "ctx": np.array([2, 3, 2, 3, 2, 2, 3, 2])}
LABEL = np.array([1, 1, 1, 0, 1, 1, 0, 1], dtype=bool)


def test_graph_fields_default_to_user_and_item():
    assert graph_fields_of(LAYOUT, "user") == ["user", "item"]
    assert graph_fields_of(LAYOUT, None) == ["user", "item", "ctx"]  # no user column: every categorical field
    assert graph_fields_of(LAYOUT, "user", ["item", "ctx"]) == ["item", "ctx"]
    with pytest.raises(ConfigError, match="at least two"):
        graph_fields_of(LAYOUT, "user", ["user"])


def test_user_item_graph_from_positive_rows_by_hand():
    """Positive rows: (u2,i2) twice, (u2,i3), (u3,i2), (u4,i3); (u2, OOV) makes no edge."""
    g = feature_graph(ROWS, LAYOUT, ["user", "item"], neighbours=2, rows=LABEL)
    assert g["offsets"] == {"user": 0, "item": 5} and g["n_nodes"] == 10 and g["edges"] == 8
    nbr = np.zeros((10, 2), np.int64)
    cnt = np.zeros((10, 2), np.int64)
    w = np.zeros((10, 2), np.float32)
    nbr[2], cnt[2], w[2] = [7, 8], [2, 1], [0.5, 0.5]  # u2: i2 (twice) before i3
    nbr[3], cnt[3], w[3] = [7, 0], [1, 0], [1, 0]      # u3: i2 only (its i4 row is negative)
    nbr[4], cnt[4], w[4] = [8, 0], [1, 0], [1, 0]      # u4: i3
    nbr[7], cnt[7], w[7] = [2, 3], [2, 1], [0.5, 0.5]  # i2: u2 (twice), u3
    nbr[8], cnt[8], w[8] = [2, 4], [1, 1], [0.5, 0.5]  # i3: u2, u4 (a tie: the smaller node first)
    np.testing.assert_array_equal(g["neighbours"], nbr)
    np.testing.assert_array_equal(g["counts"], cnt)
    np.testing.assert_array_equal(g["weights"], w)

    one = feature_graph(ROWS, LAYOUT, ["user", "item"], neighbours=1, rows=LABEL)  # the most frequent only
    np.testing.assert_array_equal(one["neighbours"][[2, 3, 4, 7, 8], 0], [7, 7, 8, 2, 2])
    np.testing.assert_array_equal(one["weights"][[2, 3, 4, 7, 8], 0], [1, 1, 1, 1, 1])

    every = feature_graph(ROWS, LAYOUT, ["user", "item"], neighbours=2)  # all rows: (u3,i4), (u4,i4) too
    assert every["edges"] == 12
    np.testing.assert_array_equal(every["neighbours"][[3, 4, 9]], [[7, 9], [8, 9], [3, 4]])


def test_shared_table_nodes_and_no_self_loops():
    layout = [{"name": "item", "kind": "categorical", "dim": None, "table": "item", "vocab": 4, "max_len": 0},
              {"name": "hist", "kind": "sequence", "dim": None, "table": "item", "vocab": 4, "max_len": 2}]
    x = {"item": np.array([2, 3]), "hist": np.array([[2, 3], [2, 0]])}
    g = feature_graph(x, layout, ["item", "hist"], neighbours=3)
    assert g["offsets"] == {"item": 0} and g["n_nodes"] == 4 and g["edges"] == 2
    np.testing.assert_array_equal(g["neighbours"][[2, 3]], [[3, 0, 0], [2, 0, 0]])
    np.testing.assert_array_equal(g["counts"][[2, 3]], [[2, 0, 0], [2, 0, 0]])


def test_propagation_is_its_formula():
    g = feature_graph(ROWS, LAYOUT, ["user", "item"], neighbours=2, rows=LABEL)
    torch.manual_seed(0)
    table = torch.randn(10, 4)
    light = GraphEmbedding(4, 2, "light", "tanh", g["neighbours"], g["weights"])
    h1 = {v: (table[a] + table[b]) / 2 for v, (a, b) in {2: (7, 8), 7: (2, 3), 8: (2, 4)}.items()}
    h1.update({3: table[7], 4: table[8]})
    expect = (table[2] + h1[2] + (h1[7] + h1[8]) / 2) / 3  # u2: itself, its items, their users
    torch.testing.assert_close(light(table, torch.tensor([2, 0]))[0], expect)
    torch.testing.assert_close(light(table, torch.tensor([0]))[0], table[0] / 3)  # no neighbours

    gcn = GraphEmbedding(4, 1, "sage", "tanh", g["neighbours"], g["weights"])
    out = gcn(table, torch.tensor([[2, 8], [2, 0]]))
    lin = gcn.layers[0]
    expect_u2 = lin(torch.cat([table[2], 0.5 * (table[7] + table[8])]))
    expect_i3 = lin(torch.cat([table[8], 0.5 * (table[2] + table[4])]))
    torch.testing.assert_close(out[0, 0], expect_u2)
    torch.testing.assert_close(out[1, 0], expect_u2)
    torch.testing.assert_close(out[0, 1], expect_i3)
    torch.testing.assert_close(out[1, 1], lin(torch.cat([table[0], torch.zeros(4)])))  # no neighbours


@pytest.mark.parametrize("base,propagation", [("fm", "light"), ("deepfm", "light"), ("fm", "sage")])
def test_gem_beats_lr_on_an_interaction_effect(base, propagation, interaction_split):  # noqa: F811
    lr = _test_auc(_fit("lr", interaction_split, lr=1e-2), interaction_split)
    model = _fit("gem", interaction_split, base=base, propagation=propagation, hidden=[64, 64],
                 lr=1e-2 if base == "fm" else 3e-3)
    value = _test_auc(model, interaction_split)
    assert lr < 0.6
    assert value > lr + 0.15, (base, propagation, value, lr)
    assert model.graph_fields_ == ["a", "b", "c", "tags"]  # no user/item fields: every categorical field
    assert model.history_["best_epoch"] >= 1


def test_bad_settings_say_so():
    from recforge.models import registry

    for bad, match in (({"base": "nfm"}, "base='nfm'"), ({"propagation": "gat"}, "propagation='gat'"),
                       ({"graph_rows": "clicks"}, "graph_rows='clicks'"), ({"neighbours": 0}, "at least 1")):
        with pytest.raises(ConfigError, match=match):
            registry.create("gem", **bad)


def test_save_load_round_trip(interaction_split, tmp_path):  # noqa: F811
    model = _fit("gem", interaction_split, epochs=2, neighbours=3)
    model.save(tmp_path / "m")
    back = Recommender.load(tmp_path / "m", device="cpu")
    np.testing.assert_array_equal(back.graph_neighbours_, model.graph_neighbours_)
    np.testing.assert_allclose(back.predict_proba(interaction_split.test), model.predict_proba(interaction_split.test),
                               rtol=1e-6)
    assert type(back).__name__ == "GEM" and back.graph_fields_ == model.graph_fields_
