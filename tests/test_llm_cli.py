"""The language-model task through the ``recforge`` command and :mod:`recforge.api`: train (zero-shot
on a tiny random Llama), evaluate, compare with the ID baseline trained from the run's config, the
ranking verbs refusing it with one clear message, and ``recforge models`` listing it."""

from __future__ import annotations

import json

import pytest
import yaml

from recforge import api
from recforge.cli import main

from test_llm import needs_llm
from test_llm import ml, split, tiny  # noqa: F401 - pytest fixtures shared with test_llm


def test_models_lists_the_language_models(capsys):
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert "rella" in names and "sasrec" in names


@needs_llm
def test_train_evaluate_compare_through_the_command(tiny, ml, tmp_path, capsys):
    out = tmp_path / "runs"
    common = [f"llm.path={tiny}", "llm.encoder=hashing:32", "data.test_prompts=20", "data.cache=false",
              "split.test_ratio=0.25"]
    assert main(["train", "rella", "--data", str(ml), *common, "model.k=4", "retrieval=recent",
                 "eval.listwise=10", "eval.listwise_targets=4", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "test (language model, pointwise on 20 sampled prompts" in printed and "auc" in printed
    assert "test (SAMPLED LISTWISE (10 candidates)" in printed and "ndcg@10" in printed
    (run,) = out.iterdir()
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "llm" and m["model"] == "rella" and m["test"]["n_rows"] == 20
    # the run's config trains the ID baseline on the same test sample (a config with an llm section)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"] = {"name": "lr", "epochs": 2}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "base.yaml"), "--out", str(tmp_path / "base"), "--quiet"]) == 0
    (base,) = (tmp_path / "base").iterdir()
    assert json.loads((base / "metrics.json").read_text())["protocol"]["test_sample"] == m["protocol"]["test_sample"]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert abs(again["test"]["auc"] - m["test"]["auc"]) < 1e-6
    assert main(["compare", str(run), str(base)]) == 0
    assert "paired bootstrap" in capsys.readouterr().out
    # the ranking options and verbs refuse a language-model run with one message each
    assert main(["evaluate", str(run), "--sampled", "99"]) == 2
    assert "language-model run" in capsys.readouterr().err
    with pytest.raises(Exception, match="does not rank the catalogue"):
        api.recommend(run, user="1")
    assert main(["export", str(run), "--out", str(tmp_path / "art")]) == 2
    assert "no serving artifact" in capsys.readouterr().err and not (tmp_path / "art").exists()
