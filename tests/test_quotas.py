"""Per-key quotas below HTTP: the settings' key entries, the pure helpers (headers, durations, token estimate,
per-key counts), the ``limits`` library behaviour ``api.quota_store`` relies on (on the real Redis and in
memory), and ``QuotaStore`` itself: shared counters, crash-safe slots, and the memory fallback when Redis is away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from pydantic import SecretStr, ValidationError
from redis.asyncio import Redis

from aisemble.pipeline import free_port, throwaway_prefix
from api.auth import key_digests, owner_of
from api.quota_store import QuotaStore
from api.quotas import (
    KeyStats,
    Window,
    duration,
    estimate_tokens,
    prompt_tokens_estimate,
    rate_headers,
    retry_after_s,
    usage_tokens,
)
from streams.redis import connect
from streams.settings import ApiKey, Settings

SECRET = "s3cret-key-that-must-never-show"


# --- settings ----------------------------------------------------------------------------------------------


def test_plain_string_keys_stay_unlimited_keys_with_derived_names() -> None:
    settings = Settings(api_keys=["one", SecretStr("two")])  # type: ignore[list-item]
    assert [k.get_secret_value() for k in settings.api_keys] == ["one", "two"]
    assert [k.name for k in settings.api_keys] == ["key-0", "key-1"]
    assert not any(k.limited for k in settings.api_keys) and all(k.allows("vision") for k in settings.api_keys)


def test_object_keys_carry_their_quotas_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = {"key": SECRET, "name": "team-a", "rpm": 600, "tpm": 200000, "max_in_flight": 32, "services": ["nlp"]}
    monkeypatch.setenv("AISEMBLE_API_KEYS", json.dumps(["plain", entry]))
    keys = Settings().api_keys
    assert keys[0] == ApiKey(key=SecretStr("plain"), name="key-0")
    team = keys[1]
    assert (team.name, team.rpm, team.tpm, team.max_in_flight, team.services) == ("team-a", 600, 200000, 32, ("nlp",))
    assert team.limited and team.allows("nlp") and not team.allows("llm")
    assert SECRET not in repr(Settings()) and SECRET not in str(Settings().model_dump())


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"key": SECRET, "rpm": 0}, "api_keys.1.rpm"),
        ({"key": SECRET, "tpm": -5}, "api_keys.1.tpm"),
        ({"key": SECRET, "services": ["gpu"]}, "api_keys.1.services.0"),
        ({"key": SECRET, "bogus": SECRET}, "api_keys.1.bogus"),
        ({"key": SECRET, "name": "has space"}, "api_keys.1.name"),
        ([SECRET], "api_keys.1"),
    ],
)
def test_invalid_entries_name_their_index_never_the_key(entry: object, where: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(api_keys=["fine", entry])  # type: ignore[list-item]
    assert where in str(info.value) and SECRET not in str(info.value)


def test_key_names_must_be_unique() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(api_keys=[SECRET, {"key": SECRET + "2", "name": "key-0"}])  # type: ignore[list-item]
    assert "AISEMBLE_API_KEYS[1]" in str(info.value) and "'key-0'" in str(info.value)
    assert SECRET not in str(info.value)


# --- pure helpers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (-1, "0s"), (0.0201, "21ms"), (0.5, "500ms"), (1, "1s"), (1.2, "2s"), (59.5, "1m0s"),
     (60, "1m0s"), (360, "6m0s"), (61.5, "1m2s"), (3600, "1h0m0s"), (3723, "1h2m3s")],
)  # fmt: skip
def test_durations_in_openai_format(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_retry_after_is_whole_seconds_rounded_up_at_least_one() -> None:
    assert [retry_after_s(s) for s in (0, 0.2, 1, 1.01, 59.2)] == [1, 1, 1, 2, 60]


def test_rate_headers_only_for_the_limits_a_key_has() -> None:
    assert rate_headers(None, None) == []
    headers = dict(rate_headers(Window(5, 3, 12.5), None))
    assert headers == {
        b"x-ratelimit-limit-requests": b"5",
        b"x-ratelimit-remaining-requests": b"3",
        b"x-ratelimit-reset-requests": b"13s",
    }
    both = dict(rate_headers(Window(5, 0, 0), Window(1000, -3, 90)))
    assert both[b"x-ratelimit-remaining-tokens"] == b"0" and both[b"x-ratelimit-reset-tokens"] == b"1m30s"


def test_token_estimate_is_prompt_bytes_over_four_plus_max_tokens() -> None:
    assert [prompt_tokens_estimate(n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert estimate_tokens({"prompt": "abcdefgh", "max_tokens": 10}) == 12
    assert estimate_tokens({"prompt": "é" * 4, "max_tokens": 1}) == 3  # 8 UTF-8 bytes
    chat = {"messages": [{"role": "system", "content": "abcd"}, {"role": "user", "content": "abcde"}]}
    assert estimate_tokens({**chat, "max_tokens": 7}) == 1 + 2 + 7
    assert estimate_tokens({"prompt": ""}) == 100  # the schema's default max_tokens


def test_usage_is_prompt_plus_completion_tokens() -> None:
    assert usage_tokens({"text": "hi", "tokens": 5, "prompt_tokens": 30}) == 35
    assert usage_tokens({"tokens": 5}) == 5 and usage_tokens(None) == 0 and usage_tokens({"tokens": "x"}) == 0


def test_key_stats_count_by_name() -> None:
    stats = KeyStats(["a"])
    stats.request("a", "llm")
    stats.request("a", "llm")
    stats.request("b", "nlp")
    stats.tokens("a", 40)
    stats.tokens("a", 0)
    stats.limited("a", "rpm")
    snap = stats.snapshot()
    assert snap["a"] == {"requests": 2, "by_service": {"llm": 2}, "tokens": 40, "rate_limited": 1,
                         "by_limit": {"rpm": 1}}  # fmt: skip
    assert snap["b"]["requests"] == 1 and list(snap) == ["a", "b"]


# --- the limits library, as api.quota_store uses it -----------------------------------------------------


@pytest.fixture
async def redis(infra_settings: Settings) -> AsyncIterator[Redis]:
    client = connect(infra_settings)
    yield client
    await client.aclose()


def _storages(redis: Redis) -> dict[str, RedisStorage | MemoryStorage]:
    prefix = f"{throwaway_prefix(10)}:quota"
    pool = {"connection_pool": redis.connection_pool}
    return {
        "redis": RedisStorage("async+redis://pool:6379", implementation="redispy", key_prefix=prefix, **pool),
        "memory": MemoryStorage(),
    }


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_sliding_window_counter_at_its_boundary(redis: Redis, kind: str) -> None:
    # limits' sliding window counter keeps one counter per window aligned on the epoch (a minute here): hits
    # made just before a window ends are weighted down just after it, so "full now, resets later" is only true
    # away from a window's end (CI once crossed one mid-test: reset came out 8 us in the past)
    into_window = time.time() % 60
    if into_window > 50:
        await asyncio.sleep(60.5 - into_window)
    storage = _storages(redis)[kind]
    limiter = SlidingWindowCounterRateLimiter(storage)
    item = RateLimitItemPerMinute(3)
    ids = ("p", "rpm", uuid.uuid4().hex)
    reset, remaining = await limiter.get_window_stats(item, *ids)
    assert remaining == 3 and reset == pytest.approx(time.time(), abs=1)  # nothing used: resets now
    assert [await limiter.hit(item, *ids) for _ in range(4)] == [True, True, True, False]
    asked = time.time()
    reset, remaining = await limiter.get_window_stats(item, *ids)
    # The reset is never before the question, nor past two windows. It may be the question's own time: limits
    # takes the current window key's remaining TTL modulo the window, which is 0 when the key was written in the
    # same millisecond it is read (its full TTL, a multiple of the window); CI met that once. Retry-After is
    # still at least 1 s (api.quotas.retry_after_s).
    assert remaining == 0 and asked <= reset <= time.time() + 120
    assert not await limiter.test(item, *ids)
    # a hit that does not fit takes nothing; a cost larger than the limit is refused outright
    assert not await limiter.hit(item, *ids, cost=1)
    fresh = ("p", "tpm", uuid.uuid4().hex)
    assert not await limiter.hit(item, *fresh, cost=4)
    assert await limiter.hit(item, *fresh, cost=3)
    # the correction api.quota_store makes: a negative amount under a huge limit gives units back
    await storage.acquire_sliding_window_entry(item.key_for(*fresh), 2**40, item.get_expiry(), -2)
    assert (await limiter.get_window_stats(item, *fresh))[1] == 2
    await storage.acquire_sliding_window_entry(item.key_for(*fresh), 2**40, item.get_expiry(), 5)  # over, forced
    assert (await limiter.get_window_stats(item, *fresh))[1] == 0


# --- QuotaStore --------------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_store_shares_counts_through_redis(redis: Redis, infra_settings: Settings) -> None:
    prefix = throwaway_prefix()
    one = QuotaStore(redis, prefix, 30.0)
    two = QuotaStore(redis, prefix, 30.0)  # another edge
    verdicts = [await store.hit("team", "rpm", 3) for store in (one, two, one, two)]
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert [v.window.remaining for v in verdicts] == [2, 1, 0, 0]
    assert not one.degraded and not two.degraded
    window = await two.adjust("team", "tpm", 100, 30)
    assert window.remaining == 70 and (await one.peek("team", "tpm", 100)).remaining == 70


@pytest.mark.integration
async def test_slots_are_shared_released_and_expire_at_their_deadline(redis: Redis, infra_settings: Settings) -> None:
    prefix = throwaway_prefix()
    one = QuotaStore(redis, prefix, 0.6)
    two = QuotaStore(redis, prefix, 0.6)
    first = await one.acquire("team", 1)
    assert first is not None and first.shared
    assert await two.acquire("team", 1) is None  # held at the other edge
    await one.release(first)
    second = await two.acquire("team", 1)
    assert second is not None
    # an edge killed while holding it never releases it: the slot lapses at its deadline (0.6 s here)
    assert await one.acquire("team", 1) is None
    await asyncio.sleep(0.8)
    assert await one.acquire("team", 1) is not None


@pytest.mark.integration
async def test_redis_away_each_store_enforces_alone_in_memory_and_logs_once(
    infra_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    away = connect(infra_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    store = QuotaStore(away, "tq", 30.0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="api.quota_store"):
        verdicts = [await store.hit("team", "rpm", 2) for _ in range(3)]
        slot = await store.acquire("team", 1)
        assert slot is not None and not slot.shared
        assert await store.acquire("team", 1) is None
        await store.release(slot)
        assert await store.acquire("team", 1) is not None
    assert [v.allowed for v in verdicts] == [True, True, False] and store.degraded
    assert time.monotonic() - started < 10  # bounded: refused connections, then the open breaker
    outage_lines = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
    assert len(outage_lines) == 1
    await away.aclose()


def test_a_key_keeps_its_owner_id_whether_plain_or_with_quotas() -> None:
    plain = key_digests(Settings(api_keys=[SECRET]))  # type: ignore[list-item]
    named = key_digests(Settings(api_keys=[{"key": SECRET, "name": "team", "rpm": 5}]))  # type: ignore[list-item]
    assert plain == named and owner_of(plain[0]) == owner_of(named[0])  # kept results stay readable
