"""Faust wiring of one service's agent: the app, the agent on the request topic, its loop and hooks.

``create_agent_app`` builds the Faust app (``streams.app.create_app``), the ``BatchProcessor`` (sink, cache,
reply-topic policy, the service's ``prepare``/``release`` hooks), the loop (``agents.loops``: the batch loop,
or the continuous loop for a step-wise LLM runner), registers the agent (one per process, concurrency 1),
the loop as the consumer's rebalance listener (``streams.app.listen_rebalance``) and the heartbeat timer.
``FaustEvents`` is how the loops see Faust's events. Lanes: the agent reads the interactive request topic and
the bulk one (``streams.topics``) as one stream; ``bulk_lane`` builds the loop's ``streams.batching.BulkLane``
(an event is bulk by its topic; the gate pauses and resumes the bulk topic at the consumer,
``streams.app.CommittingConsumer.pause_topics``), so bulk waits in Kafka, not between the broker and the loop.
A loop that fails (``AgentStopped``) crashes the app and
ends the process with ``EXIT_AGENT_FAILED`` after a bounded wait.
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
from collections.abc import Hashable, Mapping
from concurrent.futures import Executor
from typing import Any

import faust
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agents.loop import BatchObserver, BatchProcessor
from agents.loops import AgentStopped, BatchLoop, ContinuousLoop, stepwise
from agents.runner import ModelRunner
from agents.sink import FaustSink
from schemas import Service
from streams import tracing
from streams.app import CommittingConsumer, create_app, listen_rebalance, request_topic
from streams.batching import BulkLane
from streams.cache import ResultCache
from streams.codec import Record
from streams.policy import ReplyTopicPolicy
from streams.redis import connect
from streams.registry import AgentInfo, beat
from streams.settings import Settings
from streams.topics import service_topics

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


def build_hook(service: Service, name: str, settings: Settings, redis: Redis) -> Any:
    """The service's optional hook ``agents.<service>.<name>(settings, redis)``: ``make_prepare`` (an async
    pre-step, e.g. vision's claim-check resolution) or ``make_release`` (runs after a batch is delivered)."""
    module = importlib.import_module(f"agents.{service}")
    factory = getattr(module, name, None)
    return factory(settings, redis) if factory is not None else None


def _headers(headers: object) -> tuple[tuple[str, bytes], ...]:
    """A Faust message's headers (a sequence of pairs, or a mapping) as pairs."""
    if not headers:
        return ()
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return tuple((str(k), bytes(v or b"")) for k, v in pairs)  # type: ignore[attr-defined]


class FaustEvents:
    """The loops' ``EventView`` of Faust events."""

    @staticmethod
    def record(event: faust.EventT) -> Record:
        message = event.message
        return Record(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            value=message.value,
            timestamp_ms=int(message.timestamp * 1000),
            headers=_headers(message.headers) if tracing.on() else (),
        )

    @staticmethod
    def lane(event: faust.EventT) -> Hashable:
        return event.message.tp

    @staticmethod
    def ack(event: faust.EventT) -> None:
        event.ack()

    @staticmethod
    def age(event: faust.EventT) -> float:
        return float(event.message.timestamp)

    @staticmethod
    def size(event: faust.EventT) -> int:
        return len(event.message.value or b"")

    @staticmethod
    def deadline(event: faust.EventT) -> float | None:
        """The request's ``deadline_ms`` on the monotonic clock, read cheaply (only used when lingering)."""
        try:
            deadline_ms = orjson.loads(event.message.value or b"null").get("deadline_ms")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        if not isinstance(deadline_ms, int | float):
            return None
        return time.monotonic() + (deadline_ms / 1000.0 - time.time())


BULK_PAUSE_BATCHES = 2  # bulk events waiting in the loop (in batches) at which the bulk topic is paused
BULK_CAPACITY_BATCHES = 64  # the safety net: a bulk put blocks the feed past this many batches of bulk (above
# BULK_PAUSE_BATCHES + streams.app.POLL_BATCHES + Faust's stream buffer: what may still come in after a pause)


def bulk_lane(
    app: faust.App, settings: Settings, service: Service, max_batch: int, *, yields: bool = True
) -> BulkLane[faust.EventT] | None:
    """The loop's bulk lane (None when the service's ``bulk_lane`` is off): bulk by topic; the gate pauses the
    bulk topic once ``BULK_PAUSE_BATCHES`` batches of it wait in the loop and resumes it at one batch.
    ``yields``: bulk yields to live interactive traffic (``bulk_yield_while_interactive``; not the continuous
    loop, which admits rows between decode steps rather than running batches)."""
    conf = settings.service(service)
    if not conf.bulk_lane:
        return None
    topic = service_topics(settings.topic_prefix, service).bulk
    consumer = app.consumer

    def gate(pause: bool) -> None:
        if not isinstance(consumer, CommittingConsumer):
            return
        if pause:
            consumer.pause_topics([topic])
        else:
            consumer.resume_topics([topic])

    def is_bulk(event: faust.EventT) -> bool:
        return bool(event.message.topic == topic)

    return BulkLane(
        is_bulk,
        min_share=conf.bulk_min_share,
        fill_while_interactive=conf.bulk_fill_while_interactive,
        yield_ratio=conf.bulk_yield_while_interactive if yields else 0.0,
        pause_at=BULK_PAUSE_BATCHES * max_batch,
        resume_at=max_batch,
        capacity=BULK_CAPACITY_BATCHES * max_batch,
        gate=gate,
    )


def revoke_wait_s(settings: Settings) -> float:
    """How long a revoke waits for the events taken of its partitions to settle: the shutdown grace, within
    half the session timeout (the group's other members wait for this member's rejoin meanwhile)."""
    return min(settings.shutdown_grace_s, settings.session_timeout_s / 2)


def create_agent_app(
    service: Service,
    settings: Settings,
    runner: ModelRunner,
    observer: BatchObserver | None = None,
    executor: Executor | None = None,
) -> tuple[faust.App, BatchLoop[faust.EventT] | ContinuousLoop[faust.EventT]]:
    """The Faust app of one service's agent, with its agent and heartbeat timer registered; ``observer``
    (e.g. ``agents.metrics.AgentMetrics``) is told what each batch did; ``executor``: the thread that loaded
    the runner, where its model computes (``agents.loop.BatchProcessor``)."""
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
        executor=executor,
    )
    view = FaustEvents()
    loop: BatchLoop[faust.EventT] | ContinuousLoop[faust.EventT]
    if stepwise(runner):  # the LLM with llm.batching=continuous: rows join and leave between decode steps
        loop = ContinuousLoop[faust.EventT](
            processor, runner, FaustSink(app), view, worker_id=worker_id, redis=redis,
            topic_prefix=settings.topic_prefix, max_batch=conf.max_batch, grace_s=settings.shutdown_grace_s,
            revoke_wait_s=revoke_wait_s(settings),
            bulk=bulk_lane(app, settings, service, conf.max_batch, yields=False),
            stream_interval=settings.llm.stream_interval,
        )  # fmt: skip
    else:
        loop = BatchLoop[faust.EventT](
            processor, view, max_batch=conf.max_batch, linger_ms=conf.max_wait_ms, grace_s=settings.shutdown_grace_s,
            max_batch_bytes=conf.max_batch_bytes, revoke_wait_s=revoke_wait_s(settings),
            bulk=bulk_lane(app, settings, service, conf.max_batch),
        )  # fmt: skip
    listen_rebalance(app, loop)
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
        except AgentStopped:
            # Faust's own stop can hang on a broker that is away (its consumer thread waits on it); nothing
            # of the failed batch is acknowledged, so a hard exit after a bounded wait loses nothing.
            _exit_after(EXIT_STOP_WAIT_S, EXIT_AGENT_FAILED)
            await app.crash(loop.failure or RuntimeError("agent loop failed"))  # type: ignore[attr-defined]

    assigned = asyncio.Event()

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def first_assignment(sender: faust.App, assigned_tps: object = None, **_: Any) -> None:
        assigned.set()

    async def send_beat() -> None:
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

    @app.task
    async def heartbeat() -> None:
        # The first beat as soon as the group has assigned this agent its partitions (it consumes from then on),
        # and at the latest one interval after the app started; then one every interval.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.heartbeat_interval_s):
                await assigned.wait()
        await send_beat()
        log.info("startup %s: first heartbeat", service)
        async for _ in app.itertimer(settings.heartbeat_interval_s, name="heartbeat"):
            await send_beat()

    return app, loop
