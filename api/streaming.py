"""Server-sent events (SSE): an ``EdgeStream`` relayed to an HTTP client, in a format of the route's choosing.

``SseResponse`` (FastAPI's ``EventSourceResponse``: ``text/event-stream``, ``Cache-Control: no-cache``,
``X-Accel-Buffering: no``) streams ``relay(stream, fmt)`` and closes the ``EdgeStream`` when the response
ends, however it ends: a client that disconnects cancels the body and the close (synchronous) still runs,
which releases the in-flight slot, forgets the waiter and sets the request's cancel key
(``api.edge.EdgeStream.close``). Events are written by FastAPI's own encoder (``fastapi.sse.format_sse_event``:
a ``data`` value with line breaks becomes several ``data:`` lines, as the SSE grammar wants).

Keep-alive: while no event comes for ``keepalive_s`` (``AISEMBLE_SSE_KEEPALIVE_S``, 15 s by default: a long
queue wait, a long prefill) the relay sends FastAPI's keep-alive comment (``: ping``), again every
``keepalive_s``, so proxies and load balancers that drop idle connections keep the stream open. SSE clients
(the browser's ``EventSource``, the ``openai`` client, ``stream_timings``) ignore comments. Waiting for the
next event is not disturbed by a ping: the item stays queued and comes with the next wait.

Why not FastAPI's generator endpoints (``response_class=EventSourceResponse`` and ``yield``), which ping by
themselves: those routes always stream, while ours answer JSON or SSE by the body's ``stream`` field and
refuse a stream with a plain HTTP error (429, 503, 409) before any header is sent; and their ping interval is
a private module constant, not a setting.

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

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx
import orjson
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event
from starlette.types import Receive, Scope, Send

from api.edge import EdgeStream
from api.errors import EdgeError, native_body, reply_error
from schemas import ReplyEvent
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
    """One SSE event with ``data`` (already serialised: JSON, or ``[DONE]``), by FastAPI's encoder."""
    return format_sse_event(data_str=data.decode() if isinstance(data, bytes) else data, event=event)


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

    def failure(self, error: EdgeError, reply: ReplyEvent | None) -> bytes:
        """The event that ends a failed stream; ``reply`` when the agent answered with an error."""
        ...


async def relay(stream: EdgeStream, fmt: SseFormat, keepalive_s: float | None = None) -> AsyncIterator[bytes]:
    """The SSE events of ``stream`` in ``fmt`` (see the module docstring), with a keep-alive comment after each
    ``keepalive_s`` without an event (None: none); does not close the stream."""
    for frame in fmt.opening():
        yield frame
    sent = ""
    while True:
        try:
            if keepalive_s is None:
                item = await stream.next()
            else:
                try:
                    # A ping interrupts only the wait: the queued item is taken by the next call (EdgeStream.next
                    # waits on an asyncio.Queue, whose get() leaves the item queued when cancelled).
                    async with asyncio.timeout(keepalive_s):
                        item = await stream.next()
                except TimeoutError:
                    yield KEEPALIVE_COMMENT
                    continue
        except EdgeError as exc:
            yield fmt.failure(exc, None)
            return
        if isinstance(item, StreamText):
            sent += item.text
            yield fmt.text(item.text)
            continue
        if not item.ok:
            yield fmt.failure(reply_error(item), item)
            return
        text = (item.output or {}).get("text")
        if not isinstance(text, str):
            yield fmt.failure(_stream_error(stream, "the final reply carries no text"), item)
            return
        if not text.startswith(sent):
            yield fmt.failure(_stream_error(stream, DIVERGED), None)
            return
        for frame in fmt.done(item, text[len(sent) :]):
            yield frame
        return


def _stream_error(stream: EdgeStream, message: str) -> EdgeError:
    """A 500 ``internal`` naming ``stream``'s request."""
    return EdgeError(message, request_id=stream.request_id, service=stream.service, task=stream.task)


class SseResponse(EventSourceResponse):
    """``relay(stream, fmt, keepalive_s)`` as ``text/event-stream``; the stream is closed when the response ends,
    then ``on_end`` (synchronous) is told its final reply (the quota's usage correction: ``api.quota_gate``)."""

    def __init__(
        self,
        stream: EdgeStream,
        fmt: SseFormat,
        headers: Mapping[str, str] | None = None,
        keepalive_s: float | None = None,
        on_end: Callable[[ReplyEvent | None], None] | None = None,
    ) -> None:
        self.on_end = on_end  # told the final reply (None: none came) once the stream is closed
        super().__init__(
            relay(stream, fmt, keepalive_s),
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
            if self.on_end is not None:
                self.on_end(self.stream.final)


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

    def failure(self, error: EdgeError, reply: ReplyEvent | None) -> bytes:
        if reply is not None:
            return sse(orjson.dumps(reply.model_dump(mode="json")), "error")
        error.request_id = error.request_id or self.request_id
        error.service, error.task = error.service or self.service, error.task or self.task
        return sse(orjson.dumps(native_body(error)), "error")


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
