"""OpenTelemetry traces across Kafka: set-up from the standard environment, context in record headers.

Both sides use this module (the edge in ``api``, the agents in ``agents``); it knows no model and no route.

Configuration (the OpenTelemetry SDK's own variables, read by the SDK where it reads them):

* tracing is **on** when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set and
  ``OTEL_SDK_DISABLED`` is not ``true``; otherwise it is off (``setup`` returns False and installs nothing);
* ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf`` (default) or
  ``grpc``; anything else is refused at start-up (``ValueError``: the Python SDK has no ``http/json``);
* the exporter reads its endpoint, headers, timeout, compression and certificates from the environment, the
  ``BatchSpanProcessor`` its ``OTEL_BSP_*``, the provider its sampler (``OTEL_TRACES_SAMPLER``/``_ARG``, default
  ``parentbased_always_on``), the propagator its ``OTEL_PROPAGATORS`` (default W3C tracecontext + baggage);
* ``service.name`` (``service_name``): the edge is ``OTEL_SERVICE_NAME`` or ``aisemble-edge``; a service's agent
  is ``<OTEL_SERVICE_NAME>-<service>`` or ``aisemble-<service>`` (``aisemble-nlp``), so every agent reports as
  its own service; other resource attributes come from ``OTEL_RESOURCE_ATTRIBUTES``.

Context on Kafka: the W3C ``traceparent`` (and ``tracestate``, ``baggage``) travel as Kafka record headers
(UTF-8 values), written by ``inject`` and read by ``extract``; a raw producer that sets ``traceparent`` has its
trace continued by the agent.

Off costs nothing but a branch: callers test ``on()`` before building anything; no provider is installed,
no header is added to any record, and ``trace.get_current_span()`` is the API's invalid span.

Log lines: when tracing is on, ``setup`` adds ``trace_id``/``span_id`` fields to every root log handler's
records (``LogContext``) and to their format; a line logged outside any span shows ``-``.

What can go wrong: the collector is away or slow: the ``BatchSpanProcessor`` drops spans past its queue
(``OTEL_BSP_MAX_QUEUE_SIZE``) and the exporter logs its failures; requests are never held by tracing.
``shutdown`` flushes within ``OTEL_BSP_EXPORT_TIMEOUT`` (spans still queued past that are lost).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.util.types import AttributeValue

log = logging.getLogger(__name__)

TRACER_NAME = "aisemble"
DEFAULT_BASE_NAME = "aisemble"
# The headers the propagators may write (W3C tracecontext and baggage): the wire contract's trace headers.
TRACE_HEADERS: tuple[str, ...] = ("traceparent", "tracestate", "baggage")

HeaderList = list[tuple[str, bytes]]
HeadersIn = Sequence[tuple[str, bytes | None]] | Mapping[str, bytes | None] | None


@dataclass(slots=True)
class _State:
    provider: TracerProvider | None = None
    tracer: trace.Tracer | None = None
    global_provider: bool = False  # set as the API's global provider (a process set up from its environment)
    log_filter: logging.Filter | None = None
    formatters: list[tuple[logging.Handler, logging.Formatter | None]] | None = None


_state = _State()


def on() -> bool:
    """Whether tracing is on in this process (the one branch the request path pays when it is off)."""
    return _state.tracer is not None


def sampled() -> bool:
    """Whether tracing is on and the current span is sampled (or there is none: the sampler decides). The edge
    makes its spans, and writes trace headers, only then: an unsampled request (``OTEL_TRACES_SAMPLER_ARG``
    below 1, or a caller's ``traceparent`` with the sampled flag off) costs one check per site, not spans nobody
    exports; the agents see no context and make none (``extract``)."""
    if _state.tracer is None:
        return False
    context = trace.get_current_span().get_span_context()
    return not context.is_valid or context.trace_flags.sampled


def tracer() -> trace.Tracer:
    """The aisemble tracer (the API's no-op tracer when tracing is off)."""
    return _state.tracer if _state.tracer is not None else trace.NoOpTracer()


def provider() -> TracerProvider | None:
    """The provider ``setup`` or ``install`` installed (None while tracing is off)."""
    return _state.provider


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for tracing: an OTLP endpoint is set and the SDK is not disabled."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def service_name(service: str | None, env: Mapping[str, str] | None = None) -> str:
    """The ``service.name`` of a process: the edge (``service`` None) is ``OTEL_SERVICE_NAME`` or ``aisemble-edge``;
    an agent is ``<OTEL_SERVICE_NAME>-<service>`` or ``aisemble-<service>``."""
    env = os.environ if env is None else env
    base = env.get("OTEL_SERVICE_NAME", "").strip()
    if service is None:
        return base or f"{DEFAULT_BASE_NAME}-edge"
    return f"{base or DEFAULT_BASE_NAME}-{service}"


def _exporter(env: Mapping[str, str]) -> object:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
        or "http/protobuf"
    )
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        return GrpcSpanExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: expected 'http/protobuf' or 'grpc'")


def setup(service: str | None, env: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on from the environment (see the module docstring) for the edge (``service`` None) or a
    service's agent; returns whether it is on. Does nothing when the environment does not ask for it, or when
    a provider is installed already (``install``: tests).

    Raises:
        ValueError: an OTLP protocol the SDK cannot export with.
    """
    if _state.provider is not None:
        return True
    env = os.environ if env is None else env
    if not wanted(env):
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    exporter = _exporter(env)
    assert isinstance(exporter, SpanExporter)
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name(service, env)}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    trace.set_tracer_provider(provider)  # for other instrumentation in the process; once per process
    _state.global_provider = True
    log.info("tracing on: service.name %s", provider.resource.attributes.get(SERVICE_NAME))
    return True


def install(provider: TracerProvider) -> None:
    """Trace with ``provider`` (its processors and exporter are the caller's); adds the log fields."""
    _state.provider = provider
    _state.tracer = provider.get_tracer(TRACER_NAME)
    _add_log_fields()


def in_memory(service: str | None = None, processor: SpanProcessor | None = None) -> TracerProvider:
    """A provider named as ``service``'s would be, exporting to ``processor`` only (tests: the SDK's
    in-memory exporter behind a ``SimpleSpanProcessor``), installed; ``shutdown`` uninstalls it."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name(service)}), sampler=ALWAYS_ON)
    if processor is not None:
        provider.add_span_processor(processor)
    install(provider)
    return provider


def shutdown() -> None:
    """Flush what the processors hold and stop them; tracing is off afterwards (idempotent)."""
    provider, _state.provider, _state.tracer = _state.provider, None, None
    _remove_log_fields()
    if provider is not None:
        provider.shutdown()


# -- context in Kafka headers --------------------------------------------------------------------------------


class _HeadersGetter(Getter[HeadersIn]):
    """Reads W3C fields from Kafka headers: a sequence of (name, bytes) pairs or a mapping."""

    def get(self, carrier: HeadersIn, key: str) -> list[str] | None:
        if not carrier:
            return None
        pairs = carrier.items() if isinstance(carrier, Mapping) else carrier
        values = [_text(v) for k, v in pairs if k.lower() == key and v is not None]
        return values or None

    def keys(self, carrier: HeadersIn) -> list[str]:
        if not carrier:
            return []
        return [k for k, _ in (carrier.items() if isinstance(carrier, Mapping) else carrier)]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)


class _HeadersSetter(Setter[HeaderList]):
    def set(self, carrier: HeaderList, key: str, value: str) -> None:
        carrier.append((key, value.encode()))


_GETTER = _HeadersGetter()
_SETTER = _HeadersSetter()


def inject(context: Context | None = None) -> HeaderList:
    """The trace headers of ``context`` (default: the current one) as Kafka headers; empty when there is no
    valid span in it."""
    headers: HeaderList = []
    propagate.inject(headers, context=context, setter=_SETTER)
    return headers


def extract(headers: HeadersIn) -> Context | None:
    """The context carried by a record's headers, or None when they carry no valid span context or one whose
    sampled flag is off (nothing of that trace is exported: the agent makes no span for it, and its reply
    carries no context on)."""
    if not headers:
        return None
    context = propagate.extract(headers, getter=_GETTER)
    span = trace.get_current_span(context).get_span_context()
    return context if span.is_valid and span.trace_flags.sampled else None


def span_context(headers: HeadersIn) -> trace.SpanContext | None:
    """The span context carried by a record's headers (for a link), or None."""
    context = extract(headers)
    return trace.get_current_span(context).get_span_context() if context is not None else None


# -- log fields ----------------------------------------------------------------------------------------------

LOG_FORMAT_FIELDS = " trace_id=%(trace_id)s span_id=%(span_id)s"


class LogContext(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (hex, ``-`` outside a span) to each record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        else:
            record.trace_id = record.span_id = "-"
        return True


def _add_log_fields() -> None:
    if _state.log_filter is not None:
        return
    _state.log_filter = LogContext()
    _state.formatters = []
    for handler in logging.getLogger().handlers:
        handler.addFilter(_state.log_filter)
        formatter = handler.formatter
        _state.formatters.append((handler, formatter))
        fmt = getattr(formatter, "_fmt", None)
        if formatter is not None and isinstance(fmt, str) and "%(trace_id)s" not in fmt:
            handler.setFormatter(logging.Formatter(fmt + LOG_FORMAT_FIELDS, formatter.datefmt))


def _remove_log_fields() -> None:
    log_filter, _state.log_filter = _state.log_filter, None
    if log_filter is None:
        return
    for handler, formatter in _state.formatters or []:
        handler.setFormatter(formatter)  # type: ignore[arg-type]
        handler.removeFilter(log_filter)
    _state.formatters = None


def kafka_attributes(
    operation: str, topic: str, extra: Mapping[str, AttributeValue] | None = None
) -> dict[str, AttributeValue]:
    """A Kafka span's attributes in OpenTelemetry's messaging conventions (``operation``: ``send`` or
    ``receive``), plus ``extra``."""
    return {
        "messaging.system": "kafka",
        "messaging.operation.type": operation,
        "messaging.destination.name": topic,
        **(extra or {}),
    }


def links(contexts: Iterable[trace.SpanContext | None]) -> list[trace.Link]:
    """Links to each valid context of ``contexts`` (a batch span's members)."""
    return [trace.Link(c) for c in contexts if c is not None and c.is_valid]
