"""Cancellation of a request: the key the edge sets in Redis when nobody waits for the answer any more.

The edge sets ``cancel_key(prefix, request_id)`` (any value, with a TTL) when a streaming client
disconnects, or when it answers a request 504 (its deadline passed). Agents read the keys through the
Redis breaker, ``cancelled_ids`` being one ``MGET``:

* the batch path (``agents.loop``) reads the keys of a batch's requests once, before running it, and
  answers those whose key is set ``cancelled`` without running the model;
* the continuous LLM loop also checks the keys of its active rows (at most every 100 ms) and stops such a
  row, answering it ``cancelled``.

Redis away: no key is seen and the work runs to its end (its reply is then dropped by the edge); nothing
else changes. A cancel is advice, never a guarantee: work already running in a batch is not interrupted.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from streams.redis import guarded


def cancel_key(prefix: str, request_id: str) -> str:
    """The Redis key that asks the agents to stop working for ``request_id`` (the RequestEvent's id)."""
    return f"{prefix}:cancel:{request_id}"


async def cancelled_ids(redis: Redis, prefix: str, request_ids: Sequence[str]) -> set[str]:
    """Those of ``request_ids`` whose cancel key is set: one ``MGET`` through the Redis breaker.

    Raises:
        RedisError: Redis is away (``streams.redis.RedisUnavailable``) or answered an error; the caller
            treats it as "no cancels seen".
    """
    if not request_ids:
        return set()
    keys = [cancel_key(prefix, rid) for rid in request_ids]
    values = await guarded(redis, lambda: redis.mget(keys))
    return {rid for rid, value in zip(request_ids, values, strict=True) if value is not None}
