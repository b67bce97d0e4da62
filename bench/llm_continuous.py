"""Continuous vs static batching of the llm runner on one replayed, open-loop, mixed-length workload.

The workload is drawn from ``--seed``: ``--n`` requests arriving as a Poisson process of ``--rate``
requests per second (open loop: arrivals do not wait for answers), each a prompt of ``bench.samples_llm``
(sometimes repeated 1-4 times, so prompt lengths vary) with ``max_tokens`` drawn from ``--max-tokens``,
greedy or sampled at 0.7 (half each). Both modes replay the same arrivals on the same loaded model, in
this process (no Kafka: the model's scheduling alone is measured):

* ``static``: the old path. Whenever the model is free it takes what has arrived (up to ``max_batch``)
  and runs ``run_batch`` (one ``generate`` per group); a request's first token is visible only when its
  group ends (nothing streams), so its time to first token is its latency.
* ``continuous``: the engine (``agents.llm_engine``). Before each decode step it admits what has
  arrived while a row slot is free; every row streams, and its time to first token is the step that
  produced its first delta.

Reported per mode: generated tokens per second (all tokens / the time from the first arrival to the last
answer), latency and time-to-first-token percentiles (ms, from each request's arrival), decode steps or
groups. Run from the repo root::

    python -m bench.llm_continuous --n 24 --rate 3 --out bench/results/llm_continuous.json

``--model`` takes a checkpoint folder (default: the shipped SmolLM2, converted once); ``--random`` builds
seeded random weights from that folder's config (a GPU machine that cannot receive the weights: speed
numbers only). Imports only torch, transformers and this repo's runner (no Kafka, Redis or orjson).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/ (its profile.py shadows the stdlib)

import torch  # noqa: E402

from agents.llm import LlmRunner, build_runner  # noqa: E402
from agents.llm_engine import RowRequest  # noqa: E402
from agents.runner import Failure, Item  # noqa: E402
from bench.samples_llm import PROMPTS  # noqa: E402
from streams.settings import LlmSettings, Settings  # noqa: E402
from streams.stats import percentile  # noqa: E402


@dataclass(frozen=True, slots=True)
class Request:
    at_s: float  # arrival, seconds after the start
    item: Item


@dataclass(slots=True)
class Result:
    latency_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    failures: int = 0
    calls: int = 0
    wall_s: float = 0.0


def workload(n: int, rate: float, max_tokens: list[int], seed: int) -> list[Request]:
    rng = random.Random(seed)
    at = 0.0
    out = []
    for i in range(n):
        at += rng.expovariate(rate) if i else 0.0
        prompt = " ".join(rng.choice(PROMPTS) for _ in range(rng.choice([1, 1, 2, 4])))
        greedy = rng.random() < 0.5
        payload: dict[str, object] = {
            "prompt": prompt,
            "max_tokens": rng.choice(max_tokens),
            "temperature": 0.0 if greedy else 0.7,
        }
        out.append(Request(at, Item("completion", payload)))
    return out


def _tokens(outcome: object) -> int:
    return int(outcome["tokens"]) if isinstance(outcome, dict) else 0  # type: ignore[call-overload]


def run_static(runner: LlmRunner, requests: list[Request], max_batch: int) -> Result:
    result = Result()
    start = time.perf_counter()
    next_index = 0
    while next_index < len(requests):
        now = time.perf_counter() - start
        arrived = [r for r in requests[next_index : next_index + max_batch] if r.at_s <= now]
        if not arrived:
            time.sleep(max(0.0, requests[next_index].at_s - now))
            continue
        outcomes = runner.run_batch([r.item for r in arrived])
        result.calls += 1
        done = (time.perf_counter() - start) * 1000.0
        for request, outcome in zip(arrived, outcomes, strict=True):
            result.failures += isinstance(outcome, Failure)
            result.tokens += _tokens(outcome)
            result.latency_ms.append(done - request.at_s * 1000.0)
            result.ttft_ms.append(done - request.at_s * 1000.0)
        next_index += len(arrived)
    result.wall_s = time.perf_counter() - start
    return result


def run_continuous(runner: LlmRunner, requests: list[Request]) -> Result:
    result = Result()
    engine = runner.make_engine()
    start = time.perf_counter()
    next_index = 0
    arrival: dict[str, float] = {}
    first: set[str] = set()
    while next_index < len(requests) or engine.active:
        now = time.perf_counter() - start
        while next_index < len(requests) and requests[next_index].at_s <= now and engine.free_slots > 0:
            key = str(next_index)
            row = runner.row_request(key, requests[next_index].item, stream=True)
            assert isinstance(row, RowRequest), row
            engine.add(row)
            arrival[key] = requests[next_index].at_s * 1000.0
            next_index += 1
        if not engine.active:
            time.sleep(max(0.0, requests[next_index].at_s - now))
            continue
        report = engine.step()
        result.calls += 1
        done = (time.perf_counter() - start) * 1000.0
        for delta in report.deltas:
            if delta.tokens and delta.key not in first:
                first.add(delta.key)
                result.ttft_ms.append(done - arrival[delta.key])
        for finished in report.finished:
            result.failures += isinstance(finished.outcome, Failure)
            result.tokens += _tokens(finished.outcome)
            result.latency_ms.append(done - arrival[finished.key])
    result.wall_s = time.perf_counter() - start
    return result


def _pct(values: list[float], q: float) -> float:
    return round(percentile(values, q), 1) if values else 0.0


def summary(result: Result) -> dict[str, object]:
    return {
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens / result.wall_s, 1),
        "wall_s": round(result.wall_s, 2),
        "latency_ms": {
            "p50": _pct(result.latency_ms, 50),
            "p99": _pct(result.latency_ms, 99),
            "mean": round(statistics.fmean(result.latency_ms), 1),
        },
        "ttft_ms": {
            "p50": _pct(result.ttft_ms, 50),
            "p99": _pct(result.ttft_ms, 99),
            "mean": round(statistics.fmean(result.ttft_ms), 1),
        },
        "model_calls": result.calls,
        "failures": result.failures,
    }


def random_checkpoint(folder: Path, work: Path) -> Path:
    """Seeded random weights with ``folder``'s config and tokenizer files (speed numbers only)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    target = work / f"{folder.name}-random"
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(folder).save_pretrained(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--rate", type=float, default=3.0, help="arrivals per second (Poisson, open loop)")
    parser.add_argument("--max-tokens", default="8,16,32,64,128")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--model", default="", help="checkpoint folder; default: the shipped SmolLM2")
    parser.add_argument("--random", action="store_true", help="random weights from --model's config")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--modes", default="static,continuous")
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--quick", action="store_true", help="make bench's size: 16 requests at 2/s, 8-64 tokens")
    args = parser.parse_args()
    if args.quick:
        args.n, args.rate, args.max_tokens = 16, 2.0, "8,16,32,64"

    model = args.model
    cache_dir = Path(args.cache_dir) if args.cache_dir else Settings().cache_dir
    if args.random:
        model = str(random_checkpoint(Path(args.model), cache_dir))
    fields = {
        "model": model,
        "device": args.device,
        "dtype": args.dtype,
        "max_batch": args.max_batch,
        "threads": args.threads,
        "batching": "continuous",
    }
    runner = build_runner(Settings(cache_dir=cache_dir, llm=LlmSettings.model_validate(fields)))
    runner.load()
    requests = workload(args.n, args.rate, [int(t) for t in args.max_tokens.split(",")], args.seed)
    loaded = runner._ready()
    report: dict[str, object] = {
        "label": args.label,
        "model": runner.model_for("completion"),
        "random_weights": args.random,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "workload": {
            "n": args.n,
            "rate_per_s": args.rate,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
            "max_batch": args.max_batch,
            "last_arrival_s": round(requests[-1].at_s, 2),
        },
        "machine": {
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "gpu": torch.cuda.get_device_name() if loaded.device.type == "cuda" else None,
        },
    }
    modes: dict[str, object] = {}
    for mode in args.modes.split(","):
        result = run_static(runner, requests, args.max_batch) if mode == "static" else run_continuous(runner, requests)
        modes[mode] = summary(result)
        print(mode, json.dumps(modes[mode]), flush=True)
    report["modes"] = modes
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
