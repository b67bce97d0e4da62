"""``POST /ai/llm/completion``: text completion."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import ORJSONResponse

from api.deps import get_edge, request_id
from api.edge import Edge
from api.errors import SERVICE_RESPONSES, reply_response
from schemas.llm import LlmCompletionRequest

router = APIRouter(tags=["llm"])


@router.post("/ai/llm/completion", responses=SERVICE_RESPONSES)
async def completion(
    body: LlmCompletionRequest, edge: Edge = Depends(get_edge), rid: str | None = Depends(request_id)
) -> ORJSONResponse:
    """Complete a prompt; the body of a 200 is the reply event."""
    reply = await edge.call("llm", "completion", body.to_input(), cache=body.cache, request_id=rid)
    return reply_response(reply)
