"""The one place that decides which consumed events may be acknowledged (and so committed).

Faust's consumer commits, per partition, the offset after the highest *contiguous run* of acknowledged
offsets, and it does not check that run starts at the committed offset: acknowledge offset 5 while 4 is still
running and a commit may skip 4 (``tests/test_llm_continuous.py`` shows it). So no loop acknowledges an event
itself. Each loop ``track``s every event it takes, in the order it takes them (a partition's events are
taken in offset order), and ``settle``s an event once its reply or dead letter is settled; ``AckTracker``
acknowledges only each partition's settled *prefix*:

* out of order: an event settled while an earlier one of its partition is still unsettled waits; it is
  acknowledged, in order, when the earlier ones are settled;
* partitions are independent: one slow event holds back only its own partition;
* assignment: only partitions ``assign``ed (and not ``revoke``d since) are tracked and acknowledged. A revoke
  forgets the partition's queue: what was taken before it is never acknowledged here, even if the partition
  comes back (its events are then new objects, fetched again from the committed offset);
* duplicates: an event settled twice, or never tracked, releases nothing.

Pure: no Kafka, no asyncio. Events are compared by identity; ``lane_of`` gives an event's partition and
``ack`` acknowledges one (Faust's ``event.ack()`` in the agent).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

E = TypeVar("E")


class _Entry(Generic[E]):
    __slots__ = ("event", "settled")

    def __init__(self, event: E) -> None:
        self.event = event
        self.settled = False


class AckTracker(Generic[E]):
    """Per partition, the events taken in order; acknowledges only each partition's settled prefix."""

    def __init__(self, lane_of: Callable[[E], Hashable], ack: Callable[[E], object]) -> None:
        self._lane_of = lane_of
        self._ack = ack
        self._assigned: set[Hashable] = set()
        self._lanes: dict[Hashable, deque[_Entry[E]]] = {}
        self.acked = 0

    # -- assignment -------------------------------------------------------------------------------------

    def assign(self, lanes: Iterable[Hashable]) -> None:
        """Partitions now assigned to this consumer (added to those already assigned)."""
        self._assigned.update(lanes)

    def revoke(self, lanes: Iterable[Hashable]) -> int:
        """Partitions no longer assigned: forget what was taken of them. Returns how many unsettled or
        unacknowledged events were forgotten (they are delivered again, here or to the new owner)."""
        forgotten = 0
        for lane in lanes:
            self._assigned.discard(lane)
            forgotten += len(self._lanes.pop(lane, ()))
        return forgotten

    def assigned(self, lane: Hashable) -> bool:
        return lane in self._assigned

    # -- events -----------------------------------------------------------------------------------------

    def track(self, event: E) -> bool:
        """Note an event taken for processing, behind those taken before it in its partition.

        Returns:
            False when its partition is not assigned (the event must not be processed: it is stale, fetched
            before a revoke, and is delivered again from the committed offset).
        """
        lane = self._lane_of(event)
        if lane not in self._assigned:
            return False
        self._lanes.setdefault(lane, deque()).append(_Entry(event))
        return True

    def settle(self, events: Iterable[E]) -> list[E]:
        """Mark ``events`` settled (their replies or dead letters are written); acknowledge, in order, every
        event of their partitions that is now part of a settled prefix. Returns those acknowledged."""
        touched: list[Hashable] = []
        for event in events:
            lane = self._lane_of(event)
            queue = self._lanes.get(lane)
            if queue is None:
                continue  # never tracked, or its partition was revoked since
            for entry in queue:
                if entry.event is event:
                    entry.settled = True
                    touched.append(lane)
                    break
        released: list[E] = []
        for lane in dict.fromkeys(touched):
            queue = self._lanes[lane]
            while queue and queue[0].settled:
                event = queue.popleft().event
                self._ack(event)
                released.append(event)
        self.acked += len(released)
        return released

    def held(self, lanes: Iterable[Hashable] | None = None) -> int:
        """Events tracked and not yet acknowledged (of ``lanes``, or of every partition)."""
        if lanes is None:
            return sum(len(q) for q in self._lanes.values())
        return sum(len(self._lanes.get(lane, ())) for lane in lanes)
