"""The edge application: its lifespan owns the Kafka producer, the reply listener and Redis.

Start-up: topics exist (the services' and this edge's reply topic) -> producer started -> reply
listener assigned and positioned at the end -> agent registry read -> serve. Shutdown reverses it and
fails whatever still waits. Tracing (``streams.tracing``) is set up first when the environment asks for it, and
shut down (flushed) last. The app binds nothing itself; ``aisemble edge`` runs it on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

from aiokafka import AIOKafkaProducer
from fastapi import FastAPI
from fastapi.responses import ORJSONResponse

from api.admission import AdmissionGate, body_limit
from api.auth import ApiKeyGate, auth_dependencies
from api.batch_runner import BatchRunners, BatchStore
from api.edge import Edge
from api.errors import install_error_handlers
from api.guards import ByteBudget
from api.limits import BodyLimit
from api.metrics import EdgeMetrics, RequestMetrics
from api.quota_gate import QuotaGate
from api.routes import batches, data, health, lag, llm, metrics, nlp, requests, status, vision
from api.routes import openai as openai_routes
from api.status_history import History
from streams import tracing
from streams.event_loop import loop_name
from streams.kafka_security import client_options
from streams.lag_probe import LagMonitor
from streams.redis import connect
from streams.replies import ReplyListener, ReplyRouter
from streams.settings import Settings, get_settings
from streams.topics import edge_reply_topic, ensure_service_topics, ensure_topics, wait_for_partitions

log = logging.getLogger(__name__)


async def _refresh_models_forever(edge: Edge, interval_s: float) -> None:
    """Re-read the agents' model names every ``interval_s`` until cancelled (shutdown); a failure is logged
    and the last known names stay in use (Redis errors are already a miss inside ``refresh_models``)."""
    while True:
        try:
            await edge.refresh_models()
        except Exception:  # the refresher must outlive any surprise; the next round retries
            log.exception("could not refresh the agents' model names")
        await asyncio.sleep(interval_s)


UNTRACED_PATHS = frozenset({"/health", "/metrics", "/lag", "/status.json", *status.PAGE_PATHS})


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    """Operational paths (probes, metrics, the status page) make no spans."""
    return scope.get("path") in UNTRACED_PATHS


def create_app(settings: Settings | None = None) -> FastAPI:
    """The edge app; ``settings`` defaults to the environment's."""
    settings = settings or get_settings()
    # this app's own registry (api/metrics.py), served at /metrics; per key name counts (api/quotas.py)
    edge_metrics = EdgeMetrics(
        [key.name for key in settings.api_keys], settings.status_slow_requests, settings.status_history_window_s
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reply_topic = edge_reply_topic(settings.topic_prefix, settings.edge_id)
        traced = tracing.setup(None)  # on only when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set (streams.tracing)
        await ensure_service_topics(settings)
        await ensure_topics(settings, [(reply_topic, 1)])
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id=f"aisemble-edge-{settings.edge_id}",
            acks="all",
            enable_idempotence=True,
            linger_ms=settings.edge_linger_ms,  # while busy; Edge.linger sends at once when idle (AdaptiveLinger)
            max_request_size=settings.max_event_bytes,
            **client_options(settings),
        )
        redis = connect(settings)
        router = ReplyRouter()
        listener = ReplyListener(
            settings.kafka_bootstrap,
            reply_topic,
            router,
            options={"fetch_max_wait_ms": settings.edge_fetch_max_wait_ms, **client_options(settings)},
        )
        edge = Edge(settings, producer, redis, router, listener, reply_topic, metrics=edge_metrics)
        refresher: asyncio.Task[None] | None = None
        sampler: asyncio.Task[None] | None = None
        batch_store = BatchStore(settings, producer)  # the Batch API (api/batch_runner.py): files, batches, runners
        runners = BatchRunners(batch_store, lambda: edge.models) if settings.batch.runner else None
        app.state.lag = lag_monitor = LagMonitor(settings)  # GET /lag and /metrics; connects on first read
        try:
            await producer.start()
            await listener.start(await wait_for_partitions(settings, reply_topic))
            await edge.refresh_models()
            await edge.start()  # the broker probe: 503 at once while Kafka is down
            refresher = asyncio.create_task(_refresh_models_forever(edge, settings.heartbeat_interval_s))
            await batch_store.start()
            app.state.batches = batch_store
            if runners is not None:
                await runners.start()
                edge.batch_runners = runners
            app.state.edge = edge
            # The status page's history (api/routes/status.py): a point per service every interval, never raising.
            sampler = asyncio.create_task(
                status.sample_history_forever(app.state, settings.status_history_interval_s), name="status-history"
            )
            log.info("edge %s ready; replies on %s; event loop %s", settings.edge_id, reply_topic,
                     loop_name(asyncio.get_running_loop()))  # fmt: skip
            yield
        finally:
            for task in (sampler, refresher):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if runners is not None:
                await runners.stop()
            await batch_store.stop()
            await edge.stop()
            router.fail_all(RuntimeError("edge shutting down"))
            await listener.stop()
            await producer.stop()
            await redis.aclose()
            await lag_monitor.close()
            if traced:
                await asyncio.to_thread(tracing.shutdown)  # flushes the spans still queued (OTEL_BSP_EXPORT_TIMEOUT)

    app = FastAPI(
        title="aisemble edge",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        # The HTTP span is FastAPI's own (its server span continues the caller's traceparent and holds Edge.call's
        # span). It traces with the provider streams.tracing installed (tests), else the global one that
        # tracing.setup makes in the lifespan; none configured (tracing off): it only checks and passes on.
        # Only the server span: FastAPI's operation spans (dependencies, endpoint, serialization) cost more CPU per
        # request than the rest of the trace and say nothing Edge.call's span does not; its HTTP metrics and logs
        # would duplicate the edge's own (api.metrics) and go to providers nobody configured.
        telemetry={
            "tracer_provider": tracing.provider(),
            "exclude": _untraced,
            "operation_spans": False,
            "metrics": False,
            "logs": False,
        },
    )
    app.add_middleware(  # 413 for a body past its limit, in every route's error shape (api/limits.py)
        BodyLimit, limit_for=lambda path: body_limit(settings, path)
    )
    # Before any body is read: an in-flight slot and the body's bytes (api/admission.py), inside the key check.
    app.state.body_bytes = ByteBudget(settings.max_in_flight_bytes)
    app.add_middleware(AdmissionGate, settings=settings, budget=app.state.body_bytes)
    # A key's quotas (api/quota_gate.py): its services (403), rpm and concurrency (429), before the edge's own.
    app.add_middleware(QuotaGate, stats=edge_metrics.keys)
    # Outermost: no key, no body read (api/auth.py ApiKeyGate); the dependency below documents and re-checks
    # (declared in the OpenAPI document only when keys are configured: auth_dependencies).
    open_paths = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", *status.PAGE_PATHS}
    if not settings.metrics_require_key:
        open_paths.update({"/metrics", "/lag", *status.DATA_PATHS})  # operational data: same access as /metrics
    app.add_middleware(ApiKeyGate, settings=settings, open_paths=frozenset(open_paths))
    app.add_middleware(RequestMetrics, metrics=edge_metrics)  # counts 401s and 413s too
    app.state.metrics = edge_metrics
    app.state.status_history = status.HistorySampler(
        History(settings.status_history_interval_s, settings.status_history_window_s)
    )
    app.state.trace_url_template = settings.trace_url_template  # checked by Settings: http(s), {trace_id}
    app.state.edge_id = settings.edge_id
    install_error_handlers(app)
    service_auth = auth_dependencies(settings)  # API keys on every service route (api/auth.py)
    # The service routes first: a request is matched against the routers in this order (no paths overlap).
    for module in (data, nlp, llm, vision, requests):  # requests: GET /requests/{id} (api/async_requests.py)
        app.include_router(module.router, dependencies=service_auth)
    app.include_router(openai_routes.router, dependencies=service_auth)  # /v1: OpenAI-compatible (api/openai.py)
    app.include_router(batches.router, dependencies=service_auth)  # /v1/files, /v1/batches (api/routes/batches.py)
    app.include_router(health.router)  # open: probes need no key
    app.include_router(metrics.router, dependencies=auth_dependencies(settings, route="metrics"))
    app.include_router(lag.router, dependencies=auth_dependencies(settings, route="metrics"))  # like /metrics
    app.include_router(status.page_router)  # GET /: the status page, open (it holds no data; api/routes/status.py)
    app.include_router(status.router, dependencies=auth_dependencies(settings, route="metrics"))  # like /metrics
    return app
