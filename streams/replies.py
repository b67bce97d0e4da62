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

``ReplyListener`` consumes the reply topic with a plain aiokafka consumer and manual partition
assignment (no consumer group, so no rebalance pauses), positioned at the end *before* the edge serves
its first request: a reply can only come after its request, so nothing is missed.

Broker outages: the listener never stops. Connection errors are absorbed by the consumer (it reconnects
by itself); anything ``getmany`` raises is logged and retried with a bounded backoff (0.1 s doubling to
``MAX_BACKOFF_S``). The position is never reset behind the edge's back (``auto_offset_reset="none"``):
after an outage the listener continues from the offset it had reached, so replies produced while the
broker recovered still reach their callers. Only a position the broker no longer has (the log was
truncated or deleted) is moved, to the nearest offset that exists, and that is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError
from pydantic import ValidationError

from schemas import ReplyEvent

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 2.0


class DuplicateRequestIdError(ValueError):
    """A request id is already waiting for its reply."""


@dataclass(frozen=True, slots=True)
class _Waiter:
    request_id: str
    service: str
    task: str
    future: asyncio.Future[ReplyEvent]


class ReplyRouter:
    """Waiting requests by correlation id; see the module docstring."""

    def __init__(self) -> None:
        self._waiting: dict[str, _Waiter] = {}
        self._in_flight: dict[str, str] = {}  # request id -> correlation id
        self.dropped = 0  # replies nobody waits for (late, duplicate, another edge's, no correlation id)
        self.foreign = 0  # replies whose correlation id is known but whose id, service or task differ

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
        return True

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
            fetch_max_wait_ms=100,
            **(options or {}),
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
                    try:
                        reply = ReplyEvent.model_validate_json(record.value or b"")
                    except ValidationError:
                        log.warning("dropping unreadable reply at %s:%s", record.partition, record.offset)
                        continue
                    self._router.resolve(reply)

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
