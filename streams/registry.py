"""Agent heartbeats in Redis: who is alive, and which model serves each task.

Each agent process writes ``{prefix}:agents:{service}:{worker_id}`` every ``heartbeat_interval_s`` with
a TTL of ``heartbeat_ttl_s``, so a dead agent disappears by itself. The value (JSON) names the models per
task; the edge reads it to build cache keys and ``/health`` reads it to report agents.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """One live agent, as its last heartbeat described it."""

    service: str
    worker_id: str
    models: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    started_ms: int = 0
    seen_ms: int = 0
    batches: int = 0
    items: int = 0


def heartbeat_key(prefix: str, service: str, worker_id: str) -> str:
    return f"{prefix}:agents:{service}:{worker_id}"


async def beat(redis: Redis, prefix: str, info: AgentInfo, ttl_s: float) -> None:
    """Write one heartbeat; raises RedisError for the caller to log."""
    value = orjson.dumps({**dataclasses.asdict(info), "seen_ms": int(time.time() * 1000)})
    await redis.set(heartbeat_key(prefix, info.service, info.worker_id), value, px=int(ttl_s * 1000))


async def live_agents(redis: Redis, prefix: str) -> list[AgentInfo]:
    """Every agent whose heartbeat has not expired."""
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:agents:*", count=200)]
    if not keys:
        return []
    agents = []
    for raw in await redis.mget(keys):
        if raw is None:
            continue
        try:
            agents.append(AgentInfo(**orjson.loads(raw)))
        except (orjson.JSONDecodeError, TypeError):
            log.warning("ignoring unreadable heartbeat %r", raw[:100])
    return agents


async def models_by_service(redis: Redis, prefix: str) -> dict[str, dict[str, str]]:
    """``{service: {task: model}}`` from the live agents (any agent's view; they agree in steady state)."""
    out: dict[str, dict[str, str]] = {}
    try:
        for agent in await live_agents(redis, prefix):
            out.setdefault(agent.service, {}).update(agent.models)
    except RedisError as exc:
        log.warning("could not read agent registry: %s", exc)
    return out
