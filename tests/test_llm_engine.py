"""``agents.llm_engine.DecodeEngine`` on a tiny random Llama built in the test (no Kafka, no download).

The reference for greedy rows is ``model.generate(do_sample=False)`` on the prompt ALONE: the engine's
tokens must equal it exactly, for rows that start together, join mid-generation, or are chunk-prefilled.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from agents.llm import LlmRunner, build_runner
from agents.llm_engine import DecodeEngine, Finished, RowRequest, StepReport
from agents.runner import Failure, Item
from schemas.llm import CompletionInput
from streams.settings import LlmSettings, Settings
from tests.test_llm_tiny_model import SENTENCES, _save_model

PROMPTS = [
    "The quick brown fox",
    "Kafka moves events between services",
    "Paris is the capital of France, and Berlin is",
    "Tokens",
    "A small language model answers questions about the weather. The quick brown fox jumps over",
]


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmRunner]:
    before = torch.get_num_threads()
    folder = _save_model(tmp_path_factory.mktemp("tiny-llama"))
    settings = Settings(
        cache_dir=tmp_path_factory.mktemp("cache"),
        llm=LlmSettings(model=str(folder), device="cpu", threads=1, chat_template=False, max_batch=4),
    )
    built = build_runner(settings)
    built.load()
    yield built
    torch.set_num_threads(before)


def _engine(runner: LlmRunner, **overrides: int) -> DecodeEngine:
    engine = runner.make_engine()
    for name, value in overrides.items():
        setattr(engine, name, value)
    return engine


def _ids(runner: LlmRunner, prompt: str) -> list[int]:
    return list(runner._ready().tokenizer(prompt)["input_ids"])


def _row(runner: LlmRunner, key: str, prompt: str, stream: bool = False, **params: object) -> RowRequest:
    fields: dict[str, object] = {"prompt": prompt, "max_tokens": 12, "temperature": 0.0, **params}
    return RowRequest(key, _ids(runner, prompt), CompletionInput.model_validate(fields), None, stream)


def _reference(runner: LlmRunner, prompt: str, max_tokens: int) -> list[int]:
    """Greedy tokens of ``model.generate`` for the prompt alone."""
    loaded = runner._ready()
    ids = torch.tensor([_ids(runner, prompt)])
    with torch.inference_mode():
        out = loaded.model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=None,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    return [int(t) for t in out[0, ids.shape[1] :]]


def _run(
    engine: DecodeEngine, joins: dict[int, list[RowRequest]], limit: int = 400
) -> tuple[dict[str, Finished], list[StepReport]]:
    """Step until every row is done; ``joins[n]`` rows are added before step ``n``."""
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


def test_greedy_equals_generate_alone_together_and_joining_mid_generation(runner: LlmRunner) -> None:
    lengths = [12, 20, 7, 15, 10]
    rows = [_row(runner, f"r{i}", p, max_tokens=n) for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True))]
    finished, reports = _run(_engine(runner), {0: rows[:2], 3: rows[2:4], 9: rows[4:]})
    joined_while_running = 0
    for i, (prompt, n) in enumerate(zip(PROMPTS, lengths, strict=True)):
        got = list(finished[f"r{i}"].ids)
        assert got == _reference(runner, prompt, n), f"row {i} differs from generate alone"
        out = _ok(finished[f"r{i}"])
        assert out["tokens"] == n and out["finish_reason"] == "length"
        assert out["prompt_tokens"] == len(_ids(runner, prompt))
    joined_while_running = sum(1 for r in reports if r.prefilled_tokens and r.decoded_rows)
    print("ENGINE-GREEDY:", {"steps": len(reports), "steps_with_join_and_decode": joined_while_running})
    assert joined_while_running >= 2  # rows really joined a running batch


def test_more_rows_than_max_batch_wait_for_a_slot(runner: LlmRunner) -> None:
    engine = _engine(runner)  # max_batch 4
    rows = [_row(runner, f"q{i}", PROMPTS[i % len(PROMPTS)], max_tokens=3 + 2 * i) for i in range(7)]
    finished, reports = _run(engine, {0: rows})
    assert max(r.decoded_rows for r in reports) <= 4
    for i, row in enumerate(rows):
        assert list(finished[row.key].ids) == _reference(runner, PROMPTS[i % len(PROMPTS)], 3 + 2 * i)


def test_long_prompt_is_prefilled_in_chunks_and_still_exact(runner: LlmRunner) -> None:
    long_prompt = " ".join(SENTENCES)
    engine = _engine(runner, max_prefill_tokens=16)
    size = len(_ids(runner, long_prompt))
    assert size > 40
    short = _row(runner, "short", PROMPTS[0], max_tokens=30)
    long = _row(runner, "long", long_prompt, max_tokens=8)
    finished, reports = _run(engine, {0: [short], 2: [long]})
    assert list(finished["long"].ids) == _reference(runner, long_prompt, 8)
    assert list(finished["short"].ids) == _reference(runner, PROMPTS[0], 30)
    chunked = [r.prefilled_tokens for r in reports[2:] if r.prefilled_tokens]
    print("ENGINE-CHUNKS:", {"prompt_tokens": size, "prefill_per_step": chunked})
    assert all(n <= 16 for n in chunked) and sum(chunked) == size
    assert all(r.decoded_rows == 1 for r in reports[2 : 2 + len(chunked)])  # the short row kept decoding


def test_seeded_row_is_the_same_alone_and_among_others(runner: LlmRunner) -> None:
    def seeded() -> RowRequest:
        return _row(runner, "seeded", "The weather", max_tokens=14, temperature=1.0, seed=1234)

    alone, _ = _run(_engine(runner), {0: [seeded()]})
    others = [
        _row(runner, "a", "Paris", max_tokens=20, temperature=1.0),
        _row(runner, "b", "Paris", max_tokens=9, temperature=0.8, top_p=0.9, seed=99),
        _row(runner, "c", "Kafka", max_tokens=6),
    ]
    mixed, _ = _run(_engine(runner), {0: others[:2], 4: [seeded()], 6: others[2:]})
    assert mixed["seeded"].ids == alone["seeded"].ids
    assert _ok(mixed["seeded"]) == _ok(alone["seeded"])
    other_seed, _ = _run(
        _engine(runner), {0: [_row(runner, "seeded", "The weather", max_tokens=14, temperature=1.0, seed=4321)]}
    )
    assert other_seed["seeded"].ids != alone["seeded"].ids


def test_stop_string_cut_and_stream_deltas_concatenate_to_the_final_text(runner: LlmRunner) -> None:
    full, _ = _run(_engine(runner), {0: [_row(runner, "full", "Paris is", max_tokens=16)]})
    text = str(_ok(full["full"])["text"])
    pairs = [text[i : i + 2] for i in range(len(text) // 3, len(text) - 1)]
    visible = [p for p in pairs if p.isprintable() and p.strip()]
    assert visible, f"no visible stop string to pick from {text!r}"
    stop = visible[0]
    rows = [
        _row(runner, "cut", "Paris is", True, max_tokens=16, stop=[stop, "\x00never"]),
        _row(runner, "plain", PROMPTS[1], True, max_tokens=10),
        _row(runner, "quiet", PROMPTS[2], False, max_tokens=10),
        _row(runner, "cut-quiet", "Paris is", False, max_tokens=16, stop=[stop, "\x00never"]),
    ]
    finished, reports = _run(_engine(runner), {0: rows[:1], 2: rows[1:]})
    cut = _ok(finished["cut"])
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.find(stop)]
    static = runner.run_batch(
        [Item("completion", {"prompt": "Paris is", "max_tokens": 16, "temperature": 0, "stop": [stop, "\x00never"]})]
    )[0]
    assert static == cut  # the same cut and token count as the static path
    assert _ok(finished["cut-quiet"]) == cut  # a row that does not stream finds the stop in a tail window
    for key in ("cut", "plain"):
        deltas = [d for r in reports for d in r.deltas if d.key == key]
        assert "".join(d.text for d in deltas) == _ok(finished[key])["text"]
        assert len(deltas) == len({id(r) for r in reports if any(d.key == key for d in r.deltas)})  # one per step
    assert not [d for r in reports for d in r.deltas if d.key == "quiet"]
    plain = [d for r in reports for d in r.deltas if d.key == "plain"]
    assert sum(d.tokens for d in plain) == 10 and len(plain) == 10


def test_deadline_and_cancel_stop_a_row_and_the_others_go_on(
    runner: LlmRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1_000_000.0]
    engine = _engine(runner)
    monkeypatch.setattr(engine, "_clock_ms", lambda: now[0])
    late = RowRequest(
        "late", _ids(runner, "Kafka"), CompletionInput(prompt="Kafka", max_tokens=50, temperature=0), now[0] + 50
    )
    engine.add(late)
    engine.add(_row(runner, "gone", "Paris", max_tokens=50))
    engine.add(_row(runner, "kept", PROMPTS[0], max_tokens=12))
    finished: dict[str, Finished] = {}
    for step in range(40):
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
    assert len(finished["gone"].ids) == 0 and "after 3 generated tokens" in finished["gone"].outcome.message
    assert list(finished["kept"].ids) == _reference(runner, PROMPTS[0], 12)
    assert engine.active == 0


def test_a_model_failure_fails_that_steps_rows_and_the_engine_goes_on(
    runner: LlmRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(runner)
    model = runner._ready().model
    calls = {"n": 0}
    real = model.forward

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    finished, _ = _run(engine, {0: [_row(runner, "a", PROMPTS[0]), _row(runner, "b", PROMPTS[1])]})
    assert all(isinstance(f.outcome, Failure) and f.outcome.code == "model_error" for f in finished.values())
    assert "boom" in str(finished["a"].outcome)
    monkeypatch.setattr(model, "forward", real)
    again, _ = _run(engine, {0: [_row(runner, "c", PROMPTS[0], max_tokens=5)]})
    assert list(again["c"].ids) == _reference(runner, PROMPTS[0], 5)


def test_chat_task_renders_the_template(runner: LlmRunner) -> None:
    item = Item("chat", {"messages": [{"role": "user", "content": "Paris"}], "max_tokens": 4, "temperature": 0})
    request = runner.row_request("chat", item)
    assert isinstance(request, RowRequest)
    tokenizer = runner._ready().tokenizer
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Paris"}], tokenize=False, add_generation_prompt=True
    )
    assert list(request.ids) == list(tokenizer(str(rendered), add_special_tokens=False)["input_ids"])
    finished, _ = _run(_engine(runner), {0: [request]})
    static = runner.run_batch([item])[0]
    assert _ok(finished["chat"]) == static
    bad = runner.row_request("x", Item("chat", {"prompt": "no messages"}))
    assert isinstance(bad, Failure) and bad.code == "invalid_input"
    assert isinstance(runner.row_request("x", Item("nope", {})), Failure)
