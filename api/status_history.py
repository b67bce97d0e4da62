"""The status page's memory: a short history of each service's figures, and the slowest recent requests.

Pure data structures (no I/O, no clock of their own: every call is given the time), so they are unit-tested in
microseconds. The edge fills them: ``api.routes.status.sample_history_forever`` adds a point per service every
``status_history_interval_s``, ``api.metrics.RequestMetrics`` offers every finished request to a service path.

* ``History``: per service, one ``Point`` per sample for the last ``window_s`` (15 min by default) in a ring
  buffer (a deque of at most ``window_s / interval_s + 1`` points), also trimmed by time, so memory is bounded
  whatever the traffic or the clock do. A figure that could not be measured (no second heartbeat yet, the lag
  probe failed, Kafka down) is None: a gap in the chart, never a made-up zero.
* ``SlowRequests``: the ``size`` slowest requests of the last ``window_s``. Each minute (``bucket_s``) keeps its
  own min-heap of at most ``size`` records, and at most ``window_s / bucket_s + 1`` minutes are kept: the
  slowest ``size`` of the window are always among them (a request not among its minute's ``size`` slowest
  cannot be among the window's), memory is at most ``size * (window_s / bucket_s + 1)`` records, and offering
  a request costs one comparison (``O(log size)`` when it is kept). ``top(now)`` drops what is older than
  ``window_s`` exactly (by each record's time, not only by minute).
* A ``SlowRequest`` holds the request id, service, task, route (the path, no query string), HTTP status, total
  ms at the edge, when it finished (epoch s) and its trace id when tracing is on: never a payload, a header
  or an API key.

Each edge keeps its own: with several edges behind a load balancer, a page shows the edge that answered it.
Both are lost when the edge restarts.
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

from streams.settings import TRACE_ID_FIELD

TRACE_ID = re.compile(r"^[0-9a-f]{32}$")  # W3C trace-id: 16 bytes as lowercase hex (never all zeros)


@dataclass(frozen=True, slots=True)
class LanePoint:
    """One lane's lag (records) and time to drain (s) at a sample; None: unknown or not draining."""

    lag: int | None = None
    drain_s: float | None = None


@dataclass(frozen=True, slots=True)
class Point:
    """One service's figures at ``at`` (epoch s), each over the interval since the previous sample."""

    at: float
    items_per_s: float | None = None
    requests_per_s: float | None = None
    p95_ms: float | None = None
    lag: int | None = None
    drain_s: float | None = None
    lanes: Mapping[str, LanePoint] = field(default_factory=dict)


def _finite(value: float | None, digits: int = 2) -> float | None:
    """``value`` rounded, or None when it is unknown or not finite (JSON has no infinity)."""
    return None if value is None or not math.isfinite(value) else round(value, digits)


class History:
    """The last ``window_s`` of points per service, one every ``interval_s`` (see the module docstring)."""

    def __init__(self, interval_s: float, window_s: float) -> None:
        if interval_s <= 0 or window_s < interval_s:
            raise ValueError(f"need 0 < interval_s <= window_s, got {interval_s} and {window_s}")
        self.interval_s = interval_s
        self.window_s = window_s
        self.capacity = math.ceil(window_s / interval_s) + 1
        self._points: dict[str, deque[Point]] = {}

    def add(self, points: Mapping[str, Point]) -> None:
        """Append each service's point; points older than ``window_s`` before the newest are dropped."""
        for service, point in points.items():
            ring = self._points.get(service)
            if ring is None:
                ring = self._points[service] = deque(maxlen=self.capacity)
            ring.append(point)
            while ring and ring[0].at < point.at - self.window_s:
                ring.popleft()

    def points(self, service: str) -> list[Point]:
        return list(self._points.get(service, ()))

    def services(self) -> list[str]:
        return sorted(self._points)

    def as_json(self) -> dict[str, object]:
        """``{service: {"at": [...], "items_per_s": [...], ..., "lanes": {lane: {"lag": [...], "drain_s": [...]}}}}``:
        columns of equal length, oldest first; None where a figure is unknown (drain_s: unknown or not draining)."""
        out: dict[str, object] = {}
        for service in self.services():
            ring = self._points[service]
            lanes = sorted({lane for point in ring for lane in point.lanes})
            out[service] = {
                "at": [round(p.at, 3) for p in ring],
                "items_per_s": [_finite(p.items_per_s) for p in ring],
                "requests_per_s": [_finite(p.requests_per_s) for p in ring],
                "p95_ms": [_finite(p.p95_ms) for p in ring],
                "lag": [p.lag for p in ring],
                "drain_s": [_finite(p.drain_s, 1) for p in ring],
                "lanes": {
                    lane: {
                        "lag": [p.lanes[lane].lag if lane in p.lanes else None for p in ring],
                        "drain_s": [_finite(p.lanes[lane].drain_s, 1) if lane in p.lanes else None for p in ring],
                    }
                    for lane in lanes
                },
            }
        return out


@dataclass(frozen=True, slots=True)
class SlowRequest:
    """One finished request to a service path, as the slowest-requests list shows it (no payload, no key)."""

    total_ms: float
    at: float  # epoch s when it finished
    service: str
    route: str
    status: int
    task: str = ""
    request_id: str | None = None
    trace_id: str | None = None

    def as_json(self, trace_url_template: str | None = None) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "service": self.service,
            "task": self.task,
            "route": self.route,
            "status": self.status,
            "total_ms": round(self.total_ms, 1),
            "at": round(self.at, 3),
            "trace_id": self.trace_id,
            "trace_url": trace_url(trace_url_template, self.trace_id),
        }


def trace_url(template: str | None, trace_id: str | None) -> str | None:
    """The operator's trace UI link for ``trace_id`` (``template`` checked by
    ``streams.settings.check_trace_url_template``), or None without a template or a well-formed trace id."""
    if template is None or trace_id is None or not TRACE_ID.match(trace_id):
        return None
    return template.replace(TRACE_ID_FIELD, quote(trace_id, safe=""))


class SlowRequests:
    """The ``size`` slowest requests of the last ``window_s`` (see the module docstring)."""

    def __init__(self, size: int = 20, window_s: float = 900.0, bucket_s: float = 60.0) -> None:
        if size < 1 or bucket_s <= 0 or window_s < bucket_s:
            raise ValueError(f"need size >= 1 and 0 < bucket_s <= window_s, got {size}, {bucket_s}, {window_s}")
        self.size = size
        self.window_s = window_s
        self.bucket_s = bucket_s
        self.max_buckets = math.ceil(window_s / bucket_s) + 1
        self._buckets: dict[int, list[tuple[float, int, SlowRequest]]] = {}
        self._order = itertools.count()  # ties never compare two records
        self._latest = -math.inf  # the latest finish time offered

    def __len__(self) -> int:
        return sum(len(heap) for heap in self._buckets.values())

    def offer(self, record: SlowRequest) -> None:
        """Keep ``record`` if it is among the ``size`` slowest of its minute."""
        if record.at <= self._latest - self.window_s:
            return  # already past the window (the wall clock went back)
        self._latest = max(self._latest, record.at)
        index = int(record.at // self.bucket_s)
        heap = self._buckets.get(index)
        if heap is None:
            heap = self._buckets[index] = []
            self._prune(self._latest)
        entry = (record.total_ms, next(self._order), record)
        if len(heap) < self.size:
            heapq.heappush(heap, entry)
        elif record.total_ms > heap[0][0]:
            heapq.heapreplace(heap, entry)

    def top(self, now: float) -> list[SlowRequest]:
        """The ``size`` slowest requests that finished in ``(now - window_s, now]``, slowest first."""
        self._prune(now)
        cutoff = now - self.window_s
        kept: Iterable[SlowRequest] = (
            record for heap in self._buckets.values() for _, _, record in heap if cutoff < record.at <= now
        )
        return heapq.nlargest(self.size, kept, key=lambda record: record.total_ms)

    def _oldest_index(self, now: float) -> int:
        return int((now - self.window_s) // self.bucket_s)

    def _prune(self, now: float) -> None:
        oldest = self._oldest_index(now)
        for index in [i for i in self._buckets if i < oldest]:
            del self._buckets[index]
        while len(self._buckets) > self.max_buckets:  # only a clock far ahead then back again gets here
            del self._buckets[min(self._buckets)]
