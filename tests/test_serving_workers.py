"""``recforge serve --workers 2``: two real worker processes over one artifact and one event log.

Each test talks to a chosen worker: an HTTP/1.1 keep-alive connection stays with the worker that
accepted it, and ``/health`` names that worker's pid. Events posted through one worker must be
durable (in the file, and still there after that worker is killed), in one global order, and part
of the very next answer of the other worker; a reload through one worker must reach both; client
mistakes are 4xx in every worker."""

from __future__ import annotations

import gc
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx2")

import recforge  # noqa: E402
from recforge.data.synthetic import make_synthetic  # noqa: E402
from recforge.errors import RecForgeError  # noqa: E402
from recforge.serving import create_app, export_artifact  # noqa: E402
from recforge.serving.events import EventStore  # noqa: E402

ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """EASE and Pop artifacts of one small synthetic log (Pop: a model that is easy to tell apart)."""
    root = tmp_path_factory.mktemp("workers")
    raw = make_synthetic(n_users=200, n_items=120, n_categories=5, mean_length=10, seed=3)
    raw.interactions.write_parquet(root / "log.parquet")
    runs = {m: recforge.train(m, str(root / "log.parquet"), {"data.cache": False}, out=root / "runs", verbose=False)
            for m in ("ease", "pop")}
    return {"root": root, "raw": raw, **{m: export_artifact(r.path, root / f"art-{m}") for m, r in runs.items()}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(artifacts):
    """``recforge serve ease --workers 2`` and one client pinned to each worker."""
    port, events = _free_port(), artifacts["root"] / "events.sqlite"
    env = dict(os.environ, RECFORGE_ADMIN_KEY=ADMIN, RECFORGE_API_KEY="")
    log = open(artifacts["root"] / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "recforge.cli", "serve", str(artifacts["ease"]), "--host",
                             "127.0.0.1", "--port", str(port), "--events", str(events), "--workers", "2"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    svc = {"proc": proc, "base": f"http://127.0.0.1:{port}", "events": events, "clients": {}, "port": port}
    try:
        _pair(svc)
        yield svc
    finally:
        for c in svc["clients"].values():
            c.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _pair(service, timeout: float = 90):
    """(pid, client) of each of the two workers. A client whose connection the server closed (idle
    keep-alive) may have reconnected to the other worker: it is replaced, as are clients of dead
    workers, by new connections until both workers have one."""
    clients = service["clients"]
    for pid, c in list(clients.items()):
        try:
            same = c.get("/health").json()["worker"]["pid"] == pid
        except httpx.HTTPError:
            same = False
        if not same:
            c.close()
            del clients[pid]
    deadline = time.time() + timeout
    while len(clients) < 2:
        assert time.time() < deadline, f"two workers did not answer within {timeout} s"
        assert service["proc"].poll() is None, f"server exited with {service['proc'].returncode}"
        c = httpx.Client(base_url=service["base"], timeout=30, limits=httpx.Limits(max_connections=1))
        try:
            pid = c.get("/health").json()["worker"]["pid"]
        except httpx.HTTPError:
            c.close()
            time.sleep(0.3)
            continue
        if pid in clients:
            c.close()
            time.sleep(0.05)
        else:
            clients[pid] = c
    return list(clients.items())


def _ids(resp) -> list:
    assert resp.status_code == 200, resp.text
    return [x["item_id"] for x in resp.json()["items"]]


def _stored(events_path) -> list[tuple]:
    conn = sqlite3.connect(events_path)
    try:
        return conn.execute("SELECT seq, user_id, item_id, timestamp FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()


def test_an_event_posted_to_one_worker_changes_the_next_answer_of_the_other(service, artifacts):
    (pa, a), (pb, b) = _pair(service)
    assert pa != pb
    user = str(artifacts["raw"].interactions["user_id"][7])
    before = _ids(b.get(f"/v1/users/{user}/recommendations", params={"k": 10}))
    r = a.post("/v1/events", json={"events": [{"user_id": user, "item_id": before[0], "timestamp": 1_900_000_000}]})
    assert r.status_code == 200 and r.json()["accepted"] == 1
    after = _ids(b.get(f"/v1/users/{user}/recommendations", params={"k": 10}))  # at once, no waiting
    assert before[0] not in after and after != before
    # a user nobody has seen: popularity in both workers, then the model on the history posted to the other
    assert b.get("/v1/users/brand-new/recommendations").json()["fallback"] == "popularity"
    r = b.post("/v1/events", json={"events": [{"user_id": "brand-new", "item_id": i} for i in (3, 4)]})
    assert r.status_code == 200
    body = a.get("/v1/users/brand-new/recommendations", params={"k": 10}).json()
    assert body["fallback"] is None and not ({3, 4} & set(_ids_of(body)))


def _ids_of(body) -> list:
    return [x["item_id"] for x in body["items"]]


def test_events_of_all_workers_form_one_order_that_follows_the_acknowledgements(service):
    (_, a), (_, b) = _pair(service)
    # one user, the same timestamp, posted alternately through the two workers: the order of the
    # acknowledgements must be the stored order, and each worker must read it back the same way
    acked = []
    for j in range(12):
        c = (a, b)[j % 2]
        r = c.post("/v1/events", json={"events": [{"user_id": "order-u", "item_id": 10 + j, "timestamp": 5}]})
        assert r.status_code == 200
        acked.append(str(10 + j))
    stored = [row for row in _stored(service["events"]) if row[1] == "order-u"]
    assert [row[2] for row in stored] == acked
    # concurrent writers on both workers: sequence numbers unique and increasing; every client's
    # own events in the order it had them acknowledged
    per_client: dict[str, list[str]] = {}

    def post(name: str, client_pid):
        c = service["clients"][client_pid]
        mine = per_client.setdefault(name, [])
        for k in range(8):
            item = f"{name}-{k}"
            r = c.post("/v1/events", json={"events": [{"user_id": f"conc-{name}", "item_id": item, "timestamp": 1}]})
            assert r.status_code == 200
            mine.append(item)

    # one thread per worker client (an httpx client is one connection: no sharing between threads)
    threads = [threading.Thread(target=post, args=(f"t{i}", pid)) for i, pid in enumerate(service["clients"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = _stored(service["events"])
    seqs = [row[0] for row in rows]
    assert seqs == sorted(set(seqs))
    for name, items in per_client.items():
        assert [row[2] for row in rows if row[1] == f"conc-{name}"] == items


def test_an_acknowledged_event_is_on_disk_and_survives_killing_its_worker(service):
    (pa, a), (pb, b) = _pair(service)
    r = a.post("/v1/events", json={"events": [{"user_id": "durable-u", "item_id": 9, "timestamp": 1_850_000_000,
                                               "behavior": "buy"}]})
    assert r.status_code == 200
    assert ("durable-u", "9", 1_850_000_000) in {row[1:] for row in _stored(service["events"])}
    os.kill(pa, signal.SIGKILL)  # the worker that acknowledged it
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(pa, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    service["clients"].pop(pa).close()
    assert ("durable-u", "9", 1_850_000_000) in {row[1:] for row in _stored(service["events"])}
    body = b.get("/v1/users/durable-u/recommendations", params={"k": 5}).json()
    assert body["fallback"] is None and 9 not in _ids_of(body)
    # the supervisor replaces the killed worker; the replacement serves the same model and events
    pairs = _pair(service)
    assert pa not in dict(pairs)
    for _, c in pairs:
        assert c.get("/v1/users/durable-u/recommendations", params={"k": 5}).json()["fallback"] is None


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/users/1/recommendations?k=0", None),
    ("GET", "/v1/users/1/recommendations?k=ten", None),
    ("POST", "/v1/recommendations", b"{not json"),
    ("POST", "/v1/events", b'{"events": []}'),
    ("POST", "/v1/events", b'{"events": [{"user_id": 1, "item_id": 2, "timestamp": -1}]}'),
    ("GET", "/v1/items/no-such-item/similar", None),
    ("POST", "/admin/reload", b'{"path": "/no/such/folder"}'),
    ("POST", "/admin/reload", b'{"path": 5}'),
])
def test_client_mistakes_are_4xx_in_every_worker(service, method, path, body):
    for _, c in _pair(service):
        r = c.request(method, path, content=body, headers={"content-type": "application/json", "X-API-Key": ADMIN})
        assert 400 <= r.status_code < 500 and r.json()["detail"], (path, r.status_code, r.text)


def test_a_reload_through_one_worker_reaches_every_worker(service, artifacts, tmp_path):
    (pa, a), (pb, b) = _pair(service)
    gen = a.get("/health").json()["worker"]["generation"]
    assert b.get("/health").json()["worker"]["generation"] == gen
    bad = tmp_path / "bad"
    bad.mkdir()
    r = a.post("/admin/reload", json={"path": str(bad)}, headers={"X-API-Key": ADMIN})
    assert r.status_code == 400  # nothing published: no worker moves
    r = a.post("/admin/reload", json={"path": str(artifacts["pop"])}, headers={"X-API-Key": ADMIN})
    assert r.status_code == 200, r.text
    assert r.json()["workers"] == 2 and r.json()["generation"] > gen and r.json()["current"]["model"] == "pop"
    for c in (b, a):  # right after the answer, with no waiting
        h = c.get("/health").json()
        assert h["model"]["model"] == "pop" and h["worker"]["generation"] == r.json()["generation"]
        assert c.get("/v1/users/1/recommendations").json()["model"] == "pop"
    for _, c in _pair(service):
        assert 'recforge_errors_total{route="all"} 0' in c.get("/metrics").text


class _SlowCommit:
    """The writer's connection, with a pause inside COMMIT (as a slow fsync would make)."""

    def __init__(self, conn, seconds: float):
        self.conn, self.seconds, self.committing = conn, seconds, threading.Event()

    def execute(self, sql, *args):
        if sql == "COMMIT":
            self.committing.set()
            time.sleep(self.seconds)
        return self.conn.execute(sql, *args)

    def executemany(self, *args):
        return self.conn.executemany(*args)

    def close(self):
        self.conn.close()


def test_an_append_is_acknowledged_only_once_committed(tmp_path):
    store = EventStore(tmp_path / "events.sqlite")
    try:
        store._writer = _SlowCommit(store._writer, 0.3)
        fut = store.append([("u1", "i1", 1, None), ("u1", "i2", 2, "buy")])
        assert store._writer.committing.wait(10)
        assert not fut.done()  # still committing: no acknowledgement yet
        assert fut.result(10) == 2
        conn = sqlite3.connect(tmp_path / "events.sqlite")  # another connection, as another process would
        assert conn.execute("SELECT item_id FROM events ORDER BY seq").fetchall() == [("i1",), ("i2",)]
        conn.close()
    finally:
        store.close()


def test_a_worker_needs_a_published_model(tmp_path):
    with pytest.raises(RecForgeError, match="no model has been published"):
        create_app(None, events_path=tmp_path / "events.sqlite")


def test_gc_freeze_keeps_start_up_objects_out_of_full_collections(artifacts):
    from fastapi.testclient import TestClient

    assert gc.get_freeze_count() == 0
    try:
        with TestClient(create_app(artifacts["ease"], api_key="", admin_key="", gc_freeze=True)) as c:
            frozen = gc.get_freeze_count()
            assert frozen > 50_000  # modules, the model, the engine
            assert len(gc.get_objects(generation=2)) < frozen / 10
            assert c.get("/v1/users/1/recommendations").status_code == 200
    finally:
        gc.unfreeze()
