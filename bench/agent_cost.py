"""The agent's own cost per item: CPU microseconds around the model, under Kafka-direct load.

    python bench/agent_cost.py [--n 3000] [--texts short|review] [--runner noop|model] [--profile] [--model-limit]

Starts an isolated pipeline with the nlp agent (``--runner model``: its real MiniLM runner; ``--runner noop``:
``bench.agent_cost:build_noop``, a runner that answers every embed at once, so only the agent's work is left),
warms it up, then produces ``n`` embed requests at once straight to its request topic (``bench.kafka_direct``)
and reads the agent process's CPU time (``/proc/PID/stat`` and each thread's ``/proc/PID/task/TID/stat``)
before and after. Reported per item: the whole process, the event-loop thread (decode, cache and dedup,
encode, produce, acknowledge: the agent's own work) and the other threads (the model's, aiokafka's none: it
is pure Python on the loop). ``--profile`` adds py-spy's top self-time functions over the load (a second,
separate load of the same size, so the sampling does not slow the timed one; py-spy ``--gil``: only the
thread holding the GIL is sampled, so the shares are of the process's Python CPU time). ``--model-limit`` first
times the model alone on the same texts at batch 32 and 64 (``model_best``, in its own process) and reports the
ratio.

What can go wrong: replies missing after the timeout are counted (``bench.kafka_direct``); py-spy missing or not
allowed to attach leaves ``profile.skipped``. Every process started is stopped by PID (``running_pipeline``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.runner import Item, Outcome, unknown_task
from agents.worker import build_runner
from bench.common import ROOT, base_settings, running_pipeline
from bench.kafka_direct import direct
from bench.profiling import summarize
from bench.samples_nlp import sample_items, short_items
from streams.settings import Settings
from streams.topics import reply_topic_name

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
NOOP_VECTOR = [0.0] * 384


class NoopEmbedRunner:
    """Answers every nlp ``embed`` at once with a fixed 384-float vector (MiniLM's output size): what is left is
    the agent's own cost."""

    service = "nlp"
    tasks = ("embed",)

    def load(self) -> None:
        """Nothing to load."""

    def model_for(self, task: str) -> str:
        return "noop-embed@1"

    def run_batch(self, items: Sequence[Item]) -> list[Outcome]:
        return [{"embedding": NOOP_VECTOR, "dim": 384} if i.task == "embed" else unknown_task(i.task, self.tasks)
                for i in items]  # fmt: skip


def build_noop(settings: Settings) -> NoopEmbedRunner:
    """The ``--runner bench.agent_cost:build_noop`` factory (settings unused)."""
    return NoopEmbedRunner()


def cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of ``pid``: ``process`` and ``main`` (its first thread: the event loop)."""

    def read(path: Path) -> float:
        fields = path.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * TICK_S

    return {"process": read(Path(f"/proc/{pid}/stat")), "main": read(Path(f"/proc/{pid}/task/{pid}/stat"))}


def gil_profile(pid: int, seconds: float, load: Callable[[], object]) -> dict[str, Any]:
    """py-spy on ``pid`` while ``load`` runs, sampling only the thread holding the GIL (``--gil``): where the
    process's Python CPU time goes; the top self-time functions (``bench.profiling.summarize``)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {"skipped": "py-spy not installed (make install-bench)"}
    raw = Path(tempfile.mkdtemp(prefix="agent-cost-")) / "agent.raw.txt"
    args = [spy, "record", "--gil", "--nonblocking", "-p", str(pid), "-d", str(max(2, round(seconds))), "-r", "200"]
    args += ["--format", "raw", "-o", str(raw)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        load()
    finally:
        try:
            message, _ = proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            message, _ = proc.communicate(timeout=10)
    if not raw.exists() or not raw.stat().st_size:
        return {"skipped": f"py-spy wrote no samples: {message.decode(errors='replace')[-500:]}"}
    summary = summarize(raw.read_text(errors="replace"), top=25)
    return {"samples": summary["samples"], "top_self": summary["top_self"], "raw": str(raw)}


def items_of(texts: str, n: int) -> list[Item]:
    return short_items(n) if texts == "short" else sample_items(n, task="embed")


def model_best(texts: str, n: int, sizes: Sequence[int] = (32, 64)) -> dict[str, Any]:
    """The nlp runner alone, in this process, on the same texts: items/s at each of ``sizes`` (after one warm-up
    batch), and the best. A cheaper stand-in for ``bench.model_limit`` (which also runs batch 1 and 8)."""
    runner = build_runner("nlp", base_settings())
    runner.load()
    items = items_of(texts, n)
    runner.run_batch(items[: max(sizes)])
    per: dict[str, float] = {}
    for size in sizes:
        start = time.perf_counter()
        for i in range(0, len(items), size):
            runner.run_batch(items[i : i + size])
        per[f"batch_{size}"] = round(len(items) / (time.perf_counter() - start), 2)
    best = max(per, key=per.__getitem__)
    return {"items_per_s": per[best], "batch": int(best.split("_")[1]), "items": len(items), **per}


def model_best_process(texts: str, n: int) -> dict[str, Any]:
    """``model_best`` in a process of its own (as the agent runs its model), its JSON."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__)), "--model-only", "--texts", texts, "--n", str(n)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        return {"failed": proc.stderr[-2000:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def measure(n: int, texts: str, runner: str, profile: bool, warm: int) -> dict[str, Any]:
    runners = {"nlp": "bench.agent_cost:build_noop"} if runner == "noop" else None
    out: dict[str, Any] = {"n": n, "texts": texts, "runner": runner}
    with running_pipeline(["nlp"], runners=runners) as pipeline:
        name = "nlp-0" if runner == "noop" else "nlp"
        pid = pipeline.procs[name].pid
        settings = pipeline.settings
        # One reply topic for every run: the warm-up pays for the agent's first look-up of it (joins, metadata,
        # the model's warm-up), not the timed run.
        reply = reply_topic_name(settings.topic_prefix, "bench-agent-cost")
        asyncio.run(direct(settings, "nlp", items_of(texts, warm), reply_topic=reply))
        before, t0 = cpu_s(pid), time.perf_counter()
        load = asyncio.run(direct(settings, "nlp", items_of(texts, n), reply_topic=reply))
        after, wall = cpu_s(pid), time.perf_counter() - t0
        items = int(load["answered"])  # type: ignore[call-overload]
        proc_s, main_s = after["process"] - before["process"], after["main"] - before["main"]
        out["load"] = {k: load[k] for k in ("items_per_s", "answered", "missing", "errors", "batch_size_mean",
                                            "seconds", "produce_all_s", "reply_ms")}  # fmt: skip
        out["cpu_us_per_item"] = {
            "process": round(proc_s / items * 1e6, 1),
            "event_loop_thread": round(main_s / items * 1e6, 1),
            "other_threads": round((proc_s - main_s) / items * 1e6, 1),
        }
        out["process_cpu_share"] = round(proc_s / wall, 3)
        if profile:
            again = items_of(texts, n)
            seconds = float(load["seconds"])  # type: ignore[arg-type]
            out["profile"] = gil_profile(
                pid, seconds, lambda: asyncio.run(direct(settings, "nlp", again, reply_topic=reply))
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--warm", type=int, default=200)
    parser.add_argument("--texts", choices=["short", "review"], default="short")
    parser.add_argument("--runner", choices=["noop", "model"], default="model")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--model-limit", action="store_true")
    parser.add_argument("--model-only", action="store_true", help="only the model's best batch (see model_best)")
    args = parser.parse_args()
    if args.model_only:
        print(json.dumps(model_best(args.texts, args.n)), flush=True)
        return
    out: dict[str, Any] = {}
    if args.model_limit:
        out["model_best"] = model_best_process(args.texts, min(args.n, 512))
    out.update(measure(args.n, args.texts, args.runner, args.profile, args.warm))
    if args.model_limit and "items_per_s" in out.get("model_best", {}):
        out["ratio"] = round(out["load"]["items_per_s"] / out["model_best"]["items_per_s"], 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
