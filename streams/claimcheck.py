"""Claim checks: large payloads stored in Redis with a TTL, referenced from the event by key.

An image larger than ``vision.inline_max_bytes`` would not fit a Kafka message comfortably, so the edge
stores its bytes under ``{prefix}:claim:{uuid}`` (TTL ``vision.claim_ttl_s``) and the event carries the
key in ``image_ref``. The agent reads it back; a claim that expired or was never written is answered
``claim_check_missing``. Keys outside the prefix's claim space are refused (a client cannot make an
agent read, or delete, arbitrary Redis keys).

Memory is bounded twice: every claim has a TTL, and the agent deletes a claim (``release_claims``) once
the batch that used it has been answered and the replies acknowledged by the broker. Until then the claim
stays, so a redelivered batch still finds it.

Every call goes through the client's circuit breaker (``streams.redis.guarded``) and raises
:class:`streams.redis.RedisUnavailable` (a ``RedisError``) when Redis is down, hanging or skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from redis.asyncio import Redis

from streams.redis import guarded


def claim_prefix(prefix: str) -> str:
    return f"{prefix}:claim:"


async def put_claim(redis: Redis, prefix: str, data: bytes, ttl_s: int) -> str:
    """Store ``data`` with a TTL; returns the claim key.

    Raises:
        RedisError: not stored (``RedisUnavailable`` when Redis is down or the breaker is open).
    """
    key = f"{claim_prefix(prefix)}{uuid.uuid4().hex}"
    await guarded(redis, lambda: redis.set(key, data, ex=max(1, int(ttl_s))))
    return key


def is_claim_key(prefix: str, key: str) -> bool:
    rest = key.removeprefix(claim_prefix(prefix))
    return rest != key and len(rest) == 32 and all(c in "0123456789abcdef" for c in rest)


async def get_claims(redis: Redis, prefix: str, keys: list[str]) -> list[bytes | None]:
    """The stored bytes of each key (None when missing or not a claim key), in one round trip.

    Raises:
        RedisError: Redis could not be read (the caller answers those items ``claim_check_missing``).
    """
    valid = [k for k in keys if is_claim_key(prefix, k)]
    values = await guarded(redis, lambda: redis.mget(valid)) if valid else []
    found = {k: v.encode() if isinstance(v, str) else v for k, v in zip(valid, values, strict=True)}
    return [found.get(k) for k in keys]


async def release_claims(redis: Redis, prefix: str, keys: Iterable[str]) -> int:
    """Delete the claim keys among ``keys`` (others are ignored); returns how many existed.

    Raises:
        RedisError: not deleted (the TTL still bounds them).
    """
    valid = sorted({k for k in keys if is_claim_key(prefix, k)})
    if not valid:
        return 0
    deleted = await guarded(redis, lambda: redis.delete(*valid))
    return int(deleted)
