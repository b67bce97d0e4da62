"""The kept results of asynchronous requests (``streams.results``) against the real Redis.

The rule under test: an ok result, once kept, is never replaced by an error reply, whichever path writes
it (the agent's ``store_replies`` after settling, or the edge's own copy in ``api.async_requests``: both
call ``store_replies``). A redelivered duplicate that finds its deadline passed (``deadline_exceeded``) or
its claim check gone (``claim_check_missing``) must not turn the 200 of ``GET /requests/{id}`` into a 504
or a 422. Nor by a later ok reply: the first ok result is final, so every 200 answers the same body. An ok
reply replaces an error reply, and an error reply an error reply.
Also: the result's stored form (tag byte + JSON), a bare JSON value still read, and the pending marker kept
at least as long as its result.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

from aisemble.pipeline import throwaway_prefix
from api.async_requests import Pending, lookup
from schemas import ErrorCode, ErrorInfo, ReplyEvent
from streams.redis import connect
from streams.results import decode_result, encode_result, pending_key, result_key, store_replies
from streams.settings import Settings

pytestmark = pytest.mark.integration

TTL_S = 60


def _ok(rid: str, value: int = 1) -> ReplyEvent:
    return ReplyEvent(id=rid, service="vision", task="describe", ok=True, output={"value": value})


def _error(rid: str, code: str) -> ReplyEvent:
    return ReplyEvent(id=rid, service="vision", task="describe", ok=False, error=ErrorInfo(code=code, message=code))


@pytest.fixture
async def store(infra_settings: Settings) -> AsyncIterator[SimpleNamespace]:
    prefix = throwaway_prefix()
    settings = infra_settings.model_copy(update={"topic_prefix": prefix, "request_timeout_s": 5.0})
    client = connect(settings)
    try:
        yield SimpleNamespace(settings=settings, redis=client, prefix=prefix)
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def _kept(store: SimpleNamespace, rid: str) -> ReplyEvent | None:
    return decode_result(await store.redis.get(result_key(store.prefix, rid)))


@pytest.mark.parametrize("code", [ErrorCode.DEADLINE_EXCEEDED, ErrorCode.CLAIM_CHECK_MISSING])
async def test_a_later_error_reply_never_replaces_an_ok_result(store: SimpleNamespace, code: str) -> None:
    rid = uuid.uuid4().hex
    marker = Pending(service="vision", task="describe", deadline_ms=int(time.time() * 1000) - 60_000)
    await store.redis.set(pending_key(store.prefix, rid), marker.model_dump_json(), ex=TTL_S)
    assert await store_replies(store.redis, store.prefix, [(_ok(rid), TTL_S)]) == 0
    before = (await lookup(store, rid)).status_code  # type: ignore[arg-type]
    # the redelivered duplicate, from the agent and again from the edge's own copy: both are dropped
    assert await store_replies(store.redis, store.prefix, [(_error(rid, code), TTL_S)]) == 0
    assert await store_replies(store.redis, store.prefix, [(_error(rid, code), TTL_S), (_ok(rid + "x"), TTL_S)]) == 0
    kept = await _kept(store, rid)
    assert kept is not None and kept.ok and kept.output == {"value": 1}
    after = await lookup(store, rid)  # type: ignore[arg-type]
    assert before == after.status_code == 200, after.body


async def test_an_ok_reply_replaces_an_error_and_the_first_ok_result_is_final(store: SimpleNamespace) -> None:
    rid = uuid.uuid4().hex
    await store_replies(store.redis, store.prefix, [(_error(rid, ErrorCode.DEADLINE_EXCEEDED), TTL_S)])
    first = await _kept(store, rid)
    assert first is not None and not first.ok
    await store_replies(store.redis, store.prefix, [(_ok(rid, 1), TTL_S)])
    stored = await store.redis.get(result_key(store.prefix, rid))
    # the edge's copy of the same reply (its own timings) and a re-run's: neither changes what GET answers
    edge_copy = _ok(rid, 1).model_copy(update={"timings_ms": {"edge_ms": 12.5}})
    assert await store_replies(store.redis, store.prefix, [(edge_copy, TTL_S), (_ok(rid, 2), TTL_S)]) == 0
    kept = await _kept(store, rid)
    assert kept is not None and kept.ok and kept.output == {"value": 1} and kept.timings_ms == {}
    assert await store.redis.get(result_key(store.prefix, rid)) == stored
    # an error reply over an error reply: the last one wins (no ok answer to protect)
    other = uuid.uuid4().hex
    await store_replies(store.redis, store.prefix, [(_error(other, ErrorCode.CLAIM_CHECK_MISSING), TTL_S)])
    await store_replies(store.redis, store.prefix, [(_error(other, ErrorCode.DEADLINE_EXCEEDED), TTL_S)])
    last = await _kept(store, other)
    assert last is not None and last.error is not None and last.error.code == ErrorCode.DEADLINE_EXCEEDED


async def test_concurrent_writers_keep_the_ok_result(store: SimpleNamespace) -> None:
    """The agent's and the edge's writes race: whatever the order, the ok result stays once written."""
    ids = [uuid.uuid4().hex for _ in range(10)]
    writes = []
    for rid in ids:
        writes.append(store_replies(store.redis, store.prefix, [(_ok(rid), TTL_S)]))
        writes.extend(store_replies(store.redis, store.prefix, [(_error(rid, ErrorCode.DEADLINE_EXCEEDED), TTL_S)])
                      for _ in range(3))  # fmt: skip
    await asyncio.gather(*writes)
    kept = [await _kept(store, rid) for rid in ids]
    assert all(k is not None and k.ok for k in kept)


async def test_stored_form_and_a_bare_json_value(store: SimpleNamespace) -> None:
    rid = uuid.uuid4().hex
    reply = _ok(rid).model_copy(update={"correlation_id": "secret-correlation"})
    stored = encode_result(reply)
    assert stored[:1] == b"1" and b"secret-correlation" not in stored
    assert encode_result(_error(rid, ErrorCode.TIMEOUT))[:1] == b"0"
    assert decode_result(stored) == reply.model_copy(update={"correlation_id": None})
    assert decode_result(_ok(rid).model_dump_json()) == _ok(rid)  # a value kept without the tag byte
    assert decode_result(b"1{not json") is None and decode_result(None) is None


async def test_the_marker_lives_at_least_as_long_as_its_result(store: SimpleNamespace) -> None:
    rid = uuid.uuid4().hex
    marker = Pending(service="vision", task="describe", deadline_ms=int(time.time() * 1000) + 60_000)
    await store.redis.set(pending_key(store.prefix, rid), marker.model_dump_json(), ex=5)
    await store_replies(store.redis, store.prefix, [(_ok(rid), 600)])
    assert 590 <= await store.redis.ttl(pending_key(store.prefix, rid)) <= 600
    assert 590 <= await store.redis.ttl(result_key(store.prefix, rid)) <= 600
    await store_replies(store.redis, store.prefix, [(_ok(uuid.uuid4().hex), 600)])  # no marker: none is made
    assert await store.redis.exists(pending_key(store.prefix, "nobody")) == 0


async def test_a_redis_failure_is_counted_not_raised(infra_settings: Settings) -> None:
    from aisemble.pipeline import free_port

    settings = infra_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    client = connect(settings)
    try:
        replies = [(_ok("a"), TTL_S), (_error("b", ErrorCode.TIMEOUT), TTL_S)]
        assert await store_replies(client, "p", replies) == 2
    finally:
        await client.aclose()
