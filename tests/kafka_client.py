"""A plain aiokafka client for tests: what a producer in any language does, without the edge."""

from __future__ import annotations

import asyncio
import uuid

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams.kafka_security import client_options
from streams.settings import Settings
from streams.topics import ensure_topics, reply_topic_name, wait_for_partitions


class RawClient:
    """Produces raw bytes to any topic and reads a topic of its own from the beginning."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, acks="all", **client_options(settings)
        )
        self.reply_topic = reply_topic_name(settings.topic_prefix, f"client-{uuid.uuid4().hex[:8]}")

    async def __aenter__(self) -> RawClient:
        await ensure_topics(self.settings, [(self.reply_topic, 1)])
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        await self.producer.send_and_wait(topic, value, key=key)

    async def send_request(self, service: str, event: dict[str, object]) -> None:
        await self.send(
            f"{self.settings.topic_prefix}.{service}.requests",
            orjson.dumps(event),
            key=str(event["id"]).encode(),
        )

    async def send_many(self, service: str, events: list[dict[str, object]]) -> None:
        """Produce every event without waiting for each ack (they arrive together), then wait for all."""
        topic = f"{self.settings.topic_prefix}.{service}.requests"
        acks = [await self.producer.send(topic, orjson.dumps(e), key=str(e["id"]).encode()) for e in events]
        await asyncio.gather(*acks)

    async def read(
        self, topic: str, count: int, timeout_s: float = 60.0, *, distinct: str | None = None
    ) -> list[dict[str, object]]:
        """JSON records of ``topic`` from the start (all partitions) until ``count`` are read.

        With ``distinct``, reads until ``count`` distinct values of that field are seen (duplicates, as
        at-least-once delivery makes, are returned but not counted).
        """
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            auto_offset_reset="earliest",
            **client_options(self.settings),
        )
        await consumer.start()
        try:
            partitions = await wait_for_partitions(self.settings, topic)
            consumer.assign([TopicPartition(topic, p) for p in partitions])
            out: list[dict[str, object]] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            seen: set[object] = set()

            def enough() -> bool:
                return (len(seen) if distinct else len(out)) >= count

            while not enough() and loop.time() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for r in records:
                        value = orjson.loads(r.value)
                        out.append(value)
                        if distinct:
                            seen.add(value.get(distinct))
            return out
        finally:
            await consumer.stop()


async def committed_and_end(settings: Settings, group: str, topic: str) -> tuple[int, int]:
    """Sum over ``topic``'s partitions of the group's committed offsets and of the end offsets."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **client_options(settings))
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, **client_options(settings))
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        partitions = [TopicPartition(topic, p) for p in await wait_for_partitions(settings, topic)]
        ends = await consumer.end_offsets(partitions)
        done = sum(meta.offset for tp, meta in committed.items() if tp.topic == topic and meta.offset >= 0)
        return done, sum(ends.values())
    finally:
        await consumer.stop()
        await admin.close()
