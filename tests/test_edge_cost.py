"""Pure units for the edge's per-request cost (issue #15): every shortcut gives what the long way gave.

* ``request_record`` serialises a request event once, and its bytes are exactly what validating the event
  and encoding it (``RequestEvent.model_validate`` + ``streams.codec.encode``) gave;
* ``reply_body`` is ``ReplyEvent.model_dump(mode="json")`` field for field;
* ``route_reply_record`` validates only replies someone waits for; others are counted dropped unvalidated;
* with API keys, a request's key is hashed and compared once (the gate's verdict is reused by the
  dependency), and an app without the gate still checks the key itself (fails closed);
* every dependency of every route runs on the event loop (``async def``), none in the thread pool;
* the edge producer lingers only while one of its requests is in flight (``AdaptiveLinger``).
"""

from __future__ import annotations

import asyncio
import inspect

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from fastapi import APIRouter, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import SecretStr

import api.auth as auth
from api.edge import AdaptiveLinger, request_record
from api.errors import install_error_handlers, reply_body
from api.routes import data, health, lag, llm, metrics, nlp, requests, status, vision
from api.routes import openai as openai_routes
from schemas import ErrorInfo, ReplyEvent, RequestEvent
from streams.codec import decode_request, encode
from streams.replies import ReplyRouter, route_reply_record
from streams.settings import Settings

PAYLOADS: list[dict[str, object]] = [
    {"records": [{"id": 1, "value": 2.5, "tags": ["a", None]}, {"id": 2, "ok": True}]},
    {"text": 'héllo ✓ \u2028 "quoted"', "normalize": True},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "temperature": 0.0},
    {},
]


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize(
    "options",
    [{}, {"cache": False}, {"cache": True, "stream": True}, {"store_result_s": 3600}],
)
def test_request_record_is_byte_for_byte_the_validated_events_encoding(
    payload: dict[str, object], options: dict[str, object]
) -> None:
    fields = {"id": "r-1", "correlation_id": "c" * 24, "task": "analyze", "input": payload,
              "reply_to": "p.edge.e1.replies", "deadline_ms": 1_700_000_000_123}  # fmt: skip
    old = encode(RequestEvent.model_validate({**fields, **options}))
    new = request_record("r-1", "c" * 24, "analyze", payload, "p.edge.e1.replies", 1_700_000_000_123, **options)  # type: ignore[arg-type]
    assert new == old
    assert decode_request(new) == RequestEvent.model_validate({**fields, **options})


def test_request_record_refuses_a_value_json_cannot_carry() -> None:
    with pytest.raises(TypeError):
        request_record("r", "c", "analyze", {"x": object()}, "t", 1)


REPLIES = [
    ReplyEvent(id="a", correlation_id="c1", service="data", task="analyze", ok=True,
               output={"n": 3, "fields": {"v": {"mean": 1.5, "p50": None, "types": {"number": 3}}}, "l": [1, "x"]},
               model="data@1", timings_ms={"queue_ms": 1.25, "batch_size": 3.0}),
    ReplyEvent(id="b", service="nlp", task="embed", ok=False,
               error=ErrorInfo(code="invalid_input", message="text: too long"), cached=True),
    ReplyEvent(id="c", service="llm", task="completion", ok=True, output={}, timings_ms={}),
]  # fmt: skip


@pytest.mark.parametrize("reply", REPLIES)
def test_reply_body_is_the_models_json_dump(reply: ReplyEvent) -> None:
    body = reply_body(reply)
    assert body == reply.model_dump(mode="json")
    assert list(body) == list(reply.model_dump(mode="json"))  # same field order: same response bytes
    assert orjson.dumps(body) == orjson.dumps(reply.model_dump(mode="json"))


def _reply(correlation_id: str | None, **fields: object) -> bytes:
    base: dict[str, object] = {"id": "r1", "service": "data", "task": "analyze", "ok": True, "output": {"n": 1}}
    return orjson.dumps({**base, "correlation_id": correlation_id, **fields})


async def test_only_awaited_replies_are_validated_and_routed() -> None:
    router = ReplyRouter()
    correlation_id, future = router.expect("r1", "data", "analyze")
    # Not JSON, not an object: unreadable (the listener logs them).
    assert route_reply_record(b"{nope", router) is False
    assert route_reply_record(b"[1]", router) is False
    # Nobody waits for this correlation id: dropped without validation (it is not even a valid ReplyEvent).
    assert route_reply_record(orjson.dumps({"correlation_id": "someone-else", "ok": "not a bool"}), router) is True
    assert route_reply_record(orjson.dumps({"ok": True}), router) is True  # no correlation id at all
    assert router.dropped == 2 and not future.done()
    # Awaited but invalid: unreadable, and the call keeps waiting.
    assert route_reply_record(_reply(correlation_id, ok="not a bool"), router) is False
    assert not future.done() and router.dropped == 2
    # Awaited and valid: resolved once; the same reply again is dropped (nobody waits any more).
    assert route_reply_record(_reply(correlation_id), router) is True
    reply = await asyncio.wait_for(future, 1)
    assert reply.output == {"n": 1} and reply.correlation_id == correlation_id
    assert route_reply_record(_reply(correlation_id), router) is True and router.dropped == 3


async def test_partials_nobody_streams_are_dropped_unvalidated_and_streamed_ones_are_routed() -> None:
    router = ReplyRouter()
    correlation_id, _, queue = router.expect_stream("r1", "llm", "completion")
    foreign = {"partial": True, "service": "llm", "task": "completion",
               "deltas": [{"correlation_id": "x", "seq": "bad"}, {"correlation_id": "y"}]}  # fmt: skip
    assert route_reply_record(orjson.dumps(foreign), router) is True
    assert router.partials_dropped == 2 and queue.empty()
    ours = {"partial": True, "service": "llm", "task": "completion",
            "deltas": [{"id": "r1", "correlation_id": correlation_id, "attempt": "a", "seq": 0, "text": "Hi",
                        "tokens": 1}]}  # fmt: skip
    assert route_reply_record(orjson.dumps(ours), router) is True
    assert queue.get_nowait().text == "Hi"  # type: ignore[union-attr]


def _keyed_app(with_gate: bool, settings: Settings) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    router = APIRouter()

    @router.post("/data/x")
    async def route() -> dict[str, bool]:
        return {"ok": True}

    app.include_router(router, dependencies=auth.auth_dependencies(settings))
    if with_gate:
        app.add_middleware(auth.ApiKeyGate, settings=settings, open_paths=frozenset())
    return app


@pytest.mark.parametrize("with_gate", [True, False])
async def test_a_keyed_request_is_hashed_once_and_a_bad_key_is_refused(
    with_gate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(api_keys=[SecretStr("k-one"), SecretStr("k-two")])
    calls = []
    real = auth.identify

    def counting(presented: list[str], digests: list[bytes]) -> bytes | None:
        calls.append(presented)
        return real(presented, digests)

    monkeypatch.setattr(auth, "identify", counting)
    transport = httpx.ASGITransport(app=_keyed_app(with_gate, settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        ok = await http.post("/data/x", headers={"X-API-Key": "k-two"})
        assert ok.status_code == 200
        assert len(calls) == 1  # the gate's verdict is reused; without the gate the dependency checks once
        for headers in ({"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {}):
            refused = await http.post("/data/x", headers=headers)
            assert refused.status_code == 401, headers
            assert refused.json()["error"]["code"] == "unauthorized"


def _calls(dependant: Dependant) -> list[object]:
    out = []
    for dep in dependant.dependencies:
        if dep.call is not None:
            out.append(dep.call)
        out.extend(_calls(dep))
    return out


def _is_async(call: object) -> bool:
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(getattr(call, "__call__", None))  # noqa: B004


def test_every_route_dependency_runs_on_the_event_loop() -> None:
    checked = 0
    for module in (data, nlp, llm, vision, requests, openai_routes, health, metrics, lag, status):
        for route in module.router.routes:
            if not isinstance(route, APIRoute):
                continue
            for call in _calls(route.dependant):
                assert _is_async(call), f"{route.path}: dependency {call!r} is a plain def (run in a thread)"
                checked += 1
    for dependency in auth.auth_dependencies(Settings(api_keys=[SecretStr("k")])):
        assert _is_async(dependency.dependency)
        checked += 1
    assert checked > 20


async def test_the_linger_is_none_for_a_lone_request_and_busy_ms_while_one_is_in_flight() -> None:
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", linger_ms=7)  # never started: nothing connects
    linger = AdaptiveLinger(producer, busy_ms=3)
    assert linger.enabled  # aiokafka's accumulator still has the attribute (an upgrade that renames it fails here)
    accumulator = producer._message_accumulator
    with linger.sending():
        assert accumulator._linger_time == 0.0 and linger.in_flight == 1  # idle: at once
        with linger.sending():
            assert accumulator._linger_time == 0.003 and linger.in_flight == 2  # busy: batched
        with pytest.raises(RuntimeError), linger.sending():
            raise RuntimeError("a failed send is counted out too")
        assert linger.in_flight == 1
    assert linger.in_flight == 0
    with linger.sending():
        assert accumulator._linger_time == 0.0


def test_without_the_accumulator_attribute_the_producer_keeps_its_fixed_linger() -> None:
    class Producer:
        pass

    linger = AdaptiveLinger(Producer(), busy_ms=1)  # type: ignore[arg-type]
    assert not linger.enabled
    with linger.sending():
        assert linger.in_flight == 1
