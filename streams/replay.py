"""Traffic on Kafka: produce requests at a rate, and replay a recording, open loop, gathering the replies.

* ``produce``: publishes request events to ``{prefix}.{service}.requests`` (or its bulk lane, ``.bulk``) on a
  uniform schedule; with a reply name, ``reply_to`` is ``{prefix}.replies.NAME`` (created with ``ensure_topics``
  and kept, so ``aisemble record --with-replies`` finds the replies later) and the replies are gathered.
* ``replay``: re-publishes a recording (``streams.recording``; captured by ``streams.recorder``) open loop:
  sends follow the schedule whatever the replies do. New ids ``r<run>-<n>`` map back to the originals;
  ``reply_to`` is its own ``{prefix}.replies.replay-<run>`` (created first, deleted at the end); deadlines
  are shifted to the send time; ``cache: false`` unless told to keep the recorded value (a replay measures
  the model, not Redis).

Bounds: every run has a deadline (``timeout_s``, counted from the first send); what has not been sent or
answered by then is reported (``not_sent``, ``unanswered``), never waited for. The first reply per id
counts (delivery is at-least-once). Every client uses ``client_options(settings)``.

What can go wrong: a topic that does not exist (``TrafficError``: these tools create no service topics); a
broker away at start (the client's own error); a reply topic that cannot be deleted (logged, left behind);
clocks of other hosts (queue times come from the agents' clocks).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streams.kafka_security import client_options, start_client
from streams.recording import (
    Recording,
    RecordingError,
    json_objects,
    pacing_schedule,
)
from streams.replay_report import Sample, output_comparison
from streams.settings import Settings
from streams.topics import (
    drop_topics,
    ensure_topics,
    reply_topic_name,
    service_topics,
    wait_for_partitions,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int, int], None]
"""Called with (sent, answered, total) as a run goes."""


class TrafficError(RuntimeError):
    """A traffic tool cannot run as asked; ``topic`` names the topic concerned, when one is."""

    def __init__(self, message: str, *, topic: str | None = None) -> None:
        super().__init__(message)
        self.topic = topic


@dataclass(slots=True)
class Outgoing:
    """One event to send: its id, the id it stands for, and a deadline budget to re-apply at send time."""

    id: str
    original_id: str
    event: dict[str, object]
    deadline_budget_ms: int | None = None


@dataclass(slots=True)
class RunResult:
    samples: list[Sample]
    reply_topic: str | None
    meta: dict[str, object] = field(default_factory=dict)
    outputs: dict[str, object] | None = None


def _producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        linger_ms=2,
        max_request_size=settings.max_event_bytes,
        client_id="aisemble-traffic",
        **client_options(settings),
    )


def make_consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="aisemble-traffic",
        **client_options(settings),
    )


async def require_topic(settings: Settings, topic: str) -> list[int]:
    partitions = await wait_for_partitions(settings, topic, timeout_s=5.0)
    if not partitions:
        raise TrafficError(
            f"topic {topic} does not exist (start the service, or 'aisemble topics create')", topic=topic
        )
    return partitions


async def run_open_loop(
    settings: Settings,
    topic: str,
    outgoing: Sequence[Outgoing],
    schedule: Sequence[float],
    *,
    reply_topic: str | None,
    timeout_s: float,
    progress: Progress | None = None,
) -> list[Sample]:
    """Send ``outgoing[i]`` at ``schedule[i]`` seconds after the start, whatever the replies do; with
    ``reply_topic`` (which must exist), read replies from it until each sent event has one or ``timeout_s``
    (counted from the start) runs out. The first reply per id counts; replies to other ids are ignored.
    """
    if len(outgoing) != len(schedule):
        raise ValueError("one schedule offset per event")
    await require_topic(settings, topic)
    producer, consumer = _producer(settings), None
    await start_client(producer, settings)
    try:
        if reply_topic is not None:
            consumer = make_consumer(settings)
            await start_client(consumer, settings)
            tps = [TopicPartition(reply_topic, p) for p in await require_topic(settings, reply_topic)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:  # resolve the positions now: a reply is never missed by a late offset reset
                await consumer.position(tp)
        return await _drive(producer, consumer, topic, outgoing, schedule, timeout_s, progress)
    finally:
        if consumer is not None:
            await consumer.stop()
        await producer.stop()


async def _drive(
    producer: AIOKafkaProducer,
    consumer: AIOKafkaConsumer | None,
    topic: str,
    outgoing: Sequence[Outgoing],
    schedule: Sequence[float],
    timeout_s: float,
    progress: Progress | None,
) -> list[Sample]:
    loop = asyncio.get_running_loop()
    n = len(outgoing)
    index = {o.id: i for i, o in enumerate(outgoing)}
    sent_ms: list[float] = [0.0] * n
    send_error: list[str | None] = ["not_sent"] * n
    received_ms: list[float | None] = [None] * n
    replies: list[dict[str, object] | None] = [None] * n
    counts = {"sent": 0, "answered": 0, "send_failed": 0}
    start = loop.time()
    deadline = start + timeout_s
    acks: list[asyncio.Future[object]] = []

    def on_ack(i: int) -> Callable[[asyncio.Future[object]], None]:
        def done(future: asyncio.Future[object]) -> None:
            if future.cancelled() or future.exception() is not None:
                exc = None if future.cancelled() else future.exception()
                send_error[i] = type(exc).__name__ if exc is not None else "cancelled"
                counts["send_failed"] += 1

        return done

    async def sender() -> None:
        for i, out in enumerate(outgoing):
            delay = start + schedule[i] - loop.time()
            if loop.time() + max(delay, 0.0) > deadline:
                return  # the rest stay "not_sent"
            if delay > 0:
                await asyncio.sleep(delay)
            now_ms = time.time() * 1000.0
            event = out.event
            if out.deadline_budget_ms is not None:
                event = {**event, "deadline_ms": int(now_ms) + out.deadline_budget_ms}
            sent_ms[i] = now_ms
            send_error[i] = None
            try:
                future = await producer.send(topic, orjson.dumps(event), key=out.id.encode())
            except (KafkaError, ValueError) as exc:  # policy: a refused event is counted, the run goes on
                send_error[i] = type(exc).__name__
                counts["send_failed"] += 1
                continue
            future.add_done_callback(on_ack(i))
            acks.append(future)
            counts["sent"] += 1
            if progress is not None and i % 50 == 0:
                progress(counts["sent"], counts["answered"], n)
        if acks:
            await asyncio.wait(acks, timeout=max(0.1, deadline - loop.time()))

    async def receiver(send_task: asyncio.Task[None]) -> None:
        assert consumer is not None
        while loop.time() < deadline:
            if send_task.done() and counts["answered"] >= counts["sent"] - counts["send_failed"]:
                return
            batch = await consumer.getmany(timeout_ms=200)
            now_ms = time.time() * 1000.0
            for records in batch.values():
                for record in records:
                    try:
                        reply = orjson.loads(record.value) if record.value is not None else None
                    except orjson.JSONDecodeError:
                        continue
                    i = index.get(str(reply.get("id"))) if isinstance(reply, dict) else None
                    if i is None or replies[i] is not None or not isinstance(reply, dict):
                        continue
                    replies[i], received_ms[i] = reply, now_ms
                    counts["answered"] += 1
            if progress is not None:
                progress(counts["sent"], counts["answered"], n)

    send_task = asyncio.create_task(sender())
    try:
        if consumer is not None:
            await receiver(send_task)
        await asyncio.wait_for(asyncio.shield(send_task), timeout=max(0.1, deadline - loop.time() + 5.0))
    finally:
        if not send_task.done():
            send_task.cancel()
    if progress is not None:
        progress(counts["sent"], counts["answered"], n)
    return [
        Sample(
            index=i,
            id=o.id,
            original_id=o.original_id,
            scheduled_s=schedule[i],
            sent_ms=sent_ms[i],
            send_error=send_error[i],
            received_ms=received_ms[i],
            reply=replies[i],
        )
        for i, o in enumerate(outgoing)
    ]


# --- produce -------------------------------------------------------------------------------------------


def events_from_lines(lines: Sequence[bytes], task: str | None, run: str) -> list[Outgoing]:
    """Request events from JSON lines: with ``task``, each line is that task's input; without, a whole
    request event (an ``id`` is generated when it has none). Blank lines are skipped.

    Raises:
        RecordingError: a line that is not a JSON object (named by number), or an event with no ``task``.
    """
    out: list[Outgoing] = []
    for number, data in json_objects(lines):
        new_id = f"p{run}-{len(out)}"
        if task is not None:
            event: dict[str, object] = {"id": new_id, "task": task, "input": data}
        else:
            if "task" not in data or not isinstance(data.get("input"), dict):
                raise RecordingError(f"line {number}: a request event needs 'task' and an 'input' object", line=number)
            event = {**data, "id": str(data.get("id") or new_id)}
        out.append(Outgoing(id=str(event["id"]), original_id=str(event["id"]), event=event))
    return out


async def produce(
    settings: Settings,
    service: str,
    outgoing: list[Outgoing],
    *,
    rate: float | None,
    reply_name: str | None,
    timeout_s: float,
    progress: Progress | None = None,
    bulk: bool = False,
) -> RunResult:
    """Send ``outgoing`` at ``rate`` per second to the service's request topic (``bulk``: its bulk topic); with
    ``reply_name``, to ``{prefix}.replies.{reply_name}`` (created when missing, kept) and gather the replies."""
    topic = service_topics(settings.topic_prefix, service).lane(bulk)  # type: ignore[arg-type]
    reply_topic = reply_topic_name(settings.topic_prefix, reply_name) if reply_name else None
    if reply_topic is not None:
        await ensure_topics(settings, [(reply_topic, 1)])
        for out in outgoing:
            out.event = {**out.event, "reply_to": reply_topic}
    schedule = [0.0 if rate is None else i / rate for i in range(len(outgoing))]
    samples = await run_open_loop(
        settings, topic, outgoing, schedule, reply_topic=reply_topic, timeout_s=timeout_s, progress=progress
    )
    meta: dict[str, object] = {"service": service, "prefix": settings.topic_prefix, "rate": rate, "topic": topic}
    return RunResult(samples, reply_topic, meta)


# --- replay --------------------------------------------------------------------------------------------


def replay_events(recording: Recording, run: str, reply_topic: str, *, keep_cache: bool) -> list[Outgoing]:
    """The recording's events with new ids ``r<run>-<n>``, ``reply_to`` the replay's topic, deadlines as
    budgets (re-applied at send time) and ``cache: false`` unless ``keep_cache``."""
    out: list[Outgoing] = []
    for n, r in enumerate(recording.requests):
        new_id = f"r{run}-{n}"
        event: dict[str, object] = {**r.event, "id": new_id, "reply_to": reply_topic, "correlation_id": None}
        if not keep_cache:
            event["cache"] = False
        budget = None
        deadline = r.event.get("deadline_ms")
        if isinstance(deadline, int):
            budget = max(0, deadline - r.timestamp_ms)
            event.pop("deadline_ms", None)
        out.append(Outgoing(id=new_id, original_id=str(r.event.get("id")), event=event, deadline_budget_ms=budget))
    return out


async def replay(
    settings: Settings,
    recording: Recording,
    *,
    speed: float | None,
    timeout_s: float | None,
    keep_cache: bool = False,
    cosine_tol: float = 1e-4,
    progress: Progress | None = None,
) -> RunResult:
    """Re-publish ``recording`` into ``settings.topic_prefix``'s service (``speed`` None: as fast as possible).

    The default ``timeout_s`` is the recorded span divided by the speed, plus 60 s.
    """
    if not recording.requests:
        raise TrafficError("the recording holds no requests")
    run = uuid.uuid4().hex[:8]
    topic = service_topics(settings.topic_prefix, recording.service).requests  # type: ignore[arg-type]
    reply_topic = reply_topic_name(settings.topic_prefix, f"replay-{run}")
    outgoing = replay_events(recording, run, reply_topic, keep_cache=keep_cache)
    schedule = pacing_schedule([r.timestamp_ms for r in recording.requests], speed)
    budget = timeout_s if timeout_s is not None else (schedule[-1] if schedule else 0.0) + 60.0
    await ensure_topics(settings, [(reply_topic, 1)])
    try:
        samples = await run_open_loop(
            settings, topic, outgoing, schedule, reply_topic=reply_topic, timeout_s=budget, progress=progress
        )
    finally:
        await delete_topics(settings, [reply_topic])
    recorded = {str(r.event.get("id")): r for r in recording.requests}
    pairs = [
        (recorded[s.original_id].event, recorded[s.original_id].reply or {}, s.reply)
        for s in samples
        if s.reply is not None and recorded.get(s.original_id) is not None and recorded[s.original_id].reply
    ]
    outputs = output_comparison(recording.service, pairs, cosine_tol) if recording.with_replies else None
    meta: dict[str, object] = {
        "mode": "max" if speed is None else f"{speed:g}x",
        "speed": speed,
        "service": recording.service,
        "recorded_prefix": recording.prefix,
        "prefix": settings.topic_prefix,
        "recorded_count": len(recording.requests),
        "recorded_span_s": round(recording.span_s, 3),
        "timeout_s": round(budget, 3),
        "cache": "kept" if keep_cache else "off",
    }
    return RunResult(samples, reply_topic, meta, outputs)


async def delete_topics(settings: Settings, names: list[str]) -> bool:
    """Delete ``names``; False (logged) when the broker refused: cleanup never hides a run's result."""
    return await drop_topics(settings, names) == len(set(names))
