"""At-least-once delivery: an agent killed with SIGKILL mid-stream loses no request."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aisemble.pipeline import Pipeline
from streams.settings import Settings
from tests.kafka_client import RawClient

pytestmark = pytest.mark.integration


@pytest.fixture
def pipeline(infra_settings: Settings, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline.isolated(infra_settings, ["data"], tmp_path, AISEMBLE_DATA__MAX_BATCH="16").start()
    yield p
    p.stop()


async def test_kill_9_mid_stream_loses_nothing(pipeline: Pipeline) -> None:
    total = 1500
    records = [{"id": i, "value": float(i), "tag": "x" * 50} for i in range(400)]  # a few ms per item
    async with RawClient(pipeline.settings) as client:
        ids = [f"k{i}-{uuid.uuid4().hex[:6]}" for i in range(total)]
        for rid in ids:
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
        # Wait until the agent is part-way through, then kill it without any chance to commit.
        seen = await client.read(client.reply_topic, total // 5, timeout_s=120)
        assert len(seen) < total, "the agent finished before the kill: raise `total`"
        pipeline.kill("data", signal.SIGKILL)
        pipeline.add_agent("data")
        replies = await client.read(client.reply_topic, total, timeout_s=240, distinct="id")
    answered = {r["id"] for r in replies}
    assert set(ids) <= answered, f"{len(set(ids) - answered)} requests lost"
    assert all(r["ok"] for r in replies)
    # Redelivery after the kill may answer some twice (at-least-once); every reply is for a known id.
    assert answered <= set(ids)
