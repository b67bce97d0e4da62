"""Deadlines and cancels between the edge and the agents, against the real Kafka and Redis.

* the deadline the agent gets leaves a margin before the edge's 504 (``agent_deadline_ms``: pure units);
* an edge ``call`` that nobody answers: the produced event's ``deadline_ms`` is at least the margin before
  the 504, and the 504 sets the request's cancel key in Redis (TTL about the wait);
* a batch item whose cancel key is set is answered ``cancelled`` without running the model, the others run;
  Redis away, nothing is cancelled and everything runs;
* an asynchronous request's event carries the asynchronous deadline (minutes), not the synchronous one.

The edge is built in-process (``api.edge.Edge``) on a real producer and Redis, with no agent, so its calls
time out; the request topic is read back to see the events it produced.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from agents.loop import BatchProcessor
from aisemble.pipeline import free_port, throwaway_prefix
from api.async_requests import submit
from api.edge import Edge, agent_deadline_ms
from api.errors import ReplyTimeoutError
from schemas import ErrorCode, ReplyEvent
from streams.cancel import cancel_key, cancels
from streams.redis import connect
from streams.replies import ReplyListener, ReplyRouter
from streams.settings import Settings
from streams.topics import edge_reply_topic, ensure_service_topics, ensure_topics, wait_for_partitions
from tests.kafka_client import RawClient
from tests.test_agent_loop import EchoRunner, ListSink, record

MARGIN_MS = 150  # under 10% of WAIT_S, so the margin is not capped
WAIT_S = 2.0


@pytest.mark.parametrize(
    ("wait_s", "margin_ms", "expected_ms"),
    [
        (30.0, 500, 30_000 - 500),  # the margin as set
        (2.0, 500, 2_000 - 200),  # capped at 10% of a short wait
        (600.0, 500, 600_000 - 500),
        (30.0, 0, 30_000),  # no margin
    ],
)
def test_the_agent_deadline_is_the_wait_less_the_margin_capped_at_a_tenth(
    wait_s: float, margin_ms: int, expected_ms: int
) -> None:
    assert agent_deadline_ms(1000.0, wait_s, margin_ms) == 1_000_000 + expected_ms


@pytest.mark.parametrize(
    ("value", "correlation_id", "cancelled"),
    [
        (None, "c1", False),  # no key
        (b"c1", "c1", True),  # the given-up attempt
        (b"c1", "c2", False),  # a retry with the same request id
        (b"1", "c2", True),  # every attempt (what older edges wrote)
        ("c1", "c1", True),
        (b"c1", None, False),  # an event without a correlation id is cancelled only for every attempt
        (b"1", None, True),
    ],
)
def test_a_cancel_stops_the_given_up_attempt_never_a_retry(
    value: bytes | str | None, correlation_id: str | None, cancelled: bool
) -> None:
    assert cancels(value, correlation_id) is cancelled


@pytest.fixture
async def edge(infra_settings: Settings) -> AsyncIterator[Edge]:
    prefix = throwaway_prefix()
    settings = infra_settings.model_copy(
        update={
            "topic_prefix": prefix,
            "edge_id": f"{prefix}-edge",
            "request_timeout_s": WAIT_S,
            "deadline_margin_ms": MARGIN_MS,
            "async_deadline_s": 300.0,
        }
    )
    reply_topic = edge_reply_topic(prefix, settings.edge_id)
    await ensure_service_topics(settings, ["data"])
    await ensure_topics(settings, [(reply_topic, 1)])
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    redis = connect(settings)
    router = ReplyRouter()
    listener = ReplyListener(settings.kafka_bootstrap, reply_topic, router)
    edge = Edge(settings, producer, redis, router, listener, reply_topic)
    await producer.start()
    await listener.start(await wait_for_partitions(settings, reply_topic))
    try:
        yield edge
    finally:
        await edge.stop()
        await listener.stop()
        await producer.stop()
        await redis.aclose()


async def _produced(edge: Edge, count: int) -> list[dict[str, object]]:
    async with RawClient(edge.settings) as client:
        return await client.read(f"{edge.settings.topic_prefix}.data.requests", count, timeout_s=30)


async def _cancel_ttl_ms(edge: Edge, rid: str) -> int:
    """The cancel key's TTL once the edge has set it (in a background task), polled for up to 5 s."""
    for _ in range(50):
        ttl = await edge.redis.pttl(cancel_key(edge.settings.topic_prefix, rid))
        if ttl > 0:
            return int(ttl)
        await asyncio.sleep(0.1)
    return -1


@pytest.mark.integration
async def test_the_event_deadline_leaves_the_margin_and_a_504_cancels_the_work(edge: Edge) -> None:
    rid = f"r-{uuid.uuid4().hex[:8]}"
    started_ms = time.time() * 1000
    with pytest.raises(ReplyTimeoutError):
        await edge.call("data", "analyze", {"records": [{"v": 1}]}, request_id=rid)
    answered_504_ms = time.time() * 1000
    (event,) = await _produced(edge, 1)
    deadline_ms = float(event["deadline_ms"])  # type: ignore[arg-type]
    assert event["id"] == rid
    assert deadline_ms <= answered_504_ms - MARGIN_MS + 50, "the agent's deadline ends before the edge's 504"
    assert deadline_ms >= started_ms + WAIT_S * 1000 - MARGIN_MS - 1, "and not earlier than the margin asks"
    ttl_ms = await _cancel_ttl_ms(edge, rid)
    assert 0 < ttl_ms <= WAIT_S * 1000, f"the 504 set the request's cancel key (ttl {ttl_ms} ms)"
    value = await edge.redis.get(cancel_key(edge.settings.topic_prefix, rid))
    assert cancels(value, str(event["correlation_id"])), "it cancels the attempt that was given up"
    assert not cancels(value, "a-retry-with-the-same-id")


@pytest.mark.integration
async def test_an_asynchronous_request_carries_the_asynchronous_deadline(edge: Edge) -> None:
    rid = f"a-{uuid.uuid4().hex[:8]}"
    now_ms = time.time() * 1000
    response = await submit(edge, "data", "analyze", {"records": [{"v": 1}]}, request_id=rid)
    assert response.status_code == 202
    (event,) = await _produced(edge, 1)
    deadline_ms = float(event["deadline_ms"])  # type: ignore[arg-type]
    assert event["id"] == rid
    # async_deadline_s = 300 (request_timeout_s = 2): the deadline is about 5 minutes away, less the margin
    assert now_ms + 299_000 - MARGIN_MS <= deadline_ms <= now_ms + 300_000 + 5_000


@pytest.mark.integration
async def test_a_batch_item_whose_cancel_key_is_set_is_answered_cancelled_without_running(
    infra_settings: Settings,
) -> None:
    prefix = throwaway_prefix()
    redis = connect(infra_settings)
    far = int(time.time() * 1000) + 60_000
    try:
        # What the edge sets on a 504 or a disconnect: the given-up attempt's correlation id.
        await redis.set(cancel_key(prefix, "gone"), "attempt-1", px=10_000)
        await redis.set(cancel_key(prefix, "retried"), "attempt-1", px=10_000)
        runner, sink = EchoRunner(), ListSink()
        proc = _processor(prefix, runner, sink, redis)
        base = {"task": "echo", "reply_to": "me", "deadline_ms": far}
        await proc.process(
            [
                record({"id": "gone", "correlation_id": "attempt-1", "input": {"x": 1}, **base}, 0),
                record({"id": "here", "correlation_id": "attempt-9", "input": {"x": 2}, **base}, 1),
                # The caller retried the 504'd id: the new attempt is not cancelled by the old one's key.
                record({"id": "retried", "correlation_id": "attempt-2", "input": {"x": 3}, **base}, 2),
            ]
        )
        replies = {r["id"]: ReplyEvent.model_validate(r) for r in sink.on("me")}
        assert replies["gone"].error is not None and replies["gone"].error.code == ErrorCode.CANCELLED
        assert replies["here"].ok and replies["here"].output == {"y": 4}
        assert replies["retried"].ok and replies["retried"].output == {"y": 6}
        assert runner.calls == [2], "the cancelled item never reached the model"
        assert proc.stats.cancelled == 1
    finally:
        await redis.aclose()


@pytest.mark.integration
async def test_with_redis_away_nothing_is_cancelled_and_everything_runs(infra_settings: Settings) -> None:
    away = connect(infra_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    try:
        runner, sink = EchoRunner(), ListSink()
        proc = _processor("p", runner, sink, away)
        started = time.monotonic()
        await proc.process([record({"id": f"r{i}", "task": "echo", "input": {"x": i}, "reply_to": "me"}, i)
                            for i in range(3)])  # fmt: skip
        assert time.monotonic() - started < 5
        assert sorted(r["id"] for r in sink.on("me")) == ["r0", "r1", "r2"] and runner.calls == [3]
    finally:
        await away.aclose()


def _processor(prefix: str, runner: EchoRunner, sink: ListSink, redis: Redis) -> BatchProcessor:
    return BatchProcessor("data", runner, sink, topic_prefix=prefix, cache=None, cache_ttl_s=60, redis=redis)  # type: ignore[arg-type]
