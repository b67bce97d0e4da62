"""FastAPI dependencies shared by the routes."""

from __future__ import annotations

from fastapi import Header, Request

from api.edge import Edge
from api.errors import InvalidInputError


def get_edge(request: Request) -> Edge:
    edge: Edge = request.app.state.edge
    return edge


def request_id(x_request_id: str | None = Header(default=None, max_length=128, pattern=r"\S")) -> str | None:
    """The caller's own request id (``X-Request-Id``), if it sent one."""
    if x_request_id is not None and not x_request_id.strip():
        raise InvalidInputError("X-Request-Id must not be blank")
    return x_request_id
