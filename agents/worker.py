"""An agent process: one service's runner behind a Faust agent on the service's request topic.

Start-up order: settings -> topics exist -> model loaded and warmed up -> Faust worker joins the
consumer group and consumes. The agent runs with concurrency 1 (faust issue 606: with more, a commit
can pass an event still in progress) and batches with ``take_events(max_batch, max_wait_ms)``; Faust
acknowledges a batch's events only when our loop body returns, i.e. after ``BatchProcessor.process``
saw every reply acknowledged by the broker. A batch that could not be delivered is retried in place
with backoff (the broker may be restarting); it is never acknowledged undelivered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Sequence

import faust
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agents.errors import DeliveryError
from agents.loop import BatchProcessor, Prepare
from agents.runner import ModelRunner
from schemas import Service
from streams.app import create_app, request_topic
from streams.cache import ResultCache
from streams.codec import Record
from streams.registry import AgentInfo, beat
from streams.settings import Settings
from streams.topics import ensure_service_topics

log = logging.getLogger(__name__)


def build_runner(service: Service, settings: Settings) -> ModelRunner:
    """The service's runner, from ``agents.<service>.build_runner``."""
    module = importlib.import_module(f"agents.{service}")
    runner: ModelRunner = module.build_runner(settings)
    return runner


def build_prepare(service: Service, settings: Settings, redis: Redis) -> Prepare | None:
    """The service's optional async pre-step (e.g. vision's claim-check resolution)."""
    module = importlib.import_module(f"agents.{service}")
    factory = getattr(module, "make_prepare", None)
    return factory(settings, redis) if factory is not None else None


class FaustSink:
    """Produces through the Faust app's producer; ``send`` returns the broker-ack future."""

    def __init__(self, app: faust.App) -> None:
        self._app = app

    async def send(self, topic: str, key: bytes, value: bytes) -> Awaitable[object]:
        return await self._app.producer.send(topic, key, value, partition=None, timestamp=None, headers=None)


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


def create_agent_app(service: Service, settings: Settings, runner: ModelRunner) -> faust.App:
    """The Faust app of one service's agent, with its agent and heartbeat timer registered."""
    app = create_app(settings, service)
    topic = request_topic(app, settings, service)
    conf = settings.service(service)
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    redis = Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    processor = BatchProcessor(
        service,
        runner,
        FaustSink(app),
        topic_prefix=settings.topic_prefix,
        cache=ResultCache(redis, settings.topic_prefix),
        cache_ttl_s=conf.cache_ttl_s,
        max_event_bytes=settings.max_event_bytes,
        prepare=build_prepare(service, settings, redis),
    )
    info = AgentInfo(
        service=service,
        worker_id=worker_id,
        models=processor.models,
        pid=os.getpid(),
        started_ms=int(time.time() * 1000),
    )

    async def handle(events: Sequence[faust.EventT]) -> None:
        records = [_record(e) for e in events]
        delay = 0.5
        while True:
            try:
                await processor.process(records)
                return
            except DeliveryError as exc:
                log.error("batch of %d not delivered (%s); retrying in %.1fs", len(records), exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    @app.agent(topic, name=f"{service}-agent", concurrency=1)
    async def serve(stream: faust.StreamT) -> None:
        batches = stream.take_events(conf.max_batch, within=conf.max_wait_ms / 1000.0)  # type: ignore[attr-defined]
        async for events in batches:
            await handle(events)

    @app.timer(interval=settings.heartbeat_interval_s)
    async def heartbeat() -> None:
        stats = processor.stats
        current = dataclasses.replace(info, batches=stats.batches, items=stats.items)
        try:
            await beat(redis, settings.topic_prefix, current, settings.heartbeat_ttl_s)
        except RedisError as exc:
            log.warning("heartbeat failed: %s", exc)

    return app


def run_agent(service: Service, settings: Settings) -> None:
    """Run one service's agent in the foreground until SIGINT/SIGTERM."""
    asyncio.run(ensure_service_topics(settings, [service]))
    runner = build_runner(service, settings)
    started = time.perf_counter()
    runner.load()
    log.info("%s model(s) loaded and warm in %.1fs", service, time.perf_counter() - started)
    asyncio.set_event_loop(asyncio.new_event_loop())  # asyncio.run above cleared it; Faust wants one
    app = create_agent_app(service, settings, runner)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), override_logging=False)
    worker.execute_from_commandline()
