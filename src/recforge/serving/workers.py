"""Several worker processes over one artifact and one event log.

``recforge serve DIR --workers N`` runs N processes under uvicorn's supervisor: the parent binds
the listening socket once and every worker accepts connections from it; a worker that dies is
replaced (``SIGTTIN``/``SIGTTOU`` to the parent add or remove one, ``SIGHUP`` replaces them all).
One Python process handles requests on one core at a time (the GIL), so N processes are what lets
the service use N cores. Each worker loads the model itself (memory grows with N) and opens the
one event log. A keep-alive connection stays with the worker that accepted it, and the kernel
gives a new connection to whichever idle worker takes it first: a burst of connections opened at
once can land unevenly (16 at once split 14/2, 12/4 and 8/8 in three tries); many short or
staggered connections, or a proxy in front, even it out.

What the workers share, and how:

* **Events** live in the SQLite file of :mod:`recforge.serving.events` (WAL mode). A worker
  answers ``POST /v1/events`` after its commit is fsynced; the commits of all workers are
  serialised, so ``seq`` is one global order; every read is a fresh transaction, so an event
  acknowledged by one worker is part of the history of the next request any worker starts.
  No message between workers is needed for this, and none can be lost.
* **The model** is a *generation*: a row ``(generation, artifact)`` of the ``models`` table in the
  same file. ``recforge serve`` publishes its artifact as a new generation when it starts (a
  restart with another artifact over the same log serves that one), a worker that starts (or
  replaces a dead one) loads the latest generation, and ``POST /admin/reload`` on any worker:

  1. loads and checks the new artifact in that worker (a missing or damaged one is a 400 and
     changes nothing anywhere);
  2. publishes it as the next generation and swaps it in locally;
  3. answers once every live worker reports, in the ``workers`` table, that it serves that
     generation (or failed to load it: then 503 naming the worker and the error).

  Every worker reads the latest generation number every ``WATCH_INTERVAL`` seconds (50 ms;
  one indexed read) and, when it is newer, loads that artifact in a thread and swaps
  it in; requests already running finish on the engine they started with. So after the reload's
  200 every worker answers with the new model.

Why this and not something else: the event log is already the one durable thing every worker
opens, so keeping the generation there adds no process, port or file, and a replacement worker
finds the current model without asking anyone. A signal to each worker carries no answer back, so
the reload could not say when it is done (and uvicorn's parent forwards none of ours); replacing
every worker (``SIGHUP``) closes their connections and leaves nothing to confirm the end. Polling
costs about 20 indexed reads a second per worker, and the reload's answer does not depend on the
polling interval being short, only on every worker having reported.

A worker's row names its pid and the start time of that process (``/proc/PID/stat``); a row whose
process is gone (a killed worker, whose replacement writes its own row) is ignored and removed,
and a recycled pid is told apart by its start time.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

#: seconds between two reads of the latest model generation by each worker
WATCH_INTERVAL = 0.05
#: seconds a reload waits for every worker to serve the new generation
RELOAD_TIMEOUT = 300.0


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


class WorkerId:
    """This worker's name in the ``workers`` table: pid, process start time and a random tag (so
    that two apps in one process, as in tests, are two workers)."""

    def __init__(self):
        self.pid = os.getpid()
        self.started = process_start(self.pid)
        self.name = f"{self.pid}-{uuid.uuid4().hex[:8]}"


def is_alive(row: dict) -> bool:
    """Whether the process of a ``workers`` row still runs (and is the same process)."""
    pid = int(row["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to judge
        pass
    started = process_start(pid)
    return row.get("started") is None or started is None or started == row["started"]


def reload_status(events, generation: int) -> tuple[list[dict], list[dict], list[dict]]:
    """``(serving, failed, pending)`` live workers for ``generation``; removes rows of dead ones."""
    serving, failed, pending, dead = [], [], [], []
    for row in events.workers():
        if not is_alive(row):
            dead.append(row["worker"])
        elif row["generation"] >= generation:
            serving.append(row)
        elif (row["failed_generation"] or 0) >= generation:
            failed.append(row)
        else:
            pending.append(row)
    if dead:
        events.forget_workers(dead)
    return serving, failed, pending


async def wait_for_workers(events, generation: int, timeout: float = RELOAD_TIMEOUT,
                           interval: float = 0.02) -> tuple[list[dict], list[dict], list[dict]]:
    """Wait until no live worker is still loading ``generation`` (or ``timeout`` seconds);
    returns :func:`reload_status`."""
    deadline = time.monotonic() + timeout
    while True:
        serving, failed, pending = await asyncio.to_thread(reload_status, events, generation)
        if not pending or time.monotonic() >= deadline:
            return serving, failed, pending
        await asyncio.sleep(interval)
