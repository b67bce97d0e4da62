"""The one agent loop every service shares: a micro-batch of records in, one reply per request out.

For each batch (``BatchProcessor.process``):

1. decode every record; one that is not a request event goes to the dead-letter topic with its reason;
2. a request past its ``deadline_ms`` is answered ``deadline_exceeded`` without running, and one for a
   task the service does not have is answered ``unknown_task``;
3. requests that may use the cache are looked up in Redis in one round trip; hits are answered at once;
4. the rest run through the service's runner in ONE ``run_batch`` call, on a dedicated worker thread
   so the event loop (Kafka heartbeats, other agents) keeps running;
5. every reply is produced to its ``reply_to`` (or the results topic), the cache is written, and the
   call returns only when the broker has acknowledged every reply and dead letter.

The runtime acknowledges the batch's offsets only after ``process`` returns, so a crash anywhere in
between redelivers the batch (at-least-once). ``process`` raises ``DeliveryError`` when it could not
deliver; it never raises for a bad event or a failing model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from agents.errors import DeliveryError
from agents.runner import Failure, Item, ModelRunner, Outcome, unknown_task
from schemas import ErrorCode, ErrorInfo, ReplyEvent, RequestEvent, Service
from streams.cache import ResultCache, wants_cache
from streams.codec import BadEvent, Record, dead_letter, decode_request, encode
from streams.topics import service_topics

log = logging.getLogger(__name__)

Prepare = Callable[[Sequence[Item]], Awaitable[list[Item | Failure]]]


class Sink(Protocol):
    """Where replies and dead letters go: ``send`` enqueues and returns the broker-ack future."""

    async def send(self, topic: str, key: bytes, value: bytes) -> Awaitable[object]: ...


@dataclass(slots=True)
class BatchStats:
    """Counters of one agent process, reported in its heartbeat."""

    batches: int = 0
    items: int = 0
    dead_letters: int = 0
    cache_hits: int = 0
    errors: int = 0


@dataclass(frozen=True, slots=True)
class _Delivery:
    """A send in flight; ``record`` is set for a reply to a caller's own ``reply_to`` topic."""

    ack: Awaitable[object]
    record: Record | None = None


@dataclass(frozen=True, slots=True)
class _Pending:
    record: Record
    event: RequestEvent
    cache_key: str | None


def _now_ms() -> float:
    return time.time() * 1000.0


class BatchProcessor:
    """Turns micro-batches of request records into replies; see the module docstring.

    Build it after ``runner.load()``: the models serving each task are read once, here.
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
    ) -> None:
        self.service = service
        self.runner = runner
        self.stats = BatchStats()
        self._sink = sink
        self._cache = cache
        self._cache_ttl_s = cache_ttl_s
        self._prepare = prepare
        self._max_event_bytes = max_event_bytes
        self._topics = service_topics(topic_prefix, service)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{service}-model")
        # Read once: a model's name cannot change while the process runs (the runner is loaded by now).
        self.models: dict[str, str] = {task: runner.model_for(task) for task in runner.tasks}

    async def process(self, records: Sequence[Record]) -> None:
        """Handle one micro-batch; returns once every reply is acknowledged by the broker."""
        picked_ms = _now_ms()
        acks: list[_Delivery] = []
        pending: list[_Pending] = []

        for record in records:
            event = decode_request(record.value)
            if isinstance(event, BadEvent):
                acks.append(await self._dead_letter(record, event))
                continue
            if event.deadline_ms is not None and event.deadline_ms < picked_ms:
                reply = self._error_reply(event, ErrorCode.DEADLINE_EXCEEDED, "deadline passed before the run")
                acks.append(await self._send_reply(record, event, reply))
                continue
            if event.task not in self.runner.tasks:
                failure = unknown_task(event.task, self.runner.tasks)
                acks.append(
                    await self._send_reply(record, event, self._error_reply(event, failure.code, failure.message))
                )
                continue
            key = None
            if self._cache is not None and wants_cache(self.service, event.task, event.input, event.cache):
                key = self._cache.key(self.service, event.task, self.models[event.task], event.input)
            pending.append(_Pending(record, event, key))

        to_run = await self._answer_from_cache(pending, picked_ms, acks)
        cache_entries = await self._run(to_run, picked_ms, acks) if to_run else []

        self.stats.batches += 1
        self.stats.items += len(records)
        await self._await_acks(acks)
        if self._cache is not None:
            await self._cache.put_many(cache_entries)

    async def _answer_from_cache(
        self, pending: list[_Pending], picked_ms: float, acks: list[_Delivery]
    ) -> list[_Pending]:
        keyed = [p for p in pending if p.cache_key is not None]
        if self._cache is None or not keyed:
            return pending
        hits = await self._cache.get_many([p.cache_key for p in keyed if p.cache_key is not None])
        hit_ids = set()
        for p, hit in zip(keyed, hits, strict=True):
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
            acks.append(await self._send_reply(p.record, p.event, reply))
        self.stats.cache_hits += len(hit_ids)
        return [p for p in pending if id(p) not in hit_ids]

    async def _run(
        self, batch: list[_Pending], picked_ms: float, acks: list[_Delivery]
    ) -> list[tuple[str, ReplyEvent, int]]:
        items: list[Item | Failure] = [Item(p.event.task, dict(p.event.input)) for p in batch]
        if self._prepare is not None:
            items = await self._prepare([i for i in items if isinstance(i, Item)])
        runnable = [i for i in items if isinstance(i, Item)]
        started = time.perf_counter()
        outcomes = await self._run_model(runnable) if runnable else []
        inference_ms = (time.perf_counter() - started) * 1000.0
        results = iter(outcomes)
        merged: list[Outcome] = [next(results) if isinstance(i, Item) else i for i in items]

        entries: list[tuple[str, ReplyEvent, int]] = []
        done_ms = _now_ms()
        for p, outcome in zip(batch, merged, strict=True):
            timings = {
                "queue_ms": round(picked_ms - p.record.timestamp_ms, 3),
                "inference_ms": round(inference_ms, 3),
                "batch_size": len(runnable),
                "total_ms": round(done_ms - picked_ms, 3),
            }
            if isinstance(outcome, Failure):
                self.stats.errors += 1
                reply = self._error_reply(p.event, outcome.code, outcome.message, timings)
            else:
                reply = ReplyEvent(
                    id=p.event.id,
                    service=self.service,
                    task=p.event.task,
                    ok=True,
                    output=outcome,
                    model=self.models[p.event.task],
                    timings_ms=timings,
                )
                if p.cache_key is not None:
                    entries.append((p.cache_key, reply, self._cache_ttl_s))
            acks.append(await self._send_reply(p.record, p.event, reply))
        return entries

    async def _run_model(self, items: list[Item]) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._executor, self.runner.run_batch, items)
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
            service=self.service,
            task=event.task,
            ok=False,
            error=ErrorInfo(code=code, message=message),
            model=self.models.get(event.task),
            timings_ms=timings or {},
        )

    async def _send_reply(self, record: Record, event: RequestEvent, reply: ReplyEvent) -> _Delivery:
        value = encode(reply)
        if len(value) > self._max_event_bytes:
            reply = self._error_reply(
                event,
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"reply of {len(value)} bytes exceeds the event limit of {self._max_event_bytes} bytes",
                reply.timings_ms,
            )
            value = encode(reply)
        if event.reply_to is None:
            return _Delivery(await self._send(self._topics.results, event.id.encode(), value))
        return _Delivery(await self._send(event.reply_to, event.id.encode(), value), record)

    async def _send(self, topic: str, key: bytes, value: bytes) -> Awaitable[object]:
        """Enqueue one record; a failure to enqueue becomes a failed ack, handled with the others."""
        try:
            return await self._sink.send(topic, key, value)
        except Exception as exc:  # noqa: BLE001  (enqueue failed: metadata timeout, size; judged later)
            failed: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    async def _dead_letter(self, record: Record, reason: BadEvent | ErrorInfo) -> _Delivery:
        self.stats.dead_letters += 1
        log.warning("dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        letter = dead_letter(
            self.service,
            reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
        )
        return _Delivery(await self._send(self._topics.dlq, record.key or b"", encode(letter)))

    async def _await_acks(self, deliveries: list[_Delivery]) -> None:
        """Wait for the broker; a reply its ``reply_to`` topic refused is dead-lettered instead.

        Raises:
            DeliveryError: a send to our own topics (results, dead letters) failed.
        """
        results = await asyncio.gather(*(d.ack for d in deliveries), return_exceptions=True)
        retry: list[_Delivery] = []
        for delivery, result in zip(deliveries, results, strict=True):
            if not isinstance(result, BaseException):
                continue
            if delivery.record is None:
                raise DeliveryError(f"send failed: {result!r}") from result
            reason = ErrorInfo(code=ErrorCode.REPLY_UNDELIVERABLE, message=f"reply_to refused the reply: {result!r}")
            retry.append(await self._dead_letter(delivery.record, reason))
        if retry:
            await self._await_acks(retry)
