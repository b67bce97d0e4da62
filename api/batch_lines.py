"""The Batch API's pure core: input lines -> work or error lines, replies -> output lines, state transitions.

Nothing here does I/O (``api.batch_runner`` drives it over Kafka), so every rule is a unit test away.

* ``parse_lines``: each non-blank line of an input file must be ``{"custom_id", "method": "POST", "url",
  "body"}`` with ``url`` the batch's endpoint; its ``body`` is validated exactly as the synchronous route
  validates it (``api.openai.validate``, ``resolve_model``, ``to_input``). A line the route would answer 4xx
  becomes an error line carrying that answer (``response.status_code`` and OpenAI's error body); a line
  that is no request at all (not JSON, no ``custom_id``, wrong ``method``/``url``, a repeated ``custom_id``)
  becomes an error line with ``response: null`` and ``error: {code, message}``. A bad line never fails the
  batch.
* ``render_reply``: a line's ``ReplyEvent`` -> its output line, the body exactly what the synchronous route
  returns (``api.openai.chat_response`` / ``completion_response`` / ``embedding_response``), or, for an
  error reply, the route's error status and OpenAI error body (``api.errors.reply_error``).
* ``advance``: the status machine, validating -> in_progress -> finalizing -> completed, with failed,
  expired, cancelling -> cancelled on the way; anything else is a ``ValueError`` (a bug).
* ``batch_object`` / ``file_object``: the OpenAI shapes of a stored batch or file.

Request ids: line ``n`` (1-based, counting blank lines too) of batch ``b`` is request ``{b}-{n}``, so a line
produced twice (a runner restarted) is one request: the agents' dedup and cache see the same id and input,
and the runner keeps the first reply per line.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import orjson

from api.errors import EdgeError, InvalidJsonError, openai_body, openai_status, reply_error
from api.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_response,
    completion_response,
    embedding_response,
    resolve_model,
    to_input,
    validate,
)
from schemas import ReplyEvent, Service
from schemas.batch import BatchCancel, BatchState, BatchStatus, StoredFile

Kind = Literal["chat", "completion", "embeddings"]
# endpoint -> (service, task, kind)
ENDPOINTS: dict[str, tuple[Service, str, Kind]] = {
    "/v1/chat/completions": ("llm", "chat", "chat"),
    "/v1/completions": ("llm", "completion", "completion"),
    "/v1/embeddings": ("nlp", "embed", "embeddings"),
}
MAX_CUSTOM_ID = 512
TERMINAL: frozenset[BatchStatus] = frozenset({"completed", "failed", "expired", "cancelled"})
TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    "validating": frozenset({"in_progress", "failed", "cancelling", "expired"}),
    "in_progress": frozenset({"finalizing", "cancelling", "expired", "failed"}),
    "finalizing": frozenset({"completed", "failed"}),
    "cancelling": frozenset({"cancelled"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "expired": frozenset(),
    "cancelled": frozenset(),
}
STAMP: dict[BatchStatus, str] = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}


@dataclass(frozen=True, slots=True)
class LineWork:
    """A valid line: what to produce for it, and how to render its reply."""

    line: int
    custom_id: str
    service: Service
    task: str
    payload: dict[str, object]
    kind: Kind
    model: str
    encoding: Literal["float", "base64"] = "float"


@dataclass(frozen=True, slots=True)
class LineError:
    """A line answered without running it: its output line (for the error file)."""

    line: int
    custom_id: str | None
    output: dict[str, object]


def request_id(batch_id: str, line: int) -> str:
    return f"{batch_id}-{line}"


def line_of(batch_id: str, rid: str) -> int | None:
    """The line number of request id ``rid`` of ``batch_id``; None for a foreign id."""
    head, _, tail = rid.rpartition("-")
    return int(tail) if head == batch_id and tail.isdigit() else None


def output_line(
    batch_id: str, line: int, custom_id: str | None, status: int | None, body: object, error: object = None
) -> dict[str, object]:
    """One line of an output or error file, in OpenAI's shape."""
    response = None if status is None else {"status_code": status, "request_id": request_id(batch_id, line),
                                            "body": body}  # fmt: skip
    return {"id": f"batch_req_{batch_id.removeprefix('batch_')}_{line}", "custom_id": custom_id,
            "response": response, "error": error}  # fmt: skip


def _refused(batch_id: str, line: int, custom_id: str | None, code: str, message: str) -> LineError:
    return LineError(line, custom_id, output_line(batch_id, line, custom_id, None, None,
                                                  {"code": code, "message": f"line {line}: {message}"}))  # fmt: skip


def _routed_error(batch_id: str, line: int, custom_id: str, exc: EdgeError) -> LineError:
    return LineError(line, custom_id, output_line(batch_id, line, custom_id, openai_status(exc), openai_body(exc)))


def parse_line(
    batch_id: str, line: int, raw: bytes, endpoint: str, models: Mapping[str, Mapping[str, str]]
) -> LineWork | LineError:
    """One input line (see the module docstring)."""
    service, task, kind = ENDPOINTS[endpoint]
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _refused(batch_id, line, None, "invalid_json", f"not valid JSON ({exc})")
    if not isinstance(obj, dict):
        return _refused(batch_id, line, None, "invalid_request", "a line must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        return _refused(batch_id, line, None, "invalid_request",
                        f"'custom_id' must be a string of 1 to {MAX_CUSTOM_ID} characters")  # fmt: skip
    if obj.get("method") != "POST":
        return _refused(batch_id, line, custom_id, "invalid_request", "'method' must be \"POST\"")
    if obj.get("url") != endpoint:
        message = f"'url' must be the batch's endpoint {endpoint!r}, not {obj.get('url')!r}"
        return _refused(batch_id, line, custom_id, "invalid_url", message)
    extra = set(obj) - {"custom_id", "method", "url", "body"}
    if extra:
        return _refused(batch_id, line, custom_id, "invalid_request", f"unknown fields {sorted(extra)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        return _routed_error(batch_id, line, custom_id, InvalidJsonError("The request body must be a JSON object."))
    try:
        if kind == "embeddings":
            embed = validate(EmbeddingRequest, body)
            model = resolve_model(embed.model, service, models)
            return LineWork(line, custom_id, service, task, to_input(embed), kind, model, embed.encoding_format)
        generation: ChatCompletionRequest | CompletionRequest = (
            validate(ChatCompletionRequest, body) if kind == "chat" else validate(CompletionRequest, body)
        )
        if generation.stream:
            raise EdgeError("'stream' is not supported in a batch.", status=400, code="invalid_input",
                            param="stream", openai_code="invalid_value")  # fmt: skip
        model = resolve_model(generation.model, service, models)
        return LineWork(line, custom_id, service, task, to_input(generation), kind, model)
    except EdgeError as exc:
        return _routed_error(batch_id, line, custom_id, exc)


def parse_lines(
    batch_id: str, content: bytes, endpoint: str, models: Mapping[str, Mapping[str, str]]
) -> list[LineWork | LineError]:
    """Every non-blank line of ``content``; a ``custom_id`` seen on an earlier line makes an error line."""
    out: list[LineWork | LineError] = []
    seen: set[str] = set()
    for n, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        parsed = parse_line(batch_id, n, raw, endpoint, models)
        custom_id = parsed.custom_id
        if custom_id is not None:
            if isinstance(parsed, LineWork) and custom_id in seen:
                parsed = _refused(batch_id, n, custom_id, "duplicate_custom_id",
                                  f"custom_id {custom_id!r} is used by an earlier line")  # fmt: skip
            seen.add(custom_id)
        out.append(parsed)
    return out


def count_lines(content: bytes) -> int:
    """The non-blank lines of a file (what ``max_lines`` bounds)."""
    return sum(1 for raw in content.split(b"\n") if raw.strip())


def render_reply(
    batch_id: str, work: LineWork, reply: ReplyEvent, created: int | None = None
) -> tuple[bool, dict[str, object]]:
    """``(ok, output line)`` of a line's reply: the synchronous route's body, or its error status and body."""
    if not reply.ok:
        error = reply_error(reply)
        return False, output_line(batch_id, work.line, work.custom_id, openai_status(error), openai_body(error))
    created = int(time.time()) if created is None else created
    body: dict[str, object]
    if work.kind == "embeddings":
        body = embedding_response(reply, work.model, work.encoding)
    elif work.kind == "chat":
        body = chat_response(reply, work.model, created)
    else:
        body = completion_response(reply, work.model, created)
    return True, output_line(batch_id, work.line, work.custom_id, 200, body)


def advance(state: BatchState, status: BatchStatus, now: int, **changes: object) -> BatchState:
    """``state`` moved to ``status`` at ``now`` (its timestamp set, ``seq`` + 1, ``changes`` applied).

    Raises:
        ValueError: ``status`` cannot follow ``state.status``.
    """
    if status != state.status and status not in TRANSITIONS[state.status]:
        raise ValueError(f"batch {state.id}: {state.status} -> {status} is not a transition")
    update: dict[str, object] = {"status": status, "seq": state.seq + 1, **changes}
    if status != state.status and status in STAMP:
        update[STAMP[status]] = now
    return state.model_copy(update=update)


def batch_object(state: BatchState, cancel: BatchCancel | None = None) -> dict[str, object]:
    """The OpenAI ``Batch`` of a stored state; a cancel requested and not yet handled shows as ``cancelling``."""
    status = state.status
    cancelling_at = state.cancelling_at
    if cancel is not None and status not in TERMINAL and status != "finalizing":
        status, cancelling_at = "cancelling", cancelling_at or cancel.at
    errors = None
    if state.errors:
        errors = {"object": "list", "data": [e.model_dump() for e in state.errors]}
    return {
        "id": state.id,
        "object": "batch",
        "endpoint": state.endpoint,
        "errors": errors,
        "input_file_id": state.input_file_id,
        "completion_window": state.completion_window,
        "status": status,
        "output_file_id": state.output_file_id,
        "error_file_id": state.error_file_id,
        "created_at": state.created_at,
        "in_progress_at": state.in_progress_at,
        "expires_at": state.expires_at,
        "finalizing_at": state.finalizing_at,
        "completed_at": state.completed_at,
        "failed_at": state.failed_at,
        "expired_at": state.expired_at,
        "cancelling_at": cancelling_at,
        "cancelled_at": state.cancelled_at,
        "request_counts": state.request_counts.model_dump(),
        "metadata": state.metadata,
    }


def file_object(stored: StoredFile) -> dict[str, object]:
    """The OpenAI ``FileObject`` of a stored file."""
    return {
        "id": stored.id,
        "object": "file",
        "bytes": stored.bytes,
        "created_at": stored.created_at,
        "filename": stored.filename,
        "purpose": stored.purpose,
        "status": "processed",
        "status_details": None,
    }
