"""Reply correlation at the edge: one future per call, fed by the edge's own reply topic.

``ReplyRouter`` is pure: a dict of futures keyed by a **correlation id** the edge generates per call
(``secrets.token_urlsafe``: unguessable), carried in the request event and echoed by the reply. The
client's own request id is not the key: a client retrying with the same ``X-Request-Id`` after a 504
gets a new correlation id, so the late answer to its earlier call cannot resolve the new one. A reply
must also match the waiting call's request id, service and task, or it is dropped and counted
(``foreign``). ``expect`` registers a call before the request is produced, ``resolve`` completes it when
the reply arrives (and pops it), ``forget`` drops it on timeout. A reply nobody waits for (late,
duplicate after at-least-once redelivery, another edge's, or with no correlation id) is dropped and
counted (``dropped``), so each call is answered once. One request id may wait only once at a time.

Streams (``RequestEvent.stream``): ``expect_stream`` registers a call that also has a queue. The listener
hands each ``PartialDelta`` of a ``PartialBatchEvent`` to ``partial``, which puts on the queue, in order,
only text that continues what was queued before: it locks onto the first ``attempt`` it sees (deltas of
another attempt are dropped), drops a ``seq`` it has seen, holds a delta that arrives ahead of its turn
until the gap fills (at most ``MAX_AHEAD``), and never skips a gap: text after a lost partial is only
relayed through the final reply. The final ``ReplyEvent`` resolves the future and is queued last; partials
after it find no waiter and are dropped. So what was queued is always a prefix of the locked attempt's
text, and the final reply (authoritative, ``schemas.events.PartialBatchEvent``) carries the rest.

``ReplyListener`` consumes the reply topic with a plain aiokafka consumer and manual partition
assignment (no consumer group, so no rebalance pauses), positioned at the end *before* the edge serves
its first request: a reply can only come after its request, so nothing is missed.

Broker outages: the listener never stops. Connection errors are absorbed by the consumer (it reconnects
by itself); anything ``getmany`` raises is logged and retried with a bounded backoff (0.1 s doubling to
``MAX_BACKOFF_S``). The position is never reset behind the edge's back (``auto_offset_reset="none"``):
after an outage the listener continues from the offset it had reached, so replies produced while the
broker recovered still reach their callers.

Tracing (``streams.tracing``, when on): a reply whose record carries a trace context (the agent's reply
produce) is routed inside a ``receive <reply topic>`` span, its child: the edge's correlation, the last span of
the request's trace. Only a position the broker no longer has (the log was
truncated or deleted) is moved, to the nearest offset that exists, and that is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from schemas import ReplyEvent
from schemas.events import PartialBatchEvent, PartialDelta
from streams import tracing

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 2.0
MAX_AHEAD = 4096  # deltas one stream holds while waiting for a gap to fill (more are dropped: the final fills in)


class DuplicateRequestIdError(ValueError):
    """A request id is already waiting for its reply."""


@dataclass(frozen=True, slots=True)
class StreamText:
    """Text of one stream, in order, continuing what was queued before; ``tokens`` generated for it."""

    text: str
    tokens: int


StreamItem = StreamText | ReplyEvent | BaseException  # the final reply (or the failure) comes last


@dataclass(slots=True)
class _StreamState:
    """Where one stream stands: the attempt it follows, the next seq due, deltas that came early."""

    queue: asyncio.Queue[StreamItem]
    attempt: str | None = None
    next_seq: int = 0
    ahead: dict[int, PartialDelta] = field(default_factory=dict)

    def accept(self, delta: PartialDelta) -> list[StreamText] | None:
        """The text ``delta`` releases, in order (maybe none); None when it is dropped (other attempt, seen seq)."""
        if self.attempt is None:
            self.attempt = delta.attempt
        elif delta.attempt != self.attempt:
            return None
        if delta.seq < self.next_seq or delta.seq in self.ahead or len(self.ahead) >= MAX_AHEAD:
            return None
        self.ahead[delta.seq] = delta
        released = []
        while self.next_seq in self.ahead:
            due = self.ahead.pop(self.next_seq)
            self.next_seq += 1
            if due.text:
                released.append(StreamText(due.text, due.tokens))
        return released


@dataclass(frozen=True, slots=True)
class _Waiter:
    request_id: str
    service: str
    task: str
    future: asyncio.Future[ReplyEvent]
    stream: _StreamState | None = None


class ReplyRouter:
    """Waiting requests by correlation id; see the module docstring."""

    def __init__(self) -> None:
        self._waiting: dict[str, _Waiter] = {}
        self._in_flight: dict[str, str] = {}  # request id -> correlation id
        self.dropped = 0  # replies nobody waits for (late, duplicate, another edge's, no correlation id)
        self.foreign = 0  # replies whose correlation id is known but whose id, service or task differ
        self.partials_dropped = 0  # deltas nobody streams, of another attempt, seen before, or foreign

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(self, request_id: str, service: str, task: str) -> tuple[str, asyncio.Future[ReplyEvent]]:
        """Register a request; returns its new, unguessable correlation id and the future of its reply.

        Raises:
            DuplicateRequestIdError: ``request_id`` is already waiting (a client bug or a replay).
        """
        if request_id in self._in_flight:
            raise DuplicateRequestIdError(f"request id {request_id!r} is already in flight")
        correlation_id = secrets.token_urlsafe(18)
        future: asyncio.Future[ReplyEvent] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = _Waiter(request_id, service, task, future)
        self._in_flight[request_id] = correlation_id
        return correlation_id, future

    def expect_stream(
        self, request_id: str, service: str, task: str
    ) -> tuple[str, asyncio.Future[ReplyEvent], asyncio.Queue[StreamItem]]:
        """``expect`` for a streamed request: also a queue of its text (``StreamText``), then its final reply
        (or the exception of ``fail_all``). The queue holds at most the request's generated deltas plus one.

        Raises:
            DuplicateRequestIdError: ``request_id`` is already waiting.
        """
        correlation_id, future = self.expect(request_id, service, task)
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._waiting[correlation_id] = _Waiter(request_id, service, task, future, _StreamState(queue))
        return correlation_id, future, queue

    def partial(self, event: PartialBatchEvent) -> int:
        """Hand each delta of ``event`` to its stream; returns how many were taken (the others are counted)."""
        taken = 0
        for delta in event.deltas:
            waiter = self._waiting.get(delta.correlation_id) if delta.correlation_id else None
            stream = waiter.stream if waiter is not None else None
            if (
                waiter is None
                or stream is None
                or (delta.id, event.service, event.task) != (waiter.request_id, waiter.service, waiter.task)
            ):
                self.partials_dropped += 1
                continue
            released = stream.accept(delta)
            if released is None:
                self.partials_dropped += 1
                continue
            taken += 1
            for text in released:
                stream.queue.put_nowait(text)
        return taken

    def resolve(self, reply: ReplyEvent) -> bool:
        """Hand a reply to the request it answers; False when it is dropped (counted)."""
        waiter = self._waiting.get(reply.correlation_id) if reply.correlation_id else None
        if waiter is None or waiter.future.done():
            self.dropped += 1
            return False
        if (reply.id, reply.service, reply.task) != (waiter.request_id, waiter.service, waiter.task):
            self.foreign += 1  # not this request's answer: keep waiting for the real one
            log.warning("dropping a reply whose correlation id matches but whose id/service/task do not")
            return False
        self._pop(reply.correlation_id or "")
        waiter.future.set_result(reply)
        if waiter.stream is not None:
            waiter.stream.queue.put_nowait(reply)
        return True

    def waits_for(self, correlation_id: object) -> bool:
        """Whether a call waits for the reply with ``correlation_id`` (read from a record before validating it:
        a reply nobody waits for is dropped unvalidated, ``drop``)."""
        return isinstance(correlation_id, str) and correlation_id in self._waiting

    def drop(self) -> None:
        """Count a reply dropped before it was validated (nobody waits for its correlation id)."""
        self.dropped += 1

    def forget(self, correlation_id: str) -> None:
        """Stop waiting (timeout or cancelled caller); a later reply is dropped."""
        waiter = self._pop(correlation_id)
        if waiter is not None and not waiter.future.done():
            waiter.future.cancel()

    def _pop(self, correlation_id: str) -> _Waiter | None:
        waiter = self._waiting.pop(correlation_id, None)
        if waiter is not None and self._in_flight.get(waiter.request_id) == correlation_id:
            del self._in_flight[waiter.request_id]
        return waiter

    def fail_all(self, exc: BaseException) -> None:
        """Fail every waiting request (shutdown)."""
        waiting, self._waiting, self._in_flight = self._waiting, {}, {}
        for waiter in waiting.values():
            if not waiter.future.done():
                waiter.future.set_exception(exc)
                if waiter.stream is not None:
                    waiter.future.exception()  # retrieved: a stream's caller reads the failure from its queue
            if waiter.stream is not None:
                waiter.stream.queue.put_nowait(exc)


def route_reply_record(value: bytes, router: ReplyRouter) -> bool:
    """Hand one record of a reply topic to ``router``, validating only what someone waits for: the record is
    parsed once (orjson), its correlation id (or, for a ``PartialBatchEvent``, its deltas') is read from the
    parsed JSON, and only a record a call waits for is validated (``ReplyEvent`` / ``PartialBatchEvent``) and
    routed. Replies nobody waits for (late, duplicates, another edge's) are counted as dropped, unvalidated;
    partials nobody streams are dropped likewise. Returns False for an unreadable record (not JSON, or a
    record someone waits for that is not a valid event: the call keeps waiting, as for a foreign reply)."""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(data, dict):
        return False
    try:
        if data.get("partial") is True:
            deltas = data.get("deltas")
            if isinstance(deltas, list) and not any(
                isinstance(d, dict) and router.waits_for(d.get("correlation_id")) for d in deltas
            ):
                router.partials_dropped += len(deltas)
                return True
            router.partial(PartialBatchEvent.model_validate(data))
            return True
        if not router.waits_for(data.get("correlation_id")):
            router.drop()
            return True
        router.resolve(ReplyEvent.model_validate(data))
    except ValidationError:
        return False
    return True


def parse_reply_record(value: bytes) -> ReplyEvent | PartialBatchEvent:
    """A record of a reply topic: a ``PartialBatchEvent`` (``"partial": true``) or a ``ReplyEvent``.

    Raises:
        orjson.JSONDecodeError: not JSON. ValidationError: neither event.
    """
    data = orjson.loads(value)
    if isinstance(data, dict) and data.get("partial") is True:
        return PartialBatchEvent.model_validate(data)
    return ReplyEvent.model_validate(data)


class ReplyListener:
    """Reads one reply topic from its end and feeds a ``ReplyRouter``."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        router: ReplyRouter,
        client_id: str = "aisemble-edge",
        options: Mapping[str, Any] | None = None,
    ):
        """``options``: extra aiokafka consumer arguments (security: ``streams.kafka_security.client_options``)."""
        self._topic = topic
        self._router = router
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="none",  # never skip replies silently; see _recover_position
            **{"fetch_max_wait_ms": 100, "fetch_min_bytes": 1, **(options or {})},
        )
        self._task: asyncio.Task[None] | None = None
        self.positions: dict[int, int] = {}  # partition -> next offset to read (after the last reply read)
        self.received = 0
        self.errors = 0  # failed polls since start
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # epoch s

    async def start(self, partitions: list[int]) -> None:
        """Assign ``partitions`` of the topic and seek to their end; returns once positioned."""
        if not partitions:
            raise ValueError(f"reply topic {self._topic} has no partitions")
        await self._consumer.start()
        assignment = [TopicPartition(self._topic, p) for p in partitions]
        self._consumer.assign(assignment)
        await self._consumer.seek_to_end(*assignment)
        for tp in assignment:  # resolve the end offsets now, not lazily on the first fetch
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run(), name="reply-listener")

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500, max_records=1000)
            except OffsetOutOfRangeError as exc:
                self._failed(exc)
                await self._recover_position(exc)
                continue
            except Exception as exc:  # noqa: BLE001  (the listener must outlive any outage; retried, bounded)
                self._failed(exc)
                log.warning("reply listener: %r; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
                continue
            delay = 0.1
            for tp, records in batches.items():
                for record in records:
                    self.positions[tp.partition] = record.offset + 1
                    self.received += 1
                    if tracing.on() and record.headers:
                        readable = self._route_traced(record.value or b"", record.headers, record.key)
                    else:
                        readable = route_reply_record(record.value or b"", self._router)
                    if not readable:
                        log.warning("dropping unreadable reply at %s:%s", record.partition, record.offset)

    def _route_traced(self, value: bytes, headers: tracing.HeadersIn, key: bytes | None) -> bool:
        """``route_reply_record`` inside the correlation span, a child of the context the reply carries (the
        agent's reply produce): the span that closes the request's trace. ``aisemble.correlated``: whether a
        call waited for it (false: late, duplicate, another edge's)."""
        context = tracing.extract(headers)
        if context is None:
            return route_reply_record(value, self._router)
        attributes = tracing.kafka_attributes(
            "receive", self._topic, {"aisemble.request_id": (key or b"").decode("utf-8", "replace")}
        )
        with tracing.tracer().start_as_current_span(
            f"receive {self._topic}", context=context, kind=SpanKind.CONSUMER, attributes=attributes
        ) as span:
            dropped = self._router.dropped + self._router.foreign
            readable = route_reply_record(value, self._router)
            span.set_attribute(
                "aisemble.correlated", readable and self._router.dropped + self._router.foreign == dropped
            )
            return readable

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = repr(exc)
        self.last_error_at = time.time()

    async def _recover_position(self, exc: OffsetOutOfRangeError) -> None:
        """Move a partition whose offset the broker no longer has to the nearest offset that exists."""
        wanted: dict[TopicPartition, int] = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        try:
            starts = await self._consumer.beginning_offsets(list(wanted))
            ends = await self._consumer.end_offsets(list(wanted))
        except Exception as err:  # noqa: BLE001  (the next poll raises again and we come back here)
            log.warning("reply listener: cannot read the log bounds (%r); retrying", err)
            await asyncio.sleep(MAX_BACKOFF_S)
            return
        for tp, offset in wanted.items():
            target = ends[tp] if offset > ends[tp] else starts[tp]
            log.error("reply listener: offset %d of %s is gone; continuing at %d", offset, tp, target)
            self._consumer.seek(tp, target)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()
