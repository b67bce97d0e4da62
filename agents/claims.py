"""Claim-check resolution on the agent side: ``image_ref`` in an input becomes ``image_bytes``.

Used as the vision service's ``prepare`` step (see ``agents.loop.Prepare``): one Redis round trip for
the whole micro-batch. An item whose claim expired, was never written, or names a key outside this
deployment's claim space is answered ``claim_check_missing``; if Redis is down, those items are
answered ``claim_check_missing`` too (they cannot run), and the rest of the batch is unaffected. A
resolved item keeps everything else it had (its task and ``deadline_ms``).

``make_release`` deletes the claims a batch used. Call it only after the batch's replies were acknowledged
by the broker: a batch redelivered before that must still find its claims. A release that fails (Redis
down) is logged and dropped: the claims' TTL bounds the memory they hold.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agents.loop import Prepare
from agents.runner import Failure, Item
from schemas import ErrorCode
from streams.claimcheck import get_claims, release_claims
from streams.settings import Settings

log = logging.getLogger(__name__)

REF_FIELD = "image_ref"
BYTES_FIELD = "image_bytes"


def make_prepare(settings: Settings, redis: Redis) -> Prepare:
    """The vision agent's pre-step, bound to its Redis and topic prefix."""
    prefix = settings.topic_prefix

    async def prepare(items: Sequence[Item]) -> list[Item | Failure]:
        refs = [str(i.input[REF_FIELD]) for i in items if isinstance(i.input.get(REF_FIELD), str)]
        found: dict[str, bytes | None] = {}
        if refs:
            try:
                found = dict(zip(refs, await get_claims(redis, prefix, refs), strict=True))
            except RedisError as exc:
                log.warning("claim checks unreadable: %s", exc)
        out: list[Item | Failure] = []
        for item in items:
            ref = item.input.get(REF_FIELD)
            if not isinstance(ref, str):
                out.append(item)
                continue
            data = found.get(ref)
            if data is None:
                out.append(Failure(ErrorCode.CLAIM_CHECK_MISSING, f"image_ref {ref!r}: no such claim (expired?)"))
                continue
            rest = {k: v for k, v in item.input.items() if k != REF_FIELD}
            out.append(dataclasses.replace(item, input={**rest, BYTES_FIELD: data}))
        return out

    return prepare


Release = Callable[[Sequence[dict[str, object]]], Awaitable[None]]


def make_release(settings: Settings, redis: Redis) -> Release:
    """Deletes the claim checks named by ``image_ref`` in a batch's inputs (after its replies are acked)."""
    prefix = settings.topic_prefix

    async def release(inputs: Sequence[dict[str, object]]) -> None:
        refs = [ref for i in inputs if isinstance(ref := i.get(REF_FIELD), str)]
        if not refs:
            return
        try:
            await release_claims(redis, prefix, refs)
        except RedisError as exc:
            log.debug("claim checks not released (their TTL still bounds them): %s", exc)

    return release
