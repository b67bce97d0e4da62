"""Request body limits: every route answers 413 for a body past its limit, before the body is parsed.

The counting is Starlette's (``starlette.middleware.body_limit.RequestBodyLimitMiddleware``, what FastAPI's
``max_body_size`` installs): it counts a streamed (chunked) body as it arrives and raises its own 413 as soon
as the count passes the limit, so an oversized upload is never buffered. FastAPI knows that error: a
pydantic body, a form or a multipart upload being parsed when it is raised answers 413, not the 400 "error
parsing the body" a hand-made limit got; ``api.errors`` renders it (ErrorBody, or OpenAI's shape under
``/v1``) with the limit in the message.

``BodyLimit`` adds one thing: a ``Content-Length`` above the limit is refused at once, in the same shapes,
before any route runs. Starlette alone answers that case with its own plain-text ``Content Too Large`` (it
replaces whatever response the app starts, bypassing the exception handlers), which neither an ``ErrorBody``
client nor the ``openai`` client can read. It is also why the limit is not given as ``FastAPI(max_body_size=)``:
that middleware sits outside ours, so it would replace our 413 (and a 401 for a large unauthenticated upload)
with plain text.

``limit_for(path)`` gives each path its limit (``api.app``: ``max_body_bytes``, the vision routes
``vision.max_upload_bytes``). What can go wrong: a client that sends a body past the limit has its connection
answered 413 mid-upload; the server then closes it (uvicorn does), so the client may see a reset instead of
the 413 if it does not read while it writes.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import PayloadTooLargeError, error_response, is_openai_path, too_large_message
from api.metrics import service_of_path
from schemas.http import valid_request_id


class BodyLimit:
    """ASGI middleware: ``limit_for(path)`` bytes of body at most for each request path (see the module)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for
        self._limited: dict[int, ASGIApp] = {}  # one Starlette limiter per distinct limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            rid = headers.get("x-request-id")
            error = PayloadTooLargeError(
                too_large_message(limit, int(declared)),
                request_id=rid if rid is not None and valid_request_id(rid) else None,
                service=service_of_path(scope["path"]),
            )
            await error_response(error, openai=is_openai_path(scope["path"]))(scope, receive, send)
            return
        limited = self._limited.get(limit)
        if limited is None:
            limited = self._limited[limit] = RequestBodyLimitMiddleware(self.app, max_body_size=limit)
        await limited(scope, receive, send)
