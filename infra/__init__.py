"""Local Kafka and Redis for development and tests: start, check and stop them on 127.0.0.1.

``start_local(settings)`` makes sure both answer at ``settings.kafka_bootstrap`` and
``settings.redis_url``, starting only what is missing, and returns a :class:`LocalInfra` whose
``stop()`` (or ``with`` block) stops exactly what it started. ``stop_local`` and ``local_status`` are
the ``aisemble infra down`` / ``status`` halves, working from the pid files in the default data dirs
(``<cache_dir>/run/kafka-<port>`` and ``<cache_dir>/run/redis-<port>``).

Guarantees: nothing already running is ever stopped by a :class:`LocalInfra`; if Redis cannot be
started after Kafka was, the Kafka just started is stopped before the error propagates.

What can go wrong: everything in :mod:`infra.errors` (tools missing, ports taken, a server that does not
answer), and ``ValueError`` for malformed addresses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from infra.addresses import local_kafka_port, local_redis_port, parse_bootstrap, parse_redis_url
from infra.cluster import ClusterHandle, ClusterNode, cluster_status, start_cluster, stop_cluster
from infra.errors import InfraError, NotLoopback, PortInUse, StartFailed, ToolMissing
from infra.kafka import (
    KafkaHandle,
    ensure_kafka,
    fetch_jars,
    kafka_answers,
    kafka_status,
    start_kafka,
    stop_kafka,
)
from infra.kafka import default_data_dir as kafka_data_dir
from infra.redis import RedisHandle, ensure_redis, redis_answers, redis_status, start_redis, stop_redis
from infra.redis import default_data_dir as redis_data_dir

log = logging.getLogger(__name__)

__all__ = [
    "ClusterHandle",
    "ClusterNode",
    "InfraError",
    "KafkaHandle",
    "LocalInfra",
    "NotLoopback",
    "PortInUse",
    "RedisHandle",
    "SettingsLike",
    "StartFailed",
    "ToolMissing",
    "cluster_status",
    "ensure_kafka",
    "ensure_redis",
    "fetch_jars",
    "kafka_answers",
    "kafka_data_dir",
    "kafka_status",
    "local_status",
    "parse_bootstrap",
    "parse_redis_url",
    "redis_answers",
    "redis_data_dir",
    "redis_status",
    "start_cluster",
    "start_kafka",
    "start_local",
    "start_redis",
    "stop_cluster",
    "stop_kafka",
    "stop_local",
    "stop_redis",
]


class SettingsLike(Protocol):
    """What infra reads from settings (``streams.settings.Settings`` fits)."""

    @property
    def kafka_bootstrap(self) -> str: ...

    @property
    def redis_url(self) -> str: ...


def _kafka_options_of(settings: SettingsLike) -> dict[str, Any] | None:
    """The aiokafka security arguments of aisemble's ``Settings`` (None for PLAINTEXT or other objects), so
    readiness checks ask a secured broker the way the clients will."""
    if getattr(settings, "kafka_security_protocol", "PLAINTEXT") == "PLAINTEXT":
        return None
    from streams.kafka_security import client_options  # only here: infra does not depend on streams

    return client_options(settings)  # type: ignore[arg-type]


def _cache_dir_of(settings: SettingsLike, cache_dir: str | Path | None) -> str | Path | None:
    if cache_dir is not None:
        return cache_dir
    value = getattr(settings, "cache_dir", None)
    return value if isinstance(value, str | Path) else None


@dataclass
class LocalInfra:
    """The Kafka and Redis that ``start_local`` started (None where one already answered)."""

    kafka_bootstrap: str
    redis_url: str
    kafka: KafkaHandle | None = None
    redis: RedisHandle | None = None

    @property
    def started_any(self) -> bool:
        return self.kafka is not None or self.redis is not None

    def stop(self) -> None:
        """Stop what this object started, Redis first; safe to call twice."""
        if self.redis is not None:
            self.redis.stop()
        if self.kafka is not None:
            self.kafka.stop()

    def __enter__(self) -> LocalInfra:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_local(
    settings: SettingsLike,
    *,
    cache_dir: str | Path | None = None,
    kafka_data_dir: str | Path | None = None,
    redis_data_dir: str | Path | None = None,
    kafka_version: str | None = None,
    kafka_heap: str = "512m",
    kafka_timeout: float = 90.0,
) -> LocalInfra:
    """Make sure Kafka and Redis answer where ``settings`` says, starting what is missing.

    ``cache_dir`` defaults to ``settings.cache_dir`` when it has one, else ``$AISEMBLE_CACHE_DIR`` or
    ``~/.cache/aisemble``. Data dirs default to ``<cache_dir>/run/{kafka,redis}-<port>``; pass fresh
    temporary folders for throw-away servers (tests).

    Raises:
        InfraError (and subclasses), ValueError: see the module docstring.
    """
    cache = _cache_dir_of(settings, cache_dir)
    infra = LocalInfra(settings.kafka_bootstrap, settings.redis_url)
    infra.kafka = ensure_kafka(
        settings.kafka_bootstrap,
        data_dir=kafka_data_dir,
        heap=kafka_heap,
        version=kafka_version,
        cache_dir=cache,
        timeout=kafka_timeout,
        client_options=_kafka_options_of(settings),
    )
    try:
        infra.redis = ensure_redis(settings.redis_url, data_dir=redis_data_dir, cache_dir=cache)
    except BaseException:
        infra.stop()
        raise
    return infra


def stop_local(settings: SettingsLike, *, cache_dir: str | Path | None = None) -> dict[str, bool]:
    """Stop the Kafka and Redis that infra started for ``settings``'s ports (found by pid file).

    Returns ``{"kafka": stopped?, "redis": stopped?}``; a server infra did not start is left alone,
    and a non-local address counts as nothing to stop.
    """
    cache = _cache_dir_of(settings, cache_dir)
    stopped = {"kafka": False, "redis": False}
    try:
        stopped["redis"] = stop_redis(redis_data_dir(local_redis_port(settings.redis_url), cache))
    except (NotLoopback, ValueError) as exc:
        log.info("not stopping Redis: %s", exc)
    try:
        stopped["kafka"] = stop_kafka(kafka_data_dir(local_kafka_port(settings.kafka_bootstrap), cache))
    except (NotLoopback, ValueError) as exc:
        log.info("not stopping Kafka: %s", exc)
    return stopped


def local_status(
    settings: SettingsLike, *, cache_dir: str | Path | None = None
) -> dict[str, dict[str, str | int | bool | None]]:
    """``{"kafka": kafka_status(...), "redis": redis_status(...)}`` for ``settings``'s addresses."""
    cache = _cache_dir_of(settings, cache_dir)
    return {
        "kafka": kafka_status(settings.kafka_bootstrap, cache_dir=cache, client_options=_kafka_options_of(settings)),
        "redis": redis_status(settings.redis_url, cache_dir=cache),
    }
