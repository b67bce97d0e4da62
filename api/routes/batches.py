"""OpenAI's Files and Batch API: ``/v1/files`` and ``/v1/batches``, so the official clients work unchanged.

* ``POST /v1/files`` (multipart: ``file``, ``purpose=batch``), ``GET /v1/files``, ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``;
* ``POST /v1/batches`` (``input_file_id``, ``endpoint``: ``/v1/chat/completions``, ``/v1/completions`` or
  ``/v1/embeddings``, ``completion_window``: ``24h``, optional ``metadata``), ``GET /v1/batches``,
  ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.

Limits, each a 4xx in OpenAI's error shape naming the field: a file past ``batch.max_file_bytes`` is 413
(the edge's body limit on this path is that plus the multipart envelope); more than ``batch.max_lines``
non-blank lines, another ``purpose``, a file that is not UTF-8, an unknown ``endpoint``, a
``completion_window`` other than ``24h``, an input file whose purpose is not ``batch``: 400. Unknown ids are
404. With API keys, files and batches belong to the key that made them (``api.auth.Caller.owner``): any
other key gets the same 404 as an unknown id, and a batch's endpoint must be a service the key may use
(``services``: 403). Input lines are validated when the batch runs (``api.batch_lines``): a bad line is an
error line, never a refused batch.

Storage and who runs a batch: ``api.batch_runner`` (everything in Kafka; any edge answers for any batch).
What can go wrong: Kafka away: 503 (nothing was stored, or the cancel was not recorded).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from aiokafka.errors import KafkaError
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import ORJSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from api.auth import request_caller
from api.batch_lines import ENDPOINTS, TERMINAL, batch_object, count_lines, file_object
from api.batch_runner import BatchStore
from api.errors import (
    EdgeError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
)
from api.openai import parse_body, validate
from schemas.batch import BatchState, StoredFile

router = APIRouter(tags=["batch"], include_in_schema=False)

WINDOW_S = 24 * 3600


def _store(request: Request) -> BatchStore:
    store = getattr(request.app.state, "batches", None)
    if not isinstance(store, BatchStore):
        raise UnavailableError("the Batch API is not ready")
    return store


def _bad(message: str, param: str) -> InvalidInputError:
    return InvalidInputError(message, param=param, openai_code="invalid_value", status=400)


def _unavailable(exc: BaseException) -> UnavailableError:
    return UnavailableError(f"Kafka did not take the write: {exc!r}")


def _owner(request: Request) -> str | None:
    return request_caller(request).owner


async def _file(request: Request, file_id: str) -> StoredFile:
    found = await _store(request).files.find(file_id)
    if found is None or found.owner != _owner(request):
        raise NotFoundError(f"No such File object: {file_id}", param="id")
    return found


async def _batch(request: Request, batch_id: str) -> BatchState:
    found = await _store(request).find(batch_id)
    if found is None or found.owner != _owner(request):
        raise NotFoundError(f"No such Batch object: {batch_id}", param="id")
    return found


def _page(data: list[dict[str, object]], limit: int, after: str | None) -> dict[str, object]:
    """OpenAI's cursor page: newest first, ``after`` an id of the previous page."""
    if after is not None:
        ids = [item["id"] for item in data]
        data = data[ids.index(after) + 1 :] if after in ids else []
    page = data[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(data) > limit,
    }


# --- files -----------------------------------------------------------------------------------------------------


@router.post("/v1/files")
async def upload_file(request: Request, file: UploadFile = File(), purpose: str = Form()) -> ORJSONResponse:
    """The body is read (within its limit, ``api.admission.body_limit``) and validated before this runs."""
    if purpose != "batch":
        raise _bad(f"Invalid value for 'purpose': {purpose!r}; this server takes 'batch' files only.", "purpose")
    content = await file.read()
    filename = file.filename or "upload.jsonl"
    store = _store(request)
    limit = store.settings.batch.max_file_bytes
    if len(content) > limit:
        raise PayloadTooLargeError(f"the file exceeds batch.max_file_bytes ({limit} bytes)", status=413)
    try:
        content.decode()
    except UnicodeDecodeError as exc:
        raise _bad(f"the file is not UTF-8 text (byte {exc.start})", "file") from exc
    lines = count_lines(content)
    if lines == 0 or lines > store.settings.batch.max_lines:
        raise _bad(f"a batch file holds 1 to {store.settings.batch.max_lines} requests; this one {lines}", "file")
    meta = StoredFile(id=f"file-{uuid.uuid4().hex}", bytes=0, created_at=int(time.time()), filename=filename,
                      purpose="batch", chunks=0, owner=_owner(request))  # fmt: skip
    try:
        meta = await store.files.put(meta, content)
    except (KafkaError, TimeoutError) as exc:
        raise _unavailable(exc) from exc
    return ORJSONResponse(file_object(meta))


@router.get("/v1/files")
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
) -> ORJSONResponse:
    owner = _owner(request)
    files = [f for f in _store(request).files.all() if f.owner == owner and purpose in (None, f.purpose)]
    files.sort(key=lambda f: (f.created_at, f.id), reverse=True)
    return ORJSONResponse(_page([file_object(f) for f in files], limit, after))


@router.get("/v1/files/{file_id}")
async def get_file(request: Request, file_id: str) -> ORJSONResponse:
    return ORJSONResponse(file_object(await _file(request, file_id)))


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> Response:
    meta = await _file(request, file_id)
    try:
        content = await _store(request).files.content(meta)
    except FileNotFoundError as exc:
        raise NotFoundError(str(exc), param="id") from exc
    except (KafkaError, TimeoutError) as exc:
        raise UnavailableError(f"could not read the file from Kafka: {exc!r}") from exc
    return Response(content, media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> ORJSONResponse:
    meta = await _file(request, file_id)
    try:
        await _store(request).files.delete(meta)
    except (KafkaError, TimeoutError) as exc:
        raise _unavailable(exc) from exc
    return ORJSONResponse({"id": file_id, "object": "file", "deleted": True})


# --- batches ---------------------------------------------------------------------------------------------------


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input_file_id: StrictStr = Field(min_length=1, max_length=256)
    endpoint: StrictStr
    completion_window: StrictStr
    metadata: dict[StrictStr, Annotated[str, Field(max_length=512)]] | None = Field(default=None, max_length=16)


@router.post("/v1/batches")
async def create_batch(request: Request) -> ORJSONResponse:
    body = validate(CreateBatch, parse_body(await request.body()))
    store = _store(request)
    if body.endpoint not in ENDPOINTS:
        raise _bad(f"Invalid value for 'endpoint': {body.endpoint!r}; one of {', '.join(ENDPOINTS)}.", "endpoint")
    if body.completion_window != "24h":
        raise _bad(f"Invalid value for 'completion_window': {body.completion_window!r}; only '24h'.",
                   "completion_window")  # fmt: skip
    service = ENDPOINTS[body.endpoint][0]
    key = request_caller(request).key
    if key is not None and not key.allows(service):
        raise ForbiddenError(f"the API key {key.name!r} may not use the service {service!r}", service=service)
    stored = await _file(request, body.input_file_id)
    if stored.purpose != "batch":
        raise _bad(f"file {stored.id} has purpose {stored.purpose!r}, not 'batch'", "input_file_id")
    now = int(time.time())
    state = BatchState(id=f"batch_{uuid.uuid4().hex}", owner=_owner(request), endpoint=body.endpoint,
                       input_file_id=stored.id, completion_window="24h", created_at=now, expires_at=now + WINDOW_S,
                       metadata=body.metadata)  # fmt: skip
    try:
        await store.create(state)
    except (KafkaError, TimeoutError) as exc:
        raise _unavailable(exc) from exc
    return ORJSONResponse(batch_object(state))


@router.get("/v1/batches")
async def list_batches(
    request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None
) -> ORJSONResponse:
    store, owner = _store(request), _owner(request)
    states = sorted((s for s in store.all() if s.owner == owner), key=lambda s: (s.created_at, s.id), reverse=True)
    return ORJSONResponse(_page([batch_object(s, store.cancel_of(s.id)) for s in states], limit, after))


@router.get("/v1/batches/{batch_id}")
async def get_batch(request: Request, batch_id: str) -> ORJSONResponse:
    state = await _batch(request, batch_id)
    return ORJSONResponse(batch_object(state, _store(request).cancel_of(batch_id)))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> ORJSONResponse:
    await request.body()  # no body is expected; one past the body limit is 413 like on every POST route
    store = _store(request)
    state = await _batch(request, batch_id)
    if state.status in TERMINAL or state.status == "finalizing":
        raise EdgeError(f"Cannot cancel a batch with status {state.status!r}.", status=409,
                        code="invalid_input", openai_code="invalid_state")  # fmt: skip
    if store.cancel_of(batch_id) is None:
        try:
            await store.cancel(batch_id)
        except (KafkaError, TimeoutError) as exc:
            raise _unavailable(exc) from exc
    return ORJSONResponse(batch_object(state, store.cancel_of(batch_id)))
