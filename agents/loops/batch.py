"""The batch loop: natural micro-batches through ``BatchProcessor``, the next computed while one is delivered.

* Events are read from a ``noack`` stream into a ``BatchBuffer``: Faust acknowledges nothing by itself, not on
  close, not on an exception. An event is acknowledged only after ``BatchProcessor`` settled its reply or
  dead letter, through the loop's ``AckTracker`` (``agents.loops.acks``: each partition's settled prefix).
* Overlap: a batch is computed (decoded, checked, looked up in the cache, run through the model:
  ``BatchProcessor.compute``) while the previous batch's replies are produced and acknowledged (``deliver``)
  in the background. At most one delivery is outstanding, so replies leave in batch order. A delivery that
  fails stops the loop (and the process).
* Graceful stop (SIGTERM/SIGINT; Faust cancels the agent): the buffer takes no more events; the batch in hand
  and the delivery outstanding are finished within ``grace_s`` and acknowledged (Faust's consumer commits
  acknowledged offsets on stop, then leaves the group). Past the grace period they are abandoned
  unacknowledged and are delivered again to whichever agent owns their partitions next.
* Lanes (``bulk``): interactive events first, bulk fills the rest of each batch (``streams.batching``). The two
  lanes are different topics, so different partitions: acknowledgement and commits stay per partition.
* Rebalance: see ``agents.loops.base`` (what was taken settles before the partition goes, then is committed).
* Anything that escapes (a delivery retry that ran out, a bug) stops the process with an error instead of
  letting Faust restart the agent past events it holds unacknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TypeVar

from agents.errors import DeliveryError
from agents.loop import BatchProcessor, Settlement
from agents.loops.base import AgentStopped, EventView, LoopBase
from streams.batching import BatchBuffer, BulkLane
from streams.codec import Record

log = logging.getLogger(__name__)

E = TypeVar("E")

WAITING_BATCHES = 2  # with max_batch_bytes: the buffer holds at most this many batches' bytes


class BatchLoop(LoopBase[E]):
    """Feeds a stream into a ``BatchBuffer`` and runs one batch at a time; see the module docstring."""

    def __init__(
        self,
        processor: BatchProcessor,
        view: EventView[E],
        *,
        max_batch: int,
        linger_ms: int,
        grace_s: float,
        max_batch_bytes: int | None = None,
        revoke_wait_s: float | None = None,
        bulk: BulkLane[E] | None = None,
    ) -> None:
        """``bulk``: the bulk lane (``streams.batching.BulkLane``): a batch takes every waiting interactive
        event first and fills the rest with bulk, bulk keeping its ``min_share`` of the slots."""
        super().__init__(processor, view, grace_s=grace_s, revoke_wait_s=revoke_wait_s)
        # Oldest first across partitions (each partition in order), within what waits here; a batch's
        # events together stay under max_batch_bytes when it is set (always one event at least), and what
        # waits stays under WAITING_BATCHES batches' bytes (memory: streams.app.stream_buffer_events).
        self.buffer = BatchBuffer(
            max_batch,
            capacity=4 * max_batch,
            linger_s=linger_ms / 1000.0,
            deadline_of=view.deadline if linger_ms > 0 else None,
            lane_of=view.lane,
            age_of=view.age,
            cost_of=view.size if max_batch_bytes else None,
            max_cost=max_batch_bytes,
            accept=self._accepts,
            max_waiting_cost=WAITING_BATCHES * max_batch_bytes if max_batch_bytes else None,
            bulk=bulk,
        )
        self._delivering: asyncio.Task[None] | None = None

    async def run(self, stream: object) -> None:
        """Serve until the stream ends, the task is cancelled (graceful stop) or something fails.

        Raises:
            AgentStopped: a delivery ran out of retries, or a bug; nothing it holds is acknowledged.
        """
        feeder = self._start_feed(stream)
        try:
            while events := await self.buffer.take():
                events = self._track(events)
                if events:
                    await self._handle(events)
            try:
                await self._wait_delivery()
            except Exception as exc:
                self._fail(exc)
                raise AgentStopped(str(exc)) from exc
            if self.failure is not None:
                raise AgentStopped(str(self.failure))
        except asyncio.CancelledError:
            await self._finish_delivery_within(self.grace_s)
            raise
        finally:
            self.buffer.close()
            await self._stop_tasks(feeder)

    async def _handle(self, events: list[E]) -> None:
        work = asyncio.create_task(self._step(events), name="agent-batch")
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            if work.done():
                raise
            log.info("stopping: finishing the batch in hand (%d events) within %.0fs", len(events), self.grace_s)
            started = time.monotonic()
            try:
                await asyncio.wait_for(work, self.grace_s)
                await self._finish_delivery_within(self.grace_s - (time.monotonic() - started))
                log.info("batch in hand answered and acknowledged")
            except TimeoutError:
                self._abandon_delivery()
                log.warning("grace period over: %d events left unacknowledged (delivered again)", len(events))
            except Exception:
                log.exception("batch in hand failed while stopping")
            raise
        except Exception as exc:
            self._fail(exc)
            raise AgentStopped(str(exc)) from exc

    async def _step(self, events: list[E]) -> None:
        """Compute one batch while the previous one is delivered; then start its own delivery."""
        records = [self.view.record(e) for e in events]
        try:
            settlement: Settlement | None = await self.processor.compute(records)
        except Exception:  # policy: isolate the poison record, never stall the partition
            log.exception("%s batch of %d failed; retrying its records one at a time", self.processor.service,
                          len(records))  # fmt: skip
            settlement = None
        await self._wait_delivery()  # replies leave in batch order; at most one delivery outstanding
        if settlement is None:
            inputs = await self.processor.isolate(records)
            self._settled(events)
            self._release_after_commit(events, inputs)
            return
        task = asyncio.create_task(self._deliver(events, records, settlement), name="agent-deliver")
        task.add_done_callback(self._delivery_done)
        self._delivering = task

    async def _deliver(self, events: list[E], records: list[Record], settlement: Settlement) -> None:
        try:
            inputs = await self.processor.deliver(settlement)
        except DeliveryError:
            raise
        except Exception:  # a bug past the model (cache write): redo the records one at a time
            log.exception("%s delivery of a batch of %d failed; redoing its records one at a time",
                          self.processor.service, len(records))  # fmt: skip
            inputs = await self.processor.isolate(records)
        self._settled(events)
        self._release_after_commit(events, inputs)

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        """A delivery that failed while the loop waited for events stops the loop at once."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._fail(exc)

    async def _wait_delivery(self) -> None:
        """Wait for the outstanding delivery; its failure propagates."""
        task, self._delivering = self._delivering, None
        if task is not None:
            await task

    def _abandon_delivery(self) -> None:
        task, self._delivering = self._delivering, None
        if task is not None and not task.done():
            task.cancel()
            log.warning("grace period over: a delivery was abandoned unacknowledged (delivered again)")

    async def _finish_delivery_within(self, seconds: float) -> None:
        """While stopping: let the outstanding delivery finish within ``seconds``, else abandon it."""
        task, self._delivering = self._delivering, None
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), max(seconds, 0.0))
        except TimeoutError:
            task.cancel()
            log.warning("grace period over: a delivery was abandoned unacknowledged (delivered again)")
        except Exception:
            log.exception("the outstanding delivery failed while stopping")
