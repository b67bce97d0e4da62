"""Pure units: the circuit breaker (injected clock), the guarded Redis call, the heartbeat registry parser."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from streams.breaker import BreakerState, CircuitBreaker
from streams.redis import RedisUnavailable, attach_breaker, guarded
from streams.registry import PRUNE_AFTER, parse_agents


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_failures_in_a_row() -> None:
    clock = Clock()
    b = CircuitBreaker(3, 5.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.failure("timeout")
    assert b.state is BreakerState.CLOSED and b.consecutive_failures == 2
    b.success()  # a success in between resets the count
    for _ in range(2):
        b.failure("timeout")
    assert b.state is BreakerState.CLOSED
    b.failure("timeout")
    assert b.state is BreakerState.OPEN and b.last_error == "timeout"
    assert not b.allow()


def test_open_skips_for_reset_then_one_probe() -> None:
    clock = Clock()
    b = CircuitBreaker(1, 5.0, clock=clock)
    b.failure("refused")
    assert b.state is BreakerState.OPEN
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.2
    assert b.allow()  # the probe
    assert b.state is BreakerState.HALF_OPEN
    assert not b.allow() and not b.allow()  # only one probe at a time
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow()


def test_failed_probe_reopens_for_a_full_reset() -> None:
    clock = Clock()
    b = CircuitBreaker(3, 5.0, clock=clock)
    for _ in range(3):
        b.failure("x")
    clock.now += 5.0
    assert b.seconds_in_state() == 5.0
    assert b.allow()
    assert b.seconds_in_state() == 0.0
    b.failure("still down")  # one failure in half-open suffices
    assert b.state is BreakerState.OPEN
    clock.now += 4.0
    assert not b.allow()
    clock.now += 1.0
    assert b.allow()


def test_lost_probe_is_forgotten_after_reset_and_abandon_frees_it() -> None:
    clock = Clock()
    b = CircuitBreaker(1, 2.0, clock=clock)
    b.failure("x")
    clock.now += 2.0
    assert b.allow()  # probe that never reports
    clock.now += 1.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow()  # a new probe: never stuck half-open
    b.abandon()
    assert b.allow()  # cancelled probe frees the slot at once


def test_transitions_are_counted_once_each(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    b = CircuitBreaker(2, 1.0, clock=clock)
    with caplog.at_level("INFO", logger="streams.breaker"):
        for _ in range(10):
            b.failure("x")  # opens once; later failures while open change nothing
        clock.now += 1.0
        assert b.allow()
        for _ in range(5):
            b.success()
    assert b.transitions == 3  # closed -> open -> half_open -> closed
    assert len(caplog.records) == 3
    assert b.snapshot() == {"breaker": "closed", "consecutive_failures": 0, "last_error": None}


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError):
        CircuitBreaker(1, 0.0)


async def test_guarded_counts_outages_not_error_replies_and_skips_when_open() -> None:
    client = Redis.from_url("redis://127.0.0.1:9/0")  # never connected: every call below is a fake
    clock = Clock()
    guard = attach_breaker(client, failures=2, reset_s=5.0, timeout_s=0.05, clock=clock)
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise RedisConnectionError("refused")

    async def wrong_type() -> None:
        raise ResponseError("WRONGTYPE")

    async def hangs() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(10)

    async def fine() -> str:
        return "PONG"

    with pytest.raises(RedisUnavailable):
        await guarded(client, down)
    with pytest.raises(ResponseError):
        await guarded(client, wrong_type)  # Redis answered: resets the count
    assert guard.breaker.consecutive_failures == 0
    with pytest.raises(RedisUnavailable):
        await guarded(client, hangs)  # bounded by the outer timeout
    with pytest.raises(RedisUnavailable):
        await guarded(client, down)
    assert guard.breaker.state is BreakerState.OPEN and calls == 3
    for _ in range(5):
        with pytest.raises(RedisUnavailable) as info:
            await guarded(client, down)
        assert info.value.breaker == "open"
    assert calls == 3  # skipped without calling
    clock.now += 5.0
    assert await guarded(client, fine) == "PONG"
    assert guard.breaker.state is BreakerState.CLOSED


def _beat(worker: str, seen_ms: int, ttl_ms: int = 10_000, **extra: object) -> bytes:
    return orjson.dumps({"service": "data", "worker_id": worker, "seen_ms": seen_ms, "ttl_ms": ttl_ms, **extra})


def test_registry_parse_drops_stale_and_prunes_long_dead() -> None:
    now = 1_000_000
    raw: dict[bytes | str, bytes | str] = {
        b"fresh": _beat("fresh", now - 500, delivery="retrying", last_error="broker down", future_field=1),
        b"stale": _beat("stale", now - 10_001),
        b"dead": _beat("dead", now - 10_000 * PRUNE_AFTER - 1),
        b"junk": b"not json",
    }
    agents, prune = parse_agents(raw, now)
    assert [a.worker_id for a in agents] == ["fresh"]
    assert agents[0].delivery == "retrying" and agents[0].last_error == "broker down"
    assert sorted(prune) == [b"dead", b"junk"]


def test_health_service_view_rule() -> None:
    from api.routes.health import _service_view
    from streams.registry import AgentInfo

    ok = AgentInfo("data", "a")
    retrying = AgentInfo("data", "b", delivery="retrying", last_error="KafkaTimeoutError")
    assert _service_view([ok], warming=False)["status"] == "ok"
    degraded = _service_view([ok, retrying], warming=False)
    assert degraded["status"] == "degraded" and degraded["ok"] is False
    agents = degraded["agents"]
    assert isinstance(agents, list) and [a["delivery"] for a in agents] == ["ok", "retrying"]
    assert _service_view([], warming=False)["status"] == "down"
    assert _service_view([], warming=True)["status"] == "unknown"  # registry refilling after a Redis restart
    assert _service_view(None, warming=False) == {"ok": None, "status": "unknown", "agents": "unknown"}
