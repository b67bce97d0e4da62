"""Error codes that travel on the wire (``ReplyEvent.error.code`` and ``DeadLetterEvent.error.code``).

Codes are stable strings: clients in any language branch on them, so a code is never renamed.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Machine-readable reason for a failed request or a dead-lettered event."""

    # The event itself could not be read (dead-letter topic).
    INVALID_ENCODING = "invalid_encoding"  # value is not UTF-8
    INVALID_JSON = "invalid_json"  # value is not a JSON object
    INVALID_EVENT = "invalid_event"  # JSON, but not a valid RequestEvent envelope
    # The envelope was fine; the request could not be served (error reply).
    UNKNOWN_TASK = "unknown_task"
    INVALID_INPUT = "invalid_input"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    CLAIM_CHECK_MISSING = "claim_check_missing"
    MODEL_NOT_CONFIGURED = "model_not_configured"
    MODEL_ERROR = "model_error"
    REPLY_UNDELIVERABLE = "reply_undeliverable"  # reply_to topic refused the reply (dead letter)
    REPLY_TO_REFUSED = "reply_to_refused"  # reply_to is outside the reply-topic policy or does not exist (dead letter)
    INTERNAL = "internal"
    CANCELLED = "cancelled"  # the caller went away (a streaming client disconnected); the row was stopped
    # Edge-side only (HTTP).
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    NOT_FOUND = "not_found"  # no such path (404)
    METHOD_NOT_ALLOWED = "method_not_allowed"  # the path exists, not with this method (405)
    UNAUTHORIZED = "unauthorized"  # API keys are configured and the request carried none that matches (401)
    FORBIDDEN = "forbidden"  # the API key may not use this service (403)
    RATE_LIMITED = "rate_limited"  # the API key is past one of its quotas: rpm, tpm, max_in_flight (429)
