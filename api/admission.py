"""Admission before work: the in-flight limit and the in-flight bytes, decided before a body is read.

FastAPI reads, parses and validates a request's body before any dependency or route runs, and the vision
routes then decode the image and may park it in Redis as a claim check. ``AdmissionGate`` (ASGI middleware,
inside ``api.auth.ApiKeyGate``: keys first) decides on the raw headers of every ``POST`` to a service route
(``/data/``, ``/ai/``, ``/v1/``) whether the edge takes it at all:

* one of the edge's ``max_in_flight`` slots (``Edge.in_flight``, the same count ``Edge.call`` uses), and
* its body's bytes out of ``max_in_flight_bytes`` (``ByteBudget``): the declared ``Content-Length``, capped
  at the path's body limit (``body_limit``: a larger body is refused 413 without being read); a body
  without ``Content-Length`` (chunked) is counted at the path's full body limit, since it may grow to it.

Past either, the answer is 429 (code ``unavailable``, ``Retry-After: 1``; OpenAI's error shape on
``/v1/``) at once: nothing of the body is read, no claim check is written, nothing reaches Kafka. 429 is
the edge's one answer to "too much at once, retry soon", whether requests or bytes. Both are held until
the response has been sent (for a stream: until it ends) and given back however the exchange ends. The
request carries ``ADMITTED_SCOPE_KEY`` in its scope, so the route's ``Edge.call`` / ``Edge.stream`` take no
second slot (``admitted=True``). An asynchronous request gives both back with its 202: once Kafka has it,
``max_pending_async_per_key`` bounds it instead (``api.async_requests``).

What can go wrong: the edge not started yet (no ``app.state.edge``) is 503 ``unavailable``, never an open
door. The bytes counted are the body's, not what the edge makes of it (a JSON image becomes its bytes and
its base64 again): ``max_in_flight_bytes`` is a bound on bodies held, set it with that factor in mind.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import EdgeError, OverloadedError, UnavailableError, caller_id, error_response, is_openai_path
from api.guards import ByteBudget, InFlightLimit
from api.metrics import service_of_path
from streams.settings import Settings

ADMITTED_SCOPE_KEY = "aisemble.admitted"  # set on a request that holds its slot and bytes (``admitted``)
ADMITTED_PREFIXES = ("/data/", "/ai/", "/v1/")  # the service routes' paths
RETRY_AFTER_S = 1
MULTIPART_MARGIN = 64 * 1024  # a file upload's multipart envelope (boundaries, headers, the purpose field)


def body_limit(settings: Settings, path: str) -> int:
    """The body limit of ``path``: vision's upload limit under ``/ai/vision``, the Batch API's file limit (plus
    the multipart envelope, at most ``max_in_flight_bytes``) on ``/v1/files``, else ``max_body_bytes``."""
    if path.startswith("/ai/vision"):
        return max(settings.vision.max_upload_bytes, settings.max_body_bytes)
    if path == "/v1/files":
        upload = min(settings.batch.max_file_bytes + MULTIPART_MARGIN, settings.max_in_flight_bytes)
        return max(upload, settings.max_body_bytes)
    return settings.max_body_bytes


def admitted(request: Request) -> bool:
    """Whether ``AdmissionGate`` admitted ``request`` (it holds an in-flight slot for it)."""
    return request.scope.get(ADMITTED_SCOPE_KEY) is True


def declared_bytes(headers: Headers, limit: int) -> int:
    """The bytes a body will hold: its ``Content-Length`` capped at ``limit``, or ``limit`` without one."""
    length = headers.get("content-length", "")
    return min(int(length), limit) if length.isdigit() else limit


class AdmissionGate:
    """ASGI middleware: an in-flight slot and the body's bytes before the body is read (see the module)."""

    def __init__(self, app: ASGIApp, settings: Settings, budget: ByteBudget) -> None:
        self.app = app
        self.settings = settings
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or not path.startswith(ADMITTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        request = Request(scope)  # headers only: the body is never read here
        slots = getattr(getattr(scope["app"].state, "edge", None), "in_flight", None)
        if not isinstance(slots, InFlightLimit):
            await _refused(request, 503, "the edge is not ready (Kafka and Redis are being connected)")(
                scope, receive, send
            )
            return
        n = declared_bytes(request.headers, body_limit(self.settings, path))
        if not slots.try_acquire():
            message = f"the edge holds {slots.limit} requests already; retry after {RETRY_AFTER_S} s"
            await _refused(request, 429, message)(scope, receive, send)
            return
        if not self.budget.try_take(n):
            slots.release()
            message = (
                f"the edge holds {self.budget.held} body bytes already (limit {self.budget.limit}); this body "
                f"would add {n}; retry after {RETRY_AFTER_S} s"
            )
            await _refused(request, 429, message)(scope, receive, send)
            return
        scope[ADMITTED_SCOPE_KEY] = True
        try:
            await self.app(scope, receive, send)
        finally:
            self.budget.give(n)
            slots.release()


def _refused(request: Request, status: int, message: str) -> Response:
    """The 429 (``OverloadedError``) or 503 (``UnavailableError``) of a request not admitted, in OpenAI's shape
    on the ``/v1`` routes."""
    rid, service = caller_id(request), service_of_path(request.url.path)
    error: EdgeError
    if status == 429:
        error = OverloadedError(message, request_id=rid, service=service, retry_after_s=RETRY_AFTER_S)
    else:
        error = UnavailableError(message, request_id=rid, service=service)
    return error_response(error, openai=is_openai_path(request.url.path))
