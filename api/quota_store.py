"""Per-key quota counters: shared by every edge in Redis, kept per edge in memory while Redis is away.

Requests per minute and tokens per minute are counted by the ``limits`` library
(``SlidingWindowCounterRateLimiter``) over its async Redis storage, on the redis-py client the edge already has
(``implementation="redispy"``, the edge client's connection pool: no second client library, no coredis), under
``{prefix}:quota:`` keys. Why the sliding window counter, not the moving or the fixed window:

* a moving window keeps one list entry per unit counted: for ``tpm`` 200,000 that is a 200,000-entry list per
  key in Redis and a request of 1,000 tokens pushes 1,000 entries; the sliding window counter keeps two
  integers per key (this minute's and the last one's) whatever the limit;
* a fixed window lets a key spend its limit twice within a second around a window boundary (the end of one
  minute and the start of the next); the sliding window counter weighs the last minute's count by how much of
  it still overlaps the past 60 s, so a key gets about its limit in any 60 s.

The price: the count is an approximation when a key's traffic is uneven across minutes (the library's
documented trade-off), and the reset it reports is when the next unit frees, not when the key is back to full.

Concurrent requests (``max_in_flight``) are a Redis sorted set per key name of request tokens scored by their
deadline (Redis' own clock, ``TIME``): one Lua script prunes the expired, counts and adds in one round trip, so
an edge that is SIGKILLed holding slots leaks them only until their deadline (``request_timeout_s`` + a
margin), never forever; a release is one ``ZREM``.

When Redis is away (the edge client's breaker is open, or a call fails: ``streams.redis.guarded``), every
operation runs on this edge's own ``MemoryStorage`` and in-memory slot counts instead: each edge then enforces
the same limits alone (a key may get up to N times its limit across N edges meanwhile). The switch is logged
once per outage, and so is the return: the next call that reaches Redis uses it again (memory counts taken
during the outage are not carried back). A slot taken in memory is given back in memory; a Redis slot whose
release fails expires at its deadline.

Round trips for a limited key: an admission costs a hit and a window read per limit (``rpm``; ``tpm`` for the
LLM, charged by the route) and one for the slot, the limits run concurrently; the usage correction costs one
more. A key without quotas never reaches this module.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.quotas import WINDOW_S, Window
from streams.redis import guarded

log = logging.getLogger(__name__)

T = TypeVar("T")

STORAGE_URI = "async+redis://edge-pool:6379"  # parsed by limits; the connections are the edge pool's
FORCE_LIMIT = 2**40  # the "limit" of a correction: a charge the reply's usage says happened is never refused
SLOT_MARGIN_S = 10.0  # a slot outlives its request's deadline by this much before Redis forgets it

# KEYS[1]: the key's slot set. ARGV: member, limit, seconds the slot may live. Returns {taken 0/1, held}.
ACQUIRE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[2]) then
  return {0, held}
end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000))
return {1, held + 1}
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    """A hit's outcome: ``allowed`` and the window as it is after it."""

    allowed: bool
    window: Window


@dataclass(frozen=True, slots=True)
class Slot:
    """One concurrent-request slot of key ``name``: in Redis (``shared``) or in this edge's memory."""

    name: str
    member: str
    shared: bool


class QuotaStore:
    """The counters of every limited key (see the module docstring); one per edge."""

    def __init__(self, redis: Redis, prefix: str, slot_ttl_s: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.slot_ttl_s = slot_ttl_s
        # The library's storage runs on the edge client's connection pool (its address, credentials, timeouts):
        # the URI is only parsed by the library, never connected to.
        pool: dict[str, Any] = {"connection_pool": redis.connection_pool}
        self._shared = RedisStorage(STORAGE_URI, implementation="redispy", key_prefix=f"{prefix}:quota", **pool)
        self._local = MemoryStorage()
        self._limiters = {True: SlidingWindowCounterRateLimiter(self._shared),
                          False: SlidingWindowCounterRateLimiter(self._local)}  # fmt: skip
        self._acquire_slot = redis.register_script(ACQUIRE_SLOT)
        self._local_slots: dict[str, int] = {}
        self.degraded = False  # the last operation ran in memory (Redis away)

    # --- the Redis-or-memory switch ------------------------------------------------------------------------

    async def _run(self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``shared()`` through the Redis breaker, else ``local()``; returns the result and whether it was shared."""
        try:
            result = await guarded(self.redis, shared)
        except RedisError as exc:
            if not self.degraded:
                self.degraded = True
                log.warning(
                    "quotas: Redis unavailable (%s): each edge enforces the API key limits alone, in memory", exc
                )
            return await local(), False
        if self.degraded:
            self.degraded = False
            log.warning("quotas: Redis answers again: API key limits are shared by every edge again")
        return result, True

    # --- rpm and tpm -------------------------------------------------------------------------------------

    async def hit(self, name: str, kind: str, limit: int, cost: int = 1) -> Verdict:
        """Take ``cost`` units of key ``name``'s ``kind`` (``rpm``/``tpm``) limit, if they fit; the window after."""
        item = RateLimitItemPerMinute(limit)

        def take(shared: bool) -> Callable[[], Awaitable[Verdict]]:
            async def run() -> Verdict:
                limiter = self._limiters[shared]
                allowed = await limiter.hit(item, self.prefix, kind, name, cost=cost)
                return Verdict(allowed, _window(limit, await limiter.get_window_stats(item, self.prefix, kind, name)))

            return run

        verdict, _ = await self._run(take(True), take(False))
        return verdict

    async def adjust(self, name: str, kind: str, limit: int, delta: int) -> Window:
        """Charge (``delta`` > 0) or give back (< 0) units of a limit without refusing: the usage correction."""
        item = RateLimitItemPerMinute(limit)

        def move(shared: bool) -> Callable[[], Awaitable[Window]]:
            async def run() -> Window:
                limiter = self._limiters[shared]
                if delta:
                    storage = self._shared if shared else self._local
                    key = item.key_for(self.prefix, kind, name)
                    await storage.acquire_sliding_window_entry(key, FORCE_LIMIT, item.get_expiry(), delta)
                return _window(limit, await limiter.get_window_stats(item, self.prefix, kind, name))

            return run

        window, _ = await self._run(move(True), move(False))
        return window

    async def peek(self, name: str, kind: str, limit: int) -> Window:
        """The window of a limit, taking nothing (for an answer that counts for no limit)."""
        item = RateLimitItemPerMinute(limit)

        def read(shared: bool) -> Callable[[], Awaitable[Window]]:
            async def run() -> Window:
                return _window(limit, await self._limiters[shared].get_window_stats(item, self.prefix, kind, name))

            return run

        window, _ = await self._run(read(True), read(False))
        return window

    # --- max_in_flight -----------------------------------------------------------------------------------

    def _slots_key(self, name: str) -> str:
        return f"{self.prefix}:quota:inflight:{name}"

    async def acquire(self, name: str, limit: int) -> Slot | None:
        """A concurrent-request slot of key ``name`` (at most ``limit`` held), or None at the limit."""
        member = uuid.uuid4().hex

        async def shared() -> bool:
            taken, _held = await self._acquire_slot(keys=[self._slots_key(name)], args=[member, limit, self.slot_ttl_s])
            return bool(taken)

        async def local() -> bool:
            held = self._local_slots.get(name, 0)
            if held >= limit:
                return False
            self._local_slots[name] = held + 1
            return True

        taken, in_redis = await self._run(shared, local)
        return Slot(name, member, in_redis) if taken else None

    async def release(self, slot: Slot) -> None:
        """Give ``slot`` back (a Redis slot whose release fails expires at its deadline)."""
        if not slot.shared:
            held = self._local_slots.get(slot.name, 0)
            if held <= 1:
                self._local_slots.pop(slot.name, None)
            else:
                self._local_slots[slot.name] = held - 1
            return
        try:
            await guarded(self.redis, lambda: self.redis.zrem(self._slots_key(slot.name), slot.member))
        except RedisError as exc:
            log.info("quotas: could not release a slot of %s (%s); it expires at its deadline", slot.name, exc)


def _window(limit: int, stats: tuple[float, int]) -> Window:
    """A ``Window`` from the library's ``WindowStats`` (reset time as epoch seconds, remaining)."""
    reset_at, remaining = stats
    return Window(limit, max(int(remaining), 0), min(max(reset_at - time.time(), 0.0), float(WINDOW_S * 2)))
