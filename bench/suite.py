"""The benchmark suite: aisemble beside the alternatives, on the same model, machine and load, in one run.

    python bench/suite.py            # quick (make bench): 10 s per load point, 1/8/64 clients
    python bench/suite.py --full     # make bench-full: 30 s per load point, 1/8/64/256 clients

Writes bench/results/suite.json and bench/results/SUMMARY.md (Markdown tables; every ratio in them is
between figures of the same run). Sections:

1. model alone (``bench.throughput.model_alone``, in this process): nlp ``embed`` and data ``analyze``
   items/s at batch 1 and at several batch sizes; the best one is reported.
3. REST load, nlp ``embed``, cache off: closed loop, N concurrent clients for a fixed duration each,
   items/s and client-side p50/p99, through an isolated aisemble pipeline (edge + agents as processes).
4. the same clients and load against the per-request design (``bench/alt_per_request.py``: FastAPI,
   one ``run_batch([item])`` per request in the thread pool, served by uvicorn on 127.0.0.1), and
   Ray Serve with ``@serve.batch`` when ``import ray`` works (otherwise recorded as skipped).
5. cache: p50/p99 of one embed request repeated with the cache on (hits answered by the edge), and
   items/s at 64 clients with 30% of the requests repeating a small pool of texts.
6. scale: 1,000 data requests in flight at once at the edge (status counts, p50/p99), then the peak
   RSS (``VmHWM``) of the edge, each agent and the per-request server.

What can go wrong: Kafka and Redis are started when they do not answer (and stopped only if started
here); every process started is stopped by PID. The load driver shares the CPUs with the servers, so
on a small machine the figures are lower than the servers alone would give; the ratios are what to read.
Nothing here asserts on time; a run with errors still writes its figures (with the error counts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aisemble.pipeline import free_port
from bench.common import (
    RESULTS,
    alive,
    base_settings,
    descendants,
    machine,
    running_pipeline,
    summary_ms,
    write_result,
)
from bench.samples_data import sample_items as data_items
from bench.samples_nlp import COMBINATIONS, review
from bench.samples_nlp import sample_items as nlp_items
from bench.throughput import model_alone

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"duration_s": 10.0, "clients": [1, 8, 64], "model_items": 256, "cache_n": 300, "in_flight": 1000},
    "full": {"duration_s": 30.0, "clients": [1, 8, 64, 256], "model_items": 1024, "cache_n": 2000, "in_flight": 1000},
}
BATCHES = {"nlp": (8, 32, 64), "data": (8, 16, 64)}
NLP_PATH = "/ai/nlp/process"
Body = Callable[[int], dict[str, object]]


def embed_body(i: int) -> dict[str, object]:
    return {"task": "embed", "text": review(i % COMBINATIONS), "cache": False}


async def closed_loop(url: str, path: str, body: Body, clients: int, duration_s: float) -> dict[str, object]:
    """``clients`` loops, each sending its next request when the previous one is answered, for ``duration_s``."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    cached = 0
    counter = itertools.count()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        for _ in range(3):  # warm the connection and the path
            await http.post(path, json=body(next(counter)))
        end = time.perf_counter() + duration_s

        async def client() -> None:
            nonlocal cached
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    response = await http.post(path, json=body(next(counter)))
                except httpx.HTTPError:
                    statuses[-1] += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                statuses[response.status_code] += 1
                if response.status_code == 200 and response.json().get("cached"):
                    cached += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ok = statuses.get(200, 0)
    return {
        "clients": clients,
        "seconds": round(elapsed, 3),
        "answered_200": ok,
        "errors": sum(statuses.values()) - ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "cached": cached,
        "items_per_s": round(ok / elapsed, 2),
        "latency_ms": summary_ms(latencies),
    }


def load_points(url: str, clients: list[int], duration_s: float, label: str) -> list[dict[str, object]]:
    points = []
    for n in clients:
        point = asyncio.run(closed_loop(url, NLP_PATH, embed_body, n, duration_s))
        ms: Any = point["latency_ms"]
        print(
            f"{label} {n:>3} clients: {point['items_per_s']} items/s, p50 {ms['p50']} ms, "
            f"p99 {ms['p99']} ms, errors {point['errors']}",
            flush=True,
        )
        points.append(point)
    return points


def cache_hits(url: str, n: int) -> dict[str, object]:
    """One embed request sent once (a miss that fills the cache), then ``n`` times sequentially."""
    body = {"task": "embed", "text": f"cache probe {uuid.uuid4().hex}", "cache": True}
    latencies: list[float] = []
    hits = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        first = http.post(NLP_PATH, json=body)
        for _ in range(n):
            t0 = time.perf_counter()
            response = http.post(NLP_PATH, json=body)
            latencies.append((time.perf_counter() - t0) * 1000)
            hits += response.status_code == 200 and bool(response.json().get("cached"))
    return {"first_status": first.status_code, "requests": n, "hits": hits, "latency_ms": summary_ms(latencies)}


def repeats_body(run: str, share: float = 0.3, pool: int = 50) -> Body:
    """Cache on; ``share`` of requests repeat one of ``pool`` texts, the others are new texts (misses)."""

    def body(i: int) -> dict[str, object]:
        if (i * 7) % 10 < share * 10:
            return {"task": "embed", "text": f"{run} repeat {i % pool}", "cache": True}
        return {"task": "embed", "text": f"{run} {review(i % COMBINATIONS)}", "cache": True}

    return body


async def in_flight(url: str, n: int) -> dict[str, object]:
    """``n`` data ``analyze`` requests (20 records each) sent at once, all outstanding together."""
    records = [{"id": j, "value": j * 10, "category": "abcd"[j % 4]} for j in range(20)]
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await http.post("/data/process", json={"operation": "analyze", "data": {"records": records}, "cache": False})

        async def one(i: int) -> None:
            body = {"operation": "analyze", "data": {"records": [*records, {"id": -1, "value": i}]}, "cache": False}
            t0 = time.perf_counter()
            try:
                response = await http.post("/data/process", json=body)
            except httpx.HTTPError:
                statuses[-1] += 1
                return
            latencies.append((time.perf_counter() - t0) * 1000)
            statuses[response.status_code] += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - start
    ok = statuses.get(200, 0)
    return {
        "requests": n,
        "answered_200": ok,
        "errors": n - ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": round(elapsed, 3),
        "latency_ms": summary_ms(latencies),
    }


def _status_mb(pid: int, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident set (VmHWM) of ``pid`` in MiB, from /proc; None where it cannot be read."""
    return _status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float | None:
    """Resident set now (VmRSS) of ``pid`` in MiB; None where it cannot be read."""
    return _status_mb(pid, "VmRSS")


@contextlib.contextmanager
def per_request_server(service: str, log: Path, timeout_s: float = 300.0) -> Iterator[tuple[str, int]]:
    """``bench/alt_per_request.py`` as a subprocess on a free 127.0.0.1 port; yields (url, pid)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    script = Path(__file__).with_name("alt_per_request.py")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), "--service", service, "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"per-request server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"per-request server not ready after {timeout_s}s")
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@contextlib.contextmanager
def ray_serve_server(log: Path, timeout_s: float = 600.0) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """``bench/alt_ray_serve.py`` as a subprocess on a free 127.0.0.1 port; yields (url, pid, cleanup).

    Every descendant process Ray starts (raylet, GCS, workers, the replica) is recorded while it runs; after
    SIGTERM (serve.shutdown, ray.shutdown) ``cleanup`` is filled with any of them still alive, which are then
    sent SIGKILL by PID (``leftover_killed``)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    script = Path(__file__).with_name("alt_ray_serve.py")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), "--service", "nlp", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    cleanup: dict[str, Any] = {}
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + timeout_s
        while "READY" not in log.read_text(errors="replace"):
            seen |= descendants(proc.pid)
            if proc.poll() is not None:
                raise RuntimeError(f"Ray Serve exited with {proc.returncode}: {log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray Serve not ready after {timeout_s}s")
            time.sleep(0.5)
        seen |= descendants(proc.pid)
        yield f"http://127.0.0.1:{port}", proc.pid, cleanup
    finally:
        seen |= descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        time.sleep(1.0)
        left = alive(seen)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        cleanup.update({"processes_seen": len(seen), "leftover_killed": {str(k): v for k, v in left.items()}})


def ray_serve(clients: list[int], duration_s: float) -> dict[str, object]:
    """REST load against Ray Serve (``@serve.batch(32, 10 ms)``), or why it was skipped."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return {"skipped": "ray not installed (pip install -e '.[bench]')"}
    log = Path(tempfile.mkdtemp(prefix="aisemble-bench-")) / "ray-serve.log"
    out: dict[str, Any] = {"max_batch_size": 32, "batch_wait_timeout_ms": 10}
    try:
        with ray_serve_server(log) as (url, pid, cleanup):
            out["points"] = load_points(url, clients, duration_s, "ray-serve")
            out["peak_rss_mb_driver"] = peak_rss_mb(pid)
            out["rss_mb_all_processes"] = round(sum(rss_mb(p) or 0 for p in descendants(pid) | {pid}), 1)
    except (RuntimeError, TimeoutError) as exc:
        return {"skipped": f"Ray Serve did not start: {exc}"[:2000]}
    out["cleanup"] = cleanup
    return out


def f1(x: float) -> str:
    return f"{x:,.1f}"


def best_batch(alone: dict[str, Any]) -> tuple[int, float]:
    sizes = [(int(k.split("_")[1]), v["items_per_s"]) for k, v in alone.items() if k.startswith("batch_")]
    return max(sizes, key=lambda s: s[1])


def summary_md(result: dict[str, Any]) -> str:
    prof = result["profile"]
    lines = [
        f"# Benchmark suite ({result['profile_name']}, {result['machine']['when']})",  # type: ignore[index]
        "",
        f"Machine: {result['machine']['cpus']} CPUs, {result['machine']['platform']}. One run: every ratio below "
        "is between figures of this run. The load driver runs on the same CPUs as the servers.",
        "",
        "## Model alone (runner called in-process)",
        "",
        "| service (task) | batch 1 items/s | best batch | items/s | gain |",
        "|---|---|---|---|---|",
    ]
    for service, task in (("nlp", "embed"), ("data", "analyze")):
        alone = result["model_alone"][service]
        b1 = alone["batch_1"]["items_per_s"]
        size, rate = best_batch(alone)
        lines.append(f"| {service} ({task}) | {f1(b1)} | {size} | {f1(rate)} | {rate / b1:.2f}x |")
    lines += [
        "",
        f"## REST load: nlp `embed`, cache off, closed loop, {prof['duration_s']:.0f} s per point",
        "",
        "| clients | aisemble items/s | p50 ms | p99 ms | err | per-request items/s | p50 ms | p99 ms | err "
        "| aisemble / per-request |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ours, alt in zip(result["rest"]["aisemble"], result["rest"]["per_request"], strict=True):
        ratio = ours["items_per_s"] / alt["items_per_s"] if alt["items_per_s"] else float("nan")
        cells = [
            f"{p['items_per_s']:,.1f} | {p['latency_ms']['p50']:,.1f} | {p['latency_ms']['p99']:,.1f} | {p['errors']}"
            for p in (ours, alt)
        ]
        lines.append(f"| {ours['clients']} | {cells[0]} | {cells[1]} | **{ratio:.2f}x** |")
    ray = result["rest"]["ray_serve"]
    lines += ["", f"Ray Serve (`@serve.batch`): {ray.get('skipped', 'see suite.json')}."]
    cache = result["cache"]
    c1 = result["rest"]["aisemble"][0]["latency_ms"]["p50"]
    c64 = next((p for p in result["rest"]["aisemble"] if p["clients"] == 64), None)
    rep = cache["repeats_30pct"]
    lines += [
        "",
        "## Cache (nlp `embed`, edge)",
        "",
        "| what | figure |",
        "|---|---|",
        f"| hit, sequential, {cache['hit']['requests']} requests ({cache['hit']['hits']} hits) | p50 "
        f"{f1(cache['hit']['latency_ms']['p50'])} ms, p99 {f1(cache['hit']['latency_ms']['p99'])} ms "
        "(cache off, 1 client: "
        f"p50 {f1(c1)} ms) |",
        f"| 64 clients, 30% repeats, cache on | {f1(rep['items_per_s'])} items/s, {rep['cached']} hits, "
        f"p50 {f1(rep['latency_ms']['p50'])} ms"
        + (f" (cache off: {f1(c64['items_per_s'])} items/s)" if c64 else "")
        + " |",
    ]
    scale = result["scale"]
    rss = result["peak_rss_mb"]
    lines += [
        "",
        "## Scale",
        "",
        f"{scale['requests']} data `analyze` requests in flight at once at the edge: {scale['answered_200']} answered "
        f"200, {scale['errors']} errors (statuses {scale['statuses']}), all answered in {scale['seconds']} s, "
        f"p50 {f1(scale['latency_ms']['p50'])} ms, p99 {f1(scale['latency_ms']['p99'])} ms.",
        "",
        "Peak RSS (VmHWM, MiB) over the whole run: " + ", ".join(f"{name} {mb}" for name, mb in rss.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the long profile (make bench-full)")
    parser.add_argument("--summary-only", action="store_true", help="rewrite SUMMARY.md from suite.json, no run")
    args = parser.parse_args()
    if args.summary_only:
        (RESULTS / "SUMMARY.md").write_text(summary_md(orjson.loads((RESULTS / "suite.json").read_bytes())))
        return
    name = "full" if args.full else "quick"
    prof = PROFILES[name]
    started = time.perf_counter()
    result: dict[str, Any] = {"profile_name": name, "profile": prof}
    settings = base_settings()
    result["settings"] = {
        "nlp_max_batch": settings.nlp.max_batch,
        "nlp_max_wait_ms": settings.nlp.max_wait_ms,
        "data_max_batch": settings.data.max_batch,
        "max_in_flight": settings.max_in_flight,
    }

    print("== 1. model alone", flush=True)
    n = prof["model_items"]
    result["model_alone"] = {
        "nlp": model_alone("nlp", nlp_items(n, task="embed"), settings.nlp.max_batch, BATCHES["nlp"]),
        "data": model_alone("data", data_items(n), settings.data.max_batch, BATCHES["data"]),
    }
    print(result["model_alone"], flush=True)

    rss: dict[str, float | None] = {}
    rest: dict[str, Any] = {}
    with running_pipeline(["nlp", "data"]) as pipeline:
        print("== 3. REST load, aisemble", flush=True)
        rest["aisemble"] = load_points(pipeline.url, prof["clients"], prof["duration_s"], "aisemble")
        print("== 5. cache", flush=True)
        result["cache"] = {
            "hit": cache_hits(pipeline.url, prof["cache_n"]),
            "repeats_30pct": asyncio.run(
                closed_loop(pipeline.url, NLP_PATH, repeats_body(uuid.uuid4().hex[:8]), 64, prof["duration_s"])
            ),
        }
        print(result["cache"], flush=True)
        print("== 6. scale", flush=True)
        result["scale"] = asyncio.run(in_flight(pipeline.url, prof["in_flight"]))
        print(result["scale"], flush=True)
        for proc_name in ("edge", "nlp", "data"):
            rss[f"aisemble {proc_name}" if proc_name == "edge" else f"aisemble {proc_name} agent"] = peak_rss_mb(
                pipeline.procs[proc_name].pid
            )

    print("== 4a. REST load, per-request design", flush=True)
    log = Path(tempfile.mkdtemp(prefix="aisemble-bench-")) / "per-request.log"
    with per_request_server("nlp", log) as (url, pid):
        rest["per_request"] = load_points(url, prof["clients"], prof["duration_s"], "per-request")
        rss["per-request nlp server"] = peak_rss_mb(pid)
    rest["ray_serve"] = ray_serve(prof["clients"], prof["duration_s"])
    result["rest"] = rest
    result["peak_rss_mb"] = rss
    result["wall_s"] = round(time.perf_counter() - started, 1)

    out = write_result("suite", result)
    md = RESULTS / "SUMMARY.md"
    md.write_text(summary_md({**result, "machine": machine()}))
    print(md.read_text())
    print(f"-> {out}, {md} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
