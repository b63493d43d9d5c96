"""Commit latency of several processes writing one SQLite event log: SQLite's busy handler alone
vs. taking turns on an ``flock`` first (what :mod:`recforge.serving.events` does).

Each process opens the file as the server does (WAL, ``synchronous=FULL``, 30 s busy timeout)
and commits ``--commits`` one-row transactions (``BEGIN IMMEDIATE`` ... ``COMMIT``) at Poisson
arrival times (``--rate`` per second and process, seeded), as events arrive at a server worker; the
latency of each commit is measured from its scheduled time, so it includes any wait for the write
lock and any backlog that waiting caused. With
``none`` a process that finds the lock taken is put to sleep by SQLite's busy handler (1, 2, 5,
10, ... up to 100 ms between tries); with ``flock`` it blocks on ``<file>.lock`` and the kernel
wakes it when the holder lets go. The modes alternate for ``--rounds`` rounds.

    python benchmarks/bench_serving_eventlock.py [--processes 2,4] [--commits 1000] [--rate 100] [--rounds 2]

Writes ``benchmarks/results/serving_eventlock.json``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing as mp
import os
import platform
import random
import sqlite3
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _writer(path: str, mode: str, n: int, rate: float, seed: int, out) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    lock = open(path + ".lock", "a+b")
    rng = random.Random(seed)
    lat = []
    t = time.perf_counter() + 0.2
    for i in range(n):
        t += rng.expovariate(rate)
        time.sleep(max(0.0, t - time.perf_counter()))
        if mode == "flock":
            fcntl.flock(lock, fcntl.LOCK_EX)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO events (item) VALUES (?)", (i,))
        conn.execute("COMMIT")
        if mode == "flock":
            fcntl.flock(lock, fcntl.LOCK_UN)
        lat.append(1e3 * (time.perf_counter() - t))
    out.put(lat)


def measure(mode: str, processes: int, commits: int, rate: float, folder: Path) -> dict:
    path = str(folder / f"events-{mode}-{processes}.sqlite")
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(path + suffix).unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, item INTEGER)")
    conn.commit()
    conn.close()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, mode, commits, rate, seed, out)) for seed in range(processes)]
    for p in procs:
        p.start()
    lat = sorted(x for _ in procs for x in out.get())
    for p in procs:
        p.join()

    def pct(q):
        return round(lat[min(len(lat) - 1, int(round(q / 100 * (len(lat) - 1))))], 3)

    return {"mode": mode, "processes": processes, "commits": len(lat), "offered_per_s": rate * processes,
            "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": round(lat[-1], 3),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", default="2,4")
    ap.add_argument("--commits", type=int, default=1000, help="per process")
    ap.add_argument("--rate", type=float, default=100.0, help="commits per second and process (Poisson)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "serving_eventlock.json"))
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-eventlock-"))
    rows = []
    for n in [int(x) for x in args.processes.split(",")]:
        for _ in range(args.rounds):
            for mode in ("none", "flock"):
                r = measure(mode, n, args.commits, args.rate, folder)
                rows.append(r)
                print(f"{mode:<6} {n} processes: {r['offered_per_s']:>6g} commits/s offered  p50 {r['p50_ms']:>7} ms  "
                      f"p99 {r['p99_ms']:>8} ms  max {r['max_ms']:>8} ms  (load {r['load_average'][0]})", flush=True)
    out = {"benchmark": "serving_eventlock", "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "sqlite": sqlite3.sqlite_version, "platform": platform.platform()},
           "method": f"one-row transactions, WAL + synchronous=FULL, Poisson arrivals at {args.rate:g}/s per process, "
                     "latency from the scheduled time",
           "command": "python benchmarks/bench_serving_eventlock.py " + " ".join(
               f"--{k} {v}" for k, v in (("processes", args.processes), ("commits", args.commits),
                                         ("rate", args.rate), ("rounds", args.rounds))),
           "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(args.out)


if __name__ == "__main__":
    main()
