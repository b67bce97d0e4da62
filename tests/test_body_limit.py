"""Every POST route of the edge answers 413 for a body past its limit, in its own error shape.

The routes are enumerated from the app itself, so a route added later is covered without touching this file.
Each gets a body three times its limit, streamed in chunks without ``Content-Length`` (chunked transfer), and
the same body with a ``Content-Length``; both must be 413 ``payload_too_large``: an ``ErrorBody`` on the native
routes, OpenAI's error shape under ``/v1``. A small body must not be 413 (the limit refuses only what is
over it). Run twice: through httpx's in-process ASGI transport, and through a real uvicorn server on
127.0.0.1 (h11 decoding the chunked body).

No Kafka, no Redis: the app is built by ``api.app.create_app`` without its lifespan; its ``Edge`` has a
producer that fails the test if it is ever called (a refused body must never reach Kafka).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from aiokafka.errors import KafkaConnectionError
from fastapi import FastAPI, params
from fastapi.routing import APIRoute, iter_route_contexts

from api.admission import MULTIPART_MARGIN
from api.app import create_app
from api.edge import Edge
from schemas import ErrorCode
from streams.replies import ReplyRouter
from streams.settings import BatchSettings, Settings, VisionSettings
from tests.served import served

LIMIT = 4096
VISION_LIMIT = 8192
FILES_LIMIT = 2048 + MULTIPART_MARGIN  # POST /v1/files: batch.max_file_bytes + the multipart envelope
CHUNK = 1000
BOUNDARY = "aisemble-test-boundary"
KNOWN_POST_ROUTES = {  # the enumeration must at least find these (an empty one would test nothing)
    "/data/process",
    "/ai/nlp/process",
    "/ai/llm/completion",
    "/ai/vision/analyze",
    "/ai/vision/analyze/upload",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
}


class _Producer:
    """Notes what the edge tries to produce and refuses it (the edge answers 503): a refused body must never
    get this far."""

    client = None

    def __init__(self) -> None:
        self.topics: list[str] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self.topics.append(topic)
        raise KafkaConnectionError("no Kafka in this test")


def _app() -> FastAPI:
    settings = Settings(
        max_body_bytes=LIMIT,
        vision=VisionSettings(max_upload_bytes=VISION_LIMIT),
        batch=BatchSettings(max_file_bytes=2048),
    )
    app = create_app(settings)
    # No lifespan: an Edge without Kafka or Redis (no models known, so no cache key: Redis is never used).
    app.state.edge = Edge(settings, _Producer(), None, ReplyRouter(), None, "t.edge.x.replies")  # type: ignore[arg-type]
    return app


def _produced(app: FastAPI) -> list[str]:
    topics: list[str] = app.state.edge.producer.topics
    return topics


@dataclass(frozen=True)
class _Post:
    path: str  # as the app serves it (prefixes included)
    route: APIRoute


def _post_routes(app: FastAPI) -> list[_Post]:
    """Every POST route of ``app``, routers included (FastAPI includes them lazily: ``app.routes`` holds the
    included routers, ``iter_route_contexts`` their effective routes)."""
    return [
        _Post(str(ctx.path), ctx.original_route)
        for ctx in iter_route_contexts(app.routes)
        if isinstance(ctx.original_route, APIRoute) and "POST" in (ctx.methods or ())
    ]


def _limit(path: str) -> int:
    return VISION_LIMIT if path.startswith("/ai/vision") else FILES_LIMIT if path == "/v1/files" else LIMIT


def _is_form(post: _Post) -> bool:
    return any(isinstance(p.field_info, (params.Form, params.File)) for p in post.route.dependant.body_params)


def _body(post: _Post, size: int) -> tuple[bytes, str]:
    """A body of about ``size`` bytes the route would otherwise parse: JSON, or a multipart upload."""
    if _is_form(post):
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="task"\r\n\r\ndescribe\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{BOUNDARY}--\r\n".encode()
        return head + b"x" * max(size - len(head) - len(tail), 0) + tail, f"multipart/form-data; boundary={BOUNDARY}"
    return b'{"padding": "' + b"x" * max(size - 16, 0) + b'"}', "application/json"


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]


def _assert_413(path: str, response: httpx.Response, limit: int) -> None:
    assert response.status_code == 413, f"{path}: {response.status_code} {response.text[:300]}"
    body = response.json()
    if path.startswith("/v1/"):  # OpenAI's shape, so the openai client can read it
        assert set(body) == {"error"}, body
        assert body["error"]["code"] == ErrorCode.PAYLOAD_TOO_LARGE and body["error"]["type"] == "invalid_request_error"
        message = body["error"]["message"]
    else:  # ErrorBody, the reply-event shape
        assert body["ok"] is False and body["output"] is None, body
        assert body["error"]["code"] == ErrorCode.PAYLOAD_TOO_LARGE
        message = body["error"]["message"]
    assert f"limit of {limit} bytes" in message, message


@contextlib.asynccontextmanager
async def _client(app: FastAPI, transport: str) -> AsyncIterator[httpx.AsyncClient]:
    if transport == "asgi":
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client:
            yield client
        return
    async with served(app) as client:
        yield client


@pytest.fixture(scope="module")
def app() -> Iterator[FastAPI]:
    yield _app()


def test_the_enumeration_finds_every_service_route(app: FastAPI) -> None:
    paths = {r.path for r in _post_routes(app)}
    assert paths >= KNOWN_POST_ROUTES, KNOWN_POST_ROUTES - paths


@pytest.mark.parametrize("transport", ["asgi", "uvicorn"])
async def test_every_post_route_answers_413_to_a_chunked_body_past_its_limit(app: FastAPI, transport: str) -> None:
    async with _client(app, transport) as client:
        for post in _post_routes(app):
            limit = _limit(post.path)
            data, content_type = _body(post, 3 * limit)
            response = await client.post(post.path, content=_chunks(data), headers={"Content-Type": content_type})
            assert "content-length" not in response.request.headers  # really chunked
            _assert_413(post.path, response, limit)
    assert _produced(app) == []


@pytest.mark.parametrize("transport", ["asgi", "uvicorn"])
async def test_every_post_route_answers_413_to_a_declared_length_past_its_limit(app: FastAPI, transport: str) -> None:
    async with _client(app, transport) as client:
        for post in _post_routes(app):
            limit = _limit(post.path)
            data, content_type = _body(post, 3 * limit)
            response = await client.post(post.path, content=data, headers={"Content-Type": content_type})
            _assert_413(post.path, response, limit)
            assert f"{len(data)} bytes" in response.text  # the declared size is named
    assert _produced(app) == []


async def test_a_body_within_the_limit_is_not_refused(app: FastAPI) -> None:
    """The same routes, a chunked body under the limit: parsed and refused for what it says (4xx), not its size.
    A route that takes no body (the batch cancel: it only reads one to apply the limit) has nothing to refuse."""
    async with _client(app, "asgi") as client:
        for post in _post_routes(app):
            if post.path == "/v1/batches/{batch_id}/cancel":
                continue
            data, content_type = (b"{}", "application/json") if not _is_form(post) else _body(post, 200)
            response = await client.post(post.path, content=_chunks(data), headers={"Content-Type": content_type})
            assert response.status_code in (400, 422), f"{post.path}: {response.status_code} {response.text[:300]}"


async def test_the_vision_routes_take_a_body_past_the_general_limit(app: FastAPI) -> None:
    """A vision upload between the general limit and the vision limit is parsed and sent on (its own limit
    applies): the edge gets as far as producing it (503 here: the test's producer refuses)."""
    post = next(p for p in _post_routes(app) if p.path == "/ai/vision/analyze/upload")
    data, content_type = _body(post, (LIMIT + VISION_LIMIT) // 2)
    before = len(_produced(app))
    async with _client(app, "asgi") as client:
        response = await client.post(post.path, content=_chunks(data), headers={"Content-Type": content_type})
    assert response.status_code == 503, response.text[:300]
    assert _produced(app)[before:] == ["aisemble.vision.requests"]
