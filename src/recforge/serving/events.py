"""Durable event log of the server, shared by its worker processes: SQLite in WAL mode with
``synchronous=FULL``.

Why SQLite: it ships with Python (no dependency), and in WAL mode with ``synchronous=FULL`` a
``COMMIT`` returns only after the write-ahead log has been fsynced, so an acknowledged event
survives a crash of the process or of the machine. Readers never block the writer nor each other,
and the index on ``(user_id, timestamp, seq)`` makes "this user's latest events" a point lookup,
which is what every recommendation request asks. (An analytical engine such as DuckDB is built for
scans, not for many small transactions and point reads, and allows one writing process per file.)

Several processes (``recforge serve --workers N``) open the same file; SQLite's WAL mode is made
for that on one machine (the WAL index lives in shared memory, ``-shm``):

* *one global order*: every commit holds SQLite's single write lock, and ``seq`` (an
  ``AUTOINCREMENT`` key) is assigned under it, so the events of all workers form one sequence;
* *durable before the answer*: a worker answers ``POST /v1/events`` only after its own commit
  returned, i.e. after the fsync;
* *visible at once*: each read is its own transaction and sees every commit that finished
  before it started, so a request that starts after another worker acknowledged an event sees
  that event, with no cache to invalidate and no message to wait for.

Writes use *group commit*: callers put their batch on a queue and wait; one writer thread per
process takes everything queued, inserts it in one transaction and commits once, then releases
all the callers. An fsync costs milliseconds on most disks, so this keeps ingestion throughput
independent of the fsync latency while every caller still gets its reply only after its events
are on disk. Across processes the writers take turns on an ``flock`` of ``<file>.lock`` before
``BEGIN IMMEDIATE``: a writer blocked on the kernel lock wakes as soon as the other one commits,
whereas SQLite's own busy handler, the fallback, polls with sleeps that grow to 100 ms. (Where
there is no ``fcntl``, Windows, the busy handler alone serialises the writers.)

The same file holds the little state the workers share besides events (:mod:`recforge.serving.workers`):
``models``, one row per *generation* of the served model (the artifact a start or a reload
chose, in order), and ``workers``, the generation each live worker has loaded.

Ids are stored as text exactly as given (an integer id ``5`` and the string ``"5"`` are the same
id), so events about items unknown to the current model are kept and become usable after a reload
to a model that knows them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

from recforge.serving.batching import drain

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: SQLite's busy handler alone
    fcntl = None

log = logging.getLogger("recforge.serving")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    behavior TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_user ON events (user_id, timestamp, seq);
CREATE TABLE IF NOT EXISTS models (
    generation INTEGER PRIMARY KEY AUTOINCREMENT,
    artifact TEXT NOT NULL,
    published_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    worker TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    started TEXT,
    generation INTEGER NOT NULL,
    failed_generation INTEGER,
    error TEXT,
    updated_at REAL NOT NULL
);
"""

INSERT = "INSERT INTO events (user_id, item_id, timestamp, behavior, received_at) VALUES (?, ?, ?, ?, ?)"

Row = tuple[str, str, int, "str | None"]


class EventStore:
    """Append-only events with durable, group-committed writes and pooled readers; safe to open
    from several processes at once."""

    def __init__(self, path: str | Path, max_batch_rows: int = 10_000, readers: int = 64):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.path + ".lock"
        self._control_lock = threading.Lock()
        self._writer = self._connect()
        with self._exclusive():
            self._writer.executescript(SCHEMA)
        mode = self._writer.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode}); use a local file system")
        self._control = self._connect()
        self._readers: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._all_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._max_readers = readers
        self._queue: queue.Queue = queue.Queue()
        self._max_batch_rows = max_batch_rows
        self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name="recforge-events-writer", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold the cross-process write turn (an ``flock`` of ``<file>.lock``; one open file
        description per call, so two threads of one process also take turns)."""
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self._lock_path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- writes -----------------------------------------------------------------------------
    def append(self, rows: list[Row]) -> cf.Future:
        """Queue ``rows`` for the next group commit. The future's result (the number of rows) is
        set once they are committed and fsynced; its exception if the write failed."""
        fut: cf.Future = cf.Future()
        if self._closed:
            fut.set_exception(RuntimeError("the event store is closed"))
            return fut
        self._queue.put((list(rows), fut))
        return fut

    def append_sync(self, rows: list[Row], timeout: float | None = 60) -> int:
        return self.append(rows).result(timeout)

    def _write_loop(self) -> None:
        lock_file = open(self._lock_path, "a+b")  # the writer's own turn-taking handle, kept open
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch, stop = drain(self._queue, first, self._max_batch_rows, size=lambda job: len(job[0]))
                self._commit(batch, lock_file)
                if stop:
                    return
        finally:
            lock_file.close()

    def _commit(self, batch: list, lock_file) -> None:
        n = sum(len(rows) for rows, _ in batch)
        now = time.time()
        try:
            if fcntl is not None:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                self._writer.execute("BEGIN IMMEDIATE")
                for rows, _ in batch:
                    self._writer.executemany(INSERT, [(u, i, t, b, now) for u, i, t, b in rows])
                self._writer.execute("COMMIT")
            finally:
                if fcntl is not None:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
        except Exception as exc:  # noqa: BLE001 - reported to every waiting caller
            log.exception("writing %d events failed", n)
            try:
                self._writer.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for _, fut in batch:
                fut.set_exception(exc)
        else:
            for rows, fut in batch:
                fut.set_result(len(rows))

    def _control_write(self, sql: str, params=()) -> sqlite3.Cursor:
        """One statement in its own durable transaction, for the rare writes of worker state."""
        with self._control_lock, self._exclusive():
            return self._control.execute(sql, params)

    # ---- reads ------------------------------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        try:
            return self._readers.get_nowait()
        except queue.Empty:
            conn = self._connect()
            with self._readers_lock:
                self._all_readers.append(conn)
            return conn

    def _release(self, conn: sqlite3.Connection) -> None:
        if self._readers.qsize() < self._max_readers and not self._closed:
            self._readers.put(conn)
        else:
            with self._readers_lock:
                if conn in self._all_readers:
                    self._all_readers.remove(conn)
            conn.close()

    def _read(self, sql: str, params=()) -> list[tuple]:
        conn = self._reader()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            self._release(conn)

    def items_of(self, user_id: str, limit: int = 10_000) -> list[str]:
        """The user's latest ``limit`` event items, oldest first."""
        rows = self._read("SELECT item_id FROM events WHERE user_id = ? ORDER BY timestamp DESC, seq DESC LIMIT ?",
                          (user_id, limit))
        return [r[0] for r in reversed(rows)]

    def events_of(self, user_id: str, limit: int = 10_000) -> list[tuple]:
        """The user's latest ``limit`` events as ``(item, behaviour, timestamp)``, oldest first."""
        rows = self._read("SELECT item_id, behavior, timestamp FROM events WHERE user_id = ? "
                          "ORDER BY timestamp DESC, seq DESC LIMIT ?", (user_id, limit))
        return [(r[0], r[1], r[2]) for r in reversed(rows)]

    def count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM events")[0][0])

    def all(self) -> list[tuple]:
        """Every event as ``(user_id, item_id, timestamp, behavior)`` in arrival order (for tests and exports)."""
        return self._read("SELECT user_id, item_id, timestamp, behavior FROM events ORDER BY seq")

    # ---- model generations and workers (see recforge.serving.workers) ------------------------
    def publish_model(self, artifact: str) -> int:
        """Record ``artifact`` as the next generation of the served model; returns its number."""
        cur = self._control_write("INSERT INTO models (artifact, published_at) VALUES (?, ?)",
                                  (str(artifact), time.time()))
        return int(cur.lastrowid)

    def current_model(self) -> tuple[int, str] | None:
        """``(generation, artifact)`` of the latest published model, None before the first."""
        rows = self._read("SELECT generation, artifact FROM models ORDER BY generation DESC LIMIT 1")
        return (int(rows[0][0]), rows[0][1]) if rows else None

    def report_worker(self, worker: str, pid: int, started: str | None, generation: int,
                      failed_generation: int | None = None, error: str | None = None) -> None:
        """Record that ``worker`` serves ``generation`` (and, if so, that loading a later one failed)."""
        self._control_write(
            "INSERT INTO workers (worker, pid, started, generation, failed_generation, error, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (worker) DO UPDATE SET generation = excluded.generation, "
            "failed_generation = excluded.failed_generation, error = excluded.error, updated_at = excluded.updated_at",
            (worker, pid, started, generation, failed_generation, error, time.time()))

    def forget_workers(self, workers: list[str] | None = None) -> None:
        """Drop the rows of ``workers`` (every row when None: a new service starting on this log)."""
        if workers is None:
            self._control_write("DELETE FROM workers")
        else:
            for w in workers:
                self._control_write("DELETE FROM workers WHERE worker = ?", (w,))

    def workers(self) -> list[dict]:
        rows = self._read("SELECT worker, pid, started, generation, failed_generation, error FROM workers "
                          "ORDER BY worker")
        keys = ("worker", "pid", "started", "generation", "failed_generation", "error")
        return [dict(zip(keys, r)) for r in rows]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._writer.close()
        self._control.close()
        with self._readers_lock:
            for conn in self._all_readers:
                conn.close()
            self._all_readers.clear()
