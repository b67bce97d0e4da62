"""The nlp agent's micro-batch cap, Kafka-direct, beside the model's own best batch, in one run.

    python bench/nlp_batch.py [--sizes 32,64] [--short 2000] [--reviews 1000]

1. The model alone (``bench.model_limit`` in a process of its own): embed items/s at each batch size, for short
   texts (9-15 words, ``bench.samples_nlp.short_items``) and review-length texts.
2. For each cap in ``--sizes``: an isolated pipeline with only the nlp agent at ``AISEMBLE_NLP__MAX_BATCH=cap``;
   a warm-up, then every short text produced at once to the request topic (``bench.kafka_direct.direct``) and
   timed until every reply is back, then the reviews likewise: items/s and the mean batch the agent formed.

Writes ``bench/results/nlp_batch.json``: per cap and text kind the agent's items/s, its ratio to the model's best
batch, and the mean batch size. Issue #15's target: Kafka-direct embed on short texts >= 0.85x the model's best.
What can go wrong: the machine is shared; the figures of one run move together, read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, running_pipeline, write_result
from bench.kafka_direct import direct
from bench.samples_nlp import sample_items, short_items


def model_best(sizes: list[int]) -> dict[str, dict[str, float]]:
    """items/s per batch size of the model alone, for ``embed_short`` and ``embed``."""
    args = ["--service", "nlp", "--n", "512", "--sizes", ",".join(map(str, sizes)), "--labels", "embed_short,embed"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.model_limit", *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        k: {b: data[k][b]["items_per_s"] for b in data[k] if b.startswith("batch_")} for k in ("embed_short", "embed")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,64")
    parser.add_argument("--short", type=int, default=2000)
    parser.add_argument("--reviews", type=int, default=1000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    model = model_best(sizes)
    out: dict[str, Any] = {"model_items_per_s": model, "agent": {}}
    for cap in sizes:
        with running_pipeline(["nlp"], None, AISEMBLE_NLP__MAX_BATCH=str(cap)) as pipeline:
            asyncio.run(direct(pipeline.settings, "nlp", short_items(200)))  # warm the model and the reply path
            for kind, items in (
                ("embed_short", short_items(args.short)),
                ("embed", sample_items(args.reviews, task="embed")),
            ):
                run = asyncio.run(direct(pipeline.settings, "nlp", items))
                best = max(model[kind].values())
                rate = float(run["items_per_s"])  # type: ignore[arg-type]
                out["agent"][f"{kind}_cap{cap}"] = {
                    "items_per_s": rate,
                    "ratio_to_model_best": round(rate / best, 3) if best else None,
                    "batch_size_mean": run.get("batch_size_mean"),
                    "missing": run.get("missing"),
                }
                print(f"cap {cap} {kind}: {rate} items/s = {rate / best:.2f}x the model's best ({best})", flush=True)
    print(f"-> {write_result('nlp_batch', out)}")


if __name__ == "__main__":
    main()
