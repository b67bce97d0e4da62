"""Priority lanes against the real broker, Redis and agent process (streams.batching.BulkLane, streams.app's
topic pause): a slow data agent (``tests.fault_runners:slow_data``, 0.1 s per batch of at most 16) with a bulk
backlog produced Kafka-direct to ``{prefix}.data.bulk``.

* interactive requests through the edge are answered while the bulk backlog is still large, each taken by the
  agent within a batch or two (FIFO, it would wait behind every bulk event buffered between the broker and the
  model: 814 bulk events, ~5 s, measured with the lanes off);
* under a flood of interactive events that fills every batch, bulk still advances (its min share);
* every event of both lanes is answered exactly once (no faults here: no redelivery either);
* the lag of each lane shows in ``aisemble lag --json`` and ``/status.json`` (a stopped agent, then drained);
* ``aisemble produce --bulk`` sends to the bulk topic, and its requests are answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from aisemble.pipeline import Pipeline
from streams.settings import Settings
from streams.topics import consumer_group, service_topics
from tests.kafka_client import RawClient, committed_and_end
from tests.test_lag import _cli_lag, _group, _http_lag
from tests.test_replay import _cli, _json

pytestmark = pytest.mark.integration

BULK = 1500  # at most 16 per 0.1 s batch: >= 9 s of backlog
FLOOD = 600  # interactive events that keep every batch full of interactive work for a while
BATCH_S = 0.1
MAX_BATCH = 16
MIN_SHARE = 0.25  # 4 bulk slots of 16 under a full interactive load


@pytest.fixture
def pipeline(infra_settings: Settings, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline.isolated(
        infra_settings,
        ["data"],
        tmp_path,
        AISEMBLE_DATA__MAX_BATCH=str(MAX_BATCH),
        AISEMBLE_DATA__BULK_MIN_SHARE=str(MIN_SHARE),
        AISEMBLE_TEST_BATCH_S=str(BATCH_S),
    )
    p.add_agent("data", "--runner", "tests.fault_runners:slow_data")
    p.spawn_edge()
    try:
        yield p.wait_healthy()
    finally:
        p.stop()


class Replies:
    """Reads a reply topic from its start in the background: how many times each id was answered, and when."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings, self.topic = settings, topic
        self.count: Counter[str] = Counter()

    def answered(self, prefix: str) -> int:
        return sum(1 for rid in self.count if rid.startswith(prefix))

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while True:
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    for r in records:
                        rid = str(orjson.loads(r.value or b"{}")["id"])
                        self.count[rid] += 1
        finally:
            await consumer.stop()


def _event(rid: str, reply_to: str) -> bytes:
    return orjson.dumps({"id": rid, "task": "analyze", "input": {"records": [{"v": 1.0, "id": rid}]},
                         "reply_to": reply_to, "cache": False})  # fmt: skip


async def _wait_for(predicate: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_interactive_goes_first_bulk_keeps_its_share_and_both_lanes_are_answered_once(
    pipeline: Pipeline,
) -> None:
    topics = service_topics(pipeline.prefix, "data")
    async with RawClient(pipeline.settings) as client, httpx.AsyncClient(base_url=pipeline.url, timeout=60) as http:
        replies = Replies(pipeline.settings, client.reply_topic)
        reading = asyncio.create_task(replies.run())
        try:
            # The backlog is produced while the agent is stopped: its first fetch then holds all of it (a fetch hands
            # out up to a megabyte per partition unless bounded: streams.app.poll_records).
            group = consumer_group(pipeline.prefix, "data")
            deadline = time.monotonic() + 60
            while _group(await _http_lag(http, pipeline.url), group)["state"] != "Stable":
                assert time.monotonic() < deadline, "the data agents' group never became Stable"
                await asyncio.sleep(0.5)
            pid = pipeline.procs["data-0"].pid
            os.kill(pid, signal.SIGSTOP)
            try:
                bulk_ids = [f"b{n}-{uuid.uuid4().hex[:6]}" for n in range(BULK)]
                sends = [await client.producer.send(topics.bulk, _event(rid, client.reply_topic), key=rid.encode())
                         for rid in bulk_ids]  # fmt: skip
                await asyncio.gather(*sends)
            finally:
                os.kill(pid, signal.SIGCONT)
            await _wait_for(lambda: replies.answered("b") >= 2 * MAX_BATCH, 60)  # the agent is in the backlog

            # 1. Interactive through the edge, one after another: each answered long before the backlog drains.
            waits_ms = []
            for n in range(10):
                payload = {"operation": "analyze", "data": {"records": [{"v": float(n), "id": uuid.uuid4().hex}]}}
                response = await http.post("/data/process", json=payload)
                assert response.status_code == 200, response.text
                waits_ms.append(float(response.json()["timings_ms"]["queue_ms"]))
            backlog_left = BULK - replies.answered("b")
            # queue_ms: from the edge's produce to the agent taking the request. Behind the backlog's buffered bulk
            # it is seconds (lanes off: 8.2 s for the first request, measured); in front, a batch or two of 0.1 s.
            assert max(waits_ms) < 2000, waits_ms
            assert backlog_left > BULK // 3, f"the backlog drained first ({backlog_left} left)"

            # 2. A flood of interactive events fills every batch; bulk still advances by its min share.
            flood_ids = [f"i{n}-{uuid.uuid4().hex[:6]}" for n in range(FLOOD)]
            sends = [await client.producer.send(topics.requests, _event(rid, client.reply_topic), key=rid.encode())
                     for rid in flood_ids]  # fmt: skip
            await asyncio.gather(*sends)
            await _wait_for(lambda: replies.answered("i") >= 2 * MAX_BATCH, 60)
            bulk_at_start = replies.answered("b")
            await _wait_for(lambda: replies.answered("i") >= FLOOD // 2, 120)
            bulk_during = replies.answered("b") - bulk_at_start
            interactive_during = replies.answered("i") - 2 * MAX_BATCH
            # Full interactive batches would leave bulk nothing; its share is 4 of 16 (>= 1/5 of the interactive
            # answered meanwhile, with room for batches the flood did not fill).
            assert bulk_during >= interactive_during // 5, (bulk_during, interactive_during)
            assert replies.answered("i") < FLOOD  # the flood was still there all along

            # 3. Everything of both lanes answered, each once.
            await _wait_for(lambda: replies.answered("b") == BULK and replies.answered("i") == FLOOD, 240)
            await asyncio.sleep(1.0)  # a duplicate would show up now
            assert {rid: n for rid, n in replies.count.items() if n != 1} == {}
            assert set(replies.count) == set(bulk_ids) | set(flood_ids)
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading


async def test_each_lanes_lag_and_drain_show_in_aisemble_lag_and_the_status_page(
    infra_settings: Settings, tmp_path: Path
) -> None:
    pipeline = Pipeline.isolated(infra_settings, ["data"], tmp_path).start()
    topics = service_topics(pipeline.prefix, "data")
    group = consumer_group(pipeline.prefix, "data")
    pid = pipeline.procs["data"].pid
    stopped = False
    try:
        async with httpx.AsyncClient(timeout=30) as http, RawClient(pipeline.settings) as client:
            deadline = time.monotonic() + 60
            while _group(await _http_lag(http, pipeline.url), group)["state"] != "Stable":
                assert time.monotonic() < deadline, "the data agents' group never became Stable"
                await asyncio.sleep(0.5)
            os.kill(pid, signal.SIGSTOP)
            stopped = True
            for topic, count in ((topics.bulk, 120), (topics.requests, 30)):
                sends = [await client.producer.send(topic, _event(f"l{n}-{uuid.uuid4().hex[:6]}", client.reply_topic))
                         for n in range(count)]  # fmt: skip
                await asyncio.gather(*sends)

            lanes = _group(_cli_lag(pipeline, "--interval", "0.5"), group)["lanes"]
            assert isinstance(lanes, dict)
            assert {k: (v["lag"], v["drain"]) for k, v in lanes.items()} == {
                "interactive": (30, "not draining"),
                "bulk": (120, "not draining"),
            }
            status = (await http.get(f"{pipeline.url}/status.json")).json()["services"]["data"]
            assert status["lag"] == 150
            assert {k: v["lag"] for k, v in status["lanes"].items()} == {"interactive": 30, "bulk": 120}

            os.kill(pid, signal.SIGCONT)
            stopped = False
            deadline = time.monotonic() + 120
            while True:
                status = (await http.get(f"{pipeline.url}/status.json")).json()["services"]["data"]
                if {k: v["lag"] for k, v in status["lanes"].items()} == {"interactive": 0, "bulk": 0}:
                    break
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.5)
            assert all(v["drain_s"] == 0.0 and v["draining"] for v in status["lanes"].values()), status

            inputs = tmp_path / "bulk.jsonl"
            inputs.write_bytes(b"".join(orjson.dumps({"records": [{"v": n}]}) + b"\n" for n in range(40)))
            args = ("produce", "data", str(inputs), "--task", "analyze", "--bulk", "--collect", "--json")
            produced = _json(await asyncio.to_thread(_cli, pipeline.env, *args, timeout=120))
            assert produced["sent"] == 40 and produced["answered"] == 40 and produced["errors"] == {}
            assert (await committed_and_end(pipeline.settings, group, topics.bulk))[1] == 120 + 40
            assert (await committed_and_end(pipeline.settings, group, topics.requests))[1] == 30
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        pipeline.stop()
