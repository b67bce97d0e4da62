"""End to end against the real Kafka and Redis: the edge and the data agent as processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from aisemble.pipeline import Pipeline
from schemas import DeadLetterEvent, ErrorCode, ReplyEvent
from streams.settings import Settings
from tests.kafka_client import RawClient

pytestmark = pytest.mark.integration

BRIEF_PAYLOAD = {
    "operation": "analyze",
    "data": {"records": [{"id": i, "value": i * 10} for i in range(100)]},
}


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    logs = Path(tmp_path_factory.mktemp("logs"))
    p = Pipeline.isolated(
        infra_settings, ["data"], logs, AISEMBLE_MAX_BODY_BYTES="65536", AISEMBLE_REQUEST_TIMEOUT_S="4"
    ).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def http(pipeline: Pipeline) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pipeline.url, timeout=30) as client:
        yield client


def test_brief_payload_gets_correct_statistics_then_cached(http: httpx.Client) -> None:
    payload = {
        **BRIEF_PAYLOAD,
        "data": {"records": [*BRIEF_PAYLOAD["data"]["records"], {"id": uuid.uuid4().hex}]},
    }  # type: ignore[dict-item]
    first = http.post("/data/process", json=payload)
    assert first.status_code == 200, first.text
    reply = ReplyEvent.model_validate(first.json())
    assert reply.ok and not reply.cached and reply.model and reply.timings_ms["batch_size"] >= 1
    assert first.headers["x-request-id"] == reply.id
    value = reply.output["fields"]["value"]  # type: ignore[index]
    expected = np.arange(100) * 10.0
    assert reply.output["count"] == 101  # type: ignore[index]
    assert value["missing"] == 1 and value["mean"] == pytest.approx(expected.mean())
    assert value["p95"] == pytest.approx(np.percentile(expected, 95))
    assert reply.output["fields"]["id"]["type"] == "mixed"  # type: ignore[index]

    second = http.post("/data/process", json=payload)
    assert second.status_code == 200
    again = ReplyEvent.model_validate(second.json())
    assert again.cached and again.output == reply.output and again.id != reply.id


def test_cache_false_bypasses_the_cache(http: httpx.Client) -> None:
    payload = {**BRIEF_PAYLOAD, "cache": False}
    replies = [ReplyEvent.model_validate(http.post("/data/process", json=payload).json()) for _ in range(2)]
    assert [r.cached for r in replies] == [False, False]
    assert all("inference_ms" in r.timings_ms for r in replies)


def test_caller_request_id_is_kept(http: httpx.Client) -> None:
    rid = f"caller-{uuid.uuid4().hex}"
    response = http.post(
        "/data/process", json={**BRIEF_PAYLOAD, "cache": False}, headers={"X-Request-Id": rid}
    )
    assert response.json()["id"] == rid


def test_malformed_body_is_422_naming_the_field(http: httpx.Client) -> None:
    response = http.post("/data/process", json={"operation": "analyze", "data": {"rows": []}})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == ErrorCode.INVALID_INPUT
    assert "data.records: Field required" in response.json()["error"]["message"]
    not_json = http.post("/data/process", content=b"{not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == ErrorCode.INVALID_JSON


def test_oversized_body_is_413(http: httpx.Client) -> None:
    records = [{"id": i, "text": "x" * 100} for i in range(1000)]  # ~120 KB > the 64 KiB limit set above
    response = http.post("/data/process", json={"operation": "analyze", "data": {"records": records}})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == ErrorCode.PAYLOAD_TOO_LARGE


def test_no_agent_means_504_with_the_request_id(http: httpx.Client) -> None:
    response = http.post("/ai/nlp/process", json={"text": "hello", "task": "sentiment"})
    assert response.status_code == 504
    body = response.json()
    assert (
        body["error"]["code"] == ErrorCode.TIMEOUT and body["id"] and body["id"] in body["error"]["message"]
    )


def test_health_reports_broker_redis_and_agent(http: httpx.Client) -> None:
    body = http.get("/health").json()
    assert body["status"] == "ok" and body["kafka"]["ok"] and body["redis"]["ok"] and body["edge"]["listening"]
    (agent,) = body["services"]["data"]["agents"]
    assert agent["models"] == {"analyze": "aisemble-analyze@1"}


async def test_plain_kafka_client_with_reply_to(pipeline: Pipeline) -> None:
    async with RawClient(pipeline.settings) as client:
        rid = f"raw-{uuid.uuid4().hex}"
        records = [{"x": 1.5}, {"x": 2.5}, {"y": "a"}]
        await client.send_request(
            "data",
            {
                "id": rid,
                "task": "analyze",
                "input": {"records": records},
                "reply_to": client.reply_topic,
                "cache": False,
            },
        )
        (raw,) = await client.read(client.reply_topic, 1)
    reply = ReplyEvent.model_validate(raw)
    assert reply.id == rid and reply.ok and reply.service == "data"
    assert reply.output["fields"]["x"]["mean"] == 2.0 and reply.output["fields"]["x"]["missing"] == 1  # type: ignore[index]


async def test_request_without_reply_to_goes_to_results_topic(pipeline: Pipeline) -> None:
    async with RawClient(pipeline.settings) as client:
        rid = f"res-{uuid.uuid4().hex}"
        await client.send_request("data", {"id": rid, "task": "analyze", "input": {"records": [{"a": 1}]}})
        found = [
            r
            for r in await client.read(f"{pipeline.prefix}.data.results", 50, timeout_s=20)
            if r["id"] == rid
        ]
    assert found and found[0]["ok"]


async def test_garbage_goes_to_dlq_and_the_next_request_is_answered(pipeline: Pipeline) -> None:
    async with RawClient(pipeline.settings) as client:
        garbage = b"\x00\xffnot an event" + uuid.uuid4().bytes
        await client.send(f"{pipeline.prefix}.data.requests", garbage, key=b"junk")
        await client.send(f"{pipeline.prefix}.data.requests", b'{"id": "x", "task": "analyze"}', key=b"junk2")
        rid = f"after-{uuid.uuid4().hex}"
        await client.send_request(
            "data",
            {"id": rid, "task": "analyze", "input": {"records": [{"a": 1}]}, "reply_to": client.reply_topic},
        )
        (raw,) = await client.read(client.reply_topic, 1)
        letters = [
            DeadLetterEvent.model_validate(d) for d in await client.read(f"{pipeline.prefix}.data.dlq", 2)
        ]
    assert ReplyEvent.model_validate(raw).id == rid
    by_key = {letter.key: letter for letter in letters}
    junk = by_key["junk"]
    assert junk.error.code == ErrorCode.INVALID_ENCODING and junk.payload_encoding == "base64"
    assert junk.source.topic == f"{pipeline.prefix}.data.requests" and junk.source.offset >= 0
    assert by_key["junk2"].error.code == ErrorCode.INVALID_EVENT and "input" in by_key["junk2"].error.message


async def test_agent_answers_a_repeated_kafka_request_from_the_cache(pipeline: Pipeline) -> None:
    payload = {"records": [{"k": uuid.uuid4().hex}]}
    async with RawClient(pipeline.settings) as client:
        for rid in ("c1", "c2"):
            await client.send_request(
                "data",
                {
                    "id": f"{rid}-{payload['records'][0]['k']}",
                    "task": "analyze",
                    "input": payload,
                    "reply_to": client.reply_topic,
                },
            )
            await client.read(client.reply_topic, 1 if rid == "c1" else 2)
        replies = [ReplyEvent.model_validate(r) for r in await client.read(client.reply_topic, 2)]
    assert [r.cached for r in replies] == [False, True]
