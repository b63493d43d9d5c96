"""Open-loop HTTP load generator for the serving API (one process, asyncio, lean HTTP/1.1).

Requests are *scheduled* before the run (constant spacing ``1/rate`` or Poisson arrivals with
exponential gaps at the same mean rate, seeded) and released at their scheduled time whether or
not earlier requests have returned. A fixed number of keep-alive connections (16 by default)
carry them: a released request waits for the next free connection when all are busy. Every
latency is measured from the request's *scheduled* time to the last byte of its answer, so time
spent waiting for a connection or for a server that fell behind counts (no coordinated omission);
the share of it spent before the request left the client is reported as ``queue_*``.

The generator can pin itself to some CPUs (``--cpus 1``: ``os.sched_setaffinity``) and lower its
priority (``--nice``), so that on a small machine it takes as little as possible from the server;
it reports its own CPU time per request. Output: one JSON object on stdout.

    python benchmarks/bench_serving_loadgen.py --port 8000 --rate 500 --connections 16 \
        --duration 20 --warmup 3 --users users.txt [--arrival poisson] [--cpus 1] [--events-share 0.1]

``--users``: a file with one raw user id per line (requests are
``GET /v1/users/{id}/recommendations?k=10`` for uniformly random users); ``--items``: one raw
item id per line, needed with ``--events-share`` (that share of the requests post one event for a
random user and item). ``bench_serving_load.py`` drives this script against ``recforge serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import sys
import time


def schedule(rate: float, n: int, arrival: str, seed: int) -> list[float]:
    """Send offsets in seconds from the start: ``i / rate``, or cumulative exponential gaps."""
    if arrival == "constant":
        return [i / rate for i in range(n)]
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def read_response(reader: asyncio.StreamReader, status_line: bytes) -> tuple[int, bytes, bool]:
    """The rest of an HTTP/1.1 response after its status line: ``(status, body, server closes)``."""
    status = int(status_line.split()[1])
    length, close = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    return status, await reader.readexactly(length), close


class Conn:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closed it."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        for attempt in (0, 1):
            fresh = self.writer is None
            if fresh:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(head + body)
                line = await self.reader.readline()
                if not line:
                    raise ConnectionResetError("connection closed by the server")
                status, payload, close = await read_response(self.reader, line)
                if close:
                    self.close()
                return status, payload
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if fresh or attempt:  # a stale keep-alive connection is retried once on a new one
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _pct(sorted_ms: list[float], p: float) -> float | None:
    if not sorted_ms:
        return None
    return round(sorted_ms[min(len(sorted_ms) - 1, int(round(p / 100 * (len(sorted_ms) - 1))))], 3)


def summarise(values_ms: list[float]) -> dict:
    v = sorted(values_ms)
    return {"p50": _pct(v, 50), "p90": _pct(v, 90), "p99": _pct(v, 99), "p99.9": _pct(v, 99.9),
            "max": round(v[-1], 3) if v else None, "mean": round(sum(v) / len(v), 3) if v else None}


async def run(args, make_request) -> dict:
    clock = time.perf_counter  # the loop's own clock may tick in whole milliseconds (uvloop)
    n_warm = int(round(args.warmup * args.rate))
    n = n_warm + int(round(args.duration * args.rate))
    offsets = schedule(args.rate, n, args.arrival, args.seed)
    requests = [make_request(i) for i in range(n)]  # built before the clock starts
    queue: asyncio.Queue = asyncio.Queue()
    records: list[tuple] = []  # (index, scheduled, sent, done, status)
    conns = [Conn(args.host, args.port) for _ in range(args.connections)]

    async def connection(conn: Conn):
        while True:
            job = await queue.get()
            if job is None:
                return
            i, scheduled = job
            head, body, _ = requests[i]
            sent = clock()
            try:
                status, _ = await asyncio.wait_for(conn.request(head, body), timeout=args.timeout)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                conn.close()
                status = f"error: {type(exc).__name__}"
            records.append((i, scheduled, sent, clock(), status))

    for c in conns:  # open every connection before the clock starts
        c.reader, c.writer = await asyncio.open_connection(args.host, args.port)
    workers = [asyncio.create_task(connection(c)) for c in conns]
    gc.collect()
    gc.freeze()  # the generator's own collections must not scan the request table mid-run
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = clock() + 0.1
    lag = []
    i = 0
    while i < n:
        now = clock()
        while i < n and start + offsets[i] <= now:  # release everything due (timers tick in ms)
            queue.put_nowait((i, start + offsets[i]))
            lag.append(now - start - offsets[i])
            i += 1
        if i < n:
            await asyncio.sleep(max(0.0, start + offsets[i] - clock()))
    for _ in conns:
        queue.put_nowait(None)
    end_of_schedule = start + offsets[-1]
    _, pending = await asyncio.wait(workers, timeout=args.timeout + 5)
    for t in pending:
        t.cancel()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for c in conns:
        c.close()

    measured = [r for r in records if r[0] >= n_warm]
    answered = {r[0] for r in records}
    lost = sum(1 for j in range(n_warm, n) if j not in answered)
    statuses: dict[str, int] = {}
    for r in measured:
        statuses[str(r[4])] = statuses.get(str(r[4]), 0) + 1
    t_first = start + offsets[n_warm] if n_warm < n else start
    t_last = max((r[3] for r in measured), default=t_first)
    lat = [1e3 * (r[3] - r[1]) for r in measured]
    kinds = sorted({requests[r[0]][2] for r in measured})
    by_kind = {k: dict(requests=sum(1 for r in measured if requests[r[0]][2] == k),
                       **summarise([1e3 * (r[3] - r[1]) for r in measured if requests[r[0]][2] == k])) for k in kinds}
    own_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "requests": len(measured), "warmup_requests": n_warm, "unanswered": lost,
        "errors": sum(v for k, v in statuses.items() if k != "200") + lost, "statuses": statuses,
        "target_rps": args.rate, "achieved_rps": round(len(measured) / max(1e-9, t_last - t_first), 1),
        "offered_seconds": round(end_of_schedule - t_first, 2),
        "latency_ms": summarise(lat),
        "latency_ms_by_kind": by_kind,
        "queue_ms": summarise([1e3 * (r[2] - r[1]) for r in measured]),
        "release_lag_ms": summarise([1e3 * x for x in lag[n_warm:]]),
        "client_cpu_ms_per_request": round(1e3 * own_cpu / max(1, n), 3),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=500.0, help="requests per second (default 500)")
    ap.add_argument("--arrival", choices=("constant", "poisson"), default="constant")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds sent first and not counted")
    ap.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    ap.add_argument("--users", required=True, help="file: one raw user id per line")
    ap.add_argument("--items", default=None, help="file: one raw item id per line (for --events-share)")
    ap.add_argument("--events-share", type=float, default=0.0, help="share of requests that post one event")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", default=None, help="pin to these CPUs, e.g. '1' or '0,1' (sched_setaffinity)")
    ap.add_argument("--nice", type=int, default=0, help="add this to the generator's nice value")
    args = ap.parse_args(argv)

    pinned = None
    if args.cpus:
        pinned = sorted({int(c) for c in args.cpus.split(",")})
        os.sched_setaffinity(0, pinned)
    if args.nice:
        os.nice(args.nice)
    users = [u for u in open(args.users).read().split("\n") if u]
    items = [x for x in open(args.items).read().split("\n") if x] if args.items else []
    if args.events_share and not items:
        sys.exit("--events-share needs --items")
    rnd = random.Random(args.seed)
    host = f"Host: {args.host}:{args.port}\r\n"

    def make_request(i: int) -> tuple[bytes, bytes, str]:
        if args.events_share and rnd.random() < args.events_share:
            body = json.dumps({"events": [{"user_id": rnd.choice(users), "item_id": rnd.choice(items),
                                           "timestamp": 1_900_000_000 + i, "behavior": "view"}]}).encode()
            head = (f"POST /v1/events HTTP/1.1\r\n{host}Content-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            return head, body, "events"
        return (f"GET /v1/users/{rnd.choice(users)}/recommendations?k={args.k} HTTP/1.1\r\n{host}\r\n").encode(), b"", \
            "recommendations"

    try:
        import uvloop

        runner, loop_name = uvloop.run, "uvloop"
    except ImportError:  # pragma: no cover - the serve extra brings uvloop
        runner, loop_name = asyncio.run, "asyncio"
    out = runner(run(args, make_request))
    out["generator"] = {
        "kind": "open loop", "arrival": args.arrival, "connections": args.connections, "loop": loop_name,
        "pid": os.getpid(), "cpus": sorted(os.sched_getaffinity(0)), "pinned": pinned is not None,
        "nice": os.nice(0), "events_share": args.events_share, "duration_s": args.duration,
        "warmup_s": args.warmup, "seed": args.seed,
        "latency_from": "scheduled send time (no coordinated omission)",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
