"""The edge's request path: cache lookup, produce, await the correlated reply.

``Edge.call`` is the one function every route uses. It guarantees:

* a cache hit is answered from Redis without touching Kafka (``cached: true``);
* otherwise the reply future is registered *before* the request is produced, the request carries this
  edge's reply topic and a deadline, and the caller waits at most ``request_timeout_s`` (504 with the
  request id after that; a late reply is then dropped);
* each request id is answered once, whatever duplicates at-least-once delivery produces.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.asyncio import Redis

from api.errors import DuplicateIdError, ReplyTimeoutError, UnavailableError
from schemas import ReplyEvent, RequestEvent, Service
from streams.cache import ResultCache, wants_cache
from streams.codec import encode
from streams.registry import models_by_service
from streams.replies import DuplicateRequestIdError, ReplyListener, ReplyRouter
from streams.settings import Settings
from streams.topics import service_topics

log = logging.getLogger(__name__)


class Edge:
    """The edge's connections and its request path; one per process, built in the app's lifespan."""

    def __init__(
        self,
        settings: Settings,
        producer: AIOKafkaProducer,
        redis: Redis,
        router: ReplyRouter,
        listener: ReplyListener,
        reply_topic: str,
    ) -> None:
        self.settings = settings
        self.producer = producer
        self.redis = redis
        self.router = router
        self.listener = listener
        self.reply_topic = reply_topic
        self.cache = ResultCache(redis, settings.topic_prefix)
        self.models: dict[str, dict[str, str]] = {}

    async def refresh_models(self) -> None:
        """Read which model serves each task from the agents' heartbeats (for cache keys)."""
        models = await models_by_service(self.redis, self.settings.topic_prefix)
        if models:
            self.models = models

    def cache_key(
        self, service: Service, task: str, payload: dict[str, object], flag: bool | None
    ) -> str | None:
        model = self.models.get(service, {}).get(task)
        if model is None or not wants_cache(service, task, payload, flag):
            return None
        return self.cache.key(service, task, model, payload)

    async def call(
        self,
        service: Service,
        task: str,
        payload: dict[str, object],
        *,
        cache: bool | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ReplyEvent:
        """Serve one request through the cache or the service's agents."""
        request_id = request_id or uuid.uuid4().hex
        started = time.perf_counter()
        key = self.cache_key(service, task, payload, cache)
        if key is not None:
            hit = await self.cache.get(key)
            if hit is not None:
                elapsed = (time.perf_counter() - started) * 1000.0
                return hit.model_copy(
                    update={"id": request_id, "cached": True, "timings_ms": {"edge_ms": elapsed}}
                )

        timeout_s = timeout_s or self.settings.request_timeout_s
        event = RequestEvent(
            id=request_id,
            task=task,
            input=payload,
            reply_to=self.reply_topic,
            deadline_ms=int((time.time() + timeout_s) * 1000),
            cache=cache,
        )
        try:
            future = self.router.expect(request_id)
        except DuplicateRequestIdError as exc:
            raise DuplicateIdError(str(exc), request_id=request_id, service=service, task=task) from exc
        try:
            topic = service_topics(self.settings.topic_prefix, service).requests
            try:
                await asyncio.wait_for(
                    self.producer.send_and_wait(topic, encode(event), key=request_id.encode()), timeout_s
                )
            except (KafkaError, TimeoutError) as exc:
                raise UnavailableError(
                    f"could not produce the request to Kafka: {exc!r}",
                    request_id=request_id,
                    service=service,
                    task=task,
                ) from exc
            remaining = timeout_s - (time.perf_counter() - started)
            try:
                reply = await asyncio.wait_for(asyncio.shield(future), max(remaining, 0.001))
            except TimeoutError as exc:
                raise ReplyTimeoutError(
                    f"no reply within {timeout_s:.1f}s (request id {request_id})",
                    request_id=request_id,
                    service=service,
                    task=task,
                ) from exc
        finally:
            self.router.forget(request_id)
        elapsed = (time.perf_counter() - started) * 1000.0
        return reply.model_copy(update={"timings_ms": {**reply.timings_ms, "edge_ms": round(elapsed, 3)}})
