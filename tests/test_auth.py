"""Who the edge answers: API keys on the service routes, the X-Request-Id rule, and the loopback rule.

Three tiers:

* pure units: ``check_bind`` / ``is_loopback`` / ``key_digests`` / ``matches_any``, and the dependency on
  the real edge app through FastAPI's TestClient without its lifespan (no Kafka, no Redis: every request
  here is refused before a route runs, so the edge object is never touched);
* the ``aisemble edge`` command as a subprocess: exposed without keys it exits 2 with the reason before
  uvicorn is imported (a stand-in ``uvicorn`` on PYTHONPATH records any import, so nothing ever binds);
* integration: a real ``Pipeline.isolated`` edge + data agent with ``AISEMBLE_API_KEYS='["k1","k2"]'``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from aisemble.pipeline import Pipeline, free_port
from api.app import create_app
from api.auth import (
    ApiKeyAuth,
    InsecureBindError,
    InvalidApiKeysError,
    auth_dependencies,
    check_bind,
    is_loopback,
    key_digests,
    matches_any,
)
from api.guards import InFlightLimit
from schemas import ErrorCode
from schemas.http import STATUS_DESCRIPTIONS, ErrorBody, valid_request_id
from streams.settings import Settings
from tests.kafka_client import committed_and_end

ROOT = Path(__file__).resolve().parents[1]
KEYED_TIMEOUT_S = 5
KEYED_MAX_PENDING = 2
KEYS = ["k1-0123456789abcdef", "k2-fedcba9876543210"]
SERVICE_ROUTES = ["/data/process", "/ai/nlp/process", "/ai/llm/completion", "/ai/vision/analyze"]
UPLOAD = "/ai/vision/analyze/upload"
SERVICE_OF = {
    "/data/process": "data",
    "/ai/nlp/process": "nlp",
    "/ai/llm/completion": "llm",
    "/ai/vision/analyze": "vision",
    UPLOAD: "vision",
}
BRIEF = {"operation": "analyze", "data": {"records": [{"id": 1, "value": 10}]}}
VALID_BODIES: dict[str, dict[str, object]] = {
    "/data/process": BRIEF,
    "/ai/nlp/process": {"task": "sentiment", "text": "great"},
    "/ai/llm/completion": {"prompt": "hi"},
    "/ai/vision/analyze": {"task": "describe", "image_b64": "aGk="},
}


def _settings(**kw: object) -> Settings:
    return Settings.model_validate({"api_keys": [], "allow_insecure": False, **kw})


def _error(response: httpx.Response, status: int, code: str) -> ErrorBody:
    assert response.status_code == status, response.text
    body = ErrorBody.model_validate(response.json())
    assert set(response.json()) == set(ErrorBody.model_fields)
    assert body.error.code == code and not body.ok, body
    return body


# --- the loopback rule (pure) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("10.0.0.5", False),
        ("fe80::1%eth0", False),
        ("edge.example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
@pytest.mark.parametrize(("keys", "insecure"), [([], False), ([], True), (KEYS, False), (KEYS, True)])
def test_check_bind_always_allows_loopback(host: str, keys: list[str], insecure: bool) -> None:
    check_bind(host, _settings(api_keys=keys, allow_insecure=insecure))


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "edge.example.com"])
def test_check_bind_refuses_an_exposed_edge_without_keys(host: str) -> None:
    with pytest.raises(InsecureBindError) as info:
        check_bind(host, _settings())
    assert info.value.host == host
    message = str(info.value)
    assert host in message and "AISEMBLE_API_KEYS" in message and "AISEMBLE_ALLOW_INSECURE" in message


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20"])
def test_check_bind_allows_an_exposed_edge_with_keys_or_allow_insecure(host: str) -> None:
    check_bind(host, _settings(api_keys=KEYS))
    check_bind(host, _settings(allow_insecure=True))
    check_bind(host, _settings(api_keys=KEYS, allow_insecure=True))


def test_settings_read_api_keys_as_a_json_list_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AISEMBLE_API_KEYS", json.dumps(KEYS))
    monkeypatch.setenv("AISEMBLE_ALLOW_INSECURE", "true")
    settings = Settings()
    assert [k.get_secret_value() for k in settings.api_keys] == KEYS and settings.allow_insecure
    assert KEYS[0] not in repr(settings) and KEYS[0] not in str(settings.model_dump())


# --- keys (pure) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "index", "reason"),
    [([""], 0, "empty"), (["ok", " padded"], 1, "printable ASCII"), (["kéy"], 0, "ASCII"), (["a\nb"], 0, "ASCII")],
)
def test_unusable_keys_are_refused_without_showing_them(keys: list[str], index: int, reason: str) -> None:
    with pytest.raises(InvalidApiKeysError) as info:
        key_digests(_settings(api_keys=keys))
    assert info.value.index == index and reason in str(info.value)
    assert all(k not in str(info.value) for k in keys if k.strip())
    with pytest.raises(InvalidApiKeysError):
        check_bind("0.0.0.0", _settings(api_keys=keys))  # the CLI reports it before anything binds


def test_matches_any_compares_against_every_key() -> None:
    digests = key_digests(_settings(api_keys=KEYS))
    assert matches_any(KEYS[0], digests) and matches_any(KEYS[1], digests)
    assert not matches_any(KEYS[0][:-1], digests)
    assert not matches_any(KEYS[0] + "x", digests)
    assert not matches_any("", digests)
    assert not matches_any("ÿ\x00", digests)  # any Latin-1 header text is compared, never an exception
    assert not matches_any(KEYS[0], [])


def test_the_dependency_never_shows_a_key() -> None:
    auth = ApiKeyAuth(_settings(api_keys=KEYS))
    assert auth.enabled and all(k not in repr(auth) for k in KEYS)
    assert not ApiKeyAuth(_settings()).enabled


def test_metrics_requires_a_key_only_when_the_setting_says_so() -> None:
    assert len(auth_dependencies(_settings(api_keys=KEYS), route="metrics")) == 1
    assert auth_dependencies(_settings(api_keys=KEYS, metrics_require_key=False), route="metrics") == []
    assert len(auth_dependencies(_settings(api_keys=KEYS, metrics_require_key=False))) == 1


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("abc", True),
        ("a" * 128, True),
        ("A-z_0.9:x", True),
        ("0f8fad5b-d9cb-469f-a165-70867728950e", True),
        ("", False),
        ("a" * 129, False),
        ("has space", False),
        (" lead", False),
        ("tab\t", False),
        ("new\nline", False),
        ("star*", False),
        ('quote"', False),
        ("slash/", False),
        ("{braces}", False),
        ("café", False),
        ("abc\n", False),
    ],
)
def test_the_request_id_rule(value: str, valid: bool) -> None:
    assert valid_request_id(value) is valid


# --- the dependency on the real edge app, without Kafka ---------------------------------------------------


def _client(settings: Settings) -> TestClient:
    app = create_app(settings)
    # only its in-flight limit is used (api.admission): every request below is refused before a route runs
    app.state.edge = SimpleNamespace(in_flight=InFlightLimit(10))
    return TestClient(app, raise_server_exceptions=False)  # no `with`: the lifespan (Kafka, Redis) never starts


@pytest.fixture(scope="module")
def keyed() -> Iterator[TestClient]:
    client = _client(_settings(api_keys=KEYS))
    yield client
    client.close()


@pytest.mark.parametrize("path", [*SERVICE_ROUTES, UPLOAD])
def test_every_service_route_without_a_key_is_401(keyed: TestClient, path: str) -> None:
    response = keyed.post(path, json=VALID_BODIES.get(path, {}), headers={"X-Request-Id": "r-1"})
    body = _error(response, 401, ErrorCode.UNAUTHORIZED)
    assert response.headers["www-authenticate"] == 'Bearer realm="aisemble"'
    assert body.id == "r-1" and response.headers["x-request-id"] == "r-1"
    assert body.service == SERVICE_OF[path]
    assert "X-API-Key" in body.error.message and "Bearer" in body.error.message


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": "wrong"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEYS[0]}"},  # not the Bearer scheme: no key presented
        {"X-API-Key": KEYS[0][:-1]},
        {"X-API-Key": ""},
        {"X-API-Key": "wrong", "Authorization": "Bearer also-wrong"},
        {"X-API-Key": "\xff\xfe".encode("latin-1")},  # raw bytes outside ASCII: refused, not a 500
    ],
)
def test_a_wrong_or_missing_key_is_401(
    keyed: TestClient, headers: dict[str, str | bytes], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        response = keyed.post("/data/process", json=BRIEF, headers=headers)
    body = _error(response, 401, ErrorCode.UNAUTHORIZED)
    assert body.service == "data" and body.id is None
    texts = [v.decode("latin-1") if isinstance(v, bytes) else v for v in headers.values()]
    sent = [v.removeprefix("Bearer ").removeprefix("Basic ") for v in texts if v]
    for secret in [*KEYS, *sent]:
        assert secret not in response.text, "a key (or what was sent) is never echoed"
        assert all(secret not in record.getMessage() for record in caplog.records), "nor logged"
    assert any("401 POST '/data/process'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": KEYS[0]},
        {"X-API-Key": KEYS[1]},
        {"Authorization": f"Bearer {KEYS[1]}"},
        {"Authorization": f"bearer {KEYS[0]}"},
        {"X-API-Key": "wrong", "Authorization": f"Bearer {KEYS[1]}"},  # either header may carry the key
    ],
)
def test_a_configured_key_passes_the_door(
    keyed: TestClient, headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    # past the door, the route's own validation answers: this body is invalid, so no edge call happens
    with caplog.at_level(logging.DEBUG):
        response = keyed.post("/data/process", json={"operation": "analyze"}, headers=headers)
    body = _error(response, 422, ErrorCode.INVALID_INPUT)
    assert "data: Field required" in body.error.message
    assert all(k not in r.getMessage() for k in KEYS for r in caplog.records)


def test_the_key_is_checked_before_the_route_validates_anything(keyed: TestClient) -> None:
    # a bad X-Request-Id or an invalid body is not reported to a caller without a key
    body = _error(
        keyed.post("/data/process", json={"rows": 1}, headers={"X-Request-Id": "bad id"}), 401, "unauthorized"
    )
    assert body.id is None
    upload = keyed.post(UPLOAD, data={"task": "nope"}, files={"file": ("a.png", b"x")})
    _error(upload, 401, ErrorCode.UNAUTHORIZED)
    # the gate (ApiKeyGate) answers before any body is read or parsed: even malformed JSON is 401
    raw = keyed.post("/data/process", content=b"{", headers={"content-type": "application/json"})
    _error(raw, 401, ErrorCode.UNAUTHORIZED)
    assert raw.headers["www-authenticate"].startswith("Bearer")
    # with a key, the same body is judged on its own
    raw = keyed.post("/data/process", content=b"{", headers={"content-type": "application/json", "X-API-Key": KEYS[0]})
    _error(raw, 400, ErrorCode.INVALID_JSON)


def test_health_and_the_openapi_document_need_no_key(keyed: TestClient) -> None:
    assert keyed.get("/openapi.json").status_code == 200
    # /health has no door: without the lifespan the route itself fails (500, the stand-in edge has no
    # state), which shows it ran; the integration test below sees the real 200
    assert keyed.get("/health").status_code == 500


def test_without_keys_the_door_is_open() -> None:
    client = _client(_settings())
    body = _error(client.post("/data/process", json={"operation": "analyze"}), 422, ErrorCode.INVALID_INPUT)
    assert "data: Field required" in body.error.message


@pytest.mark.parametrize("path", [*SERVICE_ROUTES, UPLOAD])
@pytest.mark.parametrize("rid", ["", "has space", "x" * 129, "a*b", "caf\u00e9".encode(), "{x}", "quote'", "a\x7f"])
def test_a_bad_request_id_is_422_on_every_route(keyed: TestClient, path: str, rid: str | bytes) -> None:
    headers: dict[str, str | bytes] = {"X-API-Key": KEYS[0], "X-Request-Id": rid}
    if path == UPLOAD:
        response = keyed.post(path, data={"task": "describe"}, files={"file": ("a.png", b"x")}, headers=headers)
    else:
        response = keyed.post(path, json=VALID_BODIES[path], headers=headers)
    body = _error(response, 422, ErrorCode.INVALID_INPUT)
    assert "x-request-id" in body.error.message
    assert body.id is None and "x-request-id" not in response.headers, "an invalid id is never echoed"


def test_the_openapi_document_declares_the_security_schemes_and_401(keyed: TestClient) -> None:
    doc = keyed.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["Bearer"] == {**schemes["Bearer"], "type": "http", "scheme": "bearer"}
    for path in [*SERVICE_ROUTES, UPLOAD]:
        operation = doc["paths"][path]["post"]
        assert operation["security"] == [{"ApiKey": []}, {"Bearer": []}], path
        assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
        # 202: the asynchronous answer (Prefer: respond-async / ?wait=false, api.async_requests)
        assert set(operation["responses"]) == {"200", "202", *(str(s) for s in STATUS_DESCRIPTIONS)}
        rid = next(p for p in operation["parameters"] if p["name"] == "x-request-id")
        assert {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9._:-]{1,128}$"} in rid[
            "schema"
        ]["anyOf"]
    assert "security" not in doc["paths"]["/health"]["get"]
    assert doc["paths"]["/requests/{request_id}"]["get"]["security"] == [{"ApiKey": []}, {"Bearer": []}]


def test_without_keys_the_openapi_document_declares_no_security() -> None:
    """A client generator or a fuzzer must not believe that a call without a key fails when none is needed."""
    client = _client(_settings())
    doc = client.get("/openapi.json").json()
    assert "securitySchemes" not in doc.get("components", {})
    operations = [op for item in doc["paths"].values() for op in item.values() if isinstance(op, dict)]
    assert len(operations) >= len(SERVICE_ROUTES) + 3
    assert [op.get("operationId") for op in operations if "security" in op] == []
    assert "security" not in doc


def test_docker_files_require_keys_for_the_exposed_edge() -> None:

    edge_env = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["edge"]["environment"]
    assert edge_env["AISEMBLE_EDGE_HOST"] == "0.0.0.0"
    assert edge_env["AISEMBLE_API_KEYS"].startswith("${AISEMBLE_API_KEYS:?"), "compose must refuse to run without keys"
    assert "AISEMBLE_ALLOW_INSECURE" not in edge_env
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert "ENV AISEMBLE_EDGE_HOST=0.0.0.0" in dockerfile and "AISEMBLE_API_KEYS" in dockerfile
    assert "ENV AISEMBLE_ALLOW_INSECURE" not in dockerfile


# --- the `aisemble edge` command: the loopback rule before anything binds --------------------------------

FAKE_UVICORN = """
import os, pathlib, sys
pathlib.Path(os.environ["FAKE_UVICORN_MARK"]).write_text("imported")

def run(app, host, port, **kw):
    pathlib.Path(os.environ["FAKE_UVICORN_MARK"]).write_text(f"run {host}:{port}")
"""


def _edge_command(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``aisemble edge`` with a stand-in uvicorn that records its import (and never binds)."""
    fake = tmp_path / "fake"
    (fake / "uvicorn").mkdir(parents=True, exist_ok=True)
    (fake / "uvicorn" / "__init__.py").write_text(FAKE_UVICORN)
    mark = tmp_path / "uvicorn.mark"
    mark.unlink(missing_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AISEMBLE_")}
    full_env = {
        **clean,
        "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)]),
        "FAKE_UVICORN_MARK": str(mark),
        "AISEMBLE_EDGE_PORT": str(free_port()),
        "AISEMBLE_KAFKA_BOOTSTRAP": "127.0.0.1:1",  # nothing is contacted: the app is built, not started
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-m", "aisemble", "edge"],
        env=full_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, mark


def test_edge_command_refuses_an_exposed_address_without_keys_before_binding(tmp_path: Path) -> None:
    result, mark = _edge_command(tmp_path, AISEMBLE_EDGE_HOST="0.0.0.0")
    print("EDGE-REFUSED:", json.dumps({"rc": result.returncode, "stderr": result.stderr.strip()[-300:]}))
    assert result.returncode == 2, result.stderr
    assert "refusing to serve the edge on '0.0.0.0' without API keys" in result.stderr
    assert "AISEMBLE_ALLOW_INSECURE" in result.stderr
    assert not mark.exists(), "uvicorn was imported: the check must come before it"


def test_edge_command_refuses_an_unusable_key(tmp_path: Path) -> None:
    result, mark = _edge_command(tmp_path, AISEMBLE_EDGE_HOST="0.0.0.0", AISEMBLE_API_KEYS='[""]')
    assert result.returncode == 2 and "AISEMBLE_API_KEYS[0] is empty" in result.stderr, result.stderr
    assert not mark.exists()


@pytest.mark.parametrize(
    "env",
    [
        {"AISEMBLE_EDGE_HOST": "0.0.0.0", "AISEMBLE_API_KEYS": json.dumps(KEYS)},
        {"AISEMBLE_EDGE_HOST": "0.0.0.0", "AISEMBLE_ALLOW_INSECURE": "true"},
        {"AISEMBLE_EDGE_HOST": "127.0.0.1"},
    ],
    ids=["keys", "allow-insecure", "loopback"],
)
def test_edge_command_starts_when_the_rule_allows(tmp_path: Path, env: dict[str, str]) -> None:
    # the control: the same command, allowed, reaches uvicorn.run (the stand-in, which binds nothing)
    result, mark = _edge_command(tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert mark.read_text().startswith(f"run {env['AISEMBLE_EDGE_HOST']}:")


def test_run_command_refuses_before_starting_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import infra
    from aisemble.cli import app
    from streams.settings import get_settings

    def must_not_start(*args: object, **kwargs: object) -> None:
        raise AssertionError("aisemble run started infrastructure before the loopback check")

    monkeypatch.setattr(infra, "start_local", must_not_start)
    for name in [k for k in os.environ if k.startswith("AISEMBLE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AISEMBLE_EDGE_HOST", "0.0.0.0")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["run", "--services", "data"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    assert "refusing to serve the edge on '0.0.0.0' without API keys" in result.output


# --- integration: a real edge and data agent with keys ---------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    logs = Path(tmp_path_factory.mktemp("auth-logs"))
    p = Pipeline.isolated(
        infra_settings,
        ["data"],
        logs,
        AISEMBLE_API_KEYS=json.dumps(["k1", "k2"]),
        AISEMBLE_REQUEST_TIMEOUT_S=str(KEYED_TIMEOUT_S),  # an nlp request (no agent here) stays pending that long
        AISEMBLE_ASYNC_DEADLINE_S=str(KEYED_TIMEOUT_S),  # and an asynchronous one too
        AISEMBLE_MAX_PENDING_ASYNC_PER_KEY=str(KEYED_MAX_PENDING),
    ).start()
    yield p
    p.stop()
    log_text = "".join(path.read_text(errors="replace") for path in logs.glob("*.log"))
    assert '"k1"' not in log_text and '"k2"' not in log_text


@pytest.mark.integration
def test_a_real_edge_answers_only_its_callers(pipeline: Pipeline) -> None:
    counts: dict[str, int] = {}
    with httpx.Client(base_url=pipeline.url, timeout=30) as http:
        health = http.get("/health")  # open for probes: the status, and nothing else without a key
        assert health.status_code == 200 and health.json() == {"status": "ok"}, health.text
        counts["health"] = health.status_code
        wrong_health = http.get("/health", headers={"X-API-Key": "k3"})
        assert wrong_health.status_code == 200 and wrong_health.json() == {"status": "ok"}, wrong_health.text
        detail = http.get("/health", headers={"X-API-Key": "k1"}).json()  # the detail behind the key
        assert detail["status"] == "ok" and detail["services"]["data"]["agents"][0]["pid"] > 0, detail
        assert {"edge", "kafka", "redis"} <= set(detail)

        no_key = http.post("/data/process", json=BRIEF)
        _error(no_key, 401, ErrorCode.UNAUTHORIZED)
        assert no_key.headers["www-authenticate"].startswith("Bearer")
        counts["no_key"] = no_key.status_code

        wrong = http.post("/data/process", json=BRIEF, headers={"X-API-Key": "k3"})
        _error(wrong, 401, ErrorCode.UNAUTHORIZED)
        counts["wrong_key"] = wrong.status_code

        ok = http.post("/data/process", json={**BRIEF, "cache": False}, headers={"Authorization": "Bearer k2"})
        assert ok.status_code == 200 and ok.json()["ok"], ok.text
        counts["bearer_k2"] = ok.status_code

        ok1 = http.post(
            "/data/process", json={**BRIEF, "cache": False}, headers={"X-API-Key": "k1", "X-Request-Id": "auth:ok-1"}
        )
        assert ok1.status_code == 200 and ok1.json()["id"] == "auth:ok-1", ok1.text
        counts["x_api_key_k1"] = ok1.status_code

        bad_id = http.post("/data/process", json=BRIEF, headers={"X-API-Key": "k1", "X-Request-Id": "bad id*"})
        body = _error(bad_id, 422, ErrorCode.INVALID_INPUT)
        assert "x-request-id" in body.error.message and body.id is None
        counts["bad_request_id"] = bad_id.status_code

        upload = http.post(
            UPLOAD, data={"task": "describe"}, files={"file": ("a.png", b"x")}, headers={"Authorization": "Bearer no"}
        )
        _error(upload, 401, ErrorCode.UNAUTHORIZED)
        counts["upload_wrong_key"] = upload.status_code
    print("AUTH-COUNTS:", json.dumps(counts))


def _poll(http: httpx.Client, rid: str, headers: dict[str, str], max_polls: int = 200) -> httpx.Response:
    for _ in range(max_polls):
        response = http.get(f"/requests/{rid}", headers=headers)
        if response.status_code != 202:
            return response
        time.sleep(0.1)
    raise AssertionError(f"{rid} still pending after {max_polls} polls")


def _produced(pipeline: Pipeline, service: str) -> int:
    """How many events the service's request topic holds (its end offsets, summed)."""
    topic = f"{pipeline.prefix}.{service}.requests"
    return asyncio.run(committed_and_end(pipeline.settings, "nobody", topic))[1]


@pytest.mark.integration
def test_an_async_result_belongs_to_the_key_that_submitted_it(pipeline: Pipeline) -> None:
    """Another key reads the 404 of an unknown id, and re-using the id is 409 that changes nothing (nothing
    produced, the owner's result and pending marker intact); the same key re-using it is 409 too."""
    k1, k2 = {"X-API-Key": "k1"}, {"Authorization": "Bearer k2"}
    rid, unknown_rid = f"own-{uuid.uuid4().hex}", f"own-{uuid.uuid4().hex}"
    payload = {**BRIEF, "cache": False}
    counts: dict[str, int] = {}
    with httpx.Client(base_url=pipeline.url, timeout=30) as http:
        first = http.post("/data/process", params={"wait": "false"}, json=payload, headers={**k1, "X-Request-Id": rid})
        assert first.status_code == 202, first.text
        early = http.get(f"/requests/{rid}", headers=k2)  # pending or done: never another key's
        done = _poll(http, rid, k1)
        assert done.status_code == 200 and done.json()["ok"] and done.json()["id"] == rid, done.text
        unknown = http.get(f"/requests/{unknown_rid}", headers=k2)
        foreign = http.get(f"/requests/{rid}", headers=k2)
        assert early.status_code == foreign.status_code == unknown.status_code == 404, foreign.text
        # the same body as an unknown id (but for the id itself): whose ids exist is not told
        assert foreign.json() == json.loads(unknown.text.replace(unknown_rid, rid))
        assert http.get(f"/requests/{rid}").status_code == 401

        before = _produced(pipeline, "data")
        other = http.post("/data/process", json=payload, headers={**k2, "X-Request-Id": rid, "Prefer": "respond-async"})
        same = http.post("/data/process", json=payload, headers={**k1, "X-Request-Id": rid, "Prefer": "respond-async"})
        assert other.status_code == same.status_code == 409, (other.text, same.text)
        assert other.json()["error"]["code"] == ErrorCode.INVALID_INPUT and "in use" in other.json()["error"]["message"]
        assert _produced(pipeline, "data") == before, "a refused id is never produced"
        kept = http.get(f"/requests/{rid}", headers=k1)
        assert kept.status_code == 200 and kept.json() == done.json(), "the owner's result is intact"
        counts["produced_by_409s"] = _produced(pipeline, "data") - before

        # a pending id (nlp: no agent runs here, so it stays pending until its deadline)
        pending_rid = f"own-{uuid.uuid4().hex}"
        nlp = {"task": "sentiment", "text": "pending"}
        asynchronous = {"X-Request-Id": pending_rid, "Prefer": "respond-async"}
        ok = http.post("/ai/nlp/process", json=nlp, headers={**k1, **asynchronous})
        assert ok.status_code == 202, ok.text
        nlp_before = _produced(pipeline, "nlp")
        taken = http.post("/ai/nlp/process", json=nlp, headers={**k2, **asynchronous})
        assert taken.status_code == 409, taken.text
        assert _produced(pipeline, "nlp") == nlp_before
        still = http.get(f"/requests/{pending_rid}", headers=k1)
        assert still.status_code == 202, still.text  # the owner's pending marker is intact
        assert http.get(f"/requests/{pending_rid}", headers=k2).status_code == 404

        # pending asynchronous requests are bounded per key: k1 is at its limit, k2 is not
        for _ in range(KEYED_MAX_PENDING - 1):
            assert http.post("/ai/nlp/process", json=nlp, headers={**k1, "Prefer": "respond-async"}).status_code == 202
        over = http.post("/ai/nlp/process", json=nlp, headers={**k1, "Prefer": "respond-async"})
        assert over.status_code == 429 and over.headers["retry-after"] == "1", over.text
        assert http.post("/ai/nlp/process", json=nlp, headers={**k2, "Prefer": "respond-async"}).status_code == 202
        timed_out = _poll(http, pending_rid, k1, max_polls=int(40 * KEYED_TIMEOUT_S))
        assert timed_out.status_code == 504 and timed_out.json()["error"]["code"] == ErrorCode.TIMEOUT
    print("OWNER-COUNTS:", json.dumps(counts))


def test_a_tiny_app_reuses_the_dependency(caplog: pytest.LogCaptureFixture) -> None:
    """A future route (e.g. /metrics) applies the same dependency through ``auth_dependencies``."""
    from fastapi import APIRouter

    from api.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)
    router = APIRouter()

    @router.get("/metrics")
    async def metrics() -> dict[str, int]:
        return {"up": 1}

    settings = _settings(api_keys=[SecretStr(KEYS[0])])
    app.include_router(router, dependencies=auth_dependencies(settings, route="metrics"))
    with TestClient(app) as client:
        _error(client.get("/metrics"), 401, ErrorCode.UNAUTHORIZED)
        assert client.get("/metrics", headers={"X-API-Key": KEYS[0]}).json() == {"up": 1}
