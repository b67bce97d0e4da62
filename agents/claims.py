"""Claim-check resolution on the agent side: ``image_ref`` in an input becomes ``image_bytes``.

Used as the vision service's ``prepare`` step (see ``agents.loop.Prepare``): one Redis round trip for
the whole micro-batch. An item whose claim expired, was never written, or names a key outside this
deployment's claim space is answered ``claim_check_missing``; if Redis is down, those items are
answered ``claim_check_missing`` too (they cannot run), and the rest of the batch is unaffected.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agents.loop import Prepare
from agents.runner import Failure, Item
from schemas import ErrorCode
from streams.claimcheck import get_claims
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
            out.append(Item(item.task, {**rest, BYTES_FIELD: data}))
        return out

    return prepare
