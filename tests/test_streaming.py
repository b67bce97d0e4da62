"""SSE relay at the edge, through the real Kafka and Redis, without the LLM agent.

The edge runs (with the light data agent only, so /health is 200); each test starts a streamed request,
reads the RequestEvent the edge produced (``stream: true``, its correlation id) from the llm request topic,
and plays the agent by hand with ``tests/kafka_client.RawClient``: PartialBatchEvents and the final
ReplyEvent to the edge's reply topic, with duplicates, reordering, a lost partial and a second attempt.
The SSE bytes the client receives are compared exactly. A client that disconnects sets the request's
cancel key in Redis; a stream past ``request_timeout_s`` ends with a timeout error event and sets it too.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis

from aisemble.pipeline import Pipeline
from api.edge import cancel_key
from schemas import ReplyEvent, RequestEvent
from schemas.events import PartialBatchEvent, PartialDelta
from streams.settings import Settings
from streams.topics import service_topics, wait_for_partitions
from tests.kafka_client import RawClient

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 8.0


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
