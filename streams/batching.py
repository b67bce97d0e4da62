"""Natural micro-batching: whatever has arrived when the model is free, up to a cap.

``BatchBuffer`` sits between the consumer (which ``put``s events as they are fetched) and the batch loop
(which ``take``s a batch whenever the model is free). It knows nothing of Kafka:

* ``take`` waits only while the buffer is empty; the moment one item is there it returns everything
  buffered, up to ``max_batch``. A lone event therefore runs at once, and under load batches fill by
  themselves while the model works on the previous one.
* an optional linger (``linger_s > 0``, off by default) waits for more items after the first one, measured
  from the first item's arrival and never past the nearest deadline among the items taken
  (``deadline_of``); ``linger_s == 0`` means "don't wait", never "wait until full".
* ``put`` blocks while ``capacity`` items wait, or (``max_waiting_cost`` given) while the waiting items'
  cost has reached it (one item is always let in), which is the backpressure towards the consumer: the
  buffer never holds more than ``capacity`` items, nor more than ``max_waiting_cost`` plus one item's cost.
* ``drop(pred)`` removes waiting items (a rebalance revoked their partitions: the new owner will serve
  them, so this process must neither run nor acknowledge them); ``accept`` (optional) is asked about each
  item as it is put, after any wait for room and with no await in between, and an item it refuses is
  dropped (a partition being revoked takes no new items).
* ``close()`` ends it: ``put`` refuses, ``take`` returns what remains and then ``[]``.
* fairness (``lane_of`` and ``age_of`` given, e.g. the Kafka partition and the record's timestamp): a batch
  is taken oldest-first across lanes, each lane in its own order (a k-way merge on each lane's head), so a
  lane the consumer happened to fetch in a large chunk cannot hold back older items of the others, and
  the items of one partition never overtake each other.
* cost (``cost_of`` and ``max_cost`` given, e.g. bytes of an image or characters of a text): a batch stops
  before its total cost would pass ``max_cost``; the first item is always taken, however costly.
* lanes (``bulk`` given, a ``BulkLane``): each item is interactive or bulk. A batch takes the waiting
  interactive items first (up to ``max_batch``) and fills the rest with bulk, so an interactive item never
  waits behind bulk ones that arrived before it. With no interactive traffic, bulk batches are full
  (``max_batch``): bulk alone runs at the pipeline's full rate. While interactive traffic is live (a take saw
  interactive items within the last ``live_s``), a batch carries at most ``fill_while_interactive`` bulk
  items beyond bulk's credit: an interactive request arriving meanwhile waits for a short batch, not a full
  one (a batch's duration grows with its size: what the wait of the next interactive request is made of), so
  interactive latency stays near its idle value and bulk takes the capacity that is left. Starvation is
  bounded by a credit (deficit round robin): while both lanes wait, every take adds ``min_share`` x the
  batch's size to bulk's credit, and a take holds ``floor(credit)`` slots for bulk before interactive fills
  the rest; what bulk takes is paid from the credit. So bulk gets at least ``min_share`` of the items taken
  (rounded down) while it waits, whatever the interactive load, and this also holds for takes of one slot
  (the continuous loop admits a row at a time: every ``1 / min_share``-th row is bulk). The two classes have their
  own room: interactive items are bounded by ``capacity`` (and ``max_waiting_cost``), bulk items by the lane's own
  ``capacity``, so a bulk flood never blocks the ``put`` of an interactive item. ``BulkLane.gate(True)`` is called
  when ``pause_at`` bulk items (or ``max_waiting_cost`` of bulk bytes) wait, ``gate(False)`` once ``resume_at`` or
  fewer do: the consumer stops fetching bulk meanwhile (``streams.app.CommittingConsumer.pause_topics``), so bulk
  waits in Kafka, not in memory, and the feed never stalls on it.
  Bulk yields (``BulkLane.yield_ratio`` > 0): while interactive traffic is live and only bulk waits, ``take``
  waits up to ``yield_ratio`` x the last batch's duration (the time since the previous ``take`` returned: what
  the loop spent on that batch; at most ``yield_max_s``) before it hands out a bulk-only batch, and returns at
  once when an interactive item arrives meanwhile. A short model-free gap after each bulk batch: the edge and
  the broker get the CPU that an interactive request's hops need, and the request seldom finds a bulk batch
  running (on 2 shared cores, one closed-loop client's p50 was 1.8x its idle value with back-to-back bulk
  batches). It costs bulk at most ``1 / (1 + yield_ratio)`` of its rate, and only while interactive traffic is
  live; with none, bulk batches run back to back.

The clock is injectable (``clock`` returns seconds) so the linger rules are unit-tested without sleeping
on a wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

BULK_COST_SLACK = 4  # a bulk put blocks (a safety net behind the gate) at this many times max_waiting_cost
CREDIT_EPSILON = 1e-9  # 10 takes of 0.1 add up to 0.9999999999999999


@dataclass(frozen=True, slots=True)
class BulkLane(Generic[T]):
    """How a ``BatchBuffer`` tells bulk items from interactive ones and bounds them (module docstring).

    ``capacity`` is a safety net: with a ``gate`` that stops the fetching of bulk, no more than ``pause_at``
    plus what the consumer had already fetched should ever wait; a bulk ``put`` blocks (and with it the
    feed, interactive items behind included) only past ``capacity``.
    """

    is_bulk: Callable[[T], bool]
    min_share: float = 0.1
    fill_while_interactive: int = 1
    live_s: float = 1.0
    pause_at: int = 64
    resume_at: int = 32
    capacity: int = 4096
    gate: Callable[[bool], None] | None = None
    yield_ratio: float = 0.0
    yield_max_s: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_share <= 1.0:
            raise ValueError("min_share must be within [0, 1]")
        if self.fill_while_interactive < 0 or self.live_s < 0 or self.yield_ratio < 0 or self.yield_max_s < 0:
            raise ValueError("fill_while_interactive, live_s, yield_ratio and yield_max_s must be >= 0")
        if not 0 <= self.resume_at < self.pause_at <= self.capacity:
            raise ValueError("need 0 <= resume_at < pause_at <= capacity")


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
        lane_of: Callable[[T], Hashable] | None = None,
        age_of: Callable[[T], float] | None = None,
        cost_of: Callable[[T], float] | None = None,
        max_cost: float | None = None,
        accept: Callable[[T], bool] | None = None,
        max_waiting_cost: float | None = None,
        bulk: BulkLane[T] | None = None,
    ) -> None:
        """
        Args:
            max_batch: most items one ``take`` returns.
            capacity: most items waiting before ``put`` blocks (default ``2 * max_batch``).
            linger_s: after the first item, wait up to this long for more (0 = never wait).
            deadline_of: an item's deadline on ``clock``'s scale (or None); the linger ends before it.
            clock: seconds, monotonic.
            lane_of, age_of: an item's lane (partition) and age key (smaller = older); both or neither.
            cost_of, max_cost: an item's cost and the most one batch may carry; both or neither.
            accept: whether an item being put is taken (False: dropped); checked after the wait for room.
            max_waiting_cost: ``put`` waits while the waiting items' cost reaches this (needs ``cost_of``).
            bulk: the bulk lane (None: every item is interactive, one FIFO as before).
        """
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if (lane_of is None) != (age_of is None) or (cost_of is None) != (max_cost is None):
            raise ValueError("lane_of needs age_of and cost_of needs max_cost (and the other way round)")
        if max_waiting_cost is not None and cost_of is None:
            raise ValueError("max_waiting_cost needs cost_of")
        self.max_waiting_cost = max_waiting_cost
        self._lane_of = lane_of
        self._age_of = age_of
        self._cost_of = cost_of
        self.max_cost = max_cost
        self.max_batch = max_batch
        self.capacity = capacity if capacity is not None else 2 * max_batch
        self.linger_s = max(0.0, linger_s)
        self._deadline_of = deadline_of
        self._accept = accept
        self._clock = clock
        self._items: deque[tuple[float, T]] = deque()
        self._changed = asyncio.Event()
        self._closed = False
        self.bulk = bulk
        self._bulk_waiting = 0
        self._bulk_paused = False
        self._credit = 0.0
        self._interactive_at: float | None = None  # when interactive items were last seen by a take
        self._took_at: float | None = None  # when the last take returned (the loop's batch started)
        self.yields = 0  # takes that waited for interactive items before a bulk-only batch (tests, figures)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def bulk_waiting(self) -> int:
        """Bulk items waiting."""
        return self._bulk_waiting

    @property
    def bulk_paused(self) -> bool:
        """Whether the gate was last told to stop bulk."""
        return self._bulk_paused

    def _is_bulk(self, item: T) -> bool:
        return self.bulk is not None and self.bulk.is_bulk(item)

    def _notify(self) -> None:
        self._changed.set()

    async def _wait_change(self, within_s: float | None = None) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), within_s)

    async def put(self, item: T) -> bool:
        """Add one item, waiting while the buffer is at capacity. Returns False if ``accept`` refused it.

        Raises:
            BufferClosed: the buffer was closed (before or while waiting).
        """
        bulk = self._is_bulk(item)
        while not self._closed and self._full(bulk):
            await self._wait_change()
        if self._closed:
            raise BufferClosed("buffer closed")
        if self._accept is not None and not self._accept(item):
            return False
        self._items.append((self._clock(), item))
        if bulk:
            self._bulk_waiting += 1
            self._check_gate()
        self._notify()
        return True

    def _full(self, bulk: bool) -> bool:
        if self.bulk is None:
            return len(self._items) >= self.capacity or self._cost_full()
        if bulk:
            slack = BULK_COST_SLACK * self.max_waiting_cost if self.max_waiting_cost is not None else None
            return self._bulk_waiting >= self.bulk.capacity or self._cost_full(True, slack)
        return len(self._items) - self._bulk_waiting >= self.capacity or self._cost_full(False)

    def _cost_full(self, bulk: bool | None = None, limit: float | None = None) -> bool:
        """Whether the waiting items' cost (of one class, when ``bulk`` is not None) reached ``limit``
        (default ``max_waiting_cost``)."""
        limit = self.max_waiting_cost if limit is None else limit
        if limit is None or self._cost_of is None or not self._items:
            return False
        items = (i for _, i in self._items if bulk is None or self._is_bulk(i) == bulk)
        return sum(self._cost_of(i) for i in items) >= limit

    def _check_gate(self) -> None:
        """Tell the gate to stop bulk at ``pause_at`` (or a full bulk cost), to take it again at ``resume_at``."""
        lane = self.bulk
        if lane is None or lane.gate is None:
            return
        if not self._bulk_paused:
            if self._bulk_waiting >= lane.pause_at or (self._bulk_waiting and self._cost_full(True)):
                self._bulk_paused = True
                lane.gate(True)
        elif self._bulk_waiting <= lane.resume_at and not self._cost_full(True):
            self._bulk_paused = False
            lane.gate(False)

    async def take(self) -> list[T]:
        """The next batch: at least one item, unless the buffer is closed and empty (then ``[]``)."""
        while not self._items:
            if self._closed:
                return []
            await self._wait_change()
        if self.bulk is not None and self.bulk.yield_ratio > 0:
            await self._yield_to_interactive(self.bulk)
        if self.linger_s > 0 and len(self._items) < self.max_batch:
            await self._linger()
        batch = self._pick()
        self._notify()  # room for put()
        self._took_at = self._clock()
        return batch

    async def _yield_to_interactive(self, lane: BulkLane[T]) -> None:
        """Bulk yields (module docstring): while interactive traffic is live and only bulk waits, wait up to
        ``yield_ratio`` x the last batch's duration for an interactive item (returns at once when one comes)."""
        now = self._clock()
        live = self._interactive_at is not None and now - self._interactive_at <= lane.live_s
        if not live or self._took_at is None or self._bulk_waiting < len(self._items):
            return
        until = now + min(lane.yield_ratio * (now - self._took_at), lane.yield_max_s)
        self.yields += 1
        while not self._closed and self._bulk_waiting == len(self._items):
            remaining = until - self._clock()
            if remaining <= 0:
                return
            await self._wait_change(remaining)

    def _pick(self) -> list[T]:
        """Remove and return the next batch (at least one item; the buffer is not empty)."""
        if self.bulk is None and self._lane_of is None and self._cost_of is None:
            return [self._items.popleft()[1] for _ in range(min(self.max_batch, len(self._items)))]
        order = self._lanes_order() if self.bulk is not None else self._fair_order(range(len(self._items)))
        chosen: list[int] = []
        cost = 0.0
        for n in order:
            if len(chosen) == self.max_batch:
                break
            if self._cost_of is not None and self.max_cost is not None:
                item_cost = self._cost_of(self._items[n][1])
                if chosen and cost + item_cost > self.max_cost:
                    break
                cost += item_cost
            chosen.append(n)
        taken = set(chosen)
        batch = [self._items[n][1] for n in chosen]
        self._items = deque(entry for n, entry in enumerate(self._items) if n not in taken)
        if self.bulk is not None:
            bulk_taken = sum(1 for item in batch if self._is_bulk(item))
            self._bulk_waiting -= bulk_taken
            self._credit = max(0.0, self._credit - bulk_taken) if self._bulk_waiting else 0.0
            self._check_gate()
        return batch

    def _lanes_order(self) -> list[int]:
        """Positions of the next batch with lanes: bulk's credited slots, then interactive, then bulk (no more
        than ``fill_while_interactive`` bulk beyond its credit while interactive traffic is live)."""
        assert self.bulk is not None
        lane = self.bulk
        interactive: list[int] = []
        bulk: list[int] = []
        for n, (_, item) in enumerate(self._items):
            (bulk if self._is_bulk(item) else interactive).append(n)
        now = self._clock()
        if interactive:
            self._interactive_at = now
        live = self._interactive_at is not None and now - self._interactive_at <= lane.live_s
        size = min(self.max_batch, len(interactive) + len(bulk))
        if live:
            size = min(size, len(interactive) + lane.fill_while_interactive)
        if bulk and interactive:  # contention: bulk earns its share of the batch (at most one batch's worth kept)
            self._credit = min(self._credit + lane.min_share * size, float(self.max_batch))
        held = min(int(self._credit + CREDIT_EPSILON), len(bulk), self.max_batch)
        first = self._fair_order(interactive)[: max(size - held, 0)]
        rest = self._fair_order(bulk)[: max(size, held) - len(first)]
        return rest[:held] + first + rest[held:]

    def _fair_order(self, positions: Iterable[int]) -> list[int]:
        """``positions`` (at most ``max_batch``), merged oldest-head-first across lanes, each lane in order (as
        given when there are no lanes)."""
        if self._lane_of is None or self._age_of is None:
            return list(positions)[: self.max_batch]
        lanes: dict[Hashable, deque[int]] = {}
        for n in positions:
            lanes.setdefault(self._lane_of(self._items[n][1]), deque()).append(n)
        ages = {n: self._age_of(self._items[n][1]) for queue in lanes.values() for n in queue}
        order: list[int] = []
        while lanes and len(order) < self.max_batch:
            lane = min(lanes, key=lambda key: (ages[lanes[key][0]], lanes[key][0]))
            order.append(lanes[lane].popleft())
            if not lanes[lane]:
                del lanes[lane]
        return order

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
            self._bulk_waiting = sum(1 for _, item in kept if self._is_bulk(item))
            self._check_gate()
            self._notify()
        return dropped

    def close(self) -> None:
        """Refuse new items; ``take`` drains what is left, then returns ``[]``."""
        self._closed = True
        self._notify()


async def feed(events: AsyncIterable[T], buffer: BatchBuffer[T]) -> BaseException | None:
    """Put every item of ``events`` in ``buffer``; when the source ends or fails, close the buffer (so the
    consumer drains what it holds and ends too, instead of waiting forever on a dead feeder) and return the
    failure, if any. Cancellation and a closed buffer propagate."""
    try:
        async for item in events:
            await buffer.put(item)
    except (asyncio.CancelledError, BufferClosed):
        raise
    except Exception as exc:  # noqa: BLE001  (returned: the caller stops its process)
        return exc
    finally:
        buffer.close()
    return None
