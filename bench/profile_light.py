"""Where a 1-client light request's time goes: py-spy on the edge and the data agent at once, with the hops.

    python bench/profile_light.py [--clients 1] [--seconds 12] [--out profile_light]

One pipeline (edge + data agent, default settings), ``POST /data/process`` (``analyze`` of 3 records, cache off)
in a closed loop (``bench.edge_cost.closed_loop``: aiohttp, the reply's ``timings_ms`` split into hops); while
it runs, ``bench.profiling.recording`` samples both processes (py-spy, every thread). Writes the raw stacks and
speedscope files under ``bench/results/profile/`` (``<out>-edge``, ``<out>-data-agent``) and
``bench/results/<out>.json``: requests/s, p50, the hop medians, CPU µs per request of each process, and the
top functions of each profile. Needs ``make install-bench`` (py-spy). Issue #15: the light-work target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, running_pipeline, write_result
from bench.edge_cost import DATA_PATH, closed_loop, light_body
from bench.profiling import recording


def run(clients: int, seconds: float, out: str) -> dict[str, Any]:
    with running_pipeline(["data"]) as pipeline:
        pids = {"edge": pipeline.procs["edge"].pid, "data_agent": pipeline.procs["data"].pid}
        asyncio.run(closed_loop(pipeline.url, DATA_PATH, light_body, clients, 3.0, pids))  # warm the path
        profile_dir = RESULTS / "profile"
        with contextlib.ExitStack() as stack:
            edge = stack.enter_context(recording(pids["edge"], f"{out}-edge", seconds, profile_dir))
            agent = stack.enter_context(recording(pids["data_agent"], f"{out}-data-agent", seconds, profile_dir))
            load = asyncio.run(closed_loop(pipeline.url, DATA_PATH, light_body, clients, seconds, pids))
    return {"clients": clients, "seconds": seconds, "load": load, "profile": {"edge": edge, "data_agent": agent}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--out", default="profile_light")
    args = parser.parse_args()
    result = run(args.clients, args.seconds, args.out)
    load = result["load"]
    print(f"{load['requests_per_s']} req/s, p50 {load['latency_ms']['p50']} ms, hops {load.get('hops_p50_ms')}")
    print(write_result(args.out, result))


if __name__ == "__main__":
    main()
