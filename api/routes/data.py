"""``POST /data/process``: the data service (task ``analyze``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import ORJSONResponse

from api.deps import get_edge, request_id
from api.edge import Edge
from api.errors import SERVICE_RESPONSES, reply_response
from schemas.data import DataProcessRequest

router = APIRouter(tags=["data"])


@router.post("/data/process", responses=SERVICE_RESPONSES)
async def process(
    body: DataProcessRequest, edge: Edge = Depends(get_edge), rid: str | None = Depends(request_id)
) -> ORJSONResponse:
    """Run a data operation on records; the body of a 200 is the reply event."""
    reply = await edge.call("data", body.operation, body.data.model_dump(), cache=body.cache, request_id=rid)
    return reply_response(reply)
