"""The agents' Kafka sink: replies, dead letters and partials go out through the Faust app's producer.

``FaustSink.send`` enqueues one record and returns the future of the broker's acknowledgement.
``missing_topics`` tells which topics the cluster does not have (see ``agents.loop`` for what is done with
a missing topic). Guarantees:

* an answer is never older than ``KNOWN_TTL_S`` for a topic seen to exist, nor ``MISSING_TTL_S`` for a
  topic found missing: a reply topic deleted while its requests wait (``aisemble replay`` deletes its own)
  is seen missing within seconds, and a stream of requests naming made-up topics costs at most one check
  per topic per ``MISSING_TTL_S``;
* one check asks for just the topics it needs (never the whole cluster, never creating a topic), all
  topics of a call in one request, bounded by ``METADATA_CHECK_S``;
* the check goes over its own connection (aiokafka's coordination connection group of the producer's
  client, with the producer's address and security settings), so it never queues behind the producer's
  records, and it never touches the producer's metadata view (whose refresh is not fresh enough to tell:
  up to ``metadata_max_age`` old).

``send`` names the partition itself when the topic has only one (a reply topic): the same partition the key's
hash gives, without the producer's pure-Python murmur2 for every record. It keeps the producer's own metadata
view whole: a topic not in it is brought in by a refresh of the
whole view first (``ensure_in_view``), never by aiokafka's ``add_topic``, which narrows the view to that one
topic and strands records already waiting for the others (the agent then stalls for ``delivery_retry_s``
and exits 3: what ``test_kafka_fuzz`` hit, and once blamed on an extra metadata request).

What can go wrong: the broker does not answer the check in time (logged): topics not known missing are
then reported as not missing, and their sends are judged by ``agents.loop`` (bounded retry). A record sent
just before its topic is deleted stays in the producer until its request timeout (``delivery_retry_s``),
and aiokafka refreshes its metadata meanwhile; ``agents.loop`` stops waiting for it within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Iterable

import faust
from aiokafka.client import AIOKafkaClient, ConnectionGroup
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, UnknownTopicOrPartitionError
from aiokafka.protocol.metadata import MetadataRequest

log = logging.getLogger(__name__)

METADATA_CHECK_S = 2.0  # the longest one existence check may take
KNOWN_TTL_S = 3.0  # a topic seen to exist is trusted this long, then checked again
MISSING_TTL_S = 1.0  # a topic found missing is reported missing this long without asking again


async def existing_topics(client: AIOKafkaClient, topics: Iterable[str]) -> set[str]:
    """Those of ``topics`` the cluster has: ONE metadata request naming just them (``allow_auto_topic_creation``
    false), on the client's coordination connections; the known brokers are asked in random order until one
    answers.

    Raises:
        KafkaError (or OSError): no broker is known, or none of them answered.
    """
    names = sorted(set(topics))
    nodes = [broker.nodeId for broker in client.cluster.brokers()]
    random.shuffle(nodes)
    failure: BaseException = KafkaConnectionError("no broker is known to the producer")
    for node in nodes:
        try:
            response = await client.send(
                node, MetadataRequest(names, allow_auto_topic_creation=False), group=ConnectionGroup.COORDINATION
            )
        except (KafkaError, OSError) as exc:
            failure = exc
            continue
        # Every version of the response starts a topic's entry with (error_code, name, ...); 0 = it exists.
        return {entry[1] for entry in response.topics if entry[0] == 0 and entry[1] in names}
    raise failure


async def ensure_in_view(client: AIOKafkaClient, topic: str) -> None:
    """Make sure ``topic`` is in the producer's metadata view before a record is sent to it, refreshing the
    whole view (all topics, as the producer tracks none) when it is not.

    Why: aiokafka's ``send`` to a topic missing from its view calls ``add_topic``, and from then on the client
    tracks just that topic: its next refresh replaces the view by that one topic, so records already waiting
    for other topics (a batch's dead letters) lose their partition leader and sit until their request timeout
    (``delivery_retry_s``: the agent then exits 3). ``test_sink.py`` shows it with a plain producer.

    Raises:
        UnknownTopicOrPartitionError: still not in the view after the refresh (retriable: the caller checks,
            on its next round, whether the topic exists at all).
        KafkaTimeoutError: the refresh took longer than ``METADATA_CHECK_S`` (retriable).
    """
    if client.cluster.partitions_for_topic(topic) is not None:
        return
    try:
        async with asyncio.timeout(METADATA_CHECK_S):
            await client.force_metadata_update()
    except TimeoutError as exc:
        raise KafkaTimeoutError(f"no metadata for {topic} within {METADATA_CHECK_S}s") from exc
    if client.cluster.partitions_for_topic(topic) is None:
        raise UnknownTopicOrPartitionError(f"{topic} is not in the producer's metadata")


class FaustSink:
    """Produces through the Faust app's producer; ``send`` returns the broker-ack future."""

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self._present: dict[str, float] = {}  # topic -> when it was last seen to exist
        self._missing: dict[str, float] = {}  # topic -> when it was found missing

    async def send(
        self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]] | None = None
    ) -> Awaitable[object]:
        """Enqueue one record (``headers``: its Kafka headers, the trace context of a reply while tracing is on)."""
        client = self._client()
        partition: int | None = None
        if client is not None:
            await ensure_in_view(client, topic)  # never let aiokafka narrow its view to one topic
            partitions = client.cluster.partitions_for_topic(topic)
            if partitions is not None and len(partitions) == 1:
                # Where the key's hash would place it anyway: spares the producer's pure-Python murmur2 per
                # record (a reply topic has one partition).
                (partition,) = partitions
        return await self._app.producer.send(topic, key, value, partition=partition, timestamp=None, headers=headers)

    def _client(self) -> AIOKafkaClient | None:
        client: AIOKafkaClient | None = getattr(getattr(self._app.producer, "_producer", None), "client", None)
        return client

    async def missing_topics(self, topics: set[str]) -> set[str]:
        """Those of ``topics`` the cluster does not have (see the module docstring for how fresh)."""
        client = self._client()
        if client is None:
            return set()
        now = time.monotonic()
        self._present = {t: at for t, at in self._present.items() if now - at < KNOWN_TTL_S}
        self._missing = {t: at for t, at in self._missing.items() if now - at < MISSING_TTL_S}
        unknown = topics - self._present.keys() - self._missing.keys()
        if unknown:
            try:
                async with asyncio.timeout(METADATA_CHECK_S):
                    existing = await existing_topics(client, unknown)
            except (TimeoutError, KafkaError, OSError) as exc:
                log.warning("cannot tell whether topics %s exist: %r", sorted(unknown), exc)
                return topics & self._missing.keys()
            checked = time.monotonic()
            for topic in unknown:
                if topic in existing:
                    self._present[topic] = checked
                else:
                    self._missing[topic] = checked
        return topics & self._missing.keys()
