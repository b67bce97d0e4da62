"""The continuous LLM loop through the real Kafka and Redis, with a tiny random Llama saved in tmp_path
(``AISEMBLE_LLM__MODEL``) and ``AISEMBLE_LLM__BATCHING=continuous``; plus the acknowledgement rule's units.

Reference texts come from the static path (``run_batch``, i.e. ``generate``) on each prompt alone, in this
process: the engine's greedy tokens equal them (``tests/test_llm_engine.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import faust
import orjson
import pytest
import torch
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import TP
from redis.asyncio import Redis

from agents.llm import LlmRunner, build_runner
from agents.loop import BatchProcessor
from agents.loops import ContinuousLoop
from agents.runner import Item
from agents.sink import METADATA_CHECK_S
from aisemble.pipeline import Pipeline, free_port
from streams.cancel import cancel_key
from streams.codec import Record
from streams.redis import connect
from streams.settings import LlmSettings, Settings
from streams.topics import wait_for_partitions
from tests.kafka_client import RawClient
from tests.test_llm_tiny_model import _save_model

LONG = 900  # tokens of a "long" row: a few seconds on the tiny model


# -- units: what Faust commits, and the loop's own rule ---------------------------------------------------


def test_faust_commits_past_a_gap_when_acked_out_of_order() -> None:
    """Why the loop keeps its own order: Faust's consumer computes the offset to commit from the acked
    offsets, and with the head of a partition unacked it still commits past it."""
    consumer = faust.App(f"probe-{uuid.uuid4().hex[:6]}", broker="kafka://127.0.0.1:9092").consumer
    tp = TP("t", 0)
    seen = {}
    for committed, acked in [(None, [1]), (None, [0, 2, 3]), (10, [11]), (10, [12, 13])]:
        consumer._committed_offset[tp] = committed
        consumer._acked[tp] = list(acked)
        consumer._acked_index[tp] = set(acked)
        seen[f"{committed}:{acked}"] = consumer._new_offset(tp)
    print("FAUST-OUT-OF-ORDER:", seen)
    assert seen["None:[1]"] == 2  # offset 0 never acked, yet 2 would be committed: 0 would be lost
    assert seen["10:[11]"] == 12  # the same with a commit behind: 10 would be lost
    assert seen["None:[0, 2, 3]"] == 1  # a gap after the head is respected


# -- through Kafka ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = _save_model(tmp_path_factory.mktemp("tiny-llama"))
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 1024  # long rows (RoPE has no learned positions)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def reference(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmRunner]:
    before = torch.get_num_threads()
    settings = Settings(
        cache_dir=tmp_path_factory.mktemp("ref-cache"), llm=LlmSettings(model=str(model_dir), device="cpu", threads=1)
    )
    runner = build_runner(settings)
    runner.load()
    yield runner
    torch.set_num_threads(before)


def _env(model_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "AISEMBLE_LLM__MODEL": str(model_dir),
        "AISEMBLE_LLM__DEVICE": "cpu",
        "AISEMBLE_LLM__THREADS": "1",
        "AISEMBLE_LLM__BATCHING": "continuous",
        "AISEMBLE_LLM__MAX_BATCH": "6",
        **extra,
    }


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    started = Pipeline.isolated(infra_settings, ["llm"], tmp_path_factory.mktemp("logs"), **_env(model_dir)).start()
    try:
        yield started
    finally:
        started.stop()


class Collector:
    """Every record of one reply topic, in order, read in the background."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self.records: list[dict[str, object]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        partitions = await wait_for_partitions(self.settings, self.topic)
        consumer.assign([TopicPartition(self.topic, p) for p in partitions])

        async def pump() -> None:
            try:
                while True:
                    for batch in (await consumer.getmany(timeout_ms=200)).values():
                        self.records.extend(orjson.loads(r.value) for r in batch)
            finally:
                await consumer.stop()

        self._task = asyncio.create_task(pump())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def wait(self, done: Callable[[list[dict[str, object]]], bool], timeout_s: float = 120.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not done(self.records):
            assert loop.time() < deadline, f"timed out; {len(self.records)} records: {self.records[-3:]}"
            await asyncio.sleep(0.05)

    def replies(self) -> dict[str, dict[str, object]]:
        return {str(r["id"]): r for r in self.records if not r.get("partial")}

    def partials(self) -> list[dict[str, object]]:
        return [r for r in self.records if r.get("partial")]

    def reply_index(self, rid: str) -> int:
        return next(i for i, r in enumerate(self.records) if not r.get("partial") and r["id"] == rid)


def _request(
    rid: str, reply_to: str, prompt: str, max_tokens: int, *, stream: bool = False, **params: object
) -> dict[str, object]:
    return {
        "id": rid,
        "task": "completion",
        "input": {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **params},
        "reply_to": reply_to,
        "cache": False,
        "stream": stream,
        "correlation_id": f"c-{rid}",
    }


def _expected(reference: LlmRunner, event: dict[str, object]) -> dict[str, object]:
    out = reference.run_batch([Item("completion", dict(event["input"]))])[0]  # type: ignore[arg-type]
    assert isinstance(out, dict), out
    return out


@pytest.fixture()
async def client(pipeline: Pipeline) -> AsyncIterator[tuple[RawClient, Collector]]:
    async with RawClient(pipeline.settings) as raw, Collector(pipeline.settings, raw.reply_topic) as collector:
        yield raw, collector


@pytest.mark.integration
async def test_rows_joining_a_running_generation_are_answered_and_partials_add_up(
    client: tuple[RawClient, Collector], reference: LlmRunner
) -> None:
    raw, collector = client
    topic = raw.reply_topic
    tag = uuid.uuid4().hex[:6]
    long = _request(f"long-{tag}", topic, "The quick brown fox", LONG, stream=True)
    await raw.send_request("llm", long)
    await collector.wait(lambda recs: any(r.get("partial") for r in recs))  # it is generating
    joiners = [
        _request(f"j1-{tag}", topic, "Kafka moves events between services", 7),
        _request(f"j2-{tag}", topic, "Paris is the capital of France", 23, stream=True),
        _request(f"j3-{tag}", topic, "Tokens", 40, stream=True, stop=["\x00never"]),
        _request(f"j4-{tag}", topic, "The weather", 16, temperature=1.0, seed=1234),
    ]
    await raw.send_many("llm", joiners)
    events = [long, *joiners]
    await collector.wait(lambda recs: all(str(e["id"]) in collector.replies() for e in events))
    replies = collector.replies()
    for event in events:
        reply = replies[str(event["id"])]
        assert reply["ok"], reply
        assert reply["correlation_id"] == event["correlation_id"]
        output = reply["output"]
        assert isinstance(output, dict)
        assert output["tokens"] == event["input"]["max_tokens"]  # type: ignore[index]  # per-row max_tokens
        if event["input"]["temperature"] == 0.0:  # type: ignore[index]
            assert output == _expected(reference, event), event["id"]
    # the joiners were answered while the long row still ran (static batches would answer them after it)
    assert all(collector.reply_index(str(j["id"])) < collector.reply_index(str(long["id"])) for j in joiners)
    # partials: one record per step per topic; per row, deltas in seq order that add up to the final text
    per_row: dict[str, list[dict[str, object]]] = {}
    shared = 0
    for record in collector.partials():
        deltas = record["deltas"]
        assert isinstance(deltas, list)
        ids = [d["id"] for d in deltas]
        assert len(ids) == len(set(ids))  # at most one delta per row in one record
        shared += len(ids) > 1
        for delta in deltas:
            per_row.setdefault(str(delta["id"]), []).append(delta)
    assert set(per_row) == {str(long["id"]), str(joiners[1]["id"]), str(joiners[2]["id"])}  # streaming rows only
    for rid, deltas in per_row.items():
        assert [d["seq"] for d in deltas] == list(range(len(deltas)))
        assert len({d["attempt"] for d in deltas}) == 1
        assert "".join(str(d["text"]) for d in deltas) == replies[rid]["output"]["text"]  # type: ignore[index]
        assert sum(int(str(d["tokens"])) for d in deltas) == replies[rid]["output"]["tokens"]  # type: ignore[index]
    print("CONTINUOUS-JOIN:", {"partial_records": len(collector.partials()), "records_with_several_rows": shared,
                               "long_first_token_ms": replies[str(long["id"])]["timings_ms"].get("first_token_ms")})  # type: ignore[union-attr]  # fmt: skip
    assert shared > 0  # rows of the same step shared a record


@pytest.mark.integration
async def test_a_seeded_row_has_the_same_text_alone_and_among_others(client: tuple[RawClient, Collector]) -> None:
    raw, collector = client
    topic = raw.reply_topic
    tag = uuid.uuid4().hex[:6]
    seeded = {"temperature": 1.0, "seed": 77}
    alone = _request(f"alone-{tag}", topic, "The weather", 30, **seeded)
    await raw.send_request("llm", alone)
    await collector.wait(lambda recs: str(alone["id"]) in collector.replies())
    crowd = [_request(f"c{i}-{tag}", topic, "The weather", 10 + 9 * i, temperature=1.0) for i in range(4)]
    again = _request(f"again-{tag}", topic, "The weather", 30, **seeded)
    await raw.send_many("llm", [crowd[0], crowd[1], again, crowd[2], crowd[3]])
    await collector.wait(lambda recs: all(str(e["id"]) in collector.replies() for e in [*crowd, again]))
    replies = collector.replies()
    assert replies[str(again["id"])]["output"] == replies[str(alone["id"])]["output"]


@pytest.mark.integration
async def test_cancel_key_stops_a_streaming_row(client: tuple[RawClient, Collector], pipeline: Pipeline) -> None:
    raw, collector = client
    topic = raw.reply_topic
    tag = uuid.uuid4().hex[:6]
    doomed = _request(f"doomed-{tag}", topic, "The quick brown fox", LONG, stream=True)
    other = _request(f"other-{tag}", topic, "Kafka moves events", 60, stream=True)
    await raw.send_many("llm", [doomed, other])
    await collector.wait(lambda recs: any(r.get("partial") for r in recs))
    redis = connect(pipeline.settings)
    try:
        await redis.set(cancel_key(pipeline.prefix, str(doomed["id"])), b"1", ex=60)
        await collector.wait(lambda recs: all(str(e["id"]) in collector.replies() for e in [doomed, other]))
    finally:
        await redis.aclose()
    replies = collector.replies()
    stopped = replies[str(doomed["id"])]
    assert not stopped["ok"] and stopped["error"]["code"] == "cancelled", stopped  # type: ignore[index]
    assert replies[str(other["id"])]["ok"]
    streamed = sum(
        int(d["tokens"])
        for r in collector.partials()
        for d in r["deltas"]
        if d["id"] == doomed["id"]  # type: ignore[attr-defined, index]
    )
    print("CANCEL:", {"tokens_streamed_before_cancel": streamed, "max_tokens": LONG, "message": stopped["error"]})
    assert streamed < LONG


@pytest.mark.integration
@pytest.mark.fault
async def test_sigterm_mid_generation_loses_nothing(infra_settings: Settings, model_dir: Path, tmp_path: Path) -> None:
    pipeline = Pipeline.isolated(infra_settings, ["llm"], tmp_path, **_env(model_dir)).start()
    try:
        async with RawClient(pipeline.settings) as raw, Collector(pipeline.settings, raw.reply_topic) as collector:
            tag = uuid.uuid4().hex[:6]
            events = [
                _request(
                    f"s{i}-{tag}",
                    raw.reply_topic,
                    f"Paris is the capital {i}",
                    300 if i % 3 == 0 else 20 + i,
                    stream=i % 2 == 0,
                )
                for i in range(14)
            ]
            await raw.send_many("llm", events)
            await collector.wait(lambda recs: len(collector.replies()) >= 2)  # generating, mid-way
            answered_before = len(collector.replies())
            pipeline.procs["llm"].send_signal(signal.SIGTERM)
            status = pipeline.procs["llm"].wait(timeout=60)
            log = pipeline.log_tail("llm", 200_000)
            pipeline.restart("llm")
            ids = {str(e["id"]) for e in events}
            await collector.wait(lambda recs: ids <= set(collector.replies()), timeout_s=180)
            replies = collector.replies()
            ok = sum(1 for rid in ids if replies[rid]["ok"])
            duplicates = sum(1 for r in collector.records if not r.get("partial")) - len(replies)
            counts = {
                "sent": len(events),
                "answered": len(ids & set(replies)),
                "ok": ok,
                "answered_before_sigterm": answered_before,
                "duplicates": duplicates,
                "dead_lettered": 0,
                "lost": len(ids - set(replies)),
                "exit_status": status,
            }
            print("FAULT-COUNTS:", json.dumps(counts))
            assert status == 0, log[-3000:]
            assert "active rows answered and acknowledged" in log
            assert counts["lost"] == 0 and ok == len(events)
    finally:
        pipeline.stop()


# -- the loop with fakes for Faust (events, assignment) and a sink that acknowledges at once --------------


class _Msg:
    def __init__(self, tp: TP, offset: int, value: bytes) -> None:
        self.tp, self.topic, self.partition, self.offset = tp, tp.topic, tp.partition, offset
        self.key, self.value, self.timestamp = None, value, time.time()


class _Event:
    def __init__(self, tp: TP, offset: int, payload: dict[str, object], acks: list[str]) -> None:
        self.message = _Msg(tp, offset, orjson.dumps(payload))
        self.name = str(payload["id"])
        self._acks = acks

    def ack(self) -> None:
        self._acks.append(self.name)


class _Stream:
    def __init__(self, queue: asyncio.Queue[_Event]) -> None:
        self.queue = queue

    def noack(self) -> _Stream:
        return self

    async def events(self) -> AsyncIterator[_Event]:
        while True:
            yield await self.queue.get()


class _Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    async def send(self, topic: str, key: bytes, value: bytes) -> asyncio.Future[object]:
        self.sent.append((topic, key, value))
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def missing_topics(self, topics: set[str]) -> set[str]:
        return set()


async def test_acks_keep_partition_order_skip_revoked_partitions_and_streaming_survives_redis_away(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = torch.get_num_threads()
    settings = Settings(
        cache_dir=tmp_path,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens: Redis is away
        llm=LlmSettings(model=str(model_dir), device="cpu", threads=1, max_batch=6),
    )
    runner = build_runner(settings)
    runner.load()
    sink = _Sink()
    processor = BatchProcessor("llm", runner, sink, topic_prefix="p", cache=None, cache_ttl_s=60)
    assigned: set[object] = {TP("req", 0), TP("req", 1)}
    loop = ContinuousLoop[_Event](
        processor, runner, sink, _View(), worker_id="w1", redis=connect(settings), topic_prefix="p",
        max_batch=6, grace_s=30.0, revoke_wait_s=0.0,
    )  # fmt: skip
    loop.on_assigned(assigned)
    acks: list[str] = []
    p0, p1 = TP("req", 0), TP("req", 1)
    plan = [
        (p0, "e0", 200, True),
        (p0, "e1", 3, False),
        (p0, "e2", 4, False),
        (p1, "f0", 150, False),
        (p1, "f1", 3, False),
    ]
    queue: asyncio.Queue[_Event] = asyncio.Queue()
    offsets = {p0: 0, p1: 0}
    for tp, name, tokens, stream in plan:
        payload = _request(name, "p.replies.x", "The quick brown fox", tokens, stream=stream)
        queue.put_nowait(_Event(tp, offsets[tp], payload, acks))
        offsets[tp] += 1
    caplog.set_level("WARNING", logger="agents.loops.continuous")
    task = asyncio.create_task(loop.run(_Stream(queue)))
    try:
        for _ in range(2000):
            if loop.figures.admitted == 5:
                break
            await asyncio.sleep(0.005)
        assert loop.figures.admitted == 5
        await loop.revoking({p1})  # with revoke_wait_s=0: what runs of p1 is forgotten at once
        for _ in range(4000):
            if len([s for s in sink.sent if s[1] != b"w1"]) == 5:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        torch.set_num_threads(before)
    replies = [orjson.loads(v) for _, k, v in sink.sent if k != b"w1"]
    order = [r["id"] for r in replies]
    partials = [orjson.loads(v) for _, k, v in sink.sent if k == b"w1"]
    warnings = [r for r in caplog.records if "cancel keys unreadable" in r.getMessage()]
    print("LOOP-ACKS:", {"reply_order": order, "ack_order": acks, "partial_records": len(partials),
                         "redis_warnings": len(warnings)})  # fmt: skip
    assert sorted(order) == ["e0", "e1", "e2", "f0", "f1"] and all(r["ok"] for r in replies)
    assert order.index("e1") < order.index("e0")  # finished out of order ...
    assert acks == ["e0", "e1", "e2"]  # ... acknowledged in order; the revoked partition's never
    assert "".join(d["text"] for p in partials for d in p["deltas"]) == replies[order.index("e0")]["output"]["text"]
    assert len(warnings) <= 1  # Redis away: logged once, streaming went on


class _View:
    """The loop's view of the fake events (``agents.wiring.FaustEvents`` for Faust's)."""

    @staticmethod
    def record(event: _Event) -> Record:
        m = event.message
        return Record(topic=m.topic, partition=m.partition, offset=m.offset, key=m.key, value=m.value,
                      timestamp_ms=int(m.timestamp * 1000))  # fmt: skip

    @staticmethod
    def lane(event: _Event) -> TP:
        return event.message.tp

    @staticmethod
    def ack(event: _Event) -> None:
        event.ack()

    @staticmethod
    def age(event: _Event) -> float:
        return event.message.timestamp

    @staticmethod
    def size(event: _Event) -> int:
        return len(event.message.value)

    @staticmethod
    def deadline(event: _Event) -> float | None:
        return None


@pytest.mark.parametrize("grace_s", [30.0, 0.2])
async def test_stop_admits_nothing_new_and_acks_only_what_finished_within_grace(
    model_dir: Path, tmp_path: Path, grace_s: float
) -> None:
    before = torch.get_num_threads()
    settings = Settings(cache_dir=tmp_path, llm=LlmSettings(model=str(model_dir), device="cpu", threads=1, max_batch=1))
    runner = build_runner(settings)
    runner.load()
    sink = _Sink()
    processor = BatchProcessor("llm", runner, sink, topic_prefix="p", cache=None, cache_ttl_s=60)
    tp = TP("req", 0)
    loop = ContinuousLoop[_Event](
        processor, runner, sink, _View(), worker_id="w1", redis=None, topic_prefix="p", max_batch=1, grace_s=grace_s,
    )  # fmt: skip
    loop.on_assigned({tp})
    acks: list[str] = []
    queue: asyncio.Queue[_Event] = asyncio.Queue()
    tokens = 60 if grace_s > 1 else LONG
    for offset, name in enumerate(["first", "waiting"]):
        queue.put_nowait(_Event(tp, offset, _request(name, "p.replies.x", "Paris is", tokens), acks))
    task = asyncio.create_task(loop.run(_Stream(queue)))
    try:
        for _ in range(2000):
            if loop.figures.admitted == 1 and loop.figures.steps > 2:
                break
            await asyncio.sleep(0.005)
        task.cancel()  # what Faust does on SIGTERM
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        torch.set_num_threads(before)
    answered = [orjson.loads(v)["id"] for _, k, v in sink.sent if k != b"w1"]
    print("STOP:", {"grace_s": grace_s, "answered": answered, "acked": acks, "admitted": loop.figures.admitted})
    assert loop.figures.admitted == 1  # the waiting event was never admitted (delivered again)
    if grace_s > 1:
        assert answered == ["first"] and acks == ["first"]
    else:
        assert acks == []  # past the grace period: nothing acknowledged, the row is delivered again


class _SlowMetadataSink(_Sink):
    """A sink whose metadata check of an unknown reply topic takes as long as ``FaustSink``'s bounded one
    may (``METADATA_CHECK_S``); every send is timed."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_at: list[float] = []

    async def send(self, topic: str, key: bytes, value: bytes) -> asyncio.Future[object]:
        self.sent_at.append(time.monotonic())
        return await super().send(topic, key, value)

    async def missing_topics(self, topics: set[str]) -> set[str]:
        unknown = {t for t in topics if "unknown" in t}
        if unknown:
            await asyncio.sleep(METADATA_CHECK_S)
        return unknown


def _loop(
    model_dir: Path,
    tmp_path: Path,
    sink: _Sink,
    redis: Redis | None = None,
    prefix: str = "p",
    max_batch: int = 4,
    stream_interval: int = 1,
) -> tuple[ContinuousLoop[_Event], TP]:
    llm = LlmSettings(model=str(model_dir), device="cpu", threads=1, max_batch=max_batch)
    settings = Settings(cache_dir=tmp_path, llm=llm)
    runner = build_runner(settings)
    runner.load()
    processor = BatchProcessor("llm", runner, sink, topic_prefix=prefix, cache=None, cache_ttl_s=60)
    tp = TP("req", 0)
    loop = ContinuousLoop[_Event](
        processor, runner, sink, _View(), worker_id="w1", redis=redis, topic_prefix=prefix, max_batch=max_batch,
        grace_s=30.0, stream_interval=stream_interval,
    )  # fmt: skip
    loop.on_assigned({tp})
    return loop, tp


async def test_admission_waiting_on_metadata_never_pauses_decoding(model_dir: Path, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    sink = _SlowMetadataSink()
    loop, tp = _loop(model_dir, tmp_path, sink, max_batch=6)
    acks: list[str] = []
    queue: asyncio.Queue[_Event] = asyncio.Queue()
    tp2 = TP("req", 1)  # two more long rows (another partition): decoding steps of three rows last longer
    queue.put_nowait(_Event(tp, 0, _request("long", "p.replies.x", "The quick brown fox", LONG, stream=True), acks))
    for n in range(2):
        queue.put_nowait(_Event(tp2, n, _request(f"long{n}", "p.replies.x", "Paris is", LONG, stream=True), acks))
    loop.on_assigned({tp2})
    task = asyncio.create_task(loop.run(_Stream(queue)))
    try:
        for _ in range(4000):
            if any(k == b"w1" for _, k, _ in sink.sent):
                break
            await asyncio.sleep(0.005)
        started = time.monotonic()
        for n in range(1, 4):  # requests naming unknown (allowed) reply topics, while "long" generates
            payload = _request(f"u{n}", f"p.replies.unknown{n}", "Hello", 5)
            queue.put_nowait(_Event(tp, n, payload, acks))
        for _ in range(4000):
            if sum(t.endswith(".dlq") for t, _, _ in sink.sent) == 3:
                break
            await asyncio.sleep(0.005)
        admitted_by = time.monotonic()
        for _ in range(6000):
            if len(acks) == 6:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        torch.set_num_threads(before)
    partial_times = [
        at
        for at, (_, k, v) in zip(sink.sent_at, sink.sent, strict=True)
        if k == b"w1" and any(d["id"] == "long" for d in orjson.loads(v)["deltas"])
    ]
    window = [at for at in partial_times if started <= at <= admitted_by]
    gaps = [b - a for a, b in itertools.pairwise(window)]
    letters = [orjson.loads(v) for t, _, v in sink.sent if t.endswith(".dlq")]
    reply_times = {orjson.loads(v)["id"]: at for at, (t, k, v) in zip(sink.sent_at, sink.sent, strict=True)
                   if k != b"w1" and not t.endswith(".dlq")}  # fmt: skip
    figures = {"partials_in_window": len(window), "max_gap_s": round(max(gaps), 3) if gaps else None,
               "window_s": round(admitted_by - started, 2), "metadata_check_s": METADATA_CHECK_S}  # fmt: skip
    print("ADMISSION-GAPS:", figures)
    assert len(letters) == 3 and all(d["error"]["code"] == "reply_to_refused" for d in letters)
    assert admitted_by - started >= METADATA_CHECK_S  # the admissions did wait on metadata
    assert reply_times["long"] > window[-1] >= started + 0.75 * METADATA_CHECK_S  # "long" decoded through the wait
    assert max(gaps) < METADATA_CHECK_S / 2  # decoding went on: no gap near the 2 s metadata stall
    assert [a for a in acks if a == "long" or a.startswith("u")] == ["long", "u1", "u2", "u3"]  # partition order


async def test_the_cancel_key_stops_a_row_that_does_not_stream(model_dir: Path, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    sink = _Sink()
    prefix = f"cx{uuid.uuid4().hex[:6]}"
    redis = connect(Settings(cache_dir=tmp_path))
    loop, tp = _loop(model_dir, tmp_path, sink, redis, prefix)
    acks: list[str] = []
    queue: asyncio.Queue[_Event] = asyncio.Queue()
    doomed = _request(f"doomed-{prefix}", f"{prefix}.replies.x", "The quick brown fox", LONG)  # stream=False
    other = _request(f"other-{prefix}", f"{prefix}.replies.x", "Kafka moves events", 40)
    other["correlation_id"] = "attempt-2"  # a retry of an id whose first attempt got its 504
    queue.put_nowait(_Event(tp, 0, doomed, acks))
    queue.put_nowait(_Event(tp, 1, other, acks))
    task = asyncio.create_task(loop.run(_Stream(queue)))
    try:
        for _ in range(4000):
            if loop.figures.admitted == 2 and loop.figures.steps > 5:
                break
            await asyncio.sleep(0.005)
        await redis.set(cancel_key(prefix, str(doomed["id"])), b"1", ex=60)
        await redis.set(cancel_key(prefix, str(other["id"])), b"attempt-1", ex=60)  # the old attempt's key
        for _ in range(6000):
            if len(acks) == 2:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await redis.delete(cancel_key(prefix, str(doomed["id"])), cancel_key(prefix, str(other["id"])))
        await redis.aclose()
        torch.set_num_threads(before)
    replies = {r["id"]: r for r in (orjson.loads(v) for _, k, v in sink.sent if k != b"w1")}
    stopped = replies[doomed["id"]]
    print("CANCEL-ANY-ROW:", {"cancelled": loop.figures.cancelled, "error": stopped.get("error")})
    assert not any(k == b"w1" for _, k, _ in sink.sent)  # neither row streamed
    assert not stopped["ok"] and stopped["error"]["code"] == "cancelled"
    assert replies[other["id"]]["ok"]  # the old attempt's cancel key never stops the retry
    assert loop.figures.cancelled == 1 and sorted(acks) == sorted([str(doomed["id"]), str(other["id"])])


# -- traces through the continuous loop ---------------------------------------------------------------------


class _TracedView(_View):
    """``_View`` whose records carry each event's trace headers (``agents.wiring.FaustEvents`` with tracing on)."""

    headers: dict[str, tuple[tuple[str, bytes], ...]] = {}

    @classmethod
    def record(cls, event: _Event) -> Record:
        record = _View.record(event)
        return Record(record.topic, record.partition, record.offset, record.key, record.value,
                      record.timestamp_ms, cls.headers.get(event.name, ()))  # fmt: skip


class _HeaderSink(_Sink):
    """``_Sink`` that also keeps each send's headers (the reply produce carries the trace onward)."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: dict[str, list[tuple[str, bytes]]] = {}

    async def send(  # type: ignore[override]
        self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]] | None = None
    ) -> asyncio.Future[object]:
        if headers and key != b"w1":
            self.headers[str(orjson.loads(value)["id"])] = headers
        return await super().send(topic, key, value)


async def test_each_llm_row_has_its_model_span_with_first_token_in_its_trace_and_its_batch_links_them(
    model_dir: Path, tmp_path: Path
) -> None:
    """Tracing on, the continuous loop gives each traced row: its queue wait, a ``model llm`` span in its own
    trace (a ``first_token`` event on a streamed row), its reply produce in its trace linked to the admission's
    ``batch llm`` span (which links every member), and the reply's headers carrying the same trace on."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from streams import tracing

    exporter = InMemorySpanExporter()
    tracing.in_memory("llm", SimpleSpanProcessor(exporter))
    before = torch.get_num_threads()
    trace_ids = {"s": 0x0AF7651916CD43DD8448EB211C80319C, "n": 0x1BF7651916CD43DD8448EB211C80319D}
    _TracedView.headers = {
        rid: (("traceparent", f"00-{tid:032x}-b7ad6b7169203331-01".encode()),) for rid, tid in trace_ids.items()
    }
    sink = _HeaderSink()
    try:
        loop, tp = _loop(model_dir, tmp_path, sink)
        loop.view = _TracedView()
        acks: list[str] = []
        queue: asyncio.Queue[_Event] = asyncio.Queue()
        queue.put_nowait(_Event(tp, 0, _request("s", "p.replies.x", "The quick brown fox", 12, stream=True), acks))
        queue.put_nowait(_Event(tp, 1, _request("n", "p.replies.x", "Paris is", 6), acks))
        queue.put_nowait(_Event(tp, 2, _request("plain", "p.replies.x", "Hello", 4), acks))  # no trace context
        task = asyncio.create_task(loop.run(_Stream(queue)))
        try:
            for _ in range(4000):
                if len(acks) == 3:
                    break
                await asyncio.sleep(0.005)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        spans = exporter.get_finished_spans()
    finally:
        tracing.shutdown()
        torch.set_num_threads(before)
    assert sorted(acks) == ["n", "plain", "s"]
    batches = [s for s in spans if s.name == "batch llm"]
    linked = {link.context.trace_id for b in batches for link in b.links}
    assert set(trace_ids.values()) <= linked  # every traced member linked from its admission's batch
    for rid, tid in trace_ids.items():
        mine = [s for s in spans if s.context.trace_id == tid]
        names = sorted(s.name for s in mine)
        assert names == ["model llm", "queue req", "send p.replies.x"], (rid, names)
        model = next(s for s in mine if s.name == "model llm")
        assert model.attributes is not None and model.attributes["aisemble.ok"] is True
        assert {link.context.span_id for link in model.links} <= {b.context.span_id for b in batches}
        first = [e for e in model.events if e.name == "first_token"]
        assert len(first) == (1 if rid == "s" else 0), (rid, model.events)  # only the streamed row has one
        reply_headers = dict(sink.headers[rid])
        assert reply_headers["traceparent"].decode().split("-")[1] == f"{tid:032x}"
    assert "plain" not in sink.headers  # a request without a trace context gets none added
    assert not [s for s in spans if s.name == "model llm" and s.context.trace_id not in trace_ids.values()]


async def test_with_a_stream_interval_the_first_token_goes_at_once_then_text_every_n_tokens(
    model_dir: Path, tmp_path: Path
) -> None:
    """``llm.stream_interval`` 4: the first partial carries the first token alone, every later one at least 4
    tokens, and the partials' text is a prefix of the final text (the final reply carries what was held)."""
    before = torch.get_num_threads()
    sink = _Sink()
    try:
        loop, tp = _loop(model_dir, tmp_path, sink, stream_interval=4)
        acks: list[str] = []
        queue: asyncio.Queue[_Event] = asyncio.Queue()
        queue.put_nowait(_Event(tp, 0, _request("s", "p.replies.x", "The quick brown fox", 30, stream=True), acks))
        task = asyncio.create_task(loop.run(_Stream(queue)))
        try:
            for _ in range(4000):
                if acks == ["s"]:
                    break
                await asyncio.sleep(0.005)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        torch.set_num_threads(before)
    deltas = [d for _, k, v in sink.sent if k == b"w1" for d in orjson.loads(v)["deltas"]]
    (final,) = [orjson.loads(v) for _, k, v in sink.sent if k != b"w1"]
    tokens = [d["tokens"] for d in deltas]
    print("STREAM-INTERVAL:", {"partials": len(deltas), "tokens": tokens})
    total = final["output"]["tokens"]
    assert acks == ["s"] and final["ok"] and total > 8
    assert tokens[0] == 1 and all(t >= 4 for t in tokens[1:]) and len(deltas) <= 1 + (total - 1) // 4
    assert 0 <= total - sum(tokens) < 4  # what was held at the end (under one interval) came with the final
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    assert final["output"]["text"].startswith("".join(d["text"] for d in deltas))
