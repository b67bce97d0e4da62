"""What both agent loops share: the feed, the rebalance hooks, the failure stop and acknowledging through
the one ``AckTracker``.

A loop (``agents.loops.batch.BatchLoop`` or ``agents.loops.continuous.ContinuousLoop``) reads the events of a
``noack`` stream into a ``streams.batching.BatchBuffer``; it ``_take``s events (each is tracked at once, in
order), answers them, and calls ``_settled`` with the events whose replies or dead letters are settled:
the tracker acknowledges each partition's settled prefix. No loop calls ``ack`` itself.

Rebalance (``streams.app.RebalanceListener``; the agent's consumer calls these before Faust's own handling):

* ``on_assigned``: partitions assigned here; only their events are taken and acknowledged;
* ``revoking``: the partitions are about to be revoked. Their waiting events are dropped and their new events
  refused; the events already taken of them are given up to ``revoke_wait_s`` to settle (and so be
  acknowledged) before the tracker forgets them; the consumer then commits what was acknowledged. So a
  graceful rebalance (an agent joining, or one leaving by SIGTERM) answers nothing twice. What does not
  settle in time is forgotten unacknowledged: it is answered again by the partition's next owner;
* ``committed``: offsets the broker took; releases held for them run now (below);
* ``forget``: after the revoke's commit; releases still held for those partitions are dropped.

Releases after the commit (``agents.loops.releases``): what a batch consumed and a redelivery would still
need (vision's claim checks) is released only once the batch's offsets are committed, never when its replies
are merely acknowledged: an agent that dies in between has the batch delivered again, and it must find its
claims. ``_release_after_commit`` holds a settled batch's release; ``committed`` runs those now due.

A failure (a delivery retry that ran out, a bug) stops the loop: nothing waiting is run or acknowledged, and
the agent ends the process (``AgentStopped``) so the events are delivered again after the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, Hashable, Iterable, Mapping, Sequence
from typing import Generic, Protocol, TypeVar

from agents.loop import BatchProcessor
from agents.loops.acks import AckTracker
from agents.loops.releases import DeferredReleases
from streams.batching import BatchBuffer, BufferClosed, feed
from streams.codec import Record

log = logging.getLogger(__name__)

E = TypeVar("E")
E_contra = TypeVar("E_contra", contravariant=True)

REVOKE_POLL_S = 0.1  # also re-checks the failure flag this often


class AgentStopped(Exception):
    """The agent loop ended in a way that must end the process (a bounded retry ran out, or a bug)."""


class EventView(Protocol[E_contra]):
    """How a loop reads the runtime's events (``agents.wiring.FaustEvents`` for Faust's; fakes in tests)."""

    def record(self, event: E_contra) -> Record:
        """The event as a ``Record`` (topic, partition, offset, key, value, timestamp)."""

    def lane(self, event: E_contra) -> Hashable:
        """The event's partition."""

    def ack(self, event: E_contra) -> None:
        """Acknowledge the event to the runtime (only ``AckTracker`` calls it)."""

    def age(self, event: E_contra) -> float:
        """The event's timestamp (seconds): smaller is older."""

    def size(self, event: E_contra) -> int:
        """The event's value in bytes."""

    def deadline(self, event: E_contra) -> float | None:
        """The request's deadline on the monotonic clock, when it is cheap to tell (else None)."""


class LoopBase(Generic[E]):
    """Feed, rebalance, failure and acknowledgement for both loops; see the module docstring."""

    buffer: BatchBuffer[E]

    def __init__(
        self, processor: BatchProcessor, view: EventView[E], *, grace_s: float, revoke_wait_s: float | None = None
    ) -> None:
        """``revoke_wait_s``: how long a revoke lets taken events settle (default ``grace_s``)."""
        self.processor = processor
        self.view = view
        self.grace_s = grace_s
        self.revoke_wait_s = grace_s if revoke_wait_s is None else revoke_wait_s
        self._settling = asyncio.Event()  # set whenever events settle (a revoke waits on it)
        self.tracker: AckTracker[E] = AckTracker(view.lane, view.ack)
        self.failure: BaseException | None = None
        self._revoking: set[Hashable] = set()
        self.releases: DeferredReleases[list[dict[str, object]]] = DeferredReleases()
        self._releasing: set[asyncio.Task[None]] = set()

    def _accepts(self, event: E) -> bool:
        """The buffer's gate: only events of partitions assigned here, and not being revoked."""
        lane = self.view.lane(event)
        return self.tracker.assigned(lane) and lane not in self._revoking

    # -- rebalance ----------------------------------------------------------------------------------------

    def on_assigned(self, assigned: Iterable[Hashable]) -> None:
        self.tracker.assign(assigned)

    async def revoking(self, revoked: Iterable[Hashable]) -> None:
        """Drop what waits of ``revoked``, let what was taken of them settle (at most ``revoke_wait_s``),
        then forget them; returns when what may be committed of them is acknowledged."""
        lanes = set(revoked)
        self._revoking |= lanes
        try:
            dropped = self.buffer.drop(lambda e: self.view.lane(e) in lanes)
            held = self.tracker.held(lanes)
            if dropped or held:
                log.info("rebalance: dropped %d waiting events of revoked partitions; letting %d taken ones "
                         "settle (at most %.0fs)", len(dropped), held, self.revoke_wait_s)  # fmt: skip
            deadline = time.monotonic() + self.revoke_wait_s
            while self.tracker.held(lanes) and self.failure is None and (left := deadline - time.monotonic()) > 0:
                self._settling.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._settling.wait(), min(left, REVOKE_POLL_S))
            forgotten = self.tracker.revoke(lanes)
            if forgotten:
                log.warning("rebalance: %d taken events of revoked partitions did not settle within %.0fs; "
                            "left unacknowledged (answered again by their next owner)", forgotten,
                            self.revoke_wait_s)  # fmt: skip
        finally:
            self._revoking -= lanes

    def committed(self, offsets: Mapping[Hashable, int]) -> None:
        for inputs in self.releases.committed(offsets):
            self._release_now(inputs)

    def forget(self, revoked: Iterable[Hashable]) -> None:
        dropped = self.releases.revoke(revoked)
        if dropped:
            log.info("rebalance: %d batches' releases dropped with their partitions (their claims expire by TTL)",
                     dropped)  # fmt: skip

    # -- releases after the commit ------------------------------------------------------------------------

    def _release_after_commit(self, events: Iterable[E], inputs: list[dict[str, object]]) -> None:
        """Hold the release of a settled batch's ``inputs`` until its events' offsets are committed."""
        if not inputs:
            return
        last: dict[Hashable, int] = {}
        for event in events:
            lane, offset = self.view.lane(event), self.view.record(event).offset
            last[lane] = max(offset, last.get(lane, offset))
        for due in self.releases.add(last, inputs):
            self._release_now(due)

    def _release_now(self, inputs: list[dict[str, object]]) -> None:
        task = asyncio.ensure_future(self._release(inputs))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, inputs: list[dict[str, object]]) -> None:
        try:
            await self.processor.release(inputs)
        except Exception:  # a release is a clean-up: what it misses expires by its TTL
            log.exception("%s release of %d inputs failed (their claims expire by TTL)", self.processor.service,
                          len(inputs))  # fmt: skip

    # -- taking, settling, failing ------------------------------------------------------------------------

    def _track(self, events: Sequence[E]) -> list[E]:
        """Track taken events in order; those of a partition no longer assigned are dropped (stale)."""
        return [e for e in events if self.tracker.track(e)]

    def _settled(self, events: Iterable[E]) -> None:
        self.tracker.settle(events)
        self._settling.set()

    async def _feed(self, stream: object) -> None:
        """Put every event in the buffer; a failure of the stream is recorded (``run`` then stops)."""
        events: AsyncIterable[E] = stream.events()  # type: ignore[attr-defined]
        failure = await feed(events, self.buffer)
        if failure is not None:
            self.failure = failure
            log.critical("the agent's stream failed: %r", failure)

    def _start_feed(self, stream: object) -> asyncio.Task[None]:
        return asyncio.create_task(self._feed(stream.noack()), name="agent-feed")  # type: ignore[attr-defined]

    @staticmethod
    async def _stop_tasks(*tasks: asyncio.Task[None]) -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, BufferClosed):
                await task

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            log.critical("agent loop failed, stopping the process (its events are delivered again): %r", exc)
        self.buffer.drop(lambda e: True)  # never run (nor acknowledge) what waits: it is delivered again
        self.buffer.close()
