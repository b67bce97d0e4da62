"""``aisemble monitor``: its statistics (pure), and the command as a smoke test of a real edge and data agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aisemble.monitor import Probe, Report, Sample, brief_probes, summarize
from aisemble.pipeline import Pipeline, free_port
from streams.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_summarize_counts_success_latency_and_cache() -> None:
    probe = Probe("data", "POST", "/data/process", {}, 5)
    samples = [Sample(200, 10.0), Sample(200, 20.0, cached=True), Sample(422, 30.0, error="422: invalid"),
               Sample(0, 40.0, error="ConnectError"), Sample(200, 50.0, cached=True)]  # fmt: skip
    stats = summarize(probe, samples)
    assert (stats.requests, stats.ok, stats.errors, stats.cached) == (5, 3, 2, 2)
    assert stats.success_rate == 0.6
    assert (stats.avg_ms, stats.min_ms, stats.max_ms) == (30.0, 10.0, 50.0)
    assert stats.p95_ms == pytest.approx(48.0)
    assert stats.statuses == {"0": 1, "200": 3, "422": 1} and stats.first_error == "422: invalid"
    report = Report("http://x", 0.0, 2.0, [stats])
    assert report.healthy and report.summary.requests_per_s == 2.5
    never = summarize(Probe("llm", "POST", "/ai/llm/completion", {}, 1), [Sample(503, 1.0)])
    assert not Report("http://x", 0.0, 1.0, [stats, never]).healthy


def test_brief_probes_are_the_briefs_payloads() -> None:
    probes = {p.name: p for p in brief_probes(None, cache=False)}
    assert set(probes) == {"health", "llm", "nlp", "data"}  # no image: no vision
    assert probes["health"].payload is None and probes["health"].iterations == 50
    assert probes["nlp"].payload == {"text": "This is a great product! I love it.", "task": "sentiment", "cache": False}
    assert len(probes["data"].payload["data"]["records"]) == 100  # type: ignore[index]


def monitor_cmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aisemble", "monitor", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_nothing_listening_fails_the_smoke_test() -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    done = monitor_cmd("--url", nobody, "--iterations", "2", "--services", "health", "--json")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["endpoints"][0]["success_rate"] == 0 and report["summary"]["failing"] == ["GET /health"]


# --- against the real Kafka and Redis --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    p = Pipeline.isolated(infra_settings, ["data"], Path(tmp_path_factory.mktemp("logs"))).start()
    yield p
    p.stop()


@pytest.mark.integration
def test_monitor_against_a_running_edge(pipeline: Pipeline) -> None:
    done = monitor_cmd("--url", pipeline.url, "--iterations", "5", "--services", "health,data", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    keys = ("requests", "success_rate", "avg_ms", "min_ms", "max_ms", "p95_ms", "cached")
    print("MONITOR:", json.dumps({e["endpoint"]: {k: e[k] for k in keys} for e in report["endpoints"]}))
    by_name = {e["name"]: e for e in report["endpoints"]}
    assert set(by_name) == {"health", "data"}
    for stats in by_name.values():
        assert stats["requests"] == 5 and stats["ok"] == 5 and stats["success_rate"] == 1.0
        assert stats["min_ms"] <= stats["avg_ms"] <= stats["max_ms"]
        assert stats["min_ms"] <= stats["p95_ms"] <= stats["max_ms"]
    assert by_name["data"]["cached"] >= 4  # the same payload five times: the first runs, the rest are cached
    assert report["summary"]["requests"] == 10 and report["summary"]["success_rate"] == 1.0


@pytest.mark.integration
def test_monitor_table_and_a_service_without_agent(pipeline: Pipeline) -> None:
    done = monitor_cmd("--url", pipeline.url, "--iterations", "1", "--services", "health,data,llm", "--timeout", "3",
                       env={"COLUMNS": "200"})  # fmt: skip
    print(done.stdout)
    assert done.returncode == 1  # no llm agent runs here: that endpoint never succeeds
    assert "GET /health" in done.stdout and "POST /data/process" in done.stdout and "no success" in done.stdout
