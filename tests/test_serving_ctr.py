"""Serving a CTR run: export, the scoring endpoint against batch scoring, and bad requests."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx2")

from fastapi.testclient import TestClient  # noqa: E402

import recforge  # noqa: E402
from recforge import ctr  # noqa: E402
from recforge.serving import create_app, export_artifact, load_artifact  # noqa: E402


def _table(n: int, seed: int) -> pl.DataFrame:
    """Users 0-39, items 0-24 with a price and tags; the click depends on user x item."""
    rng = np.random.default_rng(seed)
    u, i = rng.integers(0, 40, n), rng.integers(0, 25, n)
    price = (i * 3.5 + rng.normal(0, 1, n)).round(2)
    tags = ["|".join(sorted({f"t{i_ % 5}", f"t{(i_ * 7) % 5}"})) for i_ in i]
    click = rng.random(n) < np.where((u + i) % 2 == 0, 0.8, 0.2)
    return pl.DataFrame({"user": u, "item": i.astype(str), "price": price, "tags": tags,
                         "hour": rng.integers(0, 24, n), "click": click.astype(int)})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctr-serving")
    _table(4000, 0).write_csv(root / "clicks.csv")
    run = recforge.train("deepfm", str(root / "clicks.csv"),
                         {"data.label": "click", "data.categorical": "user,item,hour", "data.numeric": "price",
                          "data.multi": "tags", "data.splitter": "|", "data.user_col": "user", "epochs": 3,
                          "batch_size": 256, "embedding_dim": 8, "hidden": [32], "threads": 1},
                         out=root / "runs", verbose=False)
    art = export_artifact(run.path, root / "art")
    pop = recforge.train("pop", str(_ranking_log(root)), {"data.cache": False}, out=root / "runs", verbose=False)
    ranking_art = export_artifact(pop.path, root / "art-pop")
    app = create_app(art, api_key="", admin_key="")
    with TestClient(app) as client:
        yield {"root": root, "run": run, "art": art, "ranking_art": ranking_art, "client": client}


def _ranking_log(root):
    from recforge.data.synthetic import make_synthetic

    make_synthetic(n_users=50, n_items=30, mean_length=6, seed=0).interactions.write_parquet(root / "log.parquet")
    return root / "log.parquet"


def test_export_of_a_ctr_run(served):
    m = json.loads((served["art"] / "manifest.json").read_text())
    assert m["task"] == "ctr" and m["labels"] == ["click"] and m["user_column"] == "user"
    assert {f["name"]: f["kind"] for f in m["features"]} == {"user": "categorical", "item": "categorical",
                                                              "hour": "categorical", "price": "numeric",
                                                              "tags": "multi"}
    assert "encoders/encoders.json" in m["files"] and "model/model.pt" in m["files"]
    art = load_artifact(served["art"])
    assert art.task == "ctr" and art.encoder.schema.labels == ["click"]
    health = served["client"].get("/health").json()
    assert health["model"]["task"] == "ctr" and health["model"]["labels"] == ["click"]


def test_export_command_writes_a_ctr_artifact(served, tmp_path, capsys):
    from recforge.cli import main

    assert main(["export", str(served["run"].path), "--out", str(tmp_path / "art")]) == 0
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["task"] == "ctr"
    assert capsys.readouterr().out.strip().endswith("art")


def test_scores_equal_batch_scoring(served, tmp_path):
    """The endpoint gives the probabilities that `recforge predict` gives for the same rows."""
    rows = _table(30, 7)
    rows.write_csv(tmp_path / "rows.csv")
    ctr.predict(served["run"].path, tmp_path / "p.parquet", rows=tmp_path / "rows.csv")
    expected = pl.read_parquet(tmp_path / "p.parquet")["p:click"].to_numpy()
    got = []
    for r in rows.iter_rows(named=True):  # one user per request, with the row's context and one candidate
        body = {"user_id": r["user"], "context": {"hour": r["hour"]},
                "candidates": [{"item": r["item"], "price": r["price"], "tags": r["tags"].split("|")}]}
        resp = served["client"].post("/v1/score", json=body)
        assert resp.status_code == 200, resp.text
        got.append(resp.json()["scores"][0]["click"])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # several candidates in one request keep their order; a candidate's value wins over the context's
    body = {"user_id": 3, "context": {"hour": 5, "price": 1.0, "tags": "t1|t2"},
            "candidates": [{"item": "4"}, {"item": "7", "price": 20.5}, {"item": 4}]}
    out = served["client"].post("/v1/score", json=body).json()
    s = [x["click"] for x in out["scores"]]
    assert len(s) == 3 and s[0] == pytest.approx(s[2]) and out["unseen"] == {} and out["user_id"] == "3"


def test_unseen_values_are_reported_or_refused(served):
    body = {"user_id": "new-user", "context": {"hour": 99, "price": 3.0, "tags": []}, "candidates": [{"item": "4"}]}
    out = served["client"].post("/v1/score", json=body)
    assert out.status_code == 200
    assert out.json()["unseen"] == {"user": {"count": 1, "examples": ["new-user"]},
                                    "hour": {"count": 1, "examples": ["99"]}}
    refused = served["client"].post("/v1/score", json={**body, "unseen": "error"})
    assert refused.status_code == 400
    assert "values never seen in training in the request (user: 1 value(s), e.g. 'new-user'" in refused.json()["detail"]


@pytest.mark.parametrize("body, status, message", [
    ({"user_id": 1, "context": {"hour": 1, "price": 2.0, "tags": []}, "candidates": [{"itme": "3"}]},
     400, "candidates.0: 'itme' is not a feature of model deepfm"),
    ({"user_id": 1, "context": {"hour": 1, "tags": []}, "candidates": [{"item": "3", "price": 1.0}, {"item": "4"}]},
     400, "feature(s) 'price' missing"),
    ({"context": {"hour": 1, "price": 2.0, "tags": []}, "candidates": [{"item": "3"}]},
     400, "the user column 'user' may come as user_id"),
    ({"user_id": 1, "context": {"hour": 1, "price": "cheap", "tags": []}, "candidates": [{"item": "3"}]},
     400, "feature 'price' is numeric: 'cheap' is not a number"),
    ({"user_id": 1, "context": {"hour": 1, "price": 2.0, "tags": 5}, "candidates": [{"item": "3"}]},
     400, "feature 'tags' is a multi field"),
    ({"user_id": 1, "candidates": []}, 422, "candidates"),
    ({"user_id": 1, "candidates": [{"item": {"nested": 1}}]}, 422, "candidates"),
])
def test_bad_requests_get_one_clear_message(served, body, status, message):
    resp = served["client"].post("/v1/score", json=body)
    assert resp.status_code == status and message in resp.json()["detail"], resp.text


def test_ranking_endpoints_and_scoring_refuse_the_other_task(served):
    resp = served["client"].get("/v1/users/1/recommendations")
    assert resp.status_code == 400 and "is a CTR model" in resp.json()["detail"]
    assert served["client"].post("/v1/events", json={"events": [{"user_id": 1, "item_id": 2}]}).json()["accepted"] == 1
    app = create_app(served["ranking_art"], api_key="", admin_key="")
    with TestClient(app) as client:
        resp = client.post("/v1/score", json={"candidates": [{"item": "1"}]})
        assert resp.status_code == 400 and "/v1/score serves CTR models" in resp.json()["detail"]
