"""Traffic tools on Kafka: produce requests at a rate, record a request topic, replay a recording (open loop).

* ``produce``: publishes request events to ``{prefix}.{service}.requests`` on a uniform schedule; with a
  reply topic (``{prefix}.replies.NAME``, created with ``ensure_topics`` and kept, so ``record
  --with-replies`` can find the replies later) it gathers the replies.
* ``record``: reads a bounded window of the request topic (``--last N``, a time window through
  ``offsets_for_times``, or offsets per partition) with a group-less consumer under manual assignment, so no
  consumer group's offsets move; with replies, it reads the results topic and every ``{prefix}.replies.*``
  and ``{prefix}.edge.*.replies`` topic from the window's first timestamp and keeps the first reply whose
  ``id`` (and ``correlation_id``, when the request had one) matches a recorded request.
* ``replay``: re-publishes a recording open loop (sends follow the schedule whatever the replies do) with new
  ids ``r<run>-<n>`` mapped to the originals, ``reply_to`` its own ``{prefix}.replies.replay-<run>``
  (created first, deleted at the end), deadlines shifted to the send time, and ``cache: false`` unless
  told to keep the recorded value (a replay measures the model, not Redis).

Bounds: every read and every run has a deadline (``timeout_s``): what has not arrived by then is reported
(``incomplete`` partitions, ``unanswered`` requests), never waited for. Every client uses
``client_options(settings)``.

What can go wrong: a topic that does not exist (``TrafficError``: the tools create no service topics); a
broker away at start (the client's own error); a record window whose replies are written after ``record``
ran (they are not captured); clocks of other hosts (queue times come from the agents' clocks).
"""

from __future__ import annotations

import asyncio
import fnmatch
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
    RecordedRequest,
    Recording,
    RecordingError,
    last_n_start,
    offsets_for,
    order,
    pacing_schedule,
)
from streams.replay_report import Sample, output_comparison
from streams.settings import Settings
from streams.topics import admin_client, ensure_topics, reply_topic_name, service_topics, wait_for_partitions

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


def _consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="aisemble-traffic",
        **client_options(settings),
    )


async def _require_topic(settings: Settings, topic: str) -> list[int]:
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
    await _require_topic(settings, topic)
    producer, consumer = _producer(settings), None
    await start_client(producer, settings)
    try:
        if reply_topic is not None:
            consumer = _consumer(settings)
            await start_client(consumer, settings)
            tps = [TopicPartition(reply_topic, p) for p in await _require_topic(settings, reply_topic)]
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
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RecordingError(f"line {number}: not JSON: {exc}", line=number) from exc
        if not isinstance(data, dict):
            raise RecordingError(f"line {number}: not a JSON object", line=number)
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
) -> RunResult:
    """Send ``outgoing`` at ``rate`` per second; with ``reply_name``, to ``{prefix}.replies.{reply_name}``
    (created when missing, kept) and gather the replies."""
    topic = service_topics(settings.topic_prefix, service).requests  # type: ignore[arg-type]
    reply_topic = reply_topic_name(settings.topic_prefix, reply_name) if reply_name else None
    if reply_topic is not None:
        await ensure_topics(settings, [(reply_topic, 1)])
        for out in outgoing:
            out.event = {**out.event, "reply_to": reply_topic}
    schedule = [0.0 if rate is None else i / rate for i in range(len(outgoing))]
    samples = await run_open_loop(
        settings, topic, outgoing, schedule, reply_topic=reply_topic, timeout_s=timeout_s, progress=progress
    )
    return RunResult(samples, reply_topic, {"service": service, "prefix": settings.topic_prefix, "rate": rate})


# --- record --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """Which records to capture; at most one of ``last``, the time pair and the offset pair is meant to be set."""

    last: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    from_offsets: dict[int, int] | int | None = None
    to_offsets: dict[int, int] | int | None = None

    def describe(self) -> dict[str, object]:
        return {k: v for k, v in {
            "last": self.last,
            "since_ms": self.since_ms,
            "until_ms": self.until_ms,
            "from_offset": self.from_offsets,
            "to_offset": self.to_offsets,
        }.items() if v is not None}


async def _read_ranges(
    consumer: AIOKafkaConsumer, ranges: dict[TopicPartition, tuple[int, int]], deadline: float
) -> tuple[list[object], list[str]]:
    """Records with ``start <= offset < end`` of each partition; the partitions not finished by ``deadline``."""
    loop = asyncio.get_running_loop()
    todo = {tp: r for tp, r in ranges.items() if r[1] > r[0]}
    out: list[object] = []
    if not todo:
        return out, []
    consumer.assign(list(todo))
    for tp, (start, _) in todo.items():
        consumer.seek(tp, start)
    while todo and loop.time() < deadline:
        batch = await consumer.getmany(*todo, timeout_ms=300)
        for tp, records in batch.items():
            end = ranges[tp][1]
            out.extend(r for r in records if r.offset < end)
        for tp in list(todo):
            if await consumer.position(tp) >= todo[tp][1]:
                del todo[tp]
                consumer.pause(tp)
    return out, [f"{tp.topic}:{tp.partition}" for tp in todo]


async def record(
    settings: Settings, service: str, window: Window, *, with_replies: bool, timeout_s: float
) -> Recording:
    """Capture ``window`` of ``service``'s request topic (and the matching replies) as a recording."""
    topics = service_topics(settings.topic_prefix, service)  # type: ignore[arg-type]
    partitions = await _require_topic(settings, topics.requests)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    consumer = _consumer(settings)
    await start_client(consumer, settings)
    try:
        tps = [TopicPartition(topics.requests, p) for p in partitions]
        begin = {tp.partition: o for tp, o in (await consumer.beginning_offsets(tps)).items()}
        end = {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
        start, stop = dict(begin), dict(end)
        if window.last is not None:
            start = last_n_start(begin, end, window.last)
        if window.since_ms is not None:
            start = await _offsets_at(consumer, tps, window.since_ms, end)
        if window.until_ms is not None:
            stop = await _offsets_at(consumer, tps, window.until_ms, end)
        if window.from_offsets is not None:
            start = {p: max(begin[p], o) for p, o in offsets_for(window.from_offsets, partitions, begin).items()}
        if window.to_offsets is not None:
            stop = {p: min(end[p], o) for p, o in offsets_for(window.to_offsets, partitions, end).items()}
        ranges = {tp: (start[tp.partition], stop[tp.partition]) for tp in tps}
        raw, incomplete = await _read_ranges(consumer, ranges, deadline)
        requests, skipped = _decode_requests(raw)
        if window.last is not None:
            requests = order(requests)[-window.last :] if window.last > 0 else []
        replies_seen = 0
        if with_replies and requests:
            matched, more_incomplete = await _capture_replies(consumer, settings, service, requests, deadline)
            incomplete += more_incomplete
            replies_seen = len(matched)
            requests = [
                RecordedRequest(r.partition, r.offset, r.timestamp_ms, r.key, r.event, matched.get(str(r.event["id"])))
                for r in requests
            ]
    finally:
        await consumer.stop()
    header: dict[str, object] = {
        "recorded_at_ms": int(time.time() * 1000),
        "window": window.describe(),
        "offsets": {str(p): [start[p], stop[p]] for p in partitions},
        "skipped": skipped,
        "incomplete": incomplete,
        "with_replies": with_replies,
        "replies_seen": replies_seen,
    }
    return Recording(service, settings.topic_prefix, topics.requests, order(requests), header)


async def _offsets_at(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], ts_ms: int, end: dict[int, int]
) -> dict[int, int]:
    """Per partition, the first offset whose timestamp is at or after ``ts_ms`` (the end when none is)."""
    found = await consumer.offsets_for_times({tp: ts_ms for tp in tps})
    return {tp.partition: (found[tp].offset if found.get(tp) is not None else end[tp.partition]) for tp in tps}


def _decode_requests(raw: Sequence[object]) -> tuple[list[RecordedRequest], int]:
    out: list[RecordedRequest] = []
    skipped = 0
    for r in raw:
        value = getattr(r, "value", None)
        try:
            event = orjson.loads(value) if value is not None else None
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("id"), str):
            skipped += 1  # not a request event: the agents dead-letter those; nothing to replay
            continue
        key = getattr(r, "key", None)
        out.append(
            RecordedRequest(
                partition=int(getattr(r, "partition", 0)),
                offset=int(getattr(r, "offset", 0)),
                timestamp_ms=int(getattr(r, "timestamp", 0)),
                key=key.decode("utf-8", "replace") if isinstance(key, bytes) else None,
                event=event,
            )
        )
    return out, skipped


async def reply_topics(settings: Settings, service: str) -> list[str]:
    """The topics a reply to ``service`` can be on: its results topic, raw clients' and edges' reply topics."""
    prefix = settings.topic_prefix
    patterns = [f"{prefix}.replies.*", f"{prefix}.edge.*.replies"]
    async with admin_client(settings) as admin:
        names = await admin.list_topics()
    results = service_topics(prefix, service).results  # type: ignore[arg-type]
    return sorted(n for n in names if n == results or any(fnmatch.fnmatchcase(n, p) for p in patterns))


async def _capture_replies(
    consumer: AIOKafkaConsumer, settings: Settings, service: str, requests: list[RecordedRequest], deadline: float
) -> tuple[dict[str, dict[str, object]], list[str]]:
    wanted = {str(r.event["id"]): r.event.get("correlation_id") for r in requests}
    since = min(r.timestamp_ms for r in requests) - 1000
    tps: list[TopicPartition] = []
    for topic in await reply_topics(settings, service):
        tps += [TopicPartition(topic, p) for p in await wait_for_partitions(settings, topic, timeout_s=2.0)]
    if not tps:
        return {}, []
    end = {tp: o for tp, o in (await consumer.end_offsets(tps)).items()}
    found = await consumer.offsets_for_times({tp: since for tp in tps})
    ranges = {tp: (found[tp].offset if found.get(tp) is not None else end[tp], end[tp]) for tp in tps}
    raw, incomplete = await _read_ranges(consumer, ranges, deadline)
    matched: dict[str, dict[str, object]] = {}
    for r in sorted(raw, key=lambda r: getattr(r, "timestamp", 0)):
        try:
            reply = orjson.loads(getattr(r, "value", b"") or b"null")
        except orjson.JSONDecodeError:
            continue
        if not isinstance(reply, dict) or reply.get("service") != service:
            continue
        rid = str(reply.get("id"))
        if rid not in wanted or rid in matched:
            continue
        correlation = wanted[rid]
        if correlation is not None and reply.get("correlation_id") != correlation:
            continue
        matched[rid] = reply
    return matched, incomplete


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
    try:
        async with admin_client(settings) as admin:
            await admin.delete_topics(names)
    except (KafkaError, OSError) as exc:  # policy: best effort, and say what was left behind
        log.warning("could not delete %s: %r", ", ".join(names), exc)
        return False
    return True
