"""The OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``.

Requests, responses, errors and stream chunks are in ``api.openai`` (its docstring lists what is supported).
These routes go through the ``Edge`` like the native ones: same Kafka path, batching, deadlines, in-flight
limit and cache policy (the llm's for completions: temperature 0 or seeded; embeddings are cached). A
streamed request (``stream: true``) is served by ``Edge.stream``: a cache hit comes as one chunk with the
whole text. Every error is in OpenAI's shape: the routes raise the edge's errors (``api.errors``) and its
one handler renders them in OpenAI's shape for every path under ``/v1``. The routes are left out of the
OpenAPI document: their contract is OpenAI's API reference, not aisemble's ``ErrorBody`` one.

Asynchronous requests (``Prefer: respond-async`` or ``?wait=false``, ``api.async_requests``) work on the
three POST routes except with ``stream: true`` (a stream is its own way of not waiting): 202 at once, and
``GET /requests/{id}`` later answers the OpenAI body (or OpenAI error) the synchronous call would have.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import ORJSONResponse, Response

from api.admission import admitted
from api.async_requests import register_renderer, submit
from api.auth import request_caller
from api.deps import get_edge, request_id
from api.edge import Edge
from api.errors import ModelNotFoundError, error_response, reply_error
from api.openai import (
    ChatChunks,
    ChatCompletionRequest,
    CompletionChunks,
    CompletionRequest,
    EmbeddingRequest,
    chat_response,
    completion_response,
    embedding_response,
    model_entry,
    model_list,
    parse_body,
    resolve_model,
    served_models,
    to_input,
    validate,
)
from api.quota_gate import quota_ticket, settle_later
from api.serving import wants_async
from api.streaming import SseResponse
from schemas import ReplyEvent

router = APIRouter(tags=["openai"], include_in_schema=False)

CHAT, COMPLETION, EMBEDDINGS = "openai.chat", "openai.completion", "openai.embeddings"


def _rendered(reply: ReplyEvent, context: Mapping[str, object]) -> Response:
    """An OpenAI body (or OpenAI error) from a reply; ``context`` says which (``api.async_requests``)."""
    if not reply.ok:
        return error_response(reply_error(reply), openai=True)
    model, kind = str(context.get("model", "")), context.get("kind")
    if kind == EMBEDDINGS:
        encoding: Literal["float", "base64"] = "base64" if context.get("encoding") == "base64" else "float"
        content = embedding_response(reply, model, encoding)
    else:
        created = int(context.get("created", 0))  # type: ignore[call-overload]
        content = (chat_response if kind == CHAT else completion_response)(reply, model, created)
    return ORJSONResponse(content, headers={"X-Request-Id": reply.id})


for _kind in (CHAT, COMPLETION, EMBEDDINGS):
    register_renderer(_kind, _rendered)


async def _generate(
    request: Request,
    edge: Edge,
    rid: str | None,
    model_cls: type[ChatCompletionRequest | CompletionRequest],
    respond_async: bool = False,
) -> Response:
    chat = model_cls is ChatCompletionRequest
    body = validate(model_cls, parse_body(await request.body()))
    model = resolve_model(body.model, "llm", edge.models)
    payload = to_input(body)
    task = "chat" if chat else "completion"
    quota = quota_ticket(request)
    if quota is not None:
        await quota.charge_tokens(payload, rid)  # the key's tpm (api.quota_gate); corrected by the usage below
    if body.stream:
        stream = await edge.stream("llm", task, payload, request_id=rid, admitted=admitted(request))
        chunk_id = f"{'chatcmpl' if chat else 'cmpl'}-{stream.request_id}"
        fmt = (
            ChatChunks(chunk_id, model, body.include_usage)
            if chat
            else CompletionChunks(chunk_id, model, body.include_usage)
        )
        on_end = (lambda reply: settle_later(quota, reply)) if quota is not None else None
        return SseResponse(stream, fmt, keepalive_s=edge.settings.sse_keepalive_s, on_end=on_end)
    context = {"model": model, "created": int(time.time()), "kind": CHAT if chat else COMPLETION}
    if respond_async:
        return await submit(edge, "llm", task, payload, request_id=rid, render=str(context["kind"]),
                            context=context, owner=request_caller(request).owner)  # fmt: skip
    reply = await edge.call("llm", task, payload, request_id=rid, admitted=admitted(request))
    if quota is not None:
        await quota.settle(reply)
    return _rendered(reply, context)


@router.post("/v1/chat/completions")
async def chat_completions(
    request: Request,
    edge: Edge = Depends(get_edge),
    rid: str | None = Depends(request_id),
    respond_async: bool = Depends(wants_async),
) -> Response:
    """OpenAI's chat completions on the llm task ``chat``."""
    return await _generate(request, edge, rid, ChatCompletionRequest, respond_async)


@router.post("/v1/completions")
async def completions(
    request: Request,
    edge: Edge = Depends(get_edge),
    rid: str | None = Depends(request_id),
    respond_async: bool = Depends(wants_async),
) -> Response:
    """OpenAI's (legacy) completions on the llm task ``completion``."""
    return await _generate(request, edge, rid, CompletionRequest, respond_async)


@router.post("/v1/embeddings")
async def embeddings(
    request: Request,
    edge: Edge = Depends(get_edge),
    rid: str | None = Depends(request_id),
    respond_async: bool = Depends(wants_async),
) -> Response:
    """OpenAI's embeddings on the nlp task ``embed`` (L2-normalised)."""
    body = validate(EmbeddingRequest, parse_body(await request.body()))
    model = resolve_model(body.model, "nlp", edge.models)
    context = {"model": model, "kind": EMBEDDINGS, "encoding": body.encoding_format}
    if respond_async:
        return await submit(edge, "nlp", "embed", to_input(body), request_id=rid, render=EMBEDDINGS,
                            context=context, owner=request_caller(request).owner)  # fmt: skip
    reply = await edge.call("nlp", "embed", to_input(body), request_id=rid, admitted=admitted(request))
    return _rendered(reply, context)


@router.get("/v1/models")
async def models(edge: Edge = Depends(get_edge)) -> ORJSONResponse:
    """The models the agents serve on these routes (from their heartbeats)."""
    return ORJSONResponse(model_list(edge.models))


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, edge: Edge = Depends(get_edge)) -> ORJSONResponse:
    """One model of ``/v1/models``; 404 ``model_not_found`` otherwise."""
    service = served_models(edge.models).get(model_id)
    if service is None:
        message = f"The model `{model_id}` does not exist or you do not have access to it."
        raise ModelNotFoundError(message, param="model")
    return ORJSONResponse(model_entry(model_id, service))
