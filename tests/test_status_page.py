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

A screenshot of each state is saved under the test's tmp_path (``SCREENSHOT: <path>`` lines with ``pytest -s``).
Every wait is bounded (``WebDriverWait``); the browser is always quit and every process stopped by PID.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

import infra
from aisemble.pipeline import Pipeline, free_port
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
        WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(condition)
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
