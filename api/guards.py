"""The edge's admission guards, pure (no Kafka, no Redis, an injectable clock).

* ``InFlightLimit`` counts the requests the edge holds; ``try_acquire`` never waits: past the limit it
  says no at once (the edge answers 429 with ``Retry-After``), so the number of requests held, and the
  memory they hold, stays bounded whatever the load.
* ``ByteBudget`` counts the body bytes the edge holds (uploads above all): ``try_take(n)`` never waits
  either; past ``limit`` bytes it says no (429), so a handful of 20 MB uploads cannot exhaust memory while
  the request count is low.
* ``PendingPerOwner`` counts the asynchronous requests each caller (API key) has pending at this edge,
  at most ``limit`` each; past it, no (429).
* ``BrokerState`` is the edge's cheap view of Kafka: ``"ok"`` or ``"down"``, since when, and the last
  error. The edge's metadata probe marks it down or ok, a successful produce marks it ok, a failed one
  is only noted (``suspect``); while it says ``"down"`` the edge answers 503 without handing anything
  to the producer (nothing queues up during an outage).

What can go wrong: a view is only as fresh as its last observation. Between the broker's death and the
first failed probe (at most the probe interval plus the probe timeout) requests still try to produce and
fail after ``produce_timeout_s``; a false "down" (a probe that timed out while the broker was fine) lasts
until the next successful probe or produce.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

KafkaStatus = Literal["ok", "down"]


class InFlightLimit:
    """A non-blocking counter of requests in flight, at most ``limit`` at once."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"in-flight limit must be >= 1, not {limit}")
        self.limit = limit
        self.count = 0
        self.peak = 0
        self.rejected = 0

    def try_acquire(self) -> bool:
        """Take a slot; False (and counted as rejected) when all ``limit`` slots are taken."""
        if self.count >= self.limit:
            self.rejected += 1
            return False
        self.count += 1
        self.peak = max(self.peak, self.count)
        return True

    def release(self) -> None:
        """Give a slot back (once per successful ``try_acquire``)."""
        if self.count <= 0:
            raise RuntimeError("release() without a matching try_acquire()")
        self.count -= 1


class ByteBudget:
    """A non-blocking budget of bytes held at once, at most ``limit``."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"byte budget must be >= 1, not {limit}")
        self.limit = limit
        self.held = 0
        self.peak = 0
        self.rejected = 0

    def try_take(self, n: int) -> bool:
        """Hold ``n`` more bytes; False (and counted as rejected) when that would pass ``limit``."""
        if n < 0:
            raise ValueError(f"cannot take {n} bytes")
        if self.held + n > self.limit:
            self.rejected += 1
            return False
        self.held += n
        self.peak = max(self.peak, self.held)
        return True

    def give(self, n: int) -> None:
        """Give back ``n`` bytes taken by ``try_take``."""
        if n < 0 or n > self.held:
            raise RuntimeError(f"give({n}) with {self.held} bytes held")
        self.held -= n


class PendingPerOwner:
    """How many asynchronous requests each owner has pending, at most ``limit`` each (owner None: the
    anonymous callers of an edge without keys, who share one count)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"pending limit must be >= 1, not {limit}")
        self.limit = limit
        self.rejected = 0
        self._counts: dict[str | None, int] = {}

    def count(self, owner: str | None) -> int:
        return self._counts.get(owner, 0)

    def full(self, owner: str | None) -> bool:
        """Whether ``owner`` is at its limit (a check that takes nothing)."""
        return self.count(owner) >= self.limit

    def check(self, owner: str | None) -> bool:
        """Whether ``owner`` has a slot free now, taking nothing (a refusal to come early); a no is counted as
        rejected."""
        if self.full(owner):
            self.rejected += 1
            return False
        return True

    def try_acquire(self, owner: str | None) -> bool:
        """Take one of ``owner``'s slots; False (and counted as rejected) at its limit."""
        if self.full(owner):
            self.rejected += 1
            return False
        self._counts[owner] = self.count(owner) + 1
        return True

    def release(self, owner: str | None) -> None:
        """Give back one slot of ``owner`` (once per successful ``try_acquire``); an owner at 0 is forgotten."""
        count = self.count(owner)
        if count <= 0:
            raise RuntimeError("release() without a matching try_acquire()")
        if count == 1:
            del self._counts[owner]
        else:
            self._counts[owner] = count - 1

    @property
    def total(self) -> int:
        """Pending asynchronous requests of every owner."""
        return sum(self._counts.values())


@dataclass(frozen=True, slots=True)
class BrokerSnapshot:
    """What ``BrokerState`` knows, for /health: status, since when (epoch s), the last error seen."""

    status: KafkaStatus
    since: float
    last_error: str | None
    last_ok: float | None
    failures: int

    def as_dict(self) -> dict[str, object]:
        return {
            "status": self.status,
            "since": self.since,
            "last_error": self.last_error,
            "last_ok": self.last_ok,
            "failures": self.failures,
        }


class BrokerState:
    """Kafka as the edge last saw it: one failure marks it down, one success marks it ok.

    ``failures`` counts failed observations in a row (0 while ok). ``clock`` returns epoch seconds.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.status: KafkaStatus = "ok"
        self.since = clock()
        self.last_error: str | None = None
        self.last_ok: float | None = None
        self.failures = 0

    @property
    def down(self) -> bool:
        return self.status == "down"

    def mark_ok(self) -> bool:
        """Record a success; True when this changes the status (down -> ok)."""
        now = self._clock()
        self.last_ok = now
        self.failures = 0
        if self.status == "ok":
            return False
        self.status, self.since = "ok", now
        return True

    def mark_down(self, error: str) -> bool:
        """Record a failure; True when this changes the status (ok -> down)."""
        self.last_error = error
        self.failures += 1
        if self.status == "down":
            return False
        self.status, self.since = "down", self._clock()
        return True

    def suspect(self, error: str) -> None:
        """Record an error that does not decide the status by itself (e.g. a produce that timed out)."""
        self.last_error = error

    def snapshot(self) -> BrokerSnapshot:
        return BrokerSnapshot(self.status, self.since, self.last_error, self.last_ok, self.failures)
