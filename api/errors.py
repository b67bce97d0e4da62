"""The edge's one error tree, its one mapping to HTTP, and its two renderings.

Every failure the edge answers becomes an ``EdgeError`` (or is one already), whatever raised it: the edge's
own checks, FastAPI's validation, Starlette's HTTP errors (404, 405, the body limit's 413), an agent's error
reply, or a bug. Each error carries its HTTP ``status`` and aisemble ``code`` (the class says which; an
instance converted from elsewhere may carry its own), a ``message``, the request's ``request_id`` /
``service`` / ``task`` when known, the offending field (``param``) and extra ``headers``::

    EdgeError                       500 internal            the root; a bug, or a status converted from elsewhere
     ├── InvalidJsonError           400 invalid_json        the body is not JSON
     ├── InvalidInputError          422 invalid_input       the body does not validate (``param`` names the field)
     ├── UnauthorizedError          401 unauthorized        no matching API key (``WWW-Authenticate``)
     ├── ForbiddenError             403 forbidden           the API key may not use this service (``api.quota_gate``)
     ├── NotFoundError              404 not_found           no such path or asynchronous result
     │    └── ModelNotFoundError    404 not_found           a /v1 request names a model nobody serves
     ├── DuplicateIdError           409 invalid_input       the X-Request-Id is already in flight or pending
     ├── PayloadTooLargeError       413 payload_too_large   the body or the image exceeds its limit
     ├── OverloadedError            429 unavailable         ``max_in_flight`` requests held (``Retry-After``)
     ├── RateLimitedError           429 rate_limited        an API key past a quota (``Retry-After``, ``api.quotas``)
     ├── UnavailableError           503 unavailable         Kafka (or Redis, where needed) is unavailable
     └── ReplyTimeoutError          504 timeout             no reply, or a stream not ended, within the deadline

``streams.replies.DuplicateRequestIdError`` is the reply router's own error (``streams`` knows no HTTP); the
edge turns it into ``DuplicateIdError`` where it registers a waiter.

Two renderings, chosen by the request's path (``is_openai_path``: ``/v1`` and below speak OpenAI's API):

* native (``native_body``): ``schemas.http.ErrorBody``, the reply-event shape (``id``, ``service``, ``task``,
  ``ok: false``, ``output: null``, ``error: {code, message}``, ``cached``, ``model``, ``timings_ms``), so a
  client reads successes and failures the same way;
* OpenAI's (``openai_body``): ``{"error": {"message", "type", "param", "code"}}``. 422 becomes 400 (OpenAI
  answers every invalid request 400; 413 stays 413, the HTTP status of a body too large); ``type`` is the
  error's ``openai_type`` where it has one (a quota's 429: ``requests`` or ``tokens``, as OpenAI's), else
  ``rate_limit_error`` for 429, ``server_error`` for 5xx, else ``invalid_request_error``; ``code`` is
  ``invalid_api_key`` for 401, ``rate_limit_exceeded`` for 429, else the error's ``openai_code`` (OpenAI's
  own, e.g. ``unsupported_parameter``, ``model_not_found``) or its aisemble code. So the official ``openai``
  client raises its matching exception class.

``install_error_handlers`` routes every failure of the app through ``error_response``, which picks the
rendering and echoes ``X-Request-Id`` when there is a valid one:

* a body that is not JSON: 400 ``invalid_json``; a broken multipart body: 400 ``invalid_input``;
* a body that does not validate (FastAPI's ``RequestValidationError``): 422 ``invalid_input``, the message
  naming each offending field (``data.records: Field required``);
* an unknown path: 404 ``not_found``; a known path with another method: 405 ``method_not_allowed``;
* a body past the edge's limit (``api.limits``): 413 ``payload_too_large``;
* any other exception: 500 ``internal`` (logged with its traceback).

An agent's error reply to a native route is its reply event as it came (the same shape, ``reply_response``);
``reply_error`` converts it for the OpenAI rendering and the stream formats. ``STATUS_BY_CODE`` is the one
table from an aisemble error code to its HTTP status, for those replies.

``SERVICE_RESPONSES`` documents all of these (and 200) for the service routes, so the OpenAPI document
lists every status a route can answer with its body schema. What can go wrong: a status added here
without a line in ``schemas.http.STATUS_DESCRIPTIONS`` is undocumented; tests/test_http_contract.py
(schemathesis' status_code_conformance) catches that.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY

from schemas import SERVICES, ErrorCode, ErrorInfo, ReplyEvent
from schemas.http import STATUS_DESCRIPTIONS, ErrorBody, valid_request_id

log = logging.getLogger(__name__)

MAX_FIELD_ERRORS = 10  # field errors named in one 422 message (the rest are counted)
OPENAI_PREFIX = "/v1"

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
    """An error the edge answers itself; the root of the tree drawn in the module docstring.

    ``status`` and ``code`` come from the class; ``status=``/``code=`` override them for an error converted from
    elsewhere (an agent's reply, a Starlette ``HTTPException``). ``openai_code`` is OpenAI's code for the same
    condition where it has its own (``None``: the aisemble code is used).
    """

    status = 500
    code: str = ErrorCode.INTERNAL
    openai_code: str | None = None
    openai_type: str | None = None  # OpenAI's error type where it has its own (a quota's 429: requests, tokens)

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        service: str = "",
        task: str = "",
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        status: int | None = None,
        code: str | None = None,
        openai_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.service = service
        self.task = task
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})  # extra response headers (e.g. Retry-After)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if openai_code is not None:
            self.openai_code = openai_code


class InvalidJsonError(EdgeError):
    status = 400
    code = ErrorCode.INVALID_JSON


class InvalidInputError(EdgeError):
    status = 422
    code = ErrorCode.INVALID_INPUT


class UnauthorizedError(EdgeError):
    """API keys are configured and the request carried none that matches (``api.auth``): 401.

    ``headers`` carries the ``WWW-Authenticate`` challenge. The message never contains what was sent.
    """

    status = 401
    code = ErrorCode.UNAUTHORIZED


class ForbiddenError(EdgeError):
    """The caller's API key may not use this service (its ``services`` in ``AISEMBLE_API_KEYS``): 403."""

    status = 403
    code = ErrorCode.FORBIDDEN
    openai_code = "service_not_allowed"


class NotFoundError(EdgeError):
    status = 404
    code = ErrorCode.NOT_FOUND


class ModelNotFoundError(NotFoundError):
    """A /v1 request names a model that no agent serves (``param`` is ``model``)."""

    openai_code = "model_not_found"


class DuplicateIdError(EdgeError):
    status = 409
    code = ErrorCode.INVALID_INPUT


class PayloadTooLargeError(EdgeError):
    status = 413
    code = ErrorCode.PAYLOAD_TOO_LARGE


class OverloadedError(EdgeError):
    """The edge holds ``max_in_flight`` requests already: 429 at once, with ``Retry-After``.

    The code stays ``unavailable`` (a temporary refusal, as 503); the status tells the two apart.
    """

    status = 429
    code = ErrorCode.UNAVAILABLE

    def __init__(
        self, message: str, *, request_id: str | None = None, service: str = "", task: str = "", retry_after_s: int = 1
    ) -> None:
        headers = {"Retry-After": str(retry_after_s)}
        super().__init__(message, request_id=request_id, service=service, task=task, headers=headers)
        self.retry_after_s = retry_after_s


class RateLimitedError(EdgeError):
    """The caller's API key is past one of its quotas (``limit``: ``rpm``, ``tpm`` or ``max_in_flight``): 429 with
    ``Retry-After``; in OpenAI's shape ``type`` is ``requests`` or ``tokens`` and ``code`` ``rate_limit_exceeded``."""

    status = 429
    code = ErrorCode.RATE_LIMITED

    def __init__(
        self, message: str, *, limit: str, retry_after_s: int, request_id: str | None = None, service: str = ""
    ) -> None:
        super().__init__(message, request_id=request_id, service=service, headers={"Retry-After": str(retry_after_s)})
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.openai_type = "tokens" if limit == "tpm" else "requests"


class UnavailableError(EdgeError):
    status = 503
    code = ErrorCode.UNAVAILABLE


class ReplyTimeoutError(EdgeError):
    status = 504
    code = ErrorCode.TIMEOUT


# Which error code an HTTP error raised by Starlette/FastAPI gets (they carry no code of their own).
CODE_BY_HTTP_STATUS: dict[int, str] = {
    400: ErrorCode.INVALID_INPUT,  # FastAPI: "There was an error parsing the body" (multipart)
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,  # the body limit (api.limits, Starlette's RequestBodyLimitMiddleware)
    422: ErrorCode.INVALID_INPUT,
}


def http_error(exc: StarletteHTTPException, *, request_id: str | None = None, service: str = "") -> EdgeError:
    """A Starlette/FastAPI ``HTTPException`` as an ``EdgeError`` of the same status."""
    code = CODE_BY_HTTP_STATUS.get(exc.status_code, ErrorCode.INTERNAL)
    return EdgeError(
        str(exc.detail),
        status=exc.status_code,
        code=code,
        request_id=request_id,
        service=service,
        headers=dict(exc.headers or {}),
    )


def reply_error(reply: ReplyEvent) -> EdgeError:
    """An agent's error reply as an ``EdgeError`` (its code, and the status ``STATUS_BY_CODE`` gives it)."""
    code = reply.error.code if reply.error else ErrorCode.INTERNAL
    message = reply.error.message if reply.error else "the request failed"
    status = STATUS_BY_CODE.get(code, 500)
    return EdgeError(message, status=status, code=code, request_id=reply.id, service=reply.service, task=reply.task)


def too_large_message(limit: int | None, size: int | None = None) -> str:
    """The message of a 413 for a body of ``size`` bytes (unknown while it streams) past ``limit``."""
    body = f"request body of {size} bytes" if size is not None else "request body"
    return f"{body} exceeds the limit of {limit} bytes" if limit is not None else f"{body} is too large"


# --- the two renderings --------------------------------------------------------------------------------------


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is one of the OpenAI-compatible routes (``/v1`` and below), answered in OpenAI's shape."""
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def native_body(exc: EdgeError) -> dict[str, object]:
    """The ``ErrorBody`` of ``exc`` (the reply-event shape)."""
    return error_body(exc.code, exc.message, request_id=exc.request_id, service=exc.service, task=exc.task)


def openai_status(exc: EdgeError) -> int:
    """The status OpenAI's shape answers ``exc`` with (a 422 is OpenAI's 400)."""
    return 400 if exc.status == 422 else exc.status


def openai_body(exc: EdgeError) -> dict[str, object]:
    """``exc`` in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    status = openai_status(exc)
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    kind = exc.openai_type or kind
    code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status, exc.openai_code or exc.code)
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": code}}


def error_response(exc: EdgeError, *, openai: bool = False) -> ORJSONResponse:
    """``exc`` as an HTTP response in the native (``ErrorBody``) or OpenAI shape, with its headers and, when
    it has one, the request id in ``X-Request-Id``."""
    headers = {**exc.headers, **({"X-Request-Id": exc.request_id} if exc.request_id else {})}
    if openai:
        return ORJSONResponse(openai_body(exc), status_code=openai_status(exc), headers=headers)
    return ORJSONResponse(native_body(exc), status_code=exc.status, headers=headers)


def reply_body(reply: ReplyEvent) -> dict[str, object]:
    """``reply.model_dump(mode="json")``, field for field (a unit test holds it), without pydantic's walk over the
    output: a reply's output is JSON already (read from Kafka or the cache), so it is passed on as it is and
    serialised once, by the response."""
    error = reply.error
    return {
        "id": reply.id,
        "correlation_id": reply.correlation_id,
        "service": reply.service,
        "task": reply.task,
        "ok": reply.ok,
        "output": reply.output,
        "error": None if error is None else {"code": error.code, "message": error.message},
        "cached": reply.cached,
        "model": reply.model,
        "timings_ms": reply.timings_ms,
    }


def reply_response(reply: ReplyEvent) -> ORJSONResponse:
    """A reply event as the HTTP response: 200 when ok, else the status its error code maps to."""
    status = 200 if reply.ok else STATUS_BY_CODE.get(reply.error.code if reply.error else "", 500)
    return ORJSONResponse(reply_body(reply), status_code=status, headers={"X-Request-Id": reply.id})


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
        "headers": {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}},
    },
}


def install_error_handlers(app: FastAPI) -> None:
    """Render every failure of ``app`` through ``error_response``: OpenAI's shape under ``/v1``, else
    ``ErrorBody``, with the documented status."""

    def answer(request: Request, exc: EdgeError) -> ORJSONResponse:
        return error_response(exc, openai=is_openai_path(request.url.path))

    @app.exception_handler(EdgeError)
    async def _edge_error(request: Request, exc: EdgeError) -> ORJSONResponse:
        return answer(request, exc)

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
            return answer(request, InvalidJsonError(message, request_id=rid, service=service))
        loc = errors[0].get("loc") if errors else None
        param = _field_name(tuple(loc)) if isinstance(loc, (list, tuple)) else None
        error = InvalidInputError(validation_message(errors), request_id=rid, service=service, param=param)
        return answer(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> ORJSONResponse:
        error = http_error(exc, request_id=caller_id(request), service=service_of(request))
        if exc.status_code == 413:  # the body limit's own detail says only "Content Too Large"
            error.message = too_large_message(request.scope.get(MAX_BODY_SIZE_SCOPE_KEY))
        return answer(request, error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> ORJSONResponse:
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
        error = EdgeError(
            f"internal error ({type(exc).__name__})", request_id=caller_id(request), service=service_of(request)
        )
        return answer(request, error)
