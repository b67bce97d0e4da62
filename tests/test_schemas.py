"""The wire contract: generated JSON Schema files are current, and the models enforce it."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from schemas.data import DataProcessRequest
from schemas.export import render, stale
from schemas.llm import CompletionInput, LlmCompletionRequest
from schemas.nlp import NlpInput, NlpRequest
from schemas.vision import VisionInput, VisionRequest


def test_schema_files_are_current() -> None:
    assert stale() == [], "run 'aisemble schemas export' and commit schemas/jsonschema/"


def test_every_schema_names_itself() -> None:
    for name, content in render().items():
        assert f'"$id": "https://aisemble.dev/schemas/{name}"'.encode() in content


def test_brief_payloads_validate() -> None:
    assert CompletionInput.model_validate(
        {"prompt": "Hello, this is a test prompt.", "max_tokens": 20, "temperature": 0.1}
    )
    req = NlpRequest.model_validate({"text": "This is a great product! I love it.", "task": "sentiment"})
    assert req.to_input() == {"text": "This is a great product! I love it.", "normalize": True}


@pytest.mark.parametrize(
    "payload",
    [{}, {"text": "a", "texts": ["b"]}, {"texts": []}],
)
def test_nlp_needs_exactly_one_of_text_or_texts(payload: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        NlpInput.model_validate(payload)


def test_llm_input_bounds_and_reproducibility() -> None:
    with pytest.raises(ValidationError):
        CompletionInput.model_validate({"prompt": "x", "max_tokens": 0})
    with pytest.raises(ValidationError):
        CompletionInput.model_validate({"prompt": "x", "stop": [""]})
    assert CompletionInput.model_validate({"prompt": "x", "stop": "\n"}).stop == ["\n"]
    assert CompletionInput.model_validate({"prompt": "x", "temperature": 0}).reproducible
    assert not CompletionInput.model_validate({"prompt": "x"}).reproducible


def test_vision_needs_exactly_one_image() -> None:
    with pytest.raises(ValidationError):
        VisionInput.model_validate({})
    with pytest.raises(ValidationError):
        VisionInput.model_validate({"image_b64": "aGk=", "image_ref": "k"})


def test_one_of_rules_are_in_the_json_schema() -> None:
    nlp = NlpRequest.model_json_schema()
    assert [b["required"] for b in nlp["oneOf"]] == [["text"], ["texts"]]
    vision = VisionInput.model_json_schema()
    assert [b["required"] for b in vision["oneOf"]] == [["image_b64"], ["image_ref"]]
    # an explicit null counts as absent, in the schema (non-null branch types) as in the validator
    assert NlpInput.model_validate({"text": None, "texts": ["a"]}).all_texts() == ["a"]


@pytest.mark.parametrize(
    ("model", "payload"),
    [
        (DataProcessRequest, {"operation": "analyze", "data": {"records": []}, "cache": 0}),
        (NlpRequest, {"task": "embed", "text": "a", "cache": "true"}),
        (NlpRequest, {"task": "embed", "text": "a", "normalize": 1}),
        (LlmCompletionRequest, {"prompt": "x", "cache": 1}),
        (LlmCompletionRequest, {"prompt": "x", "max_tokens": "5"}),
        (VisionRequest, {"task": "describe", "image_b64": "aGk=", "cache": 0}),
        (VisionRequest, {"task": "describe", "image_b64": "aGk=", "extra": 1}),
    ],
)
def test_http_bodies_are_strict(model: type[BaseModel], payload: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        model.model_validate(payload)


def test_http_bodies_keep_json_numbers_and_stop_strings() -> None:
    req = LlmCompletionRequest.model_validate({"prompt": "x", "temperature": 0, "stop": "\n", "cache": False})
    assert req.temperature == 0.0 and req.stop == ["\n"] and req.cache is False
