"""NVIDIA's AIPerf against the LLM's streaming ``/v1/chat/completions`` (issue #17, ``make bench-full``).

    make install-aiperf                        # once: AIPerf in its own venv (.cache/aiperf/venv)
    python bench/aiperf_llm.py                 # an isolated pipeline (edge + llm agent), AIPerf at 1 and 4 clients
    python bench/aiperf_llm.py --url http://127.0.0.1:8080 --concurrency 1,8 --requests 40

AIPerf (0.13, on PyPI) is the report format users of vLLM, TensorRT-LLM and Dynamo know: TTFT, ITL, TPOT
("inter token latency" is AIPerf's name for the per-request mean gap), end-to-end latency, output tokens/s
and goodput at SLOs. It runs here unchanged, as a new user would run it, with two things found offline:

* its tokenizer: AIPerf counts tokens and builds its synthetic prompts with a Hugging Face tokenizer; the
  model hub cannot be reached, so :func:`tokenizer_dir` writes the shipped SmolLM2 GGUF's own tokenizer once,
  as a snapshot of a hub cache of its own (``.cache/aiperf/hf-hub``, repo :data:`TOKENIZER_REPO`), and AIPerf
  runs with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` there (offline, AIPerf resolves a name to a cached
  snapshot; a bare folder path is refused);
* its own venv: AIPerf pins rich 14.1 and transformers 5, which our locks do not share, so it is a client
  tool installed apart (``requirements-aiperf.lock``, ``make install-aiperf``), run as a subprocess.

Each point has its own synthetic prompts (its own seed), so no point is answered from the prompt cache of an
earlier one. Every request asks for ``--osl`` tokens with vLLM's ``ignore_eos`` and ``min_tokens`` (AIPerf's
``--extra-inputs``), ``--isl`` prompt tokens of AIPerf's synthetic text, at a fixed concurrency per point.
Goodput uses AIPerf's own ``--goodput`` (``time_to_first_token:MS inter_token_latency:MS``).

What the figures mean on this machine: AIPerf starts a process per service (dataset, timing, workers, record
processors, the system controller) and they take much of 2 cores, so its figures here say more about AIPerf
than about the server (the reported ``aiperf_cpu_share`` is its share of the machine during the run). The
comparisons in ``make bench`` use our light driver (``bench/llm_serve.py``, section 12); this section gives
the same run in AIPerf's report format, for bigger machines and for users who compare servers with it.

What can go wrong: AIPerf missing (run ``make install-aiperf``) raises :class:`AiperfUnavailable`; a run that
fails or exceeds its bound (``--timeout``) is recorded with its log tail, not retried.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402

AIPERF = ROOT / ".cache" / "aiperf" / "venv" / "bin" / "aiperf"
HF_HUB_CACHE = ROOT / ".cache" / "aiperf" / "hf-hub"
TOKENIZER_REPO = "aisemble/smollm2-135m-instruct-tokenizer"  # a name in that cache only: nothing is downloaded
TOKENIZER_REVISION = "0" * 40
TOKENIZER_DIR = HF_HUB_CACHE / f"models--{TOKENIZER_REPO.replace('/', '--')}" / "snapshots" / TOKENIZER_REVISION
# AIPerf's metric tags (profile_export_aiperf.json) -> our names (bench/llm_serve.py's), avg/p50/p90/p99 in ms.
# AIPerf's "inter_token_latency" is per request, (e2e - TTFT) / (tokens - 1): vLLM's TPOT; its
# "inter_chunk_latency" is every gap between chunks: vLLM's ITL.
METRICS = {
    "time_to_first_token": "ttft_ms",
    "inter_chunk_latency": "itl_ms",
    "inter_token_latency": "tpot_ms",
    "request_latency": "e2el_ms",
}
RATES = {
    "output_token_throughput": "output_tokens_per_s",
    "request_throughput": "requests_per_s",
    "goodput": "goodput_rps",
}


class AiperfUnavailable(RuntimeError):
    """AIPerf is not installed (``make install-aiperf``)."""


def tokenizer_dir() -> Path:
    """The shipped SmolLM2 GGUF's tokenizer as a snapshot of :data:`HF_HUB_CACHE` (written once, atomically)."""
    if (TOKENIZER_DIR / "tokenizer.json").is_file():
        return TOKENIZER_DIR
    from transformers import AutoTokenizer

    from bench.llm_server import find_gguf

    gguf = find_gguf()
    if gguf is None:
        raise AiperfUnavailable("the shipped SmolLM2 GGUF is missing (make install)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    HF_HUB_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=HF_HUB_CACHE))
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(TOKENIZER_DIR, ignore_errors=True)
    TOKENIZER_DIR.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(TOKENIZER_DIR)
    refs = TOKENIZER_DIR.parent.parent / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(TOKENIZER_REVISION)
    return TOKENIZER_DIR


def aiperf_command(
    url: str, concurrency: int, requests: int, isl: int, osl: int, goodput: Sequence[str], out: Path, seed: int = 7
) -> list[str]:
    """One AIPerf point: ``requests`` streamed chats at ``concurrency``, ``osl`` tokens each; ``seed``: AIPerf's
    synthetic prompts (a point of its own each, so no point's prompts are in the server's prompt cache from an
    earlier one: the figures are those of new conversations)."""
    extra = json.dumps({"ignore_eos": True, "min_tokens": osl, "temperature": 0})
    command = [
        str(AIPERF), "profile",
        "--model", "llm", "--url", url, "--endpoint-type", "chat", "--streaming",
        "--tokenizer", TOKENIZER_REPO,
        "--concurrency", str(concurrency), "--request-count", str(requests),
        "--warmup-request-count", str(min(concurrency, 2)),
        "--isl", str(isl), "--osl", str(osl), "--extra-inputs", extra,
        "--use-server-token-count", "--random-seed", str(seed),
        "--output-artifact-dir", str(out), "--ui-type", "none", "--no-auto-plot",
    ]  # fmt: skip
    if goodput:
        command += ["--goodput", " ".join(goodput)]
    return command


def parse_export(path: Path) -> dict[str, Any]:
    """Our figures from AIPerf's ``profile_export_aiperf.json`` (its units: ms, tokens/s, requests/s)."""
    data = json.loads(path.read_text())
    figures: dict[str, Any] = {}
    for tag, name in METRICS.items():
        metric = data.get(tag)
        if isinstance(metric, Mapping):
            figures[name] = {k: _round(metric.get(k)) for k in ("avg", "p50", "p90", "p99")}
    for tag, name in RATES.items():
        metric = data.get(tag)
        if isinstance(metric, Mapping):
            figures[name] = _round(metric.get("avg"))
    counts = data.get("completed_request_count") or data.get("request_count")
    figures["completed"] = counts.get("avg") if isinstance(counts, Mapping) else None
    figures["errors"] = sum(int(e.get("count", 1)) for e in data.get("error_summary") or [] if isinstance(e, Mapping))
    return figures


def _round(value: object) -> float | None:
    return round(float(value), 3) if isinstance(value, int | float) else None


def _find_export(out: Path) -> Path | None:
    found = sorted(out.rglob("profile_export_aiperf.json"))
    return found[0] if found else None


def run_point(
    url: str,
    concurrency: int,
    requests: int,
    isl: int,
    osl: int,
    goodput: Sequence[str],
    timeout_s: float,
    seed: int = 7,
) -> dict[str, Any]:
    """One AIPerf run, bounded by ``timeout_s`` (its process group is killed past it); figures or a failure."""
    out = Path(tempfile.mkdtemp(prefix="aisemble-aiperf-"))
    log = out / "aiperf.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(HF_HUB_CACHE), "NO_COLOR": "1"}
    started, cpu0 = time.perf_counter(), _children_cpu()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            aiperf_command(url, concurrency, requests, isl, osl, goodput, out, seed),
            stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            rc = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait(timeout=30)
            rc = None
    wall = time.perf_counter() - started
    point: dict[str, Any] = {"concurrency": concurrency, "requests_sent": requests, "isl": isl, "osl": osl}
    point["wall_s"] = round(wall, 1)
    point["aiperf_cpu_share"] = round((_children_cpu() - cpu0) / wall / (os.cpu_count() or 1), 3)
    export = _find_export(out)
    if rc != 0 or export is None:
        tail = log.read_text(errors="replace")[-2000:]
        point["failed"] = f"aiperf exited {rc}" if rc is not None else f"aiperf ran past {timeout_s} s"
        point["log_tail"] = tail
        return point
    point.update(parse_export(export))
    shutil.rmtree(out, ignore_errors=True)
    return point


def _children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


@contextlib.contextmanager
def server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from bench.llm_serve import aisemble_server

    with aisemble_server() as started:
        yield started


def run(
    url: str | None = None,
    concurrency: Sequence[int] = (1, 4),
    requests: int = 24,
    isl: int = 128,
    osl: int = 64,
    goodput: Sequence[str] = ("time_to_first_token:1000", "inter_token_latency:100"),
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """AIPerf at each concurrency against ``url`` (or an isolated pipeline started here)."""
    if not AIPERF.is_file():
        raise AiperfUnavailable(f"AIPerf is not installed at {AIPERF}: run make install-aiperf")
    tokenizer_dir()
    result: dict[str, Any] = {"tool": "aiperf 0.13", "endpoint": "/v1/chat/completions (streaming)"}
    result["goodput_slos"] = list(goodput)
    points = []
    with server(url) as target:
        for n, c in enumerate(concurrency):
            point = run_point(target, c, max(requests, c), isl, osl, goodput, timeout_s, seed=7 + n)
            print(json.dumps({k: v for k, v in point.items() if k != "log_tail"}), flush=True)
            points.append(point)
    result["points"] = points
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return result


def suite_rows(result: Mapping[str, Any]) -> list[str]:
    """SUMMARY.md's section 14 (``bench.summary`` calls it) from the suite's ``aiperf`` entry (bench-full only)."""
    section = result.get("aiperf")
    if section is None:
        return []
    lines = ["## 14. AIPerf against the streaming /v1/chat/completions (bench.aiperf_llm, bench-full)", ""]
    if "points" not in section:
        why = next((f"{k}: {section[k]}" for k in ("failed", "skipped") if k in section), "not run")
        return [*lines, " ".join(str(why).split())[:300], ""]
    note = "AIPerf's own processes share the 2 cores (its CPU share per row): read its report format, not a ranking."
    return [*lines, note, "", *summary_rows(section), ""]


def summary_rows(result: Mapping[str, Any]) -> list[str]:
    """A table: one row per point."""
    lines = [
        "| clients | TTFT p50/p99 ms | ITL p50/p99 ms | TPOT p50 ms | e2e p50 ms | out tok/s | req/s | goodput req/s "
        "| AIPerf CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result.get("points", []):
        if "failed" in p:
            lines.append(f"| {p['concurrency']} | failed: {p['failed']} ||||||||")
            continue
        ttft, itl, e2el = p.get("ttft_ms") or {}, p.get("itl_ms") or {}, p.get("e2el_ms") or {}
        tpot = p.get("tpot_ms") or {}
        lines.append(
            f"| {p['concurrency']} | {ttft.get('p50')}/{ttft.get('p99')} | {itl.get('p50')}/{itl.get('p99')} | "
            f"{tpot.get('p50')} | {e2el.get('p50')} | {p.get('output_tokens_per_s')} | {p.get('requests_per_s')} | "
            f"{p.get('goodput_rps')} | {p['aiperf_cpu_share']:.0%} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running edge (default: start an isolated pipeline)")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=24, help="requests per point")
    parser.add_argument("--isl", type=int, default=128, help="prompt tokens (AIPerf's synthetic text)")
    parser.add_argument("--osl", type=int, default=64, help="output tokens (ignore_eos, min_tokens)")
    parser.add_argument("--goodput", nargs="*", default=["time_to_first_token:1000", "inter_token_latency:100"])
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per AIPerf run")
    args = parser.parse_args(argv)
    result = run(
        args.url, [int(c) for c in args.concurrency.split(",")], args.requests, args.isl, args.osl,
        args.goodput, args.timeout,
    )  # fmt: skip
    out = write_result("aiperf_llm", result)
    print("\n".join(summary_rows(result)))
    print(f"-> {out}")
    return 0 if all("failed" not in p for p in result["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
