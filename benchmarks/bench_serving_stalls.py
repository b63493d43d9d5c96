"""Where a serving worker stalls: garbage-collector pauses and event-loop lag under closed-loop load.

Runs the serving app (one process, uvloop) with two probes, drives it with ``wrk`` at 2 and at 8
connections (``GET /v1/users/{random user}/recommendations?k=10``), and reports per run:

* every garbage collection of the oldest generation (``gc.callbacks``): how many ran during the
  load and how long each took, and the count of young (generation 0/1) collections;
* event-loop lag: a task that sleeps 1 ms in a loop and records how late it wakes up (a stall of
  the loop delays every request on that worker by the same amount);
* wrk's requests/s and latency percentiles.

It does this with the start-up objects frozen (``gc.freeze()``, what ``recforge serve`` does) and
without (the code before), in alternation, so that both see the same machine:

    python benchmarks/bench_serving_stalls.py [--artifact DIR] [--connections 2,8] [--seconds 10]
        [--rounds 1] [--nice -10]

Without ``--artifact`` an EASE run is trained on ``../shared/data/movielens-100k``. Writes
``benchmarks/results/serving_stalls.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_serving_load import WRK_SCRIPT, _free_port, _ms, _niced, make_artifact  # noqa: E402


def serve(artifact: str, port: int, freeze: bool, stats_path: str) -> None:
    """The probed server (runs in a child process until SIGINT; writes its probes to ``stats_path``)."""
    import uvicorn
    import uvloop

    from recforge.serving.app import create_app

    pauses, started = [], {}

    def on_gc(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - started["t"], time.perf_counter()))

    gc.callbacks.append(on_gc)
    app = create_app(artifact, events_path=Path(stats_path).with_suffix(".sqlite"), threads=1, api_key="",
                     admin_key="", gc_freeze=freeze)
    lags = []

    async def probe():
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - t - 0.001, time.perf_counter()))

    async def main():
        task = asyncio.get_running_loop().create_task(probe())
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               access_log=False))
        await server.serve()
        task.cancel()

    try:
        uvloop.run(main())
    except KeyboardInterrupt:
        pass
    Path(stats_path).write_text(json.dumps({"gc": pauses, "lags": lags}))


def _wait(port: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("server did not start")


def measure(artifact: Path, freeze: bool, connections: int, seconds: int, script: Path, cpu: int, nice: int,
            work: Path) -> dict:
    port, stats = _free_port(), work / f"stats-{int(freeze)}-{connections}.json"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(artifact), str(port), str(int(freeze)),
                             str(stats)], preexec_fn=_niced(nice))
    try:
        _wait(port, proc)
        time.sleep(1.0)  # start-up collections are over
        t0 = time.perf_counter()
        out = subprocess.run(["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
                              "--latency", "-s", str(script), f"http://127.0.0.1:{port}"], capture_output=True,
                             text=True, timeout=seconds + 60, preexec_fn=_niced(nice)).stdout
        t1 = time.perf_counter()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    probes = json.loads(stats.read_text())
    during = [(g, d) for g, d, t in probes["gc"] if t0 <= t <= t1]
    full = sorted(1e3 * d for g, d in during if g == 2)
    lags = sorted(1e3 * lag for lag, t in probes["lags"] if t0 <= t <= t1)
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    mx = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)
    return {"gc_freeze": freeze, "connections": connections, "seconds": seconds,
            "requests_per_s": float(rps.group(1)) if rps else None,
            "p50_ms": _ms(lat["50"]) if "50" in lat else None, "p99_ms": _ms(lat["99"]) if "99" in lat else None,
            "max_ms": _ms(mx.group(1)) if mx else None,
            "full_collections": len(full), "full_collection_ms": [round(x, 1) for x in full],
            "young_collections": sum(1 for g, _ in during if g < 2),
            "loop_lag_p99_ms": round(lags[int(0.99 * (len(lags) - 1))], 2) if lags else None,
            "loop_lag_max_ms": round(lags[-1], 1) if lags else None,
            "loop_stalls_over_20ms": sum(1 for x in lags if x > 20),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        return serve(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--connections", default="2,8")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--nice", type=int, default=0, help="nice increment of server and wrk")
    ap.add_argument("--out", default=str(HERE / "results" / "serving_stalls.json"))
    args = ap.parse_args()
    if not (shutil.which("wrk") and shutil.which("taskset")):
        sys.exit("needs wrk and taskset (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="bench-serving-stalls-"))
    artifact = Path(args.artifact) if args.artifact else make_artifact(work)
    import polars as pl

    users = work / "users.txt"
    users.write_text("\n".join(map(str, pl.read_parquet(artifact / "user_map.parquet")["raw"].to_list())))
    script = work / "users.lua"
    script.write_text(WRK_SCRIPT % (users, 0))
    cpu = max(os.sched_getaffinity(0))
    rows = []
    print(f"{'gc.freeze':>9} {'conns':>5} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'full GCs':>8} "
          f"{'full GC ms (each)':<28} {'young GCs':>9} {'lag p99':>7} {'lag max':>7} {'stalls>20ms':>11} {'load':>5}")
    for _ in range(args.rounds):
        for c in [int(x) for x in args.connections.split(",")]:
            for freeze in (False, True):
                r = measure(artifact, freeze, c, args.seconds, script, cpu, args.nice, work)
                rows.append(r)
                each = ", ".join(f"{x:g}" for x in r["full_collection_ms"][:6]) + (
                    " ..." if len(r["full_collection_ms"]) > 6 else "")
                print(f"{str(freeze):>9} {c:>5} {r['requests_per_s']:>8} {r['p50_ms']:>7} {r['p99_ms']:>7} "
                      f"{r['max_ms']:>7} {r['full_collections']:>8} {each:<28} {r['young_collections']:>9} "
                      f"{r['loop_lag_p99_ms']:>7} {r['loop_lag_max_ms']:>7} {r['loop_stalls_over_20ms']:>11} "
                      f"{r['load_average'][0]:>5}", flush=True)
    out = {"benchmark": "serving_stalls", "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
           "method": "one server process (create_app + uvicorn on uvloop) with gc.callbacks and a 1 ms event-loop "
                     f"probe; wrk -t1 pinned to CPU {cpu}; nice increment {args.nice}; only collections and lags "
                     "during the wrk run are counted",
           "command": "python benchmarks/bench_serving_stalls.py " + " ".join(
               a if not a.startswith("/") else f"<{Path(a).name}>" for a in sys.argv[1:]),
           "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(args.out if not Path(args.out).is_absolute() else Path(args.out).name)


if __name__ == "__main__":
    main()
