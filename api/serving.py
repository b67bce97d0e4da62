"""How one request to a service route is served: synchronously (the reply) or asynchronously (a 202).

A route takes ``serve: RequestServing = Depends(serving)`` and answers in one line, ``await serve(service,
task, payload, cache=...)``. ``RequestServing`` decides, per request, between

* the synchronous answer: ``Edge.call`` and the reply rendered as the route's shape (``render``), and
* the asynchronous one, when the caller asked for it with ``?wait=false`` or ``Prefer: respond-async``
  (RFC 7240): ``api.async_requests.submit``, which answers ``202 Accepted`` once Kafka has the request and
  keeps the reply for ``GET /requests/{id}``.

The decision is read once, by the dependency, from the query and the ``Prefer`` header; nothing else of the
request changes it. What can go wrong is what ``Edge.call`` and ``submit`` raise (429, 503, 409, 504), each
an ``api.errors.EdgeError`` that the edge maps to HTTP in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Depends, Header, Query
from starlette.responses import Response

from api.async_requests import DEFAULT_RENDER, RENDERERS, submit
from api.deps import get_edge, request_id
from api.edge import Edge
from schemas import Service


def prefers_async(values: list[str]) -> bool:
    """Whether ``Prefer`` header values (RFC 7240: comma-separated preferences, ``;`` parameters) ask for
    ``respond-async``; names are case-insensitive."""
    for value in values:
        for preference in value.split(","):
            name = preference.split(";", 1)[0].split("=", 1)[0].strip().lower()
            if name == "respond-async":
                return True
    return False


def wants_async(
    wait: bool = Query(
        default=True, description="false: answer 202 at once and keep the result for GET /requests/{id}."
    ),
    prefer: str | None = Header(default=None, description="RFC 7240; respond-async: as ?wait=false.", max_length=1024),
) -> bool:
    """Whether the caller asked for an asynchronous answer (``?wait=false`` or ``Prefer: respond-async``)."""
    return not wait or (prefer is not None and prefers_async([prefer]))


@dataclass(slots=True)
class RequestServing:
    """Serves one request of a service route, synchronously or asynchronously (see the module docstring)."""

    edge: Edge
    request_id: str | None
    respond_async: bool

    async def __call__(
        self,
        service: Service,
        task: str,
        payload: dict[str, object],
        *,
        cache: bool | None = None,
        render: str = DEFAULT_RENDER,
        context: Mapping[str, object] | None = None,
    ) -> Response:
        """The reply (synchronous) or a 202 (asynchronous); raises the edge's errors (``Edge.call``)."""
        if self.respond_async:
            return await submit(self.edge, service, task, payload, cache=cache, request_id=self.request_id,
                                render=render, context=context)  # fmt: skip
        reply = await self.edge.call(service, task, payload, cache=cache, request_id=self.request_id)
        return RENDERERS[render](reply, context or {})


def serving(
    edge: Edge = Depends(get_edge),
    rid: str | None = Depends(request_id),
    respond_async: bool = Depends(wants_async),
) -> RequestServing:
    """The dependency every service route takes (see the module docstring)."""
    return RequestServing(edge, rid, respond_async)
