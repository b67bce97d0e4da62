"""Topic names and topic creation.

Names (``prefix`` from settings, default ``aisemble``):

* ``{prefix}.{service}.requests``: partitioned request topic, consumed by the service's agents (the
  interactive lane: the edge's synchronous and streaming calls);
* ``{prefix}.{service}.bulk``: the bulk lane, same partitions and same event format as the requests topic,
  consumed by the same agents, which serve it with the capacity interactive work leaves (``streams.batching``);
* ``{prefix}.{service}.results``: replies to requests that named no ``reply_to``;
* ``{prefix}.{service}.dlq``: events that could not be read, with the reason;
* ``{prefix}.edge.{edge_id}.replies``: one reply topic per edge instance;
* ``{prefix}.replies.{name}``: reply topics of raw clients (``aisemble topics create --reply NAME``);
* the Batch API's (``batch_topics``, records in ``schemas.batch``): ``{prefix}.files`` and ``{prefix}.batches``
  (compacted, one partition), ``{prefix}.batch-jobs`` (``partitions``), and one ``{prefix}.replies.batch_{id}``
  per running batch (``batch_results_topic``: inside the default reply-topic policy).

Topics are created here (at start-up, or by ``aisemble topics create``), never as a side effect of
producing: the local broker and docker-compose run with ``auto.create.topics.enable=false``.

``ensure_topics`` is idempotent: a topic that exists is left as it is (its partition count included).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.protocol.metadata import MetadataRequest

from schemas import SERVICES, Service
from streams.kafka_security import client_options, start_client
from streams.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceTopics:
    """The topics of one service."""

    requests: str
    results: str
    dlq: str
    bulk: str

    def lane(self, bulk: bool) -> str:
        """The request topic of a lane: ``bulk`` or the interactive ``requests``."""
        return self.bulk if bulk else self.requests


def service_topics(prefix: str, service: Service) -> ServiceTopics:
    base = f"{prefix}.{service}"
    return ServiceTopics(requests=f"{base}.requests", results=f"{base}.results", dlq=f"{base}.dlq", bulk=f"{base}.bulk")


def edge_reply_topic(prefix: str, edge_id: str) -> str:
    return f"{prefix}.edge.{edge_id}.replies"


def reply_topic_name(prefix: str, name: str) -> str:
    """A reply topic for a raw client (``{prefix}.replies.{name}``): inside the default reply-topic policy."""
    return f"{prefix}.replies.{name}"


@dataclass(frozen=True, slots=True)
class BatchTopics:
    """The Batch API's shared topics (``schemas.batch``)."""

    files: str
    batches: str
    jobs: str
    runners_group: str


def batch_topics(prefix: str) -> BatchTopics:
    return BatchTopics(f"{prefix}.files", f"{prefix}.batches", f"{prefix}.batch-jobs", f"{prefix}-batch-runners")


def batch_results_topic(prefix: str, batch_id: str) -> str:
    """Where the replies to one batch's lines go: a ``{prefix}.replies.*`` topic, so the default policy allows it."""
    return reply_topic_name(prefix, batch_id)


def consumer_group(prefix: str, service: Service) -> str:
    """The consumer group shared by all agents of a service."""
    return f"{prefix}-{service}-agents"


@contextlib.asynccontextmanager
async def admin_client(settings: Settings) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client with ``settings``' Kafka security, closed on exit.

    Raises:
        KafkaSecurityFailure: the broker refused its credentials, certificate or protocol (not retriable).
        KafkaSecurityConfigError: the security settings cannot work together.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, client_id="aisemble-admin", **client_options(settings)
    )
    try:
        await start_client(admin, settings)
        yield admin
    finally:
        await admin.close()


async def ensure_topics(
    settings: Settings, names_partitions: Iterable[tuple[str, int]], configs: Mapping[str, str] | None = None
) -> list[str]:
    """Create the topics that do not exist yet; return the names created, once their partitions show in the
    broker's metadata.

    Waiting matters because the broker creates no topic on demand: a consumer that subscribes before a
    just-created topic's metadata has propagated is given an empty assignment, and may sit on it until the
    next rebalance (seen on a fresh broker: a Faust agent serving nothing for 40 s).
    """
    created = await _create_missing(settings, names_partitions, configs)
    for name in created:
        if not await wait_for_partitions(settings, name):
            log.warning("topic %s created, but its partitions are not in the metadata yet", name)
    return created


async def _create_missing(
    settings: Settings, names_partitions: Iterable[tuple[str, int]], configs: Mapping[str, str] | None = None
) -> list[str]:
    async with admin_client(settings) as admin:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                name=name,
                num_partitions=partitions,
                replication_factor=settings.replication_factor,
                topic_configs=dict(configs or {}),
            )
            for name, partitions in names_partitions
            if name not in existing
        ]
        if not wanted:
            return []
        try:
            await admin.create_topics(wanted)
        except TopicAlreadyExistsError:
            log.debug("topics created concurrently by another process")
        return [t.name for t in wanted]


async def ensure_service_topics(settings: Settings, services: Iterable[Service] = SERVICES) -> list[str]:
    """Create every service's request (both lanes: interactive and bulk), results and dead-letter topics."""
    wanted: list[tuple[str, int]] = []
    for service in services:
        topics = service_topics(settings.topic_prefix, service)
        wanted += [(topics.requests, settings.partitions), (topics.bulk, settings.partitions)]
        wanted += [(topics.results, 1), (topics.dlq, 1)]
    return await ensure_topics(settings, wanted)


async def partitions_of(settings: Settings, topic: str) -> list[int]:
    """The partition ids of an existing topic (empty when it does not exist)."""
    async with admin_client(settings) as admin:
        (description,) = await admin.describe_topics([topic])
        if description["error_code"] != 0:
            return []
        return sorted(p["partition"] for p in description["partitions"])


async def wait_for_partitions(settings: Settings, topic: str, timeout_s: float = 15.0) -> list[int]:
    """The partitions of ``topic``, waiting while a just-created topic's metadata propagates."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        partitions = await partitions_of(settings, topic)
        if partitions or asyncio.get_running_loop().time() > deadline:
            return partitions
        await asyncio.sleep(0.2)


async def existing_topics(client: AIOKafkaClient, topics: Iterable[str]) -> set[str]:
    """Those of ``topics`` the cluster has, from ONE metadata request naming just them, which never creates a
    topic (``allow_auto_topic_creation`` false). Cheap whatever the cluster holds: a request for all topics
    (``fetch_all_metadata``, or a client tracking none) makes the broker send, and this process decode, every
    topic of the cluster (thousands on a shared one). The known brokers are asked in random order until one
    answers (as aiokafka's own metadata refresh does), so one dead broker of a cluster is no outage.

    Raises:
        KafkaError (or OSError): no broker is known, or none of them answered.
    """
    names = sorted(set(topics))
    nodes = [broker.nodeId for broker in client.cluster.brokers()]
    random.shuffle(nodes)
    if not nodes:
        raise KafkaConnectionError("no broker is known to the client")
    failure: BaseException | None = None
    for node in nodes:
        try:
            response = await client.send(node, MetadataRequest(names, allow_auto_topic_creation=False))
        except (KafkaError, OSError) as exc:
            failure = exc
            continue
        # Every version of the response starts a topic's entry with (error_code, name, ...); 0 = it exists.
        return {entry[1] for entry in response.topics if entry[0] == 0 and entry[1] in names}
    assert failure is not None
    raise failure


async def list_topics(settings: Settings) -> set[str]:
    """The broker's topic names (internal ones included)."""
    async with admin_client(settings) as admin:
        return set(await admin.list_topics())


async def drop_topics(settings: Settings, names: Iterable[str], batch: int = 500) -> int:
    """Delete ``names`` (best effort: a refusal is logged, never raised); how many the broker accepted.

    For throw-away prefixes (tests, benchmarks): every topic is a directory per partition on the broker,
    and thousands left behind cost a single-node broker CPU at rest (10% of a core at 13,000 partitions,
    measured) and start-up time."""
    wanted = sorted(set(names))
    dropped = 0
    if not wanted:
        return 0
    try:
        async with admin_client(settings) as admin:
            for start in range(0, len(wanted), batch):
                chunk = wanted[start : start + batch]
                await admin.delete_topics(chunk)
                dropped += len(chunk)
    except (KafkaError, OSError) as exc:  # policy: cleanup never hides a result; say what was left behind
        log.warning("could not delete %d of %d topics: %r", len(wanted) - dropped, len(wanted), exc)
    return dropped


def prefix_topics(topics: Iterable[str], prefix: str) -> list[str]:
    """The topics of ``prefix`` (``{prefix}.…``)."""
    return [t for t in topics if t.startswith(f"{prefix}.")]
