"""Pure units of the batch runner's bookkeeping (api/batch_runner.py ``BatchDriver``): the first reply of a
line is its answer (duplicates after a resume collapse), counts follow it, and a line unanswered past its
timeout is produced again until its attempts run out. And the edge's group loop (``BatchRunners._run``): a
permanent failure stops it with its reason, a retriable or unknown one is retried with a capped backoff."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from aiokafka import errors as kerr

from api import batch_runner
from api.batch_lines import LineWork
from api.batch_runner import BatchDriver, BatchRunners
from schemas import ErrorInfo, ReplyEvent
from schemas.batch import RequestCounts
from streams.settings import BatchSettings, Settings

B = "batch_x"


def driver(**batch: object) -> BatchDriver:
    store = SimpleNamespace(settings=Settings(batch=BatchSettings(**batch)))  # type: ignore[arg-type]
    return BatchDriver(store, dict, B)  # type: ignore[arg-type]


def work(*lines: int) -> dict[int, LineWork]:
    return {n: LineWork(n, f"c{n}", "nlp", "embed", {"texts": ["x"]}, "embeddings", "m") for n in lines}


def reply(line: int, ok: bool, batch: str = B) -> ReplyEvent:
    error = None if ok else ErrorInfo(code="deadline_exceeded", message="late")
    return ReplyEvent(id=f"{batch}-{line}", service="nlp", task="embed", ok=ok, output={} if ok else None, error=error)


def test_the_first_reply_of_a_line_is_its_answer_and_duplicates_collapse() -> None:
    d = driver()
    lines = work(1, 2, 3)
    d.sent = {1: (0.0, 1), 2: (0.0, 1), 3: (0.0, 1)}
    assert d._take([reply(1, False), reply(1, True), reply(2, True), reply(2, True), reply(9, True),
                    reply(3, True, batch="batch_other")], lines)  # fmt: skip
    assert d.answered == {1: False, 2: True}
    assert d.sent == {3: (0.0, 1)}
    assert d._counts(total=4, refused=1) == RequestCounts(total=4, completed=1, failed=2)
    assert not d._take([reply(2, False)], lines)  # nothing new: line 2 keeps its first answer
    assert d.answered[2] is True


def test_a_line_past_its_timeout_is_due_again_until_its_attempts_run_out() -> None:
    d = driver(line_timeout_s=10, line_attempts=2)
    d.sent = {1: (0.0, 1), 2: (0.0, 2), 3: (95.0, 1)}
    assert d._due(100.0) == [1]
    assert d.timed_out == {2}
    assert set(d.sent) == {1, 3}
    d.answered = {1: True}
    assert d._counts(total=3, refused=0) == RequestCounts(total=3, completed=1, failed=1)


# The edge's group loop (BatchRunners._run): a failed round is classified; permanent stops it, the rest retries.


_yield = asyncio.sleep  # the real one: some tests replace asyncio.sleep to record the loop's backoff


class _Consumer:
    """Stands in for the runners' consumer: raises what it is given, round by round, then returns nothing."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.rounds = 0
        self.gate = asyncio.Event()  # a round without failure waits for it
        self.gate.set()

    async def getmany(self, timeout_ms: int) -> dict[object, list[object]]:
        self.rounds += 1
        if self.failures:
            raise self.failures.pop(0)
        await self.gate.wait()
        await _yield(0.001)  # as a real fetch, a round that finds nothing waits a little
        return {}


def runners(consumer: _Consumer) -> BatchRunners:
    store = SimpleNamespace(settings=Settings(), topics=SimpleNamespace(runners_group="g", jobs="jobs"))
    r = BatchRunners(store, dict)  # type: ignore[arg-type]  (its consumer is built, never started)
    r.consumer = consumer  # type: ignore[assignment]
    return r


async def test_a_permanent_failure_stops_the_runners_loop_and_says_why() -> None:
    consumer = _Consumer(kerr.GroupAuthorizationFailedError("not yours"), kerr.TopicAuthorizationFailedError())
    r = runners(consumer)
    await asyncio.wait_for(r._run(), timeout=5)  # returns: no retry can fix an ACL
    assert consumer.rounds == 1
    assert r.failure is not None and "GroupAuthorizationFailedError" in r.failure
    assert r.state()["error"] == r.failure and r.state()["running"] is False


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """What the runners' loop asks ``asyncio.sleep`` for (each wait returns at once, after one loop turn)."""
    asked: list[float] = []

    async def sleep(seconds: float) -> None:
        asked.append(seconds)
        await _yield(0)

    monkeypatch.setattr(batch_runner.asyncio, "sleep", sleep)
    return asked


async def test_retriable_and_unknown_failures_are_retried_with_a_doubling_backoff_then_forgotten(
    waits: list[float],
) -> None:
    failures = [kerr.KafkaConnectionError(), kerr.RequestTimedOutError(), ValueError("bug"), kerr.NodeNotReadyError()]
    consumer = _Consumer(*failures)
    consumer.gate.clear()  # the round after the failures waits until the streak is checked
    r = runners(consumer)
    task = asyncio.create_task(r._run())
    while consumer.rounds < len(failures) + 1:
        await _yield(0.001)
    assert r.failed_rounds == 4 and r.failure is None
    assert "NodeNotReadyError" in str(r.last_error)
    consumer.gate.set()
    while r.failed_rounds:  # the next round succeeds: the streak is forgotten
        await _yield(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert waits[:4] == [batch_runner.RETRY_FIRST_S * 2**n for n in range(4)]
    assert r.last_error is None and r.failure is None


async def test_the_backoff_is_capped(waits: list[float]) -> None:
    consumer = _Consumer(*[kerr.KafkaConnectionError() for _ in range(12)])
    r = runners(consumer)
    task = asyncio.create_task(r._run())
    while consumer.rounds < 13:
        await _yield(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert max(waits) == batch_runner.RETRY_MAX_S and waits.count(batch_runner.RETRY_MAX_S) >= 5


class _Router(list[object]):
    dropped = foreign = 0


@pytest.mark.integration
async def test_health_is_degraded_with_the_reason_when_the_runners_stopped(infra_settings: Settings) -> None:
    from api.routes.health import health_report
    from streams.redis import connect

    settings = infra_settings.model_copy(update={"services": []})  # no agents needed: only the runners' part
    r = runners(_Consumer(kerr.TopicAuthorizationFailedError("jobs")))
    redis = connect(settings)
    edge = SimpleNamespace(
        settings=settings, redis=redis, listener=SimpleNamespace(running=True), router=_Router(), reply_topic="t",
        kafka_state={"status": "ok"}, pending_async=SimpleNamespace(total=0), load={}, batch_runners=r,
    )  # fmt: skip
    try:
        healthy = await health_report(edge)  # type: ignore[arg-type]
        assert (healthy.status, healthy.code) == ("ok", 200)
        assert healthy.edge["batch_runners"] == {"running": False, "batches": 0, "failed_rounds": 0, "error": None}
        await r._run()
        report = await health_report(edge)  # type: ignore[arg-type]
        assert (report.status, report.code) == ("degraded", 200)
        assert "TopicAuthorizationFailedError" in str(report.edge["batch_runners"]["error"])  # type: ignore[index]
    finally:
        await redis.aclose()
