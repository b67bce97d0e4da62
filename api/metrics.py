"""The edge's Prometheus metrics: what ``GET /metrics`` serves (text format, prometheus-client).

One ``EdgeMetrics`` per app, on its own ``CollectorRegistry`` (never the process-global one), so several
apps in one process (tests) never collide. The families, all prefixed ``aisemble_edge_``:

* ``requests_total{service,task,status}``: every request to a service path (``/data/...``, ``/ai/<svc>/...``, ``/v1``)
  by its HTTP status, counted in ONE place, ``RequestMetrics`` (ASGI middleware): so a 401 from the key gate,
  a 413 from the body limit and a 422 from validation count as well as the answers of ``Edge.call``. The task
  is what ``Edge.call`` was asked for (``note_call``); a request refused before that has ``task=""``.
* ``request_seconds{service}``: a histogram of the same requests' latency (1 ms to 60 s buckets).
* ``in_flight``, ``max_in_flight``, ``in_flight_peak``, ``rejected_total`` (429s), ``replies_waiting``,
  ``replies_dropped_total``, ``replies_foreign_total``: read from the edge at scrape time.
* ``cache_hits_total{service}`` / ``cache_misses_total{service}``: the edge's own cache lookups (a request
  that may not use the cache is neither).
* ``consumer_lag{service}`` and ``drain_seconds{service}``: the service's consumer group lag and the time
  its agents need to drain it at their recent rate, from the lag monitor at scrape time (``scrape``).

The same middleware offers each of these requests to ``slow`` (``api.status_history.SlowRequests``): the
slowest recent ones for the status page, with the request id and trace id ``note_call`` found (no payload).

Per API key *name* (``AISEMBLE_API_KEYS``; never the key), from ``keys`` (``api.quotas.KeyStats``) at scrape
time: ``aisemble_key_requests_total{key_name,service}`` (requests to service routes the key's quotas let
through), ``aisemble_key_tokens_total{key_name}`` (LLM tokens its answers used: prompt + completion) and
``aisemble_key_rate_limited_total{key_name,limit}`` (its 429s, ``limit`` = ``rpm``, ``tpm``, ``max_in_flight``).
These are this edge's counts; sum them over edges.

What can go wrong: a label set is created on first use, so a service with no traffic yet has no
``requests_total`` sample (rate() treats that as 0). Counters restart at 0 with the process (Prometheus'
rate() handles resets). The lag of a scrape is as fresh as the lag monitor's cache (about a second).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.quotas import KeyStats
from api.status_history import SlowRequest, SlowRequests
from schemas import SERVICES

PREFIX = "aisemble_edge"
# Seconds: 1 ms (a cache hit) to 60 s (an LLM completion near its timeout).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass(slots=True)
class _CallLabels:
    """Filled in by ``Edge.call`` (through ``note_call``) for the middleware that counts the request."""

    service: str = ""
    task: str = ""
    request_id: str | None = None
    trace_id: str | None = None


_current: contextvars.ContextVar[_CallLabels | None] = contextvars.ContextVar("aisemble_edge_call", default=None)


def note_call(service: str, task: str, request_id: str | None = None) -> None:
    """Tell the request being counted which service and task it called, its request id, and the trace id of the
    span current here when tracing is on (``current_trace_id``); a no-op outside ``RequestMetrics``.

    The middleware sets a mutable holder in the context; this mutates it, so it works even when the route
    runs in a copied context (another task). Called again for the same request (where the call finishes), it
    keeps the trace id it found first."""
    labels = _current.get()
    if labels is not None:
        labels.service, labels.task = service, task
        if request_id is not None:
            labels.request_id = request_id
        if labels.trace_id is None:
            labels.trace_id = current_trace_id()


def current_trace_id() -> str | None:
    """The trace id (32 hex digits) of the span current in this context, or None (tracing off: the API's no-op
    span is never valid). Reads OpenTelemetry's context only; sets nothing up."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


OPENAI_PATHS = {"/v1/chat/completions": "llm", "/v1/completions": "llm", "/v1/embeddings": "nlp"}


def service_of_path(path: str) -> str:
    """The service a path belongs to (``/data/...``, ``/ai/<service>/...``, the OpenAI-compatible ``/v1``
    POST routes), or '' for any other path."""
    if path in OPENAI_PATHS:
        return OPENAI_PATHS[path]
    parts = path.strip("/").split("/")
    name = parts[1] if parts[0] == "ai" and len(parts) > 1 else parts[0]
    return name if name in SERVICES else ""


@dataclass(frozen=True, slots=True)
class ServiceLag:
    """One service's consumer lag (records not yet consumed) and its estimated drain time (None: unknown);
    ``lanes``: the same per lane (``interactive``, ``bulk``; ``streams.lag.LANES``)."""

    records: float
    drain_s: float | None
    lanes: Mapping[str, ServiceLag] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EdgeLoad:
    """What the edge knows at scrape time (``Edge.load`` and its reply router's counters)."""

    in_flight: int
    max_in_flight: int
    peak: int
    rejected: int
    waiting: int
    replies_dropped: int
    replies_foreign: int


class _ScrapeCollector(Collector):
    """Families read at scrape time: the edge's load and the service lag given to ``EdgeMetrics.scrape``."""

    def __init__(self) -> None:
        self.load: EdgeLoad | None = None
        self.lag: dict[str, ServiceLag] = {}

    def collect(self) -> Iterator[Metric]:
        load = self.load
        if load is not None:
            yield GaugeMetricFamily(f"{PREFIX}_in_flight", "Requests the edge holds now.", value=load.in_flight)
            yield GaugeMetricFamily(
                f"{PREFIX}_max_in_flight", "Requests the edge holds at most (past it 429).", value=load.max_in_flight
            )
            yield GaugeMetricFamily(f"{PREFIX}_in_flight_peak", "Most requests held at once.", value=load.peak)
            yield CounterMetricFamily(f"{PREFIX}_rejected", "Requests refused with 429.", value=load.rejected)
            yield GaugeMetricFamily(f"{PREFIX}_replies_waiting", "Requests waiting for a reply.", value=load.waiting)
            yield CounterMetricFamily(
                f"{PREFIX}_replies_dropped", "Replies for no waiting request (late or duplicate).",
                value=load.replies_dropped,
            )  # fmt: skip
            yield CounterMetricFamily(
                f"{PREFIX}_replies_foreign", "Replies whose correlation did not match (dropped).",
                value=load.replies_foreign,
            )  # fmt: skip
        lag = self.lag
        records = GaugeMetricFamily(
            f"{PREFIX}_consumer_lag", "Records on the service's request topic not yet consumed.", labels=["service"]
        )
        drain = GaugeMetricFamily(
            f"{PREFIX}_drain_seconds", "Estimated seconds for the service's agents to consume the lag.",
            labels=["service"],
        )  # fmt: skip
        for service, value in sorted(lag.items()):
            records.add_metric([service], value.records)
            if value.drain_s is not None:
                drain.add_metric([service], value.drain_s)
        yield records
        yield drain


class _KeyCollector(Collector):
    """The ``aisemble_key_*`` families, read from a ``KeyStats`` at scrape time."""

    def __init__(self, stats: KeyStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "aisemble_key_requests", "Requests to service routes per API key name and service.",
            labels=["key_name", "service"],
        )  # fmt: skip
        tokens = CounterMetricFamily(
            "aisemble_key_tokens", "LLM tokens (prompt + completion) used per API key name.", labels=["key_name"]
        )
        limited = CounterMetricFamily(
            "aisemble_key_rate_limited", "429s per API key name and limit (rpm, tpm, max_in_flight).",
            labels=["key_name", "limit"],
        )  # fmt: skip
        for name, counts in sorted(self.stats.keys.items()):
            for service, n in sorted(counts.requests.items()):
                requests.add_metric([name, service], n)
            tokens.add_metric([name], counts.tokens)
            for limit, n in sorted(counts.limited.items()):
                limited.add_metric([name, limit], n)
        yield requests
        yield tokens
        yield limited


class EdgeMetrics:
    """The edge's metrics on their own registry; see the module docstring. ``key_names``: the names of
    ``AISEMBLE_API_KEYS`` (each has its ``aisemble_key_tokens_total`` sample from the start)."""

    def __init__(
        self, key_names: list[str] | None = None, slow_requests: int = 20, slow_window_s: float = 900.0
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # The slowest recent requests for the status page (api.status_history), fed by RequestMetrics.
        self.slow = SlowRequests(slow_requests, slow_window_s)
        self.keys = KeyStats(key_names)
        self.registry.register(_KeyCollector(self.keys))
        self.requests = Counter(
            f"{PREFIX}_requests", "Requests to service paths by service, task and HTTP status.",
            ["service", "task", "status"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            f"{PREFIX}_request_seconds", "Latency of requests to service paths, by service.",
            ["service"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.cache_hits = Counter(
            f"{PREFIX}_cache_hits", "Requests answered from the edge's cache.", ["service"], registry=self.registry
        )
        self.cache_misses = Counter(
            f"{PREFIX}_cache_misses", "Cache lookups that found nothing (the request went to Kafka).",
            ["service"], registry=self.registry,
        )  # fmt: skip
        self._scraped = _ScrapeCollector()
        self.registry.register(self._scraped)
        # Label children, made once: the hot path only looks a tuple up in a dict.
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._latency_children: dict[str, Histogram] = {s: self.latency.labels(s) for s in SERVICES}
        self._hit_children: dict[str, Counter] = {s: self.cache_hits.labels(s) for s in SERVICES}
        self._miss_children: dict[str, Counter] = {s: self.cache_misses.labels(s) for s in SERVICES}

    def observe_request(self, service: str, task: str, status: int, seconds: float) -> None:
        """Count one finished request to a service path and its latency."""
        key = (service, task, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(service, task, str(status))
        child.inc()
        self._latency_children[service].observe(seconds)

    def cache_lookup(self, service: str, hit: bool) -> None:
        (self._hit_children if hit else self._miss_children)[service].inc()

    def scrape(self, load: EdgeLoad | None, lag: Mapping[str, ServiceLag] | None = None) -> bytes:
        """The registry in Prometheus' text format (``CONTENT_TYPE``), with ``load`` and ``lag`` read now
        (``lag`` None: the last one given stays; a service missing from it has no lag sample)."""
        self._scraped.load = load
        if lag is not None:
            self._scraped.lag = dict(lag)
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: counts every request to a service path with its status and latency (``EdgeMetrics``).

    Put it outermost among the edge's middleware so it also sees the key gate's 401 and the body limit's
    413; an exception that escapes the app counts as 500 and is re-raised untouched."""

    def __init__(self, app: ASGIApp, metrics: EdgeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = service_of_path(scope["path"]) if scope["type"] == "http" else ""
        if not service:
            await self.app(scope, receive, send)
            return
        labels = _CallLabels(service)
        token = _current.set(labels)
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _current.reset(token)
            seconds = time.perf_counter() - started
            self.metrics.observe_request(labels.service or service, labels.task, status, seconds)
            self.metrics.slow.offer(
                SlowRequest(
                    seconds * 1000.0, time.time(), labels.service or service, scope["path"], status,
                    labels.task, labels.request_id, labels.trace_id,
                )
            )  # fmt: skip
