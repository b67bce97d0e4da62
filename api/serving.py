"""How one request to a service route is served: synchronously (the reply) or asynchronously (a 202).

A route takes ``serve: RequestServing = Depends(serving)`` and answers in one line, ``await serve(service,
task, payload, cache=...)``. ``RequestServing`` decides, per request, between

* the synchronous answer: ``Edge.call`` and the reply rendered as the route's shape (``render``), and
* the asynchronous one, when the caller asked for it with ``?wait=false`` or ``Prefer: respond-async``
  (RFC 7240): ``api.async_requests.submit``, which answers ``202 Accepted`` once Kafka has the request and
  keeps the reply for ``GET /requests/{id}``.

The dependencies are ``async def`` (FastAPI runs a plain ``def`` one in its thread pool: a thread hand-off per
dependency per request); none blocks. The decision is read once, by the dependency, from the query and the
``Prefer`` header; nothing else of the request changes it. The dependency also carries who the caller is
(``api.auth.Caller``: its owner id goes with an asynchronous request, so only that key reads the result) and
whether ``api.admission`` admitted the request (it then holds the request's in-flight slot, and
``Edge.call``/``Edge.stream`` take none). A caller already at its ``max_pending_async_per_key`` who asks for
an asynchronous answer is refused (429) by the dependency itself, before the route does any work (a vision
upload writes no claim check).

What can go wrong is what ``Edge.call`` and ``submit`` raise (429, 503, 409, 504), each an
``api.errors.EdgeError`` that the edge maps to HTTP in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Header, Query, Request
from starlette.responses import Response

from api.admission import admitted
from api.async_requests import DEFAULT_RENDER, RENDERERS, submit, too_many_pending
from api.auth import Caller, request_caller
from api.deps import request_id
from api.edge import Edge, EdgeStream
from api.errors import service_of
from api.quota_gate import QuotaTicket, quota_ticket
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


def _wait_query() -> Any:
    return Query(default=True, description="false: answer 202 at once and keep the result for GET /requests/{id}.")


def _prefer_header() -> Any:
    return Header(default=None, description="RFC 7240; respond-async: as ?wait=false.", max_length=1024)


def _asked_async(wait: bool, prefer: str | None) -> bool:
    return not wait or (prefer is not None and prefers_async([prefer]))


async def wants_async(wait: bool = _wait_query(), prefer: str | None = _prefer_header()) -> bool:
    """Whether the caller asked for an asynchronous answer (``?wait=false`` or ``Prefer: respond-async``)."""
    return _asked_async(wait, prefer)


@dataclass(slots=True)
class RequestServing:
    """Serves one request of a service route, synchronously or asynchronously (see the module docstring)."""

    edge: Edge
    request_id: str | None
    respond_async: bool
    caller: Caller
    admitted: bool = False  # api.admission holds this request's in-flight slot
    quota: QuotaTicket | None = None  # the key's quotas (api.quota_gate): an LLM request charges its tokens

    async def _charge(self, service: Service, payload: dict[str, object]) -> None:
        if service == "llm" and self.quota is not None:
            await self.quota.charge_tokens(payload, self.request_id)

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
        """The reply (synchronous) or a 202 (asynchronous); raises the edge's errors (``Edge.call``) and the
        key's token quota (``QuotaTicket.charge_tokens``: an LLM request, corrected by its usage once answered)."""
        await self._charge(service, payload)
        if self.respond_async:
            return await submit(self.edge, service, task, payload, cache=cache, request_id=self.request_id,
                                render=render, context=context, owner=self.caller.owner)  # fmt: skip
        reply = await self.edge.call(
            service, task, payload, cache=cache, request_id=self.request_id, admitted=self.admitted
        )
        if self.quota is not None and service == "llm":
            await self.quota.settle(reply)
        return RENDERERS[render](reply, context or {})

    async def stream(self, service: Service, task: str, payload: dict[str, object], *, cache: bool | None = None
                     ) -> EdgeStream:  # fmt: skip
        """A streamed request (``Edge.stream``; a stream is its own way of not waiting: never asynchronous)."""
        await self._charge(service, payload)
        return await self.edge.stream(
            service, task, payload, cache=cache, request_id=self.request_id, admitted=self.admitted
        )


async def serving(
    request: Request,
    rid: str | None = Depends(request_id),
    wait: bool = _wait_query(),
    prefer: str | None = _prefer_header(),
) -> RequestServing:
    """The dependency every service route takes (see the module docstring).

    ``wants_async``'s parameters are declared here and the edge is read here, not through sub-dependencies:
    FastAPI's dependency solving costs tens of microseconds per dependency per request. ``request_id`` stays a
    sub-dependency so that a request with several invalid parameters names them in the same order as before
    (the 422 names the first).

    Raises:
        OverloadedError: an asynchronous request from a caller at its pending limit (429).
    """
    edge: Edge = request.app.state.edge
    respond_async = _asked_async(wait, prefer)
    caller = request_caller(request)
    if respond_async and not edge.pending_async.check(caller.owner):
        raise too_many_pending(edge, rid, service_of(request), "")
    return RequestServing(edge, rid, respond_async, caller, admitted(request), quota_ticket(request))
