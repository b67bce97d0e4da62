"""Redis clients that fail fast, and the circuit breaker every request-path Redis call goes through.

``connect(settings)`` builds the client every aisemble process should use: socket and connect timeouts of
``redis_timeout_s``, a health-check PING on connections idle for ``HEALTH_CHECK_INTERVAL_S``, and at most
one immediate retry, on a connection error only (a stale pooled connection after a Redis restart), never
on a timeout. It attaches a :class:`~streams.breaker.CircuitBreaker` (``redis_breaker_failures``,
``redis_breaker_reset_s``) to the client.

``guarded(redis, call)`` runs one Redis call through that client's breaker and an outer time bound:

* breaker open: raises :class:`RedisUnavailable` at once, without touching the socket, so a hanging Redis
  costs one timeout per failure up to the threshold, then nothing until the probe after ``reset_s``;
* a timeout, refused or reset connection (``RedisError``/``OSError``/``TimeoutError``): counted as a
  failure and re-raised as :class:`RedisUnavailable` (a ``RedisError``, so ``except RedisError`` still
  catches it);
* Redis answered, even with an error reply (``ResponseError``): a success for the breaker; re-raised.

A client not built by ``connect`` (or a test's) gets a breaker from the process settings
(``get_settings()``, the environment) on first use.
Breakers are per client object (a weak map), hence per process. State changes are logged by the breaker
once each; single failures are not logged here (callers treat them as a cache miss).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from streams.breaker import BreakerState, CircuitBreaker
from streams.settings import Settings, get_settings

T = TypeVar("T")

HEALTH_CHECK_INTERVAL_S = 15


class RedisUnavailable(RedisError):
    """Redis was not reached: the breaker is open, or the call timed out or could not connect."""

    def __init__(self, message: str, *, breaker: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.breaker = breaker
        self.cause = cause


@dataclass(frozen=True, slots=True)
class RedisGuard:
    """A client's breaker and the outer bound on one call (a backstop to the socket timeouts)."""

    breaker: CircuitBreaker
    call_timeout_s: float


_GUARDS: weakref.WeakKeyDictionary[Redis, RedisGuard] = weakref.WeakKeyDictionary()


def attach_breaker(
    redis: Redis,
    *,
    failures: int | None = None,
    reset_s: float | None = None,
    timeout_s: float | None = None,
    clock: Callable[[], float] | None = None,
) -> RedisGuard:
    """Give ``redis`` its own breaker (replacing any); unset values come from ``get_settings()``."""
    kwargs = {"clock": clock} if clock is not None else {}
    if failures is None or reset_s is None or timeout_s is None:
        settings = get_settings()
        failures = settings.redis_breaker_failures if failures is None else failures
        reset_s = settings.redis_breaker_reset_s if reset_s is None else reset_s
        timeout_s = settings.redis_timeout_s if timeout_s is None else timeout_s
    breaker = CircuitBreaker(failures, reset_s, name="redis", **kwargs)
    timeout = timeout_s
    # Two socket timeouts (connect, then read) plus a margin: a connect()-made client never reaches it.
    guard = RedisGuard(breaker, call_timeout_s=2 * timeout + 0.25)
    _GUARDS[redis] = guard
    return guard


def guard_of(redis: Redis) -> RedisGuard:
    """The breaker of ``redis`` (created with the default settings on first use)."""
    guard = _GUARDS.get(redis)
    return guard if guard is not None else attach_breaker(redis)


def breaker_of(redis: Redis) -> CircuitBreaker:
    return guard_of(redis).breaker


def connect(settings: Settings) -> Redis:
    """A Redis client with short timeouts, bounded retry and a circuit breaker (see the module doc)."""
    timeout = settings.redis_timeout_s
    client: Redis = Redis.from_url(
        settings.redis_url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_timeout=False,
    )
    attach_breaker(
        client, failures=settings.redis_breaker_failures, reset_s=settings.redis_breaker_reset_s, timeout_s=timeout
    )
    return client


async def guarded(redis: Redis, call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call()`` (one Redis command or pipeline) through the breaker of ``redis``.

    Raises:
        RedisUnavailable: the breaker is open, or Redis timed out / refused / dropped the connection.
        RedisError: Redis answered with an error (``ResponseError``); not an outage.
    """
    guard = guard_of(redis)
    breaker = guard.breaker
    if not breaker.allow():
        raise RedisUnavailable(
            f"Redis skipped: circuit breaker open ({breaker.last_error})",
            breaker=BreakerState.OPEN.value,
            cause=breaker.last_error,
        )
    try:
        async with asyncio.timeout(guard.call_timeout_s):
            result = await call()
    except ResponseError:
        breaker.success()  # Redis answered; the command was wrong, not the server
        raise
    except (RedisError, OSError, TimeoutError) as exc:
        cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        breaker.failure(cause)
        raise RedisUnavailable(f"Redis unavailable ({cause})", breaker=breaker.state.value, cause=cause) from exc
    except asyncio.CancelledError:
        breaker.abandon()  # the caller was cancelled, not Redis: free a half-open probe slot
        raise
    breaker.success()
    return result
