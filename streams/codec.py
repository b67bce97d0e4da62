"""Reading and writing events as bytes, with the reason when an event cannot be read.

``decode_request`` never raises: it returns the ``RequestEvent`` or a ``BadEvent`` saying why the bytes
are not one (the reason becomes the dead-letter event). JSON goes through orjson; nothing is pickled.

``encode`` writes an event model as the JSON ``model_dump(mode="json")`` gives, in one orjson pass over the
model's own fields (``PLAIN_MODELS``: the event models, whose fields are JSON values already, validated on
construction) instead of a dump to a new dict first: for an embedding reply (384 floats) that is several times
cheaper. A model or value orjson cannot write as is (a numpy scalar in an output, a non-string key) falls back
to ``model_dump(mode="json")``, so the bytes are the same either way (``tests/test_codec_fast.py``).
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass

import orjson
from pydantic import BaseModel, ValidationError

from schemas import DeadLetterEvent, DeadLetterSource, ErrorCode, ErrorInfo, RequestEvent, Service
from schemas.events import PartialBatchEvent, PartialDelta, ReplyEvent

# Models whose fields are all plain JSON values once validated (no aliases, serializers or computed fields):
# ``encode`` writes their ``__dict__`` as is.
PLAIN_MODELS: frozenset[type[BaseModel]] = frozenset(
    {ReplyEvent, ErrorInfo, DeadLetterEvent, DeadLetterSource, PartialBatchEvent, PartialDelta}
)


@dataclass(frozen=True, slots=True)
class BadEvent:
    """Why a record's value is not a readable request."""

    code: ErrorCode
    message: str


def decode_request(value: bytes | None) -> RequestEvent | BadEvent:
    """Parse a request topic record's value."""
    if value is None:
        return BadEvent(ErrorCode.INVALID_EVENT, "value is null (tombstone)")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadEvent(ErrorCode.INVALID_ENCODING, f"value is not UTF-8: {exc.reason} at byte {exc.start}")
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return BadEvent(ErrorCode.INVALID_JSON, f"value is not JSON: {exc}")
    if not isinstance(data, dict):
        return BadEvent(ErrorCode.INVALID_JSON, f"value is JSON {type(data).__name__}, not an object")
    try:
        return RequestEvent.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'event'}: {e['msg']}" for e in exc.errors()[:5])
        return BadEvent(ErrorCode.INVALID_EVENT, f"not a request event: {details}")


def _plain(value: object) -> object:
    if type(value) in PLAIN_MODELS:
        return value.__dict__
    raise TypeError(f"{type(value).__name__} is not written as is")


def encode(model: BaseModel) -> bytes:
    """A model as compact UTF-8 JSON: the bytes of ``orjson.dumps(model.model_dump(mode="json"))``."""
    if type(model) in PLAIN_MODELS:
        try:
            return orjson.dumps(model.__dict__, default=_plain)
        except TypeError:
            pass  # a value orjson does not write as pydantic would: the full dump below
    return orjson.dumps(model.model_dump(mode="json"))


# Room for the envelope around the payload (reason, source, key, timestamps): a bound, not an estimate.
_ENVELOPE_ROOM = 8 * 1024


def dead_letter(
    service: Service,
    reason: BadEvent | ErrorInfo,
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    max_bytes: int = 1024 * 1024,
) -> DeadLetterEvent:
    """The dead-letter event for a record, carrying its original bytes (text when UTF-8, else base64).

    It always fits ``max_bytes`` when encoded: an original too large to carry is cut to a prefix
    (``truncated: true``), and the letter keeps its size and SHA-256 either way, so an operator can match it
    with the record still on the source topic at ``source``'s partition and offset.
    """
    raw = value or b""
    try:
        payload, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    budget = max(0, max_bytes - _ENVELOPE_ROOM)
    truncated = False
    if len(payload.encode("utf-8")) * 2 > budget:  # JSON escaping can double a text's size
        truncated = True
        prefix = raw[: max(0, budget // 4)]  # base64 of n bytes is 4n/3; text escapes at most 2x
        payload, encoding = base64.b64encode(prefix).decode("ascii"), "base64"
    error = reason if isinstance(reason, ErrorInfo) else ErrorInfo(code=reason.code, message=reason.message)
    return DeadLetterEvent(
        service=service,
        error=ErrorInfo(code=error.code, message=error.message[:2000]),
        source=DeadLetterSource(topic=topic, partition=partition, offset=offset),
        key=key[:256].decode("utf-8", "replace") if key is not None else None,
        payload=payload,
        payload_encoding=encoding,  # type: ignore[arg-type]
        payload_bytes=len(raw),
        payload_sha256=hashlib.sha256(raw).hexdigest(),
        truncated=truncated,
        ts_ms=int(time.time() * 1000),
    )


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record, independent of the client library that read it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()  # read only while tracing is on (streams.tracing): else empty
