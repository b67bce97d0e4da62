"""The agents' Kafka sink: replies, dead letters and partials go out through the Faust app's producer.

``FaustSink.send`` enqueues one record and returns the future of the broker's acknowledgement;
``missing_topics`` tells which reply topics the cluster does not have, from the producer's own metadata,
bounded in time (see ``agents.loop`` for what is done with a missing topic).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

import faust
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

METADATA_CHECK_S = 2.0


class FaustSink:
    """Produces through the Faust app's producer; ``send`` returns the broker-ack future."""

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self._known: set[str] = set()
        self._missing: dict[str, float] = {}

    async def send(self, topic: str, key: bytes, value: bytes) -> Awaitable[object]:
        return await self._app.producer.send(topic, key, value, partition=None, timestamp=None, headers=None)

    async def missing_topics(self, topics: set[str]) -> set[str]:
        """Those of ``topics`` the cluster does not have. Unknown ones cost one bounded metadata refresh for
        the whole set, skipped for topics already found missing in the last second, so a stream of requests
        naming made-up topics cannot make every batch wait on metadata."""
        client = getattr(getattr(self._app.producer, "_producer", None), "client", None)
        if client is None:
            return set()
        now = time.monotonic()
        self._missing = {t: at for t, at in self._missing.items() if now - at < 1.0}
        unknown = {t for t in topics if t not in self._known and t not in client.cluster.topics()}
        if unknown - set(self._missing):
            # The producer's own refresh (the topics it tracks). Not streams.topics.existing_topics: an extra
            # request on the Faust producer's connection stalled its acks (test_kafka_fuzz, 60 s, exit 3).
            try:
                async with asyncio.timeout(METADATA_CHECK_S):
                    await client.force_metadata_update()
            except (TimeoutError, KafkaError) as exc:
                log.warning("cannot tell whether topics %s exist: %r", sorted(unknown), exc)
                return set()
        existing = client.cluster.topics()
        self._known |= {t for t in topics if t in existing}
        missing = {t for t in unknown if t not in existing}
        self._missing.update(dict.fromkeys(missing - set(self._missing), now))
        return missing
