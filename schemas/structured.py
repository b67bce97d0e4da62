"""Structured outputs: OpenAI's ``response_format``, checked and compiled to a llama.cpp grammar (GBNF).

``ResponseFormat`` is the request field as OpenAI and vLLM accept it on ``/v1/chat/completions`` and
``/v1/completions``: ``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema",
"json_schema": {"name", "schema", "strict", "description"}}``. The native ``/ai/llm/completion`` takes the
same object, or a bare ``json_schema`` (the schema itself) as a shortcut.

``grammar_for(fmt)`` is the GBNF text that constrains decoding to it: ``json_object`` any JSON object
(llama-cpp-python's ``JSON_GBNF`` with its root an object), ``json_schema`` the schema converted by
llama-cpp-python's ``json_schema_to_gbnf`` (llama.cpp's own converter, ported: ``$ref`` within the document,
``enum``/``const``, ``anyOf``/``oneOf``, ``minLength``/``maxLength``, ``minItems``/``maxItems``, ``pattern``,
numeric ranges; whitespace between tokens at most one space). It is cached per schema (its JSON text;
``functools.lru_cache``): the edge compiles once per schema to answer a bad one with a 400 before anything is
queued, and each agent compiles once per schema for its rows. ``strict`` is accepted and always holds: the
output is generated inside the grammar, never generated and retried.

What can go wrong (``StructuredOutputError``, a 400 naming the problem): a schema the converter cannot compile
(a remote ``$ref``, an unknown ``format`` it does not know is skipped by the converter, not refused), a schema
over ``MAX_SCHEMA_BYTES`` once serialised, or a ``json_schema`` format without its schema. A grammar that
compiles here but that llama.cpp's parser refuses fails that request in the agent (``invalid_input``).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

MAX_SCHEMA_BYTES = 64 * 1024


class StructuredOutputError(ValueError):
    """A ``response_format`` that cannot be enforced; the message names why."""


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``, as OpenAI defines it."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    name: str = Field(default="response", min_length=1, max_length=64)
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def grammar_for(fmt: ResponseFormat | None) -> str | None:
    """The GBNF text that constrains decoding to ``fmt``; None when nothing is constrained (``text``).

    Raises:
        StructuredOutputError: the format cannot be enforced (see the module docstring).
    """
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return _json_object_grammar()
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise StructuredOutputError("response_format: type json_schema needs json_schema.schema")
    try:
        text = orjson.dumps(fmt.json_schema.schema_).decode()  # properties keep their order: the output's order
    except orjson.JSONEncodeError as exc:  # Python's json (a native route's body) keeps integers past 64 bits
        raise StructuredOutputError(f"response_format: the schema cannot be encoded as JSON ({exc})") from exc
    if len(text) > MAX_SCHEMA_BYTES:
        raise StructuredOutputError(f"response_format: the schema is over {MAX_SCHEMA_BYTES} bytes")
    return _schema_grammar(text)


@functools.lru_cache(maxsize=1)
def _json_object_grammar() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF.replace("root   ::= object", "root ::= object", 1).strip() + "\n"


@functools.lru_cache(maxsize=256)
def _schema_grammar(canonical: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(canonical))
    except RecursionError as exc:
        raise StructuredOutputError("response_format: the schema nests too deeply") from exc
    except Exception as exc:  # the converter raises bare exceptions for what it does not support
        detail = str(exc) or type(exc).__name__
        raise StructuredOutputError(f"response_format: the schema cannot be enforced: {detail}"[:300]) from exc
