"""Pure units for the edge's admission guards: the in-flight limit, the broker view, their HTTP answers.

No Kafka, no Redis: ``Edge`` gets a fake producer (a ``send_and_wait`` that blocks or fails, a metadata
call that answers or not) and no cache (no models known, so no cache key and Redis is never touched).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from fastapi import FastAPI

from api.edge import Edge
from api.errors import OverloadedError, UnavailableError, install_error_handlers
from api.guards import BrokerState, InFlightLimit
from schemas import ErrorCode
from streams.replies import ReplyRouter
from streams.settings import Settings


def test_in_flight_limit_refuses_past_the_limit_and_counts() -> None:
    limit = InFlightLimit(2)
    assert limit.try_acquire() and limit.try_acquire()
    assert not limit.try_acquire() and not limit.try_acquire()
    assert (limit.count, limit.peak, limit.rejected) == (2, 2, 2)
    limit.release()
    assert limit.try_acquire() and limit.count == 2
    limit.release()
    limit.release()
    assert limit.count == 0
    with pytest.raises(RuntimeError):
        limit.release()
    with pytest.raises(ValueError):
        InFlightLimit(0)


def test_broker_state_transitions_with_an_injected_clock() -> None:
    now = [100.0]
    state = BrokerState(clock=lambda: now[0])
    assert state.status == "ok" and not state.down and state.since == 100.0
    now[0] = 105.0
    assert state.mark_down("boom") is True
    now[0] = 106.0
    assert state.mark_down("boom again") is False
    snap = state.snapshot()
    assert snap.status == "down" and snap.since == 105.0 and snap.last_error == "boom again" and snap.failures == 2
    now[0] = 110.0
    assert state.mark_ok() is True and state.mark_ok() is False
    state.suspect("slow ack")
    assert state.status == "ok" and state.last_error == "slow ack"
    state.last_error = "boom again"
    assert state.snapshot().as_dict() == {
        "status": "ok",
        "since": 110.0,
        "last_error": "boom again",
        "last_ok": 110.0,
        "failures": 0,
    }


class _FakeClient:
    """What the edge's probe (``streams.topics.existing_topics``) calls: a node, then one metadata request."""

    def __init__(self) -> None:
        self.answers = True

    @property
    def cluster(self) -> SimpleNamespace:
        return SimpleNamespace(brokers=lambda: [SimpleNamespace(nodeId=1)])

    async def send(self, node_id: int, request: object) -> object:
        if not self.answers:
            raise KafkaConnectionError("no broker")
        return SimpleNamespace(topics=[])


class _FakeProducer:
    """``send_and_wait`` blocks until ``release`` is set, or raises ``fail`` at once."""

    def __init__(self) -> None:
        self.client = _FakeClient()
        self.release = asyncio.Event()
        self.fail: BaseException | None = None
        self.sent = 0

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self.sent += 1
        if self.fail is not None:
            raise self.fail
        await self.release.wait()


def _edge(producer: _FakeProducer, **overrides: Any) -> Edge:
    settings = Settings(max_in_flight=2, produce_timeout_s=0.2, request_timeout_s=0.5, **overrides)
    # No models known -> no cache key -> Redis is never used; the listener is not needed for these paths.
    return Edge(settings, producer, None, ReplyRouter(), None, "t.edge.x.replies")  # type: ignore[arg-type]


async def test_call_past_the_limit_raises_429_at_once_and_releases_slots() -> None:
    producer = _FakeProducer()
    edge = _edge(producer)
    held = [asyncio.create_task(edge.call("data", "analyze", {"records": []})) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert edge.in_flight.count == 2
    with pytest.raises(OverloadedError) as info:
        await edge.call("data", "analyze", {"records": []}, request_id="r-over")
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "1"}
    assert info.value.request_id == "r-over" and producer.sent == 2
    producer.release.set()  # produced; no reply comes -> 504 after request_timeout_s, slots released
    for task in held:
        with pytest.raises(Exception, match="no reply"):
            await task
    assert edge.load == {"in_flight": 0, "max_in_flight": 2, "peak": 2, "rejected": 1}


async def test_produce_timeout_is_503_and_asks_the_probe_which_decides() -> None:
    producer = _FakeProducer()  # never acknowledges: a broker that does not answer
    edge = _edge(producer)
    with pytest.raises(UnavailableError):
        await edge.call("data", "analyze", {"records": []})
    # A produce timeout alone does not mark Kafka down (a slow ack under a burst is no outage) ...
    assert edge.kafka_state["status"] == "ok" and "produce" in str(edge.kafka_state["last_error"])
    assert edge._probe_now.is_set()  # ... it asks the probe to look now
    producer.client.answers = False
    assert await edge.probe_kafka() is False and edge.kafka_state["status"] == "down"
    with pytest.raises(UnavailableError, match="unavailable"):
        await edge.call("data", "analyze", {"records": []})
    assert producer.sent == 1  # the second request never reached the producer
    producer.client.answers = True
    assert await edge.probe_kafka() is True
    assert edge.kafka_state["status"] == "ok" and edge.in_flight.count == 0


async def test_probe_marks_down_and_a_non_broker_error_does_not() -> None:
    producer = _FakeProducer()
    edge = _edge(producer)
    producer.fail = MessageSizeTooLargeError()
    with pytest.raises(UnavailableError):
        await edge.call("data", "analyze", {"records": []})
    assert edge.kafka_state["status"] == "ok"  # a record too large says nothing about the broker
    producer.client.answers = False
    assert await edge.probe_kafka() is False
    assert edge.kafka_state["status"] == "down" and "no broker" in str(edge.kafka_state["last_error"])


async def test_probe_task_recovers_the_state_by_itself() -> None:
    producer = _FakeProducer()
    producer.client.answers = False
    edge = _edge(producer)
    await edge.start()
    try:
        assert edge.broker.down
        producer.client.answers = True
        for _ in range(40):  # the probe runs every PROBE_INTERVAL_S (1 s)
            if not edge.broker.down:
                break
            await asyncio.sleep(0.1)
        assert not edge.broker.down
    finally:
        await edge.stop()


async def test_edge_errors_become_the_reply_shape_with_retry_after() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/over")
    async def over() -> None:
        raise OverloadedError("busy", request_id="rid-1", service="data", task="analyze")

    @app.get("/down")
    async def down() -> None:
        raise UnavailableError("kafka down", request_id="rid-2", service="data", task="analyze")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
        over_r, down_r = await client.get("/over"), await client.get("/down")
    assert over_r.status_code == 429 and over_r.headers["retry-after"] == "1"
    assert over_r.headers["x-request-id"] == "rid-1"
    body = over_r.json()
    assert body["ok"] is False and body["id"] == "rid-1" and body["error"]["code"] == ErrorCode.UNAVAILABLE
    assert body["service"] == "data" and body["task"] == "analyze" and body["output"] is None
    assert down_r.status_code == 503 and "retry-after" not in down_r.headers
    assert down_r.json()["error"] == {"code": ErrorCode.UNAVAILABLE, "message": "kafka down"}


async def test_the_probe_asks_the_next_broker_when_one_is_dead() -> None:
    from streams.topics import existing_topics

    class TwoBrokers:
        cluster = SimpleNamespace(brokers=lambda: [SimpleNamespace(nodeId=1), SimpleNamespace(nodeId=2)])
        asked: list[int] = []

        async def send(self, node_id: int, request: object) -> object:
            self.asked.append(node_id)
            if node_id == 1:
                raise KafkaConnectionError("connect call failed")  # the killed leader of a cluster
            return SimpleNamespace(topics=[(0, "t", False, [])])

    for _ in range(10):  # random order: the dead broker comes first about half of the time
        assert await existing_topics(TwoBrokers(), ["t"]) == {"t"}  # type: ignore[arg-type]
    assert 1 in TwoBrokers.asked and 2 in TwoBrokers.asked

    class NoneAnswers(TwoBrokers):
        async def send(self, node_id: int, request: object) -> object:
            raise KafkaConnectionError("connect call failed")

    with pytest.raises(KafkaConnectionError):
        await existing_topics(NoneAnswers(), ["t"])  # type: ignore[arg-type]
