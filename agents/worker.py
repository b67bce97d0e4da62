"""An agent process: one service's runner behind a Faust agent on the service's request topic.

Start-up order: settings -> topics exist -> model loaded and warmed up -> Faust worker joins the
consumer group and consumes. Faust is the runtime (group membership, fetching, offset commits of
acknowledged events); batching and acknowledgement are ours (``BatchLoop``): events are read from a
``noack`` stream into a ``streams.batching.BatchBuffer`` (natural micro-batches: whatever has arrived
when the model is free), and each event is acknowledged only after its reply or dead letter was settled
by ``agents.loop.BatchProcessor``. SIGTERM finishes the batch in hand within ``shutdown_grace_s``; a
delivery retry that runs out, or a bug in the loop, ends the process with exit status 3 (its events are
delivered again after the restart; ``aisemble run`` restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import faust
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agents.continuous import AgentLoopFailed, ContinuousLoop, stepwise
from agents.errors import DeliveryError
from agents.loop import BatchObserver, BatchProcessor, Settlement
from agents.metrics import serve_agent_metrics
from agents.runner import ModelRunner
from agents.sink import FaustSink
from schemas import Service
from streams.app import create_app, request_topic
from streams.batching import BatchBuffer, BufferClosed, feed
from streams.cache import ResultCache
from streams.codec import Record
from streams.policy import ReplyTopicPolicy
from streams.redis import connect
from streams.registry import AgentInfo, beat
from streams.settings import Settings
from streams.topics import ensure_service_topics

log = logging.getLogger(__name__)

EXIT_AGENT_FAILED = 3
EXIT_STOP_WAIT_S = 15.0


def _exit_after(seconds: float, status: int) -> None:
    """End the process with ``status`` in ``seconds`` unless it has exited by then (a daemon timer)."""

    def hard_exit() -> None:
        log.critical("the agent did not stop within %.0fs; exiting with status %d", seconds, status)
        logging.shutdown()
        os._exit(status)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True
    timer.start()


def build_runner(service: Service, settings: Settings) -> ModelRunner:
    """The service's runner, from ``agents.<service>.build_runner``."""
    module = importlib.import_module(f"agents.{service}")
    runner: ModelRunner = module.build_runner(settings)
    return runner


def build_hook(service: Service, name: str, settings: Settings, redis: Redis) -> Any:
    """The service's optional hook ``agents.<service>.<name>(settings, redis)``: ``make_prepare`` (an async
    pre-step, e.g. vision's claim-check resolution) or ``make_release`` (runs after a batch is delivered)."""
    module = importlib.import_module(f"agents.{service}")
    factory = getattr(module, name, None)
    return factory(settings, redis) if factory is not None else None


def _record(event: faust.EventT) -> Record:
    message = event.message
    return Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        timestamp_ms=int(message.timestamp * 1000),
    )


def _deadline_monotonic(event: faust.EventT) -> float | None:
    """The request's ``deadline_ms`` on the monotonic clock, read cheaply (only used when lingering)."""
    try:
        deadline_ms = orjson.loads(event.message.value or b"null").get("deadline_ms")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(deadline_ms, int | float):
        return None
    return time.monotonic() + (deadline_ms / 1000.0 - time.time())


class AgentStopped(Exception):
    """The agent loop ended in a way that must end the process (a bounded retry ran out, or a bug)."""


class BatchLoop:
    """Feeds a Faust stream into a ``BatchBuffer`` and runs one batch at a time, acknowledging by hand.

    * Events are read from a ``noack`` stream: Faust acknowledges nothing by itself, not on close, not on
      an exception. An event is acknowledged only after ``BatchProcessor`` settled its reply or dead letter.
    * Overlap: a batch is computed (decoded, checked, looked up in the cache, run through the model:
      ``BatchProcessor.compute``) while the previous batch's replies are produced and acknowledged
      (``deliver``) in the background. At most one delivery is outstanding: batch N+1's delivery starts
      only after batch N's has finished, so replies leave in batch order and a partition's events are
      acknowledged in order. A delivery that fails stops the loop (and the process, as below).
    * Graceful stop (SIGTERM/SIGINT; Faust cancels the agent): the buffer takes no more events; the batch
      in hand and the delivery outstanding are finished within ``grace_s`` and acknowledged (Faust's
      consumer commits acknowledged offsets on stop, then leaves the group). Past the grace period they are
      abandoned unacknowledged and are delivered again to whichever agent owns their partitions next.
    * Rebalance: waiting events of revoked partitions are dropped (their new owner serves them), and an
      event is acknowledged only while its partition is still assigned here.
    * Anything that escapes (a delivery retry that ran out, a bug) stops the process with an error instead
      of letting Faust restart the agent past events it holds unacknowledged.
    """

    def __init__(
        self,
        app: faust.App,
        processor: BatchProcessor,
        max_batch: int,
        linger_ms: int,
        grace_s: float,
        max_batch_bytes: int | None = None,
    ):
        self.app = app
        self.processor = processor
        self.grace_s = grace_s
        # Oldest first across partitions (each partition in order), within what waits here; a batch's
        # events together stay under max_batch_bytes when it is set (always one event at least).
        self.buffer: BatchBuffer[faust.EventT] = BatchBuffer(
            max_batch,
            capacity=4 * max_batch,
            linger_s=linger_ms / 1000.0,
            deadline_of=_deadline_monotonic if linger_ms > 0 else None,
            lane_of=lambda e: e.message.tp,
            age_of=lambda e: e.message.timestamp,
            cost_of=(lambda e: len(e.message.value or b"")) if max_batch_bytes else None,
            max_cost=max_batch_bytes,
        )
        self.failure: BaseException | None = None
        self._delivering: asyncio.Task[None] | None = None

    def on_revoked(self, revoked: set[object]) -> None:
        dropped = self.buffer.drop(lambda e: e.message.tp in revoked)
        if dropped:
            log.info("rebalance: dropped %d waiting events of revoked partitions (their new owner serves them)",
                     len(dropped))  # fmt: skip

    async def _feed(self, stream: faust.StreamT) -> None:
        """Put every event in the buffer; a failure of the stream is recorded (``run`` then stops)."""
        failure = await feed(stream.events(), self.buffer)  # type: ignore[attr-defined]
        if failure is not None:
            self.failure = failure
            log.critical("the agent's stream failed: %r", failure)

    async def run(self, stream: faust.StreamT) -> None:
        feeder = asyncio.create_task(self._feed(stream.noack()), name="agent-feed")  # type: ignore[attr-defined]
        try:
            while events := await self.buffer.take():
                await self._handle(events)
            try:
                await self._wait_delivery()
            except Exception as exc:
                self._stop_with(exc)
                raise AgentStopped(str(exc)) from exc
            if self.failure is not None:
                raise AgentStopped(str(self.failure))
        except asyncio.CancelledError:
            await self._finish_delivery_within(self.grace_s)
            raise
        finally:
            self.buffer.close()
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, BufferClosed):
                await feeder

    async def _handle(self, events: list[faust.EventT]) -> None:
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
            self._stop_with(exc)
            raise AgentStopped(str(exc)) from exc

    async def _step(self, events: list[faust.EventT]) -> None:
        """Compute one batch while the previous one is delivered; then start its own delivery."""
        records = [_record(e) for e in events]
        try:
            settlement: Settlement | None = await self.processor.compute(records)
        except Exception:  # policy: isolate the poison record, never stall the partition
            log.exception("%s batch of %d failed; retrying its records one at a time", self.processor.service,
                          len(records))  # fmt: skip
            settlement = None
        await self._wait_delivery()  # replies leave in batch order; at most one delivery outstanding
        if settlement is None:
            await self.processor.isolate(records)
            self._ack(events)
            return
        task = asyncio.create_task(self._deliver(events, records, settlement), name="agent-deliver")
        task.add_done_callback(self._delivery_done)
        self._delivering = task

    async def _deliver(self, events: list[faust.EventT], records: list[Record], settlement: Settlement) -> None:
        try:
            await self.processor.deliver(settlement)
        except DeliveryError:
            raise
        except Exception:  # a bug past the model (cache write, release hook): redo the records one at a time
            log.exception("%s delivery of a batch of %d failed; redoing its records one at a time",
                          self.processor.service, len(records))  # fmt: skip
            await self.processor.isolate(records)
        self._ack(events)

    def _ack(self, events: list[faust.EventT]) -> None:
        assigned = self.app.consumer.assignment()
        for event in events:
            if event.message.tp in assigned:
                event.ack()

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        """A delivery that failed while the loop waited for events stops the loop at once."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._stop_with(exc)

    def _stop_with(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            log.critical("agent loop failed, stopping the process (its events are delivered again): %r", exc)
        self.buffer.drop(lambda e: True)  # never run (nor acknowledge) what waits: it is delivered again
        self.buffer.close()

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


def create_agent_app(
    service: Service, settings: Settings, runner: ModelRunner, observer: BatchObserver | None = None
) -> tuple[faust.App, BatchLoop | ContinuousLoop[faust.EventT]]:
    """The Faust app of one service's agent, with its agent and heartbeat timer registered; ``observer``
    (e.g. ``agents.metrics.AgentMetrics``) is told what each batch did."""
    app = create_app(settings, service)
    topic = request_topic(app, settings, service)
    conf = settings.service(service)
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    redis = connect(settings)
    processor = BatchProcessor(
        service,
        runner,
        FaustSink(app),
        topic_prefix=settings.topic_prefix,
        cache=ResultCache(redis, settings.topic_prefix),
        cache_ttl_s=conf.cache_ttl_s,
        max_event_bytes=settings.max_event_bytes,
        prepare=build_hook(service, "make_prepare", settings, redis),
        release=build_hook(service, "make_release", settings, redis),
        retry_s=settings.delivery_retry_s,
        reply_policy=ReplyTopicPolicy.build(settings.topic_prefix, settings.reply_to_allow),
        observer=observer,
    )
    loop: BatchLoop | ContinuousLoop[faust.EventT] = BatchLoop(
        app, processor, conf.max_batch, conf.max_wait_ms, settings.shutdown_grace_s, conf.max_batch_bytes
    )
    if stepwise(runner):  # the LLM with llm.batching=continuous: rows join and leave between decode steps
        loop = ContinuousLoop[faust.EventT](
            processor, runner, FaustSink(app), assignment=lambda: app.consumer.assignment(), record_of=_record,
            lane_of=lambda e: e.message.tp, worker_id=worker_id, redis=redis, topic_prefix=settings.topic_prefix,
            max_batch=conf.max_batch, grace_s=settings.shutdown_grace_s,
        )  # fmt: skip
    info = AgentInfo(
        service=service,
        worker_id=worker_id,
        models=processor.models,
        pid=os.getpid(),
        started_ms=int(time.time() * 1000),
    )

    @app.agent(topic, name=f"{service}-agent", concurrency=1)
    async def serve(stream: faust.StreamT) -> None:
        try:
            await loop.run(stream)
        except (AgentStopped, AgentLoopFailed):
            # Faust's own stop can hang on a broker that is away (its consumer thread waits on it); nothing
            # of the failed batch is acknowledged, so a hard exit after a bounded wait loses nothing.
            _exit_after(EXIT_STOP_WAIT_S, EXIT_AGENT_FAILED)
            await app.crash(loop.failure or RuntimeError("agent loop failed"))  # type: ignore[attr-defined]

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: object, revoked: set[object], **kwargs: object) -> None:
        loop.on_revoked(revoked)

    @app.timer(interval=settings.heartbeat_interval_s)
    async def heartbeat() -> None:
        stats = processor.stats
        current = dataclasses.replace(
            info,
            batches=stats.batches,
            items=stats.items,
            delivery=processor.delivery_state,
            last_error=processor.last_error,
        )
        try:
            await beat(redis, settings.topic_prefix, current, settings.heartbeat_ttl_s)
        except RedisError as exc:
            log.warning("heartbeat failed: %s", exc)

    return app, loop


def load_factory(spec: str) -> Callable[[Settings], ModelRunner]:
    """``module:function`` -> the function (a custom runner factory taking the settings)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"runner factory {spec!r}: expected 'module:function'")
    factory: Callable[[Settings], ModelRunner] = getattr(importlib.import_module(module_name), attr)
    return factory


def run_agent(service: Service, settings: Settings, runner_factory: str | None = None) -> None:
    """Run one service's agent in the foreground until SIGINT/SIGTERM.

    ``runner_factory`` (``module:function``) serves a custom ``ModelRunner`` on the service's topics instead
    of the built-in one.
    """
    asyncio.run(ensure_service_topics(settings, [service]))
    served = serve_agent_metrics(service, settings)  # None unless AISEMBLE_AGENT_METRICS_PORT is set
    runner = load_factory(runner_factory)(settings) if runner_factory else build_runner(service, settings)
    started = time.perf_counter()
    runner.load()
    log.info("%s model(s) loaded and warm in %.1fs", service, time.perf_counter() - started)
    asyncio.set_event_loop(asyncio.new_event_loop())  # asyncio.run above cleared it; Faust wants one
    app, loop = create_agent_app(service, settings, runner, served[0] if served else None)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if loop.failure is not None:
            raise SystemExit(EXIT_AGENT_FAILED) from exc
        raise
