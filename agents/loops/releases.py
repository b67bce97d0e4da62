"""Work that may run only once a batch's offsets are committed: releasing what a redelivery would still need.

Vision's claim checks (``streams.claimcheck``) hold an upload's bytes in Redis until the batch that used
them is answered. Deleting them as soon as the replies are acknowledged by the broker is too early: the
event's offset is committed later (Faust commits acknowledged offsets periodically, and on a rebalance or a
stop), and an agent that dies in between has its batch delivered again, to find the claim gone and answer
``claim_check_missing``. So a batch's release waits here until every partition it touched has a committed
offset past the batch's last event there.

``DeferredReleases`` is pure (no Kafka, no Redis): the loop ``add``s a settled batch's release with the
highest offset it holds per partition; the consumer tells it what was ``committed`` (Kafka's committed offset
is the next offset to read, so offset ``o`` is committed once the committed offset is ``> o``), and it
returns the releases now due, oldest first. A ``revoke`` drops the pending releases of partitions that moved:
their events may be answered again by the new owner, which then needs the claims (they expire by their TTL).
What is pending when the process stops is never released here; TTLs bound it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class _Pending(Generic[T]):
    last_offsets: dict[Hashable, int]  # per partition, the highest offset of the batch there
    work: T


class DeferredReleases(Generic[T]):
    """Releases held until their partitions' offsets are committed; see the module docstring."""

    def __init__(self) -> None:
        self._pending: list[_Pending[T]] = []
        self._committed: dict[Hashable, int] = {}

    def add(self, last_offsets: Mapping[Hashable, int], work: T) -> list[T]:
        """Hold ``work`` until each partition of ``last_offsets`` has committed past its offset there.

        Returns:
            ``[work]`` when that is already so (a commit raced ahead), else ``[]``.
        """
        entry = _Pending(dict(last_offsets), work)
        if self._due(entry):
            return [work]
        self._pending.append(entry)
        return []

    def committed(self, offsets: Mapping[Hashable, int]) -> list[T]:
        """Record committed offsets (the next offset to read, per partition); returns the work now due."""
        for lane, offset in offsets.items():
            if offset > self._committed.get(lane, -1):
                self._committed[lane] = offset
        due = [p for p in self._pending if self._due(p)]
        if due:
            self._pending = [p for p in self._pending if not self._due(p)]
        return [p.work for p in due]

    def revoke(self, lanes: Iterable[Hashable]) -> int:
        """Forget ``lanes``: pending work touching any of them is dropped (never released here). Returns how
        many were dropped."""
        gone = set(lanes)
        for lane in gone:
            self._committed.pop(lane, None)
        kept = [p for p in self._pending if not gone.intersection(p.last_offsets)]
        dropped = len(self._pending) - len(kept)
        self._pending = kept
        return dropped

    def __len__(self) -> int:
        return len(self._pending)

    def _due(self, entry: _Pending[T]) -> bool:
        return all(self._committed.get(lane, -1) > offset for lane, offset in entry.last_offsets.items())
