"""Priority lanes (issue #16): interactive latency while a bulk embedding batch runs, and bulk's own rate.

    python bench/lanes.py [--profile quick|full|smoke] [--out lanes]

One pipeline (edge + nlp agent with its default MiniLM model), in one run:

1. ``interactive_idle``: one closed-loop client on ``POST /v1/embeddings`` (a unique short text each time, so
   no cache hit), twice ``duration_s / 2`` (first and last): p50/p99 with nothing else running;
2. ``direct_interactive``: ``bulk_n`` embed requests produced at once, Kafka-direct, to the interactive request
   topic (``bench.kafka_direct.direct``): the agent's rate with no lanes involved (the reference), twice;
3. ``bulk_alone``: the same to the bulk topic (``{prefix}.nlp.bulk``) with no interactive load, twice
   (alternating with 2): items/s, and its ratio to (2) (target >= 0.85);
4. ``during_batch``: ``bulk_n`` produced to the bulk topic again, and the one interactive client runs while
   that batch is answered (from the first send until the last bulk reply): p50/p99, and their ratios to (1)
   (targets: p50 <= 1.5x, p99 <= 2x).

JSON in ``bench/results/<out>.json``. The driver shares the CPUs with the edge and the agent (and, on a shared
machine, with whatever else runs): read the ratios, measured minutes apart at most. Nothing here asserts.

What can go wrong: replies missing after ``timeout_s`` are counted as ``missing`` (``bench.kafka_direct``); an
interactive request that fails is counted in ``errors``; every process is stopped by PID on exit
(``bench.common.running_pipeline``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, running_pipeline, summary_ms, write_result
from bench.kafka_direct import direct
from bench.samples_nlp import short_items, short_text

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"bulk_n": 200, "duration_s": 3.0},
    "quick": {"bulk_n": 2000, "duration_s": 10.0},
    "full": {"bulk_n": 10_000, "duration_s": 30.0},
}
EMBEDDINGS_PATH = "/v1/embeddings"


async def interactive(url: str, until: asyncio.Future[Any] | float) -> dict[str, object]:
    """One closed-loop client on ``/v1/embeddings`` until ``until`` (a future that completes, or seconds)."""
    run = uuid.uuid4().hex[:6]
    counter = itertools.count()
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for _ in range(3):  # warm the connection and the path
            await http.post(EMBEDDINGS_PATH, json={"model": "nlp", "input": f"warm {run} {next(counter)}"})
        end = time.perf_counter() + until if isinstance(until, float) else None

        def going() -> bool:
            if end is not None:
                return time.perf_counter() < end
            return isinstance(until, asyncio.Future) and not until.done()

        start = time.perf_counter()
        while going():
            n = next(counter)
            body = {"model": "nlp", "input": f"{short_text(n)} ({run}-{n})"}
            t0 = time.perf_counter()
            try:
                response = await http.post(EMBEDDINGS_PATH, json=body)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                errors += 1
        seconds = time.perf_counter() - start
    return {"answered": len(latencies), "errors": errors, "seconds": round(seconds, 3),
            "latency_ms": summary_ms(latencies), "_latencies": latencies}  # fmt: skip


async def during_batch(url: str, settings: Any, n: int) -> dict[str, object]:
    """``n`` bulk embeds produced at once while one interactive client runs until the batch is answered."""
    batch = asyncio.ensure_future(direct(settings, "nlp", short_items(n), bulk=True))
    inter = await interactive(url, batch)
    return {"bulk": await batch, "interactive": inter}


def _ratio(a: object, b: object) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or b == 0:
        return None
    return round(float(a) / float(b), 3)


def _rate(runs: list[dict[str, object]]) -> float:
    """Items per second over several runs together."""
    ok = sum(float(r["answered_ok"]) for r in runs)  # type: ignore[arg-type]
    return round(ok / sum(float(r["seconds"]) for r in runs), 2)  # type: ignore[arg-type]


def run(profile: str = "quick") -> dict[str, Any]:
    """The points in the order idle, (reference, bulk alone), during, (reference, bulk alone), idle: what a
    neighbour's load does to one side falls on the other as well (a shared machine)."""
    prof = PROFILES[profile]
    n, duration_s = prof["bulk_n"], float(prof["duration_s"])
    idle: list[dict[str, Any]] = []
    reference: list[dict[str, object]] = []
    alone: list[dict[str, object]] = []
    with running_pipeline(["nlp"]) as pipeline:
        settings, url = pipeline.settings, pipeline.url
        asyncio.run(direct(settings, "nlp", short_items(64)))  # warm the model and the reply path
        idle.append(asyncio.run(interactive(url, duration_s / 2)))
        reference.append(asyncio.run(direct(settings, "nlp", short_items(n))))
        alone.append(asyncio.run(direct(settings, "nlp", short_items(n), bulk=True)))
        during = asyncio.run(during_batch(url, settings, n))
        reference.append(asyncio.run(direct(settings, "nlp", short_items(n))))
        alone.append(asyncio.run(direct(settings, "nlp", short_items(n), bulk=True)))
        idle.append(asyncio.run(interactive(url, duration_s / 2)))
    idle_ms = summary_ms([ms for point in idle for ms in point.pop("_latencies")])
    during_ms: dict[str, float] = during["interactive"]["latency_ms"]  # type: ignore[index]
    during["interactive"].pop("_latencies")  # type: ignore[attr-defined]
    figures = {
        "interactive_idle_ms": idle_ms,
        "interactive_during_ms": during_ms,
        "interactive_p50_ratio": _ratio(during_ms["p50"], idle_ms["p50"]),
        "interactive_p99_ratio": _ratio(during_ms["p99"], idle_ms["p99"]),
        "direct_interactive_items_per_s": _rate(reference),
        "bulk_alone_items_per_s": _rate(alone),
        "bulk_alone_vs_direct": _ratio(_rate(alone), _rate(reference)),
        "bulk_during_items_per_s": during["bulk"]["items_per_s"],  # type: ignore[index]
    }
    targets = {
        "interactive_p50_within_1.5x": (figures["interactive_p50_ratio"] or 99) <= 1.5,
        "interactive_p99_within_2x": (figures["interactive_p99_ratio"] or 99) <= 2.0,
        "bulk_alone_at_least_0.85x_direct": (figures["bulk_alone_vs_direct"] or 0) >= 0.85,
    }
    return {"profile": profile, **prof, "figures": figures, "targets_met": targets, "interactive_idle": idle,
            "direct_interactive": reference, "bulk_alone": alone, "during_batch": during}  # fmt: skip


def target_rows(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, figure, met) for issue #16's lane targets, from the suite's ``lanes`` section."""
    section = result.get("lanes")
    figures = section.get("figures") if isinstance(section, dict) else None
    if not isinstance(figures, dict):
        why = "not run" if not isinstance(section, dict) else str(section.get("failed") or section.get("skipped"))
        return [("priority lanes (issue #16)", why[:200].replace("|", "/"), None)]
    idle, during = figures["interactive_idle_ms"], figures["interactive_during_ms"]
    p50, p99, bulk = figures["interactive_p50_ratio"], figures["interactive_p99_ratio"], figures["bulk_alone_vs_direct"]

    def x(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}x"

    during_p50 = f"{during['p50']:.1f} / {idle['p50']:.1f} ms = {x(p50)}"
    during_p99 = f"{during['p99']:.1f} / {idle['p99']:.1f} ms = {x(p99)}"
    rates = f"{figures['bulk_alone_items_per_s']:.1f} / {figures['direct_interactive_items_per_s']:.1f} items/s"
    return [
        ("interactive embed p50 during a bulk batch ≤ 1.5x idle", during_p50, None if p50 is None else p50 <= 1.5),
        ("interactive embed p99 during a bulk batch ≤ 2x idle", during_p99, None if p99 is None else p99 <= 2.0),
        (
            "bulk batch alone ≥ 0.85x the Kafka-direct rate",
            f"{rates} = {x(bulk)}",
            None if bulk is None else bulk >= 0.85,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", default="lanes", help="bench/results/<out>.json (may name a sub-folder)")
    args = parser.parse_args()
    result = run(args.profile)
    out = Path(args.out)
    path = write_result(out.name, result, RESULTS / out.parent)
    print(f"{path}: {result['figures']} {result['targets_met']}")


if __name__ == "__main__":
    main()
