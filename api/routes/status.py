"""The status page (``GET /``, with its CSS and JavaScript) and its data, ``GET /status.json``.

``/status.json`` aggregates what the edge already knows, per configured service: health and live agents (the
same rule and the same one Redis read as ``/health``), consumer lag and drain time (the edge's lag monitor, as
``/metrics`` reads it), and over a recent window (``WINDOW_S``, 60 s): throughput in items/s and the mean batch
size from the agents' heartbeats (their cumulative ``items`` and ``batches``, time-stamped by the agent), and the
edge's requests/s and p95 latency from its ``request_seconds`` histogram (``api.metrics.EdgeMetrics``).

How the window works: each ``/status.json`` call takes a sample (kept when the last kept one is at least
``MIN_GAP_S`` old; samples older than ``WINDOW_S`` are dropped) and compares the current reading with the oldest
sample kept. So the figures cover at most the last 60 s, the window's length is in the answer (``window_s``),
and a first call (or the first after ``WINDOW_S`` without callers) has no rates: those figures are null, which
the page shows as "—". Nothing runs between calls.

What the figures mean, and their limits:

* ``items_per_s``: the sum over a service's agents of (items now - items at the agent's oldest beat in the
  window) / (the time between those beats, by the agent's clock). An agent seen once so far adds nothing;
  no agent seen twice: null. Heartbeats come every ``heartbeat_interval_s``, so the figure trails by up to that.
* ``batch_mean``: items / batches summed over the same pairs of beats; null when no batch ran in the window.
* ``p95_ms`` and ``requests_per_s``: from the edge histogram's bucket counts between the two samples; the p95 is
  interpolated linearly inside its bucket (as Prometheus' ``histogram_quantile``), so it is an estimate at the
  buckets' resolution (1, 2.5, 5, 10, 25 ms ...); it counts every request to the service's paths, refusals
  (401, 413, 422, 429) included. Beyond the last finite bucket (60 s) it reports 60 s.
* ``keys``: per API key *name* (never the key), this edge's counts since it started: ``requests`` (and
  ``by_service``), ``tokens`` (LLM prompt + completion), ``rate_limited`` (429s, and ``by_limit``).
* ``lag`` / ``drain_s``: null while Kafka is down (the monitor is not asked then) or when the monitor cannot
  answer within ``api.routes.metrics.LAG_READ_TIMEOUT_S``; ``draining`` false: lag that no agent consumes.
  ``lanes``: the same three per lane, ``{"interactive": {...}, "bulk": {...}}`` (null with ``lag``).

The history, ``GET /status/history.json``: a background task of the edge (``sample_history_forever``, started
and cancelled in ``api.app``'s lifespan) reads what ``/status.json`` reads every ``status_history_interval_s``
(5 s) and adds one point per service (``api.status_history.History``: the last ``status_history_window_s``,
15 min, 181 points): items/s, requests/s and p95 latency over the interval since the previous point
(``HistorySampler``), lag and time to drain, per lane too. It never raises and never holds a request up: a
failed round (Redis or Kafka away) is a gap, logged once. The answer also lists the ``status_slow_requests``
(20) slowest requests of the window (``api.metrics.EdgeMetrics.slow``: request id, service, task, route,
status, total ms, time, trace id when tracing is on; never a payload), each trace id with a link built from
``AISEMBLE_TRACE_URL_TEMPLATE`` when set. Each edge keeps its own history and list (several edges: a page
shows the one it reached); both start empty when the edge starts.

Access: the page and its two static files are open (they hold no data); ``/status.json`` and
``/status/history.json`` follow ``/metrics``' rule (``api.app`` applies ``auth_dependencies(settings,
route="metrics")`` and opens them only when ``AISEMBLE_METRICS_REQUIRE_KEY`` is false). With keys configured the
page asks for one, keeps it in the browser's ``sessionStorage`` and sends it as ``X-API-Key``. None of these
routes is in the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources

from fastapi import APIRouter, Depends, Request
from fastapi.responses import ORJSONResponse, Response
from starlette.datastructures import State

from api.deps import get_edge
from api.edge import Edge
from api.metrics import EdgeMetrics, ServiceLag
from api.routes.health import HealthReport, health_report
from api.routes.metrics import read_lag_of
from api.status_history import History, LanePoint, Point

log = logging.getLogger(__name__)

WINDOW_S = 60.0  # the figures cover at most this many seconds
MIN_GAP_S = 1.0  # a sample is kept only when the last kept one is at least this old
MAX_SAMPLES = 256  # a bound on memory whatever the callers do
QUANTILE = 0.95
PAGE_FILES = {  # path -> (file under api/static, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/status.css": ("status.css", "text/css; charset=utf-8"),
    "/static/status.js": ("status.js", "text/javascript; charset=utf-8"),
}
PAGE_PATHS = frozenset(PAGE_FILES)  # open without a key (api.app)
DATA_PATHS = frozenset({"/status.json", "/status/history.json"})  # the page's data: /metrics' rule (api.app)
# The page loads only its own files and asks only this edge: no CDN, no inline script, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

router = APIRouter(tags=["status"])  # /status.json: api.app puts it behind the metrics rule
page_router = APIRouter(tags=["status"])  # the page and its files: open


# ---- the pure part: samples and the figures between two of them -------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentCounts:
    """One agent's cumulative counters as its heartbeat reported them at ``seen_ms`` (the agent's clock)."""

    seen_ms: int
    items: int
    batches: int


@dataclass(frozen=True, slots=True)
class ServiceSample:
    """One service at one moment: the edge histogram's cumulative buckets ``(upper bound s, count)`` (the
    last one +Inf) and its agents' counters by worker id (None: unknown, Redis could not be read)."""

    buckets: tuple[tuple[float, float], ...]
    agents: Mapping[str, AgentCounts] | None


@dataclass(frozen=True, slots=True)
class Sample:
    """Every service at ``taken_s`` (monotonic seconds)."""

    taken_s: float
    services: Mapping[str, ServiceSample]


@dataclass(frozen=True, slots=True)
class Figures:
    """One service's rates over the window (None: not measurable yet)."""

    items_per_s: float | None = None
    batch_mean: float | None = None
    requests_per_s: float | None = None
    p95_ms: float | None = None


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile (seconds) of a cumulative histogram ``[(upper bound, count), ..., (inf, total)]``,
    interpolated linearly inside the bucket it falls in (the first bucket starts at 0); None when it is empty.
    A quantile in the +Inf bucket is the highest finite bound."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count <= below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower  # unreachable for a well-formed histogram (the +Inf bucket holds the total)


def bucket_delta(
    now: tuple[tuple[float, float], ...], before: tuple[tuple[float, float], ...]
) -> tuple[tuple[float, float], ...]:
    """The cumulative buckets of the observations made between ``before`` and ``now`` (same bounds)."""
    earlier = dict(before)
    return tuple((upper, max(0.0, count - earlier.get(upper, 0.0))) for upper, count in now)


def agent_figures(
    now: Mapping[str, AgentCounts], history: Iterable[Mapping[str, AgentCounts]]
) -> tuple[float | None, float | None]:
    """``(items/s, mean batch size)`` of the agents in ``now`` against their oldest appearance in ``history``
    (oldest first). An agent whose clock did not move, or whose counters went back, adds nothing."""
    oldest: dict[str, AgentCounts] = {}
    for agents in history:
        for worker, counts in agents.items():
            oldest.setdefault(worker, counts)
    rate, items, batches, pairs = 0.0, 0, 0, 0
    for worker, current in now.items():
        first = oldest.get(worker)
        if first is None or current.seen_ms <= first.seen_ms:
            continue
        d_items, d_batches = current.items - first.items, current.batches - first.batches
        if d_items < 0 or d_batches < 0:
            continue
        pairs += 1
        rate += d_items / ((current.seen_ms - first.seen_ms) / 1000.0)
        items += d_items
        batches += d_batches
    return (rate if pairs else None), (items / batches if batches else None)


@dataclass
class StatusWindow:
    """The samples of the last ``window_s`` seconds; ``figures`` compares a new reading with the oldest."""

    window_s: float = WINDOW_S
    min_gap_s: float = MIN_GAP_S
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))

    def observe(self, sample: Sample) -> tuple[dict[str, Figures], float | None]:
        """Each service's figures between the oldest kept sample and ``sample`` (then kept if due), and the
        window's length in seconds (None, and empty figures, when there is nothing older to compare with)."""
        while self.samples and sample.taken_s - self.samples[0].taken_s > self.window_s:
            self.samples.popleft()
        figures: dict[str, Figures] = {}
        window = None
        if self.samples and sample.taken_s > self.samples[0].taken_s:
            reference = self.samples[0]
            window = sample.taken_s - reference.taken_s
            for service, current in sample.services.items():
                figures[service] = self._figures(service, current, reference, window)
        if not self.samples or sample.taken_s - self.samples[-1].taken_s >= self.min_gap_s:
            self.samples.append(sample)
        return figures, window

    def _figures(self, service: str, current: ServiceSample, reference: Sample, window: float) -> Figures:
        before = reference.services.get(service)
        requests_per_s = p95_ms = None
        if before is not None and current.buckets and before.buckets:
            delta = bucket_delta(current.buckets, before.buckets)
            requests_per_s = delta[-1][1] / window
            p95 = histogram_quantile(QUANTILE, delta)
            p95_ms = None if p95 is None else p95 * 1000.0
        items_per_s = batch_mean = None
        if current.agents is not None:
            history = (s.services[service].agents for s in self.samples if service in s.services)
            items_per_s, batch_mean = agent_figures(current.agents, (a for a in history if a is not None))
        return Figures(items_per_s, batch_mean, requests_per_s, p95_ms)


# ---- reading the edge ---------------------------------------------------------------------------------------


def latency_buckets(metrics: EdgeMetrics) -> dict[str, tuple[tuple[float, float], ...]]:
    """``{service: ((upper bound s, cumulative count), ..., (inf, total))}`` from the edge's latency histogram."""
    out: dict[str, list[tuple[float, float]]] = {}
    for family in metrics.latency.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                out.setdefault(sample.labels["service"], []).append((float(sample.labels["le"]), sample.value))
    return {service: tuple(sorted(buckets)) for service, buckets in out.items()}


def _agents_of(view: object) -> dict[str, AgentCounts] | None:
    """A /health service view's agents as counters by worker id (None when they are unknown)."""
    agents = view.get("agents") if isinstance(view, dict) else None
    if not isinstance(agents, list):
        return None
    out: dict[str, AgentCounts] = {}
    for agent in agents:
        if isinstance(agent, dict) and "worker_id" in agent:
            counts = (int(agent.get(k) or 0) for k in ("seen_ms", "items", "batches"))
            out[str(agent["worker_id"])] = AgentCounts(*counts)
    return out


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def _lag_view(lag: ServiceLag | None, lanes: bool = True) -> dict[str, object]:
    """``lag``, ``drain_s``, ``draining`` of a service, and the same per lane under ``lanes``."""
    if lag is None:
        return {"lag": None, "drain_s": None, "draining": None, **({"lanes": None} if lanes else {})}
    records = int(lag.records)
    draining = None if lag.drain_s is None else math.isfinite(lag.drain_s)
    view: dict[str, object] = {
        "lag": records,
        "drain_s": _round(lag.drain_s, 1),
        "draining": True if records == 0 else draining,
    }
    if lanes:
        view["lanes"] = {name: _lag_view(lane, lanes=False) for name, lane in lag.lanes.items()}
    return view


def window_of(request: Request) -> StatusWindow:
    """This app's sample window (made on first use; one per app)."""
    window: StatusWindow | None = getattr(request.app.state, "status_window", None)
    if window is None:
        window = request.app.state.status_window = StatusWindow()
    return window


async def read_status(state: State, edge: Edge) -> tuple[HealthReport, dict[str, ServiceLag] | None, Sample]:
    """What ``/status.json`` and the history sampler read: /health's report, the lag (None while Kafka is down
    or the monitor cannot answer) and a sample of the latency histogram and the agents' counters."""
    health_doc = await health_report(edge)
    kafka_ok = bool(health_doc.kafka.get("ok"))
    lag = await read_lag_of(getattr(state, "lag", None)) if kafka_ok else None
    buckets = latency_buckets(state.metrics)
    views = health_doc.services
    sample = Sample(
        time.monotonic(),
        {s: ServiceSample(buckets.get(s, ()), _agents_of(view)) for s, view in views.items()},
    )
    return health_doc, lag, sample


@router.get("/status.json", include_in_schema=False)
async def status_json(request: Request, edge: Edge = Depends(get_edge)) -> ORJSONResponse:
    """Every dependency and service at a glance, with rates over the recent window (see the module doc)."""
    health_doc, lag, sample = await read_status(request.app.state, edge)
    views = health_doc.services
    figures, window = window_of(request).observe(sample)
    services: dict[str, object] = {}
    for service, view in views.items():
        agents = view.get("agents")
        known = sample.services[service].agents
        figs = figures.get(service, Figures())
        services[service] = {
            "status": view.get("status"),
            "agents": len(agents) if isinstance(agents, list) else None,
            **_lag_view(None if lag is None else lag.get(service)),
            "items_per_s": _round(figs.items_per_s),
            "batch_mean": _round(figs.batch_mean),
            "requests_per_s": _round(figs.requests_per_s),
            "p95_ms": _round(figs.p95_ms),
            "items_total": None if known is None else sum(a.items for a in known.values()),
            "batches_total": None if known is None else sum(a.batches for a in known.values()),
        }
    redis = health_doc.redis
    body = {
        "status": health_doc.status,
        "taken_at": round(time.time(), 3),
        "window_s": _round(window, 1),
        "kafka": {k: health_doc.kafka.get(k) for k in ("ok", "status", "since", "last_error")},
        "redis": {"ok": bool(redis.get("ok")), "breaker": redis.get("breaker"), "error": redis.get("error")},
        "edge": health_doc.edge,
        "services": services,
        "keys": request.app.state.metrics.keys.snapshot(),  # per key name, at this edge (api.quotas.KeyStats)
    }
    return ORJSONResponse(body, headers={"Cache-Control": "no-store"})


# ---- the history: a point per service every status_history_interval_s (api.status_history) ------------------


def history_points(
    at: float, figures: Mapping[str, Figures], services: Iterable[str], lag: Mapping[str, ServiceLag] | None
) -> dict[str, Point]:
    """Each service's point at ``at`` (epoch s): its ``figures`` (none: rates unknown) and its lag (None: unknown)."""
    points: dict[str, Point] = {}
    for service in services:
        figs = figures.get(service, Figures())
        service_lag = None if lag is None else lag.get(service)
        lanes: dict[str, LanePoint] = {}
        if service_lag is not None:
            lanes = {name: LanePoint(int(lane.records), lane.drain_s) for name, lane in service_lag.lanes.items()}
        points[service] = Point(
            at,
            items_per_s=figs.items_per_s,
            requests_per_s=figs.requests_per_s,
            p95_ms=figs.p95_ms,
            lag=None if service_lag is None else int(service_lag.records),
            drain_s=None if service_lag is None else service_lag.drain_s,
            lanes=lanes,
        )
    return points


class HistorySampler:
    """Turns samples into history points: the rates of each point are over the interval since the previous
    sample (a ``StatusWindow`` that keeps only the last one), so a point shows that interval, not a minute."""

    def __init__(self, history: History) -> None:
        self.history = history
        self.window = StatusWindow(window_s=math.inf, min_gap_s=0.0, samples=deque(maxlen=1))

    def observe(self, sample: Sample, at: float, lag: Mapping[str, ServiceLag] | None) -> dict[str, Point]:
        figures, _ = self.window.observe(sample)
        points = history_points(at, figures, sample.services, lag)
        self.history.add(points)
        return points


def history_of(state: State) -> HistorySampler:
    """This app's history sampler (made on first use; ``api.app`` makes it with the settings' interval)."""
    sampler: HistorySampler | None = getattr(state, "status_history", None)
    if sampler is None:
        sampler = state.status_history = HistorySampler(History(5.0, 900.0))
    return sampler


async def sample_history_forever(state: State, interval_s: float) -> None:
    """Every ``interval_s`` read what ``/status.json`` reads and add a point per service, until cancelled.

    It never raises and never holds a request up: a round that fails (Redis or Kafka away, a surprise) is
    logged once and leaves a gap; reads are bounded (/health's one Redis call, the lag read's timeout)."""
    sampler = history_of(state)
    failing = False
    next_at = time.monotonic()
    while True:
        try:
            _, lag, sample = await read_status(state, state.edge)
            sampler.observe(sample, time.time(), lag)
            failing = False
        except Exception as exc:  # noqa: BLE001  (the sampler outlives any failure: a gap, not a crash)
            if not failing:
                log.warning("status history: a sample failed (a gap in the charts): %r", exc)
            failing = True
        next_at = max(next_at + interval_s, time.monotonic())
        await asyncio.sleep(next_at - time.monotonic())


@router.get("/status/history.json", include_in_schema=False)
async def status_history(request: Request) -> ORJSONResponse:
    """The last ``status_history_window_s`` of each service's figures, and the slowest recent requests (with
    their trace ids and, when ``AISEMBLE_TRACE_URL_TEMPLATE`` is set, links to them); this edge's only."""
    state = request.app.state
    sampler = history_of(state)
    now = time.time()
    template: str | None = getattr(state, "trace_url_template", None)
    metrics: EdgeMetrics = state.metrics
    body = {
        "edge_id": getattr(state, "edge_id", None),
        "taken_at": round(now, 3),
        "interval_s": sampler.history.interval_s,
        "window_s": sampler.history.window_s,
        "services": sampler.history.as_json(),
        "slow": [record.as_json(template) for record in metrics.slow.top(now)],
        "slow_size": metrics.slow.size,
    }
    return ORJSONResponse(body, headers={"Cache-Control": "no-store"})


def _page_route(path: str, name: str, media_type: str) -> None:
    async def serve() -> Response:
        content = resources.files("api").joinpath("static", name).read_bytes()
        headers = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
        return Response(content, media_type=media_type, headers=headers)

    serve.__name__ = f"status_page_{name.replace('.', '_')}"
    page_router.add_api_route(path, serve, methods=["GET"], include_in_schema=False)


for _path, (_name, _media) in PAGE_FILES.items():
    _page_route(_path, _name, _media)
