"""Pure units: event codec, dead letters, cache keys and policy, reply correlation."""

from __future__ import annotations

import asyncio
import base64

import orjson
import pytest

from schemas import ErrorCode, ReplyEvent
from streams.cache import cache_key, wants_cache
from streams.codec import BadEvent, dead_letter, decode_request
from streams.replies import DuplicateRequestIdError, ReplyRouter


def test_decode_valid_request_ignores_unknown_fields() -> None:
    raw = orjson.dumps({"id": "r1", "task": "analyze", "input": {"records": []}, "extra": 1})
    event = decode_request(raw)
    assert not isinstance(event, BadEvent)
    assert event.id == "r1" and event.reply_to is None and event.cache is None


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (None, ErrorCode.INVALID_EVENT),
        (b"\xff\xfe garbage", ErrorCode.INVALID_ENCODING),
        (b"{not json", ErrorCode.INVALID_JSON),
        (b"[1, 2]", ErrorCode.INVALID_JSON),
        (b'{"task": "x", "input": {}}', ErrorCode.INVALID_EVENT),
        (b'{"id": "", "task": "x", "input": {}}', ErrorCode.INVALID_EVENT),
        (b'{"id": "a", "task": "x", "input": {}, "reply_to": "bad topic!"}', ErrorCode.INVALID_EVENT),
        (orjson.dumps({"id": "x" * 129, "task": "t", "input": {}}), ErrorCode.INVALID_EVENT),
    ],
)
def test_decode_bad_events_say_why(raw: bytes | None, code: ErrorCode) -> None:
    result = decode_request(raw)
    assert isinstance(result, BadEvent)
    assert result.code == code
    assert result.message


def test_invalid_event_message_names_the_field() -> None:
    result = decode_request(b'{"id": "a", "input": {}}')
    assert isinstance(result, BadEvent) and "task" in result.message


def test_dead_letter_keeps_original_bytes_as_text_or_base64() -> None:
    text = dead_letter(
        "data",
        BadEvent(ErrorCode.INVALID_JSON, "nope"),
        topic="t",
        partition=1,
        offset=7,
        key=b"k",
        value=b"{x",
    )
    assert (text.payload, text.payload_encoding, text.source.offset) == ("{x", "utf-8", 7)
    binary = dead_letter(
        "data",
        BadEvent(ErrorCode.INVALID_ENCODING, "nope"),
        topic="t",
        partition=0,
        offset=0,
        key=None,
        value=b"\xff\x00",
    )
    assert binary.payload_encoding == "base64"
    assert base64.b64decode(binary.payload) == b"\xff\x00"
    assert binary.error.code == ErrorCode.INVALID_ENCODING


def test_cache_key_is_canonical_and_discriminating() -> None:
    a = cache_key("p", "nlp", "sentiment", "m@1", {"text": "hi", "normalize": True})
    b = cache_key("p", "nlp", "sentiment", "m@1", {"normalize": True, "text": "hi"})
    assert a == b and a.startswith("p:cache:nlp:")
    assert a != cache_key("p", "nlp", "sentiment", "m@2", {"text": "hi", "normalize": True})
    assert a != cache_key("p", "nlp", "embed", "m@1", {"text": "hi", "normalize": True})
    assert a != cache_key("p", "nlp", "sentiment", "m@1", {"text": "hi!", "normalize": True})


def test_cache_policy() -> None:
    assert wants_cache("data", "analyze", {}, None)
    assert not wants_cache("data", "analyze", {}, False)
    assert wants_cache("llm", "completion", {"prompt": "x", "temperature": 0}, None)
    assert wants_cache("llm", "completion", {"prompt": "x", "temperature": 0.7, "seed": 3}, None)
    assert not wants_cache("llm", "completion", {"prompt": "x", "temperature": 0.7}, None)
    assert wants_cache("llm", "completion", {"prompt": "x", "temperature": 0.7}, True)
    assert not wants_cache("llm", "completion", {"prompt": ""}, None)  # invalid input is never cached


def _reply(rid: str, correlation_id: str | None, service: str = "data", task: str = "analyze") -> ReplyEvent:
    return ReplyEvent(id=rid, correlation_id=correlation_id, service=service, task=task, ok=True, output={})  # type: ignore[arg-type]


async def test_router_answers_each_call_once_by_correlation_id_and_drops_the_rest() -> None:
    router = ReplyRouter()
    corr, future = router.expect("a", "data", "analyze")
    assert len(corr) >= 24  # unguessable: 18 random bytes
    with pytest.raises(DuplicateRequestIdError):
        router.expect("a", "data", "analyze")
    assert not router.resolve(_reply("a", None))  # the request id alone never resolves a call
    assert not router.resolve(_reply("a", "guess"))
    assert router.resolve(_reply("a", corr))
    assert (await future).id == "a"
    assert not router.resolve(_reply("a", corr))  # duplicate delivery
    assert router.dropped == 3 and router.foreign == 0 and len(router) == 0


async def test_router_drops_a_reply_from_another_service_or_request_and_keeps_waiting() -> None:
    router = ReplyRouter()
    corr, future = router.expect("a", "data", "analyze")
    assert not router.resolve(_reply("a", corr, service="nlp", task="embed"))
    assert not router.resolve(_reply("b", corr))
    assert router.foreign == 2 and not future.done()
    assert router.resolve(_reply("a", corr))


async def test_a_retry_with_the_same_request_id_never_gets_the_late_answer_of_the_first_call() -> None:
    router = ReplyRouter()
    first, _ = router.expect("same", "data", "analyze")
    router.forget(first)  # the first call timed out (504)
    second, future = router.expect("same", "data", "analyze")
    assert second != first
    assert not router.resolve(_reply("same", first))  # the late answer to the first call
    assert not future.done()
    assert router.resolve(_reply("same", second))


async def test_router_forget_then_late_reply_is_dropped() -> None:
    router = ReplyRouter()
    corr, future = router.expect("b", "data", "analyze")
    router.forget(corr)
    assert future.cancelled()
    assert not router.resolve(_reply("b", corr))


async def test_router_fail_all() -> None:
    router = ReplyRouter()
    futures = [router.expect(str(i), "data", "analyze")[1] for i in range(3)]
    router.fail_all(RuntimeError("bye"))
    for f in futures:
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(f, 1)
