"""Per-key quotas at the edge: the services a key may use (403), and its rpm, tpm and concurrency (429).

``QuotaGate`` (ASGI middleware, inside ``api.auth.ApiKeyGate``, outside ``api.admission.AdmissionGate``) runs
on the headers of every request whose caller matched a key of ``AISEMBLE_API_KEYS`` (``Caller.key``):

* a service the key may not use (``ApiKey.services``; the service of the path: ``/data/``, ``/ai/<svc>/``,
  ``/v1/chat/completions`` and ``/v1/completions`` are ``llm``, ``/v1/embeddings`` ``nlp``) is 403
  ``forbidden`` naming it, before any body is read;
* a ``POST`` to a service route takes one of the key's ``max_in_flight`` slots (held until the response has
  been sent; for a stream until it ends; an asynchronous request gives it back with its 202) and one request
  of its ``rpm``, both at once; past either, 429 ``rate_limited`` with ``Retry-After`` (the rpm window's
  reset, rounded up; 1 s for a slot) and nothing of the request is read or produced;
* the LLM routes charge ``tpm`` once they have the body (``QuotaTicket.charge_tokens``: the prompt estimate +
  ``max_tokens``, ``api.quotas.estimate_tokens``): 429 when that does not fit in what remains, 422
  (OpenAI's shape: 400 ``request_too_large``) when it exceeds ``tpm`` by itself (no wait would help); after
  the answer ``QuotaTicket.settle`` corrects the charge to the reply's usage (the unused part given back, a
  larger usage charged), before the response starts when the answer is not a stream. An asynchronous LLM
  request keeps its admission charge (its reply comes after the 202).

Every answer to a key with ``rpm`` carries OpenAI's ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests`` and ``x-ratelimit-reset-requests`` (its 401-free answers: 200s, errors,
403s, 429s, streams, whose headers leave with the first event), and the three ``-tokens`` ones once ``tpm``
was charged or read (LLM routes; every answer when the key has ``tpm``). An answer that counts for no limit
(a ``GET``) reads the windows without taking anything. A key without ``rpm``, ``tpm`` and ``max_in_flight``
(every plain-string key) never reaches Redis here and gets no such headers; its requests and tokens are still
counted per key name (``api.quotas.KeyStats``: ``/metrics``, ``/status.json``).

What can go wrong: Redis away: ``api.quota_store`` falls back to this edge's memory (each edge enforces the
limits alone), logged once per outage. A quota call never fails a request: Redis errors are the fallback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.admission import ADMITTED_PREFIXES
from api.auth import CALLER_SCOPE_KEY, Caller
from api.errors import (
    EdgeError,
    ForbiddenError,
    InvalidInputError,
    RateLimitedError,
    caller_id,
    error_response,
    is_openai_path,
)
from api.metrics import service_of_path
from api.quota_store import QuotaStore, Slot
from api.quotas import KeyStats, Window, estimate_tokens, rate_headers, retry_after_s, usage_tokens
from schemas import ReplyEvent
from streams.settings import ApiKey

QUOTA_SCOPE_KEY = "aisemble.quota"  # where QuotaGate leaves the request's QuotaTicket
SLOT_RETRY_AFTER_S = 1


class QuotaTicket:
    """One request's quotas: its key, the windows it saw (for the headers), its token charge."""

    def __init__(self, key: ApiKey, store: QuotaStore | None, stats: KeyStats) -> None:
        self.key = key
        self.store = store
        self.stats = stats
        self.requests: Window | None = None
        self.tokens: Window | None = None
        self.charged = 0  # tpm units taken for this request and not yet corrected

    def headers(self) -> list[tuple[bytes, bytes]]:
        return rate_headers(self.requests, self.tokens)

    async def charge_tokens(self, payload: Mapping[str, object], request_id: str | None = None) -> None:
        """Charge an LLM request's estimate (``estimate_tokens``) to the key's ``tpm``; a no-op without one.

        Raises:
            InvalidInputError: the estimate exceeds ``tpm`` by itself (422; OpenAI's 400 ``request_too_large``).
            RateLimitedError: it does not fit in what remains of the minute (429, ``Retry-After``).
        """
        tpm = self.key.tpm
        if tpm is None or self.store is None:
            return
        cost = estimate_tokens(payload)
        if cost > tpm:
            raise InvalidInputError(
                f"this request may use {cost} tokens (its prompt, estimated at a token per 4 bytes, plus max_tokens): "
                f"more than this API key's {tpm} tokens per minute; lower max_tokens or shorten the prompt",
                request_id=request_id,
                service="llm",
                param="max_tokens",
                openai_code="request_too_large",
            )
        verdict = await self.store.hit(self.key.name, "tpm", tpm, cost)
        self.tokens = verdict.window
        if not verdict.allowed:
            self.stats.limited(self.key.name, "tpm")
            wait = retry_after_s(verdict.window.reset_in_s)
            raise RateLimitedError(
                f"rate limit reached for API key {self.key.name!r} on tokens per minute: limit {tpm}, remaining "
                f"{verdict.window.remaining}, requested {cost}; try again in {wait} s",
                limit="tpm",
                retry_after_s=wait,
                request_id=request_id,
                service="llm",
            )
        self.charged = cost

    async def settle(self, reply: ReplyEvent | None) -> None:
        """Correct the charge to ``reply``'s usage (none: a failed reply used nothing) and count its tokens."""
        used = usage_tokens(reply.output) if reply is not None and reply.ok else 0
        self.stats.tokens(self.key.name, used)
        if self.key.tpm is None or self.store is None or not self.charged:
            return
        delta, self.charged = used - self.charged, 0
        self.tokens = await self.store.adjust(self.key.name, "tpm", self.key.tpm, delta)


def _forbidden(key: ApiKey, service: str) -> str:
    allowed = ", ".join(key.services or ()) or "none"
    return f"the API key {key.name!r} may not use the service {service!r} (it may use: {allowed})"


def quota_ticket(request: Request) -> QuotaTicket | None:
    """The request's ``QuotaTicket`` (None: no key matched, or the app runs without keys)."""
    ticket = request.scope.get(QUOTA_SCOPE_KEY)
    return ticket if isinstance(ticket, QuotaTicket) else None


class QuotaGate:
    """ASGI middleware: a key's services, rpm and concurrency before the body is read (see the module)."""

    def __init__(self, app: ASGIApp, stats: KeyStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        caller = scope.get(CALLER_SCOPE_KEY) if scope["type"] == "http" else None
        key = caller.key if isinstance(caller, Caller) else None
        if key is None:
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        service = service_of_path(path)
        counted = scope.get("method") == "POST" and path.startswith(ADMITTED_PREFIXES)
        store = getattr(getattr(scope["app"].state, "edge", None), "quotas", None)
        if not key.limited or not isinstance(store, QuotaStore):  # a plain key: counted, never limited
            scope[QUOTA_SCOPE_KEY] = QuotaTicket(key, None, self.stats)
            if service and not key.allows(service):
                error = ForbiddenError(_forbidden(key, service), request_id=caller_id(Request(scope)), service=service)
                await error_response(error, openai=is_openai_path(path))(scope, receive, send)
                return
            if counted and service:
                self.stats.request(key.name, service)
            await self.app(scope, receive, send)
            return
        ticket = QuotaTicket(key, store, self.stats)
        scope[QUOTA_SCOPE_KEY] = ticket
        slot: Slot | None = None
        refusal: EdgeError | None = None
        if service and not key.allows(service):
            refusal = ForbiddenError(_forbidden(key, service), request_id=caller_id(Request(scope)), service=service)
        elif counted:
            slot, refusal = await self._admit(ticket, key, store, service, caller_id(Request(scope)))
            if refusal is None:
                self.stats.request(key.name, service)
        if refusal is None or isinstance(refusal, ForbiddenError):
            took_rpm = counted and refusal is None
            await self._read_windows(ticket, key, store, rpm=not took_rpm, tpm=not (took_rpm and service == "llm"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *ticket.headers()]}
            await send(message)

        try:
            if refusal is not None:
                await error_response(refusal, openai=is_openai_path(path))(scope, receive, send_with_headers)
                return
            await self.app(scope, receive, send_with_headers)
        finally:
            if slot is not None:
                await _release(store, slot)

    async def _admit(
        self, ticket: QuotaTicket, key: ApiKey, store: QuotaStore, service: str, request_id: str | None
    ) -> tuple[Slot | None, RateLimitedError | None]:
        """Take a slot and a request of the rpm at once; on a refusal give back what the other took."""

        async def slot() -> Slot | bool | None:
            return await store.acquire(key.name, key.max_in_flight) if key.max_in_flight is not None else True

        async def request() -> bool:
            if key.rpm is None:
                return True
            verdict = await store.hit(key.name, "rpm", key.rpm)
            ticket.requests = verdict.window
            return verdict.allowed

        taken, allowed = await asyncio.gather(slot(), request())
        held = taken if isinstance(taken, Slot) else None
        if taken is None:  # at max_in_flight
            if allowed and key.rpm is not None:
                ticket.requests = await store.adjust(key.name, "rpm", key.rpm, -1)  # this request did not run
            self.stats.limited(key.name, "max_in_flight")
            return None, RateLimitedError(
                f"API key {key.name!r} has its {key.max_in_flight} concurrent requests in flight already; "
                f"try again in {SLOT_RETRY_AFTER_S} s",
                limit="max_in_flight",
                retry_after_s=SLOT_RETRY_AFTER_S,
                request_id=request_id,
                service=service,
            )
        if not allowed:
            if held is not None:
                await _release(store, held)
            self.stats.limited(key.name, "rpm")
            window = ticket.requests
            wait = retry_after_s(window.reset_in_s if window else 1.0)
            return None, RateLimitedError(
                f"rate limit reached for API key {key.name!r} on requests per minute: limit {key.rpm}; "
                f"try again in {wait} s",
                limit="rpm",
                retry_after_s=wait,
                request_id=request_id,
                service=service,
            )
        return held, None

    async def _read_windows(self, ticket: QuotaTicket, key: ApiKey, store: QuotaStore, *, rpm: bool, tpm: bool) -> None:
        """Read the windows the headers show that this request does not take (an LLM request's tpm is read when
        its route charges it)."""
        reads = []
        if key.rpm is not None and rpm:
            reads.append(("rpm", key.rpm))
        if key.tpm is not None and tpm:
            reads.append(("tpm", key.tpm))
        if not reads:
            return
        windows = await asyncio.gather(*(store.peek(key.name, kind, limit) for kind, limit in reads))
        for (kind, _), window in zip(reads, windows, strict=True):
            if kind == "rpm":
                ticket.requests = window
            else:
                ticket.tokens = window


async def _release(store: QuotaStore, slot: Slot) -> None:
    """Give a slot back, even from a cancelled exchange (then in a task of its own)."""
    try:
        await store.release(slot)
    except asyncio.CancelledError:
        task = asyncio.get_running_loop().create_task(store.release(slot))
        _PENDING.add(task)
        task.add_done_callback(_PENDING.discard)
        raise


def settle_later(ticket: QuotaTicket, reply: ReplyEvent | None) -> None:
    """``ticket.settle(reply)`` in a task of its own (a stream's end: its exchange may be cancelled)."""
    task = asyncio.get_running_loop().create_task(ticket.settle(reply))
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)


_PENDING: set[asyncio.Task[None]] = set()  # releases and corrections running after their exchange ended
