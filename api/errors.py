"""Edge errors and the one place where errors become HTTP responses.

Every error body has the reply-event shape (``id``, ``service``, ``task``, ``ok: false``,
``error: {code, message}``), so a client reads successes and failures the same way.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import ORJSONResponse

from schemas import ErrorCode, ReplyEvent

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


def reply_response(reply: ReplyEvent) -> ORJSONResponse:
    """A reply event as the HTTP response: 200 when ok, else the status its error code maps to."""
    status = 200 if reply.ok else STATUS_BY_CODE.get(reply.error.code if reply.error else "", 500)
    return ORJSONResponse(
        reply.model_dump(mode="json"), status_code=status, headers={"X-Request-Id": reply.id}
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EdgeError)
    async def _edge_error(request: Request, exc: EdgeError) -> ORJSONResponse:
        body = {
            "id": exc.request_id,
            "service": exc.service,
            "task": exc.task,
            "ok": False,
            "output": None,
            "error": {"code": exc.code, "message": exc.message},
            "cached": False,
            "model": None,
            "timings_ms": {},
        }
        headers = {**exc.headers, **({"X-Request-Id": exc.request_id} if exc.request_id else {})}
        return ORJSONResponse(body, status_code=exc.status, headers=headers)
