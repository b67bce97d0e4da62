"""Structured outputs (``response_format``): compiled to a grammar, enforced while decoding, row by row.

Units: ``schemas.structured.grammar_for`` (text, json_object, json_schema, the errors it names, its cache).
Engine (the shipped SmolLM2 GGUF on llama.cpp, in process): rows constrained by their own schema, greedy and
sampled, next to an unconstrained row whose tokens stay those it gets alone, and a streamed row whose deltas
add up to the same valid JSON. End to end with the official ``openai`` client against a real pipeline:
``client.beta.chat.completions.parse`` with a pydantic model at temperature 0 and above, ``json_object``,
streaming, the native route's ``json_schema``, and a schema the edge cannot compile answered 400 before
anything is queued.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field, ValidationError

from agents.llm import build_runner
from agents.llm_llama import LlamaRunner
from agents.llm_rows import Finished, RowRequest
from aisemble.pipeline import Pipeline
from schemas.llm import ChatInput, LlmCompletionRequest
from schemas.structured import ResponseFormat, StructuredOutputError, _schema_grammar, grammar_for
from streams.settings import LlmSettings, Settings


class Person(BaseModel):
    name: str
    age: int


class Fruits(BaseModel):
    fruits: list[str] = Field(min_length=1, max_length=3)


PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _format(schema: dict[str, Any]) -> ResponseFormat:
    return ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


# -- units ------------------------------------------------------------------------------------------------------


def test_grammar_for_text_is_none_json_object_is_any_object_and_a_schema_its_own_rules() -> None:
    assert grammar_for(None) is None and grammar_for(ResponseFormat(type="text")) is None
    anything = grammar_for(ResponseFormat(type="json_object"))
    assert anything is not None and anything.startswith("root ::= object")
    person = grammar_for(_format(PERSON_SCHEMA))
    assert person is not None and "name-kv ::=" in person and "age-kv ::=" in person
    root = next(line for line in person.splitlines() if line.startswith("root ::="))
    assert root.index("name-kv") < root.index("age-kv")  # the schema's order, the output's order


def test_a_schema_that_cannot_be_enforced_is_an_error_naming_why() -> None:
    cases = {
        "Unsupported ref": {"$ref": "http://example.com/s.json"},
        "Unrecognized schema": {"type": "nonsense"},
    }
    for why, schema in cases.items():
        with pytest.raises(StructuredOutputError, match=why):
            grammar_for(_format(schema))
    with pytest.raises(StructuredOutputError, match=r"needs json_schema\.schema"):
        grammar_for(ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "x"}}))
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(700)}}
    with pytest.raises(StructuredOutputError, match="over 65536 bytes"):
        grammar_for(_format(huge))
    # Found by the HTTP fuzzer: the native route parses with Python's json, which keeps any integer; was a 500.
    with pytest.raises(StructuredOutputError, match=r"cannot be encoded as JSON \(Integer exceeds 64-bit range"):
        grammar_for(_format({"": -(2**63) - 1}))
    with pytest.raises(ValidationError, match="Integer exceeds 64-bit range"):
        LlmCompletionRequest.model_validate({"prompt": "0", "json_schema": {"maximum": 2**64}})


def test_a_schema_is_compiled_once() -> None:
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}
    before = _schema_grammar.cache_info()
    first = grammar_for(_format(schema))
    second = grammar_for(_format(json.loads(json.dumps(schema))))
    after = _schema_grammar.cache_info()
    assert first == second and after.misses == before.misses + 1 and after.hits == before.hits + 1


# -- the engine ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> LlamaRunner:
    settings = Settings(
        cache_dir=tmp_path_factory.mktemp("structured"),
        llm=LlmSettings.model_validate({"device": "cpu", "threads": 1, "max_batch": 8}),
    )
    built = build_runner(settings)
    assert isinstance(built, LlamaRunner)
    built.load()
    return built


def _chat(
    runner: LlamaRunner, key: str, prompt: str, schema: dict[str, Any] | None, stream: bool = False, **params: Any
) -> RowRequest:
    body = ChatInput.model_validate({"messages": [{"role": "user", "content": prompt}], "max_tokens": 60, **params})
    grammar = grammar_for(_format(schema)) if schema is not None else None
    return RowRequest(key, runner.encode(runner.weights(), body), body, None, stream, grammar)


def _drive(runner: LlamaRunner, rows: list[RowRequest]) -> tuple[dict[str, Finished], list[Any]]:
    def run() -> tuple[dict[str, Finished], list[Any]]:
        engine = runner.make_engine()
        for row in rows:
            engine.add(row)
        done: dict[str, Finished] = {}
        reports = []
        for _ in range(400):
            report = engine.step()
            reports.append(report)
            done.update({f.key: f for f in report.finished})
            if len(done) == len(rows):
                return done, reports
        raise AssertionError(f"not done: {sorted(done)}")

    return runner.compute(run)


def test_each_row_follows_its_own_schema_greedy_and_sampled_and_a_free_neighbour_is_untouched(
    runner: LlamaRunner,
) -> None:
    fruits_schema = Fruits.model_json_schema()
    rows = [
        _chat(runner, "person", "Invent a person. Answer in JSON with name and age.", PERSON_SCHEMA, temperature=0),
        _chat(runner, "hot", "Who is Ada Lovelace? Reply as JSON.", PERSON_SCHEMA, temperature=0.9, seed=11),
        _chat(runner, "fruits", "Name three fruits.", fruits_schema, temperature=0),
        _chat(runner, "free", "What is the capital of France?", None, temperature=0),
    ]
    done, _ = _drive(runner, rows)
    alone, _ = _drive(runner, [_chat(runner, "free", "What is the capital of France?", None, temperature=0)])
    for key, model in (("person", Person), ("hot", Person), ("fruits", Fruits)):
        outcome = done[key].outcome
        assert isinstance(outcome, dict) and outcome["finish_reason"] == "stop", outcome
        model.model_validate_json(str(outcome["text"]))  # parses and validates, or raises
    assert done["free"].ids == alone["free"].ids  # constrained neighbours change nothing for it
    assert not str(alone["free"].outcome["text"]).lstrip().startswith("{")  # type: ignore[index]


def test_a_streamed_constrained_row_sends_deltas_that_add_up_to_its_valid_json(runner: LlamaRunner) -> None:
    row = _chat(runner, "s", "Invent a person. Answer in JSON with name and age.", PERSON_SCHEMA, stream=True)
    done, reports = _drive(runner, [row])
    text = str(done["s"].outcome["text"])  # type: ignore[index]
    deltas = [d.text for r in reports for d in r.deltas if d.key == "s"]
    assert len([d for d in deltas if d]) >= 3 and "".join(deltas) == text
    Person.model_validate_json(text)


# -- end to end, the official client ----------------------------------------------------------------------------

API_KEY = "structured-test-key-0123456789"


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    p = Pipeline.isolated(
        infra_settings,
        ["llm"],
        Path(tmp_path_factory.mktemp("logs")),
        AISEMBLE_REQUEST_TIMEOUT_S="120",
        AISEMBLE_API_KEYS=json.dumps([API_KEY]),
        AISEMBLE_LLM__THREADS="1",
    ).start(timeout_s=600)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def client(pipeline: Pipeline) -> OpenAI:
    return OpenAI(base_url=f"{pipeline.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_official_client_parses_a_pydantic_model_at_temperature(client: OpenAI, temperature: float) -> None:
    completion = client.beta.chat.completions.parse(
        model="llm",
        messages=[{"role": "user", "content": "Invent a person. Answer in JSON with name and age."}],
        response_format=Person,
        temperature=temperature,
        seed=5,
        max_tokens=60,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content or "") == choice.message.parsed


@pytest.mark.integration
@pytest.mark.slow
def test_json_object_and_a_streamed_schema_come_back_as_json(client: OpenAI) -> None:
    fruits = client.chat.completions.create(
        model="llm",
        messages=[{"role": "user", "content": "Invent a person. Answer in JSON with name and age."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=80,
    )
    assert fruits.choices[0].finish_reason == "stop", fruits.choices[0]
    assert isinstance(json.loads(fruits.choices[0].message.content or ""), dict)
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    stream = client.chat.completions.create(
        model="llm",
        messages=[{"role": "user", "content": "Invent a person. Answer in JSON with name and age."}],
        response_format=schema,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) >= 3
    Person.model_validate_json("".join(pieces))


@pytest.mark.integration
@pytest.mark.slow
def test_a_schema_the_edge_cannot_compile_is_a_400_before_anything_is_queued(
    client: OpenAI, pipeline: Pipeline
) -> None:
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="llm",
            messages=[{"role": "user", "content": "Hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},  # type: ignore[typeddict-item]
        )
    assert caught.value.status_code == 400 and time.monotonic() - started < 5
    error = caught.value.body
    assert isinstance(error, dict) and error.get("param") == "response_format"
    assert "cannot be enforced" in str(error.get("message"))
    native = httpx.post(
        f"{pipeline.url}/ai/llm/completion",
        headers={"X-API-Key": API_KEY},
        json={"prompt": "Hi", "json_schema": {"$ref": "http://example.com/x"}},
        timeout=30,
    )
    assert native.status_code == 422 and "cannot be enforced" in native.text


@pytest.mark.integration
@pytest.mark.slow
def test_the_native_route_takes_a_json_schema(pipeline: Pipeline) -> None:
    answer = httpx.post(
        f"{pipeline.url}/ai/llm/completion",
        headers={"X-API-Key": API_KEY},
        json={
            "prompt": "Invent a person. Answer in JSON with name and age.",
            "json_schema": PERSON_SCHEMA,
            "max_tokens": 60,
            "temperature": 0,
            "cache": False,
        },
        timeout=180,
    )
    assert answer.status_code == 200, answer.text
    output = answer.json()["output"]
    assert output["finish_reason"] == "stop"
    Person.model_validate_json(output["text"])
