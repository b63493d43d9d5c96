"""Seed systems of the language-model task (recforge.llm): CoRA (collaborative weights generated per
user and item), E2URec (unlearning users of a LoRA-tuned model) and RecLoRA (a per-user mixture of
LoRA experts). Every model is the tiny random Llama of test_llm.py (or a copy of it with larger
embeddings, so that tuning can make it answer almost surely): no weights are read."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from test_llm import needs_llm
from test_llm import ml, split, tiny  # noqa: F401 - pytest fixtures shared with test_llm

SMALL = dict(retrieval="recent", k=4, verbose=False, score_batch_size=4, epochs=2, batch_size=4, lr=5e-2,
             lora_r=4, lora_alpha=8, lora_dropout=0.0)


def data_for(sp, targets=None):
    from recforge.llm import prompts as P
    from recforge.llm.rella import PromptData

    return PromptData(sp, P.PromptFormat(), train_targets=targets)


def plain_scores(tiny, sp, test):
    """The untuned backbone's scores of ``test`` (ReLLa zero-shot, the same prompts)."""
    from recforge.llm.rella import ReLLa

    m = ReLLa(backbone=str(tiny), **SMALL)
    m.fit(data_for(sp))
    return m.predict(data_for(sp), test)[1]


def lm_weights(model) -> dict:
    lm = model.net_.lm
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return {k: v.detach().clone() for k, v in base.state_dict().items() if "lora_" not in k}


# ---- CoRA ------------------------------------------------------------------------------------------
@needs_llm
def test_cora_generated_weights_change_scores_and_leave_the_backbone_alone(tiny, split, tmp_path):
    import torch

    from recforge.llm import prompts as P
    from recforge.llm.cora import CoRA

    _, sp = split
    test = P.eligible(sp, "test").head(10)
    targets = P.sample_targets(P.eligible(sp, "train"), 16, 0)
    p0 = plain_scores(tiny, sp, test)

    m = CoRA(backbone=str(tiny), cf_dim=8, cf_epochs=5, gen_hidden=16, gen_heads=2, **SMALL)
    m.fit(data_for(sp))  # zero-shot: the generator's second factor is zero, every delta is zero
    assert np.allclose(m.predict(data_for(sp), test)[1], p0, atol=1e-6)
    before = lm_weights(m)

    m = CoRA(backbone=str(tiny), cf_dim=8, cf_epochs=5, gen_hidden=16, gen_heads=2, **SMALL)
    data = data_for(sp, targets)
    m.fit(data)
    assert m.cf_user_.shape == (sp.n_users, 9) and m.cf_item_.shape == (sp.n_items + 1, 9)
    state = m.net_.state_dict()
    assert state and all(k.startswith("gen.") for k in state)  # only the generator is trained and kept
    after = lm_weights(m)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    frame, p1 = m.predict(data, test)
    assert not np.allclose(p1, p0, atol=1e-3)
    # scoring the same prompts without the (user, item) keys is the plain backbone again
    assert np.allclose(m.predict_proba(frame["prompt"].to_list()), p0, atol=1e-6)
    # the deltas differ between pairs: other users on the same items give other scores
    keys = frame.select("user_id", "item_id").to_numpy()
    shifted = keys.copy()
    shifted[:, 0] = (shifted[:, 0] + 1) % sp.n_users
    assert not np.allclose(m.predict_proba(frame["prompt"].to_list(), keys=shifted), p1, atol=1e-6)
    d = m.net_.deltas(torch.as_tensor(keys[:2]))
    assert set(d) == {"q_proj", "v_proj"} and d["q_proj"].shape[:2] == (2, 2)
    assert not torch.allclose(d["q_proj"][0], d["q_proj"][1])
    # zero second factors: every delta is zero, the backbone's scores come back
    with torch.no_grad():
        saved = {t: b.detach().clone() for t, b in m.net_.gen.b.items()}
        for b in m.net_.gen.b.values():
            b.zero_()
    assert np.allclose(m.predict(data, test)[1], p0, atol=1e-6)
    with torch.no_grad():
        for t, b in m.net_.gen.b.items():
            b.copy_(saved[t])
    # save / load: the generator and the collaborative vectors, the backbone re-read
    m.save(tmp_path / "cora")
    back = CoRA.load(tmp_path / "cora")
    back.verbose = False
    assert np.allclose(back.predict(data, test)[1], p1, atol=1e-6)
    assert np.array_equal(back.cf_user_, m.cf_user_)
    with pytest.raises(Exception, match="cannot be merged"):
        m.export_merged(tmp_path / "merged")


def test_cora_collaborative_model_learns_the_training_likes(split):
    from recforge.evaluation.pointwise import auc
    from recforge.llm.cora import fit_collaborative

    _, sp = split
    cf = fit_collaborative(sp, dim=8, epochs=60, lr=0.05, weight_decay=0.0, seed=0)
    u, i = sp.train["user_id"].to_numpy(), sp.train["item_id"].to_numpy()
    logit = (cf["user"][u, :-1] * cf["item"][i, :-1]).sum(1) + cf["user"][u, -1] + cf["item"][i, -1]
    assert auc(sp.train["label"].to_numpy(), logit) > 0.8
    unseen = np.setdiff1d(np.arange(1, sp.n_items + 1), i)
    assert np.all(cf["item"][unseen] == 0) and np.all(cf["item"][0] == 0)


# ---- E2URec ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharp(tmp_path_factory, tiny):
    """The tiny Llama with its (tied) embeddings ten times larger: its output distributions are no
    longer nearly uniform, so tuning can make it answer almost surely and unlearning has something to
    undo."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("sharp") / "llama"
    m = LlamaForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        m.get_input_embeddings().weight.mul_(10.0)
    m.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return folder


def e2urec(backbone, **kw):
    from recforge.llm.e2urec import E2URec

    params = {**SMALL, "epochs": 3, "unlearn_lr": 5e-2, "unlearn_epochs": 10, "forget_epochs": 3, **kw}
    return E2URec(backbone=str(backbone), **params)


def labelled(sp, n, yes_users=None, forget=()):
    """``n`` training targets; every label Yes, or No for the users in ``forget`` when ``yes_users``."""
    from recforge.llm import prompts as P

    t = P.sample_targets(P.eligible(sp, "train"), n, 0)
    label = pl.when(pl.col("user_id").is_in(list(forget))).then(0).otherwise(1) if yes_users else pl.lit(1)
    return t.with_columns(label.cast(pl.Int8).alias("label"))


@needs_llm
def test_e2urec_forgets_users_and_keeps_the_others(sharp, split, tmp_path):
    import torch

    from recforge.errors import RecForgeError
    from recforge.llm import prompts as P
    from recforge.llm.e2urec import E2URec

    _, sp = split
    forget = [0, 1]
    data = data_for(sp, labelled(sp, 40))
    m = e2urec(sharp, forget_teacher="base")
    m.fit(data)
    frame = m.training_frame(data)
    gone = frame.filter(pl.col("user_id").is_in(forget))["prompt"].to_list()
    assert len(gone) >= 3
    test = P.eligible(sp, "test")
    kept = ~test["user_id"].is_in(forget).to_numpy()
    p_orig_f = m.predict_proba(gone)
    p_orig_t = m.predict(data, test)[1]
    p_base_f = plain_scores(sharp, sp, frame.filter(pl.col("user_id").is_in(forget)))
    tuned = {n: p.detach().clone() for n, p in m.net_.lm.named_parameters() if "lora_" in n}
    assert p_orig_f.mean() - p_base_f.mean() > 0.1  # tuning moved the forgotten prompts away from the backbone

    m.unlearn(data, forget)
    teacher = np.array(m.unlearned_["forget_teacher_p"])
    assert np.allclose(teacher, p_base_f, atol=1e-5)  # the forgetting teacher here: the untuned backbone
    p_unl_f = m.predict_proba(gone)
    p_unl_t = m.predict(data, test)[1]
    gap_before, gap_after = np.abs(p_orig_f - teacher).mean(), np.abs(p_unl_f - teacher).mean()
    assert gap_after < gap_before - 0.03  # the forgotten users' prompts move towards the forgetting teacher
    moved_kept = np.abs(p_unl_t - p_orig_t)[kept].mean()
    assert moved_kept < 0.01 and moved_kept < 0.5 * np.abs(p_unl_f - p_orig_f).mean()  # the others stay
    assert all(torch.equal(p, tuned[n]) for n, p in m.net_.lm.named_parameters() if "lora_" in n)
    with m.original():
        assert np.allclose(m.predict_proba(gone), p_orig_f, atol=1e-6)
    assert m.unlearned_["forgotten_prompts"] == len(gone)
    assert m.unlearned_["retained_prompts"] == frame.height - len(gone)
    # save / load keep both sets of adapters
    m.save(tmp_path / "e2u")
    back = E2URec.load(tmp_path / "e2u")
    back.verbose = False
    assert np.allclose(back.predict_proba(gone), p_unl_f, atol=1e-6)
    with pytest.raises(RecForgeError, match="already unlearned"):
        m.unlearn(data, forget)
    fresh = e2urec(sharp)
    fresh.fit(data)
    absent = sorted(set(range(sp.n_users)) - set(frame["user_id"].to_list()))
    if absent:
        with pytest.raises(RecForgeError, match="nothing to forget"):
            fresh.unlearn(data, absent[:1])
    zero = e2urec(sharp)
    zero.fit(data_for(sp))
    with pytest.raises(RecForgeError, match="LoRA-tuned"):
        zero.unlearn(data, forget)


@needs_llm
def test_e2urec_augmented_teacher_pushes_away_from_what_the_forgotten_data_taught(sharp, split):
    _, sp = split
    forget = [0, 1]
    data = data_for(sp, labelled(sp, 40, yes_users=True, forget=forget))  # the forgotten users taught "No"
    m = e2urec(sharp, forget_teacher="augmented", alpha=2.0, aug_epochs=3)
    m.fit(data)
    gone = m.training_frame(data).filter(pl.col("user_id").is_in(forget))["prompt"].to_list()
    p_orig = m.predict_proba(gone)
    m.unlearn(data, forget)
    teacher = np.array(m.unlearned_["forget_teacher_p"])
    assert np.all(teacher > p_orig)  # forced logits: the original minus what tuning on D_f added (more "No")
    p_unl = m.predict_proba(gone)
    assert np.abs(p_unl - teacher).mean() < 0.5 * np.abs(p_orig - teacher).mean()
    assert len(m.unlearned_["augmented_losses"]) == 3


# ---- the task: run folders -----------------------------------------------------------------------------
@needs_llm
def test_task_runs_cora_and_an_unlearning_run(sharp, ml, tmp_path):
    from recforge.llm import task

    common = {"llm.path": str(sharp), "data.test_prompts": 24, "data.cache": False, "split.test_ratio": 0.25,
              "data.train_prompts": 16, "data.max_train_share": 0.2, "model.k": 4, "model.epochs": 1,
              "model.lr": 0.02, "model.verbose": False}
    cora = task.train("cora", str(ml), {**common, "model.cf_dim": 8, "model.cf_epochs": 3, "model.gen_hidden": 16},
                      out=tmp_path, verbose=False)
    m = cora.metrics
    assert m["model"] == "cora" and m["test"]["n_rows"] == 24 and 0 <= m["test"]["auc"] <= 1
    assert m["protocol"]["collaborative_model"]["rows"] > 0 and m["protocol"]["generator"]["queries"] == 4
    again = task.evaluate(cora)
    assert abs(again["test"]["auc"] - m["test"]["auc"]) < 1e-6

    run = task.train("e2urec", str(ml), {**common, "data.forget_users": 0.25, "model.unlearn_epochs": 2},
                     out=tmp_path, verbose=False)
    u = run.metrics["protocol"]["unlearning"]
    tuned = u["tuned_users"]
    assert len(u["forgotten_users"]) == max(1, round(0.25 * tuned)) == len(u["forgotten_users_raw"])
    assert u["forgotten_prompts"] + u["retained_prompts"] == 16 and u["forgotten_prompts"] > 0
    prompts = pl.read_parquet(run.path / "prompts_train.parquet")
    assert set(u["forgotten_users"]) <= set(prompts["user_id"].to_list())
    for part in ("retained_test", "forgotten_test"):
        if u[part]["rows"]:
            assert {"original", "unlearned", "retrained"} <= set(u[part])
    f = u["forgetting"]
    assert f["prompts"] == u["forgotten_prompts"] and f["jsd_vocab_unlearned_vs_retrained"] >= 0
    t = run.metrics["timing"]["unlearning"]
    assert t["unlearn_seconds"] > 0 and t["retrain_seconds"] > 0
    per_row = pl.read_parquet(run.path / "unlearning_test.parquet")
    preds = pl.read_parquet(run.path / "predictions_test.parquet")
    assert np.allclose(per_row["p_unlearned"].to_numpy(), preds["p:like"].to_numpy())
    assert per_row["forgotten"].sum() == u["forgotten_test"]["rows"] == per_row.height - u["retained_test"]["rows"]
    assert not np.allclose(per_row["p_original"].to_numpy(), per_row["p_unlearned"].to_numpy(), atol=1e-7)
    # the saved model is the unlearned one
    again = task.evaluate(run)
    assert abs(again["test"]["auc"] - run.metrics["test"]["auc"]) < 1e-6
    saved = json.loads((run.path / "metrics.json").read_text())
    assert saved["protocol"]["unlearning"]["forget_seed"] == 0


def test_forget_users_is_checked_before_anything_runs(ml, tmp_path):
    from recforge.errors import ConfigError
    from recforge.llm import task

    base = {"data.cache": False, "data.train_prompts": 8}
    with pytest.raises(ConfigError, match="cannot unlearn; use e2urec"):
        task.train("rella", str(ml), {**base, "data.forget_users": 2}, out=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match="cannot unlearn"):
        task.train("lr", str(ml), {**base, "data.forget_users": 2}, out=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match="needs a tuned model"):
        task.train("e2urec", str(ml), {"data.cache": False, "data.forget_users": 2}, out=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match="a number of users"):
        task.train("e2urec", str(ml), {**base, "data.forget_users": 1.5}, out=tmp_path, verbose=False)
    assert not any(tmp_path.iterdir())


# ---- RecLoRA --------------------------------------------------------------------------------------
def reclora(backbone, **kw):
    from recforge.llm.reclora import RecLoRA

    params = {**SMALL, "long_k": 8, "crm_dim": 8, "crm_epochs": 3, **kw}
    return RecLoRA(backbone=str(backbone), **params)


@needs_llm
def test_reclora_mixes_experts_per_user(sharp, split, tmp_path):
    import torch

    from recforge.llm import prompts as P
    from recforge.llm.reclora import RecLoRA, long_histories

    _, sp = split
    data = data_for(sp, P.sample_targets(P.eligible(sp, "train"), 16, 0))
    test = P.eligible(sp, "test").head(12)
    p0 = plain_scores(sharp, sp, test)
    m = reclora(sharp, n_experts=4)
    m.fit(data)
    assert m.crm_["rows"] == sp.train.height  # the conventional model saw every training row (Few2Many)
    state = m.net_.state_dict()
    assert state and all(k.startswith(("a.", "b.", "gate.")) for k in state)
    frame, p1 = m.predict(data, test)
    assert not np.allclose(p1, p0, atol=1e-4)
    # the long history feeds the conventional model: training rows strictly before the target, up to long_k
    users, times = frame["user_id"].to_numpy(), frame["timestamp"].to_numpy()
    items, likes = long_histories(sp, users, times, 8)
    for j in range(len(users)):
        rows = sp.history_rows(int(users[j]), int(times[j]))[-8:]
        assert list(items[j][items[j] > 0]) == list(sp._items[rows]) and (likes[j] > 0).sum() == len(rows)
    # different users get different mixtures, hence different adapters
    h = torch.as_tensor(m.user_representations(sp, users, times))
    w = m.net_.gate_weights(h)
    assert torch.allclose(w.sum(1), torch.ones(len(w)))
    a, b = (int(np.flatnonzero(users == u)[0]) for u in np.unique(users)[:2])
    assert not torch.allclose(w[a], w[b], atol=1e-4)
    d = m.net_.deltas(h[[a, b]])
    assert len(d) == 4 and all(x.abs().sum() > 0 for x in d)
    assert not torch.allclose(d[0][0], d[0][1], atol=1e-7)
    # save / load
    m.save(tmp_path / "reclora")
    back = RecLoRA.load(tmp_path / "reclora")
    back.verbose = False
    assert np.allclose(back.predict(data, test)[1], p1, atol=1e-6)


@needs_llm
def test_reclora_with_one_expert_is_plain_lora(sharp, split):
    import torch

    from recforge.llm import prompts as P
    from recforge.llm.base import AdapterNet, target_linears
    from recforge.llm.rella import ReLLa

    _, sp = split
    data = data_for(sp, P.sample_targets(P.eligible(sp, "train"), 12, 1))
    test = P.eligible(sp, "test").head(8)
    m = reclora(sharp, n_experts=1)
    m.fit(data)
    frame, p1 = m.predict(data, test)
    assert np.all(m.net_.gate_weights(torch.randn(5, 8)).detach().numpy() == 1.0)
    # a peft LoRA of the same rank and scale holding the one expert's A and B scores the same
    plain = ReLLa(backbone=str(sharp), **SMALL)
    plain.fit(data_for(sp))
    plain.net_ = AdapterNet(plain._attach_lora(plain.net_.lm))
    wrappers = target_linears(plain.net_.lm, plain.lora_targets)
    assert len(wrappers) == len(m.net_.a)
    with torch.no_grad():
        for (_, _, mod), a, b in zip(wrappers, m.net_.a, m.net_.b):
            mod.lora_A["default"].weight.copy_(a)
            mod.lora_B["default"].weight.copy_(b)
    assert np.allclose(plain.predict_proba(frame["prompt"].to_list()), p1, atol=1e-5)
    assert not np.allclose(p1, plain_scores(sharp, sp, test), atol=1e-4)


# ---- defaults and checks (nothing loaded) ----------------------------------------------------------
@pytest.mark.parametrize("name", ["cora", "e2urec", "reclora"])
def test_registered_with_defaults_that_construct(name):
    from recforge.llm import task

    assert task.is_llm(name)
    cfg = task.resolve(name, "somewhere", {"model.k": 5})
    assert cfg["model"]["name"] == name and cfg["model"]["k"] == 5 and cfg["data"]["forget_users"] == 0
    est = task.model_class(name)(**task.llm_params(cfg, False))
    assert est.name == name and est.retrieval == "recent" and est.mix is False


def test_constructor_checks():
    from recforge.errors import ConfigError
    from recforge.llm.cora import CoRA
    from recforge.llm.e2urec import E2URec
    from recforge.llm.reclora import RecLoRA

    with pytest.raises(ConfigError, match="multiple of gen_heads"):
        CoRA(gen_hidden=10, gen_heads=4)
    with pytest.raises(ConfigError, match="forget_teacher"):
        E2URec(forget_teacher="oracle")
    with pytest.raises(ConfigError, match="weight"):
        E2URec(weight=1.5)
    with pytest.raises(ConfigError, match="forgetting-only"):
        E2URec(unlearn_epochs=1, forget_epochs=2)
    with pytest.raises(ConfigError, match="at least one expert"):
        RecLoRA(n_experts=0)
    with pytest.raises(ConfigError, match="long history"):
        RecLoRA(k=10, long_k=5)
