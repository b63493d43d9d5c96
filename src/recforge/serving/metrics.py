"""Request metrics in the Prometheus text exposition format (version 0.0.4).

Written by hand rather than with ``prometheus-client``: the server needs three metric families
in one process, the format is a few lines of text, and owning it keeps one dependency and its
process-global registry (awkward when tests build many apps in one process) out of the server.

Families:

* ``recforge_requests_total{method, route, status}`` counter;
* ``recforge_request_duration_seconds{method, route}`` histogram (cumulative buckets, ``+Inf``,
  ``_sum``, ``_count``);
* ``recforge_errors_total{route}`` counter of server errors (status >= 500 or an exception);
* ``recforge_events_total`` counter of ingested events, ``recforge_model_info{model, artifact}``.

``route`` is the route template (``/v1/users/{user_id}/recommendations``), never the raw path,
and ``other`` for paths that match no route, so label cardinality stays bounded.
"""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items()) + "}"


def _num(x: float) -> str:
    return repr(float(x)) if x != int(x) else f"{int(x)}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.buckets: dict[tuple[str, str], list[int]] = {}
        self.sums: dict[tuple[str, str], float] = defaultdict(float)
        self.errors: dict[str, int] = defaultdict(int)
        self.events = 0
        self.info: dict[str, str] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1
            key = (method, route)
            counts = self.buckets.get(key)
            if counts is None:
                counts = self.buckets[key] = [0] * (len(BUCKETS) + 1)
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    counts[i] += 1
                    break
            else:
                counts[-1] += 1
            self.sums[key] += seconds
            if status >= 500:
                self.errors[route] += 1

    def add_events(self, n: int) -> None:
        with self._lock:
            self.events += n

    def render(self) -> str:
        with self._lock:
            out = ["# HELP recforge_requests_total HTTP requests by method, route template and status.",
                   "# TYPE recforge_requests_total counter"]
            for (m, r, s), n in sorted(self.requests.items()):
                out.append(f"recforge_requests_total{_labels(method=m, route=r, status=s)} {n}")
            out += ["# HELP recforge_request_duration_seconds Request latency in seconds.",
                    "# TYPE recforge_request_duration_seconds histogram"]
            for (m, r), counts in sorted(self.buckets.items()):
                cum = 0
                for b, c in zip(BUCKETS, counts):
                    cum += c
                    labels = _labels(method=m, route=r, le=_num(b))
                    out.append(f"recforge_request_duration_seconds_bucket{labels} {cum}")
                cum += counts[-1]
                out.append(f"recforge_request_duration_seconds_bucket{_labels(method=m, route=r, le='+Inf')} {cum}")
                out.append(f"recforge_request_duration_seconds_sum{_labels(method=m, route=r)} {self.sums[(m, r)]!r}")
                out.append(f"recforge_request_duration_seconds_count{_labels(method=m, route=r)} {cum}")
            out += ["# HELP recforge_errors_total Server errors (status >= 500) by route template.",
                    "# TYPE recforge_errors_total counter"]
            for r, n in sorted(self.errors.items()):
                out.append(f"recforge_errors_total{_labels(route=r)} {n}")
            if not self.errors:
                out.append(f"recforge_errors_total{_labels(route='all')} 0")
            out += ["# HELP recforge_events_total Events durably ingested.",
                    "# TYPE recforge_events_total counter", f"recforge_events_total {self.events}"]
            if self.info:
                out += ["# HELP recforge_model_info The model being served.", "# TYPE recforge_model_info gauge",
                        f"recforge_model_info{_labels(**self.info)} 1"]
        return "\n".join(out) + "\n"
