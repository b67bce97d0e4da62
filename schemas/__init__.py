"""The wire contract of aisemble: event envelopes and each service's input and output models.

Everything that crosses Kafka or HTTP is described here, as pydantic v2 models, and the JSON Schema
files under ``schemas/jsonschema/`` are generated from these models (``aisemble schemas export``).
This package imports nothing else of the project; every other package imports it.
"""

from __future__ import annotations

from schemas.errors import ErrorCode
from schemas.events import (
    SERVICES,
    DeadLetterEvent,
    DeadLetterSource,
    ErrorInfo,
    PartialBatchEvent,
    PartialDelta,
    ReplyEvent,
    RequestEvent,
    Service,
)

__all__ = [
    "SERVICES",
    "DeadLetterEvent",
    "DeadLetterSource",
    "ErrorCode",
    "ErrorInfo",
    "PartialBatchEvent",
    "PartialDelta",
    "ReplyEvent",
    "RequestEvent",
    "Service",
]
