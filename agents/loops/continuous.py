"""The agent loop for a step-wise runner (the LLM with ``llm.batching=continuous``): continuous batching.

``ContinuousLoop`` replaces ``agents.loops.batch.BatchLoop`` for a runner that has an engine (``stepwise``).
Events are read from a ``noack`` Faust stream into a bounded FIFO. Two tasks share the engine:

* the **admitter**: whenever the engine has a free row slot, it takes whatever waits and admits it
  (``BatchProcessor.admit``: decode, checks, reply-topic policy and existence, deadlines, unknown tasks, the
  cache, exactly as the batch loop does); the rest become engine rows (``engine.add`` is thread-safe and
  the row joins at the next step). Admission can wait (a metadata check of an unknown reply topic, up to
  ``agents.sink.METADATA_CHECK_S``; Redis lookups), so it never runs on the decode path;
* the **stepper**: runs ``engine.step()`` on a dedicated worker thread, one decode step after the other while
  rows are active, without handing each step back to the event loop (the thread posts every step's report
  to the loop and goes on), and the loop answers the rows that finish. Admission never pauses decoding.

Guarantees (the batch loop's, for rows that finish out of order):

* Acknowledgement: an event is acknowledged only after its own final reply or dead letter is settled
  (``BatchProcessor.deliver``: retries, dead letters, cache write, kept results) AND every earlier event
  of its partition taken by this loop is too: every ack goes through the loop's ``AckTracker``
  (``agents.loops.acks``).
* Streaming (``RequestEvent.stream`` with a ``reply_to``): after each decode step, the deltas of the
  streaming rows are grouped by reply topic (and task) into ONE ``PartialBatchEvent`` each, key = the
  worker id, produced without waiting for the broker's ack (at most ``MAX_PARTIALS_OUTSTANDING`` acks
  outstanding; a failed partial is only logged: the final reply is authoritative). ``attempt`` is a uuid
  per row admission and ``seq`` counts that attempt's deltas.
* Cancel: at most every ``CANCEL_POLL_S`` one ``MGET`` of the cancel keys (``streams.cancel.cancel_key``) of
  every active row, streaming or not, through the Redis breaker; a row whose key is set is stopped and
  answered ``cancelled`` (the edge sets the key when a client goes away or it answers 504). Redis away:
  decoding goes on, cancels are not seen (logged once per outage).
* Graceful stop (SIGTERM; Faust cancels the agent): nothing new is admitted, active rows finish within
  ``grace_s``, their replies are settled and acknowledged; past the grace period what is unfinished is
  left unacknowledged (delivered again).
* Rebalance: ``agents.loops.base`` (rows of a revoked partition get ``revoke_wait_s`` to finish and be
  acknowledged before the partition goes; past it they finish and reply, unacknowledged).
* A model failure fails the rows of that step (``model_error``); an engine that raises is replaced and
  its rows are answered ``model_error``. A delivery that runs out of retries, or a bug, stops the process
  (``AgentLoopFailed``) without acknowledging what it holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, TypeVar

from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanContext, SpanKind
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agents.loop import BatchProcessor, Settlement, _Pending
from agents.loops.base import AgentStopped, EventView, LoopBase
from agents.runner import Failure, Item
from schemas import ErrorCode, PartialBatchEvent, PartialDelta
from streams import tracing
from streams.batching import BatchBuffer, BulkLane
from streams.cancel import cancel_key, cancels
from streams.codec import encode
from streams.redis import guarded

if TYPE_CHECKING:
    from agents.llm_rows import Delta, RowRequest, StepEngine, StepReport

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.1
MAX_PARTIALS_OUTSTANDING = 64
E = TypeVar("E")


class StepRunner(Protocol):
    """A runner the continuous loop can drive (``agents.llm_torch.LlmRunner``, ``agents.llm_llama.LlamaRunner``)."""

    continuous: bool

    def make_engine(self) -> StepEngine: ...

    def row_request(self, key: str, item: Item, *, stream: bool = False) -> RowRequest | Failure: ...


def stepwise(runner: object) -> TypeGuard[StepRunner]:
    """Whether ``runner`` asks for the continuous loop (has an engine and has it switched on)."""
    return getattr(runner, "continuous", False) is True and callable(getattr(runner, "make_engine", None))


class PartialSink(Protocol):
    async def send(self, topic: str, key: bytes, value: bytes) -> Awaitable[object]: ...


@dataclass(slots=True)
class _Active:
    """An admitted row: its event, its pending request and its stream bookkeeping."""

    event: Any  # the loop's event type (faust.EventT)
    pending: _Pending
    attempt: str
    admitted_s: float
    picked_ms: float
    stream_to: str | None
    seq: int = 0
    first_token_s: float | None = None
    tokens: int = 0
    held_text: str = ""  # streaming with ``stream_interval`` > 1: text not sent yet
    held_tokens: int = 0
    span: Span | None = None  # tracing on: the row's ``model`` span, in its request's trace
    batch: SpanContext | None = None  # tracing on: the admission's ``batch`` span (its reply produce links to it)


@dataclass(slots=True)
class LoopFigures:
    """Counters of the loop (heartbeat and tests)."""

    steps: int = 0
    admitted: int = 0
    partial_records: int = 0
    partial_failures: int = 0
    cancelled: int = 0
    engine_resets: int = 0
    acked: int = 0
    max_rows: int = 0
    idle_with_waiting: int = field(default=0)


class ContinuousLoop(LoopBase[E]):
    """Feeds a stream into a step-wise engine, one decode step at a time; see the module docstring."""

    def __init__(
        self,
        processor: BatchProcessor,
        runner: StepRunner,
        sink: PartialSink,
        view: EventView[E],
        *,
        worker_id: str,
        redis: Redis | None,
        topic_prefix: str,
        max_batch: int,
        grace_s: float,
        revoke_wait_s: float | None = None,
        bulk: BulkLane[E] | None = None,
        stream_interval: int = 1,
    ) -> None:
        """``bulk``: the bulk lane (``streams.batching.BulkLane``): admission takes interactive rows first, and
        bulk gets every free row slot interactive leaves plus its ``min_share`` of the admissions.
        ``stream_interval``: a streaming row's first token goes at once, then its text every this many tokens
        (``llm.stream_interval``; the final reply carries what was held)."""
        super().__init__(processor, view, grace_s=grace_s, revoke_wait_s=revoke_wait_s)
        self.runner = runner
        self._stream_interval = max(1, stream_interval)
        self._sink = sink
        self._worker_id = worker_id.encode()
        self._redis = redis
        self._prefix = topic_prefix
        self.buffer = BatchBuffer(max_batch, capacity=2 * max_batch, accept=self._accepts, bulk=bulk)
        self.engine = runner.make_engine()
        self.max_rows = self.engine.max_batch
        self.figures = LoopFigures()
        self._active: dict[str, _Active] = {}
        self._deliveries: set[asyncio.Future[None]] = set()
        self._partials: deque[asyncio.Future[object]] = deque()
        self._last_enqueued: asyncio.Event | None = None  # the latest partial handed to the producer
        # The runner's own compute thread when it has one (llama.cpp: all its work on one thread), else the
        # processor's (in an agent, the thread that loaded the model).
        self._executor: Executor = getattr(runner, "executor", None) or processor.executor
        self._stopping = False
        self._redis_down_logged = False
        self._admitting = 0
        self._admitter_done = False
        self._hold_steps = False  # the engine's thread pauses: too many partials wait for the broker
        self._halted = False  # run() is over: the engine's thread stops stepping
        self._wake = asyncio.Event()  # the stepper: rows were added, or the admitter ended
        self._room = asyncio.Event()  # the admitter: rows finished, there may be room

    async def run(self, stream: object) -> None:
        """Serve until the stream ends, the task is cancelled (graceful stop) or something fails.

        ``stream``: the agent's Faust stream (read through ``stream.noack()``).

        Raises:
            AgentLoopFailed: a delivery ran out of retries, or a bug; nothing it holds is acknowledged.
        """
        feeder = self._start_feed(stream)
        poller = asyncio.create_task(self._poll_cancels(), name="agent-cancel-poll")
        admitter = asyncio.create_task(self._admit_forever(), name="agent-admit")
        work = asyncio.create_task(self._serve(), name="agent-continuous")
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            if not work.done():
                await self._stop_within(work)
            raise
        finally:
            self._halted = True  # a burst still running on the engine's thread ends after its current step
            self.buffer.close()
            await self._stop_tasks(feeder, poller, admitter)
        if self.failure is not None:
            raise AgentLoopFailed(str(self.failure))

    async def _stop_within(self, work: asyncio.Task[None]) -> None:
        log.info("stopping: admitting nothing new; finishing the batch in hand (%d active rows) within %.0fs",
                 len(self._active), self.grace_s)  # fmt: skip
        self._stopping = True
        self.buffer.close()
        self.buffer.drop(lambda e: True)  # never admitted: delivered again
        self._room.set()
        try:
            await asyncio.wait_for(work, self.grace_s)
            log.info("active rows answered and acknowledged")
        except TimeoutError:
            log.warning("grace period over: %d rows left unacknowledged (delivered again)", len(self._active))
            for task in list(self._deliveries):
                task.cancel()
        except Exception:
            log.exception("the loop failed while stopping")

    # -- the admitter -------------------------------------------------------------------------------------

    async def _admit_forever(self) -> None:
        """Take and admit events whenever the engine has room, off the decode path."""
        try:
            while self.failure is None and not self._stopping:
                free = self.max_rows - self.engine.active - self._admitting
                if free <= 0:
                    self._room.clear()
                    await self._room.wait()
                    continue
                self.buffer.max_batch = free
                events = await self.buffer.take()
                if not events:
                    break  # closed and drained
                events = self._track(events)
                self._admitting = len(events)
                try:
                    await self._admit(events)
                finally:
                    self._admitting = 0
                self._wake.set()
        except Exception as exc:  # noqa: BLE001  (recorded; run() then stops the process unacknowledged)
            self._fail(exc)
        finally:
            self._admitter_done = True
            self._wake.set()

    async def _admit(self, events: list[E]) -> None:
        if not events:
            return
        records = [self.view.record(e) for e in events]
        by_record = {id(r): e for r, e in zip(records, events, strict=True)}
        batch: SpanContext | None = None
        try:
            if tracing.on():
                admission, batch = await self._admit_traced(records)
            else:
                admission = await self.processor.admit(records)
        except Exception:  # policy: isolate the poison record, never stall the partition
            log.exception("admission of %d events failed; answering them one at a time", len(records))
            self._spawn(self._isolate(events, records))
            return
        if admission.out:
            settled = [by_record[id(d.source)] for d in admission.out]
            self._spawn(self._deliver(Settlement([d.source for d in admission.out], admission.out, []), settled))
        now = time.monotonic()
        for p in admission.to_run:
            event = by_record[id(p.record)]
            attempt = uuid.uuid4().hex
            stream_to = p.event.reply_to if p.event.stream else None
            item = Item(p.event.task, dict(p.event.input), p.event.deadline_ms)
            request = self.runner.row_request(attempt, item, stream=stream_to is not None)
            active = _Active(event, p, attempt, now, admission.picked_ms, stream_to, batch=batch)
            if batch is not None:
                active.span = self._row_span(p, batch)
            if isinstance(request, Failure):
                self._finish(active, request)
                continue
            self._active[attempt] = active
            self.engine.add(request)
            self.figures.admitted += 1

    async def _admit_traced(self, records: list[Any]) -> tuple[Any, SpanContext]:
        """``processor.admit`` inside this admission's ``batch`` span: the continuous loop's micro-batch (the
        events taken together, which join the running rows at the next step), a root linked to every member's
        trace context, as ``BatchProcessor`` makes one per batch."""
        attributes = {
            "aisemble.service": self.processor.service,
            "aisemble.batch.size": len(records),
            "aisemble.batch.bytes": sum(len(r.value or b"") for r in records),
            "aisemble.batch.running_rows": len(self._active),
        }
        members = tracing.links(tracing.span_context(r.headers) for r in records)
        with tracing.tracer().start_as_current_span(
            f"batch {self.processor.service}", context=Context(), kind=SpanKind.CONSUMER, links=members,
            attributes=attributes,
        ) as span:  # fmt: skip
            return await self.processor.admit(records), span.get_span_context()

    def _row_span(self, pending: _Pending, batch: SpanContext) -> Span | None:
        """The row's ``model`` span, in its request's trace (None for a request that carried no trace context):
        from admission to its last token, with a ``first_token`` event; linked to its admission's batch."""
        context = tracing.extract(pending.record.headers)
        if context is None:
            return None
        return tracing.tracer().start_span(
            f"model {self.processor.service}",
            context=context,
            links=tracing.links([batch]),
            attributes={"aisemble.service": self.processor.service, "aisemble.task": pending.event.task},
        )

    # -- the stepper --------------------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while self.failure is None:
                if self.engine.active == 0:
                    if self._admitter_done and self.engine.active == 0:
                        break
                    self._wake.clear()
                    if self.engine.active == 0 and not self._admitter_done:
                        await self._wake.wait()
                    continue
                await self._burst()
                await self._bound_partials()
            await self._drain_deliveries()
        except Exception as exc:  # noqa: BLE001  (recorded; run() then stops the process unacknowledged)
            self._fail(exc)

    async def _burst(self) -> None:
        """Decode steps back to back on the engine's thread while rows are active (:meth:`_steps`); each
        step's report is answered on the event loop as it comes (:meth:`_on_report`)."""
        loop = asyncio.get_running_loop()
        engine = self.engine
        try:
            await loop.run_in_executor(self._executor, self._steps, loop, engine)
        except Exception as exc:  # policy: the engine's rows fail, the agent goes on
            rows = len(self._active)
            log.exception("the llm engine failed; answering its %d rows model_error and starting a new one", rows)
            self.figures.engine_resets += 1
            self.engine = self.runner.make_engine()
            message = f"engine failed: {type(exc).__name__}: {exc}"[:500]
            from agents.llm_rows import Finished, StepReport

            failed = StepReport(finished=[Finished(k, Failure(ErrorCode.MODEL_ERROR, message)) for k in self._active])
            self._on_report(failed, rows, 0.0)

    def _steps(self, loop: asyncio.AbstractEventLoop, engine: StepEngine) -> None:
        """On the engine's thread: step while the engine has rows, the loop has not failed and the partials'
        backlog allows, handing each report to the event loop without waiting for it. The thread never parks
        between steps: with a hand-off per step (the loop awaiting every step), llama.cpp's worker threads
        spun while the event loop and the engine's thread took turns, a third of the decode speed on 2 cores.
        Rows added or cancelled meanwhile join or leave at the next step (``add``/``cancel`` are thread-safe)."""
        while self.failure is None and not self._hold_steps and not self._halted and engine.active > 0:
            rows = engine.active
            started = time.perf_counter()
            report = engine.step()
            loop.call_soon_threadsafe(self._on_report, report, rows, time.perf_counter() - started)

    def _on_report(self, report: StepReport, rows: int, seconds: float) -> None:
        """One step's report on the event loop: partials sent, finished rows answered, the admitter told."""
        self.figures.steps += 1
        self.figures.max_rows = max(self.figures.max_rows, rows)
        self.processor._observer.inference(rows, seconds)
        now = time.monotonic()
        if report.deltas:
            self._send_partials(report.deltas, now)
        for finished in report.finished:
            active = self._active.pop(finished.key, None)
            if active is None:
                continue
            if isinstance(finished.outcome, Failure) and finished.outcome.code == ErrorCode.CANCELLED:
                self.figures.cancelled += 1
            if active.first_token_s is None and finished.ids:
                active.first_token_s = now
            self._finish(active, finished.outcome, rows)
        self._room.set()

    def _finish(self, active: _Active, outcome: Failure | dict[str, object], batch: int = 0) -> None:
        done = time.monotonic()
        timings = {
            "queue_ms": round(active.picked_ms - active.pending.record.timestamp_ms, 3),
            "inference_ms": round((done - active.admitted_s) * 1000.0, 3),
            "batch_size": batch,
            "total_ms": round(_now_ms() - active.picked_ms, 3),
        }
        if active.first_token_s is not None:
            timings["first_token_ms"] = round((active.first_token_s - active.admitted_s) * 1000.0, 3)
        delivery = self.processor.answer(active.pending, outcome, timings)
        if active.span is not None:
            active.span.set_attributes({"aisemble.ok": not isinstance(outcome, Failure), "aisemble.batch_size": batch})
            active.span.set_attributes({f"aisemble.{name}": value for name, value in timings.items()})
            if isinstance(outcome, Failure):
                active.span.set_attribute("aisemble.error", str(outcome.code))
            active.span.end()
        settlement = Settlement([active.pending.record], [delivery], [(active.pending, delivery)], active.batch)
        self._spawn(self._deliver(settlement, [active.event]))

    # -- deliveries and acknowledgements ------------------------------------------------------------------

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._deliveries.add(task)
        task.add_done_callback(self._delivery_done)

    def _delivery_done(self, task: asyncio.Future[None]) -> None:
        self._deliveries.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._fail(exc)
            self._wake.set()

    async def _deliver(self, settlement: Settlement, events: list[E]) -> None:
        inputs = await self.processor.deliver(settlement)
        self._settled(events)
        self._release_after_commit(events, inputs)
        self.figures.acked = self.tracker.acked

    async def _isolate(self, events: list[E], records: list[Any]) -> None:
        inputs = await self.processor.isolate(records)
        self._settled(events)
        self._release_after_commit(events, inputs)
        self.figures.acked = self.tracker.acked

    async def _drain_deliveries(self) -> None:
        while self._deliveries:
            await asyncio.gather(*list(self._deliveries), return_exceptions=True)

    # -- streaming ----------------------------------------------------------------------------------------

    def _send_partials(self, deltas: list[Delta], now: float) -> None:
        groups: dict[tuple[str, str], list[PartialDelta]] = {}
        for delta in deltas:
            active = self._active.get(delta.key)
            if active is None or active.stream_to is None:
                continue
            first = active.first_token_s is None and delta.tokens > 0
            if first:
                active.first_token_s = now
                if active.span is not None:
                    active.span.add_event("first_token", {"aisemble.ttft_ms": (now - active.admitted_s) * 1000.0})
            text, tokens = delta.text, delta.tokens
            if self._stream_interval > 1:  # hold the text back until the interval's tokens are there
                text, tokens = active.held_text + text, active.held_tokens + tokens
                if not first and tokens < self._stream_interval:
                    active.held_text, active.held_tokens = text, tokens
                    continue
                active.held_text, active.held_tokens = "", 0
            event = active.pending.event
            partial = PartialDelta(
                id=event.id,
                correlation_id=event.correlation_id,
                attempt=active.attempt,
                seq=active.seq,
                text=text,
                tokens=tokens,
            )
            active.seq += 1
            groups.setdefault((active.stream_to, event.task), []).append(partial)
        for (topic, task), group in groups.items():
            value = encode(PartialBatchEvent(service=self.processor.service, task=task, deltas=group))
            self.figures.partial_records += 1
            enqueued = asyncio.Event()
            previous, self._last_enqueued = self._last_enqueued, enqueued
            self._partials.append(asyncio.ensure_future(self._send_partial(topic, value, previous, enqueued)))
        while self._partials and self._partials[0].done():
            self._partials.popleft()
        if len(self._partials) > MAX_PARTIALS_OUTSTANDING:
            self._hold_steps = True  # the burst ends; _serve waits for the backlog before the next

    async def _send_partial(
        self, topic: str, value: bytes, previous: asyncio.Event | None, enqueued: asyncio.Event
    ) -> object:
        """Hand one partial to the producer after the one before it (a send may wait on metadata, and partials
        handed over out of order would reach the topic out of order), without holding the decode step."""
        try:
            try:
                if previous is not None:
                    await previous.wait()
                ack = await self._sink.send(topic, self._worker_id, value)
            finally:
                enqueued.set()  # whatever happened, the next partial may go
            return await ack
        except Exception as exc:  # noqa: BLE001  (a partial is an early view; the final reply is authoritative)
            self.figures.partial_failures += 1
            log.debug("a partial to %s failed: %r", topic, exc)
            return None

    async def _bound_partials(self) -> None:
        while self._partials and self._partials[0].done():
            self._partials.popleft()
        while len(self._partials) > MAX_PARTIALS_OUTSTANDING:
            await self._partials.popleft()
        self._hold_steps = False

    async def _poll_cancels(self) -> None:
        """Every ``CANCEL_POLL_S``: one MGET of every active row's cancel key (see the module docstring). Runs
        until the loop cancels it at its end; a failed read (Redis away, or anything else) skips one round."""
        redis = self._redis
        if redis is None:
            return
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            rows = list(self._active.items())
            if not rows:
                continue
            keys = [cancel_key(self._prefix, a.pending.event.id) for _, a in rows]
            try:
                values = await guarded(redis, lambda keys=keys: redis.mget(keys))  # type: ignore[misc]
            except RedisError as exc:
                if not self._redis_down_logged:
                    log.warning("cancel keys unreadable (%s); decoding goes on, cancels are not seen", exc)
                    self._redis_down_logged = True
                continue
            except Exception:  # a bug must not end the poll for good: cancels would stop silently
                log.exception("reading cancel keys failed; trying again in %.1fs", CANCEL_POLL_S)
                continue
            self._redis_down_logged = False
            for (key, active), value in zip(rows, values, strict=True):
                if cancels(value, active.pending.event.correlation_id):  # not a retry's key for an old attempt
                    self.engine.cancel(key)


class AgentLoopFailed(AgentStopped):
    """The continuous loop ended in a way that must end the process."""


def _now_ms() -> float:
    return time.time() * 1000.0
