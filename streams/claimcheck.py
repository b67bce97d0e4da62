"""Claim checks: large payloads stored in Redis with a TTL, referenced from the event by key.

An image larger than ``vision.inline_max_bytes`` would not fit a Kafka message comfortably, so the edge
stores its bytes under ``{prefix}:claim:{uuid}`` (TTL ``vision.claim_ttl_s``) and the event carries the
key in ``image_ref``. The agent reads it back; a claim that expired or was never written is answered
``claim_check_missing``. Keys outside the prefix's claim space are refused (a client cannot make an
agent read arbitrary Redis keys).
"""

from __future__ import annotations

import uuid

from redis.asyncio import Redis


def claim_prefix(prefix: str) -> str:
    return f"{prefix}:claim:"


async def put_claim(redis: Redis, prefix: str, data: bytes, ttl_s: int) -> str:
    """Store ``data``; returns the claim key."""
    key = f"{claim_prefix(prefix)}{uuid.uuid4().hex}"
    await redis.set(key, data, ex=ttl_s)
    return key


def is_claim_key(prefix: str, key: str) -> bool:
    rest = key.removeprefix(claim_prefix(prefix))
    return rest != key and len(rest) == 32 and all(c in "0123456789abcdef" for c in rest)


async def get_claims(redis: Redis, prefix: str, keys: list[str]) -> list[bytes | None]:
    """The stored bytes of each key (None when missing or not a claim key), in one round trip."""
    valid = [k for k in keys if is_claim_key(prefix, k)]
    values: list[bytes | None] = await redis.mget(valid) if valid else []  # type: ignore[assignment]  # bytes
    found = dict(zip(valid, values, strict=True))
    return [found.get(k) for k in keys]
