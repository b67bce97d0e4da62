"""OpenTelemetry traces across Kafka (``streams.tracing``, ``api.tracing``, the spans of ``api.edge`` and
``agents.loop``).

* pure units: on only with an OTLP endpoint and not ``OTEL_SDK_DISABLED``; the service-name rule; the W3C context
  written to and read from Kafka headers (pairs or a mapping; garbage is no context); log fields;
* the span tree of a REST call through a real pipeline in one process (the edge app served by uvicorn with its
  lifespan, an agent's ``BatchProcessor`` fed by a plain consumer of the request topic, real Kafka and Redis),
  exported to the SDK's in-memory exporter: the caller's ``traceparent`` continued, parent/child from the HTTP
  span to the edge's correlation, the batch span's links and attributes, the model call under the batch, the
  cache hit attribute;
* tracing off: no header on the request or the reply record, no provider installed.

The cross-process test (edge and agent processes exporting to a real OTLP/HTTP receiver) is in
``tests/test_tracing_otlp.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

from agents.data import build_runner
from agents.loop import BatchProcessor
from aisemble.pipeline import free_port, throwaway_prefix
from api.app import create_app
from streams import tracing
from streams.cache import ResultCache
from streams.codec import Record
from streams.redis import connect
from streams.settings import Settings
from streams.topics import edge_reply_topic, wait_for_partitions

CALLER_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-01"


# -- pure units ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "false"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
    ],
)
def test_tracing_is_wanted_only_with_an_endpoint_and_the_sdk_not_disabled(env: dict[str, str], expected: bool) -> None:
    assert tracing.wanted(env) is expected


def test_without_an_endpoint_setup_installs_nothing() -> None:
    assert tracing.setup(None, env={}) is False
    assert not tracing.on()
    assert isinstance(tracing.tracer(), trace.NoOpTracer)
    assert not isinstance(trace.get_tracer_provider(), TracerProvider), "no SDK provider was made global"


def test_an_unknown_otlp_protocol_is_refused_at_setup() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    with pytest.raises(ValueError, match="http/json"):
        tracing.setup(None, env=env)
    assert not tracing.on()


@pytest.mark.parametrize(
    ("service", "env", "name"),
    [
        (None, {}, "aisemble-edge"),
        ("nlp", {}, "aisemble-nlp"),
        (None, {"OTEL_SERVICE_NAME": "shop"}, "shop"),
        ("llm", {"OTEL_SERVICE_NAME": "shop"}, "shop-llm"),
    ],
)
def test_each_process_reports_its_own_service_name(service: str | None, env: dict[str, str], name: str) -> None:
    assert tracing.service_name(service, env) == name


@pytest.fixture
def spans() -> AsyncIterator[InMemorySpanExporter]:  # type: ignore[misc]
    exporter = InMemorySpanExporter()
    tracing.in_memory(None, SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        tracing.shutdown()


def test_the_context_goes_into_kafka_headers_and_comes_back(spans: InMemorySpanExporter) -> None:
    with tracing.tracer().start_as_current_span("produce") as span:
        headers = tracing.inject()
    sent = span.get_span_context()
    assert [name for name, _ in headers] == ["traceparent"]
    for carrier in (headers, dict(headers), tuple(headers)):
        received = tracing.span_context(carrier)  # type: ignore[arg-type]
        assert received is not None
        assert (received.trace_id, received.span_id) == (sent.trace_id, sent.span_id)
        assert received.is_remote


@pytest.mark.parametrize(
    "headers",
    [None, [], [("traceparent", b"garbage")], [("other", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")]],
)
def test_headers_without_a_valid_traceparent_carry_no_context(
    spans: InMemorySpanExporter, headers: list[tuple[str, bytes]] | None
) -> None:
    assert tracing.extract(headers) is None


def test_log_lines_carry_the_trace_and_span_id_while_tracing_is_on(spans: InMemorySpanExporter) -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    with tracing.tracer().start_as_current_span("work") as span:
        assert tracing.LogContext().filter(record)
    context = span.get_span_context()
    assert record.trace_id == f"{context.trace_id:032x}"
    assert record.span_id == f"{context.span_id:016x}"
    outside = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    tracing.LogContext().filter(outside)
    assert outside.trace_id == outside.span_id == "-"


def test_the_root_handlers_format_gets_the_fields_and_loses_them_when_tracing_stops() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        tracing.in_memory(None)
        assert handler.formatter is not None and "%(trace_id)s" in getattr(handler.formatter, "_fmt", "")
        tracing.shutdown()
        assert handler.formatter is not None and getattr(handler.formatter, "_fmt", "") == "%(message)s"
        assert not handler.filters
    finally:
        root.removeHandler(handler)


# -- a real pipeline in one process ---------------------------------------------------------------------------


class KafkaSink:
    """The agents' ``Sink`` over a plain aiokafka producer (headers passed on)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def send(
        self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]] | None = None
    ) -> Awaitable[object]:
        return await self.producer.send(topic, value, key=key, headers=headers)

    async def missing_topics(self, topics: set[str]) -> set[str]:
        return set()


@dataclass
class InProcess:
    settings: Settings
    http: httpx.AsyncClient
    reply_topic: str


async def _agent(settings: Settings, processor: BatchProcessor) -> None:
    """An agent of the data service without Faust: every record of the request topic, in batches, through
    ``BatchProcessor.compute``/``deliver`` (what the batch loop calls), headers kept as ``FaustEvents`` keeps them."""
    topic = f"{settings.topic_prefix}.data.requests"
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await wait_for_partitions(settings, topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=16)
            records = [
                Record(
                    r.topic,
                    r.partition,
                    r.offset,
                    r.key,
                    r.value,
                    r.timestamp,
                    tuple(r.headers) if tracing.on() else (),
                )
                for rs in batches.values()
                for r in rs
            ]
            if records:
                await processor.deliver(await processor.compute(records))
    finally:
        await consumer.stop()


@contextlib.asynccontextmanager
async def _in_process(infra_settings: Settings) -> AsyncIterator[InProcess]:
    """The edge app (its lifespan run by uvicorn) and a data agent, on a fresh prefix; the edge's app is built
    after the test installed its provider (or none), as ``aisemble edge`` builds it after ``tracing.setup``."""
    prefix = throwaway_prefix()
    settings = infra_settings.model_copy(
        update={"topic_prefix": prefix, "edge_id": f"{prefix}-edge", "services": ["data"], "partitions": 1}
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    serving = asyncio.create_task(server.serve())
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    redis = connect(settings)
    runner = build_runner(settings)
    runner.load()
    cache = ResultCache(redis, prefix)
    processor = BatchProcessor("data", runner, KafkaSink(producer), topic_prefix=prefix, cache=cache, cache_ttl_s=60)
    agent: asyncio.Task[None] | None = None
    try:
        for _ in range(600):
            if server.started:
                break
            await asyncio.sleep(0.05)
        assert server.started, "the edge did not start"
        app.state.edge.models = {"data": dict(processor.models)}  # as the agents' heartbeats would tell it
        await producer.start()
        agent = asyncio.create_task(_agent(settings, processor))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.port}", timeout=30) as http:
            yield InProcess(settings, http, edge_reply_topic(prefix, settings.edge_id))
    finally:
        if agent is not None:
            agent.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await agent
        await producer.stop()
        await redis.aclose()
        server.should_exit = True
        await asyncio.wait_for(serving, 20)


@pytest.fixture
async def traced(infra_settings: Settings) -> AsyncIterator[tuple[InProcess, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tracing.in_memory(None, SimpleSpanProcessor(exporter))
    try:
        async with _in_process(infra_settings) as pipeline:
            yield pipeline, exporter
    finally:
        tracing.shutdown()


@pytest.fixture
async def untraced(infra_settings: Settings) -> AsyncIterator[InProcess]:
    async with _in_process(infra_settings) as pipeline:
        yield pipeline


async def _trace(
    exporter: InMemorySpanExporter, trace_id: int, names: set[str], timeout_s: float = 10.0
) -> list[ReadableSpan]:
    """The finished spans of ``trace_id`` once every name of ``names`` is among them (polled)."""
    found: list[ReadableSpan] = []
    for _ in range(int(timeout_s / 0.05)):
        found = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        if names <= {s.name for s in found}:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"trace {trace_id:032x} has {sorted(s.name for s in found)}, wants {sorted(names)}")


def _one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    matches = [s for s in spans if s.name == name]
    assert len(matches) == 1, f"{len(matches)} spans named {name!r}"
    return matches[0]


def _ancestors(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    """``span``'s parent, its parent, ... within ``spans``."""
    by_id = {s.context.span_id: s for s in spans}
    chain: list[ReadableSpan] = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        chain.append(span)
    return chain


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


@pytest.mark.integration
async def test_a_rest_call_is_one_trace_from_the_callers_traceparent_to_the_edges_correlation(
    traced: tuple[InProcess, InMemorySpanExporter],
) -> None:
    pipeline, spans = traced
    prefix = pipeline.settings.topic_prefix
    requests, replies = f"{prefix}.data.requests", pipeline.reply_topic
    body = {"operation": "analyze", "data": {"records": [{"v": 1}, {"v": 2}]}, "cache": False}
    response = await pipeline.http.post("/data/process", json=body, headers={"traceparent": TRACEPARENT})
    assert response.status_code == 200, response.text
    names = {
        "POST /data/process",
        "edge.call data.analyze",
        f"send {requests}",
        f"queue {requests}",
        f"send {replies}",
        f"receive {replies}",
    }
    found = await _trace(spans, CALLER_TRACE, names)
    http, call, send = (
        _one(found, "POST /data/process"),
        _one(found, "edge.call data.analyze"),
        _one(found, f"send {requests}"),
    )
    queue, reply, receive = (
        _one(found, f"queue {requests}"),
        _one(found, f"send {replies}"),
        _one(found, f"receive {replies}"),
    )
    # parent -> child, all in the caller's trace
    assert _parent(http) == CALLER_SPAN, "the caller's traceparent is continued"
    assert _ancestors(call, found)[-1] is http, "the edge call runs inside the HTTP span (FastAPI's endpoint span)"
    assert _parent(send) == call.context.span_id
    assert _parent(queue) == send.context.span_id, "the agent continues the context the record's headers carry"
    assert _parent(reply) == send.context.span_id
    assert _parent(receive) == reply.context.span_id, "the edge's correlation closes the trace"
    assert http.kind == trace.SpanKind.SERVER and send.kind == reply.kind == trace.SpanKind.PRODUCER
    # attributes
    assert http.attributes is not None and call.attributes is not None and receive.attributes is not None
    assert http.attributes["http.route"] == "/data/process" and http.attributes["http.response.status_code"] == 200
    assert call.attributes["aisemble.service"] == "data" and call.attributes["aisemble.task"] == "analyze"
    assert call.attributes["aisemble.status"] == 200 and call.attributes["aisemble.cached"] is False
    assert receive.attributes["aisemble.correlated"] is True
    # the Kafka spans in OpenTelemetry's messaging conventions (streams.tracing.kafka_attributes)
    for span, operation, topic in ((send, "send", requests), (queue, "receive", requests), (reply, "send", replies),
                                   (receive, "receive", replies)):  # fmt: skip
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "kafka", span.name
        assert (span.attributes["messaging.operation.type"], span.attributes["messaging.destination.name"]) == (
            operation, topic)  # fmt: skip
    assert send.attributes["messaging.kafka.message.key"] == response.headers["x-request-id"]  # type: ignore[index]
    assert reply.attributes["aisemble.ok"] is True  # type: ignore[index]
    assert queue.attributes["aisemble.queue_ms"] >= 0  # type: ignore[index,operator]
    assert queue.start_time is not None and queue.end_time is not None and queue.start_time <= queue.end_time
    # the batch: its own trace, one link per member, the model call its child; the reply links back to it
    batch = next(s for s in spans.get_finished_spans() if s.name == "batch data" and any(
        link.context.span_id == send.context.span_id for link in s.links))  # fmt: skip
    assert batch.attributes is not None and batch.attributes["aisemble.batch.size"] >= 1  # type: ignore[operator]
    assert batch.attributes["aisemble.batch.bytes"] > 0  # type: ignore[operator]
    assert len(batch.links) == batch.attributes["aisemble.batch.size"], "a link to every (traced) member"
    assert [link.context.span_id for link in reply.links] == [batch.context.span_id]
    model = next(
        s for s in spans.get_finished_spans() if s.name == "model data" and _parent(s) == batch.context.span_id
    )
    assert model.context.trace_id == batch.context.trace_id and model.attributes is not None
    assert model.attributes["aisemble.items"] >= 1  # type: ignore[operator]


@pytest.mark.integration
async def test_a_call_without_traceparent_starts_a_trace_and_a_cache_hit_is_marked(
    traced: tuple[InProcess, InMemorySpanExporter],
) -> None:
    pipeline, spans = traced
    body = {"operation": "analyze", "data": {"records": [{"n": uuid.uuid4().hex}]}}
    first = await pipeline.http.post("/data/process", json=body)
    assert first.status_code == 200 and first.json()["cached"] is False
    for _ in range(100):  # the agent writes the cache after its reply is acknowledged
        again = await pipeline.http.post("/data/process", json=body)
        if again.json()["cached"]:
            break
        await asyncio.sleep(0.05)
    assert again.status_code == 200 and again.json()["cached"] is True
    calls = [s for s in spans.get_finished_spans() if s.name == "edge.call data.analyze"]
    http = [s for s in spans.get_finished_spans() if s.name == "POST /data/process"]
    assert http[0].parent is None and http[0].context.trace_id == calls[0].context.trace_id, "the edge starts a trace"
    assert calls[0].attributes is not None and calls[0].attributes["aisemble.cached"] is False
    assert calls[-1].attributes is not None and calls[-1].attributes["aisemble.cached"] is True
    hit_trace = calls[-1].context.trace_id
    assert not [
        s for s in spans.get_finished_spans() if s.context.trace_id == hit_trace and s.name.startswith("send")
    ], "a cache hit never touches Kafka"


@pytest.fixture
async def parent_based(infra_settings: Settings) -> AsyncIterator[tuple[InProcess, InMemorySpanExporter]]:
    """Tracing on with the SDK's default sampler (``parentbased_always_on``): a caller's unsampled context stays
    unsampled."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        async with _in_process(infra_settings) as pipeline:
            yield pipeline, exporter
    finally:
        tracing.shutdown()


@pytest.mark.integration
async def test_an_unsampled_request_makes_no_span_and_writes_no_trace_header(
    parent_based: tuple[InProcess, InMemorySpanExporter],
) -> None:
    """A caller's ``traceparent`` with the sampled flag off: the edge makes none of its spans and writes no trace
    header, so the agent makes none either (what an unsampled request costs is a check per site); a sampled one
    beside it is traced end to end."""
    pipeline, spans = parent_based
    unsampled = f"00-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-00"
    rid, control = f"unsampled-{uuid.uuid4().hex[:8]}", f"sampled-{uuid.uuid4().hex[:8]}"
    body = {"operation": "analyze", "data": {"records": [{"v": 4}]}, "cache": False}
    response = await pipeline.http.post(
        "/data/process", json=body, headers={"traceparent": unsampled, "X-Request-Id": rid}
    )
    assert response.status_code == 200, response.text
    sampled_trace = 0x5BF92F3577B34DA6A3CE929D0E0E4737
    headers = {"traceparent": f"00-{sampled_trace:032x}-{CALLER_SPAN:016x}-01", "X-Request-Id": control}
    assert (await pipeline.http.post("/data/process", json=body, headers=headers)).status_code == 200
    requests = f"{pipeline.settings.topic_prefix}.data.requests"
    await _trace(
        spans, sampled_trace, {"edge.call data.analyze", f"queue {requests}", f"receive {pipeline.reply_topic}"}
    )
    found = await _headers_of(pipeline, rid)
    assert found == {topic: () for topic in (requests, pipeline.reply_topic)}, "no trace header on either record"
    assert [s.name for s in spans.get_finished_spans() if s.context.trace_id == CALLER_TRACE] == []


async def _headers_of(pipeline: InProcess, rid: str) -> dict[str, tuple[tuple[str, bytes], ...]]:
    """The headers of request ``rid``'s request record and its reply record."""
    settings = pipeline.settings
    found: dict[str, tuple[tuple[str, bytes], ...]] = {}
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        topics = [f"{settings.topic_prefix}.data.requests", pipeline.reply_topic]
        consumer.assign([TopicPartition(t, 0) for t in topics])
        await consumer.seek_to_beginning()
        async with asyncio.timeout(30):
            while len(found) < 2:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    for r in records:
                        if r.key == rid.encode():
                            found[tp.topic] = tuple(r.headers)
    finally:
        await consumer.stop()
    return found


@pytest.mark.integration
async def test_with_tracing_off_no_header_is_added_and_no_span_is_made(untraced: InProcess) -> None:
    pipeline = untraced
    assert not tracing.on()
    rid = f"off-{uuid.uuid4().hex[:8]}"
    body = {"operation": "analyze", "data": {"records": [{"v": 3}]}, "cache": False}
    response = await pipeline.http.post(
        "/data/process", json=body, headers={"traceparent": TRACEPARENT, "X-Request-Id": rid}
    )
    assert response.status_code == 200, response.text
    topics = [f"{pipeline.settings.topic_prefix}.data.requests", pipeline.reply_topic]
    found = await _headers_of(pipeline, rid)
    assert found == {topic: () for topic in topics}, "neither the request nor the reply carries a header"
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
