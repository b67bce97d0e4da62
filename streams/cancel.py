"""Cancellation of a request: the key the edge sets in Redis when nobody waits for the answer any more.

The edge sets ``cancel_key(prefix, request_id)`` (with a TTL) when a streaming client disconnects, or when it
answers a request 504 (its deadline passed). The key is named by the request id, which a caller may choose
and use again (a retry after a 504 with the same ``X-Request-Id``); its value is the ``correlation_id`` of
the attempt that was given up, so a cancel stops that attempt and never the retry (``cancels``). Any other
value (``1``, what older edges wrote) cancels every attempt of the id. Agents read the keys through the
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

from schemas import RequestEvent
from streams.redis import guarded

ALL_ATTEMPTS = "1"  # a cancel value that stops every attempt of the id


def cancel_key(prefix: str, request_id: str) -> str:
    """The Redis key that asks the agents to stop working for ``request_id`` (the RequestEvent's id)."""
    return f"{prefix}:cancel:{request_id}"


def cancel_value(correlation_id: str | None) -> str:
    """What the edge stores under the cancel key: the given-up attempt's correlation id."""
    return correlation_id or ALL_ATTEMPTS


def cancels(value: bytes | str | None, correlation_id: str | None) -> bool:
    """Whether a cancel key holding ``value`` stops the attempt with ``correlation_id`` (see the module doc)."""
    if value is None:
        return False
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return text in (correlation_id, ALL_ATTEMPTS) or not text


async def cancelled_ids(redis: Redis, prefix: str, events: Sequence[RequestEvent]) -> set[str]:
    """The ids of those of ``events`` that are cancelled (``cancels``): one ``MGET`` through the Redis breaker.

    Raises:
        RedisError: Redis is away (``streams.redis.RedisUnavailable``) or answered an error; the caller
            treats it as "no cancels seen".
    """
    if not events:
        return set()
    keys = [cancel_key(prefix, e.id) for e in events]
    values = await guarded(redis, lambda: redis.mget(keys))
    return {e.id for e, value in zip(events, values, strict=True) if cancels(value, e.correlation_id)}
