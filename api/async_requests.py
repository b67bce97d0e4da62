"""Asynchronous requests: ``Prefer: respond-async`` (RFC 7240) or ``?wait=false`` on any service route.

``api.serving.RequestServing`` (what every service route calls) serves a request through ``submit`` when
the caller asked for it: ``202 Accepted``, ``Location: /requests/{id}``, ``Preference-Applied:
respond-async`` and the body ``{"id", "status": "pending", "location"}``. ``GET /requests/{id}``
(``api.routes.requests``) then answers 202 (``Retry-After``) while the request is pending, and once it is
done exactly what the synchronous call would have answered: 200 with the reply, or the error reply with its
status (422, 504, ...). Unknown or expired ids are 404. Ids are request ids: the caller's ``X-Request-Id``
when it sent one.

Guarantees, in the order a submission runs:

1. at most ``max_pending_async_per_key`` asynchronous requests of one caller are pending at this edge (one
   API key; without keys, all callers share one count): past it the answer is 429 with ``Retry-After``, at
   once, before anything is read from or written to Redis (``api.serving`` checks it before the route
   does any work, ``submit`` takes the slot). The slot is held until this edge's background task for the
   request ends (its reply, or its deadline), never an in-flight slot: once Kafka has the request, the
   HTTP exchange is over and ``max_in_flight`` counts it no more.
2. the pending marker ``{prefix}:pending:{id}`` (service, task, deadline, renderer, owner) is written
   before anything is produced, with a bounded TTL (``async_deadline_s + async_result_ttl_s``); Redis down
   or hanging is 503 ``unavailable`` (a result could not be kept), never a 202. **An id in use is 409 and
   changes nothing**: while its marker or its result is kept, submitting the id again, with any key or the
   same one, is refused before anything is produced; the pending request and its result stay intact. A
   caller who wants a request run again uses a new id (an id names one request for as long as its answer
   is kept: ``async_result_ttl_s``, or the marker's TTL for a request that timed out).
3. the request is produced (``Edge.call`` in a background task, ``Edge.spawn``) with
   ``store_result_s = async_result_ttl_s``; the 202 is sent only once Kafka has taken it. Refusals before
   that (429, 503, 409 from this edge's router) are answered as such and the marker is removed.
4. the reply is kept under ``{prefix}:result:{id}`` for ``async_result_ttl_s`` (``streams.results``) by
   two paths: the agent, after settling it, which covers an edge that is gone or restarted when the reply
   comes (nobody reads its reply topic then); and this edge, when its listener hands it the reply, which
   covers a Redis blip on the agent side. A cache hit at the edge is kept at once (503 if it cannot be).
   An ok result is never replaced by a later error reply (a redelivered duplicate past its deadline).

**Results belong to their caller.** With API keys configured the marker carries the owner id of the key
that submitted the request (``api.auth.Caller.owner``: a digest, never the key), and ``GET
/requests/{id}`` answers only that key: any other key gets the same 404 as an unknown id, pending or done.
A result whose marker is gone (expired, or kept by an edge without keys) is then answered to nobody.
Without keys every caller is anonymous and any caller may read any id, as the ids are the only secret.
The 409 of a used id does tell another key that the id exists; ids the caller chooses (``X-Request-Id``)
should be unguessable when that matters (the edge's own are random UUIDs).

An asynchronous request has its own, longer deadline (``async_deadline_s``, minutes: nobody holds a
connection open for it), both at the agent and for ``GET``'s 504.

What can go wrong: when both paths fail to keep the reply, or no agent answers, ``GET`` answers 202 until
the deadline (plus ``DEADLINE_GRACE_S`` for a reply in flight) and then the synchronous call's 504
``timeout``; a reply kept later (an agent back after an outage answers ``deadline_exceeded``) replaces it.
At-least-once delivery may run a request twice; both replies are kept under one key, the last wins unless
it is an error reply over an ok one.

Other response shapes (the OpenAI routes): ``register_renderer(name, render)`` once, then ``serve(...,
render=name, context={...})`` (or ``submit``); the marker keeps the renderer's name and the JSON ``context``
(e.g. the requested model name and ``created``), so ``GET`` renders the kept ``ReplyEvent`` as the
synchronous call would have (``render(reply, context)``). The marker lives at least as long as its result
(``streams.results`` stretches its TTL); a result found without it (Redis lost the key) is answered in the
native shape, and only to an anonymous caller.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Literal

import orjson
from fastapi.responses import ORJSONResponse
from pydantic import BaseModel, Field, ValidationError
from redis.exceptions import RedisError
from starlette.responses import Response

from api.edge import Edge
from api.errors import DuplicateIdError, EdgeError, NotFoundError, OverloadedError, UnavailableError, reply_response
from schemas import ErrorCode, ErrorInfo, ReplyEvent, Service
from streams.redis import guarded
from streams.results import decode_result, pending_key, result_key, store_replies

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # the Retry-After of a pending request's 202
DEADLINE_GRACE_S = 1.0  # after the deadline, how long a reply in flight may still land before GET says 504
DEFAULT_RENDER = "reply"

Render = Callable[[ReplyEvent, Mapping[str, object]], Response]


def _native(reply: ReplyEvent, context: Mapping[str, object]) -> Response:
    return reply_response(reply)


RENDERERS: dict[str, Render] = {DEFAULT_RENDER: _native}

# Set the marker unless the id is in use (a marker or a result is kept): 1 = set, 0 = in use (nothing changed).
# KEYS: marker, result. ARGV: marker JSON, TTL s.
_MARK_PENDING = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return 1
"""


def register_renderer(name: str, render: Render) -> None:
    """Let ``serve(..., render=name)`` and ``GET /requests/{id}`` answer a reply as ``render`` shapes it."""
    RENDERERS[name] = render


class AsyncAccepted(BaseModel):
    """The body of a 202: the request was produced; poll ``location`` for its result."""

    id: str = Field(description="The request id (X-Request-Id, or the edge's own).")
    status: Literal["pending"]
    location: str = Field(description="Where the result will be: /requests/{id}.")


class Pending(BaseModel):
    """The pending marker of one asynchronous request (JSON in Redis)."""

    service: Service
    task: str
    deadline_ms: int
    render: str = DEFAULT_RENDER
    context: dict[str, object] = Field(default_factory=dict)
    owner: str | None = None  # the submitting key's owner id (api.auth.Caller.owner); None without keys


ACCEPTED_HEADERS = {
    "Location": {"description": "Where the result will be: /requests/{id}.", "schema": {"type": "string"}},
    "Retry-After": {"description": "Seconds to wait before asking again.", "schema": {"type": "integer"}},
    "X-Request-Id": {"description": "The request id.", "schema": {"type": "string"}},
}
# The ``responses=`` every service route adds to its own: the 202 of an asynchronous request.
ASYNC_RESPONSES: dict[int | str, dict[str, object]] = {
    202: {
        "model": AsyncAccepted,
        "description": "Prefer: respond-async or ?wait=false: the request was produced; GET Location for the "
        "result (Preference-Applied: respond-async).",
        "headers": {
            **{k: v for k, v in ACCEPTED_HEADERS.items() if k != "Retry-After"},
            "Preference-Applied": {"description": "respond-async", "schema": {"type": "string"}},
        },
    }
}


def location(rid: str) -> str:
    return f"/requests/{rid}"


def accepted(rid: str) -> ORJSONResponse:
    """The 202 of an asynchronous request (also of one still pending, with ``Retry-After``)."""
    body = AsyncAccepted(id=rid, status="pending", location=location(rid))
    return ORJSONResponse(
        body.model_dump(mode="json"),
        status_code=202,
        headers={"Location": location(rid), "X-Request-Id": rid},
    )


async def submit(
    edge: Edge,
    service: Service,
    task: str,
    payload: dict[str, object],
    *,
    cache: bool | None = None,
    request_id: str | None = None,
    render: str = DEFAULT_RENDER,
    context: Mapping[str, object] | None = None,
    owner: str | None = None,
) -> ORJSONResponse:
    """Produce one request and answer 202 once Kafka has it (see the module docstring); ``owner`` is the
    caller's owner id (``api.auth.Caller.owner``), kept with the marker.

    Raises:
        OverloadedError: ``owner`` has ``max_pending_async_per_key`` requests pending already (429).
        UnavailableError: Redis could not keep the marker or a cache hit (503), or Kafka is down (503).
        DuplicateIdError: the id is in use (409).
    """
    if render not in RENDERERS:
        raise ValueError(f"unknown renderer {render!r}")
    rid = request_id or uuid.uuid4().hex
    settings = edge.settings
    ttl_s = settings.async_result_ttl_s
    if not edge.pending_async.try_acquire(owner):
        raise too_many_pending(edge, rid, service, task)
    try:
        marker = Pending(
            service=service,
            task=task,
            deadline_ms=int((time.time() + settings.async_deadline_s) * 1000),
            render=render,
            context=dict(context or {}),
            owner=owner,
        )
        await _mark_pending(edge, rid, marker, ttl_s + int(settings.async_deadline_s) + 1)
    except BaseException:
        edge.pending_async.release(owner)
        raise
    admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def produced() -> None:
        if not admitted.done():
            admitted.set_result(None)

    work = _run(edge, service, task, payload, cache, rid, ttl_s, admitted, produced)
    # the task gives the pending slot back when it ends, however it ends (even cancelled before it started)
    edge.spawn(work, name=f"async-{rid}").add_done_callback(lambda _: edge.pending_async.release(owner))
    try:
        await admitted
    except Exception:  # not produced: the id is not pending (a cancelled caller leaves the request running)
        await _forget_marker(edge, rid)
        raise
    return _with_preference(accepted(rid))


def too_many_pending(edge: Edge, rid: str | None, service: str, task: str) -> OverloadedError:
    """The 429 of a caller at its ``max_pending_async_per_key``."""
    limit = edge.pending_async.limit
    return OverloadedError(
        f"this caller has {limit} asynchronous requests pending at this edge already (the limit); "
        f"retry after {RETRY_AFTER_S} s",
        request_id=rid,
        service=service,
        task=task,
        retry_after_s=RETRY_AFTER_S,
    )


def _with_preference(response: ORJSONResponse) -> ORJSONResponse:
    response.headers["Preference-Applied"] = "respond-async"
    return response


async def _run(
    edge: Edge,
    service: Service,
    task: str,
    payload: dict[str, object],
    cache: bool | None,
    rid: str,
    ttl_s: int,
    admitted: asyncio.Future[None],
    produced: Callable[[], None],
) -> None:
    """The background half of ``submit``: call, then keep the reply. Before the request is produced, any
    failure goes to ``admitted`` (the route answers it); after, failures are logged (GET answers them)."""
    try:
        reply = await edge.call(
            service, task, payload, cache=cache, request_id=rid, timeout_s=edge.settings.async_deadline_s,
            store_result_s=ttl_s, on_produced=produced,
            admitted=True,  # no in-flight slot: the HTTP exchange held it until the 202; pending_async bounds this
        )  # fmt: skip
    except asyncio.CancelledError:
        if not admitted.done():
            admitted.cancel()
        raise
    except Exception as exc:  # noqa: BLE001  (before the produce the route answers it; after, GET does)
        if not admitted.done():
            admitted.set_exception(exc)
        elif not isinstance(exc, EdgeError):  # a timeout is GET's 504 (from the marker): nothing to keep
            log.warning("asynchronous request %s ended without a reply: %r", rid, exc)
        return
    not_kept = await store_replies(edge.redis, edge.settings.topic_prefix, [(reply, ttl_s)])
    if admitted.done():
        return  # produced: the agent keeps the reply too (streams.results)
    if not_kept:  # a cache hit at the edge: this was its only copy
        message = "Redis is unavailable: the result of this asynchronous request could not be kept"
        admitted.set_exception(UnavailableError(message, request_id=rid, service=service, task=task))
    else:
        admitted.set_result(None)


async def _mark_pending(edge: Edge, rid: str, marker: Pending, ttl_s: int) -> None:
    prefix = edge.settings.topic_prefix
    keys = (pending_key(prefix, rid), result_key(prefix, rid))
    args = (marker.model_dump_json(), ttl_s)
    try:
        marked = await guarded(edge.redis, lambda: edge.redis.eval(_MARK_PENDING, 2, *keys, *args))
    except RedisError as exc:
        raise UnavailableError(
            f"Redis is unavailable, so the result of an asynchronous request could not be kept: {exc}",
            request_id=rid,
            service=marker.service,
            task=marker.task,
        ) from exc
    if not marked:
        raise DuplicateIdError(
            f"request id {rid!r} is in use: a request with this id is pending or its result is kept; "
            "use a new id to run it again",
            request_id=rid,
            service=marker.service,
            task=marker.task,
        )


async def _forget_marker(edge: Edge, rid: str) -> None:
    """Best effort: the request was not produced, so its id is not pending (the marker's TTL bounds a miss)."""
    try:
        await guarded(edge.redis, lambda: edge.redis.delete(pending_key(edge.settings.topic_prefix, rid)))
    except RedisError as exc:
        log.warning("could not remove the pending marker of %s: %s", rid, exc)


async def lookup(edge: Edge, rid: str, owner: str | None = None) -> Response:
    """``GET /requests/{id}``: the kept result as the synchronous call would answer it, 202 while pending,
    504 past the deadline without a result, 404 for an unknown or expired id, or one that ``owner`` (the
    caller's owner id, None without keys) did not submit; 503 when Redis is away."""
    prefix = edge.settings.topic_prefix
    try:
        raw_result, raw_marker = await guarded(
            edge.redis, lambda: edge.redis.mget([result_key(prefix, rid), pending_key(prefix, rid)])
        )
    except RedisError as exc:
        raise UnavailableError(f"Redis is unavailable, so results cannot be read: {exc}", request_id=rid) from exc
    marker = _marker(raw_marker)
    if not _owns(owner, marker):  # the same answer as an unknown id: whose ids exist is not told
        raise NotFoundError(f"no asynchronous request {rid!r} (unknown, or its result expired)", request_id=rid)
    render = RENDERERS.get(marker.render if marker is not None else DEFAULT_RENDER, _native)
    context = marker.context if marker is not None else {}
    reply = decode_result(raw_result)
    if reply is not None:
        return render(reply, context)
    if marker is None:
        raise NotFoundError(f"no asynchronous request {rid!r} (unknown, or its result expired)", request_id=rid)
    if time.time() * 1000 < marker.deadline_ms + DEADLINE_GRACE_S * 1000:
        response = accepted(rid)
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response
    timeout_s = edge.settings.async_deadline_s
    return render(
        ReplyEvent(
            id=rid,
            service=marker.service,
            task=marker.task,
            ok=False,
            error=ErrorInfo(code=ErrorCode.TIMEOUT, message=f"no reply within {timeout_s:.1f}s (request id {rid})"),
        ),
        context,
    )


def _owns(owner: str | None, marker: Pending | None) -> bool:
    """Whether a caller with ``owner`` may read the request behind ``marker``: the marker's owner must be the
    caller's (both None without keys); a result without its marker is answered only to anonymous callers."""
    if marker is None:
        return owner is None
    if owner is None or marker.owner is None:
        return owner is None and marker.owner is None
    return hmac.compare_digest(owner, marker.owner)


def _marker(raw: bytes | str | None) -> Pending | None:
    if raw is None:
        return None
    try:
        return Pending.model_validate(orjson.loads(raw))
    except (orjson.JSONDecodeError, ValidationError):
        log.warning("unreadable pending marker (%d bytes): treated as absent", len(raw))
        return None
