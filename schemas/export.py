"""JSON Schema files generated from the pydantic models (``aisemble schemas export``).

``render()`` is the single source: ``export`` writes it to ``schemas/jsonschema/``, and a test compares
it with the files on disk, so a model change without a re-export fails the tests.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from pydantic import BaseModel

from schemas.data import AnalyzeInput, AnalyzeOutput, DataProcessRequest
from schemas.events import DeadLetterEvent, PartialBatchEvent, ReplyEvent, RequestEvent
from schemas.http import ErrorBody
from schemas.llm import ChatInput, CompletionInput, CompletionOutput, LlmCompletionRequest
from schemas.nlp import (
    ClassifyOutput,
    EmbedOutput,
    NlpInput,
    NlpRequest,
    SentimentOutput,
    SimilarityOutput,
)
from schemas.vision import (
    ClassifyImageOutput,
    DescribeOutput,
    FacesOutput,
    ImageOutput,
    VisionInput,
    VisionRequest,
)

SCHEMA_DIR = Path(__file__).parent / "jsonschema"

MODELS: dict[str, type[BaseModel]] = {
    "request-event": RequestEvent,
    "reply-event": ReplyEvent,
    "partial-batch-event": PartialBatchEvent,
    "dead-letter-event": DeadLetterEvent,
    "data.analyze.input": AnalyzeInput,
    "data.analyze.output": AnalyzeOutput,
    "nlp.input": NlpInput,
    "nlp.sentiment.output": SentimentOutput,
    "nlp.embed.output": EmbedOutput,
    "nlp.similarity.output": SimilarityOutput,
    "nlp.classify.output": ClassifyOutput,
    "llm.completion.input": CompletionInput,
    "llm.completion.output": CompletionOutput,
    "llm.chat.input": ChatInput,
    "vision.input": VisionInput,
    "vision.detect_faces.output": FacesOutput,
    "vision.image.output": ImageOutput,
    "vision.describe.output": DescribeOutput,
    "vision.classify.output": ClassifyImageOutput,
    "http.data.process": DataProcessRequest,
    "http.nlp.process": NlpRequest,
    "http.llm.completion": LlmCompletionRequest,
    "http.vision.analyze": VisionRequest,
    "http.error": ErrorBody,
}


def render() -> dict[str, bytes]:
    """File name -> JSON Schema bytes, for every model of the contract."""
    out = {}
    for name, model in MODELS.items():
        schema = model.model_json_schema()
        schema["$id"] = f"https://aisemble.dev/schemas/{name}.json"
        out[f"{name}.json"] = orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    return out


def export(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema file; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in render().items():
        path = directory / name
        path.write_bytes(content)
        written.append(path)
    return written


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files missing or different from what the models say."""
    return [
        name
        for name, content in render().items()
        if not (directory / name).exists() or (directory / name).read_bytes() != content
    ]
