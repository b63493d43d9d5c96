"""The HTTP server: FastAPI on uvicorn.

    recforge serve ARTIFACT_DIR --host 127.0.0.1 --port 8000 [--events events.sqlite] [--workers N]

Endpoints (raw ids in, raw ids out):

* ``GET /health``, ``GET /metrics`` (Prometheus text format), ``GET /openapi.json``;
* ``GET /v1/users/{user_id}/recommendations?k=10`` — the user's training history plus the
  events posted since, ranked by the model; users with neither get the most popular items,
  marked ``"fallback": "popularity"``;
* ``POST /v1/recommendations`` — for a history of raw item ids (unknown ids are ignored and listed
  in ``unknown_items``), with ``exclude`` and a ``categories`` allow-list;
* ``GET /v1/items/{item_id}/similar?k=10`` — cosine neighbours over the model's item vectors, or
  over item co-occurrence for models without vectors (the response's ``method`` says which);
* ``POST /v1/score`` — for an artifact of a CTR run: probabilities of each label for candidate
  rows given with their features (:mod:`recforge.serving.ctr_engine`); the ranking endpoints above
  answer 400 for such an artifact, and this one 400 for a ranking artifact;
* ``POST /v1/events`` — a batch of events, durable (fsynced) before the reply and part of the
  user's history for the very next request; for a model that places new items (``add_items``,
  e.g. HetSGFormer's ILLE) an item not in the catalogue is placed from the users who had it and is
  recommendable from the next request (:meth:`~recforge.serving.engine.Engine.learn_events`);
* ``POST /admin/reload`` — load another artifact and swap it in atomically, in every worker
  process (:mod:`recforge.serving.workers`); requests in flight finish on the model they
  started with.

With ``--workers N`` there are N processes over one artifact and one event log; events and
reloads reach all of them (:mod:`recforge.serving.workers` says how).

Garbage collection: a full (oldest-generation) collection of CPython visits every container object
of the process; with PyTorch, Polars and FastAPI loaded that is about 220,000 objects and
90-200 ms on the benchmark machine, during which the worker answers nothing. With a few requests
in flight their live objects exceed the young generation's threshold (700), so young collections
run 30 times as often and promote request objects until a full collection is due, every 1-10 s
at 8 connections depending on the rate (p99 80-100 ms; ``benchmarks/bench_serving_stalls.py``).
The server therefore moves everything that exists after start-up (modules, the model, the
engine) out of the collector's reach with ``gc.freeze()`` (again after each reload; a replaced
engine has no reference cycles and is still freed by reference counting), so full collections
visit only what requests created: 0.1-0.5 ms.

Keys: ``X-API-Key`` must equal ``RECFORGE_ADMIN_KEY`` for ``/admin/*`` (disabled when unset), and
``RECFORGE_API_KEY`` for ``/v1/*`` and ``/metrics`` when that variable is set. ``/health`` and the
schema stay open for probes.

Errors: client mistakes are 4xx with a ``detail`` message (422 for a body or parameter of the
wrong shape, 400 for a well-formed request that cannot be answered, 404 for unknown items,
413 for a body over the size limit); anything else is logged and answered 500.
"""

import asyncio
import gc
import hmac
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from recforge.errors import RecForgeError

log = logging.getLogger("recforge.serving")

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: 1000 events or 2000 history items take well under that
API_KEY_ENV = "RECFORGE_API_KEY"
ADMIN_KEY_ENV = "RECFORGE_ADMIN_KEY"
#: options of the worker processes of ``recforge serve --workers N`` (JSON), set by the parent
WORKER_OPTIONS_ENV = "RECFORGE_SERVE_WORKER_OPTIONS"


class ServingState:
    """What the app holds: the current engine (swapped on reload) and its model generation, the event
    log, this worker's name, the metrics."""

    def __init__(self, engine, generation, events, worker, metrics, api_key, admin_key, engine_options,
                 tmpdir=None, gc_freeze=False, reload_timeout=300.0):
        self.engine = engine
        self.generation = generation
        self.failed_generation = 0
        self.events = events
        self.worker = worker
        self.metrics = metrics
        self.api_key = api_key
        self.admin_key = admin_key
        self.engine_options = engine_options
        self.reload_lock = asyncio.Lock()
        self.started = time.time()
        self.tmpdir = tmpdir
        self.gc_freeze = gc_freeze
        self.reload_timeout = reload_timeout

    def set_engine(self, engine, generation: int) -> None:
        self.engine = engine  # one reference assignment: atomic for every reader
        self.generation = generation
        self.metrics.info = {"model": engine.model_name, "artifact": str(engine.artifact.path)}
        if self.gc_freeze:
            gc.freeze()  # the new engine's objects join the start-up objects out of the collector's reach

    def report(self, failed: int | None = None, error: str | None = None) -> None:
        w = self.worker
        self.events.report_worker(w.name, w.pid, w.started, self.generation, failed, error)


def build_engine(artifact_dir, **engine_options):
    """The engine of an artifact: ranking (:class:`~recforge.serving.engine.Engine`) or CTR scoring
    (:class:`~recforge.serving.ctr_engine.CTREngine`), by the artifact's task."""
    from recforge.serving.artifact import load_artifact

    art = load_artifact(artifact_dir)
    if art.task == "ctr":
        from recforge.serving.ctr_engine import CTREngine

        return CTREngine(art, **engine_options)
    from recforge.serving.engine import Engine

    return Engine(art, **engine_options)


def create_app(artifact_dir: str | Path | None, events_path: str | Path | None = None, api_key: str | None = None,
               admin_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY, ann_threshold: int = 100_000,
               ann_options: dict | None = None, threads: int | None = None, gc_freeze: bool = False,
               watch_interval: float | None = None, reload_timeout: float | None = None):
    """The FastAPI app serving the artifact at ``artifact_dir``.

    ``artifact_dir`` is published as the next model generation of the event log (every worker on
    that log follows it); None serves the latest generation already published there (a worker
    process of ``recforge serve --workers N``).
    ``events_path``: the SQLite file of the event log (created if missing); None puts it in a
    temporary folder removed at shutdown (tests). ``api_key``/``admin_key`` default to the
    environment variables ``RECFORGE_API_KEY``/``RECFORGE_ADMIN_KEY`` ("" turns them off).
    ``threads``: compute threads of PyTorch, the BLAS and FAISS (None leaves them alone).
    ``gc_freeze``: freeze the start-up objects for the garbage collector (see the module notes;
    :func:`run_server` does, tests that build many apps in one process leave it off).
    ``watch_interval``: seconds between two looks at the latest model generation (0: never);
    ``reload_timeout``: seconds a reload waits for the other workers."""
    try:
        from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Query, Request, Response
        from fastapi.concurrency import run_in_threadpool
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from fastapi.security import APIKeyHeader
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise RecForgeError("serving needs the 'serve' extra: pip install 'recforge[serve]'") from None

    from recforge.serving import schemas as S
    from recforge.serving import workers as W
    from recforge.serving.engine import BadRequestError, NotFoundError
    from recforge.serving.events import EventStore
    from recforge.serving.metrics import CONTENT_TYPE, Metrics

    if threads is not None:
        _limit_threads(int(threads))
    watch_interval = W.WATCH_INTERVAL if watch_interval is None else float(watch_interval)
    engine_options = {"ann_threshold": ann_threshold, "ann_options": ann_options, "threads": threads or 1}
    if artifact_dir is None and events_path is None:
        raise RecForgeError("serving the latest published model needs the event log that names it (events_path)")
    engine = build_engine(artifact_dir, **engine_options) if artifact_dir is not None else None
    tmpdir = None
    if events_path is None:
        tmpdir = tempfile.mkdtemp(prefix="recforge-events-")
        events_path = Path(tmpdir) / "events.sqlite"
    events = EventStore(events_path)
    worker = W.WorkerId()
    try:
        if engine is not None:  # a new service on this log: its model is the next generation
            events.forget_workers()
            generation = events.publish_model(str(Path(artifact_dir).resolve()))
        else:  # a worker: say so first (a reload under way waits for it), then load the latest model
            events.report_worker(worker.name, worker.pid, worker.started, 0)
            current = events.current_model()
            if current is None:
                raise RecForgeError(f"{events_path}: no model has been published on this event log; "
                                    "start the service with 'recforge serve ARTIFACT_DIR'")
            generation, path = current
            engine = build_engine(path, **engine_options)
    except BaseException:
        if engine is not None:
            engine.close()
        events.close()
        raise
    # None: take the key from the environment; "" (or an unset variable): no key required / admin disabled
    api_key = (os.environ.get(API_KEY_ENV) if api_key is None else api_key) or None
    admin_key = (os.environ.get(ADMIN_KEY_ENV) if admin_key is None else admin_key) or None
    state = ServingState(engine, generation, events, worker, Metrics(), api_key, admin_key, engine_options, tmpdir,
                         gc_freeze=False, reload_timeout=W.RELOAD_TIMEOUT if reload_timeout is None else reload_timeout)
    state.set_engine(engine, generation)
    state.report()

    async def adopt(generation: int, path: str) -> None:
        """Load generation ``generation`` (published by another worker) and swap it in."""
        try:
            new = await run_in_threadpool(build_engine, path, **state.engine_options)
        except Exception as exc:  # noqa: BLE001 - reported to the worker that took the reload
            log.error("worker %s could not load generation %d (%s): %s", worker.name, generation, path, exc)
            state.failed_generation = generation
            await run_in_threadpool(state.report, generation, f"{type(exc).__name__}: {exc}"[:500])
            return
        previous = state.engine
        state.set_engine(new, generation)
        previous.close()
        await run_in_threadpool(state.report)
        log.info("worker %s now serves generation %d (%s)", worker.name, generation, path)

    async def follow() -> None:
        """Take up every model generation another worker publishes (see recforge.serving.workers)."""
        while True:
            await asyncio.sleep(watch_interval)
            try:
                current = state.events.current_model()  # one indexed read; cheaper than a thread hop
                if current is None or current[0] <= max(state.generation, state.failed_generation):
                    continue
                async with state.reload_lock:
                    current = state.events.current_model()
                    if current[0] > max(state.generation, state.failed_generation):
                        await adopt(*current)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep following; the next look may succeed
                log.exception("looking for a new model generation failed")

    @asynccontextmanager
    async def lifespan(app):
        if gc_freeze:
            gc.collect()  # what is garbage now must not be frozen with the rest
            state.gc_freeze = True
            gc.freeze()
        watcher = asyncio.create_task(follow()) if watch_interval > 0 else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                try:
                    await watcher
                except asyncio.CancelledError:
                    pass
            state.engine.close()
            try:
                state.events.forget_workers([worker.name])
            except Exception:  # noqa: BLE001 - a dead worker's row is ignored anyway
                log.warning("could not remove worker %s from the event log", worker.name, exc_info=True)
            state.events.close()
            if state.tmpdir:
                shutil.rmtree(state.tmpdir, ignore_errors=True)

    errors = {c: {"model": S.ErrorBody} for c in (400, 401, 413, 422)}
    app = FastAPI(title="RecForge serving", version=_version(), lifespan=lifespan, responses=errors,
                  description="Recommendations, similar items and event ingestion for an exported RecForge model.")
    app.state.serving = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    static_paths: set[str] = set()  # routes without a template (schema, docs), filled in below
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, static_paths=static_paths)  # outermost

    header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ApiKey")

    # async: a plain function dependency would cost every request a hop through the thread pool
    async def public_key(key: Annotated[str | None, Depends(header)] = None) -> None:
        if state.api_key is not None and not _same(key, state.api_key):
            raise HTTPException(401, "missing or wrong X-API-Key")

    async def admin(key: Annotated[str | None, Depends(header)] = None) -> None:
        if state.admin_key is None:
            raise HTTPException(403, f"admin endpoints are disabled: start the server with {ADMIN_KEY_ENV} set")
        if not _same(key, state.admin_key):
            raise HTTPException(401, "missing or wrong X-API-Key")

    # ---- errors --------------------------------------------------------------------------------
    @app.exception_handler(RecForgeError)
    async def _recforge_error(request: Request, exc: RecForgeError):
        return JSONResponse({"detail": str(exc)}, status_code=404 if isinstance(exc, NotFoundError) else 400)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    # ---- operations ----------------------------------------------------------------------------
    @app.get("/health", response_model=S.Health, tags=["operations"])
    async def health():
        return {"status": "ok", "uptime_seconds": round(time.time() - state.started, 3),
                "model": state.engine.describe(), "worker": {"pid": worker.pid, "generation": state.generation}}

    @app.get("/metrics", tags=["operations"], response_class=Response, dependencies=[Depends(public_key)],
             responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {}}, "description": "Prometheus text format"}})
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    # ---- recommendations -----------------------------------------------------------------------
    def ranking():
        eng = state.engine
        if eng.task != "ranking":
            raise BadRequestError(f"model {eng.model_name} is a CTR model: it scores candidate rows given with their "
                                  "features (POST /v1/score); it does not rank a catalogue")
        return eng

    user_path = Annotated[str, PathParam(min_length=1, max_length=S.MAX_ID_CHARS, description="raw user id")]
    k_query = Annotated[int, Query(ge=1, le=S.MAX_K, description="number of items to return")]

    @app.get("/v1/users/{user_id}/recommendations", response_model=S.RecommendationResponse,
             tags=["recommendations"], dependencies=[Depends(public_key)])
    async def recommend_user(user_id: user_path, k: k_query = 10,
                       exclude: Annotated[list[str] | None, Query(max_length=S.MAX_EXCLUDE)] = None,
                       categories: Annotated[list[str] | None, Query(max_length=S.MAX_CATEGORIES)] = None):
        eng = ranking()
        uidx = eng.user_idx(user_id)
        history, behaviors = eng.history_of(uidx), eng.behaviors_of(uidx)
        fresh, fresh_behaviors, unknown, fresh_times = eng.encode_events(state.events.events_of(user_id))
        ex, _ = eng.encode_items(exclude or [])
        if behaviors is not None or any(b is not None for b in fresh_behaviors):
            behaviors = (behaviors if behaviors is not None else [None] * len(history)) + fresh_behaviors
        else:
            behaviors = None
        past_times = eng.times_of(uidx)  # None unless the model reads times and the artifact has them
        times = past_times + fresh_times if past_times is not None else None
        r = await eng.recommend_async(uidx, history + fresh, k, ex, categories, behaviors=behaviors, times=times)
        return _recs(eng, r, user_id, unknown)

    @app.post("/v1/recommendations", response_model=S.RecommendationResponse, tags=["recommendations"],
              dependencies=[Depends(public_key)])
    async def recommend_history(body: S.RecommendationRequest):
        eng = ranking()
        if body.behaviors is not None and len(body.behaviors) != len(body.history):
            raise BadRequestError(f"behaviors has {len(body.behaviors)} entries for {len(body.history)} history "
                                  "items; give one behaviour per history item (null where unknown), or leave it out")
        if body.timestamps is not None and len(body.timestamps) != len(body.history):
            raise BadRequestError(f"timestamps has {len(body.timestamps)} entries for {len(body.history)} history "
                                  "items; give one timestamp per history item, or leave it out")
        beh = body.behaviors if body.behaviors is not None else [None] * len(body.history)
        when = body.timestamps if body.timestamps is not None else [None] * len(body.history)
        hist, behaviors, unknown, times = eng.encode_events(list(zip(body.history, beh, when)))
        ex, _ = eng.encode_items(body.exclude)
        r = await eng.recommend_async(-1, hist, body.k, ex, body.categories, exclude_seen=body.exclude_seen,
                                      behaviors=behaviors if body.behaviors is not None else None,
                                      times=times if body.timestamps is not None and eng.needs_times else None)
        return _recs(eng, r, None, unknown)

    @app.get("/v1/items/{item_id}/similar", response_model=S.SimilarItemsResponse, tags=["recommendations"],
             dependencies=[Depends(public_key)], responses={404: {"model": S.ErrorBody}})
    def similar(item_id: Annotated[str, PathParam(min_length=1, max_length=S.MAX_ID_CHARS, description="raw item id")],
                k: k_query = 10):
        eng = ranking()
        known, _ = eng.encode_items([item_id])
        if not known:
            raise NotFoundError(f"item {item_id!r} is not in the catalogue of model {eng.model_name}")
        r = eng.similar(known[0], k)
        return {"item_id": eng.item_raw[known[0]], "model": eng.model_name, "method": eng.similar_method,
                "items": _scored(r)}

    # ---- events --------------------------------------------------------------------------------
    @app.post("/v1/events", response_model=S.EventsResponse, tags=["events"], dependencies=[Depends(public_key)])
    async def post_events(body: S.EventsRequest):
        from recforge.serving.engine import id_key

        now = int(time.time())
        rows = [(id_key(e.user_id), id_key(e.item_id), now if e.timestamp is None else e.timestamp, e.behavior)
                for e in body.events]
        n = await asyncio.wrap_future(state.events.append(rows))
        state.metrics.add_events(n)
        eng = state.engine
        if eng.task != "ranking":  # a CTR model has no catalogue to check the items against
            return {"accepted": n, "unknown_items": []}
        if eng.grows:  # a model that places new items from their users (ILLE): see Engine.learn_events
            await run_in_threadpool(eng.learn_events, [(e.user_id, e.item_id) for e in body.events])
        _, unknown = eng.encode_items(dict.fromkeys(e.item_id for e in body.events))
        return {"accepted": n, "unknown_items": unknown[:100]}

    # ---- CTR scoring ---------------------------------------------------------------------------
    @app.post("/v1/score", response_model=S.ScoreResponse, tags=["scoring"], dependencies=[Depends(public_key)])
    async def score(body: S.ScoreRequest):
        eng = state.engine
        if eng.task != "ctr":
            raise BadRequestError(f"model {eng.model_name} ranks a catalogue: ask GET /v1/users/{{user_id}}/"
                                  "recommendations or POST /v1/recommendations; /v1/score serves CTR models")
        return await run_in_threadpool(eng.score, body.user_id, body.context, body.candidates, body.unseen)

    # ---- admin ---------------------------------------------------------------------------------
    @app.post("/admin/reload", response_model=S.ReloadResponse, tags=["admin"], dependencies=[Depends(admin)],
              responses={403: {"model": S.ErrorBody}, 503: {"model": S.ErrorBody}})
    async def reload(body: S.ReloadRequest):
        path = Path(body.path)
        if not path.is_dir():
            raise BadRequestError(f"{body.path}: no such folder on the server")
        async with state.reload_lock:
            t0 = time.perf_counter()
            new = await run_in_threadpool(build_engine, path, **state.engine_options)  # a bad artifact: 400
            generation = await run_in_threadpool(state.events.publish_model, str(path.resolve()))
            previous = state.engine
            state.set_engine(new, generation)
            previous.close()
            await run_in_threadpool(state.report)
            load_seconds = time.perf_counter() - t0
        log.info("reloaded %s -> %s (generation %d)", previous.artifact.path, new.artifact.path, generation)
        serving, failed, pending = await W.wait_for_workers(state.events, generation, state.reload_timeout)
        if failed or pending:
            problems = [f"worker {r['pid']}: {r['error']}" for r in failed]
            problems += [f"worker {r['pid']}: still loading after {state.reload_timeout:g} s" for r in pending]
            return JSONResponse({"detail": f"generation {generation} ({path}) is served by {len(serving)} of "
                                           f"{len(serving) + len(failed) + len(pending)} workers: "
                                           + "; ".join(problems)}, status_code=503)
        return {"status": "reloaded", "previous": previous.describe(), "current": new.describe(),
                "load_seconds": round(load_seconds, 3), "generation": generation, "workers": len(serving)}

    static_paths.update(r.path for r in app.routes if "{" not in getattr(r, "path", "{"))
    return app


def _limit_threads(n: int) -> None:
    """Cap the compute threads of PyTorch and of the BLAS under NumPy/SciPy: requests already run
    in parallel, and nested thread pools on a few cores only add contention."""
    import torch

    torch.set_num_threads(max(1, n))
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(max(1, n))
    except ImportError:  # pragma: no cover - part of the serve extra
        log.warning("threadpoolctl is not installed: NumPy may use more threads than --threads")


def _recs(eng, r, user_id, unknown) -> dict:
    return {"user_id": user_id, "model": eng.model_name, "items": _scored(r), "fallback": r.fallback,
            "unknown_items": list(dict.fromkeys(unknown))[:100]}


def _scored(r) -> list[dict]:
    return [{"item_id": i, "score": s} for i, s in zip(r.items, r.scores)]


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                                     expected.encode("utf-8", "surrogateescape"))


def _validation_message(exc) -> str:
    """One line naming each wrong field (``events.0.item_id: ...``), without pydantic's internal
    validator names, at most five of them."""
    parts: list[str] = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            where = err.get("loc", ())[-1:] or ("?",)
            part = f"body: not valid JSON ({err.get('ctx', {}).get('error', 'decode error')} at position {where[0]})"
            parts.append(part)
            continue
        loc = [str(x) for x in err.get("loc", ()) if isinstance(x, int) or (str(x).isidentifier() and x != "body")]
        part = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}"
        if part not in parts:
            parts.append(part)
    more = len(parts) - 5
    return "; ".join(parts[:5]) + (f" (and {more} more)" if more > 0 else "")


def _version() -> str:
    from recforge import __version__

    return __version__


# ---- ASGI middleware ----------------------------------------------------------------------------
async def _send_json(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Answers 413 to a body over ``max_bytes``: by its Content-Length when declared, else by
    counting the bytes as they arrive (chunked uploads), before the app sees any of it."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BODY):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _send_json(send, 400, "Content-Length is not an integer")
        too_big = f"request body over the limit of {self.max_bytes} bytes"
        if declared is not None and declared > self.max_bytes:
            return await _send_json(send, 413, too_big)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await _send_json(send, 413, too_big)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class MetricsMiddleware:
    """Counts requests by route template and status, and times them."""

    def __init__(self, app, metrics, static_paths: set[str] = frozenset()):
        self.app, self.metrics, self.static_paths = app, metrics, static_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            status = 500
            raise
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                route = scope.get("path") if scope.get("path") in self.static_paths else "other"
            self.metrics.observe(scope.get("method", "?"), route, status, time.perf_counter() - t0)


# ---- running ------------------------------------------------------------------------------------
def run_server(artifact_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
               events_path: str | Path = "events.sqlite", threads: int = 1, ann_threshold: int = 100_000,
               max_body_bytes: int = DEFAULT_MAX_BODY, log_level: str = "info", access_log: bool = False,
               workers: int = 1, gc_freeze: bool = True) -> None:
    """Serve ``artifact_dir`` with uvicorn until interrupted: in this process, or in ``workers``
    processes over the same artifact and event log (:mod:`recforge.serving.workers`)."""
    try:
        import uvicorn
    except ImportError:  # pragma: no cover
        raise RecForgeError("serving needs the 'serve' extra: pip install 'recforge[serve]'") from None
    workers = int(workers)
    if workers < 1:
        raise RecForgeError(f"--workers must be at least 1, got {workers}")
    logging.getLogger("recforge").setLevel(logging.INFO)
    options = {"events_path": str(Path(events_path).resolve()), "threads": threads, "ann_threshold": ann_threshold,
               "max_body_bytes": max_body_bytes, "gc_freeze": gc_freeze}
    common = {"host": host, "port": port, "log_level": log_level, "access_log": access_log,
              "timeout_graceful_shutdown": 10}
    if workers == 1:
        uvicorn.run(create_app(artifact_dir, **options), **common)
        return
    # Several processes: check the artifact once here (a broken one would fail every worker, over and
    # over), publish it as the service's model, and let each worker load the latest published model.
    from recforge.serving.artifact import verify_artifact
    from recforge.serving.events import EventStore

    verify_artifact(artifact_dir)
    store = EventStore(options["events_path"])
    try:
        store.forget_workers()
        generation = store.publish_model(str(Path(artifact_dir).resolve()))
    finally:
        store.close()
    log.info("serving %s (generation %d) with %d worker processes", artifact_dir, generation, workers)
    os.environ[WORKER_OPTIONS_ENV] = json.dumps(options)
    if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:
        # the supervisor kills a worker that does not answer its ping in time; loading a large model
        # holds the interpreter for a while
        common["timeout_worker_healthcheck"] = 60
    uvicorn.run(f"{__name__}:worker_app", factory=True, workers=workers, **common)


def worker_app():
    """The app of one worker process of ``recforge serve --workers N`` (a uvicorn factory; its
    options come from the parent in ``RECFORGE_SERVE_WORKER_OPTIONS``)."""
    import sys

    import uvicorn.config

    logging.getLogger("recforge").setLevel(logging.INFO)
    try:
        return create_app(None, **json.loads(os.environ[WORKER_OPTIONS_ENV]))
    except Exception as exc:  # noqa: BLE001 - tell uvicorn's supervisor not to restart a worker that cannot start
        log.error("worker %d could not start: %s", os.getpid(), exc, exc_info=not isinstance(exc, RecForgeError))
        sys.exit(getattr(uvicorn.config, "STARTUP_FAILURE", 3))
