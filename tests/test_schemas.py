"""The wire contract: generated JSON Schema files are current, and the models enforce it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.export import render, stale
from schemas.llm import CompletionInput
from schemas.nlp import NlpInput, NlpRequest
from schemas.vision import VisionInput


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
