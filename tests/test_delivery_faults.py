"""The delivery failure policy against the real broker: nothing is acknowledged unless its reply or its dead
letter was written.

A ``BatchProcessor`` sends through a real aiokafka producer (``ProducerSink``); ``FaultySink`` wraps it and
injects one fault per topic where the real broker cannot be made to fail that way on demand. For each
fault the test reads the real topics back to see what was written:

* an ack future cancelled (an unknown failure) a few times: the reply is written once it goes through,
  and no dead letter is written (it used to be dead-lettered as "undeliverable");
* an ack future cancelled every time, and a producer really closed: after the bounded retry the processor
  raises ``DeliveryError`` (the agent exits 3, nothing acknowledged) and neither the reply topic nor the
  dead-letter topic got anything (both used to be settled as a "lost letter" and acknowledged);
* a dead letter the broker refuses for good, for real (a dead-letter topic whose ``max.message.bytes`` is
  smaller than the letter) and injected (``TopicAuthorizationFailedError``): the processor raises
  ``DeadLetterRefusedError`` at once, and nothing was written.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import TopicAuthorizationFailedError

from agents.errors import DeadLetterRefusedError, DeliveryError
from agents.loop import BatchProcessor
from agents.sink import existing_topics
from aisemble.pipeline import throwaway_prefix
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.kafka_client import RawClient
from tests.test_agent_loop import EchoRunner, record

pytestmark = pytest.mark.integration

Fault = Callable[[], Awaitable[object]]


class ProducerSink:
    """The ``Sink`` of an agent, on a plain aiokafka producer: ``send`` returns the broker-ack future;
    ``missing_topics`` asks the broker (over a client of its own, so it works with the producer closed)."""

    def __init__(self, producer: AIOKafkaProducer, client: AIOKafkaClient) -> None:
        self.producer = producer
        self.client = client

    async def send(self, topic: str, key: bytes, value: bytes) -> Awaitable[object]:
        return await self.producer.send(topic, value, key=key)

    async def missing_topics(self, topics: set[str]) -> set[str]:
        return topics - await existing_topics(self.client, topics)


class FaultySink:
    """``ProducerSink`` with faults injected per topic: ``faults[topic]`` is consumed one per send (the last one
    repeats); ``None`` sends for real. A fault never reaches the broker."""

    def __init__(self, inner: ProducerSink, faults: dict[str, list[str | None]]) -> None:
        self.inner = inner
        self.faults = faults
        self.attempts: list[str] = []

    async def send(self, topic: str, key: bytes, value: bytes) -> Awaitable[object]:
        self.attempts.append(topic)
        plan = self.faults.get(topic, [None])
        fault = plan.pop(0) if len(plan) > 1 else plan[0]
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if fault is None:
            return await self.inner.send(topic, key, value)
        if fault == "cancelled":
            future.cancel()
        elif fault == "unauthorized":
            future.set_exception(TopicAuthorizationFailedError(topic))
        else:
            raise AssertionError(f"unknown fault {fault}")
        return future

    async def missing_topics(self, topics: set[str]) -> set[str]:
        return await self.inner.missing_topics(topics)


@dataclass
class Broker:
    settings: Settings
    prefix: str
    results: str
    dlq: str
    sink: ProducerSink
    raw: RawClient

    def processor(self, sink: object, retry_s: float) -> BatchProcessor:
        return BatchProcessor("data", EchoRunner(), sink, topic_prefix=self.prefix, cache=None, cache_ttl_s=60,
                              retry_s=retry_s)  # type: ignore[arg-type]  # fmt: skip

    async def written(self, topic: str) -> list[dict[str, object]]:
        """Everything on ``topic`` (read for a second after the end: anything in flight shows up)."""
        return await self.raw.read(topic, 10**6, timeout_s=1.5)


async def _broker(settings: Settings, dlq_max_bytes: int | None = None) -> AsyncIterator[Broker]:
    prefix = throwaway_prefix()
    results, dlq = f"{prefix}.data.results", f"{prefix}.data.dlq"
    if dlq_max_bytes is None:
        await ensure_topics(settings, [(dlq, 1)])
    else:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            config = {"max.message.bytes": str(dlq_max_bytes)}
            await admin.create_topics([NewTopic(dlq, num_partitions=1, replication_factor=1, topic_configs=config)])
        finally:
            await admin.close()
    await ensure_topics(settings, [(results, 1)])
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", request_timeout_ms=10_000)
    client = AIOKafkaClient(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    await client.bootstrap()
    try:
        async with RawClient(settings.model_copy(update={"topic_prefix": prefix})) as raw:
            yield Broker(settings, prefix, results, dlq, ProducerSink(producer, client), raw)
    finally:
        await producer.stop()
        await client.close()


@pytest.fixture
async def broker(infra_settings: Settings) -> AsyncIterator[Broker]:
    async for b in _broker(infra_settings):
        yield b


@pytest.fixture
async def small_dlq_broker(infra_settings: Settings) -> AsyncIterator[Broker]:
    async for b in _broker(infra_settings, dlq_max_bytes=256):  # smaller than any dead letter
        yield b


def _request(rid: str, reply_to: str | None = None) -> dict[str, object]:
    event: dict[str, object] = {"id": rid, "task": "echo", "input": {"x": 1}}
    if reply_to is not None:
        event["reply_to"] = reply_to
    return event


async def test_a_cancelled_ack_is_retried_and_the_reply_written_never_a_dead_letter(broker: Broker) -> None:
    sink = FaultySink(broker.sink, {broker.results: ["cancelled", "cancelled", None]})
    proc = broker.processor(sink, retry_s=30)
    await proc.process_isolating([record(_request("a"))])
    assert sink.attempts == [broker.results] * 3
    assert [r["id"] for r in await broker.written(broker.results)] == ["a"]
    assert await broker.written(broker.dlq) == [], "an unknown failure is never dead-lettered"
    assert proc.stats.retries == 2 and proc.delivery_state == "ok"


async def test_a_cancelled_ack_every_time_stops_after_the_bound_and_writes_nothing(broker: Broker) -> None:
    sink = FaultySink(broker.sink, {broker.results: ["cancelled"], broker.dlq: ["cancelled"]})
    proc = broker.processor(sink, retry_s=1.0)
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="CancelledError"):
        await proc.process_isolating([record(_request("a"))])
    took = time.monotonic() - started
    assert 0.5 <= took < 10, f"bounded by retry_s=1 (took {took:.1f}s)"
    assert broker.dlq not in sink.attempts, "no dead letter was even tried"
    assert await broker.written(broker.results) == [] and await broker.written(broker.dlq) == []


@pytest.mark.parametrize("in_view", [True, False], ids=["topics-in-view", "topics-not-in-view"])
async def test_a_closed_producer_stops_after_the_bound_and_writes_nothing(broker: Broker, in_view: bool) -> None:
    if in_view:  # in the producer's metadata, as the topics an agent writes usually are
        for topic in (broker.results, broker.dlq):
            await broker.sink.producer.partitions_for(topic)
    # Really closed: aiokafka raises ProducerClosed on send for a topic in its view, and for another one waits
    # for metadata it can no longer fetch (up to its request timeout, 10 s here).
    await broker.sink.producer.stop()
    proc = broker.processor(broker.sink, retry_s=1.0)
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="ProducerClosed" if in_view else "TimeoutError") as caught:
        await proc.process_isolating([record(b"\xff not json", 0), record(_request("a"), 1)])
    took = time.monotonic() - started
    assert not isinstance(caught.value, DeadLetterRefusedError), "retried, not taken for a refused dead letter"
    assert proc.stats.retries > 0
    assert took < 5, f"the retry bound (1 s) holds even when every enqueue hangs (took {took:.1f}s)"
    assert proc.stats.isolated == 0, "a closed producer is no poison record"
    assert await broker.written(broker.results) == [] and await broker.written(broker.dlq) == []


async def test_a_dead_letter_the_broker_refuses_for_good_stops_at_once(small_dlq_broker: Broker) -> None:
    b = small_dlq_broker
    proc = b.processor(b.sink, retry_s=30)
    started = time.monotonic()
    with pytest.raises(DeadLetterRefusedError, match="MessageSizeTooLarge") as caught:
        await proc.process_isolating([record(b"\xff not json", 0)])
    assert isinstance(caught.value, DeliveryError)
    assert time.monotonic() - started < 10, "a deployment fault is not retried for retry_s"
    assert await b.written(b.dlq) == []


async def test_a_reply_and_its_dead_letter_both_unauthorized_stop_and_write_nothing(broker: Broker) -> None:
    forbidden = broker.raw.reply_topic  # exists; the agent may not write it (injected), nor the DLQ
    sink = FaultySink(broker.sink, {forbidden: ["unauthorized"], broker.dlq: ["unauthorized"]})
    proc = broker.processor(sink, retry_s=30)
    with pytest.raises(DeadLetterRefusedError, match="TopicAuthorizationFailed"):
        await proc.process_isolating([record(_request("a", reply_to=forbidden))])
    assert sink.attempts == [forbidden, broker.dlq]
    assert await broker.written(forbidden) == [] and await broker.written(broker.dlq) == []
    assert await broker.written(broker.results) == []
