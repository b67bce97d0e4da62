"""``POST /ai/vision/analyze`` (JSON, base64 image) and ``/ai/vision/analyze/upload`` (multipart).

Images above ``vision.inline_max_bytes`` travel by claim check (see ``streams.claimcheck``). When the claim
check cannot be written (Redis down, hanging, or its breaker open), the image travels inline if its base64
form still fits one event (``max_event_bytes`` less ``ENVELOPE_ROOM``); otherwise the answer is 503
``unavailable`` naming Redis and the claim check, never a raw 500.

Admission comes before any of this work: API keys (``api.auth.ApiKeyGate``), the in-flight limit and the
in-flight bytes (``api.admission.AdmissionGate``) are decided on the headers, before the body is read, and
a caller at its pending asynchronous limit is refused by ``api.serving`` before the route runs; a refused
upload is never decoded and never parks a claim check in Redis. A request refused after its claim check
was written (409 for an id in use, 429, 503) deletes that claim check at once rather than leaving it to its
TTL; only a 504 (the request reached Kafka, an agent may still read it) leaves it to the agent. A 503 whose
produce timed out may still reach an agent later, which then answers ``claim_check_missing`` to nobody: the
caller already has its 503 ("maybe not processed").
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, UploadFile
from redis.exceptions import RedisError
from starlette.responses import Response

from api.async_requests import ASYNC_RESPONSES
from api.errors import (
    SERVICE_RESPONSES,
    EdgeError,
    InvalidInputError,
    PayloadTooLargeError,
    ReplyTimeoutError,
    UnavailableError,
)
from api.serving import RequestServing, serving
from schemas.vision import VisionRequest, VisionTask
from streams.claimcheck import put_claim, release_claims

log = logging.getLogger(__name__)
router = APIRouter(tags=["vision"])

ENVELOPE_ROOM = 16 * 1024  # bytes of an event besides the image: id, task, params, reply_to, deadline


def _b64_len(n: int) -> int:
    return 4 * ((n + 2) // 3)


async def _analyze(
    serve: RequestServing, task: str, image: bytes, params: dict[str, object], cache: bool | None
) -> Response:
    edge, rid = serve.edge, serve.request_id
    settings = edge.settings.vision
    if not image:
        raise InvalidInputError("image is empty", service="vision", task=task)
    if len(image) > settings.max_upload_bytes:
        raise PayloadTooLargeError(
            f"image of {len(image)} bytes exceeds the limit of {settings.max_upload_bytes}",
            service="vision",
            task=task,
        )
    payload = {k: v for k, v in params.items() if v is not None}
    ref: str | None = None
    if len(image) > settings.inline_max_bytes:
        try:
            ref = await put_claim(edge.redis, edge.settings.topic_prefix, image, settings.claim_ttl_s)
        except RedisError as exc:
            room = edge.settings.max_event_bytes - ENVELOPE_ROOM
            if _b64_len(len(image)) > room:
                raise UnavailableError(
                    f"Redis is unavailable, so the claim check for this {len(image)}-byte image could not be "
                    f"stored, and the image is too large to send inline (limit {room * 3 // 4} bytes): {exc}",
                    request_id=rid,
                    service="vision",
                    task=task,
                ) from exc
    if ref is not None:
        payload["image_ref"] = ref
        cache = False  # a claim key is unique per upload: caching it could never hit
    else:
        payload["image_b64"] = base64.b64encode(image).decode("ascii")
    try:
        return await serve("vision", task, payload, cache=cache)
    except EdgeError as exc:
        if ref is not None and not isinstance(exc, ReplyTimeoutError):  # refused before the produce: ours to free
            await _release(serve, ref)
        raise


async def _release(serve: RequestServing, ref: str) -> None:
    """Best effort: delete the claim check of a refused request (its TTL bounds a failure)."""
    edge = serve.edge
    try:
        await release_claims(edge.redis, edge.settings.topic_prefix, [ref])
    except RedisError as exc:
        log.warning("could not release the claim check of refused request %s: %s", serve.request_id, exc)


@router.post("/ai/vision/analyze", responses=SERVICE_RESPONSES | ASYNC_RESPONSES)
async def analyze(body: VisionRequest, serve: RequestServing = Depends(serving)) -> Response:
    """Analyse a base64-encoded image; the body of a 200 is the reply event."""
    try:
        image = base64.b64decode(body.image_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(f"image_b64: not valid base64 ({exc})", service="vision", task=body.task) from exc
    params = body.model_dump(exclude={"task", "image_b64", "cache"})
    return await _analyze(serve, body.task, image, params, body.cache)


@router.post("/ai/vision/analyze/upload", responses=SERVICE_RESPONSES | ASYNC_RESPONSES)
async def analyze_upload(
    task: VisionTask = Form(...),
    file: UploadFile = File(...),
    max_size: int = Form(1024, ge=8, le=8192),
    # A form field cannot be null, only absent (None here): typed without "| None" so that the OpenAPI
    # document does not offer null, which a multipart client could only send as the text "null".
    width: int = Form(None, ge=1, le=8192),
    height: int = Form(None, ge=1, le=8192),
    format: Literal["png", "jpeg", "webp"] = Form("png"),
    top_k: int = Form(5, ge=1, le=100),
    min_face_size: int = Form(30, ge=8, le=4096),
    cache: bool = Form(None),
    serve: RequestServing = Depends(serving),
) -> Response:
    """Analyse an uploaded image file (multipart/form-data)."""
    image = await file.read()
    params: dict[str, object] = {
        "max_size": max_size,
        "width": width,
        "height": height,
        "format": format,
        "top_k": top_k,
        "min_face_size": min_face_size,
    }
    return await _analyze(serve, task, image, params, cache)
