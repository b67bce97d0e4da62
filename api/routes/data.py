"""``POST /data/process``: the data service (task ``analyze``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.responses import Response

from api.async_requests import ASYNC_RESPONSES
from api.errors import SERVICE_RESPONSES
from api.serving import RequestServing, serving
from schemas.data import DataProcessRequest

router = APIRouter(tags=["data"])


@router.post("/data/process", responses=SERVICE_RESPONSES | ASYNC_RESPONSES)
async def process(body: DataProcessRequest, serve: RequestServing = Depends(serving)) -> Response:
    """Run a data operation on records; the body of a 200 is the reply event (202: ``api.async_requests``)."""
    return await serve("data", body.operation, body.data.model_dump(), cache=body.cache)
