"""The Redis result cache: keys, policy and a small async wrapper that degrades to a miss.

* Key: ``{prefix}:cache:{service}:{sha256(canonical JSON of [service, task, model, input])}``. The model
  name carries its version, so a new model never serves an old model's results.
* Value: the successful ``ReplyEvent`` as JSON (orjson), never pickle; error replies are not cached.
* Policy (``wants_cache``): ``cache: false`` bypasses, ``cache: true`` always uses it, and absent means
  "cache what is reproducible": everything except sampled LLM completions without a seed.
* A Redis failure is treated as a miss (read) or skipped (write): the cache speeds requests up, it never
  fails them. Every call goes through the client's circuit breaker (``streams.redis.guarded``): a hanging
  Redis costs at most ``redis_breaker_failures`` socket timeouts, then calls are skipped at once until a
  probe succeeds. Failures are logged by the breaker once per state change, not per request.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import ReplyEvent, Service
from schemas.llm import CompletionInput
from streams.redis import guarded

log = logging.getLogger(__name__)


def cache_key(prefix: str, service: str, task: str, model: str, payload: Mapping[str, object]) -> str:
    """The cache key of one request; equal inputs give equal keys whatever their field order."""
    canonical = orjson.dumps([service, task, model, payload], option=orjson.OPT_SORT_KEYS)
    return f"{prefix}:cache:{service}:{hashlib.sha256(canonical).hexdigest()}"


def dedup_key(task: str, payload: Mapping[str, object]) -> bytes:
    """What makes two requests of one service and batch the same (the model is the task's, fixed while the
    process runs): the canonical JSON of ``[task, input]``, unhashed. Only compared within a batch, never
    stored, so it needs no digest (a cache key's SHA-256 costs more than the comparison it saves)."""
    return orjson.dumps([task, payload], option=orjson.OPT_SORT_KEYS)


def wants_cache(service: Service, task: str, payload: Mapping[str, object], flag: bool | None) -> bool:
    """Whether a request may be answered from, and written to, the cache."""
    if flag is not None:
        return flag
    if service == "llm":
        try:
            return CompletionInput.model_validate(payload).reproducible
        except ValidationError:
            return False
    return True


class ResultCache:
    """Cached replies in Redis; every method swallows Redis errors and reports a miss."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self.prefix = prefix

    @property
    def redis(self) -> Redis:
        """The client this cache uses (its breaker guards every call made through ``streams.redis.guarded``)."""
        return self._redis

    def key(self, service: str, task: str, model: str, payload: Mapping[str, object]) -> str:
        return cache_key(self.prefix, service, task, model, payload)

    async def get_many(self, keys: Sequence[str]) -> list[ReplyEvent | None]:
        """The cached replies of ``keys``, None for a miss (or for any Redis error)."""
        if not keys:
            return []
        try:
            raw = await guarded(self._redis, lambda: self._redis.mget(list(keys)))
        except RedisError as exc:
            log.debug("cache read failed, treating as miss: %s", exc)
            return [None] * len(keys)
        return self.parse(raw)

    @staticmethod
    def parse(raw: Sequence[bytes | str | None]) -> list[ReplyEvent | None]:
        """Cached values as read from Redis (``MGET``) -> replies; None for a miss or an unreadable value."""
        out: list[ReplyEvent | None] = []
        for value in raw:
            try:
                out.append(ReplyEvent.model_validate_json(value) if value is not None else None)
            except ValidationError:
                out.append(None)  # written by an older schema: a miss, overwritten on the next write
        return out

    async def get(self, key: str) -> ReplyEvent | None:
        return (await self.get_many([key]))[0]

    async def put_many(self, entries: Sequence[tuple[str, ReplyEvent, int]]) -> None:
        """Store ``(key, reply, ttl_s)`` entries in one round trip; a failure is logged, not raised."""
        if not entries:
            return

        async def write() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, reply, ttl in entries:
                    pipe.set(key, orjson.dumps(reply.model_dump(mode="json")), ex=max(1, int(ttl)))
                await pipe.execute()

        try:
            await guarded(self._redis, write)
        except RedisError as exc:
            log.debug("cache write failed, continuing without it: %s", exc)
