"""The official ``openai`` client against the edge's /v1 routes, with the shipped SmolLM2 and MiniLM agents.

Chat, completions and embeddings go through the same Kafka path as the native routes; streams (chat and
completion) come as SSE chunks the client parses; the client's own exception classes are raised for the
edge's errors (400 for an unsupported field, 401 without the key, 404 for an unknown model); a client that
leaves a stream gets its generation cancelled at the agent (its final reply, read from the edge's reply
topic, is ``cancelled``). Prints the time to first token and tokens/s of one stream (``OPENAI-STREAM:``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from openai import OpenAI

from aisemble.pipeline import Pipeline
from api.errors import (
    DuplicateIdError,
    EdgeError,
    OverloadedError,
    ReplyTimeoutError,
    UnavailableError,
    error_response,
    openai_body,
)
from api.streaming import stream_timings
from schemas import ErrorCode, ReplyEvent
from streams.replies import parse_reply_record
from streams.settings import Settings
from streams.topics import edge_reply_topic, wait_for_partitions

pytestmark = [pytest.mark.integration, pytest.mark.slow]

API_KEY = "openai-test-key-0123456789"
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]  # long answer
# The first streamed delta must come at least this long before the finish chunk (measured: see OPENAI-STREAM
# first_delta_before_end_s, about 0.06 s a token on 2 cores, over 2 s for 48); a buffering relay gives ~0.
STREAMED_BEFORE_END_S = 0.3


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    logs = Path(tmp_path_factory.mktemp("logs"))
    p = Pipeline.isolated(
        infra_settings,
        ["llm", "nlp"],
        logs,
        AISEMBLE_REQUEST_TIMEOUT_S="120",
        AISEMBLE_API_KEYS=json.dumps([API_KEY]),
        AISEMBLE_NLP__THREADS="1",
        AISEMBLE_LLM__THREADS="1",
        AISEMBLE_LLM__BATCHING="continuous",  # rows stream their deltas as they decode (agents/llm_engine.py)
    ).start(timeout_s=600)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def client(pipeline: Pipeline) -> OpenAI:
    return OpenAI(base_url=f"{pipeline.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def served(client: OpenAI) -> dict[str, str]:
    """The models /v1/models lists, by owner, once the edge has read the agents' heartbeats."""
    deadline = time.monotonic() + 30
    while True:
        models = {m.owned_by: m.id for m in client.models.list()}
        if {"aisemble-llm", "aisemble-nlp"} <= set(models) or time.monotonic() > deadline:
            return models
        time.sleep(0.5)


def test_models_lists_the_llm_and_the_embedding_model(client: OpenAI, served: dict[str, str]) -> None:
    assert set(served) == {"aisemble-llm", "aisemble-nlp"}, served
    assert client.models.retrieve(served["aisemble-llm"]).id == served["aisemble-llm"]
    print("OPENAI-MODELS:", json.dumps(served))


def test_chat_completion(client: OpenAI, served: dict[str, str]) -> None:
    reply = client.chat.completions.create(
        model=served["aisemble-llm"], messages=MESSAGES, max_tokens=24, temperature=0  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 24 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    print("OPENAI-CHAT:", json.dumps({"text": choice.message.content, "usage": reply.usage.model_dump()}))


def test_completion_by_service_name(client: OpenAI) -> None:
    reply = client.completions.create(model="llm", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8


def test_chat_stream_relays_tokens_as_they_come(client: OpenAI, served: dict[str, str]) -> None:
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=served["aisemble-llm"],
        messages=STORY,  # type: ignore[arg-type]
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    finish = None
    finished_at: float | None = None  # when the chunk with the finish reason came: the generation had ended
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                first = first if first is not None else time.perf_counter() - started
                pieces.append(choice.delta.content)
            if choice.finish_reason and finished_at is None:
                finished_at = time.perf_counter() - started
            finish = choice.finish_reason or finish
    total = time.perf_counter() - started
    assert usage is not None and finish in ("stop", "length") and first is not None and finished_at is not None
    tokens_per_s = usage.completion_tokens / max(total - first, 1e-9)
    decode_s = finished_at - first  # how long the client read deltas before the generation's end
    print(
        "OPENAI-STREAM:",
        json.dumps({"ttft_s": round(first, 3), "finished_s": round(finished_at, 3), "total_s": round(total, 3),
                    "first_delta_before_end_s": round(decode_s, 3), "content_chunks": len(pieces),
                    "completion_tokens": usage.completion_tokens, "tokens_per_s_after_first": round(tokens_per_s, 1),
                    "text": "".join(pieces)}),
    )  # fmt: skip
    assert len(pieces) > 1, f"the text came in one piece: the agent did not stream partials ({pieces})"
    # Relayed as they come: the first delta reached the client well before the generation ended. A relay that
    # held the deltas until the final reply would deliver them all within a few ms of the finish chunk.
    assert usage.completion_tokens >= 16, usage  # enough tokens that decoding takes measurable time
    assert decode_s > STREAMED_BEFORE_END_S, {"ttft_s": first, "finished_s": finished_at}


def test_completion_stream(client: OpenAI) -> None:
    chunks = list(client.completions.create(model="llm", prompt="Once upon", max_tokens=16, temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.object == "text_completion" for c in chunks)


def test_a_cached_completion_streams_as_one_chunk(client: OpenAI) -> None:
    """Greedy requests are cached (the llm's policy); a streamed repeat is answered from the cache in one piece."""
    body = {"model": "llm", "prompt": "Kafka is a", "max_tokens": 6, "temperature": 0.0}
    first = client.completions.create(**body)  # type: ignore[call-overload]
    deadline = time.monotonic() + 10
    while True:  # the agent writes the cache after it replied
        chunks = list(client.completions.create(**body, stream=True))  # type: ignore[call-overload]
        texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
        if len(texts) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert texts == [first.choices[0].text]


def test_embeddings_float_and_base64(client: OpenAI, served: dict[str, str]) -> None:
    texts = ["hello world", "Kafka moves events between services."]
    as_float = client.embeddings.create(model=served["aisemble-nlp"], input=texts, encoding_format="float")
    as_b64 = client.embeddings.create(model="nlp", input=texts)  # the client asks for base64 and decodes it
    assert [d.index for d in as_float.data] == [0, 1]
    for a, b in zip(as_float.data, as_b64.data, strict=True):
        assert len(a.embedding) == 384 and abs(np.linalg.norm(a.embedding) - 1) < 1e-3
        assert np.allclose(a.embedding, b.embedding, atol=1e-6)
    assert as_float.usage.prompt_tokens > 0 and as_float.usage.total_tokens == as_float.usage.prompt_tokens
    single = client.embeddings.create(model="nlp", input="hello world", encoding_format="float")
    assert np.allclose(single.data[0].embedding, as_float.data[0].embedding, atol=1e-5)
    print("OPENAI-EMBED:", json.dumps({"dim": len(as_float.data[0].embedding), "usage": as_float.usage.model_dump()}))


def test_raw_base64_is_little_endian_float32(pipeline: Pipeline) -> None:
    response = httpx.post(
        f"{pipeline.url}/v1/embeddings",
        json={"model": "nlp", "input": "hello", "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )
    vector = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-3


def test_unsupported_field_is_400_naming_it(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="llm", messages=MESSAGES, extra_body={"frequency_penalty": 0.5}  # type: ignore[arg-type]
        )
    assert caught.value.status_code == 400 and caught.value.param == "frequency_penalty"
    assert caught.value.type == "invalid_request_error" and caught.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="llm", messages=MESSAGES, n=2)  # type: ignore[arg-type]
    assert caught.value.param == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="llm", prompt="x", temperature=3)
    assert caught.value.param == "temperature"


def test_without_the_key_is_401(pipeline: Pipeline) -> None:
    anonymous = OpenAI(base_url=f"{pipeline.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        anonymous.models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


def test_unknown_model_is_404_model_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="llm", input="x")  # the llm serves no embeddings


async def _final_reply(settings: Settings, topic: str, request_id: str, timeout_s: float = 90.0) -> ReplyEvent:
    """The final ReplyEvent for ``request_id`` on the edge's reply topic (partials skipped)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in await wait_for_partitions(settings, topic)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                for record in records:
                    event = parse_reply_record(record.value or b"")
                    if isinstance(event, ReplyEvent) and event.id == request_id:
                        return event
        raise AssertionError(f"no final reply for {request_id} on {topic} within {timeout_s}s")
    finally:
        await consumer.stop()


async def test_a_stream_the_client_leaves_is_cancelled_at_the_agent(pipeline: Pipeline, client: OpenAI) -> None:
    rid = f"leave-{uuid.uuid4().hex[:10]}"
    max_tokens = 400

    def read_two_chunks_and_leave() -> int:
        stream = client.completions.create(
            model="llm", prompt="Write a very long story about a lighthouse keeper.", max_tokens=max_tokens,
            temperature=0.8, seed=7, stream=True, extra_headers={"X-Request-Id": rid},
        )  # fmt: skip
        chunks = 0
        for chunk in stream:
            chunks += bool(chunk.choices and chunk.choices[0].text)
            if chunks == 2:
                break
        stream.close()  # the client goes away mid-stream
        return chunks

    started = time.monotonic()
    assert await asyncio.to_thread(read_two_chunks_and_leave) == 2
    topic = edge_reply_topic(pipeline.settings.topic_prefix, pipeline.settings.edge_id)
    final = await _final_reply(pipeline.settings, topic, rid)
    took = time.monotonic() - started
    print("OPENAI-CANCEL:", json.dumps({"ok": final.ok, "error": final.error and final.error.code,
                                        "final_after_s": round(took, 2)}))  # fmt: skip
    assert not final.ok and final.error is not None and final.error.code == ErrorCode.CANCELLED, final


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OverloadedError("busy", request_id="r1", retry_after_s=1), openai.RateLimitError),
        (UnavailableError("Kafka is unavailable", request_id="r1"), openai.InternalServerError),
        (ReplyTimeoutError("no reply within 30.0s", request_id="r1"), openai.InternalServerError),
        (DuplicateIdError("request id 'r1' is already in flight", request_id="r1"), openai.ConflictError),
    ],
)
def test_edge_errors_reach_the_client_as_its_exception_classes(error: EdgeError, expected: type[Exception]) -> None:
    """The edge's 429/503/504/409 in OpenAI's shape, played to the real client over an in-memory transport."""
    rendered = error_response(error, openai=True)

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(rendered.status_code, headers=dict(rendered.headers), content=bytes(rendered.body))

    offline = OpenAI(api_key="k", base_url="http://edge.invalid/v1", max_retries=0,
                     http_client=httpx.Client(transport=httpx.MockTransport(answer)))  # fmt: skip
    with pytest.raises(expected) as caught:
        offline.completions.create(model="llm", prompt="x")
    assert isinstance(caught.value, openai.APIStatusError) and caught.value.status_code == error.status
    expected_code = {429: "rate_limit_exceeded"}.get(error.status, error.code)
    assert caught.value.code == openai_body(error)["error"]["code"] == expected_code
    assert caught.value.response.headers["x-request-id"] == "r1"
    if error.status == 429:
        assert caught.value.response.headers["retry-after"] == "1" and caught.value.type == "rate_limit_error"


async def test_native_sse_stream_with_stream_timings(pipeline: Pipeline) -> None:
    """/ai/llm/completion with stream: true, read by api.streaming.stream_timings (what bench/ uses for TTFT)."""
    body = {"prompt": "List three colours.", "max_tokens": 24, "temperature": 0.0, "cache": False}
    async with httpx.AsyncClient(base_url=pipeline.url, timeout=120, headers={"X-API-Key": API_KEY}) as http:
        timings = await stream_timings(http, "/ai/llm/completion", {**body, "stream": True})
    done = ReplyEvent.model_validate_json(timings.last)  # the last event is the done event: the reply event
    assert timings.status == 200 and done.ok and done.output is not None
    assert timings.text == done.output["text"] and timings.text_events > 1 and timings.ttft_s is not None
    print("NATIVE-STREAM:", json.dumps({"headers_s": round(timings.headers_s, 3), "ttft_s": round(timings.ttft_s, 3),
                                        "total_s": round(timings.total_s, 3), "text_events": timings.text_events,
                                        "tokens": done.output["tokens"]}))  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "obj"),
    [
        ("/v1/embeddings", {"model": "nlp", "input": ["async one", "async two"]}, "list"),
        ("/v1/chat/completions",
         {"model": "llm", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0},
         "chat.completion"),
    ],
)  # fmt: skip
def test_an_asynchronous_request_is_202_then_the_openai_body(
    pipeline: Pipeline, path: str, body: dict[str, object], obj: str
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Prefer": "respond-async"}
    with httpx.Client(base_url=pipeline.url, timeout=60) as http:
        accepted = http.post(path, json=body, headers=headers)
        assert accepted.status_code == 202, accepted.text
        location = accepted.headers["Location"]
        for _ in range(600):  # bounded: at most ~60 s
            done = http.get(location, headers=headers)
            if done.status_code != 202:
                break
            time.sleep(0.1)
    assert done.status_code == 200, done.text
    assert done.json()["object"] == obj  # the OpenAI shape, as the synchronous call answers
    if obj == "list":
        assert len(done.json()["data"]) == 2 and done.json()["usage"]["prompt_tokens"] > 0
    else:
        assert done.json()["choices"][0]["message"]["role"] == "assistant"
