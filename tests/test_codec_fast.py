"""The agent's cheap encode and reply paths write exactly what the full pydantic dump writes (pure, no I/O).

``streams.codec.encode`` writes an event model's own fields in one orjson pass; ``agents.loop.ok_reply`` builds a
successful reply without validating it again. Both must give the same bytes as ``model_dump(mode="json")`` of
a validated model, for every event model, and fall back to it when orjson cannot write a value as pydantic would.
"""

from __future__ import annotations

import random

import numpy as np
import orjson
import pytest

from agents.loop import ok_reply
from schemas import DeadLetterEvent, ErrorCode, ErrorInfo, ReplyEvent, RequestEvent
from schemas.events import DeadLetterSource, PartialBatchEvent, PartialDelta
from streams.cache import dedup_key
from streams.codec import encode


def full_dump(model: object) -> bytes:
    return orjson.dumps(model.model_dump(mode="json"))  # type: ignore[attr-defined]


EMBEDDING = [random.Random(7).uniform(-1, 1) for _ in range(384)] + [1e-7, 1 / 3, 0.0, -0.0, 1e300]

MODELS = [
    ReplyEvent(id="r-1", service="nlp", task="embed", ok=True, output={"embedding": EMBEDDING, "dim": 384},
               model="m@1", timings_ms={"queue_ms": 1.5, "batch_size": 32}),  # an int timing: validated to 32.0
    ReplyEvent(id="r-2", correlation_id="c-2", service="llm", task="completion", ok=False,
               error=ErrorInfo(code=ErrorCode.DEADLINE_EXCEEDED, message="late \u00e9\u4e2d \"quoted\"\n"),
               cached=True, timings_ms={}),
    ReplyEvent(id="r-3", service="data", task="analyze", ok=True, output={"nested": {"t": (1, 2), "n": None}}),
    DeadLetterEvent(service="nlp", error=ErrorInfo(code=ErrorCode.INVALID_JSON, message="x"),
                    source=DeadLetterSource(topic="t", partition=2, offset=9), key="k", payload="{",
                    payload_encoding="utf-8", payload_bytes=1, payload_sha256="ab", ts_ms=5),
    PartialBatchEvent(service="llm", task="completion",
                      deltas=[PartialDelta(id="a", attempt="x", seq=0, text="hi", tokens=1)]),
]  # fmt: skip


@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m).__name__)
def test_encode_writes_the_bytes_of_the_full_dump(model: object) -> None:
    assert encode(model) == full_dump(model)  # type: ignore[arg-type]


def test_encode_falls_back_to_the_full_dump_for_a_value_orjson_cannot_write() -> None:
    # A non-string key: orjson refuses it; pydantic writes it as a string. Same bytes either way.
    reply = ReplyEvent(id="r", service="data", task="analyze", ok=True, output={"counts": {1: 2}})
    assert encode(reply) == full_dump(reply)
    assert b'"1":2' in encode(reply)


def test_encode_of_a_model_outside_the_plain_ones_uses_the_full_dump() -> None:
    event = RequestEvent(id="q", task="embed", input={"text": "x"}, deadline_ms=5)
    assert encode(event) == full_dump(event)


def request(correlation_id: str | None = "c-1") -> RequestEvent:
    return RequestEvent(id="q-1", task="embed", input={"text": "hello"}, correlation_id=correlation_id)


@pytest.mark.parametrize("correlation_id", ["c-1", None])
def test_ok_reply_is_the_validated_reply(correlation_id: str | None) -> None:
    event = request(correlation_id)
    timings = {"queue_ms": 1.25, "inference_ms": 3.0, "batch_size": 32.0, "total_ms": 4.5}
    output: dict[str, object] = {"embedding": EMBEDDING, "dim": 384}
    built = ok_reply(event, "nlp", "m@1", output, timings)
    validated = ReplyEvent(id="q-1", correlation_id=correlation_id, service="nlp", task="embed", ok=True,
                           output=output, model="m@1", timings_ms=timings)  # fmt: skip
    assert built == validated
    assert encode(built) == full_dump(validated)


def test_ok_reply_validates_what_validation_would_change() -> None:
    # An int timing and a non-dict mapping are what validation converts: the reply goes through it.
    built = ok_reply(request(), "nlp", "m@1", {"v": np.float32(0.5).item()}, {"batch_size": 3})  # type: ignore[dict-item]
    assert built.timings_ms == {"batch_size": 3.0} and type(built.timings_ms["batch_size"]) is float
    assert encode(built) == full_dump(built)


def test_dedup_key_ignores_field_order_and_tells_inputs_apart() -> None:
    assert dedup_key("embed", {"a": 1, "b": [1, 2]}) == dedup_key("embed", {"b": [1, 2], "a": 1})
    assert dedup_key("embed", {"a": 1}) != dedup_key("sentiment", {"a": 1})
    assert dedup_key("embed", {"a": 1}) != dedup_key("embed", {"a": 2})
