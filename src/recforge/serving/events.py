"""Durable event log of the server: SQLite in WAL mode with ``synchronous=FULL``.

Why SQLite: it ships with Python (no dependency), and in WAL mode with ``synchronous=FULL`` a
``COMMIT`` returns only after the write-ahead log has been fsynced, so an acknowledged event
survives a crash of the process or of the machine. Readers never block the writer nor each other,
and the index on ``(user_id, timestamp, seq)`` makes "this user's latest events" a point lookup,
which is what every recommendation request asks. (An analytical engine such as DuckDB is built for
scans, not for many small transactions and point reads, and allows one writing process per file.)

Writes use *group commit*: callers put their batch on a queue and wait; one writer thread takes
everything queued, inserts it in one transaction and commits once, then releases all the callers.
An fsync costs milliseconds on most disks, so this keeps ingestion throughput independent of the
fsync latency while every caller still gets its reply only after its events are on disk.

Ids are stored as text exactly as given (an integer id ``5`` and the string ``"5"`` are the same
id), so events about items unknown to the current model are kept and become usable after a reload
to a model that knows them.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

from recforge.serving.batching import drain

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
"""

INSERT = "INSERT INTO events (user_id, item_id, timestamp, behavior, received_at) VALUES (?, ?, ?, ?, ?)"

Row = tuple[str, str, int, "str | None"]


class EventStore:
    """Append-only events with durable, group-committed writes and pooled readers."""

    def __init__(self, path: str | Path, max_batch_rows: int = 10_000, readers: int = 64):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect()
        self._writer.executescript(SCHEMA)
        mode = self._writer.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode}); use a local file system")
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
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

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
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = drain(self._queue, first, self._max_batch_rows, size=lambda job: len(job[0]))
            n = sum(len(rows) for rows, _ in batch)
            now = time.time()
            try:
                self._writer.execute("BEGIN IMMEDIATE")
                for rows, _ in batch:
                    self._writer.executemany(INSERT, [(u, i, t, b, now) for u, i, t, b in rows])
                self._writer.execute("COMMIT")
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
            if stop:
                return

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

    def items_of(self, user_id: str, limit: int = 10_000) -> list[str]:
        """The user's latest ``limit`` event items, oldest first."""
        conn = self._reader()
        try:
            rows = conn.execute(
                "SELECT item_id FROM events WHERE user_id = ? ORDER BY timestamp DESC, seq DESC LIMIT ?",
                (user_id, limit)).fetchall()
        finally:
            self._release(conn)
        return [r[0] for r in reversed(rows)]

    def count(self) -> int:
        conn = self._reader()
        try:
            return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        finally:
            self._release(conn)

    def all(self) -> list[tuple]:
        """Every event as ``(user_id, item_id, timestamp, behavior)`` in arrival order (for tests and exports)."""
        conn = self._reader()
        try:
            return conn.execute("SELECT user_id, item_id, timestamp, behavior FROM events ORDER BY seq").fetchall()
        finally:
            self._release(conn)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._writer.close()
        with self._readers_lock:
            for conn in self._all_readers:
                conn.close()
            self._all_readers.clear()
