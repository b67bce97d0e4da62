"""Backpressure at the edge: 2,000 concurrent clients against an edge that holds at most 200 requests.

What it shows: past ``max_in_flight`` the edge answers 429 with ``Retry-After`` at once (the slowest 429
within ``AT_ONCE_BOUND_S``, well under the request timeout); every admitted request is answered 200 (at least
``max_in_flight`` of them, no 503 or 504), every other one 429; no client hangs or loses its connection; the
edge process's resident memory stays within a generous bound (printed before, at peak and after).

Real Kafka and Redis (the shared ones), a private topic prefix and port (``Pipeline.isolated``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aisemble.pipeline import Pipeline
from streams.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.fault]

CLIENTS = 2000
MAX_IN_FLIGHT = 200
CLIENT_TIMEOUT_S = 90.0  # bounded: a hang is a failure, not a stuck test
RSS_GROWTH_BOUND_MB = 300.0
ALLOWED = {200, 429, 503, 504}
AT_ONCE_BOUND_S = 10.0  # the slowest 429 (3x the measured max), under the 30 s request timeout


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


class _RssSampler:
    """Samples a process's RSS every ``interval_s`` on a thread; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak = _rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _rss_mb(self.pid))

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    _raise_nofile(CLIENTS * 2 + 512)
    logs = Path(tmp_path_factory.mktemp("logs"))
    p = Pipeline.isolated(infra_settings, ["data"], logs, AISEMBLE_MAX_IN_FLIGHT=str(MAX_IN_FLIGHT)).start()
    yield p
    p.stop()


async def _post_raw(
    port: int, body: bytes, connected: asyncio.Event, counter: list[int], gate: asyncio.Event
) -> tuple[int, dict[str, str], float]:
    """One HTTP/1.1 POST on its own connection, opened first, sent when ``gate`` opens: (status, headers,
    seconds from sending to the whole answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        counter[0] += 1
        if counter[0] == CLIENTS:
            connected.set()
        await gate.wait()
        head = (
            f"POST /data/process HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        sent = time.monotonic()
        writer.write(head.encode() + body)
        await writer.drain()
        status_line, *header_lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        await reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, time.monotonic() - sent
    finally:
        writer.close()


async def test_2000_concurrent_clients_get_429_past_the_limit_and_memory_stays_bounded(pipeline: Pipeline) -> None:
    """Every client opens its connection first; then all send at once, so the edge really sees 2,000.

    Raw HTTP/1.1 on asyncio streams rather than httpx: an httpx client on this machine sends ~60 requests
    a second, so the edge would never hold more than a few; the point is to load the edge, not the client.
    """
    edge_pid = pipeline.procs["edge"].pid
    counts: Counter[str] = Counter()
    missing_retry_after = 0
    gate, connected, counter = asyncio.Event(), asyncio.Event(), [0]
    latencies: dict[int, list[float]] = {}

    async with httpx.AsyncClient(base_url=pipeline.url, timeout=CLIENT_TIMEOUT_S) as client:
        warm = await client.post(
            "/data/process", json={"operation": "analyze", "data": {"records": [{"v": 1}]}, "cache": False}
        )
        assert warm.status_code == 200, warm.text
        rss_before = _rss_mb(edge_pid)

        async def one(i: int) -> None:
            nonlocal missing_retry_after
            body = {"operation": "analyze", "data": {"records": [{"i": i, "v": i % 7}]}, "cache": False}
            counts["sent"] += 1
            try:
                status, headers, took_s = await asyncio.wait_for(
                    _post_raw(pipeline.port, json.dumps(body).encode(), connected, counter, gate), CLIENT_TIMEOUT_S
                )
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                counts["lost"] += 1
                counts[f"lost:{type(exc).__name__}"] += 1
                return
            counts[str(status)] += 1
            latencies.setdefault(status, []).append(took_s)
            if status == 429 and headers.get("retry-after") != "1":
                missing_retry_after += 1

        tasks = [asyncio.create_task(one(i)) for i in range(CLIENTS)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(connected.wait(), 60.0)
        counts["connected_before_send"] = counter[0]
        started = time.monotonic()
        with _RssSampler(edge_pid) as sampler:
            gate.set()
            await asyncio.gather(*tasks)
        wall_s = time.monotonic() - started
        await asyncio.sleep(1.0)
        rss_after = _rss_mb(edge_pid)
        health = (await client.get("/health")).json()

    figures = {
        "test": "backpressure",
        "clients": CLIENTS,
        "max_in_flight": MAX_IN_FLIGHT,
        **counts,
        "missing_retry_after": missing_retry_after,
        "wall_s": round(wall_s, 1),
        "rss_before_mb": round(rss_before, 1),
        "rss_peak_mb": round(sampler.peak, 1),
        "rss_after_mb": round(rss_after, 1),
        "edge_waiting_after": health.get("edge", {}).get("waiting"),
        "median_s": {str(k): round(statistics.median(v), 3) for k, v in sorted(latencies.items())},
        "max_s": {str(k): round(max(v), 3) for k, v in sorted(latencies.items())},
    }
    print("FAULT-COUNTS: " + json.dumps(figures))
    statuses = {int(k) for k in counts if k.isdigit()}
    assert counts["lost"] == 0, figures
    assert statuses <= ALLOWED, figures
    assert counts["429"] >= 1 and missing_retry_after == 0, figures
    assert sum(counts[str(s)] for s in ALLOWED) == CLIENTS, figures
    # Admitted requests are served: at least a full edge's worth answered 200, none 503 or 504 (Kafka is up
    # and the agent keeps pace: a 504 here is a request the edge admitted and then failed), the rest 429.
    assert counts["200"] >= MAX_IN_FLIGHT, figures
    assert counts["503"] == 0 and counts["504"] == 0, figures
    assert counts["200"] + counts["429"] == CLIENTS, figures
    # "At once": a refused request waits for no slot. Its time is the edge working through 2,000 connections
    # on a busy machine (max measured 3.3 s on 2 shared cores); waiting for a slot would take the request timeout.
    assert max(latencies[429]) < AT_ONCE_BOUND_S, figures
    assert sampler.peak - rss_before < RSS_GROWTH_BOUND_MB, figures
