"""The edge's one error tree (``api.errors``): one class per condition, one mapping, two renderings.

Pure units, no Kafka or Redis: the tree's shape, the two renderings of each error, and the app's handlers
choosing OpenAI's shape under ``/v1`` and ``ErrorBody`` elsewhere (``api.app.create_app`` without its lifespan,
through httpx's ASGI transport).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import httpx
import pytest
from fastapi import FastAPI

import api
import api.errors as errors
from api.app import create_app
from api.edge import Edge
from schemas import ErrorCode, ReplyEvent
from schemas.http import ErrorBody
from streams.replies import ReplyRouter
from streams.settings import Settings

# Exceptions of api/ that are not HTTP answers: refusals to start (a bad key list, an exposed bind).
STARTUP_ERRORS = {"InvalidApiKeysError", "InsecureBindError"}


def _api_modules() -> list[str]:
    names = [f"api.{m.name}" for m in pkgutil.iter_modules(api.__path__)]
    names += [f"api.routes.{m.name}" for m in pkgutil.iter_modules(importlib.import_module("api.routes").__path__)]
    return names


def _tree() -> list[type[errors.EdgeError]]:
    out: list[type[errors.EdgeError]] = []
    todo = [errors.EdgeError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def test_every_edge_exception_is_in_the_one_tree() -> None:
    """No parallel hierarchy (an OpenAIError beside EdgeError) and no stray duplicate (a BodyTooLargeError)."""
    for name in _api_modules():
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name or not issubclass(cls, BaseException) or cls_name in STARTUP_ERRORS:
                continue
            assert issubclass(cls, errors.EdgeError) and name == "api.errors", f"{name}.{cls_name} outside the tree"


def test_one_class_per_condition_and_the_tree_is_drawn() -> None:
    conditions = [(cls.status, cls.code, cls.openai_code) for cls in _tree()]
    assert len(conditions) == len(set(conditions)), conditions
    drawn = errors.__doc__ or ""
    for cls in _tree():
        assert f"{cls.__name__}" in drawn and f"{cls.status} {cls.code}" in drawn, cls.__name__


@pytest.mark.parametrize(
    ("error", "status", "openai_status", "openai_type", "openai_code"),
    [
        (errors.InvalidJsonError("x"), 400, 400, "invalid_request_error", "invalid_json"),
        (
            errors.InvalidInputError("x", param="n", openai_code="invalid_value"),
            422,
            400,
            "invalid_request_error",
            "invalid_value",
        ),
        (errors.UnauthorizedError("x"), 401, 401, "invalid_request_error", "invalid_api_key"),
        (errors.ModelNotFoundError("x", param="model"), 404, 404, "invalid_request_error", "model_not_found"),
        (errors.DuplicateIdError("x"), 409, 409, "invalid_request_error", ErrorCode.INVALID_INPUT),
        (errors.PayloadTooLargeError("x"), 413, 413, "invalid_request_error", ErrorCode.PAYLOAD_TOO_LARGE),
        (errors.OverloadedError("x", retry_after_s=2), 429, 429, "rate_limit_error", "rate_limit_exceeded"),
        (errors.UnavailableError("x"), 503, 503, "server_error", ErrorCode.UNAVAILABLE),
        (errors.ReplyTimeoutError("x"), 504, 504, "server_error", ErrorCode.TIMEOUT),
        (errors.EdgeError("x"), 500, 500, "server_error", ErrorCode.INTERNAL),
    ],
)
def test_each_error_has_one_status_and_two_renderings(
    error: errors.EdgeError, status: int, openai_status: int, openai_type: str, openai_code: str
) -> None:
    error.request_id = "rid-1"
    native = errors.error_response(error)
    assert native.status_code == status and native.headers["x-request-id"] == "rid-1"
    body = ErrorBody.model_validate_json(bytes(native.body))
    assert body.error.code == error.code and body.id == "rid-1" and body.ok is False
    openai = errors.error_response(error, openai=True)
    assert openai.status_code == openai_status and openai.headers["x-request-id"] == "rid-1"
    assert errors.openai_body(error) == {
        "error": {"message": "x", "type": openai_type, "param": error.param, "code": openai_code}
    }
    if status == 429:
        assert native.headers["retry-after"] == openai.headers["retry-after"] == "2"


def test_an_agents_error_reply_maps_through_the_one_table() -> None:
    reply = ReplyEvent.model_validate(
        {"id": "r", "service": "vision", "task": "describe", "ok": False,
         "error": {"code": ErrorCode.CLAIM_CHECK_MISSING, "message": "gone"}}
    )  # fmt: skip
    error = errors.reply_error(reply)
    assert (error.status, error.code, error.message) == (422, ErrorCode.CLAIM_CHECK_MISSING, "gone")
    assert errors.error_response(error, openai=True).status_code == 400
    assert errors.reply_response(reply).status_code == errors.STATUS_BY_CODE[ErrorCode.CLAIM_CHECK_MISSING] == 422


@pytest.fixture(scope="module")
def app() -> FastAPI:
    settings = Settings()
    app = create_app(settings)
    app.state.edge = Edge(settings, None, None, ReplyRouter(), None, "t.edge.x.replies")  # type: ignore[arg-type]

    @app.post("/v1/boom")  # a bug in an OpenAI-compatible route
    async def _v1_boom() -> None:
        raise RuntimeError("boom")

    return app


async def test_the_handlers_render_by_path(app: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://edge") as client:  # fmt: skip
        native_404 = await client.get("/nowhere")
        openai_404 = await client.get("/v1/nowhere")
        openai_405 = await client.get("/v1/chat/completions")
        openai_bad_id = await client.post("/v1/embeddings", json={}, headers={"X-Request-Id": "bad id!"})
        openai_bad_json = await client.post(
            "/v1/embeddings", content=b"{", headers={"Content-Type": "application/json"}
        )
        openai_unknown_field = await client.post("/v1/embeddings", json={"model": "nlp", "input": "x", "dims": 3})
        openai_model = await client.post("/v1/embeddings", json={"model": "gpt-4o", "input": "x"})
        openai_500 = await client.post("/v1/boom")
    assert native_404.status_code == 404 and native_404.json()["error"]["code"] == ErrorCode.NOT_FOUND
    for response, status, code in [
        (openai_404, 404, ErrorCode.NOT_FOUND),
        (openai_405, 405, ErrorCode.METHOD_NOT_ALLOWED),
        (openai_bad_id, 400, ErrorCode.INVALID_INPUT),
        (openai_bad_json, 400, ErrorCode.INVALID_JSON),
        (openai_unknown_field, 400, "unsupported_parameter"),
        (openai_model, 404, "model_not_found"),
        (openai_500, 500, ErrorCode.INTERNAL),
    ]:
        assert response.status_code == status and set(response.json()) == {"error"}, response.text
        assert response.json()["error"]["code"] == code, response.text
    assert openai_bad_id.json()["error"]["param"] == "header.x-request-id"
    assert openai_unknown_field.json()["error"]["param"] == "dims"
    assert openai_500.json()["error"]["type"] == "server_error"
