"""Serving latency and throughput on Amazon Beauty (22,363 users x 12,101 items).

Starts ``recforge serve`` on 127.0.0.1 (a free port) with an artifact, then drives it with an
open-loop load generator (asyncio, a lean keep-alive HTTP/1.1 client): requests are *scheduled* at a fixed rate and sent
on schedule whether or not earlier ones have returned, and each latency is measured from the
request's scheduled time, so a server that falls behind shows it in the tail instead of hiding
it (no coordinated omission). Three scenarios, one after the other:

* ``user``    — ``GET /v1/users/{id}/recommendations?k=10`` for random known users;
* ``history`` — ``POST /v1/recommendations`` with a raw history (5-20 items of a real user);
* ``events``  — ``POST /v1/events`` with one event per request (each durably committed).

Every scenario is bounded: a fixed number of requests at the target rate, a warm-up that is not
counted, and a hard time limit after which it stops by itself. It also reports recall@10 of the
FAISS index against exact search on the model's item vectors, with real users' queries.

    nice -n 10 .venv/bin/python benchmarks/bench_serving.py [--artifact DIR] [--model sasrec|bpr]
        [--rate 200] [--requests 2000] [--workers 1]

Without ``--artifact`` a run is trained on Beauty and exported (SASRec when the model is
registered, else BPR; ``--epochs`` defaults to 1: latency does not depend on how well the model
is trained). Writes ``benchmarks/results/serving.json``.

Target (issue "Serving"): p99 under 50 ms at 200 requests per second on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_serving_loadgen import read_response  # noqa: E402  (the one HTTP response reader of the benchmarks)
BEAUTY = HERE.parent.parent / "shared" / "data" / "amazon-beauty" / "Beauty.txt"
RESULTS = HERE / "results" / "serving.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_artifact(model: str, epochs: int, work: Path) -> Path:
    import recforge
    from recforge.serving import export_artifact

    overrides = {} if model in ("ease", "pop", "itemknn") else {"epochs": epochs}
    print(f"training {model} on {BEAUTY.name} ({overrides or 'defaults'}) ...", file=sys.stderr, flush=True)
    run = recforge.train(model, str(BEAUTY), overrides, out=work / "runs", verbose=False)
    print(f"  test ndcg@10 {run.metrics['test']['ndcg@10']:.4f}, fit {run.metrics['timing']['fit_seconds']} s",
          file=sys.stderr, flush=True)
    return export_artifact(run.path, work / f"artifact-{model}")


def start_server(artifact: Path, events: Path, port: int, log, workers: int = 1) -> subprocess.Popen:
    import httpx2 as httpx

    env = dict(os.environ, RECFORGE_API_KEY="", RECFORGE_ADMIN_KEY="")
    proc = subprocess.Popen([sys.executable, "-m", "recforge.cli", "serve", str(artifact), "--host", "127.0.0.1",
                             "--port", str(port), "--events", str(events), "--threads", "1", "--workers", str(workers)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start within 180 s")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its running children, the worker processes (Linux /proc)."""
    total, todo = 0.0, [pid]
    try:
        while todo:
            p = todo.pop()
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            try:
                todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
            except OSError:
                pass
    except (OSError, IndexError, ValueError):
        return float("nan")
    return total


class HttpPool:
    """A lean HTTP/1.1 keep-alive client on asyncio streams, for the load generator only.

    A general client (httpx) costs more CPU per request than the server under test, and both
    share the same two cores here; this one writes a request and reads one ``Content-Length``
    response, reusing connections, so nearly all the CPU goes to the server."""

    def __init__(self, host: str, port: int, max_connections: int = 256):
        self.host, self.port, self.max = host, port, max_connections
        self.idle: list = []
        self.open = 0
        self.free = asyncio.Condition()

    async def _get(self, fresh: bool = False):
        async with self.free:
            while not self.idle and self.open >= self.max:
                await self.free.wait()
            if self.idle and not fresh:
                return self.idle.pop(), True
            self.open += 1
        try:
            return await asyncio.open_connection(self.host, self.port), False
        except BaseException:
            async with self.free:
                self.open -= 1
                self.free.notify()
            raise

    async def _put(self, conn, reuse: bool):
        async with self.free:
            if reuse:
                self.idle.append(conn)
            else:
                self.open -= 1
                conn[1].close()
            self.free.notify()

    async def request(self, method: str, path: str, body=None) -> tuple[int, bytes]:
        data = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                + ("Content-Type: application/json\r\n" if body is not None else "")
                + f"Content-Length: {len(data)}\r\n\r\n").encode()
        conn, reused = await self._get()
        ok = False
        try:
            reader, writer = conn
            try:
                writer.write(head + data)
                status_line = await reader.readline()
            except ConnectionError:
                if not reused:
                    raise
                status_line = b""
            if not status_line and reused:  # the server closed an idle keep-alive connection: retry on a new one
                stale, conn = conn, None
                await self._put(stale, False)
                conn, reused = await self._get(fresh=True)
                reader, writer = conn
                writer.write(head + data)
                status_line = await reader.readline()
            status, payload, close = await read_response(reader, status_line)
            ok = not close
            return status, payload
        finally:
            if conn is not None:
                await self._put(conn, ok)

    async def close(self):
        for _, w in self.idle:
            w.close()


async def run_scenario(port: int, make_request, rate: float, n: int, warmup: int, max_seconds: float) -> dict:
    """Send ``warmup + n`` requests at ``rate`` per second (open loop); latencies of the last ``n``."""
    lat, errors, statuses = [], 0, {}
    pool = HttpPool("127.0.0.1", port)
    start = time.perf_counter() + 0.05
    stop_at = start + max_seconds
    tasks = []

    async def one(i: int, scheduled: float):
        nonlocal errors
        method, url, body = make_request(i)
        try:
            code, _ = await asyncio.wait_for(pool.request(method, url, body), timeout=10)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            code = f"error: {type(exc).__name__}"
        done = time.perf_counter()
        statuses[code] = statuses.get(code, 0) + 1
        if code != 200:
            errors += 1
        if i >= warmup:
            lat.append(done - scheduled)

    for i in range(warmup + n):
        scheduled = start + i / rate
        if scheduled > stop_at:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    measured_start = start + warmup / rate
    remaining = max(1.0, stop_at + 10 - time.perf_counter())
    _, pending = await asyncio.wait(tasks, timeout=remaining)
    for t in pending:
        t.cancel()
    elapsed = time.perf_counter() - measured_start
    await pool.close()
    lat.sort()

    def pct(p):
        return round(1e3 * lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))], 2) if lat else None

    return {"requests": len(lat), "errors": errors, "unfinished": len(pending),
            "statuses": {str(k): v for k, v in statuses.items()},
            "target_rps": rate, "achieved_rps": round(len(lat) / elapsed, 1) if elapsed > 0 else None,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "max_ms": round(1e3 * lat[-1], 2) if lat else None,
            "mean_ms": round(1e3 * sum(lat) / len(lat), 2) if lat else None}


def ann_check(artifact: Path, n_queries: int = 500) -> dict:
    """Recall@10 of the FAISS index against exact search on the model's vectors and real users."""
    import numpy as np

    from recforge.evaluation.batch import Histories
    from recforge.serving.ann import ann_recall, query_vectors
    from recforge.serving.artifact import load_artifact
    from recforge.serving.engine import Engine

    art = load_artifact(artifact)
    if art.item_vectors is None:
        return {"skipped": "the model has no item vectors"}
    eng = Engine(art, ann_threshold=10**9)
    rng = np.random.default_rng(0)
    users = rng.choice(eng.n_users, size=min(n_queries, eng.n_users), replace=False)
    hist = Histories.from_lists(users, [eng.history_of(int(u)) for u in users], eng.n_items)
    q = query_vectors(eng.model, hist, art.item_vectors)
    if q is None:
        return {"skipped": "the model's scores are not dot products of query and item vectors"}
    return ann_recall(art.item_vectors, q, k=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", default=None, help="serve this artifact instead of training one")
    ap.add_argument("--model", default=None,
                    help="model to train when no artifact is given (default: sasrec if registered, else bpr)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rate", type=float, default=200.0, help="target requests per second")
    ap.add_argument("--requests", type=int, default=2000, help="measured requests per scenario")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=30.0, help="hard limit per scenario")
    ap.add_argument("--scenarios", default="user,history,events", help="comma-separated, in order")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes (recforge serve --workers)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import polars as pl

    from recforge.models import registry

    load_before = os.getloadavg()

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    if args.artifact:
        artifact = Path(args.artifact)
    else:
        if not BEAUTY.exists():
            sys.exit(f"skipped: {BEAUTY} not found (the shared data folder sits beside the project)")
        model = args.model or ("sasrec" if "sasrec" in registry.available() else "bpr")
        artifact = make_artifact(model, args.epochs, work)
    manifest = json.loads((artifact / "manifest.json").read_text())
    users = pl.read_parquet(artifact / "user_map.parquet")["raw"].to_list()
    items = pl.read_parquet(artifact / "item_map.parquet").sort("idx")["raw"].to_list()
    inter = pl.read_parquet(artifact / "interactions.parquet")
    seqs = inter.group_by("user_id", maintain_order=True).agg(pl.col("item_id"))["item_id"].to_list()
    rnd = random.Random(0)

    def user_req(i):
        return "GET", f"/v1/users/{rnd.choice(users)}/recommendations?k=10", None

    def history_req(i):
        s = rnd.choice(seqs)
        n = min(len(s), rnd.randint(5, 20))
        return "POST", "/v1/recommendations", {"history": [items[j - 1] for j in s[-n:]], "k": 10}

    def event_req(i):
        return "POST", "/v1/events", {"events": [{"user_id": f"bench-{rnd.randrange(5000)}",
                                                  "item_id": rnd.choice(items), "timestamp": 1_700_000_000 + i,
                                                  "behavior": "view"}]}

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    results = {}
    with open(work / "server.log", "wb") as log:
        t0 = time.perf_counter()
        proc = start_server(artifact, work / "events.sqlite", port, log, args.workers)
        startup = time.perf_counter() - t0
        try:
            import httpx2 as httpx

            health = httpx.get(f"{base}/health", timeout=10).json()
            scenarios = {"user": user_req, "history": history_req, "events": event_req}
            for name in args.scenarios.split(","):
                fn = scenarios[name]
                key = name if name not in results else f"{name}-again"
                print(f"scenario {key}: {args.requests} requests at {args.rate:g}/s ...", file=sys.stderr, flush=True)
                cpu0, own0 = _cpu_seconds(proc.pid), time.process_time()
                r = asyncio.run(run_scenario(port, fn, args.rate, args.requests, args.warmup, args.max_seconds))
                sent = r["requests"] + args.warmup
                r["server_cpu_ms_per_request"] = round(1e3 * (_cpu_seconds(proc.pid) - cpu0) / sent, 2)
                r["client_cpu_ms_per_request"] = round(1e3 * (time.process_time() - own0) / sent, 2)
                results[key] = r
            server_metrics = httpx.get(f"{base}/metrics", timeout=10).text
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    errors_total = sum(float(line.rsplit(" ", 1)[1]) for line in server_metrics.splitlines()
                       if line.startswith("recforge_errors_total"))
    ann = ann_check(artifact)

    print(f"\nmodel {manifest['model']} on {manifest.get('data')}: {manifest['n_users']} users, "
          f"{manifest['n_items']} items; server start {startup:.1f} s; retrieval: {health['model']['ann']}")
    print(f"{'scenario':<10} {'target/s':>8} {'achieved/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'errors':>6} {'server CPU ms/req':>17} {'client CPU ms/req':>17}")
    for name, r in results.items():
        print(f"{name:<10} {r['target_rps']:>8g} {r['achieved_rps']:>10} {r['p50_ms']:>8} {r['p95_ms']:>8} "
              f"{r['p99_ms']:>8} {r['max_ms']:>8} {r['errors']:>6} {r['server_cpu_ms_per_request']:>17} "
              f"{r['client_cpu_ms_per_request']:>17}")
    if "recall" in ann:
        print(f"ANN recall@10 vs exact on the model's item vectors ({ann['n_queries']} users): {ann['recall']:.4f} "
              f"(build {ann['build_seconds']} s, {ann['ann_ms_per_query']} ms/query, "
              f"exact {ann['exact_ms_per_query']} ms/query)")
    target_met = all(r["p99_ms"] is not None and r["p99_ms"] < 50 and r["errors"] == 0 for r in results.values())
    print(f"target p99 < 50 ms at {args.rate:g}/s with no errors: {'met' if target_met else 'NOT met'}")
    out = {
        "benchmark": "serving", "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_before": [round(x, 2) for x in load_before]},
        "model": manifest["model"], "data": manifest.get("data"), "n_users": manifest["n_users"],
        "n_items": manifest["n_items"], "retrieval": health["model"]["ann"], "server_start_seconds": round(startup, 2),
        "method": "open loop, latency from each request's scheduled send time; one event per events request",
        "scenarios": results, "server_errors_total": errors_total, "ann_recall": ann, "target_p99_ms": 50,
        "target_met": target_met,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"work folder (artifact, server log, events): {work}", file=sys.stderr)
    print(args.out)


if __name__ == "__main__":
    main()
