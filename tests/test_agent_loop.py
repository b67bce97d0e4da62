"""The shared agent loop with an in-memory sink and a fake runner (pure logic, no Kafka, no Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence

import orjson
import pytest

from agents.errors import DeliveryError
from agents.loop import BatchProcessor
from agents.runner import Failure, Item, Outcome
from schemas import DeadLetterEvent, ErrorCode, ReplyEvent
from streams.codec import Record


class ListSink:
    """Collects sends; topics listed in ``refuse`` fail like a broker that refused them."""

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.refuse = refuse

    async def send(self, topic: str, key: bytes, value: bytes) -> Awaitable[object]:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if topic in self.refuse:
            future.set_exception(RuntimeError(f"refused {topic}"))
        else:
            self.sent.append((topic, key, value))
            future.set_result(None)
        return future

    def on(self, topic: str) -> list[dict[str, object]]:
        return [orjson.loads(v) for t, _, v in self.sent if t == topic]


class EchoRunner:
    """Doubles ``x``; fails items with ``fail``; counts calls to prove one call per batch."""

    service = "data"
    tasks = ("echo",)

    def __init__(self, crash: bool = False) -> None:
        self.calls: list[int] = []
        self.crash = crash

    def load(self) -> None: ...

    def model_for(self, task: str) -> str:
        return "echo@1"

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        self.calls.append(len(items))
        if self.crash:
            raise ValueError("boom")
        return [
            Failure(ErrorCode.INVALID_INPUT, "x: missing") if "fail" in i.input else {"y": 2 * i.input["x"]}  # type: ignore[operator]
            for i in items
        ]


def record(value: bytes | dict[str, object], offset: int = 0) -> Record:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return Record("p.data.requests", 0, offset, b"k", raw, int(time.time() * 1000))


def processor(runner: EchoRunner, sink: ListSink) -> BatchProcessor:
    return BatchProcessor("data", runner, sink, topic_prefix="p", cache=None, cache_ttl_s=60)  # type: ignore[arg-type]


async def test_one_model_call_per_batch_and_one_reply_per_request() -> None:
    runner, sink = EchoRunner(), ListSink()
    records = [
        record({"id": f"r{i}", "task": "echo", "input": {"x": i}, "reply_to": "me"}, i) for i in range(5)
    ]
    await processor(runner, sink).process(records)
    assert runner.calls == [5]
    replies = [ReplyEvent.model_validate(r) for r in sink.on("me")]
    assert [r.id for r in replies] == [f"r{i}" for i in range(5)]
    assert [r.output for r in replies] == [{"y": 2 * i} for i in range(5)]
    assert all(r.ok and r.model == "echo@1" and r.timings_ms["batch_size"] == 5 for r in replies)


async def test_bad_events_are_dead_lettered_and_the_rest_answered() -> None:
    runner, sink = EchoRunner(), ListSink()
    records = [
        record(b"\x00garbage", 0),
        record({"id": "ok", "task": "echo", "input": {"x": 1}}, 1),
        record({"id": "bad-input", "task": "echo", "input": {"fail": 1}}, 2),
        record({"id": "bad-task", "task": "nope", "input": {}}, 3),
        record({"id": "late", "task": "echo", "input": {"x": 1}, "deadline_ms": 1}, 4),
    ]
    await processor(runner, sink).process(records)
    letters = [DeadLetterEvent.model_validate(d) for d in sink.on("p.data.dlq")]
    assert len(letters) == 1 and letters[0].source.offset == 0
    assert letters[0].error.code == ErrorCode.INVALID_JSON
    replies = {r["id"]: ReplyEvent.model_validate(r) for r in sink.on("p.data.results")}
    assert replies["ok"].ok and replies["ok"].output == {"y": 2}
    assert replies["bad-input"].error and replies["bad-input"].error.code == ErrorCode.INVALID_INPUT
    assert replies["bad-task"].error and replies["bad-task"].error.code == ErrorCode.UNKNOWN_TASK
    assert replies["late"].error and replies["late"].error.code == ErrorCode.DEADLINE_EXCEEDED
    assert runner.calls == [2]  # neither the late request nor the unknown task ran


async def test_runner_crash_fails_its_items_not_the_agent() -> None:
    runner, sink = EchoRunner(crash=True), ListSink()
    await processor(runner, sink).process([record({"id": "a", "task": "echo", "input": {"x": 1}})])
    (reply,) = [ReplyEvent.model_validate(r) for r in sink.on("p.data.results")]
    assert not reply.ok and reply.error and reply.error.code == ErrorCode.MODEL_ERROR
    assert "boom" in reply.error.message


async def test_refused_reply_to_is_dead_lettered() -> None:
    runner, sink = EchoRunner(), ListSink(refuse=("forbidden",))
    await processor(runner, sink).process(
        [record({"id": "a", "task": "echo", "input": {"x": 1}, "reply_to": "forbidden"})]
    )
    (letter,) = [DeadLetterEvent.model_validate(d) for d in sink.on("p.data.dlq")]
    assert letter.error.code == ErrorCode.REPLY_UNDELIVERABLE


async def test_undeliverable_own_topic_raises_so_the_batch_is_not_acknowledged() -> None:
    runner, sink = EchoRunner(), ListSink(refuse=("p.data.results",))
    with pytest.raises(DeliveryError):
        await processor(runner, sink).process([record({"id": "a", "task": "echo", "input": {"x": 1}})])


async def test_oversized_reply_becomes_payload_too_large_error() -> None:
    class Big(EchoRunner):
        def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
            return [{"blob": "x" * 5000} for _ in items]

    sink = ListSink()
    proc = BatchProcessor(
        "data", Big(), sink, topic_prefix="p", cache=None, cache_ttl_s=1, max_event_bytes=2048
    )  # type: ignore[arg-type]
    await proc.process([record({"id": "a", "task": "echo", "input": {"x": 1}})])
    (reply,) = sink.on("p.data.results")
    assert reply["ok"] is False and reply["error"]["code"] == ErrorCode.PAYLOAD_TOO_LARGE
