"""The edge at 1 client, MiniLM embed beside light work: py-spy at 1 kHz on the edge for 10 s each.

    python bench/profile_edge_embed.py [--out bench/results/profile]

Issue #15's 1-client REST embed gap: the same edge code per request, sampled at about 35 and 200 requests/s.
Writes ``edge-embed-1client.raw.txt`` and ``edge-light-1client.raw.txt`` (collapsed stacks) and prints, per
request, the samples of each and their top self-time functions. Needs ``make install-bench`` (py-spy).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, running_pipeline
from bench.edge_cost import DATA_PATH, NLP_PATH, closed_loop, embed_body, light_body


def self_per_request(raw: Path, requests: int, top: int = 6) -> tuple[float, list[tuple[str, float]]]:
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[stack.split(";")[-1].split(" (")[0]] += int(n)
        total += int(n)
    return total / requests, [(name, round(c / requests, 2)) for name, c in counts.most_common(top)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "profile")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).with_name("py-spy"))
    with running_pipeline(["nlp", "data"]) as pipeline:
        pids = {"edge": pipeline.procs["edge"].pid, "nlp_agent": pipeline.procs["nlp"].pid}
        asyncio.run(closed_loop(pipeline.url, NLP_PATH, embed_body, 1, 3, pids))  # warm the path
        for name, path, body in (("embed", NLP_PATH, embed_body), ("light", DATA_PATH, light_body)):
            raw = args.out / f"edge-{name}-1client.raw.txt"
            command = [spy, "record", "--nonblocking", "-d", "10", "-r", "1000", "-f", "raw", "-o", str(raw),
                       "-p", str(pids["edge"])]  # fmt: skip
            recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            load = asyncio.run(closed_loop(pipeline.url, path, body, 1, 10, pids))
            recorder.wait(timeout=60)
            per_request, top = self_per_request(raw, load["answered_200"])
            edge_us = load["cpu"]["edge"]["cpu_us_per_request"]
            print(f"{name}: {load['requests_per_s']} req/s, hops {load.get('hops_p50_ms')}, edge CPU {edge_us} us/req, "
                  f"samples/req {per_request:.2f}, top {top}")  # fmt: skip


if __name__ == "__main__":
    main()
