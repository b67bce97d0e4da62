"""LLM serving figures in the field's terms (issue #17): TTFT, ITL, TPOT, end-to-end latency, output tokens/s and
goodput, through a streaming OpenAI ``/v1/chat/completions``, as vLLM's ``vllm bench serve``, NVIDIA's AIPerf
and GuideLLM report them.

    python bench/llm_serve.py                      # an isolated pipeline (edge + llm agent), the quick profile
    python bench/llm_serve.py --url http://127.0.0.1:8080 --goodput ttft:500 tpot:100
    python bench/llm_serve.py --with-llama-server  # the same driver against llama.cpp's llama-server too
    aisemble bench llm [--url URL] [--goodput ...] [--concurrency 1,4,8] [--rates 0.5,1] [--duration S]

The driver (:func:`run_point`) is one asyncio process with one aiohttp session; its CPU share (its CPU time /
wall / CPUs) is reported with every point, as it shares the machine with the server. Each request is one user
message, ``temperature`` 0, ``stream: true`` with ``stream_options.include_usage``, and vLLM's ``ignore_eos``
with ``max_tokens`` = ``min_tokens`` = the output length (default :data:`OUTPUT_TOKENS`), so every answer is
that long whatever the model would have said. Two prompt sets: ``short`` (``bench.samples_llm.PROMPTS``,
one-line questions) and ``long`` (:func:`long_prompts`, a few hundred tokens of text each). Every request's
message starts with its own number (:func:`unique_prompt`), so no server's prefix or prompt cache answers its
prefill from an earlier request (as vLLM's random dataset): the figures are those of new conversations.

Two kinds of load point:

* fixed concurrency ``c``: ``c`` loops, each sending its next request when the previous one has ended, until
  ``duration_s`` has passed (requests still running then are waited for);
* request rate ``r`` (req/s): ``round(r * duration_s)`` requests (at least 1, at most :data:`MAX_REQUESTS`)
  sent at Poisson arrivals (exponential gaps of mean ``1/r``, :func:`poisson_schedule`, reproducible from
  ``--seed``), none waiting for another, as ``vllm bench serve --request-rate r``.

Every point is bounded: each request by :data:`REQUEST_TIMEOUT_S`, the whole point by ``duration_s`` +
``drain_s`` (:data:`DRAIN_S`; 20 s in the quick profile, so make bench's section stays within about 3 minutes
even when every point stalls): requests still running then are cancelled and counted in ``unfinished``.

Per request, from a timeline of the SSE chunks (:func:`request_metrics`; times from the moment it was sent):

* TTFT: to the first chunk carrying content (the opening ``{"role": "assistant", "content": ""}`` chunk of
  our route is not a token: vLLM's own client counts from the first chunk with ``choices``, which on our route
  is earlier than any token);
* ITL: the gaps between successive content chunks, one per chunk after the first, as vLLM's
  ``benchmark_serving`` does: a chunk that carries k tokens (a held-back stop-string prefix, a UTF-8 character
  split over tokens) is one gap, not k; ITL percentiles are over every gap of every request of the point;
* TPOT: (e2e - TTFT) / (output tokens - 1), requests of one token left out (vLLM's convention);
* e2e: to the end of the stream (``[DONE]``);
* output tokens: ``usage.completion_tokens`` of the usage chunk; when a server sends none, the number of
  content chunks (listed under ``problems`` once).

Per point: p50/p90/p99 (and mean) of each of the four, output tokens/s (all output tokens / the point's wall
time from its first send to its last answer), requests/s (completed requests / wall), goodput (completed
requests meeting every SLO of ``--goodput`` / wall; :func:`parse_slos`: ``ttft``, ``tpot``, ``itl`` (every
gap of the request), ``e2el``, in ms), errors (non-200 statuses, transport errors, an error event in the
stream) and the driver's CPU share.

What can go wrong: on 2 shared cores the driver's own CPU and whatever else runs lower the figures (the driver's
share and the 1-minute load average are reported); a server that ignores ``ignore_eos`` gives shorter answers,
which ``output_tokens`` per request shows. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, summary_ms, write_result
from bench.samples_llm import PROMPTS

PATH = "/v1/chat/completions"
OUTPUT_TOKENS = 64
REQUEST_TIMEOUT_S = 300.0
DRAIN_S = 60.0
MAX_REQUESTS = 2000
SLO_METRICS = ("ttft", "tpot", "itl", "e2el")
PROFILES: dict[str, dict[str, Any]] = {
    # smoke: a few seconds, one point of each kind (checks that everything runs; figures meaningless)
    "smoke": {"duration_s": 3.0, "output_tokens": 8, "sets": {"short": {"concurrency": [1], "rates": [1.0]}}},
    # quick: make bench's section (under ~2 minutes on 2 cores)
    "quick": {
        "duration_s": 10.0, "output_tokens": 32, "drain_s": 20.0,
        "sets": {"short": {"concurrency": [1, 4], "rates": [0.5, 1.0]}, "long": {"concurrency": [4], "rates": []}},
    },
    # default: `aisemble bench llm` and `python bench/llm_serve.py` without a profile
    "default": {
        "duration_s": 20.0, "output_tokens": OUTPUT_TOKENS,
        "sets": {
            "short": {"concurrency": [1, 4, 8], "rates": [0.25, 0.5, 1.0]},
            "long": {"concurrency": [1, 4, 8], "rates": [0.25, 0.5, 1.0]},
        },
    },
}  # fmt: skip
DEFAULT_SLOS = ("ttft:500", "tpot:100")

_LONG_TEXT = (
    "Apache Kafka is a distributed event streaming platform. Producers append records to topics, which are split "
    "into partitions; each partition is an ordered, immutable log replicated across brokers. Consumers read the "
    "log at their own pace and commit the offsets they have processed, so a consumer that restarts resumes where "
    "it left off. Consumer groups share the partitions of a topic among their members, and a rebalance moves "
    "partitions when members join or leave. Because the log is kept for a configured time, several applications "
    "can read the same records independently, and a new application can replay history. Redis, by contrast, is "
    "an in-memory data store: strings, hashes, lists and sorted sets with commands that run in microseconds, "
    "often used as a cache in front of slower systems, with expiry times on keys. A serving pipeline that puts "
    "model inference behind Kafka gains durable requests, back-pressure and horizontal scaling by partition, at "
    "the cost of a few milliseconds per hop; a cache in Redis answers repeated requests without running the "
    "model at all. "
)
_LONG_ASKS = (
    "Summarise the text above in three sentences.",
    "List the main ideas of the text above.",
    "Explain the text above to a new engineer.",
    "What are the trade-offs described above?",
)


def long_prompts() -> tuple[str, ...]:
    """The ``long`` prompt set: the same ~250-token passage about Kafka and Redis, then one of four asks."""
    return tuple(f"{_LONG_TEXT}\n\n{ask}" for ask in _LONG_ASKS)


PROMPT_SETS: dict[str, tuple[str, ...]] = {"short": PROMPTS, "long": long_prompts()}


# --- pure parts -------------------------------------------------------------------------------------------


class ServerUnavailable(RuntimeError):
    """A server this bench would start is not there (llama-server not built, the GGUF missing): a skipped line."""


class SloError(ValueError):
    """A ``--goodput`` spec that cannot be read; the message names it and what is expected."""


def parse_slos(specs: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:100"]`` -> ``{"ttft": 500.0, "tpot": 100.0}`` (ms); :class:`SloError` otherwise."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        name = name.strip().lower()
        if not sep:
            raise SloError(f"goodput SLO {spec!r}: expected METRIC:MS, e.g. ttft:500")
        if name not in SLO_METRICS:
            raise SloError(f"goodput SLO {spec!r}: unknown metric {name!r}; expected one of {', '.join(SLO_METRICS)}")
        if name in slos:
            raise SloError(f"goodput SLO {spec!r}: {name} given twice")
        try:
            ms = float(value)
        except ValueError:
            raise SloError(f"goodput SLO {spec!r}: {value!r} is not a number of milliseconds") from None
        if not math.isfinite(ms) or ms <= 0:
            raise SloError(f"goodput SLO {spec!r}: the bound must be a positive number of milliseconds")
        slos[name] = ms
    return slos


def poisson_schedule(rate: float, count: int, seed: int) -> list[float]:
    """Send times (s from the start) of ``count`` requests at Poisson arrivals of ``rate`` req/s (exponential
    gaps, the first one included); the same ``seed`` gives the same schedule."""
    if rate <= 0:
        raise ValueError(f"a request rate must be positive, not {rate}")
    rng = random.Random(seed)
    times: list[float] = []
    at = 0.0
    for _ in range(count):
        at += rng.expovariate(rate)
        times.append(at)
    return times


@dataclass
class Timeline:
    """One request as the driver saw it: times in seconds from its send."""

    chunks: list[float] = field(default_factory=list)  # arrival of each chunk carrying content
    end: float | None = None  # the end of the stream ([DONE]); None: it did not end
    usage_tokens: int | None = None  # usage.completion_tokens, when the server sent it
    status: int = 0  # HTTP status; -1 transport error or timeout
    error: str | None = None  # why it failed (status, transport, an error event in the stream)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.end is not None and bool(self.chunks)


@dataclass(frozen=True)
class RequestMetrics:
    """The figures of one completed request, in ms (``tpot`` None for a one-token answer)."""

    ttft: float
    itl: tuple[float, ...]
    tpot: float | None
    e2el: float
    output_tokens: int


def request_metrics(timeline: Timeline) -> RequestMetrics | None:
    """TTFT, ITL, TPOT and e2e of a completed request (see the module docstring); None for a failed one."""
    if not timeline.ok or timeline.end is None:
        return None
    ms = [t * 1000.0 for t in timeline.chunks]
    e2el = timeline.end * 1000.0
    tokens = timeline.usage_tokens if timeline.usage_tokens is not None else len(ms)
    gaps = tuple(later - earlier for earlier, later in itertools.pairwise(ms))
    tpot = (e2el - ms[0]) / (tokens - 1) if tokens > 1 else None
    return RequestMetrics(ttft=ms[0], itl=gaps, tpot=tpot, e2el=e2el, output_tokens=tokens)


def meets(metrics: RequestMetrics, slos: Mapping[str, float]) -> bool:
    """Whether one request meets every SLO (ms); a one-token answer has no TPOT and meets that one."""
    checks = {
        "ttft": metrics.ttft,
        "tpot": metrics.tpot or 0.0,
        "itl": max(metrics.itl, default=0.0),
        "e2el": metrics.e2el,
    }
    return all(checks[name] <= bound for name, bound in slos.items())


def point_figures(
    timelines: Sequence[Timeline],
    wall_s: float,
    slos: Mapping[str, float],
    driver_cpu_s: float,
    cpus: int,
    unfinished: int = 0,
) -> dict[str, Any]:
    """The figures of one load point from its requests' timelines (see the module docstring)."""
    done = [m for m in (request_metrics(t) for t in timelines) if m is not None]
    tokens = sum(m.output_tokens for m in done)
    good = sum(meets(m, slos) for m in done)
    per_s = (lambda x: round(x / wall_s, 3)) if wall_s > 0 else (lambda x: 0.0)
    return {
        "seconds": round(wall_s, 3),
        "requests": len(timelines) + unfinished,
        "completed": len(done),
        "errors": len(timelines) - len(done),
        "unfinished": unfinished,
        "output_tokens": tokens,
        "output_tokens_per_request": sorted({m.output_tokens for m in done}),
        "output_tokens_per_s": per_s(tokens),
        "requests_per_s": per_s(len(done)),
        "goodput_requests_per_s": per_s(good),
        "slo_met": good,
        "ttft_ms": summary_ms([m.ttft for m in done]),
        "itl_ms": summary_ms([gap for m in done for gap in m.itl]),
        "tpot_ms": summary_ms([m.tpot for m in done if m.tpot is not None]),
        "e2el_ms": summary_ms([m.e2el for m in done]),
        "driver_cpu_share": round(driver_cpu_s / wall_s / cpus, 4) if wall_s > 0 and cpus > 0 else None,
    }


def unique_prompt(prompts: Sequence[str], i: int) -> str:
    """Request ``i``'s message: prompt ``i`` of the cycled set, after the request's number, so that no two
    requests share more than a few tokens of prefix (a prompt cache cannot skip their prefill)."""
    return f"Request {i}. {prompts[i % len(prompts)]}"


def chat_body(prompt: str, output_tokens: int, model: str) -> dict[str, object]:
    """One streamed, greedy request whose answer is exactly ``output_tokens`` long (vLLM's ``ignore_eos``)."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": output_tokens,
        "min_tokens": output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def read_event(data: bytes, timeline: Timeline, at: float) -> bool:
    """Fold one SSE ``data:`` payload arriving at ``at`` into ``timeline``; True at ``[DONE]``."""
    if data == b"[DONE]":
        timeline.end = at
        return True
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        timeline.error = f"not JSON in the stream: {data[:200]!r}"
        return False
    if not isinstance(event, dict):
        return False
    if "error" in event:
        timeline.error = f"error event: {str(event['error'])[:300]}"
        return False
    usage = event.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        timeline.usage_tokens = usage["completion_tokens"]
    choices = event.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta")
        content = delta.get("content") if isinstance(delta, dict) else choices[0].get("text")
        if isinstance(content, str) and content:
            timeline.chunks.append(at)
    return False


# --- the driver ---------------------------------------------------------------------------------------------


async def stream_one(http: Any, body: bytes) -> Timeline:
    """Send one request on the aiohttp session ``http`` and time its SSE chunks."""
    import aiohttp

    timeline = Timeline()
    t0 = time.perf_counter()
    try:
        async with http.post(PATH, data=body, headers={"Content-Type": "application/json"}) as resp:
            timeline.status = resp.status
            if resp.status != 200:
                timeline.error = f"status {resp.status}: {(await resp.read())[:200]!r}"
                return timeline
            async for line in resp.content:
                at = time.perf_counter() - t0
                line = line.strip()
                if line.startswith(b"data:") and read_event(line[5:].strip(), timeline, at):
                    break
            if timeline.end is None and timeline.error is None:
                timeline.error = "the stream ended without [DONE]"
    except (aiohttp.ClientError, TimeoutError) as exc:
        timeline.status, timeline.error = -1, f"{type(exc).__name__}: {exc}"[:300]
    return timeline


@dataclass
class Load:
    """One load point: ``concurrency`` loops for ``duration_s``, or Poisson arrivals at ``rate`` req/s."""

    prompts: Sequence[str]
    output_tokens: int
    duration_s: float
    concurrency: int | None = None
    rate: float | None = None
    seed: int = 0
    model: str = "llm"
    drain_s: float = DRAIN_S

    def body(self, i: int) -> bytes:
        return orjson.dumps(chat_body(unique_prompt(self.prompts, i), self.output_tokens, self.model))


async def run_point(url: str, load: Load, slos: Mapping[str, float]) -> dict[str, Any]:
    """One load point against ``url``; its figures (:func:`point_figures`) and what it was."""
    import aiohttp  # imported here so that the pure parts need it not

    timelines: list[Timeline] = []
    problems: list[str] = []
    width = load.concurrency or 64
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=width + 4)
    async with aiohttp.ClientSession(base_url=url, timeout=timeout, connector=connector) as http:
        warm = await stream_one(http, load.body(0))  # unmeasured: connection, path, model warm
        if not warm.ok:
            problems.append(f"warm-up request: {warm.error}")
        counter = iter(range(1, MAX_REQUESTS + 1))
        tasks: list[asyncio.Task[None]] = []

        async def send(i: int) -> None:
            timelines.append(await stream_one(http, load.body(i)))

        load0 = os.getloadavg()[0]
        cpu0 = time.process_time()
        start = time.perf_counter()
        if load.concurrency is not None:
            end = start + load.duration_s

            async def loop() -> None:
                for i in counter:
                    if time.perf_counter() >= end:
                        return
                    await send(i)

            tasks = [asyncio.create_task(loop()) for _ in range(load.concurrency)]
        else:
            assert load.rate is not None
            count = max(1, min(MAX_REQUESTS, round(load.rate * load.duration_s)))
            schedule = poisson_schedule(load.rate, count, load.seed)

            async def at(offset: float, i: int) -> None:
                await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
                await send(i)

            tasks = [asyncio.create_task(at(offset, i)) for i, offset in enumerate(schedule, start=1)]
        _, pending = await asyncio.wait(tasks, timeout=load.duration_s + load.drain_s)
        for task in pending:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu0
    unfinished = len(pending)  # a cancelled task had one request in flight (a loop) or not yet answered
    for t in timelines:
        if t.error and len(problems) < 5:
            problems.append(t.error)
    if any(t.ok and t.usage_tokens is None for t in timelines):
        problems.append("no usage chunk: output tokens counted as content chunks")
    figures = point_figures(timelines, wall, slos, cpu, os.cpu_count() or 1, unfinished)
    kind = {"concurrency": load.concurrency} if load.concurrency is not None else {"rate": load.rate}
    loadavg = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return {**kind, **figures, "loadavg_1m": loadavg, "problems": problems}


def sweep(
    url: str,
    sets: Mapping[str, Mapping[str, Sequence[float]]],
    slos: Mapping[str, float],
    duration_s: float,
    output_tokens: int,
    seed: int = 0,
    model: str = "llm",
    label: str = "",
    drain_s: float = DRAIN_S,
) -> dict[str, Any]:
    """Every point of ``sets`` (``{prompt set: {"concurrency": [...], "rates": [...]}}``) against ``url``."""
    out: dict[str, Any] = {}
    for name, points in sets.items():
        prompts = PROMPT_SETS[name]
        results: list[dict[str, Any]] = []
        for c in points.get("concurrency", []):
            load = Load(prompts, output_tokens, duration_s, int(c), None, seed, model, drain_s)
            results.append(asyncio.run(run_point(url, load, slos)))
            _progress(label, name, results[-1])
        for r in points.get("rates", []):
            load = Load(prompts, output_tokens, duration_s, None, float(r), seed, model, drain_s)
            results.append(asyncio.run(run_point(url, load, slos)))
            _progress(label, name, results[-1])
        out[name] = results
    return out


def _progress(label: str, prompts: str, point: Mapping[str, Any]) -> None:
    sys.stderr.write(f"{label}{prompts} {_load(point)}: {point['output_tokens_per_s']} tok/s, "
                     f"goodput {point['goodput_requests_per_s']} req/s, errors {point['errors']}\n")  # fmt: skip
    sys.stderr.flush()


def _load(point: Mapping[str, Any]) -> str:
    return f"c={point['concurrency']}" if point.get("concurrency") is not None else f"{point.get('rate')} req/s"


# --- the table ----------------------------------------------------------------------------------------------


def _ms(summary: Any, key: str) -> str:
    x = summary.get(key) if isinstance(summary, dict) else None
    return "—" if not isinstance(x, int | float) or math.isnan(x) else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def table(result: Mapping[str, Any]) -> str:
    """A markdown table of every line (server) and point of a result of :func:`run`."""
    slos = result.get("slos") or {}
    goal = ", ".join(f"{k} ≤ {v:g} ms" for k, v in slos.items()) or "none"
    lines = [
        f"Output {result.get('output_tokens')} tokens (ignore_eos), streamed /v1/chat/completions, "
        f"{result.get('duration_s')} s a point; goodput SLOs: {goal}. Times in ms: p50 / p90 / p99.",
        "",
        "| server | prompts | load | TTFT | ITL | TPOT | e2e | out tok/s | req/s | goodput req/s | err | driver CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for server, line in (result.get("lines") or {}).items():
        if not isinstance(line, dict) or "points" not in line:
            why = line.get("failed") or line.get("skipped") if isinstance(line, dict) else "not run"
            lines.append(f"| {server} | — | {' '.join(str(why).split())[:200]} |" + " |" * 9)
            continue
        for prompts, points in line["points"].items():
            for p in points:
                cells = [
                    "/".join(_ms(p.get(k), q) for q in ("p50", "p90", "p99"))
                    for k in ("ttft_ms", "itl_ms", "tpot_ms", "e2el_ms")
                ]
                share = p.get("driver_cpu_share")
                lines.append(
                    f"| {server} | {prompts} | {_load(p)} | {' | '.join(cells)} | {p['output_tokens_per_s']} | "
                    f"{p['requests_per_s']} | {p['goodput_requests_per_s']} | {p['errors'] + p['unfinished']} | "
                    f"{'—' if share is None else f'{share:.1%}'} |"
                )
    return "\n".join(lines) + "\n"


def summary_rows(result: Mapping[str, Any]) -> list[str]:
    """SUMMARY.md's section 12 (``bench.summary`` calls it) from the suite's ``llm_serve`` entry."""
    section = result.get("llm_serve")
    lines = ["## 12. LLM serving figures (TTFT, ITL, TPOT, e2e, goodput; bench.llm_serve)", ""]
    if not isinstance(section, dict) or "lines" not in section:
        why = next((f"{k}: {section[k]}" for k in ("failed", "skipped") if k in section), "not run") if isinstance(
            section, dict) else "not run"  # fmt: skip
        return [*lines, " ".join(str(why).split())[:300], ""]
    return [*lines, table(section), ""]


# --- servers --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def aisemble_server() -> Iterator[str]:
    """An isolated pipeline (Kafka and Redis started if needed, the edge and the llm agent); yields its URL."""
    from bench.common import running_pipeline

    with running_pipeline(["llm"]) as pipeline:
        yield pipeline.url


@contextlib.contextmanager
def llama_server() -> Iterator[str]:
    """llama.cpp's llama-server on the shipped GGUF (as ``bench.llm_server`` starts it); :class:`ServerUnavailable`
    when the binary is not built (``make llama-server``) or the GGUF is missing. Stopped by PID afterwards."""
    from bench.llm_server import (
        Tracked,
        _free_port,
        find_gguf,
        llama_server_command,
        reap_leftovers,
        subprocess_server,
    )
    from infra.llama_server import build_paths, cached_binary

    binary, gguf = cached_binary(build_paths()), find_gguf()
    if binary is None or gguf is None:
        raise ServerUnavailable("llama-server is not built (make llama-server) or the shipped GGUF is missing")
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60).stdout
    port = _free_port()
    log = Path(tempfile.mkdtemp(prefix="aisemble-bench-llm-serve-")) / "llama-server.log"
    tracked = Tracked()
    url = f"http://127.0.0.1:{port}"
    try:
        with subprocess_server(llama_server_command(binary, gguf, port, help_text), f"{url}/health", log, tracked):
            yield url
    finally:
        reap_leftovers(tracked.pids)


def run(
    url: str | None = None,
    profile: str = "default",
    slo_specs: Sequence[str] = DEFAULT_SLOS,
    concurrency: Sequence[int] | None = None,
    rates: Sequence[float] | None = None,
    duration_s: float | None = None,
    output_tokens: int | None = None,
    prompt_sets: Sequence[str] | None = None,
    seed: int = 0,
    model: str = "llm",
    with_llama_server: bool = False,
) -> dict[str, Any]:
    """The whole bench: against ``url``, or an isolated aisemble pipeline when None (and llama-server too with
    ``with_llama_server``). ``concurrency``/``rates``/``prompt_sets`` replace the profile's points."""
    slos = parse_slos(slo_specs)
    prof = PROFILES[profile]
    duration = float(duration_s if duration_s is not None else prof["duration_s"])
    tokens = int(output_tokens if output_tokens is not None else prof["output_tokens"])
    drain = float(prof.get("drain_s", DRAIN_S))
    names = list(prompt_sets) if prompt_sets is not None else list(prof["sets"])
    unknown = [n for n in names if n not in PROMPT_SETS]
    if unknown:
        raise ValueError(f"unknown prompt set(s) {unknown}; expected {', '.join(PROMPT_SETS)}")
    sets: dict[str, dict[str, list[float]]] = {}
    for name in names:
        base = prof["sets"].get(name) or next(iter(prof["sets"].values()))
        sets[name] = {
            "concurrency": list(concurrency) if concurrency is not None else list(base["concurrency"]),
            "rates": list(rates) if rates is not None else list(base["rates"]),
        }
    out: dict[str, Any] = {
        "profile": profile, "path": PATH, "output_tokens": tokens, "duration_s": duration, "slos": slos,
        "drain_s": drain, "seed": seed, "sets": sets, "lines": {},
    }  # fmt: skip
    servers: list[tuple[str, Any]] = []
    if url is not None:
        servers.append((url, contextlib.nullcontext(url)))
    else:
        servers.append(("aisemble", aisemble_server()))
        if with_llama_server:
            servers.append(("llama-server", llama_server()))
    for name, server in servers:
        try:
            with server as target:
                points = sweep(target, sets, slos, duration, tokens, seed, model, f"{name} ", drain)
                out["lines"][name] = {"url": target, "points": points}
        except ServerUnavailable as exc:
            out["lines"][name] = {"skipped": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one server that fails must not lose the others' figures
            out["lines"][name] = {"failed": f"{type(exc).__name__}: {exc}"[:3000]}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--url", help="an OpenAI-compatible server; default: an isolated aisemble pipeline")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--goodput", nargs="*", default=list(DEFAULT_SLOS), help="SLOs in ms, e.g. ttft:500 tpot:100")
    parser.add_argument("--concurrency", help="comma-separated, e.g. 1,4,8")
    parser.add_argument("--rates", help="comma-separated req/s, e.g. 0.5,1,2 (empty: none)")
    parser.add_argument("--duration", type=float, help="seconds per point")
    parser.add_argument("--output-tokens", type=int)
    parser.add_argument("--prompts", help="comma-separated prompt sets: short,long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="llm")
    parser.add_argument("--with-llama-server", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of llm_serve.json")
    args = parser.parse_args(argv)
    try:
        parse_slos(args.goodput)
        concurrency, rates = int_list(args.concurrency), float_list(args.rates)
        prompts = None if args.prompts is None else [p for p in args.prompts.split(",") if p]
        for name in prompts or []:
            if name not in PROMPT_SETS:
                raise ValueError(f"unknown prompt set {name!r}; expected {', '.join(PROMPT_SETS)}")
    except ValueError as exc:
        parser.error(str(exc))
    result = run(
        args.url, args.profile, args.goodput, concurrency, rates, args.duration, args.output_tokens, prompts,
        args.seed, args.model, args.with_llama_server,
    )  # fmt: skip
    path = write_result("llm_serve", result, args.out)
    sys.stdout.write(table(result) + f"\n{path}\n")
    return 0


def int_list(text: str | None) -> list[int] | None:
    """``"1,4,8"`` -> ``[1, 4, 8]``; None stays None; ValueError for anything not a positive integer."""
    values = _numbers(text, int)
    if values is not None and any(v < 1 for v in values):
        raise ValueError(f"concurrency must be >= 1: {text!r}")
    return values


def float_list(text: str | None) -> list[float] | None:
    """``"0.5,1"`` -> ``[0.5, 1.0]``; ``""`` -> ``[]``; ValueError for anything not a positive number."""
    values = _numbers(text, float)
    if values is not None and any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ValueError(f"rates must be positive req/s: {text!r}")
    return values


def _numbers(text: str | None, kind: type[int] | type[float]) -> Any:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [kind(p) for p in parts]
    except ValueError:
        raise ValueError(f"not a comma-separated list of numbers: {text!r}") from None


if __name__ == "__main__":
    raise SystemExit(main())
