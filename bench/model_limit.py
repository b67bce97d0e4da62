"""The model's own limit: a service's runner called in this process, at batch 1 and at several batch sizes.

``model_limit(service, {label: items}, sizes)`` (a label is a task name, or e.g. ``mix``) loads the runner
once and, per label, runs every item at batch 1 (``run_batch([item])`` each) and then in chunks of each
size. It reports items/s per size, the best size, and for the LLM the generated tokens/s (the sum of the
outputs' ``tokens``). No Kafka, no HTTP: the ceiling the pipeline is compared with. Failures are counted
per size, never hidden. The runner is dropped afterwards (its memory goes back once collected).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Mapping, Sequence

from agents.runner import Failure, Item
from agents.worker import build_runner
from bench.common import base_settings


def model_limit(service: str, tasks: Mapping[str, list[Item]], sizes: Sequence[int]) -> dict[str, object]:
    """Per task: items/s (and tokens/s for the LLM) at batch 1 and at each of ``sizes``; the best size."""
    runner = build_runner(service, base_settings())  # type: ignore[arg-type]
    t0 = time.perf_counter()
    runner.load()
    out: dict[str, object] = {"load_s": round(time.perf_counter() - t0, 2), "model": {}}
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
