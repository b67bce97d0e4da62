"""BatchLoop's overlap: batch N+1 runs the model while batch N's replies are delivered; order and acks hold.

Pure logic: fake Faust events and app, an in-memory sink whose broker acknowledgements the test releases by
hand, and a runner that records what it saw. No Kafka, no Redis; nothing is timed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiokafka.errors import NotLeaderForPartitionError

from agents.loop import BatchProcessor
from agents.loops import AgentStopped, BatchLoop
from agents.runner import Item, Outcome
from streams.batching import BatchBuffer
from streams.codec import Record


@dataclass
class FakeMessage:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp: float
    tp: tuple[str, int] = ("t", 0)


@dataclass
class FakeEvent:
    message: FakeMessage
    acked: list[int] = field(default_factory=list)

    def ack(self) -> None:
        self.acked.append(self.message.offset)


class FakeStream:
    def __init__(self, queue: asyncio.Queue[FakeEvent]) -> None:
        self.queue = queue

    def noack(self) -> FakeStream:
        return self

    async def events(self) -> AsyncIterator[FakeEvent]:
        while True:
            yield await self.queue.get()


class FakeView:
    """The loop's view of the fake events (``agents.wiring.FaustEvents`` for Faust's)."""

    @staticmethod
    def record(e: FakeEvent) -> Record:
        m = e.message
        return Record(m.topic, m.partition, m.offset, m.key, m.value, int(m.timestamp * 1000))

    @staticmethod
    def lane(e: FakeEvent) -> tuple[str, int]:
        return e.message.tp

    @staticmethod
    def ack(e: FakeEvent) -> None:
        e.ack()

    @staticmethod
    def age(e: FakeEvent) -> float:
        return e.message.timestamp

    @staticmethod
    def size(e: FakeEvent) -> int:
        return len(e.message.value)

    @staticmethod
    def deadline(e: FakeEvent) -> float | None:
        return None


class GatedSink:
    """Sends resolve only when the test opens the gate of their batch; records send order."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.sent: list[str] = []
        self.pending: list[asyncio.Future[object]] = []
        self.fail = fail

    async def send(self, topic: str, key: bytes, value: bytes) -> Awaitable[object]:
        self.sent.append(key.decode())
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if self.fail is not None:
            future.set_exception(self.fail)
        else:
            self.pending.append(future)
        return future

    async def missing_topics(self, topics: set[str]) -> set[str]:
        return set()

    def release_all(self) -> None:
        for future in self.pending:
            if not future.done():
                future.set_result(None)
        self.pending.clear()


class RecordingRunner:
    service = "data"
    tasks = ("echo",)

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.unacked_sends_at_start: list[int] = []
        self.sink: GatedSink | None = None
        self.lock = threading.Lock()

    def load(self) -> None: ...

    def model_for(self, task: str) -> str:
        return "echo@1"

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        with self.lock:
            self.batches.append([int(i.input["x"]) for i in items])  # type: ignore[call-overload]
            if self.sink is not None:
                self.unacked_sends_at_start.append(sum(not f.done() for f in self.sink.pending))
        return [{"y": i.input["x"]} for i in items]


def event(n: int) -> FakeEvent:
    value = orjson.dumps({"id": f"r{n}", "task": "echo", "input": {"x": n}, "reply_to": "replies"})
    return FakeEvent(FakeMessage("t", 0, n, f"r{n}".encode(), value, time.time()))


def build(sink: GatedSink, runner: RecordingRunner, retry_s: float = 30.0) -> BatchLoop[FakeEvent]:
    processor = BatchProcessor(
        "data",
        runner,
        sink,
        topic_prefix="p",
        cache=None,
        cache_ttl_s=60,
        retry_s=retry_s,  # type: ignore[arg-type]
    )
    loop = BatchLoop(processor, FakeView(), max_batch=4, linger_ms=0, grace_s=5.0)
    loop.on_assigned({("t", 0)})
    return loop


async def until(predicate: Any, limit: int = 2000) -> None:
    for _ in range(limit):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


async def test_the_next_batch_runs_while_the_previous_one_is_still_being_delivered() -> None:
    sink, runner = GatedSink(), RecordingRunner()
    runner.sink = sink
    loop = build(sink, runner)
    queue: asyncio.Queue[FakeEvent] = asyncio.Queue()
    first, second = [event(n) for n in range(4)], [event(n) for n in range(4, 8)]
    for e in first:
        queue.put_nowait(e)
    task = asyncio.create_task(loop.run(FakeStream(queue)))  # type: ignore[arg-type]
    try:
        await until(lambda: len(sink.pending) == 4)  # batch 1 computed, its 4 replies await the broker
        assert not any(e.acked for e in first)  # nothing is acknowledged before its reply is
        for e in second:
            queue.put_nowait(e)
        await until(lambda: len(runner.batches) == 2)
        # The model ran batch 2 while all 4 replies of batch 1 were still unacknowledged by the broker.
        assert runner.unacked_sends_at_start[1] == 4
        assert sink.sent == ["r0", "r1", "r2", "r3"]  # batch 2's replies wait for batch 1's delivery
        sink.release_all()
        await until(lambda: len(sink.sent) == 8)
        assert sink.sent == [f"r{n}" for n in range(8)]  # replies leave in batch order
        assert all(e.acked == [] for e in second)
        sink.release_all()
        await until(lambda: all(e.acked for e in first + second))
        assert [e.acked for e in first + second] == [[n] for n in range(8)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_stop_finishes_the_outstanding_delivery_within_the_grace_period() -> None:
    sink, runner = GatedSink(), RecordingRunner()
    loop = build(sink, runner)
    queue: asyncio.Queue[FakeEvent] = asyncio.Queue()
    events = [event(n) for n in range(3)]
    for e in events:
        queue.put_nowait(e)
    task = asyncio.create_task(loop.run(FakeStream(queue)))  # type: ignore[arg-type]
    await until(lambda: len(sink.pending) == 3)  # the loop waits for events; a delivery is outstanding
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # the stop waits for the delivery instead of abandoning it
    sink.release_all()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [e.acked for e in events] == [[0], [1], [2]]


async def test_a_delivery_that_runs_out_of_retries_stops_an_idle_loop_without_acknowledging() -> None:
    sink, runner = GatedSink(fail=NotLeaderForPartitionError("leader moving")), RecordingRunner()
    loop = build(sink, runner, retry_s=0.3)
    queue: asyncio.Queue[FakeEvent] = asyncio.Queue()
    events = [event(n) for n in range(2)]
    for e in events:
        queue.put_nowait(e)
    with pytest.raises(AgentStopped):
        await asyncio.wait_for(loop.run(FakeStream(queue)), 30)  # type: ignore[arg-type]
    assert loop.failure is not None
    assert all(e.acked == [] for e in events)


async def test_a_revoke_lets_the_batches_in_hand_settle_and_acknowledges_them_before_it_returns() -> None:
    sink, runner = GatedSink(), RecordingRunner()
    loop = build(sink, runner)
    queue: asyncio.Queue[FakeEvent] = asyncio.Queue()
    taken = [event(n) for n in range(8)]
    for e in taken:
        queue.put_nowait(e)
    task = asyncio.create_task(loop.run(FakeStream(queue)))  # type: ignore[arg-type]
    try:
        await until(lambda: len(runner.batches) == 2 and len(sink.pending) == 4)  # batch 1 delivering, 2 computed
        waiting = [event(n) for n in range(8, 10)]
        for e in waiting:
            queue.put_nowait(e)
        await until(lambda: len(loop.buffer) == 2)
        revoke = asyncio.create_task(loop.revoking({("t", 0)}))
        await asyncio.sleep(0.1)
        assert not revoke.done()  # it waits for the taken events to settle
        assert len(loop.buffer) == 0  # what waited is dropped (delivered again from the committed offset)
        late = event(10)
        queue.put_nowait(late)
        await asyncio.sleep(0.05)
        assert len(loop.buffer) == 0  # a partition being revoked takes nothing new
        sink.release_all()
        await until(lambda: len(sink.pending) == 4)
        sink.release_all()
        await asyncio.wait_for(revoke, 5)
        assert [e.acked for e in taken] == [[n] for n in range(8)]  # acknowledged before the revoke returned
        assert all(e.acked == [] for e in [*waiting, late])
        assert len(runner.batches) == 2  # the dropped ones never ran
        assert not loop.tracker.assigned(("t", 0)) and loop.tracker.held() == 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_revoke_past_its_wait_forgets_what_did_not_settle_unacknowledged() -> None:
    sink, runner = GatedSink(), RecordingRunner()
    loop = build(sink, runner)
    loop.revoke_wait_s = 0.2
    queue: asyncio.Queue[FakeEvent] = asyncio.Queue()
    taken = [event(n) for n in range(2)]
    for e in taken:
        queue.put_nowait(e)
    task = asyncio.create_task(loop.run(FakeStream(queue)))  # type: ignore[arg-type]
    try:
        await until(lambda: len(sink.pending) == 2)
        await asyncio.wait_for(loop.revoking({("t", 0)}), 5)
        sink.release_all()  # the replies are written after the revoke ...
        await asyncio.sleep(0.1)
        assert all(e.acked == [] for e in taken)  # ... but a revoked partition's events are never acknowledged
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_the_buffer_put_waits_while_the_waiting_items_cost_reaches_max_waiting_cost() -> None:
    buffer: BatchBuffer[int] = BatchBuffer(8, capacity=100, cost_of=float, max_cost=10.0, max_waiting_cost=10.0)
    await buffer.put(6)
    await buffer.put(6)  # 6 < 10: let in (the cost may pass the bound by one item)
    blocked = asyncio.create_task(buffer.put(1))
    await asyncio.sleep(0.02)
    assert not blocked.done() and len(buffer) == 2  # 12 >= 10: waits
    assert await buffer.take() == [6]  # a batch stays under max_cost
    await asyncio.wait_for(blocked, 1)
    assert len(buffer) == 2


async def test_what_a_batch_consumed_is_released_only_once_its_offsets_are_committed() -> None:
    """Vision's claim checks: acknowledged is not committed. A batch delivered again after a crash between
    the two must still find its claims, so ``release`` waits for the commit, and a revoke drops it."""
    sink, runner = GatedSink(), RecordingRunner()
    released: list[list[object]] = []

    async def release(inputs: Sequence[dict[str, object]]) -> None:
        released.append([i["x"] for i in inputs])

    processor = BatchProcessor("data", runner, sink, topic_prefix="p", cache=None, cache_ttl_s=60, release=release)
    loop = BatchLoop(processor, FakeView(), max_batch=4, linger_ms=0, grace_s=5.0)
    loop.on_assigned({("t", 0)})
    queue: asyncio.Queue[FakeEvent] = asyncio.Queue()
    first = [event(n) for n in range(3)]
    for e in first:
        queue.put_nowait(e)
    task = asyncio.create_task(loop.run(FakeStream(queue)))  # type: ignore[arg-type]
    try:
        await until(lambda: len(sink.pending) == 3)
        sink.release_all()
        await until(lambda: all(e.acked for e in first))
        await asyncio.sleep(0.05)
        assert released == []  # replies written and acknowledged, offsets not committed: the claims stay
        loop.committed({("t", 0): 2})  # offsets 0 and 1 committed, 2 not yet
        await asyncio.sleep(0.05)
        assert released == []
        loop.committed({("t", 0): 3})
        await until(lambda: released == [[0, 1, 2]])

        second = [event(n) for n in range(3, 5)]
        for e in second:
            queue.put_nowait(e)
        await until(lambda: len(sink.pending) == 2)
        sink.release_all()
        await until(lambda: all(e.acked for e in second))
        loop.forget({("t", 0)})  # revoked before its commit: the next owner answers it and needs the claims
        loop.committed({("t", 0): 100})
        await asyncio.sleep(0.05)
        assert released == [[0, 1, 2]]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
