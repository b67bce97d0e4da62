"""Items/s per service: the model alone at batch 1 and at the configured batch size, then the whole
pipeline (REST edge -> Kafka -> agent -> reply) under concurrent load, cache off.

    python bench/throughput.py --service nlp [--n 256] [--concurrency 32] [--skip-pipeline]

Writes bench/results/throughput_<service>.json. "Model alone" calls the service's runner directly,
in this process: batch 1 runs ``run_batch([item])`` per item, batch B runs ``run_batch`` on chunks of
B. The pipeline part starts Kafka and Redis if needed and an isolated edge + agent, and reports the
batch sizes the agent actually formed (from the replies' ``timings_ms.batch_size``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.runner import Failure, Item
from agents.worker import build_runner
from bench.common import base_settings, running_pipeline, summary_ms, write_result
from bench.random_models import random_vit_base


def model_alone(service: str, items: list[Item], batch: int, more: Sequence[int] = ()) -> dict[str, object]:
    """Items/s of the runner alone at batch 1, ``batch`` and any ``more`` sizes (one load)."""
    settings = base_settings()
    runner = build_runner(service, settings)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    runner.load()
    load_s = time.perf_counter() - t0
    failures = 0
    out: dict[str, object] = {"load_s": round(load_s, 2)}
    for size in dict.fromkeys((1, batch, *more)):
        start = time.perf_counter()
        for i in range(0, len(items), size):
            failures += sum(isinstance(o, Failure) for o in runner.run_batch(items[i : i + size]))
        elapsed = time.perf_counter() - start
        out[f"batch_{size}"] = {
            "items": len(items),
            "seconds": round(elapsed, 3),
            "items_per_s": round(len(items) / elapsed, 2),
        }
    out["failures"] = failures
    out["speedup"] = round(out[f"batch_{batch}"]["items_per_s"] / out["batch_1"]["items_per_s"], 2)  # type: ignore[index]
    return out


def http_request(service: str, item: Item) -> tuple[str, dict[str, object]]:
    if service == "data":
        return "/data/process", {"operation": item.task, "data": item.input, "cache": False}
    if service == "nlp":
        return "/ai/nlp/process", {"task": item.task, **item.input, "cache": False}
    if service == "llm":
        return "/ai/llm/completion", {**item.input, "cache": False}
    return "/ai/vision/analyze", {"task": item.task, **item.input, "cache": False}


async def through_pipeline(url: str, service: str, items: list[Item], concurrency: int) -> dict[str, object]:
    latencies: list[float] = []
    batch_sizes: list[float] = []
    errors = 0
    queue = list(items)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        for item in items[: min(4, len(items))]:  # warm the path
            path, body = http_request(service, item)
            await http.post(path, json=body)

        async def worker() -> None:
            nonlocal errors
            while queue:
                path, body = http_request(service, queue.pop())
                t0 = time.perf_counter()
                response = await http.post(path, json=body)
                latencies.append((time.perf_counter() - t0) * 1000)
                if response.status_code != 200:
                    errors += 1
                    continue
                batch_sizes.append(response.json()["timings_ms"].get("batch_size", 0))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "requests": len(items),
        "concurrency": concurrency,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "items_per_s": round(len(items) / elapsed, 2),
        "latency_ms": summary_ms(latencies),
        "batch_size": {
            "mean": round(statistics.fmean(batch_sizes), 2) if batch_sizes else 0,
            "max": max(batch_sizes, default=0),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--service", required=True, choices=["data", "nlp", "llm", "vision"])
    parser.add_argument("--n", type=int, default=None, help="items (default per service)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument(
        "--vision-classify",
        action="store_true",
        help="vision: benchmark `classify` on a random ViT-Base/16 (no download) instead of the task mix",
    )
    args = parser.parse_args()
    n = args.n or {"data": 256, "nlp": 512, "llm": 32, "vision": 256}[args.service]
    samples = importlib.import_module(f"bench.samples_{args.service}")
    items: list[Item] = samples.sample_items(n)
    name = f"throughput_{args.service}"
    if args.vision_classify:
        model = random_vit_base(Path(base_settings().cache_dir) / "bench-models")
        os.environ["AISEMBLE_VISION__CLASSIFY_MODEL"] = str(model)  # read by the runner and the agent
        items = [Item("classify", {k: v for k, v in i.input.items() if k == "image_b64"}) for i in items]
        name += "_classify"
    batch = base_settings().service(args.service).max_batch

    result: dict[str, object] = {"service": args.service, "configured_max_batch": batch}
    result["model_alone"] = model_alone(args.service, items, batch)
    print(f"{args.service} model alone: {result['model_alone']}")
    if not args.skip_pipeline:
        with running_pipeline([args.service]) as pipeline:
            result["pipeline"] = asyncio.run(through_pipeline(pipeline.url, args.service, items, args.concurrency))
        print(f"{args.service} pipeline: {result['pipeline']}")
    print(write_result(name, result))


if __name__ == "__main__":
    main()
