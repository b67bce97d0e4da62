"""``POST /ai/nlp/process``: sentiment, embeddings, similarity, zero-shot classification."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import ORJSONResponse

from api.deps import get_edge, request_id
from api.edge import Edge
from api.errors import SERVICE_RESPONSES, reply_response
from schemas.nlp import NlpRequest

router = APIRouter(tags=["nlp"])


@router.post("/ai/nlp/process", responses=SERVICE_RESPONSES)
async def process(
    body: NlpRequest, edge: Edge = Depends(get_edge), rid: str | None = Depends(request_id)
) -> ORJSONResponse:
    """Run an NLP task on ``text`` or ``texts``; the body of a 200 is the reply event."""
    reply = await edge.call("nlp", body.task, body.to_input(), cache=body.cache, request_id=rid)
    return reply_response(reply)
