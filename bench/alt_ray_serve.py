"""Ray Serve beside aisemble: the same nlp runner behind ``@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)``.

    python bench/alt_ray_serve.py --port 8124 [--service nlp] [--max-batch 32] [--wait-ms 10]

One replica of a deployment that builds the runner aisemble's agent uses (``agents.worker.build_runner``,
same settings) and answers ``POST /ai/nlp/process`` (the edge's path and body, so one load driver measures
both) through a ``@serve.batch`` method that calls ``run_batch`` on the batch Ray formed. The replica
accepts up to 1,024 requests at once (``max_ongoing_requests``; Ray's default of 5 would cap batches at 5),
and gets the torch thread count a plain process gets here (Ray would otherwise set OMP_NUM_THREADS=1 in
its workers). Prints ``READY <url>`` once ``serve.run`` returns (the replica is healthy).

The HTTP entry point binds 127.0.0.1 only: the Serve proxy on ``--port`` (``http_options``), with
``ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")``. Ray's own gRPC servers do not all
follow: checked with ``ss -ltnp`` on Ray 2.60, the GCS, the raylet, the workers' core-worker servers and the
dashboard agent listened on all interfaces (``*`` / 0.0.0.0) while it ran, so the suite runs this script and its
load driver in a private network namespace (``bench.suite.ray_serve_isolated``: ``unshare --net``, only a
loopback of its own), where nothing outside can reach them. Run by hand, it binds as Ray does.
SIGTERM or SIGINT runs ``serve.shutdown()`` then ``ray.shutdown()``,
which stop the raylet, GCS and worker processes Ray started; the caller checks for leftovers by PID and
kills them (``bench.suite.ray_serve_server``). What can go wrong: Ray's start-up takes tens of seconds on
2 cores; a runner failure answers 422 with its code, a raising runner 500.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = str(Path(__file__).resolve().parents[1])


def serve_forever(service: str, port: int, max_batch: int, wait_ms: float) -> None:
    import torch

    threads = torch.get_num_threads()  # what a plain process (the aisemble agent) gets on this machine
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(
        num_replicas=1,
        max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": 0},
    )
    class Runner:
        def __init__(self, service: str) -> None:
            torch.set_num_threads(threads)
            from agents.worker import build_runner
            from bench.common import base_settings

            self.runner = build_runner(service, base_settings())  # type: ignore[arg-type]
            self.runner.load()

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_ms / 1000)
        async def run(self, items: list[Any]) -> list[Any]:
            return list(self.runner.run_batch(items))

        async def __call__(self, request: Request) -> JSONResponse:
            from agents.runner import Failure, Item

            body = await request.json()
            if service == "nlp":
                item = Item(str(body.get("task", "")), {k: v for k, v in body.items() if k not in ("task", "cache")})
            else:
                item = Item(str(body.get("operation", "")), body.get("data") or {})
            outcome = await self.run(item)
            if isinstance(outcome, Failure):
                return JSONResponse({"ok": False, "error": {"code": outcome.code, "message": outcome.message}}, 422)
            return JSONResponse({"ok": True, "output": outcome, "cached": False})

    path = {"nlp": "/ai/nlp/process", "data": "/data/process"}[service]
    ray.init(
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        num_cpus=os.cpu_count(),
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "PYTHONPATH": ROOT,
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "OMP_NUM_THREADS": str(threads),
            }
        },
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Runner.bind(service), route_prefix=path, name="bench")  # type: ignore[attr-defined]
        print(f"READY http://127.0.0.1:{port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
        print("STOPPED", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service", default="nlp", choices=["nlp", "data"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--wait-ms", type=float, default=10.0)
    args = parser.parse_args()
    serve_forever(args.service, args.port, args.max_batch, args.wait_ms)


if __name__ == "__main__":
    main()
