"""Natural micro-batching: whatever has arrived when the model is free, up to a cap.

``BatchBuffer`` sits between the consumer (which ``put``s events as they are fetched) and the batch loop
(which ``take``s a batch whenever the model is free). It knows nothing of Kafka:

* ``take`` waits only while the buffer is empty; the moment one item is there it returns everything
  buffered, up to ``max_batch``. A lone event therefore runs at once, and under load batches fill by
  themselves while the model works on the previous one.
* an optional linger (``linger_s > 0``, off by default) waits for more items after the first one, measured
  from the first item's arrival and never past the nearest deadline among the items taken
  (``deadline_of``); ``linger_s == 0`` means "don't wait", never "wait until full".
* ``put`` blocks while ``capacity`` items wait, which is the backpressure towards the consumer: the
  agent never holds more than ``capacity + max_batch`` events in memory.
* ``drop(pred)`` removes waiting items (a rebalance revoked their partitions: the new owner will serve
  them, so this process must neither run nor acknowledge them).
* ``close()`` ends it: ``put`` refuses, ``take`` returns what remains and then ``[]``.

The clock is injectable (``clock`` returns seconds) so the linger rules are unit-tested without sleeping
on a wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BufferClosed(RuntimeError):
    """``put`` on a closed buffer."""


class BatchBuffer(Generic[T]):
    """A bounded FIFO that hands out natural micro-batches; see the module docstring."""

    def __init__(
        self,
        max_batch: int,
        *,
        capacity: int | None = None,
        linger_s: float = 0.0,
        deadline_of: Callable[[T], float | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        Args:
            max_batch: most items one ``take`` returns.
            capacity: most items waiting before ``put`` blocks (default ``2 * max_batch``).
            linger_s: after the first item, wait up to this long for more (0 = never wait).
            deadline_of: an item's deadline on ``clock``'s scale (or None); the linger ends before it.
            clock: seconds, monotonic.
        """
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self.capacity = capacity if capacity is not None else 2 * max_batch
        self.linger_s = max(0.0, linger_s)
        self._deadline_of = deadline_of
        self._clock = clock
        self._items: deque[tuple[float, T]] = deque()
        self._changed = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def _notify(self) -> None:
        self._changed.set()

    async def _wait_change(self, within_s: float | None = None) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), within_s)

    async def put(self, item: T) -> None:
        """Add one item, waiting while the buffer is at capacity.

        Raises:
            BufferClosed: the buffer was closed (before or while waiting).
        """
        while not self._closed and len(self._items) >= self.capacity:
            await self._wait_change()
        if self._closed:
            raise BufferClosed("buffer closed")
        self._items.append((self._clock(), item))
        self._notify()

    async def take(self) -> list[T]:
        """The next batch: at least one item, unless the buffer is closed and empty (then ``[]``)."""
        while not self._items:
            if self._closed:
                return []
            await self._wait_change()
        if self.linger_s > 0 and len(self._items) < self.max_batch:
            await self._linger()
        batch = [self._items.popleft()[1] for _ in range(min(self.max_batch, len(self._items)))]
        self._notify()  # room for put()
        return batch

    async def _linger(self) -> None:
        first_arrival = self._items[0][0]
        while not self._closed and len(self._items) < self.max_batch:
            until = first_arrival + self.linger_s
            nearest = self._nearest_deadline()
            if nearest is not None:
                until = min(until, nearest)
            remaining = until - self._clock()
            if remaining <= 0:
                return
            await self._wait_change(remaining)

    def _nearest_deadline(self) -> float | None:
        if self._deadline_of is None:
            return None
        deadlines = [d for _, item in list(self._items)[: self.max_batch] if (d := self._deadline_of(item)) is not None]
        return min(deadlines) if deadlines else None

    def drop(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove and return the waiting items for which ``predicate`` is true."""
        kept: deque[tuple[float, T]] = deque()
        dropped: list[T] = []
        for arrival, item in self._items:
            if predicate(item):
                dropped.append(item)
            else:
                kept.append((arrival, item))
        self._items = kept
        if dropped:
            self._notify()
        return dropped

    def close(self) -> None:
        """Refuse new items; ``take`` drains what is left, then returns ``[]``."""
        self._closed = True
        self._notify()
