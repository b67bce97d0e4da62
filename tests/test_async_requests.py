"""Asynchronous requests (``Prefer: respond-async`` / ``?wait=false``, ``GET /requests/{id}``), end to end.

Real Kafka and Redis, the edge and agents as processes (``Pipeline.isolated``):

* a data + vision pipeline: round trips on both services (``?wait=false`` and the Prefer header), the
  result equal to the synchronous call's, an agent's error reply (501) and the edge's timeout (504, no agent
  for nlp) kept with the synchronous status, 404 for an unknown id, TTLs on the kept keys;
* a slow data agent (``tests.fault_runners:slow_data``): 202 with Retry-After while pending, 409 for an
  id in use (pending, or done with its result kept, which stays intact), the result surviving an edge
  restart between the 202 and the GET, and a reply produced while the edge is down (kept by the agent)
  answered by the restarted edge;
* the agent's Redis away: the edge's own copy of the reply answers; a custom renderer gets its context back;
* a private Redis, stopped: an asynchronous request is 503, never a 202.

No timed asserts: polls are bounded in count, figures are printed (``ASYNC-FIGURES:`` / ``FAULT-COUNTS:``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import redis as redis_sync
from PIL import Image
from starlette.responses import JSONResponse, Response

import infra
from aisemble.pipeline import Pipeline, free_port, throwaway_prefix
from api.async_requests import Pending, lookup, register_renderer
from api.serving import prefers_async
from schemas import ErrorCode, ReplyEvent
from streams.redis import connect
from streams.results import encode_result, pending_key, result_key
from streams.settings import Settings

pytestmark = pytest.mark.integration

RESULT_TTL_S = 300
TIMEOUT_S = 8  # the data + vision pipeline's request timeout (the nlp request without an agent waits it out)
SLOW_BATCH_S = 6  # the slow agent's time per batch: requests stay pending that long
POLL_S = 0.25
ASYNC = {"Prefer": "respond-async"}


def _records(tag: str | None = None) -> dict[str, object]:
    return {"operation": "analyze", "data": {"records": [{"id": 1, "value": 10}, {"tag": tag or uuid.uuid4().hex}]}}


def _png_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _accepted(response: httpx.Response) -> str:
    """Check a 202 of a submission; returns its request id."""
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"id", "status", "location"} and body["status"] == "pending"
    assert response.headers["location"] == body["location"] == f"/requests/{body['id']}"
    assert response.headers["preference-applied"] == "respond-async"
    return str(body["id"])


def _poll(http: httpx.Client, rid: str, max_polls: int) -> tuple[httpx.Response, int]:
    """GET /requests/{rid} until it is no longer 202 (at most ``max_polls`` times); returns it and the 202s."""
    for pending in range(max_polls):
        response = http.get(f"/requests/{rid}")
        if response.status_code != 202:
            return response, pending
        assert response.headers["retry-after"] == "1"
        time.sleep(POLL_S)
    raise AssertionError(f"{rid} still pending after {max_polls} polls")


def _same_reply(async_body: dict[str, object], sync_body: dict[str, object]) -> None:
    """The kept reply is the synchronous call's body, but for its id and timings."""
    ignore = {"id", "timings_ms"}
    assert {k: v for k, v in async_body.items() if k not in ignore} == {
        k: v for k, v in sync_body.items() if k not in ignore
    }


def _wait_healthy(pipeline: Pipeline, max_polls: int = 240) -> None:
    for _ in range(max_polls):
        try:
            if httpx.get(f"{pipeline.url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"edge not healthy again:\n{pipeline.log_tail('edge')}")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["respond-async"], True),
        (["Respond-Async"], True),
        (["wait=10, respond-async"], True),
        (["return=minimal", "respond-async; foo=bar"], True),
        (["return=minimal"], False),
        (["respond-asyncx"], False),
        (["handling=lenient; respond-async"], False),  # a parameter of another preference, not a preference
        ([], False),
    ],
)
def test_prefer_header_parsing(values: list[str], expected: bool) -> None:
    assert prefers_async(values) is expected


# --- data + vision -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    logs = Path(tmp_path_factory.mktemp("logs"))
    p = Pipeline.isolated(
        infra_settings,
        ["data", "vision"],
        logs,
        AISEMBLE_REQUEST_TIMEOUT_S=str(TIMEOUT_S),
        AISEMBLE_ASYNC_DEADLINE_S=str(TIMEOUT_S),  # asynchronous requests get their own deadline: the same here
        AISEMBLE_ASYNC_RESULT_TTL_S=str(RESULT_TTL_S),
        AISEMBLE_VISION__THREADS="1",
    ).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def http(pipeline: Pipeline) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pipeline.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def redis(infra_settings: Settings) -> Iterator[redis_sync.Redis]:
    client = redis_sync.Redis.from_url(infra_settings.redis_url)
    yield client
    client.close()


def test_round_trip_on_two_services_wait_false_and_prefer(
    http: httpx.Client, pipeline: Pipeline, redis: redis_sync.Redis
) -> None:
    figures: dict[str, object] = {}
    payload = {**_records(), "cache": False}
    sync_data = http.post("/data/process", json=payload)
    submitted = time.perf_counter()
    rid = _accepted(http.post("/data/process", params={"wait": "false"}, json=payload))
    done, pending = _poll(http, rid, 200)
    figures["data_ms"], figures["data_pending_polls"] = round((time.perf_counter() - submitted) * 1000), pending
    assert done.status_code == 200 == sync_data.status_code, done.text
    assert done.headers["x-request-id"] == rid and ReplyEvent.model_validate(done.json()).ok
    _same_reply(done.json(), sync_data.json())

    vision = {"task": "describe", "image_b64": _png_b64(), "cache": False}
    sync_vision = http.post("/ai/vision/analyze", json=vision)
    own_id = f"mine-{uuid.uuid4().hex[:8]}"
    submitted = time.perf_counter()
    rid = _accepted(http.post("/ai/vision/analyze", json=vision, headers={**ASYNC, "X-Request-Id": own_id}))
    assert rid == own_id
    done, pending = _poll(http, rid, 200)
    figures["vision_ms"], figures["vision_pending_polls"] = round((time.perf_counter() - submitted) * 1000), pending
    assert done.status_code == 200 == sync_vision.status_code, done.text
    _same_reply(done.json(), sync_vision.json())
    assert done.json()["id"] == own_id

    # TTLs: the result lives async_result_ttl_s, the marker a bounded time (that plus the request timeout).
    prefix = pipeline.prefix
    result_ttl = redis.ttl(result_key(prefix, own_id))
    marker_ttl = redis.ttl(pending_key(prefix, own_id))
    figures["result_ttl_s"], figures["marker_ttl_s"] = result_ttl, marker_ttl
    print("ASYNC-FIGURES:", json.dumps(figures))
    assert 0 < result_ttl <= RESULT_TTL_S
    assert 0 < marker_ttl <= RESULT_TTL_S + TIMEOUT_S + 1


def test_other_prefer_forms_and_a_plain_call_stay_synchronous(http: httpx.Client) -> None:
    payload = {**_records(), "cache": False}
    assert http.post("/data/process", json=payload, headers={"Prefer": "return=minimal"}).status_code == 200
    assert http.post("/data/process", json=payload, params={"wait": "true"}).status_code == 200
    both = http.post("/data/process", json=payload, headers={"Prefer": "wait=5, Respond-Async"})
    rid = _accepted(both)
    assert _poll(http, rid, 200)[0].status_code == 200


def test_a_cache_hit_is_kept_at_once(http: httpx.Client) -> None:
    payload = _records()
    assert http.post("/data/process", json=payload).status_code == 200  # fills the cache
    rid = _accepted(http.post("/data/process", json=payload, params={"wait": "false"}))
    done = http.get(f"/requests/{rid}")  # no poll: the edge kept it before answering 202
    assert done.status_code == 200 and done.json()["cached"] is True and done.json()["id"] == rid


def test_an_agent_error_reply_is_kept_with_its_status(http: httpx.Client) -> None:
    body = {"task": "classify", "image_b64": _png_b64(), "cache": False}  # no classifier configured: 501
    sync = http.post("/ai/vision/analyze", json=body)
    rid = _accepted(http.post("/ai/vision/analyze", json=body, headers=ASYNC))
    done, _ = _poll(http, rid, 200)
    assert sync.status_code == done.status_code == 501, done.text
    assert done.json()["error"]["code"] == ErrorCode.MODEL_NOT_CONFIGURED
    _same_reply(done.json(), sync.json())


def test_no_reply_before_the_deadline_is_the_synchronous_504(http: httpx.Client) -> None:
    body = {"task": "sentiment", "text": "no nlp agent runs here"}
    rid = _accepted(http.post("/ai/nlp/process", json=body, headers=ASYNC))
    sync = http.post("/ai/nlp/process", json=body)  # waits TIMEOUT_S
    done, pending = _poll(http, rid, int(4 * TIMEOUT_S / POLL_S))
    print("ASYNC-FIGURES:", json.dumps({"timeout_pending_polls": pending}))
    assert sync.status_code == done.status_code == 504, done.text
    assert done.json()["error"]["code"] == sync.json()["error"]["code"] == ErrorCode.TIMEOUT
    assert done.json()["id"] == rid and done.json()["service"] == "nlp"


def test_unknown_and_invalid_ids(http: httpx.Client) -> None:
    missing = http.get(f"/requests/nobody-{uuid.uuid4().hex}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == ErrorCode.NOT_FOUND
    assert http.get("/requests/" + "x" * 129).status_code == 422


def test_openapi_documents_the_202_and_the_result_route(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    for path in ("/data/process", "/ai/nlp/process", "/ai/vision/analyze", "/ai/vision/analyze/upload"):
        operation = doc["paths"][path]["post"]
        assert "202" in operation["responses"], path
        names = {p["name"] for p in operation["parameters"]}
        assert {"wait", "prefer"} <= names, path
    assert {"200", "202", "404", "503", "504"} <= set(doc["paths"]["/requests/{request_id}"]["get"]["responses"])


# --- a slow agent: pending, duplicates, edge restarts ------------------------------------------------------------


@pytest.fixture(scope="module")
def slow(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    logs = Path(tmp_path_factory.mktemp("slow-logs"))
    p = Pipeline.isolated(
        infra_settings,
        [],
        logs,
        AISEMBLE_REQUEST_TIMEOUT_S="60",
        AISEMBLE_ASYNC_RESULT_TTL_S=str(RESULT_TTL_S),
        AISEMBLE_TEST_BATCH_S=str(SLOW_BATCH_S),
        AISEMBLE_DATA__MAX_BATCH="4",
    )
    p.add_agent("data", "--runner", "tests.fault_runners:slow_data")
    p.start()
    yield p
    p.stop()


def test_pending_is_202_with_retry_after_and_an_id_in_use_is_409(slow: Pipeline) -> None:
    with httpx.Client(base_url=slow.url, timeout=60) as http:
        rid = f"slow-{uuid.uuid4().hex[:8]}"
        payload = {**_records(), "cache": False}
        _accepted(http.post("/data/process", json=payload, params={"wait": "false"}, headers={"X-Request-Id": rid}))
        pending = http.get(f"/requests/{rid}")  # the agent sleeps SLOW_BATCH_S on it
        assert pending.status_code == 202 and pending.headers["retry-after"] == "1", pending.text
        assert pending.json() == {"id": rid, "status": "pending", "location": f"/requests/{rid}"}
        again = http.post("/data/process", json=payload, headers={**ASYNC, "X-Request-Id": rid})
        assert again.status_code == 409, again.text
        done, polls = _poll(http, rid, int(10 * SLOW_BATCH_S / POLL_S))
        print("ASYNC-FIGURES:", json.dumps({"slow_pending_polls": polls}))
        assert done.status_code == 200 and done.json()["ok"], done.text
        reused = http.post("/data/process", json=payload, headers={**ASYNC, "X-Request-Id": rid})
        assert reused.status_code == 409, reused.text  # a done id is still in use while its result is kept
        kept = http.get(f"/requests/{rid}")
        assert kept.status_code == 200 and kept.json() == done.json(), "its result is intact"


def test_a_result_survives_an_edge_restart_while_pending(slow: Pipeline) -> None:
    counts = {"sent": 0, "answered": 0, "lost": 0}
    with httpx.Client(base_url=slow.url, timeout=60) as http:
        ids = []
        for _ in range(3):
            ids.append(_accepted(http.post("/data/process", json={**_records(), "cache": False}, headers=ASYNC)))
            counts["sent"] += 1
        slow.kill("edge", signal.SIGTERM)
        slow.restart("edge")
        _wait_healthy(slow)
        for rid in ids:
            done, _ = _poll(http, rid, int(20 * SLOW_BATCH_S / POLL_S))
            counts["answered"] += int(done.status_code == 200 and done.json()["ok"])
    counts["lost"] = counts["sent"] - counts["answered"]
    print("FAULT-COUNTS:", json.dumps({"test": "edge_restart_while_pending", **counts}))
    assert counts["lost"] == 0


def test_a_reply_produced_while_the_edge_is_down_is_kept(slow: Pipeline, infra_settings: Settings) -> None:
    client = redis_sync.Redis.from_url(infra_settings.redis_url)
    counts = {"sent": 0, "kept_while_down": 0, "answered": 0, "lost": 0}
    try:
        with httpx.Client(base_url=slow.url, timeout=60) as http:
            rid = _accepted(http.post("/data/process", json={**_records(), "cache": False}, headers=ASYNC))
            counts["sent"] = 1
            slow.kill("edge", signal.SIGKILL)  # gone at once: nothing of it can keep the reply
            for _ in range(int(20 * SLOW_BATCH_S / POLL_S)):
                if client.exists(result_key(slow.prefix, rid)):
                    break
                time.sleep(POLL_S)
            counts["kept_while_down"] = int(client.exists(result_key(slow.prefix, rid)))
            assert slow.procs["edge"].poll() is not None, "the edge must still be down"
            slow.restart("edge")
            _wait_healthy(slow)
            done, _ = _poll(http, rid, int(10 * SLOW_BATCH_S / POLL_S))
            counts["answered"] = int(done.status_code == 200 and done.json()["ok"])
    finally:
        client.close()
    counts["lost"] = counts["sent"] - counts["answered"]
    print("FAULT-COUNTS:", json.dumps({"test": "reply_while_edge_down", **counts}))
    assert counts["kept_while_down"] == 1 and counts["lost"] == 0


def test_the_edge_keeps_the_reply_when_the_agent_cannot(infra_settings: Settings, tmp_path: Path) -> None:
    """The agent's Redis is away (a port nobody listens on): the edge's own copy answers the GET."""
    pipeline = Pipeline.isolated(infra_settings, [], tmp_path, AISEMBLE_REQUEST_TIMEOUT_S="30")
    shared_redis = pipeline.env["AISEMBLE_REDIS_URL"]
    pipeline.env["AISEMBLE_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    agent = pipeline.add_agent("data")
    pipeline.env["AISEMBLE_REDIS_URL"] = shared_redis  # the edge's
    counts = {"sent": 0, "answered": 0, "lost": 0}
    try:
        pipeline.start()
        with httpx.Client(base_url=pipeline.url, timeout=60) as http:
            ids = [_accepted(http.post("/data/process", json={**_records(), "cache": False}, headers=ASYNC))]
            ids.append(_accepted(http.post("/data/process", json={**_records(), "cache": False}, headers=ASYNC)))
            counts["sent"] = len(ids)
            for rid in ids:
                done, _ = _poll(http, rid, 400)
                counts["answered"] += int(done.status_code == 200 and done.json()["ok"])
        counts["lost"] = counts["sent"] - counts["answered"]
        print("FAULT-COUNTS:", json.dumps({"test": "agent_cannot_keep", **counts}))
        assert counts["lost"] == 0
        assert "could not keep" in pipeline.log_tail(agent, 200_000), "the agent's own write must have failed"
    finally:
        pipeline.stop()


def test_a_renderer_gets_its_context_back(infra_settings: Settings, redis: redis_sync.Redis) -> None:
    """``register_renderer`` + the marker's context: the GET answers in the route's own shape (pending
    result, then the kept reply, then the timeout), against the real Redis without Kafka."""

    def shaped(reply: ReplyEvent, context: Mapping[str, object]) -> Response:
        return JSONResponse({"shaped": reply.ok, "model": context["model"]}, status_code=200 if reply.ok else 599)

    register_renderer("test-shape", shaped)
    prefix = throwaway_prefix()
    settings = infra_settings.model_copy(update={"topic_prefix": prefix, "request_timeout_s": 5.0})
    rid, late = uuid.uuid4().hex, uuid.uuid4().hex
    marker = Pending(service="data", task="analyze", deadline_ms=int(time.time() * 1000) + 60_000, render="test-shape",
                     context={"model": "mine"})  # fmt: skip
    expired = marker.model_copy(update={"deadline_ms": int(time.time() * 1000) - 60_000})
    redis.set(pending_key(prefix, rid), marker.model_dump_json(), ex=60)
    redis.set(pending_key(prefix, late), expired.model_dump_json(), ex=60)
    reply = ReplyEvent(id=rid, service="data", task="analyze", ok=True, output={"count": 1})

    async def run() -> tuple[Response, Response, Response]:
        client = connect(settings)
        edge = SimpleNamespace(settings=settings, redis=client)
        try:
            pending = await lookup(edge, rid)  # type: ignore[arg-type]
            redis.set(result_key(prefix, rid), encode_result(reply), ex=60)
            return pending, await lookup(edge, rid), await lookup(edge, late)  # type: ignore[arg-type]
        finally:
            await client.aclose()

    pending, done, timed_out = asyncio.run(run())
    assert pending.status_code == 202
    assert (done.status_code, json.loads(bytes(done.body))) == (200, {"shaped": True, "model": "mine"})
    assert (timed_out.status_code, json.loads(bytes(timed_out.body))) == (599, {"shaped": False, "model": "mine"})


# --- Redis down at submit ------------------------------------------------------------------------------------------


def test_redis_down_at_submit_is_503_not_202(infra_settings: Settings, tmp_path: Path) -> None:
    handle = infra.start_redis(free_port(), tmp_path / "redis")
    settings = infra_settings.model_copy(update={"redis_url": handle.url})
    pipeline = Pipeline.isolated(settings, ["data"], tmp_path, AISEMBLE_REDIS_BREAKER_RESET_S="60")
    try:
        pipeline.start()
        with httpx.Client(base_url=pipeline.url, timeout=60) as http:
            payload = {**_records(), "cache": False}
            before = http.post("/data/process", json=payload, headers=ASYNC)
            handle.stop()
            refused = http.post("/data/process", json=payload, headers=ASYNC)
            lookup = http.get(f"/requests/{uuid.uuid4().hex}")
            sync = http.post("/data/process", json=payload)  # a synchronous call needs no Redis
            counts = {
                "sent": 3,
                "accepted_before_stop": int(before.status_code == 202),
                "refused_503_while_down": int(refused.status_code == 503),
                "sync_answered_while_down": int(sync.status_code == 200),
            }
            counts["lost"] = counts["sent"] - sum(v for k, v in counts.items() if k != "sent")
            print("FAULT-COUNTS:", json.dumps({"test": "redis_down_at_submit", **counts}))
            assert before.status_code == 202 and refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == ErrorCode.UNAVAILABLE and "Redis" in error["message"]
            assert lookup.status_code == 503 and sync.status_code == 200
            assert counts["lost"] == 0
    finally:
        pipeline.stop()
        handle.stop()
