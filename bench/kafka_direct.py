"""Kafka-direct load and partition fairness: what the agents do without the edge, and how evenly they serve.

``direct(settings, service, items)`` produces every item as a ``RequestEvent`` straight to the service's
request topic at once (no wait per ack; keyed by request id, Kafka's default partitioner), with
``reply_to`` a fresh ``{prefix}.replies.bench-*`` topic and ``cache: false``, and times from the first
send until every id has its reply: items/s at the agent's maximum rate, ``reply_ms`` (each reply's arrival
after the first send: all were sent at once, so its p50 is when half were answered), per-reply ``queue_ms``
and the batch sizes the agent formed. The suite divides that rate by the model's own best-batch rate.

``fairness(url, clients, duration_s, partitions)`` runs ``clients`` closed-loop REST clients on nlp
``embed`` (cache off) with the request id set by the client (``X-Request-ID``), so each request's partition
is known: the edge keys the record by the id and aiokafka's ``DefaultPartitioner`` (murmur2, Kafka's
default) places it. Per partition: p50/p99/max of ``queue_ms`` (produced to picked up by the agent); overall:
the p99/p50 ratio of queue_ms and of the round trip; ``trace``: every answer as (seconds since the start,
partition, queue_ms), in answer order.

What can go wrong: replies still missing ``timeout_s`` after the last send are counted as ``missing``
(nothing waits forever); duplicate replies (at-least-once) are counted, not double-timed. The reply topic
is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from agents.runner import Item
from bench.common import summary_ms
from streams.kafka_security import client_options
from streams.settings import Settings
from streams.topics import ensure_topics, reply_topic_name, wait_for_partitions


async def direct(
    settings: Settings,
    service: str,
    items: list[Item],
    timeout_s: float = 300.0,
    reply_topic: str | None = None,
    bulk: bool = False,
) -> dict[str, object]:
    """All ``items`` produced at once to ``service``'s request topic (``bulk``: its bulk topic); time until every
    reply is back.

    ``reply_topic``: reuse this reply topic (created if missing, kept afterwards; e.g. a warm-up run's, so the
    timed run does not include the agent's first look-up of a new topic); default a fresh one, deleted after.
    """
    own_topic = reply_topic is None
    reply_topic = reply_topic or reply_topic_name(settings.topic_prefix, f"bench-direct-{uuid.uuid4().hex[:8]}")
    await ensure_topics(settings, [(reply_topic, 1)])
    options = client_options(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=settings.max_event_bytes,
        **options,
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100, **options
    )
    topic = f"{settings.topic_prefix}.{service}.{'bulk' if bulk else 'requests'}"
    run = uuid.uuid4().hex[:8]
    ids = [f"{run}-{i}" for i in range(len(items))]
    events = [
        orjson.dumps({"id": rid, "task": item.task, "input": item.input, "reply_to": reply_topic, "cache": False})
        for rid, item in zip(ids, items, strict=True)
    ]
    answered: dict[str, dict[str, Any]] = {}
    reply_ms: list[float] = []  # each first reply's arrival, ms after the first send
    duplicates = 0
    errors: Counter[str] = Counter()
    tokens = 0
    await producer.start()
    await consumer.start()
    try:
        tp = TopicPartition(reply_topic, (await wait_for_partitions(settings, reply_topic))[0])
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)
        start = time.perf_counter()
        acks = [await producer.send(topic, value, key=rid.encode()) for rid, value in zip(ids, events, strict=True)]
        await asyncio.gather(*acks)
        sent_s = time.perf_counter() - start
        deadline = time.perf_counter() + timeout_s
        wanted = set(ids)
        while len(answered) < len(ids) and time.perf_counter() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=500)
            for record in batch.get(tp, []):
                reply = orjson.loads(record.value)
                rid = reply.get("id")
                if rid not in wanted:
                    continue
                if rid in answered:
                    duplicates += 1
                    continue
                answered[rid] = reply.get("timings_ms") or {}
                reply_ms.append((time.perf_counter() - start) * 1000)
                if not reply.get("ok"):
                    errors[(reply.get("error") or {}).get("code", "?")] += 1
                elif service == "llm":
                    tokens += int((reply.get("output") or {}).get("tokens", 0))
        elapsed = time.perf_counter() - start
    finally:
        await consumer.stop()
        await producer.stop()
        if own_topic:
            await _delete_topic(settings, reply_topic)
    batch_sizes = [float(t.get("batch_size", 0)) for t in answered.values()]
    ok = len(answered) - sum(errors.values())
    out: dict[str, object] = {
        "requests": len(items),
        "answered": len(answered),
        "answered_ok": ok,
        "errors": dict(errors),
        "missing": len(ids) - len(answered),
        "duplicates": duplicates,
        "produce_all_s": round(sent_s, 3),
        "seconds": round(elapsed, 3),
        "items_per_s": round(ok / elapsed, 2),
        "reply_ms": summary_ms(reply_ms),
        "queue_ms": summary_ms([float(t.get("queue_ms", 0)) for t in answered.values()]),
        "batch_size_mean": round(sum(batch_sizes) / len(batch_sizes), 2) if batch_sizes else 0.0,
        "batch_size_max": max(batch_sizes, default=0.0),
    }
    if service == "llm":
        out["tokens"] = tokens
        out["tokens_per_s"] = round(tokens / elapsed, 2)
    return out


async def _delete_topic(settings: Settings, topic: str) -> None:
    with contextlib.suppress(Exception):
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **client_options(settings))
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()


def partition_of(request_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2 of the key) gives a record keyed ``request_id``."""
    every = list(range(partitions))
    return int(DefaultPartitioner()(request_id.encode(), every, every))


async def fairness(
    url: str, path: str, body: Callable[[int], dict[str, object]], clients: int, duration_s: float, partitions: int
) -> dict[str, object]:
    """Closed-loop REST load; ``queue_ms`` per partition of the request (from its id) and overall ratios."""
    per: dict[int, list[float]] = defaultdict(list)
    trace: list[tuple[float, int, float]] = []  # (seconds since start at the answer, partition, queue_ms)
    rtt: list[float] = []
    queue_all: list[float] = []
    statuses: Counter[int] = Counter()
    counter = itertools.count()
    run = uuid.uuid4().hex[:8]
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await http.post(path, json=body(0))
        start = time.perf_counter()
        end = start + duration_s

        async def client() -> None:
            while time.perf_counter() < end:
                i = next(counter)
                rid = f"{run}-{i}"
                t0 = time.perf_counter()
                try:
                    response = await http.post(path, json=body(i), headers={"X-Request-ID": rid})
                except httpx.HTTPError:
                    statuses[-1] += 1
                    continue
                statuses[response.status_code] += 1
                if response.status_code != 200:
                    continue
                rtt.append((time.perf_counter() - t0) * 1000)
                reply = response.json()
                queue = float((reply.get("timings_ms") or {}).get("queue_ms", 0))
                partition = partition_of(str(reply.get("id", rid)), partitions)
                per[partition].append(queue)
                queue_all.append(queue)
                trace.append((round(time.perf_counter() - start, 4), partition, round(queue, 3)))

        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    overall = summary_ms(queue_all)
    round_trip = summary_ms(rtt)
    ok = statuses.get(200, 0)
    return {
        "clients": clients,
        "partitions": partitions,
        "seconds": round(elapsed, 3),
        "answered_200": ok,
        "errors": sum(statuses.values()) - ok,
        "items_per_s": round(ok / elapsed, 2),
        "queue_ms_per_partition": {
            str(p): {k: v for k, v in summary_ms(per[p]).items() if k in ("n", "p50", "p99", "max")}
            for p in range(partitions)
        },
        "queue_ms": overall,
        "queue_p99_over_p50": round(overall["p99"] / overall["p50"], 2) if overall["p50"] else None,
        "round_trip_ms": round_trip,
        "round_trip_p99_over_p50": round(round_trip["p99"] / round_trip["p50"], 2) if round_trip["p50"] else None,
        "trace": {"columns": ["t_s", "partition", "queue_ms"], "rows": trace},
    }
