"""Shared benchmark plumbing: local Kafka/Redis, an isolated pipeline, statistics, JSON output."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson

import infra
from aisemble.pipeline import Pipeline
from streams.settings import Settings

RESULTS = Path(__file__).parent / "results"


def base_settings() -> Settings:
    return Settings(
        kafka_bootstrap=os.environ.get("AISEMBLE_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        redis_url=os.environ.get("AISEMBLE_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )


@contextlib.contextmanager
def running_pipeline(services: list[str], **env: str) -> Iterator[Pipeline]:
    """Kafka and Redis (started if needed) and an isolated pipeline for ``services``."""
    settings = base_settings()
    local = infra.start_local(settings)
    logs = Path(tempfile.mkdtemp(prefix="aisemble-bench-"))
    pipeline = Pipeline.isolated(settings, services, logs, **env)
    try:
        yield pipeline.start()
    finally:
        pipeline.stop()
        local.stop()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p90": round(percentile(values, 90), 3),
        "p99": round(percentile(values, 99), 3),
        "mean": round(statistics.fmean(values), 3) if values else float("nan"),
        "max": round(max(values), 3) if values else float("nan"),
    }


def machine() -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(name: str, result: dict[str, object]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_bytes(orjson.dumps({"machine": machine(), **result}, option=orjson.OPT_INDENT_2))
    return path
