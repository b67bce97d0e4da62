"""``GET /status.json`` and the status page's files: the window arithmetic (pure units), the access rule (the
page is open, its data needs a key like ``/metrics``), the packaging of ``api/static``, and one real pipeline
(data agent, real Kafka and Redis) whose figures appear after traffic."""

from __future__ import annotations

import asyncio
import json
import math
import time
import tomllib
import uuid
from importlib import resources
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from aisemble.pipeline import Pipeline
from api.app import create_app
from api.routes.status import (
    CSP,
    PAGE_FILES,
    AgentCounts,
    Sample,
    ServiceSample,
    StatusWindow,
    agent_figures,
    bucket_delta,
    histogram_quantile,
)
from streams.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
KEY = "status-key-0123456789abcdef"
INF = math.inf
BOUNDS = (0.001, 0.01, 0.1, 1.0, INF)


def _buckets(*counts: float) -> tuple[tuple[float, float], ...]:
    return tuple(zip(BOUNDS, counts, strict=True))


# ---- pure units ------------------------------------------------------------------------------------------------


def test_the_quantile_interpolates_inside_its_bucket() -> None:
    assert histogram_quantile(0.95, _buckets(0, 0, 0, 0, 0)) is None
    assert histogram_quantile(0.95, ()) is None
    # 100 observations, all between 10 and 100 ms: p95 is 95% of the way through that bucket.
    assert histogram_quantile(0.95, _buckets(0, 0, 100, 100, 100)) == pytest.approx(0.01 + 0.09 * 0.95)
    # 90 fast (<= 1 ms), 10 between 0.1 and 1 s: rank 95 is half-way through the last finite bucket.
    assert histogram_quantile(0.95, _buckets(90, 90, 90, 100, 100)) == pytest.approx(0.1 + 0.9 * 0.5)
    # Beyond the last finite bound: the highest finite bound, never infinity.
    assert histogram_quantile(0.95, _buckets(0, 0, 0, 1, 100)) == 1.0
    # The first bucket starts at 0.
    assert histogram_quantile(0.5, _buckets(10, 10, 10, 10, 10)) == pytest.approx(0.0005)


def test_bucket_delta_keeps_only_the_new_observations() -> None:
    before, now = _buckets(5, 10, 10, 10, 10), _buckets(5, 12, 20, 20, 20)
    assert bucket_delta(now, before) == _buckets(0, 2, 10, 10, 10)
    assert bucket_delta(now, ()) == now  # nothing before: everything is new


def test_agent_figures_pair_each_agent_with_its_oldest_beat_in_the_window() -> None:
    old = {"a": AgentCounts(seen_ms=0, items=100, batches=10), "gone": AgentCounts(0, 5, 5)}
    mid = {"a": AgentCounts(1_000, 150, 15), "b": AgentCounts(1_000, 0, 0)}
    now = {"a": AgentCounts(2_000, 300, 20), "b": AgentCounts(3_000, 40, 4), "new": AgentCounts(3_000, 9, 1)}
    rate, mean = agent_figures(now, [old, mid])
    # a: 200 items in 2 s; b: 40 items in 2 s; "new" has no earlier beat, "gone" no current one.
    assert rate == pytest.approx(100.0 + 20.0)
    assert mean == pytest.approx((200 + 40) / (10 + 4))
    assert agent_figures(now, []) == (None, None)  # nobody seen twice: unknown, not zero
    idle = {"a": AgentCounts(5_000, 300, 20)}
    assert agent_figures(idle, [now]) == (0.0, None)  # seen twice, nothing done: 0 items/s, no batch size
    backwards = {"a": AgentCounts(5_000, 1, 1)}
    assert agent_figures(backwards, [now]) == (None, None)  # counters went back: not a rate


def _sample(t: float, count: float, items: int, seen_ms: int) -> Sample:
    service = ServiceSample(_buckets(0, count, count, count, count), {"w": AgentCounts(seen_ms, items, items // 2)})
    return Sample(t, {"data": service})


def test_the_window_compares_with_its_oldest_sample_and_forgets_old_ones() -> None:
    window = StatusWindow(window_s=60.0, min_gap_s=1.0)
    figures, length = window.observe(_sample(0.0, 0, 0, 0))
    assert figures == {} and length is None  # the first call has nothing to compare with
    window.observe(_sample(0.5, 10, 10, 500))  # too close to the last kept sample: not kept
    assert len(window.samples) == 1
    figures, length = window.observe(_sample(10.0, 100, 200, 10_000))
    assert length == 10.0
    data = figures["data"]
    assert data.requests_per_s == pytest.approx(10.0)
    assert data.items_per_s == pytest.approx(20.0)
    assert data.batch_mean == pytest.approx(2.0)
    assert data.p95_ms is not None and 1.0 < data.p95_ms <= 10.0
    # 65 s later the first sample is past the window: the figures are over the last 55 s only.
    figures, length = window.observe(_sample(65.0, 100, 200, 65_000))
    assert length == 55.0
    assert figures["data"].requests_per_s == 0.0 and figures["data"].items_per_s == 0.0
    assert figures["data"].p95_ms is None and figures["data"].batch_mean is None  # nothing happened: unknown
    # Unknown agents (Redis away) give no agent figures but keep the edge's.
    blind = Sample(66.0, {"data": ServiceSample(_buckets(0, 101, 101, 101, 101), None)})
    figures, _ = window.observe(blind)
    assert figures["data"].items_per_s is None and figures["data"].requests_per_s is not None


# ---- access and packaging (the app without its lifespan: nothing here reaches Kafka or Redis) --------------


def test_the_page_is_open_and_its_data_needs_a_key_like_metrics() -> None:
    keyed = Settings(api_keys=[SecretStr(KEY)])
    client = TestClient(create_app(keyed), raise_server_exceptions=False)  # no `with`: no lifespan
    for path, (_, media) in PAGE_FILES.items():
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == media
        assert response.headers["content-security-policy"] == CSP
    assert client.get("/status.json").status_code == 401
    assert client.get("/status.json", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/status/history.json").status_code == 401  # the history follows the same rule
    assert client.get("/status/history.json", headers={"X-API-Key": "wrong"}).status_code == 401
    history = client.get("/status/history.json", headers={"X-API-Key": KEY})
    assert history.status_code == 200 and history.json()["services"] == {} and history.json()["slow"] == []
    # With the key the gate lets it through (no lifespan here, so the route itself fails: 500, not 401).
    assert client.get("/status.json", headers={"X-API-Key": KEY}).status_code == 500
    opened = TestClient(create_app(keyed.model_copy(update={"metrics_require_key": False})),
                        raise_server_exceptions=False)  # fmt: skip
    assert opened.get("/status.json").status_code == 500  # open, like /metrics
    assert opened.get("/status/history.json").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/status.json" not in paths and "/status/history.json" not in paths  # not part of the JSON API


def test_the_page_loads_nothing_from_elsewhere() -> None:
    static = resources.files("api").joinpath("static")
    html = static.joinpath("index.html").read_text()
    for name in ("index.html", "status.css", "status.js"):
        text = static.joinpath(name).read_text().replace('"http://www.w3.org/2000/svg"', "")  # a name, not a load
        assert "http://" not in text and "https://" not in text, name
        assert 'setAttribute("style"' not in text and "style=" not in text, name  # no inline style (CSP)
        assert "@import" not in text and "innerHTML" not in text, name
    assert '<script src="/static/status.js"' in html and "<script>" not in html  # no inline script (CSP)
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "static/*" in package_data["api"]  # shipped in the wheel


# ---- the real thing ------------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_status_json_of_a_running_pipeline(infra_settings: Settings, tmp_path: Path) -> None:
    pipeline = Pipeline.isolated(infra_settings, ["data"], tmp_path, AISEMBLE_API_KEYS=json.dumps([KEY])).start()
    sent = answered = 0
    try:
        async with httpx.AsyncClient(base_url=pipeline.url, timeout=30, headers={"X-API-Key": KEY}) as http:
            denied = await http.get("/status.json", headers={"X-API-Key": ""})
            assert denied.status_code == 401
            first = (await http.get("/status.json")).json()
            assert first["status"] == "ok" and first["kafka"]["ok"] is True and first["redis"]["ok"] is True
            data = first["services"]["data"]
            assert data["status"] == "ok" and data["agents"] >= 1
            assert first["window_s"] is None and data["items_per_s"] is None  # nothing to compare with yet

            async def one(i: int) -> None:
                nonlocal sent, answered
                sent += 1
                body = {"operation": "analyze", "data": {"records": [{"v": i, "tag": uuid.uuid4().hex}]}}
                response = await http.post("/data/process", json=body)
                answered += response.status_code == 200

            sem = asyncio.Semaphore(16)

            async def bounded(i: int) -> None:
                async with sem:
                    await one(i)

            await asyncio.gather(*(bounded(i) for i in range(200)))
            # The agents' counters reach the edge with their next heartbeat (1 s here): poll, bounded.
            deadline = time.monotonic() + 30
            while True:
                doc = (await http.get("/status.json")).json()
                data = doc["services"]["data"]
                if data["items_total"] >= 200 and data["items_per_s"] and data["lag"] == 0:
                    break
                assert time.monotonic() < deadline, f"the agents' figures never arrived: {data}"
                await asyncio.sleep(0.5)
        assert "NaN" not in json.dumps(doc) and "Infinity" not in json.dumps(doc)
        assert data["requests_per_s"] > 0 and data["p95_ms"] > 0 and data["batch_mean"] >= 1.0
        assert data["draining"] is True
        print("STATUS-JSON: " + json.dumps({"sent": sent, "answered": answered, "window_s": doc["window_s"], **data}))
        assert answered == sent
    finally:
        pipeline.stop()


@pytest.mark.integration
async def test_the_history_and_the_slowest_requests_of_a_running_pipeline(
    infra_settings: Settings, tmp_path: Path
) -> None:
    """The edge samples every second here: after traffic the history has points for the data service with items/s
    above 0, and the slowest list starts with the deliberately slow request (a data agent that sleeps on a marked
    record), without its payload."""
    pipeline = Pipeline.isolated(infra_settings, ["data"], tmp_path, AISEMBLE_STATUS_HISTORY_INTERVAL_S="1")
    pipeline.add_agent("data", "--runner", "tests.fault_runners:delayed_data")
    pipeline.spawn_edge()
    pipeline.wait_healthy(120)
    slow_id = f"slow-{uuid.uuid4().hex[:12]}"
    try:
        async with httpx.AsyncClient(base_url=pipeline.url, timeout=30) as http:
            sem = asyncio.Semaphore(8)

            async def one(i: int) -> int:
                async with sem:
                    body = {"operation": "analyze", "data": {"records": [{"v": i, "secret": "payload-" + str(i)}]}}
                    return (await http.post("/data/process", json=body)).status_code

            statuses = await asyncio.gather(*(one(i) for i in range(150)))
            slow = await http.post(  # alone: nothing else waits behind its batch, so it is the slowest
                "/data/process",
                json={"operation": "analyze", "data": {"records": [{"v": -1, "delay_ms": 1200, "secret": "x"}]}},
                headers={"X-Request-Id": slow_id},
            )
            assert slow.status_code == 200 and all(s == 200 for s in statuses)
            deadline = time.monotonic() + 30
            while True:  # the agents' counters arrive with their heartbeats (1 s): poll, bounded
                doc = (await http.get("/status/history.json")).json()
                data = doc["services"].get("data") or {}
                if any((v or 0) > 0 for v in data.get("items_per_s", [])):
                    break
                assert time.monotonic() < deadline, f"no items/s in the history: {doc}"
                await asyncio.sleep(0.5)
        assert list(doc["services"]) == ["data"] and doc["interval_s"] == 1.0 and doc["window_s"] == 900.0
        columns = {k: len(v) for k, v in data.items() if k != "lanes"}
        assert len(set(columns.values())) == 1 and columns["at"] >= 2, columns  # aligned columns, several points
        assert sorted(data["lanes"]) == ["bulk", "interactive"]
        assert any((v or 0) > 0 for v in data["p95_ms"]) and all(v is None or v >= 0 for v in data["lag"])
        top = doc["slow"][0]
        assert top["request_id"] == slow_id and top["total_ms"] >= 1200, doc["slow"][:3]
        assert (top["service"], top["task"], top["route"], top["status"]) == ("data", "analyze", "/data/process", 200)
        assert top["trace_id"] is None and top["trace_url"] is None  # tracing off in this edge: no id, no link
        assert len(doc["slow"]) == 20  # the setting's default, out of 151 requests
        assert [r["total_ms"] for r in doc["slow"]] == sorted((r["total_ms"] for r in doc["slow"]), reverse=True)
        assert "secret" not in json.dumps(doc) and "payload" not in json.dumps(doc)
        print("STATUS-HISTORY-JSON: " + json.dumps({"points": columns["at"], "slowest_ms": top["total_ms"]}))
    finally:
        pipeline.stop()
