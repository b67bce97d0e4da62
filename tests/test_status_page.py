"""The status page at ``GET /`` in a real headless Chromium (selenium), against real Kafka and Redis.

* A keyed pipeline (data agent, ``AISEMBLE_API_KEYS``): the page asks for the key (its data follows the
  ``/metrics`` rule), keeps it in ``sessionStorage``, then shows the running pipeline (one live agent, Kafka and
  Redis ok, no banner); before any traffic it shows no throughput, p95 latency or mean batch (a dash, nothing
  invented); after 300 requests each is a real figure, for the same one healthy agent.
* A Redis outage: the edge and agent use this test's own Redis (``infra.start_redis`` on a free port), stopped
  by PID: the banner says Redis is down while requests are still answered (counted: ``FAULT-COUNTS:``).
* A Kafka outage (``fault``: a broker of its own, ``infra.start_kafka`` on a free port pair, stopped by PID): the
  banner says Kafka is down, and requests are refused at once with 503 (counted: all 503, none lost, none hangs;
  the slowest under ``REFUSED_BOUND_S``).

* The history and the slowest requests (an edge in this process, wrapped so that each HTTP request runs in a
  span of a real OpenTelemetry SDK tracer, as the edge's tracing makes it; ``AISEMBLE_TRACE_URL_TEMPLATE`` set;
  a data agent that sleeps on a marked record): before traffic the p95 chart is an empty state; under a light
  bounded load the charts draw points, the slowest list shows the deliberately slow request first, its trace id
  a link built from the template (rel noopener), and the browser logged no CSP violation (a deliberate one,
  made afterwards, is seen: the check can fail). Its screenshot under load is the README's.

A screenshot of each state is saved under the test's tmp_path (``SCREENSHOT: <path>`` lines with ``pytest -s``).
Every wait is bounded (``WebDriverWait``); the browser is always quit and every process stopped by PID.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from starlette.types import ASGIApp, Receive, Scope, Send

import infra
from aisemble.pipeline import Pipeline, free_port
from api.app import create_app
from infra.browser import Browser, find_browser
from infra.process import port_free
from streams.settings import Settings

pytestmark = pytest.mark.integration

KEY = "page-key-0123456789abcdef"
WAIT_S = 30.0  # every wait on the page is bounded by this
TRAFFIC = 300
REFUSED_BOUND_S = 0.5  # a 503 while the edge knows Kafka is down: measured 0.03 s; waiting produce_timeout_s is 1 s
CONCURRENCY = 16
DASH = "—"
BAD_WORDS = re.compile(r"\b(NaN|undefined|null|Infinity)\b")


@pytest.fixture(scope="session")
def chromium() -> Browser:
    """Chromium and chromedriver, installed when missing (root on Debian), as Redis is (``infra.browser``)."""
    return find_browser()


@pytest.fixture
def browser(chromium: Browser) -> Iterator[WebDriver]:
    options = Options()
    options.binary_location = chromium.binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromium.driver), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def _state(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).get_attribute("data-state"))


def _wait(driver: WebDriver, what: str, condition: Callable[[WebDriver], object]) -> None:
    """Wait (bounded) until ``condition`` holds; the failure names ``what`` and shows the page's text."""
    try:
        # The page redraws its charts every interval: an element found just before a redraw goes stale; the
        # next poll finds the new one.
        WebDriverWait(driver, WAIT_S, poll_frequency=0.25, ignored_exceptions=[StaleElementReferenceException]).until(
            condition
        )
    except Exception as exc:  # re-raised with the page's text: a failure must say what it saw
        body = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"{what} not seen within {WAIT_S} s; the page says:\n{body}") from exc


def _screenshot(driver: WebDriver, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"status-{name}.png"
    assert driver.save_screenshot(str(path))
    print(f"SCREENSHOT: {path}")


def _figures(driver: WebDriver, service: str) -> dict[str, str]:
    columns = ("health", "agents", "lag", "drain", "throughput", "p95", "batch")
    return {c: _text(driver, f"svc-{service}-{c}") for c in columns}


def _clean(driver: WebDriver) -> None:
    """No "NaN", "undefined", "null" or "Infinity" on the page, and no script error in the console."""
    body = driver.find_element(By.TAG_NAME, "body").text
    assert not BAD_WORDS.search(body), body
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
    assert not [e for e in errors if "/status.json" not in e["message"]], errors  # a 401 or an outage is logged


def _number(text: str) -> float | None:
    found = re.match(r"[0-9.]+", text)
    return float(found.group()) if found else None


def _send(
    url: str, count: int, headers: dict[str, str] | None = None, slowest: list[float] | None = None
) -> tuple[int, int, dict[str, int]]:
    """``count`` distinct data requests, ``CONCURRENCY`` at a time: (sent, answered 200, statuses); the
    slowest answer's seconds are appended to ``slowest`` when given."""
    statuses: dict[str, int] = {}

    def one(i: int) -> tuple[int, float]:
        body = {"operation": "analyze", "data": {"records": [{"v": i, "tag": uuid.uuid4().hex}]}}
        started = time.monotonic()
        try:
            status = http.post("/data/process", json=body).status_code
        except httpx.HTTPError:
            status = 0
        return status, time.monotonic() - started

    took: list[float] = []
    with httpx.Client(base_url=url, timeout=30, headers=headers) as http, ThreadPoolExecutor(CONCURRENCY) as pool:
        for status, seconds in pool.map(one, range(count)):
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            took.append(seconds)
    if slowest is not None:
        slowest.append(max(took))
    return count, statuses.get("200", 0), statuses


def test_the_page_asks_for_the_key_then_shows_the_pipeline_and_its_traffic(
    infra_settings: Settings, tmp_path: Path, browser: WebDriver
) -> None:
    started = time.monotonic()
    pipeline = Pipeline.isolated(infra_settings, ["data"], tmp_path, AISEMBLE_API_KEYS=json.dumps([KEY])).start()
    try:
        browser.get(pipeline.url + "/")
        _wait(browser, "the key form", lambda d: d.find_element(By.ID, "key-form").is_displayed())
        assert not browser.find_elements(By.ID, "svc-data")  # no figures without the key
        _screenshot(browser, tmp_path, "asks-for-key")

        browser.find_element(By.ID, "key-input").send_keys(KEY)
        browser.find_element(By.CSS_SELECTOR, "#key button[type=submit]").click()
        _wait(browser, "a live data agent", lambda d: (_number(_text(d, "svc-data-agents")) or 0) >= 1)
        _wait(browser, "Kafka ok", lambda d: _state(d, "kafka-state") == "ok")
        _wait(browser, "Redis ok", lambda d: _state(d, "redis-state") == "ok")
        assert not browser.find_element(By.ID, "banner").is_displayed()
        assert not browser.find_element(By.ID, "key-form").is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('aisemble.apiKey')") == KEY
        assert browser.execute_script("return localStorage.length") == 0  # the key lives in this tab only
        assert _state(browser, "svc-data-health-pill") == "ok"
        before = _figures(browser, "data")
        _clean(browser)
        _screenshot(browser, tmp_path, "running")

        sent, answered, statuses = _send(pipeline.url, TRAFFIC, {"X-API-Key": KEY})
        _wait(browser, "throughput", lambda d: (_number(_text(d, "svc-data-throughput")) or 0) > 0)
        _wait(browser, "p95 latency", lambda d: _text(d, "svc-data-p95").endswith("ms"))
        _wait(browser, "mean batch size", lambda d: (_number(_text(d, "svc-data-batch")) or 0) >= 1)
        after = _figures(browser, "data")
        _clean(browser)
        _screenshot(browser, tmp_path, "after-traffic")
        assert after["lag"] != DASH and after["drain"] != DASH
        # Before any traffic the page invents nothing: no throughput, latency or batch figure yet. After it,
        # each is a real number, and the pipeline it describes is the same (one agent, healthy).
        assert (before["throughput"], before["p95"], before["batch"]) == (DASH, DASH, DASH), before
        assert (_number(after["throughput"]) or 0) > 0 and after["throughput"].endswith("items/s"), after
        assert (_number(after["p95"]) or 0) > 0 and after["p95"].endswith("ms"), after
        assert 1 <= (_number(after["batch"]) or 0) <= TRAFFIC, after
        assert (before["agents"], before["health"]) == (after["agents"], after["health"]) == ("1", "ok")
        assert before["lag"] != DASH, before  # the broker answers: the lag is known from the start
        figures = {"sent": sent, "answered": answered, "statuses": statuses, "before": before, "after": after,
                   "window": _text(browser, "window"), "elapsed_s": round(time.monotonic() - started, 1)}  # fmt: skip
        print("STATUS-PAGE: " + json.dumps(figures, ensure_ascii=False))
        assert answered == sent
    finally:
        pipeline.stop()


def test_the_banner_says_redis_is_down(infra_settings: Settings, tmp_path: Path, browser: WebDriver) -> None:
    started = time.monotonic()
    redis = infra.start_redis(free_port(), tmp_path / "redis")
    base = infra_settings.model_copy(update={"redis_url": redis.url})
    pipeline = Pipeline.isolated(base, ["data"], tmp_path)
    try:
        pipeline.start()
        browser.get(pipeline.url + "/")
        _wait(browser, "Redis ok", lambda d: _state(d, "redis-state") == "ok")
        _wait(browser, "a live data agent", lambda d: (_number(_text(d, "svc-data-agents")) or 0) >= 1)
        assert not browser.find_element(By.ID, "banner").is_displayed()
        _screenshot(browser, tmp_path, "redis-up")

        redis.stop()  # by PID: this test's own Redis
        stopped = time.monotonic()
        _wait(browser, "the Redis banner", lambda d: "Redis is down" in _text(d, "banner"))
        banner_after_s = round(time.monotonic() - stopped, 1)
        assert _state(browser, "redis-state") == "down"
        assert _state(browser, "kafka-state") == "ok"
        assert "Kafka is down" not in _text(browser, "banner")
        assert _text(browser, "svc-data-agents") == DASH  # unknown while Redis is away, not 0
        assert _state(browser, "overall") == "degraded"
        _clean(browser)
        _screenshot(browser, tmp_path, "redis-down")

        sent, answered, statuses = _send(pipeline.url, 20)  # still served, without the cache
        counts = {"test": "status_page_redis_down", "sent": sent, "answered": answered, "dead_lettered": 0,
                  "lost": sent - answered, "statuses": statuses, "banner_after_s": banner_after_s,
                  "elapsed_s": round(time.monotonic() - started, 1)}  # fmt: skip
        print("FAULT-COUNTS: " + json.dumps(counts))
        assert counts["lost"] == 0
    finally:
        pipeline.stop()
        redis.stop()


def _free_pair() -> int:
    """A free port whose successor is free too (the broker's controller listens on port + 1)."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and port_free(port + 1):
            return port
    raise RuntimeError("no free pair of ports")


@pytest.mark.fault
def test_the_banner_says_kafka_is_down(infra_settings: Settings, tmp_path: Path, browser: WebDriver) -> None:
    started = time.monotonic()
    kafka = infra.start_kafka(_free_pair(), data_dir=tmp_path / "kafka")
    base = infra_settings.model_copy(update={"kafka_bootstrap": kafka.bootstrap})
    pipeline = Pipeline.isolated(base, ["data"], tmp_path, AISEMBLE_REQUEST_TIMEOUT_S="5")
    try:
        pipeline.start()
        browser.get(pipeline.url + "/")
        _wait(browser, "Kafka ok", lambda d: _state(d, "kafka-state") == "ok")
        _wait(browser, "a live data agent", lambda d: (_number(_text(d, "svc-data-agents")) or 0) >= 1)
        assert not browser.find_element(By.ID, "banner").is_displayed()
        _screenshot(browser, tmp_path, "kafka-up")

        kafka.stop()  # by PID: this test's own broker
        stopped = time.monotonic()
        _wait(browser, "the Kafka banner", lambda d: "Kafka is down" in _text(d, "banner"))
        banner_after_s = round(time.monotonic() - stopped, 1)
        assert _state(browser, "kafka-state") == "down"
        assert _state(browser, "redis-state") == "ok"
        assert _state(browser, "overall") == "down"
        assert _text(browser, "svc-data-lag") == DASH  # the broker cannot be asked: unknown, not 0
        _clean(browser)
        _screenshot(browser, tmp_path, "kafka-down")

        slowest: list[float] = []
        sent, answered, statuses = _send(pipeline.url, 10, slowest=slowest)  # refused at once (503), never hanging
        counts = {"test": "status_page_kafka_down", "sent": sent, "answered": answered, "refused_503":
                  statuses.get("503", 0), "dead_lettered": 0, "lost": statuses.get("0", 0), "statuses": statuses,
                  "slowest_s": round(slowest[0], 3), "banner_after_s": banner_after_s,
                  "elapsed_s": round(time.monotonic() - started, 1)}  # fmt: skip
        print("FAULT-COUNTS: " + json.dumps(counts))
        assert counts["lost"] == 0
        assert counts["refused_503"] == sent, statuses  # the page says Kafka is down: the edge knows it too
        # "At once": the edge already knows Kafka is down, so no request waits produce_timeout_s (1 s).
        assert slowest[0] < REFUSED_BOUND_S, counts
    finally:
        pipeline.stop()
        kafka.stop()


# ---- the history, its charts and the slowest requests --------------------------------------------------------

TRACE_TEMPLATE = "http://127.0.0.1:16686/trace/{trace_id}"
SLOW_DELAY_MS = 1500  # the deliberately slow request; the others take a few ms
LOAD_BOUND_S = 40.0  # the light load runs at most this long
CHARTS = ("throughput", "p95", "lag", "drain")


class _Traced:
    """ASGI: each HTTP request runs in a span of ``tracer`` (what the edge's tracing makes current)."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.tracer.start_as_current_span(f"{scope['method']} {scope['path']}"):
            await self.app(scope, receive, send)


def _points(driver: WebDriver, chart_id: str) -> int:
    found = driver.find_elements(By.ID, chart_id)
    return int(found[0].get_attribute("data-points") or 0) if found else -1


def _csp_violations(entries: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in entries if "Content Security Policy" in str(e["message"]) or "Refused to" in str(e["message"])]


def test_the_page_charts_its_history_and_links_the_slowest_requests_to_their_traces(
    infra_settings: Settings, tmp_path: Path, browser: WebDriver
) -> None:
    started = time.monotonic()
    pipeline = Pipeline.isolated(infra_settings, ["data"], tmp_path)
    pipeline.add_agent("data", "--runner", "tests.fault_runners:delayed_data")
    settings = pipeline.settings.model_copy(
        update={"services": ["data"], "heartbeat_interval_s": 1.0, "status_history_interval_s": 1.0,
                "trace_url_template": TRACE_TEMPLATE}
    )  # fmt: skip
    tracer = TracerProvider().get_tracer("status-page-test")  # this edge's spans only: nothing installed globally
    server = uvicorn.Server(
        uvicorn.Config(_Traced(create_app(settings), tracer), host="127.0.0.1", port=pipeline.port, log_level="warning")
    )
    serving = threading.Thread(target=server.run, name="edge", daemon=True)
    stop_load = threading.Event()
    counts = {"sent": 0, "answered": 0}
    counting = threading.Lock()

    def load() -> None:  # light and bounded: 4 clients, small requests, until told or LOAD_BOUND_S
        until = time.monotonic() + LOAD_BOUND_S

        def client(n: int) -> None:
            with httpx.Client(base_url=pipeline.url, timeout=30) as http:
                i = 0
                while not stop_load.is_set() and time.monotonic() < until:
                    body = {"operation": "analyze", "data": {"records": [{"v": i, "c": n, "tag": uuid.uuid4().hex}]}}
                    ok = http.post("/data/process", json=body).status_code == 200
                    with counting:
                        counts["sent"] += 1
                        counts["answered"] += ok
                    i += 1
                    time.sleep(0.02)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(client, range(4)))

    loader = threading.Thread(target=load, name="load", daemon=True)
    try:
        serving.start()
        pipeline.wait_healthy(120)
        browser.get(pipeline.url + "/")
        _wait(browser, "a live data agent", lambda d: (_number(_text(d, "svc-data-agents")) or 0) >= 1)
        _wait(browser, "the lag chart's first points", lambda d: _points(d, "chart-data-lag") > 0)
        # No traffic yet: no latency to draw, an empty state (not a broken chart); no slow request either.
        p95 = browser.find_element(By.ID, "chart-data-p95")
        assert _points(browser, "chart-data-p95") == 0 and "no data yet" in p95.text, p95.text
        assert browser.find_element(By.ID, "slow-empty").is_displayed()
        _screenshot(browser, tmp_path, "history-idle")

        slow_id = f"slow-{uuid.uuid4().hex[:12]}"  # alone, before the load: nothing else waits behind its batch
        slow_body = {"operation": "analyze", "data": {"records": [{"v": -1, "delay_ms": SLOW_DELAY_MS}]}}
        with httpx.Client(base_url=pipeline.url, timeout=30) as http:
            answer = http.post("/data/process", json=slow_body, headers={"X-Request-Id": slow_id})
        assert answer.status_code == 200, answer.text
        loader.start()

        _wait(browser, "5 throughput points", lambda d: _points(d, "chart-data-throughput") >= 5)
        _wait(browser, "p95 points > 0", lambda d: _points(d, "chart-data-p95") > 0)
        _wait(
            browser,
            "a drawn throughput line",
            lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-data-throughput polyline"),
        )
        _wait(
            browser,
            "the slow request at the top",
            lambda d: (
                d.find_elements(By.CSS_SELECTOR, "#slow-rows tr")
                and d.find_element(By.CSS_SELECTOR, "#slow-rows tr").get_attribute("data-request-id") == slow_id
            ),
        )
        _wait(browser, "the last throughput value labelled", lambda d: _text(d, "chart-data-throughput-last-0") != "")
        _screenshot(browser, tmp_path, "history-under-load")  # under load: the loader is still sending
        under_load = loader.is_alive()

        rows = browser.find_elements(By.CSS_SELECTOR, "#slow-rows tr")
        first = [cell.text for cell in rows[0].find_elements(By.TAG_NAME, "td")]
        link = rows[0].find_element(By.CSS_SELECTOR, "a.trace")
        trace_id = link.text
        assert re.fullmatch(r"[0-9a-f]{32}", trace_id), trace_id
        assert link.get_attribute("href") == TRACE_TEMPLATE.format(trace_id=trace_id)
        assert link.get_attribute("rel") == "noopener noreferrer" and link.get_attribute("target") == "_blank"
        assert first[1:5] == ["data", "analyze", "/data/process", "200"], first
        assert first[0].endswith(" s") and (_number(first[0]) or 0) >= SLOW_DELAY_MS / 1000, first
        assert len(rows) <= settings.status_slow_requests
        assert all(r.find_elements(By.CSS_SELECTOR, "a.trace") for r in rows)  # every request ran in a span here
        with httpx.Client(base_url=pipeline.url, timeout=30) as http:
            history = http.get("/status/history.json").json()
        assert "delay_ms" not in json.dumps(history) and "tag" not in json.dumps(history["slow"])  # no payloads
        for chart in CHARTS:
            assert browser.find_elements(By.ID, f"chart-data-{chart}"), chart
        lag_series = browser.find_elements(By.CSS_SELECTOR, "#charts-data figure:nth-of-type(3) .legend")
        assert [e.text for e in lag_series] == ["bulk", "interactive"]  # both lanes on the lag chart

        entries = browser.get_log("browser")
        assert not _csp_violations(entries), entries
        _clean(browser)
        # The check can fail: an inline style attribute, which this CSP forbids, is reported in the same log.
        browser.execute_script(
            "document.body.appendChild(document.createElement('div')).setAttribute('style', 'color: red')"
        )
        _wait(browser, "a reported CSP violation", lambda d: _csp_violations(d.get_log("browser")))
        stop_load.set()
        loader.join(LOAD_BOUND_S + 10)
        points = {c: _points(browser, f"chart-data-{c}") for c in CHARTS}
        figures = {**counts, "under_load": under_load, "slow_row": first, "points": points,
                   "elapsed_s": round(time.monotonic() - started, 1)}  # fmt: skip
        print("STATUS-HISTORY: " + json.dumps(figures, ensure_ascii=False))
        assert under_load and counts["answered"] == counts["sent"] > 0
    finally:
        stop_load.set()
        server.should_exit = True
        serving.join(15)
        pipeline.stop()
