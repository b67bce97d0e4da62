"""FastAPI dependencies shared by the routes.

``request_id`` is the only way a route reads ``X-Request-Id``: the header is declared with
``schemas.http.REQUEST_ID_PATTERN`` (1 to 128 characters of ``[A-Za-z0-9._:-]``), so FastAPI refuses
anything else with 422 ``invalid_input`` naming ``header.x-request-id`` before the route runs, and the
OpenAPI document states the rule. A caller's id therefore never reaches a Kafka key, a log line or a
Redis key unchecked. ``api.errors.caller_id`` applies the same rule before echoing an id in an error.

Every dependency here is ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool (a hand-off
to a worker thread and back per dependency per request), an ``async def`` one inline on the event loop. None
of them blocks, so none needs a thread.
"""

from __future__ import annotations

from fastapi import Header, Request

from api.edge import Edge
from schemas.http import REQUEST_ID_MAX_LENGTH, REQUEST_ID_PATTERN, REQUEST_ID_RULE


async def get_edge(request: Request) -> Edge:
    edge: Edge = request.app.state.edge
    return edge


async def request_id(
    x_request_id: str | None = Header(
        default=None,
        min_length=1,
        max_length=REQUEST_ID_MAX_LENGTH,
        pattern=REQUEST_ID_PATTERN,
        description=f"Your own id for this request: {REQUEST_ID_RULE}. Default: one the edge makes.",
    ),
) -> str | None:
    """The caller's own request id (``X-Request-Id``), if it sent one; validated by the declaration above."""
    return x_request_id
