"""The HTTP edge's own contract: its error body, its statuses, and the JSON Schema rules HTTP bodies share.

Every error the edge answers, whoever raised it (a route, FastAPI's body validation, the body-size limit,
an unknown path), has one shape, ``ErrorBody``: the reply event's fields with ``ok: false``. A client
reads successes (``ReplyEvent``) and failures the same way and branches on ``error.code``.

``one_of_present`` writes an "exactly one of these fields" rule into a model's JSON Schema in the form
the runtime validators enforce: a field counts as given when it is present and not null.

``REQUEST_ID_PATTERN`` is the rule for a caller's ``X-Request-Id``: 1 to 128 characters of
``[A-Za-z0-9._:-]``. The id becomes a Kafka record key, a log field and part of Redis keys, so anything
else (spaces, control characters, quotes, ``*``, non-ASCII) is refused (422) before it reaches any of them.

``API_KEY_SCHEME`` and ``BEARER_SCHEME`` name the two security schemes of the OpenAPI document: when the edge is
configured with API keys (``AISEMBLE_API_KEYS``), every service route needs one of them, else 401
``unauthorized`` with ``WWW-Authenticate``.

``WireSafe`` refuses (422) a body that is valid JSON but cannot travel as a Kafka event: integers past
64 bits and strings with lone surrogates (``"\\ud800"``) parse in Python but orjson cannot write them.
Without it such a body reached the producer and failed there as a 500.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Self

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.json_schema import JsonDict

from schemas.events import ErrorInfo

# X-Request-Id: what a caller may choose as its request id (a Kafka key, a log field, part of Redis keys).
REQUEST_ID_MAX_LENGTH = 128
REQUEST_ID_PATTERN = rf"^[A-Za-z0-9._:-]{{1,{REQUEST_ID_MAX_LENGTH}}}$"
REQUEST_ID_RULE = f"1 to {REQUEST_ID_MAX_LENGTH} characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


def valid_request_id(value: str) -> bool:
    """Whether ``value`` may be used as a caller-chosen request id (``REQUEST_ID_PATTERN``)."""
    return _REQUEST_ID.fullmatch(value) is not None


# The security schemes of the OpenAPI document (their names there, and the header each reads).
API_KEY_HEADER = "X-API-Key"
API_KEY_SCHEME = "ApiKey"
BEARER_SCHEME = "Bearer"
SECURITY_DESCRIPTION = (
    "Needed only when the edge is configured with API keys (AISEMBLE_API_KEYS); send one of them in "
    "X-API-Key or as Authorization: Bearer <key>. Without a matching key a service route answers 401 "
    "(code unauthorized, WWW-Authenticate header). GET /health answers its status without a key; its detail "
    "needs one."
)


class ErrorBody(BaseModel):
    """Every non-200 answer of the edge: the reply event's shape with ``ok: false`` and an ``error``."""

    model_config = ConfigDict(frozen=True)

    id: str | None = Field(
        description="The request id (X-Request-Id or the edge's own); null when the request never got one."
    )
    service: str = Field(description="The service addressed, or '' when the request named none (404, 405).")
    task: str = Field(description="The task, or '' when the edge refused the request before reading one.")
    ok: Literal[False]
    output: None
    error: ErrorInfo
    cached: bool
    model: str | None = Field(description="The model that failed, when an agent answered the error.")
    timings_ms: dict[str, float]


def _integral_float_as_int(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON Schema means it: 2 and 2.0 are integers, "2", true and 2.5 are not (strict models).
JsonInt = Annotated[int, BeforeValidator(_integral_float_as_int)]

# Base64 as ``base64.b64decode(..., validate=True)`` accepts it: the standard alphabet, padded, non-empty.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})$"


class WireSafe(BaseModel):
    """Mixin for HTTP bodies: the validated body must encode as event JSON (64-bit integers, valid Unicode)."""

    @model_validator(mode="after")
    def _encodable_as_an_event(self) -> Self:
        try:
            orjson.dumps(self.model_dump())
        except orjson.JSONEncodeError as exc:
            raise ValueError(
                f"cannot be sent as an event ({exc}): integers must fit in 64 bits and strings must be "
                "valid Unicode (no lone surrogates)"
            ) from exc
        return self


def one_of_present(*alternatives: tuple[str, JsonDict]) -> JsonDict:
    """JSON Schema for "exactly one of these fields is present and not null".

    Each alternative is ``(field name, the schema of its non-null value)``. A branch matches when its field
    is present with a non-null value, so ``oneOf`` fails when none or several are given, as the models'
    ``model_validator`` does (an explicit ``null`` counts as absent).
    """
    return {
        "oneOf": [{"required": [name], "properties": {name: value}} for name, value in alternatives],
    }


# The statuses an HTTP route may answer besides 200, with what each means (the OpenAPI document's text).
STATUS_DESCRIPTIONS: dict[int, str] = {
    400: "The body could not be parsed: not JSON (code invalid_json) or a broken multipart body (invalid_input).",
    401: "API keys are configured and the request carried none that matches, in X-API-Key or as "
    "Authorization: Bearer (code unauthorized; WWW-Authenticate names the scheme).",
    403: "The API key may not use this service (its services list in AISEMBLE_API_KEYS; code forbidden).",
    409: "A request with this X-Request-Id is already in flight at this edge, or (asynchronous) the id is in use: "
    "pending, or its result is kept; nothing was changed or produced (code invalid_input).",
    413: "The body, the image or the reply exceeds a limit (code payload_too_large).",
    422: "The body does not validate (code invalid_input; the message names the field), unknown_task, "
    "or claim_check_missing.",
    429: "The edge holds its maximum of requests or of body bytes in flight, or (asynchronous) this API key has its "
    "maximum of requests pending (code unavailable), or the API key is past one of its quotas: requests or tokens "
    "per minute, concurrent requests (code rate_limited); retry after Retry-After seconds.",
    500: "The model failed on this input (model_error) or a bug (internal).",
    501: "The task needs a model that is not configured (code model_not_configured).",
    503: "Kafka is unavailable: the request was not produced (code unavailable).",
    504: "No reply within AISEMBLE_REQUEST_TIMEOUT_S (code timeout, the message names the request id), "
    "or the agent picked the request up after its deadline (deadline_exceeded).",
}
