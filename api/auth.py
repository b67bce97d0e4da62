"""Who the edge answers: optional API keys on the service routes, and the loopback rule for binding.

API keys (``AISEMBLE_API_KEYS``, a JSON list of key strings or ``{"key", "name", "rpm", ...}`` objects,
``streams.settings.ApiKey``; the quotas are applied by ``api.quota_gate``): when the list is empty, every route
is open (the edge then listens on a loopback address only, see below).
When it is set, ``ApiKeyAuth`` is a FastAPI dependency
that lets a request through only if it carries one of the keys, in ``X-API-Key`` or as
``Authorization: Bearer <key>``; otherwise it raises ``api.errors.UnauthorizedError`` (401, code
``unauthorized``, ``WWW-Authenticate: Bearer realm="aisemble"``). ``api.app`` applies it to the service
routers (data, nlp, llm, vision) in one place; ``/health`` stays open for probes. A future ``/metrics``
applies the same dependency when ``Settings.metrics_require_key`` is true: ``auth_dependencies(settings,
route="metrics")`` gives the list to pass as ``dependencies=``.

What it guarantees:

* The comparison takes the same time whichever key matches, and whether any does: the presented value
  and every configured key are hashed (SHA-256, so lengths do not show either) and compared with
  ``hmac.compare_digest`` against every key, without stopping at the first match.
* Keys never reach a log, an error message or a repr: they are ``SecretStr`` in the settings and only
  their digests are kept here. A failed attempt is logged with the path, the client address and whether
  a key was missing or wrong, never with what was sent.
* A key must be 1 to 512 printable ASCII characters (an HTTP header cannot carry more faithfully); an empty
  or unprintable key is refused when the app is built (``InvalidApiKeysError``), so ``[""]`` can never
  open the door to an empty header.

The loopback rule: ``check_bind(host, settings)`` refuses (``InsecureBindError``) to let the edge listen on
a non-loopback address without API keys, unless ``AISEMBLE_ALLOW_INSECURE=true``. ``aisemble edge`` and
``aisemble run`` call it before anything binds. Loopback means ``localhost``, 127.0.0.0/8 and ``::1``;
any other name or address (``0.0.0.0``, ``::``, a LAN address, a host name) counts as exposed, since a
name is not resolved here.

FastAPI reads and parses a request's body before it runs dependencies, so the check also runs first as an
ASGI middleware (``ApiKeyGate``) on the raw headers: a request without a valid key is answered 401 before
any of its body is read. The keys are hashed and compared once per request: the dependency takes the gate's
verdict from the scope (``Caller``) when the gate saw the request with keys on, and checks the headers itself
only when it did not (an app built without the gate), so it never lets through what the gate would refuse.

Who the caller is (``Caller``): the gate identifies every HTTP request once, open paths included, and
leaves the answer in the ASGI scope (``request_caller`` reads it). With keys configured, a caller whose key
matches has an ``owner``: a digest of that key's identity (SHA-256 over a fixed label and the key's own
SHA-256, hex), never the key itself. ``api.async_requests`` stores it with an asynchronous request's
pending marker, so only the same key reads the result. The owner is the same on every edge and across
restarts for the same key; removing a key from ``AISEMBLE_API_KEYS`` makes its kept results unreadable.
Without keys every caller is anonymous (``owner`` None). ``Caller.key`` is the matching entry (its name and
quotas); the owner id depends on the key string only, so giving a key a name or quotas keeps its results.

What can go wrong: ``request_caller`` on a request the gate did not see raises ``RuntimeError`` (a 500):
an app built without the gate fails closed rather than serving results to anyone.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from dataclasses import dataclass
from typing import Literal

from fastapi import Depends, Request, Security
from fastapi.params import Depends as DependsParam
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import UnauthorizedError, caller_id, error_response, is_openai_path, service_of
from schemas import SERVICES
from schemas.http import API_KEY_HEADER, API_KEY_SCHEME, BEARER_SCHEME, SECURITY_DESCRIPTION
from streams.settings import ApiKey, Settings

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 512
WWW_AUTHENTICATE = 'Bearer realm="aisemble"'
LOOPBACK_NAMES = frozenset({"localhost"})
OWNER_LABEL = b"aisemble.owner.v1:"  # what a key's digest is hashed with to make its owner id
CALLER_SCOPE_KEY = "aisemble.caller"  # where ApiKeyGate leaves the ``Caller`` in the ASGI scope

_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER, scheme_name=API_KEY_SCHEME, description=SECURITY_DESCRIPTION, auto_error=False
)
_bearer = HTTPBearer(scheme_name=BEARER_SCHEME, description=SECURITY_DESCRIPTION, auto_error=False)


class InvalidApiKeysError(ValueError):
    """A configured API key is unusable; ``index`` is its place in ``AISEMBLE_API_KEYS`` (the key is not shown)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"AISEMBLE_API_KEYS[{index}] {reason}")
        self.index = index
        self.reason = reason


class InsecureBindError(RuntimeError):
    """The edge would listen on a non-loopback ``host`` without API keys and without ``allow_insecure``."""

    def __init__(self, host: str) -> None:
        super().__init__(
            f"refusing to serve the edge on {host!r} without API keys: anyone who can reach that address could "
            "use every service. Set AISEMBLE_API_KEYS (a JSON list, e.g. '[\"<a long random key>\"]'), or bind a "
            "loopback address (AISEMBLE_EDGE_HOST=127.0.0.1), or set AISEMBLE_ALLOW_INSECURE=true to accept the "
            "risk (e.g. behind a proxy that authenticates)."
        )
        self.host = host


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def key_digests(settings: Settings) -> list[bytes]:
    """The SHA-256 digests of the configured keys, checked; raises ``InvalidApiKeysError`` for an unusable one."""
    digests = []
    for index, secret in enumerate(settings.api_keys):
        key = secret.get_secret_value()
        if not key:
            raise InvalidApiKeysError(index, "is empty")
        if len(key) > MAX_KEY_LENGTH:
            raise InvalidApiKeysError(index, f"is longer than {MAX_KEY_LENGTH} characters")
        if not (key.isascii() and key.isprintable()) or key != key.strip():
            raise InvalidApiKeysError(
                index, "must be printable ASCII without leading or trailing spaces (it travels in an HTTP header)"
            )
        digests.append(_digest(key.encode("ascii")))
    return digests


def matches_any(candidate: str, digests: list[bytes]) -> bool:
    """Whether ``candidate`` is one of the keys behind ``digests``, in time independent of which one and of
    whether any: every digest is compared (``hmac.compare_digest``), none is skipped."""
    return identify([candidate], digests) is not None


def identify(presented: list[str], digests: list[bytes]) -> bytes | None:
    """The configured key's digest that one of ``presented`` matches, or None; every value is compared with
    every digest (``hmac.compare_digest``), none skipped, so the time says neither which nor whether."""
    found: bytes | None = None
    for value in presented:
        # A header value is Latin-1 text to Starlette: encoding it back gives the bytes the client sent.
        candidate = _digest(value.encode("latin-1", errors="replace"))
        for digest in digests:
            if hmac.compare_digest(candidate, digest):
                found = digest
    return found


def owner_of(key_digest: bytes) -> str:
    """The owner id of a key (from its SHA-256 digest): stored with results, never the key."""
    return hashlib.sha256(OWNER_LABEL + key_digest).hexdigest()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, as ``ApiKeyGate`` found it (see the module docstring).

    ``keys_on``: the edge has API keys. ``owner``: the matching key's owner id (None without keys, or when
    no key matched). ``presented``: the request carried a key, matching or not. ``key``: the matching entry of
    ``AISEMBLE_API_KEYS`` (its name and quotas, ``api.quotas``; never shown with its key), or None.
    """

    keys_on: bool
    owner: str | None
    presented: bool
    key: ApiKey | None = None

    @property
    def admitted(self) -> bool:
        """Whether a route behind the door serves this caller: keys off, or a key matched."""
        return not self.keys_on or self.owner is not None


ANONYMOUS = Caller(keys_on=False, owner=None, presented=False)


def presented_keys(headers: Headers) -> list[str]:
    """The non-empty key values a request carries: ``X-API-Key`` and ``Authorization: Bearer <key>``."""
    presented = [headers.get(API_KEY_HEADER, "")]
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        presented.append(credentials.strip())
    return [p for p in presented if p]


async def current_caller(request: Request) -> Caller:
    """``request_caller`` as an ``async def`` dependency (run on the event loop, not in the thread pool)."""
    return request_caller(request)


def request_caller(request: Request) -> Caller:
    """The dependency that says who sent ``request`` (left in the scope by ``ApiKeyGate``).

    Raises:
        RuntimeError: the gate did not see this request (an app built without it): fail closed.
    """
    caller = request.scope.get(CALLER_SCOPE_KEY)
    if not isinstance(caller, Caller):
        raise RuntimeError("no caller identified: the app must be built with api.auth.ApiKeyGate")
    return caller


class ApiKeyAuth:
    """The FastAPI dependency that admits a request only with a configured key (a no-op without keys)."""

    def __init__(self, settings: Settings) -> None:
        self._digests = key_digests(settings)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeyAuth(keys={len(self._digests)})"

    async def __call__(
        self,
        request: Request,
        api_key: str | None = Security(_api_key_header),
        bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
    ) -> None:
        if not self._digests:
            return
        caller = request.scope.get(CALLER_SCOPE_KEY)
        if isinstance(caller, Caller) and caller.keys_on:
            # ApiKeyGate checked this request's headers already (the same keys: one Settings per app); its
            # verdict stands, so the keys are hashed and compared once per request, not twice.
            if caller.admitted:
                return
            presented = [""] if caller.presented else []
        else:  # an app built without the gate (or with another key set): check here, fail closed
            presented = [value for value in (api_key, bearer.credentials if bearer else None) if value]
            # Every presented value is checked against every key: no early exit tells which one failed.
            if identify(presented, self._digests) is not None:
                return
        reason = "invalid" if presented else "missing"
        client = request.client.host if request.client else "?"
        # the path as repr: a percent-encoded newline cannot forge a log line
        log.info("401 %s %r from %s: API key %s", request.method, request.url.path, client, reason)
        raise UnauthorizedError(
            _unauthorized_message(bool(presented)),
            request_id=caller_id(request),
            service=service_of(request),
            headers={"WWW-Authenticate": WWW_AUTHENTICATE},
        )


class ApiKeyGate:
    """ASGI middleware: the API-key check on the raw headers, before anything reads the request body.

    ``ApiKeyAuth`` (the dependency) documents the security schemes in OpenAPI and checks again, but FastAPI
    runs dependencies only after it has read and parsed the body; this gate answers 401 first, so a caller
    without a key can make the edge read no body at all (an unauthenticated 20 MB upload costs a header
    parse). ``open_paths`` (``/health``, the OpenAPI document and docs; ``/metrics`` when it needs no key) pass
    without a key. Every request, open or not, leaves with its ``Caller`` in the scope (``request_caller``);
    without keys every caller is ``ANONYMOUS``.
    """

    def __init__(self, app: ASGIApp, settings: Settings, open_paths: frozenset[str]) -> None:
        self.app = app
        self._digests = key_digests(settings)
        self._entries = dict(zip(self._digests, settings.api_keys, strict=True))  # digest -> its ApiKey entry
        self._open = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._digests:
            scope[CALLER_SCOPE_KEY] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        request = Request(scope)  # headers only: the body is never read here
        presented = presented_keys(request.headers)
        matched = identify(presented, self._digests)
        caller = Caller(
            keys_on=True,
            owner=owner_of(matched) if matched else None,
            presented=bool(presented),
            key=self._entries.get(matched) if matched else None,
        )
        scope[CALLER_SCOPE_KEY] = caller
        if caller.admitted or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        await unauthorized(request, caller)(scope, receive, send)


def unauthorized(request: Request, caller: Caller) -> Response:
    """The 401 for a caller without a matching key (logged with the path, never with what was sent); in
    OpenAI's shape on the ``/v1/`` routes."""
    reason = "invalid" if caller.presented else "missing"
    client = request.client.host if request.client else "?"
    # the path as repr: a percent-encoded newline cannot forge a log line
    log.info("401 %s %r from %s: API key %s", request.method, request.url.path, client, reason)
    error = UnauthorizedError(
        _unauthorized_message(caller.presented),
        request_id=caller_id(request),
        service=_service_of_path(request.url.path),
        headers={"WWW-Authenticate": WWW_AUTHENTICATE},
    )
    return error_response(error, openai=is_openai_path(request.url.path))


def _unauthorized_message(presented: bool) -> str:
    if presented:
        return "the API key is not valid"
    return f"an API key is required: send it in {API_KEY_HEADER} or as Authorization: Bearer <key>"


def _service_of_path(path: str) -> str:
    """The service a path belongs to (``/data/...``, ``/ai/<service>/...``), or '' (no route is matched yet)."""
    parts = path.strip("/").split("/")
    name = parts[1] if parts[0] == "ai" and len(parts) > 1 else parts[0]
    return name if name in SERVICES else ""


def auth_dependencies(settings: Settings, route: Literal["service", "metrics"] = "service") -> list[DependsParam]:
    """The ``dependencies=`` for a router: the API-key check for service routes, and for ``/metrics`` when
    ``settings.metrics_require_key``; none at all without keys, so the OpenAPI document declares no
    security a caller need not meet. Raises ``InvalidApiKeysError`` for an unusable configured key."""
    auth = ApiKeyAuth(settings)
    if not auth.enabled or (route == "metrics" and not settings.metrics_require_key):
        return []
    return [Depends(auth)]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost`` (names other than ``localhost`` are not resolved)."""
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check_bind(host: str, settings: Settings) -> None:
    """Refuse (``InsecureBindError``) to serve on a non-loopback ``host`` without API keys, unless
    ``settings.allow_insecure``; raises ``InvalidApiKeysError`` when a configured key is unusable."""
    has_keys = bool(key_digests(settings))
    if not (is_loopback(host) or has_keys or settings.allow_insecure):
        raise InsecureBindError(host)
