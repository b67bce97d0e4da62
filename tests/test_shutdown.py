"""Graceful stop: SIGTERM mid-batch answers the batch in hand and commits it; past the grace period it
exits without committing, and the batch is answered by the next agent. Nothing is lost either way."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from pathlib import Path

import pytest

from aisemble.pipeline import Pipeline
from streams.settings import Settings
from streams.topics import consumer_group
from tests.kafka_client import RawClient, committed_and_end

pytestmark = [pytest.mark.integration, pytest.mark.fault]


async def _wait_for_log(pipeline: Pipeline, name: str, text: str, timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if text in pipeline.log_tail(name, 200_000):
            return True
        await asyncio.sleep(0.1)
    return False


def _exit_status(pipeline: Pipeline, name: str, timeout_s: float) -> int | None:
    try:
        return pipeline.procs[name].wait(timeout=timeout_s)
    except Exception:  # noqa: BLE001  (still running: reported as None)
        return None


@pytest.mark.slow
async def test_sigterm_mid_llm_batch_answers_and_commits_the_batch(infra_settings: Settings, tmp_path: Path) -> None:
    # A linger of 1 s gathers the 8 requests into one batch (naturally, the first would run alone at once).
    pipeline = Pipeline.isolated(
        infra_settings, ["llm"], tmp_path, AISEMBLE_LLM__MAX_BATCH="8", AISEMBLE_LLM__MAX_WAIT_MS="1000"
    ).start()
    try:
        async with RawClient(pipeline.settings) as client:
            ids = [f"llm{i}-{uuid.uuid4().hex[:6]}" for i in range(8)]
            events = [
                {
                    "id": rid,
                    "task": "completion",
                    "input": {"prompt": f"Write a long story about {i}.", "max_tokens": 64, "temperature": 0.0},
                    "reply_to": client.reply_topic,
                    "cache": False,
                }
                for i, rid in enumerate(ids)
            ]
            await client.send_many("llm", events)
            await asyncio.sleep(2.5)  # the agent has taken the batch and is generating (several seconds)
            pipeline.procs["llm"].send_signal(signal.SIGTERM)
            in_hand = await _wait_for_log(pipeline, "llm", "finishing the batch in hand", 10)
            status = _exit_status(pipeline, "llm", 60)
            by_stopping_agent = await client.read(client.reply_topic, 8, timeout_s=5, distinct="id")
            topic = f"{pipeline.prefix}.llm.requests"
            committed, end = await committed_and_end(pipeline.settings, consumer_group(pipeline.prefix, "llm"), topic)
            answered_first = {r["id"] for r in by_stopping_agent}
            pipeline.add_agent("llm")  # whatever was left (buffered, not in hand) is served by the next agent
            replies = await client.read(client.reply_topic, 8, timeout_s=180, distinct="id")
        answered = {r["id"] for r in replies}
        counts = {
            "test": "sigterm_mid_llm_batch",
            "sent": len(ids),
            "answered_by_stopping_agent": len(answered_first),
            "answered": len(answered & set(ids)),
            "committed_at_exit": committed,
            "end_offset": end,
            "exit_status": status,
            "lost": len(set(ids) - answered),
        }
        print("FAULT-COUNTS:", json.dumps(counts))
        assert in_hand, "SIGTERM did not land mid-batch: the agent had no batch in hand"
        assert status == 0
        assert answered_first, "the batch in hand was not answered before the agent exited"
        assert committed == len(answered_first), "what was answered and only that must be committed"
        assert set(ids) <= answered
        assert all(r["ok"] for r in replies)
    finally:
        pipeline.stop()


async def test_sigterm_past_the_grace_period_commits_nothing_of_the_batch(
    infra_settings: Settings, tmp_path: Path
) -> None:
    pipeline = Pipeline.isolated(
        infra_settings,
        [],
        tmp_path,
        AISEMBLE_SHUTDOWN_GRACE_S="0.5",
        AISEMBLE_TEST_BATCH_S="5",
        AISEMBLE_DATA__MAX_BATCH="16",
    )
    name = pipeline.add_agent("data", "--runner", "tests.fault_runners:slow_data")
    try:
        async with RawClient(pipeline.settings) as client:
            ids = [f"g{i}-{uuid.uuid4().hex[:6]}" for i in range(16)]
            events = [
                {"id": rid, "task": "analyze", "input": {"records": [{"v": i}]}, "reply_to": client.reply_topic,
                 "cache": False}
                for i, rid in enumerate(ids)
            ]  # fmt: skip
            await client.send_many("data", events)
            assert await _wait_for_log(pipeline, name, "data model(s) loaded", 60)
            await asyncio.sleep(4.0)  # joined the group and taken the batch; the slow runner holds it 5 s
            pipeline.procs[name].send_signal(signal.SIGTERM)
            over = await _wait_for_log(pipeline, name, "grace period over", 20)
            status = _exit_status(pipeline, name, 30)
            topic = f"{pipeline.prefix}.data.requests"
            committed, end = await committed_and_end(pipeline.settings, consumer_group(pipeline.prefix, "data"), topic)
            pipeline.env["AISEMBLE_TEST_BATCH_S"] = "0"
            pipeline.add_agent("data", "--runner", "tests.fault_runners:slow_data")
            replies = await client.read(client.reply_topic, len(ids), timeout_s=120, distinct="id")
        answered = {r["id"] for r in replies}
        counts = {
            "test": "sigterm_past_grace",
            "sent": len(ids),
            "committed_at_exit": committed,
            "end_offset": end,
            "exit_status": status,
            "answered": len(answered & set(ids)),
            "lost": len(set(ids) - answered),
        }
        print("FAULT-COUNTS:", json.dumps(counts))
        assert over, "the agent did not report the grace period running out"
        assert status == 0
        assert committed == 0 and end == len(ids)
        assert set(ids) <= answered
    finally:
        pipeline.stop()
