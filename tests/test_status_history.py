"""The status page's memory (``api.status_history``, ``api.routes.status.HistorySampler``), the trace id a finished
request carries (``api.metrics``) and the trace URL template (``streams.settings``): pure units, no Kafka, no Redis.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from api.metrics import EdgeMetrics, RequestMetrics, ServiceLag, current_trace_id, note_call
from api.routes.status import AgentCounts, HistorySampler, Sample, ServiceSample
from api.status_history import History, LanePoint, Point, SlowRequest, SlowRequests, trace_url
from streams.settings import Settings, check_trace_url_template

BOUNDS = (0.001, 0.01, 0.1, 1.0, math.inf)
TEMPLATE = "http://127.0.0.1:16686/trace/{trace_id}"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


# ---- the history ring ------------------------------------------------------------------------------------------


def test_the_history_keeps_at_most_its_window_of_points_per_service() -> None:
    history = History(interval_s=5.0, window_s=900.0)
    assert history.capacity == 181  # 15 min of 5 s points, both ends included
    for i in range(1000):
        history.add({"data": Point(1000.0 + 5 * i, items_per_s=float(i)), "nlp": Point(1000.0 + 5 * i)})
    data = history.points("data")
    assert len(data) == history.capacity == len(history.points("nlp"))  # bounded, whatever ran before
    assert data[-1].items_per_s == 999.0 and data[0].items_per_s == 999.0 - 180  # the newest, oldest first
    assert data[-1].at - data[0].at <= 900.0


def test_the_history_forgets_points_older_than_its_window_even_when_samples_stalled() -> None:
    history = History(interval_s=5.0, window_s=60.0)
    history.add({"data": Point(0.0, lag=1)})
    history.add({"data": Point(5.0, lag=2)})
    history.add({"data": Point(500.0, lag=3)})  # the sampler was stuck for minutes: old points are gone
    assert [p.lag for p in history.points("data")] == [3]


def test_the_history_json_has_aligned_columns_with_gaps_for_what_is_unknown() -> None:
    history = History(interval_s=5.0, window_s=900.0)
    lanes = {"interactive": LanePoint(2, 0.5), "bulk": LanePoint(40, math.inf)}
    history.add({"data": Point(10.0, items_per_s=None, p95_ms=None, lag=None)})  # first sample: nothing measured
    history.add({"data": Point(15.0, items_per_s=12.345, requests_per_s=3.0, p95_ms=7.5, lag=42, drain_s=3.0,
                               lanes=lanes)})  # fmt: skip
    doc = history.as_json()["data"]
    assert isinstance(doc, dict)
    assert doc["at"] == [10.0, 15.0]
    assert doc["items_per_s"] == [None, 12.35] and doc["p95_ms"] == [None, 7.5] and doc["lag"] == [None, 42]
    assert doc["lanes"] == {
        "bulk": {"lag": [None, 40], "drain_s": [None, None]},  # not draining (inf): a gap, JSON has no infinity
        "interactive": {"lag": [None, 2], "drain_s": [None, 0.5]},
    }
    assert all(len(column) == 2 for key, column in doc.items() if key != "lanes")


def test_a_history_needs_a_sane_interval() -> None:
    with pytest.raises(ValueError):
        History(interval_s=0.0, window_s=900.0)
    with pytest.raises(ValueError):
        History(interval_s=10.0, window_s=5.0)


# ---- sampling math: each point covers the interval since the previous sample ------------------------------------


def _sample(t: float, count: float, items: int, seen_ms: int) -> Sample:
    buckets = tuple(zip(BOUNDS, (0.0, count, count, count, count), strict=True))
    return Sample(t, {"data": ServiceSample(buckets, {"w": AgentCounts(seen_ms, items, items // 4)})})


def test_each_point_is_the_rate_over_the_last_interval_not_since_the_start() -> None:
    sampler = HistorySampler(History(5.0, 900.0))
    lag = {"data": _lag(7, 1.5)}
    first = sampler.observe(_sample(0.0, 0, 0, 0), 1000.0, lag)["data"]
    assert first.items_per_s is None and first.p95_ms is None  # nothing to compare with: unknown, not 0
    assert first.lag == 7 and first.lanes["interactive"] == LanePoint(7, 1.5)  # the lag is known at once
    second = sampler.observe(_sample(5.0, 50, 100, 5_000), 1005.0, lag)["data"]
    assert second.items_per_s == pytest.approx(20.0) and second.requests_per_s == pytest.approx(10.0)
    assert second.p95_ms is not None and 1.0 < second.p95_ms <= 10.0
    # The next interval was idle: its point says 0 items/s, not the average since the first sample (10/s).
    third = sampler.observe(_sample(10.0, 50, 100, 10_000), 1010.0, None)["data"]
    assert third.items_per_s == 0.0 and third.requests_per_s == 0.0 and third.p95_ms is None
    assert third.lag is None and third.lanes == {}  # the lag probe failed: a gap
    assert [p.at for p in sampler.history.points("data")] == [1000.0, 1005.0, 1010.0]


def _lag(records: int, drain_s: float) -> ServiceLag:
    return ServiceLag(float(records), drain_s, {"interactive": ServiceLag(float(records), drain_s)})


# ---- the slowest requests ------------------------------------------------------------------------------------


def _req(ms: float, at: float, rid: str = "r") -> SlowRequest:
    return SlowRequest(ms, at, "data", "/data/process", 200, "analyze", rid)


def test_the_slowest_are_kept_and_the_rest_forgotten() -> None:
    slow = SlowRequests(size=3, window_s=900.0)
    for i, ms in enumerate([5.0, 50.0, 1.0, 500.0, 7.0, 300.0, 2.0]):
        slow.offer(_req(ms, 100.0 + i, f"r{i}"))
    top = slow.top(110.0)
    assert [r.total_ms for r in top] == [500.0, 300.0, 50.0]
    assert [r.request_id for r in top] == ["r3", "r5", "r1"]
    assert len(slow) == 3  # one minute: at most `size` records


def test_the_slowest_of_the_window_survive_across_minutes_and_old_ones_are_forgotten() -> None:
    slow = SlowRequests(size=2, window_s=900.0, bucket_s=60.0)
    slow.offer(_req(9000.0, 0.0, "ancient"))
    slow.offer(_req(100.0, 600.0, "a"))
    slow.offer(_req(10.0, 700.0, "b"))
    slow.offer(_req(200.0, 850.0, "c"))
    assert [r.request_id for r in slow.top(899.0)] == ["ancient", "c"]
    # 15 min after it finished the slowest is forgotten, exactly (it shared no minute with the others).
    assert [r.request_id for r in slow.top(900.5)] == ["c", "a"]
    assert [r.request_id for r in slow.top(1600.0)] == ["c"]  # "a" (t=600) is older than 15 min now
    assert slow.top(2000.0) == []


def test_the_slowest_list_is_bounded_whatever_the_traffic() -> None:
    slow = SlowRequests(size=20, window_s=900.0, bucket_s=60.0)
    for i in range(100_000):  # 100k requests over 2.7 hours of clock
        slow.offer(_req(float(i % 977), i * 0.1))
    assert len(slow) <= 20 * slow.max_buckets == 20 * 16
    assert len(slow.top(10_000.0)) == 20
    slow.offer(_req(1e9, 5.0))  # a clock gone back past the window: ignored
    assert all(r.total_ms < 1e9 for r in slow.top(10_000.0))


def test_a_slow_record_holds_no_payload_and_links_its_trace() -> None:
    record = SlowRequest(1234.56, 1.5, "nlp", "/ai/nlp/process", 504, "embed", "rid-1", TRACE)
    doc = record.as_json(TEMPLATE)
    assert set(doc) == {"request_id", "service", "task", "route", "status", "total_ms", "at", "trace_id", "trace_url"}
    assert doc["total_ms"] == 1234.6 and doc["status"] == 504
    assert doc["trace_url"] == f"http://127.0.0.1:16686/trace/{TRACE}"
    assert record.as_json(None)["trace_url"] is None  # no template: the id, no link
    assert trace_url(TEMPLATE, None) is None
    assert trace_url(TEMPLATE, '"><script>') is None  # only a W3C trace id goes into a URL


# ---- the trace URL template --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "javascript:alert(1)//{trace_id}",
        "ftp://host/{trace_id}",
        "/trace/{trace_id}",
        "http://127.0.0.1:16686/trace/",
        "http://127.0.0.1:16686/trace/{trace_id}/{span_id}",
        "http://127.0.0.1:16686/trace/{trace_id} x",
        "http:///{trace_id}",
    ],
)
def test_a_bad_trace_url_template_is_refused(template: str) -> None:
    with pytest.raises(ValueError):
        check_trace_url_template(template)
    with pytest.raises(ValidationError):
        Settings(trace_url_template=template)


def test_a_good_trace_url_template_is_kept() -> None:
    assert Settings(trace_url_template=TEMPLATE).trace_url_template == TEMPLATE
    https = "https://grafana.example/explore?traceId={trace_id}&x=1"
    assert check_trace_url_template(https) == https
    assert Settings().trace_url_template is None
    assert Settings(trace_url_template="  ").trace_url_template is None


# ---- the trace id of a finished request (OpenTelemetry's current span, an SDK provider in this test only) --------


def test_without_tracing_there_is_no_trace_id() -> None:
    assert current_trace_id() is None  # the API's no-op span is never valid


async def test_the_middleware_records_the_trace_id_and_request_id_of_a_slow_request() -> None:
    tracer = TracerProvider().get_tracer("test")  # not installed globally: only this test's spans
    seen: dict[str, str | None] = {}

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        with tracer.start_as_current_span("edge call") as span:
            seen[scope["path"]] = format(span.get_span_context().trace_id, "032x")
            note_call("data", "analyze", "req-42")
            await asyncio.sleep(0.05)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    metrics = EdgeMetrics(slow_requests=5)
    app = RequestMetrics(route, metrics)
    sent: list[object] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b'{"secret": "payload"}'}

    async def send(message: object) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/data/process", "headers": [(b"x-api-key", b"k")], "method": "POST"}
    await app(scope, receive, send)  # type: ignore[arg-type]
    await app({**scope, "path": "/health"}, receive, send)  # type: ignore[arg-type]  (not a service path)
    (record,) = metrics.slow.top(time.time())
    assert record.trace_id == seen["/data/process"] and record.request_id == "req-42"
    assert (record.service, record.task, record.route, record.status) == ("data", "analyze", "/data/process", 200)
    assert record.total_ms >= 40.0
    assert "payload" not in repr(record) and "x-api-key" not in repr(record)
