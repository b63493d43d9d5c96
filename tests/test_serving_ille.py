"""Serving a model that places new items (HetSGFormer + ILLE): an event naming an item outside the
catalogue places it from the users who had it, and the next recommendations of a similar user
contain it; a model without ``add_items`` keeps such an item unknown."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
pytest.importorskip("httpx2")

from fastapi.testclient import TestClient  # noqa: E402

import recforge  # noqa: E402
from recforge.data.synthetic import make_synthetic  # noqa: E402
from recforge.serving import create_app, export_artifact  # noqa: E402

MODEL = {"epochs": 10, "dim": 32, "batch_size": 256, "lr": 0.01, "eval_every": 5, "threads": 1, "verbose": False}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-ille")
    raw = make_synthetic(n_users=300, n_items=150, n_categories=8, mean_length=12, seed=1)
    raw.interactions.write_parquet(root / "log.parquet")
    raw.items.write_parquet(root / "items.parquet")
    data = {"data.items": str(root / "items.parquet"), "data.cache": False}
    het = recforge.train("hetsgformer", str(root / "log.parquet"), {**data, **MODEL}, out=root / "runs", verbose=False)
    bpr = recforge.train("bpr", str(root / "log.parquet"), {**data, "epochs": 2}, out=root / "runs", verbose=False)
    return {"raw": raw, "het": export_artifact(het.path, root / "art-het"),
            "bpr": export_artifact(bpr.path, root / "art-bpr")}


def _ids(resp) -> list:
    return [x["item_id"] for x in resp.json()["items"]]


@pytest.mark.parametrize("ann_threshold", [100_000, 0])
def test_a_new_item_from_events_reaches_a_similar_users_recommendations(artifacts, ann_threshold):
    """User ``u`` is recommended item ``x`` first. The users who had ``x`` now have a new item
    ``new-x`` (events); ILLE places it next to ``x`` (the items sharing those users), so ``u``, whose
    taste the model ties to ``x``'s users, finds ``new-x`` among the next recommendations. With
    ``ann_threshold=0`` the HNSW index serves the catalogue and the new item is scored beside it."""
    inter = artifacts["raw"].interactions
    app = create_app(artifacts["het"], api_key="", ann_threshold=ann_threshold)
    with TestClient(app) as client:
        eng = client.app.state.serving.engine
        assert eng.grows and (eng.ann is not None) == (ann_threshold == 0), eng.ann_status
        n_items = eng.n_items
        user = inter["user_id"][0]
        top = _ids(client.get(f"/v1/users/{user}/recommendations", params={"k": 10}))
        x = top[0]
        had_x = [u for u in inter.filter(pl.col("item_id") == x)["user_id"].unique().to_list() if u != user]
        assert len(had_x) >= 2
        events = [{"user_id": u, "item_id": "new-x"} for u in had_x] + [{"user_id": "nobody", "item_id": "lonely"}]
        t0 = time.perf_counter()
        r = client.post("/v1/events", json={"events": events})
        after = _ids(client.get(f"/v1/users/{user}/recommendations", params={"k": 10}))
        seconds = time.perf_counter() - t0
        print(f"event to recommendation: {seconds * 1000:.1f} ms")
        assert r.status_code == 200
        # the new item is known now; an item whose only user is unknown to the model waits
        assert r.json() == {"accepted": len(events), "unknown_items": ["lonely"]}
        assert eng.n_items == n_items + 1 and eng.item_raw[-1] == "new-x"
        assert "new-x" in after and x in after
        # the engine's vectors follow the model: similar items of the new one start with x
        similar = client.get("/v1/items/new-x/similar", params={"k": 3}).json()
        assert similar["items"][0]["item_id"] == x
        # a user who had it does not get it again; more events move it without adding a second copy
        had = client.get(f"/v1/users/{had_x[0]}/recommendations", params={"k": 50})
        assert "new-x" not in _ids(had)
        r = client.post("/v1/events", json={"events": [{"user_id": user, "item_id": "new-x"}]})
        assert r.json()["unknown_items"] == [] and eng.n_items == n_items + 1
        # a history posted directly may hold it too
        body = client.post("/v1/recommendations", json={"history": ["new-x"], "k": 5}).json()
        assert body["unknown_items"] == [] and len(body["items"]) == 5


def test_a_model_without_add_items_keeps_new_items_unknown(artifacts):
    app = create_app(artifacts["bpr"], api_key="")
    with TestClient(app) as client:
        eng = client.app.state.serving.engine
        assert not eng.grows
        user = artifacts["raw"].interactions["user_id"][0]
        r = client.post("/v1/events", json={"events": [{"user_id": user, "item_id": "new-y"}]})
        assert r.json() == {"accepted": 1, "unknown_items": ["new-y"]}
        assert "new-y" not in eng.item_index and eng.item_raw[-1] != "new-y"
        assert np.isfinite(eng.popularity[1:]).all()


def test_events_memory_stays_bounded(artifacts, monkeypatch):
    from recforge.serving import engine as E
    from recforge.serving import load_artifact

    eng = E.Engine(load_artifact(artifacts["het"]))
    assert eng.learn_events([("no-such-user", f"new-{i}") for i in range(50)]) == []
    assert eng._event_users == {}  # unknown users leave nothing behind
    monkeypatch.setattr(E, "MAX_PLACEMENT_USERS", 3)
    users = list(eng.user_index)[:6]
    assert eng.learn_events([(u, "fresh-item") for u in users]) == ["fresh-item"]
    assert len(eng._event_users["fresh-item"]) == 3
    eng.close()
