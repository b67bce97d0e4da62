"""``GET /requests/{id}``: the result of an asynchronous request (see ``api.async_requests``).

202 with ``Retry-After`` while pending; once done, exactly what the synchronous call would have answered
(200 and the reply, or the error reply with its status); 504 ``timeout`` past the deadline without a
result; 404 ``not_found`` for an unknown or expired id; 503 when Redis cannot be read. Same API keys as the
service routes (``api.app`` mounts it with them); with keys, a result is answered only to the key that
submitted it, and any other key gets the 404 of an unknown id.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path
from starlette.responses import Response

from api.async_requests import ACCEPTED_HEADERS, AsyncAccepted, lookup
from api.auth import Caller, current_caller
from api.deps import get_edge
from api.edge import Edge
from api.errors import SERVICE_RESPONSES
from schemas.http import REQUEST_ID_MAX_LENGTH, REQUEST_ID_PATTERN, REQUEST_ID_RULE, ErrorBody

router = APIRouter(tags=["requests"])

RESPONSES: dict[int | str, dict[str, object]] = {
    **{status: doc for status, doc in SERVICE_RESPONSES.items() if status not in (400, 409, 429)},
    200: {**SERVICE_RESPONSES[200], "description": "Done: the reply the synchronous call would have given."},
    202: {
        "model": AsyncAccepted,
        "description": "Still pending: ask again after Retry-After seconds.",
        "headers": ACCEPTED_HEADERS,
    },
    404: {
        "model": ErrorBody,
        "description": "No such asynchronous request, its result expired, or (with API keys) another key "
        "submitted it (code not_found).",
    },
    503: {"model": ErrorBody, "description": "Redis is unavailable: results cannot be read (code unavailable)."},
    504: {
        "model": ErrorBody,
        "description": "No reply within AISEMBLE_REQUEST_TIMEOUT_S (code timeout), or the agent picked the request "
        "up after its deadline (deadline_exceeded).",
    },
}


@router.get("/requests/{request_id}", responses=RESPONSES)
async def get_request(
    request_id: str = Path(
        min_length=1, max_length=REQUEST_ID_MAX_LENGTH, pattern=REQUEST_ID_PATTERN, description=REQUEST_ID_RULE
    ),
    edge: Edge = Depends(get_edge),
    caller: Caller = Depends(current_caller),
) -> Response:
    """The state or result of an asynchronous request (``Prefer: respond-async`` or ``?wait=false``)."""
    return await lookup(edge, request_id, caller.owner)
