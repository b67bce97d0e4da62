"""The shared agent loop with an in-memory sink and a fake runner (pure logic, no Kafka, no Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence

import orjson
import pytest
from aiokafka.errors import MessageSizeTooLargeError, NotLeaderForPartitionError

from agents.errors import DeadLetterRefusedError, DeliveryError
from agents.loop import BatchProcessor
from agents.runner import Failure, Item, Outcome
from schemas import DeadLetterEvent, ErrorCode, ReplyEvent
from streams.codec import Record
from streams.policy import ReplyTopicPolicy


class ListSink:
    """Collects sends. Topics in ``refuse`` fail permanently (like a record too large), those in ``flaky``
    fail retriably that many times first (like a broker that is away), those in ``cancel`` get a cancelled
    ack future that many times first (an unknown failure), those in ``missing`` do not exist, and those in
    ``hang`` never get an ack (like a topic deleted after the producer looked it up)."""

    def __init__(
        self,
        refuse: tuple[str, ...] = (),
        flaky: dict[str, int] | None = None,
        missing: tuple[str, ...] = (),
        cancel: dict[str, int] | None = None,
        hang: tuple[str, ...] = (),
    ) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.attempts: list[str] = []
        self.refuse = refuse
        self.flaky = dict(flaky or {})
        self.cancel = dict(cancel or {})
        self.missing = set(missing)
        self.hang = hang

    async def send(self, topic: str, key: bytes, value: bytes) -> Awaitable[object]:
        self.attempts.append(topic)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if topic in self.refuse:
            future.set_exception(MessageSizeTooLargeError(f"refused {topic}"))
        elif self.flaky.get(topic, 0) > 0:
            self.flaky[topic] -= 1
            future.set_exception(NotLeaderForPartitionError(f"leader of {topic} moving"))
        elif self.cancel.get(topic, 0) > 0:
            self.cancel[topic] -= 1
            future.cancel()
        elif topic in self.hang:
            pass
        else:
            self.sent.append((topic, key, value))
            future.set_result(None)
        return future

    async def missing_topics(self, topics: set[str]) -> set[str]:
        return topics & self.missing

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


def processor(runner: EchoRunner, sink: ListSink, **kwargs: object) -> BatchProcessor:
    return BatchProcessor("data", runner, sink, topic_prefix="p", cache=None, cache_ttl_s=60, **kwargs)  # type: ignore[arg-type]


async def test_one_model_call_per_batch_and_one_reply_per_request() -> None:
    runner, sink = EchoRunner(), ListSink()
    records = [record({"id": f"r{i}", "task": "echo", "input": {"x": i}, "reply_to": "me"}, i) for i in range(5)]
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


async def test_retriable_failure_of_own_topic_past_the_bound_raises_so_the_batch_is_not_acknowledged() -> None:
    runner, sink = EchoRunner(), ListSink(flaky={"p.data.results": 1000})
    proc = processor(runner, sink, retry_s=0.5)
    with pytest.raises(DeliveryError):
        await proc.process([record({"id": "a", "task": "echo", "input": {"x": 1}})])
    assert proc.delivery_state == "retrying" and proc.stats.retries >= 2
    assert runner.calls == [1]  # retries re-send the reply; the model does not run again


async def test_retriable_failure_is_retried_until_the_broker_takes_it() -> None:
    runner, sink = EchoRunner(), ListSink(flaky={"p.data.results": 2})
    proc = processor(runner, sink, retry_s=30)
    await proc.process([record({"id": "a", "task": "echo", "input": {"x": 1}})])
    assert sink.attempts.count("p.data.results") == 3 and len(sink.on("p.data.results")) == 1
    assert proc.delivery_state == "ok" and proc.stats.retries == 2


async def test_permanent_failure_on_own_topic_is_dead_lettered_and_the_batch_moves_on() -> None:
    runner, sink = EchoRunner(), ListSink(refuse=("p.data.results",))
    proc = processor(runner, sink, retry_s=30)
    await proc.process([record({"id": "a", "task": "echo", "input": {"x": 1}})])
    (letter,) = [DeadLetterEvent.model_validate(d) for d in sink.on("p.data.dlq")]
    assert letter.error.code == ErrorCode.REPLY_UNDELIVERABLE and "MessageSizeTooLarge" in letter.error.message


async def test_a_dead_letter_refused_permanently_stops_the_batch_at_once_unacknowledged() -> None:
    runner, sink = EchoRunner(), ListSink(refuse=("p.data.dlq",))
    proc = processor(runner, sink, retry_s=30)
    started = time.monotonic()
    with pytest.raises(DeadLetterRefusedError, match=r"p\.data\.dlq") as caught:
        await proc.process_isolating(
            [record(b"\xff not json", 0), record({"id": "a", "task": "echo", "input": {"x": 1}}, 1)]
        )
    assert isinstance(caught.value, DeliveryError)  # what stops the agent (exit 3) without acknowledging
    assert time.monotonic() - started < 5, "a deployment fault is not retried for retry_s"
    assert proc.stats.isolated == 0, "not taken for a poison record"
    assert sink.attempts.count("p.data.dlq") == 1


async def test_a_reply_whose_dead_letter_is_refused_permanently_stops_the_batch() -> None:
    runner, sink = EchoRunner(), ListSink(refuse=("forbidden", "p.data.dlq"))
    proc = processor(runner, sink, retry_s=30)
    with pytest.raises(DeadLetterRefusedError):
        await proc.process([record({"id": "a", "task": "echo", "input": {"x": 1}, "reply_to": "forbidden"})])
    assert sink.sent == []


async def test_an_unknown_send_failure_is_retried_and_never_dead_lettered() -> None:
    runner, sink = EchoRunner(), ListSink(cancel={"p.data.results": 2})
    proc = processor(runner, sink, retry_s=30)
    await proc.process([record({"id": "a", "task": "echo", "input": {"x": 1}})])
    assert [r["id"] for r in sink.on("p.data.results")] == ["a"]
    assert sink.on("p.data.dlq") == [] and "p.data.dlq" not in sink.attempts
    assert proc.stats.retries == 2 and proc.delivery_state == "ok"


async def test_an_unknown_send_failure_past_the_bound_raises_and_writes_no_dead_letter() -> None:
    runner, sink = EchoRunner(), ListSink(cancel={"p.data.results": 1000, "p.data.dlq": 1000})
    proc = processor(runner, sink, retry_s=0.5)
    with pytest.raises(DeliveryError, match="CancelledError"):
        await proc.process_isolating([record({"id": "a", "task": "echo", "input": {"x": 1}})])
    assert "p.data.dlq" not in sink.attempts
    assert proc.delivery_state == "retrying" and proc.stats.isolated == 0


async def test_a_reply_topic_deleted_after_a_reply_is_dead_lettered_undeliverable_at_admission() -> None:
    runner, sink = EchoRunner(), ListSink()
    proc = processor(runner, sink)
    await proc.process([record({"id": "a", "task": "echo", "input": {"x": 1}, "reply_to": "replay"})])
    sink.missing |= {"replay", "never"}  # "replay" is deleted; "never" never existed
    await proc.process(
        [
            record({"id": "b", "task": "echo", "input": {"x": 2}, "reply_to": "replay"}, 1),
            record({"id": "c", "task": "echo", "input": {"x": 3}, "reply_to": "never"}, 2),
            record({"id": "d", "task": "echo", "input": {"x": 4}, "reply_to": "live"}, 3),
        ]
    )
    letters = {letter.source.offset: letter for letter in map(DeadLetterEvent.model_validate, sink.on("p.data.dlq"))}
    assert letters[1].error.code == ErrorCode.REPLY_UNDELIVERABLE and "deleted" in letters[1].error.message
    assert letters[2].error.code == ErrorCode.REPLY_TO_REFUSED and sorted(letters) == [1, 2]
    assert [r["id"] for r in sink.on("live")] == ["d"] and runner.calls == [1, 1]


async def test_a_reply_whose_topic_vanishes_while_its_ack_waits_is_dead_lettered_and_others_are_not_held() -> None:
    runner, sink = EchoRunner(), ListSink(hang=("replay",))
    proc = processor(runner, sink, retry_s=60)
    records = [
        record({"id": "a", "task": "echo", "input": {"x": 1}, "reply_to": "replay"}, 0),
        record({"id": "b", "task": "echo", "input": {"x": 2}, "reply_to": "live"}, 1),
    ]
    settlement = await proc.compute(records)
    delivering = asyncio.create_task(proc.deliver(settlement))
    await asyncio.sleep(0.3)
    assert [r["id"] for r in sink.on("live")] == ["b"], "the live topic's reply does not wait for the other"
    sink.missing.add("replay")  # deleted while its ack waits (aiokafka would hold it for its request timeout)
    started = time.monotonic()
    await asyncio.wait_for(delivering, 10)
    assert time.monotonic() - started < 5
    (letter,) = [DeadLetterEvent.model_validate(d) for d in sink.on("p.data.dlq")]
    assert letter.error.code == ErrorCode.REPLY_UNDELIVERABLE and "does not exist" in letter.error.message
    assert sink.attempts.count("replay") == 1, "never sent again to a topic found missing"


async def test_reply_to_a_missing_topic_is_refused_before_running_and_never_sent_there() -> None:
    runner, sink = EchoRunner(), ListSink(missing=("gone",))
    await processor(runner, sink).process([record({"id": "a", "task": "echo", "input": {"x": 1}, "reply_to": "gone"})])
    assert "gone" not in sink.attempts and runner.calls == []
    (letter,) = [DeadLetterEvent.model_validate(d) for d in sink.on("p.data.dlq")]
    assert letter.error.code == ErrorCode.REPLY_TO_REFUSED and "does not exist" in letter.error.message


@pytest.mark.parametrize(
    "reply_to",
    [
        "p.nlp.requests",
        "p.vision.bulk",
        "p.data.results",
        "p.llm.dlq",
        "__consumer_offsets",
        "elsewhere",
        "q.replies.x",
    ],
)
async def test_reply_to_outside_the_policy_is_refused_at_once_and_not_run(reply_to: str) -> None:
    runner, sink = EchoRunner(), ListSink()
    # Even a broad operator pattern ({prefix}.*) never lets a reply into a service topic.
    policy = ReplyTopicPolicy.build("p", ["{prefix}.replies.*", "{prefix}.edge.*.replies", "{prefix}.*"])
    proc = processor(runner, sink, reply_policy=policy)
    await proc.process(
        [
            record({"id": "bad", "task": "echo", "input": {"x": 1}, "reply_to": reply_to}, 0),
            record({"id": "ok", "task": "echo", "input": {"x": 2}, "reply_to": "p.replies.c1"}, 1),
        ]
    )
    (letter,) = [DeadLetterEvent.model_validate(d) for d in sink.on("p.data.dlq")]
    assert letter.error.code == ErrorCode.REPLY_TO_REFUSED and letter.source.offset == 0
    assert reply_to not in sink.attempts and runner.calls == [1]
    assert [r["id"] for r in sink.on("p.replies.c1")] == ["ok"]


async def test_every_reply_echoes_the_correlation_id() -> None:
    runner, sink = EchoRunner(), ListSink()
    await processor(runner, sink).process(
        [
            record({"id": "a", "task": "echo", "input": {"x": 1}, "reply_to": "me", "correlation_id": "c-1"}, 0),
            record({"id": "b", "task": "nope", "input": {}, "reply_to": "me", "correlation_id": "c-2"}, 1),
        ]
    )
    assert {r["id"]: r["correlation_id"] for r in sink.on("me")} == {"a": "c-1", "b": "c-2"}


async def test_an_exception_in_the_batch_path_isolates_the_poison_record() -> None:
    class Poison(EchoRunner):
        def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
            # Not an object: building the reply raises inside the batch path, not in the runner.
            return ["not an object" if "poison" in i.input else {"y": 1} for i in items]  # type: ignore[misc]

    sink = ListSink()
    proc = processor(Poison(), sink)
    records = [record({"id": f"r{i}", "task": "echo", "input": {"x": i}}, i) for i in range(3)]
    records.insert(1, record({"id": "p", "task": "echo", "input": {"poison": 1}}, 9))
    await proc.process_isolating(records)
    assert sorted(r["id"] for r in sink.on("p.data.results")) == ["r0", "r1", "r2"]
    (letter,) = [DeadLetterEvent.model_validate(d) for d in sink.on("p.data.dlq")]
    assert letter.error.code == ErrorCode.INTERNAL and letter.source.offset == 9
    assert proc.stats.isolated == 1


async def test_items_carry_their_deadline_and_release_runs_after_delivery() -> None:
    seen: list[Item] = []
    released: list[list[dict[str, object]]] = []

    class Spy(EchoRunner):
        def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
            seen.extend(items)
            return super().run_batch(items)

    async def release(inputs: Sequence[dict[str, object]]) -> None:
        released.append(list(inputs))

    sink = ListSink()
    far = int(time.time() * 1000) + 60_000
    await processor(Spy(), sink, release=release).process(
        [record({"id": "a", "task": "echo", "input": {"x": 1}, "deadline_ms": far})]
    )
    assert seen[0].deadline_ms == far
    assert released == [[{"x": 1}]]


async def test_oversized_reply_becomes_payload_too_large_error() -> None:
    class Big(EchoRunner):
        def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
            return [{"blob": "x" * 5000} for _ in items]

    sink = ListSink()
    proc = BatchProcessor("data", Big(), sink, topic_prefix="p", cache=None, cache_ttl_s=1, max_event_bytes=2048)  # type: ignore[arg-type]
    await proc.process([record({"id": "a", "task": "echo", "input": {"x": 1}})])
    (reply,) = sink.on("p.data.results")
    assert reply["ok"] is False and reply["error"]["code"] == ErrorCode.PAYLOAD_TOO_LARGE


async def test_an_oversized_reply_is_never_cached() -> None:
    class Big(EchoRunner):
        def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
            return [{"blob": "x" * 5000} if "big" in i.input else {"y": 1} for i in items]

    class DictCache:
        def __init__(self) -> None:
            self.store: dict[str, ReplyEvent] = {}

        def key(self, service: str, task: str, model: str, payload: dict[str, object]) -> str:
            return orjson.dumps(payload).decode()

        async def get_many(self, keys: list[str]) -> list[ReplyEvent | None]:
            return [self.store.get(k) for k in keys]

        async def put_many(self, entries: list[tuple[str, ReplyEvent, int]]) -> None:
            self.store.update({k: r for k, r, _ in entries})

    cache, sink = DictCache(), ListSink()
    proc = BatchProcessor(
        "data",
        Big(),
        sink,
        topic_prefix="p",
        cache=cache,
        cache_ttl_s=1,
        max_event_bytes=2048,  # type: ignore[arg-type]
    )
    await proc.process(
        [
            record({"id": "a", "task": "echo", "input": {"big": 1}, "cache": True}, 0),
            record({"id": "b", "task": "echo", "input": {"x": 1}, "cache": True}, 1),
        ]
    )
    assert list(cache.store) == [orjson.dumps({"x": 1}).decode()]


async def test_identical_requests_in_a_batch_run_once_and_fan_out() -> None:
    runner, sink = EchoRunner(), ListSink()
    proc = processor(runner, sink)
    same = {"task": "echo", "input": {"x": 7}, "reply_to": "me", "cache": False}
    records = [record({"id": f"s{i}", **same}, i) for i in range(3)]
    records.append(record({"id": "other", "task": "echo", "input": {"x": 8}, "reply_to": "me"}, 3))
    await proc.process(records)
    assert runner.calls == [2]  # three identical requests ran once
    replies = {r["id"]: r for r in sink.on("me")}
    assert {rid: r["output"] for rid, r in replies.items()} == {"s0": {"y": 14}, "s1": {"y": 14}, "s2": {"y": 14},
                                                                "other": {"y": 16}}  # fmt: skip
    assert proc.stats.deduplicated == 2


async def test_requests_that_are_not_reproducible_are_never_merged() -> None:
    runner, sink = EchoRunner(), ListSink()
    # For the LLM only greedy or seeded completions are reproducible; these inputs are neither.
    proc = BatchProcessor("llm", runner, sink, topic_prefix="p", cache=None, cache_ttl_s=60)  # type: ignore[arg-type]
    events = [{"id": f"r{i}", "task": "echo", "input": {"x": 1}, "reply_to": "me"} for i in range(2)]
    await proc.process([record(e, i) for i, e in enumerate(events)])
    assert runner.calls == [2] and proc.stats.deduplicated == 0
