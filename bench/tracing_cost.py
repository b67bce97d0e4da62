"""What tracing costs (issue #17): light REST work at 64 clients with tracing off, on at 100% and on at 10%.

    python bench/tracing_cost.py [--duration 10] [--rounds 2] [--clients 64] [--out tracing_cost]
    cd /tmp && python <checkout>/bench/tracing_cost.py --baseline <a checkout without tracing>  # off vs no code

Three pipelines (edge + data agent each) run side by side: ``off`` (no OTLP endpoint), ``on_100``
(``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=1.0``) and ``on_10`` (ratio 0.1), the
two traced ones exporting over OTLP/HTTP to a local receiver started here that parses, counts and discards
(``tests.otlp_receiver``). Each round runs the three points in turn (a shared machine's neighbours fall on
all three): ``POST /data/process``, ``analyze`` of 3 records, cache off, closed loop (``bench.edge_cost
.closed_loop``: throughput, latency, CPU per request of the edge and the agent, the driver's CPU share).

With ``--baseline <checkout>`` a fourth pipeline, ``no_tracing_code``, runs the code of another checkout (one
from before tracing existed, e.g. ``git worktree add /tmp/before 921a1a7``), so "off costs nothing measurable"
is a figure: ``off`` against it in the same rounds (run from a directory without an ``aisemble`` package,
as ``bench/edge_cost.py --baseline`` needs).

What can go wrong: a collector slower than the load drops spans (``OTEL_BSP_MAX_QUEUE_SIZE``), counted as
``spans_received`` below what was made; nothing here asserts on time. Every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import running_pipeline, write_result
from bench.edge_cost import DATA_PATH, baseline_pipeline, closed_loop, light_body
from tests.otlp_receiver import OtlpReceiver

SAMPLER = "parentbased_traceidratio"


def designs(endpoint: str) -> dict[str, dict[str, str]]:
    traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_SAMPLER": SAMPLER}
    return {
        "off": {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""},
        "on_100": {**traced, "OTEL_TRACES_SAMPLER_ARG": "1.0"},
        "on_10": {**traced, "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    }


@contextlib.contextmanager
def pipelines(envs: dict[str, dict[str, str]], baseline: Path | None = None) -> Iterator[dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        running = {name: stack.enter_context(running_pipeline(["data"], **env)) for name, env in envs.items()}
        if baseline is not None:
            log_dir = Path(tempfile.mkdtemp(prefix="aisemble-tracing-cost-"))
            running["no_tracing_code"] = stack.enter_context(baseline_pipeline(baseline, log_dir))
        yield running


def run(duration_s: float, rounds: int, clients: int, baseline: Path | None = None) -> dict[str, Any]:
    receiver = OtlpReceiver(keep=False).start()
    points: dict[str, list[dict[str, Any]]] = {}
    try:
        envs = designs(receiver.endpoint)
        with pipelines(envs, baseline) as running:
            for _ in range(rounds):
                for name, pipeline in running.items():
                    pids = {"edge": pipeline.procs["edge"].pid, "agent": pipeline.procs["data"].pid}
                    before = receiver.count
                    rec = asyncio.run(closed_loop(pipeline.url, DATA_PATH, light_body, clients, duration_s, pids))
                    rec["spans_received_during_point"] = receiver.count - before
                    points.setdefault(name, []).append(rec)
    finally:
        receiver.stop()

    def median(name: str, key: str) -> float:
        return statistics.median(float(p[key]) for p in points[name])

    def p50(name: str) -> float:
        return statistics.median(float(p["latency_ms"]["p50"]) for p in points[name])

    summary = {
        name: {
            "requests_per_s": median(name, "requests_per_s"),
            "p50_ms": p50(name),
            "edge_cpu_us_per_request": statistics.median(
                float(p["cpu"]["edge"]["cpu_us_per_request"] or 0) for p in points[name]
            ),
            "agent_cpu_us_per_request": statistics.median(
                float(p["cpu"]["agent"]["cpu_us_per_request"] or 0) for p in points[name]
            ),
            "throughput_vs_off": round(median(name, "requests_per_s") / median("off", "requests_per_s"), 3),
            "p50_vs_off": round(p50(name) / p50("off"), 3),
        }
        for name in points
    }
    if "no_tracing_code" in points:
        summary["off"]["throughput_vs_no_tracing_code"] = round(
            median("off", "requests_per_s") / median("no_tracing_code", "requests_per_s"), 3
        )
        summary["off"]["p50_vs_no_tracing_code"] = round(p50("off") / p50("no_tracing_code"), 3)
    return {
        "clients": clients,
        "duration_s": duration_s,
        "rounds": rounds,
        "summary": summary,
        "spans_received": receiver.count,
        "points": points,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--out", default="tracing_cost")
    parser.add_argument("--baseline", type=Path, help="also run a checkout without tracing code (off's cost)")
    args = parser.parse_args()
    result = run(args.duration, args.rounds, args.clients, args.baseline)
    path = write_result(args.out, result)
    sys.stdout.write(f"{path}\n")
    for name, figures in result["summary"].items():
        sys.stdout.write(f"{name}: {figures}\n")


if __name__ == "__main__":
    main()


def summary_rows(result: dict[str, Any]) -> list[str]:
    """SUMMARY.md's section 15 (``bench.summary`` calls it) from the suite's ``tracing_cost`` entry."""
    section = result.get("tracing_cost")
    if section is None:
        return []
    lines = ["## 15. What tracing costs (bench.tracing_cost: light REST work, 64 clients)", ""]
    if "summary" not in section:
        why = next((f"{k}: {section[k]}" for k in ("failed", "skipped") if k in section), "not run")
        return [*lines, " ".join(str(why).split())[:300], ""]
    lines += [
        "| tracing | req/s | p50 ms | edge CPU us/req | agent CPU us/req | throughput vs off | p50 vs off |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, f in section["summary"].items():
        lines.append(
            f"| {name} | {f['requests_per_s']:.0f} | {f['p50_ms']:.1f} | {f['edge_cpu_us_per_request']:.0f} | "
            f"{f['agent_cpu_us_per_request']:.0f} | {f['throughput_vs_off']:.2f}x | {f['p50_vs_off']:.2f}x |"
        )
    return [*lines, f"Spans received by the local OTLP receiver: {section['spans_received']}.", ""]
