"""Request body size limits, enforced before the body is parsed.

A body whose ``Content-Length`` exceeds the limit is refused at once with 413; a chunked body is counted
as it streams and refused as soon as it passes the limit, so an oversized upload is never buffered.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body
from schemas import ErrorCode


class BodyTooLargeError(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: ``limit_for(path)`` gives the byte limit of each request path."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._refuse(send, int(value), limit)
                return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            if not started:
                await self._refuse(send, seen, limit)

    @staticmethod
    async def _refuse(send: Send, size: int, limit: int) -> None:
        message = f"request body of {size} bytes exceeds the limit of {limit} bytes"
        body = orjson.dumps(error_body(ErrorCode.PAYLOAD_TOO_LARGE, message))  # the ErrorBody shape
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
