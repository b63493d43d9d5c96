"""MARC (recforge/semantic/marc.py): layer states of a causal language model, the compression and
task-adaptation modules trained on the training interactions, and the semantic table LLM-ESR reads.

Every test runs on a tiny randomly initialised Llama (two layers, width 32, a word-level
vocabulary of the test's item texts), so no weights are loaded; they skip when the ``llm`` extra
(transformers) is absent. The synthetic task: items belong to colour groups named in their text
("kettle3 red"), every user draws a sequence from one group, so the next item is predictable from
the text alone.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

pytest.importorskip("transformers")

from recforge.data.prepare import prepare  # noqa: E402
from recforge.data.schema import RawData  # noqa: E402
from recforge.data.split import Split, make_split  # noqa: E402
from recforge.errors import ConfigError, DataError  # noqa: E402
from recforge.semantic.marc import MARC, LayerFeatures, llm_layer_table, marc_table, standardise  # noqa: E402
from recforge.semantic.store import SemanticTable, VectorCache  # noqa: E402

COLOURS = ["red", "blue", "green", "black", "white"]
PER_GROUP = 8
#: small, fast training settings for the tiny task
FAST = dict(dim=8, task_hidden=32, batch_size=128, lr=1e-2, dropout=0.0, patience=50)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path / "cache"))


def _group_raw(n_users: int = 150, length: int = 7, seed: int = 0, first_id: int = 1) -> RawData:
    rng = np.random.default_rng(seed)
    n_items = len(COLOURS) * PER_GROUP
    titles = [f"kettle{i} {COLOURS[i // PER_GROUP]}" for i in range(n_items)]
    users, items, times = [], [], []
    for u in range(n_users):
        g = rng.integers(len(COLOURS))
        seq = rng.choice(PER_GROUP, length, replace=False) + g * PER_GROUP + first_id  # raw item ids
        users += [u] * length
        items += seq.tolist()
        times += list(range(length))
    inter = pl.DataFrame({"user_id": users, "item_id": items, "timestamp": times},
                         schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64})
    cat = pl.DataFrame({"item_id": list(range(first_id, first_id + n_items)), "title": titles},
                       schema={"item_id": pl.Int64, "title": pl.Utf8})
    return RawData(inter, items=cat, name="colours")


@pytest.fixture(scope="module")
def data():
    ds = prepare(_group_raw())
    return ds, make_split(ds, "loo")


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    words = ["[PAD]", "[UNK]", ".", ",", "Category", ":"] + COLOURS + [f"kettle{i}" for i in range(len(COLOURS) * PER_GROUP)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _features(ds, tiny_llm, layers="auto"):
    from recforge.semantic.text import item_texts

    feats, _ = LayerFeatures(tiny_llm).features(item_texts(ds), layers)
    return standardise(np.concatenate([np.zeros((1,) + feats.shape[1:], np.float32), feats]))


# ---- layer states ----------------------------------------------------------------------------------------
def test_layer_states_cached_per_layer_and_padding_free(tiny_llm, tmp_path):
    texts = ["kettle1 red", "kettle2 blue . kettle3 blue , kettle4 blue", "", "kettle1 red"]
    one = LayerFeatures(tiny_llm, batch_size=1, cache=VectorCache(tmp_path / "a"))
    assert one.resolve_layers("auto") == [0, 1, 2] and one.resolve_layers("mid") == [1]
    assert one.resolve_layers("final") == [2] and one.resolve_layers("2,0") == [0, 2]
    with pytest.raises(ConfigError, match="layers 0"):
        one.resolve_layers([3])
    a, stats = one.features(texts, "auto")
    assert a.shape == (4, 3, 32) and stats["run"] == 2  # two distinct non-empty texts reach the model
    assert not a[2].any() and np.array_equal(a[0], a[3])
    # batched with a longer text (right padding): the same pooled states as one text at a time
    batched = LayerFeatures(tiny_llm, batch_size=4, cache=VectorCache(tmp_path / "b"))
    np.testing.assert_allclose(batched.features(texts, "auto")[0], a, atol=1e-5)
    # a second extractor over the same cache runs no language model, also for a subset of layers
    again = LayerFeatures(tiny_llm, cache=VectorCache(tmp_path / "a"))
    b, stats = again.features(texts, [0, 2])
    assert stats["run"] == 0 and again.n_run == 0
    np.testing.assert_array_equal(b, a[:, [0, 2]])
    # the final layer is the model's last hidden state (after its final norm)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    ids = AutoTokenizer.from_pretrained(tiny_llm)(["kettle1 red"], return_tensors="pt")
    with torch.no_grad():
        last = model.base_model(**ids).last_hidden_state.mean(1)[0].numpy()
    np.testing.assert_allclose(a[0, 2], last, atol=1e-5)


# ---- the modules -------------------------------------------------------------------------------------------
def test_compressed_vectors_have_the_requested_size(data, tiny_llm):
    ds, split = data
    table = marc_table(ds, split, backbone=tiny_llm, epochs=2, **(FAST | {"dim": 6}))
    assert table.dim == 6 and table.n_items == ds.n_items and table.vectors.shape == (ds.n_items + 1, 6)
    assert not table.vectors[0].any()
    np.testing.assert_allclose(np.linalg.norm(table.vectors[1:], axis=1), 1.0, rtol=1e-5)
    m = table.stats["marc"]
    assert m["layers"] == [0, 1, 2] and len(m["layer_weights"]) == 3
    assert sum(m["layer_weights"]) == pytest.approx(1.0, abs=1e-3)
    assert m["split"]["split"] == "leave-one-out" and table.encoder.startswith("marc[")
    raw = MARC(**(FAST | {"dim": 6, "normalize": False})).fit(split, _features(ds, tiny_llm))
    assert raw.transform().shape == (ds.n_items + 1, 6)


def test_training_beats_the_untrained_modules(data, tiny_llm):
    ds, split = data
    feats = _features(ds, tiny_llm)
    untrained = MARC(epochs=0, **FAST).fit(split, feats)
    trained = MARC(epochs=40, **FAST).fit(split, feats)
    hist = trained.history_
    assert hist[-1]["task_loss"] < hist[0]["task_loss"] - 0.3
    assert hist[-1]["recon_loss"] < hist[0]["recon_loss"]
    before, after = untrained.heldout_ndcg(), trained.heldout_ndcg()
    assert after > before + 0.1, (before, after)
    # the stored vectors themselves carry the text's signal better after training: items of one colour
    # group are closer to each other than to the other groups
    def group_margin(z):
        z = z[1:]
        group = (ds.item_map.sort("idx")["raw"].to_numpy() - 1) // PER_GROUP
        sim = z @ z.T
        same = group[:, None] == group[None, :]
        np.fill_diagonal(same, False)
        other = group[:, None] != group[None, :]
        return sim[same].mean() - sim[other].mean()

    assert group_margin(trained.transform()) > group_margin(untrained.transform())


def test_only_training_interactions_are_read(data, tiny_llm):
    ds, split = data
    feats = _features(ds, tiny_llm)
    rng = np.random.default_rng(1)
    shuffled = [part.with_columns(pl.Series("item_id", rng.permutation(part["item_id"].to_numpy())))
                for part in (split.valid, split.test)]
    other = Split(split.train, shuffled[0], shuffled[1], split.n_users, split.n_items, dict(split.protocol))
    a = MARC(epochs=3, **FAST).fit(split, feats).transform()
    b = MARC(epochs=3, **FAST).fit(other, feats).transform()
    np.testing.assert_array_equal(a, b)
    # and the training part does matter (the check above is not vacuous)
    fewer = Split(split.train.filter(pl.col("user_id") % 2 == 0), split.valid, split.test, split.n_users,
                  split.n_items, dict(split.protocol))
    assert not np.array_equal(a, MARC(epochs=3, **FAST).fit(fewer, feats).transform())


def test_bad_settings_name_the_fix(data, tiny_llm):
    ds, split = data
    with pytest.raises(ConfigError, match="dim"):
        MARC(dim=0)
    with pytest.raises(ConfigError, match="recon_weight"):
        MARC(recon_weight=-1)
    with pytest.raises(DataError, match="features"):
        MARC(**FAST).fit(split, np.zeros((3, 1, 4), np.float32))
    with pytest.raises(ConfigError, match="layers"):
        marc_table(ds, split, backbone=tiny_llm, layers="middle-ish")
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        LayerFeatures(str(ds.meta.get("nowhere", "/")))


# ---- tables ------------------------------------------------------------------------------------------------
def test_table_round_trip_read_by_llmesr(data, tiny_llm, tmp_path):
    from recforge.models import registry

    ds, split = data
    table = marc_table(ds, split, backbone=tiny_llm, epochs=3, **FAST)
    path = table.save(tmp_path / "marc.parquet")
    back = SemanticTable.load(path)
    np.testing.assert_array_equal(back.vectors, table.vectors)
    assert json.loads(path.with_suffix(".json").read_text())["stats"]["marc"]["params"]["dim"] == 8
    model = registry.create("llmesr", hidden=16, inner=32, max_len=10, n_layers=1, batch_size=64, epochs=1,
                            verbose=False, semantic_table=str(path), encoder="hashing:64")
    model.attach_dataset(ds)  # the explicit table wins over building hashing vectors from the dataset
    model.fit(split, None)
    assert model.sem_dim_ == 8
    np.testing.assert_allclose(model.net_.sem.numpy(), table.vectors)
    # one layer, uncompressed, for comparisons
    mid = llm_layer_table(ds, "mid", backbone=tiny_llm)
    assert mid.dim == 32 and mid.stats["layer_states"]["layers"] == [1]
    # a table of another catalogue (same size, other item ids) is refused by name
    small = prepare(_group_raw(first_id=1001))
    other = registry.create("llmesr", hidden=16, inner=32, max_len=10, n_layers=1, epochs=1, verbose=False,
                            semantic_table=str(path))
    other.attach_dataset(small)
    with pytest.raises(DataError, match="semantic table"):
        other.fit(make_split(small, "loo"), None)


def test_embed_marc_command(tiny_llm, tmp_path):
    from recforge.cli import main

    raw = _group_raw(n_users=60)
    raw.interactions.write_csv(tmp_path / "ratings.csv")
    raw.items.write_csv(tmp_path / "items.csv")
    out = tmp_path / "t.marc.parquet"
    args = ["embed", str(tmp_path / "ratings.csv"), "--items", str(tmp_path / "items.csv"), "--marc", "--llm", tiny_llm,
            "--dim", "4", "--epochs", "2", "--out", str(out), "--json"]
    assert main(args) == 0
    table = SemanticTable.load(out)
    assert table.dim == 4 and table.n_items == len(COLOURS) * PER_GROUP
    assert table.stats["marc"]["params"]["epochs"] == 2
    assert main(["embed", str(tmp_path / "ratings.csv"), "--items", str(tmp_path / "items.csv"), "--marc",
                 "--encoder", "hashing", "--out", str(out)]) == 2
