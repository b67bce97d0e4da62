"""The edge answers only its callers: a client that retries with the same X-Request-Id after a 504 gets
the answer to its new call, never the late answer to its earlier, different one (replies are matched on
an unguessable correlation id the edge generates per call, plus id, service and task)."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import httpx
import pytest

from aisemble.pipeline import Pipeline
from streams.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.fault]


async def test_a_retry_with_the_same_request_id_never_gets_the_earlier_calls_late_answer(
    infra_settings: Settings, tmp_path: Path
) -> None:
    pipeline = Pipeline.isolated(infra_settings, ["data"], tmp_path, AISEMBLE_REQUEST_TIMEOUT_S="15").start()
    try:
        pipeline.kill("data", signal.SIGTERM)  # no agent: the first call can only time out
        rid = f"same-{uuid.uuid4().hex[:8]}"
        first = {"operation": "analyze", "data": {"records": [{"v": 1}]}, "cache": False}
        second = {"operation": "analyze", "data": {"records": [{"v": 1}, {"v": 2}, {"v": 3}]}, "cache": False}
        async with httpx.AsyncClient(base_url=pipeline.url, timeout=60) as client:
            late = await client.post("/data/process", json=first, headers={"X-Request-Id": rid})
            assert late.status_code == 504
            # The agent comes back and finds both requests: the first (now late) one is answered first.
            pipeline.add_agent("data")
            retry = await client.post("/data/process", json=second, headers={"X-Request-Id": rid})
            health = (await client.get("/health")).json()
        assert retry.status_code == 200, retry.text
        body = retry.json()
        assert body["id"] == rid and body["output"]["count"] == 3, "the retry got the earlier call's answer"
        assert health["edge"]["replies_dropped"] >= 1  # the late answer arrived and was dropped, counted
    finally:
        pipeline.stop()


async def test_a_forged_reply_cannot_resolve_a_waiting_call(infra_settings: Settings, tmp_path: Path) -> None:
    """Anyone who can write to the edge's reply topic and knows a request id still cannot answer it."""
    from aiokafka import AIOKafkaProducer

    from schemas import ReplyEvent
    from streams.codec import encode
    from streams.topics import edge_reply_topic

    pipeline = Pipeline.isolated(infra_settings, ["data"], tmp_path, AISEMBLE_REQUEST_TIMEOUT_S="4").start()
    try:
        pipeline.kill("data", signal.SIGTERM)
        rid = f"victim-{uuid.uuid4().hex[:8]}"
        producer = AIOKafkaProducer(bootstrap_servers=pipeline.settings.kafka_bootstrap)
        await producer.start()
        try:
            async with httpx.AsyncClient(base_url=pipeline.url, timeout=30) as client:
                body = {"operation": "analyze", "data": {"records": [{"v": 1}]}, "cache": False}
                call = asyncio.create_task(client.post("/data/process", json=body, headers={"X-Request-Id": rid}))
                await asyncio.sleep(1.0)
                for correlation_id in (None, "guessed"):
                    forged = ReplyEvent(id=rid, correlation_id=correlation_id, service="data", task="analyze",
                                        ok=True, output={"count": 999})  # fmt: skip
                    await producer.send_and_wait(
                        edge_reply_topic(pipeline.prefix, pipeline.settings.edge_id), encode(forged)
                    )
                response = await call
                health = (await client.get("/health")).json()
        finally:
            await producer.stop()
        assert response.status_code == 504, response.text  # nobody real answered; the forgeries did not
        assert health["edge"]["replies_dropped"] >= 2
    finally:
        pipeline.stop()
