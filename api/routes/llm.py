"""``POST /ai/llm/completion``: text completion; with ``"stream": true`` as server-sent events (``api.streaming``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from api.async_requests import ASYNC_RESPONSES
from api.errors import SERVICE_RESPONSES
from api.quota_gate import settle_later
from api.serving import RequestServing, serving
from api.streaming import SSE_EVENT, NativeFormat, SseResponse
from schemas.llm import LlmCompletionRequest

router = APIRouter(tags=["llm"])

STREAM_RESPONSES: dict[int | str, dict[str, object]] = {
    **SERVICE_RESPONSES,
    **ASYNC_RESPONSES,
    200: {
        **SERVICE_RESPONSES[200],
        "content": {
            "text/event-stream": {
                "schema": SSE_EVENT,
                "description": "With stream: true: event: delta {text} ..., then event: done (the reply event) "
                "or event: error (an ErrorBody).",
            }
        },
    },
}


@router.post("/ai/llm/completion", responses=STREAM_RESPONSES)
async def completion(body: LlmCompletionRequest, serve: RequestServing = Depends(serving)) -> Response:
    """Complete a prompt; the body of a 200 is the reply event, or with ``stream: true`` its SSE stream
    (``stream: true`` wins over ``Prefer: respond-async``: the preference is then not applied)."""
    if body.stream:
        stream = await serve.stream("llm", "completion", body.to_input(), cache=body.cache)
        quota = serve.quota
        on_end = (lambda reply: settle_later(quota, reply)) if quota is not None else None
        return SseResponse(stream, NativeFormat(stream), keepalive_s=serve.edge.settings.sse_keepalive_s, on_end=on_end)
    return await serve("llm", "completion", body.to_input(), cache=body.cache)
