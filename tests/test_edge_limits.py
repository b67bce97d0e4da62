"""Pure units for the edge's admission guards: the in-flight limit, the broker view, their HTTP answers, and
admission before work (``api.admission.AdmissionGate``: the slot and the body's bytes before the body is read;
``ByteBudget``; ``PendingPerOwner``).

No Kafka, no Redis: ``Edge`` gets a fake producer (a ``send_and_wait`` that blocks or fails, a metadata
call that answers or not) and no cache (no models known, so no cache key and Redis is never touched).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from fastapi import FastAPI
from starlette.datastructures import Headers

from api.admission import ADMITTED_SCOPE_KEY, AdmissionGate, declared_bytes
from api.edge import Edge
from api.errors import OverloadedError, UnavailableError, install_error_handlers
from api.guards import BrokerState, ByteBudget, InFlightLimit, PendingPerOwner
from schemas import ErrorCode
from streams.replies import ReplyRouter
from streams.settings import Settings, VisionSettings


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


# --- admission before work (api.admission, api.guards): pure, a stand-in app behind the gate ---------------------


def test_byte_budget_refuses_past_the_limit_and_counts() -> None:
    budget = ByteBudget(100)
    assert budget.try_take(60) and budget.try_take(40)
    assert not budget.try_take(1)
    assert (budget.held, budget.peak, budget.rejected) == (100, 100, 1)
    budget.give(60)
    assert budget.try_take(50) and budget.held == 90
    with pytest.raises(RuntimeError):
        budget.give(91)
    with pytest.raises(ValueError):
        ByteBudget(0)


def test_pending_per_owner_bounds_each_owner_apart() -> None:
    pending = PendingPerOwner(2)
    assert pending.try_acquire("a") and pending.try_acquire("a")
    assert not pending.try_acquire("a") and pending.full("a") and not pending.check("a")
    assert pending.check("b") and pending.count("b") == 0  # a check takes nothing
    assert pending.try_acquire("b") and pending.try_acquire(None)  # None: the anonymous callers, one count
    assert (pending.count("a"), pending.count("b"), pending.total, pending.rejected) == (2, 1, 4, 2)
    pending.release("a")
    assert not pending.full("a") and pending.try_acquire("a")
    for owner in ("a", "a", "b", None):
        pending.release(owner)
    assert pending.total == 0
    with pytest.raises(RuntimeError):
        pending.release("b")


class _Exchange:
    """One request through ``AdmissionGate`` to a stand-in app that reads the body: what was read, sent."""

    def __init__(self, body: bytes, headers: dict[str, str], path: str = "/ai/vision/analyze/upload") -> None:
        self.body, self.headers, self.path = body, headers, path
        self.read = 0  # receive() calls
        self.app_ran = False
        self.sent: list[dict[str, Any]] = []

    async def run(self, gate_for: Any, edge: Any, fail: bool = False) -> int:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            self.app_ran = True
            assert scope[ADMITTED_SCOPE_KEY] is True
            assert edge.in_flight.count == 1  # the slot is held while the route works
            await receive()
            if fail:
                raise RuntimeError("the route failed")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        async def receive() -> dict[str, Any]:
            self.read += 1
            return {"type": "http.request", "body": self.body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            self.sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "headers": [(k.lower().encode(), v.encode()) for k, v in self.headers.items()],
            "app": SimpleNamespace(state=SimpleNamespace(edge=edge)),
        }
        await gate_for(app)(scope, receive, send)
        return int(self.sent[0]["status"])


def _gate_settings() -> Settings:
    return Settings(max_body_bytes=2048, vision=VisionSettings(max_upload_bytes=4096), max_in_flight_bytes=6000)


async def test_the_gate_refuses_at_the_in_flight_limit_before_reading_the_body() -> None:
    edge = SimpleNamespace(in_flight=InFlightLimit(1))
    budget = ByteBudget(6000)

    def gate(app: Any) -> AdmissionGate:
        return AdmissionGate(app, _gate_settings(), budget)

    assert edge.in_flight.try_acquire()  # another request holds the only slot
    refused = _Exchange(b"x" * 3000, {"content-length": "3000", "x-request-id": "up-1"})
    assert await refused.run(gate, edge) == 429
    assert refused.read == 0 and not refused.app_ran, "the body of a refused request is never read"
    headers = dict(refused.sent[0]["headers"])
    assert headers[b"retry-after"] == b"1" and headers[b"x-request-id"] == b"up-1"
    body = orjson.loads(refused.sent[1]["body"])
    assert body["error"]["code"] == ErrorCode.UNAVAILABLE and body["service"] == "vision"
    assert "requests already" in body["error"]["message"]
    assert budget.held == 0 and edge.in_flight.count == 1 and edge.in_flight.rejected == 1
    edge.in_flight.release()
    admitted = _Exchange(b"x" * 3000, {"content-length": "3000"})
    assert await admitted.run(gate, edge) == 200 and admitted.read == 1
    assert (edge.in_flight.count, budget.held, budget.peak) == (0, 0, 3000)  # both given back with the response


async def test_the_gate_counts_body_bytes_and_gives_them_back_however_the_exchange_ends() -> None:
    edge = SimpleNamespace(in_flight=InFlightLimit(10))
    budget = ByteBudget(6000)

    def gate(app: Any) -> AdmissionGate:
        return AdmissionGate(app, _gate_settings(), budget)

    assert budget.try_take(3000)  # an upload in progress holds 3,000 bytes
    over = _Exchange(b"x" * 3500, {"content-length": "3500"})
    assert await over.run(gate, edge) == 429 and over.read == 0
    assert "body bytes" in orjson.loads(over.sent[1]["body"])["error"]["message"]
    assert edge.in_flight.count == 0, "a request refused for its bytes gives its slot back"
    # without Content-Length (chunked) a body is counted at its path's full limit: 4,096 for vision
    assert await _Exchange(b"x" * 10, {"transfer-encoding": "chunked"}).run(gate, edge) == 429
    chunked_small_path = _Exchange(b"x" * 10, {"transfer-encoding": "chunked"}, path="/data/process")
    assert await chunked_small_path.run(gate, edge) == 200  # 2,048 for /data/process: fits
    # a declared length past the path's limit is counted at the limit (the body limit answers 413 unread)
    assert declared_bytes(Headers({"content-length": "99999"}), 4096) == 4096
    budget.give(3000)
    with pytest.raises(RuntimeError, match="the route failed"):
        await _Exchange(b"x" * 3000, {"content-length": "3000"}).run(gate, edge, fail=True)
    assert (edge.in_flight.count, budget.held) == (0, 0)


async def test_the_gate_lets_other_requests_through_and_fails_closed_without_an_edge() -> None:
    budget = ByteBudget(6000)
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = AdmissionGate(app, _gate_settings(), budget)  # type: ignore[arg-type]
    no_edge = SimpleNamespace(state=SimpleNamespace())
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        raise AssertionError("never read")

    for method, path in (("GET", "/requests/x"), ("GET", "/health"), ("POST", "/other")):
        scope = {"type": "http", "method": method, "path": path, "headers": [], "app": no_edge, "query_string": b""}
        await gate(scope, receive, send)
    assert seen == ["/requests/x", "/health", "/other"]
    sent.clear()
    scope = {"type": "http", "method": "POST", "path": "/data/process", "headers": [], "app": no_edge,
             "query_string": b""}  # fmt: skip
    await gate(scope, receive, send)
    assert sent[0]["status"] == 503 and seen == ["/requests/x", "/health", "/other"]
    scope["path"] = "/v1/chat/completions"
    sent.clear()
    await gate(scope, receive, send)
    assert sent[0]["status"] == 503 and "error" in orjson.loads(sent[1]["body"])  # OpenAI's shape on /v1/


def test_the_byte_budget_must_hold_the_largest_body() -> None:
    with pytest.raises(ValueError, match="max_in_flight_bytes"):
        Settings(max_in_flight_bytes=1024 * 1024, vision=VisionSettings(max_upload_bytes=2 * 1024 * 1024))
