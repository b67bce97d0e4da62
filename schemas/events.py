"""Event envelopes: what a request, a reply and a dead letter look like on Kafka.

The contract (docs/wire-format.md) in short:

* request topic ``{prefix}.{service}.requests``: key = request id (UTF-8), value = JSON ``RequestEvent``; the
  bulk lane ``{prefix}.{service}.bulk`` takes the same events, served with the capacity interactive work leaves;
* replies go to the request's ``reply_to`` topic, or to ``{prefix}.{service}.results`` when it names none;
* events that cannot be read go to ``{prefix}.{service}.dlq`` as ``DeadLetterEvent``.

Unknown fields in a request are ignored, so producers may add their own metadata. Record headers: only the W3C
trace context (``traceparent``, ``tracestate``, ``baggage``) has a meaning, and only while tracing is on
(``streams.tracing``); a request's is continued by the agent and carried on to its reply.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Service = Literal["llm", "vision", "nlp", "data"]
SERVICES: tuple[Service, ...] = ("llm", "vision", "nlp", "data")

RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
CorrelationId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
# Kafka's own rule for topic names: at most 249 of [a-zA-Z0-9._-].
TopicName = Annotated[str, StringConstraints(min_length=1, max_length=249, pattern=r"^[a-zA-Z0-9._-]+$")]
JsonObject = dict[str, object]


class RequestEvent(BaseModel):
    """A request for one service, produced to ``{prefix}.{service}.requests`` with key = ``id``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: RequestId = Field(description="Request id, chosen by the producer; also the Kafka key.")
    task: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        description="The service's task, e.g. 'analyze', 'sentiment', 'completion'."
    )
    input: JsonObject = Field(description="Task input; its shape is given per service and task.")
    reply_to: TopicName | None = Field(
        default=None,
        description=(
            "Topic for the reply; null sends it to the service's results topic. It must match the reply-topic "
            "policy ({prefix}.replies.* or {prefix}.edge.*.replies by default) and exist, else the request is "
            "not run and goes to the service's DLQ as reply_to_refused."
        ),
    )
    correlation_id: CorrelationId | None = Field(
        default=None,
        description="Opaque token echoed in the reply; the edge sets an unguessable one per call and matches on it.",
    )
    deadline_ms: int | None = Field(
        default=None,
        ge=0,
        description="Epoch milliseconds after which the request is answered deadline_exceeded unrun.",
    )
    cache: bool | None = Field(
        default=None,
        description=(
            "true: read and write the result cache; false: bypass it; null/absent: the service's "
            "policy (cache everything reproducible; the LLM caches only temperature 0 or seeded requests)."
        ),
    )
    stream: bool = Field(
        default=False,
        description=(
            "true (LLM tasks only): the agent also produces PartialBatchEvents to reply_to while it generates, "
            "then the final ReplyEvent as usual. Other services ignore it."
        ),
    )
    store_result_s: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Keep the reply in Redis under {prefix}:result:{id} for this many seconds (asynchronous requests: "
            "GET /requests/{id} reads it even when the edge that took the request is gone). null: not kept."
        ),
    )


class ErrorInfo(BaseModel):
    """Why a request failed or an event was dead-lettered."""

    model_config = ConfigDict(frozen=True)

    code: str = Field(description="A stable code from schemas.errors.ErrorCode.")
    message: str = Field(description="Human-readable detail, naming the offending field where known.")


class ReplyEvent(BaseModel):
    """The answer to one request; key = request id."""

    model_config = ConfigDict(frozen=True)

    id: RequestId
    correlation_id: CorrelationId | None = Field(default=None, description="The request's correlation_id, echoed.")
    service: Service
    task: str
    ok: bool
    output: JsonObject | None = None
    error: ErrorInfo | None = None
    cached: bool = False
    model: str | None = Field(default=None, description="Model name and version that produced the output.")
    timings_ms: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "queue_ms (produced to picked up), inference_ms (the batch's model call), batch_size, "
            "total_ms (picked up to reply produced)."
        ),
    )


class PartialDelta(BaseModel):
    """New text of one streamed request since its previous delta."""

    model_config = ConfigDict(frozen=True)

    id: RequestId
    correlation_id: CorrelationId | None = None
    attempt: str = Field(
        description="Unique per generation attempt (a redelivered request is generated again under a new attempt)."
    )
    seq: int = Field(ge=0, description="0, 1, 2, ... per attempt; a consumer drops a seq it has seen.")
    text: str = Field(description="Text decoded since the previous delta (may be empty while a character is split).")
    tokens: int = Field(ge=0, description="Tokens generated since the previous delta.")


class PartialBatchEvent(BaseModel):
    """Streamed tokens: ONE record per decode step and reply topic, carrying a delta for every streaming row
    of the step bound for that topic (never one record per token per row). Key = the agent's worker id.

    Partials are an early view: the final ``ReplyEvent`` (same id and correlation_id) is authoritative and
    carries the whole text. A consumer that relays a stream sends the final text's remainder past what it
    already relayed, so a lost, late or reordered partial changes nothing but timing.
    """

    model_config = ConfigDict(frozen=True)

    partial: Literal[True] = True
    service: Service
    task: str
    deltas: list[PartialDelta]


class DeadLetterSource(BaseModel):
    """Where a dead-lettered event was read from."""

    model_config = ConfigDict(frozen=True)

    topic: str
    partition: int
    offset: int


class DeadLetterEvent(BaseModel):
    """An event that could not be processed, with the reason and the original bytes."""

    model_config = ConfigDict(frozen=True)

    service: Service
    error: ErrorInfo
    source: DeadLetterSource
    key: str | None = Field(default=None, description="The original key, decoded as UTF-8 (lossy).")
    payload: str = Field(
        description="The original value, as text or base64 (see payload_encoding); a prefix when truncated."
    )
    payload_encoding: Literal["utf-8", "base64"]
    payload_bytes: int = Field(default=0, ge=0, description="Size of the original value in bytes.")
    payload_sha256: str | None = Field(default=None, description="SHA-256 (hex) of the original value.")
    truncated: bool = Field(
        default=False,
        description="True when the original value was too large to carry: payload holds only its first bytes.",
    )
    ts_ms: int = Field(description="When the event was dead-lettered, epoch milliseconds.")
