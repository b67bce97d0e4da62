"""An agent process's Prometheus metrics, served on its own port (``AISEMBLE_AGENT_METRICS_PORT``).

``AgentMetrics`` is the ``agents.loop.BatchObserver`` that ``agents.wiring`` passes to the batch processor;
its families, all prefixed ``aisemble_agent_`` and labelled with the ``service``:

* ``batch_size`` (histogram): records per micro-batch;
* ``batch_wait_seconds`` (histogram): each record's time from its Kafka timestamp to its pick-up (queue time);
* ``inference_seconds`` (histogram): one runner call (``run_batch``), per batch;
* ``items_total``: records handled; ``errors_total{code}``: error replies delivered, by error code;
  ``replies_total``: replies delivered (ok or not); ``dead_letters_total{reason}``: records dead-lettered,
  by reason code; ``cache_hits_total``: requests answered from the cache; ``delivery_retries_total``:
  sends that failed retriably and were sent again.

``serve_agent_metrics`` starts prometheus-client's HTTP server (a daemon thread) on
``agent_metrics_host`` (default 127.0.0.1) and ``agent_metrics_port``: None (the default, so tests open
nothing) serves nothing, 0 takes a free port; the port actually bound is returned and logged. The server has
no authentication: it shows counts and timings only, never a payload; bind it where only the scraper reaches.

What can go wrong: the port is taken (``OSError`` at start-up, so a misconfigured agent fails loudly rather
than running unobserved); a batch rerun record by record after a failure (``process_isolating``) is counted
again, as its records were handled again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from streams.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "aisemble_agent"
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AgentMetrics:
    """One agent process's metrics on their own registry (a ``BatchObserver``); see the module docstring."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._batch_size = Histogram(
            f"{PREFIX}_batch_size", "Records per micro-batch.", ["service"], buckets=BATCH_SIZE_BUCKETS, registry=r
        ).labels(service)
        self._wait = Histogram(
            f"{PREFIX}_batch_wait_seconds", "Time from a record's Kafka timestamp to its pick-up by the agent.",
            ["service"], buckets=WAIT_BUCKETS, registry=r,
        ).labels(service)  # fmt: skip
        self._inference = Histogram(
            f"{PREFIX}_inference_seconds", "Duration of one runner call (a whole batch).",
            ["service"], buckets=INFERENCE_BUCKETS, registry=r,
        ).labels(service)  # fmt: skip
        self._items = Counter(f"{PREFIX}_items", "Records handled.", ["service"], registry=r).labels(service)
        self._replies = Counter(f"{PREFIX}_replies", "Replies delivered.", ["service"], registry=r).labels(service)
        self._errors = Counter(
            f"{PREFIX}_errors", "Error replies delivered, by error code.", ["service", "code"], registry=r
        )
        self._dead_letters = Counter(
            f"{PREFIX}_dead_letters", "Records dead-lettered, by reason code.", ["service", "reason"], registry=r
        )
        self._cache_hits = Counter(
            f"{PREFIX}_cache_hits", "Requests answered from the cache.", ["service"], registry=r
        ).labels(service)
        self._retries = Counter(
            f"{PREFIX}_delivery_retries", "Sends that failed retriably and were sent again.", ["service"], registry=r
        ).labels(service)
        self._error_children: dict[str, Counter] = {}
        self._letter_children: dict[str, Counter] = {}

    def batch(self, size: int, waits_s: Sequence[float]) -> None:
        self._batch_size.observe(size)
        self._items.inc(size)
        for wait in waits_s:
            self._wait.observe(max(wait, 0.0))  # a producer's clock ahead of ours must not go negative

    def inference(self, size: int, seconds: float) -> None:
        self._inference.observe(seconds)

    def replied(self, ok: bool, code: str | None) -> None:
        self._replies.inc()
        if not ok:
            name = code or "unknown"
            child = self._error_children.get(name)
            if child is None:
                child = self._error_children[name] = self._errors.labels(self.service, name)
            child.inc()

    def dead_letter(self, reason: str) -> None:
        child = self._letter_children.get(reason)
        if child is None:
            child = self._letter_children[reason] = self._dead_letters.labels(self.service, reason)
        child.inc()

    def cache_hits(self, count: int) -> None:
        self._cache_hits.inc(count)

    def retries(self, count: int) -> None:
        self._retries.inc(count)


def serve_agent_metrics(service: str, settings: Settings) -> tuple[AgentMetrics, int] | None:
    """Start the agent's metrics server when ``settings.agent_metrics_port`` is set; returns the metrics
    and the port bound (a free one for 0), or None when metrics are off. Raises ``OSError`` (port taken)."""
    port = settings.agent_metrics_port
    if port is None:
        return None
    metrics = AgentMetrics(service)
    server, _thread = start_http_server(port, addr=settings.agent_metrics_host, registry=metrics.registry)
    bound = int(server.server_port)
    log.info("%s agent metrics on http://%s:%d/metrics", service, settings.agent_metrics_host, bound)
    return metrics, bound
