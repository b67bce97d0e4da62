"""Admission before work, end to end: the real edge, Kafka and Redis (``Pipeline.isolated``, data agent only).

* a full edge (its ``max_in_flight`` slots held by requests that wait for an nlp agent that does not run)
  answers an upload 429 **before its body is sent**: the test sends the headers and a first slice of the
  body on a raw socket and reads the 429 while the rest was never sent; and a refused upload leaves no
  claim-check key in Redis;
* the in-flight bytes: an upload that would pass ``max_in_flight_bytes`` while another one is being sent
  is refused the same way, and once the first is done the same upload is taken;
* an asynchronous request holds no in-flight slot once Kafka has it (``/health`` shows 0 in flight while
  two are pending, and a synchronous call is served); past ``max_pending_async_per_key`` the answer is 429,
  an asynchronous upload refused there writes no claim check, and a synchronous call is still served.

Bounds are generous (seconds where the edge answers in milliseconds); figures print as ``ADMISSION-FIGURES:``.
"""

from __future__ import annotations

import io
import json
import math
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_sync
from PIL import Image

from aisemble.pipeline import Pipeline
from schemas import ErrorCode
from streams.settings import Settings

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 6  # how long a request to nlp (no agent here) holds its slot, then 504
MAX_IN_FLIGHT = 2
MAX_PENDING = 2
UPLOAD_LIMIT = 1024 * 1024  # vision.max_upload_bytes
BYTES_LIMIT = UPLOAD_LIMIT + 512 * 1024  # max_in_flight_bytes: one full upload fits, two do not
ANSWER_BOUND_S = 5.0  # the edge refuses in milliseconds; a regression to "after the body" waits forever
BOUNDARY = "aisemble-test-boundary"


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    logs = Path(tmp_path_factory.mktemp("admission-logs"))
    p = Pipeline.isolated(
        infra_settings,
        ["data"],
        logs,
        AISEMBLE_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S),
        AISEMBLE_ASYNC_DEADLINE_S=str(REQUEST_TIMEOUT_S),  # pending asynchronous requests end this soon too
        AISEMBLE_MAX_IN_FLIGHT=str(MAX_IN_FLIGHT),
        AISEMBLE_MAX_PENDING_ASYNC_PER_KEY=str(MAX_PENDING),
        AISEMBLE_VISION__MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
        AISEMBLE_MAX_IN_FLIGHT_BYTES=str(BYTES_LIMIT),
    ).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def redis(infra_settings: Settings) -> Iterator[redis_sync.Redis]:
    client = redis_sync.Redis.from_url(infra_settings.redis_url)
    yield client
    client.close()


def _image(min_bytes: int) -> bytes:
    """A PNG of a little over ``min_bytes`` (random noise does not compress), above ``inline_max_bytes``."""
    rng = random.Random(min_bytes)
    side = math.isqrt(min_bytes // 3) + 1
    image = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert min_bytes <= buffer.tell() < min_bytes * 1.05
    return buffer.getvalue()


def _multipart(image: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="task"\r\n\r\ndescribe\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def _start_upload(pipeline: Pipeline, body: bytes, sent: int, extra: str = "") -> socket.socket:
    """Send an upload's headers and only its first ``sent`` bytes; the socket is left open."""
    sock = socket.create_connection(("127.0.0.1", pipeline.port), timeout=ANSWER_BOUND_S)
    head = (
        "POST /ai/vision/analyze/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    )
    sock.sendall(head.encode() + body[:sent])
    return sock


def _status_line(sock: socket.socket) -> tuple[str, float]:
    """The response's status line, read within ``ANSWER_BOUND_S``, and how long it took (s)."""
    started = time.perf_counter()
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        return "no answer", time.perf_counter() - started
    return data.split(b"\r\n", 1)[0].decode(), time.perf_counter() - started


def _claims(redis: redis_sync.Redis, prefix: str) -> int:
    return sum(1 for _ in redis.scan_iter(match=f"{prefix}:claim:*", count=500))


def _load(http: httpx.Client) -> dict[str, int]:
    edge = http.get("/health").json()["edge"]
    return {k: int(edge[k]) for k in ("in_flight", "pending_async", "rejected")}


def _hold_slots(pipeline: Pipeline, n: int) -> list[threading.Thread]:
    """``n`` synchronous requests to nlp (no agent): each holds a slot until its 504."""

    def call() -> None:
        httpx.post(f"{pipeline.url}/ai/nlp/process", json={"task": "sentiment", "text": "hold"}, timeout=60)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    return threads


def _wait_load(http: httpx.Client, key: str, value: int, polls: int = 100) -> dict[str, int]:
    for _ in range(polls):
        load = _load(http)
        if load[key] == value:
            return load
        time.sleep(0.1)
    raise AssertionError(f"{key} never reached {value}: {_load(http)}")


def test_a_full_edge_refuses_an_upload_before_its_body_and_parks_no_claim_check(
    pipeline: Pipeline, redis: redis_sync.Redis
) -> None:
    figures: dict[str, object] = {}
    body = _multipart(_image(700 * 1024))
    with httpx.Client(base_url=pipeline.url, timeout=60) as http:
        claims = _claims(redis, pipeline.prefix)
        holders = _hold_slots(pipeline, MAX_IN_FLIGHT)
        _wait_load(http, "in_flight", MAX_IN_FLIGHT)
        sock = _start_upload(pipeline, body, 4096)  # the headers and 4 KB of a ~700 KB body
        try:
            figures["partial_status"], took = _status_line(sock)
            figures["partial_answer_ms"] = round(took * 1000, 1)
        finally:
            sock.close()
        full = http.post(
            "/ai/vision/analyze/upload",
            content=body,
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        figures["full_status"] = full.status_code
        figures["claims_added_by_refusals"] = _claims(redis, pipeline.prefix) - claims
        for thread in holders:
            thread.join(timeout=4 * REQUEST_TIMEOUT_S)
        _wait_load(http, "in_flight", 0)
        again = http.post("/data/process", json={"operation": "analyze", "data": {"records": [{"a": 1}]}})
    print("ADMISSION-FIGURES:", json.dumps(figures))
    assert figures["partial_status"].startswith("HTTP/1.1 429"), "refused before the rest of the body was sent"
    assert full.status_code == 429 and full.headers["retry-after"] == "1", full.text
    assert full.json()["error"]["code"] == ErrorCode.UNAVAILABLE
    assert figures["claims_added_by_refusals"] == 0, "a refused upload must not park its image in Redis"
    assert again.status_code == 200, again.text  # the slots came back


def test_the_in_flight_bytes_refuse_an_upload_while_another_holds_them(
    pipeline: Pipeline, redis: redis_sync.Redis
) -> None:
    figures: dict[str, object] = {}
    big = _multipart(_image(900 * 1024))  # ~0.9 MB held while it is sent
    second = _multipart(_image(700 * 1024))  # 0.9 + 0.7 MB > BYTES_LIMIT (1.5 MB)
    with httpx.Client(base_url=pipeline.url, timeout=60) as http:
        # admitted: it holds its bytes until its exchange ends (asynchronous: no vision agent runs here)
        holder = _start_upload(pipeline, big, 1024, extra="Prefer: respond-async\r\n")
        try:
            _wait_load(http, "in_flight", 1)
            refused = _start_upload(pipeline, second, 1024)
            try:
                figures["second_status"], took = _status_line(refused)
                figures["second_answer_ms"] = round(took * 1000, 1)
            finally:
                refused.close()
            holder.sendall(big[1024:])  # the first upload completes and is answered
            figures["first_status"], _ = _status_line(holder)
        finally:
            holder.close()
        _wait_load(http, "in_flight", 0)
        taken = http.post(
            "/ai/vision/analyze/upload",
            content=second,
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Prefer": "respond-async"},
        )
        figures["second_later_status"] = taken.status_code
    print("ADMISSION-FIGURES:", json.dumps(figures))
    assert figures["second_status"].startswith("HTTP/1.1 429"), figures
    assert figures["first_status"].startswith("HTTP/1.1 202"), figures  # the first one was admitted
    assert taken.status_code == 202, taken.text  # the bytes came back with the first exchange


def test_an_async_request_holds_no_slot_once_produced_and_is_bounded_per_caller(
    pipeline: Pipeline, redis: redis_sync.Redis
) -> None:
    async_nlp = {"task": "sentiment", "text": "pending until the deadline"}
    headers = {"Prefer": "respond-async"}
    with httpx.Client(base_url=pipeline.url, timeout=60) as http:
        _wait_load(http, "pending_async", 0, polls=int(40 * REQUEST_TIMEOUT_S))
        accepted = [http.post("/ai/nlp/process", json=async_nlp, headers=headers) for _ in range(MAX_PENDING)]
        assert [r.status_code for r in accepted] == [202] * MAX_PENDING, [r.text for r in accepted]
        load = _load(http)
        assert load["pending_async"] == MAX_PENDING and load["in_flight"] == 0, load
        sync = http.post("/data/process", json={"operation": "analyze", "data": {"records": [{"a": 2}]}})
        assert sync.status_code == 200, sync.text
        over = http.post("/ai/nlp/process", json=async_nlp, headers=headers)
        assert over.status_code == 429 and over.headers["retry-after"] == "1", over.text
        assert "asynchronous requests pending" in over.json()["error"]["message"]
        claims = _claims(redis, pipeline.prefix)
        upload = http.post(
            "/ai/vision/analyze/upload",
            content=_multipart(_image(700 * 1024)),
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **headers},
        )
        assert upload.status_code == 429, upload.text
        assert _claims(redis, pipeline.prefix) == claims, "an upload refused at the pending limit parks no claim check"
        # the pending ones end at their deadline (504 kept for GET), and their slots come back
        _wait_load(http, "pending_async", 0, polls=int(40 * REQUEST_TIMEOUT_S))
        assert http.post("/ai/nlp/process", json=async_nlp, headers=headers).status_code == 202
