"""The edge's HTTP contract, against the real Kafka and Redis: the OpenAPI document tells the truth.

schemathesis reads the running edge's ``/openapi.json``, generates valid and invalid requests for every
operation (multipart upload included: it encodes the ``file`` part from the schema) and checks each
answer: no 5xx, the status is documented, the content type is documented, the body matches the
documented schema (``ReplyEvent`` for 200, ``ErrorBody`` for everything else).

Only the data agent runs (models for nlp/llm/vision are too heavy here), so a valid request to the other
services waits ``AISEMBLE_REQUEST_TIMEOUT_S`` and gets 504 ``timeout``: for those operations a 504 with that
code is the one 5xx allowed, and they get fewer examples (each valid one costs the timeout).
Explicit tests pin the rules the issue named: strict booleans, the one-of rules, malformed JSON,
FastAPI's own 422, 404 and 405, all in the ``ErrorBody`` shape.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from aisemble.pipeline import Pipeline
from schemas import ErrorCode, ReplyEvent
from schemas.http import STATUS_DESCRIPTIONS, ErrorBody
from streams.settings import Settings

if TYPE_CHECKING:
    from schemathesis.schemas import BaseSchema

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = "2"  # a request to a service without an agent answers 504 after this
MAX_BODY_BYTES = 65_536
CONTRACT_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
SERVICE_OPERATIONS = [
    "/data/process",
    "/ai/nlp/process",
    "/ai/llm/completion",
    "/ai/vision/analyze",
    "/ai/vision/analyze/upload",
]
AGENT_PATHS = {"/data/process", "/health", "/lag", "/requests/{request_id}"}  # the operations whose agent runs here
STATUSES: Counter[str] = Counter()  # "<method> <path> <mode> <status>" -> answers seen by the fuzz tests

@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    logs = Path(tmp_path_factory.mktemp("logs"))
    p = Pipeline.isolated(
        infra_settings,
        ["data"],
        logs,
        AISEMBLE_REQUEST_TIMEOUT_S=REQUEST_TIMEOUT_S,
        AISEMBLE_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
    ).start()
    yield p
    p.stop()
    if STATUSES:
        print("HTTP-CONTRACT:", json.dumps(dict(sorted(STATUSES.items()))))


@pytest.fixture(scope="module")
def api_schema(pipeline: Pipeline) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{pipeline.url}/openapi.json")


@pytest.fixture(scope="module")
def http(pipeline: Pipeline) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pipeline.url, timeout=30) as client:
        yield client


FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


def _fuzz(
    api_schema: BaseSchema, pipeline: Pipeline, method: str, path: str, mode: GenerationMode, examples: int
) -> None:
    """Run ``examples`` generated cases of one operation through the contract checks (plus our own 5xx rule).

    schemathesis' own pytest integration (``@schema.parametrize``) breaks on pytest 9.2 (it sets
    ``node._nodeid``), so this drives its documented Hypothesis strategy (``APIOperation.as_strategy``).
    """
    operation = api_schema[path][method]
    agent_runs = path in AGENT_PATHS

    @settings(FUZZ, max_examples=examples)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Case) -> None:
        response = case.call(base_url=pipeline.url, timeout=30)
        STATUSES[f"{method} {path} {mode.value} {response.status_code}"] += 1
        case.validate_response(
            response, checks=[*([not_a_server_error] if agent_runs else []), *CONTRACT_CHECKS]
        )
        if response.status_code >= 500:  # no agent runs for this service: only the edge's reply timeout is fine
            assert response.status_code == 504 and response.json()["error"]["code"] == ErrorCode.TIMEOUT, (
                response.text
            )

    run()


@pytest.mark.parametrize(
    ("method", "path", "mode", "examples"),
    [
        ("POST", "/data/process", GenerationMode.POSITIVE, 50),
        ("POST", "/data/process", GenerationMode.NEGATIVE, 50),
        ("GET", "/health", GenerationMode.POSITIVE, 3),  # no parameters: nothing negative to generate
        ("GET", "/lag", GenerationMode.POSITIVE, 3),
        ("GET", "/requests/{request_id}", GenerationMode.POSITIVE, 20),  # asynchronous results (unknown: 404)
        ("GET", "/requests/{request_id}", GenerationMode.NEGATIVE, 20),
    ],
)
def test_routes_with_their_agent_never_5xx_and_conform(
    api_schema: BaseSchema, pipeline: Pipeline, method: str, path: str, mode: GenerationMode, examples: int
) -> None:
    _fuzz(api_schema, pipeline, method, path, mode, examples)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("path", [p for p in SERVICE_OPERATIONS if p not in AGENT_PATHS])
def test_routes_without_an_agent_conform_and_only_time_out(
    api_schema: BaseSchema, pipeline: Pipeline, path: str, mode: GenerationMode
) -> None:
    # a valid request waits REQUEST_TIMEOUT_S for its 504: fewer positive examples keep the test bounded
    _fuzz(api_schema, pipeline, "POST", path, mode, examples=8 if mode is GenerationMode.POSITIVE else 20)


def test_every_operation_is_fuzzed(api_schema: BaseSchema) -> None:
    operations = {f"{op.ok().method.upper()} {op.ok().path}" for op in api_schema.get_all_operations()}
    assert operations == {
        "GET /health",
        "GET /lag",
        "GET /requests/{request_id}",
        *(f"POST {p}" for p in SERVICE_OPERATIONS),
    }


# --- the document itself ---------------------------------------------------------------------------------


def test_openapi_documents_every_status_and_the_one_of_rules(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    for path in SERVICE_OPERATIONS:
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "202", *(str(s) for s in STATUS_DESCRIPTIONS)}, path  # 202: asynchronous
        assert responses["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/AsyncAccepted")
        assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ReplyEvent")
        for status in STATUS_DESCRIPTIONS:
            assert responses[str(status)]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
        assert "Retry-After" in responses["429"]["headers"]
    components = doc["components"]["schemas"]
    one_of = components["NlpRequest"]["oneOf"]
    assert [branch["required"] for branch in one_of] == [["text"], ["texts"]]
    for model in ("NlpRequest", "DataProcessRequest", "LlmCompletionRequest", "VisionRequest"):
        assert components[model]["additionalProperties"] is False, model
        cache = components[model]["properties"]["cache"]
        assert {"type": "boolean"} in cache["anyOf"], model


# --- explicit rules ----------------------------------------------------------------------------------------


def _error(response: httpx.Response, status: int, code: str) -> ErrorBody:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = ErrorBody.model_validate(response.json())
    assert set(response.json()) == set(ErrorBody.model_fields)
    assert body.error.code == code, body
    return body


BRIEF = {"operation": "analyze", "data": {"records": [{"id": 1, "value": 10}]}}


@pytest.mark.parametrize("cache", [0, 1, "true", "false"])
def test_cache_must_be_a_real_boolean(http: httpx.Client, cache: object) -> None:
    body = _error(http.post("/data/process", json={**BRIEF, "cache": cache}), 422, ErrorCode.INVALID_INPUT)
    assert body.service == "data" and body.error.message.startswith("cache:")


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/ai/nlp/process", {"task": "embed", "text": "a", "normalize": 1}),
        ("/ai/llm/completion", {"prompt": "x", "cache": 0}),
        ("/ai/llm/completion", {"prompt": "x", "max_tokens": "5"}),
        ("/ai/vision/analyze", {"task": "describe", "image_b64": "aGk=", "cache": "yes"}),
    ],
)
def test_other_routes_are_strict_too(http: httpx.Client, path: str, payload: dict[str, object]) -> None:
    _error(http.post(path, json=payload), 422, ErrorCode.INVALID_INPUT)


@pytest.mark.parametrize(
    "payload",
    [
        {"task": "sentiment", "text": "a", "texts": ["b"]},
        {"task": "sentiment"},
        {"task": "sentiment", "text": None, "texts": None},
    ],
)
def test_nlp_needs_exactly_one_of_text_or_texts(http: httpx.Client, payload: dict[str, object]) -> None:
    body = _error(http.post("/ai/nlp/process", json=payload), 422, ErrorCode.INVALID_INPUT)
    assert "exactly one of 'text' or 'texts'" in body.error.message and body.service == "nlp"


def test_unknown_fields_are_refused(http: httpx.Client) -> None:
    body = _error(http.post("/data/process", json={**BRIEF, "verbose": True}), 422, ErrorCode.INVALID_INPUT)
    assert body.error.message.startswith("verbose:")


def test_malformed_json_is_400_invalid_json(http: httpx.Client) -> None:
    response = http.post(
        "/data/process", content=b'{"operation": ', headers={"content-type": "application/json", "X-Request-Id": "m1"}
    )
    body = _error(response, 400, ErrorCode.INVALID_JSON)
    assert body.id == "m1" and response.headers["x-request-id"] == "m1" and "not valid JSON" in body.error.message


def test_fastapi_validation_error_has_the_error_shape_and_names_the_field(http: httpx.Client) -> None:
    body = _error(
        http.post("/data/process", json={"operation": "analyze", "data": {"rows": []}}), 422, ErrorCode.INVALID_INPUT
    )
    assert "data.records: Field required" in body.error.message and body.id is None
    long_id = "x" * 129
    body = _error(http.post("/data/process", json=BRIEF, headers={"X-Request-Id": long_id}), 422, "invalid_input")
    assert "x-request-id" in body.error.message


def test_broken_multipart_is_400(http: httpx.Client) -> None:
    response = http.post(
        "/ai/vision/analyze/upload",
        content=b"task=describe",
        headers={"content-type": "multipart/form-data"},  # no boundary: the parser cannot start
    )
    _error(response, 400, ErrorCode.INVALID_INPUT)


def test_oversized_body_is_413_with_the_error_shape(http: httpx.Client) -> None:
    records = [{"id": i, "text": "x" * 100} for i in range(1000)]  # ~120 KB > MAX_BODY_BYTES
    response = http.post("/data/process", json={"operation": "analyze", "data": {"records": records}})
    _error(response, 413, ErrorCode.PAYLOAD_TOO_LARGE)


def test_unknown_path_and_wrong_method_have_the_error_shape(http: httpx.Client) -> None:
    _error(http.get("/no/such/path"), 404, ErrorCode.NOT_FOUND)
    response = http.get("/data/process")
    body = _error(response, 405, ErrorCode.METHOD_NOT_ALLOWED)
    assert body.service == "data" and response.headers["allow"] == "POST"


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/data/process", b'{"operation": "analyze", "data": {"records": [{"n": 123456789012345678901234567890}]}}'),
        ("/data/process", b'{"operation": "analyze", "data": {"records": [{"\\ud800": 1}]}}'),
        ("/ai/nlp/process", b'{"task": "sentiment", "text": "lone \\udc00 surrogate"}'),
    ],
)
def test_json_that_cannot_become_an_event_is_422_not_500(http: httpx.Client, path: str, raw: bytes) -> None:
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    body = _error(response, 422, ErrorCode.INVALID_INPUT)
    # free-form records hit the event check; a typed string field is refused by pydantic itself
    assert "cannot be sent as an event" in body.error.message or "valid string" in body.error.message


def test_a_valid_request_still_gets_the_reply_event(http: httpx.Client) -> None:
    response = http.post("/data/process", json={**BRIEF, "cache": False})
    assert response.status_code == 200, response.text
    assert ReplyEvent.model_validate(response.json()).ok
