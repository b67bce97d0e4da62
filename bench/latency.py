"""Round-trip latency through the edge: N sequential requests, cache off (data service by default).

    python bench/latency.py [--n 1000] [--service data]

Writes bench/results/latency_<service>.json with client-side p50/p90/p99 and the server's own
timing breakdown (queue, inference, edge) so a regression can be located.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import running_pipeline, summary_ms, write_result

REQUESTS = {
    "data": (
        "/data/process",
        {"operation": "analyze", "data": {"records": [{"id": i, "value": i * 10} for i in range(100)]}, "cache": False},
    ),
    "nlp": ("/ai/nlp/process", {"text": "This is a great product! I love it.", "task": "sentiment", "cache": False}),
    "llm": (
        "/ai/llm/completion",
        {"prompt": "Hello, this is a test prompt.", "max_tokens": 20, "temperature": 0.1, "cache": False},
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--service", default="data", choices=sorted(REQUESTS))
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    path, body = REQUESTS[args.service]

    with running_pipeline([args.service]) as pipeline, httpx.Client(base_url=pipeline.url, timeout=60) as http:
        for _ in range(args.warmup):
            http.post(path, json=body).raise_for_status()
        client_ms: list[float] = []
        server: dict[str, list[float]] = {"queue_ms": [], "inference_ms": [], "total_ms": [], "edge_ms": []}
        errors = 0
        started = time.perf_counter()
        for _ in range(args.n):
            t0 = time.perf_counter()
            response = http.post(path, json=body)
            client_ms.append((time.perf_counter() - t0) * 1000)
            if response.status_code != 200 or response.json()["cached"]:
                errors += 1
                continue
            for key, values in server.items():
                values.append(response.json()["timings_ms"].get(key, float("nan")))
        wall_s = time.perf_counter() - started

    result = {
        "benchmark": "sequential round trips through the REST edge, cache off",
        "service": args.service,
        "endpoint": path,
        "requests": args.n,
        "errors_or_cached": errors,
        "wall_s": round(wall_s, 3),
        "client_ms": summary_ms(client_ms),
        "server_ms": {key: summary_ms(values) for key, values in server.items()},
    }
    out = write_result(f"latency_{args.service}", result)
    print(f"{args.service}: p50 {result['client_ms']['p50']} ms, p99 {result['client_ms']['p99']} ms -> {out}")  # type: ignore[index]


if __name__ == "__main__":
    main()
