"""LLM service (``llm``): text completion.

Task ``completion``: input ``{"prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos",
"min_tokens"}``, output ``{"text", "tokens", "finish_reason", "prompt_tokens"}``.

Task ``chat``: input ``{"messages": [{"role", "content"}, ...], "max_tokens", "temperature", "top_p", "seed",
"stop", "ignore_eos", "min_tokens"}``; the agent renders the messages with the model's chat template (generation
prompt added) and completes that; output as ``completion``.

``ignore_eos`` and ``min_tokens`` are vLLM's extensions, which benchmarks (``vllm bench serve``, AIPerf) send to
fix output lengths: with ``ignore_eos`` an end-of-sequence token does not end the row (it ends at
``max_tokens`` or a stop string); with ``min_tokens`` neither an EOS nor a stop string ends it before
``min_tokens`` generated tokens. ``min_tokens > max_tokens`` is refused, naming both.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator, model_validator

from schemas.http import JsonInt, WireSafe
from schemas.structured import ResponseFormat, StructuredOutputError, grammar_for

LLM_TASKS = ("completion", "chat")
MAX_MESSAGES = 256
MAX_PROMPT_CHARS = 16_000
MAX_NEW_TOKENS = 1024


class SamplingInput(BaseModel):
    """The generation parameters shared by ``completion`` and ``chat``."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: JsonInt = Field(default=100, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: JsonInt | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Annotated[
        list[str] | None,
        WithJsonSchema(  # what the validators below accept: one string or up to 4, none empty
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
                    {"type": "null"},
                ],
                "default": None,
            }
        ),
    ] = Field(default=None, max_length=4)
    ignore_eos: bool = Field(
        default=False, description="true: an end-of-sequence token does not end the output (vLLM's extension)."
    )
    min_tokens: JsonInt = Field(
        default=0,
        ge=0,
        le=MAX_NEW_TOKENS,
        description="Neither EOS nor a stop string ends the output before this many generated tokens (vLLM's).",
    )

    response_format: ResponseFormat | None = Field(
        default=None,
        description=(
            "OpenAI's response_format: text, json_object or json_schema ({name, schema, strict}); the output is "
            "generated inside the schema's grammar (schemas.structured; the llama.cpp runtime)."
        ),
    )

    @field_validator("response_format")
    @classmethod
    def _format_compiles(cls, value: ResponseFormat | None) -> ResponseFormat | None:
        try:
            grammar_for(value)
        except StructuredOutputError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @property
    def grammar(self) -> str | None:
        """The GBNF grammar of ``response_format`` (compiled once per schema), None when unconstrained."""
        return grammar_for(self.response_format)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not s for s in value):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    @field_validator("min_tokens")
    @classmethod
    def _min_within_max(cls, value: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if isinstance(max_tokens, int) and value > max_tokens:
            raise ValueError(f"min_tokens ({value}) must not exceed max_tokens ({max_tokens})")
        return value

    @property
    def reproducible(self) -> bool:
        """Greedy decoding or an explicit seed gives the same text for the same input."""
        return self.temperature == 0.0 or self.seed is not None


class CompletionInput(SamplingInput):
    """Input of the ``completion`` task."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class ChatMessage(BaseModel):
    """One message of a ``chat`` input."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatInput(SamplingInput):
    """Input of the ``chat`` task: the conversation so far; the reply is the assistant's next message."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


class CompletionOutput(BaseModel):
    """Output of ``completion`` and ``chat``."""

    text: str
    tokens: int = Field(description="Generated tokens (the stop sequence included when it was hit).")
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int | None = Field(default=None, description="Tokens of the prompt as the model saw it.")


class LlmCompletionRequest(CompletionInput, WireSafe):
    """HTTP body of ``POST /ai/llm/completion``; strict types (``"cache": 0`` and ``"max_tokens": "5"`` fail)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    cache: bool | None = Field(default=None, description="true: use the result cache; false: bypass it.")
    stream: bool = Field(
        default=False,
        description="true: answer as server-sent events (event: delta {text}, then event: done with the reply event).",
    )

    json_schema: dict[str, object] | None = Field(
        default=None,
        description="A JSON Schema the output must follow (response_format json_schema, shorter).",
    )

    @model_validator(mode="before")
    @classmethod
    def _json_schema_as_format(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("json_schema") is not None:
            if data.get("response_format") is not None:
                raise ValueError("give json_schema or response_format, not both")
            data = {**data, "response_format": {"type": "json_schema", "json_schema": {"schema": data["json_schema"]}}}
        return data

    def to_input(self) -> dict[str, object]:
        return self.model_dump(exclude={"cache", "stream", "json_schema"}, exclude_none=True)
