"""Traces from real processes to a real OTLP/HTTP receiver: the ``Pipeline``'s edge and data agent run with
``OTEL_EXPORTER_OTLP_ENDPOINT`` pointed at a receiver this test starts on 127.0.0.1 (``tests.otlp_receiver``:
``ExportTraceServiceRequest`` parsed with ``opentelemetry-proto``).

* a REST call with a ``traceparent``: spans of ``aisemble-edge`` and ``aisemble-data`` in the caller's trace, the
  agent's queue wait and reply produce children of the edge's request produce, the edge's correlation a child
  of the reply produce; the batch span (its own trace) links to the request;
* a raw Kafka request (no edge) with a ``traceparent`` header: the agent continues that trace.

The rendered tree of the REST call is logged (``-o log_cli=true`` shows it): the README's trace picture.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from aisemble.pipeline import Pipeline
from streams.settings import Settings
from streams.topics import ensure_topics, reply_topic_name
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, render

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture(scope="module")
def pipeline(
    infra_settings: Settings, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    p = Pipeline.isolated(
        infra_settings,
        ["data"],
        tmp_path_factory.mktemp("logs"),
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_SERVICE_NAME="",
    )
    p.start()
    try:
        yield p
    finally:
        p.stop()


def _wait(
    receiver: OtlpReceiver, trace_id: str, wanted: set[tuple[str, str]], timeout_s: float = 20.0
) -> list[ReceivedSpan]:
    """The spans of ``trace_id`` once every (service, name) of ``wanted`` arrived (polled)."""
    deadline = time.monotonic() + timeout_s
    spans: list[ReceivedSpan] = []
    while time.monotonic() < deadline:
        spans = receiver.of_trace(trace_id)
        if wanted <= {(s.service, s.name) for s in spans}:
            return spans
        time.sleep(0.1)
    raise AssertionError(f"trace {trace_id}: {sorted((s.service, s.name) for s in spans)}; wanted {sorted(wanted)}")


def _one(spans: list[ReceivedSpan], service: str, name: str) -> ReceivedSpan:
    matches = [s for s in spans if (s.service, s.name) == (service, name)]
    assert len(matches) == 1, render(spans) + repr(matches)
    (span,) = matches
    return span


def test_a_rest_call_exports_one_trace_from_the_edge_and_the_agent(pipeline: Pipeline, receiver: OtlpReceiver) -> None:
    trace_id, caller = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    body = {"operation": "analyze", "data": {"records": [{"v": 1}, {"v": 5}]}, "cache": False}
    response = httpx.post(
        f"{pipeline.url}/data/process", json=body, headers={"traceparent": f"00-{trace_id}-{caller}-01"}, timeout=30
    )
    assert response.status_code == 200, response.text
    prefix = pipeline.prefix
    requests, replies = f"{prefix}.data.requests", f"{prefix}.edge.{prefix}-edge.replies"
    spans = _wait(
        receiver,
        trace_id,
        {
            ("aisemble-edge", "POST /data/process"),
            ("aisemble-edge", "edge.call data.analyze"),
            ("aisemble-edge", f"send {requests}"),
            ("aisemble-data", f"queue {requests}"),
            ("aisemble-data", f"send {replies}"),
            ("aisemble-edge", f"receive {replies}"),
        },
    )
    http = _one(spans, "aisemble-edge", "POST /data/process")
    send = _one(spans, "aisemble-edge", f"send {requests}")
    queue = _one(spans, "aisemble-data", f"queue {requests}")
    reply = _one(spans, "aisemble-data", f"send {replies}")
    receive = _one(spans, "aisemble-edge", f"receive {replies}")
    assert http.parent_id == caller
    assert queue.parent_id == send.span_id and reply.parent_id == send.span_id
    assert receive.parent_id == reply.span_id
    assert http.attributes["http.response.status_code"] == 200
    (batch_link,) = reply.links
    deadline = time.monotonic() + 20
    while not (batch := [s for s in receiver.spans if (s.trace_id, s.span_id) == batch_link]):
        assert time.monotonic() < deadline, "the batch span reply links to was exported"
        time.sleep(0.1)
    assert batch[0].service == "aisemble-data" and batch[0].name == "batch data"
    assert (trace_id, send.span_id) in batch[0].links
    log.info("trace of a REST call (%s):\n%s\nits batch (linked):\n%s", trace_id, render(spans),
             render(receiver.of_trace(batch[0].trace_id)))  # fmt: skip


def test_a_raw_kafka_request_with_a_traceparent_has_its_trace_continued(
    pipeline: Pipeline, receiver: OtlpReceiver, infra_settings: Settings
) -> None:
    import asyncio

    trace_id, caller = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    settings = pipeline.settings
    reply_topic = reply_topic_name(settings.topic_prefix, f"raw-{uuid.uuid4().hex[:6]}")
    requests = f"{settings.topic_prefix}.data.requests"

    async def produce() -> None:
        await ensure_topics(settings, [(reply_topic, 1)])
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            event = {"id": "raw-1", "task": "analyze", "input": {"records": [{"v": 2}]}, "reply_to": reply_topic}
            headers = [("traceparent", f"00-{trace_id}-{caller}-01".encode())]
            await producer.send_and_wait(requests, orjson.dumps(event), key=b"raw-1", headers=headers)
        finally:
            await producer.stop()

    asyncio.run(produce())
    spans = _wait(
        receiver, trace_id, {("aisemble-data", f"queue {requests}"), ("aisemble-data", f"send {reply_topic}")}
    )
    assert _one(spans, "aisemble-data", f"queue {requests}").parent_id == caller
    assert _one(spans, "aisemble-data", f"send {reply_topic}").parent_id == caller


def test_the_agents_log_lines_have_the_trace_fields_while_tracing_is_on(pipeline: Pipeline) -> None:
    assert pipeline.log_dir is not None
    text = (Path(pipeline.log_dir) / f"{pipeline.prefix}-data.log").read_text(errors="replace")
    assert "trace_id=" in text and "span_id=" in text
