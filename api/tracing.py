"""The edge's HTTP span: one SERVER span per traced HTTP request, continuing the caller's W3C trace.

``TraceRequests`` is a pure ASGI middleware (the outermost one, so a 401, 413 or 429 is traced too). When
tracing is on (``streams.tracing.on``) and the path is not an operational one (``skip``: probes, metrics, the
status page), it extracts the caller's ``traceparent``/``tracestate``/``baggage`` (a valid one is continued;
without one the edge starts a trace), and runs the request inside a span named ``<METHOD> <route>`` with
``http.request.method``, ``http.route`` and ``http.response.status_code``. The span is current while the route
handler runs, so ``Edge.call``'s span (and ``trace.get_current_span()`` in a handler) is in the caller's trace;
a streamed response's span ends when its last byte is sent.

Off, it costs one branch per request and nothing else. What can go wrong: a malformed ``traceparent`` is
ignored (a new trace starts), as the W3C propagator does.
"""

from __future__ import annotations

from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streams import tracing

_TRACE_HEADERS = frozenset(name.encode() for name in tracing.TRACE_HEADERS)


class TraceRequests:
    """See the module docstring; ``skip``: paths never traced."""

    def __init__(self, app: ASGIApp, skip: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not tracing.on() or scope["path"] in self.skip:
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v) for k, v in scope["headers"] if k.lower() in _TRACE_HEADERS]
        method = scope["method"]
        attributes = {"http.request.method": method, "url.path": scope["path"]}
        with tracing.tracer().start_as_current_span(
            method, context=tracing.extract(headers), kind=SpanKind.SERVER, attributes=attributes
        ) as span:

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", int(message["status"]))
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            finally:
                route = getattr(scope.get("route"), "path", None)  # FastAPI's matched route (its template)
                if isinstance(route, str):
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
