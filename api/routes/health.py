"""``GET /health``: broker, Redis and agents, 200 when all are fine and 503 otherwise."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import ORJSONResponse

from api.deps import get_edge
from api.edge import Edge
from streams.registry import live_agents

router = APIRouter(tags=["health"])


async def _check_kafka(edge: Edge) -> dict[str, object]:
    try:
        partitions = await asyncio.wait_for(edge.producer.client.fetch_all_metadata(), 3.0)
        return {"ok": True, "brokers": len(partitions.brokers())}
    except Exception as exc:  # noqa: BLE001  (a health check reports every failure)
        return {"ok": False, "error": repr(exc)}


async def _check_redis(edge: Edge) -> dict[str, object]:
    try:
        await asyncio.wait_for(edge.redis.ping(), 3.0)
        return {"ok": True}
    except Exception as exc:  # noqa: BLE001  (reported, not raised)
        return {"ok": False, "error": repr(exc)}


@router.get("/health")
async def health(edge: Edge = Depends(get_edge)) -> ORJSONResponse:
    """Report each dependency; 503 when the broker or Redis is down or a service has no live agent."""
    kafka, redis = await asyncio.gather(_check_kafka(edge), _check_redis(edge))
    agents: dict[str, list[dict[str, object]]] = {s: [] for s in edge.settings.services}
    if redis["ok"]:
        for agent in await live_agents(edge.redis, edge.settings.topic_prefix):
            if agent.service not in agents:
                continue
            agents[agent.service].append(
                {
                    "worker_id": agent.worker_id,
                    "models": agent.models,
                    "seen_ms": agent.seen_ms,
                    "batches": agent.batches,
                    "items": agent.items,
                }
            )
    services = {s: {"ok": bool(a), "agents": a} for s, a in agents.items()}
    listening = edge.listener.running
    ok = listening and bool(kafka["ok"]) and bool(redis["ok"]) and all(v["ok"] for v in services.values())
    body = {
        "status": "ok" if ok else "degraded",
        "edge": {
            "id": edge.settings.edge_id,
            "reply_topic": edge.reply_topic,
            "listening": listening,
            "waiting": len(edge.router),
        },
        "kafka": kafka,
        "redis": redis,
        "services": services,
    }
    return ORJSONResponse(body, status_code=200 if ok else 503)
