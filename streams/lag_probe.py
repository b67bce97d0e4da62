"""Reads consumer-group offsets from the broker and keeps the last lag report: the I/O half of ``streams.lag``.

Which groups: ``{prefix}-{service}-agents`` for every configured service (shown even when the group does
not exist yet: state ``Dead``, no commits, lag = what waits in its request topic), plus every group the
broker lists whose id starts with ``{prefix}-`` (ad-hoc consumers, services not configured here). Which
topics: a service group's request topic, and whatever the group committed on or its members subscribe to
(except Kafka's ``__*`` topics and Faust's ``-__assignor-__leader`` topic); every partition of each (those
the group never committed included).

One sample: ``list_consumer_groups`` once, then per group ``describe_consumer_groups`` (state, members) and
``list_consumer_group_offsets``; ``describe_topics`` for the partitions, and one consumer (no group) for the
beginning and end offsets. Every client is built with ``client_options(settings)`` (Kafka TLS/SASL).

:class:`LagMonitor` keeps its clients open between samples and the previous sample for rates. ``read()``
returns the cached report while it is younger than ``min_interval_s`` (1 s), so the broker is asked at most
once per interval however often ``read`` is called; concurrent callers share the one sample in flight (a
lock). A failed sample is cached for the same interval (its error re-raised), so a dead broker is not
hammered either, and the clients are rebuilt on the next attempt.

What can go wrong: :class:`LagUnavailable` (retriable) when the broker does not answer within
``timeout_s`` or refuses a request; ``KafkaSecurityFailure`` / ``KafkaSecurityConfigError`` from
``client_options`` / ``start_client`` (not retriable). Offsets are read one after the other, not
atomically: under traffic, an end offset may be a few ms newer than a committed one.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from schemas import Service
from streams.kafka_security import client_options, start_client
from streams.lag import GroupSample, LagReport, Snapshot, compute
from streams.settings import Settings
from streams.topics import consumer_group, service_topics

log = logging.getLogger(__name__)

DEFAULT_MIN_INTERVAL_S = 1.0
DEFAULT_TIMEOUT_S = 10.0
FAUST_LEADER_SUFFIX = "-__assignor-__leader"


class LagUnavailable(RuntimeError):
    """The broker could not be asked for offsets (away, slow, or refusing a request); retriable."""

    retriable = True

    def __init__(self, message: str, *, bootstrap: str) -> None:
        super().__init__(message)
        self.bootstrap = bootstrap


def subscribed_topics(member_metadata: bytes) -> list[str]:
    """The topics in a classic consumer-protocol member's subscription (version int16, then an array of
    int16-length strings); empty when the bytes are not in that format."""
    try:
        (count,) = struct.unpack_from(">i", member_metadata, 2)
        offset, topics = 6, []
        for _ in range(max(count, 0)):
            (length,) = struct.unpack_from(">h", member_metadata, offset)
            offset += 2
            topics.append(member_metadata[offset : offset + length].decode())
            offset += length
        return topics
    except (struct.error, UnicodeDecodeError):
        return []


def internal_topic(topic: str) -> bool:
    """Kafka's own topics and Faust's leader-election topic (``{group}-__assignor-__leader``, which Faust
    agents subscribe to but nobody produces to): left out of the report."""
    return topic.startswith("__") or topic.endswith(FAUST_LEADER_SUFFIX)


class LagMonitor:
    """Samples the aisemble consumer groups' offsets; see the module docstring.

    Args:
        settings: bootstrap, Kafka security, topic prefix and the configured services.
        min_interval_s: a report younger than this is returned from the cache (0: always sample).
        timeout_s: the most one sample may take.
        clock: monotonic seconds (injected in tests); the report's wall time uses ``time.time``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        services: Sequence[Service] | None = None,
    ) -> None:
        self.settings = settings
        self.min_interval_s = min_interval_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.services: tuple[Service, ...] = tuple(settings.services if services is None else services)
        self.samples = 0  # broker round trips made (for tests and figures)
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._previous: Snapshot | None = None
        self._cached: LagReport | None = None
        self._failure: LagUnavailable | None = None
        self._cached_at: float | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> LagMonitor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the clients (a later ``read`` opens them again)."""
        admin, consumer = self._admin, self._consumer
        self._admin = self._consumer = None
        if consumer is not None:
            await consumer.stop()
        if admin is not None:
            await admin.close()

    async def read(self) -> LagReport:
        """The last report if younger than ``min_interval_s``, else a fresh one (one sample for all callers).

        Raises:
            LagUnavailable: the broker did not answer (also re-raised from the cache for ``min_interval_s``).
        """
        async with self._lock:
            if self._cached_at is not None and self.clock() - self._cached_at < self.min_interval_s:
                if self._failure is not None:
                    raise self._failure
                assert self._cached is not None
                return self._cached
            try:
                snapshot = await self._sample()
            except LagUnavailable as exc:
                self._failure, self._cached_at = exc, self.clock()
                await self.close()
                raise
            self._cached = compute(snapshot, self._previous)
            self._previous, self._failure, self._cached_at = snapshot, None, snapshot.taken_at
            return self._cached

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._consumer is None:
            options = client_options(self.settings)
            admin = AIOKafkaAdminClient(
                bootstrap_servers=self.settings.kafka_bootstrap, client_id="aisemble-lag", **options
            )
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.settings.kafka_bootstrap,
                client_id="aisemble-lag",
                enable_auto_commit=False,
                **options,
            )
            try:
                await start_client(admin, self.settings)
                await start_client(consumer, self.settings)
            except BaseException:
                await consumer.stop()
                await admin.close()
                raise
            self._admin, self._consumer = admin, consumer
        return self._admin, self._consumer

    async def _sample(self) -> Snapshot:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._read_offsets()
        except (KafkaError, OSError, TimeoutError) as exc:
            raise LagUnavailable(
                f"could not read consumer-group offsets from {self.settings.kafka_bootstrap}: {exc!r}",
                bootstrap=self.settings.kafka_bootstrap,
            ) from exc

    async def _read_offsets(self) -> Snapshot:
        admin, consumer = await self._clients()
        prefix = self.settings.topic_prefix
        known: dict[str, Service | None] = {consumer_group(prefix, s): s for s in self.services}
        listed = sorted(str(g[0]) for g in await admin.list_consumer_groups() if str(g[0]).startswith(f"{prefix}-"))
        for group in listed:
            known.setdefault(group, None)
        samples: list[tuple[str, Service | None, str, int, set[str], dict[tuple[str, int], int]]] = []
        for group, service in known.items():
            state, members, subscribed = await self._describe(admin, group)
            offsets = await admin.list_consumer_group_offsets(group)
            committed = {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
            topics = {t for t, _ in committed} | subscribed
            if service is not None:
                topics |= {service_topics(prefix, service).requests, service_topics(prefix, service).bulk}
            samples.append((group, service, state, members, topics, committed))
        all_topics = sorted({t for *_, topics, _ in samples for t in topics})
        partitions = [
            TopicPartition(d["topic"], p["partition"])
            for d in (await admin.describe_topics(all_topics) if all_topics else [])
            if d["error_code"] == 0
            for p in d["partitions"]
        ]
        ends = await consumer.end_offsets(partitions) if partitions else {}
        starts = await consumer.beginning_offsets(partitions) if partitions else {}
        self.samples += 1
        existing = {tp.topic for tp in partitions}
        groups = tuple(
            GroupSample(
                group=group,
                service=service,
                state=state,
                members=members,
                topics=tuple(sorted(t for t in topics if t in existing)),
                committed=committed,
            )
            for group, service, state, members, topics, committed in samples
        )
        return Snapshot(
            taken_at=self.clock(),
            wall_time=time.time(),
            groups=groups,
            ends={(tp.topic, tp.partition): o for tp, o in ends.items()},
            starts={(tp.topic, tp.partition): o for tp, o in starts.items()},
        )

    @staticmethod
    async def _describe(admin: AIOKafkaAdminClient, group: str) -> tuple[str, int, set[str]]:
        """(state, live members, subscribed topics) of one group; ``Dead`` with 0 members when it does not
        exist. One group per request: aiokafka mis-decodes a response that holds an unknown group."""
        (response,) = await admin.describe_consumer_groups([group])
        for described in response.to_object()["groups"]:
            if described["group"] != group or described["error_code"] != 0:
                continue
            members = described["members"]
            subscribed = {
                t for m in members for t in subscribed_topics(m["member_metadata"]) if not internal_topic(t)
            }
            return str(described["state"]) or "Unknown", len(members), subscribed
        return "Dead", 0, set()
