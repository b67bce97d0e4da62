"""Who uses the CPU while the nlp agent serves a Kafka-direct burst: the agent, the broker, the load driver.

    python bench/kafka_direct_cpu.py [--n 2000] [--rounds 2] [--texts short|review] [--out kafka_direct_cpu]

One pipeline with the nlp agent (defaults); a warm-up, then ``--n`` embed requests produced at once to its
request topic (``bench.kafka_direct.direct``), ``--rounds`` times. Around each round: the CPU seconds of the
agent and of the local broker (``/proc/PID/stat``, the broker found by its command line on 127.0.0.1:9092) and
this driver's own (``time.process_time``), as cores (CPU s / wall s) and µs per item. Issue #15's short-text
Kafka-direct target: read the agent's µs per item beside the model alone's (``bench.model_limit``, printed
first: 2 threads busy for 1 / items_per_s each item) and the shares the broker and the driver take from the
same 2 cores. Writes ``bench/results/<out>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, running_pipeline, write_result
from bench.edge_cost import cpu_s
from bench.kafka_direct import direct
from bench.samples_nlp import sample_items, short_items


def broker_pid(port: int = 9092) -> int | None:
    found = subprocess.run(["pgrep", "-f", f"kafka.Kafka .*kafka-{port}"], capture_output=True, text=True).stdout
    return int(found.split()[0]) if found.strip() else None


def run(n: int, rounds: int, texts: str) -> dict[str, Any]:
    label = "embed_short" if texts == "short" else "embed"
    args = ["--service", "nlp", "--n", "512", "--sizes", "32,64", "--labels", label]
    limit = subprocess.run(
        [sys.executable, "-m", "bench.model_limit", *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    best = json.loads(limit.stdout.strip().splitlines()[-1])[label]["best"]
    items = short_items(n) if texts == "short" else sample_items(n, task="embed")
    out: dict[str, Any] = {"n": n, "texts": texts, "model_best": best, "rounds": []}
    broker = broker_pid()
    with running_pipeline(["nlp"]) as pipeline:
        agent = pipeline.procs["nlp"].pid
        asyncio.run(direct(pipeline.settings, "nlp", items[:200]))  # warm-up
        for _ in range(rounds):
            before = {"agent": cpu_s(agent), "broker": cpu_s(broker) if broker else None, "driver": time.process_time()}
            wall0 = time.perf_counter()
            load = asyncio.run(direct(pipeline.settings, "nlp", items))
            wall = time.perf_counter() - wall0
            after = {"agent": cpu_s(agent), "broker": cpu_s(broker) if broker else None, "driver": time.process_time()}
            spent = {k: (after[k] - before[k]) if after[k] is not None and before[k] is not None else None
                     for k in before}  # fmt: skip
            out["rounds"].append({
                "items_per_s": load.get("items_per_s"),
                "of_model_best": round(float(load.get("items_per_s") or 0) / best["items_per_s"], 3),
                "wall_s": round(wall, 3),
                "cores": {k: None if v is None else round(v / wall, 3) for k, v in spent.items()},
                "us_per_item": {k: None if v is None else round(v / n * 1e6) for k, v in spent.items()},
            })  # fmt: skip
    out["model_cpu_us_per_item_2_threads"] = round(2 / best["items_per_s"] * 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--texts", choices=["short", "review"], default="short")
    parser.add_argument("--out", default="kafka_direct_cpu")
    args = parser.parse_args()
    result = run(args.n, args.rounds, args.texts)
    print(json.dumps({k: v for k, v in result.items() if k != "model_best"}, indent=1))
    print(write_result(args.out, result))


if __name__ == "__main__":
    main()
