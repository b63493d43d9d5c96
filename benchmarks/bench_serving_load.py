"""Serving under concurrency: EASE on MovieLens-100K behind ``recforge serve [--workers N]``.

For each worker count it starts the server on 127.0.0.1 (a free port), then measures

* **open loop** (``bench_serving_loadgen.py`` in its own process): ``GET
  /v1/users/{id}/recommendations?k=10`` for random known users at a fixed rate (500/s by default,
  constant spacing or Poisson arrivals) over 16 keep-alive connections; latency from each
  request's scheduled send time (no coordinated omission); p50/p90/p99/p99.9/max and the rate
  achieved. Optionally a second run where a share of the requests post one event each
  (``--events-share``), so that writes of every worker go through the one event log;
* **closed loop** with ``wrk`` (when installed): 2 and 8 connections sending back to back for
  10 s, the figure the issue quoted (requests/s, p50, p99).

The load generator and ``wrk`` run pinned to the last CPU (``os.sched_setaffinity`` /
``taskset``); the server is not pinned. The output says so, with the machine's load average
before and after each measurement (other work on the machine shows up in the tails).

    python benchmarks/bench_serving_load.py [--artifact DIR] [--workers 1,2] [--rate 500]
        [--connections 16] [--duration 20] [--closed 2,8] [--events-share 0.1] [--label after]
        [--baseline-src DIR] [--nice -10]

``--baseline-src DIR`` first measures the server from another copy of the package
(``PYTHONPATH=DIR``, one worker), e.g. the code before a change (``mkdir -p /tmp/before && git
archive HEAD src | tar -x -C /tmp/before``, then ``--baseline-src /tmp/before/src``), so that
both are measured minutes apart under the same conditions. Without ``--artifact`` an EASE run is
trained on ``../shared/data/movielens-100k`` and exported to a temporary folder.

Writes ``benchmarks/results/serving_load_<label>.json`` (paths in it are relative).
Target (issue "serving under concurrency"): p99 under 20 ms at 500 requests/s with 16 clients.
"""

from __future__ import annotations

import argparse
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
ROOT = HERE.parent
ML100K = ROOT.parent / "shared" / "data" / "movielens-100k"
LOADGEN = HERE / "bench_serving_loadgen.py"
TARGET_P99_MS = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(path) -> str:
    """A path relative to the repository when inside it, else only its last part (no absolute paths)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return f"<outside the repository>/{p.name}"


def make_artifact(work: Path) -> Path:
    import recforge
    from recforge.serving import export_artifact

    if not ML100K.exists():
        sys.exit(f"skipped: {ML100K} not found (the shared data folder sits beside the project)")
    print(f"training ease on {ML100K.name} ...", file=sys.stderr, flush=True)
    run = recforge.train("ease", str(ML100K), {}, out=work / "runs", verbose=False)
    return export_artifact(run.path, work / "artifact-ease")


def _get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One HTTP/1.1 GET on a fresh connection (so that any worker may take it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _niced(n: int):
    """A ``preexec_fn`` that changes the child's nice value by ``n`` (negative needs privileges)."""
    return (lambda: os.nice(n)) if n else None


def start_server(artifact: Path, events: Path, port: int, workers: int, src: str | None, log,
                 nice: int = 0) -> subprocess.Popen:
    env = dict(os.environ, RECFORGE_API_KEY="", RECFORGE_ADMIN_KEY="")
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "recforge.cli", "serve", str(artifact), "--host", "127.0.0.1", "--port", str(port),
           "--events", str(events)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_niced(nice))
    deadline, pids = time.time() + 180, set()
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}; see {log.name}")
        try:
            status, body = _get(port, "/health")
            if status == 200:
                pids.add(json.loads(body).get("worker", {}).get("pid", proc.pid))
                if len(pids) >= workers:
                    return proc
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise SystemExit(f"server did not start {workers} workers within 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def open_loop(port: int, proc, args, users: Path, items: Path, cpu: int, events_share: float) -> dict:
    cmd = [sys.executable, str(LOADGEN), "--port", str(port), "--rate", str(args.rate), "--arrival", args.arrival,
           "--connections", str(args.connections), "--duration", str(args.duration), "--warmup", str(args.warmup),
           "--users", str(users), "--items", str(items), "--events-share", str(events_share), "--cpus", str(cpu)]
    pids = _tree(proc.pid)
    load0, cpu0 = os.getloadavg(), _cpu_seconds(pids)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + args.warmup + 120,
                         preexec_fn=_niced(args.nice))
    if out.returncode != 0:
        raise SystemExit(f"load generator failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout)
    sent = r["requests"] + r["warmup_requests"]
    r["server_cpu_ms_per_request"] = round(1e3 * (_cpu_seconds(pids) - cpu0) / max(1, sent), 3)
    r["load_average_before"], r["load_average_after"] = [round(x, 2) for x in load0], [round(x, 2) for x in
                                                                                         os.getloadavg()]
    r["command"] = "python benchmarks/bench_serving_loadgen.py " + " ".join(
        a if not a.startswith("/") else f"<{Path(a).name}>" for a in cmd[2:])
    return r


WRK_SCRIPT = """
local users = {}
for line in io.lines("%s") do users[#users + 1] = line end
math.randomseed(%d)
request = function()
  return wrk.format("GET", "/v1/users/" .. users[math.random(#users)] .. "/recommendations?k=10")
end
"""


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    value, unit = float(m.group(1)), m.group(2)
    return round(value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit], 3)


def closed_loop(port: int, connections: int, seconds: int, script: Path, cpu: int, nice: int = 0) -> dict:
    cmd = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s",
           str(script), f"http://127.0.0.1:{port}"]
    load0 = os.getloadavg()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, preexec_fn=_niced(nice)).stdout
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    mx = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {"connections": connections, "seconds": seconds, "requests_per_s": float(rps.group(1)) if rps else None,
            "p50_ms": _ms(lat["50"]) if "50" in lat else None, "p90_ms": _ms(lat["90"]) if "90" in lat else None,
            "p99_ms": _ms(lat["99"]) if "99" in lat else None, "max_ms": _ms(mx.group(1)) if mx else None,
            "non_2xx": int(errors.group(1)) if errors else 0, "socket_errors": sock.group(1) if sock else None,
            "load_average_before": [round(x, 2) for x in load0],
            "command": f"taskset -c {cpu} wrk -t1 -c{connections} -d{seconds}s --latency -s users.lua URL"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", default=None, help="serve this artifact instead of training EASE on ML-100K")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts, measured in turn")
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--arrival", choices=("constant", "poisson"), default="constant")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds of the open-loop run")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--events-share", type=float, default=0.0,
                    help="also run the open loop with this share of event posts (0: skip)")
    ap.add_argument("--closed", default="2,8", help="wrk connection counts for the closed loop ('' to skip)")
    ap.add_argument("--closed-seconds", type=int, default=10)
    ap.add_argument("--baseline-src", default=None,
                    help="also measure, first, the server from this package source folder (PYTHONPATH) with one "
                         "worker, labelled 'before'")
    ap.add_argument("--nice", type=int, default=0,
                    help="nice increment of server, generator and wrk (e.g. -10 on a machine busy with batch jobs; "
                         "negative values need privileges)")
    ap.add_argument("--label", default="after")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/serving_load_<label>.json")
    args = ap.parse_args()

    import polars as pl

    work = Path(tempfile.mkdtemp(prefix="bench-serving-load-"))
    artifact = Path(args.artifact) if args.artifact else make_artifact(work)
    manifest = json.loads((artifact / "manifest.json").read_text())
    users, items = work / "users.txt", work / "items.txt"
    users.write_text("\n".join(map(str, pl.read_parquet(artifact / "user_map.parquet")["raw"].to_list())))
    items.write_text("\n".join(map(str, pl.read_parquet(artifact / "item_map.parquet")["raw"].to_list())))
    script = work / "users.lua"
    script.write_text(WRK_SCRIPT % (users, 0))
    cpu = max(os.sched_getaffinity(0))
    wrk = shutil.which("wrk") and shutil.which("taskset")
    closed = [int(c) for c in args.closed.split(",") if c] if wrk else []
    if args.closed and not wrk:
        print("wrk (or taskset) not installed: closed-loop figures skipped (apt-get install wrk)", file=sys.stderr)
    print(f"generator and wrk pinned to CPU {cpu} of {sorted(os.sched_getaffinity(0))}; server not pinned; "
          f"nice increment of all three: {args.nice}", file=sys.stderr)

    configs = [("before", args.baseline_src, 1)] if args.baseline_src else []
    configs += [("after", None, int(w)) for w in args.workers.split(",")]
    runs = []
    for code, src, n_workers in configs:
        port = _free_port()
        name = f"{code} --workers {n_workers}"
        with open(work / f"server-{code}-w{n_workers}.log", "wb") as log:
            t0 = time.perf_counter()
            proc = start_server(artifact, work / f"events-{code}-w{n_workers}.sqlite", port, n_workers, src, log,
                                args.nice)
            startup = time.perf_counter() - t0
            try:
                res = {"code": code, "server_code": _rel(src) if src else "this checkout", "workers": n_workers,
                       "server_start_seconds": round(startup, 2)}
                print(f"{name}: open loop {args.rate:g}/s, {args.connections} connections, {args.duration:g} s ...",
                      file=sys.stderr, flush=True)
                res["open_loop"] = open_loop(port, proc, args, users, items, cpu, 0.0)
                if args.events_share > 0:
                    print(f"{name}: open loop with {args.events_share:.0%} event posts ...", file=sys.stderr,
                          flush=True)
                    res["open_loop_with_events"] = open_loop(port, proc, args, users, items, cpu, args.events_share)
                res["closed_loop"] = []
                for c in closed:
                    print(f"{name}: closed loop, wrk {c} connections ...", file=sys.stderr, flush=True)
                    res["closed_loop"].append(closed_loop(port, c, args.closed_seconds, script, cpu, args.nice))
                status, body = _get(port, "/metrics", timeout=10)
                res["server_errors_total_one_worker"] = sum(
                    float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                    if line.startswith("recforge_errors_total"))
            finally:
                stop_server(proc)
        runs.append(res)

    print(f"\nmodel {manifest['model']} on {manifest.get('data')}: {manifest['n_users']} users, "
          f"{manifest['n_items']} items; generator and wrk pinned to CPU {cpu}; nice increment {args.nice}")
    print(f"{'server':<18} {'scenario':<22} {'target/s':>8} {'achieved/s':>10} {'p50 ms':>8} {'p90 ms':>8} "
          f"{'p99 ms':>8} {'p99.9 ms':>8} {'max ms':>8} {'errors':>6} {'srv CPU ms/req':>14} {'load avg':>8}")
    for r in runs:
        who = f"{r['code']} w={r['workers']}"
        scenarios = (("open_loop", "open loop"), ("open_loop_with_events", f"open, {args.events_share:.0%} events"))
        for key, scen in scenarios:
            o = r.get(key)
            if o:
                lat = o["latency_ms"]
                print(f"{who:<18} {scen:<22} {o['target_rps']:>8g} {o['achieved_rps']:>10} {lat['p50']:>8} "
                      f"{lat['p90']:>8} {lat['p99']:>8} {lat['p99.9']:>8} {lat['max']:>8} {o['errors']:>6} "
                      f"{o['server_cpu_ms_per_request']:>14} {o['load_average_before'][0]:>8}")
        for c in r["closed_loop"]:
            print(f"{who:<18} {'wrk ' + str(c['connections']) + ' conn (closed)':<22} {'-':>8} "
                  f"{c['requests_per_s']:>10} {c['p50_ms']:>8} {c['p90_ms']:>8} {c['p99_ms']:>8} {'-':>8} "
                  f"{c['max_ms']:>8} {c['non_2xx']:>6} {'-':>14} {c['load_average_before'][0]:>8}")
    met = {f"{r['code']} --workers {r['workers']}": bool(
        r["open_loop"]["latency_ms"]["p99"] is not None and r["open_loop"]["latency_ms"]["p99"] < TARGET_P99_MS
        and r["open_loop"]["errors"] == 0) for r in runs}
    print(f"target p99 < {TARGET_P99_MS:g} ms at {args.rate:g}/s with {args.connections} clients: "
          + ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in met.items()))
    out = {
        "benchmark": "serving_load", "label": args.label, "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "model": manifest["model"], "data": manifest.get("data"), "n_users": manifest["n_users"],
        "n_items": manifest["n_items"], "artifact": _rel(artifact) if args.artifact else "trained by this script",
        "method": {"open_loop": "bench_serving_loadgen.py in its own process pinned to one CPU: requests scheduled "
                                f"at {args.rate:g}/s ({args.arrival}) over {args.connections} keep-alive connections, "
                                "latency from the scheduled send time (no coordinated omission)",
                   "closed_loop": "wrk -t1 pinned to the same CPU (taskset), back-to-back requests",
                   "requests": "GET /v1/users/{random known user}/recommendations?k=10",
                   "server": "recforge serve ARTIFACT --events FILE [--workers N], not pinned; 'before' is the "
                             "code given by --baseline-src",
                   "priority": f"nice increment {args.nice} for server, generator and wrk"},
        "command": "python benchmarks/bench_serving_load.py " + " ".join(
            a if not a.startswith("/") else f"<{Path(a).name}>" for a in sys.argv[1:]),
        "runs": runs, "target_p99_ms": TARGET_P99_MS, "target_met": met,
    }
    dest = Path(args.out) if args.out else HERE / "results" / f"serving_load_{args.label}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2, default=str))
    print(f"work folder (artifact, server logs, events): {work}", file=sys.stderr)
    print(_rel(dest))


if __name__ == "__main__":
    main()
