"""At-least-once delivery under faults in a real agent: SIGKILL mid-stream, agents joining and leaving
(rebalances), an exception in the batch path, and a large poison event. Each counts sent / answered /
dead-lettered / lost and requires lost == 0."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from aisemble.pipeline import Pipeline
from streams.settings import Settings
from streams.topics import consumer_group
from tests.kafka_client import RawClient

pytestmark = pytest.mark.integration


@pytest.fixture
def pipeline(infra_settings: Settings, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline.isolated(infra_settings, ["data"], tmp_path, AISEMBLE_DATA__MAX_BATCH="16").start()
    yield p
    p.stop()


class _CommitWatch:
    """Samples, every ``interval_s``, the group's committed offsets and then every reply written so far; a request
    below a committed offset with no reply yet was committed before it was answered (a loss no restart sees)."""

    def __init__(
        self, settings: Settings, group: str, topic: str, reply_topic: str, placed: dict[str, tuple[int, int]]
    ) -> None:
        self.settings, self.group, self.topic, self.placed = settings, group, topic, placed
        self.reply = TopicPartition(reply_topic, 0)
        self.answered: set[str] = set()
        self.committed: dict[int, int] = {}
        self.committed_unanswered: set[str] = set()
        self.samples = 0

    async def __aenter__(self) -> _CommitWatch:
        self.admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False)
        await self.admin.start()
        await self.consumer.start()
        self.consumer.assign([self.reply])
        await self.consumer.seek_to_beginning(self.reply)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()
        await self.admin.close()

    async def sample(self) -> None:
        """Committed offsets first, then the replies up to the end offset of now: a reply acknowledged before its
        offset was committed is always seen."""
        offsets = await self.admin.list_consumer_group_offsets(self.group)
        self.committed = {tp.partition: max(m.offset, 0) for tp, m in offsets.items() if tp.topic == self.topic}
        end = (await self.consumer.end_offsets([self.reply]))[self.reply]
        async with asyncio.timeout(60):
            while await self.consumer.position(self.reply) < end:
                for records in (await self.consumer.getmany(self.reply, timeout_ms=500)).values():
                    self.answered.update(str(orjson.loads(r.value)["id"]) for r in records if r.value is not None)
        self.committed_unanswered |= self.committed_ids() - self.answered
        self.samples += 1

    def committed_ids(self) -> set[str]:
        return {rid for rid, (partition, offset) in self.placed.items() if offset < self.committed.get(partition, 0)}

    async def run(self, stop: asyncio.Event, interval_s: float = 0.05) -> None:
        while not stop.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)


async def test_kill_9_mid_stream_loses_nothing(pipeline: Pipeline) -> None:
    """SIGKILL while requests are in flight. Never, from the first answer to the kill, is a committed offset past
    an unanswered request (a commit ahead of its reply is a loss no restart sees): sampled every 50 ms, and once
    more after the kill. The next agent answers every request; duplicates are only of requests answered but not
    yet committed at the kill."""
    total = 1500
    records = [{"id": i, "value": float(i), "tag": "x" * 50} for i in range(400)]  # a few ms per item
    topic = f"{pipeline.prefix}.data.requests"
    async with RawClient(pipeline.settings) as client:
        ids = [f"k{i}-{uuid.uuid4().hex[:6]}" for i in range(total)]
        events = [{"id": rid, "task": "analyze", "input": {"records": records}, "reply_to": client.reply_topic,
                   "cache": False} for rid in ids]  # fmt: skip
        placed: dict[str, tuple[int, int]] = {}  # request id -> (partition, offset), filled as the broker acks
        group = consumer_group(pipeline.prefix, "data")
        async with _CommitWatch(pipeline.settings, group, topic, client.reply_topic, placed) as watch:
            stop = asyncio.Event()
            watching = asyncio.create_task(watch.run(stop))  # from before the first request to after the kill

            async def place(rid: str, event: dict[str, object]) -> None:
                meta = await (await client.producer.send(topic, orjson.dumps(event), key=rid.encode()))
                placed[rid] = (meta.partition, meta.offset)

            sending = asyncio.gather(*(place(rid, event) for rid, event in zip(ids, events, strict=True)))
            # Wait until the agent is part-way through, then kill it without any chance to commit.
            seen = await client.read(client.reply_topic, total // 5, timeout_s=120, distinct="id")
            pipeline.kill("data", signal.SIGKILL)
            await sending
            stop.set()
            await watching
            await watch.sample()  # the dead agent writes and commits nothing more: the next agent starts here
        answered_at_kill, committed_at_kill = set(watch.answered), watch.committed_ids()
        pipeline.add_agent("data")
        replies = await client.read(client.reply_topic, total, timeout_s=240, distinct="id")
    answered = {str(r["id"]) for r in replies}
    counts = {
        "test": "kill_9_mid_stream",
        "sent": total,
        "answered_before_kill": len({r["id"] for r in seen}),
        "answered_at_kill": len(answered_at_kill),
        "in_flight_at_kill": total - len(answered_at_kill),
        "committed_at_kill": len(committed_at_kill),
        "commit_samples": watch.samples,
        "committed_unanswered": len(watch.committed_unanswered),
        "answered_uncommitted_at_kill": len(answered_at_kill - committed_at_kill),
        "answered": len(answered),
        "duplicates": len(replies) - len(answered),
        "lost": len(set(ids) - answered),
    }
    print("FAULT-COUNTS:", json.dumps(counts))
    assert counts["in_flight_at_kill"] > 0, "the agent finished before the kill: raise `total`"
    assert counts["commit_samples"] >= 10 and counts["committed_at_kill"] > 0, counts
    assert counts["committed_unanswered"] == 0, "an offset was committed before its request was answered"
    assert set(ids) == answered, f"{len(set(ids) - answered)} requests lost"
    assert all(r["ok"] for r in replies)
    # Redelivery after the kill answers again only what was answered and not yet committed (at-least-once).
    assert counts["duplicates"] <= counts["answered_uncommitted_at_kill"], counts


async def _send_all(client: RawClient, ids: list[str], records: list[dict[str, object]], **extra: object) -> None:
    await client.send_many(
        "data",
        [
            {"id": rid, "task": "analyze", "input": {"records": records}, "reply_to": client.reply_topic,
             "cache": False, **extra}
            for rid in ids
        ],
    )  # fmt: skip


@pytest.mark.fault
async def test_rebalance_agents_joining_and_leaving_mid_stream_lose_nothing(
    infra_settings: Settings, tmp_path: Path
) -> None:
    # A model taking 0.1 s per batch of 8 makes the stream last ~25 s for one agent, so both rebalances
    # (a second agent joining, then the first leaving with SIGTERM) happen while requests are in flight.
    # Both are graceful: what was answered is committed before the partitions move (streams.app
    # CommittingConsumer), so nothing is answered twice.
    slow = ("--runner", "tests.fault_runners:slow_data")
    pipeline = Pipeline.isolated(
        infra_settings, [], tmp_path, AISEMBLE_DATA__MAX_BATCH="8", AISEMBLE_TEST_BATCH_S="0.1"
    )
    first = pipeline.add_agent("data", *slow)
    try:
        total = 2000
        async with RawClient(pipeline.settings) as client:
            ids = [f"r{i}-{uuid.uuid4().hex[:6]}" for i in range(total)]
            await _send_all(client, ids, [{"v": 1}, {"v": 2}])
            seen_at_join = await client.read(client.reply_topic, total // 10, timeout_s=120, distinct="id")
            second = pipeline.add_agent("data", *slow)  # a second agent joins: the group rebalances
            seen_at_leave = await client.read(client.reply_topic, total // 2, timeout_s=180, distinct="id")
            pipeline.kill(first, signal.SIGTERM)  # the first one leaves gracefully: rebalances again
            first_status = pipeline.procs[first].returncode
            await client.read(client.reply_topic, total, timeout_s=240, distinct="id")
            # Everything is answered; read the whole reply topic again after a pause, so that a duplicate
            # written late (a redelivered batch) is counted too.
            replies = await client.read(client.reply_topic, 10 * total, timeout_s=8)
            still_running = pipeline.procs[second].poll() is None
            rebalanced = [
                pipeline.log_tail(name, 400_000).count("revoked partitions committed") for name in (first, second)
            ]
        answered = {r["id"] for r in replies}
        times: dict[object, int] = {}
        for r in replies:
            times[r["id"]] = times.get(r["id"], 0) + 1
        counts = {
            "test": "rebalance_join_and_leave",
            "sent": total,
            "answered_at_join": len({r["id"] for r in seen_at_join}),
            "answered_at_leave": len({r["id"] for r in seen_at_leave}),
            "answered": len(answered & set(ids)),
            "duplicates": len(replies) - len(answered),
            "ids_answered_twice_or_more": sum(1 for n in times.values() if n > 1),
            "revoke_commits_first_second": rebalanced,
            "lost": len(set(ids) - answered),
        }
        print("FAULT-COUNTS:", json.dumps(counts))
        assert counts["answered_at_leave"] < total, "the stream ended before the first agent left: slow it down"
        assert still_running and first_status == 0
        assert set(ids) <= answered, f"{len(set(ids) - answered)} requests lost"
        assert all(r["ok"] for r in replies)
        assert rebalanced[0] >= 1 and rebalanced[1] >= 1, "a rebalance happened in each agent without a commit"
        assert counts["ids_answered_twice_or_more"] == 0, "a graceful rebalance answered requests twice"
    finally:
        pipeline.stop()


async def test_an_exception_in_the_batch_path_dead_letters_only_the_poison(
    infra_settings: Settings, tmp_path: Path
) -> None:
    pipeline = Pipeline.isolated(infra_settings, [], tmp_path, AISEMBLE_DATA__MAX_BATCH="16")
    pipeline.add_agent("data", "--runner", "tests.fault_runners:poison_data")
    try:
        total = 600
        async with RawClient(pipeline.settings) as client:
            ids = [f"e{i}-{uuid.uuid4().hex[:6]}" for i in range(total)]
            poison = set(ids[::50])
            marks: dict[str, object] = {"poison": 1}
            events = [
                {"id": rid, "task": "analyze", "input": {"records": [{"v": 1}], **(marks if rid in poison else {})},
                 "reply_to": client.reply_topic, "cache": False}
                for rid in ids
            ]  # fmt: skip
            await client.send_many("data", events)
            replies = await client.read(client.reply_topic, total - len(poison), timeout_s=120, distinct="id")
            letters = await client.read(f"{pipeline.prefix}.data.dlq", len(poison), timeout_s=60)
        answered = {r["id"] for r in replies}
        dead = {str(letter["key"]) for letter in letters}
        counts = {
            "test": "exception_in_batch_path",
            "sent": total,
            "answered": len(answered),
            "dead_lettered": len(dead),
            "lost": len(set(ids) - answered - dead),
        }
        print("FAULT-COUNTS:", json.dumps(counts))
        assert answered == set(ids) - poison and all(r["ok"] for r in replies)
        assert dead == poison and all(letter["error"]["code"] == "internal" for letter in letters)
        assert pipeline.exited() == {}, "the agent must survive its poison records"
    finally:
        pipeline.stop()


async def test_a_large_random_event_is_dead_lettered_and_never_stalls_the_service(
    infra_settings: Settings, tmp_path: Path
) -> None:
    """The issue's reproduction: ~900 KB of random bytes on the request topic used to become a dead letter
    too large to produce, and the agent retried that batch forever."""
    pipeline = Pipeline.isolated(infra_settings, ["data"], tmp_path).start()
    try:
        blob = os.urandom(900_000)
        async with RawClient(pipeline.settings) as client:
            await client.send(f"{pipeline.prefix}.data.requests", blob, key=b"junk")
            ids = [f"a{i}-{uuid.uuid4().hex[:6]}" for i in range(50)]
            await _send_all(client, ids, [{"v": 1}])
            replies = await client.read(client.reply_topic, len(ids), timeout_s=60, distinct="id")
            (letter,) = await client.read(f"{pipeline.prefix}.data.dlq", 1, timeout_s=30)
        counts = {"test": "large_random_event", "sent": 51, "answered": len({r["id"] for r in replies}),
                  "dead_lettered": 1, "lost": len(set(ids) - {r["id"] for r in replies})}  # fmt: skip
        print("FAULT-COUNTS:", json.dumps(counts))
        assert {r["id"] for r in replies} == set(ids)
        assert letter["error"]["code"] == "invalid_encoding" and letter["truncated"] is True
        assert letter["payload_bytes"] == len(blob)
        assert letter["payload_sha256"] == hashlib.sha256(blob).hexdigest()
        assert base64.b64decode(letter["payload"]) == blob[: len(base64.b64decode(letter["payload"]))]
    finally:
        pipeline.stop()
