"""An agent's memory under a backlog of large events stays bounded (``streams.app.stream_buffer_events``).

A real data agent (a slow runner: 3 s per batch, so the backlog stays) starts on a topic holding ~170 MB of
~0.7 MB events; its RSS is sampled (from ``/proc``: psutil is not among the locked dependencies) while it
works. With Faust's default stream buffer (4,096 events) it fetched the whole backlog into memory; sized from
``max_batch``/``max_batch_bytes`` it holds a few batches."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import pytest

from aisemble.pipeline import Pipeline
from streams.settings import Settings
from streams.topics import ensure_service_topics
from tests.kafka_client import RawClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc (Linux)"),
]

EVENTS = 240
PAD = 700_000
GROWTH_BOUND_MB = 80  # measured: well under half of it with the sized buffer; ~EVENTS * PAD with Faust's default


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_an_agent_under_a_backlog_of_large_events_holds_only_a_few_batches(
    infra_settings: Settings, tmp_path: Path
) -> None:
    pipeline = Pipeline.isolated(
        infra_settings,
        [],
        tmp_path,
        AISEMBLE_DATA__MAX_BATCH="4",
        AISEMBLE_DATA__MAX_BATCH_BYTES="2000000",
        AISEMBLE_TEST_BATCH_S="3",
    )
    try:
        await ensure_service_topics(pipeline.settings, ["data"])
        async with RawClient(pipeline.settings) as client:
            pad = "x" * PAD
            for start in range(0, EVENTS, 40):
                events = [
                    {"id": f"m{i}-{uuid.uuid4().hex[:6]}", "task": "analyze",
                     "input": {"records": [{"v": i, "pad": pad}]}, "reply_to": client.reply_topic, "cache": False}
                    for i in range(start, start + 40)
                ]  # fmt: skip
                await client.send_many("data", events)
            name = pipeline.add_agent("data", "--runner", "tests.fault_runners:slow_data")
            pid = pipeline.procs[name].pid
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 90
            while "model(s) loaded" not in pipeline.log_tail(name, 100_000):
                assert loop.time() < deadline, "the agent did not start"
                await asyncio.sleep(0.2)
            baseline = rss(pid)
            samples = []
            for _ in range(40):  # 20 s: the group is joined and the fetcher has had time to fill every buffer
                samples.append(rss(pid))
                await asyncio.sleep(0.5)
            answered = await client.read(client.reply_topic, 1, timeout_s=30)
        growth_mb = (max(samples) - baseline) / 1e6
        figures = {
            "backlog_mb": round(EVENTS * PAD / 1e6),
            "baseline_rss_mb": round(baseline / 1e6),
            "peak_rss_mb": round(max(samples) / 1e6),
            "growth_mb": round(growth_mb),
        }
        print("AGENT-MEMORY:", json.dumps(figures))
        assert answered, "the agent answered nothing: the measurement did not see it working"
        assert growth_mb < GROWTH_BOUND_MB, figures
    finally:
        pipeline.stop()
