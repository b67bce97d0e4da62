"""Server-sent events (SSE): an ``EdgeStream`` relayed to an HTTP client, in a format of the route's choosing.

``SseResponse`` streams ``relay(stream, fmt)`` as ``text/event-stream`` and closes the ``EdgeStream`` when
the response ends, however it ends: a client that disconnects cancels the body and the close (synchronous)
still runs, which releases the in-flight slot, forgets the waiter and sets the request's cancel key
(``api.edge.EdgeStream.close``).

What ``relay`` guarantees: the text it sends is, piece by piece, the request's text in order (the router
only queues text that continues what came before, ``streams.replies``); when the final reply comes it sends
the final text's remainder past what was sent, then the format's end. The final reply is authoritative: if
its text does not start with what was sent (a sampled request redelivered and generated again) the stream
ends with an error event instead, so a client never holds text that silently differs from the answer. An
error reply, the stream's deadline (``request_timeout_s``, 504 ``timeout``) and an edge shutting down end
it with an error event too. Headers are sent before the first event; errors found before that (429, 503,
409) are plain HTTP errors raised by ``Edge.stream``.

The native format (``POST /ai/llm/completion`` with ``"stream": true``, ``NativeFormat``)::

    event: delta
    data: {"text": "Hel"}

    event: done
    data: <the reply event, as the 200 body of a non-streamed call>

or, instead of ``done``, ``event: error`` with an ``ErrorBody`` (``{"ok": false, "error": {"code",
"message"}, ...}``). The OpenAI formats are in ``api.openai``.

Measuring time to first token: ``stream_timings`` reads any of these streams with httpx and times the first
event that carries text (``StreamTimings.ttft_s``), the whole stream and the number of text events.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx
import orjson
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.edge import EdgeStream
from api.errors import STATUS_BY_CODE, EdgeError, error_body
from schemas import ErrorCode, ReplyEvent
from streams.replies import StreamText

DIVERGED = (
    "the final text does not continue the text already streamed (the request was generated again after a "
    "redelivery, with sampling): discard the streamed text and retry"
)


# One event of the native stream, as OpenAPI documents a text/event-stream body (its schema is per event).
SSE_EVENT: dict[str, object] = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["delta", "done", "error"]},
        "data": {"type": "string", "description": "JSON: {text} for delta, the reply event for done, ErrorBody."},
    },
    "required": ["event", "data"],
}


def sse(data: str | bytes, event: str | None = None) -> bytes:
    """One SSE event; ``data`` must be one line (JSON is)."""
    body = data.encode() if isinstance(data, str) else data
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + body + b"\n\n"


class SseFormat(Protocol):
    """How one kind of stream writes its events."""

    def opening(self) -> list[bytes]:
        """Events sent as soon as the request is produced (before any text)."""
        ...

    def text(self, text: str) -> bytes:
        """One piece of text (never empty)."""
        ...

    def done(self, reply: ReplyEvent, remainder: str) -> list[bytes]:
        """The end of a successful stream: ``remainder`` is the final text past what was sent (maybe empty)."""
        ...

    def failure(self, status: int, code: str, message: str, reply: ReplyEvent | None) -> bytes:
        """The event that ends a failed stream; ``reply`` when the agent answered with an error."""
        ...


def _reply_status(reply: ReplyEvent) -> tuple[int, str, str]:
    code = reply.error.code if reply.error else ErrorCode.INTERNAL
    message = reply.error.message if reply.error else "the request failed"
    return STATUS_BY_CODE.get(code, 500), code, message


async def relay(stream: EdgeStream, fmt: SseFormat) -> AsyncIterator[bytes]:
    """The SSE events of ``stream`` in ``fmt`` (see the module docstring); does not close the stream."""
    for frame in fmt.opening():
        yield frame
    sent = ""
    while True:
        try:
            item = await stream.next()
        except EdgeError as exc:
            yield fmt.failure(exc.status, exc.code, exc.message, None)
            return
        if isinstance(item, StreamText):
            sent += item.text
            yield fmt.text(item.text)
            continue
        if not item.ok:
            yield fmt.failure(*_reply_status(item), item)
            return
        text = (item.output or {}).get("text")
        if not isinstance(text, str):
            yield fmt.failure(500, ErrorCode.INTERNAL, "the final reply carries no text", item)
            return
        if not text.startswith(sent):
            yield fmt.failure(500, ErrorCode.INTERNAL, DIVERGED, None)
            return
        for frame in fmt.done(item, text[len(sent) :]):
            yield frame
        return


class SseResponse(StreamingResponse):
    """``relay(stream, fmt)`` as ``text/event-stream``; the stream is closed when the response ends."""

    def __init__(self, stream: EdgeStream, fmt: SseFormat, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(
            relay(stream, fmt),
            media_type="text/event-stream",
            headers={
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # proxies (nginx) must not buffer the events
                "X-Request-Id": stream.request_id,
                **(headers or {}),
            },
        )
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()  # synchronous: runs even when a disconnect cancelled the body


class NativeFormat:
    """``POST /ai/llm/completion`` with ``"stream": true`` (see the module docstring); an error event the edge
    writes itself names the stream's request id, service and task."""

    def __init__(self, stream: EdgeStream) -> None:
        self.request_id = stream.request_id
        self.service = stream.service
        self.task = stream.task

    def opening(self) -> list[bytes]:
        return []

    def text(self, text: str) -> bytes:
        return sse(orjson.dumps({"text": text}), "delta")

    def done(self, reply: ReplyEvent, remainder: str) -> list[bytes]:
        frames = [self.text(remainder)] if remainder else []
        return [*frames, sse(orjson.dumps(reply.model_dump(mode="json")), "done")]

    def failure(self, status: int, code: str, message: str, reply: ReplyEvent | None) -> bytes:
        if reply is not None:
            body = reply.model_dump(mode="json")
        else:
            body = error_body(code, message, request_id=self.request_id, service=self.service, task=self.task)
        return sse(orjson.dumps(body), "error")


@dataclass(frozen=True, slots=True)
class StreamTimings:
    """What ``stream_timings`` measured: seconds to the response headers, to the first event with text and
    to the end; text events; the text; the last event's data (the done/usage event, or an error)."""

    status: int
    headers_s: float
    ttft_s: float | None
    total_s: float
    text_events: int
    text: str
    last: str


def _event_text(event: str | None, data: str) -> str:
    """The text an event of any of the edge's stream formats carries ('' for none)."""
    if data.startswith("[DONE]") or event in ("done", "error"):
        return ""
    payload = orjson.loads(data)
    if event == "delta":
        return str(payload.get("text") or "")
    text = ""
    for choice in payload.get("choices") or []:
        text += str(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return text


async def stream_timings(
    client: httpx.AsyncClient, path: str, body: Mapping[str, object], headers: Mapping[str, str] | None = None
) -> StreamTimings:
    """POST ``body`` (with ``"stream": true``) to ``path`` and time the SSE answer; for benchmarks.

    Works for ``/v1/chat/completions``, ``/v1/completions`` and ``/ai/llm/completion``. Time to first token
    is taken at the first event carrying text, not at the headers or the role-only opening chunk.
    """
    started = time.perf_counter()
    ttft: float | None = None
    events = 0
    text = ""
    last = ""
    async with client.stream("POST", path, json=dict(body), headers=dict(headers or {})) as response:
        headers_s = time.perf_counter() - started
        event: str | None = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
                last = data
                if response.status_code == 200 and (piece := _event_text(event, data)):
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    events += 1
                    text += piece
                event = None
    return StreamTimings(response.status_code, headers_s, ttft, time.perf_counter() - started, events, text, last)
