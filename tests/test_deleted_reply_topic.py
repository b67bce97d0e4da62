"""A reply topic deleted while requests for it wait (as ``aisemble replay`` deletes its own), against the real
broker and a real agent process: the agent keeps running, dead-letters the deleted topic's requests
``reply_undeliverable`` within seconds, and answers the requests of a live topic, sent alongside, promptly.

Before: the agent trusted a topic it had once seen for ever, sent to the deleted topic, retried for
``delivery_retry_s`` (60 s) holding every batch behind it, and then exited 3.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aisemble.pipeline import Pipeline
from streams.replay import delete_topics
from streams.settings import Settings
from streams.topics import ensure_topics, partitions_of
from tests.kafka_client import RawClient

pytestmark = pytest.mark.integration

ROUNDS = 3  # requests to the deleted topic (and to the live one) per round


@pytest.fixture
def pipeline(infra_settings: Settings, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline.isolated(infra_settings, [], tmp_path)
    p.add_agent("data")
    yield p
    p.stop()


def _request(rid: str, reply_to: str) -> dict[str, object]:
    return {"id": rid, "task": "analyze", "input": {"records": [{"v": 1}]}, "reply_to": reply_to, "cache": False}


async def test_a_deleted_reply_topic_is_dead_lettered_within_seconds_and_the_agent_keeps_serving(
    pipeline: Pipeline,
) -> None:
    settings = pipeline.settings
    doomed = f"{pipeline.prefix}.replies.replay-{uuid.uuid4().hex[:6]}"
    await ensure_topics(settings, [(doomed, 1)])
    async with RawClient(settings) as client:
        live = client.reply_topic
        await client.send_many("data", [_request("first", doomed), _request("warm", live)])
        assert [r["id"] for r in await client.read(doomed, 1, timeout_s=120)] == ["first"]
        await client.read(live, 1, timeout_s=60)

        assert await delete_topics(settings, [doomed])
        gone_ids, live_ids = [], []
        for n in range(2):  # at once after the delete (the agent has just written there), then a few seconds on
            started = time.monotonic()
            batch_gone = [f"gone{n}-{i}" for i in range(ROUNDS)]
            batch_live = [f"live{n}-{i}" for i in range(ROUNDS)]
            events = [e for pair in zip(batch_gone, batch_live, strict=True) for e in pair]
            await client.send_many(
                "data", [_request(rid, doomed if rid.startswith("gone") else live) for rid in events]
            )
            await asyncio.sleep(0.5)  # requests of a later batch, behind the one with the deleted topic's
            later = [f"later{n}-{i}" for i in range(ROUNDS)]
            sent_later = time.monotonic()
            await client.send_many("data", [_request(rid, live) for rid in later])
            gone_ids += batch_gone
            live_ids += batch_live + later
            replies = await client.read(live, 1 + len(live_ids), timeout_s=60, distinct="id")
            live_s = time.monotonic() - sent_later
            letters = await client.read(f"{pipeline.prefix}.data.dlq", len(gone_ids), timeout_s=60)
            letters_s = time.monotonic() - started
            counts = {"test": "deleted_reply_topic", "round": n, "live_answered_s": round(live_s, 2),
                      "dead_lettered_s": round(letters_s, 2)}  # fmt: skip
            print("FAULT-COUNTS:", json.dumps(counts))
            assert {r["id"] for r in replies} == {"warm", *live_ids}
            assert sorted(str(letter["key"]) for letter in letters) == sorted(gone_ids)
            assert all(letter["error"]["code"] == "reply_undeliverable" for letter in letters), letters  # type: ignore[index]
            # Measured on 2 shared cores: live ~0.1-3 s, dead letters ~0.1-3.2 s (before: 60 s, then exit 3).
            assert live_s < 15, f"a later batch's live replies took {live_s:.1f}s: they waited on the deleted topic"
            assert letters_s < 20, f"dead-lettering took {letters_s:.1f}s"
            assert pipeline.exited() == {}, pipeline.log_tail("data-0")
            await asyncio.sleep(4)  # past the time a topic seen to exist is trusted (agents.sink.KNOWN_TTL_S)
    assert await partitions_of(settings, doomed) == [], "nothing re-created the deleted topic"
