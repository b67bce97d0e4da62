"""The edge's request path: cache lookup, produce, await the correlated reply.

``Edge.call`` is the one function every route uses. It guarantees:

* a cache hit is answered from Redis without touching Kafka (``cached: true``);
* otherwise the reply future is registered *before* the request is produced, the request carries this
  edge's reply topic and a deadline, and the caller waits at most ``request_timeout_s`` (504 with the
  request id after that; a late reply is then dropped);
* each request id is answered once, whatever duplicates at-least-once delivery produces;
* at most ``max_in_flight`` requests are held at once (cache hits included: each holds its body and a
  task while it waits, on Redis or on Kafka); past that ``call`` raises ``OverloadedError`` (429,
  ``Retry-After``) at once, without awaiting anything, so the edge's memory stays bounded under any load;
* Kafka is given ``produce_timeout_s`` to take a request (then 503, ``UnavailableError``), and while the
  edge's broker view (``kafka_state``) says the broker is down, a cache miss is answered 503 at once and
  nothing is handed to the producer. The view is kept by a metadata probe every ``PROBE_INTERVAL_S``
  (timeout ``produce_timeout_s``), run at once when a produce fails; a successful produce marks it ok.
  Only the probe marks it down, so a produce that timed out under a burst does not shed every request.
  Cache hits are still served while Kafka is down.

What can go wrong: a request that timed out while producing may still reach the broker later (the
producer keeps what it already accepted until its own timeout), so a 503 means "maybe not processed",
never "processed": its reply, if any, is dropped. A caller that retries may get its request run twice
(at-least-once). Between the broker's death and the first failed probe (at most ``PROBE_INTERVAL_S``
plus ``produce_timeout_s``), requests fail after ``produce_timeout_s`` rather than at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.asyncio import Redis

from api.errors import DuplicateIdError, OverloadedError, ReplyTimeoutError, UnavailableError
from api.guards import BrokerState, InFlightLimit
from api.metrics import EdgeMetrics, note_call
from schemas import ReplyEvent, RequestEvent, Service
from streams.cache import ResultCache, wants_cache
from streams.codec import encode
from streams.registry import models_by_service
from streams.replies import DuplicateRequestIdError, ReplyListener, ReplyRouter
from streams.settings import Settings
from streams.topics import service_topics

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0  # how often the broker view is refreshed by a metadata request
RETRY_AFTER_S = 1  # the Retry-After of a 429


def _broker_failure(exc: BaseException) -> bool:
    """Whether a produce failure says the broker is unreachable (not e.g. a record too large)."""
    return isinstance(exc, TimeoutError) or (isinstance(exc, KafkaError) and exc.retriable)


class Edge:
    """The edge's connections and its request path; one per process, built in the app's lifespan."""

    def __init__(
        self,
        settings: Settings,
        producer: AIOKafkaProducer,
        redis: Redis,
        router: ReplyRouter,
        listener: ReplyListener,
        reply_topic: str,
        metrics: EdgeMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.producer = producer
        self.redis = redis
        self.router = router
        self.listener = listener
        self.reply_topic = reply_topic
        self.cache = ResultCache(redis, settings.topic_prefix)
        self.models: dict[str, dict[str, str]] = {}
        self.in_flight = InFlightLimit(settings.max_in_flight)
        self.broker = BrokerState()
        self._probe_now = asyncio.Event()
        self._probe_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the broker probe (the producer must be started)."""
        await self.probe_kafka()
        self._probe_task = asyncio.create_task(self._probe_forever(), name="kafka-probe")

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None

    @property
    def kafka_state(self) -> dict[str, object]:
        """The edge's broker view for /health: ``status`` ("ok"/"down"), ``since`` (epoch s) and
        ``last_error``, ``last_ok`` (epoch s of the last success), ``failures`` (in a row)."""
        return self.broker.snapshot().as_dict()

    @property
    def load(self) -> dict[str, int]:
        """Requests in flight now, the limit, the peak and how many were refused with 429."""
        limit = self.in_flight
        return {"in_flight": limit.count, "max_in_flight": limit.limit, "peak": limit.peak, "rejected": limit.rejected}

    async def probe_kafka(self) -> bool:
        """Ask the broker for cluster metadata within ``produce_timeout_s``; record and return the outcome."""
        try:
            await asyncio.wait_for(self.producer.client.fetch_all_metadata(), self.settings.produce_timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            self._kafka_failed(f"metadata probe: {exc!r}")
            return False
        if self.broker.mark_ok():
            log.warning("Kafka answers again: the edge takes requests")
        return True

    def _kafka_failed(self, error: str) -> None:
        if self.broker.mark_down(error):
            log.warning("Kafka is down (%s): the edge answers 503 until it answers again", error)

    async def _probe_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._probe_now.wait(), PROBE_INTERVAL_S)
            self._probe_now.clear()
            try:
                await self.probe_kafka()
            except Exception:  # the probe must outlive any surprise; the next one retries
                log.exception("kafka probe failed unexpectedly")

    async def refresh_models(self) -> None:
        """Read which model serves each task from the agents' heartbeats (for cache keys)."""
        models = await models_by_service(self.redis, self.settings.topic_prefix)
        if models:
            self.models = models

    def cache_key(
        self, service: Service, task: str, payload: dict[str, object], flag: bool | None
    ) -> str | None:
        model = self.models.get(service, {}).get(task)
        if model is None or not wants_cache(service, task, payload, flag):
            return None
        return self.cache.key(service, task, model, payload)

    async def call(
        self,
        service: Service,
        task: str,
        payload: dict[str, object],
        *,
        cache: bool | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ReplyEvent:
        """Serve one request through the cache or the service's agents.

        Raises:
            OverloadedError: ``max_in_flight`` requests are already held (429, at once).
            UnavailableError: Kafka is down or did not take the request within ``produce_timeout_s`` (503).
            ReplyTimeoutError: no reply within the timeout (504). DuplicateIdError: the id is in flight (409).
        """
        request_id = request_id or uuid.uuid4().hex
        note_call(service, task)  # labels the request counted by api.metrics.RequestMetrics
        if not self.in_flight.try_acquire():
            raise OverloadedError(
                f"the edge holds {self.in_flight.limit} requests already; retry after {RETRY_AFTER_S} s",
                request_id=request_id,
                service=service,
                task=task,
                retry_after_s=RETRY_AFTER_S,
            )
        try:
            return await self._call(service, task, payload, cache, request_id, timeout_s)
        finally:
            self.in_flight.release()

    async def _call(
        self,
        service: Service,
        task: str,
        payload: dict[str, object],
        cache: bool | None,
        request_id: str,
        timeout_s: float | None,
    ) -> ReplyEvent:
        started = time.perf_counter()
        key = self.cache_key(service, task, payload, cache)
        if key is not None:
            hit = await self.cache.get(key)
            if self.metrics is not None:
                self.metrics.cache_lookup(service, hit is not None)
            if hit is not None:
                elapsed = (time.perf_counter() - started) * 1000.0
                return hit.model_copy(
                    update={"id": request_id, "cached": True, "timings_ms": {"edge_ms": elapsed}}
                )

        if self.broker.down:
            raise UnavailableError(
                f"Kafka is unavailable (down for {time.time() - self.broker.since:.1f} s): {self.broker.last_error}",
                request_id=request_id,
                service=service,
                task=task,
            )
        timeout_s = timeout_s or self.settings.request_timeout_s
        try:
            correlation_id, future = self.router.expect(request_id, service, task)
        except DuplicateRequestIdError as exc:
            raise DuplicateIdError(str(exc), request_id=request_id, service=service, task=task) from exc
        event = RequestEvent(
            id=request_id,
            correlation_id=correlation_id,
            task=task,
            input=payload,
            reply_to=self.reply_topic,
            deadline_ms=int((time.time() + timeout_s) * 1000),
            cache=cache,
        )
        try:
            topic = service_topics(self.settings.topic_prefix, service).requests
            try:
                await asyncio.wait_for(
                    self.producer.send_and_wait(topic, encode(event), key=request_id.encode()),
                    min(self.settings.produce_timeout_s, timeout_s),
                )
            except (KafkaError, TimeoutError) as exc:
                if _broker_failure(exc):  # the probe, run now, judges: a slow ack under load is no outage
                    self.broker.suspect(f"produce: {exc!r}")
                    self._probe_now.set()
                raise UnavailableError(
                    f"could not produce the request to Kafka: {exc!r}",
                    request_id=request_id,
                    service=service,
                    task=task,
                ) from exc
            self.broker.mark_ok()
            remaining = timeout_s - (time.perf_counter() - started)
            try:
                reply = await asyncio.wait_for(asyncio.shield(future), max(remaining, 0.001))
            except TimeoutError as exc:
                raise ReplyTimeoutError(
                    f"no reply within {timeout_s:.1f}s (request id {request_id})",
                    request_id=request_id,
                    service=service,
                    task=task,
                ) from exc
        finally:
            self.router.forget(correlation_id)
        elapsed = (time.perf_counter() - started) * 1000.0
        return reply.model_copy(
            update={"correlation_id": None, "timings_ms": {**reply.timings_ms, "edge_ms": round(elapsed, 3)}}
        )
