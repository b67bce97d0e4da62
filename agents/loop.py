"""The one agent loop every service shares: a micro-batch of records in, one reply per request out.

For each batch (``BatchProcessor.process``):

1. decode every record; one that is not a request event goes to the dead-letter topic with its reason;
   one whose ``reply_to`` is outside the policy or names a topic that does not exist is dead-lettered
   ``reply_to_refused`` (``reply_undeliverable`` when that topic took replies from this process before:
   it was deleted), without running;
2. a request past its ``deadline_ms`` is answered ``deadline_exceeded`` without running, and one for a
   task the service does not have is answered ``unknown_task``; a request whose cancel key is set
   (``streams.cancel``: the edge answered 504, or a streaming client went away) is answered ``cancelled``
   without running (Redis away = no cancels seen);
3. requests that may use the cache are looked up in Redis; hits are answered at once. Steps 2 and 3 are ONE
   ``MGET`` per batch through the Redis breaker (cancel keys and cache keys together);
4. the rest run through the service's runner in ONE ``run_batch`` call, on a dedicated worker thread
   so the event loop (Kafka heartbeats, other agents) keeps running;
5. every reply is produced to its ``reply_to`` (or the results topic) and the call returns only when
   every reply and dead letter is settled (see below); then successful replies are cached, the replies of
   asynchronous requests (``store_result_s``) are kept in Redis (``streams.results``). What the optional
   ``release`` hook frees (vision deletes its consumed claim checks) is returned by ``deliver`` and
   ``isolate``, not freed there: the agent loop releases it once the batch's offsets are committed
   (``agents.loops.releases``), so a batch delivered again after a crash still finds its claim checks.
   ``process`` (a batch handled standalone, without commits) releases at once.

Delivery policy: an event is acknowledged only once something was written for it (its reply or its dead
letter). The failure classes are in ``streams.failures``:

* a send the broker acknowledged is settled;
* a send that failed **permanently** (too large, unauthorised topic, invalid record, or a topic that a
  fresh check found missing) is dead-lettered with the reason: a reply becomes a ``reply_undeliverable``
  dead letter, so a poison reply never blocks its partition;
* a **dead letter** refused permanently (the dead-letter topic is missing, not writable by this agent, or
  refuses the record) is a deployment fault: ``process`` raises ``DeadLetterRefusedError`` (a
  ``DeliveryError``) at once; nothing of the batch is acknowledged and the agent stops (exit 3);
* a send that failed **retriably** (broker away, leader moving, timeouts) or for an **unknown** reason (a
  cancelled ack future, a closed producer, anything not classified) is sent again with backoff, for at most
  ``retry_s``; meanwhile ``delivery_state`` says ``retrying`` (the heartbeat reports it). Past that,
  ``process`` raises ``DeliveryError``: the batch is not acknowledged and is delivered again. An unknown
  failure is never dead-lettered: nothing says the record is at fault.
* a reply topic deleted while its replies wait: before each send round, and every ``TOPIC_CHECK_S`` while
  acks are outstanding, the topics of the deliveries concerned are checked (``Sink.missing_topics``, at
  most a few seconds stale); a reply to a topic found missing is not (or no longer) waited for and is
  dead-lettered ``reply_undeliverable``. The batch's other replies are enqueued at the same time and never
  wait for it.

The runtime acknowledges the batch's offsets only after ``process`` returns, so a crash anywhere in
between redelivers the batch (at-least-once). ``process_isolating`` adds the last line of defence: an
unexpected exception in the batch path reruns the batch one record at a time, and a record that still
raises is dead-lettered (``internal``), so one bad event cannot stall a partition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka.errors import UnknownTopicOrPartitionError
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanContext, SpanKind, StatusCode
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agents.errors import DeadLetterRefusedError, DeliveryError
from agents.runner import Failure, Item, ModelRunner, Outcome, unknown_task
from schemas import ErrorCode, ErrorInfo, ReplyEvent, RequestEvent, Service
from streams import tracing
from streams.cache import ResultCache, dedup_key, wants_cache
from streams.cancel import cancel_key, cancelled_ids, cancels
from streams.codec import BadEvent, Record, dead_letter, decode_request, encode
from streams.failures import Verdict, classify
from streams.policy import ReplyTopicPolicy
from streams.redis import guarded
from streams.results import store_replies
from streams.topics import service_topics

log = logging.getLogger(__name__)

Prepare = Callable[[Sequence[Item]], Awaitable[list[Item | Failure]]]
Release = Callable[[Sequence[dict[str, object]]], Awaitable[None]]

SEND_ENQUEUE_TIMEOUT_S = 10.0
ENQUEUE_MIN_S = 0.05  # past the retry deadline, what one last enqueue still gets
TOPIC_CHECK_S = 1.0  # while acks are outstanding, how often the topics of the slow ones are checked
REMEMBERED_REPLY_TOPICS = 4096  # reply topics remembered as having taken a reply (deleted vs never existed)


class _TopicGone(UnknownTopicOrPartitionError):
    """A send's topic was checked and does not exist (permanent: ``classify(..., topic_known=False)``)."""


def _gone(topic: str) -> _TopicGone:
    return _TopicGone(f"topic {topic!r} does not exist (deleted?)")


def _ignore_outcome(future: asyncio.Future[object]) -> None:
    """Collect the outcome of an ack no longer waited for, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


class BatchObserver(Protocol):
    """Told what each batch did (``agents.metrics.AgentMetrics`` turns it into Prometheus metrics); every
    method is called on the event loop and must not block."""

    def batch(self, size: int, waits_s: Sequence[float]) -> None:
        """A batch of ``size`` records was picked up; ``waits_s``: each record's time since its timestamp."""

    def inference(self, size: int, seconds: float) -> None:
        """The runner ran ``size`` items in one call, in ``seconds``."""

    def replied(self, ok: bool, code: str | None) -> None:
        """A reply was delivered (``code``: its error code when not ``ok``)."""

    def dead_letter(self, reason: str) -> None:
        """A record was dead-lettered (``reason``: the error code)."""

    def cache_hits(self, count: int) -> None:
        """``count`` requests of a batch were answered from the cache."""

    def retries(self, count: int) -> None:
        """``count`` sends failed retriably and are sent again."""


class _NoObserver:
    def batch(self, size: int, waits_s: Sequence[float]) -> None: ...
    def inference(self, size: int, seconds: float) -> None: ...
    def replied(self, ok: bool, code: str | None) -> None: ...
    def dead_letter(self, reason: str) -> None: ...
    def cache_hits(self, count: int) -> None: ...
    def retries(self, count: int) -> None: ...


class Sink(Protocol):
    """Where replies and dead letters go."""

    async def send(self, topic: str, key: bytes, value: bytes) -> Awaitable[object]:
        """Enqueue one record; returns the future of the broker's acknowledgement. A record with trace headers
        (tracing on) is sent as ``send(topic, key, value, headers=[(name, bytes)])``: a sink that traced requests
        reach must take ``headers`` (``agents.sink.FaustSink`` does)."""

    async def missing_topics(self, topics: set[str]) -> set[str]:
        """Those of ``topics`` known not to exist, from an answer at most a few seconds old (a topic deleted
        meanwhile must show up missing within seconds); a topic whose existence cannot be told now is not
        included."""


@dataclass(slots=True)
class BatchStats:
    """Counters of one agent process, reported in its heartbeat."""

    batches: int = 0
    items: int = 0
    dead_letters: int = 0
    cache_hits: int = 0
    errors: int = 0
    retries: int = 0
    isolated: int = 0
    deduplicated: int = 0
    results_not_kept: int = 0  # replies of asynchronous requests that Redis did not take (streams.results)
    cancelled: int = 0  # requests answered ``cancelled`` without running (their cancel key was set)


@dataclass(slots=True)
class _Delivery:
    """One record to settle. ``reply`` is set for a reply (which may fall back to a dead letter)."""

    topic: str
    key: bytes
    value: bytes
    source: Record
    reply: ReplyEvent | None = None
    ack: Awaitable[object] | None = field(default=None, repr=False)
    keep_s: int | None = None  # the request's store_result_s: keep the reply in Redis this long
    headers: list[tuple[str, bytes]] | None = None  # the reply produce's trace context (tracing on)


@dataclass(frozen=True, slots=True)
class _Pending:
    record: Record
    event: RequestEvent
    cache_key: str | None


@dataclass(slots=True)
class Settlement:
    """One computed batch, not yet delivered: every reply and dead letter to send, and which pending
    requests ran the model (their replies are cached once delivered)."""

    records: Sequence[Record]
    out: list[_Delivery]
    ran: list[tuple[_Pending, _Delivery]]
    batch: SpanContext | None = None  # the batch span (tracing on): each reply produce links to it


@dataclass(frozen=True, slots=True)
class Admission:
    """Records decoded and checked: the answers already known (``out``) and the requests to run."""

    out: list[_Delivery]
    to_run: list[_Pending]
    picked_ms: float


def _now_ms() -> float:
    return time.time() * 1000.0


def ok_reply(
    event: RequestEvent, service: Service, model: str, output: dict[str, object], timings: dict[str, float]
) -> ReplyEvent:
    """The successful reply to ``event``, echoing its ``correlation_id``. Built without a second validation when
    its parts are what validation would give (the event was validated, the output is a plain dict and every
    timing a float): the same model, and the same bytes from ``encode`` (``tests/test_codec_fast.py``)."""
    if type(output) is dict and all(type(v) is float for v in timings.values()):
        return ReplyEvent.model_construct(
            id=event.id, correlation_id=event.correlation_id, service=service, task=event.task, ok=True,
            output=output, error=None, cached=False, model=model, timings_ms=timings,
        )  # fmt: skip
    return ReplyEvent(
        id=event.id,
        correlation_id=event.correlation_id,
        service=service,
        task=event.task,
        ok=True,
        output=output,
        model=model,
        timings_ms=timings,
    )


def _latest_deadline(batch: list[_Pending], group: list[int]) -> float | None:
    """The deadline a shared run may stop at: the latest of its members' (None when any has none)."""
    deadlines = [batch[n].event.deadline_ms for n in group]
    return None if any(d is None for d in deadlines) else max(d for d in deadlines if d is not None)


class BatchProcessor:
    """Turns micro-batches of request records into replies; see the module docstring.

    Build it after ``runner.load()``: the models serving each task are read once, here. ``executor``: the
    one thread the runner's model computes on, the same that ran ``load`` (``agents.worker``): torch and
    llama.cpp run on OpenMP, whose runtime keeps a team of worker threads per calling thread, and a model
    warmed on one thread and called from another ran 1.5-2x slower (13.7 vs 21-23 ms for one MiniLM embed,
    8.4 vs 15-19 ms for a SmolLM2 step at 2 threads). Without one, the processor makes its own.
    """

    def __init__(
        self,
        service: Service,
        runner: ModelRunner,
        sink: Sink,
        *,
        topic_prefix: str,
        cache: ResultCache | None,
        cache_ttl_s: int,
        max_event_bytes: int = 1024 * 1024,
        prepare: Prepare | None = None,
        release: Release | None = None,
        retry_s: float = 60.0,
        reply_policy: ReplyTopicPolicy | None = None,
        observer: BatchObserver | None = None,
        redis: Redis | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.service = service
        self.runner = runner
        self.stats = BatchStats()
        self.delivery_state = "ok"
        self.last_error: str | None = None
        self._sink = sink
        self._cache = cache
        self._cache_ttl_s = cache_ttl_s
        self._prepare = prepare
        self._release = release
        self._retry_s = retry_s
        self._reply_policy = reply_policy
        self._max_event_bytes = max_event_bytes
        self._observer: BatchObserver = observer or _NoObserver()
        self._topics = service_topics(topic_prefix, service)
        self._prefix = topic_prefix
        # Where cancel keys are read: ``redis``, else the result cache's client.
        self._redis = redis if redis is not None else cache.redis if isinstance(cache, ResultCache) else None
        self._cancels_unreadable = False
        self._reply_topics: dict[str, None] = {}  # reply topics that took a reply, oldest first (bounded)
        self.executor: Executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{service}-model")
        # Read once: a model's name cannot change while the process runs (the runner is loaded by now).
        self.models: dict[str, str] = {task: runner.model_for(task) for task in runner.tasks}

    async def process_isolating(self, records: Sequence[Record]) -> None:
        """``process``, and if the batch path raises, one record at a time; a record that still raises
        is dead-lettered (``internal``). Raises only ``DeliveryError``. Releases at once (standalone use)."""
        try:
            await self.process(records)
            return
        except DeliveryError:
            raise
        except Exception:  # policy: isolate the poison record, never stall the partition
            log.exception("%s batch of %d failed; retrying its records one at a time", self.service, len(records))
        await self.release(await self.isolate(records))

    async def isolate(self, records: Sequence[Record]) -> list[dict[str, object]]:
        """Process each record alone; one that raises is dead-lettered (``internal``). Raises only
        ``DeliveryError``.

        Returns:
            The inputs to ``release`` once the records' offsets are committed (see ``deliver``).
        """
        to_release: list[dict[str, object]] = []
        for record in records:
            try:
                to_release += await self.deliver(await self.compute([record]))
            except DeliveryError:
                raise
            except Exception as exc:
                self.stats.isolated += 1
                log.exception("%s record %s[%d]@%d fails alone", self.service, record.topic, record.partition,
                              record.offset)  # fmt: skip
                reason = ErrorInfo(code=ErrorCode.INTERNAL, message=f"processing failed: {type(exc).__name__}: {exc}")
                await self._settle([self._letter(record, reason)])
        return to_release

    async def process(self, records: Sequence[Record]) -> None:
        """Handle one micro-batch standalone; returns once every reply and dead letter is settled, and what
        the batch consumed is released (no commit to wait for: the agent loops use ``compute``/``deliver``)."""
        await self.release(await self.deliver(await self.compute(records)))

    async def compute(self, records: Sequence[Record]) -> Settlement:
        """The first half of ``process``: decode, check, answer from the cache, run the model. Sends nothing,
        so the batch loop can run the model of the next batch while this one's replies are delivered."""
        if tracing.on():
            return await self._compute_traced(records)
        admission = await self.admit(records)
        out, to_run = admission.out, admission.to_run
        ran = await self._run(to_run, admission.picked_ms, out) if to_run else []
        return Settlement(records, out, ran)

    async def _compute_traced(self, records: Sequence[Record]) -> Settlement:
        """``compute`` inside the batch span: one per batch, a root linked to every member's trace context (the
        model call is its child); each member's trace gets its queue wait (``admit``) and its reply produce
        (``deliver``), which links back here."""
        size = sum(len(r.value or b"") for r in records)
        attributes = {
            "aisemble.service": self.service,
            "aisemble.batch.size": len(records),
            "aisemble.batch.bytes": size,
        }
        members = tracing.links(tracing.span_context(r.headers) for r in records)
        with tracing.tracer().start_as_current_span(
            f"batch {self.service}", context=Context(), kind=SpanKind.CONSUMER, links=members, attributes=attributes
        ) as span:
            admission = await self.admit(records)
            out, to_run = admission.out, admission.to_run
            ran = await self._run(to_run, admission.picked_ms, out) if to_run else []
            span.set_attribute("aisemble.batch.ran", len(ran))
            return Settlement(records, out, ran, span.get_span_context())

    async def admit(self, records: Sequence[Record]) -> Admission:
        """Steps 1-3 of ``compute`` (decode, check, answer from the cache); ``to_run`` is what needs the model
        (the continuous LLM loop runs it row by row, then answers each with ``answer``)."""
        picked_ms = _now_ms()
        self._observer.batch(len(records), [(picked_ms - r.timestamp_ms) / 1000.0 for r in records])
        if tracing.on():
            self._queue_waits(records, picked_ms)
        out: list[_Delivery] = []
        pending: list[_Pending] = []

        decoded = [(record, decode_request(record.value)) for record in records]
        refusals = await self._reply_to_refusals([e for _, e in decoded if not isinstance(e, BadEvent)])
        for record, event in decoded:
            if isinstance(event, BadEvent):
                out.append(self._letter(record, event))
                continue
            refusal = refusals.get(event.reply_to) if event.reply_to is not None else None
            if refusal is not None:
                out.append(self._letter(record, refusal))
                continue
            if event.deadline_ms is not None and event.deadline_ms < picked_ms:
                reply = self._error_reply(event, ErrorCode.DEADLINE_EXCEEDED, "deadline passed before the run")
                out.append(self._reply(record, event, reply))
                continue
            if event.task not in self.runner.tasks:
                failure = unknown_task(event.task, self.runner.tasks)
                out.append(self._reply(record, event, self._error_reply(event, failure.code, failure.message)))
                continue
            key = None
            if self._cache is not None and wants_cache(self.service, event.task, event.input, event.cache):
                key = self._cache.key(self.service, event.task, self.models[event.task], event.input)
            pending.append(_Pending(record, event, key))

        to_run = await self._look_up(pending, picked_ms, out)
        self.stats.batches += 1
        self.stats.items += len(records)
        return Admission(out, to_run, picked_ms)

    def _queue_waits(self, records: Sequence[Record], picked_ms: float) -> None:
        """One span per record that carries a trace context, in its trace: from the record's timestamp (when it
        was produced) to when the batch picked it up."""
        picked_ns = int(picked_ms * 1_000_000)
        for record in records:
            context = tracing.extract(record.headers)
            if context is None:
                continue
            start_ns = min(record.timestamp_ms * 1_000_000, picked_ns)
            span = tracing.tracer().start_span(
                f"queue {record.topic}",
                context=context,
                kind=SpanKind.CONSUMER,
                start_time=start_ns,
                attributes=tracing.kafka_attributes(
                    "receive",
                    record.topic,
                    {
                        "messaging.destination.partition.id": str(record.partition),
                        "messaging.kafka.offset": record.offset,
                        "aisemble.queue_ms": round(picked_ms - record.timestamp_ms, 3),
                    },
                ),
            )
            span.end(end_time=picked_ns)

    async def deliver(self, settlement: Settlement) -> list[dict[str, object]]:
        """The second half of ``process``: settle every reply and dead letter (see the module docstring),
        then cache the successful replies and keep the asynchronous ones.

        Returns:
            The inputs the ``release`` hook is to free once the batch's offsets are committed (``[]`` without
            a hook): the loop holds them until then (``agents.loops.releases``) and calls ``release``.

        Raises:
            DeliveryError: retriable or unknown failures lasted longer than ``retry_s``, or a dead letter was
                refused permanently (``DeadLetterRefusedError``).
        """
        ran = settlement.ran
        delivered = await self._settle(settlement.out, settlement.batch)
        if self._cache is not None:
            entries = [
                (p.cache_key, d.reply.model_copy(update={"correlation_id": None}), self._cache_ttl_s)
                for p, d in ran
                if p.cache_key is not None and d.reply is not None and d.reply.ok and id(d) in delivered
            ]
            await self._cache.put_many(entries)
            # Asynchronous requests: keep every settled reply for GET /requests/{id}; never raises (streams.results).
            kept = [(d.reply, d.keep_s) for d in settlement.out if d.reply is not None and d.keep_s is not None]
            if kept:
                self.stats.results_not_kept += await store_replies(self._cache.redis, self._cache.prefix, kept)
        if self._release is not None and ran:
            return [dict(p.event.input) for p, _ in ran]
        return []

    async def release(self, inputs: Sequence[dict[str, object]]) -> None:
        """Run the ``release`` hook on ``inputs`` (from ``deliver``/``isolate``); nothing without a hook."""
        if self._release is not None and inputs:
            await self._release(inputs)

    async def _look_up(self, pending: list[_Pending], picked_ms: float, out: list[_Delivery]) -> list[_Pending]:
        """Steps 2-3 in ONE Redis round trip when the cancel keys and the cache are read through the same client
        (the agent's wiring): a single ``MGET`` of every pending request's cancel key and every cache key, through
        the breaker. Cancelled requests are answered ``cancelled``, then cache hits are answered; returns the rest.
        Redis away: no cancels are seen and every lookup is a miss (as with two reads). Otherwise (no cache, a
        cache of its own, no cancel reads) the two reads are made apart."""
        cache = self._cache
        keyed = [p for p in pending if p.cache_key is not None] if cache is not None else []
        redis = self._redis
        if redis is None or not keyed or not isinstance(cache, ResultCache) or cache.redis is not redis:
            return await self._answer_from_cache(await self._skip_cancelled(pending, out), picked_ms, out)
        keys = [cancel_key(self._prefix, p.event.id) for p in pending] + [p.cache_key for p in keyed if p.cache_key]
        try:
            values = await guarded(redis, lambda: redis.mget(keys))
        except RedisError as exc:
            self._cancels_lost(exc)
            return pending
        self._cancels_unreadable = False
        cancelled = {p.event.id for p, v in zip(pending, values, strict=False) if cancels(v, p.event.correlation_id)}
        running = self._answer_cancelled(pending, cancelled, out)
        hits = dict(zip((id(p) for p in keyed), cache.parse(values[len(pending) :]), strict=True))
        return self._answer_hits(running, [hits.get(id(p)) for p in running], picked_ms, out)

    def _cancels_lost(self, exc: RedisError) -> None:
        if not self._cancels_unreadable:
            log.warning("cancel keys unreadable (%s); cancels are not seen until Redis answers", exc)
            self._cancels_unreadable = True

    async def _skip_cancelled(self, pending: list[_Pending], out: list[_Delivery]) -> list[_Pending]:
        """Requests whose cancel key is set (``streams.cancel``: the edge answered 504, or a streaming client
        went away) are answered ``cancelled`` without running; one ``MGET`` per batch through the Redis
        breaker. Redis away: no cancels are seen (logged once per outage) and everything runs."""
        if self._redis is None or not pending:
            return pending
        try:
            cancelled = await cancelled_ids(self._redis, self._prefix, [p.event for p in pending])
        except RedisError as exc:
            self._cancels_lost(exc)
            return pending
        self._cancels_unreadable = False
        return self._answer_cancelled(pending, cancelled, out)

    def _answer_cancelled(self, pending: list[_Pending], cancelled: set[str], out: list[_Delivery]) -> list[_Pending]:
        """Answer the requests whose ids are in ``cancelled`` (``cancelled``); returns the others."""
        if not cancelled:
            return pending
        self.stats.cancelled += len([p for p in pending if p.event.id in cancelled])
        for p in pending:
            if p.event.id in cancelled:
                message = "the request was cancelled (its caller went away or was answered 504) before it ran"
                out.append(self._reply(p.record, p.event, self._error_reply(p.event, ErrorCode.CANCELLED, message)))
        return [p for p in pending if p.event.id not in cancelled]

    async def _answer_from_cache(
        self, pending: list[_Pending], picked_ms: float, out: list[_Delivery]
    ) -> list[_Pending]:
        keyed = [p for p in pending if p.cache_key is not None]
        if self._cache is None or not keyed:
            return pending
        hits = await self._cache.get_many([p.cache_key for p in keyed if p.cache_key is not None])
        found = dict(zip((id(p) for p in keyed), hits, strict=True))
        return self._answer_hits(pending, [found.get(id(p)) for p in pending], picked_ms, out)

    def _answer_hits(
        self, pending: list[_Pending], hits: list[ReplyEvent | None], picked_ms: float, out: list[_Delivery]
    ) -> list[_Pending]:
        """Answer each request of ``pending`` whose cached reply is in ``hits`` (same order); returns the rest."""
        hit_ids = set()
        for p, hit in zip(pending, hits, strict=True):
            if hit is None:
                continue
            hit_ids.add(id(p))
            reply = hit.model_copy(
                update={
                    "id": p.event.id,
                    "cached": True,
                    "timings_ms": {"queue_ms": picked_ms - p.record.timestamp_ms, "batch_size": len(pending)},
                }
            )
            out.append(self._reply(p.record, p.event, reply))
        self.stats.cache_hits += len(hit_ids)
        if hit_ids:
            self._observer.cache_hits(len(hit_ids))
        return [p for p in pending if id(p) not in hit_ids]

    async def _run(
        self, batch: list[_Pending], picked_ms: float, out: list[_Delivery]
    ) -> list[tuple[_Pending, _Delivery]]:
        unique, source_of = self._deduplicate(batch)
        items: list[Item | Failure] = [
            Item(batch[group[0]].event.task, dict(batch[group[0]].event.input), _latest_deadline(batch, group))
            for group in unique
        ]
        if self._prepare is not None:
            items = await self._prepare([i for i in items if isinstance(i, Item)])
        runnable = [i for i in items if isinstance(i, Item)]
        started = time.perf_counter()
        if runnable and tracing.on():
            models = sorted({self.models.get(i.task, "") for i in runnable})
            with tracing.tracer().start_as_current_span(
                f"model {self.service}",
                attributes={
                    "aisemble.service": self.service,
                    "aisemble.items": len(runnable),
                    "aisemble.model": models,
                },
            ):
                outcomes = await self._run_model(runnable)
        else:
            outcomes = await self._run_model(runnable) if runnable else []
        inference_ms = (time.perf_counter() - started) * 1000.0
        if runnable:
            self._observer.inference(len(runnable), inference_ms / 1000.0)
        results = iter(outcomes)
        merged_unique: list[Outcome] = [next(results) if isinstance(i, Item) else i for i in items]
        merged = [merged_unique[source_of[n]] for n in range(len(batch))]

        ran: list[tuple[_Pending, _Delivery]] = []
        done_ms = _now_ms()
        for p, outcome in zip(batch, merged, strict=True):
            timings = {
                "queue_ms": round(picked_ms - p.record.timestamp_ms, 3),
                "inference_ms": round(inference_ms, 3),
                "batch_size": float(len(runnable)),
                "total_ms": round(done_ms - picked_ms, 3),
            }
            delivery = self.answer(p, outcome, timings)
            out.append(delivery)
            ran.append((p, delivery))
        return ran

    def answer(self, p: _Pending, outcome: Outcome, timings: dict[str, float]) -> _Delivery:
        """The reply to settle for one request's outcome."""
        if isinstance(outcome, Failure):
            self.stats.errors += 1
            reply = self._error_reply(p.event, outcome.code, outcome.message, timings)
        else:
            reply = ok_reply(p.event, self.service, self.models[p.event.task], outcome, timings)
        return self._reply(p.record, p.event, reply)

    def _deduplicate(self, batch: list[_Pending]) -> tuple[list[list[int]], list[int]]:
        """Identical reproducible requests of a batch (same task, model and input: what makes a cache key)
        run once and share the outcome. Returns the groups of batch positions (first member runs) and, per
        position, the index of its group."""
        groups: list[list[int]] = []
        source_of: list[int] = []
        by_key: dict[str | bytes, int] = {}
        for n, p in enumerate(batch):
            key: str | bytes | None = p.cache_key
            if key is None and wants_cache(self.service, p.event.task, p.event.input, None):
                key = dedup_key(p.event.task, p.event.input)
            if key is not None and key in by_key:
                groups[by_key[key]].append(n)
                source_of.append(by_key[key])
                continue
            if key is not None:
                by_key[key] = len(groups)
            source_of.append(len(groups))
            groups.append([n])
        self.stats.deduplicated += len(batch) - len(groups)
        return groups, source_of

    async def _run_model(self, items: list[Item]) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self.executor, self.runner.run_batch, items)
        except Exception as exc:  # policy: a runner crash fails its items, not the agent
            log.exception("%s runner failed on a batch of %d", self.service, len(items))
            return [Failure(ErrorCode.MODEL_ERROR, f"{type(exc).__name__}: {exc}")] * len(items)
        if len(outcomes) != len(items):
            log.error("%s runner returned %d outcomes for %d items", self.service, len(outcomes), len(items))
            return [Failure(ErrorCode.INTERNAL, "runner returned a wrong number of results")] * len(items)
        return outcomes

    def _error_reply(
        self, event: RequestEvent, code: str, message: str, timings: dict[str, float] | None = None
    ) -> ReplyEvent:
        return ReplyEvent(
            id=event.id,
            correlation_id=event.correlation_id,
            service=self.service,
            task=event.task,
            ok=False,
            error=ErrorInfo(code=code, message=message),
            model=self.models.get(event.task),
            timings_ms=timings or {},
        )

    def _reply(self, record: Record, event: RequestEvent, reply: ReplyEvent) -> _Delivery:
        """A reply to settle, echoing the request's ``correlation_id``; one too large to send becomes
        ``payload_too_large`` (and is never cached)."""
        if reply.correlation_id != event.correlation_id:
            reply = reply.model_copy(update={"correlation_id": event.correlation_id})
        value = encode(reply)
        if len(value) > self._max_event_bytes:
            reply = self._error_reply(
                event,
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"reply of {len(value)} bytes exceeds the event limit of {self._max_event_bytes} bytes",
                reply.timings_ms,
            )
            value = encode(reply)
        topic = event.reply_to or self._topics.results
        return _Delivery(topic, event.id.encode(), value, record, reply, keep_s=event.store_result_s)

    def _letter(self, record: Record, reason: BadEvent | ErrorInfo) -> _Delivery:
        """A dead letter to settle; it always fits the event limit (see ``streams.codec.dead_letter``)."""
        self.stats.dead_letters += 1
        self._observer.dead_letter(str(reason.code))
        log.warning("dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        letter = dead_letter(
            self.service,
            reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            max_bytes=self._max_event_bytes,
        )
        return _Delivery(self._topics.dlq, (record.key or b"")[:256], encode(letter), record)

    async def _enqueue(self, delivery: _Delivery, deadline: float) -> None:
        """Hand one record to the producer within ``SEND_ENQUEUE_TIMEOUT_S`` (less near ``deadline``: the retry
        bound holds even when the producer hangs, e.g. closed, waiting on metadata it can no longer fetch); a
        failure to enqueue becomes a failed ack, judged later."""
        timeout_s = max(min(SEND_ENQUEUE_TIMEOUT_S, deadline - time.monotonic()), ENQUEUE_MIN_S)
        try:
            async with asyncio.timeout(timeout_s):  # no Task per send (wait_for's): the batch enqueues in one go
                if delivery.headers:
                    send = self._sink.send(delivery.topic, delivery.key, delivery.value, headers=delivery.headers)  # type: ignore[call-arg]
                    delivery.ack = await send
                else:
                    delivery.ack = await self._sink.send(delivery.topic, delivery.key, delivery.value)
        except Exception as exc:  # noqa: BLE001  (size, metadata timeout, closed producer: classified later)
            failed: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            delivery.ack = failed

    async def _settle(self, deliveries: list[_Delivery], batch: SpanContext | None = None) -> set[int]:
        """Send every delivery until each is acknowledged or permanently handled; see the module docstring.
        Tracing on: each reply to a traced request is sent inside its reply-produce span (``_reply_spans``).

        Returns:
            ``id()`` of the deliveries the broker acknowledged as they were (not replaced by a dead letter).

        Raises:
            DeliveryError: retriable or unknown failures lasted longer than ``retry_s``.
            DeadLetterRefusedError: a dead letter was refused permanently (a deployment fault).
        """
        if not tracing.on():
            return await self._settle_all(deliveries)
        spans = self._reply_spans(deliveries, batch)
        try:
            delivered = await self._settle_all(deliveries)
        except BaseException as exc:
            for span in spans.values():
                span.set_status(StatusCode.ERROR, repr(exc))
                span.end()
            raise
        for key, span in spans.items():
            span.set_attribute("aisemble.delivered", key in delivered)
            span.end()
        return delivered

    def _reply_spans(self, deliveries: list[_Delivery], batch: SpanContext | None) -> dict[int, Span]:
        """A ``send <topic>`` span per reply to a request that carried a trace context, a child of that context
        (linked to the batch span), whose own context the reply's headers carry on to the edge."""
        spans: dict[int, Span] = {}
        links = tracing.links([batch])
        for d in deliveries:
            context = tracing.extract(d.source.headers) if d.reply is not None else None
            if context is None or d.reply is None:
                continue
            span = tracing.tracer().start_span(
                f"send {d.topic}",
                context=context,
                kind=SpanKind.PRODUCER,
                links=links,
                attributes=tracing.kafka_attributes(
                    "send", d.topic, {"aisemble.request_id": d.reply.id, "aisemble.ok": d.reply.ok}
                ),
            )
            d.headers = tracing.inject(trace.set_span_in_context(span, context))
            spans[id(d)] = span
        return spans

    async def _settle_all(self, deliveries: list[_Delivery]) -> set[int]:
        delivered: set[int] = set()
        todo = list(deliveries)
        deadline = time.monotonic() + self._retry_s
        delay = 0.2
        while todo:
            # A topic found missing now (a reply topic deleted since admission) is never sent to: aiokafka would
            # hold such a record, and the batch, for its whole request timeout.
            gone = await self._sink.missing_topics({d.topic for d in todo})
            sending = [d for d in todo if d.topic not in gone]
            for d in sending:
                await self._enqueue(d, deadline)
            outcomes = await self._acks(sending, deadline)
            failed: list[tuple[_Delivery, BaseException]] = [(d, _gone(d.topic)) for d in todo if d.topic in gone]
            for d, outcome in zip(sending, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    failed.append((d, outcome))
                    continue
                delivered.add(id(d))
                if d.reply is not None:
                    self._delivered_to(d.topic)
                    self._observer.replied(d.reply.ok, d.reply.error.code if d.reply.error else None)
            retry: list[_Delivery] = []
            follow_up: list[_Delivery] = []
            for d, exc in failed:
                verdict = classify(exc, topic_known=not isinstance(exc, _TopicGone))
                if verdict is not Verdict.PERMANENT:  # retriable or unknown: never a dead letter
                    if verdict is Verdict.UNKNOWN:
                        log.error("send to %s failed for an unknown reason, handled as retriable: %r", d.topic, exc)
                    retry.append(d)
                    self.last_error = repr(exc)
                elif d.reply is not None:
                    reason = ErrorInfo(
                        code=ErrorCode.REPLY_UNDELIVERABLE, message=f"reply to {d.topic} refused: {exc!r}"
                    )
                    follow_up.append(self._letter(d.source, reason))
                else:
                    self.delivery_state, self.last_error = "failed", repr(exc)
                    raise DeadLetterRefusedError(
                        f"the dead letter of {d.source.topic}[{d.source.partition}]@{d.source.offset} was refused by "
                        f"{d.topic} for good ({exc!r}): the dead-letter topic must exist and be writable by this "
                        "agent; stopping without acknowledging"
                    )
            if retry:
                self.stats.retries += len(retry)
                self._observer.retries(len(retry))
                self.delivery_state = "retrying"
                if time.monotonic() + delay > deadline:
                    raise DeliveryError(
                        f"{len(retry)} sends still failing after {self._retry_s:.0f}s: {self.last_error}"
                    )
                log.warning("%d sends failed retriably (%s); again in %.1fs", len(retry), self.last_error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            todo = retry + follow_up
        self.delivery_state = "ok"
        return delivered

    async def _acks(self, deliveries: list[_Delivery], deadline: float) -> list[object]:
        """Each delivery's ack outcome (a result or the exception), waiting at most until ``deadline``.

        The producer retries a send to an unreachable broker by itself for up to its own request timeout;
        a send still unacknowledged at ``deadline`` counts as a (retriable) timeout, so the bound holds.
        While acks are outstanding, every ``TOPIC_CHECK_S`` the topics of the outstanding ones are checked:
        a send to a topic that no longer exists is given up at once (``_TopicGone``, permanent) instead of
        holding the batch, and its future is left to the producer (it fails or expires there).
        """
        futures = [asyncio.ensure_future(d.ack) for d in deliveries if d.ack is not None]
        out: list[object | None] = [None] * len(futures)
        waiting = dict(enumerate(futures))
        while waiting:
            left = deadline - time.monotonic()
            if left > 0:
                await asyncio.wait(waiting.values(), timeout=min(TOPIC_CHECK_S, left))
            for n in [n for n, f in waiting.items() if f.done()]:
                future = waiting.pop(n)
                out[n] = asyncio.CancelledError() if future.cancelled() else (future.exception() or future.result())
            if not waiting or time.monotonic() >= deadline:
                break
            gone = await self._sink.missing_topics({deliveries[n].topic for n in waiting})
            for n in [n for n in waiting if deliveries[n].topic in gone]:
                waiting.pop(n).add_done_callback(_ignore_outcome)
                out[n] = _gone(deliveries[n].topic)
        for n, future in waiting.items():
            future.add_done_callback(_ignore_outcome)
            out[n] = TimeoutError("no broker acknowledgement before the retry deadline")
        return out

    def _delivered_to(self, topic: str) -> None:
        """Remember a reply topic that took a reply (bounded): if it is missing later, it was deleted."""
        self._reply_topics.pop(topic, None)
        self._reply_topics[topic] = None
        if len(self._reply_topics) > REMEMBERED_REPLY_TOPICS:
            del self._reply_topics[next(iter(self._reply_topics))]

    async def _reply_to_refusals(self, events: list[RequestEvent]) -> dict[str, ErrorInfo]:
        """Why each refused ``reply_to`` of a batch is refused (the policy, then existence): outside the policy
        or never seen is ``reply_to_refused``; a topic that took replies from this process and is missing now
        was deleted, ``reply_undeliverable``. Existence is asked once per batch for all its topics, and never
        by waiting on the producer's metadata for a topic that does not exist (that would hold the batch)."""
        refused: dict[str, ErrorInfo] = {}
        candidates: set[str] = set()
        for topic in {e.reply_to for e in events if e.reply_to is not None}:
            refusal = self._reply_policy.refusal(topic) if self._reply_policy is not None else None
            if refusal is not None:
                refused[topic] = ErrorInfo(code=ErrorCode.REPLY_TO_REFUSED, message=refusal)
            else:
                candidates.add(topic)
        if candidates:
            for topic in await self._sink.missing_topics(candidates):
                if topic in self._reply_topics:  # it took replies before: deleted since
                    refused[topic] = ErrorInfo(
                        code=ErrorCode.REPLY_UNDELIVERABLE, message=f"reply_to topic {topic!r} was deleted"
                    )
                else:
                    message = f"reply_to topic {topic!r} does not exist (aisemble creates no topics on demand)"
                    refused[topic] = ErrorInfo(code=ErrorCode.REPLY_TO_REFUSED, message=message)
        return refused
