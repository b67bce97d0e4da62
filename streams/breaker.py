"""A small circuit breaker (pure: no I/O, injected clock), used to stop paying a timeout per request.

States and transitions:

* ``closed``: every call is allowed. ``failures`` failures *in a row* open the breaker; a success resets
  the count.
* ``open``: no call is allowed (the caller skips the dependency at once) until ``reset_s`` has passed.
* ``half_open``: after ``reset_s``, ``allow()`` lets exactly one call through as a probe. Its success
  closes the breaker, its failure opens it again for another ``reset_s``. A probe that never reports
  (its task was cancelled) is forgotten after ``reset_s``, so the breaker can never stick half-open.

Guarantees: state changes are logged once each (WARNING when opening, INFO when closing), never per
call; ``allow`` / ``success`` / ``failure`` are O(1) and safe to call from one event loop (no locks:
asyncio code runs them between awaits). What can go wrong: nothing raises here; the caller decides what
"skipped" means (for Redis: a cache miss).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum

log = logging.getLogger(__name__)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures of one dependency and says whether the next call may try it."""

    def __init__(
        self,
        failures: int,
        reset_s: float,
        *,
        name: str = "redis",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or reset_s <= 0:
            raise ValueError(f"failures must be >= 1 and reset_s > 0, got {failures}, {reset_s}")
        self.threshold = failures
        self.reset_s = reset_s
        self.name = name
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._since = clock()  # when the current state (or the current probe) began
        self._changed = self._since
        self.last_error: str | None = None
        self.transitions = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def _enter(self, state: BreakerState) -> None:
        if state is self._state:
            return
        previous, self._state = self._state, state
        self.transitions += 1
        self._changed = self._clock()
        if state is BreakerState.OPEN:
            log.warning(
                "%s breaker %s -> open after %d failure(s) (%s); skipping %s for %.1f s",
                self.name, previous, self._failures, self.last_error, self.name, self.reset_s,
            )  # fmt: skip
        elif state is BreakerState.CLOSED:
            log.info("%s breaker %s -> closed: %s answers again", self.name, previous, self.name)
        else:
            log.info("%s breaker open -> half_open: probing %s", self.name, self.name)

    def seconds_in_state(self) -> float:
        """How long the breaker has been in its current state (since creation if it never changed)."""
        return self._clock() - self._changed

    def allow(self) -> bool:
        """Whether the caller may try the dependency now; in half-open, True for one probe only."""
        if self._state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if now - self._since < self.reset_s:
            return False  # open and cooling down, or a probe is in flight
        self._since = now  # a (new) probe starts now
        self._enter(BreakerState.HALF_OPEN)
        return True

    def success(self) -> None:
        """The call reached the dependency and it answered."""
        self._failures = 0
        self.last_error = None
        if self._state is not BreakerState.CLOSED:
            self._since = self._clock()
            self._enter(BreakerState.CLOSED)

    def failure(self, error: str | None = None) -> None:
        """The call failed (timeout, refused, reset): count it, open the breaker past the threshold."""
        self._failures += 1
        self.last_error = error
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.threshold:
            self._since = self._clock()
            self._enter(BreakerState.OPEN)
            return
        log.debug("%s call failed (%d in a row): %s", self.name, self._failures, error)

    def abandon(self) -> None:
        """The call ended without an outcome (cancelled): a half-open breaker may probe again at once."""
        if self._state is BreakerState.HALF_OPEN:
            self._since = self._clock() - self.reset_s

    def snapshot(self) -> dict[str, object]:
        """The state as a JSON-able dict (for /health)."""
        return {
            "breaker": self._state.value,
            "consecutive_failures": self._failures,
            "last_error": self.last_error,
        }
