"""The agent reads a batch's cancel keys and cache entries in ONE Redis round trip (real Redis).

``BatchProcessor`` wired as the agent wires it (the result cache's client also reads the cancel keys): one
``MGET`` per batch answers the cancelled requests ``cancelled``, the cached ones from the cache, and runs the
rest; with Redis away, nothing is cancelled, everything is a miss and runs.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from agents.loop import BatchProcessor
from aisemble.pipeline import free_port, throwaway_prefix
from schemas import ErrorCode, ReplyEvent
from streams.cache import ResultCache
from streams.cancel import cancel_key
from streams.redis import connect
from streams.settings import Settings
from tests.test_agent_loop import EchoRunner, ListSink, record


def count_mgets(redis: Redis) -> list[int]:
    """Spy on the real client: the number of keys of each ``MGET`` it sends."""
    sizes: list[int] = []
    real: Callable[..., Awaitable[object]] = redis.mget

    async def mget(keys: list[str], *args: str) -> object:
        sizes.append(len(keys) + len(args))
        return await real(keys, *args)

    redis.mget = mget  # type: ignore[method-assign]
    return sizes


@pytest.mark.integration
async def test_cancels_and_cache_hits_of_a_batch_are_read_in_one_round_trip(infra_settings: Settings) -> None:
    prefix = throwaway_prefix()
    redis = connect(infra_settings)
    try:
        cache = ResultCache(redis, prefix)
        runner, sink = EchoRunner(), ListSink()
        proc = BatchProcessor("data", runner, sink, topic_prefix=prefix, cache=cache, cache_ttl_s=60)  # type: ignore[arg-type]
        cached = ReplyEvent(id="old", service="data", task="echo", ok=True, output={"y": 42}, model="echo@1")
        await cache.put_many([(cache.key("data", "echo", "echo@1", {"x": 21}), cached, 60)])
        await redis.set(cancel_key(prefix, "gone"), "attempt-1", px=10_000)
        mgets = count_mgets(redis)
        base = {"task": "echo", "reply_to": "me", "cache": True, "deadline_ms": int(time.time() * 1000) + 60_000}
        await proc.process(
            [
                record({"id": "gone", "correlation_id": "attempt-1", "input": {"x": 1}, **base}, 0),
                record({"id": "hit", "input": {"x": 21}, **base}, 1),
                record({"id": "miss", "input": {"x": 5}, **base}, 2),
            ]
        )
        assert mgets == [3 + 3], "one MGET: three cancel keys and three cache keys"
        replies = {r["id"]: ReplyEvent.model_validate(r) for r in sink.on("me")}
        assert replies["gone"].error is not None and replies["gone"].error.code == ErrorCode.CANCELLED
        assert replies["hit"].cached and replies["hit"].output == {"y": 42}
        assert replies["miss"].ok and not replies["miss"].cached and replies["miss"].output == {"y": 10}
        assert runner.calls == [1], "only the miss reached the model"
        assert proc.stats.cancelled == 1 and proc.stats.cache_hits == 1
    finally:
        await redis.aclose()


@pytest.mark.integration
async def test_with_redis_away_the_one_read_cancels_nothing_and_misses_everything(infra_settings: Settings) -> None:
    away = connect(infra_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    try:
        runner, sink = EchoRunner(), ListSink()
        proc = BatchProcessor("data", runner, sink, topic_prefix="p", cache=ResultCache(away, "p"), cache_ttl_s=60)  # type: ignore[arg-type]
        started = time.monotonic()
        await proc.process([record({"id": f"r{i}", "task": "echo", "input": {"x": i}, "reply_to": "me",
                                    "cache": True}, i) for i in range(3)])  # fmt: skip
        assert time.monotonic() - started < 10
        assert sorted(r["id"] for r in sink.on("me")) == ["r0", "r1", "r2"] and runner.calls == [3]
        assert proc.stats.cancelled == 0 and proc.stats.cache_hits == 0
    finally:
        await away.aclose()
