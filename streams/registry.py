"""Agent heartbeats in Redis: who is alive, and which model serves each task.

All agents of a deployment write to ONE hash, ``{prefix}:agents``: field = the agent's worker id, value =
JSON of its :class:`AgentInfo` plus ``seen_ms`` (the agent's wall clock) and ``ttl_ms``. Each beat (every
``heartbeat_interval_s``) also refreshes the hash's own TTL to ``heartbeat_ttl_s``, so the hash vanishes
by itself once every agent is gone. Readers (``/health``, the edge's model-name refresh) read the hash
with one ``HGETALL`` (never a keyspace ``SCAN``), ignore entries older than their ``ttl_ms`` and delete
those stale fields (``HDEL``, only those found stale at least ``PRUNE_AFTER`` TTLs old, so a reader can
hardly race an agent's fresh beat).

Every call goes through the client's circuit breaker (``streams.redis.guarded``). What can go wrong:
``beat`` and ``live_agents`` raise ``RedisError`` (``RedisUnavailable`` when Redis is down or skipped) for
the caller to report; ``models_by_service`` swallows it (the edge keeps the names it had). Staleness is
judged by comparing the agent's wall clock with the reader's: hosts with clocks skewed by more than the
TTL would misjudge liveness.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from streams.redis import guarded

log = logging.getLogger(__name__)

PRUNE_AFTER = 3  # stale fields are deleted once older than this many TTLs (ignored from 1 TTL on)


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """One live agent, as its last heartbeat described it.

    ``delivery`` is ``"ok"``, or ``"retrying"`` while the agent retries delivering a batch's replies
    (Kafka trouble); ``last_error`` says why.
    """

    service: str
    worker_id: str
    models: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    started_ms: int = 0
    seen_ms: int = 0
    batches: int = 0
    items: int = 0
    delivery: str = "ok"
    last_error: str | None = None


_FIELDS = frozenset(f.name for f in dataclasses.fields(AgentInfo))


def registry_key(prefix: str) -> str:
    """The one hash holding every agent's heartbeat."""
    return f"{prefix}:agents"


def _now_ms() -> int:
    return int(time.time() * 1000)


async def beat(redis: Redis, prefix: str, info: AgentInfo, ttl_s: float) -> None:
    """Write one heartbeat and refresh the hash's TTL; raises RedisError for the caller to log."""
    ttl_ms = max(1, int(ttl_s * 1000))
    value = orjson.dumps({**dataclasses.asdict(info), "seen_ms": _now_ms(), "ttl_ms": ttl_ms})
    key = registry_key(prefix)

    async def write() -> None:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, info.worker_id, value)
            pipe.pexpire(key, ttl_ms)
            await pipe.execute()

    await guarded(redis, write)


def parse_agents(
    raw: Mapping[bytes | str, bytes | str], now_ms: int, default_ttl_ms: int = 10_000
) -> tuple[list[AgentInfo], list[bytes | str]]:
    """Split a ``HGETALL`` answer into live agents and the fields stale enough to prune (pure)."""
    agents: list[AgentInfo] = []
    prune: list[bytes | str] = []
    for name, value in raw.items():
        try:
            doc = orjson.loads(value)
            ttl_ms = int(doc.get("ttl_ms", default_ttl_ms))
            age = now_ms - int(doc.get("seen_ms", 0))
            info = AgentInfo(**{k: v for k, v in doc.items() if k in _FIELDS})
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
            log.warning("pruning unreadable heartbeat %r: %r", name, value[:100])
            prune.append(name)
            continue
        if age > ttl_ms * PRUNE_AFTER:
            prune.append(name)
        elif age <= ttl_ms:
            agents.append(info)
    return agents, prune


async def live_agents(redis: Redis, prefix: str) -> list[AgentInfo]:
    """Every agent whose last heartbeat is younger than its TTL; prunes long-dead entries.

    Raises:
        RedisError: the registry could not be read (agents unknown, not absent).
    """
    key = registry_key(prefix)
    raw = await guarded(redis, lambda: redis.hgetall(key))
    agents, prune = parse_agents(raw, _now_ms())
    if prune:
        try:
            await guarded(redis, lambda: redis.hdel(key, *prune))
        except RedisError as exc:
            log.debug("could not prune %d stale heartbeat(s): %s", len(prune), exc)
    return agents


async def models_by_service(redis: Redis, prefix: str) -> dict[str, dict[str, str]]:
    """``{service: {task: model}}`` from the live agents (any agent's view; they agree in steady state).

    Empty when Redis cannot be read (logged at debug; the breaker logs the outage once).
    """
    out: dict[str, dict[str, str]] = {}
    try:
        for agent in await live_agents(redis, prefix):
            out.setdefault(agent.service, {}).update(agent.models)
    except RedisError as exc:
        log.debug("could not read agent registry: %s", exc)
    return out
