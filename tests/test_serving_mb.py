"""Serving a multi-behaviour model: the artifact keeps the behaviour of every history row, an event's
behaviour reaches the model at once, and ``exclude_seen`` removes only the target behaviour's items
(a viewed item stays a candidate for purchase), in the server, ``Run.recommend`` and ``recommend``."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
pytest.importorskip("httpx2")

from fastapi.testclient import TestClient  # noqa: E402

import recforge  # noqa: E402
from recforge.evaluation.batch import Histories  # noqa: E402
from recforge.serving import create_app, export_artifact  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-mb")
    run = recforge.train("mbgcn", "synthetic-mb", {"data.target_behavior": "buy", "dim": 16, "epochs": 3,
                                                   "batch_size": 1024, "threads": 1, "data.cache": False},
                         out=root / "runs", verbose=False)
    art = export_artifact(run.path, root / "art")
    app = create_app(art, events_path=root / "events.sqlite", api_key="", admin_key="")
    with TestClient(app) as client:
        yield {"run": run, "art": art, "client": client}


def _ids(r) -> list:
    assert r.status_code == 200, r.text
    return [x["item_id"] for x in r.json()["items"]]


def _user_with(run, behavior: str):
    """A user and the raw ids of their items of ``behavior`` and of the other behaviours."""
    inter = pl.read_parquet(run.path / "interactions.parquet")
    u = int(inter.filter(pl.col("behavior") == behavior)["user_id"][0])
    rows = inter.filter(pl.col("user_id") == u)
    ds = run.dataset
    raw = lambda f: set(ds.decode_items(f["item_id"].to_numpy()))  # noqa: E731
    return ds.decode_users([u])[0], raw(rows.filter(pl.col("behavior") == behavior)), raw(
        rows.filter(pl.col("behavior") != behavior))


def test_artifact_keeps_behaviours(served):
    inter = pl.read_parquet(served["art"] / "interactions.parquet")
    assert set(inter["behavior"].unique()) == {"view", "cart", "buy"}


def test_only_target_behaviour_items_are_excluded(served):
    run, client = served["run"], served["client"]
    user, bought, other = _user_with(run, "buy")
    n_items = run.dataset.n_items
    ids = _ids(client.get(f"/v1/users/{user}/recommendations", params={"k": n_items}))
    assert not (set(ids) & bought)  # past purchases never come back
    assert other - bought <= set(ids)  # every item only viewed or carted is still a candidate
    # the Python API follows the same rule
    api_ids = {r["item_id"] for r in recforge.recommend(run, user=user, k=n_items)}
    assert not (api_ids & bought) and other - bought <= api_ids


def test_an_events_behaviour_changes_the_next_recommendation(served):
    client = served["client"]
    user, _, _ = _user_with(served["run"], "buy")
    before = client.get(f"/v1/users/{user}/recommendations", params={"k": 20}).json()["items"]
    top = before[0]["item_id"]
    # a view of the top item: still a candidate, and the scores move at once
    r = client.post("/v1/events", json={"events": [{"user_id": user, "item_id": top, "behavior": "view",
                                                    "timestamp": 1_900_000_000}]})
    assert r.status_code == 200
    viewed = client.get(f"/v1/users/{user}/recommendations", params={"k": 20}).json()["items"]
    assert top in [x["item_id"] for x in viewed]
    assert [x["score"] for x in viewed] != [x["score"] for x in before]
    # a purchase of it: excluded from then on
    client.post("/v1/events", json={"events": [{"user_id": user, "item_id": top, "behavior": "buy",
                                                "timestamp": 1_900_000_001}]})
    assert top not in _ids(client.get(f"/v1/users/{user}/recommendations", params={"k": 20}))


def test_history_request_with_behaviours(served):
    client = served["client"]
    hist = [1, 2, 3]
    with_buy = _ids(client.post("/v1/recommendations", json={"history": hist, "behaviors": ["view", "view", "buy"],
                                                             "k": 1000}))
    assert 3 not in with_buy and {1, 2} <= set(with_buy)
    bad = client.post("/v1/recommendations", json={"history": hist, "behaviors": ["view"], "k": 5})
    assert bad.status_code == 400 and "one behaviour per history item" in bad.json()["detail"]


def test_seen_mask_by_hand(served):
    model = served["run"].model
    h = Histories.from_lists([-1, -1], [[4, 5, 6], [7]], model.n_items_, [["buy", "view", None], ["cart"]])
    assert model.seen_mask(h).tolist() == [True, False, False, False]  # None counts as the default (view)
    top, _ = model.recommend(h, k=model.n_items_ - 1)
    assert 4 not in top[0] and {5, 6} <= set(top[0].tolist()) and 7 in top[1]
    plain = Histories.from_lists([-1], [[4, 5]], model.n_items_)
    assert not model.seen_mask(plain).any() and np.isin([4, 5], model.recommend(plain, k=model.n_items_ - 1)[0]).all()
