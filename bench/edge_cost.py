"""What the edge itself costs per request: light work and a 1-client embed beside the per-request design, with
every process's CPU time per request and each Kafka hop, from one script in one run (issue #15, edge part).

    python bench/edge_cost.py [--duration 10] [--rounds 1] [--profile-s 8] [--out edge_cost]
    cd /tmp && python <checkout>/bench/edge_cost.py --baseline <another checkout>   # before/after in one run

One pipeline (edge, data agent, nlp agent with its default model) and the per-request design
(``bench/alt_per_request.py``, one FastAPI handler per request: a data server and an nlp server) run side by
side; the load points alternate between them (aisemble, then the per-request design, per point and round), so a
neighbour's load on a shared machine falls on both. The points, all closed loop with cache off:

* ``light_1`` / ``light_64``: ``POST /data/process``, ``analyze`` of 3 records, 1 and 64 clients;
* ``embed_1``: ``POST /ai/nlp/process``, MiniLM ``embed`` of a 9-to-15-word text, 1 client.

With ``--baseline <checkout>`` a third design, ``aisemble_baseline``, is a second pipeline running that
checkout's code (e.g. the commit before a change), measured in the same rotation: before and after from one
run, under the same neighbours (on a shared machine, runs minutes apart are not comparable).

The load driver is light and the same for every design: aiohttp, one session, bodies encoded once up front,
each answer's JSON read (for the hop split). Its own CPU share (process CPU seconds / wall seconds) is reported
per point, as is every server process's: ``cpu_us_per_request`` = (utime + stime from /proc/PID/stat, after -
before) / requests answered, for the edge, each agent and the per-request server; ``cpu_cores`` = the same
CPU time / wall time. The aisemble points also split each round trip into hops from the reply's
``timings_ms`` (as ``bench.floor``: ``http`` = round trip - edge_ms, ``to_agent`` = queue_ms, ``agent`` =
total_ms, ``back`` = the rest of edge_ms), beside a bare aiokafka produce-consume round trip (``bench.floor
.bare_kafka``) with the producer's linger at 1 ms (the edge's before) and 0 (its default now), alternated.
Then py-spy (``bench.profiling``, when installed) records the edge and the data agent under the 64-client
light load, and the top self-time functions are kept.

What can go wrong: /proc unreadable (not Linux) leaves CPU figures None; py-spy missing or not allowed to
attach leaves ``profile`` with the reason. Non-200 answers are counted in ``statuses``, never hidden. Every
process started is stopped by PID. CPU resolution is one clock tick (10 ms) per process per point, so a point
must answer a few hundred requests for the per-request figure to mean anything. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aisemble.pipeline import Pipeline
from bench.common import RESULTS, base_settings, running_pipeline, summary_ms, write_result
from bench.floor import HOPS, bare_kafka
from bench.profiling import recording
from bench.samples_nlp import EXPERIENCES, SUBJECTS

DATA_PATH = "/data/process"
NLP_PATH = "/ai/nlp/process"
VARIANTS = 256  # distinct bodies per point, encoded before the clock starts
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
Body = Callable[[int], bytes]


def light_body(i: int) -> bytes:
    """``analyze`` of 3 records, cache off (the issue's light work)."""
    records = [{"id": i, "value": i % 97, "category": "a"}, {"id": i + 1, "value": 3.5}, {"id": i + 2, "ok": True}]
    return orjson.dumps({"operation": "analyze", "data": {"records": records}, "cache": False})


def short_text(i: int) -> str:
    """A 9-to-15-word text (a subject and an experience of ``bench.samples_nlp``), distinct for i < 120."""
    return f"{SUBJECTS[i % len(SUBJECTS)]} {EXPERIENCES[(i // len(SUBJECTS)) % len(EXPERIENCES)]}".rstrip(",")


def embed_body(i: int) -> bytes:
    return orjson.dumps({"task": "embed", "text": short_text(i), "cache": False})


def cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) ``pid`` has used, from /proc; None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * TICK_S


def cpu_snapshot(pids: Mapping[str, int]) -> dict[str, float | None]:
    return {name: cpu_s(pid) for name, pid in pids.items()}


async def closed_loop(
    url: str, path: str, body: Body, clients: int, duration_s: float, pids: Mapping[str, int]
) -> dict[str, Any]:
    """``clients`` aiohttp loops, each sending its next request once the last is answered, for ``duration_s``;
    the CPU every process of ``pids`` and this driver used meanwhile (see the module docstring)."""
    bodies = [body(i) for i in range(VARIANTS)]
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    hops: dict[str, list[float]] = {h: [] for h in HOPS}
    statuses: Counter[int] = Counter()
    counter = itertools.count()
    connector = aiohttp.TCPConnector(limit=clients + 8)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout) as http:

        async def post() -> tuple[int, bytes]:
            async with http.post(path, data=bodies[next(counter) % VARIANTS], headers=headers) as response:
                return response.status, await response.read()

        await asyncio.gather(*(post() for _ in range(clients)))  # open every connection, warm the path
        await asyncio.gather(*(post() for _ in range(clients)))
        end = time.perf_counter() + duration_s

        async def client() -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    status, raw = await post()
                except (aiohttp.ClientError, TimeoutError):
                    statuses[-1] += 1
                    continue
                rtt = (time.perf_counter() - t0) * 1000
                statuses[status] += 1
                if status != 200:
                    continue
                latencies.append(rtt)
                t = orjson.loads(raw).get("timings_ms") or {}
                if "edge_ms" in t:
                    edge, queue, total = float(t["edge_ms"]), float(t.get("queue_ms", 0)), float(t.get("total_ms", 0))
                    for hop, ms in zip(HOPS, (rtt - edge, queue, total, edge - queue - total), strict=True):
                        hops[hop].append(ms)

        before, driver0, wall0 = cpu_snapshot(pids), time.process_time(), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        after, driver1, wall = cpu_snapshot(pids), time.process_time(), time.perf_counter() - wall0
    ok = statuses.get(200, 0)
    cpu: dict[str, dict[str, float | None]] = {}
    for name in pids:
        b, a = before[name], after[name]
        used = None if a is None or b is None else a - b
        cpu[name] = {
            "cpu_us_per_request": round(used / ok * 1e6, 1) if used is not None and ok else None,
            "cpu_cores": round(used / wall, 3) if used is not None else None,
        }
    out: dict[str, Any] = {
        "clients": clients,
        "seconds": round(wall, 3),
        "answered_200": ok,
        "errors": sum(statuses.values()) - ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "requests_per_s": round(ok / wall, 2),
        "latency_ms": summary_ms(latencies),
        "cpu": cpu,
        "driver_cpu_cores": round((driver1 - driver0) / wall, 3),
    }
    if hops["http"]:
        out["hops_p50_ms"] = {h: summary_ms(v)["p50"] for h, v in hops.items()}
    return out


class _StubEdge:
    """What the routes read of ``api.edge.Edge``, answering every call at once (``http_layer``)."""

    def __init__(self) -> None:
        from api.guards import InFlightLimit, PendingPerOwner
        from streams.settings import Settings

        self.settings = Settings()
        self.in_flight = InFlightLimit(self.settings.max_in_flight)
        self.pending_async = PendingPerOwner(self.settings.max_pending_async_per_key)
        self.models: dict[str, dict[str, str]] = {}

    async def call(self, service: str, task: str, payload: dict[str, object], **options: Any) -> Any:
        from schemas import ReplyEvent

        return ReplyEvent(id=options.get("request_id") or "r", service=service, task=task, ok=True,  # type: ignore[arg-type]
                          output={"count": len(payload)}, timings_ms={"queue_ms": 1.0, "edge_ms": 2.0})  # fmt: skip


async def _http_layer(n: int) -> float:
    from api.app import create_app

    app = create_app()
    app.state.edge = _StubEdge()
    body = light_body(0)
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), (b"user-agent", b"bench")]  # fmt: skip
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": DATA_PATH, "raw_path": DATA_PATH.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "app": app}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    statuses: Counter[int] = Counter()

    async def send(message: Mapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses[message["status"]] += 1

    for i in range(n + 200):  # the first 200 warm up
        if i == 200:
            t0 = time.process_time()
        await app(dict(scope, state={}), receive, send)
    if set(statuses) != {200}:
        raise RuntimeError(f"the stub edge answered {dict(statuses)}")
    return (time.process_time() - t0) / n * 1e6


def http_layer(n: int = 3000) -> dict[str, Any]:
    """CPU us per ``POST /data/process`` through the edge's whole ASGI app (middleware, routing, validation,
    dependencies, the response) with an edge that answers at once: the HTTP layer's cost alone, without a
    server, a socket, Kafka or a driver (the same process, so no neighbour's load but the machine's)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"requests": n, "cpu_us_per_request": round(asyncio.run(_http_layer(n)), 1)}


POINTS: dict[str, tuple[str, Body, int]] = {
    "light_1": (DATA_PATH, light_body, 1),
    "light_64": (DATA_PATH, light_body, 64),
    "embed_1": (NLP_PATH, embed_body, 1),
}


@contextlib.contextmanager
def baseline_pipeline(root: Path | None, log_dir: Path) -> Iterator[Pipeline | None]:
    """A second pipeline (data + nlp) running the code of another checkout at ``root`` (its modules first on
    ``PYTHONPATH``), or None without ``root``. Run this script from a directory that holds no ``aisemble``
    package (e.g. /tmp): ``python -m`` puts the working directory ahead of ``PYTHONPATH``."""
    if root is None:
        yield None
        return
    if (Path.cwd() / "aisemble").is_dir():
        raise RuntimeError("--baseline needs a working directory without an aisemble package (cd /tmp)")
    pipeline = Pipeline.isolated(base_settings(), ["data", "nlp"], log_dir, PYTHONPATH=str(root.resolve()))
    try:
        yield pipeline.start()
    finally:
        pipeline.stop()
        pipeline.drop_topics()


@contextlib.contextmanager
def per_request_servers(log_dir: Path) -> Iterator[dict[str, tuple[str, int]]]:
    """The per-request design's data and nlp servers (``bench/alt_per_request.py``): service -> (url, pid)."""
    from bench.suite import per_request_server  # suite imports this module: import it late

    with (
        per_request_server("data", log_dir / "per-request-data.log") as data,
        per_request_server("nlp", log_dir / "per-request-nlp.log") as nlp,
    ):
        yield {"data": data, "nlp": nlp}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def compare(points: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per point, the best round of each design (highest requests/s) and the targets' ratios."""
    out: dict[str, Any] = {}
    for name, designs in points.items():
        best = {d: max(runs, key=lambda r: r["requests_per_s"]) for d, runs in designs.items() if runs}
        a, p, b = best.get("aisemble"), best.get("per_request"), best.get("aisemble_baseline")
        if a is None or p is None:
            continue
        if b is not None:
            out[f"{name}_baseline"] = {
                "aisemble_rps": b["requests_per_s"],
                "rps_ratio": ratio(b["requests_per_s"], p["requests_per_s"]),
                "aisemble_p50_ms": b["latency_ms"]["p50"],
                "p50_ratio": ratio(b["latency_ms"]["p50"], p["latency_ms"]["p50"]),
            }
        out[name] = {
            "aisemble_rps": a["requests_per_s"],
            "per_request_rps": p["requests_per_s"],
            "rps_ratio": ratio(a["requests_per_s"], p["requests_per_s"]),
            "aisemble_p50_ms": a["latency_ms"]["p50"],
            "per_request_p50_ms": p["latency_ms"]["p50"],
            "p50_ratio": ratio(a["latency_ms"]["p50"], p["latency_ms"]["p50"]),
        }
    return out


def run(
    duration_s: float = 10.0,
    rounds: int = 1,
    profile_s: float = 8.0,
    bare_n: int = 300,
    profile_dir: Path = RESULTS / "profile",
    baseline: Path | None = None,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Every point, alternating aisemble and the per-request design (and ``aisemble_baseline``, the code at
    ``baseline``, when given), then the profiles (py-spy files under ``profile_dir``); see the module."""
    log_dir = Path(tempfile.mkdtemp(prefix="aisemble-edge-cost-"))
    result: dict[str, Any] = {"duration_s": duration_s, "rounds": rounds, "driver": f"aiohttp {aiohttp.__version__}"}
    designs = ["aisemble", *(["aisemble_baseline"] if baseline else []), "per_request"]
    chosen = {name: spec for name, spec in POINTS.items() if not only or name in only}
    points: dict[str, dict[str, list[dict[str, Any]]]] = {p: {d: [] for d in designs} for p in chosen}
    result["http_layer"] = [http_layer() for _ in range(3)]  # best of three: the least a neighbour added
    if baseline is not None:
        result["baseline"] = str(baseline)
    with (
        running_pipeline(["data", "nlp"]) as pipeline,
        baseline_pipeline(baseline, log_dir) as before,
        per_request_servers(log_dir) as alt,
    ):
        ours = {"edge": pipeline.procs["edge"].pid, **{f"{s}_agent": pipeline.procs[s].pid for s in ("data", "nlp")}}
        theirs = {f"per_request_{s}": pid for s, (_, pid) in alt.items()}
        olds = {} if before is None else {f"baseline_{n}": before.procs[n].pid for n in ("edge", "data", "nlp")}
        every = {**ours, **olds, **theirs}  # idle ones too: what they cost while another design is measured
        for r in range(rounds):
            for name, (path, body, clients) in chosen.items():
                alt_url = alt["nlp" if path == NLP_PATH else "data"][0]
                urls = {"aisemble": pipeline.url, "per_request": alt_url}
                if before is not None:
                    urls["aisemble_baseline"] = before.url
                for design in designs:
                    point = asyncio.run(closed_loop(urls[design], path, body, clients, duration_s, every))
                    point["round"] = r
                    points[name][design].append(point)
                    print(
                        f"{name:>9} {design:>11}: {point['requests_per_s']:>8} req/s, p50 "
                        f"{point['latency_ms']['p50']} ms, edge "
                        f"{point['cpu']['edge']['cpu_us_per_request']} us/req, driver {point['driver_cpu_cores']} "
                        f"cores, errors {point['errors']}",
                        flush=True,
                    )
        result["points"] = points
        result["compare"] = compare(points)
        profiles: dict[str, Any] = {}
        targets = [("edge-light", ours["edge"], pipeline.url), ("data-agent-light", ours["data_agent"], pipeline.url)]
        if before is not None:
            targets.append(("baseline-edge-light", olds["baseline_edge"], before.url))
        for label, pid, url in targets:
            with recording(pid, label, profile_s, profile_dir) as rec:
                rec["load"] = asyncio.run(closed_loop(url, DATA_PATH, light_body, 64, profile_s, every))
            profiles[label] = rec
        result["profile"] = profiles
    # The edge's producer linger, before (1 ms) and now (AISEMBLE_EDGE_LINGER_MS, default 0), alternated.
    bare: dict[str, list[dict[str, object]]] = {"linger_1": [], "linger_0": []}
    for _ in range(2):
        for linger in (1, 0):
            bare[f"linger_{linger}"].append(asyncio.run(bare_kafka(base_settings(), bare_n // 2, linger)))
    result["bare_kafka"] = bare
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    parser.add_argument("--rounds", type=int, default=1, help="how often every point runs (best round kept)")
    parser.add_argument("--profile-s", type=float, default=8.0)
    parser.add_argument("--bare", type=int, default=300, help="bare aiokafka round trips")
    parser.add_argument("--out", default="edge_cost", help="bench/results/<out>.json")
    parser.add_argument("--http-only", action="store_true", help="only the in-process HTTP layer figure")
    parser.add_argument("--baseline", type=Path, help="also run a pipeline of the checkout at this path (before)")
    parser.add_argument("--points", help=f"comma-separated subset of {','.join(POINTS)}")
    args = parser.parse_args()
    if args.http_only:
        print(orjson.dumps([http_layer() for _ in range(3)]).decode())
        return
    only = args.points.split(",") if args.points else None
    result = run(args.duration, args.rounds, args.profile_s, args.bare, baseline=args.baseline, only=only)
    print(orjson.dumps(result.get("compare"), option=orjson.OPT_INDENT_2).decode())
    print(write_result(args.out, result))


if __name__ == "__main__":
    main()
