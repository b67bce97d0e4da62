"""``POST /ai/nlp/process``: sentiment, embeddings, similarity, zero-shot classification."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.responses import Response

from api.async_requests import ASYNC_RESPONSES
from api.errors import SERVICE_RESPONSES
from api.serving import RequestServing, serving
from schemas.nlp import NlpRequest

router = APIRouter(tags=["nlp"])


@router.post("/ai/nlp/process", responses=SERVICE_RESPONSES | ASYNC_RESPONSES)
async def process(body: NlpRequest, serve: RequestServing = Depends(serving)) -> Response:
    """Run an NLP task on ``text`` or ``texts``; the body of a 200 is the reply event (202: ``api.async_requests``)."""
    return await serve("nlp", body.task, body.to_input(), cache=body.cache)
