"""Keep-alive comments on a streamed answer whose first token is slow (``AISEMBLE_SSE_KEEPALIVE_S``).

Component tests, no Kafka or Redis: the edge app (``api.app.create_app``) runs in a real uvicorn server on
127.0.0.1 with a real ``Edge`` whose producer takes every request at once; the test plays the reply listener,
handing the stream's partials and final reply to the edge's ``ReplyRouter`` as ``ReplyListener`` would. What is
measured is what a client receives over HTTP: ``: ping`` comments at the configured interval while no token
comes, then the exact events. A pure unit checks that a ping never loses or reorders an item of the stream.
(The Kafka path of streams is in tests/test_streaming.py.)
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import orjson
from fastapi import FastAPI
from fastapi.sse import KEEPALIVE_COMMENT

from api.app import create_app
from api.edge import Edge, EdgeStream
from api.streaming import NativeFormat, relay, sse
from schemas import ReplyEvent, RequestEvent
from schemas.events import PartialBatchEvent, PartialDelta
from streams.replies import ReplyRouter, StreamItem, StreamText
from streams.settings import Settings
from tests.served import served

KEEPALIVE_S = 0.2
FIRST_TOKEN_AFTER_S = 1.2  # about 6 keep-alive intervals


class _Producer:
    """Takes every request at once and keeps it, as a healthy broker would."""

    client = None

    def __init__(self) -> None:
        self.sent: list[RequestEvent] = []
        self.took_one = asyncio.Event()

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self.sent.append(RequestEvent.model_validate_json(value))
        self.took_one.set()


def _app(keepalive_s: float) -> tuple[FastAPI, Edge, _Producer]:
    settings = Settings(sse_keepalive_s=keepalive_s, request_timeout_s=20)
    app = create_app(settings)
    producer = _Producer()
    # No models known, so no cache key: Redis is never used.
    edge = Edge(settings, producer, None, ReplyRouter(), None, "t.edge.x.replies")  # type: ignore[arg-type]
    app.state.edge = edge
    return app, edge, producer


async def _play_the_agent(edge: Edge, producer: _Producer, first_token_after_s: float) -> None:
    """Wait for the request, stay silent ``first_token_after_s`` (a queue wait, a prefill), then answer."""
    await asyncio.wait_for(producer.took_one.wait(), 10)
    request = producer.sent[0]
    await asyncio.sleep(first_token_after_s)
    delta = PartialDelta(id=request.id, correlation_id=request.correlation_id, attempt="a", seq=0, text="Hel", tokens=1)
    edge.router.partial(PartialBatchEvent(service="llm", task="completion", deltas=[delta]))
    output = {"text": "Hello", "tokens": 2, "finish_reason": "length", "prompt_tokens": 1}
    final = ReplyEvent(
        id=request.id, correlation_id=request.correlation_id, service="llm", task="completion", ok=True, output=output
    )
    assert edge.router.resolve(final)


async def _stream_lines(client: httpx.AsyncClient) -> list[tuple[float, str]]:
    """POST a streamed completion; every non-empty line of the answer with the seconds since the request."""
    started = time.perf_counter()
    lines: list[tuple[float, str]] = []
    body = {"prompt": "Say hello", "max_tokens": 4, "stream": True}
    async with client.stream("POST", "/ai/llm/completion", json=body, headers={"X-Request-Id": "ka-1"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line:
                lines.append((time.perf_counter() - started, line))
    return lines


async def test_a_slow_first_token_gets_keepalive_comments_at_the_configured_interval() -> None:
    app, edge, producer = _app(KEEPALIVE_S)
    async with served(app, timeout_s=30) as client:
        agent = asyncio.create_task(_play_the_agent(edge, producer, FIRST_TOKEN_AFTER_S))
        lines = await _stream_lines(client)
        await agent
    ping = KEEPALIVE_COMMENT.decode().strip()
    first_event = next(i for i, (_, line) in enumerate(lines) if not line.startswith(":"))
    pings = [t for t, line in lines[:first_event] if line == ping]
    gaps = [b - a for a, b in zip([0.0, *pings], pings, strict=False)]
    print("SSE-KEEPALIVE:", {"pings": len(pings), "gaps_s": [round(g, 3) for g in gaps]})
    # about FIRST_TOKEN_AFTER_S / KEEPALIVE_S = 6; generous bounds for a loaded machine
    assert 3 <= len(pings) <= 7, lines
    assert all(KEEPALIVE_S * 0.5 <= gap <= KEEPALIVE_S * 4 for gap in gaps), gaps
    events = [line for _, line in lines[first_event:] if not line.startswith(":")]
    assert events[:2] == ["event: delta", 'data: {"text":"Hel"}'], events
    assert events[2:4] == ["event: delta", 'data: {"text":"lo"}'], events  # the final text's remainder
    assert events[4] == "event: done" and orjson.loads(events[5][6:])["output"]["text"] == "Hello"
    assert len(events) == 6 and edge.load["in_flight"] == 0


async def test_a_stream_with_tokens_coming_fast_gets_no_comment() -> None:
    app, edge, producer = _app(keepalive_s=5.0)
    async with served(app, timeout_s=30) as client:
        agent = asyncio.create_task(_play_the_agent(edge, producer, first_token_after_s=0.05))
        lines = await _stream_lines(client)
        await agent
    assert not any(line.startswith(":") for _, line in lines), lines
    assert [line for _, line in lines][:2] == ["event: delta", 'data: {"text":"Hel"}']


async def test_a_ping_never_loses_or_reorders_an_item() -> None:
    """Items land at random moments around pings every millisecond: every one comes out, in order."""
    rng = random.Random(11)
    queue: asyncio.Queue[StreamItem] = asyncio.Queue()
    stream = EdgeStream(None, "llm", "completion", "r1", "c1", queue, time.perf_counter(), 30.0)  # type: ignore[arg-type]
    pieces = [f"t{i} " for i in range(150)]
    final = ReplyEvent(id="r1", service="llm", task="completion", ok=True, output={"text": "".join(pieces)})

    async def feed() -> None:
        for piece in pieces:
            await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.001, 0.002, 0.004]))
            queue.put_nowait(StreamText(piece, 1))
        queue.put_nowait(final)

    feeder = asyncio.create_task(feed())
    frames = [frame async for frame in relay(stream, NativeFormat(stream), keepalive_s=0.001)]
    await feeder
    pings = frames.count(KEEPALIVE_COMMENT)
    texts = [orjson.loads(f.split(b"data: ", 1)[1])["text"] for f in frames if f.startswith(b"event: delta")]
    assert pings > 10  # the pings really interleaved with the items
    assert texts == pieces and frames[-1].startswith(b"event: done")


def test_an_event_with_line_breaks_is_one_data_line_per_line() -> None:
    """FastAPI's encoder (``api.streaming.sse``) follows the SSE grammar where a hand-made one did not."""
    assert sse("a\nb", "delta") == b"event: delta\ndata: a\ndata: b\n\n"
    assert sse(b'{"text":"a"}') == b'data: {"text":"a"}\n\n'
