"""The Faust app factory: one app (= one consumer group) per service.

Faust is used as the agent runtime only: consumer-group membership, partition assignment, fetching,
micro-batching (``Stream.take_events``) and offset commits of acknowledged events. The app has no web
server, no tables and no autodiscovery; values stay raw bytes and are decoded by our codec, so a
malformed event never reaches Faust's deserialiser (which would drop it silently).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import faust
from faust.transport import drivers as faust_drivers
from faust.transport.drivers import aiokafka as faust_aiokafka

from schemas import Service
from streams.kafka_security import client_options
from streams.settings import Settings
from streams.topics import consumer_group, service_topics


class IdempotentProducer(faust_aiokafka.Producer):
    """Faust's aiokafka producer with ``enable_idempotence`` (and ``acks=all``) always on.

    faust-streaming 0.15.3 has no setting for it: ``Producer._settings_extra`` passes
    ``enable_idempotence=True`` only under ``processing_guarantee="exactly_once"`` (transactions, which we
    do not use). Without it a send retried across a leader change may write a reply twice.
    """

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class IdempotentTransport(faust_aiokafka.Transport):
    """Faust's aiokafka transport, producing through :class:`IdempotentProducer`."""

    Producer = IdempotentProducer


faust_drivers.TRANSPORTS.aliases.setdefault("aisemble", f"{__name__}:IdempotentTransport")


def broker_urls(bootstrap: str) -> list[str]:
    """Faust's broker URLs from a Kafka bootstrap list (``h1:9092,h2:9092``); the ``aisemble://`` scheme
    selects :class:`IdempotentTransport` (Faust's aiokafka driver with an idempotent producer)."""
    return [f"aisemble://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def faust_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """Faust's ``broker_credentials`` for ``settings``' Kafka security (None for PLAINTEXT).

    Built from ``streams.kafka_security.client_options``, so the agents validate and connect exactly as the
    edge does: ``SASLCredentials`` (PLAIN or SCRAM; with the SSL context it is SASL_SSL, which faust-streaming
    0.15.3's ``credentials_to_aiokafka_auth`` passes to aiokafka as is) or ``SSLCredentials``. Faust gives them
    to every client it makes: the group consumer, the producer and topic creation through it.

    Raises:
        KafkaSecurityConfigError: the settings cannot work together.
    """
    options = client_options(settings)
    protocol = options["security_protocol"]
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(options["ssl_context"])
    return faust.SASLCredentials(
        username=options["sasl_plain_username"],
        password=options["sasl_plain_password"],
        mechanism=options["sasl_mechanism"],
        ssl_context=options.get("ssl_context"),  # present: SASL_SSL; absent: SASL_PLAINTEXT
    )


def create_app(settings: Settings, service: Service) -> faust.App:
    """A Faust app for one service's agents."""
    datadir = settings.cache_dir / "faust" / f"{settings.topic_prefix}-{service}"
    datadir.parent.mkdir(parents=True, exist_ok=True)
    return faust.App(
        consumer_group(settings.topic_prefix, service),
        broker=broker_urls(settings.kafka_bootstrap),
        broker_credentials=faust_credentials(settings),
        web_enabled=False,
        autodiscover=False,
        store="memory://",
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.session_timeout_s / 3,
        broker_commit_every=1000,
        producer_acks=-1,
        producer_max_request_size=settings.max_event_bytes,
        producer_linger_ms=1,
        # The producer gives up on a send after this (Faust's default is 20 minutes): with the agent's own
        # bounded retry (agents.loop) it keeps a dead broker from holding a batch, or a shutdown, for long.
        producer_request_timeout=settings.delivery_retry_s,
        stream_wait_empty=False,
        logging_config=None,
    )


def request_topic(app: faust.App, settings: Settings, service: Service) -> faust.TopicT:
    """The service's request topic, read as raw bytes."""
    return app.topic(
        service_topics(settings.topic_prefix, service).requests,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
