"""Who the edge answers: optional API keys on the service routes, and the loopback rule for binding.

API keys (``AISEMBLE_API_KEYS``, a JSON list): when the list is empty, every route is open (the edge then
listens on a loopback address only, see below). When it is set, ``ApiKeyAuth`` is a FastAPI dependency
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
any of its body is read.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from typing import Literal

from fastapi import Depends, Request, Security
from fastapi.params import Depends as DependsParam
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import UnauthorizedError, caller_id, error_response, is_openai_path, service_of
from schemas import SERVICES
from schemas.http import API_KEY_HEADER, API_KEY_SCHEME, BEARER_SCHEME, SECURITY_DESCRIPTION
from streams.settings import Settings

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 512
WWW_AUTHENTICATE = 'Bearer realm="aisemble"'
LOOPBACK_NAMES = frozenset({"localhost"})

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
    # A header value is Latin-1 text to Starlette: encoding it back gives the bytes the client sent.
    presented = _digest(candidate.encode("latin-1", errors="replace"))
    found = False
    for digest in digests:
        found |= hmac.compare_digest(presented, digest)
    return found


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
        presented = [value for value in (api_key, bearer.credentials if bearer else None) if value]
        # Every presented value is checked against every key: no early exit tells which one failed.
        valid = False
        for value in presented:
            valid |= matches_any(value, self._digests)
        if valid:
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
    without a key. A no-op when no keys are configured.
    """

    def __init__(self, app: ASGIApp, settings: Settings, open_paths: frozenset[str]) -> None:
        self.app = app
        self._digests = key_digests(settings)
        self._open = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._digests or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        request = Request(scope)  # headers only: the body is never read here
        presented = [request.headers.get(API_KEY_HEADER, "")]
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            presented.append(credentials.strip())
        presented = [p for p in presented if p]
        valid = False
        for value in presented:  # every value against every key: no early exit
            valid |= matches_any(value, self._digests)
        if valid:
            await self.app(scope, receive, send)
            return
        reason = "invalid" if presented else "missing"
        client = request.client.host if request.client else "?"
        log.info("401 %s %r from %s: API key %s", request.method, request.url.path, client, reason)
        error = UnauthorizedError(
            _unauthorized_message(bool(presented)),
            request_id=caller_id(request),
            service=_service_of_path(request.url.path),
            headers={"WWW-Authenticate": WWW_AUTHENTICATE},
        )
        # the OpenAI-compatible routes (/v1) answer in OpenAI's shape
        await error_response(error, openai=is_openai_path(request.url.path))(scope, receive, send)


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
    ``settings.metrics_require_key``; raises ``InvalidApiKeysError`` for an unusable configured key."""
    if route == "metrics" and not settings.metrics_require_key:
        return []
    return [Depends(ApiKeyAuth(settings))]


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
