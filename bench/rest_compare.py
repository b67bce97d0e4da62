"""REST embed beside the per-request design and Ray Serve, with the model's own best batch, in one run.

    python bench/rest_compare.py [--clients 1,64] [--duration 15] [--out rest_compare]

Issue #15's REST targets, measured with the suite's light driver (``bench.suite.closed_loop``: aiohttp, one
session, orjson bodies, its CPU share reported per point), the same for every design:

1. the model alone (``bench.model_limit``, its own process): MiniLM embed items/s at batch 1, 32 and 64 of the
   review-length texts the REST load sends: the ceiling no design can pass on this machine;
2. aisemble (a pipeline with the nlp agent and its defaults), then the per-request design
   (``bench/alt_per_request.py``), then Ray Serve (``@serve.batch(32, 10 ms)``, in its own network namespace
   where ``unshare`` allows), then aisemble again (a neighbour's load shows as a difference between the two);
   closed loop at each ``--clients``, cache off.

Writes ``bench/results/<out>.json`` and prints each point. Needs ``make install-bench`` (Ray). Nothing here
asserts on time; read the ratios of one run (2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, running_pipeline, write_result
from bench.suite import load_points, per_request_server, ray_serve_isolated


def model_limit() -> dict[str, Any]:
    args = ["--service", "nlp", "--n", "512", "--sizes", "1,32,64", "--labels", "embed"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.model_limit", *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    limit: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])["embed"]
    return limit


def run(clients: list[int], duration_s: float) -> dict[str, Any]:
    log = Path(tempfile.mkdtemp(prefix="aisemble-rest-compare-"))
    out: dict[str, Any] = {"clients": clients, "duration_s": duration_s, "driver": "bench.suite.closed_loop (aiohttp)"}
    out["model_limit"] = model_limit()
    with running_pipeline(["nlp"]) as pipeline:
        out["aisemble"] = load_points(pipeline.url, clients, duration_s, "aisemble")
    with per_request_server("nlp", log / "per-request.log") as (url, _):
        out["per_request"] = load_points(url, clients, duration_s, "per-request")
    out["ray_serve"] = ray_serve_isolated(clients, duration_s)
    with running_pipeline(["nlp"]) as pipeline:
        out["aisemble_again"] = load_points(pipeline.url, clients, duration_s, "aisemble (again)")
    best = float(out["model_limit"]["best"]["items_per_s"])
    ray = {p["clients"]: p for p in out["ray_serve"].get("points", [])}
    ratios: dict[str, Any] = {}
    for label in ("aisemble", "aisemble_again"):
        for point in out[label]:
            n = point["clients"]
            row = {"items_per_s": point["items_per_s"], "of_model_best": round(point["items_per_s"] / best, 3)}
            if n in ray:
                row["vs_ray"] = round(point["items_per_s"] / ray[n]["items_per_s"], 3)
                row["p99_ms"], row["ray_p99_ms"] = point["latency_ms"]["p99"], ray[n]["latency_ms"]["p99"]
            ratios[f"{label}_{n}"] = row
    for n, point in ray.items():
        ratios[f"ray_{n}_of_model_best"] = round(point["items_per_s"] / best, 3)
    out["ratios"] = ratios
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,64")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--out", default="rest_compare")
    args = parser.parse_args()
    result = run([int(c) for c in args.clients.split(",")], args.duration)
    print(json.dumps(result["ratios"], indent=2))
    print(write_result(args.out, result))


if __name__ == "__main__":
    main()
