"""``GET /health``: the broker, Redis, the reply listener and every service's agents.

Who sees what: the status and its HTTP code are open to everyone (load balancers and probes send no key).
The detail (agents' pids and model paths, broker and Redis errors, the edge's counters) is shown only to a
caller with a matching API key when keys are configured (``AISEMBLE_API_KEYS``); any other caller gets
``{"status": ...}`` alone, with the same code. Without keys the detail is open, as the edge then listens on
a loopback address only (``api.auth.check_bind``).

The rule for the HTTP status (what a load balancer acts on):

* **503, status "down"**: this edge cannot serve requests: Kafka does not answer, the reply listener is
  not running, or a service this deployment runs has no live agent (read from the agent registry).
* **200, status "degraded"**: requests are still served, but something is impaired: the edge's batch
  runners stopped on a permanent failure (``edge.batch_runners.error``: batches wait for another edge), Redis
  is down or hanging, or its circuit breaker is open (requests run without the cache; agents are then reported as
  ``"unknown"``, not absent, since the registry lives in Redis), or a service's agents are retrying the
  delivery of their replies (``delivery: "retrying"``).
* **200, status "ok"**: everything answers.

Right after Redis comes back (the breaker closed less than ``heartbeat_ttl_s`` ago), a service with no
heartbeat is reported ``"unknown"`` rather than down: a restarted Redis is empty until each agent's next
beat, and an edge must not be pulled for that.

Redis is read once (the registry's ``HGETALL``, which doubles as the ping) through the client's circuit
breaker, so /health never waits longer than one bounded Redis call, and never waits at all while the
breaker is open. Kafka's state is the edge's own broker view (``Edge.kafka_state``, kept by a metadata
probe every second), so /health answers at once even while the broker is away.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Depends
from fastapi.responses import ORJSONResponse
from redis.exceptions import RedisError

from api.auth import Caller, current_caller
from api.deps import get_edge
from api.edge import Edge
from streams.redis import breaker_of
from streams.registry import AgentInfo, live_agents

router = APIRouter(tags=["health"])


def _check_kafka(edge: Edge) -> dict[str, object]:
    """The edge's own broker view (kept by its probe every second): no network call here."""
    state = edge.kafka_state
    return {"ok": state.get("status") == "ok", **state}


async def _check_redis(edge: Edge) -> tuple[dict[str, object], list[AgentInfo] | None]:
    """Redis's state and the live agents; agents are None (unknown) when Redis cannot be read."""
    try:
        agents = await live_agents(edge.redis, edge.settings.topic_prefix)
    except RedisError as exc:
        return {"ok": False, **breaker_of(edge.redis).snapshot(), "error": str(exc)}, None
    return {"ok": True, **breaker_of(edge.redis).snapshot()}, agents


def _agent_view(agent: AgentInfo) -> dict[str, object]:
    return {
        "worker_id": agent.worker_id,
        "pid": agent.pid,
        "models": agent.models,
        "seen_ms": agent.seen_ms,
        "batches": agent.batches,
        "items": agent.items,
        "delivery": agent.delivery,
        "last_error": agent.last_error,
    }


def _service_view(agents: list[AgentInfo] | None, warming: bool) -> dict[str, object]:
    if agents is None:
        return {"ok": None, "status": "unknown", "agents": "unknown"}
    if not agents and warming:
        return {"ok": None, "status": "unknown", "agents": [], "reason": "Redis just came back; awaiting heartbeats"}
    if not agents:
        return {"ok": False, "status": "down", "agents": []}
    status = "degraded" if any(a.delivery != "ok" for a in agents) else "ok"
    return {"ok": status == "ok", "status": status, "agents": [_agent_view(a) for a in agents]}


@router.get(
    "/health",
    responses={
        200: {
            "description": "status ok or degraded (requests are served); the detail only with an API key when "
            "keys are configured, else the body is {status} alone"
        },
        503: {"description": "status down: Kafka away, reply listener stopped, or a service without a live agent"},
    },
)
async def health(edge: Edge = Depends(get_edge), caller: Caller = Depends(current_caller)) -> ORJSONResponse:
    """The status for everyone, each dependency's detail for a caller with a key (see the module doc); 503
    only when requests cannot be served."""
    report = await health_report(edge)
    if caller.keys_on and caller.owner is None:
        return ORJSONResponse({"status": report.status}, status_code=report.code)
    return ORJSONResponse(report.as_dict(), status_code=report.code)


@dataclass(frozen=True, slots=True)
class HealthReport:
    """What ``/health`` knows: the status, its HTTP code, and each part's detail."""

    status: str
    code: int
    edge: dict[str, object]
    kafka: dict[str, object]
    redis: dict[str, object]
    services: dict[str, dict[str, object]]

    def as_dict(self) -> dict[str, object]:
        """The body of ``/health`` with its detail."""
        return {"status": self.status, "edge": self.edge, "kafka": self.kafka, "redis": self.redis,
                "services": self.services}  # fmt: skip


async def health_report(edge: Edge) -> HealthReport:
    """The full report (also read by ``/status.json``)."""
    kafka = _check_kafka(edge)
    redis, agents = await _check_redis(edge)
    by_service: dict[str, list[AgentInfo] | None] = {
        s: None if agents is None else [a for a in agents if a.service == s] for s in edge.settings.services
    }
    breaker = breaker_of(edge.redis)
    warming = breaker.transitions > 0 and breaker.seconds_in_state() < edge.settings.heartbeat_ttl_s
    services = {s: _service_view(a, warming and redis["ok"] is True) for s, a in by_service.items()}
    listening = edge.listener.running
    runners = edge.batch_runners
    statuses = {str(v["status"]) for v in services.values()}
    if not (listening and kafka["ok"]) or "down" in statuses:
        status, code = "down", 503
    elif not redis["ok"] or statuses - {"ok"} or (runners is not None and runners.failure is not None):
        status, code = "degraded", 200
    else:
        status, code = "ok", 200
    edge_view: dict[str, object] = {
        "id": edge.settings.edge_id,
        "reply_topic": edge.reply_topic,
        "listening": listening,
        "waiting": len(edge.router),
        "replies_dropped": edge.router.dropped,
        "replies_foreign": edge.router.foreign,
        "pending_async": edge.pending_async.total,
        **edge.load,
    }
    if runners is not None:
        edge_view["batch_runners"] = runners.state()
    return HealthReport(status, code, edge_view, kafka, redis, services)
