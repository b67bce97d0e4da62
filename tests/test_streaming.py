"""SSE relay at the edge, through the real Kafka and Redis, without the LLM agent.

The edge runs (with the light data agent only, so /health is 200); each test starts a streamed request,
reads the RequestEvent the edge produced (``stream: true``, its correlation id) from the llm request topic,
and plays the agent by hand with ``tests/kafka_client.RawClient``: PartialBatchEvents and the final
ReplyEvent to the edge's reply topic, with duplicates, reordering, a lost partial and a second attempt.
The SSE bytes the client receives are compared exactly. A client that disconnects sets the request's
cancel key in Redis; a stream past ``request_timeout_s`` ends with a timeout error event and sets it too.
Pure units first: the router's stream state, ``Edge.stream``'s admission (a fake producer, no Redis) and
the relay's frames.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from redis.asyncio import Redis

from aisemble.pipeline import Pipeline
from api.edge import Edge
from api.errors import OverloadedError, UnavailableError
from api.openai import ChatChunks, CompletionChunks
from api.streaming import SseFormat, relay
from schemas import ErrorCode, ReplyEvent, RequestEvent
from schemas.events import PartialBatchEvent, PartialDelta
from streams.cancel import cancel_key
from streams.replies import ReplyRouter, StreamItem, StreamText
from streams.settings import Settings
from streams.topics import service_topics, wait_for_partitions
from tests.kafka_client import RawClient

REQUEST_TIMEOUT_S = 8.0


# --- pure units: the router's stream state, Edge.stream's admission, the relay's frames ----------------------


def _partial(task: str, *deltas: PartialDelta) -> PartialBatchEvent:
    return PartialBatchEvent(service="llm", task=task, deltas=list(deltas))


def _delta(rid: str, corr: str, attempt: str, seq: int, text: str) -> PartialDelta:
    return PartialDelta(id=rid, correlation_id=corr, attempt=attempt, seq=seq, text=text, tokens=1)


def _final(rid: str, corr: str | None, text: str, task: str = "completion") -> ReplyEvent:
    output = {"text": text, "tokens": 3, "finish_reason": "length", "prompt_tokens": 2}
    return ReplyEvent(id=rid, correlation_id=corr, service="llm", task=task, ok=True, output=output)


def _drain(queue: asyncio.Queue[StreamItem]) -> list[object]:
    out: list[object] = []
    while not queue.empty():
        item = queue.get_nowait()
        out.append(item.text if isinstance(item, StreamText) else item)
    return out


async def test_router_queues_in_order_text_of_one_attempt_then_the_final() -> None:
    router = ReplyRouter()
    corr, _, queue = router.expect_stream("r1", "llm", "completion")
    d = functools.partial(_delta, "r1", corr)
    assert router.partial(_partial("completion", d("A", 1, "b"), d("A", 0, "a"))) == 2  # one record, reordered
    assert router.partial(_partial("completion", d("A", 1, "b"))) == 0  # seen seq
    assert router.partial(_partial("completion", d("B", 2, "x"))) == 0  # another attempt
    assert router.partial(_partial("chat", d("A", 2, "c"))) == 0  # another task: foreign
    assert router.partial(_partial("completion", _delta("r2", corr, "A", 2, "c"))) == 0  # another id: foreign
    assert router.partial(_partial("completion", d("A", 3, "d"))) == 1  # held: seq 2 is missing
    final = _final("r1", corr, "abcd!")
    assert router.resolve(final)
    assert router.partial(_partial("completion", d("A", 2, "c"))) == 0  # after the final: nobody streams it
    assert _drain(queue) == ["a", "b", final] and router.partials_dropped == 5 and len(router) == 0


async def test_router_fail_all_ends_a_stream_with_the_exception() -> None:
    router = ReplyRouter()
    _, future, queue = router.expect_stream("r1", "llm", "chat")
    router.fail_all(RuntimeError("edge shutting down"))
    (item,) = _drain(queue)
    assert isinstance(item, RuntimeError) and future.done()


class _Producer:
    """``send_and_wait`` succeeds at once, or raises ``fail``."""

    def __init__(self) -> None:
        self.client = None
        self.fail: BaseException | None = None
        self.sent: list[bytes] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        if self.fail is not None:
            raise self.fail
        self.sent.append(value)


def _unit_edge(producer: _Producer) -> Edge:
    settings = Settings(max_in_flight=1, produce_timeout_s=0.2, request_timeout_s=5)
    # No models known -> no cache key -> Redis is never used; nothing closes a stream unfinished here.
    return Edge(settings, producer, None, ReplyRouter(), None, "t.edge.x.replies")  # type: ignore[arg-type]


async def test_edge_stream_holds_a_slot_until_closed_and_produces_stream_true() -> None:
    producer = _Producer()
    edge = _unit_edge(producer)
    stream = await edge.stream("llm", "completion", {"prompt": "x"}, request_id="r1")
    assert RequestEvent.model_validate_json(producer.sent[0]).stream is True
    with pytest.raises(OverloadedError):  # max_in_flight = 1: the stream holds it
        await edge.stream("llm", "completion", {"prompt": "y"})
    with pytest.raises(OverloadedError):
        await edge.call("llm", "completion", {"prompt": "y"})
    corr = RequestEvent.model_validate_json(producer.sent[0]).correlation_id or ""
    edge.router.resolve(_final("r1", corr, "done"))
    final = await stream.next()
    assert isinstance(final, ReplyEvent) and final.correlation_id is None and stream.finished
    stream.close()
    stream.close()  # idempotent
    assert edge.load["in_flight"] == 0 and len(edge.router) == 0


async def test_edge_stream_that_cannot_produce_is_503_and_releases_everything() -> None:
    producer = _Producer()
    producer.fail = KafkaConnectionError("no broker")
    edge = _unit_edge(producer)
    with pytest.raises(UnavailableError):
        await edge.stream("llm", "chat", {"messages": []}, request_id="r1")
    assert edge.load["in_flight"] == 0 and len(edge.router) == 0


async def _frames(fmt: SseFormat, items: list[StreamItem]) -> list[bytes]:
    edge = _unit_edge(_Producer())
    stream = await edge.stream("llm", "completion", {"prompt": "x"}, request_id="r1")
    corr = stream._correlation_id or ""
    waiter = edge.router._waiting[corr]
    assert waiter.stream is not None
    for item in items:
        waiter.stream.queue.put_nowait(item)
    frames = [frame async for frame in relay(stream, fmt)]
    stream.close()
    return frames


async def test_relay_sends_the_remainder_of_the_final_text_in_the_openai_completion_format() -> None:
    fmt = CompletionChunks("cmpl-r1", "m", include_usage=False, created=1)
    frames = await _frames(fmt, [StreamText("Hel", 1), StreamText("lo", 1), _final("r1", None, "Hello world")])
    chunks = [orjson.loads(f[6:]) for f in frames[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["Hel", "lo", " world", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]
    assert frames[-1] == b"data: [DONE]\n\n"


async def test_relay_ends_with_an_error_when_the_final_text_diverges() -> None:
    fmt = ChatChunks("c", "m", include_usage=True, created=1)
    frames = await _frames(fmt, [StreamText("Yes", 1), _final("r1", None, "No")])
    assert orjson.loads(frames[1][6:])["choices"][0]["delta"] == {"content": "Yes"}
    error = orjson.loads(frames[-1][6:])["error"]
    assert error["type"] == "server_error" and error["code"] == ErrorCode.INTERNAL and len(frames) == 3


# --- through Kafka ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    logs = Path(tmp_path_factory.mktemp("logs"))
    p = Pipeline.isolated(infra_settings, ["data"], logs, AISEMBLE_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S)).start()
    yield p
    p.stop()


@pytest.fixture
async def raw(pipeline: Pipeline) -> AsyncIterator[RawClient]:
    async with RawClient(pipeline.settings) as client:
        yield client


async def _produced_request(settings: Settings, request_id: str, timeout_s: float = 30.0) -> RequestEvent:
    """The RequestEvent the edge produced for ``request_id`` (read from the llm request topic's start)."""
    topic = service_topics(settings.topic_prefix, "llm").requests
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in await wait_for_partitions(settings, topic)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                for record in records:
                    event = RequestEvent.model_validate_json(record.value or b"")
                    if event.id == request_id:
                        return event
        raise AssertionError(f"request {request_id} never reached {topic}")
    finally:
        await consumer.stop()


class Agent:
    """Plays the LLM agent for one request: partials and the final reply to its reply topic."""

    def __init__(self, raw: RawClient, request: RequestEvent, task: str) -> None:
        self.raw = raw
        self.request = request
        self.task = task

    def delta(self, attempt: str, seq: int, text: str) -> PartialDelta:
        rid, corr = self.request.id, self.request.correlation_id
        return PartialDelta(id=rid, correlation_id=corr, attempt=attempt, seq=seq, text=text, tokens=1)

    async def partials(self, *deltas: PartialDelta) -> None:
        event = PartialBatchEvent(service="llm", task=self.task, deltas=list(deltas))
        assert self.request.reply_to
        await self.raw.send(self.request.reply_to, orjson.dumps(event.model_dump(mode="json")), key=b"worker-1")

    async def final(self, text: str | None, *, error: dict[str, str] | None = None) -> ReplyEvent:
        output = {"text": text, "tokens": 5, "finish_reason": "stop", "prompt_tokens": 7} if text is not None else None
        reply = ReplyEvent.model_validate(
            {
                "id": self.request.id,
                "correlation_id": self.request.correlation_id,
                "service": "llm",
                "task": self.task,
                "ok": error is None,
                "output": output,
                "error": error,
                "model": "hand-played",
            }
        )
        assert self.request.reply_to
        await self.raw.send(self.request.reply_to, orjson.dumps(reply.model_dump(mode="json")), key=b"worker-1")
        return reply


async def _stream(pipeline: Pipeline, path: str, body: dict[str, object], request_id: str) -> tuple[int, str, str]:
    """POST and read the whole SSE answer: status, content type, body text."""
    async with (
        httpx.AsyncClient(base_url=pipeline.url, timeout=60) as http,
        http.stream("POST", path, json=body, headers={"X-Request-Id": request_id}) as response,
    ):
        text = "".join([chunk async for chunk in response.aiter_text()])
        return response.status_code, response.headers.get("content-type", ""), text


def _events(text: str) -> list[tuple[str | None, str]]:
    """(event, data) of each SSE event, in order."""
    out = []
    for block in text.split("\n\n"):
        if not block:
            continue
        event, data = None, ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        out.append((event, data))
    return out


@pytest.mark.integration
async def test_native_stream_drops_duplicates_orders_and_fills_a_lost_partial_from_the_final(
    pipeline: Pipeline, raw: RawClient
) -> None:
    rid = f"s-{uuid.uuid4().hex[:10]}"
    body = {"prompt": "Say hello", "max_tokens": 20, "temperature": 0.0, "stream": True}
    client = asyncio.create_task(_stream(pipeline, "/ai/llm/completion", body, rid))
    request = await _produced_request(pipeline.settings, rid)
    assert request.stream and request.task == "completion" and request.input["prompt"] == "Say hello"
    agent = Agent(raw, request, "completion")
    await agent.partials(agent.delta("A", 0, "Hel"))
    await agent.partials(agent.delta("A", 0, "Hel"))  # duplicate (a redelivered record): dropped
    await agent.partials(agent.delta("A", 2, "wor"))  # ahead of seq 1: held until seq 1 comes
    await agent.partials(agent.delta("B", 0, "Other attempt "))  # another attempt: ignored
    await agent.partials(agent.delta("A", 1, "lo "))
    # seq 3 ("ld") is lost; seq 4 waits for it forever and the final reply fills in
    await agent.partials(agent.delta("A", 4, "!"))
    final = await agent.final("Hello world!")
    await agent.partials(agent.delta("A", 3, "ld"))  # after the final: nobody streams it any more
    status, content_type, text = await client
    assert status == 200 and content_type.startswith("text/event-stream")
    events = _events(text)
    assert events[:-1] == [
        ("delta", '{"text":"Hel"}'),
        ("delta", '{"text":"lo "}'),
        ("delta", '{"text":"wor"}'),
        ("delta", '{"text":"ld!"}'),
    ], text
    kind, data = events[-1]
    done = ReplyEvent.model_validate_json(data)
    assert kind == "done" and done.output == final.output and done.id == rid and done.correlation_id is None
    assert "edge_ms" in done.timings_ms
    streamed = "".join(json.loads(d)["text"] for _, d in events[:-1])
    print("STREAM-NATIVE:", json.dumps({"events": len(events), "text": streamed}))


@pytest.mark.integration
async def test_openai_chat_stream_chunks_are_exact(pipeline: Pipeline, raw: RawClient) -> None:
    rid = f"s-{uuid.uuid4().hex[:10]}"
    body = {
        "model": "llm",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": 10,
    }
    client = asyncio.create_task(_stream(pipeline, "/v1/chat/completions", body, rid))
    request = await _produced_request(pipeline.settings, rid)
    assert request.task == "chat" and request.input["messages"] == [{"role": "user", "content": "Hi"}]
    agent = Agent(raw, request, "chat")
    await agent.partials(agent.delta("A", 0, "Hi"), agent.delta("A", 1, " there"))
    await agent.final("Hi there.")
    status, _, text = await client
    assert status == 200
    chunks = [json.loads(data) for _, data in _events(text)[:-1]]
    assert _events(text)[-1] == (None, "[DONE]")
    created = chunks[0]["created"]
    common = {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created, "model": "llm",
              "system_fingerprint": None, "usage": None}  # fmt: skip

    def choice(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
        return {**common, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    assert chunks == [
        choice({"role": "assistant", "content": ""}),
        choice({"content": "Hi"}),
        choice({"content": " there"}),
        choice({"content": "."}),
        choice({}, "stop"),
        {**common, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}},
    ], text


@pytest.mark.integration
async def test_a_second_attempt_that_diverges_ends_with_an_error_event(pipeline: Pipeline, raw: RawClient) -> None:
    rid = f"s-{uuid.uuid4().hex[:10]}"
    body = {"model": "llm", "prompt": "Once", "stream": True, "temperature": 1.0}
    client = asyncio.create_task(_stream(pipeline, "/v1/completions", body, rid))
    request = await _produced_request(pipeline.settings, rid)
    agent = Agent(raw, request, "completion")
    await agent.partials(agent.delta("A", 0, " upon"))
    await agent.partials(agent.delta("B", 0, " there"))  # the redelivered attempt: ignored, A is locked
    await agent.final(" there was a cat")  # the final came from attempt B: it does not continue " upon"
    status, _, text = await client
    events = _events(text)
    assert status == 200 and len(events) == 2, text
    first = json.loads(events[0][1])
    assert first["object"] == "text_completion" and first["choices"][0]["text"] == " upon"
    error = json.loads(events[1][1])["error"]
    assert error["type"] == "server_error" and error["code"] == "internal" and "discard" in error["message"]
    assert "[DONE]" not in text


@pytest.mark.integration
async def test_an_error_reply_ends_the_native_stream_with_an_error_event(pipeline: Pipeline, raw: RawClient) -> None:
    rid = f"s-{uuid.uuid4().hex[:10]}"
    client = asyncio.create_task(_stream(pipeline, "/ai/llm/completion", {"prompt": "x", "stream": True}, rid))
    agent = Agent(raw, await _produced_request(pipeline.settings, rid), "completion")
    await agent.partials(agent.delta("A", 0, "partial "))
    await agent.final(None, error={"code": "model_error", "message": "CUDA out of memory"})
    _, _, text = await client
    events = _events(text)
    assert events[0] == ("delta", '{"text":"partial "}')
    kind, data = events[1]
    assert kind == "error" and json.loads(data)["error"] == {"code": "model_error", "message": "CUDA out of memory"}


async def _cancel_key_ttl(redis: Redis, key: str, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ttl = int(await redis.pttl(key))
        if ttl > 0:
            return ttl
        await asyncio.sleep(0.05)
    return -2


@pytest.mark.integration
async def test_a_client_that_disconnects_sets_the_cancel_key(pipeline: Pipeline, raw: RawClient) -> None:
    rid = f"s-{uuid.uuid4().hex[:10]}"
    redis = Redis.from_url(pipeline.settings.redis_url)
    key = cancel_key(pipeline.settings.topic_prefix, rid)
    try:
        async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as http:
            body = {"prompt": "A long story", "stream": True}
            async with http.stream("POST", "/ai/llm/completion", json=body, headers={"X-Request-Id": rid}) as response:
                agent = Agent(raw, await _produced_request(pipeline.settings, rid), "completion")
                await agent.partials(agent.delta("A", 0, "Once"))
                lines = response.aiter_lines()  # kept: a dropped iterator closes the connection when collected
                assert await anext(lines) == "event: delta"
                assert await anext(lines) == 'data: {"text":"Once"}'
                assert await redis.exists(key) == 0  # nothing cancelled while the client reads
                started = time.monotonic()
            # the response is closed here: the client went away mid-stream
        ttl_ms = await _cancel_key_ttl(redis, key)
        took = time.monotonic() - started
        assert 0 < ttl_ms <= REQUEST_TIMEOUT_S * 1000, ttl_ms
        await agent.final("Once upon a time")  # the agent's late final: dropped, nobody waits
        async with httpx.AsyncClient(base_url=pipeline.url, timeout=10) as http:
            health = (await http.get("/health")).json()
        edge = health["edge"]
        assert (edge["in_flight"], edge["waiting"]) == (0, 0)  # the slot and the waiter went with the client
        figures = {"cancel_key_ttl_ms": ttl_ms, "seen_after_s": round(took, 3), "in_flight": edge["in_flight"]}
        print("STREAM-DISCONNECT:", json.dumps(figures))
    finally:
        await redis.delete(key)
        await redis.aclose()


@pytest.mark.integration
async def test_a_stream_past_its_deadline_ends_with_a_timeout_event_and_cancels(
    pipeline: Pipeline, raw: RawClient
) -> None:
    rid = f"s-{uuid.uuid4().hex[:10]}"
    redis = Redis.from_url(pipeline.settings.redis_url)
    key = cancel_key(pipeline.settings.topic_prefix, rid)
    try:
        started = time.monotonic()
        client = asyncio.create_task(_stream(pipeline, "/ai/llm/completion", {"prompt": "x", "stream": True}, rid))
        agent = Agent(raw, await _produced_request(pipeline.settings, rid), "completion")
        await agent.partials(agent.delta("A", 0, "slow"))  # ... and nothing more: the agent hangs
        _, _, text = await client
        elapsed = time.monotonic() - started
        events = _events(text)
        assert events[0] == ("delta", '{"text":"slow"}')
        kind, data = events[1]
        assert kind == "error" and json.loads(data)["error"]["code"] == "timeout", text
        assert await _cancel_key_ttl(redis, key) > 0
        figures = {"request_timeout_s": REQUEST_TIMEOUT_S, "ended_after_s": round(elapsed, 2)}
        print("STREAM-TIMEOUT:", json.dumps(figures))
    finally:
        await redis.delete(key)
        await redis.aclose()


class _HeaderProducer(_Producer):
    """``_Producer`` that keeps each request's headers (tracing on: the trace context)."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[list[tuple[str, bytes]] | None] = []

    async def send_and_wait(  # type: ignore[override]
        self, topic: str, value: bytes, key: bytes | None = None, headers: list[tuple[str, bytes]] | None = None
    ) -> None:
        self.headers.append(headers)
        await super().send_and_wait(topic, value, key=key)


async def test_a_traced_stream_has_one_first_token_event_and_its_request_carries_the_trace() -> None:
    """Tracing on: ``edge.stream`` is one span from the call to ``close``, with one ``first_token`` event (time to
    first token) at the first text, however many follow; the produced request's headers carry its trace."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from streams import tracing

    exporter = InMemorySpanExporter()
    tracing.in_memory(None, SimpleSpanProcessor(exporter))
    try:
        producer = _HeaderProducer()
        edge = _unit_edge(producer)
        stream = await edge.stream("llm", "completion", {"prompt": "x"}, request_id="r1")
        corr = RequestEvent.model_validate_json(producer.sent[0]).correlation_id or ""
        d = functools.partial(_delta, "r1", corr, "A")
        await asyncio.sleep(0.02)  # a time to first token that is not zero
        assert edge.router.partial(_partial("completion", d(0, "a"), d(1, "b"))) == 2
        assert edge.router.partial(_partial("completion", d(2, "c"))) == 1
        edge.router.resolve(_final("r1", corr, "abc"))
        items = [await stream.next() for _ in range(4)]
        stream.close()
        spans = exporter.get_finished_spans()
    finally:
        tracing.shutdown()
    assert [i.text for i in items[:3] if isinstance(i, StreamText)] == ["a", "b", "c"]
    (span,) = [s for s in spans if s.name == "edge.stream llm.completion"]
    (first,) = [e for e in span.events if e.name == "first_token"]
    assert first.attributes is not None and float(first.attributes["aisemble.ttft_ms"]) >= 15.0
    assert span.start_time is not None and span.end_time is not None and first.timestamp <= span.end_time
    (headers,) = producer.headers
    traceparent = dict(headers or [])["traceparent"].decode()
    assert traceparent.split("-")[1] == f"{span.context.trace_id:032x}"
