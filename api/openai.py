"""OpenAI-compatible request and response models, and the mapping to and from aisemble's requests and replies.

The ``/v1`` routes (``api.routes.openai``) speak the subset of OpenAI's API that the agents can serve, with
OpenAI's shapes for the fields that apply, so the official ``openai`` client works against the edge:

* ``POST /v1/chat/completions`` -> the llm task ``chat``; ``POST /v1/completions`` -> ``completion``.
  Fields: ``model``, ``messages`` (roles system/developer/user/assistant, content a string or a list of text
  parts; developer is sent as system, a message's ``name`` is ignored) or ``prompt`` (a string or a list of
  one string), ``max_tokens`` / ``max_completion_tokens`` (1..``MAX_NEW_TOKENS``; default 100 for chat, 16
  for completions as OpenAI's), ``temperature`` (0..2, default 1), ``top_p`` (0..1], default 1), ``seed``
  (>= 0), ``stop`` (a string or up to 4), ``n`` (1 only), ``stream``, ``stream_options.include_usage``
  (only with ``stream``), ``user`` (ignored), ``response_format`` (``text``, ``json_object``, ``json_schema``:
  the output is decoded inside the schema's grammar, ``schemas.structured``; a schema that cannot be compiled
  is a 400 naming ``response_format`` before anything is queued).
  (only with ``stream``), ``user`` (ignored), and vLLM's extensions that benchmarks send to fix output
  lengths, as top-level fields: ``ignore_eos`` (default false) and ``min_tokens`` (0..``max_tokens``; more is
  a 400 naming both, ``param`` ``min_tokens``).
* ``POST /v1/embeddings`` -> the nlp task ``embed`` (L2-normalised vectors): ``input`` a string or a list of
  up to ``MAX_TEXTS`` strings (token arrays are refused), ``encoding_format`` float or base64 (little-endian
  float32, as OpenAI's), ``user`` (ignored).
* ``GET /v1/models`` lists what the agents' heartbeats say they serve: the llm's models and the nlp embed
  model. A request's ``model`` must be one of the names of its service's models, or the service name itself
  (``llm`` for completions, ``nlp`` for embeddings); anything else is 404 ``model_not_found``.

Every other field, ``n`` other than 1, and any value out of range is a 400 in OpenAI's error shape,
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``, ``param`` naming the field.
These are the edge's own errors (``api.errors``: ``InvalidInputError`` with OpenAI's ``openai_code`` and
``param``, ``InvalidJsonError``, ``ModelNotFoundError``), rendered in OpenAI's shape for every path under
``/v1`` by ``api.errors.error_response``; every other error keeps its status there (401, 409, 413, 422 as 400,
429 with Retry-After, 503, 504), so the client raises its matching exceptions.
``usage.prompt_tokens`` is the agent's ``prompt_tokens`` (0 when an agent does not report it);
``system_fingerprint`` is null; ``id`` is ``chatcmpl-``/``cmpl-`` + the request id (also in ``X-Request-Id``).

What can go wrong: the model list is as fresh as the edge's last heartbeat read (every
``heartbeat_interval_s``); a model not yet announced is 404 until then (the service name always works).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Annotated, Literal, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from api.errors import EdgeError, InvalidInputError, InvalidJsonError, ModelNotFoundError, openai_body
from api.streaming import sse
from schemas import ReplyEvent, Service
from schemas.llm import MAX_MESSAGES, MAX_NEW_TOKENS, MAX_PROMPT_CHARS, ChatInput, CompletionInput
from schemas.nlp import MAX_TEXT_CHARS, MAX_TEXTS
from schemas.structured import ResponseFormat

MODEL_TASKS: dict[Service, tuple[str, ...]] = {"llm": ("completion", "chat"), "nlp": ("embed",)}
DONE = sse("[DONE]")


def _param(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "content")`` -> ``messages[0].content``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def from_validation(exc: ValidationError, prefix: tuple[int | str, ...] = ()) -> InvalidInputError:
    """The first validation error as OpenAI's 400 (``InvalidInputError``), naming its field (``param``)."""
    error = exc.errors()[0]
    # a union's member names ("str", "constrained-str", "list[str]") are noise in a field path
    noise = ("str", "int", "float", "bool")
    loc = tuple(p for p in error.get("loc", ()) if not (isinstance(p, str) and ("-" in p or "[" in p or p in noise)))
    param = _param((*prefix, *loc))
    if error["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
        return InvalidInputError(message, param=param, openai_code="unsupported_parameter")
    if error["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
        return InvalidInputError(message, param=param, openai_code="missing_required_parameter")
    return InvalidInputError(f"Invalid value for '{param}': {error['msg']}", param=param, openai_code="invalid_value")


def parse_body(raw: bytes) -> dict[str, object]:
    """The JSON object of a request body; ``InvalidJsonError`` (400) otherwise."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJsonError(f"We could not parse the JSON body of your request: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidJsonError("The request body must be a JSON object.")
    return data


# --- requests ------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Generation(_Strict):
    """What chat and completions share."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: StrictStr | list[StrictStr] | None = None
    n: Literal[1] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    response_format: ResponseFormat | None = None
    ignore_eos: StrictBool | None = None  # vLLM's extension
    min_tokens: int | None = Field(default=None, ge=0, le=MAX_NEW_TOKENS)  # vLLM's extension

    def check(self) -> None:
        """The rules between fields (``InvalidInputError``, OpenAI's 400, naming the field)."""
        if self.stream_options is not None and not self.stream:
            message = "Invalid value for 'stream_options': only allowed when 'stream' is true."
            raise InvalidInputError(message, param="stream_options", openai_code="invalid_value")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int | None, default_max_tokens: int) -> dict[str, object]:
        return {
            "max_tokens": max_tokens or default_max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "response_format": None if self.response_format is None else self.response_format.model_dump(),
            "ignore_eos": bool(self.ignore_eos),
            "min_tokens": self.min_tokens or 0,
        }


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | list[TextPart]
    name: StrictStr | None = None  # accepted, ignored

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)

    def check(self) -> None:
        super().check()
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            message = "Give 'max_tokens' or 'max_completion_tokens', not two different values."
            raise InvalidInputError(message, param="max_completion_tokens", openai_code="invalid_value")

    def to_input(self) -> dict[str, object]:
        """The ``chat`` task's input (validated by ``ChatInput``: ValidationError names its field)."""
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
        sampling = self._sampling(self.max_completion_tokens or self.max_tokens, 100)
        return ChatInput.model_validate({"messages": messages, **sampling}).model_dump(exclude_none=True)


class CompletionRequest(_Generation):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]

    def to_input(self) -> dict[str, object]:
        """The ``completion`` task's input (validated by ``CompletionInput``)."""
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        sampling = self._sampling(self.max_tokens, 16)
        return CompletionInput.model_validate({"prompt": prompt, **sampling}).model_dump(exclude_none=True)


class EmbeddingRequest(_Strict):
    model: str = Field(min_length=1, max_length=256)
    input: (
        Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
        | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]],
            Field(min_length=1, max_length=MAX_TEXTS),
        ]
    )
    encoding_format: Literal["float", "base64"] = "float"
    user: StrictStr | None = None

    def to_input(self) -> dict[str, object]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        return {"texts": texts, "normalize": True}


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: Mapping[str, object]) -> M:
    """``model`` from ``data``; ``InvalidInputError`` (OpenAI's 400) naming the first bad field otherwise."""
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from exc
    if isinstance(request, _Generation):
        request.check()
    return request


def to_input(request: ChatCompletionRequest | CompletionRequest | EmbeddingRequest) -> dict[str, object]:
    """The task input of ``request``; ``InvalidInputError`` (OpenAI's 400) when aisemble's own input rules refuse it."""
    try:
        return request.to_input()
    except ValidationError as exc:
        raise from_validation(exc) from exc


# --- models --------------------------------------------------------------------------------------------------


def served_models(models: Mapping[str, Mapping[str, str]]) -> dict[str, Service]:
    """Model names the /v1 routes serve -> their service, from the edge's heartbeat view (``Edge.models``)."""
    out: dict[str, Service] = {}
    for service, tasks in MODEL_TASKS.items():
        for task in tasks:
            name = models.get(service, {}).get(task)
            if name:
                out.setdefault(name, service)
    return out


def resolve_model(requested: str, service: Service, models: Mapping[str, Mapping[str, str]]) -> str:
    """The model name to report for a request naming ``requested``; 404 ``model_not_found`` when
    ``requested`` is neither ``service`` nor one of its served models."""
    served = served_models(models)
    if requested != service and served.get(requested) != service:
        names = sorted(name for name, s in served.items() if s == service)
        raise ModelNotFoundError(
            f"The model `{requested}` does not exist or you do not have access to it. "
            f"This endpoint serves: {', '.join([service, *names])}.",
            param="model",
        )
    if requested != service:
        return requested
    return next((name for name, s in served.items() if s == service), service)


def model_entry(name: str, service: Service) -> dict[str, object]:
    """One model as OpenAI lists it; ``owned_by`` names the service (``aisemble-llm``, ``aisemble-nlp``)."""
    return {"id": name, "object": "model", "created": 0, "owned_by": f"aisemble-{service}"}


def model_list(models: Mapping[str, Mapping[str, str]]) -> dict[str, object]:
    return {"object": "list", "data": [model_entry(name, service) for name, service in served_models(models).items()]}


# --- responses -----------------------------------------------------------------------------------------------


def _usage(output: Mapping[str, object]) -> dict[str, int]:
    completion = int(output.get("tokens") or 0)  # type: ignore[call-overload]
    prompt = int(output.get("prompt_tokens") or 0)  # type: ignore[call-overload]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_response(reply: ReplyEvent, model: str, created: int) -> dict[str, object]:
    output = reply.output or {}
    message = {"role": "assistant", "content": output.get("text", ""), "refusal": None}
    return {
        "id": f"chatcmpl-{reply.id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": output.get("finish_reason")}],
        "usage": _usage(output),
    }


def completion_response(reply: ReplyEvent, model: str, created: int) -> dict[str, object]:
    output = reply.output or {}
    finish = output.get("finish_reason")
    choice = {"text": output.get("text", ""), "index": 0, "logprobs": None, "finish_reason": finish}
    return {
        "id": f"cmpl-{reply.id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": _usage(output),
    }


def embedding_response(reply: ReplyEvent, model: str, encoding: Literal["float", "base64"]) -> dict[str, object]:
    output = reply.output or {}
    results = output.get("results")
    items: list[Mapping[str, object]] = list(results) if isinstance(results, list) else [output]
    data = []
    tokens = 0
    for index, item in enumerate(items):
        vector = item.get("vector") or []
        tokens += int(item.get("tokens") or 0)  # type: ignore[call-overload]
        embedding: object = (
            base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode() if encoding == "base64" else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


class _ChunkFormat:
    """What the chat and completion stream formats share: ids, the usage chunk, errors, ``[DONE]``."""

    kind = ""  # the chunks' "object"

    def __init__(self, request_id: str, model: str, include_usage: bool, created: int | None = None) -> None:
        self.id = request_id
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time()) if created is None else created

    def _chunk(self, choices: list[dict[str, object]], usage: dict[str, int] | None = None) -> bytes:
        chunk: dict[str, object] = {
            "id": self.id,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return sse(orjson.dumps(chunk))

    def _end(self, reply: ReplyEvent) -> list[bytes]:
        usage = [self._chunk([], _usage(reply.output or {}))] if self.include_usage else []
        return [*usage, DONE]

    def failure(self, error: EdgeError, reply: ReplyEvent | None) -> bytes:
        return sse(orjson.dumps(openai_body(error)))


class ChatChunks(_ChunkFormat):
    """``chat.completion.chunk`` events: the role first, then content deltas, the finish reason, [usage], [DONE]."""

    kind = "chat.completion.chunk"

    def _delta(self, delta: dict[str, object], finish_reason: object = None) -> bytes:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def opening(self) -> list[bytes]:
        return [self._delta({"role": "assistant", "content": ""})]

    def text(self, text: str) -> bytes:
        return self._delta({"content": text})

    def done(self, reply: ReplyEvent, remainder: str) -> list[bytes]:
        frames = [self.text(remainder)] if remainder else []
        finish = (reply.output or {}).get("finish_reason")
        return [*frames, self._delta({}, finish), *self._end(reply)]


class CompletionChunks(_ChunkFormat):
    """``text_completion`` events: text pieces, a last one with the finish reason, [usage], [DONE]."""

    kind = "text_completion"

    def _piece(self, text: str, finish_reason: object = None) -> bytes:
        return self._chunk([{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}])

    def opening(self) -> list[bytes]:
        return []

    def text(self, text: str) -> bytes:
        return self._piece(text)

    def done(self, reply: ReplyEvent, remainder: str) -> list[bytes]:
        frames = [self.text(remainder)] if remainder else []
        return [*frames, self._piece("", (reply.output or {}).get("finish_reason")), *self._end(reply)]
