"""What the Kafka client does in the cases our failure policy (``streams.failures``) relies on.

Checked against the real broker, not assumed: an oversized record is refused by the producer before it
is sent, a record the broker refuses for its topic's size limit fails its ack future, and both are
classified permanent (dead-lettered, never retried). Faust's side (a ``noack`` stream acks nothing by
itself, not even on close) is held by ``test_shutdown.py``: past the grace period 0 offsets are committed.
"""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, MessageSizeTooLargeError

from aisemble.pipeline import throwaway_prefix
from streams.failures import Verdict, classify
from streams.settings import Settings
from streams.topics import ensure_topics

pytestmark = pytest.mark.integration


async def test_a_record_over_the_producer_limit_is_refused_at_send_and_is_permanent(infra_settings: Settings) -> None:
    topic = f"{throwaway_prefix(8)}.size"
    await ensure_topics(infra_settings, [(topic, 1)])  # the broker creates no topic on demand
    producer = AIOKafkaProducer(bootstrap_servers=infra_settings.kafka_bootstrap, max_request_size=64 * 1024)
    await producer.start()
    try:
        with pytest.raises(MessageSizeTooLargeError) as caught:
            await producer.send(topic, b"x" * 100_000)
    finally:
        await producer.stop()
    assert classify(caught.value) is Verdict.PERMANENT


async def test_a_record_over_the_topic_limit_fails_its_ack_and_is_permanent(infra_settings: Settings) -> None:
    topic = f"{throwaway_prefix(8)}.small"
    admin = AIOKafkaAdminClient(bootstrap_servers=infra_settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=1, replication_factor=1, topic_configs={"max.message.bytes": "10000"})]
        )
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=infra_settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        ack = await producer.send(topic, b"x" * 50_000)  # within the producer's limit: enqueued
        with pytest.raises(KafkaError) as caught:
            await ack
    finally:
        await producer.stop()
    assert isinstance(caught.value, MessageSizeTooLargeError), repr(caught.value)
    assert classify(caught.value) is Verdict.PERMANENT


def test_the_policy_retries_outages_and_wraps() -> None:
    assert classify(KafkaConnectionError("refused")) is Verdict.RETRIABLE
    assert classify(TimeoutError()) is Verdict.RETRIABLE
    wrapped = RuntimeError("Error while sending")  # how Faust's ProducerSendError carries the cause
    wrapped.__cause__ = KafkaConnectionError("refused")
    assert classify(wrapped) is Verdict.RETRIABLE
    assert classify(RuntimeError("a bug")) is Verdict.UNKNOWN  # retried within the bound, never dead-lettered


@pytest.mark.integration
async def test_existing_topics_asks_for_just_the_named_topics_and_creates_none(infra_settings: Settings) -> None:
    from streams.topics import existing_topics, partitions_of

    present = f"exist-{uuid.uuid4().hex[:8]}"
    absent = f"absent-{uuid.uuid4().hex[:8]}"
    await ensure_topics(infra_settings, [(present, 1)])
    producer = AIOKafkaProducer(bootstrap_servers=infra_settings.kafka_bootstrap)
    await producer.start()
    try:
        assert await existing_topics(producer.client, [present, absent]) == {present}
        assert await existing_topics(producer.client, [absent]) == set()
    finally:
        await producer.stop()
    assert await partitions_of(infra_settings, absent) == []  # asking did not create it
