"""Serving a model that reads the time between events (CmnRec with ``chunk=gap``): the history's
timestamps and those of fresh events reach the model, a raw history can carry its own, and a
model that does not read times never receives them."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
pytest.importorskip("httpx2")

from fastapi.testclient import TestClient  # noqa: E402

import recforge  # noqa: E402
from recforge.data.synthetic import make_synthetic  # noqa: E402
from recforge.serving import create_app, export_artifact  # noqa: E402

FAST = {"epochs": 2, "hidden": 16, "word_size": 8, "max_len": 20, "batch_size": 128, "threads": 1,
        "data.cache": False}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-times")
    raw = make_synthetic(n_users=120, n_items=60, n_categories=4, mean_length=12, seed=3)
    raw.interactions.write_parquet(root / "log.parquet")
    gap = recforge.train("cmnrec", str(root / "log.parquet"), {**FAST, "chunk": "gap"}, out=root / "runs",
                         verbose=False)
    pec = recforge.train("cmnrec", str(root / "log.parquet"), {**FAST, "chunk": "pec"}, out=root / "runs",
                         verbose=False)
    return {"raw": raw, "gap": export_artifact(gap.path, root / "art-gap"),
            "pec": export_artifact(pec.path, root / "art-pec")}


def _spy(client) -> list:
    """Record the ``times`` of every Histories the served model scores."""
    model = client.app.state.serving.engine.model
    seen, score = [], model.score

    def recording(hist):
        seen.append(None if hist.times is None else hist.times.tolist())
        return score(hist)

    model.score = recording
    return seen


def _scores(resp) -> list[float]:
    assert resp.status_code == 200, resp.text
    return [x["score"] for x in resp.json()["items"]]


def test_history_and_event_times_reach_the_model(artifacts):
    raw = artifacts["raw"].interactions.sort(["user_id", "timestamp"])
    user = raw["user_id"][0]
    own = raw.filter(raw["user_id"] == user)["timestamp"].to_list()
    app = create_app(artifacts["gap"], admin_key="a", api_key="")
    with TestClient(app) as c:
        assert c.app.state.serving.engine.needs_times
        seen = _spy(c)
        item = str(raw["item_id"][5])
        assert c.post("/v1/events", json={"events": [{"user_id": str(user), "item_id": item,
                                                      "timestamp": own[-1] + 10}]}).status_code == 200
        _scores(c.get(f"/v1/users/{user}/recommendations", params={"k": 5}))
        assert seen[-1] == own[-10_000:] + [own[-1] + 10]  # the history's times, then the event's
        hist = [str(i) for i in raw["item_id"][:8].to_list()]
        close = _scores(c.post("/v1/recommendations", json={"history": hist, "timestamps": list(range(8)), "k": 20}))
        assert seen[-1] == list(range(8))
        far = _scores(c.post("/v1/recommendations",
                             json={"history": hist, "timestamps": [10**7 * i for i in range(8)], "k": 20}))
        assert not np.allclose(close, far)  # other gaps close other chunks
        _scores(c.post("/v1/recommendations", json={"history": hist, "k": 5}))
        assert seen[-1] is None  # no times given: the model falls back (it warns)
        bad = c.post("/v1/recommendations", json={"history": hist, "timestamps": [1, 2], "k": 5})
        assert bad.status_code == 400 and "one timestamp per history item" in bad.text
        assert c.post("/v1/recommendations", json={"history": hist, "timestamps": [-1] * 8}).status_code == 422


def test_a_model_without_times_gets_none(artifacts):
    raw = artifacts["raw"].interactions
    user = raw["user_id"][0]
    with TestClient(create_app(artifacts["pec"], admin_key="a", api_key="")) as c:
        assert not c.app.state.serving.engine.needs_times
        seen = _spy(c)
        _scores(c.get(f"/v1/users/{user}/recommendations", params={"k": 5}))
        hist = [str(i) for i in raw["item_id"][:4].to_list()]
        _scores(c.post("/v1/recommendations", json={"history": hist, "timestamps": [1, 2, 3, 4], "k": 5}))
        assert seen == [None, None]
