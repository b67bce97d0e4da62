"""Reply correlation at the edge: one future per request id, fed by the edge's own reply topic.

``ReplyRouter`` is pure: a dict of futures keyed by request id. ``expect`` registers one before the
request is produced, ``resolve`` completes it when the reply arrives (and pops it), ``forget`` drops it
on timeout. A reply whose id is unknown (late, duplicate after at-least-once redelivery, or another
edge's) is dropped, so each request is answered once.

``ReplyListener`` consumes the reply topic with a plain aiokafka consumer and manual partition
assignment (no consumer group, so no rebalance pauses), positioned at the end *before* the edge serves
its first request: a reply can only come after its request, so nothing is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from schemas import ReplyEvent

log = logging.getLogger(__name__)


class DuplicateRequestIdError(ValueError):
    """A request id is already waiting for its reply."""


class ReplyRouter:
    """Waiting requests by id."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[ReplyEvent]] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(self, request_id: str) -> asyncio.Future[ReplyEvent]:
        """Register a request; its future completes with the reply."""
        if request_id in self._waiting:
            raise DuplicateRequestIdError(f"request id {request_id!r} is already in flight")
        future: asyncio.Future[ReplyEvent] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return future

    def resolve(self, reply: ReplyEvent) -> bool:
        """Hand a reply to its waiting request; False when nobody waits for it (dropped)."""
        future = self._waiting.pop(reply.id, None)
        if future is None or future.done():
            self.dropped += 1
            return False
        future.set_result(reply)
        return True

    def forget(self, request_id: str) -> None:
        """Stop waiting (timeout or cancelled caller); a later reply is dropped."""
        future = self._waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.cancel()

    def fail_all(self, exc: BaseException) -> None:
        """Fail every waiting request (shutdown)."""
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(exc)


class ReplyListener:
    """Reads one reply topic from its end and feeds a ``ReplyRouter``."""

    def __init__(self, bootstrap: str, topic: str, router: ReplyRouter, client_id: str = "aisemble-edge"):
        self._topic = topic
        self._router = router
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=100,
        )
        self._task: asyncio.Task[None] | None = None

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
            except KafkaError as exc:  # the consumer reconnects by itself; keep listening meanwhile
                log.warning("reply listener: %r; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            for records in batches.values():
                for record in records:
                    try:
                        reply = ReplyEvent.model_validate_json(record.value or b"")
                    except ValidationError:
                        log.warning("dropping unreadable reply at %s:%s", record.partition, record.offset)
                        continue
                    self._router.resolve(reply)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()
