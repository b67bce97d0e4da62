"""Fault: Redis hangs (SIGSTOP) or dies under a running pipeline; requests are still served without the cache.

A private Redis on a free port (``infra.start_redis``) backs an isolated pipeline (data + vision agents).
Phases, each bounded in count and time:

1. up: N requests, median latency (baseline); a vision upload above ``inline_max_bytes`` goes by claim
   check; every key in Redis has a TTL.
2. hanging (SIGSTOP): N requests all answered 200 without the cache; median latency once the breaker is
   open; /health says 200 "degraded" with Redis not ok and agents "unknown".
3. SIGCONT: the same request repeated until it is answered ``cached: true`` (time measured).
4. killed (refusing): N requests, all 200; a small vision upload above ``inline_max_bytes`` is sent inline
   (200), one too large for an event is answered 503 ``unavailable``.
5. restarted on the same port: the cache resumes (time measured); every key has a TTL.

Figures are printed (``FAULT-COUNTS:``). Asserted: every request of every phase answered 200 (``lost`` counts
any other answer and no answer), none claimed cached while Redis is away, and the breaker's promise: while
Redis hangs, the median request is answered in under half of ``redis_timeout_s`` and at most a third of
them pay that timeout (without the breaker, every one does).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import redis as redis_sync

import infra
from aisemble.pipeline import Pipeline, free_port
from schemas import ErrorCode
from streams.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.fault]

N = 50
RESET_S = 2.0
INLINE_MAX = 2048
RESUME_BOUND_S = 30.0


class Counts:
    """Every request sent, by outcome: ``answered`` counts 200s only, so ``lost`` (sent - answered) is a 5xx, a
    4xx or no answer at all (``no_answer``), whatever the phase."""

    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.no_answer = 0
        self.cached_while_down = 0
        self.by_status: dict[str, int] = {}

    def record(self, response: httpx.Response, down: bool) -> None:
        key = str(response.status_code)
        self.by_status[key] = self.by_status.get(key, 0) + 1
        if response.status_code == 200:
            self.answered += 1
            if down and response.json().get("cached"):
                self.cached_while_down += 1

    def post(self, http: httpx.Client, payload: dict[str, object], down: bool) -> httpx.Response | None:
        self.sent += 1
        try:
            response = http.post("/data/process", json=payload)
        except httpx.HTTPError:
            self.no_answer += 1
            return None
        self.record(response, down)
        return response


def _payload() -> dict[str, object]:
    tag = uuid.uuid4().hex
    return {"operation": "analyze", "data": {"records": [{"id": 1, "value": 10}, {"id": 2, "tag": tag}]}}


def _burst(http: httpx.Client, counts: Counts, n: int, down: bool) -> list[float]:
    """``n`` sequential distinct requests, all sent whatever each answers (counted); their latencies in ms."""
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        counts.post(http, _payload(), down)
        latencies.append((time.perf_counter() - t0) * 1000.0)
    return latencies


def _until_cached(http: httpx.Client, counts: Counts) -> float:
    """Repeat one request until it is answered from the cache; seconds it took (bounded)."""
    payload = _payload()
    t0 = time.monotonic()
    while time.monotonic() - t0 < RESUME_BOUND_S:
        response = counts.post(http, payload, down=False)
        assert response is not None and response.status_code == 200, response.text if response else "no answer"
        if response.json()["cached"]:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"the cache did not resume within {RESUME_BOUND_S} s")


def _keys_without_ttl(url: str, prefix: str) -> tuple[int, list[str]]:
    client = redis_sync.Redis.from_url(url)
    try:
        keys = [k.decode() for k in client.scan_iter(match=f"{prefix}:*", count=500)]
        return len(keys), [k for k in keys if client.pttl(k) < 0]
    finally:
        client.close()


def _claims_left(url: str, prefix: str, bound_s: float = 5.0) -> int:
    """Claim keys still in Redis, polled briefly: the agent deletes them just after the broker's ack."""
    client = redis_sync.Redis.from_url(url)
    try:
        t0 = time.monotonic()
        while True:
            left = sum(1 for _ in client.scan_iter(match=f"{prefix}:claim:*", count=500))
            if left == 0 or time.monotonic() - t0 > bound_s:
                return left
            time.sleep(0.1)
    finally:
        client.close()


def _png(side: int) -> bytes:
    rng = np.random.default_rng(side)
    ok, buf = cv2.imencode(".png", rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    assert ok
    return bytes(buf)


def _upload(http: httpx.Client, image: bytes) -> httpx.Response:
    return http.post(
        "/ai/vision/analyze/upload", data={"task": "describe"}, files={"file": ("x.png", image, "image/png")}
    )


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[infra.RedisHandle]:
    handle = infra.start_redis(free_port(), tmp_path / "redis")
    yield handle
    with contextlib.suppress(ProcessLookupError):
        os.kill(handle.pid, signal.SIGCONT)  # a stopped server could not act on SIGTERM
    handle.stop()


def test_redis_hanging_or_down_requests_still_served(
    infra_settings: Settings, private_redis: infra.RedisHandle, tmp_path: Path
) -> None:
    handles = [private_redis]
    settings = infra_settings.model_copy(update={"redis_url": private_redis.url})
    pipeline = Pipeline.isolated(
        settings,
        ["data", "vision"],
        tmp_path,
        AISEMBLE_VISION__INLINE_MAX_BYTES=str(INLINE_MAX),
        AISEMBLE_REDIS_BREAKER_RESET_S=str(RESET_S),
        AISEMBLE_REQUEST_TIMEOUT_S="20",
    ).start()
    counts = Counts()
    figures: dict[str, object] = {}
    small, big = _png(40), _png(700)
    assert INLINE_MAX < len(small) < 64 * 1024 and len(big) > settings.max_event_bytes
    try:
        with httpx.Client(base_url=pipeline.url, timeout=60) as http:
            # 1. Redis up: baseline, claim-check path, TTLs.
            _burst(http, counts, 5, down=False)  # warm-up
            up = _burst(http, counts, N, down=False)
            claimed = _upload(http, small)
            assert claimed.status_code == 200, claimed.text
            figures["vision_up_status"] = claimed.status_code
            total, no_ttl = _keys_without_ttl(private_redis.url, pipeline.prefix)
            figures["keys_up"], figures["keys_without_ttl_up"] = total, len(no_ttl)
            assert total > 0 and no_ttl == [], no_ttl
            figures["claims_left_after_reply"] = _claims_left(private_redis.url, pipeline.prefix)
            assert figures["claims_left_after_reply"] == 0  # released once its reply was acknowledged

            # 2. Redis hanging.
            os.kill(private_redis.pid, signal.SIGSTOP)
            hang = _burst(http, counts, N, down=True)
            # The breaker spares requests the Redis timeout: while Redis hangs, a request that waited on it takes
            # at least redis_timeout_s; with the breaker open, most wait on nothing (a half-open trial every
            # RESET_S pays it). Without the breaker every one does.
            timeout_ms = settings.redis_timeout_s * 1000.0
            figures["hanging_paid_timeout"] = sum(1 for x in hang if x >= timeout_ms)
            figures["median_ms_hanging"] = round(statistics.median(hang), 1)
            assert statistics.median(hang) < timeout_ms / 2, figures
            assert figures["hanging_paid_timeout"] <= N // 3, figures
            health = http.get("/health")
            body = health.json()
            figures["health_hanging"] = {
                "code": health.status_code, "status": body["status"], "redis": body["redis"],
                "data": body["services"]["data"]["status"],
            }  # fmt: skip
            assert health.status_code == 200 and body["status"] == "degraded", body
            assert body["redis"]["ok"] is False and body["services"]["data"]["agents"] == "unknown", body

            # 3. Redis continues: the cache resumes.
            os.kill(private_redis.pid, signal.SIGCONT)
            figures["resume_after_sigcont_s"] = round(_until_cached(http, counts), 2)

            # 4. Redis killed: refusing connections.
            port = int(private_redis.url.rsplit(":", 1)[1].split("/")[0])
            os.kill(private_redis.pid, signal.SIGKILL)
            private_redis.stop()  # reaps it, removes the pid file
            refused = _burst(http, counts, N, down=True)
            health = http.get("/health")
            body = health.json()
            figures["health_refused"] = {"code": health.status_code, "status": body["status"]}
            assert health.status_code == 200 and body["status"] == "degraded" and not body["redis"]["ok"], body
            inline = _upload(http, small)
            figures["vision_small_down"] = inline.status_code
            assert inline.status_code == 200 and inline.json()["ok"], inline.text
            too_big = _upload(http, big)
            figures["vision_big_down"] = too_big.status_code
            assert too_big.status_code == 503, too_big.text
            error = too_big.json()["error"]
            assert error["code"] == ErrorCode.UNAVAILABLE and "Redis" in error["message"], error
            assert "claim check" in error["message"], error

            # 5. Redis restarted on the same port: the cache resumes.
            restarted = infra.start_redis(port, tmp_path / "redis")
            handles.append(restarted)
            figures["resume_after_restart_s"] = round(_until_cached(http, counts), 2)
            health = http.get("/health")
            figures["health_after"] = {"code": health.status_code, "status": health.json()["status"]}
            assert health.status_code == 200, health.text  # an empty registry right after a restart is not "down"
            total, no_ttl = _keys_without_ttl(restarted.url, pipeline.prefix)
            figures["keys_after"], figures["keys_without_ttl_after"] = total, len(no_ttl)
            assert no_ttl == [], no_ttl
    finally:
        pipeline.stop()
        for handle in handles[1:]:
            handle.stop()
    lost = counts.sent - counts.answered
    figures.update(
        sent=counts.sent,
        answered=counts.answered,
        lost=lost,
        by_status=counts.by_status,
        cached_while_down=counts.cached_while_down,
        median_ms_up=round(statistics.median(up), 1),
        max_ms_hanging=round(max(hang), 1),
        first5_ms_hanging=[round(x) for x in hang[:5]],
        no_answer=counts.no_answer,
        median_ms_refused=round(statistics.median(refused), 1),
        max_ms_refused=round(max(refused), 1),
    )
    print("FAULT-COUNTS: " + json.dumps(figures))
    assert lost == 0 and counts.no_answer == 0, figures  # every request, in every phase, was answered 200
    assert counts.cached_while_down == 0, figures  # no cache while Redis is away: nothing claimed cached
