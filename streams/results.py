"""Kept results of asynchronous requests in Redis: their keys, their stored form, and the one write both sides use.

An asynchronous request (``Prefer: respond-async`` or ``?wait=false`` at the edge, see
``api.async_requests``) carries ``RequestEvent.store_result_s``. Its reply is kept under
``{prefix}:result:{id}`` for that many seconds, written by two independent paths:

* the agent, after the batch's replies are settled (``agents.loop.BatchProcessor.deliver``): this path
  keeps the result even when the edge that took the request is gone when the reply is produced (its reply
  topic is then read by nobody: a restarted edge reads from the end);
* the edge, when its reply listener hands it the reply (and at once for a cache hit at the edge): this path
  covers a Redis blip on the agent side.

The stored form is one byte, ``1`` for an ok reply and ``0`` for an error reply, then the ``ReplyEvent``'s
JSON (orjson, never pickle; ``correlation_id`` removed). A value without that byte (a bare JSON object, as
kept before it existed) is still read, as an error reply would be for the rule below.

The rule, held by one Lua script (``_KEEP``, atomic in Redis): **an ok result, once kept, is final**: no
later reply replaces it. At-least-once delivery runs a request again after a crash or a rebalance, and the
duplicate may find its deadline passed (``deadline_exceeded``) or its claim check gone
(``claim_check_missing``); it is dropped here instead of turning a 200 into a 504 or a 422. A duplicate ok
reply (the agent's and the edge's copies of one reply, or a re-run) is dropped too, so every ``GET`` that
answered 200 answers the same body (its timings included) for as long as the result is kept. An ok reply
replaces an error reply, and an error reply replaces an error reply (no answer to protect). The
script also keeps the request's pending marker (``pending_key``: its owner, its renderer) at least as long
as its result, so a result never outlives the marker that says whose it is.

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


OK_TAG, ERROR_TAG = b"1", b"0"  # the first byte of a stored result

# Keep one result unless an ok result is kept already (it is final); stretch the marker's TTL to the
# result's. KEYS: result, marker. ARGV: stored value, TTL s. Returns 1 (kept) or 0 (an ok result stays).
_KEEP = """
if string.sub(redis.call('GET', KEYS[1]) or '', 1, 1) == '1' then
  return 0
end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
local marker_ttl = redis.call('TTL', KEYS[2])
if marker_ttl >= 0 and marker_ttl < ttl then
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""


def encode_result(reply: ReplyEvent) -> bytes:
    """The stored form of a reply: its tag byte, then its JSON without the correlation id (the edge's secret)."""
    body = orjson.dumps(reply.model_copy(update={"correlation_id": None}).model_dump(mode="json"))
    return (OK_TAG if reply.ok else ERROR_TAG) + body


def decode_result(value: bytes | str | None) -> ReplyEvent | None:
    """A stored reply, or None when absent or unreadable (written by an older schema)."""
    if value is None:
        return None
    raw = value.encode() if isinstance(value, str) else value
    if raw[:1] in (OK_TAG, ERROR_TAG):
        raw = raw[1:]
    try:
        return ReplyEvent.model_validate_json(raw)
    except ValidationError:
        log.warning("unreadable kept result (%d bytes): treated as absent", len(raw))
        return None


async def store_replies(redis: Redis, prefix: str, replies: Sequence[tuple[ReplyEvent, int]]) -> int:
    """Keep each ``(reply, ttl_s)`` under its ``result_key`` in one round trip, through the Redis breaker; an ok
    result already kept is never replaced (see the module docstring).

    Returns:
        How many replies were not kept because Redis failed (0, or all of them); the failure is logged.
        A reply dropped because an ok result is kept counts as kept: the request has its answer.
    """
    if not replies:
        return 0

    async def write() -> list[object]:
        async with redis.pipeline(transaction=False) as pipe:
            for reply, ttl_s in replies:
                keys = (result_key(prefix, reply.id), pending_key(prefix, reply.id))
                pipe.eval(_KEEP, 2, *keys, encode_result(reply), max(1, int(ttl_s)))
            return list(await pipe.execute())

    try:
        kept = await guarded(redis, write)
    except RedisError as exc:
        log.warning("could not keep %d asynchronous result(s) in Redis: %s", len(replies), exc)
        return len(replies)
    for (reply, _), done in zip(replies, kept, strict=True):
        if not done:
            log.info("kept the ok result of %s; dropped a later %s reply", reply.id, _code(reply))
    return 0


def _code(reply: ReplyEvent) -> str:
    return reply.error.code if reply.error is not None else "ok"
