"""Metrics: the edge's ``GET /metrics`` and each agent's own metrics port.

Units (no Kafka): the request counter middleware on a small app, the lag gauges from a ``LagReport``, the
``/metrics`` key rule, and the agent observer through ``BatchProcessor`` with an in-memory sink.
Integration: a real edge and data agent (``Pipeline.isolated``) against the real Kafka and Redis: requests
(first runs, cache hits, one invalid), then both scrapes parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, SecretStr

from agents.metrics import AgentMetrics
from aisemble.pipeline import Pipeline
from api.app import create_app
from api.metrics import EdgeLoad, EdgeMetrics, RequestMetrics, note_call
from api.routes.metrics import lag_by_service
from schemas import ErrorCode
from streams.lag import GroupLag, LagReport, Totals
from streams.settings import Settings
from tests.test_agent_loop import EchoRunner, ListSink, processor, record

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by (sample name, labels), through prometheus-client's parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# --- units ---------------------------------------------------------------------------------------------


class Body(BaseModel):
    x: int


def small_app(metrics: EdgeMetrics) -> FastAPI:
    app = FastAPI()
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.post("/data/process")
    async def process(body: Body) -> dict[str, int]:
        note_call("data", "analyze")  # what Edge.call does
        if body.x < 0:
            raise RuntimeError("boom")
        return {"x": body.x}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def test_requests_are_counted_by_service_task_and_status_with_latency() -> None:
    metrics = EdgeMetrics()
    with TestClient(small_app(metrics), raise_server_exceptions=False) as client:
        for i in range(3):
            assert client.post("/data/process", json={"x": i}).status_code == 200
        assert client.post("/data/process", json={"y": 1}).status_code == 422  # refused before the call
        assert client.post("/data/process", json={"x": -1}).status_code == 500
        assert client.get("/health").status_code == 200  # not a service path: not counted
    metrics.cache_lookup("data", hit=True)
    metrics.cache_lookup("data", hit=False)
    metrics.cache_lookup("data", hit=False)
    load = EdgeLoad(in_flight=2, max_in_flight=10, peak=3, rejected=1, waiting=2, replies_dropped=4, replies_foreign=5)
    samples = parse(metrics.scrape(load).decode())
    assert value(samples, "aisemble_edge_requests_total", service="data", task="analyze", status="200") == 3
    assert value(samples, "aisemble_edge_requests_total", service="data", task="", status="422") == 1
    assert value(samples, "aisemble_edge_requests_total", service="data", task="analyze", status="500") == 1
    assert value(samples, "aisemble_edge_request_seconds_count", service="data") == 5
    assert value(samples, "aisemble_edge_request_seconds_bucket", service="data", le="+Inf") == 5
    assert value(samples, "aisemble_edge_request_seconds_count", service="nlp") == 0
    assert value(samples, "aisemble_edge_cache_hits_total", service="data") == 1
    assert value(samples, "aisemble_edge_cache_misses_total", service="data") == 2
    assert value(samples, "aisemble_edge_in_flight") == 2
    assert value(samples, "aisemble_edge_max_in_flight") == 10
    assert value(samples, "aisemble_edge_rejected_total") == 1
    assert value(samples, "aisemble_edge_replies_dropped_total") == 4
    assert not any(name == "aisemble_edge_consumer_lag" for name, _ in samples)  # no lag read yet


def test_two_apps_have_their_own_registries() -> None:
    first, second = EdgeMetrics(), EdgeMetrics()
    first.observe_request("data", "analyze", 200, 0.01)
    assert value(parse(second.scrape(None).decode()), "aisemble_edge_requests_total",
                 service="data", task="analyze", status="200") is None  # fmt: skip


def report(lag: int, drain_s: float | None, interval_s: float | None) -> LagReport:
    group = GroupLag("t-data-agents", "data", "Stable", 1, (), {}, Totals(lag, None, drain_s))
    other = GroupLag("t-adhoc", None, "Empty", 0, (), {}, Totals(7, None, None))
    return LagReport(wall_time=time.time(), interval_s=interval_s, groups=(group, other))


def test_lag_gauges_from_the_lag_report() -> None:
    assert lag_by_service(report(5, None, None))["data"].drain_s is None  # first sample: no rate yet
    not_draining = lag_by_service(report(5, None, 1.0))
    assert not_draining["data"].records == 5 and not_draining["data"].drain_s == math.inf
    assert set(not_draining) == {"data"}  # groups without a service are not a service's lag
    metrics = EdgeMetrics()
    samples = parse(metrics.scrape(None, lag_by_service(report(12, 3.0, 1.0))).decode())
    assert value(samples, "aisemble_edge_consumer_lag", service="data") == 12
    assert value(samples, "aisemble_edge_drain_seconds", service="data") == 3.0
    samples = parse(metrics.scrape(None).decode())  # a scrape without a new lag read keeps the last one
    assert value(samples, "aisemble_edge_consumer_lag", service="data") == 12


def test_metrics_route_needs_a_key_unless_told_otherwise() -> None:
    keyed = Settings(api_keys=[SecretStr("k" * 24)])
    # no lifespan (no Kafka): the key gate answers before any route; without the rule the route is reached
    client = TestClient(create_app(keyed), raise_server_exceptions=False)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"X-API-Key": "k" * 24}).status_code == 500  # no edge started
    open_metrics = keyed.model_copy(update={"metrics_require_key": False})
    client = TestClient(create_app(open_metrics), raise_server_exceptions=False)
    assert client.get("/metrics").status_code == 500


def test_agent_observer_counts_batches_items_errors_and_dead_letters() -> None:
    import asyncio

    observer = AgentMetrics("data")
    runner, sink = EchoRunner(), ListSink()
    records = [
        record(b"\x00garbage", 0),
        record({"id": "ok1", "task": "echo", "input": {"x": 1}}, 1),
        record({"id": "ok2", "task": "echo", "input": {"x": 2}}, 2),
        record({"id": "bad", "task": "echo", "input": {"fail": 1}}, 3),
        record({"id": "late", "task": "echo", "input": {"x": 1}, "deadline_ms": 1}, 4),
    ]
    asyncio.run(processor(runner, sink, observer=observer).process(records))
    asyncio.run(processor(runner, ListSink(flaky={"p.data.results": 1}), observer=observer, retry_s=5)
                .process([record({"id": "again", "task": "echo", "input": {"x": 3}}, 5)]))  # fmt: skip
    from prometheus_client import generate_latest

    samples = parse(generate_latest(observer.registry).decode())
    assert value(samples, "aisemble_agent_batch_size_count", service="data") == 2
    assert value(samples, "aisemble_agent_batch_size_sum", service="data") == 6
    assert value(samples, "aisemble_agent_items_total", service="data") == 6
    assert value(samples, "aisemble_agent_batch_wait_seconds_count", service="data") == 6
    assert value(samples, "aisemble_agent_inference_seconds_count", service="data") == 2  # one runner call each
    assert value(samples, "aisemble_agent_replies_total", service="data") == 5
    assert value(samples, "aisemble_agent_errors_total", service="data", code=ErrorCode.INVALID_INPUT) == 1
    assert value(samples, "aisemble_agent_errors_total", service="data", code=ErrorCode.DEADLINE_EXCEEDED) == 1
    assert value(samples, "aisemble_agent_dead_letters_total", service="data", reason=ErrorCode.INVALID_JSON) == 1
    assert value(samples, "aisemble_agent_delivery_retries_total", service="data") == 1
    assert value(samples, "aisemble_agent_cache_hits_total", service="data") == 0


# --- against the real Kafka and Redis --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    logs = Path(tmp_path_factory.mktemp("logs"))
    p = Pipeline.isolated(
        infra_settings, ["data"], logs, AISEMBLE_AGENT_METRICS_PORT="0", AISEMBLE_METRICS_REQUIRE_KEY="false"
    ).start()
    yield p
    p.stop()


def analyze(tag: str) -> dict[str, object]:
    return {"operation": "analyze", "data": {"records": [{"id": i, "value": i * 10, "tag": tag} for i in range(20)]}}


def edge_knows_the_model(http: httpx.Client) -> None:
    """Wait (bounded) until the edge answers a repeated request from its own cache: it has read the agent's
    model name from the heartbeats, so from now on every cacheable request is an edge cache lookup."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        payload = analyze(f"warm-{uuid.uuid4().hex}")
        http.post("/data/process", json=payload).raise_for_status()
        again = http.post("/data/process", json=payload).json()
        if again["cached"] and "queue_ms" not in again["timings_ms"]:
            return
        time.sleep(0.5)
    raise AssertionError("the edge never answered from its cache")


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return (value(after, name, **labels) or 0.0) - (value(before, name, **labels) or 0.0)


@pytest.mark.integration
def test_edge_and_agent_metrics_after_real_requests(pipeline: Pipeline) -> None:
    agent_url = f"http://127.0.0.1:{pipeline.metrics_ports['data']}/metrics"
    run = uuid.uuid4().hex
    payloads = [analyze(f"{run}-{n}") for n in range(5)]
    with httpx.Client(base_url=pipeline.url, timeout=30) as http:
        edge_knows_the_model(http)
        edge_before, agent_before = parse(http.get("/metrics").text), parse(httpx.get(agent_url, timeout=10).text)
        replies = []
        for _ in range(2):  # the second round is answered from the edge's cache
            for payload in payloads:
                response = http.post("/data/process", json=payload)
                assert response.status_code == 200, response.text
                replies.append(response.json())
        assert http.post("/data/process", json={"operation": "analyze"}).status_code == 422
        scrape = http.get("/metrics")
        assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
        edge = parse(scrape.text)
        agent = parse(httpx.get(agent_url, timeout=10).text)
        # the agents' group lag, read at scrape time: wait (bounded) until its commits have caught up
        lag_seen: list[tuple[float | None, float | None]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lagged = parse(http.get("/metrics").text)
            lag_seen.append((value(lagged, "aisemble_edge_consumer_lag", service="data"),
                             value(lagged, "aisemble_edge_drain_seconds", service="data")))  # fmt: skip
            if lag_seen[-1] == (0.0, 0.0):
                break
            time.sleep(0.5)
    cached = [r["cached"] for r in replies]
    figures = {
        "cached": cached,
        "lag_scrapes": lag_seen[:3] + lag_seen[-1:],
        "lag_scrape_count": len(lag_seen),
        "agent_items": delta(agent, agent_before, "aisemble_agent_items_total", service="data"),
        "agent_batches": delta(agent, agent_before, "aisemble_agent_batch_size_count", service="data"),
        "agent_inference_s": delta(agent, agent_before, "aisemble_agent_inference_seconds_sum", service="data"),
        "edge_latency_s": delta(edge, edge_before, "aisemble_edge_request_seconds_sum", service="data"),
    }
    print("METRICS:", json.dumps(figures))

    assert cached == [False] * 5 + [True] * 5
    assert delta(edge, edge_before, "aisemble_edge_requests_total", service="data", task="analyze", status="200") == 10
    assert delta(edge, edge_before, "aisemble_edge_requests_total", service="data", task="", status="422") == 1
    assert delta(edge, edge_before, "aisemble_edge_request_seconds_count", service="data") == 11
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in edge.items()
        if name == "aisemble_edge_request_seconds_bucket" and dict(labels)["service"] == "data"
    )
    total = value(edge, "aisemble_edge_request_seconds_count", service="data")
    assert buckets[-1] == (math.inf, total) and all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    assert value(edge, "aisemble_edge_in_flight") == 0
    assert value(edge, "aisemble_edge_max_in_flight") == pipeline.settings.max_in_flight
    assert delta(edge, edge_before, "aisemble_edge_cache_hits_total", service="data") == 5
    assert delta(edge, edge_before, "aisemble_edge_cache_misses_total", service="data") == 5
    assert lag_seen[0][0] is not None, "no consumer lag sample for the data service"
    assert lag_seen[-1] == (0.0, 0.0)

    assert delta(agent, agent_before, "aisemble_agent_items_total", service="data") == 5
    assert delta(agent, agent_before, "aisemble_agent_batch_size_sum", service="data") == 5
    assert delta(agent, agent_before, "aisemble_agent_batch_size_count", service="data") >= 1
    assert delta(agent, agent_before, "aisemble_agent_batch_wait_seconds_count", service="data") == 5
    assert delta(agent, agent_before, "aisemble_agent_inference_seconds_count", service="data") >= 1
    assert delta(agent, agent_before, "aisemble_agent_replies_total", service="data") == 5
    assert not any(name == "aisemble_agent_errors_total" for name, _ in agent)


def test_the_openai_routes_count_as_their_services() -> None:
    from api.metrics import service_of_path

    assert service_of_path("/v1/chat/completions") == "llm"
    assert service_of_path("/v1/completions") == "llm"
    assert service_of_path("/v1/embeddings") == "nlp"
    assert service_of_path("/v1/models") == ""  # a listing, not a request to a service
    assert service_of_path("/ai/nlp/process") == "nlp" and service_of_path("/data/process") == "data"
