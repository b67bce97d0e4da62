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
  client, with the producer's address and security settings), never the connection the producer's
  records and acks use, and it never changes the set of topics the producer's client tracks. (An extra
  request on the producer's connection once stalled its acks for 60 s under ``test_kafka_fuzz``; and
  aiokafka's own refresh replaces its whole topic view by the topics it tracks, so it cannot tell.)

What can go wrong: the broker does not answer the check in time (logged): topics not known missing are
then reported as not missing, and their sends are judged by ``agents.loop`` (bounded retry).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Iterable

import faust
from aiokafka.client import AIOKafkaClient, ConnectionGroup
from aiokafka.errors import KafkaConnectionError, KafkaError
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


class FaustSink:
    """Produces through the Faust app's producer; ``send`` returns the broker-ack future."""

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self._present: dict[str, float] = {}  # topic -> when it was last seen to exist
        self._missing: dict[str, float] = {}  # topic -> when it was found missing

    async def send(self, topic: str, key: bytes, value: bytes) -> Awaitable[object]:
        return await self._app.producer.send(topic, key, value, partition=None, timestamp=None, headers=None)

    async def missing_topics(self, topics: set[str]) -> set[str]:
        """Those of ``topics`` the cluster does not have (see the module docstring for how fresh)."""
        client: AIOKafkaClient | None = getattr(getattr(self._app.producer, "_producer", None), "client", None)
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
