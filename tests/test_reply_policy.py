"""Where agents may write, against the real broker: a request whose ``reply_to`` is outside the policy or
names a topic that does not exist is not run, is dead-lettered ``reply_to_refused`` at once, and no topic
is created by it; the valid requests around it are answered."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aisemble.pipeline import Pipeline, throwaway_prefix
from streams.settings import Settings
from streams.topics import ensure_service_topics, partitions_of
from tests.kafka_client import RawClient

pytestmark = pytest.mark.integration


@pytest.fixture
def pipeline(infra_settings: Settings, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline.isolated(infra_settings, [], tmp_path)
    p.add_agent("data")
    yield p
    p.stop()


async def test_reply_to_outside_the_policy_or_missing_is_refused_and_creates_nothing(pipeline: Pipeline) -> None:
    prefix = pipeline.prefix
    hostile = [
        f"{prefix}.nlp.requests",  # another service's request topic: a loop
        f"{prefix}.data.requests",  # its own
        f"{prefix}.data.results",
        f"{prefix}.llm.dlq",
        "__consumer_offsets",
        f"somewhere-{uuid.uuid4().hex[:6]}",
        f"{prefix}.replies.never-created-{uuid.uuid4().hex[:6]}",  # allowed name, but no such topic
    ]
    await ensure_service_topics(pipeline.settings, ["nlp"])  # so a write into it would be seen
    async with RawClient(pipeline.settings) as client:
        good = [f"ok{i}-{uuid.uuid4().hex[:6]}" for i in range(5)]
        events = [
            {"id": f"bad{i}", "task": "analyze", "input": {"records": [{"v": 1}]}, "reply_to": topic}
            for i, topic in enumerate(hostile)
        ]
        events += [
            {"id": rid, "task": "analyze", "input": {"records": [{"v": 1}]}, "reply_to": client.reply_topic}
            for rid in good
        ]
        started = time.monotonic()
        await client.send_many("data", events)
        letters = await client.read(f"{prefix}.data.dlq", len(hostile), timeout_s=120)
        refused_after_s = time.monotonic() - started
        replies = await client.read(client.reply_topic, len(good), timeout_s=60, distinct="id")
        created = [t for t in hostile[5:] if await partitions_of(pipeline.settings, t)]
        nlp_requests = await client.read(f"{prefix}.nlp.requests", 1, timeout_s=2)
    counts = {"test": "reply_policy", "sent": len(events), "dead_lettered": len(letters),
              "answered": len({r["id"] for r in replies}), "refused_within_s": round(refused_after_s, 2)}  # fmt: skip
    print("FAULT-COUNTS:", json.dumps(counts))
    assert sorted(str(letter["key"]) for letter in letters) == sorted(f"bad{i}" for i in range(len(hostile)))
    assert all(letter["error"]["code"] == "reply_to_refused" for letter in letters)
    assert {r["id"] for r in replies} == set(good)
    assert created == [], "a refused reply_to must never create a topic"
    assert nlp_requests == [], "nothing was written into another service's request topic"


def test_topics_create_makes_the_service_and_reply_topics(infra_settings: Settings) -> None:
    import asyncio
    import os
    import subprocess
    import sys

    prefix = throwaway_prefix()
    env = {**os.environ, "AISEMBLE_KAFKA_BOOTSTRAP": infra_settings.kafka_bootstrap, "AISEMBLE_TOPIC_PREFIX": prefix,
           "AISEMBLE_SERVICES": '["data"]'}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "aisemble", "topics", "create", "--reply", "me", "--partitions", "2"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert f"{prefix}.replies.me" in out.stdout
    settings = infra_settings.model_copy(update={"topic_prefix": prefix})
    assert asyncio.run(partitions_of(settings, f"{prefix}.replies.me")) == [0, 1]
    assert asyncio.run(partitions_of(settings, f"{prefix}.data.requests")) == [0, 1, 2, 3]
