"""Edge errors and the one place where errors become HTTP responses.

Every error body has the reply-event shape, ``schemas.http.ErrorBody`` (``id``, ``service``, ``task``,
``ok: false``, ``output: null``, ``error: {code, message}``, ``cached``, ``model``, ``timings_ms``), so a
client reads successes and failures the same way. ``install_error_handlers`` gives that shape to every
failure, not only the edge's own ``EdgeError``:

* a body that is not JSON: 400 ``invalid_json``; a broken multipart body: 400 ``invalid_input``;
* a body that does not validate (FastAPI's ``RequestValidationError``): 422 ``invalid_input``, the message
  naming each offending field (``data.records: Field required``);
* an unknown path: 404 ``not_found``; a known path with another method: 405 ``method_not_allowed``;
* a service route without a matching API key (when keys are configured, ``api.auth``): 401
  ``unauthorized`` with ``WWW-Authenticate``;
* any other exception: 500 ``internal`` (the exception is still logged by Starlette).

``SERVICE_RESPONSES`` documents all of these (and 200) for the service routes, so the OpenAPI document
lists every status a route can answer with its body schema. What can go wrong: a status added here
without a line in ``schemas.http.STATUS_DESCRIPTIONS`` is undocumented; tests/test_http_contract.py
(schemathesis' status_code_conformance) catches that.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas import SERVICES, ErrorCode, ErrorInfo, ReplyEvent
from schemas.http import STATUS_DESCRIPTIONS, ErrorBody, valid_request_id

log = logging.getLogger(__name__)

MAX_FIELD_ERRORS = 10  # field errors named in one 422 message (the rest are counted)

# Reply error codes -> HTTP status.
STATUS_BY_CODE: dict[str, int] = {
    ErrorCode.INVALID_INPUT: 422,
    ErrorCode.UNKNOWN_TASK: 422,
    ErrorCode.CLAIM_CHECK_MISSING: 422,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.MODEL_NOT_CONFIGURED: 501,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.UNAUTHORIZED: 401,
}


class EdgeError(Exception):
    """An error the edge answers itself (no reply event came)."""

    status = 500
    code: str = ErrorCode.INTERNAL
    headers: dict[str, str] = {}  # extra response headers (e.g. Retry-After)

    def __init__(self, message: str, *, request_id: str | None = None, service: str = "", task: str = ""):
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.service = service
        self.task = task


class ReplyTimeoutError(EdgeError):
    status = 504
    code = ErrorCode.TIMEOUT


class UnavailableError(EdgeError):
    status = 503
    code = ErrorCode.UNAVAILABLE


class OverloadedError(EdgeError):
    """The edge holds ``max_in_flight`` requests already: 429 at once, with ``Retry-After``.

    The code stays ``unavailable`` (a temporary refusal, as 503); the status tells the two apart.
    """

    status = 429
    code = ErrorCode.UNAVAILABLE

    def __init__(
        self, message: str, *, request_id: str | None = None, service: str = "", task: str = "", retry_after_s: int = 1
    ) -> None:
        super().__init__(message, request_id=request_id, service=service, task=task)
        self.retry_after_s = retry_after_s
        self.headers = {"Retry-After": str(retry_after_s)}


class DuplicateIdError(EdgeError):
    status = 409
    code = ErrorCode.INVALID_INPUT


class PayloadTooLargeError(EdgeError):
    status = 413
    code = ErrorCode.PAYLOAD_TOO_LARGE


class InvalidInputError(EdgeError):
    status = 422
    code = ErrorCode.INVALID_INPUT


class UnauthorizedError(EdgeError):
    """API keys are configured and the request carried none that matches (``api.auth``): 401.

    ``headers`` carries the ``WWW-Authenticate`` challenge. The message never contains what was sent.
    """

    status = 401
    code = ErrorCode.UNAUTHORIZED

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        service: str = "",
        task: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id, service=service, task=task)
        self.headers = dict(headers or {})


def reply_response(reply: ReplyEvent) -> ORJSONResponse:
    """A reply event as the HTTP response: 200 when ok, else the status its error code maps to."""
    status = 200 if reply.ok else STATUS_BY_CODE.get(reply.error.code if reply.error else "", 500)
    return ORJSONResponse(
        reply.model_dump(mode="json"), status_code=status, headers={"X-Request-Id": reply.id}
    )


def error_body(
    code: str, message: str, *, request_id: str | None = None, service: str = "", task: str = ""
) -> dict[str, object]:
    """The JSON body of an error answered by the edge itself (``ErrorBody``)."""
    body = ErrorBody(
        id=request_id,
        service=service,
        task=task,
        ok=False,
        output=None,
        error=ErrorInfo(code=code, message=message),
        cached=False,
        model=None,
        timings_ms={},
    )
    return body.model_dump(mode="json")


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    request_id: str | None = None,
    service: str = "",
    task: str = "",
    headers: dict[str, str] | None = None,
) -> ORJSONResponse:
    """An ``ErrorBody`` response; it echoes the request id in ``X-Request-Id`` when there is one."""
    all_headers = {**(headers or {}), **({"X-Request-Id": request_id} if request_id else {})}
    return ORJSONResponse(
        error_body(code, message, request_id=request_id, service=service, task=task),
        status_code=status,
        headers=all_headers,
    )


def caller_id(request: Request) -> str | None:
    """The caller's X-Request-Id when it is a valid id (``schemas.http.REQUEST_ID_PATTERN``, what
    ``api.deps.request_id`` accepts), else None: an invalid one is never echoed in a body or header."""
    rid = request.headers.get("x-request-id")
    return rid if rid is not None and valid_request_id(rid) else None


def service_of(request: Request) -> str:
    """The service of the matched route (its first tag names it), or '' for no route or a non-service one."""
    route = request.scope.get("route")
    tags = getattr(route, "tags", None) or []
    return str(tags[0]) if tags and tags[0] in SERVICES else ""


def _field_name(loc: tuple[int | str, ...]) -> str:
    """``("body", "data", "records")`` -> ``data.records``; header and query names keep their place."""
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


def validation_message(errors: list[dict[str, object]]) -> str:
    """One line naming each invalid field and why, e.g. ``cache: Input should be a valid boolean``."""
    lines = []
    for error in errors[:MAX_FIELD_ERRORS]:
        loc = error.get("loc")
        field = _field_name(tuple(loc) if isinstance(loc, (list, tuple)) else ())
        lines.append(f"{field}: {error.get('msg', 'invalid')}")
    if len(errors) > MAX_FIELD_ERRORS:
        lines.append(f"and {len(errors) - MAX_FIELD_ERRORS} more")
    return "; ".join(lines) or "the request does not validate"


# Which error code an HTTP error raised by Starlette/FastAPI gets (they carry no code of their own).
CODE_BY_HTTP_STATUS: dict[int, str] = {
    400: ErrorCode.INVALID_INPUT,  # FastAPI: "There was an error parsing the body" (multipart)
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    422: ErrorCode.INVALID_INPUT,
}


def _documented(status: int) -> dict[str, object]:
    return {"model": ErrorBody, "description": STATUS_DESCRIPTIONS[status]}


# The ``responses=`` of every service route: 200 is the reply event, every other status an ErrorBody.
SERVICE_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "model": ReplyEvent,
        "description": "The reply event (ok: true); X-Request-Id carries its id.",
        "headers": {"X-Request-Id": {"description": "The request id.", "schema": {"type": "string"}}},
    },
    **{status: _documented(status) for status in STATUS_DESCRIPTIONS},
    401: {
        **_documented(401),
        "headers": {
            "WWW-Authenticate": {
                "description": 'The authentication challenge: Bearer realm="aisemble".',
                "schema": {"type": "string"},
            }
        },
    },
    429: {
        **_documented(429),
        "headers": {
            "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
        },
    },
}


def install_error_handlers(app: FastAPI) -> None:
    """Render every failure of ``app`` as an ``ErrorBody`` with its documented status."""

    @app.exception_handler(EdgeError)
    async def _edge_error(request: Request, exc: EdgeError) -> ORJSONResponse:
        return error_response(
            exc.status,
            exc.code,
            exc.message,
            request_id=exc.request_id,
            service=exc.service,
            task=exc.task,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> ORJSONResponse:
        errors = list(exc.errors())
        service, rid = service_of(request), caller_id(request)
        bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            ctx = bad_json.get("ctx") or {}
            where = bad_json["loc"][-1] if len(bad_json.get("loc", ())) > 1 else "?"
            reason = ctx.get("error", "JSON decode error") if isinstance(ctx, dict) else "JSON decode error"
            message = f"body: not valid JSON ({reason}, at character {where})"
            return error_response(400, ErrorCode.INVALID_JSON, message, request_id=rid, service=service)
        return error_response(
            422, ErrorCode.INVALID_INPUT, validation_message(errors), request_id=rid, service=service
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> ORJSONResponse:
        code = CODE_BY_HTTP_STATUS.get(exc.status_code, ErrorCode.INTERNAL)
        return error_response(
            exc.status_code,
            code,
            str(exc.detail),
            request_id=caller_id(request),
            service=service_of(request),
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> ORJSONResponse:
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return error_response(
            500,
            ErrorCode.INTERNAL,
            f"internal error ({type(exc).__name__})",
            request_id=caller_id(request),
            service=service_of(request),
        )
