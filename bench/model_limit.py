"""The model's own limit: a service's runner called in this process, at batch 1 and at several batch sizes.

``model_limit(service, {label: items}, sizes)`` (a label is a task name, or e.g. ``mix``) loads the runner
once and, per label, runs every item at batch 1 (``run_batch([item])`` each) and then in chunks of each
size. It reports items/s per size, the best size, and for the LLM the generated tokens/s (the sum of the
outputs' ``tokens``) and the runtime that produced them (``runtime``: llama_cpp for the shipped GGUF on CPU).
No Kafka, no HTTP: the ceiling the pipeline is compared with. Failures are counted
per size, never hidden.

``python -m bench.model_limit --service nlp --n 256 [--llm-n 16 --llm-max-tokens 16] --sizes 8,32,64
[--labels embed_short]`` runs one service's default workload (``workload``; only the labels given) and prints
the result as JSON on its last line. The suite runs each service so, in a process of its own, as the agents run
(and each runner's memory goes with it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
from collections.abc import Mapping, Sequence

from agents.runner import Failure, Item
from agents.worker import build_runner
from bench.common import base_settings
from bench.samples_data import sample_items as data_items
from bench.samples_llm import sample_items as llm_items
from bench.samples_nlp import sample_items as nlp_items
from bench.samples_nlp import short_items
from bench.samples_vision import sample_items as vision_items


def model_limit(service: str, tasks: Mapping[str, list[Item]], sizes: Sequence[int]) -> dict[str, object]:
    """Per task: items/s (and tokens/s for the LLM) at batch 1 and at each of ``sizes``; the best size."""
    runner = build_runner(service, base_settings())  # type: ignore[arg-type]
    t0 = time.perf_counter()
    runner.load()
    out: dict[str, object] = {"load_s": round(time.perf_counter() - t0, 2), "model": {}}
    if service == "llm":  # which engine the figure is of: llama_cpp (a GGUF on CPU) or torch (agents.llm)
        out["runtime"] = getattr(runner, "runtime", "torch")
    for task, items in tasks.items():
        with contextlib.suppress(Exception):  # a label such as "mix" names no task of the runner
            out["model"][task] = runner.model_for(items[0].task if items else task)  # type: ignore[index]
        per: dict[str, object] = {}
        for size in dict.fromkeys(max(1, min(s, len(items))) for s in (1, *sizes)):  # past len(items): the same run
            failures = 0
            tokens = 0
            start = time.perf_counter()
            for i in range(0, len(items), size):
                for outcome in runner.run_batch(items[i : i + size]):
                    if isinstance(outcome, Failure):
                        failures += 1
                    else:
                        tokens += int(outcome.get("tokens", 0) or 0)  # type: ignore[call-overload]
            elapsed = time.perf_counter() - start
            point: dict[str, object] = {
                "items": len(items),
                "seconds": round(elapsed, 3),
                "items_per_s": round(len(items) / elapsed, 2),
                "failures": failures,
            }
            if service == "llm":
                point["tokens"] = tokens
                point["tokens_per_s"] = round(tokens / elapsed, 2)
            per[f"batch_{size}"] = point
        key = "tokens_per_s" if service == "llm" else "items_per_s"
        best = max((k for k in per), key=lambda k: per[k][key])  # type: ignore[index]
        per["best"] = {"batch": int(best.split("_")[1]), **per[best]}  # type: ignore[dict-item]
        out[task] = per
    del runner
    gc.collect()
    return out


def llm_greedy(n: int, max_tokens: int) -> list[Item]:
    """``n`` greedy completions of the fixed prompt set, ``max_tokens`` each."""
    return [Item(i.task, {**i.input, "max_tokens": max_tokens}) for i in llm_items(n, greedy_only=True)]


def workload(service: str, n: int, llm_n: int, llm_max_tokens: int) -> dict[str, list[Item]]:
    """The default items per service: nlp embed and sentiment of reviews and embed of short texts
    (``embed_short``: the same texts ``bench.kafka_direct`` sends), data analyze, llm greedy completions, vision
    mix."""
    if service == "nlp":
        return {
            "embed": nlp_items(n, task="embed"),
            "sentiment": nlp_items(n, task="sentiment"),
            "embed_short": short_items(n),
        }
    if service == "data":
        return {"analyze": data_items(n)}
    if service == "llm":
        return {"completion": llm_greedy(llm_n, llm_max_tokens)}
    return {"mix": vision_items(n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service", required=True, choices=["nlp", "data", "llm", "vision"])
    parser.add_argument("--n", type=int, default=256, help="items per task (nlp, data, vision)")
    parser.add_argument("--llm-n", type=int, default=16)
    parser.add_argument("--llm-max-tokens", type=int, default=16)
    parser.add_argument("--sizes", default="8,32", help="batch sizes besides 1, comma-separated")
    parser.add_argument("--labels", default="", help="only these labels of the workload, comma-separated")
    args = parser.parse_args()
    tasks = workload(args.service, args.n, args.llm_n, args.llm_max_tokens)
    if args.labels:
        tasks = {label: items for label, items in tasks.items() if label in args.labels.split(",")}
    result = model_limit(args.service, tasks, [int(x) for x in args.sizes.split(",") if x])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
