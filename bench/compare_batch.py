"""Replay one recorded NLP stream into two deployments that differ only in ``max_batch``, and compare.

The streams tooling end to end, as an operator would use it to judge a change:

1. two agent deployments on their own topic prefixes: A with ``AISEMBLE_NLP__MAX_BATCH=1`` (one request
   per model call), B with the default natural micro-batches (``max_batch`` 64);
2. ``aisemble produce nlp`` sends ``--n`` embed/sentiment requests to A (``--collect``), ``aisemble record
   nlp --last N --with-replies`` captures them;
3. ``aisemble replay --max --prefix A`` and ``--prefix B`` re-publish the recording into each, with
   reports and plots; ``aisemble replay --compare`` prints them side by side.

Run with Kafka and Redis up (``aisemble infra up``); writes bench/results/compare_batch/{a,b}/ and
compare.txt. Bounded: each replay has a timeout; every process started is stopped by PID.

    python bench/compare_batch.py --n 600
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aisemble.pipeline import Pipeline
from bench.samples_nlp import sample_items
from streams.settings import Settings

OUT = Path(__file__).parent / "results" / "compare_batch"


def _cli(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "aisemble", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"aisemble {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="requests recorded and replayed")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    base = Settings()
    single = Pipeline.isolated(base, [], OUT, AISEMBLE_NLP__MAX_BATCH="1")
    batched = Pipeline.isolated(base, [], OUT)
    try:
        for pipeline in (single, batched):
            pipeline.add_agent("nlp")
        inputs = OUT / "inputs.jsonl"
        with inputs.open("wb") as out:
            for item in sample_items(args.n):
                if item.task in ("embed", "sentiment"):
                    out.write(orjson.dumps({"task": item.task, "input": item.input}) + b"\n")
        env = {**single.env}
        _cli(env, "produce", "nlp", str(inputs), "--rate", "100", "--collect", timeout=900)
        recording = OUT / "recording.jsonl"
        _cli(env, "record", "nlp", "--out", str(recording), "--last", str(args.n), "--with-replies")
        reports = {}
        for name, pipeline in (("a", single), ("b", batched)):
            report = OUT / name
            _cli(env, "replay", str(recording), "--max", "--prefix", pipeline.prefix, "--report", str(report),
                 "--timeout", "600", timeout=900)  # fmt: skip
            reports[name] = json.loads((report / "report.json").read_text())
        compare = _cli(env, "replay", "--compare", str(OUT / "a" / "report.json"), str(OUT / "b" / "report.json"))
        (OUT / "compare.txt").write_text(compare)
        print(compare)
    finally:
        for pipeline in (single, batched):
            pipeline.stop()
            pipeline.drop_topics()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
