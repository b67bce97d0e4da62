"""Recording a request topic from Kafka (``aisemble record``): a bounded window, optionally with replies.

The window is ``--last N`` (the N latest requests by timestamp: at most N per partition are read, then
merged), a time window (``offsets_for_times`` per partition; ``until`` excluded) or offsets per partition
(``to`` excluded). Reads use a group-less consumer under manual assignment, so no consumer group's offsets
move, and stop at the end offsets taken when the command starts (later records are not captured).

With replies, the results topic and every ``{prefix}.replies.*`` and ``{prefix}.edge.*.replies`` topic are
read from the window's first timestamp (less 1 s) to their current end; the first reply whose ``service`` and
``id`` (and ``correlation_id``, when the request had one) match a recorded request is kept.

Bounds and failures: every read has a deadline; partitions unfinished by then are named in the header's
``incomplete``. Records that are not request events (no JSON object with a string ``id``) are counted as
``skipped``. A request topic that does not exist raises ``TrafficError``. Replies written after the command
ran are not captured.
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.kafka_security import start_client
from streams.recording import RecordedRequest, Recording, last_n_start, offsets_for, order
from streams.replay import TrafficError, make_consumer, require_topic
from streams.settings import Settings
from streams.topics import admin_client, service_topics, wait_for_partitions

__all__ = ["TrafficError", "Window", "record", "reply_topics"]


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
        """The window as JSON (partition numbers as strings), for the recording's header."""

        def offsets(spec: dict[int, int] | int | None) -> object:
            return {str(p): o for p, o in spec.items()} if isinstance(spec, dict) else spec

        fields: dict[str, object] = {
            "last": self.last,
            "since_ms": self.since_ms,
            "until_ms": self.until_ms,
            "from_offset": offsets(self.from_offsets),
            "to_offset": offsets(self.to_offsets),
        }
        return {k: v for k, v in fields.items() if v is not None}


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
    partitions = await require_topic(settings, topics.requests)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    consumer = make_consumer(settings)
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
