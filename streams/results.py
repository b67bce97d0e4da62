"""Kept results of asynchronous requests in Redis: their keys, and the one write both sides use.

An asynchronous request (``Prefer: respond-async`` or ``?wait=false`` at the edge, see
``api.async_requests``) carries ``RequestEvent.store_result_s``. Its reply is kept as the ``ReplyEvent``'s
JSON (orjson, never pickle; ``correlation_id`` removed) under ``{prefix}:result:{id}`` for that many
seconds, written by two independent paths:

* the agent, after the batch's replies are settled (``agents.loop.BatchProcessor.process``): this path
  keeps the result even when the edge that took the request is gone when the reply is produced (its reply
  topic is then read by nobody: a restarted edge reads from the end);
* the edge, when its reply listener hands it the reply (and at once for a cache hit at the edge): this path
  covers a Redis blip on the agent side.

Both write the same reply, so whichever lands last wins without changing the answer; a reply produced
again after at-least-once redelivery overwrites it with an equivalent one.

What can go wrong: ``store_replies`` never raises. A Redis failure (down, hanging, breaker open: every call
goes through ``streams.redis.guarded``, so it costs at most one bounded call) is logged and returned as the
number of replies not kept; the other path may still keep them. If both paths fail, ``GET /requests/{id}``
stays pending until the request's deadline and then answers 504 ``timeout``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import ReplyEvent
from streams.redis import guarded

log = logging.getLogger(__name__)


def result_key(prefix: str, request_id: str) -> str:
    """Where the reply of asynchronous request ``request_id`` is kept."""
    return f"{prefix}:result:{request_id}"


def pending_key(prefix: str, request_id: str) -> str:
    """The edge's marker of a pending asynchronous request (written before the request is produced)."""
    return f"{prefix}:pending:{request_id}"


def encode_result(reply: ReplyEvent) -> bytes:
    """The stored form of a reply: its JSON without the correlation id (which is the edge's secret)."""
    return orjson.dumps(reply.model_copy(update={"correlation_id": None}).model_dump(mode="json"))


def decode_result(value: bytes | str | None) -> ReplyEvent | None:
    """A stored reply, or None when absent or unreadable (written by an older schema)."""
    if value is None:
        return None
    try:
        return ReplyEvent.model_validate_json(value)
    except ValidationError:
        log.warning("unreadable kept result (%d bytes): treated as absent", len(value))
        return None


async def store_replies(redis: Redis, prefix: str, replies: Sequence[tuple[ReplyEvent, int]]) -> int:
    """Keep each ``(reply, ttl_s)`` under its ``result_key`` in one round trip, through the Redis breaker.

    Returns:
        How many replies were not kept (0, or all of them when Redis failed); the failure is logged.
    """
    if not replies:
        return 0

    async def write() -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for reply, ttl_s in replies:
                pipe.set(result_key(prefix, reply.id), encode_result(reply), ex=max(1, int(ttl_s)))
            await pipe.execute()

    try:
        await guarded(redis, write)
    except RedisError as exc:
        log.warning("could not keep %d asynchronous result(s) in Redis: %s", len(replies), exc)
        return len(replies)
    return 0
