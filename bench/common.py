"""Shared benchmark plumbing: local Kafka/Redis, an isolated pipeline, statistics, JSON output."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import orjson

import infra
from aisemble.pipeline import Pipeline
from streams.settings import Settings
from streams.stats import percentile

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def base_settings() -> Settings:
    return Settings(
        kafka_bootstrap=os.environ.get("AISEMBLE_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        redis_url=os.environ.get("AISEMBLE_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )


@contextlib.contextmanager
def running_pipeline(services: list[str], runners: Mapping[str, str] | None = None, **env: str) -> Iterator[Pipeline]:
    """Kafka and Redis (started if needed) and an isolated pipeline for ``services``.

    ``runners`` maps a service to a custom runner factory (``module:function``, e.g.
    ``bench.noop_runner:build``) served by that service's agent instead of the built-in runner.
    """
    settings = base_settings()
    local = infra.start_local(settings)
    logs = Path(tempfile.mkdtemp(prefix="aisemble-bench-"))
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    pipeline = Pipeline.isolated(settings, services, logs, PYTHONPATH=pythonpath, **env)
    custom = dict(runners or {})
    pipeline.services = [s for s in services if s not in custom]  # the edge still serves every service
    for service, factory in custom.items():
        pipeline.add_agent(service, "--runner", factory)
    try:
        yield pipeline.start()
    finally:
        pipeline.stop()
        pipeline.drop_topics()  # a throw-away prefix: its topics would weigh on the broker from now on
        local.stop()


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3) if values else float("nan"),
        "p90": round(percentile(values, 90), 3) if values else float("nan"),
        "p99": round(percentile(values, 99), 3) if values else float("nan"),
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


def write_result(name: str, result: dict[str, object], directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_bytes(orjson.dumps({"machine": machine(), **result}, option=orjson.OPT_INDENT_2))
    return path


def descendants(pid: int) -> set[int]:
    """PIDs of every live descendant of ``pid`` (from /proc; empty where /proc cannot be read)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> dict[int, str]:
    """The PIDs of ``pids`` still running (zombies aside), with their command names."""
    out: dict[int, str] = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        if rest.split()[0] != "Z":
            out[pid] = name
    return out
