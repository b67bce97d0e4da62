"""The edge's request path: cache lookup, produce, await the correlated reply.

``Edge.call`` is the one function every route uses. It guarantees:

* a cache hit is answered from Redis without touching Kafka (``cached: true``);
* otherwise the reply future is registered *before* the request is produced, the request carries this
  edge's reply topic and a deadline, and the caller waits at most ``request_timeout_s`` (504 with the
  request id after that; a late reply is then dropped);
* the deadline the agent gets is the edge's wait less a margin (``agent_deadline_ms``:
  ``deadline_margin_ms``, at most 10% of the wait), so an answer the agent finishes by its deadline
  reaches the edge before the 504, and work that cannot is not started;
* a 504 cancels the work: the edge sets the request's cancel key in Redis (``streams.cancel``, TTL the
  wait, naming this attempt's correlation id so a retry with the same request id is not cancelled), as for
  a stream whose client went away, so agents skip or stop it (best effort: Redis away, the work runs and
  its reply is dropped);
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

``Edge.stream`` is ``call`` for a streamed LLM request (``RequestEvent.stream``), with the same admission
(429, 503, 409 raised before anything is returned), cache policy, produce and deadline: it returns an
``EdgeStream`` once the request is produced, which yields the request's text as the agent generates it
(in order, each piece continuing the last: ``streams.replies``) and then the final reply. A cache hit is
answered as a stream of just that final reply (its whole text in one piece), without Kafka. The stream
holds its in-flight slot until ``EdgeStream.close``; its deadline is ``request_timeout_s`` from the start
for the whole stream. A stream closed before its final reply (the client went away, or the deadline
passed) sets the request's cancel key in Redis (``streams.cancel.cancel_key``, TTL ``request_timeout_s``) so
the agent can stop generating, in a background task (best effort: a Redis failure is logged).

Admission before work (``api.admission``): an HTTP request to a service route takes its in-flight slot
before its body is read and holds it until its response is sent, so it calls ``call``/``stream`` with
``admitted=True`` and they take no second slot. Asynchronous requests (``api.async_requests``) run ``call``
in a background task (``spawn``) with ``admitted=True`` (they hold no in-flight slot once Kafka has them;
``pending_async`` bounds them per API key instead), ``store_result_s`` (the agent keeps the reply in
Redis) and ``on_produced`` (told once the request is produced, so the route answers 202 only then).

Kafka latency: a request produced while none of this edge's is in flight leaves at once; while one is, the
producer lingers ``edge_linger_ms`` so a burst is batched (``AdaptiveLinger``).

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
from collections.abc import Callable, Coroutine, Iterator
from typing import Protocol

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.util.types import AttributeValue
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.errors import STATUS_BY_CODE, DuplicateIdError, EdgeError, OverloadedError, ReplyTimeoutError, UnavailableError
from api.guards import BrokerState, InFlightLimit, PendingPerOwner
from api.metrics import EdgeMetrics, note_call
from api.quota_store import SLOT_MARGIN_S, QuotaStore
from schemas import ErrorCode, ReplyEvent, Service
from streams import tracing
from streams.cache import ResultCache, wants_cache
from streams.cancel import cancel_key, cancel_value
from streams.redis import guarded
from streams.registry import models_by_service
from streams.replies import DuplicateRequestIdError, ReplyListener, ReplyRouter, StreamItem, StreamText
from streams.settings import Settings
from streams.topics import existing_topics, service_topics

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0  # how often the broker view is refreshed by a metadata request
RETRY_AFTER_S = 1  # the Retry-After of a 429


def agent_deadline_ms(now_s: float, wait_s: float, margin_ms: int) -> int:
    """The ``deadline_ms`` (epoch ms) of a request the edge waits ``wait_s`` for from ``now_s`` (epoch s): the
    end of the wait less ``margin_ms``, the margin capped at 10% of the wait (a short wait keeps most of it)."""
    margin_s = min(margin_ms / 1000.0, 0.1 * wait_s)
    return int((now_s + wait_s - margin_s) * 1000)


def _json_default(value: object) -> object:
    """What orjson cannot write natively in a task input: a pydantic model as its JSON-mode dump."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def request_record(
    request_id: str,
    correlation_id: str,
    task: str,
    payload: dict[str, object],
    reply_to: str,
    deadline_ms: int,
    *,
    cache: bool | None = None,
    stream: bool = False,
    store_result_s: int | None = None,
) -> bytes:
    """A ``RequestEvent`` as the request record's value, serialised once (orjson, the fields in the model's
    order) without building the model: every field is the edge's own (a checked request id, its correlation
    id, a route's task, its reply topic) and the input is what the route's schema validated, so validating it
    all again (``RequestEvent.model_validate``) and dumping it (``model_dump``) would only pass over the payload
    twice more. The bytes decode to the same event (``streams.codec.decode_request``; a unit test holds it).

    Raises:
        TypeError: the payload holds a value JSON cannot carry (a bug in a route: a 500, never produced).
    """
    return orjson.dumps(
        {
            "id": request_id,
            "task": task,
            "input": payload,
            "reply_to": reply_to,
            "correlation_id": correlation_id,
            "deadline_ms": deadline_ms,
            "cache": cache,
            "stream": stream,
            "store_result_s": store_result_s,
        },
        default=_json_default,
    )


class AdaptiveLinger:
    """The edge producer's linger, chosen per request: none when no produce of this edge is in flight (a lone
    request leaves at once: aiokafka's 1 ms linger costs 2 to 4 ms per hop here, its timer included), and
    ``busy_ms`` while one is (a burst of requests arriving meanwhile is batched as before).

    aiokafka gives a batch the accumulator's linger when the batch is created, so setting it before each send
    decides that send's batch. It is a private attribute of aiokafka (pinned in the lock files); where it is
    missing, ``enabled`` is False and the producer keeps the fixed linger it was built with (``busy_ms``), so
    an upgrade that renames it costs latency, never correctness (a unit test fails loudly on the pinned one).
    """

    def __init__(self, producer: AIOKafkaProducer, busy_ms: int) -> None:
        self._accumulator = getattr(producer, "_message_accumulator", None)
        self.enabled = isinstance(getattr(self._accumulator, "_linger_time", None), int | float)
        self.busy_s = busy_ms / 1000.0
        self.in_flight = 0  # produces handed to the producer and not yet acknowledged (or failed)

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """Hold around one ``send_and_wait``: picks its batch's linger, counts it in flight until it ends."""
        if self.enabled:
            self._accumulator._linger_time = self.busy_s if self.in_flight else 0.0  # type: ignore[union-attr]
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def _broker_failure(exc: BaseException) -> bool:
    """Whether a produce failure says the broker is unreachable (not e.g. a record too large)."""
    return isinstance(exc, TimeoutError) or (isinstance(exc, KafkaError) and exc.retriable)


class RunnersView(Protocol):
    """What ``/health`` reads of the edge's batch runners (``api.batch_runner.BatchRunners``)."""

    failure: str | None

    def state(self) -> dict[str, object]: ...


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
        self.linger = AdaptiveLinger(producer, settings.edge_linger_ms)
        self.redis = redis
        self.router = router
        self.listener = listener
        self.reply_topic = reply_topic
        self.cache = ResultCache(redis, settings.topic_prefix)
        self.models: dict[str, dict[str, str]] = {}
        self.in_flight = InFlightLimit(settings.max_in_flight)
        self.pending_async = PendingPerOwner(settings.max_pending_async_per_key)  # api.async_requests
        self.broker = BrokerState()
        # Per-key quotas (api.quota_gate): counters in Redis only when some key has a limit.
        self.quotas: QuotaStore | None = None
        if any(key.limited for key in settings.api_keys):
            slot_ttl_s = settings.request_timeout_s + SLOT_MARGIN_S
            self.quotas = QuotaStore(redis, settings.topic_prefix, slot_ttl_s)
        self.batch_runners: RunnersView | None = None  # api.batch_runner.BatchRunners, when this edge runs batches
        self._probe_now = asyncio.Event()
        self._probe_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()  # cancel-key writes, asynchronous requests

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
        for task in list(self._background):
            task.cancel()

    def spawn(self, work: Coroutine[object, object, None], name: str) -> asyncio.Task[None]:
        """Run ``work`` in a background task that the edge holds until it ends and cancels on ``stop``."""
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

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
            # Only this edge's reply topic: asking for all topics costs the decoding of every topic of the cluster.
            await asyncio.wait_for(
                existing_topics(self.producer.client, [self.reply_topic]), self.settings.produce_timeout_s
            )
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

    def cache_key(self, service: Service, task: str, payload: dict[str, object], flag: bool | None) -> str | None:
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
        store_result_s: int | None = None,
        on_produced: Callable[[], None] | None = None,
        admitted: bool = False,
    ) -> ReplyEvent:
        """Serve one request through the cache or the service's agents.

        ``store_result_s`` goes into the request event (the agent keeps the reply in Redis that long);
        ``on_produced`` is called once Kafka has taken the request (never for a cache hit); ``admitted``:
        the caller decided admission already (``api.admission`` holds the slot), so no slot is taken here.

        Raises:
            OverloadedError: ``max_in_flight`` requests are already held (429, at once).
            UnavailableError: Kafka is down or did not take the request within ``produce_timeout_s`` (503).
            ReplyTimeoutError: no reply within the timeout (504). DuplicateIdError: the id is in flight (409).
        """
        request_id = request_id or uuid.uuid4().hex
        note_call(service, task, request_id)  # labels the request counted by api.metrics.RequestMetrics
        if tracing.sampled():  # the edge call's span, current while the call runs (its produce is its child)
            with tracing.tracer().start_as_current_span(
                f"edge.call {service}.{task}", attributes=_call_attributes(service, task, request_id)
            ) as span:
                try:
                    reply = await self._call_slot(
                        service, task, payload, cache, request_id, timeout_s, store_result_s, on_produced, admitted
                    )
                except EdgeError as exc:
                    span.set_attributes({"aisemble.status": exc.status, "aisemble.error": str(exc.code)})
                    raise
                span.set_attributes(_reply_attributes(reply))
                return reply
        return await self._call_slot(
            service, task, payload, cache, request_id, timeout_s, store_result_s, on_produced, admitted
        )

    async def _call_slot(
        self,
        service: Service,
        task: str,
        payload: dict[str, object],
        cache: bool | None,
        request_id: str,
        timeout_s: float | None,
        store_result_s: int | None,
        on_produced: Callable[[], None] | None,
        admitted: bool,
    ) -> ReplyEvent:
        """``call`` past its span: take the in-flight slot unless ``admitted``, then serve."""
        if admitted:
            return await self._call(service, task, payload, cache, request_id, timeout_s, store_result_s, on_produced)
        if not self.in_flight.try_acquire():
            raise OverloadedError(
                f"the edge holds {self.in_flight.limit} requests already; retry after {RETRY_AFTER_S} s",
                request_id=request_id,
                service=service,
                task=task,
                retry_after_s=RETRY_AFTER_S,
            )
        try:
            return await self._call(service, task, payload, cache, request_id, timeout_s, store_result_s, on_produced)
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
        store_result_s: int | None = None,
        on_produced: Callable[[], None] | None = None,
    ) -> ReplyEvent:
        started = time.perf_counter()
        hit = await self._cached(service, task, payload, cache, request_id, started)
        if hit is not None:
            return hit
        self._check_broker(service, task, request_id)
        timeout_s = timeout_s or self.settings.request_timeout_s
        try:
            correlation_id, future = self.router.expect(request_id, service, task)
        except DuplicateRequestIdError as exc:
            raise DuplicateIdError(str(exc), request_id=request_id, service=service, task=task) from exc
        record = self._request_event(
            request_id, correlation_id, task, payload, timeout_s, cache=cache, store_result_s=store_result_s
        )
        try:
            await self._produce(service, task, request_id, record, timeout_s)
            if on_produced is not None:
                on_produced()
            remaining = timeout_s - (time.perf_counter() - started)
            try:
                async with asyncio.timeout(max(remaining, 0.001)):  # no Task per wait (as wait_for makes)
                    reply = await future
            except TimeoutError as exc:
                self._cancel_later(request_id, correlation_id, timeout_s)  # nobody waits for this attempt now
                raise ReplyTimeoutError(
                    f"no reply within {timeout_s:.1f}s (request id {request_id})",
                    request_id=request_id,
                    service=service,
                    task=task,
                ) from exc
        finally:
            self.router.forget(correlation_id)
            note_call(service, task, request_id)  # where the call finishes: the trace id, if its span is current
        return _final(reply, started)

    async def _cached(
        self,
        service: Service,
        task: str,
        payload: dict[str, object],
        cache: bool | None,
        request_id: str,
        started: float,
    ) -> ReplyEvent | None:
        """The cached reply for this request under the service's cache policy, or None."""
        key = self.cache_key(service, task, payload, cache)
        if key is None:
            return None
        hit = await self.cache.get(key)
        if self.metrics is not None:
            self.metrics.cache_lookup(service, hit is not None)
        if hit is None:
            return None
        elapsed = (time.perf_counter() - started) * 1000.0
        return hit.model_copy(update={"id": request_id, "cached": True, "timings_ms": {"edge_ms": elapsed}})

    def _request_event(
        self,
        request_id: str,
        correlation_id: str,
        task: str,
        payload: dict[str, object],
        timeout_s: float,
        *,
        cache: bool | None = None,
        stream: bool = False,
        store_result_s: int | None = None,
    ) -> bytes:
        """The event for one call, as the record's value: replies to this edge's topic, deadline ``timeout_s``
        from now less the margin (``agent_deadline_ms``); see ``request_record``."""
        deadline_ms = agent_deadline_ms(time.time(), timeout_s, self.settings.deadline_margin_ms)
        return request_record(
            request_id, correlation_id, task, payload, self.reply_topic, deadline_ms,
            cache=cache, stream=stream, store_result_s=store_result_s,
        )  # fmt: skip

    def _check_broker(self, service: Service, task: str, request_id: str) -> None:
        if self.broker.down:
            raise UnavailableError(
                f"Kafka is unavailable (down for {time.time() - self.broker.since:.1f} s): {self.broker.last_error}",
                request_id=request_id,
                service=service,
                task=task,
            )

    async def _produce(self, service: Service, task: str, request_id: str, record: bytes, timeout_s: float) -> None:
        """Hand the request's ``record`` (key: its id) to Kafka within ``produce_timeout_s``; ``UnavailableError``
        (503) otherwise."""
        topic = service_topics(self.settings.topic_prefix, service).requests
        if tracing.sampled():
            with tracing.tracer().start_as_current_span(
                f"send {topic}", kind=SpanKind.PRODUCER, attributes=_send_attributes(topic, request_id)
            ):
                await self._send(service, task, request_id, topic, record, timeout_s, tracing.inject())
        else:
            await self._send(service, task, request_id, topic, record, timeout_s, None)

    async def _send(
        self,
        service: Service,
        task: str,
        request_id: str,
        topic: str,
        record: bytes,
        timeout_s: float,
        headers: list[tuple[str, bytes]] | None,
    ) -> None:
        try:
            with self.linger.sending():
                async with asyncio.timeout(min(self.settings.produce_timeout_s, timeout_s)):
                    if headers:  # tracing on: the request carries its trace context
                        await self.producer.send_and_wait(topic, record, key=request_id.encode(), headers=headers)
                    else:
                        await self.producer.send_and_wait(topic, record, key=request_id.encode())
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

    async def stream(
        self,
        service: Service,
        task: str,
        payload: dict[str, object],
        *,
        cache: bool | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        admitted: bool = False,
    ) -> EdgeStream:
        """Start one streamed request (see the module docstring); the caller must ``close()`` what it gets.
        ``admitted``: as for ``call`` (the stream then holds no slot of its own).

        Raises (before anything is streamed): the errors of ``call`` but ``ReplyTimeoutError``, which the
        stream's ``next`` raises instead.
        """
        request_id = request_id or uuid.uuid4().hex
        note_call(service, task, request_id)
        if not admitted and not self.in_flight.try_acquire():
            raise OverloadedError(
                f"the edge holds {self.in_flight.limit} requests already; retry after {RETRY_AFTER_S} s",
                request_id=request_id,
                service=service,
                task=task,
                retry_after_s=RETRY_AFTER_S,
            )
        if not tracing.sampled():
            return await self._open_stream(service, task, payload, cache, request_id, timeout_s, admitted, None)
        # The stream's span outlives this call: current while the request is produced, ended by EdgeStream.close.
        span = tracing.tracer().start_span(
            f"edge.stream {service}.{task}", attributes=_call_attributes(service, task, request_id)
        )
        try:
            with trace.use_span(span, end_on_exit=False):
                return await self._open_stream(service, task, payload, cache, request_id, timeout_s, admitted, span)
        except BaseException as exc:
            if isinstance(exc, EdgeError):
                span.set_attributes({"aisemble.status": exc.status, "aisemble.error": str(exc.code)})
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR, repr(exc))
            span.end()
            raise

    async def _open_stream(
        self,
        service: Service,
        task: str,
        payload: dict[str, object],
        cache: bool | None,
        request_id: str,
        timeout_s: float | None,
        admitted: bool,
        span: Span | None,
    ) -> EdgeStream:
        """``stream`` past its admission and span: the cache, then the produce."""
        started = time.perf_counter()
        timeout_s = timeout_s or self.settings.request_timeout_s
        try:
            hit = await self._cached(service, task, payload, cache, request_id, started)
            if hit is not None:
                queue: asyncio.Queue[StreamItem] = asyncio.Queue()
                queue.put_nowait(hit)
                return EdgeStream(self, service, task, request_id, None, queue, started, timeout_s, not admitted, span)
            self._check_broker(service, task, request_id)
            try:
                correlation_id, _, queue = self.router.expect_stream(request_id, service, task)
            except DuplicateRequestIdError as exc:
                raise DuplicateIdError(str(exc), request_id=request_id, service=service, task=task) from exc
            record = self._request_event(request_id, correlation_id, task, payload, timeout_s, cache=cache, stream=True)
            try:
                await self._produce(service, task, request_id, record, timeout_s)
            except BaseException:
                self.router.forget(correlation_id)
                raise
        except BaseException:
            if not admitted:
                self.in_flight.release()
            raise
        return EdgeStream(
            self, service, task, request_id, correlation_id, queue, started, timeout_s, not admitted, span
        )

    def _cancel_later(self, request_id: str, correlation_id: str, ttl_s: float | None = None) -> None:
        """Cancel the attempt ``correlation_id`` of ``request_id`` (its cancel key, TTL ``ttl_s``, default
        ``request_timeout_s``) in a background task; a retry with the same id is not cancelled."""
        task = asyncio.create_task(self._cancel(request_id, correlation_id, ttl_s), name=f"cancel-{request_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel(self, request_id: str, correlation_id: str, ttl_s: float | None = None) -> None:
        key = cancel_key(self.settings.topic_prefix, request_id)
        ttl_ms = max(int((ttl_s or self.settings.request_timeout_s) * 1000), 1)
        value = cancel_value(correlation_id)
        try:
            await guarded(self.redis, lambda: self.redis.set(key, value, px=ttl_ms))
        except (RedisError, OSError) as exc:
            log.warning("could not set the cancel key of %s: %r", request_id, exc)


def _call_attributes(service: Service, task: str, request_id: str) -> dict[str, str]:
    return {"aisemble.service": service, "aisemble.task": task, "aisemble.request_id": request_id}


def _reply_attributes(reply: ReplyEvent) -> dict[str, str | bool | int]:
    """A finished call's span attributes: its status as the route answers it, the cache hit, the error code."""
    attributes: dict[str, str | bool | int] = {"aisemble.cached": reply.cached, "aisemble.ok": reply.ok}
    attributes["aisemble.status"] = 200
    if reply.error is not None:
        attributes["aisemble.error"] = str(reply.error.code)
        attributes["aisemble.status"] = STATUS_BY_CODE.get(reply.error.code, 500)
    if reply.model:
        attributes["aisemble.model"] = reply.model
    return attributes


def _send_attributes(topic: str, request_id: str) -> dict[str, AttributeValue]:
    return tracing.kafka_attributes("send", topic, {"messaging.kafka.message.key": request_id})


def _final(reply: ReplyEvent, started: float) -> ReplyEvent:
    """The reply as the caller gets it: no correlation id, the edge's time added."""
    elapsed = (time.perf_counter() - started) * 1000.0
    return reply.model_copy(
        update={"correlation_id": None, "timings_ms": {**reply.timings_ms, "edge_ms": round(elapsed, 3)}}
    )


class EdgeStream:
    """One streamed request in flight (``Edge.stream``): ``next()`` gives its text (``StreamText``) in order,
    then its final ``ReplyEvent`` (ok or not), after which the stream is ``finished``.

    It holds one in-flight slot until ``close()`` (idempotent, synchronous: safe in any ``finally``, even a
    cancelled one), unless ``holds_slot`` is false (the HTTP exchange holds it: ``api.admission``). Closing an
    unfinished stream forgets its waiter (later partials and the reply are dropped) and sets its cancel key.
    """

    def __init__(
        self,
        edge: Edge,
        service: Service,
        task: str,
        request_id: str,
        correlation_id: str | None,
        queue: asyncio.Queue[StreamItem],
        started: float,
        timeout_s: float,
        holds_slot: bool = True,
        span: Span | None = None,
    ) -> None:
        """``span``: the stream's span when tracing is on (``first_token`` event, ended on ``close``)."""
        self._edge = edge
        self._span = span
        self._holds_slot = holds_slot
        self.service = service
        self.task = task
        self.request_id = request_id
        self._correlation_id = correlation_id  # None: answered from the cache, nothing waits on Kafka
        self._queue = queue
        self._started = started
        self.timeout_s = timeout_s
        self.finished = False
        self.closed = False
        self.final: ReplyEvent | None = None  # the final reply, once ``next`` returned it
        self._first_token = False

    @property
    def cached(self) -> bool:
        return self._correlation_id is None

    async def next(self) -> StreamText | ReplyEvent:
        """The next piece of text, or the final reply.

        Raises:
            ReplyTimeoutError: the stream's deadline passed first (504 ``timeout``).
            EdgeError: the edge is shutting down (503 ``unavailable``); RuntimeError: ``next`` after the end.
        """
        if self.finished or self.closed:
            raise RuntimeError("the stream has ended")
        remaining = self.timeout_s - (time.perf_counter() - self._started)
        try:
            async with asyncio.timeout(max(remaining, 0.001)):
                item = await self._queue.get()
        except TimeoutError as exc:
            if self._span is not None:
                self._span.set_attributes({"aisemble.status": 504, "aisemble.error": str(ErrorCode.TIMEOUT)})
            raise ReplyTimeoutError(
                f"the stream did not end within {self.timeout_s:.1f}s (request id {self.request_id})",
                request_id=self.request_id,
                service=self.service,
                task=self.task,
            ) from exc
        if isinstance(item, BaseException):
            raise UnavailableError(
                f"the stream was cut: {item}", request_id=self.request_id, service=self.service, task=self.task
            ) from item
        if isinstance(item, ReplyEvent):
            self.finished = True
            self.final = _final(item, self._started)
            if self._span is not None:
                self._span.set_attributes(_reply_attributes(item))
            return self.final
        if self._span is not None and not self._first_token:  # time to first token: one event on the span
            self._first_token = True
            ttft_ms = round((time.perf_counter() - self._started) * 1000.0, 3)
            self._span.add_event("first_token", {"aisemble.ttft_ms": ttft_ms})
        return item

    def close(self) -> None:
        """Release the slot; an unfinished stream is forgotten and its cancel key set (see the class)."""
        if self.closed:
            return
        self.closed = True
        if self._span is not None:
            self._span.set_attribute("aisemble.finished", self.finished)
            self._span.end()
        if self._holds_slot:
            self._edge.in_flight.release()
        if self._correlation_id is not None:
            self._edge.router.forget(self._correlation_id)
            if not self.finished:
                self._edge._cancel_later(self.request_id, self._correlation_id)
