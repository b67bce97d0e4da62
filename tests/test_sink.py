"""The agents' Kafka sink (``agents.sink``) against the real broker.

* aiokafka narrows a producer's metadata view to one topic when it sends to a topic missing from a view of
  all topics (``add_topic``), and records already waiting for other topics then sit until their request
  timeout: pinned here with a plain producer, because the sink's ``send`` is built around it;
* ``FaustSink.send`` brings a new topic into the view first, so nothing is stranded (this is what stalled
  the agents under ``test_kafka_fuzz`` for ``delivery_retry_s`` and made them exit 3);
* ``FaustSink.missing_topics`` sees a deleted topic within ``KNOWN_TTL_S`` and never creates one.

The Faust app is replaced by the smallest stand-in (``producer.send`` and ``producer._producer``) around a
real aiokafka producer: the broker, the producer and its metadata are real.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import NotLeaderForPartitionError

from agents.sink import KNOWN_TTL_S, FaustSink
from aisemble.pipeline import throwaway_prefix
from streams.replay import delete_topics
from streams.settings import Settings
from streams.topics import ensure_topics, partitions_of

pytestmark = pytest.mark.integration

LINGER_MS = 1000  # the first record waits in the producer this long: long enough for the view to narrow
REQUEST_TIMEOUT_MS = 4000  # a stranded record fails after this (an agent's is delivery_retry_s)


class _FaustProducer:
    """What ``FaustSink`` uses of Faust's producer: ``send`` (Faust's signature) and ``_producer``."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def send(self, topic: str, key: bytes, value: bytes, **_: object) -> asyncio.Future[object]:
        future: asyncio.Future[object] = await self._producer.send(topic, value, key=key)
        return future


@pytest.fixture
async def producer(infra_settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=infra_settings.kafka_bootstrap, acks="all", enable_idempotence=True,
                         linger_ms=LINGER_MS, request_timeout_ms=REQUEST_TIMEOUT_MS)  # fmt: skip
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def _two_topics(settings: Settings, producer: AIOKafkaProducer) -> tuple[str, str]:
    """``old`` in the producer's view of all topics (as an agent's producer has), ``new`` created after it."""
    prefix = throwaway_prefix()
    old, new = f"{prefix}.data.dlq", f"{prefix}.replies.new"
    await ensure_topics(settings, [(old, 1)])
    await producer.client.force_metadata_update()  # tracks no topic: a view of all topics
    await ensure_topics(settings, [(new, 1)])
    assert producer.client.cluster.partitions_for_topic(new) is None
    return old, new


async def test_a_plain_producer_strands_records_when_a_new_topic_narrows_its_view(
    infra_settings: Settings, producer: AIOKafkaProducer
) -> None:
    old, new = await _two_topics(infra_settings, producer)
    waiting = await producer.send(old, b"dead letter", key=b"k")
    await (await producer.send(new, b"reply", key=b"k"))
    assert old not in producer.client.cluster.topics(), "the view now holds just the new topic"
    with pytest.raises(NotLeaderForPartitionError):
        await asyncio.wait_for(waiting, 30)  # stranded until its request timeout


async def test_the_sink_keeps_the_view_whole_so_no_record_is_stranded(
    infra_settings: Settings, producer: AIOKafkaProducer
) -> None:
    old, new = await _two_topics(infra_settings, producer)
    sink = FaustSink(SimpleNamespace(producer=_FaustProducer(producer)))  # type: ignore[arg-type]
    started = time.monotonic()
    waiting = await sink.send(old, b"k", b"dead letter")
    reply = await sink.send(new, b"k", b"reply")
    await asyncio.wait_for(asyncio.gather(waiting, reply), 30)  # type: ignore[arg-type]
    took = time.monotonic() - started
    assert took < REQUEST_TIMEOUT_MS / 1000, f"acked after the linger ({took:.1f}s), not at the request timeout"
    assert {old, new} <= producer.client.cluster.topics()


async def test_missing_topics_sees_a_deleted_topic_within_seconds_and_creates_none(
    infra_settings: Settings, producer: AIOKafkaProducer
) -> None:
    prefix = throwaway_prefix()
    doomed, never = f"{prefix}.replies.doomed", f"{prefix}.replies.never"
    await ensure_topics(infra_settings, [(doomed, 1)])
    sink = FaustSink(SimpleNamespace(producer=_FaustProducer(producer)))  # type: ignore[arg-type]
    assert await sink.missing_topics({doomed, never}) == {never}
    assert await delete_topics(infra_settings, [doomed])
    deleted = time.monotonic()
    while doomed not in await sink.missing_topics({doomed}) and time.monotonic() - deleted < 30:  # noqa: ASYNC110  (polls the broker)
        await asyncio.sleep(0.2)
    seen_after = time.monotonic() - deleted
    assert seen_after < 3 * KNOWN_TTL_S, f"a deleted topic was reported present for {seen_after:.1f}s"
    assert await partitions_of(infra_settings, never) == [], "asking never creates a topic"
